"""Promises kept, or updated first: when a waiting callback's customer hears from us unasked.

A callback carries the time the customer was told to expect it (``Call.promised_at``): the
time they picked, the time a retry or the morning was announced for, or, for "as soon as
someone is free", the estimate they were shown. While it waits, the gateway reviews it:

- **late**: from ``late_notice_ahead_s`` before the time promised, it compares the time it
  now expects to call (from the live queue) with the promise. Later by more than
  ``late_after_s``: the customer is told now, before the time passes, with the new time,
  which becomes the promise. They may keep their place (nothing to do) or pick another time.
- **reminder**: once the time promised has come, the customer never goes longer than
  ``reminder_interval_s`` without word from us (a late notice counts as word).

Pure: the service (gateway/services/promises.py) supplies the expected time, sends the text
and applies the transitions of gateway.core.callback.
"""

from __future__ import annotations

from enum import StrEnum

from gateway.core.call import Call
from gateway.core.callback import promise_open, waiting
from gateway.core.model import CallbackPolicy

RECHECK_S = 60.0
"""Within the judging window, how often the expected time is looked at again."""


class Notice(StrEnum):
    LATE = "late"
    REMINDER = "reminder"


def silent_since(call: Call) -> float:
    """When the customer's silence began: the last word from us, or the time promised if
    later (until then they wait for a time they know, which is no silence)."""
    start = call.told_at if call.told_at is not None else call.created_at
    if call.promised_at is not None:
        start = max(start, call.promised_at)
    return start


def judged_from(call: Call, policy: CallbackPolicy) -> float | None:
    """From when the promise is judged against the queue; None: no promise to judge."""
    if call.promised_at is None:
        return None
    return call.promised_at - policy.late_notice_ahead_s


def review(
    call: Call, now: float, expected_at: float | None, policy: CallbackPolicy
) -> Notice | None:
    """What the customer of ``call`` must be told now, if anything. ``expected_at``: when the
    gateway now expects to call them; None when it cannot say (nobody is working)."""
    if not waiting(call):
        return None
    start = judged_from(call, policy)
    if (
        start is not None
        and call.promised_at is not None
        and now >= start
        and expected_at is not None
        and expected_at > call.promised_at + policy.late_after_s
    ):
        return Notice.LATE
    if now >= silent_since(call) + policy.reminder_interval_s:
        return Notice.REMINDER
    return None


def next_review(call: Call, now: float, policy: CallbackPolicy) -> float | None:
    """When to review ``call`` next; None once it has ended. A callback being rung or dialled
    is looked at again soon: a failed attempt or a declined ring has it wait once more."""
    if call.final:
        return None
    if not waiting(call):
        return now + RECHECK_S
    reminder = silent_since(call) + policy.reminder_interval_s
    start = judged_from(call, policy)
    if start is None:
        return reminder
    return min(reminder, start if start > now else now + RECHECK_S)


def needs_judging(call: Call, now: float, policy: CallbackPolicy) -> bool:
    """Whether a review now needs the expected time (worth a look at the queue)."""
    start = judged_from(call, policy)
    return start is not None and now >= start


def awaiting_choice(call: Call) -> bool:
    """The customer was told their call runs late and has not answered: the ticket offers
    to keep the place or pick another time. Keeping, moving, or the call moving on ends it."""
    return waiting(call) and promise_open(call)
