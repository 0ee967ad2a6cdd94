"""Presence from IM: a chat integration's updates, already authenticated by the edge (the
site's HMAC signature), become each agent's ``im`` device.

Replays are refused through the store's once-only claims, so they hold across nodes: each
update's event id is accepted once within the replay window. A request replayed as it was
carries the same event ids (the signature covers the body), so it is refused with them;
claiming its signature as well would cost a store round trip and refuse nothing more.
Every update of a request is checked before any is claimed or applied, so a refused request
changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.core.errors import Conflict, Refused
from gateway.core.model import DeviceKind, DeviceState, PresenceStatus
from gateway.services.presence_service import PresenceService
from gateway.settings import PresenceSettings
from gateway.store.base import CoordinationStore
from gateway.wire.codec import DeviceUpdate
from gateway.wire.im_presence import IM_DEVICE_ID, TOLERANCE_S, ImPresenceUpdate

# A signed request is accepted TOLERANCE_S either side of its timestamp: remembering what
# was seen for both sides (and a little more) covers every moment it could be replayed.
REPLAY_WINDOW_S = 2 * TOLERANCE_S + 60


@dataclass(frozen=True, slots=True)
class ImOutcome:
    agent_id: str
    event_id: str
    applied: bool
    """False: the event id was seen before, and nothing changed."""
    status: PresenceStatus


class ImPresence:
    def __init__(
        self, presence: PresenceService, store: CoordinationStore, settings: PresenceSettings
    ) -> None:
        self._presence = presence
        self._store = store
        self._settings = settings

    async def apply(self, site_id: str, updates: Sequence[ImPresenceUpdate]) -> list[ImOutcome]:
        """Apply a signed request's updates in order. ``replayed_webhook`` when every one of
        its event ids was seen before (the same request again, or a retry of one that was
        applied); an update whose event id alone was seen is skipped as a duplicate."""
        site = self._presence.site(site_id)
        for update in updates:
            if update.agent_id not in site.agents:
                raise Refused(
                    code="unknown_agent",
                    message=f"{update.agent_id!r} is not an agent of site {site_id!r}",
                )
        fresh = await asyncio.gather(
            *(
                self._store.claim_webhook_once(site_id, f"event:{u.event_id}", REPLAY_WINDOW_S)
                for u in updates
            )
        )
        if not any(fresh):
            raise Conflict("this request's event ids were all seen before", code="replayed_webhook")
        outcomes = []
        for update, new in zip(updates, fresh, strict=True):
            if new:
                status = await self._set(site_id, update)
            else:
                status = self._presence.cached(site_id, update.agent_id).status
            outcomes.append(ImOutcome(update.agent_id, update.event_id, new, status))
        return outcomes

    async def _set(self, site_id: str, update: ImPresenceUpdate) -> PresenceStatus:
        if update.state == "offline":
            presence = await self._presence.remove_device(site_id, update.agent_id, IM_DEVICE_ID)
        else:
            device = DeviceUpdate(IM_DEVICE_ID, DeviceKind.IM, DeviceState(update.state), 0)
            presence = await self._presence.set_device(
                site_id, update.agent_id, device, ttl_s=self._settings.im_ttl_s
            )
        return presence.status
