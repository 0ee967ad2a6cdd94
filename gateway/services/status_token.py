"""The status token of a call's ticket: handed to the customer, stored only as a hash (a
leaked store does not open anyone's ticket).

A call's token is derived from the node's signing secret and the call id, so every node
makes the same one and can put the ticket's link in a later text (a reminder, a late
notice) without the store ever holding it. A share link's token is random: it is shown
once, and turning sharing off and on again must make a new one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from gateway.settings.model import AuthSettings

TICKET_LABEL = b"membrane/ticket-status-token/v1"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_status_token() -> tuple[str, str]:
    """A random token to hand out once, and its hash to store."""
    token = secrets.token_urlsafe(24)
    return token, hash_token(token)


class StatusTokens:
    def __init__(self, key_material: str) -> None:
        if not key_material:
            # A key anyone can guess would open every ticket.
            raise ValueError("status tokens need the node's signing secret or key")
        # Its own key, so a status token can never stand in for anything else made with
        # the root key (gateway/edge/visitor_identity.py derives its keys the same way).
        self._key = hmac.new(key_material.encode(), TICKET_LABEL, hashlib.sha256).digest()

    @classmethod
    def from_auth(cls, auth: AuthSettings) -> StatusTokens:
        return cls(auth.secret or auth.private_key_pem)

    def for_call(self, call_id: str) -> tuple[str, str]:
        """The call's status token (32 URL-safe characters, 192 bits), and its hash."""
        digest = hmac.new(self._key, call_id.encode(), hashlib.sha256).digest()[:24]
        token = base64.urlsafe_b64encode(digest).decode()
        return token, hash_token(token)
