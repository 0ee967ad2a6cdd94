"""Ringing an agent's own phone: what each thing the phone network says means for the ring.

Pure, like gateway.core.call. A ring reaches an agent on one device: the agent app (``app``)
or their mobile phone (``mobile``), called through the telephony provider with answering
machine detection and a whisper ("a customer on /pricing, in German: press 1 to take the
call"). Only the key 1 accepts. Every other ending (another key, silence, a busy line, no
answer, a failed call, voicemail, the site's ring timeout) is a decline of that ring, after
which the next agent is tried, as after a decline in the app.

The call remembers the agent's legs (``Call.agent_legs``: the ring each was for) so that a
webhook about any other leg is refused, and the timeline says which device rang and how
each ring ended (internal entries: agents and supervisors see them, the visitor does not).
"""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from functools import lru_cache
from urllib.parse import urlsplit

from babel import Locale, UnknownLocaleError

from gateway.core.call import Call, CallChannel, CallError, CallState, TimelineEntry
from gateway.core.model import Channel
from gateway.core.text import Text


class RingDevice(StrEnum):
    APP = "app"
    MOBILE = "mobile"


class RingEnd(StrEnum):
    """How one ring of one agent ended."""

    ACCEPTED_BY_KEY = "accepted_by_key"
    DECLINED_KEY = "declined_key"
    NO_INPUT = "no_input"
    MACHINE = "machine"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    FAILED = "failed"
    TIMEOUT = "timeout"
    DECLINED = "declined"
    """Declined in the app."""


ACCEPT_KEY = "1"
RING_DEVICE_EVENT = "ring_device"
RING_ENDED_EVENT = "ring_ended"

LEG_ENDINGS = {
    "busy": RingEnd.BUSY,
    "no_answer": RingEnd.NO_ANSWER,
    "failed": RingEnd.FAILED,
    "canceled": RingEnd.NO_ANSWER,
    # Hung up before pressing anything (during the whisper): as if silent.
    "completed": RingEnd.NO_INPUT,
}
"""What a leg that ended before its agent pressed 1 means, by ``LegStatus`` value."""


def device_for(channel: Channel) -> RingDevice:
    """Routing's channel for the agent (``Candidate.channel``): the app takes the browser's
    WebRTC, the phone network reaches the mobile."""
    return RingDevice.MOBILE if channel is Channel.PSTN else RingDevice.APP


def key_pressed(digits: str) -> RingEnd:
    """What the agent's key press means (empty: the whisper's Gather timed out)."""
    if digits == "":
        return RingEnd.NO_INPUT
    return RingEnd.ACCEPTED_BY_KEY if digits == ACCEPT_KEY else RingEnd.DECLINED_KEY


def answered(answered_by: str) -> RingEnd | None:
    """A machine (voicemail, fax) never takes a call: its answer ends the ring. A human, or
    an unknown answerer, hears the whisper and must press 1 (which a machine cannot)."""
    return RingEnd.MACHINE if answered_by == "machine" else None


def leg_ended(status: str) -> RingEnd:
    """The agent's leg ended (``LegStatus`` value) while the ring was still open."""
    return LEG_ENDINGS.get(status, RingEnd.FAILED)


def whisper(call: Call, site_name: str, visitor_name: str | None, text: Text) -> str:
    """What the agent hears on answering, in their language (``text``): what kind of call,
    for whom, from which page, in which language. Spoken, so the page is its path (a voice
    reading out a whole address helps nobody) and the customer's language is named in the
    agent's. Whole sentences, each translated as one."""
    callback = call.channel is CallChannel.CALLBACK
    if callback and visitor_name:
        said = [text.gettext("{site} callback for {name}.")]
    elif callback:
        said = [text.gettext("{site} callback for a customer.")]
    elif visitor_name:
        said = [text.gettext("{site}: {name} is calling from the website.")]
    else:
        said = [text.gettext("{site}: a customer is calling from the website.")]
    said[0] = said[0].format(site=site_name, name=visitor_name or "")
    page, language = call.request.page, call.request.language
    if page:
        said.append(text.gettext("They were on {page}.").format(page=spoken_page(page, text)))
    if language:
        name = language_name(language, text.language)
        said.append(text.gettext("They speak {language}.").format(language=name))
    said.append(text.gettext("Press 1 to take the call."))
    return " ".join(said)


def agent_of_ring(call: Call, ring: int) -> str | None:
    """The agent ring ``ring`` was for: the current agent while it is the current ring; once
    the call has moved on, the agent whose ring ended last (a key pressed after the ring
    timed out, the usual late webhook)."""
    if ring == call.attempt:
        return call.agent_id
    return call.tried[-1] if call.tried else None


def spoken_page(page: str, text: Text) -> str:
    path = urlsplit(page).path.strip()
    if path in ("", "/"):
        return text.gettext("the home page")
    return text.gettext("the page {path}").format(path=path)


@lru_cache(maxsize=512)
def language_name(code: str, in_language: str = "en") -> str:
    """``de`` -> "German" (in English; "Deutsch" in German), ``pt-BR`` -> "Portuguese
    (Brazil)"; a code Babel does not know is said as it is."""
    try:
        name = Locale.parse(code, sep="-").get_display_name(Locale.parse(in_language, sep="-"))
    except (ValueError, TypeError, UnknownLocaleError):
        return code
    return name or code


def phone_after_app(
    mobile_after_desktop: bool, device: RingDevice, end: RingEnd, reachable: bool
) -> bool:
    """Whether a ring that just ended should go on on the same agent's mobile: the site's
    "mobile after desktop" policy, for a ring let run out in the app (a decline in the app is
    the agent's answer), when the agent has a phone the provider can call."""
    return (
        mobile_after_desktop and device is RingDevice.APP and end is RingEnd.TIMEOUT and reachable
    )


def _entry(call: Call, now: float, event: str, detail: str) -> tuple[TimelineEntry, ...]:
    return (*call.timeline, TimelineEntry(now, event, detail, internal=True))


def rang_on(call: Call, device: RingDevice, now: float) -> Call:
    """Note which device the current ring reaches."""
    return replace(call, timeline=_entry(call, now, RING_DEVICE_EVENT, device.value))


def leg_placed(call: Call, attempt: int, provider_id: str, now: float) -> Call:
    """The agent's phone is being called for ring ``attempt``; refused once that ring is over
    (the leg must then be hung up)."""
    if call.state is not CallState.RINGING or call.attempt != attempt:
        raise CallError("stale", "that ring is over")
    if (attempt, provider_id) in call.agent_legs:
        return call
    placed = replace(call, agent_legs=(*call.agent_legs, (attempt, provider_id)))
    return rang_on(placed, RingDevice.MOBILE, now)


def is_leg(call: Call, attempt: int, provider_id: str) -> bool:
    """Whether ``provider_id`` is the agent's leg of ring ``attempt`` (a webhook about any
    other leg, or about another ring, is refused)."""
    return (attempt, provider_id) in call.agent_legs


def agent_leg(call: Call) -> str | None:
    """The agent's leg of the current ring (or of the accepted one), if it is on their
    mobile."""
    return next((leg for ring, leg in call.agent_legs if ring == call.attempt), None)


def has_leg(call: Call) -> bool:
    """The current ring (or the accepted one) is on the agent's mobile."""
    return agent_leg(call) is not None


def ring_ended(call: Call, attempt: int, device: RingDevice, end: RingEnd, now: float) -> Call:
    """Note how ring ``attempt`` ended; once per ring (a repeat is a no-op)."""
    return _ended(call, f"ring {attempt}", device, end, now)


def ring_end_of(call: Call, attempt: int) -> RingEnd | None:
    """How ring ``attempt`` ended, if the timeline says."""
    return _end_of(call, f"ring {attempt}")


def _ended(call: Call, key: str, device: RingDevice, end: RingEnd, now: float) -> Call:
    if _end_of(call, key) is not None:
        return call
    detail = f"{device.value}: {end.value} ({key})"
    return replace(call, timeline=_entry(call, now, RING_ENDED_EVENT, detail))


def _end_of(call: Call, key: str) -> RingEnd | None:
    suffix = f" ({key})"
    for e in reversed(call.timeline):
        if e.event == RING_ENDED_EVENT and e.detail.endswith(suffix):
            return RingEnd(e.detail.split(": ", 1)[1][: -len(suffix)])
    return None


# --- customer first: the agent's phone is bridged to the waiting visitor, screened -------


def _screen_key(call: Call) -> str:
    return f"dial {call.dials}, {call.agent_id}"


def screening(call: Call, now: float) -> Call:
    """The bridge of dial ``call.dials`` to ``call.agent_id``'s mobile is screened (the
    whisper runs on the agent's leg before it connects)."""
    if call.state is not CallState.CONNECTED or call.agent_id is None:
        raise CallError("stale", "no visitor waits for an agent")
    detail = f"{RingDevice.MOBILE.value} ({_screen_key(call)})"
    return replace(call, timeline=_entry(call, now, RING_DEVICE_EVENT, detail))


def screen_ended(call: Call, dials: int, end: RingEnd, now: float) -> Call:
    """How the screened bridge to the current agent ended (once)."""
    if call.state is not CallState.CONNECTED or call.dials != dials or call.agent_id is None:
        raise CallError("stale", "that bridge is over")
    return _ended(call, _screen_key(call), RingDevice.MOBILE, end, now)


def screened_now(call: Call) -> bool:
    """Whether the current dial's bridge to the current agent is screened (noted by
    ``screening``)."""
    detail = f"{RingDevice.MOBILE.value} ({_screen_key(call)})"
    return any(e.event == RING_DEVICE_EVENT and e.detail == detail for e in call.timeline)


def screen_end_of(call: Call) -> RingEnd | None:
    """How the screened bridge to the call's current agent ended, if it did."""
    return _end_of(call, _screen_key(call))


def next_agent(call: Call, dials: int, agent_id: str, reasons: tuple[str, ...], now: float) -> Call:
    """The visitor waits on the line and the agent did not take the call: ``agent_id`` is
    put through instead (the former agent joins ``tried``)."""
    if call.state is not CallState.CONNECTED or call.dials != dials or call.agent_id is None:
        raise CallError("stale", "no visitor waits for an agent")
    routed = _entry(call, now, "routed", f"{agent_id}: " + "; ".join(reasons))
    return replace(
        call,
        agent_id=agent_id,
        tried=(*call.tried, call.agent_id),
        timeline=(*routed, TimelineEntry(now, "transfer", "Connecting you to someone else")),
    )


def ring_devices(call: Call) -> list[str]:
    """The device of every ring, in order."""
    return [e.detail.split(" ", 1)[0] for e in call.timeline if e.event == RING_DEVICE_EVENT]
