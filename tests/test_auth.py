"""JWT minting and verification (gateway/edge/auth.py).

Keys are generated in the test with ``cryptography``; asymmetric own keys and outside-issuer
keys are loaded the way an operator configures them, through ``load_settings`` and a TOML
file. The JWKS document is served by a real aiohttp server on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from conftest import replace
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.core.errors import DomainError
from gateway.core.model import Agent, Role, Site
from gateway.edge.auth import (
    AGENT_ROLES,
    AUDIENCE,
    MAX_TOKEN_CHARS,
    OWN_KID,
    SUPERVISOR_ROLES,
    VISITOR_ROLES,
    Claims,
    TokenService,
    bearer_token,
    check_configured_role,
)
from gateway.edge.errors import http_status
from gateway.settings import AuthSettings, load_settings

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
OTHER_SECRET = "another-secret-0123456789-abcdefghijklmnopqrstu"
ISSUER = "membrane-test"
HS = AuthSettings(issuer=ISSUER, secret=SECRET)

# --- helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    private_pem: str
    public_pem: str
    private: Any


@cache
def rsa_pair(n: int = 0) -> KeyPair:
    """An RSA key; ``n`` tells distinct keys apart (cached: key generation is slow)."""
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@cache
def ec_pair(n: int = 0) -> KeyPair:
    return _pair(ec.generate_private_key(ec.SECP256R1()))


def _pair(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> KeyPair:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return KeyPair(private, public, key)


DROP = object()


def claims(**changes: Any) -> dict[str, Any]:
    """Good claims for an agent token, with ``changes`` (``DROP`` removes a claim)."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "anna",
        "site": "acme",
        "role": "agent",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 600,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


def sign(payload: dict[str, Any], key: Any = SECRET, alg: str = "HS256", kid: Any = OWN_KID) -> str:
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand, as an attacker would (pyjwt refuses to make these)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = (
        b""
        if hmac_key is None
        else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(signature)}"


async def refused(
    service: TokenService,
    token: object,
    roles: frozenset[Role] | None = None,
    code: str = "invalid_token",
) -> DomainError:
    with pytest.raises(DomainError) as caught:
        await service.verify(token, roles)
    status = {"invalid_token": 401, "forbidden": 403}[code]
    assert (caught.value.code, http_status(caught.value)) == (code, status), caught.value.message
    return caught.value


SITE_TOML = """
[[sites]]
id = "acme"
"""


def load_auth(tmp_path: Path, auth_toml: str) -> AuthSettings:
    """Auth settings from a config file in ``tmp_path`` (key files are relative to it)."""
    config = tmp_path / "membrane.toml"
    config.write_text(auth_toml + SITE_TOML)
    return load_settings(config, env={}).auth


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return name


# --- HS256 round trip -----------------------------------------------------------------------


async def test_mint_verify_round_trip() -> None:
    service = TokenService(HS)
    before = int(time.time())
    token, exp = service.mint("anna", "acme", Role.AGENT, ttl_s=600)
    claims_ = await service.verify(token)
    assert (claims_.sub, claims_.site, claims_.role) == ("anna", "acme", Role.AGENT)
    assert claims_.exp == exp and before + 600 <= exp <= int(time.time()) + 600
    assert claims_.jti is not None and len(claims_.jti) == 32
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"]) == ("HS256", OWN_KID)
    raw = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert raw["iss"] == ISSUER and raw["aud"] == "membrane" and raw["role"] == "agent"
    assert raw["exp"] - raw["iat"] == 600


async def test_every_token_gets_its_own_jti() -> None:
    service = TokenService(HS)
    first, _ = service.mint("anna", "acme", Role.AGENT, now=1000.0)
    second, _ = service.mint("anna", "acme", Role.AGENT, now=1000.0)
    assert first != second


def test_mint_expiry_from_now_and_default_ttls() -> None:
    service = TokenService(replace(HS, visitor_token_ttl_s=900, agent_token_ttl_s=43200))
    _, exp = service.mint("v1", "acme", Role.VISITOR, now=1000.9)
    assert exp == 1900.0
    _, exp = service.mint("anna", "acme", Role.AGENT, now=1000.0)
    assert exp == 44200.0
    _, exp = service.mint("sam", "acme", Role.SUPERVISOR, now=1000.0)
    assert exp == 44200.0
    _, exp = service.mint("v1", "acme", Role.VISITOR, ttl_s=5, now=1000.0)
    assert exp == 1005.0


@pytest.mark.parametrize("role", list(Role))
async def test_every_role_round_trips(role: Role) -> None:
    service = TokenService(HS)
    token, _ = service.mint("x", "acme", role)
    assert (await service.verify(token)).role is role


async def test_verify_accepts_a_token_from_an_equally_configured_node() -> None:
    token, _ = TokenService(HS).mint("anna", "acme", Role.AGENT)
    assert (await TokenService(HS).verify(token)).sub == "anna"


async def test_token_without_kid_uses_own_key() -> None:
    service = TokenService(HS)
    assert (await service.verify(sign(claims(), kid=None))).sub == "anna"


# --- roles ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "roles", "allowed"),
    [
        (Role.AGENT, AGENT_ROLES, True),
        (Role.SUPERVISOR, AGENT_ROLES, True),
        (Role.VISITOR, AGENT_ROLES, False),
        (Role.SUPERVISOR, SUPERVISOR_ROLES, True),
        (Role.AGENT, SUPERVISOR_ROLES, False),
        (Role.VISITOR, SUPERVISOR_ROLES, False),
        (Role.VISITOR, VISITOR_ROLES, True),
        (Role.AGENT, VISITOR_ROLES, False),
        (Role.SUPERVISOR, VISITOR_ROLES, False),
    ],
)
async def test_roles(role: Role, roles: frozenset[Role], allowed: bool) -> None:
    service = TokenService(HS)
    token, _ = service.mint("x", "acme", role)
    if allowed:
        assert (await service.verify(token, roles)).role is role
    else:
        error = await refused(service, token, roles, code="forbidden")
        assert role.value in error.message


ACME = Site(
    site_id="acme",
    name="Acme",
    allowed_origins=(),
    branches={},
    agents={
        "anna": Agent("anna", "acme", "Anna"),
        "sam": Agent("sam", "acme", "Sam", role=Role.SUPERVISOR),
    },
)


@pytest.mark.parametrize(
    ("sub", "role", "code"),
    [
        ("anna", Role.AGENT, None),
        ("sam", Role.SUPERVISOR, None),
        ("v_visitor", Role.VISITOR, None),
        ("anna", Role.SUPERVISOR, "role_mismatch"),
        ("sam", Role.AGENT, "role_mismatch"),
        ("anna", Role.VISITOR, "role_mismatch"),
        ("sam", Role.VISITOR, "role_mismatch"),
        ("mallory", Role.AGENT, "forbidden"),
        ("mallory", Role.SUPERVISOR, "forbidden"),
    ],
)
def test_the_configuration_decides_the_role(sub: str, role: Role, code: str | None) -> None:
    claims = Claims(sub=sub, site="acme", role=role, exp=0.0)
    if code is None:
        agent = check_configured_role(claims, ACME)
        assert (agent.role if agent else Role.VISITOR) is role
    else:
        with pytest.raises(DomainError) as refused_:
            check_configured_role(claims, ACME)
        assert (http_status(refused_.value), refused_.value.code) == (403, code)


async def test_bad_token_is_invalid_before_role_is_checked() -> None:
    service = TokenService(HS)
    await refused(service, sign(claims(role="visitor", aud="other")), AGENT_ROLES)


# --- claims ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"aud": "someone-else"}, id="wrong aud"),
        pytest.param({"aud": ["someone-else"]}, id="wrong aud list"),
        pytest.param({"iss": "membrane-evil"}, id="wrong iss"),
        pytest.param({"iss": "membrane"}, id="default iss when another is configured"),
        pytest.param({"exp": DROP}, id="missing exp"),
        pytest.param({"iat": DROP}, id="missing iat"),
        pytest.param({"sub": DROP}, id="missing sub"),
        pytest.param({"aud": DROP}, id="missing aud"),
        pytest.param({"iss": DROP}, id="missing iss"),
        pytest.param({"site": DROP}, id="missing site"),
        pytest.param({"role": DROP}, id="missing role"),
        pytest.param({"role": "admin"}, id="unknown role"),
        pytest.param({"role": "Agent"}, id="role wrong case"),
        pytest.param({"role": ["agent"]}, id="role not a string"),
        pytest.param({"sub": 42}, id="sub not a string"),
        pytest.param({"exp": "tomorrow"}, id="exp not a number"),
        pytest.param({"iat": "now"}, id="iat not a number"),
        pytest.param({"exp": int(time.time()) - 3600}, id="expired an hour ago"),
        pytest.param({"iat": int(time.time()) + 3600}, id="issued an hour from now"),
        pytest.param({"nbf": int(time.time()) + 3600}, id="not valid for an hour"),
    ],
)
async def test_bad_claims_are_invalid_token(changes: dict[str, Any]) -> None:
    service = TokenService(HS)
    # The same token with good claims passes: only the change makes it fail.
    assert (await service.verify(sign(claims()))).sub == "anna"
    await refused(service, sign(claims(**changes)))


async def test_expired_beyond_leeway_refused_within_leeway_accepted() -> None:
    service = TokenService(replace(HS, leeway_s=30))
    now = time.time()
    within, _ = service.mint("anna", "acme", Role.AGENT, ttl_s=60, now=now - 75)  # 15 s ago
    beyond, _ = service.mint("anna", "acme", Role.AGENT, ttl_s=60, now=now - 120)  # 60 s ago
    assert (await service.verify(within)).sub == "anna"
    error = await refused(service, beyond)
    assert "expired" in error.message


async def test_zero_leeway_refuses_a_just_expired_token() -> None:
    token = sign(claims(iat=int(time.time()) - 100, exp=int(time.time()) - 5))
    assert (await TokenService(replace(HS, leeway_s=30)).verify(token)).sub == "anna"
    await refused(TokenService(replace(HS, leeway_s=0)), token)


async def test_iat_slightly_in_the_future_is_within_leeway() -> None:
    service = TokenService(replace(HS, leeway_s=30))
    now = int(time.time())
    assert (await service.verify(sign(claims(iat=now + 10, exp=now + 600)))).sub == "anna"
    await refused(service, sign(claims(iat=now + 90, exp=now + 600)))


async def test_wrong_secret_and_tampering_refused() -> None:
    service = TokenService(HS)
    await refused(service, sign(claims(), key=OTHER_SECRET))
    token, _ = service.mint("anna", "acme", Role.AGENT)
    head, payload, signature = token.split(".")
    raw = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    raw["role"] = "supervisor"
    tampered = f"{head}.{b64(json.dumps(raw).encode())}.{signature}"
    await refused(service, tampered)
    # Flipping the signature's first character breaks it too.
    flipped = f"{head}.{payload}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
    await refused(service, flipped)


# --- algorithm attacks ----------------------------------------------------------------------


@pytest.mark.parametrize("kid", [OWN_KID, None, "anything"])
async def test_alg_none_refused(kid: str | None) -> None:
    service = TokenService(HS)
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    error = await refused(service, forge(header, claims(), None))
    assert error.message.startswith("invalid token")


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("alg", ["HS384", "HS512"])
async def test_other_hmac_algorithm_with_right_secret_refused(alg: str) -> None:
    await refused(TokenService(HS), sign(claims(), alg=alg))


async def test_hs256_token_signed_with_own_public_key_refused(tmp_path: Path) -> None:
    pair = rsa_pair()
    auth = load_auth(
        tmp_path,
        f'[auth]\nissuer = "{ISSUER}"\nalgorithm = "RS256"\n'
        f'private_key_file = "{write(tmp_path, "own.pem", pair.private_pem)}"\n',
    )
    service = TokenService(auth)
    # The attack: the public key is public, so sign an HS256 token with its PEM as secret.
    for kid in (OWN_KID, None):
        header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
        await refused(service, forge(header, claims(), pair.public_pem.encode()))
    # The real thing still works.
    token, _ = service.mint("anna", "acme", Role.AGENT)
    assert (await service.verify(token)).sub == "anna"


# --- asymmetric own keys --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "pair", "other"),
    [
        ("RS256", rsa_pair, rsa_pair),
        ("ES256", ec_pair, ec_pair),
    ],
)
async def test_asymmetric_own_key(tmp_path: Path, algorithm: str, pair: Any, other: Any) -> None:
    own: KeyPair = pair(0)
    stranger: KeyPair = other(1)
    name = write(tmp_path, "own-key.pem", own.private_pem)
    auth = load_auth(
        tmp_path,
        f'[auth]\nissuer = "{ISSUER}"\nalgorithm = "{algorithm}"\nprivate_key_file = "{name}"\n',
    )
    assert (auth.algorithm, auth.private_key_pem) == (algorithm, own.private_pem)
    service = TokenService(auth)
    token, _ = service.mint("sam", "acme", Role.SUPERVISOR)
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"]) == (algorithm, OWN_KID)
    # Anyone with the public key can check it, and it verifies on the node.
    jwt.decode(token, own.public_pem, algorithms=[algorithm], audience=AUDIENCE)
    claims_ = await service.verify(token, SUPERVISOR_ROLES)
    assert (claims_.sub, claims_.role) == ("sam", Role.SUPERVISOR)
    # The same claims signed by another key of the same kind are refused.
    await refused(service, sign(claims(), key=stranger.private, alg=algorithm))
    # As are the shared-secret tokens of an HS256 deployment.
    await refused(service, sign(claims()))


async def test_private_key_file_from_env(tmp_path: Path) -> None:
    pair = ec_pair()
    name = write(tmp_path, "from-env.pem", pair.private_pem)
    config = tmp_path / "m.toml"
    config.write_text(f'[auth]\nissuer = "{ISSUER}"\nalgorithm = "ES256"\n' + SITE_TOML)
    auth = load_settings(config, env={"MEMBRANE_JWT_PRIVATE_KEY_FILE": name}).auth
    service = TokenService(auth)
    token, _ = service.mint("anna", "acme", Role.AGENT)
    assert (await service.verify(token)).sub == "anna"


# --- outside issuers' keys, by kid ----------------------------------------------------------


@pytest.fixture
def idp_service(tmp_path: Path) -> TokenService:
    """Own HS256 key, plus an IdP's RS256 key ``idp-rsa`` and ES256 key ``idp-ec``."""
    rsa_pub = write(tmp_path, "idp-rsa.pub.pem", rsa_pair(2).public_pem)
    ec_pub = write(tmp_path, "idp-ec.pub.pem", ec_pair(2).public_pem)
    auth = load_auth(
        tmp_path,
        f'[auth]\nissuer = "{ISSUER}"\nsecret = "{SECRET}"\n'
        f'[[auth.keys]]\nkid = "idp-rsa"\nalgorithm = "RS256"\npublic_key_file = "{rsa_pub}"\n'
        f'[[auth.keys]]\nkid = "idp-ec"\nalgorithm = "ES256"\npublic_key_file = "{ec_pub}"\n',
    )
    assert [(k.kid, k.algorithm) for k in auth.extra_keys] == [
        ("idp-rsa", "RS256"),
        ("idp-ec", "ES256"),
    ]
    return TokenService(auth)


async def test_outside_issuer_tokens_accepted_by_kid(idp_service: TokenService) -> None:
    rsa_token = sign(claims(sub="ext-1"), key=rsa_pair(2).private, alg="RS256", kid="idp-rsa")
    ec_token = sign(claims(sub="ext-2"), key=ec_pair(2).private, alg="ES256", kid="idp-ec")
    assert (await idp_service.verify(rsa_token)).sub == "ext-1"
    assert (await idp_service.verify(ec_token)).sub == "ext-2"
    # Own tokens keep working beside them.
    own, _ = idp_service.mint("anna", "acme", Role.AGENT)
    assert (await idp_service.verify(own)).sub == "anna"


async def test_outside_issuer_tokens_still_need_the_claims(idp_service: TokenService) -> None:
    key = rsa_pair(2).private
    await refused(idp_service, sign(claims(iss="idp"), key=key, alg="RS256", kid="idp-rsa"))
    await refused(idp_service, sign(claims(aud="x"), key=key, alg="RS256", kid="idp-rsa"))
    await refused(idp_service, sign(claims(role=DROP), key=key, alg="RS256", kid="idp-rsa"))


async def test_outside_key_algorithm_is_pinned(idp_service: TokenService) -> None:
    # kid idp-rsa is pinned to RS256: an ES256 token naming it is refused, even if valid for
    # some other key, and so is one signed with the IdP's EC key under the RSA kid.
    await refused(idp_service, sign(claims(), key=ec_pair(2).private, alg="ES256", kid="idp-rsa"))
    await refused(idp_service, sign(claims(), key=rsa_pair(2).private, alg="RS256", kid="idp-ec"))
    # RS512 with the right RSA key: still not the pinned algorithm.
    await refused(idp_service, sign(claims(), key=rsa_pair(2).private, alg="RS512", kid="idp-rsa"))
    # HS256 signed with the public PEM as the secret (algorithm confusion).
    for kid, pem in (("idp-rsa", rsa_pair(2).public_pem), ("idp-ec", ec_pair(2).public_pem)):
        header = {"alg": "HS256", "typ": "JWT", "kid": kid}
        await refused(idp_service, forge(header, claims(), pem.encode()))
    # alg none under an outside kid.
    await refused(idp_service, forge({"alg": "none", "kid": "idp-rsa"}, claims(), None))


async def test_outside_key_under_unknown_or_own_kid_refused(idp_service: TokenService) -> None:
    key = rsa_pair(2).private
    await refused(idp_service, sign(claims(), key=key, alg="RS256", kid="idp-unknown"))
    await refused(idp_service, sign(claims(), key=key, alg="RS256", kid=OWN_KID))
    await refused(idp_service, sign(claims(), key=key, alg="RS256", kid=None))
    # A token naming an outside kid but signed with the own secret is checked against the
    # outside key, not the own one.
    await refused(idp_service, sign(claims(), key=SECRET, alg="HS256", kid="idp-rsa"))


# --- JWKS -----------------------------------------------------------------------------------


@dataclass
class JwksServer:
    url: str = ""
    document: Any = field(default_factory=lambda: {"keys": []})
    raw: str | None = None
    hits: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.raw is not None:
            return web.Response(text=self.raw, content_type="application/json")
        return web.json_response(self.document)


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/.well-known/jwks.json"
    yield server
    await runner.cleanup()


def jwk(public_key: Any, kid: str, alg: str | None) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        data = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
    data["kid"] = kid
    if alg is not None:
        data["alg"] = alg
    return data


def jwks_service(server: JwksServer) -> TokenService:
    return TokenService(AuthSettings(issuer=ISSUER, secret=SECRET, jwks_url=server.url))


async def test_jwks_token_verified(jwks: JwksServer) -> None:
    rsa_key, ec_key = rsa_pair(3).private, ec_pair(3).private
    jwks.document = {
        "keys": [
            jwk(rsa_key.public_key(), "k-rsa", "RS256"),
            jwk(ec_key.public_key(), "k-ec", None),  # alg derived from the P-256 curve
        ]
    }
    service = jwks_service(jwks)
    token = sign(claims(sub="ext-rsa"), key=rsa_key, alg="RS256", kid="k-rsa")
    assert (await service.verify(token)).sub == "ext-rsa"
    assert jwks.hits == 1
    token = sign(claims(sub="ext-ec"), key=ec_key, alg="ES256", kid="k-ec")
    assert (await service.verify(token, AGENT_ROLES)).sub == "ext-ec"
    # The document is cached: the second key came from the first fetch.
    assert jwks.hits == 1
    # Own tokens are not sent to the JWKS.
    own, _ = service.mint("anna", "acme", Role.AGENT)
    assert (await service.verify(own)).sub == "anna"
    assert jwks.hits == 1


async def test_jwks_refusals(jwks: JwksServer) -> None:
    rsa_key = rsa_pair(3).private
    jwks.document = {"keys": [jwk(rsa_key.public_key(), "k-rsa", "RS256")]}
    service = jwks_service(jwks)
    good = sign(claims(), key=rsa_key, alg="RS256", kid="k-rsa")
    assert (await service.verify(good)).sub == "anna"
    # Unknown kid.
    error = await refused(service, sign(claims(), key=rsa_key, alg="RS256", kid="k-unknown"))
    assert "unknown signing key" in error.message
    # Right kid, wrong key.
    await refused(service, sign(claims(), key=rsa_pair(4).private, alg="RS256", kid="k-rsa"))
    # Right kid, other algorithm / confusion / none.
    await refused(service, sign(claims(), key=rsa_key, alg="RS512", kid="k-rsa"))
    pem = rsa_pair(3).public_pem.encode()
    await refused(service, forge({"alg": "HS256", "kid": "k-rsa"}, claims(), pem))
    await refused(service, forge({"alg": "none", "kid": "k-rsa"}, claims(), None))
    # Claims still checked.
    await refused(service, sign(claims(iss="idp"), key=rsa_key, alg="RS256", kid="k-rsa"))


async def test_jwks_symmetric_key_not_allowed(jwks: JwksServer) -> None:
    shared = b"jwks-published-shared-secret-0123456789"
    jwks.document = {"keys": [{"kty": "oct", "kid": "k-oct", "alg": "HS256", "k": b64(shared)}]}
    service = jwks_service(jwks)
    error = await refused(service, sign(claims(), key=shared, alg="HS256", kid="k-oct"))
    assert "algorithm not allowed" in error.message


async def test_jwks_unreachable_is_invalid_token() -> None:
    service = TokenService(
        AuthSettings(issuer=ISSUER, secret=SECRET, jwks_url="http://127.0.0.1:9/jwks.json")
    )
    await refused(service, sign(claims(), key=rsa_pair(3).private, alg="RS256", kid="k"))


# PyJWKClient raises more than PyJWKClientError: PyJWKSetError for a set with no usable keys,
# JSONDecodeError for a body that is not JSON, OSError from the network. Each must be a 401
# invalid_token, never escape verify() (the REST edge would answer 500 'internal').


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"keys": []}, id="empty key set"),
        pytest.param({"keys": [{"kty": "RSA", "kid": "k"}]}, id="no usable key"),
    ],
)
async def test_jwks_without_usable_keys_is_invalid_token(
    jwks: JwksServer, document: dict[str, Any]
) -> None:
    jwks.document = document
    token = sign(claims(), key=rsa_pair(3).private, alg="RS256", kid="k")
    await refused(jwks_service(jwks), token)


async def test_jwks_not_json_is_invalid_token(jwks: JwksServer) -> None:
    jwks.raw = "<html>maintenance</html>"
    token = sign(claims(), key=rsa_pair(3).private, alg="RS256", kid="k")
    await refused(jwks_service(jwks), token)


@pytest.mark.parametrize(
    "error", [OSError("connection reset"), TimeoutError(), ValueError("bad key")]
)
async def test_jwks_other_failures_are_invalid_token(
    jwks: JwksServer, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    service = jwks_service(jwks)

    def fail(token: str) -> Any:
        raise error

    monkeypatch.setattr(service._jwks, "get_signing_key_from_jwt", fail)
    await refused(service, sign(claims(), key=rsa_pair(3).private, alg="RS256", kid="k"))


async def test_jwks_not_an_object_is_invalid_token(jwks: JwksServer) -> None:
    jwks.raw = "[1, 2]"
    token = sign(claims(), key=rsa_pair(3).private, alg="RS256", kid="k")
    await refused(jwks_service(jwks), token)
    assert jwks.hits >= 1


# --- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "a.b",
        "....",
        "!!!.!!!.!!!",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        "eyJhbGciOiJIUzI1NiJ9.e30.",
        "e30.e30.e30",
        "W10.e30.",
        "Bearer x.y.z",
        " " * 10,
        "\x00.\x00.\x00",
    ],
)
async def test_garbage_tokens_are_invalid_token(token: str) -> None:
    await refused(TokenService(HS), token)


@pytest.mark.parametrize("token", [None, 0, 123, 1.5, True, b"x.y.z", ["a.b.c"], {"t": 1}])
async def test_non_string_tokens_are_invalid_token(token: object) -> None:
    await refused(TokenService(HS), token)


@pytest.mark.parametrize("kid", [[], ["membrane"], {"k": 1}, 7, None])
async def test_odd_kid_header_is_invalid_token(kid: Any) -> None:
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    token = forge(header, claims(), SECRET.encode())
    await refused(TokenService(HS), token)


async def test_non_string_bytes_token_with_valid_signature_refused() -> None:
    token = sign(claims())
    service = TokenService(HS)
    assert (await service.verify(token)).sub == "anna"
    await refused(service, token.encode())


def padded(pad: int) -> str:
    return sign(claims(pad="p" * pad))


async def test_oversized_tokens_refused_at_the_limit() -> None:
    service = TokenService(HS)
    # The longest valid token within the limit passes; the shortest one past it does not.
    by_length = {len(padded(n)): padded(n) for n in range(5800, 6300)}
    fits = max(length for length in by_length if length <= MAX_TOKEN_CHARS)
    over = min(length for length in by_length if length > MAX_TOKEN_CHARS)
    assert MAX_TOKEN_CHARS - 2 <= fits and over <= MAX_TOKEN_CHARS + 2
    assert (await service.verify(by_length[fits])).sub == "anna"
    error = await refused(service, by_length[over])
    assert error.message == "missing or invalid token"
    await refused(service, padded(100_000))


# --- bearer_token ---------------------------------------------------------------------------


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("Bearer  abc.def.ghi  ") == "abc.def.ghi"
    for bad in (None, "", "abc.def.ghi", "Basic dXNlcjpwYXNz", "bearer abc", "Bearer"):
        with pytest.raises(DomainError) as caught:
            bearer_token(bad)
        assert (caught.value.code, http_status(caught.value)) == ("invalid_token", 401)
