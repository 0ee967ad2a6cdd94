"""Availability fan-out: one agent's presence change reaching every idle website widget.

One node (embedded store, or Redis with ``--redis``); W idle watchers each hold one SSE
stream ``GET /v1/sites/acme/availability/stream``. Each watcher is a bare ``asyncio.Protocol``
(no task, no client library) in ``--procs`` driver processes: one process reads 10,000
streams with ~0.2 of a core, and on a 2-core machine a second one mostly competes with the
node for CPU during each broadcast. Then the site's only agent, on one ``/agent`` socket,
goes available and away ``--changes`` times. For each change: the time from ``presence:set``
sent until each watcher has the new ``available`` value, and until the LAST watcher has it.
A probe hits ``/healthz`` every 10 ms (while the watchers connect, idle, and during the
changes): its worst response time bounds the node's longest event-loop stall. Memory per
idle watcher is the node's VmRSS with the watchers minus before them, divided by W.

    .venv/bin/python bench/availability_fanout.py --out bench/results/availability_fanout.json

A quick check: ``--watchers 1000 --changes 6``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.harness import (
    NodeProcess,
    RawSocketIO,
    add_runs_argument,
    cpu_per_unit,
    cpu_report,
    demo_site_config,
    gc_pause_report,
    gc_pauses,
    log_problems,
    raise_fd_limit,
    redis_server,
    repeat,
    sched,
    settle_rss,
    start_node,
    stop_node,
    summary_ms,
    token,
    write_json,
)
from bench.sse_client import SseClient

SCRIPT = str(Path(__file__).resolve())
STREAM_PATH = "/v1/sites/acme/availability/stream"
ORIGIN = "http://127.0.0.1:8080"

# --- the watchers (run in child processes) ---------------------------------------------------


class Watcher(SseClient):
    """One idle widget: notes when ``available`` flips, and when."""

    __slots__ = ("first", "flips", "last")

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.last: bool | None = None
        self.first = 0.0
        self.flips: list[tuple[float, bool]] = []

    def on_data(self, buf: bytes, start: int, end: int, now: float) -> None:
        available = buf.find(b'"available":true', start, end) >= 0
        if self.last is None:
            self.first = now
        elif available != self.last:
            self.flips.append((now, available))
        self.last = available


async def child(args: argparse.Namespace) -> None:
    """Open ``--watchers`` streams, say ``ready``, wait for ``stop`` on stdin, then print
    every watcher's flips as one JSON document and exit."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    host, port = args.url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"GET {STREAM_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Accept: text/event-stream\r\nOrigin: {ORIGIN}\r\n\r\n"
    ).encode()
    watchers: list[Watcher] = []
    failed = 0
    sem = asyncio.Semaphore(args.connect_concurrency)

    async def one() -> None:
        nonlocal failed
        async with sem:
            for attempt in range(3):
                w = Watcher(request)
                try:
                    await loop.create_connection(functools.partial(_same, w), host, int(port))
                    watchers.append(w)
                    return
                except OSError:
                    if attempt == 2:
                        failed += 1
                        return
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(one() for _ in range(args.watchers)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until every stream has its first frame, bounded
        if all(w.last is not None or w.lost or w.status not in (0, 200) for w in watchers):
            break
        await asyncio.sleep(0.1)
    ok = sum(1 for w in watchers if w.last is not None and not w.lost)
    print(f"ready {ok} {failed + len(watchers) - ok}", flush=True)
    try:
        line = await loop.run_in_executor(None, sys.stdin.readline)
    finally:
        lost = sum(1 for w in watchers if w.lost)
        for w in watchers:
            if w.transport is not None:
                w.transport.close()
    if line.strip() != "stop":
        return
    out = {
        "watchers": ok,
        "lost_during_run": lost,
        "flips": [
            [[round(t, 6), int(v)] for t, v in w.flips] for w in watchers if w.last is not None
        ],
    }
    sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# --- the parent: node, agent, probe, figures -------------------------------------------------


async def probe(url: str, stop: asyncio.Event, interval_s: float) -> list[float]:
    """GET /healthz every ``interval_s``; each response time (a stall shows as a slow one)."""
    samples: list[float] = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        while not stop.is_set():
            started = time.perf_counter()
            async with http.get(f"{url}/healthz") as r:
                await r.read()
            samples.append(time.perf_counter() - started)
            await asyncio.sleep(interval_s)
    return samples


async def spawn_watchers(
    args: argparse.Namespace, url: str, procs: list[asyncio.subprocess.Process]
) -> tuple[int, int]:
    """Start the watcher processes (into ``procs``, so the caller can always end them) and
    wait until each has its streams open; returns watchers connected and failed."""
    per = [
        args.watchers // args.procs + (i < args.watchers % args.procs) for i in range(args.procs)
    ]
    for n in per:
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                "--child",
                "--url",
                url,
                "--watchers",
                str(n),
                "--connect-concurrency",
                str(args.connect_concurrency),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    connected = failed = 0
    for p in procs:
        assert p.stdout is not None
        line = (await asyncio.wait_for(p.stdout.readline(), 300)).decode().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"a watcher process failed to start: {line}")
        connected += int(line[1])
        failed += int(line[2])
    return connected, failed


async def collect(procs: list[asyncio.subprocess.Process]) -> list[dict[str, Any]]:
    results = []
    for p in procs:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(b"stop\n")
        await p.stdin.drain()
    for p in procs:
        assert p.stdout is not None
        raw = await asyncio.wait_for(p.stdout.read(), 60)
        await p.wait()
        results.append(json.loads(raw))
    return results


def latencies(
    changes: list[tuple[float, bool]], results: list[dict[str, Any]]
) -> tuple[list[list[float]], int]:
    """Per change, each watcher's delay; a flip belongs to the latest change with its value
    sent before it. Returns the lists and the flips that matched no change."""
    starts = [t for t, _ in changes]
    per_change: list[list[float]] = [[] for _ in changes]
    unmatched = 0
    for result in results:
        for flips in result["flips"]:
            taken: set[int] = set()
            for t, v in flips:
                k = bisect.bisect_right(starts, t) - 1
                while k >= 0 and (changes[k][1] != bool(v) or k in taken):
                    k -= 1
                if k < 0:
                    unmatched += 1
                    continue
                taken.add(k)
                per_change[k].append(t - changes[k][0])
    return per_change, unmatched


async def measure(args: argparse.Namespace, node: NodeProcess) -> dict[str, Any]:
    pid = node.proc.pid
    http = aiohttp.ClientSession()
    agent = RawSocketIO(http, node.url, "/agent")
    procs: list[asyncio.subprocess.Process] = []
    try:
        await agent.connect({"token": token("a0"), "state": "away"})
        await asyncio.sleep(1.0)
        rss_before = await settle_rss(pid)
        print(f"node RSS {rss_before:.1f} MB; opening {args.watchers} streams", file=sys.stderr)
        started = time.perf_counter()
        stop = asyncio.Event()
        connect_probe_task = asyncio.create_task(probe(node.url, stop, args.probe_interval))
        try:
            connected, failed = await spawn_watchers(args, node.url, procs)
        finally:
            stop.set()
            connect_probe = await connect_probe_task
        connect_s = time.perf_counter() - started
        rss_after = await settle_rss(pid)
        print(
            f"{connected} streams in {connect_s:.1f} s (failed {failed}); "
            f"node RSS {rss_after:.1f} MB",
            file=sys.stderr,
            flush=True,
        )

        # The probe alone first: what a response takes on this machine with nothing changing.
        stop = asyncio.Event()
        idle_task = asyncio.create_task(probe(node.url, stop, args.probe_interval))
        await asyncio.sleep(args.idle_probe_s)
        stop.set()
        idle_probe = await idle_task

        pids = {"node": pid, "driver": os.getpid()}
        pids |= {f"watchers_{i}": p.pid for i, p in enumerate(procs)}
        gc_before = await gc_pauses(http, node.url)
        before = {name: sched(p) for name, p in pids.items()}
        stop = asyncio.Event()
        probe_task = asyncio.create_task(probe(node.url, stop, args.probe_interval))
        changes: list[tuple[float, bool]] = []
        print(f"{args.changes} changes, every {args.interval} s", file=sys.stderr, flush=True)
        run_started = time.perf_counter()
        for k in range(args.changes):
            available = k % 2 == 0
            state = "available" if available else "away"
            changes.append((time.monotonic(), available))
            await agent.emit("presence:set", {"kind": "desktop", "state": state})
            await asyncio.sleep(args.interval)
        elapsed = time.perf_counter() - run_started
        cpu = cpu_report(pids, before, elapsed)
        gc_report = gc_pause_report(gc_before, await gc_pauses(http, node.url))
        await asyncio.sleep(args.tail_s)  # the last change's stragglers
        stop.set()
        run_probe = await probe_task
        results = await collect(procs)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await agent.close()
        await http.close()

    per_change, unmatched = latencies(changes, results)
    watching = sum(r["watchers"] for r in results)
    rows = []
    last: list[float] = []
    for k, ((_, available), delays) in enumerate(zip(changes, per_change, strict=True)):
        s = summary_ms(delays)
        missed = watching - len(delays)
        if delays:
            last.append(max(delays))
        rows.append(
            {
                "change": k,
                "to": "available" if available else "away",
                "reached": len(delays),
                "missed": missed,
                "p50_ms": s.get("p50_ms"),
                "p99_ms": s.get("p99_ms"),
                "last_ms": s.get("max_ms"),
            }
        )
    all_delays = [d for delays in per_change for d in delays]
    last_summary = summary_ms(last)
    stall = summary_ms(run_probe)
    per_watcher_kb = (rss_after - rss_before) * 1024 / max(1, connected)
    missed_total = sum(r["missed"] for r in rows)
    return {
        "benchmark": "availability_fanout",
        "store": "redis" if args.redis else "embedded",
        "watchers_requested": args.watchers,
        "watchers_connected": connected,
        "watchers_failed": failed,
        "watchers_lost_during_run": sum(r["lost_during_run"] for r in results),
        "driver_processes": args.procs,
        "connect_s": round(connect_s, 1),
        "changes": args.changes,
        "interval_s": args.interval,
        "missed_deliveries": missed_total,
        "unmatched_flips": unmatched,
        "change_to_last_watcher_ms": last_summary,
        "change_to_each_watcher_ms": summary_ms(all_delays),
        "per_change": rows,
        "healthz_probe_during_changes_ms": stall,
        "healthz_probe_idle_ms": summary_ms(idle_probe),
        "healthz_probe_while_watchers_connect_ms": summary_ms(connect_probe),
        "event_loop_stall_upper_bound_ms": stall.get("max_ms"),
        "node_rss_mb": {
            "before_watchers": round(rss_before, 1),
            "with_watchers": round(rss_after, 1),
            "peak": round(node.peak_rss_mb(), 1),
        },
        "kb_per_idle_watcher": round(per_watcher_kb, 2),
        "cpu_during_changes": cpu,
        # The node's work is one delivery to each watcher for each change.
        "cpu_per_delivery": cpu_per_unit(
            cpu, args.changes * max(connected, 1) / cpu["elapsed_s"], "watcher delivery", ("node",)
        ),
        "gc_pauses_during_changes": gc_report,
        "targets": {
            "last_watcher_p99_le_250_ms": last_summary.get("p99_ms", math.inf) <= 250,
            "no_stall_over_50_ms": stall.get("max_ms", math.inf) <= 50,
            "le_16_kb_per_watcher": per_watcher_kb <= 16,
            "every_watcher_got_every_change": missed_total == 0 and connected == args.watchers,
        },
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    limit = raise_fd_limit()  # the node, started below, inherits it
    if args.watchers + 256 > limit:
        # Each stream is a descriptor in the node: past its limit the node refuses streams,
        # and the probe's connection with them, and the run measures that instead.
        capped = max(1, limit - 256)
        print(
            f"warning: the open-file limit is {limit}: {capped} watchers, not {args.watchers}",
            file=sys.stderr,
        )
        args.watchers = capped
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        work = Path(tmp)
        config = work / "bench.toml"
        config.write_text(demo_site_config(args.agents))
        async with contextlib.AsyncExitStack() as stack:
            redis_url = ""
            if args.redis:
                redis_url = await stack.enter_async_context(redis_server(work))
            node = await start_node(config, redis_url, work, "node")
            stack.push_async_callback(stop_node, node)
            try:
                return await measure(args, node)
            finally:
                problems = log_problems([node.log])
                print(json.dumps({"node_log_problems": problems}), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--watchers", type=int, default=10_000, help="idle SSE streams")
    parser.add_argument("--procs", type=int, default=1, help="driver processes for watchers")
    parser.add_argument("--changes", type=int, default=20, help="presence changes (alternating)")
    parser.add_argument("--interval", type=float, default=1.5, help="seconds between changes")
    parser.add_argument(
        "--tail-s", type=float, default=5.0, help="wait after the last change before stopping"
    )
    parser.add_argument("--agents", type=int, default=1, help="agents in the config (a0 acts)")
    parser.add_argument("--redis", action="store_true", help="Redis store instead of embedded")
    parser.add_argument("--probe-interval", type=float, default=0.01, help="healthz every (s)")
    parser.add_argument("--idle-probe-s", type=float, default=2.0, help="probe alone first (s)")
    parser.add_argument("--connect-concurrency", type=int, default=64, help="per process")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args))
        return
    write_json(
        args.out,
        repeat(
            args.runs,
            lambda: asyncio.run(run(args)),
            worst=lambda r: r["change_to_last_watcher_ms"].get("p99_ms", math.inf),
            headline=headline,
        ),
    )


def headline(result: dict[str, Any]) -> dict[str, Any]:
    last, cpu = result["change_to_last_watcher_ms"], result["cpu_per_delivery"]
    return {
        "watchers": result["watchers_connected"],
        "last_watcher_p50_ms": last.get("p50_ms"),
        "last_watcher_p99_ms": last.get("p99_ms"),
        "stall_max_ms": result["event_loop_stall_upper_bound_ms"],
        "kb_per_idle_watcher": result["kb_per_idle_watcher"],
        "node_cpu_us_per_delivery": round(cpu["node_cpu_ms_per_unit"] * 1000, 2),
        "cpu_cores_by_process": cpu["cpu_cores_by_process"],
        "saturated": cpu["saturated"],
        "missed": result["missed_deliveries"],
    }


def _same(protocol: Watcher) -> Watcher:
    """The protocol factory of one connection: its own watcher."""
    return protocol


if __name__ == "__main__":
    main()
