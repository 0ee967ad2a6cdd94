"""Ringing an agent's own mobile for a callback (gateway.services.mobile_ring): a whisper,
press 1 to take the call, the agent and the customer meeting in the callback's conference;
any other ending skips to the next agent. Real gateway nodes (two on one Redis where it
matters), the Twilio simulator through the real ``twilio`` SDK, signed webhooks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Node, NodeFactory, SocketClient, eventually, mint, replace
from prometheus_client.parser import text_string_to_metric_families
from test_callbacks import (
    ANNA_PHONE,
    BEN_PHONE,
    VISITOR_PHONE,
    agent,
    phone_node,
    phone_settings,
    request_callback,
    ticket_state,
)
from twilio_sim import CallRecord, ConferenceRecord, TwilioSim, sdk_signature
from twilio_sim.records import CANCELED

from gateway.core.call import Call
from gateway.edge.http import appkeys as keys
from gateway.settings import Settings
from gateway.wire.codec import call_from_record

PAGE = "https://acme.test/pricing"


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    sim = TwilioSim(time_scale=0.05)
    await sim.start()
    yield sim
    await sim.close()
    assert sim.contract_violations == []
    schema = [(c.to, n.message) for c in sim.calls for n in c.notifications if n.code == 12200]
    assert schema == [], "TwiML the gateway sent breaks the contract"
    refused = [
        (w.kind, w.url, w.status)
        for c in sim.calls
        for w in c.webhooks
        if w.status != 200 and w.error != CANCELED  # not cut off by the simulator's own close
    ]
    assert refused == [], "Twilio's own webhooks are all accepted, old legs' included"


def mobile_settings(tmp_path: Path, sim: TwilioSim, redis_url: str = "", **site: Any) -> Settings:
    """Anna and Ben in the round-the-clock branch, so that the one idle longest rings first
    at any hour."""
    base = phone_settings(tmp_path, sim, redis_url)
    acme = base.sites["acme"]
    agents = {
        a.agent_id: replace(a, branch="online") if a.agent_id in ("anna", "ben") else a
        for a in acme.agents.values()
    }
    return replace(base, sites={"acme": replace(acme, agents=agents, **site)})


async def on_mobile(http: aiohttp.ClientSession, node: Node, name: str) -> None:
    """The agent is reachable on their phone only (no agent app)."""
    r = await http.put(
        f"{node.url}/v1/agents/me/devices/phone",
        json={"kind": "mobile", "state": "available"},
        headers={"Authorization": f"Bearer {mint(node.settings, name)}"},
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["channels"] == ["pstn"]


async def status_of(http: aiohttp.ClientSession, node: Node, name: str) -> str:
    r = await http.get(
        f"{node.url}/v1/agents/me", headers={"Authorization": f"Bearer {mint(node.settings, name)}"}
    )
    status: str = (await r.json())["status"]
    return status


async def stored(node: Node, call_id: str) -> Call:
    row = await node.app[keys.STORE].get_call(call_id)
    assert row is not None
    return call_from_record(row.data, row.version)


def ring_log(call: Call) -> list[tuple[str, str]]:
    return [(e.event, e.detail) for e in call.timeline if e.event in ("ring_device", "ring_ended")]


async def mobile_rings(http: aiohttp.ClientSession, node: Node) -> dict[str, float]:
    """``membrane_mobile_rings_total`` by how the ring ended."""
    text = await (await http.get(f"{node.url}/metrics")).text()
    return {
        sample.labels["end"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "membrane_mobile_rings"
        for sample in family.samples
        if sample.name == "membrane_mobile_rings_total"
    }


def legs_to(sim: TwilioSim, number: str) -> list[CallRecord]:
    return [c for c in sim.calls if c.to == number]


async def anna_takes_a_callback(
    nodes: NodeFactory,
    http: aiohttp.ClientSession,
    sim: TwilioSim,
    settings: Callable[[], Settings],
) -> tuple[Node, Node, dict[str, Any]]:
    """Two nodes (each its own ``settings()``); Anna, only on her mobile (set on B), will
    press 1; a customer asks A for a callback in English from ``PAGE`` and will answer."""
    a = await phone_node(nodes, settings())
    b = await phone_node(nodes, settings())
    sim.phone(ANNA_PHONE, answer_after=1, press="1")
    sim.phone(VISITOR_PHONE, answer_after=2, hangup_after=30)
    await on_mobile(http, b, "anna")
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "language": "en", "page": PAGE}
    )
    assert status == 201, created
    return a, b, created


async def test_an_agent_only_on_mobile_presses_1_and_meets_the_customer(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a, b, created = await anna_takes_a_callback(
        nodes, http, sim, lambda: mobile_settings(tmp_path, sim, redis_url)
    )
    call_id = created["call_id"]

    agent_leg = await sim.wait_for_call(to=ANNA_PHONE, status="in-progress", timeout=10)
    assert agent_leg.params["From"] == ["+15005550006"]
    assert agent_leg.params["MachineDetection"] == ["Enable"]
    assert agent_leg.params["StatusCallbackEvent"]
    connected = await ticket_state(http, b, created, "connected", timeout=15)
    assert connected["agent"]["name"] == "Anna"
    visitor_leg = legs_to(sim, VISITOR_PHONE)[0]

    def together() -> ConferenceRecord | None:
        room = sim.conference(f"cb-{call_id}")
        return room if room is not None and len(room.bridged) == 2 else None

    room = await sim.wait_until(together, timeout=10, what="both legs in the callback's room")
    assert set(room.bridged) == {agent_leg.sid, visitor_leg.sid}
    # The whisper: who, from which page, in which language, and press 1.
    whisper = next(s for s in agent_leg.said if "Press 1" in s)
    assert "a customer" in whisper and "/pricing" in whisper and "English" in whisper
    assert [v.detail["Digits"] for v in agent_leg.verbs_named("Gather")] == ["1"]
    assert "Calling the customer now." in agent_leg.said
    assert await status_of(http, a, "anna") == "on_call"

    sim.hangup(visitor_leg.sid)  # the customer hangs up: the room ends for both
    done = await ticket_state(http, a, created, "completed", timeout=15)
    assert done["state"] == "completed"
    await sim.wait_for_call(sid=agent_leg.sid, status="completed", timeout=10)
    call = await stored(a, call_id)
    assert ring_log(call) == [
        ("ring_device", "mobile"),
        ("ring_ended", "mobile: accepted_by_key (ring 1)"),
    ]

    async def free_everywhere() -> bool:
        return all([await status_of(http, n, "anna") == "available" for n in (a, b)])

    await eventually(free_everywhere)


async def test_each_side_hears_its_own_language(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, http: aiohttp.ClientSession, redis_url: str
) -> None:
    """Anna speaks German: her whisper and her prompts are German, read by a German voice,
    and name the customer's language in German; the customer, who asked in English, is
    greeted in English. Across two nodes: the ring is placed by either."""

    def german_anna() -> Settings:
        settings = mobile_settings(tmp_path, sim, redis_url)  # each node its own port
        acme = settings.sites["acme"]
        anna = replace(acme.agents["anna"], languages=("de", "en"))
        return replace(
            settings, sites={"acme": replace(acme, agents={**acme.agents, "anna": anna})}
        )

    _, b, created = await anna_takes_a_callback(nodes, http, sim, german_anna)
    await ticket_state(http, b, created, "connected", timeout=15)
    agent_leg = legs_to(sim, ANNA_PHONE)[0]
    visitor_leg = legs_to(sim, VISITOR_PHONE)[0]
    spoken = {v.text: v.attrs.get("language") for v in agent_leg.verbs_named("Say")}
    whisper = next(s for s in spoken if "Drücken Sie die 1" in s)
    assert "Rückruf" in whisper and "/pricing" in whisper and "Englisch" in whisper
    assert spoken[whisper] == "de-DE"
    assert spoken["Die Kundin oder der Kunde wird jetzt angerufen."] == "de-DE"
    greeted = {v.text: v.attrs.get("language") for v in visitor_leg.verbs_named("Say")}
    assert greeted == {"Hello, this is Acme Telecom. Connecting you to Anna now.": "en-US"}


@pytest.mark.parametrize(
    ("phone", "outcome"),
    [
        ({"voicemail": True}, "machine"),
        ({"press": "2"}, "declined_key"),
        ({}, "no_input"),
        ({"busy": True}, "busy"),
    ],
    ids=["voicemail", "presses-2", "silent", "busy"],
)
async def test_an_agent_who_does_not_press_1_is_skipped_and_the_next_rings(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    phone: dict[str, Any],
    outcome: str,
) -> None:
    node = await phone_node(nodes, mobile_settings(tmp_path, sim))
    sim.phone(ANNA_PHONE, answer_after=1, **phone)
    sim.phone(BEN_PHONE, answer_after=1, press="1")
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=20)
    await on_mobile(http, node, "anna")  # idle longest: rings first
    await on_mobile(http, node, "ben")
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE, "page": PAGE})

    await ticket_state(http, node, created, "connected", timeout=15)
    anna_leg = legs_to(sim, ANNA_PHONE)[0]
    ben_leg = legs_to(sim, BEN_PHONE)[0]
    room = sim.conference(f"cb-{created['call_id']}")
    assert room is not None and ben_leg.sid in room.participants
    assert anna_leg.sid not in room.participants
    if outcome == "machine":
        assert anna_leg.answered_by == "machine_start"
        assert anna_leg.verbs_named("Gather") == [], "a voicemail never hears the whisper"
    await sim.wait_for_call(sid=anna_leg.sid, status="ended", timeout=10)
    call = await stored(node, created["call_id"])
    assert ring_log(call) == [
        ("ring_device", "mobile"),
        ("ring_ended", f"mobile: {outcome} (ring 1)"),
        ("ring_device", "mobile"),
        ("ring_ended", "mobile: accepted_by_key (ring 2)"),
    ]
    assert call.agent_id == "ben" and call.tried == ("anna",)
    assert await status_of(http, node, "anna") == "available"
    assert await mobile_rings(http, node) == {outcome: 1.0, "accepted_by_key": 1.0}


async def test_the_site_ring_timeout_hangs_up_the_agent_leg(
    nodes: NodeFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # Slower simulated time: the whisper outlasts the site's ring timeout of 1 s.
    async with TwilioSim(time_scale=0.5) as slow:
        node = await phone_node(nodes, mobile_settings(tmp_path, slow, ring_timeout_s=1.0))
        slow.phone(ANNA_PHONE, answer_after=0.5, amd_after=0.2)
        await on_mobile(http, node, "anna")
        _, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
        leg = await slow.wait_for_call(to=ANNA_PHONE, status="completed", timeout=10)
        assert [u.get("Status") for u in leg.rest_updates] == [["completed"]]

        async def noted() -> bool:
            call = await stored(node, created["call_id"])
            return ("ring_ended", "mobile: timeout (ring 1)") in ring_log(call)

        await eventually(noted)
        assert legs_to(slow, VISITOR_PHONE) == [], "nobody took the call: no dial"
        assert slow.contract_violations == []


async def test_the_customer_never_answers_so_the_waiting_agent_is_told_and_freed(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, http: aiohttp.ClientSession
) -> None:
    settings = mobile_settings(tmp_path, sim)
    policy = replace(settings.sites["acme"].callback_policy, retries=0)
    settings = replace(
        settings, sites={"acme": replace(settings.sites["acme"], callback_policy=policy)}
    )
    node = await phone_node(nodes, settings)
    sim.phone(ANNA_PHONE, answer_after=1, press="1")
    sim.phone(VISITOR_PHONE, busy=True)
    await on_mobile(http, node, "anna")
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    failed = await ticket_state(http, node, created, "failed", timeout=15)
    assert failed["reason"] == "busy"
    leg = await sim.wait_for_call(to=ANNA_PHONE, status="completed", timeout=10)
    told = [u["Twiml"][0] for u in leg.rest_updates if "Twiml" in u]
    assert told and "could not be reached" in told[0]
    assert any("could not be reached" in s for s in leg.said)
    await eventually(lambda: _available(http, node))


async def _available(http: aiohttp.ClientSession, node: Node) -> bool:
    return await status_of(http, node, "anna") == "available"


def signed(sim: TwilioSim, url: str, params: dict[str, str]) -> dict[str, str]:
    return {"X-Twilio-Signature": sdk_signature(sim.auth_token, url, list(params.items()))}


async def test_forged_or_mismatched_agent_leg_webhooks_change_nothing(
    nodes: NodeFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with TwilioSim(time_scale=0.5) as slow:
        node = await phone_node(nodes, mobile_settings(tmp_path, slow, ring_timeout_s=10.0))
        slow.phone(ANNA_PHONE, answer_after=30)  # rings on
        await on_mobile(http, node, "anna")
        _, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
        call_id = created["call_id"]

        async def placed() -> bool:
            return (await stored(node, call_id)).agent_legs != ()

        await eventually(placed)
        before = await stored(node, call_id)
        ((ring, leg),) = before.agent_legs
        assert ring == 1
        key = f"{node.url}/v1/twilio/agent/key/{call_id}/1"
        status = f"{node.url}/v1/twilio/agent/status/{call_id}/1"
        press = {"CallSid": leg, "Digits": "1"}
        # Not signed by Twilio.
        r = await http.post(key, data=press, headers={"X-Twilio-Signature": "forged"})
        assert r.status == 403 and (await r.json())["error"]["code"] == "invalid_signature"
        # Signed, but about another leg, or another ring of this call.
        other = {"CallSid": "CA" + "0" * 32, "Digits": "1"}
        r = await http.post(key, data=other, headers=signed(slow, key, other))
        assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
        busy = {"CallSid": "CA" + "0" * 32, "CallStatus": "busy"}
        r = await http.post(status, data=busy, headers=signed(slow, status, busy))
        assert r.status == 403
        ring2 = f"{node.url}/v1/twilio/agent/key/{call_id}/2"
        r = await http.post(ring2, data=press, headers=signed(slow, ring2, press))
        assert r.status == 403
        after = await stored(node, call_id)
        assert after.version == before.version and after.state.value == "ringing"
        metrics = await (await http.get(f"{node.url}/metrics")).text()
        assert 'membrane_errors_total{code="forbidden"} 3.0' in metrics
        # The real leg's own key press still counts (signed, its CallSid, its ring).
        r = await http.post(key, data=press, headers=signed(slow, key, press))
        assert r.status == 200 and "cb-" + call_id in await r.text()
        assert (await stored(node, call_id)).state.value == "dialing"


async def test_mobile_after_desktop_rings_the_phone_when_the_app_ring_runs_out(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    settings = mobile_settings(tmp_path, sim, ring_timeout_s=2.0, mobile_after_desktop=True)
    node = await phone_node(nodes, settings)
    sim.phone(ANNA_PHONE, answer_after=1, press="1")
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=20)
    anna = await agent(clients, node, "anna")  # in the agent app, not on mobile
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    ring = await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"])
    assert ring["attempt"] == 1 and legs_to(sim, ANNA_PHONE) == []
    stop = await anna.next("call:ring_stop", lambda m: m["call_id"] == created["call_id"])
    assert stop["reason"] == "no_answer"
    await ticket_state(http, node, created, "connected", timeout=15)
    room = sim.conference(f"cb-{created['call_id']}")
    assert room is not None and legs_to(sim, ANNA_PHONE)[0].sid in room.participants
    call = await stored(node, created["call_id"])
    assert ring_log(call) == [
        ("ring_device", "app"),
        ("ring_ended", "app: timeout (ring 1)"),
        ("ring_device", "mobile"),
        ("ring_ended", "mobile: accepted_by_key (ring 2)"),
    ]
    assert call.agent_id == "anna"


async def test_a_decline_in_the_app_is_an_answer_the_phone_does_not_ring(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    settings = mobile_settings(tmp_path, sim, mobile_after_desktop=True)
    node = await phone_node(nodes, settings)
    anna = await agent(clients, node, "anna")
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"])
    ack = await anna.call("call:decline", {"call_id": created["call_id"]}, "/agent")
    assert ack["ok"], ack

    async def noted() -> bool:
        call = await stored(node, created["call_id"])
        return ("ring_ended", "app: declined (ring 1)") in ring_log(call)

    await eventually(noted)
    assert legs_to(sim, ANNA_PHONE) == []
    assert (await stored(node, created["call_id"])).state.value == "queued"


async def test_customer_first_the_bridge_is_screened_and_the_next_agent_put_through(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, http: aiohttp.ClientSession
) -> None:
    """Customer first: the visitor answers and waits; each agent's leg hears the whisper
    (<Number url>); Anna presses 2, so the bridge does not connect and Ben is put through."""
    settings = mobile_settings(tmp_path, sim)
    policy = replace(settings.sites["acme"].callback_policy, agent_first=False)
    acme = replace(settings.sites["acme"], callback_policy=policy)
    node = await phone_node(nodes, replace(settings, sites={"acme": acme}))
    # The visitor waits long (20 s real) and the test hangs up: Anna's whisper, her key and
    # Ben's whisper take more than 2 s on a slow machine under the suite.
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=400)
    sim.phone(ANNA_PHONE, answer_after=1, press="2")
    sim.phone(BEN_PHONE, answer_after=1, press="1")
    await on_mobile(http, node, "anna")
    await on_mobile(http, node, "ben")
    _, created = await request_callback(http, node, {"phone": VISITOR_PHONE, "page": PAGE})

    ben_leg = await sim.wait_for_call(to=BEN_PHONE, status="in-progress", timeout=15)
    visitor_leg = legs_to(sim, VISITOR_PHONE)[0]
    anna_leg = legs_to(sim, ANNA_PHONE)[0]
    assert anna_leg.parent_sid == visitor_leg.sid == ben_leg.parent_sid
    assert anna_leg.params["url"][0].endswith(f"/v1/twilio/screen/{created['call_id']}/1")
    dials = visitor_leg.verbs_named("Dial")

    def bridged() -> bool:
        return any(d.detail.get("bridged_to") == ben_leg.sid for d in dials)

    await sim.wait_until(lambda: bridged() or None, timeout=10, what="Ben bridged")
    assert [d.detail.get("bridged_to") for d in dials] == [None, ben_leg.sid]
    assert any("Press 1" in s for s in anna_leg.said)
    assert any("Drücken Sie die 1" in s for s in ben_leg.said), "Ben speaks German first"
    assert await status_of(http, node, "ben") == "on_call"
    assert await status_of(http, node, "anna") == "available"
    sim.hangup(visitor_leg.sid)
    done = await ticket_state(http, node, created, "completed", timeout=15)
    assert done["agent"]["name"] == "Ben"
    call = await stored(node, created["call_id"])
    assert ring_log(call) == [
        ("ring_device", "mobile (dial 1, anna)"),
        ("ring_ended", "mobile: declined_key (dial 1, anna)"),
        ("ring_device", "mobile (dial 1, ben)"),
        ("ring_ended", "mobile: accepted_by_key (dial 1, ben)"),
    ]
    assert await mobile_rings(http, node) == {"declined_key": 1.0, "accepted_by_key": 1.0}


async def test_a_forged_screen_webhook_changes_nothing(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, http: aiohttp.ClientSession
) -> None:
    node = await phone_node(nodes, mobile_settings(tmp_path, sim))
    url = f"{node.url}/v1/twilio/screen-key/c_unknown/1"
    press = {"CallSid": "CA" + "1" * 32, "ParentCallSid": "CA" + "2" * 32, "Digits": "1"}
    r = await http.post(url, data=press, headers=signed(sim, url, press))
    assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
    r = await http.post(url, data=press)
    assert r.status == 403 and (await r.json())["error"]["code"] == "invalid_signature"
