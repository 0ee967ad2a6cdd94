"""Loading settings: the TOML file decoded into the model, then ``MEMBRANE_*`` environment
variables, then command-line overrides, then every value checked.

A bad value stops start-up with one line naming the key (``ConfigError``). Secrets may come
from the environment so that the config file can be committed.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace as replace_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from msgspec.structs import replace

from gateway.core.model import Site
from gateway.ops.access_log import AccessLogMode
from gateway.ops.logs import LogFormat
from gateway.settings.checks import ConfigError, decode, positive, table
from gateway.settings.model import (
    AuthFiles,
    AuthSettings,
    LoadLimits,
    MediaSettings,
    PresenceSettings,
    Settings,
    TwilioSettings,
    VerifyKey,
    WebRTCSettings,
)
from gateway.settings.sites import load_site, secret_env_name, webhook_secret
from gateway.store.redis_url import RedisUrlError, check_redis_url

T = TypeVar("T")
ENV_PREFIX = "MEMBRANE_"
_PORT = re.compile(r"[0-9]{1,5}")

# Settings' fields that are sections of their own (a default factory), not [server] keys.
_SECTIONS = frozenset(
    f.name for f in msgspec.structs.fields(Settings) if f.default_factory is not msgspec.NODEFAULT
)

# The string settings that a MEMBRANE_* variable replaces as it is: (section, key, variable).
_ENV_STRINGS = (
    ("server", "host", "HOST"),
    ("server", "public_url", "PUBLIC_URL"),
    ("server", "redis_url", "REDIS_URL"),
    ("server", "history_url", "HISTORY_URL"),
    ("server", "node_id", "NODE_ID"),
    ("server", "web_client_dir", "WEB_CLIENT_DIR"),
    ("auth", "issuer", "JWT_ISSUER"),
    ("auth", "secret", "JWT_SECRET"),
    ("auth", "previous_secret", "JWT_PREVIOUS_SECRET"),
    ("auth", "jwks_url", "JWKS_URL"),
    ("webrtc", "turn_secret", "TURN_SECRET"),
    ("twilio", "account_sid", "TWILIO_ACCOUNT_SID"),
    ("twilio", "auth_token", "TWILIO_AUTH_TOKEN"),
    ("twilio", "previous_auth_token", "TWILIO_PREVIOUS_AUTH_TOKEN"),
)


S = TypeVar("S", bound=msgspec.Struct)


def _with_env(section: str, struct: S, env: Mapping[str, str]) -> S:
    """``struct`` (the ``section`` table) with its ``_ENV_STRINGS`` taken from ``env``."""
    changes = {
        key: env[f"{ENV_PREFIX}{name}"]
        for table_name, key, name in _ENV_STRINGS
        if table_name == section and f"{ENV_PREFIX}{name}" in env
    }
    return replace(struct, **changes) if changes else struct


def demo_config_text() -> str:
    return resources.files("gateway").joinpath("demo.toml").read_text()


def _env(
    env: Mapping[str, str], name: str, key: str, parse: Callable[[str], T], what: str
) -> T | None:
    """``MEMBRANE_{name}`` read by ``parse``, None when unset; unreadable, it names ``key``."""
    raw = env.get(f"{ENV_PREFIX}{name}")
    if raw is None:
        return None
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(key, f"{ENV_PREFIX}{name}={raw!r} is not {what}") from None


def _port(raw: str) -> int:
    if not _PORT.fullmatch(raw):
        raise ValueError(raw)
    return int(raw)


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word not in ("true", "1", "false", "0"):
        raise ValueError(raw)
    return word in ("true", "1")


def _read(base: Path, name: str, key: str) -> str:
    if not name:
        raise ConfigError(key, "is required")
    try:
        return (base / name).read_text()
    except OSError as e:
        raise ConfigError(key, f"cannot read {name}: {e.strerror}") from None


def _auth(raw: dict[str, Any], env: Mapping[str, str], base: Path) -> AuthSettings:
    # The keys read from files, and none of what is read from them, come from the file.
    kept = {k: v for k, v in raw.items() if k not in ("private_key_pem", "extra_keys")}
    auth = decode(kept, AuthSettings, "auth")
    files = decode({k: raw[k] for k in ("private_key_file", "keys") if k in raw}, AuthFiles, "auth")
    if auth.algorithm not in ("HS256", "RS256", "ES256"):
        raise ConfigError("auth.algorithm", "must be HS256, RS256 or ES256")
    if auth.algorithm != "HS256":
        key_file = env.get(f"{ENV_PREFIX}JWT_PRIVATE_KEY_FILE", files.private_key_file)
        if not key_file:
            raise ConfigError("auth.private_key_file", f"is required with {auth.algorithm}")
        auth = replace(auth, private_key_pem=_read(base, key_file, "auth.private_key_file"))
    extra = []
    for i, k in enumerate(files.keys):
        if k.algorithm not in ("RS256", "ES256"):
            raise ConfigError(f"auth.keys[{i}].algorithm", "must be RS256 or ES256")
        pem = _read(base, k.public_key_file, f"auth.keys[{i}].public_key_file")
        extra.append(VerifyKey(k.kid, k.algorithm, pem))
    if not 0 <= auth.leeway_s <= 120:
        raise ConfigError("auth.leeway_s", "must be between 0 and 120 seconds")
    positive(auth.visitor_token_ttl_s, "auth.visitor_token_ttl_s")
    positive(auth.agent_token_ttl_s, "auth.agent_token_ttl_s")
    return replace(auth, extra_keys=tuple(extra))


def _site_env(site: Site, path: str, env: Mapping[str, str]) -> Site:
    """``site`` with its secret from ``MEMBRANE_SITE_<ID>_PRESENCE_WEBHOOK_SECRET``, if set."""
    name = f"{ENV_PREFIX}{secret_env_name(site.site_id)}"
    if name not in env:
        return site
    secret = webhook_secret(env[name], f"{path}.presence_webhook_secret ({name})")
    return replace_dataclass(site, presence_webhook_secret=secret)


def _check_previous_secret(auth: AuthSettings) -> None:
    previous = auth.previous_secret
    if not previous:
        return
    if auth.algorithm != "HS256":
        raise ConfigError("auth.previous_secret", "is for rotating an HS256 secret")
    if len(previous) < 32 or previous == auth.secret:
        raise ConfigError(
            "auth.previous_secret", "must be the former secret: 32+ characters, not the current"
        )


def _check_presence(presence: PresenceSettings) -> None:
    for name in ("device_ttl_s", "socket_ttl_s", "sms_lease_s", "im_ttl_s"):
        ttl = getattr(presence, name)
        if not (math.isfinite(ttl) and ttl >= 1):
            raise ConfigError(f"presence.{name}", "must be at least 1 second")
    if not 0.05 <= presence.sweep_interval_s <= 1.0:
        raise ConfigError("presence.sweep_interval_s", "must be between 0.05 and 1.0 seconds")
    positive(presence.im_webhook_rate, "presence.im_webhook_rate")
    positive(presence.im_webhook_burst, "presence.im_webhook_burst")


def _check_webrtc(webrtc: WebRTCSettings) -> None:
    positive(webrtc.turn_ttl_s, "webrtc.turn_ttl_s")
    for i, url in enumerate(webrtc.stun_urls):
        if not url.startswith(("stun:", "stuns:")):
            raise ConfigError(f"webrtc.stun_urls[{i}]", f"{url!r} is not a stun: URL")
    for i, url in enumerate(webrtc.turn_urls):
        if not url.startswith(("turn:", "turns:")):
            raise ConfigError(f"webrtc.turn_urls[{i}]", f"{url!r} is not a turn: URL")
    if webrtc.turn_urls and len(webrtc.turn_secret) < 16:
        raise ConfigError("webrtc.turn_secret", "is required (16+ characters) with turn_urls")


def _check_media(media: MediaSettings, twilio: TwilioSettings) -> None:
    if not 0 <= media.workers <= 64:
        raise ConfigError("media.workers", "must be between 0 and 64")
    positive(media.max_sessions, "media.max_sessions")
    if not 0 <= media.base_port <= 65535 - media.workers:
        raise ConfigError("media.base_port", "must leave room for every worker's port")
    if media.workers and not twilio.enabled:
        raise ConfigError("media.workers", "the audio bridge needs [twilio]")
    if media.public_ws_url and (
        not media.public_ws_url.startswith(("ws://", "wss://"))
        or "{port}" not in media.public_ws_url
    ):
        raise ConfigError("media.public_ws_url", "must be a ws:// or wss:// URL with {port}")


def _check_twilio(twilio: TwilioSettings) -> None:
    if twilio.account_sid and not re.fullmatch(r"AC[0-9a-f]{32}", twilio.account_sid):
        raise ConfigError("twilio.account_sid", "must be AC followed by 32 hex digits")
    if bool(twilio.account_sid) != bool(twilio.auth_token):
        raise ConfigError("twilio.auth_token", "account_sid and auth_token go together")


def _server(server: dict[str, Any], env: Mapping[str, str]) -> Settings:
    """The ``[server]`` keys with their environment variables."""
    settings = decode({k: v for k, v in server.items() if k not in _SECTIONS}, Settings, "server")
    limits = decode(server, LoadLimits, "server")
    port = _env(env, "PORT", "server.port", _port, "a port number")
    grace = _env(env, "DRAIN_GRACE_S", "server.drain_grace_s", float, "a number")
    gc_pacer = _env(env, "GC_PACER", "server.gc_pacer", _bool, "true or false")
    access_log = _env(env, "ACCESS_LOG", "server.access_log", AccessLogMode, "sampled, all or off")
    retention = _env(env, "RETENTION_DAYS", "server.retention_days", float, "a number of days")
    log_format = _env(env, "LOG_FORMAT", "server.log_format", LogFormat, "text or json")
    proxies = _env(env, "TRUSTED_PROXIES", "server.trusted_proxies", _list, "a list")
    data_dir = env.get(f"{ENV_PREFIX}DATA_DIR")
    changes: dict[str, Any] = {
        "port": port,
        "drain_grace_s": grace,
        "gc_pacer": gc_pacer,
        "access_log": access_log,
        "retention_days": retention,
        "log_format": log_format,
        "trusted_proxies": proxies,
        "data_dir": None if data_dir is None else Path(data_dir),
    }
    settings = replace(settings, **{k: v for k, v in changes.items() if v is not None})
    if not 1 <= settings.port <= 65535:
        raise ConfigError("server.port", f"must be between 1 and 65535, got {settings.port}")
    positive(settings.max_body_bytes, "server.max_body_bytes")
    for i, proxy in enumerate(settings.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"server.trusted_proxies[{i}]", f"{proxy!r} is not an address or network"
            ) from None
    positive(settings.access_log_sample_every, "server.access_log_sample_every")
    if not (math.isfinite(settings.retention_days) and 1 <= settings.retention_days <= 3650):
        raise ConfigError(
            "server.retention_days",
            f"must be between 1 and 3650 days, got {settings.retention_days}",
        )
    # Under a second leaves no time to hand anything over; a load balancer or orchestrator
    # (Kubernetes' default is 30 s) kills a node that takes much longer.
    grace_s = settings.drain_grace_s
    if not (math.isfinite(grace_s) and 1 <= grace_s <= 300):
        raise ConfigError(
            "server.drain_grace_s", f"must be between 1 and 300 seconds, got {grace_s}"
        )
    lag_ms = _env(env, "MAX_LOOP_LAG_MS", "server.max_loop_lag_ms", float, "a number")
    starting = _env(env, "MAX_STARTING_CALLS", "server.max_starting_calls", int, "a count")
    admission = settings.admission
    lag_ms = limits.max_loop_lag_ms if lag_ms is None else lag_ms
    if lag_ms is not None:
        positive(lag_ms, "server.max_loop_lag_ms")
        admission = replace_dataclass(admission, max_loop_lag_s=lag_ms / 1000)
    starting = limits.max_starting_calls if starting is None else starting
    if starting is not None:
        positive(starting, "server.max_starting_calls")
        admission = replace_dataclass(admission, max_starts_in_flight=starting)
    start_ms = _env(env, "MAX_START_MS", "server.max_start_ms", float, "a number")
    start_ms = limits.max_start_ms if start_ms is None else start_ms
    if start_ms is not None:
        positive(start_ms, "server.max_start_ms")
        admission = replace_dataclass(admission, max_start_s=start_ms / 1000)
    return replace(settings, admission=admission)


def load_settings(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings from ``path`` (the shipped demo config when None), the environment, overrides.

    ``overrides`` are command-line values (host, port, redis_url, data_dir, public_url) and
    win over both the file and the environment.
    """
    env = os.environ if env is None else env
    try:
        text = demo_config_text() if path is None else path.read_text()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read config file: {e.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path or "demo.toml"), f"not valid TOML: {e}") from None
    base = path.parent if path is not None else Path.cwd()
    names = ("server", "auth", "presence", "webrtc", "twilio", "media")
    tables = {name: table(raw, name, "") for name in names}
    # The file's values are checked before the environment replaces any of them.
    settings = _server(tables["server"], env)
    presence = decode(tables["presence"], PresenceSettings, "presence")
    webrtc = decode(tables["webrtc"], WebRTCSettings, "webrtc")
    twilio = decode(tables["twilio"], TwilioSettings, "twilio")
    media = decode(tables["media"], MediaSettings, "media")
    sites: dict[str, Site] = {}
    sites_raw = raw.get("sites", [])
    if not isinstance(sites_raw, list):
        raise ConfigError("sites", "must be an array of tables")
    for i, s in enumerate(sites_raw):
        site = load_site(s, f"sites[{i}]")
        if site.site_id in sites:
            raise ConfigError(f"sites[{i}].id", f"duplicate {site.site_id!r}")
        sites[site.site_id] = _site_env(site, f"sites[{i}]", env)
    auth = _auth(tables["auth"], env, base)
    webrtc = _with_env("webrtc", webrtc, env)
    twilio = _with_env("twilio", twilio, env)
    auth = _with_env("auth", auth, env)
    _check_previous_secret(auth)
    _check_presence(presence)
    _check_webrtc(webrtc)
    _check_twilio(twilio)
    _check_media(media, twilio)
    settings = replace(
        _with_env("server", settings, env),
        auth=auth,
        presence=presence,
        webrtc=webrtc,
        twilio=twilio,
        media=media,
        sites=sites,
    )
    port_override = overrides.get("port")
    if port_override is not None and (
        not isinstance(port_override, int)
        or isinstance(port_override, bool)
        or not 0 <= port_override <= 65535
    ):
        # 0 (any free port) is only for callers that bind and then read the port back.
        raise ConfigError("server.port", f"must be between 0 and 65535, got {port_override!r}")
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if settings.redis_url:
        try:
            check_redis_url(settings.redis_url)
        except RedisUrlError as e:
            raise ConfigError("server.redis_url", str(e)) from None
    if settings.history_url and not settings.history_url.startswith(
        ("postgresql://", "postgres://")
    ):
        raise ConfigError("server.history_url", "must be a postgresql:// URL")
    given = (
        overrides.get("public_url") is not None
        or f"{ENV_PREFIX}PUBLIC_URL" in env
        or "public_url" in tables["server"]
    )
    if not (given and settings.public_url):  # absent or empty: where the node listens
        settings = replace(settings, public_url=f"http://{settings.host}:{settings.port}")
    if not settings.node_id:
        settings = replace(settings, node_id=secrets.token_hex(4))
    if not settings.sites:
        raise ConfigError("sites", "at least one site is required")
    return settings
