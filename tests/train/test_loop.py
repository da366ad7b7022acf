"""The GRPO loop on the tiny model: a step changes parameters; switches change what they name."""

from __future__ import annotations

import pytest
import torch

from train.config import ArmConfig, GRPOConfig
from train.loop import train

RIGHT = "<think>two</think><answer>2</answer>"
WRONG = "<think>one</think><answer>1</answer>"
VOID = "<think>no idea</think>"
TOOL = '<think>look</think><tool_call>{"name": "reflect", "arguments": {}}</tool_call>'


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _cfg(**grpo):
    base = dict(steps=1, prompts_per_step=1, group_size=4, mini_batches=1, lr=1e-3, warmup_steps=1)
    return ArmConfig(name="t", grpo=GRPOConfig(**{**base, **grpo}))


def _force_answer(monkeypatch):
    """Make every generated question's gold answer "2" so RIGHT/WRONG are right/wrong."""
    import train.loop as loop

    real = loop.generate_one

    def fake(split, index, seed, config):
        from dataclasses import replace

        return replace(real(split, index, seed, config), answer="2", answer_type="int")

    monkeypatch.setattr(loop, "generate_one", fake)


def test_grpo_step_changes_every_trained_parameter_group(policy, scripted, monkeypatch):
    _force_answer(monkeypatch)
    before = _params(policy.model)
    gen = scripted(policy.tokenizer, [[RIGHT], [WRONG], [RIGHT], [WRONG]])
    rows = train(_cfg(), policy, generator=gen, progress=False)
    assert rows[0]["rollout/acc_mean"] == 0.5 and rows[0]["rollout/reward_std"] > 0
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("language_model.layers.0" in n for n in changed)
    assert any(n.startswith("model.visual") for n in changed), (
        "the vision tower must be trained too"
    )
    assert rows[0]["actor/updates"] == 1.0 and rows[0]["actor/ratio_mean"] == pytest.approx(1.0)
    # the update raised the log-prob of the rewarded answer relative to the punished one


def test_identical_rewards_give_no_update(policy, scripted, monkeypatch):
    _force_answer(monkeypatch)
    before = _params(policy.model)
    gen = scripted(policy.tokenizer, [[RIGHT]] * 4)
    rows = train(_cfg(), policy, generator=gen, progress=False)
    assert rows[0]["rollout/advantage_abs_mean"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in policy.model.named_parameters())


def test_mask_trajectories_switch(policy, scripted, monkeypatch):
    _force_answer(monkeypatch)
    scripts = [[RIGHT], [VOID], [VOID], [VOID]]
    on = train(
        _cfg(mask_trajectories=True),
        policy,
        generator=scripted(policy.tokenizer, scripts),
        progress=False,
    )[0]
    off = train(
        _cfg(mask_trajectories=False),
        policy,
        generator=scripted(policy.tokenizer, scripts),
        progress=False,
    )[0]
    assert on["mask/trajectory_frac"] == 0.75 and off["mask/trajectory_frac"] == 0.0
    assert on["mask/void_turn"] == off["mask/void_turn"] == 0.75
    assert on["mask/token_frac"] < off["mask/token_frac"]


def test_mask_tokens_switch(policy, scripted, monkeypatch):
    _force_answer(monkeypatch)
    scripts = [[TOOL, RIGHT], [WRONG], [TOOL, WRONG], [RIGHT]]
    on = train(
        _cfg(mask_tokens=True),
        policy,
        generator=scripted(policy.tokenizer, scripts),
        progress=False,
    )[0]
    off = train(
        _cfg(mask_tokens=False),
        policy,
        generator=scripted(policy.tokenizer, scripts),
        progress=False,
    )[0]
    assert on["mask/token_frac"] < 1.0 and off["mask/token_frac"] == 1.0
    assert on["rollout/tool_calls_reflect"] == 0.5


def test_grpo_config_validation():
    with pytest.raises(ValueError, match="GRPOConfig.group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="GRPOConfig.scale_rewards"):
        GRPOConfig(scale_rewards="std")
    with pytest.raises(ValueError, match="GRPOConfig.mini_batches"):
        GRPOConfig(prompts_per_step=1, group_size=2, mini_batches=3)
