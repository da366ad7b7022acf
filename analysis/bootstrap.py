"""Bootstrap helpers shared by the decay fits (:mod:`analysis.decay`) and the tool-call
before/after intervals (:mod:`analysis.events`): argument checks and Efron's percentile interval
(Efron and Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13)."""

from __future__ import annotations

import math

import numpy as np


def percentile_interval(draws: np.ndarray, ci: float) -> tuple[float, float]:
    """Efron's percentile interval ``(lo, hi)`` at level ``ci`` of the non-NaN bootstrap draws.

    lo, hi are the (1 - ci)/2 and (1 + ci)/2 quantiles of ``draws`` (shape [n_boot]; NaN draws,
    e.g. refits with too few points, are left out); nearest-rank quantiles when a draw is inf
    (a half-life with no decay), so inf comes through instead of inf - inf = NaN. (NaN, NaN)
    when no draw is left.
    """
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return math.nan, math.nan
    method = "linear" if np.isfinite(draws).all() else "inverted_cdf"
    lo, hi = np.quantile(draws, [(1 - ci) / 2, (1 + ci) / 2], method=method)
    return float(lo), float(hi)


def check_bootstrap(n_boot: int, ci: float) -> None:
    """Raise ``ValueError`` naming both values unless ``n_boot >= 1`` and ``0 < ci < 1``."""
    if n_boot < 1 or not 0 < ci < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < ci < 1, got {n_boot=}, {ci=}")
