"""nginx in front of two gateway nodes (issue 16), with the shipped config as it is
(deploy/nginx/membrane.conf; only its addresses, certificate paths and node list are this
test's): TLS, websockets, server-sent events, the client's address passed on.

A browser call goes through it; then the node holding both parties' sockets drains
(SIGTERM) in the middle of the call: the call goes on, both pages reconnect through nginx to
the other node, the drained node exits by itself, and the next call is served by the node
left. A callback goes through it too, with Twilio's webhooks arriving over https at the
public URL.

Debian's nginx (`apt-get install nginx`; tests/run installs it) runs as a process of the
test's own, on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    NodeFactory,
    eventually,
    free_port,
    make_settings,
    mint,
    node_process,
    replace,
)
from nginx_front import NGINX, certificates, nginx
from playwright.async_api import Browser, Page, async_playwright, expect
from test_browser_e2e import (
    AGENT_PC,
    CHROMIUM,
    CHROMIUM_ARGS,
    HAVE_CHROMIUM,
    WAIT_MS,
    WIDGET_PC,
    agent_signed_in,
    audio_flows,
    visitor_calls_and_talks,
    widget_says,
)
from test_drain import config
from twilio_sim import TwilioSim

from gateway.settings import TwilioSettings

GRACE_S = 6

pytestmark = [
    pytest.mark.skipif(
        not (HAVE_CHROMIUM and Path(NGINX).exists()) and not os.environ.get("CI"),
        reason="needs Debian's nginx and chromium",
    ),
    pytest.mark.xdist_group("nginx"),
]


async def node_behind(http: aiohttp.ClientSession, url: str) -> str:
    """The node nginx sends this client to (its requests all go to one, by address)."""
    async with http.get(f"{url}/healthz", ssl=False) as r:
        assert r.status == 200
        node: str = (await r.json())["node"]
        return node


async def open_page(browser: Browser, url: str) -> Page:
    context = await browser.new_context(permissions=["microphone"], ignore_https_errors=True)
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
            await visitor_calls_and_talks(visitor, anna)
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
            await visitor_calls_and_talks(visitor, anna)
        finally:
            await browser.close()
    access = (tmp_path / "nginx" / "access.log").read_text()
    assert "GET /socket.io/" in access and " 101 " in access  # websockets, through nginx


async def node_taking(url: str, address: str) -> str:
    """The node nginx gives a new socket from ``address`` (clients stay on a node by address;
    a draining node's 503 sends the request on to the next)."""
    connector = aiohttp.TCPConnector(ssl=False, local_addr=(address, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(f"{url}/readyz") as r,
    ):
        assert r.status == 200, await r.text()
        node: str = (await r.json())["node"]
        return node


async def test_a_node_started_again_behind_nginx_gets_its_clients_back_at_once(
    tmp_path: Path, redis_url: str
) -> None:
    """With the shipped node list (``max_fails=0``), nginx sends a restarted node its share at
    once. With ``max_fails=1``, the 503s of its drain had nginx mark it failed, and a node
    marked failed got one new websocket per ``fail_timeout`` until one of them closed: after
    a rolling restart nginx found no node live and answered 502 (bench/rolling_restart.py)."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    tls_port = free_port()
    env = {"MEMBRANE_TRUSTED_PROXIES": "127.0.0.1", "MEMBRANE_DRAIN_GRACE_S": "3"}
    env_a, env_b = {**env, "MEMBRANE_NODE_ID": "a"}, {**env, "MEMBRANE_NODE_ID": "b"}
    a_port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        a_url, a_proc = await stack.enter_async_context(
            node_process(tmp_path, settings, redis_url, config(), "a", env_a, port=a_port)
        )
        b_url, _ = await stack.enter_async_context(
            node_process(tmp_path, settings, redis_url, config(), "b", env_b)
        )
        upstream = [u.removeprefix("http://") for u in (a_url, b_url)]
        url = await stack.enter_async_context(nginx(tmp_path / "nginx", tls_port, upstream))
        addresses = [f"127.0.1.{i}" for i in range(1, 40)]
        behind = {address: await node_taking(url, address) for address in addresses}
        of_a = [address for address, node in behind.items() if node == "a"]
        assert of_a and len(of_a) < len(addresses), behind

        a_proc.send_signal(signal.SIGTERM)

        async def sent_to_b() -> bool:
            return await node_taking(url, of_a[0]) == "b"

        # Once it drains, its clients are sent to b (its 503s retried there).
        await eventually(sent_to_b, 5)
        assert await asyncio.wait_for(a_proc.wait(), 15) == 0
        # Stopped: refused connections, retried on b.
        assert await node_taking(url, of_a[0]) == "b"

        await stack.enter_async_context(
            node_process(tmp_path, settings, redis_url, config(), "a", env_a, port=a_port)
        )
        assert [await node_taking(url, address) for address in of_a] == ["a"] * len(of_a)


async def test_a_callback_through_nginx_with_twilio_calling_back_over_https(
    nodes: NodeFactory, tmp_path: Path, redis_url: str
) -> None:
    """The visitor books a callback through nginx; Anna accepts it; Twilio (the local
    stand-in, trusting this test's certificate authority as Twilio trusts public ones)
    dials both phones and asks for its instructions at the public https URL, through nginx,
    whichever node it reaches; the widget's ticket follows it to the end."""
    if not HAVE_CHROMIUM:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium")
    work = tmp_path / "nginx"
    certs = certificates(work)
    sim = TwilioSim(time_scale=0.05, webhook_ca=certs.ca)
    await sim.start()
    try:
        sim.phone("+353861110001", answer_after=1)
        sim.phone("+353871234567", answer_after=1)  # Anna's mobile, from the demo config
        tls_port = free_port()
        front = f"https://127.0.0.1:{tls_port}"
        twilio = TwilioSettings(sim.account_sid, sim.auth_token, sim.base_url)
        base = make_settings(
            tmp_path, redis_url=redis_url, twilio=twilio, public_url=front,
            trusted_proxies=("127.0.0.1",),
        )  # fmt: skip
        acme = base.sites["acme"]
        # Callbacks wait out the number's night: the test moves the quiet hours away from
        # now, as a site's config cannot.
        quiet = (datetime.now(UTC) + timedelta(hours=12)).time().replace(second=0, microsecond=0)
        quiet_end = (
            datetime.combine(datetime.now(UTC).date(), quiet) + timedelta(minutes=1)
        ).time()
        policy = replace(acme.callback_policy, quiet_hours_start=quiet, quiet_hours_end=quiet_end)
        acme = replace(acme, allowed_origins=(front,), callback_policy=policy)
        settings = replace(base, sites={**base.sites, "acme": acme})
        a = await nodes(replace(settings, node_id="a", port=free_port()))
        b = await nodes(replace(settings, node_id="b", port=free_port()))
        upstream = [n.url.removeprefix("http://") for n in (a, b)]
        async with nginx(work, tls_port, upstream) as url, async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=str(CHROMIUM),
                args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"],
            )
            try:
                anna = await open_page(browser, f"{url}/agent/#token={mint(settings, 'anna')}")
                await agent_signed_in(anna)
                await anna.get_by_test_id("agent-state-select").select_option("away")
                await agent_signed_in(anna, "away")
                visitor = await open_page(browser, f"{url}/demo/")
                button = visitor.get_by_test_id("membrane-button")
                await expect(button).to_contain_text("Call me back", timeout=WAIT_MS)
                await button.click()
                await visitor.get_by_test_id("membrane-country").select_option("IE")
                await visitor.get_by_test_id("membrane-phone").fill("086 111 0001")
                await visitor.get_by_test_id("membrane-submit").click()
                ticket = visitor.get_by_test_id("membrane-ticket")
                await expect(ticket).to_contain_text("We'll call you", timeout=WAIT_MS)

                await anna.get_by_test_id("agent-state-select").select_option("available")
                await expect(anna.get_by_test_id("agent-ring")).to_be_visible(timeout=WAIT_MS)
                await anna.get_by_test_id("agent-accept").click()
                leg = await sim.wait_for_call(to="+353861110001", status="in-progress", timeout=10)
                await sim.wait_for_call(to="+353871234567", status="in-progress", timeout=10)
                await expect(anna.get_by_test_id("agent-call-state")).to_have_text("connected")
                await expect(ticket).to_contain_text("on the phone with Anna", timeout=WAIT_MS)
                sim.hangup(leg.sid)
                await expect(ticket).to_contain_text("Done.", timeout=WAIT_MS)
                await agent_signed_in(anna, "available")
            finally:
                await browser.close()
        # Twilio's every webhook came through nginx, over https, to the public URL.
        hooks = [line for line in access_log(work) if "/twilio/" in line]
        assert hooks and all('" 200 ' in line for line in hooks), hooks
        assert [c.to for c in sim.calls] == ["+353861110001", "+353871234567"]
    finally:
        await sim.close()
    assert sim.contract_violations == []


def access_log(work: Path) -> list[str]:
    return (work / "access.log").read_text().splitlines()
