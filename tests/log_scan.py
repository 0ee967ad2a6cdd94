"""The log scan of a whole test run (issue 16): every line any node logged during the run,
in this process and in the nodes the tests start as processes of their own, is kept in
test-artifacts/logs/, and at the end the run fails if any of them holds a customer's phone
number, a token or a WebRTC session description in full.

The suite is the best source of such lines there is: it makes calls and callbacks to real
numbers, signs tokens, forges bad ones, and sends offers and answers. tests/conftest.py
takes the hooks below; ``node_process`` hands each node's log over (``keep_node_log``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest

from gateway.ops.logs import CallFields, LogFormat, formatter

LOG_DIR = Path(__file__).resolve().parent.parent / "test-artifacts" / "logs"

LEAKS = {
    "a phone number": re.compile(r"(?<![\w+*%])(?:\+|%2B)[1-9]\d{7,14}(?!\d)"),
    "a JWT": re.compile(r"eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{16,}"),
    "a session description": re.compile(r"a=fingerprint:|a=ice-pwd:|v=0(?:\\r\\n|\r\n|\n)o="),
    "a status token": re.compile(r"[?&]token=(?!\*\*\*)[\w.~-]{16,}"),
}


def _worker(config: pytest.Config) -> str:
    workerinput = getattr(config, "workerinput", None)
    return str(workerinput["workerid"]) if workerinput else "main"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a run without workers)
        shutil.rmtree(LOG_DIR, ignore_errors=True)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(LOG_DIR / f"{_worker(config)}.log", encoding="utf-8")
    handler.setFormatter(formatter(LogFormat.JSON))
    handler.addFilter(CallFields(f"test-{_worker(config)}"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def keep_node_log(path: Path) -> None:
    """A node process's log, for the scan at the end of the run."""
    if path.exists():
        shutil.copyfile(path, LOG_DIR / f"node-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def scan(directory: Path) -> list[str]:
    found = []
    for path in sorted(directory.glob("*.log")):
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                for what, pattern in LEAKS.items():
                    if (match := pattern.search(line)) is not None:
                        found.append(f"{path.name}:{number}: {what} ({match.group(0)[:24]}…)")
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # the controller scans once every worker is done
    for handler in logging.getLogger().handlers:
        handler.flush()
    leaks = scan(LOG_DIR)
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["", f"LOG SCAN: {len(leaks)} log lines hold what must never be logged:"]
        lines += [f"  {leak}" for leak in leaks[:40]]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
