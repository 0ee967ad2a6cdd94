"""The board's figures from the history's sums (gateway/core/board_figures.py): the buckets,
the percentiles interpolated in them, the series per slot, and sums that count a call once
however often it is written."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core.board_figures import (
    NOT_REACHED,
    TO_HUMAN_BOUNDS_S,
    FigureCount,
    Span,
    board_figures,
    bucket_of,
    figure_key,
    quantile,
    rollup_changes,
    rollup_removals,
    span_window,
)
from gateway.core.history import HistoryRow

T0 = 1_800_000_000.0


def row(call_id: str, wait: float | None, score: int | None = None) -> HistoryRow:
    connected = None if wait is None else T0 + wait
    outcome = "completed" if wait is not None else "canceled"
    return HistoryRow(
        call_id, "acme", "webrtc", outcome, None, "anna", "dublin", T0, connected, T0 + 90,
        score, "[]",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [(0.0, 0), (0.99, 0), (1.0, 1), (3.5, 3), (59.9, 15), (86_400.0, len(TO_HUMAN_BOUNDS_S))],
)
def test_a_wait_falls_in_the_bucket_from_its_lower_bound(seconds: float, bucket: int) -> None:
    assert bucket_of(seconds) == bucket


def test_percentiles_are_interpolated_within_a_bucket() -> None:
    counts = [0] * (len(TO_HUMAN_BOUNDS_S) + 1)
    assert quantile(0.5, counts) is None
    counts[bucket_of(3.2)] += 2  # [3, 4)
    counts[bucket_of(41.0)] += 2  # [40, 50)
    assert quantile(0.5, counts) == 4.0  # the top of the first bucket: half the calls there
    assert quantile(0.75, counts) == 45.0
    counts = [0] * (len(TO_HUMAN_BOUNDS_S) + 1)
    counts[-1] = 3  # a day or more: the open bucket answers its lower bound
    assert quantile(0.9, counts) == TO_HUMAN_BOUNDS_S[-1]


def test_a_span_ends_with_the_slot_of_now() -> None:
    start, end = span_window(Span.DAY, T0 + 100)
    assert end == (T0 + 100) // 900 * 900 + 900 and end - start == 86_400
    assert Span.WEEK.seconds // Span.WEEK.step_s == 56 and Span.HOUR.step_s == 60


def test_series_per_slot_and_totals() -> None:
    counts = [
        FigureCount(0, "webrtc", "completed", bucket_of(5.0), None, 3),
        FigureCount(0, "webrtc", "canceled", NOT_REACHED, None, 1),
        FigureCount(2, "callback", "completed", bucket_of(30.0), True, 2),
        FigureCount(2, "callback", "failed", NOT_REACHED, False, 1),
        FigureCount(9, "webrtc", "completed", 0, None, 5),  # outside the span: ignored
    ]
    f = board_figures(counts, T0, 60, 3)
    assert f.reached == [3, 0, 2] and f.abandoned == [1, 0, 0] and f.failed == [0, 0, 1]
    assert f.by_channel == {"webrtc": [4, 0, 0], "callback": [0, 0, 3]}
    assert f.on_time_pct == [None, None, 66.7]
    assert f.to_human_p50[1] is None and f.to_human_p50[0] is not None
    assert 5 <= f.to_human_p50[0] <= 6
    assert f.totals["requests"] == 7 and f.totals["on_time_pct"] == 66.7


def test_a_call_written_again_moves_between_sums_and_is_counted_once() -> None:
    ended = row("c_1", 4.0)
    figures, scores = rollup_changes({}, [ended])
    assert figures == {figure_key(ended): 1} and not scores
    answered = replace(ended, survey_score=10)
    figures, scores = rollup_changes({"c_1": ended}, [answered])
    assert not figures, "same figures key: nothing moves"
    assert sum(scores.values()) == 1
    # Twice in one batch: only the newest counts.
    figures, _ = rollup_changes({}, [row("c_2", None), row("c_2", 7.0)])
    assert list(figures.values()) == [1] and next(iter(figures))[4] == bucket_of(7.0)
    gone_figures, gone_scores = rollup_removals([answered])
    assert sum(gone_figures.values()) == -1 and sum(gone_scores.values()) == -1
