"""ICE servers for a browser session, with TURN credentials in coturn's time-limited scheme.

coturn (``use-auth-secret``) accepts the username ``<expiry>:<user>`` with the password
``base64(HMAC-SHA1(static-auth-secret, username))`` until the expiry: nothing per session is
stored anywhere, and a leaked credential dies on its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from gateway.settings import WebRTCSettings


def turn_credential(secret: str, user: str, expires_at: int) -> tuple[str, str]:
    username = f"{expires_at}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers(settings: WebRTCSettings, user: str, now: float) -> list[dict[str, Any]]:
    servers: list[dict[str, Any]] = []
    if settings.stun_urls:
        servers.append({"urls": list(settings.stun_urls)})
    if settings.turn_urls:
        username, credential = turn_credential(
            settings.turn_secret, user, int(now) + settings.turn_ttl_s
        )
        servers.append(
            {"urls": list(settings.turn_urls), "username": username, "credential": credential}
        )
    return servers
