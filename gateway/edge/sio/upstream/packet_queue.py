"""The queue of packets an engine.io socket holds for a client that polls, or before its
websocket opens (``PacketQueue``)."""

from __future__ import annotations

import asyncio
from typing import Any


class PacketQueue:
    """The part of ``asyncio.Queue`` engine.io uses (unbounded), at a tenth of its size.

    Every socket has one, though on a websocket it holds only the OPEN packet, for a moment
    (``LeanSocket.attach``). ``asyncio.Queue`` makes three deques and an Event up front, about
    3 KB a socket at 10,000 idle sockets; this is a list, with its waiters made only when
    someone waits. The same order, ``task_done``/``join`` count and ``QueueEmpty``."""

    __slots__ = ("_getters", "_items", "_joiners", "_unfinished")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._getters: list[asyncio.Future[None]] | None = None
        self._joiners: list[asyncio.Future[None]] | None = None
        self._unfinished = 0

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._unfinished += 1
        _wake_first(self._getters)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    async def get(self) -> Any:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                if getter in self._getters:
                    self._getters.remove(getter)
                elif self._items:
                    # Woken, then cancelled before it ran: the next getter takes the item.
                    _wake_first(self._getters)
                raise
        return self._items.pop(0)

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0 and self._joiners:
            for joiner in self._joiners:
                if not joiner.done():
                    joiner.set_result(None)
            self._joiners = None

    async def join(self) -> None:
        if self._unfinished:
            joiner = asyncio.get_running_loop().create_future()
            if self._joiners is None:
                self._joiners = []
            self._joiners.append(joiner)
            await joiner


def _wake_first(waiters: list[asyncio.Future[None]] | None) -> None:
    while waiters:
        waiter = waiters.pop(0)
        if not waiter.done():
            waiter.set_result(None)
            return
