"""What every socket.io namespace shares: authentication at connect, a table of events, and
every failure turned into an error.

Handlers are thin: validate with the codec, call a service, return an ack. Every failure
becomes ``{"ok": false, "error": {code, message}}`` as the ack when the client asked for
one, else an ``error`` event, as docs/PROTOCOL.md says (the error object comes from
``gateway.edge.errors``). Nothing a client sends can raise out of a handler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import socketio

from gateway.core.errors import DomainError, Forbidden, Invalid, RateLimited, Unauthenticated
from gateway.core.model import Role
from gateway.edge.auth import Claims, TokenService
from gateway.edge.errors import (
    INTERNAL_CODE,
    INTERNAL_MESSAGE,
    error_object,
    error_of,
    refused_ack,
)
from gateway.edge.sio.upstream import ACK_REQUESTED, MembraneNamespace
from gateway.ops.metrics import Metrics
from gateway.ops.ratelimit import TokenBucket
from gateway.services.drain import Drain
from gateway.store.base import DeviceRef
from gateway.wire.codec import Json, as_object

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Awaitable[Json]]


@dataclass
class Session:
    claims: Claims
    device: DeviceRef | None
    bucket: TokenBucket
    calls: set[str] = field(default_factory=set)
    """Calls this socket takes part in: ended if the socket goes away."""


class BaseNamespace(MembraneNamespace):
    """Dispatches events through ``self.events`` and turns every failure into an error."""

    roles: frozenset[Role] = frozenset()
    rate: tuple[float, float] = (20.0, 40.0)  # events per second, burst

    def __init__(self, namespace: str, tokens: TokenService, metrics: Metrics) -> None:
        super().__init__(namespace)
        self.tokens = tokens
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.events: dict[str, Handler] = {}

    async def _disconnect(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None:
            self.metrics.sockets.labels(self.namespace).dec()
            await self.on_leave(sid, session)

    async def client_event(self, sid: str, event: str, payload: Any) -> Any:
        try:
            session = self.sessions.get(sid)
            if session is None:
                raise Forbidden("not connected")
            if session.claims.exp + self.tokens.leeway_s < time.time():
                raise Unauthenticated("token expired; reconnect with a new one")
            if not session.bucket.take(time.monotonic()):
                raise RateLimited("too many events; slow down")
            handler = self.events.get(event)
            if handler is None:
                raise Invalid(f"unknown event {event!r}", code="unknown_event")
            return await handler(sid, payload)
        except DomainError as e:
            return await self._refuse(sid, error_of(e))
        except Exception:
            log.exception("handler for %s failed", event)
            return await self._refuse(sid, error_object(INTERNAL_CODE, INTERNAL_MESSAGE))

    async def _refuse(self, sid: str, error: Json) -> Json | None:
        """The error as the ack when the client asked for one, else an ``error`` event."""
        self.metrics.errors.labels(error["code"]).inc()
        if ACK_REQUESTED.get():
            return refused_ack(error)
        await self.emit("error", error, to=sid)
        return None

    @property
    def draining(self) -> bool:
        drain: Drain | None = self.server.drain
        return drain is not None and drain.draining

    def refuse_if_draining(self) -> None:
        drain: Drain | None = self.server.drain
        if drain is not None:
            drain.refuse_new_work()

    async def _connect(self, sid: str, auth: object) -> bool:
        try:
            self.refuse_if_draining()
            token = as_object(auth, "auth").get("token") if auth is not None else None
            claims = await self.tokens.verify(token, self.roles)
            device = await self.on_join(sid, claims, auth if isinstance(auth, dict) else {})
        except DomainError as e:
            self.metrics.errors.labels(e.code).inc()
            raise socketio.exceptions.ConnectionRefusedError(e.message, error_of(e)) from None
        session = Session(claims, device, TokenBucket(*self.rate))
        self.sessions[sid] = session
        self.metrics.sockets.labels(self.namespace).inc()
        # After the CONNECT packet has gone out: an emit before it would be dropped.
        self.server.start_background_task(self.on_joined, sid, session)
        return True

    async def on_join(self, sid: str, claims: Claims, auth: Json) -> DeviceRef | None:
        return None

    async def on_joined(self, sid: str, session: Session) -> None:
        return None

    async def on_leave(self, sid: str, session: Session) -> None:
        return None
