"""Image-presence edits, captum attribution and attention knockout against hand-computed twins."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import analysis.attribution as attribution
from agent.modeling import RELOOK_TINY_DIR, TinySpec, build_tiny_model, load_policy
from analysis.attribution import (
    answer_log_prob,
    attention_knockout,
    grey_pixel_rows,
    image_attribution,
    image_knockouts,
    with_images,
)
from analysis.causal import causal_agreement, causal_table
from analysis.replay import replay_attention
from analysis.spans import SpecialIds, image_runs, region_labels
from tests.analysis.test_replay import INPUT_SIZES, REFLECT_SIZE, _image, _trajectory

N_IMAGES = 5  # 4 input images (16, 12, 6, 4 tokens) and 1 reflect image (9 tokens)


@dataclass
class Case:
    """A random tiny model, its eager twin, and one synthetic multi-turn trajectory."""

    policy: object
    eager: torch.nn.Module
    ids: SpecialIds
    token_ids: list[int]
    response_mask: list[int]
    prompt_len: int
    origins: list[str]
    inputs: dict
    targets: list[
        int
    ]  # the final assistant turn: "<think> so </think><answer>2</answer><|im_end|>"

    @property
    def model(self) -> torch.nn.Module:
        return self.policy.model

    def edit(self, present, baseline: str, targets=None) -> tuple[dict, list[int]]:
        return with_images(
            self.inputs, present, baseline=baseline, special=self.ids, merge_size=2,
            grey_rows=lambda thw: grey_pixel_rows(self.policy.image_processor, thw),
            target_positions=self.targets if targets is None else targets,
        )  # fmt: skip


def _final_turn(mask: list[int]) -> list[int]:
    last = max(p for p, m in enumerate(mask) if m)
    first = last
    while mask[first - 1]:
        first -= 1
    return list(range(first, last + 1))


def _case(policy, eager) -> Case:
    seq, mask, prompt_len, origins, inputs = _trajectory(policy)
    ids = SpecialIds.from_tokenizer(policy.tokenizer)
    return Case(policy, eager, ids, seq, mask, prompt_len, origins, inputs, _final_turn(mask))


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    path = build_tiny_model(tmp_path_factory.mktemp("attr"), TinySpec(), seed=3)
    eager = load_policy(path, attn_implementation="eager").model
    return _case(load_policy(path), eager)


def _log_prob(c: Case, present, baseline: str) -> float:
    edited, moved = c.edit(present, baseline)
    return answer_log_prob(c.model, edited, moved)


def _all_but(k: int) -> list[bool]:
    return [i != k for i in range(1, N_IMAGES + 1)]


# Answer log-probability


def test_answer_log_prob_equals_full_logits(case: Case) -> None:
    with torch.no_grad():
        logits = case.model(**case.inputs, use_cache=False).logits[0].double()
    ref = sum(torch.log_softmax(logits[p - 1], -1)[case.token_ids[p]] for p in case.targets)
    got = answer_log_prob(case.model, case.inputs, case.targets)
    assert got == pytest.approx(float(ref), abs=1e-6)
    assert got < 0
    single = answer_log_prob(case.model, case.inputs, [case.targets[2]])
    assert single == pytest.approx(float(torch.log_softmax(logits[case.targets[2] - 1], -1)[case.token_ids[case.targets[2]]]), abs=1e-6)  # fmt: skip


# Image-presence edits


def test_grey_keeps_tokens_and_replaces_only_that_image(case: Case) -> None:
    edited, moved = case.edit([True, False, True, True, True], "grey")
    assert moved == case.targets
    assert torch.equal(edited["input_ids"], case.inputs["input_ids"])
    assert torch.equal(edited["image_grid_thw"], case.inputs["image_grid_thw"])
    pix, orig = edited["pixel_values"], case.inputs["pixel_values"]
    assert pix.shape == orig.shape
    r0, r1 = 64, 64 + 48  # image 1 has 8x8 patches, image 2 6x8
    grey = grey_pixel_rows(case.policy.image_processor, (1, 6, 8))
    assert grey.shape == (48, orig.shape[1]) and (grey == grey[0]).all()  # uniform image
    assert torch.equal(pix[r0:r1], grey)
    assert torch.equal(pix[:r0], orig[:r0]) and torch.equal(pix[r1:], orig[r1:])
    assert not torch.equal(orig[r0:r1], grey)
    # Grey rows are the processor's output for a mid-grey picture of that size.
    ref = case.policy.image_processor(
        images=[Image.new("RGB", (8 * 14, 6 * 14), (128, 128, 128))], return_tensors="pt"
    )
    assert torch.equal(grey, ref["pixel_values"])
    assert math.isfinite(answer_log_prob(case.model, edited, moved))


def test_drop_removes_exactly_the_run_rows_and_grid_row(case: Case) -> None:
    runs = image_runs(case.token_ids, case.ids.image_pad)
    edited, moved = case.edit([True, False, True, True, True], "drop")
    s, e = runs[1]
    expect = case.token_ids[: s - 1] + case.token_ids[e + 1 :]  # vision start .. vision end
    assert edited["input_ids"][0].tolist() == expect
    assert edited["input_ids"].shape[1] == len(case.token_ids) - 12 - 2
    for key in ("attention_mask", "mm_token_type_ids"):
        assert edited[key].shape == edited["input_ids"].shape
    assert torch.equal(edited["mm_token_type_ids"][0], (edited["input_ids"][0] == case.ids.image_pad).int())  # fmt: skip
    orig = case.inputs["pixel_values"]
    assert torch.equal(edited["pixel_values"], torch.cat([orig[:64], orig[112:]]))
    assert edited["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 4], [1, 4, 4], [1, 6, 6]]
    assert moved == [p - 14 for p in case.targets]
    assert [edited["input_ids"][0, p] for p in moved] == [case.token_ids[p] for p in case.targets]
    # A position between the dropped image and the targets shifts too; one before it does not.
    _, shifted = case.edit([True, False, True, True, True], "drop", targets=[3, e + 1, e + 5])
    assert shifted == [3, s - 1, s + 3]
    # Pixel rows equal the processor's for the remaining images, processed from scratch.
    images = [_image(sz, i) for i, sz in enumerate([*INPUT_SIZES, REFLECT_SIZE]) if i != 1]
    fresh = case.policy.image_processor(images=images, return_tensors="pt")
    assert torch.equal(fresh["pixel_values"], edited["pixel_values"])
    assert torch.equal(fresh["image_grid_thw"], edited["image_grid_thw"])


def test_model_recomputes_rope_positions_after_drop(case: Case) -> None:
    core = case.model.model
    edited, moved = case.edit([True, True, False, True, True], "drop")
    with torch.no_grad():
        case.model(**case.inputs, use_cache=False)  # leaves the full sequence's rope_deltas behind
        got = case.model(**edited, use_cache=False).logits
        pos, _ = core.get_rope_index(
            edited["input_ids"], edited["mm_token_type_ids"], edited["image_grid_thw"],
            attention_mask=edited["attention_mask"],
        )  # fmt: skip
        ref = case.model(**edited, position_ids=pos, use_cache=False).logits
        full, _ = core.get_rope_index(
            case.inputs["input_ids"], case.inputs["mm_token_type_ids"],
            case.inputs["image_grid_thw"], attention_mask=case.inputs["attention_mask"],
        )  # fmt: skip
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # Image 3 (6x4 patches -> 3x2 tokens) spanned max(3, 2) = 3 rope steps plus its 2 wrap tokens.
    assert (full[:, 0, case.targets] - pos[:, 0, moved] == 5).all()


def test_drop_every_image_is_a_text_only_forward(case: Case) -> None:
    edited, moved = case.edit([False] * N_IMAGES, "drop")
    ids = edited["input_ids"][0].tolist()
    assert case.ids.image_pad not in ids and case.ids.vision_start not in ids
    assert "pixel_values" not in edited and "image_grid_thw" not in edited
    assert len(ids) == len(case.token_ids) - sum([16, 12, 6, 4, 9]) - 2 * N_IMAGES
    got = answer_log_prob(case.model, edited, moved)
    text_only = {"input_ids": edited["input_ids"], "attention_mask": edited["attention_mask"]}
    assert math.isfinite(got)
    assert got == answer_log_prob(case.model, text_only, moved)


def test_all_present_is_the_identity(case: Case) -> None:
    for baseline in ("grey", "drop"):
        edited, moved = case.edit([True] * N_IMAGES, baseline)
        assert moved == case.targets
        assert all(edited[k] is v for k, v in case.inputs.items())


# captum attribution


@pytest.mark.parametrize("baseline", ["grey", "drop"])
def test_feature_ablation_equals_hand_computed(case: Case, baseline: str) -> None:
    df = image_attribution(
        case.model, case.inputs, case.targets, method="ablation", baseline=baseline,
        special=case.ids, image_processor=case.policy.image_processor, trajectory_id="t0",
    )  # fmt: skip
    assert list(df.columns) == [
        "trajectory", "image", "attribution", "method", "baseline", "logp_all", "logp_none",
    ]  # fmt: skip
    f_all = answer_log_prob(case.model, case.inputs, case.targets)
    hand = [f_all - _log_prob(case, _all_but(k), baseline) for k in range(1, N_IMAGES + 1)]
    assert df["image"].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(df["attribution"], hand, atol=1e-5)
    assert (df["trajectory"] == "t0").all() and (df["baseline"] == baseline).all()
    assert df["logp_all"].iloc[0] == pytest.approx(f_all, abs=1e-9)
    assert df["logp_none"].iloc[0] == pytest.approx(
        _log_prob(case, [False] * 5, baseline), abs=1e-9
    )
    assert (df["attribution"].abs() > 1e-6).all()  # a random model still reads every image


def test_shapley_completeness_and_slow_twin(case: Case) -> None:
    f_all = answer_log_prob(case.model, case.inputs, case.targets)
    n = N_IMAGES
    for baseline in ("grey", "drop"):
        f_none = _log_prob(case, [False] * n, baseline)
        for method in ("shapley", "shapley_sampling"):
            df = image_attribution(
                case.model, case.inputs, case.targets, method=method, baseline=baseline,
                special=case.ids, image_processor=case.policy.image_processor, n_samples=4,
            )  # fmt: skip
            assert df["attribution"].sum() == pytest.approx(f_all - f_none, abs=1e-4)
            if method == "shapley" and baseline == "drop":
                exact = df["attribution"].to_numpy()
    # Slow twin: phi_k = sum_S |S|! (n - |S| - 1)! / n! * (f(S + k) - f(S)) over S without k.
    f = {
        s: _log_prob(case, [i in s for i in range(n)], "drop")
        for r in range(n + 1)
        for s in combinations(range(n), r)
    }
    phi = [
        sum(
            math.factorial(len(s)) * math.factorial(n - len(s) - 1) / math.factorial(n)
            * (f[tuple(sorted((*s, k)))] - f[s])
            for s in f
            if k not in s
        )
        for k in range(n)
    ]  # fmt: skip
    np.testing.assert_allclose(exact, phi, atol=1e-5)


# Attention knockout


def _manual_logits(eager, inputs: dict, masks: list[torch.Tensor]) -> torch.Tensor:
    """Slow reference: the eager model's forward written out, one 4D additive mask per layer."""
    core = eager.model
    ids = inputs["input_ids"]
    embeds = core.get_input_embeddings()(ids)
    image = torch.cat(
        core.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        ).pooler_output
    )
    embeds = embeds.masked_scatter((ids == eager.config.image_token_id)[..., None], image)
    pos, _ = core.get_rope_index(
        ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    text = core.language_model
    rope = text.rotary_emb(embeds, pos)
    hidden = embeds
    for mask, block in zip(masks, text.layers):
        hidden = block(hidden, attention_mask=mask, position_embeddings=rope)
    return eager.lm_head(text.norm(hidden))


def _manual_knockout(c: Case, image: int, layers) -> float:
    n_pos = len(c.token_ids)
    causal = torch.full((n_pos, n_pos), float("-inf")).triu(1)[None, None]
    s, e = image_runs(c.token_ids, c.ids.image_pad)[image - 1]
    knocked = causal.clone()
    knocked[..., e:, s:e] = float("-inf")
    n_layers = len(c.eager.model.language_model.layers)
    masks = [knocked if i in layers else causal for i in range(n_layers)]

    def score(ms) -> float:
        with torch.no_grad():
            logits = _manual_logits(c.eager, c.inputs, ms)[0].double()
        return float(sum(torch.log_softmax(logits[p - 1], -1)[c.token_ids[p]] for p in c.targets))

    return score(masks) - score([causal] * n_layers)


def test_manual_reference_reproduces_the_model(case: Case) -> None:
    n_pos = len(case.token_ids)
    causal = torch.full((n_pos, n_pos), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref = case.eager(**case.inputs, use_cache=False).logits
        got = _manual_logits(case.eager, case.inputs, [causal, causal])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("image", "layers"), [(3, [1]), (5, [0]), (2, range(2))])
def test_knockout_equals_manual_masked_forward(case: Case, image: int, layers) -> None:
    ref = _manual_knockout(case, image, list(layers))
    got = attention_knockout(case.model, case.inputs, case.targets, image, layers, special=case.ids)
    assert got == pytest.approx(ref, abs=1e-5)
    # The eager backend hands the attention function a float mask instead of SDPA's None.
    eager = attention_knockout(
        case.eager, case.inputs, case.targets, image, layers, special=case.ids
    )
    assert eager == pytest.approx(ref, abs=1e-5)


def test_knockout_empty_and_all_layers(case: Case) -> None:
    assert attention_knockout(case.model, case.inputs, case.targets, 2, [], special=case.ids) == 0.0
    assert attention_knockout(case.model, case.inputs, case.targets, 2, range(0), special=case.ids) == 0.0  # fmt: skip
    effect = attention_knockout(
        case.model, case.inputs, case.targets, 2, range(2), special=case.ids
    )
    assert math.isfinite(effect) and abs(effect) > 1e-5
    table = image_knockouts(case.model, case.inputs, case.targets, range(2), special=case.ids)
    assert table["image"].tolist() == [1, 2, 3, 4, 5] and (table["layers"] == "0,1").all()
    assert table["knockout"].iloc[1] == pytest.approx(effect, abs=1e-9)


def test_knockout_of_an_unattended_image_changes_nothing(case: Case) -> None:
    """An image whose keys the model's own (padding) mask already hides gets effect 0."""
    s, e = image_runs(case.token_ids, case.ids.image_pad)[3]
    core = case.model.model
    pos, _ = core.get_rope_index(
        case.inputs["input_ids"], case.inputs["mm_token_type_ids"], case.inputs["image_grid_thw"],
        attention_mask=case.inputs["attention_mask"],
    )  # fmt: skip
    hidden = dict(case.inputs, position_ids=pos)
    hidden["attention_mask"] = case.inputs["attention_mask"].clone()
    hidden["attention_mask"][0, s:e] = 0
    with torch.no_grad():
        att = case.eager(**hidden, output_attentions=True, use_cache=False).attentions
    assert all(float(a[0, :, e:, s:e].abs().max()) == 0.0 for a in att)  # no attention to it
    effect = attention_knockout(case.model, hidden, case.targets, 4, range(2), special=case.ids)
    assert effect == pytest.approx(0.0, abs=1e-6)


def _module_state(model) -> list:
    return [
        (
            name,
            sorted(m.__dict__),
            m.__dict__.get("forward"),
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
        )  # fmt: skip
        for name, m in model.named_modules()
    ]


def test_knockout_restores_the_model_even_on_errors(case: Case, monkeypatch) -> None:
    model = case.model
    before = _module_state(model)
    with torch.no_grad():
        logits = model(**case.inputs, use_cache=False).logits
    attention_knockout(model, case.inputs, case.targets, 1, [0, 1], special=case.ids)
    assert _module_state(model) == before
    # An error inside the model's forward (pixel rows of the wrong width).
    broken = dict(case.inputs, pixel_values=case.inputs["pixel_values"][:, :-1])
    with pytest.raises(RuntimeError):
        attention_knockout(model, broken, case.targets, 1, [0], special=case.ids)
    assert _module_state(model) == before

    # An error inside the nnsight trace body (building the mask).
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(attribution, "knockout_mask", boom)
    with pytest.raises(RuntimeError, match="boom"):
        attention_knockout(model, case.inputs, case.targets, 1, [1], special=case.ids)
    assert _module_state(model) == before
    with torch.no_grad():
        assert torch.equal(model(**case.inputs, use_cache=False).logits, logits)


# Bad inputs


def test_bad_inputs_raise_value_errors_naming_the_value(case: Case) -> None:
    m, x, t, ids = case.model, case.inputs, case.targets, case.ids
    n_pos = len(case.token_ids)
    for image in (0, 6):
        with pytest.raises(ValueError, match=f"image={image} out of range: the inputs hold 5"):
            attention_knockout(m, x, t, image, [0], special=ids)
    with pytest.raises(ValueError, match=r"layers \[2\] out of range"):
        attention_knockout(m, x, t, 1, [0, 2], special=ids)
    with pytest.raises(ValueError, match="baseline='black' unknown"):
        image_attribution(m, x, t, baseline="black", special=ids)
    with pytest.raises(ValueError, match="baseline='black' unknown"):
        with_images(x, [True] * 5, baseline="black", special=ids, merge_size=2)
    with pytest.raises(ValueError, match="method='lime' unknown"):
        image_attribution(m, x, t, method="lime", special=ids)
    for bad in (0, n_pos, -1):
        with pytest.raises(ValueError, match=rf"target positions \[{bad}\] outside \[1, {n_pos - 1}\]"):  # fmt: skip
            answer_log_prob(m, x, [*t, bad])
        with pytest.raises(ValueError, match=rf"target positions \[{bad}\]"):
            attention_knockout(m, x, [bad], 1, [0], special=ids)
        with pytest.raises(ValueError, match=rf"target positions \[{bad}\]"):
            image_attribution(m, x, [bad], special=ids, image_processor=case.policy.image_processor)
    with pytest.raises(ValueError, match="target_positions is empty"):
        answer_log_prob(m, x, [])
    with pytest.raises(ValueError, match="present has 4 entries but the inputs hold 5 images"):
        with_images(x, [True] * 4, baseline="drop", special=ids, merge_size=2)
    s = image_runs(case.token_ids, ids.image_pad)[0][0]
    with pytest.raises(ValueError, match=rf"target positions \[{s}\] lie inside dropped image 1"):
        with_images(x, _all_but(1), baseline="drop", special=ids, merge_size=2, target_positions=[s])  # fmt: skip
    with pytest.raises(ValueError, match="needs grey_rows"):
        with_images(x, _all_but(1), baseline="grey", special=ids, merge_size=2)
    with pytest.raises(ValueError, match="needs image_processor or grey_rows"):
        image_attribution(m, x, t, baseline="grey", special=ids)


# Attention beside the causal measures


def _hand_attention() -> pd.DataFrame:
    """One token, one layer, two heads; regions sink, image:1..3."""
    rows = []
    for head, masses in enumerate([(0.4, 0.1, 0.2, 0.3), (0.5, 0.3, 0.0, 0.2)]):
        for region, mass in zip(["sink", "image:1", "image:2", "image:3"], masses):
            image = int(region.split(":")[1]) if ":" in region else -1
            origin = {1: "input", 2: "input", 3: "reflect"}.get(image, "")
            rows.append(("t", 0, 40, 0, 0, head, region, image, origin, mass))
    return pd.DataFrame(
        rows,
        columns=["trajectory", "token", "pos", "turn", "layer", "head", "region", "image", "origin", "mass"],
    )  # fmt: skip


def test_causal_table_and_agreement_hand_computed() -> None:
    att = _hand_attention()
    attr = pd.DataFrame(
        {"trajectory": "t", "image": [1, 2, 3] * 2, "attribution": [1.0, 2.0, 3.0, 0.2, 0.1, 0.5],
         "method": ["ablation"] * 3 + ["shapley"] * 3, "baseline": "drop"}
    )  # fmt: skip
    ko = pd.DataFrame({"trajectory": "t", "image": [1, 2, 3], "knockout": [-1.0, -2.0, -3.0]})
    table = causal_table(att, attr, ko)
    assert list(table.columns) == [
        "trajectory", "image", "origin", "attention_share", "ablation_drop", "shapley_drop", "knockout",
    ]  # fmt: skip
    np.testing.assert_allclose(table["attention_share"], [0.2, 0.1, 0.25])
    assert table["origin"].tolist() == ["input", "input", "reflect"]
    # Zero rows left out of the long table do not change the mean share.
    sparse = causal_table(att[att["mass"] > 0], attr, ko)
    np.testing.assert_allclose(sparse["attention_share"], [0.2, 0.1, 0.25])
    agree = causal_agreement(table).set_index("measure")
    # Ranks of attention share (2, 1, 3) against (1, 2, 3), (3, 2, 1), (2, 1, 3).
    assert agree.loc["ablation_drop", "spearman"] == pytest.approx(0.5)
    assert agree.loc["knockout", "spearman"] == pytest.approx(-0.5)
    assert agree.loc["shapley_drop", "spearman"] == pytest.approx(1.0)
    assert agree["n"].tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="attributions has several rows"):
        causal_table(att, pd.concat([attr, attr]))
    no_ko = causal_table(att, attr, target_positions={"t": [41]})
    assert "knockout" not in no_ko and no_ko["attention_share"].isna().all()


def test_causal_table_from_a_replay(case: Case) -> None:
    rmap = region_labels(
        case.token_ids, case.response_mask, case.ids, case.prompt_len, case.origins
    )
    record = replay_attention(case.model, case.inputs, rmap)
    att = record.to_frame("traj")
    attr = image_attribution(
        case.model, case.inputs, case.targets, method="ablation", baseline="drop",
        special=case.ids, trajectory_id="traj",
    )  # fmt: skip
    ko = image_knockouts(case.model, case.inputs, case.targets, [1], special=case.ids, trajectory_id="traj")  # fmt: skip
    table = causal_table(att, attr, ko, target_positions={"traj": case.targets})
    rows = [rmap.generated_positions.index(p) for p in case.targets]
    for k in range(1, N_IMAGES + 1):
        share = record.mass[rows, :, :, rmap.region_names.index(f"image:{k}")].double().mean()
        assert table["attention_share"].iloc[k - 1] == pytest.approx(float(share), abs=1e-6)
    assert table["origin"].tolist() == ["input"] * 4 + ["reflect"]
    assert table["ablation_drop"].tolist() == pytest.approx(attr["attribution"].tolist())
    agree = causal_agreement(table)
    assert agree["measure"].tolist() == ["ablation_drop", "knockout"]
    assert agree["spearman"].between(-1, 1).all()


# The committed base model


@pytest.mark.skipif(not (RELOOK_TINY_DIR / "config.json").is_file(), reason="no models/relook-tiny")
def test_relook_tiny_attributions_are_finite() -> None:
    policy = load_policy("relook-tiny")
    c = _case(policy, policy.model)
    n_layers = len(policy.model.model.language_model.layers)
    for method, baseline in [("ablation", "grey"), ("shapley", "drop")]:
        df = image_attribution(
            c.model, c.inputs, c.targets, method=method, baseline=baseline, special=c.ids,
            image_processor=policy.image_processor,
        )  # fmt: skip
        assert len(df) == N_IMAGES and np.isfinite(df["attribution"]).all()
    effect = attention_knockout(c.model, c.inputs, c.targets, 1, range(n_layers), special=c.ids)
    assert math.isfinite(effect)
