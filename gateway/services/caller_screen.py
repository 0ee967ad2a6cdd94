"""Customer first (a site's ``agent_first = false``): the visitor answers, waits on the line,
and their leg dials the chosen agent's mobile, screened: the whisper and "press 1" run on
the agent's leg before the bridge connects (``<Dial><Number url>``). Anything but 1 keeps
the bridge from connecting, and the next agent free is put through while the visitor waits;
when nobody is left, the attempt ends and the callback is retried by the site's policy.

The decisions are pure (gateway.core.agent_ring); the visitor's leg and the attempt belong
to gateway.services.callback_dialing, which asks this module through ``screened`` and
``next_bridge``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from gateway.core import agent_ring as ar
from gateway.core.agent_ring import RingEnd
from gateway.core.call import Call, CallState
from gateway.core.errors import Conflict, Forbidden, NotFound
from gateway.core.routing import Candidate
from gateway.ops.metrics import Metrics
from gateway.services.call_records import CALL_HOLD_S, CallRecords
from gateway.services.mobile_ring import GOODBYE, KEY_TIMEOUT_S, TOO_LATE, say_and_hang_up
from gateway.telephony import AgentInstruction, Bridge, Proceed, Whisper

Candidates = Callable[[Call, float], Awaitable[list[Candidate]]]
"""The agents routing would offer ``call`` now, best first (the callback flow's ranking)."""


class CallerScreen:
    def __init__(self, records: CallRecords, candidates: Candidates, metrics: Metrics) -> None:
        self._records = records
        self._candidates = candidates
        self._metrics = metrics

    # --- asked by the visitor's leg (gateway.services.callback_dialing) --------------------

    async def screened(self, call: Call) -> None:
        """A screened bridge to the call's agent starts: the timeline says their mobile
        rings."""
        try:
            await self._records.update(call.call_id, partial(ar.screening, now=self._now()), call)
        except (Conflict, NotFound):
            pass

    def took_it(self, call: Call) -> bool:
        """Whether the agent who answered the bridge took the call: a screened one only by
        pressing 1 (a whisper that hangs up may still be reported as an answer)."""
        if not ar.screened_now(call):
            return True
        return ar.screen_end_of(call) is RingEnd.ACCEPTED_BY_KEY

    async def next_bridge(self, call: Call) -> Bridge | None:
        """The agent did not take it: put the next agent free through to the waiting
        visitor, or None when nobody is."""
        now = self._now()
        site = self._records.sites[call.site]
        store = self._records.store
        for candidate in await self._candidates(call, now):
            agent = site.agents[candidate.agent_id]
            if agent.agent_id == call.agent_id or agent.mobile is None:
                continue
            if not await store.reserve_agent(call.site, agent.agent_id, call.call_id, CALL_HOLD_S):
                continue
            move = partial(
                ar.next_agent,
                dials=call.dials,
                agent_id=agent.agent_id,
                reasons=candidate.reasons,
                now=now,
            )
            try:
                before, after = await self._records.update(call.call_id, move, call)
            except (Conflict, NotFound):
                await self._records.release_agent(call.site, agent.agent_id, call.call_id)
                return None
            if before.agent_id is not None:
                await self._records.free_agent(call.site, before.agent_id, call.call_id)
            await self._records.presence.set_active_call(call.site, agent.agent_id, call.call_id)
            await self._records.notify.call_update(after, former_agent=before.agent_id)
            await self.screened(after)
            text = self._records.customer_text(after)
            return Bridge(
                say=text.gettext("Connecting you to {agent} now.").format(agent=agent.name),
                number=agent.mobile,
                caller_id=site.caller_ids[0],
                language=text.say_language,
                screen=True,
            )
        return None

    # --- the agent's leg (ScreenEvents) ----------------------------------------------------

    async def _bridging(self, call_id: str, dials: int, parent_id: str) -> Call:
        call = await self._records.find(call_id)
        if call is None or call.provider_id != parent_id or call.dials != dials:
            raise Forbidden("this webhook is not about a screened bridge of that dial")
        return call

    async def on_screen(
        self, call_id: str, dials: int, parent_id: str, provider_id: str
    ) -> AgentInstruction:
        call = await self._bridging(call_id, dials, parent_id)
        text = self._records.agent_text(call)
        if call.state is not CallState.CONNECTED or ar.screen_end_of(call) is not None:
            return say_and_hang_up(text, TOO_LATE)
        site = self._records.sites[call.site]
        said = ar.whisper(call, site.name, None, text)
        return Whisper(said, KEY_TIMEOUT_S, text.say_language)

    async def on_screen_key(
        self, call_id: str, dials: int, parent_id: str, provider_id: str, digits: str
    ) -> AgentInstruction:
        call = await self._bridging(call_id, dials, parent_id)
        text = self._records.agent_text(call)
        end = ar.key_pressed(digits)
        try:
            before, after = await self._records.update(
                call_id, partial(ar.screen_ended, dials=dials, end=end, now=self._now()), call
            )
        except (Conflict, NotFound):
            return say_and_hang_up(text, TOO_LATE)
        if ar.screen_end_of(after) is not end:
            return say_and_hang_up(text, TOO_LATE)  # a repeat: the first key press decided
        if ar.screen_end_of(before) is None:
            self._metrics.mobile_rings.labels(end.value).inc()
        return Proceed() if end is RingEnd.ACCEPTED_BY_KEY else say_and_hang_up(text, GOODBYE)

    def _now(self) -> float:
        return self._records.clock()
