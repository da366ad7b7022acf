"""Property-based fuzzing (hypothesis) of everything that reads model-written text (issue 16).

Hostile text: tool calls with huge, NaN/Infinity or wrongly typed numbers, deep nesting, special
token text (``<|image_pad|>``, ``<|vision_start|>``), unicode digits and control characters.
Properties: no exception escapes; no special-token id enters the environment's (non-sampled)
positions beyond the ones the template inserts; every failed call is an ``Error: ...``
observation with ``event.ok`` False and ``flags["failed_call"]`` set. Every registered tool is
called, user tools loaded as ``module:Class`` included (tests/agent/rotate_tool.py: one
well-behaved, one that raises or returns malformed results), ``confirm`` under both crop policies.

Default tier: 2,500 examples in all (900 parser and tools, 600 scoring, 2 x 500 ``Agent.step``
on relook-tiny), a few seconds on one core; the ``slow`` tier runs ten times as many. Derandomized, so CI sees the same examples every run.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agent.benchmarks.base import BenchmarkItem, ImageRef
from agent.benchmarks.scoring import (
    judge_blink,
    judge_hrbench,
    judge_mantis,
    judge_mme_realworld,
    judge_mmiu,
    judge_muirbench,
    judge_relook,
    judge_vstar,
)
from agent.data.scoring import ANSWER_TYPES, exact_match, normalize_answer
from agent.data.tasks import Sample
from agent.rollout import Agent, AgentConfig, GenResult, _Episode
from agent.tools import ImageFrame, parse_tool_call, registered_tools, resolve_tools, run_tool
from agent.trajectory import image_token_problem

# Every registered tool is fuzzed: the built-ins and user tools loaded as module:Class (a
# well-behaved one and one that raises or returns malformed results).
TOOLS = resolve_tools(
    "reflect,confirm,tests.agent.rotate_tool:Rotate,tests.agent.rotate_tool:Broken"
)
assert set(TOOLS) == set(registered_tools())

FRAME = ImageFrame(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)
IMAGES = [Image.new("RGB", (224, 168), (40 * k, 90, 200 - 30 * k)) for k in range(3)]
SCALE = {"default": 1, "slow": 10}
TIERS = [
    pytest.param("default", id="default"),
    pytest.param("slow", id="slow", marks=pytest.mark.slow),
]

SPECIAL_TEXT = (
    "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>",
    "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<answer>", "</answer>",
    "<tool_response>", "<think>",
)  # fmt: skip
NUMBER_TEXT = (
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e308", "-0", "0.5", "true", "null",
    '"2"', "[]", "{}", "²", "٣", "1" + "0" * 400, "9" * 4301, "-" + "9" * 999,
)  # fmt: skip
FRAGMENTS = SPECIAL_TEXT + NUMBER_TEXT + ("{", "}", "[", "]", '"', ",", ":", "\\", "\x00", "\n")

hostile_text = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=24).map("".join),
)
number = st.one_of(
    st.integers(1, 3).map(str),  # valid image numbers and boxes, so that many calls succeed
    st.integers(0, 120).map(str),
    st.floats(0, 120).map(json.dumps),
    st.integers(-(10**7), 10**7).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),
    st.integers(1, 5000).map(lambda n: "9" * n),
    st.sampled_from(NUMBER_TEXT),
)
name = st.sampled_from([json.dumps(t) for t in (*TOOLS, "confirm")]) | hostile_text.map(json.dumps)


@st.composite
def payloads(draw) -> str:
    """Tool-call JSON (often well-formed, with hostile values), deep nesting, or noise."""
    kind = draw(st.integers(0, 4))
    if kind == 4:  # a valid call, sometimes with one value replaced by a hostile one
        x1, x2 = sorted(draw(st.lists(st.integers(0, 112), min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(st.integers(0, 84), min_size=2, max_size=2)))
        values = [str(draw(st.integers(1, 3))), str(x1), str(y1), str(x2 + 8), str(y2 + 8)]
        if draw(st.booleans()):
            values[draw(st.integers(0, 4))] = draw(number)
        k, *box = values
        tool = draw(st.sampled_from(TOOLS))
        if tool == "reflect":
            return f'{{"name": "reflect", "arguments": {{"images": [{k}]}}}}'
        if tool != "confirm":  # user tools take an image number
            return f'{{"name": "{tool}", "arguments": {{"image": {k}}}}}'
        return (
            f'{{"name": "confirm", "arguments": {{"image": {k}, "bbox_2d": [{", ".join(box)}]}}}}'
        )
    if kind == 0:
        depth = draw(st.integers(1, 3000))
        return draw(st.sampled_from("[{")) * depth + draw(st.sampled_from(["", "]" * depth]))
    if kind == 1:
        return draw(hostile_text)
    box = ", ".join(draw(number) for _ in range(draw(st.sampled_from([4, 4, 4, 0, 3, 5]))))
    return (
        f'{{"name": {draw(name)}, "arguments": {{"image": {draw(number)}, '
        f'"bbox_2d": [{box}], "images": [{draw(number)}]}}}}'
    )


def _fuzz(tier: str, n: int):
    return settings(
        max_examples=n * SCALE[tier],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def draw_policy(payload: str) -> str:
    """Both crop policies of ``confirm``, alternating with the payload."""
    return ("native", "fill")[len(payload) % 2]


@pytest.mark.parametrize("tier", TIERS)
def test_tool_parser_and_tools_never_raise(tier):
    @_fuzz(tier, 900)
    @given(payloads())
    def check(payload):
        parsed = parse_tool_call(payload)
        assert isinstance(parsed, str) or (
            isinstance(parsed[0], str) and isinstance(parsed[1], dict)
        )
        res = run_tool(payload, IMAGES, FRAME, TOOLS, draw_policy(payload))
        if res.ok:
            assert res.images and all(im.image.width * im.image.height > 0 for im in res.images)
            if res.name == "confirm":  # NaN / Infinity / huge boxes are never a crop (issue 16)
                assert all(math.isfinite(v) and abs(v) <= 1e6 for v in res.arguments["bbox_2d"])
        else:
            assert res.text.startswith("Error: ") and res.images == []
            assert len(res.text) < 400  # echoed model text is cut

    check()


ITEM = BenchmarkItem(
    "0", "q", "B", "c", (ImageRef("x"),), choices=("a cat", "a dog", "²"),
    meta={"answer_type": "index", "raw_options": ["A. a cat", "B. a dog", "C. ²"]},
)  # fmt: skip
RELOOK_ITEM = BenchmarkItem(
    "1", "q", "2", "c", (ImageRef("x"),), kind="short", meta={"answer_type": "index"}
)
JUDGES = (
    judge_vstar, judge_hrbench, judge_mme_realworld, judge_muirbench, judge_blink,
    judge_mantis, judge_mmiu,
)  # fmt: skip


@pytest.mark.parametrize("tier", TIERS)
def test_answer_scoring_never_raises(tier):
    @_fuzz(tier, 600)
    @given(hostile_text)
    def check(text):
        for answer_type in ANSWER_TYPES:
            norm = normalize_answer(text, answer_type)
            assert norm is None or isinstance(norm, str)
        assert exact_match(text, "2", "index") in (0.0, 1.0)
        assert exact_match(text, "7", "digit") in (0.0, 1.0)
        for judge in JUDGES:
            parsed, correct = judge(text, ITEM)
            assert isinstance(correct, bool)
        assert isinstance(judge_relook(text, RELOOK_ITEM)[1], bool)

    check()


@pytest.fixture(scope="module")
def tiny_agent():
    """relook-tiny's tokenizer and image processor in an agent, and one started trajectory."""
    from agent.modeling import load_policy

    policy = load_policy("relook-tiny")
    cfg = AgentConfig(tools=",".join(TOOLS), max_images=6)
    agent = Agent(policy.tokenizer, policy.image_processor, cfg)
    sample = Sample(
        id="fuzz-0", split="test", family="find", images=tuple(IMAGES), question="Which image?",
        answer="2", answer_type="index", target_image=2, target_bbox=(10, 10, 30, 30), meta={},
    )  # fmt: skip
    return agent, agent.start(sample)


@st.composite
def turns(draw) -> str:
    """One assistant turn: free hostile text, or a tool call / answer holding hostile text."""
    body = draw(st.sampled_from(["call", "answer", "free"]))
    think = draw(hostile_text)
    if body == "call":
        return f"<think>{think}</think><tool_call>{draw(payloads())}</tool_call>"
    if body == "answer":
        return f"<think>{think}</think><answer>{draw(hostile_text)}</answer>"
    return think


def _special_counts(ids: list[int], special: set[int]) -> Counter:
    return Counter(i for i in ids if i in special)


def _check_environment_ids(agent: Agent, traj, prompt_ids: list[int]) -> None:
    """Non-sampled positions hold exactly the template's special ids: the prompt's, then per
    observation those of the same observation with empty text, images as ``traj.images``."""
    special = set(agent.tokenizer.added_tokens_decoder)
    assert traj.token_ids[: len(prompt_ids)] == prompt_ids
    for e in traj.events:
        if e.obs_start is None:
            continue
        labels = [
            (
                f"Image {traj.images[i].source} ({traj.images[i].origin})",
                traj.images[i].n_tokens(agent.merge),
            )
            for i in e.images
        ]
        close = traj.token_ids[e.obs_start] == agent.prompts.ids.im_end
        template = agent.prompts.observation("", labels, close_turn=close)
        span = traj.token_ids[e.obs_start : e.obs_end]
        assert _special_counts(span, special) == _special_counts(template, special)
        assert not any(traj.response_mask[e.obs_start : e.obs_end])
    env = [t for t, m in zip(traj.token_ids, traj.response_mask) if not m]
    ids = agent.prompts.ids
    assert env.count(ids.image_pad) == sum(r.n_tokens(agent.merge) for r in traj.images)
    assert env.count(ids.vision_start) == env.count(ids.vision_end) == len(traj.images)


@pytest.mark.parametrize("tier", TIERS)
def test_agent_step_on_hostile_turns(tier, tiny_agent):
    agent, first = tiny_agent
    tok, eos = agent.tokenizer, agent.prompts.ids.im_end

    @_fuzz(tier, 500)
    @given(st.lists(st.tuples(turns(), st.booleans()), min_size=1, max_size=2))
    def check(script):
        ep = _Episode(first.fork(), list(IMAGES))
        for turn, (text, finished) in enumerate(script):
            if ep.done:
                break
            ids = tok.encode(text, add_special_tokens=False) + ([eos] if finished else [])
            agent.step(ep, GenResult(ids, [-1.0] * len(ids), finished), turn)
        traj = ep.traj
        failed = [e for e in traj.events if e.kind == "tool_call" and not e.ok]
        assert traj.flags["failed_call"] == bool(failed)
        assert all(e.error.startswith("Error: ") for e in failed)
        _check_environment_ids(agent, traj, first.token_ids)
        grids = [r.grid_thw for r in traj.images]
        problem = image_token_problem(traj.token_ids, grids, agent.merge, agent.prompts.ids.vision)
        assert traj.flags["bad_image_tokens"] == (problem is not None)  # else the forward works

    check()


@pytest.mark.parametrize("tier", TIERS)
def test_agent_step_on_hostile_json_calls(tier, tiny_agent):
    """Only tool calls, so that most examples reach the tools (second half of the step budget)."""
    agent, first = tiny_agent
    tok, eos = agent.tokenizer, agent.prompts.ids.im_end

    @_fuzz(tier, 500)
    @given(payloads())
    def check(payload):
        ep = _Episode(first.fork(), list(IMAGES))
        ids = tok.encode(f"<tool_call>{payload}</tool_call>", add_special_tokens=False) + [eos]
        agent.step(ep, GenResult(ids, [-1.0] * len(ids), True), 0)
        (event,) = ep.traj.events
        if event.kind == "tool_call" and not event.ok:
            assert ep.traj.flags["failed_call"] and event.error.startswith("Error: ")
        _check_environment_ids(agent, ep.traj, first.token_ids)

    check()
