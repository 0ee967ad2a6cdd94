"""The Redis store's coordination: reservations, timers, rate-limit hits, and the durable
quotas, slots, counters and claims of PSTN callbacks (docs/ARCHITECTURE.md section 3).

- ``m:resv:{site}:{agent}``: the call holding an agent (expires).
- ``m:timers`` sorted set of timer ids by due time (or lease end once claimed).
- ``m:rl:{key}:{window_s}:{window}`` fixed-window counters.
- ``m:q:{key}``, ``m:slots:{key}`` sorted sets (sliding-window quotas, leased slots),
  ``m:count:{key}``, ``m:once:{key}``. The keys themselves are named in
  gateway/store/coordination.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.store.base import Quota
from gateway.store.coordination import NamedCoordination
from gateway.store.redis_common import RedisParts, reservation_key

TIMERS_KEY = "m:timers"

# KEYS: one reservation per candidate, best first. ARGV: call id, ttl ms.
_RESERVE_FIRST = """
for i = 1, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then return i - 1 end
end
return -1
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


class RedisCoordination(RedisParts, NamedCoordination):
    def _open_coordination(self) -> None:
        self._take_quotas = self._script(_TAKE_QUOTAS)
        self._acquire_slot = self._script(_ACQUIRE_SLOT)
        self._add_to_counter = self._script(_ADD_TO_COUNTER)

    async def reserve_agent(self, site: str, agent_id: str, call_id: str, ttl_s: float) -> bool:
        done = await self._lane.execute(
            "SET", reservation_key(site, agent_id), call_id, "NX", "PX", max(1, int(ttl_s * 1000))
        )
        return bool(done)

    async def reserve_first(
        self, site: str, agent_ids: Sequence[str], call_id: str, ttl_s: float
    ) -> str | None:
        if not agent_ids:
            return None
        index = await self._lane.run_script(
            _RESERVE_FIRST,
            [reservation_key(site, agent_id) for agent_id in agent_ids],
            [call_id, max(1, int(ttl_s * 1000))],
        )
        return None if index < 0 else agent_ids[index]

    async def extend_reservation(
        self, site: str, agent_id: str, call_id: str, ttl_s: float
    ) -> bool:
        done = await self._lane.run_script(
            _EXTEND, [reservation_key(site, agent_id)], [call_id, max(1, int(ttl_s * 1000))]
        )
        return bool(done)

    async def release_agent(self, site: str, agent_id: str, call_id: str) -> None:
        await self._lane.run_script(_RELEASE, [reservation_key(site, agent_id)], [call_id])

    async def schedule_timer(self, timer_id: str, due: float, keep: bool = False) -> None:
        if keep:
            await self._lane.execute("ZADD", TIMERS_KEY, "NX", repr(float(due)), timer_id)
        else:
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

    async def slot_holders(self, key: str, now: float) -> list[str]:
        found: list[str] = await self._lane.execute(
            "ZRANGEBYSCORE", f"m:slots:{key}", f"({now}", "+inf"
        )
        return found

    async def add_to_counter(self, key: str, delta: int, ttl_s: int) -> int:
        value = await self._add_to_counter(keys=[f"m:count:{key}"], args=[delta, ttl_s * 1000])
        return int(value)

    async def claim_once(self, key: str, ttl_s: float) -> bool:
        done = await self._redis.set(f"m:once:{key}", "1", nx=True, px=max(1, int(ttl_s * 1000)))
        return bool(done)
