"""Wire formats: domain objects to JSON-ready dicts and validated payloads back.

Every REST body and socket.io payload passes through here, so the shapes of
docs/PROTOCOL.md live in one module and bad input becomes one ``invalid_payload`` error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from gateway.errors import invalid_payload
from gateway.model import Device, DeviceKind, DeviceState, Presence

Json = dict[str, Any]
E = TypeVar("E", bound=StrEnum)

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MAX_PRIORITY = 127


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def parse_iso(value: str, field: str) -> float:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise invalid_payload(f"{field} must be an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise invalid_payload(f"{field} must carry a UTC offset")
    return parsed.timestamp()


# --- validation of incoming payloads -------------------------------------------------------


def as_object(payload: object, what: str = "payload") -> Json:
    if not isinstance(payload, dict):
        raise invalid_payload(f"{what} must be a JSON object")
    return payload


def opt_str(obj: Json, key: str, max_len: int = 256) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise invalid_payload(f"{key} must be a string of at most {max_len} characters")
    return value


def req_str(obj: Json, key: str, max_len: int = 256) -> str:
    value = opt_str(obj, key, max_len)
    if value is None or not value:
        raise invalid_payload(f"{key} is required")
    return value


def req_id(obj: Json, key: str) -> str:
    value = req_str(obj, key, 64)
    check_id(value, key)
    return value


def check_id(value: str, what: str) -> str:
    if not ID_PATTERN.match(value):
        raise invalid_payload(f"{what} must be 1-64 letters, digits or _.:-")
    return value


def opt_int(obj: Json, key: str, lo: int, hi: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int in Python but never a valid number on the wire.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise invalid_payload(f"{key} must be an integer from {lo} to {hi}")
    return value


def req_enum(obj: Json, key: str, enum: type[E]) -> E:
    value = obj.get(key)
    if isinstance(value, str) and value in enum._value2member_map_:
        return enum(value)
    allowed = ", ".join(m.value for m in enum)
    raise invalid_payload(f"{key} must be one of: {allowed}")


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


def error_ack(code: str, message: str) -> Json:
    return {"ok": False, "error": {"code": code, "message": message}}
