"""The app serves on loopback with no usage statistics from any folder (``apps.launch``), and
warns when it was started without those settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from apps import launch
from tests.apps.browser import _free_port

ROOT = Path(__file__).resolve().parents[2]


def test_command_keeps_safe_options_and_splits_arguments():
    cmd = launch.command(["--server.port", "8600", "--run", "runs/x", "--theme.base=dark"])
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(launch.APP)]
    assert Path(cmd[4]).is_absolute()
    assert cmd[5:11] == list(launch.SAFE_OPTIONS)
    assert cmd[11:] == ["--server.port", "8600", "--theme.base=dark", "--", "--run", "runs/x"]
    assert launch.command(["--", "--server.port", "1"])[-3:] == ["--", "--server.port", "1"]


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("[::1]", True),
     ("localhost", True), (None, False), ("", False), ("0.0.0.0", False), ("::", False),
     ("192.168.1.4", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback(address, loopback):
    assert launch.is_loopback(address) is loopback


def test_exposure_warning_names_the_fix():
    assert launch.exposure_warning("127.0.0.1", False) is None
    everything = launch.exposure_warning(None, True)
    assert "all network interfaces" in everything and "usage statistics" in everything
    assert "relook-app" in everything and "--server.address 127.0.0.1" in everything
    assert "usage" not in launch.exposure_warning("0.0.0.0", False)


def _listeners(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_launcher_listens_on_loopback_only_from_another_folder(tmp_path):
    assert not (tmp_path / ".streamlit").exists()  # no config.toml to fall back on
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("STREAMLIT_SERVER_ADDRESS", "STREAMLIT_BROWSER_GATHER_USAGE_STATS"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "apps.launch", "--server.port", str(port), "--run", "runs/x"]
    log = tmp_path / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        assert _listeners(port) == {"0100007F"}  # 127.0.0.1 only: no 0.0.0.0, no ::
    finally:
        proc.terminate()  # our own child, by its handle (the launcher exec'd streamlit in place)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_app_warns_when_started_exposed(tmp_path, monkeypatch):
    from streamlit import config

    monkeypatch.setenv("RELOOK_RUN", str(tmp_path / "no_run"))
    monkeypatch.setattr("sys.argv", ["relook_app.py"])
    saved = {k: config.get_option(k) for k in ("server.address", "browser.gatherUsageStats")}
    config.set_option("server.address", "0.0.0.0")
    config.set_option("browser.gatherUsageStats", True)
    try:
        at = AppTest.from_file(str(launch.APP), default_timeout=60).run()
        warnings = "\n".join(str(w.value) for w in at.warning)
        assert "listens on 0.0.0.0" in warnings and "relook-app" in warnings
        assert "usage statistics" in warnings
        assert config.get_option("browser.gatherUsageStats") is False  # switched off
    finally:
        for key, value in saved.items():
            config.set_option(key, value)
