"""REST for website visitors: sessions, availability (JSON and a live stream), CORS.

These endpoints are called from company websites, so each answers cross-origin requests
only from the origins the site configured. They are public by design except for what a
session token guards.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.core.errors import Forbidden, Invalid, RateLimited, Unavailable
from gateway.core.model import Role, Site
from gateway.edge.errors import rest_response
from gateway.edge.http import appkeys as keys
from gateway.edge.http.http_api import read_json
from gateway.edge.ice import ice_servers
from gateway.edge.visitor_identity import new_visitor_id
from gateway.settings import Settings
from gateway.wire.codec import filters_from_query, session_request_from_wire, session_to_wire

SESSIONS_PER_IP_MINUTE = 30
# What a cross-origin page needs, and no more: the widget opens sessions and callbacks (POST
# with a bearer token and a JSON body) and reads availability and slots (GET) under its site;
# it reads, moves and cancels its ticket with the status token in the query (GET, POST with
# a JSON body, DELETE).
SITE_METHODS = "GET, POST, OPTIONS"
SITE_HEADERS = "Authorization, Content-Type"
TICKET_METHODS = "GET, POST, DELETE, OPTIONS"
TICKET_HEADERS = "Content-Type"
TICKET_SITE = web.RequestKey("ticket_site", str)
"""The site of the call a ticket request has proven it may read (set by the handler)."""


def site_of(request: web.Request) -> Site:
    return request.app[keys.PRESENCE].site(request.match_info["site"])


def path_site(path: str) -> str | None:
    """The site a ``/v1/sites/{site}/...`` path names. Read from the path, not the route's
    match: a preflight matches no route, so its match info is empty."""
    parts = path.split("/", 4)
    if len(parts) >= 4 and parts[1] == "v1" and parts[2] == "sites" and parts[3]:
        return parts[3]
    return None


def site_origins(settings: Settings, site_id: str | None) -> frozenset[str]:
    """One site's configured origins, plus the gateway's own (its /demo/ page); nobody but
    the operator can put a page on the gateway's origin. No site (or an unknown one): only
    the gateway's own."""
    own = settings.public_url.rstrip("/")
    site = settings.sites.get(site_id) if site_id is not None else None
    return frozenset((*(site.allowed_origins if site else ()), own))


def ticket_origins(settings: Settings) -> frozenset[str]:
    """Who may ask about a ticket before it is known whose it is: a ticket path names no
    site, and looking the call up here would tell a stranger which call ids exist. Only the
    status token grants anything; the answer itself goes to the call's own site only."""
    own = settings.public_url.rstrip("/")
    return frozenset((*(o for s in settings.sites.values() for o in s.allowed_origins), own))


def allowed_origins(request: web.Request) -> frozenset[str]:
    return site_origins(request.app[keys.SETTINGS], path_site(request.path))


def is_visitor_path(path: str) -> bool:
    return path.startswith(("/v1/sites/", "/v1/calls/")) and not path.endswith("/agents")


def _preflight(request: web.Request, origin: str) -> web.Response:
    settings = request.app[keys.SETTINGS]
    if request.path.startswith("/v1/calls/"):
        allowed, headers = (
            ticket_origins(settings),
            {
                "Access-Control-Allow-Methods": TICKET_METHODS,
                "Access-Control-Allow-Headers": TICKET_HEADERS,
            },
        )
    else:
        allowed = site_origins(settings, path_site(request.path))
        headers = {
            "Access-Control-Allow-Methods": SITE_METHODS,
            "Access-Control-Allow-Headers": SITE_HEADERS,
        }
    if origin not in allowed:
        request.app[keys.METRICS].errors.labels("origin_not_allowed").inc()
        refusal = Forbidden(f"origin {origin} is not allowed", code="origin_not_allowed")
        return rest_response(refusal)
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            **headers,
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )


@web.middleware
async def cors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outside the error middleware, so refusals carry the headers too: a page must be able
    to read why its request was refused (an invalid phone number, a canceled ticket)."""
    origin = request.headers.get("Origin")
    if origin is None or not is_visitor_path(request.path):
        return await handler(request)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return _preflight(request, origin)
    response = await handler(request)
    settings = request.app[keys.SETTINGS]
    if not request.path.startswith("/v1/calls/"):
        allowed = site_origins(settings, path_site(request.path))
    elif TICKET_SITE in request:
        allowed = site_origins(settings, request[TICKET_SITE])
    else:  # refused before the call was known: its error says nothing about any call
        allowed = ticket_origins(settings)
    if origin in allowed and not response.prepared:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    return response


def cors_headers(request: web.Request, site_id: str | None = None) -> dict[str, str]:
    """For a stream, whose headers go out before the CORS middleware sees its response: for
    the site its path names, or ``site_id`` (a ticket's call's)."""
    origin = request.headers.get("Origin")
    site = site_id if site_id is not None else path_site(request.path)
    if origin is not None and origin in site_origins(request.app[keys.SETTINGS], site):
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
        raise Forbidden("this page's origin may not open sessions", code="origin_not_allowed")
    store = request.app[keys.STORE]
    now = request.app[keys.CLOCK].now()
    if not await store.hit_session_limit(client_ip(request), 60, SESSIONS_PER_IP_MINUTE, now):
        raise RateLimited("too many sessions from this address")
    claim = session_request_from_wire(await read_json(request))
    # Only the secret the gateway gave a visitor keeps their id: the id alone is seen by
    # agents, and a token for it would take over the visitor's live call.
    identity = request.app[keys.VISITORS]
    visitor_id = identity.identify(site.site_id, claim.visitor_id, claim.visitor_secret)
    if visitor_id is None:
        visitor_id = new_visitor_id()
    settings = request.app[keys.SETTINGS]
    token, expires_at = request.app[keys.TOKENS].mint(visitor_id, site.site_id, Role.VISITOR)
    turn_name = identity.turn_name(site.site_id, visitor_id)
    return web.json_response(
        session_to_wire(
            token,
            visitor_id,
            identity.secret(site.site_id, visitor_id),
            expires_at,
            ice_servers(settings.webrtc, turn_name, now),
        ),
        status=201,
    )


def _filters(request: web.Request, site: Site) -> tuple[str | None, str | None]:
    language, branch = filters_from_query(request.query)
    if branch is not None and branch not in site.branches:
        raise Invalid(f"no branch {branch!r}")
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
        raise Unavailable("this node is full; retry on another", code="too_many_watchers")
    response: web.StreamResponse = await feed.watch(
        request, (site.site_id, language, branch), cors_headers(request)
    )
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/sites/{site}/sessions", create_session)
    app.router.add_get("/v1/sites/{site}/availability", get_availability)
    app.router.add_get("/v1/sites/{site}/availability/stream", stream_availability)
