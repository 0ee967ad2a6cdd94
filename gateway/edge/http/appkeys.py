"""Typed keys for what the app holds (aiohttp ``web.AppKey``)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

import socketio
from aiohttp import web

from gateway.edge.auth import TokenService
from gateway.edge.http.availability_feed import AvailabilityFeed
from gateway.edge.http.ticket_feed import TicketFeed
from gateway.edge.visitor_identity import VisitorIdentity
from gateway.ops.clock import Clock
from gateway.ops.metrics import Metrics
from gateway.ops.ratelimit import TokenBucket
from gateway.ops.tasks import TaskGroup
from gateway.services.call_service import CallService
from gateway.services.callback_service import CallbackService
from gateway.services.drain import Drain
from gateway.services.experiments import Experiments
from gateway.services.history_retention import HistoryRetention
from gateway.services.history_writer import HistoryWriter
from gateway.services.im_presence import ImPresence
from gateway.services.presence_service import PresenceService
from gateway.services.retention import Retention
from gateway.services.sms_presence import SmsPresence
from gateway.services.surveys import Surveys
from gateway.services.text_consent import TextConsent
from gateway.services.tickets import Tickets
from gateway.settings import Settings
from gateway.store.base import Store, StoreHealth


class HealthSource(Protocol):
    async def health(self) -> StoreHealth: ...


SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
STORE = web.AppKey("store", Store)
TOKENS = web.AppKey("tokens", TokenService)
VISITORS = web.AppKey("visitors", VisitorIdentity)
METRICS = web.AppKey("metrics", Metrics)
PRESENCE = web.AppKey("presence", PresenceService)
IM_PRESENCE = web.AppKey("im_presence", ImPresence)
SIO = web.AppKey("sio", socketio.AsyncServer)
TASKS = web.AppKey("tasks", TaskGroup)
REST_BUCKETS = web.AppKey("rest_buckets", dict[str, TokenBucket])
HEALTH = web.AppKey("health", HealthSource)
AVAILABILITY = web.AppKey("availability", AvailabilityFeed)
TICKET_FEED = web.AppKey("ticket_feed", TicketFeed)
TICKETS = web.AppKey("tickets", Tickets)
RETENTION = web.AppKey("retention", Retention)
CALLS = web.AppKey("calls", CallService)
CALLBACKS = web.AppKey("callbacks", CallbackService)
DRAIN = web.AppKey("drain", Drain)
SMS_PRESENCE = web.AppKey("sms_presence", SmsPresence)
TEXT_CONSENT = web.AppKey("text_consent", TextConsent)
SURVEYS = web.AppKey("surveys", Surveys)
HISTORY = web.AppKey("history", HistoryWriter)
EXPERIMENTS = web.AppKey("experiments", Experiments)
HISTORY_RETENTION = web.AppKey("history_retention", HistoryRetention)
"""Absent on a node without call history."""
TRUSTED_PROXIES: web.AppKey[tuple[IPv4Network | IPv6Network, ...]] = web.AppKey("trusted_proxies")
"""``server.trusted_proxies`` parsed: whose ``X-Forwarded-For`` is believed."""
SECURITY_HEADERS: web.AppKey[dict[str, str]] = web.AppKey("security_headers")
