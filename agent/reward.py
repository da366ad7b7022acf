"""Outcome reward and trajectory-level mask reasons (METHOD.md 4-5)."""

from __future__ import annotations

REWARD_FORMS = ("imagent", "deepeyes")
MASK_FLAGS = ("truncated", "void_turn", "failed_call", "over_budget", "bad_image_tokens")
"""Trajectory flags that zero a trajectory's loss weight (level-2 mask, METHOD.md 4)."""


def outcome_reward(
    acc: float, fmt: float, used: float, tool_gain: float = 0.5, form: str = "imagent"
) -> float:
    """Outcome reward of one trajectory.

    ``imagent`` (relook default, METHOD.md 5): ``R = acc * (1 + g * used) + 0.2 * fmt``.
    ``deepeyes`` (DeepEyes, arXiv 2505.14362): ``R = 0.8 * acc + 0.2 * fmt + 1.2 * [used and acc]``
    (``tool_gain`` unused).

    Args:
        acc: 1.0 for an exact-match correct answer, else 0.0.
        fmt: -1.0 for malformed output, else 0.0.
        used: 1.0 if at least one tool call succeeded.
        tool_gain: the tool-use reward gain ``g`` (0 turns it off).
        form: ``"imagent"`` or ``"deepeyes"``.

    Raises:
        ValueError: unknown ``form``.
    """
    if form == "imagent":
        return acc * (1.0 + tool_gain * used) + 0.2 * fmt
    if form == "deepeyes":
        return 0.8 * acc + 0.2 * fmt + 1.2 * float(used > 0 and acc > 0)
    raise ValueError(f"reward form must be one of {REWARD_FORMS}, got {form!r}")


def mask_reasons(flags: dict[str, bool]) -> list[str]:
    """Why a trajectory gets loss weight 0 under the trajectory-level mask (METHOD.md 4).

    A trajectory is masked when it was truncated without an answer, contains a void turn,
    contains a failed tool call, exceeded the image budget, or holds image tokens that do not
    match its images (``bad_image_tokens``). Returns the flag names that hold.
    """
    return [k for k in MASK_FLAGS if flags.get(k)]
