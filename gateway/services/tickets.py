"""The customer's ticket: any call (a browser call or a callback) as its customer follows it.

A call gets a status token when it is made, shown once to the customer (a callback's 201, a
browser call's ``call:start`` ack) and stored only as a hash. The token is the only thing
that reads the ticket: an unknown call and a wrong token look the same, so call ids cannot
be probed. What a customer may do with a ticket depends on its call's flow: a waiting
callback can be moved or canceled, and its place kept when it runs late; a browser call is
ended in the browser, and its ticket is what is left afterwards (who the customer spoke to).
"""

from __future__ import annotations

import hmac
from functools import partial

from gateway.core import call as calls
from gateway.core import callback as cb
from gateway.core.call import Call, CallChannel, CallError
from gateway.core.errors import NotFound
from gateway.services.call_records import CallRecords
from gateway.services.callback_service import CallbackService
from gateway.services.status_token import hash_token, new_status_token
from gateway.wire.codec import Json, call_to_wire


def _matches(stored: str | None, token: str) -> bool:
    return stored is not None and hmac.compare_digest(stored, hash_token(token))


class Tickets:
    def __init__(self, records: CallRecords, callbacks: CallbackService) -> None:
        self._records = records
        self._callbacks = callbacks

    async def find(self, call_id: str, token: str) -> Call:
        """The call, for the holder of its status token only."""
        call = await self._records.find(call_id)
        if call is None or not _matches(call.token_hash, token):
            raise NotFound(f"no call {call_id!r}")
        return call

    async def read(self, call_id: str, token: str) -> tuple[Call, bool]:
        """The call for its status token, or for its share token while it is shared;
        whether it was the share token (which only reads, and less)."""
        call = await self._records.find(call_id)
        if call is not None and _matches(call.token_hash, token):
            return call, False
        if call is not None and _matches(call.share_hash, token):
            return call, True
        raise NotFound(f"no call {call_id!r}")

    async def view(self, call: Call) -> Json:
        """The visitor's view; a callback's with its live queue position and ETA."""
        if call.channel is CallChannel.CALLBACK:
            return await self._callbacks.view(call)
        return call_to_wire(call, self._records.sites[call.site])

    async def share(self, call_id: str, token: str) -> tuple[Call, str]:
        """Turn the read-only link on, with a new share token (an earlier link stops
        working); returns the call and the token, shown once."""
        call = await self.find(call_id, token)
        share_token, share_hash = new_status_token()
        call = await self._records.move(call, partial(calls.shared, share_hash=share_hash))
        return call, share_token

    async def unshare(self, call_id: str, token: str) -> Call:
        """Turn the read-only link off: it reads nothing from now on, and the pages open on
        it are closed."""
        call = await self.find(call_id, token)
        if call.share_hash is None:
            return call
        return await self._records.move(call, partial(calls.shared, share_hash=None))

    async def cancel(self, call_id: str, token: str) -> Call:
        call = await self.find(call_id, token)
        if call.channel is not CallChannel.CALLBACK:
            raise CallError("invalid_state", "a browser call is ended from the browser")
        return await self._callbacks.cancel(call)

    async def move(self, call_id: str, token: str, at: float) -> Call:
        # A browser call has no time to move: refused as any call that cannot be moved.
        return await self._callbacks.move(await self.find(call_id, token), at)

    async def keep(self, call_id: str, token: str) -> Call:
        """Told their callback runs late, the customer keeps their place (and the new time)."""
        return await self._callbacks.keep(await self.find(call_id, token))

    async def erase(self, call_id: str, token: str) -> Call:
        """Erase the customer's personal data from their ticket's call: a waiting callback
        is canceled first; a live call must be ended first (409 ``invalid_state``)."""
        call = await self.find(call_id, token)
        if cb.waiting(call):
            call = await self._callbacks.cancel(call)
        return await self._records.move(call, partial(calls.erase, now=self._records.clock()))
