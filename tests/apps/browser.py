"""Drive the app as a person does: ``streamlit run`` on loopback, opened in headless Chromium.

Browser driver: Selenium with an explicit ``Service(CHROMEDRIVER)``, so Selenium Manager never
runs (nothing downloads); Debian's ``chromium`` and ``chromium-driver`` come from the same
package build, so their versions always match (Playwright would expect its own browser build).

Also a command line, to screenshot a real run::

    python -m tests.apps.browser runs/latest /tmp/app.png [PAGE [N_CHARTS]]
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apps import launch

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "apps" / "relook_app.py"
CHROMIUM = os.environ.get("RELOOK_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RELOOK_CHROMEDRIVER", "/usr/bin/chromedriver")
# docs/gotchas.md: headless Chromium flags that work on these machines.
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-dev-shm-usage", "--hide-scrollbars",
]  # fmt: skip


def browser_available() -> bool:
    """Chromium, chromedriver and selenium are all installed."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return all(Path(p).is_file() or shutil.which(p) for p in (CHROMIUM, CHROMEDRIVER))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(run: str | Path, log: Path, timeout: float = 90.0) -> Iterator[str]:
    """Start the app as ``relook-app --run RUN`` does, on 127.0.0.1, and yield its URL
    once ``/_stcore/health`` answers; the server (our own child only) is stopped afterwards.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout`` s (the message
            holds the tail of its log).
    """
    port = _free_port()
    # the launcher's command: loopback and no usage statistics from any folder
    cmd = launch.command(["--server.port", str(port), "--run", str(run)])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start: {log.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.read() == b"ok":
                            break
                except OSError:
                    time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def chromium(width: int = 1500, height: int = 1800) -> Iterator:
    """A headless Chromium WebDriver with a fresh profile folder (removed afterwards)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="relook-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


_STATE_JS = """
const q = (s) => Array.from(document.querySelectorAll(s));
const texts = (s) => q(s).map((e) => e.innerText);
return {
  charts: q(".js-plotly-plot").filter((c) => c.querySelector(".trace")).length,
  traces: q(".js-plotly-plot .trace").length,
  running: q('[data-testid="stStatusWidget"]').some((e) => /running|stop/i.test(e.innerText))
    || q('[data-testid="stSkeleton"]').length > 0 || !q('[data-testid="stMain"] h1').length,
  exceptions: texts('[data-testid="stException"]'),
  errors: texts('[data-testid="stAlertContentError"]'),
  title: document.title,
};
"""


def wait_for_charts(driver, n_charts: int, timeout: float = 120.0) -> dict:
    """Wait until the page shows at least ``n_charts`` plotly charts with drawn traces and the
    script has stopped running; return what the page shows.

    Returns:
        dict with charts (plotly charts with at least one trace), traces (drawn traces),
        exceptions (texts of Streamlit exception boxes), errors (texts of error boxes), title.

    Raises:
        TimeoutError: the charts did not appear in time (the message says how many did).
    """

    def state() -> dict:
        return dict(driver.execute_script(_STATE_JS))  # one call: no stale element references

    deadline = time.monotonic() + timeout
    settled = 0  # consecutive polls with the charts drawn and the script finished
    while settled < 3:
        seen = state()
        if seen["exceptions"]:
            break
        settled = settled + 1 if seen["charts"] >= n_charts and not seen["running"] else 0
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout} s the page shows {seen}")
        time.sleep(0.5)
    time.sleep(1.0)  # let plotly finish its transitions before a screenshot
    return state()


def screenshot_app(
    run: str | Path, png: Path, n_charts: int = 2, width: int = 1500, page: str = ""
) -> dict:
    """Serve the app over ``run``, open ``page`` (a URL path: "" the default page, "attention",
    "trajectories", "status") in headless Chromium, wait for ``n_charts`` charts and save a
    screenshot of the whole page (at most 6000 px high) to ``png``. Returns
    :func:`wait_for_charts`'s dict plus log (the server log path)."""
    from selenium.webdriver.common.by import By

    log = png.with_suffix(".server.log")
    with serve(run, log) as url, chromium(width) as driver:
        driver.get(f"{url}/{page}")
        seen = wait_for_charts(driver, n_charts)
        main = driver.find_element(By.CSS_SELECTOR, '[data-testid="stMain"]')
        height = driver.execute_script("return arguments[0].scrollHeight", main)
        driver.set_window_size(width, min(max(int(height) + 100, 900), 6000))
        time.sleep(1.0)
        driver.save_screenshot(str(png))
    return seen | {"log": str(log)}


if __name__ == "__main__":
    page = sys.argv[3] if len(sys.argv) > 3 else ""
    charts = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    print(screenshot_app(sys.argv[1], Path(sys.argv[2]), charts, page=page))
