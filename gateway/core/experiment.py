"""Routing experiments: "send 1% of calls to someone who cares, and measure".

A site runs at most one experiment at a time. While it runs, every new request is assigned
an arm, once, when it is made: ``variant`` for a share of them (say 1% or 10%), routed by
the experiment's variant policy; ``control`` for the rest, routed as always. The arm is
recorded on the call and in its history, so the arms can be compared afterwards
(gateway/core/experiment_stats.py).

Assignment is a hash of the experiment and the call's id: the same on every node without
asking anyone, independent of anything about the visitor, and stable if asked again. A call
is routed by the variant policy only while its experiment runs: stopping an experiment
returns every call, those already waiting included, to the default policy.

Pure: the service (gateway/services/experiments.py) keeps the running experiment in the
store, shared by every node.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from gateway.core.call import Call
from gateway.core.routing import RoutingPolicy


class Arm(StrEnum):
    CONTROL = "control"
    VARIANT = "variant"


MIN_SHARE = 0.001
MAX_SHARE = 0.5
"""A variant gets at most half the requests: an experiment compares against the usual."""


@dataclass(frozen=True, slots=True)
class Experiment:
    experiment_id: str
    name: str
    variant: RoutingPolicy
    share: float
    """The share of requests routed by ``variant``, 0.001 to 0.5."""
    started_at: float
    started_by: str
    stopped_at: float | None = None
    """Once stopped, the site's last experiment is kept for its comparison."""

    @property
    def running(self) -> bool:
        return self.stopped_at is None


def check_share(share: float) -> None:
    if not MIN_SHARE <= share <= MAX_SHARE:
        raise ValueError(f"share must be between {MIN_SHARE} and {MAX_SHARE}, got {share}")


def assign(experiment: Experiment, call_id: str) -> Arm:
    """The arm of the request ``call_id``: a uniform draw from its hash, so one in
    ``1 / share`` lands in the variant."""
    digest = hashlib.sha256(f"{experiment.experiment_id}\x00{call_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    return Arm.VARIANT if draw < experiment.share else Arm.CONTROL


def policy_for(call: Call, running: Experiment | None) -> RoutingPolicy:
    """The policy ``call`` is routed by now: its experiment's variant while that experiment
    runs and the call is in its variant arm; else the default."""
    if (
        running is not None
        and running.running
        and call.experiment == running.experiment_id
        and call.arm == Arm.VARIANT.value
    ):
        return running.variant
    return RoutingPolicy.DEFAULT
