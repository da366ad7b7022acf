"""Attention measurement of finished trajectories by replay (METHOD.md 6), for ``ablate``.

Composes agent trajectories with the analysis replay: analysis derives regions from token ids
and special-token ids, so it needs no agent types (DESIGN.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from agent.trajectory import Trajectory
from analysis.replay import replay_attention
from analysis.spans import SpecialIds, check_image_grid, region_labels


def token_turns(traj: Trajectory) -> list[int]:
    """Turn index of each policy token, in order (``[resp]``)."""
    turns = []
    for e in traj.events:
        turns += [e.turn] * sum(traj.response_mask[e.start : e.end])
    return turns


def tool_events(traj: Trajectory, traj_id: str) -> list[dict]:
    """One row per tool call: the generated-token index of the first policy token after its result."""
    mask = np.asarray(traj.response_mask)
    rows = []
    for e in traj.events:
        if e.kind == "tool_call" and e.obs_end is not None:
            rows.append(
                {
                    "trajectory": traj_id,
                    "token": int(mask[: e.obs_end].sum()),
                    "tool": e.tool or "?",
                    "ok": bool(e.ok),
                    "turn": e.turn,
                }
            )
    return rows


def measure(
    policy, trajs: list[Trajectory], ids: list[str], chunk: int = 256
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replay each trajectory through ``policy.model`` and reduce attention to regions.

    Args:
        policy: the :class:`agent.modeling.Policy` that produced (or is to be probed on) them.
        trajs: finished trajectories.
        ids: one trajectory id per trajectory (the ``trajectory`` column).
        chunk: query rows per chunk of the streaming reduction.

    Returns:
        ``(attention, events)``: the long attention table (columns of
        :data:`analysis.rundir.ATTENTION_COLUMNS`) and the tool-call event table.

    Raises:
        ValueError: a trajectory whose image-token counts disagree with its image grids.
    """
    special = SpecialIds.from_tokenizer(policy.tokenizer)
    merge = int(policy.image_processor.merge_size)
    frames, events = [], []
    for traj, tid in zip(trajs, ids):
        inputs = traj.model_inputs(special.image_pad)
        if "image_grid_thw" in inputs:
            check_image_grid(traj.token_ids, inputs["image_grid_thw"], merge, special)
        region_map = region_labels(
            traj.token_ids,
            traj.response_mask,
            special,
            traj.prompt_len,
            [r.origin for r in traj.images],
        )
        record = replay_attention(policy.model, inputs, region_map, chunk=chunk)
        frames.append(record.to_frame(tid, turns=token_turns(traj)))
        events += tool_events(traj, tid)
    att = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    ev = pd.DataFrame(events, columns=["trajectory", "token", "tool", "ok", "turn"])
    return att, ev
