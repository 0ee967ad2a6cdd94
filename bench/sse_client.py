"""A bare Server-Sent Events client for benchmarks that hold thousands of idle streams:
an ``asyncio.Protocol`` with no task and no client library, so one driver process reads
10,000 streams with a fraction of a core.

Each SSE frame is one write on the node, so one HTTP chunk: a ``data: ...`` line is never
cut by a chunk header, only by the TCP segments, and the lines can be found in the raw bytes.
"""

from __future__ import annotations

import asyncio
import time


class SseClient(asyncio.Protocol):
    """Sends ``request``, reads the status, then hands each ``data:`` line to ``on_data``
    with the time it arrived."""

    __slots__ = ("_tail", "lost", "status", "transport")

    def __init__(self, request: bytes) -> None:
        self._tail = request  # sent on connection_made, then reused as the parse buffer
        self.status = 0
        self.lost = False
        self.transport: asyncio.Transport | None = None

    def on_data(self, buf: bytes, start: int, end: int, now: float) -> None:
        """One ``data:`` line: ``buf[start:end]`` (from ``data: `` to before the newline)."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._tail)
        self._tail = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self._tail + data if self._tail else data
        if not self.status:
            if len(buf) < 12:
                self._tail = buf
                return
            self.status = int(buf[9:12])
            if self.status != 200 and self.transport is not None:
                self.transport.close()
                return
        start = 0
        while True:
            i = buf.find(b"data: ", start)
            if i < 0:
                self._tail = buf[-5:]
                return
            j = buf.find(b"\n", i)
            if j < 0:
                self._tail = buf[i:]
                return
            self.on_data(buf, i, j, now)
            start = j + 1
