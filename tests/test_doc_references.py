"""Every ``*.md`` file the repository names exists in the repository (issue 21).

The code once cited design notes that lived outside the repository; a clone alone could not
explain itself. This test reads every tracked text file and resolves each ``name.md`` it
mentions: a path is looked up from the repository root and from the citing file's folder; a
bare name must be the name of some tracked file.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".ipynb", ".toml", ".sh", ".txt", ".jinja", ".cfg", ".yaml", ".yml")
GENERATED = re.compile(r"ablation_table\.md|rollouts/step\d+_\d+\.md")
"""Files that relook writes into run folders: ``experiments.figures``' table and the MLflow
tracker's rollout texts (``train.tracking``)."""
MD_REF = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b")


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [ROOT / line for line in out.splitlines() if line.endswith(TEXT)]


def _resolves(ref: str, citing: Path, names: set[str]) -> bool:
    """Whether ``ref`` names a file inside the repository (never one beside it)."""
    if GENERATED.fullmatch(ref):
        return True
    if "/" not in ref:
        return ref in names
    for candidate in (ROOT / ref.lstrip("/"), citing.parent / ref):
        path = candidate.resolve()
        if path.is_relative_to(ROOT) and path.is_file():
            return True
    return False


def test_every_markdown_reference_is_a_file_in_the_repository():
    files = _tracked()
    names = {p.name for p in files}
    missing = [
        f"{p.relative_to(ROOT)}: {ref}"
        for p in files
        if p.is_file() and p.name != Path(__file__).name
        for ref in sorted(set(MD_REF.findall(p.read_text(errors="replace"))))
        if not _resolves(ref, p, names)
    ]
    assert not missing, "references to documents not in the repository:\n" + "\n".join(missing)


def test_the_reference_check_catches_an_outside_document(tmp_path):
    names = {"README.md", "method.md"}
    assert not _resolves("METHOD.md", ROOT / "agent" / "x.py", names)
    assert not _resolves("../shared/DESIGN.md", ROOT / "README.md", names)
    assert _resolves("docs/method.md", ROOT / "agent" / "x.py", names)
