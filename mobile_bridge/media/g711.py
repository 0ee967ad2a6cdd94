"""G.711 mu-law, both ways, on numpy arrays (ITU-T G.711: bias 0x84, clip at 32635)."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt


def encode(pcm: npt.NDArray[np.int16]) -> bytes:
    """Mu-law bytes of 16-bit samples."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    encoded: bytes = (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()
    return encoded


def _decode_table() -> npt.NDArray[np.int16]:
    b = (~np.arange(256, dtype=np.int32)) & 0xFF
    magnitude = ((((b & 0x0F) << 3) + 0x84) << ((b >> 4) & 0x07)) - 0x84
    return np.where(b & 0x80, -magnitude, magnitude).astype(np.int16)


DECODE: Final = _decode_table()


def decode(data: bytes) -> npt.NDArray[np.int16]:
    """16-bit samples of mu-law bytes."""
    return DECODE[np.frombuffer(data, dtype=np.uint8)]
