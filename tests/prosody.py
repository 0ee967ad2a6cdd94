"""A real Prosody XMPP server for a test: Debian's ``prosody`` started on a free loopback port
with its whole configuration, data, pid file and log in a temporary directory, accounts made
with ``prosodyctl register``, stopped afterwards. Plain c2s on loopback: no TLS, no s2s."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

DOMAIN = "membrane.test"

CONFIG = """\
daemonize = false
-- CI and this machine run the suite as root; Prosody refuses root unless told.
run_as_root = true
pidfile = "{dir}/prosody.pid"
data_path = "{dir}/data"
certificates = "{dir}/certs"
plugin_paths = {{}}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{}}
s2s_ports = {{}}
modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; }}
modules_disabled = {{ "s2s"; "posix"; }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_plain"
storage = "internal"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{dir}/prosody.log" }} }}
VirtualHost "{domain}"
"""


class Prosody:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.config = directory / "prosody.cfg.lua"
        self.process: subprocess.Popen[bytes] | None = None

    def jid(self, user: str) -> str:
        return f"{user}@{DOMAIN}"

    def start(self) -> None:
        (self.directory / "data").mkdir(exist_ok=True)
        (self.directory / "certs").mkdir(exist_ok=True)
        self.config.write_text(CONFIG.format(dir=self.directory, port=self.port, domain=DOMAIN))
        self.process = subprocess.Popen(
            ["prosody", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while True:  # an outside process: nothing to await but its port
            if self.process.poll() is not None:
                raise RuntimeError(f"prosody exited at start:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"prosody did not listen within 15 s:\n{self.log()}")
            time.sleep(0.05)

    def register(self, user: str, password: str) -> str:
        subprocess.run(
            ["prosodyctl", "--config", str(self.config), "register", user, DOMAIN, password],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return self.jid(user)

    def log(self) -> str:
        path = self.directory / "prosody.log"
        return path.read_text()[-4000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def prosody(tmp_path: Path) -> Iterator[Prosody]:
    if shutil.which("prosody") is None:
        pytest.fail("prosody is not installed: tests/run installs it (apt-get install prosody)")
    server = Prosody(tmp_path / "prosody")
    server.directory.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()
