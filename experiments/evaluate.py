"""``python -m experiments.evaluate``: score a model on relook's offline multi-image set, or on a
public benchmark read from a local folder (:mod:`agent.benchmarks`).

Examples:
    python -m experiments.evaluate --model runs/latest/full-s0/model --split test --out eval.json
    python -m experiments.evaluate --model PATH --data data/test --tools none --out eval.json
    python -m experiments.evaluate --benchmark vstar --data-root ~/data/vstar_bench \
        --model PATH --max-new-tokens 512 --out vstar.json
    python -m experiments.evaluate --eval-data data/val.jsonl --eval-data vstar:~/data/vstar_bench \
        --model PATH --out eval.json      # sources of agent.data.sources, one summary each
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro


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
        tools: tools advertised: none, both, or comma-separated tool names and module:Class
            user tools (:attr:`agent.rollout.AgentConfig.tools`).
        temperature: sampling temperature (0 = greedy).
        max_turns: assistant turns per episode.
        difficulty: generator difficulty in [0, 1].
        benchmark: a public benchmark to score instead of the generated set (names:
            ``agent.benchmarks.BENCHMARKS``: vstar, hrbench_4k, hrbench_8k, mme_realworld,
            muirbench, blink, mantis_eval, mmiu, relook); needs ``data_root``.
        data_root: the benchmark's folder as downloaded (layouts: README, loader docstrings).
        limit: score only the first N questions of the benchmark (after ``categories``), or
            of each ``eval_data`` source.
        categories: score only these benchmark categories.
        records: also write one record per question (answer, parsed answer, tool calls).
        untagged: on a benchmark, also score a final reply given without ``<answer>`` tags
            (the published scorers read raw replies; off-the-shelf checkpoints may not tag).
        max_new_tokens: tokens the policy may sample per turn.
        max_total_tokens: context budget of a whole episode, in tokens.
        eval_data: a source to score instead, repeatable: ``[FORMAT:]PATH`` or ``generator``
            (``n`` generated ``split`` questions; :mod:`agent.data.sources`, README "Train on
            your data"). Every row is scored, one summary per source under ``sources``;
            benchmark formats (``vstar:DIR``, ...) by their published rule. Checked before the
            model is loaded.
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
    benchmark: str | None = None
    data_root: Path | None = None
    limit: int | None = None
    categories: tuple[str, ...] = ()
    records: bool = False
    untagged: bool = True
    max_new_tokens: int = 48
    max_total_tokens: int = 4096
    eval_data: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()


def check_out(out: Path) -> None:
    """Fail fast on an ``--out`` that could never be written, before any model is loaded.

    Raises:
        ValueError: ``out`` is a directory, its folder is missing or lies under a regular file,
            or a file cannot be created in that folder; the message names the path.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the path of a JSON file to write")
    folder = out.parent
    for above in (folder, *folder.parents):
        if above.exists():
            if not above.is_dir():
                raise ValueError(f"--out {out} cannot be written: {above} is a file, not a folder")
            break
    if not folder.is_dir():
        raise ValueError(f"--out {out} cannot be written: its folder {folder} does not exist")
    try:  # a real probe: permission bits, read-only mounts, quotas
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ValueError(f"--out {out} cannot be written in {folder}: {exc}") from exc


def main(args: EvaluateArgs) -> dict:
    """Run the evaluation and write ``args.out`` atomically; returns the summary dict.

    Raises:
        ValueError: ``args.out`` cannot be written (:func:`check_out`, checked first), or
            another argument is invalid.
    """
    check_out(args.out)
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
        tools=args.tools,
        temperature=args.temperature,
        max_turns=args.max_turns,
        max_new_tokens=args.max_new_tokens,
        max_total_tokens=args.max_total_tokens,
    )
    if args.split not in ("train", "test"):
        raise ValueError(f"--split must be 'train' or 'test', got {args.split!r}")
    if args.eval_data:
        return _main_sources(args, agent_cfg)
    if args.benchmark is not None:
        return _main_benchmark(args, agent_cfg)
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


def _main_sources(args: EvaluateArgs, agent_cfg) -> dict:
    """Score ``args.model`` on each ``--eval-data`` source (all checked first)."""
    import torch

    from agent.benchmarks import BENCHMARKS, load_benchmark
    from agent.benchmarks.run import run_benchmark
    from agent.data.sources import GeneratorSource, check_sources, eval_rows
    from agent.data.tasks import TaskConfig, generate_one
    from agent.evaluation import evaluate
    from agent.rollout import Agent
    from analysis.rundir import atomic_write_json
    from train.loop import make_generator

    if args.benchmark is not None or args.data is not None:
        raise ValueError("--eval-data replaces --benchmark and --data; give one of them")
    specs = check_sources(args.eval_data, weights_allowed=False)
    tasks = TaskConfig(difficulty=args.difficulty)
    generated = GeneratorSource(lambda k: generate_one(args.split, k, args.seed, tasks), args.n)
    policy = _load_model(args.model)
    agent = Agent(policy.tokenizer, policy.image_processor, agent_cfg)
    sources = {}
    for spec in specs:
        torch.manual_seed(0)
        if spec.format in BENCHMARKS:  # the benchmark's published scoring
            items = load_benchmark(spec.format, spec.path, args.limit, args.categories)
            sources[spec.text] = run_benchmark(
                agent, make_generator(policy), spec.format, items, untagged=args.untagged
            )
        else:
            samples = eval_rows([spec.text], generated)
            samples = samples[: args.limit] if args.limit is not None else samples
            sources[spec.text] = evaluate(agent, make_generator(policy), samples)[0]
    result = {
        "model": str(args.model),
        "eval_data": list(args.eval_data),
        "tools": args.tools,
        "temperature": args.temperature,
        "sources": sources,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


def _load_model(model: str):
    """``load_policy(model)``; ``random`` builds a random-weight tiny model (plumbing tests)."""
    from agent.modeling import build_tiny_model, load_policy

    if model != "random":
        return load_policy(model)
    with tempfile.TemporaryDirectory(prefix="relook-random-") as tmp:
        return load_policy(build_tiny_model(tmp, seed=0))


def _main_benchmark(args: EvaluateArgs, agent_cfg) -> dict:
    """Score ``args.model`` on ``args.benchmark`` read from ``args.data_root``."""
    import torch

    from agent.benchmarks import load_benchmark
    from agent.benchmarks.run import run_benchmark
    from agent.rollout import Agent
    from analysis.rundir import atomic_write_json
    from train.loop import make_generator

    if args.data_root is None:
        raise ValueError("--benchmark needs --data-root (the benchmark's local folder)")
    items = load_benchmark(args.benchmark, args.data_root, args.limit, args.categories)
    policy = _load_model(args.model)
    torch.manual_seed(0)
    agent = Agent(policy.tokenizer, policy.image_processor, agent_cfg)
    summary = run_benchmark(
        agent,
        make_generator(policy),
        args.benchmark,
        items,
        records=args.records,
        untagged=args.untagged,
    )
    result = {
        "model": str(args.model),
        "benchmark": args.benchmark,
        "data_root": str(args.data_root),
        "tools": args.tools,
        "temperature": args.temperature,
        **summary,
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))
    return result


if __name__ == "__main__":
    from experiments.cli import run_cli

    run_cli(main, EvaluateArgs)
