"""How long the gateway keeps what it knows of a call: ended calls (with the customer's
number, the page they called from, their timeline) are deleted once they have not changed
for the retention period (``server.retention_days``).

Every node sweeps, each site in turn, oldest first; a delete is conditional on the call's
version, so two nodes sweeping at once, or a call changing as it is swept, do no harm. A
call that has not ended is never deleted, however old: a callback may be booked days ahead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from gateway.ops.clock import Clock
from gateway.store.base import CallRecordStore
from gateway.wire.codec import call_from_record

log = logging.getLogger(__name__)

BATCH = 500
"""Calls read per site per pass: a long-neglected store is worked through over passes."""
SWEEP_EVERY_S = 3600.0


class Retention:
    def __init__(
        self,
        store: CallRecordStore,
        sites: Callable[[], Collection[str]],
        retention_s: float,
        clock: Clock,
    ) -> None:
        self._store = store
        self._sites = sites
        self.retention_s = retention_s
        self._clock = clock
        self.deleted = 0
        """Calls this node deleted."""

    async def sweep(self) -> int:
        """One pass over every site; how many calls it deleted."""
        before = self._clock.now() - self.retention_s
        deleted = 0
        for site in self._sites():
            for row in await self._store.calls_unchanged_since(site, before, BATCH):
                ended = call_from_record(row.data, row.version).final
                if ended and await self._store.delete_call(row):
                    deleted += 1
        self.deleted += deleted
        return deleted

    async def run(self) -> None:
        while True:
            try:
                deleted = await self.sweep()
                if deleted:
                    log.info("retention: deleted %d ended calls", deleted)
            except Exception:
                log.exception("retention sweep failed")
            await self._clock.pause(SWEEP_EVERY_S)
