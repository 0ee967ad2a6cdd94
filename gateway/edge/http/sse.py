"""Server-Sent Events streams held open by many idle browsers (the website button's
availability, the customer's ticket page).

Each stream is one response held open inside its connection's own request handler, with no
task, queue or timer of its own: a broadcast writes the same pre-framed bytes straight to each
socket, and a watcher whose socket cannot keep up is dropped, not buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.wire.codec import Json

MAX_BUFFERED_BYTES = 64 * 1024
"""Unsent bytes a watcher may have before it is dropped (it reconnects by itself)."""
RETRY_MS = 5000
"""How long EventSource waits before reconnecting a dropped stream."""


@dataclass(eq=False, slots=True)
class Watcher:
    response: web.StreamResponse
    transport: asyncio.Transport
    chunked: bool
    """HTTP/1.1 streams are chunked; an HTTP/1.0 one gets the bare bytes."""
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def close(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


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


async def open_stream(request: web.Request, headers: dict[str, str]) -> Watcher | None:
    """Start the event stream; None if the client is already gone."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # tell nginx not to buffer the stream
            **headers,
        }
    )
    chunked = request.version >= (1, 1)
    if chunked:
        response.enable_chunked_encoding()  # explicit, so broadcasts can pre-frame chunks
    await response.prepare(request)
    transport = request.transport
    if transport is None:
        return None
    return Watcher(response, transport, chunked)


def chunk_of(frame: bytes) -> bytes:
    """``frame`` framed as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def send(watcher: Watcher, frame: bytes, chunk: bytes) -> bool:
    """Write one pre-framed event (``chunk`` is ``chunk_of(frame)``) without waiting; False
    if the watcher was dropped (too far behind) or is gone."""
    transport = watcher.transport
    if transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
        cut(transport)
        watcher.close()  # it reconnects by itself
        return False
    if transport.is_closing():
        watcher.close()  # gone
        return False
    transport.write(chunk if watcher.chunked else frame)
    return True


def close_all(groups: Iterable[Iterable[Watcher]]) -> None:
    """End every stream of ``groups`` (a node shutting down or draining)."""
    for group in list(groups):
        for watcher in list(group):
            watcher.close()
