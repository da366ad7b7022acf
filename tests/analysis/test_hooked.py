"""nnsight hooked wrappers: canonical hooks, generation-time recording equal to replay, cleanup."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from agent.modeling import TinySpec, build_tiny_model, load_policy
from analysis.hooked import HOOK_SHAPES, HookedVLM, adapter_for
from analysis.replay import replay_attention
from analysis.spans import SpecialIds, region_labels

# Two families, grouped-query and multi-head attention.
MODELS = {
    "qwen2_5_vl-gqa": ("qwen2_5_vl", TinySpec(text_layers=2, heads=4, kv_heads=2)),
    "qwen2_vl-mha": ("qwen2_vl", TinySpec(text_layers=3, heads=4, kv_heads=4)),
}
SIZES = [(112, 112), (168, 112), (56, 84), (56, 56)]  # 16, 12, 6 and 4 image tokens
TOOL_SIZE = (84, 84)  # a reflect-returned image, 9 tokens


@dataclass
class Model:
    policy: object
    eager: torch.nn.Module
    ids: SpecialIds


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory) -> Model:
    family, spec = MODELS[request.param]
    path = build_tiny_model(tmp_path_factory.mktemp(family), spec, seed=3, family=family)
    policy = load_policy(path)
    eager = load_policy(path, attn_implementation="eager").model
    return Model(policy, eager, SpecialIds.from_tokenizer(policy.tokenizer))


def _image(size, seed) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def _inputs(m: Model, seq: list[int], images: list[Image.Image]) -> dict:
    pix = m.policy.image_processor(images=images, return_tensors="pt")
    ids = torch.tensor([seq])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == m.ids.image_pad).to(torch.int32),
        "pixel_values": pix["pixel_values"],
        "image_grid_thw": pix["image_grid_thw"],
    }


def _image_ids(m: Model, image: Image.Image) -> list[int]:
    grid = m.policy.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    n = int(grid.prod()) // m.policy.image_processor.merge_size**2
    return [m.ids.vision_start] + [m.ids.image_pad] * n + [m.ids.vision_end]


def _enc(m: Model, text: str) -> list[int]:
    return m.policy.tokenizer.encode(text, add_special_tokens=False)


def _prompt(m: Model) -> tuple[list[int], list[Image.Image]]:
    images = [_image(s, i) for i, s in enumerate(SIZES)]
    seq = _enc(m, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    for k, image in enumerate(images):
        seq += _enc(m, f"Image {k + 1}:") + _image_ids(m, image)
    seq += _enc(m, "Which image is different?<|im_end|>\n<|im_start|>assistant\n")
    return seq, images


def test_canonical_hooks_have_documented_shapes(model: Model) -> None:
    seq, images = _prompt(model)
    inputs = _inputs(model, seq, images)
    text = model.policy.model.config.text_config
    heads, kv, d_model = text.num_attention_heads, text.num_key_value_heads, text.hidden_size
    d_head, pos = d_model // heads, len(seq)
    hooked = HookedVLM(model.policy.model)
    names = [n for n in hooked.hook_names() if "pattern" not in n]
    assert all(
        n.replace(".0.", ".{L}.", 1).replace("visual.blocks.{L}", "visual.blocks.{B}")
        in HOOK_SHAPES
        for n in names
        if n.count(".") and n.split(".")[1] == "0"
    )
    cache = hooked.run_with_cache(inputs, names)
    last = text.num_hidden_layers - 1
    n_image_tokens = int((inputs["input_ids"] == model.ids.image_pad).sum())
    expect = {
        "embed": (1, pos, d_model),
        f"blocks.{last}.hook_resid_post": (1, pos, d_model),
        f"blocks.{last}.attn.hook_q": (1, heads, pos, d_head),
        f"blocks.{last}.attn.hook_k": (1, kv, pos, d_head),
        f"blocks.{last}.attn.hook_v": (1, kv, pos, d_head),
        f"blocks.{last}.attn.hook_z": (1, pos, heads, d_head),
        f"blocks.{last}.attn.hook_result": (1, pos, d_model),
        "visual.hook_merged": (n_image_tokens, d_model),
        "hook_logits": (1, pos, text.vocab_size),
    }
    for name, shape in expect.items():
        assert tuple(cache[name].shape) == shape, name
    assert cache["visual.blocks.0.hook_out"].shape[0] == int(
        inputs["image_grid_thw"].prod(-1).sum()
    )
    # The hooked values are the model's: logits equal a plain forward's.
    with torch.no_grad():
        plain = model.policy.model(**inputs, use_cache=False).logits
    torch.testing.assert_close(cache["hook_logits"], plain)
    # Under eager attention hook_pattern is the attention matrix transformers returns.
    eager = HookedVLM(model.eager)
    pattern = eager.run_with_cache(inputs, ["blocks.0.attn.hook_pattern"])[
        "blocks.0.attn.hook_pattern"
    ]
    with torch.no_grad():
        ref = model.eager(**inputs, use_cache=False, output_attentions=True).attentions[0]
    torch.testing.assert_close(pattern, ref)


def test_generation_recording_equals_replay(model: Model) -> None:
    """Two assistant turns recorded while generating (nnsight trace of generate), with a tool
    turn returning an image between them, equal the replay of the finished trajectory."""
    hooked = HookedVLM(model.policy.model)
    seq, images = _prompt(model)
    prompt_len = len(seq)
    suppress = [model.ids.vision_start, model.ids.vision_end, model.ids.image_pad]
    gen = dict(do_sample=False, suppress_tokens=suppress)
    origins = ["input"] * 4
    mask = [0] * prompt_len
    prefix_map = region_labels(seq, mask, model.ids, prompt_len, origins)
    turn1, rec1 = hooked.generate_regions(_inputs(model, seq, images), prefix_map, 7, **gen)
    seq, mask = seq + turn1, mask + [1] * len(turn1)
    tool_image = _image(TOOL_SIZE, 9)
    observation = (
        _enc(model, "<|im_end|>\n<|im_start|>user\n<tool_response>Here is image 2 again.")
        + _image_ids(model, tool_image)
        + _enc(model, "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    )
    seq, mask = seq + observation, mask + [0] * len(observation)
    images, origins = [*images, tool_image], [*origins, "reflect"]
    prefix_map = region_labels(seq, mask, model.ids, prompt_len, origins)
    turn2, rec2 = hooked.generate_regions(
        _inputs(model, seq, images), prefix_map, 5, value_weighted=True, **gen
    )
    seq, mask = seq + turn2, mask + [1] * len(turn2)
    # Greedy generation under the trace is the model's own greedy generation.
    with torch.no_grad():
        plain = model.policy.model.generate(
            **_inputs(model, seq[: -len(turn2)], images), max_new_tokens=5, min_new_tokens=5, **gen
        )
    assert plain[0, -5:].tolist() == turn2
    full_map = region_labels(seq, mask, model.ids, prompt_len, origins)
    replay = replay_attention(
        model.policy.model, _inputs(model, seq, images), full_map, value_weighted=True
    )
    assert rec1.positions + rec2.positions == full_map.generated_positions
    assert rec2.region_names == full_map.region_names
    n_reg = len(full_map.region_names)
    first = torch.nn.functional.pad(rec1.mass, (0, n_reg - rec1.mass.shape[-1]))
    torch.testing.assert_close(torch.cat([first, rec2.mass]), replay.mass, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec2.value_mass, replay.value_mass[len(turn1) :], atol=1e-5, rtol=0)
    keys1 = torch.nn.functional.pad(rec1.keys, (0, n_reg - rec1.keys.shape[-1]))
    assert torch.equal(torch.cat([keys1, rec2.keys]), replay.keys)
    torch.testing.assert_close(
        rec2.mass.sum(-1), torch.ones(rec2.mass.shape[:3]), atol=1e-5, rtol=0
    )
    assert rec2.image_origin[5] == "reflect"
    assert rec2.mass[..., full_map.region_names.index("image:5")].sum() > 0


def _hooks(module: torch.nn.Module) -> int:
    """Hooks and instance attributes (nnsight's patched ``forward`` and state) of every module."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m.__dict__)
        for m in module.modules()
    )


def test_hooks_removed_after_use_and_errors(model: Model) -> None:
    seq, images = _prompt(model)
    inputs = _inputs(model, seq, images)
    net = model.policy.model
    with torch.no_grad():
        before = net(**inputs, use_cache=False).logits
    n_hooks = _hooks(net)
    hooked = HookedVLM(net)
    hooked.run_with_cache(inputs, ["blocks.0.attn.hook_q"])
    prefix_map = region_labels(seq, [0] * len(seq), model.ids, len(seq))
    hooked.generate_regions(inputs, prefix_map, 2, do_sample=False)
    assert _hooks(net) == n_hooks
    with (
        pytest.raises(RuntimeError, match="boom"),
        torch.no_grad(),
        hooked.session() as nn,
        nn.trace(**inputs),
    ):
        hooked.value("blocks.0.attn.hook_q").save()
        raise RuntimeError("boom")
    assert _hooks(net) == n_hooks and "forward" not in net.model.__dict__
    with pytest.raises(RuntimeError, match="only inside"):
        hooked.value("blocks.0.attn.hook_q")
    with torch.no_grad():
        assert torch.equal(net(**inputs, use_cache=False).logits, before)
    assert net.config.text_config._attn_implementation == "sdpa"


def test_bad_names_and_families(model: Model, tmp_path) -> None:
    hooked = HookedVLM(model.policy.model)
    with pytest.raises(ValueError, match="unknown hook name 'blocks.0.attn.hook_attn'"):
        hooked.run_with_cache({}, ["blocks.0.attn.hook_attn"])
    with pytest.raises(ValueError, match="layer 99 out of range"):
        seq, images = _prompt(model)
        hooked.generate_regions(
            _inputs(model, seq, images),
            region_labels(seq, [0] * len(seq), model.ids, len(seq)),
            2,
            layers=[99],
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2)
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"no relook hook adapter for model family 'llama' \(LlamaForCausalLM\)"
    ):
        adapter_for(llama)
    with pytest.raises(ValueError, match="'llama'"):
        HookedVLM(llama)
