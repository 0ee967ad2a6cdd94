"""The collector pacer: short collections on a clock, survivors frozen, and what a node
freezes freed by reference counting once its connections and calls end; one per process,
started by the first app and stopped by the last, off when the settings or the Python
version say so."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import re
import signal
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    NodeFactory,
    SocketClient,
    eventually,
    make_settings,
    mint,
    node_process,
    start_node,
)

from gateway.app import create_app
from gateway.core.model import Role
from gateway.ops.gc_pacer import (
    MEASURED,
    PACED_THRESHOLDS,
    PROCESS_PACER,
    CollectorPacer,
    SharedPacer,
)
from gateway.settings import ConfigError, demo_config_text, load_settings

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


class Leaked:
    other: Leaked | None = None


async def test_the_hourly_check_finds_frozen_garbage_in_a_child_and_collects_only_a_leak(
    thawed: None,
) -> None:
    """The check counts frozen cycles that died in a forked child, by type, leaving this
    process's heap as it was; past the limit, this process collects everything."""
    # From a clean heap: in a suite's process, earlier tests' nodes froze garbage of their own.
    gc.unfreeze()
    gc.collect()
    pacer = CollectorPacer(middle_every=1, frozen_garbage_limit=1_000)
    pairs = [(Leaked(), Leaked()) for _ in range(100)]
    for a, b in pairs:
        a.other, b.other = b, a
    alive = weakref.ref(pairs[0][0])
    pacer.tick()  # frozen while alive
    del pairs, a, b

    found = await asyncio.wait_for(pacer.check_frozen(), 60)
    assert found is not None and found.garbage >= 200, found
    assert found.types.get("Leaked", 0) >= 200, found.types
    assert found.frozen >= 200
    assert alive() is not None, "a few cycles are not worth a pause: nothing collected here"
    again = pacer.check_frozen()
    assert pacer.check_frozen() is again, "one check at a time"
    await asyncio.wait_for(again, 60)

    pacer.frozen_garbage_limit = 100
    found = await asyncio.wait_for(pacer.check_frozen(), 60)
    assert found is not None and found.garbage >= 200
    assert alive() is None, "past the limit, everything is collected here"
    assert pacer.last_check == found


async def test_a_check_that_cannot_start_says_so_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node out of descriptors (EMFILE, found at 20,000 connections) cannot open the
    check's pipe: one warning, no exception out of the signal handler, and the next check
    runs as usual."""
    pacer = CollectorPacer()

    def no_pipe() -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pipe", no_pipe)
    assert await asyncio.wait_for(pacer.check_frozen(), 5) is None
    assert "frozen garbage check could not start" in caplog.text
    monkeypatch.undo()
    assert await asyncio.wait_for(pacer.check_frozen(), 60) is not None


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
        # The hourly check, now: a forked child finds no garbage among the frozen objects.
        proc.send_signal(signal.SIGUSR2)

        async def checked() -> bool:
            return "frozen garbage check:" in log.read_text()

        await eventually(checked, 30)
        found = re.search(r"frozen garbage check: (\d+) of (\d+) frozen .*", log.read_text())
        assert found is not None
        assert int(found.group(1)) == 0 and int(found.group(2)) > 10_000, found.group(0)

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


def gauge(metrics: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as r:
        return await r.text()


async def test_a_node_that_tests_build_runs_the_pacer_and_shows_what_it_froze(
    nodes: NodeFactory, http: aiohttp.ClientSession
) -> None:
    before = gc.get_threshold()
    node = await nodes()
    assert PROCESS_PACER.users == 1 and PROCESS_PACER.pacer is not None
    assert gc.get_threshold() == PACED_THRESHOLDS

    async def froze_something() -> bool:
        return gc.get_freeze_count() > 0

    await eventually(froze_something)  # a middle collection every 250 ms freezes survivors
    # Counted by the hourly check (its child walks them), not on each scrape.
    check = await PROCESS_PACER.pacer.check_frozen()
    assert check is not None and check.frozen > 0
    metrics = await scrape(http, node.url)
    assert gauge(metrics, "membrane_gc_frozen_objects") == check.frozen
    assert gauge(metrics, "membrane_gc_pacer") == 1
    assert pause_count(metrics, "0") > 0 and pause_count(metrics, "1") > 0

    await node.stop()
    assert PROCESS_PACER.pacer is None and PROCESS_PACER.users == 0
    assert gc.get_freeze_count() == 0, "the last app to stop gives the frozen objects back"
    assert gc.get_threshold() == before


async def test_nodes_in_one_process_share_one_pacer_until_the_last_one_stops(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The collector is the interpreter's: a second node does not start another pacer, and
    the first node to stop does not stop the one the other still runs on."""
    first = await start_node(make_settings(tmp_path, node_id="first"))
    second = await start_node(make_settings(tmp_path, node_id="second"))
    running = [first, second]
    try:
        pacer = PROCESS_PACER.pacer
        assert pacer is not None and PROCESS_PACER.users == 2
        await running.pop(0).stop()
        assert PROCESS_PACER.pacer is pacer and PROCESS_PACER.users == 1
        assert gc.get_threshold() == PACED_THRESHOLDS
        # Still pacing, and still reporting its pauses to the node that is left.
        paused = pause_count(await scrape(http, second.url), "1")

        async def paced() -> bool:
            return pause_count(await scrape(http, second.url), "1") > paused

        await eventually(paced)
        assert gauge(await scrape(http, second.url), "membrane_gc_pacer") == 1
    finally:
        for node in running:
            await node.stop()
    assert PROCESS_PACER.pacer is None and PROCESS_PACER.users == 0


async def test_the_pacer_stays_off_when_the_settings_say_so(
    nodes: NodeFactory, http: aiohttp.ClientSession
) -> None:
    callbacks = list(gc.callbacks)
    node = await nodes(gc_pacer=False)
    assert PROCESS_PACER.pacer is None and PROCESS_PACER.users == 0
    assert gc.callbacks == callbacks
    assert gauge(await scrape(http, node.url), "membrane_gc_pacer") == 0


@pytest.mark.parametrize("python", [(3, 10), (3, 14), (3, 15)])
async def test_the_pacer_turns_itself_off_on_a_python_it_was_not_measured_on(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    python: tuple[int, int],
) -> None:
    unmeasured = SharedPacer(python=python)
    callbacks, thresholds = list(gc.callbacks), gc.get_threshold()
    runners = []
    try:
        for name in ("a", "b"):
            app = create_app(make_settings(tmp_path, node_id=name), pacer=unmeasured)
            runner = web.AppRunner(app, handle_signals=False)
            runners.append(runner)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            metrics = await scrape(http, f"http://127.0.0.1:{port}")
            assert gauge(metrics, "membrane_gc_pacer") == 0
        assert unmeasured.pacer is None and unmeasured.users == 0
        assert (gc.callbacks, gc.get_threshold()) == (callbacks, thresholds)
    finally:
        for runner in runners:
            await runner.cleanup()
    said = [r.getMessage() for r in caplog.records if "collector pacer off" in r.getMessage()]
    assert said == [
        f"collector pacer off: measured on CPython 3.11-3.13, running {python[0]}.{python[1]}"
    ], "one line for the process, not one per node"


def test_the_measured_versions_are_the_ones_the_pacer_runs_on() -> None:
    assert MEASURED == ((3, 11), (3, 13))
    assert [SharedPacer(python=v).supported for v in ((3, 11), (3, 12), (3, 13))] == [True] * 3
    assert not SharedPacer(python=(3, 14)).supported
    assert not SharedPacer(python=(4, 0)).supported


def test_a_pacer_whose_loop_ended_without_its_release_starts_afresh_on_the_next() -> None:
    """A test that crashed before its nodes' cleanup must not leave the process without a
    pacer (its timers were on a loop that is gone) nor with one counted for ever."""
    shared = SharedPacer(python=(3, 11))

    async def acquire() -> CollectorPacer | None:
        assert shared.acquire()
        return shared.pacer

    thresholds = gc.get_threshold()
    try:
        abandoned = asyncio.run(acquire())
        fresh = asyncio.run(acquire())
        assert fresh is not None and fresh is not abandoned and shared.users == 1
    finally:
        shared.release()
    assert shared.pacer is None and gc.get_threshold() == thresholds


@pytest.mark.parametrize(
    ("value", "on"), [("true", True), ("TRUE", True), ("1", True), ("false", False), ("0", False)]
)
def test_the_pacer_setting_comes_from_the_environment(tmp_path: Path, value: str, on: bool) -> None:
    assert load_settings(None, env={"MEMBRANE_GC_PACER": value}).gc_pacer is on


def test_the_pacer_setting_comes_from_the_config_file_and_is_on_by_default(
    tmp_path: Path,
) -> None:
    assert load_settings(None, env={}).gc_pacer is True
    config = tmp_path / "membrane.toml"
    config.write_text(demo_config_text().replace("[server]", "[server]\ngc_pacer = false", 1))
    assert load_settings(config, env={}).gc_pacer is False
    assert load_settings(config, env={"MEMBRANE_GC_PACER": "true"}).gc_pacer is True


@pytest.mark.parametrize(
    ("file_value", "env"),
    [('"false"', {}), ("0", {}), ("true", {"MEMBRANE_GC_PACER": "off-ish"})],
)
def test_a_pacer_setting_that_is_not_a_boolean_is_refused(
    tmp_path: Path, file_value: str, env: dict[str, str]
) -> None:
    config = tmp_path / "membrane.toml"
    config.write_text(
        demo_config_text().replace("[server]", f"[server]\ngc_pacer = {file_value}", 1)
    )
    with pytest.raises(ConfigError) as refused:
        load_settings(config, env=env)
    assert refused.value.key == "server.gc_pacer"
