"""Twilio's webhooks for callback legs, translated to and from ``gateway.telephony``.

Three routes per leg, keyed by the callback's ``call_id`` and ``attempt`` in the path:
- ``voice``: the visitor answered; Twilio asks for TwiML (with ``AnsweredBy`` when AMD is on).
- ``status``: call progress (initiated, ringing, answered, completed and the failure endings).
- ``bridge``: the ``<Dial action>``, posted when the bridge to the agent's phone ends.

Every request must carry a valid ``X-Twilio-Signature`` over the public URL Twilio called;
nothing reaches ``CallbackEvents`` otherwise, and there its ``CallSid`` must be the leg of the
attempt the path names (else 403 ``unknown_leg``). Every refusal is counted under its code.
Twilio must never see a 500: when the gateway fails, the leg is hung up (voice, bridge) or
the callback acknowledged (status).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from multidict import MultiDict, MultiMapping
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from gateway.core.errors import DomainError, Forbidden, Invalid, StoreUnavailable
from gateway.edge.errors import rest_response
from gateway.edge.http import appkeys as keys
from gateway.settings import Settings
from gateway.telephony import (
    AnsweredBy,
    Bridge,
    CallbackEvents,
    ConnectMedia,
    HangUp,
    Instruction,
    JoinRoom,
    LegEvent,
    LegStatus,
)

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Twilio-Signature"

VOICE_ROUTE: Final = "/v1/twilio/voice/{call_id}/{attempt}"
STATUS_ROUTE: Final = "/v1/twilio/status/{call_id}/{attempt}"
BRIDGE_ROUTE: Final = "/v1/twilio/bridge/{call_id}/{attempt}"
SCREEN_ROUTE: Final = "/v1/twilio/screen/{call_id}/{attempt}"
"""The whisper run on a screened bridge's agent leg (``<Number url>``;
mobile_bridge.agent_leg_webhooks)."""
MEDIA_ROUTE: Final = "/v1/twilio/media/{call_id}/{attempt}"
"""A bridged leg's ``<Connect action>``: its Media Stream ended. The ``attempt`` is the
stream's number in the call, from 1 (the call's audio moves as it began, plus one;
mobile_bridge.media_webhooks)."""

CALL_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
"""Also safe in a URL path segment as it is, so webhook URLs need no quoting."""
MAX_ATTEMPT: Final = 1000
_DIGITS: Final = re.compile(r"[0-9]{1,9}")
"""ASCII digits only: ``str.isdigit`` also accepts characters ``int`` refuses (such as "²")."""

LEG_STATUSES: Final[Mapping[str, LegStatus]] = {
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
"""Twilio's ``CallStatus`` values (WEBHOOKS.md section 1)."""

MACHINE_ANSWERS: Final = frozenset(
    {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"}
)

AGENT_ANSWERED_DIAL_STATUSES: Final = frozenset({"completed", "answered"})
"""``DialCallStatus`` values that mean the dialled agent picked up (TWIML.md, ``<Dial>``)."""


# --- translation: pure functions ---------------------------------------------------------------


def valid_leg_key(call_id: str, attempt: int) -> bool:
    """Whether ``call_id`` and ``attempt`` can name a leg in a webhook path."""
    return CALL_ID_PATTERN.fullmatch(call_id) is not None and 1 <= attempt <= MAX_ATTEMPT


def answered_by_from(value: str | None) -> AnsweredBy:
    if value == "human":
        return AnsweredBy.HUMAN
    if value in MACHINE_ANSWERS:
        return AnsweredBy.MACHINE
    # "unknown", absent (AMD off) or a value Twilio adds later: the gateway decides what to risk.
    return AnsweredBy.UNKNOWN


def agent_answered(dial_call_status: str) -> bool:
    return dial_call_status in AGENT_ANSWERED_DIAL_STATUSES


def _required(params: MultiMapping[str], name: str) -> str:
    value = params.get(name)
    if not value:
        raise Invalid(f"{name} is required")
    return value


def _optional_int(params: MultiMapping[str], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if _DIGITS.fullmatch(value) is None:
        raise Invalid(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def leg_event_from(call_id: str, attempt: int, params: MultiMapping[str]) -> LegEvent:
    """A status callback's form, translated; raises ``invalid_payload``."""
    call_status = _required(params, "CallStatus")
    status = LEG_STATUSES.get(call_status)
    if status is None:
        raise Invalid(f"unknown CallStatus {call_status!r}")
    answered_by = params.get("AnsweredBy")
    return LegEvent(
        call_id=call_id,
        attempt=attempt,
        provider_id=_required(params, "CallSid"),
        status=status,
        answered_by=answered_by_from(answered_by) if answered_by else None,
        duration_s=_optional_int(params, "CallDuration"),
        sequence=_optional_int(params, "SequenceNumber"),
    )


def render(
    instruction: Instruction, bridge_action_url: str, screen_url: str = "", base: str = ""
) -> str:
    """The TwiML document for ``instruction``; a ``Bridge`` reports back to the action URL,
    and a screened one runs ``screen_url`` on the agent's leg before it connects. A
    ``ConnectMedia`` of a call asks ``base`` + ``MEDIA_ROUTE`` what next when its stream
    ends."""
    response = VoiceResponse()
    if isinstance(instruction, Bridge):
        if instruction.say:
            response.say(instruction.say, language=instruction.language)
        dial = response.dial(
            caller_id=instruction.caller_id,
            timeout=instruction.timeout_s,
            action=bridge_action_url,
            method="POST",
        )
        if instruction.screen and screen_url:
            dial.number(instruction.number, url=screen_url, method="POST")
        else:
            dial.number(instruction.number)
    elif isinstance(instruction, ConnectMedia):
        if instruction.say:
            response.say(instruction.say, language=instruction.language)
        # Bidirectional: the stream carries the browser's audio back to the phone. When the
        # stream ends, the gateway says what next: a stream to the session the call's audio
        # moved to (its media worker died), or hang up. Without an action the leg just ends.
        action = None
        if instruction.call_id and base:
            stream = instruction.moves + 1
            route = MEDIA_ROUTE.format(call_id=instruction.call_id, attempt=stream)
            action = base + route
        connect = response.connect(action=action, method="POST" if action else None)
        connect.stream(url=instruction.url)
    elif isinstance(instruction, JoinRoom):
        if instruction.say:
            response.say(instruction.say, language=instruction.language)
        # Without an action URL the leg simply ends with the room.
        room = response.dial(
            action=bridge_action_url or None, method="POST" if bridge_action_url else None
        )
        room.conference(
            instruction.room,
            start_conference_on_enter=True,
            end_conference_on_exit=instruction.end_on_exit,
            beep=False,
        )
    else:
        if instruction.say:
            response.say(instruction.say, language=instruction.language)
        response.hangup()
    return str(response)


HANG_UP_TWIML: Final = render(HangUp(), "")


# --- URLs and signatures -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookUrls:
    """The absolute URLs Twilio is given for one leg, all under the public URL."""

    base: str
    """``Settings.public_url`` without a trailing slash."""

    @classmethod
    def from_public_url(cls, public_url: str) -> WebhookUrls:
        return cls(public_url.rstrip("/"))

    def voice(self, call_id: str, attempt: int) -> str:
        return self.base + VOICE_ROUTE.format(call_id=call_id, attempt=attempt)

    def status(self, call_id: str, attempt: int) -> str:
        return self.base + STATUS_ROUTE.format(call_id=call_id, attempt=attempt)

    def bridge(self, call_id: str, attempt: int) -> str:
        return self.base + BRIDGE_ROUTE.format(call_id=call_id, attempt=attempt)

    def screen(self, call_id: str, attempt: int) -> str:
        return self.base + SCREEN_ROUTE.format(call_id=call_id, attempt=attempt)


class WebhookSignatures:
    """Checks ``X-Twilio-Signature`` against the URL Twilio called, rebuilt from the public
    URL: behind a proxy ``request.url`` names this host, not the one Twilio signed."""

    def __init__(self, auth_token: str, public_url: str, previous_auth_token: str = "") -> None:
        if not auth_token:
            # An empty key would accept signatures anyone can compute.
            raise ValueError("the Twilio auth token is required to verify webhooks")
        # While the token is rotated, Twilio signs with either until the new one is primary.
        tokens = (auth_token, previous_auth_token) if previous_auth_token else (auth_token,)
        self._validators = tuple(RequestValidator(t) for t in tokens)
        self._base = public_url.rstrip("/")

    @classmethod
    def of(cls, settings: Settings) -> WebhookSignatures:
        """The signatures of webhooks to this node: under its public URL, with the current
        auth token (and the previous one while it is rotated)."""
        t = settings.twilio
        return cls(t.auth_token, settings.public_url, t.previous_auth_token)

    def url_for(self, path_qs: str) -> str:
        """``path_qs``: the request's raw path and query, exactly as received."""
        return self._base + path_qs

    def valid(self, path_qs: str, params: MultiMapping[str], signature: str | None) -> bool:
        if not signature:
            return False
        # The SDK sorts names, appends every (deduplicated) value of a repeated field, compares
        # in constant time, and accepts the URL with and without an explicit default port.
        url = self.url_for(path_qs)
        return any(v.validate(url, params, signature) for v in self._validators)


# --- the aiohttp edge --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Webhook:
    """A request whose signature was verified and whose path named a valid leg."""

    call_id: str
    attempt: int
    params: MultiDict[str]


def error_response(error: DomainError, request: web.Request) -> web.Response:
    """The refusal, counted under its code when the app keeps the gateway's metrics (a
    forged signature is worth an alert)."""
    metrics = request.app.get(keys.METRICS)
    if metrics is not None:
        metrics.errors.labels(error.code).inc()
    return rest_response(error)


def twiml_response(document: str) -> web.Response:
    return web.Response(text=document, content_type="text/xml")


class TwilioWebhooks:
    """The three webhook handlers; ``add_routes`` registers them on the gateway's app."""

    def __init__(self, settings: Settings, events: CallbackEvents) -> None:
        self._signatures = WebhookSignatures.of(settings)
        self._urls = WebhookUrls.from_public_url(settings.public_url)
        self._events = events

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(VOICE_ROUTE, self.voice)
        app.router.add_post(STATUS_ROUTE, self.status)
        app.router.add_post(BRIDGE_ROUTE, self.bridge)

    async def voice(self, request: web.Request) -> web.Response:
        try:
            hook = await self._verified(request)
            call_sid = _required(hook.params, "CallSid")
        except DomainError as e:
            return error_response(e, request)
        answered_by = answered_by_from(hook.params.get("AnsweredBy"))
        try:
            instruction = await self._events.on_answer(
                hook.call_id, hook.attempt, call_sid, answered_by
            )
        except Forbidden as e:  # refused (unknown_leg), not a failure
            return error_response(e, request)
        except Exception as e:
            _log_failure("on_answer", hook, e)
            return twiml_response(HANG_UP_TWIML)
        return twiml_response(self._render(instruction, hook))

    async def status(self, request: web.Request) -> web.Response:
        try:
            hook = await self._verified(request)
            event = leg_event_from(hook.call_id, hook.attempt, hook.params)
        except DomainError as e:
            return error_response(e, request)
        try:
            await self._events.on_leg_event(event)
        except Forbidden as e:  # refused (unknown_leg), not a failure
            return error_response(e, request)
        except Exception as e:
            # Twilio does not retry status callbacks: acknowledge, the failure is ours to log.
            _log_failure("on_leg_event", hook, e)
        return web.Response(status=200)

    async def bridge(self, request: web.Request) -> web.Response:
        try:
            hook = await self._verified(request)
            call_sid = _required(hook.params, "CallSid")
            dial_status = _required(hook.params, "DialCallStatus")
        except DomainError as e:
            return error_response(e, request)
        if dial_status == "canceled":
            # The visitor hung up while the agent's phone rang: their own leg's completed
            # status ends the callback; this is not the agent failing to answer.
            return twiml_response(HANG_UP_TWIML)
        answered = agent_answered(dial_status)
        try:
            instruction = await self._events.on_bridge_result(
                hook.call_id, hook.attempt, call_sid, answered
            )
        except Forbidden as e:  # refused (unknown_leg), not a failure
            return error_response(e, request)
        except Exception as e:
            _log_failure("on_bridge_result", hook, e)
            return twiml_response(HANG_UP_TWIML)
        return twiml_response(self._render(instruction, hook))

    def _render(self, instruction: Instruction, hook: Webhook) -> str:
        key = (hook.call_id, hook.attempt)
        return render(
            instruction, self._urls.bridge(*key), self._urls.screen(*key), self._urls.base
        )

    async def _verified(self, request: web.Request) -> Webhook:
        return await verified(request, self._signatures)


async def verified(request: web.Request, signatures: WebhookSignatures) -> Webhook:
    """The signed form and the leg its path names (``call_id``, ``attempt``); raises
    ``Forbidden`` or ``Invalid``."""
    params: MultiDict[str] = MultiDict()
    for name, value in (await request.post()).items():
        if isinstance(value, str):  # Twilio never uploads files; ignore any that come
            params.add(name, value)
    signature = request.headers.get(SIGNATURE_HEADER)
    # raw_path is the request target as sent (path and query, still percent-encoded),
    # which is what Twilio signed after the public base URL.
    if not signatures.valid(request.raw_path, params, signature):
        message = (
            f"missing {SIGNATURE_HEADER}"
            if not signature
            else f"{SIGNATURE_HEADER} does not match this request"
        )
        log.warning("rejected Twilio webhook %s: %s", request.path, message)
        raise Forbidden(message, code="invalid_signature")
    call_id = request.match_info["call_id"]
    raw_attempt = request.match_info["attempt"]
    attempt = int(raw_attempt) if _DIGITS.fullmatch(raw_attempt) else 0
    if not valid_leg_key(call_id, attempt):
        raise Invalid("the webhook path does not name a callback leg")
    return Webhook(call_id, attempt, params)


def _log_failure(what: str, hook: Webhook, error: Exception) -> None:
    if isinstance(error, StoreUnavailable):
        # An outage, not a bug: no traceback (one per webhook while Redis is away).
        log.warning(
            "%s failed for %s:%s: store unreachable (%r)", what, hook.call_id, hook.attempt, error
        )
    elif isinstance(error, DomainError):
        log.warning(
            "%s refused for %s:%s: %s %s",
            what,
            hook.call_id,
            hook.attempt,
            error.code,
            error.message,
        )
    else:
        log.error("%s failed for %s:%s", what, hook.call_id, hook.attempt, exc_info=error)
