"""nginx in front of two gateway nodes (issue 16), with the shipped config as it is
(deploy/nginx/membrane.conf; only its addresses, certificate paths and node list are this
test's): TLS, websockets, server-sent events, the client's address passed on. A browser call
goes through it; then the node holding both parties' sockets drains (SIGTERM) in the middle
of the call: the call goes on, both pages reconnect through nginx to the other node, the
drained node exits by itself, and the next call is served by the node left.

Debian's nginx (`apt-get install nginx`; tests/run installs it) runs as a process of the
test's own, on free ports."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from conftest import eventually, free_port, make_settings, mint, node_process
from playwright.async_api import Page, async_playwright, expect
from test_browser_e2e import (
    AGENT_PC,
    CHROMIUM,
    CHROMIUM_ARGS,
    HAVE_CHROMIUM,
    WAIT_MS,
    WIDGET_PC,
    agent_signed_in,
    audio_flows,
    widget_says,
)
from test_drain import config
from test_redis_urls import make_certs

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
GRACE_S = 6

pytestmark = [
    pytest.mark.skipif(
        not (HAVE_CHROMIUM and Path(NGINX).exists()) and not os.environ.get("CI"),
        reason="needs Debian's nginx and chromium",
    ),
    pytest.mark.xdist_group("nginx"),
]


def nginx_config(work: Path, http_port: int, tls_port: int, nodes: list[str]) -> Path:
    """The shipped file, listening on this test's ports, with its certificate and nodes."""
    work.mkdir(parents=True, exist_ok=True)
    shipped = (ROOT / "deploy" / "nginx" / "membrane.conf").read_text()
    certs = make_certs(work)
    site = shipped
    for old, new in (
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;"),
        ("listen [::]:443 ssl http2;", ""),
        ("/etc/nginx/tls/membrane.crt", str(certs.server_cert)),
        ("/etc/nginx/tls/membrane.key", str(certs.server_key)),
        ("/etc/nginx/membrane-nodes.conf", str(work / "nodes.conf")),
    ):
        assert old in site, old
        site = site.replace(old, new)
    (work / "nodes.conf").write_text(
        "".join(f"server {n} max_fails=1 fail_timeout=10s;\n" for n in nodes)
    )
    (work / "membrane.conf").write_text(site)
    main = work / "nginx.conf"
    main.write_text(
        f"""
user root;
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 1024; }}
http {{
    include /etc/nginx/mime.types;
    access_log {work}/access.log;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    include {work}/membrane.conf;
}}
"""
    )
    return main


def error_log(work: Path) -> str:
    return (work / "error.log").read_text()


@asynccontextmanager
async def nginx(work: Path, tls_port: int, nodes: list[str]) -> AsyncIterator[str]:
    """nginx on ``tls_port`` in front of ``nodes`` (host:port): its https URL once it answers."""
    main = nginx_config(work, free_port(), tls_port, nodes)
    check = await asyncio.create_subprocess_exec(
        NGINX, "-t", "-c", str(main), "-p", str(work),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await check.communicate()
    assert check.returncode == 0, out.decode()
    proc = await asyncio.create_subprocess_exec(
        NGINX, "-c", str(main), "-p", str(work),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"https://127.0.0.1:{tls_port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                assert proc.returncode is None, error_log(work)
                try:
                    async with http.get(f"{url}/healthz", ssl=False) as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(up, 15)
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def node_behind(http: aiohttp.ClientSession, url: str) -> str:
    """The node nginx sends this client to (its requests all go to one, by address)."""
    async with http.get(f"{url}/healthz", ssl=False) as r:
        assert r.status == 200
        node: str = (await r.json())["node"]
        return node


async def open_page(context_browser: object, url: str) -> Page:
    from playwright.async_api import Browser

    assert isinstance(context_browser, Browser)
    context = await context_browser.new_context(
        permissions=["microphone"], ignore_https_errors=True
    )
    page = await context.new_page()
    await page.goto(url)
    return page


async def test_a_browser_call_through_nginx_goes_on_while_its_node_drains(
    tmp_path: Path, redis_url: str
) -> None:
    if not HAVE_CHROMIUM:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium")
    settings = make_settings(tmp_path, redis_url=redis_url)
    tls_port = free_port()
    front = f"https://127.0.0.1:{tls_port}"
    text = re.sub(r"(?m)^origins = \[", f'origins = ["{front}", ', config(), count=1)
    env = {
        "MEMBRANE_PUBLIC_URL": front,
        "MEMBRANE_TRUSTED_PROXIES": "127.0.0.1",
        "MEMBRANE_DRAIN_GRACE_S": str(GRACE_S),
        "MEMBRANE_LOG_FORMAT": "json",
    }
    env_a, env_b = {**env, "MEMBRANE_NODE_ID": "a"}, {**env, "MEMBRANE_NODE_ID": "b"}
    async with (
        node_process(tmp_path, settings, redis_url, text, "a", env_a) as (a_url, a_proc),
        node_process(tmp_path, settings, redis_url, text, "b", env_b) as (b_url, b_proc),
        nginx(
            tmp_path / "nginx", tls_port, [u.removeprefix("http://") for u in (a_url, b_url)]
        ) as url,
        aiohttp.ClientSession() as http,
        async_playwright() as p,
    ):
        procs = {"a": a_proc, "b": b_proc}
        serving = await node_behind(http, url)
        other = "b" if serving == "a" else "a"
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"]
        )
        try:
            anna = await open_page(browser, f"{url}/agent/#token={mint(settings, 'anna')}")
            await agent_signed_in(anna)
            visitor = await open_page(browser, f"{url}/demo/")
            button = visitor.get_by_test_id("membrane-button")
            await expect(button).to_have_text("Talk to us now", timeout=WAIT_MS)
            await button.click()
            await expect(anna.get_by_test_id("agent-ring")).to_be_visible(timeout=WAIT_MS)
            await anna.get_by_test_id("agent-accept").click()
            await widget_says(visitor, "Connected with Anna")
            await audio_flows(visitor, WIDGET_PC)
            await audio_flows(anna, AGENT_PC)
            call_id = await anna.evaluate("() => MembraneAgent.call.call_id")

            # The node serving both drains in the middle of the call.
            procs[serving].send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(procs[serving].wait(), GRACE_S + 10) == 0
            # The call went on: audio still flows both ways, both pages still in the call,
            # their sockets back through nginx on the other node.
            await audio_flows(visitor, WIDGET_PC)
            await audio_flows(anna, AGENT_PC)
            await expect(anna.get_by_test_id("agent-call-state")).to_have_text("connected")
            await widget_says(visitor, "Connected with Anna")
            assert await node_behind(http, url) == other
            await agent_signed_in(anna, "on_call")
            assert call_id == await anna.evaluate("() => MembraneAgent.call.call_id")

            # It ends as it should, and the next call is served by the node left.
            await visitor.get_by_test_id("membrane-hangup").click()
            await widget_says(visitor, "Call ended")
            await agent_signed_in(anna, "available")
            await expect(button).to_have_text("Talk to us now", timeout=WAIT_MS)
            await button.click()
            await expect(anna.get_by_test_id("agent-ring")).to_be_visible(timeout=WAIT_MS)
            await anna.get_by_test_id("agent-accept").click()
            await widget_says(visitor, "Connected with Anna")
        finally:
            await browser.close()
    access = (tmp_path / "nginx" / "access.log").read_text()
    assert "GET /socket.io/" in access and " 101 " in access  # websockets, through nginx
