"""The simulator's ``<Gather>``, ``<Dial><Conference>`` and ``<Number url>`` whisper, and the
TwiML contract it checks them against (tests/twilio_sim/spec/TWIML.md), through the real SDK."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from test_twilio_sim import WAIT, FakeApp, app, client, sim  # noqa: F401 (fixtures)
from twilio.twiml.voice_response import Conference, Dial, Gather, Say, VoiceResponse
from twilio_sim import TwilioSim
from twilio_sim.contract import TWIML_ATTRIBUTES, check_twiml_verb

pytestmark = pytest.mark.timeout(30)

TWILIO_NUMBER = "+15005550006"
WHISPER = (
    '<Response><Gather numDigits="1" timeout="3" action="/cb/key" actionOnEmptyResult="true">'
    '<Say language="en-US">A customer. Press 1.</Say></Gather>'
    "<Say>never reached</Say></Response>"
)


async def dial(client: Any, app: FakeApp, to: str, twiml: str) -> str:  # noqa: F811
    app.twiml["start"] = twiml
    call = await client.calls.create_async(to=to, from_=TWILIO_NUMBER, url=app.url("/twiml/start"))
    return str(call.sid)


@pytest.mark.parametrize(("press", "digits"), [("1", "1"), ("2", "2"), ("42#", "4")])
async def test_gather_posts_the_scripted_key_to_its_action(
    sim: TwilioSim,  # noqa: F811
    app: FakeApp,  # noqa: F811
    client: Any,  # noqa: F811
    press: str,
    digits: str,
) -> None:
    sim.phone("+15551240001", answer_after=0.5, press=press)
    app.twiml["key"] = "<Response><Say>Thanks</Say></Response>"
    sid = await dial(client, app, "+15551240001", WHISPER)
    call = await sim.wait_for_call(sid=sid, status="completed", timeout=WAIT)
    (posted,) = app.of("/cb/key")
    assert posted.get("Digits") == digits and posted.get("CallSid") == sid
    assert call.said == ["A customer. Press 1.", "Thanks"], "the action's TwiML replaces the rest"
    assert [v.detail["Digits"] for v in call.verbs_named("Gather")] == [digits]
    assert call.notifications == []


async def test_silence_posts_no_digits_only_with_action_on_empty_result(
    sim: TwilioSim,  # noqa: F811
    app: FakeApp,  # noqa: F811
    client: Any,  # noqa: F811
) -> None:
    sim.phone("+15551240002", answer_after=0.5)  # never presses anything
    sid = await dial(client, app, "+15551240002", WHISPER)
    await sim.wait_for_call(sid=sid, status="completed", timeout=WAIT)
    (posted,) = app.of("/cb/key")
    assert posted.get("Digits") is None
    fall_through = WHISPER.replace(' actionOnEmptyResult="true"', "")
    sid = await dial(client, app, "+15551240002", fall_through)
    call = await sim.wait_for_call(sid=sid, status="completed", timeout=WAIT)
    assert len(app.of("/cb/key")) == 1, "no second action request"
    assert call.said[-1] == "never reached", "without input the next verb runs"


async def test_conference_bridges_two_legs_and_ends_when_one_with_end_on_exit_leaves(
    sim: TwilioSim,  # noqa: F811
    app: FakeApp,  # noqa: F811
    client: Any,  # noqa: F811
) -> None:
    agent, customer = "+15551240003", "+15551240004"
    sim.phone(agent, answer_after=0.5)
    sim.phone(customer, answer_after=1.0, hangup_after=2.0)
    room = (
        '<Response><Dial action="/cb/left"><Conference endConferenceOnExit="true" beep="false">'
        "room-1</Conference></Dial></Response>"
    )
    a = await dial(client, app, agent, room.replace(' endConferenceOnExit="true"', ""))
    c = await dial(client, app, customer, room)
    await sim.wait_for_call(sid=c, status="completed", timeout=WAIT)
    await sim.wait_for_call(sid=a, status="completed", timeout=WAIT)
    record = sim.conference("room-1")
    assert record is not None and record.sid.startswith("CF")
    assert record.participants == [a, c] and sorted(record.bridged) == sorted([a, c])
    assert record.ended and record.ended_by == c
    left = app.of("/cb/left")
    assert {r.get("CallSid") for r in left} == {a, c}
    assert all(r.get("DialCallStatus") == "answered" for r in left)
    assert all(r.get("DialCallSid") is None for r in left), "no DialCallSid for a conference"


async def test_number_url_whisper_decides_whether_the_dial_connects(
    sim: TwilioSim,  # noqa: F811
    app: FakeApp,  # noqa: F811
    client: Any,  # noqa: F811
) -> None:
    customer, agent = "+15551240005", "+15551240006"
    sim.phone(customer, answer_after=0.5, hangup_after=30)
    sim.phone(agent, answer_after=0.5, press="2")
    app.twiml["whisper"] = WHISPER
    app.twiml["key"] = "<Response><Hangup/></Response>"
    bridge = (
        '<Response><Dial action="/cb/done"><Number url="/twiml/whisper">'
        f"{agent}</Number></Dial></Response>"
    )
    sid = await dial(client, app, customer, bridge)
    await sim.wait_for_call(sid=sid, status="completed", timeout=WAIT)
    (done,) = app.of("/cb/done")
    assert done.get("DialBridged") == "false", "the agent hung up in the whisper"
    (key,) = app.of("/cb/key")
    assert key.get("Digits") == "2" and key.get("ParentCallSid") == sid


def test_the_twiml_contract_names_what_the_sdk_names() -> None:
    """The attribute table is Twilio's own helper library's ([PY] in spec/TWIML.md)."""

    def camel(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(p.capitalize() for p in rest)

    for tag, method in (
        ("Gather", VoiceResponse.gather),
        ("Say", VoiceResponse.say),
        ("Conference", Dial.conference),
    ):
        names = {
            camel(p) for p in inspect.signature(method).parameters if p not in ("self", "kwargs")
        }
        names -= {"message", "name"}  # the element's text
        assert names == TWIML_ATTRIBUTES[tag], tag
    assert {Gather.__name__, Say.__name__, Conference.__name__} == {"Gather", "Say", "Conference"}


@pytest.mark.parametrize(
    ("tag", "attrs", "parent", "problem"),
    [
        ("Gather", {"numDigits": "0"}, None, "numDigits"),
        ("Gather", {"timeout": "soon"}, None, "timeout"),
        ("Gather", {"actionOnEmptyResult": "yes"}, None, "true or false"),
        ("Gather", {"finishOnKey": "x"}, None, "finishOnKey"),
        ("Gather", {"action": " "}, None, "13338"),
        ("Gather", {"numDigit": "1"}, None, "no attribute"),
        ("Dial", {}, "Gather", "nested"),
        ("Conference", {}, None, "inside"),
        ("Conference", {"endConferenceOnExit": "1"}, "Dial", "true or false"),
        ("Conference", {"beep": "loud"}, "Dial", "beep"),
        ("Say", {"loop": "-1"}, None, "loop"),
    ],
)
def test_twiml_the_contract_refuses(
    tag: str, attrs: dict[str, str], parent: str | None, problem: str
) -> None:
    problems = check_twiml_verb(tag, attrs, parent)
    assert problems and problem in problems[0]


def test_twiml_the_gateway_sends_passes_the_contract() -> None:
    assert check_twiml_verb("Gather", {"numDigits": "1", "timeout": "8"}, None) == []
    assert check_twiml_verb("Say", {"language": "en-US"}, "Gather") == []
    ok = {"startConferenceOnEnter": "true", "endConferenceOnExit": "true", "beep": "false"}
    assert check_twiml_verb("Conference", ok, "Dial") == []
