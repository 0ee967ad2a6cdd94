"""Typed settings, loaded from a TOML file and ``MEMBRANE_*`` environment variables.

A bad value stops start-up with one line naming the key (``ConfigError``). Secrets may come
from the environment so that the config file can be committed.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, time
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from gateway.core.admission import AdmissionLimits
from gateway.core.model import Agent, Branch, CallbackPolicy, OpeningSpan, Role, Site
from gateway.store.redis_url import RedisUrlError, check_redis_url
from gateway.wire.codec import ID_PATTERN

ENV_PREFIX = "MEMBRANE_"
PLACEHOLDER_SECRETS = frozenset({"", "change-me", "changeme", "secret", "please-change"})
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_ORIGIN = re.compile(r"https?://[^/\s]+")
_PORT = re.compile(r"[0-9]{1,5}")
MIN_DEV_SECRET_CHARS = 32


class ConfigError(Exception):
    """A config value that cannot work; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A key that tokens from an outside issuer (an IdP) may be signed with."""

    kid: str
    algorithm: str
    """Pinned algorithm: RS256 or ES256. A token claiming another one is refused."""
    public_key_pem: str


@dataclass(frozen=True, slots=True)
class AuthSettings:
    issuer: str = "membrane"
    """The ``iss`` claim Membrane puts in the tokens it mints and demands of all tokens."""
    algorithm: str = "HS256"
    """Algorithm of Membrane's own signing key: HS256 (shared secret) or RS256/ES256."""
    secret: str = ""
    """HS256 shared secret (``MEMBRANE_JWT_SECRET``); at least 32 characters."""
    private_key_pem: str = ""
    """PEM private key when ``algorithm`` is RS256 or ES256."""
    extra_keys: tuple[VerifyKey, ...] = ()
    """Public keys of outside issuers, matched by the token's ``kid``."""
    jwks_url: str = ""
    """A JWKS document of an outside issuer, fetched and cached (RS256/ES256 only)."""
    leeway_s: int = 30
    """Clock skew tolerated on ``exp``/``iat``/``nbf``; bounded to at most 120 s."""
    visitor_token_ttl_s: int = 900
    agent_token_ttl_s: int = 12 * 3600


@dataclass(frozen=True, slots=True)
class PresenceSettings:
    device_ttl_s: float = 60.0
    """A REST device (IM bridge, mobile app) goes offline unless it heartbeats within this."""
    socket_ttl_s: float = 15.0
    """A desktop socket's device lease; its node renews it, so a dead node's agents lapse."""
    sweep_interval_s: float = 0.25
    """How often each node looks for lapsed devices (lapses are reported within TTL + this)."""


@dataclass(frozen=True, slots=True)
class WebRTCSettings:
    stun_urls: tuple[str, ...] = ()
    """STUN servers handed to browsers, e.g. ``stun:stun.example.com:3478``."""
    turn_urls: tuple[str, ...] = ()
    """TURN servers (coturn with ``use-auth-secret``); credentials are minted per session."""
    turn_secret: str = ""
    """coturn's ``static-auth-secret`` (``MEMBRANE_TURN_SECRET``)."""
    turn_ttl_s: int = 3600
    """How long minted TURN credentials stay valid."""


@dataclass(frozen=True, slots=True)
class TwilioSettings:
    account_sid: str = ""
    """``MEMBRANE_TWILIO_ACCOUNT_SID``; empty means no PSTN calls (browser calls only)."""
    auth_token: str = ""
    """``MEMBRANE_TWILIO_AUTH_TOKEN``; also the key that webhook signatures are checked with."""
    api_base_url: str = ""
    """Only to point the SDK at a local Twilio simulator in tests; empty for Twilio itself."""

    @property
    def enabled(self) -> bool:
        return bool(self.account_sid and self.auth_token)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    """The URL clients and Twilio reach this gateway at (behind a proxy, the proxy's)."""
    data_dir: Path = Path("data")
    """Where the embedded store keeps its SQLite file (and a generated dev secret)."""
    redis_url: str = ""
    """Empty: one node on the embedded store. Set: many nodes sharing this Redis."""
    node_id: str = ""
    """Names this node in logs and metrics; random when empty."""
    gc_pacer: bool = True
    """Garbage collection on a clock, survivors frozen (gateway/ops/gc_pacer.py), on the Python
    versions it was measured on; ``MEMBRANE_GC_PACER=false`` leaves CPython's own schedule."""
    max_body_bytes: int = 64 * 1024
    """Largest REST body or socket.io message accepted."""
    drain_grace_s: float = 10.0
    """On SIGTERM the node drains (unready, refuses new work, sends its sockets elsewhere,
    hands its timers over) and exits within this many seconds (``MEMBRANE_DRAIN_GRACE_S``)."""
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    """When new calls are shed as ``overloaded`` (``server.max_loop_lag_ms``,
    ``server.max_starting_calls``; docs/ARCHITECTURE.md, "Load shedding")."""
    auth: AuthSettings = field(default_factory=AuthSettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    webrtc: WebRTCSettings = field(default_factory=WebRTCSettings)
    twilio: TwilioSettings = field(default_factory=TwilioSettings)
    sites: Mapping[str, Site] = field(default_factory=dict)


def _get(table: Mapping[str, Any], key: str, path: str, kind: type, default: Any) -> Any:
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}{key}", f"must be {kind.__name__}, got {value!r}")
    return value


def _positive(table: Mapping[str, Any], key: str, path: str, kind: type, default: Any) -> Any:
    """``_get`` for a count, size or duration that must be above zero (and finite)."""
    value = _get(table, key, path, kind, default)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{path}{key}", f"must be greater than 0, got {value!r}")
    return value


def _env_number(
    table: Mapping[str, Any], env: Mapping[str, str], key: str, name: str
) -> Mapping[str, Any]:
    """``table`` with ``key`` taken from ``MEMBRANE_{name}`` when that is set (a number; else
    the value stays a string and fails as the key's)."""
    raw = env.get(f"{ENV_PREFIX}{name}")
    if raw is None:
        return table
    value: Any = raw
    for kind in (int, float):  # "12" is a count, "7.5" a duration
        try:
            value = kind(raw)
            break
        except ValueError:
            pass
    return {**table, key: value}


def _table(table: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
    """A sub-table (absent: empty); anything else names the key."""
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}{key}", "must be a table")
    return value


def _list(table: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{path}{key}", "must be an array of tables")
    return value


def _str_list(table: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}{key}", "must be a list of strings")
    return tuple(value)


def _ident(value: Any, key: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ConfigError(key, f"must be an id of letters, digits or _.:- (got {value!r})")
    return value


def _e164(value: str, key: str) -> str:
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        raise ConfigError(key, f"{value!r} is not an E.164 phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise ConfigError(key, f"{value!r} is not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _hours(table: Mapping[str, Any], path: str) -> dict[int, tuple[OpeningSpan, ...]]:
    hours: dict[int, tuple[OpeningSpan, ...]] = {}
    for day, spans in table.items():
        if day not in WEEKDAYS:
            raise ConfigError(f"{path}{day}", f"weekday must be one of {', '.join(WEEKDAYS)}")
        if not isinstance(spans, list):
            raise ConfigError(f"{path}{day}", 'must be a list like ["09:00-17:00"]')
        parsed = []
        for span in spans:
            m = _SPAN.fullmatch(span) if isinstance(span, str) else None
            try:
                if m is None:
                    raise ValueError
                h1, m1, h2, m2 = (int(g) for g in m.groups())
                # Only exactly 24:00 closes at midnight; time() refuses 24:30, 25:00 and :60.
                closes = time(0, 0) if (h2, m2) == (24, 0) else time(h2, m2)
                parsed.append(OpeningSpan(time(h1, m1), closes))
            except ValueError:
                raise ConfigError(f"{path}{day}", f"bad span {span!r}, want HH:MM-HH:MM") from None
        hours[WEEKDAYS.index(day)] = tuple(parsed)
    return hours


def _branch(raw: Any, path: str) -> Branch:
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a table")
    tz = _get(raw, "timezone", f"{path}.", str, "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{path}.timezone", f"unknown time zone {tz!r}") from None
    holidays = []
    for i, day in enumerate(_str_list(raw, "holidays", f"{path}.")):
        try:
            holidays.append(date.fromisoformat(day))
        except ValueError:
            raise ConfigError(f"{path}.holidays[{i}]", f"{day!r} is not YYYY-MM-DD") from None
    lat, lon = raw.get("lat"), raw.get("lon")
    for key, val, bound in (("lat", lat, 90), ("lon", lon, 180)):
        if val is not None and (
            not isinstance(val, int | float) or isinstance(val, bool) or not abs(val) <= bound
        ):
            raise ConfigError(f"{path}.{key}", f"must be a number within ±{bound}")
    hours_table = raw.get("hours", {})
    if not isinstance(hours_table, dict):
        raise ConfigError(f"{path}.hours", "must be a table of weekday = [spans]")
    return Branch(
        branch_id=_ident(raw.get("id"), f"{path}.id"),
        name=_get(raw, "name", f"{path}.", str, raw.get("id")),
        timezone=tz,
        lat=float(lat) if lat is not None else None,
        lon=float(lon) if lon is not None else None,
        languages=_str_list(raw, "languages", f"{path}."),
        hours=_hours(hours_table, f"{path}.hours."),
        holidays=frozenset(holidays),
    )


def _agent(raw: Any, site_id: str, branches: Mapping[str, Branch], path: str) -> Agent:
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a table")
    branch = raw.get("branch")
    if branch is not None:
        branch = _get(raw, "branch", f"{path}.", str, None)
    if branch is not None and branch not in branches:
        raise ConfigError(f"{path}.branch", f"no branch {branch!r} in this site")
    mobile = raw.get("mobile")
    if mobile is not None:
        mobile = _e164(_get(raw, "mobile", f"{path}.", str, ""), f"{path}.mobile")
    role_name = _get(raw, "role", f"{path}.", str, "agent")
    if role_name not in (Role.AGENT, Role.SUPERVISOR):
        raise ConfigError(f"{path}.role", "must be agent or supervisor")
    return Agent(
        agent_id=_ident(raw.get("id"), f"{path}.id"),
        site=site_id,
        name=_get(raw, "name", f"{path}.", str, raw.get("id")),
        branch=branch,
        languages=_str_list(raw, "languages", f"{path}."),
        skills=_str_list(raw, "skills", f"{path}."),
        mobile=mobile,
        role=Role(role_name),
    )


_DAY_US = 86_400 * 1_000_000


def _quiet_window(start: time, end: time) -> list[tuple[int, int]]:
    """Quiet hours ``[start, end)`` as same-day intervals in microseconds since midnight.

    A window whose end is not after its start runs past midnight, as opening spans do.
    """

    def us(t: time) -> int:
        return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond

    a, b = us(start), us(end)
    return [(a, b)] if a < b else [(a, _DAY_US), (0, b)]


def _covers(outer: list[tuple[int, int]], inner: list[tuple[int, int]]) -> bool:
    # Each piece of ``inner`` lies on one side of midnight, so it must fit in one outer piece.
    return all(any(o0 <= i0 and i1 <= o1 for o0, o1 in outer) for i0, i1 in inner if i0 < i1)


def _policy(raw: Any, path: str) -> CallbackPolicy:
    """A site's callback policy: the defaults, which a site may only tighten.

    Limits may be lowered (but stay above 0; ``retries`` may be 0), ``retry_interval_s`` may
    only grow, ``allowed_countries`` may only drop countries, ``blocked_number_types`` may
    only add types, and quiet hours may only widen: the new window must contain the default
    one (start == end is ambiguous, all day or never, and refused). Flags are free choices.
    """
    if raw is None:
        return CallbackPolicy()
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a table")
    base = CallbackPolicy()
    changes: dict[str, Any] = {}
    for key in raw:
        if not hasattr(base, key):
            raise ConfigError(f"{path}.{key}", "unknown callback policy key")
        default = getattr(base, key)
        if isinstance(default, tuple):
            value = _str_list(raw, key, f"{path}.")
            if key == "allowed_countries":
                extra = [c for c in value if c not in default]
                if extra:
                    raise ConfigError(
                        f"{path}.{key}",
                        f"may only drop countries from the default list, not add {extra}",
                    )
            elif key == "blocked_number_types":
                missing = [t for t in default if t not in value]
                if missing:
                    raise ConfigError(
                        f"{path}.{key}",
                        f"may only add to the default list, not unblock {missing}",
                    )
            changes[key] = value
        elif isinstance(default, bool):
            changes[key] = _get(raw, key, f"{path}.", bool, default)
        elif isinstance(default, time):
            try:
                changes[key] = time.fromisoformat(_get(raw, key, f"{path}.", str, ""))
            except ValueError:
                raise ConfigError(f"{path}.{key}", "must be HH:MM") from None
        else:
            value = _get(raw, key, f"{path}.", type(default), default)
            if key == "retry_interval_s":
                # Waiting longer between retries is tighter; retrying sooner is not.
                if not value >= default:
                    raise ConfigError(f"{path}.{key}", f"may not be below the default {default}")
            elif not value <= default:
                raise ConfigError(f"{path}.{key}", f"may not exceed the default {default}")
            elif key == "retries":
                if value < 0:
                    raise ConfigError(f"{path}.{key}", "may not be negative")
            elif not value > 0:
                raise ConfigError(f"{path}.{key}", "must be greater than 0")
            changes[key] = value
    policy = replace(base, **changes)
    quiet_key = next((k for k in ("quiet_hours_start", "quiet_hours_end") if k in raw), None)
    if quiet_key is not None:
        if policy.quiet_hours_start == policy.quiet_hours_end:
            raise ConfigError(
                f"{path}.{quiet_key}", "quiet hours may not start and end at the same time"
            )
        window = _quiet_window(policy.quiet_hours_start, policy.quiet_hours_end)
        if not _covers(window, _quiet_window(base.quiet_hours_start, base.quiet_hours_end)):
            raise ConfigError(
                f"{path}.{quiet_key}",
                "quiet hours may only widen the default "
                f"{base.quiet_hours_start:%H:%M}-{base.quiet_hours_end:%H:%M}",
            )
    return policy


def _site(raw: Any, path: str) -> Site:
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a table")
    site_id = _ident(raw.get("id"), f"{path}.id")
    branches: dict[str, Branch] = {}
    for i, b in enumerate(_list(raw, "branches", f"{path}.")):
        branch = _branch(b, f"{path}.branches[{i}]")
        if branch.branch_id in branches:
            raise ConfigError(f"{path}.branches[{i}].id", f"duplicate {branch.branch_id!r}")
        branches[branch.branch_id] = branch
    agents: dict[str, Agent] = {}
    for i, a in enumerate(_list(raw, "agents", f"{path}.")):
        agent = _agent(a, site_id, branches, f"{path}.agents[{i}]")
        if agent.agent_id in agents:
            raise ConfigError(f"{path}.agents[{i}].id", f"duplicate {agent.agent_id!r}")
        agents[agent.agent_id] = agent
    origins = _str_list(raw, "origins", f"{path}.")
    for i, origin in enumerate(origins):
        if not _ORIGIN.fullmatch(origin):
            raise ConfigError(f"{path}.origins[{i}]", f"{origin!r} is not scheme://host[:port]")
    ring_timeout = _get(raw, "ring_timeout_s", f"{path}.", float, 20.0)
    if not 3 <= ring_timeout <= 120:
        raise ConfigError(f"{path}.ring_timeout_s", "must be between 3 and 120 seconds")
    return Site(
        site_id=site_id,
        name=_get(raw, "name", f"{path}.", str, site_id),
        allowed_origins=origins,
        branches=branches,
        agents=agents,
        caller_ids=tuple(
            _e164(n, f"{path}.caller_ids[{i}]")
            for i, n in enumerate(_str_list(raw, "caller_ids", f"{path}."))
        ),
        callback_policy=_policy(raw.get("callback_policy"), f"{path}.callback_policy"),
        ring_timeout_s=ring_timeout,
    )


def _auth(raw: Mapping[str, Any], env: Mapping[str, str], base: Path) -> AuthSettings:
    p = "auth."
    algorithm = _get(raw, "algorithm", p, str, "HS256")
    if algorithm not in ("HS256", "RS256", "ES256"):
        raise ConfigError("auth.algorithm", "must be HS256, RS256 or ES256")
    secret = env.get(f"{ENV_PREFIX}JWT_SECRET", _get(raw, "secret", p, str, ""))
    private_key = ""
    if algorithm != "HS256":
        key_file = env.get(
            f"{ENV_PREFIX}JWT_PRIVATE_KEY_FILE", _get(raw, "private_key_file", p, str, "")
        )
        if not key_file:
            raise ConfigError("auth.private_key_file", f"is required with {algorithm}")
        private_key = _read(base, key_file, "auth.private_key_file")
    extra = []
    for i, k in enumerate(_list(raw, "keys", p)):
        kp = f"auth.keys[{i}]"
        if not isinstance(k, dict):
            raise ConfigError(kp, "must be a table")
        alg = _get(k, "algorithm", f"{kp}.", str, "")
        if alg not in ("RS256", "ES256"):
            raise ConfigError(f"{kp}.algorithm", "must be RS256 or ES256")
        pem = _read(base, _get(k, "public_key_file", f"{kp}.", str, ""), f"{kp}.public_key_file")
        extra.append(VerifyKey(_get(k, "kid", f"{kp}.", str, ""), alg, pem))
    leeway = _get(raw, "leeway_s", p, int, 30)
    if not 0 <= leeway <= 120:
        raise ConfigError("auth.leeway_s", "must be between 0 and 120 seconds")
    return AuthSettings(
        issuer=env.get(f"{ENV_PREFIX}JWT_ISSUER", _get(raw, "issuer", p, str, "membrane")),
        algorithm=algorithm,
        secret=secret,
        private_key_pem=private_key,
        extra_keys=tuple(extra),
        jwks_url=env.get(f"{ENV_PREFIX}JWKS_URL", _get(raw, "jwks_url", p, str, "")),
        leeway_s=leeway,
        visitor_token_ttl_s=_positive(raw, "visitor_token_ttl_s", p, int, 900),
        agent_token_ttl_s=_positive(raw, "agent_token_ttl_s", p, int, 12 * 3600),
    )


def _read(base: Path, name: str, key: str) -> str:
    if not name:
        raise ConfigError(key, "is required")
    try:
        return (base / name).read_text()
    except OSError as e:
        raise ConfigError(key, f"cannot read {name}: {e.strerror}") from None


def _port(server: Mapping[str, Any], env: Mapping[str, str]) -> int:
    from_env = env.get(f"{ENV_PREFIX}PORT")
    if from_env is None:
        port: int = _get(server, "port", "server.", int, 8080)
    elif _PORT.fullmatch(from_env):
        port = int(from_env)
    else:
        raise ConfigError("server.port", f"{ENV_PREFIX}PORT={from_env!r} is not a port number")
    if not 1 <= port <= 65535:
        raise ConfigError("server.port", f"must be between 1 and 65535, got {port}")
    return port


def _drain_grace(server: Mapping[str, Any], env: Mapping[str, str]) -> float:
    from_env = env.get(f"{ENV_PREFIX}DRAIN_GRACE_S")
    if from_env is None:
        grace: float = _get(server, "drain_grace_s", "server.", float, 10.0)
    else:
        try:
            grace = float(from_env)
        except ValueError:
            raise ConfigError(
                "server.drain_grace_s", f"{ENV_PREFIX}DRAIN_GRACE_S={from_env!r} is not a number"
            ) from None
    # Under a second leaves no time to hand anything over; a load balancer or orchestrator
    # (Kubernetes' default is 30 s) kills a node that takes much longer.
    if not (math.isfinite(grace) and 1 <= grace <= 300):
        raise ConfigError("server.drain_grace_s", f"must be between 1 and 300 seconds, got {grace}")
    return grace


def demo_config_text() -> str:
    return resources.files("gateway").joinpath("demo.toml").read_text()


def _gc_pacer(server: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    from_env = env.get(f"{ENV_PREFIX}GC_PACER")
    if from_env is None:
        on: bool = _get(server, "gc_pacer", "server.", bool, True)
        return on
    if from_env.strip().lower() in ("true", "1"):
        return True
    if from_env.strip().lower() in ("false", "0"):
        return False
    raise ConfigError("server.gc_pacer", f"{ENV_PREFIX}GC_PACER={from_env!r} is not true or false")


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
    server = _table(raw, "server", "")
    p = "server."
    redis_url = env.get(f"{ENV_PREFIX}REDIS_URL", _get(server, "redis_url", p, str, ""))
    data_dir = Path(env.get(f"{ENV_PREFIX}DATA_DIR", _get(server, "data_dir", p, str, "data")))
    sites: dict[str, Site] = {}
    for i, s in enumerate(_list(raw, "sites", "")):
        site = _site(s, f"sites[{i}]")
        if site.site_id in sites:
            raise ConfigError(f"sites[{i}].id", f"duplicate {site.site_id!r}")
        sites[site.site_id] = site
    presence_raw = _table(raw, "presence", "")
    presence = PresenceSettings(
        device_ttl_s=_get(presence_raw, "device_ttl_s", "presence.", float, 60.0),
        socket_ttl_s=_get(presence_raw, "socket_ttl_s", "presence.", float, 15.0),
        sweep_interval_s=_get(presence_raw, "sweep_interval_s", "presence.", float, 0.25),
    )
    for name, ttl in (
        ("device_ttl_s", presence.device_ttl_s),
        ("socket_ttl_s", presence.socket_ttl_s),
    ):
        if not (math.isfinite(ttl) and ttl >= 1):
            raise ConfigError(f"presence.{name}", "must be at least 1 second")
    if not 0.05 <= presence.sweep_interval_s <= 1.0:
        raise ConfigError("presence.sweep_interval_s", "must be between 0.05 and 1.0 seconds")
    webrtc_raw = _table(raw, "webrtc", "")
    webrtc = WebRTCSettings(
        stun_urls=_str_list(webrtc_raw, "stun_urls", "webrtc."),
        turn_urls=_str_list(webrtc_raw, "turn_urls", "webrtc."),
        turn_secret=env.get(
            f"{ENV_PREFIX}TURN_SECRET", _get(webrtc_raw, "turn_secret", "webrtc.", str, "")
        ),
        turn_ttl_s=_positive(webrtc_raw, "turn_ttl_s", "webrtc.", int, 3600),
    )
    for i, url in enumerate(webrtc.stun_urls):
        if not url.startswith(("stun:", "stuns:")):
            raise ConfigError(f"webrtc.stun_urls[{i}]", f"{url!r} is not a stun: URL")
    for i, url in enumerate(webrtc.turn_urls):
        if not url.startswith(("turn:", "turns:")):
            raise ConfigError(f"webrtc.turn_urls[{i}]", f"{url!r} is not a turn: URL")
    if webrtc.turn_urls and len(webrtc.turn_secret) < 16:
        raise ConfigError("webrtc.turn_secret", "is required (16+ characters) with turn_urls")
    twilio_raw = _table(raw, "twilio", "")
    twilio = TwilioSettings(
        account_sid=env.get(
            f"{ENV_PREFIX}TWILIO_ACCOUNT_SID", _get(twilio_raw, "account_sid", "twilio.", str, "")
        ),
        auth_token=env.get(
            f"{ENV_PREFIX}TWILIO_AUTH_TOKEN", _get(twilio_raw, "auth_token", "twilio.", str, "")
        ),
        api_base_url=_get(twilio_raw, "api_base_url", "twilio.", str, ""),
    )
    if twilio.account_sid and not re.fullmatch(r"AC[0-9a-f]{32}", twilio.account_sid):
        raise ConfigError("twilio.account_sid", "must be AC followed by 32 hex digits")
    if bool(twilio.account_sid) != bool(twilio.auth_token):
        raise ConfigError("twilio.auth_token", "account_sid and auth_token go together")
    settings = Settings(
        host=env.get(f"{ENV_PREFIX}HOST", _get(server, "host", p, str, "127.0.0.1")),
        port=_port(server, env),
        public_url=env.get(f"{ENV_PREFIX}PUBLIC_URL", _get(server, "public_url", p, str, "")),
        data_dir=data_dir,
        redis_url=redis_url,
        node_id=env.get(f"{ENV_PREFIX}NODE_ID", _get(server, "node_id", p, str, "")),
        gc_pacer=_gc_pacer(server, env),
        max_body_bytes=_positive(server, "max_body_bytes", p, int, 64 * 1024),
        drain_grace_s=_drain_grace(server, env),
        admission=AdmissionLimits(
            max_loop_lag_s=_positive(
                _env_number(server, env, "max_loop_lag_ms", "MAX_LOOP_LAG_MS"),
                "max_loop_lag_ms",
                p,
                float,
                5.0,
            )
            / 1000,
            max_starts_in_flight=_positive(
                _env_number(server, env, "max_starting_calls", "MAX_STARTING_CALLS"),
                "max_starting_calls",
                p,
                int,
                3,
            ),
        ),
        auth=_auth(_table(raw, "auth", ""), env, base),
        presence=presence,
        webrtc=webrtc,
        twilio=twilio,
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
    if not settings.public_url:
        settings = replace(settings, public_url=f"http://{settings.host}:{settings.port}")
    if not settings.node_id:
        settings = replace(settings, node_id=secrets.token_hex(4))
    if not settings.sites:
        raise ConfigError("sites", "at least one site is required")
    return settings


def with_dev_secret(settings: Settings) -> Settings:
    """Fill an empty HS256 secret with one generated once and kept in the data directory.

    This lets the demo run with no set-up while ``membrane token`` mints tokens the running
    gateway accepts. A placeholder secret is refused: it would let anyone mint tokens.
    """
    auth = settings.auth
    if auth.algorithm != "HS256":
        return settings
    if auth.secret:
        if auth.secret.lower() in PLACEHOLDER_SECRETS or len(auth.secret) < 32:
            raise ConfigError("auth.secret", "is a placeholder or shorter than 32 characters")
        return settings
    if settings.redis_url:
        # Each node would make its own secret and refuse the others' tokens.
        raise ConfigError(
            "auth.secret", "is required when nodes share Redis (set MEMBRANE_JWT_SECRET)"
        )
    path = settings.data_dir / "dev-jwt-secret"
    try:
        secret = _stored_dev_secret(path)
        if secret is None:
            secret = _store_dev_secret(path)
    except OSError as e:
        raise ConfigError("server.data_dir", f"cannot keep the dev secret in {path}: {e}") from None
    return replace(settings, auth=replace(auth, secret=secret))


def _stored_dev_secret(path: Path) -> str | None:
    """The secret kept in ``path``, or None when there is none fit to sign with.

    An empty or short file (left by a crash, or edited by hand) is never used: HS256 with an
    empty key would let anyone mint tokens.
    """
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return None
    return secret if len(secret) >= MIN_DEV_SECRET_CHARS else None


def _store_dev_secret(path: Path) -> str:
    """Generate a secret and put it in ``path`` atomically; return the secret now kept there.

    The secret is written and fsynced to a temporary file beside ``path`` first, so ``path``
    only ever holds a whole secret. It is linked in only if ``path`` is still absent, so a
    node starting at the same moment that already stored one keeps it; an unusable file is
    replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = _stored_dev_secret(path)
            if existing is not None:
                return existing
            os.replace(tmp, path)
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return secret


def _fsync_dir(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
