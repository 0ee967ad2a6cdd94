"""Static checks of the browser side (web_client/): files, size budget, embed line, test ids.

These need no server and no browser; `node --check` runs when node is installed.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "web_client"

FILES = [
    "widget.js",
    "agent/index.html",
    "agent/agent.js",
    "agent/agent.css",
    "demo/index.html",
    "vendor/socket.io.min.js",
    "README.md",
]
JS_FILES = ["widget.js", "agent/agent.js", "vendor/socket.io.min.js"]
GZIP_BUDGET = 30 * 1024  # widget.js + socket.io client, gzipped

WIDGET_IDS = [
    "membrane-button",
    "membrane-panel",
    "membrane-status",
    "membrane-mute",
    "membrane-hangup",
    "membrane-callback-form",
    "membrane-phone",
    "membrane-country",
    "membrane-submit",
    "membrane-ticket",
]
AGENT_IDS = [
    "agent-token",
    "agent-signin",
    "agent-status",
    "agent-state-select",
    "agent-ring",
    "agent-accept",
    "agent-decline",
    "agent-hangup",
    "agent-mute",
    "agent-call-state",
    "agent-error",
    "board-table",
]


def gzipped_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=9))


def test_files_exist() -> None:
    missing = [f for f in FILES if not (WEB / f).is_file()]
    assert not missing, f"missing in web_client/: {missing}"


def test_widget_and_socketio_fit_the_budget() -> None:
    total = gzipped_size(WEB / "widget.js") + gzipped_size(WEB / "vendor/socket.io.min.js")
    assert total <= GZIP_BUDGET, f"{total} bytes gzipped > {GZIP_BUDGET}"


def test_vendored_socketio_keeps_its_license_header() -> None:
    head = (WEB / "vendor/socket.io.min.js").read_text(encoding="utf-8")[:300]
    assert "Socket.IO v4" in head
    assert "MIT License" in head


def test_demo_embeds_the_widget_with_one_line() -> None:
    html = (WEB / "demo/index.html").read_text(encoding="utf-8")
    tags = re.findall(r"<script\b[^>]*>", html, flags=re.IGNORECASE)
    widget_tags = [t for t in tags if "widget.js" in t]
    assert len(widget_tags) == 1, widget_tags
    assert re.search(r'data-site="[a-z0-9_-]+"', widget_tags[0]), widget_tags[0]
    assert "async" in widget_tags[0]
    assert len(tags) == 1, f"the demo page should carry no other script: {tags}"


@pytest.mark.parametrize(
    ("sources", "ids"),
    [
        (["widget.js"], WIDGET_IDS),
        (["agent/index.html", "agent/agent.js"], AGENT_IDS),
    ],
)
def test_every_test_id_appears(sources: list[str], ids: list[str]) -> None:
    text = "\n".join((WEB / s).read_text(encoding="utf-8") for s in sources)
    # In HTML as data-testid="x"; the widget's element helper writes testid: "x".
    missing = [i for i in ids if not re.search(rf'(data-)?testid[=:]\s*"{re.escape(i)}"', text)]
    assert not missing, f"test ids not found in {sources}: {missing}"


def test_widget_shadow_root_is_open() -> None:
    assert 'mode: "open"' in (WEB / "widget.js").read_text(encoding="utf-8")


def test_agent_page_loads_its_assets_from_static() -> None:
    html = (WEB / "agent/index.html").read_text(encoding="utf-8")
    for asset in (
        "/static/vendor/socket.io.min.js",
        "/static/agent/agent.js",
        "/static/agent/agent.css",
    ):
        assert asset in html
        assert (WEB / asset.removeprefix("/static/")).is_file()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("name", JS_FILES)
def test_javascript_parses(name: str) -> None:
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [node, "--check", str(WEB / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
