"""socket.io edge: authentication at connect, a table of events per namespace, errors.

Handlers are thin: validate with the codec, call a service, return an ack. Every failure
becomes ``{"ok": false, "error": {code, message}}`` as the ack when the client asked for
one, else an ``error`` event, as docs/PROTOCOL.md says. Nothing a client sends can raise
out of a handler.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import engineio
import engineio.async_socket
import engineio.exceptions
import engineio.packet
import socketio
from aiohttp import web

from gateway.core.admission import AdmissionLimits, admit_start
from gateway.core.call import Call
from gateway.core.errors import (
    DomainError,
    Forbidden,
    Invalid,
    RateLimited,
    Unauthenticated,
    overloaded,
)
from gateway.core.model import DeviceKind, DeviceState, Role, Site
from gateway.edge.auth import (
    AGENT_ROLES,
    SUPERVISOR_ROLES,
    VISITOR_ROLES,
    Claims,
    TokenService,
    check_configured_role,
)
from gateway.edge.errors import (
    INTERNAL_CODE,
    INTERNAL_MESSAGE,
    error_object,
    error_of,
    refused_ack,
)
from gateway.edge.ice import ice_servers
from gateway.edge.sio.sio_manager import ObservedRedisManager
from gateway.ops.load import LoadMonitor
from gateway.ops.metrics import Metrics
from gateway.ops.ratelimit import TokenBucket
from gateway.ops.tasks import TaskGroup
from gateway.services.call_service import CallService
from gateway.services.drain import RETRY_AFTER_S, Drain
from gateway.services.presence_service import PresenceChange, PresenceService, socket_device_id
from gateway.settings import Settings
from gateway.store.base import DeviceRef
from gateway.wire.codec import (
    Json,
    as_object,
    call_id_from_wire,
    call_request_from_wire,
    call_to_wire,
    device_update_from_wire,
    ok,
    presence_to_wire,
    signal_from_wire,
)

log = logging.getLogger(__name__)

# Bytes queued for one connection and not yet handed to its transport (which holds at most
# its own 64 KiB high-water mark on top). A client that falls this far behind is dropped,
# not buffered: a board that never reads would otherwise hold every presence change of its
# site for as long as it answers pings. A burst of a few hundred changes (a resync of a
# large site) fits; the availability feed drops its watchers at 64 KiB the same way.
MAX_PENDING_BYTES = 256 * 1024
# Namespace CONNECT packets per engine.io connection: one every 2 s on average, bursts of
# 10. Each connect and disconnect of /agent adds and removes a device (a presence change
# for every node and board); the shipped clients connect each namespace once.
NAMESPACE_CONNECTS = (0.5, 10.0)
# How long a connection's writer may take to flush and close after its reader ended,
# before the transport is cut: a client that stopped reading would otherwise hold the
# handler (and the socket.io disconnect, and a node's shutdown) for ever.
WRITER_GRACE_S = 5.0
# How long an HTTP body refused as too large is still read (and thrown away) after the 413.
BODY_LINGER_S = 1.0

# WebSocket close codes (RFC 6455) for a connection the gateway drops; the close reason is
# the error code.
WS_PROTOCOL_ERROR = 1002
WS_UNSUPPORTED_DATA = 1003
WS_POLICY_VIOLATION = 1008

_ack_requested: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ack_requested", default=False
)


class JsonPacket(socketio.packet.Packet):  # type: ignore[misc]
    """socket.io packets as Membrane sends them: JSON only, never binary attachments, so the
    recursive search for bytes that python-socketio runs on every outgoing payload (about
    8% of a node's CPU under presence load, measured) can be skipped."""

    @classmethod
    def data_is_binary(cls, data: Any) -> bool:
        """Replaces ``Packet.data_is_binary``."""
        return False


class LeanSocket(engineio.async_socket.AsyncSocket):  # type: ignore[misc]
    """engine.io's socket with the same behaviour and fewer objects per message, and with
    what a hostile client can make it hold bounded.

    The stock socket waits for every outgoing batch and every incoming message through
    ``asyncio.wait_for``, which (CPython 3.11) wraps the wait in a new Task and adds a waiter
    future and a callback; the reader also spawns a Task per message. Thousands of sockets
    each keep two such waits pending for seconds, so they outlive the young generation and
    make the collector's older generations large and slow (a gen1 collection of ~300k
    objects took ~200 ms at 8,000 sockets, measured). Here both waits run in the socket's own
    task under ``asyncio.timeout``: the same deadline (``ping_interval + ping_timeout``), the
    same outcome on a timeout or a cancel, no Task. A packet already queued is taken without
    arming a timer at all.

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

    def __init__(self, server: Any, sid: str) -> None:
        super().__init__(server, sid)
        self.connects = TokenBucket(*NAMESPACE_CONNECTS)

    async def send(self, pkt: Any) -> None:
        """As ``AsyncSocket.send``, onto a queue bounded in bytes: past the bound the client
        is too slow to keep, and is dropped rather than buffered."""
        if self.dropped is not None or not await self.check_ping_timeout():
            return
        self._put(pkt)

    def _put(self, pkt: Any) -> None:
        size = _packet_size(pkt)
        if self.pending_bytes + size > MAX_PENDING_BYTES:
            self.drop("slow_consumer", None)
            return
        self.pending_bytes += size
        self.queue.put_nowait(pkt)

    def _taken(self, pkt: Any) -> Any:
        self.queue.task_done()
        self.pending_bytes -= _packet_size(pkt)
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
        if pkt is None:
            return []
        packets = [pkt]
        while not queue.empty():
            pkt = self._taken(queue.get_nowait())
            if pkt is None:
                queue.put_nowait(None)
                break
            packets.append(pkt)
        return packets

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
            delay = self.server.ping_interval
            if not self._pinged_before:
                self._pinged_before = True
                delay *= random.uniform(0.25, 1.0)
            asyncio.get_running_loop().call_later(delay, self._ping_due)

    def _ping_due(self) -> None:
        """``AsyncSocket._send_ping`` after its sleep: ``send`` would find the ping timeout
        not passed (``last_ping`` was just set) and queue the packet."""
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
                    packets = await self.poll()
                except engineio.exceptions.QueueEmpty:
                    break
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

        timeout_s = server.ping_interval + server.ping_timeout
        while self.dropped is None:
            try:
                async with asyncio.timeout(timeout_s):
                    p = await ws.wait()  # websocket_wait, one coroutine fewer per message
            except BaseException:  # a timeout, a cancel, or the connection failing
                break
            if p and len(p) > max_size:
                break  # "packet is too large": the connection ends, as upstream's
            if p is None:
                # connection closed by client
                break
            try:
                pkt = packet.Packet(encoded_packet=p)
                await self.receive(pkt)
            except engineio.exceptions.SocketIsClosedError:  # pragma: no cover
                server.logger.info("Receive error -- socket is closed")
                break
            except (ValueError, TypeError, IndexError, engineio.exceptions.UnknownPacketError):
                # Not an engine.io packet, or one a client may not send (OPEN, NOOP, ...).
                self.drop("malformed_packet", WS_PROTOCOL_ERROR)
            except Exception:  # pragma: no cover
                # if we get an unexpected exception we log the error and exit
                # the connection properly
                server.logger.exception("Unknown receive error")

        self.queue.put_nowait(None)  # unlock the writer task so it can exit
        _, pending = await asyncio.wait([writer_task], timeout=WRITER_GRACE_S)
        if pending and self._transport is not None:
            self._transport.abort()  # the client stopped reading: its writer waits on it
        await writer_task
        await self.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)


def _packet_size(pkt: Any) -> int:
    """What a queued engine.io packet will cost on the wire (``encode`` caches its result,
    so the writer does not encode it again); the writer's wake-up marker ``None`` is free."""
    return 0 if pkt is None else len(pkt.encode())


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
            return await _refuse_body(request)
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


async def _refuse_body(request: web.Request) -> web.StreamResponse:
    """A 413 for a body the gateway will not read, then the connection closed within
    ``BODY_LINGER_S``. Meanwhile what the client still sends is read and discarded, so that
    closing with unread bytes (which resets the connection) does not destroy the answer
    before the client reads it; aiohttp's own lingering would wait 10 s, holding up a
    shutdown as long."""
    response = web.json_response(
        {"error": {"code": "payload_too_large", "message": "request body too large"}},
        status=413,
    )
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    try:
        async with asyncio.timeout(BODY_LINGER_S):
            while await request.content.readany():
                pass
    except TimeoutError:
        pass
    except Exception as e:  # the client went away, or broke its body off
        log.debug("refused body ended early: %r", e)
    request.protocol.force_close()
    return response


class MembraneServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server at the packet layer, for JSON clients only: a packet that is
    not a well-formed socket.io packet, a binary one, or one CONNECT too many gets its
    engine.io connection dropped with a reason (``LeanSocket.drop``) instead of a traceback
    or a buffer; client events reach a namespace as client events only; records whether the
    client asked for an ack, so a refusal can go to the right place; keeps every background
    task tracked (see ``TrackedEngineServer``).

    Upstream's private methods replaced here: ``AsyncServer._handle_eio_message`` and
    ``AsyncServer._handle_event_internal``.
    """

    eio: TrackedEngineServer
    not_handled: Any
    reason: Any
    namespace_handlers: dict[str, Any]

    def __init__(self, *args: Any, metrics: Metrics | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eio.metrics = metrics

    drain: Drain | None = None
    """The node's drain (set by the app): its namespaces refuse new work once it began."""

    def _engineio_server_class(self) -> type[TrackedEngineServer]:
        """Replaces ``AsyncServer._engineio_server_class``."""
        return TrackedEngineServer

    def _drop(self, eio_sid: str, code: str, ws_code: int) -> None:
        socket = self.eio.sockets.get(eio_sid)
        if isinstance(socket, LeanSocket):
            socket.drop(code, ws_code)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        """As ``AsyncServer._handle_eio_message``, without binary attachments and with each
        packet checked before it is dispatched.

        Upstream keeps a binary packet's attachments until as many as it declares (up to ten
        digits' worth) have arrived, and lets a packet it cannot use (``42[]``, ``42{}``, JSON
        nested past the parser's limit) raise into engine.io, which logs a traceback and
        keeps the connection. Membrane's clients send neither."""
        if isinstance(data, bytes | bytearray):
            return self._drop(eio_sid, "binary_unsupported", WS_UNSUPPORTED_DATA)
        try:
            if not isinstance(data, str):
                raise ValueError("not a socket.io packet")  # engine.io decoded it as JSON
            pkt = self.packet_class(encoded_packet=data)
        except (ValueError, TypeError, RecursionError):  # orjson's errors are ValueErrors
            return self._drop(eio_sid, "malformed_packet", WS_PROTOCOL_ERROR)
        kind, namespace, payload = pkt.packet_type, pkt.namespace, pkt.data
        if kind == socketio.packet.CONNECT:
            socket = self.eio.sockets.get(eio_sid)
            if isinstance(socket, LeanSocket) and not socket.connects.take(time.monotonic()):
                message = "too many namespace connects on this connection"
                error = {"message": message, "data": {"code": "rate_limited", "message": message}}
                await self._send_packet(
                    eio_sid,
                    self.packet_class(socketio.packet.CONNECT_ERROR, error, namespace=namespace),
                )
                return socket.drop("rate_limited", WS_POLICY_VIOLATION)
            await self._handle_connect(eio_sid, namespace, payload)
        elif kind == socketio.packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, namespace, self.reason.CLIENT_DISCONNECT)
        elif kind == socketio.packet.EVENT and _is_event(payload):
            await self._handle_event(eio_sid, namespace, pkt.id, payload)
        elif kind == socketio.packet.ACK and pkt.id is not None and isinstance(payload, list):
            await self._handle_ack(eio_sid, namespace, pkt.id, payload)
        elif kind in (socketio.packet.BINARY_EVENT, socketio.packet.BINARY_ACK):
            self._drop(eio_sid, "binary_unsupported", WS_UNSUPPORTED_DATA)
        else:  # CONNECT_ERROR (server to client only), unknown types, events without a name
            self._drop(eio_sid, "malformed_packet", WS_PROTOCOL_ERROR)

    async def _handle_event_internal(
        self, server: Any, sid: str, eio_sid: str, data: Any, namespace: str, id: Any
    ) -> None:
        """As ``AsyncServer._handle_event_internal``, with the event handed to a Membrane
        namespace as a client event (``BaseNamespace.client_event``). Upstream dispatches by
        name through the same entry as the namespace's own connect and disconnect, so an
        event a client named "disconnect" ran the disconnect handler on a live socket."""
        token = _ack_requested.set(id is not None)
        try:
            handler = self.namespace_handlers.get(namespace)
            if isinstance(handler, BaseNamespace):
                payload = data[1] if len(data) > 1 else None
                r = await handler.client_event(sid, data[0], payload)
            elif data[0] in self.reserved_events:
                r = self.not_handled
            else:
                r = await server._trigger_event(data[0], namespace, sid, *data[1:])
        finally:
            _ack_requested.reset(token)
        if r is not self.not_handled and id is not None:
            # send ACK packet with the response returned by the handler
            # tuples are expanded as multiple arguments
            if r is None:
                ack = []
            elif isinstance(r, tuple):
                ack = list(r)
            else:
                ack = [r]
            await server._send_packet(
                eio_sid,
                self.packet_class(socketio.packet.ACK, namespace=namespace, id=id, data=ack),
            )


def _is_event(payload: Any) -> bool:
    """An EVENT's payload is ``[name, *args]`` with a string name."""
    return isinstance(payload, list) and len(payload) > 0 and isinstance(payload[0], str)


Handler = Callable[[str, Any], Awaitable[Json]]


@dataclass
class Session:
    claims: Claims
    device: DeviceRef | None
    bucket: TokenBucket
    calls: set[str] = field(default_factory=set)
    """Calls this socket takes part in: ended if the socket goes away."""


def agent_room(site: str, agent_id: str) -> str:
    return f"agent:{site}:{agent_id}"


def site_room(site: str) -> str:
    return f"site:{site}"


def visitor_room(site: str, visitor_id: str) -> str:
    return f"visitor:{site}:{visitor_id}"


class BaseNamespace(socketio.AsyncNamespace):  # type: ignore[misc]
    """Dispatches events through ``self.events`` and turns every failure into an error."""

    roles: frozenset[Role] = frozenset()
    rate: tuple[float, float] = (20.0, 40.0)  # events per second, burst

    def __init__(self, namespace: str, tokens: TokenService, metrics: Metrics) -> None:
        super().__init__(namespace)
        self.tokens = tokens
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.events: dict[str, Handler] = {}

    async def trigger_event(self, event: str, *args: Any) -> Any:
        """The namespace's own connect and disconnect, from python-socketio (replaces
        ``AsyncNamespace.trigger_event``, which dispatches by name to ``on_*``). Client events
        come through ``client_event`` (``MembraneServer._handle_event_internal``), so one a
        client names "connect" or "disconnect" is an unknown event, never these."""
        if event == "connect":
            sid, _environ = args[0], args[1]
            auth = args[2] if len(args) > 2 else None
            return await self._connect(sid, auth)
        if event == "disconnect":
            session = self.sessions.pop(args[0], None)
            if session is not None:
                self.metrics.sockets.labels(self.namespace).dec()
                await self.on_leave(args[0], session)
            return None
        return await self.client_event(args[0], event, args[1] if len(args) > 1 else None)

    async def client_event(self, sid: str, event: str, payload: Any) -> Any:
        try:
            session = self.sessions.get(sid)
            if session is None:
                raise Forbidden("not connected")
            if session.claims.exp + self.tokens.leeway_s < time.time():
                raise Unauthenticated("token expired; reconnect with a new one")
            if not session.bucket.take(time.monotonic()):
                raise RateLimited("too many events; slow down")
            handler = self.events.get(event)
            if handler is None:
                raise Invalid(f"unknown event {event!r}", code="unknown_event")
            return await handler(sid, payload)
        except DomainError as e:
            return await self._refuse(sid, error_of(e))
        except Exception:
            log.exception("handler for %s failed", event)
            return await self._refuse(sid, error_object(INTERNAL_CODE, INTERNAL_MESSAGE))

    async def _refuse(self, sid: str, error: Json) -> Json | None:
        """The error as the ack when the client asked for one, else an ``error`` event."""
        self.metrics.errors.labels(error["code"]).inc()
        if _ack_requested.get():
            return refused_ack(error)
        await self.emit("error", error, to=sid)
        return None

    @property
    def draining(self) -> bool:
        drain: Drain | None = self.server.drain
        return drain is not None and drain.draining

    def refuse_if_draining(self) -> None:
        drain: Drain | None = self.server.drain
        if drain is not None:
            drain.refuse_new_work()

    async def _connect(self, sid: str, auth: object) -> bool:
        try:
            self.refuse_if_draining()
            token = as_object(auth, "auth").get("token") if auth is not None else None
            claims = await self.tokens.verify(token, self.roles)
            device = await self.on_join(sid, claims, auth if isinstance(auth, dict) else {})
        except DomainError as e:
            self.metrics.errors.labels(e.code).inc()
            raise socketio.exceptions.ConnectionRefusedError(e.message, error_of(e)) from None
        session = Session(claims, device, TokenBucket(*self.rate))
        self.sessions[sid] = session
        self.metrics.sockets.labels(self.namespace).inc()
        # After the CONNECT packet has gone out: an emit before it would be dropped.
        self.server.start_background_task(self.on_joined, sid, session)
        return True

    async def on_join(self, sid: str, claims: Claims, auth: Json) -> DeviceRef | None:
        return None

    async def on_joined(self, sid: str, session: Session) -> None:
        return None

    async def on_leave(self, sid: str, session: Session) -> None:
        return None


class AgentNamespace(BaseNamespace):
    """``/agent``: a connected socket is a live desktop device of the agent."""

    roles = AGENT_ROLES

    def __init__(
        self,
        tokens: TokenService,
        metrics: Metrics,
        presence: PresenceService,
        calls: CallService,
        settings: Settings,
    ) -> None:
        super().__init__("/agent", tokens, metrics)
        self.presence = presence
        self.calls = calls
        self.settings = settings
        self.socket_ttl_s = settings.presence.socket_ttl_s
        self.resuming: dict[str, str] = {}
        """Socket id -> the call its agent app asked to take over at connect (``call_id``)."""
        self.events = {
            "presence:set": self.presence_set,
            "call:accept": self.call_accept,
            "call:decline": self.call_decline,
            "call:hangup": self.call_hangup,
            "rtc:signal": self.rtc_signal,
        }
        presence.add_listener(self.on_presence)

    async def on_join(self, sid: str, claims: Claims, auth: Json) -> DeviceRef | None:
        check_configured_role(claims, self.presence.site(claims.site))
        try:
            state = DeviceState(auth.get("state", DeviceState.AVAILABLE.value))
        except ValueError:
            raise Invalid("auth.state must be a device state") from None
        resume = call_id_from_wire(auth) if auth.get("call_id") is not None else None
        ref = DeviceRef(claims.site, claims.sub, socket_device_id(sid))
        await self.enter_room(sid, agent_room(claims.site, claims.sub))
        update = device_update_from_wire(
            {"kind": DeviceKind.DESKTOP.value, "state": state.value}, ref.device_id
        )
        self.presence.hold_socket_device(sid, ref)
        await self.presence.set_device(claims.site, claims.sub, update, self.socket_ttl_s)
        if resume is not None:
            self.resuming[sid] = resume
        return ref

    async def on_joined(self, sid: str, session: Session) -> None:
        claims = session.claims
        call_id = self.resuming.pop(sid, None)
        if call_id is not None:
            call = await self.calls.resume_agent(claims.site, claims.sub, sid, call_id)
            if call is not None and sid in self.sessions:
                session.calls.add(call.call_id)
                site = self.presence.site(claims.site)
                await self.emit("call:update", call_to_wire(call, site, internal=True), to=sid)
        # A ring that went out while this app was away (reconnecting from a draining node).
        ring = await self.calls.missed_ring(claims.site, claims.sub)
        if ring is not None:
            await self.emit("call:ring", ring, to=sid)

    async def on_leave(self, sid: str, session: Session) -> None:
        self.resuming.pop(sid, None)
        if session.calls:
            claims = session.claims
            await self.calls.agent_left(claims.site, claims.sub, sid, session.calls)
        ref = self.presence.release_socket_device(sid)
        if ref is not None:
            try:
                await self.presence.remove_device(ref.site, ref.agent_id, ref.device_id)
            except Exception as e:  # the lease will lapse on its own
                log.warning("could not remove device of %s: %r", sid, e)

    async def presence_set(self, sid: str, payload: Any) -> Json:
        session = self.sessions[sid]
        own = session.device.device_id if session.device else None
        obj = as_object(payload)
        update = device_update_from_wire(obj, None if obj.get("device_id") else own)
        ttl = None
        if update.device_id == own:
            if update.kind is not DeviceKind.DESKTOP:
                raise Invalid("this socket is a desktop device")
            ttl = self.socket_ttl_s
        presence = await self.presence.set_device(
            session.claims.site, session.claims.sub, update, ttl
        )
        return ok(presence=presence_to_wire(presence))

    async def call_accept(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        call = await self.calls.accept(claims.site, claims.sub, sid, call_id_from_wire(payload))
        self.sessions[sid].calls.add(call.call_id)
        site = self.presence.site(claims.site)
        return ok(
            call=call_to_wire(call, site, internal=True),
            ice_servers=ice_servers(self.settings.webrtc, claims.sub, time.time()),
        )

    async def call_decline(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        call = await self.calls.decline(claims.site, claims.sub, call_id_from_wire(payload))
        return ok(call=call_to_wire(call, self.presence.site(claims.site), internal=True))

    async def call_hangup(self, sid: str, payload: Any) -> Json:
        session = self.sessions[sid]
        claims = session.claims
        call = await self.calls.hangup(claims.site, claims.sub, call_id_from_wire(payload))
        session.calls.discard(call.call_id)
        return ok(call=call_to_wire(call, self.presence.site(claims.site), internal=True))

    async def rtc_signal(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        _, signal = signal_from_wire(payload)
        await self.calls.relay_signal(claims.site, claims.sub, sid, True, signal)
        return ok()

    async def on_presence(self, change: PresenceChange) -> None:
        p = change.presence
        await self.server.emit(
            "presence:update",
            change.wire,
            to=agent_room(p.site, p.agent_id),
            namespace=self.namespace,
            ignore_queue=True,
        )


class BoardNamespace(BaseNamespace):
    """``/board``: a supervisor's live view of every agent of their own site."""

    roles = SUPERVISOR_ROLES

    def __init__(self, tokens: TokenService, metrics: Metrics, presence: PresenceService) -> None:
        super().__init__("/board", tokens, metrics)
        self.presence = presence
        self.events = {"board:snapshot": self.snapshot}
        presence.add_listener(self.on_presence)

    async def on_join(self, sid: str, claims: Claims, auth: Json) -> DeviceRef | None:
        check_configured_role(claims, self.presence.site(claims.site))
        await self.enter_room(sid, site_room(claims.site))
        return None

    async def snapshot(self, sid: str, payload: Any) -> Json:
        site = self.sessions[sid].claims.site
        return ok(agents=[presence_to_wire(p) for p in self.presence.site_presence(site)])

    async def on_presence(self, change: PresenceChange) -> None:
        await self.server.emit(
            "presence:update",
            change.wire,
            to=site_room(change.presence.site),
            namespace=self.namespace,
            ignore_queue=True,
        )


class VisitorNamespace(BaseNamespace):
    """``/visitor``: a visitor in a browser call (idle watchers use the availability feed)."""

    roles = VISITOR_ROLES
    rate = (5.0, 10.0)

    def __init__(
        self,
        tokens: TokenService,
        metrics: Metrics,
        presence: PresenceService,
        calls: CallService,
        load: LoadMonitor,
        limits: AdmissionLimits,
    ) -> None:
        super().__init__("/visitor", tokens, metrics)
        self.presence = presence
        self.calls = calls
        self.load = load
        self.limits = limits
        """When a start is refused as ``overloaded`` (gateway.core.admission)."""
        self.events = {
            "call:start": self.call_start,
            "call:cancel": self.call_cancel,
            "rtc:signal": self.rtc_signal,
        }

    async def on_join(self, sid: str, claims: Claims, auth: Json) -> DeviceRef | None:
        check_configured_role(claims, self.presence.site(claims.site))
        await self.enter_room(sid, visitor_room(claims.site, claims.sub))
        return None

    async def on_joined(self, sid: str, session: Session) -> None:
        # A visitor back while the store is unreachable (a blip during a Redis outage) takes
        # their call over once it answers: the widget does not start the call again, and the
        # grace timer of the socket that left would otherwise end it while they are here.
        await self.calls.until_stored(partial(self._take_over, sid, session), f"takeover:{sid}")

    async def _take_over(self, sid: str, session: Session) -> None:
        if sid not in self.sessions:
            return  # gone again before the store answered
        call = await self.calls.resume(session.claims.site, session.claims.sub, sid)
        if call is not None:
            session.calls.add(call.call_id)
            site = self.presence.site(session.claims.site)
            await self.emit("call:update", call_to_wire(call, site), to=sid)

    async def on_leave(self, sid: str, session: Session) -> None:
        claims = session.claims
        # A socket closed by its node's drain will reconnect elsewhere: its visitor did not
        # leave, so even a call still ringing waits for them.
        keep = self.draining
        for call_id in session.calls:
            await self.calls.visitor_left(claims.site, claims.sub, sid, call_id, keep)

    async def call_start(self, sid: str, payload: Any) -> Json:
        self.refuse_if_draining()
        session = self.sessions[sid]
        claims = session.claims
        request = call_request_from_wire(payload)
        # Refused at once rather than queued: a start queued behind others would ring late,
        # and piled-up handlers starve the node's own lease renewal (gateway.core.admission).
        admission = admit_start(self.load.sample(), self.limits)
        if not admission.admit:
            self.metrics.starts_shed.labels(admission.signal).inc()
            raise overloaded(admission.retry_after_ms)
        self.load.starts_in_flight += 1
        try:
            call = await self.calls.start(claims.site, claims.sub, sid, request)
        finally:
            self.load.starts_in_flight -= 1
        session.calls = {call.call_id}
        return ok(call=call_to_wire(call, self.presence.site(claims.site)))

    async def call_cancel(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        call = await self.calls.cancel(
            claims.site, claims.sub, call_id_from_wire(payload), "visitor_hung_up"
        )
        return ok(call=call_to_wire(call, self.presence.site(claims.site)))

    async def rtc_signal(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        _, signal = signal_from_wire(payload)
        await self.calls.relay_signal(claims.site, claims.sub, sid, False, signal)
        return ok()


class SocketCallNotifier:
    """Delivers call events to the parties' sockets on whichever node they are connected:
    socket.io's Redis manager carries each emit to the other nodes."""

    def __init__(
        self,
        server: socketio.AsyncServer,
        sites: Mapping[str, Site],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.server = server
        self.sites = sites
        self.clock = clock

    async def call_update(self, call: Call, former_agent: str | None = None) -> None:
        site = self.sites[call.site]
        internal = call_to_wire(call, site, internal=True)
        emits = [
            (
                "call:update",
                call_to_wire(call, site),
                "/visitor",
                visitor_room(call.site, call.visitor_id),
            )
        ]
        emits += [
            ("call:update", internal, "/agent", agent_room(call.site, agent_id))
            for agent_id in {a for a in (call.agent_id, former_agent) if a is not None}
        ]
        emits.append(("call:update", internal, "/board", site_room(call.site)))
        manager = self.server.manager
        if isinstance(manager, ObservedRedisManager):
            await manager.emit_batch(emits)
            return
        for event, data, namespace, room in emits:
            await self.server.emit(event, data, to=room, namespace=namespace)

    async def ring(self, call: Call, payload: Json) -> None:
        assert call.agent_id is not None and call.ring_expires_at is not None
        if self.clock() >= call.ring_expires_at:
            return  # over before it could be sent (a node far behind): its timer ends it
        await self.server.emit(
            "call:ring",
            payload,
            to=agent_room(call.site, call.agent_id),
            namespace="/agent",
        )

    async def ring_stop(self, call: Call, agent_id: str, reason: str) -> None:
        await self.server.emit(
            "call:ring_stop",
            {"call_id": call.call_id, "attempt": call.attempt, "reason": reason},
            to=agent_room(call.site, agent_id),
            namespace="/agent",
        )

    async def replay(self, call: Call, ring: Json | None, rings_over: dict[str, str]) -> None:
        site = self.sites[call.site]
        internal = call_to_wire(call, site, internal=True)
        emits: list[tuple[str, Json, str, str]] = [
            (
                "call:ring_stop",
                {"call_id": call.call_id, "attempt": call.attempt, "reason": reason},
                "/agent",
                agent_room(call.site, agent_id),
            )
            for agent_id, reason in rings_over.items()
        ]
        if ring is not None and call.agent_id is not None:
            emits.append(("call:ring", ring, "/agent", agent_room(call.site, call.agent_id)))
        emits.append(
            (
                "call:update",
                call_to_wire(call, site),
                "/visitor",
                visitor_room(call.site, call.visitor_id),
            )
        )
        if call.agent_id is not None:
            emits.append(("call:update", internal, "/agent", agent_room(call.site, call.agent_id)))
        emits.append(("call:update", internal, "/board", site_room(call.site)))
        manager = self.server.manager
        for event, data, namespace, room in emits:
            # Each node replays to its own sockets (published, every node's would get it),
            # rings through the ring gate as any other.
            if isinstance(manager, ObservedRedisManager):
                await manager.deliver_here(event, data, namespace, room)
            else:
                await self.server.emit(event, data, to=room, namespace=namespace)

    async def sent(self) -> None:
        manager = self.server.manager
        if isinstance(manager, ObservedRedisManager):
            await manager.sent()

    async def signal(self, call: Call, to_agent: bool, payload: Json) -> None:
        if to_agent:
            if call.agent_sid is None:
                return  # never `to=None`: python-socketio would broadcast to every agent
            await self.server.emit("rtc:signal", payload, to=call.agent_sid, namespace="/agent")
        else:
            await self.server.emit(
                "rtc:signal",
                payload,
                to=visitor_room(call.site, call.visitor_id),
                namespace="/visitor",
            )


DRAINING_EVENT = "server:draining"
_NAMESPACES = ("/agent", "/board", "/visitor")
# Sockets closed at once during a drain: each runs its disconnect handler (store writes).
_CLOSE_BATCH = 200


async def send_sockets_elsewhere(server: MembraneServer) -> None:
    """For a drain: tell every socket on this node to reconnect (``server:draining``), then
    close each connection the way a network drop does. socket.io clients reconnect by
    themselves after a dropped transport (not after a server's disconnect), to the same URL:
    behind a load balancer, another node. The disconnect handlers run here, while the node
    drains, so they know the party did not leave."""
    for namespace in _NAMESPACES:
        await server.emit(
            DRAINING_EVENT,
            {"retry_after_s": RETRY_AFTER_S},
            namespace=namespace,
            ignore_queue=True,  # this node's sockets only
        )
    eio = server.eio
    sockets = list(eio.sockets.items())
    for start in range(0, len(sockets), _CLOSE_BATCH):
        batch = sockets[start : start + _CLOSE_BATCH]
        results = await asyncio.gather(
            *(_drop(eio, sid, s) for sid, s in batch), return_exceptions=True
        )
        for (sid, _), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                log.warning("draining: closing socket %s failed: %r", sid, result)


async def _drop(eio: TrackedEngineServer, sid: str, socket: LeanSocket) -> None:
    try:
        # Runs socket.io's disconnect handlers. No engine.io CLOSE packet: that is a server's
        # goodbye, which a client does not follow by reconnecting.
        await socket.close(wait=False, abort=True, reason=eio.reason.SERVER_DISCONNECT)
    finally:
        # Ends the writer, which closes the WebSocket (else it stays open until the ping
        # timeout): to the client, the network dropped.
        socket.queue.put_nowait(None)
        eio.sockets.pop(sid, None)
