"""Browser calls across nodes: route, reserve, ring, accept, hang up, relay signals.

Every change to a call is a pure transition (gateway.core.call) applied with compare-and-set on
the stored version, so any node may move any call: the agent's node applies the accept, the
visitor's node the cancel, whichever node claims a ring timer applies the timeout. Agents are
reserved atomically in the store before they ring, so no agent rings for two visitors.
Notifications go through ``CallNotifier``, which the socket.io edge implements.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Protocol

from gateway.core import call as calls
from gateway.core.call import Call, CallChannel, CallError, CallRequest, CallState
from gateway.core.errors import Conflict, Forbidden, Invalid, NotFound, RateLimited
from gateway.core.model import PresenceRecord, Site
from gateway.core.ringing import RingingAgents, RingNote, ring_event, ring_over_event
from gateway.core.routing import (
    RankingCache,
    RouteRequest,
    RoutingSnapshot,
    availability,
    route,
)
from gateway.ops.tasks import TaskGroup
from gateway.services.presence_service import PresenceService, socket_device_id
from gateway.services.store_retry import UntilStored
from gateway.store.base import CallRow, Store
from gateway.wire.codec import Json, call_from_record, call_to_record, iso, ring_validity

log = logging.getLogger(__name__)

RING_TIMER = "ring"
VISITOR_GONE_TIMER = "visitor_gone"
AGENT_GONE_TIMER = "agent_gone"
# A visitor may start this many calls a minute (across nodes); one may be open at a time.
STARTS_PER_MINUTE = 5
# A connected call survives its visitor's socket dropping for this long: the audio flows
# peer to peer, and the widget reconnects and picks the call up again.
VISITOR_GRACE_S = 10.0
# The same for the agent's accepting socket: the agent app reconnects and resumes the call.
AGENT_GRACE_S = 10.0
# A reservation outlives its ring a little, so that a node that died mid-ring still frees
# the agent, but never before the ring timer has had its chance.
RESERVATION_GRACE_S = 10.0
# Once connected, the agent stays reserved until the call ends: presence says on_call too,
# but another node's copy of presence may lag, and only the reservation is atomic.
CALL_HOLD_S = 4 * 3600.0
# After a node missed other nodes' emits, it replays at most this many of each site's most
# recently changed calls to its sockets (CallService.replay_since).
REPLAY_LIMIT = 200
# Candidates offered to the store per reservation round trip (Store.reserve_first).
RESERVE_BATCH = 16
NO_AGENT_DETAIL = {
    "no_agents_online": "Nobody is online right now",
    "all_busy": "Everyone is busy right now",
    "closed": "We are closed right now",
    "no_agent_for_channel": "Nobody can take a browser call right now",
    "no_agent_answered": "Nobody could answer right now",
}


class CallbackHooks(Protocol):
    """What the call service hands over to the callback service (services.callback_service)."""

    async def after_accept(self, call: Call) -> None: ...

    async def requeue(self, call: Call) -> Call: ...

    async def after_end(self, before: Call, after: Call) -> None: ...


class CallNotifier(Protocol):
    async def call_update(self, call: Call, former_agent: str | None = None) -> None:
        """To the visitor, the call's agent (and ``former_agent``, whom the call just left)
        and the site's board."""

    async def ring(self, call: Call, payload: Json) -> None: ...

    async def ring_stop(self, call: Call, agent_id: str, reason: str) -> None: ...

    async def sent(self) -> None:
        """Returns once everything notified so far is on its way to every node: an agent
        released after it has heard her ring or call end before any new ring."""

    async def signal(self, call: Call, to_agent: bool, payload: Json) -> None: ...

    async def replay(self, call: Call, ring: Json | None, rings_over: dict[str, str]) -> None:
        """The call's current state to this node's own sockets only: ``call:ring_stop`` to
        each agent in ``rings_over`` (with its reason), ``call:ring`` to the agent when
        ``ring`` is given, and ``call:update`` to the visitor, the call's agent and the board.
        Each repeats what a socket may already have had, which clients take as no change."""


def ring_timer_id(call: Call) -> str:
    return f"{RING_TIMER}:{call.call_id}:{call.attempt}"


def ring_payload(
    ringing: Call, site: Site, reasons: tuple[str, ...], last_agent: str | None = None
) -> Json:
    """``call:ring`` for a call ringing its agent; ``last_agent``: who served the visitor
    last (browser calls)."""
    assert ringing.ring_expires_at is not None and ringing.agent_id is not None
    r = ringing.request
    visitor: Json = {"id": ringing.visitor_id, "language": r.language, "page": r.page}
    payload: Json = {
        "call_id": ringing.call_id,
        "channel": ringing.channel.value,
        "visitor": visitor,
        "expires_at": iso(ringing.ring_expires_at),
        "reasons": list(reasons),
        **ring_validity(ringing),
    }
    if ringing.channel is CallChannel.CALLBACK:
        visitor.update(returning=False, phone=ringing.phone)
        payload["your_phone"] = site.agents[ringing.agent_id].mobile
    else:
        last = site.agents.get(last_agent) if last_agent else None
        visitor.update(returning=last_agent is not None, last_agent=last.name if last else None)
    return payload


class CallService:
    def __init__(
        self,
        sites: dict[str, Site],
        store: Store,
        presence: PresenceService,
        notifier: CallNotifier,
        tasks: TaskGroup,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sites = sites
        self._until_stored = UntilStored(tasks, clock)
        self._store = store
        self._presence = presence
        self._notify = notifier
        self._clock = clock
        self.visitor_grace_s = VISITOR_GRACE_S
        self.agent_grace_s = AGENT_GRACE_S
        self._ranking = RankingCache()
        self.ringing = RingingAgents()
        """Who rings for a call anywhere (gateway.core.ringing): routing skips them without a
        store round trip, and the button does not promise them."""
        self.callbacks: CallbackHooks | None = None
        """Set by the app: PSTN callbacks share ringing and accepting with browser calls."""

    # --- reads -----------------------------------------------------------------------------------

    async def get(self, call_id: str) -> Call:
        call = await self.find(call_id)
        if call is None:
            raise NotFound(f"no call {call_id!r}")
        return call

    async def find(self, call_id: str) -> Call | None:
        row = await self._store.get_call(call_id)
        return None if row is None else call_from_record(row.data, row.version)

    async def update(
        self, call_id: str, transition: Callable[[Call], Call], current: Call | None = None
    ) -> tuple[Call, Call]:
        """Apply ``transition`` with compare-and-set, retrying when another node got there
        first; the transition sees the newest call each time and may refuse (CallError).

        ``current``, the call as this node just read or wrote it, saves the first read: if it
        is no longer the newest the write fails and the call is read again, and a refusal of
        it is checked against a fresh read, so the outcome is as if it had been read here."""
        for _ in range(8):
            if current is not None:
                before, current = current, None
                try:
                    after = replace(transition(before), version=before.version + 1)
                except CallError:
                    continue  # maybe stale: decide on the stored call
            else:
                before = await self.get(call_id)
                after = replace(transition(before), version=before.version + 1)
            row = CallRow(call_id, after.site, after.version, call_to_record(after))
            if await self._store.put_call(row):
                return before, after
        raise Conflict("the call is changing too fast; try again")

    # --- the visitor -----------------------------------------------------------------------------

    async def start(
        self, site_id: str, visitor_id: str, visitor_sid: str, request: CallRequest
    ) -> Call:
        site = self._presence.site(site_id)
        if request.branch is not None and request.branch not in site.branches:
            raise Invalid(f"no branch {request.branch!r}")
        # Independent reads in one round trip: each sequential one waits a turn of a busy
        # event loop, and they add up in the time until the agent's phone rings.
        # A refused start counts against the visitor's starts too: a flood is a flood.
        current, last_agent, allowed = await asyncio.gather(
            self._store.open_call(site_id, visitor_id),
            self._store.last_agent(site_id, visitor_id),
            self._store.hit(f"start:{site_id}:{visitor_id}", 60, STARTS_PER_MINUTE, self._clock()),
        )
        if current is not None:
            row = await self._store.get_call(current)
            if row is not None and not call_from_record(row.data, row.version).final:
                raise Conflict("you already have a call going", code="call_in_progress")
        if not allowed:
            raise RateLimited("too many calls started; wait a minute")
        call = calls.new_call(
            f"c_{uuid.uuid4().hex}",
            site_id,
            visitor_id,
            CallChannel.WEBRTC,
            request,
            self._clock(),
            visitor_sid,
        )
        call = replace(call, version=1)
        # Persisted before anything is promised to the visitor.
        await asyncio.gather(
            self._store.put_call(CallRow(call.call_id, site_id, 1, call_to_record(call))),
            self._store.set_open_call(site_id, visitor_id, call.call_id),
        )
        return await self._route(call, last_agent)

    async def resume(self, site_id: str, visitor_id: str, visitor_sid: str) -> Call | None:
        """A visitor's new socket takes over their live call, if they have one."""
        call_id = await self._store.open_call(site_id, visitor_id)
        if call_id is None:
            return None
        try:
            _, call = await self.update(
                call_id, lambda c: calls.reattach(c, site_id, visitor_id, visitor_sid)
            )
        except (CallError, Conflict, NotFound):
            return None
        return call

    async def visitor_left(
        self, site_id: str, visitor_id: str, visitor_sid: str, call_id: str, keep: bool = False
    ) -> None:
        """End a waiting call at once (an agent must not ring for nobody); give a connected
        one a grace period to come back on a new socket. ``keep``: the socket was closed by
        its node draining, not by the visitor, so a waiting call gets the grace period too.
        Nothing else would ever do it (the socket is gone), so a store outage only delays it:
        it is tried until the store is back."""
        await self.until_stored(
            partial(self._visitor_left, site_id, visitor_id, visitor_sid, call_id, keep),
            f"visitor-left:{call_id}",
        )

    async def _visitor_left(
        self, site_id: str, visitor_id: str, visitor_sid: str, call_id: str, keep: bool
    ) -> None:
        call = await self.find(call_id)
        if call is None or call.final or call.visitor_id != visitor_id:
            return
        if call.state is CallState.CONNECTED or keep:
            due = self._clock() + self.visitor_grace_s
            await self._store.schedule_timer(f"{VISITOR_GONE_TIMER}:{call_id}:{visitor_sid}", due)
            return
        try:
            await self.cancel(site_id, visitor_id, call_id, "visitor_left")
        except (Conflict, NotFound):
            pass  # ended meanwhile

    async def on_visitor_gone(self, call_id: str, visitor_sid: str) -> None:
        """The grace period ran out: end the call unless a new socket took it over."""
        call = await self.find(call_id)
        if call is None or call.final or call.visitor_sid != visitor_sid:
            return
        try:
            await self._end(call_id, "visitor_left", "The visitor's connection dropped")
        except (Conflict, NotFound):
            pass  # ended meanwhile

    async def cancel(self, site_id: str, visitor_id: str, call_id: str, reason: str) -> Call:
        call = await self.get(call_id)
        if call.site != site_id or call.visitor_id != visitor_id:
            raise NotFound(f"no call {call_id!r}")
        detail = "You ended the call" if reason == "visitor_hung_up" else "The visitor left"
        return await self._end(call_id, reason, detail, call)

    # --- the agent -------------------------------------------------------------------------------

    async def accept(self, site_id: str, agent_id: str, agent_sid: str, call_id: str) -> Call:
        seen = self._own(await self.get(call_id), site_id)
        now = self._clock()
        if seen.state is not CallState.RINGING or seen.agent_id != agent_id:
            raise Conflict("this call is not ringing for you", code="not_ringing")
        if calls.ring_over(seen, agent_id, now):
            # Answered after its end (it reached the agent late, or the timer runs behind):
            # end the ring now rather than when the timer gets to it.
            await self.on_ring_timeout(call_id, seen.attempt)
            raise Conflict("this ring has ended", code="ring_expired")
        # The agent must still be reserved for this call: a ring answered after its
        # reservation lapsed (a node far behind) may have been given to another call.
        if not await self._store.extend_reservation(site_id, agent_id, call_id, CALL_HOLD_S):
            raise Conflict("this ring has ended", code="ring_expired")
        try:
            _, call = await self.update(
                call_id, lambda c: calls.accept(c, agent_id, agent_sid, self._clock()), seen
            )
        except (CallError, Conflict, NotFound):
            await self._store.release_agent(site_id, agent_id, call_id)
            raise
        await self._presence.set_active_call(site_id, agent_id, call_id)
        # Other nodes' notes lapse as they see the agent go on_call: no event needed.
        self.ringing.end(site_id, agent_id, call_id)
        await self._store.finish_timer(f"{RING_TIMER}:{call_id}:{call.attempt}")
        await self._notify.ring_stop(call, agent_id, "answered")
        if call.channel is CallChannel.CALLBACK and self.callbacks is not None:
            await self.callbacks.after_accept(call)
        else:
            await self._notify.call_update(call)
        return call

    async def decline(self, site_id: str, agent_id: str, call_id: str) -> Call:
        self._own(await self.get(call_id), site_id)
        before, call = await self.update(
            call_id, lambda c: calls.decline(c, agent_id, self._clock())
        )
        await self._after_ring(before, call, agent_id, "declined")
        return await self._next(call)

    async def hangup(self, site_id: str, agent_id: str, call_id: str) -> Call:
        call = self._own(await self.get(call_id), site_id)
        if call.agent_id != agent_id:
            raise Forbidden("this is not your call")
        return await self._end(call_id, "agent_hung_up", "The agent ended the call", call)

    async def resume_agent(
        self, site_id: str, agent_id: str, agent_sid: str, call_id: str
    ) -> Call | None:
        """An agent's new socket takes over the connected browser call it names (its old
        socket dropped, or that socket's node drained), if the call is still this agent's."""
        try:
            call = self._own(await self.get(call_id), site_id)
            _, call = await self.update(
                call_id, lambda c: calls.reattach_agent(c, agent_id, agent_sid), call
            )
        except (CallError, Conflict, NotFound):
            return None
        return call

    async def missed_ring(self, site_id: str, agent_id: str) -> Json | None:
        """The ``call:ring`` of a call ringing the agent now, for a socket that connected
        after it went out (the agent app reconnecting, e.g. from a draining node)."""
        call_id = self.ringing.ringing_for(site_id, agent_id)
        if call_id is None:
            return None
        call = await self.find(call_id)
        if (
            call is None
            or call.state is not CallState.RINGING
            or call.agent_id != agent_id
            or call.ring_expires_at is None
            or call.ring_expires_at <= self._clock()
        ):
            return None
        last_agent = None
        if call.channel is CallChannel.WEBRTC:
            last_agent = await self._store.last_agent(site_id, call.visitor_id)
        return ring_payload(call, self._sites[site_id], calls.ring_reasons(call), last_agent)

    async def agent_devices_lapsed(
        self, site_id: str, agent_id: str, record: PresenceRecord
    ) -> None:
        """The agent's node died mid-call (its socket's lease lapsed, so no disconnect handler
        ran): end the call, or the agent would stay on_call and never be routed again. This
        node alone claimed the lapse, so nothing else would: a store outage only delays it."""
        if record.active_call is None:
            return
        live = frozenset(d.device_id for d in record.devices)
        await self.until_stored(
            partial(self._agent_devices_lapsed, site_id, agent_id, record.active_call, live),
            f"agent-lapsed:{record.active_call}",
        )

    async def _agent_devices_lapsed(
        self, site_id: str, agent_id: str, call_id: str, live: frozenset[str]
    ) -> None:
        call = await self.find(call_id)
        if call is not None and not call.final:
            if call.agent_sid is not None and socket_device_id(call.agent_sid) not in live:
                # The socket has been gone for a whole lease, longer than the grace period.
                await self.on_agent_gone(call.call_id, call.agent_sid)
            return
        # Ended (or gone) elsewhere, or by an earlier try of this step that the store cut
        # short once the end was stored: the agent is freed as the end would have freed her.
        # The reservation goes only while it names this call; the active call is read
        # first, since a retry may come after she took another call on another node.
        await self._store.release_agent(site_id, agent_id, call_id)
        if (await self._store.get_presence(site_id, agent_id)).active_call == call_id:
            await self._presence.set_active_call(site_id, agent_id, None)

    async def agent_left(
        self, site_id: str, agent_id: str, agent_sid: str, call_ids: set[str]
    ) -> None:
        """An agent's socket closed: the browser calls it was talking on get a grace period
        to be taken over by a new socket (``resume_agent``), as a visitor's do, and end when
        it runs out. A callback's audio is on the agent's phone, which does not care about
        the tab. As for a visitor, a store outage only delays it."""
        due = self._clock() + self.agent_grace_s
        for call_id in call_ids:
            await self.until_stored(
                partial(self._agent_left, agent_sid, call_id, due), f"agent-left:{call_id}"
            )

    async def _agent_left(self, agent_sid: str, call_id: str, due: float) -> None:
        call = await self.find(call_id)
        if call is None or call.final or call.channel is CallChannel.CALLBACK:
            return
        if call.agent_sid != agent_sid:
            return
        await self._store.schedule_timer(f"{AGENT_GONE_TIMER}:{call_id}:{agent_sid}", due)

    async def on_agent_gone(self, call_id: str, agent_sid: str) -> None:
        """The grace period ran out: end the call unless a new socket took it over (or it is
        a callback, whose audio is on the agent's phone)."""
        call = await self.find(call_id)
        if call is None or call.final or call.channel is CallChannel.CALLBACK:
            return
        if call.agent_sid != agent_sid:
            return
        try:
            await self._end(call_id, "agent_left", "The agent's connection dropped", call)
        except (Conflict, NotFound):
            pass  # ended meanwhile

    async def until_stored(self, step: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``step``, which must be idempotent; while the store is unreachable, run it
        again in the background with backoff, instead of losing it with the error."""
        await self._until_stored(step, name)

    # --- signaling -------------------------------------------------------------------------------

    async def relay_signal(
        self, site_id: str, sender_id: str, sender_sid: str, from_agent: bool, payload: Json
    ) -> None:
        """Pass an SDP or ICE message to the other party of a connected call, and to no one
        else: the sender must be that call's visitor, or its agent on the accepting socket."""
        call = await self.get(payload["call_id"])
        if call.site != site_id:
            raise NotFound(f"no call {call.call_id!r}")
        if from_agent:
            allowed = call.agent_id == sender_id and call.agent_sid == sender_sid
        else:
            allowed = call.visitor_id == sender_id
        if not allowed:
            raise Forbidden("not a party to this call")
        if call.state is not CallState.CONNECTED:
            raise Conflict("signals flow only in a connected call", code="not_connected")
        if call.channel is not CallChannel.WEBRTC:
            raise Conflict("this call's audio is on the phone network", code="not_connected")
        await self._notify.signal(call, to_agent=not from_agent, payload=payload)

    # --- timers ----------------------------------------------------------------------------------

    async def on_ring_timeout(self, call_id: str, attempt: int) -> None:
        now = self._clock()
        try:
            before, call = await self.update(call_id, lambda c: calls.ring_timeout(c, attempt, now))
        except (CallError, Conflict, NotFound):
            return  # the call moved on (answered, declined, ended) or is gone
        assert before.agent_id is not None
        await self._after_ring(before, call, before.agent_id, "no_answer")
        await self._next(call)

    # --- internals -------------------------------------------------------------------------------

    def _own(self, call: Call, site_id: str) -> Call:
        if call.site != site_id:
            raise NotFound(f"no call {call.call_id!r}")
        return call

    def note_ring(self, site_id: str, agent_id: str, call_id: str, until: float) -> RingNote:
        """The agent rings for ``call_id`` until ``until`` at the latest: noted on this node at
        once, so that a concurrent route here skips them; ``announce_ring`` tells the rest."""
        seen = self._presence.snapshot(site_id).get(agent_id)
        note = RingNote(call_id, until, seen.rev if seen is not None else -1)
        self.ringing.start(site_id, agent_id, note)
        return note

    async def announce_ring(self, site_id: str, agent_id: str, note: RingNote) -> None:
        await self._store.publish(ring_event(site_id, agent_id, note))

    async def _after_ring(self, before: Call, call: Call, agent_id: str, reason: str) -> None:
        self.ringing.end(call.site, agent_id, call.call_id)
        # The agent's sockets are told the ring is over before she is released: a new ring,
        # which needs her reservation, then reaches every node after the stop, never before.
        await self._notify.ring_stop(call, agent_id, reason)
        await self._notify.call_update(call)
        await self._notify.sent()
        # The reservation is gone before other nodes hear the ring is, and route to her.
        await self._store.release_agent(call.site, agent_id, call.call_id)
        await self._store.publish(ring_over_event(call.site, agent_id, call.call_id))
        await self._store.finish_timer(ring_timer_id(before))

    async def _next(self, call: Call) -> Call:
        """After a decline or a ring timeout: ring the next agent (a browser call) or go back
        in line (a callback, which waits for someone instead of failing)."""
        if call.channel is CallChannel.CALLBACK and self.callbacks is not None:
            return await self.callbacks.requeue(call)
        return await self._route(call, await self._store.last_agent(call.site, call.visitor_id))

    async def end_call(self, call_id: str, reason: str, detail: str) -> Call:
        return await self._end(call_id, reason, detail)

    async def _end(
        self, call_id: str, reason: str, detail: str, current: Call | None = None
    ) -> Call:
        before, call = await self.update(
            call_id, lambda c: calls.end(c, reason, detail, self._clock()), current
        )
        if call.channel is CallChannel.CALLBACK and self.callbacks is not None:
            if before.agent_id is not None and before.state is CallState.RINGING:
                await self._after_ring(before, call, before.agent_id, reason)
            else:
                await self._notify.call_update(call)
            await self.callbacks.after_end(before, call)
            return call
        if before.agent_id is not None:
            if before.state is CallState.RINGING:
                # The call has ended: the agent's ring must stop and her reservation go, even
                # when the store fails right after (each step can be done twice).
                await self.until_stored(
                    partial(self._after_ring, before, call, before.agent_id, reason),
                    f"ring-over:{call_id}",
                )
                return call
            if before.state is CallState.CONNECTED:
                # As for a ring: the agent hears the call ended before anyone may ring her.
                await self._notify.call_update(call)
                await self._notify.sent()
                await self._store.release_agent(call.site, before.agent_id, call.call_id)
                await self._presence.set_active_call(call.site, before.agent_id, None)
                await self._store.record_served(call.site, call.visitor_id, before.agent_id)
                return call
        await self._notify.call_update(call)
        return call

    async def replay_since(self, since: float) -> None:
        """This node heard no other node's emits from about ``since`` (its socket.io listener
        lost Redis): tell its own sockets where each call that changed since then stands, as
        the emits they missed would have (pub/sub does not keep them)."""
        for site_id in self._sites:
            # Oldest first, as the emits would have come.
            for row in reversed(await self._store.list_calls(site_id, REPLAY_LIMIT)):
                call = call_from_record(row.data, row.version)
                if calls.last_changed(call) < since:
                    continue
                ring = None
                if call.channel is CallChannel.WEBRTC and call.state is CallState.RINGING:
                    last_agent = await self._store.last_agent(call.site, call.visitor_id)
                    ring = ring_payload(
                        call, self._sites[site_id], calls.ring_reasons(call), last_agent
                    )
                over = calls.rings_over(call) if call.channel is CallChannel.WEBRTC else {}
                await self._notify.replay(call, ring, over)

    async def _route(self, call: Call, last_agent: str | None) -> Call:
        """Ring the best free agent, reserving them first; with no one left, end the browser
        call and offer a callback with an honest wait. ``last_agent``: the visitor's (the
        caller reads it, alongside its own reads)."""
        site = self._sites[call.site]
        now = self._clock()
        presence = self._presence.snapshot(call.site)
        snapshot = RoutingSnapshot(
            site=site,
            presence=presence,
            reserved=self.ringing.current(call.site, presence, now),
            last_agent=last_agent,
        )
        r = call.request
        request = RouteRequest(
            site_id=call.site,
            visitor_id=call.visitor_id,
            channel=call.media_channel,
            language=r.language,
            branch=r.branch,
            location=r.location,
            skills=r.skills,
            exclude=frozenset(call.tried),
        )
        ttl = site.ring_timeout_s + RESERVATION_GRACE_S
        ranked = self._ranking.candidates(snapshot, request, now)
        # The candidates are tried in order, a batch per round trip: the first one free is
        # reserved; the others are ringing for someone else (another node got there first).
        while batch := list(itertools.islice(ranked, RESERVE_BATCH)):
            chosen = await self._store.reserve_first(
                call.site, [c.agent_id for c in batch], call.call_id, ttl
            )
            if chosen is None:
                continue
            candidate = next(c for c in batch if c.agent_id == chosen)
            agent = site.agents[candidate.agent_id]
            note = self.note_ring(call.site, agent.agent_id, call.call_id, now + ttl)
            branch = site.branches.get(agent.branch) if agent.branch else None
            who = f"{agent.name} in {branch.name}" if branch else agent.name
            try:
                _, ringing = await self.update(
                    call.call_id,
                    partial(
                        calls.ring,
                        agent_id=agent.agent_id,
                        who=who,
                        reasons=candidate.reasons,
                        now=now,
                        ring_timeout_s=site.ring_timeout_s,
                    ),
                    call,
                )
            except (CallError, Conflict, NotFound):
                self.ringing.end(call.site, agent.agent_id, call.call_id)
                await self._store.release_agent(call.site, agent.agent_id, call.call_id)
                return await self.get(call.call_id)  # canceled meanwhile
            assert ringing.ring_expires_at is not None
            await self._notify.ring(
                ringing, ring_payload(ringing, site, candidate.reasons, last_agent)
            )
            assert ringing.ring_expires_at is not None
            # The ring goes out before its timeout is stored, a round trip sooner. Should the
            # node die in between, the reservation lapses as it would have a moment later; a
            # timer stored after an accept finds the call answered and does nothing.
            await asyncio.gather(
                self._store.schedule_timer(ring_timer_id(ringing), ringing.ring_expires_at),
                self._notify.call_update(ringing),
                self.announce_ring(call.site, agent.agent_id, note),
            )
            return ringing
        # Nobody could be reserved: the full ranking says why (closed, nobody online, ...).
        decision = route(snapshot, request, now)
        reason = "no_agent_answered" if call.tried else (decision.reason or "all_busy")
        wait = availability(snapshot, now, language=r.language).estimated_wait_s
        try:
            _, failed = await self.update(
                call.call_id,
                lambda c: calls.no_agent(c, reason, NO_AGENT_DETAIL.get(reason, reason), wait, now),
            )
        except (CallError, Conflict, NotFound):
            return await self.get(call.call_id)
        await self._notify.call_update(failed)
        return failed
