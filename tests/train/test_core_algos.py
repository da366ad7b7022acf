"""GRPO math pinned on hand-computed cases and against slow loop twins."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from train.core_algos import (
    agg_loss,
    clipped_policy_loss,
    group_advantages,
    kl_k3,
    truncated_is_weights,
)


def test_group_advantages_hand_case():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    a = group_advantages(r, g, "group", eps=0.0)
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1,0,0,1]
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(a[4:], torch.zeros(2))  # identical rewards: no signal (not nan)
    assert torch.allclose(
        group_advantages(r, g, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0])
    )
    b = group_advantages(r, g, "batch", eps=0.0)
    assert torch.allclose(b, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]) / r.std())
    assert torch.equal(group_advantages(torch.tensor([3.0]), torch.tensor([0])), torch.zeros(1))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, g, "std")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-2, 2)), min_size=2, max_size=20))
def test_group_advantages_match_loop(pairs):
    groups = torch.tensor([p[0] for p in pairs])
    rewards = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    fast = group_advantages(rewards, groups, "group")
    for i in range(len(pairs)):
        members = [rewards[j] for j in range(len(pairs)) if groups[j] == groups[i]]
        if len(members) == 1:
            expected = 0.0
        else:
            t = torch.stack(members)
            expected = float((rewards[i] - t.mean()) / (t.std() + 1e-6))
        assert fast[i].item() == pytest.approx(expected, abs=1e-3, rel=1e-3)


def test_clipped_policy_loss_hand_case():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = clipped_policy_loss(new, old, torch.tensor([1.0]), mask, 0.2, 0.28)
    # per token: -min(r*A, clip(r)*A) = -[1, 1.28, 0.5] (A=+1: the upper clip binds at 1.28)
    assert loss.item() == pytest.approx(-(1.0 + 1.28 + 0.5) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    loss_neg, stats_neg = clipped_policy_loss(new, old, torch.tensor([-1.0]), mask, 0.2, 0.28)
    # A=-1: -min(-r, -clip(r)) = max(r, clip(r)) = [1, 1.5, 0.8]
    assert loss_neg.item() == pytest.approx((1.0 + 1.5 + 0.8) / 3)
    assert stats_neg["clipfrac"].item() == pytest.approx(1 / 3)


def test_agg_loss_modes_and_global_normaliser():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    # micro-batch invariance: per-row losses with the global token count sum to the batch loss
    parts = sum(
        agg_loss(loss[i : i + 1], mask[i : i + 1], "token-mean", n_tokens=4.0) for i in range(2)
    )
    assert parts.item() == pytest.approx(agg_loss(loss, mask, "token-mean").item())
    assert agg_loss(loss, torch.zeros_like(mask), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="loss aggregation"):
        agg_loss(loss, mask, "sum")


def test_kl_k3_and_is_weights():
    lp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.25]))
    d = ref - lp
    assert torch.allclose(kl_k3(lp, ref), d.exp() - d - 1)
    assert kl_k3(lp, ref)[1].item() == 0.0 and (kl_k3(lp, ref) >= 0).all()
    w = truncated_is_weights(torch.tensor([0.0, 0.0]), torch.tensor([-1.0, 1.0]), cap=2.0)
    assert torch.allclose(w, torch.tensor([2.0, math.exp(-1.0)]))
