"""A phone's Twilio Media Stream joined to a browser's WebRTC (mobile_bridge/media/): the
Twilio simulator calls a phone whose TwiML is ``<Connect><Stream>`` to a loopback websocket
served with ``PhoneStream``, and a real aiortc peer plays the browser. A 1 kHz tone from the
phone is heard by the browser, and a 440 Hz tone from the browser by the phone, both told
by their frequency; the phone's key press arrives as a digit; hanging up ends the stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiortc import RTCPeerConnection
from media_peers import RATE, ToneTrack, connect, heard, peers, remote_track
from twilio_sim import TwilioSim, sdk_client
from twilio_sim.audio import dominant_frequency

from mobile_bridge.media.pcmu import MuLawTrack
from mobile_bridge.media.stream import PhoneStream, StreamEnd

__all__ = ["peers"]  # the fixture, used by name

PHONE = "+15551230042"
CALLER_ID = "+15005550006"


@dataclass
class StreamApp:
    """What the gateway's media side will be: TwiML that connects the call to a stream,
    and the stream's websocket bridged to the browser's track."""

    to_browser: MuLawTrack
    streams: list[PhoneStream] = field(default_factory=list)
    ended: asyncio.Queue[StreamEnd] = field(default_factory=asyncio.Queue)
    digits: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    url: str = ""

    async def twiml(self, request: web.Request) -> web.Response:
        ws_url = self.url.replace("http://", "ws://") + "/media"
        body = (
            f'<Response><Connect><Stream url="{ws_url}">'
            '<Parameter name="call" value="c_test"/></Stream></Connect></Response>'
        )
        return web.Response(text=body, content_type="text/xml")

    async def media(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        stream = PhoneStream(ws, self.to_browser, on_digit=self.digits.put_nowait)
        self.streams.append(stream)
        await self.ended.put(await stream.run())
        return ws

    def to_phone(self, payload: bytes) -> None:
        if self.streams:
            self.streams[-1].to_phone(payload)


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    async with TwilioSim() as sim:
        yield sim
        assert sim.contract_violations == []


@pytest.fixture
async def client(sim: TwilioSim) -> AsyncIterator[Any]:
    async with sdk_client(sim) as client:
        yield client


async def serve(app: StreamApp) -> web.AppRunner:
    web_app = web.Application()
    web_app.router.add_post("/twiml", app.twiml)
    web_app.router.add_get("/media", app.media)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    app.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return runner


async def test_a_phone_and_a_browser_hear_each_other_through_the_stream(
    sim: TwilioSim, client: Any, peers: tuple[RTCPeerConnection, RTCPeerConnection]
) -> None:
    browser, gateway = peers
    browser.addTrack(ToneTrack(440))
    hearing = remote_track(browser)
    app = StreamApp(MuLawTrack())
    await connect(browser, gateway, app.to_browser, app.to_phone)
    runner = await serve(app)
    try:
        sim.phone(PHONE, answer_after=0.2, tone_hz=1000)
        call = await client.calls.create_async(to=PHONE, from_=CALLER_ID, url=app.url + "/twiml")

        browser_track = await asyncio.wait_for(hearing, timeout=15)
        assert abs(await asyncio.wait_for(heard(browser_track, 2.0), 15) - 1000) < 10

        record = sim.call(call.sid)

        def phone_heard_a_second() -> bool:
            stream = record.stream
            return stream is not None and len(stream.audio_played) >= 2 * RATE

        await sim.wait_until(phone_heard_a_second, timeout=15, what="a second at the phone")
        assert record.stream is not None
        played = bytes(record.stream.audio_played)[-RATE:]
        assert abs(dominant_frequency(played) - 440) < 10
        (stream,) = app.streams
        assert stream.call_sid == call.sid and stream.parameters == {"call": "c_test"}
        assert stream.malformed == 0 and record.stream.errors == []

        sim.send_dtmf(call.sid, "5")
        assert await asyncio.wait_for(app.digits.get(), timeout=5) == "5"

        sim.hangup(call.sid)
        assert await asyncio.wait_for(app.ended.get(), timeout=10) is StreamEnd.STOPPED
    finally:
        await runner.cleanup()
