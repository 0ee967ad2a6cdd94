"""The sockets' slotted timers (gateway.ops.slotted_timers): timers due within one slot run
together in one callback of the loop, at the slot's end, not before they are due; a
cancelled one never runs; a failing one does not stop the others."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.ops.slotted_timers import SlottedTimers


async def test_timers_due_in_one_slot_run_together_at_its_end_and_not_before() -> None:
    loop = asyncio.get_running_loop()
    timers = SlottedTimers(loop, slot_s=0.2)
    ran: list[tuple[str, float, int]] = []
    turns = [0]  # callbacks of the loop that ran after a timer's
    done = loop.create_future()

    def note(name: str) -> None:
        ran.append((name, loop.time(), turns[0]))
        loop.call_soon(turns.__setitem__, 0, turns[0] + 1)
        if len(ran) == 3:
            done.set_result(None)

    slot_end = (int(loop.time() / 0.2) + 2) * 0.2  # a whole slot ahead
    first = timers.call_at(slot_end - 0.15, note, "first")
    timers.call_at(slot_end - 0.01, note, "second")
    timers.call_at(slot_end + 0.05, note, "next slot")
    assert first.when() == slot_end - 0.15
    assert len(timers) == 3

    await asyncio.wait_for(done, 2)
    assert [name for name, _, _ in ran] == ["first", "second", "next slot"]
    (_, first_at, first_turn), (_, _, second_turn), (_, third_at, third_turn) = ran
    assert first_turn == second_turn != third_turn, "one slot, one callback of the loop"
    # (uvloop rounds a timer to the millisecond)
    assert first_at >= slot_end - 0.001, "not before the slot's end"
    assert third_at >= slot_end + 0.2 - 0.001
    assert len(timers) == 0


async def test_a_cancelled_timer_never_runs_and_a_failing_one_stops_no_other() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    timers = SlottedTimers(loop, slot_s=0.05)
    ran: list[str] = []
    done = loop.create_future()

    def fail() -> None:
        raise RuntimeError("boom")

    cancelled = timers.call_later(0.01, ran.append, "cancelled")
    timers.call_later(0.01, fail)
    timers.call_later(0.01, ran.append, "kept")
    timers.call_later(0.02, done.set_result, None)
    cancelled.cancel()
    assert cancelled.cancelled()

    await asyncio.wait_for(done, 2)
    assert ran == ["kept"]
    assert [str(e["exception"]) for e in errors] == ["boom"]
