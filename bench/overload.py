"""Overload: click to ring on two nodes at rates past their capacity.

The set-up of bench/click_to_ring.py (a private Redis, two nodes, thousands of online agents
split over them, visitor sockets pressing the button at a steady rate, agents accepting
every valid ring at once and hanging up after a short call), run at several rates in turn
on the same nodes: 200, 400, 800 and 1,600 starts a second by default. The nodes route about
200 calls a second on these machines; past that they must shed new starts at once
(``overloaded``, with ``retry_after_ms``) and keep the starts they accept fast.

For each rate: calls routed per second, starts shed (and how fast the refusal came), p50 and
p99 from press (``call:start`` sent) to ring (``call:ring`` at the agent's socket) for the
starts accepted, and double bookings as the agents' sockets see them: a ring arriving while
the socket holds another unexpired ring, or while the agent talks on another call. Rings
that arrive past their ``ring_expires_at`` are ignored, as the agent app does, and counted.

Targets: 0 double bookings at every rate; the accepted starts' p99 at most 50 ms at any rate
(the rest shed at once); at 200 a second, p99 at most 25 ms.

A visitor may start 5 calls a minute; a shed start does not count, so a visitor whose start
was shed presses again in turn (no sooner than 0.25 s later: a socket may send 5 events a
second). A visitor whose start was accepted waits ``--reuse-s`` (15 s), so the pool of
``--visitors`` sockets (6,000) must hold the calls accepted in 15 s (about 4,500 at the
nodes' capacity) and enough more to press at the offered rate; a start due when no visitor
may press is counted as skipped.

    .venv/bin/python bench/overload.py --out bench/results/overload.json

A quick check (10 s a rate): ``--agents 2000 --visitors 4000 --duration 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.click_to_ring import (
    NODE_NAMES,
    Driver,
    common_args,
    node_report,
    p99_by_window,
    two_nodes,
)
from bench.harness import NodeProcess, cpu_per_unit, repeat, summary_ms, write_json

RATES = (200.0, 400.0, 800.0, 1600.0)


def rate_report(rate: float, driver: Driver, phase: dict[str, Any]) -> dict[str, Any]:
    stats, elapsed = driver.stats, phase["elapsed_s"]
    shed = len(stats.shed_to_ack)
    ring = summary_ms(stats.start_to_ring)
    p99 = ring.get("p99_ms", math.inf)
    double = stats.two_rings_held + stats.ring_during_call
    limit_ms = 25.0 if rate <= 200 else 50.0
    return {
        "target_rate_per_s": rate,
        "duration_s": round(elapsed, 2),
        "starts_sent": phase["sent"],
        "starts_skipped_no_free_visitor": phase["skipped"],
        "achieved_start_rate_per_s": round(phase["sent"] / elapsed, 1),
        "calls_routed_per_s": round(stats.first_rings_in_window / elapsed, 1),
        "starts_shed": shed,
        "starts_shed_share": round(shed / phase["sent"], 3) if phase["sent"] else 0.0,
        "shed_ack_ms": summary_ms(stats.shed_to_ack),
        "retry_after_ms": summary_ms([ms / 1000 for ms in stats.retry_after_ms]),
        "start_acks": dict(stats.ack_states),
        "failed_reasons": dict(stats.failed_reasons),
        "press_to_ring_ms": ring,
        "press_to_ring_p99_ms_by_5s": p99_by_window(stats),
        "double_bookings": double,
        "double_bookings_two_rings_held": stats.two_rings_held,
        "double_bookings_ring_during_call": stats.ring_during_call,
        "double_booking_examples": stats.double_booking_examples,
        "rings": stats.rings,
        "rings_arrived_expired": stats.rings_arrived_expired,
        "rings_after_their_stop": stats.rings_after_stop,
        "ring_stops": dict(stats.ring_stops),
        "accepts_sent": stats.accepts_sent,
        "calls_completed": stats.completed,
        "visitor_errors": dict(stats.visitor_errors),
        "visitor_error_messages": stats.error_messages,
        "agent_errors": dict(stats.agent_errors),
        "drain_s": round(phase["drain_s"], 2),
        "driver_max_lag_ms": round(phase["lag_max_s"] * 1000, 2),
        "node_counters": phase["node_counters"],
        "cpu_while_calling": phase["cpu"],
        # Every start offered costs CPU, routed or shed.
        "cpu_per_start": cpu_per_unit(
            phase["cpu"], phase["sent"] / elapsed, "start offered", NODE_NAMES, phase["idle_cpu"]
        ),
        "gc_pauses_while_calling": phase["gc"],
        "target": f"p99 <= {limit_ms:.0f} ms for accepted starts, 0 double bookings",
        "meets_target": p99 <= limit_ms and double == 0 and stats.first_rings > 0,
    }


async def measure(
    args: argparse.Namespace, nodes: list[NodeProcess], pids: dict[str, int]
) -> dict[str, Any]:
    driver = Driver(args, nodes)
    rates: list[dict[str, Any]] = []
    try:
        pool = args.visitors
        await driver.connect(pool)
        for i, rate in enumerate(args.rates):
            if i:
                await asyncio.sleep(args.pause_s)  # the per-visitor limit's window moves on
            phase = await driver.calling(rate, args.duration, pids)
            rates.append(rate_report(rate, driver, phase))
            line = {k: rates[-1][k] for k in ("target_rate_per_s", "calls_routed_per_s")}
            line |= {
                "shed": rates[-1]["starts_shed"],
                "p99_ms": rates[-1]["press_to_ring_ms"].get("p99_ms"),
                "double": rates[-1]["double_bookings"],
                "p99_ms_by_5s": rates[-1]["press_to_ring_p99_ms_by_5s"],
            }
            print(line, file=sys.stderr, flush=True)
        still_open, agents_on_call = driver.still_open()
    finally:
        await driver.close()
    return {
        "benchmark": "overload",
        "agents": args.agents,
        "nodes": len(nodes),
        "visitor_pool": pool,
        "visitor_reuse_s": args.reuse_s,
        "hold_s": args.hold_s,
        "ring_timeout_s": args.ring_timeout,
        "setup_s": driver.setup_s,
        "rates": rates,
        "starts_unanswered_after_drain": still_open,
        "agents_with_open_calls_at_end": agents_on_call,
        "target": (
            "0 double bookings at every rate; accepted starts p99 <= 50 ms at any rate "
            "(<= 25 ms at 200/s), the rest shed at once"
        ),
        "meets_target": all(r["meets_target"] for r in rates),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with two_nodes(args) as (nodes, pids, _redis_url):
        try:
            result = await measure(args, nodes, pids)
        finally:
            report = node_report(nodes)
        return result | report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates",
        type=lambda text: [float(r) for r in text.split(",")],
        default=list(RATES),
        help="call:start per second, comma-separated, run in turn (default 200,400,800,1600)",
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of calling a rate")
    parser.add_argument("--pause-s", type=float, default=5.0, help="quiet between rates")
    parser.add_argument("--visitors", type=int, default=6_000, help="visitor sockets")
    common_args(parser)
    args = parser.parse_args()
    write_json(
        args.out,
        repeat(
            args.runs,
            lambda: asyncio.run(run(args)),
            worst=lambda r: max(
                r["press_to_ring_ms"].get("p99_ms", math.inf)
                / (25.0 if r["target_rate_per_s"] <= 200 else 50.0)
                for r in r["rates"]
            ),
            headline=headline,
        ),
    )


def headline(result: dict[str, Any]) -> dict[str, Any]:
    return {
        str(int(r["target_rate_per_s"])): {
            "routed_per_s": r["calls_routed_per_s"],
            "shed_share": r["starts_shed_share"],
            "p50_ms": r["press_to_ring_ms"].get("p50_ms"),
            "p99_ms": r["press_to_ring_ms"].get("p99_ms"),
            "node_cpu_ms_per_start": r["cpu_per_start"]["node_cpu_ms_per_unit"],
            "saturated": r["cpu_per_start"]["saturated"],
            "double_bookings": r["double_bookings"],
        }
        for r in result["rates"]
    }


if __name__ == "__main__":
    main()
