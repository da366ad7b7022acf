"""``python -m experiments.figures``: the paper's figures and the ablation table, from run
directories only (docs/design.md decision 5; builders in :mod:`analysis.figures` and
:mod:`analysis.tables`, reductions in :mod:`analysis.metrics`).

Writes into ``--out``, each as PDF and PNG (``--formats``), in one shared style:

- ``attention_shares``: IMAgent (arXiv 2512.08980) Figure 1, attention to text / images /
  generated tokens versus generated-token index; rows ``--base`` and ``--trained`` arm, columns
  single-image and multi-image trajectories (a setting no trajectory has is left out, with a
  note).
- ``image_decay``: image share versus generated-token index per arm, with its exponential fit.
- ``tool_calls``: image share aligned on tool calls, and the after - before change with a
  clustered-bootstrap interval (``--window`` tokens per side).
- ``training_curves``: training metrics per arm, mean over seeds with a min-max band.
- ``ablation_table.md`` and ``ablation_table.tex``: held-out results per arm, mean ± std over
  seeds (printed too).
- ``figures.json``: what was written, from which runs and arm folders, and what was skipped.

Seeds of one arm ("full-s0", "full-s1", and the same arm in other ``--runs``) are pooled. A
figure whose input is missing or corrupt (an arm, a table) is skipped with a message naming
the run, arm and file; the command fails only when nothing at all could be drawn.

Examples:
    python -m experiments.figures --runs runs/latest --out figures
    python -m experiments.figures --runs runs/a runs/b --trained masks_off --formats pdf
    python -m experiments.figures --runs runs --out figures   # every run directory in runs/
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from analysis import figures as fg
from analysis import rundir as rd
from analysis import tables
from analysis.arms import arm_label, arm_type, order_arms
from analysis.decay import decay_fit
from analysis.events import before_after_ci, event_aligned_share
from analysis.metrics import (
    SETTINGS,
    image_counts,
    image_share_curve,
    in_setting,
    share_by_token,
)
from analysis.summaries import pool


@dataclass
class FiguresArgs:
    """Draw the paper figures and the ablation table from run directories.

    Attributes:
        runs: run directories, or folders holding run directories (e.g. ``runs``); arms of
            the same name across runs are pooled as seeds.
        out: output folder (created).
        formats: image formats of every figure.
        base: arm of the base model without RL in the Figure-1 comparison.
        trained: the trained arm compared with it.
        window: tokens per side of a tool call for the before/after figure (docs/method.md §6).
        kind: attention variant (``analysis.metrics.KINDS``): raw, no_sink, value, efficiency.
        min_trajectories: tokens reached by fewer trajectories are cut from the curves (their
            mean is noise).
        smooth: trailing rolling mean of the training curves, in steps (1 = raw).
        last_steps: training steps averaged for the table's train reward.
        n_boot: bootstrap draws of the before/after interval.
        seed: bootstrap seed.
        metrics: training metrics drawn (those not logged are left out).
    """

    runs: tuple[Path, ...] = (Path("runs/latest"),)
    out: Path = Path("figures")
    formats: tuple[Literal["pdf", "png", "svg"], ...] = ("pdf", "png")
    base: str = "base"
    trained: str = "full"
    window: int = 8
    kind: Literal["raw", "no_sink", "value", "efficiency"] = "raw"
    min_trajectories: int = 3
    smooth: int = 5
    last_steps: int = 5
    n_boot: int = 1000
    seed: int = 0
    metrics: tuple[str, ...] = fg.DEFAULT_TRAINING_METRICS


class Skip(Exception):
    """A figure's input is missing; the message names the runs, arm and file."""


def resolve_runs(paths: tuple[Path, ...] | list[Path]) -> list[Path]:
    """The run directories named by ``--runs``: a run directory itself, or every run directory
    directly inside a folder; duplicates (e.g. ``runs/latest`` and its target) once.

    Raises:
        FileNotFoundError: a path does not exist. RunDirError: a path is a file, or a folder
            with no run directory in or directly under it.
    """
    if not paths:
        raise ValueError("--runs: give at least one run directory")
    runs: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"--runs {path}: path does not exist")
        if (path / rd.MANIFEST).is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(rd.find_runs(path))
            if not found:
                raise rd.RunDirError(
                    f"--runs {path}: no {rd.MANIFEST} in it or in any folder directly inside it"
                )
        else:
            raise rd.RunDirError(f"--runs {path}: not a folder")
        for run in found:
            runs.setdefault(run.resolve(), run)
    return list(runs.values())


@dataclass
class RunSet:
    """The arm folders of one or more run directories, with per-arm-type pooled attention."""

    runs: list[Path]
    notes: list[str] = field(default_factory=list)
    _pooled: dict[str, tuple[pd.DataFrame, pd.DataFrame, list[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = []
        for i, run in enumerate(self.runs):
            arms = rd.list_arms(run)
            rows += [(i, run, arm) for arm in arms["arm"]]
        self.arms = pd.DataFrame(rows, columns=["run_index", "run", "arm"])
        self.arms["arm_type"] = self.arms["arm"].map(arm_type)

    def where(self) -> str:
        """The run directories, comma-separated (for messages)."""
        return ", ".join(map(str, self.runs))

    def folders(self, arm_type: str) -> list[tuple[int, Path, str]]:
        """(run index, run, arm folder name) of every seed of ``arm_type``.

        Raises:
            Skip: no such arm in any run (the message lists the arms there are).
        """
        sel = self.arms[self.arms["arm_type"] == arm_type]
        if sel.empty:
            have = ", ".join(order_arms(self.arms["arm_type"])) or "none"
            raise Skip(f"no arm {arm_type!r} in {self.where()} (arms: {have})")
        return list(sel[["run_index", "run", "arm"]].itertuples(index=False, name=None))

    def attention(self, arm_type: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
        """Attention table and tool-call events of every seed of ``arm_type``, pooled by
        :func:`analysis.summaries.pool` (trajectory ids "r{run index}/{arm}|{id}", so seeds
        never collide), and the "run/arm" folders they came from. A seed without
        ``attention.parquet`` is noted.

        Raises:
            Skip: no arm, or no seed with an attention table. RunDirError: a corrupt table.
        """
        if arm_type in self._pooled:
            return self._pooled[arm_type]
        atts, events, used = {}, {}, []
        for i, run, arm in self.folders(arm_type):
            if not (run / arm / rd.ATTENTION).is_file():
                self.notes.append(f"{run / arm / rd.ATTENTION}: missing; {arm} left out")
                continue
            atts[f"r{i}/{arm}"] = rd.load_attention(run, arm)
            events[f"r{i}/{arm}"] = rd.load_attention_events(run, arm)
            used.append(f"{run}/{arm}")
        if not used:
            raise Skip(f"arm {arm_type!r} has no {rd.ATTENTION} in {self.where()}")
        pooled = (pool(atts), pool(events), used)
        self._pooled[arm_type] = pooled
        return pooled

    def measured(self) -> list[str]:
        """Arm types with an attention table in at least one seed (others noted)."""
        out = []
        for arm in order_arms(self.arms["arm_type"]):
            try:
                self.attention(arm)
                out.append(arm)
            except Skip as e:
                self.notes.append(str(e))
        if not out:
            raise Skip(f"no arm has an {rd.ATTENTION} in {self.where()}")
        return out

    def table(self, loader) -> pd.DataFrame:
        """``loader`` (rundir.load_eval / load_metrics) over every run, with a column "run"."""
        frames = [loader(run).assign(run=str(run)) for run in self.runs]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# One function per output: (figure or tables, {arm type: [run/arm folders]})


@contextmanager
def _reducing(used: list[str]) -> Iterator[None]:
    """Re-raise a reduction's ValueError (e.g. --kind value without value_mass) as Skip naming
    the attention tables it read."""
    try:
        yield
    except ValueError as e:
        raise Skip(f"{', '.join(f'{u}/{rd.ATTENTION}' for u in used)}: {e}") from e


def attention_shares(rs: RunSet, args: FiguresArgs):
    """Figure 1: ``share_by_token`` of the --base and --trained arms per setting; a setting
    that neither arm has is left out (noted). Raises Skip: an arm or its attention is missing."""
    rows, sources = {}, {}
    for arm in (args.base, args.trained):
        att, _, used = rs.attention(arm)
        with _reducing(used):
            counts = image_counts(att)
            rows[arm_label(arm)] = {
                s: share_by_token(in_setting(att, counts, s), ("group",), kind=args.kind)
                for s in SETTINGS
            }
        sources[arm] = used
    for setting in SETTINGS:
        if all(panels[setting].empty for panels in rows.values()):
            rs.notes.append(
                f"attention_shares: no {setting} trajectories in arms "
                f"{args.base!r}, {args.trained!r}; those panels left out"
            )
            for panels in rows.values():
                del panels[setting]
    if not any(rows[r] for r in rows):
        raise Skip("attention_shares: no trajectory with an input image")
    return fg.attention_shares_figure(rows, min_trajectories=args.min_trajectories), sources


def image_decay(rs: RunSet, args: FiguresArgs):
    """Image-share curve of every measured arm (tokens with >= --min-trajectories) and its
    ``decay_fit``. Raises Skip: no arm has an attention table."""
    curves, fits, sources = {}, {}, {}
    for arm in rs.measured():
        att, _, used = rs.attention(arm)
        with _reducing(used):
            curve = image_share_curve(att, kind=args.kind)
            curve = curve[curve["n"] >= args.min_trajectories]
            curves[arm], fits[arm], sources[arm] = curve, decay_fit(curve), used
    return fg.image_share_figure(curves, fits), sources


def tool_calls(rs: RunSet, args: FiguresArgs):
    """Event-aligned image share and ``before_after_ci`` (all tools pooled) of every arm with
    tool calls. Raises Skip: no tool call in any arm."""
    aligned, rows, sources = {}, [], {}
    for arm in rs.measured():
        att, events, used = rs.attention(arm)
        if events.empty:
            continue
        with _reducing(used):
            aligned[arm] = event_aligned_share(att, events, args.window, kind=args.kind)
            ci = before_after_ci(
                att, events, args.window, args.n_boot, args.seed, by=(), kind=args.kind
            )
        rows.append(ci.assign(arm=arm))
        sources[arm] = used
    if not rows:
        raise Skip(f"no tool call in any {rd.EVENTS} of {rs.where()}")
    return fg.tool_call_figure(aligned, pd.concat(rows, ignore_index=True)), sources


def training_curves(rs: RunSet, args: FiguresArgs):
    """The --metrics of every arm with a metrics table. Raises Skip: none logged."""
    metrics = rs.table(rd.load_metrics)
    if metrics.empty:
        raise Skip(f"no arm has a {rd.METRICS} in {rs.where()}")
    if not any(m in metrics and metrics[m].notna().any() for m in args.metrics):
        raise Skip(f"none of the metrics {list(args.metrics)} is logged in {rs.where()}")
    fig = fg.training_curves_figure(metrics, args.metrics, smooth=args.smooth)
    return fig, _sources(metrics)


def ablation_table(rs: RunSet, args: FiguresArgs):
    """The display table of :func:`analysis.tables.ablation_summary` over every run's
    evaluations and metrics.
    Raises Skip: no arm has an ``eval.json``."""
    evals = rs.table(rd.load_eval)
    if evals.empty:
        raise Skip(f"no arm has an {rd.EVAL} in {rs.where()}")
    summary = tables.ablation_summary(evals, rs.table(rd.load_metrics), last_steps=args.last_steps)
    return tables.ablation_table(summary), _sources(evals)


def _sources(df: pd.DataFrame) -> dict[str, list[str]]:
    """arm type -> the "run/arm" folders of a frame with columns run, arm."""
    pairs = df[["run", "arm"]].drop_duplicates()
    out: dict[str, list[str]] = {}
    for run, arm in pairs.itertuples(index=False, name=None):
        out.setdefault(arm_type(arm), []).append(f"{run}/{arm}")
    return {a: out[a] for a in order_arms(out)}


FIGURES = {
    "attention_shares": attention_shares,
    "image_decay": image_decay,
    "tool_calls": tool_calls,
    "training_curves": training_curves,
}


def _check(args: FiguresArgs) -> None:
    """Reject out-of-range options before anything is read."""
    if args.window < 1 or args.min_trajectories < 1 or args.smooth < 1 or args.last_steps < 1:
        raise ValueError("--window, --min-trajectories, --smooth and --last-steps must be >= 1")
    if args.n_boot < 1 or not args.formats:
        raise ValueError("--n-boot must be >= 1 and --formats non-empty")


def main(args: FiguresArgs) -> dict:
    """Write every figure, the ablation table and ``figures.json``; returns that index.

    Raises:
        FileNotFoundError, RunDirError: a ``--runs`` path is missing or holds no run directory.
        ValueError: a bad option, or nothing at all could be drawn (the reasons listed).
    """
    _check(args)
    rs = RunSet(resolve_runs(args.runs))
    out = Path(args.out)
    index: dict = {
        "created": rd.utc_now(), "relook_version": rd.relook_version(),
        "runs": [str(r) for r in rs.runs], "options": asdict(args), "figures": {},
        "tables": {}, "skipped": {}, "notes": [],
    }  # fmt: skip
    for name, build in [*FIGURES.items(), ("ablation_table", ablation_table)]:
        try:
            made, sources = build(rs, args)
        except (Skip, rd.RunDirError, ValueError) as e:
            index["skipped"][name] = str(e)
            print(f"skipped {name}: {e}", file=sys.stderr)
            continue
        if name == "ablation_table":
            files = _write_tables(made, out)
            index["tables"][name] = {"files": files, "arms": sources}
            print(tables.table_markdown(made))
        else:
            files = [p.name for p in fg.save(made, out, name, args.formats)]
            index["figures"][name] = {"files": files, "arms": sources}
    index["notes"] = list(dict.fromkeys(rs.notes))
    for note in index["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if not index["figures"] and not index["tables"]:
        reasons = "; ".join(f"{k}: {v}" for k, v in index["skipped"].items())
        raise ValueError(f"nothing could be drawn from {rs.where()} ({reasons})")
    rd.atomic_write_json(out / "figures.json", index)
    written = [
        f for kind in ("figures", "tables") for v in index[kind].values() for f in v["files"]
    ]
    print(f"wrote {len(written)} files to {out}: {', '.join(written)} (+ figures.json)")
    return index


def _write_tables(table: pd.DataFrame, out: Path) -> list[str]:
    """Write ablation_table.md and .tex atomically; returns their names."""
    out.mkdir(parents=True, exist_ok=True)
    caption = (
        "Held-out results per arm: mean $\\pm$ sample std over seeds (fractions; "
        "T=1: the sampled probe; train reward: mean of the last training steps)."
    )
    rd.atomic_write_text(out / "ablation_table.md", tables.table_markdown(table))
    rd.atomic_write_text(out / "ablation_table.tex", tables.table_latex(table, caption=caption))
    return ["ablation_table.md", "ablation_table.tex"]


if __name__ == "__main__":
    from experiments.cli import run_cli

    run_cli(main, FiguresArgs)
