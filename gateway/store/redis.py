"""The many-node store: every node shares presence, calls and events through one Redis.

All keys are under ``m:``; each part names its own: presence in redis_presence.py, durable
records and the callback queue in redis_records.py, reservations, timers and the callbacks'
durable coordination in redis_coordination.py. ``m:events`` is the pub/sub channel for node
events, each tagged with its node id so the sender skips its own echo (it handled the event
before publishing, as python-socketio does).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.ops.tasks import TaskGroup
from gateway.store.base import (
    EventHandler,
    Json,
    ResyncHandler,
    StoreHealth,
    failures_become_unavailable,
)
from gateway.store.redis_common import EVENTS_CHANNEL
from gateway.store.redis_coordination import RedisCoordination
from gateway.store.redis_lane import RedisLane, RedisSubscription
from gateway.store.redis_presence import RedisPresence
from gateway.store.redis_records import RedisRecords
from gateway.store.redis_url import RedisTarget, redis_target

log = logging.getLogger(__name__)

PING_INTERVAL_S = 5.0
RESUBSCRIBE_BACKOFF_MAX_S = 2.0
"""A lost subscription is retried at least this often: the node is out of the load balancer's
rotation until it hears events again, so how long it stays out after Redis is back is this
bound, and a connection attempt a node makes every 2 s while Redis is down costs nothing."""


def driver_options() -> dict[str, Any]:
    """redis-py 8 looks its own version up (importlib.metadata, ~1 ms) for every new
    connection unless given once: under load, while a pool grows, that was 10-20% of CPU."""
    try:
        from redis.driver_info import resolve_driver_info
    except ImportError:  # redis-py before 8 has no such lookup
        return {}
    return {"driver_info": resolve_driver_info()}


DRIVER_OPTIONS = driver_options()


def connection_pool(url: str | RedisTarget, max_connections: int = 1024) -> aioredis.ConnectionPool:
    """redis-py's plain pool with a high cap: its default cap of 100 connections in use is
    reachable under load, and the blocking pool costs ~10% more CPU per command (a Condition
    and a timeout per checkout). Past the cap, a command fails as store_unavailable (503).
    Made from the parsed target, not ``from_url``, so that it connects where the lane does."""
    return aioredis.ConnectionPool(
        **redis_target(url).pool_options(),
        max_connections=max_connections,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=10,
        retry_on_timeout=True,
        **DRIVER_OPTIONS,
    )


MAX_START_RETRY_S = 2.0


def _tls_refused(error: BaseException) -> bool:
    """Whether a connection failed in its TLS handshake (redis-py wraps the ssl error)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return True
        cause = cause.__cause__ or cause.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(error)


# Redis unreachable, loading, timing out, read-only after a failover, out of memory (every
# RedisError), or the socket failing under it.
@failures_become_unavailable((RedisError, OSError, TimeoutError))
class RedisStore(RedisPresence, RedisRecords, RedisCoordination):
    """Every role of ``Store`` (its parts are mixed in, sharing the connections)."""

    def __init__(
        self, url: str | RedisTarget, node_id: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.node_id = node_id
        # How each event this node publishes starts (``publish``: "node" is the first key).
        self._own_prefix = '{"node":' + orjson.dumps(node_id).decode() + ","
        self._clock = clock  # when a call row changed (replays); expiries are Redis's own
        self._target = redis_target(url)
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=connection_pool(self._target))
        self._on_event: EventHandler | None = None
        self._on_resync: ResyncHandler | None = None
        self._tasks = TaskGroup(f"redis-store-{node_id}")
        self._lane = RedisLane(self._target)
        self._open_presence()
        self._open_coordination()
        self._inbox: asyncio.Queue[str] = asyncio.Queue()
        self._listening = False
        self._subscribed = asyncio.Event()
        self._settled = asyncio.Event()  # subscribed, or refused at the first try
        self._first_error = "no answer"
        self._listen_error = ""
        self._persistent: bool | None = None

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    @property
    def target(self) -> RedisTarget:
        return self._target

    @property
    def lane(self) -> RedisLane:
        """The hot-path connection, which the socket.io manager publishes over too."""
        return self._lane

    async def start(self, on_event: EventHandler, on_resync: ResyncHandler) -> None:
        self._on_event, self._on_resync = on_event, on_resync
        await self._wait_for_redis()
        self._tasks.spawn(self._deliver_forever(), "deliver")
        self._tasks.spawn(self._listen_forever(), "events")
        try:
            await asyncio.wait_for(self._settled.wait(), timeout=10)
        except TimeoutError:
            pass
        if not self._subscribed.is_set():
            # Refused (an ACL user without access to the channel: Redis 7's default for new
            # users) or never answered: the node cannot hear the others, so it does not start.
            await self._tasks.close()
            raise RedisConnectionError(
                f"cannot subscribe at Redis {self._target}: {self._first_error}"
            )
        if not await self._check_persistence():
            log.warning(
                "Redis at %s has persistence turned off (no AOF, no RDB saves): a Redis restart"
                " would lose pending callbacks. Enable appendonly (see deploy/redis.conf).",
                self._target,
            )

    @property
    def in_flight(self) -> int:
        """Commands on the hot-path connection not answered yet (admission control)."""
        return self._lane.in_flight

    async def _wait_for_redis(self) -> None:
        """A node started while Redis is down (both restarted after a power cut, Redis still
        loading its AOF) waits for it rather than exiting with a traceback: one warning,
        then quiet retries, capped at 2 s apart. It listens for nothing meanwhile, so a
        load balancer sees it as not ready. A refused password is no outage: it fails now."""
        delay = 0.1
        warned = False
        while True:
            try:
                await asyncio.wait_for(self._redis.ping(), timeout=2.0)
                return
            except AuthenticationError as e:
                raise AuthenticationError(f"Redis at {self._target} refused: {e}") from None
            except (RedisError, OSError, TimeoutError) as e:
                if _tls_refused(e):  # a certificate that does not verify is no outage either
                    raise
                if not warned:
                    log.warning(
                        "Redis at %s is unreachable (%s); waiting for it, retrying every %.0f s",
                        self._target, e, MAX_START_RETRY_S,
                    )  # fmt: skip
                    warned = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_START_RETRY_S)

    async def close(self) -> None:
        await self._tasks.close()
        await self._lane.close()
        await self._redis.aclose()

    async def _check_persistence(self) -> bool:
        try:
            info = await self._redis.info("persistence")
            aof = bool(info.get("aof_enabled"))
            try:
                save = str((await self._redis.config_get("save")).get("save") or "")
            except RedisError:
                save = ""  # CONFIG is often disabled on managed Redis; trust AOF alone
            self._persistent = aof or bool(save.strip())
        except RedisError:
            self._persistent = None
        return bool(self._persistent)

    async def health(self) -> StoreHealth:
        try:
            await asyncio.wait_for(self._redis.ping(), timeout=1.0)
        except (RedisError, OSError, TimeoutError) as e:
            return StoreHealth(False, bool(self._persistent), self._listening, f"redis: {e}")
        if self._persistent is None:
            await self._check_persistence()
        detail = "" if self._listening else f"event listener down: {self._listen_error}"
        return StoreHealth(True, bool(self._persistent), self._listening, detail)

    async def _listen_forever(self) -> None:
        """Subscribe, and on any failure (a lost connection, unanswered pings) resubscribe
        with backoff; never die silently. After every resubscription the node resyncs, since
        events sent while it was deaf are gone for good (pub/sub does not queue)."""
        backoff = 0.1
        first = True
        while True:
            subscription = RedisSubscription(self._inbox.put_nowait)
            try:
                await subscription.open(self._target, EVENTS_CHANNEL)
                assert subscription.closed is not None
                self._listening, self._listen_error, backoff = True, "", 0.1
                self._subscribed.set()
                self._settled.set()
                if not first and self._on_resync is not None:
                    await self._on_resync()
                first = False
                while True:
                    await asyncio.wait({subscription.closed}, timeout=PING_INTERVAL_S)
                    if subscription.closed.done():
                        raise RedisConnectionError("subscription connection lost")
                    if not await subscription.ping(PING_INTERVAL_S):
                        raise RedisConnectionError("subscription stopped answering pings")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure: stay alive, report, resubscribe
                self._listening, self._listen_error = False, repr(e)
                if first:
                    self._first_error = f"{type(e).__name__}: {e}"  # its repr hides the reason
                    if isinstance(e, AuthenticationError):
                        self._settled.set()
                log.warning("event listener lost Redis (%r); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RESUBSCRIBE_BACKOFF_MAX_S)
            finally:
                self._listening = False
                subscription.close()

    async def _deliver_forever(self) -> None:
        """Hands received events to the node one at a time, in the order they came."""
        while True:
            await self._deliver(await self._inbox.get())

    async def _deliver(self, raw: str) -> None:
        if raw.startswith(self._own_prefix):
            return  # this node's own event, not decoded: half of what a pair of nodes hears
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("dropped a malformed event")
            return
        if envelope.get("node") == self.node_id or self._on_event is None:
            return
        try:
            await self._on_event(envelope["event"])
        except Exception:
            log.exception("event handler failed")

    # --- events ------------------------------------------------------------------------------

    async def publish(self, event: Json) -> None:
        envelope = {"node": self.node_id, "event": event}
        await self._lane.execute("PUBLISH", EVENTS_CHANNEL, orjson.dumps(envelope))
