"""Paper figures as matplotlib figures (no I/O but :func:`save`).

Every builder takes the frames of :mod:`analysis.rundir` and :mod:`analysis.metrics` and returns
a ``matplotlib.figure.Figure`` drawn in one shared style (:data:`STYLE`, applied by
:func:`figure_style` while the figure is built and saved; importing this module changes no global
state, and pyplot is never used, so figures are not kept alive by a global figure manager and
need no closing). ``matplotlib.rc_context`` is process-wide while a figure is built or saved, so
do not build figures from several threads at once. Arms are named, ordered, labelled and
coloured by :mod:`analysis.arms`, as in the app's plotly views.
``python -m experiments.figures`` composes them from run directories (with the ablation table of
:mod:`analysis.tables`); the app can call :func:`to_png_bytes` on any of them.

Figures (IMAgent, Dong et al., arXiv 2512.08980, Figure 1, and docs/method.md §6):

- :func:`attention_shares_figure`: shares of attention to text, images, generated tokens (and
  tool text) versus generated-token index; rows = models (base, trained), columns = settings
  (single image, multi image).
- :func:`image_share_figure`: the image-share decay curve of every arm, with its exponential fit.
- :func:`tool_call_figure`: image share aligned on tool calls, and the after - before change.
- :func:`training_curves_figure`: training metrics per arm, mean over seeds and min-max band.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis import rundir
from analysis.arms import (
    GROUP_COLORS,
    GROUP_LABELS,
    OKABE_ITO,
    arm_colors,
    arm_label,
    arm_styles,
    arm_type,
    order_arms,
)
from analysis.metrics import GROUPS
from analysis.summaries import seed_band, smooth_metrics

STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: identical glyphs on every machine
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.5, "lines.linewidth": 1.5,
    "axes.prop_cycle": cycler(color=OKABE_ITO), "figure.dpi": 100, "savefig.dpi": 200,
    "savefig.bbox": "tight", "savefig.pad_inches": 0.02, "pdf.fonttype": 42, "ps.fonttype": 42,  # TrueType in the PDF: editable, accepted by venues
}  # fmt: skip
"""The shared rcParams of every relook figure (applied by :func:`figure_style`)."""

# Panel titles of the Figure-1 settings (analysis.metrics.SETTINGS).
SETTING_LABELS = {"single-image": "single image", "multi-image": "multi image"}
FORMATS = ("pdf", "png", "svg")
# Line style of the k-th name of one arm type (analysis.arms.arm_styles): seeds drawn apart.
SEED_LINESTYLES = ("-", ":", "-.", (0, (6, 1, 1, 1)))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
F = TypeVar("F", bound=Callable[..., Any])


# Style and saving


@contextmanager
def figure_style() -> Iterator[None]:
    """Apply :data:`STYLE` (``matplotlib.rc_context``) inside the block; restored on exit."""
    with matplotlib.rc_context(STYLE):
        yield


def _styled(builder: F) -> F:
    """Run a figure builder inside :func:`figure_style` (rcParams are read when artists are made)."""

    @wraps(builder)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with figure_style():
            return builder(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _new_figure(nrows: int, ncols: int, width: float, height: float, **kw: Any):
    """A constrained-layout Figure (no pyplot) and its [nrows, ncols] axes array."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def to_png_bytes(fig: Figure, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes (``savefig.dpi`` of :data:`STYLE` unless ``dpi`` is given)."""
    buf = io.BytesIO()
    with figure_style():
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save(
    fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = ("pdf", "png")
) -> list[Path]:
    """Write ``out_dir/name.{fmt}`` for every format, each atomically (temp file beside it, then
    ``os.replace``), in :data:`STYLE`; PDFs carry no creation date, so reruns are byte-stable.

    Args:
        fig: the figure. out_dir: created if missing. name: file stem (letters, digits, _ . -).
        formats: any of :data:`FORMATS`.

    Returns:
        The written paths, in ``formats`` order.

    Raises:
        ValueError: an unknown format or a bad name.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    if not _NAME.match(name):
        raise ValueError(f"bad figure name {name!r}: use letters, digits and _ . - only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}
    paths = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        with rundir.atomic_file(path) as f, figure_style():
            fig.savefig(f, format=fmt, metadata=metadata.get(fmt))
        paths.append(path)
    return paths


def _truncate(df: pd.DataFrame, min_trajectories: int) -> pd.DataFrame:
    """Rows reached by at least ``min_trajectories`` trajectories (column n); all if no n."""
    return df[df["n"] >= min_trajectories] if "n" in df.columns else df


# Figures


@_styled
def attention_shares_figure(
    shares: Mapping[str, Mapping[str, pd.DataFrame]], *, min_trajectories: int = 1
) -> Figure:
    """Figure 1 of IMAgent: share of attention to text, images and generated tokens versus the
    generated-token index, one panel per (model, setting).

    Each panel draws one line per group of :data:`analysis.metrics.GROUPS` in that order (tool
    text only where it is ever above 0), the mean over trajectories, with a +/- 1 standard
    error band (std / sqrt(n), where n > 1); tokens reached by fewer than ``min_trajectories``
    trajectories are cut. The panel notes its number of trajectories. A panel without data
    says so.

    Args:
        shares: row label (e.g. "base (no RL)") -> setting (a key of
            :data:`SETTING_LABELS`, e.g. "single-image", shown as "single image"; or any label)
            -> frame of ``share_by_token(att, ("group",))`` (columns token, group, share, std,
            n). The columns are the union of the inner keys, in first-seen order.
        min_trajectories: fewest trajectories a plotted token needs (>= 1).

    Returns:
        Figure with a [rows, columns] grid of axes (a single row, one panel per model, when
        there is one column), x: generated-token index, y: share in [0, 1]; one figure legend.

    Raises:
        ValueError: no rows, or min_trajectories < 1.
    """
    if not shares or min_trajectories < 1:
        raise ValueError(
            f"need >= 1 row and min_trajectories >= 1, got {len(shares)} rows, "
            f"min_trajectories={min_trajectories}"
        )
    columns = list(dict.fromkeys(c for row in shares.values() for c in row))
    one_row = len(columns) == 1  # one setting: the models side by side
    shape = (1, len(shares)) if one_row else (len(shares), len(columns))
    fig, axes = _new_figure(
        *shape, 3.3 * shape[1], 2.4 * shape[0] + 0.6, sharey=True, sharex=True if one_row else "col"
    )
    handles: dict[str, Any] = {}
    for i, (row, panels) in enumerate(shares.items()):
        for k, col in enumerate(columns):
            ax = axes[0, i] if one_row else axes[i, k]
            ax.set_title(f"{row} · {SETTING_LABELS.get(col, col)}")
            df = panels.get(col, pd.DataFrame(columns=["token", "group", "share"]))
            df = _truncate(df, min_trajectories)
            if df.empty:
                _no_data(ax, f"no {col} trajectories")
            else:
                handles |= _share_lines(ax, df)
            ax.set_ylim(0, 1)
            if one_row or i == len(shares) - 1:
                ax.set_xlabel("generated-token index")
            if (i if one_row else k) == 0:
                ax.set_ylabel("share of attention")
    if handles:
        fig.legend(
            list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles)
        )
    return fig


def _share_lines(ax: Axes, df: pd.DataFrame) -> dict[str, Any]:
    """Draw one group line (+ s.e. band) per group; return legend label -> line."""
    wide = df.pivot_table(index="token", columns="group", values="share", aggfunc="mean")
    n = df.groupby("token")["n"].max() if "n" in df else None
    std = None
    if "std" in df:  # NaN (kept, as a gap in the band) where one trajectory reaches the token
        std = df.pivot(index="token", columns="group", values="std").reindex(wide.index)
    out = {}
    for group in [g for g in GROUPS if g in wide] + [g for g in wide if g not in GROUPS]:
        y = wide[group]
        if group == "tool_text" and not (y > 0).any():
            continue
        label = GROUP_LABELS.get(group, group)
        (line,) = ax.plot(wide.index, y, color=GROUP_COLORS.get(group), label=label)
        if std is not None and n is not None and group in std:
            se = (std[group] / np.sqrt(n.reindex(wide.index))).astype("float64")
            ax.fill_between(wide.index, y - se, y + se, color=line.get_color(), alpha=0.15, lw=0)
        out[label] = line
    if n is not None:
        ax.text(
            0.98,
            0.95,
            f"n = {int(n.max())} traj.",
            ha="right",
            va="top",
            transform=ax.transAxes,
            fontsize=7,
            color="0.3",
        )
    return out


@_styled
def image_share_figure(
    curves: Mapping[str, pd.DataFrame],
    fits: Mapping[str, Mapping[str, float]] | None = None,
    *,
    min_trajectories: int = 1,
) -> Figure:
    """Visual-attention decay: image share versus generated-token index, one line per arm, with
    the fitted exponential s0 * 2^(-t / half_life) dashed beside it. Names of one arm type
    (its seeds, drawn apart) share the arm's colour, told apart by :data:`SEED_LINESTYLES`.

    Args:
        curves: arm type -> frame of :func:`analysis.metrics.image_share_curve` (columns token,
            image_share, optionally n), drawn in the given order.
        fits: arm type -> :func:`analysis.decay.decay_fit` dict (s0, half_life_tokens); an arm
            with a finite half-life and s0 gets a dashed fit line over its token range, and its
            legend entry names the half-life ("no decay" for an infinite one).
        min_trajectories: tokens reached by fewer trajectories (column n) are cut.

    Returns:
        One-axes figure (x: generated-token index, y: image share in [0, 1]); Line2D per arm,
        plus one per drawn fit.
    """
    fig, axes = _new_figure(1, 1, 4.8, 3.2)
    ax = axes[0, 0]
    ax.set(xlabel="generated-token index", ylabel="share of attention on images")
    ax.set_title("Attention to images while generating")
    fits = fits or {}
    styles = arm_styles(list(curves))
    drawn = 0
    for arm, curve in curves.items():
        curve = _truncate(curve, min_trajectories)
        if curve.empty:
            continue
        (color, k), label = styles[arm], arm_label(arm)
        fit = fits.get(arm, {})
        half, s0 = fit.get("half_life_tokens", math.nan), fit.get("s0", math.nan)
        if math.isinf(half):
            label += ", no decay"
        elif not math.isnan(half):
            label += f", t½ = {half:.0f} tok."
        ls = SEED_LINESTYLES[k % len(SEED_LINESTYLES)]
        ax.plot(curve["token"], curve["image_share"], color=color, ls=ls, label=label)
        if math.isfinite(half) and math.isfinite(s0):
            t = np.linspace(curve["token"].min(), curve["token"].max(), 100)
            ax.plot(t, s0 * 2.0 ** (-t / half), color=color, ls="--", lw=1, alpha=0.8)
        drawn += 1
    if drawn:
        ax.legend(loc="upper right")
        ax.set_ylim(bottom=0)
    else:
        _no_data(ax, "no attention measured")
    return fig


@_styled
def tool_call_figure(aligned: Mapping[str, pd.DataFrame], before_after: pd.DataFrame) -> Figure:
    """Image attention around tool calls: (a) image share aligned on the call, one line per arm
    (vertical line at offset 0, the first policy token after the tool result); (b) the mean
    change after - before per arm with its clustered-bootstrap interval.

    Args:
        aligned: arm type -> frame of :func:`analysis.events.event_aligned_share` (columns
            offset, image_share).
        before_after: one row per arm type: column arm plus the overall-row columns of
            :func:`analysis.events.before_after_ci` (n_events, n_trajectories, before, after,
            delta, delta_lo, delta_hi); rows with n_events 0 are left out, and an arm whose
            calls come from one trajectory gets no error bar.

    Returns:
        Two-axes figure. Panel (a): Line2D per arm, then the offset-0 line; panel (b): one bar
        per arm (height delta) with error bars delta_lo..delta_hi and a zero line.
    """
    fig, axes = _new_figure(1, 2, 8.0, 3.2)
    ax, bx = axes[0]
    ax.set(
        xlabel="tokens from the tool result (0 = first token after it)",
        ylabel="share of attention on images",
        title="(a) image share around tool calls",
    )
    ba = before_after[before_after["n_events"] > 0] if len(before_after) else before_after
    styles = arm_styles(list(dict.fromkeys([*aligned, *ba.get("arm", [])])))
    drawn = [arm for arm, df in aligned.items() if len(df)]
    for arm in drawn:
        df, (color, k) = aligned[arm], styles[arm]
        ls = SEED_LINESTYLES[k % len(SEED_LINESTYLES)]
        ax.plot(df["offset"], df["image_share"], color=color, ls=ls, label=arm_label(arm))
    if drawn:
        ax.axvline(0, color="0.3", lw=0.8, ls=":")
        ax.legend(loc="best")
    else:
        _no_data(ax, "no tool calls measured")
    bx.set(ylabel="image share after − before", title="(b) change after a tool call")
    if ba.empty:
        _no_data(bx, "no tool calls measured")
        return fig
    x = np.arange(len(ba))
    delta = ba["delta"].to_numpy("float64")
    err = np.vstack(
        [delta - ba["delta_lo"].to_numpy("float64"), ba["delta_hi"].to_numpy("float64") - delta]
    )
    if "n_trajectories" in ba:  # one trajectory: the bootstrap has nothing to resample
        err[:, ba["n_trajectories"].to_numpy() < 2] = np.nan
    bx.bar(x, delta, yerr=err, capsize=3, color=[styles[a][0] for a in ba["arm"]], width=0.6)
    bx.axhline(0, color="0.3", lw=0.8)
    ticks = [f"{arm_label(a)}\n{n} call{'s' * (n != 1)}" for a, n in zip(ba["arm"], ba["n_events"])]
    bx.set_xticks(x, ticks)
    return fig


DEFAULT_TRAINING_METRICS = (
    "rollout/reward_mean",
    "rollout/acc_mean",
    "rollout/tool_used_frac",
    "rollout/response_length",
    "mask/trajectory_frac",
    "actor/clipfrac",
)


@_styled
def training_curves_figure(
    metrics_df: pd.DataFrame,
    metrics: Sequence[str] = DEFAULT_TRAINING_METRICS,
    *,
    smooth: int = 1,
    ncols: int = 3,
) -> Figure:
    """Training curves: one panel per metric, one line per arm type (mean over its seeds per
    step) with a min-max band over seeds (:func:`analysis.summaries.seed_band`).

    Each seed's curve is first smoothed by :func:`analysis.summaries.smooth_metrics`, a trailing
    rolling mean over its last ``smooth`` logged steps (1 = raw), as the app smooths.

    Args:
        metrics_df: frame of :func:`analysis.rundir.load_metrics` (columns arm, step, metrics);
            a column "run" (several run directories) makes (run, arm) the seed replicate.
        metrics: the columns to draw; those not logged (absent or all NaN) are left out.
        smooth: rolling window in steps, >= 1. ncols: panels per row.

    Returns:
        Figure with one axes per drawn metric (x: training step, y: the metric in its unit),
        Line2D per arm type in :func:`analysis.arms.order_arms` order, coloured by
        :func:`analysis.arms.arm_colors`; one figure legend.

    Raises:
        ValueError: smooth < 1 or ncols < 1, or none of ``metrics`` is logged.
    """
    if smooth < 1 or ncols < 1:
        raise ValueError(f"need smooth >= 1 and ncols >= 1, got {smooth=}, {ncols=}")
    present = [m for m in metrics if m in metrics_df and metrics_df[m].notna().any()]
    if not present:
        raise ValueError(f"none of the metrics {list(metrics)} is logged")
    nrows = math.ceil(len(present) / ncols)
    ncols = min(ncols, len(present))
    fig, axes = _new_figure(nrows, ncols, 3.0 * ncols, 2.3 * nrows + 0.4, sharex=True)
    rep = ["run", "arm"] if "run" in metrics_df else ["arm"]
    df = smooth_metrics(metrics_df, present, smooth, keys=rep)
    arms = order_arms(df["arm"].map(arm_type))
    colors = arm_colors(arms)
    handles: dict[str, Any] = {}
    for ax, metric in zip(axes.flat, present):
        ax.set_title(metric)
        band = seed_band(df, metric, rep)
        for arm in arms:
            b = band[band["arm_type"] == arm]
            if b.empty:
                continue
            (line,) = ax.plot(b["step"], b["mean"], color=colors[arm])
            k = int(b["n_seeds"].max())
            if k > 1:
                ax.fill_between(b["step"], b["min"], b["max"], color=colors[arm], alpha=0.15, lw=0)
            handles.setdefault(f"{arm_label(arm)} ({k} seed{'s' * (k != 1)})", line)
    for ax in axes.flat[len(present) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncols=min(len(handles), 5),
    )
    return fig
