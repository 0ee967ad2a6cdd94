"""A rolling restart of two gateway nodes behind nginx, under load (issue 16).

Two nodes share a private Redis behind nginx, which runs the shipped config
(deploy/nginx/membrane.conf, through tests/nginx_front.py). Agents speak the agent app's
protocol (lean socket.io clients, bench/harness.py's ``RawSocketIO``, through nginx): each
answers every ring and hangs up ``--hold-s`` later. Visitors start ``--rate`` browser calls a
second, through nginx, each visitor one call at a time and at most 4 a minute (the gateway
allows 5). While they do, node A is stopped with SIGTERM (a drain), started again on its
port, and once it is ready, node B the same. Every client reconnects through nginx when its
node lets it go, as the web clients do: an agent names the call it is in, a visitor resumes
with its session. The clients come from addresses of their own, 150 each (nginx lets an
address hold 200 connections).

Reported: calls started (a ring was promised), completed, lost (started, never ended for
the visitor), starts refused (``draining``, ``overloaded``: the widget tries again), double
bookings (an agent rung while in a call), each node's drain time, start-to-ring p50/p99
before, during and after the restarts, reconnects and failed connects.

    .venv/bin/python bench/rolling_restart.py --out bench/results/rolling_restart.json

``--load click_to_ring``: bench/click_to_ring.py's load (5,000 agents, 3,000 visitors, 200
starts a second, calls of 2 s) instead of the light default (40 agents, 150 visitors, 8 a
second, calls of 3 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # as tests import it

import aiohttp
import redis.asyncio as redis_async
from nginx_front import free_port, nginx

from bench.harness import (
    NodeProcess,
    RawSocketIO,
    demo_site_config,
    redis_server,
    start_node,
    summary_ms,
    token,
    write_json,
)

ORIGIN = {"Origin": "http://127.0.0.1:8080"}
FINAL = {"completed", "failed", "canceled"}


@dataclass
class Stats:
    started: dict[str, float] = field(default_factory=dict)
    """Call id -> when its start was acknowledged (a ring promised)."""
    ended: dict[str, str] = field(default_factory=dict)
    """Call id -> the final state the visitor saw."""
    refused: Counter[str] = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)
    """Every call id a visitor was told of (its start's ack, or an update after a reconnect)."""
    not_completed: Counter[str] = field(default_factory=Counter)
    rung: dict[str, float] = field(default_factory=dict)
    """Call id -> when its visitor first heard it ringing."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set as a call ends."""
    rings_in_a_call: list[tuple[str, str, float]] = field(default_factory=list)
    """(the call the agent believed she was in, the call rung, wall-clock time of the ring):
    judged against the store at the end (``double_bookings``)."""
    reconnects: Counter[str] = field(default_factory=Counter)
    connect_failures: Counter[str] = field(default_factory=Counter)


class Link:
    """One client's socket through nginx, reconnecting as the web clients do when its node
    lets it go (with a jittered delay, growing while connects fail)."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        namespace: str,
        auth: Callable[[], dict[str, Any]],
        on_event: Callable[[str, Any], None],
        stats: Stats,
        kind: str,
    ) -> None:
        self.http, self.url, self.namespace = http, url, namespace
        self.auth, self.on_event, self.stats, self.kind = auth, on_event, stats, kind
        self.socket: RawSocketIO | None = None
        self.up = asyncio.Event()
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """The first connection (retried while refused); then ``run`` keeps it up."""
        self.task = asyncio.create_task(self.run())
        await self.up.wait()

    async def run(self) -> None:
        delay = 0.2
        first = True
        while not self.stopping:
            socket = RawSocketIO(self.http, self.url, self.namespace)
            socket.on_event = self.on_event
            try:
                await socket.connect(self.auth())
            except Exception as e:  # any failed connect is tried again, and counted
                self.stats.connect_failures[f"{self.kind}: {failure(e)}"] += 1
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(5.0, delay * 2)
                continue
            if not first:
                self.stats.reconnects[self.kind] += 1
            first, delay = False, 0.2
            self.socket = socket
            self.up.set()
            await socket.closed()
            self.up.clear()
            self.socket = None
            await asyncio.sleep(random.uniform(0.1, 1.0))

    async def call(self, event: str, payload: dict[str, Any], timeout: float = 5.0) -> Any:
        """The acknowledgement, or None if there was none (no socket, dropped, too late)."""
        socket = self.socket
        if socket is None:
            return None
        try:
            return await socket.call(event, payload, timeout)
        except (ConnectionError, TimeoutError, aiohttp.ClientError, RuntimeError):
            return None

    async def close(self) -> None:
        self.stopping = True
        if self.socket is not None:
            await self.socket.close()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


class Agent:
    def __init__(
        self, i: int, http: aiohttp.ClientSession, url: str, stats: Stats, hold_s: float
    ) -> None:
        self.agent_id = f"a{i}"
        self.stats = stats
        self.hold_s = hold_s
        self.call: str | None = None
        self.link = Link(http, url, "/agent", self.auth, self.on_event, stats, "agent")

    def auth(self) -> dict[str, Any]:
        # Reconnecting in a call: take it over on the new node, as the agent app does.
        extra = {"call_id": self.call} if self.call else {}
        return {"token": token(self.agent_id, ttl=7200), **extra}

    def on_event(self, event: str, payload: Any) -> None:
        if event != "call:ring":
            return
        call_id = payload["call_id"]
        if self.call is not None and self.call != call_id:
            self.stats.rings_in_a_call.append((self.call, call_id, time.time()))
        asyncio.get_running_loop().create_task(self.answer(call_id))

    async def answer(self, call_id: str) -> None:
        ack = await self.link.call("call:accept", {"call_id": call_id})
        if not (ack and ack.get("ok", True) and "error" not in ack):
            return
        self.call = call_id
        await asyncio.sleep(self.hold_s)
        # The hang-up goes through whatever node the socket is on by then.
        for _ in range(100):
            if await self.link.call("call:hangup", {"call_id": call_id}) is not None:
                break
            await asyncio.sleep(0.2)
        self.call = None


class Visitor:
    def __init__(
        self, http: aiohttp.ClientSession, url: str, session: dict[str, Any], stats: Stats
    ) -> None:
        self.session = session
        self.stats = stats
        self.call: str | None = None
        self.last_start = -math.inf
        self.link = Link(http, url, "/visitor", self.auth, self.on_event, stats, "visitor")

    def auth(self) -> dict[str, Any]:
        # Reconnecting in a call: name it, as the widget does, to hear if it ended meanwhile.
        named = {"call_id": self.call} if self.call and self.call != "starting" else {}
        return {"token": self.session["token"], **named}

    @property
    def free(self) -> bool:
        # The gateway lets a visitor start 5 calls a minute: at most 4 here, as
        # bench/click_to_ring.py does.
        return (
            self.call is None
            and self.link.socket is not None
            and time.monotonic() - self.last_start >= REUSE_S
        )

    async def start(self) -> None:
        self.call = "starting"
        began = self.last_start = time.monotonic()
        ack = await self.link.call("call:start", {})
        if ack is None:
            self.stats.refused["no_answer_to_start"] += 1
            if self.call == "starting":
                self.call = None
            return
        if "error" in ack:
            self.stats.refused[ack["error"]["code"]] += 1
            if self.call == "starting":
                self.call = None
            return
        call = ack["call"]
        self.call = call["call_id"]
        self.stats.started[self.call] = began
        self.on_update(call)

    def on_event(self, event: str, payload: Any) -> None:
        if event == "call:update":
            self.on_update(payload)

    def on_update(self, call: dict[str, Any]) -> None:
        call_id = call["call_id"]
        # A start whose ack was lost in a reconnect is still seen here, on the resumed
        # session: the visitor is in that call, as the widget would show.
        self.stats.seen.add(call_id)
        if (
            self.call in (None, "starting")
            and call["state"] not in FINAL
            and call_id not in self.stats.ended
        ):
            self.call = call_id
        if call["state"] == "ringing" and call_id in self.stats.started:
            self.stats.rung.setdefault(call_id, time.monotonic())
        if call["state"] in FINAL and call_id not in self.stats.ended:
            self.stats.ended[call_id] = call["state"]
            self.stats.changed.set()
            if call["state"] != "completed":
                self.stats.not_completed[f"{call['state']}: {call.get('reason')}"] += 1
            if self.call == call_id:
                self.call = None


def failure(e: Exception) -> str:
    """A failed connect, as reported: its kind, and the HTTP status nginx or a node gave."""
    status = getattr(e, "status", None)
    return f"{type(e).__name__} {status}" if status else type(e).__name__


PER_ADDRESS = 150
REUSE_S = 15.0


def address(i: int) -> str:
    """The ``i``-th client address: 127.0.1.1, 127.0.1.2, ... (all of 127/8 is loopback)."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


async def connect_all(links: list[Link], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(link: Link) -> None:
        async with gate:
            await link.connect()

    await asyncio.gather(*(one(link) for link in links))


async def stored_states(redis_url: str, call_ids: list[str]) -> dict[str, Any]:
    """What the store says of calls a visitor never saw end (state, reason, agent)."""
    client = redis_async.Redis.from_url(redis_url, decode_responses=True, socket_connect_timeout=30)
    try:
        found: dict[str, Any] = {}
        for call_id in call_ids[:10]:
            raw = await client.hget(f"m:call:{call_id}", "data")
            data = json.loads(raw) if raw else {}
            found[call_id] = {k: data.get(k) for k in ("state", "reason", "agent_id")}
        return found
    finally:
        await client.aclose()


async def double_bookings(redis_url: str, rings: list[tuple[str, str, float]]) -> tuple[int, int]:
    """Of the rings an agent got while she believed she was in another call: those while
    that call had not ended in the store (the agent really booked twice), and those after it
    had (her hang-up went through but its answer was lost as her socket moved: she was
    free, and rightly rung)."""
    client = redis_async.Redis.from_url(redis_url, decode_responses=True, socket_connect_timeout=30)
    try:
        real = stale = 0
        for held, _, rung_at in rings:
            raw = await client.hget(f"m:call:{held}", "data")
            ended_at = json.loads(raw).get("ended_at") if raw else None
            if ended_at is not None and ended_at <= rung_at:
                stale += 1
            else:
                real += 1
        return real, stale
    finally:
        await client.aclose()


async def open_sessions(http: aiohttp.ClientSession, url: str, n: int) -> list[dict[str, Any]]:
    """Each visitor's session, from a node directly as if through a proxy from an address of
    its own (nginx limits sessions per address, and these all come from one)."""
    sessions = []
    for i in range(n):
        headers = {**ORIGIN, "X-Forwarded-For": f"198.18.{i // 250}.{i % 250 + 1}"}
        async with http.post(f"{url}/v1/sites/acme/sessions", json={}, headers=headers) as r:
            assert r.status == 201, await r.text()
            sessions.append(await r.json())
    return sessions


async def restart(
    node: NodeProcess, config: Path, redis_url: str, work: Path, name: str, port: int
) -> tuple[NodeProcess, dict[str, float]]:
    t0 = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    code = await node.proc.wait()
    drained = time.monotonic() - t0
    again = await start_node(config, redis_url, work, name, port)
    return again, {
        "exit_code": code,
        "drain_s": round(drained, 2),
        "back_ready_s": round(time.monotonic() - t0, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    keep = contextlib.nullcontext(args.keep) if args.keep else None
    with keep or tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        work = Path(tmp)
        async with redis_server(work) as redis_url:
            tls_port = free_port()
            front = f"https://127.0.0.1:{tls_port}"
            config = work / "bench.toml"
            config.write_text(
                demo_site_config(args.agents).replace(
                    "[server]\n",
                    f'[server]\npublic_url = "{front}"\ntrusted_proxies = ["127.0.0.1"]\n'
                    f"drain_grace_s = {args.grace_s}\n",
                )
            )
            ports = {"node-a": free_port(), "node-b": free_port()}
            nodes = {
                name: await start_node(config, redis_url, work, name, port)
                for name, port in ports.items()
            }
            upstream = [f"127.0.0.1:{p}" for p in ports.values()]
            clients = args.agents + args.visitors
            async with (
                nginx(work / "nginx", tls_port, upstream, connections=2 * clients + 512) as url,
                contextlib.AsyncExitStack() as stack,
            ):
                async with aiohttp.ClientSession() as http:
                    sessions = await open_sessions(http, nodes["node-a"].url, args.visitors)
                # nginx lets an address hold 200 connections (limit_conn): the clients come
                # from addresses of their own, PER_ADDRESS each (all of 127/8 is loopback).
                https = [
                    await stack.enter_async_context(
                        aiohttp.ClientSession(
                            connector=aiohttp.TCPConnector(
                                ssl=False, limit=0, local_addr=(address(i), 0)
                            )
                        )
                    )
                    for i in range(math.ceil(clients / PER_ADDRESS))
                ]
                agents = [
                    Agent(i, https[i // PER_ADDRESS], url, stats, args.hold_s)
                    for i in range(args.agents)
                ]
                visitors = [
                    Visitor(https[(args.agents + i) // PER_ADDRESS], url, s, stats)
                    for i, s in enumerate(sessions)
                ]
                links = [a.link for a in agents] + [v.link for v in visitors]
                t0 = time.monotonic()
                await connect_all(links, args.connect_concurrency)
                print(f"{clients} clients in {time.monotonic() - t0:.1f} s", file=sys.stderr)
                timeline: dict[str, Any] = {}
                began = time.monotonic()

                async def rolling() -> None:
                    await asyncio.sleep(args.before_s)
                    for name in ("node-a", "node-b"):
                        timeline[f"{name}_stop_at_s"] = round(time.monotonic() - began, 2)
                        nodes[name], report = await restart(
                            nodes[name], config, redis_url, work, name, ports[name]
                        )
                        timeline[name] = report
                        print(f"{name}: {report}", file=sys.stderr, flush=True)
                        await asyncio.sleep(args.between_s)
                    timeline["restarts_done_at_s"] = round(time.monotonic() - began, 2)

                restarter = asyncio.create_task(rolling())
                rng = random.Random(16)
                sent = 0
                tick = 1 / args.rate
                free: list[Visitor] = []
                for n in itertools.count():
                    now = time.monotonic()
                    if now - began > args.duration:
                        break
                    await asyncio.sleep(max(0.0, began + n * tick - now))
                    if n % 50 == 0:  # a fresh list now and then: a full scan per start is slow
                        free = [v for v in visitors if v.free]
                        rng.shuffle(free)
                    while free and not free[-1].free:
                        free.pop()
                    if free:
                        asyncio.get_running_loop().create_task(free.pop().start())
                        sent += 1
                await restarter
                # Every call started must end: wait for the last ones (a call whose rings went
                # unanswered while agents moved is rung again, agent after agent).
                deadline = time.monotonic() + args.hold_s + 180
                while stats.seen - set(stats.ended) and time.monotonic() < deadline:
                    stats.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stats.changed.wait(), 1.0)
                lost_states = await stored_states(redis_url, sorted(stats.seen - set(stats.ended)))
                booked_twice, rung_after_hang_up = await double_bookings(
                    redis_url, stats.rings_in_a_call
                )
                await asyncio.gather(*(link.close() for link in links))
            for node in nodes.values():
                node.proc.send_signal(signal.SIGTERM)
                await node.proc.wait()
    lost = sorted((stats.seen | set(stats.started)) - set(stats.ended))
    windows: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    stop = timeline.get("node-a_stop_at_s", math.inf)
    done = timeline.get("restarts_done_at_s", math.inf)
    for call_id, at in stats.rung.items():
        since = stats.started[call_id] - began
        window = "before" if since < stop else "during" if since < done else "after"
        windows[window].append(at - stats.started[call_id])
    completed = Counter(stats.ended.values())
    return {
        "benchmark": "rolling_restart",
        "agents": args.agents,
        "visitors": args.visitors,
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "starts_sent": sent,
        "calls_started": len(stats.started),
        "calls_seen_by_visitors": len(stats.seen),
        "calls_ended": dict(completed),
        "calls_not_completed": dict(stats.not_completed),
        "calls_lost": len(lost),
        "lost_examples": lost[:5],
        "lost_as_stored": lost_states,
        "starts_refused": dict(stats.refused),
        "double_bookings": booked_twice,
        "rings_after_an_unanswered_hang_up": rung_after_hang_up,
        "reconnects": dict(stats.reconnects),
        "connect_failures": dict(stats.connect_failures),
        "restarts": timeline,
        "start_to_ring_ms": {k: summary_ms(v) for k, v in windows.items()},
        "target": "no call lost, no agent booked twice, during a rolling restart",
        "meets_target": not lost and booked_twice == 0 and len(stats.started) > 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=40)
    parser.add_argument(
        "--visitors", type=int, default=150, help="each may start 5 calls a minute (the limit)"
    )
    parser.add_argument("--rate", type=float, default=8.0, help="call starts a second")
    parser.add_argument("--hold-s", type=float, default=3.0, help="how long each call talks")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--before-s", type=float, default=10.0, help="load before the first stop")
    parser.add_argument("--between-s", type=float, default=10.0, help="after a node is back")
    parser.add_argument("--grace-s", type=float, default=10.0, help="the nodes' drain grace")
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep", help="work in this directory and keep it (the nodes' logs)")
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument(
        "--load",
        choices=["light", "click_to_ring"],
        default="light",
        help="click_to_ring: bench/click_to_ring.py's load (5,000 agents, 3,000 visitors, "
        "200 starts a second, calls of 2 s), overriding the figures above",
    )
    args = parser.parse_args()
    if args.load == "click_to_ring":
        args.agents, args.visitors, args.rate, args.hold_s = 5000, 3000, 200.0, 2.0
        args.duration = max(args.duration, 120.0)
    write_json(args.out, asyncio.run(run(args)))


if __name__ == "__main__":
    main()
