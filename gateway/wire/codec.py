"""Wire formats: domain objects to JSON-ready dicts and validated payloads back.

Every REST body and socket.io payload passes through here, so the shapes of
docs/PROTOCOL.md live in one module and bad input becomes one ``invalid_payload`` error.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from gateway.core.call import Call, CallChannel, CallRequest, CallState, TimelineEntry
from gateway.core.errors import Invalid
from gateway.core.model import Device, DeviceKind, DeviceState, Presence, Site

Json = dict[str, Any]
E = TypeVar("E", bound=StrEnum)

# ``\Z``, not ``$``: ``$`` also matches before a trailing newline, so "abc\n" would pass.
ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
# What the gateway issues as visitor ids (POST .../sessions reuses only these).
VISITOR_ID_PATTERN = re.compile(r"v_[A-Za-z0-9_-]{16,48}")
# What the gateway issues as visitor secrets (gateway.edge.visitor_identity): 32 bytes, base64url.
VISITOR_SECRET_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
MAX_PRIORITY = 127


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _iso(ts)


@functools.lru_cache(maxsize=4096)
def _iso(ts: float) -> str:
    # The same device times are encoded again on every presence change of their agent, within
    # moments. Kept small: 65,536 entries grew a node by 13 MB over its first ten minutes
    # (bench/soak.py's heartbeats make a new time each), which looked like a leak.
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def parse_iso(value: str, field: str) -> float:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"{field} must be an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise Invalid(f"{field} must carry a UTC offset")
    return parsed.timestamp()


# --- validation of incoming payloads -------------------------------------------------------


def as_object(payload: object, what: str = "payload") -> Json:
    if not isinstance(payload, dict):
        raise Invalid(f"{what} must be a JSON object")
    return payload


def opt_str(obj: Json, key: str, max_len: int = 256) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise Invalid(f"{key} must be a string of at most {max_len} characters")
    return value


def req_str(obj: Json, key: str, max_len: int = 256) -> str:
    value = opt_str(obj, key, max_len)
    if value is None or not value:
        raise Invalid(f"{key} is required")
    return value


def req_id(obj: Json, key: str) -> str:
    value = req_str(obj, key, 64)
    check_id(value, key)
    return value


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise Invalid(f"{what} must be 1-64 letters, digits or _.:-")
    return value


def opt_int(obj: Json, key: str, lo: int, hi: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    # JSON has one kind of number: 1.0 is the integer 1, as JSON Schema (and so the OpenAPI
    # document) counts it. bool is an int in Python but never a number on the wire.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise Invalid(f"{key} must be an integer from {lo} to {hi}")
    return value


def req_enum(obj: Json, key: str, enum: type[E]) -> E:
    value = obj.get(key)
    if isinstance(value, str) and value in enum._value2member_map_:
        return enum(value)
    allowed = ", ".join(m.value for m in enum)
    raise Invalid(f"{key} must be one of: {allowed}")


# --- presence ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceUpdate:
    """What a client may say about one of its devices."""

    device_id: str
    kind: DeviceKind
    state: DeviceState
    priority: int


def device_update_from_wire(payload: object, device_id: str | None = None) -> DeviceUpdate:
    obj = as_object(payload)
    return DeviceUpdate(
        device_id=check_id(device_id, "device_id") if device_id else req_id(obj, "device_id"),
        kind=req_enum(obj, "kind", DeviceKind),
        state=req_enum(obj, "state", DeviceState),
        priority=opt_int(obj, "priority", -MAX_PRIORITY, MAX_PRIORITY) or 0,
    )


def device_to_wire(device: Device) -> Json:
    return {
        "device_id": device.device_id,
        "kind": device.kind.value,
        "state": device.state.value,
        "priority": device.priority,
        "last_seen": iso(device.last_seen),
        "expires_at": iso(device.expires_at),
    }


def presence_to_wire(presence: Presence) -> Json:
    return {
        "agent_id": presence.agent_id,
        "site": presence.site,
        "name": presence.name,
        "branch": presence.branch,
        "status": presence.status.value,
        "channels": [c.value for c in presence.channels],
        "devices": [device_to_wire(d) for d in presence.devices],
        "since": iso(presence.since),
    }


def ok(**fields: Any) -> Json:
    return {"ok": True, **fields}


# --- visitor sessions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """A visitor's claim to be someone the gateway met before: both parts, or neither."""

    visitor_id: str | None
    visitor_secret: str | None


def session_request_from_wire(payload: object) -> SessionRequest:
    """The body of ``POST .../sessions``. An id or secret
    the gateway cannot have issued (stale storage, another gateway's) is no claim: the
    visitor is simply new, as they would be with a wrong secret."""
    obj = as_object(payload, "body")
    visitor_id = obj.get("visitor_id")
    secret = obj.get("visitor_secret")
    if not (isinstance(visitor_id, str) and VISITOR_ID_PATTERN.fullmatch(visitor_id)):
        return SessionRequest(None, None)
    if not (isinstance(secret, str) and VISITOR_SECRET_PATTERN.fullmatch(secret)):
        return SessionRequest(None, None)
    return SessionRequest(visitor_id, secret)


def session_to_wire(
    token: str,
    visitor_id: str,
    visitor_secret: str,
    expires_at: float,
    ice_servers: list[Json],
) -> Json:
    return {
        "token": token,
        "visitor_id": visitor_id,
        "visitor_secret": visitor_secret,
        "expires_at": iso(expires_at),
        "ice_servers": ice_servers,
    }


# --- calls ---------------------------------------------------------------------------------


def ring_validity(call: Call) -> Json:
    """What every ``call:ring`` carries to be checked on its way: which ring of the call it
    is, and when it ends (ms since the epoch)."""
    assert call.ring_expires_at is not None
    return {"attempt": call.attempt, "ring_expires_at": round(call.ring_expires_at * 1000)}


def call_to_wire(
    call: Call,
    site: Site,
    internal: bool = False,
    position: int | None = None,
    eta_s: int | None = None,
) -> Json:
    """The Call shape of docs/PROTOCOL.md; ``internal`` adds what agents and supervisors see.
    ``position`` (1 = next) and ``eta_s`` are computed by the caller from the live queue."""
    agent = site.agents.get(call.agent_id) if call.agent_id else None
    branch = site.branches.get(agent.branch) if agent and agent.branch else None
    wire: Json = {
        "call_id": call.call_id,
        "site": call.site,
        "channel": call.channel.value,
        "state": call.state.value,
        "agent": {"name": agent.name, "branch": branch.name if branch else None} if agent else None,
        "position": position,
        "eta_s": eta_s,
        "scheduled_at": iso(call.scheduled_at) if call.state is CallState.SCHEDULED else None,
        "timeline": [
            {"at": iso(e.at), "event": e.event, "detail": e.detail}
            for e in call.timeline
            if internal or not e.internal
        ],
        "reason": call.reason,
        "callback_offer": (
            {"estimated_wait_s": call.callback_offer_wait_s}
            if call.state is CallState.FAILED and call.callback_offer_wait_s is not None
            else None
        ),
    }
    if internal:
        wire["visitor_id"] = call.visitor_id
        wire["agent_id"] = call.agent_id
        wire["attempt"] = call.attempt
        if call.channel is CallChannel.CALLBACK:
            wire["phone"] = call.phone
            wire["dials"] = call.dials
    return wire


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
        "scheduled_at": call.scheduled_at,
        "place_at": call.place_at,
        "dials": call.dials,
        "dial_started_at": call.dial_started_at,
        "provider_id": call.provider_id,
        "answered_by": call.answered_by,
        "legs_heard": [[leg, progress] for leg, progress in call.legs_heard],
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
        scheduled_at=data.get("scheduled_at"),
        place_at=data.get("place_at"),
        dials=int(data.get("dials", 0)),
        dial_started_at=data.get("dial_started_at"),
        provider_id=data.get("provider_id"),
        answered_by=data.get("answered_by"),
        legs_heard=tuple((str(leg), int(n)) for leg, n in data.get("legs_heard", ())),
    )


LANGUAGE_PATTERN = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?")


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
    branch = opt_query(query, "branch")
    return check_id(branch, "branch") if branch is not None else None


def filters_from_query(query: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The ``language`` and ``branch`` filters of the availability queries."""
    language = opt_query(query, "language")
    if language is not None and not LANGUAGE_PATTERN.fullmatch(language):
        raise Invalid("language must be a language tag like en or de-AT")
    return language, branch_from_query(query)


def call_request_from_wire(payload: object) -> CallRequest:
    obj = as_object(payload if payload is not None else {})
    language = opt_str(obj, "language", 16)
    if language is not None and not LANGUAGE_PATTERN.fullmatch(language):
        raise Invalid("language must be a language tag like en or de-AT")
    branch = opt_str(obj, "branch", 64)
    if branch is not None:
        check_id(branch, "branch")
    location = obj.get("location")
    coords: tuple[float, float] | None = None
    if location is not None:
        loc = as_object(location, "location")
        lat, lon = loc.get("lat"), loc.get("lon")
        if (
            not isinstance(lat, int | float)
            or not isinstance(lon, int | float)
            or isinstance(lat, bool)
            or isinstance(lon, bool)
            or not (-90 <= lat <= 90 and -180 <= lon <= 180)
        ):
            raise Invalid("location must be {lat, lon} in degrees")
        coords = (float(lat), float(lon))
    skills = obj.get("skills", [])
    if (
        not isinstance(skills, list)
        or len(skills) > 8
        or not all(isinstance(s, str) and 0 < len(s) <= 32 for s in skills)
    ):
        raise Invalid("skills must be a list of at most 8 short strings")
    page = opt_str(obj, "page", 2048)
    return CallRequest(language, branch, coords, page[:500] if page else None, tuple(skills))


def call_id_from_wire(payload: object) -> str:
    return check_id(req_str(as_object(payload), "call_id", 64), "call_id")


SDP_TYPES = frozenset({"offer", "answer", "pranswer", "rollback"})


def signal_from_wire(payload: object) -> tuple[str, Json]:
    """A validated ``rtc:signal``: the call id and what to relay (description or candidate)."""
    obj = as_object(payload)
    call_id = call_id_from_wire(obj)
    out: Json = {"call_id": call_id}
    description = obj.get("description")
    candidate = obj.get("candidate")
    if (description is None) == (candidate is None):
        raise Invalid("send exactly one of description or candidate")
    if description is not None:
        d = as_object(description, "description")
        sdp_type = d.get("type")
        sdp = d.get("sdp", "")
        if sdp_type not in SDP_TYPES or not isinstance(sdp, str) or len(sdp) > 32_000:
            raise Invalid("description must be {type, sdp} with a known type")
        out["description"] = {"type": sdp_type, "sdp": sdp}
    else:
        c = as_object(candidate, "candidate")
        text = c.get("candidate")
        mid = c.get("sdpMid")
        index = c.get("sdpMLineIndex")
        if (
            not isinstance(text, str)
            or len(text) > 1024
            or (mid is not None and (not isinstance(mid, str) or len(mid) > 64))
            or (index is not None and (not isinstance(index, int) or isinstance(index, bool)))
        ):
            raise Invalid("candidate must be {candidate, sdpMid, sdpMLineIndex}")
        out["candidate"] = {"candidate": text, "sdpMid": mid, "sdpMLineIndex": index}
        ufrag = c.get("usernameFragment")
        if isinstance(ufrag, str) and len(ufrag) <= 256:
            out["candidate"]["usernameFragment"] = ufrag
    return call_id, out


# The routing hints a callback request shares with ``call:start``.
HINT_KEYS = frozenset({"language", "branch", "location", "page", "skills"})


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
    obj = as_object(payload)
    phone = obj.get("phone")
    if not isinstance(phone, str) or not phone.strip():
        raise Invalid("phone is required, in international form (+...)", code="invalid_phone")
    if len(phone) > 32:
        raise Invalid("phone is too long", code="invalid_phone")
    at_raw = opt_str(obj, "at", 64)
    after = opt_str(obj, "after_call", 64)
    hints = {k: v for k, v in obj.items() if k in HINT_KEYS}
    return CallbackIn(
        phone=phone,
        # Present but empty is refused, as ?language= is (opt_query); null is absent.
        at=parse_iso(at_raw, "at") if at_raw is not None else None,
        request=call_request_from_wire(hints),
        after_call=check_id(after, "after_call") if after is not None else None,
    )
