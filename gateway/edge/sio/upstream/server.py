"""socket.io's server, packet and namespace as Membrane runs them: each override names the
upstream function it replaces (tests/test_upstream_guard.py fingerprints them)."""

from __future__ import annotations

import contextvars
import logging
import time
from abc import abstractmethod
from typing import Any

import socketio

from gateway.edge.sio import limits
from gateway.edge.sio.upstream.engine import LeanSocket, TrackedEngineServer
from gateway.ops.metrics import Metrics
from gateway.services.drain import Drain

log = logging.getLogger(__name__)

ACK_REQUESTED = contextvars.ContextVar("ack_requested", default=False)
"""Whether the client event being handled asked for an ack."""


class JsonPacket(socketio.packet.Packet):  # type: ignore[misc]
    """socket.io packets as Membrane sends them: JSON only, never binary attachments, so the
    recursive search for bytes that python-socketio runs on every outgoing payload (about
    8% of a node's CPU under presence load, measured) can be skipped."""

    @classmethod
    def data_is_binary(cls, data: Any) -> bool:
        """Replaces ``Packet.data_is_binary``."""
        return False


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

    def watch(self, sid: str, namespace: str, ping_every_s: float, silence_limit_s: float) -> None:
        """``LeanSocket.watch`` for the connection that carries socket ``sid``."""
        socket = self.eio.sockets.get(self.manager.eio_sid_from_sid(sid, namespace))
        if isinstance(socket, LeanSocket):
            socket.watch(ping_every_s, silence_limit_s)

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
            return self._drop(eio_sid, "binary_unsupported", limits.WS_UNSUPPORTED_DATA)
        try:
            if not isinstance(data, str):
                raise ValueError("not a socket.io packet")  # engine.io decoded it as JSON
            pkt = self.packet_class(encoded_packet=data)
        except (ValueError, TypeError, RecursionError):  # orjson's errors are ValueErrors
            return self._drop(eio_sid, "malformed_packet", limits.WS_PROTOCOL_ERROR)
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
                return socket.drop("rate_limited", limits.WS_POLICY_VIOLATION)
            await self._handle_connect(eio_sid, namespace, payload)
        elif kind == socketio.packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, namespace, self.reason.CLIENT_DISCONNECT)
        elif kind == socketio.packet.EVENT and limits.is_event(payload):
            await self._handle_event(eio_sid, namespace, pkt.id, payload)
        elif kind == socketio.packet.ACK and pkt.id is not None and isinstance(payload, list):
            await self._handle_ack(eio_sid, namespace, pkt.id, payload)
        elif kind in (socketio.packet.BINARY_EVENT, socketio.packet.BINARY_ACK):
            self._drop(eio_sid, "binary_unsupported", limits.WS_UNSUPPORTED_DATA)
        else:  # CONNECT_ERROR (server to client only), unknown types, events without a name
            self._drop(eio_sid, "malformed_packet", limits.WS_PROTOCOL_ERROR)

    async def _handle_event_internal(
        self, server: Any, sid: str, eio_sid: str, data: Any, namespace: str, id: Any
    ) -> None:
        """As ``AsyncServer._handle_event_internal``, with the event handed to a Membrane
        namespace as a client event (``MembraneNamespace.client_event``). Upstream dispatches by
        name through the same entry as the namespace's own connect and disconnect, so an
        event a client named "disconnect" ran the disconnect handler on a live socket."""
        token = ACK_REQUESTED.set(id is not None)
        try:
            handler = self.namespace_handlers.get(namespace)
            if isinstance(handler, MembraneNamespace):
                payload = data[1] if len(data) > 1 else None
                r = await handler.client_event(sid, data[0], payload)
            elif data[0] in self.reserved_events:
                r = self.not_handled
            else:
                r = await server._trigger_event(data[0], namespace, sid, *data[1:])
        finally:
            ACK_REQUESTED.reset(token)
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


class MembraneNamespace(socketio.AsyncNamespace):  # type: ignore[misc]
    """A namespace whose connect, disconnect and client events each have a method."""

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
            return await self._disconnect(args[0])
        return await self.client_event(args[0], event, args[1] if len(args) > 1 else None)

    @abstractmethod
    async def _connect(self, sid: str, auth: object) -> bool: ...

    @abstractmethod
    async def _disconnect(self, sid: str) -> None: ...

    @abstractmethod
    async def client_event(self, sid: str, event: str, payload: Any) -> Any: ...
