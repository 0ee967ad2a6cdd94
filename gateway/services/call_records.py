"""The call records every flow stands on: read a call, apply a core transition with
compare-and-set, reserve and release agents, typed durable timers, ring an agent (one ring
payload for every channel), end a call, and the registry of flows by channel.

Every change to a call is a pure transition (gateway.core.call, gateway.core.callback) applied
with compare-and-set on the stored version, so any node may move any call: the agent's node
applies the accept, the visitor's node the cancel, whichever node claims a ring timer applies
the timeout. Agents are reserved atomically in the store before they ring, so no agent rings
for two calls. Notifications go through ``CallNotifier``, which the socket.io edge implements.

A flow (the browser call, the PSTN callback, ...) owns the calls of one ``CallChannel``. The
paths every channel shares (a ring running out, an accept, a decline, an end, an agent's
socket going away) reach the owning flow through ``flows``, which the app fills: adding a
channel is adding a flow and registering it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import partial
from typing import Protocol

from gateway.core import agent_ring
from gateway.core import call as calls
from gateway.core.call import Call, CallChannel, CallError, CallState
from gateway.core.errors import Conflict, Forbidden, NotFound, StoreUnavailable
from gateway.core.model import Site, languages_of
from gateway.core.ringing import RingingAgents, RingNote, ring_event, ring_over_event
from gateway.i18n import Messages, messages_for
from gateway.ops.log_context import tag_call
from gateway.ops.tasks import TaskGroup
from gateway.services.experiments import Experiments
from gateway.services.presence_service import PresenceService
from gateway.services.status_token import StatusTokens
from gateway.services.store_retry import UntilStored
from gateway.store.base import CallRow, Store
from gateway.telephony import AgentInstruction
from gateway.wire.calls import ring_to_wire
from gateway.wire.codec import Json, call_from_record, call_to_record

log = logging.getLogger(__name__)

# A reservation outlives its ring a little, so that a node that died mid-ring still frees
# the agent, but never before the ring timer has had its chance.
RESERVATION_GRACE_S = 10.0
# Once connected, the agent stays reserved until the call ends: presence says on_call too,
# but another node's copy of presence may lag, and only the reservation is atomic.
CALL_HOLD_S = 4 * 3600.0
# A call whose audio is in the agent app survives the app's socket dropping for this long:
# the app reconnects and takes the call over (``CallDesk.resume_agent``).
AGENT_GRACE_S = 10.0
# Open calls whose last stored change a node keeps (``CallRecords.remembered``): the calls it
# routed or accepted in the last few seconds at a busy node's rate, a few KB each.
REMEMBERED_CALLS = 2_000


class TimerKind(StrEnum):
    """The durable timers of calls; the value is the id's prefix in the store."""

    RING = "ring"
    VISITOR_GONE = "visitor_gone"
    AGENT_GONE = "agent_gone"
    CALLBACK_DUE = "cbdue"
    CALLBACK_DIAL = "cbdial"
    CALLBACK_WATCH = "cbwatch"
    PROMISE = "cbpromise"
    """A waiting callback's promise is reviewed (gateway/services/promises.py)."""
    SMS_BACK = "smsback"
    """Not a call's: an agent's ``BACK 15`` by SMS (gateway/services/sms_presence.py)."""


@dataclass(frozen=True, slots=True)
class TimerId:
    """``{kind}:{call_id}:{key}``; ``key`` makes the timer one of its call's (the ring's
    attempt, the socket that left, the dial attempt, ...)."""

    kind: TimerKind
    call_id: str
    key: str

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.call_id}:{self.key}"

    @classmethod
    def parse(cls, kind: TimerKind, rest: str) -> TimerId:
        """The id the timer loop hands over without its ``kind:`` prefix (call ids have no
        colon; a key may)."""
        call_id, _, key = rest.partition(":")
        return cls(kind, call_id, key)

    @property
    def attempt(self) -> int:
        """The attempt a ring, dial or watch timer is for."""
        return int(self.key)

    @staticmethod
    def ring(call: Call) -> TimerId:
        return TimerId(TimerKind.RING, call.call_id, str(call.attempt))


TimerHandler = Callable[[TimerId], Awaitable[float | None]]
"""Returns None when the timer is done, or when to run it again (gateway.services.timers)."""


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

    async def key(self, call: Call, key: str) -> None:
        """A key the customer pressed on their phone, to the agent's accepting socket."""

    async def restart_media(self, call: Call, to_agent: bool) -> None:
        """``rtc:restart`` to the call's browser (the visitor's sockets, or the agent's
        accepting socket): its audio's other end changed; restart ICE and offer again."""

    async def replay(self, call: Call, ring: Json | None, rings_over: dict[str, str]) -> None:
        """The call's current state to this node's own sockets only: ``call:ring_stop`` to
        each agent in ``rings_over`` (with its reason), ``call:ring`` to the agent when
        ``ring`` is given, and ``call:update`` to the visitor, the call's agent and the board.
        Each repeats what a socket may already have had, which clients take as no change."""


class CallFlow(Protocol):
    """What the shared paths ask of the flow that owns a call's channel."""

    @property
    def channel(self) -> CallChannel: ...

    def timers(self) -> Mapping[TimerKind, TimerHandler]:
        """The flow's own timers, registered with the node's timer loop."""

    async def accepted(self, call: Call) -> None:
        """Its agent accepted the ring (the ring is stopped, the agent held): go on."""

    async def ring_missed(self, call: Call) -> Call:
        """The agent declined or did not answer (the ring is over): the next step."""

    async def ended(self, before: Call, after: Call, reason: str) -> None:
        """The call was ended from outside the flow (a hang-up, a cancel): free what it held
        and tell the parties."""

    async def ring_payload(self, call: Call) -> Json:
        """The ``call:ring`` of this call ringing its agent now."""

    async def replay(self, call: Call) -> tuple[Json | None, dict[str, str]]:
        """What ``CallNotifier.replay`` repeats of the call's rings: the current ring, if it
        is repeated, and the rings over with their reasons."""

    async def agent_left(self, call: Call, agent_sid: str, left_at: float) -> None:
        """The agent's accepting socket closed at ``left_at``."""

    async def agent_gone(self, call_id: str, agent_sid: str) -> None:
        """The agent's accepting socket is gone for good (its node died)."""

    async def signal(self, call: Call, to_agent: bool, payload: Json) -> None:
        """Relay an SDP or ICE message between the parties of the connected call."""

    async def phone_accepts(
        self, call: Call, accept: Callable[[], Awaitable[Call]]
    ) -> AgentInstruction:
        """Its agent pressed 1 on their phone for the ringing ``call``: ``accept`` takes the
        call as the app's accept does; the answer is what the agent's leg does then."""

    async def ring_details(self, call: Call, agent_id: str) -> tuple[Json, Json | None]:
        """What a ring of ``call`` for ``agent_id`` adds (``ring``'s visitor and extra)."""

    async def held(self, call: Call, on: bool) -> None:
        """Its agent put the call on hold (``on``) or took it off: the media follows."""

    async def phone_leg_ended(self, call: Call) -> None:
        """The leg of its agent, who took the call on their phone, ended (she hung up, or
        the bridge under it died): what that means for the call (raises ``Conflict`` when
        it has ended already)."""


def log_ended(call: Call) -> None:
    """One line per call, as it ends: what an operator looks for first (the line carries the
    call's id and site, gateway/ops/log_context.py)."""
    talked = (
        f", talked {call.ended_at - call.connected_at:.0f} s"
        if call.connected_at is not None and call.ended_at is not None
        else ""
    )
    log.info(
        "call %s ended %s (%s) on %s, agent %s%s",
        call.call_id,
        call.state.value,
        call.reason,
        call.channel.value,
        call.agent_id or "none",
        talked,
    )


class CallRecords:
    def __init__(
        self,
        sites: dict[str, Site],
        store: Store,
        presence: PresenceService,
        notifier: CallNotifier,
        tasks: TaskGroup,
        status_tokens: StatusTokens,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sites = sites
        self.status_tokens = status_tokens
        """Each call's ticket token, the same on every node."""
        self.store = store
        self.presence = presence
        self.notify = notifier
        self.clock = clock
        self._until_stored = UntilStored(tasks, clock)
        self.ringing = RingingAgents()
        """Who rings for a call anywhere (gateway.core.ringing): routing skips them without a
        store round trip, and the button does not promise them."""
        self.experiments: Experiments | None = None
        """The sites' routing experiments: each new call gets its arm as it is made."""
        self.observers: list[Callable[[Call | None, Call], None]] = []
        """Told of every call this node stored: new (``None`` before) or changed (the
        manager's figures, gateway/services/call_metrics.py; the call history,
        gateway/services/history_writer.py). Each must be quick and must not raise."""
        self.flows: dict[CallChannel, CallFlow] = {}
        """The flow owning each channel's calls; filled by the app (``register``)."""
        self._stored: dict[str, Call] = {}
        """Open calls as this node last stored them, oldest first (``remembered``)."""

    def register(self, flow: CallFlow) -> None:
        self.flows[flow.channel] = flow

    def agent_text(self, call: Call, ring: int | None = None) -> Messages:
        """The sentences for the agent of ``call`` (of its ring ``ring``: once the call has
        moved on, the agent whose ring ended last), in their first language we speak."""
        agent_id = call.agent_id if ring is None else agent_ring.agent_of_ring(call, ring)
        site = self.sites[call.site]
        agent = site.agents.get(agent_id or "")
        if agent is None:
            return messages_for()
        return messages_for(*languages_of(agent, site.branches.get(agent.branch or "")))

    def customer_text(self, call: Call) -> Messages:
        """The sentences for the customer, in the language their request asked for."""
        return messages_for(call.request.language)

    def flow(self, call: Call) -> CallFlow:
        return self.flows[call.channel]

    def timer_handlers(self) -> dict[TimerKind, Callable[[str], Awaitable[float | None]]]:
        """Every call timer, by kind, for the timer loop (which hands over the id without its
        kind): the ring timer, shared, and each flow's own. Ids are parsed here only."""
        typed: dict[TimerKind, TimerHandler] = {TimerKind.RING: self._on_ring_timer}
        for flow in self.flows.values():
            typed.update(flow.timers())

        def untyped(
            kind: TimerKind, handler: TimerHandler
        ) -> Callable[[str], Awaitable[float | None]]:
            async def run(rest: str) -> float | None:
                return await handler(TimerId.parse(kind, rest))

            return run

        return {kind: untyped(kind, handler) for kind, handler in typed.items()}

    # --- records ---------------------------------------------------------------------------------

    async def get(self, call_id: str) -> Call:
        row = await self.store.get_call(call_id)
        if row is None:
            raise NotFound(f"no call {call_id!r}")
        tag_call(call_id, row.site)
        return call_from_record(row.data, row.version)

    async def find(self, call_id: str) -> Call | None:
        row = await self.store.get_call(call_id)
        return None if row is None else self.from_row(row)

    def from_row(self, row: CallRow) -> Call:
        """The call a row read from the store holds."""
        tag_call(row.call_id, row.site)
        return call_from_record(row.data, row.version)

    async def remembered(self, call_id: str, wanted: Callable[[Call], bool]) -> Call:
        """The call as this node last stored it, when that copy is as ``wanted``; else as
        read from the store (``NotFound`` if there is none). Saves the read on the node that
        made the call's last change, as the agent's node hanging up the call it accepted.

        Only for a decision followed by a compare-and-set write with this call as
        ``update``'s ``current``: another node may have changed the call since, and then that
        write reads it again and decides on the newest. A copy not as ``wanted`` (stale, or
        a request that is refused) is read again, so a refusal is always the store's."""
        copy = self._stored.get(call_id)
        if copy is not None and wanted(copy):
            tag_call(call_id, copy.site)
            return copy
        return await self.get(call_id)

    def _remember(self, call: Call) -> None:
        stored = self._stored
        stored.pop(call.call_id, None)
        if call.final:
            return
        stored[call.call_id] = call
        if len(stored) > REMEMBERED_CALLS:
            del stored[next(iter(stored))]

    async def open_calls(self, site_id: str, limit: int = 200) -> list[Call]:
        """The site's calls not ended: those changed most recently (ringing, talking), then
        the callback queue in order (some waiting since long ago); at most ``limit`` of
        each (the supervisor's board)."""
        recent, queued = await asyncio.gather(
            self.store.list_calls(site_id, limit), self.store.queue_head(site_id, limit)
        )
        found = {
            c.call_id: c
            for c in (call_from_record(r.data, r.version) for r in recent)
            if not c.final
        }
        missing = [i for i in queued if i not in found]
        for call in await asyncio.gather(*(self.find(i) for i in missing)):
            if call is not None and not call.final:
                found[call.call_id] = call
        return sorted(found.values(), key=lambda c: c.created_at)

    async def enroll(self, call: Call) -> Call:
        """``call`` (new) with its arm of its site's running experiment, if one runs."""
        return call if self.experiments is None else await self.experiments.enroll(call)

    async def create(self, call: Call) -> Call:
        """Store a new call (version 1), enrolled; ``Conflict`` if a call of that id exists
        (an id derived from another call's, made twice at once: a follow-up)."""
        call = await self.enroll(call)
        call = replace(call, version=1)
        tag_call(call.call_id, call.site)
        row = CallRow(call.call_id, call.site, 1, call_to_record(call))
        if not await self.store.put_call(row):
            raise Conflict(f"call {call.call_id} exists", code="conflict")
        self._remember(call)
        for observe in self.observers:
            observe(None, call)
        return call

    async def update(
        self,
        call_id: str,
        transition: Callable[[Call], Call],
        current: Call | None = None,
        holding: str | None = None,
    ) -> tuple[Call, Call]:
        """Apply ``transition`` with compare-and-set, retrying when another node got there
        first; the transition sees the newest call each time and may refuse (CallError).

        ``current``, the call as this node just read or wrote it, saves the first read: if it
        is no longer the newest the write fails and the call is read again, and a refusal of
        it is checked against a fresh read, so the outcome is as if it had been read here.

        ``holding``: an agent the call must still have reserved (an accept), the reservation
        then kept ``CALL_HOLD_S`` in the same write; ``Conflict`` (``ring_expired``) once it
        lapsed, maybe to another call."""
        for _ in range(8):
            if current is not None:
                tag_call(current.call_id, current.site)
                before, current = current, None
                try:
                    after = replace(transition(before), version=before.version + 1)
                except CallError:
                    continue  # maybe stale: decide on the stored call
            else:
                before = await self.get(call_id)
                after = replace(transition(before), version=before.version + 1)
            row = CallRow(call_id, after.site, after.version, call_to_record(after))
            stored = await (
                self.store.put_call(row)
                if holding is None
                else self.store.put_call_holding(row, holding, CALL_HOLD_S)
            )
            if stored is None:
                raise Conflict("this ring has ended", code="ring_expired")
            if stored:
                self._remember(after)
                if after.final and not before.final:
                    log_ended(after)
                for observe in self.observers:
                    observe(before, after)
                return before, after
        raise Conflict("the call is changing too fast; try again")

    async def move(self, call: Call, transition: Callable[[Call], Call]) -> Call:
        """``update``, and tell the parties when it changed the call."""
        _, after = await self.update(call.call_id, transition)
        if after.version != call.version:
            await self.notify.call_update(after)
        return after

    async def until_stored(self, step: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``step``, which must be idempotent; while the store is unreachable, run it
        again in the background with backoff, instead of losing it with the error."""
        await self._until_stored(step, name)

    def until_stored_soon(self, step: Callable[[], Awaitable[None]], name: str) -> None:
        """``until_stored`` in the background, for a step nobody waits for."""
        self._until_stored.soon(step, name)

    # --- agents and timers -----------------------------------------------------------------------

    async def release_agent(self, site_id: str, agent_id: str, call_id: str) -> None:
        """Let the agent go, if ``call_id`` still holds her."""
        await self.store.release_agent(site_id, agent_id, call_id)

    async def free_agent(
        self, site_id: str, agent_id: str, call_id: str, *also: Awaitable[object]
    ) -> None:
        """The agent's call is over: released, and no longer on a call. ``also``: store
        steps that go in the same write as the release (one round trip, not one each).

        The active call is cleared only once the release is done: were the release refused
        (a store failing), she would show as free while still reserved, and every node
        would skip her until a retry released her. A step of ``also`` that fails does not
        keep her on the call: its error is raised once she is off it."""
        released, *others = await asyncio.gather(
            self.store.release_agent(site_id, agent_id, call_id), *also, return_exceptions=True
        )
        if isinstance(released, BaseException):
            raise released
        await self.presence.set_active_call(site_id, agent_id, None)
        for outcome in others:
            if isinstance(outcome, BaseException):
                raise outcome

    async def free_if_held(self, site_id: str, agent_id: str, call_id: str) -> None:
        """Free the agent from ``call_id``, which has ended, if it still holds her: what its
        end frees, again, for an end stored by a node that died right after, or whose
        writer never heard it was stored (the store went away in between, and the party
        asks again). The reservation goes only while it names this call; the active call
        is read first, since she may have taken another call since."""
        await self.release_agent(site_id, agent_id, call_id)
        if (await self.store.get_presence(site_id, agent_id)).active_call == call_id:
            await self.presence.set_active_call(site_id, agent_id, None)

    async def schedule(self, timer: TimerId, due: float, keep: bool = False) -> None:
        """``keep``: leave the timer as it is if it exists (``TimerStore.schedule_timer``)."""
        await self.store.schedule_timer(str(timer), due, keep)

    async def finish(self, timer: TimerId) -> None:
        await self.store.finish_timer(str(timer))

    # --- rings -----------------------------------------------------------------------------------

    def ring_payload(
        self, ringing: Call, reasons: tuple[str, ...], visitor: Json, extra: Json | None = None
    ) -> Json:
        """``call:ring`` for a call ringing its agent; ``visitor`` and ``extra``: what the
        call's flow adds about the visitor and to the ring (``gateway.wire.calls.ring_to_wire``
        names the fields)."""
        return ring_to_wire(ringing, reasons, **visitor, **(extra or {}))

    def note_ring(self, site_id: str, agent_id: str, call_id: str, until: float) -> RingNote:
        """The agent rings for ``call_id`` until ``until`` at the latest: noted on this node at
        once, so that a concurrent route here skips them; the ring event tells the rest."""
        seen = self.presence.snapshot(site_id).get(agent_id)
        note = RingNote(call_id, until, seen.rev if seen is not None else -1)
        self.ringing.start(site_id, agent_id, note)
        return note

    async def ring(
        self,
        call: Call,
        agent_id: str,
        reasons: tuple[str, ...],
        now: float,
        visitor: Json,
        extra: Json | None = None,
    ) -> Call | None:
        """Ring ``agent_id``, whom ``call`` has reserved; None when the call moved on meanwhile
        (canceled), the reservation then let go."""
        site = self.sites[call.site]
        agent = site.agents[agent_id]
        # The reservation's own expiry.
        note = self.note_ring(
            call.site, agent_id, call.call_id, now + site.ring_timeout_s + RESERVATION_GRACE_S
        )
        branch = site.branches.get(agent.branch) if agent.branch else None
        who = f"{agent.name} in {branch.name}" if branch else agent.name
        try:
            _, ringing = await self.update(
                call.call_id,
                partial(
                    calls.ring,
                    agent_id=agent_id,
                    who=who,
                    reasons=reasons,
                    now=now,
                    ring_timeout_s=site.ring_timeout_s,
                ),
                call,
            )
        except (Conflict, NotFound):
            self.ringing.end(call.site, agent_id, call.call_id)
            await self.store.release_agent(call.site, agent_id, call.call_id)
            return None
        assert ringing.ring_expires_at is not None
        # The ring goes out first, its timeout stored in the same write to Redis, not a
        # round trip later. Should the node die in between, the reservation lapses as it
        # would have a moment later; a timer stored after an accept finds the call answered
        # and does nothing. The call's update right after the ring: the two are published
        # as one message (ObservedRedisManager._publish).
        await asyncio.gather(
            self.notify.ring(ringing, self.ring_payload(ringing, reasons, visitor, extra)),
            self.notify.call_update(ringing),
            self.schedule(TimerId.ring(ringing), ringing.ring_expires_at),
            self.store.publish(ring_event(call.site, agent_id, note)),
        )
        return ringing

    async def ring_over(self, before: Call, call: Call, agent_id: str, reason: str) -> None:
        """The ring of ``before`` for ``agent_id`` is over (``call`` is the call now)."""
        self.ringing.end(call.site, agent_id, call.call_id)
        # The agent's sockets are told the ring is over before she is released: a new ring,
        # which needs her reservation, then reaches every node after the stop, never before.
        await self.notify.ring_stop(call, agent_id, reason)
        await self.notify.call_update(call)
        await self.notify.sent()
        # The reservation is gone before other nodes hear the ring is, and route to her.
        await self.store.release_agent(call.site, agent_id, call.call_id)
        await self.store.publish(ring_over_event(call.site, agent_id, call.call_id))
        await self.finish(TimerId.ring(before))

    async def after_accept(self, call: Call, agent_id: str, again: bool = False) -> None:
        """What follows a stored accept (``CallDesk.accept``): the agent on_call, the ring
        stopped, the flow told (a callback's dial scheduled). Idempotent, and run ``again``
        when an outage or a dead node cut it short. The ring timer goes last: until then it
        is the net that runs this again (``ring_timeout``)."""
        if again:
            found = await self.find(call.call_id)
            if found is None or found.final or found.agent_id != agent_id:
                await self.finish(TimerId.ring(call))
                return
            call = found
        await self.presence.set_active_call(call.site, agent_id, call.call_id)
        # Other nodes' notes lapse as they see the agent go on_call: no event needed.
        self.ringing.end(call.site, agent_id, call.call_id)
        await self.notify.ring_stop(call, agent_id, "answered")
        await self.flow(call).accepted(call)
        await self.finish(TimerId.ring(call))
        if again and (await self.get(call.call_id)).final:
            # Ended while this ran: the end freed her before she was put on_call here.
            await self.free_agent(call.site, agent_id, call.call_id)

    async def _on_ring_timer(self, timer: TimerId) -> None:
        await self.ring_timeout(timer.call_id, timer.attempt)

    async def ring_timeout(self, call_id: str, attempt: int) -> None:
        now = self.clock()
        try:
            before, call = await self.update(call_id, lambda c: calls.ring_timeout(c, attempt, now))
        except (Conflict, NotFound):
            # The call moved on (answered, declined, ended) or is gone. Answered on this ring,
            # its timer is still here only if the accept's follow-up was cut short.
            moved = await self.find(call_id)
            if moved is not None and calls.accepted_on(moved, attempt):
                assert moved.agent_id is not None
                await self.after_accept(moved, moved.agent_id, again=True)
            return
        assert before.agent_id is not None
        await self.ring_over(before, call, before.agent_id, "no_answer")
        await self.flow(call).ring_missed(call)

    # --- shared by every flow --------------------------------------------------------------------

    async def end(
        self, call_id: str, reason: str, detail: str, current: Call | None = None
    ) -> Call:
        """End the call (a hang-up, a cancel); its flow frees what it held.

        Refused as ``call_ended`` when it has ended already, maybe by a request whose answer
        was lost as the store went away (the party asks again): the agent of ``current``
        is freed then, if the call still holds her."""
        try:
            before, call = await self.update(
                call_id, lambda c: calls.end(c, reason, detail, self.clock()), current
            )
        except CallError as e:
            if e.code == "call_ended" and current is not None and current.agent_id is not None:
                await self.free_if_held(current.site, current.agent_id, call_id)
            raise
        except StoreUnavailable:
            # The store may have taken the end and lost only its answer (Redis froze after
            # reading it): then nothing follows it here, and the party may never ask again.
            await self.until_stored(
                partial(self._after_unheard_end, call_id), f"unheard-end:{call_id}"
            )
            raise
        await self.flow(call).ended(before, call, reason)
        return call

    async def _after_unheard_end(self, call_id: str) -> None:
        """Once the store answers: if an end whose answer was lost was stored, the parties
        hear of it, and its agent is freed."""
        call = await self.find(call_id)
        if call is None or not call.final:
            return  # not stored: the call goes on, and the party's retry ends it
        await self.notify.call_update(call)
        await self.notify.sent()
        if call.agent_id is not None:
            await self.free_if_held(call.site, call.agent_id, call.call_id)

    async def hold(self, call: Call, on: bool) -> Call:
        """Put the connected ``call`` on hold, or take it off: noted in the timeline (both
        parties see it), the media following through the call's flow. A repeat changes
        nothing."""
        before, after = await self.update(
            call.call_id, partial(calls.hold, on=on, now=self.clock()), call
        )
        if after.timeline != before.timeline:
            await self.flow(after).held(after, on)
            await self.notify.call_update(after)
        return after

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
        await self.flow(call).signal(call, to_agent=not from_agent, payload=payload)
