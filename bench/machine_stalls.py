"""Stalls of the machine itself, told apart from stalls of the code under measurement.

A benchmark's tail can be the code's (a long callback, a collection) or the machine's: the
hypervisor, or the guest kernel, keeping a CPU from every process at once. Steal
(``/proc/stat``) shows only what the hypervisor reports, and a stall of the whole VM shows
on every process (the driver included), so a tail cannot be blamed on the code by reading
the code's own figures alone.

``MachineStalls`` runs one tiny watcher process per CPU, pinned to it and scheduled
``SCHED_FIFO`` (real-time; it needs root, and says so when it cannot have it): it sleeps
1 ms at a time and records every wake-up more than ``threshold_ms`` late. A real-time task
preempts every ordinary one at once, so a late wake-up means the CPU ran nothing of this
guest's user space for that long: the machine stalled, not the benchmark's processes. Its cost
is about 1,000 short wake-ups a second per CPU (under 1% of a core).

    async with MachineStalls() as stalls:
        ...  # the measured window
    report = stalls.report()  # per CPU: stalls, the longest, total ms; and when they were

``overlaps(start, end)`` says whether a stall on any CPU overlapped a stretch (wall-clock
seconds), so a benchmark can count how many of its late events the machine explains.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

WATCHER = r"""
import json, os, sys, time
cpu, threshold = int(sys.argv[1]), float(sys.argv[2]) / 1000
os.sched_setaffinity(0, {cpu})
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    realtime = True
except (PermissionError, OSError):
    realtime = False
print(json.dumps({"cpu": cpu, "realtime": realtime}), flush=True)
stalls = []
wall, clock = time.time, time.perf_counter
before = clock()
try:
    while True:
        time.sleep(0.001)
        now = clock()
        late = now - before - 0.001
        if late > threshold:
            stalls.append((round(wall() - late, 4), round(late * 1000, 2)))
            if len(stalls) > 10000:
                del stalls[:5000]
        before = now
except KeyboardInterrupt:
    pass
print(json.dumps({"stalls": stalls}), flush=True)
"""


@dataclass
class CpuStalls:
    cpu: int
    realtime: bool
    stalls: list[tuple[float, float]] = field(default_factory=list)
    """(wall-clock start, milliseconds) of each late wake-up."""


class MachineStalls:
    def __init__(self, threshold_ms: float = 10.0, cpus: list[int] | None = None) -> None:
        self.threshold_ms = threshold_ms
        # Every CPU of the machine, not only those this process may use: a benchmark pins
        # its driver to some and what it measures to others.
        self.cpus = cpus if cpus is not None else list(range(os.cpu_count() or 1))
        self._procs: list[asyncio.subprocess.Process] = []
        self.by_cpu: list[CpuStalls] = []

    async def __aenter__(self) -> MachineStalls:
        for cpu in self.cpus:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WATCHER,
                str(cpu),
                str(self.threshold_ms),
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            hello = json.loads(await proc.stdout.readline())
            self.by_cpu.append(CpuStalls(cpu, hello["realtime"]))
            self._procs.append(proc)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc, found in zip(self._procs, self.by_cpu, strict=True):
            proc.send_signal(2)  # SIGINT: it prints what it saw
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 5)
                found.stalls = [(float(s), float(ms)) for s, ms in json.loads(line)["stalls"]]
            except (TimeoutError, ValueError, KeyError):
                proc.kill()
            await proc.wait()

    def overlaps(self, start: float, end: float) -> bool:
        """Whether a stall on any CPU overlapped the wall-clock stretch from ``start`` to
        ``end`` (a frame's slot to the moment it went out, say)."""
        return any(
            s_start < end and s_start + ms / 1000 > start
            for found in self.by_cpu
            for s_start, ms in found.stalls
        )

    def report(self, start: float | None = None, end: float | None = None) -> dict[str, Any]:
        """Per CPU, the stalls between wall-clock ``start`` and ``end`` (all if None); and the
        stretches when every CPU stalled at once (the whole machine)."""

        def inside(s: tuple[float, float]) -> bool:
            return (start is None or s[0] >= start) and (end is None or s[0] <= end)

        per_cpu: dict[str, Any] = {}
        for found in self.by_cpu:
            mine = [s for s in found.stalls if inside(s)]
            per_cpu[f"cpu{found.cpu}"] = {
                "realtime": found.realtime,
                "stalls": len(mine),
                "max_ms": max((ms for _, ms in mine), default=0.0),
                "total_ms": round(sum(ms for _, ms in mine), 1),
                "over_40_ms": sum(1 for _, ms in mine if ms > 40),
            }
        everywhere = 0
        if len(self.by_cpu) > 1:
            first, *others = self.by_cpu
            for s_start, ms in (s for s in first.stalls if inside(s)):
                s_end = s_start + ms / 1000
                if all(
                    any(o0 < s_end and o0 + oms / 1000 > s_start for o0, oms in o.stalls)
                    for o in others
                ):
                    everywhere += 1
        return {
            "threshold_ms": self.threshold_ms,
            "by_cpu": per_cpu,
            "on_every_cpu_at_once": everywhere,
        }
