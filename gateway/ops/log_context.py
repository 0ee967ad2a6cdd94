"""Which call a log line is about: the call id and site that every line logged while
handling a call carries (JSON logs' ``call_id`` and ``site``), without each line naming them.

The call's records (gateway/services/call_records.py) tag the running task's context as they
load or change a call, and the edges (an HTTP request, a socket event, a timer) start each
piece of work untagged (``untagged``), so a tag never carries over to work about another
call. Plain data, no I/O: the formatter (gateway/ops/logs.py) reads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallTag:
    call_id: str
    site: str


CURRENT_CALL: ContextVar[CallTag | None] = ContextVar("membrane_log_call", default=None)


def tag_call(call_id: str, site: str) -> None:
    """From here on in this task, log lines are about this call."""
    current = CURRENT_CALL.get()
    if current is None or current.call_id != call_id or current.site != site:
        CURRENT_CALL.set(CallTag(call_id, site))


@contextmanager
def untagged() -> Iterator[None]:
    """A piece of work that starts about no call (and leaves no tag behind)."""
    token = CURRENT_CALL.set(None)
    try:
        yield
    finally:
        CURRENT_CALL.reset(token)
