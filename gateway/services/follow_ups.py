"""Follow-ups by the same person (gateway/core/follow_up.py): the agent of a call promises to
call the customer back at a time; a scheduled callback pinned to her, on the customer's same
ticket, which the callback flow then runs (its routing honours the pin, and the site's
policy once she is not free).

The follow-up's id is derived from the call's, so a promise is made once even when two
tabs send it at once (the second finds it stored: ``follow_up_exists``) or a node dies
between its two writes (the call names its follow-up first, then the follow-up is stored;
a retry finds the name and stores what is missing).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial

from gateway.core import follow_up as fu
from gateway.core.call import Call, CallError
from gateway.core.errors import Conflict, Invalid, NotFound
from gateway.services.call_records import CallRecords
from gateway.services.callback_dialing import due_timer
from gateway.services.callback_service import CallbackService


@dataclass(frozen=True, slots=True)
class FollowUpAsk:
    call_id: str
    at: float
    note: str
    phone: str | None


def follow_up_id(call_id: str) -> str:
    return "c_" + hashlib.sha256(f"follow-up:{call_id}".encode()).hexdigest()[:32]


class FollowUps:
    def __init__(self, records: CallRecords, callbacks: CallbackService) -> None:
        self._records = records
        self._callbacks = callbacks

    async def promise(self, site_id: str, agent_id: str, ask: FollowUpAsk) -> tuple[Call, Call]:
        """The call, now naming its follow-up, and the follow-up (a scheduled callback)."""
        records = self._records
        call = await records.get(ask.call_id)
        if call.site != site_id:
            raise NotFound(f"no call {ask.call_id!r}")
        now = records.clock()
        fu.check_promisable(call, agent_id, now)
        new_id = follow_up_id(call.call_id)
        if call.follow_up == new_id and await records.find(new_id) is not None:
            raise CallError("follow_up_exists", "this call has a follow-up already")
        raw = ask.phone or call.phone
        if raw is None:
            raise Invalid(
                "the number to call is required after a browser call", code="invalid_phone"
            )
        site = records.sites[site_id]
        agent = site.agents[agent_id]
        number = self._callbacks.check_time(site, raw, agent.branch, ask.at, now)
        policy = site.callback_policy
        until = fu.pinned_until(ask.at, policy.follow_up_policy, policy.follow_up_wait_s)
        # Named on the call first (compare-and-set: one follow-up per call), then stored.
        call = await records.move(
            call, partial(fu.promised, follow_up_id=new_id, at=ask.at, now=now)
        )
        follow_up = fu.new_follow_up(new_id, call, number.e164, ask.at, ask.note, until, now)
        try:
            follow_up = await records.create(follow_up)
        except Conflict:  # the same promise, made at once from another tab: it was first
            raise CallError("follow_up_exists", "this call has a follow-up already") from None
        await records.schedule(due_timer(follow_up), ask.at)
        await self._callbacks.booked(follow_up)
        return call, follow_up
