"""Update engines and data parallelism: the torch engine reproduces the pre-engine loop bit for
bit; DeepSpeed ZeRO-2/3 and 2-process runs reproduce a 1-process torch run within float
rounding; ZeRO checkpoints resume exactly.

Tolerances (fp32 on CPU), between runs whose updates sum in a different order:
``rollout/*`` and ``mask/*`` exact (the rollouts are the same samples); ``actor/*`` within
1e-5 relative or 1e-7 absolute; ``rollout/logprob_gap`` (itself float32 noise, ~3e-6 nats)
within 1e-6 absolute.

DeepSpeed on CPU JIT-compiles its shared-memory communication op the first time a process
group is made on a machine (~90 s once, then cached under ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from agent.modeling import RELOOK_TINY_DIR, load_policy
from tests.conftest import free_port
from train import dist
from train.checkpoint import checkpoints
from train.config import AgentConfig, ArmConfig, DataConfig, GRPOConfig
from train.engine import deepspeed_config
from train.loop import train

from .dist_worker import config as dist_config

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden_loop_rows.json")
needs_tiny = pytest.mark.skipif(
    not (RELOOK_TINY_DIR / "config.json").is_file(), reason="no models/relook-tiny"
)

# The configs whose rows the pre-engine loop recorded in golden_loop_rows.json.
GOLDEN_CONFIGS = {
    "a": ArmConfig(
        name="golden-a",
        agent=AgentConfig(tools="both", max_turns=2, max_new_tokens=24),
        grpo=GRPOConfig(
            steps=3, prompts_per_step=2, group_size=2, mini_batches=2, lr=1e-3,
            warmup_steps=1, checkpoint_every=0, seed=7, micro_batch=1,
        ),
        data=DataConfig(n_test=2),
    ),
    "b": ArmConfig(
        name="golden-b",
        agent=AgentConfig(tools="both", max_turns=2, max_new_tokens=24),
        grpo=GRPOConfig(
            steps=2, prompts_per_step=2, group_size=3, mini_batches=2, lr=1e-3,
            warmup_steps=2, checkpoint_every=0, seed=3, micro_batch=3, beta=0.1, tis_cap=2.0,
            loss_agg="seq-mean-token-mean", scale_rewards="batch", mask_tokens=False,
        ),
        data=DataConfig(n_test=2),
    ),
}  # fmt: skip


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("timing_s/")} for r in rows]


def assert_rows_close(got: list[dict], want: list[dict]) -> None:
    """The module docstring's tolerances, per step and key."""
    assert len(got) == len(want)
    for g, w in zip(_comparable(got), _comparable(want)):
        assert g.keys() == w.keys()
        for k in w:
            if k == "rollout/logprob_gap":
                ok = abs(g[k] - w[k]) <= 1e-6
            elif k.startswith("actor/"):
                ok = math.isclose(g[k], w[k], rel_tol=1e-5, abs_tol=1e-7)
            else:
                ok = g[k] == w[k]
            assert ok, f"step {w['step']} {k}: {g[k]!r} vs {w[k]!r}"


def _with(cfg: ArmConfig, **grpo) -> ArmConfig:
    return replace(cfg, grpo=replace(cfg.grpo, **grpo))


@pytest.mark.parametrize("name", ["a", "b"])
def test_torch_engine_rows_equal_the_pre_engine_loop(name, tiny_dir):
    """Bit-identical to the loop before train.engine existed (commit d4286c7): its rows on the
    seed-0 random tiny model (``build_tiny_model(seed=0)``, the ``tiny_dir`` fixture) were
    recorded in golden_loop_rows.json. Bit-identical rows are only expected under a version set
    listed in its ``verified_with`` (each one checked by running this comparison); the CPU setup
    pins torch and transformers to one of them, so CI always runs it. Another set skips, naming
    both, rather than failing on numerics an upstream release may legitimately change.

    One key is compared to 1e-7 instead of exactly: ``rollout/logprob_gap``, the mean difference
    between ``generate``'s rollout log-probs and the trainer's recomputed ones. On an AVX-512
    machine (2026-12-04) it moved by up to 3.5e-8 from the rows recorded on an AVX2 machine,
    while every loss, reward, mask, KL and gradient-norm value stayed bit-identical: the gap
    subtracts two float32 paths whose CPU kernels differ with the SIMD width."""
    golden = json.loads(GOLDEN.read_text())
    weights = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    versions = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "tiny-seed0": weights,
    }  # fmt: skip
    if versions not in golden["verified_with"]:
        pytest.skip(f"golden rows verified with {golden['verified_with']}, running {versions}")
    rows = _comparable(train(GOLDEN_CONFIGS[name], load_policy(tiny_dir), progress=False))
    want = golden["rows"][name]
    assert [r.keys() for r in rows] == [w.keys() for w in want]
    gap = "rollout/logprob_gap"
    for got, w in zip(rows, want):
        assert abs(got[gap] - w[gap]) <= 1e-7, f"step {w['step']} {gap}: {got[gap]!r} vs {w[gap]!r}"
    strip = [{k: v for k, v in r.items() if k != gap} for r in rows]
    assert strip == [{k: v for k, v in w.items() if k != gap} for w in want]


@pytest.fixture(scope="module")
def torch_rows():
    """Golden config "b" (KL to a reference, truncated IS, batch-scaled advantages) with the
    torch engine, 1 process."""
    return train(GOLDEN_CONFIGS["b"], load_policy(RELOOK_TINY_DIR), progress=False)


@needs_tiny
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_one_process_matches_torch(stage, torch_rows, world_of_one):
    cfg = _with(GOLDEN_CONFIGS["b"], engine="deepspeed", zero_stage=stage)
    policy = load_policy(RELOOK_TINY_DIR)
    rows = train(cfg, policy, progress=False)
    assert_rows_close(rows, torch_rows)
    assert rows[-1]["actor/updates"] == 2.0 and rows[0]["actor/grad_norm"] > 0
    # the caller's model holds the trained weights, usable without DeepSpeed afterwards
    reference = load_policy(RELOOK_TINY_DIR).model
    changed = [
        not torch.equal(p, q) for p, q in zip(policy.model.parameters(), reference.parameters())
    ]
    assert sum(changed) > len(changed) // 2


@needs_tiny
def test_gradient_checkpointing_changes_memory_not_the_update(torch_rows):
    policy = load_policy(RELOOK_TINY_DIR)
    rows = train(_with(GOLDEN_CONFIGS["b"], gradient_checkpointing=True), policy, progress=False)
    assert_rows_close(rows, torch_rows)
    assert not policy.model.is_activation_checkpointing  # switched off again after training


@needs_tiny
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_resume_round_trips(stage, tmp_path, world_of_one):
    """1 process: resuming from the step-2 checkpoint (ZeRO optimizer partition with its fp32
    master weights, schedule, RNG in the rank file; ZeRO-3's full weights saved from the
    gathered replica) gives the uninterrupted run's rows exactly."""
    cfg = _with(
        GOLDEN_CONFIGS["a"], engine="deepspeed", zero_stage=stage, checkpoint_every=2,
        rollout_seeding="group",
    )  # fmt: skip
    reference = train(_with(cfg, checkpoint_every=0), load_policy(RELOOK_TINY_DIR), progress=False)
    ckpt = tmp_path / "checkpoints"
    train(cfg, load_policy(RELOOK_TINY_DIR), progress=False, checkpoint_dir=ckpt)
    assert [p.name for p in checkpoints(ckpt)] == ["step-000002", "step-000003"]
    assert (ckpt / "step-000002" / "rank-00000.pt").is_file()
    shutil.rmtree(ckpt / "step-000003")  # as if killed during the last step
    seen: list[dict] = []
    resumed = train(cfg, load_policy(RELOOK_TINY_DIR), seen.append, False, None, ckpt)
    assert [r["step"] for r in seen] == [0, 1, 2]
    assert _comparable(resumed) == _comparable(reference)


def _torchrun(tmp_path: Path, overrides: dict, tag: str, checkpoint_dir: Path | None = None):
    out = tmp_path / f"{tag}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "tests.train.dist_worker", str(RELOOK_TINY_DIR), str(out), json.dumps(overrides),
    ]  # fmt: skip
    if checkpoint_dir is not None:
        cmd.append(str(checkpoint_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process_rows():
    """The 2-process tests' config, 1 process, torch engine."""
    return train(dist_config(), load_policy(RELOOK_TINY_DIR), progress=False)


@needs_tiny
@pytest.mark.parametrize(
    "overrides",
    [{}, {"engine": "deepspeed", "zero_stage": 2}, {"engine": "deepspeed", "zero_stage": 3}],
    ids=["torch", "zero2", "zero3"],
)
def test_two_processes_match_one(overrides, one_process_rows, tmp_path):
    """2 ranks x 1 prompt each = 1 rank x 2 prompts: identical weights on both ranks after
    every step; rows equal to the 1-process run (same rollouts: group-seeded sampling)."""
    got = _torchrun(tmp_path, overrides, "two")
    assert got["world_size"] == 2
    assert [len(set(ranks)) for ranks in got["sha256"]] == [1, 1]  # per step: ranks agree
    assert_rows_close(got["rows"], one_process_rows)
    assert all(r["actor/updates"] == 2.0 for r in got["rows"])


@needs_tiny
@pytest.mark.slow  # a 2-process ZeRO-3 launch and a 1-process run: ~40 s on 2 busy cores
def test_two_processes_match_one_on_policy(tmp_path):
    """One mini-batch (old log-probs from the update's own forward, ``train.loop._on_policy``)
    under ZeRO-3, 2 ranks of 3 trajectories in micro-batches of 2: rows equal the 1-process
    run."""
    overrides = {"mini_batches": 1, "engine": "deepspeed", "zero_stage": 3}
    got = _torchrun(tmp_path, overrides, "two")
    assert [len(set(ranks)) for ranks in got["sha256"]] == [1, 1]
    one = train(dist_config(mini_batches=1), load_policy(RELOOK_TINY_DIR), progress=False)
    assert_rows_close(got["rows"], one)
    assert all(r["actor/updates"] == 1.0 for r in got["rows"])
    assert [r["actor/ratio_mean"] for r in got["rows"]] == pytest.approx([1.0, 1.0])


@needs_tiny
@pytest.mark.slow  # a 2-process ZeRO-3 launch: ~40 s on 2 busy cores
def test_two_processes_evaluate_during_training(tmp_path, one_process_rows):
    """``eval_every`` under ZeRO-3 (the full model is a collective; rank 0 evaluates and
    broadcasts): ``eval/*`` keys in every row, the rest as without evaluation."""
    got = _torchrun(tmp_path, {"engine": "deepspeed", "zero_stage": 3, "eval_every": 1}, "ev")
    assert [len(set(ranks)) for ranks in got["sha256"]] == [1, 1]
    assert all(r["eval/n"] == 2.0 and 0 <= r["eval/acc"] <= 1 for r in got["rows"])
    kept = [{k: v for k, v in r.items() if not k.startswith("eval")} for r in got["rows"]]
    assert_rows_close([{k: v for k, v in r.items() if k != "timing_s/eval"} for r in kept],
                      one_process_rows)  # fmt: skip


@needs_tiny
@pytest.mark.slow  # two 2-process launches: 40-60 s on 2 busy cores
def test_two_process_zero2_resume_round_trips(tmp_path):
    """Each rank saves and restores its own ZeRO-2 partition and RNG (rank-0000{0,1}.pt)."""
    ckpt = tmp_path / "checkpoints"
    overrides = {"engine": "deepspeed", "zero_stage": 2, "checkpoint_every": 1}
    first = _torchrun(tmp_path, overrides, "first", ckpt)
    saved = ckpt / "step-000001"
    assert {p.name for p in saved.glob("rank-*.pt")} == {"rank-00000.pt", "rank-00001.pt"}
    shutil.rmtree(ckpt / "step-000002")
    resumed = _torchrun(tmp_path, overrides, "resumed", ckpt)
    assert len(resumed["sha256"]) == 1  # only step 1 was trained again
    assert _comparable(resumed["rows"]) == _comparable(first["rows"])
    assert resumed["sha256"][0] == first["sha256"][1]  # the same weights, bit for bit


def test_new_config_fields_are_validated():
    with pytest.raises(ValueError, match="GRPOConfig.engine"):
        GRPOConfig(engine="fsdp")
    with pytest.raises(ValueError, match="GRPOConfig.zero_stage"):
        GRPOConfig(zero_stage=1)
    with pytest.raises(ValueError, match="GRPOConfig.rollout_seeding"):
        GRPOConfig(rollout_seeding="rank")


def test_deepspeed_config_follows_the_grpo_config():
    g = GRPOConfig(prompts_per_step=4, group_size=8, mini_batches=2, micro_batch=4, zero_stage=3)
    ds = deepspeed_config(g, n_trajectories=32, world_size=2)
    # 32 trajectories / 2 mini-batches / 2 ranks = 8 per rank per optimizer step = 2 micro-batches
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == g.max_grad_norm and ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is torch.cuda.is_available()


def test_prompts_must_split_evenly_over_ranks(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    assert dist.shard(4) == range(2, 4)
    with pytest.raises(ValueError, match="prompts_per_step=3 must be divisible .* world size 2"):
        dist.shard(3)
