"""Trajectory-level mask reasons (docs/method.md §4).

Answers are verified in :mod:`agent.verifiers`; rewards are weighed by the trainer
(:mod:`train.rewards`).
"""

from __future__ import annotations

MASK_FLAGS = ("truncated", "void_turn", "failed_call", "over_budget", "bad_image_tokens")
"""Trajectory flags that zero a trajectory's loss weight (level-2 mask, docs/method.md §4)."""


def mask_reasons(flags: dict[str, bool]) -> list[str]:
    """Why a trajectory gets loss weight 0 under the trajectory-level mask (docs/method.md §4).

    A trajectory is masked when it was truncated without an answer, contains a void turn,
    contains a failed tool call, exceeded the image budget, or holds image tokens that do not
    match its images (``bad_image_tokens``). Returns the flag names that hold.
    """
    return [k for k in MASK_FLAGS if flags.get(k)]
