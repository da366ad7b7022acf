"""User reward terms for tests/train/test_rewards.py (loaded as ``module:function``)."""

from __future__ import annotations

NOT_CALLABLE = 3


def short_answer(traj) -> float:
    """1.0 for an answer of at most 8 characters, else 0.0 (none: 0.0)."""
    return float(traj.answer is not None and len(traj.answer) <= 8)


def not_a_number(traj):
    return "high"
