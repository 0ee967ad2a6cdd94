"""The media workers of one gateway node: started with it, supervised, and handed calls.

``MediaWorkers`` is the node's ``MediaBridge`` (gateway/telephony.py). It starts
``media.workers`` processes (``python -m mobile_bridge.media.worker``), each told to stop when
the node is gone (its stdin is a pipe from the node). A worker says ``listening PORT`` once it
serves, ``ended SESSION`` for each session that ends and ``key SESSION KEY`` for each key
pressed on a session's phone. A new session goes to the live
worker with the fewest of this node's sessions; a full one (``media_full``) passes it on.

A worker that dies takes its calls' sessions with it: each call this node opened on it is
reported lost (``on_lost``, with the session), so that the call's audio moves to a new
session (gateway.services.audio_bridge) or the call ends with a reason, rather than leaving
the visitor in silence and the agent "on a call"; the worker is started again. A session
asked for while no worker is live waits for one to be started again (``RESTART_WAIT_S``):
on a node of one worker, that is where a dead worker's calls move.

A session's ``ref`` is the URL of the session on its worker, and every node's workers take
the same token (derived from the Twilio auth token all nodes share), so whichever node a
visitor's signals reach can pass them to the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from gateway.settings import MediaSettings
from gateway.telephony import HeldSide, MediaSession, TelephonyError
from mobile_bridge.media.api import HEALTH, SESSIONS

log = logging.getLogger(__name__)

START_TIMEOUT_S: Final = 30.0
"""Importing aiortc and binding takes a second or two; a worker silent this long failed."""
RESTART_DELAY_S: Final = 1.0
"""Between the death of a worker that had just started and its replacement: a worker that
dies at once must not spin."""
SHORT_LIFE_S: Final = 10.0
"""A worker that lived longer is replaced at once: its calls wait for the replacement."""
REALTIME_PRIORITY: Final = 10
"""Low among real-time priorities: above every ordinary process, below the kernel's own
real-time threads."""
RESTART_WAIT_S: Final = 8.0
"""How long a session asked for waits while every worker is being started again: the
restart delay plus the second or two a worker takes to start."""
PROBE_EVERY_S: Final = 1.0
PROBE_MISSES: Final = 3
"""A worker that has not answered its probe this many times in a row is hung (stopped, or
stuck in a loop): it is killed, and its calls move as a dead worker's do."""
REQUEST_TIMEOUT_S: Final = 10.0
"""Answering an offer waits for the worker's ICE gathering (host candidates: milliseconds)."""


def worker_token(twilio_auth_token: str) -> str:
    """The token every node's workers take: one secret all nodes share, but not the auth
    token itself (a worker's token in a log must not sign Twilio webhooks)."""
    return hmac.new(
        twilio_auth_token.encode(), b"membrane media worker", hashlib.sha256
    ).hexdigest()


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process
    port: int
    base_url: str
    public_url: str
    sessions: dict[str, str] = field(default_factory=dict)
    """This node's sessions on the worker: session id to call id."""
    started_at: float = field(default_factory=time.monotonic)

    def ref_of(self, session_id: str) -> str:
        return f"{self.base_url}{SESSIONS}/{session_id}"


class MediaWorkers:
    def __init__(
        self, settings: MediaSettings, twilio_auth_token: str, previous_auth_token: str = ""
    ) -> None:
        self._settings = settings
        self._auth_token = twilio_auth_token
        self._previous_auth_token = previous_auth_token
        self._token = worker_token(twilio_auth_token)
        self._workers: dict[int, Worker] = {}
        self._http: aiohttp.ClientSession | None = None
        self._supervisors: set[asyncio.Task[None]] = set()
        self._closing = False
        self._lost: list[Callable[[str, str], Awaitable[None]]] = []
        self._keys: list[Callable[[str, str], Awaitable[None]]] = []
        self._realtime_refused = False
        self._restarting = 0
        self._starts = 0
        """Workers started (or given up on) so far: a session waits for it to change."""
        self._started = asyncio.Condition()

    # --- MediaBridge ------------------------------------------------------------------------

    def on_lost(self, listener: Callable[[str, str], Awaitable[None]]) -> None:
        self._lost.append(listener)

    def on_key(self, listener: Callable[[str, str], Awaitable[None]]) -> None:
        self._keys.append(listener)

    async def open(self, call_id: str, make_offer: bool = False) -> MediaSession:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESTART_WAIT_S
        while True:
            seen = self._starts
            session, dying = await self._open_on_a_live_worker(call_id, make_offer)
            if session is not None:
                return session
            left = deadline - loop.time()
            if not (self._restarting or dying) or left <= 0:
                raise TelephonyError("media_full", "every media worker of this node is full")
            await self._until_a_start_since(seen, left)

    async def _open_on_a_live_worker(
        self, call_id: str, make_offer: bool
    ) -> tuple[MediaSession | None, bool]:
        """A session on the least busy worker that takes it; else None, and whether a worker
        is dead or dying (its supervisor will start another: worth waiting for)."""
        ask = {"make_offer": True} if make_offer else {}
        dying = False
        for worker in sorted(self._workers.values(), key=lambda w: len(w.sessions)):
            if worker.process.returncode is not None:
                dying = True
                continue
            try:
                status, body = await self._request("POST", worker.base_url + SESSIONS, ask)
            except TelephonyError:
                dying = True  # its supervisor is about to hear of it
                continue
            if status == 503:
                continue
            if status != 201:
                raise TelephonyError("media_error", f"the media worker answered {status}: {body}")
            session_id = str(body["session"])
            worker.sessions[session_id] = call_id
            session = MediaSession(
                ref=worker.ref_of(session_id),
                stream_url=worker.public_url + str(body["stream_path"]),
                offer=body.get("offer"),
            )
            return session, dying
        return None, dying

    async def answer(self, ref: str, offer: str) -> str:
        status, body = await self._request("POST", ref + "/offer", {"offer": offer})
        if status != 200:
            code = _code_of(body)
            raise TelephonyError(code, f"the media worker refused the offer: {status} {code}")
        return str(body["answer"])

    async def accept_answer(self, ref: str, answer: str) -> None:
        status, body = await self._request("POST", ref + "/answer", {"answer": answer})
        if status != 204:
            code = _code_of(body)
            raise TelephonyError(code, f"the media worker refused the answer: {status} {code}")

    async def add_candidate(self, ref: str, candidate: Mapping[str, Any]) -> None:
        status, body = await self._request("POST", ref + "/candidate", {"candidate": candidate})
        if status not in (204, 400):
            # A candidate the worker cannot use is not worth ending the call over.
            code = _code_of(body)
            raise TelephonyError(code, f"the media worker refused a candidate: {status} {code}")

    async def hold(self, ref: str, on: bool, held: HeldSide = "phone") -> None:
        status, body = await self._request("POST", ref + "/hold", {"on": on, "held": held})
        if status != 204:
            code = _code_of(body)
            raise TelephonyError(code, f"the media worker refused to hold: {status} {code}")

    async def reachable(self, ref: str) -> bool:
        try:
            await self._request("GET", ref, None)
        except TelephonyError:
            return False
        return True

    async def close(self, ref: str) -> None:
        with contextlib.suppress(TelephonyError):
            await self._request("DELETE", ref, None)

    # --- the processes ---------------------------------------------------------------------

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            headers={"Authorization": f"Bearer {self._token}"},
        )
        await asyncio.gather(*(self._start_worker(i) for i in range(self._settings.workers)))

    async def stop(self) -> None:
        self._closing = True
        supervisors = list(self._supervisors)
        for task in supervisors:
            task.cancel()
        await asyncio.gather(*supervisors, return_exceptions=True)
        for worker in self._workers.values():
            if worker.process.returncode is None:
                worker.process.terminate()
        for worker in self._workers.values():
            try:
                await asyncio.wait_for(worker.process.wait(), 5)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
        if self._http is not None:
            await self._http.close()

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    async def _start_worker(self, index: int) -> None:
        s = self._settings
        port = s.base_port + index if s.base_port else 0
        template = s.public_ws_url or f"ws://{s.host}:{{port}}"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mobile_bridge.media.worker",
            "--host",
            s.host,
            "--port",
            str(port),
            "--public-ws-url",
            template,
            "--max-sessions",
            str(s.max_sessions),
            "--exit-with-stdin",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={
                **os.environ,
                "MEMBRANE_MEDIA_TOKEN": self._token,
                "MEMBRANE_TWILIO_AUTH_TOKEN": self._auth_token,
                "MEMBRANE_TWILIO_PREVIOUS_AUTH_TOKEN": self._previous_auth_token,
            },
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "listening":
            process.kill()
            await process.wait()
            raise RuntimeError(f"media worker {index} did not start (it said {line!r})")
        bound = int(words[1])
        if s.realtime:
            self._make_realtime(index, process.pid)
        worker = Worker(
            index,
            process,
            bound,
            f"http://{s.host}:{bound}",
            s.public_url_of(bound),
        )
        self._workers[index] = worker
        await self._one_started()
        log.info("media worker %d (pid %d) listening on %s", index, process.pid, worker.base_url)
        for watch, name in ((self._supervise, "media-worker"), (self._probe, "media-probe")):
            task = asyncio.create_task(watch(worker), name=f"{name}-{index}")
            self._supervisors.add(task)
            task.add_done_callback(self._supervisors.discard)

    def _make_realtime(self, index: int, pid: int) -> None:
        """SCHED_RR for the worker's event loop (its only busy thread): measured on a shared
        core, 50 calls kept every frame within 11 ms of its slot, where as an ordinary
        process some went 22-49 ms late (bench/media_bridge.py --realtime)."""
        try:
            os.sched_setscheduler(pid, os.SCHED_RR, os.sched_param(REALTIME_PRIORITY))
        except (OSError, AttributeError) as e:  # not permitted, or not Linux
            if not self._realtime_refused:
                self._realtime_refused = True
                log.warning(
                    "media worker %d runs as an ordinary process: real-time scheduling was "
                    "refused (%s); set media.realtime = false to silence this",
                    index,
                    e,
                )

    async def _supervise(self, worker: Worker) -> None:
        """Read the worker's lines until it exits; then report its calls and replace it."""
        stdout = worker.process.stdout
        assert stdout is not None
        while line := await stdout.readline():
            words = line.decode(errors="replace").split()
            if len(words) == 2 and words[0] == "ended":
                worker.sessions.pop(words[1], None)
            elif len(words) == 3 and words[0] == "key" and words[1] in worker.sessions:
                await self._key_pressed(worker.sessions[words[1]], words[2])
        code = await worker.process.wait()
        if self._closing:
            return
        lost = dict(worker.sessions)
        log.error(
            "media worker %d (pid %d) exited with %s; %d calls lost their audio",
            worker.index,
            worker.process.pid,
            code,
            len(lost),
        )
        worker.sessions.clear()
        self._restarting += 1
        # The calls move meanwhile: to live workers, or to this one's replacement.
        moving = asyncio.gather(
            *(self._report_lost(call_id, worker.ref_of(s)) for s, call_id in lost.items())
        )
        moving.add_done_callback(_retrieve)  # cancelled as the node stops: nothing to report
        try:
            try:
                if time.monotonic() - worker.started_at < SHORT_LIFE_S:
                    await asyncio.sleep(RESTART_DELAY_S)  # dying at once, it must not spin
                if not self._closing:
                    await self._start_worker(worker.index)
            except (RuntimeError, OSError) as e:
                log.error("media worker %d could not be started again: %s", worker.index, e)
            finally:
                self._restarting -= 1
                await self._one_started()  # no longer worth waiting for, if it did not start
            await moving
        finally:
            moving.cancel()  # only if the node stops meanwhile

    async def _until_a_start_since(self, seen: int, timeout_s: float) -> None:
        def started() -> bool:
            return self._starts != seen

        async with self._started:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._started.wait_for(started), timeout_s)

    async def _one_started(self) -> None:
        async with self._started:
            self._starts += 1
            self._started.notify_all()

    async def _probe(self, worker: Worker) -> None:
        """Ask the worker whether its event loop runs, once a second, until it exits: a hung
        worker never exits by itself, and its calls would stay silent."""
        assert self._http is not None
        timeout = aiohttp.ClientTimeout(total=PROBE_EVERY_S)
        missed = 0
        while worker.process.returncode is None:
            began = asyncio.get_running_loop().time()
            try:
                async with self._http.get(worker.base_url + HEALTH, timeout=timeout) as r:
                    missed = 0 if r.status == 204 else missed + 1
            except (aiohttp.ClientError, TimeoutError):
                missed += 1
            if missed >= PROBE_MISSES and worker.process.returncode is None:
                log.error(
                    "media worker %d (pid %d) has not answered for %d s: killing it",
                    worker.index,
                    worker.process.pid,
                    PROBE_MISSES,
                )
                worker.process.kill()  # its supervisor moves its calls
                return
            left = PROBE_EVERY_S - (asyncio.get_running_loop().time() - began)
            await asyncio.sleep(max(0.0, left))  # the probe's own cadence

    async def _report_lost(self, call_id: str, ref: str) -> None:
        await _tell(self._lost, call_id, ref, "moving its audio off a dead media worker")

    async def _key_pressed(self, call_id: str, key: str) -> None:
        await _tell(self._keys, call_id, key, "handling a key from the phone")

    async def _request(
        self, method: str, url: str, body: Mapping[str, Any] | None
    ) -> tuple[int, Any]:
        assert self._http is not None, "start() first"
        try:
            async with self._http.request(method, url, json=body) as r:
                data = await r.json(content_type=None) if r.status != 204 else None
                return r.status, data
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise TelephonyError("media_unreachable", f"media worker {url}: {e!r}") from None


def _code_of(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code", "media_error"))
    return "media_error"


async def _tell(
    listeners: list[Callable[[str, str], Awaitable[None]]], call_id: str, what: str, doing: str
) -> None:
    """Each listener, in turn: one that fails must not end the supervision of the worker's
    every call."""
    for listener in listeners:
        try:
            await listener(call_id, what)
        except Exception:
            log.exception("call %s: %s failed", call_id, doing)


def _retrieve(future: asyncio.Future[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        future.exception()
