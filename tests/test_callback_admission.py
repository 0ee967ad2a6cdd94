"""Callback admission (gateway.core.callback_admission) as a table: each row is a request, the
site's hours and spend, and ``now``; the outcome is an Admission (when to call) or a Refusal
with its stable code. The slots and quotas the store then takes are checked as data.

Every instant is fixed, in June 2025: New York is on EDT (UTC-4), Dublin on IST (UTC+1).
The visitor's number is in New Jersey (America/New_York), whose quiet hours are 21:00-08:00.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, time

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from gateway.core.callback_admission import (
    DIAL_RESERVE,
    MAX_AHEAD_S,
    Admission,
    CallbackAsk,
    Refusal,
    Subject,
    admit,
    dial_quotas,
    request_quotas,
)
from gateway.core.model import Branch, CallbackPolicy, OpeningSpan

US = "+12015550123"  # New Jersey: America/New_York
MIN_LEAD_S = 60.0
POLICY = CallbackPolicy(daily_spend_cap_usd=1.0)
CAP = 1_000_000


def utc(d: int, h: int, mi: int = 0) -> float:
    return datetime(2025, 6, d, h, mi, tzinfo=UTC).timestamp()


def weekdays(opens: str, closes: str) -> dict[int, tuple[OpeningSpan, ...]]:
    span = OpeningSpan(time.fromisoformat(opens), time.fromisoformat(closes))
    return {day: (span,) for day in range(5)}


NEW_YORK = (Branch("ny", "New York", "America/New_York", hours=weekdays("09:00", "17:00")),)
DUBLIN = (Branch("dub", "Dublin", "Europe/Dublin", hours=weekdays("09:00", "17:00")),)
ALWAYS: tuple[Branch, ...] = ()  # a site without branches is always open

WED_10_NY = utc(11, 14)  # Wednesday 11 June, 10:00 in New York
WED_18_NY = utc(11, 22)  # 18:00 in New York: closed, still daytime
THU_00_NY = utc(12, 4)  # midnight in New York
SAT_12_NY = utc(14, 16)


def premium_rate() -> str:
    example = phonenumbers.example_number_for_type("GB", PhoneNumberType.PREMIUM_RATE)
    assert example is not None
    return phonenumbers.format_number(example, PhoneNumberFormat.E164)


@dataclass(frozen=True)
class Row:
    name: str
    now: float
    outcome: str
    """A refusal code, or ``admitted``."""
    phone: str = US
    at: float | None = None
    scope: tuple[Branch, ...] = NEW_YORK
    spent: int = 0
    called_at: float | None = None
    """When an admitted callback is to be called (None: now)."""
    detail: str | None = None


ROWS = [
    Row("open now, daytime: call now", WED_10_NY, "admitted"),
    Row("not a number", WED_10_NY, "invalid_phone", phone="12345"),
    Row("not in international form", WED_10_NY, "invalid_phone", phone="2015550123"),
    Row("a country the site does not call", WED_10_NY, "country_not_allowed", phone="+81312345678"),
    Row("a premium-rate number", WED_10_NY, "number_type_not_allowed", phone=premium_rate()),
    Row(
        "a time within the lead is now",
        WED_10_NY,
        "admitted",
        at=WED_10_NY + MIN_LEAD_S,
    ),
    Row(
        "a chosen time",
        WED_10_NY,
        "admitted",
        at=WED_10_NY + 3600,
        called_at=WED_10_NY + 3600,
        detail="We'll call you at the time you chose",
    ),
    Row("a time too far ahead", WED_10_NY, "slot_unavailable", at=WED_10_NY + MAX_AHEAD_S + 1),
    Row("a time the branch is closed", WED_10_NY, "slot_unavailable", at=SAT_12_NY),
    Row("a time at night at the number", WED_10_NY, "quiet_hours", at=THU_00_NY, scope=ALWAYS),
    Row(
        "closed now: called when the branch opens",
        WED_18_NY,
        "admitted",
        called_at=utc(12, 13),
        detail="We're closed now; we'll call you when we open",
    ),
    Row(
        "closed now, opening at night at the number: called in the morning there",
        WED_18_NY,
        "admitted",
        scope=DUBLIN,
        called_at=utc(12, 12),  # Dublin opens at 04:00 in New York; 08:00 there
        detail="We're closed now; we'll call you when we open",
    ),
    Row("open, but night at the number", THU_00_NY, "quiet_hours", scope=ALWAYS),
    Row("the last dial that fits the cap", WED_10_NY, "admitted", spent=CAP - DIAL_RESERVE),
    Row("over the spend cap", WED_10_NY, "spend_cap_reached", spent=CAP - DIAL_RESERVE + 1),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_admission(row: Row) -> None:
    ask = CallbackAsk(row.phone, row.at, None)
    outcome = admit(ask, POLICY, row.scope, row.spent, row.now, MIN_LEAD_S)
    if row.outcome != "admitted":
        assert isinstance(outcome, Refusal), outcome
        assert outcome.code == row.outcome
        assert outcome.message
        return
    assert isinstance(outcome, Admission), outcome
    assert outcome.number.e164 == row.phone
    assert (outcome.at, outcome.detail) == (row.called_at, row.detail)


def test_an_admission_lists_its_slots_and_quotas_with_their_refusals() -> None:
    """What the store takes after the decision, each with the refusal it becomes when full:
    one open callback per visitor and per number, then the quotas in order."""
    admitted = admit(CallbackAsk(US, None, None), POLICY, NEW_YORK, 0, WED_10_NY, MIN_LEAD_S)
    assert isinstance(admitted, Admission)
    assert [(s.per, s.refusal.code) for s in admitted.slots] == [
        (Subject.VISITOR, "callback_in_progress"),
        (Subject.NUMBER, "number_has_callback"),
    ]
    p = POLICY
    assert [(q.per, q.window_s, q.limit, q.refusal.code) for q in admitted.quotas] == [
        (Subject.NUMBER, 900, p.per_number_15min, "number_rate_limited"),
        (Subject.NUMBER, 3600, p.per_number_hour, "number_rate_limited"),
        (Subject.NUMBER, 86400, p.per_number_day, "number_rate_limited"),
        (Subject.VISITOR, 3600, p.numbers_per_visitor_hour, "too_many_numbers"),
        (Subject.IP, 3600, p.per_ip_hour, "ip_rate_limited"),
        (Subject.SITE, 3600, p.per_site_hour, "site_rate_limited"),
    ]
    distinct = [q for q in admitted.quotas if q.distinct is not None]
    assert [(q.per, q.distinct) for q in distinct] == [(Subject.VISITOR, Subject.NUMBER)]
    assert all(q.per_site for q in admitted.quotas)
    assert admitted.quotas == request_quotas(POLICY)


def test_dials_are_limited_per_number_across_sites() -> None:
    tight = replace(POLICY, per_number_15min=1, per_number_hour=2, per_number_day=3)
    quotas = dial_quotas(tight)
    assert [(q.window_s, q.limit) for q in quotas] == [(900, 1), (3600, 2), (86400, 3)]
    assert all(q.per is Subject.NUMBER and not q.per_site for q in quotas)
    assert {q.refusal.code for q in quotas} == {"number_rate_limited"}


def test_the_rules_apply_in_order() -> None:
    """A request that breaks several rules gets the first one's refusal: the number, then
    the time, then the spend."""
    broke = CAP
    bad_number = admit(CallbackAsk("12345", SAT_12_NY, None), POLICY, NEW_YORK, broke, WED_10_NY, 0)
    assert isinstance(bad_number, Refusal) and bad_number.code == "invalid_phone"
    closed = admit(CallbackAsk(US, SAT_12_NY, None), POLICY, NEW_YORK, broke, WED_10_NY, 0)
    assert isinstance(closed, Refusal) and closed.code == "slot_unavailable"
