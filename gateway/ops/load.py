"""What a node measures of its own load, for admission control (gateway.core.admission).

The event loop's lag is read from a timer that is due every ``tick_s``: how late it runs is
how long everything else waits for its turn. A lone late tick (the process descheduled for
a moment on a shared machine, one collector pause) is smoothed out; a saturated loop is late
on every tick and the average follows within a few ticks. A tick overdue right now counts
as well, so a loop stuck behind a burst is seen before its tick has run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

from prometheus_client import Gauge, Histogram

from gateway.core.admission import Load, StartLimit

# Weight of each new tick's lateness in the average: about the last 4 ticks (40 ms) count.
SMOOTHING = 0.25


class LoadMonitor:
    def __init__(
        self,
        tick_s: float = 0.01,
        gauge: Gauge | None = None,
        histogram: Histogram | None = None,
    ) -> None:
        self.tick_s = tick_s
        self._gauge = gauge
        self._histogram = histogram
        self.lag_s = 0.0
        """Smoothed lateness of the ticks so far."""
        self.starts_in_flight = 0
        self.start_limit: StartLimit | None = None
        """Learns how many starts may run at once (None: the configured maximum always)."""
        self.emit_backlog: Callable[[], int] = lambda: 0
        self.store_in_flight: Callable[[], int] = lambda: 0
        self.extra_lag_s = 0.0
        """Added to the measured lag: lets a test (or an operator drill) make the node look
        saturated without saturating it."""
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        # Kept: on 3.11 every asyncio.get_running_loop() is a getpid() system call, and the
        # lag is read on every call start.
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._due = loop.time() + self.tick_s
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        late = max(0.0, now - self._due)
        self.lag_s += SMOOTHING * (late - self.lag_s)
        if self._gauge is not None:
            self._gauge.set(self.lag_s)
        if self._histogram is not None:
            self._histogram.observe(late)
        self._due = now + self.tick_s
        self._handle = loop.call_at(self._due, self._tick)

    def loop_lag_s(self) -> float:
        overdue = 0.0
        if self._handle is not None and self._loop is not None:
            overdue = max(0.0, self._loop.time() - self._due)
        return max(self.lag_s, overdue) + self.extra_lag_s

    def sample(self) -> Load:
        return Load(
            loop_lag_s=self.loop_lag_s(),
            starts_in_flight=self.starts_in_flight,
            starts_allowed=None if self.start_limit is None else self.start_limit.allowed,
            emit_backlog=self.emit_backlog(),
            store_in_flight=self.store_in_flight(),
        )

    @contextlib.contextmanager
    def start_running(self) -> Iterator[None]:
        """Around one admitted start: counted in flight, and its time taught to the limit."""
        self.starts_in_flight += 1
        began = time.perf_counter()
        try:
            yield
        finally:
            self.starts_in_flight -= 1
            if self.start_limit is not None:
                self.start_limit.finished(time.perf_counter() - began)
