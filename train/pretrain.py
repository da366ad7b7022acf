"""``python -m train.pretrain``: pretrain relook-tiny, a small Qwen2.5-VL that sees, on CPU.

Supervised (teacher-forced) training from random weights on :mod:`agent.data.pretrain`
examples: perception (colour, shape, presence, digits), image-index grounding, the turn
format and generic tool use, never the evaluation families' solutions. A curriculum moves the
scenes from large, opaque, outlined targets (difficulty 0) to small blended ones (difficulty 1).
Transcripts are built by relook's own agent loop with a scripted teacher, so the token ids,
image tokens and tool observations are exactly those the agent sees at RL time.

Resumable (``--resume``: model, optimizer, scheduler, RNG and step restored from
``<out>/checkpoint``) and deterministic from ``seed`` on a given machine kind. At the end the
held-out probes (:mod:`train.probes`) are written with the model card (:mod:`train.model_card`).

Example:
    python -m train.pretrain --out checkpoints/relook-tiny --steps 3000
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro
from PIL import Image
from tqdm.auto import tqdm

from agent.data.pretrain import COLOURS, SHAPES, Mix, PretrainExample, pretrain_example
from agent.data.tasks import TaskConfig
from agent.modeling import Policy, TinySpec, build_tiny_model, is_vision_parameter, load_policy
from agent.rollout import Agent, AgentConfig, GenResult, rollout
from agent.tools import ImageFrame
from agent.weights import write_weight_hashes
from train.batching import batch_inputs, batch_weights, batched_token_log_probs, loss_weights

STAGE1_MIX = Mix(colour=1, shape=1, present=0.5, digit=0.5, label=0, locate=0, restate=0, format=0)
RELOOK_TINY_SPEC = TinySpec(
    text_layers=4, hidden=128, heads=4, kv_heads=2, intermediate=384,
    vision_depth=3, vision_hidden=128, vision_heads=4, patch_size=14, merge_size=2,
    vision_window=112,
)  # fmt: skip


VISION_POOLS = ("mean", "flat")


@dataclass
class PretrainConfig:
    """relook-tiny pretraining.

    Attributes:
        out: output directory (the final model; ``checkpoint/`` for resuming; ``log.jsonl``).
        steps: optimizer steps.
        batch: examples per step.
        lr: AdamW peak learning rate (linear warm-up, cosine decay to 10%).
        vision_lr_mult: learning-rate multiplier of the vision tower. Measured: with 5 (and 20)
            no perception emerged in 300-900 steps; with 1, colour on flat backgrounds reached
            62% by step ~700.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        seed: seed of weights, data stream and sampling.
        ramp_frac: share of the steps over which difficulty goes 0 -> 1.
        target_size: pixel range (in the 224 px scene) of distractors and of the objects of
            evaluation-style (``format``) and tool examples, as in the evaluation tasks.
        size_start: pixel range of the described object (shape or digit) of perception and
            label examples during stage 1; interpolated to ``size_end`` over the ramp.
        size_end: that range after the ramp. It spans large to small objects, so that the
            model keeps perceiving large ones (the easiest probe scale, 80-112 px) while
            learning small ones (the processor shows the model 224 px scenes at 112 px).
        plain_start: share of flat grey backgrounds of perception and label examples during
            stage 1, falling to 0 over the ramp.
        stage1_steps: perception warm-up before the ramp: ``stage1_mix`` kinds only, flat
            backgrounds, ``size_start`` objects (colour on plain backgrounds was learned in ~150
            steps this way; on photos from the start it took ~800).
        stage1_mix: example-kind weights of stage 1.
        mix: example-kind weights after stage 1.
        family_answers: ``gold`` or ``random`` answers of the evaluation-family (``format``)
            examples (:func:`agent.data.pretrain.pretrain_example`).
        tool_frac: share of ``format`` examples (tools advertised) that call a tool first.
        perception_tool_frac: share of single-image perception questions (tools advertised)
            that call a tool before answering (:func:`agent.data.pretrain.pretrain_example`).
        vision_steps: stage 0, before any text: steps of supervised vision-tower training on
            single-object images (colour and shape of a shape, or an MNIST digit) through a
            temporary linear head on the mean of each image's tokens, discarded afterwards (as
            a ViT is pretrained on labels before a VLM is built on it). Sizes, flat backgrounds
            and difficulty follow the same curriculum as the main stages over these steps.
            Measured on flat backgrounds: a 3-block tower learned shapes (0.94) and digits (0.34,
            rising) in 1,500 such steps of 32 images at lr 3e-4 with window 112; with window 56
            at lr 1e-3 it stayed at chance.
        vision_batch: images per stage-0 step.
        vision_lr: AdamW learning rate of stage 0 (constant after 50 warm-up steps).
        vision_digit_frac: share of each stage-0 batch that is MNIST digits (the rest are
            shapes); 0.5 alternates shape, digit, shape, ... as relook-tiny v3 did.
        vision_pool: how the stage-0 head reads an image's tokens: ``mean`` (one linear head on
            their mean) or ``flat`` (one linear head on all of them concatenated, position by
            position, as the language model reads them; needs every stage-0 image to give the
            same token count, true of the 224 px scenes). Measured (digits only, tower from
            scratch, lr 1e-3, flat backgrounds -> photographs over 2,000 steps, held-out photos):
            ``flat`` 0.28 at step 600 where ``mean`` had 0.18. A whole stage 0 of 6,000 steps
            with ``flat`` and lr 1e-3 still left digits on photos unread (linear probe of the
            tower 0.20; 0.18 after v3's 8,000 ``mean`` steps at 3e-4).
        save_every: steps between resumable checkpoints.
        eval_every: steps between probe evaluations (0: only at the end).
        resume: continue from ``<out>/checkpoint`` if present. Independently of it, stage 0
            is snapshotted to ``<out>/stage0`` and a fresh run over the same folder with the
            same :data:`STAGE0_FIELDS` starts from that snapshot (same weights, log rows and
            RNG state: the result is bit-identical to a run that redid it).
        probe_n: questions per held-out probe of the final model card.
        spec: model shape.
    """

    out: Path = Path("checkpoints/relook-tiny")
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    vision_lr_mult: float = 1.0
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    ramp_frac: float = 0.6
    target_size: tuple[int, int] = (20, 56)
    size_start: tuple[int, int] = (100, 180)
    size_end: tuple[int, int] = (20, 112)
    plain_start: float = 1.0
    stage1_steps: int = 500
    stage1_mix: Mix = STAGE1_MIX
    mix: Mix = field(default_factory=Mix)
    family_answers: str = "gold"
    tool_frac: float = 0.3
    perception_tool_frac: float = 0.0
    vision_steps: int = 0
    vision_batch: int = 32
    vision_lr: float = 3e-4
    vision_digit_frac: float = 0.5
    vision_pool: str = "mean"
    save_every: int = 250
    eval_every: int = 500
    resume: bool = False
    probe_n: int = 64
    spec: TinySpec = RELOOK_TINY_SPEC

    def __post_init__(self):
        from agent.data.pretrain import FAMILY_ANSWERS

        if self.family_answers not in FAMILY_ANSWERS:
            raise ValueError(
                f"PretrainConfig.family_answers must be one of {FAMILY_ANSWERS}, "
                f"got {self.family_answers!r}"
            )
        if not 0.0 <= self.vision_digit_frac <= 1.0:
            raise ValueError(
                f"PretrainConfig.vision_digit_frac must be in [0, 1], got {self.vision_digit_frac}"
            )
        if self.vision_pool not in VISION_POOLS:
            raise ValueError(
                f"PretrainConfig.vision_pool must be one of {VISION_POOLS}, got {self.vision_pool!r}"
            )


class TeacherGenerator:
    """Scripted generator: episode i emits ``scripts[i]`` turn by turn, each + ``<|im_end|>``."""

    def __init__(self, tokenizer, scripts: list[list[str]]):
        self.tokenizer, self.scripts = tokenizer, scripts
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.episode_of: dict[int, int] = {}

    def generate(self, requests, max_new_tokens, temperature):
        out = []
        for req in requests:
            i = self.episode_of.setdefault(id(req.token_ids), len(self.episode_of))
            ids = self.tokenizer.encode(self.scripts[i].pop(0), add_special_tokens=False) + [
                self.eos
            ]
            out.append(GenResult(ids, [0.0] * len(ids), True))
        return out


def transcripts(policy: Policy, examples: list[PretrainExample]):
    """Trajectories of ``examples`` as the agent would see them (teacher-forced scripts)."""
    trajs = []
    for ex in examples:
        cfg = AgentConfig(
            tools="both" if ex.tools else "none", max_turns=len(ex.script), max_new_tokens=64
        )
        agent = Agent(policy.tokenizer, policy.image_processor, cfg)
        trajs += rollout(
            agent, TeacherGenerator(policy.tokenizer, [list(ex.script)]), [ex.sample], group_size=1
        )
    return trajs


def sft_loss(policy: Policy, trajs) -> torch.Tensor:
    """Token-mean NLL (nats/token) over the tokens the policy would have sampled."""
    tok = policy.tokenizer
    inputs = batch_inputs(trajs, tok.convert_tokens_to_ids("<|image_pad|>"), tok.pad_token_id)
    w = batch_weights(
        trajs, [loss_weights(t, mask_tokens=True, mask_trajectories=False) for t in trajs]
    )
    lp = batched_token_log_probs(policy.model, inputs)
    return -(lp * w).sum() / w.sum().clamp(min=1.0)


def _difficulty(step: int, cfg: PretrainConfig) -> float:
    """Curriculum position in [0, 1]: 0 during stage 1, then linear over ``ramp_frac`` of the rest."""
    ramp = max(1.0, cfg.ramp_frac * (cfg.steps - cfg.stage1_steps))
    return float(min(1.0, max(0, step - cfg.stage1_steps) / ramp))


def _sizes(step: int, cfg: PretrainConfig) -> tuple[int, int]:
    """Curriculum of described-object sizes: ``size_start`` -> ``size_end`` over the ramp."""
    f = _difficulty(step, cfg)
    lo = round(cfg.size_start[0] + f * (cfg.size_end[0] - cfg.size_start[0]))
    hi = round(cfg.size_start[1] + f * (cfg.size_end[1] - cfg.size_start[1]))
    return lo, max(lo, hi)


def curriculum(step: int, cfg: PretrainConfig) -> tuple[TaskConfig, tuple[int, int], float, Mix]:
    """The data settings of optimizer step ``step`` (0-based).

    Returns:
        ``(tasks, sizes, plain, mix)``: scene settings (``difficulty`` in [0, 1]), the described
        objects' side range in pixels, the share of flat backgrounds, and the kind weights
        (``stage1_mix`` before ``stage1_steps``, then ``mix``).
    """
    tasks = TaskConfig(target_size=cfg.target_size, difficulty=_difficulty(step, cfg))
    plain = cfg.plain_start * (1.0 - tasks.difficulty)
    mix = cfg.stage1_mix if step < cfg.stage1_steps else cfg.mix
    return tasks, _sizes(step, cfg), plain, mix


VISION_LABELS = (len(COLOURS), len(SHAPES), 10)  # colour, shape, digit heads of stage 0


def vision_example(
    step: int, i: int, cfg: PretrainConfig
) -> tuple[Image.Image, tuple[int, int, int]]:
    """Image ``i`` of stage-0 step ``step`` and its labels ``(colour, shape, digit)`` (-1: none).

    Image ``i`` is a train-split MNIST digit when ``floor((i + 1) * vision_digit_frac)`` exceeds
    ``floor(i * vision_digit_frac)`` (at 0.5: odd ``i``), else a shape of a random colour. The curriculum
    position ``f = step / vision_steps`` sets the object size (``size_start`` -> ``size_end``),
    the share of flat backgrounds (``plain_start * (1 - f)``) and the difficulty (``f``).
    """
    from agent.data.pretrain import _scene
    from agent.data.scene import pick_target

    f = step / max(1, cfg.vision_steps)
    rng = np.random.default_rng([cfg.seed, 11, step, i])
    lo = round(cfg.size_start[0] + f * (cfg.size_end[0] - cfg.size_start[0]))
    hi = max(lo, round(cfg.size_start[1] + f * (cfg.size_end[1] - cfg.size_start[1])))
    scene = _scene(rng, "train", 1, TaskConfig(difficulty=f), plain=cfg.plain_start * (1 - f))
    size = int(rng.integers(lo, hi + 1))
    frac = cfg.vision_digit_frac
    if np.floor((i + 1) * frac) <= np.floor(i * frac):
        colour, shape = pick_target(rng)
        scene.add_shape(0, colour, shape, size=size)
        return scene.images[0], (list(COLOURS).index(colour), SHAPES.index(shape), -1)
    digit = int(rng.integers(10))
    scene.add_digit(0, digit, size=size)
    return scene.images[0], (-1, -1, digit)


def vision_warmup(policy: Policy, cfg: PretrainConfig, log, progress: bool = True) -> list[float]:
    """Stage 0: train the vision tower on labelled single-object images (see ``vision_steps``).

    Loss (nats): cross-entropy of the colour, shape and digit heads, each over the images that
    carry its label, summed. The head is discarded; the tower keeps what it learned.

    Returns:
        The per-step losses.
    """
    tower = policy.model.model.visual
    torch.manual_seed(cfg.seed + 1)
    tokens_per_image = 1
    if cfg.vision_pool == "flat":
        grid = policy.image_processor(images=[vision_example(0, 0, cfg)[0]], return_tensors="pt")
        tokens_per_image = int(grid["image_grid_thw"].prod()) // cfg.spec.merge_size**2
    head = torch.nn.Linear(tower.config.out_hidden_size * tokens_per_image, sum(VISION_LABELS))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 50))
    cuts = np.cumsum((0, *VISION_LABELS))
    losses, t0 = [], time.perf_counter()
    tower.train()
    for step in tqdm(range(cfg.vision_steps), desc="stage 0: vision", disable=not progress):
        images, labels = zip(*(vision_example(step, i, cfg) for i in range(cfg.vision_batch)))
        px = policy.image_processor(images=list(images), return_tensors="pt")
        tokens = tower(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output
        tokens = tokens.view(len(images), -1, tokens.shape[-1])  # [image, token, d_model]
        if cfg.vision_pool == "flat" and tokens.shape[1] != tokens_per_image:
            raise ValueError(
                f"stage 0 with vision_pool='flat' needs {tokens_per_image} tokens per image, "
                f"got {tokens.shape[1]} (image sizes differ)"
            )
        logits = head(tokens.mean(1) if cfg.vision_pool == "mean" else tokens.flatten(1))
        y = torch.tensor(labels)
        loss = sum(
            torch.nn.functional.cross_entropy(
                logits[y[:, j] >= 0, cuts[j] : cuts[j + 1]], y[y[:, j] >= 0, j]
            )
            for j in range(len(VISION_LABELS))
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warm.step()
        losses.append(float(loss.detach()))
        row = {"stage": "vision", "step": 0, "vision_step": step + 1, "loss": losses[-1]}
        log.write(json.dumps({**row, "elapsed_s": time.perf_counter() - t0}) + "\n")
    log.flush()
    return losses


def _schedule(cfg: PretrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, t)))

    return f


def _save_checkpoint(policy: Policy, opt, sched, step: int, out: Path) -> None:
    """Write ``out/checkpoint`` atomically (temp dir, then rename)."""
    tmp = out / f".checkpoint-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_model(policy, tmp)
    torch.save(
        {
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "step": step,
            "rng": torch.get_rng_state(),
        },
        tmp / "trainer_state.pt",
    )
    final = out / "checkpoint"
    old = out / ".checkpoint-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _truncate_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    rows = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(r + "\n" for r in rows))


def _save_model(policy: Policy, folder: Path) -> None:
    policy.model.save_pretrained(folder)
    write_weight_hashes(folder)
    policy.tokenizer.save_pretrained(folder)
    policy.image_processor.save_pretrained(folder)


STAGE0_FIELDS = (
    "seed", "weight_decay", "size_start", "size_end", "plain_start", "vision_steps",
    "vision_batch", "vision_lr", "vision_digit_frac", "vision_pool", "spec",
)  # fmt: skip
"""The :class:`PretrainConfig` fields that decide the weights after stage 0."""


def _stage0(cfg: PretrainConfig, out: Path, progress: bool) -> Policy:
    """The policy after stage 0: built from ``cfg.seed``, then :func:`vision_warmup`.

    Stage 0 is snapshotted to ``out/stage0`` (weights, its log rows, torch's RNG state, and the
    :data:`STAGE0_FIELDS` it was run with); a later fresh run whose fields match loads the
    snapshot instead of redoing it, with the same weights, log rows and RNG state, so the
    result is the same as an uninterrupted run. A snapshot with other fields is replaced.
    """
    fields_ = {f: getattr(cfg, f) for f in STAGE0_FIELDS}
    key = json.dumps(jsonable({**fields_, "spec": asdict(cfg.spec)}), sort_keys=True)
    snap = out / "stage0"
    log = out / "log.jsonl"
    done = snap / "stage0.json"
    if cfg.vision_steps and done.is_file() and done.read_text() == key:
        shutil.copyfile(snap / "log.jsonl", log)
        torch.set_rng_state(torch.load(snap / "rng.pt"))
        return load_policy(snap)
    build_tiny_model(out / "init", cfg.spec, seed=cfg.seed)
    policy = load_policy(out / "init")
    if not cfg.vision_steps:
        return policy
    with log.open("a") as vlog:
        vision_warmup(policy, cfg, vlog, progress)
    tmp = out / f".stage0-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_model(policy, tmp)
    shutil.copyfile(log, tmp / "log.jsonl")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    (tmp / "stage0.json").write_text(key)  # written last: marks the snapshot complete
    shutil.rmtree(snap, ignore_errors=True)
    tmp.rename(snap)
    return policy


def pretrain(
    cfg: PretrainConfig, progress: bool = True, stop_after: int | None = None, probe: bool = True
) -> Policy:
    """Run (or resume) pretraining; writes the final model to ``cfg.out``; returns the policy.

    Args:
        cfg: the configuration.
        progress: show a progress bar.
        stop_after: stop (after checkpointing) once this many steps are done, as a killed job
            would; the final model is not written (for resume tests).
        probe: run the held-out probes at the end and write ``probe.json`` and ``README.md``.
    """
    from train import probes

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    start = 0
    resuming = cfg.resume and (ckpt / "trainer_state.pt").is_file()
    if resuming:  # stage 0, if any, is inside the checkpoint's weights
        policy = load_policy(ckpt)
    else:
        (out / "log.jsonl").unlink(missing_ok=True)  # a fresh run restarts its log
        policy = _stage0(cfg, out, progress)
    model = policy.model
    vision = [p for n, p in model.named_parameters() if is_vision_parameter(n)]
    ids = {id(p) for p in vision}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in ids], "lr": cfg.lr},
        {"params": vision, "lr": cfg.lr * cfg.vision_lr_mult},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    if cfg.resume and (ckpt / "trainer_state.pt").is_file():
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    frame = ImageFrame.from_processor(policy.image_processor)
    _truncate_log(out / "log.jsonl", start)  # rows after the checkpoint are redone
    log = (out / "log.jsonl").open("a")
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, cfg.steps),
        desc="pretrain",
        disable=not progress,
        initial=start,
        total=cfg.steps,
    )
    for step in bar:
        tasks, sizes, plain, mix = curriculum(step, cfg)
        examples = [
            pretrain_example(
                step * cfg.batch + i,
                cfg.seed,
                tasks,
                frame,
                mix,
                cfg.tool_frac,
                sizes=sizes,
                plain=plain,
                family_answers=cfg.family_answers,
                perception_tool_frac=cfg.perception_tool_frac,
            )  # fmt: skip
            for i in range(cfg.batch)
        ]
        trajs = transcripts(policy, examples)
        model.train()
        loss = sft_loss(policy, trajs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        sched.step()
        row = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "grad_norm": grad_norm,
            "difficulty": tasks.difficulty,
            "sizes": list(sizes),
            "plain": plain,
            "lr": sched.get_last_lr()[0],
            "elapsed_s": time.perf_counter() - t0,
        }
        bar.set_postfix(loss=f"{row['loss']:.3f}", diff=f"{tasks.difficulty:.2f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            model.eval()
            row["probe/perception"] = probes.perception(policy, n=32)
            row["probe/perception_medium"] = probes.perception(policy, n=32, target_size=(40, 56))
            model.train()
        log.write(json.dumps(row) + "\n")
        log.flush()
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(policy, opt, sched, step + 1, out)
        if stop_after is not None and step + 1 >= stop_after:
            return policy
    model.eval()
    _save_model(policy, out)
    from train.model_card import rebuild_command, write_model_card  # imports this module

    record = {
        **jsonable(asdict(cfg)),
        "rebuild_command": rebuild_command(cfg),
    }
    (out / "relook_pretrain.json").write_text(json.dumps(record, indent=1))
    if probe:
        write_model_card(policy, cfg, out)
    return policy


def jsonable(obj):
    """``obj`` with every ``Path`` turned into its string, nested dicts, lists and tuples (as lists)
    included: the form ``relook_pretrain.json`` stores."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ.get("RELOOK_THREADS", "1")))
    pretrain(tyro.cli(PretrainConfig))
