"""``experiments.ablate`` end to end on the smoke grid; failures and interruptions; bad models."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from analysis import rundir
from experiments import ablate
from experiments.grids import ARM_SWITCHES, grid_arms


def _args(out, **kw):
    base = {"grid": "smoke", "out": out, "workers": 1, "progress": False, "seeds": (0,)}
    return ablate.AblateArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    return ablate.main(_args(out, model=str(tiny_dir)))


def test_smoke_grid_writes_a_complete_run_directory(smoke_run):
    manifest = rundir.load_manifest(smoke_run)
    assert manifest["status"] == "complete" and manifest["grid"] == "smoke"
    arms = rundir.list_arms(smoke_run)
    assert (
        set(arms["arm"]) == {f"{a}-s0" for a in ARM_SWITCHES}
        and (arms["status"] == "complete").all()
    )
    metrics = rundir.load_metrics(smoke_run)
    assert metrics.groupby("arm")["step"].max().eq(1).all()
    for col in (
        "rollout/reward_mean",
        "mask/trajectory_frac",
        "actor/clipfrac",
        "actor/kl",
        "timing_s/gen",
        "rollout/tool_calls/confirm",
    ):
        assert col in metrics and metrics[col].notna().all()
    ev = rundir.load_eval(smoke_run)
    assert ev["n"].eq(4).all() and ev["accuracy"].between(0, 1).all()
    att = rundir.load_attention(smoke_run, "full-s0")
    sums = att.groupby(["trajectory", "token", "layer", "head"])["mass"].sum()
    assert len(att) and sums.sub(1).abs().max() < 1e-5
    config = json.loads((smoke_run / "tools_none-s0" / "config.json").read_text())
    assert config["agent"]["tools"] == "none" and config["grpo"]["steps"] == 2
    trajs = rundir.load_trajectories(smoke_run, "full-s0")
    # 4 sampled held-out episodes + 1 single-image episode (MeasureConfig.n_single)
    assert len(trajs) == 5 and {"token_ids", "response_mask", "events", "flags"} <= set(trajs[0])
    singles = [t for t in trajs if len(t["images"]) == 1]
    assert len(singles) == 1 and singles[0]["sample_id"].startswith("pretrain-")
    measured = set(att["trajectory"])
    assert singles[0]["id"] in measured and len(measured) == 3
    assert (smoke_run / "full-s0" / "model" / "config.json").is_file()
    table = ablate.summary_table(smoke_run)
    assert "full-s0" in table and "test_acc" in table


def test_resume_skips_complete_arms(smoke_run, tiny_dir, capsys):
    before = rundir.load_metrics(smoke_run)
    ablate.main(_args(smoke_run, model=str(tiny_dir)))
    assert "skipping complete arms" in capsys.readouterr().out
    pd.testing.assert_frame_equal(before, rundir.load_metrics(smoke_run))


def test_failing_arm_is_marked_failed_not_complete(tmp_path, tiny_dir, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("stage exploded")

    monkeypatch.setattr("train.loop.train", boom)
    run = ablate.main(_args(tmp_path / "r", model=str(tiny_dir), arms=("full",)))
    status = json.loads((run / "full-s0" / "status.json").read_text())
    assert status["status"] == "failed" and "stage exploded" in status["error"]
    assert rundir.load_manifest(run)["status"] == "incomplete"


def test_interrupt_marks_run_incomplete(tmp_path, tiny_dir, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("train.loop.train", interrupt)
    with pytest.raises(SystemExit):
        ablate.main(_args(tmp_path / "r", model=str(tiny_dir), arms=("full",)))
    status = json.loads((tmp_path / "r" / "full-s0" / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "interrupted"
    assert rundir.load_manifest(tmp_path / "r")["status"] == "incomplete"


def test_bad_model_directories_fail_early_with_the_path(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nowhere"):
        ablate.main(_args(tmp_path / "a", model=str(tmp_path / "nowhere")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read model config in .*broken"):
        ablate.main(_args(tmp_path / "b", model=str(broken)))
    nocfg = tmp_path / "empty"
    nocfg.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        ablate.main(_args(tmp_path / "c", model=str(nocfg)))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(
        ValueError, match="cannot load the weights from model directory .*noweights"
    ):
        ablate.main(_args(tmp_path / "d", model=str(noweights)))


def test_grid_switches_change_the_configs():
    arms = {c.name.split("-")[0]: c for c in grid_arms("default", (0, 1))}
    assert arms["tools_none"].agent.tools == "none" and arms["full"].agent.tools == "both"
    assert not arms["masks_off"].grpo.mask_tokens and not arms["masks_off"].grpo.mask_trajectories
    assert arms["gain0"].grpo.tool_gain == 0.0 and arms["full"].grpo.tool_gain == 0.5
    assert len(grid_arms("default", (0, 1))) == 10 and arms["base"].grpo.steps == 0
    with pytest.raises(ValueError, match="unknown grid"):
        grid_arms("huge", (0,))


def test_evaluate_cli_writes_summary(tmp_path, tiny_dir):
    from experiments import evaluate

    out = tmp_path / "eval.json"
    res = evaluate.main(evaluate.EvaluateArgs(model=str(tiny_dir), out=out, n=5))
    saved = json.loads(out.read_text())
    assert saved["n"] == 5 and 0 <= saved["accuracy"] <= 1 and saved == json.loads(json.dumps(res))
    assert set(saved["per_family"]) == {"find", "count", "read", "compare", "odd"}
    assert {"tool_call_rate", "tool_calls", "answer_rate"} <= set(saved)
    with pytest.raises(ValueError, match="--split"):
        evaluate.main(evaluate.EvaluateArgs(model=str(tiny_dir), out=out, split="val"))


def test_cli_bad_input_exits_2_with_message(monkeypatch, capsys):
    from experiments.cli import run_cli

    monkeypatch.setattr("sys.argv", ["ablate", "--grid", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ablate.main, ablate.AblateArgs)
    assert exit_info.value.code == 2
    assert "error: unknown grid 'nope'" in capsys.readouterr().err


def test_model_random_builds_a_format_warmed_base(tmp_path):
    run = ablate.main(_args(tmp_path / "r", model="random", arms=("base",)))
    warm = json.loads((run / "base_model" / "relook_warmup.json").read_text())
    assert warm["steps"] == 10 and warm["loss_last"] < warm["loss_first"]
    assert rundir.load_manifest(run)["status"] == "complete"


def test_seed_table_pools_seeds_per_arm(smoke_run):
    evals = rundir.load_eval(smoke_run).set_index("arm")
    lines = ablate.seed_table(smoke_run).splitlines()
    assert "acc_mean" in lines[0] and "acc_min" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == set(ARM_SWITCHES)
    full = rows["full"]
    assert full[1] == "1" and float(full[2]) == pytest.approx(
        evals.loc["full-s0", "accuracy"], abs=5e-4
    )


def test_command_line_overrides_engine_fields():
    import tyro

    argv = ["--local_rank=1", "--engine", "deepspeed", "--zero-stage", "3", "--arms", "full"]
    args = tyro.cli(ablate.AblateArgs, args=[*argv, "--rollout-seeding", "group"])
    assert args.grpo_overrides() == {
        "engine": "deepspeed",
        "zero_stage": 3,
        "rollout_seeding": "group",
    }
    (cfg,) = grid_arms("smoke", (0,), args.arms, grpo=args.grpo_overrides())
    assert (cfg.grpo.engine, cfg.grpo.zero_stage, cfg.grpo.steps) == ("deepspeed", 3, 2)
    assert tyro.cli(ablate.AblateArgs, args=[]).grpo_overrides() == {}
    frozen = tyro.cli(ablate.AblateArgs, args=["--freeze-vision-tower", "True"]).grpo_overrides()
    (cfg,) = grid_arms("smoke", (0,), ("full",), grpo=frozen)
    assert frozen == {"freeze_vision_tower": True} and cfg.grpo.freeze_vision_tower


def test_reward_flag_sets_every_arms_reward():
    import tyro

    args = tyro.cli(ablate.AblateArgs, args=["--reward", "acc:1.0,format:0.2,tool:0.5"])
    assert args.grpo_overrides() == {"reward_form": "acc:1.0,format:0.2,tool:0.5"}
    cfgs = grid_arms("smoke", (0,), ("full", "gain0"), grpo=args.grpo_overrides())
    assert {c.grpo.reward_form for c in cfgs} == {"acc:1.0,format:0.2,tool:0.5"}


def test_torchrun_launch_trains_like_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m experiments.ablate --engine deepspeed``: rank 0 writes
    a complete run directory whose metrics equal a 1-process torch-engine run's (same rollouts:
    group seeding), within float rounding."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from tests.train.test_engine import assert_rows_close

    flags = ["--grid", "smoke", "--arms", "full", "--seeds", "0", "--rollout-seeding", "group"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", port, "-m", "experiments.ablate", *flags, "--engine", "deepspeed",
        "--out", str(tmp_path / "two"), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().count("run directory:") == 1  # rank 0 reports, alone
    two = tmp_path / "two"
    assert rundir.load_manifest(two)["status"] == "complete"
    one = ablate.main(
        _args(tmp_path / "one", arms=("full",), rollout_seeding="group", model="relook-tiny")
    )
    rows = {
        name: rundir.load_metrics(run).drop(columns="arm").to_dict("records")
        for name, run in (("one", one), ("two", two))
    }
    assert len(rows["two"]) == 2
    assert_rows_close(rows["two"], rows["one"])
    assert not (two / "full-s0" / "checkpoints").exists()


def _cli_error(monkeypatch, capsys, *argv: str) -> str:
    """Run ``python -m experiments.ablate ARGV`` in-process; assert exit 2, return stderr."""
    from experiments.cli import run_cli

    monkeypatch.setattr("sys.argv", ["ablate", "--grid", "smoke", "--no-progress", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ablate.main, ablate.AblateArgs)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--workers", "-3"], "--workers must be >= 1"),
        (["--seeds", "-1"], r"--seeds must be one or more integers >= 0, got \[-1\]"),
        (["--seeds", "0", "-2"], r"--seeds must be .* got \[0, -2\]"),
        (["--steps", "-1"], "GRPOConfig.steps must be >= 0"),
        (
            ["--reward", "acc:1,bogus:0.2"],
            "--reward 'acc:1,bogus:0.2': unknown reward term 'bogus'",
        ),
        (["--reward", "nosuchmod:f"], "--reward 'nosuchmod:f': .*cannot load 'f' from 'nosuchmod'"),
    ],
)
def test_bad_counts_exit_2_before_a_run_directory_exists(
    tmp_path, monkeypatch, capsys, flags, message
):
    out = tmp_path / "r"
    err = _cli_error(monkeypatch, capsys, "--out", str(out), *flags)
    assert re.search(f"^error: {message}", err) and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unusable_out_exits_2_naming_it_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """``--out`` a file, a path under a file, a folder that is not a run, a run of another
    grid, a read-only folder: each refused before any work with a message naming it."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    cases = {
        afile: "exists and is not a folder",
        afile / "run": "is a file, not a folder",
        other: "folder is not empty and has no manifest.json",
    }
    for out, message in cases.items():
        err = _cli_error(monkeypatch, capsys, "--out", str(out))
        assert f"error: {out}: " in err and message in err and "Traceback" not in err
    assert afile.read_text() == "keep" and os.listdir(other) == ["notes.txt"]
    rundir.create_run(tmp_path / "default-grid", "default", ["full-s0"], [0], {})
    err = _cli_error(monkeypatch, capsys, "--out", str(tmp_path / "default-grid"))
    assert "holds grid 'default', not 'smoke'" in err


def test_read_only_out_exits_2(tmp_path, monkeypatch, capsys):
    """Writability is probed by creating a temp file: root ignores permission bits, so as
    root the read-only folder is /sys (EACCES), else a chmod 0o555 folder."""
    import tempfile

    if os.geteuid() == 0:
        parent = Path("/sys")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        pass
    else:
        pytest.skip(f"{parent} is writable here")
    out = parent / "relook-run"
    err = _cli_error(monkeypatch, capsys, "--out", str(out))
    assert f"error: {out}: cannot write in {parent}" in err and "Traceback" not in err
    assert not out.exists()
