"""Two nodes through a Redis that stops answering for a while (SIGSTOP, then SIGCONT): they
say so on ``/readyz``, and afterwards are ready again, hear each other again, and finish
what a client did while Redis was away.

Each test runs its own redis-server: the session's is shared, and these pause theirs."""

from __future__ import annotations

import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_sync
from conftest import (
    Node,
    NodeFactory,
    RedisServer,
    SocketClient,
    eventually,
    make_settings,
    mint,
    node_process,
    replace,
)

from gateway.core.model import Role
from gateway.settings import PresenceSettings, Settings, demo_config_text

ORIGIN = {"Origin": "http://127.0.0.1:8080"}


def pause(server: RedisServer) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)


def resume(server: RedisServer) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)


def acl_setuser(admin: redis_sync.Redis, *rules: str) -> None:
    admin.execute_command("ACL", "SETUSER", "node-a", *rules)  # type: ignore[no-untyped-call]


def status_of(name: str, status: str) -> Callable[[Any], bool]:
    return lambda p: p["agent_id"] == name and p["status"] == status


def patient(settings: Settings) -> Settings:
    """Socket leases long enough to outlive the pause: these tests are about events and
    readiness, not about leases lapsing while Redis is away."""
    return replace(
        settings,
        presence=PresenceSettings(device_ttl_s=60.0, socket_ttl_s=60.0, sweep_interval_s=0.1),
    )


async def answers(http: aiohttp.ClientSession, node: Node, status: int, detail: str = "") -> bool:
    """``/readyz`` answers ``status``, its detail saying ``detail``."""
    async with http.get(f"{node.url}/readyz") as r:
        body = await r.json()
        return r.status == status and detail in str(body["store"]["detail"])


async def start_call(
    http: aiohttp.ClientSession, clients: Callable[[], SocketClient], node: Node
) -> tuple[SocketClient, Any]:
    r = await http.post(f"{node.url}/v1/sites/acme/sessions", json={}, headers=ORIGIN)
    visitor = clients()
    await visitor.connect(node.url, "/visitor", {"token": (await r.json())["token"]})
    return visitor, await visitor.call("call:start", {}, "/visitor")


async def test_nodes_are_ready_and_hear_each_other_again_after_redis_pauses(
    own_redis: RedisServer,
    nodes: NodeFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Redis stops for longer than the lane's 5 s watchdog and the listeners' ping: both
    nodes answer 503 meanwhile and 200 soon after it resumes, and node B's emits reach a
    client on node A again (they never did: the socket.io listener resubscribed five times
    a second, each closing subscription waking the next one, and stayed down)."""
    settings = patient(make_settings(tmp_path, redis_url=own_redis.url))
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    board = clients()
    await board.connect(a.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    agent = clients()
    await agent.connect(b.url, "/agent", {"token": mint(settings, "anna")})
    await board.next("presence:update", status_of("anna", "available"))

    pause(own_redis)
    try:
        for node in (a, b):
            await eventually(partial(answers, http, node, 503), 5)
        # A change while Redis is away is refused once the lane's watchdog gives up on it
        # (Redis may still apply it when it resumes: "away" is not what is awaited below).
        ack = await agent.call("presence:set", {"kind": "desktop", "state": "away"}, "/agent", 15)
        assert ack["error"]["code"] == "store_unavailable", ack
        # Both nodes' socket.io listeners noticed that their subscription went silent.
        for node in (a, b):
            await eventually(partial(answers, http, node, 503, "socket.io listener down"), 15)
    finally:
        resume(own_redis)

    for node in (a, b):
        await eventually(partial(answers, http, node, 200), 10)
    # B's change reaches A's board (the store's event channel) ...
    ack = await agent.call("presence:set", {"kind": "desktop", "state": "dnd"}, "/agent")
    assert ack["ok"], ack
    await board.next("presence:update", status_of("anna", "dnd"))
    ack = await agent.call("presence:set", {"kind": "desktop", "state": "available"}, "/agent")
    await board.next("presence:update", status_of("anna", "available"))
    # ... and socket.io emits cross both ways: A rings Anna on B, her accept on B
    # connects the visitor on A.
    visitor, started = await start_call(http, clients, a)
    assert started["call"]["state"] == "ringing", started
    ring = await agent.next("call:ring")
    assert ring["call_id"] == started["call"]["call_id"]
    await agent.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
    await visitor.next("call:update", lambda c: c["state"] == "connected")


def slow_ring(settings: Settings) -> Settings:
    """Rings that outlast the test: a ring that stops did so because the visitor left, not
    because it timed out. (Real time in this file: Redis is paused and restarted as a process,
    and what is tested is how the nodes come back from that in real time.)"""
    sites = {k: replace(s, ring_timeout_s=90.0) for k, s in settings.sites.items()}
    return replace(settings, sites=sites)


async def test_a_visitor_who_leaves_while_redis_is_paused_stops_the_ring_once_it_is_back(
    own_redis: RedisServer,
    nodes: NodeFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """The visitor's node cannot cancel their call while Redis is stopped; it must not give up
    (it did: the disconnect handler failed and the agent rang on, then the next one)."""
    settings = slow_ring(patient(make_settings(tmp_path, redis_url=own_redis.url)))
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    board = clients()
    await board.connect(a.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    anna = clients()
    await anna.connect(b.url, "/agent", {"token": mint(settings, "anna")})
    await board.next("presence:update", status_of("anna", "available"))
    ben = clients()  # on the visitor's node: his requests queue behind the visitor's cancel
    await ben.connect(a.url, "/agent", {"token": mint(settings, "ben"), "state": "away"})
    await board.next("presence:update", status_of("ben", "away"))
    visitor, started = await start_call(http, clients, a)
    call_id = started["call"]["call_id"]
    assert (await anna.next("call:ring"))["call_id"] == call_id

    pause(own_redis)
    try:
        await visitor.close()
        # Node A's commands to Redis go out in order: Ben's fails after the visitor's.
        ack = await ben.call("presence:set", {"kind": "desktop", "state": "dnd"}, "/agent", 15)
        assert ack["error"]["code"] == "store_unavailable", ack
        for node in (a, b):
            await eventually(partial(answers, http, node, 503), 5)
    finally:
        resume(own_redis)

    stop = await anna.next("call:ring_stop", timeout=10)
    assert stop == {"call_id": call_id, "attempt": 1, "reason": "visitor_left"}
    ended = await board.next("call:update", lambda c: c["state"] == "canceled", timeout=5)
    assert ended["call_id"] == call_id and ended["reason"] == "visitor_left"
    # Anna is free again on both nodes: the next visitor, on B this time, rings her at once.
    _, again = await start_call(http, clients, b)
    assert again["call"]["state"] == "ringing", again
    assert (await anna.next("call:ring"))["call_id"] == again["call"]["call_id"]


async def test_a_node_that_missed_emits_tells_its_sockets_where_calls_stand(
    own_redis: RedisServer,
    nodes: NodeFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Node A cannot hear node B's emits for a while (Redis refuses it the socket.io
    channel: a real fault, aimed at one node) while B ends one of Anna's rings and starts
    another. Pub/sub keeps nothing, so once A hears again it must replay those calls to
    its own sockets: Anna's first ring card would stay up for good, the second ring never
    show, and A's board would show both calls as they were."""
    admin = redis_sync.Redis(port=own_redis.port)
    acl_setuser(admin, "on", ">a-password", "~*", "&*", "+@all")
    settings = patient(slow_ring(make_settings(tmp_path, redis_url=own_redis.url)))
    url_a = f"redis://node-a:a-password@127.0.0.1:{own_redis.port}/0"
    a = await nodes(replace(settings, node_id="a", redis_url=url_a))
    b = await nodes(replace(settings, node_id="b"))
    board = clients()
    await board.connect(a.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    anna = clients()
    await anna.connect(a.url, "/agent", {"token": mint(settings, "anna")})
    await board.next("presence:update", status_of("anna", "available"))
    first_visitor, first = await start_call(http, clients, b)
    first_id = first["call"]["call_id"]
    assert (await anna.next("call:ring"))["call_id"] == first_id

    # A may use the store's event channel, not socket.io's: Redis drops its subscription.
    acl_setuser(admin, "resetchannels", "&m:events")
    try:
        await eventually(partial(answers, http, a, 503, "socket.io listener down"), 10)
        stopped = await first_visitor.call("call:cancel", {"call_id": first_id}, "/visitor")
        assert stopped["call"]["state"] == "canceled", stopped
        _, second = await start_call(http, clients, b)
        second_id = second["call"]["call_id"]
        assert second["call"]["state"] == "ringing", second
        assert anna.queue("call:ring_stop").empty() and anna.queue("call:ring").empty()
    finally:
        acl_setuser(admin, "allchannels")

    await eventually(partial(answers, http, a, 200), 10)
    stop = await anna.next("call:ring_stop")
    assert stop == {"call_id": first_id, "attempt": 1, "reason": "visitor_hung_up"}
    assert (await anna.next("call:ring"))["call_id"] == second_id
    await board.next("call:update", lambda c: c["call_id"] == first_id and c["state"] == "canceled")
    await board.next("call:update", lambda c: c["call_id"] == second_id and c["state"] == "ringing")
    ack = await anna.call("call:accept", {"call_id": second_id}, "/agent")
    assert ack["call"]["state"] == "connected", ack
    admin.close()


def test_rings_over_says_why_each_agent_stopped_ringing() -> None:
    """What a replay sends each agent the call rang (the pure part of replay_since)."""
    from gateway.core import call as calls
    from gateway.core.call import CallChannel, CallRequest

    def ring(c: calls.Call, agent: str, now: float) -> calls.Call:
        return calls.ring(c, agent, agent, ("same language", "idle longest"), now, 20.0)

    c = calls.new_call("c1", "acme", "v1", CallChannel.WEBRTC, CallRequest(), 0.0, "sid")
    assert calls.rings_over(c) == {} and calls.ring_reasons(c) == ()
    c = ring(c, "anna", 1.0)
    assert calls.rings_over(c) == {}
    assert calls.ring_reasons(c) == ("same language", "idle longest")
    c = ring(calls.decline(c, "anna", 2.0), "ben", 2.0)
    c = ring(calls.ring_timeout(c, c.attempt, 3.0), "carla", 3.0)
    assert calls.rings_over(c) == {"anna": "declined", "ben": "no_answer"}
    assert calls.last_changed(c) == 3.0
    canceled = calls.end(c, "visitor_left", "The visitor left", 4.0)
    assert calls.rings_over(canceled)["carla"] == "visitor_left"
    answered = calls.end(calls.accept(c, "carla", "s2", 4.0), "agent_hung_up", "", 5.0)
    assert calls.rings_over(answered) == {
        "anna": "declined",
        "ben": "no_answer",
        "carla": "answered",
    }


async def test_a_ring_stop_the_store_interrupts_is_finished_once_it_answers(
    own_redis: RedisServer,
    nodes: NodeFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """The visitor hangs up and the call is ended, but the store fails in the middle of
    stopping Anna's ring (Redis refuses node A's ZREM): the rest of the stop is done once it
    answers again. It was dropped with the error: the visitor's hang-up was answered
    store_unavailable although the call had ended, and Anna's ring never stopped."""
    admin = redis_sync.Redis(port=own_redis.port)
    acl_setuser(admin, "on", ">a-password", "~*", "&*", "+@all")
    settings = patient(slow_ring(make_settings(tmp_path, redis_url=own_redis.url)))
    url_a = f"redis://node-a:a-password@127.0.0.1:{own_redis.port}/0"
    a = await nodes(replace(settings, node_id="a", redis_url=url_a))
    b = await nodes(replace(settings, node_id="b"))
    anna = clients()
    await anna.connect(b.url, "/agent", {"token": mint(settings, "anna")})
    await anna.next("presence:update", status_of("anna", "available"))
    visitor, started = await start_call(http, clients, a)
    call_id = started["call"]["call_id"]
    assert (await anna.next("call:ring"))["call_id"] == call_id

    acl_setuser(admin, "-zrem")  # the ring timer's removal, after the call's end is stored
    try:
        ack = await visitor.call("call:cancel", {"call_id": call_id}, "/visitor")
        assert ack["ok"] and ack["call"]["state"] == "canceled", ack
    finally:
        acl_setuser(admin, "+zrem")
    stop = await anna.next("call:ring_stop", timeout=10)
    assert stop == {"call_id": call_id, "attempt": 1, "reason": "visitor_hung_up"}

    async def timer_gone() -> bool:  # the stop goes out before the rest of the ring's end
        return admin.zscore("m:timers", f"ring:{call_id}:1") is None

    await eventually(timer_gone, 5)
    admin.close()


async def test_agents_whose_leases_lapse_in_a_pause_come_back_while_connected(
    own_redis: RedisServer,
    nodes: NodeFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """A pause longer than a socket lease's slack: the node could not renew it, and once
    Redis answers a sweeper reports the agent offline. Her socket is still connected, so
    her node puts her device back (renewal never revives a removed device: she stayed
    offline until she reconnected)."""
    settings = replace(
        make_settings(tmp_path, redis_url=own_redis.url),
        presence=PresenceSettings(device_ttl_s=60.0, socket_ttl_s=3.0, sweep_interval_s=0.1),
    )
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    board = clients()
    await board.connect(a.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    anna = clients()
    await anna.connect(b.url, "/agent", {"token": mint(settings, "anna"), "state": "dnd"})
    await board.next("presence:update", status_of("anna", "dnd"))

    pause(own_redis)
    try:
        # Longer than the 3 s lease: the lane gives up on this after 5 s.
        ack = await anna.call("presence:set", {"kind": "desktop", "state": "dnd"}, "/agent", 15)
        assert ack["error"]["code"] == "store_unavailable", ack
    finally:
        resume(own_redis)

    await board.next("presence:update", status_of("anna", "offline"), timeout=10)
    back = await board.next("presence:update", status_of("anna", "dnd"), timeout=5)
    assert back["devices"][0]["kind"] == "desktop", "as her socket last said: dnd"
    await eventually(partial(answers, http, b, 200), 10)
    r = await http.get(
        f"{b.url}/v1/sites/acme/agents",
        headers={"Authorization": f"Bearer {mint(settings, 'sam', Role.SUPERVISOR)}"},
    )
    assert next(p for p in await r.json() if p["agent_id"] == "anna")["status"] == "dnd"


# What Redis refuses node A while its sweeper handles Carla's lapse: the ACL rules, what
# ACL LOG names as refused (a prefix of it), and the rules that allow it again. ACL key
# patterns only allow, so "every key but m:call:*" is spelled in globs.
LAPSE_REFUSALS = {
    # The call's end, whose first step reads the call.
    "the call": (
        ("resetkeys", "~m:[^c]*", "~m:c[^a]*", "~m:ca[^l]*", "~m:cal[^l]*", "~m:call[^:]*"),
        "m:call:",
        ("~*",),
    ),
    # Carla's presence read, before her offline is published and the call service hears of
    # the lapse (and the call's read too).
    "every hash read": (("-hgetall",), "hgetall", ("+hgetall",)),
    # Whom the visitor talked to, written with her release: she is freed all the same.
    "the visit": (
        ("resetkeys", "~m:[^v]*", "~m:v[^i]*", "~m:vi[^s]*", "~m:vis[^i]*", "~m:visi[^t]*"),
        "m:visit:",
        ("~*",),
    ),
    # Her reservation's release, after the call's end is stored: a try again must free her.
    "her reservation": (
        ("resetkeys", "~m:[^r]*", "~m:r[^e]*", "~m:re[^s]*", "~m:res[^v]*", "~m:resv[^:]*"),
        "m:resv:",
        ("~*",),
    ),
}


@pytest.mark.parametrize("refused", list(LAPSE_REFUSALS))
async def test_a_call_whose_agent_lapses_while_the_store_fails_the_sweeper_ends_once_it_answers(
    own_redis: RedisServer,
    nodes: NodeFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    refused: str,
) -> None:
    """Carla's node dies (SIGKILL) in a connected call, so her socket's lease lapses and node
    A's sweeper claims the lapse, exactly once, while Redis refuses A a step of its handling.
    Once Redis allows it again the call ends (``agent_left``) and Carla is free again. The
    failed step was dropped with its error: nothing else would ever report the lapse, so the
    call stayed connected, or Carla stayed reserved for it, and was never rung again."""
    rules, logged, allow = LAPSE_REFUSALS[refused]
    admin = redis_sync.Redis(port=own_redis.port)
    acl_setuser(admin, "on", ">a-password", "~*", "&*", "+@all")
    settings = patient(make_settings(tmp_path, redis_url=own_redis.url))
    url_a = f"redis://node-a:a-password@127.0.0.1:{own_redis.port}/0"
    doomed_config = demo_config_text().replace("socket_ttl_s = 15", "socket_ttl_s = 2")
    async with node_process(tmp_path, settings, own_redis.url, doomed_config, "doomed") as (
        doomed_url,
        doomed,
    ):
        a = await nodes(replace(settings, node_id="a", redis_url=url_a))
        board = clients()
        await board.connect(a.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
        carla = clients()
        await carla.connect(doomed_url, "/agent", {"token": mint(settings, "carla")})
        await board.next("presence:update", status_of("carla", "available"))
        visitor, started = await start_call(http, clients, a)
        call_id = started["call"]["call_id"]
        assert (await carla.next("call:ring"))["call_id"] == call_id
        ack = await carla.call("call:accept", {"call_id": call_id}, "/agent")
        assert ack["call"]["state"] == "connected", ack
        await board.next("presence:update", status_of("carla", "on_call"))

        async def refused_to_a() -> bool:
            return any(
                e["username"] == "node-a" and str(e["object"]).startswith(logged)
                for e in admin.acl_log()
            )

        acl_setuser(admin, *rules)
        try:
            doomed.send_signal(signal.SIGKILL)
            await doomed.wait()
            # Her 2 s lease lapses, and A's sweeper claims it and is refused.
            await eventually(refused_to_a, 10)
        finally:
            acl_setuser(admin, *allow)

    ended = await visitor.next("call:update", lambda c: c["state"] == "completed", timeout=10)
    assert ended["call_id"] == call_id and ended["reason"] == "agent_left", ended
    await board.next("presence:update", status_of("carla", "offline"), timeout=5)
    # Free again on every node: back on a new node B, a visitor on A rings her at once.
    b = await nodes(replace(settings, node_id="b"))
    carla = clients()
    await carla.connect(b.url, "/agent", {"token": mint(settings, "carla")})
    await board.next("presence:update", status_of("carla", "available"))
    _, again = await start_call(http, clients, a)
    assert again["call"]["state"] == "ringing", again
    assert (await carla.next("call:ring"))["call_id"] == again["call"]["call_id"]
    admin.close()
