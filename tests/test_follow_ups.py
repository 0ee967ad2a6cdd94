"""Follow-ups by the same person: at the end of a call its agent promises to call the customer
back; the promise is a scheduled callback pinned to her, on the customer's same ticket. When
she is not free at its time, the site's policy waits for her up to a limit, or hands it to a
colleague of her branch at once, who sees her note; the customer is told which. Two gateway
nodes share one Redis; agents and visitors are real socket.io clients; the phones are the
Twilio simulator; time is a ManualClock the test moves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import test_callbacks
from conftest import Node, NodeFactory, SocketClient, replace
from test_callbacks import VISITOR_PHONE, agent, phone_node, phone_settings, visitor_token
from test_tickets import iso
from twilio_sim import TwilioSim

from gateway.core.model import Agent, FollowUpPolicy
from gateway.ops.clock import ManualClock
from gateway.settings import Settings

WAIT_S = 10.0
sim = test_callbacks.sim  # the fixture: a Twilio simulator
# Two agents of the branch that never closes: the follow-up's agent and her colleague.
TEAM = {
    "olivia": Agent("olivia", "acme", "Olivia Byrne", "online", ("en",), (), "+353871230001"),
    "oscar": Agent("oscar", "acme", "Oscar Walsh", "online", ("en",), (), "+353871230002"),
}


def team_settings(
    tmp_path: Path, sim: TwilioSim, redis_url: str, node_id: str, **policy: Any
) -> Settings:
    settings = phone_settings(tmp_path, sim, redis_url, **policy)
    site = settings.sites["acme"]
    site = replace(site, agents={**site.agents, **TEAM})
    return replace(settings, node_id=node_id, sites={"acme": site})


async def two_nodes(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, redis_url: str, clock: ManualClock, **p: Any
) -> tuple[Node, Node]:
    a = await phone_node(nodes, team_settings(tmp_path, sim, redis_url, "a", **p), clock)
    b = await phone_node(nodes, team_settings(tmp_path, sim, redis_url, "b", **p), clock)
    return a, b


async def talked(
    clients: Callable[[], SocketClient], http: aiohttp.ClientSession, node: Node, olivia: Any
) -> dict[str, Any]:
    """A browser visitor talked with Olivia and hung up; the call's start ack."""
    visitor = clients()
    await visitor.connect(node.url, "/visitor", {"token": await visitor_token(http, node)})
    ack = await visitor.call("call:start", {"language": "en"}, "/visitor")
    assert ack["ok"] and ack["call"]["agent"]["name"] == "Olivia Byrne", ack
    call_id = ack["call"]["call_id"]
    assert (await olivia.call("call:accept", {"call_id": call_id}, "/agent"))["ok"]
    await visitor.call("call:cancel", {"call_id": call_id}, "/visitor")
    await olivia.next("call:update", lambda c: c["state"] == "completed")
    await visitor.close()
    return dict(ack)


async def ticket(
    http: aiohttp.ClientSession, node: Node, call_id: str, token: str
) -> dict[str, Any]:
    r = await http.get(f"{node.url}/v1/calls/{call_id}", params={"token": token})
    assert r.status == 200, await r.text()
    body: dict[str, Any] = await r.json()
    return body


def events(call: dict[str, Any]) -> list[str]:
    return [e["event"] for e in call["timeline"]]


async def test_the_agent_promises_a_follow_up_and_is_the_one_rung_at_its_time_with_her_note(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    a, b = await two_nodes(nodes, tmp_path, sim, redis_url, clock)
    olivia = await agent(clients, a, "olivia")
    started = await talked(clients, http, a, olivia)
    call_id, token = started["call"]["call_id"], started["status_token"]
    oscar = await agent(clients, b, "oscar")  # free, but it is not his to take

    at = round(clock.now()) + 1200
    ask = {
        "call_id": call_id,
        "at": iso(at),
        "note": "Check the router log",
        "phone": VISITOR_PHONE,
    }
    ack = await olivia.call("call:follow_up", ask, "/agent")
    assert ack["ok"], ack
    follow_up = ack["follow_up"]
    assert follow_up["state"] == "scheduled" and follow_up["channel"] == "callback"
    assert follow_up["agent"]["name"] == "Olivia Byrne" and follow_up["phone"] == VISITOR_PHONE
    assert ack["call"]["follow_up"]["call_id"] == follow_up["call_id"]
    # The customer's ticket, on the other node, names it; the same token opens the follow-up.
    first = await ticket(http, b, call_id, token)
    assert first["follow_up"] == {
        "call_id": follow_up["call_id"],
        "at": first["follow_up"]["at"],
        "agent": {"name": "Olivia Byrne", "branch": "Online team"},
    }
    assert events(first)[-1] == "follow_up"
    shown = await ticket(http, b, follow_up["call_id"], token)
    assert shown["state"] == "scheduled" and shown["agent"]["name"] == "Olivia Byrne"
    assert shown["promised_at"] == first["follow_up"]["at"]
    assert "note" not in str(shown) and "router" not in str(shown), "the note is the agents'"

    # Promised once: a second promise of the same call is refused.
    again = await olivia.call("call:follow_up", ask, "/agent")
    assert again["error"]["code"] == "follow_up_exists"

    await clock.advance(at - clock.now() + 1)
    ring = await olivia.next("call:ring", lambda r: r["call_id"] == follow_up["call_id"], WAIT_S)
    assert ring["follow_up"] == {"promised_by": "Olivia Byrne", "note": "Check the router log"}
    assert oscar.pending("call:ring") == []


@pytest.mark.parametrize("policy", ["wait", "colleague"])
async def test_a_follow_up_whose_agent_is_not_free_goes_by_the_sites_policy(
    policy: str,
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    a, b = await two_nodes(
        nodes,
        tmp_path,
        sim,
        redis_url,
        clock,
        follow_up_policy=FollowUpPolicy(policy),
        follow_up_wait_s=600,
    )
    olivia = await agent(clients, a, "olivia")
    started = await talked(clients, http, a, olivia)
    call_id, token = started["call"]["call_id"], started["status_token"]
    at = round(clock.now()) + 1200
    ack = await olivia.call(
        "call:follow_up",
        {"call_id": call_id, "at": iso(at), "note": "Refund approved", "phone": VISITOR_PHONE},
        "/agent",
    )
    follow_up_id = ack["follow_up"]["call_id"]
    await olivia.close()  # gone home
    oscar = await agent(clients, b, "oscar")

    await clock.advance(at - clock.now() + 1)
    if policy == "wait":
        # Only Olivia may take it for 10 minutes: the customer is told we wait for her.
        shown = await ticket(http, b, follow_up_id, token)
        assert shown["state"] == "queued" and events(shown)[-1] == "waiting_for_agent"
        assert shown["agent"]["name"] == "Olivia Byrne"
        assert oscar.pending("call:ring") == []
        await clock.advance(600)
    ring = await oscar.next("call:ring", lambda r: r["call_id"] == follow_up_id, WAIT_S)
    assert ring["follow_up"] == {"promised_by": "Olivia Byrne", "note": "Refund approved"}
    shown = await ticket(http, b, follow_up_id, token)
    assert "colleague" in events(shown)
    told = next(e for e in shown["timeline"] if e["event"] == "colleague")
    assert told["detail"].startswith("Olivia isn't free, so a colleague will call you")
    assert shown["agent"]["name"] == "Oscar Walsh"  # rung now: the customer sees who


async def test_only_the_calls_agent_may_promise_and_bad_promises_are_refused_with_a_code(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    a, b = await two_nodes(nodes, tmp_path, sim, redis_url, clock)
    olivia = await agent(clients, a, "olivia")
    started = await talked(clients, http, a, olivia)
    call_id = started["call"]["call_id"]
    oscar = await agent(clients, b, "oscar")
    later = iso(round(clock.now()) + 1200)

    async def refused(who: SocketClient, payload: Any) -> str:
        ack = await who.call("call:follow_up", payload, "/agent")
        assert ack["ok"] is False, ack
        return str(ack["error"]["code"])

    ask = {"call_id": call_id, "at": later, "phone": VISITOR_PHONE}
    assert await refused(oscar, ask) == "not_your_call"
    assert await refused(olivia, {"call_id": call_id, "at": later}) == "invalid_phone"
    assert await refused(olivia, {**ask, "phone": "+1900555"}) == "invalid_phone"
    assert await refused(olivia, {**ask, "at": iso(clock.now())}) == "slot_unavailable"
    assert await refused(olivia, {**ask, "at": "Thursday"}) == "invalid_payload"
    assert await refused(olivia, {**ask, "note": "x" * 501}) == "invalid_payload"
    assert await refused(olivia, {**ask, "call_id": "c_" + "0" * 32}) == "not_found"
    assert await refused(olivia, ["not", "an", "object"]) == "invalid_payload"


async def test_a_promise_sent_twice_at_once_is_made_once(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Two tabs of the agent app, on two nodes, send the same promise at once: one follow-up,
    and the other tab is told it exists."""
    a, b = await two_nodes(nodes, tmp_path, sim, redis_url, clock)
    olivia = await agent(clients, a, "olivia")
    started = await talked(clients, http, a, olivia)
    other_tab = await agent(clients, b, "olivia")
    ask = {
        "call_id": started["call"]["call_id"],
        "at": iso(round(clock.now()) + 1200),
        "phone": VISITOR_PHONE,
    }
    acks = await asyncio.gather(
        olivia.call("call:follow_up", ask, "/agent"),
        other_tab.call("call:follow_up", ask, "/agent"),
    )
    assert sorted(ack["ok"] for ack in acks) == [False, True], acks
    [refused] = [ack for ack in acks if not ack["ok"]]
    assert refused["error"]["code"] == "follow_up_exists"
    [made] = [ack for ack in acks if ack["ok"]]
    shown = await ticket(http, b, made["follow_up"]["call_id"], started["status_token"])
    assert shown["state"] == "scheduled"
