"""The media worker (mobile_bridge/media/worker.py) on loopback, as a gateway node would use
it: a browser's offer in over HTTP, the answer back with PCMU first, then the call's Twilio
Media Stream (the simulator, through the real SDK) to the session's websocket. Tones are
heard both ways; a forged stream, a wrong token, a bad offer and a full worker are refused
with their codes; hanging up ends the session."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from media_peers import RATE, ToneTrack, heard, peers, remote_track
from twilio.request_validator import RequestValidator
from twilio_sim import TwilioSim, sdk_client
from twilio_sim.audio import dominant_frequency

from mobile_bridge.media.api import SESSIONS
from mobile_bridge.media.stream import StreamEnd
from mobile_bridge.media.worker import MediaWorker, ice_ufrag

__all__ = ["peers"]  # the fixture, used by name

TOKEN = "media-worker-test-token-0123456789abcdef"
PHONE = "+15551230077"


class Running:
    def __init__(self, worker: MediaWorker, url: str, http: aiohttp.ClientSession) -> None:
        self.worker, self.url, self.http = worker, url, http
        self.ended: asyncio.Queue[tuple[str, StreamEnd | None]] = asyncio.Queue()
        self.keys: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def offer(self, sdp: str, token: str = TOKEN) -> tuple[int, dict[str, Any]]:
        r = await self.http.post(
            self.url + SESSIONS, json={"offer": sdp}, headers={"Authorization": f"Bearer {token}"}
        )
        return r.status, await r.json()

    async def offer_again(self, session: str, sdp: str) -> tuple[int, dict[str, Any]]:
        r = await self.http.post(
            f"{self.url}{SESSIONS}/{session}/offer",
            json={"offer": sdp},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        return r.status, await r.json()

    async def stats(self) -> dict[str, Any]:
        r = await self.http.get(
            self.url + "/v1/media/stats", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    async with TwilioSim() as sim:
        yield sim
        assert sim.contract_violations == []


@pytest.fixture
async def client(sim: TwilioSim) -> AsyncIterator[Any]:
    async with sdk_client(sim) as client:
        yield client


async def start(sim: TwilioSim, max_sessions: int = 50) -> tuple[Running, web.AppRunner]:
    """The worker on a free port; its public websocket URL is where it listens."""
    runner_holder: dict[str, Any] = {}

    def on_end(session: str, how: StreamEnd | None) -> None:
        runner_holder["running"].ended.put_nowait((session, how))

    # The public URL names the port, known once bound: bind the socket first.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    worker = MediaWorker(
        api_token=TOKEN,
        twilio_auth_token=sim.auth_token,
        public_ws_url=f"ws://127.0.0.1:{port}",
        max_sessions=max_sessions,
        on_end=on_end,
        on_key=lambda session, key: runner_holder["running"].keys.put_nowait((session, key)),
    )
    runner = web.AppRunner(worker.app(), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    http = aiohttp.ClientSession()
    running = Running(worker, f"http://127.0.0.1:{port}", http)
    runner_holder["running"] = running
    return running, runner


async def twiml_server(stream_url: str) -> tuple[str, web.AppRunner]:
    """What the gateway will serve Twilio for the call: connect it to the session's stream."""

    async def twiml(request: web.Request) -> web.Response:
        body = f'<Response><Connect><Stream url="{stream_url}"/></Connect></Response>'
        return web.Response(text=body, content_type="text/xml")

    app = web.Application()
    app.router.add_post("/twiml", twiml)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}/twiml", runner


@pytest.mark.parametrize("codec", ["audio/PCMU", "audio/opus"])
async def test_a_browser_and_a_phone_talk_through_the_worker(
    sim: TwilioSim, client: Any, peers: tuple[RTCPeerConnection, RTCPeerConnection], codec: str
) -> None:
    """PCMU passes through; a browser that offers only Opus gets a transcoded call."""
    browser, _ = peers
    running, runner = await start(sim)
    twiml_runner: web.AppRunner | None = None
    try:
        sending = browser.addTransceiver(ToneTrack(440), direction="sendrecv")
        capabilities = RTCRtpSender.getCapabilities("audio")
        assert capabilities is not None
        sending.setCodecPreferences([c for c in capabilities.codecs if c.mimeType == codec])
        hearing = remote_track(browser)
        await browser.setLocalDescription(await browser.createOffer())
        status, created = await running.offer(browser.localDescription.sdp)
        assert status == 201, created
        media_line = next(ln for ln in created["answer"].splitlines() if ln.startswith("m="))
        assert media_line.split()[3] == ("0" if codec == "audio/PCMU" else "96"), media_line
        await browser.setRemoteDescription(RTCSessionDescription(created["answer"], "answer"))

        stream_url = running.url.replace("http://", "ws://") + created["stream_path"]
        twiml_url, twiml_runner = await twiml_server(stream_url)
        sim.phone(PHONE, answer_after=0.2, tone_hz=1000)
        call = await client.calls.create_async(to=PHONE, from_="+15005550006", url=twiml_url)

        track = await asyncio.wait_for(hearing, timeout=15)
        assert abs(await asyncio.wait_for(heard(track, 2.0), 15) - 1000) < 10
        record = sim.call(call.sid)

        def phone_heard_a_second() -> bool:
            return record.stream is not None and len(record.stream.audio_played) >= 2 * RATE

        await sim.wait_until(phone_heard_a_second, timeout=15, what="a second at the phone")
        assert record.stream is not None
        assert abs(dominant_frequency(bytes(record.stream.audio_played)[-RATE:]) - 440) < 10
        stats = await running.stats()
        session = stats["calls"][created["session"]]
        assert stats["sessions"] == 1 and session["streaming"]
        assert session["transcoding"] is (codec != "audio/PCMU")

        sim.hangup(call.sid)
        ended = await asyncio.wait_for(running.ended.get(), timeout=10)
        assert ended == (created["session"], StreamEnd.STOPPED)
        assert (await running.stats())["sessions"] == 0
    finally:
        await running.http.close()
        if twiml_runner is not None:
            await twiml_runner.cleanup()
        await runner.cleanup()


def pinned(pc: RTCPeerConnection, hz: float, codec: str) -> None:
    """``pc`` sends a ``hz`` tone, offering only ``codec``."""
    sending = pc.addTransceiver(ToneTrack(hz), direction="sendrecv")
    capabilities = RTCRtpSender.getCapabilities("audio")
    assert capabilities is not None
    sending.setCodecPreferences([c for c in capabilities.codecs if c.mimeType == codec])


@pytest.mark.parametrize("codec", ["audio/PCMU", "audio/opus"])
async def test_a_browser_renegotiates_in_place_and_restarts_ice_on_a_new_peer_connection(
    sim: TwilioSim, client: Any, peers: tuple[RTCPeerConnection, RTCPeerConnection], codec: str
) -> None:
    """A later offer with the same ICE credentials is answered on the same peer connection;
    one with new credentials (a browser whose network changed: here a new peer connection
    sending another tone) is answered by a fresh one, and the call's audio goes on both ways
    over it, transcoded or not as before. A broken offer then changes nothing."""
    browser, restarted = peers
    running, runner = await start(sim)
    twiml_runner: web.AppRunner | None = None
    try:
        pinned(browser, 440, codec)
        hearing = remote_track(browser)
        await browser.setLocalDescription(await browser.createOffer())
        status, created = await running.offer(browser.localDescription.sdp)
        assert status == 201, created
        await browser.setRemoteDescription(RTCSessionDescription(created["answer"], "answer"))
        stream_url = running.url.replace("http://", "ws://") + created["stream_path"]
        twiml_url, twiml_runner = await twiml_server(stream_url)
        sim.phone(PHONE, answer_after=0.2, tone_hz=1000)
        call = await client.calls.create_async(to=PHONE, from_="+15005550006", url=twiml_url)
        record = sim.call(call.sid)
        track = await asyncio.wait_for(hearing, timeout=15)
        assert abs(await asyncio.wait_for(heard(track, 1.0), 15) - 1000) < 10
        session = created["session"]

        # The same credentials: answered in place, with the same ICE credentials back.
        await browser.setLocalDescription(await browser.createOffer())
        status, again = await running.offer_again(session, browser.localDescription.sdp)
        assert status == 200, again
        assert ice_ufrag(again["answer"]) == ice_ufrag(created["answer"])
        await browser.setRemoteDescription(RTCSessionDescription(again["answer"], "answer"))
        assert abs(await asyncio.wait_for(heard(track, 1.0), 15) - 1000) < 10

        # New credentials: a fresh peer connection answers, and the call goes on over it.
        pinned(restarted, 880, codec)
        hearing_again = remote_track(restarted)
        await restarted.setLocalDescription(await restarted.createOffer())
        status, moved = await running.offer_again(session, restarted.localDescription.sdp)
        assert status == 200, moved
        assert ice_ufrag(moved["answer"]) != ice_ufrag(created["answer"])
        await restarted.setRemoteDescription(RTCSessionDescription(moved["answer"], "answer"))
        await browser.close()
        new_track = await asyncio.wait_for(hearing_again, timeout=15)
        assert abs(await asyncio.wait_for(heard(new_track, 1.0), 15) - 1000) < 10

        def phone_hears_880() -> bool:
            if record.stream is None or len(record.stream.audio_played) < RATE:
                return False
            return abs(dominant_frequency(bytes(record.stream.audio_played)[-RATE:]) - 880) < 10

        await sim.wait_until(phone_hears_880, timeout=15, what="the new tone at the phone")
        stats = (await running.stats())["calls"][session]
        assert stats["renegotiations"] == 2 and stats["streaming"]
        assert stats["transcoding"] is (codec != "audio/PCMU")

        # Offers it cannot use: refused, and the call goes on as it was.
        sdp = restarted.localDescription.sdp.replace("a=ice-ufrag:", "a=ice-ufrag:x")
        no_fingerprint = sdp.replace("a=fingerprint:", "a=fingerprint-x:")
        no_codec = "\r\n".join(
            "m=audio 9 UDP/TLS/RTP/SAVPF 126" if line.startswith("m=audio") else line
            for line in sdp.split("\r\n")
            if not line.startswith(("a=rtpmap:", "a=fmtp:"))
        )
        for broken in (no_fingerprint, no_codec):
            status, refused = await running.offer_again(session, broken)
            code = "invalid_offer" if broken is no_fingerprint else "renegotiation_refused"
            assert status == 400 and refused["error"]["code"] == code, refused
        assert abs(await asyncio.wait_for(heard(new_track, 1.0), 15) - 1000) < 10
        assert (await running.stats())["sessions"] == 1
        sim.hangup(call.sid)
        assert (await asyncio.wait_for(running.ended.get(), 10))[0] == session
    finally:
        await running.http.close()
        if twiml_runner is not None:
            await twiml_runner.cleanup()
        await runner.cleanup()


async def test_the_worker_refuses_what_is_not_its_gateway_or_twilio(
    sim: TwilioSim, peers: tuple[RTCPeerConnection, RTCPeerConnection]
) -> None:
    browser, _ = peers
    running, runner = await start(sim, max_sessions=1)
    try:
        browser.addTransceiver("audio")
        await browser.setLocalDescription(await browser.createOffer())
        offer = browser.localDescription.sdp

        status, body = await running.offer(offer, token="x" * 40)
        assert (status, body["error"]["code"]) == (401, "invalid_token")
        status, body = await running.offer("v=0\r\nnot an offer")
        assert (status, body["error"]["code"]) == (400, "invalid_offer")
        # Two at once for the one place: answering takes a while, and the second must not
        # slip in meanwhile.
        answers = sorted(await asyncio.gather(running.offer(offer), running.offer(offer)),
                         key=lambda a: a[0])  # fmt: skip
        (status, created), (full, body) = answers
        assert status == 201
        assert (full, body["error"]["code"]) == (503, "media_full")

        stream = running.url + created["stream_path"]
        r = await running.http.get(stream, headers={"X-Twilio-Signature": "forged"})
        assert r.status == 403 and (await r.json())["error"]["code"] == "invalid_signature"
        r = await running.http.get(running.url + SESSIONS + "/m_nope/stream")
        assert r.status == 404
        assert (await running.stats())["sessions"] == 1, "nothing refused changed anything"

        r = await running.http.delete(
            running.url + SESSIONS + "/" + created["session"],
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status == 204
        assert await asyncio.wait_for(running.ended.get(), 5) == (created["session"], None)
        assert (await running.stats())["sessions"] == 0
    finally:
        await running.http.close()
        await runner.cleanup()


async def test_a_stream_survives_garbage_and_ends_on_a_binary_frame(
    sim: TwilioSim, peers: tuple[RTCPeerConnection, RTCPeerConnection]
) -> None:
    """Raw packets on a signed stream: unreadable messages are counted and skipped (a live
    call must not end over a field Twilio adds), and so are keys that are not keys; a real key
    is reported to the gateway; a binary frame (never Twilio's) ends it."""
    browser, _ = peers
    running, runner = await start(sim)
    try:
        browser.addTransceiver("audio")
        await browser.setLocalDescription(await browser.createOffer())
        status, created = await running.offer(browser.localDescription.sdp)
        assert status == 201
        url = running.url.replace("http://", "ws://") + created["stream_path"]
        signature = RequestValidator(sim.auth_token).compute_signature(url, {})
        async with running.http.ws_connect(url, headers={"X-Twilio-Signature": signature}) as ws:
            for garbage in ("not json", "[]", '{"event": "media"}', '{"event": "nope"}'):
                await ws.send_str(garbage)
            await ws.send_str('{"event":"media","sequenceNumber":"2","streamSid":"MZ1",'
                              '"media":{"track":"inbound","chunk":"1","timestamp":"20",'
                              '"payload":"***"}}')  # fmt: skip
            for digit in ("X", "12", "5"):
                await ws.send_str(msgspec.json.encode({
                    "event": "dtmf", "sequenceNumber": "3", "streamSid": "MZ1",
                    "dtmf": {"track": "inbound_track", "digit": digit},
                }).decode())  # fmt: skip
            assert await asyncio.wait_for(running.keys.get(), 5) == (created["session"], "5")
            assert running.keys.empty(), "only a real key is reported"
            (session,) = running.worker.sessions.values()
            stats = await running.stats()
            assert stats["calls"][created["session"]]["streaming"]
            await ws.send_bytes(b"\x00" * 160)
            ended = await asyncio.wait_for(running.ended.get(), timeout=5)
            assert ended == (created["session"], StreamEnd.PROTOCOL)
            assert session.stream is not None and session.stream.malformed == 7
        assert (await running.stats())["sessions"] == 0
    finally:
        await running.http.close()
        await runner.cleanup()
