"""Held-out evaluation during training: the loop's ``# Evaluation`` phase (:class:`EvalConfig`).

Every ``cfg.eval.every`` steps the updated policy answers the first ``cfg.eval.n`` held-out
questions through :func:`agent.evaluation.evaluate` (greedy, and ``n_sampled`` sampled
episodes per question when asked); the summary joins that step's metrics row as ``eval/*``
(and ``eval_sampled/*``) keys (:func:`train.metrics.eval_metrics`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from agent.data.tasks import Sample
from agent.evaluation import evaluate
from agent.modeling import Policy
from agent.rollout import Agent
from train import dist
from train.config import ArmConfig
from train.metrics import eval_metrics

EVAL_STREAM = 0x5EED_E7A1
"""Seed part that separates the evaluation stream from the training streams."""


class StepEvaluator:
    """Evaluates a policy's current weights on a fixed held-out set (rank 0 runs the episodes,
    every rank gets the same metrics).

    Args:
        cfg: the arm's config (``eval``, ``agent``, ``data.test_seed``, ``grpo.seed``).
        policy: the policy being trained (tokenizer and image processor; its model is replaced
            by the one given at each call).
        samples: the held-out samples (:func:`train.loop.eval_samples`); the first
            ``cfg.eval.n`` are evaluated.
    """

    def __init__(self, cfg: ArmConfig, policy: Policy, samples: Sequence[Sample]):
        self.cfg, self.policy = cfg, policy
        # the first ``eval.n`` held-out samples (generated test split or ``--eval-data``)
        self.samples = [samples[i] for i in range(min(cfg.eval.n, len(samples)))]
        tok, proc = policy.tokenizer, policy.image_processor
        self.greedy = Agent(tok, proc, replace(cfg.agent, temperature=0.0))
        self.sampled = Agent(tok, proc, replace(cfg.agent, temperature=cfg.eval.temperature))

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """``eval/*`` (and ``eval_sampled/*``) metrics of ``model`` after ``step``, plus
        ``timing_s/eval``; a collective under data parallelism (rank 0 broadcasts)."""
        row = self._run(model.eval(), step) if dist.is_main() else None
        return dist.broadcast_object(row)

    def _run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        from train.loop import make_generator  # the loop imports this module

        t0 = time.perf_counter()
        # HF generate on the trainer's weights, also with vLLM rollouts (that engine sleeps)
        generator = make_generator(replace(self.policy, model=model))
        e = self.cfg.eval
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(_eval_seed(self.cfg.grpo.seed, step))
            summary, _ = evaluate(self.greedy, generator, self.samples)
            row = eval_metrics(summary, "eval")
            if e.n_sampled:
                repeated = [s for s in self.samples for _ in range(e.n_sampled)]
                summary, trajs = evaluate(self.sampled, generator, repeated)
                row.update(eval_metrics(summary, "eval_sampled"))
                row["eval_sampled/pass_at_n"] = pass_at_n(trajs)
        row["timing_s/eval"] = time.perf_counter() - t0
        return row


def _eval_seed(seed: int, step: int) -> int:
    """The evaluation stream's torch seed at ``step`` (numpy ``SeedSequence``, 63 bits)."""
    state = np.random.SeedSequence([seed, step, EVAL_STREAM]).generate_state(2, np.uint64)
    return int(state[0] >> 1)


def pass_at_n(trajs: list) -> float:
    """Share of questions (``sample_id``) with at least one correct episode among their n."""
    best: dict[str, float] = defaultdict(float)
    for t in trajs:
        best[t.sample_id] = max(best[t.sample_id], t.acc)
    return float(np.mean([v > 0 for v in best.values()])) if best else 0.0
