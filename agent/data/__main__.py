"""CLI: generate one split and export it (``python -m agent.data --split test --n 50 --out DIR``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import tyro

from agent.data.io import export_split
from agent.data.tasks import FAMILIES, TaskConfig, generate


def main(
    out: Path,
    split: Literal["train", "test"] = "test",
    n: int = 50,
    seed: int = 0,
    difficulty: float = 1.0,
    families: tuple[str, ...] = FAMILIES,
) -> None:
    """Generate ``n`` samples of ``split`` and export them to ``out`` (Parquet + PNG).

    Args:
        out: Destination folder (replaced atomically if it exists).
        split: Which split: train or test (test uses held-out backgrounds and digits).
        n: Number of samples.
        seed: Non-negative base seed.
        difficulty: In [0, 1]; 0 = big opaque targets, 1 = small blended ones.
        families: Task families to rotate through.
    """
    config = TaskConfig(families=families, difficulty=difficulty)
    samples = generate(split, n, seed=seed, config=config)
    folder = export_split(samples, out)
    counts = Counter(s.family for s in samples)
    print(f"wrote {len(samples)} {split} samples to {folder}")
    for family in config.families:
        print(f"  {family:<8} {counts[family]}")


if __name__ == "__main__":
    tyro.cli(main)
