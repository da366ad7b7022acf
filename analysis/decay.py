"""Decay of the image share over generated tokens: linear slope and exponential half-life of
the image-share curve, per group and pooled with bootstrap intervals over trajectories.

Input: the long attention table of :mod:`analysis.metrics` (one row per trajectory, token,
layer, head and region); the image share s[j, t] is :func:`analysis.metrics.image_token_shares`.
IMAgent (Dong et al., arXiv 2512.08980) Figure 1 shows this decay; docs/method.md §6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.bootstrap import check_bootstrap, percentile_interval
from analysis.metrics import image_token_shares, require_columns

FIT_COLUMNS = ("slope_per_100", "intercept", "half_life_tokens", "s0", "r2_linear", "n_points")
"""Columns of one fit (:func:`decay_fit`)."""
_NO_DECAY = 1e-12  # fitted log-share drop over the curve's span below which the rate is 0


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Slope, intercept and R^2 of y = a + b x by least squares (NaN R^2 for constant y)."""
    xc = x - x.mean()
    ym = y.mean()
    slope = float(xc @ (y - ym) / (xc @ xc))
    intercept = float(ym - slope * x.mean())
    ss_tot = float(((y - ym) ** 2).sum())
    ss_res = float(((y - intercept - slope * x) ** 2).sum())
    return slope, intercept, (1.0 - ss_res / ss_tot) if ss_tot > 0 else math.nan


def _fit(t: np.ndarray, s: np.ndarray, min_tokens: int) -> dict[str, float]:
    """:func:`decay_fit` on arrays (NaN points already dropped)."""
    out = dict.fromkeys(FIT_COLUMNS, math.nan) | {"n_points": len(t)}
    if len(np.unique(t)) >= min_tokens:
        slope, intercept, r2 = _ols(t, s)
        out |= {"slope_per_100": 100 * slope, "intercept": intercept, "r2_linear": r2}
    positive = s > 0
    tp = t[positive]
    if len(np.unique(tp)) >= min_tokens:
        log_slope, log_s0, _ = _ols(tp, np.log(s[positive]))
        rate = -log_slope  # nats of image share lost per token
        decays = rate * (tp.max() - tp.min()) > _NO_DECAY
        out |= {
            "s0": math.exp(log_s0),
            "half_life_tokens": math.log(2) / rate if decays else math.inf,
        }
    return out


def decay_fit(curve: pd.DataFrame, min_tokens: int = 4) -> dict[str, float]:
    """Linear slope and exponential half-life of an image-share curve.

    (a) OLS, unweighted (each token once): image_share = intercept + slope * token;
        slope_per_100 = 100 * slope (share per 100 generated tokens), r2_linear its R^2
        (NaN for a constant curve).
    (b) Least squares on log(image_share) = log(s0) - token * ln2 / half_life over the points
        with image_share > 0: s0 the fitted share at token 0, half_life_tokens in generated
        tokens; inf when the fitted decay rate is <= 0 (no decay; numerically: the fitted drop
        over the curve's token span is below 1e-12 nats).

    Args:
        curve: columns token, image_share (e.g. :func:`analysis.metrics.image_share_curve`; extra columns such
            as n are ignored); NaN shares are dropped.
        min_tokens: fewest distinct tokens a fit needs (>= 2), else its values are NaN.

    Returns:
        dict with :data:`FIT_COLUMNS`: slope_per_100, intercept, half_life_tokens, s0,
        r2_linear, n_points (the non-NaN points).

    Raises:
        ValueError: min_tokens < 2, or the token/image_share column is missing.
    """
    if min_tokens < 2:
        raise ValueError(f"min_tokens must be >= 2, got {min_tokens}")
    require_columns(curve, ["token", "image_share"], "decay_fit")
    c = curve[["token", "image_share"]].dropna()
    t, s = c["token"].to_numpy("float64"), c["image_share"].to_numpy("float64")
    return _fit(t, s, min_tokens)


def decay_fits(
    att: pd.DataFrame, by: Sequence[str] = ("trajectory",), kind: str = "raw", min_tokens: int = 4
) -> pd.DataFrame:
    """:func:`decay_fit` of the image-share curve of each ``by`` group (default: each trajectory).

    The curve of a group is the mean over its trajectories, per token, of the image share of
    :func:`analysis.metrics.token_shares`. ``by`` columns other than trajectory (e.g. "setting", "turn") must be
    constant per (trajectory, token); ``by=()`` fits the pooled curve once.

    Returns:
        Columns *by, then :data:`FIT_COLUMNS`, one row per group, sorted by ``by``.

    Raises:
        ValueError: as :func:`analysis.metrics.token_shares` and :func:`decay_fit`, "token" in ``by`` or a
            ``by`` column missing.
    """
    by = list(by)
    if "token" in by:
        raise ValueError("decay_fits: cannot group by 'token' (the fit runs over tokens)")
    require_columns(att, by, "decay_fits")
    per = image_token_shares(att, kind)
    extra = [c for c in by if c != "trajectory"]
    if extra and len(per):
        first = att.groupby(["trajectory", "token"], sort=False, observed=True)[extra].first()
        per = per.merge(first.reset_index(), on=["trajectory", "token"])
    groups = per.groupby(by, sort=True, observed=True) if by else [((), per)]
    rows = []
    for key, g in groups:
        curve = g.groupby("token", as_index=False)["image_share"].mean()
        rows.append({**dict(zip(by, key)), **decay_fit(curve, min_tokens)})
    return pd.DataFrame(rows, columns=[*by, *FIT_COLUMNS])


def decay_summary(
    att: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    kind: str = "raw",
    min_tokens: int = 4,
) -> pd.DataFrame:
    """:func:`decay_fit` of the pooled image-share curve, with bootstrap intervals over trajectories.

    Pooled curve: s[t] = mean_{j reaching t} s[j, t] (:func:`analysis.metrics.image_share_curve`). Each of
    ``n_boot`` draws resamples the J trajectories with replacement (numpy ``default_rng(seed)``),
    recomputes the pooled curve over the drawn multiset (a trajectory drawn twice counts twice)
    and refits it; lo, hi are the (1 - ci)/2 and (1 + ci)/2 percentiles of the draws (Efron's
    percentile interval; draws whose fit is NaN are left out).

    Returns:
        One row per statistic (slope_per_100, intercept, half_life_tokens, s0, r2_linear):
        columns stat, estimate, lo, hi, n_trajectories, n_points (tokens of the pooled curve).

    Raises:
        ValueError: n_boot < 1, ci outside (0, 1), or as :func:`analysis.metrics.token_shares`.
    """
    check_bootstrap(n_boot, ci)
    stats = [c for c in FIT_COLUMNS if c != "n_points"]
    cols = ["stat", "estimate", "lo", "hi", "n_trajectories", "n_points"]
    wide = image_token_shares(att, kind).pivot(
        index="trajectory", columns="token", values="image_share"
    )
    if wide.empty:
        return pd.DataFrame([(s, *[math.nan] * 3, 0, 0) for s in stats], columns=cols)
    shares = wide.to_numpy("float64")  # [trajectory, token], NaN where not reached
    present = ~np.isnan(shares)
    filled = np.where(present, shares, 0.0)
    tokens = wide.columns.to_numpy("float64")
    n_traj = len(wide)
    estimate = _fit(tokens, filled.sum(0) / present.sum(0), min_tokens)
    idx = np.random.default_rng(seed).integers(0, n_traj, size=(n_boot, n_traj))
    counts = np.zeros((n_boot, n_traj))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        curves = (counts @ filled) / (counts @ present)  # [draw, token], NaN: token not reached
    draws = []
    for curve in curves:
        keep = ~np.isnan(curve)
        draws.append(_fit(tokens[keep], curve[keep], min_tokens))
    boot = pd.DataFrame(draws)
    rows = [
        (s, estimate[s], *percentile_interval(boot[s].to_numpy("float64"), ci), n_traj, len(tokens))
        for s in stats
    ]
    return pd.DataFrame(rows, columns=cols)
