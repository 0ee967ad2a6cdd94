"""``/agent``: the agent app's socket, which is a live desktop device of its agent."""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from gateway.core.errors import Invalid
from gateway.core.model import DeviceKind
from gateway.edge.auth import AGENT_ROLES, Claims, TokenService, check_configured_role
from gateway.edge.ice import ice_servers
from gateway.edge.sio import limits
from gateway.edge.sio.namespace import BaseNamespace, Session
from gateway.edge.sio.rooms import agent_room
from gateway.ops.metrics import Metrics
from gateway.services.call_desk import CallDesk
from gateway.services.follow_ups import FollowUpAsk, FollowUps
from gateway.services.presence_service import PresenceChange, PresenceService, socket_device_id
from gateway.settings import Settings
from gateway.store.base import DeviceRef
from gateway.wire.codec import (
    DeviceUpdate,
    Json,
    agent_auth_from_wire,
    as_object,
    call_id_from_wire,
    call_to_wire,
    device_update_from_wire,
    follow_up_from_wire,
    hold_from_wire,
    signal_from_wire,
)
from gateway.wire.events import accept_ack, agent_call_ack, follow_up_ack, ok_ack, presence_ack

log = logging.getLogger(__name__)


HANDOVER_LEASE_S: Final = 5.0
"""How long an agent's desktop device outlives a socket let go by a drain: the app reconnects
to another node within a second or two (the drain's ``retry_after_s``, then socket.io's
backoff); a state changed meanwhile on the new socket takes over once this lapses."""


class AgentNamespace(BaseNamespace):
    """``/agent``: a connected socket is a live desktop device of the agent."""

    roles = AGENT_ROLES

    def __init__(
        self,
        tokens: TokenService,
        metrics: Metrics,
        presence: PresenceService,
        calls: CallDesk,
        follow_ups: FollowUps,
        settings: Settings,
    ) -> None:
        super().__init__("/agent", tokens, metrics)
        self.presence = presence
        self.calls = calls
        self.follow_ups = follow_ups
        self.settings = settings
        self.socket_ttl_s = settings.presence.socket_ttl_s
        self.resuming: dict[str, str] = {}
        """Socket id -> the call its agent app asked to take over at connect (``call_id``)."""
        self.events = {
            "presence:set": self.presence_set,
            "call:accept": self.call_accept,
            "call:decline": self.call_decline,
            "call:hangup": self.call_hangup,
            "call:hold": self.call_hold,
            "call:follow_up": self.call_follow_up,
            "rtc:signal": self.rtc_signal,
        }
        presence.add_listener(self.on_presence)

    async def on_join(self, sid: str, claims: Claims, auth: Json) -> DeviceRef | None:
        check_configured_role(claims, self.presence.site(claims.site))
        agent_auth = agent_auth_from_wire(auth)
        resume = agent_auth.call_id
        ref = DeviceRef(claims.site, claims.sub, socket_device_id(sid))
        await self.enter_room(sid, agent_room(claims.site, claims.sub))
        update = DeviceUpdate(ref.device_id, DeviceKind.DESKTOP, agent_auth.state, 0)
        self.presence.hold_socket_device(sid, ref)
        await self.presence.set_device(claims.site, claims.sub, update, self.socket_ttl_s)
        # This socket is a device others route calls to: it must go as soon as its client
        # falls silent, not when engine.io's long ping timeout notices.
        self.server.watch(sid, self.namespace, *limits.agent_liveness(self.socket_ttl_s))
        if resume is not None:
            self.resuming[sid] = resume
        return ref

    async def on_joined(self, sid: str, session: Session) -> None:
        claims = session.claims
        call_id = self.resuming.pop(sid, None)
        if call_id is not None:
            call = await self.calls.resume_agent(claims.site, claims.sub, sid, call_id)
            if call is not None and sid in self.sessions:
                session.calls.add(call.call_id)
                site = self.presence.site(claims.site)
                await self.emit("call:update", call_to_wire(call, site, internal=True), to=sid)
        # A ring that went out while this app was away (reconnecting from a draining node).
        ring = await self.calls.missed_ring(claims.site, claims.sub)
        if ring is not None:
            await self.emit("call:ring", ring, to=sid)

    async def on_leave(self, sid: str, session: Session) -> None:
        self.resuming.pop(sid, None)
        if session.calls:
            claims = session.claims
            await self.calls.agent_left(claims.site, claims.sub, sid, session.calls)
        try:
            if self.draining:
                # Let go by this node's drain, the app reconnects to another node.
                await self.presence.hand_over_socket_device(sid, HANDOVER_LEASE_S)
                return
            ref = self.presence.release_socket_device(sid)
            if ref is not None:
                await self.presence.remove_device(ref.site, ref.agent_id, ref.device_id)
        except Exception as e:  # the lease will lapse on its own
            log.warning("could not remove device of %s: %r", sid, e)

    async def presence_set(self, sid: str, payload: Any) -> Json:
        session = self.sessions[sid]
        own = session.device.device_id if session.device else None
        obj = as_object(payload)
        update = device_update_from_wire(obj, None if obj.get("device_id") else own)
        ttl = None
        if update.device_id == own:
            if update.kind is not DeviceKind.DESKTOP:
                raise Invalid("this socket is a desktop device")
            ttl = self.socket_ttl_s
        presence = await self.presence.set_device(
            session.claims.site, session.claims.sub, update, ttl
        )
        return presence_ack(presence)

    async def call_accept(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        call = await self.calls.accept(claims.site, claims.sub, sid, call_id_from_wire(payload))
        session = self.sessions.get(sid)
        if session is None:
            # The socket left while the accept was stored (a drain, a network drop): its
            # leave did not know of this call, so the call is told now, as the leave would
            # have told it (the app may still take it over).
            await self.calls.agent_left(claims.site, claims.sub, sid, {call.call_id})
        else:
            session.calls.add(call.call_id)
        site = self.presence.site(claims.site)
        return accept_ack(call, site, ice_servers(self.settings.webrtc, claims.sub, time.time()))

    async def call_decline(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        call = await self.calls.decline(claims.site, claims.sub, call_id_from_wire(payload))
        return agent_call_ack(call, self.presence.site(claims.site), claims.sub)

    async def call_hangup(self, sid: str, payload: Any) -> Json:
        session = self.sessions[sid]
        claims = session.claims
        call = await self.calls.hangup(claims.site, claims.sub, call_id_from_wire(payload))
        session.calls.discard(call.call_id)
        return agent_call_ack(call, self.presence.site(claims.site), claims.sub)

    async def call_hold(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        call_id, on = hold_from_wire(payload)
        call = await self.calls.hold(claims.site, claims.sub, sid, call_id, on)
        return agent_call_ack(call, self.presence.site(claims.site), claims.sub)

    async def call_follow_up(self, sid: str, payload: Any) -> Json:
        """The agent promises to call the customer back (after a call, or during it)."""
        claims = self.sessions[sid].claims
        ask = FollowUpAsk(*follow_up_from_wire(payload))
        call, follow_up = await self.follow_ups.promise(claims.site, claims.sub, ask)
        return follow_up_ack(call, follow_up, self.presence.site(claims.site))

    async def rtc_signal(self, sid: str, payload: Any) -> Json:
        claims = self.sessions[sid].claims
        _, signal = signal_from_wire(payload)
        await self.calls.relay_signal(claims.site, claims.sub, sid, True, signal)
        return ok_ack()

    async def on_presence(self, change: PresenceChange) -> None:
        p = change.presence
        room = agent_room(p.site, p.agent_id)
        if not self.server.manager.has_members(self.namespace, room):
            return  # her sockets are on other nodes, which tell them
        await self.server.emit(
            "presence:update", change.wire, to=room, namespace=self.namespace, ignore_queue=True
        )
