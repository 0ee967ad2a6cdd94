"""Who is ringing for a call right now, as this node knows it: its own rings and, through
node events, every other node's.

A ringing agent is still ``available`` in presence, yet cannot take another call. Routing
skips them without a store round trip, and the button must not promise them (an agent
offered a call is not free, as in any contact centre's "reserved" state). The store's
reservation stays the authority; this is each node's fast, shared view of it.

A note ends when the ring does: the node that ends it (an accept, a decline, a ring timeout,
a cancel, on whichever node) tells the others with a ``ring_over`` event. So that a lost
event or a dead node cannot hold an agent back for long, a note also lapses at its ``until``
(the reservation's own expiry), and as soon as the agent's presence moves past the revision
it was taken at (an accept makes them ``on_call``). Plain data; time is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.model import Presence

# A node event as it travels between nodes (the store's envelope holds it).
Event = dict[str, Any]

RING_EVENT = "ring"
RING_OVER_EVENT = "ring_over"


@dataclass(frozen=True, slots=True)
class RingNote:
    call_id: str
    until: float
    """When the reservation behind the ring lapses at the latest."""
    rev: int
    """The agent's presence revision when the ring started."""


class RingingAgents:
    def __init__(self) -> None:
        self._notes: dict[str, dict[str, RingNote]] = {}
        self._listeners: list[Callable[[str], None]] = []

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Called with the site whenever a ring starts or ends (not when a note lapses)."""
        self._listeners.append(listener)

    def start(self, site: str, agent_id: str, note: RingNote) -> None:
        self._notes.setdefault(site, {})[agent_id] = note
        self._changed(site)

    def end(self, site: str, agent_id: str, call_id: str) -> None:
        """The ring for ``call_id`` is over; a note for another call stays."""
        notes = self._notes.get(site)
        if notes is not None and (note := notes.get(agent_id)) and note.call_id == call_id:
            del notes[agent_id]
            self._changed(site)

    def ringing_for(self, site: str, agent_id: str) -> str | None:
        """The call the agent was last noted ringing for, if any (it may have lapsed)."""
        note = self._notes.get(site, {}).get(agent_id)
        return note.call_id if note is not None else None

    def current(self, site: str, presence: Mapping[str, Presence], now: float) -> frozenset[str]:
        """The site's agents ringing now; lapsed notes are dropped on the way."""
        notes = self._notes.get(site)
        if not notes:
            return frozenset()
        live = {
            agent_id: note
            for agent_id, note in notes.items()
            if note.until > now and (p := presence.get(agent_id)) is not None and p.rev <= note.rev
        }
        if len(live) != len(notes):
            self._notes[site] = live
        return frozenset(live)

    def apply(self, event: Event) -> None:
        """A ``ring`` or ``ring_over`` event from another node; malformed ones are ignored."""
        try:
            site, agent_id, call_id = str(event["site"]), str(event["agent_id"]), event["call_id"]
            if event["type"] == RING_EVENT:
                note = RingNote(str(call_id), float(event["until"]), int(event["rev"]))
                self.start(site, agent_id, note)
            elif event["type"] == RING_OVER_EVENT:
                self.end(site, agent_id, str(call_id))
        except (KeyError, TypeError, ValueError):
            return

    def _changed(self, site: str) -> None:
        for listener in self._listeners:
            listener(site)


def ring_event(site: str, agent_id: str, note: RingNote) -> Event:
    return {
        "type": RING_EVENT,
        "site": site,
        "agent_id": agent_id,
        "call_id": note.call_id,
        "until": note.until,
        "rev": note.rev,
    }


def ring_over_event(site: str, agent_id: str, call_id: str) -> Event:
    return {"type": RING_OVER_EVENT, "site": site, "agent_id": agent_id, "call_id": call_id}
