"""Connections taken from aiohttp once their response has started: a websocket after its
101, an event stream after its headers (``take_connection``, ``DetachedResponse``).

aiohttp keeps a long-lived response inside the request that opened it: the request with its
headers, the connection's handler, two tasks, and the suspended frames of every middleware
and handler above it, for as long as the connection lives. Thousands of idle connections
(website buttons, ticket pages, agents' apps) each held a dozen kilobytes of that. Taken
over, a connection is its transport and one small protocol of Membrane's, and its request
is freed as soon as the handler returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

P = TypeVar("P", bound=asyncio.BaseProtocol)


class DetachedResponse(web.StreamResponse):
    """What a handler returns for a connection it took (``take_connection``): aiohttp ends
    the request with it and writes nothing more."""

    async def write_eof(self, data: bytes = b"") -> None:
        """Replaces ``StreamResponse.write_eof``: the end of the stream is the protocol's."""
        self._eof_sent = True


def take_connection(request: web.BaseRequest, make: Callable[[asyncio.Transport], P]) -> P:
    """Hands the request's connection (its response started) to the protocol ``make``
    returns for its transport, with any bytes the client sent after its request (which
    aiohttp's handler keeps aside once upgraded: ``RequestHandler.data_received``), and lets
    that handler go as if the client had left (``RequestHandler.connection_lost``) without
    closing the transport. The request's task then ends without touching the transport
    (``RequestHandler.start`` closes it only when not force-closed), and the handler, the
    request and all they hold are freed. The handler must return a response whose end
    writes nothing (``DetachedResponse``, or a websocket's).

    Raises ``ConnectionResetError`` if the client is already gone."""
    handler: Any = request.protocol
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client left before its response started")
    protocol = make(transport)
    tail: bytes = handler._message_tail
    handler._message_tail = b""
    transport.set_protocol(protocol)
    # aiohttp's handler must not close the transport it no longer owns, nor cancel this
    # task: it forgets the transport, then drops its connection state as on a client gone.
    handler.transport = None
    handler._task_handler = None
    handler.connection_lost(None)
    if tail and isinstance(protocol, asyncio.Protocol):
        protocol.data_received(tail)
    return protocol
