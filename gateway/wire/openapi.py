"""The OpenAPI 3.1 document of Membrane's REST API, served at ``GET /v1/openapi.json``.

docs/PROTOCOL.md is the contract in prose; this is its REST part for machines (client
generators, API explorers, contract tests). Its schemas are generated from the structs the
codec validates with and the services answer with (gateway/wire/presence.py, calls.py,
rest.py, events.py), so a shape cannot drift from it; only the paths and their operations
are declared here. tests/test_openapi.py holds it to the routes the app registers (both
ways) and real answers of a node to the schemas it declares. The socket.io namespaces are
no REST calls, but their structs are among the components and ``x-socketio`` lists each
namespace's events with them (docs/PROTOCOL.md section 6); Twilio's webhooks are not
described here (section 5).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec

from gateway.wire import events
from gateway.wire.base import Id, Json, Language
from gateway.wire.board import ExperimentOut, ExperimentReport, ExperimentStart, Figures
from gateway.wire.calls import Call, SharedCall, TimelineEntry
from gateway.wire.codec import Filters
from gateway.wire.im_presence import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    ImPresenceAnswer,
    ImPresenceBatch,
    ImPresenceUpdate,
)
from gateway.wire.presence import Availability, Device, DeviceUpdate, Presence
from gateway.wire.rest import (
    CallbackCreated,
    CallbackRequest,
    CallbackSlots,
    Catalogue,
    Error,
    Health,
    IceServer,
    Readiness,
    Session,
    SessionRequest,
    ShareLink,
    SurveyAnswered,
    SurveyAnswerIn,
    SurveyScores,
    TicketMove,
)

DRAINING_OR_STORE = (
    "store_unavailable: the store is unreachable; retry after Retry-After. draining: this node "
    "is shutting down; retry after Retry-After (behind a load balancer, another node answers)."
)
REF = "#/components/schemas/{name}"
# The REST bodies; the socket.io structs (gateway.wire.events) follow them.
REST_STRUCTS: tuple[Any, ...] = (
    Error,
    Health,
    Readiness,
    Device,
    DeviceUpdate,
    Presence,
    Availability,
    IceServer,
    SessionRequest,
    Session,
    TimelineEntry,
    Call,
    CallbackRequest,
    CallbackCreated,
    CallbackSlots,
    TicketMove,
    Catalogue,
    ShareLink,
    SharedCall,
    SurveyAnswerIn,
    SurveyAnswered,
    SurveyScores,
    ImPresenceUpdate,
    ImPresenceBatch,
    ImPresenceAnswer,
    Figures,
    ExperimentStart,
    ExperimentOut,
    ExperimentReport,
)


def _ref(name: str) -> Json:
    return {"$ref": REF.format(name=name)}


def _for_json_schema(schema: Any) -> Any:
    """msgspec's schema as JSON Schema reads it: a whole-string pattern written ``\\A...\\Z``
    (Python's, which the structs validate with) becomes ``^...$``, and descriptions taken from
    docstrings lose their line breaks and reST quotes."""
    if isinstance(schema, list):
        return [_for_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _for_json_schema(value) for key, value in schema.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and pattern.startswith("\\A") and pattern.endswith("\\Z"):
        out["pattern"] = f"^{pattern[2:-2]}$"
    description = out.get("description")
    if isinstance(description, str):
        out["description"] = " ".join(description.replace("``", "`").split())
    return out


def _schemas() -> dict[str, Json]:
    """Every struct on the wire, REST and socket.io, with the structs they hold."""
    _, components = msgspec.json.schema_components(
        (*REST_STRUCTS, *events.structs()), ref_template=REF
    )
    schemas: dict[str, Json] = _for_json_schema(components)
    return schemas


def _schema(t: Any) -> Json:
    schema: Json = _for_json_schema(msgspec.json.schema(t))
    return schema


def _socketio() -> Json:
    """``x-socketio``: each namespace's connect auth and events with their payloads and
    acks, as references into the components (prose: docs/PROTOCOL.md section 6)."""

    def event(e: events.Event) -> Json:
        out: Json = {"payload": _ref(e.payload.__name__) if e.payload is not None else {}}
        if e.ack is not None:
            out["ack"] = {"oneOf": [_ref(e.ack.__name__), _ref("ErrorAck")]}
        return out

    return {
        ns.path: {
            "auth": _ref(ns.auth.__name__),
            "in": {e.name: event(e) for e in ns.incoming},
            "out": {e.name: event(e) for e in ns.outgoing},
        }
        for ns in events.NAMESPACES
    }


def _error(description: str) -> Json:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
    }


def _json(schema: Json, description: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*names: str) -> dict[str, Json]:
    status = {
        "InvalidPayload": "400",
        "InvalidToken": "401",
        "Forbidden": "403",
        "NotFound": "404",
        "RateLimited": "429",
        "Unavailable": "503",
    }
    return {status[n]: {"$ref": f"#/components/responses/{n}"} for n in names}


def _param(name: str) -> Json:
    return {"$ref": f"#/components/parameters/{name}"}


def _body(schema: Json, required: bool = True) -> Json:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


Security = list[dict[str, list[str]]]
AGENT: Security = [{"agentToken": []}]
SUPERVISOR: Security = [{"supervisorToken": []}]
VISITOR: Security = [{"visitorToken": []}]
STATUS_TOKEN: Security = [{"statusToken": []}]
AGENT_ERRORS = ("InvalidToken", "Forbidden", "RateLimited", "Unavailable")


def _operation(operation_id: str, summary: str, responses: dict[str, Json], **more: Any) -> Json:
    return {"operationId": operation_id, "summary": summary, "responses": responses, **more}


def _paths() -> dict[str, Json]:
    presence = _json(_ref("Presence"), "The agent's presence after the change.")
    call = _json(_ref("Call"), "The callback as it stands.")
    device_params = [_param("device_id")]
    ticket_errors = _errors("InvalidPayload", "InvalidToken", "NotFound", "Unavailable")
    return {
        "/healthz": {
            "get": _operation(
                "healthz",
                "The process answers.",
                {"200": _json(_ref("Health"), "Alive.")},
                security=[],
            )
        },
        "/readyz": {
            "get": _operation(
                "readyz",
                "Whether a load balancer should send traffic here.",
                {
                    "200": _json(_ref("Readiness"), "Ready."),
                    "503": _json(
                        _ref("Readiness"),
                        "The store is unreachable, this node stopped hearing other nodes, or "
                        "it is draining.",
                    ),
                },
                security=[],
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics of this node.",
                {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                security=[],
            )
        },
        "/v1/openapi.json": {
            "get": _operation(
                "openapi",
                "This document.",
                {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
                security=[],
            )
        },
        "/v1/agents/me": {
            "get": _operation(
                "getMe",
                "The calling agent's presence, read through to the store.",
                {"200": _json(_ref("Presence"), "Presence."), **_errors(*AGENT_ERRORS)},
                security=AGENT,
                tags=["agents"],
            )
        },
        "/v1/agents/me/devices/{device_id}": {
            "parameters": device_params,
            "put": _operation(
                "putDevice",
                "Create or replace a device (IM bridge, mobile app) with a fresh lease.",
                {"200": presence, **_errors("InvalidPayload", *AGENT_ERRORS)},
                security=AGENT,
                tags=["agents"],
                requestBody=_body(_ref("DeviceUpdate")),
                description="The lease is presence.device_ttl_s (60 s): PUT again or "
                "heartbeat within it, or the device lapses on every node.",
            ),
            "delete": _operation(
                "deleteDevice",
                "Remove a device at once instead of waiting for its lease to lapse.",
                {"200": presence, **_errors("InvalidPayload", *AGENT_ERRORS)},
                security=AGENT,
                tags=["agents"],
            ),
        },
        "/v1/agents/me/devices/{device_id}/heartbeat": {
            "parameters": device_params,
            "post": _operation(
                "heartbeat",
                "Renew a device's lease.",
                {"200": presence, **_errors("InvalidPayload", "NotFound", *AGENT_ERRORS)},
                security=AGENT,
                tags=["agents"],
                description="404 not_found when the device does not exist or has lapsed: "
                "PUT it again.",
            ),
        },
        "/v1/sites/{site}/agents": {
            "parameters": [_param("site")],
            "get": _operation(
                "siteAgents",
                "Every agent of the supervisor's own site.",
                {
                    "200": _json({"type": "array", "items": _ref("Presence")}, "Presence."),
                    **_errors(*AGENT_ERRORS),
                },
                security=SUPERVISOR,
                tags=["agents"],
            ),
        },
        "/v1/sites/{site}/survey-scores": {
            "parameters": [_param("site")],
            "get": _operation(
                "surveyScores",
                "The answers to the question after the call, per agent and per branch, of the "
                "supervisor's own site.",
                {
                    "200": _json(_ref("SurveyScores"), "Each agent's and branch's tally."),
                    **_errors(*AGENT_ERRORS),
                },
                security=SUPERVISOR,
                tags=["agents"],
            ),
        },
        "/v1/sites/{site}/history.csv": {
            "parameters": [
                _param("site"),
                {
                    "name": "day",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string", "format": "date"},
                    "description": "The UTC day whose calls to export, YYYY-MM-DD.",
                },
            ],
            "get": _operation(
                "historyCsv",
                "The site's calls made on one day, from the call history, as CSV: call_id, "
                "channel, outcome, reason, agent_id, branch, created_at, connected_at, "
                "ended_at, to_first_human_s, survey_score.",
                {
                    **_errors(*AGENT_ERRORS),
                    "200": {
                        "description": "One row per call, oldest first.",
                        "content": {"text/csv": {"schema": {"type": "string"}}},
                    },
                    "400": _error("invalid_payload: day is not a date."),
                    "503": _error(
                        "history_unavailable: this node keeps no call history (nodes "
                        "sharing Redis without a history_url). " + DRAINING_OR_STORE
                    ),
                },
                security=SUPERVISOR,
                tags=["agents"],
            ),
        },
        "/v1/sites/{site}/figures": {
            "parameters": [
                _param("site"),
                {
                    "name": "span",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["hour", "day", "week"]},
                    "description": "The span up to now: hour (1-minute slots), day (15-minute "
                    "slots, the default) or week (3-hour slots).",
                },
            ],
            "get": _operation(
                "figures",
                "The board's charts, from the call history: time to the first human (p50, "
                "p90), abandoned and failed requests, callbacks on time, calls by channel, and "
                "NPS by agent and branch.",
                {
                    "200": _json(_ref("Figures"), "One value per slot for each series."),
                    **_errors(*AGENT_ERRORS),
                    "400": _error("invalid_payload: span is not hour, day or week."),
                    "503": _error("history_unavailable. " + DRAINING_OR_STORE),
                },
                security=SUPERVISOR,
                tags=["agents"],
            ),
        },
        "/v1/sites/{site}/experiment": {
            "parameters": [_param("site")],
            "get": _operation(
                "getExperiment",
                "The site's routing experiment (running, else the last one) and its arms "
                "compared, with 99% intervals and a verdict only when the data carry one.",
                {
                    "200": _json(_ref("ExperimentReport"), "The comparison."),
                    **_errors(*AGENT_ERRORS),
                    "503": _error("history_unavailable. " + DRAINING_OR_STORE),
                },
                security=SUPERVISOR,
                tags=["agents"],
            ),
            "put": _operation(
                "startExperiment",
                "Route a share of new requests by a variant policy.",
                {
                    "201": _json(_ref("ExperimentOut"), "The experiment, running."),
                    **_errors("InvalidPayload", *AGENT_ERRORS),
                    "409": _error("experiment_running: stop the running one first."),
                },
                security=SUPERVISOR,
                tags=["agents"],
                requestBody=_body(_ref("ExperimentStart")),
            ),
            "delete": _operation(
                "stopExperiment",
                "Stop the running experiment: every call is routed by the default policy.",
                {
                    "200": _json(_ref("ExperimentReport"), "The comparison, stopped."),
                    **_errors(*AGENT_ERRORS),
                    "404": _error("no_experiment: none is running."),
                    "503": _error("history_unavailable. " + DRAINING_OR_STORE),
                },
                security=SUPERVISOR,
                tags=["agents"],
            ),
        },
        "/v1/sites/{site}/presence/im": {
            "parameters": [_param("site")],
            "post": _operation(
                "postImPresence",
                "A chat integration reports agents' IM presence (their im device).",
                {
                    "200": _json(_ref("ImPresenceAnswer"), "Each update's outcome."),
                    "403": _error(
                        "invalid_signature: the signature headers are missing or wrong; "
                        "stale_webhook: the timestamp is more than 300 s from the gateway's."
                    ),
                    "404": _error("not_found: no such site, or it has no webhook secret."),
                    "409": _error("replayed_webhook: this request or its event ids were seen."),
                    "422": _error("unknown_agent: an update names no agent of the site."),
                    **_errors("InvalidPayload", "RateLimited", "Unavailable"),
                },
                security=[{"presenceWebhookSignature": []}],
                tags=["agents"],
                parameters=[
                    {
                        "name": TIMESTAMP_HEADER,
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
                        "description": "Unix seconds when the request was signed.",
                    },
                ],
                requestBody=_body({"oneOf": [_ref("ImPresenceUpdate"), _ref("ImPresenceBatch")]}),
                description="Signed with the site's presence_webhook_secret (docs/PROTOCOL.md "
                "section 4, Presence from IM). offline removes the agent's im device; any "
                "other state sets it with a lease of presence.im_ttl_s (12 h).",
            ),
        },
        "/v1/sites/{site}/sessions": {
            "parameters": [_param("site")],
            "post": _operation(
                "createSession",
                "Open a visitor session from a page of the site (Origin checked).",
                {
                    "201": _json(_ref("Session"), "A visitor token and ICE servers."),
                    "403": _error("origin_not_allowed: no Origin, or not one of the site's."),
                    "503": _error(DRAINING_OR_STORE),
                    **_errors("InvalidPayload", "NotFound", "RateLimited"),
                },
                security=[],
                tags=["visitors"],
                parameters=[
                    {
                        "name": "Origin",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "Sent by the browser; one of the site's origins.",
                    }
                ],
                requestBody=_body(_ref("SessionRequest"), required=False),
            ),
        },
        "/v1/sites/{site}/availability": {
            "parameters": [_param("site"), _param("language"), _param("branch")],
            "get": _operation(
                "getAvailability",
                "What the site's button may promise now.",
                {
                    "200": _json(_ref("Availability"), "Availability."),
                    **_errors("InvalidPayload", "NotFound"),
                },
                security=[],
                tags=["visitors"],
            ),
        },
        "/v1/sites/{site}/availability/stream": {
            "parameters": [_param("site"), _param("language"), _param("branch")],
            "get": _operation(
                "streamAvailability",
                "Availability as Server-Sent Events, for idle page views.",
                {
                    "200": {
                        "description": "retry: 5000, then an `availability` event (its data "
                        "an Availability object) on every change, and a keepalive comment "
                        "every 20 s.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "503": _error(
                        "too_many_watchers: this node is full; use another. draining: this "
                        "node is shutting down; retry after Retry-After (elsewhere)."
                    ),
                    **_errors("InvalidPayload", "NotFound"),
                },
                security=[],
                tags=["visitors"],
            ),
        },
        "/v1/sites/{site}/callbacks": {
            "parameters": [_param("site")],
            "post": _operation(
                "createCallback",
                "Ask to be called back, now or at a time; stored before it is answered.",
                {
                    "201": _json(_ref("CallbackCreated"), "The callback and its status token."),
                    "200": _json(
                        _ref("CallbackCreated"),
                        "A repeat, by the same visitor for the same number, of a request whose "
                        "answer was lost: the open callback it booked.",
                    ),
                    "409": _error("callback_in_progress or number_has_callback."),
                    "422": _error(
                        "country_not_allowed, number_type_not_allowed, slot_unavailable or "
                        "quiet_hours."
                    ),
                    "429": _error(
                        "number_rate_limited, too_many_numbers, ip_rate_limited or "
                        "site_rate_limited."
                    ),
                    "503": _error(
                        "callbacks_unavailable, spend_cap_reached or store_unavailable; "
                        "draining: this node is shutting down, retry after Retry-After "
                        "(elsewhere)."
                    ),
                    **_errors("InvalidPayload", "InvalidToken", "Forbidden", "NotFound"),
                },
                security=VISITOR,
                tags=["visitors"],
                requestBody=_body(_ref("CallbackRequest")),
                description="400 is invalid_payload or invalid_phone. Refusals are checked "
                "in the order docs/PROTOCOL.md section 5 gives.",
            ),
        },
        "/v1/sites/{site}/callback-slots": {
            "parameters": [_param("site"), _param("branch")],
            "get": _operation(
                "callbackSlots",
                "Bookable callback times: 15-minute slots inside opening hours, 3 days ahead.",
                {
                    "200": _json(_ref("CallbackSlots"), "Ascending."),
                    **_errors("InvalidPayload", "NotFound"),
                },
                security=[],
                tags=["visitors"],
            ),
        },
        "/v1/calls/{call_id}": {
            "parameters": [_param("call_id")],
            "get": _operation(
                "getTicket",
                "A call's ticket: state, position in line, ETA; on the read-only share link "
                "(its token in `token`), a SharedCall.",
                {
                    "200": _json(
                        {"anyOf": [_ref("Call"), _ref("SharedCall")]},
                        "The call as its customer sees it, or as its share link shows it.",
                    ),
                    **ticket_errors,
                },
                security=STATUS_TOKEN,
                tags=["visitors"],
            ),
            "delete": _operation(
                "cancelTicket",
                "Cancel a callback (an ended one is answered as it is).",
                {"200": call, **ticket_errors},
                security=STATUS_TOKEN,
                tags=["visitors"],
            ),
        },
        "/v1/calls/{call_id}/move": {
            "parameters": [_param("call_id")],
            "post": _operation(
                "moveTicket",
                "Call me at another time: a waiting callback (scheduled or queued) is "
                "scheduled for one of the callback slots.",
                {
                    "200": call,
                    "409": _error(
                        "invalid_state: it is already ringing, dialing or connected; "
                        "call_ended: it has ended."
                    ),
                    "422": _error(
                        "slot_unavailable: too soon, too far ahead, or closed then; "
                        "quiet_hours: night time at the number then."
                    ),
                    **ticket_errors,
                },
                requestBody=_body(_ref("TicketMove")),
                security=STATUS_TOKEN,
                tags=["visitors"],
            ),
        },
        "/v1/calls/{call_id}/keep": {
            "parameters": [_param("call_id")],
            "post": _operation(
                "keepTicket",
                "Told the callback runs late (`late`), keep my place and the new time "
                "(`promised_at`); no body. Without a late notice open, nothing changes.",
                {
                    "200": call,
                    "409": _error(
                        "stale: it no longer waits (ringing, dialing or connected); "
                        "call_ended: it has ended; invalid_state: not a callback."
                    ),
                    **ticket_errors,
                },
                security=STATUS_TOKEN,
                tags=["visitors"],
            ),
        },
        "/v1/calls/{call_id}/survey": {
            "parameters": [_param("call_id")],
            "post": _operation(
                "answerSurvey",
                "How likely the customer is to recommend us (0 to 10, and a comment), once per "
                "call that reached an agent, within a week of its end.",
                {
                    "200": _json(_ref("SurveyAnswered"), "Thanks; a promoter's referral link."),
                    "409": _error(
                        "no_survey: the call never reached anyone (or has not ended); "
                        "survey_closed: it ended more than a week ago; already_answered."
                    ),
                    **ticket_errors,
                },
                requestBody=_body(_ref("SurveyAnswerIn")),
                security=STATUS_TOKEN,
                tags=["visitors"],
            ),
        },
        "/v1/calls/{call_id}/share": {
            "parameters": [_param("call_id")],
            "post": _operation(
                "shareTicket",
                "Turn the ticket's read-only share link on: a new link each time (the last "
                "one stops working).",
                {"200": _json(_ref("ShareLink"), "The link, shown only here."), **ticket_errors},
                security=STATUS_TOKEN,
                tags=["visitors"],
            ),
            "delete": _operation(
                "unshareTicket",
                "Turn the share link off: it reads nothing, and pages open on it are told so.",
                {"200": call, **ticket_errors},
                security=STATUS_TOKEN,
                tags=["visitors"],
            ),
        },
        "/v1/calls/{call_id}/personal-data": {
            "parameters": [_param("call_id")],
            "delete": _operation(
                "eraseTicket",
                "Erase the customer's personal data from the call (number, page, place, "
                "visitor id, share link); a waiting callback is canceled first.",
                {
                    "200": call,
                    "409": _error("invalid_state: the call is live; end it first."),
                    **ticket_errors,
                },
                security=STATUS_TOKEN,
                tags=["visitors"],
            ),
        },
        "/v1/calls/{call_id}/stream": {
            "parameters": [_param("call_id")],
            "get": _operation(
                "streamTicket",
                "The ticket as Server-Sent Events, for the ticket page.",
                {
                    "200": {
                        "description": "retry: 5000, then a `ticket` event (its data "
                        '`{"version", "call": Call}`) now and on every change, and a '
                        "keepalive comment every 20 s.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "503": _error(
                        "too_many_watchers: this node (or this ticket on it) has too many "
                        "streams. draining: this node is shutting down."
                    ),
                    **ticket_errors,
                },
                security=STATUS_TOKEN,
                tags=["visitors"],
            ),
        },
        "/v1/messages/{language}": {
            "parameters": [
                {
                    "name": "language",
                    "in": "path",
                    "required": True,
                    "schema": _schema(Language),
                    "description": "A BCP 47 tag; the best language Membrane speaks is served.",
                }
            ],
            "get": _operation(
                "getCatalogue",
                "The sentences the browser pages show, translated.",
                {
                    "200": _json(_ref("Catalogue"), "English is an empty map: ids are English."),
                    **_errors("InvalidPayload"),
                },
                security=[],
                tags=["visitors"],
            ),
        },
    }


def _components() -> Json:
    bearer = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    query = {"in": "query", "required": False}
    id_schema = _schema(Id)
    # The query filters as the codec reads them (absent: any; present and empty: refused).
    filters = _schema(Filters)["$defs"]["Filters"]["properties"]
    return {
        "schemas": _schemas(),
        "responses": {
            "InvalidPayload": _error("invalid_payload (or another 400 code of the operation)."),
            "InvalidToken": _error("invalid_token: missing, malformed, expired or foreign."),
            "Forbidden": _error(
                "forbidden: the token's role or site may not do this; role_mismatch: the"
                " configuration gives the token's sub another role."
            ),
            "NotFound": _error("not_found: unknown site, call or device."),
            "RateLimited": _error("rate_limited: slow down."),
            "Unavailable": _error(
                "store_unavailable: the store is unreachable; retry after Retry-After."
            ),
        },
        "parameters": {
            "site": {"name": "site", "in": "path", "required": True, "schema": id_schema},
            "device_id": {"name": "device_id", "in": "path", "required": True, "schema": id_schema},
            "call_id": {"name": "call_id", "in": "path", "required": True, "schema": id_schema},
            "language": {
                "name": "language",
                **query,
                "schema": filters["language"]["anyOf"][0],
                "description": "Only agents who speak it (exactly or by primary language).",
            },
            "branch": {
                "name": "branch",
                **query,
                "schema": filters["branch"]["anyOf"][0],
                "description": "Only this branch's agents and hours.",
            },
        },
        "securitySchemes": {
            "agentToken": {**bearer, "description": "An agent's (or supervisor's) JWT."},
            "supervisorToken": {**bearer, "description": "A supervisor's JWT for its site."},
            "visitorToken": {**bearer, "description": "The JWT of POST .../sessions."},
            "presenceWebhookSignature": {
                "type": "apiKey",
                "in": "header",
                "name": SIGNATURE_HEADER,
                "description": "v1=<hex HMAC-SHA256 of the timestamp, '.', and the raw body, "
                "keyed with the site's presence_webhook_secret>.",
            },
            "statusToken": {
                "type": "apiKey",
                "in": "query",
                "name": "token",
                "description": "The callback's status token from POST .../callbacks.",
            },
        },
    }


def _version() -> str:
    try:
        return version("membrane")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


def document(public_url: str) -> Json:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Membrane",
            "version": _version(),
            "description": "Click-to-call and presence gateway. The prose contract, with "
            "every error code and the socket.io events, is docs/PROTOCOL.md.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": public_url.rstrip("/")}],
        "tags": [
            {"name": "agents", "description": "Agents' devices, for IM bridges and mobile apps."},
            {
                "name": "visitors",
                "description": "Website visitors: sessions, availability, "
                "callbacks and their tickets.",
            },
        ],
        "paths": _paths(),
        "components": _components(),
        "x-socketio": _socketio(),
    }
