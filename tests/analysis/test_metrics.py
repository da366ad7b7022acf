"""Attention metrics pinned on hand-computed tables (docs/method.md §6)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analysis import decay, plots
from analysis import events as ev
from analysis import metrics as m
from analysis import rundir as rd
from tests.analysis.test_rundir import REGIONS, synthetic_attention

# Moved from test_rundir: the raw shares, pinned on a hand-computed case


def _row(trajectory, token, head, masses):
    return [
        (trajectory, token, 10 + token, 0, 0, head, r, int(r[6:]) if r[:6] == "image:" else -1)
        + ("input" if r[:6] == "image:" else "", m)
        for r, m in masses.items()
    ]


@pytest.fixture
def hand_attention(tmp_path):
    """Trajectory a: 2 tokens x 1 layer x 2 heads; trajectory b: token 0 only. Per-token shares
    (mean of the two heads): a0 text .375 image .375 generated .25; a1 text .3125 image .5
    generated .0625 tool_text .125; b0 text .5 image .5. Dyadic, so exact in float32."""
    rows = _row("a", 0, 0, {"sink": 0.5, "image:1": 0.25, "generated": 0.25})
    rows += _row("a", 0, 1, {"system": 0.25, "image:1": 0.5, "self": 0.25})
    a1h0 = {"user_text": 0.5, "image:2": 0.25, "image_wrap": 0.125, "generated": 0.125}
    rows += _row("a", 1, 0, a1h0)
    rows += _row("a", 1, 1, {"image:1": 0.75, "tool_text": 0.25})
    rows += _row("b", 0, 0, {"image:1": 1.0}) + _row("b", 0, 1, {"sink": 1.0})
    att = pd.DataFrame(rows, columns=list(rd.ATTENTION_COLUMNS))
    # Go through the on-disk format (float32 masses) on the way.
    run = rd.create_run(tmp_path / "hand", "hand", ["x-s0"], [0], {})
    rd.start_arm(run, "x-s0", {})
    rd.write_attention(run, "x-s0", att)
    return rd.load_attention(run, "x-s0")


def test_region_group():
    groups = {r: m.region_group(r) for r in REGIONS + ["image:12"]}
    assert groups == {
        "sink": "text", "system": "text", "user_text": "text", "image_wrap": "text",
        "image:1": "image", "image:2": "image", "image:12": "image", "tool_text": "tool_text",
        "generated": "generated", "self": "generated",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown"):
        m.region_group("pixels")


def test_token_and_mean_shares_exact(hand_attention):
    per = m.token_shares(hand_attention).set_index(["trajectory", "token", "group"])["share"]
    assert per.loc[("a", 0)].to_dict() == {
        "generated": 0.25, "image": 0.375, "text": 0.375, "tool_text": 0.0
    }  # fmt: skip
    assert per.loc[("a", 1)].to_dict() == {
        "generated": 0.0625, "image": 0.5, "text": 0.3125, "tool_text": 0.125
    }  # fmt: skip
    assert per.loc[("b", 0)].to_dict() == {
        "generated": 0.0, "image": 0.5, "text": 0.5, "tool_text": 0.0
    }  # fmt: skip
    shares = m.share_by_token(hand_attention).set_index(["token", "group"])
    assert shares.loc[(0, "image"), "share"] == 0.4375 and shares.loc[(0, "image"), "n"] == 2
    assert shares.loc[(0, "image"), "std"] == pytest.approx(0.125 / math.sqrt(2), abs=1e-15)
    assert shares.loc[(1, "tool_text"), "share"] == 0.125 and shares.loc[(1, "text"), "n"] == 1
    by_region = m.token_shares(hand_attention, ("region",))
    a1 = by_region[(by_region.trajectory == "a") & (by_region.token == 1)]
    assert a1.set_index("region")["share"]["image:1"] == 0.375


def test_image_share_curve_and_before_after_exact(hand_attention):
    curve = m.image_share_curve(hand_attention)
    assert curve["token"].tolist() == [0, 1]
    assert curve["image_share"].tolist() == [0.4375, 0.5] and curve["n"].tolist() == [2, 1]
    events = pd.DataFrame(
        {"trajectory": ["a", "b", "zz"], "token": [1, 1, 0], "tool": ["reflect"] * 3}
        | {"ok": [True, True, False], "turn": [1, 1, 1]}
    )
    ba = ev.before_after(hand_attention, events, window=8)
    assert ba["before"].tolist()[:2] == [0.375, 0.5] and math.isnan(ba["before"][2])
    assert ba["after"][0] == 0.5 and ba["delta"][0] == 0.125 and math.isnan(ba["after"][1])
    assert ba[["n_before", "n_after"]].values.tolist() == [[1, 1], [1, 0], [0, 0]]
    table = plots.before_after_table(ba)
    assert table.iloc[0].to_dict() == {
        "tool": "reflect", "events": 1, "trajectories": 1, "before": 0.375, "after": 0.5,
        "delta": 0.125, "delta_lo": 0.125, "delta_hi": 0.125,
    }  # fmt: skip
    with pytest.raises(ValueError, match="window"):
        ev.before_after(hand_attention, events, window=0)


def test_random_shares_sum_to_one():
    shares = m.share_by_token(synthetic_attention(3, trajectories=3))
    assert np.allclose(shares.groupby("token")["share"].sum(), 1.0, atol=1e-6)
    assert set(shares["group"]) == set(m.GROUPS) and (shares["n"] == 3).all()


def test_empty_tables_give_empty_frames():
    att = pd.DataFrame({c: pd.Series(dtype=t) for c, t in rd.ATTENTION_COLUMNS.items()})
    assert m.image_share_curve(att).empty and m.share_by_token(att).empty
    assert m.image_shares(att).empty and m.head_shares(att).empty and m.band_shares(att).empty
    assert m.head_summary(att).empty and decay.decay_fits(att).empty
    assert decay.decay_summary(att, n_boot=5)["n_trajectories"].eq(0).all()


# Variants: raw, no_sink, value, efficiency on a 2-trajectory x 2-layer x 2-head table

VREGIONS = ("sink", "system", "image:1", "generated", "self")
# Masses per (layer, head), in VREGIONS order, the same at every token. Trajectory a:
A_MASS = {
    (0, 0): (0.5, 0.125, 0.25, 0, 0.125), (0, 1): (0.25, 0.25, 0.25, 0, 0.25),
    (1, 0): (0.75, 0, 0.125, 0, 0.125), (1, 1): (0, 0.125, 0.75, 0, 0.125),
}  # fmt: skip
A_VALUE = {
    (0, 0): (0.25, 0.25, 0.5, 0, 0), (0, 1): (0.5, 0, 0.5, 0, 0),
    (1, 0): (0.25, 0.25, 0.25, 0, 0.25), (1, 1): (0, 0, 1, 0, 0),
}  # fmt: skip
B_MASS = dict.fromkeys(A_MASS, (0.5, 0, 0.5, 0, 0))  # trajectory b: half sink, half image


def _keys(t):
    """Visible keys of token t (pos = 8 + t): sink 1, system 2, image 4, generated t, self 1."""
    return (1, 2, 4, t, 1)


@pytest.fixture
def variant_att():
    """Trajectory a: tokens 0-2 (A_MASS, A_VALUE); b: tokens 0-1 (B_MASS for both)."""
    rows = []
    for j, n_tok, mass, value in (("a", 3, A_MASS, A_VALUE), ("b", 2, B_MASS, B_MASS)):
        for t in range(n_tok):
            for (layer, head), masses in mass.items():
                for r, k, w, v in zip(VREGIONS, _keys(t), masses, value[layer, head]):
                    image = 1 if r == "image:1" else -1
                    origin = "input" if image > 0 else ""
                    rows.append((j, t, 8 + t, 0, layer, head, r, image, origin, w, k, v))
    columns = [*rd.ATTENTION_COLUMNS, "keys", "value_mass"]
    att = pd.DataFrame(rows, columns=columns)
    att = att.astype({"mass": "float32", "value_mass": "float32", "keys": "int32"})
    return att.astype({"region": "category"})  # as AttentionRecord.to_frame writes it


def _expected_shares(kind):
    """(trajectory, token) -> {group: share}, computed by hand from A_MASS, A_VALUE, B_MASS."""
    nan = math.nan
    out = {}
    for t in range(3):
        pos = 8 + t
        out["a", t] = {
            # raw: means of the four rows, e.g. image (.25 + .25 + .125 + .75) / 4
            "raw": {"text": 0.5, "tool_text": 0.0, "image": 0.34375, "generated": 0.15625},
            # each row over 1 - sink: (.5 .75 .25 1); e.g. image (.5 + 1/3 + .5 + .75) / 4
            "no_sink": {"text": 17 / 96, "tool_text": 0.0, "image": 25 / 48, "generated": 29 / 96},
            "value": {"text": 0.375, "tool_text": 0.0, "image": 0.5625, "generated": 0.0625},
            # raw share / (group keys / pos); tool_text has no keys
            "efficiency": {
                "text": 0.5 * pos / 3, "tool_text": nan, "image": 0.34375 * pos / 4,
                "generated": 0.15625 * pos / (t + 1),
            },
        }[kind]  # fmt: skip
        if t < 2:
            out["b", t] = {
                "raw": {"text": 0.5, "tool_text": 0.0, "image": 0.5, "generated": 0.0},
                "no_sink": {"text": 0.0, "tool_text": 0.0, "image": 1.0, "generated": 0.0},
                "value": {"text": 0.5, "tool_text": 0.0, "image": 0.5, "generated": 0.0},
                "efficiency": {
                    "text": 0.5 * pos / 3, "tool_text": nan, "image": 0.5 * pos / 4,
                    "generated": 0.0,
                },
            }[kind]  # fmt: skip
    return out


@pytest.mark.parametrize("kind", m.KINDS)
def test_token_shares_variants_exact(variant_att, kind):
    per = m.token_shares(variant_att, kind=kind)
    expected = _expected_shares(kind)
    assert len(per) == 4 * len(expected)
    want = [expected[j, t][g] for j, t, g in zip(per["trajectory"], per["token"], per["group"])]
    np.testing.assert_allclose(per["share"], want, rtol=1e-12, atol=0)
    if kind != "efficiency":
        np.testing.assert_allclose(per.groupby(["trajectory", "token"])["share"].sum(), 1.0)


def test_share_curve_and_image_shares_variants(variant_att):
    curve = m.image_share_curve(variant_att, kind="no_sink")
    np.testing.assert_allclose(curve["image_share"], [73 / 96, 73 / 96, 25 / 48], rtol=1e-12)
    assert curve["n"].tolist() == [2, 2, 1]
    eff = m.image_share_curve(variant_att, kind="efficiency")
    # a: .34375 * pos / 4, b: .5 * pos / 4 (pos = 8 + token)
    np.testing.assert_allclose(eff["image_share"], [0.84375, 0.94921875, 0.859375], rtol=1e-12)
    regions = m.token_shares(variant_att, ("region",), kind="efficiency")
    a0 = regions[(regions.trajectory == "a") & (regions.token == 0)].set_index("region")["share"]
    assert math.isnan(a0["generated"]) and a0["sink"] == pytest.approx(3.0, rel=1e-12)
    assert "sink" not in set(m.token_shares(variant_att, ("region",), kind="no_sink")["region"])
    per_image = m.image_shares(variant_att, kind="value")
    assert per_image[["trajectory", "token", "image", "origin"]].values.tolist() == [
        ["a", 0, 1, "input"], ["a", 1, 1, "input"], ["a", 2, 1, "input"],
        ["b", 0, 1, "input"], ["b", 1, 1, "input"],
    ]  # fmt: skip
    np.testing.assert_allclose(per_image["share"], [0.5625] * 3 + [0.5] * 2, rtol=1e-12)
    events = pd.DataFrame({"trajectory": ["a"], "token": [1], "tool": ["reflect"]})
    ba = ev.before_after(variant_att, events, window=1, kind="efficiency")
    np.testing.assert_allclose(
        ba[["before", "after", "delta"]].iloc[0], [0.6875, 0.7734375, 0.0859375]
    )


def test_image_shares_per_image_and_origin(hand_attention):
    att = hand_attention.assign(origin=np.where(hand_attention["image"] == 2, "reflect", "input"))
    att.loc[att["image"] < 0, "origin"] = ""
    out = m.image_shares(att)
    # a0: image 1 (.25 + .5) / 2; a1: image 1 (0 + .75) / 2, image 2 (.25 + 0) / 2; b0: (1 + 0) / 2.
    assert out.values.tolist() == [
        ["a", 0, 1, "input", 0.375], ["a", 1, 1, "input", 0.375],
        ["a", 1, 2, "reflect", 0.125], ["b", 0, 1, "input", 0.5],
    ]  # fmt: skip
    # no_sink: the b0 head that is all sink is left out, the other head is all image.
    no_sink = m.image_shares(att, kind="no_sink").set_index(["trajectory", "token", "image"])
    assert no_sink.loc[("b", 0, 1), "share"] == 1.0
    assert no_sink.loc[("a", 0, 1), "share"] == pytest.approx((0.5 + 0.5) / 2, rel=1e-12)


# Layer bands and heads


def test_layer_bands():
    assert m.layer_bands(4) == {0: "early", 1: "early", 2: "middle", 3: "late"}
    bands = m.layer_bands(28, 3)
    assert [bands[i] for i in range(28)] == ["early"] * 10 + ["middle"] * 9 + ["late"] * 9
    assert m.layer_bands(3, 2) == {0: "early", 1: "early", 2: "late"}
    assert m.layer_bands(5, 4) == {
        0: "layers 0-1", 1: "layers 0-1", 2: "layer 2", 3: "layer 3", 4: "layer 4"
    }  # fmt: skip
    with pytest.raises(ValueError, match="n_bands"):
        m.layer_bands(2, 3)


def test_band_shares_exact(variant_att):
    out = m.band_shares(variant_att, n_bands=2)
    assert out["band"].astype(str).tolist() == ["early"] * 3 + ["late"] * 3
    # early = layer 0: a (.25 + .25) / 2, b .5; late = layer 1: a (.125 + .75) / 2, b .5
    np.testing.assert_allclose(out["image_share"], [0.375, 0.375, 0.25, 0.46875, 0.46875, 0.4375])
    assert out["n"].tolist() == [2, 2, 1, 2, 2, 1]
    deep = m.band_shares(variant_att, 3, n_layers=6)  # layers 0 and 1 are both early
    assert deep["band"].astype(str).unique().tolist() == ["early"]
    np.testing.assert_allclose(deep["image_share"], [0.421875, 0.421875, 0.34375])
    with pytest.raises(ValueError, match="n_bands"):
        m.band_shares(variant_att, 3)
    with pytest.raises(ValueError, match="out of range"):
        m.band_shares(variant_att, 1, n_layers=1)


def test_head_shares_summary_and_top(variant_att):
    heads = m.head_shares(variant_att)
    # over 5 (trajectory, token) pairs: 3 of a, 2 of b (image .5 everywhere)
    assert heads[["layer", "head", "n_tokens"]].values.tolist() == [
        [0, 0, 5], [0, 1, 5], [1, 0, 5], [1, 1, 5]
    ]  # fmt: skip
    np.testing.assert_allclose(heads["image_share"], [0.35, 0.35, 0.275, 0.65], rtol=1e-12)
    summary = m.head_summary(variant_att)
    assert summary["max_head"].tolist() == [0, 1] and summary["n_heads"].tolist() == [2, 2]
    np.testing.assert_allclose(summary["image_share_mean"], [0.35, 0.4625], rtol=1e-12)
    np.testing.assert_allclose(summary["image_share_max"], [0.35, 0.65], rtol=1e-12)
    top = m.top_image_heads(variant_att, k=3)
    assert top[["layer", "head"]].values.tolist() == [[1, 1], [0, 0], [0, 1]]
    assert len(m.top_image_heads(variant_att, k=10)) == 4
    with pytest.raises(ValueError, match="k must be"):
        m.top_image_heads(variant_att, k=0)


# Decay fits


def _curve(t, s):
    return pd.DataFrame({"token": t, "image_share": s})


def test_decay_fit_exact_curves():
    t = np.arange(40)
    fit = decay.decay_fit(_curve(t, 0.6 * 2.0 ** (-t / 12.5)))
    assert fit["half_life_tokens"] == pytest.approx(12.5, abs=1e-6)
    assert fit["s0"] == pytest.approx(0.6, rel=1e-9) and fit["n_points"] == 40
    line = decay.decay_fit(_curve(t, 0.5 - 0.002 * t))
    assert line["slope_per_100"] == pytest.approx(-0.2, abs=1e-12)
    assert line["intercept"] == pytest.approx(0.5, abs=1e-12)
    assert line["r2_linear"] == pytest.approx(1.0, abs=1e-12)
    assert 0 < line["half_life_tokens"] < math.inf
    flat = decay.decay_fit(_curve(t, np.full(40, 0.3)))
    assert flat["half_life_tokens"] == math.inf and flat["s0"] == pytest.approx(0.3)
    assert flat["slope_per_100"] == pytest.approx(0.0, abs=1e-12) and math.isnan(flat["r2_linear"])
    assert decay.decay_fit(_curve(t, 0.1 + 0.01 * t))["half_life_tokens"] == math.inf
    # NaN points dropped, zero shares left out of the log fit only; too few points -> NaN
    gaps = decay.decay_fit(
        _curve([0, 1, 2, 3, 4], [0.5, math.nan, 0.125, 0.0625, 0.0]), min_tokens=3
    )
    assert gaps["n_points"] == 4 and gaps["half_life_tokens"] == pytest.approx(1.0, abs=1e-12)
    few = decay.decay_fit(_curve([0, 1, 2], [0.5, 0.25, 0.125]))
    assert few["n_points"] == 3 and all(math.isnan(few[k]) for k in decay.FIT_COLUMNS[:-1])
    with pytest.raises(ValueError, match="min_tokens"):
        decay.decay_fit(_curve(t, t), min_tokens=1)
    with pytest.raises(ValueError, match="image_share"):
        decay.decay_fit(pd.DataFrame({"token": t}))


def _curve_table(curves, origins=("input",)):
    """One layer, one head: trajectory -> image shares per token on image 1 (the rest on the
    sink); origins[0] is image 1's origin, each further origin adds an image with no mass."""
    rows = []
    for j, shares in curves.items():
        for t, s in enumerate(shares):
            rows.append((j, t, 8 + t, 0, 0, 0, "image:1", 1, origins[0], s))
            for k, origin in enumerate(origins[1:], 2):
                rows.append((j, t, 8 + t, 0, 0, 0, f"image:{k}", k, origin, 0.0))
            rows.append((j, t, 8 + t, 0, 0, 0, "sink", -1, "", 1.0 - s))
    return pd.DataFrame(rows, columns=list(rd.ATTENTION_COLUMNS)).astype({"mass": "float32"})


# a halves every token (half-life 1, s0 .5); b falls by 1/16 per token (-6.25 per 100 tokens)
DECAY = {"a": [2.0 ** -(t + 1) for t in range(6)], "b": [0.5 - t / 16 for t in range(6)]}


def test_decay_fits_per_trajectory_and_pooled():
    att = _curve_table(DECAY)
    fits = decay.decay_fits(att).set_index("trajectory")
    assert fits.loc["a", "half_life_tokens"] == pytest.approx(1.0, abs=1e-9)
    assert fits.loc["a", "s0"] == pytest.approx(0.5, rel=1e-9)
    assert fits.loc["b", "slope_per_100"] == pytest.approx(-6.25, abs=1e-9)
    assert fits.loc["b", "intercept"] == pytest.approx(0.5, abs=1e-12)
    a_slope = 100 * np.polyfit(np.arange(6), DECAY["a"], 1)[0]
    assert fits.loc["a", "slope_per_100"] == pytest.approx(a_slope, abs=1e-9)
    pooled = decay.decay_fits(att, by=())
    # OLS is linear in y: the slope of the mean curve is the mean of the slopes.
    assert pooled["slope_per_100"][0] == pytest.approx((a_slope - 6.25) / 2, abs=1e-9)
    by_setting = decay.decay_fits(
        att.assign(setting=att["trajectory"].map({"a": "x", "b": "y"})), ("setting",)
    )
    np.testing.assert_allclose(by_setting["half_life_tokens"], fits["half_life_tokens"])
    with pytest.raises(ValueError, match="token"):
        decay.decay_fits(att, by=("token",))


def test_decay_summary_bootstrap_exact():
    att = _curve_table(DECAY)
    fits = decay.decay_fits(att).set_index("trajectory")
    out = decay.decay_summary(att, n_boot=400, seed=1).set_index("stat")
    pooled = decay.decay_fits(att, by=())
    assert out.loc["slope_per_100", "estimate"] == pytest.approx(pooled["slope_per_100"][0])
    assert out["n_trajectories"].eq(2).all() and out["n_points"].eq(6).all()
    # Draws are a-only, b-only (1/4 each) or both: the 95% interval spans a's and b's fits.
    for stat in ("slope_per_100", "half_life_tokens"):
        lo, hi = sorted(fits[stat])
        assert out.loc[stat, "lo"] == pytest.approx(lo, rel=1e-9)
        assert out.loc[stat, "hi"] == pytest.approx(hi, rel=1e-9)
    pd.testing.assert_frame_equal(
        decay.decay_summary(att, n_boot=400, seed=1), decay.decay_summary(att, n_boot=400, seed=1)
    )
    flat = decay.decay_summary(_curve_table({"a": [0.25] * 6, "b": [0.5] * 6}), n_boot=50)
    assert (
        flat.set_index("stat").loc["half_life_tokens", ["estimate", "lo", "hi"]].tolist()
        == [math.inf] * 3
    )
    with pytest.raises(ValueError, match="n_boot"):
        decay.decay_summary(att, n_boot=0)


# Before versus after tool calls, clustered bootstrap

BA_CURVES = {
    "a": [0.25] * 3 + [0.75] * 3,  # reflect at 3: .25 -> .75
    "b": [0.5] * 2 + [0.625] * 4,  # confirm at 2: .5 -> .625
    "c": [0.25] * 3 + [0.5] * 3,  # reflect at 3: .25 -> .5
}


def _events(rows):
    return pd.DataFrame(rows, columns=["trajectory", "token", "tool"]).assign(ok=True, turn=1)


def test_before_after_ci_exact():
    att = _curve_table(BA_CURVES)
    # b's call at token 0 has no tokens before it: left out
    events = _events(
        [("a", 3, "reflect"), ("b", 2, "confirm"), ("c", 3, "reflect"), ("b", 0, "confirm")]
    )
    out = ev.before_after_ci(att, events, window=3, n_boot=500, seed=0)
    assert out["tool"].tolist() == ["confirm", "reflect", "all"]
    assert out["n_events"].tolist() == [1, 2, 3] and out["n_trajectories"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(out["before"], [0.5, 0.25, 1 / 3], rtol=1e-12)
    np.testing.assert_allclose(out["after"], [0.625, 0.625, 0.625], rtol=1e-12)
    np.testing.assert_allclose(out["delta"], [0.125, 0.375, 0.875 / 3], rtol=1e-12)
    # confirm: one trajectory, every draw is it; reflect: draws aa, cc (1/4 each) or ac
    np.testing.assert_allclose(
        out[["delta_lo", "delta_hi"]].values[:2], [[0.125, 0.125], [0.25, 0.5]]
    )
    lo, delta, hi = out.iloc[2][["delta_lo", "delta", "delta_hi"]]
    assert 0.125 <= lo < delta < hi <= 0.5
    again = ev.before_after_ci(att, events, window=3, n_boot=500, seed=0)
    pd.testing.assert_frame_equal(out, again)
    # The same from per-event rows; without the overall row, the groups are unchanged.
    ba = ev.before_after(att, events, window=3)
    pd.testing.assert_frame_equal(ev.before_after_summary(ba, n_boot=500, seed=0), out)
    groups = ev.before_after_summary(ba, n_boot=500, seed=0, overall=False)
    pd.testing.assert_frame_equal(groups, out.iloc[:2])
    # an arm without events gives typed empty columns, so concatenating it keeps float64
    none = ev.before_after(att, events.iloc[:0], window=3)
    assert none.empty and (none[["before", "after", "delta"]].dtypes == "float64").all()
    joined = pd.concat([none, ba], ignore_index=True)
    assert (joined[["before", "after", "delta"]].dtypes == "float64").all()
    # per-arm rows concatenated with an empty arm's table arrive as object columns (the app)
    mixed = pd.concat([ba.iloc[:0].astype(object), ba.astype(object)], ignore_index=True)
    pd.testing.assert_frame_equal(ev.before_after_summary(mixed, n_boot=500, seed=0), out)
    table = plots.before_after_table(ba, n_boot=500, seed=0)
    assert table["events"].tolist() == [1, 2]
    np.testing.assert_allclose(table["delta_hi"], out["delta_hi"][:2].round(4))


def test_before_after_ci_resamples_trajectories_not_events():
    att = _curve_table(BA_CURVES)
    # two calls of one trajectory: deltas .5 and (.25 + .25 + .75) / 3 - .25 = 1/6
    out = ev.before_after_ci(att, _events([("a", 3, "reflect"), ("a", 1, "reflect")]), 3, by=())
    assert out.columns[0] == "n_events" and out["n_trajectories"].tolist() == [1]
    # an event-level bootstrap would spread; all draws of the one trajectory give the same mean
    np.testing.assert_allclose(out[["delta", "delta_lo", "delta_hi"]].values[0], [1 / 3] * 3)
    none = ev.before_after_ci(att, _events([("b", 0, "confirm")]), 3)
    assert none["tool"].tolist() == ["all"] and none["n_events"].tolist() == [0]
    with pytest.raises(ValueError, match="ci"):
        ev.before_after_ci(att, _events([("a", 3, "reflect")]), ci=1.0)
    with pytest.raises(ValueError, match="tool"):
        ev.before_after_ci(att, _events([("a", 3, "reflect")]).drop(columns="tool"))


# Aligned on tool calls; images and settings of a trajectory


def test_event_aligned_share_exact():
    # a: image share (t + 1) / 8 over 8 tokens; b: 1, 7/8, 6/8, 5/8 over 4 tokens.
    att = _curve_table({"a": [(t + 1) / 8 for t in range(8)], "b": [1, 7 / 8, 6 / 8, 5 / 8]})
    events = _events([("a", 2, "reflect"), ("a", 6, "confirm"), ("b", 3, "reflect")])
    out = ev.event_aligned_share(att, events, window=2)
    # offsets -2..1: a@2 sees tokens 0..3, a@6 tokens 4..7, b@3 tokens 1..3 (no token 4).
    assert out.columns.tolist() == ["offset", "image_share", "std", "n"]
    assert out["offset"].tolist() == [-2, -1, 0, 1] and out["n"].tolist() == [3, 3, 3, 2]
    np.testing.assert_allclose(out["image_share"], [13 / 24, 14 / 24, 15 / 24, 0.75])
    # The offsets before the call average to before_after's mean "before" (equal n per offset).
    before = ev.before_after(att, events, window=2)["before"].mean()
    assert out.loc[out["offset"] < 0, "image_share"].mean() == pytest.approx(before)
    per_tool = ev.event_aligned_share(att, events, window=2, by_tool=True)
    reflect = per_tool[per_tool["tool"] == "reflect"]
    assert reflect["image_share"].tolist() == [0.5, 0.5, 0.5, 0.5]
    assert reflect["n"].tolist() == [2, 2, 2, 1]
    confirm = per_tool[per_tool["tool"] == "confirm"]
    assert confirm["image_share"].tolist() == [5 / 8, 6 / 8, 7 / 8, 1.0]
    assert ev.event_aligned_share(att, events.iloc[:0], 2).empty
    with pytest.raises(ValueError, match="window"):
        ev.event_aligned_share(att, events, 0)
    with pytest.raises(ValueError, match="tool"):
        ev.event_aligned_share(att, events.drop(columns="tool"), by_tool=True)


def test_image_counts_and_settings():
    att = pd.concat(
        [
            _curve_table({"a": [0.5]}),
            _curve_table({"b": [0.5]}, ("input", "input", "reflect")),
            _curve_table({"c": [0.5]}, ("reflect",)),
        ]
    )
    counts = m.image_counts(att)
    rows = counts.set_index("trajectory")
    assert rows.loc["a"].tolist() == [1, 1, 0, "single-image"]
    assert rows.loc["b"].tolist() == [3, 2, 1, "multi-image"]
    assert rows.loc["c"].tolist() == [1, 0, 1, "text-only"]
    per = m.token_shares(att)
    assert set(m.in_setting(per, counts, "multi-image")["trajectory"]) == {"b"}
    assert set(m.in_setting(att, counts, "single-image")["trajectory"]) == {"a"}
    assert len(m.in_setting(per, counts, "all")) == len(per)
    with pytest.raises(ValueError, match="setting"):
        m.in_setting(per, counts, "two-image")
    with pytest.raises(ValueError, match="origin"):
        m.image_counts(att.drop(columns="origin"))


def test_mean_by_token_and_image_curve_of_pooled_shares():
    att = synthetic_attention(3, trajectories=3)
    per = m.token_shares(att)
    pd.testing.assert_frame_equal(m.mean_by_token(per), m.share_by_token(att))
    pd.testing.assert_frame_equal(m.image_curve(per), m.image_share_curve(att))
    # Pooling two copies under distinct ids: the same means over twice the trajectories.
    twice = pd.concat([per, per.assign(trajectory=per["trajectory"] + "'")])
    curve = m.image_curve(twice)
    np.testing.assert_allclose(curve["image_share"], m.image_share_curve(att)["image_share"])
    assert (curve["n"] == 6).all()


def test_available_kinds():
    assert m.available_kinds(["mass", "pos"]) == ["raw", "no_sink"]
    assert m.available_kinds(["mass", "pos", "keys", "value_mass"]) == list(m.KINDS)
    assert m.available_kinds(["value_mass"]) == ["value"]


# Errors


KIND_USERS = {
    "token_shares": lambda att, kind: m.token_shares(att, kind=kind),
    "share_by_token": lambda att, kind: m.share_by_token(att, kind=kind),
    "image_share_curve": lambda att, kind: m.image_share_curve(att, kind=kind),
    "image_shares": lambda att, kind: m.image_shares(att, kind=kind),
    "band_shares": lambda att, kind: m.band_shares(att, 2, kind=kind),
    "head_shares": lambda att, kind: m.head_shares(att, kind=kind),
    "head_summary": lambda att, kind: m.head_summary(att, kind=kind),
    "top_image_heads": lambda att, kind: m.top_image_heads(att, kind=kind),
    "decay_fits": lambda att, kind: decay.decay_fits(att, kind=kind),
    "decay_summary": lambda att, kind: decay.decay_summary(att, n_boot=5, kind=kind),
    "before_after": lambda att, kind: ev.before_after(att, _events([("a", 1, "r")]), kind=kind),
    "before_after_ci": lambda att, kind: ev.before_after_ci(
        att, _events([("a", 1, "r")]), kind=kind
    ),
    "event_aligned_share": lambda att, kind: ev.event_aligned_share(
        att, _events([("a", 1, "r")]), kind=kind
    ),
}


@pytest.mark.parametrize("name", KIND_USERS)
def test_kind_errors(variant_att, name):
    call = KIND_USERS[name]
    with pytest.raises(ValueError, match="unknown kind 'sinkless'.*'raw', 'no_sink', 'value'"):
        call(variant_att, "sinkless")
    with pytest.raises(ValueError, match=r"kind='efficiency' needs column\(s\) \['keys'\]"):
        call(variant_att.drop(columns="keys"), "efficiency")
    with pytest.raises(ValueError, match=r"kind='value' needs column\(s\) \['value_mass'\]"):
        call(variant_att.drop(columns="value_mass"), "value")
    call(variant_att.drop(columns=["keys", "value_mass"]), "no_sink")  # raw masses suffice


# Property: group shares are a distribution over groups for every token


ALL_REGIONS = ["sink", "system", "user_text", "image_wrap", "tool_text", "generated", "self"]
ALL_REGIONS += ["image:1", "image:2"]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_group_shares_sum_to_one(data):
    dims = [data.draw(st.integers(1, n)) for n in (2, 3, 2, 3)]  # trajectory, token, layer, head
    regions = data.draw(st.lists(st.sampled_from(ALL_REGIONS), min_size=1, max_size=5, unique=True))
    w = data.draw(arrays(np.float64, (*dims, len(regions)), elements=st.floats(0, 1)))
    w[..., -1][w.sum(-1) == 0] = 1.0
    w = w / w.sum(-1, keepdims=True)
    idx = np.indices(w.shape).reshape(5, -1)
    region = np.array(regions)[idx[4]]
    image = [int(r[6:]) if r.startswith("image:") else -1 for r in region]
    att = pd.DataFrame(
        {"trajectory": np.array(["j0", "j1"])[idx[0]], "token": idx[1], "pos": idx[1] + 20}
        | {"turn": 0, "layer": idx[2], "head": idx[3], "region": region, "image": image}
        | {"origin": np.where(np.array(image) > 0, "input", ""), "mass": w.reshape(-1)}
    )
    raw = m.token_shares(att).groupby(["trajectory", "token"])["share"].sum()
    assert len(raw) == dims[0] * dims[1]
    np.testing.assert_allclose(raw, 1.0, rtol=0, atol=1e-12)
    no_sink = m.token_shares(att, kind="no_sink").groupby(["trajectory", "token"])["share"].sum()
    np.testing.assert_allclose(no_sink, 1.0, rtol=0, atol=1e-12)
    # a token is left out only when every one of its rows is all sink
    sink = np.array(regions) == "sink"
    has_other = (w[..., ~sink].sum(-1) > 0).any(axis=(2, 3))
    assert len(no_sink) == has_other.sum()
