"""Rate limits. ``TokenBucket`` is a pure per-connection limiter (time passed in); the
store-backed fixed windows that span nodes live with the features that need them."""

from __future__ import annotations


class TokenBucket:
    """Allows ``rate`` events a second on average and bursts of up to ``burst``."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True
