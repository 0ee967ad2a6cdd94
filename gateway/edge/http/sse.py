"""Server-Sent Events streams held open by many idle browsers (the website button's
availability, the customer's ticket page).

Each stream is its connection, taken from aiohttp once the headers are out, and a small
protocol (``Watcher``), with no task, queue or timer of its own: a broadcast writes the same
pre-framed bytes straight to each socket, and a watcher whose socket cannot keep up is
dropped, not buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable, Iterable

from aiohttp import web

from gateway.edge.detach import DetachedResponse, take_connection
from gateway.wire.codec import Json

MAX_BUFFERED_BYTES = 64 * 1024
"""Unsent bytes a watcher may have before it is dropped (it reconnects by itself)."""
RETRY_MS = 5000
"""How long EventSource waits before reconnecting a dropped stream."""


class Watcher(asyncio.Protocol):
    """One open event stream, its connection taken from aiohttp once the headers are out
    (``open_stream``): the transport, whether it is chunked, and who to tell when it ends
    (``on_end``, once: closed here, cut, or the client gone). What the client sends is
    read and ignored (an EventSource sends nothing after its request)."""

    __slots__ = ("_on_end", "chunked", "transport")

    def __init__(self, transport: asyncio.Transport, chunked: bool) -> None:
        self.transport: asyncio.Transport | None = transport
        self.chunked = chunked
        """HTTP/1.1 streams are chunked; an HTTP/1.0 one gets the bare bytes."""
        self._on_end: Callable[[Watcher], None] | None = None

    def watch(self, on_end: Callable[[Watcher], None]) -> None:
        """``on_end(self)`` once the stream ends (at once if it already has)."""
        if self.transport is None:
            on_end(self)
        else:
            self._on_end = on_end

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is gone: the transport closes, connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._ended()

    def write(self, data: bytes) -> None:
        """Writes ``data`` (framed for the stream's encoding) unless the stream ended."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(chunk_of(data) if self.chunked else data)

    def close(self) -> None:
        """End the stream: its last chunk, then the connection closed (EventSource comes
        back by itself)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self.chunked:
                transport.write(b"0\r\n\r\n")
            transport.close()
        self._ended()

    def _ended(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self)


def cut(transport: asyncio.Transport) -> None:
    """Drop a watcher too slow to keep: reset, not ended. Ending the response would wait for
    the client to read its backlog first, so one that never reads held its connection and
    its request handler for good, and a shutdown for aiohttp's whole shutdown timeout; and a
    plain close leaves the backlog in the kernel until it gives up on the client, minutes
    later."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def sse_frame(event: str, data: Json) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (
        event.encode(),
        json.dumps(data, separators=(",", ":")).encode(),
    )


KEEPALIVE = b": keepalive\n\n"


def stream_headers(headers: dict[str, str]) -> dict[str, str]:
    return {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # tell nginx not to buffer the stream
        **headers,
    }


def no_stream(headers: dict[str, str]) -> web.StreamResponse:
    """The answer when no stream is opened (``open_stream`` gave None): a HEAD's headers."""
    return web.Response(headers=stream_headers(headers))


async def open_stream(
    request: web.Request, headers: dict[str, str]
) -> tuple[Watcher, DetachedResponse] | None:
    """Start the event stream and take its connection from aiohttp (see
    ``gateway.edge.detach``): the watcher, and what the handler returns at once. None if
    the client is already gone, or asked with HEAD (headers only: no stream follows)."""
    if request.method == "HEAD":
        return None
    response = DetachedResponse(headers=stream_headers(headers))
    chunked = request.version >= (1, 1)
    if chunked:
        response.enable_chunked_encoding()  # explicit, so broadcasts can pre-frame chunks
    try:
        await response.prepare(request)
        watcher = take_connection(request, lambda transport: Watcher(transport, chunked))
    except ConnectionError:
        return None
    return watcher, response


def chunk_of(frame: bytes) -> bytes:
    """``frame`` framed as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def send(watcher: Watcher, frame: bytes, chunk: bytes) -> bool:
    """Write one pre-framed event (``chunk`` is ``chunk_of(frame)``) without waiting; False
    if the watcher was dropped (too far behind) or is gone."""
    transport = watcher.transport
    if transport is None or transport.is_closing():
        watcher.close()  # gone
        return False
    if transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
        cut(transport)  # it reconnects by itself
        watcher.close()
        return False
    transport.write(chunk if watcher.chunked else frame)
    return True


def close_all(groups: Iterable[Iterable[Watcher]]) -> None:
    """End every stream of ``groups`` (a node shutting down or draining)."""
    for group in list(groups):
        for watcher in list(group):
            watcher.close()
