"""A node's drain: asked to stop (SIGTERM), it goes out of rotation, takes no new work, sends
its clients elsewhere and hands what it holds to the other nodes, then exits within a grace
period (docs/ARCHITECTURE.md, "Draining").

Nothing a call needs lives only in a node: calls, ring timers and callback steps are in the
store, and media flows between the browsers. So a drain has little to hand over: the leases
of the timers this node is running, and its sockets, whose clients reconnect to another node
and take their calls over there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.core.errors import draining

log = logging.getLogger(__name__)

# What a refused client is told to wait before retrying: behind a load balancer the retry
# reaches another node, which can take it at once.
RETRY_AFTER_S = 1

DrainStep = Callable[[float], Awaitable[None]]
"""One part of the drain; it gets the deadline (``time.monotonic``) it must be done by."""


class Drain:
    """Whether this node drains, and the steps that hand its work over, in order."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self.started_at: float | None = None
        self._steps: list[tuple[str, DrainStep]] = []

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def refuse_new_work(self) -> None:
        """Raise ``draining`` (503, with Retry-After) once the drain has begun."""
        if self.started_at is not None:
            raise draining(RETRY_AFTER_S)

    def on_drain(self, name: str, step: DrainStep) -> None:
        self._steps.append((name, step))

    @property
    def reserve_s(self) -> float:
        """Kept back from the grace for the shutdown after the drain (closing connections
        and the store)."""
        return min(2.0, self.grace_s / 4)

    def deadline(self) -> float:
        """When the steps must be done by: the grace from the start, less the reserve."""
        started = self.started_at if self.started_at is not None else self._clock()
        return started + self.grace_s - self.reserve_s

    async def run(self) -> None:
        """Begin draining (at once: ``/readyz`` and new work see it from here on) and run every
        step. Running it again runs the steps again; each does nothing the second time."""
        if self.started_at is None:
            self.started_at = self._clock()
            log.info("draining: handing over within %.1f s", self.grace_s)
        for name, step in self._steps:
            try:
                await step(self.deadline())
            except asyncio.CancelledError:
                raise
            except Exception:
                # The rest of the drain still helps; what this step held lapses on its own.
                log.exception("drain step %s failed", name)
        log.info("drained in %.2f s", self._clock() - self.started_at)
