"""Presence across nodes: writes devices through the store, aggregates with the pure core,
publishes every change to all nodes, and keeps each node's cache of every agent's presence.

Transport code (REST, socket.io) calls this; it calls no transport. Listeners registered by
the edges turn a presence change into emits to this node's own clients.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from functools import partial
from types import MappingProxyType

from gateway.core.errors import Forbidden, NotFound
from gateway.core.model import (
    Agent,
    Channel,
    Device,
    DeviceKind,
    DeviceState,
    Presence,
    PresenceRecord,
    PresenceStatus,
    Site,
)
from gateway.core.presence import (
    aggregate,
    as_heard,
    effective_device,
    is_live,
    status_changed,
)
from gateway.ops.clock import SYSTEM_CLOCK, Clock
from gateway.ops.tasks import TaskGroup
from gateway.services.store_retry import UntilStored
from gateway.settings import PresenceSettings
from gateway.store.base import DeviceRef, Expectation, PresenceAndEvents
from gateway.wire.codec import DeviceUpdate, Json, presence_to_wire

log = logging.getLogger(__name__)

PRESENCE_EVENT = "presence"
LEASE_SLICE = 50  # socket leases renewed per store command (~1 ms of Redis time)


class PresenceChange:
    """A change as the listeners get it, with its v1 wire shape: encoded once per change on
    each node and shared by all emits, and only if one is sent (most changes a node hears
    are of agents connected to other nodes, with nobody here to tell)."""

    __slots__ = ("_wire", "presence")

    def __init__(self, presence: Presence) -> None:
        self.presence = presence
        self._wire: Json | None = None

    @property
    def wire(self) -> Json:
        if self._wire is None:
            self._wire = presence_to_wire(self.presence)
        return self._wire


PresenceListener = Callable[[PresenceChange], Awaitable[None]]
# Called with (site, agent, record) after an agent's devices lapsed and were removed.
LapseListener = Callable[[str, str, PresenceRecord], Awaitable[None]]


def socket_device_id(sid: str) -> str:
    """The desktop device a connected /agent socket is."""
    return f"desktop-{sid[:8]}"


def next_record(
    cached: Presence, devices: tuple[Device, ...], active_call: str | None
) -> PresenceRecord:
    """The record a node predicts for an agent it last saw as ``cached`` after one more
    change, which left her ``devices`` and ``active_call``: the next revision."""
    return PresenceRecord(
        devices=devices,
        active_call=active_call,
        status=cached.status,
        since=cached.since,
        idle_since=cached.idle_since,
        rev=cached.rev + 1,
    )


def presence_event(presence: Presence) -> Json:
    """The node-to-node form: the wire shape plus what routing needs, times as floats."""
    return {
        "type": PRESENCE_EVENT,
        "site": presence.site,
        "agent_id": presence.agent_id,
        "status": presence.status.value,
        "channels": [c.value for c in presence.channels],
        "devices": [
            [d.device_id, d.kind.value, d.state.value, d.priority, d.last_seen, d.expires_at]
            for d in presence.devices
        ],
        "since": presence.since,
        "idle_since": presence.idle_since,
        "active_call": presence.active_call,
        "rev": presence.rev,
    }


def presence_from_event(event: Json, agent: Agent) -> Presence:
    return Presence(
        agent_id=agent.agent_id,
        site=agent.site,
        name=agent.name,
        branch=agent.branch,
        status=PresenceStatus(event["status"]),
        channels=tuple(Channel(c) for c in event["channels"]),
        devices=tuple(
            Device(i, DeviceKind(k), DeviceState(s), int(p), float(ls), float(ex))
            for i, k, s, p, ls, ex in event["devices"]
        ),
        since=float(event["since"]),
        idle_since=float(event["idle_since"]),
        active_call=event["active_call"],
        rev=int(event["rev"]),
    )


class PresenceService:
    def __init__(
        self,
        sites: dict[str, Site],
        store: PresenceAndEvents,
        settings: PresenceSettings,
        tasks: TaskGroup,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._sites = sites
        self._store = store
        self._settings = settings
        self._clock = clock
        self._until_stored = UntilStored(tasks, clock.now)
        self.on_prediction: Callable[[bool], None] = lambda held: None
        """Told whether each predicted change held (one round trip) or not (two)."""
        self._cache: dict[str, dict[str, Presence]] = {s: {} for s in sites}
        self._listeners: list[PresenceListener] = []
        self._lapse_listeners: list[LapseListener] = []
        self._socket_devices: dict[str, DeviceRef] = {}
        # What each socket device held here last said about itself, to put it back should
        # its lease lapse while the socket is still connected (see _restore).
        self._socket_updates: dict[DeviceRef, DeviceUpdate | None] = {}

    # --- directory ---------------------------------------------------------------------------

    def site(self, site_id: str) -> Site:
        site = self._sites.get(site_id)
        if site is None:
            raise NotFound(f"no site {site_id!r}")
        return site

    def agent(self, site_id: str, agent_id: str) -> Agent:
        agent = self.site(site_id).agents.get(agent_id)
        if agent is None:
            raise Forbidden(f"{agent_id!r} is not an agent of site {site_id!r}")
        return agent

    def add_listener(self, listener: PresenceListener) -> None:
        self._listeners.append(listener)

    def add_lapse_listener(self, listener: LapseListener) -> None:
        self._lapse_listeners.append(listener)

    # --- reads (this node's cache, kept current by events) -----------------------------------

    def cached(self, site_id: str, agent_id: str) -> Presence:
        found = self._cache.get(site_id, {}).get(agent_id)
        if found is not None:
            return found
        return aggregate(self.agent(site_id, agent_id), PresenceRecord(), self._clock.now())

    def snapshot(self, site_id: str) -> Mapping[str, Presence]:
        """Every agent of the site this node has presence for, as it knows them now (for
        routing: an agent missing here has never been seen, so is offline). A read-only view,
        not a copy: routing reads it once per call, at thousands of agents."""
        self.site(site_id)
        return MappingProxyType(self._cache[site_id])

    def site_presence(self, site_id: str) -> list[Presence]:
        return [self.cached(site_id, a) for a in self.site(site_id).agents]

    async def fetch(self, site_id: str, agent_id: str) -> Presence:
        """Read through to the store: for answers that must not lag behind events."""
        agent = self.agent(site_id, agent_id)
        record = await self._store.get_presence(site_id, agent_id)
        return aggregate(agent, record, self._clock.now())

    async def resync(self) -> None:
        """Reload every agent from the store: at start and after missing events."""
        now = self._clock.now()
        for site_id, site in self._sites.items():
            records = await self._store.get_site_presence(site_id, list(site.agents))
            for agent_id, record in records.items():
                presence = aggregate(site.agents[agent_id], record, now)
                previous = self._cache[site_id].get(agent_id)
                self._cache[site_id][agent_id] = presence
                if previous is not None and previous != presence:
                    await self._notify(presence)

    # --- writes --------------------------------------------------------------------------------

    async def set_device(
        self, site_id: str, agent_id: str, update: DeviceUpdate, ttl_s: float | None = None
    ) -> Presence:
        presence = await self._set_device(site_id, agent_id, update, ttl_s)
        ref = DeviceRef(site_id, agent_id, update.device_id)
        if ref in self._socket_updates:
            self._socket_updates[ref] = update
        return presence

    async def _set_device(
        self, site_id: str, agent_id: str, update: DeviceUpdate, ttl_s: float | None
    ) -> Presence:
        agent = self.agent(site_id, agent_id)
        now = self._clock.now()
        ttl = self._settings.device_ttl_s if ttl_s is None else ttl_s
        device = Device(
            update.device_id, update.kind, update.state, update.priority, now, now + ttl
        )
        cached = self._cache[site_id].get(agent_id)
        if cached is None:
            record = await self._store.put_device(site_id, agent_id, device)
            return await self._commit(agent, record, now)
        devices = (*as_heard(cached.devices, now, skip=device.device_id), device)
        return await self._predicted(
            agent,
            next_record(cached, devices, cached.active_call),
            now,
            partial(self._store.put_device_if, site_id, agent_id, device),
        )

    async def _predicted(
        self,
        agent: Agent,
        predicted: PresenceRecord,
        now: float,
        write: Callable[[Expectation], Awaitable[tuple[bool, PresenceRecord]]],
    ) -> Presence:
        """A change whose resulting record this node predicted from its cache: the store
        checks the prediction and, when it holds (nearly always), saves and publishes in the
        same round trip as the ``write``; else the change is committed from the record the
        store returned, a round trip later."""
        presence = aggregate(agent, predicted, now)
        expect = Expectation(
            rev=predicted.rev,
            live=tuple(sorted(d.device_id for d in predicted.devices if is_live(d, now))),
            now=now,
            status=(presence.status, presence.since, presence.idle_since)
            if status_changed(predicted, presence)
            else None,
            event={
                k: v for k, v in presence_event(presence).items() if k not in ("devices", "rev")
            },
        )
        done, record = await write(expect)
        self.on_prediction(done)
        if not done:
            return await self._commit(agent, record, now)
        presence = replace(
            presence,
            devices=tuple(effective_device(d, now) for d in record.devices),
            rev=record.rev,
        )
        await self._apply(presence)
        return presence

    async def remove_device(self, site_id: str, agent_id: str, device_id: str) -> Presence:
        agent = self.agent(site_id, agent_id)
        record = await self._store.remove_device(site_id, agent_id, device_id)
        return await self._commit(agent, record, self._clock.now())

    async def heartbeat(self, site_id: str, agent_id: str, device_id: str) -> Presence:
        agent = self.agent(site_id, agent_id)
        now = self._clock.now()
        record = await self._store.get_presence(site_id, agent_id)
        device = next((d for d in record.devices if d.device_id == device_id), None)
        if device is None or device.expires_at <= now:
            raise NotFound(f"no live device {device_id!r}; PUT it first")
        ttl = self._settings.device_ttl_s
        renewed = Device(
            device.device_id, device.kind, device.state, device.priority, now, now + ttl
        )
        record = await self._store.put_device(site_id, agent_id, renewed)
        return await self._commit(agent, record, now)

    async def set_active_call(self, site_id: str, agent_id: str, call_id: str | None) -> Presence:
        agent = self.agent(site_id, agent_id)
        now = self._clock.now()
        cached = self._cache[site_id].get(agent_id)
        if cached is None:
            record = await self._store.set_active_call(site_id, agent_id, call_id)
            return await self._commit(agent, record, now)
        return await self._predicted(
            agent,
            next_record(cached, as_heard(cached.devices, now), call_id),
            now,
            partial(self._store.set_active_call_if, site_id, agent_id, call_id),
        )

    async def _commit(self, agent: Agent, record: PresenceRecord, now: float) -> Presence:
        presence = aggregate(agent, record, now)
        published = self._store.publish(presence_event(presence))
        try:
            if status_changed(record, presence):
                # In one round trip: Redis takes them in order on the store's one connection.
                saved = self._store.save_status(
                    agent.site, agent.agent_id, presence.status, presence.since, presence.idle_since
                )
                await asyncio.gather(saved, published)
            else:
                await published
        finally:
            # The record is stored, whatever became of the status or the event: this node
            # shows it, as it did when it applied the change before sending the event.
            await self._apply(presence)
        return presence

    # --- changes, this node's own and other nodes' ---------------------------------------------

    async def on_event(self, event: Json) -> None:
        """A change made on another node."""
        site = self._sites.get(event.get("site", ""))
        agent = site.agents.get(event.get("agent_id", "")) if site else None
        if agent is None:
            return  # a node with another config; not ours to show
        await self._apply(presence_from_event(event, agent))

    async def _apply(self, presence: Presence) -> None:
        previous = self._cache[presence.site].get(presence.agent_id)
        if previous is not None and previous.rev > presence.rev:
            return  # an older change that arrived late
        self._cache[presence.site][presence.agent_id] = presence
        await self._notify(presence)

    async def _notify(self, presence: Presence) -> None:
        change = PresenceChange(presence)
        for listener in self._listeners:
            try:
                await listener(change)
            except Exception:
                log.exception("presence listener failed")

    # --- leases --------------------------------------------------------------------------------

    def hold_socket_device(self, sid: str, ref: DeviceRef) -> None:
        self._socket_devices[sid] = ref
        self._socket_updates[ref] = None

    def release_socket_device(self, sid: str) -> DeviceRef | None:
        ref = self._socket_devices.pop(sid, None)
        if ref is not None:
            self._socket_updates.pop(ref, None)
        return ref

    async def hand_over_socket_device(self, sid: str, lease_s: float) -> None:
        """A socket this node let go as it drains: its device stays as it was for
        ``lease_s`` (not renewed), long enough for its client to reconnect to another node,
        so that the agent does not drop out of routing meanwhile; then it lapses. A ring in
        that time reaches the agent as she reconnects (``CallDesk.missed_ring``)."""
        ref = self._socket_devices.pop(sid, None)
        if ref is None:
            return
        update = self._socket_updates.pop(ref, None)
        if update is None:  # it never said anything about itself: nothing to keep
            await self.remove_device(ref.site, ref.agent_id, ref.device_id)
            return
        await self._set_device(ref.site, ref.agent_id, update, lease_s)

    async def _restore(self, gone: list[DeviceRef]) -> None:
        """Devices of sockets still connected here whose leases lapsed anyway: this node
        could not renew them while the store did not answer (a Redis pause longer than a
        lease's slack), and a sweeper claimed them once it answered again. Renewal never
        revives a removed device, so without this the agent stayed offline while connected."""
        for ref in gone:
            update = self._socket_updates.get(ref)
            if update is not None:
                log.info("restoring %s of %s: lapsed while connected", ref.device_id, ref.agent_id)
                await self.set_device(ref.site, ref.agent_id, update, self._settings.socket_ttl_s)

    async def sweep(self) -> int:
        """Report devices whose lease lapsed (on any node) as offline; returns agents changed."""
        lapsed = await self._store.claim_lapsed(self._clock.now())
        agents = [
            self._sites[site_id].agents[agent_id]
            for site_id, agent_id in lapsed
            if site_id in self._sites and agent_id in self._sites[site_id].agents
        ]
        if agents:
            # Claimed here alone: a store outage must delay the reports, not lose them.
            await self._until_stored(partial(self._report_lapses, agents), "lapses")
        return len(lapsed)

    async def _report_lapses(self, pending: list[Agent]) -> None:
        """Aggregate each agent afresh, publish and tell the lapse listeners; an agent leaves
        ``pending`` once done, so a try that the store cut short goes on where it stopped."""
        while pending:
            agent = pending[0]
            record = await self._store.get_presence(agent.site, agent.agent_id)
            await self._commit(agent, record, self._clock.now())
            pending.pop(0)
            for listener in self._lapse_listeners:
                try:
                    await listener(agent.site, agent.agent_id, record)
                except Exception:
                    log.exception("lapse listener failed")

    async def renew_socket_leases(self) -> None:
        now = self._clock.now()
        refs = list(self._socket_devices.values())
        await self._restore(
            await self._store.touch_devices(refs, now, now + self._settings.socket_ttl_s)
        )

    async def run_sweeper(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("presence sweep failed: %r", e)
            await self._clock.pause(self._settings.sweep_interval_s)

    async def run_lease_renewal(self) -> None:
        """Every socket lease renewed each third of its TTL, in slices spread over that
        interval: renewing thousands at once stalled this node's calls and Redis's."""
        interval = self._settings.socket_ttl_s / 3
        while True:
            refs = list(self._socket_devices.values())
            slices = max(1, math.ceil(len(refs) / LEASE_SLICE))
            for i in range(slices):
                await self._clock.sleep(interval / slices)
                now = self._clock.now()
                chunk = refs[i * LEASE_SLICE : (i + 1) * LEASE_SLICE]
                try:
                    await self._restore(
                        await self._store.touch_devices(
                            chunk, now, now + self._settings.socket_ttl_s
                        )
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("renewing socket leases failed: %r", e)
