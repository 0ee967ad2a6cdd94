"""One behavioural suite for every Store: the embedded one and Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, eventually

from gateway.core.errors import StoreUnavailable
from gateway.core.model import Device, DeviceKind, DeviceState, PresenceStatus
from gateway.ops.clock import ManualClock
from gateway.services.timers import TimerLoop
from gateway.store.base import (
    HANDLE_TIMES_KEPT,
    CallRow,
    DeviceRef,
    Expectation,
    Json,
    Quota,
    Store,
)
from gateway.store.embedded import EmbeddedStore
from gateway.store.redis import RedisStore

StoreFactory = Callable[[str], Awaitable[Store]]


class Recorder:
    def __init__(self) -> None:
        self.events: asyncio.Queue[Json] = asyncio.Queue()
        self.resyncs = asyncio.Event()

    async def on_event(self, event: Json) -> None:
        self.events.put_nowait(event)

    async def on_resync(self) -> None:
        self.resyncs.set()


class FakeClock:
    """The wall clock of expiries that take no ``now`` (claims, counters)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def let_time_pass(store: Store, clock: FakeClock, redis_key: str, seconds: float) -> None:
    """Let ``seconds`` pass for an expiry: the embedded store's clock moves on; in Redis the
    key's time to live shrinks by as much (the key expires when none is left)."""
    clock.now += seconds
    if isinstance(store, RedisStore):
        left = await store.redis.pttl(redis_key) - int(seconds * 1000)
        if left > 0:
            await store.redis.pexpire(redis_key, left)
        else:
            await store.redis.delete(redis_key)


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def open_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[Store]]]:
    """Opens stores of the backend under test; several calls are several nodes (or restarts)."""
    opened: list[Store] = []
    url = request.getfixturevalue("redis_url") if backend == "redis" else ""

    async def factory(
        node_id: str = "n1", recorder: Recorder | None = None, clock: FakeClock | None = None
    ) -> Store:
        store: Store
        if backend == "redis":
            store = RedisStore(url, node_id)
        else:
            store = EmbeddedStore(tmp_path / "data", node_id, clock=clock or time.time)
        rec = recorder or Recorder()
        await store.start(rec.on_event, rec.on_resync)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


def device(
    device_id: str, now: float, ttl: float = 60, state: DeviceState = DeviceState.AVAILABLE
) -> Device:
    return Device(device_id, DeviceKind.MOBILE, state, 0, now, now + ttl)


async def test_devices_are_written_read_and_removed(open_store: Any) -> None:
    store: Store = await open_store()
    now = time.time()
    record = await store.put_device("acme", "anna", device("phone", now))
    assert [d.device_id for d in record.devices] == ["phone"]
    record = await store.put_device("acme", "anna", device("im", now, state=DeviceState.AWAY))
    assert [(d.device_id, d.state) for d in record.devices] == [
        ("im", DeviceState.AWAY),
        ("phone", DeviceState.AVAILABLE),
    ]
    assert (await store.get_presence("acme", "anna")).devices == record.devices
    after = await store.remove_device("acme", "anna", "phone")
    assert [d.device_id for d in after.devices] == ["im"]
    assert after.rev > record.rev, "every change bumps the revision"
    assert (await store.get_presence("acme", "nobody")).devices == ()


async def test_status_and_active_call_are_kept(open_store: Any) -> None:
    store: Store = await open_store()
    await store.put_device("acme", "anna", device("phone", time.time()))
    await store.save_status("acme", "anna", PresenceStatus.AVAILABLE, 100.0, 90.0)
    record = await store.set_active_call("acme", "anna", "call-1")
    assert record.active_call == "call-1"
    assert (record.status, record.since, record.idle_since) == (
        PresenceStatus.AVAILABLE,
        100.0,
        90.0,
    )
    cleared = await store.set_active_call("acme", "anna", None)
    assert cleared.active_call is None and cleared.rev > record.rev
    sites = await store.get_site_presence("acme", ["anna", "ben"])
    assert sites["anna"].status is PresenceStatus.AVAILABLE and sites["ben"].devices == ()


async def test_lapsed_devices_are_claimed_once_and_removed(open_store: Any) -> None:
    store: Store = await open_store()
    now = time.time()
    await store.put_device("acme", "anna", device("phone", now, ttl=1))
    await store.put_device("acme", "anna", device("im", now, ttl=100))
    await store.put_device("acme", "ben", device("phone", now, ttl=2))
    assert await store.claim_lapsed(now) == []
    assert await store.claim_lapsed(now + 1.5) == [("acme", "anna")]
    assert await store.claim_lapsed(now + 1.5) == [], "a lapse is reported once"
    assert [d.device_id for d in (await store.get_presence("acme", "anna")).devices] == ["im"]
    assert await store.claim_lapsed(now + 3) == [("acme", "ben")]


async def test_touch_renews_a_lease_but_never_revives_a_removed_device(open_store: Any) -> None:
    store: Store = await open_store()
    now = time.time()
    await store.put_device("acme", "anna", device("desk", now, ttl=1))
    await store.put_device("acme", "ben", device("desk", now, ttl=1))
    await store.remove_device("acme", "ben", "desk")
    refs = [DeviceRef("acme", "anna", "desk"), DeviceRef("acme", "ben", "desk")]
    assert await store.touch_devices(refs, now + 0.5, now + 10) == [refs[1]], "told it was gone"
    assert await store.claim_lapsed(now + 5) == []
    anna = (await store.get_presence("acme", "anna")).devices[0]
    assert anna.expires_at == pytest.approx(now + 10) and anna.last_seen == pytest.approx(now + 0.5)
    assert (await store.get_presence("acme", "ben")).devices == ()


async def test_put_device_if_saves_and_publishes_only_when_the_prediction_holds(
    open_store: Any, backend: str
) -> None:
    here, there = Recorder(), Recorder()
    store: Store = await open_store("n1", here)
    other: Store | None = await open_store("n2", there) if backend == "redis" else None
    now = time.time()
    before = await store.put_device("acme", "anna", device("im", now, state=DeviceState.AWAY))
    status = (PresenceStatus.AVAILABLE, now, now)
    event: Json = {"type": "presence", "site": "acme", "agent": "anna"}
    right = Expectation(before.rev + 1, ("im", "phone"), now, status, event)
    done, record = await store.put_device_if("acme", "anna", device("phone", now), right)
    assert done and record.rev == before.rev + 1
    assert (record.status, record.since) == (PresenceStatus.AVAILABLE, now)
    assert [d.device_id for d in record.devices] == ["im", "phone"]
    if other is not None:
        published = await asyncio.wait_for(there.events.get(), 5)
        assert published["rev"] == record.rev and len(published["devices"]) == 2
        assert {k: published[k] for k in event} == event
    assert here.events.empty(), "never echoed to the writer"

    stale = Expectation(record.rev, ("im", "phone"), now, (PresenceStatus.DND, now, now), event)
    done, after = await store.put_device_if("acme", "anna", device("phone", now), stale)
    assert not done and after.rev == record.rev + 1, "the device is written all the same"
    assert after.status is PresenceStatus.AVAILABLE, "but nothing predicted is saved"
    wrong_live = Expectation(after.rev + 1, ("phone",), now, (PresenceStatus.DND, now, now), event)
    done, last = await store.put_device_if("acme", "anna", device("phone", now), wrong_live)
    assert not done and last.status is PresenceStatus.AVAILABLE
    if other is not None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(there.events.get(), 0.2)  # nothing published for those


async def test_set_active_call_if_saves_and_publishes_only_when_the_prediction_holds(
    open_store: Any, backend: str
) -> None:
    here, there = Recorder(), Recorder()
    store: Store = await open_store("n1", here)
    other: Store | None = await open_store("n2", there) if backend == "redis" else None
    now = time.time()
    before = await store.put_device("acme", "anna", device("phone", now))
    on_call = (PresenceStatus.ON_CALL, now, now)
    event: Json = {"type": "presence", "site": "acme", "agent": "anna", "status": "on_call"}
    right = Expectation(before.rev + 1, ("phone",), now, on_call, event)
    done, record = await store.set_active_call_if("acme", "anna", "c1", right)
    assert done and record.rev == before.rev + 1 and record.active_call == "c1"
    assert (record.status, record.since) == (PresenceStatus.ON_CALL, now)
    if other is not None:
        published = await asyncio.wait_for(there.events.get(), 5)
        assert published["rev"] == record.rev and [d[0] for d in published["devices"]] == ["phone"]
        assert {k: published[k] for k in event} == event
    assert here.events.empty(), "never echoed to the writer"

    free = (PresenceStatus.AVAILABLE, now, now)
    stale = Expectation(record.rev, ("phone",), now, free, event)
    done, after = await store.set_active_call_if("acme", "anna", None, stale)
    assert not done and after.active_call is None, "the call is cleared all the same"
    assert after.rev == record.rev + 1 and after.status is PresenceStatus.ON_CALL, "not saved"
    wrong_live = Expectation(after.rev + 1, (), now, free, event)
    done, last = await store.set_active_call_if("acme", "anna", "c2", wrong_live)
    assert not done and last.active_call == "c2" and last.status is PresenceStatus.ON_CALL
    if other is not None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(there.events.get(), 0.2)  # nothing published for those


async def test_calls_are_versioned(open_store: Any) -> None:
    store: Store = await open_store()
    first = CallRow("c1", "acme", 1, {"state": "queued"})
    assert await store.put_call(first)
    assert not await store.put_call(first), "a second insert of the same call loses"
    assert await store.put_call(CallRow("c1", "acme", 2, {"state": "ringing"}))
    assert not await store.put_call(CallRow("c1", "acme", 2, {"state": "canceled"})), "stale"
    found = await store.get_call("c1")
    assert found == CallRow("c1", "acme", 2, {"state": "ringing"})
    assert await store.get_call("missing") is None
    assert [r.call_id for r in await store.list_calls("acme")] == ["c1"]


async def test_reserve_first_reserves_the_first_free_agent_in_order(open_store: Any) -> None:
    a: Store = await open_store("n1")
    # Two nodes share reservations through Redis; the embedded store is one node.
    b: Store = await open_store("n2") if isinstance(a, RedisStore) else a
    assert await a.reserve_agent("acme", "anna", "c_other", 30)
    assert await b.reserve_first("acme", ["anna", "ben", "cleo"], "c1", 30) == "ben"
    assert await a.reserve_first("acme", ["anna", "ben"], "c2", 30) is None, "both held"
    assert await b.reserve_first("acme", [], "c2", 30) is None
    assert await a.reserve_first("acme", ["cleo", "dora"], "c2", 30) == "cleo"
    assert not await b.reserve_agent("acme", "cleo", "c3", 30), "cleo is held by c2 now"
    assert await b.reserve_agent("acme", "dora", "c3", 30), "dora was never touched"
    await a.release_agent("acme", "ben", "c1")
    assert await a.reserve_first("acme", ["anna", "ben"], "c4", 30) == "ben", "released"
    assert await b.extend_reservation("acme", "ben", "c4", 60), "a normal reservation"

    results = await asyncio.gather(
        *(s.reserve_first("acme", ["eve", "fay"], f"r{i}", 30) for i, s in enumerate([a, b] * 4))
    )
    assert sorted(r for r in results if r is not None) == ["eve", "fay"], "each one call only"


async def test_a_restart_loses_no_call_or_visitor_history(open_store: Any) -> None:
    store: Store = await open_store()
    for i in range(20):
        assert await store.put_call(CallRow(f"c{i}", "acme", 1, {"phone": "+15005550006", "i": i}))
    await store.record_served("acme", "visitor-1", "anna")
    await store.close()

    reopened: Store = await open_store()
    for i in range(20):
        row = await reopened.get_call(f"c{i}")
        assert row is not None and row.data["i"] == i
    assert await reopened.last_agent("acme", "visitor-1") == "anna"
    assert await reopened.last_agent("acme", "visitor-2") is None
    assert len(await reopened.list_calls("acme", limit=50)) == 20


async def test_events_reach_every_other_node_but_not_the_sender(
    open_store: Any, backend: str
) -> None:
    here, there = Recorder(), Recorder()
    a: Store = await open_store("node-a", here)
    b: Store | None = await open_store("node-b", there) if backend == "redis" else None
    await a.publish({"type": "test", "n": 1})
    assert here.events.empty(), "the sender handles its own change; it is not echoed back"
    if b is not None:
        assert await asyncio.wait_for(there.events.get(), 5) == {"type": "test", "n": 1}
        await b.publish({"type": "test", "n": 2})
        assert await asyncio.wait_for(here.events.get(), 5) == {"type": "test", "n": 2}
        assert here.events.empty() and there.events.empty(), "no echo to the sender"


async def test_health(open_store: Any) -> None:
    store: Store = await open_store()
    health = await store.health()
    assert health.reachable and health.listening and health.persistent


# --- durable coordination: quotas, slots, counters, claims, the queue ------------------------


async def test_quotas_count_events_in_a_sliding_window(open_store: Any) -> None:
    store: Store = await open_store()
    per_minute = Quota("dial:+15005550006", window_s=60, limit=2)
    assert await store.take_quotas([per_minute], "e1", 1000.0) is None
    assert await store.take_quotas([per_minute], "e2", 1030.0) is None
    assert await store.take_quotas([per_minute], "e3", 1059.0) == 0, "full"
    assert await store.take_quotas([per_minute], "e3", 1060.0) == 0, "e1 is exactly 60 s old"
    assert await store.take_quotas([per_minute], "e3", 1060.5) is None, "e1 slid out"
    assert await store.take_quotas([per_minute], "e4", 1089.0) == 0, "e2 and e3 still count"
    assert await store.take_quotas([per_minute], "e4", 1090.5) is None, "a sliding window"
    assert await store.take_quotas([per_minute], "e4", 1090.6) is None, "a retry is not recounted"
    assert await store.take_quotas([], "e5", 1091.0) is None, "no quota, no limit"


async def test_quotas_are_taken_all_or_nothing(open_store: Any) -> None:
    store: Store = await open_store()
    site = Quota("site:acme", window_s=3600, limit=10)
    number = Quota("number:+15005550006", window_s=3600, limit=1)
    assert await store.take_quotas([site, number], "e1", 1000.0) is None
    assert await store.take_quotas([site, number], "e2", 1001.0) == 1, "the number is full"
    other = Quota("number:+15005550007", window_s=3600, limit=1)
    full = Quota("site:full", window_s=3600, limit=0)
    assert await store.take_quotas([site, other, full], "e3", 1002.0) == 2
    # Nothing of e2 or e3 was recorded: the site has 9 more, the other number has room.
    for i in range(9):
        assert await store.take_quotas([site], f"s{i}", 1003.0) is None
    assert await store.take_quotas([site], "s9", 1004.0) == 0
    assert await store.take_quotas([other], "e4", 1005.0) is None
    assert await store.take_quotas([other, site], "e5", 1006.0) == 0, "the first full one"


async def test_distinct_quotas_count_members(open_store: Any) -> None:
    store: Store = await open_store()

    def numbers(member: str) -> Quota:
        return Quota("numbers:visitor-1", window_s=100, limit=2, member=member)

    assert await store.take_quotas([numbers("+1500")], "e1", 1000.0) is None
    assert await store.take_quotas([numbers("+1500")], "e2", 1010.0) is None, "same member"
    assert await store.take_quotas([numbers("+1501")], "e3", 1020.0) is None
    assert await store.take_quotas([numbers("+1502")], "e4", 1030.0) == 0, "a third number"
    assert await store.take_quotas([numbers("+1500")], "e5", 1105.0) is None, "present, refreshed"
    # At 1121 +1501 (1020) has slid out but +1500 was refreshed at 1105: room for one more.
    assert await store.take_quotas([numbers("+1502")], "e6", 1121.0) is None
    assert await store.take_quotas([numbers("+1503")], "e7", 1122.0) == 0
    # A full distinct quota blocks the counting quota beside it from recording anything.
    calls = Quota("calls:visitor-1", window_s=100, limit=1)
    assert await store.take_quotas([calls, numbers("+1504")], "e8", 1123.0) == 1
    assert await store.take_quotas([calls, numbers("+1502")], "e9", 1124.0) is None


async def test_slots_limit_concurrent_holders_with_leases(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.acquire_slot("pstn:acme", "c1", 2, 30.0, 1000.0)
    assert await store.acquire_slot("pstn:acme", "c2", 2, 30.0, 1001.0)
    assert not await store.acquire_slot("pstn:acme", "c3", 2, 30.0, 1002.0), "both slots held"
    assert await store.acquire_slot("pstn:acme", "c1", 2, 30.0, 1020.0), "a holder renews"
    assert await store.acquire_slot("pstn:other", "c3", 2, 30.0, 1020.0), "keys are separate"
    # At 1031 c2's lease (to 1031) has ended while c1's renewal runs to 1050.
    assert await store.acquire_slot("pstn:acme", "c3", 2, 30.0, 1031.0)
    assert not await store.acquire_slot("pstn:acme", "c4", 2, 30.0, 1040.0)
    await store.release_slot("pstn:acme", "c1")
    await store.release_slot("pstn:acme", "nobody")
    assert await store.acquire_slot("pstn:acme", "c4", 2, 30.0, 1041.0), "released"
    assert not await store.acquire_slot("pstn:acme", "c5", 0, 30.0, 1041.0), "limit 0"


async def test_counters_add_read_and_expire(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.add_to_counter("spend:acme:2025-01-01", 0, 86400) == 0, "read"
    assert await store.add_to_counter("spend:acme:2025-01-01", 250_000, 86400) == 250_000
    assert await store.add_to_counter("spend:acme:2025-01-01", 100_000, 86400) == 350_000
    assert await store.add_to_counter("spend:acme:2025-01-01", -50_000, 86400) == 300_000
    assert await store.add_to_counter("spend:acme:2025-01-01", 0, 86400) == 300_000
    assert await store.add_to_counter("spend:acme:2025-01-02", 0, 86400) == 0


async def test_a_counter_expires_ttl_after_it_was_created(open_store: Any) -> None:
    clock = FakeClock()
    store: Store = await open_store(clock=clock)
    assert await store.add_to_counter("spend:acme:day", 5, 10) == 5
    await let_time_pass(store, clock, "m:count:spend:acme:day", 6)
    assert await store.add_to_counter("spend:acme:day", 5, 10) == 10, "a write keeps the expiry"
    await let_time_pass(store, clock, "m:count:spend:acme:day", 5)
    assert await store.add_to_counter("spend:acme:day", 0, 10) == 0, "expired 10 s after creation"
    assert await store.add_to_counter("spend:acme:day", 3, 10) == 3


async def test_claim_once_wins_once(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.claim_once("dial:c1:1", 60.0)
    assert not await store.claim_once("dial:c1:1", 60.0)
    assert await store.claim_once("dial:c1:2", 60.0), "another attempt is another key"


async def test_a_claim_is_free_again_after_its_ttl(open_store: Any) -> None:
    clock = FakeClock()
    store: Store = await open_store(clock=clock)
    assert await store.claim_once("dial:c1:1", 10.0)
    await let_time_pass(store, clock, "m:once:dial:c1:1", 9)
    assert not await store.claim_once("dial:c1:1", 10.0)
    await let_time_pass(store, clock, "m:once:dial:c1:1", 2)
    assert await store.claim_once("dial:c1:1", 10.0)


async def test_concurrent_callers_win_exactly_as_often_as_allowed(open_store: Any) -> None:
    store: Store = await open_store()
    claims = await asyncio.gather(*(store.claim_once("dial:c9:1", 60.0) for _ in range(20)))
    assert claims.count(True) == 1
    slots = await asyncio.gather(
        *(store.acquire_slot("pstn:acme", f"c{i}", 3, 30.0, 1000.0) for i in range(20))
    )
    assert slots.count(True) == 3
    quota = Quota("site:acme", window_s=60, limit=5)
    taken = await asyncio.gather(
        *(store.take_quotas([quota], f"e{i}", 1000.0 + i / 100) for i in range(20))
    )
    assert taken.count(None) == 5 and taken.count(0) == 15
    totals = await asyncio.gather(*(store.add_to_counter("spend:x", 7, 60) for _ in range(20)))
    assert sorted(totals) == [7 * n for n in range(1, 21)], "no lost update"


async def test_the_queue_ranks_calls_by_score_then_call_id(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.queue_size("acme") == 0
    assert await store.queue_rank("acme", "c1") is None
    await store.queue_put("acme", "c3", 1000.0)
    await store.queue_put("acme", "c1", 1002.0)
    await store.queue_put("acme", "c2", 1000.0)
    await store.queue_put("other", "c0", 1.0)
    ranks = [await store.queue_rank("acme", c) for c in ("c1", "c2", "c3")]
    assert ranks == [2, 0, 1], "equal scores go in call id order"
    assert await store.queue_size("acme") == 3 and await store.queue_size("other") == 1
    await store.queue_put("acme", "c1", 999.0)
    assert await store.queue_rank("acme", "c1") == 0, "moved up"
    assert await store.queue_size("acme") == 3, "moved, not added"
    await store.queue_remove("acme", "c2")
    await store.queue_remove("acme", "missing")
    assert await store.queue_rank("acme", "c2") is None
    assert [await store.queue_rank("acme", c) for c in ("c1", "c3")] == [0, 1]
    assert await store.queue_size("acme") == 2


async def test_the_queue_counts_the_places_before_a_time(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.queue_count_before("acme", 1000.0) == 0
    for call_id, score in (("c1", 999.0), ("c2", 1000.0), ("c3", 1001.0)):
        await store.queue_put("acme", call_id, score)
    await store.queue_put("other", "c0", 1.0)
    assert await store.queue_count_before("acme", 1000.0) == 1, "strictly before"
    assert await store.queue_count_before("acme", 1000.5) == 2
    assert await store.queue_count_before("acme", 1e12) == 3


async def test_a_text_opt_out_is_per_site_and_number_and_survives_a_restart(
    open_store: Any,
) -> None:
    store: Store = await open_store()
    assert not await store.text_opted_out("acme", "+353861110001")
    await store.set_text_opt_out("acme", "+353861110001", True)
    await store.set_text_opt_out("acme", "+353861110001", True)  # twice: no harm
    await store.set_text_opt_out("acme", "+353861110002", True)
    await store.set_text_opt_out("acme", "+353861110002", False)
    await store.close()
    reopened: Store = await open_store()
    assert await reopened.text_opted_out("acme", "+353861110001")
    assert not await reopened.text_opted_out("globex", "+353861110001")
    assert not await reopened.text_opted_out("acme", "+353861110002")


async def test_survey_questions_and_tallies_survive_a_restart(open_store: Any) -> None:
    store: Store = await open_store()
    number = "+353861110001"
    assert await store.survey_asked("acme", number, 1000.0) is None
    await store.set_survey_asked("acme", number, "c1", 1000.0, 60.0)
    await store.add_to_tally("acme", ["agent:anna", "branch:dublin"], "promoter")
    await store.add_to_tally("acme", ["agent:anna"], "detractor")
    await store.add_to_tally("globex", ["agent:anna"], "passive")
    await store.close()
    reopened: Store = await open_store()
    assert await reopened.survey_asked("acme", number, 1010.0) == "c1"
    assert await reopened.survey_asked("acme", number, 1061.0) is None, "its time is over"
    assert await reopened.survey_asked("globex", number, 1010.0) is None
    await reopened.clear_survey_asked("acme", number, "c0")  # another call's: kept
    assert await reopened.survey_asked("acme", number, 1010.0) == "c1"
    await reopened.clear_survey_asked("acme", number, "c1")
    assert await reopened.survey_asked("acme", number, 1010.0) is None
    assert await reopened.tallies("acme") == {
        "agent:anna": {"promoter": 1, "detractor": 1},
        "branch:dublin": {"promoter": 1},
    }


async def test_handle_times_keep_the_newest(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.handle_times("acme") == []
    for i in range(HANDLE_TIMES_KEPT + 10):
        await store.record_handle_time("acme", 10.0 + i / 4)
    await store.record_handle_time("other", 1.5)
    kept = await store.handle_times("acme")
    assert kept == [10.0 + i / 4 for i in reversed(range(10, HANDLE_TIMES_KEPT + 10))]
    assert await store.handle_times("other") == [1.5]


async def test_a_restart_keeps_quotas_slots_counters_claims_queue_and_handle_times(
    open_store: Any,
) -> None:
    store: Store = await open_store()
    quota = Quota("number:+15005550006", window_s=3600, limit=1)
    distinct = Quota("numbers:visitor-1", window_s=3600, limit=1, member="+1500")
    assert await store.take_quotas([quota, distinct], "e1", 1000.0) is None
    assert await store.acquire_slot("pstn:acme", "c1", 1, 60.0, 1000.0)
    assert await store.add_to_counter("spend:acme:day", 42, 86400) == 42
    assert await store.claim_once("dial:c1:1", 60.0)
    await store.queue_put("acme", "c2", 1001.0)
    await store.queue_put("acme", "c1", 1000.0)
    await store.record_handle_time("acme", 12.5)
    await store.record_handle_time("acme", 30.0)
    await store.close()

    reopened: Store = await open_store()
    assert await reopened.take_quotas([quota], "e2", 1001.0) == 0, "the limit survived"
    other = Quota("numbers:visitor-1", window_s=3600, limit=1, member="+1501")
    assert await reopened.take_quotas([other], "e2", 1001.0) == 0
    assert await reopened.take_quotas([distinct], "e2", 1001.0) is None, "the member is kept"
    assert not await reopened.acquire_slot("pstn:acme", "c2", 1, 60.0, 1001.0)
    assert await reopened.acquire_slot("pstn:acme", "c1", 1, 60.0, 1001.0), "still its holder"
    assert await reopened.add_to_counter("spend:acme:day", 0, 86400) == 42
    assert not await reopened.claim_once("dial:c1:1", 60.0), "no second dial"
    assert await reopened.queue_rank("acme", "c1") == 0
    assert await reopened.queue_rank("acme", "c2") == 1
    assert await reopened.queue_size("acme") == 2
    assert await reopened.handle_times("acme") == [30.0, 12.5]


async def test_an_accepts_write_needs_the_calls_reservation_and_keeps_it(open_store: Any) -> None:
    clock = FakeClock()
    store: Store = await open_store(clock=clock)
    assert await store.put_call(CallRow("c1", "acme", 1, {"state": "ringing"}))
    assert await store.reserve_agent("acme", "anna", "c2", 30)
    accepted = CallRow("c1", "acme", 2, {"state": "connected"})
    assert await store.put_call_holding(accepted, "anna", 3600) is None, "c2 holds anna"
    row = await store.get_call("c1")
    assert row is not None and row.version == 1, "nothing written"

    await store.release_agent("acme", "anna", "c2")
    assert await store.reserve_agent("acme", "anna", "c1", 30)
    assert await store.put_call_holding(accepted, "anna", 3600) is True
    row = await store.get_call("c1")
    assert row is not None and row.data == {"state": "connected"}
    assert await store.put_call_holding(accepted, "anna", 3600) is False, "stale version"
    assert await store.reserve_agent("acme", "ben", "c9", 30)
    assert await store.put_call_holding(accepted, "ben", 3600) is False, "the version first"

    # Kept for the call's hold, not the ring's 30 s.
    await let_time_pass(store, clock, "m:resv:acme:anna", 60)
    assert not await store.reserve_agent("acme", "anna", "c3", 30), "still c1's"


async def test_reservations_extend_and_release_only_for_their_holder(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.reserve_agent("acme", "anna", "c1", 30)
    assert not await store.extend_reservation("acme", "anna", "c2", 30), "not c2's"
    await store.release_agent("acme", "anna", "c2")
    assert not await store.reserve_agent("acme", "anna", "c2", 30), "c1 still holds anna"
    assert await store.extend_reservation("acme", "anna", "c1", 30)
    await store.release_agent("acme", "anna", "c1")
    assert not await store.extend_reservation("acme", "anna", "c1", 30), "released"
    assert await store.reserve_agent("acme", "anna", "c2", 30)


async def test_open_calls_are_remembered_per_visitor(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.open_call("acme", "visitor-1") is None
    await store.set_open_call("acme", "visitor-1", "c1")
    await store.set_open_call("acme", "visitor-2", "c2")
    await store.set_open_call("acme", "visitor-1", "c3")
    assert await store.open_call("acme", "visitor-1") == "c3"
    assert await store.open_call("acme", "visitor-2") == "c2"
    assert await store.open_call("other", "visitor-1") is None


async def test_an_open_call_is_read_with_its_record(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.open_call_row("acme", "visitor-1") is None, "no open call"
    await store.set_open_call("acme", "visitor-1", "c1")
    assert await store.open_call_row("acme", "visitor-1") is None, "no record of c1"
    assert await store.put_call(CallRow("c1", "acme", 1, {"state": "ringing"}))
    assert await store.put_call(CallRow("c1", "acme", 2, {"state": "connected"}))
    assert await store.open_call_row("acme", "visitor-1") == CallRow(
        "c1", "acme", 2, {"state": "connected"}
    )
    assert await store.open_call_row("acme", "visitor-2") is None


async def test_timers_are_leased_moved_and_finished(open_store: Any) -> None:
    store: Store = await open_store()
    await store.schedule_timer("t1", 100.0)
    await store.schedule_timer("t2", 200.0)
    assert await store.claim_timers(99.0, 10.0) == []
    assert await store.claim_timers(150.0, 10.0) == ["t1"]
    assert await store.claim_timers(155.0, 10.0) == [], "leased until 160"
    assert await store.claim_timers(161.0, 10.0) == ["t1"], "its lease ran out"
    await store.schedule_timer("t2", 50.0)  # moved, not added
    assert await store.claim_timers(170.0, 10.0) == ["t2"], "t1 is leased until 171"
    await store.finish_timer("t1")
    await store.finish_timer("t2")
    await store.finish_timer("missing")
    assert await store.claim_timers(1000.0, 10.0) == []
    for i in range(5):
        await store.schedule_timer(f"u{i}", 300.0 + i)
    assert await store.claim_timers(1000.0, 10.0, limit=3) == ["u0", "u1", "u2"], "due first"
    assert await store.claim_timers(1000.0, 10.0, limit=3) == ["u3", "u4"]


async def test_a_kept_timer_stays_as_it_is(open_store: Any) -> None:
    """``keep`` adds a timer that is missing, and leaves one that exists (due or leased) where
    it is: a follow-up scheduled again must not pull a running timer from its node."""
    store: Store = await open_store()
    await store.schedule_timer("t1", 100.0, keep=True)
    assert await store.claim_timers(100.0, 10.0) == ["t1"], "added"
    await store.schedule_timer("t1", 100.0, keep=True)
    assert await store.claim_timers(105.0, 10.0) == [], "still leased until 110"
    await store.schedule_timer("t1", 100.0)
    assert await store.claim_timers(105.0, 10.0) == ["t1"], "moved without keep"


async def test_hits_count_in_fixed_windows(open_store: Any) -> None:
    store: Store = await open_store()
    assert await store.hit("k", 60, 2, 1200.0)
    assert await store.hit("k", 60, 2, 1230.0)
    assert not await store.hit("k", 60, 2, 1259.0), "the third in the window 1200-1260"
    assert await store.hit("other", 60, 2, 1259.0), "keys are separate"
    assert await store.hit("k", 60, 2, 1260.0), "a new window"
    assert await store.hit("k", 10, 1, 1261.0), "another window length is another count"


async def test_queue_ahead_lists_the_calls_before_one(open_store: Any) -> None:
    store: Store = await open_store()
    for call_id, score in (("c1", 1.0), ("c2", 2.0), ("c3", 3.0), ("c0", 2.0)):
        await store.queue_put("acme", call_id, score)
    assert await store.queue_ahead("acme", "missing", 5) is None
    assert await store.queue_ahead("acme", "c1", 5) == []
    assert await store.queue_ahead("acme", "c3", 5) == ["c1", "c0", "c2"]
    assert await store.queue_ahead("acme", "c3", 2) == ["c1", "c0"]
    assert await store.queue_ahead("acme", "c3", 0) == []


async def test_named_coordination_keeps_each_use_apart(open_store: Any) -> None:
    store: Store = await open_store()
    now = datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp()
    assert await store.hit_start_limit("acme", "visitor-1", 60, 1, now)
    assert not await store.hit_start_limit("acme", "visitor-1", 60, 1, now)
    assert await store.hit_start_limit("acme", "visitor-2", 60, 1, now)
    assert await store.hit_session_limit("visitor-1", 60, 1, now), "not the start count"
    assert not await store.hit_session_limit("visitor-1", 60, 1, now)

    slot = store.acquire_open_callback_slot
    assert await slot("acme", "visitor", "visitor-1", "c1", 60.0, now)
    assert not await slot("acme", "visitor", "visitor-1", "c2", 60.0, now), "one at a time"
    assert await slot("acme", "number", "visitor-1", "c2", 60.0, now), "numbers apart"
    assert await slot("other", "visitor", "visitor-1", "c3", 60.0, now), "sites apart"
    await store.release_open_callback_slot("acme", "visitor", "visitor-1", "c1")
    assert await slot("acme", "visitor", "visitor-1", "c2", 60.0, now)

    assert await store.acquire_outbound_line("acme", "c1", 2, 60.0, now)
    assert await store.acquire_outbound_line("acme", "c2", 2, 60.0, now)
    assert not await store.acquire_outbound_line("acme", "c3", 2, 60.0, now)
    await store.release_outbound_line("acme", "c1")
    assert await store.acquire_outbound_line("acme", "c3", 2, 60.0, now)

    assert await store.add_spend("acme", now, 60_000, 86400) == 60_000
    assert await store.add_spend("acme", now + 3600, 0, 86400) == 60_000, "the same UTC day"
    assert await store.add_spend("acme", now + 86400, 0, 86400) == 0, "the next day"
    assert await store.add_spend("other", now, 0, 86400) == 0

    assert await store.claim_dial_once("c1:1", 60.0)
    assert not await store.claim_dial_once("c1:1", 60.0)
    assert await store.claim_dial_once("c1:2", 60.0)

    if isinstance(store, RedisStore):
        # The stored keys are a running cluster's data: they must not change.
        window = int(now // 60)
        for key in (
            f"m:rl:start:acme:visitor-1:60:{window}",
            f"m:rl:sessions:visitor-1:60:{window}",
            "m:slots:cbopen:acme:v:visitor-1",
            "m:slots:cbopen:acme:n:visitor-1",
            "m:slots:out:acme",
            "m:count:spend:acme:2026-01-01",
            "m:once:dial:c1:1",
        ):
            assert await store.redis.exists(key), key


# --- Redis only: what many nodes add -----------------------------------------------------------


async def test_concurrent_nodes_claim_each_lapse_exactly_once(redis_url: str) -> None:
    stores = [RedisStore(redis_url, f"n{i}") for i in range(4)]
    for s in stores:
        await s.start(Recorder().on_event, Recorder().on_resync)
    try:
        now = time.time()
        for i in range(300):
            await stores[i % 4].put_device("acme", f"agent{i}", device("d", now, ttl=1))
        results = await asyncio.gather(*(s.claim_lapsed(now + 2) for s in stores))
        claimed = [pair for result in results for pair in result]
        while True:  # each call takes a bounded batch; drain what is left
            more = await stores[0].claim_lapsed(now + 2)
            if not more:
                break
            claimed += more
        assert sorted(claimed) == sorted(("acme", f"agent{i}") for i in range(300))
    finally:
        for s in stores:
            await s.close()


async def test_redis_coordination_keys_expire_but_the_queue_does_not(redis_url: str) -> None:
    store = RedisStore(redis_url, "n")
    await store.start(Recorder().on_event, Recorder().on_resync)
    try:
        now = time.time()
        quota = Quota("number:+15005550006", window_s=60, limit=5)
        assert await store.take_quotas([quota], "e1", now) is None
        assert await store.acquire_slot("pstn:acme", "c1", 1, 30.0, now)
        assert await store.add_to_counter("spend:acme:day", 1, 86400) == 1
        assert await store.claim_once("dial:c1:1", 120.0)
        await store.queue_put("acme", "c1", now)
        await store.record_handle_time("acme", 3.0)
        r = store.redis
        assert 60_000 <= await r.pttl("m:q:number:+15005550006") <= 61_000
        assert 30_000 <= await r.pttl("m:slots:pstn:acme") <= 31_000
        assert 86_000_000 <= await r.pttl("m:count:spend:acme:day") <= 86_400_000
        assert 119_000 <= await r.pttl("m:once:dial:c1:1") <= 120_000
        assert await r.pttl("m:queue:acme") == -1 and await r.pttl("m:handle:acme") == -1
        assert await store.add_to_counter("spend:acme:none", 0, 60) == 0
        assert not await r.exists("m:count:spend:acme:none"), "a read creates nothing"
    finally:
        await store.close()


async def test_listener_recovers_after_redis_restarts_and_resyncs(
    redis_server: RedisServer, redis_url: str
) -> None:
    a_rec, b_rec = Recorder(), Recorder()
    a, b = RedisStore(redis_url, "a"), RedisStore(redis_url, "b")
    await a.start(a_rec.on_event, a_rec.on_resync)
    await b.start(b_rec.on_event, b_rec.on_resync)
    try:
        redis_server.stop()

        async def deaf() -> bool:
            h = await a.health()
            return not h.reachable and not h.listening

        await eventually(deaf)
        assert not (await a.health()).listening
        redis_server.start()

        async def listening() -> bool:
            return (await a.health()).listening and (await b.health()).listening

        await eventually(listening, timeout=15)
        await asyncio.wait_for(a_rec.resyncs.wait(), 5)
        await b.publish({"type": "after-restart"})
        assert await asyncio.wait_for(a_rec.events.get(), 5) == {"type": "after-restart"}
    finally:
        await a.close()
        await b.close()


async def test_redis_without_persistence_is_reported(tmp_path: Path) -> None:
    from conftest import free_port

    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        import redis as redis_sync

        client = redis_sync.Redis(port=server.port)
        client.config_set("appendonly", "no")
        client.close()
        store = RedisStore(server.url, "n")
        await store.start(Recorder().on_event, Recorder().on_resync)
        health = await store.health()
        await store.close()
        assert health.reachable and not health.persistent
    finally:
        server.stop()


async def test_touch_renews_every_lease_of_a_large_batch(open_store: Any) -> None:
    store: Store = await open_store()
    now = time.time()
    refs = [DeviceRef("acme", f"agent{i}", "desk") for i in range(1_100)]
    for ref in refs:
        await store.put_device("acme", ref.agent_id, device("desk", now, 1))
    await store.remove_device("acme", "agent700", "desk")  # in the second script call
    assert await store.touch_devices(refs, now + 0.5, now + 10) == [refs[700]]
    assert await store.claim_lapsed(now + 5) == []
    lapsed: list[tuple[str, str]] = []
    while batch := await store.claim_lapsed(now + 11):  # claimed a batch at a time
        lapsed += batch
    assert len(lapsed) == 1_099


async def test_a_timer_that_finds_the_store_unreachable_runs_again_after_its_lease(
    open_store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Its handler met a Redis outage: a warning without a traceback, as the REST edge logs
    one (the chaos test's Redis restart logged an error with a traceback), and the timer
    runs again once its lease is over."""
    store: Store = await open_store()
    clock = ManualClock()
    timers = TimerLoop(store, lease_s=15.0, clock=clock)
    runs: list[str] = []

    async def handler(rest: str) -> None:
        runs.append(rest)
        if len(runs) == 1:
            raise StoreUnavailable()  # what a store raises while Redis is away

    timers.on("t", handler)
    await store.schedule_timer("t:x", clock.now() - 1)
    with caplog.at_level(logging.INFO, logger="gateway.services.timers"):
        assert await timers.run_once() == 1
    logged = [r for r in caplog.records if r.name == "gateway.services.timers"]
    assert [r.levelname for r in logged] == ["WARNING"], logged
    assert logged[0].exc_info is None and "store unreachable" in logged[0].getMessage()
    assert await timers.run_once() == 0, "leased"
    await clock.advance(16)
    assert await timers.run_once() == 1 and runs == ["x", "x"]
    await clock.advance(16)
    assert await timers.run_once() == 0, "done"


async def test_a_failing_backend_raises_store_unavailable(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Each backend turns its own failures into ``StoreUnavailable`` (its cause chained), so
    that callers and edges know one outage error: Redis gone away, a SQLite file that is no
    longer a database. A store's start and close keep their own errors."""
    row = CallRow("c1", "acme", 1, {"x": 1})
    redis = RedisStore(own_redis.url, "n1")
    embedded = EmbeddedStore(tmp_path / "data", "n1")
    for store in (redis, embedded):
        await store.start(Recorder().on_event, Recorder().on_resync)
    try:
        own_redis.stop()
        for sqlite_file in (tmp_path / "data").glob("membrane.sqlite3*"):
            sqlite_file.write_bytes(b"\xa5" * max(sqlite_file.stat().st_size, 4096))
        for store in (redis, embedded):
            with pytest.raises(StoreUnavailable) as failed:
                await store.put_call(row)
            assert failed.value.code == "store_unavailable"
            assert failed.value.__cause__ is not None, "what the backend said is kept"
            with pytest.raises(StoreUnavailable):
                await store.get_call("c1")
            assert not (await store.health()).reachable
    finally:
        for store in (redis, embedded):
            await store.close()
        own_redis.start()


async def test_a_sites_experiment_changes_only_from_what_was_read_and_survives_a_restart(
    open_store: Any,
) -> None:
    store: Store = await open_store()
    assert await store.experiment("acme") is None
    assert await store.replace_experiment("acme", None, '{"x": 1}')
    # A second node that also read "none" loses: the first one's experiment stands.
    assert not await store.replace_experiment("acme", None, '{"x": 2}')
    assert await store.replace_experiment("acme", '{"x": 1}', '{"x": 1, "stopped": true}')
    assert not await store.replace_experiment("acme", '{"x": 1}', '{"x": 3}')
    await store.close()
    reopened: Store = await open_store()
    assert await reopened.experiment("acme") == '{"x": 1, "stopped": true}'
    assert await reopened.experiment("globex") is None


async def test_the_queue_head_is_the_queue_in_order(open_store: Any) -> None:
    store: Store = await open_store()
    for call_id, score in (("c3", 30.0), ("c1", 10.0), ("c2", 20.0), ("c0", 20.0)):
        await store.queue_put("acme", call_id, score)
    await store.queue_put("globex", "c9", 1.0)
    assert await store.queue_head("acme", 3) == ["c1", "c0", "c2"]
    assert await store.queue_head("acme", 10) == ["c1", "c0", "c2", "c3"]
