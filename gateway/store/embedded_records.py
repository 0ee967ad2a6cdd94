"""The embedded store's durable records (calls, visits, handling times, the callback queue)
in SQLite; open calls in memory."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from gateway.store.base import HANDLE_TIMES_KEPT, CallRow
from gateway.store.embedded_common import EmbeddedParts


class EmbeddedRecords(EmbeddedParts):
    def _open_records(self) -> None:
        self._open_calls: dict[tuple[str, str], str] = {}

    async def put_call(self, row: CallRow) -> bool:
        data = json.dumps(row.data, separators=(",", ":"))

        def write() -> bool:
            db = self._conn()
            if row.version == 1:
                cur = db.execute(
                    "INSERT OR IGNORE INTO calls VALUES (?, ?, 1, ?, ?)",
                    (row.call_id, row.site, data, self._clock()),
                )
            else:
                cur = db.execute(
                    "UPDATE calls SET version = ?, data = ?, updated_at = ?"
                    " WHERE call_id = ? AND version = ?",
                    (row.version, data, self._clock(), row.call_id, row.version - 1),
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

    async def calls_unchanged_since(self, site: str, before: float, limit: int) -> list[CallRow]:
        def read() -> list[tuple[str, str, int, str]]:
            return (
                self._conn()
                .execute(
                    "SELECT call_id, site, version, data FROM calls"
                    " WHERE site = ? AND updated_at < ? ORDER BY updated_at LIMIT ?",
                    (site, before, limit),
                )
                .fetchall()
            )

        return [CallRow(c, s, v, json.loads(d)) for c, s, v, d in await self._run(read)]

    async def delete_call(self, row: CallRow) -> bool:
        def delete() -> bool:
            cur = self._conn().execute(
                "DELETE FROM calls WHERE call_id = ? AND version = ?", (row.call_id, row.version)
            )
            return cur.rowcount == 1

        return await self._run(delete)

    async def record_served(self, site: str, visitor_id: str, agent_id: str) -> None:
        await self._run(
            lambda: self._conn().execute(
                "INSERT OR REPLACE INTO visits VALUES (?, ?, ?, ?)",
                (site, visitor_id, agent_id, self._clock()),
            )
        )

    async def set_open_call(self, site: str, visitor_id: str, call_id: str) -> None:
        self._open_calls[(site, visitor_id)] = call_id

    async def open_call(self, site: str, visitor_id: str) -> str | None:
        return self._open_calls.get((site, visitor_id))

    async def open_call_row(self, site: str, visitor_id: str) -> CallRow | None:
        call_id = self._open_calls.get((site, visitor_id))
        return None if call_id is None else await self.get_call(call_id)

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

    # --- the callback queue and handling times -------------------------------------------

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

    async def queue_count_before(self, site: str, score: float) -> int:
        found = await self._run(
            lambda: (
                self._conn()
                .execute("SELECT COUNT(*) FROM queue WHERE site = ? AND score < ?", (site, score))
                .fetchone()
            )
        )
        return int(found[0])

    async def queue_head(self, site: str, limit: int) -> list[str]:
        found = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT call_id FROM queue WHERE site = ? ORDER BY score, call_id LIMIT ?",
                    (site, limit),
                )
                .fetchall()
            )
        )
        return [str(r[0]) for r in found]

    async def replace_experiment(self, site: str, expected: str | None, data: str) -> bool:
        def replace() -> bool:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                found = db.execute("SELECT data FROM experiments WHERE site = ?", (site,))
                row = found.fetchone()
                if (None if row is None else str(row[0])) != expected:
                    return False
                db.execute("INSERT OR REPLACE INTO experiments VALUES (?, ?)", (site, data))
                return True

        return await self._run(replace)

    async def experiment(self, site: str) -> str | None:
        found = await self._run(
            lambda: (
                self._conn()
                .execute("SELECT data FROM experiments WHERE site = ?", (site,))
                .fetchone()
            )
        )
        return None if found is None else str(found[0])

    async def set_text_opt_out(self, site: str, number: str, opted_out: bool) -> None:
        sql = (
            "INSERT OR IGNORE INTO text_opt_outs VALUES (?, ?)"
            if opted_out
            else "DELETE FROM text_opt_outs WHERE site = ? AND number = ?"
        )
        await self._run(lambda: self._conn().execute(sql, (site, number)))

    async def text_opted_out(self, site: str, number: str) -> bool:
        found = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT 1 FROM text_opt_outs WHERE site = ? AND number = ?", (site, number)
                )
                .fetchone()
            )
        )
        return found is not None

    async def set_survey_asked(
        self, site: str, number: str, call_id: str, now: float, ttl_s: float
    ) -> None:
        expires = now + ttl_s
        await self._run(
            lambda: self._conn().execute(
                "INSERT OR REPLACE INTO survey_asked VALUES (?, ?, ?, ?)",
                (site, number, call_id, expires),
            )
        )

    async def survey_asked(self, site: str, number: str, now: float) -> str | None:
        found = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT call_id FROM survey_asked"
                    " WHERE site = ? AND number = ? AND expires_at > ?",
                    (site, number, now),
                )
                .fetchone()
            )
        )
        return None if found is None else str(found[0])

    async def clear_survey_asked(self, site: str, number: str, call_id: str) -> None:
        await self._run(
            lambda: self._conn().execute(
                "DELETE FROM survey_asked WHERE site = ? AND number = ? AND call_id = ?",
                (site, number, call_id),
            )
        )

    async def add_to_tally(self, site: str, subjects: Sequence[str], group: str) -> None:
        def add() -> None:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                for subject in subjects:
                    db.execute(
                        "INSERT INTO survey_tallies VALUES (?, ?, ?, 1) ON CONFLICT"
                        " (site, subject, grp) DO UPDATE SET count = count + 1",
                        (site, subject, group),
                    )

        await self._run(add)

    async def tallies(self, site: str) -> dict[str, dict[str, int]]:
        rows = await self._run(
            lambda: (
                self._conn()
                .execute("SELECT subject, grp, count FROM survey_tallies WHERE site = ?", (site,))
                .fetchall()
            )
        )
        found: dict[str, dict[str, int]] = {}
        for subject, group, count in rows:
            found.setdefault(subject, {})[group] = int(count)
        return found

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
