"""The question after the call: answered with the ticket's token after a browser call (the
widget's way; the widget itself is in tests/test_browser_e2e.py), or by text after a phone
call; once per call; promoters offered the site's referral link; tallies per agent and per
branch for supervisors. Two gateway nodes share one Redis; agents and visitors are real
socket.io clients; phones and texts are the Twilio simulator; time is a ManualClock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import test_callbacks
from conftest import Node, NodeFactory, SocketClient, eventually, mint, replace
from test_callbacks import (
    ANNA_PHONE,
    VISITOR_PHONE,
    agent,
    phone_node,
    phone_settings,
    request_callback,
    visitor_token,
)
from test_tickets import iso
from twilio_sim import TwilioSim

from gateway.core.model import Role
from gateway.edge.http import appkeys as keys
from gateway.ops.clock import ManualClock

WAIT_S = 10.0
REFERRAL = "https://acme.example/refer"
sim = test_callbacks.sim  # the fixture: a Twilio simulator


@pytest.fixture
async def two_nodes(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, redis_url: str, clock: ManualClock
) -> tuple[Node, Node]:
    made = []
    for node_id in ("a", "b"):
        settings = phone_settings(tmp_path, sim, redis_url)
        site = replace(settings.sites["acme"], referral_url=REFERRAL)
        settings = replace(settings, node_id=node_id, sites={"acme": site})
        made.append(await phone_node(nodes, settings, clock))
    a, b = made
    sim.messaging.number(site.caller_ids[0], sms_url=f"{b.url}/v1/twilio/sms")
    return a, b


async def browser_call(
    clients: Callable[[], SocketClient],
    http: aiohttp.ClientSession,
    node: Node,
    talk: bool,
    agent_node: Node | None = None,
) -> dict[str, Any]:
    """A browser call on ``node`` to Anna (on ``agent_node``, else the same), who answers
    (``talk``, then the visitor hangs up) or declines; its start ack."""
    anna = await agent(clients, agent_node or node, "anna")
    visitor = clients()
    await visitor.connect(node.url, "/visitor", {"token": await visitor_token(http, node)})
    ack = await visitor.call("call:start", {"language": "en"}, "/visitor")
    call_id = ack["call"]["call_id"]
    if talk:
        await anna.call("call:accept", {"call_id": call_id}, "/agent")
        await visitor.call("call:cancel", {"call_id": call_id}, "/visitor")
    else:
        await anna.call("call:decline", {"call_id": call_id}, "/agent")
    await visitor.next("call:update", lambda c: c["state"] in ("completed", "failed"))
    await anna.close()
    return dict(ack)


async def answer(
    http: aiohttp.ClientSession, node: Node, started: dict[str, Any], body: Any
) -> tuple[int, dict[str, Any]]:
    r = await http.post(
        f"{node.url}/v1/calls/{started['call']['call_id']}/survey",
        params={"token": started["status_token"]},
        json=body,
    )
    return r.status, await r.json()


async def scores(http: aiohttp.ClientSession, node: Node, token: str) -> tuple[int, Any]:
    r = await http.get(
        f"{node.url}/v1/sites/acme/survey-scores", headers={"Authorization": f"Bearer {token}"}
    )
    return r.status, await r.json()


async def test_after_a_browser_call_the_customer_answers_once_and_a_promoter_gets_the_link(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    a, b = two_nodes
    started = await browser_call(clients, http, a, talk=True)
    status, answered = await answer(http, b, started, {"score": 9, "comment": " Lovely "})
    assert status == 200, answered
    assert answered["referral_url"] == REFERRAL
    assert answered["call"]["timeline"][-1]["event"] == "survey"
    status, again = await answer(http, a, started, {"score": 3})
    assert (status, again["error"]["code"]) == (409, "already_answered")
    # A passive is thanked without the link (the call of another visitor).
    other = await browser_call(clients, http, b, talk=True)
    status, passive = await answer(http, a, other, {"score": 7})
    assert status == 200 and passive["referral_url"] is None
    # What a supervisor of the site sees, on either node.
    status, seen = await scores(http, b, mint(b.settings, "sam", Role.SUPERVISOR))
    assert status == 200, seen
    assert seen["agents"] == [
        {
            "id": "anna",
            "name": "Anna",
            "responses": 2,
            "promoters": 1,
            "passives": 1,
            "detractors": 0,
            "nps": 50.0,
        }
    ]
    assert [(r["id"], r["name"], r["responses"]) for r in seen["branches"]] == [
        ("dublin", "Dublin", 2)
    ]


async def test_bad_answers_and_callers_are_refused_with_a_code(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    a, _ = two_nodes
    declined = await browser_call(clients, http, a, talk=False)
    status, body = await answer(http, a, declined, {"score": 5})
    assert (status, body["error"]["code"]) == (409, "no_survey"), "nobody talked to them"
    talked = await browser_call(clients, http, a, talk=True)
    for bad in ({"score": 11}, {"score": "9"}, {"score": 9, "comment": "x" * 1001}, [9]):
        status, body = await answer(http, a, talked, bad)
        assert (status, body["error"]["code"]) == (400, "invalid_payload"), bad
    forged = {**talked, "status_token": "x" * 32}
    status, body = await answer(http, a, forged, {"score": 9})
    assert (status, body["error"]["code"]) == (404, "not_found")
    # Tallies are a supervisor's, of their own site only.
    assert (await scores(http, a, mint(a.settings, "anna")))[0] == 403
    # (a token for a site this gateway does not serve names no configured agent: 404)
    assert (await scores(http, a, mint(a.settings, "sam", Role.SUPERVISOR, "globex")))[0] in (
        403,
        404,
    )


async def test_after_a_phone_call_the_question_is_texted_and_the_texted_score_answers_it(
    two_nodes: tuple[Node, Node],
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
) -> None:
    a, _ = two_nodes
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=30)
    sim.phone(ANNA_PHONE, answer_after=1)
    anna = await agent(clients, a, "anna")
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    await clock.advance(601)
    await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"], WAIT_S)
    assert (await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent"))["ok"]
    leg = await sim.wait_for_call(to=VISITOR_PHONE, status="in-progress", timeout=WAIT_S)
    await anna.next("call:update", lambda c: c["state"] == "connected", WAIT_S)
    sim.hangup(leg.sid)

    def asked() -> list[str]:
        return [
            m.body
            for m in sim.messaging.sent_to(VISITOR_PHONE)
            if "recommend us to a friend" in m.body
        ]

    async def was_asked() -> bool:
        return len(asked()) == 1

    await eventually(was_asked, WAIT_S)
    assert asked()[0].startswith("Acme Telecom: thanks for talking to us.")

    caller_id = a.settings.sites["acme"].caller_ids[0]
    reply = await sim.messaging.text(VISITOR_PHONE, caller_id, "6 - it took two tries")
    assert reply.reply_bodies == ["Acme Telecom: thank you for your answer!"]
    # The webhook replayed: answered once, counted once.
    replayed = await sim.messaging.text(
        VISITOR_PHONE, caller_id, "6 - it took two tries", message_sid=reply.sid
    )
    assert replayed.reply_bodies == []
    row = await a.app[keys.STORE].get_call(created["call_id"])
    assert row is not None
    assert (row.data["survey_score"], row.data["survey_comment"]) == (6, "it took two tries")
    r = await http.get(
        f"{a.url}/v1/calls/{created['call_id']}", params={"token": created["status_token"]}
    )
    assert (await r.json())["timeline"][-1]["event"] == "survey"
    status, seen = await scores(http, a, mint(a.settings, "sam", Role.SUPERVISOR))
    assert seen["agents"][0]["detractors"] == 1 and seen["agents"][0]["responses"] == 1
