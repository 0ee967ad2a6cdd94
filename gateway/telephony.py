"""The seam between callbacks and the phone network.

The gateway never imports a telephony provider. ``mobile_bridge`` implements ``Telephony``
with Twilio and registers itself under the ``membrane.telephony`` entry point; the app
factory loads it when Twilio is configured (or a test passes one in). The provider's edge
turns its webhooks into ``LegEvent``s and asks ``CallbackEvents`` what an answered leg should
do; what comes back is plain data (``Bridge``, ``JoinRoom`` or ``HangUp``) that the edge
renders (TwiML). A provider that can also ring an agent's own phone implements ``AgentPhones``
and turns that leg's webhooks into calls of ``AgentLegEvents``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.settings import Settings

ENTRY_POINT_GROUP = "membrane.telephony"


class LegStatus(StrEnum):
    """What became of one outbound phone leg (Twilio's CallStatus, provider-neutral)."""

    INITIATED = "initiated"
    RINGING = "ringing"
    ANSWERED = "answered"
    COMPLETED = "completed"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    FAILED = "failed"
    CANCELED = "canceled"


class AnsweredBy(StrEnum):
    HUMAN = "human"
    MACHINE = "machine"
    """An answering machine, voicemail or fax: never connect an agent to it."""
    UNKNOWN = "unknown"


class TelephonyError(Exception):
    """The provider refused or could not be reached; ``code`` is stable."""

    def __init__(self, code: str, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class DialRequest:
    """One outbound leg to the visitor: attempt ``attempt`` of callback ``call_id``."""

    call_id: str
    attempt: int
    to: str
    """E.164."""
    caller_id: str
    """E.164, one of the site's ``caller_ids``."""
    timeout_s: int = 30
    """How long the visitor's phone may ring before it counts as no answer."""
    machine_detection: bool = True
    """Ask the provider to tell a human from an answering machine before the leg answers."""

    @property
    def idempotency_key(self) -> str:
        return f"{self.call_id}:{self.attempt}"


@dataclass(frozen=True, slots=True)
class LegEvent:
    """A provider webhook about one leg, translated."""

    call_id: str
    attempt: int
    provider_id: str
    status: LegStatus
    answered_by: AnsweredBy | None = None
    duration_s: int | None = None
    """Seconds the leg was answered for, on ``COMPLETED``."""
    sequence: int | None = None
    """The provider's per-leg order of events, when it gives one."""


@dataclass(frozen=True, slots=True)
class Bridge:
    """Greet the visitor and connect them to the agent's phone."""

    say: str
    number: str
    """The agent's phone, E.164."""
    caller_id: str
    timeout_s: int = 30
    language: str = "en-US"
    screen: bool = False
    """The agent hears the whisper first and must press 1 before the bridge connects
    (``ScreenEvents``)."""


@dataclass(frozen=True, slots=True)
class HangUp:
    """End the leg, optionally saying something first."""

    say: str | None = None
    language: str = "en-US"


@dataclass(frozen=True, slots=True)
class JoinRoom:
    """Put the leg into the call's room (a conference), where the other party's leg joins
    it: used when the agent's own leg is kept (rung on their mobile, agent first)."""

    room: str
    say: str | None = None
    language: str = "en-US"
    end_on_exit: bool = True
    """The room ends when this leg leaves it, so either party hanging up ends the call."""


@dataclass(frozen=True, slots=True)
class Whisper:
    """Tell the answering agent who is calling and wait for one key (1 takes the call)."""

    say: str
    timeout_s: int = 8
    """Seconds to wait for the key after the whisper; then the ring counts as no input."""
    language: str = "en-US"


@dataclass(frozen=True, slots=True)
class Proceed:
    """The screened agent accepted: end their leg's own instructions, so the bridge that
    waits on them connects."""


@dataclass(frozen=True, slots=True)
class ConnectMedia:
    """Connect the leg's audio, both ways, to a session of the audio bridge (a bidirectional
    media stream): the agent on their phone talks with the visitor in the browser. The leg
    ends when the stream does."""

    url: str
    """The session's stream (``MediaSession.stream_url``)."""
    say: str | None = None
    language: str = "en-US"
    call_id: str = ""
    moves: int = 0
    """The call's ``media_moves`` as the stream begins. When the stream ends, the provider
    asks ``MediaStreamEvents.on_stream_ended`` what next (so that the leg outlives a dead
    media worker); without a ``call_id`` the leg ends with the stream."""


Instruction = Bridge | HangUp | JoinRoom | ConnectMedia
AgentInstruction = Whisper | JoinRoom | HangUp | Proceed | ConnectMedia
"""What the agent's own leg should do (gateway.services.mobile_ring)."""


@dataclass(frozen=True, slots=True)
class AgentRingRequest:
    """Ring ``call_id``'s agent on their phone, for ring ``ring`` (the call's ``attempt``)."""

    call_id: str
    ring: int
    to: str
    """The agent's mobile, E.164."""
    caller_id: str
    timeout_s: int
    """How long the phone may ring (the site's ring timeout)."""


@runtime_checkable
class AgentPhones(Protocol):
    """A provider that can ring agents' own phones (``Telephony`` implementations may)."""

    async def ring_agent(self, request: AgentRingRequest) -> str:
        """Call the agent's phone with answering machine detection and status callbacks;
        the leg's webhooks go to ``AgentLegEvents``. Raises ``TelephonyError``."""

    async def tell_and_hang_up(self, provider_id: str, say: str) -> None:
        """Say ``say`` on a live leg, then end it; no error if it already ended."""

    async def hang_up(self, provider_id: str) -> None:
        """As ``Telephony.hang_up``."""


class ScreenEvents(Protocol):
    """A screened bridge to the agent's phone (``Bridge.screen``): the provider runs these
    on the agent's leg before connecting it to the visitor's leg ``parent_id`` of dial
    ``dials``. Each raises ``Forbidden`` when ``parent_id`` is not that dial's leg."""

    async def on_screen(
        self, call_id: str, dials: int, parent_id: str, provider_id: str
    ) -> AgentInstruction: ...

    async def on_screen_key(
        self, call_id: str, dials: int, parent_id: str, provider_id: str, digits: str
    ) -> AgentInstruction: ...


class AgentLegEvents(Protocol):
    """What a telephony edge calls into about an agent's own leg. Each raises ``Forbidden``
    when ``provider_id`` is not the leg of that ring (nothing is changed then)."""

    async def on_agent_answer(
        self, call_id: str, ring: int, provider_id: str, answered_by: AnsweredBy
    ) -> AgentInstruction: ...

    async def on_agent_key(
        self, call_id: str, ring: int, provider_id: str, digits: str
    ) -> AgentInstruction: ...

    async def on_agent_leg_event(
        self, call_id: str, ring: int, provider_id: str, status: LegStatus
    ) -> None: ...


class CallbackEvents(Protocol):
    """What a telephony edge calls into (the gateway's callback service implements it).

    Each raises ``Forbidden`` with code ``unknown_leg``, changing nothing, when
    ``provider_id`` is not the leg of the attempt the webhook names (another attempt's, or
    another call's): the edge answers that as a refusal, not with an instruction."""

    async def on_leg_event(self, event: LegEvent) -> None: ...

    async def on_answer(
        self, call_id: str, attempt: int, provider_id: str, answered_by: AnsweredBy
    ) -> Instruction:
        """The visitor's phone answered: what should happen on the line."""

    async def on_bridge_result(
        self, call_id: str, attempt: int, provider_id: str, agent_answered: bool
    ) -> Instruction:
        """The bridge to the agent's phone ended (or never connected)."""


class Telephony(Protocol):
    async def start(self) -> None:
        """Open clients; called inside the running loop before the first dial."""

    async def close(self) -> None: ...

    async def dial(self, request: DialRequest) -> str:
        """Place the leg and return the provider's id for it. Raises ``TelephonyError``."""

    async def find_leg(self, request: DialRequest, since: float) -> str | None:
        """A leg to ``request.to`` placed since ``since`` (POSIX seconds), if any: lets a node
        that takes over a half-done dial find out whether the dial already happened."""

    async def hang_up(self, provider_id: str) -> None:
        """End the leg (cancel it if it has not answered); no error if it already ended."""


@runtime_checkable
class Texts(Protocol):
    """A provider that can send text messages (``Telephony`` implementations may)."""

    async def send_text(self, to: str, from_: str, body: str) -> str:
        """Send an SMS and return the provider's id for it. Raises ``TelephonyError``; with
        code ``opted_out`` (not retryable) when the number has told this sender STOP."""


@dataclass(frozen=True, slots=True)
class MediaSession:
    """One call's audio on the bridge (a media worker's session)."""

    ref: str
    """Where the session runs, opaque to the gateway; any node may pass it back."""
    stream_url: str
    """The websocket URL the phone leg's stream connects to (``ConnectMedia``)."""
    offer: str | None = None
    """The session's own SDP offer, when it was opened to offer (``make_offer``)."""


class MediaStreamEvents(Protocol):
    """What a telephony edge calls into when the Media Stream of a bridged call's phone leg
    ends (the audio bridge implements it)."""

    async def on_stream_ended(self, call_id: str, moves: int, provider_id: str) -> Instruction:
        """The stream begun at ``moves`` ended while the leg ``provider_id`` is still up: a
        ``ConnectMedia`` to the session the call's audio now has (moved from a dead media
        worker), or ``HangUp``. Raises ``Forbidden`` (``unknown_leg``) when ``provider_id``
        is not the call's phone leg."""


HeldSide = Literal["phone", "browser"]
"""Who is put on hold on a bridged call: the person on the phone (an agent in the app holds
her customer) or the one in the browser (an agent on her phone holds a website visitor)."""


class MediaBridge(Protocol):
    """The audio bridge between a browser's WebRTC and a phone leg (mobile_bridge.media).
    Each method raises ``TelephonyError`` (``media_full``: no worker has room)."""

    async def open(self, call_id: str, make_offer: bool = False) -> MediaSession:
        """A session for ``call_id``, before the browser has offered; or, ``make_offer``,
        one that offers to a browser that answers (``MediaSession.offer``)."""

    async def answer(self, ref: str, offer: str) -> str:
        """The browser's SDP offer in, the session's SDP answer out."""

    async def accept_answer(self, ref: str, answer: str) -> None:
        """The browser's SDP answer to the session's own offer."""

    async def add_candidate(self, ref: str, candidate: Mapping[str, object]) -> None:
        """A trickled ICE candidate of the browser (``{"candidate", "sdpMid"?, ...}``)."""

    async def hold(self, ref: str, on: bool, held: HeldSide = "phone") -> None:
        """Hold (neither side hears the other; the ``held`` side hears a tone now and then),
        or back from hold."""

    async def close(self, ref: str) -> None:
        """The call is over; no error if the session already ended."""

    async def reachable(self, ref: str) -> bool:
        """Whether the worker of ``ref`` answers (whatever became of the session)."""

    def on_lost(self, listener: Callable[[str, str], Awaitable[None]]) -> None:
        """``listener(call_id, ref)`` for each call whose session ``ref`` the bridge lost
        (its worker died): the call's audio moves to a new session, or the call ends."""

    def on_key(self, listener: Callable[[str, str], Awaitable[None]]) -> None:
        """``listener(call_id, key)`` for each key pressed on a bridged phone (``0``-``9``,
        ``*``, ``#``; the browser hears its tone as well)."""


@runtime_checkable
class CarriesMedia(Protocol):
    """A provider whose phone legs can be bridged to browsers (``Telephony`` may be)."""

    media_bridge: MediaBridge | None


TelephonyInstaller = Callable[["web.Application", "Settings", CallbackEvents], Telephony]
"""Registers the provider's webhook routes on the app and returns its ``Telephony``."""
