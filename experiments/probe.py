"""``python -m experiments.probe``: what a base model can do before RL (issue-3 checks).

Writes one JSON with single-image perception per kind at three target scales, the evaluation
families without tools (per family and per target size), the protocol use of sampled first
turns with tools advertised, and the base model's attention curves: image share versus
generated-token index for single-image and multi-image questions, and image share before and
after tool calls (docs/method.md §6). Held-out test split throughout. The long attention tables go
to ``<out>.attention.parquet`` and ``<out>.events.parquet`` (column ``setting``).

Example:
    python -m experiments.probe --out probe.json                  # relook-tiny
    python -m experiments.probe --model runs/latest/full-s0/model --out full.json
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

TOKEN_BINS = (0, 4, 8, 16, 32, 64, 128, 1 << 20)
"""Edges (generated-token index, tokens) of the attention-curve bins: [0, 4), [4, 8), ..."""


@dataclass
class ProbeArgs:
    """Probe a base model.

    Attributes:
        out: JSON file to write.
        model: checkpoint directory; ``relook-tiny`` is the committed base.
        n: questions per probe.
        attention_n: sampled episodes per attention setting (0 skips the attention report).
        attention_temperature: sampling temperature of the attention episodes.
        card: also (re)write ``<model>/README.md``, the model card of a ``train.pretrain``
            model, from its ``relook_pretrain.json`` and this probe.
    """

    out: Path
    model: str = "relook-tiny"
    n: int = 64
    attention_n: int = 24
    attention_temperature: float = 1.0
    card: bool = False


def _binned_curve(curve: pd.DataFrame) -> list[dict]:
    """Mean of an :func:`analysis.metrics.image_share_curve` (image share per generated token)
    per generated-token bin of :data:`TOKEN_BINS`; ``n`` is the most trajectories in the bin."""
    rows = []
    for lo, hi in zip(TOKEN_BINS[:-1], TOKEN_BINS[1:]):
        c = curve[(curve["token"] >= lo) & (curve["token"] < hi)]
        if len(c):
            label = f"{lo}-{hi - 1}" if hi < TOKEN_BINS[-1] else f">={lo}"
            rows.append(
                {
                    "tokens": label,
                    "image_share": float(c["image_share"].mean()),
                    "n": int(c["n"].max()),
                }
            )
    return rows


def base_attention(
    policy, n: int = 24, seed: int = 3, temperature: float = 1.0
) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Attention of ``policy`` on its own sampled held-out episodes, tools advertised.

    Two settings: ``single`` (one image: colour, shape and digit questions, 20-56 px objects at
    difficulty 0.5) and ``multi`` (the evaluation families, 2-4 images, difficulty 0.5). Each
    episode is replayed with :func:`experiments.attention.measure` (exact fp32 attention mass of
    every generated token on each region).

    Args:
        policy: an :class:`agent.modeling.Policy`.
        n: episodes per setting.
        seed: question seed.
        temperature: sampling temperature.

    Returns:
        ``(summary, attention, events)``: per setting ``n``, ``accuracy``, ``tool_call_rate``,
        ``image_share`` (mean over generated tokens), ``curve`` (binned image share versus
        generated-token index), ``before_after`` (mean image share in the 8 tokens before and
        after each tool result, over ``n_events`` calls; NaN-free means only); and the long
        tables with a ``setting`` column.
    """
    import torch

    from agent.data.pretrain import Mix, pretrain_example
    from agent.data.tasks import TaskConfig, generate
    from agent.evaluation import evaluate
    from agent.rollout import Agent, AgentConfig
    from agent.tools import ImageFrame
    from analysis.events import before_after
    from analysis.metrics import image_share_curve
    from experiments.attention import measure
    from train.loop import make_generator

    cfg = TaskConfig(difficulty=0.5)
    frame = ImageFrame.from_processor(policy.image_processor)
    mix = Mix.only("colour", "shape", "digit")
    settings = {
        "single": [
            pretrain_example(i, seed, cfg, frame, mix, split="test").sample for i in range(n)
        ],
        "multi": generate("test", n, seed, cfg),
    }
    agent = Agent(
        policy.tokenizer,
        policy.image_processor,
        AgentConfig(tools="both", temperature=temperature, max_turns=4, max_new_tokens=40),
    )
    summary, atts, evs = {}, [], []
    for name, samples in settings.items():
        torch.manual_seed(seed)
        result, trajs = evaluate(agent, make_generator(policy), samples)
        ids = [f"{name}/{t.sample_id}" for t in trajs]
        att, ev = measure(policy, trajs, ids)
        ba = before_after(att, ev) if len(ev) else pd.DataFrame(columns=["before", "after"])
        ok = ba.dropna(subset=["before", "after"])
        curve = image_share_curve(att)
        summary[name] = {
            "n": len(trajs),
            "accuracy": result["accuracy"],
            "tool_call_rate": result["tool_call_rate"],
            "mean_response_length": result["mean_response_length"],
            "image_share": float(curve["image_share"].mean()) if len(curve) else float("nan"),
            "curve": _binned_curve(curve) if len(curve) else [],
            "before_after": {
                "n_events": len(ok),
                "before": float(ok["before"].mean()) if len(ok) else float("nan"),
                "after": float(ok["after"].mean()) if len(ok) else float("nan"),
            },
        }
        atts.append(att.assign(setting=name))
        evs.append(ev.assign(setting=name))
    return summary, pd.concat(atts, ignore_index=True), pd.concat(evs, ignore_index=True)


def main(args: ProbeArgs) -> dict:
    """Run every probe; writes ``args.out`` atomically and returns the result."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from agent.modeling import load_policy
    from analysis.rundir import atomic_write_json
    from train import probes

    policy = load_policy(args.model)
    result = {"model": args.model, **probes.all_probes(policy, n=args.n)}
    if args.attention_n:
        summary, att, ev = base_attention(
            policy, n=args.attention_n, temperature=args.attention_temperature
        )
        result["attention"] = summary
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        att.to_parquet(out.with_suffix(".attention.parquet"))
        ev.to_parquet(out.with_suffix(".events.parquet"))
    atomic_write_json(args.out, result)
    if args.card:
        from agent.modeling import RELOOK_TINY, resolve_model
        from train.model_card import write_card

        shown = "models/relook-tiny" if args.model == RELOOK_TINY else args.model
        print(f"model card: {write_card(resolve_model(args.model), result, shown)}")
    print(json.dumps(result, indent=1, default=_json_default))
    return result


def _json_default(v):
    """Printable form of values json cannot encode (paths, numpy scalars)."""
    return v.item() if isinstance(v, np.generic) else str(v)


if __name__ == "__main__":
    from experiments.cli import run_cli

    run_cli(main, ProbeArgs)
