"""The Redis store's presence: devices in one hash per agent, lapses in one sorted set.

- ``m:dev:{site}:{agent}`` hash: device id -> device JSON, plus ``~status``, ``~call`` and
  ``~rev``.
- ``m:lapse`` sorted set: ``{site}\\n{agent}\\n{device}`` scored by lease expiry. Lapses are
  claimed by a Lua script, so each is reported by exactly one node.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from gateway.core.model import Device, PresenceRecord, PresenceStatus
from gateway.store.base import (
    CALL_FIELD,
    REV_FIELD,
    STATUS_FIELD,
    DeviceRef,
    Expectation,
    encode_device,
    encode_status,
    record_from_fields,
)
from gateway.store.redis_common import EVENTS_CHANNEL, RedisParts
from gateway.store.redis_common import pairs as _pairs

LAPSE_KEY = "m:lapse"

# KEYS: device hash, lapse zset. ARGV: device id, device json, expires_at, lapse member.
_PUT_DEVICE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('HINCRBY', KEYS[1], '~rev', 1)
return redis.call('HGETALL', KEYS[1])
"""

# The second half of a one-round-trip presence change (Store.put_device_if,
# Store.set_active_call_if), after the write bumped the revision to ``rev``: if the record is
# as predicted, save the status and publish the event. ARGV from ``a``: expected rev, now,
# expected live ids (comma-joined), status json or "", channel, the event envelope up to its
# devices (an unterminated JSON object).
_PUBLISH_IF_PREDICTED = """
local function publish_if_predicted(key, rev, a)
  local flat = redis.call('HGETALL', key)
  if rev ~= tonumber(ARGV[a]) then return {0, flat} end
  local now = tonumber(ARGV[a + 1])
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
  if table.concat(live, ',') ~= ARGV[a + 2] then return {0, flat} end
  if ARGV[a + 3] ~= '' then
    redis.call('HSET', key, '~status', ARGV[a + 3])
    flat = redis.call('HGETALL', key)
  end
  table.sort(ids)
  local rows = {}
  for _, id in ipairs(ids) do
    local d = devices[id]
    table.insert(rows, cjson.encode({id, d['kind'], d['state'], d['priority'], d['last_seen'],
      d['expires_at']}))
  end
  redis.call('PUBLISH', ARGV[a + 4],
    ARGV[a + 5] .. ',"devices":[' .. table.concat(rows, ',') .. '],"rev":' .. rev .. '}}')
  return {1, flat}
end
"""

# KEYS: device hash, lapse zset. ARGV: device id, device json, expires_at, lapse member, then
# _PUBLISH_IF_PREDICTED's from 5.
_PUT_DEVICE_IF = (
    _PUBLISH_IF_PREDICTED
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return publish_if_predicted(KEYS[1], redis.call('HINCRBY', KEYS[1], '~rev', 1), 5)
"""
)

# KEYS: device hash. ARGV: call id or "" to clear it, then _PUBLISH_IF_PREDICTED's from 2.
_SET_ACTIVE_CALL_IF = (
    _PUBLISH_IF_PREDICTED
    + """
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], '~call')
else
  redis.call('HSET', KEYS[1], '~call', ARGV[1])
end
return publish_if_predicted(KEYS[1], redis.call('HINCRBY', KEYS[1], '~rev', 1), 2)
"""
)

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


def _device_key(site: str, agent_id: str) -> str:
    return f"m:dev:{site}:{agent_id}"


def _lapse_member(site: str, agent_id: str, device_id: str) -> str:
    return f"{site}\n{agent_id}\n{device_id}"


class RedisPresence(RedisParts):
    def _open_presence(self) -> None:
        self._put_device = self._script(_PUT_DEVICE)
        self._claim_lapsed = self._script(_CLAIM_LAPSED)

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
        done, flat = await self._lane.run_script(
            _PUT_DEVICE_IF,
            [_device_key(site, agent_id), LAPSE_KEY],
            [
                device.device_id,
                encode_device(device),
                device.expires_at,
                _lapse_member(site, agent_id, device.device_id),
                *self._predicted(expect),
            ],
        )
        return bool(done), record_from_fields(_pairs(flat))

    async def set_active_call_if(
        self, site: str, agent_id: str, call_id: str | None, expect: Expectation
    ) -> tuple[bool, PresenceRecord]:
        done, flat = await self._lane.run_script(
            _SET_ACTIVE_CALL_IF,
            [_device_key(site, agent_id)],
            [call_id or "", *self._predicted(expect)],
        )
        return bool(done), record_from_fields(_pairs(flat))

    def _predicted(self, expect: Expectation) -> list[str | float]:
        """``_PUBLISH_IF_PREDICTED``'s arguments."""
        envelope = orjson.dumps({"node": self.node_id, "event": expect.event}).decode()
        status = encode_status(*expect.status) if expect.status is not None else ""
        return [
            expect.rev,
            expect.now,
            ",".join(expect.live),
            status,
            EVENTS_CHANNEL,
            envelope[:-2],  # reopened: the script appends devices and rev
        ]

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
