"""The access log: every request to the API that an agent, an operator or a callback makes,
but only a sample of the hot and public paths.

aiohttp logs every request at INFO by default, and formatting a line costs more than
answering a health check: on a node serving 10,000 availability streams it was 7.6% of the
CPU, and a flood of widget loads or socket.io upgrades turned into as many log lines (a way
to fill an operator's disk from outside). A hot path logs one request in ``sample_every``
(counted per path), and always a server error."""

from __future__ import annotations

import logging
from collections import Counter
from enum import StrEnum

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

# Routes (as registered, placeholders and all) that public clients hit at a rate the
# operator does not choose: widgets, sockets, probes and scrapers.
HOT_ROUTES = frozenset(
    {
        "/socket.io/",
        "/v1/sites/{site}/availability",
        "/v1/sites/{site}/availability/stream",
        "/v1/sites/{site}/sessions",
        "/v1/agents/me/devices/{device_id}/heartbeat",
        "/widget.js",
        "/static",
        "/healthz",
        "/readyz",
        "/metrics",
    }
)
UNROUTED = "(no route)"


class AccessLogMode(StrEnum):
    SAMPLED = "sampled"
    """Every request to the other routes; one in ``sample_every`` to the hot ones."""
    ALL = "all"
    OFF = "off"


def route_of(request: BaseRequest) -> str:
    match_info = getattr(request, "match_info", None)
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else UNROUTED


def access_logger_class(mode: AccessLogMode, sample_every: int) -> type[AbstractAccessLogger]:
    """The ``access_log_class`` for aiohttp's runner; ``OFF`` still logs server errors."""

    class SampledAccessLogger(AccessLogger):
        def __init__(self, logger: logging.Logger, log_format: str) -> None:
            super().__init__(logger, log_format)
            self._seen: Counter[str] = Counter()

        def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
            if mode is AccessLogMode.ALL or response.status >= 500:
                super().log(request, response, time)
                return
            if mode is AccessLogMode.OFF:
                return
            route = route_of(request)
            # Unrouted requests (404s of scanners) are as hot as any path they make up.
            if route in HOT_ROUTES or route == UNROUTED:
                self._seen[route] += 1
                if self._seen[route] % sample_every != 1 and sample_every > 1:
                    return
            super().log(request, response, time)

    return SampledAccessLogger
