"""Call history: 200 calls a second ending across two nodes, into PostgreSQL.

Three phases, each on fresh nodes and a private Redis:

1. **Without history** (``--pairs`` + 1 runs, first, last and between the runs of phase
   2: the spread of their p99s is the noise of a run): two nodes sharing Redis, the
   click-to-ring driver (bench/click_to_ring.py) starting ``--rate`` browser calls a second
   for ``--duration`` seconds; each is answered at once and hung up ``--hold-s`` later, so
   calls end at the same rate. The call path's figures: start-to-ring and start-to-ack.
2. **With history** (``--pairs`` runs): the same, the nodes writing every ended call to a
   PostgreSQL database of the bench's own (``server.history_url``). The p99 added to the
   call path is the mean of phase 2's p99s minus the mean of phase 1's; the history write
   lag (from a call's end until its row is committed) is read from the nodes'
   ``membrane_history_write_lag_seconds`` histogram, and every call must be in the
   database at the end.
3. **The board's query** (run first): a day of ``--day-calls`` calls (1,000,000) written to
   another database through the history's own write path, then
   ``GET /v1/sites/{site}/figures`` for the day (and the hour and week) asked of a node
   ``--queries`` times.

    .venv/bin/python bench/history.py --out bench/results/history.json

A quick check: ``--agents 300 --rate 50 --duration 10 --day-calls 20000 --pairs 1``.
PostgreSQL: ``--postgres`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``, as
``tests/postgres_server`` makes sure of); the bench creates and drops its databases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import asyncpg

from bench.click_to_ring import common_args, measure, node_report, two_nodes
from bench.harness import (
    NodeProcess,
    demo_site_config,
    repeat,
    start_node,
    stop_node,
    summary_ms,
    token,
    write_json,
)
from gateway.core.board_figures import Span, span_window
from gateway.core.history import HistoryRow
from gateway.store.history import PostgresHistory

POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextlib.asynccontextmanager
async def database(admin_url: str) -> AsyncIterator[str]:
    """A database of the bench's own, dropped afterwards."""
    name = f"membrane_bench_{os.getpid()}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def histogram(text: str, name: str) -> list[tuple[float, float]]:
    """A Prometheus histogram's cumulative buckets (upper bound, count), summed over its
    series, from a /metrics page."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            labels, value = line.rsplit(" ", 1)
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            le = math.inf if bound == "+Inf" else float(bound)
            buckets[le] = buckets.get(le, 0.0) + float(value)
    return sorted(buckets.items())


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """As Prometheus' histogram_quantile: linear within the bucket the rank falls in."""
    if not cumulative or cumulative[-1][1] == 0:
        return math.nan
    rank = q * cumulative[-1][1]
    low_bound, low_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return low_bound
            return low_bound + (bound - low_bound) * (rank - low_count) / max(count - low_count, 1)
        low_bound, low_count = bound, count
    return low_bound


async def write_lag(http: aiohttp.ClientSession, nodes: list[NodeProcess]) -> dict[str, Any]:
    cumulative: dict[float, float] = {}
    pending = 0.0
    for node in nodes:
        async with http.get(f"{node.url}/metrics") as r:
            text = await r.text()
        for le, count in histogram(text, "membrane_history_write_lag_seconds"):
            cumulative[le] = cumulative.get(le, 0.0) + count
        for line in text.splitlines():
            if line.startswith("membrane_history_pending "):
                pending += float(line.split()[1])
    series = sorted(cumulative.items())
    return {
        "rows_written": int(series[-1][1]) if series else 0,
        "p50_s": round(histogram_quantile(0.5, series), 4),
        "p99_s": round(histogram_quantile(0.99, series), 4),
        "max_bucket_s": next((le for le, c in series if c == series[-1][1]), math.nan),
        "pending_at_end": pending,
    }


async def database_backends(url: str) -> dict[str, int]:
    """The PostgreSQL server processes serving the nodes' connections to ``url``'s
    database (its CPU is part of what the history costs this machine)."""
    db = await asyncpg.connect(url)
    try:
        found = await db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
    finally:
        await db.close()
    return {f"postgres-{i}": int(r["pid"]) for i, r in enumerate(found)}


def history_writers(nodes: list[NodeProcess]) -> dict[str, int]:
    """Each node's history writer process (gateway/store/history_process.py): its CPU is
    part of what the history costs the machine, though not the call path."""
    found = {}
    for node in nodes:
        pid = node.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            with contextlib.suppress(OSError):
                if b"gateway.store.history_process" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found[f"writer-{node.log.stem}"] = int(child)
    return found


async def calls_phase(args: argparse.Namespace, history_url: str) -> dict[str, Any]:
    async with two_nodes(args, history_url) as (nodes, pids, _):
        if history_url:
            # Each node's pool and its writer's connect as the node starts; watched from the
            # first call on.
            deadline = time.monotonic() + 20

            async def connected() -> bool:
                backends = await database_backends(history_url)
                return len(history_writers(nodes)) == len(nodes) and len(backends) >= 2 * len(nodes)

            while not await connected() and time.monotonic() < deadline:  # noqa: ASYNC110 - processes
                await asyncio.sleep(0.2)
            pids |= history_writers(nodes) | await database_backends(history_url)
        try:
            result = await measure(args, nodes, pids)
            if history_url:
                async with aiohttp.ClientSession() as http:
                    # The last calls' rows: written within a second or two of the drain.
                    deadline = time.monotonic() + 30
                    lag = await write_lag(http, nodes)
                    while lag["pending_at_end"] and time.monotonic() < deadline:
                        await asyncio.sleep(0.5)
                        lag = await write_lag(http, nodes)
                db = await asyncpg.connect(history_url)
                try:
                    stored = await db.fetchval("SELECT COUNT(*) FROM call_history")
                    summed = int(
                        await db.fetchval("SELECT COALESCE(SUM(calls), 0) FROM call_minutes")
                    )
                finally:
                    await db.close()
                result["history"] = lag | {"rows_in_database": stored, "rows_in_sums": summed}
        finally:
            report = node_report(nodes)
        return result | report


def day_of_calls(n: int, start: float, seed: int = 15) -> list[HistoryRow]:
    """``n`` calls spread over the day from ``start``: most reached someone in seconds,
    some gave up or found nobody; callbacks and browser calls; some answered the question."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        created = start + rng.random() * 86_400
        reached = rng.random() < 0.88
        callback = rng.random() < 0.3
        outcome = "completed" if reached else rng.choice(("canceled", "failed"))
        agent = rng.randrange(200) if reached else None
        rows.append(
            HistoryRow(
                call_id=f"c_day_{i:09d}",
                site="acme",
                channel="callback" if callback else "webrtc",
                outcome=outcome,
                reason=None,
                agent_id=None if agent is None else f"a{agent}",
                branch=None if agent is None else ("dublin", "berlin", "online")[agent % 3],
                created_at=created,
                connected_at=created + rng.expovariate(1 / 15) if reached else None,
                ended_at=created + 240,
                survey_score=rng.randrange(11) if reached and rng.random() < 0.25 else None,
                timeline="[]",
                promised_at=created + 120 if callback else None,
                on_time=(rng.random() < 0.9) if callback and reached else None,
            )
        )
    return rows


async def board_phase(args: argparse.Namespace) -> dict[str, Any]:
    async with database(args.postgres) as url:
        history = PostgresHistory(url)
        await history.start()
        start, _ = span_window(Span.DAY, time.time())
        rows = day_of_calls(args.day_calls, start)
        began = time.perf_counter()
        for i in range(0, len(rows), 5000):
            await history.put(rows[i : i + 5000])
        fill_s = time.perf_counter() - began
        await history.close()
        db = await asyncpg.connect(url)
        try:
            await db.execute("VACUUM ANALYZE")
            sums = await db.fetchval("SELECT COUNT(*) FROM call_minutes")
        finally:
            await db.close()
        with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
            work = Path(tmp)
            config = work / "bench.toml"
            text = demo_site_config(10).replace("[server]\n", f'[server]\nhistory_url = "{url}"\n')
            config.write_text(text)
            node = await start_node(config, "", work, "node-board")
            try:
                headers = {"Authorization": f"Bearer {token('sup', 'supervisor')}"}
                times: dict[str, list[float]] = {"hour": [], "day": [], "week": []}
                async with aiohttp.ClientSession() as http:
                    for _ in range(args.queries):
                        for span in times:
                            t0 = time.perf_counter()
                            async with http.get(
                                f"{node.url}/v1/sites/acme/figures",
                                params={"span": span},
                                headers=headers,
                            ) as r:
                                body = await r.json()
                                assert r.status == 200, body
                            times[span].append(time.perf_counter() - t0)
                            if span == "day":
                                day_total = body["totals"]["requests"]
                            # A supervisor may ask 10 times a second (the REST limit).
                            await asyncio.sleep(0.12)
            finally:
                await stop_node(node)
    day = summary_ms(times["day"])
    return {
        "day_calls": args.day_calls,
        "fill_s": round(fill_s, 1),
        "fill_calls_per_s": round(args.day_calls / fill_s),
        "sum_rows": sums,
        "day_total_answered": day_total,
        "queries_each": args.queries,
        "figures_day_ms": day,
        "figures_hour_ms": summary_ms(times["hour"]),
        "figures_week_ms": summary_ms(times["week"]),
        "target": "figures for a day of 1,000,000 calls at most 500 ms",
        "meets_target": day.get("p99_ms", math.inf) <= 500 and day_total == args.day_calls,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    board = await board_phase(args)
    print(f"board: {board}", file=sys.stderr, flush=True)
    # Without and with, in turn, ending without: the runs without history give the noise of
    # a run (their spread), and taking turns cancels a drift of the machine's speed.
    without: list[dict[str, Any]] = [await calls_phase(args, "")]
    with_history: list[dict[str, Any]] = []
    for _ in range(args.pairs):
        async with database(args.postgres) as url:
            with_history.append(await calls_phase(args, url))
        without.append(await calls_phase(args, ""))

    def p99s(results: list[dict[str, Any]], key: str) -> list[float]:
        return [float(r[key].get("p99_ms", math.nan)) for r in results]

    ring_without, ring_with = (
        p99s(without, "start_to_ring_ms"),
        p99s(with_history, "start_to_ring_ms"),
    )
    added = statistics.mean(ring_with) - statistics.mean(ring_without)
    noise = max(ring_without) - min(ring_without)
    ack_added = statistics.mean(p99s(with_history, "start_to_ack_ms")) - statistics.mean(
        p99s(without, "start_to_ack_ms")
    )
    lags = [r.get("history", {}) for r in with_history]
    worst_lag = max(lags, key=lambda h: h.get("p99_s", math.inf))
    ended = [r["calls_completed"] for r in with_history]
    stored = [h.get("rows_in_database", 0) for h in lags]
    return {
        "benchmark": "history",
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "calls_ended_without": [r["calls_completed"] for r in without],
        "calls_ended_with": ended,
        "start_to_ring_p99_ms": {"without": ring_without, "with": ring_with},
        "p99_added_to_call_path_ms": round(added, 2),
        "noise_between_runs_without_ms": round(noise, 2),
        "start_to_ack_p99_added_ms": round(ack_added, 2),
        "node_cpu_ms_per_call": {
            "without": [r["cpu_per_call"]["node_cpu_ms_per_unit"] for r in without],
            "with": [r["cpu_per_call"]["node_cpu_ms_per_unit"] for r in with_history],
        },
        "database_cpu_cores": cores_of(with_history, "postgres-"),
        "history_writers_cpu_cores": cores_of(with_history, "writer-"),
        "history_write_lag": worst_lag,
        "history_by_run": lags,
        "board": board,
        "without_history": without,
        "with_history": with_history,
        "target": "added p99 within a run's noise; write lag p99 <= 1 s; day query <= 500 ms",
        "meets_target": (
            added <= max(noise, 1.0)
            and worst_lag.get("p99_s", math.inf) <= 1.0
            and all(s >= e for s, e in zip(stored, ended, strict=True))
            and board["meets_target"]
        ),
    }


def cores_of(results: list[dict[str, Any]], prefix: str) -> list[float]:
    """The cores the processes named ``prefix...`` used in each run."""
    return [
        round(
            sum(
                c
                for name, c in r["cpu_per_call"]["cpu_cores_by_process"].items()
                if name.startswith(prefix)
            ),
            3,
        )
        for r in results
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="calls a second")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of calling")
    parser.add_argument("--day-calls", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20, help="board queries per span")
    parser.add_argument("--postgres", default=POSTGRES, help="an admin URL of a server")
    parser.add_argument(
        "--pairs", type=int, default=2, help="runs with history, each followed by one without"
    )
    common_args(parser)
    parser.set_defaults(agents=1000, hold_s=1.0, runs=1)
    args = parser.parse_args()
    write_json(
        args.out,
        repeat(
            args.runs,
            lambda: asyncio.run(run(args)),
            worst=lambda r: r["history_write_lag"].get("p99_s", math.inf),
            headline=headline,
        ),
    )


def headline(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "p99_added_to_call_path_ms": result["p99_added_to_call_path_ms"],
        "noise_ms": result["noise_between_runs_without_ms"],
        "start_to_ring_p99_ms": result["start_to_ring_p99_ms"],
        "write_lag_p99_s": result["history_write_lag"].get("p99_s"),
        "rows": result["history_write_lag"].get("rows_in_database"),
        "calls_ended": result["calls_ended_with"],
        "database_cpu_cores": result["database_cpu_cores"],
        "history_writers_cpu_cores": result["history_writers_cpu_cores"],
        "board_day_p99_ms": result["board"]["figures_day_ms"].get("p99_ms"),
        "board_week_p99_ms": result["board"]["figures_week_ms"].get("p99_ms"),
    }


if __name__ == "__main__":
    main()
