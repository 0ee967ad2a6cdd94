"""The collector pacer: short collections on a clock, survivors frozen, and what a node
freezes freed by reference counting once its connections and calls end."""

from __future__ import annotations

import asyncio
import gc
import re
import signal
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import SocketClient, eventually, make_settings, mint, node_process

from gateway.gc_pacer import CollectorPacer
from gateway.model import Role
from gateway.settings import demo_config_text

ORIGIN = {"Origin": "http://127.0.0.1:8080"}


@pytest.fixture
def thawed() -> Iterator[None]:
    """Whatever a test freezes goes back to the collector afterwards."""
    yield
    gc.unfreeze()


class Linked:
    other: Linked | None = None


def test_survivors_of_a_middle_collection_are_frozen_and_young_ones_are_not(
    thawed: None,
) -> None:
    pacer = CollectorPacer(middle_every=3)
    survivors: list[list[int]] = [[] for _ in range(1_000)]  # lists are always tracked
    before = gc.get_freeze_count()
    pacer.tick()
    pacer.tick()
    assert gc.get_freeze_count() == before, "young collections freeze nothing"
    pacer.tick()
    assert gc.get_freeze_count() >= before + len(survivors)


def test_a_cycle_that_dies_frozen_is_collected_only_with_everything(thawed: None) -> None:
    pacer = CollectorPacer(middle_every=1)
    a, b = Linked(), Linked()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    pacer.tick()  # frozen while alive
    del a, b
    for _ in range(3):
        pacer.tick()
    assert alive() is not None, "the paced collections never walk frozen objects"
    assert pacer.collect_everything() >= 2
    assert alive() is None


async def test_every_pause_is_observed_until_the_pacer_stops() -> None:
    seen: list[tuple[int, float, int]] = []
    pacer = CollectorPacer(
        young_every_s=3600, full_every_s=3600, observer=lambda *p: seen.append(p)
    )
    pacer.start()
    try:
        garbage = Linked()
        garbage.other = garbage
        del garbage
        gc.collect(0)
    finally:
        pacer.stop()
    generation, pause_s, collected = seen[-1]
    assert generation == 0
    assert 0 <= pause_s < 1 and collected >= 1
    count = len(seen)
    gc.collect(0)
    assert len(seen) == count


async def test_a_node_frees_what_it_froze_once_its_connections_and_calls_end(
    tmp_path: Path,
    redis_url: str,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """The pacer never walks frozen objects again, so a reference cycle among them that
    became garbage would stay for good (until the hourly full collection). None must: a
    node's sockets, availability streams and calls, once over, are freed by reference
    counting. SIGUSR1 makes the node collect everything now and log what it found."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    async with node_process(tmp_path, settings, redis_url, demo_config_text(), "node") as (
        url,
        proc,
    ):
        for _ in range(3):
            board = clients()
            await board.connect(url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
            anna = clients()
            await anna.connect(url, "/agent", {"token": mint(settings, "anna")})
            stream = await http.get(f"{url}/v1/sites/acme/availability/stream", headers=ORIGIN)
            await stream.content.readuntil(b"\n\n")
            r = await http.post(f"{url}/v1/sites/acme/sessions", json={}, headers=ORIGIN)
            visitor = clients()
            await visitor.connect(url, "/visitor", {"token": (await r.json())["token"]})
            assert (await visitor.call("call:start", {}, "/visitor"))["ok"]
            ring = await anna.next("call:ring")
            call = {"call_id": ring["call_id"]}
            assert (await anna.call("call:accept", call, "/agent"))["ok"]
            offer = {**call, "description": {"type": "offer", "sdp": "v=0"}}
            assert (await visitor.call("rtc:signal", offer, "/visitor"))["ok"]
            assert await anna.next("rtc:signal") == offer
            # What is tested is objects living across the pacer's freezes (every 250 ms).
            await asyncio.sleep(0.6)
            assert (await anna.call("call:hangup", call, "/agent"))["ok"]
            await visitor.next("call:update", lambda c: c["state"] == "completed")
            stream.close()
            for client in (visitor, anna, board):
                await client.close()

        async def anna_gone() -> bool:
            async with http.get(f"{url}/v1/sites/acme/availability") as r:
                available: int = (await r.json())["agents_available"]
                return available == 0

        await eventually(anna_gone)
        log = tmp_path / "node.log"
        proc.send_signal(signal.SIGUSR1)

        async def collected() -> bool:
            return "full garbage collection:" in log.read_text()

        await eventually(collected)
        found = re.search(r"full garbage collection: (\d+) objects.*", log.read_text())
        assert found is not None
        assert int(found.group(1)) == 0, found.group(0)

        async with http.get(f"{url}/metrics") as r:
            metrics = await r.text()
        assert pause_count(metrics, "0") > 0 and pause_count(metrics, "1") > 0
        assert pause_count(metrics, "2") >= 1, "the full collection asked for"


def pause_count(metrics: str, generation: str) -> float:
    pattern = rf'membrane_gc_pause_seconds_count\{{generation="{generation}"\}} (\S+)'
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else 0.0
