"""Prometheus metrics, one registry per app so that several nodes can share a process."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "membrane_http_requests_total",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "membrane_http_request_seconds",
            "HTTP request handling time.",
            ["route"],
            registry=self.registry,
        )
        self.errors = Counter(
            "membrane_errors_total",
            "Requests and socket events refused, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.sockets = Gauge(
            "membrane_sockets",
            "Connected socket.io clients on this node, by namespace.",
            ["namespace"],
            registry=self.registry,
        )
        self.presence_changes = Counter(
            "membrane_presence_changes_total",
            "Presence changes this node applied (its own and other nodes').",
            registry=self.registry,
        )
        self.store_up = Gauge(
            "membrane_store_up",
            "1 while the store answers and this node hears other nodes' events.",
            registry=self.registry,
        )
        self.callback_refusals = Counter(
            "membrane_callback_refusals_total",
            "Callback requests and dials refused by the abuse rules, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.callbacks = Counter(
            "membrane_callbacks_total",
            "Callbacks by what became of them (requested, completed, failed, canceled).",
            ["outcome"],
            registry=self.registry,
        )
        self.gc_pauses = Histogram(
            "membrane_gc_pause_seconds",
            "Garbage collector pauses of this node's process, by generation (2: everything).",
            ["generation"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.gc_collected = Counter(
            "membrane_gc_collected_objects_total",
            "Objects the garbage collector found unreachable (reference cycles), by generation.",
            ["generation"],
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "membrane_event_loop_lag_seconds",
            "How late a timer of the node's event loop fired (a stall delays every connection).",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.dials = Counter(
            "membrane_callback_dials_total",
            "Outbound dial attempts by result (placed, busy, no_answer, voicemail, ...).",
            ["result"],
            registry=self.registry,
        )

    def observe_gc(self, generation: int, pause_s: float, collected: int) -> None:
        self.gc_pauses.labels(str(generation)).observe(pause_s)
        if collected:
            self.gc_collected.labels(str(generation)).inc(collected)

    async def watch_loop_lag(self, interval_s: float = 0.1) -> None:
        """Sleep ``interval_s`` again and again and observe how late each wake-up came: what
        any callback waiting then (a socket's read, a timer) waited on top of its own time."""
        while True:
            due = time.perf_counter() + interval_s
            await asyncio.sleep(interval_s)
            self.loop_lag.observe(max(0.0, time.perf_counter() - due))
