"""What a request can be refused for, as the services and the core say it: each error has a
stable machine-readable ``code`` (docs/PROTOCOL.md section 2) and a human ``message``.

The class says what kind of refusal it is; how each kind is answered (HTTP status,
``Retry-After``, the socket.io error) is decided once, at the edge (gateway/edge/errors.py).
Nothing here knows HTTP.
"""

from __future__ import annotations

from typing import ClassVar

Extra = int | str
"""A further field of the error object on the wire, e.g. ``retry_after_ms``."""


class DomainError(Exception):
    """A refusal with a stable code. ``extra`` fields travel in the error object."""

    code: str
    default_code: ClassVar[str] = "internal"
    default_message: ClassVar[str] = "the request was refused"

    def __init__(self, message: str | None = None, *, code: str | None = None, **extra: Extra):
        self.code = code if code is not None else self.default_code
        self.message = message if message is not None else self.default_message
        self.extra: dict[str, Extra] = extra
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class Invalid(DomainError):
    """The input is malformed: a field missing, of the wrong type, out of range."""

    default_code = "invalid_payload"
    default_message = "invalid payload"


class Unauthenticated(DomainError):
    """No credentials, or ones that do not prove who the caller is (missing, expired...)."""

    default_code = "invalid_token"
    default_message = "missing or invalid token"


class Forbidden(DomainError):
    """The caller is known and may not do this."""

    default_code = "forbidden"
    default_message = "not allowed"


class NotFound(DomainError):
    default_code = "not_found"
    default_message = "not found"


class Conflict(DomainError):
    """The thing is not in a state that allows this (a call not ringing, already ended...)."""

    default_code = "conflict"
    default_message = "the state changed; try again"


class Refused(DomainError):
    """A rule said no (quiet hours, a slot not open, a country not allowed): well-formed
    input that this site's policy does not accept. Always with the rule's code."""

    def __init__(self, code: str, message: str, **extra: Extra) -> None:
        super().__init__(message, code=code, **extra)


class RateLimited(DomainError):
    default_code = "rate_limited"
    default_message = "too many requests"


class Unavailable(DomainError):
    """This node cannot take the work now (draining, overloaded, full, not set up for it).
    ``retry_after_s``: when to try again, when there is a hint (sent as ``Retry-After``);
    a hint in the error object itself goes in ``extra`` (``retry_after_ms``)."""

    default_code = "unavailable"
    default_message = "not available; try again later"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        retry_after_s: int | None = None,
        **extra: Extra,
    ) -> None:
        super().__init__(message, code=code, **extra)
        self.retry_after_s = retry_after_s


class StoreUnavailable(DomainError):
    """The store did not answer or refused the operation (Redis unreachable, SQLite locked or
    unreadable). Each store backend raises it for its own failures; it is an outage, not a
    bug: retried where the work must not be lost (gateway/services/store_retry.py), answered
    as a retryable refusal elsewhere."""

    default_code = "store_unavailable"
    default_message = "the store is unreachable; retry"

    def __repr__(self) -> str:
        # Logs say what the backend said (the cause the backend chained), not the message.
        cause = self.__cause__
        return f"StoreUnavailable({cause!r})" if cause is not None else super().__repr__()


def draining(retry_after_s: int) -> Unavailable:
    return Unavailable(
        "this node is shutting down; retry (elsewhere)",
        code="draining",
        retry_after_s=retry_after_s,
    )


def overloaded(retry_after_ms: int) -> Unavailable:
    return Unavailable(
        "the gateway is busy; try again in a moment",
        code="overloaded",
        retry_after_ms=retry_after_ms,
    )
