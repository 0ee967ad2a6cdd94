"""The settings model: one msgspec Struct per section, each default written once, here.

``load_settings`` (gateway/settings/load.py) decodes the TOML tables straight into these
structs, so a key left out of the file takes the default below; the example config
(deploy/membrane.example.toml) and the demo (gateway/demo.toml) are held to them by
tests/test_settings.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec

from gateway.core.admission import AdmissionLimits
from gateway.core.model import Site
from gateway.ops.access_log import AccessLogMode
from gateway.ops.logs import LogFormat


class VerifyKey(msgspec.Struct, frozen=True):
    """A key that tokens from an outside issuer (an IdP) may be signed with."""

    kid: str
    algorithm: str
    """Pinned algorithm: RS256 or ES256. A token claiming another one is refused."""
    public_key_pem: str


class VerifyKeyFile(msgspec.Struct, frozen=True):
    """An ``[[auth.keys]]`` entry as written: its key is read from ``public_key_file``."""

    kid: str = ""
    algorithm: str = ""
    public_key_file: str = ""


class AuthSettings(msgspec.Struct, frozen=True):
    issuer: str = "membrane"
    """The ``iss`` claim Membrane puts in the tokens it mints and demands of all tokens."""
    algorithm: str = "HS256"
    """Algorithm of Membrane's own signing key: HS256 (shared secret) or RS256/ES256."""
    secret: str = ""
    """HS256 shared secret (``MEMBRANE_JWT_SECRET``); at least 32 characters."""
    private_key_pem: str = ""
    """PEM private key when ``algorithm`` is RS256 or ES256 (read from ``private_key_file``)."""
    extra_keys: tuple[VerifyKey, ...] = ()
    """Public keys of outside issuers, matched by the token's ``kid`` (from ``keys``)."""
    jwks_url: str = ""
    """A JWKS document of an outside issuer, fetched and cached (RS256/ES256 only)."""
    leeway_s: int = 30
    """Clock skew tolerated on ``exp``/``iat``/``nbf``; bounded to at most 120 s."""
    visitor_token_ttl_s: int = 900
    agent_token_ttl_s: int = 12 * 3600
    previous_secret: str = ""
    """While rotating the HS256 secret: the one before, still accepted on tokens it signed
    until they expire, never used to sign (``MEMBRANE_JWT_PREVIOUS_SECRET``)."""


class AuthFiles(msgspec.Struct, frozen=True):
    """The ``[auth]`` keys that name files, read into ``AuthSettings`` when loading."""

    private_key_file: str = ""
    keys: tuple[VerifyKeyFile, ...] = ()


class PresenceSettings(msgspec.Struct, frozen=True):
    device_ttl_s: float = 60.0
    """A REST device (IM bridge, mobile app) goes offline unless it heartbeats within this."""
    socket_ttl_s: float = 15.0
    """A desktop socket's device lease; its node renews it, so a dead node's agents lapse."""
    sweep_interval_s: float = 0.25
    """How often each node looks for lapsed devices (lapses are reported within TTL + this)."""
    sms_lease_s: float = 8 * 3600.0
    """How long an agent's ``IN`` by SMS lasts when their branch gives no closing time (no
    branch, closed now, or open around the clock); with one, it lasts until the branch closes."""
    im_ttl_s: float = 12 * 3600.0
    """The lease of an ``im`` device set through the IM presence webhook; the integration
    renews it by posting the agent's state again (the XMPP bridge does every hour)."""
    im_webhook_rate: float = 50.0
    """IM presence webhook requests a second per site per node, on average."""
    im_webhook_burst: float = 200.0
    """IM presence webhook requests per site per node in a burst."""


class WebRTCSettings(msgspec.Struct, frozen=True):
    stun_urls: tuple[str, ...] = ()
    """STUN servers handed to browsers, e.g. ``stun:stun.example.com:3478``."""
    turn_urls: tuple[str, ...] = ()
    """TURN servers (coturn with ``use-auth-secret``); credentials are minted per session."""
    turn_secret: str = ""
    """coturn's ``static-auth-secret`` (``MEMBRANE_TURN_SECRET``)."""
    turn_ttl_s: int = 3600
    """How long minted TURN credentials stay valid."""


class TwilioSettings(msgspec.Struct, frozen=True):
    account_sid: str = ""
    """``MEMBRANE_TWILIO_ACCOUNT_SID``; empty means no PSTN calls (browser calls only)."""
    auth_token: str = ""
    """``MEMBRANE_TWILIO_AUTH_TOKEN``; also the key that webhook signatures are checked with."""
    api_base_url: str = ""
    """Only to point the SDK at a local Twilio simulator in tests; empty for Twilio itself."""
    previous_auth_token: str = ""
    """While rotating the auth token: the one before, whose webhook signatures are still
    accepted (``MEMBRANE_TWILIO_PREVIOUS_AUTH_TOKEN``)."""

    @property
    def enabled(self) -> bool:
        return bool(self.account_sid and self.auth_token)


class MediaSettings(msgspec.Struct, frozen=True):
    """The audio bridge's media workers (mobile_bridge/media): processes this node starts
    and supervises, which carry a browser visitor's audio to an agent's phone."""

    workers: int = 0
    """How many worker processes this node runs; 0: no bridge (browser calls reach only
    agents in the agent app). Needs Twilio."""
    max_sessions: int = 30
    """Bridged calls per worker: a worker past it refuses (docs/ARCHITECTURE.md, "Sizing
    workers")."""
    host: str = "127.0.0.1"
    """Where workers listen: the node, and every other node, must reach them here."""
    base_port: int = 0
    """Worker ``i`` listens on ``base_port + i``; 0: free ports chosen at start."""
    public_ws_url: str = ""
    """Where Twilio reaches worker ``{port}`` (its Media Stream websocket), e.g.
    ``wss://media.example.com/{port}`` behind a proxy; empty: ``ws://{host}:{port}``."""
    realtime: bool = True
    """Run workers under the kernel's real-time round-robin policy (``SCHED_RR``, priority
    10), as audio servers do, so that no ordinary process on their core (a node, a database,
    a backup) holds a frame up; where the node may not (not root, no ``CAP_SYS_NICE``), it
    says so once and workers run as ordinary processes."""

    def public_url_of(self, port: int) -> str:
        template = self.public_ws_url or f"ws://{self.host}:{{port}}"
        return template.replace("{port}", str(port)).rstrip("/")


class LoadLimits(msgspec.Struct, frozen=True):
    """``[server]``'s load-shedding keys as written; absent ones keep ``AdmissionLimits``'
    defaults (gateway/core/admission.py), where they are written."""

    max_loop_lag_ms: float | None = None
    max_starting_calls: int | None = None
    max_start_ms: float | None = None


class Settings(msgspec.Struct, frozen=True):
    """Everything a node is configured with. The scalar fields are the ``[server]`` table."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    """The URL clients and Twilio reach this gateway at (behind a proxy, the proxy's). When
    loading, empty or absent means ``http://{host}:{port}``."""
    data_dir: Path = Path("data")
    """Where the embedded store keeps its SQLite file (and a generated dev secret)."""
    redis_url: str = ""
    """Empty: one node on the embedded store. Set: many nodes sharing this Redis."""
    history_url: str = ""
    """The call history's PostgreSQL database (``MEMBRANE_HISTORY_URL``,
    ``postgresql://user:password@host/db``), which nodes sharing Redis share too. Empty: one
    node keeps its history in SQLite beside its embedded store; nodes sharing Redis keep
    none (gateway/store/history.py)."""
    node_id: str = ""
    """Names this node in logs and metrics; random when empty."""
    gc_pacer: bool = True
    """Garbage collection on a clock, survivors frozen (gateway/ops/gc_pacer.py), on the Python
    versions it was measured on; ``MEMBRANE_GC_PACER=false`` leaves CPython's own schedule."""
    max_body_bytes: int = 64 * 1024
    """Largest REST body or socket.io message accepted."""
    access_log: AccessLogMode = AccessLogMode.SAMPLED
    """``sampled``: every API request, one in ``access_log_sample_every`` to the hot and
    public paths (gateway/ops/access_log.py); ``all``; or ``off`` (server errors still are)."""
    access_log_sample_every: int = 100
    retention_days: float = 90.0
    """Ended calls, with the customer's number and everything else about them, are deleted
    once unchanged this long (``MEMBRANE_RETENTION_DAYS``; gateway/services/retention.py)."""
    drain_grace_s: float = 10.0
    """On SIGTERM the node drains (unready, refuses new work, sends its sockets elsewhere,
    hands its timers over) and exits within this many seconds (``MEMBRANE_DRAIN_GRACE_S``)."""
    log_format: LogFormat = LogFormat.TEXT
    """``text`` for a terminal, ``json`` for a log collector: one object a line, with the
    node, and the call and site on every line about a call (``MEMBRANE_LOG_FORMAT``;
    gateway/ops/logs.py)."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks (CIDR) of the reverse proxies in front of the node. A request
    from one of them is taken to come from the address it names in ``X-Forwarded-For``;
    from anywhere else the header is ignored (``MEMBRANE_TRUSTED_PROXIES``, comma-separated)."""
    web_client_dir: str = ""
    """The widget, agent app, board and pages to serve (``MEMBRANE_WEB_CLIENT_DIR``). Empty:
    ``web_client/`` of the checkout the gateway runs from; an installed gateway (the image,
    deploy/install.sh) names the copy it installed."""
    admission: AdmissionLimits = msgspec.field(default_factory=AdmissionLimits)
    """When new calls are shed as ``overloaded`` (``server.max_loop_lag_ms``,
    ``server.max_starting_calls``, ``server.max_start_ms``; docs/ARCHITECTURE.md, "Load
    shedding")."""
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    presence: PresenceSettings = msgspec.field(default_factory=PresenceSettings)
    webrtc: WebRTCSettings = msgspec.field(default_factory=WebRTCSettings)
    twilio: TwilioSettings = msgspec.field(default_factory=TwilioSettings)
    media: MediaSettings = msgspec.field(default_factory=MediaSettings)
    sites: Mapping[str, Site] = msgspec.field(default_factory=dict)


SECTIONS = frozenset({"admission", "auth", "presence", "webrtc", "twilio", "media", "sites"})
"""``Settings`` fields that are not ``[server]`` keys."""
