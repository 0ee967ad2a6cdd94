"""Scheduled callbacks: thousands of PSTN callbacks due in the same minute, on two nodes.

Two gateway nodes share a private Redis; the Twilio simulator (tests/twilio_sim) runs in
this process and stands in for Twilio's REST API and phones. Every site calls the customer
first (``agent_first = false``), so a callback is dialled at its due time with nobody
clicking. Each site keeps the default callback policy, which a site may only tighten: at
most 500 callbacks an hour per site, 20 per client address an hour, 20 lines (calls in
progress) at once. So the callbacks are spread over several sites, each with its own
caller ID and as many agents as callbacks (agents with mobile numbers, available on a
desktop REST device): at most 400 callbacks a site, and enough sites that the calls in
progress stay under half of each site's 20 lines (a dial finding every line taken waits
2 s). Every visitor opens its own session and asks from one of many loopback addresses
(127.0.x.y, 10 visitors each), which keeps the per-address limits (30 sessions a minute,
20 callbacks an hour) honestly. The simulated visitor answers after 1 s, hears the
greeting, is bridged to the agent's mobile, and hangs up ``--hold-s`` (simulated) after
answering: long enough to always reach the agent, short enough at ``--time-scale`` to free
the line quickly.

All callbacks are requested ahead of time, due spread uniformly over ``--spread-s`` from
``--lead-s`` after set-up (the gateway takes an ``at`` within 60 s as "now"). Visitor
numbers are unique, from the first region of a short list where it is day (outside the
default 21:00-08:00 quiet hours) at every due time: Irish mobiles when possible, else
German, New York, Los Angeles or Honolulu numbers; the run refuses to start if none is.

The dial moment is the simulator's receipt of the REST create (``time.time()`` as its
handler starts). Reports callbacks requested, accepted (201), dialled; lateness (dial minus
due) min/p50/p99/max; numbers dialled more than once; callbacks lost (accepted, not dialled
by due + ``--grace-s``); each node's share of the dials; node peak RSS; how the calls
ended; and the lag of this process's event loop (the simulator's) while dialling.

    .venv/bin/python bench/callbacks.py --out bench/results/callbacks.json

A quick check: ``--callbacks 200 --spread-s 10`` (about 90 s: the due times must be more
than a minute after the requests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # as tests import it

import aiohttp
import phonenumbers
from aiohttp import web
from twilio_sim import TwilioApiError, TwilioSim

from bench.harness import (
    BENCH_ISSUER,
    NodeProcess,
    add_runs_argument,
    cpu_per_unit,
    cpu_report,
    log_problems,
    raise_fd_limit,
    redis_pid,
    redis_server,
    repeat,
    sched,
    start_node,
    stop_node,
    token,
    write_json,
)
from gateway.core.model import CallbackPolicy
from gateway.core.phone_policy import CheckedNumber, PhoneRefused, check_number, in_quiet_hours

ORIGIN = "http://127.0.0.1:8080"
POLICY = CallbackPolicy()  # every site keeps the defaults but for agent_first
PER_SITE_DEFAULT = 400  # under the default per_site_hour of 500
LINE_SHARE = 0.5  # of a site's max_concurrent_calls the expected calls in progress may use
# Simulated seconds before the visitor answers (the simulator's queue time, ring, answer),
# and real seconds the gateway adds to a call's line hold (webhooks, the line's release).
SIM_ANSWER_S = 0.1 + 0.2 + 1.0
LINE_OVERHEAD_S = 0.2
VISITORS_PER_ADDRESS = 10  # under 30 sessions a minute and 20 callbacks an hour per address
# Visitor number ranges: (name, E.164 prefix, digits after it, first suffix tried).
REGIONS = (
    ("IE mobile (+35386)", "+35386", 7, 1_000_000),
    ("DE mobile (+49151)", "+49151", 8, 10_000_000),
    ("US New York (+1212)", "+1212", 7, 2_000_000),
    ("US Los Angeles (+1415)", "+1415", 7, 2_000_000),
    ("US Honolulu (+1808)", "+1808", 7, 2_000_000),
)


class TimedSim(TwilioSim):
    """The simulator, plus the real time at which each REST create reached its handler."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # (time.time() at the handler's start, To, Url, HTTP status answered)
        self.creates: list[tuple[float, str, str, int]] = []

    async def _create_call(self, request: web.Request) -> web.Response:
        received = time.time()
        try:
            response = await super()._create_call(request)
        except TwilioApiError as e:
            status = e.status
            raise
        else:
            status = response.status
            return response
        finally:
            form = await request.post()
            self.creates.append(
                (received, str(form.get("To", "")), str(form.get("Url", "")), status)
            )


@dataclass
class Visitor:
    index: int
    site: str
    node: int
    address: int
    due: float = 0.0
    phone: str = ""
    session_token: str = ""
    sent_at: float = 0.0
    status: int | None = None
    error: str = ""
    state: str = ""
    call_id: str = ""
    status_token: str = ""
    final_state: str = ""
    final_detail: str = ""


@dataclass
class Plan:
    region: str
    numbers: list[str] = field(default_factory=list)


def loopback(i: int) -> str:
    """The i-th client address: 127.0.1.1, 127.0.1.2, ... (all of 127/8 is this host)."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def valid_e164(number: str) -> str:
    parsed = phonenumbers.parse(number, None)
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError(f"{number} is not a valid number")
    return number


def caller_id(site: int) -> str:
    return valid_e164(f"+353120{site:05d}")  # Dublin landlines, one per site


def agent_mobile(k: int) -> str:
    return valid_e164(f"+3538712{k:05d}")  # Irish mobiles, one per agent


def config_text(sites: int, agents_per_site: int, api_base_url: str) -> str:
    hours = ", ".join(
        f'{d} = ["00:00-24:00"]' for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    )
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        "[auth]",
        f'issuer = "{BENCH_ISSUER}"',
        "[presence]",
        "device_ttl_s = 3600",
        "[twilio]",
        f'api_base_url = "{api_base_url}"',
    ]
    for s in range(sites):
        lines += [
            "[[sites]]",
            f'id = "s{s}"',
            f'name = "Site {s}"',
            f'origins = ["{ORIGIN}"]',
            f'caller_ids = ["{caller_id(s)}"]',
            "[sites.callback_policy]",
            "agent_first = false",
            "[[sites.branches]]",
            'id = "main"',
            'name = "Main"',
            'timezone = "UTC"',
            'languages = ["en"]',
            f"hours = {{ {hours} }}",
        ]
        for i in range(agents_per_site):
            lines += [
                "[[sites.agents]]",
                f'id = "a{i}"',
                f'name = "Agent {i}"',
                'branch = "main"',
                'languages = ["en"]',
                f'mobile = "{agent_mobile(s * agents_per_site + i)}"',
            ]
    return "\n".join(lines) + "\n"


def region_numbers(prefix: str, digits: int, first: int, count: int) -> Iterator[CheckedNumber]:
    """Up to ``count`` distinct numbers of a range that the default policy accepts."""
    found = 0
    for suffix in range(first, 10**digits):
        if found == count:
            return
        try:
            number = check_number(f"{prefix}{suffix:0{digits}d}", POLICY)
        except PhoneRefused:
            continue
        found += 1
        yield number


def choose_numbers(dues: list[float], grace_s: float) -> Plan | None:
    """Unique numbers from the first region where each one's due time (and the grace after
    it) is outside quiet hours, or None when it is night in every region of the list."""
    for name, prefix, digits, first in REGIONS:
        numbers = list(region_numbers(prefix, digits, first, len(dues)))
        if len(numbers) < len(dues):
            continue
        if all(
            not in_quiet_hours(n, POLICY, t) and not in_quiet_hours(n, POLICY, t + grace_s)
            for n, t in zip(numbers, dues, strict=True)
        ):
            return Plan(name, [n.e164 for n in numbers])
    return None


def summary(samples: list[float]) -> dict[str, Any]:
    """min/p50/p90/p99/max/mean in milliseconds of samples in seconds (min may be < 0)."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1)

    return {
        "count": len(ordered),
        "min_ms": round(ordered[0] * 1000, 1),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(ordered[-1] * 1000, 1),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 1),
    }


async def gather_limited(concurrency: int, coros: list[Any]) -> None:
    """Run coroutines at most ``concurrency`` at once, started in list order."""
    sem = asyncio.Semaphore(concurrency)

    async def one(coro: Any) -> None:
        async with sem:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def register_agents(
    http: aiohttp.ClientSession, urls: list[str], sites: int, per_site: int, concurrency: int
) -> None:
    """Each agent's desktop device, available (REST; a long device TTL, so no heartbeats)."""

    async def one(site: int, i: int) -> None:
        url = urls[(site * per_site + i) % len(urls)]
        headers = {"Authorization": f"Bearer {token(f'a{i}', 'agent', f's{site}')}"}
        body = {"kind": "desktop", "state": "available"}
        for attempt in range(3):
            async with http.put(
                f"{url}/v1/agents/me/devices/desk", json=body, headers=headers
            ) as r:
                if r.status == 200:
                    return
                text = await r.text()
            if attempt == 2:
                raise RuntimeError(f"device of s{site}/a{i}: {r.status} {text}")
            await asyncio.sleep(0.5)

    await gather_limited(concurrency, [one(s, i) for s in range(sites) for i in range(per_site)])


async def wait_available(
    http: aiohttp.ClientSession, urls: list[str], sites: int, per_site: int
) -> float:
    started = time.perf_counter()
    seen: list[int] = []
    while time.perf_counter() < started + 120:
        seen = []
        for url in urls:
            for s in range(sites):
                async with http.get(f"{url}/v1/sites/s{s}/availability") as r:
                    seen.append((await r.json())["agents_available"])
        if all(n >= per_site for n in seen):
            return time.perf_counter() - started
        await asyncio.sleep(0.5)
    raise RuntimeError(f"agents never all available on every node: {seen}")


METRICS = (
    "membrane_callback_refusals_total",
    "membrane_callbacks_total",
    "membrane_callback_dials_total",
)


async def node_metrics(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The node's callback counters, and the mean handling time of each Twilio webhook."""
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, Any] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        if name in METRICS and float(value):
            out[series.removeprefix("membrane_")] = int(float(value))
        elif name.startswith("membrane_http_request_seconds_") and "twilio" in series:
            route = series.split('route="', 1)[1].split('"', 1)[0]
            if name.endswith("_sum"):
                sums[route] = float(value)
            elif name.endswith("_count"):
                counts[route] = float(value)
    out["twilio_webhook_mean_ms"] = {
        route: round(sums[route] / counts[route] * 1000, 1)
        for route in sorted(counts)
        if counts[route] and route in sums
    }
    return out


class LagMonitor:
    """How late this process's event loop (the simulator's) wakes from a 10 ms sleep, and
    how long its garbage collections take: a stalled loop delays the create handler, which
    would show as lateness that is not the gateway's."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.stalls: list[tuple[float, float]] = []  # (time.time() at the end, seconds)
        self.gc_pauses: list[float] = []
        self._gc_started = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            late = time.perf_counter() - before - 0.01
            self.samples.append(late)
            if late > 0.05:
                self.stalls.append((time.time(), late))

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_started)

    def start(self) -> None:
        gc.callbacks.append(self._gc)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def stalled_before(self, t: float) -> bool:
        """Whether the loop came out of a stall (> 50 ms) within 20 ms of ``t``: a create
        handled then may have waited in the socket for the stall's length."""
        return any(abs(end - t) <= 0.02 for end, _ in self.stalls)


async def measure(
    args: argparse.Namespace, sim: TimedSim, nodes: list[NodeProcess], pids: dict[str, int]
) -> dict[str, Any]:
    urls = [n.url for n in nodes]
    node_by_port = {urlsplit(n.url).port: n.log.stem for n in nodes}
    n = args.callbacks
    sites = args.sites
    addresses = max(1, math.ceil(n / VISITORS_PER_ADDRESS))
    visitors = [Visitor(i, f"s{i % sites}", i % len(urls), i % addresses) for i in range(n)]
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(loopback(a), 0), limit=8))
        for a in range(addresses)
    ]
    lag = LagMonitor()
    try:
        started = time.perf_counter()
        await register_agents(http, urls, sites, args.agents_per_site, args.concurrency)
        available_s = await wait_available(http, urls, sites, args.agents_per_site)
        agents_s = time.perf_counter() - started
        print(
            f"{sites * args.agents_per_site} agents available in {agents_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )

        session_errors: Counter[str] = Counter()

        async def open_session(v: Visitor) -> None:
            async with clients[v.address].post(
                f"{urls[v.node]}/v1/sites/{v.site}/sessions", json={}, headers={"Origin": ORIGIN}
            ) as r:
                if r.status == 201:
                    v.session_token = (await r.json())["token"]
                else:
                    session_errors[f"{r.status} {(await r.text())[:120]}"] += 1

        started = time.perf_counter()
        await gather_limited(args.concurrency, [open_session(v) for v in visitors])
        sessions_s = time.perf_counter() - started

        # Set-up ends here: the due times start lead_s from now.
        window_start = time.time() + args.lead_s
        for v in visitors:
            v.due = window_start + args.spread_s * v.index / n
        plan = choose_numbers([v.due for v in visitors], args.grace_s)
        if plan is None:
            raise SystemExit(night_everywhere(window_start, args))
        for v, number in zip(visitors, plan.numbers, strict=True):
            v.phone = number
            sim.phone(number, answer_after=1, hangup_after=args.hold_s)
        print(
            f"{n} sessions in {sessions_s:.1f} s; numbers: {plan.region}; requesting "
            f"callbacks due from {datetime.fromtimestamp(window_start, UTC):%H:%M:%S} UTC "
            f"over {args.spread_s:.0f} s",
            file=sys.stderr,
            flush=True,
        )

        request_errors: Counter[str] = Counter()
        too_late = 0

        async def request(v: Visitor) -> None:
            nonlocal too_late
            if not v.session_token:
                return
            v.sent_at = time.time()
            if v.due - v.sent_at <= 61:
                too_late += 1  # it would be taken as "now": the requests were too slow
                return
            body = {"phone": v.phone, "at": datetime.fromtimestamp(v.due, UTC).isoformat()}
            headers = {"Origin": ORIGIN, "Authorization": f"Bearer {v.session_token}"}
            async with clients[v.address].post(
                f"{urls[v.node]}/v1/sites/{v.site}/callbacks", json=body, headers=headers
            ) as r:
                v.status = r.status
                data = await r.json(content_type=None)
            if r.status == 201:
                v.call_id = data["call_id"]
                v.status_token = data["status_token"]
                v.state = data["call"]["state"]
            else:
                v.error = str(data.get("error", {}).get("code", data))[:80]
                request_errors[f"{r.status} {v.error}"] += 1

        started = time.perf_counter()
        await gather_limited(args.concurrency, [request(v) for v in visitors])
        requests_s = time.perf_counter() - started
        accepted = [v for v in visitors if v.status == 201]
        requested = sum(1 for v in visitors if v.status is not None)
        min_lead = min((v.due - v.sent_at for v in visitors if v.status is not None), default=0)
        print(
            f"{len(accepted)}/{requested} accepted in {requests_s:.1f} s; waiting "
            f"{window_start - time.time():.0f} s for the first due time",
            file=sys.stderr,
            flush=True,
        )

        # The dialling window: until every accepted callback was dialled and its call
        # ended, or the last due time plus the grace.
        wait_from = window_start - 5
        await asyncio.sleep(max(0.0, wait_from - time.time()))
        lag.start()
        before = {name: sched(pid) for name, pid in pids.items()}
        cpu_started = time.perf_counter()
        wanted = {v.phone for v in accepted}
        deadline = max((v.due for v in accepted), default=window_start) + args.grace_s
        all_dialled_at: float | None = None
        while time.time() < deadline:
            dialled = {to for _, to, _, status in sim.creates if status == 201}
            if wanted <= dialled:
                if all_dialled_at is None:
                    all_dialled_at = time.time()
                legs = [c for c in sim.calls if c.direction == "outbound-api"]
                if all(c.finished for c in legs) or time.time() > all_dialled_at + args.drain_s:
                    break
            await asyncio.sleep(0.25)
        cpu = cpu_report(pids, before, time.perf_counter() - cpu_started)
        await lag.stop()
        await asyncio.sleep(1.0)  # the last webhooks' work in the nodes

        async def final_state(v: Visitor) -> None:
            async with http.get(
                f"{urls[v.node]}/v1/calls/{v.call_id}", params={"token": v.status_token}
            ) as r:
                if r.status != 200:
                    v.final_state = str(r.status)
                    return
                wire = await r.json()
            v.final_state = wire["state"]
            if wire["state"] != "completed" and wire["timeline"]:
                last = wire["timeline"][-1]
                v.final_detail = f"{last['event']}: {last['detail']}"

        await gather_limited(args.concurrency, [final_state(v) for v in accepted])
        metrics = {n.log.stem: await node_metrics(http, n.url) for n in nodes}
    finally:
        await lag.stop()
        await asyncio.gather(*(c.close() for c in clients), http.close())

    due_of = {v.phone: v.due for v in accepted}
    creates_ok = [(t, to, url) for t, to, url, status in sim.creates if status == 201]
    per_number: dict[str, list[float]] = {}
    per_attempt: Counter[str] = Counter()  # the voice URL ends /{call_id}/{attempt}
    per_node: Counter[str] = Counter()
    for t, to, url in creates_ok:
        per_number.setdefault(to, []).append(t)
        per_attempt[urlsplit(url).path.rsplit("/", 2)[-2] + ":" + url.rsplit("/", 1)[-1]] += 1
        per_node[node_by_port.get(urlsplit(url).port, url)] += 1
    lateness = [min(per_number[p]) - due for p, due in due_of.items() if p in per_number]
    lost = [
        p for p, due in due_of.items() if min(per_number.get(p, [math.inf])) > due + args.grace_s
    ]
    twice = {p: len(ts) for p, ts in per_number.items() if len(ts) > 1}
    legs = [c for c in sim.calls if c.direction == "outbound-api"]
    dial_verb_status: Counter[str] = Counter()
    for c in legs:
        dials = [vb for vb in c.verbs if vb.verb == "Dial"]
        if not dials:
            dial_verb_status["no <Dial>"] += 1
        elif "bridged_to" in dials[-1].detail:
            dial_verb_status["bridged to the agent"] += 1
        else:
            dial_verb_status["not bridged"] += 1
    late_after_stall = sum(
        1
        for p, ts in per_number.items()
        if p in due_of and min(ts) - due_of[p] > 0.5 and lag.stalled_before(min(ts))
    )
    late = summary(lateness)
    p99 = late.get("p99_ms", math.inf)
    dialled_count = sum(1 for p in due_of if p in per_number)
    meets = (
        requested == n
        and len(accepted) == requested
        and p99 <= 1000
        and not twice
        and not lost
        and dialled_count == len(accepted)
    )
    return {
        "benchmark": "callbacks",
        "nodes": len(nodes),
        "sites": sites,
        "agents_per_site": args.agents_per_site,
        "client_addresses": addresses,
        "numbers": plan.region,
        "time_scale": args.time_scale,
        "call_hold_sim_s": args.hold_s,
        "spread_s": args.spread_s,
        "lead_s": args.lead_s,
        "setup_s": {
            "agents_available": round(agents_s, 1),
            "all_available_wait": round(available_s, 1),
            "sessions": round(sessions_s, 1),
            "callback_requests": round(requests_s, 1),
        },
        "callbacks_requested": requested,
        "callbacks_not_requested_too_late": too_late,
        "session_errors": dict(session_errors),
        "accepted_201": len(accepted),
        "accepted_states": dict(Counter(v.state for v in accepted)),
        "refused": dict(request_errors),
        "min_lead_at_request_s": round(min_lead, 1),
        "dialled": dialled_count,
        "lateness_ms": late,
        "dialled_early": sum(1 for x in lateness if x < 0),
        "dialled_twice": len(twice),
        "dialled_twice_examples": dict(list(twice.items())[:5]),
        "same_attempt_dialled_twice": sum(1 for k in per_attempt.values() if k > 1),
        "retries_dialled": sum(1 for k in per_attempt if not k.endswith(":1")),
        "lost": len(lost),
        "lost_examples": lost[:5],
        "creates_total": len(sim.creates),
        "creates_refused_by_sim": dict(
            Counter(status for _, _, _, status in sim.creates if status != 201)
        ),
        "dials_per_node": dict(per_node),
        "dial_share_per_node": {
            k: round(v / max(1, len(creates_ok)), 3) for k, v in sorted(per_node.items())
        },
        "visitor_legs_by_status": dict(Counter(c.status for c in legs)),
        "visitor_legs_not_finished": sum(1 for c in legs if not c.finished),
        "visitor_legs_dial_status": dict(dial_verb_status),
        "callbacks_final_state": dict(Counter(v.final_state for v in accepted)),
        "callbacks_not_completed_last_event": dict(
            Counter(v.final_detail for v in accepted if v.final_state != "completed")
        ),
        "line_cap_refusals": sum(
            m.get('callback_refusals_total{code="concurrency_cap"}', 0) for m in metrics.values()
        ),
        "node_metrics": metrics,
        "sim_contract_violations": sim.contract_violations[:5],
        "driver_loop_lag_ms": summary(lag.samples),
        "driver_loop_stalls_over_50ms": len(lag.stalls),
        "driver_gc_pauses_ms": summary(lag.gc_pauses),
        "dials_over_500ms_late_right_after_a_driver_stall": late_after_stall,
        "cpu_while_dialling": cpu,
        # A callback's whole life in the window: the due step, the dial, its webhooks, the end.
        "cpu_per_callback": cpu_per_unit(
            cpu, dialled_count / cpu["elapsed_s"], "callback dialled", NODE_NAMES
        ),
        "target": "p99 <= 1 s late, 0 double, 0 lost",
        "meets_target": meets,
    }


NODE_NAMES = ("node-a", "node-b")


def night_everywhere(window_start: float, args: argparse.Namespace) -> str:
    at = datetime.fromtimestamp(window_start, UTC)
    names = ", ".join(r[0] for r in REGIONS)
    return (
        f"no region of {names} is outside quiet hours "
        f"({POLICY.quiet_hours_start:%H:%M}-{POLICY.quiet_hours_end:%H:%M} local) for the "
        f"whole window from {at:%Y-%m-%d %H:%M:%S} UTC + {args.spread_s:.0f} s; run later"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    # Fail fast when no region is callable in the coming minutes.
    soon = time.time() + args.lead_s + 60
    if choose_numbers([soon, soon + args.spread_s], args.grace_s) is None:
        raise SystemExit(night_everywhere(soon, args))
    raise_fd_limit()
    sim = TimedSim(
        time_scale=args.time_scale,
        account_sid="AC" + secrets.token_hex(16),
        auth_token=secrets.token_hex(16),
    )
    await sim.start()
    os.environ["MEMBRANE_TWILIO_ACCOUNT_SID"] = sim.account_sid
    os.environ["MEMBRANE_TWILIO_AUTH_TOKEN"] = sim.auth_token
    try:
        with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
            work = Path(tmp)
            config = work / "bench.toml"
            config.write_text(config_text(args.sites, args.agents_per_site, sim.base_url))
            async with redis_server(work) as redis_url, contextlib.AsyncExitStack() as stack:
                nodes: list[NodeProcess] = []
                for name in NODE_NAMES:
                    node = await start_node(config, redis_url, work, name)
                    stack.push_async_callback(stop_node, node)
                    nodes.append(node)
                pids = {n.log.stem: n.proc.pid for n in nodes}
                pids["redis"] = await redis_pid(redis_url)
                pids["driver_and_sim"] = os.getpid()
                try:
                    result = await measure(args, sim, nodes, pids)
                finally:
                    peak = {n.log.stem: round(n.peak_rss_mb(), 1) for n in nodes}
                    problems = log_problems([n.log for n in nodes])
                return result | {"peak_rss_mb": peak, "node_log_problems": problems}
    finally:
        await sim.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callbacks", type=int, default=2_000, help="callbacks requested")
    parser.add_argument(
        "--sites",
        type=int,
        help=f"sites sharing them (default: <= {PER_SITE_DEFAULT} a site, lines to spare)",
    )
    parser.add_argument(
        "--agents-per-site", type=int, help="agents with a mobile (default: one per callback)"
    )
    parser.add_argument("--spread-s", type=float, default=60.0, help="due times spread over")
    parser.add_argument(
        "--lead-s",
        type=float,
        help="from set-up's end to the first due time (default 90; 65 for <= 500 callbacks)",
    )
    parser.add_argument("--grace-s", type=float, default=30.0, help="a dial later is lost")
    parser.add_argument("--time-scale", type=float, default=0.02, help="simulator time scale")
    parser.add_argument(
        "--hold-s",
        type=float,
        default=30.0,
        help="simulated seconds a visitor stays on the line (past the bridge to the agent)",
    )
    parser.add_argument("--drain-s", type=float, default=20.0, help="max wait for calls to end")
    parser.add_argument("--concurrency", type=int, default=32, help="set-up requests at once")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    add_runs_argument(parser)
    args = parser.parse_args()
    if args.sites is None:
        line_hold_s = (SIM_ANSWER_S + args.hold_s) * args.time_scale + LINE_OVERHEAD_S
        in_progress = args.callbacks / max(args.spread_s, 1.0) * line_hold_s
        args.sites = max(
            math.ceil(args.callbacks / PER_SITE_DEFAULT),
            math.ceil(in_progress / (POLICY.max_concurrent_calls * LINE_SHARE)),
        )
    if args.agents_per_site is None:
        args.agents_per_site = math.ceil(args.callbacks / args.sites)
    if args.lead_s is None:
        args.lead_s = 90.0 if args.callbacks > 500 else 65.0
    if math.ceil(args.callbacks / args.sites) > POLICY.per_site_hour:
        parser.error(f"more than {POLICY.per_site_hour} callbacks a site: use more --sites")
    write_json(
        args.out,
        repeat(
            args.runs,
            lambda: asyncio.run(run(args)),
            worst=lambda r: r["lateness_ms"].get("p99_ms", math.inf),
            headline=headline,
        ),
    )


def headline(result: dict[str, Any]) -> dict[str, Any]:
    late, cpu = result["lateness_ms"], result["cpu_per_callback"]
    return {
        "dialled": result["dialled"],
        "lateness_p50_ms": late.get("p50_ms"),
        "lateness_p99_ms": late.get("p99_ms"),
        "dialled_twice": result["dialled_twice"],
        "lost": result["lost"],
        "node_cpu_ms_per_callback": cpu["node_cpu_ms_per_unit"],
        "cpu_cores_by_process": cpu["cpu_cores_by_process"],
        "saturated": cpu["saturated"],
    }


if __name__ == "__main__":
    main()
