"""Format warm-up: teach a random-weight policy the turn format and tool-call syntax, not the task.

A short supervised (teacher-forced) phase on transcripts produced by relook's own agent loop
with a scripted "teacher" generator: ``<think>...</think>`` then either a syntactically valid
``reflect`` / ``confirm`` call (real tool results are inserted by the environment) or an
``<answer>`` whose value is drawn **at random** from the question's answer space. The policy
learns to speak the protocol (so GRPO sees answers, tool calls and reward variance) but gains
no information about which answer is right or when a tool helps: discovering that is left to
RL (docs/method.md §1: pure end-to-end RL, no SFT on task solutions).

Loss: token-mean negative log-likelihood over tokens the policy would have sampled
(``response_mask``), exactly the level-1 mask of GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import trange

from agent.data.pretrain import random_answer, random_tool_call
from agent.data.tasks import TaskConfig, generate_one
from agent.modeling import Policy
from agent.rollout import Agent, AgentConfig, rollout
from train.batching import loss_weights, token_log_probs
from train.pretrain import TeacherGenerator

THOUGHTS = (
    "I look at the images.",
    "Let me check the images.",
    "I compare the images.",
    "I look for the object.",
)


@dataclass(frozen=True)
class WarmupConfig:
    """Format warm-up settings.

    Attributes:
        steps: optimizer steps.
        batch: transcripts per step.
        lr: AdamW learning rate (peak; linear warm-up over 10 steps, cosine decay).
        tool_frac: share of transcripts that call a tool before answering.
        seed: seed of the transcripts and of the sampled answers.
        data_seed: generator seed of the questions (a stream apart from GRPO's).
    """

    steps: int = 200
    batch: int = 8
    lr: float = 2e-3
    tool_frac: float = 0.5
    seed: int = 0
    data_seed: int = 1000


def warmup(
    policy: Policy, cfg: WarmupConfig, tasks: TaskConfig | None = None, progress: bool = True
) -> list[float]:
    """Run the format warm-up on ``policy`` in place; returns the loss (nats/token) per step."""
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    agent = Agent(policy.tokenizer, policy.image_processor, AgentConfig(tools="both", max_turns=3))
    no_tools = Agent(
        policy.tokenizer, policy.image_processor, AgentConfig(tools="none", max_turns=1)
    )
    image_token_id = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    model = policy.model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + np.cos(np.pi * s / cfg.steps))
    )
    losses = []
    model.train()
    for step in trange(cfg.steps, desc="format warm-up", disable=not progress, leave=False):
        trajs = []
        for i in range(cfg.batch):
            sample = generate_one("train", step * cfg.batch + i, cfg.data_seed, tasks)
            think = f"<think>{THOUGHTS[rng.integers(len(THOUGHTS))]}</think>"
            answer = f"<think>{THOUGHTS[rng.integers(len(THOUGHTS))]}</think><answer>{random_answer(sample, rng)}</answer>"
            use_agent = (
                no_tools if i % 4 == 3 else agent
            )  # both prompt variants (tools advertised or not)
            script = [answer]
            if use_agent is agent and rng.random() < cfg.tool_frac:
                script = [think + random_tool_call(sample, rng, agent.frame), answer]
            trajs += rollout(
                use_agent, TeacherGenerator(policy.tokenizer, [script]), [sample], group_size=1
            )
        weights = [loss_weights(t, mask_tokens=True, mask_trajectories=False) for t in trajs]
        n_tokens = float(sum(w.sum() for w in weights))
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for t, w in zip(trajs, weights):
            nll = -(token_log_probs(model, t.model_inputs(image_token_id)) * w).sum() / n_tokens
            nll.backward()
            total += float(nll.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(total)
    model.eval()
    return losses
