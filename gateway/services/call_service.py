"""The browser call: a visitor's widget calls an agent's app over WebRTC. Route to the best
free agent, reserve, ring, the next agent on a decline or a ring that runs out, a grace period
for a socket that drops, and the signals between the two browsers.

A flow over ``CallRecords`` (gateway.services.call_records), which applies every transition
with compare-and-set; the paths shared with other channels (accept, decline, end) call back
into this flow through the records' registry (``CallFlow``).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

from gateway.core import agent_ring as ar
from gateway.core import call as calls
from gateway.core.availability import availability
from gateway.core.call import Call, CallChannel, CallRequest, CallState
from gateway.core.errors import Conflict, Invalid, NotFound, RateLimited
from gateway.core.model import Channel, Site
from gateway.core.ranking_cache import RankingCache
from gateway.core.ringing import RingingAgents
from gateway.core.routing import (
    Capabilities,
    RoutingPolicy,
    RoutingSnapshot,
    capabilities,
    route,
)
from gateway.services.audio_bridge import AudioBridge
from gateway.services.call_records import (
    AGENT_GRACE_S,
    RESERVATION_GRACE_S,
    CallRecords,
    TimerHandler,
    TimerId,
    TimerKind,
)
from gateway.services.mobile_ring import MobileRing
from gateway.telephony import AgentInstruction
from gateway.wire.codec import Json

# A visitor may start this many calls a minute (across nodes); one may be open at a time.
STARTS_PER_MINUTE = 5
# A connected call survives its visitor's socket dropping for this long: the audio flows
# peer to peer, and the widget reconnects and picks the call up again.
VISITOR_GRACE_S = 10.0
# Candidates offered to the store per reservation round trip (Store.reserve_first).
RESERVE_BATCH = 16
NO_AGENT_DETAIL = {
    "no_agents_online": "Nobody is online right now",
    "all_busy": "Everyone is busy right now",
    "closed": "We are closed right now",
    "no_agent_for_channel": "Nobody can take a browser call right now",
    "no_agent_answered": "Nobody could answer right now",
}


class CallService:
    channel = CallChannel.WEBRTC

    def __init__(self, records: CallRecords) -> None:
        self._records = records
        self._store = records.store
        self._notify = records.notify
        self.visitor_grace_s = VISITOR_GRACE_S
        self.agent_grace_s = AGENT_GRACE_S
        self._ranking = RankingCache()
        self.devices: MobileRing | None = None
        """Rings agents on their phones; set by the app when a telephony provider can."""
        self.bridge = AudioBridge(records)
        """The audio bridge to an agent's phone; enabled by the app with media workers."""

    def can(self, site: Site) -> Capabilities:
        """What this node can carry for ``site``'s browser calls: an agent's phone too, with
        phones to ring and the audio bridge."""
        return capabilities(
            site, self.devices is not None and self.devices.phones is not None, self.bridge.enabled
        )

    @property
    def records(self) -> CallRecords:
        return self._records

    @property
    def ringing(self) -> RingingAgents:
        """Who rings for a call anywhere (shared by every flow: ``CallRecords.ringing``)."""
        return self._records.ringing

    def timers(self) -> Mapping[TimerKind, TimerHandler]:
        return {
            TimerKind.VISITOR_GONE: self._on_visitor_gone_timer,
            TimerKind.AGENT_GONE: self._on_agent_gone_timer,
        }

    async def get(self, call_id: str) -> Call:
        return await self._records.get(call_id)

    async def until_stored(self, step: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``step``, which must be idempotent; while the store is unreachable, run it
        again in the background with backoff, instead of losing it with the error."""
        await self._records.until_stored(step, name)

    # --- the visitor -----------------------------------------------------------------------------

    async def start(
        self, site_id: str, visitor_id: str, visitor_sid: str, request: CallRequest
    ) -> tuple[Call, str]:
        """Store and route a visitor's call; returns it and its ticket's status token."""
        site = self._records.presence.site(site_id)
        if request.branch is not None and request.branch not in site.branches:
            raise Invalid(f"no branch {request.branch!r}")
        # Independent reads in one round trip: each sequential one waits a turn of a busy
        # event loop, and they add up in the time until the agent's phone rings.
        # A refused start counts against the visitor's starts too: a flood is a flood.
        now = self._records.clock()
        current, last_agent, allowed = await asyncio.gather(
            self._store.open_call_row(site_id, visitor_id),
            self._store.last_agent(site_id, visitor_id),
            self._store.hit_start_limit(site_id, visitor_id, 60, STARTS_PER_MINUTE, now),
        )
        if current is not None and not self._records.from_row(current).final:
            raise Conflict("you already have a call going", code="call_in_progress")
        if not allowed:
            raise RateLimited("too many calls started; wait a minute")
        call_id = f"c_{uuid.uuid4().hex}"
        token, token_hash = self._records.status_tokens.for_call(call_id)
        call = calls.new_call(
            call_id,
            site_id,
            visitor_id,
            CallChannel.WEBRTC,
            request,
            self._records.clock(),
            visitor_sid,
            token_hash,
        )
        # Enrolled before it is ranked: an experiment's arm may choose how it is routed.
        call = await self._records.enroll(call)
        return await self._route(call, last_agent, new=True), token

    async def resume(self, site_id: str, visitor_id: str, visitor_sid: str) -> Call | None:
        """A visitor's new socket takes over their live call, if they have one."""
        call_id = await self._store.open_call(site_id, visitor_id)
        if call_id is None:
            return None
        try:
            _, call = await self._records.update(
                call_id, lambda c: calls.reattach(c, site_id, visitor_id, visitor_sid)
            )
        except (Conflict, NotFound):
            return None
        return call

    async def ended_call_of(self, site_id: str, visitor_id: str, call_id: str) -> Call | None:
        """The visitor's own call ``call_id`` if it has ended (for a widget that was away when
        it did); None for anyone else's call, an open one, or none."""
        call = await self._records.find(call_id)
        if call is None or not call.final:
            return None
        return call if (call.site, call.visitor_id) == (site_id, visitor_id) else None

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
        call = await self._records.find(call_id)
        if call is None or call.final or call.visitor_id != visitor_id:
            return
        if call.state is CallState.CONNECTED or keep:
            due = self._records.clock() + self.visitor_grace_s
            await self._records.schedule(TimerId(TimerKind.VISITOR_GONE, call_id, visitor_sid), due)
            return
        try:
            await self.cancel(site_id, visitor_id, call_id, "visitor_left")
        except (Conflict, NotFound):
            pass

    async def _on_visitor_gone_timer(self, timer: TimerId) -> None:
        await self.on_visitor_gone(timer.call_id, timer.key)

    async def on_visitor_gone(self, call_id: str, visitor_sid: str) -> None:
        """The grace period ran out: end the call unless a new socket took it over."""
        call = await self._records.find(call_id)
        if call is None or call.final or call.visitor_sid != visitor_sid:
            return
        try:
            await self._records.end(call_id, "visitor_left", "The visitor's connection dropped")
        except (Conflict, NotFound):
            pass

    async def cancel(self, site_id: str, visitor_id: str, call_id: str, reason: str) -> Call:
        call = await self._records.get(call_id)
        if call.site != site_id or call.visitor_id != visitor_id:
            raise NotFound(f"no call {call_id!r}")
        detail = "You ended the call" if reason == "visitor_hung_up" else "The visitor left"
        return await self._records.end(call_id, reason, detail, call)

    async def relay_signal(
        self, site_id: str, sender_id: str, sender_sid: str, from_agent: bool, payload: Json
    ) -> None:
        await self._records.relay_signal(site_id, sender_id, sender_sid, from_agent, payload)

    # --- the agent (CallFlow: asked by the shared paths) -----------------------------------------

    async def accepted(self, call: Call) -> None:
        await self._notify.call_update(call)

    async def ring_missed(self, call: Call) -> Call:
        """After a decline or a ring timeout: ring the next agent (a ring on a phone is hung
        up first)."""
        if ar.has_leg(call) and self.devices is not None:
            await self.devices.ring_missed(call)
        return await self._route(call, await self._store.last_agent(call.site, call.visitor_id))

    async def ended(self, before: Call, after: Call, reason: str) -> None:
        if before.agent_id is not None:
            if before.state is CallState.RINGING:
                # The call has ended: the agent's ring must stop and her reservation go, even
                # when the store fails right after (each step can be done twice).
                await self.until_stored(
                    partial(self._records.ring_over, before, after, before.agent_id, reason),
                    f"ring-over:{after.call_id}",
                )
                await self._phone_over(before, after)
                return
            if before.state is CallState.CONNECTED:
                # As for a ring: the agent hears the call ended before anyone may ring her.
                await self._notify.call_update(after)
                await self._notify.sent()
                await self._records.free_agent(
                    after.site,
                    before.agent_id,
                    after.call_id,
                    self._store.record_served(after.site, after.visitor_id, before.agent_id),
                )
                await self._phone_over(before, after)
                return
        await self._notify.call_update(after)

    async def _phone_over(self, before: Call, after: Call) -> None:
        """An agent on their phone: the leg is hung up, and the call's audio session closed."""
        if self.devices is not None and ar.has_leg(before):
            await self.devices.call_over(before, after)
        await self.bridge.call_over(before)

    async def ring_payload(self, call: Call) -> Json:
        last_agent = await self._store.last_agent(call.site, call.visitor_id)
        reasons = calls.ring_reasons(call)
        return self._records.ring_payload(call, reasons, self._returning(call, last_agent))

    def _returning(self, call: Call, last_agent: str | None) -> Json:
        """``last_agent``: who served the visitor last."""
        last = self._records.sites[call.site].agents.get(last_agent) if last_agent else None
        return {"returning": last_agent is not None, "last_agent": last.name if last else None}

    async def replay(self, call: Call) -> tuple[Json | None, dict[str, str]]:
        ring = await self.ring_payload(call) if call.state is CallState.RINGING else None
        return ring, calls.rings_over(call)

    async def agent_left(self, call: Call, agent_sid: str, left_at: float) -> None:
        """The agent app reconnects and takes the call over (``CallDesk.resume_agent``) within
        a grace period, as a visitor's widget does; else the call ends."""
        timer = TimerId(TimerKind.AGENT_GONE, call.call_id, agent_sid)
        await self._records.schedule(timer, left_at + self.agent_grace_s)

    async def _on_agent_gone_timer(self, timer: TimerId) -> None:
        await self.agent_gone(timer.call_id, timer.key)

    async def agent_gone(self, call_id: str, agent_sid: str) -> None:
        """The grace period ran out (or the agent's node died): end the call unless a new
        socket took it over."""
        call = await self._records.find(call_id)
        if call is None or call.final or call.agent_sid != agent_sid:
            return
        if call.channel is CallChannel.WEBRTC and call.media is not None:
            return  # she talks on her phone: its leg's end ends the call, not a socket's
        try:
            await self._records.end(call_id, "agent_left", "The agent's connection dropped", call)
        except (Conflict, NotFound):
            pass  # ended meanwhile

    async def signal(self, call: Call, to_agent: bool, payload: Json) -> None:
        if to_agent and call.media is not None:
            await self.bridge.from_browser(call, payload)  # the agent is on their phone
            return
        await self._notify.signal(call, to_agent=to_agent, payload=payload)

    async def phone_accepts(
        self, call: Call, accept: Callable[[], Awaitable[Call]]
    ) -> AgentInstruction:
        """The agent took the call on their phone: the visitor's audio is bridged to it."""
        return await self.bridge.phone_accepts(call, accept)

    async def held(self, call: Call, on: bool) -> None:
        """The agent app holds a browser call itself (microphone and speaker off)."""
        await self.bridge.hold(call, on)

    async def phone_leg_ended(self, call: Call) -> None:
        async def hung_up() -> None:
            await self._records.end(call.call_id, "agent_hung_up", "The agent ended the call")

        await self.bridge.phone_leg_ended(call, hung_up)

    async def ring_details(self, call: Call, agent_id: str) -> tuple[Json, Json | None]:
        return self._returning(call, await self._store.last_agent(call.site, call.visitor_id)), None

    # --- routing ---------------------------------------------------------------------------------

    async def _route(self, call: Call, last_agent: str | None, new: bool = False) -> Call:
        """Ring the best free agent, reserving them first; with no one left, end the browser
        call and offer a callback with an honest wait. ``last_agent``: the visitor's (the
        caller reads it, alongside its own reads). ``new``: the call is not stored yet
        (``_create_reserving``)."""
        records = self._records
        site = records.sites[call.site]
        # Before the snapshot: asking may wait on the store (at most every 2 s).
        policy, scores = (
            await records.experiments.routing(call)
            if records.experiments is not None and call.experiment is not None
            else (RoutingPolicy.DEFAULT, {})
        )
        now = records.clock()
        presence = records.presence.snapshot(call.site)
        can = self.can(site)
        snapshot = RoutingSnapshot(
            site=site,
            presence=presence,
            reserved=records.ringing.current(call.site, presence, now),
            last_agent=last_agent,
            can=can,
            scores=scores,
        )
        reach = (Channel.WEBRTC, Channel.PSTN) if can.bridge else ()
        request = calls.route_request(call, call.media_channel, agent_channels=reach, policy=policy)
        ttl = site.ring_timeout_s + RESERVATION_GRACE_S
        ranked = self._ranking.candidates(snapshot, request, now)
        batch = list(itertools.islice(ranked, RESERVE_BATCH))
        if new:
            # Persisted before anything is promised to the visitor, in the same write to the
            # store as the first reservation: one round trip, not two, before the ring.
            call, chosen = await self._create_reserving(call, [c.agent_id for c in batch], ttl)
        else:
            chosen = await self._store.reserve_first(
                call.site, [c.agent_id for c in batch], call.call_id, ttl
            )
        # The candidates are tried in order, a batch per round trip: the first one free is
        # reserved; the others are ringing for someone else (another node got there first).
        while chosen is None and batch:
            batch = list(itertools.islice(ranked, RESERVE_BATCH))
            chosen = await self._store.reserve_first(
                call.site, [c.agent_id for c in batch], call.call_id, ttl
            )
        if chosen is not None:
            candidate = next(c for c in batch if c.agent_id == chosen)
            visitor = self._returning(call, last_agent)
            if candidate.channel is Channel.PSTN and self.devices is not None:
                ringing = await self.devices.ring(
                    call, chosen, candidate.channel, candidate.reasons, now, visitor
                )
            else:
                ringing = await records.ring(call, chosen, candidate.reasons, now, visitor)
            if ringing is None:
                return await records.get(call.call_id)  # canceled meanwhile
            return ringing
        # Nobody could be reserved: the full ranking says why (closed, nobody online, ...).
        decision = route(snapshot, request, now)
        reason = "no_agent_answered" if call.tried else (decision.reason or "all_busy")
        wait = availability(snapshot, now, language=call.request.language).estimated_wait_s
        try:
            _, failed = await records.update(
                call.call_id,
                lambda c: calls.no_agent(c, reason, NO_AGENT_DETAIL.get(reason, reason), wait, now),
            )
        except (Conflict, NotFound):
            return await records.get(call.call_id)
        await self._notify.call_update(failed)
        return failed

    async def _create_reserving(
        self, call: Call, agent_ids: list[str], ttl_s: float
    ) -> tuple[Call, str | None]:
        """Store the new ``call`` as the visitor's open call and reserve the first free of
        ``agent_ids`` for it, the three in one write; the call stored, and whom it reserved.

        Their order does not matter: nothing reads a reservation but the writes that check
        it names their own call. Should any of the three fail, the visitor is told so (the
        call may be stored, as a create whose answer was lost would be), and what the call
        may have reserved is let go, once the store answers, rather than held for its TTL."""
        site, visitor_id, call_id = call.site, call.visitor_id, call.call_id
        stored, opened, chosen = await asyncio.gather(
            self._records.create(call),
            self._store.set_open_call(site, visitor_id, call_id),
            self._store.reserve_first(site, agent_ids, call_id, ttl_s),
            return_exceptions=True,
        )
        failed = next((r for r in (stored, opened, chosen) if isinstance(r, BaseException)), None)
        if failed is None:
            assert isinstance(stored, Call) and not isinstance(chosen, BaseException)
            return stored, chosen
        held = agent_ids if isinstance(chosen, BaseException) else [chosen] if chosen else []
        if held:
            release = partial(self._release_all, site, held, call_id)
            self._records.until_stored_soon(release, f"unreserve:{call_id}")
        raise failed

    async def _release_all(self, site: str, agent_ids: list[str], call_id: str) -> None:
        await asyncio.gather(*(self._store.release_agent(site, a, call_id) for a in agent_ids))
