"""Keys pressed during a bridged call, both ways.

A Media Stream takes only audio from the app (``media``, ``mark``, ``clear``), so a key the
browser sends reaches the phone as an in-band tone, which G.711 carries intact (RFC 4733,
section 2.1: in-band is fine for a codec that keeps the waveform), as it would on any phone
line. The browser sends keys as RFC 4733 ``telephone-event`` packets; aiortc does not know
that payload type, so the bridge adds it to the SDP it hands the browser (``add_dtmf``) and
takes those packets off the receiver itself (``KeyReceiver``, from ``pcmu.tap_pcmu``). A key
the phone presses comes as a ``dtmf`` message and reaches the browser as a tone too.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Final

import numpy as np

from mobile_bridge.media import g711

KEYS: Final = "0123456789*#ABCD"
"""RFC 4733 event codes 0 to 15, in order."""
LOW_HZ: Final = (697, 770, 852, 941)
HIGH_HZ: Final = (1209, 1336, 1477, 1633)
PAD: Final = ("123A", "456B", "789C", "*0#D")
TONE_MS: Final = 100
GAP_MS: Final = 60
RATE: Final = 8000
FRAME: Final = 160
TELEPHONE_EVENT: Final = re.compile(r"^a=rtpmap:(\d+) telephone-event/8000\s*$", re.M | re.I)
HOLD_HZ: Final = 620
OFFERED_PT: Final = 101
"""The payload type the bridge offers telephone-event under, when it offers."""


def _frequencies(key: str) -> tuple[int, int]:
    for row, keys in enumerate(PAD):
        if key in keys:
            return LOW_HZ[row], HIGH_HZ[keys.index(key)]
    raise ValueError(f"not a DTMF key: {key!r}")


@functools.cache
def tone_frames(key: str) -> tuple[bytes, ...]:
    """20 ms mu-law frames of ``key``: its two tones for 100 ms, then 60 ms of silence."""
    low, high = _frequencies(key)
    t = np.arange(RATE * TONE_MS // 1000) / RATE
    wave = 0.25 * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
    pcm = np.concatenate([wave * 32767, np.zeros(RATE * GAP_MS // 1000)]).astype(np.int16)
    return _frames(g711.encode(pcm))


@functools.cache
def hold_tone_frames() -> tuple[bytes, ...]:
    """A soft 620 Hz beep of 200 ms: the caller on hold hears that the line is alive."""
    t = np.arange(RATE // 5) / RATE
    return _frames(g711.encode((0.1 * np.sin(2 * np.pi * HOLD_HZ * t) * 32767).astype(np.int16)))


def _frames(encoded: bytes) -> tuple[bytes, ...]:
    return tuple(encoded[i : i + FRAME] for i in range(0, len(encoded), FRAME))


class KeyReceiver:
    """RFC 4733 packets of one receiver to keys: each event once, at its end (the end packet
    comes three times; a key is one RTP timestamp)."""

    def __init__(self, on_key: Callable[[str], None]) -> None:
        self.payload_type: int | None = None
        """The negotiated telephone-event payload type; None: the browser sends no keys."""
        self._on_key = on_key
        self._last: int | None = None
        self.keys = 0

    def packet(self, payload: bytes, timestamp: int) -> None:
        if len(payload) < 4 or not payload[1] & 0x80:
            return  # not the end of an event yet
        if timestamp == self._last:
            return  # a repeat of the end packet
        self._last = timestamp
        event = payload[0]
        if event < len(KEYS):
            self.keys += 1
            self._on_key(KEYS[event])


def dtmf_payload_type(sdp: str) -> int | None:
    """The payload type ``sdp`` maps ``telephone-event/8000`` to, if any."""
    found = TELEPHONE_EVENT.search(sdp)
    return int(found.group(1)) if found else None


def add_dtmf(sdp: str, payload_type: int) -> str:
    """``sdp`` (aiortc's, one audio line) with ``telephone-event/8000`` added under
    ``payload_type``: what aiortc would write if it knew the codec."""
    lines = sdp.split("\r\n")
    media = next(i for i, line in enumerate(lines) if line.startswith("m=audio "))
    lines[media] += f" {payload_type}"
    last_map = max(i for i, line in enumerate(lines) if line.startswith("a=rtpmap:"))
    lines[last_map + 1 : last_map + 1] = [
        f"a=rtpmap:{payload_type} telephone-event/8000",
        f"a=fmtp:{payload_type} 0-16",
    ]
    return "\r\n".join(lines)
