"""Keeps each waiting callback's promise, or tells the customer first (gateway/core/promise.py).

One durable timer per open callback (``cbpromise:{call_id}:``), run by whichever node claims
it: it reviews the callback, applies a notice to the ticket (the page shows it live, with
the new time and the choice to keep the place or pick another), texts it when the rules
allow (gateway/services/customer_texts.py), and sets itself for the next review. A node that
dies mid-review leaves the timer to another after its lease; a notice applied twice is not
possible, as the second review sees the first's ``told_at`` and ``promised_at``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

from gateway.core import callback as cb
from gateway.core import promise
from gateway.core.call import Call, CallChannel, CallError
from gateway.core.promise import Notice
from gateway.services.call_records import CallRecords, TimerId, TimerKind
from gateway.services.customer_texts import CustomerTexts

log = logging.getLogger(__name__)

ExpectedAt = Callable[[Call, float], Awaitable[float | None]]
"""When the gateway now expects to call a waiting callback's customer (None: it cannot say)."""


def review_timer(call: Call) -> TimerId:
    return TimerId(TimerKind.PROMISE, call.call_id, "")


class Promises:
    def __init__(self, records: CallRecords, expected_at: ExpectedAt) -> None:
        self._records = records
        self._expected_at = expected_at
        self.texts: CustomerTexts | None = None
        """Texts the notices too (set by the app); None: the ticket page only."""

    async def watch(self, call: Call) -> None:
        """Review ``call`` when its promise next needs it (a new or moved callback)."""
        policy = self._records.sites[call.site].callback_policy
        when = promise.next_review(call, self._records.clock(), policy)
        if when is not None:
            await self._records.schedule(review_timer(call), when)

    async def on_review(self, timer: TimerId) -> float | None:
        call = await self._records.find(timer.call_id)
        if call is None or call.channel is not CallChannel.CALLBACK:
            return None
        policy = self._records.sites[call.site].callback_policy
        now = self._records.clock()
        expected = None
        if promise.needs_judging(call, now, policy) and cb.waiting(call):
            expected = await self._expected_at(call, now)
        notice = promise.review(call, now, expected, policy)
        if notice is not None:
            call = await self._tell(call, notice, expected, now)
        return promise.next_review(call, now, policy)

    async def _tell(self, call: Call, notice: Notice, expected: float | None, now: float) -> Call:
        texting = self.texts is not None and await self.texts.may_text(call, True, now)
        if notice is Notice.LATE:
            assert expected is not None
            change = partial(cb.running_late, expected_at=expected, texting=texting, now=now)
        else:
            change = partial(cb.reminded, texting=texting, now=now)

        def as_judged(current: Call) -> Call:
            # Judged on ``call``: a call changed since (moved, rung) is judged again next time.
            if current.version != call.version:
                raise CallError("stale", "the callback changed since it was reviewed")
            return change(current)

        try:
            told = await self._records.move(call, as_judged)
        except CallError:
            return await self._records.get(call.call_id)  # it moved on meanwhile
        log.info("callback %s: %s notice (texted: %s)", call.call_id, notice.value, texting)
        if texting and self.texts is not None:
            self.texts.notify(told, notice)
        return told
