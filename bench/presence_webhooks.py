"""Presence from webhooks across two nodes sharing Redis (issue 11's benchmark).

1,000 agents. Presence changes arrive at a steady combined rate (500/s), half through each
webhook, each request sent to the two nodes in turn:

- the IM presence webhook, ``POST /v1/sites/acme/presence/im``: a chat integration's signed
  single-update request (``available``, ``away``, ``dnd`` on the agent's ``im`` device);
- the SMS webhook, ``POST /v1/twilio/sms``: Twilio's signed form for an agent texting the
  site's number ``IN``, ``BUSY`` or ``BACK 15`` (the agent's ``sms`` device).

Meanwhile agents' sockets send ``presence:set`` at their own rate. Each node has a
supervisor's board; a change counts when it reaches the board on the *other* node. Reports
each path's latency from the change's arrival to ``presence:update`` (the webhooks' from
just before the request is written, so the client's HTTP work counts against them).

    .venv/bin/python bench/presence_webhooks.py --runs 3 --out bench/results/presence_webhooks.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from twilio.request_validator import RequestValidator

from bench.harness import (
    SITE_NUMBER,
    RawSocketIO,
    add_runs_argument,
    agent_mobile,
    cpu_per_unit,
    cpu_report,
    demo_site_config,
    gc_pause_report,
    gc_pauses,
    log_problems,
    redis_pid,
    redis_server,
    repeat,
    sched,
    start_node,
    steal_seconds,
    stop_node,
    summary_ms,
    token,
    write_json,
)
from bench.machine_stalls import MachineStalls
from gateway.ops.gc_pacer import PROCESS_PACER
from gateway.wire.im_presence import signed_headers

STARTUP_LINE = re.compile(r"oO0Oo|Redis version|Configuration loaded|Server initialized|overcommit")
SECRET = "bench-im-presence-webhook-secret-0123456789"
ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-twilio-auth-token"
IM_STATES = ("available", "away", "dnd")
SMS_COMMANDS = (("IN", "available"), ("BUSY", "busy"), ("BACK 15", "away"))
"""What an agent texts, and the state their ``sms`` device then shows."""


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        work = Path(tmp)
        config = work / "bench.toml"
        # Every webhook request is one update: the per-site bucket must not be what limits.
        rate = f"im_webhook_rate = {args.rate * 2}\nim_webhook_burst = {args.rate * 2}"
        config.write_text(demo_site_config(args.agents + args.senders, extra=rate, mobiles=True))
        os.environ["MEMBRANE_SITE_ACME_PRESENCE_WEBHOOK_SECRET"] = SECRET
        os.environ["MEMBRANE_TWILIO_ACCOUNT_SID"] = ACCOUNT_SID
        os.environ["MEMBRANE_TWILIO_AUTH_TOKEN"] = AUTH_TOKEN
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
                redis_warnings = [
                    line
                    for line in (work / "redis.log").read_text().splitlines()
                    # Its warnings (" # "), less the start-up banner: a slow fsync or fork
                    # would explain a stall that every path saw at once.
                    if " # " in line and not STARTUP_LINE.search(line)
                ]
                return result | {
                    "log_problems": log_problems([node_a.log, node_b.log]),
                    "redis_warnings": redis_warnings[-8:],
                }
            finally:
                await stop_node(node_a)
                await stop_node(node_b)


async def measure(
    args: argparse.Namespace, url_a: str, url_b: str, pids: dict[str, int]
) -> dict[str, Any]:
    # (agent, device, state) -> (sent at, node it went to): the change awaited on a board.
    sent: dict[tuple[str, str, str], tuple[float, str]] = {}
    socket_sent: dict[tuple[str, int], tuple[float, str]] = {}
    latency: dict[str, list[float]] = {"im": [], "sms": []}
    socket_latency: list[float] = []
    # (second of the run it arrived in, latency): where the slow ones cluster, if they do.
    arrivals: list[tuple[int, float]] = []
    # (wall-clock time it arrived, latency): set beside the machine's own stalls.
    on_wall: list[tuple[float, float]] = []
    refused: dict[str, list[int]] = {"im": [], "sms": []}
    signer = RequestValidator(AUTH_TOKEN)

    def board_handler(node: str) -> Callable[[str, Any], None]:
        def on_update(event: str, p: dict[str, Any]) -> None:
            if event != "presence:update":
                return
            received = time.perf_counter()
            for d in p["devices"]:
                device = d["device_id"]
                if device in latency:
                    key = (p["agent_id"], device, d["state"])
                    origin = sent.get(key)
                    if origin is not None and origin[1] != node:
                        del sent[key]
                        latency[device].append(received - origin[0])
                        arrivals.append((int(received - started), received - origin[0]))
                        on_wall.append((time.time(), received - origin[0]))
                elif device == "mob":
                    key2 = (p["agent_id"], d["priority"])
                    origin2 = socket_sent.get(key2)
                    if origin2 is not None and origin2[1] != node:
                        del socket_sent[key2]
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

    async def post_im(node: str, url: str, agent: str, state: str) -> None:
        body = json.dumps(
            {"agent_id": agent, "state": state, "event_id": uuid.uuid4().hex}
        ).encode()
        headers = signed_headers(SECRET, int(time.time()), body)
        sent[(agent, "im", state)] = (time.perf_counter(), node)
        async with http.post(f"{url}/v1/sites/acme/presence/im", data=body, headers=headers) as r:
            if r.status != 200:
                refused["im"].append(r.status)
            await r.read()

    async def post_sms(node: str, url: str, agent: int, command: str, state: str) -> None:
        target = f"{url}/v1/twilio/sms"
        form = {
            "AccountSid": ACCOUNT_SID,
            "MessageSid": "SM" + uuid.uuid4().hex,
            "From": agent_mobile(agent),
            "To": SITE_NUMBER,
            "Body": command,
            "NumMedia": "0",
        }
        headers = {"X-Twilio-Signature": signer.compute_signature(target, form)}
        sent[(f"a{agent}", "sms", state)] = (time.perf_counter(), node)
        async with http.post(target, data=form, headers=headers) as r:
            reply = await r.text()
            if r.status != 200 or "<Message>" not in reply:
                refused["sms"].append(r.status)

    print(f"measuring for {args.duration:.0f} s", file=sys.stderr, flush=True)
    posts: set[asyncio.Task[None]] = set()
    total = int(args.rate * args.duration)
    socket_every = max(1, round(args.rate / max(args.socket_rate, 1e-9)))
    seq = [0] * max(1, len(senders))
    gc_before = {node: await gc_pauses(http, url) for node, url in (("a", url_a), ("b", url_b))}
    # The driver's collector on a clock, as the nodes' is: an automatic full collection over
    # its growing records would stall the boards' readers, and the stall would be timed as
    # the nodes' latency. Its own pauses are reported beside the figures.
    driver_pauses: list[float] = []
    paced = PROCESS_PACER.acquire(lambda _gen, pause_s, _n: driver_pauses.append(pause_s))
    async with MachineStalls() as machine:  # its watchers stop whatever happens
        started, window_from = time.perf_counter(), time.time()
        before = {name: sched(pid) for name, pid in pids.items()}
        stolen_before = steal_seconds()
        lag_max = 0.0
        socket_total = 0
        for issued in range(total):
            due = started + issued / args.rate
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            lag_max = max(lag_max, time.perf_counter() - due)
            # Requests alternate IM, SMS; each agent gets one of each per round of all agents,
            # and a different state from the round before, so every request is a change.
            agent = (issued // 2) % args.agents
            step = (issued // (2 * args.agents)) % 3
            node, url = ("a", url_a) if (issued // 2) % 2 == 0 else ("b", url_b)
            if issued % 2 == 0:
                job = post_im(node, url, f"a{agent}", IM_STATES[step])
            else:
                command, state = SMS_COMMANDS[step]
                job = post_sms(node, url, agent, command, state)
            task = asyncio.create_task(job)
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
        cpu = cpu_report(pids, before, elapsed, stolen_before)
        await asyncio.gather(*posts, return_exceptions=True)
        deadline = time.perf_counter() + 5
        while (sent or socket_sent) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # stragglers, bounded
        window_to = time.time()
    if paced:
        PROCESS_PACER.release()
    gc_report = {
        f"node-{node}": gc_pause_report(gc_before[node], await gc_pauses(http, url))
        for node, url in (("a", url_a), ("b", url_b))
    }
    for _, _, client in senders:
        await client.close()
    for board in boards:
        await board.close()
    await http.close()

    webhooks = summary_ms(latency["im"] + latency["sms"])
    # A change whose way from webhook to board crossed a stall of the machine itself (every
    # process stopped; a real-time watcher on each CPU saw it) was late for the machine.
    in_stalls = [lat for at, lat in on_wall if machine.overlaps(at - lat, at)]
    outside = [lat for at, lat in on_wall if not machine.overlaps(at - lat, at)]
    sockets = summary_ms(socket_latency)
    ratio = webhooks.get("p99_ms", math.inf) / sockets["p99_ms"] if socket_latency else math.nan
    return {
        "benchmark": "presence_webhooks",
        "agents": args.agents,
        "target_rate_per_s": args.rate,
        "achieved_rate_per_s": round(total / elapsed, 1),
        "socket_rate_per_s": round(socket_total / elapsed, 1),
        "duration_s": round(elapsed, 2),
        "sent": total,
        "refused": {kind: len(codes) for kind, codes in refused.items()},
        "lost": {kind: sum(1 for k in sent if k[1] == kind) for kind in latency},
        "driver_max_lag_ms": round(lag_max * 1000, 2),
        "webhook_to_update_ms": webhooks,
        "im_to_update_ms": summary_ms(latency["im"]),
        "sms_to_update_ms": summary_ms(latency["sms"]),
        "socket_to_update_ms": sockets,
        "ratio_p99": round(ratio, 2),
        "slowest_seconds": slowest_seconds(arrivals),
        "machine_stalls": machine.report(window_from, window_to),
        "changes_across_machine_stalls": len(in_stalls),
        "slowest_across_machine_stalls_ms": round(max(in_stalls, default=0.0) * 1000, 1),
        "webhook_to_update_outside_machine_stalls_ms": summary_ms(outside),
        "gc_pauses_while_sending": gc_report,
        "driver_gc_pauses": {
            "count": len(driver_pauses),
            "max_ms": round(max(driver_pauses, default=0.0) * 1000, 1),
            "over_10_ms": sum(1 for p in driver_pauses if p > 0.010),
        },
        "cpu_while_sending": cpu,
        "cpu_per_change": cpu_per_unit(cpu, total / elapsed, "change", ("node-a", "node-b")),
        "target": "p99 <= 15 ms and <= 2x the socket path's p99",
        "meets_target": webhooks.get("p99_ms", math.inf) <= 15 and ratio <= 2,
    }


def slowest_seconds(arrivals: list[tuple[int, float]], top: int = 3) -> list[dict[str, float]]:
    """The seconds of the run with the slowest webhook changes: a stall shows as one."""
    worst: dict[int, list[float]] = {}
    for second, latency in arrivals:
        worst.setdefault(second, []).append(latency)
    ranked = sorted(worst.items(), key=lambda kv: max(kv[1]), reverse=True)[:top]
    return [
        {
            "second": second,
            "max_ms": round(max(values) * 1000, 1),
            "over_15_ms": sum(1 for v in values if v > 0.015),
        }
        for second, values in ranked
    ]


def headline(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "webhook_p50_ms": result["webhook_to_update_ms"].get("p50_ms"),
        "webhook_p99_ms": result["webhook_to_update_ms"].get("p99_ms"),
        "webhook_p99_outside_machine_stalls_ms": result[
            "webhook_to_update_outside_machine_stalls_ms"
        ].get("p99_ms"),
        "changes_across_machine_stalls": result["changes_across_machine_stalls"],
        "im_p99_ms": result["im_to_update_ms"].get("p99_ms"),
        "sms_p99_ms": result["sms_to_update_ms"].get("p99_ms"),
        "socket_p50_ms": result["socket_to_update_ms"].get("p50_ms"),
        "socket_p99_ms": result["socket_to_update_ms"].get("p99_ms"),
        "refused": result["refused"],
        "lost": result["lost"],
        "slowest_second_ms": (result["slowest_seconds"] or [{}])[0].get("max_ms"),
        "saturated": result["cpu_per_change"]["saturated"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1_000, help="agents posted for")
    parser.add_argument("--senders", type=int, default=20, help="agent sockets, half per node")
    parser.add_argument("--rate", type=float, default=500.0, help="IM and SMS changes a second")
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
