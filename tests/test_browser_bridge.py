"""The audio bridge in a real browser: the demo site's widget, in Debian's Chromium (driven by
Playwright), calls Anna, who is only on her phone. Two gateway nodes on one Redis, each with
a media worker; the phone is the Twilio simulator, which presses 1 at the whisper, plays a
1 kHz tone and records what it hears. The widget's fake microphone plays a 440 Hz tone (a
WAV file); each tone is found by frequency at the other end."""

from __future__ import annotations

import math
import signal
import struct
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import Node, NodeFactory, eventually, free_port, make_settings, mint, replace
from playwright.async_api import Page, async_playwright, expect
from test_browser_e2e import (
    AGENT_PC,
    CHROMIUM,
    CHROMIUM_ARGS,
    HAVE_CHROMIUM,
    MEDIA_WAIT_MS,
    WAIT_MS,
    WIDGET_PC,
    Browsers,
    agent_signed_in,
    audio_flows,
    membrane_state,
    no_errors,
    phones,
    widget_says,
)
from test_callbacks import (
    ANNA_PHONE,
    VISITOR_PHONE,
    request_callback,
    ticket_state,
    without_quiet_hours_now,
)
from test_mobile_ring import on_mobile, status_of
from test_phone_bridge import media_of
from twilio_sim import CallRecord, TwilioSim
from twilio_sim.audio import dominant_frequency, dtmf_keys_ulaw, rms

from gateway.settings import MediaSettings, TwilioSettings
from mobile_bridge.media.dtmf import HOLD_HZ

__all__ = ["phones"]  # the fixture, used by name

pytestmark = pytest.mark.skipif(
    not HAVE_CHROMIUM and not __import__("os").environ.get("CI"),
    reason=f"browser tests need Debian's Chromium at {CHROMIUM}",
)

PHONE_RATE = 8000

# Set up once in the page: an analyser on the incoming audio of the peer connection `pc`.
LISTEN_JS = """(which) => {
  const pc = which === "agent" ? window.MembraneAgent.pc : window.Membrane._pc;
  const ctx = new AudioContext();
  const source = ctx.createMediaStreamSource(new MediaStream([pc.getReceivers()[0].track]));
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 8192;
  source.connect(analyser);
  window.__listen = { ctx, analyser };
}"""
# Polled: the strongest frequency heard, once it is within 15 Hz of `hz` (else false).
HEARS_JS = """(hz) => {
  const { ctx, analyser } = window.__listen;
  const bins = new Float32Array(analyser.frequencyBinCount);
  analyser.getFloatFrequencyData(bins);
  let best = 1;
  for (let i = 2; i < bins.length; i++) if (bins[i] > bins[best]) best = i;
  const heard = (best * ctx.sampleRate) / analyser.fftSize;
  return Math.abs(heard - hz) < 15 ? heard : false;
}"""


# As the network failing under the call: ICE says "failed", and the page restarts it. The
# ICE username fragment of the answer it had is returned.
FAIL_ICE_JS = """(which) => {
  const pc = which === "agent" ? window.MembraneAgent.pc : window.Membrane._pc;
  const before = pc.remoteDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1];
  Object.defineProperty(pc, "iceConnectionState", { get: () => "failed", configurable: true });
  pc.dispatchEvent(new Event("iceconnectionstatechange"));
  delete pc.iceConnectionState;
  return before;
}"""
UFRAG_JS = """(which) => {
  const pc = which === "agent" ? window.MembraneAgent.pc : window.Membrane._pc;
  return pc.remoteDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1];
}"""
# Polled: a new remote description (other ICE credentials), and ICE connected over it.
RESTARTED_JS = """([which, before]) => {
  const pc = which === "agent" ? window.MembraneAgent.pc : window.Membrane._pc;
  const now = pc.remoteDescription && pc.remoteDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1];
  return pc.signalingState === "stable" && now !== before
    && ["connected", "completed"].includes(pc.iceConnectionState);
}"""


async def ice_restarts(page: Page, which: str = "widget") -> None:
    """The network fails under the call: the page restarts ICE and reconnects, over the
    media worker's fresh peer connection."""
    before = await page.evaluate(FAIL_ICE_JS, which)
    await page.wait_for_function(RESTARTED_JS, arg=[which, before], polling=100, timeout=WAIT_MS)


async def worker_dies(page: Page, a: Node, b: Node, which: str = "widget") -> None:
    """SIGKILL the media worker holding the page's call; told so, the page restarts ICE and
    offers to the call's new session, and once it has its answer (other ICE credentials),
    ICE is connected again."""
    (worker,) = [w for n in (a, b) for w in media_of(n).workers if w.sessions]
    before = await page.evaluate(UFRAG_JS, which)
    worker.process.send_signal(signal.SIGKILL)
    # A node of one worker moves the call to the worker it starts in place of the dead one.
    await page.wait_for_function(
        RESTARTED_JS, arg=[which, before], polling=100, timeout=MEDIA_WAIT_MS
    )


def tone_wav(path: Path, hz: float, seconds: float = 5.0, rate: int = 48000) -> Path:
    """A microphone for Chromium's fake capture (``--use-file-for-fake-audio-capture``)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        n = int(seconds * rate)
        w.writeframes(
            b"".join(
                struct.pack("<h", int(12000 * math.sin(2 * math.pi * hz * i / rate)))
                for i in range(n)
            )
        )
    return path


@pytest.fixture
async def gateway(
    nodes: NodeFactory, redis_url: str, tmp_path: Path, phones: TwilioSim
) -> tuple[Node, Node]:
    """Nodes A (the demo site) and B, each with a media worker."""
    port_a, port_b = free_port(), free_port()
    twilio = TwilioSettings(phones.account_sid, phones.auth_token, phones.base_url)
    base = make_settings(
        tmp_path, redis_url=redis_url, port=port_a, twilio=twilio, media=MediaSettings(workers=1)
    )
    origins = (f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}")
    acme = base.sites["acme"]
    acme = replace(acme, allowed_origins=(*acme.allowed_origins, *origins), ring_timeout_s=6.0)
    settings = without_quiet_hours_now(replace(base, sites={**base.sites, "acme": acme}))
    a = await nodes(replace(settings, node_id="node-a", public_url=origins[0]))
    b = await nodes(replace(settings, node_id="node-b", port=port_b, public_url=origins[1]))
    return a, b


@pytest.fixture
async def browsers(gateway: tuple[Node, Node], tmp_path: Path) -> AsyncIterator[Browsers]:
    """Chromium whose fake microphone says 440 Hz; pages close before the nodes stop."""
    if not HAVE_CHROMIUM:
        pytest.fail(f"CI is set but {CHROMIUM} is missing: install Debian's chromium")
    mic = tone_wav(tmp_path / "mic-440.wav", 440)
    args = [*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={mic}"]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        b = Browsers(browser)
        try:
            yield b
        finally:
            await b.close()


async def hears(page: Page, hz: float, which: str = "widget") -> float:
    await page.evaluate(LISTEN_JS, which)
    found = await page.wait_for_function(HEARS_JS, arg=hz, polling=100, timeout=MEDIA_WAIT_MS)
    heard: float = await found.json_value()
    return heard


def heard_so_far(leg: CallRecord) -> int:
    return len(leg.stream.audio_played) if leg.stream is not None else 0


async def phone_hears(
    phones: TwilioSim, leg: CallRecord, since: int, samples: int, what: str
) -> bytes:
    """Once the phone of ``leg`` has heard ``samples`` more since ``since``: all it heard."""

    def enough() -> bool:
        return leg.stream is not None and len(leg.stream.audio_played) - since >= samples

    await phones.wait_until(enough, timeout=20, what=what)
    assert leg.stream is not None
    return bytes(leg.stream.audio_played)


async def test_the_widget_calls_an_agent_only_on_her_phone_and_they_hear_each_other(
    gateway: tuple[Node, Node],
    browsers: Browsers,
    phones: TwilioSim,
    http: aiohttp.ClientSession,
) -> None:
    a, b = gateway
    phones.phone(ANNA_PHONE, answer_after=1, press="1", tone_hz=1000)
    await on_mobile(http, b, "anna")

    visitor = await browsers.open("visitor", f"{a.url}/demo/")
    button = visitor.get_by_test_id("membrane-button")
    await expect(button).to_have_text("Talk to us now", timeout=WAIT_MS)
    avail = (await membrane_state(visitor))["availability"]
    assert avail["available"] and "webrtc" in avail["channels"], avail

    await button.click()
    await widget_says(visitor, "Ringing Anna in Dublin…")
    assert await visitor.evaluate("() => Membrane._ringback()"), "no ringback while ringing"
    await widget_says(visitor, "Connected with Anna")
    assert not await visitor.evaluate("() => Membrane._ringback()")

    await audio_flows(visitor, WIDGET_PC)
    assert abs(await hears(visitor, 1000) - 1000) < 15
    leg = next(c for c in phones.calls if c.to == ANNA_PHONE)

    played = await phone_hears(phones, leg, 0, 2 * PHONE_RATE, "audio at Anna's phone")
    heard = dominant_frequency(played[-PHONE_RATE:])
    assert abs(heard - 440) < 10, heard
    assert await status_of(http, a, "anna") == "on_call"

    # The visitor's network fails: the widget restarts ICE, and they hear each other again.
    await ice_restarts(visitor)
    assert abs(await hears(visitor, 1000) - 1000) < 15
    played = await phone_hears(phones, leg, heard_so_far(leg), PHONE_RATE, "Anna after it")
    assert abs(dominant_frequency(played[-PHONE_RATE // 2 :]) - 440) < 10

    # The media worker dies: the call moves, the widget answers the new session's offer.
    await worker_dies(visitor, a, b)
    assert abs(await hears(visitor, 1000) - 1000) < 15
    played = await phone_hears(phones, leg, heard_so_far(leg), PHONE_RATE, "Anna after that")
    assert abs(dominant_frequency(played[-PHONE_RATE // 2 :]) - 440) < 10
    assert len(leg.streams) == 2

    # Anna presses star: the widget says the visitor is on hold; star again, back.
    phones.send_dtmf(leg.sid, "*")
    await widget_says(visitor, "Anna put you on hold. Please stay on the line.")
    phones.send_dtmf(leg.sid, "*")
    await widget_says(visitor, "Connected with Anna")

    await visitor.get_by_test_id("membrane-hangup").click()
    await widget_says(visitor, "Call ended")
    await phones.wait_for_call(sid=leg.sid, status="completed", timeout=10)

    async def free() -> bool:
        return all([await status_of(http, n, "anna") == "available" for n in (a, b)])

    await eventually(free, 10)
    no_errors(browsers)


async def test_an_agent_in_the_app_takes_a_callback_and_talks_to_the_customers_phone(
    gateway: tuple[Node, Node],
    browsers: Browsers,
    phones: TwilioSim,
    http: aiohttp.ClientSession,
) -> None:
    """Carla, who has no mobile number, accepts a callback in the agent app and talks to the
    customer's phone there: her fake microphone's 440 Hz at the phone, its 1 kHz in her page."""
    a, b = gateway
    phones.phone(VISITOR_PHONE, answer_after=1, tone_hz=1000)
    carla = await browsers.open("carla", f"{b.url}/agent/#token={mint(b.settings, 'carla')}")
    await agent_signed_in(carla)
    status, created = await request_callback(http, a, {"phone": VISITOR_PHONE})
    assert status == 201, created

    ring = carla.get_by_test_id("agent-ring")
    await expect(ring).to_be_visible(timeout=WAIT_MS)
    await expect(ring).to_contain_text("Callback request")
    await carla.get_by_test_id("agent-accept").click()
    await expect(carla.get_by_test_id("agent-call-state")).to_have_text(
        "connected", timeout=WAIT_MS
    )
    await audio_flows(carla, AGENT_PC)
    assert abs(await hears(carla, 1000, "agent") - 1000) < 15
    leg = next(c for c in phones.calls if c.to == VISITOR_PHONE)

    played = await phone_hears(phones, leg, 0, 2 * PHONE_RATE, "audio at the phone")
    heard = dominant_frequency(played[-PHONE_RATE:])
    assert abs(heard - 440) < 10, heard
    assert [c.to for c in phones.calls] == [VISITOR_PHONE], "no agent phone was called"

    # Carla's network fails: the app restarts ICE (the worker cannot), and the call goes on.
    await ice_restarts(carla, "agent")
    assert abs(await hears(carla, 1000, "agent") - 1000) < 15
    played = await phone_hears(phones, leg, heard_so_far(leg), PHONE_RATE, "Carla after it")
    assert abs(dominant_frequency(played[-PHONE_RATE // 2 :]) - 440) < 10

    # The media worker dies: the call moves, the app answers the new session's offer.
    await worker_dies(carla, a, b, "agent")
    assert abs(await hears(carla, 1000, "agent") - 1000) < 15
    played = await phone_hears(phones, leg, heard_so_far(leg), PHONE_RATE, "Carla after that")
    assert abs(dominant_frequency(played[-PHONE_RATE // 2 :]) - 440) < 10
    await expect(carla.get_by_test_id("agent-mute")).to_be_visible()

    # The keypad: Chromium sends RFC 4733 events; the phone hears the key's two tones.
    keypad = carla.get_by_test_id("agent-keypad")
    await expect(keypad).to_be_visible()
    await keypad.get_by_role("button", name="5", exact=True).click()

    def phone_heard_5() -> bool:
        return leg.stream is not None and "5" in dtmf_keys_ulaw(bytes(leg.stream.audio_played))

    await phones.wait_until(phone_heard_5, timeout=10, what="the key 5 at the phone")

    # The customer keys in a number: Carla's app shows the digits as they come.
    for key in "42#":
        phones.send_dtmf(leg.sid, key)
    await expect(carla.get_by_test_id("agent-caller-keys")).to_have_text(
        "Caller pressed: 42#", timeout=WAIT_MS
    )

    # Hold: the phone hears the hold tone, not Carla; Resume brings her back.
    hold = carla.get_by_test_id("agent-hold")
    held_from = heard_so_far(leg)
    await hold.click()
    await expect(hold).to_have_text("Resume")
    # Silence is not sent: the next 200 ms the phone hears are the hold tone's beep.
    played = await phone_hears(phones, leg, held_from, 1600, "the hold tone")
    assert abs(dominant_frequency(played[-1200:]) - HOLD_HZ) < 10
    await hold.click()
    await expect(hold).to_have_text("Hold")
    played = await phone_hears(phones, leg, heard_so_far(leg), 4000, "Carla after the hold")
    assert abs(dominant_frequency(played[-2000:]) - 440) < 10

    # Mute: her microphone's track is off, and the phone hears silence.
    mute = carla.get_by_test_id("agent-mute")
    await mute.click()
    await expect(mute).to_have_text("Unmute")
    played = await phone_hears(phones, leg, heard_so_far(leg), PHONE_RATE, "a second of mute")
    assert rms(played[-4000:]) < 100, "the phone still hears Carla"
    await mute.click()
    await expect(mute).to_have_text("Mute")

    await carla.get_by_test_id("agent-hangup").click()
    await expect(carla.get_by_test_id("agent-call-state")).to_have_text("completed")
    await phones.wait_for_call(sid=leg.sid, status="completed", timeout=10)
    done = await ticket_state(http, a, created, "completed")
    assert done["reason"] == "agent_hung_up"
    await agent_signed_in(carla, "available")
    no_errors(browsers)
