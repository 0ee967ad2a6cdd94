"""Garbage collection on a clock, and never over every open connection.

CPython's own schedule fails a node that holds thousands of connections in two ways:

1. **Young collections come late.** CPython starts one when allocations minus deallocations
   pass a threshold. Each socket keeps a few waits pending (a coroutine, a future, a timer)
   and replaces them on every message or ping: one allocated, one freed. The count barely
   moves, so the young generation grows for seconds and is then collected in one 80-110 ms
   pause (100k-140k objects, bench/click_to_ring.py at 5,000 agents on two nodes).
2. **Full collections walk every live object.** An open connection holds about 50 tracked
   objects (an availability stream) to 130 (a socket.io socket) for as long as it stays.
   A full collection took 374 ms with 10,000 availability streams on a node and 700-800 ms
   with 4,000 sockets (bench/availability_fanout.py, bench/click_to_ring.py), and ran once a
   minute.

So the pacer collects the young generation every ``young_every_s``, the middle one every
``middle_every`` young collections, and then *freezes* (``gc.freeze``) whatever survived
that middle collection: the collector never walks those objects again. A frozen object is
still freed by reference counting once nothing refers to it; only a reference *cycle* of
frozen objects that becomes garbage stays behind. Measured: after 1,000 availability
streams, 1,000 agent sockets and 1,000 visitor sockets were frozen and then closed, and
after 6,000 calls through two nodes, a full collection found no garbage at all
(tests/test_gc_pacer.py checks a node's connections and calls the same way). As insurance
against cycles some rarer path leaves, everything is collected (unfrozen, collected, frozen
again) every ``full_every_s``: the one long pause left, once an hour by default.

Timer callbacks, not a Task, so the pacer adds nothing of its own for the collector to walk.

The collector is the interpreter's, so there is one pacer per process (``PROCESS_PACER``):
every app that ``create_app`` builds acquires it on start-up and releases it on cleanup; the
first starts it and the last stops it (tests run several nodes in one process). It runs only
on the CPython versions it was measured on (``MEASURED``): it relies on the generational
collector's young, middle and old generations, and 3.14's incremental collector has two
generations and collects the old one in slices, so ``gc.collect(1)`` no longer means what the
numbers above assume. Elsewhere it stays off and says so once in the log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# (generation, pause in seconds, objects collected): every collection, paced or automatic.
PauseObserver = Callable[[int, float, int], None]

# CPython versions whose collector the pacer's design and numbers hold for: measured on 3.11;
# 3.12 and 3.13 keep its three generations, thresholds and gc.freeze (3.12 moved when the
# collector runs to the eval breaker, which paced collections do not depend on). 3.14 does not.
MEASURED = ((3, 11), (3, 13))
# Automatic collections stay a safety net for allocation bursts while the pacer runs.
PACED_THRESHOLDS = (20_000, 20, 50)


class CollectorPacer:
    def __init__(
        self,
        young_every_s: float = 0.05,
        middle_every: int = 5,
        full_every_s: float = 3600.0,
        observer: PauseObserver | None = None,
    ) -> None:
        self.young_every_s = young_every_s
        self.middle_every = middle_every
        self.full_every_s = full_every_s
        self._observer = observer
        self._ticks = 0
        self._started_at = 0.0
        self._handles: list[asyncio.TimerHandle] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._observer is not None:
            gc.callbacks.append(self._observe)
        self._handles = [
            loop.call_later(self.young_every_s, self._young),
            loop.call_later(self.full_every_s, self._full),
        ]

    def stop(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles = []
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)

    def tick(self) -> None:
        """One young collection, or every ``middle_every``-th time a middle one after which
        the survivors are frozen."""
        self._ticks += 1
        if self._ticks % self.middle_every == 0:
            gc.collect(1)
            gc.freeze()
        else:
            gc.collect(0)

    def collect_everything(self) -> int:
        """Every object, frozen or not: returns how many were garbage. Pauses the process
        for as long as walking the whole heap takes."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        log.info(
            "full garbage collection: %d objects collected in %.0f ms",
            found,
            (time.perf_counter() - started) * 1000,
        )
        return found

    def _young(self) -> None:
        self.tick()
        self._handles[0] = asyncio.get_running_loop().call_later(self.young_every_s, self._young)

    def _full(self) -> None:
        self.collect_everything()
        self._handles[1] = asyncio.get_running_loop().call_later(self.full_every_s, self._full)

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
        elif self._observer is not None:
            self._observer(
                info["generation"], time.perf_counter() - self._started_at, info["collected"]
            )


class SharedPacer:
    """The process's one pacer, shared by every app in the process (see the module's
    docstring): started by the first ``acquire``, stopped by the last ``release``, each
    acquirer's observer told of every collection meanwhile."""

    def __init__(self, python: tuple[int, int] | None = None) -> None:
        self.python = python or (sys.version_info.major, sys.version_info.minor)
        self.users = 0
        self.pacer: CollectorPacer | None = None
        self._observers: list[PauseObserver] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thresholds: tuple[int, int, int] | None = None
        self._refused = False

    @property
    def supported(self) -> bool:
        return MEASURED[0] <= self.python <= MEASURED[1]

    def acquire(self, observer: PauseObserver | None = None) -> bool:
        """Start pacing if nobody has yet (and on a measured Python): True if it runs."""
        if not self.supported:
            if not self._refused:
                self._refused = True
                log.warning(
                    "collector pacer off: measured on CPython %d.%d-%d.%d, running %d.%d",
                    *MEASURED[0], *MEASURED[1], *self.python,
                )  # fmt: skip
            return False
        loop = asyncio.get_running_loop()
        if self.pacer is not None and self._loop is not loop and not self._running_on_loop():
            # Its loop ended without the last release (a test that crashed): start afresh.
            self._stop()
        if observer is not None:
            self._observers.append(observer)
        self.users += 1
        if self.pacer is None:
            self._loop = loop
            self._thresholds = gc.get_threshold()
            gc.set_threshold(*PACED_THRESHOLDS)
            self.pacer = CollectorPacer(observer=self._observe)
            self.pacer.start()
        return True

    def release(self, observer: PauseObserver | None = None) -> None:
        """Undo one ``acquire`` that returned True; the last one stops the pacer, gives the
        collector back its thresholds and the objects it froze."""
        if observer is not None and observer in self._observers:
            self._observers.remove(observer)
        self.users -= 1
        if self.users <= 0:
            self._stop()

    def collect_everything(self) -> int:
        """A full collection now (SIGUSR1); what the pacer froze is frozen again after."""
        if self.pacer is not None:
            return self.pacer.collect_everything()
        started = time.perf_counter()
        found = gc.collect()
        log.info(
            "full garbage collection: %d objects collected in %.0f ms (pacer off)",
            found,
            (time.perf_counter() - started) * 1000,
        )
        return found

    def _running_on_loop(self) -> bool:
        return self._loop is not None and not self._loop.is_closed()

    def _stop(self) -> None:
        if self.pacer is not None:
            self.pacer.stop()
            # Frozen objects are never collected: without a pacer to collect them every
            # hour, garbage cycles among them would stay for the rest of the process.
            gc.unfreeze()
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
        self.pacer, self._loop, self._thresholds = None, None, None
        self.users = 0
        self._observers = []

    def _observe(self, generation: int, pause_s: float, collected: int) -> None:
        for observer in self._observers:
            observer(generation, pause_s, collected)


PROCESS_PACER = SharedPacer()
