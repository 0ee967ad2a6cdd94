"""``Telephony`` over Twilio's REST API (async SDK), and its installer.

``install`` is registered under the ``membrane.telephony`` entry point: it adds the webhook
routes (``mobile_bridge.twilio_webhooks``; ``sms_webhooks`` for presence by SMS) to the
gateway's app and returns a ``TwilioTelephony``, which the app opens with ``start()`` and
closes with ``close()``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Collection
from datetime import datetime
from typing import Any, Final

import aiohttp
from aiohttp import web
from twilio.base.exceptions import (
    TwilioException,
    TwilioRestException,
    TwilioServiceException,
)
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from gateway.settings import Settings
from gateway.telephony import (
    AgentRingRequest,
    CallbackEvents,
    DialRequest,
    TelephonyError,
    TelephonyInstaller,
)
from mobile_bridge.agent_leg_webhooks import (
    AgentLegUrls,
    AgentLegWebhooks,
    ring_options,
    tell_twiml,
)
from mobile_bridge.media.pool import MediaWorkers
from mobile_bridge.media_webhooks import MediaWebhooks
from mobile_bridge.sms_webhooks import SmsWebhooks
from mobile_bridge.twilio_webhooks import TwilioWebhooks, WebhookUrls, valid_leg_key

STATUS_EVENTS: Final = ("initiated", "ringing", "answered", "completed")

ALREADY_ENDED_CODES: Final = frozenset({21220, 20404})
"""Answers to a hang-up that mean the call is not running: 21220 "Call is not in-progress";
20404, no such call (Twilio only deletes a call record once the call has ended)."""

FIND_LEG_LIMIT: Final = 20
"""How many of the newest calls to one number ``find_leg`` looks through (newest first)."""

REQUEST_TIMEOUT_S: Final = 10.0

UNSUBSCRIBED: Final = 21610
"""Twilio's answer to a message for a number that texted STOP to the sender."""


def refusal(what: str, status: int, twilio_code: int | None, message: str) -> TelephonyError:
    """A ``TelephonyError`` for an HTTP error answer from Twilio's API."""
    detail = f"{what}: Twilio answered {status} (error {twilio_code}): {message}"
    if twilio_code == UNSUBSCRIBED:
        return TelephonyError("opted_out", detail, retryable=False)
    if status in (401, 403):
        # Wrong account SID or auth token: no retry can fix it.
        return TelephonyError("telephony_auth_failed", detail, retryable=False)
    if status == 429 or status >= 500:
        return TelephonyError("telephony_unavailable", detail, retryable=True)
    # Any other 4xx: Twilio refused this request (invalid number, caller ID not allowed...).
    return TelephonyError("telephony_refused", detail, retryable=False)


class TwilioTelephony:
    """Places, finds and ends the visitor's legs; the webhooks report what became of them."""

    def __init__(self, settings: Settings, request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self._twilio = settings.twilio
        self._urls = WebhookUrls.from_public_url(settings.public_url)
        self._agent_urls = AgentLegUrls.from_public_url(settings.public_url)
        self._request_timeout_s = request_timeout_s
        self._http: Any = None  # AsyncTwilioHttpClient; the SDK is untyped
        self._client: Any = None
        self.media_bridge: MediaWorkers | None = (
            MediaWorkers(
                settings.media, settings.twilio.auth_token, settings.twilio.previous_auth_token
            )
            if settings.media.workers
            else None
        )
        """The node's media workers (``CarriesMedia``), started and stopped with it."""

    async def start(self) -> None:
        if self._http is not None:
            return
        if self.media_bridge is not None:
            await self.media_bridge.start()
        # The async client opens an aiohttp session, which needs the running loop.
        http = AsyncTwilioHttpClient()
        client = Client(self._twilio.account_sid, self._twilio.auth_token, http_client=http)
        if self._twilio.api_base_url:
            # Every v2010 resource (Calls included) builds its URLs from this domain's base.
            client.api.base_url = self._twilio.api_base_url.rstrip("/")
        self._http, self._client = http, client

    async def close(self) -> None:
        http, self._http, self._client = self._http, None, None
        if http is not None:
            await http.close()
        if self.media_bridge is not None:
            await self.media_bridge.stop()

    async def dial(self, request: DialRequest) -> str:
        if not valid_leg_key(request.call_id, request.attempt):
            # Its webhooks would all be refused: do not place a leg nobody could drive.
            raise TelephonyError(
                "telephony_refused",
                f"dial: {request.call_id!r} attempt {request.attempt} cannot name a webhook",
                retryable=False,
            )
        options: dict[str, Any] = {
            "to": request.to,
            "from_": request.caller_id,
            "url": self._urls.voice(request.call_id, request.attempt),
            "method": "POST",
            "status_callback": self._urls.status(request.call_id, request.attempt),
            "status_callback_method": "POST",
            "status_callback_event": list(STATUS_EVENTS),
            "timeout": request.timeout_s,
        }
        if request.machine_detection:
            # Synchronous AMD: the voice webhook waits for detection and carries AnsweredBy.
            options["machine_detection"] = "Enable"
        call = await self._api("dial", self._calls().create_async(**options))
        return str(call.sid)

    async def find_leg(self, request: DialRequest, since: float) -> str | None:
        calls = await self._api(
            "find_leg",
            self._calls().list_async(to=request.to, from_=request.caller_id, limit=FIND_LEG_LIMIT),
        )
        # date_created has whole seconds: a leg placed in the same second as `since` counts.
        cutoff = math.floor(since)
        for call in calls:  # newest first
            created = call.date_created
            if (
                call.direction == "outbound-api"
                and isinstance(created, datetime)
                and created.timestamp() >= cutoff
            ):
                return str(call.sid)
        return None

    async def hang_up(self, provider_id: str) -> None:
        # "completed" also cancels a leg that has not answered yet, so one request covers both.
        await self._api(
            "hang_up",
            self._calls()(provider_id).update_async(status="completed"),
            ignore_codes=ALREADY_ENDED_CODES,
        )

    async def ring_agent(self, request: AgentRingRequest) -> str:
        if not valid_leg_key(request.call_id, request.ring):
            raise TelephonyError(
                "telephony_refused",
                f"ring_agent: {request.call_id!r} ring {request.ring} cannot name a webhook",
                retryable=False,
            )
        options = ring_options(request, self._agent_urls)
        call = await self._api("ring_agent", self._calls().create_async(**options))
        return str(call.sid)

    async def tell_and_hang_up(self, provider_id: str, say: str) -> None:
        # New TwiML for the live leg: it leaves whatever it was in (the room) and hears it.
        await self._api(
            "tell_and_hang_up",
            self._calls()(provider_id).update_async(twiml=tell_twiml(say)),
            ignore_codes=ALREADY_ENDED_CODES,
        )

    async def send_text(self, to: str, from_: str, body: str) -> str:
        create = self._messages().create_async(to=to, from_=from_, body=body)
        message = await self._api("send_text", create)
        return str(message.sid)

    def _messages(self) -> Any:
        if self._client is None:
            raise RuntimeError("TwilioTelephony.start() was not called")
        return self._client.messages

    def _calls(self) -> Any:
        if self._client is None:
            raise RuntimeError("TwilioTelephony.start() was not called")
        return self._client.calls

    async def _api(
        self, what: str, request: Awaitable[Any], ignore_codes: Collection[int] = ()
    ) -> Any:
        """Await one SDK request, translating every failure into a ``TelephonyError``."""
        try:
            async with asyncio.timeout(self._request_timeout_s):
                return await request
        except TwilioRestException as e:
            if e.code in ignore_codes:
                return None
            raise refusal(what, e.status, e.code, str(e.msg)) from e
        except TwilioServiceException as e:
            if e.code in ignore_codes:
                return None
            raise refusal(what, e.status, e.code, str(e.detail or e.title)) from e
        except TwilioException as e:
            status, twilio_code, message = _page_error(e)
            if twilio_code in ignore_codes:
                return None
            raise refusal(what, status, twilio_code, message) from e
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            # After a timeout or a dropped connection the request may still have been carried
            # out: a retry of a dial should first ask find_leg.
            raise TelephonyError(
                "telephony_unavailable", f"{what}: Twilio unreachable: {e!r}", retryable=True
            ) from e


def _page_error(error: Any) -> tuple[int, int | None, str]:
    """Status, Twilio code and message of the error a list request raises: paging reports an
    HTTP error as ``TwilioException("Unable to fetch page", response)``."""
    response = error.args[1] if len(error.args) > 1 else None
    status = getattr(response, "status_code", None)
    if not isinstance(status, int):
        return 500, None, str(error)  # no answer to judge by: treat as a server fault
    try:
        body = json.loads(getattr(response, "text", "") or "")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return status, None, str(error.args[0])
    code = body.get("code")
    return status, code if isinstance(code, int) else None, str(body.get("message", ""))


def install(app: web.Application, settings: Settings, events: CallbackEvents) -> TwilioTelephony:
    """Register the Twilio webhooks on ``app`` and return the REST side (not started yet)."""
    TwilioWebhooks(settings, events).add_routes(app)
    SmsWebhooks(settings).add_routes(app)
    AgentLegWebhooks(settings).add_routes(app)
    MediaWebhooks(settings).add_routes(app)
    return TwilioTelephony(settings)


_installer: TelephonyInstaller = install  # mypy checks that install fits the seam
