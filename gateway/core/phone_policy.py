"""Whether a PSTN callback may dial a number, and when.

Pure functions over a raw number, a `CallbackPolicy` and an instant (POSIX seconds passed
in by the caller: the core has no clock of its own). Everything about numbers (parsing,
validity, region, line type, time zones) comes from `phonenumbers`, so the rules follow
libphonenumber's metadata instead of drifting from it; this module only decides what the
site's policy makes of the answer.

Quiet hours are a window of local wall-clock time in the number's own time zones. A number
whose zone is uncertain (a US area code that straddles two zones, a mobile range shared by
a whole country) is quiet when it is night in *any* of its zones: waking someone is the
harm to avoid, calling a little later is cheap.

Each night's quiet period is a concrete interval of POSIX time, computed per zone with
`zoneinfo`, so daylight-saving changes come out right. The wall-clock rules:

- A window whose end is not after its start runs past midnight (21:00-08:00 starts in the
  evening and ends the next morning). ``start == end`` is therefore quiet around the clock;
  settings refuse such a policy, and here it makes every time quiet.
- Quiet starts the first moment the local clock reaches the start time, and lasts until
  the last moment the clock still shows a time before the end. So a time skipped when the
  clocks go forward starts or ends quiet at the transition (the clock jumps from 01:59 to
  03:00, and 03:00 is past an end of 02:30), and when the clocks go back a start time means
  its first occurrence and an end time its second: the repeated hour never opens a callable
  gap in the middle of the night.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import phonenumbers
from phonenumbers import timezone as pn_timezone

from gateway.core.model import CallbackPolicy

__all__ = [
    "LOOKAHEAD_S",
    "MAX_RAW_LENGTH",
    "CheckedNumber",
    "PhoneRefused",
    "check_number",
    "in_quiet_hours",
    "next_allowed_at",
]

# Longer input is not a phone number someone typed; refusing it early also bounds the work
# phonenumbers does on hostile input.
MAX_RAW_LENGTH = 32

# How far ahead `next_allowed_at` looks. Quiet hours repeat daily, so if a number's zones
# leave no callable moment in a week (their nights overlap around the clock), they never do.
LOOKAHEAD_S = 7 * 86_400.0

# International form only: one leading "+", then digits and the separators people type.
# Anything else (letters, "x" extensions, a second number, text around it) is refused here
# because phonenumbers would otherwise quietly extract or reinterpret a number from it.
_RAW_SHAPE = re.compile(r"\+[0-9 ().\-]+")

_UNKNOWN_ZONE = "Etc/Unknown"
_UTC = ZoneInfo("UTC")
_ONE_DAY = timedelta(days=1)


class PhoneRefused(Exception):
    """A number the site will not call, with a stable snake_case `code` for the wire.

    Codes: ``invalid_phone``, ``country_not_allowed``, ``number_type_not_allowed``, and
    ``no_callable_hours`` (from `next_allowed_at`, when the number's time zones leave no
    moment outside quiet hours).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class CheckedNumber:
    """A number that passed the policy, with what phonenumbers knows about it.

    Kept as plain strings so it can be stored and compared without phonenumbers objects.
    """

    e164: str
    """The number to dial, in E.164 ("+353871234567")."""
    region: str
    """ISO region code ("IE"), or "001" for non-geographic numbers."""
    number_type: str
    """A `phonenumbers.PhoneNumberType` member name ("MOBILE", "FIXED_LINE_OR_MOBILE")."""
    timezones: tuple[str, ...]
    """IANA zones the number may ring in, per phonenumbers; empty when it does not know."""


def check_number(raw: str, policy: CallbackPolicy) -> CheckedNumber:
    """Parse a visitor-typed number and apply the site's country and line-type rules.

    Raises only `PhoneRefused`, whatever the input: this runs on untrusted text at the edge,
    and a stray exception from a parsing library must not become a 500.
    """
    if len(raw) > MAX_RAW_LENGTH:
        raise PhoneRefused("invalid_phone", f"phone number is longer than {MAX_RAW_LENGTH}")
    text = raw.strip()
    if not _RAW_SHAPE.fullmatch(text):
        raise PhoneRefused(
            "invalid_phone", "phone number must be in international form, like +353871234567"
        )
    try:
        parsed = phonenumbers.parse(text, None)
        if not phonenumbers.is_valid_number(parsed):
            raise PhoneRefused("invalid_phone", "not a valid phone number")
        region = phonenumbers.region_code_for_number(parsed) or ""
        type_name = phonenumbers.PhoneNumberType.to_string(phonenumbers.number_type(parsed))
        zones = pn_timezone.time_zones_for_number(parsed)
        e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    except PhoneRefused:
        raise
    except Exception:  # NumberParseException, and anything else the library throws
        raise PhoneRefused("invalid_phone", "not a phone number") from None

    if region not in policy.allowed_countries:
        raise PhoneRefused("country_not_allowed", f"callbacks to region {region!r} not allowed")
    # UNKNOWN is not a line anyone answers, whatever the policy lists.
    if type_name == "UNKNOWN" or type_name in policy.blocked_number_types:
        raise PhoneRefused(
            "number_type_not_allowed", f"callbacks to {type_name.lower()} numbers not allowed"
        )
    return CheckedNumber(
        e164=e164,
        region=region,
        number_type=type_name,
        timezones=tuple(z for z in zones if z != _UNKNOWN_ZONE),
    )


def in_quiet_hours(number: CheckedNumber, policy: CallbackPolicy, at: float) -> bool:
    """Whether calling at `at` could reach someone during their quiet hours."""
    window = _window(policy)
    return any(_quiet_period(zone, window, at) is not None for zone in _zones(number))


def next_allowed_at(number: CheckedNumber, policy: CallbackPolicy, at: float) -> float:
    """The earliest instant at or after `at` outside quiet hours in every one of its zones.

    Returns `at` itself when that is already allowed, so a scheduler can always take this
    value without a special case. Raises `PhoneRefused` ``no_callable_hours`` when the
    zones' quiet periods overlap around the clock for `LOOKAHEAD_S` (a number spread over
    too many zones for the site's window): the honest answer is that there is no good time.
    """
    window = _window(policy)
    zones = _zones(number)
    limit = at + LOOKAHEAD_S
    t = at
    while True:
        # Skip to the end of every quiet period t is in; everything skipped was quiet in some
        # zone, so the first t that no zone pushes on is the earliest allowed instant.
        moved = False
        for zone in zones:
            period = _quiet_period(zone, window, t)
            if period is not None:
                t = period[1]
                moved = True
        if not moved:
            return t
        if t > limit:
            raise PhoneRefused(
                "no_callable_hours", f"{number.e164} is in quiet hours around the clock"
            )


# --- time zones -------------------------------------------------------------------------


def local_zone(number: CheckedNumber) -> ZoneInfo:
    """The zone to tell the number's owner times in (the first of its zones)."""
    return _zones(number)[0]


def _zones(number: CheckedNumber) -> tuple[ZoneInfo, ...]:
    return _resolve_zones(number.timezones, number.region)


@lru_cache(maxsize=1024)
def _resolve_zones(names: tuple[str, ...], region: str) -> tuple[ZoneInfo, ...]:
    """The zones to honour: the number's own, else its region's, else UTC.

    Names this system's tz database does not know are skipped rather than raised: a stored
    `CheckedNumber` may outlive a tzdata update, and one stale name must not stop the rest.
    """
    zones = _load(names)
    if not zones and region:
        example = phonenumbers.example_number(region)
        if example is not None:
            zones = _load(pn_timezone.time_zones_for_number(example))
    return zones or (_UTC,)


def _load(names: tuple[str, ...]) -> tuple[ZoneInfo, ...]:
    zones: list[ZoneInfo] = []
    for name in names:
        if name == _UNKNOWN_ZONE:
            continue
        try:
            zones.append(ZoneInfo(name))
        except (KeyError, ValueError, OSError):  # not found (a KeyError), malformed, unreadable
            continue
    return tuple(zones)


# --- quiet periods as POSIX intervals ---------------------------------------------------

_Window = tuple[time, time]


def _window(policy: CallbackPolicy) -> _Window:
    return (
        policy.quiet_hours_start.replace(tzinfo=None, fold=0),
        policy.quiet_hours_end.replace(tzinfo=None, fold=0),
    )


def _quiet_period(zone: ZoneInfo, window: _Window, at: float) -> tuple[float, float] | None:
    """The ``[start, end)`` quiet period of `zone` that contains `at`, if any."""
    start_t, end_t = window
    today = datetime.fromtimestamp(at, zone).date()
    # A night starts on the local date of `at` or the day before; one more day either side
    # covers zones whose clocks go back across midnight.
    for offset in (-2, -1, 0, 1):
        day = today + timedelta(days=offset)
        start = _first_at_or_after(datetime.combine(day, start_t), zone)
        end_day = day if end_t > start_t else day + _ONE_DAY
        end = _last_before(datetime.combine(end_day, end_t), zone)
        if start <= at < end:
            return (start, end)
    return None


def _first_at_or_after(wall: datetime, zone: ZoneInfo) -> float:
    """The first instant at which the local clock in `zone` shows `wall` or later."""
    fold0, fold1 = _fold_instants(wall, zone)
    if fold0 <= fold1:
        return fold0  # exists; the first occurrence when it happens twice
    return _gap_end(wall, zone, fold1, fold0)


def _last_before(wall: datetime, zone: ZoneInfo) -> float:
    """The end of the last stretch in which the local clock in `zone` shows before `wall`."""
    fold0, fold1 = _fold_instants(wall, zone)
    if fold0 <= fold1:
        return fold1  # exists; the second occurrence when it happens twice
    return _gap_end(wall, zone, fold1, fold0)


def _fold_instants(wall: datetime, zone: ZoneInfo) -> tuple[float, float]:
    """`wall` read with fold=0 and fold=1.

    Equal for an ordinary time; fold=0 earlier for a repeated time; fold=0 *later* for a
    time skipped by a forward jump (zoneinfo reads it with the offset from before the jump).
    """
    return (
        wall.replace(tzinfo=zone, fold=0).timestamp(),
        wall.replace(tzinfo=zone, fold=1).timestamp(),
    )


def _gap_end(wall: datetime, zone: ZoneInfo, lo: float, hi: float) -> float:
    """The instant the clocks jump over `wall`: the first second whose local time is past it.

    zoneinfo has no public list of transitions, so bisect between the two fold readings,
    which bracket the jump (the local clock is monotonic there). tz transitions fall on
    whole seconds.
    """
    low, high = math.floor(lo), math.ceil(hi)
    while high - low > 1:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, zone).replace(tzinfo=None) >= wall:
            high = mid
        else:
            low = mid
    return float(high)
