"""Presence aggregation (gateway/core/presence.py): the rule of the module docstring, as tables,
then properties over random devices and instants.

Every instant is fixed; no wall clock is read.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.model import (
    CHANNELS_BY_KIND,
    Agent,
    Channel,
    Device,
    DeviceKind,
    DeviceState,
    Presence,
    PresenceRecord,
    PresenceStatus,
)
from gateway.core.presence import (
    aggregate,
    aggregate_status,
    as_heard,
    effective_device,
    is_live,
    reachable_channels,
    remembered,
    status_changed,
)

NOW = 1_750_000_000.0
AGENT = Agent(agent_id="anna", site="acme", name="Anna", branch="dublin")

K = DeviceKind
S = DeviceState
P = PresenceStatus
WEBRTC = Channel.WEBRTC
PSTN = Channel.PSTN


def dev(
    device_id: str = "d1",
    kind: DeviceKind = K.DESKTOP,
    state: DeviceState = S.AVAILABLE,
    priority: int = 0,
    *,
    last_seen: float = NOW - 5,
    expires_at: float = NOW + 60,
) -> Device:
    return Device(device_id, kind, state, priority, last_seen, expires_at)


def lapsed(
    device_id: str = "old",
    kind: DeviceKind = K.DESKTOP,
    state: DeviceState = S.AVAILABLE,
    priority: int = 0,
) -> Device:
    """A device whose heartbeat ran out exactly now (``expires_at <= now`` is lapsed)."""
    return dev(device_id, kind, state, priority, last_seen=NOW - 120, expires_at=NOW)


def record(
    *devices: Device,
    call: str | None = None,
    status: PresenceStatus = P.OFFLINE,
    since: float = 0.0,
    idle_since: float = 0.0,
    rev: int = 0,
) -> PresenceRecord:
    return PresenceRecord(devices, call, status, since, idle_since, rev)


# --- aggregate_status: one row per rule ---------------------------------------------------

STATUS_CASES: list[tuple[str, tuple[Device, ...], bool, PresenceStatus]] = [
    # 5. no live device
    ("no devices", (), False, P.OFFLINE),
    ("only an offline-state device", (dev(state=S.OFFLINE),), False, P.OFFLINE),
    ("only a lapsed device", (lapsed(),), False, P.OFFLINE),
    ("only a lapsed dnd device", (lapsed(state=S.DND),), False, P.OFFLINE),
    # 1. lapsed (expires_at <= now) and offline devices are ignored
    ("expires exactly now is lapsed", (dev(expires_at=NOW),), False, P.OFFLINE),
    ("expires just after now is live", (dev(expires_at=NOW + 0.001),), False, P.AVAILABLE),
    ("lapsed available beside live away", (lapsed(), dev("a", state=S.AWAY)), False, P.AWAY),
    ("lapsed dnd beside live available", (lapsed(state=S.DND), dev("a")), False, P.AVAILABLE),
    (
        "offline state beside live busy",
        (dev("o", state=S.OFFLINE), dev("b", state=S.BUSY)),
        False,
        P.BUSY,
    ),
    # 2. an active call wins over everything
    ("call with no devices", (), True, P.ON_CALL),
    ("call with dnd device", (dev(state=S.DND),), True, P.ON_CALL),
    ("call with available device", (dev(),), True, P.ON_CALL),
    ("call with only lapsed device", (lapsed(),), True, P.ON_CALL),
    # 3. dnd on any live device wins
    ("dnd alone", (dev(state=S.DND),), False, P.DND),
    ("dnd beside available", (dev("a"), dev("b", state=S.DND)), False, P.DND),
    (
        "low-priority dnd beside high-priority available",
        (dev("a", priority=100), dev("b", state=S.DND, priority=-100)),
        False,
        P.DND,
    ),
    (
        "dnd beside busy and away",
        (dev("a", state=S.BUSY), dev("b", state=S.DND), dev("c", state=S.AWAY)),
        False,
        P.DND,
    ),
    # 4. the most available live device wins: available > busy > away
    ("available alone", (dev(),), False, P.AVAILABLE),
    ("busy alone", (dev(state=S.BUSY),), False, P.BUSY),
    ("away alone", (dev(state=S.AWAY),), False, P.AWAY),
    ("available beats busy", (dev("a", state=S.BUSY), dev("b")), False, P.AVAILABLE),
    ("available beats away", (dev("a", state=S.AWAY), dev("b")), False, P.AVAILABLE),
    ("busy beats away", (dev("a", state=S.AWAY), dev("b", state=S.BUSY)), False, P.BUSY),
    (
        "busy beats away in any order",
        (dev("a", state=S.BUSY), dev("b", state=S.AWAY)),
        False,
        P.BUSY,
    ),
    (
        "availability ranks above priority",
        (dev("a", state=S.AWAY, priority=127), dev("b", state=S.BUSY, priority=-127)),
        False,
        P.BUSY,
    ),
    (
        "negative-priority available still counts for status",
        (dev("a", state=S.BUSY, priority=5), dev("b", K.IM, priority=-1)),
        False,
        P.AVAILABLE,
    ),
    ("im device counts for status", (dev(kind=K.IM, state=S.AWAY),), False, P.AWAY),
]


@pytest.mark.parametrize(
    ("devices", "active_call", "expected"),
    [pytest.param(d, c, e, id=name) for name, d, c, e in STATUS_CASES],
)
def test_aggregate_status(
    devices: tuple[Device, ...], active_call: bool, expected: PresenceStatus
) -> None:
    assert aggregate_status(devices, active_call, NOW) is expected
    assert aggregate_status(tuple(reversed(devices)), active_call, NOW) is expected


# --- reachable_channels ---------------------------------------------------------------------

CHANNEL_CASES: list[tuple[str, tuple[Device, ...], tuple[Channel, ...]]] = [
    ("desktop offers webrtc", (dev(kind=K.DESKTOP),), (WEBRTC,)),
    ("mobile offers pstn", (dev(kind=K.MOBILE),), (PSTN,)),
    ("im offers nothing", (dev(kind=K.IM),), ()),
    ("no devices", (), ()),
    ("priority 0 is routable", (dev(kind=K.MOBILE, priority=0),), (PSTN,)),
    ("priority -1 never routable", (dev(kind=K.MOBILE, priority=-1),), ()),
    (
        "negative priority dropped, others kept",
        (dev("m", K.MOBILE, priority=-5), dev("d", K.DESKTOP, priority=0)),
        (WEBRTC,),
    ),
    (
        "higher priority first (mobile)",
        (dev("d", K.DESKTOP, priority=1), dev("m", K.MOBILE, priority=5)),
        (PSTN, WEBRTC),
    ),
    (
        "higher priority first (desktop)",
        (dev("m", K.MOBILE, priority=1), dev("d", K.DESKTOP, priority=5)),
        (WEBRTC, PSTN),
    ),
    (
        "equal priority ordered by device id",
        (dev("b-desk", K.DESKTOP, priority=3), dev("a-mob", K.MOBILE, priority=3)),
        (PSTN, WEBRTC),
    ),
    (
        "a channel appears once, at its best device",
        (
            dev("d1", K.DESKTOP, priority=1),
            dev("m", K.MOBILE, priority=5),
            dev("d2", K.DESKTOP, priority=9),
        ),
        (WEBRTC, PSTN),
    ),
    (
        "only available devices offer channels",
        (dev("m", K.MOBILE, S.BUSY, priority=9), dev("d", K.DESKTOP)),
        (WEBRTC,),
    ),
    (
        "away device offers nothing",
        (dev("m", K.MOBILE, S.AWAY, priority=9), dev("d", K.DESKTOP)),
        (WEBRTC,),
    ),
    (
        "lapsed available device offers nothing",
        (lapsed("m", K.MOBILE, priority=9), dev("d", K.DESKTOP)),
        (WEBRTC,),
    ),
    (
        "offline-state device offers nothing",
        (dev("m", K.MOBILE, S.OFFLINE, priority=9), dev("d", K.DESKTOP)),
        (WEBRTC,),
    ),
    (
        "im beside mobile",
        (dev("i", K.IM, priority=50), dev("m", K.MOBILE, priority=0)),
        (PSTN,),
    ),
]


@pytest.mark.parametrize(
    ("devices", "expected"),
    [pytest.param(d, e, id=name) for name, d, e in CHANNEL_CASES],
)
def test_reachable_channels_when_available(
    devices: tuple[Device, ...], expected: tuple[Channel, ...]
) -> None:
    assert reachable_channels(devices, P.AVAILABLE, NOW) == expected
    assert reachable_channels(tuple(reversed(devices)), P.AVAILABLE, NOW) == expected


@pytest.mark.parametrize("status", [s for s in PresenceStatus if s is not P.AVAILABLE])
def test_no_channels_unless_available(status: PresenceStatus) -> None:
    devices = (dev("d", K.DESKTOP, priority=5), dev("m", K.MOBILE, priority=5))
    assert reachable_channels(devices, P.AVAILABLE, NOW) == (WEBRTC, PSTN)
    assert reachable_channels(devices, status, NOW) == ()


# --- aggregate ------------------------------------------------------------------------------


def test_aggregate_copies_agent_and_record_fields() -> None:
    rec = record(dev("d", K.DESKTOP), dev("m", K.MOBILE, priority=2), rev=42)
    presence = aggregate(AGENT, rec, NOW)
    assert presence == Presence(
        agent_id="anna",
        site="acme",
        name="Anna",
        branch="dublin",
        status=P.AVAILABLE,
        channels=(PSTN, WEBRTC),
        devices=(dev("d", K.DESKTOP), dev("m", K.MOBILE, priority=2)),
        since=NOW,
        idle_since=NOW,
        active_call=None,
        rev=42,
    )


def test_agent_without_branch() -> None:
    agent = Agent(agent_id="carla", site="acme", name="Carla")
    presence = aggregate(agent, record(dev()), NOW)
    assert (presence.agent_id, presence.branch, presence.name) == ("carla", None, "Carla")


def test_active_call_gives_on_call_with_no_channels() -> None:
    rec = record(dev("d", K.DESKTOP), dev("m", K.MOBILE), call="call-7", status=P.AVAILABLE)
    presence = aggregate(AGENT, rec, NOW)
    assert presence.status is P.ON_CALL
    assert presence.channels == ()
    assert presence.active_call == "call-7"
    # The devices themselves are still reported as they are.
    assert [d.state for d in presence.devices] == [S.AVAILABLE, S.AVAILABLE]


def test_dnd_gives_no_channels() -> None:
    presence = aggregate(AGENT, record(dev("d", K.DESKTOP), dev("x", K.IM, S.DND)), NOW)
    assert (presence.status, presence.channels) == (P.DND, ())


def test_since_kept_while_status_unchanged() -> None:
    rec = record(dev(), status=P.AVAILABLE, since=NOW - 300, idle_since=NOW - 200)
    presence = aggregate(AGENT, rec, NOW)
    assert presence.status is P.AVAILABLE
    assert presence.since == NOW - 300
    assert presence.idle_since == NOW - 200


def test_since_kept_when_devices_change_but_status_does_not() -> None:
    rec = record(dev("a", state=S.BUSY), dev("b", K.MOBILE, S.AWAY), status=P.BUSY, since=NOW - 300)
    presence = aggregate(AGENT, rec, NOW)
    assert (presence.status, presence.since) == (P.BUSY, NOW - 300)


@pytest.mark.parametrize(
    ("previous", "devices", "call", "expected"),
    [
        (P.AVAILABLE, (dev(state=S.BUSY),), None, P.BUSY),
        (P.BUSY, (dev(),), None, P.AVAILABLE),
        (P.AVAILABLE, (), None, P.OFFLINE),
        (P.AVAILABLE, (dev(),), "c1", P.ON_CALL),
        (P.ON_CALL, (dev(state=S.DND),), None, P.DND),
        (P.OFFLINE, (dev(state=S.AWAY),), None, P.AWAY),
        (P.AVAILABLE, (lapsed(),), None, P.OFFLINE),
    ],
)
def test_since_reset_when_status_changes(
    previous: PresenceStatus,
    devices: tuple[Device, ...],
    call: str | None,
    expected: PresenceStatus,
) -> None:
    rec = record(*devices, call=call, status=previous, since=NOW - 300)
    presence = aggregate(AGENT, rec, NOW)
    assert presence.status is expected
    assert presence.since == NOW


def test_since_set_on_first_aggregation_even_if_status_unchanged() -> None:
    # A fresh record is offline with since 0; an agent with no devices stays offline.
    presence = aggregate(AGENT, record(), NOW)
    assert presence.status is P.OFFLINE
    assert presence.since == NOW
    assert presence.idle_since == 0.0


@pytest.mark.parametrize("previous", [P.BUSY, P.AWAY, P.DND, P.OFFLINE, P.ON_CALL])
def test_idle_since_set_when_becoming_available(previous: PresenceStatus) -> None:
    rec = record(dev(), status=previous, since=NOW - 300, idle_since=NOW - 1000)
    presence = aggregate(AGENT, rec, NOW)
    assert presence.status is P.AVAILABLE
    assert presence.idle_since == NOW


def test_idle_since_set_when_available_and_never_set() -> None:
    rec = record(dev(), status=P.AVAILABLE, since=NOW - 300, idle_since=0.0)
    assert aggregate(AGENT, rec, NOW).idle_since == NOW


@pytest.mark.parametrize(
    ("devices", "call"),
    [((dev(state=S.BUSY),), None), ((dev(),), "c1"), ((), None), ((dev(state=S.DND),), None)],
)
def test_idle_since_kept_when_not_available(devices: tuple[Device, ...], call: str | None) -> None:
    rec = record(*devices, call=call, status=P.AVAILABLE, since=NOW - 300, idle_since=NOW - 200)
    presence = aggregate(AGENT, rec, NOW)
    assert presence.status is not P.AVAILABLE
    assert presence.idle_since == NOW - 200


def test_lapsed_device_shown_as_offline() -> None:
    stale = lapsed("b-mobile", K.MOBILE, S.AVAILABLE, priority=3)
    live = dev("a-desk", K.DESKTOP, S.BUSY, priority=1)
    presence = aggregate(AGENT, record(stale, live), NOW)
    assert presence.status is P.BUSY
    assert presence.devices == (live, replace(stale, state=S.OFFLINE))
    # Only the state changes; when it was last seen and when it lapsed are kept.
    shown = presence.devices[1]
    assert (shown.last_seen, shown.expires_at, shown.priority, shown.kind) == (
        NOW - 120,
        NOW,
        3,
        K.MOBILE,
    )


def test_devices_sorted_by_id_and_offline_state_kept() -> None:
    devices = (dev("c", state=S.OFFLINE), dev("a", K.IM, S.AWAY), dev("b", K.MOBILE, S.DND))
    presence = aggregate(AGENT, record(*devices), NOW)
    assert [d.device_id for d in presence.devices] == ["a", "b", "c"]
    assert [d.state for d in presence.devices] == [S.AWAY, S.DND, S.OFFLINE]


def test_effective_device_and_is_live() -> None:
    live = dev(expires_at=NOW + 1)
    assert is_live(live, NOW) and effective_device(live, NOW) is live
    gone = dev(expires_at=NOW)
    assert not is_live(gone, NOW)
    assert effective_device(gone, NOW) == replace(gone, state=S.OFFLINE)
    said_offline = dev(state=S.OFFLINE)
    assert not is_live(said_offline, NOW)
    assert effective_device(said_offline, NOW) is said_offline


def test_devices_as_heard_stay_live_until_a_lapse_is_heard() -> None:
    """A live device whose expiry as heard has passed is still live (its lease was renewed
    without an event); one heard of as offline stays offline."""
    renewed = dev("desk", expires_at=NOW - 5)
    offline = dev("phone", state=S.OFFLINE, expires_at=NOW - 5)
    later = dev("im", expires_at=NOW + 5)
    heard = as_heard((renewed, offline, later), NOW, skip="im")
    assert [d.device_id for d in heard] == ["desk", "phone"]
    assert is_live(heard[0], NOW) and heard[1] is offline
    assert aggregate(AGENT, record(*heard), NOW).status is P.AVAILABLE


def test_remembered_and_status_changed() -> None:
    rec = record(dev(), status=P.BUSY, since=NOW - 300, idle_since=NOW - 1000, rev=3)
    presence = aggregate(AGENT, rec, NOW)
    assert status_changed(rec, presence)
    kept = remembered(rec, presence)
    assert (kept.status, kept.since, kept.idle_since) == (P.AVAILABLE, NOW, NOW)
    assert (kept.devices, kept.active_call, kept.rev) == (rec.devices, None, 3)
    # Aggregating the remembered record later changes nothing.
    later = aggregate(AGENT, kept, NOW + 10)
    assert not status_changed(kept, later)
    assert (later.since, later.idle_since) == (NOW, NOW)


# --- properties -----------------------------------------------------------------------------

TIMES = st.integers(min_value=0, max_value=2_000_000_000).map(float)
# Offsets of expires_at from now: many on or next to the boundary.
OFFSETS = st.one_of(st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0]), st.floats(-500, 500))


@st.composite
def devices_at(draw: st.DrawFn, now: float, max_size: int = 6) -> tuple[Device, ...]:
    ids = draw(
        st.lists(st.text("abcdefgh", min_size=1, max_size=3), unique=True, max_size=max_size)
    )
    out = []
    for device_id in ids:
        out.append(
            Device(
                device_id=device_id,
                kind=draw(st.sampled_from(DeviceKind)),
                state=draw(st.sampled_from(DeviceState)),
                priority=draw(st.integers(-127, 127)),
                last_seen=now - draw(st.floats(0, 1000)),
                expires_at=now + draw(OFFSETS),
            )
        )
    return tuple(out)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[PresenceRecord, float]:
    now = draw(TIMES)
    rec = PresenceRecord(
        devices=draw(devices_at(now)),
        active_call=draw(st.one_of(st.none(), st.just("call-1"))),
        status=draw(st.sampled_from(PresenceStatus)),
        since=draw(st.sampled_from([0.0, now - 50])),
        idle_since=draw(st.sampled_from([0.0, now - 100])),
        rev=draw(st.integers(0, 1000)),
    )
    return rec, now


def live(rec: PresenceRecord, now: float) -> list[Device]:
    return [d for d in rec.devices if d.state is not S.OFFLINE and d.expires_at > now]


def expected_status(rec: PresenceRecord, now: float) -> PresenceStatus:
    """The rule of the module docstring, written independently."""
    if rec.active_call is not None:
        return P.ON_CALL
    states = {d.state for d in live(rec, now)}
    for state, status in (
        (S.DND, P.DND),
        (S.AVAILABLE, P.AVAILABLE),
        (S.BUSY, P.BUSY),
        (S.AWAY, P.AWAY),
    ):
        if state in states:
            return status
    return P.OFFLINE


PROPERTY = settings(max_examples=400, deadline=None)


@PROPERTY
@given(scenarios())
def test_status_follows_the_rule(scenario: tuple[PresenceRecord, float]) -> None:
    rec, now = scenario
    presence = aggregate(AGENT, rec, now)
    assert presence.status is expected_status(rec, now)
    assert (presence.status is P.ON_CALL) == (rec.active_call is not None)


@PROPERTY
@given(scenarios())
def test_channels_only_when_available(scenario: tuple[PresenceRecord, float]) -> None:
    rec, now = scenario
    presence = aggregate(AGENT, rec, now)
    if presence.channels:
        assert presence.status is P.AVAILABLE
    if presence.status is P.ON_CALL:
        assert presence.channels == ()


@PROPERTY
@given(scenarios())
def test_channels_come_from_routable_devices(scenario: tuple[PresenceRecord, float]) -> None:
    rec, now = scenario
    presence = aggregate(AGENT, rec, now)
    routable = [d for d in live(rec, now) if d.state is S.AVAILABLE and d.priority >= 0]
    assert len(set(presence.channels)) == len(presence.channels)
    for channel in presence.channels:
        assert any(channel in CHANNELS_BY_KIND[d.kind] for d in routable), channel
    if presence.status is P.AVAILABLE:
        # Complete: every channel a routable device offers is listed ...
        offered = {c for d in routable for c in CHANNELS_BY_KIND[d.kind]}
        assert set(presence.channels) == offered

        # ... best first: by the highest priority of a device offering it.
        def best(channel: Channel) -> int:
            return max(d.priority for d in routable if channel in CHANNELS_BY_KIND[d.kind])

        ranks = [best(c) for c in presence.channels]
        assert ranks == sorted(ranks, reverse=True)


@PROPERTY
@given(scenarios(), st.data())
def test_adding_a_lapsed_device_changes_nothing(
    scenario: tuple[PresenceRecord, float], data: st.DataObject
) -> None:
    rec, now = scenario
    extra = Device(
        device_id="zz-lapsed",
        kind=data.draw(st.sampled_from(DeviceKind)),
        state=data.draw(st.sampled_from(DeviceState)),
        priority=data.draw(st.integers(-127, 127)),
        last_seen=now - 1000,
        expires_at=now - data.draw(st.floats(0, 1000)),
    )
    before = aggregate(AGENT, rec, now)
    after = aggregate(AGENT, replace(rec, devices=(*rec.devices, extra)), now)
    assert replace(after, devices=before.devices) == before
    assert after.devices == (*before.devices, replace(extra, state=S.OFFLINE))


@PROPERTY
@given(scenarios(), st.randoms(use_true_random=False))
def test_device_order_does_not_matter(
    scenario: tuple[PresenceRecord, float], rnd: random.Random
) -> None:
    rec, now = scenario
    shuffled = list(rec.devices)
    rnd.shuffle(shuffled)
    assert aggregate(AGENT, replace(rec, devices=tuple(shuffled)), now) == aggregate(
        AGENT, rec, now
    )


@PROPERTY
@given(scenarios())
def test_dnd_dominates(scenario: tuple[PresenceRecord, float]) -> None:
    rec, now = scenario
    presence = aggregate(AGENT, rec, now)
    any_dnd = any(d.state is S.DND for d in live(rec, now))
    if rec.active_call is None:
        assert (presence.status is P.DND) == any_dnd
    if any_dnd:
        assert presence.channels == ()


@PROPERTY
@given(scenarios(), st.sampled_from(DeviceKind), st.integers(-127, 127))
def test_a_live_dnd_device_forces_dnd(
    scenario: tuple[PresenceRecord, float], kind: DeviceKind, priority: int
) -> None:
    rec, now = scenario
    dnd = Device("zz-dnd", kind, S.DND, priority, now, now + 1)
    presence = aggregate(AGENT, replace(rec, devices=(*rec.devices, dnd)), now)
    expected = P.ON_CALL if rec.active_call is not None else P.DND
    assert (presence.status, presence.channels) == (expected, ())


@PROPERTY
@given(scenarios())
def test_since_and_idle_since_bookkeeping(scenario: tuple[PresenceRecord, float]) -> None:
    rec, now = scenario
    presence = aggregate(AGENT, rec, now)
    changed = presence.status is not rec.status
    assert presence.since == (now if changed or rec.since == 0.0 else rec.since)
    if presence.status is P.AVAILABLE and (changed or rec.idle_since == 0.0):
        assert presence.idle_since == now
    else:
        assert presence.idle_since == rec.idle_since
    # Every device is reported, sorted by id, a lapsed one as offline.
    assert [d.device_id for d in presence.devices] == sorted(d.device_id for d in rec.devices)
    for shown in presence.devices:
        raw = next(d for d in rec.devices if d.device_id == shown.device_id)
        lapsed_now = raw.expires_at <= now
        assert shown.state is (S.OFFLINE if lapsed_now else raw.state)
        assert replace(shown, state=raw.state) == raw
