"""Format warm-up: learns the protocol, carries no task knowledge."""

from __future__ import annotations

import numpy as np
import torch

from agent.data.pretrain import random_answer, random_tool_call
from agent.data.tasks import generate
from agent.tools import ImageFrame, run_tool
from train.warmup import WarmupConfig, warmup


def test_warmup_answers_are_random_and_tool_calls_valid():
    rng = np.random.default_rng(0)
    samples = generate("train", 60, seed=3)
    hits = [random_answer(s, rng) == s.answer for s in samples]
    # chance level (1/n for 2-4 images, 1/10 digits, 1/(n+1) counts); never the gold by design
    assert np.mean(hits) < 0.45
    frame = ImageFrame(14, 2, 56 * 56, 112 * 112)
    for s in samples[:20]:
        payload = random_tool_call(s, rng, frame)[len("<tool_call>") : -len("</tool_call>")]
        assert run_tool(payload, list(s.images), frame, ("reflect", "confirm")).ok


def test_warmup_lowers_the_loss_and_updates_the_policy(policy):
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    losses = warmup(policy, WarmupConfig(steps=6, batch=4, lr=3e-3), progress=False)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0]
    assert sum(not torch.equal(p, before[n]) for n, p in policy.model.named_parameters()) > 0
