"""The GRPO loop for the reflect/confirm agent (docs/method.md §3-5), CPU-first, data-parallel.

Reads top to bottom like CleanRL's ``ppo.py``: ``# Rollout``, ``# Advantages``, ``# Old
log-probs``, ``# Policy update``, ``# Metrics``, ``# Evaluation`` (held-out, every
``cfg.eval.every`` steps; :mod:`train.evaluation`). I/O stays with the caller (``on_step``).
The update goes through an engine (:mod:`train.engine`: torch AdamW or DeepSpeed ZeRO-2/3).

Data parallelism (a process group of world size W > 1, see :mod:`train.dist` and
``experiments.ablate``'s launch commands): the step's ``prompts_per_step`` groups are split
into W contiguous, equal shards (``prompts_per_step`` must be divisible by W); each rank rolls
out and trains on its shard only. The quantities that couple trajectories are global: group
advantages (``scale_rewards="batch"`` uses every rank's rewards), the mini-batch split (one
shuffle of the global batch, identical on every rank), and the loss normalisers (token and
sequence counts of the whole mini-batch, so that W ranks x 1/W of the batch give the gradient
of 1 rank x the whole batch; each rank's loss is multiplied by W because the engines average
gradients over ranks). Metric rows are reduced over all trajectories, so a row equals that of
one process on the same global batch (up to float summation order). Only rank 0 calls
``on_step`` and writes checkpoint files other than its own rank file. With
``rollout_seeding="group"`` the rollouts themselves do not depend on W.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import trange

from agent.data.sources import DataStream, GeneratorSource, SourceRows, eval_rows, open_stream
from agent.data.tasks import Sample, TaskConfig, generate, generate_one
from agent.modeling import Policy, is_vision_parameter
from agent.rollout import Agent, Generator, HFGenerator, rollout
from train import dist
from train.batching import (
    batch_inputs,
    batched_token_log_probs,
    flag_bad_image_tokens,
    loss_weights,
    pad_right,
)
from train.checkpoint import (
    STATE,
    latest_checkpoint,
    load_checkpoint,
    load_rank_state,
    save_checkpoint,
)
from train.config import ArmConfig, DataConfig, GRPOConfig
from train.core_algos import (
    agg_loss,
    clipped_policy_loss,
    group_advantages,
    kl_k3,
    truncated_is_weights,
)
from train.engine import Engine, make_engine
from train.evaluation import StepEvaluator
from train.metrics import rollout_metrics
from train.rewards import score
from train.vllm_backend import VLLMGenerator, make_vllm_generator


def task_config(data: DataConfig) -> TaskConfig:
    """The generator's :class:`TaskConfig` for a :class:`DataConfig`."""
    kwargs = dict(n_images=data.n_images, image_size=data.image_size, difficulty=data.difficulty)
    if data.families:
        kwargs["families"] = data.families
    return TaskConfig(**kwargs)


def train_stream(data: DataConfig) -> DataStream:
    """The training samples of ``data``: its ``train_data`` sources mixed and shuffled with
    ``train_seed`` (:class:`agent.data.sources.DataStream`), the generator by default.

    Global index k (sample i of step s: ``k = s * prompts_per_step + i``) is a pure function
    of the config, so a resumed run draws what an uninterrupted one does. The default stream is
    ``generate_one("train", k, train_seed, task_config(data))``, as before sources existed.
    """
    tasks, seed = task_config(data), data.train_seed
    generator = GeneratorSource(lambda k: generate_one("train", k, seed, tasks))
    return open_stream(data.train_data, seed, generator)


def eval_samples(data: DataConfig) -> list[Sample] | SourceRows:
    """The held-out samples of ``data``: every row of each ``eval_data`` source in order
    (images decoded when read), or ``n_test`` generated test questions (the default and what
    ``generator`` stands for)."""
    tasks = task_config(data)
    if not data.eval_data:
        return generate("test", data.n_test, data.test_seed, tasks)
    generator = GeneratorSource(
        lambda k: generate_one("test", k, data.test_seed, tasks), size=data.n_test
    )
    return eval_rows(data.eval_data, generator)


def make_generator(policy: Policy, cfg: ArmConfig | None = None) -> Generator:
    """The rollout backend for ``policy``: transformers ``generate`` on ``policy.model``, or a
    colocated vLLM engine when ``cfg.grpo.rollout_backend == "vllm"`` (:mod:`train.vllm_backend`;
    GPU and ``pip install vllm`` only)."""
    if cfg is not None and cfg.grpo.rollout_backend == "vllm":
        return make_vllm_generator(policy, cfg)
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
    warning; one written by a different number of processes cannot be resumed (ValueError).

    Under a process group of world size > 1 (module docstring) every rank calls ``train``
    with the same arguments; each trains on its shard of every step and all return the same
    rows.

    Args:
        cfg: the arm's config (agent tools switch, GRPO + mask switches + tool gain, engine,
            data).
        policy: the loaded (base) policy; its model's parameters are updated in place.
        on_step: called (on rank 0 only) with each step's metrics row (``step`` +
            ``namespace/name`` floats), e.g. to append it to the run directory at once; on
            resume it is first called with every restored row, in order.
        progress: show a tqdm bar (rank 0).
        generator: the rollout backend (default: :func:`make_generator` of ``cfg``). A
            :class:`~train.vllm_backend.VLLMGenerator` is put to sleep after each rollout and
            gets the trained weights after each update (and once before the first rollout).
        checkpoint_dir: where checkpoints live (None: no checkpoints, no resume); shared by
            all ranks.

    Returns:
        The list of metric rows (restored ones included).

    Raises:
        ValueError: ``prompts_per_step`` is not divisible by the world size.
    """
    g = cfg.grpo
    dist.init_from_env()
    rank = dist.rank()
    groups = dist.shard(g.prompts_per_step)  # this rank's prompt groups (all of them in 1 process)
    model = policy.model
    ref_model = copy.deepcopy(model).eval() if g.beta > 0 else None
    if g.freeze_vision_tower:
        for name, p in model.named_parameters():
            if is_vision_parameter(name):
                p.requires_grad_(False)
    engine = make_engine(g, model, g.prompts_per_step * g.group_size)
    agent = Agent(policy.tokenizer, policy.image_processor, cfg.agent)
    generator = generator or make_generator(policy, cfg)
    image_token_id = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pad_id = policy.tokenizer.pad_token_id
    data = train_stream(cfg.data)
    evaluator = None
    if cfg.eval.every:  # generated questions: eval.n of them, whatever n_test is
        held_out = replace(cfg.data, n_test=cfg.eval.n) if not cfg.data.eval_data else cfg.data
        evaluator = StepEvaluator(cfg, policy, eval_samples(held_out))
    torch.manual_seed(g.seed if rank == 0 else _seed(g.seed, rank))
    shuffle = torch.Generator().manual_seed(g.seed)  # the same on every rank
    rows: list[dict] = []
    start = _resume(cfg, engine, model, shuffle, checkpoint_dir, rows)
    if isinstance(generator, VLLMGenerator):  # it loaded the directory; resumed weights differ
        generator.sync_weights(engine.module)
    if on_step is not None and rank == 0:
        for row in rows:
            on_step(row)
    for step in trange(
        start, g.steps, desc=f"train {cfg.name}", disable=not progress or rank > 0, leave=False,
        initial=start, total=g.steps,
    ):  # fmt: skip
        t0 = time.perf_counter()
        # Rollout (this rank's shard of the step's prompts)
        samples = [data.sample(step * g.prompts_per_step + i) for i in groups]
        policy_now = engine.full_model().eval()
        trajs = _rollout(agent, generator, samples, groups, g, step)
        flag_bad_image_tokens(trajs, agent.prompts.ids.vision, agent.merge)  # before any forward
        # Rewards (the trainer weighs each verified outcome into a reward, docs/method.md §5)
        score(trajs, g.reward_form, g.tool_gain)
        if isinstance(generator, VLLMGenerator):
            generator.sleep()  # colocated: the GPU goes to the old-log-prob pass and the update
        t_gen = time.perf_counter()
        # Advantages (every trajectory of a group shapes its baseline, masked ones included)
        weights = [loss_weights(t, g.mask_tokens, g.mask_trajectories) for t in trajs]
        all_trajs, all_weights = _gather(trajs, weights)
        rewards = torch.tensor([t.reward for t in all_trajs])
        advantages = group_advantages(
            rewards, torch.tensor([t.group for t in all_trajs]), g.scale_rewards
        )
        # Old log-probs: the trainer's, so the first mini-batch has ratio exactly 1. On-policy
        # (one mini-batch) they are the update forward's own, detached: no extra pass (TRL, verl)
        with torch.no_grad():
            old_lp = (
                None
                if _on_policy(g)
                else _log_probs(policy_now, trajs, image_token_id, pad_id, g.micro_batch)
            )
            ref_lp = (
                _log_probs(ref_model, trajs, image_token_id, pad_id, g.micro_batch)
                if ref_model is not None
                else None
            )
        t_old = time.perf_counter()
        # Policy update
        batch = _Batch(
            trajs, all_weights, advantages, old_lp, ref_lp, image_token_id, pad_id,
            offset=groups.start * g.group_size,
        )  # fmt: skip
        stats = _update(engine, g, batch, shuffle)
        if isinstance(generator, VLLMGenerator) and stats["actor/updates"] > 0:
            generator.sync_weights(engine.module)  # the next rollout samples the new policy
        if batch.old_lp is None:  # on-policy, but nothing trained (every trajectory masked)
            with torch.no_grad():
                batch.old_lp = _log_probs(
                    policy_now.eval(), trajs, image_token_id, pad_id, g.micro_batch
                )
        gap = _logprob_gap(trajs, batch.old_lp)
        t_upd = time.perf_counter()
        # Metrics (over every rank's trajectories)
        row = {
            "step": step,
            **rollout_metrics(all_trajs, all_weights, cfg.agent.tool_names),
            **stats,
        }
        row.update(
            {
                "rollout/advantage_abs_mean": float(advantages.abs().mean()),
                "rollout/logprob_gap": gap,
                "actor/lr": engine.lr,
                "timing_s/gen": t_gen - t0,
                "timing_s/old_logp": t_old - t_gen,
                "timing_s/update": t_upd - t_old,
                "timing_s/step": t_upd - t0,
            }
        )
        # Evaluation (held-out questions every cfg.eval.every steps; off: no eval/* keys)
        if evaluator is not None and cfg.eval.due(step):
            row.update(evaluator(engine.full_model(), step))
        rows.append(row)
        done = step + 1
        if (
            checkpoint_dir is not None
            and g.checkpoint_every
            and (done % g.checkpoint_every == 0 or done == g.steps)
        ):
            _save(cfg, engine, shuffle, rows, checkpoint_dir, done)
        if on_step is not None and rank == 0:
            on_step(row)
    engine.full_model().eval()
    engine.close()
    return rows


def _seed(*parts: int) -> int:
    """A 63-bit torch seed derived from integers (numpy ``SeedSequence``: no collisions between
    nearby tuples, unlike sums)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


def _rollout(agent, generator, samples, groups: range, g: GRPOConfig, step: int) -> list:
    """``g.group_size`` trajectories per sample, ``traj.group`` = global group index.

    ``rollout_seeding="batch"``: one batch from the process's torch stream. ``"group"``: one
    batch per group, sampled from a stream seeded with ``(seed, step, group)`` inside
    ``fork_rng`` (the process's own stream is left untouched).
    """
    if g.rollout_seeding == "batch":
        trajs = rollout(agent, generator, samples, g.group_size)
        for t in trajs:
            t.group += groups.start
        return trajs
    trajs = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    for gi, sample in zip(groups, samples):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_seed(g.seed, step, gi))
            group = rollout(agent, generator, [sample], g.group_size)
        for t in group:
            t.group = gi
        trajs += group
    return trajs


def _gather(trajs: list, weights: list) -> tuple[list, list]:
    """Every rank's trajectories and ``[pos]`` weights, in global order (rank 0's first).

    Other ranks' trajectories come without pixels (``images`` holds one ``None`` per image):
    they serve advantages, normalisers and metrics, never a forward. One process: as given.
    """
    if dist.world_size() == 1:
        return trajs, weights
    slim = [replace(t, images=[None] * len(t.images)) for t in trajs]
    parts = dist.all_gather_objects((slim, weights))
    own = dist.rank()
    all_trajs = [t for r, (ts, _) in enumerate(parts) for t in (trajs if r == own else ts)]
    return all_trajs, [w for _, ws in parts for w in ws]


def _save(cfg, engine: Engine, shuffle, rows: list, checkpoint_dir, done: int) -> None:
    """Checkpoint after ``done`` steps (a collective: every rank writes its rank file)."""
    model = engine.full_model()  # ZeRO-3: refreshed on every rank (a collective)
    state = {
        "config": _resume_key(cfg),
        "world_size": dist.world_size(),
        "engine": None if engine.sharded_state else engine.state_dict(),
        "shuffle_rng": shuffle.get_state(),
        "rows": rows,
    }
    rank_state = {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "engine": engine.state_dict() if engine.sharded_state else None,
    }
    save_checkpoint(checkpoint_dir, done, model, state, rank_state=rank_state)


def _resume_key(cfg: ArmConfig) -> dict:
    """What a checkpoint must match to be resumed: the config, less ``report_to`` (where the
    rows are also logged changes no result)."""
    return {k: v for k, v in asdict(cfg).items() if k != "report_to"}


def _resume(cfg, engine: Engine, model, shuffle, checkpoint_dir, rows: list) -> int:
    """Restore the newest valid checkpoint of ``cfg``'s run into the trainer state; returns the
    step to start at (0: nothing to resume). Restored metric rows are appended to ``rows``.
    Rank 0 chooses the checkpoint; every rank loads it."""
    if checkpoint_dir is None:
        return 0
    found, problem = None, None
    if dist.is_main():
        found = latest_checkpoint(checkpoint_dir)
        if found is not None:
            state = torch.load(Path(found) / STATE, weights_only=False)
            if state.get("config") != _resume_key(cfg):
                warnings.warn(
                    f"ignoring checkpoint {found}: it was written by a different config",
                    stacklevel=3,
                )
                found = None
            elif state.get("world_size", 1) != dist.world_size():
                problem = (
                    f"checkpoint {found} was written by {state.get('world_size', 1)} processes; "
                    f"resume it with the same number (now {dist.world_size()}): per-rank RNG "
                    "streams and ZeRO optimizer partitions are not re-split"
                )
    found, problem = dist.broadcast_object((found, problem))
    if problem is not None:
        raise ValueError(problem)
    if found is None:
        return 0
    state = load_checkpoint(found, model, verify=False)  # latest_checkpoint verified it
    own = load_rank_state(found, dist.rank())
    engine.load_state_dict(own["engine"] if engine.sharded_state else state["engine"])
    torch.set_rng_state(own["torch_rng"])
    if own.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda_rng"])
    shuffle.set_state(state["shuffle_rng"])
    rows.extend(state["rows"])
    return int(state["step"])


def _on_policy(g: GRPOConfig) -> bool:
    """Whether the update is on-policy: one optimizer step per rollout batch
    (``mini_batches == 1``), so the old policy is the policy being updated.

    Then the old log-probs are the update forward's own, detached (``ratio = exp(lp -
    lp.detach()) = 1`` with the policy gradient's value, as TRL with ``num_iterations == 1``
    and verl with one PPO mini-batch do), which saves one no-grad forward over the batch. The
    updates equal those of the extra pass up to float rounding (tests/train/test_loop.py).
    """
    return g.mini_batches == 1


def _logprob_gap(trajs, old_lp) -> float:
    """Mean |rollout - trainer| log-prob (nats) over sampled tokens (of every rank; trajectories
    flagged ``bad_image_tokens`` left out, their forward was blanked). The
    trainer's are the old log-probs: the no-grad pass, or the on-policy update's forward
    (:func:`_on_policy`; before the optimizer step, so of the same weights)."""
    diffs = [torch.zeros(0)]
    for t, lp in zip(trajs, old_lp):
        if t.flags.get("bad_image_tokens"):  # forwarded blanked (train.batching.batch_inputs)
            continue
        m = torch.tensor(t.response_mask, dtype=torch.bool)
        diffs.append((torch.tensor(t.rollout_log_probs)[m] - lp[m]).abs())
    d = torch.cat(diffs)
    if dist.world_size() > 1:
        total, count = dist.all_reduce_sum([float(d.double().sum()), float(d.numel())])
        return total / count if count else 0.0
    return float(d.mean()) if d.numel() else 0.0


def _log_probs(model, trajs, image_token_id: int, pad_id: int, micro_batch: int) -> list:
    """Per-trajectory ``[pos]`` token log-probs (nats), ``micro_batch`` sequences per forward."""
    out = []
    for i in range(0, len(trajs), micro_batch):
        sub = trajs[i : i + micro_batch]
        lp = batched_token_log_probs(model, batch_inputs(sub, image_token_id, pad_id)).cpu()
        out += [lp[j, : len(t.token_ids)] for j, t in enumerate(sub)]
    return out


@dataclass
class _Batch:
    """One step's rollout batch. ``weights`` and ``advantages`` cover every rank's trajectories
    (global index order); ``trajs``, ``old_lp`` and ``ref_lp`` only this rank's, whose first
    has global index ``offset``. ``old_lp`` None: on-policy (:func:`_on_policy`); the update
    uses its forward's detached log-probs, collects them in ``update_lp`` (local index ->
    ``[pos]``) and sets ``old_lp`` from them once every trajectory has been through it."""

    trajs: list
    weights: list[torch.Tensor]
    advantages: torch.Tensor
    old_lp: list[torch.Tensor] | None
    ref_lp: list[torch.Tensor] | None
    image_token_id: int
    pad_id: int
    offset: int = 0
    update_lp: dict[int, torch.Tensor] = field(default_factory=dict)

    def mine(self, chunk: list[int]) -> list[int]:
        """The members of ``chunk`` (global indices) that this rank holds, in chunk order."""
        return [i for i in chunk if self.offset <= i < self.offset + len(self.trajs)]

    def most_micro_batches(self, chunk: list[int], micro_batch: int) -> int:
        """Micro-batches the busiest rank runs for ``chunk`` (ranks hold equal shards)."""
        n = len(self.trajs)
        counts = np.bincount([i // n for i in chunk], minlength=len(self.weights) // n)
        return int(max(-(-c // micro_batch) for c in counts))


def _micro_loss(model, g, batch: _Batch, idx: list[int], n_tokens: float, n_seqs: int):
    """``(policy loss, k3 KL or None, clip stats, [batch, pos] weights)`` of the trajectories
    ``idx`` (global indices, held by this rank) as their share of the mini-batch loss."""
    trajs = [batch.trajs[i - batch.offset] for i in idx]
    width = max(len(t.token_ids) for t in trajs)
    lp = batched_token_log_probs(model, batch_inputs(trajs, batch.image_token_id, batch.pad_id))
    dev = lp.device  # the rest of the batch is built on the CPU
    w = pad_right([batch.weights[i] for i in idx], width).to(dev)
    if batch.old_lp is None:  # on-policy: ratio 1, the gradient of the policy-gradient loss
        old = lp.detach()
        for j, t in enumerate(trajs):
            batch.update_lp.setdefault(idx[j] - batch.offset, old[j, : len(t.token_ids)].cpu())
    else:
        old = pad_right([batch.old_lp[i - batch.offset] for i in idx], width).to(dev)
    isw = None
    if g.tis_cap > 0:
        rollout_lp = pad_right([torch.tensor(t.rollout_log_probs) for t in trajs], width)
        isw = truncated_is_weights(old, rollout_lp.to(dev), g.tis_cap)
    loss, st = clipped_policy_loss(
        lp, old, batch.advantages[idx].to(dev), w, g.clip_eps_low, g.clip_eps_high, g.loss_agg,
        n_tokens, isw,
    )  # fmt: skip
    if g.loss_agg == "seq-mean-token-mean":  # from a mean over this micro-batch's sequences
        loss = loss * sum(float(batch.weights[i].sum()) > 0 for i in idx) / n_seqs
    kl = None
    if batch.ref_lp is not None:
        ref = pad_right([batch.ref_lp[i - batch.offset] for i in idx], width).to(dev)
        kl = agg_loss(kl_k3(lp, ref), w, "token-mean", n_tokens)
    return loss, kl, st, w


def _accumulate(model, g, batch: _Batch, chunk: list[int], logs: dict, engine=None) -> None:
    """Backward of one mini-batch's loss (``chunk``: the mini-batch's global trajectory
    indices; this rank runs those it holds), ``g.micro_batch`` trajectories per forward;
    appends each micro-batch's contribution to ``logs``.

    The normalisers (weighted tokens, sequences with weight) are those of the whole chunk over
    all ranks. A lock-step engine (ZeRO reduces inside every backward) gets as many backward
    passes on every rank: a rank with fewer micro-batches adds zero-weight ones (gradient 0).
    Without ``engine``: ``loss.backward()`` on ``model``.
    """
    weights = batch.weights
    n_tokens = float(sum(weights[i].sum() for i in chunk))
    n_seqs = sum(float(weights[i].sum()) > 0 for i in chunk)
    mine = batch.mine(chunk)
    micro = [mine[k : k + g.micro_batch] for k in range(0, len(mine), g.micro_batch)]
    if engine is not None and engine.lockstep:
        micro += [[]] * (batch.most_micro_batches(chunk, g.micro_batch) - len(micro))
    world = dist.world_size()
    for k, idx in enumerate(micro):
        padding = not idx
        loss, kl, st, w = _micro_loss(model, g, batch, idx or [batch.offset], n_tokens, n_seqs)
        total = loss + g.beta * kl if kl is not None else loss
        if padding:
            total = total * 0.0  # the busiest rank's extra pass: zero gradient
        elif world > 1:
            total = total * world  # engines average over ranks; the loss is a global sum
        if engine is None:
            total.backward()
        else:
            engine.backward(total, boundary=k == len(micro) - 1)
        if padding:
            continue
        share = float(w.sum()) / n_tokens
        logs["pg_loss"].append(float(loss.detach()))
        logs["clipfrac"].append(float(st["clipfrac"]) * share)
        logs["approx_kl"].append(float(st["approx_kl"]) * share)
        logs["ratio_mean"].append(float(st["ratio_mean"]) * share)
        logs["kl"].append(float(kl.detach()) if kl is not None else 0.0)


def _update(engine: Engine, g, batch: _Batch, shuffle) -> dict:
    """``g.mini_batches`` optimizer steps over a shuffled split of the (global) batch; returns
    ``actor/*`` summed over ranks."""
    engine.module.train()
    order = torch.randperm(len(batch.weights), generator=shuffle).tolist()
    chunks = [c.tolist() for c in torch.tensor(order).chunk(g.mini_batches)]
    if batch.old_lp is None and len(chunks) > 1:
        raise ValueError("old log-probs may come from the update only with one mini-batch")
    logs: dict[str, list[float]] = {
        k: [] for k in ("pg_loss", "clipfrac", "approx_kl", "kl", "grad_norm", "ratio_mean")
    }
    for chunk in chunks:
        if float(sum(batch.weights[i].sum() for i in chunk)) == 0:
            continue  # everything masked: no gradient this mini-batch
        engine.zero_grad()
        _accumulate(engine, g, batch, chunk, logs, engine)
        engine.step()
        logs["grad_norm"].append(engine.grad_norm)
    if batch.old_lp is None and len(batch.update_lp) == len(batch.trajs):
        batch.old_lp = [batch.update_lp[i] for i in range(len(batch.trajs))]
    n_updates = max(1, len(logs["grad_norm"]))
    sums = {k: float(np.sum(v)) for k, v in logs.items() if k != "grad_norm"}
    if dist.world_size() > 1:
        sums = dict(zip(sums, dist.all_reduce_sum(list(sums.values()))))
    out = {f"actor/{k}": s / n_updates for k, s in sums.items()}
    out["actor/grad_norm"] = float(np.mean(logs["grad_norm"])) if logs["grad_norm"] else 0.0
    out["actor/updates"] = float(len(logs["grad_norm"]))
    return out
