"""From trajectories to per-token tensors: loss weights, log-probs (docs/design.md data flow).

Trajectories have different images, so each is one micro-batch (batch 1) through the model;
the token-mean normaliser is the global count of weighted tokens of the mini-batch, so the
accumulated gradient equals that of one big batch (checked in tests).
"""

from __future__ import annotations

import torch

from agent.reward import mask_reasons
from agent.trajectory import Trajectory, image_token_problem


def loss_weights(traj: Trajectory, mask_tokens: bool, mask_trajectories: bool) -> torch.Tensor:
    """Per-position loss weight of ``traj`` under the two-level mask (docs/method.md §4).

    Level 1 (``mask_tokens``): weight 1 only where ``response_mask`` is 1 (tokens the policy
    sampled); with it off, every position after the prompt (observation text and tool images
    included) has weight 1. Level 2 (``mask_trajectories``): all zeros if the trajectory was
    truncated, has a void turn, a failed call, went over the image budget or holds image tokens
    that do not match its images (:data:`agent.reward.MASK_FLAGS`). The last always zeroes the
    weights, with the switch off too: such a row is forwarded blanked (:func:`batch_inputs`).

    Returns:
        ``[pos]`` float32 weights, aligned with ``traj.token_ids`` (position 0 always 0).
    """
    n = len(traj.token_ids)
    if mask_tokens:
        w = torch.tensor(traj.response_mask, dtype=torch.float32)
    else:
        w = torch.zeros(n)
        w[traj.prompt_len :] = 1.0
    if (mask_trajectories and mask_reasons(traj.flags)) or _bad(traj):
        w.zero_()  # a bad_image_tokens row is forwarded blanked: never trained, switch or not
    w[0] = 0.0  # position 0 has no prediction
    return w


def flag_bad_image_tokens(
    trajs: list[Trajectory], vision_ids: tuple[int, int, int], merge_size: int
) -> int:
    """Check every trajectory's image runs against its grids before any forward; never raises.

    A trajectory whose ``<|image_pad|>`` runs do not match ``grid_thw.prod() // merge**2`` per
    image (:func:`agent.trajectory.image_token_problem`) gets ``flags["bad_image_tokens"]``:
    the level-2 mask gives it zero weight and :func:`batch_inputs` forwards it blanked.

    Args:
        trajs: this rank's trajectories (images with their ``grid_thw``).
        vision_ids: ``(vision_start, vision_end, image_pad)`` ids (``ChatIds.vision``).
        merge_size: the vision merger's spatial merge.

    Returns:
        How many trajectories are flagged (newly or before).
    """
    for t in trajs:
        grids = [r.grid_thw for r in t.images]
        if image_token_problem(t.token_ids, grids, merge_size, vision_ids) is not None:
            t.flags["bad_image_tokens"] = True
    return sum(bool(t.flags.get("bad_image_tokens")) for t in trajs)


def token_log_probs(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-prob (nats) of every token given its prefix, by one teacher-forced forward.

    Args:
        model: a Qwen-VL ``ForConditionalGeneration``.
        inputs: :meth:`Trajectory.model_inputs` (batch 1).

    Returns:
        ``[pos]`` float32; entry ``t`` is ``log p(x_t | x_<t)``, entry 0 is 0. Full softmax over
        the vocabulary (the rollout's sampling suppression of vision tokens is not applied; the
        gap is measured as ``rollout/logprob_gap``).
    """
    logits = model(**inputs, use_cache=False).logits[0, :-1].float()
    ids = inputs["input_ids"][0, 1:]
    lp = logits.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return torch.cat([lp.new_zeros(1), lp])


def batch_inputs(
    trajs: list[Trajectory], image_token_id: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch of whole trajectories for one teacher-forced forward.

    Returns:
        ``input_ids``, ``attention_mask`` (1 on real tokens), ``mm_token_type_ids``: ``[batch,
        pos]``; ``pixel_values`` / ``image_grid_thw`` of every image of every row, in row order
        (the order Qwen2.5-VL's ``get_rope_index`` and placeholder scatter consume them). A
        row flagged ``bad_image_tokens`` (:func:`flag_bad_image_tokens`) is all padding ids and
        adds no images: its log-probs are meaningless, its loss weight is zero.
    """
    length = max(len(t.token_ids) for t in trajs)
    ids = torch.full((len(trajs), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(trajs), length), dtype=torch.long)
    for i, t in enumerate(trajs):
        if not _bad(t):  # a flagged row stays all padding: its image tokens would break the
            ids[i, : len(t.token_ids)] = torch.tensor(t.token_ids)  # forward of the whole batch
        mask[i, : len(t.token_ids)] = 1
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": ((ids == image_token_id) & (mask == 1)).to(torch.int32),
    }
    images = [r for t in trajs if not _bad(t) for r in t.images]
    if images:
        out["pixel_values"] = torch.cat([r.pixel_values for r in images])
        out["image_grid_thw"] = torch.tensor([r.grid_thw for r in images], dtype=torch.long)
    return out


def _bad(traj: Trajectory) -> bool:
    return bool(traj.flags.get("bad_image_tokens"))


def pad_right(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """``[len(rows), width]`` float32: each 1-D row at the left, 0 after it."""
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def batch_weights(trajs: list[Trajectory], weights: list[torch.Tensor]) -> torch.Tensor:
    """``[batch, pos]`` right-padded loss weights (0 on padding)."""
    return pad_right(weights, max(len(t.token_ids) for t in trajs))


def batched_token_log_probs(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`token_log_probs` for a right-padded batch: ``[batch, pos]``, 0 at position 0, on
    the model's device (inputs are moved there when the model names one, e.g. a GPU)."""
    device = getattr(model, "device", None)
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    ids = inputs["input_ids"][:, 1:]
    lp = logits.gather(-1, ids[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)
