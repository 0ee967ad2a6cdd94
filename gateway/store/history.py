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
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from operator import attrgetter
from pathlib import Path
from typing import Protocol, TypeVar

import asyncpg

from gateway.core.board_figures import (
    FigureCount,
    FigureKey,
    ScoreCount,
    ScoreKey,
    rollup_changes,
    rollup_removals,
)
from gateway.core.errors import StoreUnavailable
from gateway.core.experiment_stats import ArmFigures
from gateway.core.history import HistoryRow
from gateway.core.survey import Group

T = TypeVar("T")


COLUMNS = tuple(f.name for f in fields(HistoryRow))
row_values = attrgetter(*COLUMNS)
"""A row's values in ``COLUMNS`` order (``dataclasses.astuple`` deep-copies: measured at 13 µs a
row, a third of what writing a row costs the node)."""
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
    """
    ALTER TABLE call_history ADD COLUMN promised_at DOUBLE PRECISION;
    ALTER TABLE call_history ADD COLUMN experiment TEXT;
    ALTER TABLE call_history ADD COLUMN arm TEXT;
    ALTER TABLE call_history ADD COLUMN on_time BOOLEAN;
    CREATE INDEX call_history_by_experiment ON call_history (site, experiment)
        WHERE experiment IS NOT NULL;
    CREATE TABLE call_minutes (
        site TEXT NOT NULL,
        minute DOUBLE PRECISION NOT NULL,
        channel TEXT NOT NULL,
        outcome TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        on_time INTEGER NOT NULL,
        calls BIGINT NOT NULL,
        PRIMARY KEY (site, minute, channel, outcome, bucket, on_time)
    );
    CREATE TABLE survey_hours (
        site TEXT NOT NULL,
        hour DOUBLE PRECISION NOT NULL,
        agent_id TEXT NOT NULL,
        branch TEXT NOT NULL,
        grp TEXT NOT NULL,
        answers BIGINT NOT NULL,
        PRIMARY KEY (site, hour, agent_id, branch, grp)
    );
    """,
)
"""The schema, one step per version (1 is the first); only ever appended to."""


class HistoryRows(Protocol):
    """Where a node's ended calls are written: the history itself, or its writer process."""

    async def start(self) -> None:
        """Open; raises ``StoreUnavailable`` when it cannot be opened now."""

    async def put(self, rows: Sequence[HistoryRow]) -> None:
        """Store ``rows``, each replacing any earlier row of its call (a survey answer comes
        after the end); raises ``StoreUnavailable`` when the database fails."""

    async def close(self) -> None: ...


class CallHistory(HistoryRows, Protocol):
    async def start(self) -> None:
        """Open, and migrate the schema to the newest version."""

    async def between(self, site: str, start: float, end: float) -> list[HistoryRow]:
        """The site's calls made in ``[start, end)``, oldest first."""

    async def figures(self, site: str, start: float, end: float, step_s: int) -> list[FigureCount]:
        """The site's calls made in ``[start, end)``, counted by slot of ``step_s`` from
        ``start``, channel, outcome, bucket of time to the first human, and whether a
        callback came within ``on_time_s`` of its promise (gateway/core/board_figures.py)."""

    async def scores(self, site: str, start: float, end: float) -> list[ScoreCount]:
        """The answers to the question after the call, of calls made in ``[start, end)``
        (whole hours), counted by agent, branch and group."""

    async def arms(self, site: str, experiment: str) -> dict[str, ArmFigures]:
        """The sums of each arm of ``experiment`` (gateway/core/experiment_stats.py)."""

    async def delete_before(self, site: str, before: float, limit: int) -> int:
        """Delete up to ``limit`` of the site's calls made before ``before``; how many."""


def timeline_json(entries: Sequence[tuple[float, str, str]]) -> str:
    return json.dumps([list(e) for e in entries], separators=(",", ":"))


def _figures_sql(param: Callable[[int], str], slot: str) -> str:
    """The board's sums (parameters: site, start, end, step), with each engine's
    placeholders and its way of rounding the slot down."""
    return (
        f"SELECT {slot} AS slot, channel, outcome, bucket, on_time, SUM(calls)"
        f" FROM call_minutes WHERE site = {param(1)} AND minute >= {param(2)}"
        f" AND minute < {param(3)} GROUP BY 1, 2, 3, 4, 5"
    )


def _scores_sql(param: Callable[[int], str]) -> str:
    return (
        "SELECT agent_id, branch, grp, SUM(answers) FROM survey_hours"
        f" WHERE site = {param(1)} AND hour >= {param(2)} AND hour < {param(3)}"
        " GROUP BY 1, 2, 3"
    )


def _add_sql(table: str, keys: tuple[str, ...], value: str, param: Callable[[int], str]) -> str:
    """Add to one sum of a rollup table, creating it at the amount added."""
    columns = ("site", *keys, value)
    return (
        f"INSERT INTO {table} ({', '.join(columns)})"
        f" VALUES ({', '.join(param(i) for i in range(1, len(columns) + 1))})"
        f" ON CONFLICT (site, {', '.join(keys)}) DO UPDATE"
        f" SET {value} = {table}.{value} + EXCLUDED.{value}"
    )


def _add_figures_sql(param: Callable[[int], str]) -> str:
    return _add_sql(
        "call_minutes", ("minute", "channel", "outcome", "bucket", "on_time"), "calls", param
    )


def _add_scores_sql(param: Callable[[int], str]) -> str:
    return _add_sql("survey_hours", ("hour", "agent_id", "branch", "grp"), "answers", param)


_LOCK_CALLS = (
    f"SELECT pg_advisory_xact_lock({0x4D454D43}, h) FROM (SELECT DISTINCT hashtext(id) & 1023"
    " AS h FROM unnest($1::text[]) AS id ORDER BY h) AS locks"
)
"""Turns for writers of the same calls: a lock for each of 1,024 slots of call ids, so a
transaction takes at most 1,024 however many calls it writes (PostgreSQL's table of locks
is shared and small: 20,000 locks in one transaction ran it out of memory)."""


_HISTORY_TYPES = {
    "created_at": "float8",
    "connected_at": "float8",
    "ended_at": "float8",
    "survey_score": "int4",
    "promised_at": "float8",
    "on_time": "bool",
}
_FIGURE_TYPES = ("text", "float8", "text", "text", "int4", "int4", "int8")
_SCORE_TYPES = ("text", "float8", "text", "text", "text", "int8")


def _unnest(types: Sequence[str]) -> str:
    """Rows passed as one array per column: a batch is one statement for PostgreSQL to run,
    not one per row (measured: an eighth less of the database's CPU per call)."""
    return ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, start=1))


def _columns(rows: Sequence[Sequence[object]], width: int) -> list[list[object]]:
    return [[row[i] for row in rows] for i in range(width)]


_READ_ROWS = (
    f"SELECT h.* FROM unnest($1::text[]) AS wanted (id), LATERAL"
    f" (SELECT {', '.join(COLUMNS)} FROM call_history WHERE call_id = wanted.id LIMIT 1) AS h"
)
"""The stored rows of some calls: a lookup of the key for each, whatever the planner thinks
of the table's size (``LIMIT 1`` keeps it from turning this into a join). Not
``call_id = ANY($1)``: with the array a parameter, PostgreSQL scanned the table and compared
each row against every id, measured at 10 ms a batch and growing with the history."""

_PUT_ROWS = (
    f"INSERT INTO call_history ({', '.join(COLUMNS)})"
    f" SELECT * FROM unnest({_unnest([_HISTORY_TYPES.get(c, 'text') for c in COLUMNS])})"
    f" ON CONFLICT (call_id) DO UPDATE SET"
    f" {', '.join(f'{c} = EXCLUDED.{c}' for c in COLUMNS if c != 'call_id')}"
)


def _add_unnest_sql(table: str, keys: tuple[str, ...], value: str, types: Sequence[str]) -> str:
    """As ``_add_sql``, for many sums in one statement (each key at most once)."""
    columns = ("site", *keys, value)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({_unnest(types)})"
        f" ON CONFLICT (site, {', '.join(keys)}) DO UPDATE"
        f" SET {value} = {table}.{value} + EXCLUDED.{value}"
    )


_ADD_FIGURES = _add_unnest_sql(
    "call_minutes", ("minute", "channel", "outcome", "bucket", "on_time"), "calls", _FIGURE_TYPES
)
_ADD_SCORES = _add_unnest_sql(
    "survey_hours", ("hour", "agent_id", "branch", "grp"), "answers", _SCORE_TYPES
)


def _arms_sql(param: Callable[[int], str]) -> str:
    wait = "(connected_at - created_at)"
    return (
        "SELECT arm, COUNT(*), COUNT(connected_at),"
        f" COALESCE(SUM({wait}), 0), COALESCE(SUM({wait} * {wait}), 0),"
        " SUM(CASE WHEN connected_at IS NULL THEN 1 ELSE 0 END),"
        " SUM(CASE WHEN survey_score >= 9 THEN 1 ELSE 0 END),"
        " SUM(CASE WHEN survey_score BETWEEN 7 AND 8 THEN 1 ELSE 0 END),"
        " SUM(CASE WHEN survey_score <= 6 THEN 1 ELSE 0 END)"
        f" FROM call_history WHERE site = {param(1)} AND experiment = {param(2)} GROUP BY arm"
    )


def _figure_count(row: Sequence[object]) -> FigureCount:
    slot, channel, outcome, bucket, on_time, count = row
    return FigureCount(
        int(slot),  # type: ignore[call-overload]
        str(channel),
        str(outcome),
        int(bucket),  # type: ignore[call-overload]
        None if int(on_time) < 0 else bool(on_time),  # type: ignore[call-overload]
        int(count),  # type: ignore[call-overload]
    )


def _arm_figures(row: Sequence[object]) -> tuple[str, ArmFigures]:
    arm, n, reached, total, squares, abandoned, pro, pas, det = row
    return str(arm), ArmFigures(
        int(n),  # type: ignore[call-overload]
        int(reached),  # type: ignore[call-overload]
        float(total),  # type: ignore[arg-type]
        float(squares),  # type: ignore[arg-type]
        int(abandoned or 0),  # type: ignore[call-overload]
        int(pro or 0),  # type: ignore[call-overload]
        int(pas or 0),  # type: ignore[call-overload]
        int(det or 0),  # type: ignore[call-overload]
    )


def _sqlite_param(i: int) -> str:
    return f"?{i}"


def _pg_param(i: int) -> str:
    return f"${i}"


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
                before = self._rows(db, [r.call_id for r in rows])
                db.executemany(sql, [row_values(r) for r in rows])
                self._add(db, *rollup_changes(before, rows))

        await self._run(write)

    @staticmethod
    def _rows(db: sqlite3.Connection, call_ids: Sequence[str]) -> dict[str, HistoryRow]:
        found: dict[str, HistoryRow] = {}
        for i in range(0, len(call_ids), 500):  # under SQLite's limit of parameters
            chunk = call_ids[i : i + 500]
            sql = (
                f"SELECT {', '.join(COLUMNS)} FROM call_history"
                f" WHERE call_id IN ({', '.join('?' for _ in chunk)})"
            )
            for row in db.execute(sql, chunk):
                found[row[0]] = HistoryRow(*row)
        return found

    @staticmethod
    def _add(
        db: sqlite3.Connection, figures: Counter[FigureKey], scores: Counter[ScoreKey]
    ) -> None:
        db.executemany(
            _add_figures_sql(_sqlite_param), [(*k, n) for k, n in sorted(figures.items())]
        )
        db.executemany(_add_scores_sql(_sqlite_param), [(*k, n) for k, n in sorted(scores.items())])

    async def between(self, site: str, start: float, end: float) -> list[HistoryRow]:
        sql = (
            f"SELECT {', '.join(COLUMNS)} FROM call_history"
            " WHERE site = ? AND created_at >= ? AND created_at < ? ORDER BY created_at"
        )
        found = await self._run(lambda: self._conn().execute(sql, (site, start, end)).fetchall())
        return [HistoryRow(*row) for row in found]

    async def figures(self, site: str, start: float, end: float, step_s: int) -> list[FigureCount]:
        # minute >= start: the cast truncates, which is rounding down.
        sql = _figures_sql(_sqlite_param, "CAST((minute - ?2) / ?4 AS INTEGER)")
        args = (site, start, end, step_s)
        found = await self._run(lambda: self._conn().execute(sql, args).fetchall())
        return [_figure_count(row) for row in found]

    async def scores(self, site: str, start: float, end: float) -> list[ScoreCount]:
        sql = _scores_sql(_sqlite_param)
        found = await self._run(lambda: self._conn().execute(sql, (site, start, end)).fetchall())
        return [ScoreCount(a, b, Group(g), int(n)) for a, b, g, n in found]

    async def arms(self, site: str, experiment: str) -> dict[str, ArmFigures]:
        sql = _arms_sql(_sqlite_param)
        found = await self._run(lambda: self._conn().execute(sql, (site, experiment)).fetchall())
        return dict(_arm_figures(row) for row in found if row[0] is not None)

    async def delete_before(self, site: str, before: float, limit: int) -> int:
        def delete() -> int:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                ids = [
                    r[0]
                    for r in db.execute(
                        "SELECT call_id FROM call_history WHERE site = ? AND created_at < ?"
                        " LIMIT ?",
                        (site, before, limit),
                    )
                ]
                gone = self._rows(db, ids)
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    marks = ", ".join("?" for _ in chunk)
                    db.execute(f"DELETE FROM call_history WHERE call_id IN ({marks})", chunk)
                self._add(db, *rollup_removals(gone.values()))
                # Sums emptied by the deletes: only old ones (the key's range is short).
                db.execute(
                    "DELETE FROM call_minutes WHERE site = ? AND minute < ? AND calls = 0",
                    (site, before),
                )
                db.execute(
                    "DELETE FROM survey_hours WHERE site = ? AND hour < ? AND answers = 0",
                    (site, before),
                )
                return len(gone)

        return await self._run(delete)

    async def version(self) -> int:
        found = await self._run(
            lambda: self._conn().execute("SELECT MAX(version) FROM schema_version").fetchone()
        )
        return int(found[0] or 0)


CLOSE_TIMEOUT_S = 5.0


class PostgresHistory:
    """The history of nodes sharing Redis: one PostgreSQL database for all of them. Nodes
    that start at once migrate one after another (a transaction-scoped advisory lock)."""

    MIGRATION_LOCK = 0x4D454D42  # "MEMB"

    def __init__(self, url: str) -> None:
        self._url = url
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> None:
        """Open the connections if they are not open, without migrating (the history's writer
        process, gateway/store/history_process.py, writes to a schema its node migrated)."""
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(self._url, min_size=1, max_size=2)
        except (OSError, asyncpg.PostgresError) as e:
            raise StoreUnavailable(f"call history: {e}") from e

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
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                # A connection stuck on a database gone away: a stopping node drops it.
                pool.terminate()

    def _open_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the call history is not connected")
        return self._pool

    async def put(self, rows: Sequence[HistoryRow]) -> None:
        pool = self._open_pool()
        ids = sorted({r.call_id for r in rows})
        newest = list({r.call_id: r for r in rows}.values())  # one row per call in a statement
        try:
            async with pool.acquire() as db, db.transaction():
                # Two nodes writing one call at once (its end here, its answer there) take
                # turns, so each reads what the other wrote before adding to the sums.
                await db.execute(_LOCK_CALLS, ids)
                before = await self._rows(db, ids)
                await db.execute(
                    _PUT_ROWS, *_columns([row_values(r) for r in newest], len(COLUMNS))
                )
                await self._add(db, *rollup_changes(before, rows))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise StoreUnavailable(f"call history: {e}") from e

    @staticmethod
    async def _rows(db: asyncpg.Connection, call_ids: Sequence[str]) -> dict[str, HistoryRow]:
        return {row[0]: HistoryRow(*row) for row in await db.fetch(_READ_ROWS, list(call_ids))}

    @staticmethod
    async def _add(
        db: asyncpg.Connection, figures: Counter[FigureKey], scores: Counter[ScoreKey]
    ) -> None:
        if figures:
            sums = [(*k, n) for k, n in sorted(figures.items())]
            await db.execute(_ADD_FIGURES, *_columns(sums, len(_FIGURE_TYPES)))
        if scores:
            answers = [(*k, n) for k, n in sorted(scores.items())]
            await db.execute(_ADD_SCORES, *_columns(answers, len(_SCORE_TYPES)))

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

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        pool = self._open_pool()
        try:
            async with pool.acquire() as db:
                found: list[asyncpg.Record] = await db.fetch(sql, *args)
                return found
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise StoreUnavailable(f"call history: {e}") from e

    async def figures(self, site: str, start: float, end: float, step_s: int) -> list[FigureCount]:
        sql = _figures_sql(_pg_param, "FLOOR((minute - $2) / $4)::INTEGER")
        found = await self._fetch(sql, site, start, end, float(step_s))
        return [_figure_count(tuple(row)) for row in found]

    async def scores(self, site: str, start: float, end: float) -> list[ScoreCount]:
        found = await self._fetch(_scores_sql(_pg_param), site, start, end)
        return [ScoreCount(a, b, Group(g), int(n)) for a, b, g, n in found]

    async def arms(self, site: str, experiment: str) -> dict[str, ArmFigures]:
        found = await self._fetch(_arms_sql(_pg_param), site, experiment)
        return dict(_arm_figures(tuple(row)) for row in found if row[0] is not None)

    async def delete_before(self, site: str, before: float, limit: int) -> int:
        pool = self._open_pool()
        try:
            async with pool.acquire() as db, db.transaction():
                ids = sorted(
                    r[0]
                    for r in await db.fetch(
                        "SELECT call_id FROM call_history WHERE site = $1 AND created_at < $2"
                        " LIMIT $3",
                        site,
                        before,
                        limit,
                    )
                )
                await db.execute(_LOCK_CALLS, ids)
                gone = await self._rows(db, ids)
                await db.execute(
                    "DELETE FROM call_history WHERE call_id = ANY($1::text[])", list(gone)
                )
                await self._add(db, *rollup_removals(gone.values()))
                # Sums emptied by the deletes: only old ones (the key's range is short).
                await db.execute(
                    "DELETE FROM call_minutes WHERE site = $1 AND minute < $2 AND calls = 0",
                    site,
                    before,
                )
                await db.execute(
                    "DELETE FROM survey_hours WHERE site = $1 AND hour < $2 AND answers = 0",
                    site,
                    before,
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise StoreUnavailable(f"call history: {e}") from e
        return len(gone)

    async def version(self) -> int:
        async with self._open_pool().acquire() as db:
            return int(await db.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
