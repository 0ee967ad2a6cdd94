"""The audio bridge in a call: a browser's WebRTC meets a phone leg on a media session
(``gateway.telephony.MediaBridge``, implemented by mobile_bridge.media with aiortc and Twilio
Media Streams). Both ways:

- A browser visitor whose agent takes the call on her phone (the browser call's flow,
  gateway.services.call_service). As she presses 1, a session is opened and stored on the
  call *before* the accept, so that the visitor's offer, sent as soon as they see
  ``connected``, finds it; her leg then connects to the session's stream (``ConnectMedia``).
  The visitor offers; the session answers as the agent would.
- A customer called back on their phone, and an agent who accepted in the agent app (the
  callback's flow, gateway.services.callback_service). As the customer answers, a session
  that offers is opened and stored; its offer goes to the agent's accepting socket, and the
  customer's leg connects to the stream. The agent app answers.

Either way, the browser's other signals go to the session, and the call's end closes it.

A session lost with its media worker moves (``move``) to a new session, on a live worker
of whichever node noticed first. The browser is told to restart ICE (``rtc:restart``), and
its new offer is answered there: the new session answers rather than offers, because a
browser keeps the RTP header extension ids it negotiated, and an offer of the new session's
own would reassign them. The phone leg, whose ``<Connect>`` asks what next when its stream
ends, is pointed at the new session's stream (``on_stream_ended``). The node that ran the
worker notices its death; the phone's provider notices the stream's end; whichever comes
first moves the call, and the other finds it moved. A call that cannot move (no worker has
room, or it moved too often) ends with ``media_lost``, so that nobody stays in silence and
the agent is free again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

from gateway.core import agent_ring as ar
from gateway.core import call as calls
from gateway.core.call import Call, CallChannel, CallState
from gateway.core.errors import Conflict, Forbidden, Invalid, NotFound
from gateway.core.text import N_
from gateway.ops.metrics import Metrics
from gateway.services.call_records import CallRecords
from gateway.telephony import (
    ConnectMedia,
    HangUp,
    HeldSide,
    Instruction,
    MediaBridge,
    TelephonyError,
)
from gateway.wire.codec import Json

log = logging.getLogger(__name__)

CONNECTING = N_("Connecting you now.")
HOLD_HINT = N_("Press star to put the caller on hold, and star again to return.")
LOST_DETAIL = "The audio connection was lost"


class AudioBridge:
    def __init__(self, records: CallRecords) -> None:
        self._records = records
        self.media: MediaBridge | None = None
        """Set by the app when the telephony provider runs media workers."""
        self._metrics: Metrics | None = None

    @property
    def enabled(self) -> bool:
        return self.media is not None

    def attach(self, media: MediaBridge, metrics: Metrics) -> None:
        self.media = media
        self._metrics = metrics
        media.on_lost(self.session_lost)
        media.on_key(self.key_from_phone)

    # --- a browser visitor, an agent on her phone -------------------------------------------

    async def phone_accepts(
        self, call: Call, accept: Callable[[], Awaitable[Call]]
    ) -> ConnectMedia:
        """The agent pressed 1 for the ringing ``call``: a session, then ``accept``. Raises
        ``TelephonyError`` when no worker has room, ``Conflict``/``NotFound`` when the ring
        ended meanwhile (the session is closed again)."""
        assert self.media is not None
        session = await self.media.open(call.call_id)
        media = partial(
            calls.with_media, ref=session.ref, stream=session.stream_url, attempt=call.attempt
        )
        try:
            await self._records.update(call.call_id, media, call)
            await accept()
        except (Conflict, NotFound):
            await self.media.close(session.ref)
            raise
        text = self._records.agent_text(call)
        say = f"{text.gettext(CONNECTING)} {text.gettext(HOLD_HINT)}"
        return ConnectMedia(session.stream_url, say, text.say_language, call.call_id)

    # --- a customer on their phone, an agent in the app -------------------------------------

    async def to_app(self, call: Call, say: str, language: str) -> ConnectMedia:
        """The customer of the connected callback ``call`` answered and the agent is in the
        app: a session that offers, its offer sent to her accepting socket, and the
        customer's leg to its stream. Raises ``TelephonyError`` when no worker has room,
        ``Conflict``/``NotFound`` when the call moved on."""
        assert self.media is not None
        session = await self.media.open(call.call_id, make_offer=True)
        assert session.offer is not None
        try:
            _, stored = await self._records.update(
                call.call_id,
                partial(calls.with_answered_media, ref=session.ref, stream=session.stream_url),
                call,
            )
        except (Conflict, NotFound):
            await self.media.close(session.ref)
            raise
        offer = {"call_id": call.call_id, "description": {"type": "offer", "sdp": session.offer}}
        await self._records.notify.signal(stored, to_agent=True, payload=offer)
        return ConnectMedia(session.stream_url, say, language, call.call_id)

    # --- both ---------------------------------------------------------------------------------

    async def from_browser(self, call: Call, payload: Json) -> None:
        """An ``rtc:signal`` of the call's browser (the visitor's, or the agent app's): an
        offer is answered as the other party would, an answer completes the session's own
        offer, a candidate is added."""
        assert self.media is not None and call.media is not None
        try:
            description = payload.get("description")
            if description is None:
                await self.media.add_candidate(call.media, payload["candidate"])
            elif description["type"] == "offer":
                answer = await self.media.answer(call.media, description["sdp"])
                reply = {"call_id": call.call_id, "description": {"type": "answer", "sdp": answer}}
                # Back to the browser that offered: the visitor's, or the agent app's (its
                # ICE restart on a callback).
                to_app = calls.agent_in_app(call)
                await self._records.notify.signal(call, to_agent=to_app, payload=reply)
            elif description["type"] == "answer":
                await self.media.accept_answer(call.media, description["sdp"])
            # A rollback or pranswer: nothing a session takes.
        except TelephonyError as e:
            if e.code == "offer_taken":
                raise Conflict(e.message, code=e.code) from None
            if e.code == "renegotiation_refused":  # the call goes on as it was
                raise Invalid(e.message, code="invalid_offer") from None
            log.warning("call %s: the bridge refused a browser's signal: %s", call.call_id, e)
            await self.lost(call.call_id, "media_lost")

    async def phone_leg_ended(self, call: Call, hung_up: Callable[[], Awaitable[None]]) -> None:
        """The phone leg bridged to the call's browser ended: ``hung_up`` (the person on the
        phone hung up), unless the bridge died under the call (the stream's end ended the leg
        too, which may be heard before the worker's death)."""
        if call.media is not None and self.media is not None:
            if not await self.media.reachable(call.media):
                await self.lost(call.call_id, "media_lost")
                return
        await hung_up()

    async def key_from_phone(self, call_id: str, key: str) -> None:
        """A key pressed on the call's phone (its tone is already on its way to the browser).
        What it means is the core's rule (``call.phone_key_meaning``): shown to the agent in
        the app (``call:key``), or the visitor held or taken back."""
        call = await self._records.find(call_id)
        meaning = calls.phone_key_meaning(call, key) if call is not None else None
        if call is None or meaning is None:
            return  # a key pressed as the call ended, or one that means nothing here
        if meaning == "show":
            await self._records.notify.key(call, key)
        else:
            try:
                await self._records.hold(call, not calls.on_hold(call))
            except (Conflict, NotFound):
                pass  # the call ended meanwhile

    async def hold(self, call: Call, on: bool) -> None:
        """The phone side of a hold: the bridge stops both directions and tells the one
        held that the line is alive (the customer on the phone, held by an agent in the app;
        the visitor in the browser, held by an agent on her phone). A session that is gone
        ends the call."""
        if call.media is None or self.media is None:
            return
        held: HeldSide = "phone" if calls.agent_in_app(call) else "browser"
        try:
            await self.media.hold(call.media, on, held)
        except TelephonyError as e:
            log.warning("call %s: the bridge could not hold: %s", call.call_id, e)
            await self.lost(call.call_id, "media_lost")

    async def call_over(self, call: Call) -> None:
        if call.media is not None and self.media is not None:
            await self.media.close(call.media)

    # --- a session lost with its worker -------------------------------------------------------

    async def session_lost(self, call_id: str, ref: str) -> None:
        """The media worker of the call's session ``ref`` died: the call's audio moves, or
        the call ends."""
        call = await self._records.find(call_id)
        if call is None or call.media != ref or call.state is not CallState.CONNECTED:
            return  # moved already, or over
        if await self.move(call, ref) is None:
            await self._lost_for_good(call_id)

    async def on_stream_ended(self, call_id: str, moves: int, provider_id: str) -> Instruction:
        """The phone leg's stream ended (``MediaStreamEvents``): to the session the call's
        audio has now, or hang up."""
        call = await self._records.find(call_id)
        if call is None:
            return HangUp()
        if provider_id != phone_leg(call):
            raise Forbidden("not the phone leg of this call", code="unknown_leg")
        step = calls.after_stream(call, moves)
        if step == "move":
            assert call.media is not None
            moved = await self.move(call, call.media)
            if moved is not None:
                call, step = moved, "reconnect"
        if step == "reconnect" and call.media_stream is not None:
            return ConnectMedia(call.media_stream, call_id=call_id, moves=call.media_moves)
        if call.state is CallState.CONNECTED:
            await self._lost_for_good(call_id)
        return HangUp()

    async def move(self, call: Call, lost: str) -> Call | None:
        """A new session for the call whose session ``lost`` is gone (held, if the call is),
        and the call's browser told to offer to it. The call as moved (by this node or,
        meanwhile, another), or None when it cannot move."""
        assert self.media is not None
        if call.media_moves >= calls.MAX_MEDIA_MOVES:
            return None
        try:
            session = await self.media.open(call.call_id)
        except TelephonyError as e:
            log.warning("call %s: no media worker to move the call to: %s", call.call_id, e)
            return None
        moving = partial(
            calls.with_moved_media,
            lost=lost,
            ref=session.ref,
            stream=session.stream_url,
            now=self._records.clock(),
        )
        try:
            _, moved = await self._records.update(call.call_id, moving, call)
        except (Conflict, NotFound):
            await self.media.close(session.ref)
            now = await self._records.find(call.call_id)
            if now is None or now.state is not CallState.CONNECTED or now.media == lost:
                return None
            return now  # moved by another node meanwhile
        log.warning("call %s: its audio moved off a dead media worker", call.call_id)
        if self._metrics is not None:
            self._metrics.media_moves.labels("moved").inc()
        await self._records.notify.call_update(moved)
        if calls.on_hold(moved):
            await self.hold(moved, True)
        await self._records.notify.restart_media(moved, to_agent=calls.agent_in_app(moved))
        # Usually gone with its worker; but a stream that failed to connect leaves its
        # session behind on a live one.
        await self.media.close(lost)
        return moved

    async def _lost_for_good(self, call_id: str) -> None:
        ended = await self.lost(call_id, "media_lost")
        if ended and self._metrics is not None:  # counted once, by the node that ended it
            self._metrics.media_moves.labels("lost").inc()

    async def lost(self, call_id: str, reason: str) -> bool:
        """The bridge lost the call's audio: the call ends (its flow hangs up the phone leg
        and frees the agent). False if it had ended already."""
        try:
            await self._records.end(call_id, reason, LOST_DETAIL)
        except (Conflict, NotFound):
            return False
        return True


def phone_leg(call: Call) -> str | None:
    """The provider's id of the call's leg bridged to its session: the customer's on a
    callback, the agent's own on a browser call she took on her phone."""
    return call.provider_id if call.channel is CallChannel.CALLBACK else ar.agent_leg(call)
