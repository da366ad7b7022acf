"""The config tree: one typed dataclass per concern, every ablation switch a field (docs/design.md decision 6).

After TRL's ``GRPOConfig``: each field documented once with its unit and source; impossible
combinations rejected in ``__post_init__`` with a message naming the field and value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.rollout import AgentConfig
from train.core_algos import LOSS_AGG, SCALE_REWARDS
from train.rewards import parse_reward

ENGINES = ("torch", "deepspeed")
ROLLOUT_SEEDING = ("batch", "group")
ROLLOUT_BACKENDS = ("hf", "vllm")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO optimisation, masks and reward (docs/method.md §3-5).

    Attributes:
        steps: policy-update steps (one rollout batch each); 0 evaluates the base model as is.
        prompts_per_step: prompts (GRPO groups) per step.
        group_size: G, trajectories sampled per prompt (docs/method.md default 8).
        mini_batches: optimizer steps per rollout batch; >1 makes later mini-batches
            off-policy, which is where the clip acts.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        max_grad_norm: gradient-norm clip (L2).
        clip_eps_low: lower clip ``1 - eps_low`` of the ratio (PPO, 0.2).
        clip_eps_high: upper clip ``1 + eps_high`` (clip-higher, DAPO; 0.28).
        beta: k3 KL coefficient to a frozen reference (0: no reference model is kept).
        scale_rewards: advantage scaling: ``group`` (GRPO), ``batch``, ``none`` (Dr. GRPO).
        loss_agg: ``token-mean`` or ``seq-mean-token-mean``.
        tis_cap: truncated importance-sampling cap C for the rollout-engine/trainer mismatch:
            each token's policy-gradient loss is weighted by ``min(exp(old_logp -
            rollout_logp), C)`` (Yao et al. 2025, "Your efficient RL framework secretly brings
            you off-policy RL training"; verl ``tis_imp_ratio_cap``, TRL
            ``vllm_importance_sampling_cap``, whose default is 2). 0: off.
        mask_tokens: level-1 mask: weight only policy-sampled tokens (off: every token after
            the prompt, environment text and tool images included).
        mask_trajectories: level-2 mask: zero weight for truncated, void-turn, failed-call and
            over-budget trajectories (``bad_image_tokens`` ones get zero weight either way).
        tool_gain: reward gain g for successful tool use (0 turns the gain off).
        reward_form: the reward (:mod:`train.rewards`): a named form, ``imagent`` (``acc * (1 +
            g * used) + 0.2 * fmt``) or ``deepeyes`` (``0.8 * acc + 0.2 * fmt + 1.2 * [used and
            acc]``), or weighted terms ``"acc:1.0,format:0.2,tool:0.5"`` (``module:function``
            for a user term of the trajectory).
        seed: seed of sampling, data order and initialisation of the trainer state.
        freeze_vision_tower: leave the vision tower (every parameter under ``.visual.``, the
            patch merger included) out of the update, as verl's
            ``actor.freeze_vision_tower``: RL trains only the language model.
        micro_batch: trajectories per (right-padded) forward/backward pass of the trainer;
            gradients accumulate over the micro-batches of a mini-batch, so this changes speed
            and memory, not the update (equal up to float rounding; tested).
        checkpoint_every: steps between crash-safe checkpoints (policy, optimizer, scheduler,
            RNG states, data cursor, metrics; :mod:`train.checkpoint`); the last step is always
            saved when > 0. 0: none. A rerun resumes from the newest valid checkpoint.
        engine: the update engine (:mod:`train.engine`): ``torch`` (AdamW in this process;
            gradients all-reduced under data parallelism) or ``deepspeed`` (DeepSpeed ZeRO with
            the same AdamW, schedule and clip; fp32 on CPU, bf16 on CUDA).
        zero_stage: DeepSpeed ZeRO stage, 2 (optimizer state and gradients partitioned over
            ranks) or 3 (parameters too); ``engine="deepspeed"`` only.
        gradient_checkpointing: recompute activations in the backward pass (transformers'
            ``gradient_checkpointing_enable``, non-reentrant): less memory, ~30% more time.
        rollout_seeding: sampling randomness of the rollouts. ``batch``: one torch stream
            seeded once with ``seed`` (under data parallelism each rank's stream is seeded
            from ``(seed, rank)``), all of a rank's prompts generated in one batch. ``group``:
            each prompt group is generated in its own batch from a stream seeded with
            ``(seed, step, group index)``, so the rollouts do not depend on how many processes
            share the step (an N-process run samples exactly what a 1-process run samples),
            at the cost of smaller generation batches.
        rollout_backend: the rollout engine: ``hf`` (transformers ``generate`` on the trained
            model, CPU or GPU) or ``vllm`` (:mod:`train.vllm_backend`, GPU only: a colocated
            vLLM engine per rank, put to sleep during the update and synced after it).
        vllm_gpu_memory_utilization: share (0, 1] of the GPU's memory vLLM may take for its
            weights, activations and KV cache; the trainer shares the GPU (TRL's colocate
            mode suggests ~0.3).
        vllm_enable_sleep_mode: free vLLM's GPU memory during the update (``LLM.sleep(level=1)``:
            weights offloaded to CPU, KV cache discarded) and wake it for the next rollout.
        vllm_tensor_parallel_size: GPUs one vLLM engine is sharded over (1: an engine per rank).
    """

    steps: int = 20
    prompts_per_step: int = 4
    group_size: int = 4
    mini_batches: int = 2
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 2
    max_grad_norm: float = 1.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    beta: float = 0.0
    scale_rewards: str = "group"
    loss_agg: str = "token-mean"
    tis_cap: float = 0.0
    mask_tokens: bool = True
    mask_trajectories: bool = True
    tool_gain: float = 0.5
    reward_form: str = "imagent"
    seed: int = 0
    freeze_vision_tower: bool = False
    micro_batch: int = 8
    checkpoint_every: int = 10
    engine: str = "torch"
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    rollout_seeding: str = "batch"
    rollout_backend: str = "hf"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_enable_sleep_mode: bool = True
    vllm_tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(
                f"GRPOConfig.scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}"
            )
        if self.loss_agg not in LOSS_AGG:
            raise ValueError(
                f"GRPOConfig.loss_agg must be one of {LOSS_AGG}, got {self.loss_agg!r}"
            )
        try:
            parse_reward(self.reward_form, self.tool_gain)
        except ValueError as err:
            raise ValueError(f"GRPOConfig.reward_form={self.reward_form!r}: {err}") from None
        if self.engine not in ENGINES:
            raise ValueError(f"GRPOConfig.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.zero_stage not in (2, 3):
            raise ValueError(f"GRPOConfig.zero_stage must be 2 or 3, got {self.zero_stage}")
        if self.rollout_seeding not in ROLLOUT_SEEDING:
            raise ValueError(
                f"GRPOConfig.rollout_seeding must be one of {ROLLOUT_SEEDING}, "
                f"got {self.rollout_seeding!r}"
            )
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(
                f"GRPOConfig.rollout_backend must be one of {ROLLOUT_BACKENDS}, "
                f"got {self.rollout_backend!r}"
            )
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                "GRPOConfig.vllm_gpu_memory_utilization must be in (0, 1], "
                f"got {self.vllm_gpu_memory_utilization}"
            )
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(
                "GRPOConfig.vllm_tensor_parallel_size must be >= 1, "
                f"got {self.vllm_tensor_parallel_size}"
            )
        if self.checkpoint_every < 0:
            raise ValueError(
                f"GRPOConfig.checkpoint_every must be >= 0, got {self.checkpoint_every}"
            )
        if self.steps < 0:
            raise ValueError(f"GRPOConfig.steps must be >= 0, got {self.steps}")
        for name in ("prompts_per_step", "group_size", "mini_batches", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(
                f"GRPOConfig.group_size must be >= 2 for group advantages, got {self.group_size}"
            )
        if self.mini_batches > self.prompts_per_step * self.group_size:
            raise ValueError(
                f"GRPOConfig.mini_batches={self.mini_batches} exceeds the batch of "
                f"{self.prompts_per_step * self.group_size} trajectories"
            )
        if self.lr <= 0:
            raise ValueError(f"GRPOConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.clip_eps_low < 1 or self.clip_eps_high < 0:
            raise ValueError(
                f"GRPOConfig clip range invalid: low={self.clip_eps_low}, high={self.clip_eps_high}"
            )
        if self.beta < 0 or self.tis_cap < 0 or self.tool_gain < 0:
            raise ValueError("GRPOConfig.beta, tis_cap and tool_gain must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    """The offline multi-image task set (docs/method.md §7).

    Attributes:
        families: task families (empty: all).
        n_images: inclusive range of images per question.
        image_size: ``(width, height)`` in pixels of each generated image.
        difficulty: 0 (large, high-contrast targets) .. 1 (small, blended).
        train_seed: seed of the training stream (sample i of step s is index s*P + i).
        test_seed: seed of the held-out split (test backgrounds are never used in training).
        n_test: held-out questions evaluated per arm (generated ones: ``eval_data`` sources
            in files are evaluated whole).
        train_data: training sources, one spec each (``[FORMAT:]PATH[:WEIGHT]`` or
            ``generator[:WEIGHT]``, :mod:`agent.data.sources`), mixed by weight and shuffled
            with ``train_seed``; empty: the generator alone (sample i of step s is index s*P + i).
        eval_data: held-out sources evaluated after training, concatenated in order
            (``generator`` = ``n_test`` generated test questions); empty: the generator's.
    """

    families: tuple[str, ...] = ()
    n_images: tuple[int, int] = (2, 4)
    image_size: tuple[int, int] = (224, 224)
    difficulty: float = 0.5
    train_seed: int = 0
    test_seed: int = 1
    n_test: int = 40
    train_data: tuple[str, ...] = ()
    eval_data: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("train_data", "eval_data"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class MeasureConfig:
    """Attention measurement by replay after training (docs/method.md §6).

    Trajectories to replay are sampled afresh on held-out questions at ``temperature``
    (greedy evaluation rarely calls tools), and those with successful tool calls are replayed
    first, so that attention before and after tool calls can be measured whenever the policy
    makes any.

    Attributes:
        n_trajectories: held-out trajectories replayed per arm (0: skip).
        n_candidates: held-out episodes sampled to choose them from.
        temperature: sampling temperature of those episodes.
        chunk: query rows per chunk of the streaming reduction (None: 2 MiB of scores).
        window: tokens before/after a tool call in the before/after summary.
        n_single: single-image held-out questions (colour, shape or digit of one object on a
            test-split photograph, :func:`agent.data.pretrain.pretrain_example`) also sampled
            and replayed, so that the attention table compares single- with multi-image
            reasoning (IMAgent Figure 1); 0: multi-image episodes only.
    """

    n_trajectories: int = 8
    n_candidates: int = 32
    temperature: float = 1.0
    chunk: int | None = None
    window: int = 8
    n_single: int = 4


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation during training (``eval/*`` and ``eval_sampled/*`` metric keys).

    The first ``n`` questions of the held-out split (``DataConfig.test_seed``, the same ones
    the arm's final evaluation starts with) are answered greedily after the update of every
    ``every``-th step (steps ``every - 1``, ``2 * every - 1``, ...), through
    :func:`agent.evaluation.evaluate`; with ``n_sampled`` > 0 also ``n_sampled`` episodes per
    question at ``temperature``. Sampling runs on a forked torch stream, so the training
    rollouts are the same with evaluation on or off.

    Attributes:
        every: steps between evaluations; 0: off (no ``eval/*`` keys in the rows).
        n: held-out questions per evaluation.
        n_sampled: sampled episodes per question (0: greedy only).
        temperature: sampling temperature of those episodes.
    """

    every: int = 0
    n: int = 16
    n_sampled: int = 0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in ("every", "n_sampled"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.n < 1:
            raise ValueError(f"EvalConfig.n must be >= 1, got {self.n}")
        if self.n_sampled and self.temperature <= 0:
            raise ValueError(
                f"EvalConfig.temperature must be > 0 with n_sampled > 0, got {self.temperature}"
            )

    def due(self, step: int) -> bool:
        """Whether the rows of ``step`` (0-based) carry an evaluation."""
        return self.every > 0 and (step + 1) % self.every == 0


@dataclass(frozen=True)
class ArmConfig:
    """One arm of an ablation grid: model, agent, GRPO, data and measurement.

    Attributes:
        name: arm name (directory name in the run directory).
        model: checkpoint directory (or hub id); ``""`` builds a random-weight tiny Qwen2.5-VL.
        agent: agent behaviour, including the ``tools`` switch.
        grpo: optimisation, the mask switches and the tool gain.
        data: task generator settings.
        measure: attention replay settings.
        eval_temperature: sampling temperature for held-out evaluation (0 = greedy).
        eval: held-out evaluation during training (off by default).
        report_to: experiment tracker the per-step rows, the config and sample rollouts are
            also logged to (TRL's ``report_to``): ``none``, ``tensorboard``, ``wandb``
            (offline) or ``mlflow`` (file store); :mod:`train.tracking`. It changes no
            result, so a checkpoint written under another value still resumes.
    """

    name: str = "full"
    model: str = ""
    agent: AgentConfig = field(default_factory=AgentConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    eval_temperature: float = 0.0
    eval: EvalConfig = field(default_factory=EvalConfig)
    report_to: str = "none"

    def __post_init__(self) -> None:
        if self.report_to not in REPORT_TO:
            raise ValueError(
                f"ArmConfig.report_to must be one of {REPORT_TO}, got {self.report_to!r}"
            )
