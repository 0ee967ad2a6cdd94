"""REST edge: routes that authenticate, validate with the codec and call a service."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.core.errors import (
    DomainError,
    Forbidden,
    Invalid,
    RateLimited,
    StoreUnavailable,
    Unavailable,
)
from gateway.core.survey import Tally
from gateway.edge.auth import (
    AGENT_ROLES,
    SUPERVISOR_ROLES,
    Claims,
    bearer_token,
    check_configured_role,
)
from gateway.edge.errors import (
    HTTP_LAYER_CODES,
    INTERNAL_CODE,
    error_object,
    internal_response,
    json_error,
    rest_response,
)
from gateway.edge.http import appkeys as keys
from gateway.ops.ratelimit import TokenBucket
from gateway.store.base import StoreHealth as StoreState
from gateway.wire import openapi
from gateway.wire.base import to_wire
from gateway.wire.codec import check_id, device_update_from_wire, presence_to_wire
from gateway.wire.history import history_day_from_query, history_to_csv
from gateway.wire.rest import (
    Health,
    Readiness,
    ScoreRow,
    StoreHealth,
    score_row,
    survey_scores_to_wire,
)

log = logging.getLogger(__name__)


CLIENT_GONE_STATUS = 499
"""Recorded for a request whose client left before its answer (nginx's code for it)."""


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    metrics = request.app[keys.METRICS]
    route = (
        request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
    )
    started = time.perf_counter()
    try:
        response = await handler(request)
    except StoreUnavailable as e:
        log.warning("store unreachable during %s: %r", route, e)
        metrics.errors.labels(e.code).inc()
        response = rest_response(e)
    except DomainError as e:
        metrics.errors.labels(e.code).inc()
        response = rest_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = HTTP_LAYER_CODES.get(e.status, "bad_request")
        metrics.errors.labels(code).inc()
        response = json_error(e.status, error_object(code, e.reason))
        if "Allow" in e.headers:  # a 405 names the methods the resource has (RFC 9110)
            response.headers["Allow"] = e.headers["Allow"]
    except Exception as e:
        if isinstance(e, ConnectionError) and client_gone(request):
            # The client went away before its answer could be written (in a reconnect storm,
            # websocket handshakes whose connect had timed out): nobody is left to answer.
            log.debug("client gone before its answer in %s: %r", route, e)
            response = web.Response(status=CLIENT_GONE_STATUS)
        else:
            log.exception("unhandled error in %s", route)
            metrics.errors.labels(INTERNAL_CODE).inc()
            response = internal_response()
    metrics.requests.labels(route, str(response.status)).inc()
    metrics.latency.labels(route).observe(time.perf_counter() - started)
    return response


async def read_json(request: web.Request) -> Any:
    body = await request.read()  # the app's client_max_size answers 413 past the limit
    if not body:
        return {}
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Invalid("body is not valid JSON") from None


async def agent_claims(request: web.Request, supervisor: bool = False) -> Claims:
    tokens = request.app[keys.TOKENS]
    claims = await tokens.verify(
        bearer_token(request.headers.get("Authorization")),
        SUPERVISOR_ROLES if supervisor else AGENT_ROLES,
    )
    buckets = request.app[keys.REST_BUCKETS]
    bucket = buckets.setdefault(f"{claims.site}:{claims.sub}", TokenBucket(10.0, 30.0))
    if not bucket.take(time.monotonic()):
        raise RateLimited("too many requests; slow down")
    check_configured_role(claims, request.app[keys.PRESENCE].site(claims.site))
    return claims


# --- operations --------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(to_wire(Health("ok", request.app[keys.SETTINGS].node_id)))


async def _readiness(app: web.Application) -> tuple[StoreState, bool, bool]:
    """The store's health, whether the node drains, and whether it is ready (both as
    /readyz answers and as the metrics say, whenever either is asked)."""
    health = await app[keys.HEALTH].health()
    draining = app[keys.DRAIN].draining
    # Draining: out of the load balancer's rotation at once, while the node hands over.
    ready = health.reachable and health.listening and not draining
    metrics = app[keys.METRICS]
    metrics.store_up.set(1 if health.reachable and health.listening else 0)
    metrics.ready.set(1 if ready else 0)
    return health, draining, ready


async def readyz(request: web.Request) -> web.Response:
    health, draining, ready = await _readiness(request.app)
    body = Readiness(
        ready=ready,
        draining=draining,
        node=request.app[keys.SETTINGS].node_id,
        store=StoreHealth(health.reachable, health.listening, health.persistent, health.detail),
        warnings=[]
        if health.persistent
        else ["store persistence is off: a store restart would lose pending callbacks"],
    )
    return web.json_response(to_wire(body), status=200 if ready else 503)


async def openapi_document(request: web.Request) -> web.Response:
    # Public and secret-free: any page or tool may read it.
    return web.json_response(
        openapi.document(request.app[keys.SETTINGS].public_url),
        headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "public, max-age=300"},
    )


async def metrics(request: web.Request) -> web.Response:
    # What a scrape reads is as of the scrape: readiness, and the data directory's free disk
    # (the embedded store and the SQLite history live there).
    await _readiness(request.app)
    data_dir = request.app[keys.SETTINGS].data_dir
    with contextlib.suppress(OSError):
        request.app[keys.METRICS].data_dir_free.set(shutil.disk_usage(data_dir).free)
    payload = generate_latest(request.app[keys.METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- agents --------------------------------------------------------------------------------------


async def get_me(request: web.Request) -> web.Response:
    claims = await agent_claims(request)
    presence = await request.app[keys.PRESENCE].fetch(claims.site, claims.sub)
    return web.json_response(presence_to_wire(presence))


async def put_device(request: web.Request) -> web.Response:
    claims = await agent_claims(request)
    device_id = check_id(request.match_info["device_id"], "device_id")
    update = device_update_from_wire(await read_json(request), device_id)
    presence = await request.app[keys.PRESENCE].set_device(claims.site, claims.sub, update)
    return web.json_response(presence_to_wire(presence))


async def delete_device(request: web.Request) -> web.Response:
    claims = await agent_claims(request)
    device_id = check_id(request.match_info["device_id"], "device_id")
    presence = await request.app[keys.PRESENCE].remove_device(claims.site, claims.sub, device_id)
    return web.json_response(presence_to_wire(presence))


async def heartbeat(request: web.Request) -> web.Response:
    claims = await agent_claims(request)
    device_id = check_id(request.match_info["device_id"], "device_id")
    presence = await request.app[keys.PRESENCE].heartbeat(claims.site, claims.sub, device_id)
    return web.json_response(presence_to_wire(presence))


async def supervisor_claims(request: web.Request) -> Claims:
    """The caller, a supervisor of the site the path names (of that site only)."""
    claims = await agent_claims(request, supervisor=True)
    if claims.site != request.match_info["site"]:
        raise Forbidden("a supervisor sees only their own site")
    return claims


async def supervised_site(request: web.Request) -> str:
    """The site the path names, for a supervisor of that site only."""
    return (await supervisor_claims(request)).site


async def site_agents(request: web.Request) -> web.Response:
    site = await supervised_site(request)
    presences = request.app[keys.PRESENCE].site_presence(site)
    return web.json_response([presence_to_wire(p) for p in presences])


async def survey_scores(request: web.Request) -> web.Response:
    """Each agent's and branch's answers to the question after the call (supervisors)."""
    site_id = await supervised_site(request)
    site = request.app[keys.PRESENCE].site(site_id)
    scores = await request.app[keys.SURVEYS].scores(site_id)

    def rows(tallies: Mapping[str, Tally], names: Mapping[str, str]) -> list[ScoreRow]:
        return [
            score_row(i, names.get(i, i), t.promoters, t.passives, t.detractors, t.nps)
            for i, t in sorted(tallies.items())
        ]

    agents = {a.agent_id: a.name for a in site.agents.values()}
    branches = {b.branch_id: b.name for b in site.branches.values()}
    return web.json_response(
        survey_scores_to_wire(rows(scores.agents, agents), rows(scores.branches, branches))
    )


async def history_csv(request: web.Request) -> web.Response:
    """The site's calls made on one day (UTC), from the call history, as CSV (supervisors)."""
    site_id = await supervised_site(request)
    if keys.HISTORY not in request.app:
        raise Unavailable("this node keeps no call history", code="history_unavailable")
    start = history_day_from_query(request.query)
    rows = await request.app[keys.HISTORY].history.between(site_id, start, start + 86_400)
    return web.Response(
        text=history_to_csv(rows),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{site_id}-calls.csv"'},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi_document)
    app.router.add_get("/v1/agents/me", get_me)
    app.router.add_put("/v1/agents/me/devices/{device_id}", put_device)
    app.router.add_delete("/v1/agents/me/devices/{device_id}", delete_device)
    app.router.add_post("/v1/agents/me/devices/{device_id}/heartbeat", heartbeat)
    app.router.add_get("/v1/sites/{site}/agents", site_agents)
    app.router.add_get("/v1/sites/{site}/survey-scores", survey_scores)
    app.router.add_get("/v1/sites/{site}/history.csv", history_csv)
