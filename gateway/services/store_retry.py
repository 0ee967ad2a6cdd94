"""Steps nothing else would ever do again (a socket's leave, a claimed lapse), which a store
outage must delay, not lose: tried again in the node's task group until the store answers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.core.errors import StoreUnavailable
from gateway.ops.tasks import TaskGroup

log = logging.getLogger(__name__)

# Tried again after this long first, doubling up to at most this far apart once the outage
# is long, and for this long before it is given up.
RETRY_FIRST_DELAY_S = 0.25
RETRY_MAX_DELAY_S = 2.0
RETRY_FOR_S = 3600.0


class UntilStored:
    def __init__(self, tasks: TaskGroup, clock: Callable[[], float] = time.time) -> None:
        self._tasks = tasks
        self._clock = clock

    async def __call__(self, step: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``step``, which must be idempotent; while the store is unreachable, run it
        again in the background with backoff, instead of losing it with the error."""
        try:
            await step()
        except StoreUnavailable as e:
            log.warning("%s: store unreachable (%r); retrying until it is back", name, e)
            try:
                self._tasks.spawn(self._retry(step, name), name)
            except RuntimeError:
                log.error("%s: lost, the node is shutting down", name)

    def soon(self, step: Callable[[], Awaitable[None]], name: str) -> None:
        """As calling this, in the background: for a step nobody waits for (a clean-up after
        a failure already answered)."""
        try:
            self._tasks.spawn(self(step, name), name)
        except RuntimeError:
            log.error("%s: lost, the node is shutting down", name)

    async def _retry(self, step: Callable[[], Awaitable[None]], name: str) -> None:
        delay = RETRY_FIRST_DELAY_S
        give_up_at = self._clock() + RETRY_FOR_S
        while True:
            await asyncio.sleep(delay)
            try:
                await step()
            except StoreUnavailable as e:
                if self._clock() > give_up_at:
                    log.error("%s: store unreachable for too long (%r); giving up", name, e)
                    return
                delay = min(delay * 2, RETRY_MAX_DELAY_S)
            else:
                log.info("%s: done now that the store is back", name)
                return
