"""The Programmable Messaging contract (spec/MESSAGING.md), beside the Calls one (contract.py).

No OpenAPI excerpt for Messages is kept: the Message resource's properties, CreateMessage's
parameters and the status and direction values are read from the twilio SDK's generated code
(generated from Twilio's OpenAPI document), so the simulator answers exactly what
``client.messages.create`` reads; the rules the SDK does not carry (required fields, the body
limit, error codes) are MESSAGING.md's, from Twilio's documentation.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twilio.rest.api.v2010.account import message

from .contract import (
    ContractViolation,
    TwilioApiError,
    check_rfc2822,
    is_absolute_url,
    is_phone_number,
)

MESSAGES_PATH = "/2010-04-01/Accounts/{AccountSid}/Messages.json"
MESSAGE_PATH = "/2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json"
MESSAGE_SID_RE = re.compile(r"^(SM|MM)[0-9a-fA-F]{32}$")
MESSAGE_BODY_MAX = 1600  # MESSAGING.md: longer bodies are refused with 21617
INBOUND_SMS_PARAMS = frozenset(
    {"MessageSid", "SmsSid", "SmsMessageSid", "AccountSid", "MessagingServiceSid", "From", "To"}
    | {"Body", "NumMedia", "NumSegments", "SmsStatus", "ApiVersion"}
    | {f"{side}{part}" for side in ("From", "To") for part in ("City", "State", "Zip", "Country")}
)
"""The form of the "A message comes in" webhook (MESSAGING.md section 1)."""
MESSAGING_VERBS = frozenset({"Message", "Redirect"})
MESSAGE_NOUNS = frozenset({"Body", "Media"})


@dataclass(frozen=True)
class MessagingContract:
    properties: frozenset[str]
    create_params: frozenset[str]
    statuses: frozenset[str]
    directions: frozenset[str]

    @classmethod
    def from_sdk(cls) -> MessagingContract:
        instance = inspect.getsource(message.MessageInstance.__init__)
        create = inspect.getsource(message.MessageList._create)
        created = create[create.index("values.of(") : create.index("headers =")]

        def constants(kind: type) -> frozenset[str]:
            return frozenset(v for k, v in vars(kind).items() if k.isupper())

        contract = cls(
            properties=frozenset(re.findall(r'payload\.get\(\s*"(\w+)"', instance)),
            create_params=frozenset(re.findall(r'"(\w+)":', created)),
            statuses=constants(message.MessageInstance.Status),
            directions=constants(message.MessageInstance.Direction),
        )
        for name in ("sid", "body", "status", "from", "to", "date_created", "direction"):
            if name not in contract.properties:
                raise ContractViolation(f"the SDK's Message resource has no {name!r}")
        if not {"To", "From", "Body", "StatusCallback"} <= contract.create_params:
            raise ContractViolation("the SDK's CreateMessage lost a parameter MESSAGING.md names")
        return contract

    def validate_create(self, form: Mapping[str, Sequence[str]]) -> None:
        """CreateMessage's form, refused as Twilio does (MESSAGING.md section 2)."""
        unknown = sorted(set(form) - self.create_params)
        if unknown:
            raise TwilioApiError(400, 21200, f"Unknown parameters {unknown}")
        to, from_ = form.get("To", [""])[0], form.get("From", [""])[0]
        if not to:
            raise TwilioApiError(400, 21604, "A 'To' phone number is required.")
        if not is_phone_number(to):
            raise TwilioApiError(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if not from_ and not form.get("MessagingServiceSid"):
            raise TwilioApiError(400, 21603, "A 'From' phone number is required.")
        if not any(form.get(name) for name in ("Body", "MediaUrl", "ContentSid")):
            raise TwilioApiError(400, 21602, "Message body is required.")
        if len(form.get("Body", [""])[0]) > MESSAGE_BODY_MAX:
            raise TwilioApiError(400, 21617, "The concatenated message body exceeds 1600 chars")
        callback = form.get("StatusCallback", [""])[0]
        if callback and not is_absolute_url(callback):
            raise TwilioApiError(400, 21609, f"Invalid StatusCallback: {callback}")


def check_message_resource(contract: MessagingContract, obj: Mapping[str, object]) -> None:
    """Raise :class:`ContractViolation` unless ``obj`` is a Message resource as the SDK reads
    it: exactly its properties, RFC 2822 dates, string counts, known status and direction."""
    problems: list[str] = []
    got, expected = set(obj), set(contract.properties)
    if got != expected:
        problems.append(f"properties differ: missing {expected - got}, extra {got - expected}")
    if not MESSAGE_SID_RE.fullmatch(str(obj.get("sid"))):
        problems.append(f"sid={obj.get('sid')!r} is not a message sid")
    if obj.get("status") not in contract.statuses:
        problems.append(f"status={obj.get('status')!r} not in {sorted(contract.statuses)}")
    if obj.get("direction") not in contract.directions:
        problems.append(f"direction={obj.get('direction')!r} is not a known direction")
    for name in ("date_created", "date_updated", "date_sent"):
        value = obj.get(name)
        if value is not None and not (isinstance(value, str) and check_rfc2822(value)):
            problems.append(f"{name}={value!r} is not an RFC 2822 date")
    for name in ("num_segments", "num_media"):
        value = obj.get(name)
        if not (isinstance(value, str) and re.fullmatch(r"\d+", value)):
            problems.append(f"{name}={value!r} is not a whole number string")
    if obj.get("error_code") is not None and not isinstance(obj.get("error_code"), int):
        problems.append("error_code must be an integer or null")
    if problems:
        raise ContractViolation("Message resource: " + "; ".join(problems))
