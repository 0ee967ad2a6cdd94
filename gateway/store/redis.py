"""The many-node store: every node shares presence, calls and events through one Redis.

Layout (all keys under ``m:``):
- ``m:dev:{site}:{agent}`` hash: device id -> device JSON, plus ``~status`` and ``~call``.
- ``m:lapse`` sorted set: ``{site}\\n{agent}\\n{device}`` scored by lease expiry. Lapses are
  claimed by a Lua script, so each is reported by exactly one node.
- ``m:call:{id}`` hash ``{v, site, data}``, versioned by a compare-and-set script;
  ``m:calls:{site}`` sorted set of call ids by update time.
- ``m:visit:{site}:{visitor}``: the agent who last served a visitor (kept 400 days).
- ``m:q:{key}``, ``m:slots:{key}`` sorted sets (sliding-window quotas, leased slots),
  ``m:count:{key}``, ``m:once:{key}``, ``m:queue:{site}`` and ``m:handle:{site}``: the
  durable coordination of PSTN callbacks (docs/ARCHITECTURE.md section 3).
- ``m:events`` pub/sub channel for node events, each tagged with its node id so the sender
  skips its own echo (it handled the event before publishing, as python-socketio does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.core.model import Device, PresenceRecord, PresenceStatus
from gateway.ops.tasks import TaskGroup
from gateway.store.base import (
    CALL_FIELD,
    HANDLE_TIMES_KEPT,
    REV_FIELD,
    STATUS_FIELD,
    CallRow,
    DeviceRef,
    EventHandler,
    Expectation,
    Json,
    Quota,
    ResyncHandler,
    StoreHealth,
    encode_device,
    encode_status,
    failures_become_unavailable,
    record_from_fields,
)
from gateway.store.redis_lane import RedisLane, RedisSubscription
from gateway.store.redis_url import RedisTarget, redis_target

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "m:events"
PING_INTERVAL_S = 5.0
LAPSE_KEY = "m:lapse"
VISIT_TTL_S = 400 * 24 * 3600

# KEYS: device hash, lapse zset. ARGV: device id, device json, expires_at, lapse member.
_PUT_DEVICE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('HINCRBY', KEYS[1], '~rev', 1)
return redis.call('HGETALL', KEYS[1])
"""

# The one-round-trip presence change (Store.put_device_if).
# KEYS: device hash, lapse zset. ARGV: device id, device json, expires_at, lapse member,
# expected rev, now, expected live ids (comma-joined), status json or "", channel,
# the event envelope up to its devices (an unterminated JSON object).
_PUT_DEVICE_IF = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
local rev = redis.call('HINCRBY', KEYS[1], '~rev', 1)
local flat = redis.call('HGETALL', KEYS[1])
if rev ~= tonumber(ARGV[5]) then return {0, flat} end
local now = tonumber(ARGV[6])
local ids, live, devices = {}, {}, {}
for i = 1, #flat, 2 do
  if string.sub(flat[i], 1, 1) ~= '~' then
    local d = cjson.decode(flat[i + 1])
    devices[flat[i]] = d
    table.insert(ids, flat[i])
    if d['state'] ~= 'offline' and d['expires_at'] > now then table.insert(live, flat[i]) end
  end
end
table.sort(live)
if table.concat(live, ',') ~= ARGV[7] then return {0, flat} end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], '~status', ARGV[8])
  flat = redis.call('HGETALL', KEYS[1])
end
table.sort(ids)
local rows = {}
for _, id in ipairs(ids) do
  local d = devices[id]
  table.insert(rows, cjson.encode({id, d['kind'], d['state'], d['priority'], d['last_seen'],
    d['expires_at']}))
end
redis.call('PUBLISH', ARGV[9],
  ARGV[10] .. ',"devices":[' .. table.concat(rows, ',') .. '],"rev":' .. rev .. '}}')
return {1, flat}
"""

# KEYS: device hash, lapse zset. ARGV: device id, lapse member.
_REMOVE_DEVICE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[1], '~rev', 1)
return redis.call('HGETALL', KEYS[1])
"""

# Renew leases, each only if its device still exists, so a removal is never undone.
# KEYS: lapse zset. ARGV: last_seen, expires_at, then per device: hash key, device id, member.
# Returns the (0-based) positions of the devices that were gone.
_TOUCH_DEVICES = """
local last_seen, expires_at = tonumber(ARGV[1]), tonumber(ARGV[2])
local gone = {}
for i = 3, #ARGV, 3 do
  local raw = redis.call('HGET', ARGV[i], ARGV[i + 1])
  if raw then
    local d = cjson.decode(raw)
    d['last_seen'] = last_seen
    d['expires_at'] = expires_at
    redis.call('HSET', ARGV[i], ARGV[i + 1], cjson.encode(d))
    redis.call('ZADD', KEYS[1], expires_at, ARGV[i + 2])
  else
    table.insert(gone, (i - 3) / 3)
  end
end
return gone
"""

# KEYS: lapse zset. ARGV: now, batch size. Returns the "site\\nagent" pairs it removed.
_CLAIM_LAPSED = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local site, agent, device = string.match(member, '^([^\\n]*)\\n([^\\n]*)\\n(.*)$')
  if site then
    redis.call('HDEL', 'm:dev:' .. site .. ':' .. agent, device)
    redis.call('HINCRBY', 'm:dev:' .. site .. ':' .. agent, '~rev', 1)
    table.insert(out, site .. '\\n' .. agent)
  end
end
return out
"""

# KEYS: call hash, site index. ARGV: version, site, data, updated_at, call id.
_PUT_CALL = """
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if current ~= tonumber(ARGV[1]) - 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'site', ARGV[2], 'data', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""


# The first free agent of a list, reserved (Store.reserve_first).
# KEYS: one reservation per candidate, best first. ARGV: call id, ttl ms.
_RESERVE_FIRST = """
for i = 1, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then return i - 1 end
end
return -1
"""

# KEYS: device hash. ARGV: call field, rev field, call id or "" to clear it.
_SET_ACTIVE_CALL = """
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: reservation. ARGV: call id.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: reservation. ARGV: call id, ttl ms.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: timers zset. ARGV: now, lease until, limit.
_CLAIM_TIMERS = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id) end
return due
"""

# KEYS: counter. ARGV: ttl ms, limit.
_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n > tonumber(ARGV[2]) then return 0 end
return 1
"""

# Sliding-window quotas, all or nothing (Store.take_quotas). KEYS: one zset per quota.
# ARGV: now, then per quota: cutoff (exclusive, "(" prefixed), limit, member, key ttl ms.
_TAKE_QUOTAS = """
for i = 1, #KEYS do
  local a = 1 + (i - 1) * 4
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[a + 1])
  if not redis.call('ZSCORE', KEYS[i], ARGV[a + 3])
      and redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[a + 2]) then
    return i - 1
  end
end
for i = 1, #KEYS do
  local a = 1 + (i - 1) * 4
  redis.call('ZADD', KEYS[i], ARGV[1], ARGV[a + 3])
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[a + 4]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[a + 4])
  end
end
return -1
"""

# KEYS: slots zset. ARGV: holder, limit, now, lease end, key ttl ms.
_ACQUIRE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
    and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return 1
"""

# KEYS: counter. ARGV: delta, ttl ms. A read (delta 0) creates nothing; the first write
# starts the expiry, later ones keep it.
_ADD_TO_COUNTER = """
if ARGV[1] == '0' then return redis.call('GET', KEYS[1]) or '0' end
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n
"""

TIMERS_KEY = "m:timers"


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


def _device_key(site: str, agent_id: str) -> str:
    return f"m:dev:{site}:{agent_id}"


def _lapse_member(site: str, agent_id: str, device_id: str) -> str:
    return f"{site}\n{agent_id}\n{device_id}"


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


# Redis unreachable, loading, timing out, read-only after a failover, out of memory (every
# RedisError), or the socket failing under it.
@failures_become_unavailable((RedisError, OSError, TimeoutError))
class RedisStore:
    def __init__(self, url: str | RedisTarget, node_id: str) -> None:
        self.node_id = node_id
        self._target = redis_target(url)
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=connection_pool(self._target))
        self._put_device = self._redis.register_script(_PUT_DEVICE)
        self._claim_lapsed = self._redis.register_script(_CLAIM_LAPSED)
        self._take_quotas = self._redis.register_script(_TAKE_QUOTAS)
        self._acquire_slot = self._redis.register_script(_ACQUIRE_SLOT)
        self._add_to_counter = self._redis.register_script(_ADD_TO_COUNTER)
        self._on_event: EventHandler | None = None
        self._on_resync: ResyncHandler | None = None
        self._tasks = TaskGroup(f"redis-store-{node_id}")
        self._lane = RedisLane(self._target)
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
                backoff = min(backoff * 2, 5.0)
            finally:
                self._listening = False
                subscription.close()

    async def _deliver_forever(self) -> None:
        """Hands received events to the node one at a time, in the order they came."""
        while True:
            await self._deliver(await self._inbox.get())

    async def _deliver(self, raw: str) -> None:
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

    # --- presence ----------------------------------------------------------------------------

    async def put_device(self, site: str, agent_id: str, device: Device) -> PresenceRecord:
        flat = await self._put_device(
            keys=[_device_key(site, agent_id), LAPSE_KEY],
            args=[
                device.device_id,
                encode_device(device),
                device.expires_at,
                _lapse_member(site, agent_id, device.device_id),
            ],
        )
        return record_from_fields(_pairs(flat))

    async def put_device_if(
        self, site: str, agent_id: str, device: Device, expect: Expectation
    ) -> tuple[bool, PresenceRecord]:
        envelope = json.dumps({"node": self.node_id, "event": expect.event}, separators=(",", ":"))
        status = encode_status(*expect.status) if expect.status is not None else ""
        done, flat = await self._lane.run_script(
            _PUT_DEVICE_IF,
            [_device_key(site, agent_id), LAPSE_KEY],
            [
                device.device_id,
                encode_device(device),
                device.expires_at,
                _lapse_member(site, agent_id, device.device_id),
                expect.rev,
                expect.now,
                ",".join(expect.live),
                status,
                EVENTS_CHANNEL,
                envelope[:-2],  # reopened: the script appends devices and rev
            ],
        )
        return bool(done), record_from_fields(_pairs(flat))

    async def remove_device(self, site: str, agent_id: str, device_id: str) -> PresenceRecord:
        flat = await self._lane.run_script(
            _REMOVE_DEVICE,
            [_device_key(site, agent_id), LAPSE_KEY],
            [device_id, _lapse_member(site, agent_id, device_id)],
        )
        return record_from_fields(_pairs(flat))

    async def touch_devices(
        self, refs: Sequence[DeviceRef], last_seen: float, expires_at: float
    ) -> list[DeviceRef]:
        # One script for many devices: a node renews thousands of leases, and one command
        # each cost the node and Redis far more than the renewals themselves.
        gone: list[DeviceRef] = []
        for start in range(0, len(refs), 500):
            args: list[str | float] = [last_seen, expires_at]
            for ref in refs[start : start + 500]:
                args += (
                    _device_key(ref.site, ref.agent_id),
                    ref.device_id,
                    _lapse_member(ref.site, ref.agent_id, ref.device_id),
                )
            missing = await self._lane.run_script(_TOUCH_DEVICES, [LAPSE_KEY], args)
            gone += (refs[start + int(i)] for i in missing)
        return gone

    async def get_presence(self, site: str, agent_id: str) -> PresenceRecord:
        fields: dict[str, str] = await self._redis.hgetall(_device_key(site, agent_id))  # type: ignore[assignment]
        return record_from_fields(fields)

    async def get_site_presence(
        self, site: str, agent_ids: Sequence[str]
    ) -> dict[str, PresenceRecord]:
        records: dict[str, PresenceRecord] = {}
        batch = 1000
        for start in range(0, len(agent_ids), batch):
            chunk = agent_ids[start : start + batch]
            async with self._redis.pipeline(transaction=False) as pipe:
                for agent_id in chunk:
                    pipe.hgetall(_device_key(site, agent_id))
                results = await pipe.execute()
            for agent_id, fields in zip(chunk, results, strict=True):
                records[agent_id] = record_from_fields(fields)
        return records

    async def save_status(
        self, site: str, agent_id: str, status: PresenceStatus, since: float, idle_since: float
    ) -> None:
        await self._lane.execute(
            "HSET",
            _device_key(site, agent_id),
            STATUS_FIELD,
            encode_status(status, since, idle_since),
        )

    async def set_active_call(
        self, site: str, agent_id: str, call_id: str | None
    ) -> PresenceRecord:
        flat = await self._lane.run_script(
            _SET_ACTIVE_CALL, [_device_key(site, agent_id)], [CALL_FIELD, REV_FIELD, call_id or ""]
        )
        return record_from_fields(_pairs(flat))

    async def claim_lapsed(self, now: float) -> list[tuple[str, str]]:
        claimed: list[str] = await self._claim_lapsed(keys=[LAPSE_KEY], args=[now, 500])
        pairs: list[tuple[str, str]] = []
        for item in claimed:
            site, agent_id = item.split("\n", 1)
            if (site, agent_id) not in pairs:
                pairs.append((site, agent_id))
        return pairs

    # --- events ------------------------------------------------------------------------------

    async def publish(self, event: Json) -> None:
        envelope = {"node": self.node_id, "event": event}
        await self._lane.execute("PUBLISH", EVENTS_CHANNEL, orjson.dumps(envelope))

    # --- durable records ---------------------------------------------------------------------

    async def put_call(self, row: CallRow) -> bool:
        ok = await self._lane.run_script(
            _PUT_CALL,
            [f"m:call:{row.call_id}", f"m:calls:{row.site}"],
            [
                row.version,
                row.site,
                orjson.dumps(row.data),
                time.time(),
                row.call_id,
            ],
        )
        return bool(ok)

    async def get_call(self, call_id: str) -> CallRow | None:
        found = _pairs(await self._lane.execute("HGETALL", f"m:call:{call_id}"))
        if not found:
            return None
        return CallRow(call_id, found["site"], int(found["v"]), orjson.loads(found["data"]))

    async def list_calls(self, site: str, limit: int = 100) -> list[CallRow]:
        ids: list[str] = await self._redis.zrevrange(f"m:calls:{site}", 0, limit - 1)  # type: ignore[assignment]
        rows = []
        for call_id in ids:
            row = await self.get_call(call_id)
            if row is not None:
                rows.append(row)
        return rows

    async def record_served(self, site: str, visitor_id: str, agent_id: str) -> None:
        await self._lane.execute("SET", f"m:visit:{site}:{visitor_id}", agent_id, "EX", VISIT_TTL_S)

    async def set_open_call(self, site: str, visitor_id: str, call_id: str) -> None:
        await self._lane.execute("SET", f"m:open:{site}:{visitor_id}", call_id, "EX", 24 * 3600)

    async def open_call(self, site: str, visitor_id: str) -> str | None:
        found: str | None = await self._lane.execute("GET", f"m:open:{site}:{visitor_id}")
        return found

    async def last_agent(self, site: str, visitor_id: str) -> str | None:
        found: str | None = await self._lane.execute("GET", f"m:visit:{site}:{visitor_id}")
        return found

    # --- coordination ------------------------------------------------------------------------

    async def reserve_agent(self, site: str, agent_id: str, call_id: str, ttl_s: float) -> bool:
        done = await self._lane.execute(
            "SET", f"m:resv:{site}:{agent_id}", call_id, "NX", "PX", max(1, int(ttl_s * 1000))
        )
        return bool(done)

    async def reserve_first(
        self, site: str, agent_ids: Sequence[str], call_id: str, ttl_s: float
    ) -> str | None:
        if not agent_ids:
            return None
        index = await self._lane.run_script(
            _RESERVE_FIRST,
            [f"m:resv:{site}:{agent_id}" for agent_id in agent_ids],
            [call_id, max(1, int(ttl_s * 1000))],
        )
        return None if index < 0 else agent_ids[index]

    async def extend_reservation(
        self, site: str, agent_id: str, call_id: str, ttl_s: float
    ) -> bool:
        done = await self._lane.run_script(
            _EXTEND, [f"m:resv:{site}:{agent_id}"], [call_id, max(1, int(ttl_s * 1000))]
        )
        return bool(done)

    async def release_agent(self, site: str, agent_id: str, call_id: str) -> None:
        await self._lane.run_script(_RELEASE, [f"m:resv:{site}:{agent_id}"], [call_id])

    async def schedule_timer(self, timer_id: str, due: float) -> None:
        await self._lane.execute("ZADD", TIMERS_KEY, repr(float(due)), timer_id)

    async def claim_timers(self, now: float, lease_s: float, limit: int = 100) -> list[str]:
        claimed: list[str] = await self._lane.run_script(
            _CLAIM_TIMERS, [TIMERS_KEY], [now, now + lease_s, limit]
        )
        return claimed

    async def finish_timer(self, timer_id: str) -> None:
        await self._lane.execute("ZREM", TIMERS_KEY, timer_id)

    async def hit(self, key: str, window_s: int, limit: int, now: float) -> bool:
        window = int(now // window_s)
        allowed = await self._lane.run_script(
            _HIT, [f"m:rl:{key}:{window_s}:{window}"], [window_s * 1000 + 1000, limit]
        )
        return bool(allowed)

    # --- durable coordination ----------------------------------------------------------------

    async def take_quotas(self, quotas: Sequence[Quota], event_id: str, now: float) -> int | None:
        if not quotas:
            return None
        args: list[str | float | int] = [now]
        for q in quotas:
            member = q.member if q.member is not None else event_id
            args += [f"({now - q.window_s!r}", q.limit, member, q.window_s * 1000 + 1000]
        full = int(await self._take_quotas(keys=[f"m:q:{q.key}" for q in quotas], args=args))
        return None if full < 0 else full

    async def acquire_slot(
        self, key: str, holder: str, limit: int, ttl_s: float, now: float
    ) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000)) + 1000
        done = await self._acquire_slot(
            keys=[f"m:slots:{key}"], args=[holder, limit, now, now + ttl_s, ttl_ms]
        )
        return bool(done)

    async def release_slot(self, key: str, holder: str) -> None:
        await self._redis.zrem(f"m:slots:{key}", holder)

    async def add_to_counter(self, key: str, delta: int, ttl_s: int) -> int:
        value = await self._add_to_counter(keys=[f"m:count:{key}"], args=[delta, ttl_s * 1000])
        return int(value)

    async def claim_once(self, key: str, ttl_s: float) -> bool:
        done = await self._redis.set(f"m:once:{key}", "1", nx=True, px=max(1, int(ttl_s * 1000)))
        return bool(done)

    async def queue_put(self, site: str, call_id: str, score: float) -> None:
        await self._redis.zadd(f"m:queue:{site}", {call_id: score})

    async def queue_remove(self, site: str, call_id: str) -> None:
        await self._redis.zrem(f"m:queue:{site}", call_id)

    async def queue_rank(self, site: str, call_id: str) -> int | None:
        # Equal scores sort by member, byte by byte: the call id breaks ties.
        rank: int | None = await self._redis.zrank(f"m:queue:{site}", call_id)  # type: ignore[assignment]
        return rank

    async def queue_ahead(self, site: str, call_id: str, limit: int) -> list[str] | None:
        rank = await self.queue_rank(site, call_id)
        if rank is None:
            return None
        if rank == 0 or limit <= 0:
            return []
        ahead: list[str] = await self._redis.zrange(f"m:queue:{site}", 0, min(rank, limit) - 1)  # type: ignore[assignment]
        return [a for a in ahead if a != call_id]

    async def queue_size(self, site: str) -> int:
        size: int = await self._redis.zcard(f"m:queue:{site}")  # type: ignore[assignment]
        return size

    async def record_handle_time(self, site: str, seconds: float) -> None:
        key = f"m:handle:{site}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, repr(float(seconds)))
            pipe.ltrim(key, 0, HANDLE_TIMES_KEPT - 1)
            await pipe.execute()

    async def handle_times(self, site: str) -> list[float]:
        found: list[str] = await self._redis.lrange(f"m:handle:{site}", 0, HANDLE_TIMES_KEPT - 1)  # type: ignore[assignment]
        return [float(x) for x in found]
