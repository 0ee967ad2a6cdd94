"""One owner for background tasks: strong references, names, logged failures, clean stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

RECANCEL_AFTER_S = 0.25


class TaskGroup:
    """Keeps every task it spawns alive until done, logs crashes, and cancels all on close.

    Unlike ``asyncio.TaskGroup`` a failing task does not cancel its siblings: one bad
    connection's work must not stop the node.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self._name} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait until each has exited.

        A task still running a moment after its cancel is cancelled again: a library can
        swallow a cancel (see ``raise_if_cancelling``), and a loop that then logs a plain
        error and goes back to waiting would otherwise hold shutdown up for good."""
        self._closed = True
        tasks = list(self._tasks)
        while tasks:
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=RECANCEL_AFTER_S)
            tasks = list(pending)


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that a library swallowed.

    When a cancel lands just as an ``asyncio.timeout`` inside a library read expires, the
    read reports a plain timeout and the cancel is lost (CPython 3.11); a loop around such a
    read would then never stop. ``Task.cancelling()`` still remembers the request.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
