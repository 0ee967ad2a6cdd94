"""The question after the call: "How likely are you to recommend us to a friend?", 0 to 10,
with an optional comment (the Net Promoter Score question).

Asked once per call that reached an agent: in the widget after a browser call, by text after
a phone call. 9 and 10 are promoters (offered the site's referral link), 7 and 8 passives,
0 to 6 detractors; a group's score is the percentage of promoters minus that of
detractors, from -100 to 100. Pure: the service (gateway/services/surveys.py) stores the
answer on the call and adds it to the agent's and branch's tallies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum

from gateway.core.call import Call, CallError, CallState, TimelineEntry

MAX_COMMENT_CHARS = 1000
ANSWER_WINDOW_S = 7 * 86_400.0
"""A call's question may be answered for this long after it ended."""

# A text answer: the score first, then anything as the comment ("9", "10!", "7 - slow").
_TEXT_ANSWER = re.compile(r"\s*(10|[0-9])(?![0-9])[\s.,;:!-]*(.*)", re.S)


class Group(StrEnum):
    PROMOTER = "promoter"
    PASSIVE = "passive"
    DETRACTOR = "detractor"


def group_of(score: int) -> Group:
    if not 0 <= score <= 10:
        raise ValueError(f"a score is 0 to 10, not {score}")
    if score >= 9:
        return Group.PROMOTER
    return Group.PASSIVE if score >= 7 else Group.DETRACTOR


def just_talked(before: Call | None, after: Call) -> bool:
    """The change from ``before`` to ``after`` ended a call that reached someone: its
    question is due."""
    completed = after.state is CallState.COMPLETED and after.connected_at is not None
    return completed and (before is None or before.state is not CallState.COMPLETED)


def check_answerable(call: Call, now: float) -> None:
    """Raises why ``call``'s question may not be answered now, if it may not: only a call
    that reached an agent and ended, within a week, once."""
    if call.state is not CallState.COMPLETED or call.connected_at is None or not call.agent_id:
        raise CallError("no_survey", "only a call that reached someone has the question")
    if call.ended_at is not None and now - call.ended_at > ANSWER_WINDOW_S:
        raise CallError("survey_closed", "the question of this call is closed")
    if call.survey_score is not None:
        raise CallError("already_answered", "this call's question was answered")


def answered(call: Call, score: int, comment: str, now: float) -> Call:
    check_answerable(call, now)
    group_of(score)
    entry = TimelineEntry(now, "survey", "You told us how likely you are to recommend us")
    return replace(
        call,
        survey_score=score,
        survey_comment=comment[:MAX_COMMENT_CHARS] or None,
        timeline=(*call.timeline, entry),
    )


def parse_text_answer(body: str) -> tuple[int, str] | None:
    """A texted answer's score and comment; None when the text is no answer."""
    found = _TEXT_ANSWER.fullmatch(body)
    if found is None:
        return None
    return int(found.group(1)), found.group(2).strip()[:MAX_COMMENT_CHARS]


@dataclass(frozen=True, slots=True)
class Tally:
    promoters: int = 0
    passives: int = 0
    detractors: int = 0

    @property
    def responses(self) -> int:
        return self.promoters + self.passives + self.detractors

    @property
    def nps(self) -> float | None:
        """Percent promoters minus percent detractors; None with no response."""
        if not self.responses:
            return None
        return round(100.0 * (self.promoters - self.detractors) / self.responses, 1)

    @classmethod
    def of(cls, counts: dict[str, int]) -> Tally:
        return cls(
            counts.get(Group.PROMOTER, 0),
            counts.get(Group.PASSIVE, 0),
            counts.get(Group.DETRACTOR, 0),
        )
