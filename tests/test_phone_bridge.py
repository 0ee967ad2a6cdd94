"""A browser visitor talks to an agent who is only on her phone, through the audio bridge:
two gateway nodes on one Redis, each running a real media worker process; the visitor a real
socket.io client with an aiortc peer sending a 440 Hz tone; the agent's phone the Twilio
simulator (through the real SDK), which presses 1 at the whisper, plays a 1 kHz tone into
the Media Stream and records what it hears. A worker SIGKILLed mid-call ends the call with a
reason on both sides and leaves the agent free on every node."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from conftest import Node, NodeFactory, SocketClient, eventually, replace
from media_peers import RATE, ToneTrack, heard, remote_track
from test_callbacks import (
    ANNA_PHONE,
    VISITOR_PHONE,
    agent,
    phone_node,
    request_callback,
    ticket_state,
)
from test_calls import session, visitor
from test_channels import availability
from test_mobile_ring import PAGE, mobile_settings, on_mobile, signed, status_of
from twilio_sim import CallRecord, TwilioSim
from twilio_sim.audio import dominant_frequency, dtmf_keys

from gateway.core.call import HOLD_EVENTS, MAX_MEDIA_MOVES
from gateway.edge.http import appkeys as keys
from gateway.settings import MediaSettings
from gateway.store.base import CallRow
from gateway.wire.codec import call_from_record, call_to_record
from mobile_bridge.media.dtmf import HOLD_HZ
from mobile_bridge.media.pool import MediaWorkers
from mobile_bridge.media.worker import ice_ufrag

__all__ = ["peers"]


@pytest.fixture
async def sim() -> AsyncIterator[TwilioSim]:
    sim = TwilioSim(time_scale=0.05)  # whispers and rings quick; media still in real time
    await sim.start()
    yield sim
    await sim.close()
    assert sim.contract_violations == []
    schema = [(c.to, n.message) for c in sim.calls for n in c.notifications if n.code == 12200]
    assert schema == [], "TwiML the gateway sent breaks the contract"


@pytest.fixture
async def peers() -> AsyncIterator[RTCPeerConnection]:
    browser = RTCPeerConnection()
    yield browser
    await browser.close()


async def bridged_node(nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, redis_url: str) -> Node:
    settings = mobile_settings(tmp_path, sim, redis_url)
    return await phone_node(nodes, replace(settings, media=MediaSettings(workers=1)))


def media_of(node: Node) -> MediaWorkers:
    media = node.app[keys.CALLS].bridge.media
    assert isinstance(media, MediaWorkers)
    return media


async def call_anna(
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    node: Node,
    browser: RTCPeerConnection,
) -> tuple[SocketClient, str]:
    """The visitor presses the button on ``node``: the call rings Anna's phone, she presses 1,
    and the visitor's offer is answered by the bridge. The visitor's socket and the call."""
    v = await visitor(clients, node, (await session(http, node))["token"])
    ack = await v.call("call:start", {"language": "en", "page": PAGE}, "/visitor")
    assert ack["ok"] and ack["call"]["state"] == "ringing", ack
    assert ack["call"]["agent"]["name"] == "Anna"
    call_id: str = ack["call"]["call_id"]
    await v.next("call:update", lambda c: c["state"] == "connected", timeout=20)
    # As the widget does once connected: its microphone, then the offer.
    browser.addTrack(ToneTrack(440))
    await browser.setLocalDescription(await browser.createOffer())
    offer = {"type": "offer", "sdp": browser.localDescription.sdp}
    sent = await v.call("rtc:signal", {"call_id": call_id, "description": offer}, "/visitor")
    assert sent["ok"], sent
    answer = await v.next("rtc:signal", lambda m: "description" in m, timeout=15)
    assert answer["call_id"] == call_id and answer["description"]["type"] == "answer"
    media_line = next(ln for ln in answer["description"]["sdp"].splitlines() if ln[:2] == "m=")
    assert media_line.split()[3] == "0", f"PCMU is not first in the answer: {media_line}"
    await browser.setRemoteDescription(RTCSessionDescription(**answer["description"]))
    return v, call_id


def anna_leg(sim: TwilioSim) -> CallRecord:
    return next(c for c in sim.calls if c.to == ANNA_PHONE)


async def phone_hears(sim: TwilioSim, leg: CallRecord, hz: float) -> None:
    def heard_two_seconds() -> bool:
        return leg.stream is not None and len(leg.stream.audio_played) >= 2 * RATE

    await sim.wait_until(heard_two_seconds, timeout=20, what="two seconds at Anna's phone")
    assert leg.stream is not None
    assert abs(dominant_frequency(bytes(leg.stream.audio_played)[-RATE:]) - hz) < 10


async def free_everywhere(http: aiohttp.ClientSession, *nodes: Node, who: str = "anna") -> None:
    """``who`` shows available on every one of ``nodes``."""

    async def free() -> bool:
        return all([await status_of(http, n, who) == "available" for n in nodes])

    await eventually(free, 10)


async def test_a_browser_visitor_talks_to_an_agent_who_is_only_on_her_phone(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
) -> None:
    a = await bridged_node(nodes, tmp_path, sim, redis_url)
    b = await bridged_node(nodes, tmp_path, sim, redis_url)
    sim.phone(ANNA_PHONE, answer_after=1, press="1", tone_hz=1000)
    await on_mobile(http, b, "anna")

    # Only on her phone, Anna is available for a browser call on both nodes.
    async def button_offers_her() -> bool:
        shown = [await availability(http, n) for n in (a, b)]
        return all(s["available"] and "webrtc" in s["channels"] for s in shown)

    await eventually(button_offers_her, 5)

    browser = peers
    hearing = remote_track(browser)
    v, call_id = await call_anna(http, clients, a, browser)
    leg = anna_leg(sim)
    whisper = next(s for s in leg.said if "Press 1" in s)
    assert "/pricing" in whisper and "English" in whisper
    assert "Connecting you now. Press star to put the caller on hold" in " ".join(leg.said)
    await sim.wait_until(lambda: leg.stream is not None, timeout=10, what="the Media Stream")
    assert leg.stream is not None and leg.stream.url.startswith("ws://127.0.0.1:")

    # The tones, both ways.
    track = await asyncio.wait_for(hearing, 15)
    assert abs(await asyncio.wait_for(heard(track, 2.0), 15) - 1000) < 10
    await phone_hears(sim, leg, 440)
    for n in (a, b):
        assert await status_of(http, n, "anna") == "on_call"

    # The visitor hangs up: the phone leg ends, the session closes, Anna is free everywhere.
    done = await v.call("call:cancel", {"call_id": call_id}, "/visitor")
    assert done["ok"] and done["call"]["reason"] == "visitor_hung_up", done
    await sim.wait_for_call(sid=leg.sid, status="completed", timeout=10)
    await free_everywhere(http, a, b)

    async def sessions_closed() -> bool:
        return all(not w.sessions for n in (a, b) for w in media_of(n).workers)

    await eventually(sessions_closed, 10)


@pytest.mark.parametrize("realtime", [True, False])
async def test_media_workers_run_under_real_time_scheduling_unless_told_not_to(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, redis_url: str, realtime: bool
) -> None:
    """No ordinary process on a worker's core may hold a frame up (media.realtime)."""
    if realtime and os.geteuid() != 0:
        pytest.skip("real-time scheduling needs root here")  # the node says so and goes on
    settings = mobile_settings(tmp_path, sim, redis_url)
    media = MediaSettings(workers=2, realtime=realtime)
    node = await phone_node(nodes, replace(settings, media=media))
    policies = {os.sched_getscheduler(w.process.pid) for w in media_of(node).workers}
    assert policies == {os.SCHED_RR if realtime else os.SCHED_OTHER}


async def test_the_agent_hanging_up_her_phone_ends_the_visitors_call(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
) -> None:
    a = await bridged_node(nodes, tmp_path, sim, redis_url)
    sim.phone(ANNA_PHONE, answer_after=1, press="1", tone_hz=1000)
    await on_mobile(http, a, "anna")
    hearing = remote_track(peers)
    v, call_id = await call_anna(http, clients, a, peers)
    await asyncio.wait_for(hearing, 15)
    leg = anna_leg(sim)
    await sim.wait_until(lambda: leg.stream is not None and leg.stream.started, timeout=10)

    sim.hangup(leg.sid)
    ended = await v.next("call:update", lambda c: c["state"] == "completed", timeout=10)
    assert ended["call_id"] == call_id and ended["reason"] == "agent_hung_up"
    await free_everywhere(http, a)


async def a_visitor_on_a_rings_anna_on_b(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
) -> tuple[Node, Node, SocketClient, str, Any, CallRecord]:
    """Two bridged nodes; Anna only on her phone, through node b; a visitor on node a calls
    her and she presses 1: the nodes, the visitor's socket, the call, what the visitor
    hears (a track) and Anna's leg."""
    a = await bridged_node(nodes, tmp_path, sim, redis_url)
    b = await bridged_node(nodes, tmp_path, sim, redis_url)
    sim.phone(ANNA_PHONE, answer_after=1, press="1", tone_hz=1000)
    await on_mobile(http, b, "anna")
    hearing = remote_track(peers)
    v, call_id = await call_anna(http, clients, a, peers)
    track = await asyncio.wait_for(hearing, 15)
    return a, b, v, call_id, track, anna_leg(sim)


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
async def test_a_worker_killed_or_hung_mid_call_moves_the_call_to_a_live_worker(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
    fault: signal.Signals,
) -> None:
    """The worker holding the call is SIGKILLed, or SIGSTOPped (hung: its node's probe finds
    it silent and kills it): the call's audio moves to a new session.
    The visitor is told to restart ICE and offers to the new session (here from a new peer
    connection with a new tone); Anna's phone leg
    is pointed at the new session's stream. They hear each other again, Anna stays on the
    call on every node, and the call ends as any other when the visitor hangs up."""
    a, b, v, call_id, track, leg = await a_visitor_on_a_rings_anna_on_b(
        nodes, tmp_path, sim, http, redis_url, clients, peers
    )
    assert abs(await asyncio.wait_for(heard(track, 1.0), 15) - 1000) < 10

    (worker,) = [w for n in (a, b) for w in media_of(n).workers if w.sessions]
    assert call_id in worker.sessions.values()
    worker.process.send_signal(fault)

    again = RTCPeerConnection()
    try:
        hearing = remote_track(again)
        await offer_on_restart(v, "/visitor", call_id, again, 880)
        await until_heard(await asyncio.wait_for(hearing, 15), 1000)
        assert [s.connected for s in leg.streams] == [True, True], leg.streams
        await phone_hears(sim, leg, 880)
        for n in (a, b):
            assert await status_of(http, n, "anna") == "on_call"
        row = await a.app[keys.STORE].get_call(call_id)
        assert row is not None and row.data["media_moves"] == 1
        moved = call_from_record(row.data, row.version).timeline[-1]
        assert (moved.event, moved.internal) == ("media_moved", True), moved
        assert await media_moves(http, a, b) == {"moved": 1}

        # The webhook of the first stream's end, again: signed and of Anna's leg, it points
        # the leg at the session the call has now; anything else is refused.
        url = next(w.url for w in leg.webhooks if "/v1/twilio/media/" in w.url)
        assert url.endswith(f"/v1/twilio/media/{call_id}/1"), url
        form = {"CallSid": leg.sid}
        r = await http.post(url, data=form, headers=signed(sim, url, form))
        assert r.status == 200 and row.data["media_stream"] in await r.text()
        r = await http.post(url, data=form, headers={"X-Twilio-Signature": "forged"})
        assert r.status == 403 and (await r.json())["error"]["code"] == "invalid_signature"
        other = {"CallSid": "CA" + "0" * 32}
        r = await http.post(url, data=other, headers=signed(sim, url, other))
        assert r.status == 403 and (await r.json())["error"]["code"] == "unknown_leg"

        done = await v.call("call:cancel", {"call_id": call_id}, "/visitor")
        assert done["ok"] and done["call"]["reason"] == "visitor_hung_up", done
        await sim.wait_for_call(sid=leg.sid, status="completed", timeout=10)
        await free_everywhere(http, a, b)
    finally:
        await again.close()

    # The dead worker was replaced.
    async def replaced() -> bool:
        return all(w.process.returncode is None for n in (a, b) for w in media_of(n).workers)

    await eventually(replaced, 15)


async def test_a_visitor_renegotiates_and_restarts_ice_on_a_bridged_call(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
) -> None:
    """The visitor offers again mid-call, through the other node: with the same ICE
    credentials it is answered in place; with new ones (its network changed: here a new
    peer connection with a new tone) the bridge answers on a fresh peer connection and the
    tones go on both ways. An offer the bridge cannot use is refused with ``invalid_offer``
    and the call goes on; a garbage candidate is let be."""
    a = await bridged_node(nodes, tmp_path, sim, redis_url)
    b = await bridged_node(nodes, tmp_path, sim, redis_url)
    sim.phone(ANNA_PHONE, answer_after=1, press="1", tone_hz=1000)
    await on_mobile(http, a, "anna")
    hearing = remote_track(peers)
    v, call_id = await call_anna(http, clients, a, peers)
    track = await asyncio.wait_for(hearing, 15)
    await asyncio.wait_for(heard(track, 0.5), 15)  # connected: no check left in flight
    leg = anna_leg(sim)
    on_b = clients()  # the same visitor, a second tab on the other node
    await on_b.connect(b.url, "/visitor", {**v.auth, "call_id": call_id})

    async def offer(sdp: str) -> dict[str, Any]:
        sent = {"call_id": call_id, "description": {"type": "offer", "sdp": sdp}}
        ack: dict[str, Any] = await on_b.call("rtc:signal", sent, "/visitor")
        return ack

    first = peers.remoteDescription.sdp
    await peers.setLocalDescription(await peers.createOffer())
    assert (await offer(peers.localDescription.sdp))["ok"]
    answer = await on_b.next("rtc:signal", lambda m: "description" in m, timeout=15)
    assert ice_ufrag(answer["description"]["sdp"]) == ice_ufrag(first)
    await peers.setRemoteDescription(RTCSessionDescription(**answer["description"]))

    restarted = RTCPeerConnection()
    try:
        restarted.addTrack(ToneTrack(880))
        hearing_again = remote_track(restarted)
        await restarted.setLocalDescription(await restarted.createOffer())
        assert (await offer(restarted.localDescription.sdp))["ok"]
        answer = await on_b.next("rtc:signal", lambda m: "description" in m, timeout=15)
        assert ice_ufrag(answer["description"]["sdp"]) != ice_ufrag(first)
        await restarted.setRemoteDescription(RTCSessionDescription(**answer["description"]))
        await peers.close()
        await until_heard(await asyncio.wait_for(hearing_again, 15), 1000)
        await phone_hears(sim, leg, 880)

        broken = restarted.localDescription.sdp.replace("a=ice-ufrag:", "a=ice-ufrag:x")
        broken = "\r\n".join(
            "m=audio 9 UDP/TLS/RTP/SAVPF 126" if line.startswith("m=audio") else line
            for line in broken.split("\r\n")
            if not line.startswith(("a=rtpmap:", "a=fmtp:"))
        )
        refused = await offer(broken)
        assert not refused["ok"] and refused["error"]["code"] == "invalid_offer", refused
        candidate = {"candidate": "candidate:1 1 udp 1 999.1.1.1 9 typ host", "sdpMid": "0"}
        sent = await on_b.call(
            "rtc:signal", {"call_id": call_id, "candidate": candidate}, "/visitor"
        )
        assert sent["ok"], sent
        await phone_hears(sim, leg, 880)
        for n in (a, b):
            assert await status_of(http, n, "anna") == "on_call"
    finally:
        await restarted.close()


async def test_an_agent_on_her_phone_holds_the_visitor_with_star(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
) -> None:
    """Anna took a browser call on her phone: star holds the visitor (they hear the hold
    tone, she hears nothing, the widget is told on every node), star again brings them back."""
    _, b, v, call_id, track, leg = await a_visitor_on_a_rings_anna_on_b(
        nodes, tmp_path, sim, http, redis_url, clients, peers
    )
    assert any("Press star to put the caller on hold" in s for s in leg.said), leg.said
    await until_heard(track, 1000)
    await phone_hears(sim, leg, 440)

    sim.send_dtmf(leg.sid, "*")
    held = await v.next("call:update", lambda c: c["timeline"][-1]["event"] == "on_hold", 10)
    assert held["call_id"] == call_id and held["state"] == "connected"
    await asyncio.wait_for(until_heard(track, HOLD_HZ), 15)  # a beep every 4 s
    assert leg.stream is not None
    played = len(leg.stream.audio_played)
    await asyncio.wait_for(record(track, 1.0), 10)
    assert len(leg.stream.audio_played) == played, "Anna hears the visitor while on hold"
    assert await status_of(http, b, "anna") == "on_call"

    sim.send_dtmf(leg.sid, "*")
    back = await v.next("call:update", lambda c: c["timeline"][-1]["event"] == "off_hold", 10)
    assert back["state"] == "connected"
    await asyncio.wait_for(until_heard(track, 1000), 15)
    resumed_from = len(leg.stream.audio_played)

    def a_second_more() -> bool:
        return len(leg.stream.audio_played) - resumed_from >= RATE if leg.stream else False

    await sim.wait_until(a_second_more, timeout=10, what="the visitor again at Anna's phone")
    assert abs(dominant_frequency(bytes(leg.stream.audio_played)[-4000:]) - 440) < 10
    stored = await b.app[keys.STORE].get_call(call_id)
    assert stored is not None
    timeline = call_from_record(stored.data, stored.version).timeline
    assert [e.event for e in timeline if e.event in HOLD_EVENTS] == ["on_hold", "off_hold"]


# --- a customer called back on their phone, the agent in the app ------------------------------


async def answer_in_app(carla: SocketClient, call_id: str, agent_pc: RTCPeerConnection) -> None:
    """What the agent app does with the bridge's offer: answer it with its microphone."""
    offer = await carla.next("rtc:signal", lambda m: m["call_id"] == call_id, timeout=20)
    assert offer["description"]["type"] == "offer"
    media_line = next(ln for ln in offer["description"]["sdp"].splitlines() if ln[:2] == "m=")
    assert media_line.split()[3] == "0", f"PCMU is not offered first: {media_line}"
    agent_pc.addTrack(ToneTrack(440))
    await agent_pc.setRemoteDescription(RTCSessionDescription(**offer["description"]))
    await agent_pc.setLocalDescription(await agent_pc.createAnswer())
    answer = {"type": "answer", "sdp": agent_pc.localDescription.sdp}
    ack = await carla.call("rtc:signal", {"call_id": call_id, "description": answer}, "/agent")
    assert ack["ok"], ack


async def offer_on_restart(
    sock: SocketClient, namespace: str, call_id: str, pc: RTCPeerConnection, hz: float
) -> None:
    """What a browser does when told ``rtc:restart``: offer again (aiortc cannot restart ICE,
    so here from a new peer connection sending a ``hz`` tone), and apply the answer."""
    told = await sock.next("rtc:restart", lambda m: m["call_id"] == call_id, timeout=20)
    assert told == {"call_id": call_id}
    pc.addTrack(ToneTrack(hz))
    await pc.setLocalDescription(await pc.createOffer())
    offer = {"type": "offer", "sdp": pc.localDescription.sdp}
    ack = await sock.call("rtc:signal", {"call_id": call_id, "description": offer}, namespace)
    assert ack["ok"], ack
    answer = await sock.next("rtc:signal", lambda m: "description" in m, timeout=15)
    assert answer["description"]["type"] == "answer"
    await pc.setRemoteDescription(RTCSessionDescription(**answer["description"]))


@dataclass
class BridgedCallback:
    carla: SocketClient
    created: dict[str, Any]
    track: Any
    """What Carla's app hears."""

    @property
    def call_id(self) -> str:
        call_id: str = self.created["call_id"]
        return call_id


async def carla_takes_a_callback(
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    asked_on: Node,
    carla_on: Node,
    agent_pc: RTCPeerConnection,
) -> BridgedCallback:
    """A callback asked on ``asked_on`` rings Carla's app on ``carla_on``; she accepts, the
    customer answers, the app answers the bridge's offer, and she hears the phone's 1 kHz."""
    carla = await agent(clients, carla_on, "carla")
    status, created = await request_callback(http, asked_on, {"phone": VISITOR_PHONE})
    assert status == 201, created
    call_id = created["call_id"]
    ring = await carla.next("call:ring", lambda r: r["call_id"] == call_id, timeout=10)
    assert ring["audio_in_app"] is True and ring["your_phone"] is None
    ack = await carla.call("call:accept", {"call_id": call_id}, "/agent")
    assert ack["ok"] and ack["call"]["state"] == "dialing", ack
    hearing = remote_track(agent_pc)
    await answer_in_app(carla, call_id, agent_pc)
    track = await asyncio.wait_for(hearing, 15)
    assert abs(await asyncio.wait_for(heard(track, 1.0), 15) - 1000) < 10
    return BridgedCallback(carla, created, track)


async def test_an_agent_in_the_app_takes_a_callback_and_talks_to_the_phone(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
) -> None:
    """Carla has no mobile number: with the bridge she takes callbacks in the app."""
    a = await bridged_node(nodes, tmp_path, sim, redis_url)
    b = await bridged_node(nodes, tmp_path, sim, redis_url)
    sim.phone(VISITOR_PHONE, answer_after=1, tone_hz=1000)
    taken = await carla_takes_a_callback(http, clients, a, b, peers)
    carla, created, call_id = taken.carla, taken.created, taken.call_id
    leg = next(c for c in sim.calls if c.to == VISITOR_PHONE)
    assert "Connecting you to Carla now." in " ".join(leg.said)
    await phone_hears(sim, leg, 440)
    connected = await ticket_state(http, a, created, "connected")
    assert connected["agent"]["name"] == "Carla"
    assert await status_of(http, a, "carla") == "on_call"
    assert not [c for c in sim.calls if c.to not in (VISITOR_PHONE,)], "no agent phone rang"

    # Carla hangs up in the app: the customer's leg ends, and she is free on every node.
    done = await carla.call("call:hangup", {"call_id": call_id}, "/agent")
    assert done["ok"], done
    await sim.wait_for_call(sid=leg.sid, status="completed", timeout=10)
    ended = await ticket_state(http, b, created, "completed")
    assert ended["reason"] == "agent_hung_up"
    await free_everywhere(http, a, b, who="carla")


async def test_a_bridged_callback_moves_off_a_dead_worker_and_ends_when_it_moved_too_often(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
) -> None:
    """Carla talks to a customer's phone in the app; the worker dies: her app is told to
    restart ICE, offers to the new session, and they talk on. Once the call's audio has moved
    as often as it may, the next death ends it as ``media_lost``: the phone is hung up, the
    ticket says why, and Carla is free on every node."""
    a = await bridged_node(nodes, tmp_path, sim, redis_url)
    b = await bridged_node(nodes, tmp_path, sim, redis_url)
    sim.phone(VISITOR_PHONE, answer_after=1, tone_hz=1000)
    taken = await carla_takes_a_callback(http, clients, b, a, peers)
    carla, created, call_id = taken.carla, taken.created, taken.call_id
    leg = next(c for c in sim.calls if c.to == VISITOR_PHONE)

    (worker,) = [w for n in (a, b) for w in media_of(n).workers if w.sessions]
    worker.process.send_signal(signal.SIGKILL)
    again = RTCPeerConnection()
    try:
        hearing = remote_track(again)
        await offer_on_restart(carla, "/agent", call_id, again, 880)
        await until_heard(await asyncio.wait_for(hearing, 15), 1000)
        await phone_hears(sim, leg, 880)
        assert await status_of(http, b, "carla") == "on_call"

        # As if it had moved as often as it may: the next death ends it.
        store = a.app[keys.STORE]
        row = await store.get_call(call_id)
        assert row is not None
        call = call_from_record(row.data, row.version)
        worn = replace(call, media_moves=MAX_MEDIA_MOVES, version=call.version + 1)
        assert await store.put_call(CallRow(call_id, call.site, worn.version, call_to_record(worn)))
        (worker,) = [w for n in (a, b) for w in media_of(n).workers if w.sessions]
        worker.process.send_signal(signal.SIGKILL)
        update = await carla.next(
            "call:update",
            lambda c: c["call_id"] == call_id and c["state"] == "completed",
            timeout=15,
        )
        assert update["reason"] == "media_lost", update
        await sim.wait_for_call(sid=leg.sid, status="completed", timeout=10)
        ticket = await ticket_state(http, b, created, "completed")
        assert ticket["reason"] == "media_lost"
        await free_everywhere(http, a, b, who="carla")
        assert await media_moves(http, a, b) == {"moved": 1, "lost": 1}
    finally:
        await again.close()


async def media_moves(http: aiohttp.ClientSession, *nodes: Node) -> dict[str, int]:
    """``membrane_media_moves_total`` by outcome, summed over ``nodes``."""
    total: dict[str, int] = {}
    for node in nodes:
        text = await (await http.get(f"{node.url}/metrics")).text()
        for line in text.splitlines():
            if line.startswith("membrane_media_moves_total{"):
                outcome = line.split('outcome="')[1].split('"')[0]
                total[outcome] = total.get(outcome, 0) + int(float(line.split()[-1]))
    return total


async def until_heard(track: Any, hz: float) -> None:
    """Read ``track`` until half a second of it is ``hz``."""
    while abs(await heard(track, 0.5) - hz) >= 10:
        pass


async def record(track: Any, seconds: float) -> npt.NDArray[np.int16]:
    """``seconds`` of what ``track`` receives, as 8 kHz samples."""
    chunks: list[npt.NDArray[np.int16]] = []
    while sum(c.size for c in chunks) < seconds * RATE:
        frame = await track.recv()
        chunks.append(frame.to_ndarray().reshape(-1))
    return np.concatenate(chunks)


async def test_keys_from_the_phone_and_hold_in_the_app(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
) -> None:
    """A bridged callback: the customer presses 7 and Carla hears its tones and sees the
    digit, on whichever node her app is; Carla holds, and neither hears the other while the
    customer hears the hold tone; she resumes."""
    a = await bridged_node(nodes, tmp_path, sim, redis_url)
    b = await bridged_node(nodes, tmp_path, sim, redis_url)
    sim.phone(VISITOR_PHONE, answer_after=1, tone_hz=1000)
    taken = await carla_takes_a_callback(http, clients, a, b, peers)
    carla, call_id, track = taken.carla, taken.call_id, taken.track
    leg = next(c for c in sim.calls if c.to == VISITOR_PHONE)
    await phone_hears(sim, leg, 440)

    # The customer presses 7: Carla hears 852 + 1209 Hz, once, and her app shows the 7.
    listening = asyncio.create_task(record(track, 1.5))
    sim.send_dtmf(leg.sid, "7")
    assert dtmf_keys(await asyncio.wait_for(listening, 10)) == "7"
    shown = await carla.next("call:key", lambda m: m["call_id"] == call_id, timeout=10)
    assert shown == {"call_id": call_id, "key": "7"}
    # The customer's star is a digit to show too, not a hold: only an agent's phone holds.
    sim.send_dtmf(leg.sid, "*")
    shown = await carla.next("call:key", lambda m: m["call_id"] == call_id, timeout=10)
    assert shown["key"] == "*"
    stored = await a.app[keys.STORE].get_call(call_id)
    assert stored is not None and '"7"' not in json.dumps(stored.data), "keys are never stored"
    timeline = call_from_record(stored.data, stored.version).timeline
    assert not [e for e in timeline if e.event in HOLD_EVENTS]

    # Hold: Carla hears silence, the customer the hold tone (not Carla's 440 Hz).
    ack = await carla.call("call:hold", {"call_id": call_id, "on": True}, "/agent")
    assert ack["ok"], ack
    assert ack["call"]["timeline"][-1]["event"] == "on_hold"
    assert leg.stream is not None
    held_from = len(leg.stream.audio_played)
    pcm = await asyncio.wait_for(record(track, 1.0), 10)
    assert float(np.sqrt(np.mean(pcm[-4000:].astype(np.float64) ** 2))) < 50, "Carla hears"

    def a_beep() -> bool:
        # Silence is not sent; the beep is 200 ms (what was in flight may come before it).
        return len(leg.stream.audio_played) - held_from >= 1600 if leg.stream else False

    await sim.wait_until(a_beep, timeout=10, what="the hold tone at the phone")
    beep = bytes(leg.stream.audio_played)[-1200:]
    assert abs(dominant_frequency(beep) - HOLD_HZ) < 10, "the hold tone, not Carla"
    repeat = await carla.call("call:hold", {"call_id": call_id, "on": True}, "/agent")
    assert repeat["ok"] and repeat["call"]["timeline"][-1]["event"] == "on_hold"

    ack = await carla.call("call:hold", {"call_id": call_id, "on": False}, "/agent")
    assert ack["ok"] and ack["call"]["timeline"][-1]["event"] == "off_hold", ack
    await asyncio.wait_for(until_heard(track, 1000), 15)  # past the silence queued meanwhile
    resumed_from = len(leg.stream.audio_played)

    def back() -> bool:
        return len(leg.stream.audio_played) - resumed_from >= RATE if leg.stream else False

    await sim.wait_until(back, timeout=10, what="a second after the hold")
    assert abs(dominant_frequency(bytes(leg.stream.audio_played)[-4000:]) - 440) < 10

    # Only the agent talking from this socket may hold; a visitor's call:hold is unknown.
    ben = await agent(clients, a, "ben")
    refused = await ben.call("call:hold", {"call_id": call_id, "on": True}, "/agent")
    assert not refused["ok"] and refused["error"]["code"] == "forbidden", refused


async def test_a_visitor_whose_network_drops_is_let_go_and_the_phone_hung_up(
    nodes: NodeFactory,
    tmp_path: Path,
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    redis_url: str,
    clients: Callable[[], SocketClient],
    peers: RTCPeerConnection,
) -> None:
    """The visitor's socket and audio vanish mid-call and do not come back: after the grace
    period the call ends as ``visitor_left``, Anna's phone is hung up and she is free."""
    a = await bridged_node(nodes, tmp_path, sim, redis_url)
    a.app[keys.CALLS].visitor_grace_s = 1.0
    sim.phone(ANNA_PHONE, answer_after=1, press="1", tone_hz=1000)
    await on_mobile(http, a, "anna")
    hearing = remote_track(peers)
    v, call_id = await call_anna(http, clients, a, peers)
    await asyncio.wait_for(heard(await asyncio.wait_for(hearing, 15), 0.5), 15)
    leg = anna_leg(sim)

    await v.sio.disconnect()  # as a tab whose network went: its socket closes
    await peers.close()
    await sim.wait_for_call(sid=leg.sid, status="completed", timeout=15)
    row = await a.app[keys.STORE].get_call(call_id)
    assert row is not None and row.data["reason"] == "visitor_left", row
    await free_everywhere(http, a)
