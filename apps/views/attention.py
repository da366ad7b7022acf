"""Attention page: image-share decay across arms, Figure-1 shares (base versus trained,
single- versus multi-image), per-image lines of one trajectory, views aligned on tool calls,
and layer/head views."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import arms, metrics, plots, summaries
from analysis.decay import decay_fit
from analysis.events import before_after_summary
from apps import common
from apps.figures import decay_png, shares_png, tool_call_png

KIND_HELP = (
    "raw: attention mass; no_sink: sink dropped and renormalised; value: value-weighted; "
    "efficiency: mass relative to the region's share of the keys"
)
SETTING_HELP = "single-image: one input image; multi-image: two or more"
SETTINGS = ("all", *metrics.SETTINGS)
TABS = ["Decay across arms", "Figure 1", "Per image", "Around tool calls", "Layers & heads"]


def load_views(labels: list[str], kind: str) -> dict[str, dict[str, pd.DataFrame]]:
    """Cached reductions per arm; unreadable or empty tables are reported and left out."""
    views = {}
    for label in labels:
        run, arm, stamp = ctx.locate(label)
        with common.shown_errors(f"the attention of arm {label}"):
            v = common.attention_views(run, arm, stamp, kind)
            if v["per"].empty:
                st.info(f"Arm {label} has an empty attention table.")
            else:
                views[label] = v
    return views


def shared_kinds(labels: list[str]) -> list[str]:
    """Share variants every readable table supports (errors are shown by load_views)."""
    kinds = list(metrics.KINDS)
    for label in labels:
        run, arm, stamp = ctx.locate(label)
        try:
            columns = common.attention_table(run, arm, stamp).columns
        except common.READ_ERRORS:
            continue
        kinds = [k for k in kinds if k in metrics.available_kinds(columns)]
    return kinds or ["raw"]


def decay_tab() -> None:
    pool_seeds = st.toggle("Pool seeds", True, key="pool", help="One line per arm, seeds pooled")
    lines = arms.seed_groups(per) if pool_seeds else {a: [a] for a in per}
    curves = {
        name: metrics.image_curve(summaries.pool({a: per[a] for a in seeds}))
        for name, seeds in lines.items()
    }
    events = [
        views[a]["events"].assign(arm=name)
        for name, seeds in lines.items()
        for a in seeds
        if len(views[a]["events"])
    ]
    events_df = pd.concat(events, ignore_index=True) if events else None
    data = pd.concat([c.assign(arm=a) for a, c in curves.items()], ignore_index=True)
    fits = {name: decay_fit(c) for name, c in curves.items()}
    common.chart(
        plots.image_share_figure(curves, events_df), data, key="image_share",
        name=f"{stem}_image_share_{kind}_{setting}", png=decay_png(curves, fits),
    )  # fmt: skip
    table = pd.DataFrame([{"arm": name, **f} for name, f in fits.items()])
    st.caption("Decay fits: linear slope (share per 100 tokens), exponential half-life (tokens)")
    st.dataframe(table, hide_index=True, key="decay_fits")
    common.csv_button(table, f"{stem}_decay_fits", "decay_fits")


def figure1_tab() -> None:
    groups = arms.seed_groups(per)
    options = {f"{b} ({len(a)} seeds pooled)" if len(a) > 1 else a[0]: a for b, a in groups.items()}
    options |= {a: [a] for a in per}
    names = list(options)
    base = next((i for i, n in enumerate(names) if n.startswith("base")), 0)
    trained = next((i for i, n in enumerate(names) if n.startswith("full")), min(1, len(names) - 1))
    for side, col, default in zip(("left", "right"), st.columns(2), (base, trained)):
        with col:
            choice = st.selectbox("Arm", names, index=default, key=f"fig1::{side}") or names[0]
            shares = metrics.mean_by_token(summaries.pool({a: per[a] for a in options[choice]}))
            common.chart(
                plots.stacked_shares_figure(shares, f"{choice}: {setting} trajectories"), shares,
                key=f"shares::{side}", name=f"{stem}_shares_{choice}_{kind}_{setting}",
                png=shares_png(shares, choice, setting),
            )  # fmt: skip


def per_image_tab() -> None:
    c1, c2 = st.columns(2)
    arm = c1.selectbox("Arm", list(per), key="image::arm") or next(iter(per))
    ids = sorted(set(per[arm]["trajectory"]))
    traj = c2.selectbox("Trajectory", ids, key=f"image::traj::{arm}") or ids[0]
    images, events = views[arm]["images"], views[arm]["events"]
    one = images[images["trajectory"] == traj]
    common.chart(
        plots.per_image_figure(one, events[events["trajectory"] == traj], f"{arm}: {traj}"), one,
        key="per_image", name=f"{stem}_per_image_{kind}",
    )  # fmt: skip


def tool_call_tab() -> None:
    windows = {}
    for a in per:
        run, arm, stamp = ctx.locate(a)
        windows[a] = common.attention_window(run, arm, stamp, kind, window)
    aligned = {a: w["aligned"] for a, w in windows.items()}
    data = pd.concat([d.assign(arm=a) for a, d in aligned.items()], ignore_index=True)
    ba = pd.concat([w["before_after"].assign(arm=a) for a, w in windows.items()], ignore_index=True)
    png = None
    if len(ba):
        summary = before_after_summary(ba, by=("arm",), overall=False)
        png = tool_call_png({a: w["aligned_all"] for a, w in windows.items()}, summary)
    common.chart(
        plots.event_aligned_figure(aligned), data, key="aligned",
        name=f"{stem}_aligned_{kind}_w{window}", png=png,
    )  # fmt: skip
    st.subheader(f"Image share in the {window} tokens before vs after a tool call")
    if ba.empty:
        st.info("No tool calls in the measured trajectories.")
        return
    st.dataframe(plots.before_after_table(ba, by=("arm", "tool")), hide_index=True, key="ba_table")
    common.csv_button(ba, f"{stem}_before_after_w{window}", "before_after")
    with st.expander("Per tool call"):
        st.dataframe(ba, hide_index=True, key="ba_calls")


def heads_tab() -> None:
    c1, c2 = st.columns(2)
    arm = c1.selectbox("Arm", list(per), key="heads::arm") or next(iter(per))
    run, arm_name, stamp = ctx.locate(arm)
    n_layers = int(views[arm]["n_layers"]["n"].iloc[0])
    top = max(2, min(4, n_layers))
    n_bands = int(c2.slider("Layer bands", 1, top, min(3, n_layers), key="bands"))
    bands = common.attention_bands(run, arm_name, stamp, kind, min(n_bands, n_layers))
    heads = views[arm]["heads"]
    left, right = st.columns(2)
    with left:
        common.chart(
            plots.band_figure(bands, f"{arm}: image share by layer band"), bands,
            key="bands_fig", name=f"{stem}_bands_{arm}_{kind}",
        )  # fmt: skip
    with right:
        common.chart(
            plots.head_heatmap(heads, f"{arm}: image share per head"), heads, key="heads_fig",
            name=f"{stem}_heads_{arm}_{kind}",
        )  # fmt: skip
    st.caption("Per layer: the mean over heads beside the most image-focused head")
    st.dataframe(views[arm]["head_summary"], hide_index=True, key="head_summary")


ctx = common.context()
st.title("Attention to images")
measured = ctx.with_attention()
for label in ctx.selected:
    if label not in measured:
        st.info(f"Arm {label} has no attention table yet.")
if not measured:
    st.stop()

c1, c2, c3 = st.columns(3)
kind = c1.selectbox("Share", shared_kinds(measured), key="kind", help=KIND_HELP) or "raw"
setting = c2.radio("Trajectories", SETTINGS, horizontal=True, key="setting",
                   help=SETTING_HELP) or "all"  # fmt: skip
window = int(c3.number_input("Before/after window (tokens)", 1, 512, 8, key="window"))
views = load_views(measured, kind)
per = {a: metrics.in_setting(v["per"], v["counts"], setting) for a, v in views.items()}
if missing := [a for a, p in per.items() if p.empty]:
    st.info(f"No {setting} trajectories measured in: {', '.join(missing)}.")
per = {a: p for a, p in per.items() if not p.empty}
if not per:
    st.stop()
stem = ctx.name()
for tab, draw in zip(
    st.tabs(TABS), (decay_tab, figure1_tab, per_image_tab, tool_call_tab, heads_tab)
):
    with tab:
        draw()
