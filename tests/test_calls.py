"""Browser calls with real socket.io clients: routing, ringing, accept, decline, timeout,
signaling, hang-up, abuse; on one node of each store and across two nodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import socketio
from conftest import (
    WEEKDAY_NOON_UTC,
    Node,
    NodeFactory,
    SocketClient,
    Spy,
    eventually,
    make_settings,
    mint,
    replace,
    timers_of,
)

from gateway.core.call import CallState
from gateway.edge.http import appkeys
from gateway.ops.clock import ManualClock
from gateway.services.call_desk import CallDesk
from gateway.services.call_records import TimerKind
from gateway.settings import Settings

ORIGIN = {"Origin": "http://127.0.0.1:8080"}


def fast_ring(settings: Settings, ring_timeout_s: float = 3.0) -> Settings:
    sites = {k: replace(s, ring_timeout_s=ring_timeout_s) for k, s in settings.sites.items()}
    return replace(settings, sites=sites)


@pytest.fixture
def clock() -> ManualClock:
    """This module's nodes start on a weekday at noon, with every branch open: who is rung
    first must not depend on the hour the suite runs at."""
    return ManualClock(start=WEEKDAY_NOON_UTC)


@pytest.fixture(params=["embedded", "redis"])
async def node(
    request: pytest.FixtureRequest, nodes: NodeFactory, tmp_path: Path, clock: ManualClock
) -> Node:
    """A node whose time moves only when a test moves ``clock`` on."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    return await nodes(fast_ring(make_settings(tmp_path, redis_url=url)), clock=clock)


async def session(
    http: aiohttp.ClientSession, node: Node, returning: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A new visitor's session, or with ``returning`` (an earlier session) theirs again."""
    body = {k: returning[k] for k in ("visitor_id", "visitor_secret")} if returning else {}
    r = await http.post(f"{node.url}/v1/sites/acme/sessions", json=body, headers=ORIGIN)
    assert r.status == 201, await r.text()
    data: dict[str, Any] = await r.json()
    return data


async def agent(
    clients: Callable[[], SocketClient], node: Node, name: str, state: str = "available"
) -> SocketClient:
    c = clients()
    await c.connect(node.url, "/agent", {"token": mint(node.settings, name), "state": state})
    await c.next("presence:update", lambda p: p["agent_id"] == name)
    return c


async def visitor(clients: Callable[[], SocketClient], node: Node, token: str) -> SocketClient:
    c = clients()
    await c.connect(node.url, "/visitor", {"token": token})
    return c


def state_is(state: str) -> Callable[[Any], bool]:
    return lambda call: call["state"] == state


async def test_a_visitor_reaches_the_best_agent_talks_and_hangs_up(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    # Ben speaks German; Anna doesn't. A German-speaking visitor rings Ben first.
    anna = await agent(clients, node, "anna")
    ben = await agent(clients, node, "ben")
    s = await session(http, node)
    assert s["visitor_id"].startswith("v_") and s["ice_servers"] == []
    v = await visitor(clients, node, s["token"])

    ack = await v.call(
        "call:start", {"language": "de", "page": "https://acme.example/plans"}, "/visitor"
    )
    assert ack["ok"] and ack["call"]["state"] == "ringing"
    assert ack["call"]["agent"] == {"name": "Ben", "branch": "Berlin"}
    assert all(not e["event"] == "routed" for e in ack["call"]["timeline"]), "reasons are internal"
    ring = await ben.next("call:ring")
    assert ring["visitor"] == {
        "id": s["visitor_id"],
        "language": "de",
        "page": "https://acme.example/plans",
        "returning": False,
        "last_agent": None,
    }
    assert "speaks de" in ring["reasons"]
    assert anna.queue("call:ring").empty(), "one agent rings at a time"
    call_id = ring["call_id"]

    accepted = await ben.call("call:accept", {"call_id": call_id}, "/agent")
    assert accepted["ok"] and accepted["call"]["state"] == "connected"
    assert any(e["event"] == "routed" for e in accepted["call"]["timeline"]), "agents see reasons"
    update = await v.next("call:update", state_is("connected"))
    assert update["agent"]["name"] == "Ben"
    on_call = await ben.next("presence:update", lambda p: p["status"] == "on_call")
    assert on_call["channels"] == []

    # Signals pass between the two parties only.
    offer = {"call_id": call_id, "description": {"type": "offer", "sdp": "v=0\r\n"}}
    assert (await v.call("rtc:signal", offer, "/visitor"))["ok"]
    assert await ben.next("rtc:signal") == offer
    answer = {"call_id": call_id, "description": {"type": "answer", "sdp": "v=0\r\n"}}
    assert (await ben.call("rtc:signal", answer, "/agent"))["ok"]
    assert await v.next("rtc:signal") == answer
    cand = {
        "call_id": call_id,
        "candidate": {
            "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host",
            "sdpMid": "0",
            "sdpMLineIndex": 0,
        },
    }
    assert (await ben.call("rtc:signal", cand, "/agent"))["ok"]
    assert (await v.next("rtc:signal"))["candidate"]["sdpMid"] == "0"
    denied = await anna.call("rtc:signal", answer, "/agent")
    assert denied["error"]["code"] == "forbidden"
    other = await visitor(clients, node, (await session(http, node))["token"])
    denied = await other.call("rtc:signal", offer, "/visitor")
    assert denied["error"]["code"] == "forbidden"
    assert ben.queue("rtc:signal").empty()

    done = await ben.call("call:hangup", {"call_id": call_id}, "/agent")
    assert done["call"]["state"] == "completed" and done["call"]["reason"] == "agent_hung_up"
    assert (await v.next("call:update", state_is("completed")))["reason"] == "agent_hung_up"
    await ben.next("presence:update", lambda p: p["status"] == "available")

    # The same visitor comes back: Ben again (sticky), and he sees they are returning.
    s2 = await session(http, node, s)
    assert s2["visitor_id"] == s["visitor_id"]
    v2 = await visitor(clients, node, s2["token"])
    again = await v2.call("call:start", {"language": "en"}, "/visitor")
    assert again["call"]["agent"]["name"] == "Ben"
    ring2 = await ben.next("call:ring")
    assert ring2["visitor"]["returning"] and ring2["visitor"]["last_agent"] == "Ben"
    assert "served this visitor before" in ring2["reasons"]


async def test_decline_and_timeout_ring_the_next_agent_then_a_callback_is_offered(
    node: Node,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    calls = node.app[appkeys.CALLS]
    anna = await agent(clients, node, "anna")
    carla = await agent(clients, node, "carla")
    v = await visitor(clients, node, (await session(http, node))["token"])
    ack = await v.call("call:start", {}, "/visitor")
    first_name = ack["call"]["agent"]["name"]
    first, second = (anna, carla) if first_name == "Anna" else (carla, anna)
    ring = await first.next("call:ring")
    declined = await first.call("call:decline", {"call_id": ring["call_id"]}, "/agent")
    assert declined["ok"]
    await first.next("call:ring_stop", lambda m: m["reason"] == "declined")
    ring2 = await second.next("call:ring")
    assert ring2["call_id"] == ring["call_id"]
    ringing_second = await v.next(
        "call:update", lambda c: c["state"] == "ringing" and c["agent"]["name"] != first_name
    )
    assert ringing_second["agent"]["name"] != first_name
    # The second agent lets it ring out (3 s); nobody is left: a callback offer, no dead end.
    await clock.advance(2.9)
    assert (await calls.get(ring["call_id"])).state is CallState.RINGING, "not before its time"
    await clock.advance(0.2)
    failed = await v.next("call:update", state_is("failed"))
    assert failed["reason"] == "no_agent_answered"
    assert failed["callback_offer"] is not None
    await second.next("call:ring_stop", lambda m: m["reason"] == "no_answer")
    assert [e["event"] for e in failed["timeline"]] == [
        "requested",
        "ringing",
        "declined",
        "ringing",
        "no_answer",
        "no_agent",
    ]
    # A declined agent can still accept nothing: the call is over.
    late = await first.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
    assert late["error"]["code"] == "not_ringing"


async def test_nobody_free_means_a_callback_offer_at_once(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    await agent(clients, node, "anna", state="busy")
    v = await visitor(clients, node, (await session(http, node))["token"])
    ack = await v.call("call:start", {}, "/visitor")
    assert ack["call"]["state"] == "failed" and ack["call"]["reason"] == "all_busy"
    assert ack["call"]["callback_offer"] is not None


async def test_visitor_leaving_while_ringing_frees_the_agent(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    anna = await agent(clients, node, "anna")
    v = await visitor(clients, node, (await session(http, node))["token"])
    await v.call("call:start", {}, "/visitor")
    ring = await anna.next("call:ring")
    await v.sio.disconnect()
    assert (await anna.next("call:ring_stop"))["call_id"] == ring["call_id"]
    # Anna is free again at once (her reservation is released), so the next visitor rings her.
    v2 = await visitor(clients, node, (await session(http, node))["token"])
    ack = await v2.call("call:start", {}, "/visitor")
    assert ack["call"]["state"] == "ringing"


async def test_an_agent_blip_keeps_the_call_and_a_real_leave_ends_it(
    node: Node,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    calls = node.app[appkeys.CALLS]
    scheduled = Spy(node.app[appkeys.STORE], "schedule_timer")
    anna = await agent(clients, node, "anna")
    v = await visitor(clients, node, (await session(http, node))["token"])
    await v.call("call:start", {}, "/visitor")
    ring = await anna.next("call:ring")
    call_id = ring["call_id"]
    await anna.call("call:accept", {"call_id": call_id}, "/agent")

    # The agent app's socket drops and comes back naming its call: the call carries on, and
    # signals go to the new socket.
    await anna.sio.disconnect()
    await scheduled.next(timers_of(TimerKind.AGENT_GONE))  # the old socket's grace runs
    back = clients()
    token = mint(node.settings, "anna")
    await back.connect(node.url, "/agent", {"token": token, "call_id": call_id})
    resumed = await back.next("call:update")
    assert resumed["call_id"] == call_id and resumed["state"] == "connected"
    offer = {"call_id": call_id, "description": {"type": "offer", "sdp": "v=0\r\n"}}
    assert (await v.call("rtc:signal", offer, "/visitor"))["ok"]
    assert await back.next("rtc:signal") == offer
    # The grace timer of the old socket runs out and changes nothing.
    await clock.advance(calls.agent_grace_s + 1)
    assert (await calls.get(call_id)).state is CallState.CONNECTED
    assert (await v.call("rtc:signal", offer, "/visitor"))["ok"]
    assert not any(c["state"] == "completed" for c in v.pending("call:update"))

    # Another socket of hers cannot take the call over unless it names it.
    other = await agent(clients, node, "anna")
    assert (await other.call("rtc:signal", offer, "/agent"))["error"]["code"] == "forbidden"

    # Now she really leaves: after the grace period the call ends, not before.
    await back.sio.disconnect()
    _, due, _ = await scheduled.next(timers_of(TimerKind.AGENT_GONE))
    assert due == clock.now() + calls.agent_grace_s
    await clock.advance(calls.agent_grace_s - 0.1)
    assert (await calls.get(call_id)).state is CallState.CONNECTED
    await clock.advance(0.2)
    ended = await v.next("call:update", state_is("completed"))
    assert ended["reason"] == "agent_left"


async def test_an_agent_socket_gone_while_her_accept_was_stored_leaves_the_call_as_a_drop_would(
    node: Node,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen in a rolling restart under load: the agent's socket was let go by a drain while
    her accept was being stored. Its leave knew nothing of the call, and the accept's handler
    then failed (KeyError), so nothing ever told the call she had gone."""
    calls = node.app[appkeys.CALLS]
    namespace = node.app[appkeys.SIO].namespace_handlers["/agent"]
    scheduled = Spy(node.app[appkeys.STORE], "schedule_timer")
    left = Spy(namespace, "on_leave")
    stored, release = asyncio.Event(), asyncio.Event()
    accept = CallDesk.accept

    async def slow_accept(desk: CallDesk, *args: Any) -> Any:
        call = await accept(desk, *args)
        stored.set()
        await release.wait()
        return call

    monkeypatch.setattr(CallDesk, "accept", slow_accept)
    anna = await agent(clients, node, "anna")
    v = await visitor(clients, node, (await session(http, node))["token"])
    await v.call("call:start", {}, "/visitor")
    call_id = (await anna.next("call:ring"))["call_id"]
    await anna.sio.emit("call:accept", {"call_id": call_id}, namespace="/agent")
    await asyncio.wait_for(stored.wait(), 5)
    # Let go by the node, as a drain does (a socket's own packets wait for its handler).
    (sid,) = namespace.sessions
    await node.app[appkeys.SIO].disconnect(sid, namespace="/agent")
    await left.next()
    release.set()

    _, due, _ = await scheduled.next(timers_of(TimerKind.AGENT_GONE))
    assert due == clock.now() + calls.agent_grace_s
    await clock.advance(calls.agent_grace_s + 0.1)
    ended = await v.next("call:update", state_is("completed"))
    assert ended["call_id"] == call_id and ended["reason"] == "agent_left"


async def test_visitor_abuse_is_refused(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    s = node.settings
    r = await http.post(
        f"{node.url}/v1/sites/acme/sessions", json={}, headers={"Origin": "https://evil.example"}
    )
    assert r.status == 403 and (await r.json())["error"]["code"] == "origin_not_allowed"
    r = await http.post(f"{node.url}/v1/sites/acme/sessions", json={})
    assert r.status == 403, "no Origin, no session"
    r = await http.post(f"{node.url}/v1/sites/nope/sessions", json={}, headers=ORIGIN)
    assert r.status == 404
    # An expired visitor token is refused at connect.
    now = int(time.time())
    expired = jwt.encode(
        {
            "sub": "v_x",
            "site": "acme",
            "role": "visitor",
            "aud": "membrane",
            "iss": s.auth.issuer,
            "iat": now - 3600,
            "exp": now - 600,
        },
        s.auth.secret,
        algorithm="HS256",
    )
    c = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await c.connect(
            node.url, namespaces=["/visitor"], auth={"token": expired}, transports=["websocket"]
        )
    await c.disconnect()
    # An agent token is not a visitor token.
    c = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await c.connect(
            node.url,
            namespaces=["/visitor"],
            auth={"token": mint(s, "anna")},
            transports=["websocket"],
        )
    await c.disconnect()

    await agent(clients, node, "anna", state="away")
    v = await visitor(clients, node, (await session(http, node))["token"])
    bad = await v.call("call:start", {"language": 42}, "/visitor")
    assert bad["error"]["code"] == "invalid_payload"
    bad = await v.call("call:start", {"location": {"lat": 200, "lon": 0}}, "/visitor")
    assert bad["error"]["code"] == "invalid_payload"
    bad = await v.call(
        "rtc:signal",
        {"call_id": "c_nope", "description": {"type": "offer", "sdp": "x"}},
        "/visitor",
    )
    assert bad["error"]["code"] == "not_found"
    bad = await v.call("rtc:signal", {"call_id": "c_x"}, "/visitor")
    assert bad["error"]["code"] == "invalid_payload"
    # A flood of call:start from one visitor is cut off.
    codes = []
    for _ in range(8):
        ack = await v.call("call:start", {}, "/visitor")
        codes.append(ack["ok"] or ack["error"]["code"])
    assert "rate_limited" in codes
    assert codes[:5] == [True] * 5, (
        "nobody free: each ends at once with an offer, so not in progress"
    )


async def test_one_agent_never_rings_for_two_visitors(
    nodes: NodeFactory,
    tmp_path: Path,
    redis_url: str,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Ten visitors on two nodes press the button at the same instant; one agent is free."""
    settings = fast_ring(make_settings(tmp_path, redis_url=redis_url))
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    anna = await agent(clients, a, "anna")
    visitors = []
    for i in range(10):
        n = a if i % 2 else b
        visitors.append(await visitor(clients, n, (await session(http, n))["token"]))
    acks = await asyncio.gather(*(v.call("call:start", {}, "/visitor") for v in visitors))
    states = sorted(ack["call"]["state"] for ack in acks)
    assert states.count("ringing") == 1 and states.count("failed") == 9, states
    ring = await anna.next("call:ring")
    with pytest.raises(TimeoutError):
        await anna.next("call:ring", timeout=0.5)
    assert ring["call_id"] in {ack["call"]["call_id"] for ack in acks}


async def test_a_call_across_two_nodes(
    nodes: NodeFactory,
    tmp_path: Path,
    redis_url: str,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    settings = fast_ring(make_settings(tmp_path, redis_url=redis_url))
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    anna = await agent(clients, b, "anna")
    board = clients()
    from gateway.core.model import Role

    await board.connect(a.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    v = await visitor(clients, a, (await session(http, a))["token"])
    ack = await v.call("call:start", {}, "/visitor")
    assert ack["call"]["state"] == "ringing"
    ring = await anna.next("call:ring")
    await anna.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
    await v.next("call:update", state_is("connected"))
    await board.next("call:update", state_is("connected"))
    await board.next(
        "presence:update", lambda p: p["agent_id"] == "anna" and p["status"] == "on_call"
    )
    offer = {"call_id": ring["call_id"], "description": {"type": "offer", "sdp": "v=0\r\n"}}
    await v.call("rtc:signal", offer, "/visitor")
    assert await anna.next("rtc:signal") == offer
    await v.call("call:cancel", {"call_id": ring["call_id"]}, "/visitor")
    ended = await anna.next("call:update", state_is("completed"))
    assert ended["reason"] == "visitor_hung_up"
    await board.next(
        "presence:update", lambda p: p["agent_id"] == "anna" and p["status"] == "available"
    )


async def test_availability_json_and_live_stream(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    r = await http.get(f"{node.url}/v1/sites/acme/availability", headers=ORIGIN)
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN["Origin"]
    body = await r.json()
    assert body["available"] is False and body["agents_available"] == 0 and body["open"] is True
    r = await http.get(
        f"{node.url}/v1/sites/acme/availability", headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in r.headers
    r = await http.get(f"{node.url}/v1/sites/acme/availability?branch=nowhere")
    assert r.status == 400

    async with http.get(f"{node.url}/v1/sites/acme/availability/stream?language=de") as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")

        async def next_event() -> dict[str, Any]:
            import json

            while True:
                line = (await stream.content.readline()).decode()
                if line.startswith("data: "):
                    data: dict[str, Any] = json.loads(line[6:])
                    return data

        first = await asyncio.wait_for(next_event(), 5)
        assert first["available"] is False
        ben = await agent(clients, node, "ben")
        now_free = await asyncio.wait_for(next_event(), 5)
        assert now_free["available"] is True and now_free["channels"] == ["webrtc"]
        await ben.call("presence:set", {"kind": "desktop", "state": "away"}, "/agent")
        gone = await asyncio.wait_for(next_event(), 5)
        assert gone["available"] is False


async def test_a_new_watcher_is_told_the_truth_about_changes_nobody_watched(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    """A widget opened after the last one closed, with changes in between, must not be
    told the state of when the last one watched: that would stand until the next change,
    or the 20 s keepalive (seen in the demo: the button said nobody was free while Anna
    was)."""
    import json

    feed = node.app[appkeys.AVAILABILITY]

    async def first_frame() -> dict[str, Any]:
        async with http.get(f"{node.url}/v1/sites/acme/availability/stream") as stream:
            while True:
                line = (await asyncio.wait_for(stream.content.readline(), 5)).decode()
                if line.startswith("data: "):
                    data: dict[str, Any] = json.loads(line[6:])
                    return data

    assert (await first_frame())["available"] is False
    ben = await agent(clients, node, "ben")  # the broadcast of this drops the closed stream

    async def nobody_watches() -> bool:
        return feed.watcher_count == 0

    await eventually(nobody_watches, 5)
    await ben.call("presence:set", {"kind": "desktop", "state": "away"}, "/agent")
    assert (await first_frame())["available"] is False, "Ben is away"


async def test_an_open_stream_holds_no_request_and_ends_with_its_client(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    """Once its headers are out, an availability stream is its connection and a ``Watcher``
    (gateway.edge.detach): the request and aiohttp's handler for it are freed, broadcasts
    still reach it, and a client that leaves is let go at once, without waiting for a
    broadcast to find it gone."""
    import gc
    import json

    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    feed = node.app[appkeys.AVAILABILITY]
    url = f"{node.url}/v1/sites/acme/availability/stream"
    streams = [await http.get(url) for _ in range(3)]

    async def next_data(stream: aiohttp.ClientResponse) -> dict[str, Any]:
        while True:
            line = (await asyncio.wait_for(stream.content.readline(), 5)).decode()
            if line.startswith("data: "):
                data: dict[str, Any] = json.loads(line[6:])
                return data

    for stream in streams:
        assert (await next_data(stream))["available"] is False
    assert feed.watcher_count == 3
    gc.collect()
    kept = [o for o in gc.get_objects() if isinstance(o, web.BaseRequest | RequestHandler)]
    assert not kept, kept

    await agent(clients, node, "anna")  # available: a broadcast to every stream
    for stream in streams:
        assert (await next_data(stream))["available"] is True

    streams[0].close()  # the client leaves; nothing is broadcast after

    async def let_go() -> bool:
        return feed.watcher_count == 2

    await eventually(let_go, 5)
    for stream in streams[1:]:
        stream.close()

    async def nobody_left() -> bool:
        return feed.watcher_count == 0

    await eventually(nobody_left, 5)


async def test_a_head_of_the_stream_gets_its_headers_and_no_stream(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """HEAD asks for the headers only: the node answers them and keeps no watcher; a stream
    written after a HEAD's answer would be bytes the client never asked for."""
    feed = node.app[appkeys.AVAILABILITY]
    async with http.head(f"{node.url}/v1/sites/acme/availability/stream") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
    assert feed.watcher_count == 0


async def test_a_widget_that_never_reads_is_cut_off_not_held(
    nodes: NodeFactory, tmp_path: Path
) -> None:
    """The feed stops writing to a stream once 64 KiB wait for it. A graceful end of that
    response would wait for the client to read the backlog first: one that never reads
    held its connection and its request handler for good, and a shutdown for aiohttp's
    shutdown timeout (found by bench/soak.py)."""
    import socket

    from gateway.wire.codec import device_update_from_wire

    node = await nodes(make_settings(tmp_path))
    feed = node.app[appkeys.AVAILABILITY]
    presence = node.app[appkeys.PRESENCE]
    loop = asyncio.get_running_loop()
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    # A small window and the MSS of an internet path, so the node's kernel takes in tens of
    # KiB, not the megabytes of loopback's 64 KiB segments, before the node sees it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(
            sock,
            f"GET /v1/sites/acme/availability/stream HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        )
        head = b""
        while b"data: " not in head:
            head += await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
        assert feed.watcher_count == 1
        # From here on the client reads nothing. Each change is one more frame for it.
        for i in range(20_000):
            state = "available" if i % 2 else "away"
            update = device_update_from_wire({"kind": "desktop", "state": state}, "desk")
            await presence.set_device("acme", "anna", update, 600)
            await feed.flush("acme")
            await asyncio.sleep(0.001)  # paced like real changes: the node's kernel fills
            if feed.watcher_count == 0:
                break
        assert feed.watcher_count == 0, "the feed stopped writing to it"

        # Reset: the backlog is not left in the node's kernel, waiting for the client.
        tcp_close = 7

        async def reset() -> bool:
            return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == tcp_close)

        await eventually(reset, 5)
    finally:
        sock.close()


async def test_a_visitor_blip_keeps_the_call_and_a_real_leave_ends_it(
    node: Node,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    calls = node.app[appkeys.CALLS]
    scheduled = Spy(node.app[appkeys.STORE], "schedule_timer")
    anna = await agent(clients, node, "anna")
    s = await session(http, node)
    v = await visitor(clients, node, s["token"])
    ack = await v.call("call:start", {}, "/visitor")
    call_id = ack["call"]["call_id"]
    await anna.call("call:accept", {"call_id": (await anna.next("call:ring"))["call_id"]}, "/agent")

    # The socket drops and comes back with the same session: the call carries on.
    await v.sio.disconnect()
    await scheduled.next(timers_of(TimerKind.VISITOR_GONE))  # the old socket's grace runs
    back = await visitor(clients, node, s["token"])
    resumed = await back.next("call:update")
    assert resumed["call_id"] == call_id and resumed["state"] == "connected"
    answer = {"call_id": call_id, "description": {"type": "answer", "sdp": "v=0\r\n"}}
    assert (await anna.call("rtc:signal", answer, "/agent"))["ok"]
    assert await back.next("rtc:signal") == answer
    # The grace timer of the old socket runs out and changes nothing.
    await clock.advance(calls.visitor_grace_s + 1)
    assert (await calls.get(call_id)).state is CallState.CONNECTED
    assert (await anna.call("rtc:signal", answer, "/agent"))["ok"]
    assert not any(c["state"] == "completed" for c in anna.pending("call:update"))

    # Now the visitor really leaves: after the grace period the call ends, not before.
    await back.sio.disconnect()
    _, due, _ = await scheduled.next(timers_of(TimerKind.VISITOR_GONE))
    assert due == clock.now() + calls.visitor_grace_s
    await clock.advance(calls.visitor_grace_s - 0.1)
    assert (await calls.get(call_id)).state is CallState.CONNECTED
    await clock.advance(0.2)
    ended = await anna.next("call:update", state_is("completed"))
    assert ended["reason"] == "visitor_left"
    await anna.next("presence:update", lambda p: p["status"] == "available")


async def test_the_gateways_own_demo_page_may_open_sessions(
    node: Node, http: aiohttp.ClientSession
) -> None:
    own = {"Origin": node.settings.public_url}
    r = await http.post(f"{node.url}/v1/sites/acme/sessions", json={}, headers=own)
    assert r.status == 201


async def test_an_agent_on_a_call_is_never_rung_even_by_a_node_that_lags(
    nodes: NodeFactory,
    tmp_path: Path,
    redis_url: str,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Presence reaches other nodes a moment later; the reservation must hold meanwhile."""
    settings = fast_ring(make_settings(tmp_path, redis_url=redis_url))
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    anna = await agent(clients, a, "anna")
    b_presence = b.app[appkeys.PRESENCE]

    async def b_sees_anna_free() -> bool:  # node B hears it from Redis, a moment later
        return b_presence.cached("acme", "anna").status.value == "available"

    await eventually(b_sees_anna_free, 5)
    free = b_presence.cached("acme", "anna")
    v1 = await visitor(clients, a, (await session(http, a))["token"])
    await v1.call("call:start", {}, "/visitor")
    await anna.call("call:accept", {"call_id": (await anna.next("call:ring"))["call_id"]}, "/agent")
    # Node B has not heard yet: its copy of Anna still says available.
    b_presence._cache["acme"]["anna"] = free
    v2 = await visitor(clients, b, (await session(http, b))["token"])
    ack = await v2.call("call:start", {}, "/visitor")
    assert ack["call"]["state"] == "failed", "Anna is talking; nobody else is online"
    with pytest.raises(TimeoutError):
        await anna.next("call:ring", timeout=0.5)


async def test_a_ring_answered_after_its_reservation_lapsed_is_refused(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    """A node far behind may deliver an accept after the reservation expired and the agent
    was reserved for another call: taking it would book the agent twice."""
    anna = await agent(clients, node, "anna")
    v = await visitor(clients, node, (await session(http, node))["token"])
    await v.call("call:start", {}, "/visitor")
    ring = await anna.next("call:ring")
    store = node.app[appkeys.STORE]
    await store.release_agent("acme", "anna", ring["call_id"])  # as if it expired
    assert await store.reserve_agent("acme", "anna", "c_other", 30)
    late = await anna.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
    assert late["error"]["code"] == "ring_expired"


async def test_a_visitor_with_a_call_going_cannot_start_another(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    anna = await agent(clients, node, "anna")
    s = await session(http, node)
    first = await visitor(clients, node, s["token"])
    started = await first.call("call:start", {}, "/visitor")
    assert started["ok"] and started["call"]["state"] == "ringing"
    # A second tab of the same visitor: refused, not queued nor offered a callback.
    second = await visitor(clients, node, s["token"])
    again = await second.call("call:start", {}, "/visitor")
    assert again["error"]["code"] == "call_in_progress"
    ring = await anna.next("call:ring")
    assert ring["call_id"] == started["call"]["call_id"]
    await first.call("call:cancel", {"call_id": ring["call_id"]}, "/visitor")
    await first.next("call:update", lambda c: c["state"] == "canceled")
    after = await second.call("call:start", {}, "/visitor")
    assert after["ok"], "once the first call ended the visitor may call again"


async def test_a_widget_back_after_its_call_ended_is_told_so_and_only_of_its_own(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    """The widget's socket drops in a call; the agent hangs up meanwhile. Back, naming its
    call, the widget hears that it ended (found by bench/rolling_restart.py: visitors who
    reconnected during a drain never heard their call end). Naming another visitor's call
    tells nothing."""
    anna = await agent(clients, node, "anna")
    visiting = await session(http, node)
    v = await visitor(clients, node, visiting["token"])
    call_id = (await v.call("call:start", {}, "/visitor"))["call"]["call_id"]
    await anna.next("call:ring")
    await anna.call("call:accept", {"call_id": call_id}, "/agent")
    await v.next("call:update", state_is("connected"))
    await v.sio.disconnect()
    await anna.call("call:hangup", {"call_id": call_id}, "/agent")

    back = clients()
    await back.connect(node.url, "/visitor", {"token": visiting["token"], "call_id": call_id})
    told = await back.next("call:update")
    assert told["call_id"] == call_id and told["state"] == "completed"

    stranger = clients()
    other = await session(http, node)
    namespace = node.app[appkeys.SIO].namespace_handlers["/visitor"]
    await stranger.connect(node.url, "/visitor", {"token": other["token"], "call_id": call_id})

    async def looked() -> bool:  # the takeover after the connect has run
        return not namespace.named

    await eventually(looked)
    await stranger.call("call:cancel", {"call_id": "c_unrelated"}, "/visitor")  # a round trip
    assert stranger.pending("call:update") == []
