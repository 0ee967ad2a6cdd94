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
            "Requests, socket events and socket connections refused, by error code.",
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
        self.presence_predictions = Counter(
            "membrane_presence_predictions_total",
            "This node's presence changes written as it predicted them (held: saved and "
            "published in one round trip) or not (missed: one more).",
            ["outcome"],
            registry=self.registry,
        )
        self.store_up = Gauge(
            "membrane_store_up",
            "1 while the store answers and this node hears other nodes' events.",
            registry=self.registry,
        )
        self.ready = Gauge(
            "membrane_ready",
            "1 while this node answers /readyz with 200: its store answers and it is not "
            "draining (as of the last scrape or readiness check).",
            registry=self.registry,
        )
        self.data_dir_free = Gauge(
            "membrane_data_dir_free_bytes",
            "Free disk where the node keeps its data (the embedded store, the SQLite history).",
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
            "Callbacks by what became of them (requested, moved, completed, failed, canceled).",
            ["outcome"],
            registry=self.registry,
        )
        self.calls_started = Counter(
            "membrane_calls_started_total",
            "Calls made (browser calls started, callbacks booked), by site and channel.",
            ["site", "channel"],
            registry=self.registry,
        )
        self.calls_ended = Counter(
            "membrane_calls_ended_total",
            "Calls ended, by site, channel and outcome (completed, failed, canceled).",
            ["site", "channel", "outcome"],
            registry=self.registry,
        )
        self.time_to_first_human = Histogram(
            "membrane_time_to_first_human_seconds",
            "From a call made until a person talks to the customer, by site and channel.",
            ["site", "channel"],
            buckets=(2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600),
            registry=self.registry,
        )
        self.callback_lateness = Histogram(
            "membrane_callback_lateness_seconds",
            "A callback reaching its customer, seconds after the time last promised to them "
            "(on time: at most 0; negative values count as 0 here).",
            ["site"],
            buckets=(0, 60, 120, 300, 600, 900, 1800, 3600, 7200),
            registry=self.registry,
        )
        self.history_write_lag = Histogram(
            "membrane_history_write_lag_seconds",
            "From a call's end (or its answer) until the call history committed it.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.history_pending = Gauge(
            "membrane_history_pending",
            "Ended calls this node has yet to write to the call history.",
            registry=self.registry,
        )
        self.history_dropped = Counter(
            "membrane_history_dropped_total",
            "Ended calls never written to the call history: more were waiting than the "
            "writer holds (each is also logged as an error).",
            registry=self.registry,
        )
        self.survey_answers = Counter(
            "membrane_survey_answers_total",
            "Answers to the question after the call, by site and group (promoter, passive, "
            "detractor); NPS is (promoters - detractors) / all.",
            ["site", "group"],
            registry=self.registry,
        )
        self.gc_pauses = Histogram(
            "membrane_gc_pause_seconds",
            "Garbage collector pauses of this node's process, by generation (2: everything).",
            ["generation"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.gc_pacer = Gauge(
            "membrane_gc_pacer",
            "1 while the collector pacer runs in this node's process (gateway/ops/gc_pacer.py).",
            registry=self.registry,
        )
        self.gc_frozen = Gauge(
            "membrane_gc_frozen_objects",
            "Objects the collector no longer walks (gc.freeze): the pacer's, as its hourly"
            " check (or a full collection) last counted them.",
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
            "How late each 10 ms tick of the node's event loop ran (a stall delays every "
            "connection).",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.dials = Counter(
            "membrane_callback_dials_total",
            "Outbound dial attempts by result (placed, busy, no_answer, voicemail, ...).",
            ["result"],
            registry=self.registry,
        )

        self.starts_shed = Counter(
            "membrane_starts_shed_total",
            "Call starts refused as overloaded, by the signal past its limit.",
            ["signal"],
            registry=self.registry,
        )
        self.loop_lag_smoothed = Gauge(
            "membrane_event_loop_lag_smoothed_seconds",
            "How late the node's event loop runs its ticks, smoothed: what admission control "
            "compares with server.max_loop_lag_ms.",
            registry=self.registry,
        )
        self.mobile_rings = Counter(
            "membrane_mobile_rings_total",
            "Rings of agents' own phones, by how each ended (accepted_by_key, declined_key, "
            "no_input, machine, busy, no_answer, failed, timeout, declined).",
            ["end"],
            registry=self.registry,
        )
        self.media_moves = Counter(
            "membrane_media_moves_total",
            "Bridged calls whose media worker died: moved to a new session (moved), or ended "
            "because they could not move (lost).",
            ["outcome"],
            registry=self.registry,
        )
        self.rings_dropped = Counter(
            "membrane_rings_dropped_total",
            "Rings not delivered to an agent's socket: expired on the way, or already over.",
            ["reason"],
            registry=self.registry,
        )

    def observe_gc(self, generation: int, pause_s: float, collected: int) -> None:
        self.gc_pauses.labels(str(generation)).observe(pause_s)
        if collected:
            self.gc_collected.labels(str(generation)).inc(collected)
