"""The relook-tiny model card: the rebuild command, the saved configuration, and the ``README.md``
card rendered from the held-out probes (:mod:`train.probes`) of a pretrained model.

Used at the end of ``python -m train.pretrain`` and by ``python -m experiments.probe --card``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path

import numpy as np

from agent.data.pretrain import Mix
from agent.modeling import Policy, TinySpec
from train.pretrain import PretrainConfig, jsonable


def rebuild_command(cfg: PretrainConfig) -> str:
    """The ``python -m train.pretrain`` command line that spells out every field of ``cfg``
    (nested ``mix``, ``stage1_mix`` and ``spec`` included), so that defaults changing later
    cannot change what it rebuilds. ``resume`` is left out."""

    def flags(obj, prefix: str = "") -> list[str]:
        out = []
        for f in fields(obj):
            v, name = getattr(obj, f.name), prefix + f.name.replace("_", "-")
            if f.name == "resume":
                continue
            if is_dataclass(v):
                out += flags(v, f"{name}.")
            elif isinstance(v, bool):
                out.append(f"--{name}" if v else f"--no-{name}")
            elif isinstance(v, (tuple, list)):
                out.append(f"--{name} " + " ".join(str(x) for x in v))
            else:
                out.append(f"--{name} {v}")
        return out

    return "python -m train.pretrain " + " ".join(flags(cfg))


def _table(rows: dict[str, dict], cols: list[str]) -> list[str]:
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        cells = [
            f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_model_card(
    cfg: dict,
    probe: dict,
    wall_s: float | None,
    n_params: int,
    weights_sha256: str | None = None,
    transformers_version: str | None = None,
) -> str:
    """The ``README.md`` model card of a pretrained relook-tiny.

    Args:
        cfg: the :class:`PretrainConfig` as saved in ``relook_pretrain.json``.
        probe: the held-out probe results (:func:`train.probes.all_probes`, plus the
            ``attention`` section of ``experiments.probe`` when present).
        wall_s: pretraining wall time in seconds (None: unknown).
        n_params: parameter count.
        weights_sha256: hex sha256 of ``model.safetensors``, printed under the rebuild command
            so that a rebuild can be checked bit for bit (None: left out).
        transformers_version: the transformers release that saved the weights (``config.json``'s
            ``transformers_version``). Bit-for-bit rebuilds are verified per release, and
            ``scripts/setup_cpu.sh`` pins a verified one (None: left out).
    """
    wall = "unknown" if wall_s is None else f"{wall_s / 60:.1f} min"
    saved_by = (
        f", the `scripts/setup_cpu.sh` environment; these weights were saved by transformers "
        f"{transformers_version}"
        if transformers_version
        else ""
    )
    lines = [
        "# relook-tiny",
        "",
        f"A {n_params / 1e6:.2f} M-parameter Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, "
        f"{cfg['spec']['text_layers']} text layers of width {cfg['spec']['hidden']}, "
        f"{cfg['spec']['vision_depth']} vision blocks of width {cfg['spec']['vision_hidden']}, "
        "1,024-token byte-level BPE) pretrained from random weights on CPU by relook's "
        "`python -m train.pretrain`. The image processor shows 224 px scenes at 112 px "
        "(16 image tokens per image). It is relook's default base model: "
        "`experiments.ablate` and `experiments.evaluate` load it as `relook-tiny`.",
        "",
        "## Data and curriculum",
        "",
        "Teacher-forced agent transcripts from `agent/data/pretrain.py`, rendered by relook's own "
        "agent loop (same token ids, image tokens and tool observations as at RL time):",
        "colour, shape, presence and MNIST-digit questions about one image; image-index grounding "
        '("What does image 2 show?"); generic `confirm` (zoom in and describe) and `reflect` '
        "(look again and restate) uses; evaluation-family questions answered with "
        + (
            "the gold answer (a pretrained VLM answers such questions as well as its perception "
            "allows)"
            if cfg.get("family_answers", "gold") == "gold"
            else "**randomly drawn** answers (protocol only)"
        )
        + ", sometimes after a **random** valid tool call, so the base knows the answer space and "
        "the protocol but was never shown when or where a tool helps."
        + (
            f" With tools advertised, {cfg['perception_tool_frac']:.0%} of the single-image "
            "perception questions call a tool first (half of them `confirm` on the object, the "
            "rest a random call) and then answer the question as asked."
            if cfg.get("perception_tool_frac")
            else ""
        ),
        "",
        *(
            [
                f"- Stage 0 ({cfg['vision_steps']} steps of {cfg.get('vision_batch', 32)} images, "
                f"lr {cfg.get('vision_lr', 3e-4)}): the vision tower alone, trained on labelled "
                "single-object images (colour and shape of a shape, or an MNIST digit; "
                f"{cfg.get('vision_digit_frac', 0.5):.0%} digits) through a temporary linear head "
                + (
                    "on all its image tokens concatenated"
                    if cfg.get("vision_pool", "mean") == "flat"
                    else "on its mean image token"
                )
                + ", discarded afterwards; objects, backgrounds and difficulty follow the same "
                "curriculum.",
            ]
            if cfg.get("vision_steps")
            else []
        ),
        f"- Stage 1 ({cfg['stage1_steps']} steps): kinds `{cfg['stage1_mix']}`, flat grey "
        f"backgrounds, objects of {cfg['size_start'][0]}-{cfg['size_start'][1]} px in 224 px scenes.",
        f"- Ramp (over {cfg['ramp_frac']:.0%} of the remaining steps): difficulty 0 -> 1 "
        "(opacity, outline, ink contrast), flat backgrounds -> real photographs from packages, "
        f"objects -> {cfg['size_end'][0]}-{cfg['size_end'][1]} px; kinds `{cfg['mix']}`.",
        f"- {cfg['steps']} steps of {cfg['batch']} transcripts, AdamW lr {cfg['lr']} "
        f"(warm-up {cfg['warmup_steps']}, cosine to 10%), seed {cfg['seed']}; wall time {wall} "
        "on one core of the 2-core CPU machine. Per-step loss and probes: `log.jsonl`; "
        "configuration: `relook_pretrain.json`.",
        "",
        f"Rebuild bit-for-bit (same machine kind, `OMP_NUM_THREADS=1`{saved_by}):",
        "",
        "```",
        cfg.get("rebuild_command", "(see relook_pretrain.json)"),
        "python -m experiments.probe --model <out> --out <out>/probe.json --card",
        "```",
        "",
        *(
            [
                f"A bit-for-bit rebuild has `sha256sum <out>/model.safetensors` = "
                f"`{weights_sha256}`.",
                "",
            ]
            if weights_sha256
            else []
        ),
        "## Held-out probes",
        "",
        "Test split: backgrounds and MNIST digits never seen in training; greedy decoding.",
        "Single-image perception (accuracy; chance: colour 0.17, shape 0.25, present 0.5, digit 0.1):",
        "",
    ]
    scales = {
        "easiest: 80-112 px, difficulty 0": probe["perception_easiest"],
        "medium: 40-56 px, difficulty 0": probe["perception_medium"],
        "hardest: 20-30 px, difficulty 1": probe["perception_hardest"],
    }
    lines += _table(scales, ["colour", "shape", "present", "digit"])
    fam = probe["families_without_tools"]
    lines += [
        "",
        f"Evaluation families without tools ({fam['n']} questions, 2-4 images, difficulty 0.5): "
        f"accuracy {fam['accuracy']:.2f}, answer rate {fam['answer_rate']:.2f}.",
        "",
    ]
    lines += _table({"accuracy": fam["per_family"]}, sorted(fam["per_family"]))
    lines += ["", "Per target size (the target object's side in the 224 px scene):", ""]
    lines += _table({"accuracy": fam["per_size"]}, list(fam["per_size"]))
    first = probe["first_turn_with_tools"]
    lines += [
        "",
        f"Sampled (T=1) first turns with tools advertised ({first['n']} questions): "
        f"{first['tool_call']:.2f} contain a valid tool call; of the others, "
        f"{first['answer']:.2f} give a valid answer.",
    ]
    if "zoom_headroom" in probe:
        zoom = probe["zoom_headroom"]
        lines += [
            "",
            "Zoom headroom (objects of 20-30 px, difficulty 0, greedy): accuracy with no tools and "
            "after a scripted `confirm` on a box around the object (the most a zoom can give; RL "
            "still has to find where to zoom):",
            "",
            *_table(zoom, ["plain", "zoomed"]),
        ]
    if "family_zoom_headroom" in probe:
        fz = probe["family_zoom_headroom"]
        cols = [c for c in fz["plain"] if c != "n"]
        lines += [
            "",
            f"Evaluation families with tools advertised ({fz['plain']['n']} questions with a "
            "target box, greedy): the model's own episodes, and after a scripted `confirm` on "
            "the object the answer hinges on (oracle):",
            "",
            *_table(fz, cols),
        ]
    if "attention" in probe:
        lines += [
            "",
            "## Attention of the base model",
            "",
            "Image share = attention mass of a generated token on all image tokens (mean over "
            "layers and heads, then over episodes), sampled episodes (T=1) with tools advertised, "
            "by generated-token index:",
            "",
        ]
        att = probe["attention"]
        bins = [r["tokens"] for r in att["multi"]["curve"]]
        for r in att["single"]["curve"]:
            bins += [] if r["tokens"] in bins else [r["tokens"]]
        rows = {
            f"{k} ({v['n']} episodes)": {r["tokens"]: r["image_share"] for r in v["curve"]}
            for k, v in att.items()
        }
        lines += _table(rows, bins)
        lines += ["", "Before/after tool calls (8 tokens each side of the tool result):", ""]
        lines += _table(
            {k: v["before_after"] for k, v in att.items()}, ["n_events", "before", "after"]
        )
    return "\n".join(lines) + "\n"


def load_config(path: str | Path) -> PretrainConfig:
    """The :class:`PretrainConfig` saved in a model's ``relook_pretrain.json``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a pretraining config (names the file and the field).
    """
    raw = json.loads(Path(path).read_text())
    known = {f.name for f in fields(PretrainConfig)}
    try:
        kw = {k: v for k, v in raw.items() if k in known}
        for k in ("mix", "stage1_mix"):
            kw[k] = Mix(**kw[k]) if k in kw else getattr(PretrainConfig, k, Mix())
        if "spec" in kw:
            kw["spec"] = TinySpec(**kw["spec"])
        for k in ("target_size", "size_start", "size_end"):
            if k in kw:
                kw[k] = tuple(kw[k])
        kw["out"] = Path(kw.get("out", "."))
        return PretrainConfig(**kw)
    except TypeError as exc:
        raise ValueError(f"{path} is not a relook pretraining config: {exc}") from exc


def _wall_time(log: Path) -> float:
    """Seconds of training in ``log.jsonl``: ``elapsed_s`` restarts at each resume, so the
    segments' last values are summed."""
    total, last = 0.0, 0.0
    for line in log.read_text().splitlines():
        elapsed = json.loads(line)["elapsed_s"]
        if elapsed < last:  # a resumed segment starts
            total += last
        last = elapsed
    return total + last


def write_card(model_dir: str | Path, probe: dict, out_name: str | None = None) -> Path:
    """(Re)write ``<model_dir>/README.md`` from its ``relook_pretrain.json``, ``log.jsonl`` (wall
    time) and ``probe``; returns the card's path. ``out_name`` is the ``--out`` shown in the
    rebuild command (default: ``model_dir``). The card states the sha256 of
    ``model.safetensors`` that a bit-for-bit rebuild must reproduce, and the transformers release
    that saved it (``config.json``).

    Raises:
        FileNotFoundError: ``model_dir`` has no ``relook_pretrain.json``.
    """
    from safetensors import safe_open

    model_dir = Path(model_dir)
    cfg = replace(load_config(model_dir / "relook_pretrain.json"), out=Path(out_name or model_dir))
    saved = {**jsonable(asdict(cfg)), "rebuild_command": rebuild_command(cfg)}
    log = model_dir / "log.jsonl"
    wall = _wall_time(log) if log.is_file() else None
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    card = model_dir / "README.md"
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    config = json.loads((model_dir / "config.json").read_text())
    card.write_text(
        render_model_card(saved, probe, wall, n_params, digest, config.get("transformers_version"))
    )
    return card


def write_model_card(policy: Policy, cfg: PretrainConfig, out: Path) -> dict:
    """Probe the model (held-out split), write ``probe.json`` and the ``README.md`` card
    (:func:`write_card`); returns the probe result."""
    from train import probes

    result = probes.all_probes(policy, n=cfg.probe_n)
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    write_card(out, result)
    return result
