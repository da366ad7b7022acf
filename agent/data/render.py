"""Drawing small targets (coloured shapes, MNIST digits) and pasting them onto photos.

Pure PIL/numpy helpers used by :mod:`agent.data.tasks`. Boxes are (x1, y1, x2, y2) in pixels
with exclusive ends (PIL's convention: ``image.crop(box)`` is exactly the target).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond")
"""Shape words: the shapes that can be drawn (and named in questions)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (40, 180, 50),
    "blue": (40, 80, 235),
    "yellow": (250, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
}
"""Colour words -> RGB fill (0-255) for shapes and coloured digit ink."""

SUPERSAMPLE = 4
"""Shapes are drawn at this multiple of their size, then downscaled, for smooth edges."""

Box = tuple[int, int, int, int]


@functools.lru_cache(maxsize=4096)
def shape_patch(shape: str, size: int, rgb: tuple[int, int, int], outline: bool) -> Image.Image:
    """An RGBA patch holding one filled shape on a transparent square.

    Args:
        shape: One of ``SHAPES``.
        size: Side of the square patch in pixels.
        rgb: Fill colour, 0-255 per channel.
        outline: Draw a dark outline (about 1/10 of the side) for higher contrast.

    Returns:
        A shared (cached) RGBA image of ``size`` x ``size`` pixels; do not modify it.

    Raises:
        ValueError: If ``shape`` is unknown or ``size`` < 4.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if size < 4:
        raise ValueError(f"size must be >= 4 pixels, got {size}")
    s = size * SUPERSAMPLE
    m = s * 0.06  # margin so the outline is not clipped
    big = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(big)
    kwargs = {"fill": (*rgb, 255)}
    if outline:
        kwargs.update(outline=(15, 15, 15, 255), width=max(1, round(s * 0.1)))
    if shape == "square":
        draw.rectangle((m, m, s - m, s - m), **kwargs)
    elif shape == "circle":
        draw.ellipse((m, m, s - m, s - m), **kwargs)
    elif shape == "triangle":
        draw.polygon([(s / 2, m), (s - m, s - m), (m, s - m)], **kwargs)
    else:  # diamond
        draw.polygon([(s / 2, m), (s - m, s / 2), (s / 2, s - m), (m, s / 2)], **kwargs)
    return big.resize((size, size), Image.Resampling.LANCZOS)


def digit_patch(stroke: np.ndarray, height: int, rgb: tuple[int, int, int]) -> Image.Image:
    """An RGBA patch of a handwritten digit: colour ``rgb``, alpha = stroke intensity.

    The 28x28 stroke is cropped to its ink bounding box, then scaled to ``height`` keeping its
    aspect ratio (width at least ``height // 3`` so a "1" stays visible).

    Args:
        stroke: [28, 28] uint8 MNIST intensities, white (255) ink on black (0).
        height: Patch height in pixels.
        rgb: Ink colour, 0-255 per channel.

    Returns:
        A new RGBA image ``height`` pixels tall.

    Raises:
        ValueError: If the stroke has no ink or ``height`` < 4.
    """
    if height < 4:
        raise ValueError(f"height must be >= 4 pixels, got {height}")
    rows = np.flatnonzero(stroke.max(axis=1) > 0)
    cols = np.flatnonzero(stroke.max(axis=0) > 0)
    if rows.size == 0:
        raise ValueError("digit stroke has no ink (all zeros)")
    ink = stroke[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    width = max(height // 3, round(height * ink.shape[1] / ink.shape[0]))
    alpha = Image.fromarray(np.ascontiguousarray(ink)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    patch = Image.new("RGBA", (width, height), (*rgb, 0))
    patch.putalpha(alpha)
    return patch


def paste(image: Image.Image, patch: Image.Image, xy: tuple[int, int], opacity: float) -> Box:
    """Alpha-blend an RGBA ``patch`` onto ``image`` in place at top-left ``xy``.

    Args:
        image: RGB image to modify in place.
        patch: RGBA patch; its alpha channel is multiplied by ``opacity``.
        xy: (x, y) top-left corner in pixels of ``image``.
        opacity: Blend factor in [0, 1]; 1 = opaque target, lower = blended into the photo.

    Returns:
        The (x1, y1, x2, y2) box covered by the patch (exclusive ends).
    """
    alpha = patch.getchannel("A")
    if opacity < 1.0:
        alpha = alpha.point([round(v * opacity) for v in range(256)])
    image.paste(patch.convert("RGB"), xy, mask=alpha)
    x, y = int(xy[0]), int(xy[1])
    return (x, y, x + patch.width, y + patch.height)


def overlaps(a: Box, b: Box, gap: int = 0) -> bool:
    """Whether boxes ``a`` and ``b`` overlap, or come closer than ``gap`` pixels.

    Args:
        a: (x1, y1, x2, y2) in pixels, exclusive ends.
        b: (x1, y1, x2, y2) in pixels, exclusive ends.
        gap: Required clearance in pixels; 0 means touching boxes do not overlap.

    Returns:
        True if the boxes overlap or are closer than ``gap``.
    """
    return not (
        a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    )


def free_position(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    patch_size: tuple[int, int],
    taken: list[Box],
    gap: int = 4,
    tries: int = 64,
) -> tuple[int, int]:
    """A uniformly random top-left corner where a patch does not overlap ``taken`` boxes.

    Args:
        rng: Random generator.
        image_size: (width, height) of the image in pixels.
        patch_size: (width, height) of the patch in pixels; must fit inside the image.
        taken: Boxes already occupied (x1, y1, x2, y2).
        gap: Minimum distance in pixels kept between the patch and any taken box.
        tries: Rejection-sampling attempts before giving up.

    Returns:
        (x, y) in pixels. Rejection sampling: after ``tries`` failures the last candidate is
        returned even if it overlaps (callers keep targets small, so this is rare).
    """
    max_x = image_size[0] - patch_size[0]
    max_y = image_size[1] - patch_size[1]
    x = y = 0
    for _ in range(tries):
        x = int(rng.integers(0, max_x + 1))
        y = int(rng.integers(0, max_y + 1))
        box = (x, y, x + patch_size[0], y + patch_size[1])
        if not any(overlaps(box, other, gap) for other in taken):
            break
    return x, y


def mean_luminance(image: Image.Image, box: Box) -> float:
    """Mean luminance of ``image`` inside ``box``: ITU-R 601 luma averaged over pixels.

    Args:
        image: RGB image.
        box: (x1, y1, x2, y2) in pixels, exclusive ends.

    Returns:
        Mean luma in [0, 255].
    """
    region = np.asarray(image.crop(box).convert("L"), dtype=np.float32)
    return float(region.mean())
