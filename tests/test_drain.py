"""A node told to stop (SIGTERM) drains: it goes out of rotation, takes no new work, sends its
sockets to another node and exits within its grace; calls carry on through the other node."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis_async
import socketio
from conftest import (
    NodeFactory,
    SocketClient,
    eventually,
    make_settings,
    mint,
    node_process,
    replace,
)

from gateway.core.model import Role
from gateway.edge.http import appkeys as keys
from gateway.edge.sio.agent import HANDOVER_LEASE_S
from gateway.ops.clock import ManualClock
from gateway.settings import demo_config_text

ORIGIN = {"Origin": "http://127.0.0.1:8080"}
# Real time for the draining node: it is a process of its own, told to stop with SIGTERM,
# and a process cannot take a test's clock. Its grace is the real time it has to exit.
GRACE_S = 4.0
# Beyond the grace: the interpreter's own start-up and exit, on a busy machine.
EXIT_MARGIN_S = 3.0


def state_is(state: str) -> Callable[[Any], bool]:
    return lambda call: call["state"] == state


def config(ring_timeout_s: int = 20) -> str:
    return demo_config_text().replace("ring_timeout_s = 20", f"ring_timeout_s = {ring_timeout_s}")


async def new_session(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    r = await http.post(f"{url}/v1/sites/acme/sessions", json={}, headers=ORIGIN)
    assert r.status == 201, await r.text()
    data: dict[str, Any] = await r.json()
    return data


def carla_is(status: str) -> Callable[[Any], bool]:
    return lambda p: p["agent_id"] == "carla" and p["status"] == status


async def stored_call(redis_url: str, call_id: str) -> dict[str, Any]:
    client = redis_async.Redis.from_url(redis_url, decode_responses=True)
    try:
        raw = await client.hget(f"m:call:{call_id}", "data")
        assert isinstance(raw, str)
        data: dict[str, Any] = json.loads(raw)
        return data
    finally:
        await client.aclose()


async def timers_left(redis_url: str, call_id: str) -> list[str]:
    client = redis_async.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [str(t) for t in await client.zrange("m:timers", 0, -1) if call_id in str(t)]
    finally:
        await client.aclose()


async def test_a_connected_call_survives_its_nodes_drain(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
) -> None:
    settings = make_settings(tmp_path, redis_url=redis_url)
    b = await nodes(replace(settings, node_id="b"), clock=clock)
    env = {"MEMBRANE_DRAIN_GRACE_S": str(GRACE_S)}
    async with node_process(tmp_path, settings, redis_url, config(), "a", env) as (a_url, proc):
        board = clients()
        await board.connect(b.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
        carla_token = mint(settings, "carla")
        agent = clients()
        await agent.connect(a_url, "/agent", {"token": carla_token})
        await board.next("presence:update", lambda p: p["agent_id"] == "carla")
        session = await new_session(http, a_url)
        visitor = clients()
        await visitor.connect(a_url, "/visitor", {"token": session["token"]})
        ack = await visitor.call("call:start", {}, "/visitor")
        call_id = ack["call"]["call_id"]
        ring = await agent.next("call:ring")
        await agent.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
        await visitor.next("call:update", state_is("connected"))
        await board.next("presence:update", carla_is("on_call"))

        proc.send_signal(signal.SIGTERM)
        # Both sockets are told to go elsewhere, and their connections close.
        assert (await agent.next("server:draining"))["retry_after_s"] >= 1
        await visitor.next("server:draining")

        # Out of rotation, and no new work, while the node is still up.
        r = await http.get(f"{a_url}/readyz")
        assert r.status == 503 and (await r.json())["draining"] is True
        r = await http.post(f"{a_url}/v1/sites/acme/sessions", json={}, headers=ORIGIN)
        assert r.status == 503 and (await r.json())["error"]["code"] == "draining"
        assert int(r.headers["Retry-After"]) >= 1
        refused = clients()
        why: asyncio.Queue[Any] = asyncio.Queue()
        refused.sio.on("connect_error", why.put_nowait, namespace="/agent")
        with pytest.raises(socketio.exceptions.ConnectionError):
            await refused.connect(a_url, "/agent", {"token": carla_token})
        assert (await asyncio.wait_for(why.get(), 5))["data"]["code"] == "draining"

        # Both reconnect (behind a load balancer, to the same URL) to node B and take the
        # call over: the visitor by their session, the agent app by naming its call.
        visitor_b = clients()
        await visitor_b.connect(b.url, "/visitor", {"token": session["token"]})
        resumed = await visitor_b.next("call:update")
        assert resumed["call_id"] == call_id and resumed["state"] == "connected"
        agent_b = clients()
        await agent_b.connect(b.url, "/agent", {"token": carla_token, "call_id": call_id})
        resumed = await agent_b.next("call:update")
        assert resumed["call_id"] == call_id and resumed["state"] == "connected"

        # Signaling carries on through B, both ways.
        offer = {"call_id": call_id, "description": {"type": "offer", "sdp": "v=0\r\n"}}
        assert (await visitor_b.call("rtc:signal", offer, "/visitor"))["ok"]
        assert await agent_b.next("rtc:signal") == offer
        candidate = {
            "call_id": call_id,
            "candidate": {"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host"},
        }
        assert (await agent_b.call("rtc:signal", candidate, "/agent"))["ok"]
        assert (await visitor_b.next("rtc:signal"))["call_id"] == call_id

        # The node exits within its grace.
        await asyncio.wait_for(proc.wait(), GRACE_S + EXIT_MARGIN_S)
        assert proc.returncode == 0

    # The grace timers of the old sockets run out and change nothing: the call stays
    # connected and Carla on it (the board never saw her otherwise). A set them by the real
    # clock, so B's is brought up to it first, then on past the grace.
    calls_b = b.app[keys.CALLS]
    await clock.advance(
        time.time() - clock.now() + max(calls_b.visitor_grace_s, calls_b.agent_grace_s)
    )

    async def grace_timers_done() -> bool:
        return not await timers_left(redis_url, call_id)

    await eventually(grace_timers_done, 5)
    assert (await stored_call(redis_url, call_id))["state"] == "connected"
    r = await http.get(
        f"{b.url}/v1/sites/acme/agents",
        headers={"Authorization": f"Bearer {mint(settings, 'sam', Role.SUPERVISOR)}"},
    )
    carla = next(p for p in await r.json() if p["agent_id"] == "carla")
    assert carla["status"] == "on_call"
    while not board.queue("presence:update").empty():
        seen = board.queue("presence:update").get_nowait()
        assert seen["agent_id"] != "carla" or seen["status"] == "on_call", seen

    # Hanging up ends the call normally and frees Carla.
    ack = await agent_b.call("call:hangup", {"call_id": call_id}, "/agent")
    assert ack["ok"] and ack["call"]["state"] == "completed"
    ended = await visitor_b.next("call:update", state_is("completed"))
    assert ended["reason"] == "agent_hung_up"
    await board.next("presence:update", carla_is("available"))


async def test_an_agent_let_go_by_a_drain_stays_routable_while_her_app_reconnects(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Carla's app is on node A when A drains. Her desktop device outlives the socket for a
    few seconds (``HANDOVER_LEASE_S``), not renewed: a visitor who presses the button on B
    before her app is back still reaches her, and the ring waits for her app on B."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    b = await nodes(replace(settings, node_id="b"))
    env = {"MEMBRANE_DRAIN_GRACE_S": str(GRACE_S)}
    async with node_process(tmp_path, settings, redis_url, config(), "a", env) as (a_url, proc):
        carla_token = mint(settings, "carla")
        agent = clients()
        await agent.connect(a_url, "/agent", {"token": carla_token})
        await agent.next("presence:update", carla_is("available"))

        proc.send_signal(signal.SIGTERM)
        await agent.next("server:draining")

        async def let_go() -> bool:
            return not agent.sio.connected

        await eventually(let_go, GRACE_S + EXIT_MARGIN_S)
        headers = {"Authorization": f"Bearer {carla_token}"}
        me = await (await http.get(f"{b.url}/v1/agents/me", headers=headers)).json()
        assert me["status"] == "available", me
        (device,) = me["devices"]
        expires = datetime.fromisoformat(device["expires_at"]).timestamp()
        assert 0 < expires - time.time() <= HANDOVER_LEASE_S, device

        session = await new_session(http, b.url)
        visitor = clients()
        await visitor.connect(b.url, "/visitor", {"token": session["token"]})
        ack = await visitor.call("call:start", {}, "/visitor")
        assert ack["ok"] and ack["call"]["state"] == "ringing", ack
        assert ack["call"]["agent"]["name"] == "Carla"
        call_id = ack["call"]["call_id"]

        back = clients()
        await back.connect(b.url, "/agent", {"token": carla_token})
        ring = await back.next("call:ring")
        assert ring["call_id"] == call_id
        accepted = await back.call("call:accept", {"call_id": call_id}, "/agent")
        assert accepted["ok"] and accepted["call"]["state"] == "connected", accepted
        await visitor.next("call:update", state_is("connected"))


@pytest.mark.parametrize("ending", ["answered on the other node", "rings out"])
async def test_a_ringing_call_on_a_draining_node_still_rings_and_times_out(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    ending: str,
    clock: ManualClock,
) -> None:
    """The call rings Carla, visitor and agent both on node A, when A drains. The drain does
    not cancel it (its visitor did not leave): the agent app, back on B, is rung again and
    can answer there; unanswered, B times the ring out as A would have."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    b = await nodes(replace(settings, node_id="b"), clock=clock)
    env = {"MEMBRANE_DRAIN_GRACE_S": str(GRACE_S)}
    ring_timeout_s = 4
    async with node_process(tmp_path, settings, redis_url, config(ring_timeout_s), "a", env) as (
        a_url,
        proc,
    ):
        carla_token = mint(settings, "carla")
        agent = clients()
        await agent.connect(a_url, "/agent", {"token": carla_token})
        await agent.next("presence:update", carla_is("available"))
        session = await new_session(http, a_url)
        visitor = clients()
        await visitor.connect(a_url, "/visitor", {"token": session["token"]})
        ack = await visitor.call("call:start", {}, "/visitor")
        assert ack["call"]["state"] == "ringing"
        call_id = ack["call"]["call_id"]
        first_ring = await agent.next("call:ring")

        proc.send_signal(signal.SIGTERM)
        await agent.next("server:draining")
        await visitor.next("server:draining")
        r = await http.post(f"{a_url}/v1/sites/acme/callbacks", json={}, headers=ORIGIN)
        assert r.status == 503 and (await r.json())["error"]["code"] == "draining"

        visitor_b = clients()
        await visitor_b.connect(b.url, "/visitor", {"token": session["token"]})
        resumed = await visitor_b.next("call:update")
        assert resumed["call_id"] == call_id and resumed["state"] == "ringing"
        agent_b = clients()
        await agent_b.connect(b.url, "/agent", {"token": carla_token})
        again = await agent_b.next("call:ring")
        assert again == first_ring, "the same ring, with its deadline and reasons"

        if ending == "answered on the other node":
            ack = await agent_b.call("call:accept", {"call_id": call_id}, "/agent")
            assert ack["ok"] and ack["call"]["state"] == "connected"
            await visitor_b.next("call:update", state_is("connected"))
        else:
            # A no longer runs timers: B times the ring out, and with nobody else to ring
            # the call fails with a callback offer (not canceled as if the visitor left).
            # A rang by the real clock: B's is brought up to it, then past the ring's end.
            await clock.advance(time.time() - clock.now() + ring_timeout_s)
            failed = await visitor_b.next("call:update", state_is("failed"))
            assert failed["reason"] == "no_agent_answered"
            stop = await agent_b.next("call:ring_stop")
            assert stop == {"call_id": call_id, "attempt": 1, "reason": "no_answer"}
        await asyncio.wait_for(proc.wait(), GRACE_S + EXIT_MARGIN_S)
        assert proc.returncode == 0
    call = await stored_call(redis_url, call_id)
    assert call["state"] == ("connected" if ending.startswith("answered") else "failed")


# --- the shipped clients, in a real browser, behind a load balancer ------------------------------


class TcpBalancer:
    """A layer-4 load balancer: each new connection goes to the first backend in the list,
    and bytes pass both ways untouched (WebSockets too). A test takes a node out of the list
    as a real balancer would once its ``/readyz`` says 503."""

    def __init__(self) -> None:
        self.backends: list[int] = []  # ports on 127.0.0.1
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backends[0])
        except OSError:
            writer.close()
        else:
            self._writers.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError):
            pass  # the other side went away
        finally:
            writer.close()
            self._writers.discard(writer)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()


async def test_the_shipped_clients_keep_their_call_through_a_drain(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """The demo page's widget and the agent app, both reaching node A through a load
    balancer, talk; A drains. Both reconnect to the same URL, which now leads to node B, and
    take the call over there: the audio never stops, and hanging up ends the call."""
    from playwright.async_api import async_playwright, expect
    from test_browser_e2e import (
        AGENT_PC,
        CHROMIUM,
        CHROMIUM_ARGS,
        HAVE_CHROMIUM,
        WAIT_MS,
        WIDGET_PC,
        Browsers,
        agent_signed_in,
        audio_flows,
        membrane_state,
        widget_says,
    )

    if not HAVE_CHROMIUM:
        pytest.skip(f"needs Debian's Chromium at {CHROMIUM}")
    balancer = TcpBalancer()
    await balancer.start()
    try:
        settings = make_settings(tmp_path, redis_url=redis_url)
        acme = settings.sites["acme"]
        acme = replace(acme, allowed_origins=(*acme.allowed_origins, balancer.url))
        b = await nodes(replace(settings, node_id="b", sites={**settings.sites, "acme": acme}))
        text = config().replace(
            'origins = ["http://127.0.0.1:8080"',
            f'origins = ["{balancer.url}", "http://127.0.0.1:8080"',
        )
        env = {"MEMBRANE_DRAIN_GRACE_S": str(GRACE_S)}
        async with (
            node_process(tmp_path, settings, redis_url, text, "a", env) as (a_url, proc),
            async_playwright() as p,
        ):
            balancer.backends[:] = [int(a_url.rsplit(":", 1)[1])]
            browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            browsers = Browsers(browser)
            try:
                token = mint(settings, "anna")
                anna = await browsers.open("anna", f"{balancer.url}/agent/#token={token}")
                await agent_signed_in(anna)
                visitor = await browsers.open("visitor", f"{balancer.url}/demo/")
                await visitor.get_by_test_id("membrane-button").click()
                await expect(anna.get_by_test_id("agent-ring")).to_be_visible(timeout=WAIT_MS)
                await anna.get_by_test_id("agent-accept").click()
                await widget_says(visitor, "Connected with Anna")
                await audio_flows(visitor, WIDGET_PC)
                await audio_flows(anna, AGENT_PC)
                call_id = (await membrane_state(visitor))["call"]["call_id"]

                proc.send_signal(signal.SIGTERM)

                async def a_unready() -> bool:
                    async with http.get(f"{a_url}/readyz") as r:
                        return r.status == 503

                await eventually(a_unready, 5)
                balancer.backends[:] = [int(b.url.rsplit(":", 1)[1])]  # the balancer noticed
                await asyncio.wait_for(proc.wait(), GRACE_S + EXIT_MARGIN_S)

                # Both apps are back, on B: the widget's socket took the call over, and the
                # agent app's named it. The audio never stopped.
                await eventually(lambda: agent_socket_on(b, "anna"), 10)
                await eventually(lambda: visitor_socket_on(b), 10)
                await audio_flows(visitor, WIDGET_PC)
                await audio_flows(anna, AGENT_PC)
                await widget_says(visitor, "Connected with Anna")
                await expect(anna.get_by_test_id("agent-call-state")).to_have_text("connected")
                stored = await stored_call(redis_url, call_id)
                assert stored["state"] == "connected"

                # The agent hangs up, through B: the call ends normally on both sides.
                await anna.get_by_test_id("agent-hangup").click()
                await widget_says(visitor, "Call ended")
                ended = (await membrane_state(visitor))["call"]
                assert ended["state"] == "completed" and ended["reason"] == "agent_hung_up"
                await agent_signed_in(anna, "available")
                # Only an availability stream reopened on A before the balancer noticed may
                # have been refused (EventSource retries by itself).
                refused = "HTTP 503 GET /v1/sites/acme/availability/stream"
                unexpected = [e for e in browsers.errors if not e.endswith(refused)]
                assert not unexpected, "\n".join(unexpected)
            finally:
                await browsers.close()
    finally:
        await balancer.close()


async def agent_socket_on(node: Any, agent_id: str) -> bool:
    from gateway.edge.http import appkeys

    namespace = node.app[appkeys.SIO].namespace_handlers["/agent"]
    return any(s.claims.sub == agent_id and s.calls for s in namespace.sessions.values())


async def visitor_socket_on(node: Any) -> bool:
    from gateway.edge.http import appkeys

    namespace = node.app[appkeys.SIO].namespace_handlers["/visitor"]
    return any(s.calls for s in namespace.sessions.values())


async def test_a_draining_node_hands_its_running_timers_over(redis_url: str) -> None:
    """Node A is running two timers when it drains: a ring timeout that finishes before the
    drain's deadline, and a callback step whose request to the phone network hangs. The first
    is done and gone; the second is cut off at the deadline and made due at once, so node B
    runs it now, not after A's 15 s lease."""
    from gateway.ops.tasks import TaskGroup
    from gateway.services.timers import TimerLoop
    from gateway.store.redis import RedisStore
    from gateway.wire.codec import Json

    async def no_event(event: Json) -> None:
        return None

    async def no_resync() -> None:
        return None

    stores = [RedisStore(redis_url, "a"), RedisStore(redis_url, "b")]
    tasks = TaskGroup("test")
    try:
        for store in stores:
            await store.start(no_event, no_resync)
        a, b = (TimerLoop(store, interval_s=0.05) for store in stores)
        running: asyncio.Queue[str] = asyncio.Queue()
        ring_may_end = asyncio.Event()
        on_b: asyncio.Queue[str] = asyncio.Queue()

        async def ring_on_a(rest: str) -> None:
            running.put_nowait(rest)
            await ring_may_end.wait()

        async def dial_on_a(rest: str) -> None:
            running.put_nowait(rest)
            await asyncio.Event().wait()  # the provider never answers

        async def on_b_any(rest: str) -> None:
            on_b.put_nowait(rest)

        a.on("ring", ring_on_a)
        a.on("cbdial", dial_on_a)
        b.on("ring", on_b_any)
        b.on("cbdial", on_b_any)
        now = time.time()
        await stores[0].schedule_timer("ring:c_1:1", now)
        await stores[0].schedule_timer("cbdial:c_2:1", now)
        a_task = tasks.spawn(a.run(), "a")
        claimed = {await asyncio.wait_for(running.get(), 5) for _ in range(2)}
        assert claimed == {"c_1:1", "c_2:1"}
        tasks.spawn(b.run(), "b")  # B starts once A holds both leases

        drain = tasks.spawn(a.hand_over(a_task, time.monotonic() + 0.5), "hand-over")
        ring_may_end.set()
        await asyncio.wait_for(drain, 5)
        assert a_task.done(), "A claims no more timers"
        assert await asyncio.wait_for(on_b.get(), 5) == "c_2:1", "handed over, not left to lapse"

        async def all_done() -> bool:
            return not await timers_left(redis_url, "c_")

        await eventually(all_done, 5)
        assert on_b.empty(), "the finished ring timeout did not run again"
    finally:
        await tasks.close()
        for store in stores:
            await store.close()


def test_only_the_calls_agent_takes_over_only_a_connected_browser_call() -> None:
    from gateway.core import call as calls
    from gateway.core.call import CallChannel, CallError, CallRequest

    new = calls.new_call("c_1", "acme", "v_1", CallChannel.WEBRTC, CallRequest(), 0.0, "vs")
    ringing = calls.ring(new, "anna", "Anna", ("idle",), 1.0, 20.0)
    connected = calls.accept(ringing, "anna", "old-sid", 2.0)
    moved = calls.reattach_agent(connected, "anna", "new-sid")
    assert moved.agent_sid == "new-sid" and moved.state is connected.state
    assert moved.timeline == connected.timeline, "nothing happened that anyone sees"
    ended = calls.end(connected, "agent_hung_up", "done", 3.0)
    callback = calls.accept(
        calls.ring(
            calls.new_call("c_2", "acme", "v_1", CallChannel.CALLBACK, CallRequest(), 0.0),
            "anna",
            "Anna",
            (),
            1.0,
            20.0,
        ),
        "anna",
        "old-sid",
        2.0,
    )
    for call, agent, code in (
        (connected, "ben", "invalid_state"),  # someone else's call
        (ringing, "anna", "invalid_state"),  # not answered yet
        (callback, "anna", "invalid_state"),  # its audio is on the phones
        (ended, "anna", "call_ended"),
    ):
        with pytest.raises(CallError) as refused:
            calls.reattach_agent(call, agent, "new-sid")
        assert refused.value.code == code
