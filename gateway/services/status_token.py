"""The status token of a call's ticket: handed to the customer once, stored only as a hash
(a leaked store does not open anyone's ticket)."""

from __future__ import annotations

import hashlib
import secrets


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_status_token() -> tuple[str, str]:
    """A status token to hand out once, and its hash to store."""
    token = secrets.token_urlsafe(24)
    return token, hash_token(token)
