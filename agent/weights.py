"""Weights that load exactly as written: every tensor present, and the files' sha256 recorded.

``from_pretrained`` quietly re-initialises a tensor that a checkpoint lacks (renamed, dropped)
and ignores one it does not expect, and it cannot see flipped bytes inside a tensor's data.
:func:`load_weights` turns the first two into errors using transformers' loading report
(``output_loading_info=True``), and every model folder relook writes records the sha256 of its
weight files (:func:`write_weight_hashes`, in :data:`WEIGHT_HASHES`) which loading checks
(:func:`verify_weight_hashes`). Folders written by others (hub checkpoints) carry no record and
are loaded unverified, with the missing/unexpected check still applied.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_HASHES = "relook_weights.json"
"""Name of the record ``{"files": {name: {"sha256": hex, "bytes": n}}}`` next to the weights."""


def _is_weight_file(path: Path) -> bool:
    # model.safetensors, shards, their index, and legacy pytorch_model*.bin
    name = path.name
    return path.is_file() and (
        name.endswith((".safetensors", ".safetensors.index.json"))
        or (name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json")))
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (0.8 GB/s on one core here)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_weight_hashes(folder: str | Path) -> Path:
    """Record the sha256 and size of every weight file of a ``save_pretrained`` folder.

    Call it after every ``save_pretrained`` of a model into ``folder`` (a stale record makes the
    next load fail). Hashing reads every weight file once: sha256 ran at 0.8 GB/s on one core
    of the CPU machine, about 20 s for a 15 GB (7B) checkpoint, more from a slow disk.

    Args:
        folder: a folder holding ``model.safetensors`` (or shards and their index).

    Returns:
        The record, ``folder / WEIGHT_HASHES``.

    Raises:
        ValueError: ``folder`` holds no weight file.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if _is_weight_file(p))
    if not files:
        raise ValueError(f"no weight files in {folder} to record the sha256 of")
    record = {
        "files": {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files}
    }
    out = folder / WEIGHT_HASHES
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out


def verify_weight_hashes(folder: str | Path, hashes: bool = True) -> bool:
    """Check the weight files of ``folder`` against its :data:`WEIGHT_HASHES` record.

    Args:
        folder: a model folder.
        hashes: compare sha256 too (reads every weight file: about 20 s per 15 GB, the cost of a
            7B checkpoint); False checks only the file list and sizes.

    Returns:
        True if the record was there and everything matched; False if there is no record
        (a folder not written by relook: nothing to check).

    Raises:
        ValueError: a recorded file is missing, cut off or has another sha256, an unrecorded
            weight file is present, or the record is unreadable; the message names the file
            (and both hashes).
    """
    folder = Path(folder)
    path = folder / WEIGHT_HASHES
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
        recorded = {name: (meta["sha256"], int(meta["bytes"])) for name, meta in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"unreadable weight record {path}: {exc}") from exc
    extra = sorted(
        p.name for p in folder.iterdir() if _is_weight_file(p) and p.name not in recorded
    )
    if extra:
        raise ValueError(
            f"weight files {extra} in {folder} are not in {path} (written after it? rerun "
            "agent.weights.write_weight_hashes on the folder if they are meant to be there)"
        )
    for name, (sha, size) in recorded.items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"weight file {file} is missing (recorded in {path})")
        if file.stat().st_size != size:
            raise ValueError(
                f"weight file {file} is {file.stat().st_size} bytes, {path} records {size} (cut off?)"
            )
        if hashes and (actual := file_sha256(file)) != sha:
            raise ValueError(
                f"weight file {file} is damaged: sha256 {actual}, but {path} records {sha}"
            )
    return True


def load_weights(cls, folder: str | Path, verify: bool = True, **kwargs):
    """``cls.from_pretrained(folder, **kwargs)`` that fails instead of filling in tensors.

    Tensors the model expects but the checkpoint lacks, tensors the checkpoint holds but the
    model does not expect, and shape mismatches are errors. Tied weights (``lm_head`` under
    ``tie_word_embeddings``) and the family's declared ignorable keys are not reported missing
    by transformers, so they pass.

    Args:
        cls: a transformers model class (``AutoModelForImageTextToText`` or a concrete one).
        folder: a ``save_pretrained`` folder or hub id.
        verify: check the weight files against :data:`WEIGHT_HASHES` when the folder has one
            (:func:`verify_weight_hashes`; sizes are always checked, sha256 only when True).
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``attn_implementation``, ...).

    Returns:
        The loaded model.

    Raises:
        ValueError: the weights do not match their record, or tensors are missing, unexpected
            or mismatched; the message names the folder and the tensors.
    """
    if Path(folder).is_dir():
        verify_weight_hashes(folder, hashes=verify)
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    problems = [
        f"{what} tensors {sorted(map(str, keys))}"
        for what, keys in (
            ("missing", info.get("missing_keys")),
            ("unexpected", info.get("unexpected_keys")),
            ("shape-mismatched", info.get("mismatched_keys")),
        )
        if keys
    ]
    problems += [f"error: {msg}" for msg in info.get("error_msgs") or []]
    if problems:
        raise ValueError(
            f"weights in {folder} do not match the {type(model).__name__} they were loaded into "
            f"(a renamed, dropped or foreign tensor): {'; '.join(problems)}"
        )
    return model


__all__ = ["WEIGHT_HASHES", "load_weights", "verify_weight_hashes", "write_weight_hashes"]
