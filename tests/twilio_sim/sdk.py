"""The real ``twilio`` SDK, pointed at a simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

if TYPE_CHECKING:
    from .server import TwilioSim


@asynccontextmanager
async def sdk_client(sim: TwilioSim) -> AsyncIterator[Client]:
    """A ``Client`` whose REST resources go to ``sim`` (they resolve their URLs through
    ``client.api``'s base URL). Its async HTTP client needs the running loop."""
    http = AsyncTwilioHttpClient()
    client = Client(sim.account_sid, sim.auth_token, http_client=http)
    client.api.base_url = sim.base_url
    try:
        yield client
    finally:
        await http.close()
