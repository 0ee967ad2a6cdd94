"""Ring an agent on the device routing reached them on: the agent app, or their own mobile
phone through the telephony provider, with a whisper and "press 1 to take the call".

A flow over ``CallRecords`` for one way of reaching an agent, used by the callback flow
(gateway.services.callback_service) and, later, by the browser audio bridge. What each thing
the phone network says means for the ring is pure (gateway.core.agent_ring); this module
applies it with the shared paths: pressing 1 is the agent's ``call:accept`` (``CallDesk``),
anything else ends the ring as a decline does, and the ring timer of the site applies as in
the app (its expiry reaches ``ring_missed``, which hangs the leg up).

Agent first, the accepted agent's leg is kept: it waits in the callback's room (a
conference named ``cb-{call_id}``), which the visitor's leg joins when they answer
(gateway.services.callback_dialing asks ``room_for``). Should the visitor never answer, the
agent is told and the leg hung up (``call_over``).
"""

from __future__ import annotations

import logging
import math
from functools import partial

from gateway.core import agent_ring as ar
from gateway.core import call as calls
from gateway.core.agent_ring import RingDevice, RingEnd
from gateway.core.call import Call, CallError, CallState
from gateway.core.errors import Conflict, Forbidden, NotFound
from gateway.core.model import Channel
from gateway.core.routing import capabilities, carries
from gateway.core.text import N_
from gateway.i18n import Messages
from gateway.ops.metrics import Metrics
from gateway.services.call_desk import CallDesk
from gateway.services.call_records import RESERVATION_GRACE_S, CallRecords
from gateway.telephony import (
    AgentInstruction,
    AgentPhones,
    AgentRingRequest,
    AnsweredBy,
    HangUp,
    LegStatus,
    TelephonyError,
    Whisper,
)
from gateway.wire.codec import Json

log = logging.getLogger(__name__)

MIN_RING_S = 5
"""The shortest ring a provider is asked for (Twilio's ``<Dial>`` minimum; a calls.create
``Timeout`` below it would hardly let a phone ring)."""
KEY_TIMEOUT_S = 8
GOODBYE = N_("Thank you. Goodbye.")
CANNOT_CONNECT = N_("Sorry, this call cannot be connected now. Goodbye.")
TOO_LATE = N_("This call is no longer waiting for you. Goodbye.")
PHONE_SID_PREFIX = "phone:"
"""``Call.agent_sid`` of an agent who accepted on their phone: no socket of theirs carries
the call, so a socket leaving never ends it."""


def say_and_hang_up(text: Messages, message: str) -> HangUp:
    """``message`` (an ``N_`` message id) said in ``text``'s language, then the end."""
    return HangUp(text.gettext(message), text.say_language)


def room_name(call_id: str) -> str:
    return f"cb-{call_id}"


class MobileRing:
    def __init__(self, records: CallRecords, metrics: Metrics) -> None:
        self._records = records
        self._desk = CallDesk(records)
        self._metrics = metrics
        self.phones: AgentPhones | None = None
        """Set by the app when the telephony provider can ring agents' phones."""
        self.bridge = False
        """Set by the app when media workers bridge browser calls to phones."""

    @property
    def reach(self) -> tuple[Channel, ...]:
        """The channels an agent may be rung on, preferred first: the app, then the mobile
        when a provider can call it."""
        return (Channel.WEBRTC, Channel.PSTN) if self.phones is not None else (Channel.WEBRTC,)

    async def ring(
        self,
        call: Call,
        agent_id: str,
        channel: Channel,
        reasons: tuple[str, ...],
        now: float,
        visitor: Json,
        extra: Json | None = None,
    ) -> Call | None:
        """Ring ``agent_id`` (reserved for ``call``) on the device of ``channel``; None when
        the call moved on meanwhile (as ``CallRecords.ring``)."""
        ringing = await self._records.ring(call, agent_id, reasons, now, visitor, extra)
        if ringing is None:
            return None
        device = ar.device_for(channel)
        if device is RingDevice.APP or self.phones is None:
            await self._note(ringing, partial(ar.rang_on, device=RingDevice.APP, now=now))
            return ringing
        site = self._records.sites[call.site]
        agent = site.agents[agent_id]
        if agent.mobile is None or not site.caller_ids:
            await self._decline(ringing, ringing.attempt, RingEnd.FAILED)
            return ringing
        request = AgentRingRequest(
            call_id=call.call_id,
            ring=ringing.attempt,
            to=agent.mobile,
            caller_id=site.caller_ids[0],
            timeout_s=max(MIN_RING_S, math.ceil(site.ring_timeout_s)),
        )
        try:
            leg = await self.phones.ring_agent(request)
        except TelephonyError as e:
            log.warning("ringing %s's phone failed: %s %s", agent_id, e.code, e.message)
            await self._decline(ringing, ringing.attempt, RingEnd.FAILED)
            return ringing
        placed = partial(ar.leg_placed, attempt=ringing.attempt, provider_id=leg, now=now)
        try:
            await self._records.update(call.call_id, placed, ringing)
        except (Conflict, NotFound):
            await self._hang_up(leg)  # the ring ended (canceled) while the phone was called
        return ringing

    async def _note(self, call: Call | str, transition: partial[Call]) -> None:
        """``call``: as just read, or its id (read now)."""
        call_id, current = (call, None) if isinstance(call, str) else (call.call_id, call)
        try:
            await self._records.update(call_id, transition, current)
        except (Conflict, NotFound):
            pass  # the ring is over already: its end tells the rest

    # --- the agent's leg (AgentLegEvents) --------------------------------------------------

    async def _leg_call(self, call_id: str, ring: int, provider_id: str) -> Call:
        call = await self._records.find(call_id)
        if call is None or not ar.is_leg(call, ring, provider_id):
            raise Forbidden("this webhook is not about the agent's leg of that ring")
        return call

    async def on_agent_answer(
        self, call_id: str, ring: int, provider_id: str, answered_by: AnsweredBy
    ) -> AgentInstruction:
        call = await self._leg_call(call_id, ring, provider_id)
        text = self._records.agent_text(call, ring)
        if call.state is not CallState.RINGING or call.attempt != ring:
            return say_and_hang_up(text, TOO_LATE)
        end = ar.answered(answered_by.value)
        if end is not None:
            await self._decline(call, ring, end)
            return HangUp()
        site = self._records.sites[call.site]
        said = ar.whisper(call, site.name, None, text)
        return Whisper(said, KEY_TIMEOUT_S, text.say_language)

    async def on_agent_key(
        self, call_id: str, ring: int, provider_id: str, digits: str
    ) -> AgentInstruction:
        call = await self._leg_call(call_id, ring, provider_id)
        text = self._records.agent_text(call, ring)
        end = ar.key_pressed(digits)
        if end is not RingEnd.ACCEPTED_BY_KEY:
            await self._decline(call, ring, end)
            return say_and_hang_up(text, GOODBYE)
        if call.state is not CallState.RINGING or call.attempt != ring or call.agent_id is None:
            return say_and_hang_up(text, TOO_LATE)
        accept = partial(
            self._desk.accept, call.site, call.agent_id, PHONE_SID_PREFIX + provider_id, call_id
        )
        try:
            instruction = await self._records.flow(call).phone_accepts(call, accept)
        except (Conflict, NotFound):
            return say_and_hang_up(text, TOO_LATE)
        except TelephonyError as e:
            log.warning("connecting %s's phone failed: %s %s", call.agent_id, e.code, e.message)
            await self._decline(call, ring, RingEnd.FAILED)
            return say_and_hang_up(text, CANNOT_CONNECT)
        now = self._records.clock()
        self._metrics.mobile_rings.labels(end.value).inc()
        await self._note(
            call_id,
            partial(ar.ring_ended, attempt=ring, device=RingDevice.MOBILE, end=end, now=now),
        )
        return instruction

    async def on_agent_leg_event(
        self, call_id: str, ring: int, provider_id: str, status: LegStatus
    ) -> None:
        call = await self._leg_call(call_id, ring, provider_id)
        if status in (LegStatus.INITIATED, LegStatus.RINGING, LegStatus.ANSWERED):
            return
        if call.state is CallState.RINGING and call.attempt == ring:
            await self._decline(call, ring, ar.leg_ended(status.value))
        elif (
            call.state in (CallState.DIALING, CallState.CONNECTED)
            and ar.agent_leg(call) == provider_id
        ):
            # The agent's leg ended: while their customer's phone was ringing, or while
            # talking (a callback's room ends by itself; a bridged browser call ends here).
            try:
                await self._records.flow(call).phone_leg_ended(call)
            except (Conflict, NotFound):
                pass

    async def _decline(self, call: Call, ring: int, end: RingEnd) -> None:
        """The ring ends without the agent: as a decline in the app, the next agent is
        tried."""
        now = self._records.clock()
        agent_id = call.agent_id

        def declined(c: Call) -> Call:
            if c.state is not CallState.RINGING or c.attempt != ring or c.agent_id is None:
                raise CallError("stale", "that ring is over")
            after = calls.decline(c, c.agent_id, now)
            return ar.ring_ended(after, ring, RingDevice.MOBILE, end, now)

        try:
            before, after = await self._records.update(call.call_id, declined, call)
        except (Conflict, NotFound):
            return
        self._metrics.mobile_rings.labels(end.value).inc()
        assert before.agent_id is not None and agent_id is not None
        await self._records.ring_over(before, after, before.agent_id, "declined")
        await self._records.flow(after).ring_missed(after)

    # --- asked by the callback flow --------------------------------------------------------

    async def ring_missed(self, call: Call) -> bool:
        """The ring is over without an accept (the site's ring timeout, or a decline): a
        mobile leg still ringing or whispering is hung up, and the ending noted. True when
        the same agent's mobile rings next (the site's "mobile after desktop")."""
        ring = call.attempt
        if ar.ring_end_of(call, ring) is not None:
            return False  # ended by the phone network: noted, and the leg is over
        devices = ar.ring_devices(call)
        device = RingDevice(devices[-1]) if devices else RingDevice.APP
        last = next((e.event for e in reversed(call.timeline) if e.event != "queued"), "")
        end = RingEnd.TIMEOUT if last == "no_answer" else RingEnd.DECLINED
        now = self._records.clock()
        ended = partial(ar.ring_ended, attempt=ring, device=device, end=end, now=now)
        await self._note(call, ended)
        if device is RingDevice.MOBILE:
            self._metrics.mobile_rings.labels(end.value).inc()
        leg = ar.agent_leg(call)
        if device is RingDevice.MOBILE and leg is not None:
            await self._hang_up(leg)
        site = self._records.sites[call.site]
        agent = site.agents.get(call.tried[-1]) if call.tried else None
        can = capabilities(site, self.phones is not None, self.bridge)
        reachable = agent is not None and carries(call.media_channel, Channel.PSTN, agent, can)
        if agent is None or not ar.phone_after_app(
            site.mobile_after_desktop, device, end, reachable
        ):
            return False
        return await self._ring_phone_next(call, agent.agent_id, now)

    async def _ring_phone_next(self, call: Call, agent_id: str, now: float) -> bool:
        site = self._records.sites[call.site]
        ttl = site.ring_timeout_s + RESERVATION_GRACE_S
        if not await self._records.store.reserve_agent(call.site, agent_id, call.call_id, ttl):
            return False  # taken meanwhile (another call rings her): the next agent then
        visitor, extra = await self._records.flow(call).ring_details(call, agent_id)
        current = await self._records.get(call.call_id)
        reasons = ("mobile after desktop",)
        ringing = await self.ring(current, agent_id, Channel.PSTN, reasons, now, visitor, extra)
        return ringing is not None

    def room_for(self, call: Call) -> str | None:
        """The room the visitor's leg joins: the accepted agent waits there on their phone."""
        return room_name(call.call_id) if ar.has_leg(call) else None

    async def call_over(self, before: Call, after: Call) -> None:
        """The callback's attempt ended (or the callback did): the agent's kept leg is told
        and hung up, unless the conversation took place (the room ended with it)."""
        leg = ar.agent_leg(before)
        if leg is None:
            return
        if before.state is CallState.RINGING:
            await self._hang_up(leg)
        elif before.state is CallState.DIALING and self.phones is not None:
            try:
                await self.phones.tell_and_hang_up(
                    leg, "The customer could not be reached. Goodbye."
                )
            except TelephonyError as e:
                log.warning("telling the agent's leg %s failed: %s", leg, e.message)
        elif before.state is CallState.CONNECTED:
            await self._hang_up(leg)

    async def _hang_up(self, provider_id: str) -> None:
        if self.phones is None:
            return
        try:
            await self.phones.hang_up(provider_id)
        except TelephonyError as e:
            log.warning("hang-up of the agent's leg %s failed: %s", provider_id, e.message)
