"""Texts to a callback's customer: the link to its ticket when it is booked, and the notices
that keep its promise (gateway/core/promise.py): a reminder, or a late notice with the new
time. Each carries the ticket's link (the status token is derived, not stored:
gateway/services/status_token.py) and says how to stop them.

A text costs money and may annoy, so one goes only when every rule allows (``refusal``):

- the site texts its customers (``callback_policy.text_ticket_link``) from a caller id, and
  the provider sends texts;
- the customer has not texted STOP (gateway/services/text_consent.py);
- fewer than ``max_texts`` went about this callback;
- a notice never goes in the customer's quiet hours (the confirmation does: they just asked).

What texts cost is bounded by ``max_texts`` per callback and by the limits on callbacks
themselves (per number, visitor, address and site: gateway/core/callback_admission.py).

A node sends from a task, tried a few times while the provider cannot be reached; a node
that dies in between loses the text, not the callback (the ticket page shows every notice).
A refusal is not tried again: Twilio refuses a number that texted STOP (``opted_out``), which
is then remembered as our own opt-out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, tzinfo
from functools import partial

from gateway.core import callback as cb
from gateway.core.call import Call
from gateway.core.model import Site
from gateway.core.phone_policy import PhoneRefused, check_number, in_quiet_hours, local_zone
from gateway.core.promise import Notice
from gateway.i18n import clock_time, messages_for
from gateway.ops.tasks import TaskGroup
from gateway.services.call_records import CallRecords
from gateway.telephony import TelephonyError, Texts
from gateway.wire.rest import ticket_url

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (2.0, 10.0, 30.0)
"""Waits before each further try while the provider cannot be reached."""


class CustomerTexts:
    def __init__(self, records: CallRecords, tasks: TaskGroup, public_url: str) -> None:
        self._records = records
        self._store = records.store
        self._tasks = tasks
        self._public_url = public_url
        self.texts: Texts | None = None
        """The provider's SMS side; None: nothing is sent."""
        self.sent = 0
        """Texts sent by this node (for tests)."""
        self.given_up = 0
        """Texts this node gave up on: refused, or the provider unreachable for long."""
        self.withheld: Counter[str] = Counter()
        """Texts this node did not send, by the rule that withheld them (``refusal``)."""

    @property
    def sites(self) -> Mapping[str, Site]:
        return self._records.sites

    async def refusal(self, call: Call, notice: bool, now: float) -> str | None:
        """Why no text may go to the customer of ``call`` now, if none may; ``notice``: a
        reminder or late notice (not the confirmation of their own request)."""
        site = self.sites[call.site]
        policy = site.callback_policy
        if (
            self.texts is None
            or not policy.text_ticket_link
            or not site.caller_ids
            or call.phone is None
        ):
            return "texts_off"
        if call.texts >= policy.max_texts:
            return "text_limit"
        if notice:
            try:
                number = check_number(call.phone, policy)
            except PhoneRefused as e:
                return e.code
            if in_quiet_hours(number, policy, now):
                return "quiet_hours"
        if await self._store.text_opted_out(call.site, call.phone):
            return "opted_out"
        return None

    async def may_text(self, call: Call, notice: bool, now: float) -> bool:
        """``refusal`` is None; what withheld the text is counted."""
        refused = await self.refusal(call, notice, now)
        if refused is not None:
            self.withheld[refused] += 1
        return refused is None

    def confirm(self, call: Call) -> None:
        """Text the customer of a new callback its ticket's link, soon."""
        self._tasks.spawn(self._confirm(call), f"ticket-text:{call.call_id}")

    async def _confirm(self, call: Call) -> None:
        if not await self.may_text(call, notice=False, now=self._records.clock()):
            return
        if await self._send(call, self.body(call)):
            try:
                await self._records.move(call, partial(cb.texted, now=self._records.clock()))
            except Exception as exc:  # the text went out; its note is only a courtesy
                log.info("ticket text of %s not noted: %r", call.call_id, exc)

    def notify(self, call: Call, notice: Notice) -> None:
        """Text a notice about ``call`` (already counted in ``call.texts``), soon."""
        self._tasks.spawn(self._send(call, self.body(call, notice)), f"notice:{call.call_id}")

    def body(self, call: Call, notice: Notice | None = None) -> str:
        site = self.sites[call.site]
        text = messages_for(call.request.language)
        # A follow-up is on its customer's first ticket: that call's token opens it.
        token, _ = self._records.status_tokens.for_call(call.follow_up_of or call.call_id)
        link = ticket_url(self._public_url, call.call_id, token)
        if notice is Notice.LATE and call.promised_at is not None:
            now = self._records.clock()
            time = clock_time(call.promised_at, self._zone(call), text.language, now)
            return text.gettext(
                "{site}: sorry, we're running late. We now expect to call you at {time}. To"
                " keep your place, do nothing. To pick another time: {link} Reply STOP to"
                " opt out."
            ).format(site=site.name, time=time, link=link)
        if notice is Notice.REMINDER:
            return text.gettext(
                "{site}: you're still on our list, and we haven't forgotten you. See where"
                " your request stands: {link} Reply STOP to opt out."
            ).format(site=site.name, link=link)
        return text.gettext(
            "{site}: we'll call you back. See or change your request: {link} Reply STOP to opt out."
        ).format(site=site.name, link=link)

    def _zone(self, call: Call) -> tzinfo:
        try:
            return local_zone(check_number(call.phone or "", self.sites[call.site].callback_policy))
        except PhoneRefused:
            return UTC

    async def send(self, call: Call, body: str) -> bool:
        """Text ``body`` to the customer of ``call`` now (the rules checked by the caller:
        ``may_text``); whether it went."""
        return await self._send(call, body)

    async def _send(self, call: Call, body: str) -> bool:
        assert self.texts is not None and call.phone is not None
        sender = self.sites[call.site].caller_ids[0]
        for delay in (*RETRY_DELAYS_S, None):
            try:
                await self.texts.send_text(call.phone, sender, body)
                break
            except TelephonyError as e:
                if not e.retryable or delay is None:
                    log.warning("no text for %s: %s (%s)", call.call_id, e.code, e.message)
                    self.given_up += 1
                    if e.code == "opted_out":
                        await self._store.set_text_opt_out(call.site, call.phone, True)
                    return False
                await asyncio.sleep(delay)
        self.sent += 1
        return True
