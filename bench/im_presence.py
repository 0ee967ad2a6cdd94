"""Presence from IM across two nodes sharing Redis: the IM presence webhook's share of issue
11's ``bench/presence_webhooks.py`` (the SMS webhook is built beside it; this measures the
IM path alone, with the socket path beside it in the same run).

1,000 agents; a chat integration posts signed single-update requests to
``POST /v1/sites/acme/presence/im`` at a steady rate, alternating between the nodes, while
agents' sockets send ``presence:set`` at their own rate. Each node has a supervisor's board;
a change counts when it reaches the board on the *other* node. Reports both paths' arrival
to ``presence:update`` latency (the webhook's from just before the request is written).

    .venv/bin/python bench/im_presence.py --out bench/results/im_presence.json
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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.harness import (
    RawSocketIO,
    add_runs_argument,
    cpu_per_unit,
    cpu_report,
    demo_site_config,
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
from gateway.wire.im_presence import signed_headers

SECRET = "bench-im-presence-webhook-secret-0123456789"
STATES = ("available", "away", "dnd")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        work = Path(tmp)
        config = work / "bench.toml"
        # Every webhook request is one update: the per-site bucket must not be what limits.
        rate = f"im_webhook_rate = {args.rate * 2}\nim_webhook_burst = {args.rate * 2}"
        config.write_text(demo_site_config(args.agents + args.senders, extra=rate))
        os.environ["MEMBRANE_SITE_ACME_PRESENCE_WEBHOOK_SECRET"] = SECRET
        async with redis_server(work) as redis_url:
            node_a = await start_node(config, redis_url, work, "node-a")
            node_b = await start_node(config, redis_url, work, "node-b")
            try:
                pids = {
                    "node-a": node_a.proc.pid,
                    "node-b": node_b.proc.pid,
                    "redis": await redis_pid(redis_url),
                    "driver": os.getpid(),
                }
                result = await measure(args, node_a.url, node_b.url, pids)
                return result | {"log_problems": log_problems([node_a.log, node_b.log])}
            finally:
                await stop_node(node_a)
                await stop_node(node_b)


async def measure(
    args: argparse.Namespace, url_a: str, url_b: str, pids: dict[str, int]
) -> dict[str, Any]:
    im_sent: dict[tuple[str, str], tuple[float, str]] = {}
    socket_sent: dict[tuple[str, int], tuple[float, str]] = {}
    im_latency: list[float] = []
    socket_latency: list[float] = []
    refused: list[int] = []

    def board_handler(node: str) -> Callable[[str, Any], None]:
        def on_update(event: str, p: dict[str, Any]) -> None:
            if event != "presence:update":
                return
            received = time.perf_counter()
            for d in p["devices"]:
                if d["device_id"] == "im":
                    origin = im_sent.get((p["agent_id"], d["state"]))
                    if origin is not None and origin[1] != node:
                        del im_sent[(p["agent_id"], d["state"])]
                        im_latency.append(received - origin[0])
                elif d["device_id"] == "mob":
                    key = (p["agent_id"], d["priority"])
                    origin2 = socket_sent.get(key)
                    if origin2 is not None and origin2[1] != node:
                        del socket_sent[key]
                        socket_latency.append(received - origin2[0])

        return on_update

    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    boards = []
    for node, url in (("a", url_a), ("b", url_b)):
        board = RawSocketIO(http, url, "/board")
        board.on_event = board_handler(node)
        await board.connect({"token": token("sup", "supervisor")})
        boards.append(board)
    senders = []
    for i in range(args.senders):
        node, url = ("a", url_a) if i % 2 == 0 else ("b", url_b)
        client = RawSocketIO(http, url, "/agent")
        await client.connect({"token": token(f"a{args.agents + i}")})
        senders.append((f"a{args.agents + i}", node, client))
    await asyncio.sleep(1.0)  # let the connect-time presence changes drain before measuring

    async def post(node: str, url: str, agent: str, state: str) -> None:
        body = json.dumps(
            {"agent_id": agent, "state": state, "event_id": uuid.uuid4().hex}
        ).encode()
        headers = signed_headers(SECRET, int(time.time()), body)
        im_sent[(agent, state)] = (time.perf_counter(), node)
        async with http.post(f"{url}/v1/sites/acme/presence/im", data=body, headers=headers) as r:
            if r.status != 200:
                refused.append(r.status)
            await r.read()

    print(f"measuring for {args.duration:.0f} s", file=sys.stderr, flush=True)
    posts: set[asyncio.Task[None]] = set()
    total_im = int(args.rate * args.duration)
    socket_every = max(1, round(args.rate / max(args.socket_rate, 1e-9)))
    seq = [0] * max(1, len(senders))
    started = time.perf_counter()
    before = {name: sched(pid) for name, pid in pids.items()}
    lag_max = 0.0
    socket_total = 0
    for issued in range(total_im):
        due = started + issued / args.rate
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        lag_max = max(lag_max, time.perf_counter() - due)
        agent = f"a{issued % args.agents}"
        state = STATES[(issued // args.agents) % len(STATES)]
        node, url = ("a", url_a) if issued % 2 == 0 else ("b", url_b)
        task = asyncio.create_task(post(node, url, agent, state))
        posts.add(task)
        task.add_done_callback(posts.discard)
        if senders and issued % socket_every == 0:
            k = socket_total % len(senders)
            name, snode, client = senders[k]
            seq[k] = (seq[k] + 1) % 200
            socket_sent[(name, seq[k] - 100)] = (time.perf_counter(), snode)
            await client.emit(
                "presence:set",
                {
                    "device_id": "mob",
                    "kind": "mobile",
                    "state": "available",
                    "priority": seq[k] - 100,
                },
            )
            socket_total += 1
    elapsed = time.perf_counter() - started
    cpu = cpu_report(pids, before, elapsed)
    await asyncio.gather(*posts, return_exceptions=True)
    deadline = time.perf_counter() + 5
    while (im_sent or socket_sent) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # stragglers, bounded
    for _, _, client in senders:
        await client.close()
    for board in boards:
        await board.close()
    await http.close()

    webhook = summary_ms(im_latency)
    sockets = summary_ms(socket_latency)
    ratio = webhook.get("p99_ms", math.inf) / sockets["p99_ms"] if socket_latency else math.nan
    return {
        "benchmark": "im_presence",
        "agents": args.agents,
        "target_rate_per_s": args.rate,
        "achieved_rate_per_s": round(total_im / elapsed, 1),
        "socket_rate_per_s": round(socket_total / elapsed, 1),
        "duration_s": round(elapsed, 2),
        "sent": total_im,
        "refused": len(refused),
        "lost": len(im_sent),
        "driver_max_lag_ms": round(lag_max * 1000, 2),
        "webhook_to_update_ms": webhook,
        "socket_to_update_ms": sockets,
        "ratio_p99": round(ratio, 2),
        "cpu_while_sending": cpu,
        "cpu_per_change": cpu_per_unit(cpu, total_im / elapsed, "change", ("node-a", "node-b")),
        "target": "p99 <= 15 ms and <= 2x the socket path's p99",
        "meets_target": webhook.get("p99_ms", math.inf) <= 15 and ratio <= 2,
    }


def headline(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "webhook_p50_ms": result["webhook_to_update_ms"].get("p50_ms"),
        "webhook_p99_ms": result["webhook_to_update_ms"].get("p99_ms"),
        "socket_p50_ms": result["socket_to_update_ms"].get("p50_ms"),
        "socket_p99_ms": result["socket_to_update_ms"].get("p99_ms"),
        "refused": result["refused"],
        "lost": result["lost"],
        "saturated": result["cpu_per_change"]["saturated"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1_000, help="agents posted for by IM")
    parser.add_argument("--senders", type=int, default=20, help="agent sockets, half per node")
    parser.add_argument("--rate", type=float, default=500.0, help="IM webhook changes a second")
    parser.add_argument("--socket-rate", type=float, default=50.0, help="presence:set a second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser, default=1)
    args = parser.parse_args()
    write_json(
        args.out,
        repeat(
            args.runs,
            lambda: asyncio.run(run(args)),
            worst=lambda r: r["webhook_to_update_ms"].get("p99_ms", math.inf),
            headline=headline,
        ),
    )


if __name__ == "__main__":
    main()
