"""Calls on the wire: what a visitor sends to start one, the ids the call events carry,
WebRTC signals, the Call as each party sees it, and an agent's ring (docs/PROTOCOL.md
sections 3 and 6)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.core.call import Call as CoreCall
from gateway.core.call import CallChannel, CallRequest, CallState
from gateway.core.follow_up import shown_agent
from gateway.core.model import Site
from gateway.core.privacy import mask_phone
from gateway.core.promise import awaiting_choice
from gateway.wire.base import Count, Id, Json, Language, Phone, Time, iso, to_wire

# --- in ------------------------------------------------------------------------------------


class Location(Struct):
    """Where the visitor is, in degrees."""

    lat: Annotated[float, Meta(ge=-90, le=90)]
    lon: Annotated[float, Meta(ge=-180, le=180)]


Skill = Annotated[str, Meta(min_length=1, max_length=32)]


class CallStart(Struct):
    """``call:start`` on ``/visitor``: the routing hints, every one optional. null is the same
    as leaving a hint out (but not for ``skills``); an empty ``language`` or ``branch`` is
    refused, not read as absent."""

    language: Language | None = None
    branch: Id | None = None
    location: Location | None = None
    page: Annotated[str, Meta(max_length=2048, description="Kept: the first 500.")] | None = None
    skills: Annotated[list[Skill], Meta(max_length=8)] = []

    def request(self) -> CallRequest:
        location = (self.location.lat, self.location.lon) if self.location else None
        page = self.page[:500] if self.page else None
        return CallRequest(self.language, self.branch, location, page, tuple(self.skills))


class CallRef(Struct):
    """``call:accept``, ``call:decline``, ``call:hangup`` and ``call:cancel``: which call."""

    call_id: Id


class CallHold(Struct):
    """``call:hold``: put the call on hold (``on``) or take it off."""

    call_id: Id
    on: bool


class CallFollowUp(Struct, kw_only=True):
    """``call:follow_up``: the agent of a call promises to call the customer back at ``at``
    (a scheduled callback pinned to her, on the customer's same ticket)."""

    call_id: Id
    at: Annotated[str, Meta(max_length=64, extra_json_schema={"format": "date-time"})]
    note: Annotated[str, Meta(max_length=500)] = ""
    """For whoever calls (her, or a colleague if she is not free then); not the customer's."""
    phone: Phone | None = None
    """The number to call; required after a browser call (a callback's is known)."""


class Description(Struct):
    type: Literal["offer", "answer", "pranswer", "rollback"]
    sdp: Annotated[str, Meta(max_length=32_000)] = ""


class Candidate(Struct):
    candidate: Annotated[str, Meta(max_length=1024)]
    sdpMid: Annotated[str, Meta(max_length=64)] | None = None
    sdpMLineIndex: int | None = None
    usernameFragment: Annotated[
        Any, Meta(description="Relayed if a string of at most 256 characters, else dropped.")
    ] = UNSET

    def __post_init__(self) -> None:
        ufrag = self.usernameFragment
        if not (isinstance(ufrag, str) and len(ufrag) <= 256):
            self.usernameFragment = UNSET


class RtcSignal(Struct, omit_defaults=True):
    """``rtc:signal``, both ways: exactly one of ``description`` or ``candidate``. Relayed as
    normalised here (only these fields)."""

    call_id: Id
    description: Description | None = None
    candidate: Candidate | None = None

    def __post_init__(self) -> None:
        if (self.description is None) == (self.candidate is None):
            raise ValueError("send exactly one of description or candidate")


# --- out -----------------------------------------------------------------------------------


class AgentRef(Struct):
    name: str
    branch: str | None
    """The branch's display name."""


class TimelineEntry(Struct):
    at: Time
    event: str
    detail: str


class FollowUpRef(Struct):
    call_id: Id
    at: Time
    agent: AgentRef


class CallbackOffer(Struct):
    estimated_wait_s: Count


class Call(Struct):
    """A call as the visitor sees it (docs/PROTOCOL.md section 3)."""

    call_id: Id
    site: Id
    channel: CallChannel
    state: CallState
    agent: AgentRef | None
    position: Annotated[int, Meta(ge=1)] | None
    eta_s: Count | None
    scheduled_at: Time | None
    timeline: list[TimelineEntry]
    reason: str | None
    callback_offer: CallbackOffer | None
    sharing: bool
    """The customer shares a read-only link to the call's ticket."""
    promised_at: Time | None
    """Callbacks: when the customer was last told to expect the call (the time they picked,
    the estimate they were shown, or a later time they were told of first)."""
    late: bool
    """Callbacks: the customer was told the call runs late, with a new ``promised_at``, and
    has not yet chosen to keep their place (``POST /v1/calls/{id}/keep``) or move it."""
    follow_up: FollowUpRef | None
    """The callback the agent promised at the end of this call (its ticket opens with the
    same token)."""


class SharedAgent(Struct):
    first_name: str


class SharedEntry(Struct):
    at: Time
    event: str


class SharedCall(Struct):
    """A call's ticket as its read-only share link shows it: state and times, and the
    agent's first name; no number, no other names, no reasons."""

    call_id: Id
    channel: CallChannel
    state: CallState
    agent: SharedAgent | None
    eta_s: Count | None
    scheduled_at: Time | None
    promised_at: Time | None
    timeline: list[SharedEntry]
    shared: Literal[True] = True


class InternalCall(Call):
    """A call as agents and supervisors see it: the visitor's view and more."""

    visitor_id: str
    agent_id: str | None
    attempt: int
    phone: str | UnsetType | None = UNSET
    """Callbacks only: the visitor's number."""
    dials: int | UnsetType = UNSET
    """Callbacks only: dial attempts started."""


class RingVisitor(Struct):
    id: str
    language: str | None
    page: str | None
    returning: bool
    last_agent: str | UnsetType | None = UNSET
    """Browser calls only: the name of the agent who served the visitor last."""
    phone: str | UnsetType | None = UNSET
    """Callbacks only: the number that will be called."""


class CallRing(Struct):
    """``call:ring``: a call rings this agent until ``expires_at``."""

    call_id: Id
    channel: CallChannel
    visitor: RingVisitor
    expires_at: Time
    reasons: list[str]
    attempt: int
    ring_expires_at: int
    """``expires_at`` in milliseconds since the epoch."""
    your_phone: str | UnsetType | None = UNSET
    """Callbacks only: the agent's own mobile, which the visitor is put through to (null when
    she talks in the app)."""
    audio_in_app: bool | UnsetType = UNSET
    """Callbacks only: accepted in the app, she talks there (the audio bridge), not on her
    own phone."""
    follow_up: FollowUpNote | UnsetType = UNSET
    """A follow-up only: who promised it, and their note."""


class FollowUpNote(Struct):
    promised_by: str
    """The name of the agent who promised the follow-up."""
    note: str


class RingStop(Struct):
    """``call:ring_stop``: the ring ended."""

    call_id: Id
    attempt: int
    reason: str


class CallKey(Struct):
    """``call:key``: a key the customer pressed on their phone, to the agent talking to them
    in the app (shown, never stored)."""

    call_id: Id
    key: Literal["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "#", "A", "B", "C", "D"]


def call_struct(
    call: CoreCall,
    site: Site,
    internal: bool = False,
    position: int | None = None,
    eta_s: int | None = None,
    phone_masked: bool = False,
) -> Call:
    """The Call of docs/PROTOCOL.md; ``internal`` adds what agents and supervisors see.
    ``position`` (1 = next) and ``eta_s`` are computed by the caller from the live queue."""
    shown = shown_agent(call)
    agent = site.agents.get(shown) if shown else None
    branch = site.branches.get(agent.branch) if agent and agent.branch else None
    visible = (
        AgentRef(agent.name, branch.name if branch else None) if agent else None,
        position,
        eta_s,
        iso(call.scheduled_at) if call.state is CallState.SCHEDULED else None,
        [
            TimelineEntry(_time(e.at), e.event, e.detail)
            for e in call.timeline
            if internal or not e.internal
        ],
        call.reason,
        (
            CallbackOffer(call.callback_offer_wait_s)
            if call.state is CallState.FAILED and call.callback_offer_wait_s is not None
            else None
        ),
    )
    promised = iso(call.promised_at) if call.promised_at is not None else None
    late = awaiting_choice(call)
    follow_up = _follow_up_ref(call, site)
    if not internal:
        return Call(
            call.call_id,
            call.site,
            call.channel,
            call.state,
            *visible,
            sharing=call.share_hash is not None,
            promised_at=promised,
            late=late,
            follow_up=follow_up,
        )
    callback = call.channel is CallChannel.CALLBACK
    return InternalCall(
        call.call_id,
        call.site,
        call.channel,
        call.state,
        *visible,
        sharing=call.share_hash is not None,
        promised_at=promised,
        late=late,
        follow_up=follow_up,
        visitor_id=call.visitor_id,
        agent_id=call.agent_id,
        attempt=call.attempt,
        phone=(mask_phone(call.phone) if phone_masked and call.phone else call.phone)
        if callback
        else UNSET,
        dials=call.dials if callback else UNSET,
    )


def _follow_up_ref(call: CoreCall, site: Site) -> FollowUpRef | None:
    agent = site.agents.get(call.agent_id or "")
    if call.follow_up is None or call.follow_up_at is None or agent is None:
        return None
    branch = site.branches.get(agent.branch or "")
    return FollowUpRef(
        call.follow_up,
        _time(call.follow_up_at),
        AgentRef(agent.name, branch.name if branch else None),
    )


def call_to_wire(
    call: CoreCall,
    site: Site,
    internal: bool = False,
    position: int | None = None,
    eta_s: int | None = None,
    phone_masked: bool = False,
) -> Json:
    """``phone_masked``: the internal view for someone other than the call's agent (the
    board, an agent the call has left), whom the customer's number is shown masked."""
    return to_wire(call_struct(call, site, internal, position, eta_s, phone_masked))


def ring_to_wire(
    ringing: CoreCall,
    reasons: tuple[str, ...],
    *,
    returning: bool,
    last_agent: str | UnsetType | None = UNSET,
    phone: str | UnsetType | None = UNSET,
    your_phone: str | UnsetType | None = UNSET,
    audio_in_app: bool | UnsetType = UNSET,
    follow_up: Json | UnsetType = UNSET,
) -> Json:
    """``call:ring`` for a call ringing its agent. What each channel adds (who served the
    visitor last, the number to call, the agent's own phone) its flow passes in."""
    assert ringing.ring_expires_at is not None and ringing.agent_id is not None
    r = ringing.request
    visitor = RingVisitor(ringing.visitor_id, r.language, r.page, returning, last_agent, phone)
    return to_wire(
        CallRing(
            call_id=ringing.call_id,
            channel=ringing.channel,
            visitor=visitor,
            expires_at=_time(ringing.ring_expires_at),
            reasons=list(reasons),
            attempt=ringing.attempt,
            ring_expires_at=round(ringing.ring_expires_at * 1000),
            your_phone=your_phone,
            audio_in_app=audio_in_app,
            follow_up=FollowUpNote(**follow_up) if isinstance(follow_up, dict) else UNSET,
        )
    )


def ring_stop_to_wire(call: CoreCall, reason: str) -> Json:
    return to_wire(RingStop(call.call_id, call.attempt, reason))


def key_to_wire(call_id: str, key: str) -> Json:
    return to_wire(CallKey(call_id, key))  # type: ignore[arg-type]  # a key the worker checked


def _time(ts: float) -> str:
    text = iso(ts)
    assert text is not None
    return text


def shared_call_to_wire(view: Json) -> Json:
    """The read-only share link's view, cut down from the visitor's (``call_to_wire``, with
    the live ETA): the agent's first name only."""
    agent = view.get("agent")
    name = agent.get("name") if isinstance(agent, dict) else None
    return to_wire(
        SharedCall(
            call_id=view["call_id"],
            channel=view["channel"],
            state=view["state"],
            agent=SharedAgent(name.split()[0]) if isinstance(name, str) and name.split() else None,
            eta_s=view.get("eta_s"),
            scheduled_at=view.get("scheduled_at"),
            promised_at=view.get("promised_at"),
            timeline=[SharedEntry(e["at"], e["event"]) for e in view.get("timeline", ())],
        )
    )
