"""Image attention around tool calls: mean image share before versus after each call, the
share aligned on the call, and clustered-bootstrap intervals of the mean change.

An event is a tool call's result in a trajectory, at generated token e (the first policy token
after the result; :func:`analysis.rundir.load_attention_events`). Input: the long attention
table of :mod:`analysis.metrics`. IMAgent (Dong et al., arXiv 2512.08980) asks whether looking
again (``reflect``, ``confirm``) restores image attention; docs/method.md §6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.bootstrap import check_bootstrap, percentile_interval
from analysis.metrics import image_token_shares, require_columns


def before_after(
    att: pd.DataFrame, events: pd.DataFrame, window: int = 8, *, kind: str = "raw"
) -> pd.DataFrame:
    """Mean image share in the ``window`` tokens before versus after each tool call.

    For an event at generated token e of trajectory j (first policy token after the tool
    result): before = mean_{t in [e - window, e)} s[j, t], after = mean_{t in [e, e + window)}
    s[j, t], with s the per-token image share of :func:`analysis.metrics.token_shares` (variant ``kind``);
    delta = after - before. A window with no measured token gives NaN.

    Args:
        att: long attention table. events: columns trajectory, token, tool, ok, turn (extra
            ones kept).
        window: tokens per side, >= 1.
        kind: see :func:`analysis.metrics.token_shares`.

    Returns:
        The event columns plus before, after, delta (fractions), n_before, n_after (tokens).

    Raises:
        ValueError: window < 1, or as :func:`analysis.metrics.token_shares`.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    image = image_token_shares(att, kind)
    series = {j: g.set_index("token")["image_share"] for j, g in image.groupby("trajectory")}
    empty = pd.Series(dtype="float64")
    rows = []
    for trajectory, e in zip(events["trajectory"], events["token"]):
        s = series.get(trajectory, empty)
        b = s[(s.index >= e - window) & (s.index < e)]
        a = s[(s.index >= e) & (s.index < e + window)]
        rows.append((b.mean(), a.mean(), len(b), len(a)))
    cols = ["before", "after", "n_before", "n_after"]
    stats = pd.DataFrame(rows, columns=cols).astype(  # typed even with no events
        {"before": "float64", "after": "float64", "n_before": "int64", "n_after": "int64"}
    )
    out = pd.concat([events.reset_index(drop=True), stats], axis=1)
    out.insert(out.columns.get_loc("after") + 1, "delta", out["after"] - out["before"])
    return out


def event_aligned_share(
    att: pd.DataFrame,
    events: pd.DataFrame,
    window: int = 8,
    *,
    kind: str = "raw",
    by_tool: bool = False,
) -> pd.DataFrame:
    """Image share around tool calls, aligned on the call and averaged over calls.

    For an event at generated token e of trajectory j (the first policy token after the tool
    result, as in :func:`before_after`), offset o = t - e for o in [-window, window);

        image_share[o] = mean over events (j, e) of s[j, e + o]

    with s the per-token image share of :func:`analysis.metrics.token_shares` (variant ``kind``). Offsets below
    0 are before the call's result, 0 and above after it; an event whose trajectory has no
    measured token e + o does not count at o. The mean over the offsets -window..-1 of one
    event is its ``before`` of :func:`before_after`. IMAgent (Dong et al., arXiv 2512.08980)
    and docs/method.md §6 motivate the view: does looking again restore image attention?

    Args:
        att: long attention table.
        events: tool-call events (:func:`analysis.rundir.load_attention_events`): columns
            trajectory, token (e) and, with ``by_tool``, tool.
        window: tokens per side, >= 1.
        kind: see :func:`analysis.metrics.token_shares`.
        by_tool: one curve per tool (column tool first) instead of all calls pooled.

    Returns:
        Columns [tool,] offset, image_share (mean; a fraction, efficiency: a ratio), std
        (across events, NaN for n = 1), n (events with a measured token at that offset),
        sorted by [tool,] offset; only offsets with an event; empty without events.

    Raises:
        ValueError: window < 1, an events column missing, or as :func:`analysis.metrics.token_shares`.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    by = ["tool"] if by_tool else []
    require_columns(events, ["trajectory", "token", *by], "event_aligned_share events")
    cols = [*by, "offset", "image_share", "std", "n"]
    image = image_token_shares(att, kind)
    if image.empty or events.empty:
        return pd.DataFrame(columns=cols)
    calls = events[["trajectory", "token", *by]].rename(columns={"token": "event"})
    joined = calls.merge(image, on="trajectory")
    joined["offset"] = joined["token"] - joined["event"]
    joined = joined[(joined["offset"] >= -window) & (joined["offset"] < window)]
    stats = joined.groupby([*by, "offset"], sort=True)["image_share"]
    out = stats.agg(image_share="mean", std="std", n="count").reset_index()
    return out.astype({"offset": "int64", "n": "int64"})[cols]


def _clustered_delta(g: pd.DataFrame, n_boot: int, seed: int, ci: float) -> tuple:
    """n_events, n_trajectories, before, after, delta and its clustered-bootstrap interval."""
    if g.empty:
        return (0, 0, *[math.nan] * 5)
    per = g.groupby("trajectory")["delta"].agg(["sum", "count"])
    idx = np.random.default_rng(seed).integers(0, len(per), size=(n_boot, len(per)))
    boot = per["sum"].to_numpy()[idx].sum(1) / per["count"].to_numpy()[idx].sum(1)
    means = (g["before"].mean(), g["after"].mean(), g["delta"].mean())
    return (len(g), len(per), *means, *percentile_interval(boot, ci))


def before_after_ci(
    att: pd.DataFrame,
    events: pd.DataFrame,
    window: int = 8,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    by: Sequence[str] = ("tool",),
    kind: str = "raw",
) -> pd.DataFrame:
    """Mean image share before/after tool calls per ``by`` group and overall, with a clustered
    bootstrap interval of the mean delta.

    delta = mean over events of (after - before) from :func:`before_after`; events with a NaN
    delta (an empty window) are left out. The events of one trajectory are not independent, so
    each of ``n_boot`` draws resamples trajectories with replacement and takes all events of a
    drawn trajectory: delta* = (sum of their deltas) / (number of their events). delta_lo,
    delta_hi = the (1 - ci)/2, (1 + ci)/2 percentiles of the draws. Every group draws from a
    fresh ``numpy.random.default_rng(seed)``, so a group's interval does not depend on the others.

    Args:
        att: long attention table. events: the tool-call events (columns trajectory, token and
            the ``by`` columns). window: tokens per side. n_boot: bootstrap draws. seed: rng seed.
        ci: interval level in (0, 1). by: grouping columns of ``events``. kind: see
            :func:`analysis.metrics.token_shares`.

    Returns:
        Columns *by, n_events, n_trajectories, before, after, delta, delta_lo, delta_hi (shares
        as fractions): one row per group (sorted), then the overall row with "all" in every
        ``by`` column (n_events 0 and NaN means when no event has both windows).

    Raises:
        ValueError: window < 1, n_boot < 1, ci outside (0, 1), a missing events column, or as
            :func:`analysis.metrics.token_shares`.
    """
    check_bootstrap(n_boot, ci)
    require_columns(events, ["trajectory", "token", *by], "before_after_ci events")
    ba = before_after(att, events, window, kind=kind)
    return before_after_summary(ba, by, n_boot, seed, ci)


def before_after_summary(
    ba: pd.DataFrame,
    by: Sequence[str] = ("tool",),
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    *,
    overall: bool = True,
) -> pd.DataFrame:
    """:func:`before_after_ci` of per-event rows already computed (e.g. several arms'
    :func:`before_after` concatenated with an "arm" column): mean before, after and delta per
    ``by`` group, with the clustered bootstrap interval of the mean delta described there.

    Args:
        ba: :func:`before_after` rows: columns trajectory, before, after, delta and ``by``;
            rows with a NaN delta are left out.
        by: grouping columns. n_boot: bootstrap draws. seed: rng seed (fresh per group).
        ci: interval level in (0, 1).
        overall: append the row of all events ("all" in every ``by`` column); with ``by=()``
            that row is the only one either way.

    Returns:
        Columns *by, n_events, n_trajectories, before, after, delta, delta_lo, delta_hi (as in
        :func:`before_after_ci`), one row per group sorted by ``by``, then the overall row.

    Raises:
        ValueError: n_boot < 1, ci outside (0, 1), or a column missing.
    """
    check_bootstrap(n_boot, ci)
    by = list(by)
    require_columns(ba, ["trajectory", "before", "after", "delta", *by], "before_after_summary")
    # rows concatenated by a caller may arrive as object columns (e.g. pandas < 2.1 or tables
    # built by hand); :func:`before_after` itself always returns float64
    ba = ba.astype({"before": "float64", "after": "float64", "delta": "float64"})
    ba = ba.dropna(subset=["delta"])
    groups = list(ba.groupby(by, sort=True)) if by and len(ba) else []
    if overall or not by:
        groups.append((("all",) * len(by), ba))
    cols = ["n_events", "n_trajectories", "before", "after", "delta", "delta_lo", "delta_hi"]
    rows = [(*key, *_clustered_delta(g, n_boot, seed, ci)) for key, g in groups]
    return pd.DataFrame(rows, columns=[*by, *cols])
