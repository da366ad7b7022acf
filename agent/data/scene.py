"""One sample's images under construction: background crops plus the objects pasted on them.

:class:`Scene` owns the random generator of a sample and records every pasted object (kind,
colour, shape or digit, bbox, size) so that answers can be derived and checked from ``meta``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.data import images as _images
from agent.data import render as _render
from agent.data.render import COLOURS, SHAPES

OPACITY_DROP = 0.35
"""Target opacity is ``1 - OPACITY_DROP * difficulty`` (1.0 = opaque at difficulty 0)."""

PATCH_MIN_DIFF = 24.0
"""``odd``/patch: minimum mean absolute pixel change (0-255) for a copied patch to count."""

INK_RGB: dict[str, tuple[int, int, int]] = {"black": (20, 20, 20), "white": (245, 245, 245)}
"""High-contrast digit ink, chosen by the luminance under the digit (low difficulty)."""

Box = tuple[int, int, int, int]


class Scene:
    """The images of one sample and the objects pasted on each (image ``k`` is 0-based here).

    Args:
        rng: The sample's random generator (all draws of the sample go through it, in order).
        split: ``"train"`` or ``"test"``: selects backgrounds and MNIST digits.
        n: Number of images.
        image_size: (width, height) in pixels of every image.
        target_size: Inclusive (min, max) target side in pixels.
        difficulty: In [0, 1]; sets target size half, opacity, outline and digit ink.
        same: If True, all images are the same crop of the same photo (the ``odd`` family).
    """

    def __init__(
        self,
        rng: np.random.Generator,
        split: str,
        n: int,
        image_size: tuple[int, int],
        target_size: tuple[int, int],
        difficulty: float,
        same: bool = False,
    ):
        self.rng, self.split = rng, split
        self.image_size, self.size_range, self.difficulty = image_size, target_size, difficulty
        names = _images.backgrounds_for_split(split)
        picks = rng.choice(len(names), size=1 if same else n, replace=n > len(names))
        backgrounds = [names[int(i)] for i in picks]
        windows = [_images.random_window(b, rng, image_size) for b in backgrounds]
        base = [_images.render_background(b, w, image_size) for b, w in zip(backgrounds, windows)]
        self.backgrounds = backgrounds * n if same else backgrounds
        self.windows = windows * n if same else windows
        self.images = [base[0].copy() for _ in range(n)] if same else base
        self.objects: list[list[dict[str, Any]]] = [[] for _ in range(n)]

    @property
    def n(self) -> int:
        """Number of images."""
        return len(self.images)

    @property
    def opacity(self) -> float:
        """Opacity of pasted targets, ``1 - OPACITY_DROP * difficulty``."""
        return 1.0 - OPACITY_DROP * self.difficulty

    def target_size(self) -> int:
        """A target side in pixels: big half of the range at difficulty 0, small half at 1."""
        lo, hi = self.size_range
        d = self.difficulty
        return int(round(self.rng.uniform(lo + (hi - lo) * (1 - d) / 2, hi - (hi - lo) * d / 2)))

    def _place(self, k: int, size: tuple[int, int]) -> tuple[int, int]:
        taken = [tuple(o["bbox"]) for o in self.objects[k]]
        return _render.free_position(self.rng, self.image_size, size, taken)

    def add_shape(self, k: int, colour: str, shape: str, size: int | None = None) -> Box:
        """Paste a ``colour`` ``shape`` of side ``size`` pixels (default random) into image k.

        Args:
            k: 0-based image index.
            colour: A key of ``COLOURS``.
            shape: One of ``SHAPES``.
            size: Side in pixels; None draws one with :meth:`target_size`.

        Returns:
            The (x1, y1, x2, y2) bbox in pixels; also recorded in ``objects[k]``.
        """
        size = self.target_size() if size is None else size
        outline = bool(self.rng.random() >= self.difficulty)
        patch = _render.shape_patch(shape, size, COLOURS[colour], outline)
        box = _render.paste(self.images[k], patch, self._place(k, patch.size), self.opacity)
        obj = {"kind": "shape", "colour": colour, "shape": shape, "bbox": list(box), "size": size}
        self.objects[k].append(obj)
        return box

    def add_digit(self, k: int, digit: int, size: int | None = None) -> Box:
        """Paste a real MNIST ``digit`` of this split into image k.

        Ink is black or white by the luminance under it (high contrast) with probability
        ``1 - difficulty``, else a random colour from ``COLOURS``.

        Args:
            k: 0-based image index.
            digit: 0-9.
            size: Digit height in pixels (default: random in the target-size range).

        Returns:
            The (x1, y1, x2, y2) bbox in pixels; also recorded in ``objects[k]``.
        """
        strokes = _images.load_mnist(self.split)[digit]
        row = int(self.rng.integers(len(strokes)))
        height = self.target_size() if size is None else int(size)
        width_max, height_max = self.image_size[0] - 8, self.image_size[1] - 8
        height = min(height, height_max)
        patch = _render.digit_patch(strokes[row], height, INK_RGB["white"])
        if patch.width > width_max:  # a wide digit at a large size: shrink to fit the image
            height = max(4, height * width_max // patch.width)
            patch = _render.digit_patch(strokes[row], height, INK_RGB["white"])
        xy = self._place(k, patch.size)
        box = (xy[0], xy[1], xy[0] + patch.width, xy[1] + patch.height)
        if self.rng.random() < self.difficulty:
            colour = str(self.rng.choice(list(COLOURS)))
        else:
            colour = "black" if _render.mean_luminance(self.images[k], box) > 127 else "white"
        patch = _render.digit_patch(strokes[row], height, {**COLOURS, **INK_RGB}[colour])
        _render.paste(self.images[k], patch, xy, self.opacity)
        obj = {"kind": "digit", "digit": digit, "colour": colour, "bbox": list(box)}
        self.objects[k].append({**obj, "size": height, "mnist_row": row})
        return box

    def add_distractors(self, k: int, colour: str, shape: str, most: int) -> None:
        """Paste 0..``most`` (uniform) distractor shapes into image k.

        Args:
            k: 0-based image index.
            colour: Target colour word the distractors must not match together with ``shape``.
            shape: Target shape word.
            most: Largest number of distractors.
        """
        for _ in range(int(self.rng.integers(0, most + 1))):
            self.add_shape(k, *distractor(self.rng, colour, shape))

    def copy_patch(self, k: int, tries: int = 8) -> Box | None:
        """Copy a square patch of image k onto another spot of it (a "changed patch").

        Args:
            k: 0-based image index.
            tries: Attempts before giving up.

        Returns:
            The changed (x1, y1, x2, y2) box, or None if no try changed the pixels by at least
            ``PATCH_MIN_DIFF`` on average (e.g. a flat background).
        """
        image = self.images[k]
        for _ in range(tries):
            size = self.target_size()
            src_xy = _render.free_position(self.rng, image.size, (size, size), [])
            src = (*src_xy, src_xy[0] + size, src_xy[1] + size)
            dst_xy = _render.free_position(self.rng, image.size, (size, size), [src])
            dst = (*dst_xy, dst_xy[0] + size, dst_xy[1] + size)
            region = image.crop(src)
            change = np.abs(np.asarray(region, np.float32) - np.asarray(image.crop(dst))).mean()
            if _render.overlaps(src, dst) or change < PATCH_MIN_DIFF:
                continue
            image.paste(region, dst[:2])
            obj = {"kind": "patch", "source": list(src), "bbox": list(dst), "size": size}
            self.objects[k].append(obj)
            return dst
        return None

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable record: ``backgrounds``, ``windows``, ``objects`` per image."""
        return {
            "backgrounds": list(self.backgrounds),
            "windows": [list(w) for w in self.windows],
            "objects": self.objects,
        }


def pick_target(rng: np.random.Generator) -> tuple[str, str]:
    """A uniformly random target (colour, shape) from ``COLOURS`` x ``SHAPES``.

    Args:
        rng: Random generator (2 draws).

    Returns:
        (colour word, shape word).
    """
    colours = list(COLOURS)
    return colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))]


def distractor(rng: np.random.Generator, colour: str, shape: str) -> tuple[str, str]:
    """A distractor (colour, shape) that differs from the target (``colour``, ``shape``).

    40% share the colour, 40% share the shape (hard distractors), 20% differ in both.

    Args:
        rng: Random generator.
        colour: Target colour word.
        shape: Target shape word.

    Returns:
        (colour word, shape word), never equal to the target pair.
    """
    others_c = [c for c in COLOURS if c != colour]
    others_s = [s for s in SHAPES if s != shape]
    r = rng.random()
    new_c = colour if r < 0.4 else others_c[int(rng.integers(len(others_c)))]
    new_s = shape if 0.4 <= r < 0.8 else others_s[int(rng.integers(len(others_s)))]
    return new_c, new_s
