"""Settings (gateway/settings/): the demo config, one table row per kind of bad config (each
must name its exact key), environment overrides, the dev secret, the shipped configs held to
the model's defaults, and the ``membrane`` CLI run as a real process.

Configs are built as Python dicts and written as TOML (inline tables) into ``tmp_path``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
import sys
import time
import tomllib
from datetime import date
from datetime import time as clock
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from conftest import replace

from gateway.core.admission import AdmissionLimits
from gateway.core.errors import DomainError
from gateway.core.model import CallbackPolicy, OpeningSpan, Role, Site
from gateway.edge.auth import AUDIENCE, TokenService
from gateway.settings import (
    AuthSettings,
    ConfigError,
    PresenceSettings,
    Settings,
    WebRTCSettings,
    demo_config_text,
    load_settings,
    with_dev_secret,
)

REPO = Path(__file__).resolve().parents[1]
STRONG = "s3cret-0123456789-abcdefghijklmnopqrstuvwxyz"

# --- writing configs ------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(value)


def to_toml(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


DELETE = object()
Path_ = tuple[str | int, ...]


def changed(doc: dict[str, Any], *changes: tuple[Path_, Any]) -> dict[str, Any]:
    """A deep copy of ``doc`` with each ``(path, value)`` set (``DELETE`` removes the key)."""
    out = copy.deepcopy(doc)
    for path, value in changes:
        target: Any = out
        for step in path[:-1]:
            target = target[step]
        last = path[-1]
        if value is DELETE:
            del target[last]
        elif isinstance(target, list) and last == len(target):
            target.append(copy.deepcopy(value))
        else:
            target[last] = copy.deepcopy(value)
    return out


BASE: dict[str, Any] = {
    "sites": [
        {
            "id": "acme",
            "origins": ["https://shop.example", "http://localhost:8080"],
            "caller_ids": ["+15005550006"],
            "branches": [
                {"id": "dublin", "timezone": "Europe/Dublin", "hours": {"mon": ["09:00-17:00"]}},
                {"id": "berlin", "timezone": "Europe/Berlin"},
            ],
            "agents": [
                {"id": "anna", "branch": "dublin", "mobile": "+353871234567"},
                {"id": "ben", "branch": "berlin"},
            ],
        }
    ]
}


def write_config(tmp_path: Path, doc: dict[str, Any] | str, name: str = "membrane.toml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else to_toml(doc))
    return path


def load(tmp_path: Path, doc: dict[str, Any] | str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(write_config(tmp_path, doc), env={} if env is None else env)


def config_error(
    tmp_path: Path, doc: dict[str, Any] | str, env: dict[str, str] | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, doc, env)
    return caught.value


# --- the demo config ------------------------------------------------------------------------


def test_demo_config_loads() -> None:
    settings = load_settings(None, env={})
    assert (settings.host, settings.port, settings.data_dir) == ("127.0.0.1", 8080, Path("data"))
    assert settings.public_url == "http://127.0.0.1:8080"
    assert settings.redis_url == ""
    assert len(settings.node_id) == 8 and int(settings.node_id, 16) >= 0
    assert settings.max_body_bytes == 64 * 1024
    assert settings.drain_grace_s == 10.0
    assert settings.admission == AdmissionLimits(max_loop_lag_s=0.005, max_starts_in_flight=16)
    assert settings.auth == AuthSettings(issuer="membrane-demo", algorithm="HS256", secret="")
    assert settings.presence == PresenceSettings(60.0, 15.0, 0.25)

    assert list(settings.sites) == ["acme"]
    site = settings.sites["acme"]
    assert site.name == "Acme Telecom"
    assert site.allowed_origins == ("http://127.0.0.1:8080", "http://localhost:8080")
    assert site.caller_ids == ("+15005550006",)
    assert site.ring_timeout_s == 20.0
    assert site.callback_policy == CallbackPolicy()


def test_demo_branches() -> None:
    site = load_settings(None, env={}).sites["acme"]
    assert list(site.branches) == ["dublin", "berlin", "online"]
    dublin, berlin, online = (site.branches[b] for b in ("dublin", "berlin", "online"))
    assert (dublin.name, dublin.timezone, dublin.lat, dublin.lon) == (
        "Dublin",
        "Europe/Dublin",
        53.349,
        -6.26,
    )
    assert dublin.languages == ("en", "ga")
    assert dublin.holidays == frozenset({date(2026, 12, 25), date(2026, 12, 26)})
    eight_to_eight = (OpeningSpan(clock(8), clock(20)),)
    assert dublin.hours == {
        0: eight_to_eight,
        1: eight_to_eight,
        2: eight_to_eight,
        3: eight_to_eight,
        4: (OpeningSpan(clock(8), clock(18)),),
    }
    assert berlin.timezone == "Europe/Berlin" and berlin.hours[4] == (
        OpeningSpan(clock(9), clock(16)),
    )
    assert 5 not in berlin.hours and 6 not in berlin.hours and berlin.holidays == frozenset()
    # "00:00-24:00" is a whole day: closes at midnight (hours.py reads opens == closes so).
    assert online.hours == dict.fromkeys(range(7), (OpeningSpan(clock(0), clock(0)),))
    assert (online.timezone, online.lat, online.lon) == ("UTC", None, None)


def test_demo_agents() -> None:
    agents = load_settings(None, env={}).sites["acme"].agents
    assert list(agents) == ["anna", "ben", "carla", "sam"]
    anna = agents["anna"]
    assert (anna.agent_id, anna.site, anna.name, anna.branch) == ("anna", "acme", "Anna", "dublin")
    assert anna.skills == ("billing", "broadband") and anna.languages == ("en", "ga")
    assert (anna.mobile, anna.role) == ("+353871234567", Role.AGENT)
    assert agents["ben"].mobile == "+4915112345678"
    assert agents["carla"].mobile is None and agents["carla"].branch == "online"
    assert agents["sam"].role is Role.SUPERVISOR and agents["sam"].name == "Sam (supervisor)"


def test_demo_text_is_the_shipped_file() -> None:
    assert demo_config_text() == (REPO / "gateway" / "demo.toml").read_text()


def test_small_config_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, BASE)
    site = settings.sites["acme"]
    assert site.name == "acme" and site.ring_timeout_s == 20.0
    assert site.mobile_after_desktop is False
    assert site.history_retention_days == 400
    assert site.branches["berlin"].name == "berlin" and site.branches["berlin"].hours == {}
    assert site.agents["ben"].name == "ben" and site.agents["ben"].mobile is None
    assert site.agents["ben"].role is Role.AGENT
    assert settings.auth.leeway_s == 30


def test_phone_numbers_normalised_to_e164(tmp_path: Path) -> None:
    doc = changed(
        BASE,
        (("sites", 0, "agents", 0, "mobile"), "+353 87 123 4567"),
        (("sites", 0, "caller_ids"), ["+1 (500) 555-0006"]),
    )
    site = load(tmp_path, doc).sites["acme"]
    assert site.agents["anna"].mobile == "+353871234567"
    assert site.caller_ids == ("+15005550006",)


def test_callback_policy_may_tighten(tmp_path: Path) -> None:
    policy = {
        "per_number_hour": 5,
        "per_number_day": 15,  # equal to the default is fine
        "daily_spend_cap_usd": 10,  # an int for a float
        "retry_interval_s": 600,  # waiting longer between retries is tighter
        "allowed_countries": ["IE"],
        "quiet_hours_start": "20:30",
        "agent_first": False,
        # How often the customer hears from us is the site's choice, within a range.
        "reminder_interval_s": 3600,
        "late_after_s": 120,
        "max_texts": 0,
    }
    doc = changed(BASE, (("sites", 0, "callback_policy"), policy))
    got = load(tmp_path, doc).sites["acme"].callback_policy
    assert got == replace(
        CallbackPolicy(),
        per_number_hour=5,
        daily_spend_cap_usd=10.0,
        retry_interval_s=600,
        allowed_countries=("IE",),
        quiet_hours_start=clock(20, 30),
        agent_first=False,
        reminder_interval_s=3600,
        late_after_s=120,
        max_texts=0,
    )
    assert isinstance(got.daily_spend_cap_usd, float)


def test_several_sites(tmp_path: Path) -> None:
    other = {"id": "globex", "agents": [{"id": "anna"}]}  # agent ids are per site
    settings = load(tmp_path, changed(BASE, (("sites", 1), other)))
    assert list(settings.sites) == ["acme", "globex"]
    assert settings.sites["globex"].agents["anna"].site == "globex"


# --- bad configs: each names its key --------------------------------------------------------

S0 = ("sites", 0)
B = ("sites", 0, "branches")
A = ("sites", 0, "agents")
POLICY = ("sites", 0, "callback_policy")

BAD: list[tuple[str, tuple[tuple[Path_, Any], ...], str]] = [
    # sites
    ("no sites", ((("sites",), DELETE),), "sites"),
    ("empty sites", ((("sites",), []),), "sites"),
    ("site not a table", ((("sites", 0), "acme"),), "sites[0]"),
    ("site id missing", (((*S0, "id"), DELETE),), "sites[0].id"),
    ("site id bad", (((*S0, "id"), "ac me"),), "sites[0].id"),
    ("site id too long", (((*S0, "id"), "a" * 65),), "sites[0].id"),
    ("duplicate site id", ((("sites", 1), {"id": "acme"}),), "sites[1].id"),
    ("site name not a string", (((*S0, "name"), 5),), "sites[0].name"),
    ("origin without scheme", (((*S0, "origins", 0), "shop.example"),), "sites[0].origins[0]"),
    ("origin with path", (((*S0, "origins", 1), "http://localhost:8080/"),), "sites[0].origins[1]"),
    ("origin ftp", (((*S0, "origins", 0), "ftp://shop.example"),), "sites[0].origins[0]"),
    ("origin wildcard", (((*S0, "origins", 0), "*"),), "sites[0].origins[0]"),
    ("origins not a list", (((*S0, "origins"), "https://shop.example"),), "sites[0].origins"),
    ("origins not strings", (((*S0, "origins"), [1]),), "sites[0].origins"),
    ("ring timeout too short", (((*S0, "ring_timeout_s"), 2),), "sites[0].ring_timeout_s"),
    ("ring timeout too long", (((*S0, "ring_timeout_s"), 120.5),), "sites[0].ring_timeout_s"),
    ("ring timeout a string", (((*S0, "ring_timeout_s"), "20"),), "sites[0].ring_timeout_s"),
    (
        "mobile after desktop not a boolean",
        (((*S0, "mobile_after_desktop"), "yes"),),
        "sites[0].mobile_after_desktop",
    ),
    (
        "history kept no day",
        (((*S0, "history_retention_days"), 0),),
        "sites[0].history_retention_days",
    ),
    (
        "history kept past ten years",
        (((*S0, "history_retention_days"), 3651),),
        "sites[0].history_retention_days",
    ),
    ("caller id not a number", (((*S0, "caller_ids", 1), "call me"),), "sites[0].caller_ids[1]"),
    ("caller id invalid", (((*S0, "caller_ids", 0), "+1555"),), "sites[0].caller_ids[0]"),
    # branches
    ("branch not a table", (((*B, 0), "dublin"),), "sites[0].branches[0]"),
    ("branch id missing", (((*B, 1, "id"), DELETE),), "sites[0].branches[1].id"),
    ("branch id bad", (((*B, 1, "id"), "ber/lin"),), "sites[0].branches[1].id"),
    ("duplicate branch id", (((*B, 1, "id"), "dublin"),), "sites[0].branches[1].id"),
    (
        "unknown time zone",
        (((*B, 1, "timezone"), "Mars/Olympus"),),
        "sites[0].branches[1].timezone",
    ),
    (
        "time zone path",
        (((*B, 1, "timezone"), "../../etc/passwd"),),
        "sites[0].branches[1].timezone",
    ),
    ("time zone empty", (((*B, 0, "timezone"), ""),), "sites[0].branches[0].timezone"),
    ("time zone not a string", (((*B, 0, "timezone"), 1),), "sites[0].branches[0].timezone"),
    ("latitude beyond 90", (((*B, 0, "lat"), 90.5),), "sites[0].branches[0].lat"),
    ("longitude beyond 180", (((*B, 0, "lon"), -181),), "sites[0].branches[0].lon"),
    ("latitude a string", (((*B, 0, "lat"), "53N"),), "sites[0].branches[0].lat"),
    (
        "holiday not a date",
        (((*B, 0, "holidays"), ["2026-12-25", "2026-13-01"]),),
        "sites[0].branches[0].holidays[1]",
    ),
    (
        "holidays not a list",
        (((*B, 0, "holidays"), "2026-12-25"),),
        "sites[0].branches[0].holidays",
    ),
    (
        "languages not strings",
        (((*B, 0, "languages"), ["en", 1]),),
        "sites[0].branches[0].languages",
    ),
    ("hours not a table", (((*B, 0, "hours"), ["09:00-17:00"]),), "sites[0].branches[0].hours"),
    (
        "hours unknown weekday",
        (((*B, 0, "hours", "monday"), ["09:00-17:00"]),),
        "sites[0].branches[0].hours.monday",
    ),
    (
        "hours day not a list",
        (((*B, 0, "hours", "mon"), "09:00-17:00"),),
        "sites[0].branches[0].hours.mon",
    ),
    (
        "span without leading zero",
        (((*B, 0, "hours", "mon"), ["9:00-17:00"]),),
        "sites[0].branches[0].hours.mon",
    ),
    (
        "span with spaces",
        (((*B, 0, "hours", "mon"), ["09:00 - 17:00"]),),
        "sites[0].branches[0].hours.mon",
    ),
    (
        "span minute 60",
        (((*B, 0, "hours", "mon"), ["09:00-17:60"]),),
        "sites[0].branches[0].hours.mon",
    ),
    (
        "span opens at 24:00",
        (((*B, 0, "hours", "mon"), ["24:00-02:00"]),),
        "sites[0].branches[0].hours.mon",
    ),
    (
        "span opens at 25:00",
        (((*B, 0, "hours", "mon"), ["25:00-26:00"]),),
        "sites[0].branches[0].hours.mon",
    ),
    ("span one time", (((*B, 0, "hours", "mon"), ["09:00"]),), "sites[0].branches[0].hours.mon"),
    ("span a number", (((*B, 0, "hours", "mon"), [900]),), "sites[0].branches[0].hours.mon"),
    (
        "second bad span",
        (((*B, 0, "hours", "tue"), ["09:00-12:00", "13:00-1700"]),),
        "sites[0].branches[0].hours.tue",
    ),
    # agents
    ("agent not a table", (((*A, 0), "anna"),), "sites[0].agents[0]"),
    ("agent id missing", (((*A, 0, "id"), DELETE),), "sites[0].agents[0].id"),
    ("agent id bad", (((*A, 0, "id"), "anna smith"),), "sites[0].agents[0].id"),
    ("duplicate agent id", (((*A, 1, "id"), "anna"),), "sites[0].agents[1].id"),
    ("agent in unknown branch", (((*A, 0, "branch"), "paris"),), "sites[0].agents[0].branch"),
    (
        "agent branch is case sensitive",
        (((*A, 1, "branch"), "Berlin"),),
        "sites[0].agents[1].branch",
    ),
    ("agent mobile not a number", (((*A, 0, "mobile"), "call anna"),), "sites[0].agents[0].mobile"),
    ("agent mobile invalid", (((*A, 0, "mobile"), "+1555"),), "sites[0].agents[0].mobile"),
    ("agent mobile national", (((*A, 0, "mobile"), "087 123 4567"),), "sites[0].agents[0].mobile"),
    ("agent mobile an int", (((*A, 0, "mobile"), 353871234567),), "sites[0].agents[0].mobile"),
    ("agent role visitor", (((*A, 0, "role"), "visitor"),), "sites[0].agents[0].role"),
    ("agent role unknown", (((*A, 1, "role"), "admin"),), "sites[0].agents[1].role"),
    ("agent skills not strings", (((*A, 0, "skills"), [1]),), "sites[0].agents[0].skills"),
    ("agent name not a string", (((*A, 0, "name"), ["Anna"]),), "sites[0].agents[0].name"),
    # callback policy
    ("policy not a table", ((POLICY, "strict"),), "sites[0].callback_policy"),
    (
        "policy unknown key",
        ((POLICY, {"per_number_week": 3}),),
        "sites[0].callback_policy.per_number_week",
    ),
    (
        "policy loosens per number hour",
        ((POLICY, {"per_number_hour": 10}),),
        "sites[0].callback_policy.per_number_hour",
    ),
    (
        "policy loosens concurrency",
        ((POLICY, {"max_concurrent_calls": 21}),),
        "sites[0].callback_policy.max_concurrent_calls",
    ),
    (
        "policy loosens spend cap",
        ((POLICY, {"daily_spend_cap_usd": 50.01}),),
        "sites[0].callback_policy.daily_spend_cap_usd",
    ),
    ("policy loosens retries", ((POLICY, {"retries": 3}),), "sites[0].callback_policy.retries"),
    (
        "policy loosens site hour",
        ((POLICY, {"per_site_hour": 100000}),),
        "sites[0].callback_policy.per_site_hour",
    ),
    (
        "policy limit a string",
        ((POLICY, {"per_ip_hour": "5"}),),
        "sites[0].callback_policy.per_ip_hour",
    ),
    (
        "policy limit a float",
        ((POLICY, {"per_ip_hour": 5.0}),),
        "sites[0].callback_policy.per_ip_hour",
    ),
    ("policy limit a bool", ((POLICY, {"retries": True}),), "sites[0].callback_policy.retries"),
    ("policy flag an int", ((POLICY, {"agent_first": 1}),), "sites[0].callback_policy.agent_first"),
    (
        "policy time bad",
        ((POLICY, {"quiet_hours_start": "late"}),),
        "sites[0].callback_policy.quiet_hours_start",
    ),
    (
        "policy time a number",
        ((POLICY, {"quiet_hours_end": 8}),),
        "sites[0].callback_policy.quiet_hours_end",
    ),
    (
        "policy list a string",
        ((POLICY, {"allowed_countries": "IE"}),),
        "sites[0].callback_policy.allowed_countries",
    ),
    # auth
    ("auth algorithm HS512", ((("auth",), {"algorithm": "HS512"}),), "auth.algorithm"),
    ("auth algorithm none", ((("auth",), {"algorithm": "none"}),), "auth.algorithm"),
    ("auth algorithm lower case", ((("auth",), {"algorithm": "rs256"}),), "auth.algorithm"),
    ("auth RS256 without key", ((("auth",), {"algorithm": "RS256"}),), "auth.private_key_file"),
    (
        "auth key file missing",
        ((("auth",), {"algorithm": "ES256", "private_key_file": "nope.pem"}),),
        "auth.private_key_file",
    ),
    ("auth issuer not a string", ((("auth",), {"issuer": 1}),), "auth.issuer"),
    ("auth leeway too big", ((("auth",), {"leeway_s": 121}),), "auth.leeway_s"),
    ("auth leeway negative", ((("auth",), {"leeway_s": -1}),), "auth.leeway_s"),
    ("auth leeway a float", ((("auth",), {"leeway_s": 1.5}),), "auth.leeway_s"),
    (
        "auth outside key HS256",
        ((("auth",), {"keys": [{"kid": "k", "algorithm": "HS256", "public_key_file": "k.pem"}]}),),
        "auth.keys[0].algorithm",
    ),
    (
        "auth outside key no algorithm",
        ((("auth",), {"keys": [{"kid": "k", "public_key_file": "k.pem"}]}),),
        "auth.keys[0].algorithm",
    ),
    (
        "auth outside key file missing",
        (
            (
                ("auth",),
                {
                    "keys": [
                        {"kid": "k", "algorithm": "RS256", "public_key_file": "k.pem"},
                        {"kid": "j", "algorithm": "ES256", "public_key_file": "gone.pem"},
                    ]
                },
            ),
        ),
        "auth.keys[1].public_key_file",
    ),
    ("auth jwks url not a string", ((("auth",), {"jwks_url": ["https://idp"]}),), "auth.jwks_url"),
    # server and presence
    ("port a string", ((("server",), {"port": "8080"}),), "server.port"),
    ("port a bool", ((("server",), {"port": True}),), "server.port"),
    ("redis url not a string", ((("server",), {"redis_url": 6379}),), "server.redis_url"),
    ("max body a float", ((("server",), {"max_body_bytes": 1.5}),), "server.max_body_bytes"),
    ("sweep too slow", ((("presence",), {"sweep_interval_s": 2}),), "presence.sweep_interval_s"),
    ("sweep too fast", ((("presence",), {"sweep_interval_s": 0.01}),), "presence.sweep_interval_s"),
    ("device ttl a string", ((("presence",), {"device_ttl_s": "60"}),), "presence.device_ttl_s"),
    ("device ttl nan", ((("presence",), {"device_ttl_s": float("nan")}),), "presence.device_ttl_s"),
    ("socket ttl inf", ((("presence",), {"socket_ttl_s": float("inf")}),), "presence.socket_ttl_s"),
    ("port zero", ((("server",), {"port": 0}),), "server.port"),
    ("port too big", ((("server",), {"port": 65536}),), "server.port"),
    ("port negative", ((("server",), {"port": -1}),), "server.port"),
    ("max body zero", ((("server",), {"max_body_bytes": 0}),), "server.max_body_bytes"),
    ("max body negative", ((("server",), {"max_body_bytes": -1}),), "server.max_body_bytes"),
    ("drain grace a string", ((("server",), {"drain_grace_s": "10"}),), "server.drain_grace_s"),
    ("drain grace too short", ((("server",), {"drain_grace_s": 0.5}),), "server.drain_grace_s"),
    ("drain grace too long", ((("server",), {"drain_grace_s": 301}),), "server.drain_grace_s"),
    ("drain grace nan", ((("server",), {"drain_grace_s": float("nan")}),), "server.drain_grace_s"),
    ("retention too short", ((("server",), {"retention_days": 0.5}),), "server.retention_days"),
    ("retention a string", ((("server",), {"retention_days": "90"}),), "server.retention_days"),
    ("loop lag zero", ((("server",), {"max_loop_lag_ms": 0}),), "server.max_loop_lag_ms"),
    ("loop lag negative", ((("server",), {"max_loop_lag_ms": -5}),), "server.max_loop_lag_ms"),
    ("loop lag a string", ((("server",), {"max_loop_lag_ms": "15"}),), "server.max_loop_lag_ms"),
    (
        "starting calls a float",
        ((("server",), {"max_starting_calls": 1.5}),),
        "server.max_starting_calls",
    ),
    # minor ones
    ("latitude a bool", (((*B, 0, "lat"), True),), "sites[0].branches[0].lat"),
    ("longitude a bool", (((*B, 0, "lon"), False),), "sites[0].branches[0].lon"),
    ("latitude nan", (((*B, 0, "lat"), float("nan")),), "sites[0].branches[0].lat"),
    ("branches not a list", (((*S0, "branches"), 5),), "sites[0].branches"),
    ("agents not a list", (((*S0, "agents"), {"id": "anna"}),), "sites[0].agents"),
    ("agent branch a number", (((*A, 0, "branch"), 1),), "sites[0].agents[0].branch"),
    (
        "span closes 24:01",
        (((*B, 0, "hours", "mon"), ["09:00-24:01"]),),
        "sites[0].branches[0].hours.mon",
    ),
    (
        "span opens minute 60",
        (((*B, 0, "hours", "mon"), ["09:60-17:00"]),),
        "sites[0].branches[0].hours.mon",
    ),
    (
        "span trailing newline",
        (((*B, 0, "hours", "mon"), ["09:00-17:00\n"]),),
        "sites[0].branches[0].hours.mon",
    ),
    ("site id trailing newline", (((*S0, "id"), "acme\n"),), "sites[0].id"),
    ("branch id trailing newline", (((*B, 0, "id"), "dublin\n"),), "sites[0].branches[0].id"),
    ("auth keys not a list", ((("auth",), {"keys": {"kid": "k"}}),), "auth.keys"),
    (
        "auth key file empty",
        ((("auth",), {"keys": [{"kid": "k", "algorithm": "RS256"}]}),),
        "auth.keys[0].public_key_file",
    ),
    (
        "auth private key file a list",
        ((("auth",), {"algorithm": "RS256", "private_key_file": ["k.pem"]}),),
        "auth.private_key_file",
    ),
    ("visitor ttl zero", ((("auth",), {"visitor_token_ttl_s": 0}),), "auth.visitor_token_ttl_s"),
    ("agent ttl negative", ((("auth",), {"agent_token_ttl_s": -60}),), "auth.agent_token_ttl_s"),
    (
        "policy limit zero",
        ((POLICY, {"per_number_hour": 0}),),
        "sites[0].callback_policy.per_number_hour",
    ),
    (
        "policy limit negative",
        ((POLICY, {"per_site_hour": -1}),),
        "sites[0].callback_policy.per_site_hour",
    ),
    (
        "policy spend cap zero",
        ((POLICY, {"daily_spend_cap_usd": 0}),),
        "sites[0].callback_policy.daily_spend_cap_usd",
    ),
    (
        "policy spend cap nan",
        ((POLICY, {"daily_spend_cap_usd": float("nan")}),),
        "sites[0].callback_policy.daily_spend_cap_usd",
    ),
    ("policy retries negative", ((POLICY, {"retries": -1}),), "sites[0].callback_policy.retries"),
    (
        "policy retry interval below",
        ((POLICY, {"retry_interval_s": 119}),),
        "sites[0].callback_policy.retry_interval_s",
    ),
    (
        "policy quiet starts later",
        ((POLICY, {"quiet_hours_start": "22:00"}),),
        "sites[0].callback_policy.quiet_hours_start",
    ),
    (
        "policy quiet ends sooner",
        ((POLICY, {"quiet_hours_end": "07:59"}),),
        "sites[0].callback_policy.quiet_hours_end",
    ),
    (
        "policy quiet ends at midnight",
        ((POLICY, {"quiet_hours_end": "00:00"}),),
        "sites[0].callback_policy.quiet_hours_end",
    ),
    (
        "policy quiet daytime",
        ((POLICY, {"quiet_hours_start": "09:00", "quiet_hours_end": "17:00"}),),
        "sites[0].callback_policy.quiet_hours_start",
    ),
    (
        "policy quiet empty",
        ((POLICY, {"quiet_hours_start": "08:00"}),),
        "sites[0].callback_policy.quiet_hours_start",
    ),
    (
        "policy blocked types dropped one",
        ((POLICY, {"blocked_number_types": ["PREMIUM_RATE"]}),),
        "sites[0].callback_policy.blocked_number_types",
    ),
]


@pytest.mark.parametrize(("changes", "key"), [pytest.param(c, k, id=name) for name, c, k in BAD])
def test_bad_config_names_its_key(
    tmp_path: Path, changes: tuple[tuple[Path_, Any], ...], key: str
) -> None:
    (tmp_path / "k.pem").write_text("a public key")
    load(tmp_path, BASE)  # the base is good: only the change breaks it
    error = config_error(tmp_path, changed(BASE, *changes))
    assert error.key == key
    message = str(error)
    assert message.startswith(f"config error: {key}: ") and len(message) > len(key) + 16
    assert "\n" not in message


def test_not_toml(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[[sites]\nid = "acme"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert caught.value.key == str(path)
    assert str(caught.value).startswith(f"config error: {path}: not valid TOML")
    assert "\n" not in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert caught.value.key == str(path)
    assert "cannot read config file" in str(caught.value)


# --- bugs found (regressions) ---------------------------------------------------------------


@pytest.mark.parametrize("span", ["00:00-24:30", "09:00-25:00", "09:00-99:00"])
def test_closing_hour_past_24_00_refused(tmp_path: Path, span: str) -> None:
    error = config_error(tmp_path, changed(BASE, ((*B, 0, "hours", "mon"), [span])))
    assert error.key == "sites[0].branches[0].hours.mon"


def test_env_port_not_a_number(tmp_path: Path) -> None:
    error = config_error(tmp_path, BASE, env={"MEMBRANE_PORT": "80a"})
    assert "PORT" in error.key.upper()


def test_drain_grace_from_the_file_or_the_environment(tmp_path: Path) -> None:
    from_file = changed(BASE, (("server",), {"drain_grace_s": 25}))
    assert load(tmp_path, from_file).drain_grace_s == 25.0
    assert load(tmp_path, from_file, env={"MEMBRANE_DRAIN_GRACE_S": "4.5"}).drain_grace_s == 4.5
    for bad in ("ten", "0", "inf", ""):
        error = config_error(tmp_path, BASE, env={"MEMBRANE_DRAIN_GRACE_S": bad})
        assert error.key == "server.drain_grace_s"


def test_the_loop_lag_limit_from_the_file_or_the_environment(tmp_path: Path) -> None:
    doc = changed(BASE, (("server",), {"max_loop_lag_ms": 25, "max_starting_calls": 4}))
    from_file = load(tmp_path, doc).admission
    assert (from_file.max_loop_lag_s, from_file.max_starts_in_flight) == (0.025, 4)
    assert load(tmp_path, doc, env={"MEMBRANE_MAX_LOOP_LAG_MS": "7.5"}).admission == replace(
        from_file, max_loop_lag_s=0.0075
    )
    starting = load(tmp_path, doc, env={"MEMBRANE_MAX_STARTING_CALLS": "6"}).admission
    assert starting.max_starts_in_flight == 6
    for bad in ("1.5", "six", "0"):
        error = config_error(tmp_path, doc, env={"MEMBRANE_MAX_STARTING_CALLS": bad})
        assert error.key == "server.max_starting_calls"
    error = config_error(tmp_path, doc, env={"MEMBRANE_MAX_LOOP_LAG_MS": "fast"})
    assert error.key == "server.max_loop_lag_ms"
    error = config_error(tmp_path, doc, env={"MEMBRANE_MAX_LOOP_LAG_MS": "0"})
    assert error.key == "server.max_loop_lag_ms"


def test_the_start_time_limit_from_the_file_or_the_environment(tmp_path: Path) -> None:
    assert load(tmp_path, BASE).admission.max_start_s == AdmissionLimits().max_start_s
    doc = changed(BASE, (("server",), {"max_start_ms": 40}))
    assert load(tmp_path, doc).admission.max_start_s == 0.04
    assert load(tmp_path, doc, env={"MEMBRANE_MAX_START_MS": "12.5"}).admission.max_start_s == (
        0.0125
    )
    for bad in ("slow", "0", "-3"):
        error = config_error(tmp_path, doc, env={"MEMBRANE_MAX_START_MS": bad})
        assert error.key == "server.max_start_ms"


def test_agent_branch_a_list(tmp_path: Path) -> None:
    error = config_error(tmp_path, changed(BASE, ((*A, 0, "branch"), ["dublin"])))
    assert error.key == "sites[0].agents[0].branch"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ((("server",), 5), "server"),
        ((("auth",), "HS256"), "auth"),
        ((("presence",), [60]), "presence"),
        ((("auth",), {"keys": ["kid"]}), "auth.keys[0]"),
        ((("sites",), 5), "sites"),
    ],
)
def test_section_not_a_table(tmp_path: Path, changes: tuple[Path_, Any], key: str) -> None:
    error = config_error(tmp_path, changed(BASE, changes))
    assert error.key == key


@pytest.mark.parametrize("name", ["device_ttl_s", "socket_ttl_s"])
def test_presence_ttl_names_its_key(tmp_path: Path, name: str) -> None:
    error = config_error(tmp_path, changed(BASE, (("presence",), {name: 0.5})))
    assert error.key == f"presence.{name}"


@pytest.mark.parametrize(
    ("policy", "key"),
    [
        ({"allowed_countries": ["US", "KP"]}, "allowed_countries"),
        ({"blocked_number_types": []}, "blocked_number_types"),
        ({"retry_interval_s": 0}, "retry_interval_s"),
        ({"reminder_interval_s": 599}, "reminder_interval_s"),
        ({"late_after_s": 7201}, "late_after_s"),
        ({"max_texts": 6}, "max_texts"),
        ({"max_texts": -1}, "max_texts"),
    ],
)
def test_callback_policy_may_not_loosen_lists_or_retry_interval(
    tmp_path: Path, policy: dict[str, Any], key: str
) -> None:
    error = config_error(tmp_path, changed(BASE, (POLICY, policy)))
    assert error.key == f"sites[0].callback_policy.{key}"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (((*A, 0, "id"), "anna\n"), "sites[0].agents[0].id"),
        (((*S0, "origins", 0), "https://shop.example\n"), "sites[0].origins[0]"),
    ],
)
def test_trailing_newline_refused(tmp_path: Path, change: tuple[Path_, Any], key: str) -> None:
    error = config_error(tmp_path, changed(BASE, change))
    assert error.key == key


def test_closing_at_24_00_is_midnight(tmp_path: Path) -> None:
    doc = changed(BASE, ((*B, 0, "hours"), {"mon": ["09:00-24:00"], "tue": ["22:00-06:00"]}))
    hours = load(tmp_path, doc).sites["acme"].branches["dublin"].hours
    assert hours == {
        0: (OpeningSpan(clock(9), clock(0)),),
        1: (OpeningSpan(clock(22), clock(6)),),
    }


@pytest.mark.parametrize("port", ["0", "65536", "-1", " 80", "8_0", "", "\u0668\u0660"])
def test_env_port_out_of_range_or_malformed(tmp_path: Path, port: str) -> None:
    error = config_error(tmp_path, BASE, env={"MEMBRANE_PORT": port})
    assert error.key == "server.port"


def test_port_bounds(tmp_path: Path) -> None:
    assert load(tmp_path, BASE, env={"MEMBRANE_PORT": "65535"}).port == 65535
    assert load(tmp_path, changed(BASE, (("server",), {"port": 1}))).port == 1
    # 0 (any free port) only from the programmatic override, as the tests' app fixture uses.
    assert load_settings(write_config(tmp_path, BASE), env={}, port=0).port == 0
    for bad in (-1, 65536, True, "80"):
        with pytest.raises(ConfigError) as caught:
            load_settings(write_config(tmp_path, BASE), env={}, port=bad)
        assert caught.value.key == "server.port"


@pytest.mark.parametrize(
    "policy",
    [
        {"quiet_hours_start": "20:00", "quiet_hours_end": "09:00"},
        {"quiet_hours_end": "12:00"},
        {"quiet_hours_start": "12:00", "quiet_hours_end": "11:59"},
        {"quiet_hours_start": "21:00", "quiet_hours_end": "08:00"},
        {"blocked_number_types": [*CallbackPolicy().blocked_number_types, "TOLL_FREE"]},
        {"allowed_countries": []},
        {"retries": 0, "retry_interval_s": 121},
    ],
)
def test_callback_policy_tightenings_accepted(tmp_path: Path, policy: dict[str, Any]) -> None:
    got = load(tmp_path, changed(BASE, (POLICY, policy))).sites["acme"].callback_policy
    for key, value in policy.items():
        if isinstance(value, list):
            value = tuple(value)
        elif key.startswith("quiet"):
            value = clock.fromisoformat(value)
        assert getattr(got, key) == value


# --- environment overrides ------------------------------------------------------------------


def test_env_overrides_the_file(tmp_path: Path) -> None:
    doc = changed(
        BASE,
        (
            ("server",),
            {"redis_url": "redis://file:6379/0", "port": 8081, "host": "0.0.0.0", "node_id": "f"},
        ),
        (("auth",), {"secret": "from-the-file-" + "x" * 32, "issuer": "file-issuer"}),
    )
    from_file = load(tmp_path, doc)
    assert (from_file.redis_url, from_file.port, from_file.host) == (
        "redis://file:6379/0",
        8081,
        "0.0.0.0",
    )
    assert from_file.public_url == "http://0.0.0.0:8081"
    env = {
        "MEMBRANE_REDIS_URL": "redis://env:6380/1",
        "MEMBRANE_JWT_SECRET": STRONG,
        "MEMBRANE_PORT": "9090",
        "MEMBRANE_HOST": "10.0.0.1",
        "MEMBRANE_NODE_ID": "node-env",
        "MEMBRANE_JWT_ISSUER": "env-issuer",
        "MEMBRANE_JWKS_URL": "https://idp.example/jwks.json",
        "MEMBRANE_DATA_DIR": str(tmp_path / "env-data"),
        "MEMBRANE_PUBLIC_URL": "https://gw.example",
    }
    settings = load(tmp_path, doc, env=env)
    assert settings.redis_url == "redis://env:6380/1"
    assert settings.auth.secret == STRONG
    assert settings.port == 9090 and isinstance(settings.port, int)
    assert (settings.host, settings.node_id) == ("10.0.0.1", "node-env")
    assert (settings.auth.issuer, settings.auth.jwks_url) == (
        "env-issuer",
        "https://idp.example/jwks.json",
    )
    assert settings.data_dir == tmp_path / "env-data"
    assert settings.public_url == "https://gw.example"


def test_command_line_overrides_beat_env(tmp_path: Path) -> None:
    env = {"MEMBRANE_REDIS_URL": "redis://env:6380/1", "MEMBRANE_PORT": "9090"}
    settings = load_settings(
        write_config(tmp_path, BASE),
        env=env,
        redis_url="redis://cli:6381/2",
        port=7070,
        host=None,  # not given on the command line: no override
        data_dir=tmp_path / "cli-data",
    )
    assert (settings.redis_url, settings.port, settings.host) == (
        "redis://cli:6381/2",
        7070,
        "127.0.0.1",
    )
    assert settings.data_dir == tmp_path / "cli-data"
    assert settings.public_url == "http://127.0.0.1:7070"


def test_env_defaults_to_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("MEMBRANE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEMBRANE_REDIS_URL", "redis://process:6379/3")
    monkeypatch.setenv("MEMBRANE_JWT_SECRET", STRONG)
    monkeypatch.setenv("MEMBRANE_PORT", "8181")
    settings = load_settings(write_config(tmp_path, BASE))
    assert (settings.redis_url, settings.auth.secret, settings.port) == (
        "redis://process:6379/3",
        STRONG,
        8181,
    )
    # An explicit env mapping ignores the process environment.
    assert load_settings(write_config(tmp_path, BASE), env={}).redis_url == ""


def test_key_files_are_relative_to_the_config(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    (conf_dir / "keys").mkdir(parents=True)
    (conf_dir / "keys" / "idp.pem").write_text("PEM TEXT")
    doc = changed(
        BASE,
        (
            ("auth",),
            {"keys": [{"kid": "idp", "algorithm": "ES256", "public_key_file": "keys/idp.pem"}]},
        ),
    )
    auth = load_settings(write_config(conf_dir, doc), env={}).auth
    assert [(k.kid, k.algorithm, k.public_key_pem) for k in auth.extra_keys] == [
        ("idp", "ES256", "PEM TEXT")
    ]


# --- with_dev_secret ------------------------------------------------------------------------


def demo(tmp_path: Path, **auth_changes: Any) -> Settings:
    settings = load_settings(None, env={}, data_dir=tmp_path / "data")
    return replace(settings, auth=replace(settings.auth, **auth_changes))


def test_dev_secret_generated_once_and_reused(tmp_path: Path) -> None:
    settings = demo(tmp_path)
    assert not (tmp_path / "data").exists()
    first = with_dev_secret(settings)
    path = tmp_path / "data" / "dev-jwt-secret"
    assert len(first.auth.secret) >= 32
    assert path.read_text() == first.auth.secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Everything but the secret is unchanged.
    assert replace(first, auth=replace(first.auth, secret="")) == settings
    # The next start (and `membrane token`) reads the same secret.
    assert with_dev_secret(settings).auth.secret == first.auth.secret
    assert with_dev_secret(demo(tmp_path)).auth.secret == first.auth.secret
    # Another data directory gets its own.
    other = with_dev_secret(demo(tmp_path / "other"))
    assert other.auth.secret != first.auth.secret and len(other.auth.secret) >= 32


def test_dev_secret_file_is_stripped(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dev-jwt-secret").write_text(f"  {STRONG}\n")
    assert with_dev_secret(demo(tmp_path)).auth.secret == STRONG


async def test_dev_secret_tokens_verify(tmp_path: Path) -> None:
    token, _ = TokenService(with_dev_secret(demo(tmp_path)).auth).mint("anna", "acme", Role.AGENT)
    claims = await TokenService(with_dev_secret(demo(tmp_path)).auth).verify(token)
    assert claims.sub == "anna"
    with pytest.raises(DomainError):
        await TokenService(with_dev_secret(demo(tmp_path / "elsewhere")).auth).verify(token)


def test_configured_secret_kept_and_no_file_written(tmp_path: Path) -> None:
    settings = demo(tmp_path, secret=STRONG)
    assert with_dev_secret(settings) is settings
    assert not (tmp_path / "data").exists()


def test_secret_of_exactly_32_characters_accepted(tmp_path: Path) -> None:
    settings = demo(tmp_path, secret="k" * 32)
    assert with_dev_secret(settings).auth.secret == "k" * 32


@pytest.mark.parametrize(
    "secret",
    ["change-me", "CHANGEME", "secret", "Please-Change", "k" * 31, "short"],
)
def test_placeholder_or_short_secret_refused(tmp_path: Path, secret: str) -> None:
    with pytest.raises(ConfigError) as caught:
        with_dev_secret(demo(tmp_path, secret=secret))
    assert caught.value.key == "auth.secret"
    assert not (tmp_path / "data").exists()


def test_placeholder_secret_from_env_refused(tmp_path: Path) -> None:
    settings = load(tmp_path, BASE, env={"MEMBRANE_JWT_SECRET": "changeme"})
    with pytest.raises(ConfigError) as caught:
        with_dev_secret(settings)
    assert caught.value.key == "auth.secret"


def test_asymmetric_algorithm_needs_no_dev_secret(tmp_path: Path) -> None:
    settings = demo(tmp_path, algorithm="RS256", secret="")
    assert with_dev_secret(settings) is settings
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("stored", ["", "\n", "short"])
def test_empty_or_short_stored_dev_secret_not_used(tmp_path: Path, stored: str) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dev-jwt-secret").write_text(stored)
    try:
        secret = with_dev_secret(demo(tmp_path)).auth.secret
    except ConfigError:
        return  # refusing to start is as good as replacing it
    assert len(secret) >= 32


def test_bad_stored_dev_secret_replaced_atomically(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / "dev-jwt-secret"
    path.write_text("")
    secret = with_dev_secret(demo(tmp_path)).auth.secret
    assert len(secret) >= 32 and path.read_text() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in data.iterdir()) == ["dev-jwt-secret"]  # no temp file left
    # Kept from now on.
    assert with_dev_secret(demo(tmp_path)).auth.secret == secret


def test_dev_secret_never_left_empty_by_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(ConfigError) as caught:
        with_dev_secret(demo(tmp_path))
    assert caught.value.key == "server.data_dir"
    data = tmp_path / "data"
    assert list(data.iterdir()) == []  # neither the secret file nor a temp file
    monkeypatch.undo()
    assert len(with_dev_secret(demo(tmp_path)).auth.secret) >= 32


# --- the CLI, as a process ------------------------------------------------------------------

CLI = "from gateway.cli import main; raise SystemExit(main())"


def run_cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMBRANE_")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ((((*B, 1, "timezone"), "Mars/Olympus"),), "sites[0].branches[1].timezone"),
        ((((*A, 0, "branch"), "paris"),), "sites[0].agents[0].branch"),
        ((((*A, 0, "mobile"), "+1555"),), "sites[0].agents[0].mobile"),
        (((("auth",), {"algorithm": "none"}),), "auth.algorithm"),
        (((POLICY, {"per_number_hour": 99}),), "sites[0].callback_policy.per_number_hour"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "token"])
def test_cli_bad_config_one_line_naming_the_key(
    tmp_path: Path, command: str, changes: tuple[tuple[Path_, Any], ...], key: str
) -> None:
    config = write_config(tmp_path, changed(BASE, *changes))
    args = ["--config", str(config), "--data-dir", str(tmp_path / "data")]
    if command == "token":
        args += ["--agent", "anna"]
    result = run_cli(tmp_path, command, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"config error: {key}: ")
    assert result.stdout == ""


def test_cli_not_toml(tmp_path: Path) -> None:
    config = write_config(tmp_path, "sites = [[[")
    result = run_cli(tmp_path, "serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"config error: {config}: not valid TOML")


def test_cli_placeholder_secret_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, BASE)
    result = run_cli(
        tmp_path, "serve", "--config", str(config), env={"MEMBRANE_JWT_SECRET": "change-me"}
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config error: auth.secret: is a placeholder or shorter than 32 characters"
    ]


async def test_cli_token_verifies_with_the_dev_secret(tmp_path: Path) -> None:
    data = tmp_path / "data"
    before = time.time()
    first = run_cli(tmp_path, "token", "--agent", "anna", "--data-dir", str(data))
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    token = first.stdout.strip()
    assert first.stdout == token + "\n" and token.count(".") == 2
    assert (data / "dev-jwt-secret").exists()

    auth = with_dev_secret(load_settings(None, env={}, data_dir=data)).auth
    service = TokenService(auth)
    claims = await service.verify(token)
    assert (claims.sub, claims.site, claims.role) == ("anna", "acme", Role.AGENT)
    assert before + 12 * 3600 - 1 <= claims.exp <= time.time() + 12 * 3600

    # A second run reuses the stored secret; a supervisor gets the supervisor role; --ttl.
    second = run_cli(tmp_path, "token", "--agent", "sam", "--ttl", "60", "--data-dir", str(data))
    assert second.returncode == 0, second.stderr
    sam = await service.verify(second.stdout.strip())
    assert (sam.sub, sam.role) == ("sam", Role.SUPERVISOR)
    raw = jwt.decode(second.stdout.strip(), auth.secret, algorithms=["HS256"], audience=AUDIENCE)
    assert raw["exp"] - raw["iat"] == 60

    # A token from another data directory was signed with another secret.
    third = run_cli(tmp_path, "token", "--agent", "anna", "--data-dir", str(tmp_path / "d2"))
    assert third.returncode == 0, third.stderr
    with pytest.raises(DomainError):
        await service.verify(third.stdout.strip())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--agent", "zed"],
            "no agent 'zed' in site 'acme' (agents: anna, ben, carla, sam)",
        ),
        (["--agent", "anna", "--site", "globex"], "no site 'globex' in the config"),
    ],
)
def test_cli_token_unknown_agent_or_site(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli(tmp_path, "token", *args, "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message]
    assert result.stdout == ""


def test_cli_token_for_a_second_site(tmp_path: Path) -> None:
    doc = changed(BASE, (("sites", 1), {"id": "globex", "agents": [{"id": "gil"}]}))
    config = write_config(tmp_path, doc)
    common = ["--config", str(config), "--data-dir", str(tmp_path / "data")]
    ok = run_cli(tmp_path, "token", "--agent", "gil", "--site", "globex", *common)
    assert ok.returncode == 0, ok.stderr
    payload = jwt.decode(ok.stdout.strip(), options={"verify_signature": False})
    assert (payload["sub"], payload["site"], payload["iss"]) == ("gil", "globex", "membrane")
    # Without --site the first site is used, where gil is unknown.
    missing = run_cli(tmp_path, "token", "--agent", "gil", *common)
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == ["no agent 'gil' in site 'acme' (agents: anna, ben)"]


def test_twilio_credentials_come_from_the_environment() -> None:
    from gateway.settings import load_settings as load

    sid = "AC" + "0" * 32
    s = load(None, env={"MEMBRANE_TWILIO_ACCOUNT_SID": sid, "MEMBRANE_TWILIO_AUTH_TOKEN": "t" * 32})
    assert s.twilio.enabled and s.twilio.account_sid == sid
    assert not load(None, env={}).twilio.enabled
    with pytest.raises(ConfigError) as e:
        load(None, env={"MEMBRANE_TWILIO_ACCOUNT_SID": "nope", "MEMBRANE_TWILIO_AUTH_TOKEN": "t"})
    assert e.value.key == "twilio.account_sid"
    with pytest.raises(ConfigError) as e:
        load(None, env={"MEMBRANE_TWILIO_ACCOUNT_SID": sid})
    assert e.value.key == "twilio.auth_token"


def test_nodes_sharing_redis_need_one_configured_secret(tmp_path: Path) -> None:
    from gateway.settings import load_settings as load
    from gateway.settings import with_dev_secret as dev_secret

    settings = load(None, env={}, data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError) as e:
        dev_secret(settings)
    assert e.value.key == "auth.secret"
    configured = replace(settings, auth=replace(settings.auth, secret="s" * 40))
    assert dev_secret(configured).auth.secret == "s" * 40


# --- the shipped configs agree with the model's defaults -----------------------------------

# `key = value  # default X`: the example config's note that it shows a value of its own.
_DEFAULT_NOTE = re.compile(r"\s*(\w+)\s*=.*#.*\bdefault (\"[^\"]*\"|\S+)")
_HEADER = re.compile(r"\s*\[\[?([\w.]+)\]\]?")


def model_defaults() -> dict[str, dict[str, Any]]:
    """Each section's defaults as the file writes them (what a left-out key becomes)."""
    sections: dict[str, msgspec.Struct] = {
        "server": Settings(),
        "auth": AuthSettings(),
        "presence": PresenceSettings(),
        "webrtc": WebRTCSettings(),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, model in sections.items():
        out[name] = {
            f.name: getattr(model, f.name)
            for f in msgspec.structs.fields(model)
            if f.default_factory is msgspec.NODEFAULT  # the sections of their own
        }
    limits = AdmissionLimits()
    out["server"] |= {
        "max_loop_lag_ms": limits.max_loop_lag_s * 1000,
        "max_starting_calls": limits.max_starts_in_flight,
        "max_start_ms": limits.max_start_s * 1000,
    }
    out["sites"] = {
        key: Site.__dataclass_fields__[key].default
        for key in (
            "ring_timeout_s",
            "mobile_after_desktop",
            "survey",
            "referral_url",
            "history_retention_days",
        )
    }
    return out


def as_written(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, Path) else value


def default_notes(text: str) -> dict[str, str]:
    notes: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if header := _HEADER.match(line):
            section = header.group(1)
        elif note := _DEFAULT_NOTE.match(line):
            notes[f"{section}.{note.group(1)}"] = note.group(2)
    return notes


def shown_defaults(text: str, chosen: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, what the file says the default is, the model's default) for every key the file
    sets in a section with defaults; ``chosen`` names values that are the file's own."""
    doc = tomllib.loads(text)
    notes = default_notes(text)
    defaults = model_defaults()
    tables = {name: doc.get(name, {}) for name in defaults if name != "sites"}
    tables["sites"] = doc["sites"][0]
    rows = []
    for section, table in tables.items():
        for key, value in table.items():
            if key in (
                "id",
                "name",
                "origins",
                "caller_ids",
                "callback_policy",
                "sms_aliases",
                "branches",
                "agents",
            ):
                continue  # a site's own
            name = f"{section}.{key}"
            assert key in defaults[section], f"{name} is not a setting"
            if name in chosen:
                assert value == chosen[name], name
                continue
            claimed = value
            if name in notes:
                try:
                    claimed = tomllib.loads(f"v = {notes[name]}")["v"]
                except tomllib.TOMLDecodeError:
                    continue  # a default worked out from others, e.g. http://{host}:{port}
            rows.append((name, claimed, as_written(defaults[section][key])))
    return rows


def test_the_example_config_shows_the_defaults() -> None:
    text = (REPO / "deploy" / "membrane.example.toml").read_text()
    rows = shown_defaults(text, {})
    assert len(rows) >= 15
    for name, claimed, default in rows:
        assert claimed == default, f"{name}: the example says {claimed!r}, the model {default!r}"
    # Every setting is shown, set or commented out (the ones read from files have their own).
    for section, defaults in model_defaults().items():
        for key in defaults:
            if (section, key) in (("auth", "private_key_pem"), ("auth", "extra_keys")):
                continue
            assert re.search(rf"^\s*#?\s*{key}\s*=", text, re.M), f"{section}.{key} not shown"


def test_the_demo_config_keeps_the_defaults_but_its_issuer() -> None:
    rows = shown_defaults(demo_config_text(), {"auth.issuer": "membrane-demo"})
    assert len(rows) >= 6
    for name, claimed, default in rows:
        assert claimed == default, f"{name}: the demo says {claimed!r}, the model {default!r}"
