"""``experiments.evaluate --out`` is checked before any work: exit 2 naming the path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from experiments import evaluate
from experiments.evaluate import EvaluateArgs, check_out


def _bad_outs(tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("x")
    (tmp_path / "a_dir").mkdir()
    return {
        "directory": (tmp_path / "a_dir", "is a directory"),
        "under a file": (regular / "eval.json", f"{regular} is a file, not a folder"),
        "deep under a file": (regular / "sub" / "eval.json", f"{regular} is a file"),
        "missing folder": (tmp_path / "nope" / "eval.json", "does not exist"),
    }


@pytest.mark.parametrize(
    "case", ["directory", "under a file", "deep under a file", "missing folder"]
)
def test_unwritable_out_fails_before_the_model_is_loaded(tmp_path, monkeypatch, case):
    out, reason = _bad_outs(tmp_path)[case]

    def no_work(*_a, **_k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("agent.modeling.load_policy", no_work)
    monkeypatch.setattr(evaluate, "_load_model", no_work)
    for args in (EvaluateArgs(out=out), EvaluateArgs(out=out, benchmark="vstar")):
        with pytest.raises(ValueError, match="--out") as err:
            evaluate.main(args)
        assert str(out) in str(err.value) and reason in str(err.value)


def test_writable_out_passes(tmp_path):
    check_out(tmp_path / "eval.json")
    (tmp_path / "eval.json").write_text("{}")  # an existing file is replaced, not an error
    check_out(tmp_path / "eval.json")


def test_cli_exits_2_naming_the_path(tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("x")
    for out in (tmp_path, regular / "eval.json"):
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.evaluate", "--out", str(out), "--model", "random"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: --out") and str(out) in proc.stderr
        assert "Loading weights" not in proc.stderr
