"""What the parts of the Redis store share: its connections, and the keys of more than one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from gateway.store.redis_lane import RedisLane

EVENTS_CHANNEL = "m:events"


def reservation_key(site: str, agent_id: str) -> str:
    """The call holding an agent (``RedisCoordination``), checked by an accept's write
    (``RedisRecords.put_call_holding``)."""
    return f"m:resv:{site}:{agent_id}"


def pairs(flat: list[Any]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


class RedisParts:
    """The connections each part (``RedisPresence``, ``RedisRecords``, ``RedisCoordination``)
    uses, opened by ``RedisStore``: the pool for reads and scripts registered on it, the lane
    for the hot path."""

    node_id: str
    _clock: Callable[[], float]
    _redis: aioredis.Redis
    _lane: RedisLane

    def _script(self, source: str) -> AsyncScript:
        return self._redis.register_script(source)
