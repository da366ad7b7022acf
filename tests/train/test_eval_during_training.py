"""Held-out evaluation during training (``EvalConfig``, the loop's ``# Evaluation`` phase)."""

from __future__ import annotations

import pytest

from agent.modeling import load_policy
from agent.rollout import AgentConfig
from train.config import ArmConfig, DataConfig, EvalConfig, GRPOConfig
from train.evaluation import pass_at_n
from train.loop import train


def _cfg(**eval_fields) -> ArmConfig:
    return ArmConfig(
        name="eval",
        agent=AgentConfig(tools="both", max_turns=2, max_new_tokens=16),
        grpo=GRPOConfig(
            steps=2, prompts_per_step=2, group_size=2, mini_batches=1, lr=1e-3,
            warmup_steps=1, checkpoint_every=0, seed=5, micro_batch=4,
        ),
        data=DataConfig(n_test=2),
        eval=EvalConfig(**eval_fields),
    )  # fmt: skip


def test_eval_every_writes_eval_rows_and_leaves_training_alone(tiny_dir):
    """eval every step (greedy + 2 sampled per question): ``eval/*`` and ``eval_sampled/*``
    keys in each row; every other key equals the run without evaluation (the evaluation
    samples on a forked torch stream)."""
    off = train(_cfg(), load_policy(tiny_dir), progress=False)
    on = train(_cfg(every=1, n=3, n_sampled=2), load_policy(tiny_dir), progress=False)
    assert [r["step"] for r in on] == [0, 1]
    assert not any(k.startswith("eval") for r in off for k in r)
    for r_on, r_off in zip(on, off):
        for key in ("eval/acc", "eval/tool_call_rate", "eval/answer_rate", "eval_sampled/acc",
                    "eval_sampled/pass_at_n", "timing_s/eval"):  # fmt: skip
            assert key in r_on, key
        assert r_on["eval/n"] == 3 and r_on["eval_sampled/n"] == 6
        assert 0 <= r_on["eval/acc"] <= 1
        assert any(k.startswith("eval/acc/") for k in r_on)  # per family
        kept = {k: v for k, v in r_on.items() if not k.startswith(("eval", "timing_s/"))}
        assert kept == {k: v for k, v in r_off.items() if not k.startswith("timing_s/")}


def test_eval_due_and_validation():
    e = EvalConfig(every=3)
    assert [s for s in range(9) if e.due(s)] == [2, 5, 8]
    assert not any(EvalConfig().due(s) for s in range(5))
    with pytest.raises(ValueError, match="EvalConfig.every"):
        EvalConfig(every=-1)
    with pytest.raises(ValueError, match="EvalConfig.n "):
        EvalConfig(n=0)
    with pytest.raises(ValueError, match="report_to"):
        ArmConfig(report_to="comet")


class _T:
    def __init__(self, sample_id, acc):
        self.sample_id, self.acc = sample_id, acc


def test_pass_at_n():
    trajs = [_T("a", 0.0), _T("a", 1.0), _T("b", 0.0), _T("b", 0.0)]
    assert pass_at_n(trajs) == 0.5
    assert pass_at_n([]) == 0.0
