"""Experiment tracking (``ArmConfig.report_to``, TRL's ``report_to``): each arm's per-step
metric rows (the same ``namespace/name`` keys as ``metrics.parquet``), its resolved config
(hparams), its held-out summary and a few sample rollouts with their images, also sent to
TensorBoard, Weights & Biases or MLflow.

Nothing here touches the network: W&B runs offline (``wandb sync`` uploads later), MLflow
writes a ``file:`` store, TensorBoard writes event files. Every log lives inside the arm's
folder: ``ARM/tensorboard/``, ``ARM/wandb/offline-run-*/``, ``ARM/mlruns/``. A resumed arm
opens a new tracker run and logs its restored rows again (TensorBoard: the same folder).

The backends' libraries are heavy optional dependencies (pip extras ``track`` and ``mlflow``),
so each is imported inside its own class, only when that backend is chosen; :func:`require`
checks that the chosen one is installed before any run directory is made.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from train.config import REPORT_TO, ArmConfig

# backend -> (module that must import, pip extra that installs it)
BACKENDS = {
    "tensorboard": ("tensorboard", "track"),
    "wandb": ("wandb", "track"),
    "mlflow": ("mlflow", "mlflow"),
}
PROJECT = "relook"
"""W&B project and MLflow experiment name."""


@dataclass
class RolloutSample:
    """What a tracker shows of one trajectory: its sample, outcome, turns and images."""

    id: str
    family: str
    gold: str
    answer: str | None
    reward: float
    acc: float
    tool_calls: int
    text: str
    images: list[Image.Image]

    def markdown(self) -> str:
        """The trajectory as Markdown (TensorBoard text, MLflow artifact)."""
        head = (
            f"**{self.id}** ({self.family}) gold `{self.gold}`, answer `{self.answer}`, "
            f"reward {self.reward:.3f}, acc {self.acc:.0f}, tool calls {self.tool_calls}"
        )
        body = "\n".join(f"    {line}" for line in self.text.splitlines())  # a code block
        return f"{head}\n\n{body}\n"


def rollout_samples(trajs: list, n: int = 4, max_images: int = 4) -> list[RolloutSample]:
    """The first ``n`` trajectories as :class:`RolloutSample` (``max_images`` images each)."""
    out = []
    for t in trajs[:n]:
        turns = [
            f"turn {e.turn} [{e.kind}{' ' + e.tool if e.tool else ''}"
            f"{' ok' if e.kind == 'tool_call' and e.ok else ''}] {e.text}"
            for e in t.events
        ]
        out.append(
            RolloutSample(
                id=f"{t.sample_id}/g{t.group}", family=t.family, gold=t.gold, answer=t.answer,
                reward=float(t.reward), acc=float(t.acc), tool_calls=sum(t.n_tool_calls.values()),
                text="\n".join(turns), images=[r.image for r in t.images[:max_images]],
            )
        )  # fmt: skip
    return out


class Tracker(Protocol):
    """One arm's tracking run. ``step`` is the GRPO step of the metrics rows."""

    def log_config(self, config: dict) -> None:
        """The resolved config (nested dicts flattened to ``a/b`` hparams)."""

    def log_metrics(self, row: dict) -> None:
        """One metrics row: ``step`` + ``namespace/name`` floats."""

    def log_rollouts(self, samples: list[RolloutSample], step: int) -> None:
        """A few trajectories with their images."""

    def log_summary(self, summary: dict, step: int) -> None:
        """The arm's held-out evaluation (``eval.json``), as ``final_eval/*``."""

    def close(self) -> None:
        """Flush and end the run."""


def require(report_to: str) -> None:
    """Check that ``report_to``'s library is installed (no import: they are slow).

    Raises:
        ValueError: unknown backend.
        ImportError: its library is missing; the message names the pip extra.
    """
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {REPORT_TO}, got {report_to!r}")
    if report_to == "none":
        return
    module, extra = BACKENDS[report_to]
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"--report-to {report_to} needs the {module!r} package: pip install -e '.[{extra}]'"
        )


@contextmanager
def open_tracker(cfg: ArmConfig, folder: Path, group: str = "") -> Iterator[Tracker]:
    """The tracker of ``cfg.report_to`` for the arm in ``folder`` (config logged at once),
    closed when the block exits, also on an exception. ``group``: the run directory's name
    (W&B group, MLflow tag), so that a grid's arms are found together."""
    cls = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MLflowTracker}
    tracker: Tracker = (
        cls[cfg.report_to](Path(folder), cfg.name, group)
        if cfg.report_to != "none"
        else NullTracker()
    )
    try:
        tracker.log_config(asdict(cfg))
        yield tracker
    finally:
        tracker.close()


class NullTracker:
    """``report_to="none"``: logs nothing."""

    def log_config(self, config: dict) -> None:
        pass

    def log_metrics(self, row: dict) -> None:
        pass

    def log_rollouts(self, samples: list[RolloutSample], step: int) -> None:
        pass

    def log_summary(self, summary: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files in ``ARM/tensorboard`` (torch's ``SummaryWriter``; needs ``tensorboard``):
    scalars per metric, the config as text and hparams, rollouts as text + images."""

    def __init__(self, folder: Path, name: str, group: str = ""):
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: here only

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        self.hparams: dict[str, Any] = {}

    def log_config(self, config: dict) -> None:
        text = json.dumps(config, indent=1, default=str)
        self.writer.add_text("config", "\n".join(f"    {line}" for line in text.splitlines()))
        self.hparams = {k: _hparam(v) for k, v in flatten(config).items()}

    def log_metrics(self, row: dict) -> None:
        for key, value in numbers(row).items():
            self.writer.add_scalar(key, value, int(row["step"]))

    def log_rollouts(self, samples: list[RolloutSample], step: int) -> None:
        import numpy as np

        for i, s in enumerate(samples):
            self.writer.add_text(f"rollouts/{i}", s.markdown(), step)
            for k, image in enumerate(s.images):
                pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"rollouts/{i}/image_{k}", pixels, step, dataformats="HWC")

    def log_summary(self, summary: dict, step: int) -> None:
        final = {f"final_eval/{k}": v for k, v in numbers(flatten(summary)).items()}
        for key, value in final.items():
            self.writer.add_scalar(key, value, step)
        if "final_eval/accuracy" in final:  # the HParams tab: config beside the outcome
            metric = {"hparam/accuracy": final["final_eval/accuracy"]}
            self.writer.add_hparams(self.hparams, metric, run_name=".", global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """An offline W&B run in ``ARM/wandb/offline-run-*`` (``wandb sync`` uploads it): the
    config, history rows, a ``rollouts`` table and ``wandb.Image`` images, the summary."""

    def __init__(self, folder: Path, name: str, group: str = ""):
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no Sentry reports
        import wandb  # optional dependency: here only

        self.wandb = wandb
        # offline; no system-stats sampler, no machine-info (cloud metadata) probes, no git
        settings = wandb.Settings(
            mode="offline", console="off", silent=True, x_disable_stats=True,
            x_disable_machine_info=True, save_code=False, disable_git=True,
        )  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        # one run at a time: each arm's is finished before the next starts
        self.run = wandb.init(
            project=PROJECT, name=name, group=group or None, dir=str(folder), mode="offline",
            settings=settings,
        )  # fmt: skip
        self.step = 0

    def log_config(self, config: dict) -> None:
        self.run.config.update(flatten(config), allow_val_change=True)

    def log_metrics(self, row: dict) -> None:
        self.step = max(self.step, int(row["step"]))  # W&B steps only increase
        self.run.log(numbers(row), step=self.step)

    def log_rollouts(self, samples: list[RolloutSample], step: int) -> None:
        # Images as their own wandb.Image values, not table cells: a table's media travel in
        # an artifact staged outside the run folder (W&B 0.31 offline), these land in its
        # files/media/images. The table holds the text; ``id`` joins the two.
        columns = ["id", "family", "gold", "answer", "reward", "acc", "tool_calls", "text"]
        table = self.wandb.Table(columns=columns)
        values: dict[str, Any] = {"rollouts": table}
        for i, s in enumerate(samples):
            table.add_data(*(getattr(s, c) for c in columns))
            for k, image in enumerate(s.images):
                values[f"rollouts/{i}/image_{k}"] = self.wandb.Image(image, caption=s.id)
        self.step = max(self.step, step)
        self.run.log(values, step=self.step)

    def log_summary(self, summary: dict, step: int) -> None:
        final = {f"final_eval/{k}": v for k, v in numbers(flatten(summary)).items()}
        self.run.summary.update(final)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """An MLflow run in the file store ``ARM/mlruns`` (a ``file:`` tracking URI; view with
    ``mlflow ui --backend-store-uri ARM/mlruns``): params, metric histories, rollouts as
    Markdown and PNG artifacts, the summary as metrics."""

    def __init__(self, folder: Path, name: str, group: str = ""):
        # MLflow 3 refuses file stores unless asked (its default is a database, which needs
        # SQLAlchemy, not in mlflow-skinny); a store inside the run directory is the point here
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow  # optional dependency: here only

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=(folder / "mlruns").resolve().as_uri())
        found = self.client.get_experiment_by_name(PROJECT)
        exp = found.experiment_id if found else self.client.create_experiment(PROJECT)
        self.run_id = self.client.create_run(exp, run_name=name, tags={"group": group}).info.run_id

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_metrics(self, row: dict) -> None:
        self._metrics(numbers(row), int(row["step"]))

    def log_rollouts(self, samples: list[RolloutSample], step: int) -> None:
        for i, s in enumerate(samples):
            self.client.log_text(self.run_id, s.markdown(), f"rollouts/step{step}_{i}.md")
            for k, image in enumerate(s.images):
                file = f"rollouts/step{step}_{i}_image{k}.png"
                self.client.log_image(self.run_id, image, artifact_file=file)

    def log_summary(self, summary: dict, step: int) -> None:
        self._metrics({f"final_eval/{k}": v for k, v in numbers(flatten(summary)).items()}, step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined by ``/`` (``{"grpo": {"lr": x}}`` -> ``grpo/lr``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def numbers(row: dict) -> dict[str, float]:
    """The finite numeric entries of ``row`` as floats, ``step`` left out."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def _hparam(value: Any) -> Any:
    """A TensorBoard hparam value (bool, int, float or str)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)
