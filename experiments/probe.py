"""``python -m experiments.probe``: what a base model can do before RL (issue-3 checks).

Writes one JSON with single-image perception per kind at the easiest and the hardest target
scale, the evaluation families without tools (per family and per target size), and the
protocol use of sampled first turns with tools advertised. Held-out test split throughout.

Example:
    python -m experiments.probe --model models/relook-tiny --out probe.json
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ProbeArgs:
    """Probe a base model.

    Attributes:
        model: checkpoint directory.
        out: JSON file to write.
        n: questions per probe.
    """

    model: str
    out: Path
    n: int = 64


def main(args: ProbeArgs) -> dict:
    """Run every probe; writes ``args.out`` atomically and returns the result."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from agent.modeling import load_policy
    from analysis.rundir import atomic_write_json
    from train import probes

    policy = load_policy(args.model)
    result = {"model": args.model, **probes.all_probes(policy, n=args.n)}
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from experiments.cli import run_cli

    run_cli(main, ProbeArgs)
