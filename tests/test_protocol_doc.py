"""docs/PROTOCOL.md against the code: its table of error codes and its list of internal codes
are the registry's (gateway/wire/codes.py), every code the source raises, refuses, counts or
closes a connection with is in the registry, and its socket.io event tables are the events
each namespace declares (gateway/wire/events.py) and the edge handles and sends."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import make_settings

from gateway.app import create_app
from gateway.edge.http import appkeys as keys
from gateway.edge.sio.namespace import BaseNamespace
from gateway.wire import events, openapi
from gateway.wire.codes import ErrorCode, InternalCode
from gateway.wire.events import NAMESPACES

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = (ROOT / "docs" / "PROTOCOL.md").read_text()
SOURCES = [
    p
    for package in ("gateway", "mobile_bridge")
    for p in sorted((ROOT / package).rglob("*.py"))
    if p.name != "codes.py"
]
CODE = re.compile(r"[a-z][a-z0-9_]*")
EVENT = re.compile(r"[a-z_]+:[a-z_]+")


def table_column(text: str, header: str) -> list[str]:
    """The first column's backquoted values of the Markdown table whose header row starts
    with ``header`` (e.g. ``| code |``), in order."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    assert lines[start + 1].startswith("|---"), header
    values = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cell = line.split("|")[1].strip()
        assert cell.startswith("`") and cell.endswith("`"), line
        values.append(cell.strip("`"))
    return values


def section(text: str, heading: str) -> str:
    """The text from the heading line that starts with ``heading`` to the next heading."""
    start = text.index(f"\n{heading}") + 1
    following = re.search(r"^#{1,3} ", text[start + len(heading) :], re.M)
    end = start + len(heading) + following.start() if following else len(text)
    return text[start:end]


def event_table(namespace: str) -> tuple[list[str], list[str]]:
    """The events in and out of a namespace's table in section 6."""
    text = section(PROTOCOL, f"### `{namespace}`")
    rows = [line.split("|") for line in text.splitlines() if line.startswith(("| in ", "| out "))]
    incoming = [r[2].strip().strip("`") for r in rows if r[1].strip() == "in"]
    outgoing = [r[2].strip().strip("`") for r in rows if r[1].strip() == "out"]
    return incoming, outgoing


# --- error codes ---------------------------------------------------------------------------


def test_the_documented_codes_are_the_registry() -> None:
    public = table_column(section(PROTOCOL, "## 2. Errors"), "| code |")
    internal = table_column(section(PROTOCOL, "## 2. Errors"), "| internal code |")
    assert len(public) == len(set(public)) and len(internal) == len(set(internal))
    assert set(public) == {c.value for c in ErrorCode}
    assert set(internal) == {c.value for c in InternalCode}


# Calls whose first string argument is an error code: refusals, errors raised in the core
# and by the telephony provider, WebSocket close reasons, error bodies.
CODE_TAKERS = frozenset(
    {
        "ApiError",
        "CallError",
        "Refusal",
        "PhoneRefused",
        "TelephonyError",
        "error_response",
        "error_ack",
        "_refuse",
        "drop",
        "_drop",
        "count_refusal",
    }
)
# Counters labelled with an error code.
CODE_COUNTERS = frozenset({"errors", "callback_refusals"})
# A code named through the registry itself.
REGISTRY: dict[str, type[ErrorCode] | type[InternalCode]] = {
    "ErrorCode": ErrorCode,
    "InternalCode": InternalCode,
}


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _strings(node: ast.AST) -> list[tuple[str, int]]:
    return [
        (n.value, n.lineno)
        for n in ast.walk(node)
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def codes_in_source() -> dict[str, str]:
    """Every code the source raises, refuses, counts or closes with: code -> where."""
    found: dict[str, str] = {}
    for path in SOURCES:
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            strings: list[tuple[str, int]] = []
            if isinstance(node, ast.Call):
                name = _name(node.func)
                counter = (
                    name == "labels"
                    and isinstance(node.func, ast.Attribute)
                    and _name(node.func.value) in CODE_COUNTERS
                )
                if name in CODE_TAKERS or counter:
                    first = next(
                        (
                            a
                            for a in node.args
                            if isinstance(a, ast.Constant) and isinstance(a.value, str)
                        ),
                        None,
                    )
                    strings = _strings(first) if first is not None else []
                strings += [s for k in node.keywords if k.arg == "code" for s in _strings(k.value)]
            elif isinstance(node, ast.Dict):
                strings = [
                    s
                    for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and k.value == "code"
                    for s in _strings(v)
                ]
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                # ``QUOTA_CODES = (...)``, ``INTERNAL_CODE = "..."``, ``code = "..."`` or
                # ``default_code = "..."`` (an error class's own code)
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [str(_name(t)) for t in targets]
                constant = isinstance(node.value, ast.Constant)
                if node.value is not None and any(
                    n.endswith(("_CODES", "_CODE")) or (n in ("code", "default_code") and constant)
                    for n in names
                ):
                    strings = _strings(node.value)
            elif isinstance(node, ast.Attribute) and _name(node.value) in REGISTRY:
                strings = [(REGISTRY[str(_name(node.value))][node.attr].value, node.lineno)]
            for value, line in strings:
                if CODE.fullmatch(value):
                    found.setdefault(value, f"{where}:{line}")
    return found


def test_every_code_in_the_source_is_registered() -> None:
    found = codes_in_source()
    registered = {c.value for c in ErrorCode} | {c.value for c in InternalCode}
    unknown = {code: where for code, where in found.items() if code not in registered}
    assert unknown == {}, "codes missing from gateway/wire/codes.py and docs/PROTOCOL.md"
    # And nothing registered is unused (or raised in a way this scan does not see).
    assert registered - found.keys() == set()


# --- socket.io events ----------------------------------------------------------------------


@pytest.mark.parametrize("namespace", [ns.path for ns in NAMESPACES])
def test_the_documented_events_are_the_declared_ones(namespace: str) -> None:
    declared = next(ns for ns in NAMESPACES if ns.path == namespace)
    incoming, outgoing = event_table(namespace)
    assert incoming == [e.name for e in declared.incoming]
    assert outgoing == [e.name for e in declared.outgoing]


def test_every_namespace_is_documented() -> None:
    documented = re.findall(r"^### `(/[a-z]+)`", PROTOCOL, re.M)
    assert documented == [ns.path for ns in NAMESPACES]


async def test_the_edge_handles_exactly_the_declared_events(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    handlers = app[keys.SIO].namespace_handlers
    assert set(handlers) == {ns.path for ns in NAMESPACES}
    for ns in NAMESPACES:
        handler = handlers[ns.path]
        assert isinstance(handler, BaseNamespace)
        assert set(handler.events) == {e.name for e in ns.incoming}, ns.path


def test_the_edge_sends_only_declared_events() -> None:
    """Event names in the socket.io edge's source are declared events (and every declared
    event is named there): an event sent or handled without a struct would show here."""
    named = {
        value
        for path in sorted((ROOT / "gateway" / "edge" / "sio").rglob("*.py"))
        for value, _ in _strings(ast.parse(path.read_text()))
        if EVENT.fullmatch(value)
    }
    declared = {e.name for ns in NAMESPACES for e in (*ns.incoming, *ns.outgoing)}
    assert named == declared - {"error"}


# --- shapes --------------------------------------------------------------------------------


def objects(cell: str) -> tuple[set[str], set[str]] | None:
    """The keys of the JSON-like objects written in a table cell (``{"kind", "state",
    "priority"?}``, ``{"ok": true, "call": Call}``): those every object has, and those only
    some have or mark optional (``?``, or a cell that starts with "optional"). None when the
    cell writes no object."""
    shapes: list[tuple[set[str], set[str]]] = []
    stack: list[str] = []
    previous = ""
    i = 0
    while i < len(cell):
        char = cell[i]
        if char == '"':
            end = cell.index('"', i + 1)
            rest = cell[end + 1 :].lstrip()
            if stack == ["{"] and previous in ("{", ","):
                (shapes[-1][1] if rest.startswith("?") else shapes[-1][0]).add(cell[i + 1 : end])
            previous, i = '"', end + 1
            continue
        if char in "{[":
            if char == "{" and not stack:
                shapes.append((set(), set()))
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
        if not char.isspace():
            previous = char
        i += 1
    if not shapes:
        return None
    required = set.intersection(*(r for r, _ in shapes))
    every = set.union(*(r | o for r, o in shapes))
    if cell.strip().startswith("optional"):
        required = set()
    return required, every - required


def struct_shape(struct: type, incoming: bool) -> tuple[set[str], set[str]]:
    """A struct's fields a message always has, and those it may leave out: in, every field
    with a default; out, the fields left out when unset."""
    required: set[str] = set()
    optional: set[str] = set()
    for f in msgspec.structs.fields(struct):
        may_lack = not f.required if incoming else f.default is msgspec.UNSET
        (optional if may_lack else required).add(f.encode_name)
    return required, optional


def rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith("| ")
    ]


STRUCTS = {t.__name__: t for t in (*openapi.REST_STRUCTS, *events.structs())}


def _struct_of(schema: dict[str, Any] | None) -> type | None:
    ref = (schema or {}).get("$ref", "")
    return STRUCTS.get(ref.rsplit("/", 1)[-1]) if ref else None


def test_the_rest_tables_write_the_structs_shapes() -> None:
    """Sections 4 and 5: each operation's request and answer object, as the table writes
    it, has the fields of the struct the OpenAPI document declares for it."""
    paths = openapi.document("http://x")["paths"]
    checked = 0
    for row in rows(section(PROTOCOL, "## 4.") + section(PROTOCOL, "## 5.")):
        method, _, path = row[0].strip("`").partition(" ")
        operation = paths.get(path, {}).get(method.lower())
        if operation is None:
            continue
        body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
        answers = [r for status, r in operation["responses"].items() if status.startswith("2")]
        answer = answers[0].get("content", {}).get("application/json", {}) if answers else {}
        for cell, schema, incoming in ((row[2], body, True), (row[3], answer, False)):
            struct, written = _struct_of(schema.get("schema")), objects(cell)
            if struct is not None and written is not None:
                assert written == struct_shape(struct, incoming), (row[0], struct.__name__)
                checked += 1
    assert checked >= 7


@pytest.mark.parametrize("namespace", [ns.path for ns in NAMESPACES])
def test_the_event_tables_write_the_structs_shapes(namespace: str) -> None:
    declared = next(ns for ns in NAMESPACES if ns.path == namespace)
    text = section(PROTOCOL, f"### `{namespace}`")
    auth = re.search(r"Connect: `auth: (\{[^`]*\})`", text)
    assert auth is not None
    assert objects(auth[1]) == struct_shape(declared.auth, True)
    events_by_row = {("in", e.name): e for e in declared.incoming}
    events_by_row |= {("out", e.name): e for e in declared.outgoing}
    for row in rows(text):
        event = events_by_row.get((row[0], row[1].strip("`")))
        if event is None:
            continue
        written = objects(row[2])
        if written is not None and event.payload is not None:
            assert written == struct_shape(event.payload, row[0] == "in"), row[1]
        if event.ack is not None:
            assert objects(row[3]) == struct_shape(event.ack, False), row[1]


@pytest.mark.parametrize("name", ["Device", "Presence", "Availability", "Call"])
def test_the_shapes_of_section_3_are_the_structs(name: str) -> None:
    text = section(PROTOCOL, f"### {name}\n")
    examples = re.findall(r"```json\n(.*?)```", text, re.S)
    assert examples, name
    assert objects("\n".join(examples)) == struct_shape(STRUCTS[name], incoming=False)
