"""Pure figure and table builders over the frames of :mod:`analysis.rundir` and
:mod:`analysis.metrics` (no I/O, no Streamlit).

Used by the Streamlit app; every builder takes pandas frames and returns a
``plotly.graph_objects.Figure`` or a display-ready ``DataFrame``. Arms and attention groups
have the names and colours of :mod:`analysis.arms`, as in the paper figures of
:mod:`analysis.figures`; the seeds of one arm share its colour and differ by dash or marker.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.arms import (
    GROUP_COLORS,
    GROUP_LABELS,
    OKABE_ITO,
    arm_colors,
    arm_styles,
    seed_groups,
)
from analysis.events import before_after_summary
from analysis.summaries import seed_band

TOOL_DASH = {"reflect": "dash", "confirm": "dot"}
SEED_DASHES = ("solid", "dash", "dot", "dashdot", "longdash")  # by arm_styles' k
SEED_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x")


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _figure(title: str, x: str, y: str, legend: str | None = None, **layout: object) -> go.Figure:
    """An empty figure with its title, axis titles, legend title and any further layout."""
    fig = go.Figure()
    legend_title = {} if legend is None else {"legend_title_text": legend}
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, **legend_title, **layout)
    return fig


def _no_data(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def training_curves(metrics_df: pd.DataFrame, metric: str) -> go.Figure:
    """One training curve per arm: ``metric`` versus training step.

    Arms that differ only by seed ("X-s0", "X-s1", ...) are drawn as one group: the mean over
    seeds per step (solid line) and a min-max band (filled, two traces without legend entries),
    from :func:`analysis.summaries.seed_band`.
    A single-seed arm is one line named after the arm. Traces per group: 1 or 3. Colours:
    :func:`analysis.arms.arm_colors` of the arm types.

    Args:
        metrics_df: frame of :func:`analysis.rundir.load_metrics`: columns arm, step, metric
            columns ("namespace/name"); NaN values are skipped.
        metric: the column to plot, e.g. "rollout/reward_mean".

    Returns:
        The figure (x: training step, y: the metric in its own unit); an empty figure with a
        note if the metric is not logged.
    """
    fig = _figure(metric, "training step", metric, "arm", hovermode="x unified")
    if metric not in metrics_df.columns or metrics_df[metric].isna().all():
        return _no_data(fig, f"no data for {metric}")
    df = metrics_df[["arm", "step", metric]].dropna(subset=[metric])
    groups = seed_groups(sorted(df["arm"].unique()))
    colors = arm_colors(sorted(groups))
    band = seed_band(df, metric)
    for base in sorted(groups):
        color, arms = colors[base], groups[base]
        if len(arms) == 1:
            g = df[df["arm"] == arms[0]]
            line = dict(color=color)
            fig.add_scatter(x=g["step"], y=g[metric], mode="lines", name=arms[0], line=line)
            continue
        b = band[band["arm_type"] == base]
        x, k = b["step"], len(arms)
        style = dict(mode="lines", line=dict(width=0), showlegend=False, legendgroup=base)
        fig.add_scatter(x=x, y=b["max"], name=f"{base} max", hoverinfo="skip", **style)
        fig.add_scatter(
            x=x, y=b["min"], name=f"{base} min", fill="tonexty", fillcolor=_rgba(color, 0.2),
            hoverinfo="skip", **style,
        )  # fmt: skip
        fig.add_scatter(
            x=x, y=b["mean"], mode="lines", name=f"{base} (mean of {k} seeds)",
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
            Lines are styled by :func:`analysis.arms.arm_styles`: a second seed of an arm dashed.

    Returns:
        The figure (x: generated-token index, y: share of attention on image tokens, in [0, 1]).
        Traces: one per arm, then one per (arm, tool) with events.
    """
    fig = _figure(
        "Attention to images while generating", "generated-token index", "image-attention share",
        "arm",
    )  # fmt: skip
    styles = arm_styles(list(curves))
    for arm, curve in curves.items():
        n = curve.get("n")
        color, k = styles[arm]
        fig.add_scatter(
            x=curve["token"], y=curve["image_share"], mode="lines", name=arm,
            line=dict(color=color, dash=SEED_DASHES[k % len(SEED_DASHES)]), customdata=n,
            hovertemplate="token %{x}<br>image share %{y:.3f}"
            + ("<br>n = %{customdata}" if n is not None else "") + f"<extra>{arm}</extra>",
        )  # fmt: skip
    if events is None or events.empty:
        if not curves:
            _no_data(fig, "no attention measured yet")
        return fig
    _event_lines(fig, events, {arm: color for arm, (color, _) in styles.items()})
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
        generated (names and colours of :mod:`analysis.arms`).
    """
    fig = _figure(
        title or "Attention shares while generating", "generated-token index",
        "share of attention", "keys", yaxis_range=[0, 1],
    )  # fmt: skip
    if share_df.empty:
        return _no_data(fig, "no attention measured yet")
    wide = share_df.pivot_table(index="token", columns="group", values="share", aggfunc="mean")
    order = [g for g in GROUP_LABELS if g in wide] + [g for g in wide if g not in GROUP_LABELS]
    for i, group in enumerate(order):
        color = GROUP_COLORS.get(group, OKABE_ITO[i % len(OKABE_ITO)])
        fig.add_scatter(
            x=wide.index, y=wide[group].fillna(0.0), mode="lines", stackgroup="shares",
            name=GROUP_LABELS.get(group, group), line=dict(width=0.5, color=color),
        )  # fmt: skip
    return fig


def eval_table(eval_df: pd.DataFrame) -> pd.DataFrame:
    """Held-out evaluation summary, one row per arm, numbers rounded to 3 decimals.

    Args:
        eval_df: frame of :func:`analysis.rundir.load_eval`.

    Returns:
        Columns arm, n, accuracy, tool-call rate, {tool}/sample per tool (reflect, confirm, ...),
        "acc: {family}" per task family, model (the columns present), sorted by arm.
        Accuracy and rates are fractions in [0, 1]; per-sample columns are mean calls.
    """
    names = {"arm": "arm", "n": "n", "accuracy": "accuracy", "tool_call_rate": "tool-call rate"}
    tools = [c for c in eval_df.columns if c.startswith("tool_calls/")]  # one per tool, any name
    names |= {c: c.split("/", 1)[1] + "/sample" for c in tools}
    families = sorted(c for c in eval_df.columns if c.startswith("per_family/"))
    names |= {c: "acc: " + c.split("/", 1)[1] for c in families} | {"model": "model"}
    table = eval_df[[c for c in names if c in eval_df.columns]].rename(columns=names)
    if "arm" in table:
        table = table.sort_values("arm", kind="stable", ignore_index=True)
    return table.round(3)


def before_after_table(
    ba: pd.DataFrame, by: Sequence[str] = ("tool",), n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Display table of :func:`analysis.events.before_after_summary` (no overall row): mean
    image share before/after tool calls per ``by`` group with the 95% clustered-bootstrap
    interval of the mean delta (trajectories resampled; a fresh ``default_rng(seed)`` per
    group), columns renamed for reading and numbers rounded to 4 decimals.

    Args:
        ba: frame of :func:`analysis.events.before_after` (columns trajectory, before, after,
            delta and the ``by`` columns, e.g. arm and tool).
        by: grouping columns.
        n_boot: bootstrap draws. seed: generator seed.

    Returns:
        Columns *by, events, trajectories, before, after, delta, delta_lo, delta_hi (shares as
        fractions).

    Raises:
        ValueError: as :func:`analysis.events.before_after_summary`.
    """
    summary = before_after_summary(ba, by, n_boot, seed, overall=False)
    names = {"n_events": "events", "n_trajectories": "trajectories"}
    return summary.rename(columns=names).round(4)


def arm_comparison_figure(final_df: pd.DataFrame, metric: str) -> go.Figure:
    """End-of-training value of ``metric`` per arm: a bar (mean over seeds) with a min-max
    error bar and the seed count in the hover.

    Args:
        final_df: frame of :func:`analysis.summaries.final_metrics` (columns base, metric,
            mean, std, min, max, n_seeds).
        metric: the metric to show.

    Returns:
        The figure, one bar trace (x: arm base, y: the metric in its own unit, bars coloured
        by :func:`analysis.arms.arm_colors`); an empty figure with a note when the metric has
        no rows.
    """
    fig = _figure(f"{metric}: end of training", "arm", metric)
    rows = final_df[final_df["metric"] == metric]
    if rows.empty:
        return _no_data(fig, f"no data for {metric}")
    err = dict(
        type="data", symmetric=False, array=rows["max"] - rows["mean"],
        arrayminus=rows["mean"] - rows["min"],
    )  # fmt: skip
    fig.add_bar(
        x=rows["base"], y=rows["mean"], error_y=err, customdata=rows["n_seeds"], name=metric,
        marker_color=list(arm_colors(list(rows["base"])).values()),
        hovertemplate="%{x}: %{y:.4g}<br>seeds: %{customdata}<extra></extra>",
    )  # fmt: skip
    return fig


def _event_lines(
    fig: go.Figure, events: pd.DataFrame, colors: Mapping[str, str] | None = None
) -> None:
    """Vertical lines at event tokens on a secondary y axis spanning the plot: one trace per
    (arm, tool) ("{tool} calls ({arm})"), or per tool ("{tool} calls") when ``events`` has no
    arm column; dash by tool (:data:`TOOL_DASH`), colour ``colors[arm]`` (grey without)."""
    events = events if "arm" in events else events.assign(arm="")
    for (arm, tool), g in events.groupby(["arm", "tool"], sort=True):
        tokens = np.unique(g["token"].to_numpy())
        x = np.repeat(tokens, 3).astype(float)
        x[2::3] = np.nan  # break the line between calls
        y = np.tile([0.0, 1.0, np.nan], len(tokens))
        name = f"{tool} calls" + (f" ({arm})" if arm else "")
        color = (colors or {}).get(arm, "grey")
        fig.add_scatter(
            x=x, y=y, mode="lines", yaxis="y2", name=name, opacity=0.6, hoverinfo="skip",
            line=dict(color=color, dash=TOOL_DASH.get(tool, "dashdot"), width=1),
            connectgaps=False,
        )  # fmt: skip
    fig.update_layout(yaxis2=dict(overlaying="y", range=[0, 1], visible=False))


def per_image_figure(image_df: pd.DataFrame, events: pd.DataFrame, title: str = "") -> go.Figure:
    """Attention share of each image of one trajectory versus generated-token index, with the
    tool calls marked.

    Args:
        image_df: rows of one trajectory from :func:`analysis.metrics.image_shares` (columns
            token, image, origin, share).
        events: that trajectory's tool-call events (columns token, tool).
        title: figure title.

    Returns:
        The figure: one line per image ("image k (origin)", x: generated-token index, y: share
        in [0, 1]), then one trace of vertical lines per tool.
    """
    fig = _figure(
        title or "Attention to each image", "generated-token index", "share of attention", "image"
    )
    if image_df.empty:
        return _no_data(fig, "no attention measured for this trajectory")
    for i, ((k, origin), g) in enumerate(image_df.groupby(["image", "origin"], sort=True)):
        fig.add_scatter(
            x=g["token"], y=g["share"], mode="lines+markers", name=f"image {k} ({origin})",
            line=dict(color=OKABE_ITO[i % len(OKABE_ITO)]), marker=dict(size=4),
        )  # fmt: skip
    if len(events):
        _event_lines(fig, events)
    return fig


def event_aligned_figure(aligned: Mapping[str, pd.DataFrame]) -> go.Figure:
    """Image share against the token offset from a tool call, one line per (arm, tool), the
    call's result at offset 0 (a vertical line).

    Args:
        aligned: arm -> frame of ``analysis.events.event_aligned_share(..., by_tool=True)``
            (columns tool, offset, image_share, n).

    Returns:
        The figure (x: tokens from the call's result, y: image-attention share): colour by
        arm (:func:`analysis.arms.arm_styles`; seeds of one arm by marker), dash by tool.
    """
    fig = _figure(
        "Image share around tool calls", "tokens from the tool result", "image-attention share",
        "arm, tool",
    )  # fmt: skip
    fig.add_vline(x=-0.5, line_dash="dot", line_color="grey")
    styles = arm_styles(list(aligned))
    drawn = 0
    for arm, df in aligned.items():
        color, k = styles[arm]
        for tool, g in df.groupby("tool", sort=True):
            fig.add_scatter(
                x=g["offset"], y=g["image_share"], mode="lines+markers", name=f"{arm}, {tool}",
                line=dict(color=color, dash=TOOL_DASH.get(tool, "solid")),
                marker=dict(symbol=SEED_SYMBOLS[k % len(SEED_SYMBOLS)]), customdata=g["n"],
                hovertemplate="offset %{x}: %{y:.3f}<br>n = %{customdata}",
            )  # fmt: skip
            drawn += 1
    if drawn == 0:
        _no_data(fig, "no tool calls in the measured trajectories")
    return fig


def head_heatmap(heads: pd.DataFrame, title: str = "") -> go.Figure:
    """Mean image share of every (layer, head) as a heatmap.

    Args:
        heads: frame of :func:`analysis.metrics.head_shares` (columns layer, head, image_share).
        title: figure title.

    Returns:
        The figure (x: head, y: layer, colour: image share).
    """
    fig = _figure(title or "Image share per head", "head", "layer")
    if heads.empty:
        return _no_data(fig, "no attention measured yet")
    wide = heads.pivot_table(index="layer", columns="head", values="image_share")
    fig.add_heatmap(
        z=wide.to_numpy(), x=wide.columns, y=wide.index, colorscale="Viridis",
        colorbar=dict(title="image share"),
        hovertemplate="layer %{y}, head %{x}: %{z:.3f}<extra></extra>",
    )  # fmt: skip
    return fig


def band_figure(bands: pd.DataFrame, title: str = "") -> go.Figure:
    """Image share versus generated-token index per layer band (early / middle / late).

    Args:
        bands: frame of :func:`analysis.metrics.band_shares` (columns band, token, image_share).
        title: figure title.

    Returns:
        The figure, one line per band in band order.
    """
    fig = _figure(
        title or "Image share by layer band", "generated-token index", "image-attention share",
        "layers",
    )  # fmt: skip
    if bands.empty:
        return _no_data(fig, "no attention measured yet")
    for i, (band, g) in enumerate(bands.groupby("band", sort=True, observed=True)):
        fig.add_scatter(
            x=g["token"], y=g["image_share"], mode="lines", name=str(band),
            line=dict(color=OKABE_ITO[i % len(OKABE_ITO)]),
        )  # fmt: skip
    return fig


def image_figure(
    pixels: np.ndarray, boxes: pd.DataFrame | None = None, title: str = ""
) -> go.Figure:
    """An image with rectangles drawn on it (crop boxes of tool calls).

    Args:
        pixels: ``[height, width, 3]`` uint8 RGB.
        boxes: columns x0, y0, x1, y1 (pixels, origin top left), label; may be None or empty.
        title: figure title.

    Returns:
        The figure: one image trace, one rectangle shape and one label annotation per box.

    Raises:
        ValueError: ``pixels`` is not ``[height, width, 3]``.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image_figure: pixels must be [height, width, 3], got {pixels.shape}")
    fig = go.Figure(go.Image(z=pixels))
    fig.update_layout(title=title, margin=dict(l=0, r=0, t=30 if title else 0, b=0))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    for i, b in enumerate((boxes if boxes is not None else pd.DataFrame()).itertuples()):
        color = OKABE_ITO[(i + 1) % len(OKABE_ITO)]
        fig.add_shape(
            type="rect", x0=b.x0, y0=b.y0, x1=b.x1, y1=b.y1, line=dict(color=color, width=2)
        )
        fig.add_annotation(
            x=b.x0, y=b.y0, text=b.label, showarrow=False, xanchor="left", yanchor="bottom",
            font=dict(color=color, size=10), bgcolor="rgba(255,255,255,0.7)",
        )  # fmt: skip
    return fig


ROLE_STYLE = {
    "prompt": "color:#555",
    "observation": "color:#555;font-style:italic",
    "image": "background:#ddd;border-radius:3px",
    "generated": "",
}


def token_html(tokens: pd.DataFrame, color: str = "255,127,14") -> str:
    """HTML of a trajectory's tokens, each generated token tinted by its image-attention share.

    Background alpha = image_share / max(image_share) over the shown tokens (the hover title
    gives the share itself); prompt and observation text grey (observations italic), images
    as grey chips. Text is HTML-escaped; newlines are kept (``white-space: pre-wrap``).

    Args:
        tokens: :func:`analysis.trajview.with_shares` frame (columns text, role, token,
            image_share).
        color: "r,g,b" of the tint.

    Returns:
        One ``<div>`` of ``<span>`` elements.
    """
    shares = tokens["image_share"].to_numpy("float64")
    top = np.nanmax(shares) if np.isfinite(shares).any() else 1.0
    top = top if top > 0 else 1.0
    spans = []
    for text, role, t, s in zip(tokens["text"], tokens["role"], tokens["token"], shares):
        styles = [ROLE_STYLE[role]] if ROLE_STYLE.get(role) else []
        tip = f"{role}"
        if role == "generated" and np.isfinite(s):
            styles.append(f"background:rgba({color},{s / top:.3f})")
            tip = f"token {t}: image share {s:.3f}"
        style = ";".join(styles)  # no empty declaration: React's style parser drops the lot
        spans.append(f'<span style="{style}" title="{tip}">{html.escape(text)}</span>')
    body = "".join(spans)
    return f'<div style="white-space:pre-wrap;font-family:monospace;line-height:1.6">{body}</div>'
