"""The XMPP presence bridge against a real Prosody: an agent's XMPP presence reaches the
Membrane board on every node of a cluster through the signed IM presence webhook."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import slixmpp
from conftest import NodeFactory, SocketClient, mint, replace
from prosody import Prosody, prosody
from test_im_presence import SECRET, board_shows, doc_block, im_settings

from gateway.cli import main
from gateway.core.model import Role
from gateway.edge.http import appkeys as keys
from gateway.integrations.bridge_config import (
    BridgeConfig,
    BridgeConfigError,
    load_config,
    parse_config,
)
from gateway.integrations.xmpp_bridge import PresenceBridge, close_client, im_state

__all__ = ["prosody"]  # the fixture, used by name

PASSWORD = "xmpp-test-password"


class Agent:
    """A person's XMPP client (slixmpp), as Gajim or Conversations would be."""

    def __init__(self, server: Prosody, user: str) -> None:
        self.client = slixmpp.ClientXMPP(f"{server.jid(user)}/laptop", PASSWORD)
        self.client.enable_starttls = False
        self.client.enable_direct_tls = False
        self.client.enable_plaintext = True
        self.client.plugin["feature_mechanisms"].unencrypted_scram = True
        self.server = server
        self.started = asyncio.Event()
        self.client.add_event_handler("session_start", self._started)
        self.show = ""

    async def _started(self, _: Any) -> None:
        self.client.send_presence(pshow=self.show)
        await self.client.get_roster()
        self.started.set()

    async def log_in(self, show: str) -> None:
        self.show = show
        self.client.connect("127.0.0.1", self.server.port)
        await asyncio.wait_for(self.started.wait(), 10)

    def set(self, show: str) -> None:
        self.client.send_presence(pshow=show)

    async def log_off(self) -> None:
        await close_client(self.client)


@pytest.fixture
async def agents() -> AsyncIterator[Callable[[Prosody, str], Agent]]:
    made: list[Agent] = []

    def factory(server: Prosody, user: str) -> Agent:
        agent = Agent(server, user)
        made.append(agent)
        return agent

    yield factory
    for agent in made:
        await agent.log_off()


def bridge_config(server: Prosody, gateway_url: str, **changes: Any) -> BridgeConfig:
    return replace(
        BridgeConfig(
            gateway_url=gateway_url,
            site="acme",
            secret=SECRET,
            jid=server.jid("membrane-bridge"),
            password=PASSWORD,
            agents={server.jid("anna"): "anna", server.jid("ben"): "ben"},
            host="127.0.0.1",
            port=server.port,
            allow_unencrypted=True,
            settle_s=0.2,
        ),
        **changes,
    )


@pytest.fixture
async def running() -> AsyncIterator[Callable[[PresenceBridge], None]]:
    bridges: list[tuple[PresenceBridge, asyncio.Task[None]]] = []

    def start(bridge: PresenceBridge) -> None:
        bridges.append((bridge, asyncio.create_task(bridge.run(), name="test-bridge")))

    yield start
    for bridge, task in bridges:
        await bridge.stop()
        await task


async def delivered(bridge: PresenceBridge, agent: str, state: str) -> None:
    """Until the gateway took ``state`` for ``agent`` from the bridge."""

    async def wait() -> None:
        while await bridge.delivered.get() != (agent, state):
            pass

    await asyncio.wait_for(wait(), 10)


async def test_xmpp_presence_reaches_the_board_on_every_node(
    prosody: Prosody,
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    agents: Callable[[Prosody, str], Agent],
    running: Callable[[PresenceBridge], None],
) -> None:
    for user in ("membrane-bridge", "anna", "ben"):
        prosody.register(user, PASSWORD)
    settings = im_settings(tmp_path, redis_url)
    a = await nodes(replace(settings, node_id="node-a"))
    b = await nodes(replace(settings, node_id="node-b"))
    boards = []
    for node in (a, b):
        board = clients()
        await board.connect(node.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
        boards.append(board)

    # The bridge posts to node A only; the boards of both nodes follow.
    bridge = PresenceBridge(bridge_config(prosody, a.url, renew_s=1.0), http)
    running(bridge)
    await asyncio.wait_for(bridge.online.wait(), 10)

    # Anna logs in to XMPP as away (and approves the bridge's subscription request, as her
    # client does by default).
    anna = agents(prosody, "anna")
    await anna.log_in("away")
    for board in boards:
        await board.next("presence:update", board_shows("anna", "away", "away"))

    anna.set("chat")
    for board in boards:
        await board.next("presence:update", board_shows("anna", "available", "available"))
    first = (await a.app[keys.STORE].get_presence("acme", "anna")).devices[0]

    # The bridge posts her state again every renew_s, renewing the im device's lease: the
    # change's own delivery, then the renewal.
    await delivered(bridge, "anna", "available")
    await delivered(bridge, "anna", "available")
    renewed = (await a.app[keys.STORE].get_presence("acme", "anna")).devices[0]
    assert renewed.expires_at > first.expires_at and renewed.state == first.state

    anna.set("dnd")
    for board in boards:
        await board.next("presence:update", board_shows("anna", "dnd", "dnd"))

    # Logging off: the im device is gone, and with no other device she is offline.
    await anna.log_off()
    for board in boards:
        await board.next("presence:update", board_shows("anna", "offline", None))
    assert (await b.app[keys.STORE].get_presence("acme", "anna")).devices == ()


async def test_the_bridge_reconnects_and_resyncs(
    prosody: Prosody,
    nodes: NodeFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    agents: Callable[[Prosody, str], Agent],
    running: Callable[[PresenceBridge], None],
) -> None:
    for user in ("membrane-bridge", "anna", "ben"):
        prosody.register(user, PASSWORD)
    node = await nodes(im_settings(tmp_path))
    # zed is no agent of the site: the gateway refuses the first batch for him, and the
    # bridge posts its updates one by one, dropping only his.
    config = bridge_config(prosody, node.url)
    config = replace(config, agents={**config.agents, prosody.jid("zed"): "zed"})
    bridge = PresenceBridge(config, http)
    running(bridge)
    await asyncio.wait_for(bridge.online.wait(), 10)
    taken = {await asyncio.wait_for(bridge.delivered.get(), 10) for _ in range(2)}
    assert taken == {("anna", "offline"), ("ben", "offline")}
    ben = agents(prosody, "ben")
    await ben.log_in("xa")
    await delivered(bridge, "ben", "away")
    await ben.log_off()
    await delivered(bridge, "ben", "offline")

    # The XMPP server restarts: the bridge connects again by itself and posts every agent's
    # state once it has heard the contacts' presence.
    prosody.stop()
    await asyncio.wait_for(bridge.offline.wait(), 10)
    prosody.start()
    await asyncio.wait_for(bridge.online.wait(), 30)
    ben = agents(prosody, "ben")
    await ben.log_in("")
    await delivered(bridge, "ben", "available")
    assert node.app[keys.PRESENCE].cached("acme", "ben").status == "available"


@pytest.mark.parametrize(
    ("shows", "state"),
    [
        ([], "offline"),
        ([None], "available"),
        (["chat"], "available"),
        (["away"], "away"),
        (["xa"], "away"),
        (["dnd"], "dnd"),
        (["away", None], "available"),
        (["xa", "away"], "away"),
        (["chat", "dnd"], "dnd"),
    ],
)
def test_xmpp_show_to_membrane_state(shows: list[str | None], state: str) -> None:
    resources = {f"r{i}": {"show": show, "priority": 0} for i, show in enumerate(shows)}
    assert im_state(resources) == state


def test_the_bridge_config_is_checked() -> None:
    raw: dict[str, Any] = {
        "membrane": {"url": "https://membrane.example/", "site": "acme"},
        "xmpp": {"jid": "bot@chat.example", "password": "pw"},
        "agents": {"Anna@Chat.Example": "anna"},
    }
    env = {"MEMBRANE_BRIDGE_WEBHOOK_SECRET": "s" * 32}
    config = parse_config(raw, env)
    assert config.gateway_url == "https://membrane.example" and config.secret == "s" * 32
    assert config.agents == {"anna@chat.example": "anna"} and config.renew_s == 3600
    assert "s" * 32 not in repr(config) and "pw" not in repr(config)
    with pytest.raises(BridgeConfigError, match=r"membrane\.secret"):
        parse_config(raw, {})
    with pytest.raises(BridgeConfigError, match=r"membrane\.secret"):
        parse_config(raw, {"MEMBRANE_BRIDGE_WEBHOOK_SECRET": "short"})
    with pytest.raises(BridgeConfigError, match="agents"):
        parse_config({**raw, "agents": {"anna": "anna"}}, env)
    with pytest.raises(BridgeConfigError, match=r"xmpp\.jid"):
        parse_config({**raw, "xmpp": {"jid": "bot", "password": "pw"}}, env)


def test_the_documented_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "xmpp-bridge.toml"
    path.write_text(doc_block("toml", "[agents]"))
    env = {"MEMBRANE_BRIDGE_WEBHOOK_SECRET": SECRET, "MEMBRANE_BRIDGE_XMPP_PASSWORD": "pw"}
    config = load_config(path, env)
    assert config.site == "acme" and config.jid == "membrane-presence@chat.example.com"
    assert config.agents == {"anna@chat.example.com": "anna", "ben@chat.example.com": "ben"}
    # Without the variables it reads the files the example names, which are not here.
    with pytest.raises(BridgeConfigError, match=r"membrane\.secret_file"):
        load_config(path, {})


async def test_membrane_xmpp_bridge_runs_as_a_service(
    prosody: Prosody,
    nodes: NodeFactory,
    tmp_path: Path,
    clients: Callable[[], SocketClient],
    agents: Callable[[Prosody, str], Agent],
) -> None:
    """The command line an operator runs (docs/AGENT_PRESENCE.md), in its own process, until
    SIGTERM."""
    for user in ("membrane-bridge", "anna"):
        prosody.register(user, PASSWORD)
    settings = im_settings(tmp_path)
    node = await nodes(settings)
    board = clients()
    await board.connect(node.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    config = tmp_path / "xmpp-bridge.toml"
    config.write_text(
        f'[membrane]\nurl = "{node.url}"\nsite = "acme"\n'
        f'[xmpp]\njid = "{prosody.jid("membrane-bridge")}"\npassword = "{PASSWORD}"\n'
        f'host = "127.0.0.1"\nport = {prosody.port}\nallow_unencrypted = true\n'
        f'[bridge]\nsettle_s = 0.2\n[agents]\n"{prosody.jid("anna")}" = "anna"\n'
    )
    log_path = tmp_path / "bridge.log"
    with log_path.open("wb") as log:
        bridge = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "xmpp-bridge", "--config", str(config),
            env={**os.environ, "MEMBRANE_BRIDGE_WEBHOOK_SECRET": SECRET},
            stdout=log, stderr=log,
        )  # fmt: skip
        try:
            anna = agents(prosody, "anna")
            await anna.log_in("away")
            await board.next("presence:update", board_shows("anna", "away", "away"), 20)
            bridge.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(bridge.wait(), 15) == 0, log_path.read_text()
        finally:
            if bridge.returncode is None:
                bridge.kill()
                await bridge.wait()


def test_a_bad_bridge_config_stops_the_command(tmp_path: Path) -> None:
    assert main(["xmpp-bridge", "--config", str(tmp_path / "missing.toml")]) == 2
