"""The clock a node reads its time from (gateway/ops/clock.py): the manual one that tests
move on instead of waiting, and the system one it stands in for."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.ops.clock import SYSTEM_CLOCK, ManualClock
from gateway.ops.tasks import TaskGroup

START = 1_700_000_000.0


async def test_the_system_clock_is_the_wall_clock_and_the_loops_sleep() -> None:
    before, before_mono = time.time(), time.monotonic()
    now, mono = SYSTEM_CLOCK.now(), SYSTEM_CLOCK.monotonic()
    assert before <= now <= time.time() and before_mono <= mono <= time.monotonic()
    await SYSTEM_CLOCK.sleep(0)
    await SYSTEM_CLOCK.pause(0)


async def test_a_manual_clock_stands_still_until_moved() -> None:
    clock = ManualClock(START)
    assert clock.now() == START and clock.monotonic() == 0.0
    await clock.advance(2.5)
    assert clock.now() == START + 2.5 and clock.monotonic() == 2.5
    with pytest.raises(ValueError):
        await clock.advance(-1)


async def test_sleepers_wake_in_due_order_at_their_own_time() -> None:
    clock = ManualClock(START)
    woke: list[tuple[str, float]] = []
    tasks = TaskGroup("test")

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now() - START))

    for name, seconds in (("late", 7.0), ("early", 3.0), ("after", 20.0)):
        tasks.spawn(sleeper(name, seconds), name)
    await asyncio.sleep(0)  # each is asleep
    await clock.advance(10)
    assert woke == [("early", 3.0), ("late", 7.0)], "each saw the time it was due at"
    await clock.advance(10)
    assert woke[-1] == ("after", 20.0)
    await tasks.close()


async def test_advance_stops_at_each_due_time_on_its_way() -> None:
    """A renewal every 5 s runs at 5, 10 and 15 when the clock moves on by 16 at once, as it
    would with real time: nothing sees 16 s pass without it."""
    clock = ManualClock(START)
    renewed: list[float] = []
    tasks = TaskGroup("test")

    async def renew() -> None:
        while True:
            await clock.sleep(5)
            await asyncio.sleep(0.01)  # some real work (a store round trip)
            renewed.append(clock.now() - START)

    tasks.spawn(renew(), "renew")
    await asyncio.sleep(0)
    await clock.advance(16)
    assert renewed == [5.0, 10.0, 15.0], "each renewal done before time moved on"
    await tasks.close()


async def test_a_poller_looks_again_as_soon_as_the_clock_is_moved() -> None:
    clock = ManualClock(START)
    looked: list[float] = []
    tasks = TaskGroup("test")

    async def poll() -> None:
        while True:
            await clock.pause(3600)  # far longer than the test: only the move ends it
            await asyncio.sleep(0.01)  # some real work (a store round trip)
            looked.append(clock.now() - START)

    tasks.spawn(poll(), "poll")
    await asyncio.sleep(0)
    await clock.advance(1)
    assert looked == [1.0], "moving the clock ended the pause, and advance waited for it"
    await clock.advance(1)
    assert looked == [1.0, 2.0]
    await tasks.close()


async def test_a_pause_is_real_time_when_the_clock_stands_still() -> None:
    """What is due now runs without a test moving the clock: pollers still poll."""
    clock = ManualClock(START)
    await asyncio.wait_for(clock.pause(0.01), 5)
    assert clock.now() == START


async def test_a_task_that_waits_for_something_else_does_not_hang_advance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.ops import clock as clock_module

    monkeypatch.setattr(clock_module, "SETTLE_LIMIT_S", 0.2)
    clock = ManualClock(START)
    tasks = TaskGroup("test")

    async def stuck() -> None:
        await clock.sleep(1)
        await asyncio.Event().wait()  # a provider that never answers

    tasks.spawn(stuck(), "stuck")
    await asyncio.sleep(0)
    await asyncio.wait_for(clock.advance(2), 5)
    assert clock.now() == START + 2
    await tasks.close()
