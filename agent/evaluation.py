"""Held-out evaluation of the agent on the offline task set (docs/method.md §7)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from agent.rollout import Agent, Generator, rollout
from agent.tools import counted_tools
from agent.trajectory import Trajectory


def evaluate(
    agent: Agent, generator: Generator, samples: list, batch: int = 8
) -> tuple[dict, list[Trajectory]]:
    """Run one episode per sample and score it by exact match.

    Args:
        agent: the agent (its ``config.temperature`` decides greedy vs sampled).
        generator: the rollout backend.
        samples: held-out samples.
        batch: samples per lock-step rollout call.

    Returns:
        ``(summary, trajectories)``. ``summary``: ``n``, ``accuracy`` (fraction in [0, 1]),
        ``per_family`` accuracy, ``answer_rate``, ``tool_call_rate`` (share of episodes with at
        least one successful tool call), ``tool_calls`` (successful calls per episode, per tool),
        ``failed_call_rate``, ``mean_response_length`` (tokens).
    """
    trajs: list[Trajectory] = []
    for i in range(0, len(samples), batch):
        trajs += rollout(agent, generator, samples[i : i + batch], group_size=1)
    return summarize(trajs, agent.config.tool_names), trajs


def summarize(trajs: list[Trajectory], tools: tuple[str, ...] = ()) -> dict:
    """The evaluation summary of finished, scored trajectories (see :func:`evaluate`).

    ``tool_calls`` has a key per built-in tool, per one of ``tools`` (the advertised ones) and
    per other tool called successfully."""
    called = [name for t in trajs for name in t.n_tool_calls]
    fam: dict[str, list[float]] = defaultdict(list)
    for t in trajs:
        fam[t.family].append(t.acc)
    n = max(len(trajs), 1)
    return {
        "n": len(trajs),
        "accuracy": float(np.mean([t.acc for t in trajs])) if trajs else 0.0,
        "per_family": {k: float(np.mean(v)) for k, v in sorted(fam.items())},
        "answer_rate": sum(t.answer is not None for t in trajs) / n,
        "tool_call_rate": sum(t.used > 0 for t in trajs) / n,
        "tool_calls": {
            k: sum(t.n_tool_calls.get(k, 0) for t in trajs) / n
            for k in counted_tools((*tools, *called))
        },
        "failed_call_rate": sum(t.flags["failed_call"] for t in trajs) / n,
        "mean_response_length": sum(t.response_length for t in trajs) / n,
    }
