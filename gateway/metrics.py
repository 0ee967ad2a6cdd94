"""Prometheus metrics, one registry per app so that several nodes can share a process."""

from __future__ import annotations

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
        self.dials = Counter(
            "membrane_callback_dials_total",
            "Outbound dial attempts by result (placed, busy, no_answer, voicemail, ...).",
            ["result"],
            registry=self.registry,
        )
