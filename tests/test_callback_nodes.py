"""PSTN callbacks across several gateway nodes sharing Redis: real nodes (in this process and
in subprocesses that can be SIGKILLed), the session's private Redis, the Twilio simulator and
real socket.io agents.

Every node is given the public URL of a small load balancer (``Balancer``) that forwards each
request to a live node, as a real deployment would: Twilio's webhooks for a leg do not care
which node placed it. The balancer keeps the request target and Host, and every node checks
signatures against the public URL, so they validate on whichever node gets them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Node, SocketClient, eventually, mint, node_process, replace, start_node
from redis import asyncio as aioredis
from test_callbacks import (
    ANNA_PHONE,
    BEN_PHONE,
    ORIGIN,
    VISITOR_PHONE,
    phone_settings,
    ticket_at,
    visitor_calls,
    with_site,
)
from twilio_sim import CallRecord, TwilioSim
from yarl import URL

from gateway.core.model import Agent, CallbackPolicy
from gateway.core.phone_policy import check_number, in_quiet_hours
from gateway.edge.http import appkeys as keys
from gateway.ops.clock import Clock, ManualClock, SystemClock
from gateway.services import callback_dialing
from gateway.settings import Settings, demo_config_text

# The timer lease (gateway.services.timers.TimerLoop): a dead node's timer runs again after it.
LEASE_S = 15.0
# Simulated seconds (x0.05) a visitor stays on after answering: long enough, under load, for
# the greeting and the bridge to the agent's phone (a visitor gone sooner is never bridged).
HANG_UP_AFTER = 40
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te"}
)


# --- the pieces around the nodes ---------------------------------------------------------------


class Balancer:
    """A load balancer: forwards every request, target and headers untouched, to the next
    live backend (round robin); a backend that refuses the connection is skipped, and with
    none left the answer is 502 (Twilio does not retry a failed status callback)."""

    def __init__(self) -> None:
        self.backends: list[str] = []
        self.log: list[tuple[str, str, int]] = []
        """(backend or "" when none answered, path, status) of every request forwarded."""
        self.url = ""
        self._turn = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        # A new connection per request: a killed node leaves no stale keep-alive behind.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=30),
        )
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def webhooks(self) -> list[tuple[str, str, int]]:
        return [entry for entry in self.log if entry[1].startswith("/v1/twilio/")]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        backends = list(self.backends)
        for _ in backends:
            backend = backends[self._turn % len(backends)]
            self._turn += 1
            try:
                async with self._session.request(
                    request.method,
                    URL(backend + request.raw_path, encoded=True),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                ) as r:
                    payload = await r.read()
                    status = r.status
                    answer = {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
            except aiohttp.ClientConnectorError:
                continue  # that node is gone: the next one
            self.log.append((backend, request.path, status))
            return web.Response(status=status, body=payload, headers=answer)
        self.log.append(("", request.path, 502))
        return web.Response(status=502, text="no live node behind the balancer")


class TwilioTap:
    """The Twilio API as one node reaches it: each request is recorded and passed on to the
    simulator. With ``hold_dials``, a dial (POST Calls.json) waits at ``dial_arrived`` until
    ``forward`` is set, is then placed at the simulator, and its answer never gets back: the
    node dies without learning the call's sid."""

    def __init__(self, target: str, hold_dials: bool = False) -> None:
        self.target = target.rstrip("/")
        self.hold_dials = hold_dials
        self.requests: list[tuple[str, str]] = []
        self.dial_arrived = asyncio.Event()
        self.forward = asyncio.Event()
        self.dial_recorded = asyncio.Event()
        self.sid: str | None = None
        self.url = ""
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> TwilioTap:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release.set()
        self.forward.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def dials(self) -> list[str]:
        return [
            p for m, p in self.requests if m == "POST" and p.split("?")[0].endswith("/Calls.json")
        ]

    def lists(self) -> list[str]:
        return [
            p for m, p in self.requests if m == "GET" and p.split("?")[0].endswith("/Calls.json")
        ]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        self.requests.append((request.method, request.path_qs))
        held = self.hold_dials and request.method == "POST" and request.path.endswith("/Calls.json")
        if held:
            self.dial_arrived.set()
            await self.forward.wait()
            if self._release.is_set():
                return web.Response(status=503)  # closing before the test let it through
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type", "accept", "user-agent")
        }
        async with self._session.request(
            request.method,
            URL(self.target + request.raw_path, encoded=True),
            headers=headers,
            data=body,
        ) as r:
            payload = await r.read()
            status, content_type = r.status, r.content_type
        if held:
            self.sid = str(json.loads(payload)["sid"])
            self.dial_recorded.set()
            await self._release.wait()  # the node is SIGKILLed meanwhile
            return web.Response(status=503)
        return web.Response(status=status, body=payload, content_type=content_type)


class _Sink(asyncio.Protocol):
    def __init__(self, hole: Blackhole) -> None:
        self._hole = hole
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._hole.transports.add(transport)

    def data_received(self, data: bytes) -> None:
        self._hole.received += data
        # A dial, not the text with the ticket's link that a new callback sends first.
        if b"/Calls.json" in self._hole.received:
            self._hole.got_request.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._hole.transports.discard(self._transport)


class Blackhole:
    """A TCP server that accepts connections, reads what is sent and never answers."""

    def __init__(self) -> None:
        self.received = b""
        self.got_request = asyncio.Event()
        self.transports: set[asyncio.Transport] = set()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Blackhole:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Sink(self), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for transport in list(self.transports):
            transport.abort()
        await self._server.wait_closed()


class Cluster:
    """In-process nodes that a test may stop (gracefully) and start again mid-test."""

    def __init__(self) -> None:
        self.running: list[Node] = []

    async def start(
        self, settings: Settings, min_lead_s: float = 1.0, clock: Clock | None = None
    ) -> Node:
        node = await start_node(settings, clock)
        node.app[keys.CALLBACKS].min_lead_s = min_lead_s
        self.running.append(node)
        return node

    async def stop(self, node: Node) -> None:
        self.running.remove(node)
        await node.stop()

    async def close(self) -> None:
        for node in reversed(self.running):
            await node.stop()
        self.running.clear()


@dataclass
class ProcessNode:
    """A gateway node in its own process (``python -m gateway serve``), so it can be killed."""

    url: str
    proc: asyncio.subprocess.Process
    log: Path
    settings: Settings
    """The in-process settings it shares its secret with (for minting tokens)."""


def toml_value(value: bool | int) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


@asynccontextmanager
async def process_node(
    tmp_path: Path,
    name: str,
    settings: Settings,
    redis_url: str,
    api_base_url: str,
    public_url: str,
    policy: Mapping[str, bool | int] | None = None,
    edits: Mapping[str, str] | None = None,
) -> AsyncIterator[ProcessNode]:
    """The shipped demo config (a site may only tighten its callback policy in a config
    file: ``policy`` adds such keys), Twilio at ``api_base_url``, socket TTL 2 s; ``edits``
    replace lines of that config (``{"ring_timeout_s = 20": "ring_timeout_s = 5"}``)."""
    config = demo_config_text().replace("socket_ttl_s = 15", "socket_ttl_s = 2")
    for old, new in (edits or {}).items():
        assert old in config, old
        config = config.replace(old, new)
    if policy:
        config += "\n  [sites.callback_policy]\n"
        config += "".join(f"  {k} = {toml_value(v)}\n" for k, v in policy.items())
    config += f'\n[twilio]\napi_base_url = "{api_base_url}"\n'
    env = {
        "MEMBRANE_TWILIO_ACCOUNT_SID": settings.twilio.account_sid,
        "MEMBRANE_TWILIO_AUTH_TOKEN": settings.twilio.auth_token,
        "MEMBRANE_NODE_ID": name,
    }
    args = ("--public-url", public_url)
    async with node_process(tmp_path, settings, redis_url, config, name, env, args) as (url, proc):
        yield ProcessNode(url, proc, tmp_path / f"{name}.log", settings)


async def kill(node: ProcessNode) -> None:
    """SIGKILL: no shutdown, nothing finished, every lease left to lapse."""
    node.proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(node.proc.wait(), 10)


class ClockAhead(SystemClock):
    """The real clock, ``ahead_s`` on: nodes that start that long after an event."""

    def __init__(self, ahead_s: float) -> None:
        self.ahead_s = ahead_s

    def now(self) -> float:
        return super().now() + self.ahead_s


async def leases_lapse(clock: Clock) -> None:
    """Moves in-process nodes' clock past every timer lease a killed node held. That node
    ran in its own process on the real clock (a process cannot share a test's clock), so
    the clock is first brought up to the real time."""
    assert isinstance(clock, ManualClock)
    await clock.advance(max(0.0, time.time() - clock.now()) + LEASE_S)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    sim = TwilioSim(time_scale=0.05)
    await sim.start()
    yield sim
    await sim.close()
    assert sim.contract_violations == []


@pytest.fixture
async def balancer() -> AsyncIterator[Balancer]:
    lb = Balancer()
    await lb.start()
    yield lb
    await lb.close()


@pytest.fixture
async def cluster(sim: TwilioSim, balancer: Balancer) -> AsyncIterator[Cluster]:
    # Depends on the simulator and the balancer so that the nodes stop before either.
    nodes = Cluster()
    yield nodes
    await nodes.close()


@pytest.fixture
async def rdb(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


# --- helpers -------------------------------------------------------------------------------


def behind(balancer: Balancer, settings: Settings, node_id: str, **twilio: str) -> Settings:
    """One node of the cluster: any port, the balancer's public URL."""
    changed = replace(settings, port=0, node_id=node_id, public_url=balancer.url)
    if twilio:
        changed = replace(changed, twilio=replace(settings.twilio, **twilio))
    return changed


async def agent_on(
    clients: Callable[[], SocketClient], url: str, settings: Settings, name: str
) -> SocketClient:
    c = clients()
    await c.connect(url, "/agent", {"token": mint(settings, name), "state": "available"})
    await c.next("presence:update", lambda p: p["agent_id"] == name)
    return c


async def ask_callback(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> dict[str, Any]:
    r = await http.post(f"{url}/v1/sites/acme/sessions", json={}, headers=ORIGIN)
    assert r.status == 201, await r.text()
    token = (await r.json())["token"]
    r = await http.post(
        f"{url}/v1/sites/acme/callbacks",
        json=body,
        headers={**ORIGIN, "Authorization": f"Bearer {token}"},
    )
    created: dict[str, Any] = await r.json()
    assert r.status == 201, created
    return created


async def accepted_callback(
    clients: Callable[[], SocketClient],
    http: aiohttp.ClientSession,
    url: str,
    settings: Settings,
    phone: str,
) -> dict[str, Any]:
    """Anna, on the node at ``url``, accepts the callback ``phone`` asks for there."""
    anna = await agent_on(clients, url, settings, "anna")
    created = await ask_callback(http, url, {"phone": phone})
    call_id = created["call_id"]
    await anna.next("call:ring", lambda r: r["call_id"] == call_id, timeout=10)
    ack = await anna.call("call:accept", {"call_id": call_id}, "/agent")
    assert ack["ok"], ack
    return created


async def all_reach(
    http: aiohttp.ClientSession,
    url: str,
    created: list[dict[str, Any]],
    state: str,
    timeout: float,
) -> list[Any]:
    latest: dict[str, Any] = {}

    def done(c: dict[str, Any]) -> bool:
        return bool(latest.get(c["call_id"], {}).get("state") == state)

    async def reached() -> bool:
        pending = [c for c in created if not done(c)]
        seen = await asyncio.gather(*(ticket_at(http, url, c) for c in pending))
        for c, t in zip(pending, seen, strict=True):
            latest[c["call_id"]] = t
        return all(done(c) for c in created)

    try:
        await eventually(reached, timeout)
    except TimeoutError:
        lagging = {
            c["call_id"]: (
                latest.get(c["call_id"], {}).get("state"),
                latest.get(c["call_id"], {}).get("reason"),
                [e["detail"] for e in latest.get(c["call_id"], {}).get("timeline", [])],
            )
            for c in created
            if not done(c)
        }
        raise AssertionError(f"not all {state} after {timeout}s: {lagging}") from None
    return [latest[c["call_id"]] for c in created]


async def reach(
    http: aiohttp.ClientSession, url: str, created: dict[str, Any], state: str, timeout: float
) -> Any:
    return (await all_reach(http, url, [created], state, timeout))[0]


def placed(node: Node) -> float:
    """Dials this node placed (its own metrics registry)."""
    value = node.app[keys.METRICS].registry.get_sample_value(
        "membrane_callback_dials_total", {"result": "placed"}
    )
    return value or 0.0


def bridges_of(sim: TwilioSim, leg: CallRecord) -> list[CallRecord]:
    return [c for c in sim.calls if c.parent_sid == leg.sid]


def dialings(ticket: Any) -> int:
    return sum(1 for e in ticket["timeline"] if e["event"] == "dialing")


async def agent_status(http: aiohttp.ClientSession, url: str, settings: Settings, name: str) -> str:
    r = await http.get(
        f"{url}/v1/agents/me", headers={"Authorization": f"Bearer {mint(settings, name)}"}
    )
    status: str = (await r.json())["status"]
    return status


async def becomes_available(
    http: aiohttp.ClientSession, url: str, settings: Settings, name: str, timeout: float = 10
) -> None:
    async def free() -> bool:
        return await agent_status(http, url, settings, name) == "available"

    await eventually(free, timeout)


async def dial_timer_done(rdb: aioredis.Redis, call_id: str, attempt: int = 1) -> None:
    """The dial timer of ``attempt`` ran to its end on some node (it is gone from the store)."""

    async def gone() -> bool:
        return await rdb.zscore("m:timers", f"cbdial:{call_id}:{attempt}") is None

    await eventually(gone, LEASE_S + 10)


def iso_at(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


# Visitor numbers in zones spread over the allowed countries (see ``daytime_phones``).
PHONE_FAMILIES = (
    "+3538611100{:02d}",  # Ireland (its mobiles' zones: Europe/London and the islands)
    "+49151123456{:02d}",  # Germany, Europe/Berlin
    "+121255501{:02d}",  # New York
    "+141555501{:02d}",  # San Francisco
    "+180855501{:02d}",  # Honolulu
)


def daytime_phones(count: int, for_s: float = 900.0) -> list[str]:
    """``count`` visitor numbers that the default policy (the one a node started from a
    config file keeps: a site may only widen quiet hours) lets us call from now for
    ``for_s``: such a node refuses or postpones a callback in the visitor's night."""
    policy = CallbackPolicy()
    now = time.time()
    for family in PHONE_FAMILIES:
        phones = [family.format(i) for i in range(1, count + 1)]
        numbers = [check_number(p, policy) for p in phones]
        if not any(
            in_quiet_hours(n, policy, now + t) for n in numbers for t in range(0, int(for_s), 60)
        ):
            return phones
    # The default policy's countries span UTC-10 to UTC+1: for a quarter of an hour a day
    # (about 06:45 to 07:00 UTC) every one of them is in its quiet hours.
    pytest.skip("every country the default policy allows is in its quiet hours now")


# --- 1. one callback, three nodes' worth of hands ----------------------------------------------


async def test_asked_on_one_node_rung_and_accepted_on_another_dialled_once(
    cluster: Cluster,
    balancer: Balancer,
    sim: TwilioSim,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=HANG_UP_AFTER)
    sim.phone(ANNA_PHONE, answer_after=1, press="1")
    base = phone_settings(tmp_path, sim, redis_url)
    a = await cluster.start(behind(balancer, base, "node-a"))
    b = await cluster.start(behind(balancer, base, "node-b"))
    balancer.backends[:] = [a.url, b.url]
    anna = await agent_on(clients, b.url, b.settings, "anna")

    created = await ask_callback(http, a.url, {"phone": VISITOR_PHONE})
    call_id = created["call_id"]
    ring = await anna.next("call:ring", lambda r: r["call_id"] == call_id, timeout=10)
    assert ring["your_phone"] == ANNA_PHONE
    assert visitor_calls(sim, VISITOR_PHONE) == [], "agent first: nobody dialled yet"
    ack = await anna.call("call:accept", {"call_id": call_id}, "/agent")
    assert ack["ok"] and ack["call"]["state"] == "dialing", ack

    leg = await sim.wait_for_call(to=VISITOR_PHONE, status="in-progress", timeout=10)
    bridge = await sim.wait_for_call(to=ANNA_PHONE, status="in-progress", timeout=10)
    assert bridge.parent_sid == leg.sid
    done = await reach(http, a.url, created, "completed", 15)
    assert done == await ticket_at(http, b.url, created), "both nodes read one ticket"
    assert done["agent"]["name"] == "Anna" and dialings(done) == 1

    await sim.wait_for_call(sid=leg.sid, status="completed", timeout=10)
    assert visitor_calls(sim, VISITOR_PHONE) == [leg]
    assert [c for c in sim.calls if c.to == ANNA_PHONE] == [bridge]
    assert placed(a) + placed(b) == 1, (placed(a), placed(b))
    # Round robin: the leg's webhooks were answered by both nodes, and all were accepted.
    hooks = balancer.webhooks()
    assert {backend for backend, _, _ in hooks} == {a.url, b.url}
    assert all(status == 200 for _, _, status in hooks), hooks
    for node in (a, b):
        await becomes_available(http, node.url, node.settings, "anna")


# --- 2. a node dies between the accept and the dial --------------------------------------------


async def test_a_node_killed_before_its_dial_reached_twilio_is_taken_over_once(
    cluster: Cluster,
    balancer: Balancer,
    sim: TwilioSim,
    redis_url: str,
    rdb: aioredis.Redis,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """The doomed node claims the dial (its idempotency key) and its request to Twilio hangs;
    it is killed. After the timer lease a survivor runs the dial timer again, finds the
    claim taken, asks Twilio whether the leg exists (it does not) and dials: once."""
    visitor = daytime_phones(1)[0]  # the doomed node keeps the default quiet hours
    sim.phone(visitor, answer_after=1, hangup_after=HANG_UP_AFTER)
    sim.phone(ANNA_PHONE, answer_after=1, press="1")
    base = phone_settings(tmp_path, sim, redis_url)
    async with (
        Blackhole() as hole,
        TwilioTap(sim.base_url) as tap_b,
        process_node(tmp_path, "doomed", base, redis_url, hole.url, balancer.url) as doomed,
    ):
        balancer.backends[:] = [doomed.url]
        created = await accepted_callback(clients, http, doomed.url, base, visitor)
        call_id = created["call_id"]

        await asyncio.wait_for(hole.got_request.wait(), 10)
        assert b"/Calls.json" in hole.received
        assert await rdb.exists(f"m:once:dial:{call_id}:1"), "the doomed node claimed the dial"
        balancer.backends.remove(doomed.url)
        await kill(doomed)

        survivor = behind(balancer, base, "survivor", api_base_url=tap_b.url)
        b = await cluster.start(survivor, clock=ManualClock())
        balancer.backends.append(b.url)
        await agent_on(clients, b.url, b.settings, "anna")
        assert tap_b.requests == [], "nothing taken over while the dead node's lease holds"
        await leases_lapse(b.clock)
        leg = await sim.wait_for_call(to=visitor, timeout=10)
        assert tap_b.lists() and tap_b.dials(), tap_b.requests
        first_list = tap_b.requests.index(("GET", tap_b.lists()[0]))
        assert first_list < tap_b.requests.index(("POST", tap_b.dials()[0])), (
            "asked Twilio for the leg before dialing"
        )

        done = await reach(http, b.url, created, "completed", 20)
        assert dialings(done) == 1 and done["agent"]["name"] == "Anna"
        await sim.wait_for_call(sid=leg.sid, status="completed", timeout=10)
        assert visitor_calls(sim, visitor) == [leg], "exactly one leg to the visitor"
        assert [c.to for c in bridges_of(sim, leg)] == [ANNA_PHONE]
        assert [c for c in sim.calls if c.to == ANNA_PHONE] == bridges_of(sim, leg)
        assert placed(b) == 1 and len(tap_b.dials()) == 1
        await becomes_available(http, b.url, b.settings, "anna")


async def test_a_node_killed_after_twilio_placed_its_leg_is_not_dialled_again(
    cluster: Cluster,
    balancer: Balancer,
    sim: TwilioSim,
    redis_url: str,
    rdb: aioredis.Redis,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Twilio placed the leg but the doomed node never heard its sid (killed first). The
    leg's webhooks reach the survivor through the balancer and carry the call on; when the
    dial timer's lease lapses the survivor runs it again and must not dial a second leg."""
    visitor = daytime_phones(1)[0]  # the doomed node keeps the default quiet hours
    sim.phone(visitor, answer_after=1, hangup_after=HANG_UP_AFTER)
    sim.phone(ANNA_PHONE, answer_after=1, press="1")
    base = phone_settings(tmp_path, sim, redis_url)
    async with (
        TwilioTap(sim.base_url, hold_dials=True) as tap_d,
        TwilioTap(sim.base_url) as tap_b,
        process_node(tmp_path, "doomed", base, redis_url, tap_d.url, balancer.url) as doomed,
    ):
        balancer.backends[:] = [doomed.url]
        created = await accepted_callback(clients, http, doomed.url, base, visitor)
        call_id = created["call_id"]
        await asyncio.wait_for(tap_d.dial_arrived.wait(), 10)
        assert await rdb.exists(f"m:once:dial:{call_id}:1")

        # The survivor joins (the doomed node holds the dial timer's lease, so it cannot
        # take the dial yet) and the balancer stops sending to the doomed node.
        survivor = behind(balancer, base, "survivor", api_base_url=tap_b.url)
        b = await cluster.start(survivor, clock=ManualClock())
        balancer.backends[:] = [b.url]
        await agent_on(clients, b.url, b.settings, "anna")
        tap_d.forward.set()
        await asyncio.wait_for(tap_d.dial_recorded.wait(), 10)
        await kill(doomed)

        leg = sim.call(tap_d.sid or "")
        assert leg.to == visitor
        bridge = await sim.wait_for_call(to=ANNA_PHONE, status="in-progress", timeout=10)
        assert bridge.parent_sid == leg.sid
        done = await reach(http, b.url, created, "completed", 20)
        assert dialings(done) == 1
        # The survivor's turn at the dial timer, after the lease: it must place nothing.
        await leases_lapse(b.clock)
        await dial_timer_done(rdb, call_id)
        assert visitor_calls(sim, visitor) == [leg], "the visitor was called once"
        assert tap_b.dials() == [] and placed(b) == 0
        assert {backend for backend, _, _ in balancer.webhooks()} == {b.url}
        await becomes_available(http, b.url, b.settings, "anna")


class StuckCallback(AssertionError):
    """A callback left waiting on a leg that will never report."""


async def test_a_leg_whose_webhooks_were_lost_in_a_full_outage_does_not_stay_stuck(
    cluster: Cluster,
    balancer: Balancer,
    sim: TwilioSim,
    redis_url: str,
    rdb: aioredis.Redis,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The only node dies right after Twilio placed its leg; while no node is up, every
    webhook of that leg fails (Twilio does not retry them) and the leg ends. A node that
    comes back takes the dial over, finds the leg with Twilio and does not dial again;
    but nothing will ever report on that leg, so the callback must not wait for it forever
    (the watch timer, ``LEG_SILENCE_S``, shortened here, is what ends such an attempt)."""
    silence = 3.0
    monkeypatch.setattr(callback_dialing, "LEG_SILENCE_S", silence)
    visitor = daytime_phones(1)[0]  # the doomed node keeps the default quiet hours
    sim.phone(visitor, answer_after=1, hangup_after=HANG_UP_AFTER)
    sim.phone(ANNA_PHONE, answer_after=1, press="1")
    base = phone_settings(tmp_path, sim, redis_url)
    async with (
        TwilioTap(sim.base_url, hold_dials=True) as tap_d,
        TwilioTap(sim.base_url) as tap_b,
        process_node(tmp_path, "doomed", base, redis_url, tap_d.url, balancer.url) as doomed,
    ):
        balancer.backends[:] = [doomed.url]
        created = await accepted_callback(clients, http, doomed.url, base, visitor)
        call_id = created["call_id"]
        await asyncio.wait_for(tap_d.dial_arrived.wait(), 10)
        balancer.backends.clear()  # the doomed node fails its health checks: nobody is left
        tap_d.forward.set()
        await asyncio.wait_for(tap_d.dial_recorded.wait(), 10)
        await kill(doomed)
        leg = await sim.wait_for_call(sid=tap_d.sid, status="ended", timeout=10)
        assert leg.webhooks and all(w.status == 502 for w in leg.webhooks), leg.webhooks

        survivor = behind(balancer, base, "survivor", api_base_url=tap_b.url)
        clock = ManualClock()
        b = await cluster.start(survivor, clock=clock)
        balancer.backends[:] = [b.url]
        anna_b = await agent_on(clients, b.url, b.settings, "anna")
        await leases_lapse(clock)
        await dial_timer_done(rdb, call_id)
        assert tap_b.lists() and tap_b.dials() == [], "found the leg with Twilio, no new dial"
        assert visitor_calls(sim, visitor) == [leg]

        # The lost attempt ends (no status), and after the retry interval the retry rings
        # Anna again.
        await clock.advance(silence)
        await clock.advance(b.settings.sites["acme"].callback_policy.retry_interval_s)
        try:
            ring = await anna_b.next("call:ring", lambda r: r["call_id"] == call_id, 10)
        except TimeoutError:
            stuck = await ticket_at(http, b.url, created)
            timers = await rdb.zrange("m:timers", 0, -1)
            anna = await agent_status(http, b.url, b.settings, "anna")
            raise StuckCallback(
                f"after the silence and the retry the callback is {stuck['state']!r}, "
                f"Anna is {anna!r}, and no timer is left for it: {timers}"
            ) from None
        assert ring["your_phone"] == ANNA_PHONE
        assert (await anna_b.call("call:accept", {"call_id": call_id}, "/agent"))["ok"]
        done = await reach(http, b.url, created, "completed", 20)
        assert dialings(done) == 2
        assert len(visitor_calls(sim, visitor)) == 2, "the lost leg and the retry"


# --- 3. every node restarts with callbacks pending ---------------------------------------------


async def test_a_restart_of_every_node_loses_no_pending_callback(
    cluster: Cluster,
    balancer: Balancer,
    sim: TwilioSim,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Customer first. Callbacks queued with nobody online (on both nodes) and scheduled a
    few seconds ahead; one node stops gracefully, the other is SIGKILLed (leaving timer
    leases behind). Fresh nodes on the same Redis dial every one of them exactly once."""
    phones = daytime_phones(6)  # the doomed node keeps the default quiet hours
    queued_phones, scheduled_phones = phones[:3], phones[3:]
    for phone in (*queued_phones, *scheduled_phones):
        sim.phone(phone, answer_after=1, hangup_after=HANG_UP_AFTER)
    sim.phone(ANNA_PHONE, answer_after=1, press="1")
    sim.phone(BEN_PHONE, answer_after=1, press="1")
    base = phone_settings(tmp_path, sim, redis_url, agent_first=False)
    created: list[dict[str, Any]] = []
    async with process_node(
        tmp_path, "doomed", base, redis_url, sim.base_url, balancer.url, {"agent_first": False}
    ) as doomed:
        a = await cluster.start(behind(balancer, base, "node-a"))
        balancer.backends[:] = [a.url, doomed.url]
        for i, phone in enumerate(queued_phones):
            url = doomed.url if i < 2 else a.url
            created.append(await ask_callback(http, url, {"phone": phone}))
        at = time.time() + 8
        for phone in scheduled_phones:
            created.append(await ask_callback(http, a.url, {"phone": phone, "at": iso_at(at)}))
        states = [c["call"]["state"] for c in created]
        assert states == ["queued"] * 3 + ["scheduled"] * 3, states

        balancer.backends[:] = []
        await cluster.stop(a)
        await kill(doomed)

    # The fresh nodes start once the killed node's timer leases have lapsed: their clock is
    # the real one (the callbacks go on in real time with the simulator) moved that far on.
    later = ClockAhead(LEASE_S)
    c1 = await cluster.start(behind(balancer, base, "fresh-1"), clock=later)
    c2 = await cluster.start(behind(balancer, base, "fresh-2"), clock=later)
    balancer.backends[:] = [c1.url, c2.url]
    pending = [await ticket_at(http, c1.url, c) for c in created]
    assert not any(t["state"] in ("completed", "failed", "canceled") for t in pending), pending
    assert sim.calls == [], "nobody was online: nothing dialled before the restart"
    await agent_on(clients, c1.url, c1.settings, "anna")
    await agent_on(clients, c2.url, c2.settings, "ben")

    done = await all_reach(http, c2.url, created, "completed", 40)
    assert all(dialings(t) == 1 for t in done), [t["timeline"] for t in done]
    for phone in (*queued_phones, *scheduled_phones):
        legs = visitor_calls(sim, phone)
        assert len(legs) == 1, f"{phone} dialled {len(legs)} times"
        await sim.wait_for_call(sid=legs[0].sid, status="completed", timeout=10)
        assert [c.to for c in bridges_of(sim, legs[0])] in ([ANNA_PHONE], [BEN_PHONE])
    assert placed(c1) + placed(c2) == 6


async def test_the_embedded_store_keeps_a_scheduled_callback_across_a_restart(
    cluster: Cluster,
    sim: TwilioSim,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=HANG_UP_AFTER)
    sim.phone(ANNA_PHONE, answer_after=1, press="1")
    # Embedded store in tmp_path/data, on a fixed port (the public URL stays the same).
    settings = phone_settings(tmp_path, sim, agent_first=False)
    clock = ManualClock()
    first = await cluster.start(settings, clock=clock)
    at = clock.now() + 6
    created = await ask_callback(http, first.url, {"phone": VISITOR_PHONE, "at": iso_at(at)})
    assert created["call"]["state"] == "scheduled"
    await cluster.stop(first)

    again = await cluster.start(settings, clock=clock)
    assert (await ticket_at(http, again.url, created))["state"] == "scheduled"
    await agent_on(clients, again.url, again.settings, "anna")
    await clock.advance(at - clock.now() - 0.1)
    assert (await ticket_at(http, again.url, created))["state"] == "scheduled", "not before"
    assert visitor_calls(sim, VISITOR_PHONE) == []
    await clock.advance(0.2)
    leg = await sim.wait_for_call(to=VISITOR_PHONE, timeout=10)
    done = await reach(http, again.url, created, "completed", 15)
    assert dialings(done) == 1 and done["agent"]["name"] == "Anna"
    await sim.wait_for_call(sid=leg.sid, status="completed", timeout=10)
    assert visitor_calls(sim, VISITOR_PHONE) == [leg]


# --- 4. two nodes race for the same due callbacks ----------------------------------------------


def with_agents(settings: Settings, count: int) -> Settings:
    """The demo site with ``count`` round-the-clock agents, each with an Irish mobile."""
    agents = {
        f"agent{i:02d}": Agent(
            agent_id=f"agent{i:02d}",
            site="acme",
            name=f"Agent {i:02d}",
            branch="online",
            languages=("en",),
            mobile=f"+3538710000{i:02d}",
        )
        for i in range(1, count + 1)
    }
    return with_site(settings, agents=agents)


async def test_two_nodes_racing_for_twenty_due_callbacks_dial_each_once(
    cluster: Cluster,
    balancer: Balancer,
    sim: TwilioSim,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    count = 20
    phones = [f"+3538611100{i:02d}" for i in range(1, count + 1)]
    for phone in phones:
        # Twenty greetings and bridges at once: on a slow machine, under the rest of the
        # suite, some took longer than HANG_UP_AFTER (2 s), and those visitors were gone.
        sim.phone(phone, answer_after=1, hangup_after=3 * HANG_UP_AFTER)
    settings = with_agents(phone_settings(tmp_path, sim, redis_url, agent_first=False), count)
    site = settings.sites["acme"]
    for a in site.agents.values():
        assert a.mobile is not None
        sim.phone(a.mobile, answer_after=1, press="1")
    assert site.callback_policy.max_concurrent_calls >= count
    assert site.callback_policy.per_ip_hour >= count, "every visitor here is 127.0.0.1"
    clock = ManualClock()  # both nodes' time: the callbacks fall due on both at once
    n1 = await cluster.start(behind(balancer, settings, "node-1"), clock=clock)
    n2 = await cluster.start(behind(balancer, settings, "node-2"), clock=clock)
    balancer.backends[:] = [n1.url, n2.url]
    for i, agent_id in enumerate(site.agents):
        node = (n1, n2)[i % 2]
        await agent_on(clients, node.url, node.settings, agent_id)

    at = clock.now() + 4
    created = [
        await ask_callback(http, (n1, n2)[i % 2].url, {"phone": phone, "at": iso_at(at)})
        for i, phone in enumerate(phones)
    ]
    assert {c["call"]["state"] for c in created} == {"scheduled"}
    await clock.advance(4.1)  # just past their time (it went over the wire in microseconds)

    done = await all_reach(http, n1.url, created, "completed", 40)
    assert all(dialings(t) == 1 for t in done)
    legs: list[CallRecord] = []
    for phone in phones:
        found = visitor_calls(sim, phone)
        assert len(found) == 1, f"{phone} dialled {len(found)} times"
        legs.extend(found)
    for leg in legs:
        await sim.wait_for_call(sid=leg.sid, status="completed", timeout=10)
    assert len([c for c in sim.calls if c.parent_sid is None]) == count
    bridges = [b for leg in legs for b in bridges_of(sim, leg)]
    assert len(bridges) == count and all(len(bridges_of(sim, leg)) == 1 for leg in legs)
    assert placed(n1) + placed(n2) == count, (placed(n1), placed(n2))
    # No agent's phone was bridged into two calls at once.
    by_agent: dict[str, list[CallRecord]] = {}
    for b in bridges:
        by_agent.setdefault(b.to, []).append(b)
    for phone, calls in by_agent.items():
        spans = sorted((c.start_time, c.end_time) for c in calls if c.start_time and c.end_time)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"{phone} was in two calls at once"
