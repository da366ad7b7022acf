"""Answer verifiers: hand-computed cases, the answer-type map, never raising on any text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.verifiers import (
    ANSWER_TYPE_VERIFIERS,
    VERIFIERS,
    box_iou,
    em,
    f1,
    iou,
    number,
    option,
    option_letter,
    parse_number,
    squad_tokens,
    verify,
)


def test_squad_normalisation_lowercases_drops_punctuation_and_articles():
    assert squad_tokens("The  Cat's hat, an apple!") == ["cats", "hat", "apple"]
    assert squad_tokens("A") == [] and squad_tokens(None) == []
    assert squad_tokens("theater") == ["theater"]  # articles are whole words only
    assert squad_tokens("红色的立方体。") == ["红", "色", "的", "立", "方", "体"]
    assert squad_tokens("ab红c") == ["ab", "红", "c"]


@pytest.mark.parametrize(
    ("pred", "gold", "want_em", "want_f1"),
    [
        ("The red cube.", "red cube", 1.0, 1.0),
        ("red cube", "a big red cube", 0.0, 2 * (1.0 * 2 / 3) / (1.0 + 2 / 3)),  # P=1, R=2/3: 0.8
        ("cube cube", "cube", 0.0, 2 * 0.5 * 1.0 / 1.5),  # overlap counts once: P=1/2, R=1
        ("blue", "red", 0.0, 0.0),
        ("the", "a", 1.0, 1.0),  # both normalise to nothing
        ("the", "red", 0.0, 0.0),
        ("红色", "红色的", 0.0, 0.8),  # P=1, R=2/3
        (None, "red", 0.0, 0.0),
    ],
)
def test_em_and_f1_hand_computed(pred, gold, want_em, want_f1):
    assert em(pred, gold) == want_em
    assert f1(pred, gold) == pytest.approx(want_f1)


def test_box_iou_degenerate_disjoint_nested_and_partial():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (2, 2, 7, 7)) == pytest.approx(25 / 100)  # nested
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0  # disjoint
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((5, 5, 5, 9), (0, 0, 10, 10)) == 0.0  # zero width
    assert box_iou((9, 9, 1, 1), (0, 0, 10, 10)) == 0.0  # inverted corners
    assert iou("[0, 0, 10, 10]", "(2,2),(7,7)") == pytest.approx(0.25)
    assert iou("box: 0 0 10", "[0, 0, 10, 10]") == 0.0  # three numbers are no box
    assert iou(None, "[0, 0, 10, 10]") == 0.0 and iou("[0,0,1,1]", "no box") == 0.0
    assert iou("[0, 0, 1e308, 1e308]", "[-1e308, -1e308, 1e308, 1e308]") <= 1.0


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"), ("b", "B"), ("(C)", "C"), ("(c) the dog", "C"), ("D. a cat", "D"),
        ("The answer is B", "B"), ("Answer: (a)", "A"), ("option d", "D"), ("I pick (B)", "B"),
        ("cat", None), ("Because", None), ("", None), (None, None),
    ],
)  # fmt: skip
def test_option_letters(text, letter):
    assert option_letter(text) == letter


def test_option_verifier():
    assert option("(B) the red one", "B") == 1.0 and option("B", "(B)") == 1.0
    assert option("C", "B") == 0.0 and option(None, "B") == 0.0 and option("B", "no letter") == 0.0


@pytest.mark.parametrize(
    ("pred", "gold", "right"),
    [
        ("42", "42", 1.0), ("about 42.3 cm", "42", 1.0), ("42.5", "42", 0.0),  # 1% of 42 = 0.42
        ("1,024", "1024", 1.0), ("-3.5e2", "-350", 1.0), ("three", "3", 1.0),
        ("0.0000001", "0", 1.0), ("0.01", "0", 0.0), ("2 or 3", "3", 0.0), ("none", "3", 0.0),
        ("3", "not a number", 0.0), (None, "3", 0.0),
    ],
)  # fmt: skip
def test_number_with_tolerance(pred, gold, right):
    assert number(pred, gold) == right


def test_parse_number():
    assert parse_number("[5, 5]") == 5.0 and parse_number("1e999") is None
    assert parse_number("1,2345") is None  # not a thousands group: two numbers


def test_answer_types_choose_their_verifier():
    assert verify("Image 2", "2", "index") == 1.0 and verify("second", "2", "index") == 1.0
    assert verify("three", "3", "int") == 1.0 and verify("7.", "7", "digit") == 1.0
    assert verify("Yes!", "yes", "word") == 1.0 and verify("(b)", "B", "option") == 1.0
    assert verify("red cube", "a big red cube", "text") == pytest.approx(0.8)
    assert verify("[0,0,10,10]", "[2,2,7,7]", "box") == pytest.approx(0.25)
    assert verify(" x ", "x", "exact") == 1.0 and verify("X", "x", "exact") == 0.0
    assert verify("2", "not-an-index", "index") == 0.0  # a malformed gold scores 0, no raise
    assert set(ANSWER_TYPE_VERIFIERS.values()) <= set(VERIFIERS)
    with pytest.raises(ValueError, match="unknown answer_type 'colour'"):
        verify("red", "red", "colour")


@settings(max_examples=200, deadline=None)
@given(pred=st.one_of(st.none(), st.text()), gold=st.text())
def test_every_verifier_is_in_unit_range_and_never_raises(pred, gold):
    for name, verifier in VERIFIERS.items():
        value = verifier(pred, gold)
        assert isinstance(value, float) and 0.0 <= value <= 1.0, name
