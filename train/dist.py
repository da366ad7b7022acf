"""Data-parallel plumbing of the GRPO trainer: the process group and the few collectives the
loop needs (sums, gathers of small Python objects, barriers).

Every function degrades to a no-op in a single process (no process group, or world size 1),
so the single-process loop runs exactly the code it always ran.

The process group is initialised from the environment a launcher sets (``torchrun``, the
``deepspeed`` launcher, or by hand): ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``. Backend: ``nccl`` when CUDA is available, else ``gloo`` (CPU).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(hours=2)
"""Collective timeout: long, because ranks > 0 wait at a barrier while rank 0 evaluates and
measures an arm (``experiments.ablate``)."""


def init_from_env(timeout: timedelta = TIMEOUT) -> bool:
    """Initialise the default process group when the environment names a world of > 1 processes.

    Returns:
        True if a process group is (now) initialised with world size > 1.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the only process that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks, in float64 (identity in one process)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled; small objects only)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(n: int, what: str = "prompts_per_step") -> range:
    """This rank's contiguous share of ``n`` items split evenly over the ranks.

    Raises:
        ValueError: ``n`` is not divisible by the world size (the message names ``what``).
    """
    w, r = world_size(), rank()
    if n % w:
        raise ValueError(
            f"{what}={n} must be divisible by the data-parallel world size {w}: each rank rolls "
            f"out an equal share of the step's prompts"
        )
    return range(r * n // w, (r + 1) * n // w)


__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "init_from_env",
    "is_main",
    "rank",
    "shard",
    "world_size",
]
