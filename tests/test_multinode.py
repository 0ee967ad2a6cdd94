"""Several gateway nodes sharing one Redis act as one: presence, board, lapses."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    Node,
    NodeFactory,
    RedisServer,
    SocketClient,
    eventually,
    make_settings,
    mint,
    node_process,
    replace,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.core import call as calls
from gateway.core.errors import StoreUnavailable
from gateway.core.model import Device, DeviceKind, DeviceState, PresenceStatus, Role
from gateway.edge.http import appkeys as keys
from gateway.ops.clock import Clock, ManualClock
from gateway.settings import PresenceSettings, Settings, demo_config_text


def status_of(name: str, status: str) -> Callable[[Any], bool]:
    return lambda p: p["agent_id"] == name and p["status"] == status


async def visitor_calls(
    http: aiohttp.ClientSession, clients: Callable[[], SocketClient], url: str
) -> tuple[SocketClient, Any]:
    """A new visitor on the demo page, connected to the node at ``url``, presses the button:
    their socket and the start's ack."""
    r = await http.post(
        f"{url}/v1/sites/acme/sessions", json={}, headers={"Origin": "http://127.0.0.1:8080"}
    )
    visitor = clients()
    await visitor.connect(url, "/visitor", {"token": (await r.json())["token"]})
    return visitor, await visitor.call("call:start", {}, "/visitor")


def has_devices(name: str, ids: set[str]) -> Callable[[Any], bool]:
    return lambda p: p["agent_id"] == name and {d["device_id"] for d in p["devices"]} == ids


async def test_two_nodes_share_presence_board_and_lapses(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
) -> None:
    ttl = 1.0
    settings = make_settings(
        tmp_path,
        redis_url=redis_url,
        presence=PresenceSettings(device_ttl_s=ttl, socket_ttl_s=15.0, sweep_interval_s=0.25),
    )
    a = await nodes(replace(settings, node_id="node-a"), clock=clock)
    b = await nodes(replace(settings, node_id="node-b"), clock=clock)
    agent_token = mint(settings, "anna")
    auth = {"Authorization": f"Bearer {agent_token}"}

    board = clients()
    await board.connect(b.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    desktop = clients()
    await desktop.connect(a.url, "/agent", {"token": agent_token})

    # The desktop connected on A: the board on B sees Anna available on webrtc.
    seen = await board.next("presence:update", status_of("anna", "available"))
    assert seen["channels"] == ["webrtc"] and seen["devices"][0]["kind"] == "desktop"
    desk_id = seen["devices"][0]["device_id"]

    # Her mobile goes available over REST on B: both her desktop (A) and the board (B) see it.
    r = await http.put(
        f"{b.url}/v1/agents/me/devices/mobile-1",
        json={"kind": "mobile", "state": "available", "priority": 5},
        headers=auth,
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["channels"] == ["pstn", "webrtc"], "higher priority device first"
    both = {desk_id, "mobile-1"}
    await board.next("presence:update", has_devices("anna", both))
    await desktop.next("presence:update", has_devices("anna", both))

    # DND on the desktop (A) wins over the available mobile, on every node.
    ack = await desktop.call("presence:set", {"kind": "desktop", "state": "dnd"}, "/agent")
    assert ack["ok"] and ack["presence"]["status"] == "dnd"
    await board.next("presence:update", status_of("anna", "dnd"))
    for node in (a, b):
        r = await http.get(f"{node.url}/v1/agents/me", headers=auth)
        assert (await r.json())["status"] == "dnd"

    # The desktop socket drops: only the mobile is left, still available.
    await desktop.close()
    after_drop = await board.next("presence:update", has_devices("anna", {"mobile-1"}))
    assert after_drop["status"] == "available" and after_drop["channels"] == ["pstn"]

    # A heartbeat on A keeps the mobile alive; then it stops and the lease lapses.
    r = await http.post(f"{a.url}/v1/agents/me/devices/mobile-1/heartbeat", headers=auth)
    assert r.status == 200
    await clock.advance(ttl - 0.1)  # both nodes have swept meanwhile
    record = await a.app[keys.STORE].get_presence("acme", "anna")
    assert [d.device_id for d in record.devices] == ["mobile-1"], "not lapsed before its TTL"
    await clock.advance(0.2)
    offline = await board.next("presence:update", status_of("anna", "offline"))
    assert offline["devices"] == [] and offline["channels"] == []
    sup = {"Authorization": f"Bearer {mint(settings, 'sam', Role.SUPERVISOR)}"}
    for node in (a, b):
        # The node that claimed the lapse told its own board first, then the other node.
        async def anna_offline(url: str = node.url) -> bool:
            r = await http.get(f"{url}/v1/sites/acme/agents", headers=sup)
            anna = next(p for p in await r.json() if p["agent_id"] == "anna")
            return bool(anna["status"] == "offline")

        await eventually(anna_offline, 1.0)


DOOMED_SOCKET_TTL_S = 2.0


def doomed_node(
    tmp_path: Path, settings: Settings, redis_url: str
) -> AbstractAsyncContextManager[tuple[str, asyncio.subprocess.Process]]:
    """A gateway node in its own process (so it can be SIGKILLed), socket TTL 2 s."""
    ttl = f"socket_ttl_s = {DOOMED_SOCKET_TTL_S:g}"
    config = demo_config_text().replace("socket_ttl_s = 15", ttl)
    return node_process(tmp_path, settings, redis_url, config, "doomed")


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL: no shutdown, no disconnects, nothing cleaned up."""
    proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(proc.wait(), 10)


async def lease_time_passes(survivor: Clock) -> None:
    """The survivor's clock moves past the last lease the doomed node renewed. That node ran
    in its own process, on the real clock (a process cannot share a test's clock), so the
    survivor's is first brought up to the real time."""
    assert isinstance(survivor, ManualClock)
    await survivor.advance(time.time() - survivor.now() + DOOMED_SOCKET_TTL_S)


async def test_agent_on_a_killed_node_goes_offline_everywhere(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    clients: Callable[[], SocketClient],
) -> None:
    """A node that dies without a word (SIGKILL) cannot remove its sockets' devices: their
    leases, no longer renewed, lapse and the surviving node reports the agent offline."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    async with doomed_node(tmp_path, settings, redis_url) as (doomed_url, proc):
        survivor = await nodes(replace(settings, node_id="survivor"), clock=ManualClock())
        board = clients()
        await board.connect(
            survivor.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)}
        )
        agent = clients()
        await agent.connect(doomed_url, "/agent", {"token": mint(settings, "ben")})
        await board.next("presence:update", status_of("ben", "available"))

        await kill(proc)
        await lease_time_passes(survivor.clock)
        await board.next("presence:update", status_of("ben", "offline"))


async def test_a_call_whose_agent_node_dies_ends_and_frees_the_agent(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    settings = make_settings(tmp_path, redis_url=redis_url)
    async with doomed_node(tmp_path, settings, redis_url) as (doomed_url, proc):
        survivor = await nodes(replace(settings, node_id="survivor"), clock=ManualClock())
        board = clients()
        await board.connect(
            survivor.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)}
        )
        agent = clients()
        await agent.connect(doomed_url, "/agent", {"token": mint(settings, "carla")})
        await board.next("presence:update", status_of("carla", "available"))
        visitor, _ = await visitor_calls(http, clients, survivor.url)
        ring = await agent.next("call:ring")
        await agent.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
        await visitor.next("call:update", lambda c: c["state"] == "connected")
        await board.next("presence:update", status_of("carla", "on_call"))

        await kill(proc)
        await lease_time_passes(survivor.clock)
        ended = await visitor.next("call:update", lambda c: c["state"] == "completed")
        assert ended["reason"] == "agent_left"
        gone = await board.next(
            "presence:update",
            lambda p: p["agent_id"] == "carla" and p["status"] == "offline",
            timeout=5,
        )
        assert gone["channels"] == []
        r = await http.get(
            f"{survivor.url}/v1/sites/acme/agents",
            headers={"Authorization": f"Bearer {mint(settings, 'sam', Role.SUPERVISOR)}"},
        )
        carla = next(p for p in await r.json() if p["agent_id"] == "carla")
        assert carla["status"] == "offline", "not stuck on a call that no longer exists"


async def test_nodes_hear_each_others_emits_again_after_redis_restarts(
    nodes: NodeFactory,
    redis_server: RedisServer,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """socket.io's listener resubscribes: a ring from node A still reaches an agent on B."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    redis_server.stop()
    redis_server.start()

    async def ready(url: str) -> bool:
        async with http.get(f"{url}/readyz") as r:
            return r.status == 200

    await eventually(lambda: ready(a.url), 15)
    await eventually(lambda: ready(b.url), 15)
    agent = clients()
    await agent.connect(b.url, "/agent", {"token": mint(settings, "carla")})
    await agent.next("presence:update", status_of("carla", "available"))
    visitor, _ = await visitor_calls(http, clients, a.url)
    ring = await agent.next("call:ring")
    await agent.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
    connected = await visitor.next("call:update", lambda c: c["state"] == "connected")
    assert connected["call_id"] == ring["call_id"]


async def online_on_b(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    clients: Callable[[], SocketClient],
    name: str = "carla",
) -> tuple[Node, Node, SocketClient]:
    """Nodes A and B, and the app of agent ``name`` on B, available: the nodes and her
    socket."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    agent = clients()
    await agent.connect(b.url, "/agent", {"token": mint(settings, name)})
    await agent.next("presence:update", status_of(name, "available"))
    return a, b, agent


async def carla_rung(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> tuple[Node, Node, SocketClient, SocketClient, dict[str, str]]:
    """Nodes A and B; Carla's app, on B, rings for the call of a visitor on A: the nodes,
    her socket, the visitor's, and the call's id as events name it."""
    a, b, agent = await online_on_b(nodes, redis_url, tmp_path, clients)
    visitor, _ = await visitor_calls(http, clients, a.url)
    return a, b, agent, visitor, {"call_id": (await agent.next("call:ring"))["call_id"]}


@pytest.mark.parametrize("ending", ["answered, then hung up", "declined"])
async def test_an_agent_freed_on_another_node_is_rung_again_at_once(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    ending: str,
) -> None:
    """Node A rang Carla on B and her ring ended there: she answered and hung up (her
    presence changed), or declined (it did not: she stayed available). A's own note that
    she was ringing must not keep her from A's next caller (it did, for 30 s, after a
    decline)."""
    a, _, agent, first, call = await carla_rung(nodes, redis_url, tmp_path, http, clients)
    if ending == "declined":
        await agent.call("call:decline", call, "/agent")
        failed = await first.next("call:update", lambda c: c["state"] == "failed")
        assert failed["reason"] == "no_agent_answered"
    else:
        await agent.call("call:accept", call, "/agent")
        await first.next("call:update", lambda c: c["state"] == "connected")
        await agent.call("call:hangup", call, "/agent")
        await first.next("call:update", lambda c: c["state"] == "completed")

    async def free_on_a() -> bool:
        async with http.get(f"{a.url}/v1/sites/acme/availability") as r:
            return bool((await r.json())["agents_available"] == 1)

    await eventually(free_on_a, 5)
    _, ack = await visitor_calls(http, clients, a.url)
    assert ack["ok"] and ack["call"]["state"] == "ringing", ack
    again = await agent.next("call:ring")
    assert again["call_id"] == ack["call"]["call_id"]


async def test_an_agent_changed_behind_a_nodes_back_goes_on_and_off_a_call_as_stored(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """A node predicts an agent's record as she goes on or off a call, from what it last
    heard of her, to save and publish it in the same round trip. When her record changed
    since (a change the node has not heard of yet), the prediction fails and the node
    publishes the record as stored: every node sees her on the call, with every device."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    board = clients()
    await board.connect(a.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    agent = clients()
    await agent.connect(b.url, "/agent", {"token": mint(settings, "anna")})
    await board.next("presence:update", status_of("anna", "available"))

    # Written to the store directly: no node hears of it.
    unheard = Device("im", DeviceKind.IM, DeviceState.AWAY, 0, time.time(), time.time() + 60)
    await b.app[keys.STORE].put_device("acme", "anna", unheard)
    visitor, ack = await visitor_calls(http, clients, a.url)
    call = {"call_id": ack["call"]["call_id"]}
    await agent.next("call:ring")
    await agent.call("call:accept", call, "/agent")
    on_call = await board.next("presence:update", status_of("anna", "on_call"))
    assert {d["kind"] for d in on_call["devices"]} == {"im", "desktop"}
    await agent.next("presence:update", status_of("anna", "on_call"))

    await b.app[keys.STORE].put_device("acme", "anna", replace(unheard, state=DeviceState.DND))
    await agent.call("call:hangup", call, "/agent")
    await visitor.next("call:update", lambda c: c["state"] == "completed")
    after = await board.next("presence:update", status_of("anna", "dnd"))
    assert {d["device_id"]: d["state"] for d in after["devices"]}["im"] == "dnd"
    stored = await a.app[keys.STORE].get_presence("acme", "anna")
    assert stored.active_call is None and stored.status is PresenceStatus.DND


async def predictions(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    return {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "membrane_presence_predictions_total"
    }


async def test_an_agents_node_predicts_her_call_after_her_lease_was_renewed_unheard(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
) -> None:
    """A socket's lease is renewed without an event, so what a node last heard of the
    device says it expired long ago. Going on and off a call is still predicted, and so
    saved and published in one round trip each."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    a = await nodes(replace(settings, node_id="a"), clock=clock)
    b = await nodes(replace(settings, node_id="b"), clock=clock)
    agent = clients()
    await agent.connect(b.url, "/agent", {"token": mint(settings, "anna")})
    await agent.next("presence:update", status_of("anna", "available"))
    await clock.advance(3 * settings.presence.socket_ttl_s)  # renewed all the while
    before = await predictions(http, b.url)

    _, ack = await visitor_calls(http, clients, a.url)
    call = {"call_id": ack["call"]["call_id"]}
    await agent.next("call:ring")
    await agent.call("call:accept", call, "/agent")
    await agent.next("presence:update", status_of("anna", "on_call"))
    await agent.call("call:hangup", call, "/agent")
    await agent.next("presence:update", status_of("anna", "available"))
    after = await predictions(http, b.url)
    assert after.get("held", 0) - before.get("held", 0) == 2
    assert after.get("missed", 0) == before.get("missed", 0)


async def test_no_node_promises_an_agent_who_rings_for_someone_else(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Anna, on B, rings for a visitor of B: an idle widget watching A stops promising her
    at once, and promises her again when she declines."""
    a, b, agent = await online_on_b(nodes, redis_url, tmp_path, clients, "anna")
    stream = await http.get(
        f"{a.url}/v1/sites/acme/availability/stream", headers={"Origin": "http://127.0.0.1:8080"}
    )

    async def next_available() -> bool:
        while True:
            line = await asyncio.wait_for(stream.content.readline(), 5)
            if line.startswith(b"data: "):
                return bool(json.loads(line[6:])["available"])

    # A hears of her through Redis a moment after B: the stream says so when it does.
    while not await next_available():
        pass
    _, ack = await visitor_calls(http, clients, b.url)
    assert ack["call"]["state"] == "ringing"
    assert await next_available() is False
    r = await http.get(f"{a.url}/v1/sites/acme/availability")
    assert (await r.json())["agents_available"] == 0
    await agent.call("call:decline", {"call_id": ack["call"]["call_id"]}, "/agent")
    assert await next_available() is True
    stream.close()


async def test_a_node_that_stored_a_call_decides_on_the_newest_after_another_node_moved_it(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """A node keeps the calls it stored, to answer an accept or a hang-up without reading
    the call back. Here each node's copy is stale when asked: Carla's app is open on both
    nodes, A rang her and B took her accept; then the visitor hung up on B. Each late request
    is answered from the newest call, and nothing happens twice."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    token = mint(settings, "carla")
    on_a, on_b = clients(), clients()
    await on_a.connect(a.url, "/agent", {"token": token})
    await on_b.connect(b.url, "/agent", {"token": token})
    await on_a.next("presence:update", status_of("carla", "available"))
    await on_b.next("presence:update", status_of("carla", "available"))

    visitor, _ = await visitor_calls(http, clients, a.url)  # A stores the ring
    ring = await on_a.next("call:ring")
    call = {"call_id": ring["call_id"]}
    assert (await on_b.call("call:accept", call, "/agent"))["ok"]
    await visitor.next("call:update", lambda c: c["state"] == "connected")

    # A's copy still says ringing for Carla: the newest says she took it on B.
    late = await on_a.call("call:accept", call, "/agent")
    assert late["error"]["code"] == "not_ringing", late

    # B's copy says connected; the visitor hangs up, on A, before Carla does, on B.
    assert (await visitor.call("call:cancel", call, "/visitor"))["call"]["state"] == "completed"
    late = await on_b.call("call:hangup", call, "/agent")
    assert late["error"]["code"] == "call_ended", late
    stored = await a.app[keys.STORE].get_call(ring["call_id"])
    assert stored is not None and stored.data["reason"] == "visitor_hung_up"

    # Freed once, and free: the next caller rings her.
    await on_b.next("presence:update", status_of("carla", "available"))
    _, again = await visitor_calls(http, clients, b.url)
    assert again["ok"] and again["call"]["state"] == "ringing", again


async def carla_talks(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> tuple[Node, Node, SocketClient, SocketClient, dict[str, str]]:
    """As ``carla_rung``, and she has accepted the call."""
    a, b, agent, visitor, call = await carla_rung(nodes, redis_url, tmp_path, http, clients)
    assert (await agent.call("call:accept", call, "/agent"))["ok"]
    await agent.next("presence:update", status_of("carla", "on_call"))
    return a, b, agent, visitor, call


async def rung_again(
    agent: SocketClient, http: aiohttp.ClientSession, clients: Callable[[], SocketClient], url: str
) -> None:
    """Carla is free again: available, and the next caller (on the node at ``url``) rings her."""
    await agent.next("presence:update", status_of("carla", "available"))
    _, ack = await visitor_calls(http, clients, url)
    assert ack["ok"] and ack["call"]["state"] == "ringing", ack


@pytest.mark.parametrize("party", ["agent", "visitor"])
async def test_an_end_stored_but_never_heard_frees_the_agent_when_asked_again(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    party: str,
) -> None:
    """A hang-up's end was stored as Redis froze: its node heard a timeout, told the party
    the store was unavailable, and freed nobody. The party asks again: the call has ended,
    and the agent, still on it and reserved, is freed then."""
    a, b, agent, visitor, call = await carla_talks(nodes, redis_url, tmp_path, http, clients)

    # The end stored, and nothing after it (as by a node whose store went away just then).
    await a.app[keys.CALLS].records.update(
        call["call_id"], lambda c: calls.end(c, "agent_hung_up", "The agent ended the call", 0.0)
    )
    if party == "agent":
        again = await agent.call("call:hangup", call, "/agent")
    else:
        again = await visitor.call("call:cancel", call, "/visitor")
    assert again["error"]["code"] == "call_ended", again

    await rung_again(agent, http, clients, b.url)


async def test_an_end_stored_as_its_answer_was_lost_frees_the_agent_unasked(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Redis takes a hang-up's end and its answer is lost (a freeze: the node times out).
    The app hears store_unavailable and, here, never asks again (its socket went away): the
    node itself finds the end stored once the store answers, tells the visitor and frees
    the agent."""
    a, b, agent, visitor, call = await carla_talks(nodes, redis_url, tmp_path, http, clients)

    store = b.app[keys.STORE]
    put_call = store.put_call

    async def stored_but_unheard(row: Any) -> bool:
        store.put_call = put_call  # type: ignore[method-assign]  # once
        await put_call(row)
        raise StoreUnavailable()

    store.put_call = stored_but_unheard  # type: ignore[method-assign]
    refused = await agent.call("call:hangup", call, "/agent")
    assert refused["error"]["code"] == "store_unavailable", refused

    ended = await visitor.next("call:update", lambda c: c["state"] == "completed")
    assert ended["reason"] == "agent_hung_up"
    await rung_again(agent, http, clients, a.url)


async def test_a_start_whose_call_was_not_stored_lets_its_agent_go(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """A new call is stored in the same write as its first reservation. When the store
    refuses the call but takes the reservation, the visitor hears the store is unavailable,
    Carla is not rung, and her reservation is let go: the next caller rings her at once,
    not after the reservation's TTL."""
    a, _, agent = await online_on_b(nodes, redis_url, tmp_path, clients)
    store = a.app[keys.STORE]
    put_call = store.put_call

    async def refused(row: Any) -> bool:
        store.put_call = put_call  # type: ignore[method-assign]  # once
        raise StoreUnavailable()

    store.put_call = refused  # type: ignore[method-assign]
    _, ack = await visitor_calls(http, clients, a.url)
    assert ack["error"]["code"] == "store_unavailable", ack

    _, ack = await visitor_calls(http, clients, a.url)
    assert ack["ok"] and ack["call"]["state"] == "ringing", ack
    ring = await agent.next("call:ring")
    assert ring["call_id"] == ack["call"]["call_id"], "rung only for the call stored"


async def test_a_connected_agent_outlives_many_socket_leases(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
) -> None:
    """Leases are renewed in slices spread over a third of their TTL: none lapses, though
    both nodes sweep for lapses all along."""
    settings = make_settings(
        tmp_path,
        redis_url=redis_url,
        presence=PresenceSettings(device_ttl_s=60.0, socket_ttl_s=1.0, sweep_interval_s=0.1),
    )
    a = await nodes(replace(settings, node_id="a"), clock=clock)
    b = await nodes(replace(settings, node_id="b"), clock=clock)
    board = clients()
    await board.connect(b.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    for name in ("anna", "ben", "carla"):
        agent = clients()
        await agent.connect(a.url, "/agent", {"token": mint(settings, name)})
        await board.next("presence:update", status_of(name, "available"))
    await clock.advance(4.0)  # four leases, renewed and swept at each step on the way
    store = a.app[keys.STORE]
    for name in ("anna", "ben", "carla"):
        record = await store.get_presence("acme", name)
        assert [d.expires_at > clock.now() for d in record.devices] == [True], name
    gone = [p for p in board.pending("presence:update") if p["status"] != "available"]
    assert gone == [], "a lease lapsed while connected"


async def test_emits_published_back_to_back_go_to_redis_as_one_message(redis_url: str) -> None:
    """A ring and its call's update, published one right after the other, reach the other
    nodes as one batch, in order; anything queued on the lane after a publish ends its
    batch, so what follows an emit still reaches Redis after it."""
    from gateway.edge.sio.sio_manager import BATCH, ObservedRedisManager
    from gateway.store.redis_lane import RedisSubscription

    heard: asyncio.Queue[str] = asyncio.Queue()
    subscription = RedisSubscription(heard.put_nowait)
    manager = ObservedRedisManager(redis_url, channel="m:sio-batched")
    lane = manager._lane
    try:
        await subscription.open(redis_url, "m:sio-batched")
        await lane.execute("DEL", "after")
        ring = manager._emit_message("call:ring", {"n": 1}, "/agent", "agent:acme:carla")
        update = [
            manager._emit_message("call:update", {"n": 2}, "/visitor", "visitor:acme:v1"),
            manager._emit_message("call:update", {"n": 3}, "/board", "site:acme"),
        ]
        await manager._publish(ring)
        await manager._publish({"method": BATCH, "emits": update, "host_id": manager.host_id})
        lane.send("RPUSH", "after", "x")  # a store command after the emits
        await manager._publish(manager._emit_message("call:ring_stop", {"n": 4}, "/agent", "a"))
        assert await lane.execute("LRANGE", "after", 0, -1) == ["x"]

        batch = await asyncio.wait_for(heard.get(), 5)
        assert [e["data"] for e in manager._unbatch(batch)] == [[{"n": 1}], [{"n": 2}], [{"n": 3}]]
        assert batch.endswith(manager._own_suffix()), "a node still knows its own batch"
        alone = json.loads(await asyncio.wait_for(heard.get(), 5))
        assert (alone["event"], alone["data"]) == ("call:ring_stop", [{"n": 4}])
        assert heard.empty()
    finally:
        subscription.close()
        await manager.close()


def test_a_malformed_emit_batch_is_dropped_whole() -> None:
    from gateway.edge.sio.sio_manager import BATCH, ObservedRedisManager

    manager = ObservedRedisManager("redis://127.0.0.1:1/0", channel="m:sio")
    good = {"method": "emit", "event": "call:update", "host_id": "x"}
    batch = json.dumps({"method": BATCH, "emits": [good, 7]})
    assert manager._unbatch(batch) == [good], "non-objects inside are skipped"
    for bad in (batch[:30], json.dumps({"method": BATCH, "emits": 3})):
        assert manager._unbatch(bad) == []
