"""``python -m train.pretrain``: pretrain relook-tiny, a small Qwen2.5-VL that sees, on CPU.

Supervised (teacher-forced) training from random weights on :mod:`agent.data.pretrain`
examples: perception (colour, shape, presence, digits), image-index grounding, the turn
format and generic tool use, never the evaluation families' solutions. A curriculum moves the
scenes from large, opaque, outlined targets (difficulty 0) to small blended ones (difficulty 1).
Transcripts are built by relook's own agent loop with a scripted teacher, so the token ids,
image tokens and tool observations are exactly those the agent sees at RL time.

Resumable (``--resume``: model, optimizer, scheduler, RNG and step restored from
``<out>/checkpoint``) and deterministic from ``seed`` on a given machine kind.

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
from tqdm.auto import tqdm

from agent.data.pretrain import Mix, PretrainExample, pretrain_example
from agent.data.tasks import TaskConfig
from agent.modeling import Policy, TinySpec, build_tiny_model, load_policy
from agent.rollout import Agent, AgentConfig, GenResult, rollout
from agent.tools import ImageFrame
from train.batching import batch_inputs, batch_weights, batched_token_log_probs, loss_weights

STAGE1_MIX = Mix(colour=1, shape=1, present=0, digit=0, label=0, locate=0, restate=0, format=0)
RELOOK_TINY_SPEC = TinySpec(
    text_layers=4, hidden=128, heads=4, kv_heads=2, intermediate=384,
    vision_depth=3, vision_hidden=128, vision_heads=4, patch_size=14, merge_size=2,
)  # fmt: skip


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
        target_size: pixel range of pasted targets in 224 px images at the end of the ramp.
        size_start: pixel range of described shapes at step 0 (interpolated to
            ``target_size`` over the ramp): perception is learned on large objects first.
        plain_start: share of flat grey backgrounds at step 0, falling to 0 over the ramp.
        stage1_steps: perception warm-up before the ramp: colour and shape questions only, flat
            backgrounds, ``size_start`` shapes, no tools advertised (colour on plain backgrounds
            was learned in ~150 steps this way, and not at all when mixed from the start).
        mix: example-kind weights.
        tool_frac: share of ``format`` examples (tools advertised) that call a tool first.
        save_every: steps between resumable checkpoints.
        eval_every: steps between probe evaluations (0: only at the end).
        resume: continue from ``<out>/checkpoint`` if present.
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
    plain_start: float = 1.0
    stage1_steps: int = 400
    mix: Mix = field(default_factory=Mix)
    tool_frac: float = 0.3
    save_every: int = 250
    eval_every: int = 500
    resume: bool = False
    probe_n: int = 64
    spec: TinySpec = RELOOK_TINY_SPEC


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
    """Curriculum of described-shape sizes: ``size_start`` -> ``target_size`` over the ramp."""
    f = _difficulty(step, cfg)
    lo = round(cfg.size_start[0] + f * (cfg.target_size[0] - cfg.size_start[0]))
    hi = round(cfg.size_start[1] + f * (cfg.target_size[1] - cfg.size_start[1]))
    return lo, max(lo, hi)


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
    policy.tokenizer.save_pretrained(folder)
    policy.image_processor.save_pretrained(folder)


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
    if cfg.resume and (ckpt / "trainer_state.pt").is_file():
        policy = load_policy(ckpt)
    else:
        build_tiny_model(out / "init", cfg.spec, seed=cfg.seed)
        policy = load_policy(out / "init")
    model = policy.model
    vision = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]
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
        tasks = TaskConfig(target_size=cfg.target_size, difficulty=_difficulty(step, cfg))
        sizes = _sizes(step, cfg)
        plain = cfg.plain_start * (1.0 - _difficulty(step, cfg))
        examples = [
            pretrain_example(
                step * cfg.batch + i, cfg.seed, tasks, frame, cfg.mix, cfg.tool_frac, sizes=sizes
            )
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
            model.train()
        log.write(json.dumps(row) + "\n")
        log.flush()
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(policy, opt, sched, step + 1, out)
        if stop_after is not None and step + 1 >= stop_after:
            return policy
    model.eval()
    _save_model(policy, out)
    (out / "relook_pretrain.json").write_text(json.dumps(_jsonable(asdict(cfg)), indent=1))
    if probe:
        write_model_card(policy, cfg, out, wall_s=time.perf_counter() - t0)
    return policy


def write_model_card(policy: Policy, cfg: PretrainConfig, out: Path, wall_s: float) -> dict:
    """Probe the model (held-out split) and write ``probe.json`` and a ``README.md`` model card."""
    from train import probes

    result = probes.all_probes(policy, n=cfg.probe_n)
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    n_params = sum(p.numel() for p in policy.model.parameters())
    lines = [
        "# relook-tiny",
        "",
        f"A {n_params / 1e6:.2f} M-parameter Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) pretrained from",
        "random weights on CPU by `python -m train.pretrain` (relook). Data: `agent/data/pretrain.py`",
        "(perception of colour, shape, presence and MNIST digits on real photos shipped in packages;",
        "image-index grounding; turn format and generic reflect/confirm use; evaluation-style",
        "questions only with randomly drawn answers). Curriculum: shapes from",
        f"{cfg.size_start} px down to {cfg.target_size} px and difficulty 0 -> 1 over",
        f"{cfg.ramp_frac:.0%} of {cfg.steps} steps (batch {cfg.batch}, lr {cfg.lr}, vision lr x{cfg.vision_lr_mult}).",
        "",
        f"Seed {cfg.seed}; wall time {wall_s / 60:.1f} min on this machine; config in `relook_pretrain.json`,",
        "per-step loss in `log.jsonl`. Rebuild with the command in `relook_pretrain.json` defaults:",
        f"`python -m train.pretrain --out {out} --seed {cfg.seed} --steps {cfg.steps}`.",
        "",
        "## Held-out probes (test split: backgrounds and digits never seen in training)",
        "",
        "```json",
        json.dumps(result, indent=1),
        "```",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return result


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ.get("RELOOK_THREADS", "1")))
    pretrain(tyro.cli(PretrainConfig))
