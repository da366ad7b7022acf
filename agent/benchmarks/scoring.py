"""Answer extraction and accuracy aggregation, one published rule per benchmark.

Every ``judge_*`` function has the signature ``judge(prediction, item) -> (parsed, correct)``:
``prediction`` is the text of the agent's ``<answer>`` (``None`` when it gave none, which always
scores 0), ``parsed`` is what the rule extracted (an option letter, or the answer text). Where
a benchmark's official scorer falls back on an LLM judge (GPT-3.5/4o-mini matching for BLINK
and MMIU, a yes/no LLM grader for HR-Bench) relook uses the deterministic rule named in the
docstring instead, so scores are reproducible offline; those rules agree with the judges on
answers that state one option letter, which is what the benchmark prompts ask for.

Aggregates (``aggregate(items, correct) -> dict``) follow each benchmark's report:
``micro`` (mean over questions), ``macro`` (mean over categories of per-category accuracy) and
HR-Bench's ``cycle`` average.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

from agent.benchmarks.base import BenchmarkItem
from agent.data.scoring import exact_match

Judgement = tuple[str | None, bool]


# Letter extraction rules -------------------------------------------------------------------


def vlmeval_can_infer(prediction: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer``: a lone option letter, else a unique option text.

    Punctuation ``.()[],:;!*#{}`` becomes spaces; if exactly one option letter appears as a
    whole token it is the answer (``"Z"`` when none does and a lone ``Z`` appears); otherwise,
    if exactly one option's text occurs in the lower-cased prediction, that option.
    Source: open-compass/VLMEvalKit ``vlmeval/utils/matching_util.py`` (``can_infer_option``,
    ``can_infer_text``).

    Args:
        prediction: the answer text.
        choices: letter -> option text.

    Returns:
        The letter, ``"Z"`` (explicitly none), or ``None`` when nothing can be inferred.
    """
    spaced = prediction
    for ch in ".()[],:;!*#{}":
        spaced = spaced.replace(ch, " ")
    tokens = spaced.split()
    found = [c for c in choices if c in tokens]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in tokens:
        return "Z"
    low = prediction.lower()
    texts = [c for c, t in choices.items() if str(t).lower() in low]
    return texts[0] if len(texts) == 1 else None


def vstar_letter(prediction: str, letters: str) -> str | None:
    """lmms-eval's V* letter extraction (``tasks/vstar_bench/utils.py: extract_answer_letter``).

    Upper-cases, then tries in order: a leading letter; ``answer/choice/option (is) X``;
    ``(X)``; ``X.`` / ``X)`` / ``X]``; a standalone ``X``; finally the only option letter in the
    text. ``letters`` are the item's option letters (the original hard-codes A-D). One fix:
    the leading letter must not start a word (the original reads ``"Answer: D"`` as ``A``).
    """
    text = prediction.strip().upper()
    cls = f"[{letters}]"
    patterns = (
        rf"^({cls})(?![A-Z])",
        rf"(?:THE\s+)?(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+({cls})",
        rf"\(({cls})\)",
        rf"({cls})\s*(?:\.|\)|])",
        rf"(?:^|\s)({cls})(?:\s|$)",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    found = re.findall(cls, text)
    return found[0] if len(found) == 1 else None


_MME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)


def mme_realworld_letter(prediction: str, choices: Sequence[str]) -> str:
    """MME-RealWorld's ``extract_characters_regex`` (evaluation/eval_your_results.py).

    Strips answer prefixes, returns ``""`` for a long (> 10 words) answer without any A-E,
    else the first capital A-E; with none, the letter of an option whose text contains the
    whole answer. (The official list misses two commas, gluing four prefixes into two; relook
    uses the intended list, as lmms-eval's copy does.)
    """
    s = prediction.strip()
    for prefix in _MME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    match = re.search(r"[ABCDE]", s)
    if match:
        return match.group(0)
    if not s.strip():  # the original matches an empty answer to option A
        return ""
    for k, choice in enumerate(choices):
        if s.lower() in f"({'ABCDE'[k]}) {choice}".lower():
            return "ABCDE"[k]
    return ""


def mmmu_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """MMMU's ``parse_multi_choice_response``, which MuirBench's eval reuses.

    ``(X)`` mentions first, then `` X `` tokens, then (for answers longer than 5 words) option
    texts; several candidates: the one mentioned last. Source: muirbench/MuirBench
    ``eval/utils/postprocess.py`` (from MMMU-Benchmark/MMMU ``eval/utils/eval_utils.py``).
    The original picks a random letter when nothing matches; relook returns ``None`` (scored
    wrong) so that scores are deterministic.
    """
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)]
    response = prediction
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = f" {response} "
    cands = [c for c in letters if f"({c})" in response]
    mark = "({})"
    if not cands:
        cands = [c for c in letters if f" {c} " in response]
        mark = " {} "
    if not cands and len(response.split()) > 5:
        cands = [letters[k] for k, t in enumerate(choices) if t.lower() in response.lower()]
        if len(cands) > 1:
            return max(
                cands, key=lambda c: response.lower().rfind(choices[letters.index(c)].lower())
            )
        return cands[0] if cands else None
    if not cands:
        return None
    return max(cands, key=lambda c: response.rfind(mark.format(c)))


def blink_letter(prediction: str) -> str | None:
    """lmms-eval's BLINK extraction (``tasks/blink/utils.py: _extract_answer_letter``).

    The letter at the start of the answer, optionally in brackets: ``"(B) ..."``, ``"B."``,
    ``"b"``. BLINK's own scorer asks GPT-3.5 to map free text to ``(X)``; this is the
    deterministic rule lmms-eval uses instead.
    """
    match = re.match(r"[\(\s]*([A-Z])[\)\.\s]*", prediction.strip(), flags=re.IGNORECASE)
    return match.group(1).upper() if match else None


# Judges ------------------------------------------------------------------------------------


def _letter_judge(parsed: str | None, item: BenchmarkItem) -> Judgement:
    return parsed, parsed is not None and parsed == item.answer


def judge_vstar(prediction: str | None, item: BenchmarkItem) -> Judgement:
    """V*: :func:`vstar_letter`, correct when it equals the gold letter."""
    if prediction is None:
        return None, False
    return _letter_judge(vstar_letter(prediction, item.letters or "ABCD"), item)


def judge_hrbench(prediction: str | None, item: BenchmarkItem) -> Judgement:
    """HR-Bench: :func:`vlmeval_can_infer` over the item's options (VLMEvalKit's exact step;
    the official HR-Bench scorer grades with an LLM judge, DreamMr/HR-Bench
    ``hrbench/vlmeval/dataset/utils/hrbench.py``)."""
    if prediction is None:
        return None, False
    choices = dict(zip(item.letters, item.choices))
    return _letter_judge(vlmeval_can_infer(prediction, choices), item)


def judge_mme_realworld(prediction: str | None, item: BenchmarkItem) -> Judgement:
    """MME-RealWorld: :func:`mme_realworld_letter`; correct when equal to ``Ground truth``."""
    if prediction is None:
        return None, False
    return _letter_judge(mme_realworld_letter(prediction, item.choices) or None, item)


def judge_muirbench(prediction: str | None, item: BenchmarkItem) -> Judgement:
    """MuirBench: :func:`mmmu_letter`; correct when equal to the gold letter."""
    if prediction is None:
        return None, False
    return _letter_judge(mmmu_letter(prediction, item.choices), item)


def judge_blink(prediction: str | None, item: BenchmarkItem) -> Judgement:
    """BLINK: :func:`blink_letter`; correct when equal to the gold ``(X)`` letter."""
    if prediction is None:
        return None, False
    return _letter_judge(blink_letter(prediction), item)


def _mantis_option(answer: str) -> str | None:
    if re.match(r"Answer: [A-Z]", answer):
        return answer[8]
    return next((ch.upper() for ch in answer if ch.isalpha()), None)


def judge_mantis(prediction: str | None, item: BenchmarkItem) -> Judgement:
    """Mantis-Eval's ``get_prediction`` (TIGER-AI-Lab/Mantis ``mantis/benchmark/eval.py``).

    The text after ``Final Answer:`` (else all of it) is the answer. Multiple choice: the
    ``Answer: X`` letter or the first alphabetic character; if that is not an option letter,
    the raw prediction must equal the gold option's text (its ``A.``/``A:``/``(A)`` prefix
    removed). Short answer: case-insensitive equality with the reference.
    """
    if prediction is None:
        return None, False
    raw = prediction
    # searched in ``raw`` itself: ``lower()`` can change a string's length ("\u0130"), which
    # would shift an index taken from the lowered copy
    marker = re.search("final answer:", raw, flags=re.IGNORECASE)
    answer = raw[marker.end() :].strip() if marker else raw
    if item.kind == "short":
        return answer, answer.lower() == item.answer.lower()
    option = _mantis_option(answer)
    if option and option in item.letters:
        return option, option == item.answer
    gold = item.meta.get("raw_options", item.choices)[item.letters.index(item.answer)]
    for prefix in (f"{item.answer}.", f"{item.answer}:", f"({item.answer})"):
        if gold.startswith(prefix):
            gold = gold[len(prefix) :]
            break
    return raw, raw.strip() == gold.strip()


def judge_mmiu(prediction: str | None, item: BenchmarkItem) -> Judgement:
    """MMIU (OpenGVLab/MMIU ``evaluate.py``, ``evaluate_correct.py``).

    Leading/trailing ``.,()`` are stripped; a single letter is the choice. Otherwise the
    official scorer asks GPT-4o-mini which option the text matches; relook takes the option
    whose text the answer contains, if exactly one (InternVL's MMIU ``post_process`` does the
    same), else ``Z``. Correct when the lower-cased choice occurs in the lower-cased gold.
    """
    if prediction is None:
        return None, False
    pred = re.sub(r"^[.,()]+|[.,()]+$", "", prediction.strip()).strip()
    if len(pred) == 1 and pred.isalpha():
        choice = pred.upper()
    else:
        hits = [c for c, t in zip(item.letters, item.choices) if t and t.lower() in pred.lower()]
        choice = hits[0] if len(hits) == 1 else "Z"
    return choice, choice.lower() in item.answer.lower()


def judge_relook(prediction: str | None, item: BenchmarkItem) -> Judgement:
    """relook's offline set: :func:`agent.data.scoring.exact_match` with the sample's type."""
    if prediction is None:
        return None, False
    return prediction, exact_match(prediction, item.answer, item.meta["answer_type"]) == 1.0


# Aggregates --------------------------------------------------------------------------------


def _means(values: Mapping[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in sorted(values.items())}


def _grouped(items: Sequence[BenchmarkItem], correct: Sequence[bool]) -> dict:
    cats: dict[str, list[float]] = defaultdict(list)
    levels: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for item, ok in zip(items, correct):
        cats[item.category].append(float(ok))
        for level, value in item.groups.items():
            levels[level][value].append(float(ok))
    return {"cats": cats, "levels": levels}


def aggregate_micro(items: Sequence[BenchmarkItem], correct: Sequence[bool]) -> dict:
    """Overall = mean over all questions; per category (and per group level) likewise.

    Used by V* (``vstar_bench_eval.py``: ``np.mean(all_acc)``), MME-RealWorld
    (``succ_all / sum_all``), MuirBench, Mantis-Eval and relook's set.

    Returns:
        ``{"overall", "per_category": {cat: acc}, "category_n": {cat: n}, "per_<level>": ...}``
        with accuracies as fractions in [0, 1].

    Raises:
        ValueError: no items, or ``items`` and ``correct`` differ in length.
    """
    _check(items, correct)
    g = _grouped(items, correct)
    out = {
        "overall": sum(map(float, correct)) / len(correct),
        "per_category": _means(g["cats"]),
        "category_n": {k: len(v) for k, v in sorted(g["cats"].items())},
    }
    for level, values in sorted(g["levels"].items()):
        out[f"per_{level}"] = _means(values)
    return out


def aggregate_macro(items: Sequence[BenchmarkItem], correct: Sequence[bool]) -> dict:
    """Overall = unweighted mean of per-category accuracies (``micro_overall`` kept too).

    BLINK reports the average over its 14 sub-tasks (zeyofu/BLINK_Benchmark
    ``eval/evaluate.py``); MMIU the mean over tasks (OpenGVLab/MMIU ``evaluate_correct.py``).
    """
    out = aggregate_micro(items, correct)
    out["micro_overall"] = out["overall"]
    out["overall"] = sum(out["per_category"].values()) / len(out["per_category"])
    return out


def aggregate_cycle(items: Sequence[BenchmarkItem], correct: Sequence[bool]) -> dict:
    """HR-Bench: accuracy per ``cycle_category`` (overall and per category), then the mean over
    cycles (VLMEvalKit ``report_acc_hrbench``; lmms-eval ``hrbench_aggregate_results``).

    Items carry their cycle in ``groups["cycle"]``; a category absent from a cycle does not
    count for that cycle.
    """
    _check(items, correct)
    by_cycle: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_cycle[item.groups.get("cycle", "0")].append(i)
    overall: list[float] = []
    cats: dict[str, list[float]] = defaultdict(list)
    for idx in by_cycle.values():
        sub = aggregate_micro([items[i] for i in idx], [correct[i] for i in idx])
        overall.append(sub["overall"])
        for cat, acc in sub["per_category"].items():
            cats[cat].append(acc)
    out = aggregate_micro(items, correct)
    out.pop("per_cycle", None)
    out["micro_overall"] = out["overall"]
    out["overall"] = sum(overall) / len(overall)
    out["per_category"] = _means(cats)
    out["cycles"] = len(by_cycle)
    return out


def _check(items: Sequence[BenchmarkItem], correct: Sequence[bool]) -> None:
    if len(items) != len(correct):
        raise ValueError(f"{len(items)} items but {len(correct)} judgements")
    if not items:
        raise ValueError("no items to aggregate")
