"""mu-law through aiortc untouched (mobile_bridge/media/pcmu.py): two real aiortc peers on
loopback, one playing the browser (its default offer: Opus first), one the gateway's media
side. The answer must pick PCMU; a 440 Hz tone from the browser arrives at the tap as
mu-law bytes, and a 1 kHz tone pushed into the gateway's track is heard by the browser."""

from __future__ import annotations

import asyncio

from aiortc import RTCPeerConnection
from aiortc.rtp import RtpPacket
from media_peers import RATE, ToneTrack, connect, heard, peers, remote_track
from twilio_sim.audio import FRAME_BYTES, Tone, dominant_frequency

from mobile_bridge.media.pcmu import FRAME_S, MuLawTrack, newer, tap_pcmu

__all__ = ["peers"]  # the fixture, used by name


def audio_line(sdp: str) -> str:
    return next(line for line in sdp.splitlines() if line.startswith("m=audio"))


async def test_the_answer_picks_pcmu_and_the_tap_hears_the_browser(
    peers: tuple[RTCPeerConnection, RTCPeerConnection],
) -> None:
    browser, gateway = peers
    browser.addTrack(ToneTrack(440))
    payloads: list[bytes] = []
    enough: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def sink(payload: bytes) -> None:
        payloads.append(payload)
        if sum(map(len, payloads)) >= RATE and not enough.done():
            enough.set_result(None)

    offer, answer = await connect(browser, gateway, MuLawTrack(), sink)
    assert audio_line(offer).split()[3] != "0", "the browser's own preference is not PCMU"
    assert audio_line(answer).split()[3] == "0", "the answer puts PCMU first"
    await asyncio.wait_for(enough, timeout=15)
    assert all(len(p) == FRAME_BYTES for p in payloads), "20 ms mu-law frames, as sent"
    heard = b"".join(payloads)[-RATE:]
    assert abs(dominant_frequency(heard) - 440) < 10


async def test_mu_law_pushed_in_is_heard_by_the_browser(
    peers: tuple[RTCPeerConnection, RTCPeerConnection],
) -> None:
    browser, gateway = peers
    browser.addTransceiver("audio", direction="recvonly")
    remote = remote_track(browser)
    outgoing = MuLawTrack()
    await connect(browser, gateway, outgoing, lambda payload: None)
    track = await asyncio.wait_for(remote, timeout=15)

    tone = Tone(1000)

    async def phone() -> None:
        # The phone's side of the bridge: a frame every 20 ms, as a Media Stream sends them.
        for index in range(10_000):
            outgoing.push(tone.frame(index))
            await asyncio.sleep(FRAME_S)

    speaking = asyncio.create_task(phone())
    try:
        peak = await asyncio.wait_for(heard(track, 2.0), timeout=15)
    finally:
        speaking.cancel()
    assert abs(peak - 1000) < 10
    assert outgoing.dropped == 0


async def test_the_track_queue_is_bounded_and_drops_the_oldest() -> None:
    track = MuLawTrack(max_frames=3)
    frames = [bytes([i]) * FRAME_BYTES for i in range(5)]
    track.push(b"".join(frames[:4]) + frames[4][:100])  # 4 whole frames and a part
    assert track.queued == 3 and track.dropped == 1
    track.push(frames[4][100:])
    assert track.dropped == 2
    sent = [bytes(await track.recv()) for _ in range(3)]
    assert sent == frames[2:5], "the oldest went first; the part was completed"
    now = [0.0]
    quiet = MuLawTrack(clock=lambda: now[0])
    assert bytes(await quiet.recv()) == b"\xff" * FRAME_BYTES and quiet.underruns == 0
    quiet.push(frames[0])
    now[0] = 1.0  # far behind its clock: no waiting
    await quiet.recv()
    await quiet.recv()
    assert quiet.underruns == 1, "silence after audio began is a gap"


async def test_a_queue_left_deep_by_a_burst_shrinks_back() -> None:
    """A burst leaves four frames queued; frames then come one per frame sent, so the queue
    never runs dry and its depth is only delay: it gives a frame back each second down to
    one spare frame, and no further."""
    now = [100.0]

    def clock() -> float:
        now[0] += 0.03  # a little faster than it sends: it never waits
        return now[0]

    track = MuLawTrack(clock=clock)
    await track.recv()
    track.push(b"\x01" * FRAME_BYTES * 4)  # the burst
    depths = []
    for _ in range(5 * 50):
        track.push(b"\x02" * FRAME_BYTES)
        await track.recv()
        depths.append(track.queued)
    assert depths[0] == 4 and track.shrinks == 3 and depths[-1] == 1
    assert track.underruns == 0, "no gap: the steady frames kept it fed"
    for _ in range(3 * 50):
        track.push(b"\x02" * FRAME_BYTES)
        await track.recv()
    assert track.shrinks == 3, "one spare frame is kept"


def test_sequence_numbers_compare_across_the_wrap() -> None:
    assert newer(1, 0) and newer(0, 65535) and newer(10, 65530)
    assert not newer(0, 1) and not newer(5, 5) and not newer(65530, 10)


async def test_the_tap_passes_pcmu_in_order_per_source_and_the_rest_to_aiortc() -> None:
    class Receiver:
        def __init__(self) -> None:
            self.aiortc: list[RtpPacket] = []

        async def _handle_rtp_packet(self, packet: RtpPacket, arrival_time_ms: int) -> None:
            self.aiortc.append(packet)

    receiver = Receiver()
    tapped: list[bytes] = []
    tap_pcmu(receiver, tapped.append)  # type: ignore[arg-type]

    def rtp(seq: int, ssrc: int = 1, pt: int = 0) -> RtpPacket:
        return RtpPacket(payload_type=pt, sequence_number=seq, ssrc=ssrc, payload=b"%d" % seq)

    for packet in (rtp(65535), rtp(0), rtp(65534), rtp(0), rtp(2), rtp(7, ssrc=2), rtp(3, pt=101)):
        await receiver._handle_rtp_packet(packet, 0)
    assert tapped == [b"65535", b"0", b"2", b"7"], "late and repeated dropped, a new source kept"
    assert [p.payload_type for p in receiver.aiortc] == [101], "a DTMF event goes to aiortc"
