"""Who is ringing, as a node knows it (gateway.core.ringing): notes start and end with rings,
lapse on their own, and come from other nodes as events."""

from __future__ import annotations

from dataclasses import replace

from test_routing import presence

from gateway.core.ringing import RingingAgents, RingNote, ring_event, ring_over_event

NOW = 1_000.0


def test_a_ring_is_noted_until_it_ends_and_only_for_its_own_call() -> None:
    ringing = RingingAgents()
    seen = {"anna": presence("anna")}
    ringing.start("acme", "anna", RingNote("c1", NOW + 30, seen["anna"].rev))
    assert ringing.current("acme", seen, NOW) == {"anna"}
    assert ringing.current("other", seen, NOW) == frozenset()
    ringing.end("acme", "anna", "c0")  # an older call's end: Anna still rings for c1
    assert ringing.current("acme", seen, NOW) == {"anna"}
    ringing.end("acme", "anna", "c1")
    assert ringing.current("acme", seen, NOW) == frozenset()


def test_a_note_lapses_at_its_time_or_once_presence_moves_on() -> None:
    ringing = RingingAgents()
    seen = {"anna": presence("anna"), "ben": presence("ben")}
    ringing.start("acme", "anna", RingNote("c1", NOW + 30, seen["anna"].rev))
    ringing.start("acme", "ben", RingNote("c2", NOW + 30, seen["ben"].rev))
    assert ringing.current("acme", seen, NOW + 30) == frozenset(), "lapsed at until"
    ringing.start("acme", "anna", RingNote("c1", NOW + 30, seen["anna"].rev))
    accepted = {**seen, "anna": replace(seen["anna"], rev=seen["anna"].rev + 1)}
    assert ringing.current("acme", accepted, NOW) == frozenset(), "presence moved on"
    lagging = {"anna": replace(seen["anna"], rev=seen["anna"].rev - 1)}
    ringing.start("acme", "anna", RingNote("c1", NOW + 30, seen["anna"].rev))
    assert ringing.current("acme", lagging, NOW) == {"anna"}, "a node behind still counts it"


def test_other_nodes_rings_arrive_as_events_and_listeners_hear_of_changes() -> None:
    here, there = RingingAgents(), RingingAgents()
    changed: list[str] = []
    there.add_listener(changed.append)
    seen = {"anna": presence("anna")}
    note = RingNote("c1", NOW + 30, seen["anna"].rev)
    here.start("acme", "anna", note)
    there.apply(ring_event("acme", "anna", note))
    assert there.current("acme", seen, NOW) == {"anna"}
    there.apply(ring_over_event("acme", "anna", "c1"))
    assert there.current("acme", seen, NOW) == frozenset()
    assert changed == ["acme", "acme"]


def test_malformed_events_change_nothing() -> None:
    ringing = RingingAgents()
    seen = {"anna": presence("anna")}
    for bad in (
        {"type": "ring"},
        {"type": "ring", "site": "acme", "agent_id": "anna", "call_id": "c", "until": "soon"},
        {"type": "ring", "site": "acme", "agent_id": "anna", "call_id": "c", "until": 1e9},
        {"type": "ring_over", "site": "acme"},
    ):
        ringing.apply(bad)
    assert ringing.current("acme", seen, NOW) == frozenset()
