"""Run the agent on benchmark items: one greedy (or sampled) episode per question, scored by the
benchmark's rule, with tool-call statistics. Images are decoded batch by batch and released after
each batch, so an 8K benchmark never sits decoded in memory at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from agent.benchmarks import get_spec, score_predictions
from agent.benchmarks.base import BenchmarkItem
from agent.rollout import Agent, Generator, rollout
from agent.tools import counted_tools, registered_tools
from agent.trajectory import Trajectory


def tool_statistics(trajs: Sequence[Trajectory]) -> dict:
    """Tool use over finished episodes.

    Returns:
        ``calls_per_question``: attempted calls per episode, per tool (the built-ins
        ``reflect``, ``confirm``, then any other registered tool called; ``other`` for unknown
        or unparseable calls); ``question_share``: share of
        episodes with at least one call attempt; ``question_share_ok``: share with at least one
        successful call; ``success_rate``: successful / attempted calls (``None`` when no call
        was made); ``calls``: attempted calls in total.

    Raises:
        ValueError: no trajectories.
    """
    if not trajs:
        raise ValueError("no trajectories")
    known = registered_tools()
    called = [e.tool for t in trajs for e in t.events if e.kind == "tool_call" and e.tool in known]
    per_tool = dict.fromkeys((*counted_tools(tuple(called)), "other"), 0)
    calls = ok = with_call = with_ok = 0
    for t in trajs:
        events = [e for e in t.events if e.kind == "tool_call"]
        for e in events:
            per_tool[e.tool if e.tool in known else "other"] += 1
        calls += len(events)
        ok += sum(e.ok for e in events)
        with_call += bool(events)
        with_ok += any(e.ok for e in events)
    n = len(trajs)
    return {
        "calls_per_question": {k: v / n for k, v in per_tool.items()},
        "question_share": with_call / n,
        "question_share_ok": with_ok / n,
        "success_rate": ok / calls if calls else None,
        "calls": calls,
    }


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


def final_text(traj: Trajectory, untagged: bool = True) -> str | None:
    """The answer text a benchmark scorer sees for one episode.

    The ``<answer>`` content when there is one. Otherwise, with ``untagged``, the text of a
    last turn that neither answered nor called a tool (``<think>`` blocks and special tokens
    removed), since the published scorers read a model's raw reply and an off-the-shelf
    checkpoint may not use relook's tags; ``None`` when that is empty or the episode ended
    otherwise (truncated after a tool call).
    """
    if traj.answer is not None:
        return traj.answer
    if not untagged or not traj.events or traj.events[-1].kind != "void":
        return None
    text = _SPECIAL.sub("", _THINK.sub("", traj.events[-1].text)).strip()
    return text or None


def run_benchmark(
    agent: Agent,
    generator: Generator,
    name: str,
    items: Sequence[BenchmarkItem],
    batch: int = 8,
    records: bool = False,
    untagged: bool = True,
) -> dict:
    """Evaluate the agent on ``items`` of benchmark ``name``.

    Args:
        agent: the agent (its ``config`` decides tools, turns and temperature).
        generator: the rollout backend.
        name: benchmark registry name (its judge and aggregate are used).
        items: the questions (:func:`agent.benchmarks.load_benchmark`).
        batch: questions per lock-step rollout call.
        records: also return one record per question under ``"records"``.
        untagged: also score a final reply without ``<answer>`` tags (:func:`final_text`).

    Returns:
        The scorer's summary (``overall``, ``per_category``, ..., ``n``; accuracies in [0, 1])
        plus ``answer_rate`` (share of episodes ending in ``<answer>``), ``untagged_rate``
        (share scored from an untagged final reply), ``tool_use`` (:func:`tool_statistics`)
        and ``mean_response_length`` (sampled tokens per episode).

    Raises:
        ValueError: unknown benchmark, no items, or ``batch < 1``.
        FileNotFoundError / ValueError: an image that cannot be read (names file and field).
    """
    get_spec(name)
    if not items:
        raise ValueError(f"{name}: no items to evaluate")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    trajs: list[Trajectory] = []
    for i in range(0, len(items), batch):
        samples = [it.to_sample(name) for it in items[i : i + batch]]
        done = rollout(agent, generator, samples, group_size=1)
        for t in done:  # drop decoded images and pixel values: only text and events are scored
            t.images.clear()
        trajs += done
    predictions = [final_text(t, untagged) for t in trajs]
    summary, judgements = score_predictions(name, items, predictions)
    summary["answer_rate"] = sum(t.answer is not None for t in trajs) / len(trajs)
    summary["untagged_rate"] = sum(
        t.answer is None and p is not None for t, p in zip(trajs, predictions)
    ) / len(trajs)
    summary["tool_use"] = tool_statistics(trajs)
    summary["mean_response_length"] = sum(t.response_length for t in trajs) / len(trajs)
    if records:
        summary["records"] = [
            {
                "id": it.id,
                "category": it.category,
                "gold": it.answer,
                "prediction": p,
                "tagged": t.answer is not None,
                "parsed": parsed,
                "correct": bool(ok),
                "tool_calls": [e.tool for e in t.events if e.kind == "tool_call"],
                "turns": len(t.events),
            }
            for it, t, p, (parsed, ok) in zip(items, trajs, predictions, judgements)
        ]
    return summary
