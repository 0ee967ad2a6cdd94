"""One Twilio Media Stream (``<Connect><Stream>``, bidirectional) joined to the PCMU bridge.

Twilio opens a websocket to the gateway and sends JSON text frames: ``connected``,
``start`` (the stream's and the call's ids), then ``media`` (base64 mu-law, 20 ms each),
``dtmf``, ``mark`` echoes and finally ``stop`` (tests/twilio_sim/spec/MEDIA_STREAMS.md).
The phone's audio goes into the browser's ``MuLawTrack`` as it comes (that track paces it).
The browser's audio, from the receiver tap, goes back as ``media`` messages: Twilio paces
playback itself, so whatever is pending when the writer runs goes out as one message, and
at most ``MAX_QUEUED_FRAMES`` wait (the oldest dropped), as on the other side.

Twilio plays what it is sent in order, so audio sent faster than it plays (a burst after a
network stall) would sit in its buffer as delay. A ``mark`` goes out every half second, and
Twilio echoes it once the audio before it has played: the time in between is the phone's
playout lag. Past ``MAX_PLAYOUT_LAG_S`` a ``clear`` drops what Twilio holds, so the lag never
grows beyond it (counted in ``clears``).

Keys the browser sends (``send_key``) go to the phone as tones, in place of the browser's
audio meanwhile; keys the phone presses come as ``dtmf`` messages (``on_digit``). On hold
(``hold``), the browser's audio is not sent, what Twilio holds is cleared, and, when the phone
is the side held, a short tone
every few seconds tells the caller they are still connected.

Transport only: who may open a stream, and for which call, is the caller's to check before
it hands the websocket over.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import logging
from collections.abc import Callable
from enum import StrEnum

import msgspec
from aiohttp import WSMsgType, web

from mobile_bridge.media.dtmf import hold_tone_frames, tone_frames
from mobile_bridge.media.pcmu import MAX_QUEUED_FRAMES, MuLawTrack

log = logging.getLogger(__name__)

MARK_EVERY = 25
"""Media messages between two marks: half a second of audio at one frame a message."""
MAX_PLAYOUT_LAG_S = 0.3
"""Audio Twilio may hold before a ``clear``: a little over its own jitter, far under the
150 ms budget's breaking point once added to the network's."""
MAX_MARKS_OUT = 16
HOLD_TONE_EVERY_S = 4.0


# Twilio's field names are camelCase: each struct renames its snake_case fields.
class MediaFormat(msgspec.Struct, rename="camel"):
    encoding: str
    sample_rate: int
    channels: int


class StartInfo(msgspec.Struct, rename="camel"):
    stream_sid: str
    account_sid: str
    call_sid: str
    tracks: list[str]
    media_format: MediaFormat
    custom_parameters: dict[str, str] = {}


class MediaInfo(msgspec.Struct, rename="camel"):
    track: str
    chunk: str
    timestamp: str
    payload: str


class DtmfInfo(msgspec.Struct, rename="camel"):
    track: str
    digit: str


class MarkInfo(msgspec.Struct, rename="camel"):
    name: str


class StopInfo(msgspec.Struct, rename="camel"):
    account_sid: str
    call_sid: str


class Connected(msgspec.Struct, tag="connected", tag_field="event", rename="camel"):
    protocol: str
    version: str


class Start(msgspec.Struct, tag="start", tag_field="event", rename="camel"):
    sequence_number: str
    start: StartInfo
    stream_sid: str


class Media(msgspec.Struct, tag="media", tag_field="event", rename="camel"):
    sequence_number: str
    media: MediaInfo
    stream_sid: str


class Dtmf(msgspec.Struct, tag="dtmf", tag_field="event", rename="camel"):
    sequence_number: str
    dtmf: DtmfInfo
    stream_sid: str


class Mark(msgspec.Struct, tag="mark", tag_field="event", rename="camel"):
    sequence_number: str
    mark: MarkInfo
    stream_sid: str


class Stop(msgspec.Struct, tag="stop", tag_field="event", rename="camel"):
    sequence_number: str
    stop: StopInfo
    stream_sid: str


StreamMessage = Connected | Start | Media | Dtmf | Mark | Stop
_decode = msgspec.json.Decoder(StreamMessage).decode


class StreamEnd(StrEnum):
    """Why a stream's websocket stopped being served."""

    STOPPED = "stopped"
    """Twilio said ``stop``: the call ended (or the stream did)."""
    CLOSED = "closed"
    """The websocket closed without a ``stop``: the network, or Twilio, went away."""
    PROTOCOL = "protocol"
    """Twilio never sends binary frames: whoever did is not Twilio."""


class PhoneStream:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        to_browser: MuLawTrack,
        max_pending: int = MAX_QUEUED_FRAMES,
        on_digit: Callable[[str], None] | None = None,
    ) -> None:
        self._ws = ws
        self._to_browser = to_browser
        self._pending: collections.deque[bytes] = collections.deque(maxlen=max_pending)
        self._wake = asyncio.Event()
        self._on_digit = on_digit
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.parameters: dict[str, str] = {}
        self.dropped = 0
        """Browser frames thrown away because the phone's side fell behind."""
        self.malformed = 0
        self.held = False
        self._tones: collections.deque[bytes] = collections.deque(maxlen=50)
        self._skip = 0
        """Browser frames to drop: a tone plays in their place."""
        self._clear = False
        self._writes = 0
        self._marks_out: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._holding: asyncio.Task[None] | None = None
        self.keys_sent = 0
        self.marks_echoed = 0
        self.playout_lag_s = 0.0
        """The phone's playout lag at the last mark echoed."""
        self.max_playout_lag_s = 0.0
        self.clears = 0
        self._loop = asyncio.get_running_loop()
        self._last_arrival: float | None = None
        self.max_arrival_gap_s = 0.0
        """The longest time between two of the phone's frames reaching this worker: the
        jitter of its input (20 ms when it is none)."""

    async def close(self) -> None:
        """End the stream from our side (the call is over): ``run`` returns ``CLOSED``."""
        await self._ws.close()

    def to_phone(self, payload: bytes) -> None:
        """The browser's mu-law (the receiver tap's sink). Nothing is addressable before
        ``start``, so what comes earlier is dropped."""
        if self.stream_sid is None or self.held:
            return
        if self._skip:
            self._skip -= 1
            return
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(payload)
        self._wake.set()

    def send_key(self, key: str) -> None:
        """A key the browser pressed: its tone to the phone, in place of the browser's audio."""
        frames = tone_frames(key)
        self._tones.extend(frames)
        self._skip += len(frames)
        self.keys_sent += 1
        self._wake.set()

    def hold(self, on: bool, tones: bool = True) -> None:
        """Hold: the browser's audio stops, what Twilio still holds of it is dropped, and
        (``tones``: the phone is the one held) a tone every few seconds tells the caller the
        line is alive; or back from hold."""
        if on == self.held:
            return
        self.held = on
        if on:
            self._pending.clear()
            self._clear = True
            if tones:
                self._holding = asyncio.create_task(self._hold_tones())
            self._wake.set()
        elif self._holding is not None:
            self._holding.cancel()
            self._holding = None

    async def _hold_tones(self) -> None:
        while True:
            self._tones.extend(hold_tone_frames())
            self._wake.set()
            await asyncio.sleep(HOLD_TONE_EVERY_S)  # the tone's own cadence

    async def run(self) -> StreamEnd:
        """Serve the websocket until the stream ends; returns why."""
        writer = asyncio.create_task(self._write())
        try:
            async for message in self._ws:
                if message.type is not WSMsgType.TEXT:
                    return StreamEnd.PROTOCOL
                try:
                    event = _decode(message.data)
                except msgspec.DecodeError as e:
                    # A field Twilio adds some day must not end a live call: skip the message.
                    self.malformed += 1
                    log.warning("media stream %s: unreadable message (%s)", self.stream_sid, e)
                    continue
                if isinstance(event, Stop):
                    return StreamEnd.STOPPED
                self._handle(event)
            return StreamEnd.CLOSED
        finally:
            if self._holding is not None:
                self._holding.cancel()
                await asyncio.gather(self._holding, return_exceptions=True)
            writer.cancel()
            try:
                await writer
            except asyncio.CancelledError:
                pass

    def _handle(self, event: StreamMessage) -> None:
        match event:
            case Media(media=media) if media.track == "inbound":
                now = self._loop.time()
                if self._last_arrival is not None:
                    self.max_arrival_gap_s = max(self.max_arrival_gap_s, now - self._last_arrival)
                self._last_arrival = now
                try:
                    self._to_browser.push(binascii.a2b_base64(media.payload, strict_mode=True))
                except binascii.Error:
                    self.malformed += 1
            case Start(start=start):
                self.stream_sid = start.stream_sid
                self.call_sid = start.call_sid
                self.parameters = dict(start.custom_parameters)
            case Dtmf(dtmf=dtmf):
                if self._on_digit is not None:
                    self._on_digit(dtmf.digit)
            case Mark(mark=mark):
                self._echoed(mark.name)
            case _:
                pass

    def _echoed(self, name: str) -> None:
        sent_at = self._marks_out.pop(name, None)
        if sent_at is None:
            return  # not ours, or from before a clear
        self.marks_echoed += 1
        lag = self._loop.time() - sent_at
        self.playout_lag_s = lag
        self.max_playout_lag_s = max(self.max_playout_lag_s, lag)
        if lag > MAX_PLAYOUT_LAG_S:
            self._clear = True
            self._wake.set()

    async def _write(self) -> None:
        encode = msgspec.json.encode
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.stream_sid is None:
                continue
            # A text frame each: Twilio refuses binary ones (error 31950).
            if self._clear:
                self._clear = False
                self.clears += 1
                self._marks_out.clear()  # a clear echoes every mark at once: not a lag
                await self._ws.send_str(
                    encode({"event": "clear", "streamSid": self.stream_sid}).decode()
                )
            if self._tones:
                audio = b"".join(self._tones)
                self._tones.clear()
            elif self._pending:
                audio = b"".join(self._pending)
                self._pending.clear()
            else:
                continue
            message = {
                "event": "media",
                "streamSid": self.stream_sid,
                "media": {"payload": binascii.b2a_base64(audio, newline=False).decode()},
            }
            await self._ws.send_str(encode(message).decode())
            self._writes += 1
            if self._writes % MARK_EVERY == 0:
                name = str(self._writes)
                self._marks_out[name] = loop.time()
                while len(self._marks_out) > MAX_MARKS_OUT:
                    self._marks_out.popitem(last=False)
                mark = {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}
                await self._ws.send_str(encode(mark).decode())
