"""``experiments.probe``: the base-model report (perception, families, protocol, attention)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from agent import modeling
from experiments import probe


def test_probe_report_has_every_section_and_real_attention(tiny_dir, tmp_path):
    out = tmp_path / "probe.json"
    res = probe.main(probe.ProbeArgs(out=out, model=str(tiny_dir), n=2, attention_n=2))
    assert json.loads(out.read_text())["model"] == str(tiny_dir)
    for key in ("perception_easiest", "perception_medium", "perception_hardest"):
        assert set(res[key]) == {"colour", "shape", "present", "digit"}
    assert set(res["attention"]) == {"single", "multi"}
    att = pd.read_parquet(out.with_suffix(".attention.parquet"))
    assert set(att["setting"]) == {"single", "multi"}
    for name, s in res["attention"].items():
        assert s["n"] == 2 and s["curve"], name
        assert all(0.0 <= row["image_share"] <= 1.0 for row in s["curve"])
        assert s["curve"][0]["tokens"] == "0-3"
    # single-image questions hold one input image, multi-image ones two to four
    inputs = att[att["origin"] == "input"]
    single, multi = inputs[inputs["setting"] == "single"], inputs[inputs["setting"] == "multi"]
    assert single["region"].nunique() == 1 and multi["region"].nunique() >= 2


def test_relook_tiny_name_resolves_or_says_how_to_rebuild(monkeypatch, tmp_path):
    assert modeling.resolve_model("/some/dir") == "/some/dir"
    monkeypatch.setattr(modeling, "RELOOK_TINY_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="rebuild"):
        modeling.load_policy("relook-tiny")
