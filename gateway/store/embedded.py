"""The one-node store: presence in memory, durable records in a SQLite file. Its parts:
embedded_presence.py, embedded_records.py, embedded_coordination.py.

SQLite runs on one dedicated thread so the event loop never waits on the disk, and with
``synchronous=FULL`` a call is on disk before the request that created it is answered.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.store.base import (
    CallRow,
    EventHandler,
    Json,
    ResyncHandler,
    StoreHealth,
    failures_become_unavailable,
)
from gateway.store.embedded_coordination import EmbeddedCoordination
from gateway.store.embedded_presence import EmbeddedPresence
from gateway.store.embedded_records import EmbeddedRecords

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_by_site ON calls (site, updated_at);
CREATE TABLE IF NOT EXISTS timers (
    timer_id TEXT PRIMARY KEY,
    due REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS timers_by_due ON timers (due);
CREATE TABLE IF NOT EXISTS visits (
    site TEXT NOT NULL,
    visitor_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (site, visitor_id)
);
-- Sliding-window quotas: one row per (quota key, member), scored by the event time.
-- expires_at (wall clock) lets rows of keys no longer used be swept, as Redis expires keys.
CREATE TABLE IF NOT EXISTS quota_entries (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    score REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key, member)
);
CREATE INDEX IF NOT EXISTS quota_entries_by_score ON quota_entries (key, score);
CREATE INDEX IF NOT EXISTS quota_entries_by_expiry ON quota_entries (expires_at);
CREATE TABLE IF NOT EXISTS slots (
    key TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key, holder)
);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS counters_by_expiry ON counters (expires_at);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS claims_by_expiry ON claims (expires_at);
CREATE TABLE IF NOT EXISTS queue (
    site TEXT NOT NULL,
    call_id TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (site, call_id)
);
CREATE INDEX IF NOT EXISTS queue_by_place ON queue (site, score, call_id);
CREATE TABLE IF NOT EXISTS handle_times (
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    seconds REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS handle_times_by_site ON handle_times (site, id);
CREATE TABLE IF NOT EXISTS survey_asked (
    site TEXT NOT NULL,
    number TEXT NOT NULL,
    call_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (site, number)
);
CREATE TABLE IF NOT EXISTS survey_tallies (
    site TEXT NOT NULL,
    subject TEXT NOT NULL,
    grp TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (site, subject, grp)
);
CREATE TABLE IF NOT EXISTS text_opt_outs (
    site TEXT NOT NULL,
    number TEXT NOT NULL,
    PRIMARY KEY (site, number)
);
CREATE TABLE IF NOT EXISTS experiments (
    site TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
"""


# SQLite failing: the file locked past the busy timeout, unreadable or not a database, a disk
# I/O error, the disk full. A constraint or a misused API is a bug, not an outage.
@failures_become_unavailable(
    (sqlite3.DatabaseError,), exempt=(sqlite3.IntegrityError, sqlite3.ProgrammingError)
)
class EmbeddedStore(EmbeddedPresence, EmbeddedRecords, EmbeddedCoordination):
    """Every role of ``Store`` (its parts are mixed in, sharing the connection)."""

    def __init__(
        self, data_dir: Path, node_id: str = "embedded", clock: Callable[[], float] = time.time
    ) -> None:
        self.node_id = node_id
        self._clock = clock
        self._path = data_dir / "membrane.sqlite3"
        self._data_dir = data_dir
        self._open_presence()
        self._open_records()
        self._open_coordination()
        self._on_event: EventHandler | None = None
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def put_call_holding(self, row: CallRow, agent_id: str, ttl_s: float) -> bool | None:
        # One process: nothing can take the reservation once it is extended. The version
        # first, as in Redis: a stale row is False whatever the reservation.
        found = await self.get_call(row.call_id)
        if found is None or found.version != row.version - 1:
            return False
        if not await self.extend_reservation(row.site, agent_id, row.call_id, ttl_s):
            return None
        return await self.put_call(row)

    async def start(self, on_event: EventHandler, on_resync: ResyncHandler) -> None:
        self._on_event = on_event
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        await self._run(self._open)
        found = await self._run(
            lambda: self._conn().execute("SELECT MIN(due) FROM timers").fetchone()
        )
        self._next_due = float(found[0]) if found and found[0] is not None else float("inf")

    def _open(self) -> None:
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        db = self._db
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(executor, db.close)
        executor.shutdown(wait=True)

    async def health(self) -> StoreHealth:
        try:
            # Reads the file (its schema), which ``SELECT 1`` would not: a file that stopped
            # being a database must make the node unready.
            await self._run(
                lambda: self._conn().execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            )
        except (sqlite3.Error, AssertionError) as e:
            return StoreHealth(False, True, True, f"sqlite: {e}")
        return StoreHealth(True, True, True)

    # --- events ------------------------------------------------------------------------------

    async def publish(self, event: Json) -> None:
        return None  # there are no other nodes
