"""Fuzzing from outside, as a stranger would: the REST API generated from its own OpenAPI
document by schemathesis (with no token and with each kind of token), and hypothesis-made
socket.io and engine.io packets on every namespace. No 5xx, no answer the document does not
declare, no traceback in the node's log, and no other visitor's call touched."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import requests
import schemathesis
from conftest import (
    TEST_SECRET,
    Node,
    NodeFactory,
    RedisServer,
    SocketClient,
    free_port,
    make_settings,
    mint,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.core.model import Role
from gateway.edge.http import appkeys as keys
from gateway.wire import openapi

ORIGIN = "http://127.0.0.1:8080"
ISSUER = "membrane-test"
EXAMPLES = int(os.environ.get("MEMBRANE_FUZZ_EXAMPLES", "10"))
# No "explain" phase: it replays a failure many times over real connections, for a report the
# shrunk example already gives.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]

# ---------------------------------------------------------------------------------------------
# REST: schemathesis over the document every node serves


@dataclass
class NodeProcess:
    url: str
    log: Path
    tokens: dict[str, str]


def _start(tmp: Path, redis_url: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``membrane serve`` with the demo config, as an operator runs it."""
    port = free_port()
    log = tmp / "node.log"
    env = {
        **os.environ,
        "MEMBRANE_JWT_SECRET": TEST_SECRET,
        "MEMBRANE_JWT_ISSUER": ISSUER,
        "MEMBRANE_DRAIN_GRACE_S": "2",  # its SIGTERM at the end drains: nobody to wait for
    }
    args = [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
    args += ["--data-dir", str(tmp / "data")]
    if redis_url:
        args += ["--redis-url", redis_url]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"node exited: {log.read_text()}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url, log
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"node not ready: {log.read_text()}")
        time.sleep(0.05)  # waiting for a child process to listen, not for an event


def _tokens(url: str, tmp: Path) -> dict[str, str]:
    settings = make_settings(tmp)  # the node's secret and issuer
    r = requests.post(
        f"{url}/v1/sites/acme/sessions", json={}, headers={"Origin": ORIGIN}, timeout=5
    )
    assert r.status_code == 201, r.text
    now = int(time.time())
    forged = jwt.encode(
        {
            "sub": "anna",
            "site": "acme",
            "role": "supervisor",
            "iss": ISSUER,
            "aud": "membrane",
            "iat": now,
            "exp": now + 600,
        },
        "not-the-secret-0123456789-abcdefghijklmnopqrstuvwxyz",
        algorithm="HS256",
    )
    return {
        "none": "",
        "visitor": r.json()["token"],
        "agent": mint(settings, "anna"),
        "supervisor": mint(settings, "sam", Role.SUPERVISOR),
        "forged": forged,
    }


@pytest.fixture(scope="module", params=["embedded", "redis"])
def node_process(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[NodeProcess]:
    redis_url = ""
    if request.param == "redis":
        redis_server.flush()
        redis_url = redis_server.url
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    proc, url, log = _start(tmp, redis_url)
    try:
        yield NodeProcess(url, log, _tokens(url, tmp))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the node did not stop on SIGTERM") from None
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-4000:]


schema = schemathesis.openapi.from_dict(openapi.document("http://127.0.0.1:8080"))


@pytest.mark.parametrize("token", ["none", "visitor", "agent", "supervisor", "forged"])
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_rest_api_answers_every_request_as_its_document_says(
    case: Any, node_process: NodeProcess, token: str
) -> None:
    headers = {"Origin": ORIGIN}
    if node_process.tokens[token]:
        headers["Authorization"] = f"Bearer {node_process.tokens[token]}"
    response = case.call(base_url=node_process.url, headers=headers, timeout=10)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    case.validate_response(response)


# ---------------------------------------------------------------------------------------------
# socket.io: hypothesis-made packets on every namespace, with a victim's call beside them

EVENTS = {
    "/agent": ["presence:set", "call:accept", "call:decline", "call:hangup", "rtc:signal"],
    "/visitor": ["call:start", "call:cancel", "rtc:signal"],
    "/board": ["board:snapshot"],
}
RESERVED = ["connect", "disconnect", "error", "connect_error", "message", "", "__proto__"]
KEYS = [
    "call_id",
    "state",
    "description",
    "candidate",
    "language",
    "branch",
    "page",
    "skills",
    "priority",
    "type",
    "sdp",
    "reason",
    "token",
    "visitor_id",
]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)


def payloads(victim_ids: list[str]) -> st.SearchStrategy[Any]:
    leaf = st.one_of(json_leaf, st.sampled_from(victim_ids))
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(
                st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5
            ),
        ),
        max_leaves=12,
    )


def frames(namespace: str, victim_ids: list[str]) -> st.SearchStrategy[str | bytes]:
    """One websocket frame: a socket.io event (known, reserved or made-up name, with or
    without an ack id), another socket.io or engine.io packet type, or plain garbage."""
    ns = "" if namespace == "/" else f"{namespace},"
    event = st.one_of(st.sampled_from(EVENTS[namespace] + RESERVED), st.text(max_size=12))
    ack = st.one_of(st.just(""), st.integers(0, 2**40).map(str))
    args = st.lists(payloads(victim_ids), max_size=3)
    event_packet = st.builds(
        lambda kind, a, name, rest: f"4{kind}{ns}{a}{json.dumps([name, *rest])}",
        st.sampled_from(["2", "2", "2", "3", "5", "6"]),
        ack,
        event,
        args,
    )
    other_packet = st.builds(
        lambda prefix, body: prefix + body,
        st.sampled_from(
            [
                "0",
                "1",
                "2",
                "3",
                "4",
                "40",
                "41",
                "44",
                "45",
                "46",
                "47",
                "5",
                "6",
                f"40{ns}",
                f"41{ns}",
                f"42{ns}",
                f"43{ns}",
                f"45{ns}1-",
            ]
        ),
        st.one_of(st.text(max_size=40), payloads(victim_ids).map(json.dumps)),
    )
    nested = st.integers(1, 3000).map(lambda n: f"42{ns}" + "[" * n + "]" * n)
    return st.one_of(event_packet, event_packet, other_packet, nested, st.binary(max_size=64))


@dataclass
class Raw:
    """An engine.io websocket connection written by hand."""

    ws: aiohttp.ClientWebSocketResponse

    async def frame(self, timeout: float = 5.0) -> str | None:
        """The next text frame; None once the server closed the connection."""
        while True:
            msg = await self.ws.receive(timeout)
            if msg.type == aiohttp.WSMsgType.TEXT:
                text: str = msg.data
                if text == "2":  # engine.io ping: stay alive
                    await self.ws.send_str("3")
                    continue
                return text
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            ):
                return None


async def raw_connect(http: aiohttp.ClientSession, node: Node, namespace: str, token: str) -> Raw:
    url = f"{node.url}/socket.io/?EIO=4&transport=websocket"
    raw = Raw(await http.ws_connect(url, headers={"Origin": ORIGIN}))
    opened = await raw.frame()
    assert opened is not None and opened.startswith("0{")
    await raw.ws.send_str(f"40{namespace},{json.dumps({'token': token})}")
    while True:  # the site's broadcasts may come before the CONNECT answer, as clients allow
        joined = await raw.frame()
        assert joined is not None and not joined.startswith(f"44{namespace},"), joined
        if joined.startswith(f"40{namespace},"):
            return raw


@pytest.fixture
async def victim(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    clients: Callable[[], SocketClient],
    http: aiohttp.ClientSession,
) -> dict[str, Any]:
    """A node, and on it a visitor in a connected call with Ben."""
    node = await nodes(make_settings(tmp_path, redis_url=redis_url))
    ben = clients()
    await ben.connect(node.url, "/agent", {"token": mint(node.settings, "ben")})
    await ben.next("presence:update", lambda p: p["agent_id"] == "ben")
    r = await http.post(
        f"{node.url}/v1/sites/acme/sessions", json={"language": "de"}, headers={"Origin": ORIGIN}
    )
    session = await r.json()
    v = clients()
    await v.connect(node.url, "/visitor", {"token": session["token"]})
    started = await v.call("call:start", {"language": "de"}, "/visitor")
    call_id = started["call"]["call_id"]
    ring = await ben.next("call:ring")
    assert ring["call_id"] == call_id
    accepted = await ben.call("call:accept", {"call_id": call_id}, "/agent")
    assert accepted["call"]["state"] == "connected", accepted
    for party in (ben, v):  # what the setup told them; from here on they must hear nothing
        await party.next("call:update", lambda c: c["state"] == "connected")
        party.queues.clear()
    attacker = await http.post(
        f"{node.url}/v1/sites/acme/sessions", json={}, headers={"Origin": ORIGIN}
    )
    tokens = {
        "/agent": mint(node.settings, "anna"),
        "/board": mint(node.settings, "sam", Role.SUPERVISOR),
        "/visitor": (await attacker.json())["token"],
    }
    return {
        "node": node,
        "call_id": call_id,
        "visitor_id": session["visitor_id"],
        "ben": ben,
        "visitor": v,
        "tokens": tokens,
    }


@pytest.mark.parametrize("namespace", ["/agent", "/visitor", "/board"])
@settings(
    max_examples=EXAMPLES * 4,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=PHASES,
)
@given(data=st.data())
async def test_made_up_packets_change_nothing_but_the_senders_own_state(
    namespace: str,
    victim: dict[str, Any],
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    data: st.DataObject,
) -> None:
    node: Node = victim["node"]
    ids = [victim["call_id"], victim["visitor_id"], "ben", "anna", "acme"]
    batch = data.draw(st.lists(frames(namespace, ids), min_size=1, max_size=4))
    caplog.set_level(logging.INFO)
    caplog.clear()
    raw = await raw_connect(http, node, namespace, victim["tokens"][namespace])
    for frame in batch:
        if raw.ws.closed:
            break
        if isinstance(frame, bytes):
            await raw.ws.send_bytes(frame)
        else:
            await raw.ws.send_str(frame)
    # Whatever the frames did, the connection either still answers or was closed by the node.
    await raw.ws.close()

    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) <= len(batch), [r.getMessage() for r in loud]
    # The victim's call and its parties are untouched.
    call = await node.app[keys.CALLS].get(victim["call_id"])
    assert call.state.value == "connected" and call.agent_id == "ben", call
    for party in ("ben", "visitor"):
        client: SocketClient = victim[party]
        for event in ("call:update", "call:ring_stop", "rtc:signal", "error"):
            assert client.queue(event).empty(), (party, event, client.queue(event).get_nowait())
    async with http.get(f"{node.url}/healthz") as r:
        assert r.status == 200
