"""A call as its history keeps it, once it has ended (gateway/store/history.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HistoryRow:
    call_id: str
    site: str
    channel: str
    outcome: str
    """The final state: completed, failed or canceled."""
    reason: str | None
    agent_id: str | None
    branch: str | None
    created_at: float
    connected_at: float | None
    ended_at: float | None
    survey_score: int | None
    timeline: str
    """The timeline as JSON: ``[[at, event, detail], ...]`` (what the customer saw)."""
    promised_at: float | None = None
    """A callback: the time the customer was last told to expect it."""
    experiment: str | None = None
    arm: str | None = None
    """The routing experiment running when the call was made, and the call's arm in it."""
    on_time: bool | None = None
    """A callback that was due: reached within the site's ``late_after_s`` of the time last
    promised (judged when it ended). None for a browser call, and for a callback canceled
    before anyone was reached."""

    @property
    def to_first_human_s(self) -> float | None:
        return None if self.connected_at is None else self.connected_at - self.created_at
