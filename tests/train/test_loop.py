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


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_change_speed_not_the_gradient(policy, scripted, loss_agg):
    """Right-padded micro-batches of 3 give the gradient of one sequence at a time (trajectories
    of different lengths, one with a tool-returned image)."""
    from agent.data.tasks import TaskConfig, generate_one
    from agent.rollout import Agent, AgentConfig, rollout
    from train.batching import loss_weights
    from train.loop import _accumulate, _Batch, _log_probs

    tok = policy.tokenizer
    image_id, pad_id = tok.convert_tokens_to_ids("<|image_pad|>"), tok.pad_token_id
    agent = Agent(tok, policy.image_processor, AgentConfig(tools="both"))
    tool = '<think>look</think><tool_call>{"name": "reflect", "arguments": {"images": [1]}}</tool_call>'
    gen = scripted(tok, [[RIGHT], [tool, WRONG], [VOID], [WRONG], [tool, RIGHT]])
    sample = generate_one("train", 0, 0, TaskConfig())
    trajs = rollout(agent, gen, [sample], group_size=5)
    assert len({len(t.token_ids) for t in trajs}) > 2 and max(len(t.images) for t in trajs) > 2
    weights = [loss_weights(t, True, False) for t in trajs]
    grads = []
    for micro in (1, 3):
        g = GRPOConfig(group_size=5, micro_batch=micro, loss_agg=loss_agg, beta=0.1, tis_cap=2.0)
        with torch.no_grad():
            old = _log_probs(policy.model, trajs, image_id, pad_id, micro)
        batch = _Batch(
            trajs, weights, torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0]), old, old, image_id, pad_id
        )
        policy.model.zero_grad(set_to_none=True)
        logs = {k: [] for k in ("pg_loss", "clipfrac", "approx_kl", "kl", "ratio_mean")}
        _accumulate(policy.model, g, batch, [4, 0, 2, 1, 3], logs)
        grads.append(
            {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        )
        assert len(logs["pg_loss"]) == (5 if micro == 1 else 2)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4, msg=n)
