"""Idle memory per connection, and the collector's pauses over many of them (issue 13).

One node on a private Redis. In turn, measured from the node's settled VmRSS:

1. ``--sockets`` idle socket.io sockets on ``/agent`` (one per configured agent, each a lean
   raw client that only answers pings), and what each costs: (RSS after - RSS before) / N;
2. ``--watchers`` idle availability SSE streams (the widget's feed; bare protocols in a child
   process, as bench/soak.py opens them), and what each costs.

With all of them open: the pacer's hourly check of the frozen objects (``SIGUSR2``, a
forked child; the node pauses for the fork only) and, for comparison, a full collection
of everything (``SIGUSR1``, what the pacer did hourly before), each pause read from the
node's log; the node's collector pauses by generation over the whole run (``/metrics``);
and its event-loop lag.

Targets (issue 13): at most 14 KB per idle socket.io socket and 10 KB per SSE watcher; no
collector pause over 100 ms at 10,000 idle sockets, the hourly one included.

    .venv/bin/python bench/idle_memory.py --out bench/results/idle_memory.json

A quick check: ``--sockets 1000 --watchers 1000 --runs 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.harness import (
    RawSocketIO,
    add_runs_argument,
    demo_site_config,
    gc_pause_report,
    gc_pauses,
    raise_fd_limit,
    redis_server,
    repeat,
    settle_rss,
    start_node,
    stop_node,
    token,
    write_json,
)
from bench.soak import FROZEN_CHECK, Widgets, frozen_check_of

FULL = re.compile(r"full garbage collection: (\d+) objects collected in (\d+) ms")


async def logged(log: Path, pattern: re.Pattern[str], timeout_s: float = 200) -> re.Match[str]:
    """The next line of the node's log that ``pattern`` matches, once written."""
    seen = len(pattern.findall(await asyncio.to_thread(log.read_text, errors="replace")))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = list(pattern.finditer(await asyncio.to_thread(log.read_text, errors="replace")))
        if len(found) > seen:
            return found[-1]
        await asyncio.sleep(0.2)  # the node writes its log line when the check is over
    text = await asyncio.to_thread(log.read_text, errors="replace")
    tail = [line for line in text.splitlines() if "garbage" in line][-3:]
    raise TimeoutError(f"the node logged no {pattern.pattern[:30]!r}; it said {tail}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        workdir = Path(tmp)
        config = workdir / "bench.toml"
        config.write_text(demo_site_config(args.sockets, device_ttl_s=3600))
        async with redis_server(workdir) as redis_url:
            node = await start_node(config, redis_url, workdir, "node")
            pid = node.proc.pid
            http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            clients: list[RawSocketIO] = []
            widgets = Widgets()
            try:
                gc_start = await gc_pauses(http, node.url)
                base = await settle_rss(pid)

                gate = asyncio.Semaphore(64)

                async def connect(i: int) -> None:
                    async with gate:
                        client = RawSocketIO(http, node.url, "/agent")
                        await client.connect({"token": token(f"a{i}", ttl=24 * 3600)})
                        clients.append(client)

                started = time.monotonic()
                await asyncio.gather(*(connect(i) for i in range(args.sockets)))
                sockets_s = time.monotonic() - started
                with_sockets = await settle_rss(pid, 60)
                per_socket_kb = (with_sockets - base) * 1024 / args.sockets

                opened, failed = await widgets.start(node.url, args.watchers)
                with_watchers = await settle_rss(pid, 60)
                per_watcher_kb = (with_watchers - with_sockets) * 1024 / max(opened, 1)

                node.proc.send_signal(signal.SIGUSR2)
                check = frozen_check_of(await logged(node.log, FROZEN_CHECK))
                node.proc.send_signal(signal.SIGUSR1)
                full = await logged(node.log, FULL)
                gc_end = await gc_pauses(http, node.url)
                async with http.get(f"{node.url}/metrics") as r:
                    metrics = await r.text()
            finally:
                await widgets.stop()
                for client in clients:
                    await client.close()
                await http.close()
                await stop_node(node)
    pauses = gc_pause_report(gc_start, gc_end)
    return {
        "benchmark": "idle_memory",
        "sockets": args.sockets,
        "sockets_connected_in_s": round(sockets_s, 1),
        "watchers": opened,
        "watchers_failed": failed,
        "node_rss_mb": {
            "before": round(base, 1),
            "with_sockets": round(with_sockets, 1),
            "with_watchers_too": round(with_watchers, 1),
        },
        "kb_per_idle_socket": round(per_socket_kb, 2),
        "kb_per_idle_watcher": round(per_watcher_kb, 2),
        "hourly_check": check,
        "full_collection_on_request_ms": int(full.group(2)),
        # The full collection asked for (SIGUSR1) is generation 2: not one the node runs
        # by itself any more.
        "collector_pauses": pauses,
        "event_loop_lag": _lag(metrics),
        "meets_target": per_socket_kb <= 14
        and per_watcher_kb <= 10
        and check["node_paused_ms"] <= 100
        and all(pauses[g]["over_100_ms"] == 0 for g in pauses if g != "2"),
        "targets": {
            "socket_le_14_kb": per_socket_kb <= 14,
            "watcher_le_10_kb": per_watcher_kb <= 10,
            "hourly_pause_le_100_ms": check["node_paused_ms"] <= 100,
            "paced_pauses_le_100_ms": all(
                pauses[g]["over_100_ms"] == 0 for g in pauses if g != "2"
            ),
        },
    }


def _lag(metrics: str) -> dict[str, float]:
    """How many 10 ms ticks of the node's loop ran over 50 and over 100 ms late, all run."""
    out: dict[str, float] = {}
    for le in ("0.05", "0.1", "+Inf"):
        found = re.search(
            rf'membrane_event_loop_lag_seconds_bucket\{{le="{re.escape(le)}"\}} (\S+)', metrics
        )
        out[le] = float(found.group(1)) if found else float("nan")
    return {
        "ticks": out["+Inf"],
        "over_50_ms": out["+Inf"] - out["0.05"],
        "over_100_ms": out["+Inf"] - out["0.1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sockets", type=int, default=10_000, help="idle /agent sockets")
    # 5,000: with 10,000 sockets the node stays under a 20,000-descriptor limit.
    parser.add_argument("--watchers", type=int, default=5_000, help="idle availability SSE")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser)
    args = parser.parse_args()
    result = repeat(
        args.runs,
        lambda: asyncio.run(run(args)),
        worst=lambda r: r["kb_per_idle_socket"],
        headline=lambda r: {
            "kb_per_idle_socket": r["kb_per_idle_socket"],
            "kb_per_idle_watcher": r["kb_per_idle_watcher"],
            "hourly_check_paused_ms": r["hourly_check"]["node_paused_ms"],
            "hourly_check_child_ms": r["hourly_check"]["child_ms"],
            "full_collection_on_request_ms": r["full_collection_on_request_ms"],
            "paced_pauses_over_100_ms": sum(
                v["over_100_ms"] for g, v in r["collector_pauses"].items() if g != "2"
            ),
            "lag_over_100_ms": r["event_loop_lag"]["over_100_ms"],
        },
    )
    write_json(args.out, result)


if __name__ == "__main__":
    main()
