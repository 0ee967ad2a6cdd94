"""The Twilio Calls contract, loaded from ``spec/twilio_api_v2010_calls.json`` beside this module
(Twilio's published contract, copied into the repository; ``spec/SOURCE.md`` gives its source).

Everything the simulator validates is read from the OpenAPI document where the document says it:
parameter names, types, ``enum`` lists, ``pattern``/``minLength``/``maxLength``, ``required``,
the properties of ``api.v2010.account.call``, ``call_enum_status`` and the sub-resource URIs.
A few rules live only in the parameters' prose descriptions (``StatusCallbackEvent`` values,
``MachineDetection`` values, ``Possible Values: 1000-6000``, ``Max 4000 characters``...); those are
listed in :data:`DESCRIBED_ENUMS` / :data:`DESCRIBED_RANGES` and cross-checked against the
description text when the contract is loaded, so a drifting contract fails loudly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

CONTRACT_DIR = Path(__file__).resolve().parent / "spec"
SPEC_FILE = "twilio_api_v2010_calls.json"

CALLS_PATH = "/2010-04-01/Accounts/{AccountSid}/Calls.json"
CALL_PATH = "/2010-04-01/Accounts/{AccountSid}/Calls/{Sid}.json"
CALL_SCHEMA = "api.v2010.account.call"
API_VERSION = "2010-04-01"

E164_RE = re.compile(r"^\+[1-9]\d{1,14}$")
CLIENT_RE = re.compile(r"^client:[A-Za-z0-9_.\-@]+$")
SIP_RE = re.compile(r"^sip:[^@\s]+@[^@\s]+$")
RFC2822_RE = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} \+0000$"
)
SEND_DIGITS_RE = re.compile(r"^[0-9A-D#*wW]{1,32}$")

# Values that the spec gives only in the parameter description ("Can be: `x`, `y`").
# Checked against the description text at load time.
DESCRIBED_ENUMS: dict[str, tuple[str, ...]] = {
    "StatusCallbackEvent": ("initiated", "ringing", "answered", "completed"),
    "MachineDetection": ("Enable", "DetectMessageEnd"),
    "AsyncAmd": ("true", "false"),
    "RecordingChannels": ("mono", "dual"),
    "RecordingStatusCallbackEvent": ("in-progress", "completed", "absent"),
    "Trim": ("trim-silence", "do-not-trim"),
    "RecordingTrack": ("inbound", "outbound", "both"),
}

# Integer ranges.  ``Possible Values: a-b`` ranges are parsed from the description; the others
# come from the description prose (Timeout: "maximum is 600") or from Twilio's error page 21234
# (MachineDetectionTimeout 3-59), see README.md.
DESCRIBED_RANGES: dict[str, tuple[int, int]] = {
    "MachineDetectionTimeout": (3, 59),
}
TIMEOUT_MAX = 600  # "The default is `60` seconds and the maximum is `600` seconds."

# Twilio error codes answered for a bad value of each parameter (docs/api/errors/<code>).
PARAM_ERROR_CODES: dict[str, int] = {
    "To": 21211,  # Invalid 'To' Phone Number
    "From": 21212,  # Invalid 'From' Phone Number
    "Url": 21205,  # Invalid URL
    "FallbackUrl": 21205,
    "StatusCallback": 21609,  # Invalid 'StatusCallback'
    "Method": 21209,  # Invalid Method
    "FallbackMethod": 21209,
    "StatusCallbackMethod": 21209,
    "AsyncAmdStatusCallbackMethod": 21209,
    "RecordingStatusCallbackMethod": 21209,
    "Timeout": 21208,  # Invalid Timeout
    "StatusCallbackEvent": 21626,  # Invalid 'StatusCallbackEvent'
    "MachineDetection": 21234,  # Invalid Machine Detection configuration value
    "MachineDetectionTimeout": 21234,
    "MachineDetectionSpeechThreshold": 21234,
    "MachineDetectionSpeechEndThreshold": 21234,
    "MachineDetectionSilenceTimeout": 21234,
    "AsyncAmd": 21234,
    "AsyncAmdStatusCallback": 21234,
    "ApplicationSid": 21218,  # Invalid ApplicationSid
    "SendDigits": 21206,  # Invalid SendDigits
    "Status": 21200,
}
GENERIC_CALLS_ERROR = 21200  # "Calls Resource": any other problem with a Calls request


class TwilioApiError(Exception):
    """An error answered with Twilio's JSON error shape."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, object]:
        return {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }


class ContractViolation(AssertionError):
    """Something the simulator produced does not match the contract (a bug in the simulator)."""


@dataclass(frozen=True)
class ParamSpec:
    """One request parameter as the OpenAPI document describes it."""

    name: str
    type: str
    description: str = ""
    enum: tuple[str, ...] | None = None
    format: str | None = None
    pattern: str | None = None
    min_length: int | None = None
    max_length: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    item_type: str | None = None


def is_phone_number(value: str) -> bool:
    return bool(E164_RE.match(value))


def is_endpoint(value: str) -> bool:
    """``format: endpoint``: E.164 number, ``client:identity`` or ``sip:user@host``."""
    return bool(E164_RE.match(value) or CLIENT_RE.match(value) or SIP_RE.match(value))


def is_absolute_url(value: str, *, schemes: Sequence[str] = ("http", "https")) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.hostname)


def format_nanp(number: str) -> str:
    """``to_formatted``/``from_formatted``: ``(415) 867-5309`` for +1 numbers, else unchanged."""
    if re.fullmatch(r"\+1\d{10}", number):
        d = number[2:]
        return f"({d[0:3]}) {d[3:6]}-{d[6:]}"
    return number


class Contract:
    """The parsed Calls contract and the validators built from it."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or CONTRACT_DIR
        path = self.directory / SPEC_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"Twilio contract not found at {path} (see tests/twilio_sim/README.md)"
            )
        self.spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        paths = self.spec["paths"]
        self.calls_item: dict[str, Any] = paths[CALLS_PATH]
        self.call_item: dict[str, Any] = paths[CALL_PATH]
        self.create_params, self.create_required = self._form_params(self.calls_item["post"])
        self.update_params, _ = self._form_params(self.call_item["post"])
        self.list_params = self._query_params(self.calls_item["get"])
        self.path_params = {
            p["name"]: self._param_spec(p["name"], p["schema"])
            for p in self.call_item["get"]["parameters"]
            if p["in"] == "path"
        }
        schemas = self.spec["components"]["schemas"]
        self.call_schema: dict[str, Any] = schemas[CALL_SCHEMA]
        self.call_properties: dict[str, dict[str, Any]] = self.call_schema["properties"]
        self.call_statuses: tuple[str, ...] = tuple(schemas["call_enum_status"]["enum"])
        self.update_statuses: tuple[str, ...] = tuple(schemas["call_enum_update_status"]["enum"])
        dependent = self.calls_item["x-twilio"]["dependentProperties"]
        self.subresources: dict[str, str] = {
            name: str(v["resource_url"]) for name, v in dependent.items()
        }
        list_schema = self.calls_item["get"]["responses"]["200"]["content"]["application/json"][
            "schema"
        ]
        self.list_properties: dict[str, dict[str, Any]] = list_schema["properties"]
        self.ranges = self._ranges()
        self.twiml_max_chars = self._max_chars("Twiml")
        self._check_described_enums()

    # ----------------------------------------------------------------- loading helpers

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if ref is None:
            return schema
        name = str(ref).rsplit("/", 1)[-1]
        return cast(dict[str, Any], self.spec["components"]["schemas"][name])

    def _param_spec(self, name: str, schema: dict[str, Any], description: str = "") -> ParamSpec:
        schema = self._resolve(schema)
        items = schema.get("items")
        return ParamSpec(
            name=name,
            type=str(schema.get("type", "string")),
            description=description or str(schema.get("description", "")),
            enum=tuple(schema["enum"]) if "enum" in schema else None,
            format=schema.get("format"),
            pattern=schema.get("pattern"),
            min_length=schema.get("minLength"),
            max_length=schema.get("maxLength"),
            minimum=schema.get("minimum"),
            maximum=schema.get("maximum"),
            item_type=str(items.get("type")) if isinstance(items, dict) else None,
        )

    def _form_params(self, op: dict[str, Any]) -> tuple[dict[str, ParamSpec], frozenset[str]]:
        schema = op["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
        props = {
            name: self._param_spec(name, s, str(s.get("description", "")))
            for name, s in schema["properties"].items()
        }
        return props, frozenset(schema.get("required", ()))

    def _query_params(self, op: dict[str, Any]) -> dict[str, ParamSpec]:
        return {
            p["name"]: self._param_spec(p["name"], p["schema"], str(p.get("description", "")))
            for p in op["parameters"]
            if p["in"] == "query"
        }

    def _ranges(self) -> dict[str, tuple[int, int]]:
        ranges = dict(DESCRIBED_RANGES)
        for name, spec in self.create_params.items():
            m = re.search(r"Possible Values:\s*(\d+)\s*-\s*(\d+)", spec.description)
            if m:
                ranges[name] = (int(m.group(1)), int(m.group(2)))
        for name in ("MachineDetectionSpeechThreshold", "MachineDetectionSpeechEndThreshold"):
            if name not in ranges:
                raise ContractViolation(f"no 'Possible Values' range found for {name}")
        if f"maximum is `{TIMEOUT_MAX}`" not in self.create_params["Timeout"].description:
            raise ContractViolation("Timeout description no longer states the 600 s maximum")
        return ranges

    def _max_chars(self, name: str) -> int:
        m = re.search(r"Max (\d+) characters", self.create_params[name].description)
        if not m:
            raise ContractViolation(f"no 'Max N characters' in the {name} description")
        return int(m.group(1))

    def _check_described_enums(self) -> None:
        for name, values in DESCRIBED_ENUMS.items():
            desc = self.create_params[name].description
            missing = [v for v in values if f"`{v}`" not in desc]
            if missing:
                raise ContractViolation(f"{name}: values {missing} not in the spec description")

    # ----------------------------------------------------------------- request validation

    def check_path_sid(self, name: str, value: str) -> bool:
        spec = self.path_params[name]
        return _check_string(spec, value) is None

    def validate_form(
        self,
        params: Mapping[str, ParamSpec],
        form: Mapping[str, Sequence[str]],
    ) -> dict[str, list[str]]:
        """Check every known parameter in ``form`` against its schema.

        Returns the known parameters (unknown ones are ignored, as Twilio does).  Raises
        :class:`TwilioApiError` (400) for the first invalid value.
        """
        known: dict[str, list[str]] = {}
        for name, values in form.items():
            spec = params.get(name)
            if spec is None:
                continue
            known[name] = list(values)
            if spec.type == "array":
                items: list[str] = []
                for v in values:
                    items.extend(v.split())  # a space-separated list is tolerated
                known[name] = items
                allowed = DESCRIBED_ENUMS.get(name)
                for item in items:
                    if allowed is not None and item not in allowed:
                        raise _invalid(name, item, f"one of {', '.join(allowed)}")
                continue
            value = values[0]
            problem = self._check_value(spec, value)
            if problem is not None:
                raise _invalid(name, value, problem)
        return known

    def _check_value(self, spec: ParamSpec, value: str) -> str | None:
        if spec.type == "integer":
            if not re.fullmatch(r"-?\d+", value.strip()):
                return "an integer"
            number = int(value)
            lo, hi = self.ranges.get(spec.name, (None, None))
            if spec.minimum is not None and number < spec.minimum:
                return f">= {spec.minimum}"
            if spec.maximum is not None and number > spec.maximum:
                return f"<= {spec.maximum}"
            if spec.name == "Timeout" and number < 1:
                return "a positive integer"
            if lo is not None and hi is not None and not lo <= number <= hi:
                return f"between {lo} and {hi}"
            return None
        if spec.type == "boolean":
            return None if value.lower() in ("true", "false") else "true or false"
        described = DESCRIBED_ENUMS.get(spec.name)
        if described is not None and value not in described:
            return f"one of {', '.join(described)}"
        return _check_string(spec, value)


def _check_string(spec: ParamSpec, value: str) -> str | None:
    if spec.enum is not None and value not in spec.enum:
        return f"one of {', '.join(spec.enum)}"
    if spec.min_length is not None and len(value) < spec.min_length:
        return f"at least {spec.min_length} characters"
    if spec.max_length is not None and len(value) > spec.max_length:
        return f"at most {spec.max_length} characters"
    if spec.pattern is not None and not re.search(spec.pattern, value):
        return f"matching {spec.pattern}"
    if spec.format == "uri":
        if not is_absolute_url(value):
            return "an absolute http(s) URL"
        host = urlsplit(value).hostname or ""
        if "_" in host:
            return "a URL whose hostname has no underscores"
    if spec.format == "endpoint" and not is_endpoint(value):
        return "an E.164 number, client:<identity> or sip:<user>@<host>"
    if spec.format == "phone-number" and not is_endpoint(value):
        return "a phone number"
    return None


def _invalid(name: str, value: str, expected: str) -> TwilioApiError:
    code = PARAM_ERROR_CODES.get(name, GENERIC_CALLS_ERROR)
    return TwilioApiError(400, code, f"Invalid '{name}' parameter {value!r}: expected {expected}")


# --------------------------------------------------------------------- response validation


def check_rfc2822(value: str) -> bool:
    if not RFC2822_RE.match(value):
        return False
    try:
        parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return True


def check_call_resource(contract: Contract, obj: Mapping[str, object]) -> None:
    """Raise :class:`ContractViolation` unless ``obj`` is a valid ``api.v2010.account.call``."""
    problems: list[str] = []
    expected = set(contract.call_properties)
    got = set(obj)
    if got != expected:
        problems.append(f"properties differ: missing {expected - got}, extra {got - expected}")
    for name, raw_schema in contract.call_properties.items():
        if name not in obj:
            continue
        value = obj[name]
        schema = contract._resolve(raw_schema)
        if value is None:
            if name == "status" or not raw_schema.get("nullable", schema.get("nullable", False)):
                problems.append(f"{name} must not be null")
            continue
        kind = schema.get("type", "string")
        if kind == "string":
            if not isinstance(value, str):
                problems.append(f"{name} must be a string, got {type(value).__name__}")
                continue
            if "enum" in schema and value not in schema["enum"]:
                problems.append(f"{name}={value!r} not in {schema['enum']}")
            if "pattern" in schema and not re.search(schema["pattern"], value):
                problems.append(f"{name}={value!r} does not match {schema['pattern']}")
            if "minLength" in schema and len(value) < schema["minLength"]:
                problems.append(f"{name} shorter than {schema['minLength']}")
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                problems.append(f"{name} longer than {schema['maxLength']}")
            fmt = schema.get("format")
            if fmt == "date-time-rfc-2822" and not check_rfc2822(value):
                problems.append(f"{name}={value!r} is not an RFC 2822 date")
            if fmt == "currency" and not re.fullmatch(r"[A-Z]{3}", value):
                problems.append(f"{name}={value!r} is not an ISO 4217 code")
            if name in ("duration", "queue_time") and not re.fullmatch(r"\d+", value):
                problems.append(f"{name}={value!r} is not a whole number string")
            if name == "price" and not re.fullmatch(r"-?\d+\.\d+", value):
                problems.append(f"price={value!r} is not a decimal string")
        elif kind == "object":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                problems.append(f"{name} must be a string→string map")
    if problems:
        raise ContractViolation("; ".join(problems))


def check_list_page(contract: Contract, obj: Mapping[str, object]) -> None:
    """Validate a ListCall page (paging fields + ``calls``)."""
    expected = set(contract.list_properties)
    if set(obj) != expected:
        raise ContractViolation(f"list page properties {set(obj)} != {expected}")
    calls = obj["calls"]
    if not isinstance(calls, list):
        raise ContractViolation("calls must be a list")
    for call in calls:
        check_call_resource(contract, cast(Mapping[str, object], call))


# --- TwiML verbs the simulator checks (spec/TWIML.md "<Gather>", "<Conference>", "<Say>") ----

TWIML_ATTRIBUTES: dict[str, frozenset[str]] = {
    "Say": frozenset({"voice", "language", "loop"}),
    "Gather": frozenset(
        "input action method timeout speechTimeout maxSpeechTime profanityFilter finishOnKey"
        " numDigits partialResultCallback partialResultCallbackMethod language hints bargeIn"
        " debug actionOnEmptyResult speechModel enhanced".split()
    ),
    "Conference": frozenset(
        "muted beep startConferenceOnEnter endConferenceOnExit waitUrl waitMethod"
        " maxParticipants record recordingConfigurationId region coach trim statusCallbackEvent"
        " statusCallback statusCallbackMethod recordingStatusCallback"
        " recordingStatusCallbackMethod recordingStatusCallbackEvent eventCallbackUrl"
        " jitterBufferSize participantLabel".split()
    ),
}
"""Each verb's attributes, as [PY] names them (camelCase in XML; tests/test_twilio_sim.py
holds this table equal to the SDK's signatures)."""

TWIML_BOOLEANS: dict[str, frozenset[str]] = {
    "Gather": frozenset({"actionOnEmptyResult", "profanityFilter", "bargeIn", "debug", "enhanced"}),
    "Conference": frozenset({"muted", "startConferenceOnEnter", "endConferenceOnExit"}),
}
TWIML_METHODS: dict[str, frozenset[str]] = {
    "Gather": frozenset({"method", "partialResultCallbackMethod"}),
    "Conference": frozenset(
        {"waitMethod", "statusCallbackMethod", "recordingStatusCallbackMethod"}
    ),
}
GATHER_INPUTS = frozenset({"dtmf", "speech", "dtmf speech", "speech dtmf"})
FINISH_ON_KEYS = frozenset("0123456789#*") | {""}
CONFERENCE_BEEPS = frozenset({"true", "false", "onEnter", "onExit"})
TWIML_CHILDREN: dict[str, frozenset[str]] = {"Gather": frozenset({"Say", "Play", "Pause"})}
"""What may be nested: ``<Gather>`` takes ``<Say>``, ``<Play>`` and ``<Pause>`` only."""
TWIML_PARENTS: dict[str, frozenset[str]] = {"Conference": frozenset({"Dial"})}


def check_twiml_verb(tag: str, attrs: Mapping[str, str], parent: str | None) -> list[str]:
    """Problems of one TwiML element an application sent (Twilio's 12200 schema warnings);
    elements this table does not cover pass."""
    known = TWIML_ATTRIBUTES.get(tag)
    if known is None:
        if parent in TWIML_CHILDREN and tag not in TWIML_CHILDREN[parent]:
            return [f"<{tag}> may not be nested in <{parent}>"]
        return []
    problems = [f"<{tag}> has no attribute {name!r}" for name in attrs if name not in known]
    if tag in TWIML_PARENTS and parent not in TWIML_PARENTS[tag]:
        problems.append(f"<{tag}> must be inside {sorted(TWIML_PARENTS[tag])}")
    if parent in TWIML_CHILDREN and tag not in TWIML_CHILDREN[parent]:
        problems.append(f"<{tag}> may not be nested in <{parent}>")
    for name in TWIML_BOOLEANS.get(tag, frozenset()) & attrs.keys():
        if attrs[name] not in ("true", "false"):
            problems.append(f"<{tag} {name}> must be true or false, got {attrs[name]!r}")
    for name in TWIML_METHODS.get(tag, frozenset()) & attrs.keys():
        if attrs[name] not in ("GET", "POST"):
            problems.append(f"<{tag} {name}> must be GET or POST, got {attrs[name]!r}")
    if tag == "Gather":
        problems += _check_gather(attrs)
    if tag == "Say" and "loop" in attrs and not attrs["loop"].isdigit():
        problems.append(f"<Say loop> must be a non-negative integer, got {attrs['loop']!r}")
    if tag == "Conference" and attrs.get("beep", "true") not in CONFERENCE_BEEPS:
        problems.append(f"<Conference beep> must be one of {sorted(CONFERENCE_BEEPS)}")
    return problems


def _check_gather(attrs: Mapping[str, str]) -> list[str]:
    problems = []
    digits = attrs.get("numDigits")
    if digits is not None and not (digits.isdigit() and int(digits) >= 1):
        problems.append(f"<Gather numDigits> must be a positive integer, got {digits!r}")
    timeout = attrs.get("timeout")
    if timeout is not None and not timeout.isdigit():
        problems.append(f"<Gather timeout> must be a non-negative integer, got {timeout!r}")
    if attrs.get("finishOnKey", "#") not in FINISH_ON_KEYS:
        problems.append("<Gather finishOnKey> must be one of 0-9, #, * or empty")
    if attrs.get("input", "dtmf") not in GATHER_INPUTS:
        problems.append(f"<Gather input> must be dtmf, speech or both, got {attrs['input']!r}")
    action = attrs.get("action")
    if action is not None and action.strip() == "":
        problems.append("<Gather action> is empty (13338)")
    return problems
