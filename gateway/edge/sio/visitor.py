"""``/visitor``: a visitor's socket during a browser call (idle watchers of the button use the
availability feed instead)."""

from __future__ import annotations

from functools import partial
from typing import Any

from gateway.core.admission import AdmissionLimits, admit_start
from gateway.core.errors import overloaded
from gateway.edge.auth import VISITOR_ROLES, Claims, TokenService, check_configured_role
from gateway.edge.sio.namespace import BaseNamespace, Session
from gateway.edge.sio.rooms import visitor_room
from gateway.ops.load import LoadMonitor
from gateway.ops.metrics import Metrics
from gateway.services.call_service import CallService
from gateway.services.presence_service import PresenceService
from gateway.store.base import DeviceRef
from gateway.wire.codec import (
    Json,
    call_id_from_wire,
    call_request_from_wire,
    call_to_wire,
    signal_from_wire,
    visitor_auth_from_wire,
)
from gateway.wire.events import call_ack, ok_ack, start_ack


class VisitorNamespace(BaseNamespace):
    """``/visitor``: a visitor in a browser call (idle watchers use the availability feed)."""

    roles = VISITOR_ROLES
    rate = (5.0, 10.0)

    def __init__(
        self,
        tokens: TokenService,
        metrics: Metrics,
        presence: PresenceService,
        calls: CallService,
        load: LoadMonitor,
        limits: AdmissionLimits,
        public_url: str,
    ) -> None:
        super().__init__("/visitor", tokens, metrics)
        self.public_url = public_url
        """Where the ticket pages are (a call's ``ticket_url``)."""
        self.presence = presence
        self.calls = calls
        self.load = load
        self.limits = limits
        """When a start is refused as ``overloaded`` (gateway.core.admission)."""
        self.named: dict[str, str] = {}
        """Socket id -> the call its widget was in before it reconnected (``call_id``)."""
        self.events = {
            "call:start": self.call_start,
            "call:cancel": self.call_cancel,
            "rtc:signal": self.rtc_signal,
        }

    async def on_join(self, sid: str, claims: Claims, auth: Json) -> DeviceRef | None:
        check_configured_role(claims, self.presence.site(claims.site))
        named = visitor_auth_from_wire(auth).call_id
        await self.enter_room(sid, visitor_room(claims.site, claims.sub))
        if named is not None:
            self.named[sid] = named
        return None

    async def on_joined(self, sid: str, session: Session) -> None:
        # A visitor back while the store is unreachable (a blip during a Redis outage) takes
        # their call over once it answers: the widget does not start the call again, and the
        # grace timer of the socket that left would otherwise end it while they are here.
        await self.calls.until_stored(partial(self._take_over, sid, session), f"takeover:{sid}")

    async def _take_over(self, sid: str, session: Session) -> None:
        named = self.named.pop(sid, None)
        if sid not in self.sessions:
            return  # gone again before the store answered
        claims = session.claims
        call = await self.calls.resume(claims.site, claims.sub, sid)
        if call is not None:
            session.calls.add(call.call_id)
        elif named is not None:
            # The call the widget was in ended while it was away (its agent hung up, or it
            # ended during a node's drain): it hears so now, not never.
            call = await self.calls.ended_call_of(claims.site, claims.sub, named)
        if call is not None:
            site = self.presence.site(claims.site)
            await self.emit("call:update", call_to_wire(call, site), to=sid)

    async def on_leave(self, sid: str, session: Session) -> None:
        self.named.pop(sid, None)
        claims = session.claims
        # A socket closed by its node's drain will reconnect elsewhere: its visitor did not
        # leave, so even a call still ringing waits for them.
        keep = self.draining
        for call_id in session.calls:
            await self.calls.visitor_left(claims.site, claims.sub, sid, call_id, keep)

    async def call_start(self, sid: str, payload: Any) -> Json:
        self.refuse_if_draining()
        session = self.sessions[sid]
        claims = session.claims
        request = call_request_from_wire(payload)
        # Refused at once rather than queued: a start queued behind others would ring late,
        # and piled-up handlers starve the node's own lease renewal (gateway.core.admission).
        admission = admit_start(self.load.sample(), self.limits)
        if not admission.admit:
            self.metrics.starts_shed.labels(admission.signal).inc()
            raise overloaded(admission.retry_after_ms)
        with self.load.start_running():
            call, status_token = await self.calls.start(claims.site, claims.sub, sid, request)
        session.calls = {call.call_id}
        return start_ack(call, self.presence.site(claims.site), status_token, self.public_url)

    async def call_cancel(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        call = await self.calls.cancel(
            claims.site, claims.sub, call_id_from_wire(payload), "visitor_hung_up"
        )
        return call_ack(call, self.presence.site(claims.site))

    async def rtc_signal(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        _, signal = signal_from_wire(payload)
        await self.calls.relay_signal(claims.site, claims.sub, sid, False, signal)
        return ok_ack()
