"""Attention mass per key region for every generated token, by replay (docs/method.md §6).

One teacher-forced forward over a finished trajectory's exact ids, images and multimodal
positions. By causality, query row ``p - 1`` of that forward is the attention of the decode step
that produced the token at position ``p`` (row ``step i`` of ``generate(output_attentions=True)``).

The reduction runs inside the attention computation: a custom function registered with
transformers' ``AttentionInterface`` computes each layer's output with the model's own backend
(SDPA or eager) and returns it unchanged; while a :class:`RegionRecorder` is attached it also
recomputes, for the recorded query rows only and in chunks of queries, the fp32 softmax pattern
(TransformerLens's ``blocks.{layer}.attn.hook_pattern  # [batch, head, q_pos, k_pos]``) and sums
it over the keys of each region. No full query x key matrix is ever kept.

Shapes: ``mass [token, layer, head, region]`` (fraction of the row's attention; each row sums
to 1), ``token`` = index among the generated (``response_mask == 1``) positions.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from analysis.spans import RegionMap

# Registered names: the reducing function over each base backend. Any other backend (flash,
# flex) is replayed over SDPA, which computes the same function.
IMPL_SDPA = "relook_regions"
IMPL_EAGER = "relook_regions_eager"
_RECORDER_ATTR = "_relook_region_recorder"


def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``softmax(q k^T * scaling + mask) v`` with GQA heads expanded (HF's eager forward)."""
    key = repeat_kv(key, getattr(module, "num_key_value_groups", 1))
    value = repeat_kv(value, getattr(module, "num_key_value_groups", 1))
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _eager_forward(module, *args, **kwargs):
    """The model family's own ``eager_attention_forward`` (its module's), else the generic one."""
    family = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return (family or _generic_eager)(module, *args, **kwargs)


def _make_attention(base: Callable) -> Callable:
    def relook_attention(module, query, key, value, attention_mask, **kwargs):
        out = base(module, query, key, value, attention_mask, **kwargs)
        recorder = getattr(module, _RECORDER_ATTR, None)
        if recorder is not None:
            recorder.record(module, query, key, value, attention_mask, kwargs.get("scaling"))
        return out

    return relook_attention


def _register() -> None:
    """Register both reducing functions and their masks (idempotent)."""
    AttentionInterface.register(IMPL_SDPA, _make_attention(sdpa_attention_forward))
    AttentionMaskInterface.register(IMPL_SDPA, sdpa_mask)
    AttentionInterface.register(IMPL_EAGER, _make_attention(_eager_forward))
    AttentionMaskInterface.register(IMPL_EAGER, eager_mask)


def reduce_to_regions(
    probs: torch.Tensor,
    query_pos: torch.Tensor,
    onehot: torch.Tensor,
    self_index: int,
    inplace: bool = False,
) -> torch.Tensor:
    """Sum attention rows over the keys of each region, the query's own key going to ``self``.

    ``out[h, i, r] = sum_{k != q_i, region(k) = r} probs[h, i, k] + [r = self] probs[h, i, q_i]``

    Args:
        probs: ``[head, q, k_pos]`` attention rows (float32).
        query_pos: ``[q]`` absolute position of each row's query (its own key).
        onehot: ``[k_pos, region]`` float32 one-hot of each key's region.
        self_index: column of ``self`` in the region axis.
        inplace: zero the self keys in ``probs`` itself (no copy; ``probs`` is clobbered).

    Returns:
        ``[head, q, region]`` float32 masses.
    """
    idx = query_pos.view(1, -1, 1).expand(probs.shape[0], -1, 1)
    diag = probs.gather(-1, idx)  # [head, q, 1]
    zeroed = probs.scatter_(-1, idx, 0.0) if inplace else probs.scatter(-1, idx, 0.0)
    out = zeroed @ onehot  # zeroed, not subtracted: exact for the self key
    out[..., self_index] += diag[..., 0]
    return out


CHUNK_BUDGET_BYTES = 2 << 20
"""Default fp32 score bytes per chunk: 2 MiB, so a chunk's scores stay in cache. Measured by
``bench/attention.py`` (relook-tiny, 2,000 tokens): fixed 256-row chunks cost 3.4x a plain
forward's time, 2 MiB chunks (64 rows) 1.3-1.55x."""


def auto_chunk(heads: int, kv_len: int, budget: int = CHUNK_BUDGET_BYTES) -> int:
    """Query rows per chunk so that ``heads x rows x kv_len`` fp32 scores fit ``budget`` bytes
    (at least 8 rows)."""
    return max(8, budget // (4 * heads * max(1, kv_len)))


def _mask_(
    scores: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor, offset: int
) -> None:
    """Apply the attention mask of absolute query ``rows`` to ``scores [head, c, end]`` in place.

    ``attention_mask`` None is SDPA's causal fast path: keys up to the chunk's first query are
    visible to every row, so only the block of later keys is masked. Otherwise it is the
    model's bool (True attends) or additive float mask ``[1, 1 or head, q_pos, k_pos]``.
    """
    end = scores.shape[-1]
    if attention_mask is None:
        lo = int(rows[0]) + 1
        if lo < end:
            future = torch.arange(lo, end, device=scores.device)[None, :] > rows[:, None]
            scores[..., lo:end].masked_fill_(future, float("-inf"))
        return
    m = attention_mask[0][:, rows - offset, :end]
    if m.dtype == torch.bool:
        scores.masked_fill_(~m, float("-inf"))
    else:
        scores.add_(m.float())


def visible_keys(
    region_index: torch.Tensor, query_pos: torch.Tensor, n_regions: int, self_index: int
) -> torch.Tensor:
    """Keys of each region visible to each query row, the query's own key counted in ``self``.

    ``keys[i, r] = #{k < q_i : region(k) = r} + [r = self]``; every row sums to ``q_i + 1``,
    the keys a causal query at position ``q_i`` sees (the ``pos`` of the generated token).

    Args:
        region_index: ``[pos]`` region of each key (``RegionMap.region_index``).
        query_pos: ``[q]`` absolute query positions, each ``< pos``.
        n_regions: size of the region axis.
        self_index: column of ``self``.

    Returns:
        ``[q, region]`` int64 counts.
    """
    onehot = torch.nn.functional.one_hot(region_index.long(), n_regions)
    before = torch.cat([onehot.new_zeros(1, n_regions), onehot.cumsum(0)])  # [pos + 1, region]
    keys = before[query_pos.long()].clone()
    keys[:, self_index] += 1
    return keys


@dataclass
class RegionRecorder:
    """Collects region masses of chosen query rows, layer by layer, while attached.

    Attached to the attention layers by :func:`recording` (replay: one full forward) or by
    :class:`analysis.hooked.HookedVLM` (generation: one prefill, then one row per decode step
    with a KV cache). Each call reduces the rows of ``query_pos`` that fall in the call's query
    block (the last ``q_len`` of the ``k_pos`` positions) and appends them, so a layer's rows
    come out in query order either way.

    Attributes:
        region_index: ``[pos]`` region of each key (``RegionMap.region_index``); may be longer
            than the keys of a call (generation labels positions not yet generated).
        query_pos: ``[rows]`` query positions to record (``p - 1`` per generated token ``p``),
            ascending.
        n_regions: size of the region axis.
        self_index: column of ``self``.
        chunk: query rows per chunk (peak extra memory ``head x chunk x pos`` float32); None
            fits :data:`CHUNK_BUDGET_BYTES` of scores per chunk (:func:`auto_chunk`). Each
            chunk's keys stop at its last query (causal attention: later keys get no mass).
        layers: decoder layers to record (``module.layer_idx``); None records all.
        value_weighted: also record value-norm-weighted mass.
        mass: layer -> list of ``[head, rows, region]`` float32 blocks, in query order.
        value_mass: layer -> list of ``[head, rows, region]`` float32 blocks (``value_weighted``).
    """

    region_index: torch.Tensor
    query_pos: torch.Tensor
    n_regions: int
    self_index: int
    chunk: int | None = None
    layers: frozenset[int] | None = None
    value_weighted: bool = False
    mass: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    value_mass: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk={self.chunk} must be >= 1 (or None: automatic)")

    def record(self, module, query, key, value, attention_mask, scaling) -> None:
        """Reduce one layer call's recorded rows to regions (called inside attention).

        Args:
            module: the attention module (``layer_idx``, ``num_key_value_groups``).
            query: ``[1, head, q_pos, head_dim]`` after RoPE; its rows are the last ``q_pos``
                of the ``k_pos`` positions (``q_pos == k_pos`` without a cache).
            key, value: ``[1, kv_head, k_pos, head_dim]`` (cache included).
            attention_mask: None (causal), bool ``[1, 1, q_pos, k_pos]`` (True attends) or
                additive float of that shape.
            scaling: logit scale (default ``head_dim ** -0.5``).

        Raises:
            ValueError: batch size is not 1, or the keys outnumber the region map.
        """
        layer = int(module.layer_idx)
        if self.layers is not None and layer not in self.layers:
            return
        if query.shape[0] != 1:
            raise ValueError(
                f"region recording needs batch size 1, got query batch {query.shape[0]}"
            )
        kv_len, q_len = key.shape[-2], query.shape[-2]
        if kv_len > self.region_index.numel():
            raise ValueError(
                f"layer {layer}: k_pos={kv_len} but the region map has only "
                f"{self.region_index.numel()} positions"
            )
        offset = kv_len - q_len
        device = query.device
        wanted = self.query_pos.to(device)
        rows_all = wanted[(wanted >= offset) & (wanted < kv_len)]
        if rows_all.numel() == 0:
            return
        n_rep = getattr(module, "num_key_value_groups", 1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q = query[0].float() * scale  # [head, q_pos, head_dim]; the scale folded in once
        k = repeat_kv(key, n_rep)[0].float()  # [head, k_pos, head_dim]
        onehot = torch.nn.functional.one_hot(
            self.region_index[:kv_len].to(device), self.n_regions
        ).float()
        vnorm = repeat_kv(value, n_rep)[0].float().norm(dim=-1) if self.value_weighted else None
        chunk = self.chunk or auto_chunk(q.shape[0], kv_len)
        for start in range(0, rows_all.numel(), chunk):
            rows = rows_all[start : start + chunk]
            end = int(rows[-1]) + 1  # causal: keys after the chunk's last query get no mass
            scores = q[:, rows - offset] @ k[:, :end].transpose(1, 2)  # [head, c, end]
            _mask_(scores, attention_mask, rows, offset)
            probs = torch.softmax(scores, dim=-1)
            del scores
            if vnorm is not None:
                weighted = probs * vnorm[:, None, :end]
                weighted /= weighted.sum(-1, keepdim=True)
                self.value_mass.setdefault(layer, []).append(
                    reduce_to_regions(
                        weighted, rows, onehot[:end], self.self_index, inplace=True
                    ).cpu()
                )
            self.mass.setdefault(layer, []).append(
                reduce_to_regions(probs, rows, onehot[:end], self.self_index, inplace=True).cpu()
            )

    def stacked(self, layers: Sequence[int], value: bool = False) -> torch.Tensor:
        """``[rows, layer, head, region]`` float32 of ``layers`` (in that order).

        Raises:
            RuntimeError: a layer was never recorded or holds a different number of rows than
                ``query_pos`` (the model does not route attention through the recorder, or the
                forward did not cover every recorded position).
        """
        store = self.value_mass if value else self.mass
        n = self.query_pos.numel()
        out = []
        for layer in layers:
            blocks = store.get(layer, [])
            got = sum(b.shape[1] for b in blocks)
            if got != n:
                raise RuntimeError(
                    f"layer {layer} recorded {got} of {n} query rows: does the model route "
                    "attention through AttentionInterface, and did the forward cover them all?"
                )
            out.append(torch.cat(blocks, dim=1))
        return torch.stack(out).permute(2, 0, 1, 3).contiguous()


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def _set_text_attention(model, implementation: str) -> None:
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": implementation})
    else:
        model.set_attn_implementation(implementation)


@contextmanager
def recording(model, recorder: RegionRecorder) -> Iterator[RegionRecorder]:
    """Attach ``recorder`` to the language model's attention layers for the block's forwards.

    Switches the text config's attention implementation to the reducing function over the
    current backend (eager stays eager, anything else runs over SDPA), and always restores the
    previous implementation and detaches the recorder on exit, exceptions included (like
    TransformerLens hooks removed when a context exits). The vision tower is left as it was.

    Args:
        model: a transformers model whose attention goes through ``AttentionInterface``.
        recorder: the :class:`RegionRecorder` to fill.

    Raises:
        ValueError: the model is already recording, or no attention module was found.
    """
    _register()
    text_config = _text_config(model)
    previous = text_config._attn_implementation
    if previous in (IMPL_SDPA, IMPL_EAGER):
        raise ValueError(f"model is already recording regions (attn_implementation={previous!r})")
    modules = [
        m
        for m in model.modules()
        if getattr(m, "config", None) is text_config
        and hasattr(m, "layer_idx")
        and hasattr(m, "num_key_value_groups")
    ]
    if not modules:
        raise ValueError(f"no attention modules with a layer_idx found in {type(model).__name__}")
    try:
        _set_text_attention(model, IMPL_EAGER if previous == "eager" else IMPL_SDPA)
        for m in modules:
            setattr(m, _RECORDER_ATTR, recorder)
        yield recorder
    finally:
        for m in modules:
            m.__dict__.pop(_RECORDER_ATTR, None)
        _set_text_attention(model, previous)


@dataclass
class AttentionRecord:
    """Region masses of one replayed trajectory.

    Attributes:
        mass: ``[token, layer, head, region]`` float32 fraction of each attention row; rows sum to 1.
        region_names: ``[region]`` names (``RegionMap.region_names``).
        positions: ``[token]`` absolute position ``p`` of each generated token (its query is ``p - 1``).
        layers: ``[layer]`` decoder layer index of each layer slot.
        image_origin: image number k -> "input" or the name of the tool that returned it.
        keys: ``[token, region]`` int64 keys of each region visible to the token's query, its
            own key counted in ``self`` (:func:`visible_keys`); rows sum to ``positions``.
        value_mass: ``[token, layer, head, region]`` value-norm-weighted mass, or None.
    """

    mass: torch.Tensor
    region_names: list[str]
    positions: list[int]
    layers: list[int]
    image_origin: dict[int, str]
    keys: torch.Tensor
    value_mass: torch.Tensor | None = None

    def to_frame(self, trajectory_id: str, turns: Sequence[int] | None = None) -> pd.DataFrame:
        """The long table: one row per (token, layer, head, region), every region kept (zeros too).

        Args:
            trajectory_id: value of the ``trajectory`` column.
            turns: ``[token]`` assistant turn of each generated token; default all 0.

        Returns:
            Columns trajectory (str), token (int32), pos (int32), turn (int16), layer (int16),
            head (int16), region (category), image (int16; k for "image:k", else -1),
            origin (str; image origin, else ""), mass (float32), keys (int32; visible keys of
            the region, for per-token efficiency), and value_mass (float32) when recorded.

        Raises:
            ValueError: ``turns`` has the wrong length.
        """
        mass = self.mass
        n_tok, n_layer, n_head, n_reg = mass.shape
        if turns is not None and len(turns) != n_tok:
            raise ValueError(f"turns has {len(turns)} entries but the record has {n_tok} tokens")
        per_tok = n_layer * n_head * n_reg
        image = np.array(
            [int(r.split(":")[1]) if r.startswith("image:") else -1 for r in self.region_names]
        )
        origin = np.array(
            [self.image_origin.get(int(i), "") if i > 0 else "" for i in image], dtype=object
        )
        codes = np.tile(np.arange(n_reg), n_tok * n_layer * n_head)
        return pd.DataFrame(
            {
                "trajectory": np.full(n_tok * per_tok, str(trajectory_id), dtype=object),
                "token": np.repeat(np.arange(n_tok, dtype=np.int32), per_tok),
                "pos": np.repeat(np.asarray(self.positions, dtype=np.int32), per_tok),
                "turn": np.repeat(
                    np.asarray(turns if turns is not None else [0] * n_tok, dtype=np.int16), per_tok
                ),
                "layer": np.tile(
                    np.repeat(np.asarray(self.layers, dtype=np.int16), n_head * n_reg), n_tok
                ),
                "head": np.tile(
                    np.repeat(np.arange(n_head, dtype=np.int16), n_reg), n_tok * n_layer
                ),
                "region": pd.Categorical.from_codes(codes, categories=self.region_names),
                "image": image.astype(np.int16)[codes],
                "origin": origin[codes],
                "mass": mass.reshape(-1).numpy().astype(np.float32),
                "keys": np.repeat(
                    self.keys.numpy().astype(np.int32)[:, None, :], n_layer * n_head, axis=1
                ).reshape(-1),
                **(
                    {"value_mass": self.value_mass.reshape(-1).numpy().astype(np.float32)}
                    if self.value_mass is not None
                    else {}
                ),
            }
        )


def replay_attention(
    model,
    inputs: dict,
    region_map: RegionMap,
    *,
    chunk: int | None = None,
    layers: Sequence[int] | None = None,
    value_weighted: bool = False,
) -> AttentionRecord:
    """Attention mass per key region for every generated token, from one teacher-forced forward.

    ``mass[t, l, h, r] = sum_{k in r} softmax(q_{p_t - 1} k^T * scaling + causal)[h, k]`` in fp32 for
    the t-th generated position ``p_t``, the query's own key counted as ``self`` (docs/method.md §6).
    ``value_weighted`` adds ``attn * ||v_k||`` renormalised per row (Kobayashi et al. 2020).

    Args:
        model: a Qwen2-VL/Qwen2.5-VL (or any ``AttentionInterface``) model, batch 1.
        inputs: ``input_ids [1, pos]``, optional ``attention_mask [1, pos]``, ``pixel_values``,
            ``image_grid_thw [image, 3]``, ``mm_token_type_ids [1, pos]``; passed to
            ``model(**inputs)`` (the model derives multimodal rope positions itself).
        region_map: :func:`analysis.spans.region_labels` of the same ids.
        chunk: query rows reduced at once (peak extra memory ``head x chunk x pos`` float32);
            None: :func:`auto_chunk` (2 MiB of scores per chunk).
        layers: decoder layers to record, in output order; default all.
        value_weighted: also compute ``value_mass``.

    Returns:
        :class:`AttentionRecord` with ``mass [token, layer, head, region]``.

    Raises:
        ValueError: batch size is not 1, ``pos`` differs from the region map, or a layer index
            is out of range.
    """
    ids = inputs["input_ids"]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, pos], got {tuple(ids.shape)}")
    if ids.shape[1] != len(region_map.labels):
        raise ValueError(
            f"input_ids has {ids.shape[1]} positions but region_map has {len(region_map.labels)}"
        )
    n_layers = _text_config(model).num_hidden_layers
    layer_list = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layer_list if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {n_layers} layers")
    recorder = RegionRecorder(
        region_index=region_map.region_index,
        query_pos=torch.tensor([p - 1 for p in region_map.generated_positions], dtype=torch.long),
        n_regions=len(region_map.region_names),
        self_index=region_map.self_index,
        chunk=chunk,
        layers=frozenset(layer_list),
        value_weighted=value_weighted,
    )
    extra = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # the logits are not needed: skip the [pos, vocab] matrix
    with recording(model, recorder), torch.no_grad():
        model(**inputs, **extra)
    return AttentionRecord(
        mass=recorder.stacked(layer_list),
        region_names=list(region_map.region_names),
        positions=list(region_map.generated_positions),
        layers=layer_list,
        image_origin=dict(region_map.image_origin),
        keys=visible_keys(
            region_map.region_index,
            recorder.query_pos,
            len(region_map.region_names),
            region_map.self_index,
        ),
        value_mass=recorder.stacked(layer_list, value=True) if value_weighted else None,
    )
