"""Each site's running routing experiment (gateway/core/experiment.py), kept in the store so
that every node assigns and routes alike; and its comparison, from the call history.

Every new call passes ``enroll`` (a ``CallRecords`` hook, before it is stored): while an
experiment runs, the call gets its arm for good. Routing asks ``policy`` each time it ranks
agents for a call. A node reads the experiment from the store at most every ``CACHE_S``;
the node that starts or stops one knows at once, the others within ``CACHE_S``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from gateway.core.call import Call, TimelineEntry
from gateway.core.errors import Conflict, NotFound
from gateway.core.experiment import Experiment, assign, check_share, policy_for
from gateway.core.routing import RoutingPolicy
from gateway.store.base import ExperimentStore

CACHE_S = 2.0
SCORES_CACHE_S = 60.0
"""How old the agents' NPS that best_nps ranks by may be."""


def experiment_to_json(e: Experiment) -> str:
    return json.dumps(
        {
            "experiment_id": e.experiment_id,
            "name": e.name,
            "variant": e.variant.value,
            "share": e.share,
            "started_at": e.started_at,
            "started_by": e.started_by,
            "stopped_at": e.stopped_at,
        }
    )


def experiment_from_json(data: str) -> Experiment:
    d = json.loads(data)
    return Experiment(
        d["experiment_id"],
        d["name"],
        RoutingPolicy(d["variant"]),
        float(d["share"]),
        float(d["started_at"]),
        d["started_by"],
        d.get("stopped_at"),
    )


class Experiments:
    def __init__(
        self,
        store: ExperimentStore,
        clock: Callable[[], float],
        agent_scores: Callable[[str], Awaitable[Mapping[str, float]]],
    ) -> None:
        self._store = store
        self._clock = clock
        self._agent_scores = agent_scores
        self._cache: dict[str, tuple[float, Experiment | None]] = {}
        self._scores: dict[str, tuple[float, Mapping[str, float]]] = {}

    async def current(self, site: str) -> Experiment | None:
        """The running experiment."""
        latest = await self.latest(site)
        return latest if latest is not None and latest.running else None

    async def latest(self, site: str) -> Experiment | None:
        """The running experiment, else the last one stopped."""
        now = self._clock()
        cached = self._cache.get(site)
        if cached is not None and 0 <= now - cached[0] < CACHE_S:
            return cached[1]
        data = await self._store.experiment(site)
        running = None if data is None else experiment_from_json(data)
        self._cache[site] = (now, running)
        return running

    async def start(
        self, site: str, name: str, variant: RoutingPolicy, share: float, by: str
    ) -> Experiment:
        """Raises ``Conflict`` while another runs (stop it first: one comparison at a
        time keeps the arms comparable)."""
        check_share(share)
        if variant is RoutingPolicy.DEFAULT:
            raise ValueError("the variant must differ from the default policy")
        stored = await self._store.experiment(site)
        if stored is not None and experiment_from_json(stored).running:
            raise Conflict("an experiment is running; stop it first", code="experiment_running")
        experiment = Experiment(
            f"x_{secrets.token_hex(6)}", name, variant, share, self._clock(), by
        )
        # Two supervisors starting one at once, on two nodes: one wins, the other is told.
        if not await self._store.replace_experiment(site, stored, experiment_to_json(experiment)):
            raise Conflict("an experiment is running; stop it first", code="experiment_running")
        self._cache[site] = (self._clock(), experiment)
        return experiment

    async def stop(self, site: str) -> Experiment:
        """Every call goes back to the default policy; raises ``NotFound`` with none. The
        stopped experiment stays the site's latest, for its comparison, until the next."""
        stored = await self._store.experiment(site)
        running = None if stored is None else experiment_from_json(stored)
        if running is None or not running.running:
            raise NotFound("no experiment is running", code="no_experiment")
        stopped = replace(running, stopped_at=self._clock())
        if not await self._store.replace_experiment(site, stored, experiment_to_json(stopped)):
            raise NotFound("no experiment is running", code="no_experiment")  # stopped meanwhile
        self._cache[site] = (self._clock(), stopped)
        return stopped

    async def enroll(self, call: Call) -> Call:
        """``call`` (new) with its arm of the site's running experiment, if one runs."""
        running = await self.current(call.site)
        if running is None or call.experiment is not None:
            return call
        arm = assign(running, call.call_id)
        entry = TimelineEntry(
            call.created_at, "experiment", f"{running.name}: {arm.value}", internal=True
        )
        return replace(
            call,
            experiment=running.experiment_id,
            arm=arm.value,
            timeline=(*call.timeline, entry),
        )

    async def routing(self, call: Call) -> tuple[RoutingPolicy, Mapping[str, float]]:
        """The policy ``call`` is routed by now, and the agents' NPS when it reads them."""
        if call.experiment is None:
            return RoutingPolicy.DEFAULT, {}
        policy = policy_for(call, await self.current(call.site))
        if policy is not RoutingPolicy.BEST_NPS:
            return policy, {}
        now = self._clock()
        cached = self._scores.get(call.site)
        if cached is None or not 0 <= now - cached[0] < SCORES_CACHE_S:
            cached = self._scores[call.site] = (now, await self._agent_scores(call.site))
        return policy, cached[1]
