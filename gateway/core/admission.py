"""Admission control: whether this node takes a new call now, from what it measures.

A start the node cannot serve promptly must be refused at once, not queued: queued starts
arrive late at everything downstream (rings reached agents after their ring had ended, up to
30 s late, in bench/click_to_ring.py at twice the nodes' capacity), and the backlog starves
the node's own lease renewal. So ``admit_start`` looks at how far behind the node already
is (its event loop's lag, the starts it is still working on, other nodes' emits it has not
delivered yet, commands waiting on the store) and refuses with a retry hint while any of
them is past its limit. Pure: the measurements are passed in (gateway.ops.load takes them).

How many starts may run at once is not fixed: ``StartLimit`` lowers it while starts take
longer than ``max_start_s`` and raises it again while they are quick. Offered far more than
it can route, a node's own refusals cost it CPU too (each shed start is still a message in
and an answer out), so the same number in flight takes longer; a fixed limit of 3 let
accepted starts reach p99 66-141 ms at 1,600 starts/s on two nodes, where 1 kept them at
34 ms, and 1 would shed starts at 200/s that 3 routes in 12 ms (bench/overload.py).
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
    starts_allowed: int | None = None
    """How many may run at once now (``StartLimit.allowed``); None: the configured maximum."""


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Past any of these a node refuses new starts. The defaults keep a start's time to
    ring within tens of milliseconds on these machines (bench/overload.py)."""

    max_loop_lag_s: float = 0.005
    max_starts_in_flight: int = 16
    """The most starts in flight at once; ``StartLimit`` keeps the allowance at or below it."""
    max_start_s: float = 0.025
    """A start that takes longer (from its handler's start to its answer) lowers the allowance."""
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
        ("starts_in_flight", _ratio(load.starts_in_flight, _starts_allowed(load, limits))),
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


def _starts_allowed(load: Load, limits: AdmissionLimits) -> int:
    if load.starts_allowed is None:
        return limits.max_starts_in_flight
    return min(load.starts_allowed, limits.max_starts_in_flight)


# Each slow start takes a fifth off the allowance; each quick one adds a tenth of a start
# divided by the allowance (additive increase, multiplicative decrease, as TCP does): from 1
# back to 3 takes about 40 quick starts, half a second at the rate a saturated node routes.
DECREASE = 0.8
INCREASE = 0.1


@dataclass(slots=True)
class StartLimit:
    """How many starts a node lets run at once, learnt from how long its starts take.

    Never below one, so a node always routes some starts and keeps measuring; never above
    ``AdmissionLimits.max_starts_in_flight``."""

    ceiling: int
    max_start_s: float
    level: float = 0.0
    spared: int = 0
    """Starts still to finish before a slow one lowers the allowance again: those that may
    have been running when it was last lowered, slow for the same cause (one stall of the
    machine slows every start in flight), which it was lowered for once already. TCP, too,
    halves its window once per window of data lost, not once per lost segment. Without
    this, each start slowed by one stall of a shared machine took another fifth off."""

    def __post_init__(self) -> None:
        self.level = float(self.ceiling) if self.level <= 0 else self.level

    @property
    def allowed(self) -> int:
        return max(1, int(self.level)) if self.ceiling > 0 else 0

    def finished(self, took_s: float) -> None:
        """A start this node ran took ``took_s`` seconds."""
        if self.ceiling <= 0:
            return
        if took_s > self.max_start_s and self.spared <= 0:
            self.spared = self.allowed  # at most this many ran alongside it
            self.level = max(1.0, self.level * DECREASE)
            return
        self.spared = max(0, self.spared - 1)
        if took_s <= self.max_start_s:
            self.level = min(float(self.ceiling), self.level + INCREASE / self.level)

    @classmethod
    def of(cls, limits: AdmissionLimits) -> StartLimit:
        return cls(limits.max_starts_in_flight, limits.max_start_s)
