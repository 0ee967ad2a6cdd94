"""The promise rules (gateway/core/promise.py) over plain calls: when a waiting callback's
customer is told it runs late, when they get a reminder, and when it is next looked at."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core import callback as cb
from gateway.core import promise
from gateway.core.call import Call, CallError, CallRequest, CallState
from gateway.core.model import CallbackPolicy
from gateway.core.promise import Notice

T0 = 1_800_000_000.0
POLICY = CallbackPolicy(late_after_s=300, late_notice_ahead_s=900, reminder_interval_s=1800)


def booked(at: float | None = T0 + 3600, promised_at: float | None = None) -> Call:
    return cb.new_callback(
        "c_1", "acme", "v_1", "+353861110001", "h", CallRequest(), T0, at, T0, None, promised_at
    )


def test_a_promise_is_judged_only_near_its_time_and_only_a_real_slip_is_told() -> None:
    call = booked()
    slipping = T0 + 3600 + 301
    # An hour ahead the queue says little: nothing, whatever it predicts.
    assert promise.review(call, T0, slipping, POLICY) is None
    assert promise.next_review(call, T0, POLICY) == T0 + 3600 - 900
    within = T0 + 3600 - 900
    assert promise.review(call, within, slipping, POLICY) is Notice.LATE
    assert promise.review(call, within, T0 + 3600 + 300, POLICY) is None  # within the margin
    assert promise.review(call, within, None, POLICY) is None  # nobody working: cannot say
    # Within the window it is looked at every minute.
    assert promise.next_review(call, within, POLICY) == within + promise.RECHECK_S


def test_told_late_the_new_time_is_the_promise_and_the_customer_may_keep_or_move() -> None:
    call = booked()
    now = T0 + 3000
    late = cb.running_late(call, T0 + 4500, texting=True, now=now)
    assert (late.promised_at, late.told_at, late.texts) == (T0 + 4500, now, 1)
    assert promise.awaiting_choice(late)
    assert promise.review(late, now + 60, T0 + 4500, POLICY) is None
    kept = cb.kept(late, now + 10)
    assert not promise.awaiting_choice(kept) and kept.timeline[-1].event == "kept"
    assert cb.kept(kept, now + 20) == kept  # nothing open: no change
    moved = cb.moved(late, T0 + 7200, now + 10)
    assert not promise.awaiting_choice(moved) and moved.promised_at == T0 + 7200
    # A callback that no longer waits offers no choice, and cannot be told it runs late.
    ringing = replace(late, state=CallState.RINGING)
    assert not promise.awaiting_choice(ringing)
    with pytest.raises(CallError):
        cb.running_late(ringing, T0 + 5000, texting=False, now=now)


def test_a_waiting_customer_never_goes_a_reminder_interval_without_word() -> None:
    asap = booked(at=None, promised_at=T0 + 120)
    silent_from = T0 + 120  # the time shown; before it, they wait for a time they know
    assert promise.silent_since(asap) == silent_from
    assert promise.review(asap, silent_from + 1799, None, POLICY) is None
    assert promise.review(asap, silent_from + 1800, None, POLICY) is Notice.REMINDER
    reminded = cb.reminded(asap, texting=False, now=silent_from + 1800)
    assert reminded.texts == 0
    again = cb.reminded(reminded, texting=True, now=silent_from + 3600)
    assert [e.event for e in again.timeline].count("reminder") == 1, "one entry, the latest"
    assert (again.timeline[-1].at, again.texts) == (silent_from + 3600, 1)
    assert promise.review(reminded, silent_from + 3599, None, POLICY) is None
    assert promise.review(reminded, silent_from + 3600, None, POLICY) is Notice.REMINDER
    # (Past its time, the promise is also judged every minute: it may slip further.)
    assert promise.next_review(reminded, silent_from + 1800, POLICY) == (
        silent_from + 1800 + promise.RECHECK_S
    )
    # No promise at all (nobody was working): silence counts from the request.
    unknown = booked(at=None)
    assert promise.next_review(unknown, T0, POLICY) == T0 + 1800


def test_a_callback_being_rung_is_looked_at_again_soon_and_an_ended_one_never() -> None:
    call = booked()
    assert promise.next_review(replace(call, state=CallState.DIALING), T0, POLICY) == (
        T0 + promise.RECHECK_S
    )
    assert promise.next_review(replace(call, state=CallState.COMPLETED), T0, POLICY) is None
    assert promise.review(replace(call, state=CallState.RINGING), T0 + 9999, None, POLICY) is None


def test_a_promise_follows_every_time_the_customer_is_told_of() -> None:
    call = booked()
    assert call.promised_at == T0 + 3600
    assert cb.postpone(call, T0 + 50_000, "closed", "closed", T0).promised_at == T0 + 50_000
    texted = cb.texted(call, T0 + 5)
    assert (texted.texts, texted.told_at) == (1, T0 + 5)
