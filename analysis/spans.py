"""Region span map of a trajectory's key positions, derived from token ids only (docs/method.md §6).

Every key position of a finished trajectory belongs to exactly one region::

    sink        position 0
    system      the first ``<|im_start|>system ... <|im_end|>\\n`` turn (after the sink)
    user_text   other prompt text: user turn, "Image k:" labels, the assistant header
    image:{k}   the k-th contiguous run of ``<|image_pad|>`` (1-based; input images first)
    image_wrap  ``<|vision_start|>`` / ``<|vision_end|>``
    generated   tokens the policy sampled (``response_mask == 1``)
    tool_text   every other position at or after ``prompt_len`` (observations, chat glue)

plus ``self``, which is no key label: the replay assigns it per query row to the query's own key.
The analysis never imports the agent (docs/design.md): spans come from ids and the tokenizer's
special-token ids, so any rollout engine's trajectory can be mapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

INPUT_ORIGIN = "input"  # origin of the prompt's images; a tool's images carry the tool's name
# Region order of every RegionMap: the fixed regions, then image:1..K.
FIXED_REGIONS = ("sink", "system", "user_text", "image_wrap", "tool_text", "generated", "self")

_SPECIAL_TOKENS = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
}


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the chat and vision special tokens in a Qwen2-VL/Qwen2.5-VL tokenizer.

    Attributes:
        im_start, im_end: ``<|im_start|>``, ``<|im_end|>`` (turn delimiters).
        vision_start, vision_end: ``<|vision_start|>``, ``<|vision_end|>`` (image wrap).
        image_pad: ``<|image_pad|>`` (one per merged image patch).
        system_role: ids of the role word ``system`` after ``<|im_start|>``; empty: no turn is
            recognised as the system turn (the ``system`` region stays empty).
        newline: id of ``"\\n"`` (the glue after ``<|im_end|>``), or None.
    """

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    system_role: tuple[int, ...] = ()
    newline: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialIds:
        """Read the ids from a Hugging Face tokenizer.

        Raises:
            ValueError: the tokenizer lacks one of the special tokens; the message names it.
        """
        ids: dict[str, int] = {}
        unk = getattr(tokenizer, "unk_token_id", None)
        for field, token in _SPECIAL_TOKENS.items():
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or (unk is not None and tid == unk):
                raise ValueError(f"tokenizer has no {token} token (needed for SpecialIds.{field})")
            ids[field] = int(tid)
        role = tuple(int(i) for i in tokenizer.encode("system", add_special_tokens=False))
        newline = tokenizer.encode("\n", add_special_tokens=False)
        return cls(**ids, system_role=role, newline=int(newline[0]) if len(newline) == 1 else None)


@dataclass(frozen=True)
class RegionMap:
    """Region of every key position of one sequence.

    Attributes:
        labels: ``[pos]`` region name of each key position (never ``"self"``).
        region_names: ``[region]`` ordered unique names: :data:`FIXED_REGIONS`, then
            ``image:1`` .. ``image:K``. Every name is present even if its region is empty.
        region_index: ``[pos]`` int64 index of each position's label in ``region_names``.
        image_origin: image number k (1-based) -> "input" or the name of the tool that
            returned it ("reflect", "confirm", a user tool's name).
        image_sizes: image number k -> its image_pad tokens.
        generated_positions: absolute positions p with ``response_mask[p] == 1``, ascending.
    """

    labels: list[str]
    region_names: list[str]
    region_index: torch.Tensor
    image_origin: dict[int, str]
    image_sizes: dict[int, int]
    generated_positions: list[int]

    @property
    def self_index(self) -> int:
        """Index of the ``self`` region in ``region_names``."""
        return self.region_names.index("self")


def image_runs(token_ids: Sequence[int], image_pad: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every maximal run of ``image_pad`` ids, in order of appearance."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate(token_ids):
        if t == image_pad and start is None:
            start = i
        elif t != image_pad and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(token_ids)))
    return runs


def _system_end(token_ids: Sequence[int], ids: SpecialIds) -> int:
    """One past the last position of a leading system turn, or 1 if the sequence has none."""
    role = list(ids.system_role)
    if not role or not token_ids or token_ids[0] != ids.im_start:
        return 1
    if list(token_ids[1 : 1 + len(role)]) != role:
        return 1
    for i in range(1 + len(role), len(token_ids)):
        if token_ids[i] == ids.im_end:
            end = i + 1
            if ids.newline is not None and end < len(token_ids) and token_ids[end] == ids.newline:
                end += 1
            return end
    return 1  # an unterminated "system" turn is no system turn


def _checked_origins(
    token_ids: Sequence[int],
    response_mask: Sequence[int],
    prompt_len: int,
    n_runs: int,
    image_origins: Sequence[str] | None,
    tool_names: Sequence[str] | None,
) -> list[str]:
    """Validate :func:`region_labels`' arguments; return one origin per image run."""
    n = len(token_ids)
    if len(response_mask) != n:
        raise ValueError(f"response_mask has {len(response_mask)} entries but token_ids has {n}")
    if not 0 < prompt_len <= n:
        raise ValueError(f"prompt_len={prompt_len} outside [1, {n}] (len(token_ids)={n})")
    if any(response_mask[:prompt_len]):
        raise ValueError(
            f"response_mask has sampled tokens inside the prompt (prompt_len={prompt_len})"
        )
    origins = list(image_origins) if image_origins is not None else ["input"] * n_runs
    if len(origins) != n_runs:
        raise ValueError(
            f"image_origins has {len(origins)} entries but token_ids has {n_runs} image runs"
        )
    known = None if tool_names is None else (INPUT_ORIGIN, *tool_names)
    bad = [o for o in origins if not isinstance(o, str) or not o or (known and o not in known)]
    if bad:
        expected = f"one of {known}" if known else "a non-empty name"
        raise ValueError(f"image_origins holds {bad[0]!r}; expected {expected}")
    return origins


def region_labels(
    token_ids: Sequence[int],
    response_mask: Sequence[int],
    ids: SpecialIds,
    prompt_len: int,
    image_origins: Sequence[str] | None = None,
    tool_names: Sequence[str] | None = None,
) -> RegionMap:
    """Label every key position with its region (module docstring lists the rules).

    Args:
        token_ids: ``[pos]`` the full sequence (prompt, turns, observations), processor-expanded
            (one ``image_pad`` per merged patch).
        response_mask: ``[pos]`` 1 on tokens the policy sampled, else 0.
        ids: the tokenizer's special-token ids.
        prompt_len: tokens of the initial prompt (before the first sampled token).
        image_origins: origin of each image in order of appearance: "input" or the name of
            the tool that returned it (a trajectory's ``images[i].origin``); default all
            "input".
        tool_names: the tool names an origin may take besides "input" (the agent's tool
            registry, passed as data: the analysis never imports the agent); None accepts
            any non-empty name.

    Returns:
        The :class:`RegionMap`.

    Raises:
        ValueError: ``response_mask`` and ``token_ids`` differ in length; ``image_origins``
            length differs from the number of image runs or holds an unknown origin;
            ``prompt_len`` is out of range; a sampled token lies in the prompt or is a vision
            token. Messages name the field and the counts.
    """
    runs = image_runs(token_ids, ids.image_pad)
    origins = _checked_origins(
        token_ids, response_mask, prompt_len, len(runs), image_origins, tool_names
    )
    vision = {ids.vision_start, ids.vision_end, ids.image_pad}
    system_end = _system_end(token_ids, ids)
    labels: list[str] = []
    for p, (t, sampled) in enumerate(zip(token_ids, response_mask)):
        if sampled and t in vision:
            raise ValueError(f"response_mask marks vision token id {t} at position {p} as sampled")
        if p == 0:
            labels.append("sink")
        elif t in (ids.vision_start, ids.vision_end):
            labels.append("image_wrap")
        elif sampled:
            labels.append("generated")
        elif p < system_end:
            labels.append("system")
        else:
            labels.append("user_text" if p < prompt_len else "tool_text")
    for k, (start, end) in enumerate(runs, 1):
        labels[start:end] = [f"image:{k}"] * (end - start)
    if runs and runs[0][0] == 0:
        labels[0] = "sink"  # position 0 is always the sink
    names = list(FIXED_REGIONS) + [f"image:{k}" for k in range(1, len(runs) + 1)]
    lookup = {name: i for i, name in enumerate(names)}
    return RegionMap(
        labels=labels,
        region_names=names,
        region_index=torch.tensor([lookup[x] for x in labels], dtype=torch.long),
        image_origin={k: o for k, o in enumerate(origins, 1)},
        image_sizes={k: labels.count(f"image:{k}") for k in range(1, len(runs) + 1)},
        generated_positions=[p for p, m in enumerate(response_mask) if m],
    )


def check_image_grid(
    token_ids: Sequence[int],
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]],
    merge_size: int,
    ids: SpecialIds,
) -> None:
    """Check that image run k holds ``t*h*w / merge_size**2`` image_pad tokens for every image.

    Args:
        token_ids: ``[pos]`` the processor-expanded sequence.
        image_grid_thw: ``[image, 3]`` patches per image in time, height, width.
        merge_size: the vision tower's spatial merge factor.
        ids: the tokenizer's special-token ids.

    Raises:
        ValueError: the numbers of runs and images differ, or one image's pad count disagrees,
            e.g. "image 3 has 12 image_pad tokens but image_grid_thw[2]=(1,8,8) implies 16".
    """
    grid = [
        tuple(int(x) for x in row)
        for row in (image_grid_thw.tolist() if torch.is_tensor(image_grid_thw) else image_grid_thw)
    ]
    runs = image_runs(token_ids, ids.image_pad)
    if len(runs) != len(grid):
        raise ValueError(
            f"token_ids has {len(runs)} image_pad runs but image_grid_thw has {len(grid)} rows"
        )
    for k, ((start, end), (t, h, w)) in enumerate(zip(runs, grid), 1):
        expected = t * h * w // merge_size**2
        if end - start != expected:
            raise ValueError(
                f"image {k} has {end - start} image_pad tokens but "
                f"image_grid_thw[{k - 1}]=({t},{h},{w}) implies {expected}"
            )
