"""The engine.io and socket.io code Membrane replaces, in one package: ``engine`` (the socket,
its websocket driver and the engine.io server), ``websocket`` (the websocket once aiohttp has
answered its handshake), ``packet_queue`` (a socket's queue) and ``server`` (the socket.io
server, its packets and namespaces). Each override names the upstream function it replaces, which
tests/test_upstream_guard.py fingerprints. The bounds they hold a client to are in
``gateway.edge.sio.limits``."""

from gateway.edge.sio.upstream.engine import LeanSocket, PlainWebSocket, TrackedEngineServer
from gateway.edge.sio.upstream.server import (
    ACK_REQUESTED,
    JsonPacket,
    MembraneNamespace,
    MembraneServer,
)

__all__ = [
    "ACK_REQUESTED",
    "JsonPacket",
    "LeanSocket",
    "MembraneNamespace",
    "MembraneServer",
    "PlainWebSocket",
    "TrackedEngineServer",
]
