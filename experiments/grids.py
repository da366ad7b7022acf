"""Ablation grids: named lists of arms (docs/method.md §3-5 switches), each a full :class:`ArmConfig`.

The default grid has five arms per seed: ``base`` (no training: the reference the others
start from), ``full`` (tools both, both masks, gain 0.5),
``tools_none`` (no tools, single turn), ``masks_off`` (neither mask) and ``gain0`` (no tool-use
reward gain). ``smoke`` runs the same arms for 2 steps on a handful of questions (CI). ``warmup``
is the format warm-up of the untrained tiny base model (``--model random`` only).
"""

from __future__ import annotations

from dataclasses import replace

from agent.rollout import AgentConfig
from train.config import ArmConfig, DataConfig, EvalConfig, GRPOConfig, MeasureConfig
from train.warmup import WarmupConfig

ARM_SWITCHES = {
    "base": {"steps": 0},  # no RL: the base model evaluated and measured as is
    "full": {},
    "tools_none": {"tools": "none"},
    "masks_off": {"mask_tokens": False, "mask_trajectories": False},
    "gain0": {"tool_gain": 0.0},
}

GRIDS = {
    # relook-tiny: 2-6 minutes per arm on one core; two arms run side by side. lr 2e-4: 5e-4
    # extinguished tool calls within 3 steps, 1e-4 barely moved the policy in 20 steps (approx
    # KL ~1e-5 per update)
    "default": dict(
        grpo=GRPOConfig(steps=60, prompts_per_step=4, group_size=8, mini_batches=2, lr=2e-4),
        # 384 held-out questions: standard error ~0.024 at accuracy 0.3 (96 gave ~0.047, and
        # relook-tiny v3 scored 0.354 on those 96 and 0.28 on 200 others), ~25 s per arm
        data=DataConfig(n_test=384),
        measure=MeasureConfig(n_trajectories=8, n_candidates=32, n_single=8),
        agent=AgentConfig(max_new_tokens=40, max_turns=4),
        # held-out accuracy during training (eval/* rows, the app's curves): 32 greedy
        # questions after steps 20, 40, 60 (0.8 s each on relook-tiny, one core)
        eval=EvalConfig(every=20, n=32),
        warmup=WarmupConfig(steps=200),
    ),
    # the same arms, 2 steps, tiny eval: CI and a first look (< 3 minutes for all arms)
    "smoke": dict(
        grpo=GRPOConfig(steps=2, prompts_per_step=2, group_size=2, mini_batches=1, lr=5e-4),
        data=DataConfig(n_test=4),
        measure=MeasureConfig(n_trajectories=2, n_candidates=4, n_single=1),
        agent=AgentConfig(max_new_tokens=24, max_turns=3),
        warmup=WarmupConfig(steps=10),
    ),
}


def arm_config(
    base: dict, arm: str, seed: int, model: str = "", tools: str | None = None
) -> ArmConfig:
    """The :class:`ArmConfig` of arm ``arm`` (a key of :data:`ARM_SWITCHES`) at ``seed``;
    ``tools`` (an :attr:`AgentConfig.tools` value) replaces the tool set of an arm that
    advertises tools (``tools_none`` stays without).

    Raises:
        ValueError: unknown arm name.
    """
    if arm not in ARM_SWITCHES:
        raise ValueError(f"unknown arm {arm!r}; known: {sorted(ARM_SWITCHES)}")
    sw = ARM_SWITCHES[arm]
    agent = replace(base["agent"], **{k: v for k, v in sw.items() if k == "tools"})
    if tools is not None and agent.tools != "none":
        agent = replace(agent, tools=tools)
    grpo = replace(base["grpo"], seed=seed, **{k: v for k, v in sw.items() if k != "tools"})
    return ArmConfig(
        name=f"{arm}-s{seed}",
        model=model,
        agent=agent,
        grpo=grpo,
        data=base["data"],
        measure=base["measure"],
        eval=base.get("eval", EvalConfig()),  # smoke: off (CI time)
    )


def grid_arms(
    grid: str,
    seeds: tuple[int, ...],
    arms: tuple[str, ...] = (),
    model: str = "",
    steps: int = 0,
    grpo: dict | None = None,
    preset: str | None = None,
    data: dict | None = None,
    tools: str | None = None,
) -> list[ArmConfig]:
    """All arm configs of ``grid`` for ``seeds`` (optionally only ``arms``, or ``steps`` and
    other :class:`GRPOConfig` fields (``grpo``, e.g. ``{"engine": "deepspeed"}``) or
    :class:`DataConfig` fields (``data``, e.g. ``{"train_data": ("a.jsonl",)}``) overridden).

    ``preset`` (a key of :data:`experiments.presets.PRESETS`) is applied on top of the grid
    and below ``steps`` and ``grpo``, which always win. ``tools`` replaces the tool set of
    every arm that advertises tools (:func:`arm_config`).

    Raises:
        ValueError: unknown grid, arm or preset names, or an invalid override.
    """
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; known: {sorted(GRIDS)}")
    base = dict(GRIDS[grid])
    if preset:
        from experiments.presets import apply_preset

        base = apply_preset(base, preset)
    if steps:
        base["grpo"] = replace(base["grpo"], steps=steps)
    if grpo:
        base["grpo"] = replace(base["grpo"], **grpo)
    if data:
        base["data"] = replace(base["data"], **data)
    names = arms or tuple(ARM_SWITCHES)
    return [arm_config(base, a, s, model, tools) for s in seeds for a in names]
