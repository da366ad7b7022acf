"""Offline multi-image fine-grained QA: real package images, answers known by construction.

- :mod:`agent.data.images`: background photos and MNIST digits read from installed wheels.
- :mod:`agent.data.render`: drawing and pasting small targets.
- :mod:`agent.data.tasks`: ``Sample``, ``TaskConfig``, the task families and the generator.
- :mod:`agent.data.scoring`: answer normalisation and exact match.
- :mod:`agent.data.io`: export to / load from a folder (Parquet + PNG).
- :mod:`agent.data.sources`: training / evaluation data from files (``--train-data``), read by
  :mod:`agent.data.rows`; imported on use, not here.

CLI: ``python -m agent.data --split test --n 50 --seed 0 --out DIR``.
"""

from agent.data.images import TEST_BACKGROUNDS, TRAIN_BACKGROUNDS
from agent.data.io import export_split, load_split
from agent.data.scoring import exact_match, normalize_answer
from agent.data.tasks import (
    COLOURS,
    FAMILIES,
    QUESTIONS,
    SHAPES,
    Sample,
    TaskConfig,
    generate,
    generate_one,
)

__all__ = [
    "COLOURS",
    "FAMILIES",
    "QUESTIONS",
    "SHAPES",
    "TEST_BACKGROUNDS",
    "TRAIN_BACKGROUNDS",
    "Sample",
    "TaskConfig",
    "exact_match",
    "export_split",
    "generate",
    "generate_one",
    "load_split",
    "normalize_answer",
]
