"""Scale presets: the settings of a Qwen2.5-VL-3B/7B run on GPU nodes, by name.

A preset is a set of field overrides applied on top of a grid's configs (``--preset NAME`` of
``python -m experiments.ablate``). Precedence, lowest first: the grid (:data:`experiments.grids.
GRIDS`), the preset, then the command line (``--model``, ``--steps``, ``--engine``,
``--zero-stage``, ``--gradient-checkpointing``, ``--rollout-seeding``), so a flag always wins.
The arm switches (tools, masks, tool gain, seed) are applied last, per arm.

Every value cites its source:

- **[paper]** IMAgent (arXiv 2512.08980; docs/method.md §1): Qwen2.5-VL-7B-Instruct, pure RL.
- **[METHOD]** relook's documented defaults (docs/method.md §2-5).
- **[DeepEyes]** the DeepEyes 7B recipe (arXiv 2505.14362), ``examples/agent/
  final_merged_v1v8_thinklite.sh`` of ChenShawn/DeepEyes (read from the unmodified fork
  zyang6/DeepEyes at commit 17681d8): verl ``main_ppo`` with ``data.train_batch_size=256``,
  ``data.max_prompt_length=8192``, ``data.max_response_length=20480``, ``optim.lr=1e-6``,
  ``ppo_mini_batch_size=256``, ``ppo_micro_batch_size_per_gpu=4``, ``kl_coef=0``,
  ``use_kl_loss=False``, ``entropy_coeff=0``, ``rollout.n=16``, ``rollout.name=vllm``,
  ``tensor_model_parallel_size=1``, ``gpu_memory_utilization=0.8``, ``agent.max_turns=5``,
  ``agent.single_response_max_tokens=10240``, ``save_freq=8``, FSDP with parameter and
  optimizer offload. DeepEyes ships no 3B recipe; the 3B preset scales the 7B one.
- **[verl]** the defaults of the verl fork DeepEyes ships (``verl/trainer/config/
  ppo_trainer.yaml``: ``grad_clip: 1.0``, ``lr_warmup_steps_ratio: 0``,
  ``enable_gradient_checkpointing: True``, rollout ``temperature: 1.0``; its FSDP worker's
  AdamW ``weight_decay`` default 1e-2) that the DeepEyes script leaves alone. Not matched:
  verl keeps the learning rate constant, relook's engines decay it linearly to 10%
  (:func:`train.engine.lr_lambda`).
- **[Qwen]** Qwen2.5-VL-7B/3B-Instruct as published: ``preprocessor_config.json`` (patch 14,
  merge 2, ``min_pixels`` 3136 = 56*56, ``max_pixels`` 12845056 = 16384*28*28: up to 16,384
  image tokens per image), ``config.json`` ``max_position_embeddings`` 128000 (the context
  :attr:`Preset.context` checks against), and the Qwen2.5-VL README's example of lowering the
  cap, ``max_pixels = 1280*28*28`` (1,003,520 px, 1,280 tokens per image).
- **[DeepEyes-crop]** DeepEyes' zoom tool (zyang6/DeepEyes, ``verl/workers/agent/envs/
  mm_process_engine/visual_toolbox_v2.py``): ``img.crop(bbox)`` at native resolution, no
  resize, after ``maybe_resize_bbox`` grows a box with a side under 28 px (one merged patch)
  to 28 px about its centre; its input images go to the processor unresized
  (``verl/utils/dataset/vision_utils.py`` ``process_image``), i.e. at the processor's caps.
- **[default]** relook's own choice where neither source fits relook (ZeRO instead of FSDP,
  colocated vLLM), with the reason.

bf16: the DeepSpeed engine trains in bf16 on CUDA (fp32 on CPU), so the presets need no
precision field. The model must be a local ``save_pretrained`` snapshot (e.g. ``huggingface-cli
download Qwen/Qwen2.5-VL-7B-Instruct --local-dir /ckpt/Qwen2.5-VL-7B-Instruct``) passed with
``--model``; the preset's ``model`` is the hub id it names, as a default to replace.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields, replace
from typing import Any

from agent.rollout import AgentConfig
from train.config import GRPOConfig


def vllm_available() -> bool:
    """Whether the vLLM rollout backend can run here: ``vllm`` importable and a CUDA GPU
    (docs/gotchas.md: vLLM's Qwen-VL path does not run on CPU)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class Preset:
    """A named set of overrides for a model size.

    Attributes:
        model: the base model the preset is made for (hub id; pass a local snapshot of it
            with ``--model``).
        grpo: :class:`train.config.GRPOConfig` field overrides.
        agent: :class:`agent.rollout.AgentConfig` field overrides.
        vllm: :class:`GRPOConfig` overrides applied only when :func:`vllm_available`
            (``rollout_backend="vllm"`` and its engine settings); otherwise the HF
            ``generate`` backend is kept.
        context: the model's context in tokens (``max_position_embeddings``), which the
            preset's token budgets must fit (:func:`worst_case_tokens`).
        patch_size, merge_size: the model's vision patch and merge sizes (image tokens per
            image = pixels / (patch_size * merge_size)**2).
    """

    model: str
    grpo: dict[str, Any] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    vllm: dict[str, Any] = field(default_factory=dict)
    context: int = 128000  # [Qwen] config.json max_position_embeddings
    patch_size: int = 14  # [Qwen] preprocessor_config.json
    merge_size: int = 2  # [Qwen] preprocessor_config.json

    def __post_init__(self) -> None:
        for name, cls in (("grpo", GRPOConfig), ("agent", AgentConfig), ("vllm", GRPOConfig)):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(getattr(self, name)) - known)
            if unknown:
                raise ValueError(f"Preset.{name}: unknown {cls.__name__} field(s) {unknown}")


# The settings both sizes share (sources in the module docstring).
_GRPO = dict(
    group_size=8,  # [METHOD 3] G = 8 (DeepEyes samples 16: twice the rollout cost per prompt)
    prompts_per_step=256,  # [DeepEyes] data.train_batch_size=256 prompts per step
    mini_batches=1,  # [DeepEyes] ppo_mini_batch_size=256 = the batch: one on-policy step
    lr=1e-6,  # [DeepEyes] actor optim.lr=1e-6
    weight_decay=0.01,  # [verl] actor optim weight_decay default
    warmup_steps=0,  # [verl] lr_warmup_steps_ratio=0 (DeepEyes keeps it)
    max_grad_norm=1.0,  # [verl] actor grad_clip default
    clip_eps_low=0.2,  # [METHOD 3] PPO clip (verl clip_ratio 0.2)
    clip_eps_high=0.28,  # [METHOD 3] clip-higher (DAPO)
    beta=0.0,  # [DeepEyes] kl_coef=0, use_kl_loss=False: no reference model
    scale_rewards="group",  # [METHOD 3] GRPO advantages (verl adv_estimator=grpo)
    loss_agg="token-mean",  # [METHOD 3] (verl loss_agg_mode default token-mean)
    reward_form="imagent",  # [METHOD 5] acc * (1 + g * used) + 0.2 * fmt
    tool_gain=0.5,  # [METHOD 5] g = 0.5
    checkpoint_every=8,  # [DeepEyes] trainer.save_freq=8
    engine="deepspeed",  # [default] DeepSpeed ZeRO in place of DeepEyes' FSDP (docs/design.md)
    gradient_checkpointing=True,  # [verl] enable_gradient_checkpointing default True
    rollout_seeding="group",  # [default] rollouts independent of the number of processes
    steps=80,  # [default] a first run; DeepEyes' schedule is epochs over 47k prompts
)
_AGENT = dict(
    max_turns=5,  # [METHOD 2] and [DeepEyes] agent.max_turns=5
    max_new_tokens=10240,  # [DeepEyes] agent.single_response_max_tokens=10240 per turn
    max_total_tokens=8192 + 20480,  # [DeepEyes] max_prompt_length + max_response_length
    temperature=1.0,  # [verl] rollout temperature default
    # [Qwen] README's lowered cap 1280*28*28 px: 1,280 tokens per image instead of the
    # processor's 16,384 (12845056 px), so that 12 images fit beside 5 x 10240 sampled tokens
    max_pixels=1280 * 28 * 28,
    min_pixels=56 * 56,  # [Qwen] preprocessor_config.json min_pixels 3136
    crop_policy="native",  # [DeepEyes-crop] native-resolution crop, small boxes padded to 28 px
    crop_max_pixels=1280 * 28 * 28,  # [default] a crop costs at most what an input image does
    # [default] 16 full-size images' worth (16 x 1,280 tokens): above max_images x 1,280 with
    # headroom for the prompt's images; a call past it ends the episode over_budget
    max_image_tokens=16 * 1280,
)
_VLLM = dict(
    rollout_backend="vllm",  # [DeepEyes] rollout.name=vllm (GPU only; else HF generate)
    vllm_tensor_parallel_size=1,  # [DeepEyes] tensor_model_parallel_size=1: an engine per GPU
    vllm_enable_sleep_mode=True,  # [default] colocated: free vLLM's memory for the update
    tis_cap=2.0,  # [default] truncated IS for the vLLM/trainer mismatch (verl and TRL cap 2)
)

PRESETS: dict[str, Preset] = {
    "qwen2.5-vl-7b": Preset(
        model="Qwen/Qwen2.5-VL-7B-Instruct",  # [paper] IMAgent's base model
        grpo=dict(
            _GRPO,
            micro_batch=4,  # [DeepEyes] ppo_micro_batch_size_per_gpu=4
            # [default] ZeRO-3 (parameters sharded too), the counterpart of DeepEyes' FSDP
            # full sharding: 7B x 16 bytes of fp32 Adam state and master weights does not
            # fit beside a colocated vLLM engine on one 80 GB GPU unsharded
            zero_stage=3,
        ),
        agent=_AGENT,
        vllm=dict(
            _VLLM,
            # [default] 0.6 of the GPU (the DeepEyes v2 7B script's value; the final one uses
            # 0.8 with the trainer's weights and optimizer offloaded to CPU, which relook's
            # ZeRO-3 does not do)
            vllm_gpu_memory_utilization=0.6,
        ),
    ),
    "qwen2.5-vl-3b": Preset(
        model="Qwen/Qwen2.5-VL-3B-Instruct",  # [default] the 3B sibling of the paper's model
        grpo=dict(
            _GRPO,
            micro_batch=8,  # [default] DeepEyes' 4 per GPU for 7B, doubled for half the size
            # [default] ZeRO-2: 3B x 16 bytes of optimizer state and gradients sharded over
            # 8 GPUs is ~6 GB each; the bf16 weights (6 GB) fit unsharded
            zero_stage=2,
        ),
        agent=_AGENT,
        vllm=dict(_VLLM, vllm_gpu_memory_utilization=0.6),  # [default] as the 7B preset
    ),
}


def worst_case_tokens(agent: AgentConfig, preset: Preset, prompt_tokens: int) -> dict[str, int]:
    """The token budgets a preset must keep consistent, worst case.

    The agent ends an episode before a turn once ``len + max_new_tokens > max_total_tokens``
    (``agent.rollout.Agent.step``), so no trajectory is longer than ``max_total_tokens``
    and vLLM is started with ``max_model_len = max_total_tokens + max_new_tokens``
    (:func:`train.vllm_backend.make_vllm_generator`). Two things must then hold: that length within
    the model's positions, and room, after the whole image budget is spent (``max_images``
    images at ``max_pixels``, capped by ``max_image_tokens``), for one more full turn, so that
    an episode that zoomed to its budget can still answer.

    Args:
        agent: the preset's agent config (``max_pixels`` must be set).
        preset: the preset (patch and merge sizes, context).
        prompt_tokens: text tokens of the prompt and every observation (no image tokens).

    Returns:
        ``{"image_tokens", "answer_turn", "max_total_tokens", "engine_len", "context"}``:
        the image budget in tokens; ``prompt_tokens + image_tokens + max_new_tokens``, which
        must be <= ``max_total_tokens``; and ``max_total_tokens + max_new_tokens``, which must be
        <= ``context``.

    Raises:
        ValueError: ``agent.max_pixels`` is None (the processor's cap is unknown here).
    """
    if agent.max_pixels is None:
        raise ValueError("worst_case_tokens needs AgentConfig.max_pixels")
    per_image = agent.max_pixels // (preset.patch_size * preset.merge_size) ** 2
    images = agent.max_images * per_image
    if agent.max_image_tokens is not None:
        images = min(images, agent.max_image_tokens)
    return {
        "image_tokens": images,
        "answer_turn": prompt_tokens + images + agent.max_new_tokens,
        "max_total_tokens": agent.max_total_tokens,
        "engine_len": agent.max_total_tokens + agent.max_new_tokens,
        "context": preset.context,
    }


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def apply_preset(base: dict[str, Any], name: str, use_vllm: bool | None = None) -> dict[str, Any]:
    """A grid's base settings (``{"grpo": GRPOConfig, "agent": AgentConfig, ...}``, as in
    :data:`experiments.grids.GRIDS`) with preset ``name`` applied.

    Args:
        base: the grid's settings; not modified.
        name: a key of :data:`PRESETS`.
        use_vllm: apply the preset's vLLM settings (None: when :func:`vllm_available`).

    Returns:
        A new dict: ``grpo`` and ``agent`` replaced by validated configs; other keys as given.

    Raises:
        ValueError: unknown preset name, or a resulting config that fails validation.
    """
    preset = get_preset(name)
    vllm = vllm_available() if use_vllm is None else use_vllm
    grpo = {**preset.grpo, **(preset.vllm if vllm else {})}
    return {
        **base,
        "grpo": replace(base["grpo"], **grpo),
        "agent": replace(base["agent"], **preset.agent),
    }
