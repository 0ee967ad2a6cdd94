"""The call: the customer's live ticket, and the state machine every node applies to it.

Pure: each transition takes a ``Call`` and returns the next one (with a timeline entry), or
raises ``CallError`` with a stable code. Nodes apply transitions with compare-and-set on the
stored version, so any node may move any call and a race has exactly one winner.

States (docs/ARCHITECTURE.md, "Calls")::

    queued --ring--> ringing --accept--> connected --hangup--> completed
       ^               | decline / ring timeout (back to queued, agent excluded)
       +---------------+
    queued --no agent--> failed (with a callback offer)
    any open state --cancel--> canceled (or completed, once connected)

PSTN callbacks (gateway.core.callback) add ``scheduled`` (waiting for their time or a retry) and
``dialing`` (the agent accepted; the visitor's phone is being called)::

    scheduled --due--> queued --ring--> ringing --accept--> dialing --answer--> connected
    dialing / connected --busy, no answer, voicemail--> scheduled (retry) or failed
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final, Literal

from gateway.core.errors import Conflict
from gateway.core.model import Channel
from gateway.core.routing import RouteRequest, RoutingPolicy


class CallState(StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RINGING = "ringing"
    DIALING = "dialing"
    CONNECTED = "connected"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


class CallChannel(StrEnum):
    WEBRTC = "webrtc"
    CALLBACK = "callback"


FINAL_STATES = frozenset({CallState.COMPLETED, CallState.FAILED, CallState.CANCELED})


class CallError(Conflict):
    """A transition that is not allowed now; ``code`` is the client-facing error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    at: float
    event: str
    detail: str
    internal: bool = False
    """Shown to agents and supervisors (routing reasons), never to the visitor."""


@dataclass(frozen=True, slots=True)
class CallRequest:
    """What the visitor asked for: the routing hints of ``call:start``."""

    language: str | None = None
    branch: str | None = None
    location: tuple[float, float] | None = None
    page: str | None = None
    skills: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Call:
    call_id: str
    site: str
    visitor_id: str
    channel: CallChannel
    state: CallState
    created_at: float
    request: CallRequest = field(default_factory=CallRequest)
    version: int = 0
    agent_id: str | None = None
    """The agent ringing (state ringing) or talking (connected) or who talked (ended)."""
    agent_sid: str | None = None
    """The socket of the agent's device that accepted: the only one signals go to."""
    visitor_sid: str | None = None
    attempt: int = 0
    ring_expires_at: float | None = None
    tried: tuple[str, ...] = ()
    reason: str | None = None
    callback_offer_wait_s: int | None = None
    connected_at: float | None = None
    ended_at: float | None = None
    timeline: tuple[TimelineEntry, ...] = ()
    token_hash: str | None = None
    """SHA-256 of the visitor's status token, which reads the call's ticket: the token
    itself is never stored."""
    share_hash: str | None = None
    """SHA-256 of the ticket's read-only share token, while the customer shares it."""
    # --- PSTN callbacks only (gateway.core.callback) ---
    phone: str | None = None
    """The visitor's number, E.164."""
    scheduled_at: float | None = None
    """When the next attempt is due (state scheduled)."""
    place_at: float | None = None
    """The visitor's place in the queue: when they first asked (kept across retries and
    from a browser call that nobody could answer)."""
    dials: int = 0
    """Dial attempts started; the current one is ``dials``."""
    dial_started_at: float | None = None
    provider_id: str | None = None
    """The telephony provider's id of the current attempt's leg."""
    answered_by: str | None = None
    """Who answered the current attempt's leg: human, machine or unknown."""
    media: str | None = None
    """A browser call bridged to the agent's phone: its session on the audio bridge
    (``MediaSession.ref``), set as the agent takes the call."""
    media_stream: str | None = None
    """Where the phone leg's Media Stream reaches that session (``MediaSession.stream_url``):
    any node can point the leg at it again."""
    media_moves: int = 0
    """How many times the call's audio moved to a new session, its media worker having died
    (``with_moved_media``)."""
    legs_heard: tuple[tuple[str, int], ...] = ()
    """How far each phone leg of every attempt has been reported to get, by provider id
    (``gateway.core.callback.LEG_PROGRESS``): a status no further than that is old news."""
    legs: tuple[tuple[int, str], ...] = ()
    """The provider id of each dial attempt's leg, by attempt, once known: what a webhook
    about an attempt must name (``gateway.core.callback.check_leg``)."""
    agent_legs: tuple[tuple[int, str], ...] = ()
    """Each call to the agent's own phone: the ring (``attempt``) it was for and the
    provider's id of the leg (gateway.core.agent_ring)."""
    promised_at: float | None = None
    """When the customer was last told to expect the call (gateway.core.promise)."""
    told_at: float | None = None
    """When the customer was last told anything unasked (a text, a notice on the ticket):
    the start of their silence."""
    texts: int = 0
    """Texts sent to the customer about this callback."""
    # --- follow-ups (gateway.core.follow_up) ---
    follow_up: str | None = None
    """The callback its agent promised at the end of this call."""
    follow_up_at: float | None = None
    """When that callback was promised for."""
    follow_up_of: str | None = None
    """A follow-up: the first call of the customer's ticket (whose token opens this one)."""
    pinned_agent: str | None = None
    """A follow-up: the agent who promised it."""
    pinned_until: float | None = None
    """A follow-up: until when only ``pinned_agent`` may take it."""
    note: str | None = None
    """A follow-up: the promising agent's note, for whoever calls (never the customer's)."""
    # --- the question after the call (gateway.core.survey) ---
    survey_score: int | None = None
    survey_comment: str | None = None
    # --- routing experiments (gateway.core.experiment) ---
    experiment: str | None = None
    """The experiment running when the call was made, if any."""
    arm: str | None = None
    """Its arm in that experiment: control or variant."""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def media_channel(self) -> Channel:
        return Channel.WEBRTC if self.channel is CallChannel.WEBRTC else Channel.PSTN


def _log(
    call: Call, now: float, event: str, detail: str, internal: bool = False
) -> tuple[TimelineEntry, ...]:
    return (*call.timeline, TimelineEntry(now, event, detail, internal))


def new_call(
    call_id: str,
    site: str,
    visitor_id: str,
    channel: CallChannel,
    request: CallRequest,
    now: float,
    visitor_sid: str | None = None,
    token_hash: str | None = None,
) -> Call:
    """``token_hash``: of the status token that reads the call's ticket."""
    call = Call(
        call_id,
        site,
        visitor_id,
        channel,
        CallState.QUEUED,
        now,
        request,
        visitor_sid=visitor_sid,
        token_hash=token_hash,
    )
    return replace(call, timeline=_log(call, now, "requested", "Looking for someone to talk to"))


def shared(call: Call, share_hash: str | None) -> Call:
    """The customer turned their ticket's read-only link on (a new one: any earlier link no
    longer works) or, with None, off."""
    return replace(call, share_hash=share_hash)


ERASED_VISITOR = "v_erased"
"""The visitor id of a call whose customer erased their personal data."""


def erase(call: Call, now: float) -> Call:
    """The customer erased their personal data from the ended call: their number, the page
    they called from, where they were, their visitor id and any share link go; what happened
    (the states, times and agent) stays, as the company's record of the call."""
    if not call.final:
        raise CallError("invalid_state", "end the call before erasing it")
    if call.visitor_id == ERASED_VISITOR:
        return call
    return replace(
        call,
        visitor_id=ERASED_VISITOR,
        visitor_sid=None,
        phone=None,
        share_hash=None,
        request=CallRequest(language=call.request.language),
        timeline=_log(call, now, "erased", "You erased your personal data"),
    )


def ring(
    call: Call,
    agent_id: str,
    who: str,
    reasons: tuple[str, ...],
    now: float,
    ring_timeout_s: float,
) -> Call:
    """Ring an agent, reserved beforehand; ``who`` is shown to the visitor ("Anna in Dublin")."""
    if call.state is not CallState.QUEUED:
        raise CallError("invalid_state", f"cannot ring a {call.state} call")
    timeline = _log(call, now, "routed", f"{agent_id}: " + "; ".join(reasons), internal=True)
    call = replace(call, timeline=timeline)
    return replace(
        call,
        state=CallState.RINGING,
        agent_id=agent_id,
        attempt=call.attempt + 1,
        ring_expires_at=now + ring_timeout_s,
        timeline=_log(call, now, "ringing", f"Ringing {who}"),
    )


def ring_over(call: Call, agent_id: str, now: float) -> bool:
    """The call rang ``agent_id`` and that ring has run out, though its timer may not have
    fired yet: too late to answer."""
    return (
        call.state is CallState.RINGING
        and call.agent_id == agent_id
        and call.ring_expires_at is not None
        and now >= call.ring_expires_at
    )


def accept(call: Call, agent_id: str, agent_sid: str, now: float) -> Call:
    if call.state is not CallState.RINGING or call.agent_id != agent_id:
        raise CallError("not_ringing", "this call is not ringing for you")
    if ring_over(call, agent_id, now):
        raise CallError("ring_expired", "this ring has ended")
    if call.channel is CallChannel.CALLBACK:
        # Agent first: only now that someone is ready is the visitor's phone called.
        return start_dial(replace(call, agent_sid=agent_sid), now)
    return replace(
        call,
        state=CallState.CONNECTED,
        agent_sid=agent_sid,
        ring_expires_at=None,
        connected_at=now,
        timeline=_log(call, now, "connected", "Connected"),
    )


def with_media(call: Call, ref: str, stream: str, attempt: int) -> Call:
    """The audio bridge's session for the agent taking ring ``attempt`` on their phone."""
    if call.state is not CallState.RINGING or call.attempt != attempt:
        raise CallError("stale", "that ring is over")
    return replace(call, media=ref, media_stream=stream)


def hold(call: Call, on: bool, now: float) -> Call:
    """The agent puts the connected call on hold, or takes it off (a repeat is a no-op)."""
    if call.state is not CallState.CONNECTED:
        raise CallError("not_connected", "only a connected call can be held")
    held = on_hold(call)
    if held == on:
        return call
    event, detail = ("on_hold", "On hold") if on else ("off_hold", "Back from hold")
    return replace(call, timeline=_log(call, now, event, detail))


def on_hold(call: Call) -> bool:
    """Whether the call is on hold now (its last hold event says so)."""
    last = next((e.event for e in reversed(call.timeline) if e.event in HOLD_EVENTS), None)
    return last == "on_hold"


HOLD_EVENTS = frozenset({"on_hold", "off_hold"})


def with_answered_media(call: Call, ref: str, stream: str) -> Call:
    """The audio bridge's session for a callback whose customer just answered (connected,
    no session yet), the agent talking in the app."""
    if call.state is not CallState.CONNECTED or call.media is not None:
        raise CallError("stale", "the call moved on")
    return replace(call, media=ref, media_stream=stream)


MAX_MEDIA_MOVES: Final = 3
"""A call whose audio was lost this often ends (``media_lost``): something is wrong beyond one
worker's death, and moving again would only keep both people waiting."""


def with_moved_media(call: Call, lost: str, ref: str, stream: str, now: float) -> Call:
    """The call's audio moves to the new session ``ref`` (on another media worker, or on
    the one started in place of the dead one), its session ``lost`` having been lost."""
    if call.state is not CallState.CONNECTED or call.media != lost:
        raise CallError("stale", "the call's audio moved already, or the call is over")
    if call.media_moves >= MAX_MEDIA_MOVES:
        raise CallError("invalid_state", "the call's audio was lost too often to move again")
    return replace(
        call,
        media=ref,
        media_stream=stream,
        media_moves=call.media_moves + 1,
        # For agents and supervisors: the customer only heard a moment's silence.
        timeline=_log(
            call, now, "media_moved", "The audio moved to another media worker", internal=True
        ),
    )


StreamStep = Literal["reconnect", "move", "end"]


def after_stream(call: Call, moves: int) -> StreamStep:
    """What the phone leg of a bridged call does once its Media Stream ``moves`` (the number
    of moves when the stream began) ended: ``reconnect`` to the session the call has moved
    to meanwhile, ``move`` to a new one (the session died with its worker), or ``end``
    (the call is over, or its audio was lost too often)."""
    if call.state is not CallState.CONNECTED or call.media is None:
        return "end"
    if call.media_moves > moves:
        return "reconnect"
    return "move" if call.media_moves < MAX_MEDIA_MOVES else "end"


def agent_in_app(call: Call) -> bool:
    """Whether the call's agent talks in the agent app, not on her phone: a browser call
    unless it is bridged to her phone, a callback only when it is bridged to the app."""
    bridged = call.media is not None
    return bridged if call.channel is CallChannel.CALLBACK else not bridged


HOLD_KEY = "*"
"""The key an agent on her phone presses to hold a browser visitor, and again to return."""


def phone_key_meaning(call: Call, key: str) -> Literal["show", "toggle_hold"] | None:
    """What a key pressed on a bridged call's phone means: from a customer talking to an
    agent in the app, a digit to show her; ``HOLD_KEY`` from an agent on her phone, hold or
    back; anything else (or a call no longer talking over the bridge), nothing."""
    if call.state is not CallState.CONNECTED or call.media is None:
        return None
    if agent_in_app(call):
        return "show"
    return "toggle_hold" if key == HOLD_KEY else None


def accepted_on(call: Call, attempt: int) -> bool:
    """Whether ring ``attempt`` of ``call`` was accepted, and the call is still live on it
    (talking, or a callback dialing its visitor)."""
    return (
        call.attempt == attempt
        and call.agent_sid is not None
        and call.state in (CallState.CONNECTED, CallState.DIALING)
    )


def reattach(call: Call, site: str, visitor_id: str, visitor_sid: str) -> Call:
    """The visitor's socket came back (a network blip): signals go to the new one. Only the
    call's own visitor may: a new socket takes the call over on nothing but its token."""
    if call.site != site or call.visitor_id != visitor_id:
        raise CallError("not_found", "this call is not yours")
    if call.final:
        raise CallError("call_ended", "the call has already ended")
    return replace(call, visitor_sid=visitor_sid)


def reattach_agent(call: Call, agent_id: str, agent_sid: str) -> Call:
    """The agent's accepting socket came back (a network blip, or its node drained): signals
    go to the new one. Only for the agent talking in the app: a connected browser call, or a
    callback bridged to the app."""
    if call.final:
        raise CallError("call_ended", "the call has already ended")
    if call.state is not CallState.CONNECTED or not agent_in_app(call) or call.agent_id != agent_id:
        raise CallError("invalid_state", "not your connected browser call")
    return replace(call, agent_sid=agent_sid)


def _back_to_queue(call: Call, now: float, event: str, detail: str) -> Call:
    assert call.agent_id is not None
    return replace(
        call,
        state=CallState.QUEUED,
        agent_id=None,
        ring_expires_at=None,
        tried=(*call.tried, call.agent_id),
        timeline=_log(call, now, event, detail),
    )


def decline(call: Call, agent_id: str, now: float) -> Call:
    if call.state is not CallState.RINGING or call.agent_id != agent_id:
        raise CallError("not_ringing", "this call is not ringing for you")
    return _back_to_queue(call, now, "declined", "They could not take it; trying someone else")


def ring_timeout(call: Call, attempt: int, now: float) -> Call:
    """The ring of ``attempt`` ran out; a stale timer (the call moved on) is a CallError."""
    if call.state is not CallState.RINGING or call.attempt != attempt:
        raise CallError("stale", "the ring already ended")
    return _back_to_queue(call, now, "no_answer", "No answer; trying someone else")


def no_agent(call: Call, reason: str, detail: str, wait_s: int | None, now: float) -> Call:
    """Nobody left to ring: end the browser call, offering a callback instead of a dead end."""
    if call.state is not CallState.QUEUED:
        raise CallError("invalid_state", f"cannot fail a {call.state} call")
    return replace(
        call,
        state=CallState.FAILED,
        reason=reason,
        callback_offer_wait_s=wait_s,
        ended_at=now,
        timeline=_log(call, now, "no_agent", detail),
    )


def start_dial(call: Call, now: float) -> Call:
    """Attempt ``dials + 1`` of a callback: the visitor's phone is about to be called."""
    if call.channel is not CallChannel.CALLBACK or call.final:
        raise CallError("invalid_state", f"cannot dial a {call.state} {call.channel} call")
    return replace(
        call,
        state=CallState.DIALING,
        ring_expires_at=None,
        dials=call.dials + 1,
        dial_started_at=now,
        provider_id=None,
        answered_by=None,
        scheduled_at=None,
        timeline=_log(call, now, "dialing", "We're calling you now"),
    )


def end(call: Call, reason: str, detail: str, now: float) -> Call:
    """Hang-up, cancel or a party leaving: completed once connected, canceled before."""
    if call.final:
        raise CallError("call_ended", "the call has already ended")
    state = CallState.COMPLETED if call.state is CallState.CONNECTED else CallState.CANCELED
    return replace(
        call,
        state=state,
        reason=reason,
        ring_expires_at=None,
        ended_at=now,
        timeline=_log(call, now, state.value, detail),
    )


# --- reading a call back ---------------------------------------------------------------------


def last_changed(call: Call) -> float:
    """When the call last changed in a way its parties were told (its latest timeline entry)."""
    return call.timeline[-1].at if call.timeline else call.created_at


def ring_reasons(call: Call) -> tuple[str, ...]:
    """The routing reasons of the current ring (``call:ring``'s ``reasons``), from its log."""
    prefix = f"{call.agent_id}: "
    for entry in reversed(call.timeline):
        if entry.event == "routed":
            if entry.detail.startswith(prefix):
                return tuple(r for r in entry.detail[len(prefix) :].split("; ") if r)
            return ()
    return ()


def rings_over(call: Call) -> dict[str, str]:
    """Each agent whose ring for this browser call is over, with the ``call:ring_stop``
    reason they were sent: the agents tried (declined or no answer, in the order of the
    timeline), then the last agent once the call stopped ringing for them."""
    ends = [e.event for e in call.timeline if e.event in ("declined", "no_answer")]
    over = dict(zip(call.tried, ends, strict=False))
    agent = call.agent_id
    if agent is not None and call.state is not CallState.RINGING and agent not in over:
        answered = call.connected_at is not None or call.state is CallState.CONNECTED
        over[agent] = "answered" if answered else (call.reason or "no_answer")
    return over


def route_request(
    call: Call,
    channel: Channel,
    exclude: frozenset[str] = frozenset(),
    agent_channels: tuple[Channel, ...] = (),
    policy: RoutingPolicy = RoutingPolicy.DEFAULT,
) -> RouteRequest:
    """What routing needs of ``call``: its visitor's request, on ``channel``, never ringing
    the agents it tried already nor those in ``exclude``."""
    r = call.request
    return RouteRequest(
        site_id=call.site,
        visitor_id=call.visitor_id,
        channel=channel,
        language=r.language,
        branch=r.branch,
        location=r.location,
        skills=r.skills,
        exclude=frozenset(call.tried) | exclude,
        agent_channels=agent_channels,
        policy=policy,
    )
