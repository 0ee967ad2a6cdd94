"""The fallback for a browser that will not speak PCMU: transcode.

Every browser offers PCMU today, so the bridge normally only moves bytes (``pcmu``). A
browser configured to refuse it (an Opus-only offer or answer) still gets a call, at the
cost of decoding and encoding on the worker:

- to the phone: aiortc receives and decodes the browser's codec as usual (its jitter buffer
  included); ``pump_to_phone`` resamples each frame to 8 kHz, encodes mu-law and hands it
  to the phone's side in 20 ms frames;
- to the browser: ``DecodedTrack`` takes the same paced mu-law frames the PCMU path sends
  (``MuLawTrack``, whose queue and counters stay the ones the stream fills) and gives aiortc
  linear audio to encode with the negotiated codec.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections.abc import Callable
from typing import Final

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from mobile_bridge.media import g711
from mobile_bridge.media.pcmu import FRAME_SAMPLES, SAMPLE_RATE, MuLawTrack

log = logging.getLogger(__name__)

TIME_BASE: Final = fractions.Fraction(1, SAMPLE_RATE)


def negotiated_pcmu(sdp: str) -> bool:
    """Whether the audio line of an SDP answer puts PCMU (payload type 0) first: the codec
    the two sides will send."""
    for line in sdp.splitlines():
        if line.startswith("m=audio "):
            formats = line.split()[3:]
            return bool(formats) and formats[0] == "0"
    return False


class DecodedTrack(MediaStreamTrack):
    """``source``'s paced mu-law frames as linear audio, for aiortc to encode."""

    kind = "audio"

    def __init__(self, source: MuLawTrack) -> None:
        super().__init__()
        self._source = source

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        packet = await self._source.recv()
        samples = g711.decode(bytes(packet))
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = packet.pts
        frame.time_base = TIME_BASE
        return frame

    def stop(self) -> None:
        super().stop()
        self._source.stop()


async def pump_to_phone(track: MediaStreamTrack, sink: Callable[[bytes], None]) -> None:
    """Until ``track`` ends: its decoded audio as 20 ms mu-law frames into ``sink``."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    pending = b""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        assert isinstance(frame, AudioFrame)
        for resampled in resampler.resample(frame):
            pending += g711.encode(resampled.to_ndarray().reshape(-1).astype(np.int16))
        while len(pending) >= FRAME_SAMPLES:
            sink(pending[:FRAME_SAMPLES])
            pending = pending[FRAME_SAMPLES:]


def start_pump(track: MediaStreamTrack, sink: Callable[[bytes], None]) -> asyncio.Task[None]:
    task = asyncio.create_task(pump_to_phone(track, sink), name="media-transcode")
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("transcoding stopped", exc_info=task.exception())
