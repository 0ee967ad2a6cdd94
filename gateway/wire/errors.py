"""Errors that reach clients, each with a stable machine-readable code (docs/PROTOCOL.md)."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refusal the client caused; never a server fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after_s: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        """Sent as ``Retry-After`` on REST answers."""
        self.extra = extra
        """More fields of the error object, e.g. ``retry_after_ms``."""

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def invalid_payload(message: str) -> ApiError:
    return ApiError(400, "invalid_payload", message)


def invalid_token(message: str = "missing or invalid token") -> ApiError:
    return ApiError(401, "invalid_token", message)


def forbidden(message: str = "not allowed") -> ApiError:
    return ApiError(403, "forbidden", message)


def not_found(message: str = "not found") -> ApiError:
    return ApiError(404, "not_found", message)


def rate_limited(message: str = "too many requests") -> ApiError:
    return ApiError(429, "rate_limited", message)


def store_unavailable(message: str = "the store is unreachable; try again") -> ApiError:
    return ApiError(503, "store_unavailable", message)


def draining(retry_after_s: int) -> ApiError:
    return ApiError(503, "draining", "this node is shutting down; retry (elsewhere)", retry_after_s)


def overloaded(retry_after_ms: int) -> ApiError:
    return ApiError(
        503,
        "overloaded",
        "the gateway is busy; try again in a moment",
        retry_after_ms=retry_after_ms,
    )
