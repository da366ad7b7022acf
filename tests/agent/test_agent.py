"""Agent: tools, malformed calls as data, stop rules, flags, the two-level loss mask, switches."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from agent.data.tasks import Sample
from agent.prompting import ChatIds
from agent.rollout import Agent, AgentConfig, HFGenerator, rollout
from agent.tools import ImageFrame, confirm, reflect, run_tool
from train.batching import loss_weights
from train.rewards import score

FRAME = ImageFrame(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)


def _sample(n_images: int = 3, answer: str = "2") -> Sample:
    images = tuple(
        Image.new("RGB", (224, 168), (40 * k, 90, 200 - 30 * k)) for k in range(n_images)
    )
    return Sample(
        id="test-0-000000", split="test", family="find", images=images, question="Which image contains the red square?",
        answer=answer, answer_type="index", target_image=2, target_bbox=(10, 10, 30, 30), meta={},
    )  # fmt: skip


def _run(
    policy, scripts, cfg=None, sample=None, group_size=None, gain=0.5, scripted=None, cut=False
):
    cfg = cfg or AgentConfig(tools="both", max_turns=4)
    agent = Agent(policy.tokenizer, policy.image_processor, cfg)
    gen = scripted(policy.tokenizer, scripts, cut=cut)
    trajs = rollout(agent, gen, [sample or _sample()], group_size=group_size or len(scripts))
    return score(trajs, "imagent", tool_gain=gain)


CALL_CONFIRM = '<think>zoom</think><tool_call>{"name": "confirm", "arguments": {"image": 2, "bbox_2d": [8, 8, 40, 40]}}</tool_call>'
CALL_REFLECT = '<think>again</think><tool_call>{"name": "reflect", "arguments": {"images": [1, 3]}}</tool_call>'
ANSWER_2 = "<think>it is two</think><answer>Image 2</answer>"


def test_tool_trajectory_ids_images_and_loss_mask(policy, scripted):
    (traj,) = _run(policy, [[CALL_CONFIRM, CALL_REFLECT, ANSWER_2]], scripted=scripted)
    ids = ChatIds.from_tokenizer(policy.tokenizer)
    assert [e.kind for e in traj.events] == ["tool_call", "tool_call", "answer"]
    assert [e.tool for e in traj.events[:2]] == ["confirm", "reflect"] and all(
        e.ok for e in traj.events[:2]
    )
    assert [r.origin for r in traj.images] == ["input"] * 3 + ["confirm", "reflect", "reflect"]
    assert traj.images[3].bbox is not None and traj.images[3].call == 0 and traj.images[4].call == 1
    assert traj.answer == "Image 2" and traj.acc == 1.0 and traj.used == 1.0
    assert traj.reward == pytest.approx(1.5)  # acc * (1 + 0.5 * used) + 0.2 * 0
    # image pads per image match the processor's grid (t*h*w / merge^2)
    tok = torch.tensor(traj.token_ids)
    pads = int((tok == ids.image_pad).sum())
    assert pads == sum(r.n_tokens(2) for r in traj.images)
    # level-1 mask: 1 exactly on sampled tokens (each turn's text + its end token)
    w = loss_weights(traj, mask_tokens=True, mask_trajectories=True)
    sampled = torch.zeros(len(traj.token_ids))
    for e in traj.events:
        sampled[e.start : e.end] = 1
        assert traj.token_ids[e.end - 1] == ids.im_end  # the turn's end token is sampled
    assert torch.equal(w, sampled)
    assert w[: traj.prompt_len].sum() == 0  # prompt
    assert w[tok == ids.image_pad].sum() == 0  # every image token, tool-returned included
    for e in traj.events[:2]:
        assert w[e.obs_start : e.obs_end].sum() == 0  # tool-inserted text and images
        assert (tok[e.obs_start : e.obs_end] == ids.image_pad).any()
    # the mask switch: off = every token after the prompt
    w_off = loss_weights(traj, mask_tokens=False, mask_trajectories=True)
    assert w_off[traj.prompt_len :].eq(1).all() and w_off[: traj.prompt_len].sum() == 0


@pytest.mark.parametrize(
    "payload, message",
    [
        ("{not json", "not valid JSON"),
        ('{"name": "zoom", "arguments": {}}', "unknown tool 'zoom'"),
        (
            '{"name": "confirm", "arguments": {"image": 7, "bbox_2d": [0, 0, 20, 20]}}',
            "image 7 is out of range",
        ),
        (
            '{"name": "confirm", "arguments": {"image": 1, "bbox_2d": [50, 50, 10, 10]}}',
            "empty or inverted",
        ),
        (
            '{"name": "confirm", "arguments": {"image": 1, "bbox_2d": [500, 500, 900, 900]}}',
            "outside the image",
        ),
        (
            '{"name": "confirm", "arguments": {"image": 1, "bbox_2d": [0, 0, 2]}}',
            "list of 4 numbers",
        ),
        (
            '{"name": "confirm", "arguments": {"image": 1, "bbox_2d": [0, 0, 100, 1.5]}}',
            "smaller than 4 px",
        ),
        ('{"name": "reflect", "arguments": {"images": [0]}}', "image 0 is out of range"),
        ('{"name": "reflect", "arguments": {"images": "all"}}', "non-empty list"),
        ('["confirm"]', "JSON object"),
    ],
)
def test_malformed_calls_are_error_observations(payload, message):
    images = list(_sample().images)
    res = run_tool(payload, images, FRAME, ("reflect", "confirm"))
    assert (
        not res.ok and res.text.startswith("Error: ") and message in res.text and res.images == []
    )


def test_failed_call_in_episode_sets_flag_and_continues(policy, scripted):
    bad = '<think>x</think><tool_call>{"name": "confirm", "arguments": {"image": 9, "bbox_2d": [1, 1, 9, 9]}}</tool_call>'
    (traj,) = _run(policy, [[bad, ANSWER_2]], scripted=scripted)
    assert traj.flags["failed_call"] and traj.events[0].error.startswith("Error: image 9")
    assert traj.events[1].kind == "answer" and traj.answer == "Image 2"  # the episode went on
    obs = policy.tokenizer.decode(traj.token_ids[traj.events[0].obs_start : traj.events[0].obs_end])
    assert "Error: image 9 is out of range" in obs
    assert traj.fmt == -1.0 and traj.used == 0.0
    assert loss_weights(traj, True, True).sum() == 0  # level-2 mask
    assert loss_weights(traj, True, False).sum() > 0


def test_void_truncated_and_budget_flags(policy, scripted):
    void, loop = ["<think>hmm</think> no answer"], [CALL_REFLECT] * 5
    trajs = _run(
        policy,
        [void, loop, [ANSWER_2]],
        cfg=AgentConfig(tools="both", max_turns=3),
        scripted=scripted,
    )
    assert trajs[0].flags["void_turn"] and len(trajs[0].events) == 1
    assert trajs[1].flags["truncated"] and len(trajs[1].events) == 3 and trajs[1].answer is None
    assert not any(trajs[2].flags.values())
    assert [loss_weights(t, True, True).sum() > 0 for t in trajs] == [False, False, True]
    (over,) = _run(
        policy, [[CALL_REFLECT] * 3], cfg=AgentConfig(tools="both", max_images=4), scripted=scripted
    )
    assert over.flags["over_budget"] and len(over.images) == 3
    assert "image budget" in policy.tokenizer.decode(over.token_ids[over.events[0].obs_start :])


def test_cut_turn_is_closed_by_environment(policy, scripted):
    (traj,) = _run(policy, [[CALL_REFLECT, ANSWER_2]], scripted=scripted, cut=True)
    e = traj.events[0]
    assert e.hit_length_limit and e.kind == "tool_call"
    ids = ChatIds.from_tokenizer(policy.tokenizer)
    assert traj.token_ids[e.obs_start] == ids.im_end and traj.response_mask[e.obs_start] == 0


def test_tools_switch(policy, scripted):
    with_tools = Agent(policy.tokenizer, policy.image_processor, AgentConfig(tools="both")).start(
        _sample()
    )
    none = Agent(policy.tokenizer, policy.image_processor, AgentConfig(tools="none")).start(
        _sample()
    )
    only_confirm = Agent(
        policy.tokenizer, policy.image_processor, AgentConfig(tools="confirm")
    ).start(_sample())
    dec = policy.tokenizer.decode
    assert '"name": "reflect"' in dec(with_tools.token_ids) and '"name": "confirm"' in dec(
        with_tools.token_ids
    )
    assert "<tools>" not in dec(none.token_ids) and "tool_call" not in dec(none.token_ids)
    assert '"name": "reflect"' not in dec(only_confirm.token_ids)
    # with tools=none a call is not executed: the turn is void
    (t_none,) = _run(policy, [[CALL_REFLECT]], cfg=AgentConfig(tools="none"), scripted=scripted)
    assert t_none.flags["void_turn"] and len(t_none.images) == 3
    (t_conf,) = _run(
        policy, [[CALL_REFLECT, ANSWER_2]], cfg=AgentConfig(tools="confirm"), scripted=scripted
    )
    assert "unknown tool 'reflect'" in t_conf.events[0].error


def test_tool_gain_switch(policy, scripted):
    (with_gain,) = _run(policy, [[CALL_CONFIRM, ANSWER_2]], gain=0.5, scripted=scripted)
    (no_gain,) = _run(policy, [[CALL_CONFIRM, ANSWER_2]], gain=0.0, scripted=scripted)
    assert with_gain.reward == pytest.approx(1.5) and no_gain.reward == pytest.approx(1.0)
    (deepeyes,) = score([with_gain], "deepeyes")
    assert deepeyes.reward == pytest.approx(2.0)  # 0.8 * acc + 0.2 * 0 + 1.2 * [used and acc]
    with pytest.raises(ValueError, match="unknown reward term 'nope'"):
        score([with_gain], "nope")


def test_confirm_maps_model_frame_box_to_original_pixels():
    img = Image.new("RGB", (448, 224))
    fw, fh = FRAME.size(img)  # 448x224 capped at 112*112 px -> 154x70 multiple of 28? check ratio
    assert fw * fh <= FRAME.max_pixels and fw % 28 == 0 and fh % 28 == 0
    res = confirm({"image": 1, "bbox_2d": [0, 0, fw // 2, fh // 2]}, [img], FRAME)
    assert res.ok
    x1, y1, x2, y2 = res.images[0].bbox
    assert (x1, y1) == (0, 0) and abs(x2 - 224) <= 4 and abs(y2 - 112) <= 4
    assert res.images[0].image.width * res.images[0].image.height <= FRAME.max_pixels * 1.05
    assert reflect({}, [img, img]).images[1].source == 2


def test_hf_generator_never_samples_vision_tokens(policy):
    agent = Agent(
        policy.tokenizer, policy.image_processor, AgentConfig(tools="both", max_new_tokens=24)
    )
    tok = policy.tokenizer
    gen = HFGenerator(
        policy.model,
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.pad_token_id,
        policy.vision_token_ids,
        tok.convert_tokens_to_ids("<|image_pad|>"),
    )
    torch.manual_seed(0)
    trajs = rollout(agent, gen, [_sample()], group_size=3)
    for t in trajs:
        sampled = [i for i, m in zip(t.token_ids, t.response_mask) if m]
        assert sampled and not set(sampled) & set(policy.vision_token_ids)
        lp = [x for x, m in zip(t.rollout_log_probs, t.response_mask) if m]
        assert all(x <= 0 for x in lp) and len(lp) == len(sampled)


def test_agent_config_validation():
    with pytest.raises(ValueError, match="AgentConfig.tools"):
        AgentConfig(tools="all")
    with pytest.raises(ValueError, match="AgentConfig.max_turns"):
        AgentConfig(max_turns=0)


def test_hf_generator_batches_left_padded_like_single_sequences(policy):
    """Greedy turns of a left-padded batch (different lengths and image counts) are those of
    one-at-a-time generation, with log-probs equal up to padding's float noise."""
    from agent.rollout import GenRequest

    agent = Agent(policy.tokenizer, policy.image_processor, AgentConfig(tools="both"))
    tok = policy.tokenizer
    args = (
        policy.model,
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.pad_token_id,
        policy.vision_token_ids,
        tok.convert_tokens_to_ids("<|image_pad|>"),
    )
    reqs = []
    for n in (2, 4, 3):
        traj = agent.start(_sample(n_images=n), group=0)
        inputs = traj.model_inputs(tok.convert_tokens_to_ids("<|image_pad|>"))
        reqs.append(GenRequest(traj.token_ids, inputs["pixel_values"], inputs["image_grid_thw"]))
    batched = HFGenerator(*args, batch_size=3).generate(reqs, 12, 0.0)
    single = HFGenerator(*args, batch_size=1).generate(reqs, 12, 0.0)
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids and b.finished == s.finished
        assert torch.allclose(torch.tensor(b.log_probs), torch.tensor(s.log_probs), atol=1e-4)
