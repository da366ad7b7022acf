"""Answer verifiers: how right a free-text answer is, as a float in [0, 1] (docs/method.md §5).

A verifier is ``verifier(prediction, gold) -> float``: ``prediction`` is the agent's
``<answer>`` text (``None`` when it gave none, which scores 0), ``gold`` the sample's reference
answer. Every verifier is a pure function that never raises on any pair of strings: text it
cannot read (a prediction, or a malformed gold answer) scores 0.

``VERIFIERS`` names each verifier once; ``ANSWER_TYPE_VERIFIERS`` chooses one per sample by
its ``answer_type``, and :func:`verify_trajectory` fills the verification outcome of a finished
episode (``acc``, ``fmt``, ``used``). How those outcomes weigh into a reward is the trainer's
business (``train.rewards``).

| name | reads | scores |
|---|---|---|
| ``exact`` | the text, stripped | 1 if identical |
| ``index``, ``int``, ``digit``, ``word`` | relook's normalisation | 1 on exact match (:func:`agent.data.scoring.exact_match`) |
| ``option`` | an option letter (``B``, ``(B)``, ``answer: B``) | 1 if it is the gold letter |
| ``number`` | the one number named (``1,024``, ``-3.5e2``, ``three``) | 1 within :data:`NUMBER_REL_TOL` |
| ``em`` | SQuAD-normalised tokens | 1 if equal |
| ``f1`` | SQuAD-normalised tokens | token-overlap F1 |
| ``iou`` | a box ``[x1, y1, x2, y2]`` | intersection over union |
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable

from agent.data.scoring import NUMBER_WORDS, PUNCT_TO_SPACE, exact_match
from agent.trajectory import Trajectory

Verifier = Callable[[str | None, str], float]

NUMBER_REL_TOL = 1e-2
"""``number``: a prediction within 1% of the gold value is right (relative to ``|gold|``)."""
NUMBER_ABS_TOL = 1e-6
"""``number``: and any prediction within 1e-6 of it (a gold value of 0)."""
MAX_CHARS = 10_000
"""Longest prediction a verifier reads; longer text is cut (bounds regex and float work)."""


def exact(prediction: str | None, gold: str) -> float:
    """1.0 if the stripped prediction equals the stripped gold answer, else 0.0."""
    if prediction is None:
        return 0.0
    return float(str(prediction).strip() == str(gold).strip())


def _relook(answer_type: str) -> Verifier:
    """relook's own exact match for one of its answer types (``agent.data.scoring``)."""

    def verifier(prediction: str | None, gold: str) -> float:
        if prediction is None:
            return 0.0
        try:
            return exact_match(str(prediction)[:MAX_CHARS], str(gold), answer_type)
        except ValueError:  # the gold answer is not a valid answer of this type
            return 0.0

    verifier.__name__ = answer_type
    verifier.__doc__ = f"relook's exact match for ``{answer_type}`` answers (never raises)."
    return verifier


_LETTER_PATTERNS = (
    r"^[(\[]?([A-Z])[)\]]?[.:]?$",  # "B", "(B)", "B."
    r"\(([A-Z])\)",  # "I pick (B)"
    r"(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+\(?([A-Z])(?![A-Z])",  # "the answer is B"
    r"^([A-Z])[.:)\]]",  # "D. a cat", "B: cat"
)


def option_letter(text: str | None) -> str | None:
    """The option letter a text names (upper case), or None.

    Tries, on the upper-cased, stripped text: the whole text a letter (``"B"``, ``"(B)"``,
    ``"B."``); a parenthesised ``(X)``; ``answer/choice/option (is) X``; a leading letter
    followed by ``.``, ``:``, ``)`` or ``]`` (``"D. a cat"``). A bare leading word-letter
    (``"A cat"``, ``"I think"``) names no option (after lmms-eval's V* rules,
    ``agent.benchmarks.scoring.vstar_letter``).

    Examples:
        >>> option_letter("(c) the dog"), option_letter("The answer is B"), option_letter("cat")
        ('C', 'B', None)
    """
    if text is None:
        return None
    upper = str(text)[:MAX_CHARS].strip().upper()
    for pattern in _LETTER_PATTERNS:
        match = re.search(pattern, upper)
        if match:
            return match.group(1)
    return None


def option(prediction: str | None, gold: str) -> float:
    """1.0 if the prediction names the gold option letter (:func:`option_letter`), else 0.0."""
    want = option_letter(gold)
    return float(want is not None and option_letter(prediction) == want)


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS = re.compile(r"(?<![\d.,])(\d{1,3})((?:,\d{3})+)(?![\d,]|\.\d)")


def parse_number(text: str | None) -> float | None:
    """The one number a text names (digits with thousands commas, decimals, exponents, or a
    number word ``zero``..``twelve``), or None when it names none, several or a non-finite one.

    Examples:
        >>> parse_number("about 1,024 px"), parse_number("-3.5e2"), parse_number("three")
        (1024.0, -350.0, 3.0)
        >>> parse_number("2 or 3") is None
        True
    """
    if text is None:
        return None
    text = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), str(text)[:MAX_CHARS])
    values = {float(match.group(0)) for match in _NUMBER.finditer(text)}
    words = text.lower().translate(PUNCT_TO_SPACE).split()
    values.update(float(NUMBER_WORDS[w]) for w in words if w in NUMBER_WORDS)
    if len(values) != 1:
        return None
    value = values.pop()
    return value if math.isfinite(value) else None


def number(prediction: str | None, gold: str) -> float:
    """1.0 if the prediction's number is within tolerance of the gold number, else 0.0.

    Right when ``|p - g| <= max(NUMBER_ABS_TOL, NUMBER_REL_TOL * |g|)`` (:func:`parse_number`
    reads both).
    """
    want, got = parse_number(gold), parse_number(prediction)
    if want is None or got is None:
        return 0.0
    return float(abs(got - want) <= max(NUMBER_ABS_TOL, NUMBER_REL_TOL * abs(want)))


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_cjk(ch: str) -> bool:
    """A Chinese, Japanese or Korean character (scored one character per token)."""
    code = ord(ch)
    return (
        0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0xAC00 <= code <= 0xD7AF  # hangul syllables
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0x20000 <= code <= 0x2FA1F  # extensions B-F, compatibility supplement
    )


def squad_tokens(text: str | None) -> list[str]:
    """SQuAD normalisation, then tokens: lowercase, drop punctuation (ASCII and Unicode
    ``P*``), drop the articles a/an/the, split on whitespace; CJK characters are one token each.

    Examples:
        >>> squad_tokens("The Cat's  hat!")
        ['cats', 'hat']
        >>> squad_tokens("红色的 cube")
        ['红', '色', '的', 'cube']
    """
    if text is None:
        return []
    text = str(text)[:MAX_CHARS].lower()
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch not in string.punctuation and not unicodedata.category(ch).startswith("P")
    )
    text = _ARTICLES.sub(" ", text)
    tokens: list[str] = []
    for word in text.split():
        run = ""
        for ch in word:
            if _is_cjk(ch):
                tokens += [run, ch] if run else [ch]
                run = ""
            else:
                run += ch
        if run:
            tokens.append(run)
    return tokens


def em(prediction: str | None, gold: str) -> float:
    """SQuAD exact match: 1.0 if the normalised token lists are equal (:func:`squad_tokens`)."""
    if prediction is None:
        return 0.0
    return float(squad_tokens(prediction) == squad_tokens(gold))


def f1(prediction: str | None, gold: str) -> float:
    """SQuAD token F1 of the normalised tokens (:func:`squad_tokens`).

    ``2 P R / (P + R)`` over the multiset overlap; when either side has no token, 1.0 if both
    have none, else 0.0 (as the SQuAD v2 script).
    """
    if prediction is None:
        return 0.0
    got, want = squad_tokens(prediction), squad_tokens(gold)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """The box ``(x1, y1, x2, y2)`` a text states as exactly four numbers (any brackets or
    separators), or None.

    Examples:
        >>> parse_box("[10, 20, 30, 40]")
        (10.0, 20.0, 30.0, 40.0)
    """
    if text is None:
        return None
    values = [float(match.group(0)) for match in _NUMBER.finditer(str(text)[:MAX_CHARS])]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None
    return values[0], values[1], values[2], values[3]


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (any unit), in [0, 1].

    A degenerate box (``x2 <= x1`` or ``y2 <= y1``) scores 0.0; the ratio is clamped to [0, 1]
    against float rounding.
    """
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return 0.0
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if not union > 0 or not math.isfinite(union):
        return 0.0
    return min(1.0, max(0.0, inter / union))


def iou(prediction: str | None, gold: str) -> float:
    """IoU of the predicted and gold boxes (:func:`parse_box`, :func:`box_iou`); 0.0 when
    either is not a box."""
    got, want = parse_box(prediction), parse_box(gold)
    if got is None or want is None:
        return 0.0
    return box_iou(got, want)


VERIFIERS: dict[str, Verifier] = {
    "exact": exact,
    "index": _relook("index"),
    "int": _relook("int"),
    "digit": _relook("digit"),
    "word": _relook("word"),
    "option": option,
    "number": number,
    "em": em,
    "f1": f1,
    "iou": iou,
}
"""Every answer verifier, by name."""

ANSWER_TYPE_VERIFIERS: dict[str, str] = {
    "index": "index",
    "int": "int",
    "digit": "digit",
    "word": "word",
    "exact": "exact",
    "option": "option",
    "number": "number",
    "em": "em",
    "text": "f1",
    "f1": "f1",
    "box": "iou",
}
"""The verifier a sample's ``answer_type`` is scored with."""


def verifier_for(answer_type: str) -> Verifier:
    """The verifier of an answer type.

    Raises:
        ValueError: unknown ``answer_type`` (the message lists the known ones).
    """
    name = ANSWER_TYPE_VERIFIERS.get(answer_type)
    if name is None:
        raise ValueError(
            f"unknown answer_type {answer_type!r}; known: {sorted(ANSWER_TYPE_VERIFIERS)}"
        )
    return VERIFIERS[name]


def verify(prediction: str | None, gold: str, answer_type: str) -> float:
    """How right ``prediction`` is, in [0, 1], by the verifier of ``answer_type``.

    Raises:
        ValueError: unknown ``answer_type``.
    """
    return verifier_for(answer_type)(prediction, gold)


def verify_trajectory(traj: Trajectory) -> None:
    """Fill the verification outcome of a finished episode (docs/method.md §5), in place.

    ``acc``: :func:`verify` of the answer (0 without one); ``fmt``: -1.0 when the episode
    ended without an answer or holds a void turn or a failed call, else 0.0; ``used``: 1.0 when
    at least one tool call succeeded. ``reward`` is left to the trainer (``train.rewards``).

    Raises:
        ValueError: unknown ``traj.answer_type``.
    """
    traj.acc = verify(traj.answer, traj.gold, traj.answer_type)
    malformed = traj.answer is None or traj.flags["void_turn"] or traj.flags["failed_call"]
    traj.fmt = -1.0 if malformed else 0.0
    traj.used = float(any(e.kind == "tool_call" and e.ok for e in traj.events))
