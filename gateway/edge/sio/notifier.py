"""Call events to the parties' sockets, on whichever node each is connected."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import socketio

from gateway.core.call import Call
from gateway.core.model import Site
from gateway.edge.sio.rooms import agent_room, site_room, visitor_room
from gateway.edge.sio.sio_manager import ObservedRedisManager
from gateway.wire.calls import key_to_wire, ring_stop_to_wire
from gateway.wire.codec import Json, call_to_wire


class SocketCallNotifier:
    """Delivers call events to the parties' sockets on whichever node they are connected:
    socket.io's Redis manager carries each emit to the other nodes."""

    def __init__(
        self,
        server: socketio.AsyncServer,
        sites: Mapping[str, Site],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.server = server
        self.sites = sites
        self.clock = clock

    async def call_update(self, call: Call, former_agent: str | None = None) -> None:
        site = self.sites[call.site]
        internal = call_to_wire(call, site, internal=True)
        # Everyone but the call's own agent sees the customer's number masked.
        others = (
            internal
            if call.phone is None
            else call_to_wire(call, site, internal=True, phone_masked=True)
        )
        emits = [
            (
                "call:update",
                call_to_wire(call, site),
                "/visitor",
                visitor_room(call.site, call.visitor_id),
            )
        ]
        if call.agent_id is not None:
            emits.append(("call:update", internal, "/agent", agent_room(call.site, call.agent_id)))
        if former_agent is not None and former_agent != call.agent_id:
            emits.append(("call:update", others, "/agent", agent_room(call.site, former_agent)))
        emits.append(("call:update", others, "/board", site_room(call.site)))
        manager = self.server.manager
        if isinstance(manager, ObservedRedisManager):
            await manager.emit_batch(emits)
            return
        for event, data, namespace, room in emits:
            await self.server.emit(event, data, to=room, namespace=namespace)

    async def ring(self, call: Call, payload: Json) -> None:
        assert call.agent_id is not None and call.ring_expires_at is not None
        if self.clock() >= call.ring_expires_at:
            return  # over before it could be sent (a node far behind): its timer ends it
        await self.server.emit(
            "call:ring",
            payload,
            to=agent_room(call.site, call.agent_id),
            namespace="/agent",
        )

    async def ring_stop(self, call: Call, agent_id: str, reason: str) -> None:
        await self.server.emit(
            "call:ring_stop",
            ring_stop_to_wire(call, reason),
            to=agent_room(call.site, agent_id),
            namespace="/agent",
        )

    async def replay(self, call: Call, ring: Json | None, rings_over: dict[str, str]) -> None:
        site = self.sites[call.site]
        internal = call_to_wire(call, site, internal=True)
        board = call_to_wire(call, site, internal=True, phone_masked=True)
        emits: list[tuple[str, Json, str, str]] = [
            (
                "call:ring_stop",
                ring_stop_to_wire(call, reason),
                "/agent",
                agent_room(call.site, agent_id),
            )
            for agent_id, reason in rings_over.items()
        ]
        if ring is not None and call.agent_id is not None:
            emits.append(("call:ring", ring, "/agent", agent_room(call.site, call.agent_id)))
        emits.append(
            (
                "call:update",
                call_to_wire(call, site),
                "/visitor",
                visitor_room(call.site, call.visitor_id),
            )
        )
        if call.agent_id is not None:
            emits.append(("call:update", internal, "/agent", agent_room(call.site, call.agent_id)))
        emits.append(("call:update", board, "/board", site_room(call.site)))
        manager = self.server.manager
        for event, data, namespace, room in emits:
            # Each node replays to its own sockets (published, every node's would get it),
            # rings through the ring gate as any other.
            if isinstance(manager, ObservedRedisManager):
                await manager.deliver_here(event, data, namespace, room)
            else:
                await self.server.emit(event, data, to=room, namespace=namespace)

    async def sent(self) -> None:
        manager = self.server.manager
        if isinstance(manager, ObservedRedisManager):
            await manager.sent()

    async def key(self, call: Call, key: str) -> None:
        if call.agent_sid is None:
            return  # never `to=None`: python-socketio would broadcast to every agent
        await self.server.emit(
            "call:key", key_to_wire(call.call_id, key), to=call.agent_sid, namespace="/agent"
        )

    async def restart_media(self, call: Call, to_agent: bool) -> None:
        await self._to_browser(call, to_agent, "rtc:restart", {"call_id": call.call_id})

    async def signal(self, call: Call, to_agent: bool, payload: Json) -> None:
        await self._to_browser(call, to_agent, "rtc:signal", payload)

    async def _to_browser(self, call: Call, to_agent: bool, event: str, payload: Json) -> None:
        if to_agent:
            if call.agent_sid is None:
                return  # never `to=None`: python-socketio would broadcast to every agent
            await self.server.emit(event, payload, to=call.agent_sid, namespace="/agent")
        else:
            await self.server.emit(
                event,
                payload,
                to=visitor_room(call.site, call.visitor_id),
                namespace="/visitor",
            )
