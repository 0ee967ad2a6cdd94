"""TwilioTelephony and its webhooks, against the Twilio simulator through the real SDK and a
real aiohttp server on loopback (see tests/twilio_sim/README.md)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port, replace
from multidict import MultiDict
from twilio_sim import CallRecord, TwilioSim, twilio_signature
from yarl import URL

from gateway.core.errors import Conflict, DomainError, StoreUnavailable
from gateway.settings import Settings, TwilioSettings
from gateway.telephony import (
    ENTRY_POINT_GROUP,
    AnsweredBy,
    Bridge,
    DialRequest,
    HangUp,
    Instruction,
    LegEvent,
    LegStatus,
    TelephonyError,
)
from mobile_bridge.twilio_telephony import TwilioTelephony, install, refusal
from mobile_bridge.twilio_webhooks import (
    SIGNATURE_HEADER,
    WebhookSignatures,
    answered_by_from,
    leg_event_from,
    render,
)

pytestmark = pytest.mark.timeout(30)

TIME_SCALE = 0.02  # one simulated second lasts 20 ms
WAIT = 5.0  # real seconds for any single awaited event
TWILIO_NUMBER = "+15005550006"
VISITOR = "+15551240001"
AGENT = "+15551240002"
TOKEN = "test-auth-token-0123456789abcdef"


def dial_request(to: str = VISITOR, **changes: Any) -> DialRequest:
    return replace(DialRequest("cb-1", 1, to, TWILIO_NUMBER), **changes)


# ============================================================================ test doubles


AnswerPolicy = Callable[[AnsweredBy], Instruction]


@dataclass
class RecordingEvents:
    """A ``CallbackEvents`` that records every call and answers as the test tells it."""

    on_answer_with: AnswerPolicy = lambda _: HangUp()
    on_bridge_with: Instruction = field(default_factory=HangUp)
    fail_with: Exception | None = None
    leg_events: list[LegEvent] = field(default_factory=list)
    answers: list[tuple[str, int, str, AnsweredBy]] = field(default_factory=list)
    bridge_results: list[tuple[str, int, str, bool]] = field(default_factory=list)

    @property
    def nothing_called(self) -> bool:
        return not (self.leg_events or self.answers or self.bridge_results)

    def statuses(self, provider_id: str) -> list[LegStatus]:
        return [e.status for e in self.leg_events if e.provider_id == provider_id]

    async def on_leg_event(self, event: LegEvent) -> None:
        self.leg_events.append(event)
        if self.fail_with is not None:
            raise self.fail_with

    async def on_answer(
        self, call_id: str, attempt: int, provider_id: str, answered_by: AnsweredBy
    ) -> Instruction:
        self.answers.append((call_id, attempt, provider_id, answered_by))
        if self.fail_with is not None:
            raise self.fail_with
        return self.on_answer_with(answered_by)

    async def on_bridge_result(
        self, call_id: str, attempt: int, provider_id: str, agent_answered: bool
    ) -> Instruction:
        self.bridge_results.append((call_id, attempt, provider_id, agent_answered))
        if self.fail_with is not None:
            raise self.fail_with
        return self.on_bridge_with


@dataclass
class Gateway:
    """A bare aiohttp app with only the Twilio edge installed, listening on loopback."""

    settings: Settings
    telephony: TwilioTelephony
    runner: web.AppRunner
    bind_url: str

    @property
    def public_url(self) -> str:
        return self.settings.public_url.rstrip("/")

    async def close(self) -> None:
        await self.telephony.close()
        await self.runner.cleanup()


async def start_gateway(
    twilio: TwilioSettings, events: RecordingEvents, public_url: str | None = None
) -> Gateway:
    port = free_port()
    bind_url = f"http://127.0.0.1:{port}"
    # The trailing slash is deliberate: every URL must be built with it stripped.
    settings = replace(Settings(), twilio=twilio, public_url=(public_url or bind_url) + "/")
    app = web.Application()
    telephony = install(app, settings, events)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await telephony.start()
    return Gateway(settings, telephony, runner, bind_url)


async def start_proxy(port: int, upstream: str) -> web.AppRunner:
    """A reverse proxy on ``port`` that forwards to ``upstream`` with its own Host header, as
    a load balancer would: the gateway sees its bind address, Twilio signed the proxy's."""
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        headers = {
            name: request.headers[name]
            for name in (SIGNATURE_HEADER, "Content-Type")
            if name in request.headers
        }
        async with session.request(
            request.method,
            URL(upstream + request.raw_path, encoded=True),
            data=await request.read(),
            headers=headers,
        ) as reply:
            return web.Response(
                body=await reply.read(),
                status=reply.status,
                content_type=reply.content_type,
                charset=reply.charset,
            )

    async def close_session(_: web.Application) -> None:
        await session.close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_cleanup.append(close_session)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


# ============================================================================ fixtures


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    s = TwilioSim(time_scale=TIME_SCALE)
    await s.start()
    try:
        yield s
    finally:
        await s.close()
    assert s.contract_violations == []


@pytest.fixture
def events() -> RecordingEvents:
    return RecordingEvents()


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateways() -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def factory(
        twilio: TwilioSettings, events: RecordingEvents, public_url: str | None = None
    ) -> Gateway:
        gw = await start_gateway(twilio, events, public_url)
        started.append(gw)
        return gw

    yield factory
    for gw in reversed(started):
        await gw.close()


@pytest.fixture
async def gateway(sim: TwilioSim, events: RecordingEvents, gateways: GatewayFactory) -> Gateway:
    return await gateways(TwilioSettings(sim.account_sid, sim.auth_token, sim.base_url), events)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def assert_webhooks_accepted(*records: CallRecord) -> None:
    """Every request the simulator made to the gateway was answered with a 2xx."""
    for rec in records:
        assert rec.webhooks, rec.sid
        assert all(w.status is not None and 200 <= w.status < 300 for w in rec.webhooks), [
            (w.kind, w.url, w.status, w.error) for w in rec.webhooks
        ]
        assert [n for n in rec.notifications if n.level == "error"] == []


# ============================================================================ pure translation


def test_answered_by_values() -> None:
    table = {
        "human": AnsweredBy.HUMAN,
        "unknown": AnsweredBy.UNKNOWN,
        None: AnsweredBy.UNKNOWN,
        "machine_start": AnsweredBy.MACHINE,
        "machine_end_beep": AnsweredBy.MACHINE,
        "machine_end_silence": AnsweredBy.MACHINE,
        "machine_end_other": AnsweredBy.MACHINE,
        "fax": AnsweredBy.MACHINE,
    }
    for value, expected in table.items():
        assert answered_by_from(value) is expected, value


def test_status_callback_translation() -> None:
    table = {
        "queued": LegStatus.INITIATED,
        "initiated": LegStatus.INITIATED,
        "ringing": LegStatus.RINGING,
        "in-progress": LegStatus.ANSWERED,
        "completed": LegStatus.COMPLETED,
        "busy": LegStatus.BUSY,
        "no-answer": LegStatus.NO_ANSWER,
        "failed": LegStatus.FAILED,
        "canceled": LegStatus.CANCELED,
    }
    for call_status, expected in table.items():
        form = MultiDict([("CallSid", "CA1"), ("CallStatus", call_status)])
        assert leg_event_from("c", 2, form) == LegEvent("c", 2, "CA1", expected)
    done = MultiDict(
        [
            ("CallSid", "CA1"),
            ("CallStatus", "completed"),
            ("CallDuration", "42"),
            ("SequenceNumber", "3"),
            ("AnsweredBy", "human"),
        ]
    )
    assert leg_event_from("c", 2, done) == LegEvent(
        "c", 2, "CA1", LegStatus.COMPLETED, AnsweredBy.HUMAN, duration_s=42, sequence=3
    )
    for bad in (
        [("CallStatus", "completed")],
        [("CallSid", "CA1")],
        [("CallSid", "CA1"), ("CallStatus", "exploded")],
        [("CallSid", "CA1"), ("CallStatus", "completed"), ("CallDuration", "²")],
    ):
        with pytest.raises(DomainError) as err:
            leg_event_from("c", 2, MultiDict(bad))
        assert err.value.code == "invalid_payload"


def test_render_twiml() -> None:
    action = "https://gw.example.com/v1/twilio/bridge/cb-1/1"
    bridge = Bridge("Connecting you to Anna.", AGENT, TWILIO_NUMBER, timeout_s=20, language="de-DE")
    assert render(bridge, action) == (
        '<?xml version="1.0" encoding="UTF-8"?><Response>'
        '<Say language="de-DE">Connecting you to Anna.</Say>'
        f'<Dial action="{action}" callerId="{TWILIO_NUMBER}" method="POST" timeout="20">'
        f"<Number>{AGENT}</Number></Dial></Response>"
    )
    assert render(HangUp(), action) == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup /></Response>'
    )
    assert render(HangUp("Goodbye & thanks"), action) == (
        '<?xml version="1.0" encoding="UTF-8"?><Response>'
        '<Say language="en-US">Goodbye &amp; thanks</Say><Hangup /></Response>'
    )


def test_refusal_codes() -> None:
    table = [
        (400, 21211, "telephony_refused", False),
        (404, 20404, "telephony_refused", False),
        (401, 20003, "telephony_auth_failed", False),
        (429, 20429, "telephony_unavailable", True),
        (500, 20500, "telephony_unavailable", True),
        (503, None, "telephony_unavailable", True),
        (400, 21610, "opted_out", False),  # a message to a number that texted STOP
    ]
    for status, twilio_code, code, retryable in table:
        err = refusal("dial", status, twilio_code, "x")
        assert (err.code, err.retryable) == (code, retryable), status


def test_signature_known_answer_vectors() -> None:
    """WEBHOOKS.md section 2: the check rebuilds the URL from the public URL and the path."""
    signatures = WebhookSignatures("12345", "https://mycompany.com/")
    path_qs = "/myapp.php?foo=1&bar=2"
    assert signatures.url_for(path_qs) == "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = MultiDict(
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
    )
    assert signatures.valid(path_qs, params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    # Twilio may have signed the URL with the default port written out.
    assert signatures.valid(path_qs, params, "kvajT1Ptam85bY51eRf/AJRuM3w=")
    assert not signatures.valid(path_qs, params, "RSOYDt4T1cUTdK1PDd93/VVr8B8")
    assert not signatures.valid(path_qs, params, None)
    assert not signatures.valid("/myapp.php?foo=1&bar=3", params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not WebhookSignatures("12346", "https://mycompany.com").valid(
        path_qs, params, "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )
    repeated = MultiDict(
        [
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]
    )
    assert signatures.valid(path_qs, repeated, "IK+Dwps556ElfBT0I3Rgjkr1wJU=")
    with pytest.raises(ValueError):
        WebhookSignatures("", "https://mycompany.com")


def test_installer_is_registered_under_the_entry_point() -> None:
    (entry,) = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == "twilio"]
    assert entry.load() is install


# ============================================================================ calls through the sim


async def test_answered_leg_is_bridged_to_the_agent(
    sim: TwilioSim, events: RecordingEvents, gateway: Gateway
) -> None:
    sim.phone(VISITOR, answer_after=1.0)
    sim.phone(AGENT, answer_after=1.0, hangup_after=3.0)
    events.on_answer_with = lambda _: Bridge("Connecting you to Anna.", AGENT, TWILIO_NUMBER, 20)
    events.on_bridge_with = HangUp("Thank you for calling.")

    sid = await gateway.telephony.dial(dial_request())
    rec = await sim.wait_for_call(sid=sid, status="completed", timeout=WAIT)
    leg = await sim.wait_for_call(to=AGENT, status="completed", timeout=WAIT)

    # The REST request asked for everything the webhooks rely on.
    assert rec.params["To"] == [VISITOR] and rec.params["From"] == [TWILIO_NUMBER]
    assert rec.params["Url"] == [f"{gateway.public_url}/v1/twilio/voice/cb-1/1"]
    assert rec.params["StatusCallback"] == [f"{gateway.public_url}/v1/twilio/status/cb-1/1"]
    assert rec.params["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
    assert rec.params["MachineDetection"] == ["Enable"]
    assert rec.params["Timeout"] == ["30"]

    assert events.statuses(sid) == [
        LegStatus.INITIATED,
        LegStatus.RINGING,
        LegStatus.ANSWERED,
        LegStatus.COMPLETED,
    ]
    assert all((e.call_id, e.attempt) == ("cb-1", 1) for e in events.leg_events)
    assert [e.sequence for e in events.leg_events] == [0, 1, 2, 3]
    assert [e.duration_s for e in events.leg_events[:3]] == [None, None, None]
    done = events.leg_events[-1]
    # AMD 1.5 s + Say 1.6 s + the agent's 1.2 s ring and 3 s talk + Say 1.6 s, simulated.
    assert done.duration_s is not None and done.duration_s >= 6
    assert done.answered_by is AnsweredBy.HUMAN

    assert events.answers == [("cb-1", 1, sid, AnsweredBy.HUMAN)]
    assert events.bridge_results == [("cb-1", 1, sid, True)]

    # The simulator ran the TwiML: greeting, the bridge to the agent, then the goodbye.
    assert rec.said == ["Connecting you to Anna.", "Thank you for calling."]
    assert [v.verb for v in rec.verbs] == ["Say", "Dial", "Say", "Hangup"]
    (dial,) = rec.verbs_named("Dial")
    assert dial.detail["targets"] == [AGENT]
    assert dial.detail["callerId"] == TWILIO_NUMBER
    assert dial.detail["timeout"] == 20
    assert dial.detail["DialCallStatus"] == "completed"
    assert leg.parent_sid == sid and leg.from_ == TWILIO_NUMBER
    assert leg.statuses[-2:] == ["in-progress", "completed"]
    (action,) = rec.webhooks_of("action")
    assert action.url == f"{gateway.public_url}/v1/twilio/bridge/cb-1/1"
    assert_webhooks_accepted(rec)


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ({"busy": True}, [LegStatus.INITIATED, LegStatus.BUSY]),
        ({"no_answer": True}, [LegStatus.INITIATED, LegStatus.RINGING, LegStatus.NO_ANSWER]),
        ({"fail": True}, [LegStatus.INITIATED, LegStatus.FAILED]),
    ],
)
async def test_unanswered_leg_endings(
    sim: TwilioSim,
    events: RecordingEvents,
    gateway: Gateway,
    phone: dict[str, Any],
    expected: list[LegStatus],
) -> None:
    sim.phone(VISITOR, **phone)
    sid = await gateway.telephony.dial(dial_request(timeout_s=5))
    rec = await sim.wait_for_call(sid=sid, status="ended", timeout=WAIT)
    assert events.statuses(sid) == expected
    assert events.leg_events[-1].duration_s == 0
    assert events.answers == [] and rec.twiml == []
    assert_webhooks_accepted(rec)


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ({"voicemail": True}, AnsweredBy.MACHINE),  # machine_start
        ({"amd_result": "fax"}, AnsweredBy.MACHINE),
        ({"amd_result": "machine_end_silence"}, AnsweredBy.MACHINE),
        ({"amd_result": "unknown"}, AnsweredBy.UNKNOWN),
    ],
)
async def test_answering_machine_is_hung_up_on(
    sim: TwilioSim,
    events: RecordingEvents,
    gateway: Gateway,
    phone: dict[str, Any],
    expected: AnsweredBy,
) -> None:
    sim.phone(VISITOR, answer_after=0.5, **phone)
    events.on_answer_with = lambda by: (
        HangUp("We will call you back.")
        if by is AnsweredBy.MACHINE
        else Bridge("Hello", AGENT, TWILIO_NUMBER)
    )
    sim.phone(AGENT, answer_after=0.5, hangup_after=1.0)
    sid = await gateway.telephony.dial(dial_request())
    rec = await sim.wait_for_call(sid=sid, status="completed", timeout=WAIT)
    assert events.answers == [("cb-1", 1, sid, expected)]
    if expected is AnsweredBy.MACHINE:
        assert [v.verb for v in rec.verbs] == ["Say", "Hangup"]
        assert rec.said == ["We will call you back."]
        assert rec.children == []
    assert events.statuses(sid)[-1] is LegStatus.COMPLETED
    assert_webhooks_accepted(rec)


@pytest.mark.parametrize("agent", [{"no_answer": True}, {"busy": True}])
async def test_bridge_result_when_the_agent_does_not_answer(
    sim: TwilioSim, events: RecordingEvents, gateway: Gateway, agent: dict[str, Any]
) -> None:
    sim.phone(VISITOR, answer_after=0.5)
    sim.phone(AGENT, **agent)
    events.on_answer_with = lambda _: Bridge("One moment.", AGENT, TWILIO_NUMBER, timeout_s=5)
    events.on_bridge_with = HangUp("Nobody could take your call; we will call you back.")
    sid = await gateway.telephony.dial(dial_request())
    rec = await sim.wait_for_call(sid=sid, status="completed", timeout=WAIT)
    leg = await sim.wait_for_call(to=AGENT, status="ended", timeout=WAIT)
    assert events.bridge_results == [("cb-1", 1, sid, False)]
    assert leg.status in ("no-answer", "busy")
    assert rec.said == ["One moment.", "Nobody could take your call; we will call you back."]
    assert rec.verbs[-1].verb == "Hangup"
    assert_webhooks_accepted(rec)


async def test_find_leg(sim: TwilioSim, events: RecordingEvents, gateway: Gateway) -> None:
    sim.phone(VISITOR, answer_after=50)
    request = dial_request()
    # `since` comes from the simulated clock: it is the one Twilio's date_created is read on.
    since = sim.now().timestamp()
    sid = await gateway.telephony.dial(request)
    assert await gateway.telephony.find_leg(request, since) == sid
    assert await gateway.telephony.find_leg(dial_request(to="+15551249999"), since) is None
    later = sim.now().timestamp() + 3600
    assert await gateway.telephony.find_leg(request, later) is None
    await gateway.telephony.hang_up(sid)
    await sim.wait_for_call(sid=sid, status="ended", timeout=WAIT)


async def test_hang_up_cancels_a_ringing_leg_and_is_harmless_after(
    sim: TwilioSim, events: RecordingEvents, gateway: Gateway
) -> None:
    sim.phone(VISITOR, answer_after=50)
    sid = await gateway.telephony.dial(dial_request())
    await sim.wait_for_call(sid=sid, status="ringing", timeout=WAIT)
    await gateway.telephony.hang_up(sid)
    rec = await sim.wait_for_call(sid=sid, status="canceled", timeout=WAIT)
    assert events.statuses(sid) == [LegStatus.INITIATED, LegStatus.RINGING, LegStatus.CANCELED]
    assert rec.rest_updates == [{"Status": ["completed"]}]
    await gateway.telephony.hang_up(sid)  # already ended: no error
    await gateway.telephony.hang_up("CA" + "0" * 32)  # no such call: nothing to end
    assert rec.status == "canceled" and events.answers == []
    assert_webhooks_accepted(rec)


async def test_hang_up_ends_an_answered_leg(
    sim: TwilioSim, events: RecordingEvents, gateway: Gateway
) -> None:
    sim.phone(VISITOR, answer_after=0.5)
    sim.phone(AGENT, answer_after=50)
    events.on_answer_with = lambda _: Bridge("Hold on.", AGENT, TWILIO_NUMBER, timeout_s=600)
    sid = await gateway.telephony.dial(dial_request())
    await sim.wait_until(lambda: bool(sim.call(sid).children), timeout=WAIT)
    await gateway.telephony.hang_up(sid)
    rec = await sim.wait_for_call(sid=sid, status="completed", timeout=WAIT)
    leg = await sim.wait_for_call(to=AGENT, status="ended", timeout=WAIT)
    assert leg.status == "canceled"
    assert events.statuses(sid)[-1] is LegStatus.COMPLETED
    # Twilio still posts the <Dial action> (canceled) when the parent hangs up mid-dial: that
    # is the visitor leaving, not the agent failing to answer, so the gateway is not told.
    assert events.bridge_results == []
    assert_webhooks_accepted(rec)


async def test_signatures_validate_behind_a_proxy(
    sim: TwilioSim, events: RecordingEvents, gateways: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    proxy_port = free_port()
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    twilio = TwilioSettings(sim.account_sid, sim.auth_token, sim.base_url)
    gw = await gateways(twilio, events, public_url=proxy_url)
    proxy = await start_proxy(proxy_port, gw.bind_url)
    try:
        sim.phone(VISITOR, answer_after=0.5)
        events.on_answer_with = lambda _: HangUp("Hello through the proxy.")
        sid = await gw.telephony.dial(dial_request())
        rec = await sim.wait_for_call(sid=sid, status="completed", timeout=WAIT)
        assert all(w.url.startswith(proxy_url + "/") for w in rec.webhooks)
        assert rec.said == ["Hello through the proxy."]
        assert events.statuses(sid)[-1] is LegStatus.COMPLETED
        assert_webhooks_accepted(rec)

        # Signed over the address the gateway is bound to (what request.url says): refused.
        count = len(events.leg_events)
        path = "/v1/twilio/status/cb-1/1"
        form = {"CallSid": sid, "CallStatus": "completed"}
        signature = twilio_signature(
            sim.auth_token, gw.bind_url + path, {k: [v] for k, v in form.items()}
        )
        async with http.post(
            gw.bind_url + path, data=form, headers={SIGNATURE_HEADER: signature}
        ) as resp:
            assert resp.status == 403
        assert len(events.leg_events) == count
    finally:
        await proxy.cleanup()


# ============================================================================ REST errors


async def test_refused_dial(sim: TwilioSim, events: RecordingEvents, gateway: Gateway) -> None:
    with pytest.raises(TelephonyError) as err:
        await gateway.telephony.dial(dial_request(to="5551234"))  # not E.164: Twilio 21211
    assert err.value.code == "telephony_refused" and not err.value.retryable
    assert "21211" in err.value.message
    with pytest.raises(TelephonyError) as err:
        await gateway.telephony.dial(dial_request(call_id="not a valid id"))
    assert err.value.code == "telephony_refused" and not err.value.retryable
    assert sim.calls == [] and events.nothing_called


async def test_unreachable_api(events: RecordingEvents, gateways: GatewayFactory) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    gw = await gateways(TwilioSettings("AC" + "1" * 32, TOKEN, closed), events)
    requests: list[Callable[[], Awaitable[object]]] = [
        lambda: gw.telephony.dial(dial_request()),
        lambda: gw.telephony.find_leg(dial_request(), 0.0),
        lambda: gw.telephony.hang_up("CA" + "1" * 32),
    ]
    for request in requests:
        with pytest.raises(TelephonyError) as err:
            await request()
        assert err.value.code == "telephony_unavailable" and err.value.retryable


async def test_error_answers_the_simulator_never_gives(events: RecordingEvents) -> None:
    """Twilio answers 21220 to completing an ended call (the simulator just accepts it), and
    may answer 5xx or bad credentials: a stub API stands in for those answers."""
    answers = {
        "update": (400, {"code": 21220, "message": "Call is not in-progress.", "status": 400}),
        "create": (503, {"code": 20503, "message": "Service unavailable", "status": 503}),
        "list": (401, {"code": 20003, "message": "Authenticate", "status": 401}),
    }

    def stub(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_: web.Request) -> web.Response:
            status, body = answers[kind]
            return web.json_response(body, status=status)

        return handler

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{account}/Calls.json", stub("create"))
    app.router.add_get("/2010-04-01/Accounts/{account}/Calls.json", stub("list"))
    app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{sid}.json", stub("update"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    twilio = TwilioSettings("AC" + "1" * 32, TOKEN, f"http://127.0.0.1:{port}")
    telephony = TwilioTelephony(replace(Settings(), twilio=twilio))
    await telephony.start()
    await telephony.start()  # idempotent: still one client
    try:
        await telephony.hang_up("CA" + "1" * 32)  # 21220: already ended, no error
        with pytest.raises(TelephonyError) as err:
            await telephony.dial(dial_request())
        assert (err.value.code, err.value.retryable) == ("telephony_unavailable", True)
        with pytest.raises(TelephonyError) as err:
            await telephony.find_leg(dial_request(), 0.0)
        assert (err.value.code, err.value.retryable) == ("telephony_auth_failed", False)
    finally:
        await telephony.close()
        await telephony.close()  # idempotent
        await runner.cleanup()
    with pytest.raises(RuntimeError):
        await telephony.dial(dial_request())


# ============================================================================ webhook requests


ROUTES = ["voice", "status", "bridge"]
FORMS = {
    "voice": {"CallSid": "CA1", "CallStatus": "in-progress", "AnsweredBy": "human"},
    "status": {"CallSid": "CA1", "CallStatus": "ringing", "SequenceNumber": "1"},
    "bridge": {"CallSid": "CA1", "DialCallStatus": "completed", "DialCallSid": "CA2"},
}


async def post(
    http: aiohttp.ClientSession,
    url: str,
    form: list[tuple[str, str]] | dict[str, str],
    signature: str | None,
) -> tuple[int, str, str]:
    headers = {SIGNATURE_HEADER: signature} if signature is not None else {}
    async with http.post(URL(url, encoded=True), data=form, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.text()


def sign(url: str, form: list[tuple[str, str]] | dict[str, str], token: str = TOKEN) -> str:
    pairs = list(form.items()) if isinstance(form, dict) else form
    params: dict[str, list[str]] = {}
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return twilio_signature(token, url, params)  # the stdlib implementation, not the SDK's


@pytest.fixture
async def bare(events: RecordingEvents, gateways: GatewayFactory) -> Gateway:
    """A gateway for requests posted by the test itself (no simulator)."""
    return await gateways(TwilioSettings("AC" + "1" * 32, TOKEN), events)


@pytest.mark.parametrize("route", ROUTES)
async def test_unsigned_or_forged_webhooks_are_refused(
    bare: Gateway, events: RecordingEvents, http: aiohttp.ClientSession, route: str
) -> None:
    url = f"{bare.public_url}/v1/twilio/{route}/cb-1/1"
    form = FORMS[route]
    other_url = f"{bare.public_url}/v1/twilio/{route}/cb-2/1"
    for signature in (
        None,  # missing
        "",
        "RSOYDt4T1cUTdK1PDd93/VVr8B8=",  # forged
        sign(url, form, token="not-the-auth-token"),
        sign(other_url, form),  # valid, but for a different URL
        sign(url, {**form, "CallSid": "CA9"}),  # valid, but for other parameters
    ):
        status, content_type, body = await post(http, url, form, signature)
        assert (status, content_type) == (403, "application/json"), signature
        assert '"code": "invalid_signature"' in body
    assert events.nothing_called

    # The same request signed correctly goes through.
    status, _, _ = await post(http, url, form, sign(url, form))
    assert status == 200 and not events.nothing_called


async def test_signature_covers_query_and_repeated_fields(
    bare: Gateway, events: RecordingEvents, http: aiohttp.ClientSession
) -> None:
    url = f"{bare.public_url}/v1/twilio/status/cb-1/1?source=test&x=%2F"
    form = [
        ("CallSid", "CA1"),
        ("CallStatus", "initiated"),
        ("StatusCallbackEvent", "ringing"),
        ("StatusCallbackEvent", "initiated"),
    ]
    assert (await post(http, url, form, sign(url, form)))[0] == 200
    assert events.statuses("CA1") == [LegStatus.INITIATED]
    bare_url = url.split("?")[0]
    assert (await post(http, url, form, sign(bare_url, form)))[0] == 403
    assert (await post(http, url, form[:3], sign(url, form)))[0] == 403
    assert len(events.leg_events) == 1


@pytest.mark.parametrize(
    "path", ["bad$id/1", "x" * 65 + "/1", "cb-1/0", "cb-1/x", "cb-1/1001", "cb-1/%C2%B2"]
)
async def test_invalid_path_is_refused(
    bare: Gateway, events: RecordingEvents, http: aiohttp.ClientSession, path: str
) -> None:
    url = f"{bare.public_url}/v1/twilio/status/{path}"
    form = FORMS["status"]
    status, _, body = await post(http, url, form, sign(url, form))
    assert status == 400 and '"code": "invalid_payload"' in body
    assert events.nothing_called


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("error", [Conflict("stale"), RuntimeError("boom")])
async def test_gateway_failures_hang_up_instead_of_erroring(
    bare: Gateway,
    events: RecordingEvents,
    http: aiohttp.ClientSession,
    route: str,
    error: Exception,
) -> None:
    events.fail_with = error
    url = f"{bare.public_url}/v1/twilio/{route}/cb-1/1"
    form = FORMS[route]
    status, content_type, body = await post(http, url, form, sign(url, form))
    assert not events.nothing_called
    assert status == 200
    if route == "status":
        assert body == ""
    else:
        assert content_type == "text/xml"
        assert body == '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup /></Response>'


@pytest.mark.parametrize("route", ROUTES)
async def test_a_store_outage_during_a_webhook_is_one_warning_not_a_traceback(
    bare: Gateway,
    events: RecordingEvents,
    http: aiohttp.ClientSession,
    route: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis unreachable (seen in tests/test_chaos.py) is an outage, not a bug: a warning
    without a traceback, as the REST edge logs it; Twilio still gets its answer."""
    events.fail_with = StoreUnavailable()
    url = f"{bare.public_url}/v1/twilio/{route}/cb-1/1"
    form = FORMS[route]
    with caplog.at_level(logging.INFO, logger="mobile_bridge"):
        status, _, _ = await post(http, url, form, sign(url, form))
    assert status == 200
    logged = [r for r in caplog.records if r.name.startswith("mobile_bridge")]
    assert [r.levelname for r in logged] == ["WARNING"], logged
    assert logged[0].exc_info is None and "store unreachable" in logged[0].getMessage()


async def test_voice_and_bridge_render_the_instruction(
    bare: Gateway, events: RecordingEvents, http: aiohttp.ClientSession
) -> None:
    events.on_answer_with = lambda _: Bridge("Hi", AGENT, TWILIO_NUMBER, timeout_s=15)
    events.on_bridge_with = HangUp("Bye")
    url = f"{bare.public_url}/v1/twilio/voice/cb-7/3"
    form = {"CallSid": "CA1", "CallStatus": "in-progress"}  # no AnsweredBy: AMD was off
    status, content_type, body = await post(http, url, form, sign(url, form))
    assert (status, content_type) == (200, "text/xml")
    action = f"{bare.public_url}/v1/twilio/bridge/cb-7/3"
    dial = f'<Dial action="{action}" callerId="{TWILIO_NUMBER}" method="POST" timeout="15">'
    assert dial in body
    assert events.answers == [("cb-7", 3, "CA1", AnsweredBy.UNKNOWN)]

    for dial_status, answered in (("answered", True), ("no-answer", False), ("failed", False)):
        form = {"CallSid": "CA1", "DialCallStatus": dial_status}
        status, _, body = await post(http, action, form, sign(action, form))
        assert status == 200 and body.endswith(
            '<Say language="en-US">Bye</Say><Hangup /></Response>'
        )
        assert events.bridge_results[-1] == ("cb-7", 3, "CA1", answered)
    form = {"CallSid": "CA1"}  # no DialCallStatus
    assert (await post(http, action, form, sign(action, form)))[0] == 400


async def test_webhooks_are_post_only(bare: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{bare.public_url}/v1/twilio/voice/cb-1/1") as resp:
        assert resp.status == 405
