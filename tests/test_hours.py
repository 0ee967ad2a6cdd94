"""Business hours: tables for the rules, DST transitions and holidays, plus properties.

Every instant is fixed (no wall clock). DST dates used, all in 2025:
- Europe/Dublin: clocks go forward Sun 30 March 01:00 UTC (GMT -> IST), back Sun 26 October
  01:00 UTC (IST -> GMT).
- America/New_York: forward Sun 9 March 07:00 UTC (02:00 EST -> 03:00 EDT), back Sun
  2 November 06:00 UTC (02:00 EDT -> 01:00 EST).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.hours import (
    LOOKAHEAD_S,
    closes_at,
    is_open,
    next_open_at,
    open_intervals,
    slot_starts,
)
from gateway.core.model import Branch, OpeningSpan

HOUR = 3600.0
MINUTE = 60.0


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> float:
    return datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp()


def span(opens: str, closes: str) -> OpeningSpan:
    return OpeningSpan(time.fromisoformat(opens), time.fromisoformat(closes))


def branch(
    tz: str,
    hours: dict[int, tuple[OpeningSpan, ...]],
    holidays: frozenset[date] = frozenset(),
) -> Branch:
    return Branch(branch_id="b", name="B", timezone=tz, hours=hours, holidays=holidays)


def every_day(*spans: OpeningSpan) -> dict[int, tuple[OpeningSpan, ...]]:
    return dict.fromkeys(range(7), spans)


def weekdays(*spans: OpeningSpan) -> dict[int, tuple[OpeningSpan, ...]]:
    return dict.fromkeys(range(5), spans)


DUBLIN_9_17 = branch("Europe/Dublin", every_day(span("09:00", "17:00")))
NY_9_17 = branch("America/New_York", every_day(span("09:00", "17:00")))
DUBLIN_NIGHTS = branch("Europe/Dublin", every_day(span("22:00", "06:00")))
NY_NIGHTS = branch("America/New_York", every_day(span("22:00", "06:00")))


# --- is_open around DST ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "now", "expected"),
    [
        # Dublin, the day before and the day the clocks go forward: 09:00 local moves an hour.
        pytest.param(DUBLIN_9_17, utc(2025, 3, 29, 8, 30), False, id="dub-sat-0830-gmt"),
        pytest.param(DUBLIN_9_17, utc(2025, 3, 29, 9, 0), True, id="dub-sat-0900-gmt-opens"),
        pytest.param(DUBLIN_9_17, utc(2025, 3, 30, 8, 30), True, id="dub-sun-0930-ist"),
        pytest.param(DUBLIN_9_17, utc(2025, 3, 30, 16, 0), False, id="dub-sun-1700-ist-closed"),
        # Dublin in October: 17:00 IST is 16:00 UTC, 17:00 GMT is 17:00 UTC.
        pytest.param(DUBLIN_9_17, utc(2025, 10, 25, 16, 30), False, id="dub-sat-1730-ist"),
        pytest.param(DUBLIN_9_17, utc(2025, 10, 26, 16, 30), True, id="dub-sun-1630-gmt"),
        # New York in March.
        pytest.param(NY_9_17, utc(2025, 3, 8, 13, 30), False, id="ny-sat-0830-est"),
        pytest.param(NY_9_17, utc(2025, 3, 8, 14, 30), True, id="ny-sat-0930-est"),
        pytest.param(NY_9_17, utc(2025, 3, 9, 12, 30), False, id="ny-sun-0830-edt"),
        pytest.param(NY_9_17, utc(2025, 3, 9, 13, 30), True, id="ny-sun-0930-edt"),
        # New York in November: the end of a span is exclusive.
        pytest.param(NY_9_17, utc(2025, 11, 2, 13, 30), False, id="ny-sun-0830-est"),
        pytest.param(NY_9_17, utc(2025, 11, 2, 14, 0), True, id="ny-sun-0900-est"),
        pytest.param(NY_9_17, utc(2025, 11, 2, 21, 59), True, id="ny-sun-1659-est"),
        pytest.param(NY_9_17, utc(2025, 11, 2, 22, 0), False, id="ny-sun-1700-est"),
    ],
)
def test_is_open_follows_local_time_across_dst(b: Branch, now: float, expected: bool) -> None:
    assert is_open(b, now) is expected


# --- spans past midnight across DST ------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "saturday_noon", "opens", "closes", "hours"),
    [
        pytest.param(
            DUBLIN_NIGHTS,
            utc(2025, 3, 29, 12),
            utc(2025, 3, 29, 22),  # 22:00 GMT
            utc(2025, 3, 30, 5),  # 06:00 IST
            7,
            id="dublin-spring-forward",
        ),
        pytest.param(
            DUBLIN_NIGHTS,
            utc(2025, 10, 25, 12),
            utc(2025, 10, 25, 21),  # 22:00 IST
            utc(2025, 10, 26, 6),  # 06:00 GMT
            9,
            id="dublin-fall-back",
        ),
        pytest.param(
            NY_NIGHTS,
            utc(2025, 3, 8, 17),
            utc(2025, 3, 9, 3),  # 22:00 EST
            utc(2025, 3, 9, 10),  # 06:00 EDT
            7,
            id="new-york-spring-forward",
        ),
        pytest.param(
            NY_NIGHTS,
            utc(2025, 11, 1, 16),
            utc(2025, 11, 2, 2),  # 22:00 EDT
            utc(2025, 11, 2, 11),  # 06:00 EST
            9,
            id="new-york-fall-back",
        ),
    ],
)
def test_overnight_span_lasts_real_hours_across_dst(
    b: Branch, saturday_noon: float, opens: float, closes: float, hours: int
) -> None:
    assert not is_open(b, saturday_noon)
    assert next_open_at(b, saturday_noon) == opens
    assert closes_at(b, opens) == closes
    assert closes - opens == hours * HOUR
    assert is_open(b, closes - 1)
    assert not is_open(b, closes)


# --- wall-clock times that do not exist or occur twice -----------------------------------


def test_opening_in_the_spring_gap_shifts_forward_by_the_gap() -> None:
    # 02:30 does not exist in New York on 9 March 2025: it opens at 03:30 EDT.
    b = branch("America/New_York", {6: (span("02:30", "04:00"),)})
    assert next_open_at(b, utc(2025, 3, 8, 12)) == utc(2025, 3, 9, 7, 30)
    assert closes_at(b, utc(2025, 3, 9, 7, 30)) == utc(2025, 3, 9, 8)


def test_span_entirely_inside_the_spring_gap_is_skipped() -> None:
    # 02:00-03:00 collapses to nothing on 9 March; the next opening is the next Sunday.
    b = branch("America/New_York", {6: (span("02:00", "03:00"),)})
    assert next_open_at(b, utc(2025, 3, 8, 12)) == utc(2025, 3, 16, 6)  # 02:00 EDT


def test_ambiguous_time_means_its_first_occurrence_new_york() -> None:
    # 01:30 occurs twice on 2 November 2025; the branch opens at the first (EDT).
    b = branch("America/New_York", {6: (span("01:30", "03:00"),)})
    assert next_open_at(b, utc(2025, 11, 1, 12)) == utc(2025, 11, 2, 5, 30)  # 01:30 EDT
    assert closes_at(b, utc(2025, 11, 2, 5, 30)) == utc(2025, 11, 2, 8)  # 03:00 EST


def test_ambiguous_time_means_its_first_occurrence_dublin() -> None:
    b = branch("Europe/Dublin", {6: (span("01:30", "02:30"),)})
    opens = next_open_at(b, utc(2025, 10, 25, 12))
    assert opens == utc(2025, 10, 26, 0, 30)  # 01:30 IST
    assert closes_at(b, utc(2025, 10, 26, 0, 30)) == utc(2025, 10, 26, 2, 30)  # 02:30 GMT


# --- holidays ----------------------------------------------------------------------------

ST_PATRICKS = date(2025, 3, 17)  # a Monday
DUBLIN_WEEKDAYS = branch(
    "Europe/Dublin", weekdays(span("09:00", "17:00")), frozenset({ST_PATRICKS})
)


def test_holiday_is_closed_all_day() -> None:
    assert not is_open(DUBLIN_WEEKDAYS, utc(2025, 3, 17, 10))
    assert is_open(DUBLIN_WEEKDAYS, utc(2025, 3, 18, 10))


def test_next_opening_skips_weekend_and_holiday() -> None:
    friday_evening = utc(2025, 3, 14, 18)
    assert next_open_at(DUBLIN_WEEKDAYS, friday_evening) == utc(2025, 3, 18, 9)


def test_overnight_span_is_cut_at_midnight_before_a_holiday() -> None:
    b = branch("Europe/Dublin", every_day(span("22:00", "06:00")), frozenset({date(2025, 12, 25)}))
    christmas_eve_night = utc(2025, 12, 24, 23)
    assert closes_at(b, christmas_eve_night) == utc(2025, 12, 25, 0)
    # The span that would start on Christmas night is dropped as well.
    assert next_open_at(b, utc(2025, 12, 25, 0)) == utc(2025, 12, 26, 22)


def test_holiday_the_day_before_does_not_cut_the_next_days_spans() -> None:
    b = branch("Europe/Dublin", every_day(span("22:00", "06:00")), frozenset({date(2025, 12, 25)}))
    assert is_open(b, utc(2025, 12, 26, 23))
    assert not is_open(b, utc(2025, 12, 26, 3))  # the Christmas-night span never started


# --- next_open_at and closes_at ----------------------------------------------------------


def test_next_open_at_is_now_while_open() -> None:
    now = utc(2025, 6, 4, 10)
    assert next_open_at(DUBLIN_9_17, now) == now


def test_next_open_at_none_when_never_open() -> None:
    assert next_open_at(branch("Europe/Dublin", {}), utc(2025, 6, 4)) is None


def test_next_open_at_none_beyond_lookahead() -> None:
    # Open on Mondays only, but the next three Mondays are holidays: 21 days away.
    mondays = frozenset({date(2025, 6, 9), date(2025, 6, 16), date(2025, 6, 23)})
    b = branch("Europe/Dublin", {0: (span("09:00", "17:00"),)}, mondays)
    tuesday = utc(2025, 6, 3, 12)
    assert next_open_at(b, tuesday) is None
    assert LOOKAHEAD_S == 14 * 86_400


def test_split_day_closes_at_lunch_and_reopens() -> None:
    b = branch("Europe/Dublin", weekdays(span("09:00", "12:00"), span("13:00", "17:00")))
    # Wednesday 4 June 2025, IST (UTC+1).
    assert closes_at(b, utc(2025, 6, 4, 9)) == utc(2025, 6, 4, 11)
    assert closes_at(b, utc(2025, 6, 4, 11, 30)) is None
    assert next_open_at(b, utc(2025, 6, 4, 11, 30)) == utc(2025, 6, 4, 12)


def test_adjacent_spans_merge_across_midnight() -> None:
    b = branch("Europe/Dublin", {0: (span("22:00", "00:00"),), 1: (span("00:00", "02:00"),)})
    monday_late = utc(2025, 1, 6, 23)  # GMT
    assert closes_at(b, monday_late) == utc(2025, 1, 7, 2)
    assert open_intervals(b, monday_late, monday_late + 1) == [
        (utc(2025, 1, 6, 22), utc(2025, 1, 7, 2))
    ]


def test_closes_at_none_when_open_around_the_clock() -> None:
    b = branch("Europe/Dublin", every_day(span("00:00", "00:00")))
    now = utc(2025, 6, 4, 10)
    assert is_open(b, now)
    assert closes_at(b, now) is None


def test_unknown_timezone_fails_loudly() -> None:
    with pytest.raises(ZoneInfoNotFoundError, match="Mars"):
        is_open(branch("Mars/Olympus_Mons", every_day(span("09:00", "17:00"))), 0.0)


# --- slot_starts -------------------------------------------------------------------------


def test_slots_are_aligned_to_the_opening_time() -> None:
    b = branch("Europe/Dublin", weekdays(span("09:00", "17:00")))
    now = utc(2025, 1, 6, 10, 7)  # Monday, GMT
    assert slot_starts(b, now, 2 * HOUR, 30 * MINUTE) == [
        utc(2025, 1, 6, 10, 30),
        utc(2025, 1, 6, 11),
        utc(2025, 1, 6, 11, 30),
        utc(2025, 1, 6, 12),
    ]


def test_slot_at_now_is_offered() -> None:
    b = branch("Europe/Dublin", weekdays(span("09:00", "17:00")))
    now = utc(2025, 1, 6, 10)
    assert slot_starts(b, now, HOUR, 30 * MINUTE) == [now, now + 30 * MINUTE]


def test_slots_fit_before_closing_and_resume_next_day() -> None:
    b = branch("Europe/Dublin", weekdays(span("09:00", "17:00")))
    now = utc(2025, 1, 6, 16, 10)
    tuesday = [utc(2025, 1, 7, 9) + k * 30 * MINUTE for k in range(15)]  # 09:00 .. 16:00
    assert slot_starts(b, now, 24 * HOUR, 30 * MINUTE) == [utc(2025, 1, 6, 16, 30), *tuesday]


def test_slots_skip_holidays() -> None:
    friday = utc(2025, 3, 14, 16, 30)
    slots = slot_starts(DUBLIN_WEEKDAYS, friday, 4 * 86_400, 4 * HOUR)
    assert slots == [utc(2025, 3, 18, 9), utc(2025, 3, 18, 13)]


def test_slots_stay_evenly_spaced_across_dst() -> None:
    # The short night of 29-30 March in Dublin: 22:00 GMT to 06:00 IST is 7 real hours.
    slots = slot_starts(DUBLIN_NIGHTS, utc(2025, 3, 29, 21), 12 * HOUR, HOUR)
    assert slots == [utc(2025, 3, 29, 22) + k * HOUR for k in range(7)]


def test_span_shorter_than_a_step_has_no_slot() -> None:
    b = branch("Europe/Dublin", weekdays(span("09:00", "09:20")))
    assert slot_starts(b, utc(2025, 1, 6), 86_400, 30 * MINUTE) == []


def test_slot_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        slot_starts(DUBLIN_9_17, 0.0, HOUR, 0)
    assert slot_starts(DUBLIN_9_17, utc(2025, 1, 6, 10), 0, 30 * MINUTE) == []


# --- properties --------------------------------------------------------------------------

TIMEZONES = [
    "Europe/Dublin",
    "America/New_York",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Australia/Lord_Howe",  # 30-minute DST shift
    "America/Santiago",  # DST changes at midnight
    "Pacific/Chatham",  # +12:45 / +13:45
]
QUARTER_HOURS = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45]))


_WEEKDAY_SETS = st.sets(st.integers(0, 6))
_SPAN_LISTS = st.lists(
    st.builds(OpeningSpan, QUARTER_HOURS, QUARTER_HOURS), min_size=1, max_size=3
).map(tuple)
_HOLIDAYS = st.frozensets(st.dates(date(2024, 12, 20), date(2026, 1, 10)), max_size=20)
_TIMEZONES = st.sampled_from(TIMEZONES)


@st.composite
def branches(draw: st.DrawFn) -> Branch:
    hours = {weekday: draw(_SPAN_LISTS) for weekday in draw(_WEEKDAY_SETS)}
    return branch(draw(_TIMEZONES), hours, draw(_HOLIDAYS))


INSTANTS = st.integers(int(utc(2025, 1, 1)), int(utc(2026, 1, 1))).map(float)


def wall_clock_is_open(b: Branch, now: float) -> bool:
    """A naive reference: read the local wall clock and compare times of day.

    Only trustworthy away from DST transitions, where wall time maps to instants one to one.
    """
    local = datetime.fromtimestamp(now, ZoneInfo(b.timezone))
    today, at = local.date(), local.time()
    if today in b.holidays:
        return False
    for s in b.hours.get(today.weekday(), ()):
        if s.opens < s.closes and s.opens <= at < s.closes:
            return True
        if s.closes <= s.opens and at >= s.opens:
            return True
    yesterday = today - timedelta(days=1)
    if yesterday not in b.holidays:
        for s in b.hours.get(yesterday.weekday(), ()):
            if s.closes <= s.opens and at < s.closes:
                return True
    return False


def offset_is_steady(tz: str, now: float) -> bool:
    zone = ZoneInfo(tz)
    offsets = {
        datetime.fromtimestamp(now + days * 86_400, zone).utcoffset() for days in (-2, -1, 0, 1, 2)
    }
    return len(offsets) == 1


@settings(max_examples=300, deadline=None)
@given(branches(), INSTANTS)
def test_agrees_with_wall_clock_away_from_dst(b: Branch, now: float) -> None:
    if offset_is_steady(b.timezone, now):
        assert is_open(b, now) == wall_clock_is_open(b, now)


@settings(max_examples=300, deadline=None)
@given(branches(), INSTANTS)
def test_open_close_and_next_opening_are_consistent(b: Branch, now: float) -> None:
    if is_open(b, now):
        assert next_open_at(b, now) == now
        end = closes_at(b, now)
        if end is not None:
            assert end > now
            assert is_open(b, max(now, end - 1))
            assert not is_open(b, end)
    else:
        assert closes_at(b, now) is None
        start = next_open_at(b, now)
        if start is not None:
            assert now < start <= now + LOOKAHEAD_S
            assert is_open(b, start)
            for fraction in (0.25, 0.5, 0.75):
                assert not is_open(b, now + (start - now) * fraction)


@settings(max_examples=200, deadline=None)
@given(branches(), INSTANTS, st.sampled_from([15 * MINUTE, 30 * MINUTE, HOUR]))
def test_every_slot_lies_within_opening_hours(b: Branch, now: float, step: float) -> None:
    horizon = 2 * 86_400.0
    slots = slot_starts(b, now, horizon, step)
    assert slots == sorted(set(slots))
    intervals = open_intervals(b, now, now + horizon)
    for slot in slots:
        assert now <= slot < now + horizon
        # The whole slot fits in one opening interval.
        assert any(start <= slot and slot + step <= end for start, end in intervals)
    for slot in slots[:1] + slots[-1:]:
        assert is_open(b, slot)
        assert is_open(b, slot + step - 1)
