"""A draining node's sockets: told to reconnect, then cut off as a network drop would, so
that their clients reconnect to another node (docs/ARCHITECTURE.md, "Draining")."""

from __future__ import annotations

import asyncio
import logging

from gateway.edge.sio.upstream import LeanSocket, MembraneServer, TrackedEngineServer
from gateway.services.drain import RETRY_AFTER_S
from gateway.wire.events import draining_to_wire

log = logging.getLogger(__name__)

DRAINING_EVENT = "server:draining"
_NAMESPACES = ("/agent", "/board", "/visitor")
# Sockets closed at once during a drain: each runs its disconnect handler (store writes).
_CLOSE_BATCH = 200


async def send_sockets_elsewhere(server: MembraneServer) -> None:
    """For a drain: tell every socket on this node to reconnect (``server:draining``), then
    close each connection the way a network drop does. socket.io clients reconnect by
    themselves after a dropped transport (not after a server's disconnect), to the same URL:
    behind a load balancer, another node. The disconnect handlers run here, while the node
    drains, so they know the party did not leave."""
    for namespace in _NAMESPACES:
        await server.emit(
            DRAINING_EVENT,
            draining_to_wire(RETRY_AFTER_S),
            namespace=namespace,
            ignore_queue=True,  # this node's sockets only
        )
    eio = server.eio
    sockets = list(eio.sockets.items())
    for start in range(0, len(sockets), _CLOSE_BATCH):
        batch = sockets[start : start + _CLOSE_BATCH]
        results = await asyncio.gather(
            *(_drop(eio, sid, s) for sid, s in batch), return_exceptions=True
        )
        for (sid, _), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                log.warning("draining: closing socket %s failed: %r", sid, result)


async def _drop(eio: TrackedEngineServer, sid: str, socket: LeanSocket) -> None:
    try:
        # Runs socket.io's disconnect handlers. No engine.io CLOSE packet: that is a server's
        # goodbye, which a client does not follow by reconnecting.
        await socket.close(wait=False, abort=True, reason=eio.reason.SERVER_DISCONNECT)
    finally:
        # Closes the WebSocket (else it stays open until the ping timeout): to the client,
        # the network dropped.
        socket.end_transport()
        eio.sockets.pop(sid, None)
