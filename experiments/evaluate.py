"""``python -m experiments.evaluate``: score a model on relook's offline multi-image set.

Examples:
    python -m experiments.evaluate --model runs/latest/full-s0/model --split test --out eval.json
    python -m experiments.evaluate --model PATH --data data/test --tools none --out eval.json
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EvaluateArgs:
    """Evaluate a Qwen2.5-VL / Qwen2-VL checkpoint on the offline task set.

    Attributes:
        model: checkpoint directory (or hub id); ``relook-tiny`` is the committed base.
        out: JSON file to write (overall and per-family accuracy, tool-call rates).
        split: generated split (``test`` uses held-out backgrounds and digits).
        n: questions to generate.
        seed: generator seed.
        data: an exported folder (``python -m agent.data``) to score instead of generating.
        tools: tools advertised: none, reflect, confirm, both.
        temperature: sampling temperature (0 = greedy).
        max_turns: assistant turns per episode.
        difficulty: generator difficulty in [0, 1].
    """

    out: Path
    model: str = "relook-tiny"
    split: str = "test"
    n: int = 40
    seed: int = 1
    data: Path | None = None
    tools: str = "both"
    temperature: float = 0.0
    max_turns: int = 4
    difficulty: float = 0.5


def main(args: EvaluateArgs) -> dict:
    """Run the evaluation and write ``args.out`` atomically; returns the summary dict."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from agent.data.io import load_split
    from agent.data.tasks import TaskConfig, generate
    from agent.evaluation import evaluate
    from agent.modeling import load_policy
    from agent.rollout import Agent, AgentConfig
    from analysis.rundir import atomic_write_json
    from train.loop import make_generator

    agent_cfg = AgentConfig(
        tools=args.tools, temperature=args.temperature, max_turns=args.max_turns
    )
    if args.split not in ("train", "test"):
        raise ValueError(f"--split must be 'train' or 'test', got {args.split!r}")
    policy = load_policy(args.model)
    samples = (
        load_split(args.data)
        if args.data
        else generate(args.split, args.n, args.seed, TaskConfig(difficulty=args.difficulty))
    )
    torch.manual_seed(0)
    agent = Agent(policy.tokenizer, policy.image_processor, agent_cfg)
    summary, _ = evaluate(agent, make_generator(policy), samples)
    result = {
        "model": str(args.model),
        "split": args.split if not args.data else str(args.data),
        "seed": args.seed,
        "tools": args.tools,
        "temperature": args.temperature,
        **summary,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from experiments.cli import run_cli

    run_cli(main, EvaluateArgs)
