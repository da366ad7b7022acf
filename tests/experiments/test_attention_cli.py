"""``python -m experiments.attention`` on saved trajectories: tables, meta.json, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from agent.data.tasks import Sample
from agent.rollout import Agent, AgentConfig, rollout
from analysis import rundir
from experiments import attention as att_cli
from experiments.trajectories import save_trajectories

CALL_CONFIRM = '<think>zoom</think><tool_call>{"name": "confirm", "arguments": {"image": 2, "bbox_2d": [8, 8, 40, 40]}}</tool_call>'
CALL_REFLECT = '<think>again</think><tool_call>{"name": "reflect", "arguments": {"images": [1, 3]}}</tool_call>'
ANSWER = "<think>it is two</think><answer>2</answer>"


def _sample(i: int) -> Sample:
    images = tuple(
        Image.new("RGB", (224 - 56 * (k % 2), 168), (40 * k + i, 90, 200 - 30 * k))
        for k in range(3)
    )
    return Sample(
        id=f"test-0-{i:06d}", split="test", family="find", images=images, question="Which image contains the red square?",
        answer="2", answer_type="index", target_image=2, target_bbox=(10, 10, 30, 30), meta={},
    )  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_dir):
    """An arm folder with 3 trajectories (two with confirm + reflect calls), images saved for 2."""
    from agent.modeling import load_policy
    from tests.conftest import ScriptedGenerator

    policy = load_policy(tiny_dir)
    agent = Agent(policy.tokenizer, policy.image_processor, AgentConfig(tools="both", max_turns=4))
    scripts = [[CALL_CONFIRM, CALL_REFLECT, ANSWER], [ANSWER], [CALL_REFLECT, ANSWER]]
    gen = ScriptedGenerator(policy.tokenizer, scripts)
    trajs = rollout(agent, gen, [_sample(i) for i in range(3)], group_size=1)
    run = tmp_path_factory.mktemp("run")
    save_trajectories(run, "full-s0", trajs, with_images={0, 1})
    return policy, trajs, run


def test_cli_tables_equal_in_memory_replay_and_meta_records_provenance(saved, tiny_dir, tmp_path):
    policy, trajs, run = saved
    out = tmp_path / "out"
    args = att_cli.AttentionArgs(
        trajectories=run, out=out, model=str(tiny_dir), progress=False, value_weighted=True
    )
    summary = att_cli.main(args)
    att = pd.read_parquet(out / "full-s0" / rundir.ATTENTION)
    ids = [f"{t.sample_id}/g{t.group}" for t in trajs[:2]]
    ref, ref_ev = att_cli.measure(policy, trajs[:2], ids, value_weighted=True)
    pd.testing.assert_frame_equal(
        att.drop(columns="region").reset_index(drop=True),
        ref.drop(columns="region").astype(att.drop(columns="region").dtypes.to_dict()),
        check_exact=False,
        atol=1e-6,
    )
    assert att["region"].astype(str).tolist() == ref["region"].astype(str).tolist()
    events = pd.read_parquet(out / "full-s0" / rundir.EVENTS)
    assert events["tool"].tolist() == ["confirm", "reflect"] and events["ok"].all()
    meta = json.loads((out / "full-s0" / "meta.json").read_text())
    assert meta["n_trajectories"] == 2 and meta["skipped_without_images"] == 1
    assert meta["attention_backend"] == "sdpa" and meta["versions"]["nnsight"]
    first = meta["trajectories"][ids[0]]
    assert [im["origin"] for im in first["images"]] == ["input"] * 3 + ["confirm"] + ["reflect"] * 2
    confirm = first["images"][3]
    assert confirm["call"] == 0 and confirm["source"] == 2 and len(confirm["bbox"]) == 4
    assert first["images"][4]["call"] == 1 and first["images"][4]["source"] == 1
    assert [e["tool"] for e in first["tool_events"]] == ["confirm", "reflect"]
    assert first["region_tokens"]["image:4"] == trajs[0].images[3].n_tokens(2)
    assert first["generated"] == sum(trajs[0].response_mask)
    spans = first["spans"]
    assert spans[0] == ["sink", 0, 1] and spans[-1][2] == first["positions"]
    assert all(a[2] == b[1] for a, b in zip(spans, spans[1:]))  # contiguous runs
    image4 = [s for s in spans if s[0] == "image:4"]
    assert len(image4) == 1 and image4[0][2] - image4[0][1] == first["region_tokens"]["image:4"]
    assert summary["full-s0"]["trajectories"] == 2 and summary["full-s0"]["tool_calls"] == 2


def _corrupt(run, tmp_path, edit) -> tuple:
    records = rundir.load_trajectories(run, "full-s0")
    edit(records[0])
    arm = tmp_path / "bad" / "full-s0"
    arm.mkdir(parents=True)
    (arm / "images").symlink_to(run / "full-s0" / "images")
    (arm / rundir.TRAJECTORIES).write_text("".join(json.dumps(r) + "\n" for r in records))
    return arm


def test_image_token_count_and_grid_mismatch_name_the_trajectory(saved, tiny_dir, tmp_path):
    _, trajs, run = saved
    pad = 1 + max(trajs[0].token_ids)  # any id: replaced below by the real image_pad id
    from analysis.spans import SpecialIds

    special = SpecialIds.from_tokenizer(saved[0].tokenizer)
    del pad

    def drop_one_pad(r):
        i = r["token_ids"].index(special.image_pad)
        del r["token_ids"][i], r["response_mask"][i]

    arm = _corrupt(run, tmp_path / "a", drop_one_pad)
    args = att_cli.AttentionArgs(
        trajectories=arm, out=tmp_path / "o1", model=str(tiny_dir), progress=False
    )
    with pytest.raises(
        ValueError, match=r"trajectory test-0-000000/g0: image 1 has 11 image_pad tokens"
    ):
        att_cli.main(args)
    assert not (tmp_path / "o1" / "full-s0" / "meta.json").exists()

    def wrong_grid(r):
        r["images"][1]["grid_thw"] = [1, 4, 4]

    arm = _corrupt(run, tmp_path / "b", wrong_grid)
    args = att_cli.AttentionArgs(
        trajectories=arm, out=tmp_path / "o2", model=str(tiny_dir), progress=False
    )
    with pytest.raises(
        ValueError, match=r"trajectory test-0-000000/g0: image 2 .* processes to grid"
    ):
        att_cli.main(args)


def test_command_line_errors_exit_2_with_the_name(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.attention",
            "--trajectories",
            str(missing),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and f"--trajectories {missing}: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_auto_model_is_the_arms_own_policy(saved, tiny_dir, tmp_path):
    import shutil

    _, _, run = saved
    arm = tmp_path / "run" / "full-s0"
    shutil.copytree(run / "full-s0", arm)
    shutil.copytree(tiny_dir, arm / "model")
    att_cli.main(att_cli.AttentionArgs(trajectories=arm, out=tmp_path / "o", progress=False))
    meta = json.loads((tmp_path / "o" / "full-s0" / "meta.json").read_text())
    assert meta["model"] == str(arm / "model") and meta["n_trajectories"] == 2
