"""G.711 mu-law at 8 kHz, the phone-side audio sources and a tone detector for tests."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000  # 160 bytes of mu-law per 20 ms frame
ULAW_SILENCE = 0xFF

_BIAS = 0x84
_CLIP = 32635


def ulaw_encode(pcm: npt.NDArray[np.int16]) -> bytes:
    """Encode 16-bit linear PCM to G.711 mu-law bytes."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0).astype(np.int32)
    mag = np.minimum(np.abs(x), _CLIP) + _BIAS
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    out = ~(sign | (exponent << 4) | mantissa) & 0xFF
    return bytes(out.astype(np.uint8).tobytes())


def ulaw_decode(data: bytes) -> npt.NDArray[np.int16]:
    """Decode G.711 mu-law bytes to 16-bit linear PCM."""
    b = (~np.frombuffer(data, dtype=np.uint8)).astype(np.int32) & 0xFF
    sign = b & 0x80
    exponent = (b >> 4) & 0x07
    mantissa = b & 0x0F
    mag = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -mag, mag).astype(np.int16)


class AudioSource(Protocol):
    """What a simulated phone says: one 20 ms mu-law frame (160 bytes) per index."""

    def frame(self, index: int) -> bytes: ...


class Silence:
    def frame(self, index: int) -> bytes:
        return bytes([ULAW_SILENCE]) * FRAME_BYTES


class Tone:
    """A continuous sine tone (phase-continuous across frames)."""

    def __init__(self, hz: float, amplitude: float = 0.3) -> None:
        self.hz = hz
        self.amplitude = amplitude

    def frame(self, index: int) -> bytes:
        n = np.arange(index * FRAME_BYTES, (index + 1) * FRAME_BYTES, dtype=np.float64)
        wave = self.amplitude * 32767.0 * np.sin(2.0 * np.pi * self.hz * n / SAMPLE_RATE)
        return ulaw_encode(wave.astype(np.int16))


def tone_pcm(hz: float, seconds: float, amplitude: float = 0.3) -> npt.NDArray[np.int16]:
    n = np.arange(int(SAMPLE_RATE * seconds), dtype=np.float64)
    return (amplitude * 32767.0 * np.sin(2.0 * np.pi * hz * n / SAMPLE_RATE)).astype(np.int16)


def dominant_frequency(ulaw: bytes, rate: int = SAMPLE_RATE) -> float:
    """The strongest frequency (Hz) in a mu-law buffer, by FFT with a Hann window."""
    pcm = ulaw_decode(ulaw).astype(np.float64)
    if pcm.size < 64:
        return 0.0
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(pcm.size)))
    spectrum[0] = 0.0
    freqs = np.fft.rfftfreq(pcm.size, d=1.0 / rate)
    return float(freqs[int(np.argmax(spectrum))])


def rms(ulaw: bytes) -> float:
    pcm = ulaw_decode(ulaw).astype(np.float64)
    return float(np.sqrt(np.mean(pcm**2))) if pcm.size else 0.0


DTMF_LOW = (697, 770, 852, 941)
DTMF_HIGH = (1209, 1336, 1477, 1633)
DTMF_PAD = ("123A", "456B", "789C", "*0#D")


def _power(block: npt.NDArray[np.float64], hz: float, rate: int) -> float:
    """Goertzel: the power of ``block`` at ``hz``."""
    coeff = 2.0 * np.cos(2.0 * np.pi * hz / rate)
    s1 = s2 = 0.0
    for x in block:
        s1, s2 = x + coeff * s1 - s2, s1
    return float(s1 * s1 + s2 * s2 - coeff * s1 * s2)


def dtmf_keys(pcm: npt.NDArray[np.int16], rate: int = SAMPLE_RATE) -> str:
    """The DTMF keys in 16-bit audio, in order: a key is heard where, in 40 ms blocks, one
    low and one high tone each carry most of their group's power and a fair share of the
    block's; a key held over several blocks counts once."""
    size = rate // 25
    keys: list[str] = []
    last = ""
    for start in range(0, pcm.size - size + 1, size):
        block = pcm[start : start + size].astype(np.float64)
        total = float(np.sum(block**2)) * size / 2 or 1.0
        low = [_power(block, hz, rate) for hz in DTMF_LOW]
        high = [_power(block, hz, rate) for hz in DTMF_HIGH]
        li, hi = int(np.argmax(low)), int(np.argmax(high))
        strong = low[li] > 0.2 * total and high[hi] > 0.2 * total
        clear = low[li] > 4 * sorted(low)[-2] and high[hi] > 4 * sorted(high)[-2]
        key = DTMF_PAD[li][hi] if strong and clear else ""
        if key and key != last:
            keys.append(key)
        last = key
    return "".join(keys)


def dtmf_keys_ulaw(ulaw: bytes) -> str:
    return dtmf_keys(ulaw_decode(ulaw))
