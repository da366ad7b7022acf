"""``python -m experiments.attention``: attention of finished trajectories, by replay (docs/method.md §6).

Reads trajectories saved by any relook run (``trajectories.jsonl`` + the PNG images beside it,
from any rollout engine), replays each through the model in one teacher-forced forward, and
writes per arm:

- ``attention.parquet``: the long table (trajectory, token, pos, turn, layer, head, region,
  image, origin, mass, keys[, value_mass]), every region of every row, rows summing to 1;
- ``attention_events.parquet``: one row per tool call (first generated token after its result);
- ``meta.json``: versions, attention backend, model, span map per trajectory (region sizes,
  prompt length, generated tokens), tool events, crop provenance (per image: origin, the tool
  call that returned it, its source image and crop box, grid, file), skipped trajectories.

``meta.json`` is written last: an arm folder without it is incomplete.

Examples:
    python -m experiments.attention --trajectories runs/latest --out runs/latest-attention
    python -m experiments.attention --model /ckpt/Qwen2.5-VL-7B --trajectories runs/x/full-s0 \\
        --out /tmp/att --layers 0 13 27 --max-trajectories 16
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from agent.modeling import Policy, load_policy
from agent.tools import registered_tools
from agent.trajectory import ImageRecord, Trajectory, TurnEvent
from analysis import rundir
from analysis.replay import replay_attention
from analysis.spans import RegionMap, SpecialIds, check_image_grid, region_labels

AUTO_MODEL = "auto"


@dataclass
class AttentionArgs:
    """Measure attention of finished trajectories.

    Attributes:
        trajectories: a run directory (every arm with a ``trajectories.jsonl``), one arm folder,
            or one ``trajectories.jsonl`` file.
        out: output folder; one sub-folder per arm (``attention.parquet``,
            ``attention_events.parquet``, ``meta.json``).
        model: model directory or hub id (``relook-tiny``: the committed default base), or
            ``auto`` (default): each arm's own trained policy (``<arm>/model``) when it has one,
            else relook-tiny, so that trajectories are replayed through the policy that produced
            them. Name a model to replay every arm through it instead (to compare).
        arms: arms of a run directory to measure (default: all that have trajectories).
        max_trajectories: at most this many trajectories per arm (0: all with saved images).
        layers: decoder layers to record (default all).
        chunk: query rows per chunk of the streaming fp32 reduction (peak extra memory
            ``heads x chunk x positions`` float32); default: 2 MiB of scores per chunk.
        value_weighted: also record value-norm-weighted mass (Kobayashi et al. 2020).
        attn_implementation: attention backend the model is loaded with (``sdpa``, ``eager``);
            the reduction recomputes each row in fp32 whatever the backend.
        window: tokens each side of a tool call in the printed before/after summary.
        progress: show a progress bar.
    """

    trajectories: Path
    out: Path
    model: str = "auto"
    arms: tuple[str, ...] = ()
    max_trajectories: int = 0
    layers: tuple[int, ...] | None = None
    chunk: int | None = None
    value_weighted: bool = True
    attn_implementation: str = "sdpa"
    window: int = 8
    progress: bool = True


def token_turns(traj: Trajectory) -> list[int]:
    """Turn index of each policy token, in order (``[resp]``)."""
    turns = []
    for e in traj.events:
        turns += [e.turn] * sum(traj.response_mask[e.start : e.end])
    return turns


def tool_events(traj: Trajectory, traj_id: str) -> list[dict]:
    """One row per tool call: the generated-token index of the first policy token after its result."""
    mask = np.asarray(traj.response_mask)
    rows = []
    for e in traj.events:
        if e.kind == "tool_call" and e.obs_end is not None:
            rows.append(
                {
                    "trajectory": traj_id,
                    "token": int(mask[: e.obs_end].sum()),
                    "tool": e.tool or "?",
                    "ok": bool(e.ok),
                    "turn": e.turn,
                }
            )
    return rows


def measure(
    policy: Policy,
    trajs: list[Trajectory],
    ids: list[str],
    chunk: int | None = None,
    layers: tuple[int, ...] | None = None,
    value_weighted: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replay each trajectory through ``policy.model`` and reduce attention to regions.

    Args:
        policy: the :class:`agent.modeling.Policy` that produced (or is to be probed on) them.
        trajs: finished trajectories.
        ids: one trajectory id per trajectory (the ``trajectory`` column).
        chunk: query rows per chunk of the streaming reduction.
        layers: decoder layers to record (default all).
        value_weighted: add the ``value_mass`` column.

    Returns:
        ``(attention, events)``: the long attention table (columns of
        :data:`analysis.rundir.ATTENTION_COLUMNS` plus ``keys`` and optionally ``value_mass``)
        and the tool-call event table.

    Raises:
        ValueError: a trajectory whose image-token counts disagree with its image grids (the
            message names the trajectory and the image).
    """
    special = SpecialIds.from_tokenizer(policy.tokenizer)
    merge = int(policy.image_processor.merge_size)
    frames, events = [], []
    for traj, tid in zip(trajs, ids):
        inputs = traj.model_inputs(special.image_pad)
        if "image_grid_thw" in inputs:
            try:
                check_image_grid(traj.token_ids, inputs["image_grid_thw"], merge, special)
            except ValueError as exc:
                raise ValueError(f"trajectory {tid}: {exc}") from None
        region_map = trajectory_regions(traj, special)
        record = replay_attention(
            policy.model,
            inputs,
            region_map,
            chunk=chunk,
            layers=layers,
            value_weighted=value_weighted,
        )
        frames.append(record.to_frame(tid, turns=token_turns(traj)))
        events += tool_events(traj, tid)
    att = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    ev = pd.DataFrame(events, columns=list(rundir.EVENT_COLUMNS))
    return att, ev


def trajectory_from_record(
    record: dict, base: Path, image_processor, where: str = ""
) -> Trajectory:
    """Rebuild a replayable :class:`Trajectory` from a ``trajectories.jsonl`` record and its
    saved images (PNG, the exact pixels the image processor was given).

    Args:
        record: one line of ``trajectories.jsonl`` (:meth:`Trajectory.to_record`).
        base: folder the image ``ref`` paths are relative to (the arm folder).
        image_processor: the model's image processor (recomputes ``pixel_values``).
        where: file name for error messages.

    Raises:
        ValueError: a missing field, an image without a saved file, or an image whose
            processed grid differs from the recorded ``grid_thw`` (all name the trajectory).
        FileNotFoundError: a referenced image file does not exist.
    """
    tid = record.get("id", "?")
    try:
        images = []
        for k, im in enumerate(record["images"], 1):
            if not im.get("ref"):
                raise ValueError(f"image {k} has no saved file (ref is null)")
            path = base / im["ref"]
            if not path.is_file():
                raise FileNotFoundError(f"{where}: trajectory {tid}: image file {path} not found")
            pil = Image.open(path).convert("RGB")
            out = image_processor(images=[pil], return_tensors="pt")
            grid = tuple(int(x) for x in out["image_grid_thw"][0].tolist())
            if list(grid) != list(im["grid_thw"]):
                raise ValueError(
                    f"image {k} ({im['ref']}) processes to grid {grid} but the record says "
                    f"{tuple(im['grid_thw'])} (a different image processor?)"
                )
            images.append(
                ImageRecord(
                    image=pil,
                    origin=im["origin"],
                    source=im["source"],
                    call=im.get("call"),
                    bbox=tuple(im["bbox"]) if im.get("bbox") else None,
                    grid_thw=grid,
                    pixel_values=out["pixel_values"],
                )
            )
        return Trajectory(
            sample_id=record["sample_id"],
            family=record.get("family", ""),
            gold=record.get("gold", ""),
            answer_type=record.get("answer_type", ""),
            token_ids=list(record["token_ids"]),
            prompt_len=int(record["prompt_len"]),
            response_mask=list(record["response_mask"]),
            rollout_log_probs=list(record.get("rollout_log_probs", [])),
            images=images,
            events=[TurnEvent(**e) for e in record.get("events", [])],
            answer=record.get("answer"),
            group=int(record.get("group", 0)),
        )
    except KeyError as exc:
        raise ValueError(f"{where}: trajectory {tid}: missing field {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: trajectory {tid}: {exc}") from None


def provenance(traj: Trajectory, refs: list[str | None]) -> list[dict]:
    """Crop provenance of every image: its number, origin, the 0-based tool call that returned
    it, the input image it shows, its crop box (original pixels of that image, ``confirm``),
    its patch grid and its file."""
    return [
        {
            "image": k,
            "origin": r.origin,
            "call": r.call,
            "source": r.source,
            "bbox": list(r.bbox) if r.bbox else None,
            "grid_thw": list(r.grid_thw),
            "ref": ref,
        }
        for k, (r, ref) in enumerate(zip(traj.images, refs), 1)
    ]


def trajectory_regions(traj: Trajectory, special: SpecialIds) -> RegionMap:
    """The :class:`analysis.spans.RegionMap` of a trajectory (image origins from its images).

    Raises:
        ValueError: as :func:`analysis.spans.region_labels` (inconsistent masks or origins).
    """
    origins = [r.origin for r in traj.images]
    return region_labels(
        traj.token_ids, traj.response_mask, special, traj.prompt_len, origins, registered_tools()
    )


def span_summary(traj: Trajectory, special: SpecialIds) -> dict:
    """The span map of a trajectory: its regions as ``[name, start, end)`` runs of positions,
    the tokens per region, and its length, prompt length and generated tokens."""
    rmap = trajectory_regions(traj, special)
    spans: list[list] = []
    for p, label in enumerate(rmap.labels):
        if spans and spans[-1][0] == label:
            spans[-1][2] = p + 1
        else:
            spans.append([label, p, p + 1])
    sizes = pd.Series(rmap.labels).value_counts().to_dict()
    return {
        "positions": len(traj.token_ids),
        "prompt_len": traj.prompt_len,
        "generated": len(rmap.generated_positions),
        "region_tokens": {name: int(sizes.get(name, 0)) for name in rmap.region_names},
        "spans": spans,
    }


def versions() -> dict[str, str]:
    """Versions of the libraries the numbers depend on."""
    import nnsight
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nnsight": getattr(nnsight, "__version__", "?"),
        "relook": rundir.relook_version(),
    }


def write_arm(
    out: Path,
    policy: Policy,
    trajs: list[Trajectory],
    ids: list[str],
    refs: list[list[str | None]] | None = None,
    *,
    chunk: int | None = None,
    layers: tuple[int, ...] | None = None,
    value_weighted: bool = False,
    extra_meta: dict | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure ``trajs`` and write ``attention.parquet``, ``attention_events.parquet`` and, last,
    ``meta.json`` into ``out`` (atomic writes); used by this CLI and by ``experiments.ablate``.

    Returns:
        ``(attention, events)`` as written.
    """
    t0 = time.perf_counter()
    att, events = measure(policy, trajs, ids, chunk, layers, value_weighted)
    special = SpecialIds.from_tokenizer(policy.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta_path.unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    rundir.write_attention(out.parent, out.name, att)
    rundir.write_attention_events(out.parent, out.name, events)
    text = policy.model.config.get_text_config()
    refs = refs or [[None] * len(t.images) for t in trajs]
    meta = {
        "created": rundir.utc_now(),
        "versions": versions(),
        "model": policy.path,
        "model_type": policy.model.config.model_type,
        "attention_backend": text._attn_implementation,
        "reduction": "fp32 softmax rows recomputed inside the attention function, query chunks "
        f"of {chunk or 'auto (2 MiB of scores)'}; no full query x key matrix kept (analysis.replay)",
        "layers": list(layers) if layers is not None else list(range(text.num_hidden_layers)),
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "value_weighted": value_weighted,
        "n_trajectories": len(trajs),
        "seconds": round(time.perf_counter() - t0, 3),
        "trajectories": {
            tid: {
                **span_summary(t, special),
                "sample_id": t.sample_id,
                "answer": t.answer,
                "gold": t.gold,
                "tool_events": [asdict(e) for e in t.events if e.kind == "tool_call"],
                "images": provenance(t, r),
            }
            for t, tid, r in zip(trajs, ids, refs)
        },
        **(extra_meta or {}),
    }
    rundir.atomic_write_json(meta_path, meta)
    return att, events


def _sources(path: Path, arms: tuple[str, ...]) -> dict[str, Path]:
    """arm name -> its ``trajectories.jsonl``.

    Raises:
        FileNotFoundError: ``path`` does not exist, or holds no trajectories.
        ValueError: a requested arm has no trajectories.
    """
    if not path.exists():
        raise FileNotFoundError(f"--trajectories {path}: no such file or folder")
    if path.is_file():
        return {path.parent.name or "trajectories": path}
    if (path / rundir.TRAJECTORIES).is_file():
        return {path.name: path / rundir.TRAJECTORIES}
    found = {p.parent.name: p for p in sorted(path.glob(f"*/{rundir.TRAJECTORIES}")) if p.is_file()}
    if arms:
        missing = [a for a in arms if a not in found]
        if missing:
            raise ValueError(f"--arms {missing}: no {rundir.TRAJECTORIES} under {path}")
        found = {a: found[a] for a in arms}
    if not found:
        raise FileNotFoundError(
            f"--trajectories {path}: no {rundir.TRAJECTORIES} in it or its arm folders"
        )
    return found


def summarise(att: pd.DataFrame, events: pd.DataFrame, window: int = 8) -> dict:
    """Headline numbers of one arm: trajectories, generated tokens, mean image share, the decay
    fit of the image-share curve (:func:`analysis.decay.decay_fit`), and the image share
    before/after tool calls with a 95% bootstrap interval of the change across trajectories
    (:func:`analysis.events.before_after_ci`). Shares are fractions of attention."""
    from analysis import metrics
    from analysis.decay import decay_fit
    from analysis.events import before_after_ci

    if att.empty:
        return {"trajectories": 0}
    curve = metrics.image_share_curve(att)
    fit = decay_fit(curve)
    out = {
        "trajectories": int(att["trajectory"].nunique()),
        "tokens": int(att.groupby("trajectory")["token"].nunique().sum()),
        "image_share": float(curve["image_share"].mean()),
        "half_life_tokens": float(fit["half_life_tokens"]),
        "slope_per_100": float(fit["slope_per_100"]),
    }
    if len(events):
        ba = before_after_ci(att, events, window=window)
        overall = ba[ba["tool"] == "all"].iloc[0]
        out.update(
            tool_calls=int(overall["n_events"]),
            image_before=float(overall["before"]),
            image_after=float(overall["after"]),
            delta_lo=float(overall["delta_lo"]),
            delta_hi=float(overall["delta_hi"]),
        )
    return out


def main(args: AttentionArgs) -> dict[str, dict]:
    """Measure every selected arm; returns arm -> :func:`summarise` numbers.

    Raises:
        FileNotFoundError: missing trajectories, image files or model folder.
        ValueError: a malformed record, an image whose grid or token count disagrees with the
            trajectory, or a model family relook cannot load.
    """
    from tqdm.auto import tqdm

    sources = _sources(Path(args.trajectories), args.arms)
    policies: dict[str, Policy] = {}
    summary = {}
    for arm, path in sources.items():
        model = args.model
        if model == AUTO_MODEL:
            own = path.parent / "model"
            model = str(own) if (own / "config.json").is_file() else "relook-tiny"
        if model not in policies:
            policies[model] = load_policy(model, attn_implementation=args.attn_implementation)
        policy = policies[model]
        records = rundir.read_records(path)
        usable = [
            r
            for r in records
            if r.get("images") is not None and all(im.get("ref") for im in r["images"])
        ]
        if args.max_trajectories:
            usable = usable[: args.max_trajectories]
        trajs, ids, refs = [], [], []
        for r in tqdm(usable, desc=f"{arm}: load", disable=not args.progress):
            trajs.append(trajectory_from_record(r, path.parent, policy.image_processor, str(path)))
            ids.append(str(r.get("id", len(ids))))
            refs.append([im["ref"] for im in r["images"]])
        att, events = write_arm(
            Path(args.out) / arm,
            policy,
            trajs,
            ids,
            refs,
            chunk=args.chunk,
            layers=args.layers,
            value_weighted=args.value_weighted,
            extra_meta={"source": str(path), "skipped_without_images": len(records) - len(usable)},
        )
        summary[arm] = summarise(att, events, args.window)
        print(
            f"{arm}: "
            + ", ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in summary[arm].items()
            )
        )
    return summary


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from experiments.cli import run_cli

    run_cli(main, AttentionArgs)
