"""Twilio's Messaging webhook (``POST /v1/twilio/sms``): presence by SMS, customers' STOP
and START (gateway/services/text_consent.py), and their answers to the question after the
call (gateway/services/surveys.py).

The operator sets this URL (``{public_url}/v1/twilio/sms``, HTTP POST) as the "A message
comes in" webhook of each number in a site's ``caller_ids``. The request must carry a valid
``X-Twilio-Signature``, checked exactly as the voice webhooks' (``WebhookSignatures``); a
refusal is answered 403 with the stable error body and counted under its code. A verified
keyword (STOP, START) goes to ``TextConsent``, a customer's answer to the question after
their call to ``Surveys``, any other message to the gateway's ``SmsPresence``; the reply
comes back as TwiML ``<Response><Message>``, which Twilio sends to the sender. A replay or a
failure of ours gets an empty ``<Response/>``: no second reply, and Twilio never sees a
500.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web
from multidict import MultiDict, MultiMapping
from twilio.twiml.messaging_response import MessagingResponse

from gateway.core.errors import DomainError, Forbidden, Invalid, StoreUnavailable
from gateway.edge.http import appkeys as keys
from gateway.services.sms_presence import InboundSms
from gateway.settings import Settings
from mobile_bridge.twilio_webhooks import (
    SIGNATURE_HEADER,
    WebhookSignatures,
    error_response,
    twiml_response,
)

log = logging.getLogger(__name__)

SMS_ROUTE: Final = "/v1/twilio/sms"
MAX_BODY_CHARS: Final = 1600
"""Twilio's limit for one message body; a longer one is not a presence command anyway."""


def message_from(params: MultiMapping[str]) -> InboundSms:
    """The webhook's form, translated; raises ``invalid_payload``."""

    def required(name: str) -> str:
        value = params.get(name)
        if not value:
            raise Invalid(f"{name} is required")
        return value

    return InboundSms(
        account_sid=required("AccountSid"),
        message_sid=required("MessageSid"),
        from_=required("From"),
        to=required("To"),
        body=params.get("Body", "")[:MAX_BODY_CHARS],
    )


def render(text: str | None) -> str:
    """TwiML that replies ``text`` to the sender, or sends nothing."""
    response = MessagingResponse()
    if text:
        response.message(text)
    return str(response)


class SmsWebhooks:
    def __init__(self, settings: Settings) -> None:
        self._signatures = WebhookSignatures.of(settings)
        self._account_sid = settings.twilio.account_sid

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(SMS_ROUTE, self.inbound)

    async def inbound(self, request: web.Request) -> web.Response:
        try:
            message = message_from(await self._verified(request))
            if message.account_sid != self._account_sid:
                # Signed with our token, yet for another account: not ours to act on.
                raise Forbidden("the message is for another Twilio account", code="forbidden")
        except DomainError as e:
            return error_response(e, request)
        consent = request.app[keys.TEXT_CONSENT]
        try:
            reply = None
            if consent.handles(message):
                await consent.handle(message)
            else:
                answered, reply = await request.app[keys.SURVEYS].answer_by_text(message)
                if not answered:
                    reply = await request.app[keys.SMS_PRESENCE].handle(message)
        except StoreUnavailable as e:
            log.warning("SMS %s not handled: store unreachable (%r)", message.message_sid, e)
            reply = None
        except DomainError as e:
            log.warning("SMS %s refused: %s %s", message.message_sid, e.code, e.message)
            reply = None
        except Exception:
            log.exception("SMS %s failed", message.message_sid)
            reply = None
        return twiml_response(render(reply))

    async def _verified(self, request: web.Request) -> MultiDict[str]:
        params: MultiDict[str] = MultiDict()
        for name, value in (await request.post()).items():
            if isinstance(value, str):  # Twilio never uploads files; ignore any that come
                params.add(name, value)
        signature = request.headers.get(SIGNATURE_HEADER)
        if not self._signatures.valid(request.raw_path, params, signature):
            message = (
                f"missing {SIGNATURE_HEADER}"
                if not signature
                else f"{SIGNATURE_HEADER} does not match this request"
            )
            log.warning("rejected Twilio webhook %s: %s", request.path, message)
            raise Forbidden(message, code="invalid_signature")
        return params
