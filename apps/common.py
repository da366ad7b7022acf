"""Shared pieces of the relook app's pages: the open runs, cached readers and reductions, error
boxes and downloads.

Every value shown comes from :mod:`analysis` (readers in :mod:`analysis.rundir`, reductions in
:mod:`analysis.metrics` / :mod:`analysis.summaries` / :mod:`analysis.trajview`, figures in
:mod:`analysis.plots`, PNG exports in :mod:`apps.figures`); this module only caches them and lays them out. Caches are keyed by the
run path and its modification stamp (:func:`analysis.rundir.run_stamp`), so a run still being
written is re-read when its files change.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from analysis import metrics, rundir, trajview
from analysis.events import before_after, event_aligned_share

DEFAULT_RUN = "runs/latest"
CONTEXT_KEY = "relook_context"
READ_ERRORS = (rundir.RunDirError, ValueError, OSError)


def default_run(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The run directory to open first: ``--run PATH`` in ``argv``, else ``RELOOK_RUN``, else
    "runs/latest"."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--run", default=None)
    args, _ = parser.parse_known_args(list(argv))
    return args.run or env.get("RELOOK_RUN") or DEFAULT_RUN


# Cached readers (small frames: st.cache_data; the long attention table: st.cache_resource,
# shared and never mutated, so a hit costs no copy).


@st.cache_data(show_spinner=False)
def manifest(run: str, stamp: int) -> dict[str, Any]:
    return rundir.load_manifest(run)


@st.cache_data(show_spinner=False)
def arm_table(run: str, stamp: int) -> pd.DataFrame:
    return rundir.list_arms(run)


@st.cache_data(show_spinner=False)
def run_metrics(run: str, stamp: int) -> pd.DataFrame:
    return rundir.load_metrics(run)


@st.cache_data(show_spinner=False)
def run_eval(run: str, stamp: int) -> pd.DataFrame:
    return rundir.load_eval(run)


@st.cache_data(show_spinner=False)
def trajectories(run: str, arm: str, stamp: int) -> list[dict[str, Any]]:
    return rundir.load_trajectories(run, arm)


@st.cache_data(show_spinner=False)
def arm_config(run: str, arm: str, stamp: int) -> dict[str, Any]:
    """An arm's ``config.json`` ({} if none yet); RunDirError if it is corrupt."""
    path = Path(run) / arm / rundir.CONFIG
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise rundir.RunDirError(f"{path}: corrupt JSON ({e})") from e


@st.cache_resource(show_spinner="Reading the attention table...", max_entries=8)
def attention_table(run: str, arm: str, stamp: int) -> pd.DataFrame:
    return rundir.load_attention(run, arm)


@st.cache_data(show_spinner="Reducing attention...")
def attention_views(run: str, arm: str, stamp: int, kind: str) -> dict[str, pd.DataFrame]:
    """Window-free reductions of one arm's attention table (all small)."""
    att = attention_table(run, arm, stamp)
    return {
        "per": metrics.token_shares(att, ("group",), kind=kind),
        "curve": metrics.image_share_curve(att, kind=kind),
        "counts": metrics.image_counts(att),
        "images": metrics.image_shares(att, kind),
        "heads": metrics.head_shares(att, kind),
        "head_summary": metrics.head_summary(att, kind),
        "events": rundir.load_attention_events(run, arm),
        "n_layers": pd.DataFrame({"n": [int(att["layer"].max()) + 1 if len(att) else 0]}),
    }


@st.cache_data(show_spinner=False)
def attention_bands(run: str, arm: str, stamp: int, kind: str, n_bands: int) -> pd.DataFrame:
    return metrics.band_shares(attention_table(run, arm, stamp), n_bands, kind)


@st.cache_data(show_spinner=False)
def attention_window(
    run: str, arm: str, stamp: int, kind: str, window: int
) -> dict[str, pd.DataFrame]:
    """Before/after and event-aligned reductions of one arm for one window (aligned: per tool,
    as the app draws it; aligned_all: tools pooled, as the paper figure draws it)."""
    att = attention_table(run, arm, stamp)
    events = rundir.load_attention_events(run, arm)
    return {
        "before_after": before_after(att, events, window, kind=kind),
        "aligned": event_aligned_share(att, events, window, kind=kind, by_tool=True),
        "aligned_all": event_aligned_share(att, events, window, kind=kind),
    }


@st.cache_data(show_spinner=False)
def vocab(tokenizer_json: str, ids: tuple[int, ...]) -> dict[int, str]:
    return trajview.read_vocab(tokenizer_json, ids)


@st.cache_data(show_spinner=False, max_entries=64)
def image_pixels(arm_dir: str, ref: str, stamp: int) -> Any:
    return trajview.read_image(arm_dir, ref)


# The open runs


@dataclass(frozen=True)
class Context:
    """The runs the sidebar opened and the arms chosen.

    Attributes:
        runs: run path -> modification stamp.
        arms: one row per arm of every run: columns label (the arm name, prefixed
            "{run folder}/" when several runs are open), run (path), arm, then the columns of
            :func:`analysis.rundir.list_arms`.
        selected: labels of the chosen arms, in table order.
        manifests: run path -> manifest.
    """

    runs: dict[str, int]
    arms: pd.DataFrame
    selected: list[str]
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def locate(self, label: str) -> tuple[str, str, int]:
        """(run path, arm name, run stamp) of an arm label."""
        row = self.arms.loc[self.arms["label"] == label].iloc[0]
        return row["run"], row["arm"], self.runs[row["run"]]

    def with_attention(self) -> list[str]:
        """Selected labels whose arm has an attention table."""
        has = set(self.arms.loc[self.arms["has_attention"].astype(bool), "label"])
        return [a for a in self.selected if a in has]

    def name(self) -> str:
        """A file-name stem for downloads: the run folder names joined by "+"."""
        stem = "+".join(Path(r).name for r in self.runs) or "relook"
        return re.sub(r"[^A-Za-z0-9_.+=-]", "_", stem)


def context() -> Context:
    """The context the main script stored for this rerun (pages call this first)."""
    ctx = st.session_state.get(CONTEXT_KEY)
    if ctx is None:  # a page script run on its own
        st.error("Open the app with `relook-app` (or `python -m apps.launch`).")
        st.stop()
    return ctx


def open_runs(paths: Sequence[str]) -> Context:
    """Stamps, manifests and arm tables of ``paths``; an unusable first path stops the script
    with a message, an unusable extra path is reported and skipped."""
    runs: dict[str, int] = {}
    manifests: dict[str, dict[str, Any]] = {}
    tables = []
    for i, path in enumerate(dict.fromkeys(paths)):
        try:
            stamp = rundir.run_stamp(path)
            manifests[path] = manifest(path, stamp)
            arms = arm_table(path, stamp)
        except (rundir.RunDirError, OSError) as e:
            st.error(f"Cannot open the run directory: {e}")
            if i == 0:
                _suggest_runs(path)
                st.stop()
            continue
        runs[path] = stamp
        tables.append(arms.assign(run=path))
    arms = pd.concat(tables, ignore_index=True)
    prefix = len(runs) > 1
    arms.insert(0, "label", [f"{Path(r).name}/{a}" if prefix else a for r, a in
                             zip(arms["run"], arms["arm"])])  # fmt: skip
    return Context(runs=runs, arms=arms, selected=list(arms["label"]), manifests=manifests)


def _suggest_runs(path: str) -> None:
    found = rundir.find_runs(path)
    if found:
        names = ", ".join(f"`{p}`" for p in found[:10])
        st.info(f"This folder holds run directories; enter one of them: {names}")
    else:
        st.info("Enter the path of a run directory (a folder with a manifest.json).")


def all_metrics(ctx: Context) -> pd.DataFrame:
    """Training metrics of every open run, arm column relabelled to the context's labels;
    a corrupt table is shown as an error and left out."""
    frames = []
    for run, stamp in ctx.runs.items():
        with shown_errors(f"the training metrics of {run}"):
            df = run_metrics(run, stamp)
            labels = ctx.arms[ctx.arms["run"] == run].set_index("arm")["label"]
            frames.append(df.assign(arm=df["arm"].map(labels)))
    if not frames:
        return pd.DataFrame({"arm": pd.Series(dtype="str"), "step": pd.Series(dtype="int64")})
    return pd.concat(frames, ignore_index=True)


# Layout helpers


@contextmanager
def shown_errors(what: str) -> Iterator[None]:
    """Show a failed read (corrupt or malformed file) as an error box instead of a traceback."""
    try:
        yield
    except READ_ERRORS as e:
        st.error(f"Cannot show {what}: {e}")


def csv_button(df: pd.DataFrame, name: str, key: str, label: str = "CSV") -> None:
    """A download button for ``df`` as CSV (``name``.csv); nothing is recomputed on click."""
    st.download_button(
        label, df.to_csv(index=False), file_name=f"{name}.csv", mime="text/csv",
        on_click="ignore", key=f"csv::{key}", help="Download the data of this view as CSV",
    )  # fmt: skip


def chart(
    fig: Any,
    data: pd.DataFrame,
    key: str,
    name: str,
    png: Callable[[], bytes] | None = None,
) -> None:
    """A plotly figure with its downloads: the data as CSV and, where ``png`` renders a
    paper-style figure of the same view (:mod:`apps.figures`), a server-side PNG built only
    when clicked (plotly's own modebar also saves a PNG in the browser)."""
    st.plotly_chart(fig, key=key)
    cols = st.columns([1, 1, 6])
    with cols[0]:
        csv_button(data, name, key)
    if png is not None:
        with cols[1]:
            st.download_button(
                "PNG", png, file_name=f"{name}.png", mime="image/png", on_click="ignore",
                key=f"png::{key}", help="Download the paper-style figure (matplotlib) as PNG",
            )  # fmt: skip
