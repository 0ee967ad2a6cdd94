"""The wire structs (gateway/wire): refusals name the field, what the gateway sends is what
its structs declare, and the OpenAPI document generated from them speaks JSON Schema."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from gateway.core.call import Call, CallChannel, CallRequest, CallState, TimelineEntry
from gateway.core.errors import Invalid
from gateway.core.model import Agent, Branch, Site
from gateway.wire import calls, codec, events, openapi, rest

T0 = 1_767_225_600.0
SITE = Site(
    "acme",
    "Acme",
    (),
    {"dublin": Branch("dublin", "Dublin", "Europe/Dublin")},
    {"anna": Agent("anna", "acme", "Anna", "dublin", mobile="+353861110002")},
)


def call(channel: CallChannel = CallChannel.WEBRTC, **changes: Any) -> Call:
    base: dict[str, Any] = {
        "call_id": "c_1",
        "site": "acme",
        "visitor_id": "v_1",
        "channel": channel,
        "state": CallState.RINGING,
        "created_at": T0,
        "request": CallRequest("de", "dublin", None, "/pricing", ()),
        "agent_id": "anna",
        "attempt": 1,
        "ring_expires_at": T0 + 20,
        "timeline": (TimelineEntry(T0, "requested", "d"), TimelineEntry(T0, "routed", "r", True)),
        "phone": "+353861110001" if channel is CallChannel.CALLBACK else None,
        "dials": 1 if channel is CallChannel.CALLBACK else 0,
    }
    return Call(**{**base, **changes})


@pytest.mark.parametrize(
    ("decode", "payload", "message"),
    [
        (codec.call_request_from_wire, {"location": {"lat": 91, "lon": 0}}, "location.lat"),
        (codec.call_request_from_wire, {"location": {"lat": 1}}, "location.lon is required"),
        (codec.call_request_from_wire, {"skills": ["ok", ""]}, "skills[1]"),
        (codec.call_request_from_wire, {"language": "English"}, "language must be a language"),
        (codec.call_id_from_wire, {"call_id": "a b"}, "call_id must be 1-64"),
        (codec.call_id_from_wire, [], "payload must be a JSON object"),
        (codec.signal_from_wire, {"call_id": "c"}, "exactly one of description or candidate"),
        (codec.signal_from_wire, {"call_id": "c", "candidate": {}}, "candidate.candidate"),
        (
            codec.device_update_from_wire,
            {"kind": "im", "state": "dnd", "priority": 1.5},
            "priority",
        ),
        (codec.agent_auth_from_wire, {"token": "t", "state": "asleep"}, "auth.state"),
    ],
)
def test_a_refusal_names_the_field(decode: Any, payload: Any, message: str) -> None:
    with pytest.raises(Invalid) as refused:
        decode(payload)
    assert refused.value.code == "invalid_payload"
    assert message in refused.value.message


def test_a_signal_is_relayed_as_its_struct() -> None:
    _, signal = codec.signal_from_wire(
        {"call_id": "c", "candidate": {"candidate": "x", "usernameFragment": 7}, "extra": 1}
    )
    assert signal == {
        "call_id": "c",
        "candidate": {"candidate": "x", "sdpMid": None, "sdpMLineIndex": None},
    }
    _, signal = codec.signal_from_wire({"call_id": "c", "description": {"type": "offer"}})
    assert signal == {"call_id": "c", "description": {"type": "offer", "sdp": ""}}


@pytest.mark.parametrize("channel", list(CallChannel))
def test_what_is_sent_is_what_the_structs_declare(channel: CallChannel) -> None:
    """Each payload converts back into its struct (strictly, with every constraint) and
    encodes to the same JSON."""
    sent: list[tuple[Any, dict[str, Any]]] = [
        (calls.Call, calls.call_to_wire(call(channel), SITE)),
        (calls.InternalCall, calls.call_to_wire(call(channel), SITE, internal=True)),
        (
            calls.CallRing,
            calls.ring_to_wire(call(channel), ("speaks de",), returning=True, last_agent="Anna"),
        ),
        (calls.RingStop, calls.ring_stop_to_wire(call(channel), "answered")),
        (events.CallAck, events.call_ack(call(channel), SITE)),
        (events.AgentCallAck, events.call_ack(call(channel), SITE, internal=True)),
        (events.AcceptAck, events.accept_ack(call(channel), SITE, [{"urls": ["stun:x"]}])),
        (events.Ok, events.ok_ack()),
        (events.ErrorAck, events.error_ack("overloaded", "busy", retry_after_ms=250)),
        (events.Draining, events.draining_to_wire(5)),
        (rest.CallbackSlots, rest.slots_to_wire([T0, T0 + 900])),
    ]
    for struct, wire in sent:
        again = msgspec.convert(wire, struct)
        assert msgspec.to_builtins(again) == wire, struct


def test_an_internal_call_of_a_callback_carries_phone_and_dials() -> None:
    browser = calls.call_to_wire(call(), SITE, internal=True)
    callback = calls.call_to_wire(call(CallChannel.CALLBACK), SITE, internal=True)
    assert "phone" not in browser and "dials" not in browser
    assert (callback["phone"], callback["dials"]) == ("+353861110001", 1)
    assert "visitor_id" not in calls.call_to_wire(call(), SITE)


def test_the_document_speaks_json_schema() -> None:
    """Patterns in JSON Schema's dialect (no Python ``\\A``/``\\Z``), and every reference of
    ``x-socketio`` resolves to a component."""
    document = openapi.document("http://x")
    schemas = document["components"]["schemas"]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            pattern = node.get("pattern")
            assert pattern is None or ("\\A" not in pattern and "\\Z" not in pattern), pattern
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                assert ref.removeprefix("#/components/schemas/") in schemas, ref
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert set(document["x-socketio"]) == {ns.path for ns in events.NAMESPACES}
    # Every name is the struct's own: generated clients get the document's names.
    assert all(re.fullmatch(r"[A-Z][A-Za-z]*", name) for name in schemas), sorted(schemas)
