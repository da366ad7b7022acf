"""Pure GRPO math: group advantages, clipped policy loss, KL, loss aggregation (docs/method.md §3).

Tensor functions with explicit arguments, after verl's ``trainer/ppo/core_algos.py``
(``compute_grpo_outcome_advantage``, ``agg_loss``, ``kl_penalty``) and TRL's ``GRPOTrainer``;
no config objects and no ``.item()`` inside losses. Masks are named for what 1 means:
``response_mask`` is 1 on tokens the policy sampled and that carry loss weight.
"""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")
LOSS_AGG = ("token-mean", "seq-mean-token-mean")


def group_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    scale_rewards: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO outcome advantage ``A_i = (r_i - mean_group(r)) / (std_group(r) + eps)``.

    Every trajectory of a group counts in its mean and std, including trajectories that the
    trajectory-level mask later gives zero loss weight (docs/method.md §3: masked trajectories still
    shape the baseline; only their loss weight is zero).

    Args:
        rewards: ``[batch]`` outcome rewards.
        group_index: ``[batch]`` integer group (prompt) id of each trajectory.
        scale_rewards: ``"group"`` divides by the group's std (GRPO, DeepSeekMath arXiv
            2402.03300), ``"batch"`` by the whole batch's std (TRL option), ``"none"`` does not
            divide (Dr. GRPO, arXiv 2503.20783).
        eps: added to the std (same units as rewards).

    Returns:
        ``[batch]`` advantages. Std is the unbiased sample std (``torch.std``), as in verl; a
        group of one gets advantage 0.

    Raises:
        ValueError: unknown ``scale_rewards`` or mismatched shapes.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.shape != group_index.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} must be equal 1-D"
        )
    rewards = rewards.float()
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    sums = torch.zeros(n_groups).index_add_(0, inverse, rewards)
    mean = sums / counts
    sq = torch.zeros(n_groups).index_add_(0, inverse, (rewards - mean[inverse]) ** 2)
    std = torch.where(counts > 1, (sq / (counts - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    centered = rewards - mean[inverse]
    centered = torch.where(counts[inverse] > 1, centered, torch.zeros_like(centered))
    if scale_rewards == "none":
        return centered
    scale = std[inverse] if scale_rewards == "group" else rewards.std().expand_as(rewards)
    if rewards.numel() == 1:
        return centered
    # a group with identical rewards has centered == 0: advantage 0, never 0/0
    return torch.where(centered == 0, torch.zeros_like(centered), centered / (scale + eps))


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1`` (nats).

    Schulman, "Approximating KL divergence" (2020); verl ``kl_penalty(..., "low_var_kl")``.
    Shapes ``[...]`` in, ``[...]`` out; always >= 0.
    """
    delta = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
    return delta.exp() - delta - 1.0


def agg_loss(
    loss: torch.Tensor, mask: torch.Tensor, mode: str, n_tokens: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Aggregate a ``[batch, resp]`` per-token loss over ``mask`` (1 = counts).

    Args:
        loss: ``[batch, resp]`` per-token loss.
        mask: ``[batch, resp]`` loss weights (0/1).
        mode: ``"token-mean"``: ``sum(loss * mask) / n_tokens`` (DAPO, arXiv 2503.14476);
            ``"seq-mean-token-mean"``: mean over sequences with any weight of their token mean.
        n_tokens: normaliser for ``token-mean`` (the global count of unmasked tokens when a batch
            is split into micro-batches); defaults to ``mask.sum()``.

    Returns:
        Scalar loss; 0 when nothing is unmasked.
    """
    if mode == "token-mean":
        denom = mask.sum() if n_tokens is None else n_tokens
        return (loss * mask).sum() / torch.clamp(torch.as_tensor(denom, dtype=loss.dtype), min=1.0)
    if mode == "seq-mean-token-mean":
        per_seq_tokens = mask.sum(-1)
        seq_loss = (loss * mask).sum(-1) / per_seq_tokens.clamp(min=1.0)
        has = (per_seq_tokens > 0).to(loss.dtype)
        return (seq_loss * has).sum() / has.sum().clamp(min=1.0)
    raise ValueError(f"loss aggregation must be one of {LOSS_AGG}, got {mode!r}")


def clipped_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    loss_agg: str = "token-mean",
    n_tokens: torch.Tensor | float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped surrogate with clip-higher (PPO arXiv 1707.06347; DAPO arXiv 2503.14476).

    ``ratio = exp(logp - old_logp)``; per token
    ``l = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``, optionally times a
    truncated importance-sampling weight (engine/trainer mismatch correction), aggregated by
    :func:`agg_loss`.

    Args:
        log_probs: ``[batch, resp]`` current policy log-probs (nats), with grad.
        old_log_probs: ``[batch, resp]`` log-probs of the policy that sampled (no grad).
        advantages: ``[batch]`` or ``[batch, resp]`` advantages.
        response_mask: ``[batch, resp]`` 1 on tokens with loss weight.
        clip_eps_low, clip_eps_high: clip range ``[1 - low, 1 + high]``.
        loss_agg: see :func:`agg_loss`.
        n_tokens: global normaliser for ``token-mean``.
        is_weights: ``[batch, resp]`` truncated importance weights (no grad), or ``None``.

    Returns:
        ``(loss, stats)``; stats (detached tensors): ``clipfrac`` (fraction of weighted tokens
        whose ratio was clipped in the direction that stops the gradient), ``ratio_mean``,
        ``approx_kl`` (k3 between old and current, nats).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = (log_probs - old_log_probs).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = agg_loss(per_token, response_mask, loss_agg, n_tokens)
    with torch.no_grad():
        m = response_mask.to(ratio.dtype)
        denom = m.sum().clamp(min=1.0)
        stats = {
            "clipfrac": ((clipped < unclipped).to(m.dtype) * m).sum() / denom,
            "ratio_mean": (ratio * m).sum() / denom,
            "approx_kl": (kl_k3(log_probs, old_log_probs) * m).sum() / denom,
        }
    return loss, stats


def truncated_is_weights(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance weights ``min(exp(old_logp - rollout_logp), cap)`` (no grad).

    Corrects for the rollout engine (e.g. vLLM) sampling from a slightly different distribution
    than the trainer computes (Yao et al., "Your efficient RL framework secretly brings you
    off-policy RL training", 2025; verl ``rollout_is``). Shapes ``[batch, resp]``.
    """
    return (old_log_probs - rollout_log_probs).clamp(max=20.0).exp().clamp(max=cap).detach()
