"""Soak: one node holding idle widgets, agents with heartbeats and clients that never read,
for minutes. Does its memory stay flat, and its event loop prompt?

One node (on a private Redis; ``--embedded`` for the embedded store) holds:

- ``--widgets`` idle website widgets: availability SSE streams
  (``GET /v1/sites/acme/availability/stream``), each a bare ``asyncio.Protocol`` in one
  driver child process that only counts the frames it gets;
- ``--agents`` agents, each with one ``/agent`` socket (the lean driver of bench/harness.py)
  and one REST device (``im``) put once and then heartbeated every third of its lease
  (``--device-ttl``); the agents' sockets change presence at ``--change-rate`` a second in
  turn (available, away, ...), so the widgets, and ``--boards`` supervisor boards that read,
  get steady traffic (each heartbeat is a ``presence:update`` to the boards as well);
- ``--never-readers`` clients that connect and then never read again, in turn an SSE stream,
  a ``/board`` socket and an ``/agent`` socket (as one of the agents). Each has a tiny receive
  buffer and the MSS of an internet path (1,400 bytes; over loopback's 64 KiB MSS the node's
  kernel would take in ~2.8 MB per connection before the node saw any backpressure). The
  socket.io ones keep answering pings blindly (a pong every 10 s, as the ping timeout would
  cut them otherwise), so only the node's outgoing-buffer limit can drop them. Their fate is
  watched from both ends: the driver's socket state (TCP_INFO) and the node's side in
  ``/proc/net/tcp``. A never-reader counts as dropped once either is no longer ESTABLISHED.
  Even so the node's kernel takes in ~200 KB per never-reader before the node sees any
  backpressure (``node_send_queues_kb``; not in its RSS): at 1 change a second an SSE
  never-reader gets ~220 bytes a second and is not cut within 10 minutes, a board one (every
  heartbeat is an update too) in a few. ``--change-rate 20`` cuts all within ~2 minutes.

Every ``--sample-every`` seconds: the node's VmRSS, open descriptors, established
connections and kernel send queues, its ``membrane_event_loop_lag_seconds`` (how late each
10 ms tick of the node's event loop ran), sockets by namespace, and the widgets still open.
After the warm-up (``--warmup``, by default a fifth of the run, at most 60 s): RSS per connection
((RSS - RSS before any client) / established connections), event-loop lag p50/p99 (from the
histogram's buckets, interpolated), and memory growth: the least-squares slope of RSS over
the samples in MB/min, and last minus first. Growth is "within noise" when the slope
projected over 10 minutes is under 1% of the node's RSS (Python's allocator moves a few MB
either way as arenas fill and empty; a leak of one object per message or per heartbeat does
not stay under that for long). It is judged only with at least 3 minutes of samples after
the warm-up: over the first minutes the allocator is still settling after the connects.

    .venv/bin/python bench/soak.py --out bench/results/soak.json

A quick check: ``--widgets 1000 --agents 100 --never-readers 10 --duration 60``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import re
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.harness import (
    NodeProcess,
    RawSocketIO,
    add_runs_argument,
    cpu_per_unit,
    cpu_report,
    demo_site_config,
    gc_pause_report,
    gc_pauses,
    log_problems,
    raise_fd_limit,
    redis_server,
    repeat,
    sched,
    settle_rss,
    start_node,
    stop_node,
    summary_ms,
    token,
    vm_rss_mb,
    write_json,
)

SCRIPT = str(Path(__file__).resolve())
STREAM_PATH = "/v1/sites/acme/availability/stream"
ORIGIN = "http://127.0.0.1:8080"
NEVER_READER_RCVBUF = 4096
INTERNET_MSS = 1400
BLIND_PONG_EVERY_S = 10.0
NEVER_READER_POLL_S = 2.0
# Noise: RSS may drift by this share of itself per 10 minutes without counting as growth.
NOISE_SHARE_PER_10_MIN = 0.01

TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip
TCP_ESTABLISHED = 1


# --- the widgets (run in a child process) ----------------------------------------------------


class IdleWidget(asyncio.Protocol):
    """One idle widget: sends the GET, then only counts the frames that arrive."""

    __slots__ = ("frames", "lost", "request", "status", "tail", "transport")

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.status = 0
        self.frames = 0
        self.lost = False
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data
        if not self.status and len(buf) >= 12:
            self.status = int(buf[9:12])
        # Keeping the last 5 bytes counts a "data: " cut by a segment once, and none twice.
        self.frames += buf.count(b"data: ")
        self.tail = buf[-5:]


def itself(w: IdleWidget) -> Callable[[], IdleWidget]:
    return lambda: w


async def widgets_child(args: argparse.Namespace) -> None:
    """Open ``--widgets`` streams and say ``ready <open> <failed>``; then answer each ``stat``
    line on stdin with one JSON line of counts, until ``stop``."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    host, port = args.url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"GET {STREAM_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Accept: text/event-stream\r\nOrigin: {ORIGIN}\r\n\r\n"
    ).encode()
    widgets: list[IdleWidget] = []
    failed = 0
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        nonlocal failed
        async with sem:
            for attempt in range(3):
                w = IdleWidget(request)
                try:
                    await loop.create_connection(itself(w), host, int(port))
                    widgets.append(w)
                    return
                except OSError:
                    if attempt == 2:
                        failed += 1
                        return
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(one() for _ in range(args.widgets)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until every stream has its first frame, bounded
        if all(w.frames or w.lost or w.status not in (0, 200) for w in widgets):
            break
        await asyncio.sleep(0.1)
    ok = sum(1 for w in widgets if w.frames and not w.lost)
    print(f"ready {ok} {args.widgets - ok}", flush=True)
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line != "stat":
                break
            counts = {
                "open": sum(1 for w in widgets if not w.lost),
                "lost": sum(1 for w in widgets if w.lost),
                "frames": sum(w.frames for w in widgets),
                "refused": sum(1 for w in widgets if w.status not in (0, 200)),
            }
            print(json.dumps(counts), flush=True)
    finally:
        for w in widgets:
            if w.transport is not None:
                w.transport.close()


class Widgets:
    """The parent's handle on the widgets' child process."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self, url: str, n: int) -> tuple[int, int]:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, "--child", "--url", url, "--widgets", str(n),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 600)).decode().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"the widgets' process failed to start: {line}")
        return int(line[1]), int(line[2])

    async def stat(self) -> dict[str, int]:
        if self.proc is None or self.proc.returncode is not None:
            return {}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(b"stat\n")
            await self.proc.stdin.drain()
            counts: dict[str, int] = json.loads(
                await asyncio.wait_for(self.proc.stdout.readline(), 30)
            )
            return counts

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(b"stop\n")
            await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# --- never-readers ---------------------------------------------------------------------------


def ws_text_frame(text: str) -> bytes:
    """One masked client-to-server WebSocket text frame."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = bytes([0x81, 0x80 | n])
    elif n < 1 << 16:
        header = bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
    else:
        header = bytes([0x81, 0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@dataclass(eq=False)
class NeverReader:
    """A client that read its handshake and nothing since. Its socket is not registered with
    the event loop at all, so nothing reads it; the driver only writes (blind pongs) and asks
    the kernel for its TCP state."""

    kind: str  # "sse", "board" or "agent"
    sock: socket.socket
    port: int
    opened_at: float
    dropped_at: float | None = None
    how: str = ""
    _buf: bytes = b""

    @classmethod
    async def open(cls, kind: str, url: str, agent: str) -> NeverReader:
        loop = asyncio.get_running_loop()
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before connecting: the window and MSS are agreed in the handshake.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NEVER_READER_RCVBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, INTERNET_MSS)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(20):
                await loop.sock_connect(sock, (host, int(port)))
                reader = cls(kind, sock, sock.getsockname()[1], 0.0)
                if kind == "sse":
                    await reader._sse_handshake(host, port)
                else:
                    namespace = "/board" if kind == "board" else "/agent"
                    role = "supervisor" if kind == "board" else "agent"
                    await reader._socketio_handshake(
                        host, port, namespace, token("sup" if kind == "board" else agent, role)
                    )
        except BaseException:
            sock.close()
            raise
        reader.opened_at = time.monotonic()
        return reader

    async def _recv(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if not data:
            raise ConnectionError(f"{self.kind}: closed during the handshake")
        self._buf += data

    async def _send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _sse_handshake(self, host: str, port: str) -> None:
        await self._send(
            f"GET {STREAM_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Accept: text/event-stream\r\nOrigin: {ORIGIN}\r\n\r\n".encode()
        )
        while b"data: " not in self._buf:
            await self._recv()
        if not self._buf.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"sse: {self._buf[:40]!r}")

    async def _socketio_handshake(self, host: str, port: str, namespace: str, jwt: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        await self._send(
            f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in self._buf:
            await self._recv()
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"{namespace}: {head[:40]!r}")
        opened = await self._frame()
        if not opened.startswith("0"):
            raise ConnectionError(f"{namespace}: no engine.io open: {opened[:40]!r}")
        await self._send(ws_text_frame(f"40{namespace}," + json.dumps({"token": jwt})))
        while True:
            msg = await self._frame()
            if msg.startswith(f"40{namespace},"):
                return
            if msg.startswith(f"44{namespace},"):
                raise ConnectionError(f"{namespace}: refused: {msg}")

    async def _frame(self) -> str:
        """The next server-to-client frame's payload (unmasked, unfragmented: all the node
        sends during a handshake)."""
        while True:
            if len(self._buf) >= 2:
                n = self._buf[1] & 0x7F
                offset = {126: 4, 127: 10}.get(n, 2)
                if offset > 2 and len(self._buf) >= offset:
                    n = int.from_bytes(self._buf[2:offset])
                if len(self._buf) >= offset and len(self._buf) >= offset + n:
                    payload = self._buf[offset : offset + n]
                    self._buf = self._buf[offset + n :]
                    return payload.decode(errors="replace")
            await self._recv()

    def blind_pong(self) -> None:
        """An engine.io pong, whether or not a ping came: this client never reads, but it
        must not be cut for not answering pings."""
        if self.kind == "sse" or self.dropped_at is not None:
            return
        try:
            self.sock.send(ws_text_frame("3"))
        except BlockingIOError:
            pass  # the node does not read either: its window is full
        except OSError:
            self.mark_dropped(time.monotonic(), "send failed (reset)")

    def tcp_state(self) -> int:
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        except OSError:
            return 0

    def mark_dropped(self, now: float, how: str) -> None:
        if self.dropped_at is None:
            self.dropped_at = now
            self.how = how

    def close(self) -> None:
        # A reset: a graceful close would wait for the window the node never gets.
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# --- figures ---------------------------------------------------------------------------------


def tcp_table(node_port: int) -> dict[int, tuple[str, int]]:
    """The node's side of each of its client connections: by the client's port, the TCP
    state and the bytes in the kernel's send queue (not yet acknowledged by the client)."""
    out: dict[int, tuple[str, int]] = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
            if int(local[-4:], 16) != node_port or state == "0A":
                continue
            out[int(remote[-4:], 16)] = (TCP_STATES.get(state, state), int(queues[:8], 16))
    return out


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every series of ``/metrics`` (name with labels) and its value."""
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


LAG = "membrane_event_loop_lag_seconds"


def lag_buckets(before: dict[str, float], after: dict[str, float]) -> list[tuple[float, float]]:
    """The lag histogram's cumulative buckets between two scrapes: (upper bound, count)."""
    out = []
    for series, value in after.items():
        if series.startswith(f'{LAG}_bucket{{le="'):
            bound = float(series.split('"')[1])
            out.append((bound, value - before.get(series, 0.0)))
    return sorted(out)


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """As Prometheus's histogram_quantile: linear within the bucket holding rank q. In the
    +Inf bucket, the largest finite bound (a lower bound)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    low, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return low
            return low + (bound - low) * (rank - below) / max(count - below, 1e-12)
        low, below = bound, count
    return low


def lag_report(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    buckets = lag_buckets(before, after)
    if not buckets:
        return {"available": False}
    total = buckets[-1][1]

    def ms(q: float) -> float | None:
        v = quantile(buckets, q)
        return None if v is None else round(v * 1000, 2)

    def over(bound: float) -> float:
        return total - next((c for b, c in buckets if b >= bound), total)

    return {
        "observations": total,
        "p50_ms": ms(0.5),
        "p90_ms": ms(0.9),
        "p99_ms": ms(0.99),
        "over_10_ms": over(0.01),
        "over_50_ms": over(0.05),
        "over_100_ms": over(0.1),
        "over_250_ms": over(0.25),
    }


def labelled(metrics: dict[str, float], name: str) -> dict[str, float]:
    """One labelled series' values by its (only) label's value."""
    return {
        series.split('"')[1]: value
        for series, value in metrics.items()
        if series.startswith(name + "{")
    }


def trend(points: list[tuple[float, float]]) -> dict[str, float | None]:
    """Least-squares line through (minute, MB) points: slope, its standard error, and the
    residuals' standard deviation (the noise around the line)."""
    if len(points) < 3:
        return {"slope_mb_per_min": None, "slope_stderr_mb_per_min": None, "residual_sd_mb": None}
    ts = [t for t, _ in points]
    ys = [y for _, y in points]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    sxx = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (y - my) for t, y in points) / sxx
    residuals = [y - (my + slope * (t - mt)) for t, y in points]
    sd = math.sqrt(sum(r * r for r in residuals) / (len(points) - 2))
    return {
        "slope_mb_per_min": round(slope, 4),
        "slope_stderr_mb_per_min": round(sd / math.sqrt(sxx), 4),
        "residual_sd_mb": round(sd, 3),
    }


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Traffic:
    changes: int = 0
    board_updates: int = 0
    heartbeats_ok: int = 0
    heartbeats_lapsed: int = 0
    heartbeat_errors: int = 0
    driver_max_lag_s: float = 0.0


async def heartbeats(
    http: aiohttp.ClientSession,
    url: str,
    tokens: list[str],
    every_s: float,
    stop: asyncio.Event,
    traffic: Traffic,
    latencies: list[float],
) -> None:
    """Each agent's REST device heartbeats once every ``every_s``, the agents spread evenly
    over the interval; a heartbeat answered 404 (the device lapsed) puts the device again."""

    async def one(jwt: str) -> None:
        headers = {"Authorization": f"Bearer {jwt}"}
        started = time.perf_counter()
        try:
            async with http.post(f"{url}/v1/agents/me/devices/im/heartbeat", headers=headers) as r:
                await r.read()
                status = r.status
            if status == 404:
                traffic.heartbeats_lapsed += 1
                await put_device(http, url, jwt)
            elif status != 200:
                traffic.heartbeat_errors += 1
            else:
                traffic.heartbeats_ok += 1
                latencies.append(time.perf_counter() - started)
        except (aiohttp.ClientError, TimeoutError):
            traffic.heartbeat_errors += 1

    pending: set[asyncio.Task[None]] = set()
    rate = len(tokens) / every_s
    started = time.perf_counter()
    issued = 0
    while not stop.is_set():
        due = started + issued / rate
        now = time.perf_counter()
        if due > now:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), due - now)
            continue
        task = asyncio.create_task(one(tokens[issued % len(tokens)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
        issued += 1
    await asyncio.gather(*pending, return_exceptions=True)


async def put_device(http: aiohttp.ClientSession, url: str, jwt: str) -> None:
    async with http.put(
        f"{url}/v1/agents/me/devices/im",
        json={"kind": "im", "state": "available"},
        headers={"Authorization": f"Bearer {jwt}"},
    ) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"PUT device: {r.status}")


async def presence_changes(
    agents: list[RawSocketIO], rate: float, stop: asyncio.Event, traffic: Traffic
) -> None:
    """The agents' sockets in turn set their desktop device available or away."""
    if rate <= 0:
        await stop.wait()
        return
    states = [True] * len(agents)
    started = time.perf_counter()
    while not stop.is_set():
        due = started + traffic.changes / rate
        now = time.perf_counter()
        if due > now:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), due - now)
            continue
        traffic.driver_max_lag_s = max(traffic.driver_max_lag_s, now - due)
        k = traffic.changes % len(agents)
        states[k] = not states[k]
        state = "available" if states[k] else "away"
        await agents[k].emit("presence:set", {"kind": "desktop", "state": state})
        traffic.changes += 1


async def watch_never_readers(
    readers: list[NeverReader], node_port: int, started: float, stop: asyncio.Event
) -> None:
    """Every couple of seconds, which never-readers the node let go: the driver's socket was
    reset or closed, or the node's side left ESTABLISHED (or is gone)."""
    last_pong = started
    while not stop.is_set():
        now = time.monotonic()
        if now - last_pong >= BLIND_PONG_EVERY_S:
            last_pong = now
            for r in readers:
                r.blind_pong()
        table = await asyncio.to_thread(tcp_table, node_port)
        for r in readers:
            if r.dropped_at is not None:
                continue
            state = r.tcp_state()
            node_side = table.get(r.port)
            if state != TCP_ESTABLISHED:
                r.mark_dropped(now, f"driver's socket {TCP_STATES.get(f'{state:02X}', state)}")
            elif node_side is None:
                r.mark_dropped(now, "node's side gone")
            elif node_side[0] != "ESTABLISHED":
                r.mark_dropped(now, f"node's side {node_side[0]}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), NEVER_READER_POLL_S)


async def sample(
    http: aiohttp.ClientSession,
    node: NodeProcess,
    node_port: int,
    widgets: Widgets,
    readers: list[NeverReader],
    traffic: Traffic,
    t: float,
    previous: dict[str, float],
) -> tuple[dict[str, Any], dict[str, float]]:
    pid = node.proc.pid
    metrics = await scrape(http, node.url)
    table = await asyncio.to_thread(tcp_table, node_port)
    states = Counter(state for state, _ in table.values())
    lag = lag_report(previous, metrics)
    row = {
        "t_s": round(t, 1),
        "rss_mb": round(vm_rss_mb(pid), 2),
        "fds": open_fds(pid),
        "established": states.pop("ESTABLISHED", 0),
        "other_tcp_states": dict(states),
        "node_send_queues_kb": round(sum(q for _, q in table.values()) / 1024, 1),
        "sockets": labelled(metrics, "membrane_sockets"),
        "widgets": await widgets.stat(),
        "never_readers_kept": sum(1 for r in readers if r.dropped_at is None),
        "lag_p99_ms": lag.get("p99_ms"),
        "lag_over_50_ms": lag.get("over_50_ms"),
        "presence_changes": traffic.changes,
        "heartbeats_ok": traffic.heartbeats_ok,
    }
    return row, metrics


async def connect_agents(
    http: aiohttp.ClientSession, url: str, n: int, traffic: Traffic
) -> tuple[list[RawSocketIO], list[str]]:
    sem = asyncio.Semaphore(32)
    agents: list[RawSocketIO | None] = [None] * n
    tokens = [token(f"a{i}", ttl=24 * 3600) for i in range(n)]

    async def one(i: int) -> None:
        async with sem:
            await put_device(http, url, tokens[i])
            client = RawSocketIO(http, url, "/agent")
            await client.connect({"token": tokens[i], "state": "available"})
            agents[i] = client

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    connected = [a for a in agents if a is not None]
    if failures:
        for a in connected:
            await a.close()
        raise RuntimeError(f"{len(failures)} agents failed to connect: {failures[0]!r}")
    return connected, tokens


async def measure(args: argparse.Namespace, node: NodeProcess) -> dict[str, Any]:
    pid = node.proc.pid
    node_port = int(node.url.rsplit(":", 1)[1])
    traffic = Traffic()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    beats = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32))
    widgets = Widgets()
    agents: list[RawSocketIO] = []
    boards: list[RawSocketIO] = []
    readers: list[NeverReader] = []
    try:
        rss_baseline = await settle_rss(pid)
        print(f"node RSS {rss_baseline:.1f} MB before any client", file=sys.stderr, flush=True)
        connect_started = time.perf_counter()
        widgets_open, widgets_failed = await widgets.start(node.url, args.widgets)
        print(f"{widgets_open} widgets (failed {widgets_failed})", file=sys.stderr, flush=True)
        agents, tokens = await connect_agents(http, node.url, args.agents, traffic)

        def on_board(event: str, payload: Any) -> None:
            if event == "presence:update":
                traffic.board_updates += 1

        for _ in range(args.boards):
            board = RawSocketIO(http, node.url, "/board")
            board.on_event = on_board
            await board.connect({"token": token("sup", "supervisor", ttl=24 * 3600)})
            boards.append(board)
        kinds = ("sse", "board", "agent")
        for i in range(args.never_readers):
            agent = f"a{i % max(1, args.agents)}"
            readers.append(await NeverReader.open(kinds[i % 3], node.url, agent))
        connect_s = time.perf_counter() - connect_started
        print(
            f"{len(agents)} agents, {len(boards)} boards, {len(readers)} never-readers; "
            f"all connected in {connect_s:.1f} s; running {args.duration:.0f} s",
            file=sys.stderr,
            flush=True,
        )

        stop = asyncio.Event()
        started = time.monotonic()
        hb_latencies: list[float] = []
        first = await scrape(http, node.url)
        gc_start = await gc_pauses(http, node.url)
        pids = {"node": pid, "driver": os.getpid()}
        if widgets.proc is not None:
            pids["widgets"] = widgets.proc.pid
        cpu_before = {name: sched(p) for name, p in pids.items()}
        samples: list[dict[str, Any]] = []
        warm: dict[str, Any] = {}
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                heartbeats(
                    beats, node.url, tokens, args.device_ttl / 3, stop, traffic, hb_latencies
                )
            )
            tg.create_task(presence_changes(agents, args.change_rate, stop, traffic))
            tg.create_task(watch_never_readers(readers, node_port, started, stop))
            previous = first
            while True:
                next_at = started + (len(samples) + 1) * args.sample_every
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                t = time.monotonic() - started
                row, previous_now = await sample(
                    http, node, node_port, widgets, readers, traffic, t, previous
                )
                previous = previous_now
                samples.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if not warm and t >= args.warmup:
                    warm = {
                        "t_s": t,
                        "row": row,
                        "metrics": previous_now,
                        "gc": await gc_pauses(http, node.url),
                    }
                    # The pacer's hourly check of the frozen objects, now, so that the run's
                    # pauses and lag include it (gateway/ops/gc_pacer.py).
                    node.proc.send_signal(signal.SIGUSR2)
                if node.proc.returncode is not None:
                    print("the node exited", file=sys.stderr)
                    break
                if t >= args.duration - 0.5:
                    break
            stop.set()
        elapsed = time.monotonic() - started
        cpu = cpu_report(pids, cpu_before, elapsed)
        last_metrics = previous
        gc_after = await gc_pauses(http, node.url)
        widget_counts = await widgets.stat()
        # The node's side of each never-reader while the driver still holds them.
        final_table = tcp_table(node_port) if node.proc.returncode is None else {}
    finally:
        await widgets.stop()
        for r in readers:
            r.close()
        for client in [*agents, *boards]:
            await client.close()
        await beats.close()
        await http.close()

    after = [s for s in samples if s["t_s"] >= args.warmup]
    points = [(s["t_s"] / 60, s["rss_mb"]) for s in after]
    line = trend(points)
    mean_rss = statistics.fmean(y for _, y in points) if points else float("nan")
    noise_10_min = NOISE_SHARE_PER_10_MIN * mean_rss
    slope = line["slope_mb_per_min"]
    span_min = points[-1][0] - points[0][0] if points else 0.0
    # Over a minute or two the slope is mostly the allocator settling after the connects.
    growth_ok = None if slope is None or span_min < 3 else slope * 10 <= noise_10_min
    warm_row = warm.get("row", samples[-1] if samples else {})
    connections = warm_row.get("established", 0)
    rss_warm = warm_row.get("rss_mb", float("nan"))
    per_connection_kb = (rss_warm - rss_baseline) * 1024 / max(1, connections)
    dropped = [r for r in readers if r.dropped_at is not None]
    errors_before = labelled(first, "membrane_errors_total")
    errors = {
        code: n - errors_before.get(code, 0.0)
        for code, n in labelled(last_metrics, "membrane_errors_total").items()
        if n - errors_before.get(code, 0.0)
    }
    kept_node_side = Counter(
        final_table[r.port][0] if r.port in final_table else "gone" for r in readers
    )
    lost_widgets = widget_counts.get("lost", 0)
    return {
        "benchmark": "soak",
        "store": "embedded" if args.embedded else "redis",
        "requested": {
            "widgets": args.widgets,
            "agents": args.agents,
            "boards": args.boards,
            "never_readers": args.never_readers,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "change_rate_per_s": args.change_rate,
            "device_ttl_s": args.device_ttl,
        },
        "connected": {
            "widgets": widgets_open,
            "widgets_failed": widgets_failed,
            "agents": len(agents),
            "boards": len(boards),
            "never_readers": dict(Counter(r.kind for r in readers)),
            "connect_s": round(connect_s, 1),
        },
        "ran_s": round(elapsed, 1),
        "node_rss_mb": {
            "before_clients": round(rss_baseline, 1),
            "after_warmup": rss_warm,
            "last": samples[-1]["rss_mb"] if samples else None,
            "peak": round(node.peak_rss_mb(), 1),
        },
        "connections_after_warmup": connections,
        "rss_per_connection_kb": round(per_connection_kb, 2),
        "memory_growth": {
            **line,
            "samples": len(points),
            "span_min": round(span_min, 2),
            "projected_10_min_mb": None if slope is None else round(slope * 10, 2),
            "last_minus_first_mb": round(points[-1][1] - points[0][1], 2) if points else None,
            "noise_10_min_mb": round(noise_10_min, 2),
            "noise_rule": f"slope over 10 min <= {NOISE_SHARE_PER_10_MIN:.0%} of mean RSS",
            "verdict": (
                "too short to judge (under 3 min after the warm-up)"
                if growth_ok is None
                else "growth within noise"
                if growth_ok
                else "grows beyond noise"
            ),
        },
        "event_loop_lag_ms": {
            "after_warmup": lag_report(warm.get("metrics", first), last_metrics),
            "whole_run": lag_report(first, last_metrics),
        },
        "gc_pauses_after_warmup": gc_pause_report(warm.get("gc", gc_start), gc_after),
        "hourly_frozen_check": frozen_check(node.log),
        "never_readers": {
            "total": len(readers),
            "dropped": len(dropped),
            "dropped_by_kind": dict(Counter(r.kind for r in dropped)),
            "kept_by_kind": dict(Counter(r.kind for r in readers if r.dropped_at is None)),
            "drops": sorted(
                (
                    {
                        "kind": r.kind,
                        "after_s": round((r.dropped_at or 0) - r.opened_at, 1),
                        "at_run_s": round((r.dropped_at or 0) - started, 1),
                        "how": r.how,
                    }
                    for r in dropped
                ),
                key=lambda d: d["after_s"],
            ),
            "node_side_at_end": dict(kept_node_side),
            "node_send_queue_kb_at_end": round(
                sum(final_table[r.port][1] for r in readers if r.port in final_table) / 1024, 1
            ),
        },
        "widgets": widget_counts,
        "traffic": {
            "presence_changes": traffic.changes,
            "presence_changes_per_s": round(traffic.changes / elapsed, 2),
            "board_updates_received": traffic.board_updates,
            "heartbeats_ok": traffic.heartbeats_ok,
            "heartbeats_lapsed": traffic.heartbeats_lapsed,
            "heartbeat_errors": traffic.heartbeat_errors,
            "heartbeat_ms": summary_ms(hb_latencies),
            "driver_max_lag_ms": round(traffic.driver_max_lag_s * 1000, 1),
        },
        "errors_by_code": errors,
        "cpu": cpu,
        # Idle work: what each open connection costs the node per minute of keeping it.
        "cpu_per_connection_minute": cpu_per_unit(
            cpu, max(connections, 1) / 60, "connection-minute", ("node",)
        ),
        "samples": samples,
        "targets": {
            "growth_within_noise": growth_ok,
            "no_widget_lost": lost_widgets == 0 and widgets_open == args.widgets,
            "no_heartbeat_lapsed_or_failed": not (
                traffic.heartbeats_lapsed or traffic.heartbeat_errors
            ),
        },
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    limit = raise_fd_limit()  # the node and the widgets' process, started below, inherit it
    if args.widgets + args.agents * 2 + 512 > limit:
        print(f"warning: the open-file limit is {limit}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        work = Path(tmp)
        config = work / "bench.toml"
        config.write_text(demo_site_config(args.agents, device_ttl_s=args.device_ttl))
        async with contextlib.AsyncExitStack() as stack:
            redis_url = ""
            if not args.embedded:
                redis_url = await stack.enter_async_context(redis_server(work))
            node = await start_node(config, redis_url, work, "node")
            stack.push_async_callback(stop_node, node)
            result: dict[str, Any] = {}
            try:
                result = await measure(args, node)
                return result
            finally:
                problems = log_problems([node.log])
                result["node_log_problems"] = problems
                print(json.dumps({"node_log_problems": problems}), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widgets", type=int, default=10_000, help="idle availability streams")
    parser.add_argument("--agents", type=int, default=1_000, help="agents: socket + REST device")
    parser.add_argument("--never-readers", type=int, default=100, help="clients that never read")
    parser.add_argument("--boards", type=int, default=2, help="supervisor boards that do read")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds, after connecting")
    parser.add_argument("--warmup", type=float, help="seconds (default: duration/5, at most 60)")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--change-rate", type=float, default=1.0, help="presence changes a second")
    parser.add_argument("--device-ttl", type=float, default=60.0, help="REST device lease (s)")
    parser.add_argument("--embedded", action="store_true", help="embedded store, not Redis")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(widgets_child(args))
        return
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 5)
    if args.agents < 1:
        parser.error("--agents must be at least 1")
    write_json(
        args.out,
        repeat(
            args.runs,
            lambda: asyncio.run(run(args)),
            worst=lambda r: r["memory_growth"].get("projected_10_min_mb") or 0.0,
            headline=headline,
        ),
    )


FROZEN_CHECK = re.compile(
    r"frozen garbage check: (\d+) of (\d+) frozen objects were garbage \((.*?)\)(.*?); the "
    r"child took (\d+) ms, the fork paused this process ([\d.]+) ms"
)
"""The line a node logs for each frozen-garbage check (gateway/ops/gc_pacer.py)."""


def frozen_check_of(found: re.Match[str]) -> dict[str, Any]:
    """``FROZEN_CHECK``'s match as figures."""
    return {
        "ran": True,
        "garbage": int(found.group(1)),
        "frozen": int(found.group(2)),
        "garbage_types": found.group(3),
        "garbage_frames": found.group(4).removeprefix(", "),
        "child_ms": int(found.group(5)),
        "node_paused_ms": float(found.group(6)),
    }


def frozen_check(log: Path) -> dict[str, Any]:
    """What the node logged of the frozen-garbage check the run asked for (SIGUSR2)."""
    found = FROZEN_CHECK.search(log.read_text(errors="replace"))
    return frozen_check_of(found) if found is not None else {"ran": False}


def headline(result: dict[str, Any]) -> dict[str, Any]:
    lag = result["event_loop_lag_ms"]["after_warmup"]
    cpu = result["cpu_per_connection_minute"]
    return {
        "connections": result["connections_after_warmup"],
        "rss_per_connection_kb": result["rss_per_connection_kb"],
        "projected_growth_10_min_mb": result["memory_growth"].get("projected_10_min_mb"),
        "growth": result["memory_growth"]["verdict"],
        "lag_p99_ms": lag.get("p99_ms"),
        "node_cpu_ms_per_connection_minute": cpu["node_cpu_ms_per_unit"],
        "cpu_cores_by_process": cpu["cpu_cores_by_process"],
        "never_readers_dropped": result["never_readers"]["dropped"],
        "lag_over_100_ms": lag.get("over_100_ms"),
        "gc_pauses_over_100_ms": sum(
            g["over_100_ms"] for g in result["gc_pauses_after_warmup"].values()
        ),
        "hourly_check_paused_ms": result["hourly_frozen_check"].get("node_paused_ms"),
    }


if __name__ == "__main__":
    main()
