"""Where the arms of a grid run: one after another here, a local process pool, or a Ray cluster.

``python -m experiments.ablate --launcher local`` (default) runs the arms in this process one
at a time, or ``--workers N`` at a time in spawned processes. ``--launcher ray`` submits each
arm as a Ray task (:func:`ray.remote` with ``--num-gpus-per-arm`` / ``--num-cpus-per-arm``
resources) to the cluster at ``--ray-address`` (``auto``: the one this node belongs to;
unset: a Ray instance started on this machine). Ray schedules as many arms at once as the
resources allow.

The run directory contract holds for every launcher (:mod:`analysis.rundir`): each arm writes
only its own folder (``config.json``, ``status.json``, metrics, ...), and the lead process
writes ``manifest.json``, listing every arm before any is dispatched, so that arms running at
the same time never write the manifest. An arm whose process dies without recording its end
(a killed Ray worker, an out-of-memory kill) is marked failed by the lead. For Ray on several
nodes, the run directory must be on a filesystem every node sees, and relook must be
installed on every node (``pip install -e '.[ray]'``).

Each arm is one process: an arm that needs several GPUs for data-parallel training is launched
with ``torchrun``/``deepspeed`` instead (``experiments.ablate``'s docstring); a fractional
``--num-gpus-per-arm`` (e.g. 0.5) packs small arms onto one GPU.

Local pool workers die with the lead process (:func:`die_with_parent`), also when it is
SIGKILLed: no orphaned arm goes on training into a run directory that a rerun resumes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from train.config import ArmConfig

LAUNCHERS = ("local", "ray")
RAY_MISSING = (
    "--launcher ray needs Ray, which is not installed: pip install -e '.[ray]' "
    "(or pip install 'ray>=2.9'); every node of the cluster needs it, and relook"
)

PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal a process gets when the thread that forked it dies."""

ArmFn = Callable[..., str]
"""``arm_fn(run, cfg, base_model, progress) -> status`` (``experiments.ablate.run_arm``)."""


def require_ray():
    """The ``ray`` module.

    Raises:
        ImportError: Ray is not installed (the message says how to install it).
    """
    try:
        import ray
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc
    return ray


class RayExecutor(Executor):
    """A :class:`concurrent.futures.Executor` whose ``submit`` runs the function as a Ray task.

    Args:
        address: the Ray cluster (``"auto"``, ``"ray://host:10001"``, ...); None starts a
            local Ray instance (``num_cpus`` of them) unless one is already initialised.
        num_gpus: GPUs reserved per task (fractions allowed; Ray sets
            ``CUDA_VISIBLE_DEVICES`` in the task's process).
        num_cpus: CPUs reserved per task.
        init_kwargs: further :func:`ray.init` arguments (e.g. ``num_cpus``,
            ``include_dashboard``), used only when this executor starts Ray.

    Raises:
        ImportError: Ray is not installed (the message says how to install it).
    """

    def __init__(
        self,
        address: str | None = None,
        num_gpus: float = 0.0,
        num_cpus: float = 1.0,
        **init_kwargs: Any,
    ):
        ray = require_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            init_kwargs.setdefault("include_dashboard", False)
            init_kwargs.setdefault("log_to_driver", True)
            ray.init(address=address, **init_kwargs)
            self._started = True
        # max_calls=1: every arm in a fresh worker process (no torch RNG, process-group or
        # GPU memory left over from the arm before); max_retries=0: a failed arm is recorded
        self._options = {
            "num_gpus": num_gpus, "num_cpus": num_cpus, "max_calls": 1, "max_retries": 0,
        }  # fmt: skip

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` as a Ray task; the future resolves to its result."""
        task = self._ray.remote(**self._options)(fn)
        return task.remote(*args, **kwargs).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut Ray down if this executor started it."""
        if self._started:
            self._ray.shutdown()
            self._started = False


def run_arms(
    run: Path,
    todo: list[ArmConfig],
    base_model: str,
    arm_fn: ArmFn,
    executor: Executor | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Run ``arm_fn`` for every arm of ``todo``; returns ``{arm name: final status}``.

    Without ``executor``, the arms run in this process in order (``progress`` passed on).
    With one, all are submitted at once (``progress=False`` to the arms: their bars would
    interleave) and collected as they finish; an arm whose future raises (its process died,
    or Ray could not run it) is recorded as failed in its ``status.json`` when that file
    still says "running" or is missing, and the others go on.

    Raises:
        ValueError: two arms share a name (they would write the same folder).
    """
    from tqdm.auto import tqdm

    names = [c.name for c in todo]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    statuses: dict[str, str] = {}
    if executor is None:
        for cfg in tqdm(todo, desc="arms", disable=not progress):
            statuses[cfg.name] = arm_fn(run, cfg, base_model, progress)
        return statuses
    futures = {executor.submit(arm_fn, run, cfg, base_model, False): cfg.name for cfg in todo}
    for fut in tqdm(as_completed(futures), total=len(futures), desc="arms", disable=not progress):
        name = futures[fut]
        try:
            statuses[name] = fut.result()
        except Exception as exc:  # the arm's process is gone: record it, go on
            statuses[name] = "failed"
            _record_lost_arm(run, name, exc)
        tqdm.write(f"  {name}: {statuses[name]}")
    return statuses


def _record_lost_arm(run: Path, arm: str, exc: BaseException) -> None:
    """Mark ``arm`` failed unless it recorded an end itself (a status other than running)."""
    from analysis import rundir

    message = f"arm process lost: {type(exc).__name__}: {exc}"
    try:
        status = rundir.list_arms(run).set_index("arm")["status"].get(arm)
    except rundir.RunDirError:
        status = None
    if status in ("complete", "failed"):
        return
    if status is None or status == "pending":
        rundir.start_arm(run, arm, {"name": arm})
    rundir.finish_arm(run, arm, "failed", message)


def make_executor(
    launcher: str,
    workers: int = 1,
    ray_address: str | None = None,
    num_gpus_per_arm: float = 0.0,
    num_cpus_per_arm: float = 1.0,
    n_arms: int = 1,
) -> Executor | None:
    """The executor for ``--launcher`` (None: run the arms in this process, in order).

    ``local`` with ``workers > 1`` and more than one arm: a pool of ``workers`` spawned
    processes. ``ray``: a :class:`RayExecutor`.

    Raises:
        ValueError: unknown launcher, or negative resources.
        ImportError: ``ray`` without Ray installed.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if num_gpus_per_arm < 0 or num_cpus_per_arm < 0:
        raise ValueError(
            f"--num-gpus-per-arm and --num-cpus-per-arm must be >= 0, got "
            f"{num_gpus_per_arm} and {num_cpus_per_arm}"
        )
    if launcher == "ray":
        return RayExecutor(ray_address, num_gpus=num_gpus_per_arm, num_cpus=num_cpus_per_arm)
    if workers <= 1 or n_arms <= 1:
        return None
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"),
        initializer=die_with_parent, initargs=(os.getpid(),),
    )  # fmt: skip


def die_with_parent(parent: int, interval_s: float = 0.5) -> None:
    """Make this (worker) process exit when process ``parent`` dies, however it dies.

    On Linux the kernel sends SIGKILL at once (``prctl(PR_SET_PDEATHSIG)``; the pool forks
    its workers from the lead's main thread, whose death is the process's). Everywhere, a
    daemon thread checks every ``interval_s`` seconds that ``os.getppid()`` is still
    ``parent`` (it changes when the orphan is re-parented) and ends the process otherwise;
    it also covers a parent that died before this ran.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # else the watchdog alone
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent, interval_s), name="die-with-parent", daemon=True
    ).start()


def _watch_parent(parent: int, interval_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    os._exit(1)  # no clean-up: the lead is gone and a rerun owns the run directory now


def stop_executor(executor: Executor | None, kill: bool = False) -> None:
    """Shut ``executor`` down: wait for its arms, or with ``kill`` cancel the queued ones and
    SIGKILL the local pool's worker processes at once (the lead is being interrupted; it
    marks their arms failed itself)."""
    if executor is None:
        return
    if not kill or not isinstance(executor, ProcessPoolExecutor):
        executor.shutdown(wait=not kill, cancel_futures=kill)
        return
    processes = list((executor._processes or {}).values())  # no public handle before 3.14
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.join(timeout=5)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP received (:func:`sigterm_as_interrupt`): handled like Ctrl-C, arms
    and run marked interrupted; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within this context SIGTERM and SIGHUP raise :class:`Terminated` (a
    ``KeyboardInterrupt``) in the main thread, so that the lead marks its arms failed and
    stops the pool instead of dying silently. Signals that are ignored (``nohup``) stay
    ignored; outside the main thread (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]
    old = {s: signal.signal(s, _raise_terminated) for s in signums}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
