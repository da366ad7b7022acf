"""Update engines behind the GRPO loop: plain torch (AdamW) or DeepSpeed ZeRO-2/3.

The loop talks to one small interface (:class:`Engine`); per optimizer step it calls::

    engine.zero_grad()
    for k, micro_batch in enumerate(micro_batches):
        loss = ...                                   # forward through ``engine(**inputs)``
        engine.backward(loss, boundary=k == len(micro_batches) - 1)
    engine.step()                                    # clip + optimizer + lr schedule
    engine.grad_norm                                 # L2 norm before clipping

Both engines implement the same update: AdamW (``lr``, ``weight_decay``), the learning-rate
schedule of :func:`lr_lambda` stepped once per optimizer step, and an L2 gradient-norm clip at
``max_grad_norm``. Under data parallelism (world size > 1) both *average* the gradients over the
ranks; the loop scales each rank's loss by the world size so that the average equals the
gradient of the global loss (token-mean over the global token count).

- :class:`TorchEngine`: the single-process update of relook's first loop, unchanged
  (``torch.optim.AdamW`` + ``LambdaLR`` + ``clip_grad_norm_``). Under data parallelism it
  all-reduces (averages) the accumulated gradients in :meth:`TorchEngine.step`, once per
  optimizer step, rather than through ``DistributedDataParallel``: DDP reduces inside every
  backward and so needs every rank to run the same number of backward passes; an explicit
  all-reduce lets a rank whose share of a mini-batch is smaller (or empty) skip them.
- :class:`DeepSpeedEngine`: ``deepspeed.initialize`` with the client ``torch.optim.AdamW``
  (docs/gotchas.md: DeepSpeed's own Adam JIT-compiles for minutes on CPU), the same schedule as a
  client callable, and a config from :func:`deepspeed_config` (ZeRO stage 2 or 3, gradient
  clipping, bf16 only when CUDA is available, fp32 on CPU). ZeRO-2/3 reduce gradients inside
  every backward, so every rank must call :meth:`DeepSpeedEngine.backward` equally often per
  optimizer step (``lockstep``: the loop pads a rank's share with zero-weight micro-batches).
  The accumulation boundary is set by the caller (``boundary``, DeepSpeed's
  ``set_gradient_accumulation_boundary``), so DeepSpeed's boundary is exactly one relook
  optimizer step however many micro-batches it took.

Weights for rollouts, old log-probs and checkpoints come from :meth:`Engine.full_model`: the
trained module itself, except under ZeRO-3, where parameters are partitioned across ranks and
a forward would need every rank (a deadlock when ranks generate different numbers of tokens).
There the caller's model is kept as a plain full-weight replica and the engine trains a copy;
:meth:`DeepSpeedEngine.full_model` refreshes the replica from the gathered partitions
(``deepspeed.zero.GatheredParameters``, one parameter at a time) after each optimizer step.
That costs one full copy of the weights per rank, the memory a vLLM rollout engine needs anyway.
"""

from __future__ import annotations

import copy
import math
import os
import socket
from typing import Any, Protocol

import torch

from train import dist
from train.config import ENGINES, GRPOConfig


def lr_lambda(updates: int, warmup: int):
    """Multiplier of the base learning rate at optimizer update ``u``:
    ``min(1, (u + 1) / warmup) * (1 - 0.9 * u / updates)`` (linear warm-up, then linear decay
    to 10% at the last of ``updates``)."""
    warm = max(1, warmup)
    updates = max(1, updates)
    return lambda u: min(1.0, (u + 1) / warm) * (1.0 - 0.9 * u / updates)


class Engine(Protocol):
    """What the GRPO loop needs from an update engine (see the module docstring).

    Attributes:
        module: the module being trained (its parameters receive gradients).
        lockstep: every rank must call :meth:`backward` equally often per optimizer step.
        sharded_state: :meth:`state_dict` differs per rank (ZeRO partitions), so checkpoints
            store one file per rank.
        grad_norm: L2 norm of the (rank-averaged) gradient before clipping, at the last step.
    """

    module: torch.nn.Module
    lockstep: bool
    sharded_state: bool
    grad_norm: float

    def __call__(self, *args, **kwargs) -> Any:
        """A training forward of :attr:`module` (through DeepSpeed's engine where there is one)."""

    @property
    def device(self) -> torch.device:
        """Where the trained parameters live (inputs are moved there)."""

    @property
    def lr(self) -> float:
        """The learning rate of the last optimizer step (of the next one before any)."""

    def full_model(self) -> torch.nn.Module:
        """A plain module with the current full weights: rollouts, old log-probs, checkpoints.
        A collective under ZeRO-3 (every rank calls it at the same point)."""

    def zero_grad(self) -> None:
        """Clear gradients before a mini-batch."""

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """Accumulate ``loss``'s gradient; ``boundary``: the mini-batch's last micro-batch
        (DeepSpeed reduces and partitions the accumulated gradient there)."""

    def step(self) -> None:
        """Average over ranks, clip at ``max_grad_norm``, AdamW step, schedule step; sets
        :attr:`grad_norm`."""

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and schedule state (this rank's partition when :attr:`sharded_state`)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the same rank of a run of the same world size)."""

    def close(self) -> None:
        """Undo what the engine did to the caller's model (hooks, activation checkpointing)."""


def _updates(g: GRPOConfig) -> int:
    return max(1, g.steps * g.mini_batches)


class TorchEngine:
    """``torch.optim.AdamW`` + ``LambdaLR`` (:func:`lr_lambda`) + ``clip_grad_norm_``; gradients
    averaged over ranks by an explicit all-reduce in :meth:`step` (world size > 1 only).

    Args:
        g: the GRPO config (``lr``, ``weight_decay``, ``warmup_steps``, ``max_grad_norm``,
            ``steps * mini_batches`` optimizer updates for the schedule).
        model: the model to train in place.
    """

    lockstep = False
    sharded_state = False

    def __init__(self, g: GRPOConfig, model: torch.nn.Module):
        self.module = model
        self.max_grad_norm = g.max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=g.lr, weight_decay=g.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(_updates(g), g.warmup_steps)
        )
        self.grad_norm = 0.0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_model(self) -> torch.nn.Module:
        return self.module

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        loss.backward()

    def step(self) -> None:
        if dist.world_size() > 1:
            self._average_gradients()
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()

    def _average_gradients(self) -> None:
        """Mean of every parameter's gradient over ranks (a missing gradient counts as 0)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= dist.world_size()
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def close(self) -> None:
        _disable_checkpointing(self.module)


def deepspeed_config(g: GRPOConfig, n_trajectories: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a GRPO config.

    ``train_micro_batch_size_per_gpu`` is ``g.micro_batch`` (trajectories per forward) and
    ``gradient_accumulation_steps`` the nominal number of micro-batches one rank runs per
    optimizer step (``ceil(ceil(n / mini_batches) / world_size / micro_batch)``); the actual
    boundary is set by the caller on the last micro-batch of each mini-batch, so the counts
    only feed DeepSpeed's sample counters. ``overlap_comm`` (reduce while the backward runs)
    only on CUDA: on CPU (gloo) there is no second stream to overlap with.

    Args:
        g: the GRPO config (``zero_stage``, ``max_grad_norm``, ``micro_batch``, ...).
        n_trajectories: trajectories per step over all ranks (``prompts_per_step * group_size``).
        world_size: data-parallel processes.
    """
    per_rank = math.ceil(math.ceil(n_trajectories / g.mini_batches) / world_size)
    gas = max(1, math.ceil(per_rank / g.micro_batch))
    cuda = torch.cuda.is_available()
    return {
        "train_micro_batch_size_per_gpu": g.micro_batch,
        "gradient_accumulation_steps": gas,
        "train_batch_size": g.micro_batch * gas * world_size,
        "gradient_clipping": g.max_grad_norm,
        "zero_optimization": {"stage": g.zero_stage, "overlap_comm": cuda},
        "bf16": {"enabled": cuda},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _world_of_one_env() -> None:
    """Without a launcher, give DeepSpeed the environment of a 1-process world (it always
    builds a process group; without these variables it would go looking for MPI)."""
    if torch.distributed.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):  # fmt: skip
        os.environ.setdefault(key, value)


class DeepSpeedEngine:
    """A DeepSpeed ZeRO-2/3 engine with relook's optimizer, schedule and clip.

    Args:
        g: the GRPO config (``zero_stage`` 2 or 3).
        model: the caller's model. ZeRO-2 trains it in place; ZeRO-3 trains a deep copy and
            keeps ``model`` as the full-weight replica returned by :meth:`full_model`.
        n_trajectories: trajectories per step over all ranks (for the nominal batch sizes).

    Raises:
        ImportError: DeepSpeed is not installed (``pip install relook[train]``).
    """

    lockstep = True
    sharded_state = True

    def __init__(self, g: GRPOConfig, model: torch.nn.Module, n_trajectories: int):
        import deepspeed

        _world_of_one_env()
        self._deepspeed = deepspeed
        self.zero_stage = g.zero_stage
        self._replica = model if g.zero_stage == 3 else None
        trained = copy.deepcopy(model) if g.zero_stage == 3 else model
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=g.lr, weight_decay=g.weight_decay)
        schedule = lr_lambda(_updates(g), g.warmup_steps)
        self.config = deepspeed_config(g, n_trajectories, dist.world_size())
        self._engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=trained,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.config,
        )
        self.module = self._engine.module
        self._stale = False
        self.grad_norm = 0.0

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self._engine.device

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_model(self) -> torch.nn.Module:
        """The full-weight model (ZeRO-3: the replica, refreshed after an update; a collective:
        every rank must call it at the same point)."""
        if self._replica is None:
            return self.module
        if self._stale:
            gathered = self._deepspeed.zero.GatheredParameters
            with torch.no_grad():
                for p, q in zip(self.module.parameters(), self._replica.parameters()):
                    with gathered([p], modifier_rank=None):
                        q.copy_(p.detach().to(q.dtype))
            self._stale = False
        return self._replica

    def zero_grad(self) -> None:
        self._engine.zero_grad()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # relook's losses are already normalised by the global token count: no 1/gas scaling
        self._engine.set_gradient_accumulation_boundary(boundary)
        self._engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self._engine.set_gradient_accumulation_boundary(True)
        self._engine.step()
        norm = self._engine.get_global_grad_norm()
        self.grad_norm = float(norm) if norm is not None else float("nan")
        self._stale = True

    def state_dict(self) -> dict[str, Any]:
        """This rank's ZeRO optimizer partition (fp32 master weights, AdamW moments) and the
        schedule."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "zero_stage": self.zero_stage,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's partition (saved by the same rank of a run of the same world
        size); the fp32 master weights come from the saved partition."""
        if state.get("zero_stage") != self.zero_stage:
            raise ValueError(
                f"engine state of ZeRO stage {state.get('zero_stage')} cannot be loaded into "
                f"stage {self.zero_stage}"
            )
        shards = [None] * dist.world_size()
        shards[dist.rank()] = state["optimizer"]
        self.optimizer.load_state_dict(
            shards, load_optimizer_states=True, load_from_fp32_weights=True
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self._stale = self._replica is not None

    def close(self) -> None:
        """Remove DeepSpeed's hooks from the module (the caller's model stays usable)."""
        _disable_checkpointing(self.module)
        self._engine.destroy()


def _enable_checkpointing(module: torch.nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (works with ZeRO-3's parameter
    hooks and with inputs that need no grad); the method's name since transformers 5.x, or the
    older ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _disable_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "activation_checkpointing_disable"):
        if module.is_activation_checkpointing:
            module.activation_checkpointing_disable()
    elif getattr(module, "is_gradient_checkpointing", False):
        module.gradient_checkpointing_disable()


def make_engine(g: GRPOConfig, model: torch.nn.Module, n_trajectories: int) -> Engine:
    """The engine named by ``g.engine``, with gradient checkpointing when asked for.

    Args:
        g: the GRPO config.
        model: the policy's model (trained in place; see :class:`DeepSpeedEngine` for ZeRO-3).
        n_trajectories: trajectories per step over all ranks.
    """
    if g.engine == "torch":
        engine: Engine = TorchEngine(g, model)
    else:
        engine = DeepSpeedEngine(g, model, n_trajectories)
    if g.gradient_checkpointing:
        _enable_checkpointing(engine.module)
    return engine


__all__ = [
    "ENGINES",
    "DeepSpeedEngine",
    "Engine",
    "TorchEngine",
    "deepspeed_config",
    "lr_lambda",
    "make_engine",
]
