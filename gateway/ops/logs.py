"""The node's log: JSON for log collectors (one object a line), or text for a terminal.

Every line carries the time, the level, the logger, the node and, when it is about a call,
the call's id and site (gateway/ops/log_context.py). Either way the whole line is masked
(gateway/ops/log_privacy.py): no customer's number, token or session description in full.
"""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from gateway.ops.log_context import CURRENT_CALL
from gateway.ops.log_privacy import mask_line


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class CallFields(logging.Filter):
    """Adds ``node``, ``call_id`` and ``site`` to every record (None when not about a call)."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        tag = CURRENT_CALL.get()
        record.node = self.node_id
        if not hasattr(record, "call_id"):  # a line may name its call itself (extra=)
            record.call_id = tag.call_id if tag is not None else None
            record.site = tag.site if tag is not None else None
        return True


class PrivateJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_line(super().format(record))

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        # The fields of a line about no call are left out rather than null.
        for key in ("call_id", "site"):
            if log_data.get(key) is None:
                log_data.pop(key, None)


class PrivateTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        call_id = getattr(record, "call_id", None)
        if call_id is not None:
            line = f"{line} [call {call_id} site {getattr(record, 'site', None)}]"
        return mask_line(line)


JSON_FIELDS = ("levelname", "name", "node", "call_id", "site", "message")
TEXT_FORMAT = "%(asctime)s %(node)s %(levelname)s %(name)s: %(message)s"


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format is LogFormat.JSON:
        return PrivateJsonFormatter(
            list(JSON_FIELDS),
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601 in UTC, to the microsecond
        )
    return PrivateTextFormatter(TEXT_FORMAT)


def configure_logging(log_format: LogFormat, node_id: str, level: int = logging.INFO) -> None:
    """One handler on the root logger, to stderr (systemd's journal, a container's log)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(CallFields(node_id))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # The Twilio SDK logs every request's URL and headers at INFO: a line per API call, with
    # the numbers dialled in its query (masked by then, but noise all the same).
    logging.getLogger("twilio").setLevel(max(level, logging.WARNING))
