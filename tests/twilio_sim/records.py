"""What the simulator records about each call, for tests to inspect."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .audio import AudioSource, Silence, Tone

FINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})


@dataclass
class PhoneConfig:
    """A simulated phone, keyed by the number (or ``client:x`` / ``sip:x@y``) that is dialled.

    All times are in simulated seconds (multiplied by ``TwilioSim.time_scale`` in real time).
    """

    number: str
    answer_after: float = 1.0
    ring_after: float = 0.2
    busy: bool = False
    no_answer: bool = False
    fail: bool = False
    voicemail: bool = False
    hangup_after: float | None = None
    tone_hz: float | None = None
    audio: AudioSource | None = None
    amd_result: str | None = None
    amd_after: float | None = None
    greeting_length: float = 4.0
    press: str | None = None
    """Keys pressed at a ``<Gather>`` (None: silence until its timeout)."""
    press_after: float = 1.0
    """Seconds after the ``<Gather>``'s nested verbs before the keys are pressed."""

    def source(self) -> AudioSource:
        if self.audio is not None:
            return self.audio
        if self.tone_hz is not None:
            return Tone(self.tone_hz)
        return Silence()

    def answered_by(self, mode: str) -> str:
        """AnsweredBy for MachineDetection ``mode`` (TWIML.md, AMD section)."""
        if self.amd_result is not None:
            return self.amd_result
        if not self.voicemail:
            return "human"
        return "machine_start" if mode == "Enable" else "machine_end_beep"

    def detection_time(self, mode: str) -> float:
        if self.amd_after is not None:
            return self.amd_after
        if self.voicemail and mode == "DetectMessageEnd":
            return self.greeting_length
        return 2.0 if self.voicemail else 1.5


@dataclass
class StatusChange:
    status: str
    at: datetime


CANCELED = "canceled"
"""``WebhookRecord.error`` of a request the simulator itself cut off (it was closing)."""


@dataclass
class WebhookRecord:
    """One HTTP request the simulator made to the application."""

    kind: str  # status | twiml | fallback | action | redirect | amd | stream-status
    url: str
    method: str
    params: list[tuple[str, str]]
    signature: str
    at: datetime
    status: int | None = None
    error: str | None = None
    body: str = ""

    def param(self, name: str) -> str | None:
        for k, v in self.params:
            if k == name:
                return v
        return None

    @property
    def as_dict(self) -> dict[str, str]:
        return dict(self.params)


@dataclass
class Notification:
    """A Twilio debugger event (error or warning) the real service would log."""

    code: int
    message: str
    level: str = "error"


@dataclass
class VerbRecord:
    verb: str
    attrs: dict[str, str]
    text: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamRecord:
    """One ``<Connect><Stream>`` session."""

    url: str
    name: str | None
    custom_parameters: dict[str, str]
    stream_sid: str
    signature: str = ""
    connected: bool = False
    started: bool = False
    stopped: bool = False
    closed_by: str | None = None  # "app" | "twilio" | None
    sent: list[dict[str, Any]] = field(default_factory=list)  # Twilio->app, except media
    media_frames_sent: int = 0
    app_messages: list[dict[str, Any]] = field(default_factory=list)  # app->Twilio, except media
    app_media_messages: int = 0
    audio_received: bytearray = field(default_factory=bytearray)  # mu-law the app sent
    audio_played: bytearray = field(default_factory=bytearray)  # what the phone "heard"
    marks_echoed: list[str] = field(default_factory=list)
    errors: list[Notification] = field(default_factory=list)


@dataclass
class CallRecord:
    sid: str
    account_sid: str
    direction: str
    to: str
    from_: str
    params: dict[str, list[str]]
    parent_sid: str | None = None
    status: str = "queued"
    history: list[StatusChange] = field(default_factory=list)
    answered_by: str | None = None
    date_created: datetime | None = None
    date_updated: datetime | None = None
    start_time: datetime | None = None
    answer_time: datetime | None = None
    end_time: datetime | None = None
    duration: int | None = None
    sip_response_code: int | None = None
    twiml: list[str] = field(default_factory=list)  # every TwiML document executed, as text
    verbs: list[VerbRecord] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    webhooks: list[WebhookRecord] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    streams: list[StreamRecord] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    rest_updates: list[dict[str, list[str]]] = field(default_factory=list)
    finished: bool = False
    deleted: bool = False

    @property
    def statuses(self) -> list[str]:
        """Every status the call went through, including ``initiated``."""
        return [h.status for h in self.history]

    @property
    def ended(self) -> bool:
        return self.status in FINAL_STATUSES

    def webhooks_of(self, kind: str) -> list[WebhookRecord]:
        return [w for w in self.webhooks if w.kind == kind]

    @property
    def status_callbacks(self) -> list[WebhookRecord]:
        return self.webhooks_of("status")

    @property
    def stream(self) -> StreamRecord | None:
        return self.streams[-1] if self.streams else None

    def verbs_named(self, verb: str) -> list[VerbRecord]:
        return [v for v in self.verbs if v.verb == verb]


@dataclass
class ConferenceRecord:
    """One ``<Dial><Conference>`` room, from its first participant until it ended."""

    name: str
    sid: str
    participants: list[str] = field(default_factory=list)
    """Every call that joined, in order."""
    bridged: list[str] = field(default_factory=list)
    """The calls that were in the started room together with another call."""
    ended: bool = False
    ended_by: str | None = None
    """The call whose leaving ended the room (``endConferenceOnExit``), if one did."""
