"""One trajectory, laid out for reading: tokens with roles, images with their provenance, tool
calls in order (the app's trajectory viewer and the notebook use these).

Input is one record of ``trajectories.jsonl`` (:func:`analysis.rundir.load_trajectories`), as
written by ``agent.trajectory.Trajectory`` (docs/design.md decision 2: token ids, not text)::

    token_ids      [pos] processor-expanded ids (one <|image_pad|> per merged image patch)
    response_mask  [pos] 1 on tokens the policy sampled
    prompt_len     tokens of the first prompt
    images         per image in order of appearance: ref (PNG path relative to the arm folder,
                   or null when not saved), origin ("input", "reflect", "confirm"), source
                   (1-based input image it shows), call (tool call that returned it), bbox
                   ([x0, y0, x1, y1] in original pixels of ``source``, "confirm" only), size
    events         per assistant turn: turn, kind, start, end, text, tool, ok, error,
                   arguments, obs_start, obs_end, images (indices into ``images``)

Reading a token's text needs the arm's tokenizer (``ARM/model/tokenizer.json``, read with the
``tokenizers`` library: no transformers import, nothing downloaded). Everything except the two
readers is a pure function of the record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TOKEN_COLUMNS = ["pos", "id", "text", "role", "image", "token"]
IMAGE_COLUMNS = ["image", "ref", "origin", "source", "call", "x0", "y0", "x1", "y1"]
EVENT_COLUMNS = ["turn", "kind", "tool", "ok", "arguments", "error", "start", "end"]
EVENT_COLUMNS += ["obs_start", "obs_end", "images", "text"]
IMAGE_PAD = "<|image_pad|>"
VISION_WRAP = ("<|vision_start|>", "<|vision_end|>")


def _require(record: dict[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        rid = record.get("id", "?")
        raise ValueError(f"trajectory {rid!r}: {what} needs key(s) {missing}, missing")


def find_tokenizer(arm_dir: str | Path, config: dict[str, Any] | None = None) -> Path | None:
    """The ``tokenizer.json`` that decodes an arm's token ids: ``ARM/model/tokenizer.json`` (the
    trained policy), else ``tokenizer.json`` in the config's ``base_model`` folder; None if
    neither exists (the viewer then shows ids)."""
    candidates = [Path(arm_dir) / "model" / "tokenizer.json"]
    base = (config or {}).get("base_model")
    if isinstance(base, str) and base:
        candidates.append(Path(base) / "tokenizer.json")
    return next((p for p in candidates if p.is_file()), None)


def read_vocab(tokenizer_json: str | Path, ids: Sequence[int]) -> dict[int, str]:
    """Text of each distinct id in ``ids``, decoded one at a time with special tokens kept.

    Args:
        tokenizer_json: a Hugging Face fast-tokenizer file.
        ids: token ids.

    Returns:
        id -> text (byte-level pieces that are not whole characters decode to U+FFFD).

    Raises:
        ValueError: the file is not a tokenizer (the message names it).
    """
    from tokenizers import Tokenizer  # a Rust extension, imported only when a viewer needs it

    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise ValueError(f"{tokenizer_json}: not a tokenizer file ({e})") from e
    return {int(i): tok.decode([int(i)], skip_special_tokens=False) for i in set(ids)}


def token_table(record: dict[str, Any], vocab: dict[int, str] | None = None) -> pd.DataFrame:
    """Every position of a trajectory with its role and, for sampled tokens, its index.

    role: "generated" (response_mask 1), "prompt" (pos < prompt_len), "observation" (a tool
    result turn) or "image" (an image-pad or vision start/end token; ``image`` is then its
    1-based image number k, counted over runs of pads). ``token`` is the generated-token index
    t (the ``token`` column of the attention table: rank of the position among sampled ones),
    -1 for other roles.

    Args:
        record: one trajectory record (keys token_ids, response_mask, prompt_len).
        vocab: id -> text (:func:`read_vocab`); default the id in angle brackets, e.g. "<42>".
            Image tokens are recognised by the text "<|image_pad|>", so without a vocab every
            image pad counts as text.

    Returns:
        Columns :data:`TOKEN_COLUMNS` (pos, id, text, role, image, token), one row per position.

    Raises:
        ValueError: a required key is missing, or token_ids and response_mask differ in length.
    """
    _require(record, ["token_ids", "response_mask", "prompt_len"], "token_table")
    ids = np.asarray(record["token_ids"], dtype=np.int64)
    mask = np.asarray(record["response_mask"], dtype=bool)
    if len(ids) != len(mask):
        raise ValueError(
            f"trajectory {record.get('id', '?')!r}: {len(ids)} token_ids but "
            f"{len(mask)} response_mask entries"
        )
    vocab = vocab or {}
    text = [vocab.get(int(i), f"<{int(i)}>") for i in ids]
    pad = np.array([t == IMAGE_PAD for t in text], dtype=bool)
    wrap = np.array([t in VISION_WRAP for t in text], dtype=bool)
    pos = np.arange(len(ids))
    starts = pad & ~np.concatenate([[False], pad[:-1]])
    image = np.where(pad, np.cumsum(starts), -1)
    role = np.where(
        mask, "generated", np.where(pos < int(record["prompt_len"]), "prompt", "observation")
    )
    role = np.where(pad | wrap, "image", role)
    token = np.where(mask, np.cumsum(mask) - 1, -1)
    return pd.DataFrame(
        {"pos": pos, "id": ids, "text": text, "role": role, "image": image, "token": token}
    )


def collapse_images(tokens: pd.DataFrame) -> pd.DataFrame:
    """:func:`token_table` with each run of image pads folded into one row "[image k: n tokens]"
    and the vision start/end wrappers dropped; other rows unchanged (pos of the first pad)."""
    pads = tokens[tokens["image"] >= 0]
    wrap = (tokens["role"] == "image") & (tokens["image"] < 0)
    rest = tokens[(tokens["image"] < 0) & ~wrap]
    if pads.empty:
        return rest.reset_index(drop=True)
    folded = pads.groupby("image", as_index=False).agg(pos=("pos", "min"), n=("pos", "size"))
    folded = folded.assign(
        id=-1, role="image", token=-1, text=[f"[image {k}: {n} tokens]" for k, n in
                                             zip(folded["image"], folded["n"])]
    )[TOKEN_COLUMNS]  # fmt: skip
    out = pd.concat([rest, folded], ignore_index=True)
    return out.sort_values("pos", kind="stable", ignore_index=True)


def with_shares(tokens: pd.DataFrame, shares: pd.DataFrame) -> pd.DataFrame:
    """Add each generated token's image-attention share to a token table.

    Args:
        tokens: :func:`token_table` (or :func:`collapse_images`) of one trajectory.
        shares: that trajectory's per-token image share: columns token, share (e.g. the image
            rows of :func:`analysis.metrics.token_shares`, a fraction in [0, 1]).

    Returns:
        ``tokens`` plus column image_share (NaN for non-generated or unmeasured tokens).
    """
    s = shares.drop_duplicates("token").set_index("token")["share"]
    gen = tokens["token"] >= 0
    out = tokens.copy()
    out["image_share"] = np.where(gen, tokens["token"].map(s), np.nan).astype("float64")
    return out


def image_table(record: dict[str, Any]) -> pd.DataFrame:
    """The images of a trajectory in order of appearance with their provenance.

    Returns:
        Columns :data:`IMAGE_COLUMNS`: image (1-based k, as ``image:k`` in the attention table),
        ref (PNG path relative to the arm folder, None if not saved), origin, source (1-based
        input image shown), call (tool call index, -1 for input images), x0, y0, x1, y1 (crop box
        in original pixels of ``source``; NaN without one).

    Raises:
        ValueError: an image record lacks "origin", or a bbox is not 4 numbers.
    """
    rows = []
    for k, im in enumerate(record.get("images") or [], 1):
        _require(im, ["origin"], f"image {k}")
        box = im.get("bbox")
        if box is not None and len(box) != 4:
            raise ValueError(f"trajectory {record.get('id', '?')!r}: image {k} bbox {box!r}")
        box = [float(v) for v in box] if box is not None else [np.nan] * 4
        call = im.get("call")
        rows.append(
            (k, im.get("ref"), im["origin"], int(im.get("source") or k),
             -1 if call is None else int(call), *box)
        )  # fmt: skip
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS)


def crop_boxes(images: pd.DataFrame, source: int) -> pd.DataFrame:
    """Crop boxes taken from input image ``source``, to draw on it.

    Args:
        images: :func:`image_table`. source: 1-based input image number.

    Returns:
        Columns x0, y0, x1, y1 (original pixels), label ("image k (confirm, call c)"), one row
        per image with a box whose source is ``source``.
    """
    boxes = images[(images["source"] == source) & images["x0"].notna()]
    labels = [f"image {k} ({o}, call {c})" for k, o, c in
              zip(boxes["image"], boxes["origin"], boxes["call"])]  # fmt: skip
    return boxes[["x0", "y0", "x1", "y1"]].assign(label=labels).reset_index(drop=True)


def event_table(record: dict[str, Any]) -> pd.DataFrame:
    """The assistant turns of a trajectory in order: answers, tool calls and their observations.

    Returns:
        Columns :data:`EVENT_COLUMNS`: turn, kind ("tool_call", "answer", "void"), tool, ok,
        arguments (JSON text), error, start, end (sampled positions), obs_start, obs_end (the
        observation turn, -1 without one), images (1-based numbers of the images the call
        returned, as text), text (decoded turn).
    """
    rows = []
    for ev in record.get("events") or []:
        args = ev.get("arguments")
        returned = ", ".join(str(int(i) + 1) for i in ev.get("images") or [])
        rows.append(
            (int(ev.get("turn", -1)), ev.get("kind", "?"), ev.get("tool") or "",
             bool(ev.get("ok")), "" if args is None else json.dumps(args), ev.get("error") or "",
             int(ev.get("start", -1)), int(ev.get("end", -1)),
             -1 if ev.get("obs_start") is None else int(ev["obs_start"]),
             -1 if ev.get("obs_end") is None else int(ev["obs_end"]), returned, ev.get("text", ""))
        )  # fmt: skip
    return pd.DataFrame(rows, columns=EVENT_COLUMNS)


def read_image(arm_dir: str | Path, ref: str) -> np.ndarray:
    """Pixels of a saved trajectory image.

    Args:
        arm_dir: the arm folder. ref: path relative to it (the record's ``images[k].ref``).

    Returns:
        ``[height, width, 3]`` uint8 RGB array.

    Raises:
        ValueError: ``ref`` leaves the arm folder. FileNotFoundError: no such file.
        OSError: not an image PIL can read (the message names the file).
    """
    from PIL import Image

    arm_dir = Path(arm_dir).resolve()
    path = (arm_dir / ref).resolve()
    if arm_dir not in path.parents:
        raise ValueError(f"image ref {ref!r} points outside the arm folder {arm_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise OSError(f"{path}: not a readable image ({e})") from e


def span_text(tokens: pd.DataFrame, start: int, end: int) -> str:
    """Text of the rows of a token table with ``start <= pos < end`` joined in order (with
    :func:`collapse_images`, an image shows as its "[image k: n tokens]" row)."""
    rows = tokens[(tokens["pos"] >= start) & (tokens["pos"] < end)]
    return "".join(rows.sort_values("pos")["text"])
