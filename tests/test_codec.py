"""Wire codec (gateway/wire/codec.py), per-connection token bucket (gateway/ops/ratelimit.py)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.errors import DomainError
from gateway.core.model import (
    Channel,
    Device,
    DeviceKind,
    DeviceState,
    Presence,
    PresenceStatus,
)
from gateway.edge.errors import error_of, http_status
from gateway.ops.ratelimit import TokenBucket
from gateway.wire.codec import (
    MAX_PRIORITY,
    DeviceUpdate,
    device_update_from_wire,
    filters_from_query,
    iso,
    parse_iso,
    presence_to_wire,
)

# --- device_update_from_wire ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"device_id": "laptop-1", "kind": "desktop", "state": "available"},
            DeviceUpdate("laptop-1", DeviceKind.DESKTOP, DeviceState.AVAILABLE, 0),
        ),
        (
            {"device_id": "a", "kind": "mobile", "state": "busy", "priority": 5},
            DeviceUpdate("a", DeviceKind.MOBILE, DeviceState.BUSY, 5),
        ),
        (
            {"device_id": "im:slack.U123_x", "kind": "im", "state": "dnd", "priority": -3},
            DeviceUpdate("im:slack.U123_x", DeviceKind.IM, DeviceState.DND, -3),
        ),
        (
            {"device_id": "x" * 64, "kind": "desktop", "state": "offline", "priority": None},
            DeviceUpdate("x" * 64, DeviceKind.DESKTOP, DeviceState.OFFLINE, 0),
        ),
        (
            {"device_id": "p", "kind": "desktop", "state": "away", "priority": MAX_PRIORITY},
            DeviceUpdate("p", DeviceKind.DESKTOP, DeviceState.AWAY, 127),
        ),
        (
            {"device_id": "p", "kind": "desktop", "state": "away", "priority": -MAX_PRIORITY},
            DeviceUpdate("p", DeviceKind.DESKTOP, DeviceState.AWAY, -127),
        ),
        (  # JSON has one kind of number: 3.0 is the integer 3
            {"device_id": "f", "kind": "desktop", "state": "busy", "priority": 3.0},
            DeviceUpdate("f", DeviceKind.DESKTOP, DeviceState.BUSY, 3),
        ),
        (
            {"device_id": "d", "kind": "desktop", "state": "available", "extra": [1, 2]},
            DeviceUpdate("d", DeviceKind.DESKTOP, DeviceState.AVAILABLE, 0),
        ),
    ],
)
def test_good_device_updates(payload: dict[str, Any], expected: DeviceUpdate) -> None:
    update = device_update_from_wire(payload)
    assert update == expected
    assert type(update.kind) is DeviceKind and type(update.state) is DeviceState


def test_device_id_from_the_path_wins_over_the_body() -> None:
    update = device_update_from_wire({"kind": "mobile", "state": "away"}, device_id="phone")
    assert update == DeviceUpdate("phone", DeviceKind.MOBILE, DeviceState.AWAY, 0)
    update = device_update_from_wire(
        {"device_id": "other", "kind": "mobile", "state": "away"}, device_id="phone"
    )
    assert update.device_id == "phone"


GOOD: dict[str, Any] = {"device_id": "d1", "kind": "desktop", "state": "available"}


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


BAD_PAYLOADS: list[tuple[str, object, str]] = [
    ("list", [GOOD], "JSON object"),
    ("string", '{"device_id": "d1"}', "JSON object"),
    ("null", None, "JSON object"),
    ("number", 3, "JSON object"),
    ("missing kind", without("kind"), "kind"),
    ("unknown kind", {**GOOD, "kind": "pager"}, "kind"),
    ("kind wrong case", {**GOOD, "kind": "Desktop"}, "kind"),
    ("kind not a string", {**GOOD, "kind": 1}, "kind"),
    ("missing state", without("state"), "state"),
    ("unknown state", {**GOOD, "state": "sleeping"}, "state"),
    ("on_call is not a device state", {**GOOD, "state": "on_call"}, "state"),
    ("state null", {**GOOD, "state": None}, "state"),
    ("priority true", {**GOOD, "priority": True}, "priority"),
    ("priority false", {**GOOD, "priority": False}, "priority"),
    ("priority fraction", {**GOOD, "priority": 0.5}, "priority"),
    ("priority string", {**GOOD, "priority": "1"}, "priority"),
    ("priority too high", {**GOOD, "priority": MAX_PRIORITY + 1}, "priority"),
    ("priority too low", {**GOOD, "priority": -MAX_PRIORITY - 1}, "priority"),
    ("priority huge", {**GOOD, "priority": 2**64}, "priority"),
    ("missing device_id", without("device_id"), "device_id"),
    ("empty device_id", {**GOOD, "device_id": ""}, "device_id"),
    ("device_id not a string", {**GOOD, "device_id": 7}, "device_id"),
    ("device_id with space", {**GOOD, "device_id": "my laptop"}, "device_id"),
    ("device_id with slash", {**GOOD, "device_id": "a/b"}, "device_id"),
    ("device_id starts with dash", {**GOOD, "device_id": "-a"}, "device_id"),
    ("device_id too long", {**GOOD, "device_id": "x" * 65}, "device_id"),
    ("device_id non-ascii", {**GOOD, "device_id": "caf\u00e9"}, "device_id"),
]


@pytest.mark.parametrize(
    ("payload", "mentions"), [pytest.param(p, m, id=name) for name, p, m in BAD_PAYLOADS]
)
def test_bad_device_updates(payload: object, mentions: str) -> None:
    with pytest.raises(DomainError) as caught:
        device_update_from_wire(payload)
    assert (caught.value.code, http_status(caught.value)) == ("invalid_payload", 400)
    assert mentions in caught.value.message
    assert error_of(caught.value) == {"code": "invalid_payload", "message": caught.value.message}


@pytest.mark.parametrize("path_id", ["has space", "a/b", "x" * 65, "-x"])
def test_bad_device_id_in_the_path(path_id: str) -> None:
    with pytest.raises(DomainError) as caught:
        device_update_from_wire(GOOD, device_id=path_id)
    assert caught.value.code == "invalid_payload"
    assert "device_id" in caught.value.message


# `$` also matches before a trailing newline: ids are matched whole (\Z / fullmatch).


def test_device_id_with_trailing_newline_refused_in_body() -> None:
    with pytest.raises(DomainError) as caught:
        device_update_from_wire({**GOOD, "device_id": "abc\n"})
    assert caught.value.code == "invalid_payload"


def test_device_id_with_trailing_newline_refused_in_path() -> None:
    with pytest.raises(DomainError) as caught:
        device_update_from_wire(GOOD, device_id="abc\n")
    assert caught.value.code == "invalid_payload"


@settings(max_examples=300, deadline=None)
@given(st.integers())
def test_priority_accepted_exactly_in_range(priority: int) -> None:
    payload = {**GOOD, "priority": priority}
    if -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        assert device_update_from_wire(payload).priority == priority
    else:
        with pytest.raises(DomainError):
            device_update_from_wire(payload)


# --- presence_to_wire -----------------------------------------------------------------------

# From /work/shared/PROTOCOL.md, "Shapes".
PRESENCE_KEYS = {
    "agent_id",
    "site",
    "name",
    "branch",
    "status",
    "channels",
    "devices",
    "since",
}
DEVICE_KEYS = {"device_id", "kind", "state", "priority", "last_seen"}
ISO_WITH_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$")

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def sample_presence(**changes: Any) -> Presence:
    base: dict[str, Any] = {
        "agent_id": "anna",
        "site": "acme",
        "name": "Anna",
        "branch": "dublin",
        "status": PresenceStatus.AVAILABLE,
        "channels": (Channel.PSTN, Channel.WEBRTC),
        "devices": (
            Device("desk", DeviceKind.DESKTOP, DeviceState.AVAILABLE, 2, T0 + 1.25, T0 + 15),
            Device("phone", DeviceKind.MOBILE, DeviceState.AVAILABLE, 5, T0, T0 + 60),
        ),
        "since": T0 + 0.5,
        "idle_since": T0 - 100,
        "active_call": None,
        "rev": 9,
    }
    base.update(changes)
    return Presence(**base)


def test_presence_to_wire_shape() -> None:
    wire = presence_to_wire(sample_presence())
    assert set(wire) == PRESENCE_KEYS
    assert wire == {
        "agent_id": "anna",
        "site": "acme",
        "name": "Anna",
        "branch": "dublin",
        "status": "available",
        "channels": ["pstn", "webrtc"],
        "devices": [
            {
                "device_id": "desk",
                "kind": "desktop",
                "state": "available",
                "priority": 2,
                "last_seen": "2026-01-01T00:00:01.250+00:00",
                "expires_at": "2026-01-01T00:00:15.000+00:00",
            },
            {
                "device_id": "phone",
                "kind": "mobile",
                "state": "available",
                "priority": 5,
                "last_seen": "2026-01-01T00:00:00.000+00:00",
                "expires_at": "2026-01-01T00:01:00.000+00:00",
            },
        ],
        "since": "2026-01-01T00:00:00.500+00:00",
    }


def test_presence_to_wire_values_are_plain_json() -> None:
    wire = presence_to_wire(sample_presence(status=PresenceStatus.ON_CALL, channels=()))
    assert type(wire["status"]) is str and wire["status"] == "on_call"
    assert wire["channels"] == []
    for device in wire["devices"]:
        # PROTOCOL.md's Device keys are all there (it allows added fields: expires_at).
        assert DEVICE_KEYS <= set(device)
        assert type(device["kind"]) is str and type(device["state"]) is str
        assert type(device["priority"]) is int
        for key in ("last_seen", "expires_at"):
            assert ISO_WITH_OFFSET.match(device[key]), device[key]
    assert ISO_WITH_OFFSET.match(wire["since"])


def test_presence_to_wire_without_branch_or_devices() -> None:
    wire = presence_to_wire(
        sample_presence(branch=None, devices=(), channels=(), status=PresenceStatus.OFFLINE)
    )
    assert set(wire) == PRESENCE_KEYS
    assert (wire["branch"], wire["devices"], wire["status"]) == (None, [], "offline")


@pytest.mark.parametrize("status", list(PresenceStatus))
def test_every_status_is_on_the_wire_as_its_value(status: PresenceStatus) -> None:
    assert presence_to_wire(sample_presence(status=status))["status"] == status.value


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=4_102_444_800))
def test_iso_round_trips_with_utc_offset(ts: float) -> None:
    text = iso(ts)
    assert text is not None and ISO_WITH_OFFSET.match(text)
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    # Milliseconds are kept (truncated, not rounded up past the instant).
    assert ts - 0.001 <= parse_iso(text, "at") <= ts + 1e-6


def test_iso_none() -> None:
    assert iso(None) is None


def test_parse_iso() -> None:
    assert parse_iso("2026-01-01T01:00:00+01:00", "at") == T0
    assert parse_iso("2026-01-01T00:00:00Z", "at") == T0
    for bad in ("2026-01-01T00:00:00", "tomorrow", ""):
        with pytest.raises(DomainError) as caught:
            parse_iso(bad, "at")
        assert caught.value.code == "invalid_payload" and "at" in caught.value.message


# --- TokenBucket ----------------------------------------------------------------------------


def drain(bucket: TokenBucket, now: float, limit: int = 10_000) -> int:
    """How many unit events the bucket allows at ``now``."""
    taken = 0
    while taken < limit and bucket.take(now):
        taken += 1
    return taken


def test_bucket_allows_a_full_burst_then_refuses() -> None:
    bucket = TokenBucket(rate=2.0, burst=5.0)
    assert drain(bucket, 100.0) == 5
    assert not bucket.take(100.0)


def test_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=5.0)
    assert drain(bucket, 100.0) == 5
    assert not bucket.take(100.4)  # 0.8 of a token
    assert bucket.take(100.5)  # 1.0 token (0.5 s at 2/s since the last call)
    assert not bucket.take(100.5)
    assert drain(bucket, 101.5) == 2  # one more second: two tokens


def test_bucket_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0)
    assert drain(bucket, 0.0) == 3
    assert drain(bucket, 1_000_000.0) == 3


def test_bucket_refused_take_costs_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    assert bucket.take(0.0)
    for _ in range(5):
        assert not bucket.take(0.0)
    assert bucket.take(1.0)


def test_bucket_cost() -> None:
    bucket = TokenBucket(rate=1.0, burst=10.0)
    assert bucket.take(0.0, cost=7)
    assert not bucket.take(0.0, cost=4)
    assert bucket.take(0.0, cost=3)
    assert not bucket.take(0.0, cost=0.5)
    assert bucket.take(2.0, cost=2)


def test_bucket_larger_than_burst_never_passes() -> None:
    bucket = TokenBucket(rate=100.0, burst=2.0)
    assert not bucket.take(0.0, cost=3)
    assert not bucket.take(1000.0, cost=3)
    assert drain(bucket, 1000.0) == 2


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0.1, 100),
    st.integers(1, 50),
    st.lists(st.floats(0, 5), min_size=1, max_size=60),
)
def test_bucket_never_exceeds_rate_times_time_plus_burst(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, burst=float(burst))
    now = 1000.0
    allowed = 0
    for gap in gaps:
        now += gap
        allowed += drain(bucket, now)
    assert allowed <= burst + rate * (now - 1000.0) + 1e-6
    # Having drained, nothing more is allowed at the same instant.
    assert not bucket.take(now)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, (None, None)),
        ({"language": "de-AT", "branch": "berlin"}, ("de-AT", "berlin")),
        ({"language": ""}, None),
        ({"branch": ""}, None),
        ({"language": "en", "branch": ""}, None),
        ({"language": "English"}, None),
        ({"branch": "no spaces"}, None),
    ],
)
def test_query_filters_refuse_empty_values(
    query: dict[str, str], expected: tuple[str | None, str | None] | None
) -> None:
    if expected is None:
        with pytest.raises(DomainError) as refused:
            filters_from_query(query)
        assert refused.value.code == "invalid_payload"
    else:
        assert filters_from_query(query) == expected
