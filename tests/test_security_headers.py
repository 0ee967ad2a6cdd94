"""What every answer carries (issue 16): the browser's safety headers and a content security
policy under which every page of the gateway renders and runs without a single violation
(headless Chromium, the widget included); the client's address behind trusted proxies only;
and a draining node that a proxy can route around."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import Node, NodeFactory, free_port, make_settings, mint, replace
from playwright.async_api import Browser, Page, async_playwright, expect
from test_browser_e2e import CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM

from gateway.core.model import Role
from gateway.edge.http import appkeys as keys
from gateway.edge.http.security import forwarded_client
from gateway.edge.http.visitor_api import SESSIONS_PER_IP_MINUTE

WAIT_MS = 10_000
# Records every violation of the page's policy, from before its first script runs.
WATCH_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) =>
  window.__violations.push(`${e.violatedDirective} ${e.blockedURI} ${e.lineNumber}`));
"""


@pytest.fixture
async def node(nodes: NodeFactory, tmp_path: Path) -> Node:
    port = free_port()
    settings = make_settings(tmp_path, port=port, public_url=f"http://127.0.0.1:{port}")
    acme = settings.sites["acme"]
    acme = replace(acme, allowed_origins=(*acme.allowed_origins, f"http://127.0.0.1:{port}"))
    return await nodes(replace(settings, sites={**settings.sites, "acme": acme}))


async def test_every_answer_carries_the_safety_headers(
    node: Node, http: aiohttp.ClientSession
) -> None:
    for path in ("/healthz", "/v1/sites/acme/availability", "/agent/", "/widget.js", "/nope"):
        async with http.get(node.url + path) as r:
            assert r.headers["X-Content-Type-Options"] == "nosniff", path
            assert r.headers["X-Frame-Options"] == "DENY", path
            policy = r.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
            assert f"connect-src 'self' ws://127.0.0.1:{node.url.rsplit(':', 1)[1]}" in policy
            assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
            assert "Strict-Transport-Security" not in r.headers  # not over plain http
    async with http.post(node.url + "/v1/sites/acme/sessions", data=b"{") as r:
        assert r.status == 403 and r.headers["X-Frame-Options"] == "DENY"


async def test_https_public_urls_get_hsts(nodes: NodeFactory, tmp_path: Path) -> None:
    node = await nodes(make_settings(tmp_path, public_url="https://calls.example.com"))
    async with aiohttp.ClientSession() as http, http.get(node.url + "/healthz") as r:
        assert r.headers["Strict-Transport-Security"].startswith("max-age=")
        assert "connect-src 'self' wss://calls.example.com" in r.headers["Content-Security-Policy"]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def console_errors(page: Page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return errors


async def violations(page: Page) -> list[str]:
    found: list[str] = await page.evaluate("() => window.__violations")
    return found


@pytest.mark.skipif(
    not HAVE_CHROMIUM and not __import__("os").environ.get("CI"), reason="no Chromium"
)
async def test_every_page_runs_under_its_policy_without_a_violation(
    node: Node, browser: Browser
) -> None:
    settings = node.app[keys.SETTINGS]
    pages = {  # (the agent first, so the demo site's button has someone to offer)
        f"/agent/#token={mint(settings, 'anna')}": "agent-status",
        "/demo/": "membrane-button",
        f"/board/#token={mint(settings, 'sam', Role.SUPERVISOR)}": None,
        "/t/c_unknown#token=nothing": None,
    }
    context = await browser.new_context(permissions=["microphone"])
    try:
        for path, testid in pages.items():
            page = await context.new_page()
            await page.add_init_script(WATCH_VIOLATIONS)
            errors = console_errors(page)
            await page.goto(node.url + path)
            await page.wait_for_load_state("networkidle")
            assert await violations(page) == [], path
            if testid is not None:
                await expect(page.get_by_test_id(testid)).to_be_visible(timeout=WAIT_MS)
            if path == "/demo/":
                # The widget's styles apply on a page that forbids inline styles.
                radius = await page.get_by_test_id("membrane-button").evaluate(
                    "b => getComputedStyle(b).borderTopLeftRadius"
                )
                assert radius not in ("", "0px"), radius
            assert await violations(page) == [], path
            assert not [e for e in errors if "Content Security Policy" in e], errors
    finally:
        await context.close()


def test_the_client_address_is_read_only_through_trusted_proxies() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))
    # nginx appends the address it saw: what the client wrote itself lies to the left.
    assert forwarded_client("10.0.0.5", ["6.6.6.6, 203.0.113.9"], trusted) == "203.0.113.9"
    assert forwarded_client("10.0.0.5", ["203.0.113.9, 10.0.0.7"], trusted) == "203.0.113.9"
    assert forwarded_client("10.0.0.5", ["6.6.6.6", "203.0.113.9"], trusted) == "203.0.113.9"
    # From anyone else the header is ignored.
    assert forwarded_client("198.51.100.1", ["203.0.113.9"], trusted) == "198.51.100.1"
    # A garbled header from a proxy: the proxy's own address, never the garbage.
    assert forwarded_client("10.0.0.5", ["not-an-ip"], trusted) == "10.0.0.5"
    assert forwarded_client("10.0.0.5", [], trusted) == "10.0.0.5"


async def test_session_limits_count_clients_behind_a_trusted_proxy_not_the_proxy(
    nodes: NodeFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    origin = {"Origin": "http://127.0.0.1:8080"}

    async def sessions(node: Node, client: str) -> list[int]:
        statuses = []
        for _ in range(SESSIONS_PER_IP_MINUTE + 1):
            headers = {**origin, "X-Forwarded-For": client}
            async with http.post(
                f"{node.url}/v1/sites/acme/sessions", json={}, headers=headers
            ) as r:
                statuses.append(r.status)
        return statuses

    behind = await nodes(make_settings(tmp_path, trusted_proxies=("127.0.0.1",)))
    assert (await sessions(behind, "203.0.113.9"))[-1] == 429  # this one customer's limit
    async with http.post(
        f"{behind.url}/v1/sites/acme/sessions",
        json={},
        headers={**origin, "X-Forwarded-For": "203.0.113.11"},
    ) as r:
        assert r.status == 201
    # Not configured as a proxy: the header is the client's word, and ignored.
    direct = await nodes(make_settings(tmp_path / "direct"))
    statuses = await sessions(direct, "203.0.113.12")
    assert statuses[-1] == 429
    async with http.post(
        f"{direct.url}/v1/sites/acme/sessions",
        json={},
        headers={**origin, "X-Forwarded-For": "203.0.113.13"},
    ) as r:
        assert r.status == 429  # the same address as before, whatever it claims


async def test_a_draining_node_refuses_new_sockets_before_the_upgrade_behind_a_proxy(
    nodes: NodeFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """So the proxy (deploy/nginx/membrane.conf: proxy_next_upstream http_503) sends the
    handshake to another node; connected directly, socket.io refuses with its own code."""
    behind = await nodes(make_settings(tmp_path, trusted_proxies=("127.0.0.1",)))
    handshake = f"{behind.url}/socket.io/?EIO=4&transport=websocket"
    proxied = {"X-Forwarded-For": "203.0.113.9"}
    behind.app[keys.DRAIN].started_at = 0.0  # as SIGTERM does
    async with http.get(handshake, headers=proxied) as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "draining"
    direct = await nodes(make_settings(tmp_path / "direct"))
    direct.app[keys.DRAIN].started_at = 0.0
    async with http.get(handshake.replace(behind.url, direct.url), headers=proxied) as r:
        assert r.status != 503  # reaches socket.io, which refuses in its own protocol
