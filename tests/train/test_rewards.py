"""Reward specs: named forms equal the formulas they replace, weighted terms, user terms,
per-term metrics columns, early errors naming the unknown term."""

from __future__ import annotations

import itertools

import pytest
import torch

from agent.trajectory import Trajectory
from train.config import GRPOConfig
from train.metrics import rollout_metrics
from train.rewards import parse_reward, score


def _traj(acc=1.0, fmt=0.0, used=1.0, answer="Image 2", gold="2") -> Trajectory:
    t = Trajectory(
        sample_id="s", family="find", gold=gold, answer_type="index", token_ids=[1, 2, 3],
        prompt_len=2, response_mask=[0, 0, 1], rollout_log_probs=[0.0, 0.0, -1.0], images=[],
        answer=answer,
    )  # fmt: skip
    t.acc, t.fmt, t.used = acc, fmt, used
    return t


OUTCOMES = list(itertools.product((0.0, 1.0), (-1.0, 0.0), (0.0, 1.0)))


@pytest.mark.parametrize("gain", [0.0, 0.5, 0.3, 1.7])
def test_imagent_form_equals_its_formula_bit_for_bit(gain):
    for acc, fmt, used in OUTCOMES:
        (t,) = score([_traj(acc, fmt, used)], "imagent", tool_gain=gain)
        assert t.reward == acc * (1.0 + gain * used) + 0.2 * fmt
        assert t.reward_terms == {"acc": acc, "acc_x_tool": acc * used, "format": fmt}


def test_deepeyes_form_equals_its_formula_bit_for_bit():
    for acc, fmt, used in OUTCOMES:
        (t,) = score([_traj(acc, fmt, used)], "deepeyes", tool_gain=0.5)  # gain unused
        assert t.reward == 0.8 * acc + 0.2 * fmt + 1.2 * float(used > 0 and acc > 0)


def test_weighted_terms_and_verifier_terms():
    (t,) = score([_traj(1.0, -1.0, 1.0)], "acc:1.0,format:0.2,tool:0.5")
    assert t.reward == pytest.approx(1.0 - 0.2 + 0.5)
    (t,) = score([_traj(answer="red cube", gold="a big red cube")], "f1:2")
    assert t.reward == pytest.approx(1.6) and t.reward_terms == {"f1": pytest.approx(0.8)}
    (t,) = score([_traj(0.0, 0.0, 1.0)], " acc , tool:0.25 ")  # no weight: 1
    assert t.reward == 0.25
    terms = parse_reward("imagent,acc:0.5", tool_gain=0.5)  # a term named twice: weights add
    assert [(x.name, x.weight) for x in terms] == [
        ("acc", 1.5),
        ("acc_x_tool", 0.5),
        ("format", 0.2),
    ]


def test_trl_style_list_with_weights():
    terms = parse_reward(["acc", "format", ("tool", 9.0)], weights=[0.8, 0.2, 1.0])
    assert [(x.name, x.weight) for x in terms] == [("acc", 0.8), ("format", 0.2), ("tool", 1.0)]
    with pytest.raises(ValueError, match="2 reward weights for 3 reward terms"):
        parse_reward(["acc", "format", "tool"], weights=[1.0, 2.0])


def test_user_term_module_function_is_applied():
    spec = "acc:1,tests.train.reward_helpers:short_answer:0.5"
    short, long = score([_traj(answer="B"), _traj(answer="a long sentence")], spec)
    assert short.reward == 1.5 and long.reward == 1.0
    assert short.reward_terms["tests.train.reward_helpers:short_answer"] == 1.0
    (t,) = score([_traj(answer="B")], "tests.train.reward_helpers:short_answer")  # weight 1
    assert t.reward == 1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("acc:1,bogus:0.2", "unknown reward term 'bogus'"),
        ("imagnet", "unknown reward term 'imagnet'"),
        ("", "names no term"),
        ("acc:nan", "weight nan, not a finite number"),
        ("tests.train.no_such_module:f", "cannot load 'f' from 'tests.train.no_such_module'"),
        ("tests.train.reward_helpers:missing", "cannot load 'missing'"),
        ("tests.train.reward_helpers:NOT_CALLABLE", "is not callable"),
    ],
)
def test_bad_specs_name_the_term(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reward(spec)


def test_a_term_returning_no_number_is_refused():
    with pytest.raises(ValueError, match="returned 'high', not a number"):
        score([_traj()], "tests.train.reward_helpers:not_a_number")


def test_grpo_config_validates_the_reward():
    assert GRPOConfig(reward_form="deepeyes").reward_form == "deepeyes"
    assert GRPOConfig(reward_form="acc:1,format:0.2,tool:0.5").reward_form
    with pytest.raises(ValueError, match=r"GRPOConfig.reward_form=.*unknown reward term 'nope'"):
        GRPOConfig(reward_form="acc,nope")


def test_per_term_columns_in_the_metrics():
    trajs = score([_traj(1.0, 0.0, 1.0), _traj(0.0, -1.0, 0.0)], "imagent", tool_gain=0.5)
    row = rollout_metrics(trajs, [torch.tensor([0.0, 0.0, 1.0])] * 2)
    assert row["reward/acc"] == 0.5 and row["reward/acc_x_tool"] == 0.5
    assert row["reward/format"] == -0.5
    assert row["rollout/reward_mean"] == pytest.approx((1.5 - 0.2) / 2)
