"""``/board``: a supervisor's live view of every agent of their own site."""

from __future__ import annotations

from typing import Any

from gateway.edge.auth import SUPERVISOR_ROLES, Claims, TokenService, check_configured_role
from gateway.edge.sio.namespace import BaseNamespace
from gateway.edge.sio.rooms import site_room
from gateway.ops.metrics import Metrics
from gateway.services.call_records import CallRecords
from gateway.services.presence_service import PresenceChange, PresenceService
from gateway.store.base import DeviceRef
from gateway.wire.codec import Json
from gateway.wire.events import board_snapshot_ack


class BoardNamespace(BaseNamespace):
    """``/board``: a supervisor's live view of every agent of their own site."""

    roles = SUPERVISOR_ROLES

    def __init__(
        self,
        tokens: TokenService,
        metrics: Metrics,
        presence: PresenceService,
        records: CallRecords,
    ) -> None:
        super().__init__("/board", tokens, metrics)
        self.presence = presence
        self.records = records
        self.events = {"board:snapshot": self.snapshot}
        presence.add_listener(self.on_presence)

    async def on_join(self, sid: str, claims: Claims, auth: Json) -> DeviceRef | None:
        check_configured_role(claims, self.presence.site(claims.site))
        await self.enter_room(sid, site_room(claims.site))
        return None

    async def snapshot(self, sid: str, payload: Any) -> Json:
        site = self.sessions[sid].claims.site
        calls = await self.records.open_calls(site)
        return board_snapshot_ack(
            self.presence.site_presence(site), calls, self.presence.site(site)
        )

    async def on_presence(self, change: PresenceChange) -> None:
        room = site_room(change.presence.site)
        if not self.server.manager.has_members(self.namespace, room):
            return  # no supervisor watches this site from this node
        await self.server.emit(
            "presence:update", change.wire, to=room, namespace=self.namespace, ignore_queue=True
        )
