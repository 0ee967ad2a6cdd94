"""Comparing an experiment's arms: is the variant policy better, worse, or is it too early
to say?

Three measures, each with its estimate per arm, a confidence interval, the sample size, and
the difference between the arms (variant minus control) with its own interval:

- time to the first human (seconds, mean of the requests that reached someone; lower is
  better);
- abandonment (the share of requests that ended without reaching anyone; lower is better);
- NPS (percent promoters minus percent detractors of the answers; higher is better).

A verdict is given only when the data can carry it: each arm has at least ``MIN_SAMPLES``
observations of the measure, and the difference is significant at ``ALPHA``. The board is
looked at again and again while the data come in, and every look is another chance of a
false winner, so the bar is set higher than the usual 5%: 1%, two-sided (z tests, the
normal approximation, sound at these sample sizes). Until then the verdict says why not:
``too_early`` (too few) or ``no_difference_yet``. Pure: the figures come from the call
history (gateway/store/history.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from statistics import NormalDist

MIN_SAMPLES = 100
"""Observations each arm needs of a measure before any verdict on it."""
ALPHA = 0.01
"""Two-sided significance a verdict needs; also the intervals' level (99%)."""
_Z = NormalDist().inv_cdf(1 - ALPHA / 2)


@dataclass(frozen=True, slots=True)
class ArmFigures:
    """One arm's sums, as the history adds them up."""

    requests: int = 0
    reached: int = 0
    """Requests that reached a person."""
    to_human_sum: float = 0.0
    to_human_squares: float = 0.0
    """Sum of squares of the seconds to the first human, of the requests that reached one."""
    abandoned: int = 0
    """Requests that ended without reaching anyone."""
    promoters: int = 0
    passives: int = 0
    detractors: int = 0


class Verdict(StrEnum):
    TOO_EARLY = "too_early"
    NO_DIFFERENCE_YET = "no_difference_yet"
    VARIANT_BETTER = "variant_better"
    VARIANT_WORSE = "variant_worse"


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float | None
    low: float | None
    high: float | None
    n: int


@dataclass(frozen=True, slots=True)
class MeasureComparison:
    measure: str
    control: Estimate
    variant: Estimate
    difference: Estimate
    """Variant minus control, with its interval; n: the smaller arm's sample."""
    p_value: float | None
    verdict: Verdict


def _interval(value: float, se: float, n: int) -> Estimate:
    return Estimate(value, value - _Z * se, value + _Z * se, n)


def _none(n: int) -> Estimate:
    return Estimate(None, None, None, n)


def _p_value(z: float) -> float:
    return 2 * (1 - NormalDist().cdf(abs(z)))


def _verdict(
    n_control: int, n_variant: int, diff: float, se: float, lower_is_better: bool
) -> tuple[float | None, Verdict]:
    if min(n_control, n_variant) < MIN_SAMPLES:
        return None, Verdict.TOO_EARLY
    if se <= 0:
        # No spread at all (every answer the same): a difference is then certain.
        if diff == 0:
            return 1.0, Verdict.NO_DIFFERENCE_YET
        p = 0.0
    else:
        p = _p_value(diff / se)
    if p >= ALPHA:
        return p, Verdict.NO_DIFFERENCE_YET
    better = diff < 0 if lower_is_better else diff > 0
    return p, Verdict.VARIANT_BETTER if better else Verdict.VARIANT_WORSE


def _mean(arm: ArmFigures) -> tuple[float, float] | None:
    """Mean seconds to the first human and the variance of one observation."""
    n = arm.reached
    if n == 0:
        return None
    mean = arm.to_human_sum / n
    variance = max(0.0, arm.to_human_squares / n - mean * mean) * (n / (n - 1) if n > 1 else 0)
    return mean, variance


def compare_time_to_human(control: ArmFigures, variant: ArmFigures) -> MeasureComparison:
    c, v = _mean(control), _mean(variant)
    nc, nv = control.reached, variant.reached
    if c is None or v is None:
        return MeasureComparison(
            "time_to_first_human_s",
            _interval(c[0], math.sqrt(c[1] / nc), nc) if c else _none(nc),
            _interval(v[0], math.sqrt(v[1] / nv), nv) if v else _none(nv),
            _none(min(nc, nv)),
            None,
            Verdict.TOO_EARLY,
        )
    diff = v[0] - c[0]
    se = math.sqrt(c[1] / nc + v[1] / nv)
    p, verdict = _verdict(nc, nv, diff, se, lower_is_better=True)
    return MeasureComparison(
        "time_to_first_human_s",
        _interval(c[0], math.sqrt(c[1] / nc), nc),
        _interval(v[0], math.sqrt(v[1] / nv), nv),
        _interval(diff, se, min(nc, nv)),
        p,
        verdict,
    )


def _wilson(successes: int, n: int) -> Estimate:
    if n == 0:
        return _none(0)
    p = successes / n
    z2 = _Z * _Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def compare_abandonment(control: ArmFigures, variant: ArmFigures) -> MeasureComparison:
    nc, nv = control.requests, variant.requests
    ci, vi = _wilson(control.abandoned, nc), _wilson(variant.abandoned, nv)
    if nc == 0 or nv == 0:
        return MeasureComparison("abandonment", ci, vi, _none(min(nc, nv)), None, Verdict.TOO_EARLY)
    pc, pv = control.abandoned / nc, variant.abandoned / nv
    diff = pv - pc
    # The test under "no difference" pools the arms; the interval does not.
    pooled = (control.abandoned + variant.abandoned) / (nc + nv)
    se_test = math.sqrt(pooled * (1 - pooled) * (1 / nc + 1 / nv))
    se = math.sqrt(pc * (1 - pc) / nc + pv * (1 - pv) / nv)
    p, verdict = _verdict(nc, nv, diff, se_test, lower_is_better=True)
    return MeasureComparison("abandonment", ci, vi, _interval(diff, se, min(nc, nv)), p, verdict)


def _nps(arm: ArmFigures) -> tuple[float, float, int] | None:
    """NPS (-100 to 100) and the variance of one answer's contribution (+100, 0, -100)."""
    n = arm.promoters + arm.passives + arm.detractors
    if n == 0:
        return None
    pro, det = arm.promoters / n, arm.detractors / n
    score = pro - det
    variance = (pro + det - score * score) * 100 * 100
    return 100 * score, variance, n


def compare_nps(control: ArmFigures, variant: ArmFigures) -> MeasureComparison:
    c, v = _nps(control), _nps(variant)

    def est(x: tuple[float, float, int] | None) -> Estimate:
        return _none(0) if x is None else _interval(x[0], math.sqrt(x[1] / x[2]), x[2])

    if c is None or v is None:
        n = min(c[2] if c else 0, v[2] if v else 0)
        return MeasureComparison("nps", est(c), est(v), _none(n), None, Verdict.TOO_EARLY)
    diff = v[0] - c[0]
    se = math.sqrt(c[1] / c[2] + v[1] / v[2])
    p, verdict = _verdict(c[2], v[2], diff, se, lower_is_better=False)
    return MeasureComparison(
        "nps", est(c), est(v), _interval(diff, se, min(c[2], v[2])), p, verdict
    )


def compare(control: ArmFigures, variant: ArmFigures) -> list[MeasureComparison]:
    return [
        compare_time_to_human(control, variant),
        compare_abandonment(control, variant),
        compare_nps(control, variant),
    ]
