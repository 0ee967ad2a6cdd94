"""G.711 mu-law straight through aiortc, neither decoded nor encoded.

A phone's Twilio Media Stream carries 8 kHz mu-law in 20 ms frames, and every browser can
send and receive the same codec over WebRTC (PCMU, static payload type 0). So when the
gateway's answer puts PCMU first, the bridge only moves bytes. aiortc, left to itself,
decodes what it receives in a thread through a jitter buffer that waits for four packets
(80 ms) before it gives out the first, and encodes what it sends through a resampler; the
naive bridge spent most of its 7% of a core per call there. Here:

- ``tap_pcmu`` takes a receiver's PCMU packets as they arrive, before its jitter buffer
  and decoder, and hands each payload on. Packets arrive in order on any sane path, so
  reordering is not buffered for: one older than the newest seen is dropped.
- ``MuLawTrack`` is the sending side: payloads pushed in go out as already-encoded packets
  (aiortc's sender only packs an ``av.Packet``), one every 20 ms. Its queue is bounded and
  drops the oldest, so a sender running fast never builds delay; when it runs dry, silence
  goes out and the gap is counted.

Packets of other payload types (a DTMF ``telephone-event``, a codec a browser insisted on)
go to aiortc's own handling.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpReceiver, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket
from av.packet import Packet

from mobile_bridge.media.dtmf import KeyReceiver

SAMPLE_RATE: Final = 8000
FRAME_SAMPLES: Final = 160
"""Samples (and mu-law bytes) in one 20 ms frame: Twilio's and WebRTC's packet size."""
FRAME_S: Final = FRAME_SAMPLES / SAMPLE_RATE
SILENCE: Final = b"\xff" * FRAME_SAMPLES
PCMU_PAYLOAD_TYPE: Final = 0
MAX_QUEUED_FRAMES: Final = 5
"""100 ms: a deeper queue would only be delay (issue 12: no buffer deeper than needed)."""
TIME_BASE: Final = fractions.Fraction(1, SAMPLE_RATE)
SHRINK_WINDOW_FRAMES: Final = 50
"""A second of frames: how long the queue must stay deeper than needed before it shrinks."""
LATE_S: Final = FRAME_S
"""A frame handed over a whole frame after its slot is late: it took the next one's."""
MAX_OVERLAY_FRAMES: Final = 50
"""A second of tones queued at most (a burst of keys); more is dropped."""
MAX_SOURCES: Final = 8
"""Sources a tap remembers: a call has one, a few after renegotiations."""

PayloadSink = Callable[[bytes], None]


class MuLawTrack(MediaStreamTrack):
    """An outgoing audio track of mu-law frames pushed in by the bridge."""

    kind = "audio"

    def __init__(
        self,
        max_frames: int = MAX_QUEUED_FRAMES,
        clock: Callable[[], float] = time.monotonic,
        on_late: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_late = on_late
        """Told the lateness (seconds) of each frame sent late."""
        self._frames: collections.deque[bytes] = collections.deque(maxlen=max_frames)
        self._overlay: collections.deque[bytes] = collections.deque(maxlen=MAX_OVERLAY_FRAMES)
        self._partial = b""
        self.held = False
        """On hold: what is pushed is dropped, and silence (or an overlay) goes out."""
        self._clock = clock
        self._started_at: float | None = None
        self._sent = 0
        self._heard = False
        self.dropped = 0
        """Frames thrown away because the queue was full (the oldest go first)."""
        self.underruns = 0
        """Frames of silence sent because nothing had come in time, once audio had begun."""
        self.shrinks = 0
        """Frames dropped because the queue had stayed deeper than needed for a second: a
        burst's delay is given back, instead of lasting for the rest of the call."""
        self._window_min = MAX_QUEUED_FRAMES
        self._window_frames = 0
        self.late = 0
        """Frames handed to aiortc more than ``LATE_S`` after their slot: this process was
        too busy to keep time (unlike an underrun, whose frame came in late)."""
        self.max_late_s = 0.0

    @property
    def queued(self) -> int:
        return len(self._frames)

    def overlay(self, frames: tuple[bytes, ...]) -> None:
        """Play ``frames`` (a key's tone) next, in place of what is pushed meanwhile."""
        self._overlay.extend(frames)

    def push(self, payload: bytes) -> None:
        """Queue mu-law bytes: whole 20 ms frames, a remainder kept for the next push."""
        if self.held:
            return
        if not self._heard and self._started_at is not None:
            # The first audio: from now on a frame goes out half a frame after the time its
            # source's frames come in, so that arrivals may jitter by 10 ms either way
            # without a gap (a frame due just after each arrival would miss at the least).
            now = self._clock()
            self._started_at = now + FRAME_S / 2 - self._sent * FRAME_S
        data = self._partial + payload if self._partial else payload
        whole = len(data) - len(data) % FRAME_SAMPLES
        for start in range(0, whole, FRAME_SAMPLES):
            if len(self._frames) == self._frames.maxlen:
                self.dropped += 1
            self._frames.append(data[start : start + FRAME_SAMPLES])
        self._partial = data[whole:]
        self._heard = True

    async def recv(self) -> Packet[Any]:
        """The next 20 ms, as an ``av.Packet``: ``RTCRtpSender._next_encoded_frame`` only
        packs one (a frame it would encode)."""
        if self.readyState != "live":
            raise MediaStreamError
        now = self._clock()
        if self._started_at is None:
            self._started_at = now
        else:
            wait = self._started_at + self._sent * FRAME_S - now
            if wait > 0:
                await asyncio.sleep(wait)
            lateness = self._clock() - (self._started_at + self._sent * FRAME_S)
            if lateness > LATE_S and self._heard:
                self.late += 1
                if self._on_late is not None:
                    self._on_late(lateness)
            self.max_late_s = max(self.max_late_s, lateness)
        if self._overlay:
            frame = self._overlay.popleft()
            if self._frames:
                self._frames.popleft()  # the tone takes its place: no delay builds up
        elif self._frames:
            frame = self._frames.popleft()
            self._shrink_if_deep()
        elif self.held:
            frame = SILENCE
        else:
            frame = SILENCE
            if self._heard:
                self.underruns += 1
        if not self._frames:
            self._window_min = 0
        packet = Packet(frame)
        packet.pts = self._sent * FRAME_SAMPLES
        packet.time_base = TIME_BASE
        self._sent += 1
        return packet

    def _shrink_if_deep(self) -> None:
        """After each frame sent: if the queue held more than one spare frame all through
        the last second, that depth is delay jitter did not use (a burst left it behind),
        so a frame is dropped: at most one a second, down to one spare frame. That one stays:
        it is what a gap bought (an underrun deepens the queue by a frame), and taking it
        back would only buy the next gap."""
        self._window_min = min(self._window_min, len(self._frames))
        self._window_frames += 1
        if self._window_frames < SHRINK_WINDOW_FRAMES:
            return
        if self._window_min > 1:
            self._frames.popleft()
            self.shrinks += 1
        self._window_min = MAX_QUEUED_FRAMES
        self._window_frames = 0


def newer(sequence: int, than: int) -> bool:
    """RTP sequence numbers compared across their 16-bit wrap (RFC 3550)."""
    return 0 < (sequence - than) & 0xFFFF < 0x8000


def tap_pcmu(receiver: RTCRtpReceiver, sink: PayloadSink, keys: KeyReceiver | None = None) -> None:
    """From now on ``receiver``'s PCMU payloads go to ``sink`` as they arrive, and not to
    its jitter buffer, decoder or track; ``telephone-event`` packets go to ``keys`` (aiortc
    knows no such codec); anything else goes on as before, through the
    ``RTCRtpReceiver._handle_rtp_packet`` this replaces on that one receiver. The DTLS
    transport hands every packet to that attribute (``RTCDtlsTransport._handle_rtp_data``)."""
    handle: Callable[[RtpPacket, int], Awaitable[None]] = receiver._handle_rtp_packet
    # The newest sequence number by source: a sender that restarts (a new SSRC) starts
    # its numbers anywhere.
    newest: dict[int, int] = {}

    async def tapped(packet: RtpPacket, arrival_time_ms: int) -> None:
        if packet.payload_type != PCMU_PAYLOAD_TYPE:
            if keys is not None and packet.payload_type == keys.payload_type:
                keys.packet(packet.payload, packet.timestamp)
                return
            await handle(packet, arrival_time_ms)
            return
        last = newest.get(packet.ssrc)
        if last is not None and not newer(packet.sequence_number, last):
            return  # late or repeated: its moment has passed
        if last is None and len(newest) >= MAX_SOURCES:
            newest.clear()  # an endless stream of new sources is not a call's
        newest[packet.ssrc] = packet.sequence_number
        if packet.payload:
            sink(packet.payload)

    # tests/test_upstream_guard.py fingerprints both aiortc methods named above.
    receiver._handle_rtp_packet = tapped  # type: ignore[method-assign]


def route_keys(receiver: RTCRtpReceiver, payload_type: int) -> None:
    """Let ``receiver`` have packets of ``payload_type`` (telephone-event, which aiortc did
    not negotiate): its transport's router drops a payload type it does not know for the
    receiver (``RtpRouter.route_rtp``). Call once the remote description is applied."""
    transport: Any = receiver.transport
    transport._rtp_router.register_receiver(receiver, ssrcs=[], payload_types=[payload_type])


def prefer_pcmu(transceiver: RTCRtpTransceiver) -> None:
    """Put PCMU first among the transceiver's codecs; the others stay as fallbacks. aiortc
    negotiates when the remote offer is applied, so this must come before that."""
    capabilities = RTCRtpReceiver.getCapabilities("audio")
    assert capabilities is not None  # aiortc knows audio
    codecs = capabilities.codecs
    ranked = sorted(codecs, key=lambda c: c.mimeType.lower() != "audio/pcmu")
    transceiver.setCodecPreferences(ranked)


def bridge_transceiver(
    pc: RTCPeerConnection, outgoing: MuLawTrack, sink: PayloadSink, keys: KeyReceiver | None = None
) -> RTCRtpTransceiver:
    """The gateway's audio transceiver for a browser's offer, made *before* the offer is
    applied: ``RTCPeerConnection.setRemoteDescription`` takes an unassigned transceiver of
    the same kind for the offer's audio line, and negotiates codecs then. ``outgoing`` is sent,
    PCMU is preferred, and what the browser sends in PCMU goes to ``sink``."""
    transceiver = pc.addTransceiver(outgoing, direction="sendrecv")
    prefer_pcmu(transceiver)
    tap_pcmu(transceiver.receiver, sink, keys)
    return transceiver
