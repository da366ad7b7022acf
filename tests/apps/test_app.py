"""The Streamlit app run headless with AppTest: every page and control, over a synthetic run
directory (tests/analysis/test_rundir.py::build_run plus trajectories with token ids, images and
a tokenizer), and the error paths (missing, partial and corrupt run directories)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from analysis import arms, rundir
from tests.analysis.test_rundir import ARMS, build_run

APP = str(Path(__file__).resolve().parents[2] / "apps" / "relook_app.py")
WORDS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
WORDS += ["system", "user", "look", "at", "<tool_call>", "reflect", "<answer>", "3", "[UNK]"]


def make_tokenizer(path: Path) -> dict[str, int]:
    """A word-level tokenizer.json whose pieces decode to the words above."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.add_special_tokens(WORDS[:5])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return vocab


def make_record(tid: str, v: dict[str, int]) -> dict:
    """A trajectory: prompt with image 1 (pos 0-19), a reflect call (20-22), its observation
    with image 2 (23-31), an answer (32-34). Six generated tokens: attention tokens 0-5."""
    image = [v["<|vision_start|>"], *[v["<|image_pad|>"]] * 4, v["<|vision_end|>"]]
    prompt = [v["<|im_start|>"], v["system"], v["look"], v["at"], v["user"], v["look"]]
    prompt += image + [v["at"]] * 8
    call = [v["<tool_call>"], v["reflect"], v["<|im_end|>"]]
    obs = [v["<|im_start|>"], v["user"], *image, v["<|im_end|>"]]
    answer = [v["<answer>"], v["3"], v["<|im_end|>"]]
    ids = prompt + call + obs + answer
    mask = [0] * 20 + [1] * 3 + [0] * 9 + [1] * 3
    events = [
        dict(turn=0, kind="tool_call", start=20, end=23, text="<tool_call>reflect", tool="reflect",
             ok=True, error=None, arguments={"images": [1]}, obs_start=23, obs_end=32, images=[1]),
        dict(turn=1, kind="answer", start=32, end=35, text="<answer>3", tool=None, ok=False,
             error=None, arguments=None, obs_start=None, obs_end=None, images=[]),
    ]  # fmt: skip
    images = [
        dict(ref=f"images/{tid}_0.png", origin="input", source=1, call=None, bbox=None),
        dict(ref=f"images/{tid}_1.png", origin="confirm", source=1, call=0, bbox=[2, 3, 12, 14]),
    ]
    return dict(id=tid, family="count", gold="3", answer="3", reward=1.0, token_ids=ids,
                prompt_len=20, response_mask=mask, images=images, events=events,
                flags={"truncated": False})  # fmt: skip


def add_trajectories(run: Path, arm: str = "full-s0") -> Path:
    """Give ``arm`` viewable trajectories t0, t1 (the ids of its attention table)."""
    folder = run / arm
    vocab = make_tokenizer(folder / "model" / "tokenizer.json")
    (folder / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for tid in ("t0", "t1"):
        for k, size in enumerate([(24, 20), (10, 11)]):
            pixels = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "images" / f"{tid}_{k}.png")
    rundir.write_trajectories(run, arm, [make_record(t, vocab) for t in ("t0", "t1")])
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return add_trajectories(build_run(tmp_path_factory.mktemp("runs") / "run1"))


def _charts(at: AppTest) -> dict[str, dict]:
    """Plotly figures of the page by chart key (the key is the tail of the element id)."""
    return {e.proto.id.split("-", 2)[-1]: json.loads(e.proto.spec) for e in at.get("plotly_chart")}


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def _arr(value) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array {"dtype", "bdata" (base64)[, "shape"]}."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return flat.reshape([int(n) for n in str(shape).split(",")]) if shape else flat
    return np.asarray(value)


def _names(fig: dict) -> list[str]:
    return [t.get("name") for t in fig["data"]]


def _app(monkeypatch, path: Path | str, page: str | None = None) -> AppTest:
    monkeypatch.setenv("RELOOK_RUN", str(path))
    monkeypatch.setattr("sys.argv", ["relook_app.py"])
    at = AppTest.from_file(APP, default_timeout=60).run()
    if page:
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


def _ok(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, at.exception
    assert not at.error, _texts(at.error)
    return at


def _downloads(at: AppTest) -> set[str]:
    return {e.proto.id.split("-", 2)[-1] for e in at.get("download_button")}


# Training page (the default)


def test_training_page_panels_and_downloads(run, monkeypatch):
    at = _app(monkeypatch, run)
    assert not at.error, _texts(at.error)
    charts = _charts(at)
    panels = ["curve::rollout/reward_mean", "curve::rollout/acc_mean", "curve::actor/kl"]
    assert list(charts) == [*panels, "curve::any", "compare"]
    names = _names(charts["curve::rollout/reward_mean"])
    assert names == ["full max", "full min", "full (mean of 2 seeds)", "tools_none-s0"]
    assert charts["curve::actor/kl"]["layout"]["title"]["text"] == "KL: actor/kl"
    assert {f"csv::{k}" for k in charts} <= _downloads(at)
    assert {f"png::{k}" for k in panels} <= _downloads(at)  # analysis.figures builders
    # The free metric defaults to the reward; the comparison shows one bar per arm base.
    assert charts["curve::any"]["layout"]["title"]["text"] == "rollout/reward_mean"
    assert list(_arr(charts["compare"]["data"][0]["x"])) == ["full", "tools_none"]


def test_training_controls(run, monkeypatch):
    at = _app(monkeypatch, run)
    raw = rundir.load_metrics(run)
    name = run.name
    at.multiselect(key=f"panels::{name}").set_value(["KL"])
    at.slider(key="smooth").set_value(3)
    _ok(at)
    assert list(_charts(at)) == ["curve::actor/kl", "curve::any", "compare"]
    # Smoothing: the single-seed arm's line is the trailing 3-step mean of its raw values.
    kl = _charts(at)["curve::actor/kl"]["data"][-1]
    expected = raw[raw["arm"] == "tools_none-s0"]["actor/kl"].rolling(3, min_periods=1).mean()
    np.testing.assert_allclose(_arr(kl["y"]), expected.to_numpy())
    at.selectbox(key=f"metric::{name}").select("actor/kl")
    at.number_input(key="last").set_value(2)
    _ok(at)
    charts = _charts(at)
    assert charts["curve::any"]["layout"]["title"]["text"] == "actor/kl"
    bar = {k: _arr(charts["compare"]["data"][0][k]) for k in ("x", "y")}
    last2 = raw.groupby("arm").tail(2).groupby("arm")["actor/kl"].mean()
    assert bar["y"][1] == pytest.approx(last2["tools_none-s0"])
    assert bar["y"][0] == pytest.approx(last2[["full-s0", "full-s1"]].mean())
    at.multiselect(key=f"arms::{run}::").set_value(["tools_none-s0"])
    _ok(at)
    assert _names(_charts(at)["curve::actor/kl"]) == ["tools_none-s0"]


def test_training_page_draws_eval_accuracy_per_arm(monkeypatch, tmp_path):
    """With ``eval/*`` columns (EvalConfig.every > 0: values on evaluated steps, NaN between),
    the held-out accuracy panel draws a line per arm over the evaluated steps only."""
    run = build_run(tmp_path / "run")
    for arm in ARMS:
        m = rundir.load_metrics(run, [arm]).drop(columns="arm")
        evaluated = m["step"] % 2 == 1
        m["eval/acc"] = np.where(evaluated, 0.1 * m["step"], np.nan)
        m["eval/acc/count"] = np.where(evaluated, 0.5, np.nan)
        rundir.write_metrics(run, arm, m)
    charts = _charts(_app(monkeypatch, run))
    fig = charts["curve::eval/acc"]
    assert fig["layout"]["title"]["text"] == "Held-out accuracy: eval/acc"
    assert _names(fig) == ["full max", "full min", "full (mean of 2 seeds)", "tools_none-s0"]
    line = fig["data"][-1]
    assert list(_arr(line["x"])) == [1, 3]
    np.testing.assert_allclose(_arr(line["y"]), [0.1, 0.3])
    assert "curve::eval/acc/count" in charts


def test_compare_runs_prefixes_arms(run, monkeypatch):
    other = build_run(run.parent / "run2")
    try:
        at = _app(monkeypatch, run)
        at.multiselect(key=f"compare::{run}").set_value([str(other)])
        _ok(at)
        labels = at.multiselect(key=f"arms::{run}::{other}").value
        assert labels == [f"run1/{a}" for a in ARMS] + [f"run2/{a}" for a in ARMS]
        names = _names(_charts(at)["curve::rollout/reward_mean"])
        assert "run1/full (mean of 2 seeds)" in names and "run2/tools_none-s0" in names
    finally:
        import shutil

        shutil.rmtree(other)


def test_png_export_renders_the_paper_figures(run):
    """The PNG buttons' callables (AppTest cannot click a download): real PNG bytes."""
    from analysis import metrics
    from analysis.decay import decay_fit
    from analysis.events import before_after, before_after_summary, event_aligned_share
    from apps import figures

    magic = b"\x89PNG\r\n\x1a\n"
    kl = rundir.load_metrics(run)[["arm", "step", "actor/kl"]]
    att = rundir.load_attention(run, "full-s0")
    events = rundir.load_attention_events(run, "full-s0")
    curve = metrics.image_share_curve(att)
    aligned = event_aligned_share(att, events, 2)
    ba = before_after(att, events, 2).assign(arm="full")
    summary = before_after_summary(ba, ("arm",), n_boot=50, overall=False)
    builders = [
        figures.training_png(kl, "actor/kl"),
        figures.decay_png({"full": curve}, {"full": decay_fit(curve)}),
        figures.shares_png(metrics.share_by_token(att), "full", "all"),
        figures.tool_call_png({"full": aligned}, summary),
    ]
    for build in builders:
        png = build()
        assert png[:8] == magic and len(png) > 5_000


# Status page


def test_status_page(run, monkeypatch):
    at = _app(monkeypatch, run, "status")
    assert not at.error, _texts(at.error)
    assert "tools_none-s0 is running at stage attention" in _texts(at.warning)
    tables = [df.value for df in at.dataframe]
    assert tables[0]["arm"].tolist() == ARMS
    eval_table = next(t for t in tables if "accuracy" in t.columns)
    assert eval_table["arm"].tolist() == ARMS
    assert eval_table["accuracy"].tolist() == [0.1, 0.2, 0.3]
    assert "csv::eval" in _downloads(at)
    at.multiselect(key=f"arms::{run}::").set_value(["full-s1"])
    _ok(at)
    eval_table = next(df.value for df in at.dataframe if "accuracy" in df.value.columns)
    assert eval_table["arm"].tolist() == ["full-s1"]


# Attention page


def test_attention_page_views(run, monkeypatch):
    at = _app(monkeypatch, run, "attention")
    assert not at.error, _texts(at.error)
    assert "tools_none-s0 has no attention table yet" in _texts(at.info)
    charts = _charts(at)
    expected = ["image_share", "shares::left", "shares::right", "per_image", "aligned"]
    assert list(charts) == [*expected, "bands_fig", "heads_fig"]
    # Seeds pooled: one decay line for "full" (both seeds' 4 trajectories), tool calls marked.
    assert _names(charts["image_share"]) == ["full", "confirm calls (full)", "reflect calls (full)"]
    assert _arr(charts["image_share"]["data"][0]["customdata"]).max() == 4
    # The arm's colour is the paper figures' (analysis.arms), in every view.
    assert charts["image_share"]["data"][0]["line"]["color"] == arms.ARM_COLORS["full"]
    assert charts["aligned"]["data"][0]["line"]["color"] == arms.ARM_COLORS["full"]
    # Figure 1: the left picker offers the seeds pooled first, stacked groups bottom to top.
    assert at.selectbox(key="fig1::left").options == ["full (2 seeds pooled)", "full-s0", "full-s1"]
    assert _names(charts["shares::left"]) == ["text", "tool text", "image", "generated"]
    stacked = np.array([_arr(t["y"]) for t in charts["shares::left"]["data"]])
    np.testing.assert_allclose(stacked.sum(0), 1.0, atol=1e-6)
    assert _names(charts["per_image"]) == ["image 1 (input)", "image 2 (reflect)", "reflect calls"]
    aligned = _names(charts["aligned"])
    assert aligned == [
        "full-s0, confirm",
        "full-s0, reflect",
        "full-s1, confirm",
        "full-s1, reflect",
    ]
    assert _names(charts["bands_fig"]) == ["early", "late"]  # 2 layers: at most 2 bands
    assert charts["heads_fig"]["data"][0]["type"] == "heatmap"
    ba = next(df.value for df in at.dataframe if "delta_lo" in df.value.columns)
    assert sorted(set(ba["tool"])) == ["confirm", "reflect"]


def test_attention_controls(run, monkeypatch):
    at = _app(monkeypatch, run, "attention")
    assert at.selectbox(key="kind").options == ["raw", "no_sink"]  # no keys/value_mass columns
    at.toggle(key="pool").set_value(False)
    _ok(at)
    s0, s1 = _charts(at)["image_share"]["data"][:2]
    assert [s0["name"], s1["name"]] == ["full-s0", "full-s1"]
    assert s0["line"]["color"] == s1["line"]["color"] and s0["line"]["dash"] != s1["line"]["dash"]
    before = _arr(_charts(at)["image_share"]["data"][0]["y"])
    at.selectbox(key="kind").select("no_sink")
    at.number_input(key="window").set_value(2)
    at.selectbox(key="fig1::right").select("full-s1")
    at.selectbox(key="image::arm").select("full-s1")
    at.slider(key="bands").set_value(1)
    at.selectbox(key="heads::arm").select("full-s1")
    _ok(at)
    charts = _charts(at)
    assert (_arr(charts["image_share"]["data"][0]["y"]) > before).all()
    assert charts["shares::right"]["layout"]["title"]["text"].startswith("full-s1")
    assert _names(charts["bands_fig"]) == ["all"]
    assert charts["heads_fig"]["layout"]["title"]["text"].startswith("full-s1")
    assert _arr(charts["aligned"]["data"][0]["x"]).max() <= 1  # offsets in [-2, 2)
    at.selectbox(key="image::traj::full-s1").select("t1")
    _ok(at)
    assert _charts(at)["per_image"]["layout"]["title"]["text"] == "full-s1: t1"
    at.radio(key="setting").set_value("multi-image")
    at.run()
    assert not at.exception
    assert "No multi-image trajectories measured in: full-s0, full-s1" in _texts(at.info)
    at.radio(key="setting").set_value("single-image")
    _ok(at)
    assert "image_share" in _charts(at)


# Trajectory page


def test_trajectory_page(run, monkeypatch):
    at = _app(monkeypatch, run, "trajectories")
    assert not at.error, _texts(at.error)
    html = next(m.value for m in at.markdown if "<span" in m.value)
    assert "[image 1: 4 tokens]" in html and "token 0: image share" in html
    assert html.count("image share") == 6  # the six generated tokens, all measured
    charts = _charts(at)
    assert list(charts) == ["img::1", "img::2"]
    boxes = charts["img::1"]["layout"]["shapes"]
    assert [(b["x0"], b["y0"], b["x1"], b["y1"]) for b in boxes] == [(2, 3, 12, 14)]
    assert "shapes" not in charts["img::2"]["layout"]
    codes = [c.value for c in at.code]
    assert codes[0] == "<tool_call>reflect" and "[image 2: 4 tokens]" in codes[1]
    assert 'reflect({"images": [1]})' in _texts(at.markdown)
    assert {"csv::tokens", "csv::turns"} <= _downloads(at)


def test_trajectory_controls(run, monkeypatch):
    at = _app(monkeypatch, run, "trajectories")
    at.selectbox(key="traj::id::full-s0").select("t1")
    at.toggle(key="traj::fold").set_value(False)
    at.selectbox(key="traj::kind").select("no_sink")
    _ok(at)
    html = next(m.value for m in at.markdown if "<span" in m.value)
    assert "[image 1" not in html and html.count("&lt;|image_pad|&gt;") == 8
    at.selectbox(key="traj::arm").select("tools_none-s0")  # records without token ids
    at.run()
    assert not at.exception
    assert "needs key(s) ['token_ids', 'response_mask', 'prompt_len']" in _texts(at.error)


# Error paths


def test_run_path_from_argv(run, monkeypatch):
    monkeypatch.delenv("RELOOK_RUN", raising=False)
    monkeypatch.setattr("sys.argv", ["relook_app.py", "--run", str(run)])
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error
    assert at.text_input(key="run").value == str(run)


def test_bad_paths_show_errors_not_tracebacks(run, monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "does-not-exist")
    assert "does not exist" in _texts(at.error) and not at.get("plotly_chart")
    at.text_input(key="run").set_value(str(run.parent)).run()  # a folder of runs
    assert not at.exception and "not a relook run directory" in _texts(at.error)
    assert "run1" in _texts(at.info)


def test_partial_run_shows_messages(monkeypatch, tmp_path):
    run = rundir.create_run(tmp_path / "new", "ablation", ["full-s0"], [0], {})
    for page in ("training", "status", "attention", "trajectories"):
        at = _app(monkeypatch, run, None if page == "training" else page)
        assert not at.error, (page, _texts(at.error))
        assert at.info, page  # a message says what is missing, no traceback
    assert "No training metrics" in _texts(_app(monkeypatch, run).info)


def test_corrupt_files_show_errors(monkeypatch, tmp_path):
    broken = add_trajectories(build_run(tmp_path / "broken"))
    (broken / "full-s0" / "metrics.parquet").write_bytes(b"garbage")
    (broken / "full-s1" / "attention.parquet").write_bytes(b"garbage")
    (broken / "full-s0" / "images" / "t0_1.png").write_bytes(b"not a png")
    at = _app(monkeypatch, broken)
    assert "metrics.parquet: corrupt parquet" in _texts(at.error)
    at.switch_page("views/attention.py").run()
    assert not at.exception and "attention of arm full-s1" in _texts(at.error)
    assert "image_share" in _charts(at)  # full-s0 still renders
    at.switch_page("views/trajectories.py").run()
    assert not at.exception and "not a readable image" in _texts(at.error)
    assert "img::1" in _charts(at)
    (broken / "manifest.json").write_text("{not json")
    at.run()
    assert not at.exception and "manifest.json: corrupt JSON" in _texts(at.error)


def test_views_share_one_sidebar(run, monkeypatch):
    """Every page keeps the sidebar's arm choice (st.navigation runs the main script first)."""
    at = _app(monkeypatch, run)
    at.multiselect(key=f"arms::{run}::").set_value(["full-s0"])
    _ok(at)
    for page in ("status", "attention", "trajectories"):
        at.switch_page(f"views/{page}.py")
        _ok(at)
        assert at.multiselect(key=f"arms::{run}::").value == ["full-s0"]
    assert at.selectbox(key="traj::arm").options == ["full-s0"]
