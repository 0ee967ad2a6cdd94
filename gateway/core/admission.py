"""Admission control: whether this node takes a new call now, from what it measures.

A start the node cannot serve promptly must be refused at once, not queued: queued starts
arrive late at everything downstream (rings reached agents after their ring had ended, up to
30 s late, in bench/click_to_ring.py at twice the nodes' capacity), and the backlog starves
the node's own lease renewal. So ``admit_start`` looks at how far behind the node already
is (its event loop's lag, the starts it is still working on, other nodes' emits it has not
delivered yet, commands waiting on the store) and refuses with a retry hint while any of
them is past its limit. Pure: the measurements are passed in (gateway.ops.load takes them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Load:
    """What a node measures of itself at one moment."""

    loop_lag_s: float = 0.0
    """How late the event loop runs a timer due now: every event waits about this long."""
    starts_in_flight: int = 0
    """``call:start`` handlers running on this node."""
    emit_backlog: int = 0
    """Other nodes' emits received and not yet delivered to this node's sockets."""
    store_in_flight: int = 0
    """Commands sent to the store and not answered yet."""


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Past any of these a node refuses new starts. The defaults keep a start's time to
    ring within tens of milliseconds on these machines (bench/overload.py)."""

    max_loop_lag_s: float = 0.005
    max_starts_in_flight: int = 3
    max_emit_backlog: int = 200
    max_store_in_flight: int = 256
    min_retry_after_ms: int = 250
    """The hint when just past a limit; it grows with how far past."""
    max_retry_after_ms: int = 5_000


@dataclass(frozen=True, slots=True)
class Admission:
    admit: bool
    signal: str | None = None
    """The measurement furthest past its limit (``loop_lag``, ``starts_in_flight``,
    ``emit_backlog``, ``store_in_flight``); None when admitted."""
    retry_after_ms: int = 0


ADMIT = Admission(True)


def admit_start(load: Load, limits: AdmissionLimits) -> Admission:
    """Admit a new call start, or refuse it naming the worst signal and when to retry.

    A signal at its limit already refuses: ``starts_in_flight`` counts those running
    before this one, so a limit of 16 lets 16 run at once. The hint is the minimum times how
    far past its limit the worst signal is (twice the limit: twice the wait), capped."""
    ratios = (
        ("loop_lag", _ratio(load.loop_lag_s, limits.max_loop_lag_s)),
        ("starts_in_flight", _ratio(load.starts_in_flight, limits.max_starts_in_flight)),
        ("emit_backlog", _ratio(load.emit_backlog, limits.max_emit_backlog)),
        ("store_in_flight", _ratio(load.store_in_flight, limits.max_store_in_flight)),
    )
    signal, worst = max(ratios, key=lambda r: r[1])
    if worst < 1.0:
        return ADMIT
    retry = min(limits.max_retry_after_ms, round(limits.min_retry_after_ms * worst))
    return Admission(False, signal, max(limits.min_retry_after_ms, retry))


def _ratio(value: float, limit: float) -> float:
    """How far ``value`` is towards ``limit`` (1.0 at it); a limit of 0 refuses always."""
    if limit <= 0:
        return max(1.0, value)
    return value / limit
