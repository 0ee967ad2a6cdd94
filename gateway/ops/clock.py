"""Where a node gets its time. Every due time, lease and grace period is read from the one
``Clock`` that ``create_app`` is given, so that a test moves time on instead of waiting for
it: ring timeouts, grace periods, leases and callbacks run in milliseconds, in a known order.

Three kinds of waiting, kept apart because a fake clock treats them differently:

- ``sleep``: until this clock has moved on (a lease renewed every third of its TTL). A fake
  clock holds such a sleeper until the test moves it past the sleeper's due time.
- ``pause``: a poller's rest between looks at the store (timers, lapsed leases). It is real
  time either way, so that what is due now (a callback placed now) runs without a test
  moving the clock; a fake clock ends it early when it is moved, so that what fell due is
  seen at once.
- Transport pacing (engine.io pings, SSE keepalives, reconnect backoff, the load monitor)
  stays on the event loop's own time: it is about the network and the CPU, and a fake clock
  standing still must not stall it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import weakref
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, epoch seconds: what due times, leases and expiries are written in
        (the store holds them, and every node reads them)."""
        ...

    def monotonic(self) -> float:
        """For deadlines within this process (a drain's): never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Until this clock has moved on by ``seconds``."""
        ...

    async def pause(self, seconds: float) -> None:
        """A poller's rest: ``seconds`` of real time at most, over as soon as the clock is
        moved on (only a fake one is)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()

# How long ``ManualClock.settle`` waits for a woken task to wait on the clock again: a task
# that went on to wait for something else (a provider that does not answer) must not hang
# the test, whose own awaits with timeouts then say what is missing.
SETTLE_LIMIT_S = 5.0


class ManualClock:
    """A clock for tests: it stands still until ``advance`` moves it.

    ``advance`` stops at each sleeper's due time on its way, and at each stop lets every task
    it woke, and every poller, run until it waits on the clock again: a lease renewal due
    at 5 s runs before leases are looked at for 15 s, as with real time. So when ``advance``
    returns, the timers that fell due have been claimed and their handlers have run; a test
    then awaits what they sent, with a timeout, and never a real ring timeout or grace."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._origin = self._now
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._pausers: set[asyncio.Future[None]] = set()
        self._waiting: dict[asyncio.Task[Any], asyncio.Future[None]] = {}
        """Tasks blocked on this clock now, and what wakes each."""
        self._users: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        """Every task that has waited on this clock: settled when each waits on it again."""
        self._changed = asyncio.Event()

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._origin

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), woken))
        await self._wait(woken)

    async def pause(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(seconds, _wake, woken)
        self._pausers.add(woken)
        try:
            await self._wait(woken)
        finally:
            handle.cancel()
            self._pausers.discard(woken)

    async def _wait(self, woken: asyncio.Future[None]) -> None:
        task = asyncio.current_task()
        assert task is not None
        if task not in self._users:
            self._users.add(task)
            task.add_done_callback(lambda _: self._changed.set())
        self._waiting[task] = woken
        self._changed.set()
        try:
            await woken
        finally:
            if self._waiting.get(task) is woken:
                del self._waiting[task]

    def _busy(self) -> list[asyncio.Task[Any]]:
        current = asyncio.current_task()
        return [
            t for t in self._users if not t.done() and t is not current and t not in self._waiting
        ]

    async def settle(self) -> None:
        """Until every task that waits on this clock waits on it again, or has ended."""
        loop = asyncio.get_running_loop()
        limit = loop.time() + SETTLE_LIMIT_S
        while busy := self._busy():
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), limit - loop.time())
            except TimeoutError:
                log.warning("clock: still busy after %.0f s: %s", SETTLE_LIMIT_S, busy)
                return

    async def advance(self, seconds: float) -> None:
        """Move time on by ``seconds`` (see the class), then return once what it woke has
        run."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        target = self._now + seconds
        await self.settle()
        while True:
            due = self._sleepers[0][0] if self._sleepers else target
            self._now = max(self._now, min(due, target))
            while self._sleepers and self._sleepers[0][0] <= self._now:
                self._wake(heapq.heappop(self._sleepers)[2])
            for woken in list(self._pausers):
                self._wake(woken)
            await self.settle()
            if self._now >= target:
                return

    def _wake(self, woken: asyncio.Future[None]) -> None:
        # Not waiting from here on, though its task runs only at the loop's next turn:
        # ``settle`` must see it busy until it waits again.
        for task, future in list(self._waiting.items()):
            if future is woken:
                del self._waiting[task]
        _wake(woken)


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
