"""``GET /v1/openapi.json``: a valid OpenAPI 3.1 document that names every REST route the
app has and no other, and whose schemas a node's real answers, successes and refusals alike,
satisfy."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import test_callbacks
from conftest import Node, SocketClient, mint
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from test_callbacks import ORIGIN, VISITOR_PHONE, agent, visitor_token

from gateway.core.model import Role

# The fixtures of tests/test_callbacks.py: a node that places calls through the simulator,
# on each store.
sim = test_callbacks.sim
store_url = test_callbacks.store_url
node = test_callbacks.node

METHODS = {"get", "put", "post", "delete", "patch"}
DOC = "urn:membrane:openapi"


def rest_routes(node: Node) -> set[tuple[str, str]]:
    """(method, path) of every REST operation the app registers: health, metrics and /v1/,
    without static files, socket.io and Twilio's webhooks."""
    routes = set()
    for route in node.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        method = route.method.lower()
        if method not in METHODS:
            continue
        if path in ("/healthz", "/readyz", "/metrics") or (
            path.startswith("/v1/") and not path.startswith("/v1/twilio/")
        ):
            routes.add((method, path))
    return routes


class Contract:
    """Checks answers against the schema the document declares for them."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(DOC, resource)
        self.checked: set[tuple[str, str, int]] = set()

    def response(self, method: str, path: str, status: int) -> tuple[dict[str, Any], str]:
        """The response the document declares for this status, and where it is in it (a
        JSON pointer: an operation's own, or a shared one of components/responses)."""
        declared = self.document["paths"][path][method]["responses"]
        assert str(status) in declared, f"{method} {path} answered {status}, not declared"
        found: dict[str, Any] = declared[str(status)]
        if "$ref" in found:
            pointer = found["$ref"].removeprefix("#/")
            name = pointer.rsplit("/", 1)[1]
            return self.document["components"]["responses"][name], pointer
        parts = ("paths", path, method, "responses", str(status))
        return found, "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)

    async def check(self, r: aiohttp.ClientResponse, method: str, path: str) -> Any:
        """The answer's body, after checking it against its declared schema."""
        declared, pointer = self.response(method, path, r.status)
        media = r.headers["Content-Type"].split(";")[0]
        assert media in declared["content"], f"{method} {path}: {media} not declared"
        self.checked.add((method, path, r.status))
        if media != "application/json":
            return await r.text()
        body = await r.json()
        validator = Draft202012Validator(
            {"$ref": f"{DOC}#/{pointer}/content/application~1json/schema"},
            registry=self.registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )
        errors = [e.message for e in validator.iter_errors(body)]
        assert not errors, f"{method} {path} {r.status}: {errors} in {body}"
        return body


async def test_the_document_is_valid_openapi_served_to_anyone(
    node: Node, http: aiohttp.ClientSession
) -> None:
    r = await http.get(f"{node.url}/v1/openapi.json", headers={"Origin": "https://tools.example"})
    assert r.status == 200
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    document = await r.json()
    validate(document)  # raises, naming the first problem, if this is not OpenAPI 3.1
    assert document["servers"] == [{"url": node.settings.public_url.rstrip("/")}]


async def test_the_document_names_every_rest_route_and_no_other(
    node: Node, http: aiohttp.ClientSession
) -> None:
    document = await (await http.get(f"{node.url}/v1/openapi.json")).json()
    documented = {(method, path) for path, item in document["paths"].items() for method in item} & {
        (m, p) for m in METHODS for p in document["paths"]
    }
    assert documented == rest_routes(node)


async def test_answers_match_the_document(
    node: Node, http: aiohttp.ClientSession, clients: Callable[[], SocketClient]
) -> None:
    url = node.url
    contract = Contract(await (await http.get(f"{url}/v1/openapi.json")).json())

    async def call(method: str, path: str, route: str | None = None, **kwargs: Any) -> Any:
        r = await http.request(method.upper(), f"{url}{path}", **kwargs)
        return r.status, await contract.check(r, method, route or path)

    assert (await call("get", "/healthz"))[0] == 200
    assert (await call("get", "/readyz"))[0] == 200
    assert (await call("get", "/metrics"))[0] == 200
    assert (await call("get", "/v1/openapi.json"))[0] == 200

    # Agents.
    anna = {"Authorization": f"Bearer {mint(node.settings, 'anna')}"}
    sam = {"Authorization": f"Bearer {mint(node.settings, 'sam', Role.SUPERVISOR)}"}
    device = "/v1/agents/me/devices/{device_id}"
    await agent(clients, node, "anna")
    assert (await call("get", "/v1/agents/me", headers=anna))[0] == 200
    assert (await call("get", "/v1/agents/me"))[0] == 401
    body = {"kind": "mobile", "state": "available", "priority": 2}
    status, presence = await call(
        "put", "/v1/agents/me/devices/phone", device, json=body, headers=anna
    )
    assert status == 200 and any(d["device_id"] == "phone" for d in presence["devices"])
    bad = {"kind": "fax", "state": "available"}
    assert (await call("put", "/v1/agents/me/devices/phone", device, json=bad, headers=anna))[
        0
    ] == 400
    beat = device + "/heartbeat"
    assert (await call("post", "/v1/agents/me/devices/phone/heartbeat", beat, headers=anna))[
        0
    ] == 200
    assert (await call("post", "/v1/agents/me/devices/gone/heartbeat", beat, headers=anna))[
        0
    ] == 404
    assert (await call("delete", "/v1/agents/me/devices/phone", device, headers=anna))[0] == 200
    agents = "/v1/sites/{site}/agents"
    assert (await call("get", "/v1/sites/acme/agents", agents, headers=sam))[0] == 200
    assert (await call("get", "/v1/sites/acme/agents", agents, headers=anna))[0] == 403
    scores = "/v1/sites/{site}/survey-scores"
    assert (await call("get", "/v1/sites/acme/survey-scores", scores, headers=sam))[0] == 200
    assert (await call("get", "/v1/sites/acme/survey-scores", scores, headers=anna))[0] == 403
    history = "/v1/sites/{site}/history.csv"
    day = {"day": datetime.now(UTC).date().isoformat()}
    status, _ = await call("get", "/v1/sites/acme/history.csv", history, headers=sam, params=day)
    assert status in (200, 503)  # one node keeps history; nodes sharing Redis do not yet
    assert (await call("get", "/v1/sites/acme/history.csv", history, headers=anna, params=day))[
        0
    ] == 403
    figures = "/v1/sites/{site}/figures"
    status, _ = await call("get", "/v1/sites/acme/figures", figures, headers=sam)
    assert status in (200, 503)
    assert (await call("get", "/v1/sites/acme/figures", figures, headers=anna))[0] == 403
    wrong_span = {"span": "month"}
    assert (await call("get", "/v1/sites/acme/figures", figures, headers=sam, params=wrong_span))[
        0
    ] in (400, 503)
    experiment = "/v1/sites/{site}/experiment"
    start = {"variant": "mobile_first", "share": 0.1, "name": "mobile"}
    status, started = await call(
        "put", "/v1/sites/acme/experiment", experiment, json=start, headers=sam
    )
    assert status == 201 and started["running"] is True
    again = await call("put", "/v1/sites/acme/experiment", experiment, json=start, headers=sam)
    assert again[0] == 409 and again[1]["error"]["code"] == "experiment_running"
    too_much = {"variant": "mobile_first", "share": 0.9}
    assert (await call("put", "/v1/sites/acme/experiment", experiment, json=too_much, headers=sam))[
        0
    ] == 400
    assert (await call("get", "/v1/sites/acme/experiment", experiment, headers=sam))[0] in (
        200,
        503,
    )
    assert (await call("get", "/v1/sites/acme/experiment", experiment, headers=anna))[0] == 403
    assert (await call("delete", "/v1/sites/acme/experiment", experiment, headers=sam))[0] in (
        200,
        503,
    )
    stopped = await call("delete", "/v1/sites/acme/experiment", experiment, headers=sam)
    assert stopped[0] == 404 and stopped[1]["error"]["code"] == "no_experiment"
    # This node's site has no webhook secret (tests/test_im_presence.py checks the rest).
    im = "/v1/sites/{site}/presence/im"
    assert (await call("post", "/v1/sites/acme/presence/im", im, json={}))[0] == 404

    # Visitors.
    sessions = "/v1/sites/{site}/sessions"
    status, first = await call("post", "/v1/sites/acme/sessions", sessions, json={}, headers=ORIGIN)
    assert status == 201
    proof = {k: first[k] for k in ("visitor_id", "visitor_secret")}
    status, again = await call(
        "post", "/v1/sites/acme/sessions", sessions, json=proof, headers=ORIGIN
    )
    assert status == 201 and again["visitor_id"] == first["visitor_id"]
    foreign = {"Origin": "https://evil.example"}
    assert (await call("post", "/v1/sites/acme/sessions", sessions, json={}, headers=foreign))[
        0
    ] == 403
    assert (await call("post", "/v1/sites/nope/sessions", sessions, json={}, headers=ORIGIN))[
        0
    ] == 404
    availability = "/v1/sites/{site}/availability"
    status, now = await call("get", "/v1/sites/acme/availability", availability)
    assert status == 200 and now["available"] is True
    assert (await call("get", "/v1/sites/acme/availability?language=English", availability))[
        0
    ] == 400
    slots = "/v1/sites/{site}/callback-slots"
    assert (await call("get", "/v1/sites/acme/callback-slots", slots))[0] == 200
    stream = await http.get(f"{url}/v1/sites/acme/availability/stream")
    assert stream.status == 200
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    contract.response("get", "/v1/sites/{site}/availability/stream", 200)
    stream.close()

    # Callbacks and their ticket.
    callbacks = "/v1/sites/{site}/callbacks"
    visitor = {**ORIGIN, "Authorization": f"Bearer {await visitor_token(http, node)}"}
    status, created = await call(
        "post",
        "/v1/sites/acme/callbacks",
        callbacks,
        json={"phone": VISITOR_PHONE},
        headers=visitor,
    )
    assert status == 201
    again = await call(
        "post",
        "/v1/sites/acme/callbacks",
        callbacks,
        json={"phone": VISITOR_PHONE},
        headers=visitor,
    )
    assert again[0] == 200 and again[1]["call_id"] == created["call_id"]  # a repeat
    other = await call(
        "post",
        "/v1/sites/acme/callbacks",
        callbacks,
        json={"phone": "+353861110002"},
        headers=visitor,
    )
    assert other[0] == 409
    junk = {"phone": "call me maybe"}
    assert (await call("post", "/v1/sites/acme/callbacks", callbacks, json=junk, headers=visitor))[
        0
    ] == 400
    assert (await call("post", "/v1/sites/acme/callbacks", callbacks, json=junk, headers=ORIGIN))[
        0
    ] == 401
    ticket = "/v1/calls/{call_id}"
    path = f"/v1/calls/{created['call_id']}"
    token = {"token": created["status_token"]}
    assert (await call("get", path, ticket, params=token))[0] == 200
    assert (await call("get", path, ticket))[0] == 401
    assert (await call("get", path, ticket, params={"token": "wrong"}))[0] == 404
    move = ticket + "/move"
    soon = {"at": datetime.now(UTC).isoformat()}
    status, refused = await call("post", path + "/move", move, params=token, json=soon)
    # Refused either way: too soon, or (Anna is online) already ringing her.
    assert (status, refused["error"]["code"]) in {
        (422, "slot_unavailable"),
        (409, "invalid_state"),
    }, refused
    assert (await call("post", path + "/move", move, params=token, json={"at": 1}))[0] == 400
    assert (await call("post", path + "/move", move, params={"token": "x"}, json=soon))[0] == 404
    keep = ticket + "/keep"
    status, kept = await call("post", path + "/keep", keep, params=token)
    # Nothing to keep (no late notice): answered as it is, or refused once it rings Anna.
    assert status in (200, 409), kept
    assert (await call("post", path + "/keep", keep, params={"token": "x"}))[0] == 404
    survey = ticket + "/survey"
    status, unasked = await call("post", path + "/survey", survey, params=token, json={"score": 9})
    assert (status, unasked["error"]["code"]) == (409, "no_survey"), "a callback still waiting"
    assert (await call("post", path + "/survey", survey, params=token, json={}))[0] == 400
    live = await http.get(f"{url}{path}/stream", params=token)
    assert live.status == 200
    assert live.headers["Content-Type"].startswith("text/event-stream")
    contract.response("get", ticket + "/stream", 200)
    live.close()
    assert (await call("get", path + "/stream", ticket + "/stream"))[0] == 401
    share = ticket + "/share"
    status, shared = await call("post", path + "/share", share, params=token)
    assert status == 200 and shared["call"]["sharing"] is True
    share_token = {"token": shared["share_url"].rsplit("#", 1)[1]}
    status, seen = await call("get", path, ticket, params=share_token)
    assert status == 200 and seen["shared"] is True
    assert (await call("delete", path + "/share", share, params={"token": "x"}))[0] == 404
    status, unshared = await call("delete", path + "/share", share, params=token)
    assert status == 200 and unshared["sharing"] is False
    catalogue = "/v1/messages/{language}"
    status, german = await call("get", "/v1/messages/de-AT", catalogue)
    assert status == 200 and german["language"] == "de" and german["messages"], german
    status, english = await call("get", "/v1/messages/xx", catalogue)
    assert status == 200 and english == {"language": "en", "messages": {}}
    status, ended = await call("delete", path, ticket, params=token)
    assert status == 200 and ended["state"] == "canceled"
    personal = ticket + "/personal-data"
    status, erased = await call("delete", path + "/personal-data", personal, params=token)
    assert status == 200 and erased["timeline"][-1]["event"] == "erased"

    exercised = {(m, p) for m, p, _ in contract.checked} | {
        ("get", availability + "/stream"),
        ("get", ticket + "/stream"),
    }
    assert exercised == rest_routes(node), "every operation answered at least once"


def request_verdict(contract: Contract, schema: dict[str, Any], value: Any) -> bool:
    """Whether the document accepts ``value`` under ``schema`` (refs resolved in it)."""
    validator = Draft202012Validator(
        schema, registry=contract.registry, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    return bool(validator.is_valid(value))


async def test_the_document_and_the_server_agree_on_edge_requests(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """Requests the document calls invalid are the ones the server refuses with a 400, and
    the other way round, for the values at the edges: an empty or blank phone, priorities
    at and past their bounds or null, empty filters."""
    url = node.url
    document = await (await http.get(f"{url}/v1/openapi.json")).json()
    contract = Contract(document)

    def body_schema(method: str, path: str) -> dict[str, Any]:
        body = document["paths"][path][method]["requestBody"]["content"]["application/json"]
        return {"$ref": f"{DOC}{body['schema']['$ref']}"}

    disagreements: list[tuple[Any, ...]] = []

    # Devices: priority at, inside and past its bounds, null, and not an integer.
    anna = {"Authorization": f"Bearer {mint(node.settings, 'anna')}"}
    device = body_schema("put", "/v1/agents/me/devices/{device_id}")
    base = {"kind": "mobile", "state": "available"}
    priorities: tuple[Any, ...] = (
        0,
        127,
        -127,
        128,
        -128,
        None,
        0.5,
        1.0,
        127.0,
        128.0,
        "1",
        True,
        [],
        {},
    )
    for priority in priorities:
        body = {**base, "priority": priority}
        r = await http.put(f"{url}/v1/agents/me/devices/phone", json=body, headers=anna)
        assert r.status in (200, 400), (body, r.status)
        if request_verdict(contract, device, body) != (r.status == 200):
            disagreements.append(("priority", priority, r.status))
    assert request_verdict(contract, device, base)
    assert (await http.put(f"{url}/v1/agents/me/devices/p2", json=base, headers=anna)).status == 200
    # JSON has one kind of number: 1.0 is the integer 1, to the document and to the server.
    r = await http.put(
        f"{url}/v1/agents/me/devices/phone", json={**base, "priority": 1.0}, headers=anna
    )
    assert r.status == 200
    devices = {d["device_id"]: d for d in (await r.json())["devices"]}
    assert devices["phone"]["priority"] == 1

    # Callbacks: the phone's edges (a valid shape is also checked as a number; these are not).
    callback = body_schema("post", "/v1/sites/{site}/callbacks")
    visitor = {**ORIGIN, "Authorization": f"Bearer {await visitor_token(http, node)}"}
    for phone in (
        "",
        " ",
        "\t",
        "+",
        "+ ",
        "abc",
        "0861110001",
        "+" + "3" * 32,
        5,
        None,
        VISITOR_PHONE,
        f"  {VISITOR_PHONE} ",
        "+353 (86) 111-0001",
    ):
        body = {"phone": phone}
        r = await http.post(f"{url}/v1/sites/acme/callbacks", json=body, headers=visitor)
        if request_verdict(contract, callback, body) != (r.status != 400):
            disagreements.append(("phone", phone, r.status))
    hint_edges: tuple[dict[str, Any], ...] = (
        {"language": ""},
        {"branch": ""},
        {"at": ""},
        {"after_call": ""},
        {"language": None},
        {"branch": None},
        {"at": None},
        {"after_call": None},
        {"location": None},
        {"page": None},
        {"skills": None},
        {"language": "de"},
        {"skills": []},
    )
    for hint in hint_edges:
        body = {"phone": VISITOR_PHONE, **hint}
        r = await http.post(f"{url}/v1/sites/acme/callbacks", json=body, headers=visitor)
        if request_verdict(contract, callback, body) != (r.status != 400):
            disagreements.append(("hint", hint, r.status))

    # Query filters: present but empty, or malformed.
    parameters = document["components"]["parameters"]
    for path in ("/v1/sites/acme/availability", "/v1/sites/acme/callback-slots"):
        edges = {"language": ("", "de", "de-AT", "English"), "branch": ("", "berlin", "no way")}
        if path.endswith("callback-slots"):
            del edges["language"]  # not a parameter of slots
        for name, values in edges.items():
            for value in values:
                r = await http.get(f"{url}{path}", params={name: value})
                schema = {"$ref": f"{DOC}#/components/parameters/{name}/schema"}
                assert parameters[name]["in"] == "query"
                if request_verdict(contract, schema, value) != (r.status == 200):
                    disagreements.append((path, name, value, r.status))
    assert disagreements == []
