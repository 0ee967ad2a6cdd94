"""Twilio's webhook for a bridged phone leg whose Media Stream ended: the ``<Connect action>``
of every ``ConnectMedia`` that names its call (mobile_bridge.twilio_webhooks.render).

``POST /v1/twilio/media/{call_id}/{stream}`` (the stream's number in the call, from 1),
signature-verified as every webhook is, with the
leg's ``CallSid``. The stream ends when the call is over (the gateway closed the session),
or when the media worker holding the session died. The answer comes from the audio bridge
(``MediaStreamEvents``): a new ``<Connect><Stream>`` to the session the call's audio moved
to, or ``<Hangup/>``. A ``CallSid`` that is not the call's bridged leg is refused
(``unknown_leg``); any failure of ours hangs the leg up rather than answer Twilio with a 500.
"""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.core.errors import DomainError, Invalid
from gateway.edge.http import appkeys as keys
from gateway.settings import Settings
from gateway.telephony import MediaStreamEvents
from mobile_bridge.twilio_webhooks import (
    HANG_UP_TWIML,
    MEDIA_ROUTE,
    WebhookSignatures,
    WebhookUrls,
    error_response,
    render,
    twiml_response,
    verified,
)

log = logging.getLogger(__name__)


class MediaWebhooks:
    def __init__(self, settings: Settings) -> None:
        self._signatures = WebhookSignatures.of(settings)
        self._urls = WebhookUrls.from_public_url(settings.public_url)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(MEDIA_ROUTE, self.stream_ended)

    @staticmethod
    def _events(request: web.Request) -> MediaStreamEvents:
        return request.app[keys.CALLS].bridge

    async def stream_ended(self, request: web.Request) -> web.Response:
        try:
            hook = await verified(request, self._signatures)
            call_sid = hook.params.get("CallSid")
            if not call_sid:
                raise Invalid("CallSid is required")
            moves = hook.attempt - 1  # the call's audio moves as the stream began
            instruction = await self._events(request).on_stream_ended(hook.call_id, moves, call_sid)
        except DomainError as e:
            return error_response(e, request)
        except Exception:
            log.exception("the end of a bridged leg's stream failed for %s", request.path)
            return twiml_response(HANG_UP_TWIML)
        return twiml_response(render(instruction, "", base=self._urls.base))
