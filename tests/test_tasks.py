"""The background task owner (gateway.ops.tasks): a close that cannot be held up."""

from __future__ import annotations

import asyncio

from gateway.ops.tasks import TaskGroup


async def test_close_ends_a_loop_that_swallowed_its_cancel() -> None:
    """As a loop around a library read that reported a cancel as a plain timeout (CPython
    3.11): the loop logs it and waits again. The group cancels it again and is done."""
    swallowed = asyncio.Event()
    cancels = 0

    async def careless_loop() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if swallowed.is_set():
                    raise
                swallowed.set()  # the first cancel is lost, as the library lost it

    group = TaskGroup("test")
    task = group.spawn(careless_loop(), "careless")
    await asyncio.sleep(0)  # the loop is waiting
    await asyncio.wait_for(group.close(), 5)
    assert swallowed.is_set() and task.cancelled()
    assert cancels == 2, "cancelled again once, after RECANCEL_AFTER_S, not until a timeout"


async def test_close_waits_for_tasks_that_exit_on_their_first_cancel() -> None:
    done: list[str] = []

    async def tidy() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            done.append("tidy")

    group = TaskGroup("test")
    group.spawn(tidy(), "tidy")
    await asyncio.sleep(0)
    await group.close()
    assert done == ["tidy"] and len(group) == 0
