"""A lean Redis connection for the presence hot path: one pipelined connection for the
presence script, and one subscriber for node events.

Why not redis-py here: measured on these machines, a script call through redis-py's asyncio
client costs ~200 µs of CPU (pool checkout, retry and timeout wrappers, command packing);
the same call written straight to one connection and parsed by hiredis (the C parser
redis-py itself uses) costs ~50 µs. At a thousand presence changes a second that is a
sixth of a core. Everything else in the store stays on redis-py.

Redis answers a connection's commands in the order they were sent, so replies are matched
to waiters first-in, first-out, and many calls can be in flight at once (pipelining).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.redis_url import RedisTarget, redis_target

log = logging.getLogger(__name__)


def pack(*args: str | bytes | int | float) -> bytes:
    """A command in RESP, the Redis wire format, packed by hiredis in C (a third of the CPU
    of packing it in Python)."""
    return cast(bytes, hiredis.pack_command(args))  # type: ignore[arg-type]  # stub: 1-tuple


def _setup_commands(target: RedisTarget) -> list[bytes]:
    """AUTH and SELECT, as redis-py sends them on each new connection."""
    commands = []
    if target.password:
        if target.username:
            commands.append(pack("AUTH", target.username, target.password))
        else:
            commands.append(pack("AUTH", target.password))
    if target.db:
        commands.append(pack("SELECT", target.db))
    return commands


async def _open(
    target: RedisTarget, factory: Callable[[], _Protocol], timeout_s: float
) -> _Protocol:
    """A connection to ``target``, over TLS or a unix socket when it says so."""
    loop = asyncio.get_running_loop()
    try:
        if target.path:
            connecting = loop.create_unix_connection(factory, target.path)
        else:
            connecting = loop.create_connection(
                factory, target.host, target.port, ssl=target.ssl_context()
            )
        _, protocol = await asyncio.wait_for(connecting, timeout_s)
    except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
        raise RedisConnectionError(f"cannot reach Redis at {target}: {e!r}") from None
    return protocol


class _Protocol(asyncio.Protocol):
    def __init__(self, on_reply: Callable[[Any], None], on_lost: Callable[[], None]) -> None:
        self._reader = hiredis.Reader(encoding="utf-8")
        self._on_reply = on_reply
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._on_lost()


class RedisLane:
    """Pipelined commands over one connection, reconnecting lazily after a failure.

    Commands issued in the same turn of the event loop go out in one write (one system call
    instead of one each), and one watchdog timer, not one per command, fails the oldest
    command unanswered after ``timeout_s``."""

    def __init__(self, url: str | RedisTarget, timeout_s: float = 5.0) -> None:
        self._target = redis_target(url)
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        # Each waiter with the loop time by which its reply is due, in the order sent.
        self._waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Lock | None = None
        self._scripts: dict[str, str] = {}
        # The loop the connection belongs to, kept: on 3.11 every asyncio.get_running_loop()
        # is a getpid() system call, and this is asked for on every command.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connection(self) -> _Protocol:
        if self._protocol is not None:
            return self._protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is None:
                protocol = await _open(self._target, self._new_protocol, self._timeout_s)
                if protocol.gone:
                    # Closed before it was ours (Redis shutting down as we connected): its
                    # loss was ignored, and kept, it would hold every command until the
                    # watchdog.
                    raise RedisConnectionError("Redis closed the connection at once")
                self._protocol = protocol
                self._loop = asyncio.get_running_loop()
                # AUTH / SELECT, queued before anything else can be (no await in between).
                setup = _setup_commands(self._target)
                answers = [self._queue(protocol, command) for command in setup]
                try:
                    for answer in answers:
                        await answer
                except ResponseError as e:
                    # A wrong password or db: every command after would fail the same way.
                    self._drop(protocol)
                    raise AuthenticationError(f"Redis at {self._target} refused: {e}") from None
        return self._protocol

    def _new_protocol(self) -> _Protocol:
        def lost() -> None:
            if self._protocol is protocol:  # not a connection given up already
                self._lost()

        protocol = _Protocol(self._reply, lost)
        return protocol

    def _reply(self, reply: Any) -> None:
        if self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                if isinstance(reply, hiredis.ReplyError):
                    waiter.set_exception(ResponseError(str(reply)))
                else:
                    waiter.set_result(reply)

    def _lost(self) -> None:
        self._protocol = None
        self._outgoing.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter, _ in waiters:
            if not waiter.done():
                waiter.set_exception(RedisConnectionError("connection to Redis lost"))

    def _flush(self) -> None:
        self._flush_scheduled = False
        protocol = self._protocol
        if not self._outgoing or protocol is None or protocol.transport is None:
            return
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        protocol.transport.write(data)

    def _watch(self) -> None:
        """The oldest command unanswered past its time fails, and the connection is dropped:
        a reply may still come and would be matched to the wrong waiter, so start over."""
        self._watchdog = None
        if not self._waiters:
            return
        loop = asyncio.get_running_loop()
        waiter, due = self._waiters[0]
        if due > loop.time():
            self._watchdog = loop.call_at(due, self._watch)
            return
        if not waiter.done():
            waiter.set_exception(RedisTimeoutError("Redis did not answer in time"))
        self._drop(self._protocol)  # the next command starts on a new connection

    def _drop(self, protocol: _Protocol | None) -> None:
        self._lost()
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    def _queue(self, protocol: _Protocol, command: bytes) -> asyncio.Future[Any]:
        assert protocol.transport is not None
        loop = self._loop or asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiters.append((waiter, loop.time() + self._timeout_s))
        self._outgoing.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout_s, self._watch)
        return waiter

    @property
    def in_flight(self) -> int:
        """Commands sent and not answered yet: how far behind Redis (or this node's reading
        of its replies) is."""
        return len(self._waiters)

    def send(self, *args: str | bytes | int | float) -> asyncio.Future[Any] | None:
        """Queue a command without waiting: its reply's future, or None while not connected
        (``execute`` connects)."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return None
        return self._queue(protocol, pack(*args))

    def amend_last(self, waiter: asyncio.Future[Any], *args: str | bytes | int | float) -> bool:
        """Replace the command queued last with ``args``, when it is ``waiter``'s and is not
        written yet; False otherwise (a command was queued after it, or it went out). Its
        reply still goes to ``waiter``. For a publish that takes in the messages published
        right after it: whatever was queued after those would be queued after it too."""
        if not self._outgoing or self._waiters[-1][0] is not waiter:
            return False
        self._outgoing[-1] = pack(*args)
        return True

    async def execute(self, *args: str | bytes | int | float) -> Any:
        protocol = self._protocol or await self._connection()
        return await self._queue(protocol, pack(*args))

    async def run_script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script the first time or after Redis forgot it."""
        sha = self._scripts.get(script)
        if sha is not None:
            try:
                return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
            except ResponseError as e:
                if not str(e).startswith("NOSCRIPT"):
                    raise
        sha = str(await self.execute("SCRIPT", "LOAD", script))
        self._scripts[script] = sha
        return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._lost()


class RedisSubscription:
    """One SUBSCRIBE connection: messages go to ``on_message`` in order; ``closed`` resolves
    when the connection is gone (or stops answering pings), for the caller to resubscribe."""

    def __init__(self, on_message: Callable[[str], None]) -> None:
        self._on_message = on_message
        self._protocol: _Protocol | None = None
        self.closed: asyncio.Future[None] | None = None
        self._pong = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._refused = ""

    async def open(self, url: str | RedisTarget, channel: str, timeout_s: float = 5.0) -> None:
        target = redis_target(url)
        self.closed = asyncio.get_running_loop().create_future()
        protocol = await _open(target, lambda: _Protocol(self._reply, self._lost), timeout_s)
        self._protocol = protocol
        assert protocol.transport is not None
        protocol.transport.write(b"".join(_setup_commands(target)) + pack("SUBSCRIBE", channel))
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout_s)
        except TimeoutError:
            self.close()
            raise RedisTimeoutError("SUBSCRIBE was not confirmed") from None
        if self.closed.done():
            if self._refused:
                raise AuthenticationError(f"Redis at {target} refused: {self._refused}")
            raise RedisConnectionError("SUBSCRIBE was refused or the connection lost")

    def _reply(self, reply: Any) -> None:
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == "message":
                self._on_message(reply[2])
            elif kind == "subscribe":
                self._subscribed.set()
            elif kind == "pong":
                self._pong.set()
        elif isinstance(reply, hiredis.ReplyError):
            log.warning("Redis subscription error: %s", reply)
            # The first: a refused AUTH makes SUBSCRIBE's NOAUTH follow in the same read.
            self._refused = self._refused or str(reply)
            self.close()

    def _lost(self) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)
        self._subscribed.set()  # an open() still waiting fails now, not after its timeout

    async def ping(self, timeout_s: float) -> bool:
        """A subscribed connection answers PING too; no answer means a dead link."""
        if self._protocol is None or self._protocol.transport is None:
            return False
        self._pong.clear()
        self._protocol.transport.write(pack("PING"))
        try:
            await asyncio.wait_for(self._pong.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._lost()
