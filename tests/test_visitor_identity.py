"""A visitor id is no key: only the secret the gateway gave a visitor keeps their id.

The attack these tests stop: agents and supervisors see visitor ids, and a session for a
victim's id used to take over the victim's live call on connect (the path a socket blip
takes), receive the agent's answer and end the call on leaving. Real nodes, real socket.io
clients; one node of each store, and two nodes sharing Redis.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    WEEKDAY_NOON_UTC,
    Node,
    NodeFactory,
    SocketClient,
    Spy,
    make_settings,
    mint,
    replace,
)

from gateway.core.call import CallChannel, CallError, CallRequest, new_call, reattach
from gateway.core.errors import DomainError
from gateway.edge.http import appkeys
from gateway.edge.visitor_identity import VisitorIdentity, new_visitor_id
from gateway.ops.clock import ManualClock
from gateway.settings import AuthSettings, Settings, WebRTCSettings
from gateway.wire.codec import (
    VISITOR_ID_PATTERN,
    VISITOR_SECRET_PATTERN,
    SessionRequest,
    session_request_from_wire,
    session_to_wire,
)

ORIGIN = {"Origin": "http://127.0.0.1:8080"}
KEY = "k" * 48


def fast(settings: Settings) -> Settings:
    sites = {k: replace(s, ring_timeout_s=3.0) for k, s in settings.sites.items()}
    return replace(settings, sites=sites)


@pytest.fixture
def clock() -> ManualClock:
    """This module's nodes start on a weekday at noon, with every branch open: who is rung
    first must not depend on the hour the suite runs at."""
    return ManualClock(start=WEEKDAY_NOON_UTC)


@pytest.fixture(params=["embedded", "redis"])
async def node(
    request: pytest.FixtureRequest, nodes: NodeFactory, tmp_path: Path, clock: ManualClock
) -> Node:
    """A node whose time moves only when a test moves ``clock`` on: a blip never outlasts
    a grace period by accident."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    return await nodes(fast(make_settings(tmp_path, redis_url=url)), clock=clock)


async def session(http: aiohttp.ClientSession, node: Node, body: Any = None) -> dict[str, Any]:
    r = await http.post(f"{node.url}/v1/sites/acme/sessions", json=body or {}, headers=ORIGIN)
    assert r.status == 201, await r.text()
    data: dict[str, Any] = await r.json()
    return data


def proof(s: dict[str, Any]) -> dict[str, Any]:
    return {"visitor_id": s["visitor_id"], "visitor_secret": s["visitor_secret"]}


async def agent(clients: Callable[[], SocketClient], node: Node, name: str) -> SocketClient:
    c = clients()
    await c.connect(node.url, "/agent", {"token": mint(node.settings, name)})
    await c.next("presence:update", lambda p: p["agent_id"] == name)
    return c


async def visitor(clients: Callable[[], SocketClient], node: Node, token: str) -> SocketClient:
    c = clients()
    await c.connect(node.url, "/visitor", {"token": token})
    return c


def drain(client: SocketClient, event: str) -> list[Any]:
    """What ``client`` received of ``event`` so far."""
    queue = client.queue(event)
    return [queue.get_nowait() for _ in range(queue.qsize())]


def state_is(state: str) -> Callable[[Any], bool]:
    return lambda call: call["state"] == state


async def connected_call(
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    node: Node,
    ben: SocketClient,
    language: str = "de",
) -> tuple[dict[str, Any], SocketClient, dict[str, Any]]:
    """A new visitor talking to Ben: their session, socket and Ben's ring."""
    s = await session(http, node)
    v = await visitor(clients, node, s["token"])
    assert (await v.call("call:start", {"language": language}, "/visitor"))["ok"]
    ring = await ben.next("call:ring")
    assert (await ben.call("call:accept", {"call_id": ring["call_id"]}, "/agent"))["ok"]
    await v.next("call:update", state_is("connected"))
    return s, v, ring


# --- the pure parts ------------------------------------------------------------------------


def test_a_secret_proves_one_id_on_one_site_under_one_key() -> None:
    keys = VisitorIdentity(KEY)
    vid = new_visitor_id()
    assert VISITOR_ID_PATTERN.fullmatch(vid)
    secret = keys.secret("acme", vid)
    assert VISITOR_SECRET_PATTERN.fullmatch(secret)
    assert keys.identify("acme", vid, secret) == vid
    assert VisitorIdentity(KEY).identify("acme", vid, secret) == vid, "any node with the key"
    other = new_visitor_id()
    refused = [
        (None, secret),
        (vid, None),
        (other, secret),  # someone else's secret
        (vid, keys.secret("acme", other)),
        (vid, keys.secret("globex", vid)),  # the same visitor id on another site
        (vid, VisitorIdentity("x" * 48).secret("acme", vid)),  # another gateway's key
        (vid, secret[:-1] + ("A" if secret[-1] != "A" else "B")),
        (vid, "é" * 43),
    ]
    for claimed, proof_ in refused:
        assert keys.identify("acme", claimed, proof_) is None, (claimed, proof_)


def test_no_signing_key_no_visitor_secrets() -> None:
    with pytest.raises(ValueError):
        VisitorIdentity.from_auth(AuthSettings(secret=""))
    pem_keys = VisitorIdentity.from_auth(AuthSettings(algorithm="RS256", private_key_pem="PEM"))
    assert pem_keys.secret("acme", "v_" + "a" * 24) != VisitorIdentity(KEY).secret(
        "acme", "v_" + "a" * 24
    )


def test_the_turn_name_is_a_stable_pseudonym() -> None:
    keys = VisitorIdentity(KEY)
    vid = new_visitor_id()
    name = keys.turn_name("acme", vid)
    assert name == keys.turn_name("acme", vid) and name.startswith("v-")
    assert vid[2:] not in name and ":" not in name
    assert name != keys.turn_name("acme", new_visitor_id())
    assert name != keys.secret("acme", vid) and name[2:] not in keys.secret("acme", vid)


def test_a_session_request_is_both_parts_or_no_claim() -> None:
    vid, secret = "v_" + "a" * 24, "s" * 43
    assert session_request_from_wire({"visitor_id": vid, "visitor_secret": secret}) == (
        SessionRequest(vid, secret)
    )
    for body in (
        {},
        {"visitor_id": vid},
        {"visitor_id": vid, "visitor_secret": None},
        {"visitor_id": vid, "visitor_secret": 7},
        {"visitor_id": vid, "visitor_secret": secret + "\n"},
        {"visitor_id": vid, "visitor_secret": "s" * 42},
        {"visitor_id": "anna", "visitor_secret": secret},
        {"visitor_id": [vid], "visitor_secret": secret},
        {"visitor_secret": secret},
    ):
        assert session_request_from_wire(body) == SessionRequest(None, None), body
    with pytest.raises(DomainError) as e:
        session_request_from_wire([vid, secret])
    assert e.value.code == "invalid_payload"


def test_a_session_round_trips_into_the_next_request() -> None:
    keys = VisitorIdentity(KEY)
    vid = new_visitor_id()
    wire = session_to_wire("t", vid, keys.secret("acme", vid), 1.0e9, [])
    assert set(wire) == {"token", "visitor_id", "visitor_secret", "expires_at", "ice_servers"}
    claim = session_request_from_wire(wire)
    assert keys.identify("acme", claim.visitor_id, claim.visitor_secret) == vid


def test_only_the_calls_own_visitor_reattaches() -> None:
    call = new_call("c1", "acme", "v_victim_0123456789ab", CallChannel.WEBRTC, CallRequest(), 0.0)
    assert reattach(call, "acme", call.visitor_id, "sid-2").visitor_sid == "sid-2"
    for site, visitor_id in (("acme", "v_attacker_0123456789"), ("globex", call.visitor_id)):
        with pytest.raises(CallError) as e:
            reattach(call, site, visitor_id, "sid-3")
        assert e.value.code == "not_found"


# --- the attack, on real nodes -------------------------------------------------------------


async def test_a_known_visitor_id_gets_no_session_nor_the_victims_call(
    node: Node,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    calls = node.app[appkeys.CALLS]
    left = Spy(calls, "visitor_left")
    ben = await agent(clients, node, "ben")
    victim_session, victim, ring = await connected_call(http, node=node, clients=clients, ben=ben)
    call_id = ring["call_id"]
    victim_id = ring["visitor"]["id"]  # what every agent and supervisor sees
    assert victim_id == victim_session["visitor_id"]

    # Whatever the attacker sends with the id, they are someone new.
    attacker_session = await session(http, node)
    tries = [
        {"visitor_id": victim_id},
        {"visitor_id": victim_id, "visitor_secret": attacker_session["visitor_secret"]},
        {"visitor_id": victim_id, "visitor_secret": "A" * 43},
        {"visitor_id": victim_id, "visitor_secret": victim_session["visitor_secret"][:42]},
    ]
    given = [await session(http, node, body) for body in tries]
    assert all(s["visitor_id"] != victim_id for s in given)
    assert len({s["visitor_id"] for s in given}) == len(given), "each a new visitor"
    assert all(s["visitor_secret"] != victim_session["visitor_secret"] for s in given)

    # Their socket takes nothing over and is no party to the call.
    attacker = await visitor(clients, node, given[0]["token"])
    offer = {"call_id": call_id, "description": {"type": "offer", "sdp": "v=0\r\n"}}
    denied = await attacker.call("rtc:signal", offer, "/visitor")
    assert denied["error"]["code"] == "forbidden"
    # Not even blocked by an open call: the attacker's own start is their own (Ben is busy).
    own = await attacker.call("call:start", {}, "/visitor")
    assert own["ok"] and own["call"]["call_id"] != call_id
    stored = await node.app[appkeys.CALLS].get(call_id)
    assert stored.visitor_sid == victim.sio.get_sid("/visitor"), "the call is still the victim's"

    # Ben's answer reaches the victim only.
    answer = {"call_id": call_id, "description": {"type": "answer", "sdp": "v=0\r\n"}}
    assert (await ben.call("rtc:signal", answer, "/agent"))["ok"]
    assert await victim.next("rtc:signal") == answer
    assert (await victim.call("rtc:signal", offer, "/visitor"))["ok"]
    assert await ben.next("rtc:signal") == offer
    assert attacker.queue("rtc:signal").empty()
    assert all(u["call_id"] != call_id for u in drain(attacker, "call:update"))

    # The attacker leaves: the victim's call carries on past the grace period.
    drain(ben, "call:update")
    await attacker.sio.disconnect()
    await left.next()  # the node has handled the attacker's leave
    await clock.advance(calls.visitor_grace_s + 1)
    assert (await calls.get(call_id)).state.value == "connected"
    assert (await ben.call("rtc:signal", answer, "/agent"))["ok"]  # after any update to Ben
    assert all(u["call_id"] != call_id for u in drain(ben, "call:update"))
    done = await victim.call("call:cancel", {"call_id": call_id}, "/visitor")
    assert done["call"]["reason"] == "visitor_hung_up"


async def test_the_real_visitor_comes_back_with_the_secret_sticky_and_resuming(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    anna = await agent(clients, node, "anna")
    ben = await agent(clients, node, "ben")
    s, v, ring = await connected_call(http, node=node, clients=clients, ben=ben)
    call_id = ring["call_id"]

    # A blip long enough for the visitor token to be renewed: a new session with the secret
    # is the same visitor, and its socket picks the call up again.
    await v.sio.disconnect()
    renewed = await session(http, node, proof(s))
    assert renewed["visitor_id"] == s["visitor_id"] and renewed["token"] != s["token"]
    assert renewed["visitor_secret"] == s["visitor_secret"]
    back = await visitor(clients, node, renewed["token"])
    resumed = await back.next("call:update")
    assert resumed["call_id"] == call_id and resumed["state"] == "connected"
    answer = {"call_id": call_id, "description": {"type": "answer", "sdp": "v=0\r\n"}}
    assert (await ben.call("rtc:signal", answer, "/agent"))["ok"]
    assert await back.next("rtc:signal") == answer
    assert (await ben.call("call:hangup", {"call_id": call_id}, "/agent"))["ok"]
    await ben.next("presence:update", lambda p: p["status"] == "available")

    # Next visit, in English: Ben again, because they proved who they are...
    again = await session(http, node, proof(s))
    v2 = await visitor(clients, node, again["token"])
    start = await v2.call("call:start", {"language": "en"}, "/visitor")
    assert start["call"]["agent"]["name"] == "Ben"
    ring2 = await ben.next("call:ring")
    assert ring2["visitor"]["returning"] and ring2["visitor"]["last_agent"] == "Ben"
    await v2.call("call:cancel", {"call_id": ring2["call_id"]}, "/visitor")
    await ben.next("call:ring_stop")

    # ...while the bare id is a stranger to routing: no sticky agent, no history.
    stranger = await session(http, node, {"visitor_id": s["visitor_id"]})
    v3 = await visitor(clients, node, stranger["token"])
    start3 = await v3.call("call:start", {"language": "en"}, "/visitor")
    ring3 = await {"Anna": anna, "Ben": ben}[start3["call"]["agent"]["name"]].next("call:ring")
    assert ring3["visitor"]["id"] == stranger["visitor_id"] != s["visitor_id"]
    assert not ring3["visitor"]["returning"] and ring3["visitor"]["last_agent"] is None


async def test_across_nodes_the_secret_works_and_the_bare_id_does_not(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
) -> None:
    settings = fast(make_settings(tmp_path, redis_url=redis_url))
    # Time stands still: the blip cannot outlast the grace period, however slow the machine.
    a = await nodes(replace(settings, node_id="node-a"), clock=clock)
    b = await nodes(replace(settings, node_id="node-b"), clock=clock)
    ben = await agent(clients, a, "ben")
    s, v, ring = await connected_call(http, node=a, clients=clients, ben=ben)
    call_id = ring["call_id"]

    # On B, the bare id is a new visitor whose socket gets nothing of the call.
    attacker_session = await session(http, b, {"visitor_id": s["visitor_id"]})
    assert attacker_session["visitor_id"] != s["visitor_id"]
    attacker = await visitor(clients, b, attacker_session["token"])
    offer = {"call_id": call_id, "description": {"type": "offer", "sdp": "v=0\r\n"}}
    assert (await attacker.call("rtc:signal", offer, "/visitor"))["error"]["code"] == "forbidden"
    await attacker.sio.disconnect()

    # The visitor's socket on A drops; with the secret, B gives them their id back and their
    # new socket there takes the call over; Ben's signals follow it to B.
    await v.sio.disconnect()
    renewed = await session(http, b, proof(s))
    assert renewed["visitor_id"] == s["visitor_id"]
    back = await visitor(clients, b, renewed["token"])
    resumed = await back.next("call:update")
    assert resumed["call_id"] == call_id and resumed["state"] == "connected"
    answer = {"call_id": call_id, "description": {"type": "answer", "sdp": "v=0\r\n"}}
    assert (await ben.call("rtc:signal", answer, "/agent"))["ok"]
    assert await back.next("rtc:signal") == answer
    assert (await back.call("rtc:signal", offer, "/visitor"))["ok"]
    assert await ben.next("rtc:signal") == offer


async def test_the_turn_username_names_no_visitor(
    nodes: NodeFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    turn_secret = "turn-secret-0123456789"
    webrtc = WebRTCSettings(turn_urls=("turn:turn.example:3478",), turn_secret=turn_secret)
    node = await nodes(make_settings(tmp_path, webrtc=webrtc))
    s = await session(http, node)
    (turn,) = s["ice_servers"]
    expires, name = turn["username"].split(":")
    assert int(expires) > 0 and s["visitor_id"] not in turn["username"]
    assert name == node.app[appkeys.VISITORS].turn_name("acme", s["visitor_id"])
    digest = hmac.new(turn_secret.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(digest).decode(), "coturn still accepts it"
    (again,) = (await session(http, node, proof(s)))["ice_servers"]
    assert again["username"].split(":")[1] == name, "stable for the same visitor"
