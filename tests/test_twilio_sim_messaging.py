"""The simulator's Programmable Messaging (tests/twilio_sim/messaging.py, spec/MESSAGING.md):
outbound messages through the real SDK, inbound SMS to a signed webhook with its TwiML reply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from multidict import MultiDict
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from twilio.twiml.messaging_response import MessagingResponse
from twilio_sim import (
    ContractViolation,
    MessagingContract,
    TwilioSim,
    check_message_resource,
    sdk_client,
)

pytestmark = pytest.mark.timeout(30)

NUMBER = "+15005550006"
PHONE = "+14155550100"


@dataclass
class App:
    """The application behind the number: answers each message with ``reply``."""

    sim: TwilioSim
    url: str = ""
    reply: str = MessagingResponse().to_xml()
    content_type: str = "text/xml"
    seen: list[tuple[str, MultiDict[str], bool]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        params: MultiDict[str] = MultiDict(
            (k, v) for k, v in (await request.post()).items() if isinstance(v, str)
        )
        valid = RequestValidator(self.sim.auth_token).validate(
            self.url + request.path_qs, params, request.headers.get("X-Twilio-Signature", "")
        )
        self.seen.append((request.path, params, valid))
        if request.path == "/status":
            return web.Response()
        return web.Response(text=self.reply, content_type=self.content_type)


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    sim = TwilioSim(time_scale=0.01)
    await sim.start()
    yield sim
    await sim.close()
    assert sim.contract_violations == []


@pytest.fixture
async def app(sim: TwilioSim) -> AsyncIterator[App]:
    app = App(sim)
    web_app = web.Application()
    web_app.router.add_post("/{tail:.*}", app.handle)
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    app.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    sim.messaging.number(NUMBER, sms_url=app.url + "/sms")
    yield app
    await runner.cleanup()


@pytest.fixture
async def client(sim: TwilioSim) -> AsyncIterator[Client]:
    async with sdk_client(sim) as client:
        yield client


async def test_a_text_is_posted_signed_and_its_message_reply_recorded(
    sim: TwilioSim, app: App
) -> None:
    response = MessagingResponse()
    response.message("You're available on your mobile until 18:00.")
    app.reply = response.to_xml()
    record = await sim.messaging.text(PHONE, NUMBER, " in ")
    path, params, valid = app.seen[-1]
    assert (path, valid) == ("/sms", True)
    assert params["Body"] == " in "
    assert params["From"] == PHONE and params["To"] == NUMBER
    assert params["MessageSid"] == record.sid and record.sid.startswith("SM")
    assert params["AccountSid"] == sim.account_sid and params["SmsStatus"] == "received"
    assert record.reply_bodies == ["You're available on your mobile until 18:00."]
    reply = record.replies[0]
    assert (reply.direction, reply.from_, reply.to) == ("outbound-reply", NUMBER, PHONE)
    assert sim.messaging.sent_to(PHONE) == [reply]
    await sim.wait_until(lambda: reply.status == "delivered")
    assert reply.statuses == ["queued", "sent", "delivered"]


async def test_an_empty_response_sends_nothing_and_a_bad_one_is_a_notification(
    sim: TwilioSim, app: App
) -> None:
    record = await sim.messaging.text(PHONE, NUMBER, "hello")
    assert record.replies == [] and record.notifications == []
    app.reply = "<Respons>"
    record = await sim.messaging.text(PHONE, NUMBER, "hello")
    assert [n.code for n in record.notifications] == [12100]
    app.reply, app.content_type = MessagingResponse().to_xml(), "application/json"
    record = await sim.messaging.text(PHONE, NUMBER, "hello")
    assert [n.code for n in record.notifications] == [12300]
    with pytest.raises(KeyError):
        await sim.messaging.text(PHONE, "+15005550009", "not our number")


async def test_messages_create_through_the_sdk(sim: TwilioSim, app: App, client: Client) -> None:
    message = await client.messages.create_async(
        to=PHONE, from_=NUMBER, body="Hello", status_callback=app.url + "/status"
    )
    assert message.sid.startswith("SM") and message.status == "queued"
    assert (message.to, message.from_, message.body) == (PHONE, NUMBER, "Hello")
    assert message.direction == "outbound-api" and message.num_segments == "1"
    assert message.date_created is not None
    record = sim.messaging.message(message.sid)
    await sim.wait_until(lambda: len(record.webhooks) == 2)
    statuses = [(p["MessageStatus"], valid) for path, p, valid in app.seen if path == "/status"]
    assert statuses == [("sent", True), ("delivered", True)]
    fetched = await client.messages(message.sid).fetch_async()
    assert fetched.status == "delivered" and fetched.date_sent is not None


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"to": PHONE, "from_": NUMBER}, 21602),  # no body
        ({"to": PHONE, "from_": "+15005550009", "body": "x"}, 21606),  # not our number
        ({"to": "0155", "from_": NUMBER, "body": "x"}, 21211),
        ({"to": PHONE, "body": "x"}, 21603),
        ({"to": PHONE, "from_": NUMBER, "body": "x" * 1601}, 21617),
    ],
)
async def test_messages_create_refusals(
    sim: TwilioSim, app: App, client: Client, options: dict[str, str], code: int
) -> None:
    with pytest.raises(TwilioRestException) as refused:
        await client.messages.create_async(**options)
    assert refused.value.code == code and refused.value.status == 400
    assert sim.messaging.sent_to(PHONE) == []


async def test_stop_opts_the_phone_out_of_the_number_until_start(
    sim: TwilioSim, app: App, client: Client
) -> None:
    """spec/MESSAGING.md section 4: Twilio answers the keyword itself, still posts it to the
    webhook, and refuses messages to the phone (21610) until it texts START."""
    response = MessagingResponse()
    response.message("Our own answer")
    app.reply = response.to_xml()
    stop = await sim.messaging.text(PHONE, NUMBER, " stop ")
    assert app.seen[-1][1]["Body"] == " stop "
    assert stop.reply_bodies[0].startswith("You have successfully been unsubscribed")
    assert len(stop.replies) == 1 and [n.code for n in stop.notifications] == [21610]
    with pytest.raises(TwilioRestException) as refused:
        await client.messages.create_async(to=PHONE, from_=NUMBER, body="x")
    assert (refused.value.status, refused.value.code) == (400, 21610)
    start = await sim.messaging.text(PHONE, NUMBER, "START")
    assert start.reply_bodies == [
        "You have successfully been re-subscribed to messages from this number. Reply HELP for"
        " help. Reply STOP to unsubscribe.",
        "Our own answer",
    ]
    message = await client.messages.create_async(to=PHONE, from_=NUMBER, body="x")
    assert message.status == "queued"


def test_the_contract_is_the_sdks_message_resource() -> None:
    contract = MessagingContract.from_sdk()
    assert {"sid", "body", "status", "direction", "num_segments", "subresource_uris"} <= (
        contract.properties
    )
    assert {"queued", "sent", "delivered", "received"} <= contract.statuses
    assert "outbound-reply" in contract.directions
    assert {"To", "From", "Body", "StatusCallback", "MediaUrl"} <= contract.create_params
    good = {name: None for name in contract.properties} | {
        "sid": "SM" + "0" * 32,
        "status": "queued",
        "direction": "outbound-api",
        "num_segments": "1",
        "num_media": "0",
        "date_created": "Wed, 02 Dec 2026 12:00:00 +0000",
    }
    check_message_resource(contract, good)
    for broken in (
        {k: v for k, v in good.items() if k != "body"},
        good | {"status": "shipped"},
        good | {"date_created": "2026-12-02T12:00:00Z"},
        good | {"num_segments": 1},
    ):
        with pytest.raises(ContractViolation):
            check_message_resource(contract, broken)
