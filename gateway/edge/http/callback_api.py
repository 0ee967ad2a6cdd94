"""REST for PSTN callbacks: the request and bookable slots.

The request needs the visitor's session token; its 201 hands out the status token for the
ticket (gateway.edge.http.ticket_api)."""

from __future__ import annotations

from aiohttp import web

from gateway.core.errors import Invalid, Unauthenticated
from gateway.edge.auth import VISITOR_ROLES, bearer_token, check_configured_role
from gateway.edge.http import appkeys as keys
from gateway.edge.http.http_api import read_json
from gateway.edge.http.visitor_api import client_ip, site_of
from gateway.wire.codec import branch_from_query, callback_from_wire
from gateway.wire.rest import callback_created_to_wire, slots_to_wire


async def create_callback(request: web.Request) -> web.Response:
    site = site_of(request)
    request.app[keys.DRAIN].refuse_new_work()
    claims = await request.app[keys.TOKENS].verify(
        bearer_token(request.headers.get("Authorization")), VISITOR_ROLES
    )
    if claims.site != site.site_id:
        raise Unauthenticated("this session is for another site")
    check_configured_role(claims, site)
    try:
        body = callback_from_wire(await read_json(request))
    except Invalid as e:
        if e.code == "invalid_phone":  # an abuse rule like the others: counted
            request.app[keys.METRICS].callback_refusals.labels(e.code).inc()
        raise
    callbacks = request.app[keys.CALLBACKS]
    booking = await callbacks.request(site.site_id, claims.sub, client_ip(request), body)
    call, token = booking.call, booking.status_token
    public_url = request.app[keys.SETTINGS].public_url
    return web.json_response(
        callback_created_to_wire(call.call_id, token, await callbacks.view(call), public_url),
        # 200: a repeat of a request whose answer was lost, answered with its callback.
        status=201 if booking.created else 200,
    )


async def callback_slots(request: web.Request) -> web.Response:
    site = site_of(request)
    branch = branch_from_query(request.query)
    if branch is not None and branch not in site.branches:
        return web.json_response(slots_to_wire([]), headers={"Cache-Control": "no-store"})
    slots = request.app[keys.CALLBACKS].slots(site.site_id, branch, request.app[keys.CLOCK].now())
    return web.json_response(slots_to_wire(slots), headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/sites/{site}/callbacks", create_callback)
    app.router.add_get("/v1/sites/{site}/callback-slots", callback_slots)
