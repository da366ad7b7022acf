"""Crash-safe checkpoints of the GRPO trainer: policy, optimizer, scheduler, RNG states, data
cursor and metrics, written atomically and verified on load.

Layout of a checkpoint directory (one per saved step, ``step-000012``; the newest ``keep`` are
kept)::

    step-000012/model.safetensors, config.json, ...   the policy (``save_pretrained``)
    step-000012/trainer_state.pt   engine (optimizer, scheduler), shuffle RNG, step, metric rows
    step-000012/rank-00000.pt      per rank: torch RNG, and ZeRO's optimizer partition
    step-000012/manifest.json      written last: sha256 and size of every other file

A checkpoint is written into a temporary folder, flushed to disk, then renamed into place (an
atomic rename on POSIX), so a killed writer leaves at most a ``.tmp-*`` folder, never a
half-written ``step-*``. A checkpoint whose files no longer match its manifest (cut off or
corrupted after the fact) is rejected on load, and the previous one is used
(:func:`latest_checkpoint`). Same idea as DeepSpeed's ``latest`` tag and TRL/transformers'
``checkpoint-N`` folders, with verification added.

Under data parallelism every rank calls :func:`save_checkpoint`: each writes its own
``rank-*.pt`` into the shared temporary folder, and rank 0 alone writes the rest, the manifest
(covering every rank's file) and renames the folder. Several nodes therefore need a shared
filesystem for ``root``, as DeepSpeed's own checkpoints do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from agent.weights import file_sha256, load_weights
from train import dist

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rank_file(rank: int) -> str:
    """Name of rank ``rank``'s own file in a checkpoint."""
    return f"rank-{rank:05d}.pt"


def save_checkpoint(
    root: str | Path,
    step: int,
    model,
    state: dict[str, Any],
    keep: int = 2,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``root/step-{step:06d}`` atomically and prune older ones.

    Under data parallelism this is a collective: every rank calls it (with its own
    ``rank_state``); only rank 0 writes ``model``, ``state`` and the manifest.

    Args:
        root: the checkpoints folder (created).
        step: steps completed (the data cursor: training resumes at this step index).
        model: a transformers model (``save_pretrained``; safetensors); read on rank 0 only.
        state: trainer state to ``torch.save`` (optimizer/scheduler state dicts, metric rows,
            ...); ``step`` is added. Read on rank 0 only.
        keep: newest checkpoints to keep (>= 1).
        rank_state: this rank's own state (RNG, a ZeRO optimizer partition), saved as
            :func:`rank_file` of its rank; None: none.

    Returns:
        The checkpoint folder.

    Raises:
        ValueError: ``keep < 1`` or ``step < 0``.
    """
    if keep < 1 or step < 0:
        raise ValueError(f"save_checkpoint needs keep >= 1 and step >= 0, got {keep}, {step}")
    root = Path(root)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}-{dist.broadcast_object(os.getpid())}"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    if rank_state is not None:
        own = tmp / rank_file(dist.rank())
        torch.save(rank_state, own)
        with own.open("rb") as f:
            os.fsync(f.fileno())
    dist.barrier()
    if dist.is_main():
        _finish(root, tmp, final, step, model, state, keep)
    dist.barrier()
    return final


def _finish(root: Path, tmp: Path, final: Path, step: int, model, state: dict, keep: int) -> None:
    """Rank 0's part of :func:`save_checkpoint`: model, state, manifest, rename, prune."""
    model.save_pretrained(tmp)
    torch.save({**state, "step": step}, tmp / STATE)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "step": step,
        "files": {
            str(p.relative_to(tmp)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in files
        },
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in [*files, tmp / MANIFEST]:
        with p.open("rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # a rerun of the same step replaces it
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def verify_checkpoint(folder: str | Path) -> str | None:
    """None if ``folder`` is a complete checkpoint whose files match its manifest, else the
    reason (names the file)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path}: missing (the write never finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"{manifest_path}: unreadable ({exc})"
    if STATE not in files:
        return f"{manifest_path}: lists no {STATE}"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{path}: {path.stat().st_size} bytes, manifest says {meta['bytes']} (cut off)"
        if file_sha256(path) != meta["sha256"]:
            return f"{path}: sha256 differs from the manifest (corrupted)"
    return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies, or None. A newer checkpoint that
    fails verification is skipped with a warning naming it and the reason."""
    for folder in reversed(checkpoints(root)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        warnings.warn(f"skipping checkpoint {folder}: {problem}", stacklevel=2)
    return None


def load_checkpoint(folder: str | Path, model, verify: bool = True) -> dict[str, Any]:
    """Load a verified checkpoint's weights into ``model`` (in place); returns its trainer state.

    Args:
        folder: the checkpoint folder.
        model: the model to load into.
        verify: check the files against the manifest first (False when the caller has just
            chosen ``folder`` with :func:`latest_checkpoint`, which verified it: hashing a
            multi-GB checkpoint twice is pure cost).

    Raises:
        ValueError: the checkpoint does not verify (the message names the file), or its
            weights miss or add tensors (:func:`agent.weights.load_weights`).
        RuntimeError: its weights do not fit ``model`` (``load_state_dict``, strict).
    """
    folder = Path(folder)
    problem = verify_checkpoint(folder) if verify else None
    if problem is not None:
        raise ValueError(f"cannot resume from {folder}: {problem}")
    # from_pretrained applies the family's checkpoint key mapping that save_pretrained reversed
    saved = load_weights(type(model), folder, verify=False, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())
    return torch.load(folder / STATE, weights_only=False)


def load_rank_state(folder: str | Path, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s own state saved in checkpoint ``folder`` (see ``rank_state`` of
    :func:`save_checkpoint`).

    Raises:
        ValueError: the checkpoint has no file for that rank (written by fewer processes).
    """
    path = Path(folder) / rank_file(rank)
    if not path.is_file():
        raise ValueError(f"{path}: missing (the checkpoint was written by fewer processes)")
    return torch.load(path, weights_only=False)


__all__ = [
    "checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_rank_state",
    "rank_file",
    "save_checkpoint",
    "verify_checkpoint",
]
