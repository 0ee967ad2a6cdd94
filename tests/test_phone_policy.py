"""Phone policy: which numbers a callback may dial, and when, as tables plus properties.

Every instant is fixed (no wall clock). DST dates used, all in 2025:
- Europe/Dublin (and Europe/London): forward Sun 30 March 01:00 UTC (01:00 GMT -> 02:00 IST),
  back Sun 26 October 01:00 UTC (02:00 IST -> 01:00 GMT).
- America/New_York: forward Sun 9 March 07:00 UTC (02:00 EST -> 03:00 EDT), back Sun
  2 November 06:00 UTC (02:00 EDT -> 01:00 EST).

phonenumbers maps Irish numbers to Europe/London (with Guernsey and the Isle of Man), not
Europe/Dublin. The two zones keep the same clock, which `test_irish_zones_keep_dublin_time`
checks, so the quiet-hour tables below are written in Dublin local time.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.core import phone_policy
from gateway.core.model import CallbackPolicy
from gateway.core.phone_policy import (
    LOOKAHEAD_S,
    MAX_RAW_LENGTH,
    CheckedNumber,
    PhoneRefused,
    check_number,
    in_quiet_hours,
    next_allowed_at,
)

HOUR = 3600.0
MINUTE = 60.0

DEFAULT = CallbackPolicy()
WIDE = replace(DEFAULT, quiet_hours_start=time(20, 0), quiet_hours_end=time(9, 0))
# Everything the default policy refuses only by country, for tests about time.
ANY_COUNTRY = replace(DEFAULT, allowed_countries=("IE", "DE", "US", "GB", "AU", "RU", "001"))

LONDONISH = ("Europe/Guernsey", "Europe/Isle_of_Man", "Europe/London")
ALL_OF_44 = ("Europe/Guernsey", "Europe/Isle_of_Man", "Europe/Jersey", "Europe/London")
DUBLIN = ZoneInfo("Europe/Dublin")
NEW_YORK = ZoneInfo("America/New_York")
BOISE = ZoneInfo("America/Boise")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> float:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC).timestamp()


def local(zone: ZoneInfo, y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> float:
    return datetime(y, mo, d, h, mi, s, tzinfo=zone).timestamp()


def quiet(start: str, end: str) -> CallbackPolicy:
    return replace(
        DEFAULT,
        quiet_hours_start=time.fromisoformat(start),
        quiet_hours_end=time.fromisoformat(end),
    )


IRISH = check_number("+353871234567", DEFAULT)
GERMAN = check_number("+4915112345678", DEFAULT)
NEW_JERSEY = check_number("+12015550123", DEFAULT)  # America/New_York only
NEVADA = check_number("+17752345678", DEFAULT)  # area code 775: Boise and Los Angeles
US_TOLL_FREE = check_number("+18005550100", DEFAULT)  # every zone of +1, Guam to Pago Pago


# --- check_number: accepted --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "e164", "region", "number_type", "timezones"),
    [
        pytest.param("+353871234567", "+353871234567", "IE", "MOBILE", LONDONISH, id="ie-mobile"),
        pytest.param("+353 87 123 4567", "+353871234567", "IE", "MOBILE", LONDONISH, id="spaces"),
        pytest.param("+353-87-123-4567", "+353871234567", "IE", "MOBILE", LONDONISH, id="dashes"),
        pytest.param("+353 (87) 123.4567", "+353871234567", "IE", "MOBILE", LONDONISH, id="punct"),
        pytest.param("  +353871234567\n", "+353871234567", "IE", "MOBILE", LONDONISH, id="padded"),
        pytest.param(
            "+4915112345678", "+4915112345678", "DE", "MOBILE", ("Europe/Berlin",), id="de-mobile"
        ),
        pytest.param(
            "+49 151 1234 5678", "+4915112345678", "DE", "MOBILE", ("Europe/Berlin",), id="de-sp"
        ),
        pytest.param(
            "+1 (201) 555-0123",
            "+12015550123",
            "US",
            "FIXED_LINE_OR_MOBILE",
            ("America/New_York",),
            id="us-nanp-one-zone",
        ),
        pytest.param(
            "+17752345678",
            "+17752345678",
            "US",
            "FIXED_LINE_OR_MOBILE",
            ("America/Boise", "America/Los_Angeles"),
            id="us-nanp-two-zones",
        ),
        pytest.param(
            "+441212345678", "+441212345678", "GB", "FIXED_LINE", ("Europe/London",), id="gb-fixed"
        ),
        pytest.param(
            "+33612345678", "+33612345678", "FR", "MOBILE", ("Europe/Paris",), id="fr-mobile"
        ),
        # Not blocked by default: a business's free-phone line and an internet phone number.
        pytest.param("+448001234567", "+448001234567", "GB", "TOLL_FREE", ALL_OF_44, id="gb-free"),
        pytest.param("+445612345678", "+445612345678", "GB", "VOIP", ALL_OF_44, id="gb-voip"),
    ],
)
def test_accepted_numbers(
    raw: str, e164: str, region: str, number_type: str, timezones: tuple[str, ...]
) -> None:
    assert check_number(raw, DEFAULT) == CheckedNumber(e164, region, number_type, timezones)


def test_us_number_lists_every_zone_of_its_area_code() -> None:
    assert set(NEVADA.timezones) == {"America/Boise", "America/Los_Angeles"}
    # A non-geographic number only has its calling code's zones, dozens of them.
    assert US_TOLL_FREE.number_type == "TOLL_FREE"
    assert {"America/New_York", "Pacific/Honolulu", "Pacific/Guam"} <= set(US_TOLL_FREE.timezones)


def test_checked_number_is_a_fixed_point() -> None:
    for number in (IRISH, GERMAN, NEW_JERSEY, NEVADA, US_TOLL_FREE):
        assert check_number(number.e164, DEFAULT) == number


# --- check_number: refused ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("abc", id="letters"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("+", id="plus"),
        pytest.param("+1", id="plus-one"),
        pytest.param("+3538", id="too-short"),
        pytest.param("+" + "1" * 40, id="41-chars"),
        pytest.param("1" * 40, id="40-digits"),
        pytest.param("+1234567890123456789012345678901", id="32-chars-too-long-a-number"),
        pytest.param("087 123 4567", id="national-form"),
        pytest.param("0871234567", id="national-digits"),
        pytest.param("00353871234567", id="international-prefix"),
        pytest.param("++353871234567", id="double-plus"),
        pytest.param("\uff0b353871234567", id="fullwidth-plus"),
        pytest.param("abc +353871234567", id="text-before"),
        pytest.param("+353871234567 please", id="text-after"),
        pytest.param("+1-800-FLOWERS", id="vanity-letters"),
        pytest.param("+353871234567 ext 5", id="extension"),
        pytest.param("+353871234567x", id="trailing-x"),
        pytest.param("+353871234567/+4915112345678", id="two-numbers"),
        pytest.param("tel:+353871234567", id="tel-uri"),
        pytest.param("+441632960000", id="gb-drama-range-not-valid"),
        pytest.param("+35387123456", id="ie-mobile-one-digit-short"),
        pytest.param("+999123456789", id="no-such-calling-code"),
    ],
)
def test_invalid_phone(raw: str) -> None:
    with pytest.raises(PhoneRefused) as refused:
        check_number(raw, DEFAULT)
    assert refused.value.code == "invalid_phone"
    assert refused.value.message


def test_length_limit_counts_the_raw_text() -> None:
    padded = "+353871234567".ljust(MAX_RAW_LENGTH)
    assert check_number(padded, DEFAULT) == IRISH
    with pytest.raises(PhoneRefused) as refused:
        check_number(padded + " ", DEFAULT)
    assert refused.value.code == "invalid_phone"


@pytest.mark.parametrize(
    ("raw", "policy"),
    [
        pytest.param("+79161234567", DEFAULT, id="ru-mobile"),
        pytest.param("+2348031234567", DEFAULT, id="ng-mobile"),
        pytest.param("+61412345678", DEFAULT, id="au-mobile"),
        pytest.param("+80012345678", DEFAULT, id="non-geographic-001"),
        pytest.param("+4915112345678", replace(DEFAULT, allowed_countries=("IE",)), id="de-drop"),
    ],
)
def test_country_not_allowed(raw: str, policy: CallbackPolicy) -> None:
    with pytest.raises(PhoneRefused) as refused:
        check_number(raw, policy)
    assert refused.value.code == "country_not_allowed"


def test_country_is_checked_before_number_type() -> None:
    # A Russian premium-rate number: the country is the first reason.
    with pytest.raises(PhoneRefused) as refused:
        check_number("+78091234567", DEFAULT)
    assert refused.value.code == "country_not_allowed"


# Real numbers from phonenumbers' own examples (`example_number_for_type`).
@pytest.mark.parametrize(
    ("raw", "number_type"),
    [
        pytest.param("+449098790000", "PREMIUM_RATE", id="gb-premium-909"),
        pytest.param("+449012345678", "PREMIUM_RATE", id="gb-premium-901"),
        pytest.param("+3531520123456", "PREMIUM_RATE", id="ie-premium"),
        pytest.param("+499001234567", "PREMIUM_RATE", id="de-premium"),
        pytest.param("+19002345678", "PREMIUM_RATE", id="us-premium"),
        pytest.param("+3531850123456", "SHARED_COST", id="ie-shared-cost"),
        pytest.param("+4918012345", "SHARED_COST", id="de-shared-cost"),
        pytest.param("+445512345678", "UAN", id="gb-uan"),
        pytest.param("+3538551234567", "VOICEMAIL", id="ie-voicemail"),
        pytest.param("+447640123456", "PAGER", id="gb-pager"),
        pytest.param("+447012345678", "PERSONAL_NUMBER", id="gb-personal"),
        pytest.param("+15002345678", "PERSONAL_NUMBER", id="us-personal"),
    ],
)
def test_blocked_number_types(raw: str, number_type: str) -> None:
    parsed = phonenumbers.parse(raw, None)
    assert phonenumbers.is_valid_number(parsed)
    assert phonenumbers.PhoneNumberType.to_string(phonenumbers.number_type(parsed)) == number_type
    with pytest.raises(PhoneRefused) as refused:
        check_number(raw, DEFAULT)
    assert refused.value.code == "number_type_not_allowed"


def test_every_blocked_type_in_every_allowed_country_is_refused() -> None:
    seen = 0
    for region in DEFAULT.allowed_countries:
        for name in DEFAULT.blocked_number_types:
            example = phonenumbers.example_number_for_type(
                region, getattr(phonenumbers.PhoneNumberType, name)
            )
            if example is None:
                continue  # the country has no such numbers
            seen += 1
            raw = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            with pytest.raises(PhoneRefused) as refused:
                check_number(raw, DEFAULT)
            assert refused.value.code == "number_type_not_allowed", (region, name, raw)
    assert seen > 20


def test_site_may_block_more_types() -> None:
    no_voip = replace(DEFAULT, blocked_number_types=(*DEFAULT.blocked_number_types, "VOIP"))
    voip = phonenumbers.example_number_for_type("GB", phonenumbers.PhoneNumberType.VOIP)
    assert voip is not None
    raw = phonenumbers.format_number(voip, phonenumbers.PhoneNumberFormat.E164)
    assert check_number(raw, DEFAULT).number_type == "VOIP"
    with pytest.raises(PhoneRefused) as refused:
        check_number(raw, no_voip)
    assert refused.value.code == "number_type_not_allowed"


def test_unknown_type_is_refused_even_when_not_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Valid numbers always have a known type today; a metadata change must not let one through.
    monkeypatch.setattr(
        phonenumbers, "number_type", lambda _n: phonenumbers.PhoneNumberType.UNKNOWN
    )
    with pytest.raises(PhoneRefused) as refused:
        check_number("+353871234567", replace(DEFAULT, blocked_number_types=()))
    assert refused.value.code == "number_type_not_allowed"


def test_a_library_failure_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any) -> None:
        raise RuntimeError("bug in the parser")

    monkeypatch.setattr(phonenumbers, "parse", broken)
    with pytest.raises(PhoneRefused) as refused:
        check_number("+353871234567", DEFAULT)
    assert refused.value.code == "invalid_phone"


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_check_number_only_ever_refuses_arbitrary_text(raw: str) -> None:
    try:
        check_number(raw, DEFAULT)
    except PhoneRefused as refused:
        assert refused.code in {"invalid_phone", "country_not_allowed", "number_type_not_allowed"}


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="+0123456789 ().-", max_size=MAX_RAW_LENGTH + 2))
def test_check_number_on_number_shaped_text(raw: str) -> None:
    try:
        number = check_number(raw, ANY_COUNTRY)
    except PhoneRefused as refused:
        assert refused.code in {"invalid_phone", "country_not_allowed", "number_type_not_allowed"}
        return
    assert number.e164.startswith("+")
    assert number.e164[1:].isdigit()
    assert "Etc/Unknown" not in number.timezones
    assert check_number(number.e164, ANY_COUNTRY) == number


# --- quiet hours in Dublin ---------------------------------------------------------------


def test_irish_zones_keep_dublin_time() -> None:
    # Every hour of 2025, including both DST changes.
    zones = [ZoneInfo(name) for name in IRISH.timezones]
    for hour in range(0, 365 * 24):
        instant = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(hours=hour)
        dublin = instant.astimezone(DUBLIN).utcoffset()
        assert all(instant.astimezone(zone).utcoffset() == dublin for zone in zones), instant


@pytest.mark.parametrize(
    ("y", "mo", "d"),
    [pytest.param(2025, 1, 15, id="winter-gmt"), pytest.param(2025, 7, 15, id="summer-ist")],
)
@pytest.mark.parametrize(
    ("policy", "h", "mi", "s", "expected"),
    [
        pytest.param(DEFAULT, 12, 0, 0, False, id="default-noon"),
        pytest.param(DEFAULT, 20, 59, 0, False, id="default-2059"),
        pytest.param(DEFAULT, 20, 59, 59, False, id="default-205959"),
        pytest.param(DEFAULT, 21, 0, 0, True, id="default-2100"),
        pytest.param(DEFAULT, 23, 59, 59, True, id="default-235959"),
        pytest.param(DEFAULT, 0, 0, 0, True, id="default-midnight"),
        pytest.param(DEFAULT, 7, 59, 0, True, id="default-0759"),
        pytest.param(DEFAULT, 7, 59, 59, True, id="default-075959"),
        pytest.param(DEFAULT, 8, 0, 0, False, id="default-0800"),
        pytest.param(WIDE, 19, 59, 0, False, id="wide-1959"),
        pytest.param(WIDE, 20, 0, 0, True, id="wide-2000"),
        pytest.param(WIDE, 20, 59, 0, True, id="wide-2059"),
        pytest.param(WIDE, 8, 0, 0, True, id="wide-0800"),
        pytest.param(WIDE, 8, 59, 0, True, id="wide-0859"),
        pytest.param(WIDE, 9, 0, 0, False, id="wide-0900"),
    ],
)
def test_quiet_hours_in_dublin_local_time(
    y: int, mo: int, d: int, policy: CallbackPolicy, h: int, mi: int, s: int, expected: bool
) -> None:
    at = local(DUBLIN, y, mo, d, h, mi, s)
    assert in_quiet_hours(IRISH, policy, at) is expected
    assert (next_allowed_at(IRISH, policy, at) == at) is not expected


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(local(DUBLIN, 2025, 1, 15, 12), local(DUBLIN, 2025, 1, 15, 12), id="now"),
        pytest.param(local(DUBLIN, 2025, 1, 15, 20, 59, 59) + 0.5, None, id="just-before"),
        pytest.param(local(DUBLIN, 2025, 1, 15, 21), local(DUBLIN, 2025, 1, 16, 8), id="at-21"),
        pytest.param(local(DUBLIN, 2025, 1, 15, 23, 30), local(DUBLIN, 2025, 1, 16, 8), id="late"),
        pytest.param(local(DUBLIN, 2025, 1, 16, 0, 30), local(DUBLIN, 2025, 1, 16, 8), id="0030"),
        pytest.param(local(DUBLIN, 2025, 1, 16, 7, 59), local(DUBLIN, 2025, 1, 16, 8), id="0759"),
        pytest.param(local(DUBLIN, 2025, 7, 15, 22), local(DUBLIN, 2025, 7, 16, 8), id="summer"),
        # Year's end: midnight changes the year too.
        pytest.param(local(DUBLIN, 2025, 12, 31, 23), local(DUBLIN, 2026, 1, 1, 8), id="new-year"),
    ],
)
def test_next_allowed_at_across_midnight(at: float, expected: float | None) -> None:
    assert next_allowed_at(IRISH, DEFAULT, at) == (at if expected is None else expected)


def test_wider_site_window_waits_longer() -> None:
    at = local(DUBLIN, 2025, 1, 15, 20, 30)
    assert next_allowed_at(IRISH, DEFAULT, at) == at
    assert next_allowed_at(IRISH, WIDE, at) == local(DUBLIN, 2025, 1, 16, 9)
    assert next_allowed_at(IRISH, WIDE, local(DUBLIN, 2025, 1, 16, 8, 30)) == local(
        DUBLIN, 2025, 1, 16, 9
    )


def test_each_number_uses_its_own_local_time() -> None:
    # 21:30 in Berlin is 20:30 in Dublin.
    at = local(ZoneInfo("Europe/Berlin"), 2025, 7, 15, 21, 30)
    assert in_quiet_hours(GERMAN, DEFAULT, at)
    assert not in_quiet_hours(IRISH, DEFAULT, at)
    assert next_allowed_at(GERMAN, DEFAULT, at) == local(ZoneInfo("Europe/Berlin"), 2025, 7, 16, 8)
    # 07:30 in Dublin is 08:30 in Berlin.
    morning = local(DUBLIN, 2025, 7, 16, 7, 30)
    assert in_quiet_hours(IRISH, DEFAULT, morning)
    assert not in_quiet_hours(GERMAN, DEFAULT, morning)


# --- several zones: quiet if it is night in any ------------------------------------------


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(local(BOISE, 2025, 7, 15, 20, 59), False, id="2059-boise-1959-la"),
        pytest.param(local(BOISE, 2025, 7, 15, 21, 30), True, id="2130-boise-2030-la"),
        pytest.param(local(LOS_ANGELES, 2025, 7, 15, 20, 59), True, id="2159-boise-2059-la"),
        pytest.param(local(BOISE, 2025, 7, 16, 8, 30), True, id="0830-boise-0730-la"),
        pytest.param(local(LOS_ANGELES, 2025, 7, 16, 8, 0), False, id="0900-boise-0800-la"),
    ],
)
def test_number_spanning_two_zones_is_quiet_if_either_is(at: float, expected: bool) -> None:
    assert in_quiet_hours(NEVADA, DEFAULT, at) is expected


def test_number_spanning_two_zones_waits_for_the_later_morning() -> None:
    # Quiet starts at 21:00 in Boise (the earlier evening) and ends at 08:00 in Los Angeles.
    assert next_allowed_at(NEVADA, DEFAULT, local(BOISE, 2025, 7, 15, 21)) == local(
        LOS_ANGELES, 2025, 7, 16, 8
    )
    assert next_allowed_at(NEVADA, DEFAULT, local(BOISE, 2025, 1, 16, 7)) == local(
        LOS_ANGELES, 2025, 1, 16, 8
    )


def test_toll_free_us_number_waits_for_every_zone_of_plus_one() -> None:
    at = utc(2025, 7, 15, 3)  # 23:00 in New York
    allowed = next_allowed_at(US_TOLL_FREE, DEFAULT, at)
    assert allowed > at
    assert not in_quiet_hours(US_TOLL_FREE, DEFAULT, allowed)
    assert in_quiet_hours(US_TOLL_FREE, DEFAULT, allowed - 1)
    for name in US_TOLL_FREE.timezones:
        wall = datetime.fromtimestamp(allowed, ZoneInfo(name)).time()
        assert time(8) <= wall < time(21), name


@pytest.mark.parametrize(
    ("number", "policy"),
    [
        # Summer offsets of +1 span Guam to Pago Pago; a 14-hour window leaves no hour free.
        pytest.param(US_TOLL_FREE, quiet("19:00", "09:00"), id="toll-free-wide-window"),
        # start == end runs past midnight: quiet around the clock (settings refuse it).
        pytest.param(IRISH, quiet("21:00", "21:00"), id="empty-window"),
    ],
)
def test_no_callable_hours(number: CheckedNumber, policy: CallbackPolicy) -> None:
    at = utc(2025, 7, 15)
    for hour in range(48):
        assert in_quiet_hours(number, policy, at + hour * HOUR)
    with pytest.raises(PhoneRefused) as refused:
        next_allowed_at(number, policy, at)
    assert refused.value.code == "no_callable_hours"


# --- daylight saving ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("evening", "starts", "ends", "hours"),
    [
        pytest.param(
            utc(2025, 3, 29, 12), utc(2025, 3, 29, 21), utc(2025, 3, 30, 7), 10, id="forward"
        ),
        pytest.param(
            utc(2025, 10, 25, 12), utc(2025, 10, 25, 20), utc(2025, 10, 26, 8), 12, id="back"
        ),
    ],
)
def test_dublin_dst_night_lasts_real_hours(
    evening: float, starts: float, ends: float, hours: int
) -> None:
    assert not in_quiet_hours(IRISH, DEFAULT, starts - 1)
    assert in_quiet_hours(IRISH, DEFAULT, starts)
    assert next_allowed_at(IRISH, DEFAULT, evening) == evening
    assert next_allowed_at(IRISH, DEFAULT, starts) == ends
    assert ends - starts == hours * HOUR
    assert in_quiet_hours(IRISH, DEFAULT, ends - 1)
    assert not in_quiet_hours(IRISH, DEFAULT, ends)


@pytest.mark.parametrize(
    ("number", "policy", "first_quiet", "first_allowed"),
    [
        # 02:30 does not exist in New York on 9 March: the clock jumps from 01:59:59 EST to
        # 03:00 EDT, which is past 02:30, so quiet ends at the jump.
        pytest.param(
            NEW_JERSEY,
            quiet("21:00", "02:30"),
            utc(2025, 3, 9, 2),  # 21:00 EST on the 8th
            utc(2025, 3, 9, 7),  # 03:00 EDT
            id="ny-end-in-gap",
        ),
        # Dublin jumps from 01:00 GMT to 02:00 IST: an end of 01:30 ends at the jump too.
        pytest.param(
            IRISH,
            quiet("21:00", "01:30"),
            utc(2025, 3, 29, 21),
            utc(2025, 3, 30, 1),
            id="dublin-end-in-gap",
        ),
        # 01:30 happens twice in New York on 2 November: quiet lasts until the second one.
        pytest.param(
            NEW_JERSEY,
            quiet("21:00", "01:30"),
            utc(2025, 11, 2, 1),  # 21:00 EDT on the 1st
            utc(2025, 11, 2, 6, 30),  # 01:30 EST
            id="ny-end-repeated",
        ),
        # A start in the gap starts at the jump; it ends at 08:00 EDT.
        pytest.param(
            NEW_JERSEY,
            quiet("02:30", "08:00"),
            utc(2025, 3, 9, 7),  # 03:00 EDT
            utc(2025, 3, 9, 12),  # 08:00 EDT
            id="ny-start-in-gap",
        ),
        # A repeated start means its first occurrence, and the repeated hour stays quiet.
        pytest.param(
            NEW_JERSEY,
            quiet("01:30", "08:00"),
            utc(2025, 11, 2, 5, 30),  # 01:30 EDT
            utc(2025, 11, 2, 13),  # 08:00 EST
            id="ny-start-repeated",
        ),
    ],
)
def test_nonexistent_and_repeated_local_times(
    number: CheckedNumber, policy: CallbackPolicy, first_quiet: float, first_allowed: float
) -> None:
    assert not in_quiet_hours(number, policy, first_quiet - 1)
    assert next_allowed_at(number, policy, first_quiet - 1) == first_quiet - 1
    assert next_allowed_at(number, policy, first_quiet) == first_allowed
    # Quiet all the way through, with no callable moment in the middle of the night.
    step = (first_allowed - first_quiet) / 97
    for i in range(97):
        assert in_quiet_hours(number, policy, first_quiet + i * step)
    assert in_quiet_hours(number, policy, first_allowed - 1)
    assert not in_quiet_hours(number, policy, first_allowed)


def test_repeated_hour_between_two_readings_of_the_end_is_quiet() -> None:
    # 01:45 EDT: the clock is past 01:30, but it will show 01:00-01:30 again in 15 minutes.
    policy = quiet("21:00", "01:30")
    assert in_quiet_hours(NEW_JERSEY, policy, utc(2025, 11, 2, 5, 45))
    assert in_quiet_hours(NEW_JERSEY, policy, utc(2025, 11, 2, 6, 15))  # 01:15 EST


# --- numbers without a known zone --------------------------------------------------------


def test_non_geographic_number_falls_back_to_utc() -> None:
    number = check_number("+80012345678", replace(DEFAULT, allowed_countries=("001",)))
    assert number.region == "001"
    assert number.timezones == ()
    assert not in_quiet_hours(number, DEFAULT, utc(2025, 1, 15, 20, 59))
    assert in_quiet_hours(number, DEFAULT, utc(2025, 1, 15, 21))
    assert next_allowed_at(number, DEFAULT, utc(2025, 1, 15, 21)) == utc(2025, 1, 16, 8)


@pytest.mark.parametrize(
    ("timezones", "region", "zone"),
    [
        pytest.param((), "DE", ZoneInfo("Europe/Berlin"), id="empty-uses-region-example"),
        pytest.param(("Mars/Olympus_Mons",), "DE", ZoneInfo("Europe/Berlin"), id="stale-name"),
        pytest.param(("../etc/passwd",), "", ZoneInfo("UTC"), id="malformed-name"),
        pytest.param((), "ZZ", ZoneInfo("UTC"), id="unknown-region"),
    ],
)
def test_missing_zones_fall_back(timezones: tuple[str, ...], region: str, zone: ZoneInfo) -> None:
    number = CheckedNumber("+4915112345678", region, "MOBILE", timezones)
    evening = local(zone, 2025, 7, 15, 21)
    assert not in_quiet_hours(number, DEFAULT, evening - 1)
    assert in_quiet_hours(number, DEFAULT, evening)
    assert next_allowed_at(number, DEFAULT, evening) == local(zone, 2025, 7, 16, 8)


def test_unknown_names_are_skipped_not_fatal() -> None:
    number = replace(NEW_JERSEY, timezones=("Nowhere/Atlantis", "America/New_York"))
    at = local(NEW_YORK, 2025, 7, 15, 22)
    assert next_allowed_at(number, DEFAULT, at) == local(NEW_YORK, 2025, 7, 16, 8)


# --- properties --------------------------------------------------------------------------

NUMBERS = [
    IRISH,
    GERMAN,
    NEW_JERSEY,
    NEVADA,
    US_TOLL_FREE,
    check_number("+19072345678", DEFAULT),  # Alaska: Adak and Anchorage
    check_number("+61412345678", ANY_COUNTRY),  # Australia: Perth to Lord Howe (30-min DST)
    check_number("+79161234567", ANY_COUNTRY),  # Russia: 16 zones
    check_number("+80012345678", ANY_COUNTRY),  # no zone: UTC
]

# Around the DST changes the examples care about, and anywhere in 2000-2040.
TRANSITIONS = [
    utc(2025, 3, 9, 7),
    utc(2025, 3, 30, 1),
    utc(2025, 10, 5, 16),  # Lord Howe and Sydney forward
    utc(2025, 10, 26, 1),
    utc(2025, 11, 2, 6),
]
INSTANTS = st.one_of(
    st.floats(min_value=utc(2000, 1, 1), max_value=utc(2040, 1, 1)),
    st.builds(
        lambda base, delta: base + delta,
        st.sampled_from(TRANSITIONS),
        st.floats(min_value=-2 * 86_400.0, max_value=2 * 86_400.0),
    ),
)
CLOCK = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 59]))
POLICIES = st.one_of(
    st.sampled_from([DEFAULT, WIDE]),
    st.builds(
        lambda start, end: replace(DEFAULT, quiet_hours_start=start, quiet_hours_end=end),
        st.one_of(CLOCK, st.times()),
        st.one_of(CLOCK, st.times()),
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(NUMBERS), POLICIES, INSTANTS, st.floats(min_value=0.0, max_value=1.0))
def test_next_allowed_at_is_the_first_moment_outside_quiet_hours(
    number: CheckedNumber, policy: CallbackPolicy, at: float, fraction: float
) -> None:
    try:
        allowed = next_allowed_at(number, policy, at)
    except PhoneRefused as refused:
        assert refused.code == "no_callable_hours"
        assert in_quiet_hours(number, policy, at)
        assert in_quiet_hours(number, policy, at + fraction * LOOKAHEAD_S)
        return
    assert allowed >= at
    assert not in_quiet_hours(number, policy, allowed)
    assert next_allowed_at(number, policy, allowed) == allowed
    if allowed > at:
        # Earliest: everything skipped was quiet.
        assert in_quiet_hours(number, policy, at)
        inside = max(at, min(at + fraction * (allowed - at), allowed - 1e-3))
        assert in_quiet_hours(number, policy, inside)
        assert in_quiet_hours(number, policy, math.nextafter(allowed, -math.inf))
    else:
        assert not in_quiet_hours(number, policy, at)


def _wall_clock_quiet(zone: ZoneInfo, policy: CallbackPolicy, at: float) -> bool:
    wall = datetime.fromtimestamp(at, zone).time()
    start, end = policy.quiet_hours_start, policy.quiet_hours_end
    if start < end:
        return start <= wall < end
    return wall >= start or wall < end


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(NUMBERS), POLICIES, INSTANTS)
def test_away_from_dst_changes_quiet_means_the_clock_shows_the_window(
    number: CheckedNumber, policy: CallbackPolicy, at: float
) -> None:
    at = float(round(at))  # whole seconds: the clock reading is not rounded across a boundary
    zones = phone_policy._zones(number)
    # Only the repeated hour of a fall-back differs from reading the clock (it stays quiet).
    assume(
        all(
            datetime.fromtimestamp(at - 30 * HOUR, z).utcoffset()
            == datetime.fromtimestamp(at + 30 * HOUR, z).utcoffset()
            for z in zones
        )
    )
    expected = any(_wall_clock_quiet(zone, policy, at) for zone in zones)
    assert in_quiet_hours(number, policy, at) is expected
