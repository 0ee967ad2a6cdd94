"""Call history that lasts (issue 15, its first part): every ended call is written off the
call path, with its agent, branch, times and survey answer, to SQLite on one node or to a
PostgreSQL database that nodes sharing Redis share; it survives a restart of every node; a
supervisor exports a day as CSV; the schema is migrated by version, once; and a history
that fails is written to again once it answers, never silently skipped."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import (
    POSTGRES_ADMIN_URL,
    NodeFactory,
    SocketClient,
    eventually,
    free_port,
    make_settings,
    mint,
    postgres_database,
    start_node,
)
from test_callbacks import agent, visitor_token
from test_surveys import answer, browser_call

from gateway.core.board_figures import FigureCount, ScoreCount
from gateway.core.call import Call, CallChannel, CallState
from gateway.core.errors import StoreUnavailable
from gateway.core.experiment_stats import ArmFigures
from gateway.core.history import HistoryRow
from gateway.core.model import Role
from gateway.edge.http import appkeys as keys
from gateway.services import history_writer
from gateway.services.history_retention import HistoryRetention
from gateway.services.history_writer import HistoryWriter
from gateway.store import history_process
from gateway.store.history import _READ_ROWS, MIGRATIONS, PostgresHistory, SqliteHistory
from gateway.store.history_process import WRITER_NICENESS, HistoryProcess

T0 = 1_800_000_000.0


def row(call_id: str, at: float = T0, score: int | None = None) -> HistoryRow:
    return HistoryRow(
        call_id, "acme", "webrtc", "completed", "visitor_hung_up", "anna", "dublin",
        at, at + 5, at + 65, score, "[]",
    )  # fmt: skip


async def test_the_schema_is_migrated_once_and_rows_outlive_the_database_connection(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.sqlite3"
    history = SqliteHistory(path)
    await history.start()
    assert await history.version() == len(MIGRATIONS)
    await history.put([row("c_1"), row("c_2", T0 + 86_400)])
    await history.put([row("c_1", score=9)])  # the answer after the end replaces the row
    await history.close()
    again = SqliteHistory(path)
    await again.start()  # nothing left to migrate: no error, the same version
    assert await again.version() == len(MIGRATIONS)
    assert await again.between("acme", T0, T0 + 86_400) == [row("c_1", score=9)]
    assert await again.between("globex", T0, T0 + 2 * 86_400) == []
    await again.close()


async def test_a_node_refuses_a_history_newer_than_it_knows(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    history = SqliteHistory(path)
    await history.start()
    await history.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 1,))
    newer = SqliteHistory(path)
    with pytest.raises(StoreUnavailable, match="newer than this node knows"):
        await newer.start()
    await newer.close()


class FlakyHistory:
    """A history that fails its first ``failures`` writes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.rows: dict[str, HistoryRow] = {}

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, rows: Sequence[HistoryRow]) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("down")
        self.rows.update({r.call_id: r for r in rows})

    async def between(self, site: str, start: float, end: float) -> list[HistoryRow]:
        return []

    async def figures(self, site: str, start: float, end: float, step_s: int) -> list[FigureCount]:
        return []

    async def scores(self, site: str, start: float, end: float) -> list[ScoreCount]:
        return []

    async def arms(self, site: str, experiment: str) -> dict[str, ArmFigures]:
        return {}

    async def delete_before(self, site: str, before: float, limit: int) -> int:
        return 0


def ended(call_id: str, score: int | None = None) -> Call:
    return Call(
        call_id,
        "acme",
        "v_1",
        CallChannel.WEBRTC,
        CallState.COMPLETED,
        T0,
        agent_id="anna",
        connected_at=T0 + 3,
        ended_at=T0 + 60,
        survey_score=score,
    )


async def test_a_failing_history_is_written_to_again_and_the_newest_version_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(history_writer, "BACKOFF_S", (0.01,))
    flaky = FlakyHistory(failures=3)
    writer = HistoryWriter(flaky, make_settings(Path("/nonexistent")).sites)
    live = Call("c_0", "acme", "v_1", CallChannel.WEBRTC, CallState.CONNECTED, T0)
    writer.changed(None, live)
    assert writer.pending == 0, "only ended calls are history"
    writer.changed(live, ended("c_1"))
    writer.changed(ended("c_1"), ended("c_1", score=10))
    task = asyncio.create_task(writer.run())

    async def written() -> bool:
        return "c_1" in flaky.rows

    await eventually(written, 5)
    task.cancel()
    assert flaky.rows["c_1"].survey_score == 10 and flaky.rows["c_1"].branch == "dublin"
    assert writer.failures == 3 and writer.pending == 0


class HangingHistory(FlakyHistory):
    async def put(self, rows: Sequence[HistoryRow]) -> None:
        await asyncio.Event().wait()


async def test_a_stopping_node_waits_for_a_hung_history_no_longer_than_its_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = HistoryWriter(HangingHistory(failures=0), make_settings(Path("/nonexistent")).sites)
    writer.opened.set()
    writer.changed(None, ended("c_1"))
    await asyncio.wait_for(writer.flush(0.3), 2)
    assert writer.pending == 1
    assert "1 calls not written before stopping" in caplog.text


async def test_more_calls_waiting_than_the_bound_drops_the_oldest_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(history_writer, "MAX_PENDING", 2)
    writer = HistoryWriter(FlakyHistory(failures=99), make_settings(Path("/nonexistent")).sites)
    for call_id in ("c_1", "c_2", "c_3"):
        writer.changed(None, ended(call_id))
    assert writer.pending == 2 and writer.dropped == 1
    assert "c_1 dropped" in caplog.text


async def test_ended_calls_outlive_a_restart_and_a_supervisor_exports_the_day(
    nodes: NodeFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    node = await nodes()
    started = await browser_call(clients, http, node, talk=True)
    call_id = started["call"]["call_id"]
    assert (await answer(http, node, started, {"score": 9}))[0] == 200
    await node.stop()  # writes what is pending as it stops

    again = await start_node(node.settings)
    await asyncio.wait_for(again.app[keys.HISTORY].opened.wait(), 10)
    try:
        day = datetime.now(UTC).date().isoformat()
        sam = {"Authorization": f"Bearer {mint(again.settings, 'sam', Role.SUPERVISOR)}"}
        url = f"{again.url}/v1/sites/acme/history.csv"
        async with http.get(url, params={"day": day}, headers=sam) as r:
            assert r.status == 200 and r.content_type == "text/csv"
            found = list(csv.DictReader(io.StringIO(await r.text())))
        [kept] = [c for c in found if c["call_id"] == call_id]
        assert (kept["channel"], kept["outcome"], kept["reason"]) == (
            "webrtc",
            "completed",
            "visitor_hung_up",
        )
        assert (kept["agent_id"], kept["branch"], kept["survey_score"]) == ("anna", "dublin", "9")
        assert float(kept["to_first_human_s"]) >= 0
        anna_token = {"Authorization": f"Bearer {mint(again.settings, 'anna')}"}
        async with http.get(url, params={"day": day}, headers=anna_token) as r:
            assert r.status == 403
        for bad in ("yesterday", "2026-13-01", ""):
            async with http.get(url, params={"day": bad}, headers=sam) as r:
                assert r.status == 400, bad
    finally:
        await again.stop()


async def test_nodes_share_a_postgresql_history_migrated_once_and_it_outlives_them_all(
    tmp_path: Path,
    redis_url: str,
    postgres_url: str,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Two nodes sharing Redis start at once on a new database (one migrates, the other
    waits for it), each ends a call, every node stops; new nodes read both calls back."""
    settings = make_settings(tmp_path, redis_url=redis_url, history_url=postgres_url)
    a, b = await asyncio.gather(start_node(settings), start_node(settings))
    nodes_up = [a, b]
    await asyncio.gather(*(n.app[keys.HISTORY].opened.wait() for n in nodes_up))
    try:
        ended_on = {}
        for node in (a, b):
            anna = await agent(clients, node, "anna")
            visitor = clients()
            await visitor.connect(node.url, "/visitor", {"token": await visitor_token(http, node)})
            started = await visitor.call("call:start", {"language": "en"}, "/visitor")
            call_id = started["call"]["call_id"]
            assert (await anna.call("call:accept", {"call_id": call_id}, "/agent"))["ok"]
            await anna.call("call:hangup", {"call_id": call_id}, "/agent")  # ended on `node`
            await visitor.next("call:update", lambda c: c["state"] == "completed")
            await visitor.close()
            await anna.close()
            ended_on[call_id] = node
    finally:
        for node in nodes_up:
            await node.stop()

    history = PostgresHistory(postgres_url)
    await history.start()
    assert await history.version() == len(MIGRATIONS)
    await history.close()
    again = [await start_node(settings), await start_node(settings)]
    for node in again:
        await asyncio.wait_for(node.app[keys.HISTORY].opened.wait(), 10)
    try:
        sam = {"Authorization": f"Bearer {mint(settings, 'sam', Role.SUPERVISOR)}"}
        day = datetime.now(UTC).date().isoformat()
        for node in again:
            async with http.get(
                f"{node.url}/v1/sites/acme/history.csv", params={"day": day}, headers=sam
            ) as r:
                assert r.status == 200
                rows = {c["call_id"]: c for c in csv.DictReader(io.StringIO(await r.text()))}
            assert set(rows) == set(ended_on)
            assert {c["reason"] for c in rows.values()} == {"agent_hung_up"}
            assert {c["agent_id"] for c in rows.values()} == {"anna"}
    finally:
        for node in again:
            await node.stop()


async def test_a_node_serves_while_its_history_database_is_down(
    nodes: NodeFactory, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """The history is no reason to refuse calls: the node starts, and its writer keeps
    trying; the export says the history cannot be reached."""
    node = await nodes(
        redis_url=redis_url, history_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    )

    async def ready() -> bool:
        async with http.get(f"{node.url}/readyz") as r:
            return r.status == 200

    # Ready as soon as its store is (the node's own pace under load), the history or not.
    await eventually(ready, 10)
    sam = {"Authorization": f"Bearer {mint(node.settings, 'sam', Role.SUPERVISOR)}"}
    async with http.get(
        f"{node.url}/v1/sites/acme/history.csv", params={"day": "2026-12-04"}, headers=sam
    ) as r:
        assert r.status == 503
        assert (await r.json())["error"]["code"] == "store_unavailable"
    assert not node.app[keys.HISTORY].opened.is_set()


async def test_nodes_sharing_redis_without_a_history_database_say_so(
    nodes: NodeFactory, redis_url: str, http: aiohttp.ClientSession
) -> None:
    node = await nodes(redis_url=redis_url)
    sam = {"Authorization": f"Bearer {mint(node.settings, 'sam', Role.SUPERVISOR)}"}
    async with http.get(
        f"{node.url}/v1/sites/acme/history.csv", params={"day": "2026-12-04"}, headers=sam
    ) as r:
        assert r.status == 503
        assert (await r.json())["error"]["code"] == "history_unavailable"


@pytest.fixture(params=["sqlite", "postgresql"])
async def history_db(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SqliteHistory | PostgresHistory]:
    async with contextlib.AsyncExitStack() as stack:
        history: SqliteHistory | PostgresHistory
        if request.param == "sqlite":
            history = SqliteHistory(tmp_path / "history.sqlite3")
        else:
            history = PostgresHistory(await stack.enter_async_context(postgres_database()))
        await history.start()
        stack.push_async_callback(history.close)
        yield history


async def test_the_boards_sums_count_each_call_once_however_often_it_is_written(
    history_db: SqliteHistory | PostgresHistory,
) -> None:
    await history_db.put([row("c_1"), row("c_2", T0 + 60)])
    await history_db.put([row("c_1", score=9)])  # its answer, after the end
    await history_db.put([row("c_2", T0 + 60, score=3), row("c_2", T0 + 60, score=4)])
    counts = await history_db.figures("acme", T0 // 60 * 60, T0 + 3600, 60)
    assert sum(c.count for c in counts) == 2
    assert {(c.slot, c.count) for c in counts} == {(0, 1), (1, 1)}
    scores = await history_db.scores("acme", T0 // 3600 * 3600, T0 + 3600)
    assert {(s.group.value, s.count) for s in scores} == {("promoter", 1), ("detractor", 1)}


async def test_each_site_keeps_its_history_for_its_own_days(
    history_db: SqliteHistory | PostgresHistory,
) -> None:
    now = T0 + 100 * 86_400
    old, recent = row("c_old", T0), row("c_recent", now - 86_400, score=10)
    globex_old = HistoryRow(
        "c_globex", "globex", "webrtc", "completed", None, "gus", None,
        T0, T0 + 5, T0 + 65, 2, "[]",
    )  # fmt: skip
    await history_db.put([old, recent, globex_old])
    settings = make_settings(Path("/nonexistent"))
    acme = dataclasses.replace(settings.sites["acme"], history_retention_days=30)
    globex = dataclasses.replace(acme, site_id="globex", history_retention_days=365)
    retention = HistoryRetention(history_db, {"acme": acme, "globex": globex}, lambda: now)
    assert await retention.sweep() == 1
    assert [r.call_id for r in await history_db.between("acme", 0, now)] == ["c_recent"]
    assert [r.call_id for r in await history_db.between("globex", 0, now)] == ["c_globex"]
    # The deleted call is off the board's sums too.
    counts = await history_db.figures("acme", T0 // 60 * 60, now, 86_400)
    assert sum(c.count for c in counts) == 1
    scores = await history_db.scores("acme", 0, now)
    assert [(s.group.value, s.count) for s in scores] == [("promoter", 1)]
    assert await retention.sweep() == 0


async def test_writing_a_batch_looks_up_each_of_its_calls_not_the_whole_history() -> None:
    """Keeping the sums exact reads the stored rows of each batch: a lookup of the key for
    each call, whatever PostgreSQL guesses of a table it has not analysed yet (a scan of
    the history for every batch grew with the history: 10 ms a batch at 60,000 calls)."""
    async with postgres_database() as url:
        history = PostgresHistory(url)
        await history.start()
        try:
            await history.put([row(f"c_{i:05d}", T0 + i) for i in range(20_000)])
        finally:
            await history.close()
        db = await asyncpg.connect(url)
        try:
            # As asyncpg runs it: a prepared statement, its plan made for any array.
            await db.execute("SET plan_cache_mode = force_generic_plan")
            wanted = [f"c_{i:05d}" for i in range(0, 20_000, 1000)] + ["c_unknown"]
            plan = "\n".join(r[0] for r in await db.fetch(f"EXPLAIN {_READ_ROWS}", wanted))
            found = await db.fetch(_READ_ROWS, wanted)
        finally:
            await db.close()
    assert "Index Scan using call_history_pkey" in plan, plan
    assert "Seq Scan on call_history" not in plan, plan
    assert sorted(r["call_id"] for r in found) == wanted[:-1]


async def test_a_nodes_writes_go_through_a_lower_priority_process_whose_death_or_hang_costs_a_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PostgreSQL history is written by a child process at a lower priority, so its CPU
    never competes with the call path's. Killed, stopped or hung, the child costs the batch in
    hand a retry (the node's writer keeps it meanwhile), and a new child writes it."""
    monkeypatch.setattr(history_process, "REPLY_TIMEOUT_S", 2.0)
    async with postgres_database() as url:
        history = PostgresHistory(url)
        await history.start()
        rows_sink = HistoryProcess(url)
        try:
            await rows_sink.put([row("c_1"), row("c_2", T0 + 1)])
            first = rows_sink.pid
            assert first is not None
            niceness = os.getpriority(os.PRIO_PROCESS, first)
            assert niceness == min(19, os.getpriority(os.PRIO_PROCESS, 0) + WRITER_NICENESS)
            # Ctrl-C's SIGINT reaches the whole process group; a node stopping still writes
            # through its child.
            os.kill(first, signal.SIGINT)
            os.kill(first, signal.SIGTERM)
            await rows_sink.put([row("c_2", T0 + 1, score=9)])
            assert rows_sink.pid == first and rows_sink.started == 1

            os.kill(first, signal.SIGKILL)
            with pytest.raises(StoreUnavailable):
                await rows_sink.put([row("c_3", T0 + 2)])
            await rows_sink.put([row("c_3", T0 + 2)])
            assert rows_sink.started == 2 and rows_sink.pid != first

            stopped = rows_sink.pid
            assert stopped is not None
            os.kill(stopped, signal.SIGSTOP)
            with pytest.raises(StoreUnavailable):
                await rows_sink.put([row("c_4", T0 + 3)])
            await rows_sink.put([row("c_4", T0 + 3)])
            assert rows_sink.started == 3

            # A batch cancelled in flight (a node stopping): that child goes, as its answer
            # would be read as the next batch's; the next batch has a new one.
            hung = rows_sink.pid
            assert hung is not None
            os.kill(hung, signal.SIGSTOP)
            cancelled = asyncio.create_task(rows_sink.put([row("c_4", T0 + 3, score=1)]))
            await asyncio.sleep(0)  # it runs until it waits for the answer
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await rows_sink.put([row("c_4", T0 + 3)])
            assert rows_sink.started == 4 and rows_sink.pid != hung

            stored = await history.between("acme", 0, T0 + 10)
            assert [(r.call_id, r.survey_score) for r in stored] == [
                ("c_1", None), ("c_2", 9), ("c_3", None), ("c_4", None),
            ]  # fmt: skip
            counts = await history.figures("acme", T0 // 60 * 60, T0 + 3600, 3600)
            assert sum(c.count for c in counts) == 4, "each call counted once"

            # A node's child goes when its stdin closes: it never outlives its node.
            child = rows_sink._process
            assert child is not None
            await rows_sink.close()
            assert child.returncode == 0
        finally:
            await rows_sink.close()
            await history.close()


async def test_a_writer_process_that_cannot_be_started_is_a_write_to_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_descriptors(*args: Any, **kwargs: Any) -> Any:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_descriptors)
    rows_sink = HistoryProcess("postgresql://nowhere/none")
    with pytest.raises(StoreUnavailable, match="Too many open files"):
        await rows_sink.put([row("c_1")])
    assert rows_sink.started == 0


async def test_the_history_process_answers_each_batch_with_why_the_database_refused_it() -> None:
    rows_sink = HistoryProcess(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/membrane_no_such_db")
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable, match="membrane_no_such_db"):
                await rows_sink.put([row("c_1")])
        assert rows_sink.started == 1, "a database down is an answer, not a dead child"
    finally:
        await rows_sink.close()
