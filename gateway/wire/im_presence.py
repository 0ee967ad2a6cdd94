"""The IM presence webhook on the wire (docs/PROTOCOL.md section 4, "Presence from IM"):
what a chat integration posts to ``POST /v1/sites/{site}/presence/im``, what it gets back,
and how the request is signed.

Both ends use this module: the gateway's edge checks the signature and decodes the body
with it, and an integration (gateway/integrations/xmpp_bridge.py) signs and builds its
requests with it, so the two cannot disagree about the scheme.

Signing: ``X-Membrane-Timestamp`` is the time of sending in whole Unix seconds, and
``X-Membrane-Signature`` is ``v1=`` followed by the lowercase hex HMAC-SHA256, keyed with
the site's ``presence_webhook_secret``, of the timestamp, a ``.``, and the raw body bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Annotated, Literal

from msgspec import Meta, Struct

from gateway.core.errors import Invalid
from gateway.core.model import PresenceStatus
from gateway.wire.base import Id, decode, whole

TIMESTAMP_HEADER = "X-Membrane-Timestamp"
SIGNATURE_HEADER = "X-Membrane-Signature"
SIGNATURE_VERSION = "v1"
TOLERANCE_S = 300
"""A request whose timestamp is further than this from the gateway's clock is refused."""
MAX_UPDATES = 100
IM_DEVICE_ID = "im"
"""The one IM device an agent has: each update replaces it."""

EVENT_ID_BODY = r"[A-Za-z0-9][A-Za-z0-9_.:@/+=-]{0,127}"
_SIGNATURE = re.compile(rf"{SIGNATURE_VERSION}=([0-9a-f]{{64}})")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")

ImState = Literal["available", "away", "dnd", "offline"]
EventId = Annotated[
    str,
    Meta(
        pattern=whole(EVENT_ID_BODY),
        description="Unique per change (a UUID will do): a second request carrying an "
        "event_id seen in the last 10 minutes is a replay.",
    ),
]


# --- in ------------------------------------------------------------------------------------


class ImPresenceUpdate(Struct):
    """One agent's presence in the chat system. ``offline`` removes the agent's ``im``
    device; any other state sets it, with a lease of ``presence.im_ttl_s`` (12 h) that the
    integration renews by posting again."""

    agent_id: Id
    state: ImState
    event_id: EventId


class ImPresenceBatch(Struct):
    """Several updates in one request: all are checked before any is applied."""

    updates: Annotated[list[ImPresenceUpdate], Meta(min_length=1, max_length=MAX_UPDATES)]


# --- out -----------------------------------------------------------------------------------


class ImPresenceResult(Struct):
    agent_id: Id
    event_id: EventId
    outcome: Annotated[
        Literal["applied", "duplicate"],
        Meta(description="duplicate: this event_id was seen before; nothing changed."),
    ]
    status: Annotated[
        PresenceStatus,
        Meta(description="The agent's aggregated status after the update (every device)."),
    ]


class ImPresenceAnswer(Struct):
    results: list[ImPresenceResult]


def updates_from_wire(payload: object) -> list[ImPresenceUpdate]:
    """One update, or ``{"updates": [...]}``; the same event_id twice is refused."""
    if isinstance(payload, dict) and "updates" in payload:
        updates = decode(payload, ImPresenceBatch, "body").updates
    else:
        updates = [decode(payload, ImPresenceUpdate, "body")]
    if len({u.event_id for u in updates}) != len(updates):
        raise Invalid("updates: each event_id may appear once")
    return updates


# --- signing -------------------------------------------------------------------------------


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``X-Membrane-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def signed_headers(secret: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        "Content-Type": "application/json",
    }


def parse_timestamp(raw: str | None) -> int | None:
    """The header's seconds, or None when absent or not whole seconds."""
    if raw is None or not _TIMESTAMP.fullmatch(raw):
        return None
    return int(raw)


def signature_matches(secret: str, timestamp: str, body: bytes, given: str | None) -> bool:
    """Whether ``given`` is the signature of ``body`` at ``timestamp``, compared in constant
    time (a malformed header is simply no match)."""
    if given is None or not _SIGNATURE.fullmatch(given):
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), given)
