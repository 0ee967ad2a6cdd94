"""engine.io's socket and server as Membrane runs them: each override names the upstream
function it replaces (tests/test_upstream_guard.py fingerprints them); the bounds they hold a
client to are in ``gateway.edge.sio.limits``."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import engineio
import engineio.async_socket
import engineio.exceptions
import engineio.packet
from aiohttp import web
from engineio.async_drivers import aiohttp as engineio_aiohttp

from gateway.edge.sio import limits
from gateway.ops.metrics import Metrics
from gateway.ops.ratelimit import TokenBucket
from gateway.ops.tasks import TaskGroup

log = logging.getLogger(__name__)


class LeanSocket(engineio.async_socket.AsyncSocket):  # type: ignore[misc]
    """engine.io's socket with the same behaviour and fewer objects per message, and with
    what a hostile client can make it hold bounded.

    The stock socket waits for every outgoing batch and every incoming message through
    ``asyncio.wait_for``, which (CPython 3.11) wraps the wait in a new Task and adds a waiter
    future and a callback; the reader also spawns a Task per message. Thousands of sockets
    each keep two such waits pending for seconds, so they outlive the young generation and
    make the collector's older generations large and slow (a gen1 collection of ~300k
    objects took ~200 ms at 8,000 sockets, measured). Here both waits run in the socket's own
    task with no Task of their own. On a websocket neither arms a timer per message either:
    one watchdog timer per socket (``_watch``) ends a connection not heard from for
    ``ping_interval + ping_timeout``, the deadline upstream puts on every read, and the writer
    waits for its queue with no deadline at all, because its reader always ends it. A timer
    armed and cancelled per message was about 5% of a node's CPU when it refused 800 starts a
    second, and three more objects per message for the collector. (A polling GET still
    waits under ``asyncio.timeout``; a packet already queued is taken without arming one.)

    The outgoing queue is bounded in bytes (``MAX_PENDING_BYTES``), a client that abuses the
    protocol is dropped with a reason (``drop``), and a writer stuck on a client that stopped
    reading cannot hold the connection open once its reader has ended.
    """

    last_ping: float | None
    connected: bool
    closing: bool
    closed: bool
    queue: asyncio.Queue[Any]

    _pinged_before = False
    pending_bytes = 0
    """Bytes queued for the client and not yet taken by the writer (or a polling GET)."""
    dropped: str | None = None
    """The error code this connection was dropped for, once it was."""
    _close_code: int | None = None
    _transport: asyncio.Transport | None = None
    _heard_at = 0.0
    """When the client last sent anything on its websocket (the loop's clock)."""
    _watchdog: asyncio.TimerHandle | None = None
    _reader: asyncio.Task[Any] | None = None
    _silent = False
    """The watchdog ended the connection: the client was silent past the deadline."""
    _handling = False
    """The reader is handling the client's last packet, not waiting for the next."""
    ping_every_s: float | None = None
    """How often this connection is pinged, when not the server's ``ping_interval``
    (``watch``)."""
    silence_limit_s: float | None = None
    """How long this connection's client may stay silent before it is cut, when watched
    (``watch``); else the server's ``ping_interval + ping_timeout``."""
    _ping_timer: asyncio.TimerHandle | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    """The websocket's loop, kept: on 3.11 every asyncio.get_running_loop() is a getpid()
    system call, and a ping is scheduled after every pong."""

    def __init__(self, server: Any, sid: str) -> None:
        super().__init__(server, sid)
        self.connects = TokenBucket(*limits.NAMESPACE_CONNECTS)

    async def send(self, pkt: Any) -> None:
        """As ``AsyncSocket.send``, onto a queue bounded in bytes: past the bound the client
        is too slow to keep, and is dropped rather than buffered."""
        if self.dropped is not None or not await self.check_ping_timeout():
            return
        self._put(pkt)

    def _put(self, pkt: Any) -> None:
        size = limits.packet_size(pkt)
        if self.pending_bytes + size > limits.MAX_PENDING_BYTES:
            self.drop("slow_consumer", None)
            return
        self.pending_bytes += size
        self.queue.put_nowait(pkt)

    def _taken(self, pkt: Any) -> Any:
        self.queue.task_done()
        self.pending_bytes -= limits.packet_size(pkt)
        return pkt

    def drop(self, code: str, ws_code: int | None) -> None:
        """End the connection for abusing the protocol, with one short log line and a count
        under ``code``. With ``ws_code`` the reader stops after the packet at hand and the
        client gets a close frame with that code and ``code`` as its reason; without (a client
        that does not read, which would never see one) the transport is cut at once."""
        if self.dropped is not None:
            return
        self.dropped = code
        self._close_code = ws_code
        log.warning("engine.io connection %s dropped: %s", self.sid, code)
        count = getattr(self.server, "count_refusal", None)
        if count is not None:
            count(code)
        if ws_code is None and self._transport is not None:
            self._transport.abort()

    async def poll(self) -> list[Any]:
        """Wait for packets to send to the client (as ``AsyncSocket.poll``)."""
        queue = self.queue
        if queue.empty():
            # (Not waiting inside an ``except QueueEmpty``: that would keep the exception,
            # its traceback and a frame alive for as long as the wait lasts.)
            try:
                async with asyncio.timeout(self.server.ping_interval + self.server.ping_timeout):
                    pkt = self._taken(await queue.get())
            except (TimeoutError, asyncio.CancelledError):
                raise engineio.exceptions.QueueEmpty() from None
        else:
            pkt = self._taken(queue.get_nowait())
        return self._batch(pkt)

    async def _next_batch(self) -> list[Any]:
        """The websocket writer's ``poll``: every packet queued, waiting for the first with no
        deadline (the reader ends the writer by queueing None); [] once the socket ends."""
        queue = self.queue
        return self._batch(self._taken(await queue.get() if queue.empty() else queue.get_nowait()))

    def _batch(self, pkt: Any) -> list[Any]:
        """``pkt`` and every packet queued after it; [] when ``pkt`` is the end (None)."""
        if pkt is None:
            return []
        queue = self.queue
        packets = [pkt]
        while not queue.empty():
            pkt = self._taken(queue.get_nowait())
            if pkt is None:
                queue.put_nowait(None)
                break
            packets.append(pkt)
        return packets

    def _watch(self, timeout_s: float) -> None:
        """Due when the client has been silent ``timeout_s`` unless it was heard from since:
        then due again that long after it was last heard; else its reader is ended, as
        upstream's deadline on each read would have."""
        loop = asyncio.get_running_loop()
        due = self._heard_at + timeout_s
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._watch, timeout_s)
        elif self._handling:
            # Not the client's silence but this node's: a handler held up (by a store
            # outage, for seconds) reads nothing meanwhile; what the client sent waits in the
            # websocket's queue. Look again a full deadline later.
            self._watchdog = loop.call_later(timeout_s, self._watch, timeout_s)
        elif self._reader is not None:
            self._silent = True
            self._watchdog = None
            if self.silence_limit_s is not None and self._transport is not None:
                # A watched client fell silent: frozen or asleep, so it reads nothing either.
                # Cut it now rather than wait WRITER_GRACE_S for a close frame it will not
                # answer: its disconnect is what others are waiting for.
                log.info("engine.io connection %s silent, cut", self.sid)
                self._transport.abort()
            self._reader.cancel()

    def schedule_ping(self) -> None:
        """As ``AsyncSocket.schedule_ping``, with the wait a timer rather than a Task
        sleeping: one object per socket every ping interval instead of about eight.

        The first ping comes at a random point of the interval. Sockets that connected
        together (thousands after a node restart or a deploy) would otherwise be pinged
        together every interval for as long as they stay: 8,000 pings and pongs within a
        few seconds doubled ring latency while they lasted (bench/click_to_ring.py). A client
        may be pinged early: it only expects a ping within interval + timeout."""
        # only schedule a new ping if the previous ping wait cycle completed
        if self.last_ping:
            self.last_ping = None
            delay = self.ping_every_s or self.server.ping_interval
            if not self._pinged_before:
                self._pinged_before = True
                delay *= random.uniform(0.25, 1.0)
            loop = self._loop or asyncio.get_running_loop()
            self._ping_timer = loop.call_later(delay, self._ping_due)

    def watch(self, ping_every_s: float, silence_limit_s: float) -> None:
        """Ping this connection every ``ping_every_s`` and cut it once its client has been
        silent (no packet at all, pongs included) for ``silence_limit_s``: for the few
        connections whose liveness others rely on (an agent's, ``limits.agent_liveness``).
        A frozen client keeps its TCP connection open and would otherwise hold it for the
        server's ping interval plus timeout (45 s); the many idle visitors' connections
        keep the server's long, cheap interval. The watchdog and the next ping are moved
        up at once."""
        self.ping_every_s = ping_every_s
        self.silence_limit_s = silence_limit_s
        loop = asyncio.get_running_loop()
        timer = self._ping_timer
        if timer is not None and timer.when() > loop.time() + ping_every_s:
            timer.cancel()
            self._ping_timer = loop.call_later(ping_every_s, self._ping_due)
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.cancel()
            due = self._heard_at + silence_limit_s
            self._watchdog = loop.call_at(due, self._watch, silence_limit_s)

    def _ping_due(self) -> None:
        """``AsyncSocket._send_ping`` after its sleep: ``send`` would find the ping timeout
        not passed (``last_ping`` was just set) and queue the packet."""
        self._ping_timer = None
        if not self.closing and not self.closed and self.dropped is None:
            self.last_ping = time.time()
            self._put(engineio.packet.Packet(engineio.packet.PING))
            self.server.logger.info("%s: Sending packet PING data None", self.sid)

    async def _websocket_handler(self, ws: Any) -> None:
        """The websocket transport (as ``AsyncSocket._websocket_handler``), with the reader
        waiting in this task under ``asyncio.timeout`` instead of a Task per message, and
        stopping at the first packet that gets the connection dropped."""
        server = self.server
        packet = engineio.packet
        max_size = server.max_http_buffer_size
        request = ws.environ.get("aiohttp.request")
        self._transport = request.transport if request is not None else None

        async def websocket_wait() -> Any:
            data = await ws.wait()
            if data and len(data) > max_size:
                raise ValueError("packet is too large")
            return data

        if self.connected:
            # the socket was already connected, so this is an upgrade
            self.upgrading = True  # hold packet sends during the upgrade
            try:
                pkt = await websocket_wait()
            except OSError:  # pragma: no cover
                return
            decoded_pkt = packet.Packet(encoded_packet=pkt)
            if decoded_pkt.packet_type != packet.PING or decoded_pkt.data != "probe":
                server.logger.info("%s: Failed websocket upgrade, no PING packet", self.sid)
                self.upgrading = False
                return
            await ws.send(packet.Packet(packet.PONG, data="probe").encode())
            self._put(packet.Packet(packet.NOOP))  # end poll
            try:
                pkt = await websocket_wait()
            except OSError:  # pragma: no cover
                self.upgrading = False
                return
            decoded_pkt = packet.Packet(encoded_packet=pkt)
            if decoded_pkt.packet_type != packet.UPGRADE:
                self.upgraded = False
                server.logger.info(
                    "%s: Failed websocket upgrade, expected UPGRADE packet, received %s instead.",
                    self.sid,
                    pkt,
                )
                self.upgrading = False
                return
            self.upgraded = True
            self.upgrading = False
        else:
            self.connected = True
            self.upgraded = True

        async def writer() -> None:
            while True:
                try:
                    packets = await self._next_batch()
                except asyncio.CancelledError:
                    break  # as upstream's writer: ended, then the socket is closed below
                if not packets:
                    # empty packet list returned -> connection closed
                    break
                try:
                    for pkt in packets:
                        await ws.send(pkt.encode())
                except BaseException:
                    break
            if self._close_code is not None and self.dropped is not None:
                # The engine.io wrapper's ``close`` takes no code: the close frame tells a
                # client that reads why it was dropped.
                await ws._sock.close(code=self._close_code, message=self.dropped.encode())
            else:
                await ws.close()

        # Owned by this handler, which awaits it below before it returns (as upstream).
        writer_task = asyncio.ensure_future(writer())
        server.logger.info("%s: Upgrade to websocket successful", self.sid)

        loop = self._loop = asyncio.get_running_loop()
        timeout_s = server.ping_interval + server.ping_timeout
        self._heard_at = loop.time()
        self._reader = asyncio.current_task()
        self._watchdog = loop.call_at(self._heard_at + timeout_s, self._watch, timeout_s)
        while self.dropped is None:
            try:
                p = await ws.wait()  # websocket_wait, one coroutine fewer per message
            except BaseException:  # the watchdog, a cancel, or the connection failing
                if self._silent and self._reader is not None:
                    self._reader.uncancel()  # our own cancel, handled here
                break
            self._heard_at = loop.time()
            if p and len(p) > max_size:
                break  # "packet is too large": the connection ends, as upstream's
            if p is None:
                # connection closed by client
                break
            try:
                pkt = packet.Packet(encoded_packet=p)
                self._handling = True
                try:
                    await self.receive(pkt)
                finally:
                    self._handling = False
            except engineio.exceptions.SocketIsClosedError:  # pragma: no cover
                server.logger.info("Receive error -- socket is closed")
                break
            except (ValueError, TypeError, IndexError, engineio.exceptions.UnknownPacketError):
                # Not an engine.io packet, or one a client may not send (OPEN, NOOP, ...).
                self.drop("malformed_packet", limits.WS_PROTOCOL_ERROR)
            except Exception:  # pragma: no cover
                # if we get an unexpected exception we log the error and exit
                # the connection properly
                server.logger.exception("Unknown receive error")

        if self._watchdog is not None:
            self._watchdog.cancel()
        self._reader = None
        self.queue.put_nowait(None)  # unlock the writer task so it can exit
        _, pending = await asyncio.wait([writer_task], timeout=limits.WRITER_GRACE_S)
        if pending and self._transport is not None:
            self._transport.abort()  # the client stopped reading: its writer waits on it
        await writer_task
        await self.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)


class PlainWebSocket(engineio_aiohttp.WebSocket):  # type: ignore[misc]
    """engine.io's aiohttp websocket, without per-message deflate.

    aiohttp offers to compress every frame, and browsers accept: each socket then keeps a
    zlib compressor (about 100 KB) and compresses each message, a few dozen bytes of JSON
    that compression barely shortens. Membrane's messages are small and its sockets many."""

    async def __call__(self, environ: Any) -> Any:
        """As ``WebSocket.__call__``, with ``compress=False``."""
        request = environ["aiohttp.request"]
        self._sock = web.WebSocketResponse(
            max_msg_size=self.server.max_http_buffer_size, compress=False
        )
        await self._sock.prepare(request)
        self.environ = environ
        await self.handler(self)
        ended_by = self._sock.exception()
        if ended_by is not None:
            # aiohttp keeps the error that ended the websocket's close() on the response,
            # and its traceback holds close()'s frame, which holds the response: a reference
            # cycle that outlived every client dropped without reading (found by the
            # collector pacer's frozen-garbage check, gateway/ops/gc_pacer.py).
            ended_by.__traceback__ = None
        return self._sock


class TrackedEngineServer(engineio.AsyncServer):  # type: ignore[misc]
    """engine.io, with its background tasks (pings, the Redis listener) owned by a TaskGroup
    that shutdown cancels and awaits, instead of loose ``ensure_future`` tasks; its sockets
    are ``LeanSocket``."""

    socket_class: type[engineio.async_socket.AsyncSocket] = LeanSocket
    start_service_task: bool
    service_task_handle: Any
    sockets: dict[str, Any]
    max_http_buffer_size: int
    metrics: Metrics | None = None
    """Where refusals are counted (``membrane_errors_total``), when the node has metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks = TaskGroup("engineio")
        # (A copy: the driver's table is engine.io's own, shared by every server.)
        drivers: dict[str, Any] = getattr(self, "_async")  # noqa: B009 - untyped upstream
        self._async = {**drivers, "websocket": PlainWebSocket}

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        """Replaces ``AsyncServer.start_background_task`` (a loose ``ensure_future``)."""
        return self.tasks.spawn(target(*args, **kwargs), getattr(target, "__name__", "task"))

    def count_refusal(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(code).inc()

    async def handle_request(self, request: web.Request) -> web.StreamResponse:
        """As ``AsyncServer.handle_request``, with a body over ``max_http_buffer_size``
        refused at once (413) before engine.io sees it: upstream reads a polling POST's body
        whole whatever its declared length, and when the length is over the limit closes
        the session and waits for its queue to drain, which without a poller never happens;
        the request then hung, holding its buffers, and held up the node's shutdown."""
        if request.body_exists and (
            request.content_length is None or request.content_length > self.max_http_buffer_size
        ):
            self.count_refusal("payload_too_large")
            return await limits.refuse_body(request)
        result: web.StreamResponse = await super().handle_request(request)
        return result

    async def _handle_connect(self, environ: Any, transport: str, jsonp_index: Any = None) -> Any:
        """As ``AsyncServer._handle_connect``, which names its socket class outright."""
        if self.start_service_task:
            # start the service task to monitor connected clients
            self.start_service_task = False
            self.service_task_handle = self.start_background_task(self._service_task)

        sid = self.generate_id()
        s = self.socket_class(self, sid)
        self.sockets[sid] = s

        packet = engineio.packet
        pkt = packet.Packet(
            packet.OPEN,
            {
                "sid": sid,
                "upgrades": self._upgrades(sid, transport),
                "pingTimeout": int(self.ping_timeout * 1000),
                "pingInterval": int(self.ping_interval + self.ping_interval_grace_period) * 1000,
                "maxPayload": self.max_http_buffer_size,
            },
        )
        await s.send(pkt)

        ret = await self._trigger_event("connect", sid, environ, run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            self.logger.warning("Application rejected connection")
            return self._unauthorized(ret or None)

        s.schedule_ping()

        if transport == "websocket":
            ret = await s.handle_get_request(environ)
            if s.closed and sid in self.sockets:
                # websocket connection ended, so we are done
                del self.sockets[sid]
            return ret
        s.connected = True
        headers = None
        if self.cookie:
            cookie = (
                self.cookie
                if isinstance(self.cookie, dict)
                else {"name": self.cookie, "path": "/", "SameSite": "Lax"}
            )
            headers = [("Set-Cookie", self._generate_sid_cookie(sid, cookie))]
        try:
            return self._ok(await s.poll(), headers=headers, jsonp_index=jsonp_index)
        except engineio.exceptions.QueueEmpty:
            return self._bad_request()
