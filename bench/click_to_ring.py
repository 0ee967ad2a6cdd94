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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import redis.asyncio as aioredis

from bench.harness import (
    NodeProcess,
    RawSocketIO,
    add_runs_argument,
    counter_values,
    cpu_per_unit,
    cpu_report,
    demo_site_config,
    gc_pause_report,
    gc_pauses,
    idle_cpu,
    log_problems,
    redis_pid,
    redis_server,
    repeat,
    sched,
    start_node,
    stop_node,
    summary_ms,
    token,
    write_json,
)
from gateway.ops.gc_pacer import CollectorPacer

FINAL = frozenset({"completed", "failed", "canceled"})
# A visitor whose start was shed presses again no sooner than this: a visitor socket may
# send 5 events a second (the gateway's per-socket limit).
MIN_PRESS_GAP_S = 0.25


class SimAgent:
    """An agent's socket, as the agent app uses it: a ring that arrives past its
    ``ring_expires_at`` (or after its stop) is ignored, a valid one accepted at once."""

    __slots__ = ("agent_id", "client", "open_calls", "rings", "stopped", "talking")

    def __init__(self, agent_id: str, client: RawSocketIO) -> None:
        self.agent_id = agent_id
        self.client = client
        self.open_calls: set[str] = set()  # ringing for or talking on, as the server says
        self.rings: dict[str, float] = {}  # call_id -> ring_expires_at (ms): rings held now
        self.stopped: set[str] = set()  # rings whose stop came (a late ring is ignored)
        self.talking: set[str] = set()  # calls accepted and not yet over


class SimVisitor:
    __slots__ = ("busy", "call_id", "client", "next_ok", "rung", "sent_at", "visitor_id")

    def __init__(self, visitor_id: str, client: RawSocketIO) -> None:
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
        self.pressed_at: list[float] = []  # when each start_to_ring's press was sent
        self.start_to_ack: list[float] = []
        self.shed_to_ack: list[float] = []
        self.retry_after_ms: list[int] = []
        self.ack_states: Counter[str] = Counter()
        self.failed_reasons: Counter[str] = Counter()
        self.visitor_errors: Counter[str] = Counter()
        self.error_messages: dict[str, str] = {}  # one message per code, for the report
        self.agent_errors: Counter[str] = Counter()
        self.rings = 0  # every call:ring (a re-ring after a timeout counts again)
        self.rings_arrived_expired = 0
        self.rings_after_stop = 0
        self.first_rings = 0
        self.first_rings_in_window = 0
        self.double_bookings = 0  # a ring while the agent rings for or talks on another call
        self.double_booking_examples: list[dict[str, Any]] = []
        self.two_rings_held = 0  # a ring while the socket holds another unexpired ring
        self.ring_during_call = 0  # a ring while the agent talks on another call
        self.ring_stops: Counter[str] = Counter()
        self.completed = 0
        self.hangups_sent = 0
        self.accepts_sent = 0
        self.unknown_rings = 0


def p99_by_window(stats: Stats, window_s: float = 5.0) -> list[float]:
    """The press-to-ring p99 (ms) of each ``window_s`` of the phase, by press time: whether
    the tail is spread out or comes from one stretch (a warm-up, a stall)."""
    if not stats.pressed_at:
        return []
    first = min(stats.pressed_at)
    windows: dict[int, list[float]] = {}
    for at, latency in zip(stats.pressed_at, stats.start_to_ring, strict=True):
        windows.setdefault(int((at - first) // window_s), []).append(latency)
    return [summary_ms(windows[k]).get("p99_ms", math.nan) for k in sorted(windows)]


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


class Driver:
    """Simulated agents and visitors on the nodes: visitors press the button at a steady
    rate, agents accept every valid ring at once and hang up ``hold_s`` later. One driver
    can run several rates in turn (``calling``), each with its own ``Stats``."""

    def __init__(self, args: argparse.Namespace, nodes: list[NodeProcess]) -> None:
        self.args = args
        self.nodes = nodes
        self.urls = [n.url for n in nodes]
        self.stats = Stats()
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.agents: dict[str, SimAgent] = {}
        self.visitors: dict[str, SimVisitor] = {}
        self.free: deque[SimVisitor] = deque()  # in about the order they may press again
        self.ready: deque[SimVisitor] = deque()  # may press again at once (a start shed)
        self.accepts: asyncio.Queue[tuple[SimAgent, str] | None] = asyncio.Queue()
        self.hangups: deque[tuple[float, SimAgent, str]] = deque()
        self.window = {"start": math.inf, "end": math.inf}
        self.clients: list[RawSocketIO] = []
        self.workers: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()
        self.pacer: CollectorPacer | None = None
        self.setup_s: dict[str, float] = {}

    # --- events ----------------------------------------------------------------------------

    def agent_handler(self, agent: SimAgent) -> Callable[[str, Any], None]:
        def on_event(event: str, p: Any) -> None:
            if event == "call:ring":
                self._on_ring(agent, p)
            elif event == "call:ring_stop":
                self.stats.ring_stops[p["reason"]] += 1
                agent.rings.pop(p["call_id"], None)
                agent.stopped.add(p["call_id"])
                if p["reason"] != "answered":
                    agent.open_calls.discard(p["call_id"])
                    agent.talking.discard(p["call_id"])
            elif event == "call:update":
                if p["state"] in FINAL:
                    agent.open_calls.discard(p["call_id"])
                    agent.rings.pop(p["call_id"], None)
                    agent.talking.discard(p["call_id"])
            elif event == "error":
                self.stats.agent_errors[p.get("code", "?")] += 1

        return on_event

    def _on_ring(self, agent: SimAgent, p: Any) -> None:
        stats = self.stats
        now = time.perf_counter()
        now_ms = time.time() * 1000
        call_id = p["call_id"]
        stats.rings += 1
        expires_ms = p.get("ring_expires_at")
        if isinstance(expires_ms, int | float) and now_ms >= expires_ms:
            stats.rings_arrived_expired += 1  # the agent app ignores it, and so do we
            return
        if call_id in agent.stopped:
            stats.rings_after_stop += 1
            return
        agent.rings = {c: t for c, t in agent.rings.items() if t > now_ms}
        held = set(agent.rings) - {call_id}
        talking = agent.talking - {call_id}
        if held:
            stats.two_rings_held += 1
        if talking:
            stats.ring_during_call += 1
        if agent.open_calls - {call_id}:
            stats.double_bookings += 1
            if len(stats.double_booking_examples) < 5:
                stats.double_booking_examples.append(
                    {
                        "agent": agent.agent_id,
                        "ringing_for": call_id,
                        "already_on": sorted(agent.open_calls),
                        "rings_held": sorted(held),
                    }
                )
        agent.open_calls.add(call_id)
        agent.rings[call_id] = expires_ms if isinstance(expires_ms, int | float) else math.inf
        v = self.visitors.get(p["visitor"]["id"])
        if v is None:
            stats.unknown_rings += 1
        elif not v.rung:
            v.rung = True
            stats.first_rings += 1
            stats.start_to_ring.append(now - v.sent_at)
            stats.pressed_at.append(v.sent_at)
            if self.window["start"] <= v.sent_at < self.window["end"]:
                stats.first_rings_in_window += 1
        self.accepts.put_nowait((agent, call_id))

    def visitor_done(self, v: SimVisitor) -> None:
        if v.busy:
            v.busy = False
            v.call_id = None
            (self.free if v.next_ok else self.ready).append(v)

    def visitor_handler(self, v: SimVisitor) -> Callable[[str, Any], None]:
        def on_event(event: str, p: Any) -> None:
            if event == "call:update":
                if p["state"] in FINAL and p["call_id"] == v.call_id:
                    if p["state"] == "completed":
                        self.stats.completed += 1
                    self.visitor_done(v)
            elif event == "error":
                self.stats.visitor_errors[p.get("code", "?")] += 1

        return on_event

    def start_acked(self, v: SimVisitor, stats: Stats) -> Callable[[Any], None]:
        def on_ack(ack: Any) -> None:
            took = time.perf_counter() - v.sent_at
            stats.start_to_ack.append(took)
            if not ack.get("ok"):
                error = ack["error"]
                stats.ack_states["error"] += 1
                stats.visitor_errors[error["code"]] += 1
                stats.error_messages.setdefault(error["code"], error.get("message", ""))
                if error["code"] == "overloaded":
                    # Shed before anything was stored: the start did not count against the
                    # visitor's limit, who may press again at once.
                    stats.shed_to_ack.append(took)
                    stats.retry_after_ms.append(int(error.get("retry_after_ms", 0)))
                    v.next_ok = 0.0
                self.visitor_done(v)
                return
            call = ack["call"]
            stats.ack_states[call["state"]] += 1
            if call["state"] in FINAL:
                if call["state"] == "failed":
                    stats.failed_reasons[call.get("reason") or "?"] += 1
                self.visitor_done(v)
            else:
                v.call_id = call["call_id"]

        return on_ack

    async def accept_worker(self) -> None:
        while (item := await self.accepts.get()) is not None:
            agent, call_id = item
            expires_ms = agent.rings.pop(call_id, None)
            if expires_ms is None or time.time() * 1000 >= expires_ms:
                continue  # stopped or expired while queued here: nothing to answer
            try:
                await agent.client.emit("call:accept", {"call_id": call_id})
                self.stats.accepts_sent += 1
            except (ConnectionError, aiohttp.ClientError):
                self.stats.agent_errors["send_failed"] += 1
                continue
            agent.talking.add(call_id)
            self.hangups.append((time.perf_counter() + self.args.hold_s, agent, call_id))

    async def hangup_worker(self) -> None:
        """One timer queue: every call is held the same time, so due times come in order."""
        while not (self.stop.is_set() and not self.hangups):
            if not self.hangups:
                await asyncio.sleep(0.01)
                continue
            due, agent, call_id = self.hangups[0]
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(min(wait, 0.05))
                continue
            self.hangups.popleft()
            agent.open_calls.discard(call_id)  # a ring after this may be for a new call
            agent.talking.discard(call_id)
            try:
                await agent.client.emit("call:hangup", {"call_id": call_id})
                self.stats.hangups_sent += 1
            except (ConnectionError, aiohttp.ClientError):
                self.stats.agent_errors["send_failed"] += 1

    # --- set-up ----------------------------------------------------------------------------

    async def connect(self, visitors: int) -> None:
        args, urls = self.args, self.urls
        started = time.perf_counter()

        def make_agent(i: int) -> tuple[RawSocketIO, dict[str, Any]]:
            client = RawSocketIO(self.http, urls[i % len(urls)], "/agent")
            agent = SimAgent(f"a{i}", client)
            self.agents[agent.agent_id] = agent
            client.on_event = self.agent_handler(agent)
            return client, {"token": token(agent.agent_id)}

        self.clients += await connect_all(make_agent, args.agents, args.connect_concurrency)
        self.setup_s["agents_connect"] = round(time.perf_counter() - started, 1)
        print(f"{len(self.agents)} agents in {self.setup_s['agents_connect']} s", file=sys.stderr)
        self.setup_s["all_available"] = round(await wait_available(self.http, urls, args.agents), 1)

        def make_visitor(i: int) -> tuple[RawSocketIO, dict[str, Any]]:
            client = RawSocketIO(self.http, urls[i % len(urls)], "/visitor")
            v = SimVisitor(f"v_bench{i:011d}", client)
            self.visitors[v.visitor_id] = v
            self.ready.append(v)
            client.on_event = self.visitor_handler(v)
            return client, {"token": token(v.visitor_id, "visitor")}

        started = time.perf_counter()
        self.clients += await connect_all(make_visitor, visitors, args.connect_concurrency)
        self.setup_s["visitors_connect"] = round(time.perf_counter() - started, 1)
        print(f"{visitors} visitors in {self.setup_s['visitors_connect']} s", file=sys.stderr)
        await asyncio.sleep(1.0)  # let connect-time work drain
        # The driver holds as many sockets as the nodes do: a full collection of its heap
        # (~300 ms, measured) while calling would be counted as ring latency. Everything
        # connected so far lives for the whole run, so keep it out of the collector.
        gc.collect()
        gc.freeze()
        self.pacer = CollectorPacer()  # and its sockets' waits collected in short pieces
        self.pacer.start()
        self.workers += [
            asyncio.create_task(self.accept_worker()),
            asyncio.create_task(self.hangup_worker()),
        ]

    # --- calling ---------------------------------------------------------------------------

    async def calling(self, rate: float, duration: float, pids: dict[str, int]) -> dict[str, Any]:
        """Starts at ``rate`` a second for ``duration`` seconds into a fresh ``Stats``; the
        phase's figures, with CPU and collector pauses while calling."""
        idle = await idle_cpu(pids)
        self.stats = stats = Stats()
        print(f"calling at {rate}/s for {duration:.0f} s", file=sys.stderr, flush=True)
        total = int(rate * duration)
        per_tick = max(1, int(rate * 0.01))
        gc_before = {n.log.stem: await gc_pauses(self.http, n.url) for n in self.nodes}
        counts_before = await self.node_counters()
        before = {name: sched(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        self.window["start"], self.window["end"] = started, started + duration
        issued = sent = skipped = 0
        lag_max = 0.0
        while issued < total and time.perf_counter() < started + duration + 5:
            due = started + issued / rate
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            lag_max = max(lag_max, time.perf_counter() - due)
            for _ in range(min(total - issued, per_tick)):
                issued += 1
                now = time.perf_counter()
                if self.ready and now - self.ready[0].sent_at >= MIN_PRESS_GAP_S:
                    v = self.ready.popleft()
                elif self.free and self.free[0].next_ok <= now:
                    v = self.free.popleft()
                else:
                    skipped += 1  # no visitor may start a call now: the pool is too small
                    continue
                v.busy, v.rung, v.call_id = True, False, None
                v.sent_at = now
                v.next_ok = now + self.args.reuse_s
                await v.client.emit_ack(
                    "call:start", {"language": "en"}, self.start_acked(v, stats)
                )
                sent += 1
        elapsed = time.perf_counter() - started
        cpu = cpu_report(pids, before, elapsed)
        gc_report = {
            n.log.stem: gc_pause_report(gc_before[n.log.stem], await gc_pauses(self.http, n.url))
            for n in self.nodes
        }
        drained = await self.drain()
        counts = await self.node_counters()
        return {
            "node_counters": {
                name: {
                    key: value - counts_before[name].get(key, 0.0)
                    for key, value in sorted(figures.items())
                    if value - counts_before[name].get(key, 0.0)
                }
                for name, figures in counts.items()
            },
            "elapsed_s": elapsed,
            "sent": sent,
            "skipped": skipped,
            "drain_s": drained,
            "lag_max_s": lag_max,
            "cpu": cpu,
            "idle_cpu": idle,
            "gc": gc_report,
        }

    async def node_counters(self) -> dict[str, dict[str, float]]:
        """Per node, its counts of starts shed by signal and rings dropped by reason."""
        out: dict[str, dict[str, float]] = {}
        for node in self.nodes:
            figures: dict[str, float] = {}
            for name, short in (
                ("membrane_starts_shed", "shed"),
                ("membrane_rings_dropped", "rings_dropped"),
            ):
                for label, value in (await counter_values(self.http, node.url, name)).items():
                    figures[f"{short}:{label}"] = value
            out[node.log.stem] = figures
        return out

    async def drain(self) -> float:
        """Until every call is answered and hung up (bounded); returns seconds waited."""
        started = time.perf_counter()
        deadline = started + self.args.hold_s + self.args.drain_s
        while time.perf_counter() < deadline:
            if not any(v.busy for v in self.visitors.values()) and not self.hangups:
                break
            await asyncio.sleep(0.1)
        return time.perf_counter() - started

    def still_open(self) -> tuple[int, int]:
        """Visitors whose call is not known to be over; agents still on a call."""
        return (
            sum(1 for v in self.visitors.values() if v.busy),
            sum(1 for a in self.agents.values() if a.open_calls),
        )

    async def close(self) -> None:
        self.stop.set()
        self.accepts.put_nowait(None)
        if self.workers:
            await asyncio.wait(self.workers, timeout=self.args.hold_s + 2)
        if self.pacer is not None:
            self.pacer.stop()
        for task in self.workers:
            task.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        await self.http.close()


async def measure(
    args: argparse.Namespace, nodes: list[NodeProcess], pids: dict[str, int]
) -> dict[str, Any]:
    driver = Driver(args, nodes)
    try:
        pool = min(math.ceil(args.rate * args.reuse_s), math.ceil(args.rate * args.duration))
        pool = max(pool, 1)
        await driver.connect(pool)
        phase = await driver.calling(args.rate, args.duration, pids)
        still_open, agents_still_on_call = driver.still_open()
    finally:
        await driver.close()
    stats, elapsed = driver.stats, phase["elapsed_s"]
    sent = phase["sent"]
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
        "setup_s": driver.setup_s,
        "starts_sent": sent,
        "starts_skipped_no_free_visitor": phase["skipped"],
        "achieved_start_rate_per_s": round(sent / elapsed, 1),
        "start_acks": dict(stats.ack_states),
        "start_acks_failed_no_free_agent": stats.ack_states.get("failed", 0),
        "failed_reasons": dict(stats.failed_reasons),
        "starts_unanswered_after_drain": still_open,
        "drain_s": round(phase["drain_s"], 2),
        "rings": stats.rings,
        "rings_arrived_expired": stats.rings_arrived_expired,
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
        "driver_max_lag_ms": round(phase["lag_max_s"] * 1000, 2),
        "cpu_while_calling": phase["cpu"],
        "cpu_while_idle": phase["idle_cpu"],
        "cpu_per_call": cpu_per_unit(
            phase["cpu"],
            stats.first_rings_in_window / elapsed,
            "call routed",
            NODE_NAMES,
            phase["idle_cpu"],
        ),
        "gc_pauses_while_calling": phase["gc"],
        "target": "start-to-ring p99 <= 25 ms, 0 double bookings",
        "meets_target": p99 <= 25 and stats.double_bookings == 0 and stats.first_rings > 0,
    }


NODE_NAMES = ("node-a", "node-b")


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


@contextlib.asynccontextmanager
async def two_nodes(
    args: argparse.Namespace, history_url: str = ""
) -> AsyncIterator[tuple[list[NodeProcess], dict[str, int], str]]:
    """A private Redis and two nodes of a site with ``args.agents`` agents (writing the
    call history to ``history_url``, if given): the nodes, the processes to watch (nodes,
    Redis, this driver) and Redis's URL."""
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        work = Path(tmp)
        config = work / "bench.toml"
        text = demo_site_config(args.agents, socket_ttl_s=args.socket_ttl)
        text = text.replace(
            'name = "Acme"\n', f'name = "Acme"\nring_timeout_s = {args.ring_timeout}\n', 1
        )
        if history_url:
            text = text.replace("[server]\n", f'[server]\nhistory_url = "{history_url}"\n', 1)
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
            yield nodes, pids, redis_url


def node_report(nodes: list[NodeProcess]) -> dict[str, Any]:
    return {
        "peak_rss_mb": {n.log.stem: round(n.peak_rss_mb(), 1) for n in nodes},
        "node_log_problems": log_problems([n.log for n in nodes]),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with two_nodes(args) as (nodes, pids, redis_url):
        try:
            result = await measure(args, nodes, pids)
            await explain_double_bookings(redis_url, result["double_booking_examples"])
        finally:
            report = node_report(nodes)
        return result | report


def common_args(parser: argparse.ArgumentParser) -> None:
    """The options every click-to-ring driver takes (this one and bench/overload.py)."""
    parser.add_argument("--agents", type=int, default=5_000, help="online agents, half per node")
    parser.add_argument("--hold-s", type=float, default=2.0, help="call length before hang-up")
    parser.add_argument(
        "--reuse-s", type=float, default=15.0, help="a visitor starts at most every this often"
    )
    parser.add_argument("--ring-timeout", type=float, default=20.0, help="site ring_timeout_s")
    parser.add_argument("--socket-ttl", type=float, default=15.0, help="presence socket_ttl_s")
    parser.add_argument("--drain-s", type=float, default=15.0, help="max wait for stragglers")
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="call:start per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of calling")
    common_args(parser)
    args = parser.parse_args()
    write_json(
        args.out,
        repeat(
            args.runs,
            lambda: asyncio.run(run(args)),
            worst=lambda r: r["start_to_ring_ms"].get("p99_ms", math.inf),
            headline=headline,
        ),
    )


def headline(result: dict[str, Any]) -> dict[str, Any]:
    ring, cpu = result["start_to_ring_ms"], result["cpu_per_call"]
    return {
        "p50_ms": ring.get("p50_ms"),
        "p99_ms": ring.get("p99_ms"),
        "calls_routed_per_s": result["calls_routed_per_s"],
        "node_cpu_ms_per_call": cpu["node_cpu_ms_per_unit"],
        "node_cpu_ms_per_call_above_idle": cpu.get("node_cpu_ms_per_unit_above_idle"),
        "node_cores_idle": cpu.get("node_cores_idle"),
        "cpu_cores_by_process": cpu["cpu_cores_by_process"],
        "saturated": cpu["saturated"],
        "double_bookings": result["double_bookings"],
    }


if __name__ == "__main__":
    main()
