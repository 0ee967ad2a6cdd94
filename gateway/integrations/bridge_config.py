"""The XMPP presence bridge's configuration file (docs/AGENT_PRESENCE.md, "Running the XMPP
bridge"): a TOML file, with the two secrets also readable from the environment or from
files so that the file itself can be committed."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.wire.base import ID_PATTERN

SECRET_ENV = "MEMBRANE_BRIDGE_WEBHOOK_SECRET"
PASSWORD_ENV = "MEMBRANE_BRIDGE_XMPP_PASSWORD"
MIN_SECRET = 32
_BARE_JID = re.compile(r"[^@/\s]+@[^@/\s]+")


class BridgeConfigError(Exception):
    """A bad configuration: the key and what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    gateway_url: str
    """Where the gateway is reached (its public URL, or a node's address)."""
    site: str
    secret: str = field(repr=False)
    """The site's ``presence_webhook_secret``."""
    jid: str
    """The bridge's own XMPP account (a bot every agent is subscribed with)."""
    password: str = field(repr=False)
    agents: Mapping[str, str]
    """Bare JID (lower case) -> agent id."""
    host: str = ""
    """The XMPP server's address; empty: found from the JID's domain (DNS SRV)."""
    port: int = 5222
    allow_unencrypted: bool = False
    """Log in without TLS: only for a server on loopback or a trusted network (tests)."""
    renew_s: float = 3600.0
    """Every agent's state is posted again this often, renewing the im device's lease
    (``presence.im_ttl_s``, 12 h by default, must be longer)."""
    settle_s: float = 5.0
    """After (re)connecting, how long the server has to send every contact's presence
    before the bridge posts each agent's state, the ones not heard from as offline."""


def _str(table: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise BridgeConfigError(f"{path}{key}", "is required (a string)")
    return value


def _number(table: Mapping[str, Any], key: str, path: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise BridgeConfigError(f"{path}{key}", "must be a number greater than 0")
    return float(value)


def _secret(
    table: Mapping[str, Any], key: str, path: str, env: Mapping[str, str], variable: str
) -> str:
    """From the environment, else ``<key>_file``, else ``<key>``."""
    if variable in env:
        return env[variable]
    file_name = table.get(f"{key}_file")
    if file_name is not None:
        try:
            return Path(str(file_name)).read_text().strip()
        except OSError as e:
            raise BridgeConfigError(f"{path}{key}_file", f"cannot read: {e.strerror}") from None
    value = table.get(key, "")
    if not isinstance(value, str) or not value:
        raise BridgeConfigError(f"{path}{key}", f"is required (or {variable}, or {key}_file)")
    return value


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise BridgeConfigError(key, "a table is required")
    return value


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str]) -> BridgeConfig:
    membrane, xmpp, agents_raw = _table(raw, "membrane"), _table(raw, "xmpp"), _table(raw, "agents")
    url = _str(membrane, "url", "membrane.").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BridgeConfigError("membrane.url", "must be an http:// or https:// URL")
    site = _str(membrane, "site", "membrane.")
    if not ID_PATTERN.fullmatch(site):
        raise BridgeConfigError("membrane.site", "must be a site id")
    secret = _secret(membrane, "secret", "membrane.", env, SECRET_ENV)
    if len(secret) < MIN_SECRET:
        raise BridgeConfigError("membrane.secret", f"must be at least {MIN_SECRET} characters")
    jid = _str(xmpp, "jid", "xmpp.")
    if not _BARE_JID.fullmatch(jid):
        raise BridgeConfigError("xmpp.jid", "must be a bare JID like bot@chat.example.com")
    port = xmpp.get("port", 5222)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BridgeConfigError("xmpp.port", "must be a port number")
    unencrypted = xmpp.get("allow_unencrypted", False)
    if not isinstance(unencrypted, bool):
        raise BridgeConfigError("xmpp.allow_unencrypted", "must be true or false")
    agents: dict[str, str] = {}
    for agent_jid, agent_id in agents_raw.items():
        if not _BARE_JID.fullmatch(agent_jid):
            raise BridgeConfigError(f"agents.{agent_jid}", "the key must be a bare JID")
        if not isinstance(agent_id, str) or not ID_PATTERN.fullmatch(agent_id):
            raise BridgeConfigError(f"agents.{agent_jid}", "must be an agent id")
        agents[agent_jid.lower()] = agent_id
    if not agents:
        raise BridgeConfigError("agents", "map at least one JID to an agent id")
    return BridgeConfig(
        gateway_url=url,
        site=site,
        secret=secret,
        jid=jid,
        password=_secret(xmpp, "password", "xmpp.", env, PASSWORD_ENV),
        agents=agents,
        host=_str(xmpp, "host", "xmpp.", ""),
        port=port,
        allow_unencrypted=unencrypted,
        renew_s=_number(raw.get("bridge", {}), "renew_s", "bridge.", 3600.0),
        settle_s=_number(raw.get("bridge", {}), "settle_s", "bridge.", 5.0),
    )


def load_config(path: Path, env: Mapping[str, str] | None = None) -> BridgeConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise BridgeConfigError(str(path), f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise BridgeConfigError(str(path), f"not valid TOML: {e}") from None
    return parse_config(raw, os.environ if env is None else env)
