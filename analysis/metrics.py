"""Attention metrics: pure pandas functions on the long attention table (docs/method.md §6).

The input is the table of :meth:`analysis.replay.AttentionRecord.to_frame` (as stored by
:func:`analysis.rundir.write_attention`), one row per (trajectory, token, layer, head, region)::

    trajectory  str    trajectory id (j)
    token       int    index t among the generated tokens
    pos         int    absolute position p of token t; its query row p - 1 sees the p keys 0..p-1
    turn, layer, head
    region      str    "sink", "system", "user_text", "image_wrap", "tool_text", "generated",
                       "self" or "image:{k}"
    image       int    k for "image:k", else -1
    origin      str    "input", "reflect" or "confirm" for an image, else ""
    mass        float  fraction of the row's attention; one (trajectory, token, layer, head) sums to 1
    keys        int    optional: key positions of the region visible to the query ("self": 1);
                       the regions' keys of one row sum to pos
    value_mass  float  optional: attention x value norm, renormalised per row (rows sum to 1)

Every share is reduced in the same order: regions summed within one attention row (one
trajectory, token, layer, head), then averaged over layers and heads per token, then averaged
over trajectories per token. ``kind`` picks the variant (:data:`KINDS`):

- "raw": ``mass``.
- "no_sink": the sink row dropped and the rest renormalised, ``mass / (1 - mass[sink])``
  (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks": position 0
  soaks up attention that carries little information).
- "value": ``value_mass`` (Kobayashi et al. 2020, "Attention is Not Only a Weight").
- "efficiency": ``mass / (keys / pos)``, attention relative to the region's share of the visible
  keys: 1 is what uniform attention gives, above 1 the region is over-attended.

The decay fits of the image-share curve live in :mod:`analysis.decay`, the before/after views of
tool calls in :mod:`analysis.events`; both build on :func:`image_token_shares`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

GROUPS = ("text", "tool_text", "image", "generated")
KINDS = ("raw", "no_sink", "value", "efficiency")
KIND_COLUMNS = {
    "raw": ("mass",), "no_sink": ("mass",), "value": ("value_mass",),
    "efficiency": ("mass", "keys", "pos"),
}  # fmt: skip
"""Columns of the attention table each share variant of :data:`KINDS` reads."""
SETTINGS = ("single-image", "multi-image")
"""IMAgent Figure-1 settings by a trajectory's input images: exactly one, two or more
(:func:`image_counts`; a trajectory with none is "text-only")."""
_GROUP_OF = {"sink": "text", "system": "text", "user_text": "text", "image_wrap": "text"}
_GROUP_OF |= {"tool_text": "tool_text", "generated": "generated", "self": "generated"}
_ROW = ["trajectory", "token", "layer", "head"]  # one attention row: masses sum to 1
_BAND_NAMES = {1: ("all",), 2: ("early", "late"), 3: ("early", "middle", "late")}


def region_group(region: str) -> str:
    """Figure-1 group of a key region: "text", "image", "generated" or "tool_text".

    text = sink + system + user_text + image_wrap; image = every "image:{k}" (input and tool
    images alike); generated = generated + self; tool_text is reported apart (docs/method.md §6).
    The vision start/end wrapper tokens (``image_wrap``) carry no pixels, so they count as text.
    Raises ValueError for an unknown region.
    """
    if region.startswith("image:"):
        return "image"
    if region not in _GROUP_OF:
        raise ValueError(f"unknown attention region {region!r}")
    return _GROUP_OF[region]


# Per-row values of each variant


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` naming ``what`` and every column of ``columns`` missing from ``df``."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}, missing from the table")


def _check_kind(att: pd.DataFrame, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(map(repr, KINDS))}")
    require_columns(att, KIND_COLUMNS[kind], f"kind={kind!r}")


def available_kinds(columns: Sequence[str] | pd.Index) -> list[str]:
    """The share variants of :data:`KINDS` an attention table with ``columns`` supports (every
    column of :data:`KIND_COLUMNS` present), in :data:`KINDS` order."""
    cols = set(columns)
    return [k for k in KINDS if cols.issuperset(KIND_COLUMNS[k])]


def _row_frame(att: pd.DataFrame, by: list[str], kind: str) -> pd.DataFrame:
    """Columns ``_ROW``, ``by`` (a "group" column computed), region, w (the numerator: mass,
    renormalised mass or value mass) and, for efficiency, k = keys / pos."""
    df = att[list(dict.fromkeys(_ROW + [c for c in by if c != "group"] + ["region"]))].copy()
    df["w"] = att["value_mass" if kind == "value" else "mass"].astype("float64")
    if kind == "efficiency":
        df["k"] = att["keys"].astype("float64") / att["pos"].astype("float64")
    if kind == "no_sink":
        df = df[df["region"] != "sink"]
        # The sum of the other masses equals 1 - mass[sink] for rows summing to 1, and stays
        # exact in float32 where the sink holds nearly all of the row.
        denom = df.groupby(_ROW, sort=False, observed=True)["w"].transform("sum")
        keep = denom > 0  # a row with all its mass on the sink has no renormalised shares
        df = df[keep].assign(w=df["w"][keep] / denom[keep])
    if "group" in by:
        df["group"] = df["region"].map({r: region_group(r) for r in df["region"].unique()})
    return df


def _summed(att: pd.DataFrame, by: list[str], kind: str) -> pd.Series:
    """Value of each ``by`` cell of each attention row, indexed by ``_ROW + by``; efficiency is
    (sum of mass) / (sum of keys / pos) over the cell's regions, NaN where it has no keys."""
    df = _row_frame(att, by, kind)
    g = df.groupby(_ROW + by, sort=False, observed=True)
    if kind != "efficiency":
        return g["w"].sum()
    s = g[["w", "k"]].sum()
    return s["w"] / s["k"].where(s["k"] > 0)


def _row_values(att: pd.DataFrame, by: list[str], kind: str) -> pd.DataFrame:
    """Wide per-row values: index ``_ROW``, one column per ``by`` cell (all :data:`GROUPS` for
    ``by=["group"]``); an absent cell is 0 (NaN for efficiency: no keys, no ratio)."""
    fill = math.nan if kind == "efficiency" else 0.0
    wide = _summed(att, by, kind).unstack(by, fill_value=fill)
    if by == ["group"]:
        wide = wide.reindex(columns=list(GROUPS), fill_value=fill)
    return wide


def _image_rows(att: pd.DataFrame, kind: str) -> pd.Series:
    """Image-group value of each attention row (index ``_ROW``)."""
    return _row_values(att, ["group"], kind)["image"]


# Shares per token


def token_shares(
    att: pd.DataFrame, by: Sequence[str] = ("group",), *, kind: str = "raw"
) -> pd.DataFrame:
    """Share of attention per trajectory, generated token and group, averaged over layers, heads.

    share[j, t, g] = mean_{layer, head} sum_{region in g} mass[j, t, layer, head, region]

    with the variant of ``kind`` (module docstring): "no_sink" uses mass / (1 - mass[sink]) and
    drops the sink; "value" uses value_mass; "efficiency" is, per layer and head,
    (sum_{r in g} mass) / (sum_{r in g} keys / pos), then averaged.

    A group absent from a (layer, head) row counts as 0 in the mean (efficiency: left out, NaN
    if absent everywhere). With ``by=("group",)`` every group of :data:`GROUPS` appears, so raw,
    no_sink and value shares sum to 1 per token. With no_sink, a row whose whole mass is on the
    sink is left out of the mean.

    Args:
        att: long attention table.
        by: columns of ``att`` or "group" (:func:`region_group`): ("region",), ("group", "origin").
        kind: one of :data:`KINDS`.

    Returns:
        Columns trajectory, token, *by, share (a fraction in [0, 1]; for efficiency a ratio,
        1 = uniform over keys, NaN where the cell has no visible keys).

    Raises:
        ValueError: unknown kind, a column the kind needs ("keys", "value_mass") is missing,
            or an unknown region.
    """
    by = list(by)
    _check_kind(att, kind)
    if att.empty:
        return pd.DataFrame(columns=["trajectory", "token", *by, "share"])
    mean = _row_values(att, by, kind).groupby(level=["trajectory", "token"]).mean()
    long = mean.stack(list(range(len(by))), future_stack=True).rename("share").reset_index()
    return long.sort_values(["trajectory", "token", *by], kind="stable", ignore_index=True)


def image_token_shares(att: pd.DataFrame, kind: str = "raw") -> pd.DataFrame:
    """Image share s[j, t] of every measured (trajectory j, generated token t): the "image" group
    of :func:`token_shares` (variant ``kind``), the per-token series the decay fits
    (:mod:`analysis.decay`) and tool-call windows (:mod:`analysis.events`) are built on.

    Returns:
        Columns trajectory, token, image_share (a fraction; efficiency: a ratio).

    Raises:
        ValueError: as :func:`token_shares`.
    """
    per = token_shares(att, ("group",), kind=kind)
    per = per[per["group"] == "image"]
    return per[["trajectory", "token", "share"]].rename(columns={"share": "image_share"})


def share_by_token(
    att: pd.DataFrame, by: Sequence[str] = ("group",), *, kind: str = "raw"
) -> pd.DataFrame:
    """Mean over trajectories of :func:`token_shares`, per generated-token index.

    share[t, g] = mean_{j with token t} share[j, t, g]

    Returns:
        Columns token, *by, share (mean), std (across trajectories, NaN for n = 1),
        n (number of trajectories that reach token t with a defined share).

    Raises:
        ValueError: as :func:`token_shares`.
    """
    return mean_by_token(token_shares(att, by, kind=kind), by)


def mean_by_token(per: pd.DataFrame, by: Sequence[str] = ("group",)) -> pd.DataFrame:
    """Mean over trajectories, per generated token, of per-trajectory shares:
    share[t, g] = mean_{j reaching t} share[j, t, g].

    :func:`share_by_token` of a table is this of its :func:`token_shares`; call it directly to
    pool several tables (arms, seeds: concatenate their ``token_shares`` with distinct
    trajectory ids) or a subset of trajectories (:func:`in_setting`).

    Args:
        per: columns trajectory, token, *by, share (:func:`token_shares`).
        by: the grouping columns of ``per``.

    Returns:
        Columns token, *by, share (mean), std (across trajectories, NaN for n = 1), n
        (trajectories with a defined share at token t), sorted by token, by.

    Raises:
        ValueError: a column missing.
    """
    by = list(by)
    require_columns(per, ["trajectory", "token", *by, "share"], "mean_by_token")
    if per.empty:
        return pd.DataFrame(columns=["token", *by, "share", "std", "n"])
    stats = per.groupby(["token", *by], observed=True)["share"]
    return stats.agg(share="mean", std="std", n="count").reset_index()


def image_curve(per: pd.DataFrame) -> pd.DataFrame:
    """The image-share decay curve from per-trajectory group shares (``token_shares(att,
    ("group",))``, possibly pooled): :func:`mean_by_token` of the "image" rows.

    Returns:
        Columns token, image_share, std, n; :func:`image_share_curve` of the table ``per``
        came from.

    Raises:
        ValueError: a column of :func:`mean_by_token` or "group" missing.
    """
    require_columns(per, ["group"], "image_curve")
    curve = mean_by_token(per[per["group"] == "image"], ("group",))
    curve = curve.rename(columns={"share": "image_share"})
    return curve[["token", "image_share", "std", "n"]].reset_index(drop=True)


def image_share_curve(att: pd.DataFrame, *, kind: str = "raw") -> pd.DataFrame:
    """Image-attention share versus generated-token index (the decay curve).

    image_share[t] = mean_j mean_{layer, head} sum_k mass[j, t, layer, head, "image:k"]
    (with the variant of ``kind``, see :func:`token_shares`).

    Returns:
        Columns token, image_share (fraction; efficiency: ratio), std, n (trajectories),
        sorted by token.

    Raises:
        ValueError: as :func:`token_shares`.
    """
    return image_curve(token_shares(att, ("group",), kind=kind))


def image_shares(att: pd.DataFrame, kind: str = "raw") -> pd.DataFrame:
    """Share of attention on each image per trajectory and token, averaged over layers, heads.

    share[j, t, k] = mean_{layer, head} mass[j, t, layer, head, "image:k"]

    (with the variant of ``kind``, see :func:`token_shares`), for one line per image. Only the
    images of trajectory j appear in its rows (unlike ``token_shares(att, ("image",))``, which
    gives every image number of the table to every trajectory).

    Returns:
        Columns trajectory, token, image (k), origin ("input", "reflect", "confirm"), share
        (fraction; efficiency: ratio, NaN before the image is visible), sorted by trajectory,
        token, image.

    Raises:
        ValueError: as :func:`token_shares`, or no "image"/"origin" column.
    """
    cols = ["trajectory", "token", "image", "origin", "share"]
    _check_kind(att, kind)
    require_columns(att, ["image", "origin"], "image_shares")
    if att.empty:
        return pd.DataFrame(columns=cols)
    summed = _summed(att, ["image", "origin"], kind)
    image = summed[summed.index.get_level_values("image") >= 0]
    g = image.groupby(level=cols[:4], observed=True)
    if kind == "efficiency":
        out = g.mean().rename("share").reset_index()
    else:  # divide by the rows of the token, so a row without the image counts as 0
        rows = summed.index.droplevel(["image", "origin"]).unique().to_frame(index=False)
        n_rows = rows.groupby(["trajectory", "token"]).size().rename("n_rows").reset_index()
        out = g.sum().rename("share").reset_index().merge(n_rows, on=["trajectory", "token"])
        out["share"] = out["share"] / out.pop("n_rows")
    out["image"] = out["image"].astype("int64")
    return out.sort_values(cols[:3], kind="stable", ignore_index=True)[cols]


# Images and settings of a trajectory


def image_counts(att: pd.DataFrame) -> pd.DataFrame:
    """Images each measured trajectory holds, by origin, and its Figure-1 setting.

    Returns:
        Columns trajectory, n_images (distinct image numbers k), n_input (origin "input"),
        n_tool (other origins: tool results), setting ("single-image": exactly one input
        image, "multi-image": two or more, "text-only": none; :data:`SETTINGS`), one row per
        trajectory of ``att`` (none for an empty table), sorted by trajectory.

    Raises:
        ValueError: no trajectory/image/origin column.
    """
    require_columns(att, ["trajectory", "image", "origin"], "image_counts")
    cols = ["trajectory", "n_images", "n_input", "n_tool", "setting"]
    images = att.loc[att["image"] >= 0, ["trajectory", "image", "origin"]].drop_duplicates()
    ids = pd.Index(att["trajectory"].unique(), name="trajectory")
    if ids.empty:
        return pd.DataFrame(columns=cols)
    is_input = images["origin"] == "input"
    n_input = images[is_input].groupby("trajectory").size().reindex(ids, fill_value=0)
    n_tool = images[~is_input].groupby("trajectory").size().reindex(ids, fill_value=0)
    out = pd.DataFrame({"n_images": n_input + n_tool, "n_input": n_input, "n_tool": n_tool})
    out["setting"] = np.select(
        [out["n_input"] == 1, out["n_input"] >= 2], list(SETTINGS), "text-only"
    )
    return out.reset_index().sort_values("trajectory", ignore_index=True)[cols]


def in_setting(df: pd.DataFrame, counts: pd.DataFrame, setting: str) -> pd.DataFrame:
    """Rows of ``df`` (any frame with a trajectory column: an attention table, its
    :func:`token_shares`) whose trajectory is in ``setting``.

    Args:
        df: the rows to filter.
        counts: :func:`image_counts` of the table ``df`` comes from (same trajectory ids).
        setting: "all" (``df`` unchanged), one of :data:`SETTINGS`, or "text-only".

    Raises:
        ValueError: unknown setting, or a trajectory/setting column missing.
    """
    if setting not in ("all", *SETTINGS, "text-only"):
        raise ValueError(
            f"unknown setting {setting!r}: use 'all', 'text-only' or one of {SETTINGS}"
        )
    require_columns(df, ["trajectory"], "in_setting")
    require_columns(counts, ["trajectory", "setting"], "in_setting counts")
    if setting == "all":
        return df
    keep = set(counts.loc[counts["setting"] == setting, "trajectory"])
    return df[df["trajectory"].isin(keep)]


# Layer bands and heads


def layer_bands(n_layers: int, n_bands: int = 3) -> dict[int, str]:
    """Split layers 0..n_layers-1 into ``n_bands`` contiguous bands, as equal as possible.

    The first ``n_layers % n_bands`` bands get one layer more (28 layers: 10, 9, 9). Names:
    "early", "middle", "late" for 3 bands; "early", "late" for 2; "all" for 1; else
    "layers {first}-{last}" ("layer {first}" for a band of one layer).

    Returns:
        layer -> band name.

    Raises:
        ValueError: n_bands < 1 or n_layers < n_bands.
    """
    if n_bands < 1 or n_layers < n_bands:
        raise ValueError(f"need 1 <= n_bands <= n_layers, got n_bands={n_bands}, {n_layers=}")
    bands = np.array_split(np.arange(n_layers), n_bands)
    names = _BAND_NAMES.get(n_bands) or [
        f"layers {b[0]}-{b[-1]}" if len(b) > 1 else f"layer {b[0]}" for b in bands
    ]
    return {int(layer): name for name, b in zip(names, bands) for layer in b}


def band_shares(
    att: pd.DataFrame, n_bands: int = 3, kind: str = "raw", *, n_layers: int | None = None
) -> pd.DataFrame:
    """Image share per layer band and generated token, averaged over trajectories.

    share[band, t] = mean_j mean_{layer in band, head} sum_k mass[j, t, layer, head, "image:k"]

    Args:
        att: long attention table. n_bands: see :func:`layer_bands`. kind: see :func:`token_shares`.
        n_layers: the model's depth; default max(layer) + 1 (right when the last layer was
            recorded; pass it when the replay kept a subset of layers).

    Returns:
        Columns band (ordered categorical, early to late), token, image_share (fraction),
        std (across trajectories), n (trajectories), sorted by band, token.

    Raises:
        ValueError: as :func:`token_shares` and :func:`layer_bands`, or a layer >= n_layers.
    """
    _check_kind(att, kind)
    cols = ["band", "token", "image_share", "std", "n"]
    image = _image_rows(att, kind) if len(att) else pd.Series()
    if image.empty:  # no rows, or (no_sink) every row all on the sink
        return pd.DataFrame(columns=cols)
    layers = image.index.get_level_values("layer")
    n_layers = int(layers.max()) + 1 if n_layers is None else n_layers
    bands = layer_bands(n_layers, n_bands)
    if layers.max() >= n_layers:
        raise ValueError(f"layer {layers.max()} is out of range for n_layers={n_layers}")
    order = list(dict.fromkeys(bands.values()))
    band = pd.Categorical(layers.map(bands), categories=order, ordered=True)
    keys = [band, image.index.get_level_values("trajectory"), image.index.get_level_values("token")]
    per = image.groupby(keys, observed=True).mean().rename_axis(["band", "trajectory", "token"])
    stats = per.groupby(level=["band", "token"], observed=True)
    out = stats.agg(image_share="mean", std="std", n="count").reset_index()
    return out.sort_values(["band", "token"], kind="stable", ignore_index=True)[cols]


def head_shares(att: pd.DataFrame, kind: str = "raw") -> pd.DataFrame:
    """Mean image share of each (layer, head) over all generated tokens and trajectories.

    share[l, h] = mean_{j, t} sum_k mass[j, t, l, h, "image:k"]

    Averaging over heads (as :func:`token_shares` does) hides image-focused heads: one head of
    16 that puts 0.8 of its attention on the images moves the layer's mean by only 0.05. This
    per-head table, :func:`head_summary` (max beside mean) and :func:`top_image_heads` show them.

    Returns:
        Columns layer, head, image_share (fraction; efficiency: ratio), n_tokens (the
        (trajectory, token) pairs averaged), sorted by layer, head.

    Raises:
        ValueError: as :func:`token_shares`.
    """
    _check_kind(att, kind)
    if att.empty:
        return pd.DataFrame(columns=["layer", "head", "image_share", "n_tokens"])
    g = _image_rows(att, kind).groupby(level=["layer", "head"])
    return g.agg(image_share="mean", n_tokens="count").reset_index()


def head_summary(att: pd.DataFrame, kind: str = "raw") -> pd.DataFrame:
    """Per layer, the mean and the max over heads of :func:`head_shares`, and the max head.

    mean[l] = mean_h share[l, h], max[l] = max_h share[l, h]; the gap between them is what
    head averaging hides.

    Returns:
        Columns layer, image_share_mean, image_share_max, max_head (lowest head on ties),
        n_heads, sorted by layer.

    Raises:
        ValueError: as :func:`token_shares`.
    """
    cols = ["layer", "image_share_mean", "image_share_max", "max_head", "n_heads"]
    heads = head_shares(att, kind).dropna(subset=["image_share"])
    if heads.empty:
        return pd.DataFrame(columns=cols)
    top = heads.loc[heads.groupby("layer")["image_share"].idxmax(), ["layer", "head"]]
    g = heads.groupby("layer")["image_share"]
    out = g.agg(image_share_mean="mean", image_share_max="max", n_heads="count").reset_index()
    out = out.merge(top.rename(columns={"head": "max_head"}), on="layer")
    return out[cols]


def top_image_heads(att: pd.DataFrame, k: int = 5, kind: str = "raw") -> pd.DataFrame:
    """The ``k`` (layer, head) pairs with the highest mean image share (:func:`head_shares`).

    Returns:
        Columns layer, head, image_share, n_tokens; at most k rows, highest first (ties:
        lower layer, then lower head first; NaN last).

    Raises:
        ValueError: k < 1, or as :func:`token_shares`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    heads = head_shares(att, kind)
    order = heads.sort_values(["layer", "head"]).sort_values(
        "image_share", ascending=False, kind="stable", na_position="last"
    )
    return order.head(k).reset_index(drop=True)
