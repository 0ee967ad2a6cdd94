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
import functools
import logging
import time
from collections.abc import Callable

from aiohttp import web

from gateway.core.availability import availability
from gateway.core.ringing import RingingAgents
from gateway.core.routing import RoutingSnapshot, capabilities
from gateway.edge.http.sse import (
    KEEPALIVE,
    RETRY_MS,
    Watcher,
    chunk_of,
    close_all,
    no_stream,
    open_stream,
    send,
    sse_frame,
)
from gateway.ops.tasks import TaskGroup
from gateway.services.presence_service import PresenceChange, PresenceService
from gateway.wire.codec import Json
from gateway.wire.presence import availability_to_wire

log = logging.getLogger(__name__)

# (site, language, branch): each distinct filter a widget asked for is computed once.
FeedKey = tuple[str, str | None, str | None]

WRITES_PER_SLICE = 256


def availability_frame(data: Json) -> bytes:
    return sse_frame("availability", data)


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
        self._quiet_at: dict[str, float] = {}
        """Per site, the monotonic time from which its next change is flushed at once."""
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
        """Start one watcher's stream; it is written to by broadcasts until it ends."""
        opened = await open_stream(request, headers)
        if opened is None:
            return no_stream(headers)  # a HEAD, or the client went away
        watcher, response = opened
        # The last frame sent for the key is current while someone watches it (every change
        # is flushed to them); with nobody watching, it is forgotten (below) and worked out
        # anew. The watcher joins before its first write, so no broadcast falls in between.
        frame = self._last.get(key) or availability_frame(self.current(key))
        self._last[key] = frame
        self._watchers.setdefault(key, set()).add(watcher)
        watcher.write(b"retry: %d\n%s" % (RETRY_MS, frame))
        watcher.watch(functools.partial(self._ended, key))
        return response

    def _ended(self, key: FeedKey, watcher: Watcher) -> None:
        group = self._watchers.get(key)
        if group is not None:
            group.discard(watcher)
            if not group:
                # Changes while nobody watches are not flushed: the frame would go stale.
                del self._watchers[key]
                self._last.pop(key, None)

    # --- changes -------------------------------------------------------------------------------

    async def _on_presence(self, change: PresenceChange) -> None:
        self._site_changed(change.presence.site)

    def _site_changed(self, site: str) -> None:
        """Presence or a ring changed: the site's answer may have too. The first change
        after a quiet spell is flushed at once; those in the ``coalesce_s`` after a flush go
        out together at its end, one broadcast for a burst (each costs a write per watcher)."""
        if site in self._dirty or not any(k[0] == site for k in self._watchers):
            return
        self._dirty.add(site)
        wait = self._quiet_at.get(site, 0.0) - time.monotonic()
        self._tasks.spawn(self._flush_after(site, max(0.0, wait)), f"flush-{site}")

    async def _flush_after(self, site: str, wait: float) -> None:
        if wait:
            await asyncio.sleep(wait)
        self._dirty.discard(site)
        self._quiet_at[site] = time.monotonic() + self._coalesce_s
        await self.flush(site)

    async def flush(self, site: str | None = None, keepalive: bool = False) -> None:
        now = self._clock()
        for key in [k for k in self._watchers if site is None or k[0] == site]:
            frame = availability_frame(
                availability_json(
                    self._presence, self._ringing, key, now, self.telephony, self.bridge
                )
            )
            if frame == self._last.get(key):
                if not keepalive:
                    continue
                frame = KEEPALIVE
            else:
                self._last[key] = frame
            await self._broadcast(key, frame)

    async def _broadcast(self, key: FeedKey, frame: bytes) -> None:
        # The same bytes for everyone, HTTP chunk framing included, written straight to each
        # socket: no per-watcher await, so one slow reader can neither hold up nor reorder
        # a broadcast (it is dropped once its unsent bytes pile up instead).
        chunk = chunk_of(frame)
        watchers = list(self._watchers.get(key, ()))
        for i, watcher in enumerate(watchers):
            send(watcher, frame, chunk)
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
        close_all(self._watchers.values())

    async def close(self) -> None:
        await self.close_watchers()
        await self._tasks.close()
