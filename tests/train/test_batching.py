"""The trainer's image-run check: a broken trajectory is flagged and masked, never a crash."""

from __future__ import annotations

import pytest
import torch

from agent.rollout import Agent, AgentConfig
from agent.trajectory import image_token_problem
from tests.agent.test_agent import _sample
from train.batching import (
    batch_inputs,
    batched_token_log_probs,
    flag_bad_image_tokens,
    loss_weights,
)

S, E, P = 7, 8, 9  # vision_start, vision_end, image_pad
GRIDS = [(1, 2, 4), (1, 4, 4)]  # 8 / 2**2 = 2 and 16 / 2**2 = 4 pads


@pytest.mark.parametrize(
    "ids, problem",
    [
        ([1, S, P, P, E, 2, S, P, P, P, P, E, 3], None),
        ([1, S, P, P, E, 2, S, P, P, P, E, 3], "image runs of [2, 3] pads, grids need [2, 4]"),
        ([1, S, P, P, E, P, S, P, P, P, P, E], "<|image_pad|> outside an image run"),
        ([1, S, P, P, E], "image runs of [2] pads, grids need [2, 4]"),
        ([S, P, S, P, E], "nested <|vision_start|>"),
        ([S, P, P, E, E], "<|vision_end|> without <|vision_start|>"),
        ([S, P, 1, P, E, S, P, P, P, P, E], "an image run holds a non-pad token"),
        ([S, P, P, E, S, P, P, P, P], "image runs of [2, 4] pads, grids need [2, 4]"),
    ],
)
def test_image_token_problem(ids, problem):
    assert image_token_problem(ids, GRIDS, 2, (S, E, P)) == problem


def test_broken_trajectory_is_flagged_masked_and_forwarded_blank(policy):
    agent = Agent(policy.tokenizer, policy.image_processor, AgentConfig(tools="both"))
    good, bad = agent.start(_sample(n_images=2)), agent.start(_sample(n_images=2))
    vision, pad = agent.prompts.ids.vision, agent.prompts.ids.image_pad
    bad.extend([pad, pad, agent.prompts.ids.im_end], sampled=True, log_probs=[-1.0] * 3)
    good.extend([5, agent.prompts.ids.im_end], sampled=True, log_probs=[-1.0] * 2)
    assert flag_bad_image_tokens([good, bad], vision, agent.merge) == 1
    assert bad.flags["bad_image_tokens"] and not good.flags["bad_image_tokens"]
    assert loss_weights(bad, True, True).sum() == 0 and loss_weights(good, True, True).sum() > 0
    assert loss_weights(bad, False, False).sum() == 0  # whatever the mask switches
    inputs = batch_inputs([good, bad], pad, policy.tokenizer.pad_token_id)
    assert (inputs["input_ids"][1] == policy.tokenizer.pad_token_id).all()
    assert len(inputs["image_grid_thw"]) == len(good.images)  # the bad row adds no images
    with torch.no_grad():
        lp = batched_token_log_probs(policy.model, inputs)  # the mismatch would raise here
        alone = batched_token_log_probs(
            policy.model, batch_inputs([good], pad, policy.tokenizer.pad_token_id)
        )
    n = len(good.token_ids)
    assert torch.allclose(lp[0, :n], alone[0, :n], atol=1e-4)
