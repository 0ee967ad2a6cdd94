"""The text a customer gets when their callback is booked: the link to its ticket page.

The link holds the status token, which the gateway keeps only as a hash, so the text is sent
while the token is at hand: right after the request is stored and answered, from a task of
the node's, tried a few times if the provider cannot be reached. A node that dies in between
loses the text, not the callback (the widget and the 201 have the link too). A refusal is
not tried again: Twilio refuses a number that told the sender STOP (``opted_out``). The
text costs money, so it is sent once per callback, and callbacks themselves are rate
limited (gateway.core.callback_admission).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from functools import partial

from gateway.core import callback as cb
from gateway.core.call import Call
from gateway.core.model import Site
from gateway.i18n import messages_for
from gateway.ops.tasks import TaskGroup
from gateway.services.call_records import CallRecords
from gateway.telephony import TelephonyError, Texts
from gateway.wire.rest import ticket_url

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (2.0, 10.0, 30.0)
"""Waits before each further try while the provider cannot be reached."""


class TicketTexts:
    def __init__(
        self,
        records: CallRecords,
        tasks: TaskGroup,
        public_url: str,
    ) -> None:
        self._records = records
        self._tasks = tasks
        self._public_url = public_url
        self.texts: Texts | None = None
        """The provider's SMS side; None: nothing is sent."""
        self.sent = 0
        """Texts sent by this node (for tests)."""
        self.given_up = 0
        """Texts this node gave up on: refused, or the provider unreachable for long."""

    @property
    def sites(self) -> Mapping[str, Site]:
        return self._records.sites

    def confirm(self, call: Call, status_token: str) -> None:
        """Text the customer of a new callback its ticket's link, soon."""
        site = self.sites[call.site]
        if (
            self.texts is None
            or not site.callback_policy.text_ticket_link
            or not site.caller_ids
            or call.phone is None
        ):
            return
        self._tasks.spawn(self._send(call, status_token), f"ticket-text:{call.call_id}")

    def body(self, call: Call, status_token: str) -> str:
        site = self.sites[call.site]
        text = messages_for(call.request.language)
        link = ticket_url(self._public_url, call.call_id, status_token)
        return text.gettext(
            "{site}: we'll call you back. See or change your request: {link}"
        ).format(site=site.name, link=link)

    async def _send(self, call: Call, status_token: str) -> None:
        assert self.texts is not None and call.phone is not None
        sender = self.sites[call.site].caller_ids[0]
        body = self.body(call, status_token)
        for delay in (*RETRY_DELAYS_S, None):
            try:
                await self.texts.send_text(call.phone, sender, body)
                break
            except TelephonyError as e:
                if not e.retryable or delay is None:
                    log.warning("no ticket text for %s: %s (%s)", call.call_id, e.code, e.message)
                    self.given_up += 1
                    return
                await asyncio.sleep(delay)
        self.sent += 1
        try:
            await self._records.move(call, partial(cb.texted, now=self._records.clock()))
        except Exception as exc:  # the text went out; its timeline entry is only a courtesy
            log.info("ticket text of %s not noted: %r", call.call_id, exc)
