"""A browser call relayed by a real coturn (issue 16), configured by the shipped file
(deploy/coturn/turnserver.conf) with the gateway's TURN secret: with the direct paths
blocked (both browsers may only use relay candidates, as behind a firewall that lets
nothing but the TURN server through), the visitor and the agent still talk, and what they
send goes through coturn's relay on the credentials the gateway minted for each session.

coturn refuses to relay to loopback by the shipped config; the test allows 127.0.0.1 alone,
on the command line (its browsers are on this machine). Debian's coturn (`apt-get install
coturn`; tests/run installs it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import NodeFactory, free_port, make_settings, mint, replace
from playwright.async_api import Browser, Page, async_playwright
from test_browser_e2e import (
    AGENT_PC,
    CHROMIUM,
    CHROMIUM_ARGS,
    HAVE_CHROMIUM,
    WIDGET_PC,
    agent_signed_in,
    visitor_calls_and_talks,
)

from gateway.settings import WebRTCSettings

ROOT = Path(__file__).resolve().parent.parent
TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
SECRET = "turn-secret-for-the-test-0123456789"

pytestmark = pytest.mark.skipif(
    not (HAVE_CHROMIUM and Path(TURNSERVER).exists()) and not os.environ.get("CI"),
    reason="needs Debian's coturn and chromium",
)

# The firewall: every peer connection of the page may use relay candidates only.
RELAY_ONLY = """
(() => {
  const Native = window.RTCPeerConnection;
  window.RTCPeerConnection = function (config, ...rest) {
    return new Native({ ...(config || {}), iceTransportPolicy: "relay" }, ...rest);
  };
  window.RTCPeerConnection.prototype = Native.prototype;
  Object.setPrototypeOf(window.RTCPeerConnection, Native);
})();
"""


def selected_pair_js(pc: str) -> str:
    """The local and remote candidate types of the pair in use (a promise)."""
    return f"""async () => {{
      const stats = await ({pc}).getStats();
      let pair = null;
      stats.forEach((r) => {{
        if (r.type === "transport" && r.selectedCandidatePairId) {{
          pair = stats.get(r.selectedCandidatePairId);
        }}
      }});
      if (!pair) return null;
      return [
        stats.get(pair.localCandidateId).candidateType,
        stats.get(pair.remoteCandidateId).candidateType,
      ];
    }}"""


def text_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@asynccontextmanager
async def coturn(work: Path, port: int) -> AsyncIterator[Path]:
    """turnserver with the shipped config, on ``port`` of loopback; its log's path."""
    log = work / "turn.log"
    proc = await asyncio.create_subprocess_exec(
        TURNSERVER, "-c", str(ROOT / "deploy" / "coturn" / "turnserver.conf"),
        f"--static-auth-secret={SECRET}", f"--listening-port={port}",
        "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", "--allowed-peer-ip=127.0.0.1",
        "--allow-loopback-peers",
        "--no-tls", "--no-dtls", f"--pidfile={work / 'turn.pid'}", "--verbose",
        stdout=log.open("wb"), stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        for _ in range(100):
            if proc.returncode is not None or "listener opened" in text_of(log):
                break
            await asyncio.sleep(0.05)
        assert proc.returncode is None, text_of(log)
        yield log
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def relay_only_page(browser: Browser, url: str) -> Page:
    context = await browser.new_context(permissions=["microphone"])
    await context.add_init_script(RELAY_ONLY)
    page = await context.new_page()
    await page.goto(url)
    return page


async def test_a_browser_call_is_relayed_by_coturn_when_direct_paths_are_blocked(
    nodes: NodeFactory, tmp_path: Path
) -> None:
    if not HAVE_CHROMIUM:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium")
    turn_port = free_port()
    port = free_port()
    webrtc = WebRTCSettings(
        turn_urls=(f"turn:127.0.0.1:{turn_port}?transport=udp",), turn_secret=SECRET
    )
    settings = make_settings(
        tmp_path, port=port, public_url=f"http://127.0.0.1:{port}", webrtc=webrtc
    )
    acme = settings.sites["acme"]
    acme = replace(acme, allowed_origins=(*acme.allowed_origins, f"http://127.0.0.1:{port}"))
    node = await nodes(replace(settings, sites={**settings.sites, "acme": acme}))
    (tmp_path / "turn").mkdir()
    async with coturn(tmp_path / "turn", turn_port) as log, async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            anna = await relay_only_page(
                browser, f"{node.url}/agent/#token={mint(settings, 'anna')}"
            )
            await agent_signed_in(anna)
            visitor = await relay_only_page(browser, f"{node.url}/demo/")
            await visitor_calls_and_talks(visitor, anna)
            assert await visitor.evaluate(selected_pair_js(WIDGET_PC)) == ["relay", "relay"]
            assert await anna.evaluate(selected_pair_js(AGENT_PC)) == ["relay", "relay"]
        finally:
            await browser.close()
    turn_log = text_of(log)
    # Both sessions allocated a relay, on credentials the gateway minted (<expiry>:<user>).
    allocated = [line for line in turn_log.splitlines() if "ALLOCATE processed, success" in line]
    assert len(allocated) >= 2, turn_log[-3000:]
