"""How each kind of refusal is answered, in one table for both edges: its HTTP status and
``Retry-After``, and the error object REST bodies and socket.io errors carry
(docs/PROTOCOL.md section 2). Services and the core raise ``gateway.core.errors``; only
this module knows what those become on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.core.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    RateLimited,
    Refused,
    StoreUnavailable,
    Unauthenticated,
    Unavailable,
)
from gateway.wire.events import error_ack

Json = dict[str, Any]

# A store outage is usually a blip (a Redis failover, a locked SQLite file): soon, not now.
STORE_RETRY_AFTER_S = 1


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    """The HTTP status of a REST answer."""
    retry_after_s: int | None = None
    """``Retry-After`` when the error itself gives none (``Unavailable.retry_after_s``)."""


ANSWERS: dict[type[DomainError], Answer] = {
    Invalid: Answer(400),
    Unauthenticated: Answer(401),
    Forbidden: Answer(403),
    NotFound: Answer(404),
    Conflict: Answer(409),
    Refused: Answer(422),
    RateLimited: Answer(429),
    Unavailable: Answer(503),
    StoreUnavailable: Answer(503, STORE_RETRY_AFTER_S),
    DomainError: Answer(500),  # of no kind above: a bug
}

# Refusals raised by the HTTP layer itself (aiohttp's HTTPException), by status.
HTTP_LAYER_CODES = {
    400: "bad_request",
    401: "invalid_token",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

INTERNAL_STATUS = 500
INTERNAL_CODE = "internal"
INTERNAL_MESSAGE = "the gateway failed; try again"


def answer(error: DomainError) -> Answer:
    """The row of ``error``'s class, or of the nearest class above it that has one (a
    ``CallError`` is answered as the ``Conflict`` it is)."""
    return next(ANSWERS[cls] for cls in type(error).__mro__ if cls in ANSWERS)


def http_status(error: DomainError) -> int:
    return answer(error).status


def retry_after_s(error: DomainError) -> int | None:
    own = error.retry_after_s if isinstance(error, Unavailable) else None
    return own if own is not None else answer(error).retry_after_s


def error_object(code: str, message: str, **extra: Any) -> Json:
    """The error object: a REST body's ``error``, a refused ack's ``error``, the payload of
    a socket.io ``error`` event, a ``connect_error``'s ``data``."""
    return {"code": code, "message": message, **extra}


def error_of(error: DomainError) -> Json:
    return error_object(error.code, error.message, **error.extra)


def refused_ack(error: Json) -> Json:
    """A socket.io ack refusing the event (without an ack, ``error`` is the payload of an
    ``error`` event instead)."""
    fields = dict(error)
    return error_ack(fields.pop("code"), fields.pop("message"), **fields)


def json_error(
    status: int, body: Json, retry_after: int | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = str(retry_after)
    return web.json_response({"error": body}, status=status, headers=all_headers or None)


def rest_response(error: DomainError) -> web.Response:
    """The REST answer to ``error``: its status, ``{"error": {...}}``, and ``Retry-After``
    when there is one."""
    return json_error(http_status(error), error_of(error), retry_after_s(error))


def internal_response() -> web.Response:
    return json_error(INTERNAL_STATUS, error_object(INTERNAL_CODE, INTERNAL_MESSAGE))
