"""``Trajectory``: one multi-turn episode as token ids, images in order, loss mask, events, reward.

Token ids are the trainer track (docs/design.md decision 2): each image appears as
``<|vision_start|>`` + ``<|image_pad|>`` x (t*h*w / merge**2) + ``<|vision_end|>``, exactly what
the model's forward expects. Later turns are appended as ids, never re-tokenised from text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from PIL import Image


@dataclass
class ImageRecord:
    """One image in the sequence, in order of appearance.

    Attributes:
        image: the RGB image given to the image processor (original pixels, or the crop).
        origin: ``"input"``, or the name of the tool that returned it (``"reflect"``, ...).
        source: 1-based input image it shows.
        call: 0-based index of the tool call that returned it (``None`` for input images).
        bbox: crop box in original pixels of ``source`` (``confirm`` only).
        grid_thw: ``(t, h, w)`` patch grid from the image processor.
        pixel_values: ``[t*h*w, C*temporal_patch*patch*patch]`` processor output (not serialised).
    """

    image: Image.Image
    origin: str
    source: int
    call: int | None = None
    bbox: tuple[int, int, int, int] | None = None
    grid_thw: tuple[int, int, int] = (1, 0, 0)
    pixel_values: torch.Tensor | None = None

    def n_tokens(self, merge_size: int) -> int:
        """Image tokens in the sequence: ``t*h*w / merge_size**2``."""
        t, h, w = self.grid_thw
        return t * h * w // (merge_size * merge_size)


@dataclass
class TurnEvent:
    """What happened in one assistant turn.

    Attributes:
        turn: 0-based turn index.
        kind: ``"tool_call"``, ``"answer"`` or ``"void"`` (neither a call nor an answer).
        start, end: ``[start, end)`` positions of the policy-sampled tokens of the turn.
        text: decoded turn text.
        tool: tool name (``tool_call`` only; ``"?"`` when unparseable).
        ok: the tool call succeeded (``tool_call`` only).
        error: the error observation of a failed call.
        arguments: parsed tool arguments.
        obs_start, obs_end: ``[obs_start, obs_end)`` positions of the inserted observation turn.
        images: indices into ``Trajectory.images`` returned by this call.
        hit_length_limit: the turn was cut by ``max_new_tokens`` before its end token.
    """

    turn: int
    kind: str
    start: int
    end: int
    text: str
    tool: str | None = None
    ok: bool = False
    error: str | None = None
    arguments: dict | None = None
    obs_start: int | None = None
    obs_end: int | None = None
    images: list[int] = field(default_factory=list)
    hit_length_limit: bool = False


FLAG_NAMES = ("truncated", "void_turn", "failed_call", "over_budget", "bad_image_tokens")


def image_token_problem(
    token_ids: list[int],
    grids: list[tuple[int, int, int]],
    merge_size: int,
    vision_ids: tuple[int, int, int],
) -> str | None:
    """Why the image runs of ``token_ids`` do not match the image grids, or None when they do.

    Qwen2-VL's forward needs exactly one ``<|vision_start|>`` + ``<|image_pad|>`` x
    ``t*h*w / merge**2`` + ``<|vision_end|>`` run per image, in order; a stray pad or vision
    token (e.g. sampled by the policy) makes it raise. A linear scan, no tensors.

    Args:
        token_ids: ``[pos]`` the sequence.
        grids: ``[image]`` ``(t, h, w)`` patch grid of each image, in order of appearance.
        merge_size: the vision merger's spatial merge (2 for Qwen2.5-VL).
        vision_ids: ids of ``(<|vision_start|>, <|vision_end|>, <|image_pad|>)``.

    Returns:
        A short reason (``str``), or None.
    """
    start, end, pad = vision_ids
    runs: list[int] = []
    open_run = False
    for tid in token_ids:
        if tid == start:
            if open_run:
                return "nested <|vision_start|>"
            open_run = True
            runs.append(0)
        elif tid == pad:
            if not open_run:
                return "<|image_pad|> outside an image run"
            runs[-1] += 1
        elif tid == end:
            if not open_run:
                return "<|vision_end|> without <|vision_start|>"
            open_run = False
        elif open_run:
            return "an image run holds a non-pad token"
    expected = [t * h * w // (merge_size * merge_size) for t, h, w in grids]
    if open_run or runs != expected:
        return f"image runs of {runs} pads, grids need {expected}"
    return None


@dataclass
class Trajectory:
    """A finished (or running) episode of the agent on one sample.

    Attributes:
        sample_id, family, gold: the sample it answers.
        token_ids: ``[pos]`` full sequence (prompt + turns + observations), trainer track.
        prompt_len: tokens of the initial prompt.
        response_mask: ``[pos]`` 1 on tokens the policy sampled (thinking, call JSON, answer,
            the turn's end token), 0 on prompt, environment-inserted and image tokens.
        rollout_log_probs: ``[pos]`` log-prob (nats) of each sampled token under the rollout
            engine's sampling distribution; 0 elsewhere.
        images: every image in order of appearance.
        events: one per assistant turn.
        answer: the final ``<answer>`` text, if any.
        flags: ``truncated`` (ended without answer: turn/context limit), ``void_turn``,
            ``failed_call``, ``over_budget`` (image budget), ``bad_image_tokens`` (image runs
            that do not match the images, :func:`image_token_problem`: never forwarded).
        acc, fmt, used: verification outcome (docs/method.md §5; :func:`agent.verifiers.verify_trajectory`,
            filled by the rollout): answer score in [0, 1], -1/0 format, 1/0 tool use.
        reward: the trainer's reward (``train.rewards.score``); None until it is scored.
        reward_terms: the unweighted value of each reward term, by term name (empty until
            scored).
        group: index of the GRPO group (prompt) it belongs to.
    """

    sample_id: str
    family: str
    gold: str
    answer_type: str
    token_ids: list[int]
    prompt_len: int
    response_mask: list[int]
    rollout_log_probs: list[float]
    images: list[ImageRecord]
    events: list[TurnEvent] = field(default_factory=list)
    answer: str | None = None
    flags: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(FLAG_NAMES, False))
    reward: float | None = None
    acc: float = 0.0
    fmt: float = 0.0
    used: float = 0.0
    group: int = 0
    reward_terms: dict[str, float] = field(default_factory=dict)

    def extend(
        self, ids: list[int], sampled: bool, log_probs: list[float] | None = None
    ) -> tuple[int, int]:
        """Append ids; ``sampled`` marks them as policy tokens. Returns their ``[start, end)``."""
        start = len(self.token_ids)
        self.token_ids.extend(ids)
        self.response_mask.extend([1 if sampled else 0] * len(ids))
        self.rollout_log_probs.extend(log_probs if log_probs is not None else [0.0] * len(ids))
        return start, len(self.token_ids)

    def fork(self) -> Trajectory:
        """A fresh copy of a not-yet-started trajectory (lists copied, image records shared)."""
        return replace(
            self,
            token_ids=list(self.token_ids),
            response_mask=list(self.response_mask),
            rollout_log_probs=list(self.rollout_log_probs),
            images=list(self.images),
            events=[],
            flags=dict(self.flags),
            reward_terms={},
        )

    @property
    def n_tool_calls(self) -> dict[str, int]:
        """Successful tool calls per tool name (only names called; count others as 0)."""
        out: dict[str, int] = {}
        for e in self.events:
            if e.kind == "tool_call" and e.ok and e.tool:
                out[e.tool] = out.get(e.tool, 0) + 1
        return out

    @property
    def response_length(self) -> int:
        """Number of policy-sampled tokens."""
        return int(sum(self.response_mask))

    def model_inputs(self, image_token_id: int) -> dict[str, torch.Tensor]:
        """Inputs for one teacher-forced forward of the whole sequence (batch 1).

        Returns:
            ``input_ids [1, pos]``, ``attention_mask [1, pos]``, ``mm_token_type_ids [1, pos]``
            (1 on image pads: without it Qwen2.5-VL silently falls back to 1-D positions,
            docs/gotchas.md), and ``pixel_values [patches, dim]`` / ``image_grid_thw [images, 3]``
            when there are images.
        """
        ids = torch.tensor([self.token_ids], dtype=torch.long)
        out = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == image_token_id).to(torch.int32),
        }
        if self.images:
            out["pixel_values"] = torch.cat([r.pixel_values for r in self.images], dim=0)
            out["image_grid_thw"] = torch.tensor(
                [r.grid_thw for r in self.images], dtype=torch.long
            )
        return out

    def to_record(self, image_refs: list[str] | None = None) -> dict[str, Any]:
        """JSON-serialisable dict (images as ``image_refs`` paths, pixel tensors dropped;
        ``reward`` null and ``reward_terms`` empty when the trainer has not scored it)."""
        images = []
        for i, r in enumerate(self.images):
            images.append(
                {
                    "ref": image_refs[i] if image_refs else None,
                    "origin": r.origin,
                    "source": r.source,
                    "call": r.call,
                    "bbox": list(r.bbox) if r.bbox else None,
                    "grid_thw": list(r.grid_thw),
                    "size": list(r.image.size),
                }
            )
        return {
            "id": f"{self.sample_id}/g{self.group}",
            "sample_id": self.sample_id,
            "family": self.family,
            "gold": self.gold,
            "answer": self.answer,
            "token_ids": self.token_ids,
            "prompt_len": self.prompt_len,
            "response_mask": self.response_mask,
            "rollout_log_probs": [round(x, 6) for x in self.rollout_log_probs],
            "images": images,
            "events": [asdict(e) for e in self.events],
            "flags": self.flags,
            "reward": self.reward,
            "reward_terms": self.reward_terms,
            "acc": self.acc,
            "fmt": self.fmt,
            "used": self.used,
            "group": self.group,
        }
