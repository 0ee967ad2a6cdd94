"""The named coordination methods of ``CoordinationStore``, on any backend's primitives.

These are the only place the coordination keys are spelt. The strings are stored (Redis
adds its ``m:rl:``, ``m:slots:``, ``m:count:`` or ``m:once:`` prefix), so a running
cluster's limits, slots and spend depend on them staying exactly as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from gateway.core.callback_admission import QuotaSpec, Subject
from gateway.store.base import CoordinationPrimitives, OpenCallbackKind, Quota

_OPEN_KIND = {"visitor": "v", "number": "n"}


def start_limit_key(site: str, visitor_id: str) -> str:
    return f"start:{site}:{visitor_id}"


def session_limit_key(client_ip: str) -> str:
    return f"sessions:{client_ip}"


def open_callback_key(site: str, kind: OpenCallbackKind, subject: str) -> str:
    return f"cbopen:{site}:{_OPEN_KIND[kind]}:{subject}"


def outbound_line_key(site: str) -> str:
    return f"out:{site}"


def spend_key(site: str, now: float) -> str:
    return f"spend:{site}:{datetime.fromtimestamp(now, UTC):%Y-%m-%d}"


def dial_claim_key(idempotency_key: str) -> str:
    return f"dial:{idempotency_key}"


def stranger_reply_key(number: str) -> str:
    return f"smsstranger:{number}"


def message_claim_key(account_sid: str, message_sid: str) -> str:
    return f"msg:{account_sid}:{message_sid}"


def webhook_claim_key(site: str, what: str) -> str:
    return f"imhook:{site}:{what}"


def callback_quota(spec: QuotaSpec, site: str, subjects: Mapping[Subject, str]) -> Quota:
    """``subjects``: the value of each subject the quota may count per."""
    parts = ["cb", spec.name]
    if spec.per_site:
        parts.append(site)
    if spec.per is not Subject.SITE:
        parts.append(subjects[spec.per])
    member = subjects[spec.distinct] if spec.distinct is not None else None
    return Quota(":".join(parts), spec.window_s, spec.limit, member=member)


class NamedCoordination:
    """Mixed into each backend, whose primitives these call."""

    async def hit_start_limit(
        self: CoordinationPrimitives,
        site: str,
        visitor_id: str,
        window_s: int,
        limit: int,
        now: float,
    ) -> bool:
        return await self.hit(start_limit_key(site, visitor_id), window_s, limit, now)

    async def hit_session_limit(
        self: CoordinationPrimitives, client_ip: str, window_s: int, limit: int, now: float
    ) -> bool:
        return await self.hit(session_limit_key(client_ip), window_s, limit, now)

    async def acquire_open_callback_slot(
        self: CoordinationPrimitives,
        site: str,
        kind: OpenCallbackKind,
        subject: str,
        call_id: str,
        ttl_s: float,
        now: float,
    ) -> bool:
        key = open_callback_key(site, kind, subject)
        return await self.acquire_slot(key, call_id, 1, ttl_s, now)

    async def release_open_callback_slot(
        self: CoordinationPrimitives,
        site: str,
        kind: OpenCallbackKind,
        subject: str,
        call_id: str,
    ) -> None:
        await self.release_slot(open_callback_key(site, kind, subject), call_id)

    async def open_callback_holder(
        self: CoordinationPrimitives,
        site: str,
        kind: OpenCallbackKind,
        subject: str,
        now: float,
    ) -> str | None:
        holders = await self.slot_holders(open_callback_key(site, kind, subject), now)
        return holders[0] if holders else None

    async def acquire_outbound_line(
        self: CoordinationPrimitives,
        site: str,
        call_id: str,
        limit: int,
        ttl_s: float,
        now: float,
    ) -> bool:
        return await self.acquire_slot(outbound_line_key(site), call_id, limit, ttl_s, now)

    async def release_outbound_line(self: CoordinationPrimitives, site: str, call_id: str) -> None:
        await self.release_slot(outbound_line_key(site), call_id)

    async def add_spend(
        self: CoordinationPrimitives, site: str, now: float, delta: int, ttl_s: int
    ) -> int:
        return await self.add_to_counter(spend_key(site, now), delta, ttl_s)

    async def take_callback_quotas(
        self: CoordinationPrimitives,
        specs: Sequence[QuotaSpec],
        site: str,
        subjects: Mapping[Subject, str],
        event_id: str,
        now: float,
    ) -> int | None:
        """``take_quotas`` for the callback quotas ``specs`` describe (core.callback_admission):
        the index of the first full one, or None when the event was counted in every one."""
        quotas = [callback_quota(spec, site, subjects) for spec in specs]
        return await self.take_quotas(quotas, event_id, now)

    async def claim_dial_once(
        self: CoordinationPrimitives, idempotency_key: str, ttl_s: float
    ) -> bool:
        return await self.claim_once(dial_claim_key(idempotency_key), ttl_s)

    async def claim_message_once(
        self: CoordinationPrimitives, account_sid: str, message_sid: str, ttl_s: float
    ) -> bool:
        return await self.claim_once(message_claim_key(account_sid, message_sid), ttl_s)

    async def hit_stranger_reply_limit(
        self: CoordinationPrimitives, number: str, window_s: int, limit: int, now: float
    ) -> bool:
        return await self.hit(stranger_reply_key(number), window_s, limit, now)

    async def claim_webhook_once(
        self: CoordinationPrimitives, site: str, what: str, ttl_s: float
    ) -> bool:
        return await self.claim_once(webhook_claim_key(site, what), ttl_s)
