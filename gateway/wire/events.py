"""socket.io on the wire: each namespace's connect ``auth``, its events in and out with their
payload structs, and the acks (docs/PROTOCOL.md section 6).

``NAMESPACES`` is the one list of events: the socket.io edge registers a handler for each
event in (tests/test_protocol_doc.py holds the two equal, and both to docs/PROTOCOL.md's
tables), and the OpenAPI document carries every struct here among its components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from msgspec import Meta, Struct

from gateway.core import model
from gateway.core.call import Call as CoreCall
from gateway.core.model import DeviceState, Site
from gateway.wire.base import Id, Json, to_wire
from gateway.wire.calls import (
    Call,
    CallFollowUp,
    CallHold,
    CallKey,
    CallRef,
    CallRing,
    CallStart,
    InternalCall,
    RingStop,
    RtcSignal,
    call_struct,
)
from gateway.wire.presence import Presence, PresenceSet, presence_struct
from gateway.wire.rest import ErrorDetail, IceServer, ticket_url

# --- connect -------------------------------------------------------------------------------


class ConnectAuth(Struct):
    """``auth`` of a namespace connect."""

    token: str


class VisitorAuth(ConnectAuth):
    """``auth`` of a ``/visitor`` connect: the call a reconnecting widget was in, so that it
    hears how that call stands even if it ended while the widget was away."""

    call_id: Id | None = None


class AgentAuth(ConnectAuth):
    """``auth`` of an ``/agent`` connect: the state of the socket's own desktop device, and
    the connected call a reconnecting agent app takes over."""

    state: DeviceState = DeviceState.AVAILABLE
    call_id: Id | None = None


# --- acks ----------------------------------------------------------------------------------


class Ok(Struct):
    ok: Literal[True] = True


class PresenceAck(Struct, kw_only=True):
    ok: Literal[True] = True
    presence: Presence


class CallAck(Struct, kw_only=True):
    ok: Literal[True] = True
    call: Call


class StartAck(CallAck, kw_only=True):
    """``call:start``'s answer: the call, and its ticket (shown only here)."""

    status_token: Annotated[str, Meta(description="Reads the call's ticket (GET /v1/calls/...).")]
    ticket_url: Annotated[
        str, Meta(description="The ticket page, status token included (in the fragment).")
    ]


class AgentCallAck(Struct, kw_only=True):
    ok: Literal[True] = True
    call: InternalCall


class FollowUpAck(AgentCallAck, kw_only=True):
    """``call:follow_up``'s answer: the call, naming its follow-up, and the follow-up."""

    follow_up: InternalCall


class AcceptAck(Struct, kw_only=True):
    ok: Literal[True] = True
    call: InternalCall
    ice_servers: list[IceServer]


class SnapshotAck(Struct, kw_only=True):
    ok: Literal[True] = True
    agents: list[Presence]


class ErrorAck(Struct, kw_only=True):
    ok: Literal[False] = False
    error: ErrorDetail


class Draining(Struct):
    """``server:draining``: this node closes the connection next; reconnect."""

    retry_after_s: int


def ok_ack() -> Json:
    return to_wire(Ok())


def presence_ack(presence: model.Presence) -> Json:
    return to_wire(PresenceAck(presence=presence_struct(presence)))


def call_ack(call: CoreCall, site: Site, internal: bool = False) -> Json:
    return to_wire(CallAck(call=call_struct(call, site, internal)))


def agent_call_ack(call: CoreCall, site: Site, agent_id: str) -> Json:
    """An agent's answer about a call: the customer's number in full only if it is hers."""
    mine = call.agent_id == agent_id
    return to_wire(CallAck(call=call_struct(call, site, True, phone_masked=not mine)))


def follow_up_ack(call: CoreCall, follow_up: CoreCall, site: Site) -> Json:
    internal, promised = call_struct(call, site, True), call_struct(follow_up, site, True)
    assert isinstance(internal, InternalCall) and isinstance(promised, InternalCall)
    return to_wire(FollowUpAck(call=internal, follow_up=promised))


def start_ack(call: CoreCall, site: Site, status_token: str, public_url: str) -> Json:
    return to_wire(
        StartAck(
            call=call_struct(call, site),
            status_token=status_token,
            ticket_url=ticket_url(public_url, call.call_id, status_token),
        )
    )


def accept_ack(call: CoreCall, site: Site, ice_servers: list[Json]) -> Json:
    servers = [IceServer(**server) for server in ice_servers]
    internal = call_struct(call, site, internal=True)
    assert isinstance(internal, InternalCall)
    return to_wire(AcceptAck(call=internal, ice_servers=servers))


def snapshot_ack(presences: list[model.Presence]) -> Json:
    return to_wire(SnapshotAck(agents=[presence_struct(p) for p in presences]))


class BoardSnapshotAck(Struct, kw_only=True):
    ok: Literal[True] = True
    agents: list[Presence]
    calls: list[InternalCall]
    """The site's calls not ended: ringing, talking, and the callback queue (numbers
    masked)."""


def board_snapshot_ack(presences: list[model.Presence], calls: list[CoreCall], site: Site) -> Json:
    return to_wire(
        BoardSnapshotAck(
            agents=[presence_struct(p) for p in presences],
            calls=[
                cast(InternalCall, call_struct(c, site, internal=True, phone_masked=True))
                for c in calls
            ],
        )
    )


def error_ack(code: str, message: str, **extra: Any) -> Json:
    return to_wire(ErrorAck(error=ErrorDetail(code, message, **extra)))


def draining_to_wire(retry_after_s: int) -> Json:
    return to_wire(Draining(retry_after_s))


# --- the events of each namespace ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    payload: type[Struct] | None
    """The payload's struct; None: whatever it is, it is ignored."""
    ack: type[Struct] | None = None
    """In: the successful ack's struct (a refusal is ``ErrorAck``)."""


@dataclass(frozen=True, slots=True)
class Namespace:
    path: str
    auth: type[ConnectAuth]
    incoming: tuple[Event, ...]
    outgoing: tuple[Event, ...]


ERROR = Event("error", ErrorDetail)
DRAINING = Event("server:draining", Draining)

NAMESPACES = (
    Namespace(
        "/agent",
        AgentAuth,
        incoming=(
            Event("presence:set", PresenceSet, PresenceAck),
            Event("call:accept", CallRef, AcceptAck),
            Event("call:decline", CallRef, AgentCallAck),
            Event("call:hangup", CallRef, AgentCallAck),
            Event("call:hold", CallHold, AgentCallAck),
            Event("call:follow_up", CallFollowUp, FollowUpAck),
            Event("rtc:signal", RtcSignal, Ok),
        ),
        outgoing=(
            Event("presence:update", Presence),
            Event("call:ring", CallRing),
            Event("call:ring_stop", RingStop),
            Event("call:update", InternalCall),
            Event("call:key", CallKey),
            Event("rtc:signal", RtcSignal),
            Event("rtc:restart", CallRef),
            DRAINING,
            ERROR,
        ),
    ),
    Namespace(
        "/visitor",
        VisitorAuth,
        incoming=(
            Event("call:start", CallStart, StartAck),
            Event("call:cancel", CallRef, CallAck),
            Event("rtc:signal", RtcSignal, Ok),
        ),
        outgoing=(
            Event("call:update", Call),
            Event("rtc:signal", RtcSignal),
            Event("rtc:restart", CallRef),
            DRAINING,
            ERROR,
        ),
    ),
    Namespace(
        "/board",
        ConnectAuth,
        incoming=(Event("board:snapshot", None, BoardSnapshotAck),),
        outgoing=(
            Event("presence:update", Presence),
            Event("call:update", InternalCall),
            DRAINING,
            ERROR,
        ),
    ),
)


def structs() -> list[type[Struct]]:
    """Every struct of the socket.io protocol, for the OpenAPI document's components."""
    found: list[type[Struct]] = [ErrorAck]
    for namespace in NAMESPACES:
        found.append(namespace.auth)
        for event in (*namespace.incoming, *namespace.outgoing):
            found += [t for t in (event.payload, event.ack) if t is not None]
    return list(dict.fromkeys(found))
