"""Presence aggregation: many devices in, one status and a set of reachable channels out.

The rule (docs/ARCHITECTURE.md, "Presence"):
1. A device whose heartbeat lapsed (``expires_at <= now``) or that says ``offline`` is ignored.
2. An agent with an active call is ``on_call``, whatever the devices say.
3. Otherwise an explicit ``dnd`` on any live device wins: the agent asked not to be disturbed.
4. Otherwise the most available live device wins: available > busy > away. Busy ranks above
   away because a busy agent is at work and will be free soon; an away one is not there.
5. No live device: ``offline``.

An agent is reachable only while ``available``, on the channels of their available devices
whose priority is not negative (as in XMPP, a negative priority means "never route to me"),
highest priority first.
"""

from __future__ import annotations

import math
from dataclasses import replace

from gateway.core.model import (
    CHANNELS_BY_KIND,
    Agent,
    Channel,
    Device,
    DeviceState,
    Presence,
    PresenceRecord,
    PresenceStatus,
)

_STATUS_OF_STATE: dict[DeviceState, PresenceStatus] = {
    DeviceState.AVAILABLE: PresenceStatus.AVAILABLE,
    DeviceState.BUSY: PresenceStatus.BUSY,
    DeviceState.AWAY: PresenceStatus.AWAY,
    DeviceState.DND: PresenceStatus.DND,
    DeviceState.OFFLINE: PresenceStatus.OFFLINE,
}

# Lower is more available.
_AVAILABILITY_RANK: dict[DeviceState, int] = {
    DeviceState.AVAILABLE: 0,
    DeviceState.BUSY: 1,
    DeviceState.AWAY: 2,
    DeviceState.DND: 3,
    DeviceState.OFFLINE: 4,
}


def is_live(device: Device, now: float) -> bool:
    return device.state is not DeviceState.OFFLINE and device.expires_at > now


def effective_device(device: Device, now: float) -> Device:
    """The device as others should see it: a lapsed heartbeat reads as offline."""
    if device.expires_at <= now and device.state is not DeviceState.OFFLINE:
        return replace(device, state=DeviceState.OFFLINE)
    return device


def as_heard(devices: tuple[Device, ...], now: float, skip: str = "") -> tuple[Device, ...]:
    """An agent's devices as this node last heard of them (but ``skip``), to predict her
    record from: the live ones still live at ``now``. A socket's lease is renewed without an
    event (``Store.touch_devices``), so a device's expiry as heard is not its expiry as
    stored; a lapse is heard of (the sweeper publishes it), and until then a lapsed device
    only makes the prediction fail."""
    return tuple(
        d
        if d.state is DeviceState.OFFLINE or d.expires_at > now
        else replace(d, expires_at=math.inf)
        for d in devices
        if d.device_id != skip
    )


def aggregate_status(devices: tuple[Device, ...], active_call: bool, now: float) -> PresenceStatus:
    live = [d for d in devices if is_live(d, now)]
    if active_call:
        return PresenceStatus.ON_CALL
    if any(d.state is DeviceState.DND for d in live):
        return PresenceStatus.DND
    if not live:
        return PresenceStatus.OFFLINE
    best = min(live, key=lambda d: (_AVAILABILITY_RANK[d.state], -d.priority, -d.last_seen))
    return _STATUS_OF_STATE[best.state]


def reachable_channels(
    devices: tuple[Device, ...], status: PresenceStatus, now: float
) -> tuple[Channel, ...]:
    if status is not PresenceStatus.AVAILABLE:
        return ()
    routable = sorted(
        (d for d in devices if is_live(d, now) and d.state is DeviceState.AVAILABLE),
        key=lambda d: (-d.priority, d.device_id),
    )
    channels: list[Channel] = []
    for device in routable:
        if device.priority < 0:
            continue
        for channel in CHANNELS_BY_KIND[device.kind]:
            if channel not in channels:
                channels.append(channel)
    return tuple(channels)


def aggregate(agent: Agent, record: PresenceRecord, now: float) -> Presence:
    """The agent's presence as everyone should see it at ``now``."""
    status = aggregate_status(record.devices, record.active_call is not None, now)
    changed = status is not record.status
    since = now if changed or record.since == 0.0 else record.since
    idle_since = record.idle_since
    if status is PresenceStatus.AVAILABLE and (changed or idle_since == 0.0):
        idle_since = now
    return Presence(
        agent_id=agent.agent_id,
        site=agent.site,
        name=agent.name,
        branch=agent.branch,
        status=status,
        channels=reachable_channels(record.devices, status, now),
        devices=tuple(
            sorted((effective_device(d, now) for d in record.devices), key=lambda d: d.device_id)
        ),
        since=since,
        idle_since=idle_since,
        active_call=record.active_call,
        rev=record.rev,
    )


def remembered(record: PresenceRecord, presence: Presence) -> PresenceRecord:
    """The record with the aggregate's status bookkeeping, to store for the next change."""
    return replace(
        record, status=presence.status, since=presence.since, idle_since=presence.idle_since
    )


def status_changed(record: PresenceRecord, presence: Presence) -> bool:
    return (
        record.status is not presence.status
        or record.since != presence.since
        or record.idle_since != presence.idle_since
    )
