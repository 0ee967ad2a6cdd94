"""Promises kept, or updated first: a callback about to run late is told so before its time,
by text and on its ticket page, with the new time and the choice to keep its place; a
customer waiting past their time hears from us every reminder interval; STOP stops the
texts (START brings them back) and a callback's texts are capped. Two gateway nodes share
one Redis; agents and visitors are real socket.io clients; phones and texts are the Twilio
simulator; time is a ManualClock the test moves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import test_callbacks
from conftest import Node, NodeFactory, SocketClient, eventually, replace
from test_callbacks import (
    VISITOR_PHONE,
    agent,
    phone_node,
    phone_settings,
    request_callback,
    visitor_token,
)
from test_tickets import TicketStream, iso
from twilio_sim import TwilioSim
from yarl import URL

from gateway.core.model import Site
from gateway.edge.http import appkeys as keys
from gateway.ops.clock import ManualClock

WAIT_S = 10.0
sim = test_callbacks.sim  # the fixture: a Twilio simulator
MEAN_HANDLE_S = 240  # gateway.core.availability.DEFAULT_MEAN_HANDLE_S: no call has ended yet


def texts_to(sim: TwilioSim, number: str) -> list[str]:
    """The bodies of the texts the gateway sent ``number`` (not Twilio's own replies)."""
    return [m.body for m in sim.messaging.sent_to(number) if m.direction == "outbound-api"]


async def until_texted(sim: TwilioSim, count: int) -> list[str]:
    async def texted() -> bool:
        return len(texts_to(sim, VISITOR_PHONE)) >= count

    await eventually(texted, WAIT_S)
    return texts_to(sim, VISITOR_PHONE)


@pytest.fixture
async def two_nodes(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, redis_url: str, clock: ManualClock
) -> tuple[Node, Node]:
    policy = {
        "late_after_s": 60,
        "late_notice_ahead_s": 600,
        "reminder_interval_s": 600,
        "max_texts": 4,
    }
    a = await phone_node(
        nodes, replace(phone_settings(tmp_path, sim, redis_url, **policy), node_id="a"), clock
    )
    b = await phone_node(
        nodes, replace(phone_settings(tmp_path, sim, redis_url, **policy), node_id="b"), clock
    )
    caller_id = a.settings.sites["acme"].caller_ids[0]
    sim.messaging.number(caller_id, sms_url=f"{b.url}/v1/twilio/sms")
    return a, b


@pytest.fixture
async def page(http: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Any]]:
    opened: list[TicketStream] = []

    async def open_page(node: Node, call_id: str, token: str) -> TicketStream:
        r = await http.get(f"{node.url}/v1/calls/{call_id}/stream", params={"token": token})
        assert r.status == 200, await r.text()
        opened.append(TicketStream(r))
        return opened[-1]

    yield open_page
    for stream in opened:
        stream.close()


def site(node: Node) -> Site:
    return node.settings.sites["acme"]


async def anna_on_a_call(
    clients: Callable[[], SocketClient], http: aiohttp.ClientSession, node: Node
) -> SocketClient:
    """Anna, the only agent, talking to a browser visitor: busy, and soon free."""
    anna = await agent(clients, node, "anna")
    visitor = clients()
    await visitor.connect(node.url, "/visitor", {"token": await visitor_token(http, node)})
    ack = await visitor.call("call:start", {"language": "en"}, "/visitor")
    assert ack["ok"] and ack["call"]["state"] == "ringing", ack
    await anna.call("call:accept", {"call_id": ack["call"]["call_id"]}, "/agent")
    await visitor.next("call:update", lambda c: c["state"] == "connected")
    return anna


def token_of(link: str) -> tuple[str, str]:
    """The call id and status token of a ticket link in a text."""
    url = URL(link)
    return url.path.rsplit("/", 1)[1], url.fragment


async def test_a_callback_about_to_run_late_is_told_before_its_time_and_may_keep_its_place(
    two_nodes: tuple[Node, Node],
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
    page: Callable[..., Any],
) -> None:
    a, b = two_nodes
    await anna_on_a_call(clients, http, a)
    at = round(clock.now()) + 1200
    status, created = await request_callback(http, a, {"phone": VISITOR_PHONE, "at": iso(at)})
    assert status == 201, created
    [confirmation] = await until_texted(sim, 1)
    assert created["ticket_url"] in confirmation
    ticket = await page(b, created["call_id"], created["status_token"])
    shown = await ticket.until("scheduled")
    assert shown["promised_at"] == iso(at).replace("+00:00", "Z") or shown["promised_at"]
    assert shown["late"] is False

    # 10 minutes before the time: Anna is still on her call, so the callback will come about
    # one mean call later than promised, more than the site's 60 s: the customer is told now.
    await clock.advance(at - 600 - clock.now())
    shown = await ticket.until_shown(lambda c: c["late"], "late")
    assert shown["state"] == "scheduled" and shown["timeline"][-1]["event"] == "late"
    promised = shown["promised_at"]
    assert promised > shown["scheduled_at"]
    texts = await until_texted(sim, 2)
    late = texts[1]
    assert late.startswith(f"{site(a).name}: sorry, we're running late.")
    assert "Reply STOP to opt out." in late
    # The text's link opens the ticket on either node: the token is derived, never stored.
    link = next(word for word in late.split() if word.startswith("http"))
    call_id, token = token_of(link)
    assert call_id == created["call_id"]
    r = await http.get(f"{a.url}/v1/calls/{call_id}", params={"token": token})
    assert r.status == 200 and (await r.json())["late"] is True

    # The customer keeps their place: the choice goes, the new time stays.
    r = await http.post(f"{a.url}/v1/calls/{call_id}/keep", params={"token": token})
    kept = await r.json()
    assert r.status == 200, kept
    assert kept["late"] is False and kept["promised_at"] == promised
    assert kept["timeline"][-1]["event"] == "kept"
    shown = await ticket.until_shown(lambda c: not c["late"], "kept")
    # Keeping again changes nothing; a wrong token learns nothing.
    again = await http.post(f"{a.url}/v1/calls/{call_id}/keep", params={"token": token})
    assert (await again.json())["timeline"] == kept["timeline"]
    wrong = await http.post(f"{a.url}/v1/calls/{call_id}/keep", params={"token": "x" * 32})
    assert wrong.status == 404

    # The new promise holds (Anna is due free by then): no second notice at the old time.
    await clock.advance(at - clock.now() + 1)
    r = await http.get(f"{b.url}/v1/calls/{call_id}", params={"token": token})
    now_shown = await r.json()
    assert now_shown["state"] == "queued" and not now_shown["late"]
    assert [e["event"] for e in now_shown["timeline"]].count("late") == 1
    assert len(texts_to(sim, VISITOR_PHONE)) == 2


async def test_a_waiting_customer_hears_from_us_every_interval_until_stop_and_within_the_cap(
    two_nodes: tuple[Node, Node],
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clock: ManualClock,
    page: Callable[..., Any],
) -> None:
    """Nobody is working, so no time can be promised; the customer still never waits more
    than the reminder interval (600 s here) without word from us."""
    a, _ = two_nodes
    caller_id = site(a).caller_ids[0]
    status, created = await request_callback(http, a, {"phone": VISITOR_PHONE})
    assert status == 201, created
    assert created["call"]["state"] == "queued" and created["call"]["promised_at"] is None
    await until_texted(sim, 1)
    ticket = await page(a, created["call_id"], created["status_token"])
    await ticket.until("queued")

    seen: list[str] = []

    async def reminded(what: str) -> dict[str, Any]:
        """The next reminder on the page. Reminders with nothing between them are one
        timeline entry, at the latest one's time (a long wait keeps a short timeline)."""
        await clock.advance(600)
        shown: dict[str, Any] = await ticket.until_shown(
            lambda c: (
                c["timeline"][-1]["event"] == "reminder" and c["timeline"][-1]["at"] not in seen
            ),
            what,
        )
        assert [e["event"] for e in shown["timeline"]].count("reminder") == 1
        seen.append(shown["timeline"][-1]["at"])
        return shown

    await reminded("a reminder")
    texts = await until_texted(sim, 2)
    assert texts[1].startswith(f"{site(a).name}: you're still on our list")
    # The link of whichever node sent it (both serve the page), with the ticket's token.
    assert created["ticket_url"].split("/t/", 1)[1] in texts[1]

    # STOP (to node b's webhook): Twilio answers it; no text of ours goes any more, but the
    # ticket page still shows every reminder.
    stop = await sim.messaging.text(VISITOR_PHONE, caller_id, "Stop")
    assert stop.reply_bodies[0].startswith("You have successfully been unsubscribed")
    await reminded("a second reminder")
    # START: the texts come back.
    await sim.messaging.text(VISITOR_PHONE, caller_id, "START")
    await reminded("a third reminder")
    texts = await until_texted(sim, 3)
    assert texts[2].startswith(f"{site(a).name}: you're still on our list")
    # The site's cap: four texts about one callback, the confirmation included.
    await reminded("a fourth reminder")
    await until_texted(sim, 4)
    shown = await reminded("a fifth reminder")
    assert shown["state"] == "queued"
    assert len(texts_to(sim, VISITOR_PHONE)) == 4
    # The STOP window (between the second and third reminders) got no text.
    assert sum(1 for t in texts_to(sim, VISITOR_PHONE) if "still on our list" in t) == 3


async def test_a_customer_who_said_stop_gets_no_confirmation_for_a_new_callback(
    two_nodes: tuple[Node, Node], sim: TwilioSim, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    a, _ = two_nodes
    await sim.messaging.text(VISITOR_PHONE, site(a).caller_ids[0], "stop")
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 1800)}
    )
    assert status == 201, created
    texts = a.app[keys.CALLBACKS].customer_texts
    assert texts is not None

    async def withheld() -> bool:
        return texts.withheld["opted_out"] == 1

    await eventually(withheld, WAIT_S)
    assert texts_to(sim, VISITOR_PHONE) == []
