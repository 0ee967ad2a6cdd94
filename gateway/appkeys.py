"""Typed keys for what the app holds (aiohttp ``web.AppKey``)."""

from __future__ import annotations

from typing import Protocol

import socketio
from aiohttp import web

from gateway.auth import TokenService
from gateway.availability_feed import AvailabilityFeed
from gateway.call_service import CallService
from gateway.callback_service import CallbackService
from gateway.drain import Drain
from gateway.metrics import Metrics
from gateway.presence_service import PresenceService
from gateway.ratelimit import TokenBucket
from gateway.settings import Settings
from gateway.store.base import Store, StoreHealth
from gateway.tasks import TaskGroup
from gateway.visitor_identity import VisitorIdentity


class HealthSource(Protocol):
    async def health(self) -> StoreHealth: ...


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
TOKENS = web.AppKey("tokens", TokenService)
VISITORS = web.AppKey("visitors", VisitorIdentity)
METRICS = web.AppKey("metrics", Metrics)
PRESENCE = web.AppKey("presence", PresenceService)
SIO = web.AppKey("sio", socketio.AsyncServer)
TASKS = web.AppKey("tasks", TaskGroup)
REST_BUCKETS = web.AppKey("rest_buckets", dict[str, TokenBucket])
HEALTH = web.AppKey("health", HealthSource)
AVAILABILITY = web.AppKey("availability", AvailabilityFeed)
CALLS = web.AppKey("calls", CallService)
CALLBACKS = web.AppKey("callbacks", CallbackService)
DRAIN = web.AppKey("drain", Drain)
