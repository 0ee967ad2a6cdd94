"""Follow-ups by the same person: at the end of a call, its agent promises to call the
customer back ("Thursday at 10, with the answer"). That is a scheduled callback pinned to
her, on the customer's same ticket.

When its time comes and she is not free, the site's policy decides (``follow_up_policy``):

- ``wait``: only she is rung, for up to ``follow_up_wait_s``; then a colleague;
- ``colleague``: a colleague at once.

A colleague is an agent of her branch (anyone, if she has none). Either way the customer is
told (timeline ``waiting_for_agent``, ``colleague``), and whoever is rung sees her note.

Pure, like gateway.core.callback: the flow (gateway/services/follow_ups.py) stores and
routes.
"""

from __future__ import annotations

from dataclasses import replace

from gateway.core import callback as cb
from gateway.core.call import Call, CallError, CallRequest, CallState, TimelineEntry
from gateway.core.model import FollowUpPolicy, Site

MAX_NOTE_CHARS = 500
PROMISE_WINDOW_S = 86_400.0
"""An agent may promise a follow-up while the call lasts and up to this long after it."""


def check_promisable(call: Call, agent_id: str, now: float) -> None:
    """Raises why ``agent_id`` may not promise a follow-up of ``call``, if she may not: only
    its agent, once it connected, while it lasts or for a day after (and once: ``promised``)."""
    if call.agent_id != agent_id or call.connected_at is None:
        raise CallError("not_your_call", "only the agent who talked may promise a follow-up")
    if call.state not in (CallState.CONNECTED, CallState.COMPLETED):
        raise CallError("invalid_state", f"a {call.state} call has no follow-up")
    if call.ended_at is not None and now - call.ended_at > PROMISE_WINDOW_S:
        raise CallError("too_late", "promise a follow-up within a day of the call")


def pinned_until(at: float, policy: FollowUpPolicy, wait_s: float) -> float:
    """Until when only the promising agent may take it."""
    return at + wait_s if policy is FollowUpPolicy.WAIT else at


def new_follow_up(
    call_id: str,
    original: Call,
    phone: str,
    at: float,
    note: str,
    until: float,
    now: float,
) -> Call:
    """The follow-up callback: on the customer's same ticket (its token opens both; the
    ticket is the first call's, ``follow_up_of``), pinned to the agent until ``until``."""
    assert original.agent_id is not None and original.token_hash is not None
    callback = cb.new_callback(
        call_id,
        original.site,
        original.visitor_id,
        phone,
        original.token_hash,
        CallRequest(language=original.request.language, branch=original.request.branch),
        now,
        at,
        at,
        "We'll call you back at the time agreed",
    )
    return replace(
        callback,
        follow_up_of=original.follow_up_of or original.call_id,
        pinned_agent=original.agent_id,
        pinned_until=until,
        note=note,
    )


def promised(call: Call, follow_up_id: str, at: float, now: float) -> Call:
    """The call's ticket now names its follow-up (a second promise of the same one, after a
    node died between the two writes, only moves its time)."""
    if call.follow_up not in (None, follow_up_id):
        raise CallError("follow_up_exists", "this call has a follow-up already")
    entry = TimelineEntry(now, "follow_up", "We'll call you back at the time agreed")
    timeline = call.timeline if call.follow_up is not None else (*call.timeline, entry)
    return replace(call, follow_up=follow_up_id, follow_up_at=at, timeline=timeline)


def handed_over(call: Call) -> bool:
    """The follow-up went to a colleague (told, in its timeline)."""
    return any(e.event == "colleague" for e in call.timeline)


def allowed_agents(call: Call, site: Site, now: float) -> frozenset[str] | None:
    """Who may take the follow-up ``call`` now: only its agent until ``pinned_until``, then
    her branch (her included); None: anyone (not a follow-up, or she has no branch)."""
    pinned = call.pinned_agent
    if pinned is None:
        return None
    if call.pinned_until is None or now < call.pinned_until:
        return frozenset({pinned})
    agent = site.agents.get(pinned)
    if agent is None or agent.branch is None:
        return None
    return frozenset(a.agent_id for a in site.agents.values() if a.branch == agent.branch)


def waiting_for_agent(call: Call, name: str, now: float) -> Call:
    """Her time came and she is not free: the customer is told we wait for her (once)."""
    if any(e.event == "waiting_for_agent" for e in call.timeline):
        return call
    return replace(
        call,
        timeline=(
            *call.timeline,
            TimelineEntry(now, "waiting_for_agent", f"{name} isn't free yet; we'll wait a little"),
        ),
    )


def to_colleague(call: Call, name: str, now: float) -> Call:
    """She is not free and may no longer be waited for: a colleague of her branch calls
    (once), with her note."""
    if handed_over(call):
        return call
    detail = f"{name} isn't free, so a colleague will call you; they have {name}'s notes"
    return replace(call, timeline=(*call.timeline, TimelineEntry(now, "colleague", detail)))


def shown_agent(call: Call) -> str | None:
    """The agent the customer is told will call: the one rung or talking, else, while the
    follow-up is hers, the promising agent."""
    if call.agent_id is not None:
        return call.agent_id
    if call.pinned_agent is not None and not handed_over(call) and not call.final:
        return call.pinned_agent
    return None
