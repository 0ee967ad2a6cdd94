"""Ticket pages: many customers' ticket pages open on one node while callbacks change.

Two nodes share a Redis. ``--tickets`` scheduled callbacks are written to the store (as a
node would write them, each with its status token). A driver process opens one ticket
stream (``GET /v1/calls/{id}/stream?token=``, what the ticket page holds open) per callback
on node A, each a bare ``asyncio.Protocol``. Then the parent moves ``--rate`` callbacks a
second on node B (``POST /v1/calls/{id}/move``, a real change through the real path: the
call's record, socket.io's Redis manager to node A, node A reading the view once and
writing it to the call's page). For each move: the time from the request sent until the
page has a frame showing the new time. Memory per open page is node A's VmRSS with the
pages minus before them, divided by their number; CPU per change is node A's (it delivers)
and node B's (it changes).

    .venv/bin/python bench/ticket_watch.py --out bench/results/ticket_watch.json

A quick check: ``--tickets 1000 --rate 50 --duration 5 --runs 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.harness import (
    NodeProcess,
    add_runs_argument,
    cpu_per_unit,
    cpu_report,
    demo_site_config,
    gc_pause_report,
    gc_pauses,
    log_problems,
    raise_fd_limit,
    redis_pid,
    redis_server,
    repeat,
    sched,
    settle_rss,
    start_node,
    stop_node,
    summary_ms,
    write_json,
)
from bench.sse_client import SseClient
from gateway.core import callback as cb
from gateway.core.call import CallRequest
from gateway.services.status_token import hash_token
from gateway.store.base import CallRow
from gateway.store.redis import RedisStore
from gateway.wire.codec import call_to_record

SCRIPT = str(Path(__file__).resolve())
CUSTOMER = "+353861110001"  # Irish: 12:00 UTC is mid-day at the number, never quiet hours

# --- the pages (run in a child process) ------------------------------------------------------


class Page(SseClient):
    """One open ticket page: notes each ``scheduled_at`` it is shown, and when."""

    __slots__ = ("seen",)

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.seen: list[tuple[float, str]] = []

    def on_data(self, buf: bytes, start: int, end: int, now: float) -> None:
        k = buf.find(b'"scheduled_at":"', start, end)
        if k >= 0:
            k += len(b'"scheduled_at":"')
            at = buf[k : buf.index(b'"', k)].decode()
            if not self.seen or self.seen[-1][1] != at:
                self.seen.append((now, at))


async def child(args: argparse.Namespace, tickets: list[list[str]]) -> None:
    """Open one stream per ``call_id token`` line of ``--tickets-file``, say ``ready``, wait
    for ``stop`` on stdin, then print what each page was shown as one JSON document."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    host, port = args.url.removeprefix("http://").rsplit(":", 1)
    pages: dict[str, Page] = {}
    failed = 0
    sem = asyncio.Semaphore(args.connect_concurrency)

    async def one(call_id: str, token: str) -> None:
        nonlocal failed
        request = (
            f"GET /v1/calls/{call_id}/stream?token={token} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        async with sem:
            for attempt in range(3):
                page = Page(request)
                try:
                    await loop.create_connection(lambda p=page: p, host, int(port))  # type: ignore[misc]
                    pages[call_id] = page
                    return
                except OSError:
                    if attempt == 2:
                        failed += 1
                        return
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(one(c, t) for c, t in tickets))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until every page shows its ticket, bounded
        if all(p.seen or p.lost or p.status not in (0, 200) for p in pages.values()):
            break
        await asyncio.sleep(0.1)
    ok = sum(1 for p in pages.values() if p.seen and not p.lost)
    print(f"ready {ok} {failed + len(pages) - ok}", flush=True)
    try:
        line = await loop.run_in_executor(None, sys.stdin.readline)
    finally:
        lost = sum(1 for p in pages.values() if p.lost)
        for p in pages.values():
            if p.transport is not None:
                p.transport.close()
    if line.strip() != "stop":
        return
    out = {
        "pages": ok,
        "lost_during_run": lost,
        "seen": {c: [[round(t, 6), at] for t, at in p.seen] for c, p in pages.items()},
    }
    sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# --- the parent ------------------------------------------------------------------------------


def slot_times() -> tuple[float, float]:
    """Two bookable times tomorrow at mid-day UTC, which every move alternates between."""
    noon = (datetime.now(UTC) + timedelta(days=1)).replace(
        hour=12, minute=0, second=0, microsecond=0
    )
    return noon.timestamp(), (noon + timedelta(minutes=15)).timestamp()


async def seed(redis_url: str, count: int, at: float) -> list[tuple[str, str]]:
    """``count`` scheduled callbacks, written as a node writes them; (call id, token)."""
    store = RedisStore(redis_url, "bench-seed")
    tickets: list[tuple[str, str]] = []
    now = time.time()
    try:
        for i in range(count):
            call_id, token = f"c_{secrets.token_hex(16)}", secrets.token_urlsafe(24)
            call = cb.new_callback(
                call_id, "acme", f"v_bench{i}", CUSTOMER, hash_token(token),
                CallRequest(language="en"), now, at, now,
            )  # fmt: skip
            await store.put_call(CallRow(call_id, "acme", 1, call_to_record(call)))
            tickets.append((call_id, token))
    finally:
        await store.close()
    return tickets


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


async def move_all(
    http: aiohttp.ClientSession,
    url: str,
    tickets: list[tuple[str, str]],
    times: tuple[float, float],
    rate: float,
    duration: float,
) -> tuple[list[tuple[str, float, float]], int]:
    """Move ``rate`` callbacks a second for ``duration`` s, round-robin, each to the other of
    ``times``; returns (call id, sent at, moved to) per move answered 200, and the failures."""
    moves: list[tuple[str, float, float]] = []
    failures = 0
    where = {c: times[0] for c, _ in tickets}
    tasks: set[asyncio.Task[None]] = set()

    async def move(call_id: str, token: str, to: float) -> None:
        nonlocal failures
        sent = time.monotonic()
        async with http.post(
            f"{url}/v1/calls/{call_id}/move", params={"token": token}, json={"at": iso(to)}
        ) as r:
            await r.read()
            if r.status == 200:
                moves.append((call_id, sent, to))
            else:
                failures += 1

    total = int(rate * duration)
    started = time.monotonic()
    for k in range(total):
        due = started + k / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        call_id, token = tickets[k % len(tickets)]
        to = times[1] if where[call_id] == times[0] else times[0]
        where[call_id] = to
        task = asyncio.create_task(move(call_id, token, to))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return moves, failures


def delays(moves: list[tuple[str, float, float]], seen: dict[str, Any]) -> tuple[list[float], int]:
    """For each move, sent until its page first showed the new time after it was sent."""
    shown: dict[str, list[tuple[float, float]]] = {
        c: [(t, datetime.fromisoformat(at).timestamp()) for t, at in frames]
        for c, frames in seen.items()
    }
    out: list[float] = []
    missed = 0
    for call_id, sent, to in moves:
        hit = next(
            (t for t, at in shown.get(call_id, ()) if t >= sent and abs(at - to) < 0.5), None
        )
        if hit is None:
            missed += 1
        else:
            out.append(hit - sent)
    return out, missed


async def measure(args: argparse.Namespace, a: NodeProcess, b: NodeProcess, redis: str) -> Any:
    times = slot_times()
    tickets = await seed(redis, args.tickets, times[0])
    work = Path(a.log).parent
    tickets_file = work / "tickets.txt"
    tickets_file.write_text("".join(f"{c} {t}\n" for c, t in tickets))
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    proc: asyncio.subprocess.Process | None = None
    try:
        rss_before = await settle_rss(a.proc.pid)
        print(f"node A RSS {rss_before:.1f} MB; opening {len(tickets)} pages", file=sys.stderr)
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, "--child", "--url", a.url,
            "--tickets-file", str(tickets_file),
            "--connect-concurrency", str(args.connect_concurrency),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 600)).decode().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"the page process failed to start: {line}")
        opened, failed = int(line[1]), int(line[2])
        connect_s = time.perf_counter() - started
        rss_after = await settle_rss(a.proc.pid)
        print(
            f"{opened} pages in {connect_s:.1f} s (failed {failed}); node A RSS "
            f"{rss_after:.1f} MB; moving {args.rate}/s for {args.duration} s",
            file=sys.stderr,
            flush=True,
        )
        pids = {"node-a": a.proc.pid, "node-b": b.proc.pid, "redis": await redis_pid(redis)}
        pids |= {"driver": os.getpid(), "pages": proc.pid}
        gc_before = await gc_pauses(http, a.url)
        before = {name: sched(p) for name, p in pids.items()}
        run_started = time.perf_counter()
        moves, move_failures = await move_all(http, b.url, tickets, times, args.rate, args.duration)
        elapsed = time.perf_counter() - run_started
        cpu = cpu_report(pids, before, elapsed)
        gc_report = gc_pause_report(gc_before, await gc_pauses(http, a.url))
        await asyncio.sleep(args.tail_s)  # the last moves' pages
        proc.stdin.write(b"stop\n")
        await proc.stdin.drain()
        result = json.loads(await asyncio.wait_for(proc.stdout.read(), 120))
        await proc.wait()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await http.close()

    shown, missed = delays(moves, result["seen"])
    latency = summary_ms(shown)
    kb_per_page = (rss_after - rss_before) * 1024 / max(1, opened)
    return {
        "benchmark": "ticket_watch",
        "pages_requested": args.tickets,
        "pages_open": opened,
        "pages_failed": failed,
        "pages_lost_during_run": result["lost_during_run"],
        "connect_s": round(connect_s, 1),
        "moves_per_s_asked": args.rate,
        "moves_answered": len(moves),
        "moves_refused": move_failures,
        "moves_per_s": round(len(moves) / elapsed, 1),
        "moves_never_shown": missed,
        "change_to_page_ms": latency,
        "node_a_rss_mb": {
            "before_pages": round(rss_before, 1),
            "with_pages": round(rss_after, 1),
            "peak": round(a.peak_rss_mb(), 1),
        },
        "kb_per_open_page": round(kb_per_page, 2),
        "cpu_while_moving": cpu,
        "cpu_per_change": cpu_per_unit(
            cpu, len(moves) / cpu["elapsed_s"], "ticket change shown", ("node-a", "node-b")
        ),
        "gc_pauses_on_node_a": gc_report,
        "targets": {
            "p99_le_250_ms": latency.get("p99_ms", math.inf) <= 250,
            "le_16_kb_per_page": kb_per_page <= 16,
            "every_move_shown": missed == 0 and move_failures == 0,
        },
        "meets_target": latency.get("p99_ms", math.inf) <= 250
        and kb_per_page <= 16
        and missed == 0
        and move_failures == 0
        and opened == args.tickets,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    limit = raise_fd_limit()  # the nodes, started below, inherit it
    if args.tickets + 256 > limit:
        print(f"warning: the open-file limit is {limit}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        work = Path(tmp)
        config = work / "bench.toml"
        config.write_text(demo_site_config(1))
        async with contextlib.AsyncExitStack() as stack:
            redis = await stack.enter_async_context(redis_server(work))
            a = await start_node(config, redis, work, "node-a")
            stack.push_async_callback(stop_node, a)
            b = await start_node(config, redis, work, "node-b")
            stack.push_async_callback(stop_node, b)
            try:
                result: dict[str, Any] = await measure(args, a, b, redis)
                return result
            finally:
                problems = log_problems([a.log, b.log])
                print(json.dumps({"node_log_problems": problems}), file=sys.stderr)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    latency, cpu = result["change_to_page_ms"], result["cpu_per_change"]
    return {
        "pages": result["pages_open"],
        "moves_per_s": result["moves_per_s"],
        "p50_ms": latency.get("p50_ms"),
        "p99_ms": latency.get("p99_ms"),
        "kb_per_open_page": result["kb_per_open_page"],
        "node_cpu_ms_per_change": cpu["node_cpu_ms_per_unit"],
        "cpu_ms_per_change_by_process": cpu["cpu_ms_per_unit_by_process"],
        "saturated": cpu["saturated"],
        "never_shown": result["moves_never_shown"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tickets", type=int, default=10_000, help="open ticket pages")
    parser.add_argument("--rate", type=float, default=200, help="callbacks moved a second")
    parser.add_argument("--duration", type=float, default=30, help="seconds of moving")
    parser.add_argument("--tail-s", type=float, default=3.0, help="wait after the last move")
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--tickets-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tickets = [line.split() for line in Path(args.tickets_file).read_text().splitlines()]
        asyncio.run(child(args, tickets))
        return
    write_json(
        args.out,
        repeat(
            args.runs,
            lambda: asyncio.run(run(args)),
            worst=lambda r: r["change_to_page_ms"].get("p99_ms", math.inf),
            headline=headline,
        ),
    )


if __name__ == "__main__":
    main()
