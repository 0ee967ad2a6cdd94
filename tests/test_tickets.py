"""The customer's live ticket over REST and Server-Sent Events: followed from another node
than the one that changes the call, moved and canceled with the status token, and telling a
wrong token nothing. Two gateway nodes share one Redis; agents are real socket.io clients;
phones are the Twilio simulator; time is a ManualClock the test moves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import test_callbacks
from conftest import Node, NodeFactory, SocketClient, eventually, replace
from test_callbacks import (
    ANNA_PHONE,
    VISITOR_PHONE,
    agent,
    phone_node,
    phone_settings,
    request_callback,
    visitor_token,
)
from twilio_sim import TwilioSim

from gateway.core import callback as cb
from gateway.core.call import CallRequest
from gateway.edge.http import appkeys as keys
from gateway.ops.clock import ManualClock
from gateway.store.base import CallRow
from gateway.wire.codec import call_to_record

WAIT_S = 10.0
sim = test_callbacks.sim  # the fixture: a Twilio simulator


class TicketStream:
    """One ticket page's event stream, read as a browser's EventSource would."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.shown: dict[str, Any] | None = None
        self.version = 0

    async def frame(self, wanted: str = "ticket") -> dict[str, Any]:
        """The next ``wanted`` event's data."""
        event, data = "", ""
        while True:
            line = (await self.response.content.readline()).decode()
            if line == "":
                raise EOFError("the stream ended")
            line = line.rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and event:
                if event == wanted:
                    frame: dict[str, Any] = json.loads(data)
                    return frame
                event, data = "", ""

    async def ended(self) -> bool:
        """Whether the stream ends (before WAIT_S)."""
        async with asyncio.timeout(WAIT_S):
            return await self.response.content.read() is not None

    async def until(self, state: str, timeout: float = WAIT_S) -> dict[str, Any]:
        """Frames until the call shown is in ``state``, as a page shows them: never an
        older version than the one it shows."""
        return await self.until_shown(lambda call: call["state"] == state, state, timeout)

    async def until_shown(
        self, shows: Callable[[dict[str, Any]], bool], what: str, timeout: float = WAIT_S
    ) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await self.frame()
                    if frame["version"] < self.version:
                        continue
                    self.version, self.shown = frame["version"], frame["call"]
                    if shows(self.shown):
                        return self.shown
        except TimeoutError:
            raise AssertionError(f"never {what}; the page shows {self.shown}") from None

    def close(self) -> None:
        self.response.close()


@pytest.fixture
async def two_nodes(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, redis_url: str, clock: ManualClock
) -> tuple[Node, Node]:
    settings = phone_settings(tmp_path, sim, redis_url)
    a = await phone_node(nodes, replace(settings, node_id="node-a"), clock)
    b_settings = phone_settings(tmp_path, sim, redis_url)
    b = await phone_node(nodes, replace(b_settings, node_id="node-b"), clock)
    return a, b


@pytest.fixture
async def streams(http: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Any]]:
    opened: list[TicketStream] = []

    async def open_stream(node: Node, created: dict[str, Any], token: str | None = None) -> Any:
        r = await http.get(
            f"{node.url}/v1/calls/{created['call_id']}/stream",
            params={"token": token or created["status_token"]},
        )
        if r.status != 200:
            return r
        stream = TicketStream(r)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


async def test_a_page_on_another_node_follows_a_callback_from_request_to_completion(
    two_nodes: tuple[Node, Node],
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
    streams: Callable[..., Any],
) -> None:
    a, b = two_nodes
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=30)
    sim.phone(ANNA_PHONE, answer_after=1)
    anna = await agent(clients, a, "anna")
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    page = await streams(b, created)
    shown = await page.until("scheduled")
    assert 590 <= shown["eta_s"] <= 601 and shown["scheduled_at"], shown

    # Moved on node A; the page on node B shows the new time.
    moved = await http.post(
        f"{a.url}/v1/calls/{created['call_id']}/move",
        params={"token": created["status_token"]},
        json={"at": iso(clock.now() + 1200)},
    )
    assert moved.status == 200, await moved.text()
    shown = await page.until("scheduled")
    assert 1190 <= shown["eta_s"] <= 1201, shown
    assert shown["timeline"][-1]["event"] == "moved"

    # Its time comes: Anna is rung on node A, accepts, the phones talk, the visitor hangs up.
    await clock.advance(1201)  # past it: the time went over the wire rounded to the ms
    shown = await page.until("ringing")
    assert shown["agent"] == {"name": "Anna", "branch": "Dublin"}, shown
    ack = await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent")
    assert ack["ok"], ack
    leg = await sim.wait_for_call(to=VISITOR_PHONE, status="in-progress", timeout=WAIT_S)
    await page.until("connected")
    sim.hangup(leg.sid)
    done = await page.until("completed")
    events = [e["event"] for e in done["timeline"]]
    assert events[:2] == ["requested", "moved"] and events[-1] == "completed", events
    assert "routed" not in events, "routing reasons are the agents' only"


async def test_a_canceled_callback_shows_as_canceled_on_every_page_and_cannot_be_moved(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clock: ManualClock,
    streams: Callable[..., Any],
) -> None:
    a, b = two_nodes
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    phone, laptop = await streams(a, created), await streams(b, created)
    await phone.until("scheduled")
    await laptop.until("scheduled")
    r = await http.delete(
        f"{b.url}/v1/calls/{created['call_id']}", params={"token": created["status_token"]}
    )
    assert r.status == 200
    for page in (phone, laptop):
        shown = await page.until("canceled")
        assert shown["reason"] == "visitor_canceled"
    r = await http.post(
        f"{a.url}/v1/calls/{created['call_id']}/move",
        params={"token": created["status_token"]},
        json={"at": iso(clock.now() + 1200)},
    )
    assert r.status == 409 and (await r.json())["error"]["code"] == "call_ended"


async def test_a_move_is_checked_as_a_new_request_would_be(
    two_nodes: tuple[Node, Node], http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    a, _ = two_nodes
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    url = f"{a.url}/v1/calls/{created['call_id']}/move"
    token = {"token": created["status_token"]}

    async def move(body: object) -> tuple[int, str]:
        r = await http.post(url, params=token, json=body)
        answer = await r.json()
        return r.status, answer["error"]["code"] if "error" in answer else answer["state"]

    assert await move({"at": iso(clock.now())}) == (422, "slot_unavailable")
    assert await move({"at": iso(clock.now() + 30 * 86400)}) == (422, "slot_unavailable")
    assert await move({"at": "tomorrow"}) == (400, "invalid_payload")
    assert await move({"when": iso(clock.now() + 900)}) == (400, "invalid_payload")
    assert await move([]) == (400, "invalid_payload")
    assert await move({"at": iso(clock.now() + 900)}) == (200, "scheduled")
    ticket = await http.get(f"{a.url}/v1/calls/{created['call_id']}", params=token)
    assert 890 <= (await ticket.json())["eta_s"] <= 901


async def test_a_wrong_token_learns_nothing_not_even_whether_the_call_exists(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clock: ManualClock,
    streams: Callable[..., Any],
) -> None:
    a, b = two_nodes
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    unknown = {**created, "call_id": "c_" + "0" * 32}
    answers = []
    for target, token in ((created, "wrong-token"), (unknown, created["status_token"])):
        for method, path in (
            ("GET", ""),
            ("GET", "/stream"),
            ("DELETE", ""),
            ("POST", "/move"),
        ):
            r = await http.request(
                method,
                f"{b.url}/v1/calls/{target['call_id']}{path}",
                params={"token": token},
                json={"at": iso(clock.now() + 900)} if method == "POST" else None,
            )
            body = await r.json()
            answers.append((r.status, body["error"]["code"], body["error"]["message"]))
    assert {(s, c) for s, c, _ in answers} == {(404, "not_found")}, answers
    # The message names the id asked for, so compare it with the id taken out.
    assert len({m.replace(unknown["call_id"], created["call_id"]) for _, _, m in answers}) == 1
    missing = await http.get(f"{b.url}/v1/calls/{created['call_id']}/stream")
    assert missing.status == 401
    # The call is as it was: nothing a wrong token did touched it.
    ticket = await http.get(
        f"{a.url}/v1/calls/{created['call_id']}", params={"token": created["status_token"]}
    )
    assert (await ticket.json())["state"] == "scheduled"


async def test_one_ticket_has_a_bounded_number_of_pages_per_node(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clock: ManualClock,
    streams: Callable[..., Any],
) -> None:
    a, _ = two_nodes
    a.app[keys.TICKET_FEED].max_per_call = 2
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    first, second = await streams(a, created), await streams(a, created)
    await first.until("scheduled")
    await second.until("scheduled")
    third = await streams(a, created)
    assert third.status == 503 and (await third.json())["error"]["code"] == "too_many_watchers"
    assert a.app[keys.TICKET_FEED].watching(created["call_id"]) == 2


async def test_a_browser_call_has_a_ticket_that_shows_who_the_visitor_spoke_to(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    streams: Callable[..., Any],
) -> None:
    a, b = two_nodes
    anna = await agent(clients, a, "anna")
    visitor = clients()
    await visitor.connect(a.url, "/visitor", {"token": await visitor_token(http, a)})
    ack = await visitor.call("call:start", {"language": "en"}, "/visitor")
    assert ack["ok"] and ack["call"]["state"] == "ringing", ack
    created = {"call_id": ack["call"]["call_id"], "status_token": ack["status_token"]}
    assert ack["ticket_url"] == f"{a.url}/t/{created['call_id']}#{created['status_token']}"
    page = await streams(b, created)
    shown = await page.until("ringing")
    assert shown["channel"] == "webrtc" and shown["agent"]["name"] == "Anna"

    await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent")
    await page.until("connected")
    await visitor.call("call:cancel", {"call_id": created["call_id"]}, "/visitor")
    done = await page.until("completed")
    assert done["agent"] == {"name": "Anna", "branch": "Dublin"}
    assert done["reason"] == "visitor_hung_up"

    # What a browser call's ticket cannot do: it is ended from the browser, and has no time.
    url = f"{a.url}/v1/calls/{created['call_id']}"
    token = {"token": created["status_token"]}
    for refused in (
        await http.delete(url, params=token),
        await http.post(f"{url}/move", params=token, json={"at": iso(time.time() + 900)}),
    ):
        assert refused.status == 409
        assert (await refused.json())["error"]["code"] == "invalid_state"
    # Another visitor's token reads nothing of it.
    other = clients()
    await other.connect(a.url, "/visitor", {"token": await visitor_token(http, a)})
    theirs = await other.call("call:start", {}, "/visitor")
    r = await http.get(url, params={"token": theirs["status_token"]})
    assert r.status == 404


async def test_a_new_callback_is_texted_its_ticket_link_in_the_customers_language(
    two_nodes: tuple[Node, Node],
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clock: ManualClock,
    streams: Callable[..., Any],
) -> None:
    a, b = two_nodes
    caller_id = a.settings.sites["acme"].caller_ids[0]
    sim.messaging.number(caller_id, sms_url=f"{a.url}/v1/twilio/sms")
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600), "language": "de-AT"}
    )
    assert status == 201, created
    page = await streams(b, created)
    shown = await page.until_shown(lambda call: call["timeline"][-1]["event"] == "texted", "texted")
    assert shown["state"] == "scheduled"
    [text] = sim.messaging.sent_to(VISITOR_PHONE)
    assert text.from_ == caller_id
    site = a.settings.sites["acme"].name
    assert text.body == (
        f"{site}: Wir rufen Sie zurück. Ihre Anfrage ansehen oder ändern: {created['ticket_url']}"
        " Antworten Sie STOP, um keine SMS mehr zu erhalten."
    )
    assert created["status_token"] in text.body and "#" in created["ticket_url"]


async def test_a_refused_text_is_not_retried_and_the_callback_stands(
    two_nodes: tuple[Node, Node], sim: TwilioSim, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """Twilio refuses texts from a number the account does not own (here, the site's caller
    id is not one of the simulator's messaging numbers), as it refuses a number that said
    STOP: the callback is booked all the same, and the refusal is not tried again."""
    a, _ = two_nodes
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    r = await http.get(
        f"{a.url}/v1/calls/{created['call_id']}", params={"token": created["status_token"]}
    )
    assert (await r.json())["state"] == "scheduled"
    confirmations = a.app[keys.CALLBACKS].customer_texts
    assert confirmations is not None

    async def given_up() -> bool:
        return confirmations.given_up == 1

    await eventually(given_up, WAIT_S)
    assert sim.messaging.sent_to(VISITOR_PHONE) == []
    assert confirmations.sent == 0
    assert not [t for t in asyncio.all_tasks() if "ticket-text" in t.get_name()], "not retried"


async def test_a_shared_link_shows_state_and_times_only_until_it_is_turned_off(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clock: ManualClock,
    streams: Callable[..., Any],
) -> None:
    a, b = two_nodes
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    call_url = f"{a.url}/v1/calls/{created['call_id']}"
    owner = {"token": created["status_token"]}
    r = await http.post(f"{call_url}/share", params=owner)
    assert r.status == 200, await r.text()
    shared = await r.json()
    assert shared["call"]["sharing"] is True
    prefix = f"{a.url}/t/{created['call_id']}#"
    assert shared["share_url"].startswith(prefix)
    share_token = shared["share_url"].removeprefix(prefix)
    assert share_token != created["status_token"]

    # What the link shows: state and times, nothing about who asked, and no way to act.
    seen = await (await http.get(call_url, params={"token": share_token})).json()
    assert set(seen) == {
        "call_id", "channel", "state", "agent", "eta_s", "scheduled_at", "promised_at",
        "timeline", "shared",
    }  # fmt: skip
    assert seen["state"] == "scheduled" and seen["shared"] is True
    assert all(set(e) == {"at", "event"} for e in seen["timeline"])
    assert VISITOR_PHONE not in json.dumps(seen)
    for method, path in (("DELETE", ""), ("POST", "/move"), ("POST", "/share")):
        r = await http.request(
            method, f"{call_url}{path}", params={"token": share_token}, json={"at": "x"}
        )
        assert r.status in (400, 404), (method, path, r.status)
        assert r.status == 404 or path == "/move"

    # A colleague follows it live on node B: a move on node A reaches them, cut down.
    colleague = await streams(b, created, share_token)
    shown = await colleague.until("scheduled")
    assert "phone" not in shown and "reason" not in shown
    r = await http.post(f"{call_url}/move", params=owner, json={"at": iso(clock.now() + 1200)})
    assert r.status == 200
    moved = await colleague.until_shown(
        lambda call: call["timeline"][-1]["event"] == "moved", "moved"
    )
    assert moved["shared"] is True

    # Turned off: the open page is told, its stream ends, and the link reads nothing.
    r = await http.delete(f"{call_url}/share", params=owner)
    assert r.status == 200 and (await r.json())["sharing"] is False
    assert await colleague.frame("unshared") == {}
    assert await colleague.ended()
    r = await http.get(call_url, params={"token": share_token})
    assert r.status == 404
    # A new link is a new token; the owner's page never stopped.
    again = await (await http.post(f"{call_url}/share", params=owner)).json()
    assert not again["share_url"].endswith(share_token)
    assert (await http.get(call_url, params=owner)).status == 200


async def test_the_customer_erases_their_personal_data_from_the_ticket(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
    streams: Callable[..., Any],
) -> None:
    a, b = two_nodes
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600), "page": "https://x.test/p"}
    )
    assert status == 201, created
    call_url = f"{a.url}/v1/calls/{created['call_id']}"
    owner = {"token": created["status_token"]}
    shared = await (await http.post(f"{call_url}/share", params=owner)).json()
    share_token = shared["share_url"].rsplit("#", 1)[1]
    page = await streams(b, created)
    await page.until("scheduled")

    r = await http.delete(f"{call_url}/personal-data", params=owner)
    assert r.status == 200, await r.text()
    erased = await r.json()
    assert erased["state"] == "canceled" and erased["timeline"][-1]["event"] == "erased", erased
    assert erased["sharing"] is False
    await page.until_shown(lambda call: call["timeline"][-1]["event"] == "erased", "erased")
    row = await a.app[keys.STORE].get_call(created["call_id"])
    assert row is not None
    stored = json.dumps(row.data)
    assert VISITOR_PHONE not in stored and "x.test" not in stored, stored
    assert (await http.get(call_url, params={"token": share_token})).status == 404
    again = await http.delete(f"{call_url}/personal-data", params=owner)
    assert again.status == 200, "erasing twice is harmless"

    # A live call is ended first: erasing it is refused until then, a callback's too.
    anna = await agent(clients, a, "anna")
    _, ringing = await request_callback(http, a, {"phone": "+353861110002"})
    await anna.next("call:ring", lambda r: r["call_id"] == ringing["call_id"])
    r = await http.delete(
        f"{a.url}/v1/calls/{ringing['call_id']}/personal-data",
        params={"token": ringing["status_token"]},
    )
    assert r.status == 409 and (await r.json())["error"]["code"] == "invalid_state"
    r = await http.get(
        f"{a.url}/v1/calls/{ringing['call_id']}", params={"token": ringing["status_token"]}
    )
    assert (await r.json())["state"] == "ringing", "not canceled by the refused erase"
    await anna.call("call:decline", {"call_id": ringing["call_id"]}, "/agent")
    visitor = clients()
    await visitor.connect(a.url, "/visitor", {"token": await visitor_token(http, a)})
    ack = await visitor.call("call:start", {}, "/visitor")
    live = f"{a.url}/v1/calls/{ack['call']['call_id']}/personal-data"
    r = await http.delete(live, params={"token": ack["status_token"]})
    assert r.status == 409 and (await r.json())["error"]["code"] == "invalid_state"
    await anna.call("call:decline", {"call_id": ack["call"]["call_id"]}, "/agent")


@pytest.mark.parametrize("store", ["embedded", "redis"])
async def test_ended_calls_are_deleted_after_the_retention_period_and_waiting_ones_kept(
    store: str,
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    http: aiohttp.ClientSession,
    clock: ManualClock,
) -> None:
    settings = phone_settings(tmp_path, sim, redis_url if store == "redis" else "")
    node = await phone_node(nodes, settings, clock)
    store_of = node.app[keys.STORE]
    # A minute, not the days of a configuration: the test clock moves step by step through
    # every sleeper's wake-up (leases renew every few seconds), so days would take minutes.
    node.app[keys.RETENTION].retention_s = 60
    _, ended = await request_callback(
        http, node, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    r = await http.delete(
        f"{node.url}/v1/calls/{ended['call_id']}", params={"token": ended["status_token"]}
    )
    assert (await r.json())["state"] == "canceled"
    # A call that has not ended, however long unchanged (a stuck one, here written as a
    # node would), is not the retention's to delete.
    stuck = cb.new_callback(
        "c_" + "5" * 32, "acme", "v_x", VISITOR_PHONE, "h", CallRequest(), clock.now(),
        None, clock.now(),
    )  # fmt: skip
    await store_of.put_call(CallRow(stuck.call_id, "acme", 1, call_to_record(stuck)))
    await clock.advance(59)
    assert await node.app[keys.RETENTION].sweep() == 0, "not before its time"
    await clock.advance(2)

    async def swept() -> bool:
        return await store_of.get_call(ended["call_id"]) is None

    await eventually(swept, WAIT_S)  # the node's own hourly sweep, woken by the clock
    assert await store_of.get_call(stuck.call_id) is not None
    r = await http.get(
        f"{node.url}/v1/calls/{ended['call_id']}", params={"token": ended["status_token"]}
    )
    assert r.status == 404, "its ticket is gone with it"


async def test_a_site_may_send_no_texts(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    http: aiohttp.ClientSession,
    clock: ManualClock,
) -> None:
    settings = phone_settings(tmp_path, sim, redis_url, text_ticket_link=False)
    node = await phone_node(nodes, settings, clock)
    caller_id = node.settings.sites["acme"].caller_ids[0]
    sim.messaging.number(caller_id, sms_url=f"{node.url}/v1/twilio/sms")  # it could text
    status, created = await request_callback(
        http, node, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    confirmations = node.app[keys.CALLBACKS].customer_texts
    assert confirmations is not None
    # Spawned before the 201 if at all: neither running, nor done (sent or given up).
    assert not [t for t in asyncio.all_tasks() if "ticket-text" in t.get_name()]
    assert (confirmations.sent, confirmations.given_up) == (0, 0)
    assert sim.messaging.sent_to(VISITOR_PHONE) == []
