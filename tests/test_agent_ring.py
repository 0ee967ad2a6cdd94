"""gateway.core.agent_ring: what the phone network's answers mean for a ring, as tables."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core import agent_ring as ar
from gateway.core import call as calls
from gateway.core.agent_ring import RingDevice, RingEnd
from gateway.core.call import Call, CallChannel, CallError, CallRequest, CallState
from gateway.core.model import Channel
from gateway.core.text import english
from gateway.i18n import messages_for


def ringing(attempt: int = 1) -> Call:
    call = calls.new_call("c1", "acme", "v1", CallChannel.CALLBACK, CallRequest(), 0.0)
    for _ in range(attempt):
        if call.state is CallState.RINGING:
            call = calls.decline(call, "anna", 1.0)
        call = calls.ring(call, "anna", "Anna", ("idle",), 1.0, 20.0)
    return call


@pytest.mark.parametrize(
    ("digits", "end"),
    [
        ("1", RingEnd.ACCEPTED_BY_KEY),
        ("2", RingEnd.DECLINED_KEY),
        ("#", RingEnd.DECLINED_KEY),
        ("11", RingEnd.DECLINED_KEY),
        ("", RingEnd.NO_INPUT),
    ],
)
def test_only_the_key_1_accepts(digits: str, end: RingEnd) -> None:
    assert ar.key_pressed(digits) is end


@pytest.mark.parametrize(
    ("answered_by", "end"),
    [("machine", RingEnd.MACHINE), ("human", None), ("unknown", None)],
)
def test_a_machine_ends_the_ring_a_person_hears_the_whisper(
    answered_by: str, end: RingEnd | None
) -> None:
    assert ar.answered(answered_by) is end


@pytest.mark.parametrize(
    ("status", "end"),
    [
        ("busy", RingEnd.BUSY),
        ("no_answer", RingEnd.NO_ANSWER),
        ("failed", RingEnd.FAILED),
        ("canceled", RingEnd.NO_ANSWER),
        ("completed", RingEnd.NO_INPUT),
        ("something_new", RingEnd.FAILED),
    ],
)
def test_a_leg_that_ends_before_the_key_declines(status: str, end: RingEnd) -> None:
    assert ar.leg_ended(status) is end


def test_the_device_follows_the_channel_routing_chose() -> None:
    assert ar.device_for(Channel.WEBRTC) is RingDevice.APP
    assert ar.device_for(Channel.PSTN) is RingDevice.MOBILE


def asked(channel: CallChannel, page: str | None, language: str | None) -> Call:
    request = CallRequest(page=page, language=language)
    return calls.new_call("c1", "acme", "v1", channel, request, 0.0)


def test_the_whisper_says_what_who_where_and_which_language() -> None:
    callback = asked(CallChannel.CALLBACK, "https://x.test/pricing?utm=1", "de")
    assert ar.whisper(callback, "Acme", None, english()) == (
        "Acme callback for a customer. They were on the page /pricing. They speak German. "
        "Press 1 to take the call."
    )
    home = asked(CallChannel.WEBRTC, "https://x.test/", "pt-BR")
    assert ar.whisper(home, "Acme", None, english()) == (
        "Acme: a customer is calling from the website. They were on the home page. "
        "They speak Portuguese (Brazil). Press 1 to take the call."
    )
    assert ar.whisper(asked(CallChannel.CALLBACK, None, None), "Acme", "Mary", english()) == (
        "Acme callback for Mary. Press 1 to take the call."
    )


def test_the_whisper_is_in_the_agents_language_and_names_the_customers_in_it() -> None:
    callback = asked(CallChannel.CALLBACK, "https://x.test/preise", "en")
    assert ar.whisper(callback, "Acme", None, messages_for("de")) == (
        "Acme: Rückruf für eine Kundenanfrage. Die Anfrage kam von der Seite /preise. "
        "Gewünschte Sprache: Englisch. Drücken Sie die 1, um den Anruf anzunehmen."
    )


@pytest.mark.parametrize("code", ["xx", "en-", "-", "zz-ZZ-nonsense", "de_DE@x"])
def test_a_language_babel_does_not_know_is_said_as_it_is(code: str) -> None:
    assert ar.language_name(code) == code


def test_the_leg_is_the_one_placed_for_that_ring() -> None:
    call = ar.leg_placed(ringing(), 1, "CA1", 2.0)
    assert ar.is_leg(call, 1, "CA1") and ar.has_leg(call)
    assert not ar.is_leg(call, 1, "CA2")
    assert not ar.is_leg(call, 2, "CA1")
    assert ar.ring_devices(call) == ["mobile"]
    assert ar.leg_placed(call, 1, "CA1", 3.0) is call  # a repeat notes nothing twice
    with pytest.raises(CallError):
        ar.leg_placed(call, 2, "CA1", 3.0)  # not the current ring
    over = calls.decline(call, "anna", 3.0)
    with pytest.raises(CallError):
        ar.leg_placed(over, 1, "CA1", 3.0)


def test_a_later_ring_on_the_app_has_no_leg() -> None:
    call = ar.leg_placed(ringing(), 1, "CA1", 2.0)
    again = calls.ring(calls.decline(call, "anna", 3.0), "anna", "Anna", (), 4.0, 20.0)
    again = ar.rang_on(again, RingDevice.APP, 4.0)
    assert not ar.has_leg(again) and not ar.is_leg(again, 2, "CA1")
    assert ar.ring_devices(again) == ["mobile", "app"]


def test_each_ring_ends_once_and_is_read_back() -> None:
    call = ringing(2)
    assert ar.ring_end_of(call, 2) is None
    ended = ar.ring_ended(call, 2, RingDevice.MOBILE, RingEnd.MACHINE, 5.0)
    assert ar.ring_end_of(ended, 2) is RingEnd.MACHINE
    assert ar.ring_end_of(ended, 1) is None
    assert ar.ring_ended(ended, 2, RingDevice.MOBILE, RingEnd.TIMEOUT, 6.0) is ended
    entry = ended.timeline[-1]
    assert entry.internal and entry.detail == "mobile: machine (ring 2)"


def connected_callback() -> Call:
    call = calls.start_dial(ar.leg_placed(ringing(), 1, "CA1", 2.0), 2.0)
    return replace(call, state=CallState.CONNECTED, provider_id="CAv")


def test_a_screened_bridge_is_known_by_its_dial_and_agent_only() -> None:
    call = connected_callback()
    assert not ar.screened_now(call), "the earlier mobile ring is no screen, at any time"
    screened = ar.screening(call, 2.0)
    assert ar.screened_now(screened) and ar.ring_devices(screened) == ["mobile", "mobile"]
    assert ar.screen_end_of(screened) is None
    declined = ar.screen_ended(screened, 1, RingEnd.DECLINED_KEY, 3.0)
    assert ar.screen_end_of(declined) is RingEnd.DECLINED_KEY
    with pytest.raises(CallError):
        ar.screen_ended(declined, 2, RingEnd.ACCEPTED_BY_KEY, 3.0)  # another dial
    ben = ar.next_agent(declined, 1, "ben", ("idle",), 4.0)
    assert ben.agent_id == "ben" and ben.tried[-1] == "anna"
    assert not ar.screened_now(ben) and ar.screen_end_of(ben) is None
    assert ben.timeline[-1].event == "transfer" and not ben.timeline[-1].internal
