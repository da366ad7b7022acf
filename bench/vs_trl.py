"""Seconds per GRPO step: relook's trainer against TRL's ``GRPOTrainer`` on the same work, CPU.

Both trainers run single-turn, tools-off GRPO on the same model, the same prompts, the same
group size, lengths, learning rate and number of optimizer steps, one after the other. Each runs
in a fresh subprocess: this script re-invoked with the hidden ``--run`` flag, the model loaded
from disk in that process; ``--repeats`` alternates such runs (relook, TRL, relook, ...). The
script prints seconds per step for both and their ratio. It checks nothing and asserts no target.

The work of one step, the same in both:

* ``--prompts`` questions from ``agent.data.tasks.generate_one("train", step * P + i,
  --data-seed)``. The sample is made inside the timed step in both: relook's loop calls
  ``generate_one`` itself, and TRL gets it from a lazy, cached ``datasets`` transform.
  Each question has 2-4 images (``--n-images``; 224 px scenes, shown at 112 px: 16 tokens each).
* The prompt: relook's system turn, ``Image k: <image>`` lines, the question and the no-tools
  format line. TRL renders it from conversational messages with the model's chat template and
  a ``Qwen2_5_VLProcessor``. The token ids and ``pixel_values`` are identical to relook's
  ``PromptBuilder`` and ``Agent.start`` (checked in the TRL subprocess for the first prompt).
* ``--group`` (G) completions per prompt, sampled in one batched, left-padded
  ``model.generate``. Temperature 1, ``top_k=0``, ``top_p=1``, the 4 vision tokens suppressed.
  Lengths are forced to be equal by default: ``min_new_tokens = max_new_tokens =
  --max-new-tokens`` in both. ``--natural-length`` lets ``<|im_end|>`` end a completion.
* Reward: relook's ``imagent`` outcome reward with no tools, ``acc + 0.2 * fmt``. ``acc`` is the
  verified ``<answer>`` text (``agent.verifiers.verify``, exact match here). ``fmt`` is -1 when
  there is no answer. Advantages are group-normalised (GRPO).
* One optimizer step per rollout batch. It uses ``P * G / --micro-batch`` forward/backward passes
  of ``--micro-batch`` sequences, PPO clip ``[0.8, 1.28]``, token-mean loss over the batch,
  AdamW with no weight decay, gradient-norm clip 1.0, ``beta = 0`` (no reference model), fp32.

What differs, and is kept because it is how each trainer works:

* Neither computes old log-probs in an extra forward: with one optimizer step per rollout
  batch both use the update forward's own, detached (relook: ``mini_batches=1``,
  ``train.loop._on_policy``; TRL: ``old = logp.detach()`` with ``num_iterations=1``).
* TRL runs the image processor twice per completion: once when tokenising for ``generate``,
  once for the training forward. relook runs it once per prompt.
* TRL's loss forward computes log-probs (and entropies) on completion positions only, through
  its fused LM head. relook computes logits over the whole sequence.
* Learning-rate schedule. relook decays linearly to 0.1x; TRL (``linear``) decays to 0. There is
  no warm-up in either.
* The advantage epsilon is 1e-6 in relook and 1e-4 in TRL.

Settings chosen for TRL, against its defaults: ``gradient_checkpointing=False`` (relook does not
checkpoint), ``bf16=False``, ``optim="adamw_torch"`` (relook's ``torch.optim.AdamW``),
``shuffle_dataset=False`` (relook's data order), ``report_to="none"``, ``save_strategy="no"``,
``use_cpu=True``, ``use_vllm=False``, ``logging_steps=1`` (relook makes a metrics row every step),
``epsilon_high=0.28`` and ``loss_type="dapo"`` (relook's clip-higher and token-mean).
``per_device_train_batch_size = --micro-batch``, and ``gradient_accumulation_steps`` and
``steps_per_generation`` are both ``P * G / micro-batch``: one generation per optimizer step.
``num_iterations=1``. relook is set to ``mini_batches=1``, ``warmup_steps=0``,
``mask_trajectories=False`` (TRL has no trajectory-level mask), ``checkpoint_every=0``,
``engine="torch"`` (``torch.optim.AdamW``) and ``rollout_seeding="batch"`` (one ``generate`` call
for the whole batch).

Timing: ``--warmup`` steps first, not counted, then ``--steps`` timed steps. Step wall time is the
time between consecutive end-of-step callbacks: relook's ``on_step``, TRL's ``on_step_end``
(``time.perf_counter``). ``cpu s`` is the process CPU time over the same interval
(``time.process_time``): with one thread it is the step's work, and it moves less than wall time
when other jobs share the cores. The split of a step (wall seconds):

* ``rollout``: everything before the loss. relook: ``timing_s/gen``. TRL: the dataset transform
  plus ``_generate_and_score_completions``. accelerate's dataloader fetches one batch ahead, so
  TRL's sample making for step k runs (and is counted) in step k - 1, and the timed steps hold
  one fetch fewer than relook's (about 0.02 s in all).
* ``generate``: the ``model.generate`` calls inside ``rollout``.
* ``old_logp``: relook's ``timing_s/old_logp`` (no forward here when on-policy, so ~0; the
  reference pass when ``beta > 0``). TRL has no such pass, so it is 0.
* ``update``: relook's ``timing_s/update`` (forward/backward, clip, optimizer step). TRL: the
  step minus ``rollout``, so it also holds the Trainer's logging and bookkeeping.
* ``other``: what remains of the step (relook's metrics row); 0 for TRL by construction.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/vs_trl.py [--steps 5] [--natural-length]``.
Needs ``trl`` (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import transformers

import train.loop as loop
from agent.data.tasks import generate_one
from agent.modeling import load_policy
from agent.prompting import FORMAT_NO_TOOLS, SYSTEM_TEXT
from agent.rollout import Agent, AgentConfig
from agent.tools import ANSWER_RE
from agent.verifiers import verify
from train.config import ArmConfig, DataConfig, GRPOConfig
from train.rewards import parse_reward, score

RUNS = ("relook", "trl")


# Shared by both runs ------------------------------------------------------------------------


def _data_config(args) -> DataConfig:
    return DataConfig(
        n_images=tuple(args.n_images), difficulty=args.difficulty, train_seed=args.data_seed
    )


class _Events:
    """``(end time, seconds, value)`` of timed calls, bucketed into steps afterwards."""

    def __init__(self):
        self.events: list[tuple[float, float, float]] = []

    def wrap(self, fn, value=None):
        @functools.wraps(fn)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            t1 = time.perf_counter()
            self.events.append((t1, t1 - t0, value(a, kw, out) if value else 0.0))
            return out

        return timed

    def per_step(self, stamps: list[float], index: int = 1) -> list[float]:
        """Sum of field ``index`` (1: seconds, 2: value) of the events inside each step but the
        first (step k ends at ``stamps[k]``)."""
        sums = [0.0] * len(stamps)
        for end, *fields in self.events:
            k = next((i for i, s in enumerate(stamps) if end <= s), None)
            if k is not None:
                sums[k] += fields[index - 1]
        return sums[1:]


class _Clock:
    """Wall (``time.perf_counter``) and process CPU (``time.process_time``) time at each step end."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self, *_, **__) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def steps(self) -> dict[str, list[float]]:
        """Seconds of each step but the first (whose start is not stamped)."""
        w, c = self.wall, self.cpu
        return {
            "step": [b - a for a, b in zip(w, w[1:])],
            "cpu": [b - a for a, b in zip(c, c[1:])],
        }


def _new_tokens(a, kw, out) -> float:
    """Padded new tokens per row of one ``generate`` call."""
    seqs = out.sequences if hasattr(out, "sequences") else out
    return float(seqs.shape[1] - kw["input_ids"].shape[1])


# relook ---------------------------------------------------------------------------------------


def run_relook(args) -> dict:
    policy = load_policy(args.model)
    if not args.natural_length:  # HFGenerator's generate reads it from the generation config
        policy.model.generation_config.min_new_tokens = args.max_new_tokens
    data, gen = _Events(), _Events()
    loop.generate_one = data.wrap(loop.generate_one)
    policy.model.generate = gen.wrap(policy.model.generate, _new_tokens)
    cfg = ArmConfig(
        name="vs_trl",
        model=args.model,
        agent=AgentConfig(
            tools="none", max_turns=1, max_new_tokens=args.max_new_tokens, temperature=1.0
        ),
        grpo=GRPOConfig(
            steps=args.warmup + args.steps,
            prompts_per_step=args.prompts,
            group_size=args.group,
            mini_batches=1,
            lr=args.lr,
            warmup_steps=0,
            beta=0.0,
            mask_trajectories=False,
            micro_batch=args.micro_batch,
            checkpoint_every=0,
            seed=args.seed,
            engine="torch",
            rollout_seeding="batch",  # one batched generate per step, as TRL
        ),
        data=_data_config(args),
    )
    clock = _Clock()
    rows = loop.train(cfg, policy, on_step=clock.tick, progress=False)[1:]
    return {
        **clock.steps(),
        "rollout": [r["timing_s/gen"] for r in rows],
        "generate": gen.per_step(clock.wall),
        "data": data.per_step(clock.wall),
        "old_logp": [r["timing_s/old_logp"] for r in rows],
        "update": [r["timing_s/update"] for r in rows],
        "completion_len": [r["rollout/response_length"] for r in rows],
        "new_tokens": gen.per_step(clock.wall, 2),
        "reward": [r["rollout/reward_mean"] for r in rows],
    }


# TRL ------------------------------------------------------------------------------------------


def _processor(policy):
    """A ``Qwen2_5_VLProcessor`` from relook's tokenizer and PIL image processor, without a video
    processor. transformers checks each part's class, and the video processor's base class needs
    torchvision, which the CPU machines must not have. Videos are never passed."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    policy.tokenizer.padding_side = "left"  # TRL left-pads prompts; the processor must agree
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=policy.image_processor,
        tokenizer=policy.tokenizer,
        video_processor=None,
        chat_template=policy.tokenizer.chat_template,
    )


def _conversation(sample) -> list[dict]:
    """relook's no-tools prompt as conversational messages with image placeholders."""
    content: list[dict] = []
    for k in range(1, len(sample.images) + 1):
        content += [
            {"type": "text", "text": f"Image {k}: "},
            {"type": "image"},
            {"type": "text", "text": "\n"},
        ]
    content.append({"type": "text", "text": f"{sample.question}\n{FORMAT_NO_TOOLS}"})
    return [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": content}]


def _check_prompt(policy, processor, sample) -> None:
    """Raise unless TRL's rendering of ``sample`` gives relook's prompt ids and pixels exactly."""
    from trl.data_utils import prepare_multimodal_messages

    images = [im.convert("RGB") for im in sample.images]
    messages = prepare_multimodal_messages(_conversation(sample), images=images)
    out = processor.apply_chat_template(
        conversation=[messages], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    traj = Agent(policy.tokenizer, policy.image_processor, AgentConfig(tools="none")).start(sample)
    pixels = torch.cat([r.pixel_values for r in traj.images])
    if list(out["input_ids"][0]) != traj.token_ids or not torch.equal(
        torch.as_tensor(out["pixel_values"]), pixels
    ):
        raise RuntimeError("TRL's prompt differs from relook's (token ids or pixel_values)")


def _relook_reward(tokenizer, tool_gain: float):
    """TRL reward function: relook's ``imagent`` reward (``train.rewards.score``) of a single
    no-tools turn."""
    terms = parse_reward("imagent", tool_gain)

    def relook_reward(completion_ids, answer, answer_type, **kwargs) -> list[float]:
        out = []
        for ids, gold, kind in zip(completion_ids, answer, answer_type):
            found = ANSWER_RE.search(tokenizer.decode(ids, skip_special_tokens=False))
            pred = found.group(1).strip() if found else None
            fmt = -1.0 if pred is None else 0.0
            acc = verify(pred, gold, kind)
            turn = SimpleNamespace(answer=pred, gold=gold, acc=acc, fmt=fmt, used=0.0)
            out.append(score([turn], terms)[0].reward)
        return out

    return relook_reward


def _dataset(args, n_rows: int, data: _Events):
    """Rows ``prompt, images, answer, answer_type``, made lazily (and cached) on first access."""
    import datasets

    tasks = loop.task_config(_data_config(args))

    @functools.cache
    def row(i: int) -> dict:
        s = generate_one("train", i, args.data_seed, tasks)
        images = [im.convert("RGB") for im in s.images]
        return {"prompt": _conversation(s), "images": images, "answer": s.answer,
                "answer_type": s.answer_type}  # fmt: skip

    def transform(batch: dict) -> dict:
        rows = [row(int(i)) for i in batch["index"]]
        return {k: [r[k] for r in rows] for k in ("prompt", "images", "answer", "answer_type")}

    ds = datasets.Dataset.from_dict({"index": list(range(n_rows))})
    return ds.with_transform(data.wrap(transform))


def run_trl(args) -> dict:
    import trl

    policy = load_policy(args.model)
    processor = _processor(policy)
    tasks = loop.task_config(_data_config(args))
    _check_prompt(policy, processor, generate_one("train", 0, args.data_seed, tasks))
    n = args.prompts * args.group
    if n % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide {n} completions")
    accum = n // args.micro_batch
    gen_kwargs = {"suppress_tokens": policy.vision_token_ids}
    if not args.natural_length:
        gen_kwargs["min_new_tokens"] = args.max_new_tokens
    steps = args.warmup + args.steps
    out_dir = tempfile.TemporaryDirectory(prefix="vs_trl_")  # nothing is saved there
    config = trl.GRPOConfig(
        output_dir=out_dir.name,
        max_steps=steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=accum,
        steps_per_generation=accum,
        num_generations=args.group,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs=gen_kwargs,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
        shuffle_dataset=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        use_vllm=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=args.seed,
        data_seed=args.seed,
    )
    data, gen, rollout = _Events(), _Events(), _Events()
    clock = _Clock()
    log_rows: list[dict] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

        def on_log(self, args, state, control, logs=None, **kwargs):
            log_rows.append(dict(logs or {}))

    trainer = trl.GRPOTrainer(
        model=policy.model,
        reward_funcs=_relook_reward(policy.tokenizer, tool_gain=0.5),
        args=config,
        train_dataset=_dataset(args, steps * args.prompts, data),
        processing_class=processor,
        callbacks=[Clock()],
    )
    policy.model.generate = gen.wrap(policy.model.generate, _new_tokens)
    lengths: list[float] = []

    def completion_len(a, kw, out) -> float:
        lengths.append(float(out["completion_mask"].sum(1).float().mean()))
        return 0.0

    trainer._generate_and_score_completions = rollout.wrap(
        trainer._generate_and_score_completions, completion_len
    )
    trainer.train()
    out_dir.cleanup()
    times = clock.steps()
    d, r = data.per_step(clock.wall), rollout.per_step(clock.wall)
    return {
        **times,
        "rollout": [a + b for a, b in zip(d, r)],
        "generate": gen.per_step(clock.wall),
        "data": d,
        "old_logp": [0.0] * len(d),
        "update": [s - a - b for s, a, b in zip(times["step"], d, r)],
        "completion_len": lengths[1:],
        "new_tokens": gen.per_step(clock.wall, 2),
        "reward": [x["reward"] for x in log_rows if "reward" in x][1:],
    }


# Report ---------------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _child(run: str, args, argv: list[str]) -> dict:
    """Run one trainer in a fresh subprocess; returns its result dict."""
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--run", run, "--result", out]
        proc = subprocess.run(cmd, capture_output=not args.verbose, text=True)
        if proc.returncode != 0:
            if not args.verbose:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"{run} run failed with exit status {proc.returncode}")
        with open(out) as f:
            return json.load(f)


def _report(args, results: dict[str, list[dict]]) -> None:
    import trl

    n = args.prompts * args.group
    length = "up to <|im_end|>" if args.natural_length else "forced: min_new_tokens = max"
    print(
        f"relook vs TRL GRPOTrainer: single-turn GRPO, tools off, {args.model}, CPU, "
        f"{torch.get_num_threads()} thread(s); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}"
    )
    print(
        f"step: {args.prompts} prompts x G={args.group} = {n} completions, "
        f"{args.n_images[0]}-{args.n_images[1]} images per prompt, {args.max_new_tokens} new "
        f"tokens ({length}), {n // args.micro_batch} micro-batches of {args.micro_batch}, "
        f"1 optimizer step, lr {args.lr}, beta 0"
    )
    print(
        f"timed: {args.steps} steps after {args.warmup} warm-up step(s), {args.repeats} "
        "alternating run(s) per trainer, each in a fresh process\n"
    )
    head = (
        f"{'trainer':<8}{'mean s':>8}{'median':>8}{'min':>7}{'cpu s':>7} |{'rollout':>8}"
        f"{'generate':>9}{'data':>6}{'old_logp':>9}{'update':>7}{'other':>6} |"
        f"{'compl len':>10}{'new tok':>8}{'reward':>7}"
    )
    print(head + "\n" + "-" * len(head))
    kept: dict[str, dict[str, list[float]]] = {}
    for run, reps in results.items():
        skip = args.warmup - 1  # results start at the second step
        t = {k: [x for r in reps for x in r[k][skip:]] for k in reps[0]}
        kept[run] = t
        m = {k: _mean(v) for k, v in t.items()}
        # round off float noise (TRL's is 0 by construction): no "-0.000" glued to "update"
        other = round(m["step"] - m["rollout"] - m["old_logp"] - m["update"], 3) + 0.0
        print(
            f"{run:<8}{m['step']:>8.3f}{statistics.median(t['step']):>8.3f}{min(t['step']):>7.3f}"
            f"{m['cpu']:>7.3f} |{m['rollout']:>8.3f}{m['generate']:>9.3f}{m['data']:>6.3f}"
            f"{m['old_logp']:>9.3f}{m['update']:>7.3f}{other:>6.3f} |"
            f"{m['completion_len']:>10.1f}{m['new_tokens']:>8.1f}{m['reward']:>7.3f}"
        )
    if set(kept) == set(RUNS):
        rl, tr = kept["relook"], kept["trl"]
        ratio = _mean(rl["step"]) / _mean(tr["step"])
        median = statistics.median(rl["step"]) / statistics.median(tr["step"])
        cpu = _mean(rl["cpu"]) / _mean(tr["cpu"])
        print(
            f"\nrelook / TRL seconds per step: {ratio:.2f}x (mean), {median:.2f}x (median), "
            f"{cpu:.2f}x (CPU time); target <= 1.0: {'met' if ratio <= 1.0 else 'NOT met'}"
        )
    print(
        "\nmean s / median / min: wall seconds per step; cpu s: process CPU seconds per step. "
        "rollout: everything before the loss (relook timing_s/gen; TRL: dataset transform + "
        "_generate_and_score_completions), with generate (model.generate) and data "
        "(generate_one) inside it. old_logp: relook's old/reference log-prob passes (none on-policy). update: "
        "relook timing_s/update; TRL: the rest of the step (forward/backward, optimizer, "
        "logging). compl len: mean sampled tokens per completion. new tok: tokens generated per "
        "row of the padded batch."
    )
    print(
        "per-step wall seconds: "
        + json.dumps({k: [round(x, 3) for x in v["step"]] for k, v in kept.items()})
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="relook-tiny", help="Qwen2.5-VL directory or relook-tiny"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts (groups) per step")
    parser.add_argument("--group", type=int, default=4, help="G, completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--micro-batch", type=int, default=8, help="sequences per forward/backward pass"
    )
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--n-images", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--natural-length", action="store_true", help="let <|im_end|> end a completion early"
    )
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs of each trainer (fresh process)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the subprocesses' output")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.run:
        result = {"relook": run_relook, "trl": run_trl}[args.run](args)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return
    argv = sys.argv[1:] if argv is None else argv
    if "trl" in args.runs and importlib.util.find_spec("trl") is None:
        raise SystemExit("trl is not installed: pip install -e '.[bench]'")
    results: dict[str, list[dict]] = {run: [] for run in args.runs}
    for _ in range(args.repeats):
        for run in args.runs:
            results[run].append(_child(run, args, argv))
    _report(args, results)


if __name__ == "__main__":
    main()
