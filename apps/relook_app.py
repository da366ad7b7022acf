"""relook run viewer: training curves, evaluation, attention to images and trajectories of one
or more run directories.

Run it with::

    relook-app --run runs/latest      # or: python -m apps.launch --run runs/latest

(or set ``RELOOK_RUN``); it serves on 127.0.0.1 with no usage statistics from any folder
(:mod:`apps.launch`; a plain ``streamlit run`` honours ``.streamlit/config.toml`` only in the
repository root, and the app warns when it finds itself exposed). This script draws
the sidebar (run directory, runs to compare, arms) and hands over to the pages in
``apps/views/``. The app computes nothing itself: pages call :mod:`analysis` readers, reductions
and pure figure builders, through the caches of :mod:`apps.common`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts apps/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))

from analysis import rundir  # noqa: E402
from apps import common, launch  # noqa: E402

VIEWS = Path(__file__).resolve().parent / "views"
PAGES = [
    st.Page(VIEWS / "training.py", title="Training", icon=":material/show_chart:", default=True),
    st.Page(VIEWS / "status.py", title="Status & evaluation", icon=":material/fact_check:"),
    st.Page(VIEWS / "attention.py", title="Attention", icon=":material/visibility:"),
    st.Page(VIEWS / "trajectories.py", title="Trajectories", icon=":material/route:"),
]


def sidebar() -> common.Context:
    """Run path, runs to compare (siblings in the same folder) and arms; stops with a message
    when the run path is unusable."""
    run = st.sidebar.text_input(
        "Run directory", common.default_run(sys.argv[1:], os.environ), key="run"
    )
    siblings = [
        str(p) for p in rundir.find_runs(Path(run).parent) if p.resolve() != Path(run).resolve()
    ]
    others = st.sidebar.multiselect(
        "Compare with runs", siblings, key=f"compare::{run}",
        help="Other run directories beside this one; their arms are prefixed with the run folder.",
    )  # fmt: skip
    ctx = common.open_runs([run, *others])
    labels = ctx.arms["label"].tolist()
    selected = st.sidebar.multiselect(
        "Arms", labels, default=labels, key=f"arms::{run}::{'+'.join(others)}"
    )
    return replace(ctx, selected=selected)


def exposure_check() -> None:
    """Warn when the server is reachable from other machines or reports usage statistics.

    The bind address is fixed before this script runs, so it can only be reported; usage
    statistics are switched off here for every later message (the browser may already have
    been told to send them once).
    """
    from streamlit import config

    gather = bool(config.get_option("browser.gatherUsageStats"))
    if gather:
        config.set_option("browser.gatherUsageStats", False)
    key = "relook_exposure_warning"
    if key not in st.session_state:
        st.session_state[key] = launch.exposure_warning(config.get_option("server.address"), gather)
    if st.session_state[key]:
        st.warning(st.session_state[key], icon=":material/public:")


def main() -> None:
    """Page config, exposure check, sidebar, then the chosen page."""
    st.set_page_config(page_title="relook", layout="wide")
    exposure_check()
    page = st.navigation(PAGES)
    st.session_state[common.CONTEXT_KEY] = sidebar()
    page.run()


main()
