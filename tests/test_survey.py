"""The question after the call, as rules (gateway/core/survey.py): groups, the score of a
group, what a texted answer says, and which calls may be answered."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core import survey
from gateway.core.call import Call, CallChannel, CallError, CallState
from gateway.core.survey import Group, Tally

T0 = 1_800_000_000.0


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        ("9", (9, "")),
        (" 10! ", (10, "")),
        ("6 - it took two tries", (6, "it took two tries")),
        ("0, never again", (0, "never again")),
        ("10 great", (10, "great")),
        ("11", None),
        ("100", None),
        ("nine", None),
        ("STOP", None),
        ("", None),
        ("-3", None),
    ],
)
def test_a_texted_answer_starts_with_its_score(body: str, parsed: tuple[int, str] | None) -> None:
    assert survey.parse_text_answer(body) == parsed


def test_groups_and_the_score_of_a_group() -> None:
    assert [survey.group_of(n) for n in (0, 6, 7, 8, 9, 10)] == [
        Group.DETRACTOR,
        Group.DETRACTOR,
        Group.PASSIVE,
        Group.PASSIVE,
        Group.PROMOTER,
        Group.PROMOTER,
    ]
    with pytest.raises(ValueError):
        survey.group_of(11)
    assert Tally().nps is None
    assert Tally(promoters=3, passives=1, detractors=1).nps == 40.0
    assert Tally(detractors=2).nps == -100.0
    assert Tally.of({"promoter": 2, "detractor": 1}).responses == 3


def talked() -> Call:
    return Call(
        "c_1",
        "acme",
        "v_1",
        CallChannel.WEBRTC,
        CallState.COMPLETED,
        T0,
        agent_id="anna",
        connected_at=T0 + 5,
        ended_at=T0 + 300,
    )


def test_only_a_call_that_reached_someone_is_answered_once_within_a_week() -> None:
    call = talked()
    answered = survey.answered(call, 9, "thanks", T0 + 400)
    assert (answered.survey_score, answered.survey_comment) == (9, "thanks")
    assert answered.timeline[-1].event == "survey"
    for refused, code, when in (
        (answered, "already_answered", T0 + 500),
        (call, "survey_closed", T0 + 300 + survey.ANSWER_WINDOW_S + 1),
        (replace(call, connected_at=None), "no_survey", T0 + 400),
        (replace(call, state=CallState.CONNECTED, ended_at=None), "no_survey", T0 + 400),
    ):
        with pytest.raises(CallError) as error:
            survey.answered(refused, 5, "", when)
        assert error.value.code == code


def test_the_question_is_due_once_when_a_call_that_reached_someone_ends() -> None:
    done = talked()
    live = replace(done, state=CallState.CONNECTED, ended_at=None)
    assert survey.just_talked(live, done)
    assert not survey.just_talked(done, replace(done, survey_score=9)), "ended already"
    assert not survey.just_talked(live, replace(done, connected_at=None, state=CallState.FAILED))
