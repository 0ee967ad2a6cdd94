"""Twilio webhook hygiene: a signed webhook must name the leg of the callback attempt its path
is about (``unknown_leg`` otherwise, nothing changed), and every refused webhook is counted
under its code. The rule alone as a table, then end to end with the simulator and raw signed
requests."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Node, NodeFactory, SocketClient, eventually, free_port, make_settings, mint
from test_callbacks import without_quiet_hours_now
from twilio_sim import TwilioSim
from twilio_sim.signature import SIGNATURE_HEADER, sdk_signature

from gateway.core import callback as cb
from gateway.core.call import Call, CallChannel, CallError, CallState
from gateway.edge.http import appkeys as keys
from gateway.settings import TwilioSettings

ORIGIN = {"Origin": "http://127.0.0.1:8080"}
VISITOR_PHONE = "+353861110001"
OTHER = "CA" + "f" * 32


def callback(dials: int, legs: tuple[tuple[int, str], ...], provider_id: str | None) -> Call:
    return Call(
        "c1",
        "acme",
        "v",
        CallChannel.CALLBACK,
        CallState.DIALING,
        0.0,
        dials=dials,
        legs=legs,
        provider_id=provider_id,
    )


@pytest.mark.parametrize(
    ("call", "attempt", "leg", "known"),
    [
        # The leg the dial placed for the attempt, and only it.
        (callback(1, ((1, "CA1"),), "CA1"), 1, "CA1", True),
        (callback(1, ((1, "CA1"),), "CA1"), 1, "CA2", False),
        # Before the dial's answer is stored, a leg's first status may name it ...
        (callback(1, (), None), 1, "CA1", True),
        # ... but not a leg of another attempt.
        (callback(2, ((1, "CA1"),), None), 2, "CA1", False),
        (callback(2, ((1, "CA1"),), None), 2, "CA2", True),
        # An earlier attempt's webhooks name its own leg, never the current one's.
        (callback(2, ((1, "CA1"), (2, "CA2")), "CA2"), 1, "CA1", True),
        (callback(2, ((1, "CA1"), (2, "CA2")), "CA2"), 1, "CA2", False),
        (callback(2, ((1, "CA1"), (2, "CA2")), "CA2"), 2, "CA1", False),
        # After an attempt failed (provider_id cleared), its leg is still its own.
        (callback(1, ((1, "CA1"),), None), 1, "CA1", True),
        (callback(1, ((1, "CA1"),), None), 1, "CA2", False),
        # An attempt not started, or none at all.
        (callback(1, ((1, "CA1"),), "CA1"), 2, "CA1", False),
        (callback(0, (), None), 1, "CA1", False),
        # A record from before ``legs``: the current attempt's leg is its provider id.
        (callback(1, (), "CA1"), 1, "CA1", True),
        (callback(1, (), "CA1"), 1, "CA2", False),
        # A browser call has no legs.
        (replace(callback(1, (), None), channel=CallChannel.WEBRTC), 1, "CA1", False),
    ],
)
def test_check_leg(call: Call, attempt: int, leg: str, known: bool) -> None:
    if known:
        assert cb.check_leg(call, attempt, leg) is call
    else:
        with pytest.raises(CallError) as refused:
            cb.check_leg(call, attempt, leg)
        assert refused.value.code == "unknown_leg"


def test_a_placed_leg_is_kept_by_attempt() -> None:
    call = callback(1, (), None)
    placed = cb.leg_placed(call, 1, "CA1")
    assert (placed.provider_id, placed.legs) == ("CA1", ((1, "CA1"),))
    assert cb.leg_placed(placed, 1, "CA1") is placed
    again = cb.leg_placed(replace(placed, dials=2, provider_id=None), 2, "CA2")
    assert again.legs == ((1, "CA1"), (2, "CA2"))


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    # Slow enough that a ringing leg rings on (15 s) while a test looks at it.
    sim = TwilioSim(time_scale=0.5)
    await sim.start()
    yield sim
    await sim.close()
    assert sim.contract_violations == []


@pytest.fixture
async def node(nodes: NodeFactory, tmp_path: Path, sim: TwilioSim) -> Node:
    port = free_port()
    settings = make_settings(
        tmp_path,
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        twilio=TwilioSettings(sim.account_sid, sim.auth_token, sim.base_url),
    )
    node = await nodes(without_quiet_hours_now(settings))
    node.app[keys.CALLBACKS].min_lead_s = 1.0
    return node


async def errors_counted(http: aiohttp.ClientSession, node: Node, code: str) -> float:
    text = await (await http.get(f"{node.url}/metrics")).text()
    found = re.search(rf'^membrane_errors_total\{{code="{code}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def post_signed(
    http: aiohttp.ClientSession, node: Node, sim: TwilioSim, path: str, form: dict[str, str]
) -> tuple[int, Any]:
    """A webhook as Twilio would sign it (the simulator's account), posted to ``node``."""
    url = node.settings.public_url.rstrip("/") + path
    signature = sdk_signature(sim.auth_token, url, list(form.items()))
    r = await http.post(f"{node.url}{path}", data=form, headers={SIGNATURE_HEADER: signature})
    body = await r.json() if r.content_type == "application/json" else await r.text()
    return r.status, body


async def test_webhooks_naming_another_leg_are_refused_and_change_nothing(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    sim.phone(VISITOR_PHONE, answer_after=30)
    anna = clients()
    await anna.connect(node.url, "/agent", {"token": mint(node.settings, "anna")})
    r = await http.post(f"{node.url}/v1/sites/acme/sessions", json={}, headers=ORIGIN)
    token = (await r.json())["token"]
    r = await http.post(
        f"{node.url}/v1/sites/acme/callbacks",
        json={"phone": VISITOR_PHONE},
        headers={**ORIGIN, "Authorization": f"Bearer {token}"},
    )
    created = await r.json()
    assert r.status == 201, created
    call_id = created["call_id"]
    await anna.next("call:ring", lambda ring: ring["call_id"] == call_id)
    assert (await anna.call("call:accept", {"call_id": call_id}, "/agent"))["ok"]
    leg = await sim.wait_for_call(to=VISITOR_PHONE, status="ringing", timeout=10)
    store = node.app[keys.STORE]

    async def leg_stored() -> bool:
        """The leg placed, and its ringing heard: nothing more happens until it answers."""
        row = await store.get_call(call_id)
        return (
            row is not None
            and [1, leg.sid] in row.data.get("legs", [])
            and [leg.sid, 1] in row.data.get("legs_heard", [])
            and any(entry[1] == "phone_ringing" for entry in row.data["timeline"])
        )

    await eventually(leg_stored, 5)
    before = await store.get_call(call_id)
    assert before is not None
    refused = await errors_counted(http, node, "unknown_leg")

    # Signed, well-formed, and about another leg: the current attempt's path with a foreign
    # CallSid, an attempt not started, and each TwiML endpoint. Each is refused and counted.
    cases = [
        (f"/v1/twilio/status/{call_id}/1", {"CallSid": OTHER, "CallStatus": "completed"}),
        (f"/v1/twilio/status/{call_id}/2", {"CallSid": leg.sid, "CallStatus": "ringing"}),
        (f"/v1/twilio/voice/{call_id}/1", {"CallSid": OTHER, "AnsweredBy": "human"}),
        (f"/v1/twilio/bridge/{call_id}/1", {"CallSid": OTHER, "DialCallStatus": "no-answer"}),
        (f"/v1/twilio/voice/{call_id}/2", {"CallSid": leg.sid}),
    ]
    for path, form in cases:
        status, body = await post_signed(http, node, sim, path, form)
        assert status == 403, (path, body)
        assert body["error"]["code"] == "unknown_leg", (path, body)
    assert await errors_counted(http, node, "unknown_leg") == refused + len(cases)
    after = await store.get_call(call_id)
    assert after is not None and (after.version, after.data) == (before.version, before.data)
    assert sim.call(leg.sid).status == "ringing", "the real leg was left alone"

    # The real leg's own webhook is still taken: the visitor answers and is connected.
    status, twiml = await post_signed(
        http,
        node,
        sim,
        f"/v1/twilio/status/{call_id}/1",
        {"CallSid": leg.sid, "CallStatus": "in-progress"},
    )
    assert status == 200, twiml


async def test_every_refused_webhook_is_counted_under_its_code(
    node: Node, sim: TwilioSim, http: aiohttp.ClientSession
) -> None:
    """Forged (unsigned, badly signed) and malformed webhooks on all three routes."""
    before = {
        code: await errors_counted(http, node, code)
        for code in ("invalid_signature", "invalid_payload", "unknown_leg")
    }
    for kind in ("voice", "status", "bridge"):
        path = f"/v1/twilio/{kind}/c1/1"
        form = {"CallSid": OTHER, "CallStatus": "ringing", "DialCallStatus": "completed"}
        for headers in ({}, {SIGNATURE_HEADER: "Zm9yZ2Vk"}):
            r = await http.post(f"{node.url}{path}", data=form, headers=headers)
            assert r.status == 403 and (await r.json())["error"]["code"] == "invalid_signature"
        # Signed, but the path names no leg, or the form lacks what the route needs.
        status, body = await post_signed(http, node, sim, f"/v1/twilio/{kind}/c1/0", form)
        assert (status, body["error"]["code"]) == (400, "invalid_payload")
        status, body = await post_signed(http, node, sim, path, {"AccountSid": sim.account_sid})
        assert (status, body["error"]["code"]) == (400, "invalid_payload")
        # Signed and complete, about a call the gateway does not have (any more): nothing to
        # change; a leg asking for TwiML is hung up.
        status, body = await post_signed(http, node, sim, path, form)
        assert status == 200, body
        if kind != "status":
            assert "<Hangup" in body, body
    after = {code: await errors_counted(http, node, code) for code in before}
    assert after["invalid_signature"] - before["invalid_signature"] == 6
    assert after["invalid_payload"] - before["invalid_payload"] == 6
    assert after["unknown_leg"] == before["unknown_leg"]
