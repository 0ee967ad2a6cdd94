"""The one table of how each refusal is answered (gateway/edge/errors.py): every kind of
gateway/core/errors.py has its status, Retry-After comes from the error or the table, and the
error object is the same on REST and socket.io (docs/PROTOCOL.md section 2)."""

from __future__ import annotations

import inspect
import json

import pytest

from gateway.core import errors
from gateway.core.call import CallError
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
    draining,
    overloaded,
)
from gateway.edge.errors import ANSWERS, error_of, http_status, rest_response, retry_after_s

KINDS = [
    cls
    for cls in vars(errors).values()
    if inspect.isclass(cls) and issubclass(cls, DomainError) and cls is not DomainError
]


@pytest.mark.parametrize("kind", KINDS, ids=[k.__name__ for k in KINDS])
def test_every_kind_of_error_has_its_own_answer(kind: type[DomainError]) -> None:
    assert kind in ANSWERS


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (Invalid("bad"), 400, None),
        (Invalid("bad", code="invalid_phone"), 400, None),
        (Unauthenticated(), 401, None),
        (Forbidden("no", code="role_mismatch"), 403, None),
        (NotFound(), 404, None),
        (Conflict("busy", code="call_in_progress"), 409, None),
        (CallError("call_ended", "the call has already ended"), 409, None),
        (Refused("quiet_hours", "night"), 422, None),
        (RateLimited("slow", code="ip_rate_limited"), 429, None),
        (draining(7), 503, 7),
        (overloaded(1200), 503, None),
        (StoreUnavailable(), 503, 1),
        (DomainError("a bug"), 500, None),
    ],
    ids=lambda v: v.code if isinstance(v, DomainError) else None,
)
def test_status_and_retry_after(error: DomainError, status: int, retry_after: int | None) -> None:
    assert (http_status(error), retry_after_s(error)) == (status, retry_after)
    response = rest_response(error)
    assert response.status == status
    assert response.headers.get("Retry-After") == (
        None if retry_after is None else str(retry_after)
    )
    assert response.text is not None
    assert json.loads(response.text) == {"error": error_of(error)}


def test_the_error_object_carries_extra_fields_not_retry_after() -> None:
    assert error_of(overloaded(1200)) == {
        "code": "overloaded",
        "message": "the gateway is busy; try again in a moment",
        "retry_after_ms": 1200,
    }
    assert error_of(draining(1)) == {
        "code": "draining",
        "message": "this node is shutting down; retry (elsewhere)",
    }
    # Byte for byte what REST sent before the table existed.
    body = rest_response(NotFound("no call 'x'")).body
    assert body == b'{"error": {"code": "not_found", "message": "no call \'x\'"}}'


def test_a_store_failure_keeps_its_cause_for_the_logs() -> None:
    try:
        raise StoreUnavailable() from ConnectionError("Connection refused")
    except StoreUnavailable as e:
        assert repr(e) == "StoreUnavailable(ConnectionError('Connection refused'))"
        assert e.message == "the store is unreachable; retry"
