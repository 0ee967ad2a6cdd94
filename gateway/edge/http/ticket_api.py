"""The customer's ticket: read, follow live, move and cancel a call with its status token.

The status token is handed out once, when the call is made (an unguessable secret, like a
parcel tracking link), and is the only thing that grants anything here: a wrong or missing
token and an unknown call get the same 404, so call ids cannot be probed. The ticket page
(``/t/{call_id}``, served by web_static) is the same bytes for every call and reads the
token from its URL's fragment, which browsers never send to a server or in a Referer.
"""

from __future__ import annotations

from aiohttp import web

from gateway.core.call import Call
from gateway.core.errors import Unauthenticated, Unavailable
from gateway.edge.http import appkeys as keys
from gateway.edge.http.http_api import read_json
from gateway.edge.http.visitor_api import TICKET_SITE, cors_headers
from gateway.i18n import best_language, browser_catalogue
from gateway.services.tickets import Tickets
from gateway.wire.calls import shared_call_to_wire
from gateway.wire.codec import check_id
from gateway.wire.rest import (
    catalogue_language_from_path,
    catalogue_to_wire,
    share_link_to_wire,
    survey_answer_from_wire,
    survey_answered_to_wire,
    ticket_move_from_wire,
    ticket_url,
)

MAX_STATUS_TOKEN = 128


def _status_token(request: web.Request) -> str:
    token = request.query.get("token", "")
    if not token or len(token) > MAX_STATUS_TOKEN:
        raise Unauthenticated("the status token is missing")
    return token


def _ticket(request: web.Request) -> tuple[Tickets, str, str]:
    """The ticket service, and the call id and status token the request names."""
    call_id = check_id(request.match_info["call_id"], "call_id")
    return request.app[keys.TICKETS], call_id, _status_token(request)


async def _answer(request: web.Request, tickets: Tickets, call: Call) -> web.Response:
    """The call as its customer sees it; CORS for its own site's pages (cors_middleware)."""
    request[TICKET_SITE] = call.site
    return web.json_response(await tickets.view(call), headers={"Cache-Control": "no-store"})


async def get_ticket(request: web.Request) -> web.Response:
    """The ticket; on the read-only share link, what that shows of it."""
    tickets, call_id, token = _ticket(request)
    call, shared = await tickets.read(call_id, token)
    if not shared:
        return await _answer(request, tickets, call)
    request[TICKET_SITE] = call.site
    view = shared_call_to_wire(await tickets.view(call))
    return web.json_response(view, headers={"Cache-Control": "no-store"})


async def cancel_ticket(request: web.Request) -> web.Response:
    tickets, call_id, token = _ticket(request)
    return await _answer(request, tickets, await tickets.cancel(call_id, token))


async def move_ticket(request: web.Request) -> web.Response:
    tickets, call_id, token = _ticket(request)
    at = ticket_move_from_wire(await read_json(request))
    return await _answer(request, tickets, await tickets.move(call_id, token, at))


async def keep_ticket(request: web.Request) -> web.Response:
    """Told the callback runs late, the customer keeps their place (no body)."""
    tickets, call_id, token = _ticket(request)
    return await _answer(request, tickets, await tickets.keep(call_id, token))


async def answer_survey(request: web.Request) -> web.Response:
    """The question after the call, answered (in the widget, with the ticket's token)."""
    tickets, call_id, token = _ticket(request)
    score, comment = survey_answer_from_wire(await read_json(request))
    call = await tickets.find(call_id, token)
    answer = await request.app[keys.SURVEYS].answer(call, score, comment)
    request[TICKET_SITE] = call.site
    view = await tickets.view(answer.call)
    return web.json_response(survey_answered_to_wire(view, answer.referral_url))


async def share_ticket(request: web.Request) -> web.Response:
    """Turn the read-only share link on (a new one each time)."""
    tickets, call_id, token = _ticket(request)
    call, share_token = await tickets.share(call_id, token)
    request[TICKET_SITE] = call.site
    url = ticket_url(request.app[keys.SETTINGS].public_url, call.call_id, share_token)
    return web.json_response(share_link_to_wire(url, await tickets.view(call)))


async def unshare_ticket(request: web.Request) -> web.Response:
    tickets, call_id, token = _ticket(request)
    return await _answer(request, tickets, await tickets.unshare(call_id, token))


async def erase_ticket(request: web.Request) -> web.Response:
    """Erase the customer's personal data from the call (a waiting callback is canceled)."""
    tickets, call_id, token = _ticket(request)
    return await _answer(request, tickets, await tickets.erase(call_id, token))


async def stream_ticket(request: web.Request) -> web.StreamResponse:
    """The ticket as Server-Sent Events: the view now, then on every change."""
    tickets, call_id, token = _ticket(request)
    # Only what it needs is kept: this handler waits as long as the page is open.
    call, shared = await tickets.read(call_id, token)
    site, share_hash = call.site, call.share_hash if shared else None
    del call
    request[TICKET_SITE] = site
    request.app[keys.DRAIN].refuse_new_work()  # its streams were ended: none may start
    feed = request.app[keys.TICKET_FEED]
    if feed.watcher_count >= feed.max_watchers:
        raise Unavailable("this node is full; retry on another", code="too_many_watchers")
    if feed.watching(call_id) >= feed.max_per_call:
        raise Unavailable("this ticket is open too often here", code="too_many_watchers")
    headers = cors_headers(request, site)
    response: web.StreamResponse = await feed.watch(request, call_id, headers, share_hash)
    return response


async def get_catalogue(request: web.Request) -> web.Response:
    """A page's sentences in the best language Membrane speaks for the one asked (public:
    the same for everyone)."""
    language = best_language([catalogue_language_from_path(request.match_info["language"])])
    return web.json_response(
        catalogue_to_wire(language, dict(browser_catalogue(language))),
        # Public and the same for everyone: any site's page may read it (the widget does).
        headers={"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/calls/{call_id}", get_ticket)
    app.router.add_delete("/v1/calls/{call_id}", cancel_ticket)
    app.router.add_post("/v1/calls/{call_id}/move", move_ticket)
    app.router.add_post("/v1/calls/{call_id}/keep", keep_ticket)
    app.router.add_post("/v1/calls/{call_id}/survey", answer_survey)
    app.router.add_get("/v1/calls/{call_id}/stream", stream_ticket)
    app.router.add_post("/v1/calls/{call_id}/share", share_ticket)
    app.router.add_delete("/v1/calls/{call_id}/share", unshare_ticket)
    app.router.add_delete("/v1/calls/{call_id}/personal-data", erase_ticket)
    app.router.add_get("/v1/messages/{language}", get_catalogue)
