"""What a change to a call adds to the figures a manager watches (time to the first human,
calls by outcome and channel, callbacks kept on time): pure, from the call before and after
one stored change, so that every change is counted once, by the node that made it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.call import Call, CallChannel


@dataclass(frozen=True, slots=True)
class CallFigures:
    started: bool = False
    """The call was made (a browser call started, a callback booked)."""
    ended: str | None = None
    """The final state it reached: completed, failed or canceled."""
    to_first_human_s: float | None = None
    """It reached a person: the seconds from when it was made."""
    callback_late_s: float | None = None
    """A callback reached a person: the seconds after the time last promised (negative:
    early)."""


def figures(before: Call | None, after: Call) -> CallFigures:
    """What the change from ``before`` (None: a new call) to ``after`` adds."""
    ended = after.state.value if after.final and (before is None or not before.final) else None
    to_human = late = None
    if after.connected_at is not None and (before is None or before.connected_at is None):
        to_human = max(0.0, after.connected_at - after.created_at)
        if after.channel is CallChannel.CALLBACK and after.promised_at is not None:
            late = after.connected_at - after.promised_at
    return CallFigures(before is None, ended, to_human, late)
