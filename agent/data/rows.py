"""Rows of a table -> :class:`~agent.data.tasks.Sample`: relook's schema and the DeepEyes /
verl RL layout (:mod:`agent.data.sources` reads the tables). A reader takes the source (for
``src.name``, ``src.path``, ``src.base`` and ``src.where(row, field)`` in messages), the row
as a dict and its index; every error names the file, the row and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.benchmarks.base import ImageRef, label_images, option_lines
from agent.data.scoring import ANSWER_TYPES
from agent.data.tasks import Sample

REQUIRED = ("images", "question", "answer")
"""Columns every table in relook's schema must have."""

DEEPEYES_COLUMNS = ("prompt", "images", "reward_model")
"""Columns of a DeepEyes / verl RL parquet that the ``deepeyes`` adapter reads."""


def relook_row(src, row: Mapping, index: int) -> Sample:
    """One row of relook's schema (the table in :mod:`agent.data.sources`) as a Sample.

    ``options`` become ``(A) ...`` lines under the question (kept as ``meta["choices"]``);
    missing ``id`` / ``split`` / ``family`` default to ``<file stem>-<row>`` and the source name.

    Raises:
        FileNotFoundError / ValueError: a missing or undecodable image, an empty question or
            answer, an unknown ``answer_type``, a ``meta`` string that is not JSON.
    """
    question = text_cell(row, "question", src, index)
    options = list(row.get("options") or [])
    if options:
        question = f"{question}\n{option_lines(options, '({letter}) {text}')}"
    answer_type = row.get("answer_type") or "word"
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"{src.where(index, 'answer_type')}: {answer_type!r} is not one of "
                         f"{ANSWER_TYPES}")  # fmt: skip
    bbox = row.get("target_bbox")
    meta = row.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as err:
            raise ValueError(f"{src.where(index, 'meta')}: not JSON: {err}") from err
    return Sample(
        id=str(row.get("id") or f"{Path(src.path).stem}-{index:06d}"),
        split=str(row.get("split") or src.name),
        family=str(row.get("family") or src.name),
        images=decode_images(src, row.get("images"), index),
        question=question,
        answer=text_cell(row, "answer", src, index),
        answer_type=answer_type,
        target_image=None if row.get("target_image") is None else int(row["target_image"]),
        target_bbox=None if bbox is None else tuple(int(v) for v in bbox),
        meta={**meta, "source": src.name, "row": index, "choices": options},
    )


def deepeyes_row(src, row: Mapping, index: int) -> Sample:
    """One DeepEyes / verl row (layout: :func:`agent.data.sources.load_deepeyes`) as a Sample.

    Raises:
        FileNotFoundError / ValueError: no user message with text, no ``ground_truth``, or a
            missing or undecodable image.
    """
    users = [
        m for m in row.get("prompt") or [] if isinstance(m, Mapping) and m.get("role") == "user"
    ]
    if not users or not isinstance(users[-1].get("content"), str):
        raise ValueError(f"{src.where(index, 'prompt')}: no user message with text content")
    text = re.sub(r"^(\s*<image>)+\s*", "", users[-1]["content"])
    question = label_images(text)[0].strip()
    reward = row.get("reward_model") or {}
    truth = reward.get("ground_truth") if isinstance(reward, Mapping) else None
    if isinstance(truth, (list, tuple)):
        truth = truth[0] if truth else None
    if truth is None or not str(truth).strip():
        raise ValueError(f"{src.where(index, 'reward_model')}: no ground_truth")
    extra = row.get("extra_info") or {}
    rid = extra.get("index") if isinstance(extra, Mapping) else None
    return Sample(
        id=str(rid if rid is not None else f"{Path(src.path).stem}-{index:06d}"),
        split=str((extra.get("split") if isinstance(extra, Mapping) else None) or src.name),
        family=str(row.get("data_source") or src.name),
        images=decode_images(src, row.get("images"), index),
        question=question,
        answer=str(truth).strip(),
        answer_type="word",
        target_image=None,
        target_bbox=None,
        meta={"source": src.name, "row": index, "style": reward.get("style")},
    )


def text_cell(row: Mapping, field: str, src, index: int) -> str:
    """A required non-empty text cell, stripped; ``ValueError`` names file, row and field."""
    value = row.get(field)
    if value is None or not str(value).strip():
        raise ValueError(f"{src.where(index, field)}: missing or empty")
    return str(value).strip()


def decode_images(src, cells: Any, index: int) -> tuple:
    """Decode a row's image cells (paths relative to ``src.base``, bytes, or ``{"bytes",
    "path"}``) to RGB images.

    Raises:
        FileNotFoundError: an image file is missing; ValueError: no images, or a cell that is
            not an image (both name file, row and field).
    """
    if cells is None or isinstance(cells, (str, bytes, Mapping)):
        cells = [] if cells is None else [cells]
    if not len(cells):
        raise ValueError(f"{src.where(index, 'images')}: no images")
    out = []
    for k, cell in enumerate(cells):
        where = f"{src.where(index, 'images')} image {k}"
        data = cell.get("bytes") if isinstance(cell, Mapping) else cell
        path = cell.get("path") if isinstance(cell, Mapping) else None
        if isinstance(data, str):
            data, path = None, data
        if data:
            ref = ImageRef(where=where, data=bytes(data))
        elif path:
            ref = ImageRef(
                where=where, path=Path(path) if Path(path).is_absolute() else src.base / path
            )
        else:
            raise ValueError(f"{where}: neither image bytes nor a path (got {type(cell).__name__})")
        out.append(ref.load())
    return tuple(out)
