"""The vLLM rollout backend on CPU: track conversion with the real tiny processor, prompts,
sampling settings, log-prob extraction, sleep/wake/sync order in the loop, ZeRO-3 gathering.

The engine is a stand-in (:class:`FakeLLM`) with vLLM 0.33's ``LLM`` methods and
``RequestOutput`` shape; it expands each prompt's image pads with the real image processor, as
vLLM's Qwen2.5-VL processor does, and refuses to generate or load weights while asleep. What a
real engine does is checked by the ``gpu``-marked tests in test_vllm_gpu.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from agent.data.tasks import Sample
from agent.modeling import VISION_SPECIAL_TOKENS, load_policy
from agent.rollout import Agent, AgentConfig, GenRequest, rollout
from train.config import ArmConfig, GRPOConfig
from train.loop import make_generator, train
from train.vllm_backend import (
    VLLMGenerator,
    collapse_image_pads,
    expand_image_pads,
    full_parameters,
    image_token_counts,
    limit_mm_images,
    make_vllm_generator,
)

REFLECT = '<think>again</think><tool_call>{"name": "reflect", "arguments": {"images": [1, 2]}}</tool_call>'
CONFIRM = '<think>zoom</think><tool_call>{"name": "confirm", "arguments": {"image": 1, "bbox_2d": [8, 8, 60, 60]}}</tool_call>'
RIGHT = "<think>two</think><answer>2</answer>"
WRONG = "<think>one</think><answer>1</answer>"


# --- a stand-in for vllm.LLM -------------------------------------------------------------


@dataclass
class Logprob:
    """vLLM's ``Logprob``."""

    logprob: float
    rank: int | None = 1
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """vLLM's ``CompletionOutput`` (the fields relook reads)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """vLLM's ``RequestOutput`` (the fields relook reads)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class SamplingParams:
    """Records its keyword arguments, as ``vllm.SamplingParams(**kwargs)`` holds them."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@dataclass
class FakeModel:
    """The engine's model: ``load_weights`` records what it was given (clones)."""

    loaded: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def load_weights(self, weights):
        self.loaded[-1].update({n: t.detach().clone() for n, t in weights})
        return {n for n, _ in weights}


class FakeLLM:
    """``vllm.LLM`` stand-in: ``generate`` answers each request with ``respond(prompt)`` (a
    text), ends it with ``<|im_end|>`` and gives token k the log-prob ``-0.1 * (k + 1)``.

    Attributes:
        calls: ``(method, detail)`` in call order.
        expanded: the processor-expanded prompt ids of every request (vLLM's
            ``RequestOutput.prompt_token_ids``).
    """

    def __init__(self, tokenizer, image_processor, respond, limit_images: int = 64):
        self.tok = tokenizer
        self.image_processor = image_processor
        self.respond = respond
        self.limit_images = limit_images
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.model = FakeModel()
        self.calls: list[tuple[str, object]] = []
        self.asleep: set[str] = set()
        self.params: list[SamplingParams] = []
        self.expanded: list[list[int]] = []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        if self.asleep:
            raise RuntimeError(f"generate while {sorted(self.asleep)} sleep")
        self.calls.append(("generate", len(prompts)))
        outs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            images = prompt.get("multi_modal_data", {}).get("image", [])
            assert len(images) <= self.limit_images, "limit_mm_per_prompt exceeded"
            grids = (
                self.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
                if images
                else None
            )
            counts = image_token_counts(grids, self.image_processor.merge_size)
            self.expanded.append(expand_image_pads(prompt["prompt_token_ids"], self.pad, counts))
            ids = self.tok.encode(self.respond(prompt), add_special_tokens=False)
            ids = (ids + [self.eos])[: params.max_tokens]
            lps = [{t: Logprob(-0.1 * (k + 1))} for k, t in enumerate(ids)]
            completion = CompletionOutput(0, "", ids, None, lps)
            outs.append(RequestOutput(str(i), None, self.expanded[-1], [completion]))
            self.params.append(params)
        return outs

    def sleep(self, level: int = 1):
        self.calls.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        tags = list(tags) if tags is not None else ["weights", "kv_cache"]
        self.calls.append(("wake_up", tuple(tags)))
        self.asleep -= set(tags)

    def apply_model(self, func):
        if "weights" in self.asleep:
            raise RuntimeError("load_weights into sleeping (unmapped) weights")
        if not self.calls or self.calls[-1][0] != "load":
            self.model.loaded.append({})
        self.calls.append(("load", None))
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", None))
        return True


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def scripted_responder(tokenizer, script: list[str]):
    """Answer turn k of an episode with ``script[k]``: k = how many script turns (ids +
    ``<|im_end|>``) the prompt already holds."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    turns = [tokenizer.encode(t, add_special_tokens=False) + [eos] for t in script]

    def respond(prompt):
        k = sum(_contains(prompt["prompt_token_ids"], t) for t in turns)
        return script[min(k, len(script) - 1)]

    return respond


def _sample(n_images: int = 2) -> Sample:
    images = tuple(
        Image.new("RGB", (160 + 32 * k, 120), (60 * k, 90, 200 - 50 * k)) for k in range(n_images)
    )
    return Sample(
        id="v-0", split="test", family="find", images=images, question="Which image contains the red square?",
        answer="2", answer_type="int", target_image=2, target_bbox=(10, 10, 30, 30), meta={},
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_real():
    """relook-tiny (models/relook-tiny, read-only): the real tokenizer and image processor."""
    return load_policy("relook-tiny")


def _generator(policy, respond, **kwargs) -> tuple[VLLMGenerator, FakeLLM]:
    llm = FakeLLM(policy.tokenizer, policy.image_processor, respond)
    return VLLMGenerator.for_policy(llm, SamplingParams, policy, **kwargs), llm


# --- the two tracks ------------------------------------------------------------------------


def test_tracks_round_trip_on_a_multi_turn_trajectory_with_tool_images(tiny_real, scripted):
    policy = tiny_real
    agent = Agent(policy.tokenizer, policy.image_processor, AgentConfig(tools="both", max_turns=4))
    gen = scripted(policy.tokenizer, [[CONFIRM, REFLECT, RIGHT]])
    (traj,) = rollout(agent, gen, [_sample()], group_size=1)
    assert [r.origin for r in traj.images] == ["input", "input", "confirm", "reflect", "reflect"]
    pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = torch.tensor([r.grid_thw for r in traj.images])
    counts = image_token_counts(grid, int(policy.image_processor.merge_size))
    assert counts == [r.n_tokens(2) for r in traj.images] and min(counts) > 1
    short = collapse_image_pads(traj.token_ids, pad, counts)
    assert short.count(pad) == len(traj.images)
    assert len(short) == len(traj.token_ids) - sum(counts) + len(traj.images)
    start, end = (policy.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS[:2])
    for i, t in enumerate(short):  # every pad sits alone between vision_start and vision_end
        if t == pad:
            assert short[i - 1] == start and short[i + 1] == end
    assert expand_image_pads(short, pad, counts) == traj.token_ids


def test_vllm_track_of_a_prompt_is_the_prompt_built_with_one_token_per_image(tiny_real):
    policy = tiny_real
    agent = Agent(policy.tokenizer, policy.image_processor, AgentConfig())
    sample = _sample(3)
    traj = agent.start(sample)
    pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = [r.n_tokens(2) for r in traj.images]
    one_each = agent.prompts.prompt(sample.question, [1] * len(traj.images))
    assert collapse_image_pads(traj.token_ids, pad, counts) == one_each


def test_track_conversion_rejects_mismatched_images(tiny_real):
    pad = tiny_real.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = [1, 9, pad, pad, pad, 8, 1, 9, pad, pad, 8]
    assert collapse_image_pads(ids, pad, [3, 2]) == [1, 9, pad, 8, 1, 9, pad, 8]
    with pytest.raises(ValueError, match=r"runs \[3, 2\].*\[3, 3\]"):
        collapse_image_pads(ids, pad, [3, 3])
    with pytest.raises(ValueError, match="runs"):
        collapse_image_pads(ids, pad, [3])
    with pytest.raises(ValueError, match="expected 3 separate image pads"):
        expand_image_pads([9, pad, 8, 9, pad, 8], pad, [4, 4, 4])
    with pytest.raises(ValueError, match="separate"):
        expand_image_pads([9, pad, pad, 8], pad, [4, 4])
    assert image_token_counts(None, 2) == [] and image_token_counts(
        torch.tensor([[1, 8, 6]]), 2
    ) == [12]


def test_limit_mm_per_prompt_covers_inputs_plus_tool_images():
    assert limit_mm_images(AgentConfig(max_turns=5, max_images=12), 4) == 12  # budget binds
    assert limit_mm_images(AgentConfig(max_turns=2, max_images=12), 4) == 8  # 4 in + 1 call of 4
    assert limit_mm_images(AgentConfig(tools="none", max_turns=5, max_images=12), 4) == 4
    assert limit_mm_images(AgentConfig(max_turns=5, max_images=2), 4) == 4  # inputs always fit
    with pytest.raises(ValueError, match="max_input_images"):
        limit_mm_images(AgentConfig(), 0)


def test_episodes_never_exceed_the_limit(tiny_real):
    cfg = AgentConfig(tools="both", max_turns=3, max_images=5)
    limit = limit_mm_images(cfg, 2)
    gen, llm = _generator(tiny_real, scripted_responder(tiny_real.tokenizer, [REFLECT] * 3))
    llm.limit_images = limit
    agent = Agent(tiny_real.tokenizer, tiny_real.image_processor, cfg)
    (traj,) = rollout(agent, gen, [_sample(2)], group_size=1)
    assert limit == 5 and len(traj.images) == 4  # 2 inputs + the first call's 2
    assert traj.flags["over_budget"]  # the second call's 2 would make 6: refused


# --- prompts, sampling settings, log-probs -------------------------------------------------


def test_prompt_has_one_pad_per_image_and_the_images(tiny_real):
    gen, llm = _generator(tiny_real, lambda p: RIGHT)
    agent = Agent(tiny_real.tokenizer, tiny_real.image_processor, AgentConfig())
    traj = agent.start(_sample(3))
    req = agent.request(traj)
    prompt = gen.prompt(req)
    pad = tiny_real.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert prompt["prompt_token_ids"].count(pad) == 3
    assert all(a is r.image for a, r in zip(prompt["multi_modal_data"]["image"], traj.images))
    (res,) = gen.generate([req], max_new_tokens=32, temperature=0.7)
    assert llm.expanded == [traj.token_ids], "vLLM's expansion must give the trainer track"
    p = llm.params[0]
    eos = tiny_real.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (
        1,
        0.7,
        1.0,
        0,
        0.0,
        1.0,
    )
    assert p.max_tokens == 32 and p.stop_token_ids == [eos] and p.ignore_eos and p.logprobs == 0
    assert isinstance(p.seed, int) and p.detokenize is False
    assert res.finished and res.token_ids[-1] == eos


def test_banned_words_are_exactly_the_vision_tokens(tiny_real):
    """vLLM bans a one-token bad word outright (``SamplingParams.update_from_tokenizer``): each
    must encode to the single id the HF backend suppresses."""
    gen, llm = _generator(tiny_real, lambda p: RIGHT)
    gen.generate([GenRequest([1, 2, 3], None, None)], 8, 1.0)
    words = llm.params[0].bad_words
    ids = [tiny_real.tokenizer.encode(w, add_special_tokens=False) for w in words]
    assert sorted(i for (i,) in ids) == sorted(tiny_real.vision_token_ids)


def test_log_probs_and_finished_are_read_from_the_request_output(tiny_real):
    gen, llm = _generator(tiny_real, lambda p: RIGHT)
    n = len(tiny_real.tokenizer.encode(RIGHT, add_special_tokens=False)) + 1
    (done,) = gen.generate([GenRequest([1, 2, 3], None, None)], 64, 1.0)
    assert done.finished and done.log_probs == pytest.approx([-0.1 * (k + 1) for k in range(n)])
    (cut,) = gen.generate([GenRequest([1, 2, 3], None, None)], 3, 1.0)
    assert not cut.finished and len(cut.token_ids) == 3 and len(cut.log_probs) == 3
    llm.generate = lambda prompts, params, use_tqdm: [
        RequestOutput("0", None, [], [CompletionOutput(0, "", [5, 6], None, None)])
    ]
    with pytest.raises(RuntimeError, match="log-probs"):
        gen.generate([GenRequest([1, 2, 3], None, None)], 3, 1.0)


def test_request_without_images_is_refused(tiny_real):
    gen, _ = _generator(tiny_real, lambda p: RIGHT)
    agent = Agent(tiny_real.tokenizer, tiny_real.image_processor, AgentConfig())
    req = agent.request(agent.start(_sample(2)))
    req.images = None
    with pytest.raises(ValueError, match="GenRequest.images"):
        gen.generate([req], 8, 1.0)


def test_sampling_seeds_follow_torch_seed(tiny_real):
    gen, llm = _generator(tiny_real, lambda p: RIGHT)
    reqs = [GenRequest([1, 2, 3], None, None)] * 3
    torch.manual_seed(5)
    gen.generate(reqs, 8, 1.0)
    torch.manual_seed(5)
    gen.generate(reqs, 8, 1.0)
    seeds = [p.seed for p in llm.params]
    assert seeds[:3] == seeds[3:] and len(set(seeds[:3])) == 3


def test_multi_turn_episodes_match_the_hf_interface(tiny_real, scripted):
    """The same turns through the vLLM backend and through a scripted HF-style generator give
    the same trajectories (ids, masks, images, events, flags, verified outcomes)."""
    script = [CONFIRM, REFLECT, RIGHT]
    agent = Agent(tiny_real.tokenizer, tiny_real.image_processor, AgentConfig(max_turns=4))
    ref = rollout(agent, scripted(tiny_real.tokenizer, [list(script)] * 2), [_sample()], 2)
    gen, llm = _generator(tiny_real, scripted_responder(tiny_real.tokenizer, script))
    got = rollout(agent, gen, [_sample()], 2)
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids and a.response_mask == b.response_mask
        assert [r.grid_thw for r in a.images] == [r.grid_thw for r in b.images]
        assert [(e.kind, e.tool, e.ok, e.start, e.end) for e in a.events] == [
            (e.kind, e.tool, e.ok, e.start, e.end) for e in b.events
        ]
        assert a.flags == b.flags and (a.acc, a.used, a.fmt) == (b.acc, b.used, b.fmt) == (1, 1, 0)
        sampled = [lp for lp, m in zip(b.rollout_log_probs, b.response_mask) if m]
        assert sampled and all(lp < 0 for lp in sampled)
    assert llm.calls == [("generate", 2)] * 3
    assert llm.expanded[-1] == got[0].token_ids[: len(llm.expanded[-1])]


# --- sleep, wake and weight sync in the loop ----------------------------------------------


def _force_answer(monkeypatch):
    import train.loop as loop

    real = loop.generate_one

    def fake(split, index, seed, config):
        from dataclasses import replace

        return replace(real(split, index, seed, config), answer="2", answer_type="int")

    monkeypatch.setattr(loop, "generate_one", fake)


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_loop_sleeps_after_rollout_and_syncs_after_each_update(policy, monkeypatch, mini_batches):
    _force_answer(monkeypatch)
    turn = iter(range(10**6))
    gen, llm = _generator(policy, lambda p: RIGHT if next(turn) % 2 else WRONG)
    cfg = ArmConfig(
        name="v",
        agent=AgentConfig(tools="none", max_turns=1),
        grpo=GRPOConfig(
            steps=2, prompts_per_step=2, group_size=2, mini_batches=mini_batches, lr=1e-3,
            warmup_steps=1, checkpoint_every=0, tis_cap=2.0,
        ),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    rows = train(cfg, policy, generator=gen, progress=False)
    assert all(r["actor/updates"] == mini_batches for r in rows)
    # calls, with consecutive loads merged: sync at start, then per step
    # [wake kv_cache], generate, sleep, wake weights, load..., reset
    calls = [
        c for i, c in enumerate(llm.calls) if not (c[0] == "load" and llm.calls[i - 1][0] == "load")
    ]
    sync = [("load", None), ("reset_prefix_cache", None)]
    step0 = [("generate", 4), ("sleep", 1), ("wake_up", ("weights",)), *sync]
    step1 = [("wake_up", ("kv_cache",)), *step0]
    assert calls == [*sync, *step0, *step1]
    assert gen.syncs == 3
    # every parameter was loaded, under transformers' names, with the trained values
    last = llm.model.loaded[-1]
    params = dict(policy.model.named_parameters())
    assert set(last) == set(params)
    assert all(torch.equal(last[n], p.detach()) for n, p in params.items())
    assert any(not torch.equal(last[n], before[n]) for n in params), "training changed weights"
    assert rows[-1]["rollout/logprob_gap"] > 0  # fake engine log-probs differ from the trainer's


def test_sleep_mode_off_never_sleeps(policy):
    gen, llm = _generator(policy, lambda p: RIGHT, enable_sleep_mode=False)
    gen.sleep()
    gen.generate([GenRequest([1, 2], None, None)], 4, 1.0)
    gen.sync_weights(policy.model)
    assert [c[0] for c in llm.calls if c[0] != "load"] == ["generate", "reset_prefix_cache"]
    with pytest.raises(ValueError, match="unknown vLLM sleep tags"):
        gen.wake_up(tags=("kv",))


def test_full_parameters_gathers_zero3_partitions(policy, world_of_one):
    """Under ZeRO-3 the trained module's parameters are empty partitions; the sync sees full
    tensors equal to the model's (1 process, CPU, gloo)."""
    pytest.importorskip("deepspeed")
    from train.engine import DeepSpeedEngine

    want = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    g = GRPOConfig(engine="deepspeed", zero_stage=3, steps=1, prompts_per_step=1, group_size=2,
                   mini_batches=1, micro_batch=2)  # fmt: skip
    engine = DeepSpeedEngine(g, policy.model, 2)
    try:
        assert all(hasattr(p, "ds_id") for p in engine.module.parameters())
        got = {n: t.clone() for batch in full_parameters(engine.module) for n, t in batch}
        assert set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want)
    finally:
        engine.close()


# --- configuration and the missing-vllm error ---------------------------------------------


def test_missing_vllm_gives_a_clear_error(policy, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    cfg = ArmConfig(grpo=GRPOConfig(rollout_backend="vllm"))
    with pytest.raises(ImportError, match="pip install vllm"):
        make_vllm_generator(policy, cfg)
    with pytest.raises(ImportError, match="GPU"):
        make_generator(policy, cfg)
    assert type(make_generator(policy, ArmConfig())).__name__ == "HFGenerator"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rollout_backend", "sglang", "rollout_backend"),
        ("vllm_gpu_memory_utilization", 0.0, "vllm_gpu_memory_utilization"),
        ("vllm_gpu_memory_utilization", 1.5, "vllm_gpu_memory_utilization"),
        ("vllm_tensor_parallel_size", 0, "vllm_tensor_parallel_size"),
    ],
)
def test_config_rejects_bad_vllm_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{field: value})


def test_tensor_parallel_above_one_is_refused(policy, monkeypatch):
    class _Vllm:  # a vllm module whose LLM must never be reached
        LLM = SamplingParams = None

    monkeypatch.setitem(sys.modules, "vllm", _Vllm)
    cfg = ArmConfig(grpo=GRPOConfig(rollout_backend="vllm", vllm_tensor_parallel_size=2))
    with pytest.raises(NotImplementedError, match="vllm_tensor_parallel_size=2"):
        make_vllm_generator(policy, cfg)


def test_make_vllm_generator_passes_the_documented_llm_arguments(policy, monkeypatch):
    seen = {}

    class _Vllm:
        SamplingParams = SamplingParams

        @staticmethod
        def LLM(**kwargs):  # noqa: N802 (vLLM's class name)
            seen.update(kwargs)
            return FakeLLM(policy.tokenizer, policy.image_processor, lambda p: RIGHT)

    monkeypatch.setitem(sys.modules, "vllm", _Vllm)
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29555"), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # fmt: skip
        monkeypatch.setenv(key, value)  # what the external launcher reads; restored after
    cfg = ArmConfig(
        agent=AgentConfig(max_turns=3, max_images=12, max_total_tokens=2048, max_new_tokens=64),
        grpo=GRPOConfig(rollout_backend="vllm", vllm_gpu_memory_utilization=0.4),
    )
    gen = make_vllm_generator(policy, cfg)
    assert isinstance(gen, VLLMGenerator) and gen.sampling_params is SamplingParams
    assert seen["model"] == policy.path and seen["limit_mm_per_prompt"] == {"image": 12, "video": 0}
    assert seen["max_model_len"] == 2048 + 64 and seen["gpu_memory_utilization"] == 0.4
    assert seen["enable_sleep_mode"] is True and seen["logprobs_mode"] == "processed_logprobs"
    assert seen["distributed_executor_backend"] == "external_launcher"
    assert seen["generation_config"] == "vllm" and seen["tensor_parallel_size"] == 1
    assert seen["seed"] == cfg.grpo.seed  # + rank: one stream per training process
    assert "mm_processor_kwargs" not in seen  # the processor's own pixel limits
    cfg = ArmConfig(agent=AgentConfig(max_pixels=50176), grpo=cfg.grpo)
    make_vllm_generator(policy, cfg)
    assert seen["mm_processor_kwargs"] == {"max_pixels": 50176}  # resized as the agent does
