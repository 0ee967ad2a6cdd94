"""Timer ids of calls (gateway.services.call_records): the stored form of each kind, which
timers already in a store keep, and its parse back."""

from __future__ import annotations

import pytest

from gateway.core.call import Call, CallChannel, CallState
from gateway.services.call_records import TimerId, TimerKind

STORED = [
    (TimerId(TimerKind.RING, "c_1", "2"), "ring:c_1:2"),
    (TimerId(TimerKind.VISITOR_GONE, "c_1", "sid-A"), "visitor_gone:c_1:sid-A"),
    (TimerId(TimerKind.AGENT_GONE, "c_1", "sid-B"), "agent_gone:c_1:sid-B"),
    (TimerId(TimerKind.CALLBACK_DUE, "c_1", "1:3"), "cbdue:c_1:1:3"),
    (TimerId(TimerKind.CALLBACK_DIAL, "c_1", "1"), "cbdial:c_1:1"),
    (TimerId(TimerKind.CALLBACK_WATCH, "c_1", "1"), "cbwatch:c_1:1"),
]


@pytest.mark.parametrize(("timer", "stored"), STORED, ids=[s for _, s in STORED])
def test_a_timer_id_is_stored_as_before_and_parses_back(timer: TimerId, stored: str) -> None:
    assert str(timer) == stored
    kind, _, rest = stored.partition(":")  # as the timer loop hands it over
    assert TimerId.parse(TimerKind(kind), rest) == timer


def test_a_ring_timer_is_for_the_calls_attempt() -> None:
    call = Call("c_9", "acme", "v1", CallChannel.WEBRTC, CallState.RINGING, 0.0, attempt=4)
    timer = TimerId.ring(call)
    assert str(timer) == "ring:c_9:4"
    assert timer.attempt == 4
