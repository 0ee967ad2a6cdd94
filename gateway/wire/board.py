"""What the supervisor's board reads over HTTP: the figures from the call history
(``GET /v1/sites/{site}/figures``) and the site's routing experiment
(``GET/PUT/DELETE /v1/sites/{site}/experiment``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from msgspec import Meta, Struct

from gateway.core.board_figures import BoardFigures, NpsRow, Span
from gateway.core.errors import Invalid
from gateway.core.experiment import MAX_SHARE, MIN_SHARE, Experiment
from gateway.core.experiment_stats import ArmFigures, Estimate, MeasureComparison
from gateway.core.routing import RoutingPolicy
from gateway.wire.base import Json, decode, iso, to_wire
from gateway.wire.rest import ScoreRow, score_row


class Totals(Struct):
    requests: int
    reached: int
    abandoned: int
    failed: int
    to_human_p50: float | None
    to_human_p90: float | None
    on_time_pct: float | None


class NpsBoard(Struct):
    agents: list[ScoreRow]
    branches: list[ScoreRow]


class Figures(Struct):
    """``GET /v1/sites/{site}/figures?span=hour|day|week``: one value per slot of
    ``step_s`` from ``start`` for each series (null where a slot has nothing to say)."""

    span: Span
    start: str
    step_s: int
    slots: int
    to_human_p50: list[float | None]
    """Seconds from the request to the first human, median of the slot."""
    to_human_p90: list[float | None]
    reached: list[int]
    abandoned: list[int]
    """Ended without reaching anyone: the customer gave up (canceled)."""
    failed: list[int]
    """Ended without reaching anyone: nobody could take it."""
    on_time_pct: list[float | None]
    """Callbacks due in the slot that reached someone within the site's late_after_s of the
    time promised, in percent."""
    by_channel: dict[str, list[int]]
    totals: Totals
    nps: NpsBoard


def span_from_query(query: Mapping[str, str]) -> Span:
    raw = query.get("span", "day")
    try:
        return Span(raw)
    except ValueError:
        raise Invalid("span must be hour, day or week") from None


def figures_to_wire(
    span: Span,
    figures: BoardFigures,
    agents: list[NpsRow],
    branches: list[NpsRow],
    names: Mapping[str, str],
) -> Json:
    def rows(found: list[NpsRow]) -> list[ScoreRow]:
        return [
            score_row(
                r.subject,
                names.get(r.subject, r.subject),
                r.tally.promoters,
                r.tally.passives,
                r.tally.detractors,
                r.tally.nps,
            )
            for r in found
        ]

    t = figures.totals
    return to_wire(
        Figures(
            span=span,
            start=iso(figures.start) or "",
            step_s=figures.step_s,
            slots=len(figures.reached),
            to_human_p50=figures.to_human_p50,
            to_human_p90=figures.to_human_p90,
            reached=figures.reached,
            abandoned=figures.abandoned,
            failed=figures.failed,
            on_time_pct=figures.on_time_pct,
            by_channel=figures.by_channel,
            totals=Totals(
                int(t["requests"] or 0),
                int(t["reached"] or 0),
                int(t["abandoned"] or 0),
                int(t["failed"] or 0),
                _float(t["to_human_p50"]),
                _float(t["to_human_p90"]),
                _float(t["on_time_pct"]),
            ),
            nps=NpsBoard(rows(agents), rows(branches)),
        )
    )


def _float(x: float | int | None) -> float | None:
    return None if x is None else float(x)


# --- experiments -----------------------------------------------------------------------------


class ExperimentStart(Struct):
    """``PUT /v1/sites/{site}/experiment``: start routing a share of requests by a variant
    policy."""

    variant: Literal["best_nps", "mobile_first"]
    share: Annotated[
        float,
        Meta(ge=MIN_SHARE, le=MAX_SHARE, description="The share of requests in the variant."),
    ]
    name: Annotated[str, Meta(min_length=1, max_length=80)] = "experiment"


def experiment_start_from_wire(payload: object) -> tuple[str, RoutingPolicy, float]:
    """The name, variant policy and share asked for."""
    wanted = decode(payload, ExperimentStart)
    return wanted.name, RoutingPolicy(wanted.variant), wanted.share


class ExperimentOut(Struct):
    experiment_id: str
    name: str
    variant: RoutingPolicy
    share: float
    started_at: str
    started_by: str
    stopped_at: str | None
    running: bool


class EstimateOut(Struct):
    value: float | None
    low: float | None
    high: float | None
    n: int


class MeasureOut(Struct):
    measure: str
    control: EstimateOut
    variant: EstimateOut
    difference: EstimateOut
    """Variant minus control, with its 99% interval."""
    p_value: float | None
    verdict: str
    """too_early, no_difference_yet, variant_better or variant_worse."""


class ArmOut(Struct):
    requests: int
    reached: int
    abandoned: int
    answers: int


class ExperimentReport(Struct):
    """``GET /v1/sites/{site}/experiment``: the running experiment (else the last one) and
    its arms compared."""

    experiment: ExperimentOut | None
    arms: dict[str, ArmOut]
    measures: list[MeasureOut]
    confidence: float
    min_samples: int


def experiment_to_wire_struct(e: Experiment) -> ExperimentOut:
    return ExperimentOut(
        e.experiment_id,
        e.name,
        e.variant,
        e.share,
        iso(e.started_at) or "",
        e.started_by,
        iso(e.stopped_at),
        e.running,
    )


def experiment_to_wire(e: Experiment) -> Json:
    return to_wire(experiment_to_wire_struct(e))


def _estimate(e: Estimate) -> EstimateOut:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return EstimateOut(r(e.value), r(e.low), r(e.high), e.n)


def experiment_report_to_wire(
    experiment: Experiment | None,
    arms: Mapping[str, ArmFigures],
    measures: list[MeasureComparison],
    confidence: float,
    min_samples: int,
) -> Json:
    return to_wire(
        ExperimentReport(
            experiment=None if experiment is None else experiment_to_wire_struct(experiment),
            arms={
                name: ArmOut(
                    a.requests, a.reached, a.abandoned, a.promoters + a.passives + a.detractors
                )
                for name, a in sorted(arms.items())
            },
            measures=[
                MeasureOut(
                    m.measure,
                    _estimate(m.control),
                    _estimate(m.variant),
                    _estimate(m.difference),
                    None if m.p_value is None else round(m.p_value, 6),
                    m.verdict.value,
                )
                for m in measures
            ],
            confidence=confidence,
            min_samples=min_samples,
        )
    )
