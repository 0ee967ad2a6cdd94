"""Click to ring: browser calls routed to thousands of online agents on two nodes.

N agents are online, their sockets split over two nodes sharing Redis (each socket is a
desktop device, available). Visitor sockets, also split over both nodes, send ``call:start``
at a steady rate; each simulated agent accepts a ``call:ring`` at once and hangs up after a
short call. Reports the time from ``call:start`` sent to ``call:ring`` received at the
agent, the calls routed per second, start acks that failed (nobody free), refusals, and
double bookings: a ``call:ring`` reaching an agent that is still ringing for or talking on
another call (which must never happen).

The gateway lets one visitor start 5 calls a minute (a fixed window) and have one open call:
each visitor socket of the pool is reused at most every ``--reuse-s`` seconds (15 s: at most
4 starts a window), so the pool holds ``rate * reuse_s`` visitors (3,000 at 200/s).

    .venv/bin/python bench/click_to_ring.py --out bench/results/click_to_ring.json

A quick check: ``--agents 500 --rate 50 --duration 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import redis.asyncio as aioredis

from bench.harness import (
    NodeProcess,
    RawSocketIO,
    cpu_report,
    demo_site_config,
    gc_pause_report,
    gc_pauses,
    log_problems,
    redis_server,
    sched,
    start_node,
    stop_node,
    summary_ms,
    token,
    write_json,
)
from gateway.gc_pacer import CollectorPacer

FINAL = frozenset({"completed", "failed", "canceled"})


class AckSocketIO(RawSocketIO):
    """RawSocketIO plus acks: ``emit_ack`` numbers the packet and the answer (``43``) goes
    to the callback given."""

    def __init__(self, http: aiohttp.ClientSession, url: str, namespace: str) -> None:
        super().__init__(http, url, namespace)
        self._acks: dict[int, Callable[[Any], None]] = {}
        self._ack_id = 0

    async def emit_ack(self, event: str, payload: Any, on_ack: Callable[[Any], None]) -> None:
        assert self._ws is not None
        self._ack_id += 1
        self._acks[self._ack_id] = on_ack
        await self._ws.send_str(f"42{self._ns},{self._ack_id}" + json.dumps([event, payload]))

    async def _read(self) -> None:
        assert self._ws is not None
        event_prefix = f"42{self._ns},"
        ack_prefix = f"43{self._ns},"
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data: str = msg.data
            if data == "2":
                await self._ws.send_str("3")
            elif data.startswith(event_prefix):
                if self.on_event is not None:
                    event, payload = json.loads(data[len(event_prefix) :])[:2]
                    self.on_event(event, payload)
            elif data.startswith(ack_prefix):
                rest = data[len(ack_prefix) :]
                bracket = rest.index("[")
                callback = self._acks.pop(int(rest[:bracket]), None)
                if callback is not None:
                    callback(json.loads(rest[bracket:])[0])


class SimAgent:
    __slots__ = ("agent_id", "client", "open_calls")

    def __init__(self, agent_id: str, client: RawSocketIO) -> None:
        self.agent_id = agent_id
        self.client = client
        self.open_calls: set[str] = set()


class SimVisitor:
    __slots__ = ("busy", "call_id", "client", "next_ok", "rung", "sent_at", "visitor_id")

    def __init__(self, visitor_id: str, client: AckSocketIO) -> None:
        self.visitor_id = visitor_id
        self.client = client
        self.busy = False  # a start sent and its call not yet known to be over
        self.sent_at = 0.0
        self.rung = False
        self.call_id: str | None = None
        self.next_ok = 0.0  # not before this (the per-visitor start limit)


class Stats:
    def __init__(self) -> None:
        self.start_to_ring: list[float] = []
        self.start_to_ack: list[float] = []
        self.ack_states: Counter[str] = Counter()
        self.failed_reasons: Counter[str] = Counter()
        self.visitor_errors: Counter[str] = Counter()
        self.agent_errors: Counter[str] = Counter()
        self.rings = 0  # every call:ring (a re-ring after a timeout counts again)
        self.first_rings = 0
        self.first_rings_in_window = 0
        self.double_bookings = 0
        self.double_booking_examples: list[dict[str, Any]] = []
        self.ring_stops: Counter[str] = Counter()
        self.completed = 0
        self.hangups_sent = 0
        self.accepts_sent = 0
        self.unknown_rings = 0


async def connect_all(
    factory: Callable[[int], tuple[RawSocketIO, dict[str, Any]]], count: int, concurrency: int
) -> list[RawSocketIO]:
    sem = asyncio.Semaphore(concurrency)
    clients: list[RawSocketIO | None] = [None] * count

    async def one(i: int) -> None:
        client, auth = factory(i)
        async with sem:
            for attempt in range(3):
                try:
                    await client.connect(auth)
                    clients[i] = client
                    return
                except (aiohttp.ClientError, OSError, RuntimeError):
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(one(i) for i in range(count)))
    return [c for c in clients if c is not None]


async def wait_available(http: aiohttp.ClientSession, urls: list[str], agents: int) -> float:
    """Until every node reports all agents available (bounded); returns seconds waited."""
    started = time.perf_counter()
    deadline = started + 120
    while time.perf_counter() < deadline:
        seen = []
        for url in urls:
            async with http.get(f"{url}/v1/sites/acme/availability") as r:
                seen.append((await r.json())["agents_available"])
        if all(n >= agents for n in seen):
            return time.perf_counter() - started
        await asyncio.sleep(0.5)
    raise RuntimeError(f"agents never all available on every node: {seen}")


async def measure(
    args: argparse.Namespace, nodes: list[NodeProcess], pids: dict[str, int]
) -> dict[str, Any]:
    urls = [n.url for n in nodes]
    stats = Stats()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    agents: dict[str, SimAgent] = {}
    visitors: dict[str, SimVisitor] = {}
    free: deque[SimVisitor] = deque()
    accepts: asyncio.Queue[tuple[SimAgent, str] | None] = asyncio.Queue()
    hangups: deque[tuple[float, SimAgent, str]] = deque()
    window = {"start": math.inf, "end": math.inf}
    clients: list[RawSocketIO] = []
    workers: list[asyncio.Task[None]] = []
    pacer: CollectorPacer | None = None

    def agent_handler(agent: SimAgent) -> Callable[[str, Any], None]:
        def on_event(event: str, p: Any) -> None:
            if event == "call:ring":
                now = time.perf_counter()
                call_id = p["call_id"]
                stats.rings += 1
                if agent.open_calls - {call_id}:
                    stats.double_bookings += 1
                    if len(stats.double_booking_examples) < 5:
                        stats.double_booking_examples.append(
                            {
                                "agent": agent.agent_id,
                                "ringing_for": call_id,
                                "already_on": sorted(agent.open_calls),
                            }
                        )
                agent.open_calls.add(call_id)
                v = visitors.get(p["visitor"]["id"])
                if v is None:
                    stats.unknown_rings += 1
                elif not v.rung:
                    v.rung = True
                    stats.first_rings += 1
                    stats.start_to_ring.append(now - v.sent_at)
                    if window["start"] <= v.sent_at < window["end"]:
                        stats.first_rings_in_window += 1
                accepts.put_nowait((agent, call_id))
            elif event == "call:ring_stop":
                stats.ring_stops[p["reason"]] += 1
                if p["reason"] != "answered":
                    agent.open_calls.discard(p["call_id"])
            elif event == "call:update":
                if p["state"] in FINAL:
                    agent.open_calls.discard(p["call_id"])
            elif event == "error":
                stats.agent_errors[p.get("code", "?")] += 1

        return on_event

    def visitor_done(v: SimVisitor) -> None:
        if v.busy:
            v.busy = False
            v.call_id = None
            free.append(v)

    def visitor_handler(v: SimVisitor) -> Callable[[str, Any], None]:
        def on_event(event: str, p: Any) -> None:
            if event == "call:update":
                if p["state"] in FINAL and p["call_id"] == v.call_id:
                    if p["state"] == "completed":
                        stats.completed += 1
                    visitor_done(v)
            elif event == "error":
                stats.visitor_errors[p.get("code", "?")] += 1

        return on_event

    def start_acked(v: SimVisitor) -> Callable[[Any], None]:
        def on_ack(ack: Any) -> None:
            stats.start_to_ack.append(time.perf_counter() - v.sent_at)
            if not ack.get("ok"):
                stats.ack_states["error"] += 1
                stats.visitor_errors[ack["error"]["code"]] += 1
                visitor_done(v)
                return
            call = ack["call"]
            stats.ack_states[call["state"]] += 1
            if call["state"] in FINAL:
                if call["state"] == "failed":
                    stats.failed_reasons[call.get("reason") or "?"] += 1
                visitor_done(v)
            else:
                v.call_id = call["call_id"]

        return on_ack

    async def accept_worker() -> None:
        while (item := await accepts.get()) is not None:
            agent, call_id = item
            try:
                await agent.client.emit("call:accept", {"call_id": call_id})
                stats.accepts_sent += 1
            except (ConnectionError, aiohttp.ClientError):
                stats.agent_errors["send_failed"] += 1
                continue
            hangups.append((time.perf_counter() + args.hold_s, agent, call_id))

    async def hangup_worker(stop: asyncio.Event) -> None:
        """One timer queue: every call is held the same time, so due times come in order."""
        while not (stop.is_set() and not hangups):
            if not hangups:
                await asyncio.sleep(0.01)
                continue
            due, agent, call_id = hangups[0]
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(min(wait, 0.05))
                continue
            hangups.popleft()
            agent.open_calls.discard(call_id)  # a ring after this may be for a new call
            try:
                await agent.client.emit("call:hangup", {"call_id": call_id})
                stats.hangups_sent += 1
            except (ConnectionError, aiohttp.ClientError):
                stats.agent_errors["send_failed"] += 1

    try:
        started_connect = time.perf_counter()

        def make_agent(i: int) -> tuple[RawSocketIO, dict[str, Any]]:
            client = RawSocketIO(http, urls[i % len(urls)], "/agent")
            agent = SimAgent(f"a{i}", client)
            agents[agent.agent_id] = agent
            client.on_event = agent_handler(agent)
            return client, {"token": token(agent.agent_id)}

        clients += await connect_all(make_agent, args.agents, args.connect_concurrency)
        agents_connect_s = time.perf_counter() - started_connect
        print(f"{len(agents)} agents in {agents_connect_s:.1f} s", file=sys.stderr, flush=True)
        settle_s = await wait_available(http, urls, args.agents)

        pool = min(math.ceil(args.rate * args.reuse_s), math.ceil(args.rate * args.duration))
        pool = max(pool, 1)

        def make_visitor(i: int) -> tuple[RawSocketIO, dict[str, Any]]:
            client = AckSocketIO(http, urls[i % len(urls)], "/visitor")
            v = SimVisitor(f"v_bench{i:011d}", client)
            visitors[v.visitor_id] = v
            free.append(v)
            client.on_event = visitor_handler(v)
            return client, {"token": token(v.visitor_id, "visitor")}

        started_connect = time.perf_counter()
        clients += await connect_all(make_visitor, pool, args.connect_concurrency)
        visitors_connect_s = time.perf_counter() - started_connect
        print(f"{pool} visitors in {visitors_connect_s:.1f} s", file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)  # let connect-time work drain
        # The driver holds as many sockets as the nodes do: a full collection of its heap
        # (~300 ms, measured) while calling would be counted as ring latency. Everything
        # connected so far lives for the whole run, so keep it out of the collector.
        gc.collect()
        gc.freeze()
        pacer = CollectorPacer()  # and its sockets' waits collected in short pieces, as a node's
        pacer.start()

        stop = asyncio.Event()
        workers += [asyncio.create_task(accept_worker()), asyncio.create_task(hangup_worker(stop))]
        print(f"calling at {args.rate}/s for {args.duration:.0f} s", file=sys.stderr, flush=True)
        total = int(args.rate * args.duration)
        per_tick = max(1, int(args.rate * 0.01))
        gc_before = {n.log.stem: await gc_pauses(http, n.url) for n in nodes}
        before = {name: sched(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        window["start"], window["end"] = started, started + args.duration
        issued = sent = skipped = 0
        lag_max = 0.0
        while issued < total and time.perf_counter() < started + args.duration + 5:
            due = started + issued / args.rate
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            lag_max = max(lag_max, time.perf_counter() - due)
            for _ in range(min(total - issued, per_tick)):
                issued += 1
                now = time.perf_counter()
                if not free or free[0].next_ok > now:
                    skipped += 1  # no visitor may start a call now: the pool is too small
                    continue
                v = free.popleft()
                v.busy, v.rung, v.call_id = True, False, None
                v.sent_at = now
                v.next_ok = now + args.reuse_s
                await v.client.emit_ack("call:start", {"language": "en"}, start_acked(v))
                sent += 1
        elapsed = time.perf_counter() - started
        cpu = cpu_report(pids, before, elapsed)
        gc_report = {
            n.log.stem: gc_pause_report(gc_before[n.log.stem], await gc_pauses(http, n.url))
            for n in nodes
        }

        # Drain: every call answered and hung up, bounded.
        deadline = time.perf_counter() + args.hold_s + args.drain_s
        while time.perf_counter() < deadline:
            if not any(v.busy for v in visitors.values()) and not hangups:
                break
            await asyncio.sleep(0.1)
        drained = time.perf_counter() - started - elapsed
        stop.set()
        accepts.put_nowait(None)
        await asyncio.wait(workers, timeout=args.hold_s + 2)
        still_open = sum(1 for v in visitors.values() if v.busy)
        agents_still_on_call = sum(1 for a in agents.values() if a.open_calls)
    finally:
        if pacer is not None:
            pacer.stop()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await http.close()

    ring = summary_ms(stats.start_to_ring)
    p99 = ring.get("p99_ms", math.inf)
    return {
        "benchmark": "click_to_ring",
        "agents": args.agents,
        "nodes": len(nodes),
        "visitor_pool": pool,
        "visitor_reuse_s": args.reuse_s,
        "target_rate_per_s": args.rate,
        "duration_s": round(elapsed, 2),
        "hold_s": args.hold_s,
        "ring_timeout_s": args.ring_timeout,
        "setup_s": {
            "agents_connect": round(agents_connect_s, 1),
            "all_available": round(settle_s, 1),
            "visitors_connect": round(visitors_connect_s, 1),
        },
        "starts_sent": sent,
        "starts_skipped_no_free_visitor": skipped,
        "achieved_start_rate_per_s": round(sent / elapsed, 1),
        "start_acks": dict(stats.ack_states),
        "start_acks_failed_no_free_agent": stats.ack_states.get("failed", 0),
        "failed_reasons": dict(stats.failed_reasons),
        "starts_unanswered_after_drain": still_open,
        "drain_s": round(drained, 2),
        "rings": stats.rings,
        "first_rings": stats.first_rings,
        "calls_routed_per_s": round(stats.first_rings_in_window / elapsed, 1),
        "ring_stops": dict(stats.ring_stops),
        "calls_completed": stats.completed,
        "accepts_sent": stats.accepts_sent,
        "hangups_sent": stats.hangups_sent,
        "start_to_ring_ms": ring,
        "start_to_ack_ms": summary_ms(stats.start_to_ack),
        "double_bookings": stats.double_bookings,
        "double_booking_examples": stats.double_booking_examples,
        "agents_with_open_calls_at_end": agents_still_on_call,
        "rings_for_unknown_visitors": stats.unknown_rings,
        "visitor_errors": dict(stats.visitor_errors),
        "agent_errors": dict(stats.agent_errors),
        "driver_max_lag_ms": round(lag_max * 1000, 2),
        "cpu_while_calling": cpu,
        "gc_pauses_while_calling": gc_report,
        "target": "start-to-ring p99 <= 25 ms, 0 double bookings",
        "meets_target": p99 <= 25 and stats.double_bookings == 0 and stats.first_rings > 0,
    }


async def redis_pid(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return int((await client.info("server"))["process_id"])
    finally:
        await client.aclose()


async def explain_double_bookings(url: str, examples: list[dict[str, Any]]) -> None:
    """Attach each involved call's stored timeline (seconds after the earliest event)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        for example in examples:
            calls = {}
            for call_id in [example["ringing_for"], *example["already_on"]]:
                raw = await client.hget(f"m:call:{call_id}", "data")
                if raw:
                    calls[call_id] = json.loads(raw)
            if not calls:
                continue
            base = min(c["created_at"] for c in calls.values())
            example["timelines_s"] = {
                call_id: [
                    [event, round(at - base, 4)]
                    for at, event, *_ in c["timeline"]
                    if event in ("requested", "ringing", "connected", "completed")
                ]
                + [["connected_at", c["connected_at"] and round(c["connected_at"] - base, 4)]]
                for call_id, c in calls.items()
            }
    finally:
        await client.aclose()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        work = Path(tmp)
        config = work / "bench.toml"
        text = demo_site_config(args.agents, socket_ttl_s=args.socket_ttl)
        text = text.replace(
            'name = "Acme"\n', f'name = "Acme"\nring_timeout_s = {args.ring_timeout}\n', 1
        )
        config.write_text(text)
        async with redis_server(work) as redis_url, contextlib.AsyncExitStack() as stack:
            nodes: list[NodeProcess] = []
            for name in ("node-a", "node-b"):
                node = await start_node(config, redis_url, work, name)
                stack.push_async_callback(stop_node, node)
                nodes.append(node)
            pids = {n.log.stem: n.proc.pid for n in nodes}
            pids["redis"] = await redis_pid(redis_url)
            pids["driver"] = os.getpid()
            try:
                result = await measure(args, nodes, pids)
                await explain_double_bookings(redis_url, result["double_booking_examples"])
            finally:
                peak = {n.log.stem: round(n.peak_rss_mb(), 1) for n in nodes}
                problems = log_problems([n.log for n in nodes])
            return result | {"peak_rss_mb": peak, "node_log_problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=5_000, help="online agents, half per node")
    parser.add_argument("--rate", type=float, default=200.0, help="call:start per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of calling")
    parser.add_argument("--hold-s", type=float, default=2.0, help="call length before hang-up")
    parser.add_argument(
        "--reuse-s", type=float, default=15.0, help="a visitor starts at most every this often"
    )
    parser.add_argument("--ring-timeout", type=float, default=20.0, help="site ring_timeout_s")
    parser.add_argument("--socket-ttl", type=float, default=15.0, help="presence socket_ttl_s")
    parser.add_argument("--drain-s", type=float, default=15.0, help="max wait for stragglers")
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    write_json(args.out, asyncio.run(run(args)))


if __name__ == "__main__":
    main()
