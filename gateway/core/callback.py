"""PSTN callbacks: the transitions of a callback's life, pure like gateway.core.call.

A callback is a ``Call`` with channel ``callback``. It waits ``scheduled`` until its time,
``queued`` (in the site's queue, keeping its place) until an agent is free, ``ringing`` while
that agent is asked in the agent app (agent first), ``dialing`` while the visitor's phone is
called, ``connected`` once a human answered, and ends ``completed``, ``failed`` (retries used
up, or a number that cannot be called) or ``canceled``. A busy line, no answer or an
answering machine ends the *attempt*; the service decides when the next one is due.
"""

from __future__ import annotations

from dataclasses import replace

from gateway.core.call import (
    Call,
    CallChannel,
    CallError,
    CallRequest,
    CallState,
    TimelineEntry,
)

# Why an attempt ended without a conversation, as told to the visitor.
ATTEMPT_DETAIL = {
    "busy": "Your line was busy",
    "no_answer": "You did not answer",
    "voicemail": "Your voicemail answered, so we hung up",
    "failed": "We could not get through to your number",
    "dial_error": "Our phone line had a problem",
    "agent_unreachable": "We could not connect you to our agent",
    "no_status": "We lost track of the call",
    "number_rate_limited": "We have called your number too often today",
    "spend_cap_reached": "We cannot make more calls today",
}
# Outcomes that no retry can fix.
FINAL_OUTCOMES = frozenset({"number_refused", "spend_cap_reached", "number_rate_limited"})


# How far a phone leg has got, by its status; every other status (completed, busy, no
# answer, failed, canceled) ends the leg: LEG_ENDED.
LEG_PROGRESS = {"initiated": 0, "ringing": 1, "answered": 2}
LEG_ENDED = 3
# A webhook about a leg that is not the one of the attempt its path names.
UNKNOWN_LEG_CODE = "unknown_leg"


def _log(
    call: Call, now: float, event: str, detail: str, internal: bool = False
) -> tuple[TimelineEntry, ...]:
    return (*call.timeline, TimelineEntry(now, event, detail, internal))


def new_callback(
    call_id: str,
    site: str,
    visitor_id: str,
    phone: str,
    token_hash: str,
    request: CallRequest,
    now: float,
    at: float | None,
    place_at: float,
    detail: str | None = None,
    promised_at: float | None = None,
) -> Call:
    """A callback request: ``at`` None means as soon as someone is free (``queued``), and
    ``promised_at`` is then the estimate the customer is shown; ``detail`` says to the
    visitor why it waits for ``at``."""
    state = CallState.SCHEDULED if at is not None else CallState.QUEUED
    call = Call(
        call_id,
        site,
        visitor_id,
        CallChannel.CALLBACK,
        state,
        now,
        request,
        phone=phone,
        token_hash=token_hash,
        scheduled_at=at,
        place_at=place_at,
        promised_at=at if at is not None else promised_at,
    )
    said = detail or ("We'll call you at the time you chose" if at else "We'll call you back")
    return replace(call, timeline=_log(call, now, "requested", said))


def _open(call: Call) -> None:
    if call.channel is not CallChannel.CALLBACK:
        raise CallError("invalid_state", "not a callback")
    if call.final:
        raise CallError("call_ended", "the callback has already ended")


WAITING = frozenset({CallState.QUEUED, CallState.SCHEDULED})
"""A callback in these states waits: for its time, or in line. Nobody is rung or dialled."""


def waiting(call: Call) -> bool:
    return call.channel is CallChannel.CALLBACK and call.state in WAITING


def check_movable(call: Call) -> None:
    """Raises the refusal of moving ``call`` to another time, if it may not be moved: only a
    waiting callback may."""
    _open(call)
    if call.state not in WAITING:
        raise CallError("invalid_state", f"a {call.state} callback can no longer be moved")


def due(call: Call, now: float) -> Call:
    """A scheduled callback's time has come: it joins the queue (at its kept place)."""
    _open(call)
    if call.state is CallState.QUEUED:
        return call
    if call.state is not CallState.SCHEDULED:
        raise CallError("stale", f"a {call.state} callback is not waiting for its time")
    return replace(
        call,
        state=CallState.QUEUED,
        scheduled_at=None,
        timeline=_log(call, now, "queued", "Finding someone to call you"),
    )


def postpone(call: Call, until: float, event: str, detail: str, now: float) -> Call:
    """Not now (closed, the visitor's night): wait until ``until``."""
    _open(call)
    if call.state not in WAITING:
        raise CallError("stale", f"cannot postpone a {call.state} callback")
    return replace(
        call,
        state=CallState.SCHEDULED,
        scheduled_at=until,
        promised_at=until,
        timeline=_log(call, now, event, detail),
    )


def moved(call: Call, at: float, now: float) -> Call:
    """The visitor picked another time on their ticket: it waits for ``at``, and then joins
    the queue at the place it had (``place_at``)."""
    check_movable(call)
    return replace(
        call,
        state=CallState.SCHEDULED,
        scheduled_at=at,
        promised_at=at,
        timeline=_log(call, now, "moved", "You picked a new time"),
    )


ROUND_PAUSE_S = 30.0
"""After every agent it could reach let its ring pass, a waiting callback asks them all again
this long after the last ring ended: they were busy, away from the screen, or the ring was
lost with a node; a callback waits for someone, it does not give up."""


def round_over(call: Call, now: float) -> bool:
    """Every agent tried for ``call`` let its ring pass at least ``ROUND_PAUSE_S`` ago."""
    if not waiting(call) or not call.tried:
        return False
    last = max((e.at for e in call.timeline if e.event in ("declined", "no_answer")), default=None)
    return last is None or now - last >= ROUND_PAUSE_S


def next_round(call: Call, now: float) -> Call:
    """Ask every agent again (``round_over``)."""
    if not round_over(call, now):
        raise CallError("stale", "this callback's round of rings is not over")
    return replace(
        call,
        tried=(),
        timeline=_log(call, now, "new_round", "Everyone was tried; asking again", internal=True),
    )


def texted(call: Call, now: float) -> Call:
    """The customer was sent a text with the link to their ticket (an ended callback's
    timeline is left as it ended)."""
    if call.final:
        return replace(call, texts=call.texts + 1)
    return replace(
        call,
        texts=call.texts + 1,
        told_at=now,
        timeline=_log(call, now, "texted", "We texted you a link to this page"),
    )


def _waits(call: Call) -> None:
    _open(call)
    if call.state not in WAITING:
        raise CallError("stale", f"a {call.state} callback no longer waits")


def running_late(call: Call, expected_at: float, texting: bool, now: float) -> Call:
    """The promise will slip (gateway.core.promise): the customer is told now, before the
    time passes, and the new time becomes the promise. ``texting``: a text goes too."""
    _waits(call)
    return replace(
        call,
        promised_at=expected_at,
        told_at=now,
        texts=call.texts + texting,
        timeline=_log(call, now, "late", "We're running late; see the new time"),
    )


def reminded(call: Call, texting: bool, now: float) -> Call:
    """The customer has not heard from us for the site's reminder interval. Reminders with
    nothing between them are one timeline entry, at the latest: a callback that waits for
    days keeps a timeline of what happened, not one line per interval."""
    _waits(call)
    entry = TimelineEntry(now, "reminder", "You're still in line; we haven't forgotten you")
    before = (
        call.timeline[:-1]
        if call.timeline and call.timeline[-1].event == "reminder"
        else call.timeline
    )
    return replace(call, told_at=now, texts=call.texts + texting, timeline=(*before, entry))


def kept(call: Call, now: float) -> Call:
    """Told the call runs late, the customer keeps their place (and the new time)."""
    _waits(call)
    if not promise_open(call):
        return call
    return replace(call, timeline=_log(call, now, "kept", "You kept your place"))


def promise_open(call: Call) -> bool:
    """A late notice the customer has not answered (by keeping their place or moving)."""
    for entry in reversed(call.timeline):
        if entry.event == "late":
            return True
        if entry.event in ("kept", "moved"):
            return False
    return False


def _current_leg(call: Call, attempt: int) -> None:
    _open(call)
    if call.dials != attempt or call.state not in (CallState.DIALING, CallState.CONNECTED):
        raise CallError("stale", "that attempt is over")


def leg_heard(call: Call, provider_id: str, status: str) -> Call:
    """Note a status report about one of the callback's phone legs, before acting on it.

    A report no further than what was already heard about that leg (the same webhook
    replayed, or one overtaken by a later one) is refused with ``old_status``: acting on it
    again would repeat what the first did, and a replayed ``ringing`` after the attempt ended
    would hang up the long-gone leg once more. Allowed on an ended callback too: that is
    where replays land, and the first report of a leg nobody wants still has to hang it up.
    """
    if call.channel is not CallChannel.CALLBACK:
        raise CallError("invalid_state", "not a callback")
    progress = LEG_PROGRESS.get(status, LEG_ENDED)
    heard = dict(call.legs_heard)
    if heard.get(provider_id, -1) >= progress:
        raise CallError("old_status", f"leg {provider_id} was already reported past {status}")
    heard[provider_id] = progress
    return replace(call, legs_heard=tuple(heard.items()))


def check_leg(call: Call, attempt: int, provider_id: str) -> Call:
    """``call`` as it is, if a webhook about its dial attempt ``attempt`` may be about the leg
    ``provider_id``; else ``unknown_leg``. The leg placed for that attempt, once known. Before
    it is (a leg's first status can overtake the dial's answer, which then adopts it), any
    leg that is not another attempt's. Never an attempt not started, nor another call's kind.
    """
    placed = dict(call.legs)
    if call.channel is not CallChannel.CALLBACK or not 1 <= attempt <= call.dials:
        raise CallError(UNKNOWN_LEG_CODE, f"no dial attempt {attempt} of this call")
    # (A record from before ``legs`` names only the current attempt's leg.)
    known = placed.get(attempt, call.provider_id if attempt == call.dials else None)
    if known != provider_id and (known is not None or provider_id in placed.values()):
        raise CallError(UNKNOWN_LEG_CODE, f"leg {provider_id} is not attempt {attempt}'s")
    return call


def leg_placed(call: Call, attempt: int, provider_id: str) -> Call:
    _current_leg(call, attempt)
    if call.provider_id == provider_id and dict(call.legs).get(attempt) == provider_id:
        return call
    legs = (*((a, p) for a, p in call.legs if a != attempt), (attempt, provider_id))
    return replace(call, provider_id=provider_id, legs=legs)


def leg_ringing(call: Call, attempt: int, now: float) -> Call:
    _current_leg(call, attempt)
    if call.state is not CallState.DIALING or any(
        e.event == "phone_ringing" and e.at >= (call.dial_started_at or 0) for e in call.timeline
    ):
        return call
    return replace(call, timeline=_log(call, now, "phone_ringing", "Your phone is ringing"))


def leg_answered(call: Call, attempt: int, answered_by: str, now: float) -> Call:
    """The visitor's phone answered; a machine is noted (and hung up on), never connected."""
    _current_leg(call, attempt)
    if call.state is CallState.CONNECTED:
        return call
    if answered_by == "machine":
        if call.answered_by == "machine":
            return call
        return replace(call, answered_by="machine")
    return replace(
        call,
        state=CallState.CONNECTED,
        answered_by=answered_by,
        connected_at=now,
        timeline=_log(call, now, "connected", "Connected"),
    )


def attempt_failed(
    call: Call, attempt: int, outcome: str, retry_at: float | None, now: float
) -> Call:
    """The attempt ended without a conversation: try again at ``retry_at``, or give up."""
    _current_leg(call, attempt)
    detail = ATTEMPT_DETAIL.get(outcome, outcome)
    cleared = replace(call, agent_id=None, agent_sid=None, provider_id=None, media=None, tried=())
    if retry_at is None:
        return replace(
            cleared,
            agent_id=call.agent_id,
            state=CallState.FAILED,
            reason=outcome,
            ended_at=now,
            timeline=_log(call, now, "failed", f"{detail}; we won't try again"),
        )
    return replace(
        cleared,
        state=CallState.SCHEDULED,
        scheduled_at=retry_at,
        promised_at=retry_at,
        timeline=_log(call, now, "retry", f"{detail}; we'll try again"),
    )


def refused(call: Call, reason: str, detail: str, now: float) -> Call:
    """A callback that cannot be placed at all (spend cap reached, number refused)."""
    _open(call)
    if call.state is CallState.CONNECTED:
        raise CallError("invalid_state", "the call is already connected")
    return replace(
        call,
        state=CallState.FAILED,
        reason=reason,
        ended_at=now,
        ring_expires_at=None,
        timeline=_log(call, now, "failed", detail),
    )


def completed(call: Call, attempt: int, now: float) -> Call:
    _current_leg(call, attempt)
    if call.state is not CallState.CONNECTED:
        raise CallError("stale", "the call never connected")
    return replace(
        call,
        state=CallState.COMPLETED,
        reason="completed",
        ended_at=now,
        timeline=_log(call, now, "completed", "The call ended"),
    )
