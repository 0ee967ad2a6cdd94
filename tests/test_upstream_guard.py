"""The engine.io, socket.io and aiortc code Membrane replaces or relies on, fingerprinted.

gateway/edge/sio/upstream/ and gateway/edge/sio/sio_manager.py replace private methods of
python-engineio and python-socketio with copies that bound what a client can make a node
hold, or that cost fewer objects. An upgrade that changes one of those upstream functions
may fix a bug the copy still has, or change a contract the copy keeps (a new argument, a new
packet type): so the installed source of each is hashed and compared with the hash recorded
below, and an upgrade that changes one fails here, naming the override to re-read against
it.

After re-reading (and fixing) the override, record the new hash the failure shows.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import textwrap
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import pytest

import gateway


@dataclass(frozen=True)
class Upstream:
    module: str
    qualname: str
    """``Class.attribute`` in ``module``: the class that defines it, not one inheriting it."""
    override: str
    """``module:Class.attribute`` of the Membrane code that replaces (or relies on) it."""
    sha: str

    @property
    def package(self) -> str:
        if self.module.startswith("aiortc"):
            return "aiortc"
        if self.module.startswith("aiohttp"):
            return "aiohttp"
        return "python-engineio" if self.module.startswith("engineio") else "python-socketio"


def _eio(qualname: str, override: str, sha: str) -> Upstream:
    module = (
        "engineio.async_socket" if qualname.startswith("AsyncSocket") else "engineio.async_server"
    )
    return Upstream(module, qualname, override, sha)


def _sio(module: str, qualname: str, override: str, sha: str) -> Upstream:
    return Upstream(f"socketio.{module}", qualname, override, sha)


E = "gateway.edge.sio.upstream.engine"
W = "gateway.edge.sio.upstream.websocket"
S = "gateway.edge.sio.upstream.server"
M = "gateway.edge.sio.sio_manager"
P = "mobile_bridge.media.pcmu"
UPSTREAM = [
    # engine.io 4.15.1
    _eio("AsyncSocket.send", f"{E}:LeanSocket.send", "0d14cbe83d409f8b"),
    _eio("AsyncSocket.poll", f"{E}:LeanSocket.poll", "9e7733d7c32e158a"),
    _eio("AsyncSocket.schedule_ping", f"{E}:LeanSocket.schedule_ping", "004bb5cd7ba28d22"),
    _eio("AsyncSocket._send_ping", f"{E}:LeanSocket._ping_due", "797800de80607ae2"),
    # What upstream's websocket handler and its ``receive`` do, the websocket's peer does.
    _eio("AsyncSocket._websocket_handler", f"{E}:LeanSocket.attach", "d9962c30bb287a40"),
    _eio("AsyncSocket.receive", f"{E}:LeanSocket.websocket_message", "d0b96c65449f5eb9"),
    _eio("AsyncServer._trigger_event", f"{E}:LeanSocket._message", "e1c18beba3e9fe84"),
    _eio(
        "AsyncServer._service_task",
        f"{E}:TrackedEngineServer._service_task",
        "de12bbd56649b219",
    ),
    _eio(
        "AsyncServer.handle_request", f"{E}:TrackedEngineServer.handle_request", "7251b38e63430fa8"
    ),
    _eio(
        "AsyncServer._handle_connect",
        f"{E}:TrackedEngineServer._handle_connect",
        "b822f04393519502",
    ),
    _eio("AsyncServer.create_queue", f"{E}:TrackedEngineServer.create_queue", "19fafaad676bdc51"),
    _eio(
        "AsyncServer.start_background_task",
        f"{E}:TrackedEngineServer.start_background_task",
        "1f503841ab8b0ac3",
    ),
    # Not per-message deflate (``PlainWebSocket``): engine.io's aiohttp websocket.
    Upstream(
        "engineio.async_drivers.aiohttp",
        "WebSocket.__call__",
        f"{E}:PlainWebSocket.__call__",
        "9cca8ec81726f395",
    ),
    # aiohttp 3.14.5: the websocket taken over from aiohttp after its handshake
    # (``DetachedWebSocket``), and aiohttp's frame parser fed by a queue of Membrane's.
    Upstream(
        "aiohttp.web_ws",
        "WebSocketResponse._post_start",
        f"{W}:DetachedWebSocket._post_start",
        "097105032c6ce6e2",
    ),
    Upstream(
        "aiohttp.web_ws",
        "WebSocketResponse.write_eof",
        f"{W}:DetachedWebSocket.write_eof",
        "91160f9c7f4bf52d",
    ),
    Upstream(
        "aiohttp.web_protocol",
        "RequestHandler.connection_lost",
        "gateway.edge.detach:take_connection",
        "8d34e69a627ac698",
    ),
    Upstream(
        "aiohttp.web_protocol",
        "RequestHandler.data_received",
        "gateway.edge.detach:take_connection",
        "e5ef6ab42b2c2f3c",
    ),
    Upstream(
        "aiohttp.web_protocol",
        "RequestHandler.start",
        "gateway.edge.detach:take_connection",
        "f84eee4a2c5532ab",
    ),
    Upstream(
        "aiohttp.web_response",
        "StreamResponse.write_eof",
        "gateway.edge.detach:DetachedResponse.write_eof",
        "2e843bf6b2609e3a",
    ),
    Upstream(
        "aiohttp._websocket.reader_py",
        "WebSocketReader._handle_frame",
        f"{W}:_Inbox",
        "342a8d3aef005d5d",
    ),
    Upstream(
        "aiohttp._websocket.reader_py",
        "WebSocketDataQueue.feed_data",
        f"{W}:_Inbox.feed_data",
        "cf5018460fc9decc",
    ),
    # socket.io 5.18.1
    _sio("packet", "Packet.data_is_binary", f"{S}:JsonPacket.data_is_binary", "42af165d2e194b90"),
    _sio(
        "async_server",
        "AsyncServer._handle_eio_message",
        f"{S}:MembraneServer._handle_eio_message",
        "8822144de8c4d3cd",
    ),
    _sio(
        "async_server",
        "AsyncServer._handle_event_internal",
        f"{S}:MembraneServer._handle_event_internal",
        "bbb33cf24ba92097",
    ),
    _sio(
        "async_server",
        "AsyncServer._engineio_server_class",
        f"{S}:MembraneServer._engineio_server_class",
        "726f2848023f38ac",
    ),
    _sio(
        "async_namespace",
        "AsyncNamespace.trigger_event",
        f"{S}:MembraneNamespace.trigger_event",
        "fdd419f42fff8f98",
    ),
    _sio(
        "async_pubsub_manager",
        "AsyncPubSubManager.emit",
        f"{M}:ObservedRedisManager.emit",
        "d2aa26b67a0dd57b",
    ),
    # Relied on: the listener loop that takes what ``_listen`` yields (and ``_unbatch``'s
    # dicts), and the handler of the emit message that ``_emit_message`` builds.
    _sio(
        "async_pubsub_manager",
        "AsyncPubSubManager._thread",
        f"{M}:ObservedRedisManager._unbatch",
        "14048bea11f0c942",
    ),
    _sio(
        "async_pubsub_manager",
        "AsyncPubSubManager._handle_emit",
        f"{M}:ObservedRedisManager._emit_message",
        "dd533f098d25ecde",
    ),
    # Relied on: what upstream does with the pending lists (``SidSet``), and the room
    # bookkeeping that ``IndexedRooms`` indexes.
    _sio("base_manager", "BaseManager.pre_connect", f"{M}:SidSets.__setitem__", "8a6bc4d85e94bea4"),
    _sio(
        "base_manager", "BaseManager.pre_disconnect", f"{M}:SidSets.__setitem__", "4c65730b68bb09e5"
    ),
    _sio(
        "base_manager", "BaseManager.is_connected", f"{M}:SidSet.__contains__", "5566816233425fad"
    ),
    _sio(
        "base_manager",
        "BaseManager.basic_enter_room",
        f"{M}:IndexedRooms.basic_enter_room",
        "705877858d9fa712",
    ),
    _sio(
        "base_manager",
        "BaseManager.basic_leave_room",
        f"{M}:IndexedRooms.basic_leave_room",
        "8c315192c6837321",
    ),
    _sio(
        "base_manager",
        "BaseManager.basic_disconnect",
        f"{M}:IndexedRooms.basic_disconnect",
        "f8030f78437464bd",
    ),
    _sio(
        "base_manager", "BaseManager.get_rooms", f"{M}:IndexedRooms.get_rooms", "5ec8bc0630fab119"
    ),
    _sio("async_manager", "AsyncManager.emit", f"{M}:LocalManager.emit", "733526e7a4683888"),
    _sio("async_manager", "AsyncManager.emit", f"{M}:IndexedRooms.deliver", "733526e7a4683888"),
    _sio(
        "async_pubsub_manager",
        "AsyncPubSubManager._handle_emit",
        f"{M}:ObservedRedisManager._handle_emit",
        "dd533f098d25ecde",
    ),
    _sio(
        "async_redis_manager",
        "AsyncRedisManager._publish",
        f"{M}:ObservedRedisManager._publish",
        "635aaffa688e7d3d",
    ),
    _sio(
        "async_redis_manager",
        "AsyncRedisManager._listen",
        f"{M}:ObservedRedisManager._listen",
        "0cda033d5bd9ba18",
    ),
    # aiortc 1.16.0: the audio bridge's PCMU path (mobile_bridge/media/pcmu.py) replaces a
    # receiver's packet handling, and relies on how packets reach it, how the sender takes
    # pre-encoded packets, and when codecs are negotiated.
    Upstream(
        "aiortc.rtcrtpreceiver",
        "RTCRtpReceiver._handle_rtp_packet",
        f"{P}:tap_pcmu",
        "0f370c653675ae0e",
    ),
    Upstream(
        "aiortc.rtcdtlstransport",
        "RTCDtlsTransport._handle_rtp_data",
        f"{P}:tap_pcmu",
        "8afb80035db573a1",
    ),
    Upstream(
        "aiortc.rtcdtlstransport",
        "RtpRouter.route_rtp",
        f"{P}:route_keys",
        "ec1c4dc26bc10526",
    ),
    Upstream(
        "aiortc.rtcrtpsender",
        "RTCRtpSender._next_encoded_frame",
        f"{P}:MuLawTrack.recv",
        "dcfc00fd0d7cb19d",
    ),
    Upstream(
        "aiortc.rtcpeerconnection",
        "RTCPeerConnection.setRemoteDescription",
        f"{P}:bridge_transceiver",
        "976cb3d1034539a8",
    ),
]


UPSTREAM_PACKAGES = ("engineio", "socketio")


def _subclasses_of_upstream() -> list[type]:
    """Every class in the gateway package with an engine.io or socket.io class among its
    bases: a new one is guarded as soon as it is written."""
    found: list[type] = []
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if (
                isinstance(cls, type)
                and cls.__module__ == module.__name__
                and any(b.__module__.split(".")[0] in UPSTREAM_PACKAGES for b in cls.__mro__[1:])
            ):
                found.append(cls)
    return found


# Membrane's subclasses of upstream classes: each method they redefine is in UPSTREAM.
SUBCLASSES = _subclasses_of_upstream()
# Constructors that call upstream's first and only add attributes.
EXTENDED = {"__init__"}


def _attribute(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        # A class's own __dict__: an attribute it inherits is not the one recorded.
        obj = obj.__dict__[part]
    if isinstance(obj, classmethod | staticmethod):
        obj = obj.__func__
    return obj


def fingerprint(source: str) -> str:
    """The source's hash, blank lines, whole-line comments and trailing spaces aside."""
    lines = [
        line.rstrip()
        for line in textwrap.dedent(source).splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@pytest.mark.parametrize("upstream", UPSTREAM, ids=[u.qualname for u in UPSTREAM])
def test_the_upstream_code_an_override_replaces_is_the_one_it_was_checked_against(
    upstream: Upstream,
) -> None:
    found = fingerprint(inspect.getsource(_attribute(upstream.module, upstream.qualname)))
    assert found == upstream.sha, (
        f"{upstream.module}.{upstream.qualname} changed in the installed "
        f"{upstream.package} {version(upstream.package)}: re-check {upstream.override} against "
        f"its new code, then record its hash {found!r} in tests/test_upstream_guard.py"
    )


@pytest.mark.parametrize("upstream", UPSTREAM, ids=[u.qualname for u in UPSTREAM])
def test_each_override_names_the_upstream_function_it_replaces(upstream: Upstream) -> None:
    module, qualname = upstream.override.split(":")
    source = inspect.getsource(_attribute(module, qualname))
    assert f"``{upstream.qualname}``" in source, (
        f"{upstream.override} should name ``{upstream.qualname}`` in its docstring or a comment"
    )


@pytest.mark.parametrize("cls", SUBCLASSES, ids=[c.__name__ for c in SUBCLASSES])
def test_every_method_a_subclass_redefines_is_guarded(cls: type) -> None:
    assert len(SUBCLASSES) >= 6, "the gateway's subclasses of upstream classes were not found"
    guarded = {(u.override, f"{u.module}.{u.qualname}") for u in UPSTREAM}
    for name, value in vars(cls).items():
        if name in EXTENDED or not (callable(value) or isinstance(value, classmethod)):
            continue
        base = next((b for b in cls.__mro__[1:] if name in vars(b)), None)
        if base is None or base.__module__.split(".")[0] not in UPSTREAM_PACKAGES:
            continue
        override = f"{cls.__module__}:{cls.__qualname__}.{name}"
        upstream = f"{base.__module__}.{base.__qualname__}.{name}"
        assert (override, upstream) in guarded, (
            f"{override} replaces {upstream}: add it to UPSTREAM"
        )


def test_the_fingerprint_sees_code_not_comments_or_blank_lines() -> None:
    code = "    def f(self, x):\n        return x + 1\n"
    assert fingerprint(code) == fingerprint(
        "    def f(self, x):\n\n        # why\n        return x + 1  \n"
    )
    assert fingerprint(code) != fingerprint(code.replace("x + 1", "x + 2"))
    assert fingerprint(code) != fingerprint(code.replace("x)", "x, y=None)"))
