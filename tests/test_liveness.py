"""Presence liveness: an agent's frozen client (SIGSTOP: its TCP connection open, nothing read
or answered) goes offline on every node within ``socket_ttl_s``, while an idle live one stays
online, and visitors' connections keep the server's long ping interval."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Node, NodeFactory, SocketClient, eventually, make_settings, mint, replace

from gateway.core.model import Role
from gateway.edge.http import appkeys as keys
from gateway.edge.sio.limits import agent_liveness
from gateway.edge.sio.upstream import LeanSocket
from gateway.services.presence_service import socket_device_id
from gateway.settings import PresenceSettings, Settings

TTL_S = 3.0

# A real agent app in a process of its own, so that it can be frozen: it connects to /agent,
# answers pings and reconnects as the shipped clients do, and says on stdout when it is in.
AGENT_CLIENT = """
import asyncio, sys
import socketio

async def main() -> None:
    url, token = sys.argv[1], sys.argv[2]
    sio = socketio.AsyncClient(reconnection=True, reconnection_delay=0.2)

    @sio.event(namespace="/agent")
    async def connect() -> None:
        print("connected", sio.get_sid("/agent"), flush=True)

    await sio.connect(url, namespaces=["/agent"], auth={"token": token},
                      transports=["websocket"], wait_timeout=5)
    await sio.wait()

asyncio.run(main())
"""


@asynccontextmanager
async def agent_process(
    tmp_path: Path, url: str, token: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    script = tmp_path / "agent_client.py"
    script.write_text(AGENT_CLIENT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), url, token, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            await proc.wait()


async def next_connect(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> str:
    """The socket id of the client's next connect to /agent."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert line.startswith(b"connected "), line
    return line.split()[1].decode()


def settings_for(tmp_path: Path, redis_url: str) -> Settings:
    return make_settings(
        tmp_path,
        redis_url=redis_url,
        presence=PresenceSettings(device_ttl_s=60.0, socket_ttl_s=TTL_S, sweep_interval_s=0.1),
    )


def status_on(node: Node) -> tuple[str, list[str]]:
    """Anna's status and devices as ``node`` knows them (what its board and routing read)."""
    anna = node.app[keys.PRESENCE].cached("acme", "anna")
    return anna.status.value, [d.device_id for d in anna.devices]


def anna_is(nodes: list[Node], status: str) -> Callable[[], Any]:
    async def check() -> bool:
        return all(status_on(n)[0] == status for n in nodes)

    return check


async def test_a_frozen_agent_client_goes_offline_on_every_node_within_the_socket_ttl(
    nodes: NodeFactory, redis_url: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = settings_for(tmp_path, redis_url)
    a = await nodes(replace(settings, node_id="node-a"))
    b = await nodes(replace(settings, node_id="node-b"))

    async with agent_process(tmp_path, a.url, mint(settings, "anna")) as agent:
        await next_connect(agent)
        await eventually(anna_is([a, b], "available"), 5)

        frozen_at = time.monotonic()
        agent.send_signal(signal.SIGSTOP)
        await eventually(anna_is([a, b], "offline"), TTL_S + 2)
        took = time.monotonic() - frozen_at
        assert took <= TTL_S + 2, took
        # Not before her last word could have been heard: pings every half of the TTL.
        assert took >= TTL_S - agent_liveness(TTL_S)[0] - 0.5, took

        # Woken, the client finds its connection cut, reconnects, and is back everywhere.
        agent.send_signal(signal.SIGCONT)
        sid = await next_connect(agent)
        await eventually(anna_is([a, b], "available"), 5)
        assert (status_on(b))[1] == [socket_device_id(sid)], "old one gone"


async def test_an_idle_live_agent_client_stays_online_well_past_the_socket_ttl(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    settings = settings_for(tmp_path, redis_url)
    a = await nodes(replace(settings, node_id="node-a"))
    b = await nodes(replace(settings, node_id="node-b"))
    sup = mint(settings, "sam", Role.SUPERVISOR)
    board = clients()
    await board.connect(b.url, "/board", {"token": sup})
    visitor = clients()
    r = await http.post(
        f"{a.url}/v1/sites/acme/sessions", json={}, headers={"Origin": "http://127.0.0.1:8080"}
    )
    await visitor.connect(a.url, "/visitor", {"token": (await r.json())["token"]})

    async with agent_process(tmp_path, a.url, mint(settings, "anna")) as agent:
        sid = await next_connect(agent)
        # The board on node b hears her come online (from node a, through Redis) before the
        # idle time starts: that event is the connect, not a change while idle.
        await board.next(
            "presence:update", lambda p: p["agent_id"] == "anna" and p["status"] == "available", 5
        )
        await eventually(anna_is([a, b], "available"), 5)
        board.pending("presence:update")

        # Three TTLs of silence from the app itself: only pings and pongs on its connection.
        # Nothing about Anna changes on any board, and the app never has to reconnect.
        async def anything_about_anna() -> Any:
            return await board.next("presence:update", lambda p: p["agent_id"] == "anna", 99)

        try:
            change = await asyncio.wait_for(anything_about_anna(), 3 * TTL_S)
            raise AssertionError(f"Anna changed while idle: {change}")
        except TimeoutError:
            pass
        # Still the socket it connected first: it was never cut.
        for node in (a, b):
            assert status_on(node) == ("available", [socket_device_id(sid)])

        # Only the agent's connection is watched; the visitor's keeps the server's interval.
        sockets = [s for s in a.app[keys.SIO].eio.sockets.values() if isinstance(s, LeanSocket)]
        watched = [(s.ping_every_s, s.silence_limit_s) for s in sockets if s.silence_limit_s]
        assert len(sockets) == 2 and watched == [agent_liveness(TTL_S)]
