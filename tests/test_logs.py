"""Structured logs (issue 16): JSON lines with the node on every line and the call's id and
site on every line about a call, across two nodes that share a call; text for a terminal;
and what no line may hold (a customer's number, a token, a session description) masked
wherever it appears. (tests/log_scan.py scans the logs of the whole test run for them.)"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from conftest import SocketClient, make_settings, mint, node_process
from test_drain import config, new_session, state_is

from gateway.ops.log_context import tag_call, untagged
from gateway.ops.logs import CallFields, LogFormat, formatter


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_every_line_about_a_call_names_it_on_both_of_its_nodes(
    tmp_path: Path,
    redis_url: str,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """A visitor on node A reaches an agent on node B, who hangs up on B. Each node's
    log is JSON, one object a line; the call's end is logged once, with its id and site; no
    line that names the call lacks its tag, and no line about nothing carries a stale one."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    env = {"MEMBRANE_LOG_FORMAT": "json", "MEMBRANE_ACCESS_LOG": "all"}
    async with (
        node_process(
            tmp_path, settings, redis_url, config(), "a", {**env, "MEMBRANE_NODE_ID": "a"}
        ) as (a_url, _),
        node_process(
            tmp_path, settings, redis_url, config(), "b", {**env, "MEMBRANE_NODE_ID": "b"}
        ) as (b_url, _),
    ):
        agent = clients()
        await agent.connect(b_url, "/agent", {"token": mint(settings, "carla")})
        session = await new_session(http, a_url)
        visitor = clients()
        await visitor.connect(a_url, "/visitor", {"token": session["token"]})
        call_id = (await visitor.call("call:start", {}, "/visitor"))["call"]["call_id"]
        ring = await agent.next("call:ring")
        await agent.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
        await visitor.next("call:update", state_is("connected"))
        await agent.call("call:hangup", {"call_id": call_id}, "/agent")
        await visitor.next("call:update", state_is("completed"))
        # A request about nothing, after the call, on a connection that served it.
        async with http.get(f"{a_url}/healthz") as r:
            assert r.status == 200
        await visitor.close()
        await agent.close()
    lines = {name: records(tmp_path / f"{name}.log") for name in ("a", "b")}
    for name, found in lines.items():
        assert found and {r["node"] for r in found} == {name}
        assert all({"time", "level", "logger", "message"} <= set(r) for r in found)
    every = lines["a"] + lines["b"]
    ended = [r for r in every if r["message"].startswith(f"call {call_id} ended")]
    assert len(ended) == 1, ended
    assert ended[0]["call_id"] == call_id and ended[0]["site"] == "acme"
    assert "completed" in ended[0]["message"] and "agent carla" in ended[0]["message"]
    naming = [r for r in every if call_id in r["message"]]
    assert naming and all(r.get("call_id") == call_id for r in naming), naming
    health = [r for r in lines["a"] if "GET /healthz" in r["message"]]
    assert health and all("call_id" not in r for r in health), health


def format_line(log_format: LogFormat, message: str, *args: object) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(CallFields("n1"))
    logger = logging.getLogger(f"test_logs.{log_format}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning(message, *args)
    finally:
        logger.removeHandler(handler)
    return out.getvalue().strip()


SECRETS = (
    "+353861110001",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm5hIiwic2l0ZSI6ImFjbWUifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ",
    "v=0\r\no=- 4611 2 IN IP4 10.0.0.7\r\na=ice-pwd:s3cr3tpassw0rd\r\na=fingerprint:sha-256 AB",
)


def test_numbers_tokens_and_session_descriptions_are_masked_in_json_and_text() -> None:
    with untagged():
        tag_call("c_1", "acme")
        for log_format in LogFormat:
            for secret in SECRETS:
                line = format_line(log_format, "dialing %s for %r", secret, {"sdp": SECRETS[2]})
                assert secret not in line and "s3cr3tpassw0rd" not in line, line
                assert "10.0.0.7" not in line and "c2lnbmF0dXJl" not in line, line
                if log_format is LogFormat.JSON:
                    record = json.loads(line)  # still one JSON object
                    assert (record["call_id"], record["site"], record["node"]) == (
                        "c_1",
                        "acme",
                        "n1",
                    )
                else:
                    assert line.endswith("[call c_1 site acme]")
    assert "+353 *******01" in format_line(LogFormat.JSON, "to %s", SECRETS[0])
