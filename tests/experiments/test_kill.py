"""A killed grid never corrupts a run: SIGKILL of ``python -m experiments.ablate`` mid-arm,
its pool workers die with it, a concurrent second command is refused by the run lock, and a
rerun recovers the stale "running" state and ends equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis import rundir

REPO = Path(__file__).resolve().parents[2]
GRID = ["--grid", "smoke", "--model", "random", "--seeds", "0", "--arms", "full", "gain0"]
GRID += ["--steps", "4", "--workers", "2", "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


def _ablate(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.ablate", *GRID, "--out", str(out), *extra]


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (``/proc/<pid>/task/*/children``, recursively)."""
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += sorted(kids - found)
            found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # an orphan's zombie, not reaped by this container's pid 1, is dead


def _wait_for(predicate, timeout_s: float, poll_s: float = 0.05) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def _running_arms(run: Path) -> list[str]:
    try:
        arms = rundir.list_arms(run)
    except (rundir.RunDirError, OSError, ValueError):
        return []  # a status file between mkdir and its first write
    return list(arms.loc[arms["status"] == "running", "arm"])


def _metrics(run: Path) -> pd.DataFrame:
    df = rundir.load_metrics(run)
    return df.drop(columns=[c for c in df.columns if c.startswith("timing_s/")])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_grid_leaves_no_workers_and_resumes_to_an_uninterrupted_run(tmp_path):
    run, log = tmp_path / "killed", (tmp_path / "lead.log").open("w")  # a pipe could fill up
    lead = subprocess.Popen(_ablate(run), cwd=REPO, env=_env(), stdout=log, stderr=log)
    try:
        assert _wait_for(lambda: (run / rundir.LOCK_OWNER).is_file(), 120)
        # a second command on the same folder while the first lives: refused, nothing touched
        second = subprocess.run(_ablate(run), cwd=REPO, env=_env(), capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"locked ({run / rundir.LOCK}) by pid {lead.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert _wait_for(lambda: _running_arms(run), 120), (tmp_path / "lead.log").read_text()
        workers = _descendants(lead.pid)
        running = _running_arms(run)
        lead.send_signal(signal.SIGKILL)
        lead.wait(timeout=10)
    finally:
        lead.kill()
        log.close()
    assert running and len(workers) >= 2  # the pool's arm processes (and multiprocessing's tracker)
    assert _wait_for(lambda: not any(_alive(p) for p in workers), 10), [
        p for p in workers if _alive(p)
    ]
    assert rundir.load_manifest(run)["status"] == "running"  # SIGKILL cannot be caught

    rerun = subprocess.run(_ablate(run), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "left running by a process that is gone" in rerun.stdout
    manifest = rundir.load_manifest(run)
    events = [e["event"] for e in manifest["events"]]
    assert events == ["interrupted", "resumed", "finished"] and manifest["status"] == "complete"
    assert set(running) <= set(manifest["events"][0]["arms"])
    assert rundir.list_arms(run)["status"].eq("complete").all()

    clean = subprocess.run(_ablate(tmp_path / "clean"), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert clean.returncode == 0, clean.stderr[-3000:]
    pd.testing.assert_frame_equal(_metrics(run), _metrics(tmp_path / "clean"))
    assert len(_metrics(run)) == 8  # 2 arms x 4 steps


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path):
    """flock dies with its holder: a SIGKILLed owner leaves a lock file anyone can take."""
    run = tmp_path / "r"
    code = f"from analysis import rundir; import time\nwith rundir.lock_run({str(run)!r}):\n"
    holder = subprocess.Popen([sys.executable, "-c", code + "    print(1, flush=True); time.sleep(60)"],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == b"1"
        with (
            pytest.raises(rundir.RunDirError, match=f"by pid {holder.pid} on "),
            rundir.lock_run(run),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with rundir.lock_run(run):
        owner = json.loads((run / rundir.LOCK_OWNER).read_text())
    assert owner["pid"] == os.getpid() and (run / rundir.LOCK).is_file()


_POOL = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from experiments import launch


def init(parent, interval_s, use_prctl):
    if not use_prctl:
        launch.PR_SET_PDEATHSIG = 0  # an invalid option: prctl fails, the watchdog alone acts
    launch.die_with_parent(parent, interval_s)


if __name__ == "__main__":
    args = (os.getpid(), float(sys.argv[2]), sys.argv[1] == "1")
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=init, initargs=args)
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 600)
    time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc")
@pytest.mark.parametrize(("use_prctl", "interval_s"), [(True, 600.0), (False, 0.2)])
def test_pool_workers_die_with_a_sigkilled_parent(tmp_path, use_prctl, interval_s):
    """Either mechanism alone ends a worker whose lead was SIGKILLed: ``PR_SET_PDEATHSIG``
    (the watchdog set to sleep 10 minutes) and the ``getppid`` watchdog (prctl disabled)."""
    script = tmp_path / "pool.py"
    script.write_text(_POOL)
    argv = [sys.executable, str(script), str(int(use_prctl)), str(interval_s)]
    lead, worker = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE), 0
    try:
        worker = int(lead.stdout.readline())
        assert _alive(worker)
        lead.send_signal(signal.SIGKILL)
        lead.wait(timeout=10)
        assert _wait_for(lambda: not _alive(worker), 5)
    finally:
        lead.kill()
        if worker and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_sigterm_marks_the_run_interrupted_and_stops_the_pool(tmp_path):
    """SIGTERM is handled like Ctrl-C: exit 143, running arms failed ("interrupted"), the run
    incomplete, the pool's workers killed, the lock free for the rerun."""
    run, log = tmp_path / "r", (tmp_path / "lead.log").open("w")
    lead = subprocess.Popen(_ablate(run), cwd=REPO, env=_env(), stdout=log, stderr=log)
    try:
        assert _wait_for(lambda: _running_arms(run), 120)
        workers = _descendants(lead.pid)
        lead.send_signal(signal.SIGTERM)
        lead.wait(timeout=30)
    finally:
        lead.kill()
        log.close()
    err = (tmp_path / "lead.log").read_text()
    assert lead.returncode == 143, err[-2000:]
    assert "interrupted:" in err and "marked incomplete" in err
    assert _wait_for(lambda: not any(_alive(p) for p in workers), 10)
    manifest = rundir.load_manifest(run)
    assert manifest["status"] == "incomplete" and manifest["events"][-1]["event"] == "interrupted"
    arms = rundir.list_arms(run)
    assert not arms["status"].eq("running").any() and arms["status"].eq("failed").any()
    with rundir.lock_run(run):
        pass
