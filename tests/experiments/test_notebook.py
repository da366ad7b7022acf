"""The worked notebook ``experiments/notebooks/attention_study.ipynb`` runs and its outputs hold."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = (
    Path(__file__).resolve().parents[2] / "experiments" / "notebooks" / "attention_study.ipynb"
)


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            out.append(o["text"])
        elif "data" in o and "text/plain" in o["data"]:
            out.append(o["data"]["text/plain"])
    return "\n".join(out)


@pytest.fixture(scope="module")
def executed():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parents[2])}},
    )
    client.execute()  # raises CellExecutionError on any failing cell (its asserts included)
    return nb


def test_notebook_runs_and_its_outputs_are_checked(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    text = "\n".join(_text(c) for c in code)
    assert not [o for c in code for o in c.get("outputs", []) if o["output_type"] == "error"]
    rows = re.search(r"max \|row sum - 1\| = ([0-9.e+-]+)", text)
    assert rows and float(rows.group(1)) < 1e-5
    gap = re.search(r"max \|generation - replay\| = ([0-9.e+-]+)", text)
    assert gap and float(gap.group(1)) < 1e-5
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert pngs >= 2  # the decay curves and the head map
    for heading in ("half_life_tokens", "image_share_max", "delta_lo", "shapley_grey", "spearman"):
        assert heading in text, heading
    assert re.search(r"tool calls: [1-9]\d* \(", text), (
        "the sampled episodes must contain tool calls"
    )
