"""Multi-turn agent rollouts behind a generator interface (docs/method.md §2; docs/design.md data flow).

``rollout`` steps many episodes in lock-step, one assistant turn at a time, so a backend can
batch them: ``HFGenerator`` (transformers ``generate``, CPU) here, a vLLM backend on GPU
(``train.vllm_backend.VLLMGenerator``), both implementing :class:`Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, get_args

import torch

from agent.prompting import PromptBuilder
from agent.tools import ANSWER_RE, TOOL_CALL_RE, CropPolicy, ImageFrame, resolve_tools, run_tool
from agent.trajectory import ImageRecord, Trajectory, TurnEvent
from agent.verifiers import verify_trajectory


@dataclass(frozen=True)
class AgentConfig:
    """How the agent runs an episode (docs/method.md §2).

    Attributes:
        tools: ablation switch: ``"none"`` (no tools advertised; single turn), ``"both"``
            (``reflect`` and ``confirm``), or a comma-separated list of registered tool names
            and ``module:Class`` user tools (``"reflect,confirm,mypkg.mod:Rotate"``;
            :func:`agent.tools.resolve_tools`, which imports and registers them).
        max_turns: assistant turns per episode (paper-free default 5).
        max_new_tokens: tokens the policy may sample per turn.
        max_total_tokens: context budget of the whole sequence, in tokens.
        max_images: image budget: input plus tool-returned images per episode.
        temperature: sampling temperature (0 = greedy).
        max_pixels: pixel cap (h*w) per image, overriding the image processor's (None: the
            processor's); bounds the tokens of every image to ``max_pixels / (patch*merge)**2``.
        min_pixels: pixel floor per image, overriding the processor's (None: the processor's).
        crop_policy: how ``confirm`` sizes its crop: ``"fill"`` zooms it to
            ``crop_max_pixels``; ``"native"`` keeps the original pixels (boxes under one
            merged patch padded to it) and shrinks only crops above ``crop_max_pixels``.
        crop_max_pixels: pixel budget of a ``confirm`` crop (None: the model frame's
            ``max_pixels``).
        max_image_tokens: image-token budget of a trajectory, input images included (None: no
            budget beyond ``max_images``); a tool call that would exceed it returns an error
            observation instead of its images and ends the episode flagged ``over_budget``.
    """

    tools: str = "both"
    max_turns: int = 5
    max_new_tokens: int = 48
    max_total_tokens: int = 4096
    max_images: int = 12
    temperature: float = 1.0
    max_pixels: int | None = None
    min_pixels: int | None = None
    crop_policy: CropPolicy = "fill"
    crop_max_pixels: int | None = None
    max_image_tokens: int | None = None

    def __post_init__(self) -> None:
        try:
            resolve_tools(self.tools)
        except ValueError as exc:
            raise ValueError(f"AgentConfig.tools={self.tools!r}: {exc}") from None
        for name in ("max_turns", "max_new_tokens", "max_total_tokens", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"AgentConfig.temperature must be >= 0, got {self.temperature}")
        for name in ("max_pixels", "min_pixels", "crop_max_pixels", "max_image_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"AgentConfig.{name} must be >= 1 or None, got {getattr(self, name)}"
                )
        if self.crop_policy not in get_args(CropPolicy):
            raise ValueError(
                f"AgentConfig.crop_policy must be one of {get_args(CropPolicy)}, got {self.crop_policy!r}"
            )
        if self.max_pixels and self.min_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"AgentConfig.min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}"
            )

    @property
    def tool_names(self) -> tuple[str, ...]:
        """The advertised tools' registered names, in prompt order."""
        return resolve_tools(self.tools)

    def pixel_overrides(self) -> dict:
        """The image processor's ``size`` override (``shortest_edge`` = min, ``longest_edge`` =
        max pixels) for the fields set, ``{}`` when both are None."""
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        return {k: v for k, v in size.items() if v is not None}


@dataclass
class GenRequest:
    """One turn to generate: the full sequence so far (trainer track) and its images.

    Attributes:
        token_ids: ``[pos]`` the sequence so far, each image's pad expanded (trainer track).
        pixel_values: ``[patches, dim]`` processor output of every image, in order (HF backend).
        image_grid_thw: ``[images, 3]`` patch grid of every image.
        images: the RGB images themselves, in order (backends that run their own image
            processor, e.g. vLLM, take these with one pad per image).
    """

    token_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    images: list | None = None


@dataclass
class GenResult:
    """Sampled continuation: ids, their log-probs (nats) and whether the end token was reached."""

    token_ids: list[int]
    log_probs: list[float]
    finished: bool


class Generator(Protocol):
    """A rollout engine: continues each request by one assistant turn."""

    def generate(
        self, requests: list[GenRequest], max_new_tokens: int, temperature: float
    ) -> list[GenResult]: ...


class HFGenerator:
    """transformers ``generate`` backend (CPU or GPU), up to ``batch_size`` sequences per call.

    Requests are left-padded into batches (Qwen2.5-VL's rope index skips padding through the
    attention mask); ``batch_size=1`` runs one unpadded sequence per call. Padding changes
    floating-point sums, so batched and single-sequence log-probs agree to about 1e-5 nats, not
    bit for bit; the trainer recomputes log-probs anyway (truncated IS corrects the gap).

    The four vision special tokens are suppressed at sampling time (docs/gotchas.md: a young policy
    samples ``<|image_pad|>`` and the next forward fails). Sampling is from the full
    distribution (``top_k=0``, ``top_p=1``) so that trainer log-probs match rollout log-probs.

    Args:
        model: a Qwen2-VL/Qwen2.5-VL ``ForConditionalGeneration``.
        eos_token_id: the turn's end token (``<|im_end|>``).
        pad_token_id: padding id.
        suppress_ids: token ids never to sample.
        image_token_id: ``<|image_pad|>`` id (for ``mm_token_type_ids``).
        batch_size: most sequences per ``generate`` call.
    """

    def __init__(
        self,
        model,
        eos_token_id: int,
        pad_token_id: int,
        suppress_ids: list[int],
        image_token_id: int,
        batch_size: int = 32,
    ):
        self.model = model
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.suppress = list(suppress_ids)
        self.image_token_id = image_token_id
        self.batch_size = max(1, int(batch_size))

    @torch.no_grad()
    def generate(
        self, requests: list[GenRequest], max_new_tokens: int, temperature: float
    ) -> list[GenResult]:
        out: list[GenResult] = []
        for i in range(0, len(requests), self.batch_size):
            out += self._batch(requests[i : i + self.batch_size], max_new_tokens, temperature)
        return out

    def _batch(
        self, reqs: list[GenRequest], max_new_tokens: int, temperature: float
    ) -> list[GenResult]:
        width = max(len(r.token_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(reqs):  # left padding: every row ends at the same position
            ids[i, width - len(r.token_ids) :] = torch.tensor(r.token_ids, dtype=torch.long)
            attention[i, width - len(r.token_ids) :] = 1
        kwargs = dict(
            input_ids=ids,
            attention_mask=attention,
            mm_token_type_ids=((ids == self.image_token_id) & (attention > 0)).to(torch.int32),
        )
        with_images = [r for r in reqs if r.pixel_values is not None]
        if with_images:
            kwargs.update(
                pixel_values=torch.cat([r.pixel_values for r in with_images]),
                image_grid_thw=torch.cat([r.image_grid_thw for r in with_images]),
            )
        device = next(self.model.parameters()).device  # requests are built on the CPU
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        sample = temperature > 0
        out = self.model.generate(
            **kwargs,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=0 if sample else None,
            top_p=1.0 if sample else None,
            repetition_penalty=1.0,  # a checkpoint's own (Qwen2.5-VL-Instruct: 1.05) would skew
            suppress_tokens=self.suppress,  # the rollout log-probs away from the trainer's
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            output_scores=True,
            return_dict_in_generate=True,
        )
        steps = torch.stack([torch.log_softmax(sc.float(), dim=-1) for sc in out.scores], 1)
        results = []
        for i in range(len(reqs)):
            new = out.sequences[i, width:].tolist()
            if self.eos in new:  # rows that ended early are padded after their end token
                new = new[: new.index(self.eos) + 1]
            at = torch.tensor(new, dtype=torch.long, device=steps.device)
            lp = steps[i, torch.arange(len(new), device=steps.device), at]
            results.append(GenResult(new, lp.tolist(), bool(new) and new[-1] == self.eos))
        return results


class _Episode:
    """Mutable state of one running episode."""

    def __init__(self, traj: Trajectory, inputs: list, done: bool = False):
        self.traj = traj
        self.inputs = inputs  # input PIL images, 1-based in tool calls
        self.done = done


class Agent:
    """Runs episodes of the reflect/confirm agent for one policy.

    Args:
        tokenizer: the policy's tokenizer.
        image_processor: the policy's Qwen2-VL image processor.
        config: :class:`AgentConfig`.
    """

    def __init__(self, tokenizer, image_processor, config: AgentConfig):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompts = PromptBuilder(tokenizer, config.tool_names)
        frame = ImageFrame.from_processor(image_processor)
        size = {"shortest_edge": frame.min_pixels, "longest_edge": frame.max_pixels}
        size |= config.pixel_overrides()
        self._size = size if config.pixel_overrides() else None  # None: the processor's own
        self.frame = ImageFrame(
            frame.patch_size, frame.merge_size, size["shortest_edge"], size["longest_edge"]
        )
        self.merge = int(image_processor.merge_size)
        self._vision = frozenset(self.prompts.ids.vision)  # ids that delimit or fill image runs

    def encode_image(self, record: ImageRecord) -> ImageRecord:
        """Run the image processor on ``record.image`` (at the config's pixel limits when set);
        fills ``pixel_values`` and ``grid_thw``."""
        extra = {"size": self._size} if self._size else {}
        out = self.image_processor(images=[record.image], return_tensors="pt", **extra)
        record.pixel_values = out["pixel_values"]
        record.grid_thw = tuple(int(v) for v in out["image_grid_thw"][0])
        return record

    def start(self, sample, group: int = 0) -> Trajectory:
        """A trajectory holding the initial prompt of ``sample`` (no turns yet)."""
        records = [
            self.encode_image(ImageRecord(im.convert("RGB"), "input", k))
            for k, im in enumerate(sample.images, 1)
        ]
        ids = self.prompts.prompt(sample.question, [r.n_tokens(self.merge) for r in records])
        return Trajectory(
            sample_id=sample.id,
            family=sample.family,
            gold=sample.answer,
            answer_type=sample.answer_type,
            token_ids=list(ids),
            prompt_len=len(ids),
            response_mask=[0] * len(ids),
            rollout_log_probs=[0.0] * len(ids),
            images=records,
            group=group,
        )

    def request(self, traj: Trajectory) -> GenRequest:
        """The generation request continuing ``traj``."""
        pv = torch.cat([r.pixel_values for r in traj.images]) if traj.images else None
        grid = torch.tensor([r.grid_thw for r in traj.images]) if traj.images else None
        return GenRequest(traj.token_ids, pv, grid, [r.image for r in traj.images])

    def step(self, ep: _Episode, result: GenResult, turn: int) -> None:
        """Append one sampled turn, parse it, run a tool or finish (stop rules of docs/method.md §2).

        Never raises on what the policy wrote. A turn whose sampled ids break the image runs
        (a sampled ``<|image_pad|>`` or ``<|vision_start|>``, which the next forward would fail
        on) ends the episode unparsed, flagged ``bad_image_tokens``.

        Args:
            ep: the running episode (its trajectory is extended in place).
            result: the sampled turn: ids, rollout log-probs (nats), whether it ended.
            turn: 0-based turn index.
        """
        traj, cfg = ep.traj, self.config
        start, end = traj.extend(result.token_ids, sampled=True, log_probs=result.log_probs)
        text = self.tokenizer.decode(result.token_ids, skip_special_tokens=False)
        event = TurnEvent(
            turn=turn,
            kind="void",
            start=start,
            end=end,
            text=text,
            hit_length_limit=not result.finished,
        )
        traj.events.append(event)
        if not self._vision.isdisjoint(result.token_ids):  # the environment's runs were whole
            traj.flags["bad_image_tokens"] = True  # (agent.trajectory.image_token_problem)
            ep.done = True
            return
        call = TOOL_CALL_RE.search(text) if cfg.tool_names else None
        answer = ANSWER_RE.search(text)
        if call and (not answer or call.start() < answer.start()):
            self._tool_turn(ep, event, call.group(1), close_turn=not result.finished)
        elif answer:
            event.kind = "answer"
            traj.answer = answer.group(1).strip()
            ep.done = True
        else:
            traj.flags["void_turn"] = True
            ep.done = True
        if not ep.done and (
            turn + 1 >= cfg.max_turns
            or len(traj.token_ids) + cfg.max_new_tokens > cfg.max_total_tokens
        ):
            traj.flags["truncated"] = True  # turn or context budget spent without an answer
            ep.done = True

    def _tool_turn(self, ep: _Episode, event: TurnEvent, payload: str, close_turn: bool) -> None:
        traj, cfg = ep.traj, self.config
        event.kind = "tool_call"
        res = run_tool(
            payload, ep.inputs, self.frame, cfg.tool_names, cfg.crop_policy, cfg.crop_max_pixels
        )
        event.tool, event.ok, event.arguments = res.name, res.ok, res.arguments
        call_index = sum(1 for e in traj.events if e.kind == "tool_call") - 1
        new_records = [
            ImageRecord(ti.image.convert("RGB"), res.name, ti.source, call_index, ti.bbox)
            for ti in res.images
        ]
        for r in new_records:
            self.encode_image(r)
        text, new_records = self._within_budget(ep, res.text, new_records)
        if not res.ok:
            event.error = res.text
            traj.flags["failed_call"] = True
        labels = [(f"Image {r.source} ({r.origin})", r.n_tokens(self.merge)) for r in new_records]
        obs = self.prompts.observation(text, labels, close_turn=close_turn)
        event.obs_start, event.obs_end = traj.extend(obs, sampled=False)
        event.images = list(range(len(traj.images), len(traj.images) + len(new_records)))
        traj.images.extend(new_records)

    def _within_budget(
        self, ep: _Episode, text: str, records: list[ImageRecord]
    ) -> tuple[str, list[ImageRecord]]:
        """``(text, records)`` of an observation, or an error and no images when they would
        exceed ``max_images`` or ``max_image_tokens`` (the episode then ends ``over_budget``)."""
        traj, cfg = ep.traj, self.config
        if len(traj.images) + len(records) > cfg.max_images:
            message = f"Error: image budget of {cfg.max_images} images exceeded"
        elif cfg.max_image_tokens is not None and (
            sum(r.n_tokens(self.merge) for r in (*traj.images, *records)) > cfg.max_image_tokens
        ):
            message = f"Error: image budget of {cfg.max_image_tokens} image tokens exceeded"
        else:
            return text, records
        traj.flags["over_budget"] = True
        ep.done = True
        return message, []


def rollout(
    agent: Agent,
    generator: Generator,
    samples: list,
    group_size: int = 1,
) -> list[Trajectory]:
    """Run ``group_size`` episodes per sample in lock-step and verify their answers.

    Each trajectory's verification outcome (``acc``, ``fmt``, ``used``) is filled by
    :func:`agent.verifiers.verify_trajectory`; its ``reward`` is left None: the trainer
    weighs the outcome into a reward (``train.rewards.score``).

    Args:
        agent: the :class:`Agent`.
        generator: any :class:`Generator`.
        samples: task samples (``id, family, images, question, answer, answer_type``).
        group_size: G, episodes per sample (a GRPO group).

    Returns:
        ``len(samples) * group_size`` trajectories, grouped by sample (``traj.group`` = sample index).
    """
    episodes = []
    for gi, sample in enumerate(samples):
        first = agent.start(sample, gi)  # images are encoded once per sample, shared by the group
        for g in range(group_size):
            episodes.append(_Episode(first if g == 0 else first.fork(), list(sample.images)))
    for turn in range(agent.config.max_turns):
        active = [ep for ep in episodes if not ep.done]
        if not active:
            break
        results = generator.generate(
            [agent.request(ep.traj) for ep in active],
            agent.config.max_new_tokens,
            agent.config.temperature,
        )
        for ep, res in zip(active, results):
            agent.step(ep, res, turn)
    for ep in episodes:
        verify_trajectory(ep.traj)
    return [ep.traj for ep in episodes]
