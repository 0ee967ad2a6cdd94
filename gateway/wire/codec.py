"""Wire formats: payloads in, validated against their structs (gateway/wire/presence.py,
calls.py, rest.py, events.py) into what the services take, and the stored form of a call.

Every REST body and socket.io payload passes through here, and bad input becomes one
``invalid_payload`` error naming the field (``invalid_phone`` for a callback's number).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
from msgspec import Struct

from gateway.core.call import Call, CallChannel, CallRequest, CallState, TimelineEntry
from gateway.core.errors import Invalid
from gateway.core.model import DeviceKind, DeviceState
from gateway.wire.base import (
    ID_PATTERN,
    MAX_PHONE,
    MAX_PRIORITY,
    VISITOR_ID_PATTERN,
    VISITOR_SECRET_PATTERN,
    Id,
    Json,
    Language,
    decode,
    iso,
    parse_iso,
)
from gateway.wire.calls import (
    CallFollowUp,
    CallHold,
    CallRef,
    CallStart,
    RtcSignal,
    call_to_wire,
)
from gateway.wire.events import AgentAuth, VisitorAuth
from gateway.wire.presence import DeviceUpdate as DeviceBody
from gateway.wire.presence import PresenceSet, presence_to_wire
from gateway.wire.rest import (
    CallbackRequest,
    SessionRequest,
    session_to_wire,
)

# Also what the edges and services have always taken from here.
__all__ = [
    "ID_PATTERN",
    "MAX_PRIORITY",
    "VISITOR_ID_PATTERN",
    "VISITOR_SECRET_PATTERN",
    "Json",
    "SessionRequest",
    "call_to_wire",
    "iso",
    "parse_iso",
    "presence_to_wire",
    "session_to_wire",
]


def as_object(payload: object, what: str = "payload") -> Json:
    if not isinstance(payload, dict):
        raise Invalid(f"{what} must be a JSON object")
    return payload


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise Invalid(f"{what} must be 1-64 letters, digits or _.:-")
    return value


# --- presence ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceUpdate:
    """What a client said about one of its devices, for the presence service."""

    device_id: str
    kind: DeviceKind
    state: DeviceState
    priority: int


def device_update_from_wire(payload: object, device_id: str | None = None) -> DeviceUpdate:
    """A ``PUT .../devices/{device_id}`` body (``device_id``: the path's, which wins) or a
    ``presence:set`` (``device_id``: the socket's own device, when the payload names none)."""
    if device_id:
        path_id = check_id(device_id, "device_id")
        body = decode(payload, DeviceBody)
        return DeviceUpdate(path_id, body.kind, body.state, _int(body))
    named = decode(payload, PresenceSet)
    if not named.device_id:
        raise Invalid("device_id is required")
    return DeviceUpdate(named.device_id, named.kind, named.state, _int(named))


def _int(body: DeviceBody | PresenceSet) -> int:
    return 0 if body.priority is None else int(body.priority)


def visitor_auth_from_wire(auth: Json) -> VisitorAuth:
    """A ``/visitor`` connect's ``auth``, its token already verified."""
    return decode(auth, VisitorAuth, "auth")


def agent_auth_from_wire(auth: Json) -> AgentAuth:
    """An ``/agent`` connect's ``auth``, its token already verified."""
    return decode(auth, AgentAuth, "auth")


# --- visitor sessions ----------------------------------------------------------------------


def session_request_from_wire(payload: object) -> SessionRequest:
    """The body of ``POST .../sessions``. An id or secret the gateway cannot have issued
    (stale storage, another gateway's) is no claim: the visitor is simply new, as they would
    be with a wrong secret."""
    obj = as_object(payload, "body")
    try:
        claim = msgspec.convert(obj, SessionRequest)
    except msgspec.ValidationError:
        return SessionRequest(None, None)
    if claim.visitor_id is None or claim.visitor_secret is None:
        return SessionRequest(None, None)
    return claim


# --- calls ---------------------------------------------------------------------------------


def call_to_record(call: Call) -> Json:
    """The stored form: every field, round-trips through ``call_from_record``."""
    r = call.request
    return {
        "call_id": call.call_id,
        "site": call.site,
        "visitor_id": call.visitor_id,
        "channel": call.channel.value,
        "state": call.state.value,
        "created_at": call.created_at,
        "request": {
            "language": r.language,
            "branch": r.branch,
            "location": list(r.location) if r.location else None,
            "page": r.page,
            "skills": list(r.skills),
        },
        "agent_id": call.agent_id,
        "agent_sid": call.agent_sid,
        "visitor_sid": call.visitor_sid,
        "attempt": call.attempt,
        "ring_expires_at": call.ring_expires_at,
        "tried": list(call.tried),
        "reason": call.reason,
        "callback_offer_wait_s": call.callback_offer_wait_s,
        "connected_at": call.connected_at,
        "ended_at": call.ended_at,
        "timeline": [[e.at, e.event, e.detail, e.internal] for e in call.timeline],
        "phone": call.phone,
        "token_hash": call.token_hash,
        "share_hash": call.share_hash,
        "scheduled_at": call.scheduled_at,
        "place_at": call.place_at,
        "dials": call.dials,
        "dial_started_at": call.dial_started_at,
        "provider_id": call.provider_id,
        "media": call.media,
        "media_stream": call.media_stream,
        "media_moves": call.media_moves,
        "answered_by": call.answered_by,
        "legs_heard": [[leg, progress] for leg, progress in call.legs_heard],
        "legs": [[attempt, leg] for attempt, leg in call.legs],
        "agent_legs": [[ring, leg] for ring, leg in call.agent_legs],
        "promised_at": call.promised_at,
        "told_at": call.told_at,
        "texts": call.texts,
        "follow_up": call.follow_up,
        "follow_up_at": call.follow_up_at,
        "follow_up_of": call.follow_up_of,
        "pinned_agent": call.pinned_agent,
        "pinned_until": call.pinned_until,
        "note": call.note,
        "survey_score": call.survey_score,
        "survey_comment": call.survey_comment,
        "experiment": call.experiment,
        "arm": call.arm,
    }


def call_from_record(data: Json, version: int) -> Call:
    r = data["request"]
    location = r.get("location")
    return Call(
        call_id=data["call_id"],
        site=data["site"],
        visitor_id=data["visitor_id"],
        channel=CallChannel(data["channel"]),
        state=CallState(data["state"]),
        created_at=float(data["created_at"]),
        request=CallRequest(
            language=r.get("language"),
            branch=r.get("branch"),
            location=(float(location[0]), float(location[1])) if location else None,
            page=r.get("page"),
            skills=tuple(r.get("skills", ())),
        ),
        version=version,
        agent_id=data.get("agent_id"),
        agent_sid=data.get("agent_sid"),
        visitor_sid=data.get("visitor_sid"),
        attempt=int(data.get("attempt", 0)),
        ring_expires_at=data.get("ring_expires_at"),
        tried=tuple(data.get("tried", ())),
        reason=data.get("reason"),
        callback_offer_wait_s=data.get("callback_offer_wait_s"),
        connected_at=data.get("connected_at"),
        ended_at=data.get("ended_at"),
        timeline=tuple(TimelineEntry(at, ev, de, bool(it)) for at, ev, de, it in data["timeline"]),
        phone=data.get("phone"),
        token_hash=data.get("token_hash"),
        share_hash=data.get("share_hash"),
        scheduled_at=data.get("scheduled_at"),
        place_at=data.get("place_at"),
        dials=int(data.get("dials", 0)),
        dial_started_at=data.get("dial_started_at"),
        provider_id=data.get("provider_id"),
        media=data.get("media"),
        media_stream=data.get("media_stream"),
        media_moves=int(data.get("media_moves", 0)),
        answered_by=data.get("answered_by"),
        legs_heard=tuple((str(leg), int(n)) for leg, n in data.get("legs_heard", ())),
        legs=tuple((int(n), str(leg)) for n, leg in data.get("legs", ())),
        agent_legs=tuple((int(ring), str(leg)) for ring, leg in data.get("agent_legs", ())),
        promised_at=data.get("promised_at"),
        told_at=data.get("told_at"),
        texts=int(data.get("texts", 0)),
        follow_up=data.get("follow_up"),
        follow_up_at=data.get("follow_up_at"),
        follow_up_of=data.get("follow_up_of"),
        pinned_agent=data.get("pinned_agent"),
        pinned_until=data.get("pinned_until"),
        note=data.get("note"),
        survey_score=data.get("survey_score"),
        survey_comment=data.get("survey_comment"),
        experiment=data.get("experiment"),
        arm=data.get("arm"),
    )


class Filters(Struct):
    """The ``language`` and ``branch`` query parameters of the availability queries."""

    language: Language | None = None
    branch: Id | None = None


def opt_query(query: Mapping[str, str], key: str) -> str | None:
    """A query parameter: absent is None, but present and empty is refused, not read as
    absent: ``?language=`` is a page's bug (an unset variable), and answering it as if no
    filter were asked for would hide that bug behind a plausible answer."""
    value = query.get(key)
    if value is None:
        return None
    if not value:
        raise Invalid(f"{key} must not be empty; leave it out to ask for any")
    return value


def branch_from_query(query: Mapping[str, str]) -> str | None:
    return filters_from_query(query, ("branch",))[1]


def filters_from_query(
    query: Mapping[str, str], keys: tuple[str, ...] = ("language", "branch")
) -> tuple[str | None, str | None]:
    """The ``language`` and ``branch`` filters of the availability queries."""
    given = {key: opt_query(query, key) for key in keys}
    filters = decode(given, Filters, "query")
    return filters.language, filters.branch


def call_request_from_wire(payload: object) -> CallRequest:
    """``call:start``: no payload at all asks for anyone."""
    return decode(payload if payload is not None else {}, CallStart).request()


def call_id_from_wire(payload: object) -> str:
    return decode(payload, CallRef).call_id


def follow_up_from_wire(payload: object) -> tuple[str, float, str, str | None]:
    """A validated ``call:follow_up``: the call, when, the note, and the number (if given)."""
    ask = decode(payload, CallFollowUp)
    if ask.phone is not None and not ask.phone.strip():
        raise Invalid("phone must not be blank", code="invalid_phone")
    return ask.call_id, parse_iso(ask.at, "at"), ask.note.strip(), ask.phone


def hold_from_wire(payload: object) -> tuple[str, bool]:
    hold = decode(payload, CallHold)
    return hold.call_id, hold.on


def signal_from_wire(payload: object) -> tuple[str, Json]:
    """A validated ``rtc:signal``: the call id and what to relay (description or candidate),
    normalised to the struct's fields."""
    signal = decode(payload, RtcSignal)
    return signal.call_id, msgspec.to_builtins(signal)


@dataclass(frozen=True, slots=True)
class CallbackIn:
    """A validated ``POST /v1/sites/{site}/callbacks`` body (the number is checked later,
    against the site's policy)."""

    phone: str
    at: float | None
    request: CallRequest
    after_call: str | None
    """The visitor's browser call that nobody could answer: the callback keeps its place."""


def callback_from_wire(payload: object) -> CallbackIn:
    # The phone first: its refusal is an abuse rule (invalid_phone, counted), whatever else
    # is wrong with the body; the number rules (gateway.core.phone_policy) check the rest.
    if isinstance(payload, dict):
        phone = payload.get("phone")
        if isinstance(phone, str) and len(phone) > MAX_PHONE:
            raise Invalid("phone is too long", code="invalid_phone")
        if not isinstance(phone, str) or not phone.strip():
            message = "phone is required, in international form (+...)"
            raise Invalid(message, code="invalid_phone")
    body = decode(payload, CallbackRequest)
    return CallbackIn(
        phone=body.phone,
        # Present but empty is refused, as ?language= is (opt_query); null is absent.
        at=parse_iso(body.at, "at") if body.at is not None else None,
        request=body.request(),
        after_call=body.after_call,
    )
