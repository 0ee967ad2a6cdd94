"""`route` for many calls a second: an order of every agent, kept for a moment and walked
for each call, keeping only who is eligible now (see `RankingCache`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace

from gateway.core.model import PresenceStatus
from gateway.core.routing import (
    BranchKey,
    Candidate,
    RouteDecision,
    RouteRequest,
    RoutingSnapshot,
    branch_rank,
    language_rank,
    policy_rank,
    rank_context,
    reachable_channel,
    route,
    skills_rank,
)

# The rules that read only an agent's configuration (branch, languages, skills): their sort
# values and their reasons.
_FixedRules = tuple[tuple[float, BranchKey, int, int], tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class _Ranking:
    at: float
    groups: list[list[str]]
    """For each configuration place, best first, the agents who were available when ranked
    (by idle time, then id); no sticky rule."""
    gone: list[list[str]]
    """For each group, agents who cannot be rung at their place in it while this ranking
    lasts: unavailable when ranked, or found so since by a walk (see `first`)."""
    first: list[int]
    """For each group, where walks start: every agent before it is in `gone`."""
    population: int
    """How many agents had presence when ranked: one more means a newcomer to rank."""
    fixed_reasons: dict[str, tuple[str, ...]]
    """Each agent's reasons from the configuration rules (shared by equal configurations)."""
    idle_since: dict[str, float]
    """Each agent's `Presence.idle_since` when ranked."""

    def reasons(self, agent_id: str, since: float, now: float) -> tuple[str, ...]:
        """As `rank`'s reasons for the agent at `now`, but built only for agents handed out."""
        fixed = self.fixed_reasons[agent_id]
        if since <= 0:
            return fixed
        return (*fixed, f"idle {max(0, int(now - since))} s")


class RankingCache:
    """`route` for many calls a second: ranking every agent of a large site for every call
    costs ~20 µs an agent (100 ms at 5,000 agents). This ranks all agents once per request
    shape and `ttl_s`, then for each call walks that order and keeps the agents eligible
    *now* (presence, reservation, exclusions), with the visitor's last agent moved to the
    front, since stickiness is the first rule. Idle times and opening hours may be up to
    `ttl_s` old (5 s); who is free never is. With nobody eligible it falls back to `route`, which
    also explains why. Plain data and time passed in, like the rest of this module.
    """

    def __init__(self, ttl_s: float = 5.0, limit: int = 16, max_entries: int = 1024) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self.max_entries = max_entries
        self._entries: dict[tuple[object, ...], _Ranking] = {}

    @staticmethod
    def _shape(request: RouteRequest) -> tuple[object, ...]:
        location = request.location
        rounded = None if location is None else (round(location[0], 1), round(location[1], 1))
        return (request.site_id, request.reach, request.language, request.branch, rounded,
                request.skills, request.policy)  # fmt: skip

    def _rank_all(self, snapshot: RoutingSnapshot, request: RouteRequest, now: float) -> _Ranking:
        """The order `rank` gives every agent with presence (all tie on the sticky rule).

        The rules that read only an agent's configuration (branch, languages, skills) are
        worked out once per distinct configuration (a large site has a few hundred at most)
        and each configuration gets its place among them; then three stable sorts, by agent
        id, by idle time and by that place, give `RankKey`'s lexicographic order without a
        key object per agent. This runs on the event loop every `ttl_s`: thousands of keys
        and reasons kept alive for a second were most of what made the collector's young
        generation fill up, and each collection then had to walk them (measured).
        """
        presence = snapshot.presence
        plain = replace(snapshot, last_agent=None, reserved=frozenset())
        agents = [a for a in snapshot.site.agents.values() if a.agent_id in presence]
        ctx = rank_context(plain, replace(request, exclude=frozenset()), now, agents)
        rules: dict[
            tuple[float, str | None, str | None, tuple[str, ...], tuple[str, ...]], _FixedRules
        ] = {}
        configs: dict[str, _FixedRules] = {}
        for agent in agents:
            # An experiment's rule reads the agent's score or devices: part of the place.
            policy, r0 = policy_rank(agent, presence[agent.agent_id], ctx)
            config = (policy, r0, agent.branch, agent.languages, agent.skills)
            fixed = rules.get(config)
            if fixed is None:
                branch, r2 = branch_rank(agent, ctx)
                language, r3 = language_rank(agent, ctx)
                skills, r4 = skills_rank(agent, ctx)
                reasons = tuple(r for r in (r0, r2, r3, r4) if r is not None)
                fixed = rules[config] = ((policy, branch, language, skills), reasons)
            configs[agent.agent_id] = fixed
        place = {key: i for i, key in enumerate(sorted({key for key, _ in rules.values()}))}
        group = {agent_id: place[key] for agent_id, (key, _) in configs.items()}
        idle_since = {a.agent_id: presence[a.agent_id].idle_since for a in agents}
        order = sorted(idle_since)
        order.sort(key=idle_since.__getitem__)
        groups: list[list[str]] = [[] for _ in place]
        gone: list[list[str]] = [[] for _ in place]
        for agent_id in order:
            available = presence[agent_id].status is PresenceStatus.AVAILABLE
            (groups if available else gone)[group[agent_id]].append(agent_id)
        fixed_reasons = {agent_id: reasons for agent_id, (_, reasons) in configs.items()}
        return _Ranking(
            now, groups, gone, [0] * len(groups), len(presence), fixed_reasons, idle_since
        )

    def route(self, snapshot: RoutingSnapshot, request: RouteRequest, now: float) -> RouteDecision:
        """The first `limit` candidates, or `route`'s answer when nobody is eligible."""
        candidates = tuple(itertools.islice(self.candidates(snapshot, request, now), self.limit))
        if not candidates:
            return route(snapshot, request, now)
        return RouteDecision(candidates=candidates)

    def candidates(
        self, snapshot: RoutingSnapshot, request: RouteRequest, now: float
    ) -> Iterator[Candidate]:
        """Eligible agents best first, found lazily: a caller whose first choices were taken
        by concurrent calls walks on down the same order instead of ranking again.

        An agent whose idle time changed since the ranking (a call ended, they came back)
        became idle after everyone ranked, so belongs last of their configuration's group:
        the walk moves them there, which keeps the order exact between re-rankings."""
        shape = self._shape(request)
        ranking = self._entries.get(shape)
        presence = snapshot.presence
        if (
            ranking is None
            or not 0 <= now - ranking.at <= self.ttl_s
            or ranking.population != len(presence)
        ):
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            ranking = self._entries[shape] = self._rank_all(snapshot, request, now)
        site = snapshot.site
        sticky = snapshot.last_agent
        if sticky is not None and sticky in site.agents:
            p = presence.get(sticky)
            channel = reachable_channel(
                site.agents[sticky], p, request, snapshot.reserved, snapshot.can
            )
            if channel is not None:
                reasons = (
                    ranking.reasons(sticky, p.idle_since if p else 0.0, now)
                    if sticky in ranking.idle_since
                    else ()
                )
                yield Candidate(sticky, channel, ("served this visitor before", *reasons))
        for g, ids in enumerate(ranking.groups):
            yield from self._walk_group(ranking, g, ids, snapshot, request, now)

    def _walk_group(
        self,
        ranking: _Ranking,
        g: int,
        ids: list[str],
        snapshot: RoutingSnapshot,
        request: RouteRequest,
        now: float,
    ) -> Iterator[Candidate]:
        """One group's eligible agents in order: those at their ranked place, then those
        whose idle time changed since the ranking, by their new idle time.

        An agent's idle time is reset whenever they become available (gateway.core.presence), so
        one who is unavailable, or whose idle time changed, will never again be rung at
        their ranked place while this ranking lasts. Walks therefore move such agents at the
        front of the group to `gone` once, for good, instead of every walk stepping over the
        hundreds on a call (a tenth of a node's CPU under load, measured); `gone` is read
        only by a walk that reaches the group's end."""
        presence = snapshot.presence
        ranked_since = ranking.idle_since
        gone = ranking.gone[g]
        i = ranking.first[g]
        while i < len(ids):
            p = presence.get(ids[i])
            if p is not None and (
                p.status is PresenceStatus.AVAILABLE and p.idle_since == ranked_since[ids[i]]
            ):
                break
            gone.append(ids[i])
            i += 1
        ranking.first[g] = i
        # Later walks may add to `gone` while this one is paused: only agents before `i`.
        gone_before = len(gone)
        site = snapshot.site
        sticky = snapshot.last_agent
        moved: list[tuple[float, str]] = []
        for agent_id in itertools.islice(ids, i, None):
            if agent_id == sticky:
                continue
            p = presence.get(agent_id)
            if p is not None and p.idle_since != ranked_since[agent_id]:
                moved.append((p.idle_since, agent_id))
                continue
            channel = reachable_channel(
                site.agents[agent_id], p, request, snapshot.reserved, snapshot.can
            )
            if channel is not None:
                yield Candidate(
                    agent_id, channel, ranking.reasons(agent_id, ranked_since[agent_id], now)
                )
        for agent_id in itertools.islice(gone, gone_before):
            p = presence.get(agent_id)
            if p is not None and p.status is PresenceStatus.AVAILABLE and agent_id != sticky:
                moved.append((p.idle_since, agent_id))
        if moved:
            yield from self._eligible(ranking, snapshot, request, sorted(moved), now)

    @staticmethod
    def _eligible(
        ranking: _Ranking,
        snapshot: RoutingSnapshot,
        request: RouteRequest,
        agents: list[tuple[float, str]],
        now: float,
    ) -> Iterator[Candidate]:
        for since, agent_id in agents:
            agent = snapshot.site.agents[agent_id]
            p = snapshot.presence.get(agent_id)
            channel = reachable_channel(agent, p, request, snapshot.reserved, snapshot.can)
            if channel is not None:
                yield Candidate(agent_id, channel, ranking.reasons(agent_id, since, now))
