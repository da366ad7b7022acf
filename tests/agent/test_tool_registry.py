"""Tool registry (issue 19 item 1) and pixel budgets (item 2): a user tool given as
``module:Class`` runs through every layer with no core file naming it; ``confirm``'s crop
policies and the image-token budget bound what a call costs."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from agent.data.tasks import Sample
from agent.prompting import system_text
from agent.rollout import Agent, AgentConfig, GenResult, _Episode, rollout
from agent.tools import ImageFrame, get_tool, pad_box, registered_tools, resolve_tools, run_tool
from analysis.spans import SpecialIds
from experiments.attention import trajectory_regions
from experiments.grids import grid_arms
from train.batching import loss_weights
from train.metrics import rollout_metrics
from train.rewards import score

ROTATE = "tests.agent.rotate_tool:Rotate"
BROKEN = "tests.agent.rotate_tool:Broken"
CALL_ROTATE = (
    '<think>turn it</think><tool_call>{"name": "rotate", "arguments": {"image": 2}}</tool_call>'
)
ANSWER_2 = "<think>two</think><answer>Image 2</answer>"
# Qwen2.5-VL-7B-Instruct's published preprocessor_config.json
QWEN_7B_PIXELS = dict(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)


def _sample(size=(224, 168), n=3) -> Sample:
    images = tuple(Image.new("RGB", size, (40 * k, 90, 200 - 30 * k)) for k in range(n))
    return Sample(
        id="reg-0", split="test", family="find", images=images, question="Which image?",
        answer="2", answer_type="index", target_image=2, target_bbox=(10, 10, 30, 30), meta={},
    )  # fmt: skip


def test_spellings_and_names_resolve():
    assert resolve_tools("none") == () and resolve_tools("both") == ("reflect", "confirm")
    assert resolve_tools("confirm") == ("confirm",)
    assert resolve_tools(f"reflect, {ROTATE},reflect") == ("reflect", "rotate")
    assert "rotate" in registered_tools() and registered_tools()[:2] == ("reflect", "confirm")
    for bad in ("zoom", "nosuch.module:X", "tests.agent.rotate_tool:Nope", ":X"):
        with pytest.raises(ValueError, match="AgentConfig.tools"):
            AgentConfig(tools=bad)


def test_builtin_system_prompt_is_unchanged():
    """The exact text relook-tiny was trained on (the golden-rows test checks its ids)."""
    want = (
        "<|im_start|>system\nYou are a helpful assistant. Look at the images and answer the "
        'question.\n\n# Tools\n<tools>\n{"name": "reflect", "description": "Look at the '
        'original images again.", "arguments": {"images": "list of image numbers (default: '
        'all)"}}\n{"name": "confirm", "description": "Zoom into a box of one image.", '
        '"arguments": {"image": "image number", "bbox_2d": "[x1, y1, x2, y2] in pixels"}}\n'
        "</tools><|im_end|>\n"
    )
    assert system_text(resolve_tools("both")) == want


def test_user_tool_is_advertised_called_masked_counted_and_labelled(policy, scripted):
    cfg = AgentConfig(tools=f"reflect,confirm,{ROTATE}", max_turns=3)
    agent = Agent(policy.tokenizer, policy.image_processor, cfg)
    # advertised: its schema is a line of the system turn's <tools> block
    assert json.dumps(get_tool("rotate").schema) in agent.prompts.system_text()
    gen = scripted(policy.tokenizer, [[CALL_ROTATE, ANSWER_2]])
    (traj,) = rollout(agent, gen, [_sample()], group_size=1)
    # called
    call = traj.events[0]
    assert (call.kind, call.tool, call.ok) == ("tool_call", "rotate", True)
    rotated = traj.images[3]
    assert (rotated.origin, rotated.source, rotated.image.size) == ("rotate", 2, (168, 224))
    # masked as environment tokens: the observation is not sampled and carries no loss
    obs = slice(call.obs_start, call.obs_end)
    assert not any(traj.response_mask[obs])
    w = loss_weights(traj, mask_tokens=True, mask_trajectories=True)
    assert float(w[obs].abs().sum()) == 0.0
    # counted in the metrics (the trainer scores trajectories before it reduces them)
    score([traj], "imagent", 0.5)
    row = rollout_metrics([traj], [w], cfg.tool_names)
    assert row["rollout/tool_calls/rotate"] == 1.0 and row["rollout/tool_calls/confirm"] == 0.0
    # labelled in the attention spans
    regions = trajectory_regions(traj, SpecialIds.from_tokenizer(policy.tokenizer))
    assert regions.image_origin == {1: "input", 2: "input", 3: "input", 4: "rotate"}


def test_user_tool_failures_are_data():
    resolve_tools(BROKEN)
    frame = ImageFrame(14, 2, 56 * 56, 112 * 112)
    images = list(_sample().images)
    for args, message in (('{"image": 1}', "failed (RuntimeError)"), ("{}", "invalid image")):
        payload = f'{{"name": "broken", "arguments": {args}}}'
        res = run_tool(payload, images, frame, ("broken",))
        assert not res.ok and res.images == [] and message in res.text
        assert res.text.startswith("Error: ")


def test_ablate_tools_flag_replaces_the_tool_set_of_tool_arms():
    cfgs = {c.name: c for c in grid_arms("smoke", (0,), ("full", "tools_none"), tools=ROTATE)}
    assert cfgs["full-s0"].agent.tool_names == ("rotate",)
    assert cfgs["tools_none-s0"].agent.tool_names == ()


def test_pad_box_grows_small_boxes_to_one_merged_patch():
    x1, y1, x2, y2 = pad_box((10, 10, 14, 40), 28, 100, 100)
    assert (x2 - x1, y2 - y1) == (28, 30) and x1 <= 10 and x2 >= 14
    assert pad_box((0, 0, 5, 5), 28, 100, 100) == (0, 0, 28, 28)  # kept inside the image
    assert pad_box((95, 95, 100, 100), 28, 100, 100) == (72, 72, 100, 100)
    assert pad_box((0, 0, 5, 5), 28, 20, 50) == (0, 0, 20, 28)  # at most the image's side


@pytest.mark.parametrize("policy_name", ["native", "fill"])
def test_confirm_on_a_small_box_costs_at_most_crop_max_pixels(policy, policy_name):
    """Qwen2.5-VL-7B's pixel limits (up to 16,384 tokens an image): a ``confirm`` on a
    100 x 80 px box returns at most ``crop_max_pixels`` worth of tokens under either policy."""
    processor = Qwen2VLImageProcessorPil(temporal_patch_size=2, **QWEN_7B_PIXELS)
    crop_max = 224 * 224  # 64 tokens
    cfg = AgentConfig(crop_policy=policy_name, crop_max_pixels=crop_max, max_turns=2)
    agent = Agent(policy.tokenizer, processor, cfg)
    first = agent.start(_sample(size=(1000, 800), n=1))
    call = '<tool_call>{"name": "confirm", "arguments": {"image": 1, "bbox_2d": [300, 200, 400, 280]}}</tool_call>'
    ids = policy.tokenizer.encode(call, add_special_tokens=False) + [agent.prompts.ids.im_end]
    ep = _Episode(first, list(first.images[i].image for i in range(1)))
    agent.step(ep, GenResult(ids, [-1.0] * len(ids), True), 0)
    assert ep.traj.events[0].ok
    crop = ep.traj.images[1]
    assert crop.n_tokens(2) <= crop_max // 28**2
    if policy_name == "native":  # the original pixels (model frame 1008 x 812): 12 tokens
        (w, h), (x1, y1, x2, y2) = crop.image.size, crop.bbox
        assert (w, h) == (x2 - x1, y2 - y1) and abs(w - 100) <= 1 and abs(h - 80) <= 1
        assert crop.n_tokens(2) == 12
    # without a crop budget, "fill" would zoom the crop to the processor's 12.8 M px
    frame = ImageFrame(**QWEN_7B_PIXELS)
    payload = call.removeprefix("<tool_call>").removesuffix("</tool_call>")
    big = run_tool(payload, [ep.inputs[0]], frame, ("confirm",), "fill").images[0].image
    assert frame.size(big)[0] * frame.size(big)[1] // 28**2 > 10_000


def test_pixel_overrides_reach_the_image_processor(policy):
    processor = Qwen2VLImageProcessorPil(temporal_patch_size=2, **QWEN_7B_PIXELS)
    agent = Agent(policy.tokenizer, processor, AgentConfig(max_pixels=200_704))  # 256 tokens
    traj = agent.start(_sample(size=(1000, 800), n=1))
    assert traj.images[0].n_tokens(2) <= 256 and agent.frame.max_pixels == 200_704
    with pytest.raises(ValueError, match="crop_policy"):
        AgentConfig(crop_policy="zoom")
    with pytest.raises(ValueError, match="min_pixels"):
        AgentConfig(min_pixels=10_000, max_pixels=5_000)


def test_image_token_budget_flags_over_budget(policy, scripted):
    agent0 = Agent(policy.tokenizer, policy.image_processor, AgentConfig())
    per_input = agent0.start(_sample()).images[0].n_tokens(agent0.merge)
    cfg = AgentConfig(max_turns=3, max_image_tokens=3 * per_input + 1)  # room for no more image
    agent = Agent(policy.tokenizer, policy.image_processor, cfg)
    call = '<tool_call>{"name": "reflect", "arguments": {"images": [1]}}</tool_call>'
    (traj,) = rollout(agent, scripted(policy.tokenizer, [[call, ANSWER_2]]), [_sample()], 1)
    assert traj.flags["over_budget"] and len(traj.images) == 3 and len(traj.events) == 1
    text = policy.tokenizer.decode(traj.token_ids[traj.events[0].obs_start :])
    assert "image tokens exceeded" in text
