"""Programmable Messaging in the simulator (spec/MESSAGING.md): inbound SMS to a number's
"A message comes in" webhook, with the TwiML ``<Message>`` reply sent back, and outbound
messages through the Messages REST resource (``client.messages.create``).

A test registers the account's number with its webhook (``sim.messaging.number(...)``), then
has a phone text it (``await sim.messaging.text(from_, to, body)``): the simulator posts the
signed webhook, records the answer and every ``<Message>`` reply, and returns the record.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING
from urllib.parse import urljoin

import aiohttp
from aiohttp import web

from .contract import API_VERSION, TwilioApiError, is_absolute_url
from .contract_messaging import (
    INBOUND_SMS_PARAMS,
    MESSAGE_NOUNS,
    MESSAGE_PATH,
    MESSAGES_PATH,
    MESSAGING_VERBS,
    MessagingContract,
    check_message_resource,
)
from .records import Notification, WebhookRecord
from .signature import SIGNATURE_HEADER, sdk_signature
from .twiml import Node, TwimlError, parse

if TYPE_CHECKING:
    from .server import TwilioSim

TWIML_CONTENT_TYPES = frozenset({"text/xml", "application/xml", "text/html"})
GSM_SEGMENT = 160  # characters in one single-part SMS (multi-part: 153 each)
PRICE_PER_SEGMENT = 0.0079
MAX_REDIRECTS = 10
# spec/MESSAGING.md section 4: Twilio's default opt-out handling.
OPT_OUT_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"}
)
OPT_IN_WORDS = frozenset({"START", "YES", "UNSTOP"})
OPT_OUT_REPLY = (
    "You have successfully been unsubscribed. You will not receive any more messages from"
    " this number. Reply START to resubscribe."
)
OPT_IN_REPLY = (
    "You have successfully been re-subscribed to messages from this number. Reply HELP for"
    " help. Reply STOP to unsubscribe."
)
UNSUBSCRIBED = 21610


@dataclass
class IncomingNumber:
    """A number of the account, with its Messaging webhook (what an operator sets)."""

    number: str
    sms_url: str
    sms_method: str = "POST"


@dataclass
class MessageRecord:
    sid: str
    account_sid: str
    direction: str  # inbound | outbound-api | outbound-reply
    from_: str
    to: str
    body: str
    status: str
    date_created: datetime
    date_updated: datetime
    date_sent: datetime | None = None
    params: dict[str, list[str]] = field(default_factory=dict)
    """The REST form (outbound-api) or the webhook form (inbound)."""
    statuses: list[str] = field(default_factory=list)
    webhooks: list[WebhookRecord] = field(default_factory=list)
    replies: list[MessageRecord] = field(default_factory=list)
    """``<Message>`` replies the application answered an inbound message with."""
    notifications: list[Notification] = field(default_factory=list)
    in_reply_to: str | None = None

    @property
    def reply_bodies(self) -> list[str]:
        return [r.body for r in self.replies]


def new_message_sid() -> str:
    return "SM" + uuid.uuid4().hex


def rfc2822(dt: datetime) -> str:
    return format_datetime(dt.astimezone(UTC).replace(microsecond=0))


def segments(body: str) -> int:
    return 1 if len(body) <= GSM_SEGMENT else math.ceil(len(body) / 153)


class Messaging:
    def __init__(self, sim: TwilioSim) -> None:
        self.sim = sim
        self.contract = MessagingContract.from_sdk()
        self.numbers: dict[str, IncomingNumber] = {}
        self.messages: list[MessageRecord] = []
        self._by_sid: dict[str, MessageRecord] = {}
        self.opted_out: set[tuple[str, str]] = set()
        """(the account's number, the phone) pairs whose phone texted STOP to the number."""

    def add_routes(self, app: web.Application) -> None:
        messages = MESSAGES_PATH.replace("{AccountSid}", "{account_sid}")
        one = MESSAGE_PATH.replace("{AccountSid}", "{account_sid}").replace("{Sid}", "{sid}")
        app.router.add_post(messages, self._create)
        app.router.add_get(one, self._fetch)

    # --- the test's side -------------------------------------------------------------------

    def number(self, number: str, *, sms_url: str) -> IncomingNumber:
        """The account owns ``number``; a message to it is posted to ``sms_url`` (POST: the
        simulator does not offer GET webhooks for messages)."""
        config = IncomingNumber(number, sms_url)
        self.numbers[number] = config
        return config

    def message(self, sid: str) -> MessageRecord:
        return self._by_sid[sid]

    def sent_to(self, number: str) -> list[MessageRecord]:
        """Every message sent to ``number`` (REST or TwiML reply), in order."""
        return [m for m in self.messages if m.to == number and m.direction != "inbound"]

    async def text(
        self,
        from_: str,
        to: str,
        body: str,
        *,
        message_sid: str | None = None,
        params: dict[str, str] | None = None,
    ) -> MessageRecord:
        """The phone ``from_`` texts the account's number ``to``. Returns once the webhook was
        answered (and its TwiML run). ``message_sid`` re-sends a known sid (a replay);
        ``params`` adds to or overrides the webhook's form (a test of a forged one)."""
        config = self.numbers.get(to)
        if config is None:
            raise KeyError(f"{to} is not a number of this account; call number() first")
        now = self.sim.now()
        sid = message_sid or new_message_sid()
        record = MessageRecord(
            sid, self.sim.account_sid, "inbound", from_, to, body, "received", now, now, now
        )
        form = self._inbound_form(record)
        form.update(params or {})
        record.params = {k: [v] for k, v in form.items()}
        record.statuses.append("received")
        self._remember(record)
        word = body.strip().upper()
        if word in OPT_OUT_WORDS | OPT_IN_WORDS:
            if word in OPT_OUT_WORDS:
                self.opted_out.add((to, from_))
            else:
                self.opted_out.discard((to, from_))
            self._reply(record, to, from_, OPT_OUT_REPLY if word in OPT_OUT_WORDS else OPT_IN_REPLY)
        await self._deliver(record, config.sms_url, config.sms_method, list(form.items()))
        return record

    def _inbound_form(self, record: MessageRecord) -> dict[str, str]:
        form = {
            "MessageSid": record.sid,
            "SmsSid": record.sid,
            "SmsMessageSid": record.sid,
            "AccountSid": record.account_sid,
            "From": record.from_,
            "To": record.to,
            "Body": record.body,
            "NumMedia": "0",
            "NumSegments": str(segments(record.body)),
            "SmsStatus": "received",
            "ApiVersion": API_VERSION,
        }
        for side, number in (("From", record.from_), ("To", record.to)):
            for part in ("City", "State", "Zip"):
                form[side + part] = ""
            form[side + "Country"] = "US" if number.startswith("+1") else ""
        assert set(form) <= INBOUND_SMS_PARAMS
        return form

    async def _deliver(
        self, record: MessageRecord, url: str, method: str, params: list[tuple[str, str]]
    ) -> None:
        """Post the webhook, then run the TwiML it answers (following ``<Redirect>``)."""
        for _ in range(MAX_REDIRECTS):
            hook, content_type = await self._request("sms", url, method, params)
            record.webhooks.append(hook)
            if hook.error is not None or hook.status is None or not 200 <= hook.status < 300:
                record.notifications.append(
                    Notification(11200, f"{url}: HTTP retrieval failure {hook.status}")
                )
                return
            if not hook.body.strip():
                return  # an empty answer: no reply (Twilio logs nothing)
            if content_type not in TWIML_CONTENT_TYPES:
                record.notifications.append(
                    Notification(12300, f"{url}: invalid Content-Type {content_type!r}")
                )
                return
            try:
                verbs = parse(hook.body, url).verbs
            except TwimlError as e:
                record.notifications.append(Notification(e.code, f"{url}: {e.message}"))
                return
            redirect = self._run(record, verbs)
            if redirect is None:
                return
            if redirect.attrs.get("method", "POST") != "POST":
                record.notifications.append(Notification(0, "only POST redirects simulated"))
            url = urljoin(url, redirect.text)
        record.notifications.append(Notification(12200, "too many <Redirect>s"))

    def _run(self, record: MessageRecord, verbs: list[Node]) -> Node | None:
        for verb in verbs:
            if verb.tag not in MESSAGING_VERBS:
                record.notifications.append(Notification(12200, f"<{verb.tag}> in Messaging"))
                continue
            if verb.tag == "Redirect":
                return verb
            body = verb.text or "".join(c.text for c in verb.children if c.tag == "Body")
            if any(c.tag not in MESSAGE_NOUNS for c in verb.children):
                record.notifications.append(Notification(12200, "unknown noun in <Message>"))
            from_, to = verb.attrs.get("from", record.to), verb.attrs.get("to", record.from_)
            if (from_, to) in self.opted_out:
                record.notifications.append(Notification(UNSUBSCRIBED, "unsubscribed recipient"))
                continue
            self._reply(record, from_, to, body, verb.attrs.get("statusCallback"))
        return None

    def _reply(
        self, record: MessageRecord, from_: str, to: str, body: str, callback: str | None = None
    ) -> None:
        now = self.sim.now()
        reply = MessageRecord(
            new_message_sid(),
            record.account_sid,
            "outbound-reply",
            from_,
            to,
            body,
            "queued",
            now,
            now,
            in_reply_to=record.sid,
        )
        reply.statuses.append("queued")
        record.replies.append(reply)
        self._remember(reply)
        self._deliver_later(reply, callback)

    # --- REST ------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        self.sim._authenticate(request)
        form = await self.sim._form(request)
        self.contract.validate_create(form)
        from_ = form["From"][0]
        if from_ not in self.numbers:
            raise TwilioApiError(
                400, 21606, f"The From phone number {from_} is not a number of this account"
            )
        if (from_, form["To"][0]) in self.opted_out:
            raise TwilioApiError(400, UNSUBSCRIBED, "Attempt to send to unsubscribed recipient")
        now = self.sim.now()
        record = MessageRecord(
            new_message_sid(),
            self.sim.account_sid,
            "outbound-api",
            from_,
            form["To"][0],
            form.get("Body", [""])[0],
            "queued",
            now,
            now,
            params=form,
        )
        record.statuses.append("queued")
        self._remember(record)
        self._deliver_later(record, form.get("StatusCallback", [None])[0])
        return web.json_response(self.resource(record), status=201)

    async def _fetch(self, request: web.Request) -> web.Response:
        self.sim._authenticate(request)
        record = self._by_sid.get(request.match_info["sid"])
        if record is None:
            raise TwilioApiError(404, 20404, f"The requested resource {request.path} was not found")
        return web.json_response(self.resource(record))

    def resource(self, r: MessageRecord) -> dict[str, object]:
        """The Message resource as the SDK reads it, checked against the contract."""
        uri = MESSAGE_PATH.replace("{AccountSid}", r.account_sid).replace("{Sid}", r.sid)
        base = uri.removesuffix(".json")
        sent = r.status in ("sent", "delivered", "received")
        obj: dict[str, object] = {
            "account_sid": r.account_sid,
            "api_version": API_VERSION,
            "body": r.body,
            "date_created": rfc2822(r.date_created),
            "date_sent": rfc2822(r.date_sent) if r.date_sent else None,
            "date_updated": rfc2822(r.date_updated),
            "direction": r.direction,
            "error_code": None,
            "error_message": None,
            "from": r.from_,
            "messaging_service_sid": None,
            "num_media": "0",
            "num_segments": str(segments(r.body)),
            "price": f"-{PRICE_PER_SEGMENT * segments(r.body):.5f}" if sent else None,
            "price_unit": "USD",
            "sid": r.sid,
            "status": r.status,
            "subresource_uris": {
                "media": f"{base}/Media.json",
                "feedback": f"{base}/Feedback.json",
            },
            "to": r.to,
            "uri": uri,
        }
        check_message_resource(self.contract, obj)
        return obj

    # --- delivery --------------------------------------------------------------------------

    def _remember(self, record: MessageRecord) -> None:
        self.messages.append(record)
        self._by_sid[record.sid] = record
        self.sim._notify()

    def _deliver_later(self, record: MessageRecord, callback: str | None) -> None:
        if callback is not None and not is_absolute_url(callback):
            record.notifications.append(Notification(21609, f"invalid statusCallback {callback}"))
            callback = None
        self.sim._spawn(self._progress(record, callback), f"twilio-sim-sms-{record.sid}")

    async def _progress(self, record: MessageRecord, callback: str | None) -> None:
        """queued -> sent -> delivered, a simulated second apart, each to ``callback``."""
        for status in ("sent", "delivered"):
            await asyncio.sleep(self.sim.scaled(1.0))
            record.status = status
            record.statuses.append(status)
            record.date_updated = self.sim.now()
            if status == "sent":
                record.date_sent = record.date_updated
            self.sim._notify()
            if callback is not None:
                params = [
                    ("MessageSid", record.sid),
                    ("SmsSid", record.sid),
                    ("AccountSid", record.account_sid),
                    ("From", record.from_),
                    ("To", record.to),
                    ("MessageStatus", status),
                    ("SmsStatus", status),
                    ("ApiVersion", API_VERSION),
                ]
                hook, _ = await self._request("sms-status", callback, "POST", params)
                record.webhooks.append(hook)
                self.sim._notify()

    async def _request(
        self, kind: str, url: str, method: str, params: list[tuple[str, str]]
    ) -> tuple[WebhookRecord, str]:
        signature = sdk_signature(self.sim.auth_token, url, params)
        hook = WebhookRecord(kind, url, method, params, signature, self.sim.now())
        headers = {SIGNATURE_HEADER: signature, "User-Agent": "TwilioProxy/1.1"}
        content_type = ""
        try:
            async with self.sim.session.request(method, url, data=params, headers=headers) as r:
                hook.body = await r.text()
                hook.status = r.status
                content_type = r.content_type
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            hook.error = f"{type(e).__name__}: {e}"
        return hook, content_type
