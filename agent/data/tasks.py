"""Multi-image fine-grained QA, generated offline with answers known by construction.

Each sample shows 2-4 crops of real photos (:mod:`agent.data.images`) with small targets pasted
at random positions: coloured shapes or real MNIST digits. Five task families (docs/method.md
section 7): ``find`` the image holding X, ``count`` images holding X, ``read`` a digit, ``compare``
an attribute across images, spot the ``odd`` image. A sample is a pure function of
(split, seed, index): ``numpy.random.default_rng([seed, split_code, index])``.

Vocabularies (``COLOURS``, ``SHAPES``, ``QUESTIONS``) are module constants and deliberately
small and regular: a tokenizer is trained on this text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from agent.data import render as _render
from agent.data.images import SPLITS
from agent.data.scene import Scene, pick_target

FAMILIES: tuple[str, ...] = ("find", "count", "read", "compare", "odd")
"""The original task families, in rotation order (sample ``index`` gets
``families[index % len]``); ``TaskConfig``'s default."""

ZOOM_FAMILIES: tuple[str, ...] = ("shape_in", "find_small")
"""Families with zoom headroom: the deciding object is small (``TaskConfig.small_size``), so
the processor's downscaling removes its shape and a crop of the original restores it (the
V* / HR-Bench premise). ``shape_in`` names the image; ``find_small`` asks which image holds
the small object, so every image must be looked at."""

ALL_FAMILIES: tuple[str, ...] = FAMILIES + ZOOM_FAMILIES
"""Every family name the generator knows."""

COLOURS: dict[str, tuple[int, int, int]] = _render.COLOURS
"""Colour words used in questions -> RGB fill (0-255): red, green, blue, yellow, purple, orange."""

SHAPES: tuple[str, ...] = _render.SHAPES
"""Shape words used in questions: square, circle, triangle, diamond."""

QUESTIONS: dict[str, str] = {
    "find": "Which image contains the {colour} {shape}?",
    "count": "How many images contain {article} {colour} {shape}?",
    "read": "What digit is written in image {k}?",
    "compare_largest": "Which image has the largest {colour} {shape}?",
    "compare_most": "Which image has the most {colour} {shape}s?",
    "odd": "Which image is different from the others?",
}
"""Question templates of :data:`FAMILIES`, keyed by family (``compare`` has two variants).
relook-tiny's tokenizer is trained on these (``agent.modeling``): extend
:data:`ZOOM_QUESTIONS` instead, so that a rebuild of the committed model stays bit-identical."""

ZOOM_QUESTIONS: dict[str, str] = {
    "shape_in": "What shape is the {colour} object in image {k}?",
    "find_small": "Which image contains the small {colour} {shape}?",
}
"""Question templates of :data:`ZOOM_FAMILIES`."""

ANSWER_TYPES: dict[str, str] = {
    "find": "index",
    "count": "int",
    "read": "digit",
    "compare": "index",
    "odd": "index",
    "shape_in": "word",
    "find_small": "index",
}
"""Answer type of each family: ``index`` (1-based image number), ``int``, ``digit``, ``word``."""

SPLIT_CODES: dict[str, int] = {"train": 0, "test": 1}
"""Integer code of each split, mixed into the random seed."""

MAX_IMAGES = 8
"""Largest number of images per sample that ``TaskConfig`` accepts."""

COMPARE_MARGIN = (1.4, 1.2)
"""``compare``/largest: the largest target is at least this many times the side of any other,
at difficulty 0 and 1 respectively (linear in between)."""


@dataclass(frozen=True)
class Sample:
    """One multi-image question with its answer known by construction.

    Attributes:
        id: ``f"{split}-{seed}-{index:06d}"``.
        split: ``"train"`` or ``"test"``.
        family: Task family name (one of ``FAMILIES``).
        images: RGB images (2-4 by default), all of ``TaskConfig.image_size``.
        question: Question text only, without "Image k:" labels (the prompt builder adds those).
        answer: Canonical normalised answer, e.g. ``"2"``.
        answer_type: ``"index"`` (1-based image number), ``"int"``, ``"digit"`` or ``"word"``.
        target_image: 1-based image holding the target, or None.
        target_bbox: (x1, y1, x2, y2) in pixels of ``target_image`` (exclusive ends), or None.
        meta: JSON-serialisable details: ``backgrounds``, ``windows`` (crop boxes in background
            pixels), ``objects`` (per image: list of pasted objects with kind, colour, shape or
            digit, bbox, size in pixels), ``target``, ``variant``, ``difficulty``, ``image_size``.
    """

    id: str
    split: str
    family: str
    images: tuple[Image.Image, ...]
    question: str
    answer: str
    answer_type: str
    target_image: int | None
    target_bbox: tuple[int, int, int, int] | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskConfig:
    """What to generate.

    Attributes:
        families: Task families to rotate through (subset of ``FAMILIES``); default all.
        n_images: Inclusive (min, max) number of images per sample; 2 <= min <= max <= 8.
            ``odd`` uses at least 3 (two images cannot have an odd one out).
        image_size: (width, height) in pixels of every image: a random window of a background
            photo, resized.
        target_size: Inclusive (min, max) side in pixels of pasted targets (shape side, digit
            height); max at most a quarter of the shorter image side.
        difficulty: In [0, 1]. 0 = targets in the big half of ``target_size``, opaque and
            outlined; 1 = small half, blended (opacity ``1 - scene.OPACITY_DROP``), no
            outline, digits in a random colour instead of black/white. Linear in between.
        small_size: Inclusive (min, max) side in pixels of every object in the
            :data:`ZOOM_FAMILIES` (the deciding object and its distractors); the default
            12-20 px of a 224 px image is 6-10 px in relook-tiny's 112 px model frame, below
            one 14 px patch, and fills a zoomed crop.
    """

    families: tuple[str, ...] = FAMILIES
    n_images: tuple[int, int] = (2, 4)
    image_size: tuple[int, int] = (224, 224)
    target_size: tuple[int, int] = (20, 48)
    difficulty: float = 1.0
    small_size: tuple[int, int] = (12, 20)

    def __post_init__(self) -> None:
        for name in ("families", "n_images", "image_size", "target_size", "small_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [f for f in self.families if f not in ALL_FAMILIES]
        if not self.families or unknown:
            raise ValueError(f"families: unknown or empty {self.families!r}; known: {ALL_FAMILIES}")
        lo, hi = _pair("n_images", self.n_images)
        if not 2 <= lo <= hi <= MAX_IMAGES:
            raise ValueError(f"n_images must satisfy 2 <= min <= max <= {MAX_IMAGES}, got {lo, hi}")
        if "odd" in self.families and hi < 3:
            raise ValueError(f"n_images max must be >= 3 for family 'odd', got {self.n_images}")
        width, height = _pair("image_size", self.image_size)
        if not (64 <= width <= 4096 and 64 <= height <= 4096):
            raise ValueError(f"image_size must be in [64, 4096] pixels, got {self.image_size}")
        for name in ("target_size", "small_size"):
            lo, hi = _pair(name, getattr(self, name))
            if not 8 <= lo <= hi <= min(width, height) // 4:
                raise ValueError(
                    f"{name} must satisfy 8 <= min <= max <= min(image_size) // 4 "
                    f"= {min(width, height) // 4}, got {getattr(self, name)}"
                )
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {self.difficulty!r}")


def _pair(name: str, value: tuple[int, ...]) -> tuple[int, int]:
    if len(value) != 2 or not all(isinstance(v, (int, np.integer)) for v in value):
        raise ValueError(f"{name} must be a pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


class _Result(NamedTuple):
    question: str
    answer: str
    target_image: int | None  # 1-based
    target_bbox: tuple[int, int, int, int] | None
    meta: dict[str, Any]


def _find(scene: Scene) -> _Result:
    """One image holds the target (colour, shape); every image may hold distractors."""
    rng = scene.rng
    colour, shape = pick_target(rng)
    t = int(rng.integers(scene.n))
    box = scene.add_shape(t, colour, shape)
    for k in range(scene.n):
        scene.add_distractors(k, colour, shape, most=1 if k == t else 2)
    question = QUESTIONS["find"].format(colour=colour, shape=shape)
    meta = {"target": {"colour": colour, "shape": shape}, "variant": "shape"}
    return _Result(question, str(t + 1), t + 1, box, meta)


def _count(scene: Scene) -> _Result:
    """0..n images hold the target (one each); the first holder is the target image."""
    rng = scene.rng
    colour, shape = pick_target(rng)
    count = int(rng.integers(0, scene.n + 1))
    holders = sorted(int(i) for i in rng.choice(scene.n, size=count, replace=False))
    boxes = {k: scene.add_shape(k, colour, shape) for k in holders}
    for k in range(scene.n):
        scene.add_distractors(k, colour, shape, most=1 if k in boxes else 2)
    article = "an" if colour[0] in "aeiou" else "a"
    question = QUESTIONS["count"].format(article=article, colour=colour, shape=shape)
    first = holders[0] if holders else None
    meta = {"target": {"colour": colour, "shape": shape}, "holders": [k + 1 for k in holders]}
    return _Result(
        question,
        str(count),
        None if first is None else first + 1,
        None if first is None else boxes[first],
        {**meta, "variant": "shape"},
    )


def _read(scene: Scene) -> _Result:
    """Image t holds one MNIST digit; other images may hold other digits."""
    rng = scene.rng
    t = int(rng.integers(scene.n))
    digit = int(rng.integers(10))
    box = scene.add_digit(t, digit)
    for k in range(scene.n):
        if k != t and rng.random() < 0.5:
            scene.add_digit(k, int(rng.integers(10)))
    question = QUESTIONS["read"].format(k=t + 1)
    return _Result(
        question, str(digit), t + 1, box, {"target": {"digit": digit}, "variant": "digit"}
    )


def _compare(scene: Scene) -> _Result:
    """Every image holds the target; the winner's is largest by a margin, or most numerous."""
    rng = scene.rng
    lo, hi = scene.size_range
    d = scene.difficulty
    margin = COMPARE_MARGIN[0] + (COMPARE_MARGIN[1] - COMPARE_MARGIN[0]) * d
    colour, shape = pick_target(rng)
    winner = int(rng.integers(scene.n))
    target = {"colour": colour, "shape": shape}
    if hi >= math.ceil(lo * margin) and rng.random() < 0.6:
        big = int(rng.integers(math.ceil(lo * margin), hi + 1))
        small_max = max(lo, int(big / margin))
        sizes = [
            big if k == winner else int(rng.integers(lo, small_max + 1)) for k in range(scene.n)
        ]
        boxes = [scene.add_shape(k, colour, shape, size=s) for k, s in enumerate(sizes)]
        question = QUESTIONS["compare_largest"].format(colour=colour, shape=shape)
        meta = {"target": target, "variant": "largest", "sizes": sizes}
        box = boxes[winner]
    else:
        top = int(rng.integers(2, 4))
        counts = [top if k == winner else int(rng.integers(0, top)) for k in range(scene.n)]
        size = scene.target_size()
        boxes = [
            [scene.add_shape(k, colour, shape, size=size) for _ in range(c)]
            for k, c in enumerate(counts)
        ]
        question = QUESTIONS["compare_most"].format(colour=colour, shape=shape)
        meta = {"target": target, "variant": "most", "counts": counts}
        box = boxes[winner][0]
    for k in range(scene.n):
        scene.add_distractors(k, colour, shape, most=1)
    return _Result(question, str(winner + 1), winner + 1, box, meta)


def _odd(scene: Scene) -> _Result:
    """Identical crops except image t: a pasted shape or digit, or a copied patch."""
    rng = scene.rng
    t = int(rng.integers(scene.n))
    variant = ("shape", "digit", "patch")[int(rng.integers(3))]
    box = scene.copy_patch(t) if variant == "patch" else None
    if box is None and variant == "digit":
        box = scene.add_digit(t, int(rng.integers(10)))
    elif box is None:
        variant = "shape"
        box = scene.add_shape(t, *pick_target(rng))
    return _Result(QUESTIONS["odd"], str(t + 1), t + 1, box, {"variant": variant})


def _other_colour(rng: np.random.Generator, colour: str) -> str:
    others = [c for c in COLOURS if c != colour]
    return others[int(rng.integers(len(others)))]


def _shape_in(scene: Scene) -> _Result:
    """Image t holds the one ``colour`` object of that image (small); the others hold small
    objects too, some of the same colour with other shapes, so only image t answers."""
    rng = scene.rng
    colour, shape = pick_target(rng)
    t = int(rng.integers(scene.n))
    box = scene.add_shape(t, colour, shape)
    for k in range(scene.n):
        for _ in range(int(rng.integers(0 if k == t else 1, 3))):
            if k != t and rng.random() < 0.5:
                other = [s for s in SHAPES if s != shape]
                scene.add_shape(k, colour, other[int(rng.integers(len(other)))])
            else:
                scene.add_shape(k, _other_colour(rng, colour), SHAPES[int(rng.integers(4))])
    question = ZOOM_QUESTIONS["shape_in"].format(colour=colour, k=t + 1)
    meta = {"target": {"colour": colour, "shape": shape}, "variant": "shape"}
    return _Result(question, shape, t + 1, box, meta)


def _find_small(scene: Scene) -> _Result:
    """Every image holds one small ``colour`` object, each of another shape where there are
    enough shapes (4); image t's is the asked ``shape``. Colour alone cannot decide."""
    rng = scene.rng
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    t = int(rng.integers(scene.n))
    order = [str(s) for s in rng.permutation(SHAPES)]
    shape = order[0]
    boxes = []
    for k in range(scene.n):
        if k == t:
            this = shape
        else:  # any shape but the target's; distinct from each other while they last
            this = order[1 + (k - (k > t)) % (len(SHAPES) - 1)]
        boxes.append(scene.add_shape(k, colour, this))
        if rng.random() < 0.5:
            scene.add_shape(k, _other_colour(rng, colour), SHAPES[int(rng.integers(4))])
    question = ZOOM_QUESTIONS["find_small"].format(colour=colour, shape=shape)
    meta = {"target": {"colour": colour, "shape": shape}, "variant": "shape"}
    return _Result(question, str(t + 1), t + 1, boxes[t], meta)


_FAMILY_FUNCS = {
    "find": _find,
    "count": _count,
    "read": _read,
    "compare": _compare,
    "odd": _odd,
    "shape_in": _shape_in,
    "find_small": _find_small,
}


def generate_one(split: str, index: int, seed: int = 0, config: TaskConfig | None = None) -> Sample:
    """Generate sample ``index`` of a split: a pure function of (split, seed, index, config).

    Args:
        split: ``"train"`` or ``"test"`` (test uses held-out backgrounds and MNIST digits).
        index: Sample index >= 0; the family is ``config.families[index % len(families)]``.
        seed: Non-negative base seed.
        config: Generation settings; default ``TaskConfig()``.

    Returns:
        The sample; images are RGB of ``config.image_size`` pixels.

    Raises:
        ValueError: If ``split`` is unknown or ``index``/``seed`` is negative.
    """
    config = TaskConfig() if config is None else config
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    family = config.families[index % len(config.families)]
    lo, hi = config.n_images
    n = int(rng.integers(max(lo, 3) if family == "odd" else lo, hi + 1))
    scene = Scene(
        rng,
        split,
        n,
        config.image_size,
        config.small_size if family in ZOOM_FAMILIES else config.target_size,
        config.difficulty,
        same=family == "odd",
    )
    result = _FAMILY_FUNCS[family](scene)
    meta = {
        **scene.meta(),
        **result.meta,
        "difficulty": config.difficulty,
        "image_size": list(config.image_size),
    }
    bbox = None if result.target_bbox is None else tuple(int(v) for v in result.target_bbox)
    return Sample(
        id=f"{split}-{seed}-{index:06d}",
        split=split,
        family=family,
        images=tuple(scene.images),
        question=result.question,
        answer=result.answer,
        answer_type=ANSWER_TYPES[family],
        target_image=result.target_image,
        target_bbox=bbox,
        meta=meta,
    )


def generate(split: str, n: int, seed: int = 0, config: TaskConfig | None = None) -> list[Sample]:
    """Generate samples 0..n-1 of a split; sample i does not depend on ``n``.

    Args:
        split: ``"train"`` or ``"test"``.
        n: Number of samples (>= 0).
        seed: Non-negative base seed.
        config: Generation settings; default ``TaskConfig()``.

    Returns:
        ``[generate_one(split, i, seed, config) for i in range(n)]``; families are balanced
        (they rotate by index).

    Raises:
        ValueError: If ``n`` is negative, or as :func:`generate_one`.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    config = TaskConfig() if config is None else config
    return [generate_one(split, i, seed, config) for i in range(n)]
