"""Rewards: weighted sums of named reward terms, computed by the trainer (docs/method.md §5).

A reward term is ``term(traj) -> float``, read off a verified trajectory (``acc``, ``fmt``,
``used``: :func:`agent.verifiers.verify_trajectory`). A reward is a weighted sum of terms,
after TRL's ``reward_funcs`` + ``reward_weights``, written as a spec:

- a named form: ``"imagent"`` (relook default, ``acc * (1 + g * used) + 0.2 * fmt``, with
  ``g = GRPOConfig.tool_gain``) or ``"deepeyes"`` (DeepEyes, arXiv 2505.14362:
  ``0.8 * acc + 0.2 * fmt + 1.2 * [used and acc]``);
- ``"name:weight,name:weight"`` (``"acc:1.0,format:0.2,tool:0.5"``; a missing weight is 1),
  where a name is a term of :data:`TERMS`, a verifier of :data:`agent.verifiers.VERIFIERS`
  (that verifier on the answer, whatever the sample's ``answer_type``), a named form (its
  terms, weights multiplied), or ``module:function`` (a user function of the trajectory);
- or a list of such entries, with optional separate weights (:func:`parse_reward`).

The IMAgent form is the terms ``acc:1, acc_x_tool:g, format:0.2``; on 0/1 outcomes it equals
``acc * (1 + g * used) + 0.2 * fmt`` bit for bit.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from agent.trajectory import Trajectory
from agent.verifiers import VERIFIERS

RewardFn = Callable[[Trajectory], float]


def _verifier_term(name: str, traj: Trajectory) -> float:
    """A verifier of :data:`agent.verifiers.VERIFIERS` on the trajectory's answer."""
    return VERIFIERS[name](traj.answer, traj.gold)


TERMS: dict[str, RewardFn] = {
    "acc": lambda t: t.acc,
    "format": lambda t: t.fmt,
    "tool": lambda t: t.used,
    "acc_x_tool": lambda t: t.acc * t.used,
    "tool_and_acc": lambda t: float(t.used > 0 and t.acc > 0),
    **{name: partial(_verifier_term, name) for name in VERIFIERS},
}
"""Reward terms by name: ``acc`` (the sample's verifier, [0, 1]), ``format`` (-1 malformed,
else 0), ``tool`` (1 if a tool call succeeded), ``acc_x_tool`` (``acc * used``),
``tool_and_acc`` (``[used and acc]``, DeepEyes' tool bonus) and every verifier by its name."""

FORMS: dict[str, Callable[[float], tuple[tuple[str, float], ...]]] = {
    "imagent": lambda g: (("acc", 1.0), ("acc_x_tool", g), ("format", 0.2)),
    "deepeyes": lambda g: (("acc", 0.8), ("format", 0.2), ("tool_and_acc", 1.2)),
}
"""Named reward forms: ``tool_gain -> (term, weight)`` pairs."""


@dataclass(frozen=True)
class RewardTerm:
    """One weighted term of a reward.

    Attributes:
        name: the term's name (its metrics column is ``reward/<name>``).
        weight: its weight in the sum.
        fn: ``fn(traj) -> float``.
    """

    name: str
    weight: float
    fn: RewardFn


def _user_term(name: str) -> RewardFn:
    """The function ``module:function`` names.

    Raises:
        ValueError: the module cannot be imported or holds no such callable.
    """
    module, _, function = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward term {name!r}: cannot load {function!r} from {module!r}") from err
    if not callable(fn):
        raise ValueError(f"reward term {name!r} is not callable")
    return fn


def _split(entry: str) -> tuple[str, float]:
    """``"name:weight"`` -> ``(name, weight)``; ``"name"`` (or ``module:function``) -> weight 1.

    Raises:
        ValueError: an empty name.
    """
    entry = entry.strip()
    head, sep, tail = entry.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            head, weight = entry, 1.0
    else:
        head, weight = entry, 1.0
    if not head.strip():
        raise ValueError(f"reward entry {entry!r} names no term")
    return head.strip(), weight


def _expand(name: str, weight: float, tool_gain: float) -> list[RewardTerm]:
    """The terms one spec entry stands for.

    Raises:
        ValueError: an unknown name (the message names it and lists the known ones).
    """
    if name in FORMS:
        return [RewardTerm(n, weight * w, TERMS[n]) for n, w in FORMS[name](tool_gain)]
    if name in TERMS:
        return [RewardTerm(name, weight, TERMS[name])]
    if ":" in name:
        return [RewardTerm(name, weight, _user_term(name))]
    raise ValueError(
        f"unknown reward term {name!r}; known: forms {sorted(FORMS)}, terms {sorted(TERMS)} "
        "(verifiers included), or module:function"
    )


def parse_reward(
    spec: str | Sequence[str | tuple[str, float]],
    tool_gain: float = 0.5,
    weights: Sequence[float] | None = None,
) -> tuple[RewardTerm, ...]:
    """The weighted terms of a reward spec (module docstring).

    Args:
        spec: ``"imagent"``, ``"acc:1.0,format:0.2"``, or a list of entries (``"acc"``,
            ``"acc:0.8"``, ``("acc", 0.8)``).
        tool_gain: ``g`` of the ``imagent`` form.
        weights: TRL's ``reward_weights``: one weight per entry of a list ``spec``, replacing
            the entries' own.

    Returns:
        The terms, in spec order; a name given twice keeps one term, weights added.

    Raises:
        ValueError: an unknown term, an unloadable ``module:function``, an empty spec, a
            weight that is not finite, or ``weights`` of another length than ``spec``.
    """
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    pairs = [e if isinstance(e, tuple) else _split(e) for e in entries if e != ""]
    if not pairs:
        raise ValueError(f"reward spec {spec!r} names no term")
    if weights is not None:
        if len(weights) != len(pairs):
            raise ValueError(f"{len(weights)} reward weights for {len(pairs)} reward terms")
        pairs = [(n, float(w)) for (n, _), w in zip(pairs, weights)]
    terms: dict[str, RewardTerm] = {}
    for name, weight in pairs:
        if not math.isfinite(float(weight)):
            raise ValueError(f"reward term {name!r} has weight {weight}, not a finite number")
        for term in _expand(name, float(weight), tool_gain):
            old = terms.get(term.name)
            terms[term.name] = (
                term if old is None else RewardTerm(term.name, old.weight + term.weight, term.fn)
            )
    return tuple(terms.values())


def score(
    trajs: list[Trajectory], spec: str | Sequence | tuple[RewardTerm, ...], tool_gain: float = 0.5
) -> list[Trajectory]:
    """Fill ``reward`` and ``reward_terms`` of verified trajectories, in place.

    ``reward = sum(weight * term(traj))`` in spec order; ``reward_terms`` holds each term's
    unweighted value (the ``reward/<name>`` metrics columns).

    Args:
        trajs: trajectories whose ``acc``/``fmt``/``used`` are filled (the rollout does it).
        spec: a reward spec (:func:`parse_reward`) or its parsed terms.
        tool_gain: ``g`` of the ``imagent`` form.

    Returns:
        ``trajs``.

    Raises:
        ValueError: a bad spec, or a term returning a value that is not a finite number.
    """
    terms = spec if _parsed(spec) else parse_reward(spec, tool_gain)
    for traj in trajs:
        values = {t.name: _value(t, traj) for t in terms}
        traj.reward_terms = values
        traj.reward = sum(t.weight * values[t.name] for t in terms)
    return trajs


def _parsed(spec) -> bool:
    return isinstance(spec, tuple) and all(isinstance(t, RewardTerm) for t in spec) and spec != ()


def _value(term: RewardTerm, traj: Trajectory) -> float:
    """``float(term.fn(traj))``.

    Raises:
        ValueError: not a finite number.
    """
    value = term.fn(traj)
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward term {term.name!r} returned {value!r}, not a number") from err
    if not math.isfinite(out):
        raise ValueError(f"reward term {term.name!r} returned {out}")
    return out
