"""Pure figure and table builders over the frames of :mod:`analysis.rundir` and
:mod:`analysis.metrics` (no I/O, no Streamlit).

Used by the Streamlit app, the notebook and ``experiments.figures``; every builder takes pandas
frames and returns a ``plotly.graph_objects.Figure`` or a display-ready ``DataFrame``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

PALETTE = qualitative.Plotly
# Figure-1 stacking order, bottom to top, with display names.
GROUP_LABELS = {
    "text": "text",
    "tool_text": "tool text",
    "image": "image",
    "generated": "generated",
}
TOOL_DASH = {"reflect": "dash", "confirm": "dot"}
_SEED = re.compile(r"-s\d+$")


def arm_base(arm: str) -> str:
    """Arm name without its seed suffix: "full-s1" -> "full"; names without one are unchanged."""
    return _SEED.sub("", arm)


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _no_data(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def training_curves(metrics_df: pd.DataFrame, metric: str) -> go.Figure:
    """One training curve per arm: ``metric`` versus training step.

    Arms that differ only by seed ("X-s0", "X-s1", ...) are drawn as one group: the mean over
    seeds per step (solid line) and a min-max band (filled, two traces without legend entries).
    A single-seed arm is one line named after the arm. Traces per group: 1 or 3.

    Args:
        metrics_df: frame of :func:`analysis.rundir.load_metrics`: columns arm, step, metric
            columns ("namespace/name"); NaN values are skipped.
        metric: the column to plot, e.g. "rollout/reward_mean".

    Returns:
        The figure (x: training step, y: the metric in its own unit); an empty figure with a
        note if the metric is not logged.
    """
    fig = go.Figure()
    fig.update_layout(title=metric, xaxis_title="training step", yaxis_title=metric)
    fig.update_layout(hovermode="x unified", legend_title_text="arm")
    if metric not in metrics_df.columns or metrics_df[metric].isna().all():
        return _no_data(fig, f"no data for {metric}")
    df = metrics_df[["arm", "step", metric]].dropna(subset=[metric])
    df = df.assign(base=df["arm"].map(arm_base))
    for i, (base, group) in enumerate(df.groupby("base", sort=True)):
        color = PALETTE[i % len(PALETTE)]
        arms = sorted(group["arm"].unique())
        if len(arms) == 1:
            line = dict(color=color)
            fig.add_scatter(x=group["step"], y=group[metric], mode="lines", name=arms[0], line=line)
            continue
        wide = group.pivot_table(index="step", columns="arm", values=metric, aggfunc="mean")
        x, k = wide.index, len(arms)
        band = dict(mode="lines", line=dict(width=0), showlegend=False, legendgroup=base)
        fig.add_scatter(x=x, y=wide.max(axis=1), name=f"{base} max", hoverinfo="skip", **band)
        fig.add_scatter(
            x=x, y=wide.min(axis=1), name=f"{base} min", fill="tonexty",
            fillcolor=_rgba(color, 0.2), hoverinfo="skip", **band,
        )  # fmt: skip
        fig.add_scatter(
            x=x, y=wide.mean(axis=1), mode="lines", name=f"{base} (mean of {k} seeds)",
            line=dict(color=color), legendgroup=base,
        )  # fmt: skip
    return fig


def image_share_figure(
    curves: Mapping[str, pd.DataFrame], events: pd.DataFrame | None = None
) -> go.Figure:
    """Image-attention share versus generated-token index, one line per arm, tool calls marked.

    Args:
        curves: arm -> frame of :func:`analysis.metrics.image_share_curve` (columns token,
            image_share, optionally n = trajectories reaching the token).
        events: tool-call events (columns token, tool, optionally arm). Each distinct
            (arm, tool) becomes one trace of vertical lines spanning the plot height at the
            call tokens (dashed for reflect, dotted for confirm), coloured like its arm.

    Returns:
        The figure (x: generated-token index, y: share of attention on image tokens, in [0, 1]).
        Traces: one per arm, then one per (arm, tool) with events.
    """
    fig = go.Figure()
    fig.update_layout(
        title="Attention to images while generating", xaxis_title="generated-token index",
        yaxis_title="image-attention share", legend_title_text="arm",
    )  # fmt: skip
    colors = {arm: PALETTE[i % len(PALETTE)] for i, arm in enumerate(curves)}
    for arm, curve in curves.items():
        n = curve.get("n")
        fig.add_scatter(
            x=curve["token"], y=curve["image_share"], mode="lines", name=arm,
            line=dict(color=colors[arm]), customdata=n,
            hovertemplate="token %{x}<br>image share %{y:.3f}"
            + ("<br>n = %{customdata}" if n is not None else "") + f"<extra>{arm}</extra>",
        )  # fmt: skip
    if events is None or events.empty:
        if not curves:
            _no_data(fig, "no attention measured yet")
        return fig
    events = events if "arm" in events else events.assign(arm="")
    for (arm, tool), g in events.groupby(["arm", "tool"], sort=True):
        tokens = np.unique(g["token"].to_numpy())
        x = np.repeat(tokens, 3).astype(float)
        x[2::3] = np.nan  # break the line between calls
        y = np.tile([0.0, 1.0, np.nan], len(tokens))
        name = f"{tool} calls" + (f" ({arm})" if arm else "")
        line = dict(color=colors.get(arm, "grey"), dash=TOOL_DASH.get(tool, "dashdot"), width=1)
        fig.add_scatter(
            x=x, y=y, mode="lines", yaxis="y2", name=name, line=line, opacity=0.6,
            hoverinfo="skip", connectgaps=False,
        )  # fmt: skip
    fig.update_layout(yaxis2=dict(overlaying="y", range=[0, 1], visible=False))
    return fig


def stacked_shares_figure(share_df: pd.DataFrame, title: str = "") -> go.Figure:
    """Figure-1 style stacked areas: attention shares of text, tool text, image and generated
    tokens versus generated-token index (they sum to 1 per token).

    Args:
        share_df: frame of :func:`analysis.metrics.share_by_token` with ``by=("group",)``:
            columns token, group, share.
        title: figure title (e.g. the arm).

    Returns:
        The figure, one stacked trace per group present, bottom to top text, tool text, image,
        generated.
    """
    fig = go.Figure()
    fig.update_layout(
        title=title or "Attention shares while generating", xaxis_title="generated-token index",
        yaxis=dict(title="share of attention", range=[0, 1]), legend_title_text="keys",
    )  # fmt: skip
    if share_df.empty:
        return _no_data(fig, "no attention measured yet")
    wide = share_df.pivot_table(index="token", columns="group", values="share", aggfunc="mean")
    order = [g for g in GROUP_LABELS if g in wide] + [g for g in wide if g not in GROUP_LABELS]
    for i, group in enumerate(order):
        fig.add_scatter(
            x=wide.index, y=wide[group].fillna(0.0), mode="lines", stackgroup="shares",
            name=GROUP_LABELS.get(group, group), line=dict(width=0.5, color=PALETTE[i % 10]),
        )  # fmt: skip
    return fig


def eval_table(eval_df: pd.DataFrame) -> pd.DataFrame:
    """Held-out evaluation summary, one row per arm, numbers rounded to 3 decimals.

    Args:
        eval_df: frame of :func:`analysis.rundir.load_eval`.

    Returns:
        Columns arm, n, accuracy, tool-call rate, reflect/sample, confirm/sample,
        "acc: {family}" per task family, model (the columns present), sorted by arm.
        Accuracy and rates are fractions in [0, 1]; per-sample columns are mean calls.
    """
    names = {
        "arm": "arm", "n": "n", "accuracy": "accuracy", "tool_call_rate": "tool-call rate",
        "tool_calls/reflect": "reflect/sample", "tool_calls/confirm": "confirm/sample",
    }  # fmt: skip
    families = sorted(c for c in eval_df.columns if c.startswith("per_family/"))
    names |= {c: "acc: " + c.split("/", 1)[1] for c in families} | {"model": "model"}
    table = eval_df[[c for c in names if c in eval_df.columns]].rename(columns=names)
    if "arm" in table:
        table = table.sort_values("arm", kind="stable", ignore_index=True)
    return table.round(3)


def before_after_table(
    ba: pd.DataFrame, by: Sequence[str] = ("tool",), n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Mean image share before/after tool calls per ``by`` group, with a 95% bootstrap interval.

    delta = mean over events of (after - before). The interval resamples trajectories with
    replacement (events of one trajectory are not independent): per draw, delta* = sum of
    deltas / number of events over the drawn trajectories; delta_lo, delta_hi = 2.5th, 97.5th
    percentiles of ``n_boot`` draws. Events with a NaN delta are left out.

    Args:
        ba: frame of :func:`analysis.metrics.before_after` (columns trajectory, before, after,
            delta and the ``by`` columns, e.g. arm and tool).
        by: grouping columns.
        n_boot: bootstrap draws. seed: generator seed.

    Returns:
        Columns *by, events, trajectories, before, after, delta, delta_lo, delta_hi (shares as
        fractions), rounded to 4 decimals.
    """
    by = list(by)
    cols = ["events", "trajectories", "before", "after", "delta", "delta_lo", "delta_hi"]
    ba = ba.dropna(subset=["delta"])
    rng = np.random.default_rng(seed)
    rows = []
    for key, g in ba.groupby(by, sort=True) if len(ba) else ():
        per = g.groupby("trajectory")["delta"].agg(["sum", "count"])
        idx = rng.integers(0, len(per), size=(n_boot, len(per)))
        boot = per["sum"].to_numpy()[idx].sum(1) / per["count"].to_numpy()[idx].sum(1)
        means = (g["before"].mean(), g["after"].mean(), g["delta"].mean())
        rows.append((*key, len(g), len(per), *means, *np.percentile(boot, [2.5, 97.5])))
    return pd.DataFrame(rows, columns=[*by, *cols]).round(4)
