"""Scale presets: valid configs with the cited values; command-line flags win; bad names fail."""

from __future__ import annotations

import pytest
import tyro

from experiments import ablate
from experiments.grids import GRIDS, grid_arms
from experiments.presets import PRESETS, Preset, apply_preset, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("use_vllm", [False, True])
def test_presets_resolve_to_valid_configs(name, use_vllm):
    """Every preset on every grid gives configs that pass validation, with its values set."""
    preset = get_preset(name)
    for grid in GRIDS:
        base = apply_preset(GRIDS[grid], name, use_vllm=use_vllm)
        g, agent = base["grpo"], base["agent"]
        assert {k: getattr(g, k) for k in preset.grpo} == preset.grpo
        assert {k: getattr(agent, k) for k in preset.agent} == preset.agent
        assert base["data"] is GRIDS[grid]["data"]  # untouched
        assert g.rollout_backend == ("vllm" if use_vllm else "hf")
        assert (g.tis_cap > 0) is use_vllm
    # the values the module docstring cites (DeepEyes recipe, docs/method.md)
    g = apply_preset(GRIDS["default"], name, use_vllm=False)["grpo"]
    assert (g.lr, g.beta, g.prompts_per_step, g.group_size, g.mini_batches) == (
        1e-6, 0.0, 256, 8, 1,
    )  # fmt: skip
    assert g.engine == "deepspeed" and g.gradient_checkpointing


def test_preset_sizes_differ_where_the_model_size_matters():
    seven, three = get_preset("qwen2.5-vl-7b"), get_preset("qwen2.5-vl-3b")
    assert seven.model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert three.model == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert (seven.grpo["zero_stage"], three.grpo["zero_stage"]) == (3, 2)
    assert seven.grpo["micro_batch"] < three.grpo["micro_batch"]


def test_command_line_flags_win_over_the_preset():
    argv = ["--preset", "qwen2.5-vl-7b", "--engine", "torch", "--steps", "3", "--arms", "full"]
    args = tyro.cli(ablate.AblateArgs, args=[*argv, "--gradient-checkpointing", "False"])
    (cfg,) = grid_arms(
        "smoke", (0,), args.arms, args.base_model(), args.steps, args.grpo_overrides(),
        args.preset,
    )  # fmt: skip
    assert (cfg.grpo.engine, cfg.grpo.steps, cfg.grpo.gradient_checkpointing) == ("torch", 3, False)
    assert cfg.grpo.lr == 1e-6 and cfg.agent.max_turns == 5  # the rest is the preset's
    assert cfg.model == "Qwen/Qwen2.5-VL-7B-Instruct"  # the preset's model by default
    explicit = tyro.cli(ablate.AblateArgs, args=["--preset", "qwen2.5-vl-7b", "--model", "/m"])
    assert explicit.base_model() == "/m"
    assert tyro.cli(ablate.AblateArgs, args=[]).base_model() == "relook-tiny"


def test_arm_switches_apply_on_top_of_the_preset():
    cfgs = {
        c.name: c
        for c in grid_arms("smoke", (0,), ("full", "gain0", "tools_none"), preset="qwen2.5-vl-3b")
    }
    assert cfgs["gain0-s0"].grpo.tool_gain == 0.0 and cfgs["full-s0"].grpo.tool_gain == 0.5
    assert cfgs["tools_none-s0"].agent.tools == "none"
    assert cfgs["tools_none-s0"].agent.max_new_tokens == 10240


def test_unknown_preset_names_a_clear_error(monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"unknown preset 'qwen9'; known presets: \['qwen2.5"):
        grid_arms("smoke", (0,), preset="qwen9")
    from experiments.cli import run_cli

    monkeypatch.setattr("sys.argv", ["ablate", "--grid", "smoke", "--preset", "qwen9"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ablate.main, ablate.AblateArgs)
    assert exit_info.value.code == 2
    assert "error: unknown preset 'qwen9'" in capsys.readouterr().err


def test_preset_fields_are_checked():
    with pytest.raises(ValueError, match=r"Preset.grpo: unknown GRPOConfig field\(s\) \['lrr'\]"):
        Preset(model="m", grpo={"lrr": 1.0})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_worst_case_trajectory_fits_the_context(name):
    """The preset's own budgets, not only the model's context: the prompt's text (relook's
    longest system turn, question and observations, measured on relook-tiny's tokenizer, x4
    for headroom), every image of the budget and one full turn fit ``max_total_tokens``
    (28,672), and vLLM's ``max_model_len`` (38,912) fits the model's positions."""
    from agent.modeling import load_policy
    from agent.prompting import FORMAT_WITH_TOOLS, system_text
    from agent.tools import resolve_tools
    from experiments.presets import worst_case_tokens

    preset = get_preset(name)
    agent = apply_preset(GRIDS["default"], name, use_vllm=False)["agent"]
    assert agent.crop_policy == "native"  # DeepEyes' native-resolution crop
    tok = load_policy("relook-tiny").tokenizer
    text = system_text(resolve_tools("both")) + FORMAT_WITH_TOOLS + "Which image? " * 20
    obs = "<tool_response>\nHere is the zoomed region of Image 2.\nImage 2 (confirm): </tool_response>"
    prompt = 4 * len(tok.encode(text + agent.max_turns * obs))
    b = worst_case_tokens(agent, preset, prompt)
    print(f"{name}: {b}")
    # after the whole image budget (12 x 1,280 tokens), one full turn still fits the
    # trajectory budget, so an episode that zoomed to its limit can answer
    assert b["image_tokens"] == agent.max_images * agent.max_pixels // 28**2
    assert b["answer_turn"] <= agent.max_total_tokens == 28672
    # vLLM's max_model_len (trajectory budget + one turn) within the model's positions
    assert b["engine_len"] == 28672 + 10240 <= preset.context
    assert agent.max_image_tokens >= b["image_tokens"]  # max_images binds first
