"""The run directory: the on-disk contract between training, the app and the figures.

Layout (docs/design.md decision 5)::

    RUN/
      manifest.json              relook_version, created, grid, arms, seeds, versions, status,
                                 events (interrupted / resumed / finished, with times)
      .lock, .lock.owner.json    the writer's lock (flock) and its owner: pid, host, started
      ARM/                       one folder per arm, e.g. "full-s0", "tools_none-s1"
        config.json              resolved config of the arm
        status.json              status, started, finished, error, stage
        metrics.parquet          one row per training step: "step" + float "namespace/name" columns
        eval.json                split, n, accuracy, per_family, tool_call_rate, tool_calls, model
        trajectories.jsonl       one json object per trajectory
        attention.parquet        long table, one row per (trajectory, token, layer, head, region)
        attention_events.parquet one row per tool call

Every write is atomic (temp file in the same folder, fsync, ``os.replace``): a reader never sees a
half-written file under its final name. Readers raise :class:`RunDirError` naming the path and
the problem; readers of optional files return an empty frame with the right columns.
One process at a time writes a run directory: :func:`lock_run` holds an exclusive ``flock`` on
``RUN/.lock`` that the kernel releases when the holder dies, however it dies.

The attention metrics over these tables live in :mod:`analysis.metrics`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import pandas as pd
from filelock import FileLock, Timeout

MANIFEST = "manifest.json"
CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.parquet"
EVAL = "eval.json"
TRAJECTORIES = "trajectories.jsonl"
ATTENTION = "attention.parquet"
EVENTS = "attention_events.parquet"
LOCK = ".lock"
LOCK_OWNER = ".lock.owner.json"

# Column -> dtype of the attention tables: readers check the names, empty frames use the dtypes.
ATTENTION_COLUMNS: dict[str, str] = dict(
    trajectory="str", token="int64", pos="int64", turn="int64", layer="int64", head="int64",
    region="str", image="int64", origin="str", mass="float32",
)  # fmt: skip
EVENT_COLUMNS: dict[str, str] = dict(
    trajectory="str", token="int64", tool="str", ok="bool", turn="int64"
)  # fmt: skip
_HAS = {"metrics": METRICS, "eval": EVAL, "attention": ATTENTION}
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


class RunDirError(ValueError):
    """A run directory, or one of its files, is missing, corrupt or lacks a required field."""


# Atomic writes


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a temp file beside ``path``; on success fsync it, make it world-readable (mkstemp
    creates 0600; run files and figures are meant to be shared) and ``os.replace`` it onto
    ``path``. On any error the temp file is removed and ``path`` is left as it was.

    Raises:
        OSError: the folder of ``path`` does not exist or is not writable.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file in the same folder, fsync, replace."""
    with atomic_file(Path(path), "w") as f:
        f.write(text)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (dataclasses, paths and numpy values allowed)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    """Write ``df`` as parquet (pyarrow, index dropped) atomically."""
    with atomic_file(Path(path), "wb") as f:
        df.to_parquet(f, engine="pyarrow", index=False)


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (timestamps of run files)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def relook_version() -> str:
    """The installed relook version ("0.1.0+src" for a source checkout not pip-installed)."""
    try:
        return importlib.metadata.version("relook")
    except importlib.metadata.PackageNotFoundError:  # a source checkout
        return "0.1.0+src"


# Writers


def _check_arm(arm: str) -> None:
    if not _ARM_NAME.match(arm):
        raise ValueError(f"bad arm name {arm!r}: use letters, digits and _ . = + - only")


def check_run_root(root: str | Path, grid: str) -> None:
    """Check that ``root`` can become (or already is) a run directory of ``grid``; writes nothing.

    Raises:
        RunDirError: ``root`` is a file, lies under a file, is a non-empty folder without a
            manifest, holds a run of another grid, or its nearest existing folder is not
            writable (the check creates and removes a temp file there: permission bits say
            nothing for root).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"{root}: exists and is not a folder")
    if root.is_dir() and set(os.listdir(root)) - {LOCK, LOCK_OWNER}:
        if not (root / MANIFEST).is_file():
            raise RunDirError(
                f"{root}: folder is not empty and has no {MANIFEST}; refusing to write a run "
                "directory into it (choose a new or empty folder)"
            )
        old = load_manifest(root)
        if old.get("grid") != grid:
            raise RunDirError(f"{root}: holds grid {old.get('grid')!r}, not {grid!r}")
    folder = root.absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise RunDirError(f"{root}: cannot be created, {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise RunDirError(f"{root}: cannot write in {folder} ({e.strerror or e})") from e


def create_run(
    root: str | Path, grid: str, arms: Sequence[str], seeds: Sequence[int], versions: dict[str, str]
) -> Path:
    """Create (or reopen, to resume) a run directory and write its manifest with status "running".

    Args:
        root: the run folder, created if missing. An existing run directory of the same grid
            is reopened to resume (arms and seeds merged, ``created`` and ``events`` kept,
            ``resumed`` set and a "resumed" event added).
        grid: name of the ablation grid. arms: e.g. ["full-s0", "tools_none-s0"].
        seeds: the grid's seeds. versions: e.g. {"python": "3.12.3", "torch": "2.13.0"}.

    Returns:
        The run folder.

    Raises:
        RunDirError: as :func:`check_run_root`.
    """
    root = Path(root)
    for arm in arms:
        _check_arm(arm)
    check_run_root(root, grid)
    manifest = dict(
        relook_version=relook_version(), created=utc_now(), grid=grid, arms=list(arms),
        seeds=[int(s) for s in seeds], versions=dict(versions), status="running", events=[],
    )  # fmt: skip
    if (root / MANIFEST).is_file():
        old = load_manifest(root)
        manifest["created"] = old.get("created", manifest["created"])
        manifest["resumed"] = utc_now()
        manifest["arms"] = list(dict.fromkeys([*old.get("arms", []), *arms]))
        manifest["seeds"] = sorted({*old.get("seeds", []), *manifest["seeds"]})
        manifest["events"] = [*old.get("events", []), {"event": "resumed", "at": utc_now()}]
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MANIFEST, manifest)
    return root


@contextmanager
def lock_run(root: str | Path) -> Iterator[Path]:
    """Hold the run directory's writer lock: an exclusive ``flock`` on ``root/.lock`` (the
    folder is created if missing), with the owner's pid, host and start time in
    ``root/.lock.owner.json``. The kernel drops the lock when its holder dies, also by
    SIGKILL, so a lock left by a dead process is taken over without any clean-up.

    Raises:
        RunDirError: another live process holds the lock (the message names it).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(f"{root}: in use, {_lock_owner(root)}; wait for it or stop it") from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}
        atomic_write_json(root / LOCK_OWNER, owner)
        yield root
    finally:
        lock.release()


def _lock_owner(root: Path) -> str:
    try:
        owner = _read_json(root / LOCK_OWNER)
        who = f"pid {owner['pid']} on {owner['host']} since {owner['started']}"
    except (RunDirError, KeyError, TypeError):
        who = "another process"
    return f"locked ({root / LOCK}) by {who}"


def _read_status(run: Path, arm: str) -> dict[str, Any]:
    return _read_json(Path(run) / arm / STATUS)


def start_arm(run: str | Path, arm: str, config: dict[str, Any] | Any) -> Path:
    """Start (or restart) an arm: write ``config.json`` (a dict or dataclass) and a "running"
    ``status.json``; add the arm to the manifest if missing. Returns the arm folder."""
    run = Path(run)
    _check_arm(arm)
    manifest = load_manifest(run)
    if arm not in manifest["arms"]:
        manifest["arms"].append(arm)
        atomic_write_json(run / MANIFEST, manifest)
    folder = run / arm
    folder.mkdir(exist_ok=True)
    atomic_write_json(folder / CONFIG, config)
    status = dict(status="running", started=utc_now(), finished=None, error=None, stage="start")
    atomic_write_json(folder / STATUS, status)
    return folder


def set_arm_stage(run: str | Path, arm: str, stage: str) -> None:
    """Record the stage an arm is in, e.g. "train", "eval", "attention"."""
    status = _read_status(Path(run), arm)
    status["stage"] = stage
    atomic_write_json(Path(run) / arm / STATUS, status)


def finish_arm(
    run: str | Path, arm: str, status: str = "complete", error: str | None = None
) -> None:
    """Mark an arm "complete" or "failed" (with an error message) and stamp ``finished``."""
    if status not in ("complete", "failed"):
        raise ValueError(f"finish_arm: status must be 'complete' or 'failed', got {status!r}")
    record = _read_status(Path(run), arm)
    record.update(status=status, finished=utc_now(), error=error)
    if status == "complete":
        record["stage"] = "done"
    atomic_write_json(Path(run) / arm / STATUS, record)


def _add_event(manifest: dict[str, Any], event: str, **fields: Any) -> None:
    manifest["events"] = [*manifest.get("events", []), {"event": event, "at": utc_now(), **fields}]


def finish_run(run: str | Path) -> str:
    """Set (and return) the manifest status: "complete" if every arm is, else "incomplete"
    (a "finished" event records it)."""
    run = Path(run)
    manifest = load_manifest(run)
    arms = list_arms(run)
    done = set(arms.loc[arms["status"] == "complete", "arm"])
    manifest["status"] = "complete" if set(manifest["arms"]) <= done else "incomplete"
    manifest["finished"] = utc_now()
    _add_event(manifest, "finished", status=manifest["status"])
    atomic_write_json(run / MANIFEST, manifest)
    return str(manifest["status"])


def mark_interrupted(run: str | Path, error: str = "interrupted") -> list[str]:
    """Flip every "running" arm to "failed" with ``error``; manifest -> "incomplete", with an
    "interrupted" event naming the flipped arms.

    For a ``KeyboardInterrupt``/exception handler, and for a resume that finds arms left
    "running" by a process that is gone: returns the flipped arms; never raises for a corrupt
    status file (that arm is marked failed too); does nothing without a manifest.
    """
    run = Path(run)
    try:
        manifest = load_manifest(run)
    except RunDirError:
        return []
    flipped = []
    for arm in [a for a in manifest["arms"] if (run / a).is_dir()]:
        try:
            status = _read_status(run, arm)
        except RunDirError:
            status = {"status": "running", "started": None, "stage": "unknown"}
        if status.get("status") == "running":
            status.update(status="failed", finished=utc_now(), error=error)
            atomic_write_json(run / arm / STATUS, status)
            flipped.append(arm)
    manifest["status"] = "incomplete"
    _add_event(manifest, "interrupted", arms=flipped, error=error)
    atomic_write_json(run / MANIFEST, manifest)
    return flipped


def write_metrics(run: str | Path, arm: str, metrics: pd.DataFrame | Sequence[dict]) -> None:
    """Write an arm's whole metrics table atomically: one row per step, column "step" (int) and
    float "namespace/name" columns, e.g. "rollout/reward_mean", "timing_s/step" (seconds)."""
    df = pd.DataFrame(metrics)
    _require(df, ["step"], Path(run) / arm / METRICS)
    df = df.astype({"step": "int64"}).sort_values("step", kind="stable")
    atomic_write_parquet(Path(run) / arm / METRICS, df.reset_index(drop=True))


def write_eval(run: str | Path, arm: str, result: dict[str, Any]) -> None:
    """Write ``eval.json``: split, n, accuracy, per_family, tool_call_rate, tool_calls, model."""
    if "n" not in result or "accuracy" not in result:
        raise RunDirError(f"{Path(run) / arm / EVAL}: missing required key 'n' or 'accuracy'")
    atomic_write_json(Path(run) / arm / EVAL, result)


def write_trajectories(run: str | Path, arm: str, records: Iterable[dict[str, Any]]) -> None:
    """Write ``trajectories.jsonl``, one JSON object per line (at least id, family, reward)."""
    lines = [json.dumps(r, default=_json_default) for r in records]
    atomic_write_text(Path(run) / arm / TRAJECTORIES, "".join(line + "\n" for line in lines))


def _write_table(path: Path, df: pd.DataFrame, columns: dict[str, str]) -> None:
    _require(df, columns, path)
    atomic_write_parquet(path, df.astype(columns))


def write_attention(run: str | Path, arm: str, att: pd.DataFrame) -> None:
    """Write ``attention.parquet`` (columns :data:`ATTENTION_COLUMNS`; mass stored float32)."""
    _write_table(Path(run) / arm / ATTENTION, att, ATTENTION_COLUMNS)


def write_attention_events(run: str | Path, arm: str, events: pd.DataFrame) -> None:
    """Write ``attention_events.parquet`` (columns :data:`EVENT_COLUMNS`)."""
    _write_table(Path(run) / arm / EVENTS, events, EVENT_COLUMNS)


# Readers


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RunDirError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: corrupt JSON ({e})") from e


def _require(df: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise RunDirError(f"{path}: missing required column(s) {missing}")


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


def _read_parquet(path: Path, required: Iterable[str]) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path, engine="pyarrow")
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
        raise RunDirError(f"{path}: corrupt parquet ({type(e).__name__}: {e})") from e
    _require(df, required, path)
    return df


def find_runs(root: str | Path) -> list[Path]:
    """Run directories directly inside ``root`` (e.g. ``runs/``), newest first by manifest mtime."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / MANIFEST).is_file()]
    return sorted(runs, key=lambda p: (p / MANIFEST).stat().st_mtime_ns, reverse=True)


def run_stamp(run: str | Path) -> int:
    """Latest modification time (ns) of the manifest and any arm file: a cache key for the app."""
    run = Path(run)
    folders = [run, *[p for p in run.iterdir() if p.is_dir()]] if run.is_dir() else []
    return max([0] + [f.stat().st_mtime_ns for d in folders for f in d.iterdir() if f.is_file()])


def load_manifest(run: str | Path) -> dict[str, Any]:
    """Read ``manifest.json``. Raises RunDirError if the path does not exist, is not a run
    directory (no manifest), the JSON is corrupt, or it lacks the "arms" list."""
    run = Path(run)
    if not run.is_dir():
        raise RunDirError(f"{run}: " + ("not a folder" if run.exists() else "path does not exist"))
    if not (run / MANIFEST).is_file():
        raise RunDirError(f"{run}: no {MANIFEST}; not a relook run directory")
    manifest = _read_json(run / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arms"), list):
        raise RunDirError(f"{run / MANIFEST}: missing required key 'arms' (a list)")
    return manifest


def list_arms(run: str | Path) -> pd.DataFrame:
    """One row per arm (manifest order, then other folders with a ``status.json``): its status
    and which result files exist.

    Returns:
        Columns arm, status ("pending" for an arm not started), stage, started, finished,
        error, has_metrics, has_eval, has_attention (bools).

    Raises:
        RunDirError: missing/corrupt manifest or a corrupt ``status.json``.
    """
    run = Path(run)
    arms = list(load_manifest(run)["arms"])
    extra = sorted(p.name for p in run.iterdir() if (p / STATUS).is_file() and p.name not in arms)
    rows = []
    for arm in arms + extra:
        folder = run / arm
        status = _read_status(run, arm) if (folder / STATUS).is_file() else {"status": "pending"}
        row = {"arm": arm, "status": status.get("status", "unknown")}
        row |= {k: status.get(k) for k in ("stage", "started", "finished", "error")}
        row |= {f"has_{k}": (folder / f).is_file() for k, f in _HAS.items()}
        rows.append(row)
    columns = ["arm", "status", "stage", "started", "finished", "error"]
    return pd.DataFrame(rows, columns=columns + [f"has_{k}" for k in _HAS])


def _arm_names(run: Path, arms: Sequence[str] | None) -> list[str]:
    return list(load_manifest(run)["arms"]) if arms is None else list(arms)


def load_metrics(run: str | Path, arms: Sequence[str] | None = None) -> pd.DataFrame:
    """All arms' per-step metrics concatenated (``arms``: default all; those without metrics
    are skipped).

    Returns:
        Columns arm, step, then the union of metric columns (NaN where an arm did not log one),
        sorted by arm, step; just arm, step if nothing is logged yet.

    Raises:
        RunDirError: a corrupt parquet or one without "step".
    """
    run = Path(run)
    frames = []
    for arm in _arm_names(run, arms):
        path = run / arm / METRICS
        if path.is_file():
            frames.append(_read_parquet(path, ["step"]).assign(arm=arm))
    if not frames:
        return _empty({"arm": "str", "step": "int64"})
    df = pd.concat(frames, ignore_index=True)
    df = df[["arm", "step", *[c for c in df.columns if c not in ("arm", "step")]]]
    return df.sort_values(["arm", "step"], kind="stable").reset_index(drop=True)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def load_eval(run: str | Path, arms: Sequence[str] | None = None) -> pd.DataFrame:
    """Held-out evaluation results, one row per arm that has an ``eval.json``.

    Nested dicts are flattened with "/": columns arm, split, n, accuracy, tool_call_rate,
    tool_calls/reflect, tool_calls/confirm, per_family/{family}, model (fractions in [0, 1];
    tool_calls are mean calls per sample).

    Raises:
        RunDirError: corrupt JSON, or a result without "n" or "accuracy".
    """
    run = Path(run)
    rows = []
    for arm in _arm_names(run, arms):
        path = run / arm / EVAL
        if not path.is_file():
            continue
        result = _read_json(path)
        if not isinstance(result, dict) or "accuracy" not in result or "n" not in result:
            raise RunDirError(f"{path}: missing required key(s) 'n' and/or 'accuracy'")
        row: dict[str, Any] = {"arm": arm}
        _flatten("", result, row)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["arm", "split", "n", "accuracy", "tool_call_rate", "model"])
    return pd.DataFrame(rows)


def _read_optional(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    return _read_parquet(path, columns) if path.is_file() else _empty(columns)


def load_attention(run: str | Path, arm: str) -> pd.DataFrame:
    """The long attention table of an arm (columns :data:`ATTENTION_COLUMNS`); empty if none yet.

    Raises:
        RunDirError: corrupt parquet or a missing required column.
    """
    return _read_optional(Path(run) / arm / ATTENTION, ATTENTION_COLUMNS)


def load_attention_events(run: str | Path, arm: str) -> pd.DataFrame:
    """Tool-call events of an arm (columns :data:`EVENT_COLUMNS`); empty frame if none yet.

    Raises:
        RunDirError: corrupt parquet or a missing required column.
    """
    return _read_optional(Path(run) / arm / EVENTS, EVENT_COLUMNS)


def load_trajectories(run: str | Path, arm: str) -> list[dict[str, Any]]:
    """The trajectory records of an arm; [] if none yet.

    Raises:
        RunDirError: a line that is not a JSON object (the message names the line number).
    """
    path = Path(run) / arm / TRAJECTORIES
    return read_records(path) if path.is_file() else []


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (blank lines skipped), e.g. ``trajectories.jsonl``.

    Raises:
        FileNotFoundError: no such file.
        RunDirError: a line that is not a JSON object (the message names the file and line).
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunDirError(f"{path}: corrupt JSON on line {lineno} ({e})") from e
            if not isinstance(record, dict):
                raise RunDirError(f"{path}: line {lineno} is not a JSON object")
            records.append(record)
    return records
