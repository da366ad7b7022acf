"""The GRPO loop for the reflect/confirm agent (METHOD.md 3-5), CPU-first, torch optimizer.

Reads top to bottom like CleanRL's ``ppo.py``: ``# Rollout``, ``# Advantages``, ``# Old
log-probs``, ``# Policy update``, ``# Metrics``. I/O stays with the caller (``on_step``).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import trange

from agent.data.tasks import TaskConfig, generate_one
from agent.modeling import Policy
from agent.rollout import Agent, Generator, HFGenerator, rollout
from train.batching import batch_inputs, batched_token_log_probs, loss_weights, pad_right
from train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from train.config import ArmConfig, DataConfig
from train.core_algos import (
    agg_loss,
    clipped_policy_loss,
    group_advantages,
    kl_k3,
    truncated_is_weights,
)
from train.metrics import rollout_metrics


def task_config(data: DataConfig) -> TaskConfig:
    """The generator's :class:`TaskConfig` for a :class:`DataConfig`."""
    kwargs = dict(n_images=data.n_images, image_size=data.image_size, difficulty=data.difficulty)
    if data.families:
        kwargs["families"] = data.families
    return TaskConfig(**kwargs)


def make_generator(policy: Policy) -> HFGenerator:
    """The transformers ``generate`` rollout backend for ``policy``."""
    tok = policy.tokenizer
    return HFGenerator(
        policy.model,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        suppress_ids=policy.vision_token_ids,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
    )


def train(
    cfg: ArmConfig,
    policy: Policy,
    on_step: Callable[[dict], None] | None = None,
    progress: bool = True,
    generator: Generator | None = None,
    checkpoint_dir: str | Path | None = None,
) -> list[dict]:
    """Train ``policy`` in place with GRPO for ``cfg.grpo.steps`` steps.

    With ``checkpoint_dir``, a checkpoint is written every ``cfg.grpo.checkpoint_every`` steps
    (and after the last), and training resumes from the newest valid checkpoint found there
    (a run killed at any point, SIGKILL included, continues with the same per-step metrics as
    an uninterrupted run: weights, optimizer, scheduler, torch and shuffle RNG states and the
    data cursor are restored). A checkpoint written by a different config is ignored with a
    warning.

    Args:
        cfg: the arm's config (agent tools switch, GRPO + mask switches + tool gain, data).
        policy: the loaded (base) policy; its model's parameters are updated in place.
        on_step: called with each step's metrics row (``step`` + ``namespace/name`` floats),
            e.g. to append it to the run directory at once; on resume it is first called
            with every restored row, in order.
        progress: show a tqdm bar.
        generator: the rollout backend (default: transformers ``generate`` on ``policy.model``).
        checkpoint_dir: where checkpoints live (None: no checkpoints, no resume).

    Returns:
        The list of metric rows (restored ones included).
    """
    g = cfg.grpo
    torch.manual_seed(g.seed)
    model = policy.model
    agent = Agent(policy.tokenizer, policy.image_processor, cfg.agent)
    generator = generator or make_generator(policy)
    image_token_id = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=g.lr, weight_decay=g.weight_decay)
    updates = max(1, g.steps * g.mini_batches)
    warm = max(1, g.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: min(1.0, (u + 1) / warm) * (1.0 - 0.9 * u / updates)
    )
    ref_model = copy.deepcopy(model).eval() if g.beta > 0 else None
    tasks = task_config(cfg.data)
    shuffle = torch.Generator().manual_seed(g.seed)
    rows: list[dict] = []
    start = _resume(cfg, model, optimizer, scheduler, shuffle, checkpoint_dir, rows)
    if on_step is not None:
        for row in rows:
            on_step(row)
    for step in trange(
        start, g.steps, desc=f"train {cfg.name}", disable=not progress, leave=False,
        initial=start, total=g.steps,
    ):  # fmt: skip
        t0 = time.perf_counter()
        # Rollout
        samples = [
            generate_one("train", step * g.prompts_per_step + i, cfg.data.train_seed, tasks)
            for i in range(g.prompts_per_step)
        ]
        model.eval()
        trajs = rollout(agent, generator, samples, g.group_size, g.tool_gain, g.reward_form)
        t_gen = time.perf_counter()
        # Advantages (every trajectory of a group shapes its baseline, masked ones included)
        rewards = torch.tensor([t.reward for t in trajs])
        advantages = group_advantages(
            rewards, torch.tensor([t.group for t in trajs]), g.scale_rewards
        )
        weights = [loss_weights(t, g.mask_tokens, g.mask_trajectories) for t in trajs]
        pad_id = policy.tokenizer.pad_token_id
        # Old log-probs: the trainer's, so the first mini-batch has ratio exactly 1
        with torch.no_grad():
            old_lp = _log_probs(model, trajs, image_token_id, pad_id, g.micro_batch)
            ref_lp = (
                _log_probs(ref_model, trajs, image_token_id, pad_id, g.micro_batch)
                if ref_model is not None
                else None
            )
        gap = _logprob_gap(trajs, old_lp)
        t_old = time.perf_counter()
        # Policy update
        batch = _Batch(trajs, weights, advantages, old_lp, ref_lp, image_token_id, pad_id)
        stats = _update(model, optimizer, scheduler, params, g, batch, shuffle)
        t_upd = time.perf_counter()
        # Metrics
        row = {"step": step, **rollout_metrics(trajs, weights), **stats}
        row.update(
            {
                "rollout/advantage_abs_mean": float(advantages.abs().mean()),
                "rollout/logprob_gap": gap,
                "actor/lr": scheduler.get_last_lr()[0],
                "timing_s/gen": t_gen - t0,
                "timing_s/old_logp": t_old - t_gen,
                "timing_s/update": t_upd - t_old,
                "timing_s/step": t_upd - t0,
            }
        )
        rows.append(row)
        done = step + 1
        if (
            checkpoint_dir is not None
            and g.checkpoint_every
            and (done % g.checkpoint_every == 0 or done == g.steps)
        ):
            state = {
                "config": asdict(cfg),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "shuffle_rng": shuffle.get_state(),
                "rows": rows,
            }
            save_checkpoint(checkpoint_dir, done, model, state)
        if on_step is not None:
            on_step(row)
    model.eval()
    return rows


def _resume(cfg, model, optimizer, scheduler, shuffle, checkpoint_dir, rows: list) -> int:
    """Restore the newest valid checkpoint of ``cfg``'s run into the trainer state; returns the
    step to start at (0: nothing to resume). Restored metric rows are appended to ``rows``."""
    if checkpoint_dir is None:
        return 0
    found = latest_checkpoint(checkpoint_dir)
    if found is None:
        return 0
    state = torch.load(Path(found) / "trainer_state.pt", weights_only=False)
    if state.get("config") != asdict(cfg):
        warnings.warn(
            f"ignoring checkpoint {found}: it was written by a different config", stacklevel=3
        )
        return 0
    state = load_checkpoint(found, model)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    shuffle.set_state(state["shuffle_rng"])
    rows.extend(state["rows"])
    return int(state["step"])


def _logprob_gap(trajs, old_lp) -> float:
    """Mean |rollout - trainer| log-prob (nats) over sampled tokens."""
    diffs = []
    for t, lp in zip(trajs, old_lp):
        m = torch.tensor(t.response_mask, dtype=torch.bool)
        diffs.append((torch.tensor(t.rollout_log_probs)[m] - lp[m]).abs())
    d = torch.cat(diffs)
    return float(d.mean()) if d.numel() else 0.0


def _log_probs(model, trajs, image_token_id: int, pad_id: int, micro_batch: int) -> list:
    """Per-trajectory ``[pos]`` token log-probs (nats), ``micro_batch`` sequences per forward."""
    out = []
    for i in range(0, len(trajs), micro_batch):
        sub = trajs[i : i + micro_batch]
        lp = batched_token_log_probs(model, batch_inputs(sub, image_token_id, pad_id))
        out += [lp[j, : len(t.token_ids)] for j, t in enumerate(sub)]
    return out


@dataclass
class _Batch:
    """One step's rollout batch, per trajectory: ``[pos]`` weights and log-probs."""

    trajs: list
    weights: list[torch.Tensor]
    advantages: torch.Tensor
    old_lp: list[torch.Tensor]
    ref_lp: list[torch.Tensor] | None
    image_token_id: int
    pad_id: int


def _accumulate(model, g, batch: _Batch, chunk: list[int], logs: dict) -> None:
    """Backward of one mini-batch's loss (``chunk``: trajectory indices), ``g.micro_batch``
    trajectories per forward; appends each micro-batch's contribution to ``logs``."""
    weights, trajs = batch.weights, batch.trajs
    n_tokens = float(sum(weights[i].sum() for i in chunk))
    n_seqs = sum(float(weights[i].sum()) > 0 for i in chunk)
    for k in range(0, len(chunk), g.micro_batch):
        idx = chunk[k : k + g.micro_batch]
        sub = [trajs[i] for i in idx]
        width = max(len(t.token_ids) for t in sub)
        lp = batched_token_log_probs(model, batch_inputs(sub, batch.image_token_id, batch.pad_id))
        w = pad_right([weights[i] for i in idx], width)
        old = pad_right([batch.old_lp[i] for i in idx], width)
        isw = None
        if g.tis_cap > 0:
            rollout_lp = pad_right([torch.tensor(trajs[i].rollout_log_probs) for i in idx], width)
            isw = truncated_is_weights(old, rollout_lp, g.tis_cap)
        loss, st = clipped_policy_loss(
            lp,
            old,
            batch.advantages[idx],
            w,
            g.clip_eps_low,
            g.clip_eps_high,
            g.loss_agg,
            n_tokens,
            isw,
        )
        if g.loss_agg == "seq-mean-token-mean":  # from a mean over this micro-batch's sequences
            loss = loss * sum(float(weights[i].sum()) > 0 for i in idx) / n_seqs
        kl = None
        if batch.ref_lp is not None:
            ref = pad_right([batch.ref_lp[i] for i in idx], width)
            kl = agg_loss(kl_k3(lp, ref), w, "token-mean", n_tokens)
        (loss + g.beta * kl if kl is not None else loss).backward()
        share = float(w.sum()) / n_tokens
        logs["pg_loss"].append(float(loss.detach()))
        logs["clipfrac"].append(float(st["clipfrac"]) * share)
        logs["approx_kl"].append(float(st["approx_kl"]) * share)
        logs["ratio_mean"].append(float(st["ratio_mean"]) * share)
        logs["kl"].append(float(kl.detach()) if kl is not None else 0.0)


def _update(model, optimizer, scheduler, params, g, batch: _Batch, shuffle) -> dict:
    """``g.mini_batches`` optimizer steps over a shuffled split of the batch; returns ``actor/*``."""
    model.train()
    order = torch.randperm(len(batch.trajs), generator=shuffle).tolist()
    chunks = [c.tolist() for c in torch.tensor(order).chunk(g.mini_batches)]
    logs: dict[str, list[float]] = {
        k: [] for k in ("pg_loss", "clipfrac", "approx_kl", "kl", "grad_norm", "ratio_mean")
    }
    for chunk in chunks:
        if float(sum(batch.weights[i].sum() for i in chunk)) == 0:
            continue  # everything masked: no gradient this mini-batch
        optimizer.zero_grad(set_to_none=True)
        _accumulate(model, g, batch, chunk, logs)
        logs["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, g.max_grad_norm)))
        optimizer.step()
        scheduler.step()
    n_updates = max(1, len(logs["grad_norm"]))
    out = {f"actor/{k}": float(np.sum(v)) / n_updates for k, v in logs.items() if k != "grad_norm"}
    out["actor/grad_norm"] = float(np.mean(logs["grad_norm"])) if logs["grad_norm"] else 0.0
    out["actor/updates"] = float(len(logs["grad_norm"]))
    return out
