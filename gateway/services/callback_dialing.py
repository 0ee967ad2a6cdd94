"""A PSTN callback's phone legs: dial the visitor once per attempt, watch the leg, hear what
the phone network says (``CallbackEvents``), bridge to the agent's phone, and end the attempt
(a retry by the site's policy, or the end of the callback), freeing what it held.

Durable timers (``CallRecords``), so any node may run any step:

- ``cbdial:{call_id}:{attempt}`` -- dial attempt ``attempt``. The store's ``claim_once``
  makes the dial happen at most once per attempt; a node that finds the claim taken (the
  claimer died) asks the provider whether the leg exists before dialing.
- ``cbwatch:{call_id}:{attempt}`` -- a leg that never reported an outcome is hung up and
  counted as a failed attempt, so no callback and no agent is left stuck.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import partial
from typing import Protocol

from gateway.core import callback as cb
from gateway.core.call import Call, CallChannel, CallError, CallState
from gateway.core.callback_admission import (
    DIAL_RESERVE,
    Subject,
    dial_quotas,
    over_spend_cap,
)
from gateway.core.errors import Conflict, Forbidden, NotFound
from gateway.core.phone_policy import PhoneRefused, check_number, next_allowed_at
from gateway.core.text import N_
from gateway.i18n import messages_for
from gateway.ops.metrics import Metrics
from gateway.services.audio_bridge import AudioBridge
from gateway.services.call_records import CallRecords, TimerHandler, TimerId, TimerKind
from gateway.services.mobile_ring import PHONE_SID_PREFIX, say_and_hang_up
from gateway.telephony import (
    AnsweredBy,
    Bridge,
    DialRequest,
    HangUp,
    Instruction,
    JoinRoom,
    LegEvent,
    LegStatus,
    Telephony,
    TelephonyError,
)
from gateway.wire.codec import Json

log = logging.getLogger(__name__)

CALL_YOU_BACK = N_("Sorry, we cannot connect you right now. We will call you back.")
NOT_NEEDED = N_("Sorry, this call is no longer needed. Goodbye.")
COULD_NOT_CONNECT = N_("Sorry, we could not connect you right now. We will call you back.")

# A dial waiting for a free outbound line (the site's concurrency cap) looks again this often.
LINE_POLL_S = 2.0
# How long the visitor's phone rings before it counts as no answer.
DIAL_TIMEOUT_S = 30
# A leg that has said nothing this long after its dial (ring time included) is given up.
LEG_SILENCE_S = DIAL_TIMEOUT_S + 90.0
# The longest a phone call holds an outbound line and its agent.
LINE_HOLD_S = 4 * 3600.0
SPEND_TTL_S = 2 * 86400


class Screen(Protocol):
    """Screening the agent's leg of a customer-first bridge
    (gateway.services.caller_screen)."""

    async def screened(self, call: Call) -> None: ...

    def took_it(self, call: Call) -> bool: ...

    async def next_bridge(self, call: Call) -> Bridge | None: ...


class AgentLegs(Protocol):
    """The agent's own phone leg, when the ring reached their mobile
    (gateway.services.mobile_ring)."""

    def room_for(self, call: Call) -> str | None: ...

    async def call_over(self, before: Call, after: Call) -> None: ...


def due_timer(call: Call) -> TimerId:
    """The callback should find an agent now (its time came, a retry is due, an agent
    declined)."""
    return TimerId(TimerKind.CALLBACK_DUE, call.call_id, f"{call.dials}:{call.attempt}")


class CallbackDialer:
    """The phone side of the callback flow (gateway.services.callback_service)."""

    def __init__(self, records: CallRecords, metrics: Metrics) -> None:
        self._records = records
        self._store = records.store
        self._notify = records.notify
        self._metrics = metrics
        self.telephony: Telephony | None = None
        """Set by the app when a provider is configured; without one, callbacks are refused."""
        self.agent_legs: AgentLegs | None = None
        self.screen: Screen | None = None
        self.bridge: AudioBridge | None = None
        """The audio bridge, when media workers run: an agent who accepted in the app talks
        there, not on her own phone."""

    def timers(self) -> Mapping[TimerKind, TimerHandler]:
        return {TimerKind.CALLBACK_DIAL: self.on_dial, TimerKind.CALLBACK_WATCH: self.on_watch}

    async def release_open(self, site_id: str, visitor_id: str, e164: str, call_id: str) -> None:
        await self._store.release_open_callback_slot(site_id, "visitor", visitor_id, call_id)
        await self._store.release_open_callback_slot(site_id, "number", e164, call_id)

    # --- dialing ---------------------------------------------------------------------------

    async def _dialing(self, timer: TimerId) -> Call | None:
        """The callback of a dial or watch timer, if it is still dialing that attempt (else
        the timer is stale: the attempt ended or the callback moved on)."""
        call = await self._records.find(timer.call_id)
        if call is None or call.final or call.state is not CallState.DIALING:
            return None
        return call if str(call.dials) == timer.key else None

    async def on_dial(self, timer: TimerId) -> float | None:
        """Timer ``cbdial``: place dial attempt ``attempt`` exactly once."""
        call = await self._dialing(timer)
        if call is None or call.provider_id is not None:
            return None
        call_id, attempt = call.call_id, call.dials
        now = self._records.clock()
        site = self._records.sites[call.site]
        policy = site.callback_policy
        if self.telephony is None or not site.caller_ids:
            await self._fail_attempt(call, "dial_error", retryable=False)
            return None
        if not await self._store.acquire_outbound_line(
            call.site, call.call_id, policy.max_concurrent_calls, LINE_HOLD_S, now
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
        specs = dial_quotas(policy)
        full = await self._store.take_callback_quotas(
            specs, call.site, {Subject.NUMBER: call.phone}, request.idempotency_key, now
        )
        if full is not None:
            code = specs[full].refusal.code
            self._metrics.callback_refusals.labels(code).inc()
            await self._fail_attempt(call, code, retryable=False)
            return None
        if not await self._store.claim_dial_once(request.idempotency_key, 2 * 86400):
            # Someone claimed this attempt and did not finish (its node died). Did the leg
            # get placed? The provider knows; dial only if it does not.
            since = (call.dial_started_at or now) - 5
            found = await self.telephony.find_leg(request, since)
            if found is not None:
                await self._watch(call_id, attempt, now)
                await self._leg_placed(call, attempt, found)
                return None
        # Reserve first, then check: one atomic add, so two dials racing cannot both fit.
        spent = await self._store.add_spend(call.site, now, DIAL_RESERVE, SPEND_TTL_S)
        if over_spend_cap(policy, spent):
            await self._store.add_spend(call.site, now, -DIAL_RESERVE, SPEND_TTL_S)
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
        timer = TimerId(TimerKind.CALLBACK_WATCH, call_id, str(attempt))
        await self._records.schedule(timer, now + LEG_SILENCE_S)

    async def _leg_placed(self, call: Call, attempt: int, provider_id: str) -> None:
        try:
            await self._records.update(
                call.call_id, partial(cb.leg_placed, attempt=attempt, provider_id=provider_id)
            )
        except (Conflict, NotFound):
            # Canceled while the dial was on its way: the phone must not keep ringing.
            if self.telephony is not None:
                await self.telephony.hang_up(provider_id)

    async def on_watch(self, timer: TimerId) -> float | None:
        """Timer ``cbwatch``: the leg never said how it ended; end the attempt."""
        call = await self._dialing(timer)
        if call is None:
            return None
        if call.provider_id is not None and self.telephony is not None:
            await self.telephony.hang_up(call.provider_id)
        await self._fail_attempt(call, "no_status", retryable=True)
        return None

    # --- what the phone network says (CallbackEvents) --------------------------------------

    async def on_leg_event(self, event: LegEvent) -> None:
        found = await self._records.find(event.call_id)
        if found is None or found.channel is not CallChannel.CALLBACK:
            return
        call = found

        def heard(c: Call) -> Call:
            c = cb.check_leg(c, event.attempt, event.provider_id)
            return cb.leg_heard(c, event.provider_id, event.status.value)

        try:
            _, call = await self._records.update(call.call_id, heard, current=call)
        except CallError as e:
            _refuse_unknown_leg(e)
            return  # a replay, or overtaken by a later status: acted on already
        stale = call.final or call.dials != event.attempt
        if stale or call.state not in (CallState.DIALING, CallState.CONNECTED):
            if event.status in (LegStatus.RINGING, LegStatus.ANSWERED) and self.telephony:
                await self.telephony.hang_up(event.provider_id)  # nobody wants this leg now
            return
        now = self._records.clock()
        status = event.status
        if status in (LegStatus.INITIATED, LegStatus.ANSWERED):
            await self._leg_placed(call, event.attempt, event.provider_id)
        elif status is LegStatus.RINGING:
            await self._leg_placed(call, event.attempt, event.provider_id)
            await self._records.move(
                await self._records.get(call.call_id),
                partial(cb.leg_ringing, attempt=event.attempt, now=now),
            )
        elif status is LegStatus.COMPLETED:
            if call.state is CallState.CONNECTED and call.media is not None and self.bridge:
                # Bridged to the app: the leg also ends when its media worker dies.
                done = partial(self._complete, call, event.duration_s or 0)
                await self.bridge.phone_leg_ended(call, done)
            elif call.state is CallState.CONNECTED:
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
        call = await self._records.find(call_id)
        if call is None:
            return say_and_hang_up(messages_for(), NOT_NEEDED)
        text = self._records.customer_text(call)
        gone = say_and_hang_up(text, NOT_NEEDED)
        _check_leg(call, attempt, provider_id)
        site = self._records.sites[call.site]
        now = self._records.clock()
        answered = partial(cb.leg_answered, attempt=attempt, answered_by=answered_by.value, now=now)
        if answered_by is AnsweredBy.MACHINE:
            # Never an agent for a machine; its completed status ends the attempt (voicemail).
            try:
                await self._records.update(call_id, answered)
            except (Conflict, NotFound):
                pass
            return HangUp()
        agent = site.agents.get(call.agent_id or "")
        in_app = self.in_app(call)
        if agent is None or not (agent.mobile or in_app):
            # Routing picks only agents it can connect: the config changed under a live call.
            await self._fail_attempt(call, "agent_unreachable", retryable=True)
            return say_and_hang_up(text, CALL_YOU_BACK)
        try:
            _, after = await self._records.update(call_id, answered)
        except (Conflict, NotFound):
            return gone
        await self._notify.call_update(after)
        hello = text.gettext("Hello, this is {site}. Connecting you to {agent} now.").format(
            site=site.name, agent=agent.name
        )
        room = self.agent_legs.room_for(after) if self.agent_legs is not None else None
        if room is not None:
            # The agent took the call on their phone and waits in the callback's room.
            return JoinRoom(room, say=hello, language=text.say_language)
        if in_app and self.bridge is not None:
            # The agent accepted in the app: she talks there, through the audio bridge.
            try:
                return await self.bridge.to_app(after, hello, text.say_language)
            except (Conflict, NotFound):
                return gone
            except TelephonyError as e:
                log.warning("bridging %s to the app failed: %s %s", call_id, e.code, e.message)
                await self._fail_attempt(after, "agent_unreachable", retryable=True)
                return say_and_hang_up(text, CALL_YOU_BACK)
        assert agent.mobile is not None
        # Customer first, nobody has accepted yet: the agent's leg is screened (press 1).
        screen = self.screen is not None and not site.callback_policy.agent_first
        if self.screen is not None and screen:
            await self.screen.screened(after)
        return Bridge(
            say=hello,
            number=agent.mobile,
            caller_id=site.caller_ids[0],
            language=text.say_language,
            screen=screen,
        )

    async def bridge_signal(self, call: Call, payload: Json) -> None:
        """The agent app's ``rtc:signal`` for the bridged callback's session."""
        assert self.bridge is not None
        await self.bridge.from_browser(call, payload)

    @property
    def bridged(self) -> bool:
        """Media workers run: an agent in the app can talk there."""
        return self.bridge is not None and self.bridge.enabled

    def in_app(self, call: Call) -> bool:
        """The callback's agent accepted in the agent app and the bridge can carry her
        audio there (else she talks on her own phone)."""
        return (
            self.bridged
            and call.agent_sid is not None
            and not call.agent_sid.startswith(PHONE_SID_PREFIX)
        )

    async def on_bridge_result(
        self, call_id: str, attempt: int, provider_id: str, agent_answered: bool
    ) -> Instruction:
        call = await self._records.find(call_id)
        if agent_answered and (call is None or self.screen is None or self.screen.took_it(call)):
            return HangUp()
        if call is None:
            return HangUp()
        _check_leg(call, attempt, provider_id)
        if agent_answered:
            return HangUp()
        if call.dials == attempt and call.state is CallState.CONNECTED:
            bridge = await self.screen.next_bridge(call) if self.screen is not None else None
            if bridge is not None:
                return bridge  # the next agent, while the visitor waits on the line
            await self._fail_attempt(call, "agent_unreachable", retryable=True)
        return say_and_hang_up(self._records.customer_text(call), COULD_NOT_CONNECT)

    # --- endings ---------------------------------------------------------------------------

    async def _complete(self, call: Call, duration_s: int) -> None:
        now = self._records.clock()
        try:
            before, done = await self._records.update(
                call.call_id, partial(cb.completed, attempt=call.dials, now=now)
            )
        except (Conflict, NotFound):
            return
        await self._release_call(before, done)
        if before.agent_id is not None:
            await self._store.record_served(done.site, done.visitor_id, before.agent_id)
        await self._store.record_handle_time(done.site, float(max(duration_s, 1)))
        minutes = max(1, math.ceil(duration_s / 60))
        # One minute of each leg was reserved when the dial started.
        extra = (minutes - 1) * DIAL_RESERVE
        if extra:
            await self._store.add_spend(done.site, now, extra, SPEND_TTL_S)
        self._metrics.callbacks.labels("completed").inc()
        await self._notify.call_update(done)

    async def _fail_attempt(self, call: Call, outcome: str, retryable: bool) -> None:
        now = self._records.clock()
        policy = self._records.sites[call.site].callback_policy
        retry_at: float | None = None
        if retryable and outcome not in cb.FINAL_OUTCOMES and call.dials <= policy.retries:
            try:
                number = check_number(call.phone or "", policy)
                retry_at = next_allowed_at(number, policy, now + policy.retry_interval_s)
            except PhoneRefused:
                retry_at = None  # no hour of the week is daytime at every one of its zones
        try:
            before, after = await self._records.update(
                call.call_id,
                partial(
                    cb.attempt_failed,
                    attempt=call.dials,
                    outcome=outcome,
                    retry_at=retry_at,
                    now=now,
                ),
            )
        except (Conflict, NotFound):
            return  # the attempt already ended (a late or repeated webhook)
        self._metrics.dials.labels(outcome).inc()
        await self._release_call(before, after)
        if after.state is CallState.SCHEDULED:
            await self._records.schedule(due_timer(after), retry_at or now)
        else:
            self._metrics.callbacks.labels("failed").inc()
        # The agent is let go (a retry is routed afresh): their app must hear of it too.
        await self._notify.call_update(after, former_agent=before.agent_id)

    async def refused(self, call: Call, reason: str, detail: str) -> None:
        now = self._records.clock()
        try:
            before, after = await self._records.update(
                call.call_id, partial(cb.refused, reason=reason, detail=detail, now=now)
            )
        except (Conflict, NotFound):
            return
        await self._release_call(before, after)
        await self._notify.call_update(after, former_agent=before.agent_id)

    async def _release_call(self, before: Call, after: Call) -> None:
        """Free what the attempt (and, once final, the callback) held."""
        if self.agent_legs is not None:
            await self.agent_legs.call_over(before, after)
        if self.bridge is not None:
            await self.bridge.call_over(before)
        await self._store.release_outbound_line(after.site, after.call_id)
        await self._store.queue_remove(after.site, after.call_id)
        if before.agent_id is not None and before.state in (
            CallState.DIALING,
            CallState.CONNECTED,
        ):
            await self._records.free_agent(after.site, before.agent_id, after.call_id)
        if after.final:
            await self.release_open(after.site, after.visitor_id, after.phone or "", after.call_id)

    async def after_end(self, before: Call, after: Call) -> None:
        """The callback was ended from outside the phone network (the visitor cancels, the
        agent hangs up): hang up the leg, free what it held."""
        if before.provider_id is not None and self.telephony is not None:
            try:
                await self.telephony.hang_up(before.provider_id)
            except TelephonyError as e:
                log.warning("hang-up of %s failed: %s", before.provider_id, e.message)
        await self._release_call(before, after)
        self._metrics.callbacks.labels(after.state.value).inc()


def _refuse_unknown_leg(error: CallError) -> None:
    """A webhook naming a leg that is not its attempt's is refused (``Forbidden``, which the
    provider's edge answers as a refusal, counted), never acted on."""
    if error.code == cb.UNKNOWN_LEG_CODE:
        raise Forbidden(error.message, code=cb.UNKNOWN_LEG_CODE) from None


def _check_leg(call: Call, attempt: int, provider_id: str) -> None:
    try:
        cb.check_leg(call, attempt, provider_id)
    except CallError as e:
        _refuse_unknown_leg(e)
