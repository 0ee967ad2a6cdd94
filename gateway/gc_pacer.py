"""Garbage collection on a clock, so that no single collection is long.

CPython starts a young collection when allocations minus deallocations pass a threshold. A
node's thousands of sockets each keep a few waits pending (a coroutine, a future, a timer)
and replace them on every message or ping: one allocated, one freed. The count barely moves,
so the young generation grows for many seconds without being collected, and the collection
that finally comes walks 100k-140k objects in 80-110 ms (measured in bench/click_to_ring.py
at 5,000 agents on two nodes), stalling every call on the node meanwhile.

The pacer collects the young generation every ``young_every_s`` (it then holds only what
that interval allocated and kept), the middle one every ``middle_every`` young collections,
and everything every ``full_every_s``: the same work as the collector's own schedule, in
pieces of a few milliseconds, with the automatic thresholds left as a safety net for bursts.
Timer callbacks, not a Task, so the pacer itself adds nothing for the collector to walk.
"""

from __future__ import annotations

import asyncio
import gc


class CollectorPacer:
    def __init__(
        self, young_every_s: float = 0.05, middle_every: int = 5, full_every_s: float = 60.0
    ) -> None:
        self.young_every_s = young_every_s
        self.middle_every = middle_every
        self.full_every_s = full_every_s
        self._ticks = 0
        self._handles: list[asyncio.TimerHandle] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._handles = [
            loop.call_later(self.young_every_s, self._young),
            loop.call_later(self.full_every_s, self._full),
        ]

    def stop(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles = []

    def _young(self) -> None:
        self._ticks += 1
        gc.collect(1 if self._ticks % self.middle_every == 0 else 0)
        self._handles[0] = asyncio.get_running_loop().call_later(self.young_every_s, self._young)

    def _full(self) -> None:
        gc.collect()
        self._handles[1] = asyncio.get_running_loop().call_later(self.full_every_s, self._full)
