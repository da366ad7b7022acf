"""Per-step metrics of a GRPO batch, keyed ``namespace/name`` (docs/design.md#style)."""

from __future__ import annotations

import numpy as np
import torch

from agent.reward import mask_reasons
from agent.tools import counted_tools
from agent.trajectory import Trajectory


def rollout_metrics(
    trajs: list[Trajectory], weights: list[torch.Tensor], tools: tuple[str, ...] = ()
) -> dict[str, float]:
    """Reward, accuracy, tool use, lengths and masked fractions of one rollout batch.

    Args:
        trajs: the batch's trajectories.
        weights: their ``[pos]`` loss weights (:func:`train.batching.loss_weights`).
        tools: the advertised tools' names; ``rollout/tool_calls/<name>`` is logged for the
            built-ins, these and any other tool called successfully.

    Returns:
        ``rollout/*`` (means per trajectory; ``rollout/tool_calls/<name>`` are successful calls
        per trajectory, ``rollout/tool_calls_failed`` the failed calls of any tool), ``mask/token_frac`` (weighted share of the tokens after the
        prompt), ``mask/trajectory_frac`` (share of trajectories with zero weight) and
        ``mask/{truncated,void_turn,failed_call,over_budget}`` (share flagged) and
        ``reward/<term>`` (mean unweighted value of each reward term, :func:`train.rewards.score`).
    """
    calls = [t.n_tool_calls for t in trajs]
    names = counted_tools((*tools, *(k for c in calls for k in c)))
    after_prompt = sum(len(t.token_ids) - t.prompt_len for t in trajs)
    out = {
        "rollout/reward_mean": float(np.mean([t.reward for t in trajs])),
        "rollout/reward_std": float(np.std([t.reward for t in trajs])),
        "rollout/acc_mean": float(np.mean([t.acc for t in trajs])),
        "rollout/fmt_mean": float(np.mean([t.fmt for t in trajs])),
        "rollout/answer_frac": float(np.mean([t.answer is not None for t in trajs])),
        "rollout/tool_used_frac": float(np.mean([t.used for t in trajs])),
        **{f"rollout/tool_calls/{k}": float(np.mean([c.get(k, 0) for c in calls])) for k in names},
        "rollout/tool_calls_failed": float(
            np.mean([sum(e.kind == "tool_call" and not e.ok for e in t.events) for t in trajs])
        ),
        "rollout/turns": float(np.mean([len(t.events) for t in trajs])),
        "rollout/response_length": float(np.mean([t.response_length for t in trajs])),
        "rollout/images": float(np.mean([len(t.images) for t in trajs])),
        "mask/token_frac": float(sum(w.sum().item() for w in weights) / max(after_prompt, 1)),
        "mask/trajectory_frac": float(np.mean([w.sum().item() == 0 for w in weights])),
    }
    for flag in ("truncated", "void_turn", "failed_call", "over_budget"):
        out[f"mask/{flag}"] = float(np.mean([flag in mask_reasons(t.flags) for t in trajs]))
    for term in dict.fromkeys(k for t in trajs for k in t.reward_terms):
        out[f"reward/{term}"] = float(np.mean([t.reward_terms.get(term, 0.0) for t in trajs]))
    return out


def eval_metrics(summary: dict, namespace: str = "eval") -> dict[str, float]:
    """A held-out evaluation summary (:func:`agent.evaluation.summarize`) as metric keys.

    Args:
        summary: ``accuracy``, ``per_family``, ``answer_rate``, ``tool_call_rate``,
            ``tool_calls``, ``failed_call_rate``, ``mean_response_length``, ``n``.
        namespace: ``eval`` (greedy) or ``eval_sampled``.

    Returns:
        ``{ns}/acc`` (exact-match fraction), ``{ns}/acc/<family>``, ``{ns}/answer_rate``,
        ``{ns}/tool_call_rate`` (share of episodes with a successful call),
        ``{ns}/tool_calls_{reflect,confirm}`` (successful calls per episode),
        ``{ns}/failed_call_rate``, ``{ns}/response_length`` (tokens), ``{ns}/n`` (episodes).
    """
    ns = namespace
    out = {
        f"{ns}/acc": float(summary["accuracy"]),
        f"{ns}/answer_rate": float(summary["answer_rate"]),
        f"{ns}/tool_call_rate": float(summary["tool_call_rate"]),
        f"{ns}/failed_call_rate": float(summary["failed_call_rate"]),
        f"{ns}/response_length": float(summary["mean_response_length"]),
        f"{ns}/n": float(summary["n"]),
    }
    out.update({f"{ns}/tool_calls_{k}": float(v) for k, v in summary["tool_calls"].items()})
    out.update({f"{ns}/acc/{k}": float(v) for k, v in summary["per_family"].items()})
    return out
