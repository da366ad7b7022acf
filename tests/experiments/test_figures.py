"""Paper figures: the matplotlib builders of analysis.figures, the ablation table of
analysis.tables and ``python -m experiments.figures`` over a synthetic run directory (files
written, figure content, table numbers, bad input)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from analysis import arms, tables
from analysis import figures as fg
from analysis import rundir as rd
from analysis.events import before_after_ci, event_aligned_share
from analysis.metrics import (
    image_counts,
    image_share_curve,
    in_setting,
    share_by_token,
)
from analysis.summaries import pool
from experiments import figures as cli
from tests.analysis.test_rundir import build_run, synthetic_attention, synthetic_events

BASE_ARMS = ["base-s0", "base-s1"]
REPO = Path(__file__).resolve().parents[2]


def _multi(att: pd.DataFrame, trajectories: list[str]) -> pd.DataFrame:
    """Turn image 2 of ``trajectories`` into a second input image (multi-image trajectories)."""
    att = att.copy()
    att.loc[att["trajectory"].isin(trajectories) & (att["image"] == 2), "origin"] = "input"
    return att


def build_figure_run(root: Path) -> Path:
    """build_run's 3 arms (full-s0/s1 with attention and metrics, tools_none-s0 without
    attention) plus an untrained base arm with 2 seeds (eval and attention, no metrics): 3
    trajectories each, t2 multi-image, the others single-image."""
    run = build_run(root)
    for k, arm in enumerate(BASE_ARMS):
        rd.start_arm(run, arm, {"arm": arm})
        rd.write_eval(
            run,
            arm,
            {
                "split": "test",
                "n": 20,
                "accuracy": 0.3 + 0.1 * k,
                "per_family": {"count": 0.5, "find": 0.75},
                "tool_call_rate": 0.25,
            },
        )
        rd.write_attention(run, arm, _multi(synthetic_attention(10 + k, trajectories=3), ["t2"]))
        rd.write_attention_events(run, arm, synthetic_events())
        rd.finish_arm(run, arm)
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_figure_run(tmp_path_factory.mktemp("figs") / "run")


def _pooled(run: Path, arm_type: str) -> pd.DataFrame:
    """The seeds' attention tables of one arm type, pooled as experiments.figures pools them."""
    seeds = arms.seed_groups(rd.load_manifest(run)["arms"])[arm_type]
    return pool({f"r0/{arm}": rd.load_attention(run, arm) for arm in seeds})


def _by_setting(att: pd.DataFrame) -> dict[str, pd.DataFrame]:
    counts = image_counts(att)
    return {s: in_setting(att, counts, s) for s in ("single-image", "multi-image")}


def _lines(ax) -> list:
    return list(ax.get_lines())


# Figures


def test_attention_shares_figure_panels_lines_and_values(run):
    base = _by_setting(_pooled(run, "base"))
    shares = {s: share_by_token(a) for s, a in base.items()}
    full = {"single-image": share_by_token(_pooled(run, "full")), "multi-image": pd.DataFrame()}
    fig = fg.attention_shares_figure({"base (no RL)": shares, "full": full})
    axes = np.array(fig.axes).reshape(2, 2)
    assert [ax.get_title() for ax in axes.flat] == [
        "base (no RL) · single image",
        "base (no RL) · multi image",
        "full · single image",
        "full · multi image",
    ]
    for ax in axes.flat[:3]:  # text, tool text, images, generated tokens
        assert [line.get_label() for line in _lines(ax)] == list(arms.GROUP_LABELS.values())
        assert ax.get_ylim() == (0.0, 1.0)
    assert _lines(axes[1, 1]) == [] and "no multi-image" in axes[1, 1].texts[0].get_text()
    image = dict(zip(arms.GROUP_LABELS.values(), _lines(axes[0, 1])))["image"]
    expected = shares["multi-image"].query("group == 'image'")
    np.testing.assert_allclose(image.get_xdata(), expected["token"])
    np.testing.assert_allclose(image.get_ydata(), expected["share"])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(arms.GROUP_LABELS.values())
    # A token reached by one trajectory has no std: a gap in the band, the line goes on.
    ragged = synthetic_attention(3, trajectories=2, tokens=5)
    ragged = ragged[(ragged["trajectory"] == "t0") | (ragged["token"] < 3)]
    fig = fg.attention_shares_figure({"base": {"single-image": share_by_token(ragged)}})
    assert len(_lines(fig.axes[0])[0].get_xdata()) == 5
    # Cutting tokens reached by fewer trajectories than asked: the multi panel (1 per seed) empties.
    cut = fg.attention_shares_figure({"base": shares}, min_trajectories=3)
    assert len(_lines(cut.axes[0])) == 4 and _lines(cut.axes[1]) == []
    with pytest.raises(ValueError, match="min_trajectories"):
        fg.attention_shares_figure({"base": shares}, min_trajectories=0)


def test_image_share_figure_lines_fits_and_labels(run):
    curves = {arm: image_share_curve(_pooled(run, arm)) for arm in ("base", "full")}
    fits = {"base": {"s0": 0.2, "half_life_tokens": 10.0}, "full": {"half_life_tokens": math.inf}}
    fig = fg.image_share_figure(curves, fits)
    lines = _lines(fig.axes[0])
    assert len(lines) == 3  # base, its fit, full (no finite fit)
    assert [line.get_label() for line in fig.axes[0].get_legend().get_lines()] == [
        "base (no RL), t½ = 10 tok.",
        "full, no decay",
    ]
    np.testing.assert_allclose(lines[0].get_ydata(), curves["base"]["image_share"])
    fit_x, fit_y = lines[1].get_xdata(), lines[1].get_ydata()
    np.testing.assert_allclose(fit_y, 0.2 * 2.0 ** (-fit_x / 10.0))
    assert lines[2].get_color() == arms.ARM_COLORS["full"]
    # Two seeds of one arm drawn apart: the arm's colour, told apart by the line style.
    seeds = fg.image_share_figure({"full-s0": curves["full"], "full-s1": curves["full"]})
    s0, s1 = _lines(seeds.axes[0])
    assert s0.get_color() == s1.get_color() == arms.ARM_COLORS["full"]
    assert s0.get_linestyle() != s1.get_linestyle()
    empty = fg.image_share_figure({"base": curves["base"].iloc[:0]})
    assert _lines(empty.axes[0]) == [] and empty.axes[0].texts


def test_tool_call_figure_bars_are_deltas(run):
    att = _pooled(run, "full")
    events = pool({"r0/full-s0": synthetic_events()})
    aligned = {"full": event_aligned_share(att, events, 2), "gain0": pd.DataFrame()}
    ci = before_after_ci(att, events, 2, n_boot=50, by=()).assign(arm="full")
    none = ci.assign(arm="tools_none", n_events=0)
    fig = fg.tool_call_figure(aligned, pd.concat([ci, none]))
    ax, bx = fig.axes
    assert len(_lines(ax)) == 2  # the full arm and the offset-0 marker
    np.testing.assert_allclose(_lines(ax)[0].get_ydata(), aligned["full"]["image_share"])
    bars = bx.patches
    assert len(bars) == 1 and bars[0].get_height() == pytest.approx(ci["delta"].iloc[0])
    assert [t.get_text() for t in bx.get_xticklabels()] == ["full\n2 calls"]
    blank = fg.tool_call_figure({}, ci.iloc[:0])
    assert all(a.texts for a in blank.axes) and not blank.axes[1].patches


def test_training_curves_mean_over_seeds_smoothed_and_band(run):
    metrics = rd.load_metrics(run)
    fig = fg.training_curves_figure(
        metrics, ["rollout/reward_mean", "nope/none", "actor/kl"], smooth=2
    )
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["rollout/reward_mean", "actor/kl"]
    reward = visible[0]
    assert [line.get_color() for line in _lines(reward)] == [
        arms.ARM_COLORS["full"],
        arms.ARM_COLORS["tools_none"],
    ]
    wide = metrics[metrics["arm"].str.startswith("full")].pivot(
        index="step", columns="arm", values="rollout/reward_mean"
    )
    expected = wide.rolling(2, min_periods=1).mean().mean(axis=1)
    np.testing.assert_allclose(_lines(reward)[0].get_ydata(), expected)
    assert sum(isinstance(c, PolyCollection) for c in reward.collections) == 1  # full: 2 seeds
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "full (2 seeds)",
        "tools_none (1 seed)",
    ]
    with pytest.raises(ValueError, match="none of the metrics"):
        fg.training_curves_figure(metrics, ["nope/none"])


def test_builders_leave_global_style_untouched(run):
    before = dict(matplotlib.rcParams)
    fig = fg.training_curves_figure(rd.load_metrics(run))
    assert fig.axes[0].title.get_fontsize() == fg.STYLE["axes.titlesize"]
    assert fg.to_png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    assert dict(matplotlib.rcParams) == before


def test_save_writes_every_format_atomically_and_byte_stable(tmp_path, run):
    fig = fg.image_share_figure({"full": image_share_curve(_pooled(run, "full"))})
    paths = fg.save(fig, tmp_path / "out", "decay", ["pdf", "png", "svg"])
    assert [p.name for p in paths] == ["decay.pdf", "decay.png", "decay.svg"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    assert paths[0].read_bytes()[:5] == b"%PDF-" and paths[1].read_bytes()[:4] == b"\x89PNG"
    first = paths[0].read_bytes()
    assert fg.save(fig, tmp_path / "out", "decay", ["pdf"])[0].read_bytes() == first
    with pytest.raises(ValueError, match="formats"):
        fg.save(fig, tmp_path, "decay", ["jpg"])
    with pytest.raises(ValueError, match="figure name"):
        fg.save(fig, tmp_path, "../decay")


# The ablation table


def test_ablation_summary_numbers_match_eval_and_metrics(run):
    evals, metrics = rd.load_eval(run), rd.load_metrics(run)
    summary = tables.ablation_summary(evals, metrics, last_steps=2).set_index(["arm", "quantity"])
    assert list(dict.fromkeys(summary.index.get_level_values("arm"))) == [
        "base",
        "full",
        "tools_none",
    ]
    acc = evals.set_index("arm")["accuracy"]
    full = summary.loc[("full", "accuracy")]
    assert full["mean"] == pytest.approx((acc["full-s0"] + acc["full-s1"]) / 2)
    assert full["std"] == pytest.approx(np.std([acc["full-s0"], acc["full-s1"]], ddof=1))
    assert full["n"] == 2
    assert math.isnan(summary.loc[("tools_none", "accuracy"), "std"])  # one seed
    assert summary.loc[("base", "accuracy/find"), "mean"] == pytest.approx(0.75)
    last2 = metrics[metrics["arm"] == "full-s1"].sort_values("step")["rollout/reward_mean"]
    last2_s0 = metrics[metrics["arm"] == "full-s0"].sort_values("step")["rollout/reward_mean"]
    expected = (last2.tail(2).mean() + last2_s0.tail(2).mean()) / 2
    assert summary.loc[("full", "reward"), "mean"] == pytest.approx(expected)
    assert ("base", "reward") not in summary.index  # untrained: no metrics
    with pytest.raises(ValueError, match="accuracy"):
        tables.ablation_summary(evals.drop(columns="accuracy"))


def test_ablation_table_markdown_and_latex(run):
    summary = tables.ablation_summary(rd.load_eval(run), rd.load_metrics(run))
    table = tables.ablation_table(summary, digits=2)
    assert table.index.tolist() == ["base", "full", "tools_none"]
    assert table.loc["full", "accuracy"] == "0.15 ± 0.07"  # 0.1, 0.2
    assert table.loc["tools_none", "accuracy"] == "0.30"  # one seed: no spread
    assert table.loc["base", "train reward"] == "–"
    assert table["seeds"].tolist() == [2, 2, 1]
    md = tables.table_markdown(table)
    assert md.splitlines()[0].startswith("| arm") and "| tools_none" in md
    tex = tables.table_latex(table, caption="Ablation")
    assert r"\toprule" in tex and r"\caption{Ablation}" in tex and r"tools\_none" in tex
    assert r"0.15 $\pm$ 0.07" in tex and "±" not in tex


# The command


def test_cli_writes_every_figure_table_and_index(run, tmp_path, capsys):
    out = tmp_path / "figs"
    index = cli.main(
        cli.FiguresArgs(runs=(run,), out=out, window=2, n_boot=50, min_trajectories=1, smooth=1)
    )
    names = ["attention_shares", "image_decay", "tool_calls", "training_curves"]
    assert list(index["figures"]) == names and index["skipped"] == {}
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        [f"{n}.{x}" for n in names for x in ("pdf", "png")]
        + ["ablation_table.md", "ablation_table.tex", "figures.json"]
    )
    on_disk = json.loads((out / "figures.json").read_text())
    assert on_disk["figures"]["attention_shares"]["arms"] == {
        "base": [f"{run}/base-s0", f"{run}/base-s1"], "full": [f"{run}/full-s0", f"{run}/full-s1"],
    }  # fmt: skip
    assert any("tools_none-s0/attention.parquet: missing" in n for n in on_disk["notes"])
    md = (out / "ablation_table.md").read_text()
    assert "0.150 ± 0.071" in md and "0.350 ± 0.071" in md  # full, base accuracies
    assert md in capsys.readouterr().out


def test_cli_skips_a_figure_whose_arm_or_file_is_missing(tmp_path, capsys):
    run = build_run(tmp_path / "run")  # no base arm
    (run / "full-s1" / rd.ATTENTION).write_bytes(b"not parquet")
    index = cli.main(cli.FiguresArgs(runs=(run,), out=tmp_path / "out", n_boot=20))
    err = capsys.readouterr().err
    assert "no arm 'base'" in index["skipped"]["attention_shares"]
    assert "full-s1/attention.parquet: corrupt parquet" in index["skipped"]["image_decay"]
    assert "skipped attention_shares: no arm 'base'" in err
    assert set(index["figures"]) == {"training_curves"} and "ablation_table" in index["tables"]
    assert not (tmp_path / "out" / "attention_shares.png").exists()
    (run / "full-s1" / rd.ATTENTION).unlink()  # full-s1 left out with a note; full-s0 drawn
    index = cli.main(cli.FiguresArgs(runs=(run,), out=tmp_path / "v", kind="value", n_boot=20))
    assert any("full-s1/attention.parquet: missing" in n for n in index["notes"])
    assert "full-s0/attention.parquet: kind='value' needs" in index["skipped"]["image_decay"]


def test_cli_pools_seeds_across_runs_and_folders_of_runs(tmp_path):
    for seed in (0, 1):
        run = rd.create_run(tmp_path / "runs" / f"r{seed}", "g", [f"full-s{seed}"], [seed], {})
        rd.start_arm(run, f"full-s{seed}", {})
        rd.write_eval(run, f"full-s{seed}", {"n": 4, "accuracy": 0.25 * (seed + 1)})
    (tmp_path / "runs" / "latest").symlink_to("r1")  # listed twice, drawn once
    assert len(cli.resolve_runs([tmp_path / "runs", tmp_path / "runs" / "r1"])) == 2
    index = cli.main(cli.FiguresArgs(runs=(tmp_path / "runs",), out=tmp_path / "out"))
    table = (tmp_path / "out" / "ablation_table.md").read_text()
    assert "0.375 ± 0.177" in table  # mean, std of 0.25 and 0.5 over the two runs
    assert set(index["skipped"]) == set(cli.FIGURES)


def test_cli_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(cli.FiguresArgs(runs=(tmp_path / "nope",), out=tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(rd.RunDirError, match="no manifest.json"):
        cli.main(cli.FiguresArgs(runs=(tmp_path / "empty",), out=tmp_path / "out"))
    bare = rd.create_run(tmp_path / "bare", "g", ["full-s0"], [0], {})
    with pytest.raises(ValueError, match="nothing could be drawn.*no arm has an eval.json"):
        cli.main(cli.FiguresArgs(runs=(bare,), out=tmp_path / "out"))
    assert not (tmp_path / "out" / "figures.json").exists()
    with pytest.raises(ValueError, match="window"):
        cli.main(cli.FiguresArgs(runs=(bare,), window=0))


def test_cli_process_exit_codes(tmp_path):
    cmd = [sys.executable, "-m", "experiments.figures", "--out", str(tmp_path / "out"), "--runs"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [*cmd, str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "error: --runs" in proc.stderr and "nope" in proc.stderr
    assert "Traceback" not in proc.stderr
