"""Overload: a node sheds new starts at once with a retry hint; a ring reaches the agent while
it is valid or not at all; one agent is never offered two calls at once, as their socket sees
it. Real nodes and socket.io clients; the admission rule itself as a table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Node, NodeFactory, SocketClient, make_settings
from test_calls import agent, fast_ring, session, visitor

from gateway import appkeys
from gateway.admission import Admission, AdmissionLimits, Load, admit_start
from gateway.sockets import VisitorNamespace

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


def test_a_limit_of_zero_refuses_every_start() -> None:
    decision = admit_start(Load(), AdmissionLimits(max_starts_in_flight=0))
    assert not decision.admit and decision.signal == "starts_in_flight"
    assert decision.retry_after_ms == AdmissionLimits().min_retry_after_ms


@pytest.fixture(params=["embedded", "redis"])
async def node(request: pytest.FixtureRequest, nodes: NodeFactory, tmp_path: Path) -> Node:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    return await nodes(fast_ring(make_settings(tmp_path, redis_url=url)))


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
    load.extra_lag_s = 0.5  # the event loop as if every event waited half a second

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
    namespace.limits = AdmissionLimits(max_starts_in_flight=0)  # as if the node were full
    v = await visitor(clients, node, (await session(http, node))["token"])
    refused: Any = await v.call("call:start", {}, "/visitor")
    assert refused["error"]["code"] == "overloaded"
    assert refused["error"]["retry_after_ms"] > 0
    namespace.limits = AdmissionLimits()
    assert (await v.call("call:start", {}, "/visitor"))["ok"]


async def test_a_blocked_event_loop_shows_as_lag_at_once(node: Node) -> None:
    import time

    load = visitors_of(node).load
    assert load.loop_lag_s() < 0.1
    time.sleep(0.1)  # noqa: ASYNC251 - blocking the loop is the point
    assert load.loop_lag_s() >= 0.09, "the tick due during the block is overdue"
