"""Training page: curves per arm (mean and min-max band over seeds), a free metric, and the arms
compared at the end of training."""

from __future__ import annotations

import fnmatch

import streamlit as st

from analysis import plots, summaries
from apps import common
from apps.figures import training_png

# Panel -> metric-name patterns, in the order the issue lists them (keys: docs/design.md#style).
PANELS = {
    "Reward": ["rollout/reward_mean"],
    "Accuracy": ["rollout/acc_mean"],
    # held-out evaluation during training (EvalConfig.every > 0): only steps that evaluated
    "Held-out accuracy": ["eval/acc", "eval_sampled/acc", "eval_sampled/pass_at_n"],
    "Held-out accuracy per family": ["eval/acc/*"],
    "Held-out tool-call rate": ["eval/tool_call_rate", "eval_sampled/tool_call_rate"],
    "Tool calls per tool": ["rollout/tool_calls/*", "rollout/tool_calls_failed"],
    "Response length": ["rollout/response_length"],
    "Masked fractions": ["mask/*_frac"],
    "KL": ["actor/kl", "actor/approx_kl"],
    "Clip fraction": ["actor/clipfrac"],
}
DEFAULT_METRIC = "rollout/reward_mean"
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.25, title_text="")

ctx = common.context()
st.title("Training curves")
metrics_df = common.all_metrics(ctx)
shown = metrics_df[metrics_df["arm"].isin(ctx.selected)]
names = sorted(c for c in metrics_df.columns if "/" in c)
if shown.empty or not names:
    st.info(
        "No training metrics logged yet for the selected arms (the base arm, without RL, logs none)."
    )
    st.stop()

panels = {p: [m for pat in pats for m in fnmatch.filter(names, pat)] for p, pats in PANELS.items()}
panels = {p: ms for p, ms in panels.items() if ms}
c1, c2 = st.columns([3, 1])
chosen = c1.multiselect("Panels", list(panels), default=list(panels), key=f"panels::{ctx.name()}")
smooth = int(c2.slider("Smoothing (steps)", 1, 25, 1, key="smooth",
                       help="Trailing moving average over this many logged steps"))  # fmt: skip
smoothed = summaries.smooth_metrics(shown, names, smooth)
stem = ctx.name()

cells = [(panel, metric) for panel in chosen for metric in panels[panel]]
for row in range(0, len(cells), 2):  # a two-column grid, rows aligned
    for col, (panel, metric) in zip(st.columns(2), cells[row : row + 2]):
        with col:
            data = smoothed[["arm", "step", metric]].dropna(subset=[metric])
            fig = plots.training_curves(smoothed, metric)
            fig.update_layout(title=f"{panel}: {metric}", legend=LEGEND_BELOW)
            common.chart(
                fig, data, key=f"curve::{metric}", name=f"{stem}_{metric.replace('/', '_')}",
                png=training_png(data, metric),
            )  # fmt: skip

st.subheader("Any metric")
index = names.index(DEFAULT_METRIC) if DEFAULT_METRIC in names else 0
metric = st.selectbox("Metric", names, index=index, key=f"metric::{ctx.name()}") or names[0]
data = smoothed[["arm", "step", metric]].dropna(subset=[metric])
common.chart(
    plots.training_curves(smoothed, metric), data, key="curve::any",
    name=f"{stem}_{metric.replace('/', '_')}", png=training_png(data, metric),
)  # fmt: skip

st.subheader("Arms compared at the end of training")
last = int(st.number_input("Mean over the last N logged steps", 1, 1000, 5, key="last"))
final = summaries.final_metrics(shown, names, last)
common.chart(
    plots.arm_comparison_figure(final, metric), final[final["metric"] == metric],
    key="compare", name=f"{stem}_final_{metric.replace('/', '_')}",
)  # fmt: skip
with st.expander("All metrics at the end of training"):
    st.dataframe(final, hide_index=True, key="final_table")
    common.csv_button(final, f"{stem}_final", "final_table")
