"""Each open ticket page's live view of its call, pushed as it changes.

A ticket page is an idle browser tab, often on a phone, held open for minutes or hours, so
it is a Server-Sent Events stream (gateway.edge.http.sse), not a socket. The node hears of a
change to any call as the visitor's ``call:update`` reaches it from socket.io's manager (a
tap: no message of its own on the wire, whichever node changed the call). For a call with
pages open here it reads the visitor's view once (with the live queue position and ETA, which
the socket event lacks) and writes the same bytes to each of them. A burst of changes to one
call is read once. Each frame carries the call's stored version, so a page keeps the newest
whatever order two reads finish in.

The keepalive also re-reads the calls waiting in line, whose queue position and ETA move
without a change of their own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.core.errors import StoreUnavailable
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
from gateway.wire.calls import shared_call_to_wire
from gateway.wire.codec import Json

log = logging.getLogger(__name__)

WAITING_STATES = frozenset({"queued"})
"""Calls whose view changes without a change of their own (the queue moves: position, ETA):
re-read at each keepalive. A scheduled call's ETA is only the time to ``scheduled_at``,
which the page counts down by itself."""


@dataclass(frozen=True, slots=True)
class TicketView:
    version: int
    """The call's stored version: a page shows the highest it was sent."""
    call: Json
    """The visitor's view of the call (``call_to_wire`` with position and ETA)."""
    share_hash: str | None
    """Which share link works now (None: none does)."""


UNSHARED = sse_frame("unshared", {})
"""To a page on a share link that was turned off (or replaced): the stream ends next."""


class _Frames:
    """A view's frames, each made once, and only if some page needs it: the whole ticket for
    the customer's pages, the cut-down one (``shared_call_to_wire``) for the share link's."""

    __slots__ = ("_shared", "full", "view")

    def __init__(self, view: TicketView) -> None:
        self.view = view
        self.full = sse_frame("ticket", {"version": view.version, "call": view.call})
        self._shared: bytes | None = None

    def send(self, watcher: Watcher, share_hash: str | None) -> None:
        """One page's frame; a page on a share link that no longer works is told, and its
        stream ends."""
        if share_hash is None:
            send(watcher, self.full, chunk_of(self.full))
        elif share_hash == self.view.share_hash:
            if self._shared is None:
                shared = {"version": self.view.version, "call": shared_call_to_wire(self.view.call)}
                self._shared = sse_frame("ticket", shared)
            send(watcher, self._shared, chunk_of(self._shared))
        else:
            send(watcher, UNSHARED, chunk_of(UNSHARED))
            watcher.close()


@dataclass(slots=True)
class _Sent:
    """What the call's pages were last sent: its version and a digest of the frame (a frame
    is ~0.7 KB, and most tickets have one page, so keeping it cost as much as the page)."""

    version: int
    digest: int
    waiting: bool


class TicketFeed:
    def __init__(
        self,
        view: Callable[[str], Awaitable[TicketView | None]],
        keepalive_s: float = 20.0,
        max_watchers: int = 50_000,
        max_per_call: int = 16,
    ) -> None:
        self._view = view
        self._keepalive_s = keepalive_s
        self.max_watchers = max_watchers
        self.max_per_call = max_per_call
        """Pages of one ticket on one node: the customer's phone and laptop, a colleague or
        two; more is someone holding connections open with a leaked link."""
        self._watchers: dict[str, dict[Watcher, str | None]] = {}
        """Each call's pages here, each with the share link it was opened with (None: the
        customer's own)."""
        self._sent: dict[str, _Sent] = {}
        self._dirty: set[str] = set()
        self._tasks = TaskGroup("tickets")
        self.watcher_count = 0

    def watching(self, call_id: str) -> int:
        return len(self._watchers.get(call_id, ()))

    async def watch(
        self,
        request: web.Request,
        call_id: str,
        headers: dict[str, str],
        share_hash: str | None = None,
    ) -> web.StreamResponse:
        """Start one page's stream; it is written to by pushes until it ends. The page joins
        before the call is read, so no change falls between its first frame and the
        pushes. ``share_hash``: a page on the read-only share link with that hash."""
        opened = await open_stream(request, headers)
        if opened is None:
            return no_stream(headers)  # a HEAD, or the client went away
        watcher, response = opened
        group = self._watchers.setdefault(call_id, {})
        group[watcher] = share_hash
        self.watcher_count += 1
        watcher.watch(functools.partial(self._ended, call_id, group))
        watcher.write(b"retry: %d\n" % RETRY_MS)
        try:
            view = await self._view(call_id)
        except StoreUnavailable:
            view = None  # the stream ends; EventSource comes back later
        except BaseException:
            watcher.close()  # the connection is the watcher's now: nothing else ends it
            raise
        if view is None:
            watcher.close()
            return response
        frames = _Frames(view)
        self._note(call_id, view, frames.full)
        frames.send(watcher, share_hash)
        return response

    def _ended(self, call_id: str, group: dict[Watcher, str | None], watcher: Watcher) -> None:
        """Once per page (``Watcher.watch``), however its stream ended."""
        del group[watcher]
        self.watcher_count -= 1
        if not group and self._watchers.get(call_id) is group:
            del self._watchers[call_id]
            self._sent.pop(call_id, None)

    # --- changes -------------------------------------------------------------------------------

    def on_call_update(self, call: object) -> None:
        """A visitor's ``call:update`` reached this node (socket.io manager's tap)."""
        if not isinstance(call, dict):
            return
        call_id = call.get("call_id")
        if not isinstance(call_id, str) or call_id not in self._watchers:
            return
        if call_id in self._dirty:
            return  # a read is already on its way; it will see this change
        self._dirty.add(call_id)
        self._tasks.spawn(self._refresh(call_id), "ticket-refresh")

    async def _refresh(self, call_id: str) -> None:
        self._dirty.discard(call_id)
        try:
            view = await self._view(call_id)
        except Exception as exc:  # the store is out: the keepalive reads it again
            log.debug("ticket %s not read: %r", call_id, exc)
            return
        if view is None or call_id not in self._watchers:
            return
        frames = _Frames(view)
        if not self._note(call_id, view, frames.full):
            return  # older than, or the same as, what the pages have
        for watcher, share_hash in list(self._watchers.get(call_id, {}).items()):
            frames.send(watcher, share_hash)

    def _note(self, call_id: str, view: TicketView, frame: bytes) -> bool:
        """Record ``frame`` as the call's pages' newest; False if they have it, or newer."""
        sent, digest = self._sent.get(call_id), hash(frame)
        if sent is not None and (
            view.version < sent.version or (view.version == sent.version and digest == sent.digest)
        ):
            return False
        self._sent[call_id] = _Sent(view.version, digest, view.call.get("state") in WAITING_STATES)
        return True

    async def run_keepalive(self) -> None:
        """Proxies close silent streams; and a waiting call's position and ETA move on."""
        chunk = chunk_of(KEEPALIVE)
        while True:
            await asyncio.sleep(self._keepalive_s)
            try:
                for call_id in [c for c, s in self._sent.items() if s.waiting]:
                    await self._refresh(call_id)
                for group in list(self._watchers.values()):
                    for watcher in list(group):
                        send(watcher, KEEPALIVE, chunk)
            except Exception:
                log.exception("ticket keepalive failed")

    async def close_watchers(self) -> None:
        """End every stream, so that a shutting-down server is not held open by them."""
        close_all(self._watchers.values())

    async def close(self) -> None:
        await self.close_watchers()
        await self._tasks.close()
