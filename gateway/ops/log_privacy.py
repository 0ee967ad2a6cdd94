"""What no log line carries: customers' phone numbers, and the status tokens in URLs.

Logs are read by operators, shipped to log services and kept for months. A customer's number
appears in them masked (gateway.core.privacy), and a ticket's status token (a URL's
``token=``, which the ticket API takes in its query) is replaced by ``***``. The formatter
masks the whole formatted line, so the access log, exception messages and tracebacks are
covered whatever logger wrote them.
"""

from __future__ import annotations

import logging
import re

from gateway.core.privacy import mask_phones_in

TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s\"']+")


def mask_line(line: str) -> str:
    return mask_phones_in(TOKEN_IN_URL.sub(r"\1***", line))


class PrivateFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_line(super().format(record))


def use_private_formatter(fmt: str) -> None:
    """Format every handler of the root logger with ``fmt``, masked."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(PrivateFormatter(fmt))
