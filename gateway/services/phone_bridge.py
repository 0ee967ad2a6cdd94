"""A browser call taken by an agent on their phone: the visitor's WebRTC meets the agent's phone
leg on the audio bridge (``gateway.telephony.MediaBridge``, implemented by
mobile_bridge.media with aiortc and Twilio Media Streams).

The browser call's flow (gateway.services.call_service) asks this for what differs when the
agent's device is a phone rather than the agent app:
- the agent presses 1: a media session is opened and stored on the call *before* the accept,
  so that the visitor's offer, sent as soon as they see ``connected``, finds it; the agent's
  leg then connects to the session's stream (``ConnectMedia``);
- the visitor's ``rtc:signal``s go to the session, and its answer comes back as the agent's;
- the call's end closes the session; a session the bridge lost (its worker died) ends the
  call with ``media_lost``, so that nobody stays in silence and the agent is free again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

from gateway.core import call as calls
from gateway.core.call import Call
from gateway.core.errors import Conflict, NotFound
from gateway.services.call_records import CallRecords
from gateway.telephony import ConnectMedia, MediaBridge, TelephonyError
from gateway.wire.codec import Json

log = logging.getLogger(__name__)

CONNECTING = "Connecting you now."
LOST_DETAIL = "The audio connection was lost"


class PhoneBridge:
    def __init__(self, records: CallRecords) -> None:
        self._records = records
        self.media: MediaBridge | None = None
        """Set by the app when the telephony provider runs media workers."""

    @property
    def enabled(self) -> bool:
        return self.media is not None

    def attach(self, media: MediaBridge) -> None:
        self.media = media
        media.on_lost(self.lost)

    async def phone_accepts(
        self, call: Call, accept: Callable[[], Awaitable[Call]]
    ) -> ConnectMedia:
        """The agent pressed 1 for the ringing ``call``: a session, then ``accept``. Raises
        ``TelephonyError`` when no worker has room, ``Conflict``/``NotFound`` when the ring
        ended meanwhile (the session is closed again)."""
        assert self.media is not None
        session = await self.media.open(call.call_id)
        try:
            await self._records.update(
                call.call_id, partial(calls.with_media, ref=session.ref, attempt=call.attempt), call
            )
            await accept()
        except (Conflict, NotFound):
            await self.media.close(session.ref)
            raise
        return ConnectMedia(session.stream_url, say=CONNECTING)

    async def from_visitor(self, call: Call, payload: Json) -> None:
        """The visitor's offer (answered as the agent would) or ICE candidate."""
        assert self.media is not None and call.media is not None
        try:
            description = payload.get("description")
            if description is not None:
                if description["type"] != "offer":
                    return  # a rollback or pranswer: nothing the session answers
                answer = await self.media.answer(call.media, description["sdp"])
                reply = {"call_id": call.call_id, "description": {"type": "answer", "sdp": answer}}
                await self._records.notify.signal(call, to_agent=False, payload=reply)
            else:
                await self.media.add_candidate(call.media, payload["candidate"])
        except TelephonyError as e:
            if e.code == "offer_taken":
                raise Conflict(e.message, code=e.code) from None
            log.warning("call %s: the bridge refused the visitor's signal: %s", call.call_id, e)
            await self.lost(call.call_id, "media_lost")

    async def phone_leg_ended(self, call: Call) -> None:
        """The agent's leg ended: she hung up, unless the bridge died under the call (its
        stream's end ended the leg too, and this may be heard before the worker's death)."""
        lost = call.media is not None and self.media is not None
        if lost:
            assert self.media is not None and call.media is not None
            lost = not await self.media.reachable(call.media)
        if lost:
            await self._records.end(call.call_id, "media_lost", LOST_DETAIL)
        else:
            await self._records.end(call.call_id, "agent_hung_up", "The agent ended the call")

    async def call_over(self, call: Call) -> None:
        if call.media is not None and self.media is not None:
            await self.media.close(call.media)

    async def lost(self, call_id: str, reason: str) -> None:
        """The bridge lost the call's audio: the call ends (its flow hangs up the agent's
        leg and frees her)."""
        try:
            await self._records.end(call_id, reason, LOST_DETAIL)
        except (Conflict, NotFound):
            pass  # ended already
