"""What of a customer's phone number may be shown where: in full only to the agent who calls
or talks to them; elsewhere (the supervisors' board, other agents, the logs) masked, with
the country and the last two digits, enough to tell two callbacks apart in an incident."""

from __future__ import annotations

import re

import phonenumbers

MASK = "*"
E164_IN_TEXT = re.compile(r"(?<![\w+])\+[1-9]\d{6,14}(?!\d)")
"""A number in E.164 inside free text (a log line, an error message)."""


def mask_phone(e164: str) -> str:
    """``+353861110001`` -> ``+353 *******01``."""
    try:
        number = phonenumbers.parse(e164, None)
        country, national = str(number.country_code), str(number.national_number)
    except phonenumbers.NumberParseException:
        digits = e164.lstrip("+")
        country, national = "", digits
    if len(national) <= 2:
        return f"+{country} {MASK * len(national)}".replace("+ ", "+")
    hidden = f"{MASK * (len(national) - 2)}{national[-2:]}"
    return f"+{country} {hidden}" if country else f"+{hidden}"


E164_IN_URL = re.compile(r"(?<![\w%])%2[Bb]([1-9]\d{6,14})(?!\d)")
"""A number in E.164 in a URL's query (``To=%2B353...``), as an HTTP client logs it."""


def mask_phones_in(text: str) -> str:
    """Every E.164 number in ``text``, masked, also where a URL encodes its ``+``."""
    masked = E164_IN_TEXT.sub(lambda m: mask_phone(m.group(0)), text)
    if "%2" in masked:
        masked = E164_IN_URL.sub(
            lambda m: mask_phone(f"+{m.group(1)}").replace("+", "%2B").replace(" ", "%20"),
            masked,
        )
    return masked
