"""The agent's tools: a registry of :class:`Tool` objects, the built-ins ``reflect`` and
``confirm`` (IMAgent, arXiv 2512.08980; docs/method.md §2), and user tools named ``module:Class``.

A tool call is parsed from the policy's text; every failure (bad JSON, unknown tool, bad image
index, bad box) is returned as data, a :class:`ToolResult` with ``ok=False`` and an
``Error: ...`` observation, never raised: a malformed call from the model is part of the episode.

Model-written text is hostile (issue 16): the payload's size and bracket depth are checked
before ``json.loads``, numbers are checked (exact type, finite, bounded) before any arithmetic,
and model text quoted back in an error is cut to :data:`MAX_ECHO_CHARS`. :func:`run_tool` is the
single entry point for every tool, built-in or user: a user tool's exception or malformed result
becomes an error observation too.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

BUILTIN_TOOLS = ("reflect", "confirm")
TOOL_NAMES = BUILTIN_TOOLS  # the built-ins; :func:`registered_tools` lists user tools as well
CropPolicy = Literal["native", "fill"]
CROP_POLICIES = ("native", "fill")

MIN_BOX_PX = 4  # pixels in the model frame (docs/method.md §2)
MAX_ASPECT = 50.0  # crops more elongated than this are refused; Qwen's smart_resize refuses > 200


@dataclass
class ToolImage:
    """An image returned by a tool.

    Attributes:
        image: the RGB image given to the image processor.
        source: 1-based index of the input image it comes from.
        bbox: crop box ``(x1, y1, x2, y2)`` in original pixels of ``source`` (``None``: whole image).
    """

    image: Image.Image
    source: int
    bbox: tuple[int, int, int, int] | None = None


@dataclass
class ToolResult:
    """Outcome of one tool call.

    Attributes:
        name: tool name as called (may be unknown).
        arguments: parsed arguments (``{}`` when unparseable).
        ok: whether the call succeeded.
        text: observation text shown to the policy (``"Error: ..."`` when not ok).
        images: images returned (empty on error).
    """

    name: str
    arguments: dict
    ok: bool
    text: str
    images: list[ToolImage] = field(default_factory=list)


# A real call is ~100 characters; longer text is refused unparsed. Below Python's 4,300-digit
# int limit, so every parsed integer can still be printed and serialised with the trajectory.
MAX_PAYLOAD_CHARS = 4096
MAX_JSON_DEPTH = 8  # bracket nesting of a real call is 3; json.loads recurses per level
MAX_ABS_COORD = 1e6  # pixels; bounds box arithmetic far below float overflow
MAX_ECHO_CHARS = 64  # model-written text echoed in an error observation is cut to this


def _error(name: str, arguments: dict, message: str) -> ToolResult:
    return ToolResult(name=name, arguments=arguments, ok=False, text=f"Error: {message}")


def echo(text: object, limit: int = MAX_ECHO_CHARS) -> str:
    """Model-written ``text`` as it may be quoted in an observation: at most ``limit`` characters.

    Args:
        text: a model-written string (any other value is shown by its type name: the ``str``
            of a 5,000-digit integer raises).
        limit: most characters kept; longer text ends in ``"..."``.

    Returns:
        The (cut) text. Special-token text such as ``<|image_pad|>`` is left as is: the prompt
        builder encodes environment text with special tokens disabled (agent/prompting.py).
    """
    s = text if isinstance(text, str) else type(text).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


def json_depth(text: str) -> int:
    """Deepest bracket (``[`` / ``{``) nesting of ``text``, brackets inside JSON strings ignored.

    A linear scan, so it bounds the recursion ``json.loads`` would do before it runs.
    """
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _load_json(payload: str) -> tuple[object] | str:
    """``(json.loads(payload),)`` of a size- and depth-checked payload, else an error message.

    The value comes in a 1-tuple because a JSON string decodes to a ``str`` too."""
    if len(payload) > MAX_PAYLOAD_CHARS:
        return f"tool call is longer than {MAX_PAYLOAD_CHARS} characters"
    if json_depth(payload) > MAX_JSON_DEPTH:
        return f"tool call nests brackets deeper than {MAX_JSON_DEPTH}"
    try:
        return (json.loads(payload),)
    except (ValueError, RecursionError, OverflowError) as exc:  # JSONDecodeError is a ValueError
        return f"tool call is not valid JSON ({echo(str(exc))})"


def parse_tool_call(payload: str) -> tuple[str, dict] | str:
    """Parse the JSON inside ``<tool_call>...</tool_call>``; never raises.

    The payload is refused before parsing when longer than :data:`MAX_PAYLOAD_CHARS` or nested
    deeper than :data:`MAX_JSON_DEPTH`; JSON errors of any kind (bad syntax, integers over
    Python's 4,300-digit limit, recursion) become messages.

    Args:
        payload: the model-written text between the tags.

    Returns:
        ``(name, arguments)`` on success, else an error message (a ``str``).
    """
    loaded = _load_json(payload.strip())
    if isinstance(loaded, str):
        return loaded
    (obj,) = loaded
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return 'tool call must be a JSON object with a "name" string'
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        return '"arguments" must be a JSON object'
    return obj["name"], args


def model_frame_size(
    image: Image.Image, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Size ``(width, height)`` in pixels at which the Qwen2-VL image processor shows ``image``.

    Follows ``smart_resize`` of transformers' Qwen2-VL image processor: round each side to a
    multiple of ``patch_size * merge_size``, then scale into ``[min_pixels, max_pixels]``.
    """
    factor = patch_size * merge_size
    w, h = image.size
    h_bar = max(factor, round(h / factor) * factor)
    w_bar = max(factor, round(w / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar = math.ceil(h * beta / factor) * factor
        w_bar = math.ceil(w * beta / factor) * factor
    return w_bar, h_bar


@dataclass(frozen=True)
class ImageFrame:
    """How the image processor resizes images, to map model-frame boxes back to original pixels."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    def size(self, image: Image.Image) -> tuple[int, int]:
        """Model-frame ``(width, height)`` in pixels of ``image``."""
        return model_frame_size(
            image, self.patch_size, self.merge_size, self.min_pixels, self.max_pixels
        )

    @classmethod
    def from_processor(cls, image_processor: object) -> ImageFrame:
        """Read patch/merge size and pixel caps from a Qwen2-VL image processor."""
        size = getattr(image_processor, "size", None) or {}
        return cls(
            patch_size=int(image_processor.patch_size),
            merge_size=int(image_processor.merge_size),
            min_pixels=int(
                size.get("shortest_edge", getattr(image_processor, "min_pixels", 56 * 56))
            ),
            max_pixels=int(
                size.get("longest_edge", getattr(image_processor, "max_pixels", 28 * 28 * 1280))
            ),
        )


MAX_INDEX = 10**6  # image numbers beyond this are refused before any formatting or arithmetic


def is_index(value: object) -> bool:
    """Whether ``value`` is a JSON integer usable as an image number: exact type ``int`` (not
    ``bool`` or ``float``) with ``|value| <= MAX_INDEX``."""
    return type(value) is int and -MAX_INDEX <= value <= MAX_INDEX


def is_coordinate(value: object) -> bool:
    """Whether ``value`` is a usable box coordinate: exact type ``int`` or ``float``, finite
    (no NaN / Infinity, which JSON parsing accepts) and ``|value| <= MAX_ABS_COORD`` pixels.

    Checked before ``float()``: an integer with hundreds of digits overflows it."""
    if type(value) is int:
        return -MAX_ABS_COORD <= value <= MAX_ABS_COORD
    return type(value) is float and math.isfinite(value) and abs(value) <= MAX_ABS_COORD


def reflect(arguments: dict, images: list[Image.Image]) -> ToolResult:
    """Visual reflection: return the listed input images again (1-based; default all)."""
    idx = arguments.get("images", list(range(1, len(images) + 1)))
    if is_index(idx):
        idx = [idx]
    if not isinstance(idx, list) or not idx or not all(is_index(k) for k in idx):
        return _error("reflect", arguments, '"images" must be a non-empty list of image numbers')
    bad = [k for k in idx if not 1 <= k <= len(images)]
    if bad:
        return _error("reflect", arguments, f"image {bad[0]} is out of range 1..{len(images)}")
    idx = list(dict.fromkeys(idx))
    text = "Here are the images again: " + ", ".join(f"Image {k}" for k in idx) + "."
    return ToolResult("reflect", arguments, True, text, [ToolImage(images[k - 1], k) for k in idx])


def _check_box(box: object, frame_w: int, frame_h: int) -> tuple[float, float, float, float] | str:
    if not isinstance(box, list) or len(box) != 4 or not all(is_coordinate(v) for v in box):
        return (
            '"bbox_2d" must be a list of 4 numbers [x1, y1, x2, y2] '
            f"(finite, |value| <= {MAX_ABS_COORD:g} px)"
        )
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        return f"box {box} is empty or inverted (need x1 < x2 and y1 < y2)"
    x1, x2 = max(0.0, x1), min(float(frame_w), x2)
    y1, y2 = max(0.0, y1), min(float(frame_h), y2)
    if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
        return f"box {box} is outside the image or smaller than {MIN_BOX_PX} px (image is {frame_w}x{frame_h})"
    if max((x2 - x1) / (y2 - y1), (y2 - y1) / (x2 - x1)) > MAX_ASPECT:
        return f"box {box} has an aspect ratio above {MAX_ASPECT:g}"
    return x1, y1, x2, y2


def _scale_to(image: Image.Image, pixels: float) -> Image.Image:
    """``image`` resized (bicubic) by one factor on both sides to about ``pixels`` pixels."""
    zoom = math.sqrt(pixels / (image.width * image.height))
    size = (max(1, round(image.width * zoom)), max(1, round(image.height * zoom)))
    return image.resize(size, Image.BICUBIC)


def _pad_span(lo: int, hi: int, side: int, size: int) -> tuple[int, int]:
    """``[lo, hi)`` grown about its centre to at least ``min(side, size)``, kept in ``[0, size)``."""
    width = max(hi - lo, min(side, size))
    start = min(max(0, (lo + hi) // 2 - width // 2), size - width)
    return start, start + width


def pad_box(
    box: tuple[int, int, int, int], side: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """``box`` ``(x1, y1, x2, y2)`` grown about its centre so that each side is at least ``side``
    pixels (at most the image's side), shifted back inside the ``width`` x ``height`` image.

    DeepEyes' ``maybe_resize_bbox`` pads boxes under 28 px, one merged Qwen2.5-VL patch, the
    same way (zyang6/DeepEyes, verl/workers/agent/envs/mm_process_engine/visual_toolbox_v2.py).
    """
    x1, x2 = _pad_span(box[0], box[2], side, width)
    y1, y2 = _pad_span(box[1], box[3], side, height)
    return x1, y1, x2, y2


def confirm(
    arguments: dict,
    images: list[Image.Image],
    frame: ImageFrame,
    crop_policy: CropPolicy = "fill",
    crop_max_pixels: int | None = None,
) -> ToolResult:
    """Visual confirmation: crop a box of one input image and return it.

    ``bbox_2d`` is in pixels of image ``image`` as the model sees it (after the processor's
    resize, :meth:`ImageFrame.size`); it is clamped to the image, mapped back to original pixels
    and cropped from the original. ``crop_policy="fill"`` enlarges (or shrinks) the crop to
    ``crop_max_pixels``; ``"native"`` keeps the original pixels, a box under one merged patch
    (``patch_size * merge_size`` px) a side padded to it, and shrinks it only when it is larger
    than ``crop_max_pixels``.

    Args:
        arguments: the call's parsed ``{"image": k, "bbox_2d": [x1, y1, x2, y2]}``.
        images: the input images (original pixels), 1-based in the call.
        frame: the image processor's resize rule.
        crop_policy: ``"fill"`` (zoom to the budget) or ``"native"``.
        crop_max_pixels: pixel budget of the returned crop (None: ``frame.max_pixels``).

    Returns:
        A :class:`ToolResult` holding one :class:`ToolImage` (bbox in original pixels).
    """
    k = arguments.get("image")
    if not is_index(k):
        return _error("confirm", arguments, '"image" must be an image number')
    if not 1 <= k <= len(images):
        return _error("confirm", arguments, f"image {k} is out of range 1..{len(images)}")
    original = images[k - 1]
    fw, fh = frame.size(original)
    box = _check_box(arguments.get("bbox_2d"), fw, fh)
    if isinstance(box, str):
        return _error("confirm", arguments, box)
    sx, sy = original.width / fw, original.height / fh
    x1, y1 = int(math.floor(box[0] * sx)), int(math.floor(box[1] * sy))
    x2, y2 = max(x1 + 1, int(math.ceil(box[2] * sx))), max(y1 + 1, int(math.ceil(box[3] * sy)))
    budget = crop_max_pixels or frame.max_pixels
    if crop_policy == "native":
        side = frame.patch_size * frame.merge_size
        x1, y1, x2, y2 = pad_box((x1, y1, x2, y2), side, original.width, original.height)
        crop = original.crop((x1, y1, x2, y2))
        if crop.width * crop.height > budget:
            crop = _scale_to(crop, budget)
    else:
        crop = _scale_to(original.crop((x1, y1, x2, y2)), budget)
    text = f"Here is the zoomed region of Image {k}."
    return ToolResult("confirm", arguments, True, text, [ToolImage(crop, k, (x1, y1, x2, y2))])


@dataclass(frozen=True)
class ToolState:
    """What a tool may read of the running episode.

    Attributes:
        images: the sample's input images (original pixels), 1-based in calls.
        frame: the image processor's resize rule (model-frame boxes to original pixels).
        crop_policy: how ``confirm`` sizes its crop (:func:`confirm`).
        crop_max_pixels: pixel budget of a ``confirm`` crop (None: ``frame.max_pixels``).
    """

    images: list[Image.Image]
    frame: ImageFrame
    crop_policy: CropPolicy = "fill"
    crop_max_pixels: int | None = None


@runtime_checkable
class Tool(Protocol):
    """A tool the agent can call.

    Attributes:
        name: the name the policy calls it by, also the ``origin`` of the images it returns
            and its metric key (``rollout/tool_calls/<name>``).
        schema: its description as a JSON object in the function format of Qwen2.5's
            ``<tools>`` block (OpenAI-style ``{"name", "description", "parameters"}``, or
            relook's compact ``{"name", "description", "arguments"}``), rendered verbatim with
            ``json.dumps`` into the system turn.
    """

    name: str
    schema: dict

    def run(self, arguments: dict, state: ToolState) -> ToolResult:
        """Execute one call. ``arguments`` is model-written (any JSON object): check it and
        return failures as ``ToolResult(ok=False, text="Error: ...")``; an exception is caught
        by :func:`run_tool` and becomes such a result."""
        ...


class Reflect:
    """Built-in ``reflect``: return the listed input images again (:func:`reflect`)."""

    name = "reflect"
    # Compact schemas (name, description, argument types): the whole system turn stays short,
    # which matters for a tiny model's context and speed; real checkpoints read them as well.
    schema = {
        "name": "reflect",
        "description": "Look at the original images again.",
        "arguments": {"images": "list of image numbers (default: all)"},
    }

    def run(self, arguments: dict, state: ToolState) -> ToolResult:
        return reflect(arguments, state.images)


class Confirm:
    """Built-in ``confirm``: crop a box of one input image (:func:`confirm`)."""

    name = "confirm"
    schema = {
        "name": "confirm",
        "description": "Zoom into a box of one image.",
        "arguments": {"image": "image number", "bbox_2d": "[x1, y1, x2, y2] in pixels"},
    }

    def run(self, arguments: dict, state: ToolState) -> ToolResult:
        return confirm(
            arguments, state.images, state.frame, state.crop_policy, state.crop_max_pixels
        )


_REGISTRY: dict[str, Tool] = {}
TOOL_SPELLINGS = {"none": (), "both": BUILTIN_TOOLS}  # names of tool sets, besides tool names
RESERVED_NAMES = ("input", "other", "?", *TOOL_SPELLINGS)  # image origin / bucket / set names
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def register(tool: Tool) -> Tool:
    """Add ``tool`` to the registry (again registering the same class is a no-op).

    Raises:
        ValueError: no ``name`` / ``schema`` / ``run``, a name that is reserved or not
            ``[A-Za-z_][A-Za-z0-9_.-]*`` (at most 64 characters), a schema that is no
            JSON-serialisable dict, or another class already registered under the name.
    """
    name, schema = getattr(tool, "name", None), getattr(tool, "schema", None)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise ValueError(f"tool name {name!r} is reserved or not [A-Za-z_][A-Za-z0-9_.-]*")
    if not callable(getattr(tool, "run", None)) or not isinstance(schema, dict):
        raise ValueError(f"tool {name!r} needs a run(arguments, state) method and a dict schema")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tool {name!r}: schema is not JSON-serialisable ({exc})") from None
    old = _REGISTRY.get(name)
    if old is not None and type(old) is not type(tool):
        raise ValueError(f"tool name {name!r} is already registered by {type(old).__name__}")
    _REGISTRY.setdefault(name, tool)
    return _REGISTRY[name]


def get_tool(name: str) -> Tool:
    """The registered tool called ``name``.

    Raises:
        ValueError: no such tool (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown tool {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def registered_tools() -> tuple[str, ...]:
    """Names of every registered tool, built-ins first, then in order of registration."""
    return tuple(_REGISTRY)


def load_tool(spec: str) -> str:
    """Import and register a user tool given as ``module:Class`` (or ``module:instance``).

    Args:
        spec: e.g. ``"mypkg.mod:Rotate"``; a class is instantiated without arguments.

    Returns:
        The tool's name.

    Raises:
        ValueError: a malformed spec, a module or attribute that cannot be imported, or a
            tool :func:`register` refuses.
    """
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"tool {spec!r} is not module:Class")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import tool {spec!r}: {exc}") from None
    return register(obj() if isinstance(obj, type) else obj).name


def resolve_tools(spec: str) -> tuple[str, ...]:
    """The tool names a ``tools`` setting advertises, user tools imported and registered.

    Args:
        spec: ``"none"``, ``"both"`` (``reflect`` and ``confirm``), or a comma-separated list
            of registered names and ``module:Class`` user tools, e.g.
            ``"reflect,confirm,mypkg.mod:Rotate"``.

    Returns:
        Names in the order given, duplicates dropped.

    Raises:
        ValueError: an unknown name or a user tool that cannot be loaded.
    """
    if spec in TOOL_SPELLINGS:
        return TOOL_SPELLINGS[spec]
    names = []
    for item in (x.strip() for x in spec.split(",")):
        names.append(load_tool(item) if ":" in item else get_tool(item).name)
    return tuple(dict.fromkeys(names))


def counted_tools(enabled: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Tools a metric counts calls of: the built-ins (so that every arm has their columns),
    then ``enabled``'s others."""
    return tuple(dict.fromkeys((*BUILTIN_TOOLS, *enabled)))


register(Reflect())
register(Confirm())

MAX_OBS_CHARS = 2048  # a tool's observation text is cut to this (user tools may echo model text)
MAX_ERROR_CHARS = 256  # and a failed call's to this (the built-ins' errors are shorter)


def _checked_result(name: str, args: dict, res: object, state: ToolState) -> ToolResult:
    """A tool's return value as a well-formed result, else an error result naming the tool."""
    if not isinstance(res, ToolResult) or not isinstance(res.text, str):
        return _error(name, args, f"tool '{name}' returned no ToolResult")
    images = res.images if res.ok else []
    for im in images:
        if not (
            isinstance(im, ToolImage)
            and isinstance(im.image, Image.Image)
            and im.image.width * im.image.height > 0
            and is_index(im.source)
            and 1 <= im.source <= len(state.images)
        ):
            return _error(name, args, f"tool '{name}' returned an invalid image")
    text = res.text if res.ok or res.text.startswith("Error: ") else "Error: " + res.text
    text = echo(text, MAX_OBS_CHARS if res.ok else MAX_ERROR_CHARS)
    return ToolResult(
        name,
        res.arguments if isinstance(res.arguments, dict) else args,
        bool(res.ok),
        text,
        list(images),
    )


def run_tool(
    payload: str,
    images: list[Image.Image],
    frame: ImageFrame,
    enabled: tuple[str, ...],
    crop_policy: CropPolicy = "fill",
    crop_max_pixels: int | None = None,
) -> ToolResult:
    """Parse and execute one tool call against the trajectory's input images.

    The single entry point for every tool: the payload passes the size, depth and number
    checks of :func:`parse_tool_call` first, the tool's exception or malformed result becomes
    an error result, and its text is cut to :data:`MAX_OBS_CHARS` (:data:`MAX_ERROR_CHARS` for
    an error).

    Args:
        payload: the text between ``<tool_call>`` and ``</tool_call>``.
        images: the sample's input images (original pixels), 1-based in calls.
        frame: the image processor's resize rule.
        enabled: tools advertised in this arm (``tools`` setting); others are unknown tools.
        crop_policy: ``confirm``'s crop policy (:func:`confirm`).
        crop_max_pixels: ``confirm``'s crop budget in pixels (None: ``frame.max_pixels``).

    Returns:
        A :class:`ToolResult`; never raises on malformed input or a failing tool.
    """
    parsed = parse_tool_call(payload)
    if isinstance(parsed, str):
        return _error("?", {}, parsed)
    name, args = parsed
    if name not in enabled or name not in _REGISTRY:
        available = ", ".join(enabled) or "none"
        return _error(echo(name), args, f"unknown tool '{echo(name)}'; available: {available}")
    state = ToolState(list(images), frame, crop_policy, crop_max_pixels)
    try:
        res = _REGISTRY[name].run(args, state)
    except Exception as exc:  # a user tool's bug is part of the episode, not a crash
        return _error(name, args, f"tool '{name}' failed ({type(exc).__name__})")
    return _checked_result(name, args, res, state)


TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
