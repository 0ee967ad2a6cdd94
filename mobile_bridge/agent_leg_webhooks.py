"""Twilio's webhooks for the call to an agent's own phone (gateway.services.mobile_ring), and
the REST requests that place and end it.

Three routes per ring, keyed by the callback's ``call_id`` and the ring (its ``attempt``):
- ``voice``: the agent's phone answered (with ``AnsweredBy``: machine detection is on); the
  answer is the whisper inside ``<Gather numDigits="1" actionOnEmptyResult="true">``.
- ``key``: the ``<Gather action>``, with the key the agent pressed (``Digits``, empty on
  silence); the answer puts the agent into the callback's room, or hangs up.
- ``status``: the leg's progress (busy, no answer, failed, completed end the ring).

Each is signature-verified as the callback legs' webhooks are (``verified``), and the gateway
checks that the posted ``CallSid`` is the leg it placed for that ring (``Forbidden``
otherwise, counted under its code). Twilio never sees a 500: on a failure the leg hangs up.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from twilio.twiml.voice_response import VoiceResponse

from gateway.core.errors import DomainError, Invalid
from gateway.edge.http import appkeys as keys
from gateway.settings import Settings
from gateway.telephony import (
    AgentInstruction,
    AgentLegEvents,
    AgentRingRequest,
    Proceed,
    ScreenEvents,
    Whisper,
)
from mobile_bridge.twilio_webhooks import (
    HANG_UP_TWIML,
    LEG_STATUSES,
    SCREEN_ROUTE,
    Webhook,
    WebhookSignatures,
    answered_by_from,
    error_response,
    render,
    twiml_response,
    verified,
)

log = logging.getLogger(__name__)

AGENT_VOICE_ROUTE: Final = "/v1/twilio/agent/voice/{call_id}/{attempt}"
AGENT_KEY_ROUTE: Final = "/v1/twilio/agent/key/{call_id}/{attempt}"
AGENT_STATUS_ROUTE: Final = "/v1/twilio/agent/status/{call_id}/{attempt}"
SCREEN_KEY_ROUTE: Final = "/v1/twilio/screen-key/{call_id}/{attempt}"

STATUS_EVENTS: Final = ("initiated", "ringing", "answered", "completed")


@dataclass(frozen=True, slots=True)
class AgentLegUrls:
    base: str

    @classmethod
    def from_public_url(cls, public_url: str) -> AgentLegUrls:
        return cls(public_url.rstrip("/"))

    def voice(self, call_id: str, ring: int) -> str:
        return self.base + AGENT_VOICE_ROUTE.format(call_id=call_id, attempt=ring)

    def key(self, call_id: str, ring: int) -> str:
        return self.base + AGENT_KEY_ROUTE.format(call_id=call_id, attempt=ring)

    def status(self, call_id: str, ring: int) -> str:
        return self.base + AGENT_STATUS_ROUTE.format(call_id=call_id, attempt=ring)

    def screen_key(self, call_id: str, dials: int) -> str:
        return self.base + SCREEN_KEY_ROUTE.format(call_id=call_id, attempt=dials)


def ring_options(request: AgentRingRequest, urls: AgentLegUrls) -> dict[str, Any]:
    """``calls.create`` options of the agent's leg: synchronous machine detection, so the
    voice webhook carries ``AnsweredBy`` and a voicemail never hears the whisper."""
    return {
        "to": request.to,
        "from_": request.caller_id,
        "url": urls.voice(request.call_id, request.ring),
        "method": "POST",
        "status_callback": urls.status(request.call_id, request.ring),
        "status_callback_method": "POST",
        "status_callback_event": list(STATUS_EVENTS),
        "timeout": request.timeout_s,
        "machine_detection": "Enable",
    }


def render_agent(instruction: AgentInstruction, key_url: str, base: str = "") -> str:
    """TwiML for the agent's leg; a ``Whisper`` posts the key pressed (or none) to
    ``key_url``; webhooks of other instructions go under ``base`` (``render``)."""
    if isinstance(instruction, Proceed):
        return str(VoiceResponse())  # the whisper is over: the <Dial> connects
    if not isinstance(instruction, Whisper):
        return render(instruction, "", base=base)
    response = VoiceResponse()
    gather = response.gather(
        num_digits=1,
        timeout=instruction.timeout_s,
        action=key_url,
        method="POST",
        # Silence posts an empty Digits too, rather than falling through to the next verb.
        action_on_empty_result=True,
    )
    gather.say(instruction.say, language=instruction.language)
    return str(response)


def tell_twiml(say: str) -> str:
    response = VoiceResponse()
    response.say(say)
    response.hangup()
    return str(response)


def _param(params: Any, name: str) -> str:
    value = params.get(name)
    if not value:
        raise Invalid(f"{name} is required")
    return str(value)


def _call_sid(params: Any) -> str:
    return _param(params, "CallSid")


class AgentLegWebhooks:
    def __init__(self, settings: Settings) -> None:
        self._signatures = WebhookSignatures.of(settings)
        self._urls = AgentLegUrls.from_public_url(settings.public_url)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(AGENT_VOICE_ROUTE, self.voice)
        app.router.add_post(AGENT_KEY_ROUTE, self.key)
        app.router.add_post(AGENT_STATUS_ROUTE, self.status)
        app.router.add_post(SCREEN_ROUTE, self.screen)
        app.router.add_post(SCREEN_KEY_ROUTE, self.screen_key)

    @staticmethod
    def _events(request: web.Request) -> AgentLegEvents:
        return request.app[keys.CALLBACKS].devices

    @staticmethod
    def _screen(request: web.Request) -> ScreenEvents:
        return request.app[keys.CALLBACKS].screen

    async def _twiml(
        self,
        request: web.Request,
        what: str,
        step: Callable[[Webhook], Awaitable[AgentInstruction]],
        key_url: Callable[[str, int], str],
    ) -> web.Response:
        """Verify, take ``step``, and answer its instruction as TwiML whose key presses go to
        ``key_url``; Twilio never sees a 500: a failure of ours hangs the leg up."""
        try:
            hook = await verified(request, self._signatures)
            instruction = await step(hook)
        except DomainError as e:
            return error_response(e, request)
        except Exception:
            log.exception("%s failed for %s", what, request.path)
            return twiml_response(HANG_UP_TWIML)
        key = key_url(hook.call_id, hook.attempt)
        return twiml_response(render_agent(instruction, key, self._urls.base))

    async def screen(self, request: web.Request) -> web.Response:
        """A screened bridge's agent answered: the whisper (its parent is the visitor)."""

        def step(hook: Webhook) -> Awaitable[AgentInstruction]:
            parent = _param(hook.params, "ParentCallSid")
            return self._screen(request).on_screen(
                hook.call_id, hook.attempt, parent, _call_sid(hook.params)
            )

        return await self._twiml(request, "screening", step, self._urls.screen_key)

    async def screen_key(self, request: web.Request) -> web.Response:
        def step(hook: Webhook) -> Awaitable[AgentInstruction]:
            parent = _param(hook.params, "ParentCallSid")
            return self._screen(request).on_screen_key(
                hook.call_id,
                hook.attempt,
                parent,
                _call_sid(hook.params),
                hook.params.get("Digits", ""),
            )

        return await self._twiml(request, "the screened key press", step, self._urls.screen_key)

    async def voice(self, request: web.Request) -> web.Response:
        def step(hook: Webhook) -> Awaitable[AgentInstruction]:
            sid = _call_sid(hook.params)
            answered_by = answered_by_from(hook.params.get("AnsweredBy"))
            return self._events(request).on_agent_answer(
                hook.call_id, hook.attempt, sid, answered_by
            )

        return await self._twiml(request, "the agent's answer", step, self._urls.key)

    async def key(self, request: web.Request) -> web.Response:
        def step(hook: Webhook) -> Awaitable[AgentInstruction]:
            sid = _call_sid(hook.params)
            digits = hook.params.get("Digits", "")
            return self._events(request).on_agent_key(hook.call_id, hook.attempt, sid, digits)

        return await self._twiml(request, "the agent's key press", step, self._urls.key)

    async def status(self, request: web.Request) -> web.Response:
        try:
            hook = await verified(request, self._signatures)
            sid = _call_sid(hook.params)
            raw = hook.params.get("CallStatus", "")
            status = LEG_STATUSES.get(raw)
            if status is None:
                raise Invalid(f"unknown CallStatus {raw!r}")
            await self._events(request).on_agent_leg_event(hook.call_id, hook.attempt, sid, status)
        except DomainError as e:
            return error_response(e, request)
        except Exception:
            # Twilio does not retry status callbacks: acknowledge, the failure is ours.
            log.exception("the agent's leg status failed for %s", request.path)
        return web.Response(status=200)
