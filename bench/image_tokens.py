"""Cost of image tokens for a tiny Qwen2.5-VL: how the vision patch size changes the pretraining
and evaluation time of relook-tiny-shaped models.

relook-tiny shows a 224 px scene at 112 px with 14 px patches merged 2x2: 16 image tokens per
image, 64 vision patches. Its tower cannot read MNIST digits (linear probes of its features:
0.18 on photos); 7 px patches learn digits faster (``docs/gotchas.md``) but give 256 patches
and 64 image tokens per image. Each spec (``--specs``, ``patch:merge``, all other fields as
relook-tiny's ``RELOOK_TINY_SPEC``) is built with random weights and timed on CPU, one thread:

    tokens/image    image tokens per 224 px scene after the image processor.
    stage0 s        one stage-0 step of ``train.pretrain.vision_warmup``: the vision tower and a
                    linear head, forward and backward, on 32 single-object images.
    sft s           one main-stage step: ``train.pretrain.sft_loss`` forward, backward and an
                    AdamW step on 16 teacher-forced transcripts of the default mix (difficulty 0.5).
    eval s          greedy evaluation of ``--n-eval`` held-out family questions with tools
                    advertised (``agent.evaluation.evaluate``: max 40 new tokens, 4 turns).
                    Random weights stop at different lengths, so the generated tokens are printed
                    too and ``eval ms/token`` divides by them.

Times are medians of ``--repeats`` warm calls (``time.perf_counter``; the machine may be
shared). The script prints numbers and asserts nothing.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/image_tokens.py [--specs 14:2 7:2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.data.pretrain import Mix, pretrain_example  # noqa: E402
from agent.data.tasks import TaskConfig, generate  # noqa: E402
from agent.evaluation import evaluate  # noqa: E402
from agent.modeling import build_tiny_model, load_policy  # noqa: E402
from agent.rollout import Agent, AgentConfig  # noqa: E402
from agent.tools import ImageFrame  # noqa: E402
from train.loop import make_generator  # noqa: E402
from train.pretrain import (  # noqa: E402
    RELOOK_TINY_SPEC,
    PretrainConfig,
    sft_loss,
    transcripts,
    vision_example,
)


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up: lazy buffers, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(patch: int, merge: int, repeats: int, n_eval: int, root: Path) -> dict:
    """Timings of one spec (see the module docstring); ``root`` holds the built model."""
    spec = dataclasses.replace(RELOOK_TINY_SPEC, patch_size=patch, merge_size=merge)
    folder = build_tiny_model(root / f"p{patch}m{merge}", spec, seed=0)
    policy = load_policy(folder)
    cfg = PretrainConfig(spec=spec)
    images = [vision_example(0, i, cfg)[0] for i in range(32)]
    px = policy.image_processor(images=images[:1], return_tensors="pt")
    tokens = int(px["image_grid_thw"].prod()) // merge**2
    tower = policy.model.model.visual
    head = torch.nn.Linear(tower.config.out_hidden_size, 10)

    def stage0_step() -> None:
        px = policy.image_processor(images=images, return_tensors="pt")
        out = tower(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output
        head(out.view(len(images), -1, out.shape[-1]).mean(1)).logsumexp(1).mean().backward()

    frame = ImageFrame(spec.patch_size, spec.merge_size, spec.min_pixels, spec.max_pixels)
    examples = [pretrain_example(i, 0, TaskConfig(difficulty=0.5), frame, Mix()) for i in range(16)]
    trajs = transcripts(policy, examples)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-4)

    def sft_step() -> None:
        loss = sft_loss(policy, trajs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    samples = generate("test", n_eval, 1, TaskConfig(difficulty=0.5))
    agent_cfg = AgentConfig(tools="both", temperature=0.0, max_turns=4, max_new_tokens=40)
    agent = Agent(policy.tokenizer, policy.image_processor, agent_cfg)
    generated = []

    def eval_run() -> None:
        _, trajs = evaluate(agent, make_generator(policy), samples)
        generated.append(sum(sum(t.response_mask) for t in trajs))

    eval_s = _median_s(eval_run, repeats)
    return {
        "spec": f"{patch}:{merge}",
        "tokens/image": tokens,
        "stage0 s": _median_s(stage0_step, repeats),
        "sft s": _median_s(sft_step, repeats),
        "eval s": eval_s,
        "generated": generated[-1],
        "eval ms/token": 1000 * eval_s / max(1, generated[-1]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=["14:2", "7:2"], help="patch:merge pairs")
    parser.add_argument("--repeats", type=int, default=3, help="timed warm calls per case")
    parser.add_argument("--n-eval", type=int, default=32, help="held-out questions to evaluate")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.specs:
            try:
                patch, merge = (int(x) for x in s.split(":"))
            except ValueError:
                parser.error(f"--specs: {s!r} is not patch:merge (e.g. 14:2)")
            rows.append(measure(patch, merge, args.repeats, args.n_eval, Path(tmp)))
    cols = list(rows[0])
    print("  ".join(f"{c:>13}" for c in cols))
    for r in rows:
        cells = [f"{r[c]:>13.3f}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in cols]
        print("  ".join(cells))
    base = rows[0]
    for r in rows[1:]:
        ratios = {c: r[c] / base[c] for c in ("stage0 s", "sft s", "eval ms/token")}
        text = ", ".join(f"{c} {v:.2f}x" for c, v in ratios.items())
        print(f"{r['spec']} / {base['spec']}: {text}")


if __name__ == "__main__":
    main()
