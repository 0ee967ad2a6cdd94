"""The one-node store: presence in memory, durable records in a SQLite file.

SQLite runs on one dedicated thread so the event loop never waits on the disk, and with
``synchronous=FULL`` a call is on disk before the request that created it is answered.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from gateway.core.model import Device, PresenceRecord, PresenceStatus
from gateway.core.presence import is_live
from gateway.store.base import (
    HANDLE_TIMES_KEPT,
    CallRow,
    DeviceRef,
    EventHandler,
    Expectation,
    Json,
    Quota,
    ResyncHandler,
    StoreHealth,
    failures_become_unavailable,
)

T = TypeVar("T")

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
"""


@dataclass
class _Agent:
    devices: dict[str, Device] = field(default_factory=dict)
    record: PresenceRecord = field(default_factory=PresenceRecord)


# SQLite failing: the file locked past the busy timeout, unreadable or not a database, a disk
# I/O error, the disk full. A constraint or a misused API is a bug, not an outage.
@failures_become_unavailable(
    (sqlite3.DatabaseError,), exempt=(sqlite3.IntegrityError, sqlite3.ProgrammingError)
)
class EmbeddedStore:
    def __init__(
        self, data_dir: Path, node_id: str = "embedded", clock: Callable[[], float] = time.time
    ) -> None:
        self.node_id = node_id
        # The wall clock behind expiries that take no ``now`` (claims, counters), as Redis
        # expires keys by its own clock; a test passes a fake one instead of sleeping.
        self._clock = clock
        self._path = data_dir / "membrane.sqlite3"
        self._data_dir = data_dir
        self._agents: dict[tuple[str, str], _Agent] = {}
        # (expires_at, site, agent, device); stale entries are skipped when popped.
        self._lapses: list[tuple[float, str, str, str]] = []
        self._reservations: dict[tuple[str, str], tuple[str, float]] = {}
        self._windows: dict[str, tuple[int, int]] = {}
        self._open_calls: dict[tuple[str, str], str] = {}
        # The earliest due timer, so that polling touches SQLite only when one is due.
        self._next_due = float("inf")
        self._on_event: EventHandler | None = None
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

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

    async def _run(self, fn: Callable[[], T]) -> T:
        assert self._executor is not None, "store not started"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

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

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "store not started"
        return self._db

    # --- presence --------------------------------------------------------------------------

    def _agent(self, site: str, agent_id: str) -> _Agent:
        return self._agents.setdefault((site, agent_id), _Agent())

    def _record(self, entry: _Agent, bump: bool = True) -> PresenceRecord:
        devices = tuple(sorted(entry.devices.values(), key=lambda d: d.device_id))
        rev = entry.record.rev + 1 if bump else entry.record.rev
        entry.record = replace(entry.record, devices=devices, rev=rev)
        return entry.record

    async def put_device(self, site: str, agent_id: str, device: Device) -> PresenceRecord:
        entry = self._agent(site, agent_id)
        entry.devices[device.device_id] = device
        heapq.heappush(self._lapses, (device.expires_at, site, agent_id, device.device_id))
        return self._record(entry)

    async def put_device_if(
        self, site: str, agent_id: str, device: Device, expect: Expectation
    ) -> tuple[bool, PresenceRecord]:
        record = await self.put_device(site, agent_id, device)
        live = tuple(sorted(d.device_id for d in record.devices if is_live(d, expect.now)))
        if record.rev != expect.rev or live != expect.live:
            return False, record
        if expect.status is not None:
            await self.save_status(site, agent_id, *expect.status)
            record = self._agents[(site, agent_id)].record
        return True, record

    async def remove_device(self, site: str, agent_id: str, device_id: str) -> PresenceRecord:
        entry = self._agent(site, agent_id)
        entry.devices.pop(device_id, None)
        return self._record(entry)

    async def touch_devices(
        self, refs: Sequence[DeviceRef], last_seen: float, expires_at: float
    ) -> list[DeviceRef]:
        gone = []
        for ref in refs:
            entry = self._agents.get((ref.site, ref.agent_id))
            device = entry.devices.get(ref.device_id) if entry else None
            if entry is None or device is None:
                gone.append(ref)
                continue
            entry.devices[ref.device_id] = replace(
                device, last_seen=last_seen, expires_at=expires_at
            )
            heapq.heappush(self._lapses, (expires_at, ref.site, ref.agent_id, ref.device_id))
            self._record(entry, bump=False)
        return gone

    async def get_presence(self, site: str, agent_id: str) -> PresenceRecord:
        entry = self._agents.get((site, agent_id))
        return entry.record if entry else PresenceRecord()

    async def get_site_presence(
        self, site: str, agent_ids: Sequence[str]
    ) -> dict[str, PresenceRecord]:
        return {a: await self.get_presence(site, a) for a in agent_ids}

    async def save_status(
        self, site: str, agent_id: str, status: PresenceStatus, since: float, idle_since: float
    ) -> None:
        entry = self._agent(site, agent_id)
        entry.record = replace(entry.record, status=status, since=since, idle_since=idle_since)

    async def set_active_call(
        self, site: str, agent_id: str, call_id: str | None
    ) -> PresenceRecord:
        entry = self._agent(site, agent_id)
        entry.record = replace(entry.record, active_call=call_id)
        return self._record(entry)

    async def claim_lapsed(self, now: float) -> list[tuple[str, str]]:
        lapsed: list[tuple[str, str]] = []
        while self._lapses and self._lapses[0][0] <= now:
            expires_at, site, agent_id, device_id = heapq.heappop(self._lapses)
            entry = self._agents.get((site, agent_id))
            device = entry.devices.get(device_id) if entry else None
            if entry is None or device is None or device.expires_at != expires_at:
                continue  # removed or renewed since this entry was pushed
            del entry.devices[device_id]
            self._record(entry)
            if (site, agent_id) not in lapsed:
                lapsed.append((site, agent_id))
        return lapsed

    # --- events ------------------------------------------------------------------------------

    async def publish(self, event: Json) -> None:
        return None  # there are no other nodes

    # --- durable records ---------------------------------------------------------------------

    async def put_call(self, row: CallRow) -> bool:
        data = json.dumps(row.data, separators=(",", ":"))

        def write() -> bool:
            db = self._conn()
            if row.version == 1:
                cur = db.execute(
                    "INSERT OR IGNORE INTO calls VALUES (?, ?, 1, ?, ?)",
                    (row.call_id, row.site, data, time.time()),
                )
            else:
                cur = db.execute(
                    "UPDATE calls SET version = ?, data = ?, updated_at = ?"
                    " WHERE call_id = ? AND version = ?",
                    (row.version, data, time.time(), row.call_id, row.version - 1),
                )
            return cur.rowcount == 1

        return await self._run(write)

    async def get_call(self, call_id: str) -> CallRow | None:
        def read() -> tuple[str, str, int, str] | None:
            cursor = self._conn().execute(
                "SELECT call_id, site, version, data FROM calls WHERE call_id = ?", (call_id,)
            )
            row: tuple[str, str, int, str] | None = cursor.fetchone()
            return row

        found = await self._run(read)
        if found is None:
            return None
        return CallRow(found[0], found[1], found[2], json.loads(found[3]))

    async def list_calls(self, site: str, limit: int = 100) -> list[CallRow]:
        def read() -> list[tuple[str, str, int, str]]:
            return (
                self._conn()
                .execute(
                    "SELECT call_id, site, version, data FROM calls WHERE site = ?"
                    " ORDER BY updated_at DESC LIMIT ?",
                    (site, limit),
                )
                .fetchall()
            )

        return [CallRow(c, s, v, json.loads(d)) for c, s, v, d in await self._run(read)]

    async def record_served(self, site: str, visitor_id: str, agent_id: str) -> None:
        await self._run(
            lambda: self._conn().execute(
                "INSERT OR REPLACE INTO visits VALUES (?, ?, ?, ?)",
                (site, visitor_id, agent_id, time.time()),
            )
        )

    async def set_open_call(self, site: str, visitor_id: str, call_id: str) -> None:
        self._open_calls[(site, visitor_id)] = call_id

    async def open_call(self, site: str, visitor_id: str) -> str | None:
        return self._open_calls.get((site, visitor_id))

    async def last_agent(self, site: str, visitor_id: str) -> str | None:
        found = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT agent_id FROM visits WHERE site = ? AND visitor_id = ?",
                    (site, visitor_id),
                )
                .fetchone()
            )
        )
        return found[0] if found else None

    # --- coordination (one node: plain memory, timers in SQLite) ------------------------------

    async def reserve_agent(self, site: str, agent_id: str, call_id: str, ttl_s: float) -> bool:
        now = time.time()
        held = self._reservations.get((site, agent_id))
        if held is not None and held[1] > now:
            return False
        self._reservations[(site, agent_id)] = (call_id, now + ttl_s)
        return True

    async def reserve_first(
        self, site: str, agent_ids: Sequence[str], call_id: str, ttl_s: float
    ) -> str | None:
        for agent_id in agent_ids:
            if await self.reserve_agent(site, agent_id, call_id, ttl_s):
                return agent_id
        return None

    async def extend_reservation(
        self, site: str, agent_id: str, call_id: str, ttl_s: float
    ) -> bool:
        held = self._reservations.get((site, agent_id))
        if held is None or held[0] != call_id or held[1] <= time.time():
            return False
        self._reservations[(site, agent_id)] = (call_id, time.time() + ttl_s)
        return True

    async def release_agent(self, site: str, agent_id: str, call_id: str) -> None:
        held = self._reservations.get((site, agent_id))
        if held is not None and held[0] == call_id:
            del self._reservations[(site, agent_id)]

    async def schedule_timer(self, timer_id: str, due: float) -> None:
        await self._run(
            lambda: self._conn().execute(
                "INSERT OR REPLACE INTO timers VALUES (?, ?)", (timer_id, due)
            )
        )
        self._next_due = min(self._next_due, due)

    async def claim_timers(self, now: float, lease_s: float, limit: int = 100) -> list[str]:
        if now < self._next_due:
            return []

        def claim() -> tuple[list[str], float]:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                ids = [
                    r[0]
                    for r in db.execute(
                        "SELECT timer_id FROM timers WHERE due <= ? ORDER BY due LIMIT ?",
                        (now, limit),
                    )
                ]
                db.executemany(
                    "UPDATE timers SET due = ? WHERE timer_id = ?",
                    [(now + lease_s, i) for i in ids],
                )
                nxt = db.execute("SELECT MIN(due) FROM timers").fetchone()[0]
            return ids, float(nxt) if nxt is not None else float("inf")

        ids, self._next_due = await self._run(claim)
        return ids

    async def finish_timer(self, timer_id: str) -> None:
        await self._run(
            lambda: self._conn().execute("DELETE FROM timers WHERE timer_id = ?", (timer_id,))
        )

    async def hit(self, key: str, window_s: int, limit: int, now: float) -> bool:
        window = int(now // window_s)
        full_key = f"{key}:{window_s}"
        held_window, count = self._windows.get(full_key, (window, 0))
        if held_window != window:
            count = 0
        count += 1
        self._windows[full_key] = (window, count)
        if len(self._windows) > 100_000:  # drop stale windows now and then
            current = {k: v for k, v in self._windows.items() if v[0] >= window - 1}
            self._windows = current
        return count <= limit

    # --- durable coordination (all in SQLite: a restart resets no limit) --------------------
    # Every method is one function on the SQLite thread, so each is atomic with respect to
    # the others; writes run in one transaction, so a crash leaves all or nothing.

    async def take_quotas(self, quotas: Sequence[Quota], event_id: str, now: float) -> int | None:
        rows = [
            (q.key, q.member if q.member is not None else event_id, now - q.window_s, q)
            for q in quotas
        ]

        def take() -> int | None:
            db = self._conn()
            wall = self._clock()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM quota_entries WHERE expires_at <= ?", (wall,))
                for index, (key, member, cutoff, quota) in enumerate(rows):
                    db.execute(
                        "DELETE FROM quota_entries WHERE key = ? AND score < ?", (key, cutoff)
                    )
                    present = db.execute(
                        "SELECT 1 FROM quota_entries WHERE key = ? AND member = ?", (key, member)
                    ).fetchone()
                    if present is not None:
                        continue
                    (count,) = db.execute(
                        "SELECT COUNT(*) FROM quota_entries WHERE key = ?", (key,)
                    ).fetchone()
                    if count >= quota.limit:
                        return index
                db.executemany(
                    "INSERT OR REPLACE INTO quota_entries VALUES (?, ?, ?, ?)",
                    [(key, member, now, wall + q.window_s + 1) for key, member, _, q in rows],
                )
            return None

        return await self._run(take)

    async def acquire_slot(
        self, key: str, holder: str, limit: int, ttl_s: float, now: float
    ) -> bool:
        def acquire() -> bool:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM slots WHERE key = ? AND expires_at <= ?", (key, now))
                held = db.execute(
                    "SELECT 1 FROM slots WHERE key = ? AND holder = ?", (key, holder)
                ).fetchone()
                if held is None:
                    (count,) = db.execute(
                        "SELECT COUNT(*) FROM slots WHERE key = ?", (key,)
                    ).fetchone()
                    if count >= limit:
                        return False
                db.execute(
                    "INSERT OR REPLACE INTO slots VALUES (?, ?, ?)", (key, holder, now + ttl_s)
                )
            return True

        return await self._run(acquire)

    async def release_slot(self, key: str, holder: str) -> None:
        await self._run(
            lambda: self._conn().execute(
                "DELETE FROM slots WHERE key = ? AND holder = ?", (key, holder)
            )
        )

    async def add_to_counter(self, key: str, delta: int, ttl_s: int) -> int:
        def add() -> int:
            db = self._conn()
            wall = self._clock()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM counters WHERE expires_at <= ?", (wall,))
                if delta != 0:
                    db.execute(
                        "INSERT INTO counters VALUES (?, ?, ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                        (key, delta, wall + ttl_s),
                    )
                found = db.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchone()
            return int(found[0]) if found else 0

        return await self._run(add)

    async def claim_once(self, key: str, ttl_s: float) -> bool:
        def claim() -> bool:
            db = self._conn()
            wall = self._clock()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM claims WHERE expires_at <= ?", (wall,))
                cur = db.execute("INSERT OR IGNORE INTO claims VALUES (?, ?)", (key, wall + ttl_s))
            return cur.rowcount == 1

        return await self._run(claim)

    async def queue_put(self, site: str, call_id: str, score: float) -> None:
        await self._run(
            lambda: self._conn().execute(
                "INSERT OR REPLACE INTO queue VALUES (?, ?, ?)", (site, call_id, score)
            )
        )

    async def queue_remove(self, site: str, call_id: str) -> None:
        await self._run(
            lambda: self._conn().execute(
                "DELETE FROM queue WHERE site = ? AND call_id = ?", (site, call_id)
            )
        )

    def _queue_score(self, db: sqlite3.Connection, site: str, call_id: str) -> float | None:
        found = db.execute(
            "SELECT score FROM queue WHERE site = ? AND call_id = ?", (site, call_id)
        ).fetchone()
        return None if found is None else float(found[0])

    async def queue_rank(self, site: str, call_id: str) -> int | None:
        def rank() -> int | None:
            db = self._conn()
            score = self._queue_score(db, site, call_id)
            if score is None:
                return None
            (ahead,) = db.execute(
                "SELECT COUNT(*) FROM queue WHERE site = ?"
                " AND (score < ? OR (score = ? AND call_id < ?))",
                (site, score, score, call_id),
            ).fetchone()
            return int(ahead)

        return await self._run(rank)

    async def queue_ahead(self, site: str, call_id: str, limit: int) -> list[str] | None:
        def ahead() -> list[str] | None:
            db = self._conn()
            score = self._queue_score(db, site, call_id)
            if score is None:
                return None
            rows = db.execute(
                "SELECT call_id FROM queue WHERE site = ?"
                " AND (score < ? OR (score = ? AND call_id < ?))"
                " ORDER BY score, call_id LIMIT ?",
                (site, score, score, call_id, max(0, limit)),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._run(ahead)

    async def queue_size(self, site: str) -> int:
        found = await self._run(
            lambda: (
                self._conn()
                .execute("SELECT COUNT(*) FROM queue WHERE site = ?", (site,))
                .fetchone()
            )
        )
        return int(found[0])

    async def record_handle_time(self, site: str, seconds: float) -> None:
        def record() -> None:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT INTO handle_times (site, seconds) VALUES (?, ?)", (site, seconds)
                )
                db.execute(
                    "DELETE FROM handle_times WHERE site = ? AND id NOT IN"
                    " (SELECT id FROM handle_times WHERE site = ? ORDER BY id DESC LIMIT ?)",
                    (site, site, HANDLE_TIMES_KEPT),
                )

        await self._run(record)

    async def handle_times(self, site: str) -> list[float]:
        found = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT seconds FROM handle_times WHERE site = ? ORDER BY id DESC LIMIT ?",
                    (site, HANDLE_TIMES_KEPT),
                )
                .fetchall()
            )
        )
        return [float(r[0]) for r in found]
