"""Hooked VLM wrappers on nnsight: canonical hook names per model family, run-with-cache, and
region recording during generation (docs/method.md §6; docs/design.md#style: TransformerLens names,
nnsight tracing).

One :class:`FamilyAdapter` per model family maps relook's canonical hook names to the family's
module paths and to the value read there; :class:`HookedVLM` wraps any model loaded with
``from_pretrained`` (``nnsight.NNsight(model)``: no pipeline, no processor needed) and reads
those values inside nnsight traces. Canonical names and shapes (``L``: decoder layer,
``B``: vision block)::

    embed                           # [batch, pos, d_model]     token embeddings (images merged)
    blocks.{L}.hook_resid_post      # [batch, pos, d_model]     decoder layer output
    blocks.{L}.attn.hook_q          # [batch, head, q_pos, d_head]     after M-RoPE
    blocks.{L}.attn.hook_k          # [batch, kv_head, k_pos, d_head]  after M-RoPE, cache included
    blocks.{L}.attn.hook_v          # [batch, kv_head, k_pos, d_head]
    blocks.{L}.attn.hook_mask       # None or [batch, 1, q_pos, k_pos] (bool or additive float)
    blocks.{L}.attn.hook_z          # [batch, q_pos, head, d_head]     attention output per head
    blocks.{L}.attn.hook_pattern    # [batch, head, q_pos, k_pos]      eager attention only
    blocks.{L}.attn.hook_result     # [batch, pos, d_model]     after o_proj
    visual.blocks.{B}.hook_out      # [patch, d_vision]         vision block output
    visual.hook_merged              # [image_token, d_model]    merger output (the image tokens)
    hook_logits                     # [batch, pos, vocab]

The ``attn.hook_q/k/v/mask/z/pattern`` values are the arguments and results of the attention
function call inside the attention module (``.source.attention_interface_1`` in nnsight 0.8,
docs/gotchas.md), so they are the same under SDPA, eager or any registered backend; ``hook_pattern``
exists only when the backend returns weights (eager). nnsight removes its hooks when a trace
exits, exceptions included.

Gotchas (measured with nnsight 0.8.1, transformers 5.23):
- Only values ``.save()``d inside a trace survive it; trace bodies run in a worker thread.
- Generation is traced with ``NNsight(model).trace(..., fn=model.generate)`` and
  ``for step in tracer.iter[:N]``; an open-ended ``iter[:]`` with early stopping leaves a
  dangling request, so the number of steps is fixed (``max_new_tokens``).
- ``.source`` names count calls in the module's source: ``attention_interface_0`` is the
  lookup of the function, ``attention_interface_1`` its call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from nnsight import NNsight
from nnsight.intervention.source import STATE as _NNSIGHT_STATE

from analysis.replay import AttentionRecord, RegionRecorder, _text_config, visible_keys
from analysis.spans import RegionMap

HOOK_SHAPES: dict[str, str] = {
    "embed": "[batch, pos, d_model]",
    "blocks.{L}.hook_resid_post": "[batch, pos, d_model]",
    "blocks.{L}.attn.hook_q": "[batch, head, q_pos, d_head]",
    "blocks.{L}.attn.hook_k": "[batch, kv_head, k_pos, d_head]",
    "blocks.{L}.attn.hook_v": "[batch, kv_head, k_pos, d_head]",
    "blocks.{L}.attn.hook_mask": "None or [batch, 1, q_pos, k_pos]",
    "blocks.{L}.attn.hook_z": "[batch, q_pos, head, d_head]",
    "blocks.{L}.attn.hook_pattern": "[batch, head, q_pos, k_pos]",
    "blocks.{L}.attn.hook_result": "[batch, pos, d_model]",
    "visual.blocks.{B}.hook_out": "[patch, d_vision]",
    "visual.hook_merged": "[image_token, d_model]",
    "hook_logits": "[batch, pos, vocab]",
}
_ATTN_ARGS = {"hook_q": 1, "hook_k": 2, "hook_v": 3, "hook_mask": 4}


@dataclass(frozen=True)
class FamilyAdapter:
    """Module paths of one model family behind relook's canonical hook names.

    Attributes:
        family: adapter name (the ``config.model_type`` it serves first).
        model_types: ``config.model_type`` values served.
        layers: path of the decoder layer list.
        attention: attribute of the attention module in a decoder layer.
        attention_call: nnsight ``.source`` name of the attention function call.
        embed: path of the token embedding.
        vision_blocks: path of the vision block list.
        merger: path of the vision merger (patches -> image tokens).
        lm_head: path of the output head.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str = "model.language_model.layers"
    attention: str = "self_attn"
    attention_call: str = "attention_interface_1"
    embed: str = "model.language_model.embed_tokens"
    vision_blocks: str = "model.visual.blocks"
    merger: str = "model.visual.merger"
    lm_head: str = "lm_head"


# One adapter per family; transformers 5 gives Qwen2-VL and Qwen2.5-VL the same module tree.
ADAPTERS: dict[str, FamilyAdapter] = {
    "qwen2_5_vl": FamilyAdapter("qwen2_5_vl", ("qwen2_5_vl",)),
    "qwen2_vl": FamilyAdapter("qwen2_vl", ("qwen2_vl",)),
}


def adapter_for(model) -> FamilyAdapter:
    """The :class:`FamilyAdapter` of ``model`` (by ``model.config.model_type``).

    Raises:
        ValueError: no adapter serves the model's family; the message names the family, the
            model class and the families relook has adapters for.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    known = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    raise ValueError(
        f"no relook hook adapter for model family {model_type!r} ({type(model).__name__}); "
        f"adapters exist for {known}"
    )


# Instance attributes nnsight 0.8 installs on every wrapped module (and leaves there).
_NNSIGHT_SLOTS = ("forward", _NNSIGHT_STATE)


@contextmanager
def nnsight_session(model: torch.nn.Module) -> Iterator[NNsight]:
    """Wrap ``model`` in ``nnsight.NNsight`` and put every module back as it was on exit.

    nnsight 0.8 installs a controller ``forward`` and its state in each module's ``__dict__``
    and leaves them there ("inert outside a trace"); this removes them again, exceptions
    included, so that after use the model is the object it was (no hooks, no patched forward).
    """
    saved = [
        (m, {k: m.__dict__[k] for k in _NNSIGHT_SLOTS if k in m.__dict__}) for m in model.modules()
    ]
    try:
        yield NNsight(model)
    finally:
        for module, before in saved:
            for key in _NNSIGHT_SLOTS:
                if key in before:
                    module.__dict__[key] = before[key]
                else:
                    module.__dict__.pop(key, None)


_NAME = re.compile(
    r"^(?:embed|hook_logits|visual\.hook_merged|visual\.blocks\.(\d+)\.hook_out"
    r"|blocks\.(\d+)\.(hook_resid_post|attn\.(hook_q|hook_k|hook_v|hook_mask|hook_z"
    r"|hook_pattern|hook_result)))$"
)


def _walk(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


@dataclass
class HookedVLM:
    """A Qwen2-VL/Qwen2.5-VL model behind nnsight with canonical hook names.

    Example::

        hooked = HookedVLM(policy.model)
        cache = hooked.run_with_cache(inputs, ["blocks.0.attn.hook_q", "visual.hook_merged"])
        new_ids, record = hooked.generate_regions(prompt_inputs, prompt_map, max_new_tokens=32)
        with hooked.session() as nn, torch.no_grad(), nn.trace(**inputs):  # interventions
            q = hooked.value("blocks.1.attn.hook_q").save()

    The model is wrapped only inside :meth:`session` (which every method opens): outside it
    the model carries no nnsight state.

    Attributes:
        model: the transformers model (any loaded with ``from_pretrained``).
        adapter: its family's :class:`FamilyAdapter` (default: :func:`adapter_for`).
        nn: the ``nnsight.NNsight`` wrapper while a session is open, else None.

    Raises:
        ValueError: the model's family has no adapter.
    """

    model: torch.nn.Module
    adapter: FamilyAdapter | None = None
    nn: NNsight | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.adapter = self.adapter or adapter_for(self.model)

    @contextmanager
    def session(self) -> Iterator[NNsight]:
        """Open (or re-enter) the nnsight wrapping of the model (:func:`nnsight_session`)."""
        if self.nn is not None:
            yield self.nn
            return
        with nnsight_session(self.model) as nn:
            self.nn = nn
            try:
                yield nn
            finally:
                self.nn = None

    def _root(self) -> NNsight:
        if self.nn is None:
            raise RuntimeError("hook values exist only inside `with hooked.session():` traces")
        return self.nn

    @property
    def n_layers(self) -> int:
        """Decoder layers."""
        return int(_text_config(self.model).num_hidden_layers)

    def hook_names(self) -> list[str]:
        """Every canonical hook name of this model, layers and vision blocks expanded."""
        n_vision = len(_walk(self.model, self.adapter.vision_blocks))
        names = ["embed"]
        for layer in range(self.n_layers):
            names.append(f"blocks.{layer}.hook_resid_post")
            names += [
                f"blocks.{layer}.attn.{h}"
                for h in ("hook_q", "hook_k", "hook_v", "hook_mask", "hook_z", "hook_pattern")
            ]
            names.append(f"blocks.{layer}.attn.hook_result")
        names += [f"visual.blocks.{b}.hook_out" for b in range(n_vision)]
        return names + ["visual.hook_merged", "hook_logits"]

    def _attention(self, layer: int):
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range for a model with {self.n_layers} layers")
        return getattr(_walk(self._root(), self.adapter.layers)[layer], self.adapter.attention)

    def attention_call(self, layer: int):
        """The nnsight envoy of layer ``layer``'s attention function call (inside a session):
        ``.inputs`` is ``((module, query, key, value, attention_mask, ...), kwargs)`` and may
        be replaced to intervene (attention knockout); ``.output`` is ``(z, pattern)``."""
        return getattr(self._attention(layer).source, self.adapter.attention_call)

    def value(self, name: str):
        """The value of canonical hook ``name``, to be read (or edited) inside a trace of
        :attr:`nn`.

        Raises:
            ValueError: an unknown name, or a layer/block out of range (names the value).
        """
        match = _NAME.match(name)
        if match is None:
            raise ValueError(f"unknown hook name {name!r}; see analysis.hooked.HOOK_SHAPES")
        a, root = self.adapter, self._root()
        if name == "embed":
            return _walk(root, a.embed).output
        if name == "hook_logits":
            return _walk(root, a.lm_head).output
        if name == "visual.hook_merged":
            return _walk(root, a.merger).output
        vision_block, layer, what, attn_hook = match.groups()
        if vision_block is not None:
            blocks = _walk(root, a.vision_blocks)
            if int(vision_block) >= len(blocks):
                raise ValueError(f"vision block {vision_block} out of range ({len(blocks)} blocks)")
            return blocks[int(vision_block)].output
        if what == "hook_resid_post":
            out = _walk(root, a.layers)[self._check_layer(int(layer))].output
            return out[0] if isinstance(out, tuple) else out
        attn = self._attention(int(layer))
        if attn_hook == "hook_result":
            return attn.output[0]
        call = self.attention_call(int(layer))
        if attn_hook in _ATTN_ARGS:
            return call.inputs[0][_ATTN_ARGS[attn_hook]]
        return call.output[0 if attn_hook == "hook_z" else 1]

    def _check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range for a model with {self.n_layers} layers")
        return layer

    def run_with_cache(self, inputs: dict, names: Iterable[str]) -> dict[str, torch.Tensor | None]:
        """One forward of ``inputs`` (``use_cache=False``) that saves the named hook values
        (TransformerLens's ``run_with_cache(names_filter=...)``).

        Args:
            inputs: the model's keyword inputs (``input_ids [1, pos]``, ``pixel_values``,
                ``image_grid_thw``, ``mm_token_type_ids``, ...).
            names: canonical hook names (:data:`HOOK_SHAPES`), in the order the forward reaches
                them: ``embed``, vision blocks, merger, then layers in order (nnsight reads values
                in execution order).

        Returns:
            name -> tensor (detached, as computed; ``hook_pattern`` is None unless eager).

        Raises:
            ValueError: an unknown hook name.
        """
        names = list(names)
        for name in names:
            if _NAME.match(name) is None:
                raise ValueError(f"unknown hook name {name!r}; see analysis.hooked.HOOK_SHAPES")
        saved: dict = {}  # filled inside the trace (its body's new locals do not reach closures)
        with torch.no_grad(), self.session() as nn, nn.trace(**inputs, use_cache=False):
            for name in sorted(names, key=_order):
                saved[name] = self.value(name).save()
        return {name: _detach(saved[name]) for name in names}

    def generate_regions(
        self,
        inputs: dict,
        prefix_map: RegionMap,
        max_new_tokens: int,
        *,
        layers: Sequence[int] | None = None,
        chunk: int | None = None,
        value_weighted: bool = False,
        **generate_kwargs,
    ) -> tuple[list[int], AttentionRecord]:
        """Generate ``max_new_tokens`` tokens and record, at every decode step, the attention of
        the step's query onto each key region, inside an nnsight trace of ``model.generate``.

        The step producing generated token ``i`` (position ``p = prefix + i``) has its query at
        ``p - 1``; its keys are the prefix (labelled by ``prefix_map``) and the tokens generated
        so far (``generated``), its own key going to ``self``: the same row that
        :func:`analysis.replay.replay_attention` reduces for that token from the finished
        sequence (a test checks both agree). The fp32 reduction runs on the step's ``hook_q`` /
        ``hook_k`` (after M-RoPE, cache included) with :class:`analysis.replay.RegionRecorder`;
        the model's own attention backend computes the step unchanged.

        Args:
            inputs: the prefix's model inputs, batch 1 (``input_ids [1, prefix]``, images, ...).
            prefix_map: :func:`analysis.spans.region_labels` of the prefix ids (earlier assistant
                turns marked in its response mask, so a later turn sees them as ``generated``).
            max_new_tokens: decode steps; generation runs exactly this many (``min_new_tokens``
                is set to it: nnsight needs a fixed step count).
            layers: decoder layers to record (default all).
            chunk: query rows per reduction chunk (the prefill step has one recorded row).
            value_weighted: also record value-norm-weighted mass.
            **generate_kwargs: passed to ``model.generate`` (``do_sample``, ``temperature``...).

        Returns:
            ``(new_ids, record)``: the ``max_new_tokens`` generated ids and an
            :class:`AttentionRecord` over them (``positions`` absolute in the full sequence).

        Raises:
            ValueError: batch size is not 1, the prefix length differs from ``prefix_map``,
                ``max_new_tokens < 1``, or a layer is out of range.
        """
        ids = inputs["input_ids"]
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, pos], got {tuple(ids.shape)}")
        prefix = ids.shape[1]
        if prefix != len(prefix_map.labels):
            raise ValueError(
                f"input_ids has {prefix} positions but prefix_map has {len(prefix_map.labels)}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        layer_list = list(range(self.n_layers)) if layers is None else [int(x) for x in layers]
        for layer in layer_list:
            self._check_layer(layer)
        names = list(prefix_map.region_names)
        generated = torch.full((max_new_tokens,), names.index("generated"), dtype=torch.long)
        region_index = torch.cat([prefix_map.region_index, generated])
        positions = list(range(prefix, prefix + max_new_tokens))
        recorder = RegionRecorder(
            region_index=region_index,
            query_pos=torch.tensor([p - 1 for p in positions], dtype=torch.long),
            n_regions=len(names),
            self_index=prefix_map.self_index,
            chunk=chunk,
            layers=frozenset(layer_list),
            value_weighted=value_weighted,
        )
        modules = {layer: _walk(self.model, self.adapter.layers)[layer] for layer in layer_list}
        attention = {layer: getattr(modules[layer], self.adapter.attention) for layer in layer_list}
        kwargs = {**generate_kwargs, "max_new_tokens": max_new_tokens}
        kwargs["min_new_tokens"] = max_new_tokens
        with (
            torch.no_grad(),
            self.session() as nn,
            nn.trace(**inputs, fn=self.model.generate, **kwargs) as tracer,
        ):
            for _ in tracer.iter[:max_new_tokens]:
                for layer in layer_list:
                    args, kw = self.attention_call(layer).inputs
                    recorder.record(
                        attention[layer], args[1], args[2], args[3], args[4], kw.get("scaling")
                    )
            out = tracer.result.save()
        new_ids = [int(t) for t in _detach(out)[0, prefix:].tolist()]
        record = AttentionRecord(
            mass=recorder.stacked(layer_list),
            region_names=names,
            positions=positions,
            layers=layer_list,
            image_origin=dict(prefix_map.image_origin),
            keys=visible_keys(region_index, recorder.query_pos, len(names), prefix_map.self_index),
            value_mass=recorder.stacked(layer_list, value=True) if value_weighted else None,
        )
        return new_ids, record


def _order(name: str) -> tuple:
    """Execution order of hook values in one forward: embed (the token embedding runs before
    the vision tower), vision blocks, merger, layers (q k v mask, z, pattern, result, resid),
    logits."""
    if name == "embed":
        return (0, 0, 0)
    if name.startswith("visual.blocks."):
        return (1, int(name.split(".")[2]), 0)
    if name == "visual.hook_merged":
        return (2, 0, 0)
    if name == "hook_logits":
        return (4, 0, 0)
    layer = int(name.split(".")[1])
    within = [
        "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_mask", "attn.hook_z",
        "attn.hook_pattern", "attn.hook_result", "hook_resid_post",
    ]  # fmt: skip
    return (3, layer, within.index(name.split(".", 2)[2]))


def _detach(value):
    return value.detach() if torch.is_tensor(value) else value


__all__ = [
    "ADAPTERS",
    "HOOK_SHAPES",
    "FamilyAdapter",
    "HookedVLM",
    "adapter_for",
    "nnsight_session",
]
