"""Real aiortc peers on loopback for the audio bridge's tests: the browser's side."""

from __future__ import annotations

import asyncio
import fractions
from collections.abc import AsyncIterator

import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack
from av import AudioFrame
from twilio_sim.audio import tone_pcm

from mobile_bridge.media.pcmu import MuLawTrack, PayloadSink, bridge_transceiver

RATE = 8000


class ToneTrack(AudioStreamTrack):
    """The browser's microphone: a tone (looped every 10 s), 20 ms frames in real time."""

    def __init__(self, hz: float) -> None:
        super().__init__()
        self._pcm = tone_pcm(hz, 10.0)
        self._at = 0

    async def recv(self) -> AudioFrame:
        silent = await super().recv()  # paces the frames
        assert isinstance(silent, AudioFrame)
        samples = silent.samples
        if self._at + samples > self._pcm.size:
            self._at = 0  # round again: a whole number of periods, so no click
        chunk = self._pcm[self._at : self._at + samples]
        self._at += samples
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = silent.pts
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


@pytest.fixture
async def peers() -> AsyncIterator[tuple[RTCPeerConnection, RTCPeerConnection]]:
    config = RTCConfiguration(iceServers=[])  # loopback only: no STUN server is reachable
    browser, gateway = RTCPeerConnection(config), RTCPeerConnection(config)
    yield browser, gateway
    await browser.close()
    await gateway.close()


async def connect(
    browser: RTCPeerConnection, gateway: RTCPeerConnection, outgoing: MuLawTrack, sink: PayloadSink
) -> tuple[str, str]:
    """The browser offers; the gateway answers with its bridge transceiver. Both SDPs."""
    bridge_transceiver(gateway, outgoing, sink)
    await browser.setLocalDescription(await browser.createOffer())
    offer = browser.localDescription
    await gateway.setRemoteDescription(offer)
    await gateway.setLocalDescription(await gateway.createAnswer())
    answer = gateway.localDescription
    await browser.setRemoteDescription(answer)
    assert len(gateway.getTransceivers()) == 1, "the offer's audio took the bridge's"
    return offer.sdp, answer.sdp


def remote_track(pc: RTCPeerConnection) -> asyncio.Future[MediaStreamTrack]:
    """The first track ``pc`` receives."""
    found: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if not found.done():
            found.set_result(track)

    return found


async def heard(track: MediaStreamTrack, seconds: float) -> float:
    """The strongest frequency (Hz) in the last second of ``seconds`` of ``track``'s audio
    (PCMU arrives as 8 kHz mono, Opus as 48 kHz stereo: the first channel is judged)."""
    samples: list[np.ndarray] = []
    rate = RATE
    while sum(s.size for s in samples) < seconds * rate:
        frame = await track.recv()
        assert isinstance(frame, AudioFrame)
        rate = frame.sample_rate
        channels = len(frame.layout.channels)
        samples.append(frame.to_ndarray().reshape(-1, channels)[:, 0])
    pcm = np.concatenate(samples)[-rate:].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(pcm.size)))
    spectrum[0] = 0.0
    return float(np.fft.rfftfreq(pcm.size, d=1.0 / rate)[int(np.argmax(spectrum))])
