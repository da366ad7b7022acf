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


def test_freeze_vision_tower_trains_only_the_language_model(policy, scripted, monkeypatch):
    _force_answer(monkeypatch)
    before = _params(policy.model)
    gen = scripted(policy.tokenizer, [[RIGHT], [WRONG], [RIGHT], [WRONG]])
    rows = train(_cfg(freeze_vision_tower=True), policy, generator=gen, progress=False)
    assert rows[0]["rollout/reward_std"] > 0
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("language_model.layers.0" in n for n in changed)
    visual = [n for n, _ in policy.model.named_parameters() if n.startswith("model.visual")]
    assert visual and not changed & set(visual), "the frozen vision tower moved"


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
    assert on["rollout/tool_calls/reflect"] == 0.5


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


class _OneTurn:
    """A generator whose k-th request (counted over all calls) ends its episode with
    ``texts[k % len(texts)]`` (``ScriptedGenerator`` tells episodes apart by ``id()``, which a
    later step may reuse)."""

    def __init__(self, tokenizer, texts: list[str]):
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.ids = [tokenizer.encode(t, add_special_tokens=False) + [eos] for t in texts]
        self.k = 0

    def generate(self, requests, max_new_tokens, temperature):
        from agent.rollout import GenResult

        out = []
        for _ in requests:
            ids = self.ids[self.k % len(self.ids)]
            out.append(GenResult(ids, [-0.5] * len(ids), True))
            self.k += 1
        return out


def _train_counting(monkeypatch, cfg, policy, gen, extra_pass: bool):
    """Train, forcing (``extra_pass``) or not the no-grad old-log-prob pass; returns the rows
    and the number of trainer forwards (``batched_token_log_probs`` calls)."""
    import train.loop as loop

    calls = []
    real = loop.batched_token_log_probs

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "batched_token_log_probs", counted)
    monkeypatch.setattr(loop, "_on_policy", (lambda g: False) if extra_pass else loop._on_policy)
    rows = train(cfg, policy, generator=gen, progress=False)
    monkeypatch.undo()
    return rows, calls


def test_on_policy_update_skips_the_old_log_prob_pass_and_matches_it(tiny_dir, monkeypatch):
    """One mini-batch: the update's own detached log-probs replace the no-grad pass. Over 3
    steps (KL to a reference, truncated IS, micro-batches of 3 that do not follow the rollout
    order) the weights and every logged metric equal those of the extra pass up to float
    rounding (weights moved up to ~2e-3 and differ by < 2e-6; measured 4e-7), with one no-grad
    forward per micro-batch fewer."""
    from agent.modeling import load_policy

    cfg = _cfg(
        steps=3, prompts_per_step=2, micro_batch=3, beta=0.1, tis_cap=2.0, warmup_steps=1,
        mask_trajectories=False,
    )  # fmt: skip
    runs = {}
    for extra_pass in (True, False):
        _force_answer(monkeypatch)
        policy = load_policy(tiny_dir)
        gen = _OneTurn(policy.tokenizer, [RIGHT, WRONG, WRONG])
        rows, calls = _train_counting(monkeypatch, cfg, policy, gen, extra_pass)
        runs[extra_pass] = (rows, calls, _params(policy.model))
    (old_rows, old_calls, old_w), (new_rows, new_calls, new_w) = runs[True], runs[False]
    # per step: 8 trajectories = 3 micro-batches; grad forwards 3, no-grad ref 3 (+ old 3)
    assert old_calls.count(True) == new_calls.count(True) == 9
    assert old_calls.count(False) == 18 and new_calls.count(False) == 9
    base = _params(load_policy(tiny_dir).model)
    moved = max(float((new_w[n] - base[n]).abs().max()) for n in base)
    assert moved > 1e-4  # the steps did train
    for n in base:
        torch.testing.assert_close(new_w[n], old_w[n], atol=2e-6, rtol=0, msg=n)
    for old, new in zip(old_rows, new_rows, strict=True):
        assert new["actor/ratio_mean"] == 1.0 and new["actor/clipfrac"] == 0.0
        for k, v in old.items():
            if k.startswith("timing_s/"):
                continue
            if k == "rollout/logprob_gap":
                assert new[k] == pytest.approx(v, abs=1e-6), k
            elif k.startswith("actor/"):
                assert new[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
            else:
                assert new[k] == v, k
    assert new_rows[-1]["actor/kl"] > 0 and new_rows[-1]["rollout/logprob_gap"] > 0


def test_on_policy_step_with_everything_masked_still_logs_the_gap(policy, scripted, monkeypatch):
    """No update (every trajectory masked): the gap comes from a no-grad pass after all."""
    _force_answer(monkeypatch)
    gen = scripted(policy.tokenizer, [[VOID]] * 4)
    rows, calls = _train_counting(monkeypatch, _cfg(), policy, gen, extra_pass=False)
    assert rows[0]["actor/updates"] == 0.0 and calls == [False]  # one no-grad pass of 4
    assert rows[0]["rollout/logprob_gap"] > 0
