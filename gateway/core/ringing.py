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

from gateway.core.model import Presence

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


# --- what an agent's sockets are offered ------------------------------------------------------

# A ring's end is remembered this long, so that the ring itself arriving later (from another
# node, behind a backlog) is recognised as over. Longer than any ring lasts plus its delays.
STOPPED_KEEP_S = 120.0


@dataclass(frozen=True, slots=True)
class Offer:
    """A ring as it reaches an agent's sockets: the call, which ring of it, until when."""

    call_id: str
    attempt: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Delivery:
    deliver: bool
    """Send the ring on to the agent's sockets."""
    stop_first: Offer | None = None
    """An older ring still showing: stop it on the agent's sockets before this one."""
    dropped: str | None = None
    """Why the ring is not sent: ``expired``, ``over`` (its end already came through) or
    ``stale`` (a newer ring for the agent came first)."""


class RingGate:
    """One agent, one ring at a time, as the agent's sockets on this node see it.

    The store's reservation makes sure the server never rings an agent for two calls at
    once, but the messages can still arrive out of step: a ring from another node behind a
    backlog, after it ended, or after the next ring of a node that did not hear its end yet.
    So every ``call:ring`` and ``call:ring_stop`` for an agent room passes here as it is
    handed to this node's sockets: an expired ring or one already over is dropped, and an
    older ring still showing is stopped before a newer one goes out. A newer reservation
    means the older ring ended on the server; which is newer is told by expiry (each ring
    expires its ring timeout after it started). Plain data; time is passed in."""

    def __init__(self, keep_stopped_s: float = STOPPED_KEEP_S) -> None:
        self._keep_s = keep_stopped_s
        self._showing: dict[str, Offer] = {}
        # (room, call_id) -> (the last attempt stopped, forget after); in insertion order, so
        # also in the order to forget them. A call may ring an agent again (a callback's
        # retry), as a later attempt.
        self._stopped: dict[tuple[str, str], tuple[int, float]] = {}

    def ring(self, room: str, offer: Offer, now: float) -> Delivery:
        self._forget(now)
        if now >= offer.expires_at:
            return Delivery(False, dropped="expired")
        stopped = self._stopped.get((room, offer.call_id))
        if stopped is not None and offer.attempt <= stopped[0]:
            return Delivery(False, dropped="over")
        current = self._showing.get(room)
        stop_first = None
        if current is not None and current.call_id != offer.call_id and current.expires_at > now:
            if offer.expires_at < current.expires_at:
                self._stop(room, offer.call_id, offer.attempt, now)
                return Delivery(False, dropped="stale")
            stop_first = current
            self._stop(room, current.call_id, current.attempt, now)
        self._showing[room] = offer
        return Delivery(True, stop_first)

    def ring_stop(self, room: str, call_id: str, attempt: int | None, now: float) -> None:
        """The ring of ``call_id`` (its ``attempt``; None: whichever is showing) ended. The
        stop itself is always sent on."""
        self._forget(now)
        current = self._showing.get(room)
        if current is not None and current.call_id == call_id:
            if attempt is None or attempt >= current.attempt:
                del self._showing[room]
            if attempt is None:
                attempt = current.attempt
        self._stop(room, call_id, attempt or 0, now)

    def showing(self, room: str, now: float) -> Offer | None:
        current = self._showing.get(room)
        return current if current is not None and current.expires_at > now else None

    def _stop(self, room: str, call_id: str, attempt: int, now: float) -> None:
        earlier = self._stopped.pop((room, call_id), None)  # re-inserted last: keeps the order
        if earlier is not None:
            attempt = max(attempt, earlier[0])
        self._stopped[(room, call_id)] = (attempt, now + self._keep_s)

    def _forget(self, now: float) -> None:
        stopped = self._stopped
        while stopped:
            key = next(iter(stopped))
            if stopped[key][1] > now:
                break
            del stopped[key]
        # A lapsed ring nobody stopped stays in _showing until the agent's next ring
        # replaces it: one entry per agent at most.
