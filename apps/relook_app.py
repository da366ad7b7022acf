"""relook run viewer: status, training curves, evaluation and attention-to-image of a run directory.

Run it with::

    streamlit run apps/relook_app.py -- --run runs/latest

(or set ``RELOOK_RUN``). The app computes nothing itself: it reads the run directory with
:mod:`analysis.rundir`, reduces attention with :mod:`analysis.metrics` and draws with
:mod:`analysis.plots`; frames are cached per run and per modification stamp, so a run still
being written is re-read when its files change.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

try:
    from analysis import plots, rundir
except ModuleNotFoundError:  # `streamlit run` puts apps/ on sys.path, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from analysis import plots, rundir
from analysis.metrics import before_after, image_share_curve, share_by_token

DEFAULT_RUN = "runs/latest"
DEFAULT_METRIC = "rollout/reward_mean"


def default_run(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The run directory to open first: ``--run PATH`` in ``argv``, else ``RELOOK_RUN``, else
    "runs/latest"."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--run", default=None)
    args, _ = parser.parse_known_args(list(argv))
    return args.run or env.get("RELOOK_RUN") or DEFAULT_RUN


# Cached readers: keyed by run path and its modification stamp (rundir.run_stamp).


@st.cache_data(show_spinner=False)
def _manifest(run: str, stamp: int) -> dict[str, Any]:
    return rundir.load_manifest(run)


@st.cache_data(show_spinner=False)
def _arms(run: str, stamp: int) -> pd.DataFrame:
    return rundir.list_arms(run)


@st.cache_data(show_spinner=False)
def _metrics(run: str, stamp: int) -> pd.DataFrame:
    return rundir.load_metrics(run)


@st.cache_data(show_spinner=False)
def _eval(run: str, stamp: int) -> pd.DataFrame:
    return rundir.load_eval(run)


@st.cache_data(show_spinner="Reducing attention tables...")
def _attention(run: str, arm: str, stamp: int, window: int) -> dict[str, pd.DataFrame]:
    # Only the small reductions are cached; the long table is dropped after this call.
    att = rundir.load_attention(run, arm)
    events = rundir.load_attention_events(run, arm)
    return {
        "curve": image_share_curve(att),
        "shares": share_by_token(att),
        "events": events,
        "before_after": before_after(att, events, window=window),
    }


@contextmanager
def _shown_errors(what: str) -> Iterator[None]:
    """Show a failed read (corrupt or malformed file) as an error box instead of a traceback."""
    try:
        yield
    except (rundir.RunDirError, ValueError, OSError) as e:
        st.error(f"Cannot show {what}: {e}")


def _open_run(path: str) -> tuple[int, dict[str, Any], pd.DataFrame]:
    """Stamp, manifest and arm table of ``path``; stops the script with a message if unusable."""
    try:
        stamp = rundir.run_stamp(path)
        return stamp, _manifest(path, stamp), _arms(path, stamp)
    except (rundir.RunDirError, OSError) as e:
        st.error(f"Cannot open the run directory: {e}")
        runs = rundir.find_runs(path)
        if runs:
            names = ", ".join(f"`{p}`" for p in runs[:10])
            st.info(f"This folder holds run directories; enter one of them: {names}")
        else:
            st.info("Enter the path of a run directory (a folder with a manifest.json).")
        st.stop()
        raise  # unreachable: st.stop() raises


def status_section(manifest: dict[str, Any], arms: pd.DataFrame) -> None:
    """Manifest summary, one warning per arm that is not complete, and the arm table."""
    st.header("Run status")
    status = manifest.get("status", "unknown")
    st.markdown(
        f"grid **{manifest.get('grid', '?')}** - status **{status}** - created "
        f"{manifest.get('created', '?')} - seeds {manifest.get('seeds', [])}"
    )
    if status != "complete":
        st.warning(f"The run is {status}: some arms have not finished.")
    for row in arms[arms["status"] != "complete"].itertuples():
        detail = f" at stage {row.stage}" if row.stage else ""
        error = f": {row.error}" if row.error else ""
        st.warning(f"Arm {row.arm} is {row.status}{detail}{error}")
    st.dataframe(arms, hide_index=True)
    with st.expander("Manifest (versions, seeds)"):
        st.json(manifest)


def training_section(run: str, metrics: pd.DataFrame, selected: list[str], metric: str) -> None:
    """The selected metric per arm (seed groups as mean + min-max band) and a CSV download."""
    st.header("Training curves")
    shown = metrics[metrics["arm"].isin(selected)]
    if shown.empty or not metric:
        st.info("No training metrics logged yet for the selected arms.")
        return
    st.plotly_chart(plots.training_curves(shown, metric), key="training_curves")
    st.download_button(
        "Download metrics (CSV)", shown.to_csv(index=False), file_name=f"{run}_metrics.csv",
        mime="text/csv", on_click="ignore", key="download_metrics",
    )  # fmt: skip


def eval_section(run: str, stamp: int, selected: list[str]) -> None:
    """The evaluation summary table of the selected arms and a CSV download."""
    st.header("Held-out evaluation")
    with _shown_errors("the evaluation"):
        results = _eval(run, stamp)
        results = results[results["arm"].isin(selected)]
        if results.empty:
            st.info("No evaluation results yet for the selected arms.")
            return
        st.dataframe(plots.eval_table(results), hide_index=True, key="eval_table")
        st.download_button(
            "Download evaluation (CSV)", results.to_csv(index=False),
            file_name=f"{Path(run).name}_eval.csv", mime="text/csv", on_click="ignore", key="download_eval",
        )  # fmt: skip


def attention_section(run: str, stamp: int, arms: pd.DataFrame, selected: list[str]) -> None:
    """Image-share decay curves with tool-call markers, Figure-1 shares of one arm, and the
    before/after-tool-call table; arms without an attention table get a note."""
    st.header("Attention to images")
    window = int(st.sidebar.number_input("Before/after window (tokens)", 1, 512, 8))
    measured = set(arms.loc[arms["has_attention"], "arm"])
    summaries: dict[str, dict[str, pd.DataFrame]] = {}
    for arm in selected:
        if arm not in measured:
            st.info(f"Arm {arm} has no attention table yet.")
            continue
        with _shown_errors(f"the attention of arm {arm}"):
            summary = _attention(run, arm, stamp, window)
            if summary["curve"].empty:
                st.info(f"Arm {arm} has an empty attention table.")
            else:
                summaries[arm] = summary
    if not summaries:
        return
    curves = {arm: s["curve"] for arm, s in summaries.items()}
    events = pd.concat([s["events"].assign(arm=arm) for arm, s in summaries.items()])
    st.plotly_chart(plots.image_share_figure(curves, events), key="image_share")
    chosen = st.selectbox("Arm for the share breakdown", list(summaries), key=f"fig1::{run}")
    title = f"Attention shares while generating: {chosen}"
    st.plotly_chart(plots.stacked_shares_figure(summaries[chosen]["shares"], title), key="shares")
    st.subheader(f"Image share in the {window} tokens before vs after a tool call")
    ba = pd.concat([s["before_after"].assign(arm=arm) for arm, s in summaries.items()])
    if ba.empty:
        st.info("No tool calls in the measured trajectories.")
        return
    st.dataframe(plots.before_after_table(ba, by=("arm", "tool")), hide_index=True)
    with st.expander("Per tool call"):
        st.dataframe(ba, hide_index=True)


def main() -> None:
    """Sidebar (run path, arms, metric) then the four sections."""
    st.set_page_config(page_title="relook", layout="wide")
    st.title("relook: run viewer")
    run = st.sidebar.text_input("Run directory", default_run(sys.argv[1:], os.environ), key="run")
    stamp, manifest, arms = _open_run(run)
    all_arms = arms["arm"].tolist()
    selected = st.sidebar.multiselect("Arms", all_arms, default=all_arms, key=f"arms::{run}")
    metrics = pd.DataFrame({"arm": []})
    with _shown_errors("the training metrics"):
        metrics = _metrics(run, stamp)
    names = sorted(c for c in metrics.columns if "/" in c)
    index = names.index(DEFAULT_METRIC) if DEFAULT_METRIC in names else 0
    metric = st.sidebar.selectbox("Metric", names, index=index, key=f"metric::{run}") or ""

    status_section(manifest, arms)
    training_section(Path(run).name, metrics, selected, metric)
    eval_section(run, stamp, selected)
    attention_section(run, stamp, arms, selected)


main()
