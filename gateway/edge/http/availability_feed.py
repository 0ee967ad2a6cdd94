"""What the website button may promise, pushed to every idle page view watching a site.

The many idle widgets are not socket.io clients: each is one Server-Sent Events response
held open inside its connection's own request handler, with no task, queue or timer of its
own. A presence change marks the site dirty; shortly after (coalescing bursts) the node
computes the availability once per watched filter, encodes it once, and writes the same
bytes to every watcher, yielding to the event loop every few hundred writes so a broadcast
never stalls the node. A watcher whose socket cannot keep up is dropped, not buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.core.availability import availability
from gateway.core.ringing import RingingAgents
from gateway.core.routing import RoutingSnapshot, capabilities
from gateway.ops.tasks import TaskGroup
from gateway.services.presence_service import PresenceChange, PresenceService
from gateway.wire.codec import Json
from gateway.wire.presence import availability_to_wire

log = logging.getLogger(__name__)

# (site, language, branch): each distinct filter a widget asked for is computed once.
FeedKey = tuple[str, str | None, str | None]

WRITES_PER_SLICE = 256
MAX_BUFFERED_BYTES = 64 * 1024


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


def availability_json(
    presence: PresenceService,
    ringing: RingingAgents,
    key: FeedKey,
    now: float,
    telephony: bool,
    bridge: bool = False,
) -> Json:
    site_id, language, branch = key
    site = presence.site(site_id)
    agents = presence.snapshot(site_id)
    # An agent ringing for another visitor is not free: counted as working, not promised.
    snap = RoutingSnapshot(
        site=site,
        presence=agents,
        reserved=ringing.current(site_id, agents, now),
        can=capabilities(site, telephony, bridge),
    )
    a = availability(snap, now, language=language, branch=branch)
    return availability_to_wire(
        a.available,
        a.channels,
        a.agents_available,
        a.estimated_wait_s,
        a.open,
        a.next_open_at,
        a.callbacks,
    )


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


def sse_frame(data: Json) -> bytes:
    return (
        b"event: availability\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
    )


class AvailabilityFeed:
    def __init__(
        self,
        presence: PresenceService,
        ringing: RingingAgents,
        clock: Callable[[], float] = time.time,
        coalesce_s: float = 0.02,
        keepalive_s: float = 20.0,
        max_watchers: int = 50_000,
    ) -> None:
        self._presence = presence
        self._ringing = ringing
        self.telephony = False
        """The node has a telephony provider (set once it is installed): callbacks exist."""
        self.bridge = False
        """The node runs media workers: a browser call can reach an agent's phone."""
        self._clock = clock
        self._coalesce_s = coalesce_s
        self._keepalive_s = keepalive_s
        self.max_watchers = max_watchers
        self._watchers: dict[FeedKey, set[Watcher]] = {}
        self._last: dict[FeedKey, bytes] = {}
        self._dirty: set[str] = set()
        self._tasks = TaskGroup("availability")
        presence.add_listener(self._on_presence)
        ringing.add_listener(self._site_changed)

    @property
    def watcher_count(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    def current(self, key: FeedKey) -> Json:
        return availability_json(
            self._presence, self._ringing, key, self._clock(), self.telephony, self.bridge
        )

    # --- watchers ------------------------------------------------------------------------------

    async def watch(
        self, request: web.Request, key: FeedKey, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Serve one watcher until it goes away; runs in the connection's own handler."""
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
            return response
        # The last frame sent for the key is current while someone watches it (every change
        # is flushed to them); with nobody watching, it is forgotten (below) and worked out
        # anew. The watcher joins before its first write, so no broadcast falls in between.
        frame = self._last.get(key) or sse_frame(self.current(key))
        self._last[key] = frame
        watcher = Watcher(response, transport, chunked)
        self._watchers.setdefault(key, set()).add(watcher)
        try:
            await response.write(b"retry: 5000\n" + frame)
            await watcher.done
        finally:
            group = self._watchers.get(key)
            if group is not None:
                group.discard(watcher)
                if not group:
                    # Changes while nobody watches are not flushed: the frame would go stale.
                    del self._watchers[key]
                    self._last.pop(key, None)
        return response

    # --- changes -------------------------------------------------------------------------------

    async def _on_presence(self, change: PresenceChange) -> None:
        self._site_changed(change.presence.site)

    def _site_changed(self, site: str) -> None:
        """Presence or a ring changed: the site's answer may have too."""
        if site in self._dirty or not any(k[0] == site for k in self._watchers):
            return
        self._dirty.add(site)
        self._tasks.spawn(self._flush_later(site), f"flush-{site}")

    async def _flush_later(self, site: str) -> None:
        await asyncio.sleep(self._coalesce_s)  # one broadcast for a burst of changes
        self._dirty.discard(site)
        await self.flush(site)

    async def flush(self, site: str | None = None, keepalive: bool = False) -> None:
        now = self._clock()
        for key in [k for k in self._watchers if site is None or k[0] == site]:
            frame = sse_frame(
                availability_json(
                    self._presence, self._ringing, key, now, self.telephony, self.bridge
                )
            )
            if frame == self._last.get(key):
                if not keepalive:
                    continue
                frame = b": keepalive\n\n"
            else:
                self._last[key] = frame
            await self._broadcast(key, frame)

    async def _broadcast(self, key: FeedKey, frame: bytes) -> None:
        # The same bytes for everyone, HTTP chunk framing included, written straight to each
        # socket: no per-watcher await, so one slow reader can neither hold up nor reorder
        # a broadcast (it is dropped once its unsent bytes pile up instead).
        chunk = b"%x\r\n%s\r\n" % (len(frame), frame)
        watchers = list(self._watchers.get(key, ()))
        for i, watcher in enumerate(watchers):
            transport = watcher.transport
            if transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
                cut(transport)
                watcher.close()  # it reconnects by itself
                continue
            if transport.is_closing():
                watcher.close()  # gone
                continue
            transport.write(chunk if watcher.chunked else frame)
            if i % WRITES_PER_SLICE == WRITES_PER_SLICE - 1:
                await asyncio.sleep(0)  # let the node breathe between slices

    async def run_keepalive(self) -> None:
        """Proxies close silent streams; this also catches branches opening or closing."""
        while True:
            await asyncio.sleep(self._keepalive_s)
            try:
                await self.flush(keepalive=True)
            except Exception:
                log.exception("availability keepalive failed")

    async def close_watchers(self) -> None:
        """End every stream, so that a shutting-down server is not held open by them."""
        for group in list(self._watchers.values()):
            for watcher in list(group):
                watcher.close()

    async def close(self) -> None:
        await self.close_watchers()
        await self._tasks.close()
