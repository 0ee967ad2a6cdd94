"""What no log line carries: customers' phone numbers, tokens, and session descriptions.

Logs are read by operators, shipped to log services and kept for months. A customer's number
appears in them masked (gateway.core.privacy), and a ticket's status token (a URL's
``token=``, which the ticket API takes in its query) is replaced by ``***``, and so is a
JWT anywhere (an agent's or a visitor's bearer token in an error message). A WebRTC session
description (SDP: addresses, ICE passwords, DTLS fingerprints) is withheld. The formatter
masks the whole formatted line, so the access log, exception messages and tracebacks are
covered whatever logger wrote them.
"""

from __future__ import annotations

import logging
import re

from gateway.core.privacy import mask_phones_in

TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s\"']+")
JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
SDP = re.compile(r"v=0(?:\r?\n|(?:\\+r)?\\+n)o=.*?(?=[\"']|$)", re.DOTALL)
"""From a description's first line (its line breaks as they are, or escaped once or more: in
a repr, in JSON) to the end of the string it is in or of the line."""


def mask_line(line: str) -> str:
    line = TOKEN_IN_URL.sub(r"\1***", line)
    if "eyJ" in line:
        line = JWT.sub("eyJ***", line)
    if "v=0" in line:
        line = SDP.sub("<sdp withheld>", line)
    return mask_phones_in(line)


class PrivateFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_line(super().format(record))


def use_private_formatter(fmt: str) -> None:
    """Format every handler of the root logger with ``fmt``, masked."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(PrivateFormatter(fmt))
