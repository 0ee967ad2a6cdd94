"""Overload: a node sheds new starts at once with a retry hint; a ring reaches the agent while
it is valid or not at all; one agent is never offered two calls at once, as their socket sees
it. Real nodes and socket.io clients; the admission rule itself as a table."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Node, NodeFactory, SocketClient, eventually, make_settings, replace
from test_calls import agent, fast_ring, session, visitor

from gateway.core.admission import Admission, AdmissionLimits, Load, StartLimit, admit_start
from gateway.core.ringing import Delivery, Offer, RingGate
from gateway.edge.http import appkeys
from gateway.edge.sio.sio_manager import ObservedRedisManager
from gateway.edge.sio.visitor import VisitorNamespace
from gateway.ops.clock import ManualClock

LIMITS = AdmissionLimits(
    max_loop_lag_s=0.02,
    max_starts_in_flight=4,
    max_emit_backlog=100,
    max_store_in_flight=50,
    min_retry_after_ms=200,
    max_retry_after_ms=2_000,
)


@pytest.mark.parametrize(
    ("load", "expected"),
    [
        (Load(), Admission(True)),
        (Load(0.019, 3, 99, 49), Admission(True)),
        (Load(loop_lag_s=0.02), Admission(False, "loop_lag", 200)),
        (Load(loop_lag_s=0.05), Admission(False, "loop_lag", 500)),
        (Load(loop_lag_s=9.0), Admission(False, "loop_lag", 2_000)),  # capped
        (Load(starts_in_flight=4), Admission(False, "starts_in_flight", 200)),
        (Load(emit_backlog=300), Admission(False, "emit_backlog", 600)),
        (Load(store_in_flight=75), Admission(False, "store_in_flight", 300)),
        # The worst signal names the refusal and sets the wait.
        (Load(0.03, 8, 0, 0), Admission(False, "starts_in_flight", 400)),
    ],
)
def test_admission_rule(load: Load, expected: Admission) -> None:
    assert admit_start(load, LIMITS) == expected


def test_the_learnt_allowance_caps_starts_in_flight_below_the_configured_one() -> None:
    assert admit_start(Load(starts_in_flight=1, starts_allowed=1), LIMITS) == Admission(
        False, "starts_in_flight", 200
    )
    assert admit_start(Load(starts_in_flight=1, starts_allowed=2), LIMITS).admit
    # Never above the configured maximum, whatever it learnt.
    assert not admit_start(Load(starts_in_flight=4, starts_allowed=9), LIMITS).admit


def test_slow_starts_lower_the_allowance_to_one_and_quick_ones_raise_it_back() -> None:
    limit = StartLimit.of(replace(LIMITS, max_start_s=0.015))
    assert limit.allowed == 4
    limit.finished(0.010)
    assert limit.allowed == 4, "quick starts keep the ceiling"
    limit.finished(0.030)
    assert limit.allowed == 3
    for _ in range(4):
        limit.finished(0.030)
    assert limit.allowed == 3, "the starts running alongside the first slow one are spared"
    for _ in range(40):
        limit.finished(0.200)
    assert limit.allowed == 1, "never below one: the node keeps routing and measuring"
    quick = 0
    while limit.allowed < 4:
        limit.finished(0.005)
        quick += 1
    assert 40 <= quick <= 120, f"back to the ceiling after {quick} quick starts"
    for _ in range(50):
        limit.finished(0.001)
    assert limit.allowed == 4


def test_a_limit_of_zero_refuses_every_start() -> None:
    decision = admit_start(Load(), AdmissionLimits(max_starts_in_flight=0))
    assert not decision.admit and decision.signal == "starts_in_flight"
    assert decision.retry_after_ms == AdmissionLimits().min_retry_after_ms


@pytest.fixture(params=["embedded", "redis"])
async def node(
    request: pytest.FixtureRequest, nodes: NodeFactory, tmp_path: Path, clock: ManualClock
) -> Node:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    return await nodes(fast_ring(make_settings(tmp_path, redis_url=url)), clock=clock)


def visitors_of(node: Node) -> VisitorNamespace:
    namespace = node.app[appkeys.SIO].namespace_handlers["/visitor"]
    assert isinstance(namespace, VisitorNamespace)
    return namespace


async def test_a_saturated_node_sheds_starts_at_once_and_reserves_nobody(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    anna = await agent(clients, node, "anna")
    s = await session(http, node)
    v = await visitor(clients, node, s["token"])
    load = visitors_of(node).load
    load.extra_lag_s = 1.0  # the event loop as if every event waited a second

    # More refusals than a visitor's start limit (5 a minute): a shed start is not counted.
    for _ in range(7):
        ack = await v.call("call:start", {}, "/visitor")
        assert ack["ok"] is False
        assert ack["error"]["code"] == "overloaded"
        assert ack["error"]["retry_after_ms"] >= AdmissionLimits().min_retry_after_ms
    store = node.app[appkeys.STORE]
    assert await store.open_call("acme", s["visitor_id"]) is None, "no call was stored"
    assert await store.reserve_agent("acme", "anna", "c_probe", 5), "Anna was not reserved"
    await store.release_agent("acme", "anna", "c_probe")
    assert anna.queue("call:ring").empty()
    metrics = node.app[appkeys.METRICS]
    assert metrics.starts_shed.labels("loop_lag")._value.get() == 7

    load.extra_lag_s = 0.0
    ack = await v.call("call:start", {}, "/visitor")
    assert ack["ok"] and ack["call"]["state"] == "ringing"
    assert (await anna.next("call:ring"))["call_id"] == ack["call"]["call_id"]


async def test_starts_past_the_in_flight_limit_are_shed(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    namespace = visitors_of(node)
    limits = namespace.limits
    namespace.limits = replace(limits, max_starts_in_flight=0)  # as if the node were full
    v = await visitor(clients, node, (await session(http, node))["token"])
    refused: Any = await v.call("call:start", {}, "/visitor")
    assert refused["error"]["code"] == "overloaded"
    assert refused["error"]["retry_after_ms"] > 0
    namespace.limits = limits
    assert (await v.call("call:start", {}, "/visitor"))["ok"]


async def test_a_node_whose_starts_are_slow_lets_one_run_at_a_time(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    await agent(clients, node, "anna")
    await agent(clients, node, "ben")
    load = visitors_of(node).load
    load.start_limit = StartLimit(ceiling=2, max_start_s=1e-9)  # every start is "slow"
    first = await visitor(clients, node, (await session(http, node))["token"])
    assert (await first.call("call:start", {}, "/visitor"))["ok"]
    assert load.start_limit.allowed == 1

    second = await visitor(clients, node, (await session(http, node))["token"])
    load.starts_in_flight += 1  # as if another start were still running
    try:
        refused = await second.call("call:start", {}, "/visitor")
    finally:
        load.starts_in_flight -= 1
    assert refused["error"]["code"] == "overloaded"
    metrics = node.app[appkeys.METRICS]
    assert metrics.starts_shed.labels("starts_in_flight")._value.get() == 1
    assert (await second.call("call:start", {}, "/visitor"))["ok"], "alone, it runs"


async def test_a_blocked_event_loop_shows_as_lag_at_once(node: Node) -> None:
    load = visitors_of(node).load
    assert load.loop_lag_s() < 0.1
    time.sleep(0.1)  # noqa: ASYNC251 - blocking the loop is the point
    assert load.loop_lag_s() >= 0.09, "the tick due during the block is overdue"


# --- one agent, one ring, while it is valid ---------------------------------------------------

ROOM = "agent:acme:anna"


def offer(call_id: str, expires_at: float, attempt: int = 1) -> Offer:
    return Offer(call_id, attempt, expires_at)


def test_the_gate_drops_a_ring_that_arrives_expired() -> None:
    gate = RingGate()
    assert gate.ring(ROOM, offer("c1", 100.0), now=100.0) == Delivery(False, dropped="expired")
    assert gate.showing(ROOM, 100.0) is None
    assert gate.ring(ROOM, offer("c1", 100.0), now=99.0) == Delivery(True)


def test_the_gate_drops_a_ring_whose_stop_came_first() -> None:
    gate = RingGate()
    gate.ring_stop(ROOM, "c1", 1, now=10.0)  # the stop overtook the ring
    assert gate.ring(ROOM, offer("c1", 30.0), now=11.0) == Delivery(False, dropped="over")
    # The same call ringing her again later (a callback's retry) is a new ring.
    assert gate.ring(ROOM, offer("c1", 90.0, attempt=2), now=70.0) == Delivery(True)
    # An end is remembered for a while, then forgotten.
    gate.ring_stop(ROOM, "c2", 1, now=100.0)
    assert gate.ring(ROOM, offer("c2", 400.0), now=100.0 + 121.0) == Delivery(True)


def test_the_gate_stops_an_older_ring_before_a_newer_one() -> None:
    gate = RingGate()
    first, second = offer("c1", 30.0), offer("c2", 35.0)
    assert gate.ring(ROOM, first, now=10.0) == Delivery(True)
    # c1 ended on the server (c2 holds her reservation) but its stop is still on its way.
    assert gate.ring(ROOM, second, now=15.0) == Delivery(True, stop_first=first)
    assert gate.showing(ROOM, 15.0) == second
    # c1's ring arriving again, or late from another node, is over.
    assert gate.ring(ROOM, first, now=16.0) == Delivery(False, dropped="over")
    # A ring older than the one showing (it was overtaken on its way) is stale.
    assert gate.ring(ROOM, offer("c0", 33.0), now=16.0) == Delivery(False, dropped="stale")
    assert gate.showing(ROOM, 16.0) == second
    # Rings of other agents do not interfere.
    assert gate.ring("agent:acme:ben", offer("c3", 40.0), now=16.0) == Delivery(True)
    gate.ring_stop(ROOM, "c2", 1, now=17.0)
    assert gate.showing(ROOM, 17.0) is None
    assert gate.ring(ROOM, offer("c4", 50.0), now=18.0) == Delivery(True)


class Recorder:
    """Every event a client receives, in the order received (SocketClient queues them per
    event), checked for two rings outstanding at once."""

    def __init__(self, client: SocketClient) -> None:
        self.events: list[tuple[str, Any]] = []
        self.outstanding: dict[str, float] = {}
        self.overlaps: list[tuple[str, list[str]]] = []
        self._client = client
        client.sio.on("*", self._record, namespace="*")

    async def _record(self, event: str, namespace: str, data: Any = None) -> None:
        self.events.append((event, data))
        now_ms = time.time() * 1000
        if event == "call:ring":
            self.outstanding = {c: t for c, t in self.outstanding.items() if t > now_ms}
            others = sorted(set(self.outstanding) - {data["call_id"]})
            if others:
                self.overlaps.append((data["call_id"], others))
            self.outstanding[data["call_id"]] = data["ring_expires_at"]
        elif event == "call:ring_stop":
            self.outstanding.pop(data["call_id"], None)
        await self._client._any(event, namespace, data)


def ring_payload(call_id: str, expires_in_s: float) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "channel": "webrtc",
        "visitor": {"id": "v_x", "language": None, "page": None, "returning": False},
        "expires_at": "",
        "reasons": [],
        "attempt": 1,
        "ring_expires_at": round((time.time() + expires_in_s) * 1000),
    }


@pytest.fixture
async def two_nodes(nodes: NodeFactory, tmp_path: Path, redis_url: str) -> tuple[Node, Node]:
    settings = fast_ring(make_settings(tmp_path, redis_url=redis_url))
    return await nodes(replace(settings, node_id="a")), await nodes(replace(settings, node_id="b"))


async def test_a_ring_that_reaches_the_agents_node_expired_is_not_delivered(
    two_nodes: tuple[Node, Node], clients: Callable[[], SocketClient]
) -> None:
    """A ring that spent its life in a backlog on the way (here: sent from the other node
    already expired) never reaches the agent; the next one, valid, does."""
    a, b = two_nodes
    anna = await agent(clients, a, "anna")
    sio_b = b.app[appkeys.SIO]
    await sio_b.emit("call:ring", ring_payload("c_late", -1.0), to=ROOM, namespace="/agent")
    await sio_b.emit("call:ring", ring_payload("c_fresh", 20.0), to=ROOM, namespace="/agent")
    assert (await anna.next("call:ring"))["call_id"] == "c_fresh"
    assert anna.queue("call:ring").empty()
    assert a.app[appkeys.METRICS].rings_dropped.labels("expired")._value.get() == 1


async def test_an_agent_is_stopped_from_one_ring_before_the_next_reaches_her(
    node: Node, clients: Callable[[], SocketClient]
) -> None:
    """Two rings for one agent reaching her node without the first one's stop in between
    (the stop is behind on its way from another node): she hears the first one stop first,
    and a late copy of it never rings."""
    anna = await agent(clients, node, "anna")
    seen = Recorder(anna)
    sio = node.app[appkeys.SIO]
    await sio.emit("call:ring", ring_payload("c_one", 20.0), to=ROOM, namespace="/agent")
    await sio.emit("call:ring", ring_payload("c_two", 21.0), to=ROOM, namespace="/agent")
    await sio.emit("call:ring", ring_payload("c_one", 20.0), to=ROOM, namespace="/agent")
    await sio.emit("call:ring_stop", {"call_id": "c_one", "reason": "declined"}, to=ROOM,
                   namespace="/agent")  # fmt: skip
    await anna.next("call:ring_stop", lambda m: m["reason"] == "declined")
    rings = [(e, d["call_id"], d.get("reason")) for e, d in seen.events if e.startswith("call:")]
    assert rings == [
        ("call:ring", "c_one", None),
        ("call:ring_stop", "c_one", "superseded"),
        ("call:ring", "c_two", None),
        ("call:ring_stop", "c_one", "declined"),
    ]
    assert seen.overlaps == []


async def test_an_accept_after_the_ring_ran_out_is_refused_and_ends_the_ring(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    """The ring timer may run behind on a busy node; an accept after the ring's end is
    refused all the same, and the ring is ended at once."""
    anna = await agent(clients, node, "anna")
    v = await visitor(clients, node, (await session(http, node))["token"])
    await v.call("call:start", {}, "/visitor")
    ring = await anna.next("call:ring")
    assert ring["attempt"] == 1
    assert ring["ring_expires_at"] == pytest.approx((node.clock.now() + 3.0) * 1000, abs=1)
    calls = node.app[appkeys.CALLS]
    # The ring just ran out for the call service, while the timer loop has not looked yet
    # (moving the node's clock would have it look at once).
    calls.records.clock = lambda: ring["ring_expires_at"] / 1000 + 0.001
    late = await anna.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
    assert late["error"]["code"] == "ring_expired"
    stop = await anna.next("call:ring_stop", timeout=1.0)
    assert stop == {"call_id": ring["call_id"], "attempt": 1, "reason": "no_answer"}
    failed = await v.next("call:update", lambda c: c["state"] == "failed", timeout=1.0)
    assert failed["reason"] == "no_agent_answered"


async def test_a_ring_held_up_on_its_way_never_overlaps_the_next(
    two_nodes: tuple[Node, Node], http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    """Anna's node falls behind on other nodes' emits: node B's ring, and its end when the
    visitor hangs up, wait in the backlog while her own node rings her for a new call. The
    old ring, arriving after the new one, must not ring her as well."""
    a, b = two_nodes
    anna = await agent(clients, a, "anna")
    seen = Recorder(anna)
    manager = a.app[appkeys.SIO].manager
    assert isinstance(manager, ObservedRedisManager)
    held: list[dict[str, Any]] = []
    deliver = manager._handle_emit

    async def backlog(message: dict[str, Any]) -> None:
        if message.get("host_id") == manager.host_id:
            await deliver(message)  # this node's own emits are not held up
        else:
            held.append(message)

    manager._handle_emit = backlog  # type: ignore[method-assign]
    v1 = await visitor(clients, b, (await session(http, b))["token"])
    first = (await v1.call("call:start", {}, "/visitor"))["call"]
    assert first["state"] == "ringing"
    await v1.call("call:cancel", {"call_id": first["call_id"]}, "/visitor")
    ringing = a.app[appkeys.CALLS].ringing
    presence = a.app[appkeys.PRESENCE]

    async def anna_free() -> bool:  # node A heard the ring end (node events are not held)
        return "anna" not in ringing.current("acme", presence.snapshot("acme"), time.time())

    await eventually(anna_free, 5)
    v2 = await visitor(clients, a, (await session(http, a))["token"])
    second = (await v2.call("call:start", {}, "/visitor"))["call"]
    assert second["state"] == "ringing"
    assert (await anna.next("call:ring"))["call_id"] == second["call_id"]
    rings = [m["event"] for m in held if m.get("event") in ("call:ring", "call:ring_stop")]
    assert rings == ["call:ring", "call:ring_stop"], "node B's ring and its end are held up"
    manager._handle_emit = deliver  # type: ignore[method-assign]
    for message in held:
        await deliver(message)
    await anna.next("call:ring_stop", lambda m: m["call_id"] == first["call_id"])
    assert [d["call_id"] for e, d in seen.events if e == "call:ring"] == [second["call_id"]]
    assert seen.overlaps == []
    assert a.app[appkeys.METRICS].rings_dropped.labels("stale")._value.get() == 1


def test_a_ring_cannot_be_answered_once_it_ran_out() -> None:
    from gateway.core import call as calls

    call = calls.new_call("c1", "acme", "v1", calls.CallChannel.WEBRTC, calls.CallRequest(), 0.0)
    ringing = calls.ring(call, "anna", "Anna", (), now=1.0, ring_timeout_s=20.0)
    assert calls.accept(ringing, "anna", "sid", now=20.9).state is calls.CallState.CONNECTED
    with pytest.raises(calls.CallError) as refused:
        calls.accept(ringing, "anna", "sid", now=21.0)
    assert refused.value.code == "ring_expired"
    assert not calls.ring_over(ringing, "ben", now=99.0), "it never rang Ben"


async def test_a_node_behind_on_other_nodes_emits_sheds_starts(
    two_nodes: tuple[Node, Node], http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    """Node A stops getting through node B's emits (its listener is stuck on one): they pile
    up unread, and A sheds new starts until it has caught up."""
    a, b = two_nodes
    manager = a.app[appkeys.SIO].manager
    assert isinstance(manager, ObservedRedisManager)
    namespace = visitors_of(a)
    namespace.limits = replace(namespace.limits, max_emit_backlog=3)
    stuck = asyncio.Event()
    deliver = manager._handle_emit

    async def slow(message: dict[str, Any]) -> None:
        if message.get("host_id") != manager.host_id:
            await stuck.wait()
        await deliver(message)

    manager._handle_emit = slow  # type: ignore[method-assign]
    sio_b = b.app[appkeys.SIO]
    lane_b = sio_b.manager._lane
    for i in range(6):
        await sio_b.emit("presence:update", {"n": i}, to="site:nobody", namespace="/board")
        await lane_b.execute("PING")  # six messages: emits back to back would go as one

    async def behind() -> bool:  # B's emits reach A through Redis
        return manager.backlog >= 4

    await eventually(behind, 5)
    v = await visitor(clients, a, (await session(http, a))["token"])
    refused = await v.call("call:start", {}, "/visitor")
    assert refused["error"]["code"] == "overloaded"
    assert a.app[appkeys.METRICS].starts_shed.labels("emit_backlog")._value.get() == 1

    stuck.set()

    async def caught_up() -> bool:
        return manager.backlog == 0

    await eventually(caught_up, 5)
    manager._handle_emit = deliver  # type: ignore[method-assign]
    await agent(clients, a, "anna")
    assert (await v.call("call:start", {}, "/visitor"))["ok"]
