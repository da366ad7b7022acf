"""Causal checks beside attention: image-presence attribution and attention knockout (docs/method.md §6).

Attention shares say where the answer's queries looked; these measures say what the answer needed.
All of them score one replayed trajectory (the ``inputs`` of :func:`analysis.replay.replay_attention`:
``input_ids [1, pos]``, ``attention_mask [1, pos]``, ``mm_token_type_ids [1, pos]``,
``pixel_values [patches, dim]``, ``image_grid_thw [image, 3]``) by the log-probability of its
answer tokens, in nats:

* :func:`answer_log_prob` - ``sum_p log p(x_p | x_<p)`` over the answer positions, one forward.
* :func:`with_images` - the trajectory with chosen images absent, by a ``grey`` baseline (pixels of
  a uniform mid-grey image of the same size; positions unchanged) or ``drop`` (the image's run,
  pixel rows and grid row removed; later positions shift; the model recomputes its multimodal
  rope positions from the edited ids and grid).
* :func:`image_attribution` - captum ``FeatureAblation`` / ``ShapleyValues`` over a ``[1, image]``
  presence vector (1 present, baseline 0 absent) whose forward function is the answer
  log-probability of the edited trajectory.
* :func:`attention_knockout` - the answer log-probability change when the answer's queries may not
  attend to one image in a window of decoder layers (Geva et al. 2023, "Dissecting Recall of
  Factual Associations"), done through nnsight 0.8.

:mod:`analysis.causal` sets these measures beside the attention shares.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from captum.attr import FeatureAblation, ShapleyValues, ShapleyValueSampling
from PIL import Image

from analysis.hooked import HookedVLM
from analysis.spans import SpecialIds, check_image_grid, image_runs

BASELINES = ("grey", "drop")
"""Ways to remove an image: mid-grey pixels of the same size, or the whole run dropped."""
METHODS = ("ablation", "shapley", "shapley_sampling")
"""captum attributors: FeatureAblation, exact ShapleyValues, ShapleyValueSampling."""
GREY = 128
"""Channel value (0-255) of the uniform mid-grey baseline image."""
MAX_EXACT_SHAPLEY_IMAGES = 7
"""Exact Shapley enumerates ``image!`` permutations (7! = 5,040); beyond it use sampling."""

_IMAGE_KEYS = ("pixel_values", "image_grid_thw")


# Answer log-probability


def _input_ids(inputs: Mapping) -> torch.Tensor:
    ids = inputs["input_ids"]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, pos], got {tuple(ids.shape)}")
    return ids


def _check_targets(target_positions: Sequence[int], n_pos: int) -> list[int]:
    targets = [int(p) for p in target_positions]
    if not targets:
        raise ValueError("target_positions is empty: there are no answer tokens to score")
    bad = [p for p in targets if not 1 <= p < n_pos]
    if bad:
        raise ValueError(
            f"target positions {bad} outside [1, {n_pos - 1}] (input_ids has {n_pos} positions; "
            "position 0 has no prefix)"
        )
    if len(set(targets)) != len(targets):
        raise ValueError(f"target_positions has repeated positions: {targets}")
    return targets


def _logit_kwargs(model, targets: list[int]) -> dict:
    """Forward kwargs: no cache, and only the logits that predict the targets where supported."""
    extra: dict = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = torch.tensor([p - 1 for p in targets])
    return extra


def _score(logits: torch.Tensor, ids: torch.Tensor, targets: list[int], kept: bool) -> float:
    """``sum_p log_softmax(logits[p - 1])[ids[p]]`` in float64 (``kept``: rows are the targets')."""
    rows = logits[0] if kept else logits[0, [p - 1 for p in targets]]
    log_probs = torch.log_softmax(rows.double(), dim=-1)
    tokens = ids[0, targets].to(log_probs.device)
    return float(log_probs.gather(-1, tokens[:, None]).sum())


def answer_log_prob(model, inputs: Mapping, target_positions: Sequence[int]) -> float:
    """Log-probability of the answer tokens given their prefix: ``sum_p log p(x_p | x_<p)`` (nats).

    One teacher-forced forward (``use_cache=False``, no gradient); logits at ``p - 1`` predict the
    token at ``p``. Only the target rows are projected onto the vocabulary (``logits_to_keep``).

    Args:
        model: a Qwen2-VL/Qwen2.5-VL ``...ForConditionalGeneration`` (any causal LM taking ``inputs``).
        inputs: the replay inputs (module docstring), batch 1; passed as ``model(**inputs)``.
        target_positions: absolute positions ``p`` of the answer tokens, each in ``[1, pos)``.

    Returns:
        The summed log-probability in nats (float64 arithmetic), <= 0.

    Raises:
        ValueError: ``input_ids`` is not ``[1, pos]``; ``target_positions`` is empty, repeats a
            position, or holds one outside ``[1, pos)`` (the message names them).
    """
    ids = _input_ids(inputs)
    targets = _check_targets(target_positions, ids.shape[1])
    extra = _logit_kwargs(model, targets)
    with torch.no_grad():
        logits = model(**inputs, **extra).logits
    return _score(logits, ids, targets, "logits_to_keep" in extra)


# Image-presence edits


@dataclass(frozen=True)
class _Images:
    """Where each image of a replay input lives: its pad run, its grid row, its pixel rows."""

    runs: list[tuple[int, int]]  # [start, end) of image k's image_pad tokens
    grid: list[tuple[int, int, int]]  # (t, h, w) patches
    rows: list[tuple[int, int]]  # [start, end) of image k's rows in pixel_values


def _images(inputs: Mapping, special: SpecialIds, merge_size: int) -> _Images:
    ids = _input_ids(inputs)[0].tolist()
    grid_thw = inputs.get("image_grid_thw")
    grid = [] if grid_thw is None else [tuple(int(x) for x in row) for row in grid_thw.tolist()]
    check_image_grid(ids, grid, merge_size, special)
    sizes = [t * h * w for t, h, w in grid]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    n_rows = 0 if inputs.get("pixel_values") is None else inputs["pixel_values"].shape[0]
    if n_rows != sum(sizes):
        raise ValueError(
            f"pixel_values has {n_rows} rows but image_grid_thw implies {sum(sizes)} (t*h*w summed)"
        )
    if grid and inputs.get("mm_token_type_ids") is None:
        raise ValueError(
            "inputs lack mm_token_type_ids: without it the model gives images 1-D text positions"
        )
    return _Images(
        image_runs(ids, special.image_pad), grid, [(s, s + n) for s, n in zip(starts, sizes)]
    )


def _check_baseline(baseline: str) -> None:
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r} unknown; expected one of {BASELINES}")


def grey_pixel_rows(image_processor, grid_thw_row: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``pixel_values`` rows of a uniform mid-grey image (RGB ``GREY``) with the given patch grid.

    Builds a PIL image of ``(w * patch, h * patch)`` pixels and runs the model's own image
    processor on it (resize, rescale, normalise, patchify), so the rows match what the processor
    would give any image of that size.

    Args:
        image_processor: a Qwen2-VL image processor (``patch_size``, callable on ``images=``).
        grid_thw_row: ``(t, h, w)`` patches of the image to replace; ``t`` must be 1 (an image).

    Returns:
        ``[t * h * w, dim]`` float rows, ``dim = 3 * temporal_patch_size * patch**2``.

    Raises:
        ValueError: ``t != 1``, or the processor resizes the grey image to another grid (its pixel
            limits differ from the ones that produced ``grid_thw_row``).
    """
    t, h, w = (int(x) for x in grid_thw_row)
    if t != 1:
        raise ValueError(f"grid_thw_row={(t, h, w)} has t={t}; only still images (t=1) are greyed")
    patch = int(image_processor.patch_size)
    grey = Image.new("RGB", (w * patch, h * patch), (GREY, GREY, GREY))
    out = image_processor(images=[grey], return_tensors="pt")
    got = tuple(int(x) for x in out["image_grid_thw"][0])
    if got != (t, h, w):
        raise ValueError(
            f"the image processor maps a {w * patch}x{h * patch} grey image to grid {got}, not "
            f"{(t, h, w)}: its min/max pixels differ from those that made this trajectory"
        )
    return out["pixel_values"]


GreyRows = Callable[[tuple[int, int, int]], torch.Tensor] | Sequence[torch.Tensor]


def _greyed(inputs: Mapping, img: _Images, present: list[bool], grey_rows: GreyRows | None) -> dict:
    if grey_rows is None:
        raise ValueError("baseline='grey' needs grey_rows (e.g. a grey_pixel_rows partial)")
    pixels = inputs["pixel_values"].clone()
    for k, (kept, (r0, r1), thw) in enumerate(zip(present, img.rows, img.grid)):
        if kept:
            continue
        rows = grey_rows(thw) if callable(grey_rows) else grey_rows[k]
        if tuple(rows.shape) != (r1 - r0, pixels.shape[1]):
            raise ValueError(
                f"grey rows of image {k + 1} have shape {tuple(rows.shape)}, expected "
                f"{(r1 - r0, pixels.shape[1])}"
            )
        pixels[r0:r1] = rows.to(pixels.dtype)
    return {**inputs, "pixel_values": pixels}


def _dropped(
    inputs: Mapping, img: _Images, present: list[bool], special: SpecialIds, targets: list[int]
) -> tuple[dict, list[int]]:
    ids = inputs["input_ids"][0]
    n_pos = ids.shape[0]
    if "position_ids" in inputs:
        raise ValueError("baseline='drop' cannot shift explicit position_ids: leave them out")
    keep = torch.ones(n_pos, dtype=torch.bool)
    for k, ((s, e), kept) in enumerate(zip(img.runs, present), 1):
        if kept:
            continue
        if (
            s == 0
            or e >= n_pos
            or ids[s - 1] != special.vision_start
            or ids[e] != special.vision_end
        ):
            raise ValueError(
                f"image {k} (positions {s}..{e - 1}) is not wrapped in vision start/end"
            )
        inside = [p for p in targets if s - 1 <= p <= e]
        if inside:
            raise ValueError(f"target positions {inside} lie inside dropped image {k}")
        keep[s - 1 : e + 1] = False
    removed = torch.cumsum(~keep, 0)
    out = {
        key: value[:, keep]
        if torch.is_tensor(value) and key not in _IMAGE_KEYS and tuple(value.shape) == (1, n_pos)
        else value
        for key, value in inputs.items()
    }
    rows = torch.ones(inputs["pixel_values"].shape[0], dtype=torch.bool)
    for (r0, r1), kept in zip(img.rows, present):
        rows[r0:r1] = kept
    if any(present):
        out["pixel_values"] = inputs["pixel_values"][rows]
        out["image_grid_thw"] = inputs["image_grid_thw"][torch.tensor(present)]
    else:  # a text-only sequence: the model falls back to 1-D positions, which are then exact
        for key in _IMAGE_KEYS:
            out.pop(key, None)
    return out, [p - int(removed[p]) for p in targets]


def with_images(
    inputs: Mapping,
    present: Sequence[bool],
    *,
    baseline: str,
    special: SpecialIds,
    merge_size: int,
    grey_rows: GreyRows | None = None,
    target_positions: Sequence[int] = (),
) -> tuple[dict, list[int]]:
    """The replay inputs with the images where ``present[k - 1]`` is False made absent.

    ``grey``: image k's ``pixel_values`` rows become those of a uniform mid-grey image of the same
    grid (:func:`grey_pixel_rows`); ids, positions and token counts are unchanged.
    ``drop``: image k's whole run (``<|vision_start|>``, its ``image_pad`` tokens,
    ``<|vision_end|>``) leaves every ``[1, pos]`` tensor (ids, attention mask, mm token types),
    its rows leave ``pixel_values`` and its row leaves ``image_grid_thw``; target positions after
    it shift left. The model recomputes the multimodal rope positions from the edited
    ``input_ids``, ``mm_token_type_ids`` and ``image_grid_thw`` (Qwen2.5-VL's ``get_rope_index``
    runs on every forward without a cache), so later images and text keep consistent positions.
    Dropping every image removes ``pixel_values`` and ``image_grid_thw``: a text-only forward.

    Args:
        inputs: the replay inputs (module docstring); not modified.
        present: ``[image]`` True to keep image k (1-based k = index + 1).
        baseline: ``"grey"`` or ``"drop"``.
        special: the tokenizer's special-token ids.
        merge_size: the vision tower's spatial merge factor (checks pad counts against the grid).
        grey_rows: for ``grey``: a function ``(t, h, w) -> [t*h*w, dim]`` rows, or one precomputed
            tensor per image.
        target_positions: absolute positions to carry over to the edited sequence.

    Returns:
        ``(edited inputs, target positions in the edited sequence)``.

    Raises:
        ValueError: unknown ``baseline``; ``present`` length differs from the number of images;
            the ids, grid and pixel rows disagree; ``grey`` without ``grey_rows`` or with rows of
            the wrong shape; ``drop`` of an unwrapped run, of a run holding a target position, or
            with explicit ``position_ids``.
    """
    _check_baseline(baseline)
    img = _images(inputs, special, merge_size)
    keep = [bool(x) for x in present]
    if len(keep) != len(img.runs):
        raise ValueError(
            f"present has {len(keep)} entries but the inputs hold {len(img.runs)} images"
        )
    targets = [int(p) for p in target_positions]
    if all(keep):
        return dict(inputs), targets
    if baseline == "grey":
        return _greyed(inputs, img, keep, grey_rows), targets
    return _dropped(inputs, img, keep, special, targets)


# Attribution over image presence (captum)


def _merge_size(model) -> int:
    return int(model.config.vision_config.spatial_merge_size)


def image_attribution(
    model,
    inputs: Mapping,
    target_positions: Sequence[int],
    *,
    method: str = "ablation",
    baseline: str = "grey",
    special: SpecialIds,
    image_processor=None,
    grey_rows: GreyRows | None = None,
    n_samples: int = 25,
    trajectory_id: str = "",
) -> pd.DataFrame:
    """Attribution of the answer log-probability to each image's presence (captum, nats).

    ``f(z) = answer_log_prob(with_images(inputs, z))`` for a presence vector ``z in {0,1}^image``;
    captum attributes ``f(1) - f(0)`` over the images from input ``z = 1`` and baseline ``0``:

    * ``ablation``: ``captum.attr.FeatureAblation``: ``a_k = f(1) - f(1 with z_k = 0)``.
    * ``shapley``: exact ``captum.attr.ShapleyValues`` over all ``image!`` orders; completeness
      ``sum_k a_k = f(1) - f(0)`` (Shapley 1953; captum's axiom).
    * ``shapley_sampling``: ``ShapleyValueSampling`` over ``n_samples`` random orders (torch RNG);
      each order telescopes, so completeness also holds exactly.

    ``f`` is memoised per presence pattern: captum evaluates many orders, but at most ``2^image``
    forwards run. captum 0.9's Shapley attributors return float32 even for a float64 ``f``, so
    completeness holds to about 1e-7 relative, not to float64 precision.

    Args:
        model: a Qwen2-VL/Qwen2.5-VL model (``config.vision_config.spatial_merge_size``).
        inputs: the replay inputs (module docstring), batch 1.
        target_positions: absolute positions of the answer tokens.
        method: ``"ablation"``, ``"shapley"`` or ``"shapley_sampling"``.
        baseline: ``"grey"`` or ``"drop"`` (:func:`with_images`).
        special: the tokenizer's special-token ids.
        image_processor: the model's image processor; builds the grey rows when ``grey_rows`` is None.
        grey_rows: precomputed grey rows (see :func:`with_images`).
        n_samples: orders sampled by ``shapley_sampling``.
        trajectory_id: value of the ``trajectory`` column.

    Returns:
        One row per image: trajectory (str), image (int, 1-based), attribution (float, nats),
        method, baseline, logp_all (``f(1)``), logp_none (``f(0)``).

    Raises:
        ValueError: unknown ``method`` or ``baseline``; no images; exact Shapley over more than
            :data:`MAX_EXACT_SHAPLEY_IMAGES` images; ``grey`` without a processor or rows; bad
            target positions (see :func:`answer_log_prob`).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} unknown; expected one of {METHODS}")
    _check_baseline(baseline)
    merge = _merge_size(model)
    img = _images(inputs, special, merge)
    targets = _check_targets(target_positions, _input_ids(inputs).shape[1])
    n = len(img.runs)
    if n == 0:
        raise ValueError("the inputs hold no images to attribute")
    if method == "shapley" and n > MAX_EXACT_SHAPLEY_IMAGES:
        raise ValueError(
            f"exact Shapley over {n} images enumerates {n}! orders; use method='shapley_sampling'"
        )
    if baseline == "grey" and grey_rows is None:
        if image_processor is None:
            raise ValueError("baseline='grey' needs image_processor or grey_rows")
        grey_rows = [grey_pixel_rows(image_processor, thw) for thw in img.grid]
    memo: dict[tuple[bool, ...], float] = {}

    def log_prob(present: tuple[bool, ...]) -> float:
        if present not in memo:
            edited, moved = with_images(
                inputs, present, baseline=baseline, special=special, merge_size=merge,
                grey_rows=grey_rows, target_positions=targets,
            )  # fmt: skip
            memo[present] = answer_log_prob(model, edited, moved)
        return memo[present]

    def forward(presence: torch.Tensor) -> torch.Tensor:  # [batch, image] -> [batch]
        patterns = [tuple(v > 0.5 for v in row) for row in presence.tolist()]
        return torch.tensor([log_prob(z) for z in patterns], dtype=torch.float64)

    attributor = {"ablation": FeatureAblation, "shapley": ShapleyValues}.get(
        method, ShapleyValueSampling
    )(forward)
    extra = {"n_samples": n_samples} if method == "shapley_sampling" else {}
    presence = torch.ones(1, n, dtype=torch.float64)
    attribution = attributor.attribute(presence, baselines=0.0, **extra)[0]
    return pd.DataFrame(
        {
            "trajectory": [str(trajectory_id)] * n,
            "image": range(1, n + 1),
            "attribution": attribution.tolist(),
            "method": method,
            "baseline": baseline,
            "logp_all": log_prob((True,) * n),
            "logp_none": log_prob((False,) * n),
        }
    )


# Attention knockout (nnsight)


def knockout_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    k_len: int,
    key_span: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The layer's additive attention mask with keys ``[s, e)`` hidden from queries ``q >= e``.

    ``out[..., q, k] = -inf`` for ``q >= e, s <= k < e``; elsewhere the incoming mask: ``None``
    (SDPA's causal fast path) becomes the causal mask, a bool mask (True attends) becomes
    ``0 / -inf``, a float mask is copied. Softmax then renormalises each row over its other keys.

    Args:
        attention_mask: None, bool or additive float ``[batch, 1 or head, q_pos, k_pos]``.
        q_len, k_len: query and key lengths (equal in a cache-free replay).
        key_span: ``[s, e)`` absolute key positions of the image's pad tokens.
        dtype: dtype of the returned mask (the query's).

    Returns:
        Additive float mask ``[batch or 1, 1 or head, q_pos, k_pos]``.
    """
    if attention_mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None]
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        mask = torch.zeros_like(attention_mask, dtype=dtype).masked_fill(
            ~attention_mask, float("-inf")
        )
    else:
        mask = attention_mask.to(dtype).clone()
    s, e = key_span
    mask[..., e - (k_len - q_len) :, s:e] = float("-inf")
    return mask


def _knocked_log_prob(
    model, inputs: Mapping, targets: list[int], key_span: tuple[int, int], layers: list[int]
) -> float:
    """Answer log-prob with ``key_span`` masked in ``layers``, by editing the mask through nnsight."""
    extra = _logit_kwargs(model, targets)
    hooked = HookedVLM(model)
    with torch.no_grad(), hooked.session() as traced, traced.trace(**inputs, **extra):
        for layer in layers:
            call = hooked.attention_call(layer)  # the attention function call, via the adapter
            args, kwargs = call.inputs
            query, key = args[1], args[2]
            mask = knockout_mask(args[4], query.shape[-2], key.shape[-2], key_span, query.dtype)
            call.inputs = ((*args[:4], mask.to(query.device), *args[5:]), kwargs)
        logits = traced.output.logits.save()
    return _score(logits, _input_ids(inputs), targets, "logits_to_keep" in extra)


def _checked_layers(model, layers: Sequence[int]) -> list[int]:
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None or not hasattr(language_model, "layers"):
        raise ValueError(f"{type(model).__name__} has no model.language_model.layers to knock out")
    n_layers = len(language_model.layers)
    chosen = sorted({int(x) for x in layers})
    bad = [x for x in chosen if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {n_layers} decoder layers")
    return chosen


def attention_knockout(
    model,
    inputs: Mapping,
    target_positions: Sequence[int],
    image: int,
    layers: Sequence[int],
    *,
    special: SpecialIds,
) -> float:
    """Effect of hiding image k from later queries in some layers: ``logp(knocked) - logp(intact)``.

    In each decoder layer of ``layers``, every query at or after the end of image k's pad run gets
    ``-inf`` on the keys of that run before the softmax (attention renormalised over the other
    keys; :func:`knockout_mask`); queries inside or before the image, the vision tower and other
    layers are untouched (attention knockout, Geva et al. 2023). Done through nnsight 0.8: the
    model is wrapped in ``nnsight.NNsight``, and inside one trace the ``attention_mask`` argument of
    ``model.language_model.layers[L].self_attn.source.attention_interface_1`` (the call into the
    attention backend, SDPA or eager) is replaced for the chosen layers. nnsight's per-module
    controllers are removed again afterwards, exceptions included.

    Args:
        model: a Qwen2-VL/Qwen2.5-VL model (``model.language_model.layers[L].self_attn``).
        inputs: the replay inputs (module docstring), batch 1.
        target_positions: absolute positions of the answer tokens.
        image: image number k, 1-based in order of appearance.
        layers: decoder layer indices (a ``range`` or list); empty gives 0.0 exactly.
        special: the tokenizer's special-token ids.

    Returns:
        The effect in nats (negative: the answer needed the image in those layers).

    Raises:
        ValueError: ``image`` not in ``[1, image count]``; a layer out of range; bad target
            positions (see :func:`answer_log_prob`); the model has no ``language_model.layers``.
    """
    img = _images(inputs, special, _merge_size(model))
    targets = _check_targets(target_positions, _input_ids(inputs).shape[1])
    if not 1 <= int(image) <= len(img.runs):
        raise ValueError(
            f"image={image} out of range: the inputs hold {len(img.runs)} images (1-based)"
        )
    chosen = _checked_layers(model, layers)
    span = img.runs[int(image) - 1]
    intact = _knocked_log_prob(model, inputs, targets, span, [])
    return _knocked_log_prob(model, inputs, targets, span, chosen) - intact


def image_knockouts(
    model,
    inputs: Mapping,
    target_positions: Sequence[int],
    layers: Sequence[int],
    *,
    special: SpecialIds,
    trajectory_id: str = "",
) -> pd.DataFrame:
    """:func:`attention_knockout` of every image over the same layers, as a table.

    Returns:
        One row per image: trajectory (str), image (int, 1-based), layers (str, e.g. "0,1,2"),
        knockout (float, nats).

    Raises:
        ValueError: as :func:`attention_knockout`.
    """
    img = _images(inputs, special, _merge_size(model))
    targets = _check_targets(target_positions, _input_ids(inputs).shape[1])
    chosen = _checked_layers(model, layers)
    intact = _knocked_log_prob(model, inputs, targets, (0, 0), [])
    effects = [_knocked_log_prob(model, inputs, targets, s, chosen) - intact for s in img.runs]
    return pd.DataFrame(
        {
            "trajectory": [str(trajectory_id)] * len(effects),
            "image": range(1, len(effects) + 1),
            "layers": ",".join(map(str, chosen)),
            "knockout": effects,
        }
    )
