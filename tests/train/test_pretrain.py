"""relook-tiny pretraining: examples carry no task answers, loss falls, resume is exact."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
import tyro
from safetensors.torch import load_file

from agent.data.pretrain import COLOURS, KINDS, SHAPES, Mix, pretrain_example, random_answer
from agent.data.tasks import FAMILIES, TaskConfig
from agent.modeling import TinySpec, build_tiny_model, load_policy
from agent.tools import ImageFrame
from train.model_card import load_config, write_card
from train.pretrain import (
    STAGE1_MIX,
    PretrainConfig,
    curriculum,
    pretrain,
    vision_example,
    vision_warmup,
)

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
    assert {x.kind for x in a} == {k for k in KINDS if getattr(Mix(), k) > 0}
    for x in a:
        assert x.script[-1].endswith("</answer>")
        if x.kind in ("locate", "restate"):
            assert x.tools and "<tool_call>" in x.script[0]


def test_no_example_shows_when_a_tool_helps():
    """Only ``format`` examples ask evaluation-family questions; their tool calls are random
    draws; their answers are gold or (``family_answers="random"``) at chance."""
    cfg = TaskConfig(difficulty=0.5)
    only_format = Mix(**{k: float(k == "format") for k in KINDS})
    exs = [
        pretrain_example(i, 3, cfg, FRAME, only_format, family_answers="random") for i in range(200)
    ]
    assert {e.sample.family for e in exs} <= set(FAMILIES)
    hits = [e.script[-1].split("<answer>")[1].split("</answer>")[0] == e.sample.answer for e in exs]
    assert np.mean(hits) < 0.45  # chance level, not the gold
    gold = [
        pretrain_example(i, 3, cfg, FRAME, only_format, family_answers="gold") for i in range(200)
    ]
    assert all(g.script[-1].endswith(f"<answer>{g.sample.answer}</answer>") for g in gold)
    # the tool calls before a family answer are the same random draws in both modes
    assert [g.script[:-1] for g in gold] == [e.script[:-1] for e in exs]
    assert Mix.only("format") == only_format
    with pytest.raises(ValueError, match="unknown example kinds"):
        Mix.only("oracle")
    with pytest.raises(ValueError, match="family_answers"):
        PretrainConfig(family_answers="oracle")
    others = [pretrain_example(i, 3, cfg, FRAME) for i in range(200)]
    assert all(e.sample.family.startswith("pretrain:") for e in others if e.kind != "format")
    rng = np.random.default_rng(0)
    assert all(random_answer(e.sample, rng).isdigit() for e in exs)


def test_curriculum_stage1_then_ramp_to_photos_and_small_objects():
    cfg = PretrainConfig(steps=1000, stage1_steps=200, ramp_frac=0.5)
    tasks, sizes, plain, mix = curriculum(0, cfg)
    assert (tasks.difficulty, sizes, plain, mix) == (0.0, cfg.size_start, 1.0, STAGE1_MIX)
    tasks, sizes, plain, mix = curriculum(400, cfg)  # halfway through the 400-step ramp
    assert tasks.difficulty == 0.5 and 0 < plain < 1 and mix == cfg.mix
    assert cfg.size_end[1] < sizes[1] < cfg.size_start[1]
    tasks, sizes, plain, mix = curriculum(999, cfg)
    assert (tasks.difficulty, sizes, plain) == (1.0, cfg.size_end, 0.0)
    # stage-1 examples: only perception kinds, flat backgrounds, large objects
    t0, s0, p0, m0 = curriculum(0, cfg)
    exs = [pretrain_example(i, 0, t0, FRAME, m0, sizes=s0, plain=p0) for i in range(40)]
    assert {e.kind for e in exs} <= {"colour", "shape", "present", "digit"}
    assert all(set(e.sample.meta["backgrounds"]) == {"plain"} for e in exs)
    sides = [
        max(o["bbox"][2] - o["bbox"][0], o["bbox"][3] - o["bbox"][1])
        for e in exs
        if e.kind != "present"  # its distractors keep the evaluation sizes
        for objs in e.sample.meta["objects"]
        for o in objs[:1]
    ]
    assert min(sides) >= 60  # shapes of 100-180 px; digits keep their aspect (>= 1/3 wide)


def test_large_digits_fit_the_image():
    cfg = TaskConfig(difficulty=0.0)
    only_digit = Mix(**{k: float(k == "digit") for k in KINDS})
    for i in range(200):
        ex = pretrain_example(i, 1, cfg, FRAME, only_digit, sizes=(200, 260))
        x1, y1, x2, y2 = ex.sample.meta["objects"][0][0]["bbox"]
        assert 0 <= x1 < x2 <= 224 and 0 <= y1 < y2 <= 224


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
        "perception_medium",
        "perception_hardest",
        "families_without_tools",
        "first_turn_with_tools",
        "zoom_headroom",
        "family_zoom_headroom",
    }
    assert set(card["family_zoom_headroom"]) == {"plain", "oracle"}
    assert card["family_zoom_headroom"]["oracle"]["n"] == card["family_zoom_headroom"]["plain"]["n"]
    assert set(card["zoom_headroom"]["shape"]) == {"plain", "zoomed"}
    assert "Zoom headroom" in (tmp_path / "full" / "README.md").read_text()
    assert set(card["perception_easiest"]) == {"colour", "shape", "present", "digit"}
    card_text = (tmp_path / "full" / "README.md").read_text()
    assert "Held-out probes" in card_text and "python -m train.pretrain --out" in card_text
    # the rebuild command spells out the whole config: parsed back, it is the same config
    saved = json.loads((tmp_path / "full" / "relook_pretrain.json").read_text())
    cmd = shlex.split(saved["rebuild_command"])
    assert cmd[:3] == ["python", "-m", "train.pretrain"]
    cfg = PretrainConfig(out=tmp_path / "full", **base)
    assert (
        tyro.cli(PretrainConfig, args=cmd[3:])
        == cfg
        == load_config(tmp_path / "full" / "relook_pretrain.json")
    )
    card = write_card(tmp_path / "full", {**card, "attention": _fake_attention()}, "models/x")
    assert (
        "--out models/x" in card.read_text() and "Attention of the base model" in card.read_text()
    )
    digest = hashlib.sha256((tmp_path / "full" / "model.safetensors").read_bytes()).hexdigest()
    assert f"`sha256sum <out>/model.safetensors` = `{digest}`" in card.read_text()
    assert f"saved by transformers {transformers.__version__})" in card.read_text()
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


def _fake_attention() -> dict:
    row = {"n": 2, "curve": [{"tokens": "0-3", "image_share": 0.2, "n": 2}]}
    return {
        k: {**row, "before_after": {"n_events": 0, "before": 0.1, "after": 0.3}}
        for k in ("single", "multi")
    }


def test_vision_stage_trains_only_the_tower_and_is_deterministic(tmp_path):
    cfg = PretrainConfig(
        out=tmp_path / "v", steps=2, batch=2, vision_steps=6, vision_batch=4, stage1_steps=1,
        eval_every=0, spec=SMALL, seed=3,
    )  # fmt: skip
    img, labels = vision_example(0, 0, cfg)
    assert labels[2] == -1 and 0 <= labels[0] < len(COLOURS) and 0 <= labels[1] < len(SHAPES)
    assert vision_example(0, 1, cfg)[1][:2] == (-1, -1) and img.size == (224, 224)
    again = vision_example(0, 0, cfg)[0]
    assert np.array_equal(np.asarray(img), np.asarray(again))
    build_tiny_model(tmp_path / "init", SMALL, seed=3)
    policy = load_policy(tmp_path / "init")
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    log = io.StringIO()
    losses = vision_warmup(policy, cfg, log, progress=False)
    assert len(losses) == 6 and all(np.isfinite(losses))
    rows = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [r["vision_step"] for r in rows] == list(range(1, 7)) and rows[0]["stage"] == "vision"
    for n, p in policy.model.named_parameters():
        assert torch.equal(p, before[n]) != ("visual" in n), n  # the tower moved, nothing else
    # the whole run: stage-0 rows, then the main steps; the same seed gives the same weights
    first = pretrain(cfg, progress=False, probe=False)
    steps = [json.loads(x) for x in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    assert [r.get("vision_step", 0) for r in steps[:6]] == list(range(1, 7))
    assert [r["step"] for r in steps[6:]] == [1, 2]
    second = pretrain(replace(cfg, out=tmp_path / "w"), progress=False, probe=False)
    for (n, p), (_, q) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n


def test_stage0_snapshot_is_reused_only_when_its_fields_match(tmp_path, monkeypatch):
    import train.pretrain as tp

    cfg = PretrainConfig(
        out=tmp_path / "v", steps=1, batch=2, vision_steps=3, vision_batch=4, stage1_steps=1,
        eval_every=0, spec=SMALL, seed=5, vision_pool="flat", vision_digit_frac=0.75,
    )  # fmt: skip
    # 3 of every 4 stage-0 images are digits at vision_digit_frac=0.75
    assert [vision_example(0, i, cfg)[1][2] >= 0 for i in range(8)] == [False, True, True, True] * 2
    first = pretrain(cfg, progress=False, probe=False)
    snap = tmp_path / "v" / "stage0"
    assert (snap / "stage0.json").is_file() and (snap / "model.safetensors").is_file()

    def rows():  # the log without wall times
        lines = (tmp_path / "v" / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]

    log_before = rows()
    calls = []
    real = tp.vision_warmup
    monkeypatch.setattr(tp, "vision_warmup", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = pretrain(cfg, progress=False, probe=False)  # a fresh run over the same folder
    assert calls == [], "stage 0 was redone although its snapshot matches"
    assert rows() == log_before and rows()[0]["stage"] == "vision"
    for (n, p), (_, q) in zip(first.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), n
    pretrain(replace(cfg, vision_lr=1e-4), progress=False, probe=False)
    assert calls == [1], "a snapshot of another stage 0 must not be reused"
    with pytest.raises(ValueError, match="vision_pool"):
        PretrainConfig(vision_pool="max")
    with pytest.raises(ValueError, match="vision_digit_frac"):
        PretrainConfig(vision_digit_frac=1.5)


def test_perception_tool_turns_answer_the_question():
    cfg = TaskConfig(difficulty=0.0)
    mix = Mix.only("colour", "shape", "present", "digit")
    plain = [pretrain_example(i, 2, cfg, FRAME, mix) for i in range(120)]
    assert plain == [
        pretrain_example(i, 2, cfg, FRAME, mix, perception_tool_frac=0.0) for i in range(120)
    ]
    tooled = [pretrain_example(i, 2, cfg, FRAME, mix, perception_tool_frac=1.0) for i in range(120)]
    called = [e for e in tooled if len(e.script) == 2]
    assert {e.kind for e in called} == {"colour", "shape", "present", "digit"}
    assert all(e.tools for e in called)
    assert not [e for e in tooled if len(e.script) == 2 and not e.tools]
    for e in called:
        assert "<tool_call>" in e.script[0] and "<answer>" not in e.script[0]
        assert e.script[1].endswith(f"<answer>{e.sample.answer}</answer>")
    confirms = [e for e in called if '"confirm"' in e.script[0] and e.kind != "present"]
    assert confirms  # some zoom on the object itself
    for e in confirms:
        box = json.loads(e.script[0].split("<tool_call>")[1].split("</tool_call>")[0])
        x1, y1, x2, y2 = box["arguments"]["bbox_2d"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2


@pytest.mark.parametrize("kind", ["ground", "named", "which"])
def test_literacy_kinds_are_valid_and_answer_by_construction(kind):
    """Issue 17's tool literacy: deterministic, every tool call runs, answers follow from the
    scene, and a long thought describes every image."""
    from agent.data.pretrain import frame_box
    from agent.tools import TOOL_CALL_RE, run_tool

    cfg = TaskConfig(difficulty=0.5)
    exs = [pretrain_example(i, 2, cfg, FRAME, Mix.only(kind), sizes=(12, 60)) for i in range(40)]
    again = [pretrain_example(i, 2, cfg, FRAME, Mix.only(kind), sizes=(12, 60)) for i in range(40)]
    assert [e.script for e in exs] == [e.script for e in again]
    calls = 0
    for e in exs:
        s, objs = e.sample, e.sample.meta["objects"]
        assert e.script[-1].endswith(f"<answer>{s.answer}</answer>")
        for turn in e.script[:-1]:
            call = TOOL_CALL_RE.search(turn)
            res = run_tool(call.group(1), list(s.images), FRAME, ("reflect", "confirm"))
            assert res.ok, res.text
            calls += 1
        if kind == "ground":
            k = int(s.question.split("image ")[1].rstrip("?"))
            colour = s.question.split("the ")[1].split(" object")[0]
            boxes = [frame_box(o["bbox"], s.images[k - 1], FRAME) for o in objs[k - 1]
                     if o["colour"] == colour]  # fmt: skip
            assert s.answer == "[" + ", ".join(map(str, boxes[0])) + "]"
        elif kind == "which":
            colour, shape = s.question.removeprefix("Which image shows the ").rstrip("?").split()
            holders = [k + 1 for k, ob in enumerate(objs)
                       if any((o["colour"], o["shape"]) == (colour, shape) for o in ob)]  # fmt: skip
            assert holders == [int(s.answer)]
            assert all(f"Image {k + 1} shows" in e.script[-1] for k in range(len(objs)))
        else:
            k = int(s.question.split("image ")[1].rstrip("?"))
            assert any(s.answer in (o["shape"], o["colour"]) for o in objs[k - 1])
    assert kind == "ground" or calls > 0
