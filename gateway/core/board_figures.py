"""The figures on the supervisor's board, from the call history: how fast customers reach a
human (p50 and p90), how many never do, whether callbacks come when promised, calls by
channel, and what customers say per agent and branch (NPS).

The history keeps the calls added up as they are written (gateway/store/history.py): a
count per minute, channel, outcome, bucket of time to the first human
(``TO_HUMAN_BOUNDS_S``) and whether a callback kept its promise (``figure_key``), and a
count of answers per hour, agent, branch and group (``score_key``). The board reads those
sums, never the calls: a day of a million calls is a few tens of thousands of counts. This
module turns them into series, one value per slot, and the percentiles from the buckets as
Prometheus' ``histogram_quantile`` does (linear within a bucket), as exact as the buckets,
which are finest where the answers matter (under a minute). Pure.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.core.history import HistoryRow
from gateway.core.survey import Group, Tally, group_of

TO_HUMAN_BOUNDS_S: tuple[float, ...] = (
    1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 90, 120, 150, 180, 240, 300,
    450, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400,
)  # fmt: skip
"""Upper bounds of the buckets of the time to the first human; one more holds the rest."""
NOT_REACHED = -1
"""The bucket of a call that reached nobody."""


class Span(StrEnum):
    """The board's three views and the width of a slot in each."""

    HOUR = "hour"
    DAY = "day"
    WEEK = "week"

    @property
    def seconds(self) -> int:
        return {"hour": 3600, "day": 86_400, "week": 7 * 86_400}[self.value]

    @property
    def step_s(self) -> int:
        return {"hour": 60, "day": 900, "week": 3 * 3600}[self.value]


def span_window(span: Span, now: float) -> tuple[float, float]:
    """The slots of ``span`` up to ``now``: the start (aligned to a slot) and the end (the
    end of the slot ``now`` falls in)."""
    step = span.step_s
    end = (now // step + 1) * step
    return end - span.seconds, end


@dataclass(frozen=True, slots=True)
class FigureCount:
    """How many calls of one kind were made in one slot (a row of the history's sums)."""

    slot: int
    channel: str
    outcome: str
    to_human_bucket: int
    """Index into ``TO_HUMAN_BOUNDS_S`` (past its end: longer), or ``NOT_REACHED``."""
    on_time: bool | None
    """``HistoryRow.on_time``."""
    count: int


@dataclass(frozen=True, slots=True)
class ScoreCount:
    agent_id: str | None
    branch: str | None
    group: Group
    count: int


def bucket_of(seconds: float) -> int:
    """Bucket ``i`` holds ``[TO_HUMAN_BOUNDS_S[i - 1], TO_HUMAN_BOUNDS_S[i])``."""
    return bisect.bisect_right(TO_HUMAN_BOUNDS_S, seconds)


FigureKey = tuple[str, float, str, str, int, int]
"""(site, minute, channel, outcome, bucket, on_time: 1, 0 or -1 for not judged)."""
ScoreKey = tuple[str, float, str, str, str]
"""(site, hour, agent id or "", branch or "", group)."""


def figure_key(row: HistoryRow) -> FigureKey:
    bucket = (
        NOT_REACHED if row.connected_at is None else bucket_of(row.connected_at - row.created_at)
    )
    on_time = -1 if row.on_time is None else int(row.on_time)
    minute = row.created_at // 60 * 60
    return (row.site, minute, row.channel, row.outcome, bucket, on_time)


def score_key(row: HistoryRow) -> ScoreKey | None:
    if row.survey_score is None:
        return None
    hour = row.created_at // 3600 * 3600
    group = group_of(row.survey_score).value
    return (row.site, hour, row.agent_id or "", row.branch or "", group)


def rollup_removals(
    rows: Iterable[HistoryRow],
) -> tuple[Counter[FigureKey], Counter[ScoreKey]]:
    """What deleting ``rows`` takes from each sum."""
    figures: Counter[FigureKey] = Counter()
    scores: Counter[ScoreKey] = Counter()
    for row in rows:
        figures[figure_key(row)] -= 1
        if (key := score_key(row)) is not None:
            scores[key] -= 1
    return figures, scores


def rollup_changes(
    before: Mapping[str, HistoryRow], rows: Iterable[HistoryRow]
) -> tuple[Counter[FigureKey], Counter[ScoreKey]]:
    """What writing ``rows`` over the stored ``before`` (by call id) adds to each sum: a
    call counted once, under its latest key, however often it is written."""
    figures: Counter[FigureKey] = Counter()
    scores: Counter[ScoreKey] = Counter()
    latest = {r.call_id: r for r in rows}
    for call_id, row in latest.items():
        old = before.get(call_id)
        figures[figure_key(row)] += 1
        if (key := score_key(row)) is not None:
            scores[key] += 1
        if old is not None:
            figures[figure_key(old)] -= 1
            if (key := score_key(old)) is not None:
                scores[key] -= 1
    return (
        Counter({k: n for k, n in figures.items() if n}),
        Counter({k: n for k, n in scores.items() if n}),
    )


def quantile(q: float, buckets: Sequence[int]) -> float | None:
    """The ``q`` quantile of the observations counted in ``buckets`` (one count per bucket
    of ``TO_HUMAN_BOUNDS_S``, and the rest), linear within a bucket; None with none. An
    answer in the last, open bucket is its lower bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(TO_HUMAN_BOUNDS_S):
                return float(TO_HUMAN_BOUNDS_S[-1])
            low = 0.0 if i == 0 else float(TO_HUMAN_BOUNDS_S[i - 1])
            high = float(TO_HUMAN_BOUNDS_S[i])
            return low + (high - low) * max(0.0, rank - seen) / count
        seen += count
    return float(TO_HUMAN_BOUNDS_S[-1])


@dataclass(frozen=True, slots=True)
class NpsRow:
    subject: str
    tally: Tally


@dataclass(slots=True)
class BoardFigures:
    """One value per slot for each series; ``None`` where a slot has nothing to say."""

    start: float
    step_s: int
    to_human_p50: list[float | None]
    to_human_p90: list[float | None]
    reached: list[int]
    abandoned: list[int]
    """Requests that ended without reaching anyone and that the customer gave up on."""
    failed: list[int]
    """Requests that ended without reaching anyone because nobody could take them."""
    on_time_pct: list[float | None]
    by_channel: dict[str, list[int]]
    totals: dict[str, float | int | None] = field(default_factory=dict)
    """The same over the whole span: requests, reached, abandoned, failed, p50, p90,
    on_time_pct."""


def board_figures(
    counts: Iterable[FigureCount], start: float, step_s: int, slots: int
) -> BoardFigures:
    buckets = [[0] * (len(TO_HUMAN_BOUNDS_S) + 1) for _ in range(slots)]
    all_buckets = [0] * (len(TO_HUMAN_BOUNDS_S) + 1)
    reached, abandoned, failed = [0] * slots, [0] * slots, [0] * slots
    due, kept = [0] * slots, [0] * slots
    by_channel: dict[str, list[int]] = {}
    for c in counts:
        if not 0 <= c.slot < slots:
            continue
        by_channel.setdefault(c.channel, [0] * slots)[c.slot] += c.count
        if c.to_human_bucket == NOT_REACHED:
            if c.outcome == "canceled":
                abandoned[c.slot] += c.count
            elif c.outcome == "failed":
                failed[c.slot] += c.count
        else:
            reached[c.slot] += c.count
            buckets[c.slot][c.to_human_bucket] += c.count
            all_buckets[c.to_human_bucket] += c.count
        if c.on_time is not None:
            due[c.slot] += c.count
            kept[c.slot] += c.count if c.on_time else 0

    def pct(k: int, d: int) -> float | None:
        return None if d == 0 else round(100.0 * k / d, 1)

    figures = BoardFigures(
        start=start,
        step_s=step_s,
        to_human_p50=[_round(quantile(0.5, b)) for b in buckets],
        to_human_p90=[_round(quantile(0.9, b)) for b in buckets],
        reached=reached,
        abandoned=abandoned,
        failed=failed,
        on_time_pct=[pct(k, d) for k, d in zip(kept, due, strict=True)],
        by_channel=by_channel,
    )
    figures.totals = {
        "requests": sum(sum(v) for v in by_channel.values()),
        "reached": sum(reached),
        "abandoned": sum(abandoned),
        "failed": sum(failed),
        "to_human_p50": _round(quantile(0.5, all_buckets)),
        "to_human_p90": _round(quantile(0.9, all_buckets)),
        "on_time_pct": pct(sum(kept), sum(due)),
    }
    return figures


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def nps_rows(counts: Iterable[ScoreCount]) -> tuple[list[NpsRow], list[NpsRow]]:
    """Tallies by agent and by branch, each best NPS first."""
    agents: dict[str, Tally] = {}
    branches: dict[str, Tally] = {}
    for c in counts:
        for subject, tallies in ((c.agent_id, agents), (c.branch, branches)):
            if subject is None:
                continue
            t = tallies.get(subject, Tally())
            tallies[subject] = Tally(
                t.promoters + (c.count if c.group is Group.PROMOTER else 0),
                t.passives + (c.count if c.group is Group.PASSIVE else 0),
                t.detractors + (c.count if c.group is Group.DETRACTOR else 0),
            )

    def ordered(tallies: dict[str, Tally]) -> list[NpsRow]:
        rows = [NpsRow(s, t) for s, t in tallies.items()]
        rows.sort(key=lambda r: (-(r.tally.nps or 0.0), r.subject))
        return rows

    return ordered(agents), ordered(branches)
