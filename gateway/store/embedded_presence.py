"""The embedded store's presence: in memory (a restart of the one node ends every lease)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from gateway.core.model import Device, PresenceRecord, PresenceStatus
from gateway.core.presence import is_live
from gateway.store.base import DeviceRef, Expectation


@dataclass
class _Agent:
    devices: dict[str, Device] = field(default_factory=dict)
    record: PresenceRecord = field(default_factory=PresenceRecord)


class EmbeddedPresence:
    def _open_presence(self) -> None:
        self._agents: dict[tuple[str, str], _Agent] = {}
        # (expires_at, site, agent, device); stale entries are skipped when popped.
        self._lapses: list[tuple[float, str, str, str]] = []

    def _agent(self, site: str, agent_id: str) -> _Agent:
        return self._agents.setdefault((site, agent_id), _Agent())

    def _record(self, entry: _Agent, bump: bool = True) -> PresenceRecord:
        devices = tuple(sorted(entry.devices.values(), key=lambda d: d.device_id))
        rev = entry.record.rev + 1 if bump else entry.record.rev
        entry.record = replace(entry.record, devices=devices, rev=rev)
        return entry.record

    async def put_device(self, site: str, agent_id: str, device: Device) -> PresenceRecord:
        entry = self._agent(site, agent_id)
        entry.devices[device.device_id] = device
        heapq.heappush(self._lapses, (device.expires_at, site, agent_id, device.device_id))
        return self._record(entry)

    async def put_device_if(
        self, site: str, agent_id: str, device: Device, expect: Expectation
    ) -> tuple[bool, PresenceRecord]:
        record = await self.put_device(site, agent_id, device)
        return await self._as_predicted(site, agent_id, record, expect)

    async def set_active_call_if(
        self, site: str, agent_id: str, call_id: str | None, expect: Expectation
    ) -> tuple[bool, PresenceRecord]:
        record = await self.set_active_call(site, agent_id, call_id)
        return await self._as_predicted(site, agent_id, record, expect)

    async def _as_predicted(
        self, site: str, agent_id: str, record: PresenceRecord, expect: Expectation
    ) -> tuple[bool, PresenceRecord]:
        live = tuple(sorted(d.device_id for d in record.devices if is_live(d, expect.now)))
        if record.rev != expect.rev or live != expect.live:
            return False, record
        if expect.status is not None:
            await self.save_status(site, agent_id, *expect.status)
            record = self._agents[(site, agent_id)].record
        return True, record

    async def remove_device(self, site: str, agent_id: str, device_id: str) -> PresenceRecord:
        entry = self._agent(site, agent_id)
        entry.devices.pop(device_id, None)
        return self._record(entry)

    async def touch_devices(
        self, refs: Sequence[DeviceRef], last_seen: float, expires_at: float
    ) -> list[DeviceRef]:
        gone = []
        for ref in refs:
            entry = self._agents.get((ref.site, ref.agent_id))
            device = entry.devices.get(ref.device_id) if entry else None
            if entry is None or device is None:
                gone.append(ref)
                continue
            entry.devices[ref.device_id] = replace(
                device, last_seen=last_seen, expires_at=expires_at
            )
            heapq.heappush(self._lapses, (expires_at, ref.site, ref.agent_id, ref.device_id))
            self._record(entry, bump=False)
        return gone

    async def get_presence(self, site: str, agent_id: str) -> PresenceRecord:
        entry = self._agents.get((site, agent_id))
        return entry.record if entry else PresenceRecord()

    async def get_site_presence(
        self, site: str, agent_ids: Sequence[str]
    ) -> dict[str, PresenceRecord]:
        return {a: await self.get_presence(site, a) for a in agent_ids}

    async def save_status(
        self, site: str, agent_id: str, status: PresenceStatus, since: float, idle_since: float
    ) -> None:
        entry = self._agent(site, agent_id)
        entry.record = replace(entry.record, status=status, since=since, idle_since=idle_since)

    async def set_active_call(
        self, site: str, agent_id: str, call_id: str | None
    ) -> PresenceRecord:
        entry = self._agent(site, agent_id)
        entry.record = replace(entry.record, active_call=call_id)
        return self._record(entry)

    async def claim_lapsed(self, now: float) -> list[tuple[str, str]]:
        lapsed: list[tuple[str, str]] = []
        while self._lapses and self._lapses[0][0] <= now:
            expires_at, site, agent_id, device_id = heapq.heappop(self._lapses)
            entry = self._agents.get((site, agent_id))
            device = entry.devices.get(device_id) if entry else None
            if entry is None or device is None or device.expires_at != expires_at:
                continue  # removed or renewed since this entry was pushed
            del entry.devices[device_id]
            self._record(entry)
            if (site, agent_id) not in lapsed:
                lapsed.append((site, agent_id))
        return lapsed
