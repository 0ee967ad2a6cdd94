"""What one socket.io client may make a node hold, and how a connection past it is refused:
bounds that ``gateway.edge.sio.upstream`` enforces inside engine.io and socket.io."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from gateway.edge.errors import error_object, json_error

log = logging.getLogger(__name__)

# Bytes sent to one connection that its transport still holds unsent (the kernel's send
# buffer is full: the client is not reading). A client that falls this far behind is
# dropped, not buffered: a board that never reads would otherwise hold every presence change of its
# site for as long as it answers pings. A burst of a few hundred changes (a resync of a
# large site) fits; the availability feed drops its watchers at 64 KiB the same way.
MAX_PENDING_BYTES = 256 * 1024
# Packets received on one connection and not yet handled: past this, the node stops reading
# from it (the kernel's buffers, then TCP, hold the client back) until its handler catches
# up. Its packets are handled one at a time, in order.
MAX_INBOX = 64
# Namespace CONNECT packets per engine.io connection: one every 2 s on average, bursts of
# 10. Each connect and disconnect of /agent adds and removes a device (a presence change
# for every node and board); the shipped clients connect each namespace once.
NAMESPACE_CONNECTS = (0.5, 10.0)
# How long a websocket closed with bytes still unsent may take to flush them, before its
# transport is cut: a client that stopped reading would otherwise hold the connection (and
# its socket.io disconnect, and a node's shutdown) for ever.
WRITER_GRACE_S = 5.0
# How long an HTTP body refused as too large is still read (and thrown away) after the 413.
BODY_LINGER_S = 1.0


def agent_liveness(socket_ttl_s: float) -> tuple[float, float]:
    """How an ``/agent`` connection is watched, from ``presence.socket_ttl_s``: pinged every
    half of it, and cut once its client has been silent for all of it (an alive client
    answers two pings in that time; the later one's pong may take up to half the TTL).
    Cutting it is a disconnect, which removes its desktop device on every node at once: a
    frozen or sleeping laptop goes offline within ``socket_ttl_s`` of its last word, instead
    of engine.io's ping interval plus timeout (45 s). Pings cost: at 2,500 agents a node
    sent and answered 500 a second when it pinged every third of the TTL, as many packets as
    its 100 calls a second. Only agents' connections: a 5 s ping interval for 10,000 idle
    widgets cost 60-70% of a core (``LeanSocket.watch``)."""
    return socket_ttl_s / 2, socket_ttl_s


# WebSocket close codes (RFC 6455) for a connection the gateway drops; the close reason is
# the error code.
WS_PROTOCOL_ERROR = 1002
WS_UNSUPPORTED_DATA = 1003
WS_POLICY_VIOLATION = 1008


def is_event(payload: Any) -> bool:
    """An EVENT's payload is ``[name, *args]`` with a string name."""
    return isinstance(payload, list) and len(payload) > 0 and isinstance(payload[0], str)


def packet_size(pkt: Any) -> int:
    """What a queued engine.io packet will cost on the wire (``encode`` caches its result,
    so the writer does not encode it again); the writer's wake-up marker ``None`` is free."""
    return 0 if pkt is None else len(pkt.encode())


async def refuse_body(request: web.Request) -> web.StreamResponse:
    """A 413 for a body the gateway will not read, then the connection closed within
    ``BODY_LINGER_S``. Meanwhile what the client still sends is read and discarded, so that
    closing with unread bytes (which resets the connection) does not destroy the answer
    before the client reads it; aiohttp's own lingering would wait 10 s, holding up a
    shutdown as long."""
    response = json_error(413, error_object("payload_too_large", "request body too large"))
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    try:
        async with asyncio.timeout(BODY_LINGER_S):
            while await request.content.readany():
                pass
    except TimeoutError:
        pass
    except Exception as e:  # the client went away, or broke its body off
        log.debug("refused body ended early: %r", e)
    request.protocol.force_close()
    return response
