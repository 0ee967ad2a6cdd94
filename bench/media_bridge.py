"""The audio bridge's media worker under N concurrent calls (issue 12's benchmark).

One media worker process (mobile_bridge/media/worker.py) on loopback. The driver plays both
ends of every call: a browser (a real aiortc peer sending a 440 Hz tone as PCMU, its offer
answered by the worker) and a phone (the Twilio simulator, reached through the real
``twilio`` SDK, whose ``<Connect><Stream>`` joins the worker's session and streams 1 kHz).
After ``--warmup-s`` it measures for ``--duration`` seconds:

- the worker's CPU (all its threads, from /proc) per call, as a share of a core;
- frames on time: each call's gaps (silence sent to the browser because the phone's frame
  was late) and drops (frames thrown away by a full queue), from the worker's stats;
- audio each phone received from the worker per second, against what the browsers sent;
- the added one-way latency, each way, by tone onset on one probe call whose Twilio side is
  the driver itself (``probe_call``);
- whether the worker kept every call's frames on time for the whole window: no frame it
  sent late (its event loop keeping up), none dropped either way (no queue growth), what
  the browsers sent passed on; and the largest N that did;
- gaps (silence sent to a browser because the phone's frame came late), with the longest
  time between two of a phone's frames reaching the worker (its input's jitter), and the
  phones' playout lag from Twilio's ``mark`` echoes, with the ``clear``s that bounded it;
  and the largest N without a gap on any call.

    .venv/bin/python bench/media_bridge.py --out bench/results/media_bridge.json

Note that the driver (N aiortc browsers and the simulated phones) shares the machine with
the worker: on a small machine it saturates first, and what it cannot send is not the
worker's failing (``frames_from_browsers_per_s``). With two cores or more the worker gets a
core of its own and the driver the others (``--no-pin`` to share them), as a worker would
on a node sized for it; the driver's jitter then shows as gaps, not as the worker's
lateness.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import aiohttp
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from twilio.request_validator import RequestValidator
from twilio_sim import TwilioSim, sdk_client
from twilio_sim.audio import Tone

from bench.harness import (
    ROOT,
    add_runs_argument,
    free_port,
    repeat,
    steal_report,
    steal_seconds,
    summary_ms,
    write_json,
)
from bench.machine_stalls import MachineStalls
from gateway.ops.gc_pacer import PROCESS_PACER
from mobile_bridge.media.pcmu import MuLawTrack, bridge_transceiver
from mobile_bridge.media.pool import REALTIME_PRIORITY

TOKEN = "bench-media-worker-token-0123456789abcdef"
DRIVER_BURST_S = 0.1
"""How long before a late frame's slot a driver stall may have ended and still be its cause
(the burst it released takes the worker a while to take in)."""
FRAMES_PER_S = 50


class BrowserTone(MuLawTrack):
    """The browser's microphone: a 440 Hz tone, already mu-law. A browser encodes in its own
    process; aiortc encoding in the driver's would make the driver, not the worker, what
    limits the frames sent (measured: 16 frames a second per call at 10 calls)."""

    FRAMES = [Tone(440).frame(i) for i in range(FRAMES_PER_S)]  # 440 whole cycles: 1 s loops

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    async def recv(self) -> Any:
        self.push(self.FRAMES[self._next % FRAMES_PER_S])
        self._next += 1
        return await super().recv()


TONE = Tone(440).frame(0)
SILENCE = b"\xff" * 160
BURST_EVERY = FRAMES_PER_S  # one 100 ms tone burst a second, each way
BURST_FRAMES = 5


def sounds(payload: bytes) -> bool:
    """Whether a mu-law frame carries the probe's tone rather than silence."""
    return payload.count(0xFF) < len(payload) // 2


class ProbeBrowser(MuLawTrack):
    """The probe call's browser: silence with a tone burst each second, noting when each
    burst's first frame is handed to aiortc's sender."""

    def __init__(self) -> None:
        super().__init__()
        self._next = 0
        self.onsets: list[float] = []

    async def recv(self) -> Any:
        index = self._next % BURST_EVERY
        self.push(TONE if index < BURST_FRAMES else SILENCE)
        self._next += 1
        packet = await super().recv()
        if index == 0:
            self.onsets.append(time.perf_counter())
        return packet


PHONE_TONE = [Tone(1000).frame(i) for i in range(FRAMES_PER_S)]  # 1000 cycles: 1 s loops


class DriverStalls:
    """The driver's own event loop running late (its browsers' and phones' frames held back,
    then sent in a burst that the worker must take in at once), with each wall-clock time;
    and the driver's collector pauses, which are one cause."""

    def __init__(self, threshold_s: float = 0.015) -> None:
        self.threshold_s = threshold_s
        self.stalls: list[tuple[float, float]] = []
        """(wall-clock start, milliseconds) of each tick more than the threshold late."""
        self.collections: list[tuple[float, int, float]] = []
        self._task: asyncio.Task[None] | None = None

    def observe_collection(self, generation: int, pause_s: float, collected: int) -> None:
        if pause_s > 0.005:
            self.collections.append((time.time(), generation, round(pause_s * 1000, 1)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            late = loop.time() - due
            if late > self.threshold_s:
                self.stalls.append((time.time() - late, round(late * 1000, 1)))

    def overlaps(self, start: float, end: float) -> bool:
        return any(s < end and s + ms / 1000 > start for s, ms in self.stalls)

    def report(self, start: float, end: float) -> dict[str, Any]:
        mine = [ms for s, ms in self.stalls if start <= s <= end]
        pauses = [ms for at, _, ms in self.collections if start <= at <= end]
        return {
            "loop_stalls_over_15_ms": len(mine),
            "max_loop_stall_ms": max(mine, default=0.0),
            "collections_over_5_ms": len(pauses),
            "max_collection_ms": max(pauses, default=0.0),
        }


class LightPhones:
    """The phones of ``--phones light``: each call's Media Stream as Twilio speaks it
    (``connected``, ``start``, a 1 kHz frame every 20 ms, ``mark`` echoes once the audio
    before them would have played), without the simulator's per-call bookkeeping, which on
    a small machine costs the driver more than the worker it measures. One task paces every
    phone's frames."""

    def __init__(self, auth_token: str) -> None:
        self._validator = RequestValidator(auth_token)
        self._http = aiohttp.ClientSession()
        self._sockets: list[aiohttp.ClientWebSocketResponse] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.received: list[int] = []
        """Audio bytes each phone got from the worker."""

    async def call(self, url: str) -> None:
        ws = await self._http.ws_connect(
            url, headers={"X-Twilio-Signature": self._validator.compute_signature(url, {})}
        )
        index = len(self._sockets)
        sid = f"MZ{index:032d}"
        self._sockets.append(ws)
        self.received.append(0)
        await ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        start = {
            "streamSid": sid,
            "accountSid": "AC" + "0" * 32,
            "callSid": f"CA{index:032d}",
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        await ws.send_json(
            {"event": "start", "sequenceNumber": "1", "start": start, "streamSid": sid}
        )
        self._tasks.append(asyncio.create_task(self._read(index, ws, sid)))

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._speak()))

    async def _speak(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        n = 0
        while True:
            await asyncio.sleep(max(0.0, started + n / FRAMES_PER_S - loop.time()))  # pacing
            payload = base64.b64encode(PHONE_TONE[n % FRAMES_PER_S]).decode()
            for i, ws in enumerate(self._sockets):
                media = {"track": "inbound", "chunk": str(n + 1), "timestamp": str(20 * (n + 1)),
                         "payload": payload}  # fmt: skip
                message = {"event": "media", "sequenceNumber": str(n + 2),
                           "streamSid": f"MZ{i:032d}", "media": media}  # fmt: skip
                if not ws.closed:
                    await ws.send_str(json.dumps(message))
            n += 1

    async def _read(self, index: int, ws: aiohttp.ClientWebSocketResponse, sid: str) -> None:
        loop = asyncio.get_running_loop()
        play_until = 0.0
        async for message in ws:
            event = json.loads(message.data)
            now = loop.time()
            if event["event"] == "media":
                audio = len(base64.b64decode(event["media"]["payload"]))
                self.received[index] += audio
                play_until = max(play_until, now) + audio / 8000
            elif event["event"] == "mark":
                echo = {"event": "mark", "sequenceNumber": "0", "streamSid": sid,
                        "mark": event["mark"]}  # fmt: skip
                loop.call_at(max(play_until, now), self._echo, ws, json.dumps(echo))
            elif event["event"] == "clear":
                play_until = now

    def _echo(self, ws: aiohttp.ClientWebSocketResponse, echo: str) -> None:
        if not ws.closed:
            self._tasks.append(asyncio.create_task(ws.send_str(echo)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for ws in self._sockets:
            await ws.close()
        await self._http.close()


def onset_latencies(sent: list[float], heard: list[float]) -> list[float]:
    """Each onset heard, matched to the latest one sent before it."""
    out = []
    for t in heard:
        earlier = [s for s in sent if s <= t]
        if earlier:
            out.append(t - earlier[-1])
    return out


async def probe_call(
    http: aiohttp.ClientSession,
    base: str,
    ws_base: str,
    auth_token: str,
    seconds: float,
    ready: asyncio.Event,
    go: asyncio.Event,
) -> dict[str, Any]:
    """One extra call whose Twilio side is the driver itself, to time tone onsets through
    the worker both ways on one clock: browser to phone, and phone to browser. It is set up
    (``ready``) before the measured window starts (``go``): a new call's set-up (its DTLS
    handshake) is work the worker does once, not per frame."""
    browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mic = ProbeBrowser()
    heard_by_browser: list[float] = []
    last = [False]

    def browser_hears(payload: bytes) -> None:
        loud = sounds(payload)
        if loud and not last[0]:
            heard_by_browser.append(time.perf_counter())
        last[0] = loud

    bridge_transceiver(browser, mic, browser_hears)
    connected = asyncio.Event()

    @browser.on("connectionstatechange")
    def on_state() -> None:
        if browser.connectionState == "connected":
            connected.set()

    await browser.setLocalDescription(await browser.createOffer())
    async with http.post(
        base + "/v1/media/sessions", json={"offer": browser.localDescription.sdp}
    ) as r:
        created = await r.json()
    await browser.setRemoteDescription(RTCSessionDescription(created["answer"], "answer"))
    url = ws_base + created["stream_path"]
    signature = RequestValidator(auth_token).compute_signature(url, {})
    sent_by_phone: list[float] = []
    heard_by_phone: list[float] = []
    async with (
        aiohttp.ClientSession() as twilio,
        twilio.ws_connect(url, headers={"X-Twilio-Signature": signature}) as ws,
    ):
        sid = "MZ" + "0" * 32
        await ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        start = {
            "streamSid": sid,
            "accountSid": "AC" + "0" * 32,
            "callSid": "CA" + "0" * 32,
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": media_format,
        }
        await ws.send_json(
            {"event": "start", "sequenceNumber": "1", "start": start, "streamSid": sid}
        )

        async def listen() -> None:
            loud_before = False
            async for message in ws:
                event = json.loads(message.data)
                if event["event"] != "media":
                    continue  # the worker's marks (this phone does not echo them)
                payload = base64.b64decode(event["media"]["payload"])
                for i in range(0, len(payload), 160):
                    loud = sounds(payload[i : i + 160])
                    if loud and not loud_before:
                        heard_by_phone.append(time.perf_counter())
                    loud_before = loud

        listening = asyncio.create_task(listen())
        await asyncio.wait_for(connected.wait(), 30)  # its DTLS handshake done
        ready.set()
        await go.wait()
        started = time.perf_counter()
        for n in range(int(seconds * FRAMES_PER_S)):
            due = started + n / FRAMES_PER_S
            await asyncio.sleep(max(0.0, due - time.perf_counter()))  # real-time pacing
            index = n % BURST_EVERY
            if index == 0:
                sent_by_phone.append(time.perf_counter())
            frame = TONE if index < BURST_FRAMES else SILENCE
            media = {
                "track": "inbound",
                "chunk": str(n + 1),
                "timestamp": str(20 * (n + 1)),
                "payload": base64.b64encode(frame).decode(),
            }
            await ws.send_json(
                {"event": "media", "sequenceNumber": str(n + 2), "streamSid": sid, "media": media}
            )
        listening.cancel()
    await browser.close()
    to_phone = onset_latencies(mic.onsets, heard_by_phone)
    to_browser = onset_latencies(sent_by_phone, heard_by_browser)
    return {
        "browser_to_phone_ms": summary_ms(to_phone),
        "phone_to_browser_ms": summary_ms(to_browser),
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU of every thread of ``pid`` (/proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_worker(port: int, auth_token: str, log: Path) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "MEMBRANE_MEDIA_TOKEN": TOKEN,
        "MEMBRANE_TWILIO_AUTH_TOKEN": auth_token,
        "PYTHONPATH": str(ROOT),
    }
    args = ["-m", "mobile_bridge.media.worker", "--port", str(port),
            "--public-ws-url", f"ws://127.0.0.1:{port}", "--max-sessions", "1000"]  # fmt: skip
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, env=env, stdout=out, stderr=out, cwd=str(ROOT)
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            await asyncio.sleep(0.1)  # until the worker listens
    raise RuntimeError(f"the media worker did not start; see {log}")


async def run(args: argparse.Namespace, calls: int) -> dict[str, Any]:
    ports = [free_port() for _ in range(args.workers)]
    port, base = ports[0], f"http://127.0.0.1:{ports[0]}"
    async with TwilioSim() as sim, sdk_client(sim) as client:
        workers = [
            await start_worker(p, sim.auth_token, Path(f"/tmp/membrane-media-worker-{p}.log"))
            for p in ports
        ]
        cores = sorted(os.sched_getaffinity(0))
        if args.pin and len(cores) >= 2:
            for worker in workers:  # all on the one core measured
                os.sched_setaffinity(worker.pid, {cores[-1]})
            os.sched_setaffinity(0, set(cores[:-1]))
        if args.realtime:
            for worker in workers:  # as a node does (media.realtime, on by default; root)
                os.sched_setscheduler(worker.pid, os.SCHED_RR, os.sched_param(REALTIME_PRIORITY))
        http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
        streams: dict[str, str] = {}

        async def twiml(request: web.Request) -> web.Response:
            url = streams[request.match_info["session"]]
            body = f'<Response><Connect><Stream url="{url}"/></Connect></Response>'
            return web.Response(text=body, content_type="text/xml")

        app = web.Application()
        app.router.add_post("/twiml/{session}", twiml)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        twiml_base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        browsers: list[RTCPeerConnection] = []
        call_sids: list[str] = []
        light = LightPhones(sim.auth_token) if args.phones == "light" else None
        # The driver's collector on a clock too: a full collection over N aiortc peers
        # stalls every phone's and browser's frames at once, which the worker would see as
        # its input's jitter.
        driver = DriverStalls()
        paced = PROCESS_PACER.acquire(driver.observe_collection)
        driver.start()
        try:
            for i in range(calls):
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                # What the browser hears is only counted, not decoded (the driver's CPU).
                bridge_transceiver(pc, BrowserTone(), lambda payload: None)
                browsers.append(pc)
                await pc.setLocalDescription(await pc.createOffer())
                on = ports[i % len(ports)]  # the calls dealt round the workers
                async with http.post(
                    f"http://127.0.0.1:{on}/v1/media/sessions",
                    json={"offer": pc.localDescription.sdp},
                ) as r:
                    created = await r.json()
                    assert r.status == 201, created
                await pc.setRemoteDescription(RTCSessionDescription(created["answer"], "answer"))
                session = created["session"]
                streams[session] = f"ws://127.0.0.1:{on}{created['stream_path']}"
                if light is not None:
                    await light.call(streams[session])
                    continue
                phone = f"+1555{7000000 + i}"
                sim.phone(phone, answer_after=0.1, tone_hz=1000)
                call = await client.calls.create_async(
                    to=phone, from_="+15005550006", url=f"{twiml_base}/twiml/{session}"
                )
                call_sids.append(call.sid)
            if light is not None:
                light.start()
            print(f"{calls} calls up; warming up", file=sys.stderr, flush=True)
            await asyncio.sleep(args.warmup_s)  # every stream started and steady

            async def stats() -> dict[str, Any]:
                merged: dict[str, Any] = {"calls": {}, "late_frames": [], "slow_collections": []}
                for p in ports:
                    async with http.get(f"http://127.0.0.1:{p}/v1/media/stats") as r:
                        got = await r.json()
                    merged["calls"].update(got["calls"])
                    merged["late_frames"] += got["late_frames"]
                    merged["slow_collections"] += got["slow_collections"]
                return merged

            def played() -> list[int]:
                if light is not None:
                    return list(light.received)
                out = []
                for sid in call_sids:
                    stream = sim.call(sid).stream
                    out.append(len(stream.audio_received) if stream is not None else 0)
                return out

            async def browsers_sent() -> list[int]:
                out = []
                for pc in browsers:
                    report = await pc.getStats()
                    out += [v.packetsSent for v in report.values() if v.type == "outbound-rtp"]
                return out

            ready, go = asyncio.Event(), asyncio.Event()
            probe = asyncio.create_task(
                probe_call(
                    http, base, f"ws://127.0.0.1:{port}", sim.auth_token, args.duration, ready, go
                )
            )
            await asyncio.wait_for(ready.wait(), 60)
            before_sent = await browsers_sent()
            before_stats, before_played = await stats(), played()
            cpu_before = sum(cpu_seconds(w.pid) for w in workers)
            stolen_before = steal_seconds()
            async with MachineStalls() as machine:
                started, window_from = time.perf_counter(), time.time()
                # The measured window, with the probe call timing onsets through it.
                go.set()
                latency = await probe
                elapsed, window_to = time.perf_counter() - started, time.time()
            cpu = sum(cpu_seconds(w.pid) for w in workers) - cpu_before
            stolen = steal_report(stolen_before, elapsed)
            after_stats, after_played = await stats(), played()
            after_sent = await browsers_sent()
        finally:
            await driver.stop()
            if paced:
                PROCESS_PACER.release(driver.observe_collection)
            if light is not None:
                await light.close()
            for sid in call_sids:
                sim.hangup(sid)
            for pc in browsers:
                await pc.close()
            await runner.cleanup()
            await http.close()
            for worker in workers:
                worker.terminate()
                await worker.wait()

    def per_call(key: str) -> list[int]:
        return [
            c[key] - before_stats["calls"].get(s, {}).get(key, 0)
            for s, c in after_stats["calls"].items()
        ]

    def delta(key: str) -> int:
        return sum(per_call(key))

    lags = [c["max_playout_lag_ms"] or 0 for c in after_stats["calls"].values()]
    late = [(at, ms) for at, ms in after_stats["late_frames"] if window_from <= at <= window_to]
    collections = [
        (at, ms) for at, _, ms in after_stats["slow_collections"] if window_from <= at <= window_to
    ]

    def in_collection(start: float, end: float) -> bool:
        # The collector's observer stamps a pause as it ends.
        return any(c_at - ms / 1000 < end and c_at > start for c_at, ms in collections)

    late_in_stalls = sum(1 for at, ms in late if machine.overlaps(at - ms / 1000, at))
    late_in_collections = sum(1 for at, ms in late if in_collection(at - ms / 1000, at))
    # A frame late after the driver's loop stalled: its input came as a burst (every call's
    # frames held back at once), which the worker took in before it could send.
    late_after_driver = sum(
        1 for at, ms in late if driver.overlaps(at - ms / 1000 - DRIVER_BURST_S, at)
    )

    sent = [(a - b) / elapsed for a, b in zip(after_sent, before_sent, strict=True)]
    frames_to_phones = [
        (a - b) / 160 / elapsed for a, b in zip(after_played, before_played, strict=True)
    ]
    used = cpu / elapsed
    return {
        "benchmark": "media_bridge",
        "calls": calls,
        "streaming": sum(1 for c in after_stats["calls"].values() if c["streaming"]),
        "duration_s": round(elapsed, 2),
        "worker_cpu_cores": round(used, 3),
        # The probe call is a call the worker carries too.
        "worker_cpu_per_call_pct": round(100 * used / (calls + 1), 3),
        "calls_per_core": round((calls + 1) / used, 1) if used else None,
        "gaps_to_browsers_per_call_per_s": round(delta("underruns") / calls / elapsed, 2),
        "drops_to_browsers": delta("dropped_to_browser"),
        "drops_to_phones": delta("dropped_to_phone"),
        "frames_to_phones_per_s": {
            "min": round(min(frames_to_phones), 1),
            "mean": round(sum(frames_to_phones) / len(frames_to_phones), 1),
        },
        # The browsers here are the driver's aiortc peers, which send fewer than 50 frames a
        # second when the driver is busy: on time means the worker passed on what it got.
        "frames_from_browsers_per_s": {
            "min": round(min(sent), 1),
            "mean": round(sum(sent) / len(sent), 1),
        },
        "passed_on_share": round(sum(frames_to_phones) / sum(sent), 3) if sum(sent) else None,
        "max_gaps_on_one_call": max(per_call("underruns"), default=0),
        "max_phone_arrival_gap_ms": max(
            (c["max_phone_arrival_gap_ms"] or 0 for c in after_stats["calls"].values()), default=0
        ),
        "max_phone_playout_lag_ms": max(lags, default=0),
        "clears": delta("clears"),
        # A stretch the hypervisor stole stalls the worker's loop whatever its load: frames
        # sent late beside steal on its core are the machine's, not the worker's.
        "steal_share_by_cpu": stolen,
        "frames_sent_late": delta("late_to_browser"),
        # Why they were late: a stall of the machine (every process stopped; seen by a
        # real-time watcher on each CPU) or a long pause of the worker's collector; the rest
        # are the worker's own loop falling behind. (The log keeps the last 2,000.)
        "frames_sent_late_logged": len(late),
        "late_frames_in_machine_stalls": late_in_stalls,
        "late_frames_in_worker_collections": late_in_collections,
        "late_frames_after_driver_stalls": late_after_driver,
        "driver_stalls": driver.report(window_from, window_to),
        "worker_collections_over_5_ms": len(collections),
        "max_worker_collection_ms": max((ms for _, ms in collections), default=0.0),
        "machine_stalls": machine.report(window_from, window_to),
        "max_send_lateness_ms": max(
            (c["max_late_to_browser_ms"] for c in after_stats["calls"].values()), default=0
        ),
        "on_time": bool(sum(sent))
        and sum(frames_to_phones) >= 0.98 * sum(sent)
        and delta("late_to_browser") == 0
        and delta("dropped_to_browser") == 0
        and delta("dropped_to_phone") == 0,
        # The same, but for frames late only while the machine itself stalled (every process
        # stopped): what the worker can answer for.
        "on_time_but_for_machine_stalls": bool(sum(sent))
        and sum(frames_to_phones) >= 0.98 * sum(sent)
        and len(late) == delta("late_to_browser")
        and late_in_stalls == len(late)
        and delta("dropped_to_browser") == 0
        and delta("dropped_to_phone") == 0,
        "no_gaps": max(per_call("underruns"), default=0) == 0,
        # From a burst's first frame handed to the sender to its first frame received, on the
        # driver's clock: aiortc's send path on the browser's side, loopback, the worker, and
        # (towards the browser) its 20 ms paced track.
        "added_latency": latency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calls", default="10,20,40,60,80", help="concurrent calls, ascending, one run each"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_false",
        help="the worker as an ordinary process (a node runs it under SCHED_RR: media.realtime)",
    )
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="worker and driver share the cores"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the measured core, calls dealt round them",
    )
    parser.add_argument(
        "--phones",
        choices=("light", "sim"),
        default="light",
        help="the phones' side: Media Streams spoken directly (light), or the Twilio simulator "
        "placing real calls through the SDK and TwiML (sim: heavier for the driver)",
    )
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser, default=1)
    args = parser.parse_args()
    results = {}
    for n in (int(x) for x in args.calls.split(",")):
        results[str(n)] = repeat(
            args.runs,
            lambda n=n: asyncio.run(run(args, n)),  # type: ignore[misc]
            worst=lambda r: r["worker_cpu_per_call_pct"],
            headline=lambda r: {k: r[k] for k in (
                "calls", "streaming", "worker_cpu_per_call_pct", "calls_per_core",
                "gaps_to_browsers_per_call_per_s", "max_gaps_on_one_call",
                "max_phone_arrival_gap_ms", "max_phone_playout_lag_ms", "clears",
                "frames_sent_late", "late_frames_in_machine_stalls",
                "on_time_but_for_machine_stalls",
                "late_frames_in_worker_collections", "late_frames_after_driver_stalls",
                "driver_stalls", "max_send_lateness_ms", "no_gaps",
                "frames_to_phones_per_s",
                "frames_from_browsers_per_s", "passed_on_share", "on_time", "added_latency")},
        )  # fmt: skip
    on_time = [int(n) for n, r in results.items() if _every_run(r, "on_time")]
    no_gaps = [int(n) for n, r in results.items() if _every_run(r, "no_gaps")]
    but_for_stalls = [
        int(n) for n, r in results.items() if _every_run(r, "on_time_but_for_machine_stalls")
    ]
    summary = {
        "largest_calls_on_time": max(on_time, default=0),
        "largest_calls_without_gaps": max(no_gaps, default=0),
        "largest_calls_on_time_but_for_machine_stalls": max(but_for_stalls, default=0),
        "duration_s_each": args.duration,
        "cpu_count": os.cpu_count(),
        "worker_pinned_to_own_core": args.pin and (os.cpu_count() or 1) >= 2,
        "worker_realtime": args.realtime,
        "workers_on_the_core": args.workers,
        "phones": args.phones,
    }
    print(json.dumps({"summary": summary}), flush=True)
    write_json(args.out, {"summary": summary, "runs": results})


def _every_run(result: dict[str, Any], key: str) -> bool:
    """``repeat``'s result for one N: ``key`` true in every run."""
    return all(r.get(key) for r in result["headline_by_run"])


if __name__ == "__main__":
    main()
