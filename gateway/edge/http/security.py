"""What every answer of the gateway carries, and who a request really comes from.

Every response gets the browser's safety headers (no MIME sniffing, no framing, no
referrer across origins, HSTS when the public URL is https) and a content security policy
that lets the gateway's pages load only their own scripts, styles and connections: no
inline script or style anywhere (tests/test_security_headers.py checks every page renders
under it without a violation). Behind reverse proxies (``server.trusted_proxies``), a
request's address is the one its proxies name in ``X-Forwarded-For``, read from the right
and only through trusted hops, so rate limits per address (sessions, callbacks) count
customers, not the proxy. Each request starts with no call tag on its log lines.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from aiohttp import web

from gateway.core.errors import draining
from gateway.edge.errors import rest_response
from gateway.edge.http import appkeys as keys
from gateway.ops.log_context import untagged
from gateway.settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def content_security_policy(public_url: str) -> str:
    parts = urlsplit(public_url)
    socket_origin = f"{'wss' if parts.scheme == 'https' else 'ws'}://{parts.netloc}"
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "font-src 'self'",
            # The socket.io connection, by the public URL's name as browsers reach it.
            f"connect-src 'self' {socket_origin}",
            "media-src 'self' blob: mediastream:",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


def security_headers(settings: Settings) -> dict[str, str]:
    headers = {
        "Content-Security-Policy": content_security_policy(settings.public_url),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "strict-origin-when-cross-origin",
        # The agent app and the widget's call panel ask for the microphone; nothing else.
        "Permissions-Policy": "microphone=(self), camera=(), geolocation=(), payment=()",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
    if settings.public_url.startswith("https://"):
        headers["Strict-Transport-Security"] = "max-age=63072000"
    return headers


def trusted_networks(proxies: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, trusted: Sequence[Network]
) -> bool:
    return address is not None and any(address in n for n in trusted)


def forwarded_client(
    remote: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str | None:
    """The client's address: ``remote`` unless it is a trusted proxy; then, walking
    ``X-Forwarded-For`` from the right (the nearest hop first), the first address that is
    not a trusted proxy. What a client wrote in the header itself lies left of that and is
    never reached."""
    if not _trusted(_address(remote or ""), trusted):
        return remote
    hops = [h for header in forwarded_for for h in header.split(",") if h.strip()]
    for hop in reversed(hops):
        found = _address(hop)
        if found is None:
            return remote  # a garbled header: go by who sent it
        if not _trusted(found, trusted):
            return str(found)
    return str(found) if hops and found is not None else remote


@web.middleware
async def security_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: the client's address, then the headers on every answer."""
    trusted = request.app[keys.TRUSTED_PROXIES]
    headers = request.app[keys.SECURITY_HEADERS]
    if trusted:
        from_proxy = _trusted(_address(request.remote or ""), trusted)
        forwarded = request.headers.getall("X-Forwarded-For", [])
        client = forwarded_client(request.remote, forwarded, trusted)
        if client is not None and client != request.remote:
            request = request.clone(remote=client)
        # A draining node refuses a new socket before the websocket upgrade when a proxy can
        # send the handshake to another node (connected directly, socket.io refuses it
        # afterwards, with its code).
        if (
            from_proxy
            and request.path.startswith("/socket.io/")
            and request.app[keys.DRAIN].draining
        ):
            refused = rest_response(draining(1))
            refused.headers.update(headers)
            return refused
    with untagged():
        try:
            response = await handler(request)
        except web.HTTPException as e:
            e.headers.update({k: v for k, v in headers.items() if k not in e.headers})
            raise
    if not response.prepared:  # (a stream's headers went out already)
        for name, value in headers.items():
            response.headers.setdefault(name, value)
    return response
