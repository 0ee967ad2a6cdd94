"""How long a bridged call is silent when its media worker dies and the call moves.

One gateway node (a process, in-memory store) with two media workers (``--workers``); the
Twilio simulator (tests/twilio_sim) in this process rings ``--calls`` agents who are only on
their phones: each presses 1 and plays 1 kHz into the Media Stream. Each visitor is a real
socket.io client with an aiortc peer sending 440 Hz. Once every call is bridged and audio
flows both ways, one of the workers is SIGKILLed, and for each call it held (the ones told
``rtc:restart``):

- the visitor offers again, from a new peer connection (aiortc cannot restart ICE; a browser
  restarts ICE on its own one), and the time from the kill to the first audio frame the
  visitor receives is the visitor's silence;
- the time from the kill until the agent's phone receives audio on its new stream (polled
  every 10 ms) is the agent's silence.

It also reports calls that ended instead of moving (there should be none) and the node's
log lines at WARNING and above.

    .venv/bin/python bench/media_move.py --calls 10 --out bench/results/media_move.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import aiohttp
import socketio
from aiortc import RTCPeerConnection, RTCSessionDescription
from media_peers import ToneTrack
from twilio_sim import TwilioSim

from bench.harness import (
    add_runs_argument,
    agent_mobile,
    demo_site_config,
    free_port,
    log_problems,
    repeat,
    start_node,
    stop_node,
    summary_ms,
    token,
    write_json,
)
from mobile_bridge.media.pool import SHORT_LIFE_S

ORIGIN = {"Origin": "http://127.0.0.1:8080"}
WAIT_S = 30.0


class Visitor:
    """One browser visitor in a bridged call: its socket, its peer connection, and when it
    first heard the phone again after the kill."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.sio = socketio.AsyncClient(reconnection=False)
        self.call_id = ""
        self.pc = RTCPeerConnection()
        self.updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.signals: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.restart = asyncio.Event()
        self.heard_again_at: float | None = None
        self.sio.on("call:update", self.updates.put_nowait, namespace="/visitor")
        self.sio.on("rtc:signal", self.signals.put_nowait, namespace="/visitor")
        self.sio.on("rtc:restart", lambda _: self.restart.set(), namespace="/visitor")

    async def call(self, http: aiohttp.ClientSession, url: str) -> None:
        async with http.post(f"{url}/v1/sites/acme/sessions", json={}, headers=ORIGIN) as r:
            session = await r.json()
        await self.sio.connect(
            url, namespaces=["/visitor"], auth={"token": session["token"]}, transports=["websocket"]
        )
        ack = await self.sio.call("call:start", {"language": "en"}, namespace="/visitor")
        if not ack.get("ok"):
            raise RuntimeError(f"call {self.index} refused: {ack}")
        self.call_id = ack["call"]["call_id"]
        await self._until_state("connected")
        await self._offer(self.pc)

    async def _until_state(self, state: str) -> None:
        async with asyncio.timeout(WAIT_S):
            while (await self.updates.get())["state"] != state:
                pass

    async def _offer(self, pc: RTCPeerConnection) -> None:
        pc.addTrack(ToneTrack(440))
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"type": "offer", "sdp": pc.localDescription.sdp}
        sent = {"call_id": self.call_id, "description": offer}
        ack = await self.sio.call("rtc:signal", sent, namespace="/visitor")
        if not ack.get("ok"):
            raise RuntimeError(f"offer of call {self.index} refused: {ack}")
        async with asyncio.timeout(WAIT_S):
            while "description" not in (answer := await self.signals.get()):
                pass
        await pc.setRemoteDescription(RTCSessionDescription(**answer["description"]))

    async def move(self) -> None:
        """Told to restart: offer from a new peer connection, and note the first frame."""
        again = RTCPeerConnection()
        await self._offer(again)
        old, self.pc = self.pc, again
        await old.close()
        track = again.getReceivers()[0].track
        await asyncio.wait_for(track.recv(), WAIT_S)
        self.heard_again_at = time.monotonic()

    async def close(self) -> None:
        await self.pc.close()
        await self.sio.disconnect()


def worker_pids(node_pid: int) -> list[int]:
    children = Path(f"/proc/{node_pid}/task/{node_pid}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"mobile_bridge.media.worker" in cmdline:
            pids.append(pid)
    return sorted(pids)


async def run(calls: int, workers: int) -> dict[str, Any]:
    sim = TwilioSim(
        time_scale=0.05,  # whispers quick; media in real time
        account_sid="AC" + secrets.token_hex(16),
        auth_token=secrets.token_hex(16),
    )
    await sim.start()
    workdir = Path(tempfile.mkdtemp(prefix="membrane-media-move-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = f'[media]\nworkers = {workers}\n[twilio]\napi_base_url = "{sim.base_url}"\n'
    config = workdir / "membrane.toml"
    config.write_text(demo_site_config(calls, mobiles=True, extra=extra))
    os.environ["MEMBRANE_TWILIO_ACCOUNT_SID"] = sim.account_sid
    os.environ["MEMBRANE_TWILIO_AUTH_TOKEN"] = sim.auth_token
    os.environ["MEMBRANE_PUBLIC_URL"] = url
    node = await start_node(config, "", workdir, "node", port)
    node_started = time.monotonic()
    visitors = [Visitor(i) for i in range(calls)]
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(calls):
                sim.phone(agent_mobile(i), answer_after=0.5, press="1", tone_hz=1000)
                headers = {"Authorization": f"Bearer {token(f'a{i}')}"}
                body = {"kind": "mobile", "state": "available"}
                async with http.put(
                    f"{url}/v1/agents/me/devices/phone", json=body, headers=headers
                ) as r:
                    if r.status != 200:
                        raise RuntimeError(f"agent a{i}: {r.status} {await r.text()}")
            for v in visitors:  # one at a time: each rings the next free agent
                await v.call(http, url)
            legs = {c.to: c for c in sim.calls}

            def streaming() -> bool:
                return all(
                    c.stream is not None and len(c.stream.audio_played) > 8000
                    for c in legs.values()
                )

            await sim.wait_until(streaming, timeout=WAIT_S, what="audio at every phone")
            # A worker killed right after it started is replaced only after a pause (so that
            # one that dies at once does not spin); the one killed here has run a while.
            await asyncio.sleep(max(0.0, node_started + SHORT_LIFE_S + 1 - time.monotonic()))
            pids = worker_pids(node.proc.pid)
            heard_before = {sid: len(c.streams) for sid, c in legs.items()}
            killed_at = time.monotonic()
            os.kill(pids[0], signal.SIGKILL)

            told: list[Visitor] = []

            async def told_or_not(v: Visitor) -> None:
                try:
                    await asyncio.wait_for(v.restart.wait(), 15)
                except TimeoutError:
                    return  # its call was on the other worker
                told.append(v)
                await v.move()

            moving = asyncio.gather(*(told_or_not(v) for v in visitors))
            agent_silence: list[float] = []
            heard_again: set[str] = set()

            def moved_legs() -> set[str]:
                return {to for to, c in legs.items() if len(c.streams) > heard_before[to]}

            # Polled every 10 ms from the kill (the simulator keeps what each phone heard,
            # not when): each moved leg's first audio on its new stream.
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                for to in moved_legs() - heard_again:
                    if len(legs[to].streams[-1].audio_played) > 0:
                        agent_silence.append(time.monotonic() - killed_at)
                        heard_again.add(to)
                if moving.done() and moved_legs() == heard_again:
                    break
                await asyncio.sleep(0.01)
            await moving
            waiting = moved_legs() - heard_again
            visitor_silence = [
                v.heard_again_at - killed_at for v in told if v.heard_again_at is not None
            ]
            ended = 0
            for v in visitors:
                while not v.updates.empty():
                    if v.updates.get_nowait()["state"] == "completed":
                        ended += 1
            return {
                "calls": calls,
                "workers": len(pids),
                "calls_on_the_killed_worker": len(told),
                "phone_legs_moved": len(moved_legs()),
                "phone_legs_not_heard_again": len(waiting),
                "calls_ended_instead": ended,
                "visitor_silence": summary_ms(visitor_silence),
                "agent_silence": summary_ms(agent_silence),
                "node_log_problems": log_problems([node.log]),
            }
    finally:
        for v in visitors:
            await v.close()
        await stop_node(node)
        await sim.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="media workers on the node (1: calls wait for the dead one's replacement)",
    )
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser)
    args = parser.parse_args()
    result = repeat(
        args.runs,
        lambda: asyncio.run(run(args.calls, args.workers)),
        worst=lambda r: r["visitor_silence"].get("max_ms", float("nan")),
        headline=lambda r: {k: r[k] for k in (
            "calls_on_the_killed_worker", "phone_legs_moved", "phone_legs_not_heard_again",
            "calls_ended_instead", "visitor_silence", "agent_silence")},
    )  # fmt: skip
    write_json(args.out, result)


if __name__ == "__main__":
    main()
