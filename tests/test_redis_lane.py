"""The lean Redis connection of the presence hot path, against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from conftest import RedisServer, eventually
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.redis_lane import RedisLane, RedisSubscription, pack


def test_pack_is_resp() -> None:
    assert pack("SET", "k", 1) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n"
    assert pack(b"\x00\xff") == b"*1\r\n$2\r\n\x00\xff\r\n"


async def test_pipelined_replies_reach_the_right_callers(redis_url: str) -> None:
    lane = RedisLane(redis_url)
    try:
        results = await asyncio.gather(
            *(lane.execute("INCRBY", f"k{i % 7}", i) for i in range(500))
        )
        totals: dict[int, int] = {}
        for i, value in enumerate(results):
            totals[i % 7] = totals.get(i % 7, 0) + i
            assert value == totals[i % 7], "each reply belongs to the command sent in its place"
        with pytest.raises(ResponseError):
            await lane.execute("INCRBY", "k0", "not-a-number")
        assert await lane.execute("GET", "k1") == str(totals[1]), "still in step after an error"
    finally:
        await lane.close()


async def test_sent_commands_go_out_in_order_without_waiting(redis_url: str) -> None:
    lane = RedisLane(redis_url)
    try:
        assert lane.send("PING") is None, "not connected yet: the caller must execute"
        assert await lane.execute("DEL", "order") == 0
        sent = [lane.send("RPUSH", "order", i) for i in range(20)]
        assert all(f is not None for f in sent)
        assert await lane.execute("LRANGE", "order", 0, -1) == [str(i) for i in range(20)]
        assert [await f for f in sent if f is not None] == list(range(1, 21))
    finally:
        await lane.close()


async def test_the_last_command_may_be_amended_until_it_is_written_or_followed(
    redis_url: str,
) -> None:
    lane = RedisLane(redis_url)
    try:
        assert await lane.execute("DEL", "amended") == 0
        first = lane.send("RPUSH", "amended", "a")
        assert first is not None
        assert lane.amend_last(first, "RPUSH", "amended", "a", "b"), "last, and not written"
        second = lane.send("RPUSH", "amended", "c")
        assert second is not None
        assert not lane.amend_last(first, "RPUSH", "amended", "x"), "a command follows it"
        assert (await first, await second) == (2, 3), "each reply to its own caller"
        assert not lane.amend_last(second, "RPUSH", "amended", "y"), "written already"
        assert await lane.execute("LRANGE", "amended", 0, -1) == ["a", "b", "c"]
    finally:
        await lane.close()


async def test_an_unanswered_command_times_out_and_the_lane_starts_over(redis_url: str) -> None:
    lane = RedisLane(redis_url, timeout_s=0.3)
    try:
        assert await lane.execute("DEL", "empty") == 0
        with pytest.raises(RedisTimeoutError):
            await lane.execute("BLPOP", "empty", 5)  # Redis holds the reply back
        assert await lane.execute("PING") == "PONG", "reconnected on a fresh connection"
    finally:
        await lane.close()


async def test_scripts_survive_a_script_flush(redis_url: str) -> None:
    lane = RedisLane(redis_url)
    script = "return redis.call('SET', KEYS[1], ARGV[1])"
    try:
        assert await lane.run_script(script, ["s"], ["one"]) == "OK"
        await lane.execute("SCRIPT", "FLUSH")
        assert await lane.run_script(script, ["s"], ["two"]) == "OK", "reloaded after NOSCRIPT"
        assert await lane.execute("GET", "s") == "two"
    finally:
        await lane.close()


async def test_selects_the_database_of_the_url(redis_url: str) -> None:
    lane = RedisLane(redis_url.rsplit("/", 1)[0] + "/3")
    other = aioredis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3", decode_responses=True)
    try:
        await lane.execute("SET", "where", "db3")
        assert await other.get("where") == "db3"
    finally:
        await lane.close()
        await other.aclose()


async def test_reconnects_after_redis_restarts(redis_server: RedisServer, redis_url: str) -> None:
    lane = RedisLane(redis_url, timeout_s=2)
    try:
        await lane.execute("SET", "a", "1")
        redis_server.stop()
        with pytest.raises(RedisConnectionError):
            await lane.execute("GET", "a")
        redis_server.start()

        async def answers() -> bool:
            try:
                return bool(await lane.execute("PING") == "PONG")
            except RedisConnectionError:
                return False

        await eventually(answers)
        assert await lane.execute("GET", "a") == "1", "AOF kept the data; the lane reconnected"
    finally:
        await lane.close()


async def test_subscription_delivers_in_order_and_notices_a_dead_server(
    redis_server: RedisServer, redis_url: str
) -> None:
    got: asyncio.Queue[str] = asyncio.Queue()
    sub = RedisSubscription(got.put_nowait)
    lane = RedisLane(redis_url)
    try:
        await sub.open(redis_url, "chan")
        for i in range(50):
            await lane.execute("PUBLISH", "chan", f"m{i}")
        assert [await asyncio.wait_for(got.get(), 5) for _ in range(50)] == [
            f"m{i}" for i in range(50)
        ]
        assert await sub.ping(2)
        redis_server.stop()
        assert sub.closed is not None
        await asyncio.wait_for(sub.closed, 5)
        assert not await sub.ping(0.5)
    finally:
        sub.close()
        await lane.close()


async def test_a_connection_closed_as_it_opens_fails_at_once_not_after_the_timeout() -> None:
    """A server that hangs up straight away (Redis shutting down as the lane connects): the
    lane kept the closed connection as its own, and every command waited for the watchdog
    (seen as a node answering /readyz 200 after a Redis restart but refusing agents)."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lane = RedisLane(f"redis://127.0.0.1:{port}/0", timeout_s=2.0)
    subscription = RedisSubscription(lambda _: None)
    try:
        for _ in range(10):
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(lane.execute("PING"), 1.0)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(subscription.open(f"redis://127.0.0.1:{port}/0", "c"), 1.0)
    finally:
        subscription.close()
        await lane.close()
        server.close()
        await server.wait_closed()
