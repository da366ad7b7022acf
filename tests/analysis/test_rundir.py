"""The run directory contract: atomic writers, readers and status handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from analysis import rundir as rd
from analysis.metrics import image_share_curve, share_by_token

ARMS = ["full-s0", "full-s1", "tools_none-s0"]
METRICS = ["rollout/reward_mean", "rollout/acc_mean", "actor/kl", "timing_s/step"]
REGIONS = ["sink", "system", "user_text", "image_wrap", "image:1", "image:2", "tool_text"]
REGIONS += ["generated", "self"]


def synthetic_attention(seed: int, trajectories: int = 2, tokens: int = 6) -> pd.DataFrame:
    """Random long attention table: 2 layers x 2 heads, Dirichlet masses summing to 1 per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(trajectories):
        for t in range(tokens):
            for layer in range(2):
                for head in range(2):
                    masses = rng.dirichlet(np.ones(len(REGIONS)))
                    for region, mass in zip(REGIONS, masses):
                        image = int(region.split(":")[1]) if region.startswith("image:") else -1
                        origin = "" if image < 0 else ("input" if image == 1 else "reflect")
                        rows.append((f"t{j}", t, 40 + t, t // 3, layer, head, region, image))
                        rows[-1] += (origin, float(mass))
    return pd.DataFrame(rows, columns=list(rd.ATTENTION_COLUMNS))


def synthetic_events() -> pd.DataFrame:
    return pd.DataFrame(
        {"trajectory": ["t0", "t1"], "token": [3, 4], "tool": ["reflect", "confirm"]}
        | {"ok": [True, True], "turn": [1, 1]}
    )


def build_run(root: Path) -> Path:
    """A 3-arm run: full-s0/s1 complete with attention; tools_none-s0 still running (no
    attention yet). Metrics: 5 steps of METRICS; eval for every arm."""
    run = rd.create_run(root, "ablation", ARMS, [0, 1], {"python": "3.x", "torch": "cpu"})
    rng = np.random.default_rng(0)
    for i, arm in enumerate(ARMS):
        rd.start_arm(run, arm, {"arm": arm, "tool_gain": 0.5, "seed": i % 2})
        steps = {"step": np.arange(5)} | {m: rng.random(5) for m in METRICS}
        rd.write_metrics(run, arm, pd.DataFrame(steps))
        result = {"split": "test", "n": 20, "accuracy": 0.1 * (i + 1), "model": "tiny"}
        result |= {"per_family": {"count": 0.5, "find": 0.25}, "tool_call_rate": 0.5}
        rd.write_eval(run, arm, result | {"tool_calls": {"reflect": 0.5, "confirm": 0.25}})
        rd.write_trajectories(run, arm, [{"id": "t0", "family": "count", "reward": 1.0}])
        if arm.startswith("full"):
            rd.write_attention(run, arm, synthetic_attention(i))
            rd.write_attention_events(run, arm, synthetic_events())
            rd.finish_arm(run, arm)
        else:
            rd.set_arm_stage(run, arm, "attention")
    return run


# Atomic writes


def test_atomic_writes_leave_only_final_files(tmp_path):
    rd.atomic_write_text(tmp_path / "a.txt", "hello")
    rd.atomic_write_json(tmp_path / "b.json", {"x": np.float32(0.5), "p": Path("/x")})
    rd.atomic_write_parquet(tmp_path / "c.parquet", pd.DataFrame({"step": [1, 2]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.parquet"]
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 0.5, "p": "/x"}
    # A write that fails half-way leaves the old file intact and no temp file behind.
    with pytest.raises(Exception):  # noqa: B017 (pyarrow's own error type)
        rd.atomic_write_parquet(tmp_path / "c.parquet", pd.DataFrame({"a": [object()]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.parquet"]
    assert pd.read_parquet(tmp_path / "c.parquet")["step"].tolist() == [1, 2]


# Writers and status


def test_create_run_refuses_foreign_folder_and_reopens_own(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(rd.RunDirError, match="foreign.*not empty"):
        rd.create_run(tmp_path / "foreign", "ablation", ["full-s0"], [0], {})
    run = rd.create_run(tmp_path / "run", "ablation", ["full-s0"], [0], {"python": "3"})
    created = rd.load_manifest(run)["created"]
    rd.create_run(run, "ablation", ["gain0-s1"], [1], {"python": "3"})
    manifest = rd.load_manifest(run)
    assert manifest["arms"] == ["full-s0", "gain0-s1"] and manifest["seeds"] == [0, 1]
    assert manifest["created"] == created and manifest["status"] == "running"
    with pytest.raises(rd.RunDirError, match="grid"):
        rd.create_run(run, "other", ["full-s0"], [0], {})
    with pytest.raises(ValueError, match="arm name"):
        rd.create_run(tmp_path / "bad", "ablation", ["../x"], [0], {})


def test_arm_lifecycle_and_finish_run(tmp_path):
    run = rd.create_run(tmp_path / "run", "ablation", ["full-s0", "gain0-s0"], [0], {})
    rd.start_arm(run, "full-s0", {"lr": 1e-6})
    assert rd.list_arms(run).set_index("arm").loc["gain0-s0", "status"] == "pending"
    rd.set_arm_stage(run, "full-s0", "train")
    status = json.loads((run / "full-s0" / "status.json").read_text())
    assert status["status"] == "running" and status["stage"] == "train"
    rd.finish_arm(run, "full-s0")
    rd.start_arm(run, "gain0-s0", {})
    rd.finish_arm(run, "gain0-s0", "failed", error="OOM")
    assert rd.finish_run(run) == "incomplete"
    arms = rd.list_arms(run).set_index("arm")
    assert arms.loc["gain0-s0", "error"] == "OOM" and arms.loc["full-s0", "stage"] == "done"
    rd.start_arm(run, "gain0-s0", {})
    rd.finish_arm(run, "gain0-s0")
    assert rd.finish_run(run) == "complete" == rd.load_manifest(run)["status"]
    with pytest.raises(ValueError, match="complete"):
        rd.finish_arm(run, "gain0-s0", "done")


def test_mark_interrupted_flips_running_arms(tmp_path):
    run = build_run(tmp_path / "run")
    assert rd.mark_interrupted(run) == ["tools_none-s0"]
    arms = rd.list_arms(run).set_index("arm")
    assert arms.loc["tools_none-s0", "status"] == "failed"
    assert arms.loc["tools_none-s0", "error"] == "interrupted"
    assert (arms.loc[["full-s0", "full-s1"], "status"] == "complete").all()
    assert rd.load_manifest(run)["status"] == "incomplete"
    assert rd.mark_interrupted(tmp_path / "missing") == []


# Readers


def test_readers_round_trip(tmp_path):
    run = build_run(tmp_path / "run")
    assert rd.load_manifest(run)["arms"] == ARMS
    arms = rd.list_arms(run)
    assert arms["arm"].tolist() == ARMS
    assert arms["has_attention"].tolist() == [True, True, False]
    assert arms["has_metrics"].all() and arms["has_eval"].all()
    metrics = rd.load_metrics(run)
    assert metrics.columns[:2].tolist() == ["arm", "step"] and len(metrics) == 15
    assert set(METRICS) <= set(metrics.columns)
    assert rd.load_metrics(run, arms=["full-s1"])["arm"].unique().tolist() == ["full-s1"]
    evals = rd.load_eval(run)
    assert evals["arm"].tolist() == ARMS
    assert evals["accuracy"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert evals["tool_calls/reflect"].tolist() == [0.5] * 3
    assert evals["per_family/find"].tolist() == [0.25] * 3
    att = rd.load_attention(run, "full-s0")
    expected = synthetic_attention(0).astype(rd.ATTENTION_COLUMNS)
    pd.testing.assert_frame_equal(att, expected, check_dtype=False)
    assert att["mass"].dtype == np.float32
    sums = att.groupby(["trajectory", "token", "layer", "head"])["mass"].sum()
    assert np.allclose(sums, 1.0, atol=1e-5)
    events = rd.load_attention_events(run, "full-s1")
    assert events["tool"].tolist() == ["reflect", "confirm"]
    assert rd.load_trajectories(run, "full-s0") == [{"id": "t0", "family": "count", "reward": 1.0}]


def test_optional_files_give_empty_frames(tmp_path):
    run = build_run(tmp_path / "run")
    att = rd.load_attention(run, "tools_none-s0")
    assert att.empty and att.columns.tolist() == list(rd.ATTENTION_COLUMNS)
    events = rd.load_attention_events(run, "tools_none-s0")
    assert events.empty and events.columns.tolist() == list(rd.EVENT_COLUMNS)
    assert rd.load_trajectories(run, "nope") == []
    empty = rd.create_run(tmp_path / "empty", "ablation", ["a-s0"], [0], {})
    assert rd.load_metrics(empty).columns.tolist() == ["arm", "step"]
    assert rd.load_eval(empty).empty


def test_corrupt_and_incomplete_files_raise_rundirerror(tmp_path):
    run = build_run(tmp_path / "run")
    with pytest.raises(rd.RunDirError, match="does not exist"):
        rd.load_manifest(tmp_path / "nope")
    with pytest.raises(rd.RunDirError, match="not a relook run directory"):
        rd.load_manifest(tmp_path)
    (run / "full-s0" / "metrics.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(rd.RunDirError, match=r"full-s0/metrics\.parquet: corrupt parquet"):
        rd.load_metrics(run)
    rd.atomic_write_parquet(run / "full-s1" / "attention.parquet", pd.DataFrame({"token": [0]}))
    with pytest.raises(rd.RunDirError, match=r"full-s1/attention\.parquet.*'mass'"):
        rd.load_attention(run, "full-s1")
    (run / "full-s1" / "eval.json").write_text('{"n": 3}')
    with pytest.raises(rd.RunDirError, match=r"full-s1/eval\.json.*accuracy"):
        rd.load_eval(run)
    (run / "full-s1" / "trajectories.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(rd.RunDirError, match="line 2"):
        rd.load_trajectories(run, "full-s1")
    (run / "tools_none-s0" / "status.json").write_text("{")
    with pytest.raises(rd.RunDirError, match=r"tools_none-s0/status\.json: corrupt JSON"):
        rd.list_arms(run)
    (run / "manifest.json").write_text('{"arms": ')
    with pytest.raises(rd.RunDirError, match=r"manifest\.json: corrupt JSON"):
        rd.load_manifest(run)


# Figure builders over run-dir frames


def test_figure_builders(tmp_path):
    run = build_run(tmp_path / "run")
    fig = plots.training_curves(rd.load_metrics(run), "actor/kl")
    names = [t.name for t in fig.data]
    assert names == ["full max", "full min", "full (mean of 2 seeds)", "tools_none-s0"]
    assert plots.training_curves(rd.load_metrics(run), "nope/none").data == ()
    curves = {a: image_share_curve(rd.load_attention(run, a)) for a in ARMS[:2]}
    events = pd.concat([rd.load_attention_events(run, a).assign(arm=a) for a in ARMS[:2]])
    fig = plots.image_share_figure(curves, events)
    assert [t.name for t in fig.data][:2] == ARMS[:2] and len(fig.data) == 6
    shares = share_by_token(rd.load_attention(run, "full-s0"))
    names = [t.name for t in plots.stacked_shares_figure(shares).data]
    assert names == ["text", "tool text", "image", "generated"]
    table = plots.eval_table(rd.load_eval(run))
    assert table.columns[:3].tolist() == ["arm", "n", "accuracy"]
    assert {"acc: count", "reflect/sample", "model"} <= set(table.columns)
