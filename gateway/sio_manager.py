"""python-socketio's Redis client manager, made observable: ``/readyz`` must say when the
node stopped hearing other nodes' emits, which the stock manager only logs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import redis.asyncio as aioredis
import socketio

from gateway.store.redis import DRIVER_OPTIONS
from gateway.store.redis_lane import RedisLane
from gateway.tasks import raise_if_cancelling


class ObservedRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    def __init__(self, url: str, channel: str) -> None:
        super().__init__(url=url, channel=channel)
        self.listening = False
        self.last_error = ""
        # Emits are published over a pipelined connection of their own (see
        # store.redis_lane): a call sends a dozen, and redis-py costs ~4x the CPU a publish.
        self._lane = RedisLane(url)

    def _redis_connect(self) -> None:
        # As the stock method, but with the pool cap of store.redis.connection_pool (redis-py's
        # default cap of 100 connections in use is reachable under load) and no decoding,
        # which the manager does itself.
        pool = aioredis.ConnectionPool.from_url(
            self.redis_url, max_connections=1024, socket_connect_timeout=2, **DRIVER_OPTIONS
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.connected = True

    async def _publish(self, data: Any) -> Any:
        """As the stock method (two attempts, then log and give up), over the lane, and
        without waiting for Redis to confirm: emits still go out in order, one write for all
        those of a turn of the event loop, and a failure is retried once in the background."""
        message = self.json.dumps(data)
        sent = self._lane.send("PUBLISH", self.channel, message)
        if sent is None:
            return await self._publish_again(message)
        sent.add_done_callback(partial(self._published, message))
        return None

    def _published(self, message: str, sent: asyncio.Future[Any]) -> None:
        if sent.cancelled() or sent.exception() is None:
            return
        self._get_logger().error("Cannot publish to redis... retrying: %r", sent.exception())
        self.server.start_background_task(self._publish_again, message, retrying=True)

    async def _publish_again(self, message: str, retrying: bool = False) -> Any:
        for retries_left in (0,) if retrying else (1, 0):
            try:
                return await self._lane.execute("PUBLISH", self.channel, message)
            except Exception as exc:
                if retries_left:
                    self._get_logger().error("Cannot publish to redis... retrying: %r", exc)
                else:
                    self._get_logger().error("Cannot publish to redis... giving up: %r", exc)
        return None

    async def _redis_listen_with_retries(self) -> AsyncIterator[Any]:
        # The stock loop, plus the ``listening`` flag; backoff capped at 5 s, not 60 s, so a
        # node rejoins soon after Redis comes back; and ``get_message`` with a timeout rather
        # than ``listen()``, whose blocking read in redis-py can swallow a cancellation and
        # hang shutdown.
        retry_sleep = 0.1
        subscribed = False
        while True:
            try:
                if not subscribed:
                    self._redis_connect()
                    await self.pubsub.subscribe(self.channel)
                    subscribed, self.listening, self.last_error = True, True, ""
                    retry_sleep = 0.1
                while True:
                    message = await self.pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=1.0
                    )
                    raise_if_cancelling()
                    if message is not None:
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
        """Close the Redis connection; the listener task belongs to the server's TaskGroup."""
        await self._lane.close()
        if self.redis is not None:
            await self.redis.aclose()
