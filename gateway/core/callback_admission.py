"""Who may book a PSTN callback, and for when: one pure function of the request, the site's
policy and hours, the counters read beforehand, and ``now``.

``admit`` decides everything that plain data can decide (the number, the time window, opening
hours, quiet hours, the spend cap) and returns an ``Admission`` that also lists, as data, the
claims the service must then take atomically in the store: the open-request slots (one
callback per visitor, one per number) and the quotas. Each claim carries the ``Refusal`` it
turns into when the store finds it full, so every refusal code is written here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.core.hours import is_open, next_open_at
from gateway.core.model import Branch, CallbackPolicy, Site
from gateway.core.phone_policy import (
    CheckedNumber,
    PhoneRefused,
    check_number,
    in_quiet_hours,
    next_allowed_at,
)

# A scheduled callback may be at most this far ahead.
MAX_AHEAD_S = 14 * 86400.0
# Spend is estimated, not billed: this much per started minute of a phone leg (US$
# millionths). A callback is two legs (the visitor's, and the bridge to the agent's phone).
# A minute of both is reserved atomically when a dial starts, so a burst cannot overshoot.
MICRO_USD_PER_MINUTE = 30_000
LEGS_PER_CALL = 2
DIAL_RESERVE = MICRO_USD_PER_MINUTE * LEGS_PER_CALL


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request turned down; ``code`` is the stable client-facing error code."""

    code: str
    message: str


class Subject(StrEnum):
    """What a slot or a quota is counted per."""

    VISITOR = "visitor"
    NUMBER = "number"
    IP = "ip"
    SITE = "site"


@dataclass(frozen=True, slots=True)
class OpenSlot:
    """At most one open callback per ``per`` (visitor or number) at a time."""

    per: Subject
    refusal: Refusal


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    """A sliding-window limit: at most ``limit`` requests per ``per`` in ``window_s``; with
    ``distinct``, at most ``limit`` distinct values of that subject (numbers per visitor).
    ``name`` tells the quotas of one subject apart in the store; a quota not ``per_site``
    counts across every site."""

    name: str
    per: Subject
    window_s: int
    limit: int
    refusal: Refusal
    distinct: Subject | None = None
    per_site: bool = True


@dataclass(frozen=True, slots=True)
class CallbackAsk:
    """The request as the visitor made it (the branch, if any, is one the site has)."""

    phone: str
    at: float | None
    branch: str | None


@dataclass(frozen=True, slots=True)
class Admission:
    number: CheckedNumber
    at: float | None
    """When to call: None is now."""
    detail: str | None
    slots: tuple[OpenSlot, ...]
    quotas: tuple[QuotaSpec, ...]


SLOTS = (
    OpenSlot(
        Subject.VISITOR, Refusal("callback_in_progress", "you already have a callback booked")
    ),
    OpenSlot(Subject.NUMBER, Refusal("number_has_callback", "that number already has a callback")),
)

_TOO_MANY = "too many callbacks; try again later"


def request_quotas(policy: CallbackPolicy) -> tuple[QuotaSpec, ...]:
    """The quotas every request takes, in the order they are checked."""
    number = Refusal("number_rate_limited", _TOO_MANY)
    return (
        QuotaSpec("n15", Subject.NUMBER, 900, policy.per_number_15min, number),
        QuotaSpec("nh", Subject.NUMBER, 3600, policy.per_number_hour, number),
        QuotaSpec("nd", Subject.NUMBER, 86400, policy.per_number_day, number),
        QuotaSpec(
            "vn",
            Subject.VISITOR,
            3600,
            policy.numbers_per_visitor_hour,
            Refusal("too_many_numbers", _TOO_MANY),
            distinct=Subject.NUMBER,
        ),
        QuotaSpec(
            "ip", Subject.IP, 3600, policy.per_ip_hour, Refusal("ip_rate_limited", _TOO_MANY)
        ),
        QuotaSpec(
            "site",
            Subject.SITE,
            3600,
            policy.per_site_hour,
            Refusal("site_rate_limited", _TOO_MANY),
        ),
    )


def dial_quotas(policy: CallbackPolicy) -> tuple[QuotaSpec, ...]:
    """The per-number limits bound dials too, across sites: retries of many requests must not
    add up to bombing one phone."""
    number = Refusal("number_rate_limited", _TOO_MANY)
    return (
        QuotaSpec("d15", Subject.NUMBER, 900, policy.per_number_15min, number, per_site=False),
        QuotaSpec("dh", Subject.NUMBER, 3600, policy.per_number_hour, number, per_site=False),
        QuotaSpec("dd", Subject.NUMBER, 86400, policy.per_number_day, number, per_site=False),
    )


# --- hours --------------------------------------------------------------------------------


def hours_scope(site: Site, branch: str | None) -> tuple[Branch, ...]:
    """The branches whose hours count: the requested one's, or any of the site's."""
    return (site.branches[branch],) if branch else tuple(site.branches.values())


def open_at(scope: Sequence[Branch], at: float) -> bool:
    return not scope or any(is_open(b, at) for b in scope)


def next_opening(scope: Sequence[Branch], now: float) -> float | None:
    times = [t for b in scope if (t := next_open_at(b, now)) is not None]
    return min(times) if times else None


def callable_at(number: CheckedNumber, policy: CallbackPolicy, at: float) -> float:
    """The first time from ``at`` that is not night at the number (a number whose zones leave
    no such time within a week is called at ``at``: it asked to be called)."""
    try:
        return next_allowed_at(number, policy, at)
    except PhoneRefused:
        return at


def over_spend_cap(policy: CallbackPolicy, spent_micro_usd: int) -> bool:
    """Whether a spend of ``spent_micro_usd`` today (this dial's reserve included) is over."""
    return spent_micro_usd > policy.daily_spend_cap_usd * 1_000_000


# --- the decision -------------------------------------------------------------------------


def time_refusal(
    number: CheckedNumber, policy: CallbackPolicy, scope: Sequence[Branch], at: float, now: float
) -> Refusal | None:
    """Why a callback may not be placed at ``at`` (a time the visitor picked), if it may
    not."""
    if at > now + MAX_AHEAD_S:
        return Refusal("slot_unavailable", "that time is too far ahead")
    if not open_at(scope, at):
        return Refusal("slot_unavailable", "we are closed at that time")
    if in_quiet_hours(number, policy, at):
        return Refusal("quiet_hours", "that is night time at your number")
    return None


def admit(
    ask: CallbackAsk,
    policy: CallbackPolicy,
    scope: Sequence[Branch],
    spent_micro_usd: int,
    now: float,
    min_lead_s: float,
) -> Admission | Refusal:
    """``scope``: the branches whose hours count (``hours_scope``); ``spent_micro_usd``: the
    site's estimated spend today; ``min_lead_s``: a time closer than this is taken as now."""
    try:
        number = check_number(ask.phone, policy)
    except PhoneRefused as e:
        return Refusal(e.code, e.message)
    at = ask.at
    if at is not None:
        if at <= now + min_lead_s:
            at = None  # "at a time" that is already here is "now"
        else:
            refusal = time_refusal(number, policy, scope, at, now)
            if refusal is not None:
                return refusal
    detail = "We'll call you at the time you chose" if at is not None else None
    if at is None and not open_at(scope, now):
        opening = next_opening(scope, now)
        if opening is not None:
            at = callable_at(number, policy, opening)
            detail = "We're closed now; we'll call you when we open"
    if at is None and in_quiet_hours(number, policy, now):
        # Nobody's phone rings at night because a web form said so: pick a time instead.
        return Refusal("quiet_hours", "it is night time at your number; pick a time")
    if over_spend_cap(policy, spent_micro_usd + DIAL_RESERVE):
        return Refusal("spend_cap_reached", "no more callbacks today; sorry")
    return Admission(number, at, detail, SLOTS, request_quotas(policy))
