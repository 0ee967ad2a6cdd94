"""One behavioural suite for every Store: the embedded one and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, eventually

from gateway.model import Device, DeviceKind, DeviceState, PresenceStatus
from gateway.store.base import CallRow, DeviceRef, Json, Store
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

    async def factory(node_id: str = "n1", recorder: Recorder | None = None) -> Store:
        store: Store
        if backend == "redis":
            store = RedisStore(url, node_id)
        else:
            store = EmbeddedStore(tmp_path / "data", node_id)
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
    await store.touch_devices(refs, now + 0.5, now + 10)
    assert await store.claim_lapsed(now + 5) == []
    anna = (await store.get_presence("acme", "anna")).devices[0]
    assert anna.expires_at == pytest.approx(now + 10) and anna.last_seen == pytest.approx(now + 0.5)
    assert (await store.get_presence("acme", "ben")).devices == ()


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
