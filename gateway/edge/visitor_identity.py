"""Who a visitor is: a returning visitor proves their id with the secret the gateway gave them.

A visitor id is no secret: agents and supervisors see it in rings and on the board, and it
names the visitor's live call. Whoever holds a visitor token for an id takes that visitor's
live call over on connect (a reconnect after a blip looks exactly like that), so the bare id
must never buy a session. With a new id the gateway also hands out a ``visitor_secret``, an
HMAC of site and id under a key derived from the node's own token-signing key; a session
request keeps an id only when it comes with that secret.

Every node of a gateway signs with the same key (they verify each other's tokens), so each
recognises the secrets any other issued, and nothing is stored. Changing the signing key
makes every visitor new: they lose their sticky agent, nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from gateway.settings import AuthSettings

SECRET_LABEL = b"membrane/visitor-secret/v1"
TURN_LABEL = b"membrane/turn-username/v1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_visitor_id() -> str:
    """A fresh id (``v_`` and 24 URL-safe characters, 144 random bits)."""
    return "v_" + secrets.token_urlsafe(18)


class VisitorIdentity:
    """Issues and checks visitor secrets, and names visitors where their id must not show."""

    def __init__(self, key_material: str) -> None:
        if not key_material:
            # A key anyone can guess would let anyone prove any visitor id.
            raise ValueError("visitor secrets need the node's signing secret or key")
        root = key_material.encode()
        # One derived key per use, so a visitor secret can never stand in for a TURN name,
        # a token signature or anything else made with the root key.
        self._secret_key = hmac.new(root, SECRET_LABEL, hashlib.sha256).digest()
        self._turn_key = hmac.new(root, TURN_LABEL, hashlib.sha256).digest()

    @classmethod
    def from_auth(cls, auth: AuthSettings) -> VisitorIdentity:
        return cls(auth.secret or auth.private_key_pem)

    def secret(self, site: str, visitor_id: str) -> str:
        """The secret that proves ``visitor_id`` on ``site`` (43 URL-safe characters)."""
        message = f"{site}\n{visitor_id}".encode()
        return _b64(hmac.new(self._secret_key, message, hashlib.sha256).digest())

    def identify(self, site: str, visitor_id: str | None, secret: str | None) -> str | None:
        """``visitor_id`` if ``secret`` proves it on ``site``; else None (a new visitor)."""
        if visitor_id is None or secret is None:
            return None
        # Compared as bytes: compare_digest takes str only when it is ASCII.
        proven = hmac.compare_digest(
            self.secret(site, visitor_id).encode(), secret.encode("utf-8", "replace")
        )
        return visitor_id if proven else None

    def turn_name(self, site: str, visitor_id: str) -> str:
        """A stable pseudonym for the TURN username, which coturn logs and relays carry:
        the operator can tell one visitor's relays apart without learning the id."""
        message = f"{site}\n{visitor_id}".encode()
        return "v-" + _b64(hmac.new(self._turn_key, message, hashlib.sha256).digest()[:12])
