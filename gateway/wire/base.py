"""What every wire struct shares: the constrained field types (ids, language tags, times,
priorities), the one way a payload is decoded into a struct, and the one way a struct goes
out as plain JSON values.

A struct is the single statement of a message's shape: msgspec validates incoming payloads
against it (``decode``), outgoing ones are built from it (``to_wire``), and the OpenAPI
document is generated from it (gateway/wire/openapi.py).
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta

from gateway.core.errors import Invalid

Json = dict[str, Any]
T = TypeVar("T")


def whole(body: str) -> str:
    """A pattern matching a whole string. ``\\Z``, not ``$``: ``$`` also matches before a
    trailing newline, so "abc\\n" would pass. (The OpenAPI document writes ``^...$``, which
    means the same in JSON Schema's regex dialect.)"""
    return rf"\A{body}\Z"


ID_BODY = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
LANGUAGE_BODY = r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?"
# What the gateway issues as visitor ids (POST .../sessions reuses only these).
VISITOR_ID_BODY = r"v_[A-Za-z0-9_-]{16,48}"
# What the gateway issues as visitor secrets (gateway.edge.visitor_identity): 32 bytes, base64url.
VISITOR_SECRET_BODY = r"[A-Za-z0-9_-]{43}"

# A device id, or empty for "this socket's own device" (``presence:set``).
OWN_OR_ID_BODY = rf"(?:{ID_BODY})?"

ID_PATTERN = re.compile(whole(ID_BODY))
LANGUAGE_PATTERN = re.compile(whole(LANGUAGE_BODY))
VISITOR_ID_PATTERN = re.compile(whole(VISITOR_ID_BODY))
VISITOR_SECRET_PATTERN = re.compile(whole(VISITOR_SECRET_BODY))
MAX_PRIORITY = 127

# How a refusal names what a pattern wants, instead of quoting the regex.
PATTERN_NAMES = {
    whole(ID_BODY): "1-64 letters, digits or _.:-",
    whole(OWN_OR_ID_BODY): "1-64 letters, digits or _.:-, or empty",
    whole(LANGUAGE_BODY): "a language tag like en or de-AT",
    whole(VISITOR_ID_BODY): "a visitor id the gateway issued",
    whole(VISITOR_SECRET_BODY): "a visitor secret the gateway issued",
}

Id = Annotated[str, Meta(pattern=whole(ID_BODY))]
Language = Annotated[str, Meta(pattern=whole(LANGUAGE_BODY))]
VisitorId = Annotated[str, Meta(pattern=whole(VISITOR_ID_BODY))]
VisitorSecret = Annotated[str, Meta(pattern=whole(VISITOR_SECRET_BODY))]
Time = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
"""ISO 8601 in UTC with milliseconds and an offset (``iso``)."""
Priority = Annotated[int, Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY)]
PriorityIn = Annotated[
    float,
    Meta(
        ge=-MAX_PRIORITY,
        le=MAX_PRIORITY,
        # JSON has one kind of number: 1.0 is the integer 1, as JSON Schema counts it; 0.5
        # is refused. (bool is never a number to msgspec.)
        multiple_of=1,
        description="An integer (1.0 is the integer 1, as in JSON); absent or null: 0.",
    ),
]
Count = Annotated[int, Meta(ge=0)]


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


# --- in ------------------------------------------------------------------------------------


def decode(payload: object, into: type[T], what: str = "payload") -> T:
    """``payload`` (parsed JSON) as ``into``, or ``invalid_payload`` naming the field that is
    wrong and why. Fields a struct does not know are ignored: clients may send more."""
    try:
        return msgspec.convert(payload, into)
    except msgspec.ValidationError as e:
        raise Invalid(explain(e, what)) from None


_WHERE = re.compile(r"(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.S)
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_REGEX = re.compile(r"Expected `str` matching regex (?P<regex>.+)")
_FRACTION = re.compile(r"Expected `float` that's a multiple of 1\.0")
# Objects a client sends beside the payload, whose fields are named with the object's name.
_NAMED = frozenset({"auth"})


def explain(error: msgspec.ValidationError, what: str = "payload") -> str:
    """msgspec's message, said from the client's side: ``kind: invalid enum value 'fax'``,
    ``call_id is required``, ``payload must be a JSON object``."""
    match = _WHERE.fullmatch(str(error))
    assert match is not None  # the pattern matches any text
    message, path = match["message"], (match["path"] or "").removeprefix(".")
    if what in _NAMED:
        path = f"{what}.{path}" if path else what
    missing = _MISSING.fullmatch(message)
    if missing:
        return f"{_join(path, missing['field'])} is required"
    if not path or path == what:
        if message.startswith("Expected `object`"):
            return f"{what} must be a JSON object"
        return message  # a struct's own check (``__post_init__``): already the client's words
    if _FRACTION.fullmatch(message):
        return f"{path} must be an integer"
    regex = _REGEX.fullmatch(message)
    if regex:
        wanted = {repr(p): name for p, name in PATTERN_NAMES.items()}.get(regex["regex"])
        if wanted is not None:
            return f"{path} must be {wanted}"
    return f"{path}: {message[:1].lower()}{message[1:]}"


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


# --- out -----------------------------------------------------------------------------------


def to_wire(struct: msgspec.Struct) -> Json:
    """A struct as the plain JSON values socket.io and aiohttp encode (enums as their values,
    unset fields left out), keys in the struct's field order."""
    wire: Json = msgspec.to_builtins(struct)
    return wire


# phone_policy.RAW_SHAPE once surrounding white space is stripped: a blank or empty phone is
# refused (invalid_phone), as is a bare "+". The codec checks only the length and that it is
# not blank; the number rules (gateway.core.phone_policy) check the rest, after whether the
# node can place callbacks at all (docs/PROTOCOL.md section 2 gives the order).
PHONE_SHAPE = r"^\s*\+[0-9 ().-]*[0-9().-]\s*$"
MAX_PHONE = 32

Phone = Annotated[
    str,
    Meta(
        max_length=MAX_PHONE,
        # Only stated here: the codec refuses a blank phone, the number rules the rest.
        extra_json_schema={"pattern": PHONE_SHAPE},
        description="International form: + then digits; spaces and ().- are allowed and "
        "dropped. It must also be a valid number (not expressible here): else 400 "
        "invalid_phone.",
    ),
]
