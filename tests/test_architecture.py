"""The layers of docs/ARCHITECTURE.md section 1, held by the import-linter contracts in
pyproject.toml ([tool.importlinter]): imports point down (edge → services → telephony →
settings → wire | store → ops → core), the HTTP and socket.io edges never import each other,
the core does no I/O and reads no clock, and the gateway never imports mobile_bridge.

Each wrong import below is made in a copy of the packages and must break exactly the
contracts that forbid it (directly, or through the chain it opens): the contracts are not
vacuous."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LAYERS = "gateway's layers import only downwards"
EDGES = "the HTTP and socket.io edges never import each other"
PURE_CORE = "the core does no I/O and reads no clock"
NO_PROVIDER = "the gateway never imports mobile_bridge (it implements gateway.telephony)"
INTEGRATIONS = "an integration knows the gateway only by its wire format"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``root`` (it puts its cwd first on sys.path, so
    the copy there is what it reads), with pyproject.toml's contracts and no cache."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
            "--config",
            str(root / "pyproject.toml"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )


def contract_results(output: str) -> dict[str, str]:
    """Each contract's name and KEPT or BROKEN, from lint-imports' summary."""
    return {m[1]: m[2] for m in re.finditer(r"^(.+) (KEPT|BROKEN)$", output, re.M)}


def test_the_contracts_hold() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert contract_results(result.stdout) == {
        LAYERS: "KEPT",
        EDGES: "KEPT",
        PURE_CORE: "KEPT",
        NO_PROVIDER: "KEPT",
        INTEGRATIONS: "KEPT",
    }


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # A service reaching up into an edge.
        # (The HTTP edge imports drain, so it now reaches the socket.io edge too.)
        ("gateway/services/drain.py", "from gateway.edge.sio import visitor", {LAYERS, EDGES}),
        # The core's errors answering HTTP themselves (how each is answered is the edge's).
        ("gateway/core/errors.py", "from aiohttp import web", PURE_CORE),
        # The store reaching up into the services.
        ("gateway/store/base.py", "from gateway.services import timers", LAYERS),
        # wire and store are independent of each other.
        ("gateway/wire/codec.py", "from gateway.store import base", LAYERS),
        # The core reaching up to the settings (which read files and the environment).
        ("gateway/core/routing.py", "from gateway import settings", {LAYERS, PURE_CORE}),
        # A new module nobody placed in a layer.
        ("gateway/extra.py", '"""Not in any layer."""', LAYERS),
        ("gateway/edge/sio/namespace.py", "from gateway.edge.http import appkeys", EDGES),
        ("gateway/edge/auth.py", "from gateway.edge.sio import agent", EDGES),
        # The errors table is shared by both edges, so it imports neither.
        ("gateway/edge/errors.py", "from gateway.edge.http import http_api", EDGES),
        ("gateway/core/hours.py", "import time", PURE_CORE),
        ("gateway/core/call.py", "import asyncio", PURE_CORE),
        ("gateway/core/model.py", "from redis import asyncio", PURE_CORE),
        ("gateway/app.py", "import mobile_bridge.twilio_telephony", NO_PROVIDER),
        # An integration reaching into the server instead of its wire format (the services
        # are below the app, so only the integrations contract sees it).
        (
            "gateway/integrations/xmpp_bridge.py",
            "from gateway.services import timers",
            INTEGRATIONS,
        ),
        # The app and the integrations are independent of each other.
        ("gateway/app.py", "from gateway.integrations import xmpp_bridge", LAYERS),
    ],
)
def test_a_wrong_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, broken: str | set[str]
) -> None:
    for package in ("gateway", "mobile_bridge"):
        shutil.copytree(
            REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    text = target.read_text() if target.exists() else ""
    target.write_text(f"{text}\n{line}\n")

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    results = contract_results(result.stdout)
    assert len(results) == 5, result.stdout
    expected = {broken} if isinstance(broken, str) else broken
    assert {name for name, state in results.items() if state == "BROKEN"} == expected, result.stdout
