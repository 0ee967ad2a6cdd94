"""The socket.io rooms each party's sockets join, on every node alike."""

from __future__ import annotations


def agent_room(site: str, agent_id: str) -> str:
    return f"agent:{site}:{agent_id}"


def site_room(site: str) -> str:
    return f"site:{site}"


def visitor_room(site: str, visitor_id: str) -> str:
    return f"visitor:{site}:{visitor_id}"
