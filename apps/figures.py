"""Server-side PNG export: the paper-style matplotlib builder of :mod:`analysis.figures` that
draws each app view, rendered to PNG bytes only when the user clicks the download (Streamlit
calls the returned zero-argument callable). Plotly's own modebar still saves a PNG of the
interactive chart in the browser.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from analysis import figures

# analysis.figures applies its style with matplotlib.rc_context, which is process-wide: build
# one figure at a time (Streamlit runs download callables on their own threads).
_LOCK = threading.Lock()


def _deferred(build: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], bytes]:
    """A zero-argument callable: ``build(*args, **kwargs)`` as PNG bytes, built under the lock."""

    def png() -> bytes:
        with _LOCK:
            return figures.to_png_bytes(build(*args, **kwargs))

    return png


def training_png(data: pd.DataFrame, metric: str) -> Callable[[], bytes]:
    """One training-curve panel (mean over seeds, min-max band) of ``metric``.

    Args:
        data: columns arm, step, ``metric`` (already smoothed as shown).
    """
    return _deferred(figures.training_curves_figure, data, [metric], smooth=1, ncols=1)


def decay_png(
    curves: Mapping[str, pd.DataFrame], fits: Mapping[str, Mapping[str, float]]
) -> Callable[[], bytes]:
    """The image-share decay curves with their exponential fits.

    Args:
        curves: line name -> columns token, image_share[, n]. fits: line name ->
            :func:`analysis.decay.decay_fit` dict.
    """
    return _deferred(figures.image_share_figure, dict(curves), dict(fits))


def shares_png(shares: pd.DataFrame, model: str, setting: str) -> Callable[[], bytes]:
    """Figure-1 shares of one model in one setting ("all", "single-image", "multi-image").

    Args:
        shares: columns token, group, share, std, n (:func:`analysis.metrics.mean_by_token`).
    """
    return _deferred(figures.attention_shares_figure, {model: {setting: shares}})


def tool_call_png(
    aligned: Mapping[str, pd.DataFrame], summary: pd.DataFrame
) -> Callable[[], bytes]:
    """Image share aligned on tool calls and the after - before change per arm.

    Args:
        aligned: arm -> columns offset, image_share (``analysis.events.event_aligned_share``
            with the tools pooled).
        summary: :func:`analysis.events.before_after_summary` with ``by=("arm",)`` (columns
            arm, n_events, n_trajectories, before, after, delta, delta_lo, delta_hi).
    """
    if summary.empty:
        summary = pd.DataFrame(columns=["arm", "n_events", "n_trajectories", "delta"])
    return _deferred(figures.tool_call_figure, dict(aligned), summary)
