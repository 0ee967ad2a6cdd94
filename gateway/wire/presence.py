"""Presence on the wire: devices, an agent's aggregated presence, a site's availability, and
what a client may say about a device (docs/PROTOCOL.md sections 3, 4 and 6)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from gateway.core import model
from gateway.core.model import Channel, DeviceKind, DeviceState, PresenceStatus
from gateway.wire.base import (
    OWN_OR_ID_BODY,
    Count,
    Id,
    Json,
    PriorityIn,
    Time,
    iso,
    to_wire,
    whole,
)
from gateway.wire.base import (
    Priority as PriorityOut,
)

# --- in ------------------------------------------------------------------------------------


class DeviceUpdate(Struct):
    """The body of ``PUT /v1/agents/me/devices/{device_id}``: a device's kind and state. The
    path's id wins; a ``device_id`` in the body is ignored, whatever it is."""

    kind: DeviceKind
    state: DeviceState
    priority: PriorityIn | None = None


OwnOrId = Annotated[
    str,
    Meta(
        pattern=whole(OWN_OR_ID_BODY),
        description="Absent, null or empty: this socket's own device.",
    ),
]


class PresenceSet(Struct):
    """``presence:set`` on ``/agent``: this socket's own device, or another of the agent's."""

    kind: DeviceKind
    state: DeviceState
    priority: PriorityIn | None = None
    device_id: OwnOrId | None = None


# --- out -----------------------------------------------------------------------------------


class Device(Struct):
    """One of an agent's endpoints (docs/PROTOCOL.md section 3)."""

    device_id: Id
    kind: DeviceKind
    state: DeviceState
    priority: PriorityOut
    last_seen: Time
    expires_at: Time


class Presence(Struct):
    """An agent's one aggregated status and the channels they can be rung on now."""

    agent_id: Id
    site: Id
    name: str
    branch: Id | None
    status: PresenceStatus
    channels: list[Channel]
    devices: list[Device]
    since: Time


class Availability(Struct):
    """What a site's button may truthfully promise now."""

    available: bool
    channels: list[Channel]
    agents_available: Count
    estimated_wait_s: Count
    open: bool
    next_open_at: Time | None
    callbacks: bool
    """The site takes callbacks at all (telephony is set up): without, never ``pstn``."""


def device_struct(device: model.Device) -> Device:
    return Device(
        device_id=device.device_id,
        kind=device.kind,
        state=device.state,
        priority=device.priority,
        last_seen=_time(device.last_seen),
        expires_at=_time(device.expires_at),
    )


def presence_struct(presence: model.Presence) -> Presence:
    return Presence(
        agent_id=presence.agent_id,
        site=presence.site,
        name=presence.name,
        branch=presence.branch,
        status=presence.status,
        channels=list(presence.channels),
        devices=[device_struct(d) for d in presence.devices],
        since=_time(presence.since),
    )


def device_to_wire(device: model.Device) -> Json:
    return to_wire(device_struct(device))


def presence_to_wire(presence: model.Presence) -> Json:
    return to_wire(presence_struct(presence))


def availability_to_wire(
    available: bool,
    channels: tuple[Channel, ...],
    agents_available: int,
    estimated_wait_s: int,
    open: bool,
    next_open_at: float | None,
    callbacks: bool,
) -> Json:
    return to_wire(
        Availability(
            available=available,
            channels=list(channels),
            agents_available=agents_available,
            estimated_wait_s=estimated_wait_s,
            open=open,
            next_open_at=iso(next_open_at),
            callbacks=callbacks,
        )
    )


def _time(ts: float) -> str:
    text = iso(ts)
    assert text is not None
    return text
