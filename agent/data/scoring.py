"""Answer normalisation and exact-match scoring for generated samples.

A model's free-text answer is reduced to the canonical form of ``Sample.answer`` ("2", "7",
"yes"), then compared exactly. Number words and ordinals are understood ("two", "second",
"2nd"); an answer naming two different numbers is ambiguous and scores 0.
"""

from __future__ import annotations

import re
import string
from typing import Any

ANSWER_TYPES: tuple[str, ...] = ("index", "int", "digit", "word")
"""``index``: 1-based image number; ``int``: count >= 0; ``digit``: 0-9; ``word``: free word(s)."""

_CARDINALS = "zero one two three four five six seven eight nine ten eleven twelve"
NUMBER_WORDS: dict[str, int] = {word: value for value, word in enumerate(_CARDINALS.split())}
"""Cardinal number words understood by :func:`normalize_answer`."""

_ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth"
ORDINAL_WORDS: dict[str, int] = {w: v for v, w in enumerate(_ORDINALS.split(), start=1)}
"""Ordinal words ("the second image") understood by :func:`normalize_answer`."""

PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})
"""``str.translate`` table turning ASCII punctuation into spaces."""
_ORDINAL_SUFFIX = re.compile(r"^(\d+)(st|nd|rd|th)$")


MAX_DIGITS = 18
"""Longest number (leading zeros aside) an answer may name; longer ones name no number (Python
refuses ``int`` of over 4,300 digits, and no relook answer is near 10**18)."""


def _integer(digits: str) -> int | None:
    """``int(digits)`` of a string of decimal digits, or None when it is too long."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= MAX_DIGITS else None


def _number(token: str) -> int | None:
    """The integer a single lowercase token names ("3", "three", "third", "3rd"), else None.

    Digits are decimal digits (``str.isdecimal``, which ``int`` accepts): ``"²"`` is a digit to
    ``str.isdigit`` but not to ``int``, so it names no number. Never raises.
    """
    if token.isdecimal():
        return _integer(token)
    match = _ORDINAL_SUFFIX.match(token)
    if match:
        return _integer(match.group(1))
    return NUMBER_WORDS.get(token, ORDINAL_WORDS.get(token))


def normalize_answer(text: str | None, answer_type: str) -> str | None:
    """Reduce a free-text answer to canonical form, or None if it cannot be parsed.

    Lowercases, turns punctuation into spaces, then for numeric types finds the numbers the text
    names (digits, number words, ordinals). Exactly one distinct number is required; punctuation
    splits tokens, so "3.5" names two numbers and is rejected. Never raises on any ``text``
    (superscripts, numbers over :data:`MAX_DIGITS` digits and control characters name no
    number).

    Args:
        text: Raw answer text (may be None).
        answer_type: One of ``ANSWER_TYPES``.

    Returns:
        ``index``: "1", "2", ... (>= 1); ``int``: "0", "1", ...; ``digit``: "0"-"9";
        ``word``: lowercase words joined by single spaces. None if unparseable or out of range.

    Raises:
        ValueError: If ``answer_type`` is unknown.

    Examples:
        >>> normalize_answer("Image 3", "index")
        '3'
        >>> normalize_answer("the second image.", "index")
        '2'
        >>> normalize_answer("three", "int")
        '3'
        >>> normalize_answer(" 7. ", "digit")
        '7'
        >>> normalize_answer("image 2 or image 3", "index") is None
        True
        >>> normalize_answer("  Yes! ", "word")
        'yes'
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if text is None:
        return None
    tokens = str(text).lower().translate(PUNCT_TO_SPACE).split()
    if answer_type == "word":
        return " ".join(tokens) or None
    numbers = {n for n in map(_number, tokens) if n is not None}
    if len(numbers) != 1:
        return None
    value = numbers.pop()
    if (answer_type == "index" and value < 1) or (answer_type == "digit" and value > 9):
        return None
    return str(value)


def exact_match(
    prediction: str | None, sample_or_answer: Any, answer_type: str | None = None
) -> float:
    """1.0 if the normalised prediction equals the normalised reference answer, else 0.0.

    Args:
        prediction: Raw model answer (normalised here); None scores 0.
        sample_or_answer: A ``Sample`` (its ``answer`` and ``answer_type`` are used) or the
            reference answer string.
        answer_type: Required when ``sample_or_answer`` is a string; if given with a sample it
            must match the sample's.

    Returns:
        1.0 or 0.0.

    Raises:
        ValueError: If the answer type is missing, unknown or contradicts the sample's, or the
            reference answer itself cannot be normalised.

    Examples:
        >>> exact_match("Image 2", "2", "index")
        1.0
        >>> exact_match("two", "3", "int")
        0.0
    """
    if isinstance(sample_or_answer, str):
        reference = sample_or_answer
        if answer_type is None:
            raise ValueError("answer_type is required when the reference is a string")
    else:
        reference = sample_or_answer.answer
        if answer_type is not None and answer_type != sample_or_answer.answer_type:
            raise ValueError(
                f"answer_type {answer_type!r} contradicts the sample's "
                f"{sample_or_answer.answer_type!r}"
            )
        answer_type = sample_or_answer.answer_type
    gold = normalize_answer(reference, answer_type)
    if gold is None:
        raise ValueError(f"reference answer {reference!r} is not a valid {answer_type!r} answer")
    return float(normalize_answer(prediction, answer_type) == gold)
