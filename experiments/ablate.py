"""``python -m experiments.ablate``: train, evaluate and measure every arm of an ablation grid.

For each arm (docs/method.md switches ``tools``, ``mask_tokens``, ``mask_trajectories``,
``tool_gain``) and seed: GRPO training from the same base model, held-out evaluation on the
offline test split, and attention replay of held-out trajectories; everything goes to a run
directory (docs/design.md decision 5) that the Streamlit app and the figure scripts read.

Examples:
    python -m experiments.ablate                         # default grid on relook-tiny, 2 cores
    python -m experiments.ablate --grid smoke --out runs/smoke
    python -m experiments.ablate --grid smoke --model random   # untrained tiny model (tests)
    python -m experiments.ablate --grid smoke --report-to tensorboard --eval-every 1
    python -m experiments.ablate --model /ckpt/Qwen2.5-VL-3B-Instruct --arms full tools_none
    python -m experiments.ablate --grid smoke --engine deepspeed --zero-stage 2   # 1 process
    python -m experiments.ablate --preset qwen2.5-vl-7b --model /ckpt/Qwen2.5-VL-7B-Instruct
    python -m experiments.ablate --grid smoke --tools reflect,confirm,mypkg.mod:Rotate
    python -m experiments.ablate --grid smoke --launcher ray --ray-address auto \
        --num-gpus-per-arm 1 --out /shared/runs/smoke   # arms as Ray tasks (pip install ray)
    python -m experiments.ablate --model /ckpt/Qwen2.5-VL-3B-Instruct --rollout-backend vllm \
        --engine deepspeed          # 1 GPU: colocated vLLM rollouts (pip install vllm)
    python -m experiments.ablate --train-data data/train.jsonl:0.7 --train-data generator:0.3 \
        --eval-data vstar:~/data/vstar_bench   # your data (README "Train on your data")

Data-parallel training (:mod:`train.loop`): every process runs this same module; each arm is
trained by all of them together (each rolls out and trains on ``prompts_per_step / N`` of every
step's prompts, which must divide evenly), then rank 0 alone saves, evaluates and measures the
arm while the others wait. Arms run one after another (``--workers`` is ignored: a pool of arm
processes cannot share one process group). Only rank 0 writes the run directory; the
checkpoints folder must be on a filesystem every node sees. On CPU set ``DS_ACCELERATOR=cpu``
(gloo backend); on GPUs the backend is nccl and DeepSpeed trains in bf16::

    # 2 processes on one machine, torch's launcher (engine torch or deepspeed)
    torchrun --nproc_per_node 2 -m experiments.ablate --grid smoke --engine deepspeed \
        --rollout-seeding group --out runs/dp
    # the same with DeepSpeed's launcher (it adds --local_rank, which is accepted and ignored)
    deepspeed --num_accelerators 2 --module experiments.ablate --grid smoke \
        --engine deepspeed --out runs/dp
    # several nodes: a hostfile of "host slots=N" lines, a run dir every node sees; from node0
    # with passwordless ssh to the others:
    deepspeed --hostfile hostfile --master_addr node0 --module experiments.ablate \
        --model /ckpt/Qwen2.5-VL-7B-Instruct --engine deepspeed --zero-stage 3 \
        --gradient-checkpointing True --out /shared/runs/7b
    # without ssh: the same command on every node i, with --no_ssh --node_rank i added;
    # or torchrun on every node i of M: torchrun --nnodes M --node_rank i \
    #     --nproc_per_node 8 --master_addr node0 --master_port 29500 -m experiments.ablate ...
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import tyro

from agent.weights import write_weight_hashes
from analysis.rundir import atomic_write_json
from experiments.grids import GRIDS, grid_arms
from train.config import ArmConfig

RANDOM_MODEL = "random"
"""``--model random``: a random-weight tiny model with the format warm-up only."""


@dataclass
class AblateArgs:
    """Run an ablation grid.

    Attributes:
        grid: grid name (``default``: base + 4 arms x 60 steps; ``smoke``: the same arms, 2 steps).
        out: run directory; default ``runs/ablate-<grid>-<time>`` (``runs/latest`` links to it).
            An existing run directory of the same grid is resumed: complete arms are skipped.
        model: base checkpoint directory (Qwen2.5-VL / Qwen2-VL) or hub id; ``relook-tiny``
            (the default without ``--preset``) is the committed pretrained tiny base
            (``models/relook-tiny``); ``random`` builds a random-weight tiny Qwen2.5-VL with
            only the format warm-up into ``<out>/base_model`` (no perception: for tests and
            null baselines). With ``--preset`` the default is the preset's model.
        preset: a scale preset (``qwen2.5-vl-3b``, ``qwen2.5-vl-7b``; :mod:`experiments.presets`)
            applied on top of the grid: batch, group size, lengths, lr, ZeRO stage, gradient
            checkpointing, vLLM rollouts when available. The other flags here win over it.
        launcher: where arms run: ``local`` (this machine: in order, or ``--workers`` processes)
            or ``ray`` (each arm a Ray task on the cluster at ``--ray-address``;
            :mod:`experiments.launch`; ``pip install -e '.[ray]'``).
        ray_address: the Ray cluster for ``--launcher ray`` (``auto``: the cluster this node
            joined with ``ray start``); None starts a Ray instance on this machine.
        num_gpus_per_arm: GPUs Ray reserves per arm (``--launcher ray``; fractions pack arms).
        num_cpus_per_arm: CPUs Ray reserves per arm (``--launcher ray``).
        seeds: seeds; each arm runs once per seed (two by default, so that every table shows
            a spread).
        arms: subset of arms (default all of ``base full tools_none masks_off gain0``).
        steps: override the grid's GRPO steps (0 keeps them).
        workers: arms trained in parallel processes (1 thread each; docs/gotchas.md: two 1-thread
            jobs beat one 2-thread job on this machine). Ignored (1) under a distributed launch.
        progress: show progress bars.
        engine: override the grid's update engine: ``torch`` or ``deepspeed`` (None: keep).
        zero_stage: override the DeepSpeed ZeRO stage, 2 or 3 (None: keep).
        gradient_checkpointing: override activation checkpointing (None: keep).
        rollout_seeding: override the rollout seeding, ``batch`` or ``group`` (None: keep;
            ``group`` makes an N-process run sample what a 1-process run samples).
        rollout_backend: override the rollout engine, ``hf`` or ``vllm`` (None: keep; ``vllm``
            needs a GPU and ``pip install vllm``: a colocated engine per rank, train.vllm_backend).
        freeze_vision_tower: override whether RL leaves the vision tower out of the update
            (None: keep; the grids train it).
        reward: override the reward of every arm (:mod:`train.rewards`): a named form
            (``imagent``, ``deepeyes``) or weighted terms, e.g. ``acc:1.0,format:0.2,tool:0.5``
            (``module:function`` for a user term). None: keep the grid's (``imagent``).
            Weighted terms do not read ``tool_gain``: the ``gain0`` arm then trains as ``full``.
        tools: the tool set of every arm that advertises tools (None: the grid's, ``both``):
            comma-separated registered names and user tools as ``module:Class``, e.g.
            ``reflect,confirm,mypkg.mod:Rotate`` (:func:`agent.tools.resolve_tools`; the module
            must be importable in every process). ``tools_none`` stays without tools.
        local_rank: set by the ``deepspeed`` launcher; ignored (ranks come from the environment).
        train_data: a training source, repeatable: ``[FORMAT:]PATH[:WEIGHT]`` or
            ``generator[:WEIGHT]`` (:mod:`agent.data.sources`; README "Train on your data");
            none: the offline generator. Checked (columns, first rows' images) before the run
            directory is made.
        eval_data: a held-out source, repeatable (no weight); every row is evaluated. None:
            the grid's generated test questions.
        report_to: also log every arm's metric rows, config and sample rollouts to
            ``tensorboard``, ``wandb`` (offline) or ``mlflow`` (a file store), inside the arm's
            folder (:mod:`train.tracking`; ``pip install -e '.[track]'``, ``'.[mlflow]'``);
            ``none`` (default): the run directory only.
        eval_every: override the steps between held-out evaluations during training
            (``eval/*`` metric keys; 0: off; None: keep the grid's).
    """

    grid: str = "default"
    out: Path | None = None
    model: str | None = None
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = ()
    steps: int = 0
    workers: int = 2
    progress: bool = True
    engine: Literal["torch", "deepspeed"] | None = None
    zero_stage: Literal[2, 3] | None = None
    gradient_checkpointing: bool | None = None
    rollout_seeding: Literal["batch", "group"] | None = None
    rollout_backend: Literal["hf", "vllm"] | None = None
    freeze_vision_tower: bool | None = None
    reward: str | None = None
    preset: str | None = None
    launcher: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    num_gpus_per_arm: float = 0.0
    num_cpus_per_arm: float = 1.0
    tools: str | None = None
    local_rank: int = -1
    train_data: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    eval_data: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()

    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"
    eval_every: int | None = None

    def data_overrides(self) -> dict:
        """The :class:`DataConfig` fields this command line overrides."""
        names = ("train_data", "eval_data")
        return {n: tuple(getattr(self, n)) for n in names if getattr(self, n)}

    def grpo_overrides(self) -> dict:
        """The :class:`GRPOConfig` fields this command line overrides."""
        names = ("engine", "zero_stage", "gradient_checkpointing", "rollout_seeding",
                 "rollout_backend", "freeze_vision_tower")  # fmt: skip
        out = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.reward is not None:
            out["reward_form"] = self.reward
        return out

    def base_model(self) -> str:
        """``--model``, else the preset's model, else ``relook-tiny``.

        Raises:
            ValueError: unknown ``--preset``.
        """
        if self.model is not None:
            return self.model
        if self.preset is not None:
            from experiments.presets import get_preset

            return get_preset(self.preset).model
        return "relook-tiny"


def _quiet_transformers() -> None:
    """No per-file progress bars from ``save_pretrained``/``from_pretrained`` inside our own bars."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _versions() -> dict[str, str]:
    import numpy
    import pandas
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "platform": platform.platform(),
    }


def run_arm(
    run: Path, cfg: ArmConfig, base_model: str, progress: bool = True, slot: int = 0
) -> str:
    """Train, evaluate and measure one arm; returns its final status ("complete" or "failed").

    Exceptions are recorded in the arm's ``status.json`` (status "failed", the error message),
    never left looking complete; ``KeyboardInterrupt`` propagates after marking the arm failed.

    Under data parallelism every rank calls it: ranks > 0 only train (:func:`_train_rank`);
    an exception is recorded and then raised, since the other ranks cannot go on without
    this one (the launcher stops them; a rerun resumes from the arm's last checkpoint).
    """
    import torch

    from analysis import rundir
    from train import dist

    torch.set_num_threads(1)
    _quiet_transformers()
    if not dist.is_main():
        return _train_rank(run, cfg, base_model)
    arm = cfg.name
    rundir.start_arm(run, arm, {**asdict(cfg), "base_model": base_model})
    try:
        _run_arm_stages(run, cfg, base_model, progress)
    except KeyboardInterrupt:
        rundir.finish_arm(run, arm, "failed", "interrupted")
        raise
    except Exception as exc:  # recorded, the grid goes on with the next arm
        rundir.finish_arm(
            run, arm, "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        )
        if dist.world_size() > 1:
            raise
        return "failed"
    shutil.rmtree(run / arm / "checkpoints", ignore_errors=True)  # model/ holds the final policy
    rundir.finish_arm(run, arm, "complete")
    dist.barrier()  # ranks > 0 wait here while this one evaluates and measures
    return "complete"


def _train_rank(run: Path, cfg: ArmConfig, base_model: str) -> str:
    """A rank > 0's share of an arm: its part of the data-parallel training, then it waits
    for rank 0 to finish the arm. Writes nothing but its own checkpoint rank files."""
    from agent.modeling import load_policy
    from train import dist
    from train.loop import train

    train(
        cfg, load_policy(base_model), progress=False, checkpoint_dir=run / cfg.name / "checkpoints"
    )
    dist.barrier()
    return "complete"


def _run_arm_stages(run: Path, cfg: ArmConfig, base_model: str, progress: bool) -> None:
    from train.tracking import open_tracker

    with open_tracker(cfg, run / cfg.name, group=run.name) as tracker:  # cfg.report_to
        _arm_stages(run, cfg, base_model, progress, tracker)


def _arm_stages(run: Path, cfg: ArmConfig, base_model: str, progress: bool, tracker) -> None:
    import torch

    from agent.evaluation import evaluate
    from agent.modeling import load_policy
    from agent.rollout import Agent
    from analysis import rundir
    from experiments.attention import write_arm
    from experiments.trajectories import save_trajectories
    from train.loop import eval_samples, make_generator, train
    from train.rewards import score

    arm, folder = cfg.name, run / cfg.name
    policy = load_policy(base_model)
    rows: list[dict] = []

    def on_step(row: dict) -> None:
        rows.append(row)
        rundir.write_metrics(run, arm, rows)
        tracker.log_metrics(row)

    # Train
    rundir.set_arm_stage(run, arm, "train")
    train(cfg, policy, on_step=on_step, progress=progress, checkpoint_dir=folder / "checkpoints")
    policy.model.save_pretrained(folder / "model")
    write_weight_hashes(folder / "model")
    policy.tokenizer.save_pretrained(folder / "model")
    policy.image_processor.save_pretrained(folder / "model")
    # Evaluate on the held-out split (test backgrounds never seen in training)
    rundir.set_arm_stage(run, arm, "eval")
    test = eval_samples(cfg.data)
    eval_agent = Agent(
        policy.tokenizer, policy.image_processor, _with_temperature(cfg.agent, cfg.eval_temperature)
    )
    torch.manual_seed(cfg.grpo.seed)
    summary, _ = evaluate(eval_agent, make_generator(policy), test)
    evaluation = {
        "split": "+".join(cfg.data.eval_data) or "test",
        "model": str(folder / "model"),
        "temperature": cfg.eval_temperature,
        **summary,
    }
    rundir.write_eval(run, arm, evaluation)
    # Measure attention by replay on sampled held-out episodes, those with tool calls first
    rundir.set_arm_stage(run, arm, "attention")
    probe_agent = Agent(
        policy.tokenizer,
        policy.image_processor,
        _with_temperature(cfg.agent, cfg.measure.temperature),
    )
    probe = test[: cfg.measure.n_candidates]
    sampled, probe_trajs = evaluate(probe_agent, make_generator(policy), probe)
    rundir.write_eval(
        run, arm, {**evaluation, "sampled": {"temperature": cfg.measure.temperature, **sampled}}
    )
    order = sorted(range(len(probe_trajs)), key=lambda i: -probe_trajs[i].used)
    chosen = order[: cfg.measure.n_trajectories]
    if cfg.measure.n_single:  # single-image episodes too: Figure 1 compares both settings
        singles = _single_image_episodes(cfg, policy, probe_agent)
        chosen += range(len(probe_trajs), len(probe_trajs) + len(singles))
        probe_trajs = probe_trajs + singles
    ids = [f"{probe_trajs[i].sample_id}/g{probe_trajs[i].group}" for i in chosen]
    score(probe_trajs, cfg.grpo.reward_form, cfg.grpo.tool_gain)  # the arm's training reward
    refs = save_trajectories(run, arm, probe_trajs, with_images=set(chosen))
    _track_arm_end(tracker, cfg, evaluation, sampled, [probe_trajs[i] for i in chosen])
    if chosen:  # the same writer as ``python -m experiments.attention`` (tables + meta.json)
        write_arm(
            folder,
            policy,
            [probe_trajs[i] for i in chosen],
            ids,
            [refs[i] for i in chosen],
            chunk=cfg.measure.chunk,
            value_weighted=True,
        )


def _track_arm_end(tracker, cfg: ArmConfig, evaluation: dict, sampled: dict, trajs: list):
    """The held-out summary (greedy, and sampled as ``sampled/*``) and the first measured
    trajectories (those with tool calls first) to the arm's tracker, at the last step."""
    from train.tracking import rollout_samples

    step = cfg.grpo.steps
    tracker.log_summary({**evaluation, "sampled": sampled}, step)
    tracker.log_rollouts(rollout_samples(trajs), step)


def _single_image_episodes(cfg: ArmConfig, policy, agent) -> list:
    """``cfg.measure.n_single`` sampled episodes on single-image held-out questions (colour,
    shape or digit of one object on a test-split photograph; tools advertised as in the arm),
    for the single- versus multi-image comparison of the attention table."""
    import torch

    from agent.data.pretrain import Mix, pretrain_example
    from agent.evaluation import evaluate
    from agent.tools import ImageFrame
    from train.loop import make_generator, task_config

    frame = ImageFrame.from_processor(policy.image_processor)
    mix, tasks = Mix.only("colour", "shape", "digit"), task_config(cfg.data)
    samples = [
        pretrain_example(i, cfg.data.test_seed, tasks, frame, mix, split="test").sample
        for i in range(cfg.measure.n_single)
    ]
    torch.manual_seed(cfg.grpo.seed)
    return evaluate(agent, make_generator(policy), samples)[1]


def _with_temperature(agent_cfg, temperature: float):
    from dataclasses import replace

    return replace(agent_cfg, temperature=temperature)


def _base_model(run: Path, model: str, warmup_cfg, progress: bool = True) -> str:
    """The base checkpoint every arm starts from.

    With a checkpoint (or ``relook-tiny``), that checkpoint (already checked to load by
    :func:`main`). With ``random``, a tiny Qwen2.5-VL is built from random weights and given the format warm-up
    (:mod:`train.warmup`: turn format and tool-call syntax with random answers, no task
    knowledge), then saved to ``<run>/base_model``; an existing one is reused on resume.
    """
    from agent.modeling import build_tiny_model, load_policy, resolve_model

    if model != RANDOM_MODEL:
        return resolve_model(model)
    base = run / "base_model"
    if not (base / "relook_warmup.json").is_file():
        from train.warmup import warmup

        print(
            "--model random: building a tiny Qwen2.5-VL from random weights + format warm-up (no task knowledge)."
        )
        build_tiny_model(base, seed=0)
        policy = load_policy(base)
        losses = warmup(policy, warmup_cfg, progress=progress)
        policy.model.save_pretrained(base)
        write_weight_hashes(base)
        record = {**asdict(warmup_cfg), "loss_first": losses[0], "loss_last": losses[-1]}
        atomic_write_json(base / "relook_warmup.json", record)
    return str(base)


def summary_table(run: Path) -> str:
    """A text table of every arm: status, final reward, held-out accuracy, tool use, attention."""
    import pandas as pd

    from analysis import rundir
    from analysis.events import before_after
    from analysis.metrics import image_share_curve

    arms = rundir.list_arms(run)
    metrics = rundir.load_metrics(run)
    evals = rundir.load_eval(run)
    rows = []
    for arm in arms["arm"]:
        m = metrics[metrics["arm"] == arm] if len(metrics) else metrics
        e = evals[evals["arm"] == arm] if len(evals) else evals
        att = rundir.load_attention(run, arm)
        ev = rundir.load_attention_events(run, arm)
        ba = before_after(att, ev) if len(att) and len(ev) else pd.DataFrame()
        curve = image_share_curve(att) if len(att) else pd.DataFrame()
        rows.append(
            {
                "arm": arm,
                "status": arms.loc[arms["arm"] == arm, "status"].iloc[0],
                "reward(last3)": m["rollout/reward_mean"].tail(3).mean()
                if len(m)
                else float("nan"),
                "test_acc": _first(e, "accuracy"),
                "tool_rate": _first(e, "tool_call_rate"),
                "tool_rate(T=1)": _first(e, "sampled/tool_call_rate"),
                "image_share": curve["image_share"].mean() if len(curve) else float("nan"),
                "img_before": ba["before"].mean() if len(ba) else float("nan"),
                "img_after": ba["after"].mean() if len(ba) else float("nan"),
            }
        )
    return pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}")


def seed_table(run: Path) -> str:
    """Per arm (seeds pooled): held-out accuracy mean, min and max over seeds, and the mean
    greedy and sampled tool-call rates; the spread every comparison between arms needs."""
    import pandas as pd

    from analysis import rundir
    from analysis.arms import arm_type

    evals = rundir.load_eval(run)
    if evals.empty:
        return "(no evaluations)"
    evals = evals.assign(arm_type=evals["arm"].map(arm_type))
    cols = [c for c in ("tool_call_rate", "sampled/tool_call_rate") if c in evals]
    table = evals.groupby("arm_type", sort=False).agg(
        seeds=("arm", "count"),
        acc_mean=("accuracy", "mean"),
        acc_min=("accuracy", "min"),
        acc_max=("accuracy", "max"),
        **{c.replace("sampled/", "T1_"): (c, "mean") for c in cols},
    )
    return pd.DataFrame(table).to_string(float_format=lambda v: f"{v:.3f}")


def _first(df, column: str) -> float:
    return float(df[column].iloc[0]) if len(df) and column in df else float("nan")


def main(args: AblateArgs) -> Path:
    """Run the grid; returns the run directory. Under a distributed launch (``WORLD_SIZE`` >
    1; module docstring) every rank runs this, and only rank 0 writes and reports."""
    from train import dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _quiet_transformers()
    args = replace(args, model=args.base_model(), out=args.out or _default_out(args.grid))
    check_reward(args.reward)  # before the grid's configs, which would name the field instead
    configs = grid_arms(
        args.grid, args.seeds, args.arms, args.model, args.steps, args.grpo_overrides(),
        args.preset, args.data_overrides(), args.tools,
    )  # fmt: skip
    configs = [_tracked(c, args) for c in configs]
    check_args(args)
    distributed = dist.init_from_env()
    if distributed and args.launcher != "local":
        raise ValueError(
            f"--launcher {args.launcher} cannot run under a distributed launch "
            "(torchrun/deepspeed): arms then run one at a time over all processes"
        )
    if args.launcher == "ray":
        from experiments.launch import require_ray

        require_ray()  # fail before a run directory is made
    if distributed:
        for cfg in configs:
            dist.shard(cfg.grpo.prompts_per_step)  # fail early (every rank) if it cannot split
        if not dist.is_main():
            return _follow(configs, args)
        if args.workers > 1:
            print(f"distributed launch ({dist.world_size()} processes): arms run one at a time")
    return _lead(configs, args)


def _follow(configs: list[ArmConfig], args: AblateArgs) -> Path:
    """A rank > 0: train the arms rank 0 names, in its order."""
    from train import dist

    run, base, todo = dist.broadcast_object(None)
    for cfg in configs:
        if cfg.name in todo:
            run_arm(run, cfg, base, progress=False)
    dist.barrier()
    return run


def check_args(args: AblateArgs) -> None:
    """Reject impossible options before any work and before a run directory is made.

    Raises:
        ValueError: ``--workers`` < 1, no or negative ``--seeds``, or a ``--reward`` naming
            an unknown term (``--steps`` < 0 is refused by the grid's :class:`GRPOConfig`).
        FileNotFoundError / ValueError: a ``--train-data`` / ``--eval-data`` source that is
            missing, lacks a column or has an unreadable first row (:func:`check_data`).
        RunDirError: ``--out`` cannot be this grid's run directory
            (:func:`analysis.rundir.check_run_root`: a file, under a file, another folder,
            another grid, not writable).
        ImportError: ``--report-to``'s library is not installed (the message names the extra).
    """
    from analysis import rundir
    from train.tracking import require

    check_reward(args.reward)
    require(args.report_to)  # a missing tracker library fails first, naming its pip extra
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1 (arms trained at once), got {args.workers}")
    if not args.seeds or min(args.seeds) < 0:
        raise ValueError(f"--seeds must be one or more integers >= 0, got {list(args.seeds)}")
    check_data(args)
    rundir.check_run_root(args.out, args.grid)


def check_reward(reward: str | None) -> None:
    """Reject a ``--reward`` naming an unknown term or verifier (None: the grid's reward).

    Raises:
        ValueError: the message names the flag and the unknown name.
    """
    from train.rewards import parse_reward

    if reward is None:
        return
    try:
        parse_reward(reward)
    except ValueError as err:
        raise ValueError(f"--reward {reward!r}: {err}") from None


def check_data(args: AblateArgs) -> None:
    """Open every ``--train-data`` and ``--eval-data`` source and decode its first rows, so
    that a missing file, column or image stops the command before anything is written."""
    from agent.data.sources import check_sources

    check_sources(args.train_data)
    check_sources(args.eval_data, weights_allowed=False)


def _tracked(cfg: ArmConfig, args: AblateArgs) -> ArmConfig:
    """``cfg`` with ``--report-to`` and ``--eval-every`` applied."""
    cfg = replace(cfg, report_to=args.report_to)
    if args.eval_every is not None:
        cfg = replace(cfg, eval=replace(cfg.eval, every=args.eval_every))
    return cfg


def _default_out(grid: str) -> Path:
    return Path("runs") / f"ablate-{grid}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _lead(configs: list[ArmConfig], args: AblateArgs) -> Path:
    """Rank 0 (or the only process): lock, create or resume the run directory, run the arms."""
    if args.model != RANDOM_MODEL:
        from agent.modeling import load_policy

        load_policy(args.model)  # fail early, naming the directory, before anything is written
    from analysis import rundir
    from experiments.launch import sigterm_as_interrupt

    with rundir.lock_run(args.out) as run:  # a second ablate on this folder is refused
        _recover_stale(run)
        run = rundir.create_run(
            run, args.grid, [c.name for c in configs], list(args.seeds), _versions()
        )
        _link_latest(run)
        with sigterm_as_interrupt():
            return _lead_run(run, configs, args)


def _recover_stale(run: Path) -> None:
    """Under the lock: arms left "running" by a process that is gone (SIGKILL, power loss)
    are marked failed and the run incomplete, before the resume restarts them."""
    from analysis import rundir

    try:
        stale = rundir.load_manifest(run).get("status") == "running"
        stale |= bool((rundir.list_arms(run)["status"] == "running").any())
    except rundir.RunDirError:
        return  # a new run
    if stale:
        flipped = rundir.mark_interrupted(run, "interrupted: its process was gone at resume")
        print(f"{run}: left running by a process that is gone; arms {flipped} marked failed, "
              "run incomplete")  # fmt: skip


def _lead_run(run: Path, configs: list[ArmConfig], args: AblateArgs) -> Path:
    from analysis import rundir
    from train import dist

    t0 = time.perf_counter()
    try:
        base = _base_model(run, args.model, GRIDS[args.grid]["warmup"], args.progress)
        done = set(rundir.list_arms(run).query("status == 'complete'")["arm"])
        todo = [c for c in configs if c.name not in done]
        if done:
            print(f"resuming {run}: skipping complete arms {sorted(done)}")
        if dist.world_size() > 1:
            dist.broadcast_object((run, base, [c.name for c in todo]))
        _run_all(run, todo, base, args)
        dist.barrier()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (launch.Terminated)
        flipped = rundir.mark_interrupted(run)
        print(f"\ninterrupted: {run} marked incomplete (arms {flipped})", file=sys.stderr)
        raise SystemExit(getattr(exc, "exit_code", 130)) from None
    except Exception:
        rundir.mark_interrupted(run)  # never leave a run looking as if it were still going
        raise
    status = rundir.finish_run(run)
    print(f"\nrun directory: {run}  (status: {status}, {time.perf_counter() - t0:.0f} s)")
    print(summary_table(run))
    print("\nper arm over seeds (held-out accuracy):")
    print(seed_table(run))
    print(f"\nopen it: relook-app --run {run}   (or: python -m apps.launch --run {run})")
    return run


def _run_all(run: Path, todo: list[ArmConfig], base: str, args: AblateArgs) -> None:
    """Run the arms with ``--launcher`` (:mod:`experiments.launch`); in order under a
    distributed launch (every rank takes part in every arm)."""
    from experiments import launch
    from train import dist

    arm_fn = launch_target()
    if dist.world_size() > 1:
        launch.run_arms(run, todo, base, arm_fn, None, args.progress)
        return
    executor = launch.make_executor(
        args.launcher, args.workers, args.ray_address, args.num_gpus_per_arm,
        args.num_cpus_per_arm, len(todo),
    )  # fmt: skip
    try:
        launch.run_arms(run, todo, base, arm_fn, executor, args.progress)
    except BaseException:  # interrupted or failed: no worker may go on writing arms
        launch.stop_executor(executor, kill=True)
        raise
    launch.stop_executor(executor)


def launch_target():
    """:func:`run_arm` as imported from ``experiments.ablate``, also when this file runs as
    ``__main__``: Ray and spawned workers then import it by that name."""
    from experiments.ablate import run_arm as arm_fn

    return arm_fn


def _link_latest(run: Path) -> None:
    latest = run.parent / "latest"
    try:
        if latest.is_symlink() or not latest.exists():
            tmp = run.parent / f".latest-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(run.name)
            os.replace(tmp, latest)
    except OSError:
        pass  # a link is a convenience only


if __name__ == "__main__":
    from experiments.cli import run_cli

    run_cli(main, AblateArgs)
