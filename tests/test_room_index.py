"""The socket.io manager's room index (gateway/edge/sio/sio_manager.py ``IndexedRooms``)
against the stock manager: any sequence of connects, room changes and disconnects leaves the
same rooms, and each socket's rooms are the same."""

from __future__ import annotations

from typing import Any

import socketio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.edge.sio.sio_manager import IndexedRooms

SIDS = [f"s{i}" for i in range(6)]
ROOMS = ["agent:acme:anna", "site:acme", "visitor:acme:v1", "board"]
NAMESPACES = ["/agent", "/visitor"]

Op = tuple[str, str, str, str]
ops = st.lists(
    st.tuples(
        st.sampled_from(["connect", "enter", "leave", "disconnect", "close"]),
        st.sampled_from(SIDS),
        st.sampled_from(NAMESPACES),
        st.sampled_from(ROOMS),
    ),
    max_size=60,
)


def apply(manager: Any, op: Op) -> None:
    kind, sid, namespace, room = op
    connected = sid in manager.rooms.get(namespace, {}).get(None, {})
    if kind == "connect" and not connected:
        manager.basic_enter_room(sid, namespace, None, eio_sid=f"e-{sid}")
        manager.basic_enter_room(sid, namespace, sid, eio_sid=f"e-{sid}")
        manager.pending_connect.setdefault(namespace, []).append(sid)
    elif kind == "enter" and connected:
        manager.basic_enter_room(sid, namespace, room)
    elif kind == "leave":
        manager.basic_leave_room(sid, namespace, room)
    elif kind == "disconnect":
        if connected:
            if namespace not in manager.pending_disconnect:
                manager.pending_disconnect[namespace] = []
            manager.pending_disconnect[namespace].append(sid)
        manager.basic_disconnect(sid, namespace)
    elif kind == "close":
        manager.basic_close_room(room, namespace)


def rooms(manager: Any) -> dict[str, dict[Any, dict[str, str]]]:
    return {ns: {r: dict(m) for r, m in by_room.items()} for ns, by_room in manager.rooms.items()}


@settings(max_examples=300, deadline=None)
@given(ops)
def test_the_index_leaves_the_rooms_the_stock_manager_leaves(sequence: list[Op]) -> None:
    stock, indexed = socketio.AsyncManager(), IndexedRooms()
    for op in sequence:
        apply(stock, op)
        apply(indexed, op)
        assert rooms(indexed) == rooms(stock)
        for namespace in NAMESPACES:
            for sid in SIDS:
                assert sorted(indexed.get_rooms(sid, namespace)) == sorted(
                    stock.get_rooms(sid, namespace)
                )
                assert indexed.is_connected(sid, namespace) == stock.is_connected(sid, namespace)
    for namespace in NAMESPACES:
        for sid in SIDS:
            indexed.basic_disconnect(sid, namespace)
    assert indexed.rooms == {}
    assert indexed._rooms_of == {}


def test_a_disconnect_touches_only_the_sockets_own_rooms() -> None:
    """Thousands of sockets, each in its own rooms: disconnecting one leaves every other
    socket's rooms as they were, and the index holds nothing for it."""
    manager = IndexedRooms()
    for i in range(2000):
        sid = f"s{i}"
        manager.basic_enter_room(sid, "/visitor", None, eio_sid=f"e{i}")
        manager.basic_enter_room(sid, "/visitor", sid, eio_sid=f"e{i}")
        manager.basic_enter_room(sid, "/visitor", f"visitor:acme:v{i}")
    for i in range(0, 2000, 2):
        manager.basic_disconnect(f"s{i}", "/visitor")
    assert len(manager.rooms["/visitor"][None]) == 1000
    assert set(manager.get_rooms("s1", "/visitor")) == {"s1", "visitor:acme:v1"}
    assert manager.get_rooms("s0", "/visitor") == []
    assert ("/visitor", "s0") not in manager._rooms_of
