"""TwiML parsing (tests/twilio_sim/spec/TWIML.md).

A document is ``<Response>`` with verbs as children.  Parsing produces plain :class:`Node` trees;
the simulator's executor (server.py) interprets them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

# Verbs the simulator executes.  Anything else inside <Response> is recorded and skipped.
SUPPORTED_VERBS = frozenset(
    {"Say", "Play", "Pause", "Hangup", "Reject", "Redirect", "Dial", "Connect", "Gather"}
)
# Verbs that exist in TwiML Voice but are not simulated (see README.md).
KNOWN_UNSIMULATED_VERBS = frozenset(
    {"Record", "Enqueue", "Leave", "Queue", "Start", "Stop", "Refer", "Pay", "Prompt"}
)
DIAL_NOUNS = frozenset(
    {"Number", "Client", "Sip", "Conference", "Queue", "Application", "WhatsApp"}
)


class TwimlError(Exception):
    """Document parse failure (Twilio error 12100) or schema problem (12200)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Node:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    text: str = ""
    children: list[Node] = field(default_factory=list)

    def child(self, tag: str) -> Node | None:
        for c in self.children:
            if c.tag == tag:
                return c
        return None


@dataclass
class Document:
    """A parsed TwiML document and where it came from (``url`` is None for inline TwiML)."""

    verbs: list[Node]
    url: str | None
    xml: str


def _convert(el: ET.Element) -> Node:
    text = (el.text or "").strip()
    return Node(
        tag=el.tag,
        attrs={k: v for k, v in el.attrib.items()},
        text=text,
        children=[_convert(c) for c in el],
    )


def parse(xml: str, url: str | None = None) -> Document:
    try:
        root = ET.fromstring(xml.strip())
    except ET.ParseError as exc:
        raise TwimlError(12100, f"Document parse failure: {exc}") from exc
    if root.tag != "Response":
        raise TwimlError(12100, f"Document parse failure: root element is <{root.tag}>")
    return Document(verbs=[_convert(c) for c in root], url=url, xml=xml)
