"""The embedded store's coordination: reservations and rate-limit hits in memory (one node),
timers, quotas, slots, counters and claims in SQLite (a restart resets no limit)."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.store.base import Quota
from gateway.store.coordination import NamedCoordination
from gateway.store.embedded_common import EmbeddedParts


class EmbeddedCoordination(EmbeddedParts, NamedCoordination):
    def _open_coordination(self) -> None:
        self._reservations: dict[tuple[str, str], tuple[str, float]] = {}
        self._windows: dict[str, tuple[int, int]] = {}
        # The earliest due timer, so that polling touches SQLite only when one is due.
        self._next_due = float("inf")

    # --- coordination (one node: plain memory, timers in SQLite) ------------------------------

    async def reserve_agent(self, site: str, agent_id: str, call_id: str, ttl_s: float) -> bool:
        now = self._clock()
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
        if held is None or held[0] != call_id or held[1] <= self._clock():
            return False
        self._reservations[(site, agent_id)] = (call_id, self._clock() + ttl_s)
        return True

    async def release_agent(self, site: str, agent_id: str, call_id: str) -> None:
        held = self._reservations.get((site, agent_id))
        if held is not None and held[0] == call_id:
            del self._reservations[(site, agent_id)]

    async def schedule_timer(self, timer_id: str, due: float, keep: bool = False) -> None:
        verb = "INSERT OR IGNORE" if keep else "INSERT OR REPLACE"
        await self._run(
            lambda: self._conn().execute(f"{verb} INTO timers VALUES (?, ?)", (timer_id, due))
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

    async def slot_holders(self, key: str, now: float) -> list[str]:
        def holders() -> list[str]:
            rows = self._conn().execute(
                "SELECT holder FROM slots WHERE key = ? AND expires_at > ? ORDER BY expires_at",
                (key, now),
            )
            return [holder for (holder,) in rows]

        return await self._run(holders)

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
