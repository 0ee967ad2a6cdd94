"""What the parts of the embedded store share: the SQLite connection and its thread."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class EmbeddedParts:
    """The SQLite connection each part uses, opened by ``EmbeddedStore``. SQLite runs on one
    dedicated thread (``_run``), so the event loop never waits on the disk and each function
    run there is atomic with respect to the others."""

    node_id: str
    _db: sqlite3.Connection | None = None
    _executor: ThreadPoolExecutor | None = None
    _clock: Callable[[], float]
    """The wall clock behind expiries that take no ``now`` (claims, counters), as Redis
    expires keys by its own clock; a test passes a fake one instead of sleeping."""

    async def _run(self, fn: Callable[[], T]) -> T:
        assert self._executor is not None, "store not started"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "store not started"
        return self._db
