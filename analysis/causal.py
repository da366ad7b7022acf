"""Attention beside the causal measures (docs/method.md §6): per (trajectory, image), the answer
tokens' attention share next to the image-presence attributions and attention knockouts of
:mod:`analysis.attribution`, and the Spearman rank agreement between them.

* :func:`causal_table` - one row per (trajectory, image): attention share, one column per
  attribution kind (nats), and the knockout effect (nats).
* :func:`causal_agreement` - Spearman rho between the attention share and each causal measure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

_KEY = ["trajectory", "image"]


def _unique(frame: pd.DataFrame, keys: list[str], name: str) -> None:
    missing = [c for c in keys if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}")
    dup = frame.duplicated(keys)
    if dup.any():
        raise ValueError(f"{name} has several rows for {frame.loc[dup, keys].iloc[0].to_dict()}")


def _attention_share(
    attention: pd.DataFrame, target_positions: Mapping[str, Sequence[int]] | None
) -> pd.DataFrame:
    att = attention
    if target_positions is not None:
        keep = pd.Series(False, index=att.index)
        for trajectory, positions in target_positions.items():
            keep |= (att["trajectory"] == trajectory) & att["pos"].isin(list(positions))
        att = att[keep]
    rows = att[["trajectory", "token", "layer", "head"]].drop_duplicates()
    n_rows = rows.groupby("trajectory").size().rename("n_rows")
    images = att[att["image"] > 0]
    share = images.groupby(_KEY, observed=True).agg(
        mass=("mass", "sum"), origin=("origin", "first")
    )
    share = share.reset_index().merge(n_rows, on="trajectory")
    share["attention_share"] = share["mass"] / share["n_rows"]
    share["image"] = share["image"].astype("int64")
    return share[["trajectory", "image", "origin", "attention_share"]]


def causal_table(
    attention: pd.DataFrame,
    attributions: pd.DataFrame,
    knockouts: pd.DataFrame | None = None,
    *,
    target_positions: Mapping[str, Sequence[int]] | None = None,
) -> pd.DataFrame:
    """Per (trajectory, image): mean attention share of the answer tokens beside the causal measures.

    ``attention_share[k] = sum(mass on image:k) / #(token, layer, head)`` over the chosen tokens
    of the trajectory: the image's share averaged over tokens, layers and heads.

    Args:
        attention: the long table of :meth:`analysis.replay.AttentionRecord.to_frame` (columns
            trajectory, token, pos, turn, layer, head, region, image, origin, mass).
        attributions: rows of :func:`analysis.attribution.image_attribution` (any methods and baselines, concatenated).
        knockouts: rows of :func:`analysis.attribution.image_knockouts`, one per (trajectory, image), or None.
        target_positions: trajectory -> answer positions (``pos``) to average over; None: every
            token in ``attention``.

    Returns:
        Columns trajectory, image, origin, attention_share, one ``{method}_{baseline}`` column per
        attribution kind (e.g. ``ablation_grey``, ``shapley_drop``; nats), and ``knockout`` (nats)
        when given. Outer join: a measure missing for an image is NaN.

    Raises:
        ValueError: a frame lacks its key columns or repeats a key.
    """
    share = _attention_share(attention, target_positions)
    attr = attributions.assign(measure=attributions["method"] + "_" + attributions["baseline"])
    _unique(attr, [*_KEY, "measure"], "attributions")
    wide = attr.pivot(index=_KEY, columns="measure", values="attribution").reset_index()
    wide.columns.name = None
    wide["image"] = wide["image"].astype("int64")
    table = share.merge(wide, on=_KEY, how="outer")
    if knockouts is not None:
        _unique(knockouts, _KEY, "knockouts")
        ko = knockouts[[*_KEY, "knockout"]].astype({"image": "int64"})
        table = table.merge(ko, on=_KEY, how="outer")
    return table.sort_values(_KEY, ignore_index=True)


def causal_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation between ``attention_share`` and each causal measure of the table.

    Pooled over all (trajectory, image) rows with both values. Signs: ablation and Shapley are
    positive when an image helps the answer; a knockout effect is negative then, so agreement
    shows as a negative correlation for ``knockout``.

    Args:
        table: :func:`causal_table`.

    Returns:
        One row per measure: measure (str), spearman (float; NaN with fewer than 2 pairs or a
        constant column), n (pairs used).
    """
    fixed = {"trajectory", "image", "origin", "attention_share"}
    rows = []
    for measure in [c for c in table.columns if c not in fixed]:
        pairs = table[["attention_share", measure]].dropna().astype("float64")
        rho = pairs.corr(method="spearman").iloc[0, 1] if len(pairs) >= 2 else float("nan")
        rows.append({"measure": measure, "spearman": float(rho), "n": len(pairs)})
    return pd.DataFrame(rows, columns=["measure", "spearman", "n"])
