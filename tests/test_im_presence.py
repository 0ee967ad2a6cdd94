"""The IM presence webhook (``POST /v1/sites/{site}/presence/im``): a signed update sets the
agent's ``im`` device on every node; forged, stale, replayed, foreign and malformed requests
are refused with their code, counted, and change nothing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Node, NodeFactory, SocketClient, make_settings, mint, replace
from test_openapi import Contract

from gateway.core.model import DeviceKind, Role
from gateway.edge.http import appkeys as keys
from gateway.settings import ConfigError, Settings, load_settings
from gateway.wire.im_presence import SIGNATURE_HEADER, TIMESTAMP_HEADER, signed_headers

DOC = Path(__file__).resolve().parent.parent / "docs" / "AGENT_PRESENCE.md"
SECRET = "im-presence-test-secret-0123456789abcdef"
OTHER_SECRET = "another-site-secret-0123456789abcdef-xyz"
ROUTE = "/v1/sites/{site}/presence/im"


def im_settings(tmp_path: Path, redis_url: str = "", **changes: Any) -> Settings:
    """The test settings with a webhook secret on ``acme`` and a second site ``globex``
    (its own secret, its own agent) to post to with the wrong one."""
    settings = make_settings(tmp_path, redis_url=redis_url, **changes)
    acme = replace(settings.sites["acme"], presence_webhook_secret=SECRET)
    globex = replace(
        acme,
        site_id="globex",
        name="Globex",
        agents={"gus": replace(acme.agents["anna"], agent_id="gus", site="globex")},
        presence_webhook_secret=OTHER_SECRET,
    )
    return replace(settings, sites={"acme": acme, "globex": globex})


def update(agent_id: str, state: str, event_id: str | None = None) -> dict[str, str]:
    return {"agent_id": agent_id, "state": state, "event_id": event_id or uuid.uuid4().hex}


async def post(
    http: aiohttp.ClientSession,
    node: Node,
    payload: Any,
    site: str = "acme",
    secret: str = SECRET,
    at: float | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    raw = json.dumps(payload).encode() if body is None else body
    signed = signed_headers(secret, int(time.time() if at is None else at), raw)
    return await http.post(
        f"{node.url}/v1/sites/{site}/presence/im",
        data=raw,
        headers=signed if headers is None else headers,
    )


async def code_of(r: aiohttp.ClientResponse) -> tuple[int, str]:
    return r.status, (await r.json())["error"]["code"]


def im_device(presence: dict[str, Any]) -> dict[str, Any] | None:
    return next((d for d in presence["devices"] if d["device_id"] == "im"), None)


def board_shows(agent: str, status: str, im_state: str | None) -> Callable[[Any], bool]:
    def matches(p: Any) -> bool:
        device = im_device(p)
        state = device["state"] if device else None
        return bool(p["agent_id"] == agent and p["status"] == status and state == im_state)

    return matches


async def test_im_presence_reaches_the_board_on_every_node(
    nodes: NodeFactory,
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    settings = im_settings(tmp_path, redis_url)
    a = await nodes(replace(settings, node_id="node-a"))
    b = await nodes(replace(settings, node_id="node-b"))
    boards = []
    for node in (a, b):
        board = clients()
        await board.connect(node.url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
        boards.append(board)
    contract = Contract(await (await http.get(f"{a.url}/v1/openapi.json")).json())

    r = await post(http, a, update("anna", "away"))
    answer = await contract.check(r, "post", ROUTE)
    assert r.status == 200 and answer["results"][0]["outcome"] == "applied"
    assert answer["results"][0]["status"] == "away"
    for board in boards:
        seen = await board.next("presence:update", board_shows("anna", "away", "away"))
        device = im_device(seen)
        assert device is not None and device["kind"] == DeviceKind.IM
    # The lease is presence.im_ttl_s (12 h), not the 60 s of a REST device.
    record = await a.app[keys.STORE].get_presence("acme", "anna")
    (im,) = record.devices
    assert im.expires_at - im.last_seen == settings.presence.im_ttl_s == 12 * 3600

    # Posted to the other node, in a batch with another agent.
    batch = {"updates": [update("anna", "available"), update("ben", "dnd")]}
    r = await post(http, b, batch)
    answer = await contract.check(r, "post", ROUTE)
    assert [x["status"] for x in answer["results"]] == ["available", "dnd"]
    for board in boards:
        await board.next("presence:update", board_shows("anna", "available", "available"))
        await board.next("presence:update", board_shows("ben", "dnd", "dnd"))

    # offline removes the device: no device left, so the agent is offline everywhere.
    r = await post(http, a, update("anna", "offline"))
    assert r.status == 200 and (await r.json())["results"][0]["status"] == "offline"
    for board in boards:
        await board.next("presence:update", board_shows("anna", "offline", None))
    assert (await a.app[keys.STORE].get_presence("acme", "anna")).devices == ()


async def test_a_replay_is_refused_on_every_node(
    nodes: NodeFactory, redis_url: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = im_settings(tmp_path, redis_url)
    a = await nodes(replace(settings, node_id="node-a"))
    b = await nodes(replace(settings, node_id="node-b"))
    contract = Contract(await (await http.get(f"{a.url}/v1/openapi.json")).json())
    body = json.dumps(update("anna", "away", "evt-1")).encode()
    headers = signed_headers(SECRET, int(time.time()), body)
    url = "/v1/sites/acme/presence/im"
    assert (await http.post(f"{a.url}{url}", data=body, headers=headers)).status == 200
    # The same request again, to the other node: its signature was seen.
    r = await http.post(f"{b.url}{url}", data=body, headers=headers)
    await contract.check(r, "post", ROUTE)
    assert await code_of(r) == (409, "replayed_webhook")
    # Signed anew (another second) with the same event id, and a different state: still a
    # replay, and the agent stays away.
    r = await post(http, b, update("anna", "available", "evt-1"), at=time.time() + 1)
    assert await code_of(r) == (409, "replayed_webhook")
    assert b.app[keys.PRESENCE].cached("acme", "anna").status == "away"
    metrics = await (await http.get(f"{b.url}/metrics")).text()
    assert 'membrane_errors_total{code="replayed_webhook"} 2.0' in metrics
    # A batch whose event ids were partly seen: the new one is applied, the old one skipped.
    r = await post(http, a, {"updates": [update("anna", "dnd", "evt-1"), update("ben", "away")]})
    answer = await contract.check(r, "post", ROUTE)
    assert [x["outcome"] for x in answer["results"]] == ["duplicate", "applied"]
    assert answer["results"][0]["status"] == "away"


@pytest.fixture(params=["embedded", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url")) if request.param == "redis" else ""


def refusals() -> list[tuple[str, dict[str, Any], tuple[int, str]]]:
    now = time.time()
    good = json.dumps(update("anna", "away")).encode()
    return [
        ("no signature", {"headers": {}}, (403, "invalid_signature")),
        (
            "forged signature",
            {"headers": {TIMESTAMP_HEADER: str(int(now)), SIGNATURE_HEADER: "v1=" + "0" * 64}},
            (403, "invalid_signature"),
        ),
        ("another site's secret", {"secret": OTHER_SECRET}, (403, "invalid_signature")),
        (
            "timestamp not signed",
            {"headers": {**signed_headers(SECRET, int(now), good), TIMESTAMP_HEADER: "1"}},
            (403, "invalid_signature"),
        ),
        ("body not signed", {"body": good + b" "}, (403, "invalid_signature")),
        # Well past the 300 s either way: signed when the request is made, on a busy machine.
        ("stale", {"skew": -330}, (403, "stale_webhook")),
        ("from the future", {"skew": 330}, (403, "stale_webhook")),
        ("site without a secret", {"site": "nope"}, (404, "not_found")),
        ("unknown agent", {"payload": update("zed", "away")}, (422, "unknown_agent")),
        (
            "unknown agent in a batch",
            {"payload": {"updates": [update("anna", "away"), update("gus", "away")]}},
            (422, "unknown_agent"),
        ),
        ("bad JSON", {"body": b'{"agent_id": "anna",'}, (400, "invalid_payload")),
        ("not an object", {"payload": ["anna"]}, (400, "invalid_payload")),
        ("busy is no IM state", {"payload": update("anna", "busy")}, (400, "invalid_payload")),
        (
            "agent id of the wrong type",
            {"payload": {"agent_id": 7, "state": "away", "event_id": "e"}},
            (400, "invalid_payload"),
        ),
        (
            "no event id",
            {"payload": {"agent_id": "anna", "state": "away"}},
            (400, "invalid_payload"),
        ),
        ("empty batch", {"payload": {"updates": []}}, (400, "invalid_payload")),
        (
            "one event id twice",
            {"payload": {"updates": [update("anna", "away", "x"), update("ben", "away", "x")]}},
            (400, "invalid_payload"),
        ),
    ]


async def test_refusals_change_nothing(
    nodes: NodeFactory, store_url: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    node = await nodes(im_settings(tmp_path, store_url))
    contract = Contract(await (await http.get(f"{node.url}/v1/openapi.json")).json())
    counts: dict[str, int] = {}
    for name, how, expected in refusals():
        args = dict(how)
        payload = args.pop("payload", update("anna", "away"))
        if "skew" in args:
            args["at"] = time.time() + args.pop("skew")
        if name == "body not signed":
            signed = signed_headers(SECRET, int(time.time()), args["body"][:-1])
            args["headers"] = signed
        r = await post(http, node, payload, **args)
        assert await code_of(r) == expected, name
        await contract.check(r, "post", ROUTE)
        counts[expected[1]] = counts.get(expected[1], 0) + 1
    for agent in ("anna", "ben"):
        assert (await node.app[keys.STORE].get_presence("acme", agent)).devices == ()
    metrics = await (await http.get(f"{node.url}/metrics")).text()
    for code, count in counts.items():
        assert f'membrane_errors_total{{code="{code}"}} {float(count)}' in metrics
    # None of the refused requests used its event id up: the same update, signed, applies.
    body = json.dumps(update("anna", "away", "e")).encode()
    headers = signed_headers(SECRET, int(time.time()), body)
    r = await post(http, node, None, body=body, headers=headers)
    assert r.status == 200
    # Once: the same request again is a replay, on this store too.
    r = await post(http, node, None, body=body, headers=headers)
    assert await code_of(r) == (409, "replayed_webhook")


async def test_a_site_is_rate_limited(
    nodes: NodeFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = im_settings(tmp_path)
    node = await nodes(
        replace(
            settings, presence=replace(settings.presence, im_webhook_rate=0.01, im_webhook_burst=2)
        )
    )
    for _ in range(2):
        assert (await post(http, node, update("anna", "away"))).status == 200
    assert await code_of(await post(http, node, update("anna", "away"))) == (429, "rate_limited")
    # Per site: the other site's integration is not held up.
    r = await post(http, node, update("gus", "away"), site="globex", secret=OTHER_SECRET)
    assert r.status == 200


def test_the_secret_comes_from_the_file_or_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "membrane.toml"
    config.write_text(
        '[auth]\nsecret = "' + "s" * 32 + '"\n[[sites]]\nid = "acme-eu"\n'
        'presence_webhook_secret = "' + "f" * 32 + '"\n'
    )
    assert load_settings(config, env={}).sites["acme-eu"].presence_webhook_secret == "f" * 32
    env = {"MEMBRANE_SITE_ACME_EU_PRESENCE_WEBHOOK_SECRET": "e" * 40}
    assert load_settings(config, env=env).sites["acme-eu"].presence_webhook_secret == "e" * 40
    with pytest.raises(ConfigError, match="presence_webhook_secret"):
        load_settings(config, env={"MEMBRANE_SITE_ACME_EU_PRESENCE_WEBHOOK_SECRET": "short"})
    config.write_text('[[sites]]\nid = "acme"\npresence_webhook_secret = "short"\n')
    with pytest.raises(ConfigError, match=r"sites\[0\]\.presence_webhook_secret"):
        load_settings(config, env={})
    # The secret is never printed with the site.
    config.write_text('[[sites]]\nid = "acme"\npresence_webhook_secret = "' + "f" * 32 + '"\n')
    assert "f" * 32 not in repr(load_settings(config, env={}).sites)


def doc_block(language: str, containing: str) -> str:
    """The code block of docs/AGENT_PRESENCE.md in ``language`` that contains ``containing``."""
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)
    return next(block for block in blocks if containing in block)


async def test_the_documented_examples_work(nodes: NodeFactory, tmp_path: Path) -> None:
    node = await nodes(im_settings(tmp_path))
    namespace: dict[str, Any] = {}
    exec(doc_block("python", "def post_presence"), namespace)
    answer = await asyncio.to_thread(
        namespace["post_presence"], node.url, "acme", SECRET, "anna", "dnd"
    )
    assert answer["results"][0]["outcome"] == "applied"
    assert node.app[keys.PRESENCE].cached("acme", "anna").status == "dnd"

    env = {
        "PATH": os.environ["PATH"],
        "MEMBRANE_URL": node.url,
        "MEMBRANE_SITE_ACME_PRESENCE_WEBHOOK_SECRET": SECRET,
    }
    shell = await asyncio.create_subprocess_exec(
        "bash", "-euc", doc_block("sh", "openssl dgst"), env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(shell.communicate(), 30)
    assert shell.returncode == 0
    # The one im device, replaced: dnd becomes away.
    assert json.loads(out)["results"][0]["status"] == "away"
    (im,) = node.app[keys.PRESENCE].cached("acme", "anna").devices
    assert im.device_id == "im" and im.state == "away"
