"""Business hours of a branch, evaluated in the branch's own timezone.

Pure functions over a `Branch` and an instant (POSIX seconds passed in by the caller: the
core has no clock of its own). Everything is derived from one primitive, `open_intervals`,
which turns the weekly opening spans and the holidays into concrete, merged ``[start, end)``
intervals of POSIX time. Working on absolute instants rather than wall-clock times is what
makes daylight-saving transitions come out right: a night shift from 22:00 to 06:00 lasts
7 hours on the night the clocks go forward and 9 hours on the night they go back, and
comparing instants never has to care.

Local wall-clock rules, chosen once and used everywhere:

- A span whose ``closes`` is not after its ``opens`` runs past midnight into the next day
  (``opens == closes`` means 24 hours, ``closes == 00:00`` means "until midnight").
- A wall-clock time that does not exist (it falls in the gap when the clocks go forward) is
  shifted forward by the length of the gap, as Python's ``fold=0``, Java's ``ZonedDateTime``
  and most calendar software do: a branch that opens at 02:30 in New York opens at 03:30 on
  the morning the clocks change.
- A wall-clock time that occurs twice (when the clocks go back) means its first occurrence.
- A holiday is a local date closed all day: spans that start on it are dropped, and a span
  from the previous evening that runs past midnight into it is cut at midnight.
- Adjacent or overlapping spans merge, so a branch open 22:00-24:00 on Monday and
  00:00-02:00 on Tuesday "closes at" 02:00, not at midnight.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from gateway.core.model import Branch

__all__ = [
    "LOOKAHEAD_S",
    "closes_at",
    "is_open",
    "next_open_at",
    "open_intervals",
    "slot_starts",
]

# How far ahead `next_open_at` and `closes_at` look. Two weeks covers any normal weekly
# schedule plus a long holiday; a branch that stays shut longer is treated as "not opening".
LOOKAHEAD_S = 14 * 86_400.0

_NEXT_OPEN_WINDOW_S = 3 * 86_400.0
_ONE_DAY = timedelta(days=1)
_MIDNIGHT = time(0, 0)

Interval = tuple[float, float]


def _instant(day: date, at: time, zone: ZoneInfo) -> float:
    """POSIX seconds of local wall-clock `at` on `day` in `zone` (fold=0, see module doc)."""
    wall = datetime.combine(day, at.replace(tzinfo=None, fold=0))
    return wall.replace(tzinfo=zone).timestamp()


def _spans_starting_on(branch: Branch, day: date, zone: ZoneInfo) -> list[Interval]:
    """The concrete intervals of the spans that *start* on local date `day`."""
    if day in branch.holidays:
        return []
    intervals: list[Interval] = []
    for span in branch.hours.get(day.weekday(), ()):
        opens_t = span.opens.replace(tzinfo=None)
        closes_t = span.closes.replace(tzinfo=None)
        start = _instant(day, opens_t, zone)
        if closes_t > opens_t:
            end = _instant(day, closes_t, zone)
        else:
            # Runs past midnight; a holiday the next day is closed all day, so stop there.
            next_day = day + _ONE_DAY
            end = _instant(next_day, _MIDNIGHT if next_day in branch.holidays else closes_t, zone)
        # A span squeezed out by a DST gap (e.g. 02:00-03:00 in New York in March) is empty.
        if end > start:
            intervals.append((start, end))
    return intervals


def _merge(intervals: list[Interval]) -> list[Interval]:
    """Sort and merge overlapping or touching intervals."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def open_intervals(branch: Branch, start: float, end: float) -> list[Interval]:
    """The branch's merged opening intervals that overlap ``[start, end)``, in order.

    Intervals are not clipped to the window: an interval that began before `start` keeps its
    true opening instant (slot alignment needs it). Every interval that ends at or before
    `end` ends at its true closing instant; the last one may be cut short if it is still open
    more than a day after `end` (only a branch open around the clock does that).

    Raises `zoneinfo.ZoneInfoNotFoundError` for an unknown timezone: that is a configuration
    error and should fail loudly when the site is loaded, not be guessed around here.
    """
    if end <= start:
        return []
    zone = ZoneInfo(branch.timezone)
    # A span can last up to 24 hours, so one that started the local day before `start` may
    # still be open; one day past `end` lets a span that runs on past `end` merge correctly.
    day = datetime.fromtimestamp(start, zone).date() - _ONE_DAY
    last = datetime.fromtimestamp(end, zone).date() + _ONE_DAY
    raw: list[Interval] = []
    while day <= last:
        raw.extend(_spans_starting_on(branch, day, zone))
        day += _ONE_DAY
    return [(s, e) for s, e in _merge(raw) if e > start and s < end]


def _containing(intervals: list[Interval], now: float) -> Interval | None:
    for start, end in intervals:
        if start <= now < end:
            return (start, end)
    return None


def is_open(branch: Branch, now: float) -> bool:
    """Whether the branch is within its opening hours at instant `now`."""
    return _containing(open_intervals(branch, now, now + 1.0), now) is not None


def next_open_at(branch: Branch, now: float) -> float | None:
    """The earliest instant at or after `now` when the branch is open.

    Returns `now` itself when the branch is open now (it is open "already"), so a caller that
    wants the earliest moment it may promise a call needs no special case. Returns None when
    the branch does not open within `LOOKAHEAD_S`.
    """
    # Look a few days at a time: almost every branch opens within the first window, and
    # routing asks this for every branch of a closed site.
    limit = now + LOOKAHEAD_S
    window_start = now
    while window_start < limit:
        window_end = min(window_start + _NEXT_OPEN_WINDOW_S, limit)
        intervals = open_intervals(branch, window_start, window_end)
        if intervals:
            # The first interval overlapping this window; earlier windows had none.
            return max(intervals[0][0], now)
        window_start = window_end
    return None


def closes_at(branch: Branch, now: float) -> float | None:
    """When the branch next closes, if it is open at `now`.

    Returns None when the branch is closed now, and also when it stays open for longer than
    `LOOKAHEAD_S` (open around the clock): "no closing time to show" in both cases. Use
    `is_open` to tell them apart.
    """
    window_end = now + LOOKAHEAD_S
    current = _containing(open_intervals(branch, now, window_end), now)
    if current is None or current[1] > window_end:
        return None
    return current[1]


def slot_starts(branch: Branch, now: float, horizon_s: float, step_s: float) -> list[float]:
    """Start instants of bookable callback slots in ``[now, now + horizon_s)``.

    A slot is a window of `step_s` seconds that lies entirely within one opening interval, so
    a callback booked for it happens while the branch is open. Slots are laid on a grid that
    starts at each interval's opening instant (a branch opening at 09:00 with 30-minute steps
    offers 09:00, 09:30, ...), stepping in elapsed seconds, so spacing stays even across a
    DST change. Slots that start before `now` are not offered; a caller wanting lead time
    passes a later `now`.
    """
    if step_s <= 0:
        raise ValueError(f"step_s must be positive, got {step_s}")
    if horizon_s <= 0:
        return []
    limit = now + horizon_s
    slots: list[float] = []
    for start, end in open_intervals(branch, now, limit):
        # First grid point at or after now (the loop corrects any float rounding in floor).
        k = max(0, math.floor((now - start) / step_s))
        while start + k * step_s < now:
            k += 1
        slot = start + k * step_s
        while slot < limit and slot + step_s <= end:
            slots.append(slot)
            k += 1
            slot = start + k * step_s
    return slots
