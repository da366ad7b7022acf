"""Training and evaluating from files: 2 GRPO steps from a JSONL file and from a DeepEyes
parquet, evaluation from a benchmark folder, resume continuing the same data order, and bad
input stopping the CLIs before any run directory exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.data.sources import DataStream
from agent.modeling import load_policy
from agent.rollout import AgentConfig
from tests.agent import benchmark_fixtures as fx
from tests.agent.test_sources import write_deepeyes, write_jsonl
from train.config import ArmConfig, DataConfig, GRPOConfig
from train.loop import eval_samples, train, train_stream

REPO = Path(__file__).resolve().parents[2]


def _cfg(train_data=(), eval_data=(), steps=2, every=0) -> ArmConfig:
    return ArmConfig(
        name="data",
        agent=AgentConfig(tools="both", max_turns=2, max_new_tokens=8),
        grpo=GRPOConfig(
            steps=steps, prompts_per_step=2, group_size=2, mini_batches=1, lr=1e-3,
            warmup_steps=1, checkpoint_every=every,
        ),
        data=DataConfig(n_test=2, train_data=tuple(train_data), eval_data=tuple(eval_data)),
    )  # fmt: skip


@pytest.fixture()
def drawn(monkeypatch):
    """Sample ids the loop draws, in order (``DataStream.sample`` recorded)."""
    ids: list[str] = []
    real = DataStream.sample

    def sample(self, index):
        s = real(self, index)
        ids.append(s.id)
        return s

    monkeypatch.setattr(DataStream, "sample", sample)
    return ids


@pytest.mark.parametrize("fmt", ["jsonl", "deepeyes"])
def test_two_steps_from_a_file(fmt, tiny_dir, tmp_path, drawn):
    path = write_jsonl(tmp_path) if fmt == "jsonl" else write_deepeyes(tmp_path)
    policy = load_policy(tiny_dir)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    rows = train(_cfg([str(path)]), policy, progress=False)
    assert [r["step"] for r in rows] == [0, 1]
    assert sorted(drawn) == sorted(f"q{i}" if fmt == "jsonl" else str(i) for i in range(4))
    changed = any(
        not p.detach().equal(before[n]) for n, p in policy.model.named_parameters()
    )  # fmt: skip
    assert changed or all(r["actor/updates"] == 0 for r in rows)


def test_resume_continues_the_same_data_order(tiny_dir, tmp_path, drawn):
    spec = f"{write_jsonl(tmp_path)}:2"
    cfg = _cfg([spec, "generator:1"], steps=4, every=1)
    train(cfg, load_policy(tiny_dir), progress=False)
    reference = list(drawn)
    drawn.clear()

    def stop(row):
        if row["step"] == 1:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, load_policy(tiny_dir), on_step=stop, progress=False, checkpoint_dir=ckpt)
    first = list(drawn)
    drawn.clear()
    rows = train(cfg, load_policy(tiny_dir), progress=False, checkpoint_dir=ckpt)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert first == reference[:4] and drawn == reference[4:]
    assert any(i.startswith("q") for i in reference) and any(
        i.startswith("train-") for i in reference
    )


def test_default_stream_is_the_generator():
    from agent.data.tasks import generate_one
    from train.loop import task_config

    data = DataConfig(train_seed=3)
    got = train_stream(data).sample(7)
    want = generate_one("train", 7, 3, task_config(data))
    assert got.id == want.id and got.images[0].tobytes() == want.images[0].tobytes()


def test_evaluate_from_a_benchmark_folder(tiny_dir, tmp_path):
    import torch

    from agent.evaluation import evaluate
    from agent.rollout import Agent
    from experiments.evaluate import EvaluateArgs, main
    from train.loop import make_generator

    root = fx.vstar(tmp_path / "vstar")
    samples = eval_samples(DataConfig(eval_data=(f"vstar:{root}", "generator"), n_test=2))
    policy = load_policy(tiny_dir)
    agent = Agent(policy.tokenizer, policy.image_processor, AgentConfig(max_new_tokens=8))
    torch.manual_seed(0)
    summary, _ = evaluate(agent, make_generator(policy), samples)
    assert summary["n"] == len(samples) >= 3
    out = tmp_path / "eval.json"
    result = main(
        EvaluateArgs(out=out, model=str(tiny_dir), eval_data=(f"vstar:{root}",), max_new_tokens=8)
    )
    spec = f"vstar:{root}"
    assert json.loads(out.read_text())["sources"][spec]["n"] == result["sources"][spec]["n"] > 0
    assert "overall" in result["sources"][spec]  # the benchmark's published scoring


def _bad(tmp_path: Path, problem: str) -> tuple[str, str]:
    """A bad source spec and the text its error must contain."""
    if problem == "missing file":
        return str(tmp_path / "gone.jsonl"), "gone.jsonl not found"
    if problem == "missing column":
        return str(write_jsonl(tmp_path, drop="question")), "['question']"
    path = write_jsonl(tmp_path)
    (tmp_path / "img" / "1.png").write_bytes(b"\x89PNG broken")
    return str(path), "row 1 field 'images'"


@pytest.mark.parametrize("problem", ["missing file", "missing column", "undecodable image"])
def test_bad_data_stops_ablate_before_the_run_directory(tmp_path, problem):
    from experiments.ablate import AblateArgs, main

    spec, match = _bad(tmp_path, problem)
    out = tmp_path / "run"
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        main(AblateArgs(grid="smoke", model="random", out=out, seeds=(0,), train_data=(spec,)))
    assert match in str(err.value)
    assert not out.exists() and not (tmp_path / "latest").exists()


def test_cli_exits_2_naming_the_bad_source(tmp_path):
    good = write_jsonl(tmp_path / "good")
    spec, match = _bad(tmp_path, "undecodable image")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "experiments.ablate", "--grid", "smoke", "--model", "random",
           "--out", str(out), "--seeds", "0", "--train-data", f"{good}:0.5",
           "--eval-data", spec]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr and "error:" in proc.stderr
    assert not out.exists()
    evaluate = [sys.executable, "-m", "experiments.evaluate", "--out", str(tmp_path / "e.json"),
                "--eval-data", spec]  # fmt: skip
    proc = subprocess.run(evaluate, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "e.json").exists()
