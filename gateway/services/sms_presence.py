"""Presence by SMS: an agent texts the site's number, and their ``mobile`` device follows.

The telephony edge verifies the webhook and hands over an ``InboundSms``; this service finds
the agent (``From`` is their configured mobile, ``To`` one of their site's caller ids), reads
the command with the pure core (gateway/core/sms_presence.py), writes the agent's ``sms``
device through the presence service (so every node sees it at once) and returns the reply.

- ``IN``: available on ``pstn`` until the branch closes (``lease_end``); the device's lease
  *is* that closing time, so the presence sweeper ends it there on whichever node claims it.
- ``OUT``: the device is removed.
- ``BUSY``: busy, on the same lease.
- ``BACK n``: away now, and a durable timer (``TimerKind.SMS_BACK``) makes it available
  again in ``n`` minutes: it survives a node restart and runs on one node only. The timer
  names the away device by its ``last_seen``: any later text rewrites the device, and the
  timer then finds it changed and does nothing.

Each message is acted on once (``claim_message_once`` on its ``MessageSid``): a replayed
webhook changes nothing and gets no second reply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final, Protocol

import phonenumbers

from gateway.core import sms_presence as sms
from gateway.core.model import Agent, Device, DeviceKind, DeviceState, Presence, Site, languages_of
from gateway.core.text import Text
from gateway.i18n import messages_for
from gateway.ops.clock import SYSTEM_CLOCK, Clock
from gateway.services.call_records import TimerKind
from gateway.services.presence_service import PresenceService
from gateway.settings.model import PresenceSettings
from gateway.store.base import CoordinationStore, TimerStore
from gateway.wire.codec import DeviceUpdate

log = logging.getLogger(__name__)

SMS_DEVICE_ID: Final = "sms"
SMS_PRIORITY: Final = 0
MESSAGE_CLAIM_TTL_S: Final = 2 * 86_400.0
"""How long a MessageSid is remembered: far longer than any redelivery of its webhook."""
STRANGER_REPLIES: Final = (3, 3600)
"""Replies to one number that is no agent's, per window (s): each reply is a billed SMS."""


class SmsStore(CoordinationStore, TimerStore, Protocol):
    """What this service needs of the store besides presence."""


@dataclass(frozen=True, slots=True)
class InboundSms:
    """A verified inbound message, as the provider's webhook gave it."""

    account_sid: str
    message_sid: str
    from_: str
    to: str
    body: str


def e164(number: str) -> str | None:
    """``number`` in E.164, or None when it is no phone number (a short code, ``whatsapp:``)."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def back_timer_id(site_id: str, agent_id: str, device: Device) -> str:
    """``smsback:{last_seen ms}/{site}/{agent}`` (ids never contain ``/``)."""
    return f"{TimerKind.SMS_BACK.value}:{_stamp(device)}/{site_id}/{agent_id}"


def _stamp(device: Device) -> int:
    return round(device.last_seen * 1000)


class SmsPresence:
    def __init__(
        self,
        sites: dict[str, Site],
        presence: PresenceService,
        store: SmsStore,
        settings: PresenceSettings,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._sites = sites
        self._presence = presence
        self._store = store
        self._lease_s = settings.sms_lease_s
        self._clock = clock
        # (To, From) -> the agent: a number may be an agent's on one site only per caller id.
        self._agents: dict[tuple[str, str], Agent] = {}
        for site_id in sorted(sites):
            site = sites[site_id]
            for agent in site.agents.values():
                if agent.mobile is None:
                    continue
                for caller_id in site.caller_ids:
                    self._agents.setdefault((caller_id, agent.mobile), agent)

    def agent_for(self, from_: str, to: str) -> Agent | None:
        sender, number = e164(from_), e164(to)
        if sender is None or number is None:
            return None
        return self._agents.get((number, sender))

    async def handle(self, message: InboundSms) -> str | None:
        """The reply to send, or None for a message already handled (a replayed webhook)."""
        if not await self._store.claim_message_once(
            message.account_sid, message.message_sid, MESSAGE_CLAIM_TTL_S
        ):
            log.info("SMS %s was handled already; ignoring the replay", message.message_sid)
            return None
        agent = self.agent_for(message.from_, message.to)
        if agent is None:
            limit, window_s = STRANGER_REPLIES
            sender = e164(message.from_) or message.from_
            if not await self._store.hit_stranger_reply_limit(
                sender, window_s, limit, self._clock.now()
            ):
                return None
            return sms.unknown_sender_reply(messages_for())
        site = self._sites[agent.site]
        spoken = languages_of(agent, site.branches.get(agent.branch or ""))
        text = messages_for(*spoken)
        words = sms.vocabulary(spoken, site.sms_aliases, text.language)
        parsed = sms.parse(message.body, words)
        if isinstance(parsed, sms.ParseProblem):
            return sms.problem_reply(words, parsed, text)
        return await self._apply(site, agent, words, parsed, text)

    async def _apply(
        self, site: Site, agent: Agent, words: sms.Vocabulary, command: sms.Command, text: Text
    ) -> str:
        branch = site.branches.get(agent.branch) if agent.branch else None
        zone = branch.timezone if branch is not None else "UTC"
        now = self._clock.now()
        until = sms.lease_end(branch, now, self._lease_s)
        if command.command is sms.SmsCommand.OUT:
            await self._presence.remove_device(site.site_id, agent.agent_id, SMS_DEVICE_ID)
            return sms.reply(words, sms.Belief.SIGNED_OUT, zone, until, text)
        state = {
            sms.SmsCommand.IN: DeviceState.AVAILABLE,
            sms.SmsCommand.BUSY: DeviceState.BUSY,
            sms.SmsCommand.BACK: DeviceState.AWAY,
        }[command.command]
        presence = await self._set(site, agent, state, until - now)
        if command.command is sms.SmsCommand.IN:
            return sms.reply(words, sms.Belief.AVAILABLE, zone, until, text)
        if command.command is sms.SmsCommand.BUSY:
            return sms.reply(words, sms.Belief.BUSY, zone, until, text)
        back_at = now + command.minutes * 60
        if back_at >= until:
            return sms.reply(words, sms.Belief.AWAY_UNTIL_CLOSE, zone, until, text)
        device = next(d for d in presence.devices if d.device_id == SMS_DEVICE_ID)
        await self._store.schedule_timer(
            back_timer_id(site.site_id, agent.agent_id, device), back_at
        )
        return sms.reply(words, sms.Belief.AWAY, zone, until, text, back_at)

    async def _set(self, site: Site, agent: Agent, state: DeviceState, ttl_s: float) -> Presence:
        update = DeviceUpdate(SMS_DEVICE_ID, DeviceKind.MOBILE, state, SMS_PRIORITY)
        return await self._presence.set_device(site.site_id, agent.agent_id, update, ttl_s)

    async def on_back_timer(self, rest: str) -> float | None:
        """``BACK n`` ran out: available again, if the away device is still the one the timer
        was set for (the agent texted nothing since) and the branch has not closed."""
        stamp, _, names = rest.partition("/")
        site_id, _, agent_id = names.partition("/")
        site = self._sites.get(site_id)
        agent = site.agents.get(agent_id) if site is not None else None
        if site is None or agent is None or not stamp.isdigit():
            log.warning("SMS back timer %r names no agent; dropping it", rest)
            return None
        presence = await self._presence.fetch(site_id, agent_id)
        device = next((d for d in presence.devices if d.device_id == SMS_DEVICE_ID), None)
        if device is None or device.state is not DeviceState.AWAY or _stamp(device) != int(stamp):
            return None  # signed out, lapsed, or changed by a later text
        branch = site.branches.get(agent.branch) if agent.branch else None
        now = self._clock.now()
        until = min(device.expires_at, sms.lease_end(branch, now, self._lease_s))
        if until > now:
            await self._set(site, agent, DeviceState.AVAILABLE, until - now)
        return None
