"""Writes each ended call to the call history (gateway/store/history.py), off the call path.

The node that stores a call's end (or the answer to its question afterwards) hands the call
over here (``changed``, a ``CallRecords`` observer) and goes on: the write is this node's
background task, batched (up to ``BATCH`` calls, gathered for at most ``LINGER_S``). A
write that fails is kept and tried again, with backoff, until the history answers; the
newest version of each call wins. At most ``MAX_PENDING`` calls wait: past that the oldest
is dropped, logged as an error and counted, never silently. A node stopping writes what is
pending within its drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from gateway.core.call import Call, CallChannel, CallState
from gateway.core.errors import StoreUnavailable
from gateway.core.history import HistoryRow
from gateway.core.model import CallbackPolicy, Site
from gateway.ops.metrics import Metrics
from gateway.store.history import CallHistory, HistoryRows, timeline_json

log = logging.getLogger(__name__)

MAX_PENDING = 50_000
BATCH = 200
LINGER_S = 0.2
"""How long the writer waits for more ended calls before writing a batch short of ``BATCH``."""
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def kept_promise(call: Call, late_after_s: float) -> bool | None:
    """``HistoryRow.on_time`` of an ended call."""
    if call.channel is not CallChannel.CALLBACK or call.promised_at is None:
        return None
    if call.connected_at is not None:
        return call.connected_at - call.promised_at <= late_after_s
    return None if call.state is CallState.CANCELED else False


def history_row(call: Call, sites: Mapping[str, Site]) -> HistoryRow:
    site = sites.get(call.site)
    agent = site.agents.get(call.agent_id or "") if site is not None else None
    late_after_s = (site.callback_policy if site else CallbackPolicy()).late_after_s
    return HistoryRow(
        call_id=call.call_id,
        site=call.site,
        channel=call.channel.value,
        outcome=call.state.value,
        reason=call.reason,
        agent_id=call.agent_id,
        branch=agent.branch if agent is not None else None,
        created_at=call.created_at,
        connected_at=call.connected_at,
        ended_at=call.ended_at,
        survey_score=call.survey_score,
        timeline=timeline_json(
            [(e.at, e.event, e.detail) for e in call.timeline if not e.internal]
        ),
        promised_at=call.promised_at,
        experiment=call.experiment,
        arm=call.arm,
        on_time=kept_promise(call, late_after_s),
    )


class HistoryWriter:
    def __init__(
        self,
        history: CallHistory,
        sites: Mapping[str, Site],
        metrics: Metrics | None = None,
        rows: HistoryRows | None = None,
    ) -> None:
        self.history = history
        self._rows = rows or history
        """Where batches go: the history, or its writer process (PostgreSQL)."""
        self._sites = sites
        self._metrics = metrics
        self._pending: dict[str, Call] = {}
        """The newest version of each call to write; made a row only when written, off the
        call path."""
        self._since: dict[str, float] = {}
        """When each pending call was handed over (monotonic): the write lag's start."""
        self._wake = asyncio.Event()
        self.opened = asyncio.Event()
        """Set once ``run`` has opened the history."""
        self.written = 0
        self.dropped = 0
        self.failures = 0

    def changed(self, before: Call | None, after: Call) -> None:
        """A ``CallRecords`` observer: an end, or a change to an ended call, is written."""
        if not after.final:
            return
        if len(self._pending) >= MAX_PENDING and after.call_id not in self._pending:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            self._since.pop(oldest, None)
            self.dropped += 1
            if self._metrics is not None:
                self._metrics.history_dropped.inc()
            log.error("call history is %d calls behind: %s dropped", MAX_PENDING, oldest)
        self._pending.pop(after.call_id, None)  # the newest last, as the newest wins
        self._pending[after.call_id] = after
        self._since.setdefault(after.call_id, time.monotonic())
        self._count_pending()
        self._wake.set()

    def _count_pending(self) -> None:
        if self._metrics is not None:
            self._metrics.history_pending.set(len(self._pending))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Open the history (again and again while it cannot be reached: the node serves
        calls meanwhile, and what ends waits here), then write what ends."""
        failures = 0
        while not self.opened.is_set():
            try:
                await self.history.start()
                self.opened.set()
                if self._rows is not self.history:
                    await self._rows.start()
            except StoreUnavailable as e:
                if self.opened.is_set():  # the writer process: the first batch starts it
                    log.warning("call history writer did not start (%s)", e)
                    break
                log.warning("call history unreachable at start (%s); trying again", e)
                await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                failures += 1
        failures = 0
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            if len(self._pending) < BATCH:
                # Calls end one at a time: a moment's wait writes them a batch a transaction,
                # not a transaction each (measured: the database's and the node's CPU per
                # call is most of what the history costs the call path).
                await asyncio.sleep(LINGER_S)
            if await self._write_batch():
                failures = 0
            else:
                await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                failures += 1

    async def _write_batch(self) -> bool:
        ids = list(self._pending)[:BATCH]
        calls = [self._pending[i] for i in ids]
        rows = [history_row(c, self._sites) for c in calls]
        try:
            await self._rows.put(rows)
        except StoreUnavailable as e:
            self.failures += 1
            log.warning("call history unreachable (%s); %d calls wait", e, len(self._pending))
            return False
        now = time.monotonic()
        for call_id, call in zip(ids, calls, strict=True):
            if self._pending.get(call_id) is call:  # not replaced by a newer one meanwhile
                del self._pending[call_id]
                since = self._since.pop(call_id, now)
                if self._metrics is not None:
                    self._metrics.history_write_lag.observe(now - since)
        self.written += len(rows)
        self._count_pending()
        return True

    async def flush(self, deadline_s: float) -> None:
        """Write what is pending, for up to ``deadline_s`` (a node stopping)."""
        if not self.opened.is_set():
            if self._pending:
                log.error("call history: %d calls not written (never opened)", self.pending)
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while self._pending and loop.time() < end:
            try:
                written = await asyncio.wait_for(self._write_batch(), end - loop.time())
            except TimeoutError:  # a write that hangs must not hold the node past its grace
                break
            if not written:
                await asyncio.sleep(min(0.5, max(0.0, end - loop.time())))
        if self._pending:
            log.error("call history: %d calls not written before stopping", len(self._pending))

    async def close(self) -> None:
        if self._rows is not self.history:
            await self._rows.close()
        await self.history.close()
