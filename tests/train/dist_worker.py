"""A GRPO training run for the engine tests, one process or many (``torchrun``).

``python -m tests.train.dist_worker <model> <out.json> <grpo overrides as JSON> [checkpoints]``
trains :func:`config` with the overrides; rank 0 writes the metric rows and, per step, the
sha256 of every rank's full weights (so a test can check that the ranks stay identical).
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from agent.modeling import load_policy
from train import dist
from train.config import AgentConfig, ArmConfig, DataConfig, EvalConfig, GRPOConfig


def config(eval_every: int = 0, **grpo) -> ArmConfig:
    """Small but non-trivial: 2 prompts x 3 samples, 2 mini-batches of 3 trajectories split
    unevenly over 2 ranks, micro-batches of 2, batch-scaled advantages, truncated IS, KL;
    ``eval_every``: held-out evaluation on 2 questions (``EvalConfig``)."""
    base = dict(
        steps=2, prompts_per_step=2, group_size=3, mini_batches=2, micro_batch=2, lr=1e-3,
        warmup_steps=1, checkpoint_every=0, seed=6, scale_rewards="batch", tis_cap=2.0,
        beta=0.05, rollout_seeding="group",
    )  # fmt: skip
    return ArmConfig(
        name="dist",
        agent=AgentConfig(tools="both", max_turns=2, max_new_tokens=16),
        grpo=GRPOConfig(**{**base, **grpo}),
        data=DataConfig(n_test=2),
        eval=EvalConfig(every=eval_every, n=2),
    )


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in ``named_parameters`` order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(model_dir: str, out: str, overrides: dict, checkpoint_dir: str | None = None) -> None:
    import train.loop as loop

    torch.set_num_threads(1)
    dist.init_from_env()
    sums: list[list[str]] = []
    real = loop._update

    def update_and_hash(engine, *args, **kwargs):
        stats = real(engine, *args, **kwargs)
        sums.append(dist.all_gather_objects(weights_sha256(engine.full_model())))
        return stats

    loop._update = update_and_hash
    rows = loop.train(
        config(**overrides), load_policy(model_dir), progress=False, checkpoint_dir=checkpoint_dir
    )
    if dist.is_main():
        with open(out, "w") as f:
            json.dump({"rows": rows, "sha256": sums, "world_size": dist.world_size()}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), *sys.argv[4:5])
