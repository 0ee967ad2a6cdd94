"""PSTN callbacks: accept a request, wait for its time and a free agent, ring the agent (agent
first), have the visitor dialed once (gateway.services.callback_dialing), retry by the site's
policy, and keep the visitor's ticket.

A flow over ``CallRecords`` (gateway.services.call_records). Everything a callback waits for
is a durable, leased timer in the store, so any node may run any step and a node that dies
mid-step leaves it to another:

- ``cbdue:{call_id}:{dials}:{rings}`` -- the callback should find an agent now (its time
  came, a retry is due, an agent declined). While nobody is free it polls by rescheduling
  itself. Only the first callbacks in the site's queue may take the free agents.
- ``cbdial`` and ``cbwatch``: the dial attempts (gateway.services.callback_dialing).

Who may book a callback, and for when, is a pure function (gateway.core.callback_admission);
the transitions are pure (gateway.core.callback); the number rules are pure
(gateway.core.phone_policy); the provider sits behind gateway.telephony.
"""

from __future__ import annotations

import math
import statistics
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import NamedTuple

from gateway.core import call as calls
from gateway.core import callback as cb
from gateway.core import follow_up as fu
from gateway.core.availability import DEFAULT_MEAN_HANDLE_S, estimate_wait_s
from gateway.core.call import Call, CallChannel, CallError, CallState
from gateway.core.callback_admission import (
    MAX_AHEAD_S,
    CallbackAsk,
    Refusal,
    Subject,
    admit,
    callable_at,
    hours_scope,
    next_opening,
    open_at,
    time_refusal,
)
from gateway.core.errors import (
    Conflict,
    DomainError,
    Invalid,
    NotFound,
    RateLimited,
    Refused,
    Unavailable,
)
from gateway.core.hours import slot_starts
from gateway.core.model import Channel, Site
from gateway.core.phone_policy import CheckedNumber, PhoneRefused, check_number
from gateway.core.ranking_cache import RankingCache
from gateway.core.routing import (
    Candidate,
    RouteRequest,
    RoutingPolicy,
    RoutingSnapshot,
    capabilities,
)
from gateway.ops.metrics import Metrics
from gateway.services.call_records import (
    AGENT_GRACE_S,
    CALL_HOLD_S,
    RESERVATION_GRACE_S,
    CallRecords,
    TimerHandler,
    TimerId,
    TimerKind,
)
from gateway.services.callback_dialing import SPEND_TTL_S, CallbackDialer, due_timer
from gateway.services.caller_screen import CallerScreen
from gateway.services.customer_texts import CustomerTexts
from gateway.services.mobile_ring import MobileRing, room_name
from gateway.services.promises import Promises
from gateway.store.base import OpenCallbackKind
from gateway.telephony import AgentInstruction, JoinRoom
from gateway.wire.codec import CallbackIn, Json, call_to_wire

# A callback waiting for a free agent looks again this often.
POLL_S = 1.0
# How many callbacks ahead in line a waiting one looks at, beyond its free agents.
AHEAD_SCAN = 32
# Slots offered by the form: every 15 minutes for the next 3 days, from 15 minutes ahead.
SLOT_STEP_S = 900.0
SLOT_HORIZON_S = 3 * 86400.0
SLOT_LEAD_S = 900.0
MAX_SLOTS = 96
# A time closer than this is taken as "now".
MIN_LEAD_S = 60.0
# The visitor's open callback (one per visitor, one per number) is remembered this long.
OPEN_HOLD_S = MAX_AHEAD_S + 86400.0


# The open-callback slots the admission names, as the store counts them.
OPEN_KIND: dict[Subject, OpenCallbackKind] = {Subject.VISITOR: "visitor", Subject.NUMBER: "number"}
# A browser call nobody answered gives its place to the callback asked for within this time.
KEEP_PLACE_S = 1800.0
# The HTTP status of each refusal of a request; any other (the number's rules, the time's) 422.
REFUSAL_KINDS: dict[str, type[DomainError]] = {
    "callbacks_unavailable": Unavailable,
    "invalid_phone": Invalid,
    "spend_cap_reached": Unavailable,
    "callback_in_progress": Conflict,
    "number_has_callback": Conflict,
    "number_rate_limited": RateLimited,
    "too_many_numbers": RateLimited,
    "ip_rate_limited": RateLimited,
    "site_rate_limited": RateLimited,
}
"""The kind of each admission refusal whose kind is not ``Refused`` (a rule said no)."""


class Booking(NamedTuple):
    """A callback request's answer: the callback, its visitor's status token, and whether
    this request created it (else it repeated one whose answer was lost)."""

    call: Call
    status_token: str
    created: bool


class CallbackService:
    channel = CallChannel.CALLBACK

    def __init__(self, records: CallRecords, metrics: Metrics) -> None:
        self._records = records
        self._store = records.store
        self._notify = records.notify
        self._metrics = metrics
        self._ranking = RankingCache()
        self.dialer = CallbackDialer(records, metrics)
        """The phone legs; the telephony edge calls into it (``CallbackEvents``)."""
        # The agent rung in the app or on their mobile (AgentLegEvents); customer first,
        # the agent's leg screened (ScreenEvents).
        self.devices = MobileRing(records, metrics)
        self.screen = CallerScreen(records, self._candidates, metrics)
        self.dialer.agent_legs, self.dialer.screen = self.devices, self.screen
        self.min_lead_s = MIN_LEAD_S
        self.customer_texts: CustomerTexts | None = None
        """Texts each new callback's customer its ticket's link (set by the app)."""
        self.promises = Promises(records, self.expected_at)

    def timers(self) -> Mapping[TimerKind, TimerHandler]:
        return {
            TimerKind.CALLBACK_DUE: self.on_due,
            TimerKind.PROMISE: self.promises.on_review,
            **self.dialer.timers(),
        }

    # --- the visitor -----------------------------------------------------------------------

    def _refuse(self, refusal: Refusal) -> DomainError:
        self._metrics.callback_refusals.labels(refusal.code).inc()
        kind = REFUSAL_KINDS.get(refusal.code)
        if kind is None:
            return Refused(refusal.code, refusal.message)
        return kind(refusal.message, code=refusal.code)

    async def request(
        self, site_id: str, visitor_id: str, client_ip: str, body: CallbackIn
    ) -> Booking:
        """Accept a callback request, persisted before it is answered; returns the call and
        the visitor's status token (stored only as a hash).

        A request repeated by its visitor for the same number while the callback is open is
        answered with that callback (``Booking.created`` False), not refused: the answer to
        the first was lost (a timeout while the store was slow, a node gone after storing
        it), and the visitor must be able to see the call that will come."""
        site = self._records.presence.site(site_id)
        if not capabilities(site, self.dialer.telephony is not None).callbacks:
            raise self._refuse(Refusal("callbacks_unavailable", "callbacks are not set up here"))
        r = body.request
        if r.branch is not None and r.branch not in site.branches:
            raise Invalid(f"no branch {r.branch!r}")
        now = self._records.clock()
        ask = CallbackAsk(body.phone, body.at, r.branch)
        policy, hours = site.callback_policy, hours_scope(site, r.branch)
        # Every rule on the request alone first: a bad number is a 400 even while the store
        # (which knows the day's spend) is out.
        admission = admit(ask, policy, hours, 0, now, self.min_lead_s)
        if not isinstance(admission, Refusal):
            spent = await self._store.add_spend(site_id, now, 0, SPEND_TTL_S)
            admission = admit(ask, policy, hours, spent, now, self.min_lead_s)
        if isinstance(admission, Refusal):
            raise self._refuse(admission)
        call_id = f"c_{uuid.uuid4().hex}"
        e164 = admission.number.e164
        subjects = {
            Subject.VISITOR: visitor_id,
            Subject.NUMBER: e164,
            Subject.IP: client_ip,
            Subject.SITE: site_id,
        }
        held: list[tuple[OpenCallbackKind, str]] = []
        for slot in admission.slots:
            kind = OPEN_KIND[slot.per]
            if not await self._store.acquire_open_callback_slot(
                site_id, kind, subjects[slot.per], call_id, OPEN_HOLD_S, now
            ):
                for taken_kind, subject in held:
                    await self._store.release_open_callback_slot(
                        site_id, taken_kind, subject, call_id
                    )
                if slot.per is Subject.VISITOR:
                    booked = await self._booked_before(site_id, visitor_id, e164, now)
                    if booked is not None:
                        return booked
                raise self._refuse(slot.refusal)
            held.append((kind, subjects[slot.per]))
        full = await self._store.take_callback_quotas(
            admission.quotas, site_id, subjects, call_id, now
        )
        if full is not None:
            await self.dialer.release_open(site_id, visitor_id, e164, call_id)
            raise self._refuse(admission.quotas[full].refusal)
        place_at = await self._kept_place(site_id, visitor_id, body.after_call, now)
        token, token_hash = self._records.status_tokens.for_call(call_id)
        call = cb.new_callback(
            call_id,
            site_id,
            visitor_id,
            e164,
            token_hash,
            r,
            now,
            admission.at,
            place_at,
            admission.detail,
        )
        if admission.at is None:
            # As soon as someone is free: the estimate shown is the promise.
            call = replace(call, promised_at=await self.expected_at(call, now))
        # Persisted before anything is promised; then its timer, then the answer.
        call = await self._records.create(call)
        if call.state is CallState.QUEUED:
            await self._store.queue_put(site_id, call_id, place_at)
        at = admission.at
        await self._records.schedule(due_timer(call), at if at is not None else now)
        await self.booked(call)
        return Booking(call, token, created=True)

    async def _booked_before(
        self, site_id: str, visitor_id: str, e164: str, now: float
    ) -> Booking | None:
        """The visitor's open callback to ``e164``, if that is what holds their slot."""
        holder = await self._store.open_callback_holder(
            site_id, OPEN_KIND[Subject.VISITOR], visitor_id, now
        )
        call = None if holder is None else await self._records.find(holder)
        if call is None or call.final:
            return None
        if (call.site, call.visitor_id, call.phone) != (site_id, visitor_id, e164):
            return None
        token, _ = self._records.status_tokens.for_call(call.call_id)
        return Booking(call, token, created=False)

    async def booked(self, call: Call) -> None:
        """A new callback is stored and its due timer set: watch its promise, tell its
        parties, and text the customer its ticket's link."""
        await self.promises.watch(call)
        self._metrics.callbacks.labels("requested").inc()
        await self._notify.call_update(call)
        if self.customer_texts is not None:
            self.customer_texts.confirm(call)

    async def _kept_place(
        self, site_id: str, visitor_id: str, after_call: str | None, now: float
    ) -> float:
        """Keep-my-place: a browser call of this visitor that nobody answered lends its
        start time as the queue place."""
        if after_call is None:
            return now
        before = await self._records.find(after_call)
        if (
            before is not None
            and before.site == site_id
            and before.visitor_id == visitor_id
            and before.state is CallState.FAILED
            and now - before.created_at <= KEEP_PLACE_S
        ):
            return before.created_at
        return now

    def slots(self, site_id: str, branch: str | None, now: float) -> list[float]:
        """Bookable times: within some branch's opening hours (the requested one's)."""
        site = self._records.presence.site(site_id)
        scope = hours_scope(site, branch)
        start = now + SLOT_LEAD_S
        starts = sorted(
            {s for b in scope for s in slot_starts(b, start, SLOT_HORIZON_S, SLOT_STEP_S)}
        )
        return starts[:MAX_SLOTS]

    async def view(self, call: Call, internal: bool = False) -> Json:
        """The Call shape with the live queue position and an honest ETA."""
        site = self._records.sites[call.site]
        position: int | None = None
        eta: int | None = None
        now = self._records.clock()
        if call.state is CallState.QUEUED:
            rank = await self._store.queue_rank(call.site, call.call_id)
            if rank is not None:
                position = rank + 1
                free, working = self._agent_counts(call)
                eta = estimate_wait_s(rank, free, working, await self._mean_handle_s(call.site))
        elif call.state is CallState.SCHEDULED and call.scheduled_at is not None:
            eta = max(0, math.ceil(call.scheduled_at - now))
        elif call.state in (CallState.RINGING, CallState.DIALING):
            eta = 0
        return call_to_wire(call, site, internal=internal, position=position, eta_s=eta)

    async def _mean_handle_s(self, site_id: str) -> float:
        recent = await self._store.handle_times(site_id)
        return statistics.fmean(recent) if recent else DEFAULT_MEAN_HANDLE_S

    async def move(self, call: Call, at: float) -> Call:
        """The visitor picks another time from their ticket, while the callback still waits
        (``scheduled`` or ``queued``); the time is checked as a new request's would be."""
        call_id = call.call_id
        cb.check_movable(call)  # before the time is judged: too late says more than too soon
        site = self._records.sites[call.site]
        now = self._records.clock()
        self.check_time(site, call.phone or "", call.request.branch, at, now)
        # Out of the line first: a free agent must not take it while it moves; a race lost
        # to one (it is ringing now) is refused by the transition.
        await self._store.queue_remove(call.site, call.call_id)
        try:
            moved = await self._records.move(call, partial(cb.moved, at=at, now=now))
        except CallError:
            current = await self._records.get(call_id)
            if current.state is CallState.QUEUED:
                await self._store.queue_put(call.site, call_id, current.place_at or now)
            raise
        await self._records.schedule(due_timer(moved), at)
        await self.promises.watch(moved)
        self._metrics.callbacks.labels("moved").inc()
        return moved

    def check_time(
        self, site: Site, phone: str, branch: str | None, at: float, now: float
    ) -> CheckedNumber:
        """``phone``, checked, if a callback to it may be placed at ``at`` (a time a customer
        picked, or an agent promised); else the refusal, as for a new request's time."""
        policy = site.callback_policy
        if at <= now + self.min_lead_s:
            raise self._refuse(Refusal("slot_unavailable", "pick a later time"))
        try:
            number = check_number(phone, policy)
        except PhoneRefused as e:
            raise self._refuse(Refusal(e.code, e.message)) from None
        refusal = time_refusal(number, policy, hours_scope(site, branch), at, now)
        if refusal is not None:
            raise self._refuse(refusal)
        return number

    async def keep(self, call: Call) -> Call:
        """Told their callback runs late, the customer keeps their place and the new time."""
        return await self._records.move(call, partial(cb.kept, now=self._records.clock()))

    async def expected_at(self, call: Call, now: float) -> float | None:
        """When the gateway now expects to call the customer of the waiting ``call``: at its
        time (or now), plus the wait for the callbacks ahead of its place. None when nobody
        is working to say."""
        free, working = self._agent_counts(call)
        if free + working == 0:
            return None
        ahead = None
        if call.state is CallState.QUEUED:
            ahead = await self._store.queue_rank(call.site, call.call_id)
        if ahead is None:
            place = call.place_at if call.place_at is not None else call.created_at
            ahead = await self._store.queue_count_before(call.site, place)
        start = now
        if call.state is CallState.SCHEDULED and call.scheduled_at is not None:
            start = max(now, call.scheduled_at)
        return start + estimate_wait_s(ahead, free, working, await self._mean_handle_s(call.site))

    async def cancel(self, call: Call) -> Call:
        """The visitor cancels from their ticket (an ended callback is answered as it is)."""
        if call.final:
            return call
        try:
            return await self._records.end(call.call_id, "visitor_canceled", "You canceled")
        except (Conflict, NotFound):
            return await self._records.get(call.call_id)

    # --- routing ---------------------------------------------------------------------------

    def _route_request(self, call: Call) -> RouteRequest:
        site = self._records.sites[call.site]
        # Without the audio bridge the agent talks on her own phone; and customer first, the
        # customer waits on the line while her phone is put through: only agents with a
        # mobile number then. With it, agent first, she may talk in the app.
        in_app = self.dialer.bridged and site.callback_policy.agent_first
        no_phone = frozenset(
            a.agent_id for a in site.agents.values() if not a.mobile and not in_app
        )
        allowed = fu.allowed_agents(call, site, self._records.clock())
        if allowed is not None:  # a follow-up: its agent, or her branch once it is theirs
            no_phone |= frozenset(site.agents) - allowed
        return calls.route_request(call, Channel.PSTN, no_phone, self.devices.reach)

    def _snapshot(self, call: Call, last_agent: str | None) -> RoutingSnapshot:
        site = self._records.sites[call.site]
        presence = self._records.presence.snapshot(call.site)
        return RoutingSnapshot(
            site=site,
            presence=presence,
            reserved=self._records.ringing.current(call.site, presence, self._records.clock()),
            last_agent=last_agent,
            can=capabilities(site, self.dialer.telephony is not None, self.dialer.bridged),
        )

    def _agent_counts(self, call: Call) -> tuple[int, int]:
        """Agents free for this callback now, and agents on a call who will be free."""
        request = self._route_request(call)
        snapshot = self._snapshot(call, None)
        free = sum(1 for _ in self._ranking.candidates(snapshot, request, self._records.clock()))
        working = sum(
            1
            for a, p in snapshot.presence.items()
            if p.active_call is not None and a not in request.exclude
        )
        return free, working

    async def on_due(self, timer: TimerId) -> float | None:
        """Timer ``cbdue``: find an agent for the callback, or look again soon."""
        call = await self._records.find(timer.call_id)
        if call is None or call.channel is not CallChannel.CALLBACK or call.final:
            return None
        if not cb.waiting(call):
            return None  # ringing or dialing already: another timer moved it on
        now = self._records.clock()
        site = self._records.sites[call.site]
        policy = site.callback_policy
        if (
            call.state is CallState.SCHEDULED
            and call.scheduled_at is not None
            and call.scheduled_at > now + 0.05
        ):
            return call.scheduled_at
        try:
            number = check_number(call.phone or "", policy)
        except PhoneRefused as e:
            await self.dialer.refused(call, "number_refused", e.message)
            return None
        until = callable_at(number, policy, now)
        if until > now:
            # Also a callback that waited in line into the night: it waits for the morning.
            await self._store.queue_remove(call.site, call.call_id)
            await self._records.move(
                call,
                partial(
                    cb.postpone,
                    until=until,
                    event="quiet_hours",
                    detail="It is night at your number; we'll call in the morning",
                    now=now,
                ),
            )
            return until
        if call.state is CallState.SCHEDULED:
            call = await self._records.move(call, partial(cb.due, now=now))
            await self._store.queue_put(call.site, call.call_id, call.place_at or now)
        scope = hours_scope(site, call.request.branch)
        if not open_at(scope, now):
            opening = next_opening(scope, now)
            until = opening if opening is not None else now + 3600
            await self._store.queue_remove(call.site, call.call_id)
            await self._records.move(
                call,
                partial(
                    cb.postpone,
                    until=until,
                    event="closed",
                    detail="We are closed; we'll call when we open",
                    now=now,
                ),
            )
            return until
        return await self._try_route(call, now)

    async def _try_route(self, call: Call, now: float) -> float | None:
        site = self._records.sites[call.site]
        last_agent = await self._store.last_agent(call.site, call.visitor_id)
        candidates = await self._candidates(call, now, last_agent)
        if not candidates and cb.round_over(call, now):
            try:
                call = await self._records.move(call, partial(cb.next_round, now=now))
            except CallError:
                return now + POLL_S  # it moved on meanwhile: look again
            candidates = await self._candidates(call, now, last_agent)
        if call.pinned_agent is not None:
            call, candidates = await self._follow_up_turn(call, candidates, now)
        if not candidates:
            return now + POLL_S
        if await self._waits_its_turn(call, candidates, now):
            return now + POLL_S
        agent_first = site.callback_policy.agent_first
        for candidate in candidates:
            agent = site.agents[candidate.agent_id]
            ttl = site.ring_timeout_s + RESERVATION_GRACE_S if agent_first else CALL_HOLD_S
            if not await self._store.reserve_agent(call.site, agent.agent_id, call.call_id, ttl):
                continue
            if agent_first:
                visitor, extra = self._ring_details(call, agent.agent_id)
                ringing = await self.devices.ring(
                    call, agent.agent_id, candidate.channel, candidate.reasons, now, visitor, extra
                )
                if ringing is None:
                    return None  # canceled meanwhile
            else:
                try:
                    await self._dial_customer_first(call, agent.agent_id, candidate.reasons, now)
                except (Conflict, NotFound):
                    await self._records.release_agent(call.site, agent.agent_id, call.call_id)
                    return None  # canceled meanwhile
            await self._store.queue_remove(call.site, call.call_id)
            return None
        return now + POLL_S

    async def _follow_up_turn(
        self, call: Call, candidates: list[Candidate], now: float
    ) -> tuple[Call, list[Candidate]]:
        """A follow-up goes to the agent who promised it when she is free. Else, while it is
        still hers, the customer is told we wait for her; after, that a colleague will call
        (each said once)."""
        hers = [c for c in candidates if c.agent_id == call.pinned_agent]
        if hers:
            return call, hers
        agent = self._records.sites[call.site].agents.get(call.pinned_agent or "")
        name = agent.name.split()[0] if agent is not None and agent.name else "Your agent"
        if call.pinned_until is not None and now < call.pinned_until:
            if not any(e.event == "waiting_for_agent" for e in call.timeline):
                call = await self._records.move(
                    call, partial(fu.waiting_for_agent, name=name, now=now)
                )
            return call, []
        if not fu.handed_over(call):
            call = await self._records.move(call, partial(fu.to_colleague, name=name, now=now))
        return call, candidates

    async def _candidates(
        self, call: Call, now: float, last_agent: str | None = None
    ) -> list[Candidate]:
        experiments = self._records.experiments
        policy, scores = (
            await experiments.routing(call)
            if experiments is not None and call.experiment is not None
            else (RoutingPolicy.DEFAULT, {})
        )
        snapshot = replace(self._snapshot(call, last_agent), scores=scores)
        request = replace(self._route_request(call), policy=policy)
        return list(self._ranking.candidates(snapshot, request, now))

    async def _waits_its_turn(self, call: Call, candidates: list[Candidate], now: float) -> bool:
        """Keep-my-place: the free agents go to the first callbacks in line. A callback waits
        while at least as many callbacks ahead of it could take one of its candidates (one
        ahead that every candidate already declined does not hold it up)."""
        ahead = await self._store.queue_ahead(call.site, call.call_id, len(candidates) + AHEAD_SCAN)
        if ahead is None:
            await self._store.queue_put(call.site, call.call_id, call.place_at or now)
            ahead = await self._store.queue_ahead(
                call.site, call.call_id, len(candidates) + AHEAD_SCAN
            )
        mine = {c.agent_id for c in candidates}
        blocking = 0
        for other_id in ahead or ():
            other = await self._records.find(other_id)
            if other is None:
                continue
            if other.state is CallState.QUEUED and mine - set(other.tried):
                blocking += 1
                if blocking >= len(candidates):
                    return True
        return False

    async def _dial_customer_first(
        self, call: Call, agent_id: str, reasons: tuple[str, ...], now: float
    ) -> None:
        def assign(c: Call) -> Call:
            if c.state is not CallState.QUEUED:
                raise CallError("invalid_state", f"cannot dial a {c.state} callback")
            routed = replace(
                c,
                agent_id=agent_id,
                timeline=(
                    *c.timeline,
                    calls.TimelineEntry(
                        now, "routed", f"{agent_id}: " + "; ".join(reasons), internal=True
                    ),
                ),
            )
            return calls.start_dial(routed, now)

        _, dialing = await self._records.update(call.call_id, assign)
        await self._records.presence.set_active_call(call.site, agent_id, call.call_id)
        await self.accepted(dialing)

    # --- the agent (CallFlow: asked by the shared paths) -----------------------------------

    async def accepted(self, call: Call) -> None:
        """The agent is ready (or, customer first, chosen): dial the visitor now. Run again
        after an outage (``CallRecords.after_accept``), it leaves a dial that is due or
        running where it is: moved, another node would start it a second time."""
        dial = TimerId(TimerKind.CALLBACK_DIAL, call.call_id, str(call.dials))
        await self._records.schedule(dial, self._records.clock(), keep=True)
        await self._notify.call_update(call)

    async def ring_missed(self, call: Call) -> Call:
        """The agent declined or did not answer: back in line at the same place, waiting for
        someone rather than failing."""
        if await self.devices.ring_missed(call):
            return call  # the same agent's mobile rings now ("mobile after desktop")
        await self._store.queue_put(call.site, call.call_id, call.place_at or call.created_at)
        await self._records.schedule(due_timer(call), self._records.clock())
        return call

    async def ended(self, before: Call, after: Call, reason: str) -> None:
        if before.agent_id is not None and before.state is CallState.RINGING:
            await self._records.ring_over(before, after, before.agent_id, reason)
        else:
            await self._notify.call_update(after)
        await self.dialer.after_end(before, after)

    def _ring_details(self, call: Call, agent_id: str) -> tuple[Json, Json]:
        """What a callback's ring adds: the visitor's number, and where the agent will talk
        once the visitor answers: in the app (the audio bridge: ``audio_in_app``), else on
        her own phone (``your_phone``), which rings then."""
        site = self._records.sites[call.site]
        agent = site.agents[agent_id]
        visitor: Json = {"returning": False, "phone": call.phone}
        extra: Json = (
            {"your_phone": None, "audio_in_app": True}
            if self.dialer.bridged
            else {"your_phone": agent.mobile, "audio_in_app": False}
        )
        promiser = site.agents.get(call.pinned_agent or "")
        if promiser is not None:
            extra["follow_up"] = {"promised_by": promiser.name, "note": call.note or ""}
        return visitor, extra

    async def ring_details(self, call: Call, agent_id: str) -> tuple[Json, Json | None]:
        return self._ring_details(call, agent_id)

    async def held(self, call: Call, on: bool) -> None:
        """Bridged to the app, the customer on the phone hears the hold tone; on her own
        phone, the agent has her phone's hold."""
        if self.dialer.bridge is not None:
            await self.dialer.bridge.hold(call, on)

    async def phone_leg_ended(self, call: Call) -> None:
        """Her leg ended while the customer's phone rang: the callback ends (its flow hangs
        the customer's leg up). Once they talk, the room ends with her leg, and the
        customer's leg completing completes the callback (``CallbackDialer``)."""
        if call.state is CallState.DIALING:
            await self._records.end(call.call_id, "agent_hung_up", "The agent ended the call")

    async def phone_accepts(
        self, call: Call, accept: Callable[[], Awaitable[Call]]
    ) -> AgentInstruction:
        """The agent's leg waits in the callback's room, which the visitor's leg joins."""
        await accept()
        text = self._records.agent_text(call)
        said = text.gettext("Calling the customer now.")
        return JoinRoom(room_name(call.call_id), say=said, language=text.say_language)

    async def ring_payload(self, call: Call) -> Json:
        assert call.agent_id is not None
        visitor, extra = self._ring_details(call, call.agent_id)
        return self._records.ring_payload(call, calls.ring_reasons(call), visitor, extra)

    async def replay(self, call: Call) -> tuple[Json | None, dict[str, str]]:
        return None, {}  # the ring of a callback is not repeated

    async def agent_left(self, call: Call, agent_sid: str, left_at: float) -> None:
        """On her phone, the tab does not matter. In the app (bridged), she has a grace
        period to come back, as in a browser call (the same timer: ``AGENT_GONE``)."""
        if call.media is not None:
            timer = TimerId(TimerKind.AGENT_GONE, call.call_id, agent_sid)
            await self._records.schedule(timer, left_at + AGENT_GRACE_S)

    async def agent_gone(self, call_id: str, agent_sid: str) -> None:
        """Her accepting socket is gone for good: a bridged call ends (``agent_left``); on
        the phones it goes on."""
        call = await self._records.find(call_id)
        if call is None or call.final or call.media is None or call.agent_sid != agent_sid:
            return
        try:
            await self._records.end(call_id, "agent_left", "The agent's connection dropped", call)
        except (Conflict, NotFound):
            pass

    async def signal(self, call: Call, to_agent: bool, payload: Json) -> None:
        if to_agent or call.media is None:
            raise Conflict("this call's audio is on the phone network", code="not_connected")
        await self.dialer.bridge_signal(call, payload)
