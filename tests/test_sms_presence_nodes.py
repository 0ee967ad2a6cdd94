"""Presence by SMS on real nodes: two gateway nodes on one Redis behind a load balancer, the
Twilio simulator texting the site's number (the signed Messaging webhook, POST /v1/twilio/sms),
and a supervisor's /board on each node. Time is a ManualClock set to a Wednesday (the demo's
Dublin branch is open 08:00-20:00 UTC, Berlin 09:00-18:00 local = 08:00-17:00 UTC)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    WEEKDAY_NOON_UTC,
    Node,
    NodeFactory,
    SocketClient,
    mint,
    replace,
    start_node,
)
from test_callback_nodes import Balancer
from test_callbacks import ANNA_PHONE, BEN_PHONE, phone_settings
from twilio_sim import MessageRecord, TwilioSim

from gateway.core.model import Role
from gateway.edge.http import appkeys as keys
from gateway.ops.clock import ManualClock
from gateway.services.sms_presence import SMS_DEVICE_ID
from gateway.settings import Settings

pytestmark = pytest.mark.timeout(60)

SITE_NUMBER = "+15005550006"  # the demo site's caller id
STRANGER = "+14155550199"
CARLA_PHONE = "+447700900123"
HOUR = 3600.0


@dataclass
class Cluster:
    sim: TwilioSim
    nodes: list[Node]
    boards: list[SocketClient]
    balancer: Balancer
    settings: Settings

    async def text(self, from_: str, body: str, **options: Any) -> MessageRecord:
        return await self.sim.messaging.text(from_, SITE_NUMBER, body, **options)

    async def seen_everywhere(self, agent: str, where: Callable[[Any], bool]) -> list[Any]:
        """The next presence update of ``agent`` on every node's board, which must match."""
        seen = []
        for board in self.boards:
            update = await board.next("presence:update", lambda p: p["agent_id"] == agent)
            assert where(update), update
            seen.append(update)
        return seen

    def cached(self, agent: str) -> list[Any]:
        return [n.app[keys.PRESENCE].cached("acme", agent) for n in self.nodes]


def status(name: str, channels: tuple[str, ...] = ()) -> Callable[[Any], bool]:
    def check(p: Any) -> bool:
        sms = [d for d in p["devices"] if d["device_id"] == SMS_DEVICE_ID]
        return (
            p["status"] == name
            and list(p["channels"]) == list(channels)
            and (name == "offline" or (len(sms) == 1 and sms[0]["kind"] == "mobile"))
        )

    return check


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    sim = TwilioSim(time_scale=0.05)
    await sim.start()
    yield sim
    await sim.close()
    assert sim.contract_violations == []


async def start_cluster(
    nodes: Callable[..., Awaitable[Node]],
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    clock: ManualClock,
    clients: Callable[[], SocketClient],
) -> Cluster:
    balancer = Balancer()
    await balancer.start()
    base = phone_settings(tmp_path, sim, redis_url)
    acme = base.sites["acme"]
    # Carla's branch is open around the clock: no closing time, so the default lease.
    carla = replace(acme.agents["carla"], mobile=CARLA_PHONE)
    base = replace(
        base,
        port=0,
        public_url=balancer.url,
        sites={"acme": replace(acme, agents={**acme.agents, "carla": carla})},
    )
    started = [
        await nodes(replace(base, node_id=f"node-{name}"), clock=clock) for name in ("a", "b")
    ]
    balancer.backends = [n.url for n in started]
    boards = []
    for node in started:
        board = clients()
        await board.connect(node.url, "/board", {"token": mint(base, "sam", Role.SUPERVISOR)})
        boards.append(board)
    sim.messaging.number(SITE_NUMBER, sms_url=balancer.url + "/v1/twilio/sms")
    return Cluster(sim, started, boards, balancer, base)


@pytest.fixture
async def cluster(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    clients: Callable[[], SocketClient],
) -> AsyncIterator[Cluster]:
    clock = ManualClock(WEEKDAY_NOON_UTC)
    cluster = await start_cluster(nodes, tmp_path, sim, redis_url, clock, clients)
    yield cluster
    await cluster.balancer.close()


def replied(message: MessageRecord) -> str:
    assert [h.status for h in message.webhooks] == [200], message.webhooks
    assert message.notifications == []
    (body,) = message.reply_bodies
    return body


async def test_in_busy_out_are_seen_on_every_node(cluster: Cluster) -> None:
    closing = WEEKDAY_NOON_UTC + 8 * HOUR  # Dublin closes at 20:00 (UTC+0 in December)
    message = await cluster.text(ANNA_PHONE, "  in ")
    assert replied(message) == "You're available on your mobile until 20:00."
    await cluster.seen_everywhere("anna", status("available", ("pstn",)))
    for presence in cluster.cached("anna"):
        (device,) = presence.devices
        assert (device.device_id, device.kind, device.expires_at) == ("sms", "mobile", closing)

    message = await cluster.text(ANNA_PHONE, "BUSY")
    assert replied(message) == "You're busy until 20:00."
    await cluster.seen_everywhere("anna", status("busy"))

    message = await cluster.text(ANNA_PHONE, "Out")
    assert replied(message) == "You're signed out on your mobile."
    await cluster.seen_everywhere("anna", status("offline"))
    # The webhooks landed on both nodes: each acted for the whole cluster.
    assert {backend for backend, _, _ in cluster.balancer.webhooks()} == {
        n.url for n in cluster.nodes
    }


async def test_replies_in_the_agents_language_and_back_fires_once(cluster: Cluster) -> None:
    clock = cluster.nodes[0].clock
    assert isinstance(clock, ManualClock)
    message = await cluster.text(BEN_PHONE, "DA")
    assert replied(message) == "Sie sind auf dem Handy erreichbar bis 18:00."  # Berlin
    await cluster.seen_everywhere("ben", status("available", ("pstn",)))

    message = await cluster.text(BEN_PHONE, "zurück 15")
    assert replied(message) == "Sie sind abwesend; wieder erreichbar um 13:15."
    await cluster.seen_everywhere("ben", status("away"))

    await clock.advance(14 * 60)
    assert all(p.status == "away" for p in cluster.cached("ben"))
    await clock.advance(60)
    await cluster.seen_everywhere("ben", status("available", ("pstn",)))
    # Once: a later look at the timers finds nothing more to do, on either node.
    await clock.advance(5 * 60)
    message = await cluster.text(BEN_PHONE, "besetzt")
    assert replied(message) == "Sie sind besetzt bis 18:00."
    for board in cluster.boards:
        update = await board.next("presence:update", lambda p: p["agent_id"] == "ben")
        assert status("busy")(update)  # nothing came between the timer and this text


async def test_a_later_text_cancels_back(cluster: Cluster) -> None:
    clock = cluster.nodes[0].clock
    assert isinstance(clock, ManualClock)
    await cluster.text(ANNA_PHONE, "BACK 10")
    await cluster.seen_everywhere("anna", status("away"))
    message = await cluster.text(ANNA_PHONE, "busy")
    assert replied(message) == "You're busy until 20:00."
    await cluster.seen_everywhere("anna", status("busy"))
    await clock.advance(11 * 60)
    # The timer found the device changed since and did nothing.
    await cluster.text(ANNA_PHONE, "OUT")
    await cluster.seen_everywhere("anna", status("offline"))


async def test_refused_and_ignored_texts_change_nothing(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    first = await cluster.text(ANNA_PHONE, "IN")
    await cluster.seen_everywhere("anna", status("available", ("pstn",)))
    await cluster.text(ANNA_PHONE, "OUT")
    await cluster.seen_everywhere("anna", status("offline"))

    # The same MessageSid again (Twilio retrying, or someone replaying a captured request):
    # signed and valid, but acted on once only, and not answered a second time.
    replay = await cluster.text(ANNA_PHONE, "IN", message_sid=first.sid)
    assert [h.status for h in replay.webhooks] == [200] and replay.replies == []
    # A stranger, and a command nobody knows: a short reply each, nothing changed.
    stranger = await cluster.text(STRANGER, "IN")
    assert replied(stranger) == "This number isn't registered with Membrane."
    # Each reply is a billed SMS: a stranger gets three an hour, then silence.
    for _ in range(2):
        assert replied(await cluster.text(STRANGER, "IN")).startswith("This number")
    ignored = await cluster.text(STRANGER, "IN")
    assert [h.status for h in ignored.webhooks] == [200] and ignored.replies == []
    nonsense = await cluster.text(ANNA_PHONE, "please put me in")
    assert replied(nonsense) == (
        "Text IN to be available, OUT to sign out, BUSY, or BACK 15 (minutes)."
    )
    too_long = await cluster.text(ANNA_PHONE, "BACK 300")
    assert replied(too_long) == "Text BACK and the minutes, from 1 to 240: BACK 15."
    # Signed, but for another account, or without a MessageSid: refused with their codes.
    other = await cluster.text(ANNA_PHONE, "IN", params={"AccountSid": "AC" + "0" * 32})
    assert [h.status for h in other.webhooks] == [403] and other.replies == []
    assert '"forbidden"' in other.webhooks[0].body
    unnamed = await cluster.text(ANNA_PHONE, "IN", params={"MessageSid": ""})
    assert [h.status for h in unnamed.webhooks] == [400]
    assert '"invalid_payload"' in unnamed.webhooks[0].body
    # Forged: a wrong signature, none at all, and a signed form with a changed body.
    form = {k: v[0] for k, v in first.params.items()} | {"MessageSid": "SM" + "1" * 32}
    url = cluster.balancer.url + "/v1/twilio/sms"
    signature = first.webhooks[0].signature  # valid for the first form, not this one
    for headers in ({"X-Twilio-Signature": "Zm9yZ2Vk"}, {}, {"X-Twilio-Signature": signature}):
        r = await http.post(url, data=form, headers=headers)
        assert r.status == 403, await r.text()
        assert (await r.json())["error"]["code"] == "invalid_signature"
    counted = 0.0
    for node in cluster.nodes:
        text = await (await http.get(f"{node.url}/metrics")).text()
        for line in text.splitlines():
            if line.startswith('membrane_errors_total{code="invalid_signature"}'):
                counted += float(line.split()[-1])
    assert counted == 3

    # Nothing of that reached presence: the next update anywhere is this one.
    await cluster.text(ANNA_PHONE, "BUSY")
    for board in cluster.boards:
        update = await board.next("presence:update")
        assert update["agent_id"] == "anna" and status("busy")(update), update


async def test_the_lease_ends_when_the_branch_closes(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    clients: Callable[[], SocketClient],
) -> None:
    clock = ManualClock(WEEKDAY_NOON_UTC + 7 * HOUR + 50 * 60)  # 19:50 in Dublin
    cluster = await start_cluster(nodes, tmp_path, sim, redis_url, clock, clients)
    try:
        assert replied(await cluster.text(ANNA_PHONE, "IN")) == (
            "You're available on your mobile until 20:00."
        )
        await cluster.seen_everywhere("anna", status("available", ("pstn",)))
        # BACK past the closing: away until the branch closes, and no timer to come back.
        message = await cluster.text(ANNA_PHONE, "back 15")
        assert replied(message) == "You're away until 20:00, when your branch closes."
        await cluster.seen_everywhere("anna", status("away"))
        # Carla's branch never closes: the default lease, 8 h.
        message = await cluster.text(CARLA_PHONE, "in")
        assert replied(message) == "You're available on your mobile until 03:50 UTC."
        await cluster.seen_everywhere("carla", status("available", ("pstn",)))

        await clock.advance(10 * 60)  # 20:00: the sweeper ends Anna's lease on every node
        await cluster.seen_everywhere("anna", status("offline"))
        assert all(p.status == "available" for p in cluster.cached("carla"))
    finally:
        await cluster.balancer.close()


async def test_back_survives_a_restart_of_every_node(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    redis_url: str,
    clients: Callable[[], SocketClient],
) -> None:
    clock = ManualClock(WEEKDAY_NOON_UTC)

    async def own_node(settings: Settings, clock: ManualClock) -> Node:
        return await start_node(settings, clock)  # stopped by the test, not the fixture

    cluster = await start_cluster(own_node, tmp_path, sim, redis_url, clock, clients)
    try:
        await cluster.text(BEN_PHONE, "ZURÜCK 15")
        await cluster.seen_everywhere("ben", status("away"))
        for node in cluster.nodes:
            await node.stop()
        # A node started afterwards finds Ben away in Redis, and his timer with him.
        fresh = await nodes(replace(cluster.settings, node_id="node-c"), clock=clock)
        assert fresh.app[keys.PRESENCE].cached("acme", "ben").status == "away"
        board = clients()
        await board.connect(
            fresh.url, "/board", {"token": mint(cluster.settings, "sam", Role.SUPERVISOR)}
        )
        await clock.advance(15 * 60)
        update = await board.next("presence:update", lambda p: p["agent_id"] == "ben")
        assert status("available", ("pstn",))(update), update
    finally:
        await cluster.balancer.close()


async def test_one_node_on_the_embedded_store(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim
) -> None:
    node = await nodes(phone_settings(tmp_path, sim))
    sim.messaging.number(SITE_NUMBER, sms_url=node.url + "/v1/twilio/sms")
    message = await sim.messaging.text(ANNA_PHONE, SITE_NUMBER, "IN")
    assert replied(message).startswith("You're available on your mobile until ")
    presence = node.app[keys.PRESENCE].cached("acme", "anna")
    assert presence.status == "available" and presence.channels == ("pstn",)
    await sim.messaging.text(ANNA_PHONE, SITE_NUMBER, "OUT")
    replay = await sim.messaging.text(ANNA_PHONE, SITE_NUMBER, "IN", message_sid=message.sid)
    assert replay.replies == []
    assert node.app[keys.PRESENCE].cached("acme", "anna").status == "offline"
