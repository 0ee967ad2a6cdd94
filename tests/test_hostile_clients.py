"""Hostile clients at the engine.io / socket.io packet layer: each attack found on a node,
made with raw packets over a real node's loopback port (aiohttp websockets and HTTP
requests written by hand, not a socket.io client), and what the node must do instead:
answer or drop at once with a reason, hold nothing, log one short line, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Node, eventually, make_settings, mint, node_process, start_node

from gateway.core.model import Role
from gateway.edge.http import appkeys as keys
from gateway.edge.sio.limits import MAX_PENDING_BYTES, NAMESPACE_CONNECTS, WRITER_GRACE_S
from gateway.edge.sio.upstream import LeanSocket
from gateway.settings import demo_config_text
from gateway.wire.codec import device_update_from_wire

ORIGIN = {"Origin": "http://127.0.0.1:8080"}
WAIT_S = 5.0


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    node = await start_node(make_settings(tmp_path))
    try:
        yield node
    finally:
        await node.stop()


def refused(node: Node, code: str) -> float:
    value = node.app[keys.METRICS].registry.get_sample_value(
        "membrane_errors_total", {"code": code}
    )
    return value or 0.0


def engine_sockets(node: Node) -> dict[str, Any]:
    sockets: dict[str, Any] = node.app[keys.SIO].eio.sockets
    return sockets


async def open_engine(
    http: aiohttp.ClientSession, node: Node, headers: dict[str, str] | None = None
) -> aiohttp.ClientWebSocketResponse:
    """A raw engine.io websocket connection, past its OPEN packet."""
    url = node.url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket"
    ws = await http.ws_connect(url, headers=headers)
    assert (await ws.receive_str(timeout=WAIT_S)).startswith("0{")
    return ws


async def next_text(
    ws: aiohttp.ClientWebSocketResponse, where: Callable[[str], bool] = lambda _: True
) -> str:
    """The next text frame that satisfies ``where``, answering pings on the way."""
    while True:
        data = await ws.receive_str(timeout=WAIT_S)
        if data == "2":
            await ws.send_str("3")
        elif where(data):
            return data


async def join(ws: aiohttp.ClientWebSocketResponse, namespace: str, auth: dict[str, Any]) -> None:
    await ws.send_str(f"40{namespace},{json.dumps(auth)}")
    reply = await next_text(ws, lambda d: d.startswith((f"40{namespace},", f"44{namespace},")))
    assert reply.startswith(f"40{namespace},"), reply


async def closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """Read until the server closes the connection: the close code and reason it gave."""
    while True:
        msg = await ws.receive(timeout=WAIT_S)
        if msg.type is aiohttp.WSMsgType.TEXT:
            if msg.data == "2":
                await ws.send_str("3")
            continue
        if msg.type is aiohttp.WSMsgType.CLOSE:
            return msg.data, msg.extra or ""
        return ws.close_code, ""  # CLOSED or ERROR: the transport went away


async def no_sockets_left(node: Node, timeout: float = WAIT_S) -> None:
    """The node let go of every engine.io connection and namespace session (its own
    cleanup after a close runs in the connection's task, which nothing outside can await)."""
    sio = node.app[keys.SIO]

    async def gone() -> bool:
        sessions = [s for ns in sio.namespace_handlers.values() for s in ns.sessions]
        return not engine_sockets(node) and not sessions

    await eventually(gone, timeout)


# --- 1. HTTP long-polling and request bodies --------------------------------------------------


async def test_polling_is_refused_and_an_oversized_post_is_answered_413_at_once(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """Attack: a polling GET gave a sid, and a POST on it with a body over 64 KiB was never
    answered, its memory never freed, and a SIGTERM afterwards hung."""
    r = await http.get(f"{node.url}/socket.io/?EIO=4&transport=polling")
    assert r.status == 400, await r.text()
    assert not engine_sockets(node)

    # A POST declaring 10 MB and sending 70 KB of it, on many connections at once: each is
    # answered 413 at once, without the node waiting for (or keeping) the rest.
    host, port = node.url.removeprefix("http://").split(":")
    writers: list[asyncio.StreamWriter] = []

    async def oversized_post() -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)
        writer.write(
            b"POST /socket.io/?EIO=4&transport=polling&sid=AAAAAAAAAAAAAAAAAAAA HTTP/1.1\r\n"
            b"Host: %s\r\nContent-Type: text/plain\r\nContent-Length: 10000000\r\n\r\n"
            % host.encode()
            + b"4" * 70_000
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return head, await asyncio.wait_for(reader.readexactly(length), WAIT_S)

    try:
        responses = await asyncio.gather(*(oversized_post() for _ in range(50)))
        for head, body in responses:
            assert head.startswith(b"HTTP/1.1 413"), head
            assert b"connection: close" in head.lower()
            assert json.loads(body)["error"]["code"] == "payload_too_large"
        assert refused(node, "payload_too_large") == 50

        # A body within the limit is no session either: polling is off.
        r = await http.post(
            f"{node.url}/socket.io/?EIO=4&transport=polling&sid=AAAAAAAAAAAAAAAAAAAA", data="1:6"
        )
        assert r.status == 400
        assert not engine_sockets(node)

        # With those clients still connected, the node stops promptly (Node.stop fails past
        # 10 s); the fixture's own stop then finds the runner already cleaned up.
        await node.stop()
    finally:
        for writer in writers:
            writer.close()


async def test_a_node_with_oversized_posts_in_flight_stops_on_sigterm(
    tmp_path: Path, redis_url: str
) -> None:
    """The reported hang: after such POSTs, a SIGTERM did not stop the node."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    async with node_process(tmp_path, settings, redis_url, demo_config_text(), "node") as (
        url,
        proc,
    ):
        host, port = url.removeprefix("http://").split(":")
        # The attack as reported, on a sid from a polling GET while a node still gave one.
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/socket.io/?EIO=4&transport=polling") as r:
                opened = await r.text()
        sid = json.loads(opened[1:])["sid"] if r.status == 200 else "A" * 20
        writers: list[asyncio.StreamWriter] = []
        try:
            for _ in range(20):
                reader, writer = await asyncio.open_connection(host, int(port))
                writers.append(writer)
                writer.write(
                    b"POST /socket.io/?EIO=4&transport=polling&sid=%s HTTP/1.1\r\nHost: %s\r\n"
                    b"Content-Length: 10000000\r\n\r\n"
                    % (sid.encode(), host.encode())
                    + b"4" * 70_000
                )
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
                assert head.startswith(b"HTTP/1.1 413"), head
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            for writer in writers:
                writer.close()


# --- 2. Binary packets and message size ---------------------------------------------------


async def visitor_token(http: aiohttp.ClientSession, node: Node) -> str:
    r = await http.post(f"{node.url}/v1/sites/acme/sessions", json={}, headers=ORIGIN)
    assert r.status == 201, await r.text()
    token: str = (await r.json())["token"]
    return token


@pytest.mark.parametrize(
    "attack",
    [
        # A BINARY_EVENT declaring one attachment (upstream held every frame that followed,
        # up to a ten-digit count of them, until the connection ended).
        '451-/visitor,["call:start",{"_placeholder":true,"num":0}]',
        '459999999999-/visitor,["call:start",{"_placeholder":true,"num":0}]',
        b"\x00" * 60_000,  # a binary websocket frame
        "b" + "A" * 80,  # an engine.io base64 binary message
        '461-/visitor,0[{"_placeholder":true,"num":0}]',  # a BINARY_ACK
    ],
)
async def test_binary_packets_get_the_connection_dropped_at_once(
    node: Node, http: aiohttp.ClientSession, attack: str | bytes
) -> None:
    ws = await open_engine(http, node, ORIGIN)
    await join(ws, "/visitor", {"token": await visitor_token(http, node)})
    if isinstance(attack, bytes):
        await ws.send_bytes(attack)
    else:
        await ws.send_str(attack)
    # Nothing more is read: frames the client goes on sending are not kept anywhere.
    for _ in range(3):
        if not ws.closed:
            await ws.send_bytes(b"\x01" * 60_000)
    assert await closed(ws) == (1003, "binary_unsupported")
    assert refused(node, "binary_unsupported") == 1
    await no_sockets_left(node)
    assert not node.app[keys.SIO]._binary_packet


async def test_a_message_over_the_limit_ends_the_connection(
    node: Node, http: aiohttp.ClientSession
) -> None:
    ws = await open_engine(http, node, ORIGIN)
    await join(ws, "/visitor", {"token": await visitor_token(http, node)})
    limit = node.settings.max_body_bytes
    await ws.send_str('42/visitor,["call:start",{"page":"' + "x" * limit + '"}]')
    code, _ = await closed(ws)
    assert code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await no_sockets_left(node)


# --- 3. A client that never reads ----------------------------------------------------------


def tiny_receive_buffer(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_a_board_that_never_reads_is_dropped_with_its_queue_bounded(node: Node) -> None:
    """Attack: a /board websocket that never reads (a tiny receive buffer) grew the node's
    memory with every presence change of its site, and was never dropped."""
    connector = aiohttp.TCPConnector(socket_factory=tiny_receive_buffer)
    async with aiohttp.ClientSession(connector=connector) as http:
        ws = await open_engine(http, node)
        await join(ws, "/board", {"token": mint(node.settings, "sam", Role.SUPERVISOR)})
        (lean,) = engine_sockets(node).values()
        assert isinstance(lean, LeanSocket)
        connection = ws._response.connection if ws._response is not None else None
        assert connection is not None and connection.transport is not None
        transport = connection.transport
        transport.pause_reading()  # from here on the client reads nothing

        presence = node.app[keys.PRESENCE]
        states = ("available", "away")
        most_pending, changes = 0, 0
        # Until the node lets it go; the kernel's buffers take a few MB of updates first.
        while lean.sid in engine_sockets(node) and changes < 60_000:
            update = device_update_from_wire({"kind": "mobile", "state": states[changes % 2]}, "m1")
            await presence.set_device("acme", "anna", update)
            await asyncio.sleep(0)  # changes come from I/O: the node's other tasks run between
            changes += 1
            most_pending = max(most_pending, lean.pending_bytes)
        assert lean.sid not in engine_sockets(node), f"still connected after {changes} changes"
        assert lean.dropped == "slow_consumer"
        # What the node held for it never went past the bound by more than one update.
        assert 0 < most_pending <= MAX_PENDING_BYTES + 1024, most_pending
        assert refused(node, "slow_consumer") == 1

        # The node cut the connection: the client sees it go once it looks again.
        transport.resume_reading()
        while not ws.closed:
            msg = await ws.receive(timeout=WAIT_S)
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break
        await no_sockets_left(node)
        sockets = node.app[keys.METRICS].registry.get_sample_value(
            "membrane_sockets", {"namespace": "/board"}
        )
        assert sockets == 0


async def test_a_client_that_stops_reading_cannot_hold_its_connection_open(node: Node) -> None:
    """A client that stops reading, then ends its side (here: a malformed packet): its
    writer waits on it for good, and before, so did the connection's handler, its socket.io
    disconnect (the agent's device stayed) and the node's shutdown. It is cut after
    WRITER_GRACE_S."""
    connector = aiohttp.TCPConnector(socket_factory=tiny_receive_buffer)
    async with aiohttp.ClientSession(connector=connector) as http:
        ws = await open_engine(http, node)
        await join(ws, "/board", {"token": mint(node.settings, "sam", Role.SUPERVISOR)})
        (lean,) = engine_sockets(node).values()
        connection = ws._response.connection if ws._response is not None else None
        assert connection is not None and connection.transport is not None
        connection.transport.pause_reading()
        presence = node.app[keys.PRESENCE]
        states = ("available", "away")
        changes = 0
        # Until the kernel's buffers are full: what is sent to it piles up in the node.
        while lean.pending_bytes < 20 * 300:
            update = device_update_from_wire({"kind": "mobile", "state": states[changes % 2]}, "m1")
            await presence.set_device("acme", "anna", update)
            await asyncio.sleep(0)  # changes come from I/O: the node's other tasks run between
            changes += 1
            assert changes < 60_000, "the writer never waited on the client"
        await ws.send_str("42[]")
        await no_sockets_left(node, timeout=WRITER_GRACE_S + WAIT_S)
        assert lean.dropped == "malformed_packet"


# --- 4. Reserved event names and namespace connect cycles ---------------------------------


async def test_events_named_connect_or_disconnect_change_nothing(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """Attack: ``["disconnect",{}]`` on /agent removed the agent's device and ended her
    calls while the socket stayed open."""
    ws = await open_engine(http, node)
    await join(ws, "/agent", {"token": mint(node.settings, "anna")})  # her device is set
    presence = node.app[keys.PRESENCE]
    devices = presence.cached("acme", "anna").devices
    assert len(devices) == 1

    await ws.send_str('42/agent,["disconnect",{}]')
    error = await next_text(ws, lambda d: d.startswith('42/agent,["error"'))
    assert json.loads(error.removeprefix("42/agent,"))[1]["code"] == "unknown_event"
    await ws.send_str('42/agent,7["connect",{"token":"x"}]')
    ack = await next_text(ws, lambda d: d.startswith("43/agent,7"))
    assert json.loads(ack.removeprefix("43/agent,7"))[0]["error"]["code"] == "unknown_event"

    # Still connected, still her device.
    assert presence.cached("acme", "anna").devices == devices
    await ws.send_str('42/agent,8["presence:set",{"kind":"desktop","state":"away"}]')
    ack = await next_text(ws, lambda d: d.startswith("43/agent,8"))
    assert json.loads(ack.removeprefix("43/agent,8"))[0]["ok"] is True
    await ws.close()
    await no_sockets_left(node)


async def test_namespace_connect_cycles_are_rate_limited_per_connection(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """Attack: CONNECT/DISCONNECT cycles on /agent, each adding and removing a device: 500
    cycles gave 1,000 board updates on another node in 5 s."""
    metrics = node.app[keys.METRICS].registry
    changes_before = metrics.get_sample_value("membrane_presence_changes_total") or 0.0
    ws = await open_engine(http, node)
    token = mint(node.settings, "anna")
    burst = int(NAMESPACE_CONNECTS[1])
    reply, connects, started = "", 0, time.monotonic()
    while connects < burst * 5:
        await ws.send_str(f'40/agent,{{"token":"{token}"}}')
        connects += 1
        reply = await next_text(ws, lambda d: d.startswith(("40/agent,", "44/agent,")))
        if reply.startswith("44/agent,"):
            break
        await ws.send_str("41/agent,")
    assert reply.startswith("44/agent,"), "never limited"
    # The burst, the tokens refilled meanwhile, and the refused one. (Rate limits refill on
    # real time, not the node's Clock: they bound what a client sends per real second.)
    refilled = (time.monotonic() - started) * NAMESPACE_CONNECTS[0]
    assert connects <= burst + refilled + 1, (connects, refilled)
    assert json.loads(reply.removeprefix("44/agent,"))["data"]["code"] == "rate_limited"
    assert await closed(ws) == (1008, "rate_limited")
    assert refused(node, "rate_limited") == 1
    await no_sockets_left(node)
    changes = (metrics.get_sample_value("membrane_presence_changes_total") or 0.0) - changes_before
    assert changes <= 2 * (burst + 1), changes


# --- 5. Malformed packets ----------------------------------------------------------------------

MALFORMED = [
    "42[]",  # an event without a name
    "42{}",  # an event that is not an array
    "42[1]",  # a name that is not a string
    "42" + "[" * 2000 + "]" * 2000,  # nested past the parser's limit
    '42/agent,["presence:set",',  # not JSON
    "43[]",  # an ack without an id
    '44{"message":"x"}',  # CONNECT_ERROR, server to client only
    "49",  # no such packet type
    "4x",  # no such packet type
    "4",  # an empty message
    "x",  # not an engine.io packet
    "0",  # OPEN, server to client only
    "",  # an empty frame
]


async def test_malformed_packets_drop_the_connection_with_one_short_line_each(
    node: Node, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: each malformed packet logged a 22-line traceback (2,000 unauthenticated
    packets wrote 44,000 log lines) and left the connection open."""
    caplog.set_level(logging.INFO)
    for i, packet in enumerate(MALFORMED):
        ws = await open_engine(http, node)
        await ws.send_str(packet)
        assert await closed(ws) == (1002, "malformed_packet"), packet[:40]
        assert refused(node, "malformed_packet") == i + 1
    await no_sockets_left(node)
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == len(MALFORMED), [r.getMessage() for r in loud]
    assert all(len(r.getMessage()) < 120 for r in loud)


async def test_a_websocket_handshake_given_up_before_its_answer_is_no_error(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen in a rolling restart under load: clients whose connect timed out had gone by the
    time the node answered their upgrade, and each was logged as an unhandled error and
    counted as a 500. Nobody is left to answer: the node records it as nginx does (499)."""
    request = (
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
        f"Host: {node.url.removeprefix('http://')}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {ORIGIN['Origin']}\r\n\r\n"
    ).encode()
    host, port = node.url.removeprefix("http://").split(":")
    metrics = node.app[keys.METRICS].registry

    def answered() -> dict[str, float]:
        """The node's answers to /socket.io/ so far, by status."""
        return {
            sample.labels["status"]: sample.value
            for family in metrics.collect()
            if family.name == "membrane_http_requests"
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels["route"] == "/socket.io/"
        }

    for _ in range(20):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        # Gone at once, with a reset (no FIN): the node's answer meets a closed transport.
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        writer.transport.abort()

    async def all_answered() -> bool:
        return sum(answered().values()) >= 20

    await eventually(all_answered, WAIT_S)
    assert "500" not in answered(), answered()
    assert answered().get("499", 0) > 0, "the handshakes must have met a closed transport"
    assert "unhandled error" not in caplog.text
