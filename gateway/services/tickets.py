"""The customer's ticket: any call (a browser call or a callback) as its customer follows it.

A call gets a status token when it is made, shown once to the customer (a callback's 201, a
browser call's ``call:start`` ack) and stored only as a hash. The token is the only thing
that reads the ticket: an unknown call and a wrong token look the same, so call ids cannot
be probed. What a customer may do with a ticket depends on its call's flow: a waiting
callback can be moved or canceled; a browser call is ended in the browser, and its ticket
is what is left afterwards (who the customer spoke to).
"""

from __future__ import annotations

import hmac

from gateway.core.call import Call, CallChannel, CallError
from gateway.core.errors import NotFound
from gateway.services.call_records import CallRecords
from gateway.services.callback_service import CallbackService
from gateway.services.status_token import hash_token
from gateway.wire.codec import Json, call_to_wire


class Tickets:
    def __init__(self, records: CallRecords, callbacks: CallbackService) -> None:
        self._records = records
        self._callbacks = callbacks

    async def find(self, call_id: str, token: str) -> Call:
        """The call, for the holder of its status token only."""
        call = await self._records.find(call_id)
        if (
            call is None
            or call.token_hash is None
            or not hmac.compare_digest(call.token_hash, hash_token(token))
        ):
            raise NotFound(f"no call {call_id!r}")
        return call

    async def view(self, call: Call) -> Json:
        """The visitor's view; a callback's with its live queue position and ETA."""
        if call.channel is CallChannel.CALLBACK:
            return await self._callbacks.view(call)
        return call_to_wire(call, self._records.sites[call.site])

    async def cancel(self, call_id: str, token: str) -> Call:
        call = await self.find(call_id, token)
        if call.channel is not CallChannel.CALLBACK:
            raise CallError("invalid_state", "a browser call is ended from the browser")
        return await self._callbacks.cancel(call)

    async def move(self, call_id: str, token: str, at: float) -> Call:
        call = await self.find(call_id, token)
        if call.channel is not CallChannel.CALLBACK:
            raise CallError("invalid_state", "only a callback has a time to move")
        return await self._callbacks.move(call, at)
