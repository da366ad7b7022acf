"""Crash-safe checkpoints: a run killed with SIGKILL resumes with the same per-step metrics; a
checkpoint cut off mid-write is detected and the previous one used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from agent.modeling import load_policy
from train.checkpoint import checkpoints, latest_checkpoint, save_checkpoint, verify_checkpoint
from train.config import AgentConfig, ArmConfig, DataConfig, GRPOConfig
from train.loop import train

STEPS = 5


def _cfg(every: int = 2) -> ArmConfig:
    return ArmConfig(
        name="ckpt",
        agent=AgentConfig(tools="both", max_turns=2, max_new_tokens=12),
        grpo=GRPOConfig(
            steps=STEPS, prompts_per_step=2, group_size=2, mini_batches=2, lr=1e-3,
            warmup_steps=1, checkpoint_every=every, seed=7,
        ),
        data=DataConfig(n_test=2),
    )  # fmt: skip


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("timing_s/")} for r in rows]


# The child trains with checkpoints every 2 steps and SIGKILLs itself in the middle of step
# index 3 (after its rollout, before its update and checkpoint): steps 0-2 are done, the last
# checkpoint holds 2 of them.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import train.loop as loop
    from agent.modeling import load_policy
    from tests.train.test_checkpoint import _cfg
    real = loop._update
    calls = []
    def killing_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    loop._update = killing_update
    loop.train(_cfg(), load_policy(sys.argv[1]), progress=False, checkpoint_dir=sys.argv[2])
    """
)


def test_sigkilled_run_resumes_with_identical_metrics(tiny_dir, tmp_path):
    torch.manual_seed(0)
    reference = train(_cfg(every=0), load_policy(tiny_dir), progress=False)
    assert len(reference) == STEPS
    ckpt = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_dir), str(ckpt)], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [p.name for p in checkpoints(ckpt)] == ["step-000002"]
    seen: list[dict] = []
    policy = load_policy(tiny_dir)
    resumed = train(_cfg(), policy, on_step=seen.append, progress=False, checkpoint_dir=ckpt)
    assert [r["step"] for r in resumed] == list(range(STEPS)) == [r["step"] for r in seen]
    assert _comparable(resumed) == _comparable(reference)
    assert [p.name for p in checkpoints(ckpt)] == ["step-000004", "step-000005"]
    # a finished run "resumes" to nothing left to do and returns the same rows
    again = train(_cfg(), load_policy(tiny_dir), progress=False, checkpoint_dir=ckpt)
    assert _comparable(again) == _comparable(reference)


class _Tiny(torch.nn.Module):
    """Stands in for a transformers model in the writer tests (save_pretrained only)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 4)

    def save_pretrained(self, folder):
        torch.save(self.state_dict(), os.path.join(folder, "weights.pt"))


def test_cut_off_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    model = _Tiny()
    first = save_checkpoint(tmp_path, 2, model, {"rows": [1, 2]})
    second = save_checkpoint(tmp_path, 4, model, {"rows": [1, 2, 3, 4]})
    assert verify_checkpoint(second) is None and latest_checkpoint(tmp_path) == second
    # cut off mid-write (a truncated file): detected, the previous checkpoint is used
    state = second / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert "cut off" in verify_checkpoint(second)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-000004.*cut off"):
        assert latest_checkpoint(tmp_path) == first
    # same size, different bytes; and a folder whose manifest was never written
    weights = first / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256" in verify_checkpoint(first)
    (tmp_path / "step-000006").mkdir()
    assert "missing" in verify_checkpoint(tmp_path / "step-000006")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert latest_checkpoint(tmp_path) is None


def test_writer_is_atomic_and_prunes(tmp_path, monkeypatch):
    model = _Tiny()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    # a writer killed before its rename leaves only a .tmp folder, never a step-* folder
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        save_checkpoint(tmp_path, 4, model, {})
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    manifest = json.loads((tmp_path / "step-000003" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.pt", "trainer_state.pt"}
    with pytest.raises(ValueError, match="keep >= 1"):
        save_checkpoint(tmp_path, 5, model, {}, keep=0)


def test_checkpoint_of_another_config_is_ignored(tiny_dir, tmp_path):
    ckpt = tmp_path / "c"
    train(_cfg(), load_policy(tiny_dir), progress=False, checkpoint_dir=ckpt)
    other = ArmConfig(name="ckpt", grpo=GRPOConfig(steps=1, prompts_per_step=2, group_size=2))
    with pytest.warns(UserWarning, match="different config"):
        rows = train(other, load_policy(tiny_dir), progress=False, checkpoint_dir=ckpt)
    assert len(rows) == 1


def test_checkpoint_resumes_under_another_report_to(tiny_dir, tmp_path):
    """``report_to`` changes where rows are also logged, not the run: its checkpoint resumes
    (all steps done: every row restored, none trained again); ``eval`` is part of the run."""
    from dataclasses import replace

    from train.config import EvalConfig

    ckpt = tmp_path / "c"
    rows = train(_cfg(), load_policy(tiny_dir), progress=False, checkpoint_dir=ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = train(
            replace(_cfg(), report_to="tensorboard"), load_policy(tiny_dir), progress=False,
            checkpoint_dir=ckpt,
        )  # fmt: skip
    assert again == rows
    with pytest.warns(UserWarning, match="different config"):
        train(replace(_cfg(), eval=EvalConfig(every=5)), load_policy(tiny_dir), progress=False,
              checkpoint_dir=ckpt)  # fmt: skip
