"""PSTN callbacks end to end: real gateway nodes, real socket.io agents, the Twilio simulator
driven through the real ``twilio`` SDK, signed webhooks, on both stores and across nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from conftest import (
    Node,
    NodeFactory,
    SocketClient,
    eventually,
    free_port,
    make_settings,
    mint,
    replace,
)
from twilio_sim import CallRecord, TwilioSim, WebhookRecord
from yarl import URL

from gateway.core import callback as cb
from gateway.core.errors import StoreUnavailable
from gateway.core.model import OpeningSpan
from gateway.edge.http import appkeys as keys
from gateway.ops.clock import Clock, ManualClock
from gateway.settings import Settings, TwilioSettings

ORIGIN = {"Origin": "http://127.0.0.1:8080"}
GLOBEX = "https://globex.example"
ANNA_PHONE = "+353871234567"
BEN_PHONE = "+4915112345678"
VISITOR_PHONE = "+353861110001"
OPENING = OpeningSpan(clock_time(9, 0), clock_time(17, 0))


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    sim = TwilioSim(time_scale=0.05)
    await sim.start()
    yield sim
    await sim.close()
    assert sim.contract_violations == []


def phone_settings(tmp_path: Path, sim: TwilioSim, redis_url: str = "", **policy: Any) -> Settings:
    """A node that calls phones through the simulator, with a policy a test can wait for:
    retries a second apart and quiet hours far from now (a site may not loosen these in its
    config; tests build the site directly)."""
    port = free_port()
    base = make_settings(
        tmp_path,
        redis_url=redis_url,
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        twilio=TwilioSettings(sim.account_sid, sim.auth_token, sim.base_url),
    )
    quiet, quiet_end = quiet_hours_far_from_now()
    sites = {}
    for site_id, site in base.sites.items():
        p = replace(
            site.callback_policy,
            retry_interval_s=1,
            quiet_hours_start=quiet,
            quiet_hours_end=quiet_end,
            **policy,
        )
        sites[site_id] = replace(site, callback_policy=p, ring_timeout_s=3.0)
    return replace(base, sites=sites)


def quiet_hours_far_from_now() -> tuple[clock_time, clock_time]:
    """A minute of quiet hours twelve hours from now: a test's callbacks to numbers in any
    time zone are never refused as night time, whenever the suite runs."""
    quiet = (datetime.now(UTC) + timedelta(hours=12)).time().replace(second=0, microsecond=0)
    quiet_end = (datetime.combine(datetime.now(UTC).date(), quiet) + timedelta(minutes=1)).time()
    return quiet, quiet_end


def without_quiet_hours_now(settings: Settings) -> Settings:
    quiet, quiet_end = quiet_hours_far_from_now()
    return with_policy(settings, quiet_hours_start=quiet, quiet_hours_end=quiet_end)


def with_site(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, sites={"acme": replace(settings.sites["acme"], **changes)})


def with_policy(settings: Settings, **changes: Any) -> Settings:
    policy = replace(settings.sites["acme"].callback_policy, **changes)
    return with_site(settings, callback_policy=policy)


async def phone_node(nodes: NodeFactory, settings: Settings, clock: Clock | None = None) -> Node:
    node = await nodes(settings, clock=clock)
    node.app[keys.CALLBACKS].min_lead_s = 1.0
    return node


@pytest.fixture(params=["embedded", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url")) if request.param == "redis" else ""


@pytest.fixture
async def node(nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, store_url: str) -> Node:
    return await phone_node(nodes, phone_settings(tmp_path, sim, store_url))


async def visitor_token(http: aiohttp.ClientSession, node: Node) -> str:
    r = await http.post(f"{node.url}/v1/sites/acme/sessions", json={}, headers=ORIGIN)
    assert r.status == 201, await r.text()
    token: str = (await r.json())["token"]
    return token


async def request_callback(
    http: aiohttp.ClientSession, node: Node, body: dict[str, Any], token: str | None = None
) -> tuple[int, dict[str, Any]]:
    token = token or await visitor_token(http, node)
    r = await http.post(
        f"{node.url}/v1/sites/acme/callbacks",
        json=body,
        headers={**ORIGIN, "Authorization": f"Bearer {token}"},
    )
    data: dict[str, Any] = await r.json()
    return r.status, data


async def ticket_at(http: aiohttp.ClientSession, url: str, created: dict[str, Any]) -> Any:
    """The visitor's ticket, read from the node (or balancer) at ``url``."""
    r = await http.get(
        f"{url}/v1/calls/{created['call_id']}", params={"token": created["status_token"]}
    )
    assert r.status == 200, await r.text()
    return await r.json()


async def ticket(http: aiohttp.ClientSession, node: Node, created: dict[str, Any]) -> Any:
    return await ticket_at(http, node.url, created)


async def ticket_state(
    http: aiohttp.ClientSession,
    node: Node,
    created: dict[str, Any],
    state: str,
    timeout: float = 10,
) -> Any:
    seen: list[Any] = []

    async def reached() -> bool:
        seen.append(await ticket(http, node, created))
        return bool(seen[-1]["state"] == state)

    try:
        await eventually(reached, timeout)
    except TimeoutError:
        raise AssertionError(f"never {state}: {seen[-1] if seen else None}") from None
    return seen[-1]


async def agent(
    clients: Callable[[], SocketClient], node: Node, name: str, state: str = "available"
) -> SocketClient:
    c = clients()
    await c.connect(node.url, "/agent", {"token": mint(node.settings, name), "state": state})
    await c.next("presence:update", lambda p: p["agent_id"] == name)
    return c


def visitor_calls(sim: TwilioSim, number: str) -> list[CallRecord]:
    return [c for c in sim.calls if c.to == number and c.parent_sid is None]


async def test_call_me_now_rings_the_agent_first_then_dials_and_bridges(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=40)
    sim.phone(ANNA_PHONE, answer_after=1)
    anna = await agent(clients, node, "anna")
    status, created = await request_callback(
        http, node, {"phone": "+353 86 111 0001", "language": "en", "page": "https://x.test/p"}
    )
    assert status == 201, created
    assert created["call"]["channel"] == "callback"
    assert created["call"]["state"] in ("queued", "ringing")
    assert len(created["status_token"]) >= 32

    ring = await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"])
    assert ring["channel"] == "callback" and ring["visitor"]["phone"] == VISITOR_PHONE
    # Agent first: nobody dials the visitor before the agent accepts.
    assert visitor_calls(sim, VISITOR_PHONE) == []
    ringing = await ticket(http, node, created)
    assert ringing["state"] == "ringing" and ringing["agent"]["name"] == "Anna"

    ack = await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent")
    assert ack["ok"], ack
    assert ack["call"]["state"] == "dialing"
    leg = await sim.wait_for_call(to=VISITOR_PHONE, status="in-progress", timeout=10)
    assert leg.params["From"] == ["+15005550006"]
    assert leg.params["MachineDetection"] == ["Enable"]
    bridge = await sim.wait_for_call(to=ANNA_PHONE, status="in-progress", timeout=10)
    assert bridge.parent_sid == leg.sid
    assert any("Connecting you to Anna" in s for s in leg.said)
    connected = await ticket_state(http, node, created, "connected")
    assert connected["agent"]["name"] == "Anna"
    me = await http.get(
        f"{node.url}/v1/agents/me",
        headers={"Authorization": f"Bearer {mint(node.settings, 'anna')}"},
    )
    assert (await me.json())["status"] == "on_call"

    sim.hangup(leg.sid)  # the visitor hangs up
    done = await ticket_state(http, node, created, "completed")
    events = [e["event"] for e in done["timeline"]]
    assert events[0] == "requested" and "dialing" in events and events[-1] == "completed"
    assert all("routed" != e for e in events), "routing reasons are not shown to the visitor"
    await anna.next("presence:update", lambda p: p["status"] == "available", timeout=10)
    assert len(visitor_calls(sim, VISITOR_PHONE)) == 1


async def test_an_accept_cut_short_by_the_store_still_dials_the_visitor(
    node: Node,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The accept is stored, then the store stops answering before the dial is scheduled
    (seen in tests/test_chaos.py with Redis frozen): the agent's accept is answered, and the
    dial happens once the store answers again; the agent's retry would only have found the
    callback no longer ringing."""
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=30)
    sim.phone(ANNA_PHONE, answer_after=1)
    anna = await agent(clients, node, "anna")
    store = node.app[keys.STORE]
    schedule = store.schedule_timer
    failed: list[str] = []

    async def unreachable_once(timer_id: str, due: float, keep: bool = False) -> None:
        if timer_id.startswith("cbdial:") and not failed:
            failed.append(timer_id)
            raise StoreUnavailable()
        await schedule(timer_id, due, keep)

    monkeypatch.setattr(store, "schedule_timer", unreachable_once)
    status, created = await request_callback(http, node, {"phone": "+353 86 111 0001"})
    assert status == 201, created
    await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"])
    ack = await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent")
    assert ack["ok"] and ack["call"]["state"] == "dialing", ack
    assert failed, "the dial's first scheduling never failed: the test tested nothing"
    await sim.wait_for_call(to=VISITOR_PHONE, status="in-progress", timeout=10)
    await ticket_state(http, node, created, "connected")
    assert len(visitor_calls(sim, VISITOR_PHONE)) == 1


async def test_an_accept_whose_node_died_before_the_dial_is_dialled_at_its_ring_timeout(
    node: Node,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The accept is stored and its node dies before anything follows it (here: the
    follow-up is skipped): the ring's durable timer, still there, does it at the ring's end."""
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=30)
    sim.phone(ANNA_PHONE, answer_after=1)
    anna = await agent(clients, node, "anna")
    records = node.app[keys.CALLS].records
    follow_up = records.after_accept
    skipped: list[bool] = []

    async def died_first(call: Any, agent_id: str, again: bool = False) -> None:
        if not skipped:
            skipped.append(again)
            return
        await follow_up(call, agent_id, again)

    monkeypatch.setattr(records, "after_accept", died_first)
    status, created = await request_callback(http, node, {"phone": "+353 86 111 0001"})
    assert status == 201, created
    await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"])
    ack = await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent")
    assert ack["ok"] and ack["call"]["state"] == "dialing", ack
    assert skipped == [False]
    # The site's ring timeout is 3 s (phone_settings).
    await sim.wait_for_call(to=VISITOR_PHONE, status="in-progress", timeout=10)
    await ticket_state(http, node, created, "connected")
    await anna.next("presence:update", lambda p: p["status"] == "on_call", timeout=5)
    assert len(visitor_calls(sim, VISITOR_PHONE)) == 1


async def test_a_scheduled_callback_fires_on_time(
    nodes: NodeFactory,
    tmp_path: Path,
    store_url: str,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
) -> None:
    """Customer first (a site's choice): the visitor's phone rings at the time they chose."""
    settings = with_policy(phone_settings(tmp_path, sim, store_url), agent_first=False)
    node = await phone_node(nodes, settings, clock)
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=30)
    sim.phone(ANNA_PHONE, answer_after=1, press="1")  # takes the call at the whisper
    await agent(clients, node, "anna")
    at = clock.now() + 3
    status, created = await request_callback(
        http, node, {"phone": VISITOR_PHONE, "at": datetime.fromtimestamp(at, UTC).isoformat()}
    )
    assert status == 201, created
    assert created["call"]["state"] == "scheduled"
    assert created["call"]["scheduled_at"] is not None
    assert 0 < created["call"]["eta_s"] <= 4
    await clock.advance(2.9)  # the node has looked for due callbacks meanwhile
    assert (await ticket(http, node, created))["state"] == "scheduled", "not before its time"
    assert visitor_calls(sim, VISITOR_PHONE) == []
    await clock.advance(0.2)
    await sim.wait_for_call(to=VISITOR_PHONE, timeout=10)
    await ticket_state(http, node, created, "completed", timeout=15)


async def test_busy_then_retry_then_answered(
    nodes: NodeFactory,
    tmp_path: Path,
    store_url: str,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
) -> None:
    settings = phone_settings(tmp_path, sim, store_url)
    node = await phone_node(nodes, settings, clock)
    sim.phone(VISITOR_PHONE, busy=True)
    sim.phone(ANNA_PHONE, answer_after=1)
    anna = await agent(clients, node, "anna")
    status, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    assert status == 201, created
    await anna.next("call:ring")
    assert (await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent"))["ok"]
    await sim.wait_for_call(to=VISITOR_PHONE, status="busy", timeout=10)
    retry = await ticket_state(http, node, created, "scheduled")
    assert "Your line was busy; we'll try again" in [e["detail"] for e in retry["timeline"]]
    # The line is free now; the retry rings the agent again, then dials once more.
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=10)
    await clock.advance(settings.sites["acme"].callback_policy.retry_interval_s)
    await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"], timeout=10)
    assert (await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent"))["ok"]
    done = await ticket_state(http, node, created, "completed", timeout=15)
    assert [e["event"] for e in done["timeline"]].count("dialing") == 2
    assert [c.status for c in visitor_calls(sim, VISITOR_PHONE)] == ["busy", "completed"]


async def test_voicemail_ends_the_attempt_and_no_agent_is_connected(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    node = await phone_node(nodes, phone_settings(tmp_path, sim, retries=0))
    sim.phone(VISITOR_PHONE, voicemail=True)
    anna = await agent(clients, node, "anna")
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    await anna.next("call:ring")
    assert (await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent"))["ok"]
    failed = await ticket_state(http, node, created, "failed", timeout=15)
    assert failed["reason"] == "voicemail"
    assert [c.to for c in sim.calls] == [VISITOR_PHONE], "the agent's phone never rang"
    await anna.next("presence:update", lambda p: p["status"] == "available", timeout=10)


async def test_the_visitor_cancels_while_the_agent_rings_and_while_dialing(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    anna = await agent(clients, node, "anna")
    _, first = await request_callback(http, node, {"phone": VISITOR_PHONE})
    await anna.next("call:ring")
    r = await http.delete(
        f"{node.url}/v1/calls/{first['call_id']}", params={"token": first["status_token"]}
    )
    assert r.status == 200 and (await r.json())["state"] == "canceled"
    stop = await anna.next("call:ring_stop", lambda m: m["call_id"] == first["call_id"])
    assert stop["reason"] == "visitor_canceled"

    sim.phone(VISITOR_PHONE, answer_after=30)  # rings and rings
    _, second = await request_callback(http, node, {"phone": VISITOR_PHONE})
    await anna.next("call:ring", lambda m: m["call_id"] == second["call_id"])
    assert (await anna.call("call:accept", {"call_id": second["call_id"]}, "/agent"))["ok"]
    await sim.wait_for_call(to=VISITOR_PHONE, status="ringing", timeout=10)
    r = await http.delete(
        f"{node.url}/v1/calls/{second['call_id']}", params={"token": second["status_token"]}
    )
    assert (await r.json())["state"] == "canceled"
    await sim.wait_for_call(to=VISITOR_PHONE, status="canceled", timeout=10)
    await anna.next("presence:update", lambda p: p["status"] == "available", timeout=10)
    # A wrong token sees nothing, and cannot cancel.
    r = await http.get(f"{node.url}/v1/calls/{second['call_id']}", params={"token": "x" * 32})
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_agent_declines_and_the_next_agent_takes_it(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    # The visitor stays (10 s real) until the test hangs up: a hang-up 0.5 s after she
    # answered came before Ben's leg was up on a slow machine under the suite.
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=200)
    sim.phone(BEN_PHONE, answer_after=1)
    anna = await agent(clients, node, "anna")
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    await anna.next("call:ring")
    ben = await agent(clients, node, "ben")
    assert (await anna.call("call:decline", {"call_id": created["call_id"]}, "/agent"))["ok"]
    await ben.next("call:ring", lambda r: r["call_id"] == created["call_id"], timeout=10)
    assert (await ben.call("call:accept", {"call_id": created["call_id"]}, "/agent"))["ok"]
    await sim.wait_for_call(to=BEN_PHONE, status="in-progress", timeout=10)
    sim.hangup(next(c for c in sim.calls if c.to == VISITOR_PHONE).sid)
    done = await ticket_state(http, node, created, "completed", timeout=15)
    assert done["agent"]["name"] == "Ben"
    assert ANNA_PHONE not in [c.to for c in sim.calls]


async def test_a_callback_for_a_closed_branch_waits_for_its_opening(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    settings = phone_settings(tmp_path, sim)
    site = settings.sites["acme"]
    # Closed all week but the day after tomorrow, 09:00-17:00 (Dublin time).
    open_day = (datetime.now(ZoneInfo("Europe/Dublin")).weekday() + 2) % 7
    dublin = replace(site.branches["dublin"], hours={open_day: (OPENING,)}, holidays=frozenset())
    node = await phone_node(
        nodes, with_site(settings, branches={**site.branches, "dublin": dublin})
    )
    await agent(clients, node, "anna")
    status, created = await request_callback(
        http, node, {"phone": VISITOR_PHONE, "branch": "dublin"}
    )
    assert status == 201, created
    call = created["call"]
    assert call["state"] == "scheduled" and call["scheduled_at"] is not None
    opens = datetime.fromisoformat(call["scheduled_at"]).astimezone(ZoneInfo("Europe/Dublin"))
    assert (opens.weekday(), opens.hour) == (open_day, 9)
    assert sim.calls == []


async def test_nobody_free_keeps_the_visitor_in_line_with_an_honest_eta(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    status, first = await request_callback(http, node, {"phone": VISITOR_PHONE})
    assert status == 201
    status, second = await request_callback(http, node, {"phone": "+353861110002"})
    assert status == 201
    one = await ticket(http, node, first)
    two = await ticket(http, node, second)
    assert (one["state"], one["position"]) == ("queued", 1)
    assert (two["state"], two["position"]) == ("queued", 2)
    assert one["eta_s"] is not None and two["eta_s"] > one["eta_s"]
    # An agent comes online: the first in line is rung first.
    anna = await agent(clients, node, "anna")
    ring = await anna.next("call:ring", timeout=10)
    assert ring["call_id"] == first["call_id"]


async def test_forged_webhooks_change_nothing(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    sim.phone(VISITOR_PHONE, answer_after=20)
    anna = await agent(clients, node, "anna")
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    await anna.next("call:ring")
    assert (await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent"))["ok"]
    leg = await sim.wait_for_call(to=VISITOR_PHONE, status="ringing", timeout=10)
    url = f"{node.url}/v1/twilio/status/{created['call_id']}/1"
    form = {"CallSid": leg.sid, "CallStatus": "completed", "AccountSid": sim.account_sid}
    for headers in ({}, {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}):
        r = await http.post(url, data=form, headers=headers)
        assert r.status == 403 and (await r.json())["error"]["code"] == "invalid_signature"
    assert (await ticket(http, node, created))["state"] == "dialing"


async def test_a_callback_its_only_agent_declined_does_not_hold_up_the_line(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    _, first = await request_callback(http, node, {"phone": VISITOR_PHONE})
    _, second = await request_callback(http, node, {"phone": "+353861110002"})
    anna = await agent(clients, node, "anna")
    await anna.next("call:ring", lambda r: r["call_id"] == first["call_id"], timeout=10)
    assert (await anna.call("call:decline", {"call_id": first["call_id"]}, "/agent"))["ok"]
    # The first waits for someone else; Anna takes the next in line meanwhile.
    await anna.next("call:ring", lambda r: r["call_id"] == second["call_id"], timeout=10)
    still = await ticket(http, node, first)
    assert (still["state"], still["position"]) == ("queued", 1)


async def test_a_callback_carries_no_browser_signals(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    """A callback's audio is on the phone network: neither party may send WebRTC signals
    for it (and nothing is ever broadcast to other agents)."""
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=30)
    sim.phone(ANNA_PHONE, answer_after=1)
    anna = await agent(clients, node, "anna")
    ben = await agent(clients, node, "ben", state="away")
    token = await visitor_token(http, node)
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE}, token)
    await anna.next("call:ring")
    assert (await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent"))["ok"]
    await ticket_state(http, node, created, "connected")
    visitor = clients()
    await visitor.connect(node.url, "/visitor", {"token": token})
    offer = {"call_id": created["call_id"], "description": {"type": "offer", "sdp": "v=0"}}
    ack = await visitor.call("rtc:signal", offer, "/visitor")
    assert ack == {
        "ok": False,
        "error": {"code": "not_connected", "message": ack["error"]["message"]},
    }
    ack = await anna.call("rtc:signal", offer, "/agent")
    assert not ack["ok"] and ack["error"]["code"] == "not_connected"
    assert ben.queue("rtc:signal").empty() and anna.queue("rtc:signal").empty()


async def test_cors_answers_each_site_for_its_own_origins_only(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, http: aiohttp.ClientSession
) -> None:
    """Two sites on one node: a page of site B is never let in on site A's routes (nor A's
    on B's), refusals carry the headers a page needs to read them, and a ticket's answer
    goes to its own site's pages only."""
    base = phone_settings(tmp_path, sim)
    acme = base.sites["acme"]
    globex = replace(acme, site_id="globex", name="Globex", allowed_origins=(GLOBEX,), agents={})
    node = await phone_node(nodes, replace(base, sites={"acme": acme, "globex": globex}))
    a, b, own = ORIGIN["Origin"], GLOBEX, node.settings.public_url.rstrip("/")

    async def preflight(path: str, origin: str, method: str = "POST") -> aiohttp.ClientResponse:
        return await http.options(
            f"{node.url}{path}",
            headers={"Origin": origin, "Access-Control-Request-Method": method},
        )

    refused = 0
    for path, allowed, foreign in (
        ("/v1/sites/acme/callbacks", (a, own), (b,)),
        ("/v1/sites/acme/sessions", (a, own), (b,)),
        ("/v1/sites/acme/availability", (a, own), (b,)),
        ("/v1/sites/globex/sessions", (b, own), (a,)),
        ("/v1/sites/nowhere/sessions", (own,), (a, b)),
    ):
        for origin in allowed:
            r = await preflight(path, origin)
            assert r.status == 204, (path, origin)
            assert r.headers["Access-Control-Allow-Origin"] == origin
            assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
            assert r.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
        for origin in foreign:
            r = await preflight(path, origin)
            assert r.status == 403, (path, origin)
            assert (await r.json())["error"]["code"] == "origin_not_allowed"
            assert "Access-Control-Allow-Origin" not in r.headers
            refused += 1
    r = await http.get(f"{node.url}/v1/sites/acme/availability", headers={"Origin": b})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    r = await http.get(f"{node.url}/v1/sites/acme/availability", headers={"Origin": a})
    assert r.headers["Access-Control-Allow-Origin"] == a

    # A refusal is readable by the page that caused it (else it sees a network error).
    token = await visitor_token(http, node)
    r = await http.post(
        f"{node.url}/v1/sites/acme/callbacks",
        json={"phone": "call me maybe"},
        headers={**ORIGIN, "Authorization": f"Bearer {token}"},
    )
    assert r.status == 400 and r.headers["Access-Control-Allow-Origin"] == a

    # A ticket path names no site: its preflight admits the sites' pages for what a ticket
    # needs (GET, POST with JSON to move it, DELETE); its answer goes to the call's own site
    # only.
    status, created = await request_callback(http, node, {"phone": VISITOR_PHONE}, token)
    assert status == 201, created
    path = f"/v1/calls/{created['call_id']}"
    r = await preflight(path, a, "DELETE")
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, OPTIONS"
    assert r.headers["Access-Control-Allow-Headers"] == "Content-Type"
    r = await preflight(path, "https://evil.example", "DELETE")
    assert r.status == 403
    refused += 1
    query = {"token": created["status_token"]}
    r = await http.get(f"{node.url}{path}", params=query, headers={"Origin": b})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    r = await http.get(f"{node.url}{path}", params=query, headers={"Origin": a})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == a
    # A wrong token's 404 tells nothing about the call: any site's page may read it.
    r = await http.get(f"{node.url}{path}", params={"token": "wrong"}, headers={"Origin": b})
    assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == b

    text = await (await http.get(f"{node.url}/metrics")).text()
    assert f'membrane_errors_total{{code="origin_not_allowed"}} {refused}.0' in text


def rest_requests(sim: TwilioSim) -> int:
    """Every REST request the simulated Twilio API got: calls created and calls updated."""
    return len(sim.calls) + sum(len(c.rest_updates) for c in sim.calls)


async def replay(http: aiohttp.ClientSession, node: Node, hook: WebhookRecord) -> int:
    """Post a webhook the simulator sent once more, byte for byte (still validly signed)."""
    url = URL(hook.url)
    r = await http.post(
        f"{node.url}{url.raw_path_qs}",
        data=hook.params,
        headers={"X-Twilio-Signature": hook.signature},
    )
    return r.status


async def test_replayed_status_webhooks_change_nothing_and_call_twilio_no_more(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    """Twilio's status callbacks, replayed (a retry through a proxy, an attacker holding
    one): each is validly signed, and none may act twice, neither on the live call nor after
    it ended, when a replayed `ringing` or `in-progress` used to hang up the gone leg again."""
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=40)
    sim.phone(ANNA_PHONE, answer_after=1)
    anna = await agent(clients, node, "anna")
    status, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    assert status == 201, created
    await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"])
    assert (await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent"))["ok"]
    leg = await sim.wait_for_call(to=VISITOR_PHONE, status="in-progress", timeout=10)
    live = await ticket_state(http, node, created, "connected")

    def statuses() -> list[WebhookRecord]:
        return [h for h in sim.call(leg.sid).webhooks if h.kind == "status"]

    sent = statuses()
    assert [h.param("CallStatus") for h in sent] == ["initiated", "ringing", "in-progress"]
    before = rest_requests(sim)
    for hook in sent:
        assert await replay(http, node, hook) == 200
    assert rest_requests(sim) == before
    assert await ticket(http, node, created) == live

    sim.hangup(leg.sid)
    await sim.wait_for_call(sid=leg.sid, status="ended", timeout=10)
    done = await ticket_state(http, node, created, "completed")
    await anna.next("presence:update", lambda p: p["status"] == "available", timeout=10)
    before = rest_requests(sim)
    for hook in statuses():
        assert await replay(http, node, hook) == 200, hook.param("CallStatus")
        assert rest_requests(sim) == before, f"a replayed {hook.param('CallStatus')} called Twilio"
    assert await ticket(http, node, created) == done
    me = await http.get(
        f"{node.url}/v1/agents/me",
        headers={"Authorization": f"Bearer {mint(node.settings, 'anna')}"},
    )
    assert (await me.json())["status"] == "available"


@pytest.mark.parametrize(
    ("heard", "status", "accepted"),
    [
        ((), "initiated", True),
        ((), "completed", True),
        ((("CA1", 0),), "ringing", True),
        ((("CA1", 1),), "answered", True),
        ((("CA1", 2),), "completed", True),
        ((("CA1", 2),), "busy", True),
        ((("CA1", 0),), "initiated", False),
        ((("CA1", 1),), "ringing", False),
        ((("CA1", 2),), "answered", False),
        ((("CA1", 2),), "ringing", False),
        ((("CA1", 3),), "completed", False),
        ((("CA1", 3),), "answered", False),
        ((("CA1", 3),), "no_answer", False),
        ((("CA0", 3),), "ringing", True),  # another leg: its own progress
    ],
)
def test_a_leg_status_no_further_than_heard_is_refused(
    heard: tuple[tuple[str, int], ...], status: str, accepted: bool
) -> None:
    from gateway.core import callback as cb
    from gateway.core.call import Call, CallChannel, CallError, CallState

    call = Call("c1", "acme", "v", CallChannel.CALLBACK, CallState.COMPLETED, 0.0, legs_heard=heard)
    if accepted:
        after = cb.leg_heard(call, "CA1", status)
        assert dict(after.legs_heard)["CA1"] == cb.LEG_PROGRESS.get(status, cb.LEG_ENDED)
        with pytest.raises(CallError):
            cb.leg_heard(after, "CA1", status)  # the same report again: old news
    else:
        with pytest.raises(CallError) as refused:
            cb.leg_heard(call, "CA1", status)
        assert refused.value.code == "old_status"


async def test_refused_twilio_webhooks_are_counted(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, http: aiohttp.ClientSession
) -> None:
    """A forged or unsigned webhook is worth an alert: it shows in the error metrics."""
    node = await phone_node(nodes, phone_settings(tmp_path, sim))
    form = {"CallSid": "CA" + "0" * 32, "CallStatus": "ringing"}
    for headers in ({}, {"X-Twilio-Signature": "Zm9yZ2Vk"}):
        r = await http.post(f"{node.url}/v1/twilio/status/c1/1", data=form, headers=headers)
        assert r.status == 403 and (await r.json())["error"]["code"] == "invalid_signature"
    text = await (await http.get(f"{node.url}/metrics")).text()
    assert 'membrane_errors_total{code="invalid_signature"} 2.0' in text


async def test_a_callback_everyone_let_pass_asks_them_again_after_a_pause(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
) -> None:
    """A callback waits for someone: when every agent it could reach let its ring pass (busy,
    away from the screen, or the ring lost with a node), it asks them all again after a
    pause, rather than waiting forever for an agent it will never ring."""
    node = await phone_node(nodes, phone_settings(tmp_path, sim), clock)
    anna = await agent(clients, node, "anna")
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"], timeout=10)
    assert (await anna.call("call:decline", {"call_id": created["call_id"]}, "/agent"))["ok"]
    await clock.advance(cb.ROUND_PAUSE_S - 1)
    assert anna.pending("call:ring") == [], "not before the pause"
    assert (await ticket(http, node, created))["state"] == "queued"
    await clock.advance(2)
    ring = await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"], 10)
    assert ring["attempt"] == 2
