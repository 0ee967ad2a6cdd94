"""engine.io sockets as Membrane runs them (``LeanSocket``): the same behaviour as
python-engineio's own socket, without a Task per wait.

A real aiohttp server with short ping intervals and a raw websocket client, so pings,
pongs, timeouts and closes go over the wire exactly as a browser would see them.

Real time, with bounds on it: these are engine.io's own transport timers (ping interval and
timeout, on the event loop's clock), which the node's Clock (gateway/ops/clock.py) leaves
on real time on purpose, as a socket over a real connection runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import aiohttp
import engineio
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from conftest import eventually, free_port

from gateway.edge.sio import limits
from gateway.edge.sio.upstream import LeanSocket, MembraneServer, TrackedEngineServer
from gateway.edge.sio.upstream.engine import PlainWebSocket
from gateway.edge.sio.upstream.packet_queue import PacketQueue

PING_INTERVAL = 0.4
PING_TIMEOUT = 0.4


class Harness:
    def __init__(self, sio: MembraneServer, url: str) -> None:
        self.sio = sio
        self.url = url
        self.connected: list[str] = []
        self.disconnected: dict[str, tuple[float, Any]] = {}
        self.received: list[tuple[str, Any]] = []


@pytest.fixture
async def server() -> AsyncIterator[Harness]:
    sio = MembraneServer(
        async_mode="aiohttp",
        async_handlers=False,
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT,
    )
    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    h = Harness(sio, f"http://127.0.0.1:{port}")

    async def connect(sid: str, environ: Any, auth: Any = None) -> None:
        h.connected.append(sid)

    async def disconnect(sid: str, reason: Any = None) -> None:
        h.disconnected[sid] = (time.monotonic(), reason)

    async def hello(sid: str, data: Any) -> Any:
        h.received.append((sid, data))
        return {"echo": data}

    for event, handler in (("connect", connect), ("disconnect", disconnect), ("hello", hello)):
        sio.on(event, handler=handler, namespace="/t")

    try:
        yield h
    finally:
        await sio.eio.tasks.close()
        await runner.cleanup()


class Opened(NamedTuple):
    ws: aiohttp.ClientWebSocketResponse
    opened_at: float
    # When pings came before the namespace's connect ack: the first ping is due at a random
    # point from a quarter of the interval on, which a loaded machine can reach first.
    early_pings: list[float]


async def open_socket(
    http: aiohttp.ClientSession, url: str, *, answer_pings: bool = True
) -> Opened:
    """Connect to namespace /t; returns the websocket, when the connection was opened and
    the times of any pings that came before the connect ack (answered unless told not to)."""
    ws = await http.ws_connect(
        url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket"
    )
    opened_at = time.monotonic()
    assert (await ws.receive_str()).startswith("0")
    await ws.send_str("40/t,{}")
    early_pings: list[float] = []
    while (data := await ws.receive_str()) == "2":
        early_pings.append(time.monotonic())
        if answer_pings:
            await ws.send_str("3")
    assert data.startswith("40/t,"), data
    return Opened(ws, opened_at, early_pings)


async def test_server_sockets_are_lean(server: Harness) -> None:
    assert isinstance(server.sio.eio, TrackedEngineServer)
    async with aiohttp.ClientSession() as http:
        ws, _, _ = await open_socket(http, server.url)
        (socket,) = server.sio.eio.sockets.values()
        assert type(socket) is LeanSocket
        await ws.close()


async def test_an_open_websocket_keeps_none_of_aiohttps_request_and_no_task(
    server: Harness,
) -> None:
    """Once answered, the upgrade's request, aiohttp's handler for the connection and their
    tasks are gone: an idle socket is its ``WebSocketConnection`` and its ``LeanSocket``."""
    # These clients answer no ping: at the fixture's 0.4 s a slow run (a loaded CI machine)
    # saw one cut, and its closing task, before the check.
    server.sio.eio.ping_interval = server.sio.eio.ping_timeout = 60
    async with aiohttp.ClientSession() as http:
        sockets = [await open_socket(http, server.url) for _ in range(5)]

        async def released() -> bool:
            gc.collect()
            kept = [o for o in gc.get_objects() if isinstance(o, web.BaseRequest | RequestHandler)]
            return not kept

        await eventually(released, 5)
        busy = [
            t
            for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "").startswith(
                ("RequestHandler", "LeanSocket")
            )
        ]
        assert not busy, busy
        # And the sockets still talk.
        ws = sockets[-1].ws
        await ws.send_str('42/t,7["hello",{"n":5}]')
        assert await next_message(ws) == '43/t,7[{"echo":{"n":5}}]'
        for opened in sockets:
            await opened.ws.close()


async def test_a_burst_of_packets_is_handled_in_order_with_reading_paused_between(
    server: Harness,
) -> None:
    """Packets wait at most ``MAX_INBOX`` deep: past that the node stops reading from the
    connection until its handler catches up, then reads on. None is lost or reordered."""
    count = limits.MAX_INBOX * 5
    async with aiohttp.ClientSession() as http:
        ws, _, _ = await open_socket(http, server.url)
        (socket,) = server.sio.eio.sockets.values()
        paused = 0
        transport = socket._ws.transport
        pause = transport.pause_reading

        def counted_pause() -> None:
            nonlocal paused
            paused += 1
            pause()

        transport.pause_reading = counted_pause
        for i in range(count):
            await ws.send_str(f'42/t,{i}["hello",{{"n":{i}}}]')
        for i in range(count):
            assert await next_message(ws) == f'43/t,{i}[{{"echo":{{"n":{i}}}}}]'
        assert paused >= 1, "the inbox never filled: nothing tested"
        assert [data["n"] for _, data in server.received] == list(range(count))
        await ws.close()


async def test_frames_sent_with_the_upgrade_request_are_not_lost(server: Harness) -> None:
    """A client may send its first frames in the same packet as its upgrade request; aiohttp
    keeps those bytes aside, and the websocket takes them over with the connection."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = b"40/t,{}"
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    writer.write(
        b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
        b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        + bytes([0x81, 0x80 | len(payload)])
        + mask
        + masked
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 101"), head
        frames: list[str] = []
        while len(frames) < 2:
            first, length = await asyncio.wait_for(reader.readexactly(2), 2)
            assert first == 0x81 and length < 126  # unmasked final text frames
            frames.append((await reader.readexactly(length)).decode())
        assert frames[0].startswith("0{") and frames[1].startswith("40/t,"), frames
    finally:
        writer.close()


async def next_message(ws: aiohttp.ClientWebSocketResponse, timeout: float = 2.0) -> str:
    """The next frame that is not a ping (a ping, every PING_INTERVAL, is answered)."""

    async def receive() -> str:
        while (data := await ws.receive_str()) == "2":
            await ws.send_str("3")
        return data

    return await asyncio.wait_for(receive(), timeout)


async def test_a_client_that_answers_pings_stays_and_talks(server: Harness) -> None:
    async with aiohttp.ClientSession() as http:
        ws, opened_at, early_pings = await open_socket(http, server.url)
        pings = [at - opened_at for at in early_pings]
        # Three ping cycles: well past ping_interval + ping_timeout since the connect.
        deadline = opened_at + 3 * (PING_INTERVAL + PING_TIMEOUT)
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await ws.receive_str(timeout=left)
            except TimeoutError:
                break
            if data == "2":
                pings.append(time.monotonic() - opened_at)
                await ws.send_str("3")
        # Pinged again and again, never more often than the interval, and kept throughout.
        assert len(pings) >= 3, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(g > PING_INTERVAL * 0.8 for g in gaps), gaps
        assert server.disconnected == {}

        # Events still flow both ways, an ack included.
        await ws.send_str('42/t,7["hello",{"n":1}]')
        assert await next_message(ws) == '43/t,7[{"echo":{"n":1}}]'
        (sid,) = server.connected
        await server.sio.emit("note", {"x": 2}, to=sid, namespace="/t")
        assert await next_message(ws) == '42/t,["note",{"x":2}]'

        await ws.close()

        async def disconnected() -> bool:
            return sid in server.disconnected

        await eventually(disconnected)


async def test_a_client_that_never_pongs_is_dropped_after_interval_plus_timeout(
    server: Harness,
) -> None:
    async with aiohttp.ClientSession() as http:
        ws, opened_at, early_pings = await open_socket(http, server.url, answer_pings=False)
        (sid,) = server.connected
        got = ["2" for _ in early_pings]
        closed_at = None
        while time.monotonic() - opened_at < 4 * (PING_INTERVAL + PING_TIMEOUT):
            msg = await ws.receive(timeout=4 * (PING_INTERVAL + PING_TIMEOUT))
            if msg.type is not aiohttp.WSMsgType.TEXT:
                closed_at = time.monotonic() - opened_at
                break
            got.append(msg.data)
        assert closed_at is not None, got
        # Pinged once and never again without a pong: dropped (the connection closed by the
        # server) once the ping went unanswered for ping_timeout, not before.
        assert got[0] == "2" and got.count("2") == 1 and "3" not in got, got
        assert closed_at > PING_INTERVAL * 0.25 + PING_TIMEOUT * 0.9, closed_at

        async def gone() -> bool:
            return sid in server.disconnected and not server.sio.eio.sockets

        await eventually(gone)


async def test_sockets_that_connect_together_are_not_pinged_together(server: Harness) -> None:
    """After a mass reconnect the first pings spread over the interval, so the sockets do
    not go on being pinged all at once every interval."""
    async with aiohttp.ClientSession() as http:
        sockets = await asyncio.gather(*(open_socket(http, server.url) for _ in range(30)))

        async def first_ping(opened: Opened) -> float:
            if opened.early_pings:
                return opened.early_pings[0]
            assert await opened.ws.receive_str(timeout=PING_INTERVAL * 3) == "2"
            await opened.ws.send_str("3")
            return time.monotonic()

        pinged = await asyncio.gather(*(first_ping(o) for o in sockets))
        opened = [o.opened_at for o in sockets]
        # Each first ping within the interval of its connect (``pinged`` was awaited with
        # that bound), and spread over it rather than all at once.
        assert all(p > o for p, o in zip(pinged, opened, strict=True))
        assert max(pinged) - min(pinged) > PING_INTERVAL * 0.3, "spread over the interval"
        for o in sockets:
            await o.ws.close()


class _FakeServer:
    ping_interval = 0.1
    ping_timeout = 0.1
    logger = engineio.AsyncServer(async_mode="aiohttp").logger

    def create_queue(self) -> PacketQueue:
        return PacketQueue()


def message(data: str) -> engineio.packet.Packet:
    return engineio.packet.Packet(engineio.packet.MESSAGE, data=data)


def datas(packets: list[Any]) -> list[Any]:
    return [p.data for p in packets]


async def test_poll_batches_stops_at_the_close_marker_and_times_out() -> None:
    s = LeanSocket(_FakeServer(), "sid")
    for item in (message("a"), message("b"), None, message("c")):
        s._put(item)
    assert s.pending_bytes == 6  # "4a", "4b", "4c"
    assert datas(await s.poll()) == ["a", "b"]
    assert datas(await s.poll()) == ["c"]  # the close marker went back behind what followed it
    assert await s.poll() == []
    assert s.queue.empty()
    assert s.pending_bytes == 0

    # A packet arriving while the poll waits is returned with what came along with it.
    async def later() -> None:
        await asyncio.sleep(0.02)
        s._put(message("x"))
        s._put(message("y"))

    feeder = asyncio.create_task(later())
    assert datas(await s.poll()) == ["x", "y"]
    await feeder

    started = time.monotonic()
    with pytest.raises(engineio.exceptions.QueueEmpty):
        await s.poll()
    waited = time.monotonic() - started
    assert waited > 0.18, waited  # it waited ping_interval + ping_timeout, not less

    # A cancelled poll ends the same way as upstream's: QueueEmpty, nothing left behind.
    task = asyncio.create_task(s.poll())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(engineio.exceptions.QueueEmpty):
        await task
    s._put(message("z"))
    assert datas(await s.poll()) == ["z"]
    assert s.pending_bytes == 0
    joined = asyncio.create_task(s.queue.join())
    await asyncio.sleep(0)
    assert joined.done()  # every get matched by task_done


async def test_the_packet_queue_keeps_asyncio_queues_contract() -> None:
    """``PacketQueue`` stands in for ``asyncio.Queue``: order, waiting getters in turn, a
    cancelled getter losing nothing, ``join`` until every item is done."""
    q = PacketQueue()
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()
    first, second = asyncio.create_task(q.get()), asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait("a")
    q.put_nowait("b")
    assert list(await asyncio.wait_for(asyncio.gather(first, second), 1)) == ["a", "b"]

    # A getter woken and then cancelled before it ran hands its item to the next one.
    cancelled, waiting = asyncio.create_task(q.get()), asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait("c")
    cancelled.cancel()
    assert await asyncio.wait_for(waiting, 1) == "c"
    assert q.empty() and q.qsize() == 0

    joined = asyncio.create_task(q.join())
    await asyncio.sleep(0)
    assert not joined.done()  # three taken, none done
    for _ in range(3):
        q.task_done()
    await asyncio.wait_for(joined, 1)
    with pytest.raises(ValueError):
        q.task_done()


async def test_a_browser_offering_deflate_gets_plain_frames(server: Harness) -> None:
    """Browsers offer per-message deflate; the node declines it (``PlainWebSocket``), so no
    socket keeps a compressor, and frames go out as they are."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            server.url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket",
            headers={"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"},
        )
        assert "Sec-WebSocket-Extensions" not in ws._response.headers
        assert ws.compress == 0
        assert (await ws.receive_str()).startswith("0")
        await ws.send_str("40/t,{}")
        assert (await ws.receive_str()).startswith("40/t,")
        await ws.send_str('42/t,7["hello",{"n":1}]')
        assert await next_message(ws) == '43/t,7[{"echo":{"n":1}}]'
        await ws.close()


async def test_a_websocket_whose_close_failed_leaves_no_reference_cycle() -> None:
    """aiohttp keeps the error that ended a websocket's close() on the response, and its
    traceback holds the response: every client dropped without reading left a cycle the
    collector pacer's frozen-garbage check found (bench/soak.py). The engine.io websocket
    lets go of that traceback as its handler ends."""
    answered: list[weakref.ref[web.WebSocketResponse]] = []

    async def handler(ws: Any) -> None:
        # What a dropped never-reader does: its transport is cut, then the close frame fails.
        ws._sock._req.transport.abort()
        await ws._sock.close()
        assert ws._sock.exception() is not None, "the close did not fail: nothing tested"

    async def route(request: web.Request) -> web.StreamResponse:
        server = type("Server", (), {"max_http_buffer_size": 1 << 20})()
        response: web.WebSocketResponse = await PlainWebSocket(handler, server)(
            {"aiohttp.request": request}
        )
        answered.append(weakref.ref(response))
        return response

    app = web.Application()
    app.router.add_get("/ws", route)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    # As on a node, where the pacer froze the connection's objects long before it ended:
    # only reference counting frees them.
    gc.disable()
    try:
        async with aiohttp.ClientSession() as http:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                    await ws.receive(timeout=5)

        async def freed() -> bool:
            return bool(answered) and answered[0]() is None

        await eventually(freed, 5)
    finally:
        gc.enable()
        await runner.cleanup()


class _ServicedSocket:
    """What the service task reads of a socket, and its ping deadline check counted."""

    def __init__(self, sid: str, closed: bool) -> None:
        self.sid = sid
        self.closed = closed
        self.closing = False
        self.checked = asyncio.Event()

    async def check_ping_timeout(self) -> bool:
        self.checked.set()
        return True


async def test_the_service_task_lets_closed_sockets_go_checks_the_rest_and_stops_at_once() -> None:
    server = TrackedEngineServer(async_mode="aiohttp", ping_timeout=30)
    gone, live = _ServicedSocket("gone", closed=True), _ServicedSocket("live", closed=False)
    server.sockets = {"gone": gone, "live": live}
    task = asyncio.ensure_future(server._service_task())
    try:
        await asyncio.wait_for(live.checked.wait(), 5)
        assert list(server.sockets) == ["live"], "the closed socket is let go"
        server.service_task_event.set()
        # Between its passes it waits the whole ping timeout (30 s), but not for the stop.
        await asyncio.wait_for(task, 1)
    finally:
        task.cancel()
