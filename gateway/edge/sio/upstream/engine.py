"""engine.io's socket and server as Membrane runs them: each override names the upstream
function it replaces (tests/test_upstream_guard.py fingerprints them); the bounds they hold a
client to are in ``gateway.edge.sio.limits``."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from typing import Any

import engineio
import engineio.async_socket
import engineio.exceptions
import engineio.packet
from aiohttp import WSCloseCode, web
from engineio.async_drivers import aiohttp as engineio_aiohttp

from gateway.edge.detach import take_connection
from gateway.edge.sio import limits
from gateway.edge.sio.upstream.packet_queue import PacketQueue
from gateway.edge.sio.upstream.websocket import DetachedWebSocket, WebSocketConnection
from gateway.ops.metrics import Metrics
from gateway.ops.ratelimit import TokenBucket
from gateway.ops.slotted_timers import SlottedHandle, SlottedTimers
from gateway.ops.tasks import TaskGroup, raise_if_cancelling

log = logging.getLogger(__name__)


class LeanSocket(engineio.async_socket.AsyncSocket):  # type: ignore[misc]
    """engine.io's socket with the same behaviour and fewer objects, and with what a hostile
    client can make it hold bounded.

    On a websocket (the only transport a node offers) the socket is its connection's peer
    (``gateway.edge.sio.upstream.websocket``): each message arrives by a call, not a wait;
    what is sent is written to the transport at once, with no queue and no writer task; and
    an idle socket has no task at all. The messages of one client are still handled one at a
    time, in order, by a task that lives only while some wait (``_handle_inbox``): so a
    presence change from one device can never overtake another. A pong, most of what an idle
    client sends, is handled in the call itself.

    Timers rather than waits: one watchdog per socket (``_watch``) ends a connection not
    heard from for ``ping_interval + ping_timeout``, the deadline upstream puts on every
    read, and the next ping is a timer (``schedule_ping``), not a sleeping task. A timer
    armed and cancelled per message was about 5% of a node's CPU when it refused 800 starts
    a second; a task per wait made the collector's older generations large and slow (a gen1
    collection of ~300k objects took ~200 ms at 8,000 sockets, measured).

    A client that does not read is dropped once the transport holds ``MAX_PENDING_BYTES``
    unsent (``pending_bytes``); a client that abuses the protocol is dropped with a reason
    (``drop``); a connection that ends with bytes unsent is cut after ``WRITER_GRACE_S``.

    Long-polling, and an upgrade from it, keep upstream's queue and its websocket handler.
    """

    last_ping: float | None
    connected: bool
    closing: bool
    closed: bool
    queue: PacketQueue

    _pinged_before = False
    _queued_bytes = 0
    """Bytes queued for a polling client and not yet taken by a GET (or upstream's writer)."""
    dropped: str | None = None
    """The error code this connection was dropped for, once it was."""
    _ws: WebSocketConnection | None = None
    """The websocket, from ``attach`` until it ends."""
    _ws_ended = False
    _inbox: collections.deque[Any] | None = None
    """Packets received and not yet handled, while ``_handle_inbox`` runs."""
    _handler: asyncio.Task[None] | None = None
    _heard_at = 0.0
    """When the client last sent anything on its websocket (the loop's clock)."""
    _watchdog: SlottedHandle | None = None
    _handling = False
    """A packet of the client is being handled."""
    ping_every_s: float | None = None
    """How often this connection is pinged, when not the server's ``ping_interval``
    (``watch``)."""
    silence_limit_s: float | None = None
    """How long this connection's client may stay silent before it is cut, when watched
    (``watch``); else the server's ``ping_interval + ping_timeout``."""
    _ping_timer: SlottedHandle | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    """The websocket's loop, kept: on 3.11 every asyncio.get_running_loop() is a getpid()
    system call, and a ping is scheduled after every pong."""

    def __init__(self, server: Any, sid: str) -> None:
        super().__init__(server, sid)
        self.connects = TokenBucket(*limits.NAMESPACE_CONNECTS)

    async def send(self, pkt: Any) -> None:
        """As ``AsyncSocket.send``, written at once on a websocket, else onto a queue bounded
        in bytes: past the bound the client is too slow to keep, and is dropped rather than
        buffered."""
        if self.dropped is not None or not await self.check_ping_timeout():
            return
        self._put(pkt)

    @property
    def pending_bytes(self) -> int:
        """Bytes sent to this client that it has not read yet: queued here, or held by the
        websocket's transport."""
        ws = self._ws
        return self._queued_bytes + (0 if ws is None else ws.unsent)

    def _put(self, pkt: Any) -> None:
        if self._ws_ended:
            return
        ws = self._ws
        if ws is not None:
            if pkt is None:
                return
            if ws.send(pkt.encode()) > limits.MAX_PENDING_BYTES:
                self.drop("slow_consumer", None)
            elif pkt.packet_type == engineio.packet.CLOSE:
                # The server's goodbye (upstream's ``close``): nothing follows it. Upstream
                # waited for the client to close; one that did not held the connection.
                ws.close(WSCloseCode.OK)
            return
        size = limits.packet_size(pkt)
        if self._queued_bytes + size > limits.MAX_PENDING_BYTES:
            self.drop("slow_consumer", None)
            return
        self._queued_bytes += size
        self.queue.put_nowait(pkt)

    def _taken(self, pkt: Any) -> Any:
        self.queue.task_done()
        self._queued_bytes -= limits.packet_size(pkt)
        return pkt

    def drop(self, code: str, ws_code: int | None) -> None:
        """End the connection for abusing the protocol, with one short log line and a count
        under ``code``. With ``ws_code`` the client gets a close frame with that code and
        ``code`` as its reason, and no packet after the one at hand is handled; without (a
        client that does not read, which would never see one) the transport is cut at
        once."""
        if self.dropped is not None:
            return
        self.dropped = code
        log.warning("engine.io connection %s dropped: %s", self.sid, code)
        count = getattr(self.server, "count_refusal", None)
        if count is not None:
            count(code)
        ws = self._ws
        if ws is not None:
            if ws_code is None:
                ws.abort()
            else:
                ws.close(ws_code, code)
        elif not self._ws_ended:
            self.queue.put_nowait(None)  # ends upstream's writer (a poll upgraded)

    def end_transport(self) -> None:
        """Close the connection as a network drop would, without an engine.io CLOSE packet
        (a client reconnects after a drop, not after a server's goodbye)."""
        if self._ws is not None:
            self._ws.close(WSCloseCode.GOING_AWAY)
        elif not self._ws_ended:
            self.queue.put_nowait(None)  # ends upstream's writer, which closes the websocket

    # -- the websocket's peer (gateway.edge.sio.upstream.websocket) --

    def attach(self, ws: WebSocketConnection) -> WebSocketConnection:
        """The client's websocket is open: what was queued before it (the OPEN packet) goes
        out first, then everything as it is sent; the watchdog starts. With
        ``websocket_message`` and ``_handle_inbox``, what ``AsyncSocket._websocket_handler``
        does for a websocket opened as one."""
        loop = self._loop = asyncio.get_running_loop()
        self.connected = True
        self.upgraded = True
        queue = self.queue
        while not queue.empty():
            pkt = self._taken(queue.get_nowait())
            if pkt is not None:
                ws.send(pkt.encode())
        self._ws = ws
        timeout_s = self.server.ping_interval + self.server.ping_timeout
        self._heard_at = loop.time()
        self._watchdog = self.server.timers.call_at(
            self._heard_at + timeout_s, self._watch, timeout_s
        )
        self.server.logger.info("%s: Upgrade to websocket successful", self.sid)
        return ws

    def websocket_heard(self) -> None:
        assert self._loop is not None
        self._heard_at = self._loop.time()

    def websocket_message(self, data: str | bytes) -> None:
        """A message from the client: an engine.io packet, handled in order after those
        before it (see ``_handle_inbox``). A pong with none waiting is handled here, as
        ``AsyncSocket.receive`` does."""
        if self.dropped is not None or self._ws_ended:
            return
        assert self._loop is not None
        self._heard_at = self._loop.time()
        try:
            pkt = engineio.packet.Packet(encoded_packet=data)
        except (ValueError, TypeError, IndexError, engineio.exceptions.UnknownPacketError):
            # Not an engine.io packet.
            self.drop("malformed_packet", limits.WS_PROTOCOL_ERROR)
            return
        inbox = self._inbox
        if inbox is None:
            if pkt.packet_type == engineio.packet.PONG and not self.closed:
                self.schedule_ping()  # all that ``receive`` does with it
                return
            inbox = collections.deque()
            try:
                # In the server's task group, which a stopping node cancels and awaits.
                self._handler = self.server.start_background_task(self._handle_inbox, inbox)
            except RuntimeError:  # the group is closed: the node is stopping
                return
            self._inbox = inbox
        inbox.append(pkt)
        ws = self._ws
        if len(inbox) == limits.MAX_INBOX and ws is not None and ws.transport is not None:
            ws.transport.pause_reading()  # resumed as the handler catches up

    async def _handle_inbox(self, inbox: collections.deque[Any]) -> None:
        """Each packet received in turn, until none is left; stops at one that got the
        connection dropped. The task ends with the inbox empty, and the next packet starts
        another: an idle socket has none."""
        try:
            while inbox and self.dropped is None:
                pkt = inbox.popleft()
                if len(inbox) == limits.MAX_INBOX // 2:
                    ws = self._ws
                    if ws is not None and ws.transport is not None:
                        ws.transport.resume_reading()
                self._handling = True
                try:
                    if (
                        pkt.packet_type == engineio.packet.MESSAGE
                        and not self.server.async_handlers
                    ):
                        await self._message(pkt.data)
                    else:
                        await self.receive(pkt)
                except engineio.exceptions.SocketIsClosedError:  # pragma: no cover
                    self.server.logger.info("Receive error -- socket is closed")
                    break
                except (
                    ValueError,
                    TypeError,
                    IndexError,
                    engineio.exceptions.UnknownPacketError,
                ):
                    # A packet a client may not send (OPEN, NOOP, ...).
                    self.drop("malformed_packet", limits.WS_PROTOCOL_ERROR)
                except Exception:  # pragma: no cover
                    # As upstream: an unexpected error is logged, and the connection kept.
                    self.server.logger.exception("Unknown receive error")
                finally:
                    self._handling = False
        finally:
            self._inbox = None
            self._handler = None
            if self._ws_ended:
                self._transport_closed()

    async def _message(self, data: Any) -> None:
        """``receive`` of a MESSAGE (a socket.io packet): the server's message handler run
        inline, as ``AsyncServer._trigger_event`` runs it with ``async_handlers`` off, an
        error logged and passed over. Without the three frames between (``receive``,
        ``_trigger_event`` and the closure it makes for each message), which every store
        round trip of the handler resumed again: a call's events make a dozen."""
        handler = self.server.handlers.get("message")
        if handler is None:
            return
        try:
            await handler(self.sid, data)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.server.logger.exception("message async handler error")

    def websocket_ended(self, code: int | None) -> None:
        """The websocket ended (closed by either side, cut, or lost): once the packets
        received before it are handled, the socket closes as upstream's does when its
        transport ends."""
        if self._ws_ended:
            return
        self._ws_ended = True
        self._ws = None  # (the connection refers to this socket: no cycle left behind)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if self._handler is None:
            self._transport_closed()

    def _transport_closed(self) -> None:
        try:
            self.server.start_background_task(self._close_for_transport)
        except RuntimeError:  # the task group is closed: the node is stopping
            pass

    async def _close_for_transport(self) -> None:
        """As the end of upstream's websocket handler: the socket closed (socket.io's
        disconnect handlers run), and the server lets go of it."""
        try:
            await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
        finally:
            if self.server.sockets.get(self.sid) is self:
                del self.server.sockets[self.sid]

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
        then due again that long after it was last heard; else the websocket is ended, as
        upstream's deadline on each read would have."""
        loop = self._loop or asyncio.get_running_loop()
        due = self._heard_at + timeout_s
        ws = self._ws
        if loop.time() < due:
            self._watchdog = self.server.timers.call_at(due, self._watch, timeout_s)
        elif self._handling:
            # Not the client's silence but this node's: a handler held up (by a store
            # outage, for seconds). Look again a full deadline later.
            self._watchdog = self.server.timers.call_later(timeout_s, self._watch, timeout_s)
        elif ws is not None:
            self._watchdog = None
            if self.silence_limit_s is not None:
                # A watched client fell silent: frozen or asleep, so it reads nothing either.
                # Cut it now rather than wait WRITER_GRACE_S for a close frame it will not
                # answer: its disconnect is what others are waiting for.
                log.info("engine.io connection %s silent, cut", self.sid)
                ws.abort()
            else:
                ws.close(WSCloseCode.OK)

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
            self._ping_timer = self.server.timers.call_later(delay, self._ping_due)

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
            self._ping_timer = self.server.timers.call_later(ping_every_s, self._ping_due)
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.cancel()
            due = self._heard_at + silence_limit_s
            self._watchdog = self.server.timers.call_at(due, self._watch, silence_limit_s)

    def _ping_due(self) -> None:
        """``AsyncSocket._send_ping`` after its sleep: ``send`` would find the ping timeout
        not passed (``last_ping`` was just set) and queue the packet."""
        self._ping_timer = None
        if not self.closing and not self.closed and self.dropped is None:
            self.last_ping = time.time()
            self._put(engineio.packet.Packet(engineio.packet.PING))
            self.server.logger.info("%s: Sending packet PING data None", self.sid)


class PlainWebSocket(engineio_aiohttp.WebSocket):  # type: ignore[misc]
    """engine.io's aiohttp websocket driver: the handshake answered by aiohttp, then the
    connection handed to a ``WebSocketConnection`` with the socket as its peer
    (``gateway.edge.sio.upstream.websocket``), and aiohttp's request let go.

    No per-message deflate: aiohttp offers to compress every frame, and browsers accept;
    each socket then keeps a zlib compressor (about 100 KB) and compresses each message, a
    few dozen bytes of JSON that compression barely shortens. Membrane's messages are small
    and its sockets many.

    A socket upgrading from long-polling (which a node does not offer) runs upstream's
    websocket handler over aiohttp's websocket, as upstream does."""

    async def __call__(self, environ: Any) -> Any:
        """Replaces ``WebSocket.__call__``."""
        request = environ["aiohttp.request"]
        max_size = self.server.max_http_buffer_size
        socket = getattr(self.handler, "__self__", None)
        if isinstance(socket, LeanSocket) and not socket.connected:
            detached = DetachedWebSocket(max_msg_size=max_size, compress=False)
            await detached.prepare(request)
            take_connection(
                request,
                lambda transport: socket.attach(WebSocketConnection(socket, transport, max_size)),
            )
            return detached
        self._sock = web.WebSocketResponse(max_msg_size=max_size, compress=False)
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


LASTING_ENVIRON_KEYS = ("REQUEST_METHOD", "QUERY_STRING", "HTTP_ORIGIN", "HTTP_USER_AGENT")


def lasting_environ(environ: dict[str, Any]) -> dict[str, Any]:
    """What of a connection's environ socket.io keeps for its connect handlers (Membrane's
    own read none of it: a client authenticates in its CONNECT packet)."""
    return {key: environ[key] for key in LASTING_ENVIRON_KEYS if key in environ}


# Sockets the service task looks at between two waits (``TrackedEngineServer._service_task``).
SERVICE_BATCH = 200


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

    _timers: SlottedTimers | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks = TaskGroup("engineio")
        # (A copy: the driver's table is engine.io's own, shared by every server.)
        drivers: dict[str, Any] = getattr(self, "_async")  # noqa: B009 - untyped upstream
        self._async = {**drivers, "websocket": PlainWebSocket}

    @property
    def timers(self) -> SlottedTimers:
        """The sockets' pings and silence watchdogs, run in slots (gateway.ops.slotted_timers)
        rather than each waking the loop on its own."""
        if self._timers is None:
            self._timers = SlottedTimers(asyncio.get_running_loop())
        return self._timers

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        """Replaces ``AsyncServer.create_queue`` (an ``asyncio.Queue``, 3 KB a socket)."""
        return PacketQueue()

    async def _service_task(self) -> None:
        """As ``AsyncServer._service_task``: every socket looked at once per ``ping_timeout``,
        a closed one let go and the others' ping deadline checked; but ``SERVICE_BATCH``
        sockets between waits rather than one. Upstream waited for its stop event after each
        socket, which started a task and a timer every few milliseconds (200 a second with
        4,000 sockets on a node, idle or not): that was the largest cost of an idle node
        after its pings. (Each ``LeanSocket`` also has its own silence watchdog.)"""
        event = self.service_task_event = self.create_event()
        while not event.is_set():
            sockets: list[Any] = list(self.sockets.values())
            batches = max(1, -(-len(sockets) // SERVICE_BATCH))
            for start in range(0, batches * SERVICE_BATCH, SERVICE_BATCH):
                try:
                    for eio_socket in sockets[start : start + SERVICE_BATCH]:
                        sid = eio_socket.sid
                        if eio_socket.closed:
                            if self.sockets.get(sid) is eio_socket:
                                del self.sockets[sid]
                        elif not eio_socket.closing:
                            await eio_socket.check_ping_timeout()
                except Exception:
                    self.logger.exception("service task exception")
                try:
                    async with asyncio.timeout(self.ping_timeout / batches):
                        await event.wait()
                    return
                except TimeoutError:
                    raise_if_cancelling()  # a stop that met the timeout (3.11)
                    continue

    def end_transports(self) -> None:
        """Close every websocket still open, as a network drop would (see
        ``LeanSocket.end_transport``): after a drain, for what connected during it. aiohttp
        no longer knows these connections, so its shutdown would not close them."""
        for socket in list(self.sockets.values()):
            if isinstance(socket, LeanSocket):
                socket.end_transport()

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

        # socket.io keeps the environ it is given for the connection's life: a small copy,
        # not the request (and its handler, headers and buffers) it came with.
        ret = await self._trigger_event("connect", sid, lasting_environ(environ), run_async=False)
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
