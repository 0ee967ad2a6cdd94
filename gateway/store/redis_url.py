"""Where a node's Redis is: ``server.redis_url`` read once into a ``RedisTarget`` that every
connection the node opens goes by (redis-py's pool, the lane and its subscriptions), so they
cannot disagree. They did: the lane spoke plain text to a ``rediss://`` URL that redis-py
reached over TLS, and went to localhost:6379 for a ``unix://`` one.

Supported: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` the same over TLS
(with ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and
``ssl_check_hostname`` in the query, as redis-py reads them), and
``unix://[[user]:password@]/path/to/redis.sock[?db=N]``. Anything else (another scheme, a
query option the lane could not honour, a path that is not a db number) is refused, rather
than quietly ignored by one connection and not by another.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio.connection import (
    Connection,
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
)

SCHEMES = ("redis", "rediss", "unix")
TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
CERT_REQS = ("required", "optional", "none")
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


class RedisUrlError(ValueError):
    """A Redis URL this node cannot connect by; the message says what is wrong (never the
    password)."""


@dataclass(frozen=True)
class RedisTarget:
    host: str = "localhost"
    port: int = 6379
    path: str = ""
    """A unix socket's path; TCP to host:port when empty."""
    db: int = 0
    username: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False
    cert_reqs: str = "required"
    ca_certs: str = ""
    certfile: str = ""
    keyfile: str = ""
    check_hostname: bool = True
    _ssl: list[ssl.SSLContext] = field(default_factory=list, repr=False, compare=False)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context, built as redis-py builds its own from the same options (its
        ``RedisSSLContext``); loading the files named fails here (OSError, ssl.SSLError)."""
        if not self.tls:
            return None
        if not self._ssl:
            self._ssl.append(
                RedisSSLContext(
                    keyfile=self.keyfile or None,
                    certfile=self.certfile or None,
                    cert_reqs=self.cert_reqs,
                    ca_certs=self.ca_certs or None,
                    check_hostname=self.check_hostname,
                ).get()
            )
        return self._ssl[0]

    def pool_options(self) -> dict[str, Any]:
        """redis-py ``ConnectionPool`` keywords for this target."""
        options: dict[str, Any] = {
            "db": self.db,
            "username": self.username or None,
            "password": self.password or None,
        }
        if self.path:
            return {**options, "connection_class": UnixDomainSocketConnection, "path": self.path}
        options.update(host=self.host, port=self.port)
        if not self.tls:
            return {**options, "connection_class": Connection}
        return {
            **options,
            "connection_class": SSLConnection,
            "ssl_cert_reqs": self.cert_reqs,
            "ssl_ca_certs": self.ca_certs or None,
            "ssl_certfile": self.certfile or None,
            "ssl_keyfile": self.keyfile or None,
            "ssl_check_hostname": self.check_hostname,
        }

    def __str__(self) -> str:
        """The URL for logs, with the password masked."""
        auth = f"{self.username}:***@" if self.password else ""
        if self.path:
            return f"unix://{auth}{self.path}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """The target ``url`` names, or RedisUrlError saying why it cannot be used."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. an unclosed [ipv6 address
        raise RedisUrlError(f"not a URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        shown = f"{scheme!r}" if scheme else "none"
        raise RedisUrlError(f"scheme {shown} is not one of redis://, rediss://, unix://")
    if parts.fragment:
        raise RedisUrlError("a Redis URL has no #fragment")
    options = _query(parts.query, tls=scheme == "rediss")
    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if username and not password:
        raise RedisUrlError("a username needs a password (user:password@)")
    db = options.pop("db", None)
    if scheme == "unix":
        if parts.hostname or parts.port is not None:
            raise RedisUrlError("a unix:// URL has no host: unix:///path/to/redis.sock")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise RedisUrlError("a unix:// URL needs the socket's absolute path")
        return RedisTarget(path=path, db=_db(db or "0"), username=username, password=password)
    try:
        port = parts.port
    except ValueError:
        raise RedisUrlError("the port must be a number from 1 to 65535") from None
    if port == 0:
        raise RedisUrlError("the port must be a number from 1 to 65535")
    path_db = unquote(parts.path).strip("/")
    if path_db and db is not None:
        raise RedisUrlError("the db is given twice (in the path and as ?db=)")
    tls: dict[str, Any] = {}
    if "ssl_cert_reqs" in options:
        tls["cert_reqs"] = options["ssl_cert_reqs"]
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in options:
            tls[name[len("ssl_") :]] = options[name]
    if "ssl_check_hostname" in options:
        tls["check_hostname"] = options["ssl_check_hostname"] in _TRUE
    if "keyfile" in tls and "certfile" not in tls:
        raise RedisUrlError("ssl_keyfile needs ssl_certfile")
    return RedisTarget(
        host=parts.hostname or "localhost",
        port=port or 6379,
        db=_db(path_db or db or "0"),
        username=username,
        password=password,
        tls=scheme == "rediss",
        **tls,
    )


def _query(query: str, tls: bool) -> dict[str, str]:
    try:
        pairs = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise RedisUrlError(f"cannot read the query {query!r}") from None
    options: dict[str, str] = {}
    for name, values in pairs.items():
        if name not in ("db", *TLS_OPTIONS):
            allowed = ", ".join(("db", *TLS_OPTIONS)) if tls else "db"
            raise RedisUrlError(f"unsupported option {name!r} (supported: {allowed})")
        if name in TLS_OPTIONS and not tls:
            raise RedisUrlError(f"{name} is for TLS: use a rediss:// URL")
        if len(values) != 1 or not values[0]:
            raise RedisUrlError(f"{name} needs exactly one value")
        options[name] = values[0]
    reqs = options.get("ssl_cert_reqs")
    if reqs is not None and reqs not in CERT_REQS:
        raise RedisUrlError(f"ssl_cert_reqs must be one of {', '.join(CERT_REQS)}")
    check = options.get("ssl_check_hostname")
    if check is not None and check.lower() not in (*_TRUE, *_FALSE):
        raise RedisUrlError("ssl_check_hostname must be true or false")
    if check is not None:
        options["ssl_check_hostname"] = check.lower()
    return options


def _db(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise RedisUrlError(f"the db must be a number, got {text!r}")
    return int(text)


def redis_target(url: str | RedisTarget) -> RedisTarget:
    return url if isinstance(url, RedisTarget) else parse_redis_url(url)


def check_redis_url(url: str) -> RedisTarget:
    """``parse_redis_url``, and the TLS files loaded: what start-up checks before serving."""
    target = parse_redis_url(url)
    try:
        target.ssl_context()
    except (OSError, ssl.SSLError) as e:
        raise RedisUrlError(f"cannot load the TLS files: {e}") from None
    return target
