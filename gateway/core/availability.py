"""What the website's button may truthfully promise: who is free, who will be soon, how long
a visitor would wait, and whether the branches in scope are open. Counts the same agents
`gateway.core.routing.route` could ring, each only for the channels that can reach them now
(`routing.visitor_channels`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.core.hours import is_open
from gateway.core.model import Channel, PresenceStatus
from gateway.core.routing import RoutingSnapshot, earliest_opening, speaks, visitor_channels

# Used for wait estimates until the site has measured its own mean call length.
DEFAULT_MEAN_HANDLE_S = 240.0


def estimate_wait_s(
    queue_ahead: int, agents_available: int, agents_working: int, mean_handle_s: float
) -> int:
    """Seconds until an agent can pick up a visitor with `queue_ahead` requests before them.

    `agents_available` are free now; `agents_working` are on (or ringing for) a call and will
    become free. The free agents take the first requests in the queue, so if there are more
    free agents than requests ahead the wait is 0. Otherwise the visitor needs
    ``queue_ahead - agents_available + 1`` calls to finish. With every agent then busy, calls
    finish at a rate of about ``agents / mean_handle_s`` (treating the remaining time of a call
    in progress as a whole mean call, which is exact for exponential call lengths and errs
    long for steadier ones), so the wait is that count times ``mean_handle_s / agents``.
    With nobody free, this is ``(queue_ahead + 1) * mean_handle_s / agents_working``.

    Visitors ahead who give up only shorten the wait, so the estimate errs on the honest side:
    a callback may come sooner than promised, rarely later. Rounded up to whole seconds. When
    nobody is working at all the figure is nominal (one agent assumed): show the opening
    time instead.
    """
    if min(queue_ahead, agents_available, agents_working) < 0 or mean_handle_s < 0:
        raise ValueError("queue, agent counts and mean handle time must not be negative")
    if agents_available > queue_ahead:
        return 0
    calls_to_finish = queue_ahead - agents_available + 1
    agents = max(1, agents_available + agents_working)
    return math.ceil(calls_to_finish * mean_handle_s / agents)


@dataclass(frozen=True, slots=True)
class Availability:
    """What the website's button may truthfully promise right now."""

    # Someone can take a call now.
    available: bool
    # Channels a visitor can reach the available agents on now (webrtc: a browser call;
    # pstn: a callback), in enum order.
    channels: tuple[Channel, ...]
    agents_available: int
    # Agents on a call or ringing for one: they will be free again soon.
    agents_working: int
    estimated_wait_s: int
    # Any branch in scope is open now.
    open: bool
    # When the branches in scope next open; None while open, or if not within 14 days.
    next_open_at: float | None
    # Callbacks can be asked for at all (for later, or while everyone is busy): telephony is
    # set up for the site. Without it no channel is ever pstn.
    callbacks: bool = False


def availability(
    snapshot: RoutingSnapshot,
    now: float,
    *,
    language: str | None = None,
    branch: str | None = None,
    queue_ahead: int = 0,
    mean_handle_s: float = DEFAULT_MEAN_HANDLE_S,
) -> Availability:
    """Summarise the site (or one branch, or one language's speakers) for the button.

    Counts the same agents `route` could ring: an available agent who is reserved for another
    call is counted as working, not available; an available one is counted only for the
    channels that can reach them (`visitor_channels` under `snapshot.can`), and not at all
    when none can (a mobile-only agent without callbacks). Filtering by language keeps the
    agents who speak it (exactly or by primary language), so "Talk to someone in German now"
    is true.
    `snapshot.last_agent` is ignored. Raises ValueError for an unknown `branch`: the edge
    should answer 400 rather than show "closed" for a typo.
    """
    site = snapshot.site
    if branch is not None and branch not in site.branches:
        raise ValueError(f"unknown branch {branch!r} for site {site.site_id!r}")

    available = 0
    working = 0
    channels: set[Channel] = set()
    for agent in site.agents.values():
        if agent.site != site.site_id or (branch is not None and agent.branch != branch):
            continue
        presence = snapshot.presence.get(agent.agent_id)
        if presence is None or presence.site != site.site_id:
            continue
        if language:
            home = site.branches.get(agent.branch) if agent.branch is not None else None
            if speaks(agent, home, language)[1] is None:
                continue
        reserved = agent.agent_id in snapshot.reserved
        if presence.status == PresenceStatus.ON_CALL or (
            presence.status == PresenceStatus.AVAILABLE and reserved
        ):
            working += 1
        elif reach := visitor_channels(agent, presence, snapshot.can):
            available += 1
            channels.update(reach)

    scope = [site.branches[branch]] if branch is not None else list(site.branches.values())
    # A site without branches has no business hours to be closed by.
    is_open_now = not scope or any(is_open(b, now) for b in scope)
    return Availability(
        available=available > 0,
        channels=tuple(c for c in Channel if c in channels),
        agents_available=available,
        agents_working=working,
        estimated_wait_s=estimate_wait_s(queue_ahead, available, working, mean_handle_s),
        open=is_open_now,
        next_open_at=None if is_open_now else earliest_opening(scope, now),
        callbacks=snapshot.can.callbacks,
    )
