"""JWT minting and verification (pyjwt).

Each key has one pinned algorithm: a token is checked only with the algorithm of the key it
names, so an ``alg: none`` or an HS256 token signed with a public key is refused. ``exp``,
``iat``, ``aud`` and ``iss`` are required and checked, with bounded clock skew.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.core.errors import Forbidden, Unauthenticated
from gateway.core.model import Agent, Role, Site
from gateway.settings import AuthSettings

log = logging.getLogger(__name__)

AUDIENCE = "membrane"
OWN_KID = "membrane"
MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    site: str
    role: Role
    exp: float
    jti: str | None = None


class TokenService:
    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._own_key: Any = settings.secret
        self._own_verify_key: Any = settings.secret
        if settings.algorithm != "HS256":
            private = jwt.algorithms.get_default_algorithms()[settings.algorithm]
            self._own_key = private.prepare_key(settings.private_key_pem)  # type: ignore[attr-defined]
            self._own_verify_key = self._own_key.public_key()
        self._extra = {k.kid: k for k in settings.extra_keys}
        self._jwks = (
            jwt.PyJWKClient(settings.jwks_url, cache_keys=True) if settings.jwks_url else None
        )

    @property
    def leeway_s(self) -> int:
        return self._settings.leeway_s

    def mint(
        self,
        sub: str,
        site: str,
        role: Role,
        ttl_s: int | None = None,
        now: float | None = None,
    ) -> tuple[str, float]:
        """A signed token for ``sub`` and its expiry time."""
        issued = time.time() if now is None else now
        if ttl_s is None:
            s = self._settings
            ttl_s = s.visitor_token_ttl_s if role is Role.VISITOR else s.agent_token_ttl_s
        exp = int(issued) + ttl_s
        claims = {
            "sub": sub,
            "site": site,
            "role": role.value,
            "aud": AUDIENCE,
            "iss": self._settings.issuer,
            "iat": int(issued),
            "exp": exp,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(
            claims, self._own_key, algorithm=self._settings.algorithm, headers={"kid": OWN_KID}
        )
        return token, float(exp)

    async def verify(self, token: object, roles: frozenset[Role] | None = None) -> Claims:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        kid = header.get("kid")
        key: Any
        if kid in self._extra:
            key, algorithm = self._extra[kid].public_key_pem, self._extra[kid].algorithm
        elif self._jwks is not None and isinstance(kid, str) and kid != OWN_KID:
            key, algorithm = await self._jwks_key(token)
        else:
            key, algorithm = self._own_verify_key, self._settings.algorithm
        try:
            try:
                raw = self._decode(token, key, algorithm)
            except jwt.InvalidSignatureError:
                previous = self._settings.previous_secret
                if not (previous and key is self._own_verify_key and algorithm == "HS256"):
                    raise
                # Rotating the secret: tokens signed before still hold until they expire.
                raw = self._decode(token, previous, algorithm)
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        try:
            claims = Claims(
                sub=str(raw["sub"]),
                site=str(raw["site"]),
                role=Role(raw["role"]),
                exp=float(raw["exp"]),
                jti=raw.get("jti"),
            )
        except (KeyError, ValueError):
            raise Unauthenticated("token lacks site or role") from None
        if roles is not None and claims.role not in roles:
            raise Forbidden(f"role {claims.role.value} may not do this")
        return claims

    def _decode(self, token: str, key: Any, algorithm: str) -> dict[str, Any]:
        found: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=AUDIENCE,
            issuer=self._settings.issuer,
            leeway=self._settings.leeway_s,
            options={"require": ["exp", "iat", "aud", "iss", "sub"]},
        )
        return found

    async def _jwks_key(self, token: str) -> tuple[Any, str]:
        assert self._jwks is not None
        try:
            # PyJWKClient fetches with blocking urllib; keep it off the event loop.
            signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientError as e:
            raise Unauthenticated(f"unknown signing key: {e}") from None
        except Exception as e:
            # The JWKS is a remote document: a set with no usable keys (PyJWKSetError), a body
            # that is not JSON (JSONDecodeError), a dropped connection (OSError) or anything
            # else it can make pyjwt raise means this token cannot be verified: a 401, not 500.
            log.warning("JWKS %s unusable: %s: %s", self._settings.jwks_url, type(e).__name__, e)
            raise Unauthenticated("signing keys unavailable") from None
        algorithm = signing_key.algorithm_name
        if algorithm not in ("RS256", "ES256"):
            raise Unauthenticated("JWKS key algorithm not allowed")
        return signing_key.key, algorithm


def bearer_token(header: str | None) -> str:
    if not header or not header.startswith("Bearer "):
        raise Unauthenticated("send Authorization: Bearer <token>")
    return header[len("Bearer ") :].strip()


def check_configured_role(claims: Claims, site: Site) -> Agent | None:
    """Refuse a token whose role the site's configuration contradicts.

    Roles come from the configuration: a token is only a claim, and whoever can mint one
    (an outside issuer by ``kid``, a leaked signing tool) must not promote an agent to
    supervisor, nor pass a configured agent or supervisor off as a visitor. Returns the
    configured agent, or None for a visitor. An agent token naming nobody the site
    configured stays ``forbidden``.
    """
    agent = site.agents.get(claims.sub)
    if claims.role is Role.VISITOR:
        if agent is not None:
            raise role_mismatch(claims.sub, agent.role, claims.role)
        return None
    if agent is None:
        raise Forbidden(f"{claims.sub!r} is not an agent of site {site.site_id!r}")
    if agent.role is not claims.role:
        raise role_mismatch(claims.sub, agent.role, claims.role)
    return agent


def role_mismatch(sub: str, configured: Role, claimed: Role) -> Forbidden:
    return Forbidden(
        f"{sub!r} is configured as {configured.value}, but the token says {claimed.value}",
        code="role_mismatch",
    )


AGENT_ROLES = frozenset({Role.AGENT, Role.SUPERVISOR})
SUPERVISOR_ROLES = frozenset({Role.SUPERVISOR})
VISITOR_ROLES = frozenset({Role.VISITOR})

__all__ = [
    "AGENT_ROLES",
    "SUPERVISOR_ROLES",
    "VISITOR_ROLES",
    "Claims",
    "TokenService",
    "bearer_token",
    "check_configured_role",
]
