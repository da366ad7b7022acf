"""Region span map and replay attention masses against an eager reference (docs/method.md §6)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from agent.modeling import TinySpec, build_tiny_model, load_policy
from analysis.replay import RegionRecorder, recording, replay_attention
from analysis.spans import SpecialIds, check_image_grid, region_labels

# (family, shape): grouped-query Qwen2.5-VL, multi-head Qwen2.5-VL, grouped-query Qwen2-VL.
SPECS = {
    "gqa": ("qwen2_5_vl", TinySpec()),
    "mha3": ("qwen2_5_vl", TinySpec(heads=4, kv_heads=4, text_layers=3)),
    "qwen2vl-gqa": ("qwen2_vl", TinySpec(text_layers=2, heads=4, kv_heads=2)),
}
# (width, height): 16, 12, 6 and 4 image tokens; the tool-returned one has 9.
INPUT_SIZES = [(112, 112), (168, 112), (56, 84), (56, 56)]
REFLECT_SIZE = (84, 84)


@dataclass
class Case:
    """A tiny model, its eager twin, and one synthetic multi-turn trajectory."""

    policy: object
    eager: torch.nn.Module
    ids: SpecialIds
    token_ids: list[int]
    response_mask: list[int]
    prompt_len: int
    origins: list[str]
    inputs: dict


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def _trajectory(policy) -> tuple[list[int], list[int], int, list[str], dict]:
    """System turn, user turn with 4 images, policy tokens, a tool turn with 1 image, policy tokens."""
    tok, proc = policy.tokenizer, policy.image_processor
    ids = SpecialIds.from_tokenizer(tok)
    images = [_image(s, i) for i, s in enumerate([*INPUT_SIZES, REFLECT_SIZE])]
    pix = proc(images=images, return_tensors="pt")
    n_pad = [int(t * h * w) // proc.merge_size**2 for t, h, w in pix["image_grid_thw"].tolist()]

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    def image(k: int) -> list[int]:
        return [ids.vision_start] + [ids.image_pad] * n_pad[k] + [ids.vision_end]

    seq = enc("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    for k in range(4):
        seq += enc(f"Image {k + 1}:") + image(k)
    seq += enc("Which image is different?<|im_end|>\n<|im_start|>assistant\n")
    prompt_len = len(seq)
    mask = [0] * prompt_len

    def add(piece: list[int], sampled: bool) -> None:
        seq.extend(piece)
        mask.extend([int(sampled)] * len(piece))

    call = '<tool_call>{"name": "reflect", "arguments": {"images": [1, 2]}}</tool_call><|im_end|>'
    add(enc("<think> I see a red square </think>" + call), True)
    add(enc("\n<|im_start|>user\n<tool_response>Here are the images again."), False)
    add(image(4), False)
    add(enc("</tool_response><|im_end|>\n<|im_start|>assistant\n"), False)
    add(enc("<think> so </think><answer>2</answer><|im_end|>"), True)
    input_ids = torch.tensor([seq])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == ids.image_pad).to(torch.int32),
        "pixel_values": pix["pixel_values"],
        "image_grid_thw": pix["image_grid_thw"],
    }
    return seq, mask, prompt_len, ["input"] * 4 + ["reflect"], inputs


@pytest.fixture(scope="session", params=list(SPECS))
def case(request, tmp_path_factory) -> Case:
    family, spec = SPECS[request.param]
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), spec, seed=1, family=family)
    policy = load_policy(path)
    seq, mask, prompt_len, origins, inputs = _trajectory(policy)
    eager = load_policy(path, attn_implementation="eager").model
    ids = SpecialIds.from_tokenizer(policy.tokenizer)
    return Case(policy, eager, ids, seq, mask, prompt_len, origins, inputs)


def _region_map(c: Case):
    return region_labels(c.token_ids, c.response_mask, c.ids, c.prompt_len, c.origins)


def _reference(c: Case, rmap) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow loop over eager ``output_attentions`` rows: mass and value-weighted mass per region."""
    values: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.v_proj.register_forward_hook(
            lambda _m, _i, out, i=i: values.__setitem__(i, out.detach())
        )
        for i, layer in enumerate(c.eager.model.language_model.layers)
    ]
    try:
        with torch.no_grad():
            out = c.eager(**c.inputs, output_attentions=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    names = rmap.region_names
    n_tok, n_layer = len(rmap.generated_positions), len(out.attentions)
    n_head = out.attentions[0].shape[1]
    head_dim = c.eager.config.text_config.hidden_size // n_head
    mass = torch.zeros(n_tok, n_layer, n_head, len(names), dtype=torch.float64)
    vmass = torch.zeros_like(mass)
    for layer, att in enumerate(out.attentions):
        kv_heads = values[layer].shape[-1] // head_dim
        v = values[layer][0].view(att.shape[-1], kv_heads, -1).norm(dim=-1)  # [k_pos, kv_head]
        for t, p in enumerate(rmap.generated_positions):
            q = p - 1
            for h in range(n_head):
                row = att[0, h, q].double()
                weighted = row * v[:, h // (n_head // kv_heads)].double()
                weighted = weighted / weighted.sum()
                for k in range(q + 1):
                    r = names.index("self" if k == q else rmap.labels[k])
                    mass[t, layer, h, r] += row[k]
                    vmass[t, layer, h, r] += weighted[k]
    return mass, vmass


def test_region_labels_hand_built() -> None:
    ids = SpecialIds(
        im_start=1, im_end=2, vision_start=3, vision_end=4, image_pad=5, system_role=(6,), newline=7
    )
    seq = [1, 6, 8, 2, 7, 1, 9, 3, 5, 5, 4, 3, 5, 4, 2, 7, 1, 10, 11, 2, 7, 1, 3, 5, 4, 12, 11]
    mask = [0] * 18 + [1, 1] + [0] * 6 + [1]
    rmap = region_labels(seq, mask, ids, prompt_len=18, image_origins=["input", "input", "confirm"])
    assert rmap.labels == (
        ["sink"] + ["system"] * 4 + ["user_text"] * 2
        + ["image_wrap", "image:1", "image:1", "image_wrap", "image_wrap", "image:2", "image_wrap"]
        + ["user_text"] * 4 + ["generated"] * 2 + ["tool_text"] * 2
        + ["image_wrap", "image:3", "image_wrap", "tool_text", "generated"]
    )  # fmt: skip
    assert rmap.region_names == [
        "sink", "system", "user_text", "image_wrap", "tool_text", "generated", "self",
        "image:1", "image:2", "image:3",
    ]  # fmt: skip
    assert rmap.region_index.tolist() == [rmap.region_names.index(x) for x in rmap.labels]
    assert rmap.image_origin == {1: "input", 2: "input", 3: "confirm"}
    assert rmap.image_sizes == {1: 2, 2: 1, 3: 1}
    assert rmap.generated_positions == [18, 19, 26]
    # A first turn that is not a system turn leaves the system region empty.
    no_system = region_labels([1, 9, 8, 2, 7, 1, 11], [0] * 6 + [1], ids, prompt_len=6)
    assert no_system.labels == ["sink"] + ["user_text"] * 5 + ["generated"]


def test_region_labels_validation() -> None:
    ids = SpecialIds(im_start=1, im_end=2, vision_start=3, vision_end=4, image_pad=5)
    with pytest.raises(ValueError, match="response_mask has 3 entries but token_ids has 4"):
        region_labels([1, 9, 9, 9], [0, 0, 1], ids, prompt_len=2)
    with pytest.raises(
        ValueError, match="image_origins has 2 entries but token_ids has 1 image runs"
    ):
        region_labels(
            [1, 3, 5, 4, 9], [0, 0, 0, 0, 1], ids, prompt_len=4, image_origins=["input", "reflect"]
        )


def test_special_ids_from_tokenizer(case: Case) -> None:
    tok = case.policy.tokenizer
    assert case.ids.image_pad == tok.convert_tokens_to_ids("<|image_pad|>")
    rmap = _region_map(case)
    text = tok.decode([t for t, lab in zip(case.token_ids, rmap.labels) if lab == "system"])
    assert text == "system\nYou are a helpful assistant.<|im_end|>\n"
    assert [rmap.image_sizes[k] for k in range(1, 6)] == [16, 12, 6, 4, 9]
    assert rmap.image_origin[5] == "reflect"


def test_check_image_grid(case: Case) -> None:
    grid = case.inputs["image_grid_thw"]
    merge = case.policy.image_processor.merge_size
    check_image_grid(case.token_ids, grid, merge, case.ids)
    pads = [i for i, t in enumerate(case.token_ids) if t == case.ids.image_pad]
    third_run = pads[16 + 12]  # first pad of image 3 (images 1, 2 hold 16 and 12)
    broken = case.token_ids[:third_run] + case.token_ids[third_run + 1 :]
    with pytest.raises(
        ValueError,
        match=r"image 3 has 5 image_pad tokens but image_grid_thw\[2\]=\(1,6,4\) implies 6",
    ):
        check_image_grid(broken, grid, merge, case.ids)


def test_replay_matches_eager_rows(case: Case) -> None:
    rmap = _region_map(case)
    record = replay_attention(case.policy.model, case.inputs, rmap, value_weighted=True)
    ref, ref_v = _reference(case, rmap)
    spec = case.policy.model.config.text_config
    assert record.mass.shape == (
        len(rmap.generated_positions),
        spec.num_hidden_layers,
        spec.num_attention_heads,
        len(rmap.region_names),
    )
    assert record.mass.dtype == torch.float32
    torch.testing.assert_close(record.mass.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(record.value_mass.double(), ref_v, atol=1e-5, rtol=0)
    ones = torch.ones(record.mass.shape[:3])
    torch.testing.assert_close(record.mass.sum(-1), ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(record.value_mass.sum(-1), ones, atol=1e-5, rtol=0)
    assert record.positions == rmap.generated_positions
    # Replaying over an eager model reduces inside eager attention and gives the same masses.
    over_eager = replay_attention(case.eager, case.inputs, rmap)
    torch.testing.assert_close(over_eager.mass.double(), ref, atol=1e-5, rtol=0)
    assert case.eager.config.text_config._attn_implementation == "eager"
    # Images are attended at all, and "self" is a real share.
    assert record.mass[..., rmap.region_names.index("image:5")].sum() > 0
    assert (record.mass[..., rmap.self_index] > 0).all()


def test_chunking_and_layer_selection_are_invariant(case: Case) -> None:
    rmap = _region_map(case)
    full = replay_attention(case.policy.model, case.inputs, rmap, chunk=256)
    auto = replay_attention(case.policy.model, case.inputs, rmap)  # 2 MiB of scores per chunk
    torch.testing.assert_close(auto.mass, full.mass, atol=1e-6, rtol=0)
    small = replay_attention(case.policy.model, case.inputs, rmap, chunk=3)
    torch.testing.assert_close(small.mass, full.mass, atol=1e-6, rtol=0)
    last = replay_attention(case.policy.model, case.inputs, rmap, layers=[1])
    assert last.layers == [1]
    torch.testing.assert_close(last.mass[:, 0], full.mass[:, 1], atol=1e-6, rtol=0)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _assert_restored(model) -> None:
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert not any("_relook_region_recorder" in m.__dict__ for m in model.modules())


def test_implementation_restored_even_on_errors(case: Case) -> None:
    model = case.policy.model
    rmap = _region_map(case)
    before = _logits(model, case.inputs)
    replay_attention(model, case.inputs, rmap, chunk=7)
    _assert_restored(model)
    assert torch.equal(_logits(model, case.inputs), before)

    recorder = RegionRecorder(
        rmap.region_index, torch.tensor([5]), len(rmap.region_names), rmap.self_index
    )
    with pytest.raises(RuntimeError, match="boom"), recording(model, recorder):
        assert model.config.text_config._attn_implementation == "relook_regions"
        raise RuntimeError("boom")
    _assert_restored(model)
    # An error raised inside the attention function (region map of the wrong length).
    short = RegionRecorder(
        rmap.region_index[:-1], torch.tensor([5]), len(rmap.region_names), rmap.self_index
    )
    with pytest.raises(ValueError, match="region map has"), recording(model, short):
        _logits(model, case.inputs)
    _assert_restored(model)
    assert torch.equal(_logits(model, case.inputs), before)


def test_to_frame(case: Case) -> None:
    rmap = _region_map(case)
    record = replay_attention(case.policy.model, case.inputs, rmap)
    n_tok, n_layer, n_head, n_reg = record.mass.shape
    turns = [0 if p < rmap.generated_positions[-1] - 10 else 1 for p in rmap.generated_positions]
    df = record.to_frame("traj-0", turns=turns)
    assert list(df.columns) == [
        "trajectory",
        "token",
        "pos",
        "turn",
        "layer",
        "head",
        "region",
        "image",
        "origin",
        "mass",
        "keys",
    ]
    dtypes = {c: "str" if pd.api.types.is_object_dtype(t) else str(t) for c, t in df.dtypes.items()}
    assert dtypes == {  # plain strings are "object" on pandas 2, "str" on pandas 3
        "trajectory": "str", "token": "int32", "pos": "int32", "turn": "int16", "layer": "int16",
        "head": "int16", "region": "category", "image": "int16", "origin": "str", "mass": "float32",
        "keys": "int32",
    }  # fmt: skip
    assert len(df) == n_tok * n_layer * n_head * n_reg
    sums = df.groupby(["token", "layer", "head"])["mass"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-5)
    pick = (df["token"] == 2) & (df["layer"] == 1) & (df["head"] == 3) & (df["region"] == "image:5")
    row = df[pick].iloc[0]
    assert row.pos == rmap.generated_positions[2] and row.image == 5 and row.origin == "reflect"
    assert row.mass == pytest.approx(
        float(record.mass[2, 1, 3, rmap.region_names.index("image:5")])
    )
    assert set(df.loc[df["image"] == -1, "origin"]) == {""}
    assert df["turn"].tolist()[:: n_layer * n_head * n_reg] == turns
    # keys: the visible keys per region; they sum to the token's position, and an image's count
    # is its size once it precedes the query.
    keys = df[(df["layer"] == df["layer"].min()) & (df["head"] == 0)]
    per_token = keys.groupby("token")["keys"].sum().to_numpy()
    np.testing.assert_array_equal(per_token, np.asarray(rmap.generated_positions))
    keys = keys.assign(region=keys["region"].astype(str))
    first = keys[keys["token"] == 0].set_index("region")["keys"]
    assert first["self"] == 1 and first["sink"] == 1
    assert first["image:1"] == rmap.image_sizes[1] and first["image:5"] == 0
    last = keys[keys["token"] == n_tok - 1].set_index("region")["keys"]
    assert last["image:5"] == rmap.image_sizes[5]
    assert last["generated"] == n_tok - 2  # every earlier token but its own query key
    weighted = replay_attention(case.policy.model, case.inputs, rmap, value_weighted=True)
    assert "value_mass" in weighted.to_frame("t").columns and "value_mass" not in df.columns
