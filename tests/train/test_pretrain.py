"""relook-tiny pretraining: examples carry no task answers, loss falls, resume is exact."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from agent.data.pretrain import KINDS, Mix, pretrain_example, random_answer
from agent.data.tasks import FAMILIES, TaskConfig
from agent.modeling import TinySpec
from agent.tools import ImageFrame
from train.pretrain import PretrainConfig, pretrain

FRAME = ImageFrame(14, 2, 56 * 56, 112 * 112)
SMALL = TinySpec(
    text_layers=1,
    hidden=64,
    heads=2,
    kv_heads=1,
    intermediate=128,
    vision_depth=1,
    vision_hidden=32,
    vision_heads=2,
)


def test_examples_are_deterministic_and_cover_every_kind():
    cfg = TaskConfig(difficulty=0.0)
    a = [pretrain_example(i, 0, cfg, FRAME) for i in range(60)]
    b = [pretrain_example(i, 0, cfg, FRAME) for i in range(60)]
    assert [x.script for x in a] == [x.script for x in b]
    assert all(
        np.array_equal(np.asarray(x.sample.images[0]), np.asarray(y.sample.images[0]))
        for x, y in zip(a, b)
    )
    assert {x.kind for x in a} == set(KINDS)
    for x in a:
        assert x.script[-1].endswith("</answer>")
        if x.kind in ("locate", "restate"):
            assert x.tools and "<tool_call>" in x.script[0]


def test_no_example_solves_an_evaluation_family():
    """Only ``format`` examples ask evaluation-family questions, and their answers are random."""
    cfg = TaskConfig(difficulty=0.5)
    only_format = Mix(**{k: float(k == "format") for k in KINDS})
    exs = [pretrain_example(i, 3, cfg, FRAME, only_format) for i in range(200)]
    assert {e.sample.family for e in exs} <= set(FAMILIES)
    hits = [e.script[-1].split("<answer>")[1].split("</answer>")[0] == e.sample.answer for e in exs]
    assert np.mean(hits) < 0.45  # chance level, not the gold
    others = [pretrain_example(i, 3, cfg, FRAME) for i in range(200)]
    assert all(e.sample.family.startswith("pretrain:") for e in others if e.kind != "format")
    rng = np.random.default_rng(0)
    assert all(random_answer(e.sample, rng).isdigit() for e in exs)


def test_loss_falls_and_resume_is_exact(tmp_path):
    base = dict(
        steps=6, batch=4, lr=3e-3, warmup_steps=1, save_every=3, eval_every=0, spec=SMALL, probe_n=2
    )
    full = pretrain(PretrainConfig(out=tmp_path / "full", **base), progress=False)
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    card = json.loads((tmp_path / "full" / "probe.json").read_text())
    assert set(card) == {
        "perception_easiest",
        "perception_hardest",
        "families_without_tools",
        "first_turn_with_tools",
    }
    assert set(card["perception_easiest"]) == {"colour", "shape", "present", "digit"}
    assert "Held-out probes" in (tmp_path / "full" / "README.md").read_text()
    assert np.mean([r["loss"] for r in log[-2:]]) < log[0]["loss"]
    # a run stopped after step 3 and resumed gives bit-identical weights
    pretrain(
        PretrainConfig(out=tmp_path / "half", **{**base, "steps": 6}), progress=False, stop_after=3
    )
    assert (tmp_path / "half" / "checkpoint" / "trainer_state.pt").is_file()
    resumed = pretrain(
        PretrainConfig(out=tmp_path / "half", resume=True, **base), progress=False, probe=False
    )
    half_log = [
        json.loads(line) for line in (tmp_path / "half" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in half_log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in half_log] == [r["loss"] for r in log]
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    saved = load_file(tmp_path / "half" / "model.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
