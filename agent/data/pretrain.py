"""Supervised pretraining examples for relook-tiny: perception, image grounding, protocol.

These are **not** the evaluation families (``find``, ``count``, ``read``, ``compare``, ``odd``):
they teach a base model to see (colour, shape, digit of one object), to ground image indices
("Image 2 shows ..."), and to speak the turn format and the tool-call syntax in generic uses
(zoom in with ``confirm`` to describe an object; look again with ``reflect`` to restate an
image). A small ``format`` share asks evaluation-family questions, answered with the gold
answer (default; a pretrained VLM answers such questions as well as its
perception allows) or a randomly drawn one (``family_answers="random"``), and sometimes a
**random** valid tool call first, so the base knows the answer space and the protocol but was
never shown when or where a tool helps: that is left to RL, as in IMAgent's pure end-to-end RL
from a pretrained base (docs/method.md §1).

Every example is deterministic from ``(seed, index, step fraction)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from agent.data import tasks
from agent.data.render import COLOURS, SHAPES
from agent.data.scene import Scene, pick_target
from agent.data.tasks import Sample, TaskConfig

KINDS = (
    "colour", "shape", "present", "digit", "label", "locate", "restate", "format",
    "ground", "named", "which",
)  # fmt: skip
"""Example kinds. The last three are the generic tool literacy of relook-tiny v4 (issue 17):
``ground`` (where is the X in image k: a box in the model frame), ``named`` (what shape is the
X in image k) and ``which`` (which image shows X), the last two with a tool call whose image
and box are drawn independently of whether it helps (:func:`literacy_call`). They default to
weight 0, so the v3 stream is unchanged."""

TOOL_FIRST_KINDS = ("colour", "shape", "present", "digit")
"""Perception kinds that may call a tool before answering (``perception_tool_frac``): every
single-image perception question. They name no image index and hold one object, unlike the
evaluation families, so they show how to answer after a tool, not when a tool helps."""

THOUGHTS = ("I look at the image.", "Let me look closely.", "I check the image.")


@dataclass(frozen=True)
class PretrainExample:
    """One supervised transcript.

    Attributes:
        kind: one of :data:`KINDS`.
        sample: images + question (``answer`` holds the final answer text).
        tools: advertise the tools in the system turn.
        script: the assistant turns, in order (the environment inserts tool results between).
    """

    kind: str
    sample: Sample
    tools: bool
    script: tuple[str, ...]


@dataclass(frozen=True)
class Mix:
    """Sampling weights of the example kinds (normalised when drawn)."""

    colour: float = 0.18
    shape: float = 0.18
    present: float = 0.12
    digit: float = 0.12
    label: float = 0.16
    locate: float = 0.08
    restate: float = 0.06
    format: float = 0.10
    ground: float = 0.0
    named: float = 0.0
    which: float = 0.0

    @classmethod
    def only(cls, *kinds: str) -> Mix:
        """Equal weight on ``kinds``, 0 elsewhere.

        Raises:
            ValueError: a name not in :data:`KINDS`.
        """
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown example kinds {sorted(unknown)}; known: {KINDS}")
        return cls(**{k: float(k in kinds) for k in KINDS})

    def probs(self) -> np.ndarray:
        w = np.array([getattr(self, k) for k in KINDS], dtype=float)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"Mix weights must be >= 0 and not all 0, got {w.tolist()}")
        return w / w.sum()


def _think(rng: np.random.Generator, text: str | None = None) -> str:
    return f"<think>{text or THOUGHTS[int(rng.integers(len(THOUGHTS)))]}</think>"


def _describe(obj: dict | None) -> str:
    if obj is None:
        return "nothing"
    if obj["kind"] == "digit":
        return f"the digit {obj['digit']}"
    return f"a {obj['colour']} {obj['shape']}"


def _scene(rng, split: str, n: int, cfg: TaskConfig, plain: float = 0.0) -> Scene:
    """A scene whose backgrounds are, with probability ``plain`` each, flat noisy grey instead of
    a photo (curriculum: perception is learned on plain backgrounds first, docs/gotchas.md)."""
    scene = Scene(rng, split, n, cfg.image_size, cfg.target_size, cfg.difficulty)
    for k in range(n):
        if rng.random() < plain:
            level = int(rng.integers(40, 216))
            noise = rng.integers(-12, 13, size=(cfg.image_size[1], cfg.image_size[0], 1))
            flat = np.clip(level + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
            scene.images[k] = Image.fromarray(flat)
            scene.backgrounds[k] = "plain"
    return scene


def _sample(kind: str, scene: Scene, question: str, answer: str, index: int) -> Sample:
    return Sample(
        id=f"pretrain-{kind}-{index:07d}", split=scene.split, family=f"pretrain:{kind}", images=tuple(scene.images),
        question=question, answer=answer, answer_type="word", target_image=None, target_bbox=None, meta=scene.meta(),
    )  # fmt: skip


def box_in_frame(box, image, frame, rng: np.random.Generator) -> list[int]:
    """A ``confirm`` box around an object: ``box`` ``(x1, y1, x2, y2)`` in original pixels of
    ``image`` mapped to the model frame (:class:`agent.tools.ImageFrame`, pixels) and padded
    by 2-7 pixels (one ``rng`` draw), clipped to the frame."""
    fw, fh = frame.size(image)
    sx, sy = fw / image.width, fh / image.height
    x1, y1, x2, y2 = box
    pad = int(rng.integers(2, 8))
    return [
        max(0, int(x1 * sx) - pad),
        max(0, int(y1 * sy) - pad),
        min(fw, int(np.ceil(x2 * sx)) + pad),
        min(fh, int(np.ceil(y2 * sy)) + pad),
    ]


def _size(rng, sizes) -> int | None:
    return None if sizes is None else int(rng.integers(sizes[0], sizes[1] + 1))


def confirm_call(image: int, box: list[int]) -> str:
    """A ``confirm`` call on ``box`` (model-frame pixels) of image ``image`` (1-based), wrapped in
    ``<tool_call>`` tags as the policy writes it."""
    call = {"name": "confirm", "arguments": {"image": image, "bbox_2d": box}}
    return f"<tool_call>{json.dumps(call)}</tool_call>"


def _single(
    kind: str, rng, split, cfg, index, sizes=None, plain=0.0, frame=None, tool_frac=0.0
) -> PretrainExample:
    scene = _scene(rng, split, 1, cfg, plain)
    if kind == "digit":
        d = int(rng.integers(10))
        scene.add_digit(0, d, size=_size(rng, sizes))
        q, a, seen = "What digit is written in the image?", str(d), f"I see the digit {d}."
    elif kind == "present":
        colour, shape = pick_target(rng)
        yes = rng.random() < 0.5
        if yes:
            scene.add_shape(0, colour, shape, size=_size(rng, sizes))
        scene.add_distractors(0, colour, shape, most=1)
        q, a = f"Is there a {colour} {shape} in the image?", "yes" if yes else "no"
        seen = f"There is {'a' if yes else 'no'} {colour} {shape}."
    else:
        colour, shape = pick_target(rng)
        scene.add_shape(0, colour, shape, size=_size(rng, sizes))
        q = "What colour is the shape?" if kind == "colour" else "What shape is in the image?"
        a, seen = (colour if kind == "colour" else shape), f"I see a {colour} {shape}."
    sample = _sample(kind, scene, q, a, index)
    tools = bool(rng.random() < 0.5)
    script: tuple[str, ...] = (f"{_think(rng, seen)}<answer>{a}</answer>",)
    if tool_frac > 0 and tools and kind in TOOL_FIRST_KINDS and rng.random() < tool_frac:
        objects = scene.objects[0]
        target = objects[0] if kind != "present" and objects else None
        if target is not None and rng.random() < 0.5:
            box = box_in_frame(target["bbox"], scene.images[0], frame, rng)
            call = confirm_call(1, box)
        else:
            call = random_tool_call(sample, rng, frame)
        script = (_think(rng) + call, *script)
    return PretrainExample(kind, sample, tools, script)


def _label(rng, split, cfg, index, sizes=None, plain=0.0) -> PretrainExample:
    n = int(rng.integers(cfg.n_images[0], cfg.n_images[1] + 1))
    scene = _scene(rng, split, n, cfg, plain)
    for k in range(n):
        if rng.random() < 0.75:
            scene.add_shape(k, *pick_target(rng), size=_size(rng, sizes))
    k = int(rng.integers(n))
    what = _describe(scene.objects[k][0] if scene.objects[k] else None)
    sample = _sample("label", scene, f"What does image {k + 1} show?", what, index)
    script = (f"{_think(rng, f'Image {k + 1} shows {what}.')}<answer>{what}</answer>",)
    return PretrainExample("label", sample, bool(rng.random() < 0.5), script)


def _tool_example(kind: str, rng, split, cfg, index, frame) -> PretrainExample:
    n = 1 if kind == "locate" else int(rng.integers(cfg.n_images[0], cfg.n_images[1] + 1))
    scene = _scene(rng, split, n, cfg)
    for k in range(n):
        if kind == "locate" or rng.random() < 0.75:
            scene.add_shape(k, *pick_target(rng))
    k = int(rng.integers(n))
    obj = scene.objects[k][0] if scene.objects[k] else None
    what = _describe(obj)
    if kind == "locate":
        box = box_in_frame(obj["bbox"], scene.images[k], frame, rng)
        call = {"name": "confirm", "arguments": {"image": k + 1, "bbox_2d": box}}
        q, seen = (
            f"Zoom in and describe the object in image {k + 1}.",
            f"The zoomed region shows {what}.",
        )
    else:
        call = {"name": "reflect", "arguments": {"images": [k + 1]}}
        q, seen = f"Look at image {k + 1} again and describe it.", f"Image {k + 1} shows {what}."
    sample = _sample(kind, scene, q, what, index)
    first = f"{_think(rng)}<tool_call>{json.dumps(call)}</tool_call>"
    return PretrainExample(
        kind, sample, True, (first, f"{_think(rng, seen)}<answer>{what}</answer>")
    )


def random_tool_call(sample: Sample, rng: np.random.Generator, frame) -> str:
    """A syntactically valid random ``reflect`` (random image subset) or ``confirm`` (random box of
    a quarter to half the model-frame side) call, wrapped in ``<tool_call>`` tags."""
    n = len(sample.images)
    if rng.random() < 0.5:
        ks = sorted(
            rng.choice(
                np.arange(1, n + 1), size=int(rng.integers(1, n + 1)), replace=False
            ).tolist()
        )
        call = {"name": "reflect", "arguments": {"images": ks}}
    else:
        k = int(rng.integers(1, n + 1))
        w, h = frame.size(sample.images[k - 1])
        bw, bh = int(rng.integers(w // 4, w // 2 + 1)), int(rng.integers(h // 4, h // 2 + 1))
        x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        return confirm_call(k, [x, y, x + bw, y + bh])
    return f"<tool_call>{json.dumps(call)}</tool_call>"


def random_answer(sample: Sample, rng: np.random.Generator) -> str:
    """A uniformly random answer of ``sample``'s answer type (never informed by the images)."""
    n = len(sample.images)
    if sample.answer_type == "index":
        return str(rng.integers(1, n + 1))
    if sample.answer_type == "int":
        return str(rng.integers(0, n + 1))
    return str(rng.integers(0, 10))


FAMILY_ANSWERS = ("gold", "random")


def _format(
    rng, split, cfg, index, frame, tool_frac: float, family_answers: str = "gold"
) -> PretrainExample:
    sample = tasks.generate_one(split, index, int(rng.integers(1 << 30)), cfg)
    tools = bool(rng.random() < 0.75)
    think = _think(rng)
    drawn = random_answer(sample, rng)  # drawn in both modes: the stream stays the same
    answer = f"{think}<answer>{drawn if family_answers == 'random' else sample.answer}</answer>"
    script = (answer,)
    if tools and rng.random() < tool_frac:
        script = (_think(rng) + random_tool_call(sample, rng, frame), answer)
    return PretrainExample("format", sample, tools, script)


def frame_box(box, image, frame) -> list[int]:
    """``box`` ``(x1, y1, x2, y2)`` in original pixels of ``image`` as integer pixels of the
    model frame (:class:`agent.tools.ImageFrame`): floor of the start, ceil of the end, clipped."""
    fw, fh = frame.size(image)
    sx, sy = fw / image.width, fh / image.height
    return [
        max(0, int(box[0] * sx)),
        max(0, int(box[1] * sy)),
        min(fw, int(np.ceil(box[2] * sx))),
        min(fh, int(np.ceil(box[3] * sy))),
    ]


def describe_image(objects: list[dict]) -> str:
    """``"a red square and a blue circle"`` for an image's objects (``"nothing"`` if none)."""
    if not objects:
        return "nothing"
    words = [_describe(o) for o in objects]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def describe_scene(scene: Scene) -> str:
    """One sentence per image, ``"Image 1 shows ... Image 2 shows ..."``: the long thought
    of the multi-image literacy kinds (issue 17 asks for episodes long enough to measure a
    decay of attention)."""
    return " ".join(
        f"Image {k + 1} shows {describe_image(objs)}." for k, objs in enumerate(scene.objects)
    )


def _inside(obj: dict, box: tuple[int, int, int, int]) -> bool:
    x1, y1, x2, y2 = obj["bbox"]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return box[0] <= cx < box[2] and box[1] <= cy < box[3]


def literacy_call(scene: Scene, k: int, rng: np.random.Generator, frame) -> tuple[str, str]:
    """A ``confirm`` call drawn independently of whether it helps, and what its crop shows.

    The image is the asked image ``k`` (0-based) or, with probability 1/2 when there are
    several, another uniformly drawn one; the box is, with probability 1/2, a box 2-7 px
    around a uniformly drawn object of that image (if it has one), else a random box of a
    quarter to half the model-frame side. No draw depends on the object size or on the answer.

    Returns:
        ``(call, seen)``: the ``<tool_call>`` text and a thought naming what the crop holds
        (objects whose centre falls in the crop), e.g. ``"The zoomed region of image 2 shows
        a red circle."``.
    """
    j = (
        k
        if scene.n == 1 or rng.random() < 0.5
        else int(rng.choice([i for i in range(scene.n) if i != k]))
    )
    image, objs = scene.images[j], scene.objects[j]
    if objs and rng.random() < 0.5:
        box = box_in_frame(objs[int(rng.integers(len(objs)))]["bbox"], image, frame, rng)
    else:
        w, h = frame.size(image)
        bw, bh = int(rng.integers(w // 4, w // 2 + 1)), int(rng.integers(h // 4, h // 2 + 1))
        x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        box = [x, y, x + bw, y + bh]
    fw, fh = frame.size(image)
    sx, sy = image.width / fw, image.height / fh
    orig = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    inside = [o for o in objs if _inside(o, orig)]
    seen = f"The zoomed region of image {j + 1} shows {describe_image(inside)}."
    return confirm_call(j + 1, box), seen


def _unique(objs: list[dict], key: str) -> list[dict]:
    """Objects of one image whose ``key`` (colour or shape) no other object there shares."""
    return [o for o in objs if sum(p.get(key) == o.get(key) for p in objs) == 1]


def _literacy_scene(rng, split, cfg, sizes, plain, min_images: int = 1) -> Scene:
    n = int(
        rng.integers(max(min_images, cfg.n_images[0] if min_images > 1 else 1), cfg.n_images[1] + 1)
    )
    scene = _scene(rng, split, n, cfg, plain)
    for k in range(n):
        for _ in range(int(rng.integers(1, 3))):
            scene.add_shape(k, *pick_target(rng), size=_size(rng, sizes))
    return scene


def _ground(rng, split, cfg, index, frame, sizes=None, plain=0.0) -> PretrainExample:
    """Where is the ``colour`` object in image k: the answer is its box in the model frame."""
    scene = _literacy_scene(rng, split, cfg, sizes, plain)
    k = int(rng.integers(scene.n))
    choices = _unique(scene.objects[k], "colour") or scene.objects[k][:1]
    obj = choices[int(rng.integers(len(choices)))]
    box = frame_box(obj["bbox"], scene.images[k], frame)
    answer = "[" + ", ".join(str(v) for v in box) + "]"
    q = f"Where is the {obj['colour']} object in image {k + 1}?"
    sample = _sample("ground", scene, q, answer, index)
    think = _think(rng, f"Image {k + 1} shows {describe_image(scene.objects[k])}.")
    return PretrainExample(
        "ground", sample, bool(rng.random() < 0.5), (f"{think}<answer>{answer}</answer>",)
    )


def _named(rng, split, cfg, index, frame, sizes, plain, tool_frac) -> PretrainExample:
    """What shape is the ``colour`` object in image k (or what colour is its ``shape``)."""
    scene = _literacy_scene(rng, split, cfg, sizes, plain)
    k = int(rng.integers(scene.n))
    by_colour = rng.random() < 0.5
    choices = _unique(scene.objects[k], "colour" if by_colour else "shape") or scene.objects[k][:1]
    obj = choices[int(rng.integers(len(choices)))]
    if by_colour:
        q, a = f"What shape is the {obj['colour']} object in image {k + 1}?", obj["shape"]
    else:
        q, a = f"What colour is the {obj['shape']} in image {k + 1}?", obj["colour"]
    return _literacy_example("named", scene, k, q, a, rng, index, frame, tool_frac)


def _which(rng, split, cfg, index, frame, sizes, plain, tool_frac) -> PretrainExample:
    """Which image shows the ``colour`` ``shape``: an object no other image holds (one is
    added to a random image if the scene has none)."""
    scene = _literacy_scene(rng, split, cfg, sizes, plain, min_images=2)
    pairs = [(o["colour"], o["shape"]) for objs in scene.objects for o in objs]
    unique = [(j, p) for j, objs in enumerate(scene.objects) for p in
              [(o["colour"], o["shape"]) for o in objs] if pairs.count(p) == 1]  # fmt: skip
    if unique:
        k, (colour, shape) = unique[int(rng.integers(len(unique)))]
    else:
        k = int(rng.integers(scene.n))
        free = [(c, sh) for c in COLOURS for sh in SHAPES if (c, sh) not in pairs]
        colour, shape = free[int(rng.integers(len(free)))]
        scene.add_shape(k, colour, shape, size=_size(rng, sizes))
    q = f"Which image shows the {colour} {shape}?"
    return _literacy_example("which", scene, k, q, str(k + 1), rng, index, frame, tool_frac)


def _literacy_example(kind, scene, k, q, a, rng, index, frame, tool_frac) -> PretrainExample:
    """The transcript of a ``named``/``which`` question: a long thought describing every
    image, then the answer; with tools advertised, with probability ``tool_frac`` a
    :func:`literacy_call` first, followed by what its crop shows."""
    sample = _sample(kind, scene, q, a, index)
    tools = bool(rng.random() < 0.5)
    thought, answer = describe_scene(scene), f"<answer>{a}</answer>"
    if tools and rng.random() < tool_frac:
        call, seen = literacy_call(scene, k, rng, frame)
        script = (_think(rng) + call, f"{_think(rng, seen + ' ' + thought)}{answer}")
        return PretrainExample(kind, sample, tools, script)
    return PretrainExample(kind, sample, tools, (f"{_think(rng, thought)}{answer}",))


def pretrain_example(
    index: int,
    seed: int,
    cfg: TaskConfig,
    frame,
    mix: Mix | None = None,
    tool_frac: float = 0.3,
    split: str = "train",
    sizes: tuple[int, int] | None = None,
    plain: float = 0.0,
    family_answers: str = "gold",
    perception_tool_frac: float = 0.0,
    literacy_tool_frac: float = 0.5,
) -> PretrainExample:
    """Example ``index`` of the pretraining stream (pure function of its arguments).

    Args:
        index: position in the stream.
        seed: stream seed.
        cfg: scene settings (``difficulty`` and ``target_size`` carry the curriculum).
        frame: the image processor's resize rule (:class:`agent.tools.ImageFrame`) for boxes.
        mix: kind weights.
        tool_frac: in ``format`` examples with tools advertised, share that calls a tool first.
        split: ``"train"`` (training backgrounds/digits) or ``"test"`` (held-out probes).
        sizes: side range in pixels of the described shapes in perception/label examples
            (the curriculum starts with shapes far larger than ``cfg.target_size`` allows);
            ``None`` uses ``cfg.target_size``.
        plain: probability that each background of a perception/label example is flat grey.
        family_answers: answers of the ``format`` (evaluation-family) examples: ``"gold"``
            (the base answers multi-image questions without tools as a pretrained VLM does,
            with whatever its perception allows) or ``"random"`` (uniform over the answer
            type: protocol only). Either way any tool call in them is drawn at random, never
            informed by the question, so no example shows when or where a tool helps.
        perception_tool_frac: share of the single-image perception questions with tools
            advertised that first call a tool (half of them ``confirm`` on a box around the
            object, the rest a random ``reflect`` or ``confirm``; presence questions only the
            random call) and then answer the question as asked, for any object size. Without
            them, with the default mix 86% of the examples that call a tool follow it with a
            description (``locate``, ``restate``; the rest are ``format`` examples with a
            random call), and the base answered every question with one after a tool call (measured on v3: 0 of 64 small-shape questions after a ``confirm`` on
            the shape). v3 trained 300 more steps with 0.5 of them (colour, shape, presence):
            20-30 px shapes 0.30 without tools, 0.97 after a ``confirm`` on them. A model
            pretrained from scratch with 0.5 of them on all four kinds (1,800 steps) reached
            only 0.30 zoomed (0.42 without): after a zoom it often answered a shape question
            with a digit. 0 draws nothing: the stream is unchanged.
        literacy_tool_frac: share of the ``named``/``which`` examples with tools advertised
            that call :func:`literacy_call` before answering (image and box drawn
            independently of whether the call helps).

    Raises:
        ValueError: unknown ``family_answers``.
    """
    if family_answers not in FAMILY_ANSWERS:
        raise ValueError(f"family_answers must be one of {FAMILY_ANSWERS}, got {family_answers!r}")
    rng = np.random.default_rng([seed, 7, index])
    kind = KINDS[int(rng.choice(len(KINDS), p=(mix or Mix()).probs()))]
    if kind in ("colour", "shape", "present", "digit"):
        return _single(kind, rng, split, cfg, index, sizes, plain, frame, perception_tool_frac)
    if kind == "label":
        return _label(rng, split, cfg, index, sizes, plain)
    if kind in ("locate", "restate"):
        return _tool_example(kind, rng, split, cfg, index, frame)
    if kind == "ground":
        return _ground(rng, split, cfg, index, frame, sizes, plain)
    if kind in ("named", "which"):
        fn = _named if kind == "named" else _which
        return fn(rng, split, cfg, index, frame, sizes, plain, literacy_tool_frac)
    return _format(rng, split, cfg, index, frame, tool_frac, family_answers)


__all__ = [
    "KINDS",
    "Mix",
    "box_in_frame",
    "confirm_call",
    "PretrainExample",
    "pretrain_example",
    "random_answer",
    "random_tool_call",
    "COLOURS",
    "SHAPES",
]
