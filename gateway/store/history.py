"""Call history that lasts: every ended call, with its outcome, agent, branch, channel, times,
timeline and the answer to the question after it, kept after the live state is gone.

Live state stays in the store (Redis or the embedded one); history is written beside it, by
the node that ended the call (gateway/services/history_writer.py). The schema is versioned:
``MIGRATIONS`` are applied in order, each once, and the version reached is recorded in the
database (``schema_version``), so a node that starts on an older database brings it up to
date and an older node refuses a newer one.

``SqliteHistory`` is the one-node history (a file beside the embedded store's);
``PostgresHistory`` the history of nodes sharing Redis (``server.history_url``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, fields
from pathlib import Path
from typing import Protocol, TypeVar

import asyncpg

from gateway.core.errors import StoreUnavailable
from gateway.core.history import HistoryRow

T = TypeVar("T")


COLUMNS = tuple(f.name for f in fields(HistoryRow))
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE call_history (
        call_id TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        channel TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT,
        agent_id TEXT,
        branch TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        connected_at DOUBLE PRECISION,
        ended_at DOUBLE PRECISION,
        survey_score INTEGER,
        timeline TEXT NOT NULL
    );
    CREATE INDEX call_history_by_day ON call_history (site, created_at);
    """,
)
"""The schema, one step per version (1 is the first); only ever appended to."""


class CallHistory(Protocol):
    async def start(self) -> None:
        """Open, and migrate the schema to the newest version."""

    async def close(self) -> None: ...

    async def put(self, rows: Sequence[HistoryRow]) -> None:
        """Store ``rows``, each replacing any earlier row of its call (a survey answer comes
        after the end); raises ``StoreUnavailable`` when the database fails."""

    async def between(self, site: str, start: float, end: float) -> list[HistoryRow]:
        """The site's calls made in ``[start, end)``, oldest first."""


def timeline_json(entries: Sequence[tuple[float, str, str]]) -> str:
    return json.dumps([list(e) for e in entries], separators=(",", ":"))


class SqliteHistory:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreUnavailable("the call history is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except sqlite3.DatabaseError as e:
            raise StoreUnavailable(f"call history: {e}") from e

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "history not started"
        return self._db

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")
        await self._run(self._open)

    def _open(self) -> None:
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        version = int(found[0] or 0)
        if version > len(MIGRATIONS):
            db.close()
            raise StoreUnavailable(
                f"call history is at schema version {version}, newer than this node knows"
            )
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            with db:
                db.execute("BEGIN IMMEDIATE")
                for statement in filter(str.strip, step.split(";")):
                    db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?)", (number,))
        self._db = db

    async def close(self) -> None:
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._db.close)
        executor.shutdown(wait=True)

    async def put(self, rows: Sequence[HistoryRow]) -> None:
        sql = (
            f"INSERT OR REPLACE INTO call_history ({', '.join(COLUMNS)})"
            f" VALUES ({', '.join('?' for _ in COLUMNS)})"
        )

        def write() -> None:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(sql, [astuple(r) for r in rows])

        await self._run(write)

    async def between(self, site: str, start: float, end: float) -> list[HistoryRow]:
        sql = (
            f"SELECT {', '.join(COLUMNS)} FROM call_history"
            " WHERE site = ? AND created_at >= ? AND created_at < ? ORDER BY created_at"
        )
        found = await self._run(lambda: self._conn().execute(sql, (site, start, end)).fetchall())
        return [HistoryRow(*row) for row in found]

    async def version(self) -> int:
        found = await self._run(
            lambda: self._conn().execute("SELECT MAX(version) FROM schema_version").fetchone()
        )
        return int(found[0] or 0)


class PostgresHistory:
    """The history of nodes sharing Redis: one PostgreSQL database for all of them. Nodes
    that start at once migrate one after another (a transaction-scoped advisory lock)."""

    MIGRATION_LOCK = 0x4D454D42  # "MEMB"

    def __init__(self, url: str) -> None:
        self._url = url
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        pool = None
        try:
            pool = await asyncpg.create_pool(self._url, min_size=1, max_size=4)
            async with pool.acquire() as db, db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock($1)", self.MIGRATION_LOCK)
                await db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                )
                version = int(
                    await db.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                )
                if version > len(MIGRATIONS):
                    raise StoreUnavailable(
                        f"call history is at schema version {version}, newer than this node knows"
                    )
                for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
                    await db.execute(step)
                    await db.execute("INSERT INTO schema_version VALUES ($1)", number)
        except (OSError, asyncpg.PostgresError, StoreUnavailable) as e:
            if pool is not None:
                await pool.close()
            if isinstance(e, StoreUnavailable):
                raise
            raise StoreUnavailable(f"call history: {e}") from e
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _open_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the call history is not connected")
        return self._pool

    async def put(self, rows: Sequence[HistoryRow]) -> None:
        pool = self._open_pool()
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "call_id")
        sql = (
            f"INSERT INTO call_history ({', '.join(COLUMNS)})"
            f" VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))})"
            f" ON CONFLICT (call_id) DO UPDATE SET {updates}"
        )
        try:
            async with pool.acquire() as db, db.transaction():
                await db.executemany(sql, [astuple(r) for r in rows])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise StoreUnavailable(f"call history: {e}") from e

    async def between(self, site: str, start: float, end: float) -> list[HistoryRow]:
        pool = self._open_pool()
        sql = (
            f"SELECT {', '.join(COLUMNS)} FROM call_history"
            " WHERE site = $1 AND created_at >= $2 AND created_at < $3 ORDER BY created_at"
        )
        try:
            async with pool.acquire() as db:
                found = await db.fetch(sql, site, start, end)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise StoreUnavailable(f"call history: {e}") from e
        return [HistoryRow(*row) for row in found]

    async def version(self) -> int:
        async with self._open_pool().acquire() as db:
            return int(await db.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
