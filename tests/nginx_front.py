"""nginx with the shipped config (deploy/nginx/membrane.conf) in front of gateway nodes, as a
process of its own on free ports: for tests/test_nginx.py and bench/rolling_restart.py. Only
the config's addresses, certificate paths and node list are changed; the certificate is
from a certificate authority of the caller's own (``certificates``)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from test_redis_urls import Certs, make_certs

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def nginx_config(
    work: Path, http_port: int, tls_port: int, nodes: list[str], connections: int = 1024
) -> Path:
    """The shipped file, listening on this test's ports, with its certificate (made by
    ``certificates``) and nodes; ``connections``: the worker's (each client takes two)."""
    shipped = (ROOT / "deploy" / "nginx" / "membrane.conf").read_text()
    certs = certificates(work)
    site = shipped
    for old, new in (
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;"),
        ("listen [::]:443 ssl http2;", ""),
        ("/etc/nginx/tls/membrane.crt", str(certs.server_cert)),
        ("/etc/nginx/tls/membrane.key", str(certs.server_key)),
        ("/etc/nginx/membrane-nodes.conf", str(work / "nodes.conf")),
    ):
        assert old in site, old
        site = site.replace(old, new)
    (work / "nodes.conf").write_text("".join(f"server {n} max_fails=0;\n" for n in nodes))
    (work / "membrane.conf").write_text(site)
    main = work / "nginx.conf"
    main.write_text(
        f"""
user root;
daemon off;
worker_processes 1;
worker_rlimit_nofile {connections + 64};
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections {connections}; }}
http {{
    include /etc/nginx/mime.types;
    access_log {work}/access.log;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    include {work}/membrane.conf;
}}
"""
    )
    return main


def certificates(work: Path) -> Certs:
    """A CA of the test's own and a certificate for 127.0.0.1, made once per directory."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "ca.pem").exists():
        return make_certs(work)
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    return Certs(*(work / name for name in names))


def error_log(work: Path) -> str:
    return (work / "error.log").read_text()


@asynccontextmanager
async def nginx(
    work: Path, tls_port: int, nodes: list[str], connections: int = 1024
) -> AsyncIterator[str]:
    """nginx on ``tls_port`` in front of ``nodes`` (host:port): its https URL once it answers."""
    main = nginx_config(work, free_port(), tls_port, nodes, connections)
    check = await asyncio.create_subprocess_exec(
        NGINX, "-t", "-c", str(main), "-p", str(work),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await check.communicate()
    assert check.returncode == 0, out.decode()
    proc = await asyncio.create_subprocess_exec(
        NGINX, "-c", str(main), "-p", str(work),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"https://127.0.0.1:{tls_port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                assert proc.returncode is None, error_log(work)
                try:
                    async with http.get(f"{url}/healthz", ssl=False) as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            for _ in range(300):
                if await up():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"nginx did not answer: {error_log(work)}")
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
