"""The Streamlit run viewer, run headless with AppTest over a synthetic run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.analysis.test_rundir import ARMS, build_run

APP = str(Path(__file__).resolve().parents[2] / "apps" / "relook_app.py")


def _charts(at: AppTest) -> dict[str, dict]:
    """Plotly figures of the page by chart key (the key is the tail of the element id)."""
    charts = {}
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        charts[element.proto.id.rsplit("-", 1)[-1]] = spec
    return charts


def _texts(elements) -> str:
    return "\n".join(e.value for e in elements)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("runs") / "run1")


def _app(monkeypatch, path: Path | str) -> AppTest:
    monkeypatch.setenv("RELOOK_RUN", str(path))
    monkeypatch.setattr("sys.argv", ["relook_app.py"])
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    return at


def test_app_renders_a_run(run, monkeypatch):
    at = _app(monkeypatch, run)
    assert not at.error, _texts(at.error)
    charts = _charts(at)
    assert set(charts) == {"training_curves", "image_share", "shares"}
    names = [t.get("name") for t in charts["training_curves"]["data"]]
    assert names == ["full max", "full min", "full (mean of 2 seeds)", "tools_none-s0"]
    image = [t.get("name") for t in charts["image_share"]["data"]]
    assert image[:2] == ["full-s0", "full-s1"] and len(image) == 6  # 2 arms + 2 x 2 tool traces
    assert len(charts["shares"]["data"]) == 4
    tables = [df.value for df in at.dataframe]
    eval_table = next(t for t in tables if "accuracy" in t.columns)
    assert eval_table["arm"].tolist() == ARMS
    assert any("tool" in t.columns and "delta_lo" in t.columns for t in tables)
    warnings = _texts(at.warning)
    assert "tools_none-s0 is running at stage attention" in warnings
    assert "tools_none-s0 has no attention table yet" in _texts(at.info)


def test_metric_selection_rerenders(run, monkeypatch):
    at = _app(monkeypatch, run)
    assert _charts(at)["training_curves"]["layout"]["title"]["text"] == "rollout/reward_mean"
    at.selectbox(key=f"metric::{run}").select("actor/kl").run()
    assert not at.exception
    assert _charts(at)["training_curves"]["layout"]["title"]["text"] == "actor/kl"
    at.multiselect(key=f"arms::{run}").set_value(["tools_none-s0"]).run()
    assert not at.exception
    names = [t.get("name") for t in _charts(at)["training_curves"]["data"]]
    assert names == ["tools_none-s0"] and "image_share" not in _charts(at)


def test_run_path_from_argv(run, monkeypatch):
    monkeypatch.delenv("RELOOK_RUN", raising=False)
    monkeypatch.setattr("sys.argv", ["relook_app.py", "--run", str(run)])
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception and not at.error
    assert at.text_input(key="run").value == str(run)


def test_bad_paths_show_errors_not_tracebacks(run, monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "does-not-exist")
    assert "does not exist" in _texts(at.error) and not at.get("plotly_chart")
    at.text_input(key="run").set_value(str(run.parent)).run()  # a folder of runs
    assert not at.exception and "not a relook run directory" in _texts(at.error)
    assert "run1" in _texts(at.info)


def test_corrupt_files_show_errors(run, monkeypatch, tmp_path):
    broken = build_run(tmp_path / "broken")
    (broken / "full-s0" / "metrics.parquet").write_bytes(b"garbage")
    (broken / "full-s1" / "attention.parquet").write_bytes(b"garbage")
    at = _app(monkeypatch, broken)
    errors = _texts(at.error)
    assert "metrics.parquet: corrupt parquet" in errors
    assert "attention of arm full-s1" in errors
    assert any("accuracy" in df.value.columns for df in at.dataframe)  # the rest still renders
    (broken / "manifest.json").write_text("{not json")
    at.run()
    assert not at.exception and "manifest.json: corrupt JSON" in _texts(at.error)
