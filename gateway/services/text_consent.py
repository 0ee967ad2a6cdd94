"""STOP opts out: a customer who texts STOP to a site's number gets no more texts from the
site (confirmations, reminders, late notices) until they text START.

The keywords are those carriers and Twilio honour (Twilio's default opt-out handling:
STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, OPTOUT, REVOKE; START, UNSTOP, YES opt back
in), and the German "STOPP". Twilio itself blocks texts to a number that opted out on some
routes only (US and Canadian numbers); the gateway keeps its own record, per site, for
every country, and adds to it when Twilio refuses a text as opted out (``opted_out``).

A keyword texted to a number that several sites share opts out of all of them: the customer
cannot tell which one texted them. Each message is acted on once, so a replayed STOP cannot
undo a later START.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final, Protocol

from gateway.core.model import Site, sites_by_caller_id
from gateway.services.sms_presence import MESSAGE_CLAIM_TTL_S, InboundSms, e164
from gateway.store.base import CoordinationStore, TextConsentStore

log = logging.getLogger(__name__)

STOP_WORDS: Final = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE", "STOPP"}
)
START_WORDS: Final = frozenset({"START", "UNSTOP", "YES"})


class ConsentStore(TextConsentStore, CoordinationStore, Protocol):
    """What this service needs of the store."""


def keyword(body: str) -> bool | None:
    """True for an opt-out keyword, False for an opt-in one, None for any other message
    (a keyword is the whole message, as carriers read it)."""
    word = body.strip().strip(".!").upper()
    if word in STOP_WORDS:
        return True
    if word in START_WORDS:
        return False
    return None


class TextConsent:
    def __init__(self, sites: Mapping[str, Site], store: ConsentStore) -> None:
        self._store = store
        self._sites_by_number = sites_by_caller_id(sites)

    def handles(self, message: InboundSms) -> bool:
        """Whether ``message`` is an opt-out or opt-in keyword to a site's number."""
        return keyword(message.body) is not None and self._sites(message) != []

    def _sites(self, message: InboundSms) -> list[Site]:
        return self._sites_by_number.get(e164(message.to) or "", [])

    async def handle(self, message: InboundSms) -> None:
        """Record the customer's choice. No reply: Twilio answers the keywords itself, and
        refuses any text of ours to a number that has just said STOP."""
        opted_out = keyword(message.body)
        sender = e164(message.from_)
        if opted_out is None or sender is None:
            return
        if not await self._store.claim_message_once(
            message.account_sid, message.message_sid, MESSAGE_CLAIM_TTL_S
        ):
            return  # a replay: an old STOP must not undo a later START
        for site in self._sites(message):
            await self._store.set_text_opt_out(site.site_id, sender, opted_out)
        log.info("a customer opted %s texts", "out of" if opted_out else "back in to")
