"""How long the call history keeps a site's calls: each site's ``history_retention_days``
(400 by default: a year and a month, so a year can be compared with the one before).

Every node with a history sweeps it hourly, each site in turn, oldest calls first, in
batches (a long-neglected history is worked through without one huge transaction). The
history takes each deleted call off its sums in the same transaction, so the board's
figures never count a call that is gone. Nodes sharing one database sweep it alike: a call
deleted by one is not there for the other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from gateway.core.errors import StoreUnavailable
from gateway.core.model import Site
from gateway.store.history import CallHistory

log = logging.getLogger(__name__)

BATCH = 5000
SWEEP_EVERY_S = 3600.0


class HistoryRetention:
    def __init__(
        self, history: CallHistory, sites: Mapping[str, Site], clock: Callable[[], float]
    ) -> None:
        self._history = history
        self._sites = sites
        self._clock = clock
        self.deleted = 0

    async def sweep(self) -> int:
        """One pass over every site; how many calls it deleted."""
        deleted = 0
        for site in list(self._sites.values()):
            before = self._clock() - site.history_retention_days * 86_400
            while True:
                gone = await self._history.delete_before(site.site_id, before, BATCH)
                deleted += gone
                if gone < BATCH:
                    break
        self.deleted += deleted
        return deleted

    async def run(self, opened: asyncio.Event) -> None:
        await opened.wait()
        while True:
            try:
                deleted = await self.sweep()
                if deleted:
                    log.info("history retention: deleted %d calls", deleted)
            except StoreUnavailable as e:
                log.warning("history retention: the history is unreachable (%s)", e)
            except Exception:
                log.exception("history retention sweep failed")
            await asyncio.sleep(SWEEP_EVERY_S)
