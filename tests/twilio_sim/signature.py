"""``X-Twilio-Signature`` (tests/twilio_sim/spec/WEBHOOKS.md section 2).

The simulator signs with the real SDK (:func:`sdk_signature`); :func:`twilio_signature` is an
independent stdlib implementation used to cross-check the SDK against the known-answer vectors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from multidict import MultiDict
from twilio.request_validator import RequestValidator

SIGNATURE_HEADER = "X-Twilio-Signature"


def twilio_signature(
    auth_token: str, url: str, params: Mapping[str, Sequence[str]] | None = None
) -> str:
    """HMAC-SHA1 over ``url`` + sorted ``name+value`` pairs, base64 (stdlib only)."""
    data = url
    for name in sorted(params or {}):
        for value in sorted(set((params or {})[name])):
            data += name + value
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def sdk_signature(auth_token: str, url: str, params: Sequence[tuple[str, str]] = ()) -> str:
    """The signature as ``twilio.request_validator.RequestValidator`` computes it."""
    validator = RequestValidator(auth_token)
    multi: MultiDict[str] = MultiDict(params)
    return str(validator.compute_signature(url, multi if params else {}))


def body_sha256(body: bytes) -> str:
    """Lower-case hex SHA-256 used as the ``bodySHA256`` query parameter for JSON bodies."""
    return hashlib.sha256(body).hexdigest()
