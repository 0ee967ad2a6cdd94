"""gateway.core.call: a bridged call's audio moving off a dead media worker, and what its
phone leg does when its Media Stream ends, as tables."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core import call as calls
from gateway.core.call import MAX_MEDIA_MOVES, Call, CallChannel, CallError, CallRequest

DEAD = "http://127.0.0.1:9100/v1/media/sessions/m_dead"
NEW = "http://127.0.0.1:9101/v1/media/sessions/m_new"
NEW_STREAM = "ws://127.0.0.1:9101/v1/media/sessions/m_new/stream"


def bridged() -> Call:
    """A browser call Anna took on her phone: connected, its audio on session ``DEAD``."""
    call = calls.new_call("c1", "acme", "v1", CallChannel.WEBRTC, CallRequest(), 0.0)
    call = calls.ring(call, "anna", "Anna", ("idle",), 1.0, 20.0)
    call = calls.with_media(call, DEAD, "ws://127.0.0.1:9100/stream", attempt=call.attempt)
    return calls.accept(call, "anna", "sid-1", 2.0)


def test_a_move_points_the_call_at_the_new_session_and_says_so_to_agents_only() -> None:
    moved = calls.with_moved_media(bridged(), DEAD, NEW, NEW_STREAM, 5.0)
    assert (moved.media, moved.media_stream, moved.media_moves) == (NEW, NEW_STREAM, 1)
    entry = moved.timeline[-1]
    assert (entry.at, entry.event, entry.internal) == (5.0, "media_moved", True)
    assert moved.state is calls.CallState.CONNECTED


def test_a_call_moves_once_per_lost_session() -> None:
    """The node that ran the worker and the phone's stream both report the loss: the second
    finds the call moved already, and a call over does not move."""
    moved = calls.with_moved_media(bridged(), DEAD, NEW, NEW_STREAM, 5.0)
    with pytest.raises(CallError) as e:
        calls.with_moved_media(moved, DEAD, "other", "ws://other", 5.1)
    assert e.value.code == "stale"
    over = calls.end(bridged(), "agent_hung_up", "Anna hung up", 6.0)
    with pytest.raises(CallError):
        calls.with_moved_media(over, DEAD, NEW, NEW_STREAM, 7.0)


def test_a_call_moved_as_often_as_it_may_does_not_move_again() -> None:
    worn = replace(bridged(), media_moves=MAX_MEDIA_MOVES)
    with pytest.raises(CallError) as e:
        calls.with_moved_media(worn, DEAD, NEW, NEW_STREAM, 5.0)
    assert e.value.code == "invalid_state"


@pytest.mark.parametrize(
    ("moves_now", "stream_began_at", "over", "step"),
    [
        (0, 0, False, "move"),  # the session died under the stream: move the call
        (1, 0, False, "reconnect"),  # moved meanwhile (by the node of the dead worker)
        (1, 1, False, "move"),  # the stream of the moved session died too
        (MAX_MEDIA_MOVES, MAX_MEDIA_MOVES, False, "end"),  # lost too often
        (MAX_MEDIA_MOVES, 0, False, "reconnect"),
        (0, 0, True, "end"),  # the call is over: the gateway closed the session
    ],
)
def test_what_the_phone_leg_does_when_its_stream_ends(
    moves_now: int, stream_began_at: int, over: bool, step: str
) -> None:
    call = replace(bridged(), media_moves=moves_now)
    if over:
        call = calls.end(call, "visitor_hung_up", "The visitor hung up", 6.0)
    assert calls.after_stream(call, stream_began_at) == step
