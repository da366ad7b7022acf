"""vLLM rollout backend for Qwen2.5-VL, colocated with the trainer (docs/design.md: GPU path).

:class:`VLLMGenerator` implements :class:`agent.rollout.Generator` on a vLLM ``LLM`` in the
trainer's own process, as TRL's ``vllm_mode="colocate"`` does (``trl/generation/
vllm_generation.py``): token ids in, sampled token ids and their log-probs out, so multi-turn
episodes are built by appending ids (docs/design.md decision 2), never by re-tokenising text.

Two tracks (docs/design.md decision 2). The trainer track (``Trajectory.token_ids``) holds every
image as ``<|vision_start|>`` + ``<|image_pad|>`` x (t*h*w / merge**2) + ``<|vision_end|>``;
vLLM takes one ``<|image_pad|>`` per image plus the image itself and expands the pad with its
own copy of the image processor. :func:`collapse_image_pads` / :func:`expand_image_pads` convert
between the two and check every image's token count on the way.

Per GRPO step (:mod:`train.loop`): ``generate`` (each turn of the rollout; wakes the engine
first) -> :meth:`VLLMGenerator.sleep` (weights offloaded to CPU, KV cache dropped, so the
old-log-prob pass and the update get the GPU) -> optimizer steps -> :meth:`VLLMGenerator.
sync_weights` (every parameter of the trained module, gathered per module under ZeRO-3, loaded
with the model's own ``load_weights``, which takes transformers' parameter names and maps them:
vLLM's ``Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper``). The sync follows the step's
last optimizer step: with ``mini_batches > 1`` the intermediate weights are never sampled from,
so syncing after each of those steps too would load weights that are overwritten unused.

Sampling matches :class:`agent.rollout.HFGenerator`: the full distribution (``top_k=0``,
``top_p=1``, no repetition penalty, the checkpoint's ``generation_config`` ignored), the four
vision special tokens banned (``bad_words``; docs/method.md §2), stop on ``<|im_end|>`` only, and the
sampled token's log-prob after those constraints and the temperature
(``logprobs_mode="processed_logprobs"``), which is what HF's ``output_scores`` give. The
remaining engine/trainer gap (bf16 kernels, image preprocessing) is measured as
``rollout/logprob_gap`` and corrected by truncated importance sampling (``GRPOConfig.tis_cap``).

Written against vLLM 0.33 (the newest release when written): ``vllm.LLM`` (``generate``,
``sleep``, ``wake_up(tags=...)``, ``apply_model``, ``reset_prefix_cache``),
``vllm.SamplingParams`` and the ``TokensPrompt`` dict form. ``vllm`` is imported lazily, only by
:func:`make_vllm_generator`: CPU installs never need it (vLLM's Qwen-VL cannot run on CPU,
docs/gotchas.md). Everything but the engine itself is tested on CPU with a stand-in ``LLM``
(tests/train/test_vllm_backend.py); the real-engine checks are ``gpu``-marked
(tests/train/test_vllm_gpu.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from agent.modeling import VISION_SPECIAL_TOKENS
from agent.rollout import AgentConfig, GenRequest, GenResult
from train import dist

VLLM_MISSING = (
    "the vLLM rollout backend needs vllm and a CUDA GPU: `pip install vllm` on a GPU machine "
    "(vLLM's Qwen2.5-VL does not run on CPU); or set GRPOConfig.rollout_backend='hf'"
)

SLEEP_TAGS = ("weights", "kv_cache")
"""vLLM's sleep-mode memory tags, woken in this order (weights before the KV cache)."""


def require_vllm():
    """Import and return the ``vllm`` module.

    Raises:
        ImportError: vllm is not installed; the message says what to install and where.
    """
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(VLLM_MISSING) from exc
    return vllm


def image_token_counts(image_grid_thw: torch.Tensor | None, merge_size: int) -> list[int]:
    """Image tokens of each image in the trainer track: ``t*h*w // merge_size**2``.

    Args:
        image_grid_thw: ``[images, 3]`` patch grids (None: no images).
        merge_size: the image processor's spatial merge factor.

    Returns:
        One count per image, in order.
    """
    if image_grid_thw is None:
        return []
    return [int(t * h * w) // (merge_size * merge_size) for t, h, w in image_grid_thw.tolist()]


def collapse_image_pads(
    token_ids: Sequence[int], image_token_id: int, tokens_per_image: Sequence[int]
) -> list[int]:
    """Trainer track -> vLLM track: each image's run of ``<|image_pad|>`` becomes one pad.

    Args:
        token_ids: ``[pos]`` trainer-track ids.
        image_token_id: the ``<|image_pad|>`` id.
        tokens_per_image: expected run length of each image, in order
            (:func:`image_token_counts`).

    Returns:
        The ids with one pad per image (length ``pos - sum(tokens_per_image) + images``).

    Raises:
        ValueError: the number of pad runs or a run's length differs from ``tokens_per_image``
            (the message gives both), e.g. ids and images of different trajectories.
    """
    out: list[int] = []
    runs: list[int] = []
    for tok in token_ids:
        if tok == image_token_id and out and out[-1] == image_token_id:
            runs[-1] += 1
            continue
        if tok == image_token_id:
            runs.append(1)
        out.append(tok)
    if runs != list(tokens_per_image):
        raise ValueError(
            f"image pad runs {runs} in the token ids do not match the images' token counts "
            f"{list(tokens_per_image)} (image_grid_thw / merge_size**2)"
        )
    return out


def expand_image_pads(
    token_ids: Sequence[int], image_token_id: int, tokens_per_image: Sequence[int]
) -> list[int]:
    """vLLM track -> trainer track: the k-th ``<|image_pad|>`` becomes ``tokens_per_image[k]``.

    The inverse of :func:`collapse_image_pads` (what vLLM's multimodal processor does to a
    prompt).

    Args:
        token_ids: ``[pos]`` ids with one pad per image.
        image_token_id: the ``<|image_pad|>`` id.
        tokens_per_image: tokens of each image, in order.

    Raises:
        ValueError: the number of pads differs from ``len(tokens_per_image)``, or two pads are
            adjacent (then the ids are not a one-pad-per-image track).
    """
    pads = [i for i, tok in enumerate(token_ids) if tok == image_token_id]
    if len(pads) != len(tokens_per_image) or any(b == a + 1 for a, b in zip(pads, pads[1:])):
        raise ValueError(
            f"expected {len(tokens_per_image)} separate image pads (one per image), found "
            f"{len(pads)} at positions {pads[:8]}"
        )
    out: list[int] = []
    k = 0
    for tok in token_ids:
        if tok == image_token_id:
            out.extend([image_token_id] * int(tokens_per_image[k]))
            k += 1
        else:
            out.append(tok)
    return out


def limit_mm_images(agent: AgentConfig, max_input_images: int) -> int:
    """vLLM's ``limit_mm_per_prompt["image"]``: the most images any generation request holds.

    A request holds the input images plus what tool calls of earlier turns returned; a call
    returns at most ``max_input_images`` images (``reflect`` on all of them), calls happen on
    at most ``max_turns - 1`` turns before the last request, and the agent's image budget
    ``max_images`` stops tool images beyond it (:meth:`agent.rollout.Agent._tool_turn`):
    ``max(n_in, min(max_images, n_in * max_turns))``.

    Args:
        agent: the agent config (``max_turns``, ``max_images``).
        max_input_images: most input images per question (``DataConfig.n_images[1]``).

    Raises:
        ValueError: ``max_input_images < 1``.
    """
    if max_input_images < 1:
        raise ValueError(f"max_input_images must be >= 1, got {max_input_images}")
    with_tools = max_input_images * agent.max_turns if agent.tool_names else max_input_images
    return max(max_input_images, min(agent.max_images, with_tools))


def _gathered(params: list[torch.nn.Parameter]):
    """A context that gathers ZeRO-3-partitioned ``params`` (DeepSpeed marks them with
    ``ds_id``) on every rank (``deepspeed.zero.GatheredParameters``, read-only); else a no-op."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_parameters(model: torch.nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Every parameter of ``model`` with its full value, one module's parameters at a time.

    Under DeepSpeed ZeRO-3 each module's partitions are gathered while its batch is being
    used (TRL ``sync_weights`` gathers per parameter; per module is fewer collectives at the
    memory of one module): consume a batch before drawing the next, since the tensors are
    re-partitioned afterwards. A collective under ZeRO-3: every rank must iterate it fully.
    Tied parameters are yielded once, under their first name (as ``named_parameters``).

    Yields:
        ``[(name, tensor)]`` of one module (transformers' parameter names, e.g.
        ``model.language_model.layers.0.self_attn.q_proj.weight``), detached.
    """
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        with _gathered([p for _, p in own]):
            yield [(f"{prefix}.{n}" if prefix else n, p.detach()) for n, p in own]


def _sampled_logprob(step: Any, token_id: int) -> float:
    """The log-prob of ``token_id`` in one step of vLLM's ``CompletionOutput.logprobs`` (a
    ``{token_id: Logprob}`` dict; with ``logprobs=0`` it holds the sampled token only)."""
    try:
        return float(step[token_id].logprob)
    except (KeyError, TypeError) as exc:
        raise RuntimeError(
            f"vLLM returned no log-prob for the sampled token {token_id}; "
            "SamplingParams(logprobs=0) must be set"
        ) from exc


class VLLMGenerator:
    """A colocated vLLM engine behind :class:`agent.rollout.Generator`.

    Args:
        llm: a ``vllm.LLM`` built with ``logprobs_mode="processed_logprobs"`` (see
            :func:`make_vllm_generator`), or a stand-in with the same methods in tests.
        sampling_params: ``vllm.SamplingParams`` (a stand-in in tests).
        image_token_id: ``<|image_pad|>`` id.
        eos_token_id: the turn's end token (``<|im_end|>``); the only stop token.
        merge_size: the image processor's ``merge_size`` (image tokens per grid cell).
        bad_words: texts never to sample (the vision special tokens, each one token).
        enable_sleep_mode: the engine was built with ``enable_sleep_mode=True``;
            :meth:`sleep` is a no-op otherwise.

    Attributes:
        syncs: weight syncs done (:meth:`sync_weights`).
    """

    def __init__(
        self,
        llm: Any,
        sampling_params: Any,
        *,
        image_token_id: int,
        eos_token_id: int,
        merge_size: int,
        bad_words: Sequence[str] = VISION_SPECIAL_TOKENS,
        enable_sleep_mode: bool = True,
    ):
        self.llm = llm
        self.sampling_params = sampling_params
        self.image_token_id = int(image_token_id)
        self.eos = int(eos_token_id)
        self.merge_size = int(merge_size)
        self.bad_words = list(bad_words)
        self.enable_sleep_mode = enable_sleep_mode
        self.asleep: set[str] = set()
        self.syncs = 0

    @classmethod
    def for_policy(cls, llm: Any, sampling_params: Any, policy, **kwargs) -> VLLMGenerator:
        """A generator with ``policy``'s special-token ids and merge size (``policy``: an
        :class:`agent.modeling.Policy`); ``kwargs`` go to the constructor."""
        tok = policy.tokenizer
        return cls(
            llm,
            sampling_params,
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            merge_size=int(policy.image_processor.merge_size),
            **kwargs,
        )

    def prompt(self, request: GenRequest) -> dict[str, Any]:
        """vLLM's ``TokensPrompt`` for ``request``: one pad per image, the images in order.

        Raises:
            ValueError: the request has image grids but no images (or a different number), or
                its ids do not hold the images' token counts.
        """
        counts = image_token_counts(request.image_grid_thw, self.merge_size)
        images = list(request.images or [])
        if len(images) != len(counts):
            raise ValueError(
                f"GenRequest has {len(counts)} image grids but {len(images)} images; the vLLM "
                "backend needs GenRequest.images (Agent.request fills them)"
            )
        prompt: dict[str, Any] = {
            "prompt_token_ids": collapse_image_pads(request.token_ids, self.image_token_id, counts)
        }
        if images:
            prompt["multi_modal_data"] = {"image": images}
        return prompt

    def params(self, max_new_tokens: int, temperature: float, seed: int):
        """``SamplingParams`` of one request (see the module docstring for why each is set)."""
        return self.sampling_params(
            n=1,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            max_tokens=max_new_tokens,
            stop_token_ids=[self.eos],
            ignore_eos=True,  # stop on <|im_end|> only, not on generation_config's eos ids
            bad_words=self.bad_words,
            logprobs=0,  # the sampled token's log-prob only
            seed=seed,
            detokenize=False,  # the agent decodes the ids itself
        )

    def generate(
        self, requests: list[GenRequest], max_new_tokens: int, temperature: float
    ) -> list[GenResult]:
        """Continue every request by one assistant turn (:class:`agent.rollout.Generator`).

        Wakes the engine if it sleeps. Each request gets a sampling seed drawn from torch's
        global generator, so seeding torch (the loop's ``rollout_seeding``) fixes the rollout.

        Returns:
            One :class:`GenResult` per request, in order: new ids (ending with ``<|im_end|>``
            when ``finished``), their log-probs (nats), ``finished``.
        """
        if not requests:
            return []
        self.wake_up()
        seeds = torch.randint(0, 2**31 - 1, (len(requests),)).tolist()
        prompts = [self.prompt(r) for r in requests]
        params = [self.params(max_new_tokens, temperature, s) for s in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        return [self._result(o) for o in outputs]

    def _result(self, output: Any) -> GenResult:
        """A :class:`GenResult` from one ``RequestOutput`` (``outputs[0]``: ``token_ids``,
        ``logprobs``)."""
        completion = output.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        if completion.logprobs is None or len(completion.logprobs) != len(ids):
            raise RuntimeError("vLLM returned no per-token log-probs (SamplingParams.logprobs)")
        lps = [_sampled_logprob(step, t) for step, t in zip(completion.logprobs, ids)]
        return GenResult(ids, lps, bool(ids) and ids[-1] == self.eos)

    def sleep(self) -> None:
        """Free the engine's GPU memory for the update: ``LLM.sleep(level=1)`` offloads the
        weights to CPU and drops the KV cache. Level 1 rather than 2 (weights discarded): a
        level-2 wake serves uninitialised weights unless they are reloaded first (vLLM issue
        #29341), a silent failure; level 1 costs one CPU copy of the weights. No-op without
        sleep mode or when already asleep."""
        if not self.enable_sleep_mode or self.asleep:
            return
        self.llm.sleep(level=1)
        self.asleep = set(SLEEP_TAGS)

    def wake_up(self, tags: Sequence[str] = SLEEP_TAGS) -> None:
        """Wake the sleeping parts among ``tags`` (``weights``, ``kv_cache``); no-op if none.

        Raises:
            ValueError: an unknown tag.
        """
        unknown = set(tags) - set(SLEEP_TAGS)
        if unknown:
            raise ValueError(f"unknown vLLM sleep tags {sorted(unknown)}; known: {SLEEP_TAGS}")
        todo = [t for t in SLEEP_TAGS if t in tags and t in self.asleep]
        if not todo:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainer's freed blocks back to the driver first
        self.llm.wake_up(tags=todo)
        self.asleep -= set(todo)

    def sync_weights(self, model: torch.nn.Module) -> int:
        """Load every parameter of ``model`` (the trained module) into the engine.

        Wakes the weights only (the KV cache stays asleep until the next rollout; loading into
        sleeping weights would write to unmapped memory, TRL issue #5142), loads one module's
        parameters at a time with the engine model's ``load_weights`` (transformers' names;
        ZeRO-3 partitions gathered by :func:`full_parameters`, so a collective under ZeRO-3),
        then resets the prefix cache, whose entries were computed by the old weights.

        Args:
            model: the module being trained (``engine.module``), a plain, ZeRO-2 or ZeRO-3
                module.

        Returns:
            The number of parameter tensors loaded.
        """
        self.wake_up(tags=("weights",))
        n = 0
        for batch in full_parameters(model):
            self._load(batch)
            n += len(batch)
        self.llm.reset_prefix_cache()
        self.syncs += 1
        return n

    def _load(self, batch: list[tuple[str, torch.Tensor]]) -> None:
        """``model.load_weights(batch)`` inside the engine's worker (``LLM.apply_model``; runs
        in this process with the ``external_launcher`` executor, so the tensors are not
        copied through a pipe)."""
        self.llm.apply_model(lambda model: model.load_weights(batch))


def make_vllm_generator(policy, cfg, **llm_kwargs) -> VLLMGenerator:
    """Build a colocated vLLM engine for ``policy`` and wrap it in a :class:`VLLMGenerator`.

    ``LLM(model=policy.path, ...)`` with: ``distributed_executor_backend="external_launcher"``
    (the engine runs inside this training process, one per rank, as in TRL's colocate mode),
    ``limit_mm_per_prompt={"image": limit_mm_images(...), "video": 0}``,
    ``max_model_len = max_total_tokens + max_new_tokens``, ``enable_sleep_mode``,
    ``gpu_memory_utilization``, ``tensor_parallel_size`` from ``cfg.grpo``, bf16, the
    checkpoint's generation config ignored (``generation_config="vllm"``) and
    ``logprobs_mode="processed_logprobs"``, and ``mm_processor_kwargs`` with the agent's
    ``min_pixels`` / ``max_pixels`` when it overrides the processor's. The engine loads the checkpoint directory's
    weights; call :meth:`VLLMGenerator.sync_weights` before the first rollout when the
    in-memory policy differs (the loop always does).

    Args:
        policy: an :class:`agent.modeling.Policy` loaded from a directory (``policy.path``).
        cfg: the :class:`train.config.ArmConfig` (``agent``, ``data.n_images``, ``grpo``).
        llm_kwargs: further ``vllm.LLM`` arguments (override the defaults above).

    Raises:
        ImportError: vllm is not installed (:data:`VLLM_MISSING`).
        NotImplementedError: ``vllm_tensor_parallel_size > 1`` (an engine sharded over several
            training ranks needs TRL's per-TP-group prompt gathering, not written yet).
    """
    vllm = require_vllm()
    g = cfg.grpo
    if g.vllm_tensor_parallel_size != 1:
        raise NotImplementedError(
            f"GRPOConfig.vllm_tensor_parallel_size={g.vllm_tensor_parallel_size}: only 1 (one "
            "vLLM engine per training rank) is implemented"
        )
    from train.engine import _world_of_one_env

    _world_of_one_env()  # external_launcher reads the torch.distributed environment
    kwargs: dict[str, Any] = dict(
        model=policy.path,
        dtype="bfloat16",
        tensor_parallel_size=g.vllm_tensor_parallel_size,
        gpu_memory_utilization=g.vllm_gpu_memory_utilization,
        enable_sleep_mode=g.vllm_enable_sleep_mode,
        distributed_executor_backend="external_launcher",
        limit_mm_per_prompt={"image": limit_mm_images(cfg.agent, cfg.data.n_images[1]), "video": 0},
        max_model_len=cfg.agent.max_total_tokens + cfg.agent.max_new_tokens,
        logprobs_mode="processed_logprobs",
        generation_config="vllm",
        seed=g.seed + dist.rank(),
    )
    pixels = {"min_pixels": cfg.agent.min_pixels, "max_pixels": cfg.agent.max_pixels}
    if any(v is not None for v in pixels.values()):  # vLLM's processor must resize as the agent
        kwargs["mm_processor_kwargs"] = {k: v for k, v in pixels.items() if v is not None}
    kwargs.update(llm_kwargs)
    llm = vllm.LLM(**kwargs)
    return VLLMGenerator.for_policy(
        llm, vllm.SamplingParams, policy, enable_sleep_mode=kwargs["enable_sleep_mode"]
    )


__all__ = [
    "VLLMGenerator",
    "collapse_image_pads",
    "expand_image_pads",
    "full_parameters",
    "image_token_counts",
    "limit_mm_images",
    "make_vllm_generator",
    "require_vllm",
]
