"""The Redis store's durable records: calls, visits, open calls, handling times and the
callback queue.

- ``m:call:{id}`` hash ``{v, site, data}``, versioned by a compare-and-set script;
  ``m:calls:{site}`` sorted set of call ids by update time.
- ``m:visit:{site}:{visitor}``: the agent who last served a visitor (kept 400 days);
  ``m:open:{site}:{visitor}``: the visitor's live call (kept a day).
- ``m:queue:{site}`` sorted set (the callback queue) and ``m:handle:{site}`` list.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from gateway.store.base import HANDLE_TIMES_KEPT, CallRow
from gateway.store.redis_common import RedisParts, reservation_key
from gateway.store.redis_common import pairs as _pairs

VISIT_TTL_S = 400 * 24 * 3600

# KEYS: call hash, site index. ARGV: version, site, data, updated_at, call id.
_PUT_CALL = """
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if current ~= tonumber(ARGV[1]) - 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'site', ARGV[2], 'data', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""

# KEYS: call hash, site index, the agent's reservation. ARGV: as _PUT_CALL, then ttl ms.
# -1: the reservation is not the call's. The version first: a write from a stale copy is
# retried on the newest call, which may say why better than the reservation can.
_PUT_CALL_HOLDING = """
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if current ~= tonumber(ARGV[1]) - 1 then return 0 end
if redis.call('GET', KEYS[3]) ~= ARGV[5] then return -1 end
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'site', ARGV[2], 'data', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""

_DELETE_CALL = """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


# KEYS: the visitor's open call. The call's key is made here, from the id found: the same
# key as ``_call_keys``'s first (one Redis, never a cluster, holds them).
_OPEN_CALL_ROW = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
local row = redis.call('HMGET', 'm:call:' .. id, 'v', 'site', 'data')
return {id, row[1], row[2], row[3]}
"""

_REPLACE_EXPERIMENT = """
local found = redis.call('GET', KEYS[1])
if (found or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def _call_keys(row: CallRow) -> list[str]:
    """The call's hash and its site's index of calls."""
    return [f"m:call:{row.call_id}", f"m:calls:{row.site}"]


class RedisRecords(RedisParts):
    async def put_call(self, row: CallRow) -> bool:
        ok = await self._lane.run_script(_PUT_CALL, _call_keys(row), self._call_args(row))
        return bool(ok)

    async def put_call_holding(self, row: CallRow, agent_id: str, ttl_s: float) -> bool | None:
        done = await self._lane.run_script(
            _PUT_CALL_HOLDING,
            [*_call_keys(row), reservation_key(row.site, agent_id)],
            [*self._call_args(row), max(1, int(ttl_s * 1000))],
        )
        return None if done < 0 else bool(done)

    def _call_args(self, row: CallRow) -> list[str | int | float | bytes]:
        """``_PUT_CALL``'s arguments (``_PUT_CALL_HOLDING``'s first)."""
        return [row.version, row.site, orjson.dumps(row.data), self._clock(), row.call_id]

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

    async def calls_unchanged_since(self, site: str, before: float, limit: int) -> list[CallRow]:
        ids = await self._lane.execute(
            "ZRANGEBYSCORE", f"m:calls:{site}", "-inf", f"({before}", "LIMIT", 0, limit
        )
        rows = []
        for call_id in ids or ():
            row = await self.get_call(call_id)
            if row is not None:
                rows.append(row)
        return rows

    async def delete_call(self, row: CallRow) -> bool:
        deleted = await self._lane.run_script(
            _DELETE_CALL,
            [f"m:call:{row.call_id}", f"m:calls:{row.site}"],
            [row.version, row.call_id],
        )
        return bool(deleted)

    async def record_served(self, site: str, visitor_id: str, agent_id: str) -> None:
        await self._lane.execute("SET", f"m:visit:{site}:{visitor_id}", agent_id, "EX", VISIT_TTL_S)

    async def set_open_call(self, site: str, visitor_id: str, call_id: str) -> None:
        await self._lane.execute("SET", f"m:open:{site}:{visitor_id}", call_id, "EX", 24 * 3600)

    async def open_call(self, site: str, visitor_id: str) -> str | None:
        found: str | None = await self._lane.execute("GET", f"m:open:{site}:{visitor_id}")
        return found

    async def open_call_row(self, site: str, visitor_id: str) -> CallRow | None:
        found = await self._lane.run_script(_OPEN_CALL_ROW, [f"m:open:{site}:{visitor_id}"], [])
        if not found or found[1] is None:
            return None
        call_id, version, call_site, data = found
        return CallRow(call_id, call_site, int(version), orjson.loads(data))

    async def last_agent(self, site: str, visitor_id: str) -> str | None:
        found: str | None = await self._lane.execute("GET", f"m:visit:{site}:{visitor_id}")
        return found

    # --- the callback queue and handling times -------------------------------------------

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

    async def queue_count_before(self, site: str, score: float) -> int:
        count: int = await self._redis.zcount(f"m:queue:{site}", "-inf", f"({score!r}")  # type: ignore[assignment]
        return count

    async def queue_head(self, site: str, limit: int) -> list[str]:
        head: list[str] = await self._redis.zrange(f"m:queue:{site}", 0, limit - 1)  # type: ignore[assignment]
        return head

    async def replace_experiment(self, site: str, expected: str | None, data: str) -> bool:
        done = await self._lane.run_script(
            _REPLACE_EXPERIMENT, [f"m:experiment:{site}"], [expected or "", data]
        )
        return bool(done)

    async def experiment(self, site: str) -> str | None:
        found: str | None = await self._redis.get(f"m:experiment:{site}")  # type: ignore[assignment]
        return found

    async def set_text_opt_out(self, site: str, number: str, opted_out: bool) -> None:
        key = f"m:optout:{site}"
        if opted_out:
            await self._redis.sadd(key, number)  # type: ignore[misc]
        else:
            await self._redis.srem(key, number)  # type: ignore[misc]

    async def text_opted_out(self, site: str, number: str) -> bool:
        found = await self._redis.sismember(f"m:optout:{site}", number)  # type: ignore[misc]
        return bool(found)

    async def set_survey_asked(
        self, site: str, number: str, call_id: str, now: float, ttl_s: float
    ) -> None:
        # The deadline in the value too: the store's clock and the nodes' may differ.
        value = f"{call_id}|{now + ttl_s!r}"
        await self._redis.set(f"m:asked:{site}:{number}", value, px=max(1, int(ttl_s * 1000)))

    async def survey_asked(self, site: str, number: str, now: float) -> str | None:
        found: str | None = await self._redis.get(f"m:asked:{site}:{number}")  # type: ignore[assignment]
        if found is None:
            return None
        call_id, _, until = found.partition("|")
        return call_id if float(until) > now else None

    async def clear_survey_asked(self, site: str, number: str, call_id: str) -> None:
        key = f"m:asked:{site}:{number}"
        async with self._redis.pipeline(transaction=True) as pipe:
            # Only if still asked about this call: not one asked about since.
            await pipe.watch(key)
            found: str | None = await pipe.get(key)  # type: ignore[assignment]
            if found is not None and found.partition("|")[0] == call_id:
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.delete(key)
                await pipe.execute()

    async def add_to_tally(self, site: str, subjects: Sequence[str], group: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for subject in subjects:
                pipe.hincrby(f"m:nps:{site}", f"{subject}|{group}", 1)
            await pipe.execute()

    async def tallies(self, site: str) -> dict[str, dict[str, int]]:
        raw: dict[str, str] = await self._redis.hgetall(f"m:nps:{site}")  # type: ignore[misc,assignment]
        found: dict[str, dict[str, int]] = {}
        for field, count in raw.items():
            subject, _, group = field.rpartition("|")
            found.setdefault(subject, {})[group] = int(count)
        return found

    async def record_handle_time(self, site: str, seconds: float) -> None:
        key = f"m:handle:{site}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, repr(float(seconds)))
            pipe.ltrim(key, 0, HANDLE_TIMES_KEPT - 1)
            await pipe.execute()

    async def handle_times(self, site: str) -> list[float]:
        found: list[str] = await self._redis.lrange(f"m:handle:{site}", 0, HANDLE_TIMES_KEPT - 1)  # type: ignore[assignment]
        return [float(x) for x in found]
