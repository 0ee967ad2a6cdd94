"""Garbage collection on a clock, and never over every open connection.

CPython's own schedule fails a node that holds thousands of connections in two ways:

1. **Young collections come late.** CPython starts one when allocations minus deallocations
   pass a threshold. Each socket keeps a few waits pending (a coroutine, a future, a timer)
   and replaces them on every message or ping: one allocated, one freed. The count barely
   moves, so the young generation grows for seconds and is then collected in one 80-110 ms
   pause (100k-140k objects, bench/click_to_ring.py at 5,000 agents on two nodes).
2. **Full collections walk every live object.** An open connection holds about 50 tracked
   objects (an availability stream) to 130 (a socket.io socket) for as long as it stays.
   A full collection took 374 ms with 10,000 availability streams on a node and 700-800 ms
   with 4,000 sockets (bench/availability_fanout.py, bench/click_to_ring.py), and ran once a
   minute.

So the pacer collects the young generation every ``young_every_s``, the middle one every
``middle_every`` young collections, and then *freezes* (``gc.freeze``) whatever survived
that middle collection: the collector never walks those objects again. A frozen object is
still freed by reference counting once nothing refers to it; only a reference *cycle* of
frozen objects that becomes garbage stays behind. Measured: after 1,000 availability
streams, 1,000 agent sockets and 1,000 visitor sockets were frozen and then closed, and
after 6,000 calls through two nodes, a full collection found no garbage at all
(tests/test_gc_pacer.py checks a node's connections and calls the same way).

As insurance against cycles some rarer path leaves, the frozen objects are checked every
``full_every_s`` (an hour by default) *without pausing the node*: a forked child, which
shares the node's heap copy-on-write and holds none of its descriptors, unfreezes and
collects its copy with ``DEBUG_SAVEALL`` and reports how many objects were garbage, and of
which types (``check_frozen``). The node pauses only for the fork (copying its page tables:
milliseconds for a few hundred MB). Only when the garbage passes ``frozen_garbage_limit``
(100,000 objects: a leak, not a stray cycle) does the node collect everything itself, the
one long pause left (1.5-1.9 s at 10,000 idle sockets), and it logs the types either way,
so that the path that leaks can be found. The child's collection touches every object, so
for the second or two it runs it copies most of the heap: a node needs that much memory
spare once an hour. Where ``os.fork`` is missing, everything is collected as before.

Timer callbacks, not a Task, so the pacer adds nothing of its own for the collector to walk
(the check's child is watched by a reader callback and a timer too).

The collector is the interpreter's, so there is one pacer per process (``PROCESS_PACER``):
every app that ``create_app`` builds acquires it on start-up and releases it on cleanup; the
first starts it and the last stops it (tests run several nodes in one process). It runs only
on the CPython versions it was measured on (``MEASURED``): it relies on the generational
collector's young, middle and old generations, and 3.14's incremental collector has two
generations and collects the old one in slices, so ``gc.collect(1)`` no longer means what the
numbers above assume. Elsewhere it stays off and says so once in the log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# (generation, pause in seconds, objects collected): every collection, paced or automatic.
PauseObserver = Callable[[int, float, int], None]

# CPython versions whose collector the pacer's design and numbers hold for: measured on 3.11;
# 3.12 and 3.13 keep its three generations, thresholds and gc.freeze (3.12 moved when the
# collector runs to the eval breaker, which paced collections do not depend on). 3.14 does not.
MEASURED = ((3, 11), (3, 13))
# Automatic collections stay a safety net for allocation bursts while the pacer runs.
PACED_THRESHOLDS = (20_000, 20, 50)


FROZEN_GARBAGE_LIMIT = 100_000
REAP_EVERY_S = 0.05
CHECK_TIMEOUT_S = 120.0
"""A child still collecting after this long is stuck (a finalizer waiting on a lock some
other thread held at the fork): it is killed and the check counts as failed."""


@dataclass(frozen=True, slots=True)
class FrozenCheck:
    """What a forked child found among the frozen objects."""

    frozen: int
    garbage: int
    """Objects the child's collection found unreachable (cycles no reference count frees)."""
    types: dict[str, int]
    """The commonest types among them, with how many of each."""
    took_s: float
    frames: dict[str, int] = field(default_factory=dict)
    """The commonest frames among them (``file:function:line``): where a cycle that holds
    a traceback was made."""


def _check_in_child(write_fd: int) -> None:
    """In the forked child: collect the whole copy of the heap, keeping what is garbage to
    count it, and write the result to ``write_fd``. Never returns."""
    try:
        # Finalizers of the garbage run here: with no descriptor but the pipe, none can
        # write to the node's sockets, files or log.
        os.closerange(0, write_fd)
        os.closerange(write_fd + 1, max(os.sysconf("SC_OPEN_MAX"), write_fd + 2))
        frozen = gc.get_freeze_count()
        started = time.perf_counter()
        gc.unfreeze()
        gc.set_debug(gc.DEBUG_SAVEALL)
        garbage = gc.collect()
        kinds = collections.Counter(type(o).__qualname__ for o in gc.garbage)
        # Frames in a cycle are where it was made (an exception kept with its traceback).
        places = collections.Counter(
            f"{o.f_code.co_filename.rsplit('/', 2)[-1]}:{o.f_code.co_name}:{o.f_lineno}"
            for o in gc.garbage
            if isinstance(o, types.FrameType)
        )
        report = {
            "frozen": frozen,
            "garbage": garbage,
            "types": dict(kinds.most_common(8)),
            "frames": dict(places.most_common(5)),
            "took_s": time.perf_counter() - started,
        }
        os.write(write_fd, json.dumps(report).encode())
    finally:
        os._exit(0)


def _reap(loop: asyncio.AbstractEventLoop, pid: int) -> None:
    """Collect the exited child ``pid``, without waiting: a child that copied most of the
    heap takes a while to give it back as it exits, and the node must not wait for that.
    (A function, not a closure that schedules itself: that would be a reference cycle.)"""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return  # reaped by someone else's watcher
    if reaped == 0:
        loop.call_later(REAP_EVERY_S, _reap, loop, pid)


class CollectorPacer:
    def __init__(
        self,
        young_every_s: float = 0.05,
        middle_every: int = 5,
        full_every_s: float = 3600.0,
        observer: PauseObserver | None = None,
        frozen_garbage_limit: int = FROZEN_GARBAGE_LIMIT,
    ) -> None:
        self.young_every_s = young_every_s
        self.middle_every = middle_every
        self.full_every_s = full_every_s
        self.frozen_garbage_limit = frozen_garbage_limit
        self.last_check: FrozenCheck | None = None
        self.frozen_objects = 0
        """How many objects were frozen when last counted: by the hourly check (in its child,
        no pause here) or a full collection. ``gc.get_freeze_count`` walks every frozen
        object, 30 ms at a node's size, so it is not asked for on each scrape."""
        self._checking: asyncio.Future[FrozenCheck | None] | None = None
        self._observer = observer
        self._ticks = 0
        self._started_at = 0.0
        self._handles: list[asyncio.TimerHandle] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._observer is not None:
            gc.callbacks.append(self._observe)
        self._handles = [
            loop.call_later(self.young_every_s, self._young),
            loop.call_later(self.full_every_s, self._full),
        ]

    def stop(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles = []
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)

    def tick(self) -> None:
        """One young collection, or every ``middle_every``-th time a middle one after which
        the survivors are frozen."""
        self._ticks += 1
        if self._ticks % self.middle_every == 0:
            gc.collect(1)
            gc.freeze()
        else:
            gc.collect(0)

    def collect_everything(self) -> int:
        """Every object, frozen or not: returns how many were garbage. Pauses the process
        for as long as walking the whole heap takes."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.frozen_objects = gc.get_freeze_count()  # (a pause already)
        log.info(
            "full garbage collection: %d objects collected in %.0f ms",
            found,
            (time.perf_counter() - started) * 1000,
        )
        return found

    def check_frozen(self) -> asyncio.Future[FrozenCheck | None]:
        """Count the garbage among the frozen objects in a forked child, without pausing
        this process beyond the fork; when there is more than ``frozen_garbage_limit``,
        collect everything here. The future gives what the child found (None: the check
        failed, or this platform cannot fork, in which case everything was collected). A
        check already running is the one returned."""
        loop = asyncio.get_running_loop()
        if self._checking is not None and not self._checking.done():
            return self._checking
        done: asyncio.Future[FrozenCheck | None] = loop.create_future()
        self._checking = done
        if not hasattr(os, "fork"):
            self.collect_everything()
            done.set_result(None)
            return done
        started = time.perf_counter()
        try:
            read_fd, write_fd = os.pipe()
            try:
                pid = os.fork()
            except OSError:
                os.close(read_fd)
                os.close(write_fd)
                raise
        except OSError as e:  # out of descriptors or memory: try again next time
            log.warning("frozen garbage check could not start: %s", e)
            done.set_result(None)
            return done
        if pid == 0:
            os.close(read_fd)
            _check_in_child(write_fd)
        os.close(write_fd)
        fork_s = time.perf_counter() - started
        os.set_blocking(read_fd, False)
        chunks: list[bytes] = []

        def finish(check: FrozenCheck | None) -> None:
            loop.remove_reader(read_fd)
            os.close(read_fd)
            timeout.cancel()
            _reap(loop, pid)
            if check is None:
                log.warning("frozen garbage check failed (its child stopped or got stuck)")
            else:
                self._checked(check, fork_s)
            if not done.done():
                done.set_result(check)

        def readable() -> None:
            try:
                chunk = os.read(read_fd, 65536)
            except BlockingIOError:
                return
            if chunk:
                chunks.append(chunk)
                return
            try:
                found = json.loads(b"".join(chunks))
                check = FrozenCheck(
                    found["frozen"], found["garbage"], found["types"], found["took_s"],
                    found["frames"],
                )  # fmt: skip
            except (ValueError, KeyError, TypeError):
                check = None
            finish(check)

        def stuck() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            finish(None)

        timeout = loop.call_later(CHECK_TIMEOUT_S, stuck)
        loop.add_reader(read_fd, readable)
        return done

    def _checked(self, check: FrozenCheck, fork_s: float) -> None:
        self.last_check = check
        self.frozen_objects = check.frozen
        over = check.garbage > self.frozen_garbage_limit
        log.log(
            logging.WARNING if check.garbage else logging.INFO,
            "frozen garbage check: %d of %d frozen objects were garbage (%s)%s; the child "
            "took %.0f ms, the fork paused this process %.1f ms%s",
            check.garbage,
            check.frozen,
            ", ".join(f"{n} {kind}" for kind, n in check.types.items()) or "none",
            "".join(f", {n} frames at {place}" for place, n in check.frames.items()),
            check.took_s * 1000,
            fork_s * 1000,
            "; collecting everything" if over else "",
        )
        if over:
            self.collect_everything()

    def _young(self) -> None:
        self.tick()
        self._handles[0] = asyncio.get_running_loop().call_later(self.young_every_s, self._young)

    def _full(self) -> None:
        self.check_frozen()
        self._handles[1] = asyncio.get_running_loop().call_later(self.full_every_s, self._full)

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
        elif self._observer is not None:
            self._observer(
                info["generation"], time.perf_counter() - self._started_at, info["collected"]
            )


class SharedPacer:
    """The process's one pacer, shared by every app in the process (see the module's
    docstring): started by the first ``acquire``, stopped by the last ``release``, each
    acquirer's observer told of every collection meanwhile."""

    def __init__(self, python: tuple[int, int] | None = None) -> None:
        self.python = python or (sys.version_info.major, sys.version_info.minor)
        self.users = 0
        self.pacer: CollectorPacer | None = None
        self._observers: list[PauseObserver] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thresholds: tuple[int, int, int] | None = None
        self._refused = False

    @property
    def supported(self) -> bool:
        return MEASURED[0] <= self.python <= MEASURED[1]

    def acquire(self, observer: PauseObserver | None = None) -> bool:
        """Start pacing if nobody has yet (and on a measured Python): True if it runs."""
        if not self.supported:
            if not self._refused:
                self._refused = True
                log.warning(
                    "collector pacer off: measured on CPython %d.%d-%d.%d, running %d.%d",
                    *MEASURED[0], *MEASURED[1], *self.python,
                )  # fmt: skip
            return False
        loop = asyncio.get_running_loop()
        if self.pacer is not None and self._loop is not loop and not self._running_on_loop():
            # Its loop ended without the last release (a test that crashed): start afresh.
            self._stop()
        if observer is not None:
            self._observers.append(observer)
        self.users += 1
        if self.pacer is None:
            self._loop = loop
            self._thresholds = gc.get_threshold()
            gc.set_threshold(*PACED_THRESHOLDS)
            self.pacer = CollectorPacer(observer=self._observe)
            self.pacer.start()
        return True

    def release(self, observer: PauseObserver | None = None) -> None:
        """Undo one ``acquire`` that returned True; the last one stops the pacer, gives the
        collector back its thresholds and the objects it froze."""
        if observer is not None and observer in self._observers:
            self._observers.remove(observer)
        self.users -= 1
        if self.users <= 0:
            self._stop()

    def collect_everything(self) -> int:
        """A full collection now (SIGUSR1); what the pacer froze is frozen again after."""
        if self.pacer is not None:
            return self.pacer.collect_everything()
        started = time.perf_counter()
        found = gc.collect()
        log.info(
            "full garbage collection: %d objects collected in %.0f ms (pacer off)",
            found,
            (time.perf_counter() - started) * 1000,
        )
        return found

    def check_frozen(self) -> None:
        """Check the frozen objects for garbage now (SIGUSR2), as the pacer does hourly."""
        if self.pacer is not None:
            self.pacer.check_frozen()

    def _running_on_loop(self) -> bool:
        return self._loop is not None and not self._loop.is_closed()

    def _stop(self) -> None:
        if self.pacer is not None:
            self.pacer.stop()
            # Frozen objects are never collected: without a pacer to collect them every
            # hour, garbage cycles among them would stay for the rest of the process.
            gc.unfreeze()
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
        self.pacer, self._loop, self._thresholds = None, None, None
        self.users = 0
        self._observers = []

    def _observe(self, generation: int, pause_s: float, collected: int) -> None:
        for observer in self._observers:
            observer(generation, pause_s, collected)


PROCESS_PACER = SharedPacer()
