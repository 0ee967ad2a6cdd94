"""The Twilio simulator, driven through the real ``twilio`` SDK (see tests/twilio_sim/README.md)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from aiohttp import web
from multidict import MultiDict
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from twilio_sim import (
    Contract,
    TwilioSim,
    check_call_resource,
    dominant_frequency,
    sdk_client,
    sdk_signature,
    tone_pcm,
    twilio_signature,
    ulaw_decode,
    ulaw_encode,
)

pytestmark = pytest.mark.timeout(30)

TWILIO_NUMBER = "+15005550006"
RFC2822 = r"^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} \+0000$"
WAIT = 5.0  # real seconds for any single awaited event


# ============================================================================ the test application


@dataclass
class AppRequest:
    path: str
    method: str
    params: MultiDict[str]
    signature_valid: bool

    def get(self, name: str) -> str | None:
        return self.params.get(name)


@dataclass
class MediaSession:
    """The application's side of one Media Streams websocket."""

    ws: web.WebSocketResponse
    signature_valid: bool
    messages: list[dict[str, Any]] = field(default_factory=list)
    inbound: bytearray = field(default_factory=bytearray)
    stream_sid: str = ""
    events: dict[str, asyncio.Event] = field(default_factory=dict)

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(obj))

    async def send_audio(self, ulaw: bytes) -> None:
        payload = base64.b64encode(ulaw).decode()
        await self.send(
            {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
        )

    async def send_mark(self, name: str) -> None:
        await self.send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def of(self, event: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["event"] == event]


MediaBehaviour = Callable[[MediaSession, dict[str, Any]], Awaitable[bool]]


class FakeApp:
    """Serves TwiML, receives webhooks (validating X-Twilio-Signature) and a media websocket."""

    def __init__(self, auth_token: str) -> None:
        self.validator = RequestValidator(auth_token)
        self.twiml: dict[str, str] = {}
        self.requests: list[AppRequest] = []
        self.media_sessions: list[MediaSession] = []
        self.media_behaviour: MediaBehaviour | None = None
        self.base_url = ""
        self.ws_url = ""
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/twiml/{name}", self._twiml)
        app.router.add_route("*", "/cb/{name}", self._callback)
        app.router.add_get("/media", self._media)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/media"

    async def close(self) -> None:
        for s in self.media_sessions:
            await s.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return self.base_url + path

    async def _record(self, request: web.Request) -> AppRequest:
        params: MultiDict[str] = MultiDict()
        if request.method == "POST":
            for k, v in (await request.post()).items():
                if isinstance(v, str):
                    params.add(k, v)
        signature = request.headers.get("X-Twilio-Signature", "")
        url = str(request.url)
        valid = bool(self.validator.validate(url, params, signature))
        if request.method == "GET":
            params = MultiDict(request.query)
        rec = AppRequest(request.path, request.method, params, valid)
        self.requests.append(rec)
        self._changed.set()
        return rec

    async def _twiml(self, request: web.Request) -> web.Response:
        await self._record(request)
        body = self.twiml.get(request.match_info["name"])
        if body is None:
            return web.Response(status=404)
        return web.Response(text=body, content_type="text/xml")

    async def _callback(self, request: web.Request) -> web.Response:
        await self._record(request)
        body = self.twiml.get(request.match_info["name"], "<Response/>")
        return web.Response(text=body, content_type="text/xml")

    async def _media(self, request: web.Request) -> web.WebSocketResponse:
        url = f"ws://{request.host}{request.path_qs}"
        valid = bool(
            self.validator.validate(url, {}, request.headers.get("X-Twilio-Signature", ""))
        )
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = MediaSession(ws=ws, signature_valid=valid)
        self.media_sessions.append(session)
        async for msg in ws:
            obj: dict[str, Any] = json.loads(msg.data)
            session.messages.append(obj)
            session.event(obj["event"]).set()
            if obj["event"] == "start":
                session.stream_sid = obj["streamSid"]
            elif obj["event"] == "media":
                session.inbound.extend(base64.b64decode(obj["media"]["payload"]))
            if self.media_behaviour is not None and not await self.media_behaviour(session, obj):
                break
        return ws

    def of(self, path: str) -> list[AppRequest]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, path: str, count: int = 1, timeout: float = WAIT) -> list[AppRequest]:
        async with asyncio.timeout(timeout):
            while len(self.of(path)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.of(path)


# ============================================================================ fixtures


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    s = TwilioSim(time_scale=0.05)
    await s.start()
    yield s
    await s.close()
    leaked = [
        t for t in asyncio.all_tasks() if t.get_name().startswith("twilio-sim") and not t.done()
    ]
    assert not leaked, f"tasks left running after close(): {leaked}"
    assert not s.contract_violations


@pytest.fixture
async def app(sim: TwilioSim) -> AsyncIterator[FakeApp]:
    a = FakeApp(sim.auth_token)
    await a.start()
    yield a
    await a.close()
    assert all(r.signature_valid for r in a.requests), [
        r for r in a.requests if not r.signature_valid
    ]
    assert all(s.signature_valid for s in a.media_sessions)


@pytest.fixture
async def client(sim: TwilioSim) -> AsyncIterator[Any]:
    async with sdk_client(sim) as c:
        yield c


# ============================================================================ signatures


def test_signature_known_answer_vectors() -> None:
    token = "12345"
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": ["CA1234567890ABCDE"],
        "Caller": ["+14158675309"],
        "Digits": ["1234"],
        "From": ["+14158675309"],
        "To": ["+18005551212"],
    }
    pairs = [(k, v[0]) for k, v in params.items()]
    cases = [
        (url, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        ("https://mycompany.com:443/myapp.php?foo=1&bar=2", "kvajT1Ptam85bY51eRf/AJRuM3w="),
        ("http://mycompany.com:80/myapp.php?foo=1&bar=2", "0ZXoZLH/DfblKGATFgpif+LLRf4="),
        ("http://mycompany.com:1234/myapp.php?foo=1&bar=2", "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),
    ]
    for u, expected in cases:
        assert twilio_signature(token, u, params) == expected
        assert sdk_signature(token, u, pairs) == expected
    # The SDK validator accepts the port-less URL for the :443 signature.
    assert RequestValidator(token).validate(url, MultiDict(pairs), "kvajT1Ptam85bY51eRf/AJRuM3w=")

    multi = {"Sid": ["CA123"], "SidAccount": ["AC123"], "Digits": ["5678", "1234", "1234"]}
    multi_pairs = [(k, v) for k, vs in multi.items() for v in vs]
    assert twilio_signature(token, url, multi) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    assert sdk_signature(token, url, multi_pairs) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="

    body = '{"property": "value", "boolean": true}'
    digest = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
    json_url = f"{url}&bodySHA256={digest}"
    assert twilio_signature(token, json_url) == "a9nBmqA0ju/hNViExpshrM61xv4="
    assert sdk_signature(token, json_url) == "a9nBmqA0ju/hNViExpshrM61xv4="
    assert RequestValidator(token).validate(json_url, body, "a9nBmqA0ju/hNViExpshrM61xv4=")


def test_mulaw_round_trip_and_tone_detection() -> None:
    pcm = tone_pcm(440, 0.5)
    ulaw = ulaw_encode(pcm)
    assert len(ulaw) == 4000
    assert ulaw_encode(pcm[:1] * 0) == b"\xff"  # digital silence is 0xFF in mu-law
    decoded = ulaw_decode(ulaw)
    assert abs(int(decoded.max()) - int(pcm.max())) < 400
    assert abs(dominant_frequency(ulaw) - 440) < 5


def test_contract_loaded_from_shared() -> None:
    contract = Contract()
    assert contract.create_required == {"To", "From"}
    assert "completed" in contract.call_statuses and "initiated" not in contract.call_statuses
    assert contract.twiml_max_chars == 4000
    assert contract.ranges["MachineDetectionSpeechThreshold"] == (1000, 6000)
    assert "streams" in contract.subresources


# ============================================================================ call flows


async def test_answered_call_reports_all_four_events_in_order(
    sim: TwilioSim, app: FakeApp, client: Any
) -> None:
    callee = "+15551230001"
    sim.phone(callee, answer_after=2.0)
    app.twiml["hello"] = (
        "<Response><Say>Hello from Membrane</Say><Pause length='2'/><Hangup/></Response>"
    )

    call = await client.calls.create_async(
        to=callee,
        from_=TWILIO_NUMBER,
        url=app.url("/twiml/hello"),
        status_callback=app.url("/cb/status"),
        status_callback_event=["initiated", "ringing", "answered", "completed"],
        status_callback_method="POST",
    )
    assert call.status == "queued"
    assert call.sid.startswith("CA") and len(call.sid) == 34
    assert call.direction == "outbound-api"

    rec = await sim.wait_for_call(sid=call.sid, status="completed", timeout=WAIT)
    assert rec.statuses == ["queued", "initiated", "ringing", "in-progress", "completed"]
    assert rec.said == ["Hello from Membrane"]
    assert [v.verb for v in rec.verbs] == ["Say", "Pause", "Hangup"]

    callbacks = app.of("/cb/status")
    assert [c.get("CallStatus") for c in callbacks] == [
        "initiated",
        "ringing",
        "in-progress",
        "completed",
    ]
    assert [c.get("SequenceNumber") for c in callbacks] == ["0", "1", "2", "3"]
    for cb in callbacks:
        assert cb.signature_valid
        assert cb.get("CallSid") == call.sid
        assert cb.get("AccountSid") == sim.account_sid
        assert cb.get("From") == TWILIO_NUMBER and cb.get("To") == callee
        assert cb.get("ApiVersion") == "2010-04-01"
        assert cb.get("Direction") == "outbound-api"
        assert cb.get("CallbackSource") == "call-progress-events"
        assert re.match(RFC2822, cb.get("Timestamp") or "")
    done = callbacks[-1]
    assert done.get("SipResponseCode") == "200"
    assert int(done.get("CallDuration") or -1) >= 2  # Say (1 s) + Pause (2 s), simulated
    assert done.get("Duration") == "1"
    assert all(r.status == 200 for r in rec.status_callbacks)

    (twiml_req,) = app.of("/twiml/hello")
    assert twiml_req.method == "POST"
    assert twiml_req.get("CallStatus") == "in-progress"
    assert twiml_req.get("CallSid") == call.sid

    fetched = await client.calls(call.sid).fetch_async()
    assert fetched.status == "completed"
    assert fetched.duration == done.get("CallDuration")
    assert fetched.price is not None and fetched.price_unit == "USD"
    assert fetched.start_time is not None and fetched.end_time is not None

    listed = await client.calls.list_async(to=callee)
    assert [c.sid for c in listed] == [call.sid]


async def test_busy_sends_only_completed_by_default(
    sim: TwilioSim, app: FakeApp, client: Any
) -> None:
    callee = "+15551230002"
    sim.phone(callee, busy=True)
    call = await client.calls.create_async(
        to=callee,
        from_=TWILIO_NUMBER,
        url=app.url("/twiml/never"),
        status_callback=app.url("/cb/status"),
    )
    await sim.wait_for_call(sid=call.sid, status="busy", timeout=WAIT)
    (cb,) = app.of("/cb/status")
    assert cb.get("CallStatus") == "busy"
    assert cb.get("SipResponseCode") == "486"
    assert cb.get("CallDuration") == "0"
    assert app.of("/twiml/never") == []
    fetched = await client.calls(call.sid).fetch_async()
    assert fetched.status == "busy" and fetched.duration is None


async def test_no_answer_rings_until_timeout() -> None:
    # Its own, slower simulated time (1 s lasts 0.2 s): the check is on the simulated ring
    # time, and at the suite's 20x a loaded machine's 0.4 s of lag read as 8 s of ringing.
    async with TwilioSim(time_scale=0.2) as sim, sdk_client(sim) as client:
        app = FakeApp(sim.auth_token)
        await app.start()
        try:
            callee = "+15551230003"
            sim.phone(callee, no_answer=True)
            call = await client.calls.create_async(
                to=callee,
                from_=TWILIO_NUMBER,
                url=app.url("/twiml/never"),
                timeout=10,
                status_callback=app.url("/cb/status"),
                status_callback_event=["ringing", "completed"],
            )
            rec = await sim.wait_for_call(sid=call.sid, status="no-answer", timeout=WAIT)
            ringing, done = app.of("/cb/status")
            assert (ringing.get("CallStatus"), done.get("CallStatus")) == ("ringing", "no-answer")
            assert done.get("SipResponseCode") == "487"
            t_ring = parsedate_to_datetime(ringing.get("Timestamp") or "")
            t_done = parsedate_to_datetime(done.get("Timestamp") or "")
            assert 9 <= (t_done - t_ring).total_seconds() <= 15  # simulated seconds
            assert rec.twiml == []
            assert all(r.signature_valid for r in app.requests)
        finally:
            await app.close()
        assert not sim.contract_violations


@pytest.mark.parametrize(
    ("mode", "voicemail", "expected"),
    [
        ("Enable", True, "machine_start"),
        ("DetectMessageEnd", True, "machine_end_beep"),
        ("Enable", False, "human"),
    ],
)
async def test_machine_detection_on_twiml_request(
    sim: TwilioSim, app: FakeApp, client: Any, mode: str, voicemail: bool, expected: str
) -> None:
    callee = "+15551230004"
    sim.phone(callee, voicemail=voicemail, answer_after=0.5)
    app.twiml["vm"] = "<Response><Say>Please call us back.</Say></Response>"
    call = await client.calls.create_async(
        to=callee, from_=TWILIO_NUMBER, url=app.url("/twiml/vm"), machine_detection=mode
    )
    await sim.wait_for_call(sid=call.sid, status="completed", timeout=WAIT)
    (req,) = app.of("/twiml/vm")
    assert req.get("AnsweredBy") == expected
    fetched = await client.calls(call.sid).fetch_async()
    assert fetched.answered_by == expected


async def test_async_amd_posts_result_to_callback(
    sim: TwilioSim, app: FakeApp, client: Any
) -> None:
    callee = "+15551230014"
    sim.phone(callee, voicemail=True, answer_after=0.5, hangup_after=10)
    app.twiml["vm"] = "<Response><Pause length='20'/></Response>"
    call = await client.calls.create_async(
        to=callee,
        from_=TWILIO_NUMBER,
        url=app.url("/twiml/vm"),
        machine_detection="DetectMessageEnd",
        async_amd="true",
        async_amd_status_callback=app.url("/cb/amd"),
    )
    (amd,) = await app.wait_for("/cb/amd")
    assert amd.get("AnsweredBy") == "machine_end_beep"
    assert amd.get("CallSid") == call.sid
    assert int(amd.get("MachineDetectionDuration") or 0) > 0
    (req,) = app.of("/twiml/vm")
    assert req.get("AnsweredBy") is None  # async: the TwiML request does not wait for AMD
    await sim.wait_for_call(sid=call.sid, status="completed", timeout=WAIT)


async def test_cancel_while_ringing(sim: TwilioSim, app: FakeApp, client: Any) -> None:
    callee = "+15551230005"
    sim.phone(callee, answer_after=50)
    call = await client.calls.create_async(
        to=callee,
        from_=TWILIO_NUMBER,
        url=app.url("/twiml/never"),
        status_callback=app.url("/cb/status"),
        status_callback_event=["ringing", "completed"],
    )
    await sim.wait_for_call(sid=call.sid, status="ringing", timeout=WAIT)
    updated = await client.calls(call.sid).update_async(status="canceled")
    assert updated.status == "canceled"
    rec = await sim.wait_for_call(sid=call.sid, status="canceled", timeout=WAIT)
    assert rec.statuses[-1] == "canceled"
    assert [c.get("CallStatus") for c in app.of("/cb/status")] == ["ringing", "canceled"]
    assert app.of("/twiml/never") == []
    with pytest.raises(TwilioRestException) as err:
        await client.calls(call.sid).update_async(url=app.url("/twiml/never"))
    assert (err.value.status, err.value.code) == (400, 21220)


async def test_hangup_via_rest_and_redirect(sim: TwilioSim, app: FakeApp, client: Any) -> None:
    callee = "+15551230015"
    sim.phone(callee, answer_after=0.5)
    app.twiml["hold"] = "<Response><Pause length='100'/></Response>"
    call = await client.calls.create_async(
        to=callee, from_=TWILIO_NUMBER, url=app.url("/twiml/hold")
    )
    await sim.wait_for_call(sid=call.sid, status="in-progress", timeout=WAIT)
    await client.calls(call.sid).update_async(
        twiml="<Response><Say>Moved</Say><Pause length='100'/></Response>"
    )
    await sim.wait_until(lambda: "Moved" in sim.call(call.sid).said, timeout=WAIT)
    done = await client.calls(call.sid).update_async(status="completed")
    assert done.status == "completed"
    rec = await sim.wait_for_call(sid=call.sid, status="completed", timeout=WAIT)
    assert rec.said == ["Moved"]


async def test_dial_number_bridges_to_second_phone_and_posts_action(
    sim: TwilioSim, app: FakeApp, client: Any
) -> None:
    customer, agent = "+15551230006", "+15551230007"
    sim.phone(customer, answer_after=0.5)
    sim.phone(agent, answer_after=1.0, hangup_after=3.0)
    app.twiml["bridge"] = (
        "<Response><Say>Connecting you now.</Say>"
        f'<Dial action="/cb/dial-done" timeout="20" callerId="{TWILIO_NUMBER}"'
        ' answerOnBridge="true">'
        '<Number statusCallback="/cb/leg"'
        ' statusCallbackEvent="initiated ringing answered completed">'
        f"{agent}</Number></Dial><Say>never reached</Say></Response>"
    )
    app.twiml["dial-done"] = "<Response><Say>Goodbye</Say></Response>"
    call = await client.calls.create_async(
        to=customer, from_=TWILIO_NUMBER, url=app.url("/twiml/bridge")
    )
    parent = await sim.wait_for_call(sid=call.sid, status="completed", timeout=WAIT)
    leg = await sim.wait_for_call(to=agent, status="completed", timeout=WAIT)

    assert leg.parent_sid == call.sid and leg.direction == "outbound-dial"
    assert leg.from_ == TWILIO_NUMBER
    assert parent.children == [leg.sid]
    assert parent.said == ["Connecting you now.", "Goodbye"]

    (action,) = app.of("/cb/dial-done")
    assert action.get("DialCallStatus") == "completed"
    assert action.get("DialCallSid") == leg.sid
    assert 1 <= int(action.get("DialCallDuration") or 0) <= 6  # agent hung up after 3 s
    assert action.get("CallSid") == call.sid

    leg_cbs = app.of("/cb/leg")
    assert [c.get("CallStatus") for c in leg_cbs] == [
        "initiated",
        "ringing",
        "in-progress",
        "completed",
    ]
    assert all(c.get("ParentCallSid") == call.sid for c in leg_cbs)
    assert all(c.get("Direction") == "outbound-dial" for c in leg_cbs)

    children = await client.calls.list_async(parent_call_sid=call.sid)
    assert [c.sid for c in children] == [leg.sid]
    assert children[0].parent_call_sid == call.sid


async def test_dial_busy_number_reports_dial_status(
    sim: TwilioSim, app: FakeApp, client: Any
) -> None:
    customer, agent = "+15551230016", "+15551230017"
    sim.phone(customer, answer_after=0.5)
    sim.phone(agent, busy=True)
    app.twiml["bridge"] = (
        f'<Response><Dial action="/cb/dial-done"><Number>{agent}</Number></Dial></Response>'
    )
    call = await client.calls.create_async(
        to=customer, from_=TWILIO_NUMBER, url=app.url("/twiml/bridge")
    )
    await sim.wait_for_call(sid=call.sid, status="completed", timeout=WAIT)
    (action,) = app.of("/cb/dial-done")
    assert action.get("DialCallStatus") == "busy"
    assert action.get("DialBridged") == "false"


async def test_inbound_call_with_answer_on_bridge(sim: TwilioSim, app: FakeApp) -> None:
    caller, agent = "+15551230018", "+15551230019"
    sim.phone(caller, hangup_after=5)
    sim.phone(agent, answer_after=3)
    app.twiml["inbound"] = (
        f'<Response><Dial answerOnBridge="true"><Number>{agent}</Number></Dial></Response>'
    )
    rec = await sim.inbound_call(caller, TWILIO_NUMBER, app.url("/twiml/inbound"))
    assert rec.direction == "inbound"
    await sim.wait_for_call(sid=rec.sid, status="completed", timeout=WAIT)
    leg = await sim.wait_for_call(to=agent, status="completed", timeout=WAIT)
    (req,) = app.of("/twiml/inbound")
    assert req.get("CallStatus") == "ringing" and req.get("Direction") == "inbound"
    # The inbound call keeps ringing until the dialled agent answers.
    assert rec.answer_time is not None and leg.answer_time is not None
    assert rec.answer_time >= leg.answer_time
    assert leg.from_ == caller  # <Dial> without callerId shows the caller's number


# ============================================================================ media streams


def _stream_twiml(app: FakeApp, action: str | None) -> str:
    action_attr = f' action="{action}"' if action else ""
    return (
        f"<Response><Connect{action_attr}>"
        f'<Stream url="{app.ws_url}" name="bridge-1">'
        '<Parameter name="session" value="tok-42"/></Stream>'
        "</Connect><Say>The call has ended.</Say></Response>"
    )


async def test_media_stream_tone_echo_and_marks(sim: TwilioSim, app: FakeApp, client: Any) -> None:
    callee = "+15551230008"
    sim.phone(callee, answer_after=0.5, tone_hz=440)
    app.twiml["stream"] = _stream_twiml(app, "/cb/stream-ended")
    app.twiml["stream-ended"] = "<Response><Hangup/></Response>"

    async def behaviour(session: MediaSession, msg: dict[str, Any]) -> bool:
        if msg["event"] == "media":
            await session.send_audio(base64.b64decode(msg["media"]["payload"]))  # echo
            if len(session.inbound) == 8000:
                await session.send_mark("one-second")
        if msg["event"] == "mark":
            return False  # the echoed audio has played out: hang up the socket
        return True

    app.media_behaviour = behaviour
    call = await client.calls.create_async(
        to=callee, from_=TWILIO_NUMBER, url=app.url("/twiml/stream")
    )
    rec = await sim.wait_for_call(sid=call.sid, status="completed", timeout=WAIT)

    (session,) = app.media_sessions
    assert session.messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    start = session.messages[1]
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    assert start["start"]["callSid"] == call.sid
    assert start["start"]["accountSid"] == sim.account_sid
    assert start["start"]["customParameters"] == {"session": "tok-42"}
    assert start["start"]["tracks"] == ["inbound"]
    assert start["start"]["mediaFormat"] == {
        "encoding": "audio/x-mulaw",
        "sampleRate": 8000,
        "channels": 1,
    }
    assert start["streamSid"].startswith("MZ") and len(start["streamSid"]) == 34
    media = session.of("media")
    assert [m["media"]["chunk"] for m in media[:3]] == ["1", "2", "3"]
    assert [m["media"]["timestamp"] for m in media[:3]] == ["20", "40", "60"]
    assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in media)
    seqs = [int(m["sequenceNumber"]) for m in session.messages[1:]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert abs(dominant_frequency(bytes(session.inbound[:8000])) - 440) < 10  # app hears the phone

    stream = rec.stream
    assert stream is not None and stream.closed_by == "app"
    assert stream.marks_echoed == ["one-second"]
    assert len(stream.audio_received) >= 8000
    assert len(stream.audio_played) >= 8000
    assert (
        abs(dominant_frequency(bytes(stream.audio_received[:8000])) - 440) < 10
    )  # sim hears the app
    assert stream.errors == []
    (action,) = app.of("/cb/stream-ended")
    assert action.get("CallSid") == call.sid
    assert "The call has ended." not in rec.said  # <Connect action> replaces the rest


async def test_media_stream_clear_and_stop_on_hangup(
    sim: TwilioSim, app: FakeApp, client: Any
) -> None:
    callee = "+15551230009"
    sim.phone(callee, answer_after=0.5, hangup_after=20)  # 1 s real at time_scale 0.05
    app.twiml["stream"] = _stream_twiml(app, None)
    tone = ulaw_encode(tone_pcm(1000, 2.0))

    async def behaviour(session: MediaSession, msg: dict[str, Any]) -> bool:
        if msg["event"] == "start":
            await session.send_audio(tone)  # 2 s of audio queued for playout
            await session.send_mark("after-tone")
            await session.send({"event": "clear", "streamSid": session.stream_sid})
        return True

    app.media_behaviour = behaviour
    call = await client.calls.create_async(
        to=callee, from_=TWILIO_NUMBER, url=app.url("/twiml/stream")
    )
    rec = await sim.wait_for_call(sid=call.sid, status="completed", timeout=WAIT)

    (session,) = app.media_sessions
    await asyncio.wait_for(session.event("stop").wait(), WAIT)
    (stop,) = session.of("stop")
    assert stop["stop"] == {"accountSid": sim.account_sid, "callSid": call.sid}
    (mark,) = session.of("mark")
    assert mark["mark"]["name"] == "after-tone"
    stream = rec.stream
    assert stream is not None
    assert stream.closed_by == "twilio" and stream.stopped
    assert bytes(stream.audio_received) == tone
    assert len(stream.audio_played) < len(tone)  # clear dropped what had not played
    assert abs(dominant_frequency(bytes(stream.audio_received)) - 1000) < 10
    assert rec.said == []  # the phone hung up during <Connect>: later verbs never ran


async def test_stream_url_with_query_string_is_rejected(
    sim: TwilioSim, app: FakeApp, client: Any
) -> None:
    callee = "+15551230010"
    sim.phone(callee, answer_after=0.5)
    app.twiml["bad"] = (
        f'<Response><Connect><Stream url="{app.ws_url}?token=x"/></Connect>'
        "<Say>fallback</Say></Response>"
    )
    call = await client.calls.create_async(
        to=callee, from_=TWILIO_NUMBER, url=app.url("/twiml/bad")
    )
    rec = await sim.wait_for_call(sid=call.sid, status="completed", timeout=WAIT)
    assert app.media_sessions == []
    assert [n.code for n in rec.notifications] == [31920]
    assert rec.said == ["fallback"]


# ============================================================================ rejected requests


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"to": "", "from_": TWILIO_NUMBER}, 400, 21201),
        ({"from_": ""}, 400, 21213),
        ({"to": "5551234"}, 400, 21211),
        ({"status_callback_method": "PUT"}, 400, 21209),
        ({"status_callback_event": ["initiated", "bogus"]}, 400, 21626),
        ({"machine_detection": "Maybe"}, 400, 21234),
        ({"timeout": 0}, 400, 21208),
        ({"url": "not a url"}, 400, 21205),
        ({"url": None}, 400, 21205),
        ({"twiml": "<Response><Say>unclosed</Response>", "url": None}, 400, 12100),
    ],
)
async def test_invalid_create_requests_are_rejected(
    sim: TwilioSim, client: Any, kwargs: dict[str, Any], status: int, code: int
) -> None:
    args: dict[str, Any] = {
        "to": "+15551230011",
        "from_": TWILIO_NUMBER,
        "url": "https://example.com/t",
    }
    args.update(kwargs)
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(TwilioRestException) as err:
        await client.calls.create_async(**args)
    assert (err.value.status, err.value.code) == (status, code)
    assert sim.calls == []


async def test_bad_credentials_and_unknown_call(sim: TwilioSim) -> None:
    http = AsyncTwilioHttpClient()
    try:
        bad = Client(sim.account_sid, "wrong-token", http_client=http)
        bad.api.base_url = sim.base_url
        with pytest.raises(TwilioRestException) as err:
            await bad.calls.create_async(
                to="+15551230012", from_=TWILIO_NUMBER, url="https://example.com/t"
            )
        assert (err.value.status, err.value.code) == (401, 20003)

        good = Client(sim.account_sid, sim.auth_token, http_client=http)
        good.api.base_url = sim.base_url
        with pytest.raises(TwilioRestException) as err:
            await good.calls("CA" + "0" * 32).fetch_async()
        assert (err.value.status, err.value.code) == (404, 20404)
    finally:
        await http.close()
    assert sim.calls == []


async def test_call_resource_matches_contract(sim: TwilioSim, client: Any) -> None:
    sim.phone("+15551230013", busy=True)
    call = await client.calls.create_async(
        to="+15551230013", from_=TWILIO_NUMBER, twiml="<Response><Say>hi</Say></Response>"
    )
    raw = await client.http_client.request(
        "GET",
        f"{sim.base_url}/2010-04-01/Accounts/{sim.account_sid}/Calls/{call.sid}.json",
        auth=(sim.account_sid, sim.auth_token),
    )
    body = json.loads(raw.text)
    check_call_resource(sim.contract, body)
    assert body["to_formatted"] == "(555) 123-0013"
    await sim.wait_for_call(sid=call.sid, status="ended", timeout=WAIT)
