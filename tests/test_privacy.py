"""Customers' phone numbers are shown in full only to the agent who calls or talks to them:
masked on the supervisors' board, to an agent the call has left, and in every log line; a
ticket's status token never reaches a log line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import test_callbacks
from conftest import Node, NodeFactory, SocketClient, mint
from test_callbacks import VISITOR_PHONE, agent, phone_node, phone_settings, request_callback
from twilio_sim import TwilioSim

from gateway.core.model import Role
from gateway.core.privacy import mask_phone, mask_phones_in
from gateway.ops.log_privacy import PrivateFormatter, mask_line

sim = test_callbacks.sim  # the fixture: a Twilio simulator


def test_a_number_keeps_its_country_and_last_two_digits() -> None:
    assert mask_phone("+353861110001") == "+353 *******01"
    assert mask_phone("+15005550006") == "+1 ********06"
    assert mask_phone("+4915112345678") == "+49 *********78"
    assert mask_phones_in("from +353861110001 to +4915112345678.") == (
        "from +353 *******01 to +49 *********78."
    )
    # Not numbers: ids, counts, timestamps, a plus sign before a short figure.
    for text in ("c_35386111000123", "+1 2", "1796397045.3265538", "a+b"):
        assert mask_phones_in(text) == text


def test_a_log_line_has_neither_numbers_nor_status_tokens() -> None:
    line = (
        '127.0.0.1 "GET /v1/calls/c_1/stream?token=kV9rQ2mX-w7_sZp HTTP/1.1" 200; '
        '"DELETE /v1/calls/c_1?lang=de&token=abc HTTP/1.1"'
    )
    assert mask_line(line) == (
        '127.0.0.1 "GET /v1/calls/c_1/stream?token=*** HTTP/1.1" 200; '
        '"DELETE /v1/calls/c_1?lang=de&token=*** HTTP/1.1"'
    )
    formatter = PrivateFormatter("%(levelname)s %(message)s")
    try:
        raise RuntimeError("The 'To' number +353861110001 is not reachable")
    except RuntimeError:
        record = logging.LogRecord(
            "gateway", logging.WARNING, __file__, 1, "dial to %s failed", ("+353861110001",),
            exc_info=sys.exc_info(),
        )  # fmt: skip
    text = formatter.format(record)
    assert "+353861110001" not in text and text.count("+353 *******01") >= 2, text


@pytest.fixture
async def node(nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, redis_url: str) -> Node:
    return await phone_node(nodes, phone_settings(tmp_path, sim, redis_url))


async def test_the_board_sees_a_callbacks_number_masked_and_its_agent_in_full(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    board = clients()
    sam = mint(node.settings, "sam", Role.SUPERVISOR)
    await board.connect(node.url, "/board", {"token": sam})
    anna = await agent(clients, node, "anna")
    status, created = await request_callback(http, node, {"phone": VISITOR_PHONE})
    assert status == 201, created
    ring = await anna.next("call:ring", lambda r: r["call_id"] == created["call_id"])
    assert ring["visitor"]["phone"] == VISITOR_PHONE, "the agent who will call sees it"
    ringing = await anna.next(
        "call:update", lambda c: c["call_id"] == created["call_id"] and c["state"] == "ringing"
    )
    assert ringing["phone"] == VISITOR_PHONE
    seen = await board.next(
        "call:update", lambda c: c["call_id"] == created["call_id"] and c["state"] == "ringing"
    )
    assert seen["phone"] == "+353 *******01"

    # Anna declines: the call has left her, and what she is told of it is masked too.
    declined = await anna.call("call:decline", {"call_id": created["call_id"]}, "/agent")
    assert declined["call"]["agent_id"] is None
    assert declined["call"]["phone"] == "+353 *******01"
