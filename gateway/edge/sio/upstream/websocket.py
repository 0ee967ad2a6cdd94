"""engine.io's websocket transport, held by a small protocol of its own once aiohttp has
answered the handshake (``DetachedWebSocket``, ``WebSocketConnection``).

aiohttp keeps a websocket inside the request that opened it: the request with its headers,
the connection's request handler, two tasks, the response with its reader queue and writer,
and a dozen suspended coroutine frames from the middlewares down to engine.io's read loop,
all for as long as the socket lives. At 10,000 idle sockets that was most of the 32 KB each
one cost (tracemalloc), and each message in or out woke two tasks through two queues.

Here aiohttp still answers the upgrade (routing, middlewares, the handshake's checks and its
101), then its request ends and the TCP transport is handed to ``WebSocketConnection``: a
protocol of a few slots that parses frames with aiohttp's own parser (``WebSocketReader``,
its C version) and hands each message to the engine.io socket as it arrives; what the socket
sends is framed and written to the transport at once. No task and no queue per idle socket.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader

from gateway.edge.sio import limits

log = logging.getLogger(__name__)

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PONG = 0xA


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (RFC 6455 section 5.2: a server never masks)."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x80 | opcode, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:123])


class WebSocketPeer(Protocol):
    """What a ``WebSocketConnection`` tells the engine.io socket it carries."""

    def websocket_message(self, data: str | bytes) -> None: ...
    def websocket_heard(self) -> None: ...
    def websocket_ended(self, code: int | None) -> None: ...


class _Inbox(WebSocketDataQueue):  # type: ignore[misc]
    """The parser's queue, handing each message on as it is parsed instead of keeping it.

    ``WebSocketReader._handle_frame`` calls its queue's ``feed_data`` (overridable: a
    ``cpdef`` method of the C class) for every complete message, ``set_exception`` for a
    protocol error. The base class's ``__init__`` is not run: it would make a deque and a
    buffer this never uses, and with its size left at 0 the parser never stalls."""

    __slots__ = ("_on_error", "_on_message")

    def __init__(
        self, on_message: Callable[[Any], None], on_error: Callable[[BaseException], None]
    ) -> None:
        self._on_message = on_message
        self._on_error = on_error

    def feed_data(self, data: Any, size: int) -> None:
        """Replaces ``WebSocketDataQueue.feed_data``: the message goes on at once."""
        self._on_message(data)

    def feed_eof(self) -> None:
        pass

    def set_exception(self, exc: BaseException, exc_cause: Any = None) -> None:
        self._on_error(exc)


class WebSocketConnection(asyncio.Protocol):
    """One websocket after its handshake: frames in, messages to ``peer``; frames out.

    A text or binary message goes to ``peer.websocket_message``; a ping is answered; any
    frame is a sign of life (``websocket_heard``). The connection ends once (``end``): on the
    client's close frame (answered with the same code), a protocol error (a close frame with
    the parser's code, 1009 for a message over ``max_size``), the transport lost, or the
    socket ending it; then ``peer.websocket_ended`` is told, with the close code if any."""

    __slots__ = ("_ended", "_grace", "_parser", "_peer", "transport")

    def __init__(self, peer: WebSocketPeer, transport: asyncio.Transport, max_size: int) -> None:
        self.transport: asyncio.Transport | None = transport
        self._peer = peer
        self._parser: Any = WebSocketReader(
            _Inbox(self._message, self._protocol_error), max_size, compress=False, decode_text=True
        )
        self._ended = False
        self._grace: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is not None:
            parser.feed_data(data)

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self.end(None)

    # -- frames in --

    def _message(self, msg: Any) -> None:
        if self._ended:
            return
        kind = msg[0]
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            self._peer.websocket_message(msg[1])
        elif kind is WSMsgType.PING:
            self._peer.websocket_heard()
            self.write(frame(OP_PONG, bytes(msg[1])))
        elif kind is WSMsgType.PONG:
            self._peer.websocket_heard()
        elif kind is WSMsgType.CLOSE:
            code = msg[1] or WSCloseCode.OK
            self.close(code)

    def _protocol_error(self, exc: BaseException) -> None:
        code = getattr(exc, "code", WSCloseCode.PROTOCOL_ERROR)
        log.info("websocket protocol error: %r", exc)
        self.close(int(code), str(exc)[:60])

    # -- frames out --

    def write(self, data: bytes) -> int:
        """Writes ``data``; the bytes the transport now holds unsent (0 once gone)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return 0
        transport.write(data)
        return transport.get_write_buffer_size()

    def send(self, message: str | bytes) -> int:
        if isinstance(message, str):
            return self.write(frame(OP_TEXT, message.encode()))
        return self.write(frame(OP_BINARY, message))

    @property
    def unsent(self) -> int:
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    # -- the end --

    def close(self, code: int, reason: str = "", grace_s: float = limits.WRITER_GRACE_S) -> None:
        """A close frame, then the transport closed once what it holds is written, or cut
        after ``grace_s`` if the client does not read it; then the connection ends."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(close_frame(code, reason))
            transport.close()
            if transport.get_write_buffer_size():
                self._grace = asyncio.get_running_loop().call_later(grace_s, transport.abort)
        self.end(code)

    def abort(self) -> None:
        """Cut the transport at once (a client that does not read, or does not answer)."""
        if self.transport is not None:
            self.transport.abort()
        self.end(None)

    def end(self, code: int | None) -> None:
        if self._ended:
            return
        self._ended = True
        # The parser's queue holds this connection's methods: let go of it, so that the
        # cycle is not left for the collector (a frozen one, on a node: gc_pacer).
        self._parser = None
        self._peer.websocket_ended(code)


class DetachedWebSocket(web.WebSocketResponse):
    """aiohttp's websocket response for the handshake only: it checks the upgrade and writes
    the 101, but makes no reader, queue or heartbeat of its own (``_post_start``), and
    writes nothing once its handler returns (``write_eof``): the connection is
    ``WebSocketConnection``'s by then (``gateway.edge.detach.take_connection``)."""

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        """Replaces ``WebSocketResponse._post_start``: the response is prepared (``_writer``
        set) and HTTP keep-alive is off, as there; no reader, parser or heartbeat."""
        self._ws_protocol = protocol
        self._writer = writer
        request.protocol.keep_alive(False)

    async def write_eof(self) -> None:  # type: ignore[override]
        """Replaces ``WebSocketResponse.write_eof`` (which closes the websocket)."""
        self._eof_sent = True
