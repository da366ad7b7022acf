"""``--report-to``: the smoke grid logged to TensorBoard and to an offline W&B run, read back
with the libraries' own readers; MLflow's file store through the tracker; a missing library
refused before any run directory exists (:mod:`train.tracking`)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from experiments.ablate import AblateArgs, main
from train.config import ArmConfig
from train.tracking import RolloutSample, open_tracker

ROOT = Path(__file__).resolve().parents[2]


def _ablate(out: Path, *flags: str) -> Path:
    """The smoke grid's ``full`` arm, seed 0, on the random tiny model; returns the arm folder."""
    cmd = [sys.executable, "-m", "experiments.ablate", "--grid", "smoke", "--model", "random",
           "--out", str(out), "--arms", "full", "--seeds", "0", "--no-progress", *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "full-s0"


def _metric_columns(arm: Path) -> list[str]:
    return [c for c in pd.read_parquet(arm / "metrics.parquet").columns if "/" in c]


def test_tensorboard_logs_the_smoke_grid_with_eval_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    arm = _ablate(tmp_path / "run", "--report-to", "tensorboard", "--eval-every", "1")
    metrics = pd.read_parquet(arm / "metrics.parquet")
    assert metrics["step"].tolist() == [0, 1]
    assert metrics["eval/acc"].between(0, 1).all() and (metrics["eval/n"] == 16).all()
    events = EventAccumulator(str(arm / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for name in _metric_columns(arm):  # every metrics.parquet column, one value per step
        assert [s.step for s in events.Scalars(name)] == [0, 1], name
    reward = [s.value for s in events.Scalars("rollout/reward_mean")]
    assert reward == pytest.approx(metrics["rollout/reward_mean"].tolist())
    assert "final_eval/accuracy" in tags["scalars"]
    assert any(t.startswith("rollouts/0/image_") for t in tags["images"])
    assert {"config/text_summary", "rollouts/0/text_summary"} <= set(tags["tensors"])


def _wandb_records(path: Path):
    """The records of a ``.wandb`` transaction log: a 7-byte header (``:W&B``, magic, version),
    then LevelDB-log chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4
    last) in 32 KiB blocks. wandb >= 0.19 dropped its Python reader (wandb-core is Go)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        buf, pos = buf + data[pos : pos + length], pos + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_wandb_offline_logs_the_smoke_grid(tmp_path):
    pytest.importorskip("wandb")
    arm = _ablate(tmp_path / "run", "--report-to", "wandb")
    (run_dir,) = (arm / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("*.wandb")
    history: dict[str, int] = {}
    config, summary = set(), set()
    for r in _wandb_records(log):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                history[key] = history.get(key, 0) + 1
        elif kind == "config":
            config |= {item.key for item in r.config.update}
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key) for item in r.summary.update}
    for name in _metric_columns(arm):
        assert history.get(name) == 2, name  # one value per step
    assert {"grpo/lr", "grpo/steps", "agent/tools", "report_to"} <= config
    assert {"final_eval/accuracy", "final_eval/sampled/accuracy"} <= summary
    assert any(k.startswith("rollouts") for k in history)
    assert list((run_dir / "files" / "media" / "images" / "rollouts" / "0").glob("image_0_*.png"))


def _sample() -> RolloutSample:
    image = Image.new("RGB", (12, 10), "red")
    return RolloutSample("q0/g0", "count", "3", "3", 1.0, 1.0, 1, "turn 0 [answer] 3", [image])


def test_mlflow_file_store(tmp_path):
    pytest.importorskip("mlflow")
    import mlflow

    cfg = ArmConfig(name="full-s0", report_to="mlflow")
    with open_tracker(cfg, tmp_path, group="run1") as tracker:
        for step in range(3):
            tracker.log_metrics({"step": step, "rollout/reward_mean": step / 2, "eval/acc": 0.5})
        tracker.log_rollouts([_sample()], 3)
        tracker.log_summary({"accuracy": 0.25, "per_family": {"count": 0.5}, "split": "test"}, 3)
    client = mlflow.MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("relook").experiment_id])
    history = client.get_metric_history(run.info.run_id, "rollout/reward_mean")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert run.data.params["grpo/lr"] == str(cfg.grpo.lr) and run.data.tags["group"] == "run1"
    assert run.data.metrics["final_eval/per_family/count"] == 0.5
    assert run.info.status == "FINISHED"
    files = {f.path for f in client.list_artifacts(run.info.run_id, "rollouts")}
    assert {"rollouts/step3_0.md", "rollouts/step3_0_image0.png"} <= files


@pytest.mark.parametrize("backend,extra", [("tensorboard", "track"), ("wandb", "track"),
                                           ("mlflow", "mlflow")])  # fmt: skip
def test_missing_library_fails_before_a_run_directory(tmp_path, monkeypatch, backend, extra):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == backend else find_spec(name)
    )
    out = tmp_path / "run"
    args = AblateArgs(grid="smoke", model="random", out=out, seeds=(0,), report_to=backend)
    with pytest.raises(ImportError, match=rf"pip install -e '\.\[{extra}\]'"):
        main(args)
    assert not out.exists()


def test_missing_library_exits_2_naming_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    from experiments.cli import run_cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name)
    )
    out = tmp_path / "run"
    argv = ["ablate", "--grid", "smoke", "--out", str(out), "--report-to", "wandb"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, AblateArgs)
    assert exit_info.value.code == 2
    assert "error: --report-to wandb needs the 'wandb' package" in capsys.readouterr().err
    assert not out.exists()
