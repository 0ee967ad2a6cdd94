"""One Twilio Media Stream (``<Connect><Stream>``, bidirectional) joined to the PCMU bridge.

Twilio opens a websocket to the gateway and sends JSON text frames: ``connected``,
``start`` (the stream's and the call's ids), then ``media`` (base64 mu-law, 20 ms each),
``dtmf``, ``mark`` echoes and finally ``stop`` (tests/twilio_sim/spec/MEDIA_STREAMS.md).
The phone's audio goes into the browser's ``MuLawTrack`` as it comes (that track paces it).
The browser's audio, from the receiver tap, goes back as ``media`` messages: Twilio paces
playback itself, so whatever is pending when the writer runs goes out as one message, and
at most ``MAX_QUEUED_FRAMES`` wait (the oldest dropped), as on the other side.

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

from mobile_bridge.media.pcmu import MAX_QUEUED_FRAMES, MuLawTrack

log = logging.getLogger(__name__)


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
        self.marks: list[str] = []

    async def close(self) -> None:
        """End the stream from our side (the call is over): ``run`` returns ``CLOSED``."""
        await self._ws.close()

    def to_phone(self, payload: bytes) -> None:
        """The browser's mu-law (the receiver tap's sink). Nothing is addressable before
        ``start``, so what comes earlier is dropped."""
        if self.stream_sid is None:
            return
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(payload)
        self._wake.set()

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
            writer.cancel()
            try:
                await writer
            except asyncio.CancelledError:
                pass

    def _handle(self, event: StreamMessage) -> None:
        match event:
            case Media(media=media) if media.track == "inbound":
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
                self.marks.append(mark.name)
            case _:
                pass

    async def _write(self) -> None:
        encode = msgspec.json.encode
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending or self.stream_sid is None:
                continue
            audio = b"".join(self._pending)
            self._pending.clear()
            message = {
                "event": "media",
                "streamSid": self.stream_sid,
                "media": {"payload": binascii.b2a_base64(audio, newline=False).decode()},
            }
            # A text frame: Twilio refuses binary ones (error 31950).
            await self._ws.send_str(encode(message).decode())
