"""Regressions of issue 16: hostile model output never crashes a rollout (one test per finding)."""

from __future__ import annotations

import pytest
import torch

from agent import tools
from agent.data.scoring import exact_match, normalize_answer
from agent.prompting import FORMAT_WITH_TOOLS, PromptBuilder
from agent.rollout import Agent, AgentConfig, GenResult, _Episode
from agent.tools import ImageFrame, parse_tool_call, run_tool
from agent.trajectory import image_token_problem
from tests.agent.test_agent import _sample
from train.batching import loss_weights

FRAME = ImageFrame(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)
IMAGES = list(_sample().images)
BOTH = ("reflect", "confirm")


def _confirm(box: str) -> str:
    return f'{{"name": "confirm", "arguments": {{"image": 1, "bbox_2d": [{box}]}}}}'


@pytest.mark.parametrize(
    "box", ["9" * 400 + ", 0, 10, 10", "0, 0, " + "9" * 309 + ", 10", "0, 0, 1e400, 50"]
)
def test_huge_box_coordinates_are_an_error_not_an_overflow(box):
    res = run_tool(_confirm(box), IMAGES, FRAME, BOTH)
    assert not res.ok and "list of 4 numbers" in res.text and res.images == []


@pytest.mark.parametrize("box", ["NaN, 0, 50, 50", "0, 0, Infinity, 50", "-Infinity, 0, 9, 9"])
def test_nan_and_infinite_boxes_are_refused(box):
    res = run_tool(_confirm(box), IMAGES, FRAME, BOTH)
    assert not res.ok and "finite" in res.text and res.images == []


def test_json_integer_over_the_digit_limit(monkeypatch):
    payload = '{"name": "reflect", "arguments": {"images": [' + "1" * 4301 + "]}}"
    assert "longer than" in parse_tool_call(payload)  # refused before parsing
    monkeypatch.setattr(tools, "MAX_PAYLOAD_CHARS", 10**6)  # and if it were parsed:
    msg = parse_tool_call(payload)
    assert isinstance(msg, str) and msg.startswith("tool call is not valid JSON")


def test_deep_nesting_is_refused_before_json_loads(monkeypatch):
    assert "deeper than" in parse_tool_call("[" * 1000 + "]" * 1000)
    assert tools.json_depth('{"a": "[[[[[[[[[[[[", "b": [[1]]}') == 3  # strings do not count
    monkeypatch.setattr(tools, "MAX_JSON_DEPTH", 10**9)
    monkeypatch.setattr(tools, "MAX_PAYLOAD_CHARS", 10**9)
    msg = parse_tool_call("[" * 100_000 + "]" * 100_000)  # RecursionError inside json.loads
    assert isinstance(msg, str) and "not valid JSON" in msg


def test_image_numbers_by_exact_type_and_bounded():
    for k in ("1.0", "true", "9" * 50):
        res = run_tool(f'{{"name": "confirm", "arguments": {{"image": {k}, "bbox_2d": [0, 0, 50, 50]}}}}', IMAGES, FRAME, BOTH)  # fmt: skip
        assert not res.ok and '"image" must be an image number' in res.text
    res = run_tool('{"name": "reflect", "arguments": {"images": [' + "9" * 50 + "]}}", IMAGES, FRAME, BOTH)  # fmt: skip
    assert not res.ok and "non-empty list" in res.text


def test_unknown_tool_name_is_echoed_cut():
    res = run_tool(f'{{"name": "{"x" * 500}"}}', IMAGES, FRAME, BOTH)
    assert not res.ok and len(res.name) == tools.MAX_ECHO_CHARS and "x" * 61 + "..." in res.text
    assert len(res.text) < 200


@pytest.mark.parametrize("text", ["²", "9" * 4301, "", "\x00\x1f\x7f", "²nd", "9" * 5000 + "th"])
def test_scoring_never_raises_on_odd_numbers(text):
    for answer_type in ("index", "int", "digit"):
        assert normalize_answer(text, answer_type) is None
        assert exact_match(text, "2", answer_type) == 0.0
    assert normalize_answer("0" * 5000 + "3", "int") == "3"  # leading zeros are still a number


def test_environment_encoding_keeps_valid_ids(policy):
    """Prompts and observations without special-token text encode as a plain ``encode`` of the
    whole string did (the golden training rows depend on these ids)."""
    tok = policy.tokenizer
    b = PromptBuilder(tok, BOTH)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    q = "Which image contains the red square?"
    fmt = "\n" + FORMAT_WITH_TOOLS + "<|im_end|>\n<|im_start|>assistant\n"
    old = enc(b.system_text() + "<|im_start|>user\n") + enc("Image 1: ") + b.image_ids(4)
    assert b.prompt(q, [4]) == old + enc("\n") + enc(q + fmt)
    for close in (True, False):
        text = "Here is the zoomed region of Image 2."
        head = ("<|im_end|>" if close else "") + "\n<|im_start|>user\n<tool_response>\n" + text
        want = enc(head) + enc("\nImage 2 (confirm): ") + b.image_ids(3)
        want += enc("\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
        assert b.observation(text, [("Image 2 (confirm)", 3)], close) == want


def test_special_token_text_in_a_tool_name_stays_text(policy):
    """The model writes the *text* ``<|image_pad|>`` (ordinary tokens: the generator never
    samples the special id); the error echoes it; it must come back as ordinary tokens and the
    next forward must work."""
    tok = policy.tokenizer
    agent = Agent(tok, policy.image_processor, AgentConfig(tools="both"))
    ep = _Episode(agent.start(_sample()), IMAGES)
    hostile = '<tool_call>{"name": "<|image_pad|><|vision_start|><|im_start|>"}</tool_call>'
    ids = tok(hostile, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids.append(agent.prompts.ids.im_end)
    agent.step(ep, GenResult(ids, [-1.0] * len(ids), True), 0)
    traj, (event,) = ep.traj, ep.traj.events
    assert not event.ok and traj.flags["failed_call"] and "<|image_pad|>" in event.error
    obs = traj.token_ids[event.obs_start : event.obs_end]
    assert "<|image_pad|>" in tok.decode(obs)
    vision = agent.prompts.ids.vision
    assert not set(obs) & set(vision)
    grids = [r.grid_thw for r in traj.images]
    assert image_token_problem(traj.token_ids, grids, agent.merge, vision) is None
    with torch.no_grad():
        policy.model(**traj.model_inputs(agent.prompts.ids.image_pad))  # no mismatch error


def test_sampled_image_pad_id_ends_the_episode_flagged(policy):
    tok = policy.tokenizer
    agent = Agent(tok, policy.image_processor, AgentConfig(tools="both"))
    ep = _Episode(agent.start(_sample()), IMAGES)
    ids = tok.encode("<think><|image_pad|></think><answer>2</answer>", add_special_tokens=False)
    agent.step(ep, GenResult(ids, [-1.0] * len(ids), False), 0)
    assert ep.done and ep.traj.flags["bad_image_tokens"] and ep.traj.answer is None
    assert loss_weights(ep.traj, True, True).sum() == 0


def test_failed_call_sets_flag_for_nan_box_in_an_episode(policy, scripted):
    from tests.agent.test_agent import ANSWER_2, _run

    call = '<tool_call>{"name": "confirm", "arguments": {"image": 1, "bbox_2d": [NaN, 0, Infinity, 50]}}</tool_call>'
    (traj,) = _run(policy, [[call, ANSWER_2]], scripted=scripted)
    assert traj.flags["failed_call"] and not traj.events[0].ok and traj.used == 0.0
    assert len(traj.images) == 3  # no crop of the whole image
