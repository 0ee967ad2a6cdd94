"""Routing: which agents to ring for a visitor, in which order, and why.

`route(snapshot, request, now)` is a pure function over a snapshot of the site, its agents'
aggregated presence and the current reservations. It never reserves anyone: the caller walks
the candidates in order and claims each atomically in the store (DESIGN section 4), so two
nodes that compute the same ranking still never ring one agent for two visitors.

Eligibility is a filter: the agent belongs to the request's site, has not already been tried
for this call (`exclude`), is not ringing for another call (`reserved`), is `available`, and is
reachable on a channel the request can use. Ranking is lexicographic over five rules, each a
small function returning its sort value and a human-readable reason, so every rule can be
tested alone and a decision can always explain itself:

1. sticky: the agent who last served this visitor first;
   (then, for a call in an experiment's variant arm only, the experiment's policy: the best
   NPS first, or agents on mobile first; see `RoutingPolicy`)
2. branch: agents of an *open* branch, then agents without a branch, then agents of a
   closed branch (an available agent at a closed branch is evidently working and stays
   eligible, but business hours still say who should take the call first); within each,
   the visitor's requested branch first, then the nearest branch to the visitor's location
   (great-circle distance);
3. language: the requested language exactly, then the same primary language ("de" for
   "de-AT"), then the rest; an agent with no languages of their own speaks their branch's;
4. skills: more of the requested skills first;
5. longest idle: earliest `Presence.idle_since` first, which spreads calls fairly;

and finally `agent_id`, so equal agents always come out in the same order on every node.

An empty result carries a stable reason code and, when the site is closed, when it opens,
so the edge can always offer something true ("call me back at 09:00") instead of a dead end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from gateway.core.hours import is_open, next_open_at
from gateway.core.model import (
    Agent,
    Branch,
    Channel,
    DeviceKind,
    Presence,
    PresenceStatus,
    Site,
    languages_of,
)

__all__ = [
    "EARTH_RADIUS_KM",
    "BranchKey",
    "Candidate",
    "Capabilities",
    "NoRouteReason",
    "RankContext",
    "RankKey",
    "RouteDecision",
    "RouteRequest",
    "RoutingPolicy",
    "RoutingSnapshot",
    "branch_rank",
    "capabilities",
    "carries",
    "earliest_opening",
    "haversine_km",
    "idle_rank",
    "language_rank",
    "policy_rank",
    "rank",
    "rank_context",
    "reachable_channel",
    "route",
    "skills_rank",
    "speaks",
    "sticky_rank",
    "visitor_channels",
]

# Mean radius of the Earth (IUGG); the error against the ellipsoid (< 0.5%) cannot change
# which branch is nearest in any way a visitor would notice.
EARTH_RADIUS_KM = 6371.0088


class NoRouteReason(StrEnum):
    """Why a decision has no candidates. Stable codes: they go on the wire."""

    # Someone is free, but not on any channel this request can use: offer the other channel.
    NO_AGENT_FOR_CHANNEL = "no_agent_for_channel"
    # Agents are working (on a call, busy, ringing, or already tried): offer a callback.
    ALL_BUSY = "all_busy"
    # Nobody is working and no branch is open: offer a call at `next_open_at`.
    CLOSED = "closed"
    # Within opening hours, but nobody is online (all offline, away or dnd).
    NO_AGENTS_ONLINE = "no_agents_online"


class RoutingPolicy(StrEnum):
    """How agents are ordered for a call, before the usual rules but the visitor's own agent
    (routing experiments, gateway/core/experiment.py)."""

    DEFAULT = "default"
    """The usual rules alone."""
    BEST_NPS = "best_nps"
    """The agents whose customers recommend us most first (their NPS); agents with no
    answers yet after those with some."""
    MOBILE_FIRST = "mobile_first"
    """Agents on their mobile phone before those only at a desk or in an IM client."""


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the visitor asked for. Everything but site, visitor and channel is a preference."""

    site_id: str
    visitor_id: str
    # How the visitor is connected: webrtc for a browser call, pstn for a callback.
    channel: Channel
    # BCP 47 tag from the browser or the callback form, e.g. "de" or "de-AT".
    language: str | None = None
    # The branch the visitor chose (or the page they called from belongs to).
    branch: str | None = None
    # The visitor's (lat, lon) in degrees, e.g. from IP geolocation.
    location: tuple[float, float] | None = None
    skills: tuple[str, ...] = ()
    # Agents already tried for this call (declined or timed out): never ring them again.
    exclude: frozenset[str] = frozenset()
    # Channels the agent may take this call on, in order of preference. Empty means exactly
    # `channel` (no media bridge). A browser call that the aiortc <-> Twilio bridge may carry
    # to an agent's phone passes (WEBRTC, PSTN).
    agent_channels: tuple[Channel, ...] = ()
    # The order an experiment's variant arm tries: a rule before all but stickiness.
    policy: RoutingPolicy = RoutingPolicy.DEFAULT

    @property
    def reach(self) -> tuple[Channel, ...]:
        """The channels an agent may be reached on for this request, preferred first."""
        return self.agent_channels or (self.channel,)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the gateway can carry for a site now, beyond a browser call to an agent's
    browser: what decides whether a visitor's channel can reach an agent on a device's."""

    # Callbacks can be placed: a telephony provider is configured and the site has caller IDs.
    callbacks: bool = False
    # The audio bridge between a browser call and a phone (media workers run, and the site
    # can ring phones): a browser call reaches an agent on their mobile too. A callback's
    # agent still talks on their own phone, so needs a mobile number.
    bridge: bool = False


def capabilities(site: Site, telephony: bool, bridge: bool = False) -> Capabilities:
    """What ``site`` can be offered, on a node with (``telephony``) or without a telephony
    provider, and with (``bridge``) or without media workers: the one place the callback
    API, availability and routing read it from."""
    phones = telephony and bool(site.caller_ids)
    return Capabilities(callbacks=phones, bridge=phones and bridge)


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    """Everything `route` reads, taken from the store at one moment."""

    site: Site
    # Aggregated presence by agent id; an agent missing here is offline.
    presence: Mapping[str, Presence]
    # Agents currently ringing for another call (claimed in the store).
    reserved: frozenset[str] = frozenset()
    # Who last served this visitor, from the visitor's history.
    last_agent: str | None = None
    # What the gateway can carry for this site now (callbacks, the bridge).
    can: Capabilities = Capabilities()
    # Each agent's NPS (-100 to 100), for the best_nps policy; an agent missing has no
    # answers yet.
    scores: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Candidate:
    agent_id: str
    # The channel the agent will be rung on.
    channel: Channel
    # Why the agent is here, one phrase per rule that spoke for them, in rule order.
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RouteDecision:
    # Ring these in order; empty when nobody can take the call now.
    candidates: tuple[Candidate, ...]
    # Set exactly when `candidates` is empty.
    reason: NoRouteReason | None = None
    # When no branch of the site is open: the earliest opening (None if none in 14 days).
    # None whenever some branch is open now.
    next_open_at: float | None = None


# --- eligibility -------------------------------------------------------------------------


def carries(visitor: Channel, device: Channel, agent: Agent, can: Capabilities) -> bool:
    """Whether a visitor's call on ``visitor`` (``webrtc``: a browser call; ``pstn``: a
    callback) can reach ``agent`` on a device reachable on ``device`` (``webrtc``: the agent
    app; ``pstn``: their phone).

    A browser call reaches the agent app, and a phone only through the bridge. A callback
    needs callbacks set up; its agent talks on their own phone (their mobile number), whether
    they accept in the app or on a ringing phone, unless the bridge carries it to the app."""
    if visitor is Channel.WEBRTC:
        return device is Channel.WEBRTC or (can.bridge and bool(agent.mobile))
    return can.callbacks and (bool(agent.mobile) or (can.bridge and device is Channel.WEBRTC))


def visitor_channels(
    agent: Agent, presence: Presence | None, can: Capabilities
) -> tuple[Channel, ...]:
    """The channels a visitor can reach ``agent`` on now (``webrtc`` before ``pstn``): what
    the button may promise of them, and what routing rings them for."""
    if presence is None or presence.status is not PresenceStatus.AVAILABLE:
        return ()
    return tuple(c for c in Channel if any(carries(c, d, agent, can) for d in presence.channels))


def reachable_channel(
    agent: Agent,
    presence: Presence | None,
    request: RouteRequest,
    reserved: frozenset[str] = frozenset(),
    can: Capabilities = Capabilities(),
) -> Channel | None:
    """The channel `agent` can be rung on for `request`, or None if they are not eligible:
    the first of ``request.reach`` they are reachable on that can carry the visitor's call
    (``carries``, as the button's ``visitor_channels``)."""
    if agent.site != request.site_id or agent.agent_id in request.exclude:
        return None
    if agent.agent_id in reserved or presence is None:
        return None
    if presence.site != request.site_id or presence.status != PresenceStatus.AVAILABLE:
        return None
    for channel in request.reach:
        if channel in presence.channels and carries(request.channel, channel, agent, can):
            return channel
    return None


# --- ranking -----------------------------------------------------------------------------


class BranchKey(NamedTuple):
    """Sort value of the branch rule: smaller is better in each field, in order."""

    hours: int  # 0: the agent's branch is open; 1: no branch, so no hours; 2: branch closed
    elsewhere: int  # 0: the agent is at the branch the visitor asked for
    distance_km: float  # to the visitor; infinity when unknown


class RankKey(NamedTuple):
    """The full lexicographic sort key of a candidate: smaller ranks first."""

    sticky: int
    policy: float
    branch: BranchKey
    language: int
    skills: int
    idle_since: float
    agent_id: str


@dataclass(frozen=True, slots=True)
class RankContext:
    """Facts the rules share, computed once per decision rather than once per agent."""

    request: RouteRequest
    last_agent: str | None
    now: float
    branches: Mapping[str, Branch]
    branch_open: Mapping[str, bool]
    # Distance from the visitor to each branch whose location is known (empty without a
    # visitor location).
    distance_km: Mapping[str, float]
    # Distance to the nearest open branch that has a candidate, to label it "nearest".
    nearest_open_km: float | None
    scores: Mapping[str, float] = field(default_factory=dict)


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance in km between two (lat, lon) points in degrees."""
    lat1, lon1 = math.radians(a[0]), math.radians(a[1])
    lat2, lon2 = math.radians(b[0]), math.radians(b[1])
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, h)))


def rank_context(
    snapshot: RoutingSnapshot,
    request: RouteRequest,
    now: float,
    candidates: Iterable[Agent] | None = None,
) -> RankContext:
    """Precompute branch opening, distances and the nearest open branch of `candidates`.

    `candidates` defaults to every agent of the site; `route` passes the eligible ones, so
    "nearest open branch" names the nearest branch that can actually take the call.
    """
    branches = snapshot.site.branches
    branch_open = {bid: is_open(b, now) for bid, b in branches.items()}
    distance_km: dict[str, float] = {}
    if request.location is not None:
        for bid, b in branches.items():
            if b.lat is not None and b.lon is not None:
                distance_km[bid] = haversine_km(request.location, (b.lat, b.lon))
    agents = snapshot.site.agents.values() if candidates is None else candidates
    open_distances = [
        distance_km[a.branch]
        for a in agents
        if a.branch is not None and branch_open.get(a.branch) and a.branch in distance_km
    ]
    return RankContext(
        request=request,
        last_agent=snapshot.last_agent,
        now=now,
        branches=branches,
        branch_open=branch_open,
        distance_km=distance_km,
        nearest_open_km=min(open_distances, default=None),
        scores=snapshot.scores,
    )


def sticky_rank(agent: Agent, ctx: RankContext) -> tuple[int, str | None]:
    """Rule 1: the visitor gets the person they spoke to last time, if that person is free."""
    if ctx.last_agent is not None and agent.agent_id == ctx.last_agent:
        return 0, "served this visitor before"
    return 1, None


NO_SCORE = 1000.0
"""The best_nps value of an agent with no answers yet: after every agent with some."""


def policy_rank(agent: Agent, presence: Presence, ctx: RankContext) -> tuple[float, str | None]:
    """The experiment's rule, when the call is in a variant arm (else every agent ties)."""
    policy = ctx.request.policy
    if policy is RoutingPolicy.BEST_NPS:
        nps = ctx.scores.get(agent.agent_id)
        if nps is None:
            return NO_SCORE, None
        return -nps, f"NPS {nps:g}"
    if policy is RoutingPolicy.MOBILE_FIRST:
        if any(d.kind is DeviceKind.MOBILE for d in presence.devices):
            return 0.0, "on mobile"
        return 1.0, None
    return 0.0, None


def branch_rank(agent: Agent, ctx: RankContext) -> tuple[BranchKey, str | None]:
    """Rule 2: open before closed; then the visitor's own branch; then the nearest one.

    An agent without a (known) branch is not local to anyone but has no opening hours to
    hold against them either, so they rank after open branches and before closed ones.
    """
    branch = ctx.branches.get(agent.branch) if agent.branch is not None else None
    if branch is None:
        return BranchKey(1, 1, math.inf), None
    is_open_now = ctx.branch_open.get(branch.branch_id, False)
    requested = ctx.request.branch == branch.branch_id
    distance = ctx.distance_km.get(branch.branch_id, math.inf)
    key = BranchKey(0 if is_open_now else 2, 0 if requested else 1, distance)

    km = f", {distance:.0f} km" if math.isfinite(distance) else ""
    if requested:
        closed_note = "" if is_open_now else ", closed now"
        reason = f"branch {branch.name} (visitor's branch){closed_note}"
    elif not is_open_now:
        reason = f"branch {branch.name}, closed now{km}"
    elif ctx.nearest_open_km is not None and distance == ctx.nearest_open_km:
        reason = f"nearest open branch {branch.name}{km}"
    else:
        reason = f"branch {branch.name}, open{km}"
    return key, reason


def _normalize_tag(tag: str) -> str:
    return tag.strip().replace("_", "-").lower()


def speaks(agent: Agent, branch: Branch | None, language: str) -> tuple[int, str | None]:
    """How well the agent matches `language`: 0 exact, 1 same primary language, 2 no match.

    Returns the matching tag as the agent's configuration spells it. An agent with no
    languages of their own speaks their branch's languages.
    """
    spoken = languages_of(agent, branch)
    wanted = _normalize_tag(language)
    for tag in spoken:
        if _normalize_tag(tag) == wanted:
            return 0, tag
    primary = wanted.split("-", 1)[0]
    for tag in spoken:
        if _normalize_tag(tag).split("-", 1)[0] == primary:
            return 1, tag
    return 2, None


def language_rank(agent: Agent, ctx: RankContext) -> tuple[int, str | None]:
    """Rule 3: the visitor's language; all agents tie when none was asked for."""
    if not ctx.request.language:
        return 0, None
    branch = ctx.branches.get(agent.branch) if agent.branch is not None else None
    level, tag = speaks(agent, branch, ctx.request.language)
    return level, (f"speaks {tag}" if tag is not None else None)


def skills_rank(agent: Agent, ctx: RankContext) -> tuple[int, str | None]:
    """Rule 4: more of the requested skills first (negated count: smaller sorts first)."""
    wanted = dict.fromkeys(ctx.request.skills)  # de-duplicated, request order kept
    has = [skill for skill in wanted if skill in agent.skills]
    if not has:
        return 0, None
    noun = "skill" if len(has) == 1 else "skills"
    return -len(has), f"has {noun} {', '.join(has)}"


def idle_rank(presence: Presence, ctx: RankContext) -> tuple[float, str | None]:
    """Rule 5: longest idle first, so calls spread across the team.

    Sorts on the raw `idle_since`; 0.0 (the model's "never set") therefore counts as idle
    the longest, and carries no reason since the duration is unknown.
    """
    if presence.idle_since <= 0:
        return presence.idle_since, None
    idle_s = max(0, int(ctx.now - presence.idle_since))
    return presence.idle_since, f"idle {idle_s} s"


def rank(agent: Agent, presence: Presence, ctx: RankContext) -> tuple[RankKey, tuple[str, ...]]:
    """The sort key of one eligible agent and the reasons behind it, in rule order."""
    sticky, r1 = sticky_rank(agent, ctx)
    policy, r0 = policy_rank(agent, presence, ctx)
    branch, r2 = branch_rank(agent, ctx)
    language, r3 = language_rank(agent, ctx)
    skills, r4 = skills_rank(agent, ctx)
    idle, r5 = idle_rank(presence, ctx)
    key = RankKey(sticky, policy, branch, language, skills, idle, agent.agent_id)
    return key, tuple(r for r in (r1, r0, r2, r3, r4, r5) if r is not None)


# --- the decision ------------------------------------------------------------------------


def _site_open(site: Site, branch_open: Mapping[str, bool]) -> bool:
    """Any branch open; a site without branches has no business hours, so it is open."""
    return not site.branches or any(branch_open.values())


def earliest_opening(branches: Iterable[Branch], now: float) -> float | None:
    openings = [t for t in (next_open_at(b, now) for b in branches) if t is not None]
    return min(openings, default=None)


def _no_route_reason(
    snapshot: RoutingSnapshot, request: RouteRequest, site_open: bool
) -> NoRouteReason:
    """Why nobody is eligible, most actionable first (see `NoRouteReason`)."""
    working = False
    for agent in snapshot.site.agents.values():
        presence = snapshot.presence.get(agent.agent_id)
        if agent.site != request.site_id or presence is None:
            continue
        if presence.site != request.site_id:
            continue
        if presence.status == PresenceStatus.AVAILABLE:
            if agent.agent_id in request.exclude or agent.agent_id in snapshot.reserved:
                working = True
            else:
                # Free and unreserved, yet not eligible: only the channel can be the cause.
                return NoRouteReason.NO_AGENT_FOR_CHANNEL
        elif presence.status in (PresenceStatus.ON_CALL, PresenceStatus.BUSY):
            working = True
    if working:
        return NoRouteReason.ALL_BUSY
    if not site_open:
        return NoRouteReason.CLOSED
    return NoRouteReason.NO_AGENTS_ONLINE


def route(snapshot: RoutingSnapshot, request: RouteRequest, now: float) -> RouteDecision:
    """Rank every eligible agent for `request` at instant `now` (see the module doc).

    Raises ValueError if the request is for another site than the snapshot: that is a bug in
    the caller, and routing across tenants must never happen quietly.
    """
    site = snapshot.site
    if request.site_id != site.site_id:
        raise ValueError(f"request for site {request.site_id!r}, snapshot of {site.site_id!r}")

    eligible: list[tuple[Agent, Presence, Channel]] = []
    for agent in site.agents.values():
        presence = snapshot.presence.get(agent.agent_id)
        channel = reachable_channel(agent, presence, request, snapshot.reserved, snapshot.can)
        if presence is not None and channel is not None:
            eligible.append((agent, presence, channel))

    ctx = rank_context(snapshot, request, now, (agent for agent, _, _ in eligible))
    ranked = sorted(
        ((*rank(agent, presence, ctx), channel) for agent, presence, channel in eligible),
        key=lambda item: item[0],
    )
    candidates = tuple(
        Candidate(agent_id=key.agent_id, channel=channel, reasons=reasons)
        for key, reasons, channel in ranked
    )

    site_open = _site_open(site, ctx.branch_open)
    opening = None if site_open else earliest_opening(site.branches.values(), now)
    reason = None if candidates else _no_route_reason(snapshot, request, site_open)
    return RouteDecision(candidates=candidates, reason=reason, next_open_at=opening)
