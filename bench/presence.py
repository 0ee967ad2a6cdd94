"""Presence fan-out across two nodes sharing Redis.

10,000 agents with 3 devices each; agents' sockets on node A send ``presence:set`` at a
steady rate; a supervisor's board on node B receives every ``presence:update``. Reports the
set-to-update latency, the bare Redis PUBLISH-to-message round trip measured at the same
time (the floor), their ratio, and each node's peak RSS.

    .venv/bin/python bench/presence.py --out bench/results/presence.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import redis.asyncio as aioredis

from bench.harness import (
    RawSocketIO,
    add_runs_argument,
    cpu_per_unit,
    cpu_report,
    demo_site_config,
    idle_cpu,
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
from gateway.core.model import Device, DeviceKind, DeviceState
from gateway.store.redis import RedisStore


async def seed(redis_url: str, agents: int) -> None:
    """Three devices per agent, written straight to the store (faster than 30,000 PUTs)."""
    store = RedisStore(redis_url, "seed")

    async def nothing(*_: Any) -> None:
        return None

    await store.start(nothing, nothing)
    now = time.time()
    kinds = (("desk", DeviceKind.DESKTOP), ("im", DeviceKind.IM), ("mob", DeviceKind.MOBILE))
    sem = asyncio.Semaphore(200)

    async def one(i: int) -> None:
        async with sem:
            for device_id, kind in kinds:
                d = Device(device_id, kind, DeviceState.AVAILABLE, 0, now, now + 7200)
                await store.put_device("acme", f"a{i}", d)

    await asyncio.gather(*(one(i) for i in range(agents)))
    await store.close()


async def floor_probe(redis_url: str, stop: asyncio.Event, rate: float) -> list[float]:
    """Bare Redis PUBLISH -> subscriber message round trips, sampled through the run."""
    pub = aioredis.Redis.from_url(redis_url)
    sub = aioredis.Redis.from_url(redis_url)
    pubsub = sub.pubsub()
    await pubsub.subscribe("bench:floor")
    samples: list[float] = []

    async def listen() -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                samples.append(time.perf_counter() - float(msg["data"]))

    listener = asyncio.create_task(listen())
    while not stop.is_set():
        await pub.publish("bench:floor", repr(time.perf_counter()))
        await asyncio.sleep(1 / rate)
    await asyncio.sleep(0.5)  # let the last probes land
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await sub.aclose()
    await pub.aclose()
    return samples


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        work = Path(tmp)
        config = work / "bench.toml"
        config.write_text(demo_site_config(args.agents))
        async with redis_server(work) as redis_url:
            await seed(redis_url, args.agents)
            node_a = await start_node(config, redis_url, work, "node-a")
            node_b = await start_node(config, redis_url, work, "node-b")
            try:
                pids = {
                    "node-a": node_a.proc.pid,
                    "node-b": node_b.proc.pid,
                    "redis": await redis_pid(redis_url),
                    "driver": os.getpid(),
                }
                return await measure(args, node_a.url, node_b.url, redis_url, pids) | {
                    "peak_rss_mb": {
                        "node_a": round(node_a.peak_rss_mb(), 1),
                        "node_b": round(node_b.peak_rss_mb(), 1),
                    }
                }
            finally:
                await stop_node(node_a)
                await stop_node(node_b)


async def measure(
    args: argparse.Namespace, url_a: str, url_b: str, redis_url: str, pids: dict[str, int]
) -> dict[str, Any]:
    """Agents on both nodes change presence; each node has a supervisor's board. A change
    counts when it reaches the board on the *other* node, the path through Redis."""
    sent: dict[tuple[str, int], tuple[float, str]] = {}
    latencies: dict[str, list[float]] = {"a_to_b": [], "b_to_a": []}

    def board_handler(node: str) -> Callable[[str, Any], None]:
        def on_update(event: str, p: dict[str, Any]) -> None:
            if event != "presence:update":
                return
            received = time.perf_counter()
            for d in p["devices"]:
                if d["device_id"] != "mob":
                    continue
                key = (p["agent_id"], d["priority"])
                origin = sent.get(key)
                if origin is not None and origin[1] != node:
                    del sent[key]
                    latencies[f"{origin[1]}_to_{node}"].append(received - origin[0])

        return on_update

    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    boards = []
    for node, url in (("a", url_a), ("b", url_b)):
        board = RawSocketIO(http, url, "/board")
        board.on_event = board_handler(node)
        await board.connect({"token": token("sup", "supervisor")})
        boards.append(board)
    senders: list[tuple[str, str, RawSocketIO]] = []
    for i in range(args.senders):
        node, url = ("a", url_a) if i % 2 == 0 else ("b", url_b)
        client = RawSocketIO(http, url, "/agent")
        await client.connect({"token": token(f"a{i}")})
        senders.append((f"a{i}", node, client))
    await asyncio.sleep(1.0)  # let the connect-time presence changes drain before measuring
    idle = await idle_cpu(pids)

    print(f"measuring for {args.duration:.0f} s", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    floor_task = asyncio.create_task(floor_probe(redis_url, stop, args.floor_rate))
    seq = [0] * len(senders)
    total = int(args.rate * args.duration)
    per_tick = args.rate * 0.01
    started = time.perf_counter()
    before = {name: sched(pid) for name, pid in pids.items()}
    issued = 0
    lag_max = 0.0
    while issued < total:
        due = started + (issued / args.rate)
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        lag_max = max(lag_max, time.perf_counter() - due)
        batch = min(total - issued, max(1, int(per_tick)))
        for _ in range(batch):
            k = issued % len(senders)
            agent, node, client = senders[k]
            seq[k] = (seq[k] + 1) % 200
            priority = seq[k] - 100
            sent[(agent, priority)] = (time.perf_counter(), node)
            await client.emit(
                "presence:set",
                {"device_id": "mob", "kind": "mobile", "state": "available", "priority": priority},
            )
            issued += 1
    elapsed = time.perf_counter() - started
    cpu = cpu_report(pids, before, elapsed)
    deadline = time.perf_counter() + 5
    while sent and time.perf_counter() < deadline:  # noqa: ASYNC110 - stragglers, bounded
        await asyncio.sleep(0.05)
    stop.set()
    floor = await floor_task
    for _, _, client in senders:
        await client.close()
    for board in boards:
        await board.close()
    await http.close()

    both = latencies["a_to_b"] + latencies["b_to_a"]
    end_to_end = summary_ms(both)
    floor_summary = summary_ms(floor)
    ratio_p50 = end_to_end["p50_ms"] / floor_summary["p50_ms"] if floor else float("nan")
    ratio_p99 = end_to_end["p99_ms"] / floor_summary["p99_ms"] if floor else float("nan")
    return {
        "benchmark": "presence",
        "agents": args.agents,
        "devices_per_agent": 3,
        "senders": args.senders,
        "target_rate_per_s": args.rate,
        "achieved_rate_per_s": round(total / elapsed, 1),
        "duration_s": round(elapsed, 2),
        "sent": total,
        "lost": len(sent),
        "driver_max_lag_ms": round(lag_max * 1000, 2),
        "set_to_update_ms": end_to_end,
        "set_on_a_to_update_on_b_ms": summary_ms(latencies["a_to_b"]),
        "set_on_b_to_update_on_a_ms": summary_ms(latencies["b_to_a"]),
        "redis_floor_ms": floor_summary,
        "ratio_p50": round(ratio_p50, 2),
        "ratio_p99": round(ratio_p99, 2),
        "cpu_while_sending": cpu,
        # Each change is applied on both nodes: the unit is one change, both nodes' share.
        "cpu_while_idle": idle,
        "cpu_per_change": cpu_per_unit(cpu, total / elapsed, "change", ("node-a", "node-b"), idle),
        "target": "p99 <= 10 ms and <= 3x floor p99",
        "meets_target": end_to_end["p99_ms"] <= 10 and ratio_p99 <= 3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--senders", type=int, default=200, help="agent sockets, half per node")
    parser.add_argument("--rate", type=float, default=1000.0, help="presence changes per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds")
    parser.add_argument("--floor-rate", type=float, default=100.0, help="Redis probes per second")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser)
    args = parser.parse_args()
    write_json(
        args.out,
        repeat(
            args.runs,
            lambda: asyncio.run(run(args)),
            worst=lambda r: r["set_to_update_ms"].get("p99_ms", math.inf),
            headline=headline,
        ),
    )


def headline(result: dict[str, Any]) -> dict[str, Any]:
    latency, cpu = result["set_to_update_ms"], result["cpu_per_change"]
    return {
        "p50_ms": latency.get("p50_ms"),
        "p99_ms": latency.get("p99_ms"),
        "floor_p99_ms": result["redis_floor_ms"].get("p99_ms"),
        "node_cpu_ms_per_change": cpu["node_cpu_ms_per_unit"],
        "node_cpu_ms_per_change_above_idle": cpu.get("node_cpu_ms_per_unit_above_idle"),
        "node_cores_idle": cpu.get("node_cores_idle"),
        "cpu_cores_by_process": cpu["cpu_cores_by_process"],
        "saturated": cpu["saturated"],
        "lost": result["lost"],
    }
    json.dumps(result)


if __name__ == "__main__":
    main()
