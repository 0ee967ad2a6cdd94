"""Routing: eligibility, each ranking rule alone, the order between rules, empty results,
wait estimates and availability; plus hypothesis properties over random sites.

The fixed instant NOW is Wednesday 4 June 2025 10:00 UTC: 11:00 in Dublin and Cork (open,
09:00-17:00 on weekdays) and 06:00 in New York (closed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.availability import Availability, availability, estimate_wait_s
from gateway.core.hours import is_open
from gateway.core.model import (
    Agent,
    Branch,
    Channel,
    Device,
    DeviceKind,
    DeviceState,
    OpeningSpan,
    Presence,
    PresenceStatus,
    Site,
)
from gateway.core.ranking_cache import RankingCache
from gateway.core.routing import (
    BranchKey,
    Candidate,
    Capabilities,
    NoRouteReason,
    RouteDecision,
    RouteRequest,
    RoutingPolicy,
    RoutingSnapshot,
    branch_rank,
    capabilities,
    carries,
    haversine_km,
    idle_rank,
    language_rank,
    rank_context,
    reachable_channel,
    route,
    skills_rank,
    sticky_rank,
    visitor_channels,
)

SITE_ID = "acme"
MOBILE = "+353851234567"
CALLBACKS = Capabilities(callbacks=True)
BRIDGE = Capabilities(bridge=True)
WEBRTC, PSTN = Channel.WEBRTC, Channel.PSTN
AVAILABLE = PresenceStatus.AVAILABLE


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> float:
    return datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp()


NOW = utc(2025, 6, 4, 10)
NIGHT = utc(2025, 6, 4, 2)  # 03:00 in Dublin, 22:00 (Tuesday) in New York: all closed

WEEKDAYS_9_17: dict[int, tuple[OpeningSpan, ...]] = dict.fromkeys(
    range(5), (OpeningSpan(time(9), time(17)),)
)
DUBLIN = Branch("dub", "Dublin", "Europe/Dublin", 53.3498, -6.2603, ("en", "ga"), WEEKDAYS_9_17)
CORK = Branch("cork", "Cork", "Europe/Dublin", 51.8985, -8.4756, ("en",), WEEKDAYS_9_17)
NEW_YORK = Branch(
    "nyc", "New York", "America/New_York", 40.7128, -74.0060, ("en", "es"), WEEKDAYS_9_17
)
BRANCHES = {b.branch_id: b for b in (DUBLIN, CORK, NEW_YORK)}
NEAR_CORK = (51.90, -8.50)  # a visitor in Cork city: Cork ~2 km, Dublin ~220 km


def agent(
    agent_id: str,
    branch: str | None = "dub",
    languages: tuple[str, ...] = (),
    skills: tuple[str, ...] = (),
    site: str = SITE_ID,
    mobile: str | None = None,
) -> Agent:
    return Agent(agent_id, site, agent_id.title(), branch, languages, skills, mobile)


def presence(
    agent_id: str,
    status: PresenceStatus = AVAILABLE,
    channels: tuple[Channel, ...] = (WEBRTC,),
    idle_s: float = 100.0,
    site: str = SITE_ID,
) -> Presence:
    return Presence(
        agent_id=agent_id,
        site=site,
        name=agent_id.title(),
        branch=None,
        status=status,
        channels=channels,
        devices=(),
        since=0.0,
        idle_since=NOW - idle_s,
    )


def snapshot(
    agents: Sequence[Agent],
    presences: Sequence[Presence] = (),
    reserved: Sequence[str] = (),
    last_agent: str | None = None,
    branches: dict[str, Branch] | None = None,
) -> RoutingSnapshot:
    """Every agent available on webrtc, idle 100 s, unless `presences` says otherwise."""
    by_id = {a.agent_id: presence(a.agent_id) for a in agents}
    by_id.update({p.agent_id: p for p in presences})
    site = Site(
        site_id=SITE_ID,
        name="Acme",
        allowed_origins=("https://acme.example",),
        branches=BRANCHES if branches is None else branches,
        agents={a.agent_id: a for a in agents},
    )
    return RoutingSnapshot(site, by_id, frozenset(reserved), last_agent)


def request(**kwargs: Any) -> RouteRequest:
    kwargs.setdefault("channel", WEBRTC)
    return RouteRequest(site_id=SITE_ID, visitor_id="v1", **kwargs)


def order(decision: RouteDecision) -> list[str]:
    return [c.agent_id for c in decision.candidates]


# --- the order between rules -------------------------------------------------------------


@pytest.mark.parametrize(
    ("agents", "idle", "req", "last_agent", "expected"),
    [
        pytest.param(
            [agent("amy", "cork"), agent("bob", "dub")],
            {},
            {"branch": "dub"},
            "amy",
            ["amy", "bob"],
            id="sticky-beats-branch",
        ),
        pytest.param(
            [agent("amy", "nyc"), agent("bob", "dub", ("de",), ("billing",))],
            {"bob": 900},
            {"branch": "dub", "language": "de", "skills": ("billing",), "location": NEAR_CORK},
            "amy",
            ["amy", "bob"],
            id="sticky-beats-every-other-rule-even-closed-branch",
        ),
        pytest.param(
            [agent("amy", "dub", ("en",)), agent("bob", "cork", ("de",))],
            {"bob": 900},
            {"branch": "dub", "language": "de"},
            None,
            ["amy", "bob"],
            id="requested-branch-beats-language",
        ),
        pytest.param(
            [agent("amy", "cork", ("en",)), agent("bob", "dub", ("de",))],
            {"bob": 900},
            {"location": NEAR_CORK, "language": "de"},
            None,
            ["amy", "bob"],
            id="nearest-open-branch-beats-language",
        ),
        pytest.param(
            [agent("amy", "dub"), agent("bob", "cork")],
            {"bob": 900},
            {"branch": "dub", "location": NEAR_CORK},
            None,
            ["amy", "bob"],
            id="requested-branch-beats-nearer-branch",
        ),
        pytest.param(
            [agent("amy", "cork"), agent("bob", "nyc")],
            {"bob": 900},
            {"branch": "nyc"},
            None,
            ["amy", "bob"],
            id="open-branch-beats-requested-closed-branch",
        ),
        pytest.param(
            [agent("amy", "dub", ("en",)), agent("bob", "nyc", ("de",), ("billing",))],
            {"bob": 900},
            {"language": "de", "skills": ("billing",)},
            None,
            ["amy", "bob"],
            id="closed-branch-ranks-after-open-whatever-else",
        ),
        pytest.param(
            [agent("amy", "dub"), agent("bob", None), agent("cid", "nyc")],
            {"bob": 900, "cid": 900},
            {},
            None,
            ["amy", "bob", "cid"],
            id="branchless-agent-after-open-before-closed",
        ),
        pytest.param(
            [agent("amy", "cork"), agent("bob", "dub")],
            {"bob": 900},
            {"location": NEAR_CORK},
            None,
            ["amy", "bob"],
            id="nearer-open-branch-first",
        ),
        pytest.param(
            [agent("amy", "dub", ("de",)), agent("bob", "dub", ("en",), ("billing", "sepa"))],
            {"bob": 900},
            {"language": "de", "skills": ("billing", "sepa")},
            None,
            ["amy", "bob"],
            id="language-beats-skills",
        ),
        pytest.param(
            [agent("amy", "dub", ("de-AT",)), agent("bob", "dub", ("de",))],
            {"bob": 900},
            {"language": "de-at"},
            None,
            ["amy", "bob"],
            id="exact-language-beats-same-primary-language",
        ),
        pytest.param(
            [agent("amy", "dub", ("de",)), agent("bob", "dub", ("fr",))],
            {"bob": 900},
            {"language": "de-CH"},
            None,
            ["amy", "bob"],
            id="same-primary-language-beats-none",
        ),
        pytest.param(
            [agent("amy", "dub"), agent("bob", "dub", ("en",))],
            {"bob": 900},
            {"language": "ga"},
            None,
            ["amy", "bob"],
            id="agent-without-languages-speaks-branch-languages",
        ),
        pytest.param(
            [agent("amy", "dub", skills=("billing",)), agent("bob", "dub")],
            {"bob": 900},
            {"skills": ("billing",)},
            None,
            ["amy", "bob"],
            id="skills-beat-idle",
        ),
        pytest.param(
            [
                agent("amy", "dub", skills=("billing", "sepa")),
                agent("bob", "dub", skills=("sepa",)),
            ],
            {"bob": 900},
            {"skills": ("billing", "sepa")},
            None,
            ["amy", "bob"],
            id="more-skills-first",
        ),
        pytest.param(
            [agent("zoe", "dub"), agent("amy", "dub")],
            {"zoe": 500, "amy": 100},
            {},
            None,
            ["zoe", "amy"],
            id="longest-idle-first",
        ),
        pytest.param(
            [agent("zoe", "dub"), agent("amy", "dub")],
            {},
            {},
            None,
            ["amy", "zoe"],
            id="agent-id-breaks-ties",
        ),
        pytest.param(
            [agent("amy", "dub"), agent("bob", "cork")],
            {"bob": 900},
            {"language": "de"},
            None,
            ["bob", "amy"],
            id="rules-without-a-preference-fall-through-to-idle",
        ),
    ],
)
def test_rule_order(
    agents: list[Agent],
    idle: dict[str, float],
    req: dict[str, Any],
    last_agent: str | None,
    expected: list[str],
) -> None:
    presences = [presence(aid, idle_s=s) for aid, s in idle.items()]
    snap = snapshot(agents, presences, last_agent=last_agent)
    decision = route(snap, request(**req), NOW)
    assert order(decision) == expected
    assert decision.reason is None


# --- each rule alone ---------------------------------------------------------------------


def ctx_for(agents: Sequence[Agent], last_agent: str | None = None, **req: Any) -> Any:
    return rank_context(snapshot(agents, last_agent=last_agent), request(**req), NOW)


@pytest.mark.parametrize(
    ("last_agent", "expected"),
    [
        ("amy", (0, "served this visitor before")),
        ("bob", (1, None)),
        (None, (1, None)),
    ],
)
def test_sticky_rank(last_agent: str | None, expected: tuple[int, str | None]) -> None:
    amy = agent("amy")
    assert sticky_rank(amy, ctx_for([amy], last_agent)) == expected


def _km(place: tuple[float, float], b: Branch) -> float:
    assert b.lat is not None and b.lon is not None
    return haversine_km(place, (b.lat, b.lon))


@pytest.mark.parametrize(
    ("branch", "req", "expected"),
    [
        ("dub", {"branch": "dub"}, (BranchKey(0, 0, math.inf), "branch Dublin (visitor's branch)")),
        (
            "nyc",
            {"branch": "nyc"},
            (BranchKey(2, 0, math.inf), "branch New York (visitor's branch), closed now"),
        ),
        ("dub", {}, (BranchKey(0, 1, math.inf), "branch Dublin, open")),
        ("nyc", {}, (BranchKey(2, 1, math.inf), "branch New York, closed now")),
        (
            "cork",
            {"location": NEAR_CORK},
            (
                BranchKey(0, 1, _km(NEAR_CORK, CORK)),
                f"nearest open branch Cork, {_km(NEAR_CORK, CORK):.0f} km",
            ),
        ),
        (
            "dub",
            {"location": NEAR_CORK},
            (
                BranchKey(0, 1, _km(NEAR_CORK, DUBLIN)),
                f"branch Dublin, open, {_km(NEAR_CORK, DUBLIN):.0f} km",
            ),
        ),
        (
            "nyc",
            {"location": NEAR_CORK},
            (
                BranchKey(2, 1, _km(NEAR_CORK, NEW_YORK)),
                f"branch New York, closed now, {_km(NEAR_CORK, NEW_YORK):.0f} km",
            ),
        ),
        (None, {"branch": "dub"}, (BranchKey(1, 1, math.inf), None)),
        ("gone", {}, (BranchKey(1, 1, math.inf), None)),
    ],
)
def test_branch_rank(
    branch: str | None, req: dict[str, Any], expected: tuple[BranchKey, str | None]
) -> None:
    agents = [agent("amy", branch), agent("bob", "dub"), agent("cid", "cork")]
    assert branch_rank(agents[0], ctx_for(agents, **req)) == expected


def test_branch_distances_are_plausible() -> None:
    assert _km(NEAR_CORK, CORK) == pytest.approx(1.7, abs=0.3)
    assert _km(NEAR_CORK, DUBLIN) == pytest.approx(220, abs=10)
    assert haversine_km((0.0, 0.0), (0.0, 180.0)) == pytest.approx(math.pi * 6371.0088)


@pytest.mark.parametrize(
    ("languages", "branch", "wanted", "expected"),
    [
        (("en", "de"), "dub", "de", (0, "speaks de")),
        (("en", "DE"), "dub", "de", (0, "speaks DE")),
        (("de_AT",), "dub", "de-AT", (0, "speaks de_AT")),
        (("de",), "dub", "de-AT", (1, "speaks de")),
        (("de-CH",), "dub", "de", (1, "speaks de-CH")),
        (("fr",), "dub", "de", (2, None)),
        ((), "dub", "ga", (0, "speaks ga")),  # the branch's languages
        (("en",), "dub", "ga", (2, None)),  # own languages replace the branch's
        ((), None, "en", (2, None)),
        (("fr",), "dub", None, (0, None)),  # nothing asked, everyone ties
    ],
)
def test_language_rank(
    languages: tuple[str, ...],
    branch: str | None,
    wanted: str | None,
    expected: tuple[int, str | None],
) -> None:
    amy = agent("amy", branch, languages)
    assert language_rank(amy, ctx_for([amy], language=wanted)) == expected


@pytest.mark.parametrize(
    ("has", "wanted", "expected"),
    [
        (("billing",), ("billing",), (-1, "has skill billing")),
        (("billing", "sepa", "tech"), ("sepa", "billing"), (-2, "has skills sepa, billing")),
        (("billing",), ("billing", "billing"), (-1, "has skill billing")),
        (("tech",), ("billing",), (0, None)),
        (("tech",), (), (0, None)),
    ],
)
def test_skills_rank(
    has: tuple[str, ...], wanted: tuple[str, ...], expected: tuple[int, str | None]
) -> None:
    amy = agent("amy", skills=has)
    assert skills_rank(amy, ctx_for([amy], skills=wanted)) == expected


@pytest.mark.parametrize(
    ("idle_since", "expected"),
    [
        (NOW - 340, (NOW - 340, "idle 340 s")),
        (NOW - 0.5, (NOW - 0.5, "idle 0 s")),
        (NOW + 5, (NOW + 5, "idle 0 s")),  # clock skew between nodes: never negative
        (0.0, (0.0, None)),  # never set: sorts first, no claim about how long
    ],
)
def test_idle_rank(idle_since: float, expected: tuple[float, str | None]) -> None:
    amy = agent("amy")
    p = replace(presence("amy"), idle_since=idle_since)
    assert idle_rank(p, ctx_for([amy])) == expected


def test_candidate_reasons_explain_every_rule_in_order() -> None:
    anna = agent("anna", "dub", ("en", "de"), ("billing",))
    snap = snapshot([anna], [presence("anna", idle_s=340)], last_agent="anna")
    decision = route(snap, request(branch="dub", language="de", skills=("billing",)), NOW)
    assert decision.candidates == (
        Candidate(
            agent_id="anna",
            channel=WEBRTC,
            reasons=(
                "served this visitor before",
                "branch Dublin (visitor's branch)",
                "speaks de",
                "has skill billing",
                "idle 340 s",
            ),
        ),
    )


def test_nearest_open_branch_is_named_among_candidates_only() -> None:
    # Cork is nearer, but its only agent is on a call: Dublin is the nearest that can answer.
    agents = [agent("amy", "cork"), agent("bob", "dub")]
    snap = snapshot(agents, [presence("amy", PresenceStatus.ON_CALL)])
    decision = route(snap, request(location=NEAR_CORK), NOW)
    assert decision.candidates[0].reasons[0].startswith("nearest open branch Dublin, ")


# --- eligibility -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "p", "reserved", "req", "expected"),
    [
        (agent("amy"), presence("amy"), (), {}, WEBRTC),
        (agent("amy"), presence("amy"), (), {"exclude": frozenset({"amy"})}, None),
        (agent("amy"), presence("amy"), ("amy",), {}, None),
        (agent("amy"), presence("amy"), ("bob",), {"exclude": frozenset({"bob"})}, WEBRTC),
        (agent("amy"), presence("amy", PresenceStatus.ON_CALL), (), {}, None),
        (agent("amy"), presence("amy", PresenceStatus.BUSY), (), {}, None),
        (agent("amy"), presence("amy", PresenceStatus.AWAY), (), {}, None),
        (agent("amy"), presence("amy", PresenceStatus.DND), (), {}, None),
        (agent("amy"), presence("amy", PresenceStatus.OFFLINE), (), {}, None),
        (agent("amy"), None, (), {}, None),
        (agent("amy"), presence("amy", channels=(PSTN,)), (), {}, None),
        (agent("amy"), presence("amy", channels=()), (), {}, None),
        # A callback reaches an agent with a mobile number on their phone, where callbacks
        # are set up; not without them, nor an agent without a number.
        (
            agent("amy", mobile=MOBILE),
            presence("amy", channels=(PSTN,)),
            (),
            {"channel": PSTN, "can": CALLBACKS},
            PSTN,
        ),
        (
            agent("amy", mobile=MOBILE),
            presence("amy", channels=(PSTN,)),
            (),
            {"channel": PSTN},
            None,
        ),
        (
            agent("amy"),
            presence("amy", channels=(PSTN,)),
            (),
            {"channel": PSTN, "can": CALLBACKS},
            None,
        ),
        # ... and in the app, where they accept and then talk on their own phone.
        (
            agent("amy", mobile=MOBILE),
            presence("amy"),
            (),
            {"channel": PSTN, "agent_channels": (WEBRTC,), "can": CALLBACKS},
            WEBRTC,
        ),
        (
            agent("amy"),
            presence("amy"),
            (),
            {"channel": PSTN, "agent_channels": (WEBRTC,), "can": CALLBACKS},
            None,
        ),
        (agent("amy", site="other"), presence("amy"), (), {}, None),
        (agent("amy"), presence("amy", site="other"), (), {}, None),
        # A bridge-capable request reaches a phone-only agent on pstn, once the bridge is
        # there ...
        (
            agent("amy", mobile=MOBILE),
            presence("amy", channels=(PSTN,)),
            (),
            {"agent_channels": (WEBRTC, PSTN), "can": BRIDGE},
            PSTN,
        ),
        (
            agent("amy", mobile=MOBILE),
            presence("amy", channels=(PSTN,)),
            (),
            {"agent_channels": (WEBRTC, PSTN), "can": CALLBACKS},
            None,
        ),
        # ... and prefers the agent's browser when they have both.
        (
            agent("amy", mobile=MOBILE),
            presence("amy", channels=(PSTN, WEBRTC)),
            (),
            {"agent_channels": (WEBRTC, PSTN), "can": BRIDGE},
            WEBRTC,
        ),
        (
            agent("amy", mobile=MOBILE),
            presence("amy", channels=(PSTN, WEBRTC)),
            (),
            {"agent_channels": (PSTN, WEBRTC), "can": BRIDGE},
            PSTN,
        ),
        # Without the bridge, a browser call never rings a phone.
        (
            agent("amy", mobile=MOBILE),
            presence("amy", channels=(PSTN, WEBRTC)),
            (),
            {"agent_channels": (PSTN, WEBRTC), "can": CALLBACKS},
            WEBRTC,
        ),
    ],
)
def test_eligibility(
    who: Agent,
    p: Presence | None,
    reserved: tuple[str, ...],
    req: dict[str, Any],
    expected: Channel | None,
) -> None:
    can = req.pop("can", Capabilities())
    r = request(**req)
    assert reachable_channel(who, p, r, frozenset(reserved), can) is expected
    snap = replace(snapshot([who], [p] if p is not None else [], reserved), can=can)
    if p is None:
        snap = replace(snap, presence={})
    decision = route(snap, r, NOW)
    if expected is None:
        assert decision.candidates == ()
    else:
        assert [(c.agent_id, c.channel) for c in decision.candidates] == [("amy", expected)]


def test_request_for_another_site_is_refused() -> None:
    with pytest.raises(ValueError, match="site"):
        route(snapshot([agent("amy")]), replace(request(), site_id="other"), NOW)


# --- empty results -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("presences", "reserved", "req", "now", "reason"),
    [
        ([], (), {}, NOW, NoRouteReason.NO_AGENTS_ONLINE),
        (
            [presence("amy", PresenceStatus.AWAY), presence("bob", PresenceStatus.DND)],
            (),
            {},
            NOW,
            NoRouteReason.NO_AGENTS_ONLINE,
        ),
        ([presence("amy", PresenceStatus.ON_CALL)], (), {}, NOW, NoRouteReason.ALL_BUSY),
        ([presence("amy", PresenceStatus.BUSY)], (), {}, NOW, NoRouteReason.ALL_BUSY),
        ([presence("amy")], ("amy",), {}, NOW, NoRouteReason.ALL_BUSY),
        (
            [presence("amy")],
            (),
            {"exclude": frozenset({"amy"})},
            NOW,
            NoRouteReason.ALL_BUSY,
        ),
        ([presence("amy", channels=(PSTN,))], (), {}, NOW, NoRouteReason.NO_AGENT_FOR_CHANNEL),
        (
            # The free agent is the most actionable fact, even next to a busy one.
            [presence("amy", channels=(PSTN,)), presence("bob", PresenceStatus.ON_CALL)],
            (),
            {},
            NOW,
            NoRouteReason.NO_AGENT_FOR_CHANNEL,
        ),
        ([], (), {}, NIGHT, NoRouteReason.CLOSED),
        ([presence("amy", PresenceStatus.AWAY)], (), {}, NIGHT, NoRouteReason.CLOSED),
        # Someone is still on a call after hours: they will be free before the morning.
        ([presence("amy", PresenceStatus.ON_CALL)], (), {}, NIGHT, NoRouteReason.ALL_BUSY),
    ],
)
def test_empty_result_reason(
    presences: list[Presence],
    reserved: tuple[str, ...],
    req: dict[str, Any],
    now: float,
    reason: NoRouteReason,
) -> None:
    snap = snapshot([agent("amy"), agent("bob")], reserved=reserved)
    snap = replace(snap, presence={p.agent_id: p for p in presences})
    decision = route(snap, request(**req), now)
    assert decision.candidates == ()
    assert decision.reason is reason


def test_next_open_at_is_set_while_the_site_is_closed() -> None:
    snap = replace(snapshot([agent("amy")]), presence={})
    assert route(snap, request(), NOW).next_open_at is None
    # At 03:00 in Dublin the earliest opening is Dublin's or Cork's 09:00 IST.
    assert route(snap, request(), NIGHT).next_open_at == utc(2025, 6, 4, 8)


def test_available_agent_at_closed_branch_is_still_routed_at_night() -> None:
    decision = route(snapshot([agent("amy", "dub")]), request(), NIGHT)
    assert order(decision) == ["amy"]
    assert decision.next_open_at == utc(2025, 6, 4, 8)
    assert "branch Dublin, closed now" in decision.candidates[0].reasons


def test_site_without_branches_is_never_closed() -> None:
    snap = replace(snapshot([agent("amy", None)], branches={}), presence={})
    decision = route(snap, request(), NIGHT)
    assert decision.reason is NoRouteReason.NO_AGENTS_ONLINE
    assert decision.next_open_at is None


def test_reason_codes_are_stable_strings() -> None:
    assert {r.value for r in NoRouteReason} == {
        "no_agents_online",
        "all_busy",
        "closed",
        "no_agent_for_channel",
    }


# --- wait estimates ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ahead", "free", "working", "mean", "expected"),
    [
        (0, 1, 0, 240.0, 0),  # someone free, nobody ahead
        (1, 2, 0, 240.0, 0),  # the one ahead takes one free agent, we take the other
        (0, 0, 1, 240.0, 240),  # wait for the one call in progress
        (0, 0, 2, 240.0, 120),  # two calls in progress: the first ends in half the time
        (3, 0, 2, 240.0, 480),  # (3 + 1) * 240 / 2
        (1, 1, 1, 240.0, 120),  # the free agent takes the one ahead; then 1 of 2 finishes
        (1, 0, 3, 100.0, 67),  # rounded up: never promise sooner than the estimate
        (0, 0, 0, 240.0, 240),  # nobody working: nominal, one agent assumed
    ],
)
def test_estimate_wait_s(ahead: int, free: int, working: int, mean: float, expected: int) -> None:
    assert estimate_wait_s(ahead, free, working, mean) == expected


def test_estimate_wait_s_rejects_negative_inputs() -> None:
    with pytest.raises(ValueError):
        estimate_wait_s(-1, 0, 0, 240.0)
    with pytest.raises(ValueError):
        estimate_wait_s(0, 0, 0, -1.0)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 50),
    st.integers(0, 20),
    st.integers(0, 20),
    st.floats(1.0, 3600.0),
)
def test_estimate_wait_s_is_monotonic(ahead: int, free: int, working: int, mean: float) -> None:
    wait = estimate_wait_s(ahead, free, working, mean)
    assert (wait == 0) == (free > ahead)
    assert estimate_wait_s(ahead + 1, free, working, mean) >= wait
    assert estimate_wait_s(ahead, free + 1, working, mean) <= wait
    assert estimate_wait_s(ahead, free, working + 1, mean) <= wait


# --- availability ------------------------------------------------------------------------


def test_availability_counts_what_route_could_ring() -> None:
    agents = [
        agent("amy", "dub", ("de",)),
        agent("bob", "cork", mobile=MOBILE),
        agent("cid", "dub"),
        agent("dan", "dub"),
        agent("eve", "nyc"),
    ]
    snap = snapshot(
        agents,
        [
            presence("bob", channels=(PSTN,)),
            presence("cid", PresenceStatus.ON_CALL),
            presence("eve", PresenceStatus.OFFLINE),
        ],
        reserved=["dan"],
    )
    snap = replace(snap, can=CALLBACKS)
    assert availability(snap, NOW) == Availability(
        available=True,
        channels=(WEBRTC, PSTN),  # amy in the app; bob on his mobile (and amy has no number)
        agents_available=2,  # amy, bob
        agents_working=2,  # cid on a call, dan ringing for someone else
        estimated_wait_s=0,
        open=True,
        next_open_at=None,
        callbacks=True,
    )
    german = availability(snap, NOW, language="de")
    assert (german.agents_available, german.channels, german.agents_working) == (1, (WEBRTC,), 0)
    cork = availability(snap, NOW, branch="cork")
    assert (cork.agents_available, cork.channels) == (1, (PSTN,))


def test_availability_without_callbacks_never_promises_a_phone() -> None:
    # Bob is only on his mobile: without callbacks set up (no telephony, or no caller IDs)
    # nothing can reach him, so he is not available; the button offers amy's browser call.
    snap = snapshot(
        [agent("amy", mobile=MOBILE), agent("bob", mobile=MOBILE)],
        [presence("bob", channels=(PSTN,))],
    )
    result = availability(snap, NOW)
    assert (result.available, result.channels, result.agents_available) == (True, (WEBRTC,), 1)
    assert not result.callbacks
    alone = availability(replace(snap, presence={"bob": snap.presence["bob"]}), NOW)
    assert (alone.available, alone.channels, alone.agents_available) == (False, (), 0)
    # A mobile-only agent is not available for a browser call, with callbacks or without.
    with_callbacks = availability(
        replace(snap, presence={"bob": snap.presence["bob"]}, can=CALLBACKS), NOW
    )
    assert (with_callbacks.channels, with_callbacks.agents_available) == ((PSTN,), 1)


# What each kind of agent can be reached on by a visitor: (has a mobile number, device
# channels of their available devices, what the gateway can carry) -> visitor channels.
NO = Capabilities()


@pytest.mark.parametrize(
    ("mobile", "devices", "can", "expected"),
    [
        # In the agent app only.
        (False, (WEBRTC,), NO, (WEBRTC,)),
        (False, (WEBRTC,), CALLBACKS, (WEBRTC,)),  # no number: no callback
        (True, (WEBRTC,), NO, (WEBRTC,)),  # no telephony: no callback
        (True, (WEBRTC,), CALLBACKS, (WEBRTC, PSTN)),
        # On a live mobile device only: callbacks, never a browser call without the bridge.
        (True, (PSTN,), NO, ()),
        (True, (PSTN,), CALLBACKS, (PSTN,)),
        (False, (PSTN,), CALLBACKS, ()),
        (True, (PSTN,), BRIDGE, (WEBRTC,)),
        (True, (PSTN,), Capabilities(callbacks=True, bridge=True), (WEBRTC, PSTN)),
        # Both devices.
        (True, (PSTN, WEBRTC), CALLBACKS, (WEBRTC, PSTN)),
        (True, (PSTN, WEBRTC), NO, (WEBRTC,)),
        # With the bridge a callback reaches the app even without a number.
        (False, (WEBRTC,), Capabilities(callbacks=True, bridge=True), (WEBRTC, PSTN)),
        # No available device (IM only, or every device negative priority): nothing.
        (True, (), Capabilities(callbacks=True, bridge=True), ()),
    ],
)
def test_visitor_channels_table(
    mobile: bool, devices: tuple[Channel, ...], can: Capabilities, expected: tuple[Channel, ...]
) -> None:
    who = agent("amy", mobile=MOBILE if mobile else None)
    p = presence("amy", channels=devices)
    assert visitor_channels(who, p, can) == expected
    for status in (PresenceStatus.BUSY, PresenceStatus.ON_CALL, PresenceStatus.OFFLINE):
        assert visitor_channels(who, replace(p, status=status), can) == ()
    assert visitor_channels(who, None, can) == ()
    # Routing rings for exactly these: a request of either channel that may reach any device.
    for channel in Channel:
        r = request(channel=channel, agent_channels=(WEBRTC, PSTN))
        assert (reachable_channel(who, p, r, can=can) is not None) == (channel in expected)


def test_capabilities_need_telephony_and_caller_ids() -> None:
    site = snapshot([agent("amy")]).site
    with_ids = replace(site, caller_ids=("+35312345678",))
    assert capabilities(with_ids, telephony=True) == CALLBACKS
    assert capabilities(with_ids, telephony=False) == NO
    assert capabilities(site, telephony=True) == NO
    assert not carries(PSTN, WEBRTC, agent("amy", mobile=MOBILE), NO)


def test_availability_of_a_closed_branch_says_when_it_opens() -> None:
    snap = snapshot([agent("eve", "nyc")], [presence("eve", PresenceStatus.OFFLINE)])
    result = availability(snap, NOW, branch="nyc")
    assert not result.available
    assert not result.open
    assert result.next_open_at == utc(2025, 6, 4, 13)  # 09:00 EDT


def test_availability_wait_when_everyone_is_on_a_call() -> None:
    snap = snapshot(
        [agent("amy"), agent("bob")],
        [presence("amy", PresenceStatus.ON_CALL), presence("bob", PresenceStatus.ON_CALL)],
    )
    result = availability(snap, NOW, queue_ahead=1, mean_handle_s=240.0)
    assert (result.available, result.channels, result.estimated_wait_s) == (False, (), 240)


def test_availability_at_night() -> None:
    snap = replace(snapshot([agent("amy")]), presence={})
    result = availability(snap, NIGHT)
    assert not result.available
    assert not result.open
    assert result.next_open_at == utc(2025, 6, 4, 8)


def test_availability_rejects_unknown_branch() -> None:
    with pytest.raises(ValueError, match="branch"):
        availability(snapshot([agent("amy")]), NOW, branch="atlantis")


# --- properties --------------------------------------------------------------------------

AGENT_IDS = [f"a{i}" for i in range(8)]
LANGUAGES = ["en", "de", "de-AT", "fr", "ga"]
SKILLS = ["billing", "sepa", "tech"]


# Strategies built once: constructing them inside the composite on every draw costs more
# than running the route itself.
_SITES = st.sampled_from([SITE_ID, SITE_ID, SITE_ID, "other"])
_AGENT_BRANCHES = st.sampled_from([None, "dub", "cork", "nyc", "gone"])
_LANGUAGE_LISTS = st.lists(st.sampled_from(LANGUAGES), max_size=2, unique=True).map(tuple)
_SKILL_LISTS = st.lists(st.sampled_from(SKILLS), max_size=3, unique=True).map(tuple)
_STATUSES = st.sampled_from([*PresenceStatus, AVAILABLE, AVAILABLE])
_CHANNEL_LISTS = st.lists(st.sampled_from(list(Channel)), unique=True).map(tuple)
_IDLE_SINCE = st.floats(0.0, NOW)
_AGENT_SETS = st.frozensets(st.sampled_from(AGENT_IDS))
_MAYBE_AGENT = st.none() | st.sampled_from(AGENT_IDS)
_MAYBE_MOBILE = st.none() | st.just(MOBILE)
_MAYBE_LANGUAGE = st.none() | st.sampled_from([*LANGUAGES, "de-CH"])
_MAYBE_BRANCH = st.none() | st.sampled_from(["dub", "cork", "nyc", "gone"])
_MAYBE_LOCATION = st.none() | st.tuples(st.floats(-90.0, 90.0), st.floats(-180.0, 180.0))
_WANTED_SKILLS = st.lists(st.sampled_from(SKILLS), max_size=3).map(tuple)
_INSTANTS = st.sampled_from([NOW, NIGHT, utc(2025, 6, 7, 12), utc(2025, 3, 30, 9)])


_DEVICE_LISTS = st.lists(
    st.builds(
        Device,
        device_id=st.sampled_from(["d1", "d2"]),
        kind=st.sampled_from(list(DeviceKind)),
        state=st.just(DeviceState.AVAILABLE),
        priority=st.just(0),
        last_seen=st.just(0.0),
        expires_at=st.just(0.0),
    ),
    max_size=2,
).map(tuple)
_SCORES = st.sampled_from([-100.0, -20.0, 0.0, 35.5, 100.0])


@st.composite
def routing_cases(draw: st.DrawFn) -> tuple[RoutingSnapshot, RouteRequest, float]:
    agents: list[Agent] = []
    presences: dict[str, Presence] = {}
    for agent_id in AGENT_IDS[: draw(st.integers(0, len(AGENT_IDS)))]:
        agents.append(
            Agent(
                agent_id=agent_id,
                site=draw(_SITES),
                name=agent_id,
                branch=draw(_AGENT_BRANCHES),
                languages=draw(_LANGUAGE_LISTS),
                skills=draw(_SKILL_LISTS),
                mobile=draw(_MAYBE_MOBILE),
            )
        )
        if draw(st.integers(0, 4)):  # most agents have a presence, some are unknown
            presences[agent_id] = Presence(
                agent_id=agent_id,
                site=draw(_SITES),
                name=agent_id,
                branch=None,
                status=draw(_STATUSES),
                channels=draw(_CHANNEL_LISTS),
                devices=draw(_DEVICE_LISTS),
                since=0.0,
                idle_since=draw(_IDLE_SINCE),
            )
    site = Site(SITE_ID, "Acme", (), BRANCHES, {a.agent_id: a for a in agents})
    scores = {a.agent_id: draw(_SCORES) for a in agents if draw(st.booleans())}
    snap = RoutingSnapshot(
        site=site,
        presence=presences,
        reserved=draw(_AGENT_SETS),
        last_agent=draw(_MAYBE_AGENT),
        can=Capabilities(callbacks=draw(st.booleans()), bridge=draw(st.booleans())),
        scores=scores,
    )
    req = RouteRequest(
        site_id=SITE_ID,
        visitor_id="v",
        channel=draw(st.sampled_from(list(Channel))),
        language=draw(_MAYBE_LANGUAGE),
        branch=draw(_MAYBE_BRANCH),
        location=draw(_MAYBE_LOCATION),
        skills=draw(_WANTED_SKILLS),
        exclude=draw(_AGENT_SETS),
        agent_channels=draw(_CHANNEL_LISTS),
        policy=draw(st.sampled_from(list(RoutingPolicy))),
    )
    return snap, req, draw(_INSTANTS)


def carried(visitor: Channel, device: Channel, a: Agent, can: Capabilities) -> bool:
    """``carries`` written out as the docs say it, for the properties below."""
    if visitor == WEBRTC:
        return device == WEBRTC or (can.bridge and a.mobile is not None)
    if not can.callbacks:
        return False
    return a.mobile is not None or (can.bridge and device == WEBRTC)


def independently_eligible(snap: RoutingSnapshot, req: RouteRequest) -> set[str]:
    reach = req.agent_channels or (req.channel,)
    out = set()
    for a in snap.site.agents.values():
        p = snap.presence.get(a.agent_id)
        if (
            p is not None
            and a.site == SITE_ID
            and p.site == SITE_ID
            and p.status == "available"
            and a.agent_id not in snap.reserved
            and a.agent_id not in req.exclude
            and any(c in p.channels and carried(req.channel, c, a, snap.can) for c in reach)
        ):
            out.add(a.agent_id)
    return out


@settings(max_examples=250, deadline=None)
@given(routing_cases())
def test_every_candidate_is_eligible_and_every_eligible_agent_is_a_candidate(
    case: tuple[RoutingSnapshot, RouteRequest, float],
) -> None:
    snap, req, now = case
    decision = route(snap, req, now)
    ids = order(decision)
    assert len(ids) == len(set(ids)), "candidates are unique"
    assert set(ids) == independently_eligible(snap, req)
    reach = req.agent_channels or (req.channel,)
    for c in decision.candidates:
        p = snap.presence[c.agent_id]
        assert p.status is AVAILABLE
        assert c.agent_id not in snap.reserved
        assert c.agent_id not in req.exclude
        assert c.channel in p.channels and c.channel in reach
        # The preferred reachable channel, not just any.
        a = snap.site.agents[c.agent_id]
        assert c.channel == next(
            ch for ch in reach if ch in p.channels and carried(req.channel, ch, a, snap.can)
        )
        # Routing rings only agents the button counts for the visitor's channel.
        assert req.channel in visitor_channels(a, p, snap.can)
    assert (decision.reason is None) == bool(decision.candidates)


@settings(max_examples=250, deadline=None)
@given(routing_cases())
def test_sticky_first_then_open_then_branchless_then_closed(
    case: tuple[RoutingSnapshot, RouteRequest, float],
) -> None:
    snap, req, now = case
    # The usual rules: an experiment's policy ranks before the branch rule (tested below).
    ids = order(route(snap, replace(req, policy=RoutingPolicy.DEFAULT), now))
    if snap.last_agent in ids:
        assert ids[0] == snap.last_agent
        ids = ids[1:]

    def tier(agent_id: str) -> int:
        b = snap.site.branches.get(snap.site.agents[agent_id].branch or "")
        return 1 if b is None else 0 if is_open(b, now) else 2

    tiers = [tier(i) for i in ids]
    assert tiers == sorted(tiers), "open branch, then no branch, then closed branch"


@settings(max_examples=200, deadline=None)
@given(routing_cases())
def test_route_does_not_depend_on_dict_order(
    case: tuple[RoutingSnapshot, RouteRequest, float],
) -> None:
    snap, req, now = case
    reversed_site = replace(snap.site, agents=dict(reversed(list(snap.site.agents.items()))))
    reversed_presence = dict(reversed(list(snap.presence.items())))
    shuffled = replace(snap, site=reversed_site, presence=reversed_presence)
    assert route(shuffled, req, now) == route(snap, req, now)


# --- the ranking cache ------------------------------------------------------------------------


def _mixed_agents() -> list[Agent]:
    return [
        agent("ann", "dub", ("en",), ("billing",)),
        agent("bob", "cork", ("de", "en")),
        agent("cid", "ny", ("es",), ("billing", "sepa")),
        agent("dee", None, ("de",)),
        agent("eve", "dub", ("de",), ("sepa",)),
    ]


@pytest.mark.parametrize(
    "req",
    [
        {},
        {"language": "de"},
        {"location": NEAR_CORK},
        {"branch": "ny", "skills": ("billing",)},
        {"language": "es", "exclude": frozenset({"cid"})},
    ],
)
def test_ranking_cache_orders_like_route(req: dict[str, Any]) -> None:
    presences = [presence("bob", idle_s=500), presence("dee", idle_s=50)]
    snap = snapshot(_mixed_agents(), presences, reserved=["eve"], last_agent="dee")
    expected = route(snap, request(**req), NOW)
    got = RankingCache().route(snap, request(**req), NOW)
    assert order(got) == order(expected)
    assert [c.channel for c in got.candidates] == [c.channel for c in expected.candidates]
    assert got.candidates[0].reasons[0] == expected.candidates[0].reasons[0]


def test_ranking_cache_sees_who_is_free_now_and_who_just_came_online() -> None:
    cache = RankingCache(ttl_s=10.0)
    agents = _mixed_agents()
    first = cache.route(snapshot(agents), request(language="de"), NOW)
    best = first.candidates[0].agent_id
    # Half a second later the best agent is on a call: skipped without re-ranking.
    busy = snapshot(agents, [presence(best, status=PresenceStatus.ON_CALL, channels=())])
    later = cache.route(busy, request(language="de"), NOW + 0.5)
    assert best not in order(later) and order(later) == order(first)[1:]
    # Free again, they are the most recently idle: last of their group, not first.
    freed = snapshot(agents, [presence(best, idle_s=-0.5)])
    again = cache.route(freed, request(language="de"), NOW + 0.6)
    assert order(again) == order(route(freed, request(language="de"), NOW + 0.6))
    assert order(again)[0] != best
    # An agent who only just came online is ranked at once.
    newcomer = agent("fay", "dub", ("de",))
    grown = snapshot([*agents, newcomer], [presence("fay", idle_s=10_000)])
    assert order(cache.route(grown, request(language="de"), NOW + 0.9))[0] == "fay"


def test_ranking_cache_falls_back_to_route_for_the_reason_nobody_is_free() -> None:
    agents = _mixed_agents()
    everyone_busy = [presence(a.agent_id, status=PresenceStatus.BUSY, channels=()) for a in agents]
    decision = RankingCache().route(snapshot(agents, everyone_busy), request(), NOW)
    assert decision.candidates == () and decision.reason is NoRouteReason.ALL_BUSY


@settings(max_examples=300, deadline=None)
@given(routing_cases())
def test_ranking_cache_orders_like_route_for_any_site(
    case: tuple[RoutingSnapshot, RouteRequest, float],
) -> None:
    snap, req, now = case
    expected = route(snap, req, now)
    got = RankingCache(limit=len(AGENT_IDS)).route(snap, req, now)
    assert order(got) == order(expected)
    assert [c.channel for c in got.candidates] == [c.channel for c in expected.candidates]
    # The idle rule speaks the same in both, from the same instant.
    for mine, theirs in zip(got.candidates, expected.candidates, strict=True):
        assert [r for r in mine.reasons if r.startswith("idle")] == [
            r for r in theirs.reasons if r.startswith("idle")
        ]


@settings(max_examples=300, deadline=None)
@given(routing_cases(), st.data())
def test_ranking_cache_stays_exact_as_agents_become_idle_after_it_ranked(
    case: tuple[RoutingSnapshot, RouteRequest, float], data: st.DataObject
) -> None:
    """Agents whose calls end (or who come back) after the ranking are placed by the walk
    where a fresh ranking would put them."""
    snap, req, now = case
    cache = RankingCache(limit=len(AGENT_IDS))
    cache.route(snap, req, now)
    later = max([now, *(p.idle_since for p in snap.presence.values())]) + 1.0
    changed = data.draw(st.frozensets(st.sampled_from(sorted(snap.presence) or ["none"])))
    presence = {
        agent_id: replace(p, status=data.draw(_STATUSES), idle_since=later)
        if agent_id in changed
        else p
        for agent_id, p in snap.presence.items()
    }
    moved = replace(snap, presence=presence)
    expected = route(moved, req, now)
    got = cache.route(moved, req, now)
    assert order(got) == order(expected)
    for mine, theirs in zip(got.candidates, expected.candidates, strict=True):
        assert [r for r in mine.reasons if r.startswith("idle")] == [
            r for r in theirs.reasons if r.startswith("idle")
        ]


@settings(max_examples=200, deadline=None)
@given(routing_cases(), st.data())
def test_ranking_cache_stays_exact_over_many_walks_as_agents_come_and_go(
    case: tuple[RoutingSnapshot, RouteRequest, float], data: st.DataObject
) -> None:
    """Walks remember who left the front of the ranking (on a call, away, or idle anew)
    for the rest of the ranking's life. Over several steps of agents changing status, as
    presence does it (whoever becomes available gets a new idle time), every walk still
    ranks like `route`, and a walk left half done while others go on repeats nobody."""
    snap, req, now = case
    cache = RankingCache(ttl_s=3600.0, limit=len(AGENT_IDS))
    paused = cache.candidates(snap, req, now)
    seen = [c.agent_id for c in itertools.islice(paused, data.draw(st.integers(0, 3)))]
    clock = max([now, *(p.idle_since for p in snap.presence.values())])
    for _ in range(data.draw(st.integers(1, 4))):
        clock += 1.0
        presence = dict(snap.presence)
        ids = sorted(presence)
        for agent_id in data.draw(st.frozensets(st.sampled_from(ids))) if ids else ():
            before = presence[agent_id]
            status = data.draw(_STATUSES)
            became_available = status is AVAILABLE and before.status is not AVAILABLE
            presence[agent_id] = replace(
                before, status=status, idle_since=clock if became_available else before.idle_since
            )
        snap = replace(snap, presence=presence)
        if data.draw(st.booleans()):
            next(cache.candidates(snap, req, now), None)  # a walk that stops at its first
        assert order(cache.route(snap, req, now)) == order(route(snap, req, now))
    seen += [c.agent_id for c in paused]
    assert len(seen) == len(set(seen))


# --- experiments' policies ------------------------------------------------------------------


def _on_mobile(p: Presence) -> Presence:
    phone = Device("phone", DeviceKind.MOBILE, DeviceState.AVAILABLE, 0, 0.0, 0.0)
    return replace(p, devices=(phone,))


@pytest.mark.parametrize("cached", [False, True])
def test_best_nps_policy_rings_the_best_recommended_first_after_the_visitors_own(
    cached: bool,
) -> None:
    agents = [agent("ann", "dub"), agent("bob", "dub"), agent("cid", "dub"), agent("dee", "dub")]
    longest_idle = [presence("dee", idle_s=9_000)]
    snap = replace(
        snapshot(agents, longest_idle, last_agent="ann"), scores={"bob": 80.0, "cid": -10.0}
    )
    decide = RankingCache().route if cached else route
    assert order(decide(snap, request(), NOW))[:2] == ["ann", "dee"]  # default: idle first
    variant = decide(snap, request(policy=RoutingPolicy.BEST_NPS), NOW)
    # Sticky still first; then by NPS; an agent with no answers yet last.
    assert order(variant) == ["ann", "bob", "cid", "dee"]
    assert "NPS 80" in variant.candidates[1].reasons


@pytest.mark.parametrize("cached", [False, True])
def test_mobile_first_policy_rings_agents_on_their_phone_first(cached: bool) -> None:
    agents = [agent("ann", "dub"), agent("bob", "cork")]
    snap = snapshot(agents, [presence("ann", idle_s=9_000), _on_mobile(presence("bob"))])
    decide = RankingCache().route if cached else route
    assert order(decide(snap, request(location=(53.35, -6.26)), NOW)) == ["ann", "bob"]
    variant = decide(snap, request(location=(53.35, -6.26), policy=RoutingPolicy.MOBILE_FIRST), NOW)
    assert order(variant) == ["bob", "ann"]
    assert variant.candidates[0].reasons[0] == "on mobile"
