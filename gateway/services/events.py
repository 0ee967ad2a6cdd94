"""Dispatch of node events (from this node or, through the store, from others) by type."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from gateway.store.base import Json

log = logging.getLogger(__name__)

EventHandler = Callable[[Json], Awaitable[None]]


class EventRouter:
    def __init__(self) -> None:
        self._handlers: dict[str, list[EventHandler]] = {}

    def on(self, event_type: str, handler: EventHandler) -> None:
        self._handlers.setdefault(event_type, []).append(handler)

    async def __call__(self, event: Json) -> None:
        for handler in self._handlers.get(str(event.get("type")), ()):
            try:
                await handler(event)
            except Exception:
                log.exception("handler for %s event failed", event.get("type"))
