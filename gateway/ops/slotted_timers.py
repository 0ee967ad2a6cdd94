"""Timers for thousands of sockets, run in slots: every timer due within the same ``slot_s``
runs in one turn of the event loop, at the slot's end, rather than each waking the loop on
its own.

A node's idle sockets each have a ping and a silence watchdog due every few seconds: 8,000
sockets meant about 1,200 wake-ups a second, each a return from ``epoll_wait`` and a turn of
the loop for one callback. A timer here runs up to ``slot_s`` late, which nothing due seconds
ahead minds; a slot holds the timers of a few tens of sockets, a millisecond or two of work.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

SLOT_S = 0.05


class SlottedHandle:
    """One timer (``asyncio.TimerHandle``'s ``when`` and ``cancel``)."""

    __slots__ = ("_args", "_callback", "_when")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self._when = when
        self._callback: Callable[..., object] | None = callback
        self._args = args

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        # Left in its slot until the slot runs: finding it there would cost more.
        self._callback = None
        self._args = ()

    def cancelled(self) -> bool:
        return self._callback is None

    def _run(self) -> None:
        callback, args = self._callback, self._args
        if callback is None:
            return
        self._callback, self._args = None, ()
        callback(*args)


class SlottedTimers:
    def __init__(self, loop: asyncio.AbstractEventLoop, slot_s: float = SLOT_S) -> None:
        self._loop = loop
        self._slot_s = slot_s
        self._slots: dict[int, list[SlottedHandle]] = {}

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> SlottedHandle:
        """Run ``callback(*args)`` at the end of the slot ``when`` falls in (on the loop's
        clock)."""
        handle = SlottedHandle(when, callback, args)
        slot = math.ceil(when / self._slot_s)
        due = self._slots.get(slot)
        if due is None:
            self._slots[slot] = [handle]
            self._loop.call_at(slot * self._slot_s, self._run_slot, slot)
        else:
            due.append(handle)
        return handle

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any
    ) -> SlottedHandle:
        return self.call_at(self._loop.time() + delay, callback, *args)

    def _run_slot(self, slot: int) -> None:
        for handle in self._slots.pop(slot, ()):
            try:
                handle._run()
            except Exception as exc:  # as the loop does with a callback's error: logged
                self._loop.call_exception_handler(
                    {"message": "slotted timer callback failed", "exception": exc}
                )

    def __len__(self) -> int:
        """Timers waiting, cancelled ones included until their slot runs."""
        return sum(len(due) for due in self._slots.values())
