"""The OpenAPI 3.1 document of Membrane's REST API, served at ``GET /v1/openapi.json``.

docs/PROTOCOL.md is the contract in prose; this is its REST part for machines (client
generators, API explorers, contract tests). It is built from the enums the code itself uses,
so states, kinds and channels cannot drift from it, and tests/test_openapi.py holds it to the
routes the app registers (both ways) and real answers of a node to the schemas it declares.
The socket.io namespaces and Twilio's webhooks are not described here: they are not REST
calls an integrator makes (docs/PROTOCOL.md sections 5 and 6).
"""

from __future__ import annotations

import re
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from gateway.core.call import CallChannel, CallState
from gateway.core.model import Channel, DeviceKind, DeviceState, PresenceStatus
from gateway.wire.codec import (
    ID_PATTERN,
    LANGUAGE_PATTERN,
    MAX_PRIORITY,
    VISITOR_ID_PATTERN,
    VISITOR_SECRET_PATTERN,
    Json,
)


def _pattern(compiled: re.Pattern[str]) -> Json:
    """The codec's own pattern, as JSON Schema writes a whole-string match."""
    body = compiled.pattern.removeprefix("\\A").removesuffix("\\Z")
    return {"type": "string", "pattern": f"^{body}$"}


ID = _pattern(ID_PATTERN)
PHONE_SHAPE = r"^\s*\+[0-9 ().-]*[0-9().-]\s*$"
DRAINING_OR_STORE = (
    "store_unavailable: the store is unreachable; retry after Retry-After. draining: this node "
    "is shutting down; retry after Retry-After (behind a load balancer, another node answers)."
)
LANGUAGE = _pattern(LANGUAGE_PATTERN)
TIME = {"type": "string", "format": "date-time"}


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _enum(values: type[StrEnum]) -> Json:
    return {"type": "string", "enum": [v.value for v in values]}


def _nullable(schema: Json) -> Json:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(required: dict[str, Json], optional: dict[str, Json] | None = None) -> Json:
    """An object with these fields. Answers may gain fields without a version change, so
    clients must ignore unknown ones (docs/PROTOCOL.md): additional properties are allowed."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


def _schemas() -> dict[str, Json]:
    device_fields: dict[str, Json] = {
        "kind": _enum(DeviceKind),
        "state": _enum(DeviceState),
    }
    priority = {"type": "integer", "minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY}
    # As the codec reads them: null is the same as leaving a hint out (but not for skills).
    hints: dict[str, Json] = {
        "language": _nullable(LANGUAGE),
        "branch": _nullable(ID),
        "location": _nullable(
            _object(
                {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                }
            )
        ),
        "page": _nullable({"type": "string", "maxLength": 2048}),
        "skills": {
            "type": "array",
            "maxItems": 8,
            "items": {"type": "string", "minLength": 1, "maxLength": 32},
        },
    }
    return {
        "Error": _object(
            {
                "error": _object(
                    {
                        "code": {
                            "type": "string",
                            "pattern": "^[a-z][a-z0-9_]*$",
                            "description": "Stable; every code is listed in "
                            "docs/PROTOCOL.md section 2.",
                        },
                        "message": {"type": "string", "description": "Human text; may change."},
                    }
                )
            }
        ),
        "Health": _object({"status": {"const": "ok"}, "node": {"type": "string"}}),
        "Readiness": _object(
            {
                "ready": {"type": "boolean"},
                "draining": {
                    "type": "boolean",
                    "description": "Shutting down (SIGTERM): not ready, whatever the store says.",
                },
                "node": {"type": "string"},
                "store": _object(
                    {
                        "reachable": {"type": "boolean"},
                        "listening": {"type": "boolean"},
                        "persistent": {"type": "boolean"},
                        "detail": {"type": "string"},
                    }
                ),
                "warnings": {"type": "array", "items": {"type": "string"}},
            }
        ),
        "Device": _object(
            {
                "device_id": ID,
                **device_fields,
                "priority": priority,
                "last_seen": TIME,
                "expires_at": TIME,
            }
        ),
        "DeviceUpdate": _object(
            device_fields,
            {
                # As the codec reads it: null is the default, like leaving it out.
                "priority": {
                    **_nullable(priority),
                    "default": 0,
                    "description": "Absent or null: 0. 1.0 is the integer 1, as in JSON.",
                },
                "device_id": {"description": "Ignored, whatever it is: the path's id wins."},
            },
        ),
        "Presence": _object(
            {
                "agent_id": ID,
                "site": ID,
                "name": {"type": "string"},
                "branch": _nullable(ID),
                "status": _enum(PresenceStatus),
                "channels": {"type": "array", "items": _enum(Channel)},
                "devices": {"type": "array", "items": _ref("Device")},
                "since": TIME,
            }
        ),
        "Availability": _object(
            {
                "available": {"type": "boolean"},
                "channels": {"type": "array", "items": _enum(Channel)},
                "agents_available": {"type": "integer", "minimum": 0},
                "estimated_wait_s": {"type": "integer", "minimum": 0},
                "open": {"type": "boolean"},
                "next_open_at": _nullable(TIME),
            }
        ),
        "IceServer": _object(
            {"urls": {"type": "array", "items": {"type": "string"}}},
            {"username": {"type": "string"}, "credential": {"type": "string"}},
        ),
        "SessionRequest": _object(
            {},
            {
                "visitor_id": {
                    "type": "string",
                    "description": "The id of an earlier session: kept only together with "
                    "its visitor_secret; without it, or with a wrong one, a new id is made.",
                },
                "visitor_secret": {
                    "type": "string",
                    "description": "The visitor_secret that came with visitor_id.",
                },
            },
        ),
        "Session": _object(
            {
                "token": {"type": "string", "description": "Visitor JWT for /visitor."},
                "visitor_id": _pattern(VISITOR_ID_PATTERN),
                "visitor_secret": {
                    **_pattern(VISITOR_SECRET_PATTERN),
                    "description": "Proves visitor_id in later session requests: whoever "
                    "holds it is this visitor, so the client keeps it to itself.",
                },
                "expires_at": TIME,
                "ice_servers": {"type": "array", "items": _ref("IceServer")},
            }
        ),
        "TimelineEntry": _object(
            {"at": TIME, "event": {"type": "string"}, "detail": {"type": "string"}}
        ),
        "Call": _object(
            {
                "call_id": ID,
                "site": ID,
                "channel": _enum(CallChannel),
                "state": _enum(CallState),
                "agent": _nullable(
                    _object({"name": {"type": "string"}, "branch": _nullable({"type": "string"})})
                ),
                "position": _nullable({"type": "integer", "minimum": 1}),
                "eta_s": _nullable({"type": "integer", "minimum": 0}),
                "scheduled_at": _nullable(TIME),
                "timeline": {"type": "array", "items": _ref("TimelineEntry")},
                "reason": _nullable({"type": "string"}),
                "callback_offer": _nullable(
                    _object({"estimated_wait_s": {"type": "integer", "minimum": 0}})
                ),
            }
        ),
        "CallbackRequest": _object(
            {
                "phone": {
                    "type": "string",
                    "maxLength": 32,
                    # phone_policy.RAW_SHAPE once surrounding white space is stripped: a
                    # blank or empty phone is refused (invalid_phone), as is a bare "+".
                    "pattern": PHONE_SHAPE,
                    "description": "International form: + then digits; spaces and ().- "
                    "are allowed and dropped. It must also be a valid number (not "
                    "expressible here): else 400 invalid_phone.",
                }
            },
            {
                "at": {
                    **_nullable(TIME),
                    "description": "When to call; absent or null: as soon as possible.",
                },
                "after_call": {
                    **_nullable(ID),
                    "description": "Keep my place: the visitor's own browser call that "
                    "failed at most 30 minutes ago.",
                },
                **hints,
            },
        ),
        "CallbackCreated": _object(
            {
                "call_id": ID,
                "status_token": {
                    "type": "string",
                    "description": "Shown only here: reads and cancels this callback.",
                },
                "call": _ref("Call"),
            }
        ),
        "CallbackSlots": _object({"slots": {"type": "array", "items": TIME}}),
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
                "A callback's live ticket: state, position in line, ETA.",
                {"200": call, **ticket_errors},
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
    }


def _components() -> Json:
    bearer = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    query = {"in": "query", "required": False}
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
            "site": {"name": "site", "in": "path", "required": True, "schema": ID},
            "device_id": {"name": "device_id", "in": "path", "required": True, "schema": ID},
            "call_id": {"name": "call_id", "in": "path", "required": True, "schema": ID},
            "language": {
                "name": "language",
                **query,
                "schema": LANGUAGE,
                "description": "Only agents who speak it (exactly or by primary language).",
            },
            "branch": {
                "name": "branch",
                **query,
                "schema": ID,
                "description": "Only this branch's agents and hours.",
            },
        },
        "securitySchemes": {
            "agentToken": {**bearer, "description": "An agent's (or supervisor's) JWT."},
            "supervisorToken": {**bearer, "description": "A supervisor's JWT for its site."},
            "visitorToken": {**bearer, "description": "The JWT of POST .../sessions."},
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
    }
