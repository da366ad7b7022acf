"""``relook-app`` (or ``python -m apps.launch``): serve the app on loopback, whatever the folder.

Streamlit reads ``.streamlit/config.toml`` from the working directory only, so a plain
``streamlit run apps/relook_app.py`` started from any other folder listens on all interfaces and
sends usage statistics. The server binds before the app script runs, so the script cannot fix
that; this launcher passes the settings on the command line, where they outrank every config
file and environment variable::

    relook-app --run runs/latest            # or: python -m apps.launch --run runs/latest
    relook-app --server.port 8502 --run runs/latest

Arguments starting ``--server.``, ``--browser.``, ``--theme.`` (Streamlit options, ``--opt=v``
or ``--opt v``) go to Streamlit; the rest go to the app. The app itself warns when it finds it is
not bound to loopback (:func:`exposure_warning`).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

APP = Path(__file__).resolve().parent / "relook_app.py"
SAFE_OPTIONS = (
    "--server.address", "127.0.0.1",
    "--browser.gatherUsageStats", "false",
    "--server.headless", "true",
)  # fmt: skip
"""Streamlit options the launcher always passes: loopback only, no usage statistics."""
_STREAMLIT_PREFIXES = ("--server.", "--browser.", "--theme.", "--logger.", "--client.")


def command(argv: Sequence[str]) -> list[str]:
    """The ``streamlit run`` command line for ``argv`` (the launcher's own arguments)."""
    streamlit_args, app_args = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith(_STREAMLIT_PREFIXES):
            streamlit_args.append(arg)
            if "=" not in arg and args:
                streamlit_args.append(args.pop(0))
        elif arg == "--":
            app_args.extend(args)
            break
        else:
            app_args.append(arg)
    # user options come after SAFE_OPTIONS: an explicit --server.address is the user's choice
    return [
        sys.executable, "-m", "streamlit", "run", str(APP), *SAFE_OPTIONS, *streamlit_args,
        "--", *app_args,
    ]  # fmt: skip


def is_loopback(address: str | None) -> bool:
    """Whether a ``server.address`` value serves this machine only (None/"" means all)."""
    if not address:
        return False
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:  # a host name: resolved by the server, not by us
        return False


def exposure_warning(address: str | None, gather_usage_stats: bool) -> str | None:
    """The warning the app shows when it is reachable from other machines or reports usage
    statistics (Streamlit's ``server.address`` and ``browser.gatherUsageStats``), else None."""
    problems = []
    if not is_loopback(address):
        problems.append(f"listens on {address or 'all network interfaces'}, not 127.0.0.1")
    if gather_usage_stats:
        problems.append("sends usage statistics to Streamlit")
    if not problems:
        return None
    return (
        f"This app {' and '.join(problems)}: it was started without relook's settings "
        "(`.streamlit/config.toml` is read only in the repository root). Stop it and start it "
        "with `relook-app --run RUN` (or `python -m apps.launch --run RUN`), or pass "
        "`--server.address 127.0.0.1 --browser.gatherUsageStats false` to `streamlit run`."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Replace this process with ``streamlit run`` on loopback (:func:`command`)."""
    cmd = command(sys.argv[1:] if argv is None else argv)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
