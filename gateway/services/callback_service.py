"""PSTN callbacks across nodes: accept a request, wait for its time and a free agent, ring the
agent (agent first), dial the visitor once, retry by the site's policy, and keep the ticket.

Everything a callback waits for is a durable, leased timer in the store, so any node may run
any step and a node that dies mid-step leaves it to another:

- ``cbdue:{call_id}:{dials}:{rings}`` -- the callback should find an agent now (its time
  came, a retry is due, an agent declined). While nobody is free it polls by rescheduling
  itself. Only the first callbacks in the site's queue may take the free agents.
- ``cbdial:{call_id}:{attempt}`` -- dial attempt ``attempt``. The store's ``claim_once``
  makes the dial happen at most once per attempt; a node that finds the claim taken (the
  claimer died) asks the provider whether the leg exists before dialing.
- ``cbwatch:{call_id}:{attempt}`` -- a leg that never reported an outcome is hung up and
  counted as a failed attempt, so no callback and no agent is left stuck.

The transitions are pure (gateway.core.callback); the number rules are pure
(gateway.core.phone_policy); the provider sits behind gateway.telephony.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from gateway.core import call as calls
from gateway.core import callback as cb
from gateway.core.call import Call, CallChannel, CallError, CallState
from gateway.core.errors import (
    Conflict,
    DomainError,
    Invalid,
    NotFound,
    RateLimited,
    Refused,
    Unavailable,
)
from gateway.core.hours import is_open, next_open_at, slot_starts
from gateway.core.model import Branch, Channel, Site
from gateway.core.phone_policy import (
    CheckedNumber,
    PhoneRefused,
    check_number,
    in_quiet_hours,
    next_allowed_at,
)
from gateway.core.routing import (
    DEFAULT_MEAN_HANDLE_S,
    Candidate,
    RankingCache,
    RouteRequest,
    RoutingSnapshot,
    estimate_wait_s,
)
from gateway.ops.metrics import Metrics
from gateway.services.call_service import (
    CALL_HOLD_S,
    RESERVATION_GRACE_S,
    CallNotifier,
    ring_payload,
    ring_timer_id,
)
from gateway.services.presence_service import PresenceService
from gateway.store.base import CallRow, Quota, Store
from gateway.telephony import (
    AnsweredBy,
    Bridge,
    DialRequest,
    HangUp,
    Instruction,
    LegEvent,
    LegStatus,
    Telephony,
    TelephonyError,
)
from gateway.wire.codec import CallbackIn, Json, call_from_record, call_to_record, call_to_wire

if TYPE_CHECKING:
    from gateway.services.call_service import CallService

log = logging.getLogger(__name__)
E = TypeVar("E", bound=DomainError)

DUE_TIMER = "cbdue"
DIAL_TIMER = "cbdial"
WATCH_TIMER = "cbwatch"
# A callback waiting for a free agent looks again this often.
POLL_S = 1.0
# How many callbacks ahead in line a waiting one looks at, beyond its free agents.
AHEAD_SCAN = 32
# A dial waiting for a free outbound line (the site's concurrency cap) looks again this often.
LINE_POLL_S = 2.0
# How long the visitor's phone rings before it counts as no answer.
DIAL_TIMEOUT_S = 30
# A leg that has said nothing this long after its dial (ring time included) is given up.
LEG_SILENCE_S = DIAL_TIMEOUT_S + 90.0
# The longest a phone call holds an outbound line and its agent.
LINE_HOLD_S = 4 * 3600.0
# Slots offered by the form: every 15 minutes for the next 3 days, from 15 minutes ahead.
SLOT_STEP_S = 900.0
SLOT_HORIZON_S = 3 * 86400.0
SLOT_LEAD_S = 900.0
MAX_SLOTS = 96
# A time closer than this is taken as "now".
MIN_LEAD_S = 60.0
# A scheduled callback may be at most this far ahead.
MAX_AHEAD_S = 14 * 86400.0
# The visitor's open callback (one per visitor, one per number) is remembered this long.
OPEN_HOLD_S = MAX_AHEAD_S + 86400.0
# A browser call nobody answered gives its place to the callback asked for within this time.
KEEP_PLACE_S = 1800.0
# Spend is estimated, not billed: this much per started minute of a phone leg (US$
# millionths). A callback is two legs (the visitor's, and the bridge to the agent's phone).
# A minute of both is reserved atomically when a dial starts, so a burst cannot overshoot.
MICRO_USD_PER_MINUTE = 30_000
LEGS_PER_CALL = 2
DIAL_RESERVE = MICRO_USD_PER_MINUTE * LEGS_PER_CALL
SPEND_TTL_S = 2 * 86400
QUOTA_CODES = (
    "number_rate_limited",
    "number_rate_limited",
    "number_rate_limited",
    "too_many_numbers",
    "ip_rate_limited",
    "site_rate_limited",
)


def due_timer_id(call: Call) -> str:
    return f"{DUE_TIMER}:{call.call_id}:{call.dials}:{call.attempt}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def spend_key(site_id: str, now: float) -> str:
    return f"spend:{site_id}:{datetime.fromtimestamp(now, UTC):%Y-%m-%d}"


class CallbackService:
    def __init__(
        self,
        sites: dict[str, Site],
        store: Store,
        presence: PresenceService,
        calls_service: CallService,
        notifier: CallNotifier,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sites = sites
        self._store = store
        self._presence = presence
        self._calls = calls_service
        self._notify = notifier
        self._metrics = metrics
        self._clock = clock
        self._ranking = RankingCache()
        self.telephony: Telephony | None = None
        """Set by the app when a provider is configured; without one, callbacks are refused."""
        self.min_lead_s = MIN_LEAD_S

    # --- the visitor -----------------------------------------------------------------------

    def _refuse(self, error: E) -> E:
        self._metrics.callback_refusals.labels(error.code).inc()
        return error

    def _number(self, raw: str, site: Site) -> CheckedNumber:
        try:
            return check_number(raw, site.callback_policy)
        except PhoneRefused as e:
            if e.code == "invalid_phone":
                raise self._refuse(Invalid(e.message, code=e.code)) from None
            raise self._refuse(Refused(e.code, e.message)) from None

    async def request(
        self, site_id: str, visitor_id: str, client_ip: str, body: CallbackIn
    ) -> tuple[Call, str]:
        """Accept a callback request, persisted before it is answered; returns the call and
        the visitor's status token (shown once, stored only as a hash)."""
        site = self._presence.site(site_id)
        if self.telephony is None or not site.caller_ids:
            raise self._refuse(
                Unavailable("callbacks are not set up here", code="callbacks_unavailable")
            )
        policy = site.callback_policy
        r = body.request
        if r.branch is not None and r.branch not in site.branches:
            raise Invalid(f"no branch {r.branch!r}")
        number = self._number(body.phone, site)
        now = self._clock()
        at = body.at
        if at is not None:
            if at <= now + self.min_lead_s:
                at = None  # "at a time" that is already here is "now"
            elif at > now + MAX_AHEAD_S:
                raise self._refuse(Refused("slot_unavailable", "that time is too far ahead"))
            elif not self._open_at(site, r.branch, at):
                raise self._refuse(Refused("slot_unavailable", "we are closed at that time"))
            elif in_quiet_hours(number, policy, at):
                raise self._refuse(Refused("quiet_hours", "that is night time at your number"))
        detail = "We'll call you at the time you chose" if at is not None else None
        if at is None and not self._open_at(site, r.branch, now):
            opening = self._next_opening(site, r.branch, now)
            if opening is not None:
                at = self._callable_at(number, site, opening)
                detail = "We're closed now; we'll call you when we open"
        if at is None and in_quiet_hours(number, policy, now):
            # Nobody's phone rings at night because a web form said so: pick a time instead.
            raise self._refuse(
                Refused("quiet_hours", "it is night time at your number; pick a time")
            )
        spent = await self._store.add_to_counter(spend_key(site_id, now), 0, SPEND_TTL_S)
        if spent + DIAL_RESERVE > policy.daily_spend_cap_usd * 1_000_000:
            raise self._refuse(
                Unavailable("no more callbacks today; sorry", code="spend_cap_reached")
            )
        call_id = f"c_{uuid.uuid4().hex}"
        visitor_slot = f"cbopen:{site_id}:v:{visitor_id}"
        number_slot = f"cbopen:{site_id}:n:{number.e164}"
        if not await self._store.acquire_slot(visitor_slot, call_id, 1, OPEN_HOLD_S, now):
            raise self._refuse(
                Conflict("you already have a callback booked", code="callback_in_progress")
            )
        if not await self._store.acquire_slot(number_slot, call_id, 1, OPEN_HOLD_S, now):
            await self._store.release_slot(visitor_slot, call_id)
            raise self._refuse(
                Conflict("that number already has a callback", code="number_has_callback")
            )
        quotas = (
            Quota(f"cb:n15:{site_id}:{number.e164}", 900, policy.per_number_15min),
            Quota(f"cb:nh:{site_id}:{number.e164}", 3600, policy.per_number_hour),
            Quota(f"cb:nd:{site_id}:{number.e164}", 86400, policy.per_number_day),
            Quota(
                f"cb:vn:{site_id}:{visitor_id}",
                3600,
                policy.numbers_per_visitor_hour,
                member=number.e164,
            ),
            Quota(f"cb:ip:{site_id}:{client_ip}", 3600, policy.per_ip_hour),
            Quota(f"cb:site:{site_id}", 3600, policy.per_site_hour),
        )
        full = await self._store.take_quotas(quotas, call_id, now)
        if full is not None:
            await self._release_open(site_id, visitor_id, number.e164, call_id)
            raise self._refuse(
                RateLimited("too many callbacks; try again later", code=QUOTA_CODES[full])
            )
        place_at = await self._kept_place(site_id, visitor_id, body.after_call, now)
        token = secrets.token_urlsafe(24)
        call = cb.new_callback(
            call_id,
            site_id,
            visitor_id,
            number.e164,
            hash_token(token),
            r,
            now,
            at,
            place_at,
            detail,
        )
        call = replace(call, version=1)
        # Persisted before anything is promised; then its timer, then the answer.
        await self._store.put_call(CallRow(call_id, site_id, 1, call_to_record(call)))
        if call.state is CallState.QUEUED:
            await self._store.queue_put(site_id, call_id, place_at)
        await self._store.schedule_timer(due_timer_id(call), at if at is not None else now)
        self._metrics.callbacks.labels("requested").inc()
        await self._notify.call_update(call)
        return call, token

    def _callable_at(self, number: CheckedNumber, site: Site, at: float) -> float:
        """The first time from ``at`` that is not night at the number (a number whose zones
        leave no such time within a week is called at ``at``: it asked to be called)."""
        try:
            return next_allowed_at(number, site.callback_policy, at)
        except PhoneRefused:
            return at

    async def _kept_place(
        self, site_id: str, visitor_id: str, after_call: str | None, now: float
    ) -> float:
        """Keep-my-place: a browser call of this visitor that nobody answered lends its
        start time as the queue place."""
        if after_call is None:
            return now
        row = await self._store.get_call(after_call)
        if row is None:
            return now
        before = call_from_record(row.data, row.version)
        if (
            before.site == site_id
            and before.visitor_id == visitor_id
            and before.state is CallState.FAILED
            and now - before.created_at <= KEEP_PLACE_S
        ):
            return before.created_at
        return now

    async def _release_open(self, site_id: str, visitor_id: str, e164: str, call_id: str) -> None:
        await self._store.release_slot(f"cbopen:{site_id}:v:{visitor_id}", call_id)
        await self._store.release_slot(f"cbopen:{site_id}:n:{e164}", call_id)

    @staticmethod
    def _scope(site: Site, branch: str | None) -> list[Branch]:
        return [site.branches[branch]] if branch else list(site.branches.values())

    def _open_at(self, site: Site, branch: str | None, at: float) -> bool:
        scope = self._scope(site, branch)
        return not scope or any(is_open(b, at) for b in scope)

    def _next_opening(self, site: Site, branch: str | None, now: float) -> float | None:
        scope = self._scope(site, branch)
        times = [t for b in scope if (t := next_open_at(b, now)) is not None]
        return min(times) if times else None

    def slots(self, site_id: str, branch: str | None, now: float) -> list[float]:
        """Bookable times: within some branch's opening hours (the requested one's)."""
        site = self._presence.site(site_id)
        scope = self._scope(site, branch)
        start = now + SLOT_LEAD_S
        starts = sorted(
            {s for b in scope for s in slot_starts(b, start, SLOT_HORIZON_S, SLOT_STEP_S)}
        )
        return starts[:MAX_SLOTS]

    async def ticket(self, call_id: str, token: str) -> Call:
        """The visitor's callback, for the holder of its status token only; an unknown call
        and a wrong token look the same, so call ids cannot be probed."""
        call = await self._calls.find(call_id)
        if call is None:
            raise NotFound(f"no callback {call_id!r}")
        if (
            call.channel is not CallChannel.CALLBACK
            or call.token_hash is None
            or not hmac.compare_digest(call.token_hash, hash_token(token))
        ):
            raise NotFound(f"no callback {call_id!r}")
        return call

    async def view(self, call: Call, internal: bool = False) -> Json:
        """The Call shape with the live queue position and an honest ETA."""
        site = self._sites[call.site]
        position: int | None = None
        eta: int | None = None
        now = self._clock()
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

    async def cancel(self, call_id: str, token: str) -> Call:
        call = await self.ticket(call_id, token)
        if call.final:
            return call
        try:
            return await self._calls.end_call(call_id, "visitor_canceled", "You canceled")
        except (Conflict, NotFound):  # ended meanwhile
            return await self._calls.get(call_id)

    # --- routing ---------------------------------------------------------------------------

    def _route_request(self, call: Call) -> RouteRequest:
        site = self._sites[call.site]
        # Until the audio bridge exists, the agent accepts in the app and talks on their own
        # phone: only agents with a mobile number can take a callback.
        no_phone = frozenset(a.agent_id for a in site.agents.values() if not a.mobile)
        r = call.request
        return RouteRequest(
            site_id=call.site,
            visitor_id=call.visitor_id,
            channel=Channel.PSTN,
            language=r.language,
            branch=r.branch,
            location=r.location,
            skills=r.skills,
            exclude=frozenset(call.tried) | no_phone,
            agent_channels=(Channel.WEBRTC,),
        )

    def _snapshot(self, call: Call, last_agent: str | None) -> RoutingSnapshot:
        site = self._sites[call.site]
        presence = self._presence.snapshot(call.site)
        return RoutingSnapshot(
            site=site,
            presence=presence,
            reserved=self._calls.ringing.current(call.site, presence, self._clock()),
            last_agent=last_agent,
        )

    def _agent_counts(self, call: Call) -> tuple[int, int]:
        """Agents free for this callback now, and agents on a call who will be free."""
        request = self._route_request(call)
        snapshot = self._snapshot(call, None)
        free = sum(1 for _ in self._ranking.candidates(snapshot, request, self._clock()))
        working = sum(
            1
            for a, p in snapshot.presence.items()
            if p.active_call is not None and a not in request.exclude
        )
        return free, working

    async def on_due(self, rest: str) -> float | None:
        """Timer ``cbdue``: find an agent for the callback, or look again soon."""
        call_id = rest.split(":", 1)[0]
        call = await self._calls.find(call_id)
        if call is None:
            return None
        if call.channel is not CallChannel.CALLBACK or call.final:
            return None
        if call.state not in (CallState.QUEUED, CallState.SCHEDULED):
            return None  # ringing or dialing already: another timer moved it on
        now = self._clock()
        site = self._sites[call.site]
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
            await self._refused(call, "number_refused", e.message)
            return None
        until = self._callable_at(number, site, now)
        if until > now:
            # Also a callback that waited in line into the night: it waits for the morning.
            await self._store.queue_remove(call.site, call.call_id)
            await self._move(
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
            call = await self._move(call, partial(cb.due, now=now))
            await self._store.queue_put(call.site, call.call_id, call.place_at or now)
        if not self._open_at(site, call.request.branch, now):
            opening = self._next_opening(site, call.request.branch, now)
            until = opening if opening is not None else now + 3600
            await self._store.queue_remove(call.site, call.call_id)
            await self._move(
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

    async def _move(self, call: Call, transition: Callable[[Call], Call]) -> Call:
        _, after = await self._calls.update(call.call_id, transition)
        if after.version != call.version:
            await self._notify.call_update(after)
        return after

    async def _try_route(self, call: Call, now: float) -> float | None:
        site = self._sites[call.site]
        last_agent = await self._store.last_agent(call.site, call.visitor_id)
        snapshot = self._snapshot(call, last_agent)
        request = self._route_request(call)
        candidates = list(self._ranking.candidates(snapshot, request, now))
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
            try:
                if agent_first:
                    await self._ring(call, agent.agent_id, candidate.reasons, now)
                else:
                    await self._dial_customer_first(call, agent.agent_id, candidate.reasons, now)
            except (CallError, Conflict, NotFound):
                await self._store.release_agent(call.site, agent.agent_id, call.call_id)
                return None  # canceled meanwhile
            await self._store.queue_remove(call.site, call.call_id)
            return None
        return now + POLL_S

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
            row = await self._store.get_call(other_id)
            if row is None:
                continue
            other = call_from_record(row.data, row.version)
            if other.state is CallState.QUEUED and mine - set(other.tried):
                blocking += 1
                if blocking >= len(candidates):
                    return True
        return False

    async def _ring(self, call: Call, agent_id: str, reasons: tuple[str, ...], now: float) -> None:
        site = self._sites[call.site]
        agent = site.agents[agent_id]
        branch = site.branches.get(agent.branch) if agent.branch else None
        who = f"{agent.name} in {branch.name}" if branch else agent.name
        _, ringing = await self._calls.update(
            call.call_id,
            partial(
                calls.ring,
                agent_id=agent_id,
                who=who,
                reasons=reasons,
                now=now,
                ring_timeout_s=site.ring_timeout_s,
            ),
        )
        assert ringing.ring_expires_at is not None
        until = now + site.ring_timeout_s + RESERVATION_GRACE_S  # the reservation's own expiry
        note = self._calls.note_ring(call.site, agent_id, call.call_id, until)
        await asyncio.gather(
            self._store.schedule_timer(ring_timer_id(ringing), ringing.ring_expires_at),
            self._calls.announce_ring(call.site, agent_id, note),
        )
        await self._notify.ring(ringing, ring_payload(ringing, site, reasons))
        await self._notify.call_update(ringing)

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

        _, dialing = await self._calls.update(call.call_id, assign)
        await self._presence.set_active_call(call.site, agent_id, call.call_id)
        await self.after_accept(dialing)

    async def after_accept(self, call: Call) -> None:
        """The agent is ready (or, customer first, chosen): dial the visitor now."""
        await self._store.schedule_timer(f"{DIAL_TIMER}:{call.call_id}:{call.dials}", self._clock())
        await self._notify.call_update(call)

    async def requeue(self, call: Call) -> Call:
        """The agent declined or did not answer: back in line at the same place."""
        await self._store.queue_put(call.site, call.call_id, call.place_at or call.created_at)
        await self._store.schedule_timer(due_timer_id(call), self._clock())
        return call

    # --- dialing ---------------------------------------------------------------------------

    async def _dialing(self, rest: str) -> Call | None:
        """The callback of a ``{call_id}:{attempt}`` timer, if it is still dialing that
        attempt (else the timer is stale: the attempt ended or the callback moved on)."""
        call_id, _, attempt = rest.rpartition(":")
        call = await self._calls.find(call_id)
        if call is None:
            return None
        if call.final or call.state is not CallState.DIALING or str(call.dials) != attempt:
            return None
        return call

    async def on_dial(self, rest: str) -> float | None:
        """Timer ``cbdial``: place dial attempt ``attempt`` exactly once."""
        call = await self._dialing(rest)
        if call is None or call.provider_id is not None:
            return None
        call_id, attempt = call.call_id, call.dials
        now = self._clock()
        site = self._sites[call.site]
        policy = site.callback_policy
        if self.telephony is None or not site.caller_ids:
            await self._fail_attempt(call, "dial_error", retryable=False)
            return None
        line = f"out:{call.site}"
        if not await self._store.acquire_slot(
            line, call.call_id, policy.max_concurrent_calls, LINE_HOLD_S, now
        ):
            # Not a refusal: the dial waits for a line. Counted once per look.
            self._metrics.dials.labels("waiting_for_line").inc()
            return now + LINE_POLL_S
        assert call.phone is not None
        request = DialRequest(
            call_id=call.call_id,
            attempt=attempt,
            to=call.phone,
            caller_id=site.caller_ids[0],
            timeout_s=DIAL_TIMEOUT_S,
            machine_detection=True,
        )
        # The per-number limits bound dials too, across sites: retries of many requests
        # must not add up to bombing one phone. The attempt's key counts once per attempt.
        dial_quotas = (
            Quota(f"cb:d15:{call.phone}", 900, policy.per_number_15min),
            Quota(f"cb:dh:{call.phone}", 3600, policy.per_number_hour),
            Quota(f"cb:dd:{call.phone}", 86400, policy.per_number_day),
        )
        if await self._store.take_quotas(dial_quotas, request.idempotency_key, now) is not None:
            self._metrics.callback_refusals.labels("number_rate_limited").inc()
            await self._fail_attempt(call, "number_rate_limited", retryable=False)
            return None
        if not await self._store.claim_once(f"dial:{request.idempotency_key}", 2 * 86400):
            # Someone claimed this attempt and did not finish (its node died). Did the leg
            # get placed? The provider knows; dial only if it does not.
            since = (call.dial_started_at or now) - 5
            found = await self.telephony.find_leg(request, since)
            if found is not None:
                await self._watch(call_id, attempt, now)
                await self._leg_placed(call, attempt, found)
                return None
        # Reserve first, then check: one atomic add, so two dials racing cannot both fit.
        key = spend_key(call.site, now)
        spent = await self._store.add_to_counter(key, DIAL_RESERVE, SPEND_TTL_S)
        if spent > policy.daily_spend_cap_usd * 1_000_000:
            await self._store.add_to_counter(key, -DIAL_RESERVE, SPEND_TTL_S)
            self._metrics.callback_refusals.labels("spend_cap_reached").inc()
            await self._fail_attempt(call, "spend_cap_reached", retryable=False)
            return None
        try:
            provider_id = await self.telephony.dial(request)
        except TelephonyError as e:
            log.warning("dial %s failed: %s %s", request.idempotency_key, e.code, e.message)
            await self._fail_attempt(call, "dial_error", retryable=e.retryable)
            return None
        self._metrics.dials.labels("placed").inc()
        await self._watch(call_id, attempt, now)
        await self._leg_placed(call, attempt, provider_id)
        return None

    async def _watch(self, call_id: str, attempt: int, now: float) -> None:
        await self._store.schedule_timer(f"{WATCH_TIMER}:{call_id}:{attempt}", now + LEG_SILENCE_S)

    async def _leg_placed(self, call: Call, attempt: int, provider_id: str) -> None:
        try:
            await self._calls.update(
                call.call_id, partial(cb.leg_placed, attempt=attempt, provider_id=provider_id)
            )
        except (CallError, Conflict, NotFound):
            # Canceled while the dial was on its way: the phone must not keep ringing.
            if self.telephony is not None:
                await self.telephony.hang_up(provider_id)

    async def on_watch(self, rest: str) -> float | None:
        """Timer ``cbwatch``: the leg never said how it ended; end the attempt."""
        call = await self._dialing(rest)
        if call is None:
            return None
        if call.provider_id is not None and self.telephony is not None:
            await self.telephony.hang_up(call.provider_id)
        await self._fail_attempt(call, "no_status", retryable=True)
        return None

    # --- what the phone network says (CallbackEvents) --------------------------------------

    async def on_leg_event(self, event: LegEvent) -> None:
        call = await self._calls.find(event.call_id)
        if call is None:
            return
        if call.channel is not CallChannel.CALLBACK:
            return
        try:
            _, call = await self._calls.update(
                call.call_id,
                partial(cb.leg_heard, provider_id=event.provider_id, status=event.status.value),
                current=call,
            )
        except CallError:
            return  # a replay, or overtaken by a later status: acted on already
        stale = call.final or call.dials != event.attempt
        if stale or call.state not in (CallState.DIALING, CallState.CONNECTED):
            if event.status in (LegStatus.RINGING, LegStatus.ANSWERED) and self.telephony:
                await self.telephony.hang_up(event.provider_id)  # nobody wants this leg now
            return
        now = self._clock()
        status = event.status
        if status in (LegStatus.INITIATED, LegStatus.ANSWERED):
            await self._leg_placed(call, event.attempt, event.provider_id)
        elif status is LegStatus.RINGING:
            await self._leg_placed(call, event.attempt, event.provider_id)
            await self._move(
                await self._calls.get(call.call_id),
                partial(cb.leg_ringing, attempt=event.attempt, now=now),
            )
        elif status is LegStatus.COMPLETED:
            if call.state is CallState.CONNECTED:
                await self._complete(call, event.duration_s or 0)
            else:
                outcome = "voicemail" if call.answered_by == "machine" else "no_answer"
                await self._fail_attempt(call, outcome, retryable=True)
        else:
            outcome = {
                LegStatus.BUSY: "busy",
                LegStatus.NO_ANSWER: "no_answer",
                LegStatus.FAILED: "failed",
                LegStatus.CANCELED: "no_answer",
            }[status]
            await self._fail_attempt(call, outcome, retryable=True)

    async def on_answer(
        self, call_id: str, attempt: int, provider_id: str, answered_by: AnsweredBy
    ) -> Instruction:
        gone = HangUp("Sorry, this call is no longer needed. Goodbye.")
        call = await self._calls.find(call_id)
        if call is None:
            return gone
        site = self._sites[call.site]
        now = self._clock()
        answered = partial(cb.leg_answered, attempt=attempt, answered_by=answered_by.value, now=now)
        if answered_by is AnsweredBy.MACHINE:
            # Never an agent for a machine; its completed status ends the attempt (voicemail).
            try:
                await self._calls.update(call_id, answered)
            except (CallError, Conflict, NotFound):
                pass
            return HangUp()
        agent = site.agents.get(call.agent_id or "")
        if agent is None or not agent.mobile:
            # Routing picks only agents with a phone: the config changed under a live call.
            await self._fail_attempt(call, "agent_unreachable", retryable=True)
            return HangUp("Sorry, we cannot connect you right now. We will call you back.")
        try:
            _, after = await self._calls.update(call_id, answered)
        except (CallError, Conflict, NotFound):
            return gone
        await self._notify.call_update(after)
        return Bridge(
            say=f"Hello, this is {site.name}. Connecting you to {agent.name} now.",
            number=agent.mobile,
            caller_id=site.caller_ids[0],
        )

    async def on_bridge_result(
        self, call_id: str, attempt: int, provider_id: str, agent_answered: bool
    ) -> Instruction:
        if agent_answered:
            return HangUp()
        call = await self._calls.find(call_id)
        if call is None:
            return HangUp()
        if call.dials == attempt and call.state is CallState.CONNECTED:
            await self._fail_attempt(call, "agent_unreachable", retryable=True)
        return HangUp("Sorry, we could not connect you right now. We will call you back.")

    # --- endings ---------------------------------------------------------------------------

    async def _complete(self, call: Call, duration_s: int) -> None:
        now = self._clock()
        try:
            before, done = await self._calls.update(
                call.call_id, partial(cb.completed, attempt=call.dials, now=now)
            )
        except (CallError, Conflict, NotFound):
            return
        await self._release_call(before, done)
        if before.agent_id is not None:
            await self._store.record_served(done.site, done.visitor_id, before.agent_id)
        await self._store.record_handle_time(done.site, float(max(duration_s, 1)))
        minutes = max(1, math.ceil(duration_s / 60))
        # One minute of each leg was reserved when the dial started.
        extra = (minutes - 1) * DIAL_RESERVE
        if extra:
            await self._store.add_to_counter(spend_key(done.site, now), extra, SPEND_TTL_S)
        self._metrics.callbacks.labels("completed").inc()
        await self._notify.call_update(done)

    async def _fail_attempt(self, call: Call, outcome: str, retryable: bool) -> None:
        now = self._clock()
        site = self._sites[call.site]
        policy = site.callback_policy
        retry_at: float | None = None
        if retryable and outcome not in cb.FINAL_OUTCOMES and call.dials <= policy.retries:
            try:
                number = check_number(call.phone or "", policy)
                retry_at = next_allowed_at(number, policy, now + policy.retry_interval_s)
            except PhoneRefused:
                retry_at = None  # no hour of the week is daytime at every one of its zones
        try:
            before, after = await self._calls.update(
                call.call_id,
                partial(
                    cb.attempt_failed,
                    attempt=call.dials,
                    outcome=outcome,
                    retry_at=retry_at,
                    now=now,
                ),
            )
        except (CallError, Conflict, NotFound):
            return  # the attempt already ended (a late or repeated webhook)
        self._metrics.dials.labels(outcome).inc()
        await self._release_call(before, after)
        if after.state is CallState.SCHEDULED:
            await self._store.schedule_timer(due_timer_id(after), retry_at or now)
        else:
            self._metrics.callbacks.labels("failed").inc()
        # The agent is let go (a retry is routed afresh): their app must hear of it too.
        await self._notify.call_update(after, former_agent=before.agent_id)

    async def _refused(self, call: Call, reason: str, detail: str) -> None:
        now = self._clock()
        try:
            before, after = await self._calls.update(
                call.call_id, partial(cb.refused, reason=reason, detail=detail, now=now)
            )
        except (CallError, Conflict, NotFound):
            return
        await self._release_call(before, after)
        await self._notify.call_update(after, former_agent=before.agent_id)

    async def _release_call(self, before: Call, after: Call) -> None:
        """Free what the attempt (and, once final, the callback) held."""
        await self._store.release_slot(f"out:{after.site}", after.call_id)
        await self._store.queue_remove(after.site, after.call_id)
        if before.agent_id is not None and before.state in (
            CallState.DIALING,
            CallState.CONNECTED,
        ):
            await self._store.release_agent(after.site, before.agent_id, after.call_id)
            await self._presence.set_active_call(after.site, before.agent_id, None)
        if after.final:
            await self._release_open(after.site, after.visitor_id, after.phone or "", after.call_id)

    async def after_end(self, before: Call, after: Call) -> None:
        """Called by the call service when a callback is ended from outside the phone network
        (the visitor cancels, the agent hangs up): hang up the leg, free what it held."""
        if before.provider_id is not None and self.telephony is not None:
            try:
                await self.telephony.hang_up(before.provider_id)
            except TelephonyError as e:
                log.warning("hang-up of %s failed: %s", before.provider_id, e.message)
        await self._release_call(before, after)
        self._metrics.callbacks.labels(after.state.value).inc()
