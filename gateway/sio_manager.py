"""python-socketio's Redis client manager, made observable: ``/readyz`` must say when the
node stopped hearing other nodes' emits, which the stock manager only logs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import socketio


class ObservedRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    def __init__(self, url: str, channel: str) -> None:
        super().__init__(url=url, channel=channel)
        self.listening = False
        self.last_error = ""

    async def _redis_listen_with_retries(self) -> AsyncIterator[Any]:
        # The stock loop, plus the ``listening`` flag; backoff capped at 5 s, not 60 s, so a
        # node rejoins soon after Redis comes back.
        retry_sleep = 0.1
        subscribed = False
        while True:
            try:
                if not subscribed:
                    self._redis_connect()
                    await self.pubsub.subscribe(self.channel)
                    subscribed, self.listening, self.last_error = True, True, ""
                    retry_sleep = 0.1
                async for message in self.pubsub.listen():
                    yield message
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening, self.last_error = False, repr(exc)
                self._get_logger().warning("socket.io Redis listener lost: %r", exc)
                subscribed = False
                await asyncio.sleep(retry_sleep)
                retry_sleep = min(retry_sleep * 2, 5.0)

    async def close(self) -> None:
        thread = getattr(self, "thread", None)
        if thread is not None and not thread.done():
            thread.cancel()
            try:
                await thread
            except asyncio.CancelledError:
                pass
        if self.redis is not None:
            await self.redis.aclose()
