"""Runs durable timers (ring timeouts, callbacks) on whichever node claims them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.core.errors import StoreUnavailable
from gateway.ops.clock import SYSTEM_CLOCK, Clock
from gateway.store.base import TimerStore

log = logging.getLogger(__name__)

# A handler returns None when the timer is done, or when it should run again (a callback
# waiting for a free agent polls this way; the timer keeps its id and stays durable).
TimerHandler = Callable[[str], Awaitable[float | None]]


class TimerLoop:
    """Polls the store for due timers; each is leased, handled, then finished. A node that
    dies mid-handler lets the lease lapse and another node handles the timer again, so
    handlers must be idempotent (the call transitions are: a stale one is refused)."""

    def __init__(
        self,
        store: TimerStore,
        interval_s: float = 0.1,
        lease_s: float = 15.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._clock = clock
        self._handlers: dict[str, TimerHandler] = {}
        self._stopping = False
        self._in_flight: set[str] = set()
        """Timers claimed by this node whose handler has not finished."""

    def on(self, kind: str, handler: TimerHandler) -> None:
        """``handler`` gets the timer id without its ``kind:`` prefix."""
        self._handlers[kind] = handler

    async def run_once(self) -> int:
        due = await self._store.claim_timers(self._clock.now(), self._lease_s)
        # One batch runs concurrently: a slow handler (a dial waiting on the provider) must
        # not hold up the callbacks due with it.
        results = await asyncio.gather(
            *(self._run_timer(timer_id) for timer_id in due), return_exceptions=True
        )
        for timer_id, result in zip(due, results, strict=True):
            if isinstance(result, Exception):
                log.warning("timer %s: %r; it will run again after its lease", timer_id, result)
        return len(due)

    async def _run_timer(self, timer_id: str) -> None:
        self._in_flight.add(timer_id)
        await self._handle(timer_id)
        # Not on a cancel: a handler cut off by a drain keeps its place in ``_in_flight``, and
        # ``hand_over`` gives its lease back.
        self._in_flight.discard(timer_id)

    async def _handle(self, timer_id: str) -> None:
        kind, _, rest = timer_id.partition(":")
        handler = self._handlers.get(kind)
        if handler is None:
            log.error("no handler for timer %s; dropping it", timer_id)
            await self._store.finish_timer(timer_id)
            return
        try:
            again = await handler(rest)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as e:
            # An outage, not a bug: no traceback (one per timer due while Redis is away).
            log.warning(
                "timer %s: store unreachable (%r); it will run again after its lease", timer_id, e
            )
            return
        except Exception:
            log.exception("timer %s failed; it will run again after its lease", timer_id)
            return
        if again is None:
            await self._store.finish_timer(timer_id)
        else:
            await self._store.schedule_timer(timer_id, again)

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("claiming timers failed: %r", e)
            await self._clock.pause(self._interval_s)

    async def hand_over(self, running: asyncio.Task[None], deadline: float) -> None:
        """For a drain: claim no more timers, let the handlers running in ``running`` (the task
        of ``run``) finish until ``deadline`` (the clock's ``monotonic``), then cut off those still
        running and make their timers due now, so another node runs them at once instead of
        after their lease (15 s)."""
        self._stopping = True
        if not running.done():
            await asyncio.wait({running}, timeout=max(0.0, deadline - self._clock.monotonic()))
        if not running.done():
            running.cancel()
            await asyncio.wait({running}, timeout=1.0)
        if not self._in_flight:
            return
        now = self._clock.now()
        for timer_id in sorted(self._in_flight):
            await self._store.schedule_timer(timer_id, now)
        log.info("handed over %d running timers", len(self._in_flight))
        self._in_flight.clear()
