"""REST for website visitors: sessions, availability (JSON and a live stream), CORS.

These endpoints are called from company websites, so each answers cross-origin requests
only from the origins the site configured. They are public by design except for what a
session token guards.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import appkeys as keys
from gateway.codec import LANGUAGE_PATTERN, VISITOR_ID_PATTERN, check_id, iso
from gateway.errors import ApiError, invalid_payload
from gateway.http_api import read_json
from gateway.ice import ice_servers
from gateway.model import Role, Site

SESSIONS_PER_IP_MINUTE = 30
CORS_HEADERS = "Authorization, Content-Type"
CORS_METHODS = "GET, POST, DELETE, OPTIONS"


def site_of(request: web.Request) -> Site:
    return request.app[keys.PRESENCE].site(request.match_info["site"])


def allowed_origins(request: web.Request) -> frozenset[str]:
    """The site's configured origins, plus the gateway's own (its /demo/ page); nobody but
    the operator can put a page on the gateway's origin."""
    settings = request.app[keys.SETTINGS]
    own = settings.public_url.rstrip("/")
    site_id = request.match_info.get("site")
    if site_id is not None and site_id in settings.sites:
        return frozenset((*settings.sites[site_id].allowed_origins, own))
    return frozenset((*(o for s in settings.sites.values() for o in s.allowed_origins), own))


def is_visitor_path(path: str) -> bool:
    return path.startswith(("/v1/sites/", "/v1/calls/")) and not path.endswith("/agents")


@web.middleware
async def cors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is None or not is_visitor_path(request.path):
        return await handler(request)
    allowed = origin in allowed_origins(request)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not allowed:
            raise ApiError(403, "origin_not_allowed", f"origin {origin} is not allowed")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )
    response = await handler(request)
    if allowed and not response.prepared:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    return response


def cors_headers(request: web.Request) -> dict[str, str]:
    origin = request.headers.get("Origin")
    if origin is not None and origin in allowed_origins(request):
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {}


def client_ip(request: web.Request) -> str:
    # Behind a proxy, configure it to set X-Forwarded-For and trust only the last hop.
    return request.remote or "unknown"


async def create_session(request: web.Request) -> web.Response:
    site = site_of(request)
    request.app[keys.DRAIN].refuse_new_work()
    origin = request.headers.get("Origin")
    if origin is None or origin not in allowed_origins(request):
        raise ApiError(403, "origin_not_allowed", "this page's origin may not open sessions")
    store = request.app[keys.STORE]
    now = time.time()
    if not await store.hit(f"sessions:{client_ip(request)}", 60, SESSIONS_PER_IP_MINUTE, now):
        raise ApiError(429, "rate_limited", "too many sessions from this address")
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid_payload("body must be a JSON object")
    visitor_id = body.get("visitor_id")
    if not (isinstance(visitor_id, str) and VISITOR_ID_PATTERN.fullmatch(visitor_id)):
        visitor_id = "v_" + secrets.token_urlsafe(18)
    settings = request.app[keys.SETTINGS]
    token, expires_at = request.app[keys.TOKENS].mint(visitor_id, site.site_id, Role.VISITOR)
    return web.json_response(
        {
            "token": token,
            "visitor_id": visitor_id,
            "expires_at": iso(expires_at),
            "ice_servers": ice_servers(settings.webrtc, visitor_id, now),
        },
        status=201,
    )


def _filters(request: web.Request, site: Site) -> tuple[str | None, str | None]:
    language = request.query.get("language") or None
    branch = request.query.get("branch") or None
    if language is not None and not LANGUAGE_PATTERN.fullmatch(language):
        raise invalid_payload("language must be a language tag like en or de-AT")
    if branch is not None and check_id(branch, "branch") not in site.branches:
        raise invalid_payload(f"no branch {branch!r}")
    return language, branch


async def get_availability(request: web.Request) -> web.Response:
    site = site_of(request)
    language, branch = _filters(request, site)
    feed = request.app[keys.AVAILABILITY]
    return web.json_response(
        feed.current((site.site_id, language, branch)), headers={"Cache-Control": "no-store"}
    )


async def stream_availability(request: web.Request) -> web.StreamResponse:
    site = site_of(request)
    language, branch = _filters(request, site)
    feed = request.app[keys.AVAILABILITY]
    request.app[keys.DRAIN].refuse_new_work()  # its streams were ended: none may start
    if feed.watcher_count >= feed.max_watchers:
        raise ApiError(503, "too_many_watchers", "this node is full; retry on another")
    response: web.StreamResponse = await feed.watch(
        request, (site.site_id, language, branch), cors_headers(request)
    )
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/sites/{site}/sessions", create_session)
    app.router.add_get("/v1/sites/{site}/availability", get_availability)
    app.router.add_get("/v1/sites/{site}/availability/stream", stream_availability)
