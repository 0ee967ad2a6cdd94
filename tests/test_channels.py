"""The button tells the truth about channels: availability counts an agent only for the
channels that can reach them now, on a node with telephony and on one without (two nodes
sharing one Redis, so the same presence gets both answers)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    Node,
    NodeFactory,
    SocketClient,
    eventually,
    free_port,
    make_settings,
    mint,
    replace,
)
from test_callbacks import without_quiet_hours_now
from twilio_sim import TwilioSim

from gateway.settings import TwilioSettings

ORIGIN = {"Origin": "http://127.0.0.1:8080"}


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    sim = TwilioSim(time_scale=0.05)
    await sim.start()
    yield sim
    await sim.close()
    assert sim.contract_violations == []


async def two_nodes(
    nodes: NodeFactory, tmp_path: Path, redis_url: str, sim: TwilioSim
) -> tuple[Node, Node]:
    """Node ``phones`` with a telephony provider (the simulator), node ``plain`` without."""
    port = free_port()
    phones = make_settings(
        tmp_path / "phones",
        redis_url=redis_url,
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        twilio=TwilioSettings(sim.account_sid, sim.auth_token, sim.base_url),
        node_id="phones",
    )
    plain = replace(make_settings(tmp_path / "plain", redis_url=redis_url), node_id="plain")
    return await nodes(without_quiet_hours_now(phones)), await nodes(plain)


async def availability(http: aiohttp.ClientSession, node: Node) -> dict[str, Any]:
    r = await http.get(f"{node.url}/v1/sites/acme/availability")
    assert r.status == 200, await r.text()
    body: dict[str, Any] = await r.json()
    return body


async def shows(
    http: aiohttp.ClientSession, node: Node, available: bool, channels: list[str], count: int
) -> dict[str, Any]:
    """Wait until ``node``'s availability says this (it follows presence events)."""
    seen: list[dict[str, Any]] = []

    async def check() -> bool:
        seen.append(await availability(http, node))
        got = seen[-1]
        return (got["available"], got["channels"], got["agents_available"]) == (
            available,
            channels,
            count,
        )

    try:
        await eventually(check, 5)
    except TimeoutError:
        raise AssertionError(f"{node.settings.node_id} never showed it: {seen[-1]}") from None
    return seen[-1]


async def mobile_device(http: aiohttp.ClientSession, node: Node, agent: str) -> None:
    """``agent`` is available on a mobile device only (an app or SMS reporting presence)."""
    r = await http.put(
        f"{node.url}/v1/agents/me/devices/mobile-1",
        json={"kind": "mobile", "state": "available", "priority": 0},
        headers={"Authorization": f"Bearer {mint(node.settings, agent)}"},
    )
    assert r.status == 200, await r.text()


async def test_availability_counts_each_agent_only_for_the_channels_that_reach_them(
    nodes: NodeFactory,
    tmp_path: Path,
    redis_url: str,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    phones, plain = await two_nodes(nodes, tmp_path, redis_url, sim)
    nobody = await shows(http, phones, False, [], 0)
    assert nobody["callbacks"] is True
    assert (await shows(http, plain, False, [], 0))["callbacks"] is False

    # Anna (who has a mobile number) is only on her mobile: a callback can reach her where
    # there is telephony; a browser call cannot, and without telephony nothing can.
    await mobile_device(http, plain, "anna")
    await shows(http, phones, True, ["pstn"], 1)
    await shows(http, plain, False, [], 0)

    # Carla has no mobile number: on a mobile device alone she is reachable on nothing.
    await mobile_device(http, phones, "carla")
    await shows(http, phones, True, ["pstn"], 1)

    # Carla opens the agent app: a browser call reaches her on both nodes; a callback still
    # only reaches Anna.
    carla = clients()
    await carla.connect(plain.url, "/agent", {"token": mint(plain.settings, "carla")})
    await shows(http, phones, True, ["webrtc", "pstn"], 2)
    await shows(http, plain, True, ["webrtc"], 1)

    # Ben (with a number) in the app: callbacks reach him too, but not without telephony.
    ben = clients()
    await ben.connect(phones.url, "/agent", {"token": mint(phones.settings, "ben")})
    await shows(http, phones, True, ["webrtc", "pstn"], 3)
    await shows(http, plain, True, ["webrtc"], 2)

    # The stream an idle widget holds says the same.
    async with http.get(f"{plain.url}/v1/sites/acme/availability/stream") as r:
        first = (await r.content.readuntil(b"\n\n")).decode()
    assert '"channels":["webrtc"]' in first and '"callbacks":false' in first, first


async def test_without_telephony_no_callback_is_offered_nor_taken(
    nodes: NodeFactory,
    tmp_path: Path,
    redis_url: str,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
) -> None:
    phones, plain = await two_nodes(nodes, tmp_path, redis_url, sim)
    await mobile_device(http, phones, "anna")
    await shows(http, phones, True, ["pstn"], 1)
    for node, status in ((plain, 503), (phones, 201)):
        r = await http.post(f"{node.url}/v1/sites/acme/sessions", json={}, headers=ORIGIN)
        token = (await r.json())["token"]
        r = await http.post(
            f"{node.url}/v1/sites/acme/callbacks",
            json={"phone": "+353861110001"},
            headers={**ORIGIN, "Authorization": f"Bearer {token}"},
        )
        body = await r.json()
        assert r.status == status, body
        if status == 503:
            assert body["error"]["code"] == "callbacks_unavailable"
    assert (await availability(http, plain))["callbacks"] is False
