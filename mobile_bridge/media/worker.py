"""A media worker: the process that holds the audio bridge's calls, so that media never
stalls a gateway node's signaling loop and a node scales by adding workers.

Over HTTP, for the gateway node that hands it a call (``Authorization: Bearer`` with the
worker's token, compared in constant time):

- ``POST /v1/media/sessions`` ``{"offer"?: sdp}``: a session, with its id and the path of
  its stream; with a browser's WebRTC offer, also the answer, PCMU first
  (``pcmu.bridge_transceiver``). ``503 media_full`` past ``max_sessions``.
- ``POST /v1/media/sessions`` ``{"make_offer": true}``: a session that offers, PCMU first,
  for a browser that answers (an agent app taking a phone call): ``"offer"`` in the reply;
  ``POST /v1/media/sessions/{id}/answer`` ``{"answer": sdp}`` then completes it.
- ``POST /v1/media/sessions/{id}/offer`` ``{"offer": sdp}``: the offer of a session made
  without one (the gateway opens the session when the agent takes the call, before the
  browser has offered): ``{"answer": sdp}``. A later offer renegotiates the live session
  (``renegotiate``): the browser restarts ICE when its network changes, or offers again to
  a session the call moved to; one it cannot use is refused with ``400
  renegotiation_refused`` and the call goes on as it was. ``409 offer_taken`` while the
  session's own offer awaits its answer (both sides offered at once).
- ``POST /v1/media/sessions/{id}/candidate`` ``{"candidate": {"candidate", "sdpMid"?,
  "sdpMLineIndex"?}}``: a browser's trickled ICE candidate (aiortc answers with all of
  its own in the SDP).
- ``GET /v1/media/sessions/{id}``: the session's counters (``404 media_ended`` once over).
- ``POST /v1/media/sessions/{id}/hold`` ``{"on": bool, "held"?: "phone" | "browser"}``:
  hold (the held side, by default the phone, hears a tone now and then), or take off hold.
- ``DELETE /v1/media/sessions/{id}``: the call is over; its peer connection is closed.
- ``GET /v1/media/health``: 204 while the worker's event loop runs (its node probes it).
- ``GET /v1/media/stats``: sessions, and each one's gaps and drops; the last frames sent late and
  the last long collector pauses, each with its wall-clock time.

And for Twilio, ``GET /v1/media/sessions/{id}/stream``: the websocket of the call's
``<Connect><Stream>``, whose ``X-Twilio-Signature`` is checked against the worker's public
websocket URL as every webhook's is. One stream per session; when it ends, so does the
session. A gateway node starts its workers and supervises them (``media.pool``); a worker
whose node is gone exits (``--exit-with-stdin``).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp
from multidict import MultiDict

from gateway.core.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from gateway.edge.errors import rest_response
from gateway.ops.gc_pacer import PROCESS_PACER
from gateway.telephony import HeldSide
from mobile_bridge.media.api import HEALTH, SESSIONS, STATS
from mobile_bridge.media.dtmf import (
    KEYS,
    OFFERED_PT,
    KeyReceiver,
    add_dtmf,
    dtmf_payload_type,
    hold_tone_frames,
    tone_frames,
)
from mobile_bridge.media.pcmu import MuLawTrack, bridge_transceiver, route_keys
from mobile_bridge.media.stream import HOLD_TONE_EVERY_S, PhoneStream, StreamEnd
from mobile_bridge.media.transcode import DecodedTrack, negotiated_pcmu, start_pump
from mobile_bridge.twilio_webhooks import SIGNATURE_HEADER, WebhookSignatures

log = logging.getLogger(__name__)

MAX_OFFER_BYTES: Final = 64 * 1024
"""An audio-only offer is a few KB; anything near this is not a browser's."""
MAX_EVENTS_KEPT: Final = 2_000
SLOW_COLLECTION_S: Final = 0.005
"""A collection longer than this is kept in the stats: a quarter of a frame's 20 ms."""


@dataclass
class Session:
    session_id: str
    pc: RTCPeerConnection
    to_browser: MuLawTrack
    stream: PhoneStream | None = None
    ended: StreamEnd | None = None
    offered: bool = False
    held: bool = False
    keys: KeyReceiver = field(init=False)
    """The browser's keys (RFC 4733), to the phone as tones."""
    keys_from_phone: int = 0
    held_side: HeldSide = "phone"
    _browser_hold_tones: asyncio.Task[None] | None = None
    transcoding: asyncio.Task[None] | None = None
    """A browser that refused PCMU: the task decoding its audio for the phone."""
    extra: dict[str, Any] = field(default_factory=dict)
    negotiating: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One offer or answer at a time: a renegotiation swaps the peer connection."""
    renegotiations: int = 0

    def __post_init__(self) -> None:
        self.keys = KeyReceiver(self.key_to_phone)

    def stop_transcoding(self) -> asyncio.Task[None] | None:
        """Detach the transcoding pump (a new negotiation decides again); the caller awaits
        the cancelled task."""
        task, self.transcoding = self.transcoding, None
        if task is not None:
            task.cancel()
        return task

    def listen_for_keys(self, payload_type: int | None) -> None:
        """The browser sends keys as telephone-events of ``payload_type`` (None: it does
        not)."""
        self.keys.payload_type = payload_type
        if payload_type is not None:
            route_keys(self.pc.getTransceivers()[0].receiver, payload_type)

    def negotiated(self, answer: str) -> None:
        """The answer is applied: if it is not PCMU, transcode (``transcode``)."""
        if negotiated_pcmu(answer) or self.transcoding is not None:
            return
        log.info("media session %s: the browser refused PCMU; transcoding", self.session_id)
        transceiver = self.pc.getTransceivers()[0]
        transceiver.sender.replaceTrack(DecodedTrack(self.to_browser))
        self.transcoding = start_pump(transceiver.receiver.track, self.to_phone)

    def to_phone(self, payload: bytes) -> None:
        if self.stream is not None:
            self.stream.to_phone(payload)

    def key_to_phone(self, key: str) -> None:
        if self.stream is not None:
            self.stream.send_key(key)

    def key_to_browser(self, key: str) -> None:
        self.keys_from_phone += 1
        self.to_browser.overlay(tone_frames(key))

    def hold(self, on: bool, held: HeldSide = "phone") -> None:
        """Neither side hears the other; the ``held`` side hears a tone now and then."""
        if on == self.held:
            return
        self.held = self.to_browser.held = on
        self.held_side = held
        if self.stream is not None:
            self.stream.hold(on, tones=held == "phone")
        if self._browser_hold_tones is not None:
            self._browser_hold_tones.cancel()
            self._browser_hold_tones = None
        if on and held == "browser":
            self._browser_hold_tones = asyncio.create_task(self._hold_tones_to_browser())

    async def _hold_tones_to_browser(self) -> None:
        while True:
            self.to_browser.overlay(hold_tone_frames())
            await asyncio.sleep(HOLD_TONE_EVERY_S)  # the tone's own cadence

    async def stop_tones(self) -> None:
        if self._browser_hold_tones is not None:
            self._browser_hold_tones.cancel()
            await asyncio.gather(self._browser_hold_tones, return_exceptions=True)
            self._browser_hold_tones = None


@web.middleware
async def refusals(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A refusal, answered as the gateway answers its own (status, ``{"error": ...}``)."""
    try:
        return await handler(request)
    except DomainError as e:
        return rest_response(e)


def ice_ufrag(sdp: str) -> str | None:
    """The ICE username fragment of an SDP (the first; a browser's audio-only SDP has one):
    a new one is an ICE restart."""
    for line in sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            return line.removeprefix("a=ice-ufrag:").strip()
    return None


async def close_keeping_tracks(pc: RTCPeerConnection) -> None:
    """Close ``pc`` but not the tracks it sends: aiortc stops a sender's track as the sender
    stops, and the session's track goes on, on the peer connection that replaced ``pc``."""
    for transceiver in pc.getTransceivers():
        transceiver.sender.replaceTrack(None)
    await pc.close()


def _offer_of(body: dict[str, Any]) -> str:
    offer = body.get("offer")
    if not isinstance(offer, str) or "m=audio" not in offer:
        raise Invalid('"offer" must be an SDP offer with audio', code="invalid_offer")
    if "a=fingerprint:" not in offer:
        # aiortc would take it and fail later, out of sight, leaving the call silent.
        raise Invalid("the offer has no DTLS fingerprint", code="invalid_offer")
    return offer


class MediaWorker:
    def __init__(
        self,
        *,
        api_token: str,
        twilio_auth_token: str,
        public_ws_url: str,
        previous_auth_token: str = "",
        max_sessions: int = 30,
        ice: RTCConfiguration | None = None,
        on_end: Callable[[str, StreamEnd | None], None] | None = None,
        on_key: Callable[[str, str], None] | None = None,
    ) -> None:
        if len(api_token) < 32:
            raise ValueError("the media worker's API token must be 32 characters or more")
        self._api_token = api_token.encode()
        self._twilio_auth_tokens = (twilio_auth_token, previous_auth_token)
        self._signatures = WebhookSignatures(twilio_auth_token, public_ws_url, previous_auth_token)
        self._max_sessions = max_sessions
        self._ice = ice or RTCConfiguration(iceServers=[])
        self.sessions: dict[str, Session] = {}
        self._on_end = on_end
        """Told each session that ends, and how its stream did (None: the gateway ended it
        first, or no stream came)."""
        self._on_key = on_key
        """Told each key a session's phone pressed."""
        self.late_frames: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=MAX_EVENTS_KEPT
        )
        """(wall-clock time, milliseconds late) of the last frames sent late, on any call: a
        benchmark sets them beside the machine's own stalls (bench/machine_stalls.py)."""
        self.collections: collections.deque[tuple[float, int, float]] = collections.deque(
            maxlen=MAX_EVENTS_KEPT
        )
        """(wall-clock time, generation, milliseconds) of the last collector pauses over
        ``SLOW_COLLECTION_S`` (``observe_collection``)."""

    def _frame_late(self, lateness_s: float) -> None:
        self.late_frames.append((round(time.time(), 4), round(lateness_s * 1000, 1)))

    def observe_collection(self, generation: int, pause_s: float, collected: int) -> None:
        """The collector's pacer's observer: a long pause stalls every call's frames."""
        if pause_s > SLOW_COLLECTION_S:
            self.collections.append((round(time.time(), 4), generation, round(pause_s * 1000, 1)))

    @property
    def public_ws_url(self) -> str:
        return self._signatures.url_for("")

    @public_ws_url.setter
    def public_ws_url(self, url: str) -> None:
        """Where Twilio reaches this worker: what its stream signatures are checked against
        (known once the worker has its port)."""
        current, previous = self._twilio_auth_tokens
        self._signatures = WebhookSignatures(current, url, previous)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_OFFER_BYTES, middlewares=[refusals])
        app.router.add_post(SESSIONS, self._create)
        app.router.add_post(SESSIONS + "/{session}/offer", self._offered)
        app.router.add_post(SESSIONS + "/{session}/answer", self._answered)
        app.router.add_post(SESSIONS + "/{session}/hold", self._hold)
        app.router.add_post(SESSIONS + "/{session}/candidate", self._candidate)
        app.router.add_get(SESSIONS + "/{session}", self._show)
        app.router.add_delete(SESSIONS + "/{session}", self._delete)
        app.router.add_get(SESSIONS + "/{session}/stream", self._stream)
        app.router.add_get(STATS, self._stats)
        app.router.add_get(HEALTH, self._health)
        app.on_cleanup.append(self._close_all)
        return app

    # --- the gateway's side --------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self._api_token):
            raise Unauthenticated("this worker takes calls only from its gateway")

    async def _create(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await self._body(request)
        offer = _offer_of(body) if "offer" in body else None
        if len(self.sessions) >= self._max_sessions:
            raise Unavailable("this media worker is full", code="media_full", retry_after_s=1)
        session_id = "m_" + secrets.token_hex(12)
        pc = RTCPeerConnection(self._ice)
        session = Session(session_id, pc, MuLawTrack(on_late=self._frame_late))
        bridge_transceiver(pc, session.to_browser, session.to_phone, session.keys)
        # Counted from now: answering waits for ICE gathering, and offers arriving meanwhile
        # must find the worker as full as it will be.
        self.sessions[session_id] = session
        created = {"session": session_id, "stream_path": f"{SESSIONS}/{session_id}/stream"}
        if body.get("make_offer") is True:
            session.offered = True  # this side offers: no browser offer is taken
            await pc.setLocalDescription(await pc.createOffer())
            if session_id not in self.sessions:
                raise NotFound("the media session ended", code="media_ended")
            # Keys too: aiortc does not offer telephone-event, so it is added here.
            created["offer"] = add_dtmf(pc.localDescription.sdp, OFFERED_PT)
        elif offer is not None:
            try:
                created["answer"] = await self._answer(session, offer)
            except DomainError:
                self.sessions.pop(session_id, None)
                await pc.close()
                raise
        return web.json_response(created, status=201)

    async def _offered(self, request: web.Request) -> web.Response:
        self._authorize(request)
        session = self._session(request)
        offer = _offer_of(await self._body(request))
        async with session.negotiating:
            if session.offered and session.pc.signalingState != "stable":
                raise Conflict("this session's own offer awaits its answer", code="offer_taken")
            if session.offered:
                answer = await self.renegotiate(session, offer)
            else:
                answer = await self._answer(session, offer)
        return web.json_response({"answer": answer})

    async def renegotiate(self, session: Session, offer: str) -> str:
        """A later offer of the session's browser. With the ICE credentials it had, it is
        answered on the same peer connection. With new ones (an ICE restart: the browser's
        network changed, or the call moved here from a dead worker), aiortc cannot restart
        its ICE agent, so a fresh peer connection answers, carrying the same tracks, and the
        old one is closed: the browser sees new credentials and a new DTLS fingerprint, which
        a restart allows. An offer this worker cannot use changes nothing
        (``renegotiation_refused``)."""
        session.renegotiations += 1
        remote = session.pc.remoteDescription
        if remote is not None and ice_ufrag(remote.sdp) == ice_ufrag(offer):
            try:
                return await self._answer(session, offer, end_on_failure=False)
            except Invalid as e:
                raise Invalid(e.message, code="renegotiation_refused") from None
        old, pumping = session.pc, session.stop_transcoding()
        pc = RTCPeerConnection(self._ice)
        bridge_transceiver(pc, session.to_browser, session.to_phone, session.keys)
        session.pc = pc
        try:
            answer = await self._answer(session, offer, end_on_failure=False)
        except DomainError as e:
            session.pc = old
            await close_keeping_tracks(pc)
            if pumping is not None:
                session.negotiated(old.localDescription.sdp)  # the old pump, afresh
            if isinstance(e, Invalid):
                raise Invalid(e.message, code="renegotiation_refused") from None
            raise
        finally:
            if pumping is not None:
                await asyncio.gather(pumping, return_exceptions=True)
        await close_keeping_tracks(old)
        log.info("media session %s: renegotiated on a new peer connection", session.session_id)
        return answer

    async def _answered(self, request: web.Request) -> web.Response:
        """The browser's answer to the session's own offer (``make_offer``)."""
        self._authorize(request)
        session = self._session(request)
        body = await self._body(request)
        answer = body.get("answer")
        if not isinstance(answer, str) or "m=audio" not in answer:
            raise Invalid('"answer" must be an SDP answer with audio', code="invalid_offer")
        async with session.negotiating:
            pc = session.pc
            if pc.signalingState != "have-local-offer":
                raise Conflict("this session is not waiting for an answer", code="offer_taken")
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
                session.listen_for_keys(dtmf_payload_type(answer))
                session.negotiated(answer)
            except Exception as e:  # as for offers: aiortc's errors for SDP it cannot use
                log.info("media session %s refused an answer: %r", session.session_id, e)
                await self.end(session.session_id)
                raise Invalid(
                    "the answer is not one this worker can use", code="invalid_offer"
                ) from None
        return web.Response(status=204)

    async def _hold(self, request: web.Request) -> web.Response:
        """``{"on": bool, "held"?: "phone" | "browser"}``: hold the call (neither side hears
        the other; the held side, by default the phone, hears a tone now and then), or take
        it off hold."""
        self._authorize(request)
        session = self._session(request)
        body = await self._body(request)
        on, held = body.get("on"), body.get("held", "phone")
        if not isinstance(on, bool):
            raise Invalid('"on" must be true or false')
        if held not in ("phone", "browser"):
            raise Invalid('"held" must be "phone" or "browser"')
        session.hold(on, held)
        return web.Response(status=204)

    async def _answer(self, session: Session, offer: str, end_on_failure: bool = True) -> str:
        session.offered = True
        pc = session.pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # aiortc raises ValueError and its own errors for bad SDP
            log.info("media session %s refused an offer: %r", session.session_id, e)
            if end_on_failure:
                await self.end(session.session_id)
            raise Invalid(
                "the offer is not an audio offer this worker can answer", code="invalid_offer"
            ) from None
        if session.session_id not in self.sessions:  # ended (or the worker shut down) meanwhile
            raise NotFound("the media session ended", code="media_ended")
        sdp: str = pc.localDescription.sdp
        session.negotiated(sdp)
        # The browser's keys: accepted under the payload type it offered them with.
        keys = dtmf_payload_type(offer)
        if keys is not None:
            session.listen_for_keys(keys)
            sdp = add_dtmf(sdp, keys)
        return sdp

    async def _candidate(self, request: web.Request) -> web.Response:
        self._authorize(request)
        session = self._session(request)
        body = await self._body(request)
        given = body.get("candidate")
        if not isinstance(given, dict):
            raise Invalid('"candidate" must be an ICE candidate object')
        line = given.get("candidate")
        if not isinstance(line, str) or len(line) > 1024:
            raise Invalid('"candidate" must be an ICE candidate object')
        if not line:
            return web.Response(status=204)  # the end of the browser's candidates
        try:
            candidate = candidate_from_sdp(line.removeprefix("candidate:"))
        except (ValueError, IndexError):
            raise Invalid("not an ICE candidate line") from None
        mid, index = given.get("sdpMid"), given.get("sdpMLineIndex")
        candidate.sdpMid = mid if isinstance(mid, str) else None
        candidate.sdpMLineIndex = index if isinstance(index, int) else None
        if candidate.sdpMid is None and candidate.sdpMLineIndex is None:
            candidate.sdpMLineIndex = 0  # one audio line: the only one it can be for
        try:
            await session.pc.addIceCandidate(candidate)
        except ValueError:
            raise Invalid("the candidate names no line of the offer") from None
        return web.Response(status=204)

    def _session(self, request: web.Request) -> Session:
        session = self.sessions.get(request.match_info["session"])
        if session is None:
            raise NotFound("no such media session", code="media_ended")
        return session

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise Invalid("the body is not JSON") from None
        if not isinstance(body, dict):
            raise Invalid("the body must be a JSON object")
        return body

    async def _show(self, request: web.Request) -> web.Response:
        self._authorize(request)
        session = self._session(request)
        return web.json_response({"session": session.session_id, **self._stats_of(session)})

    def _stats_of(self, s: Session) -> dict[str, Any]:
        return {
            "streaming": s.stream is not None,
            "held": s.held,
            "transcoding": s.transcoding is not None,
            "keys_to_phone": s.keys.keys,
            "keys_from_phone": s.keys_from_phone,
            "renegotiations": s.renegotiations,
            "playout_lag_ms": round(s.stream.playout_lag_s * 1000) if s.stream else None,
            "max_playout_lag_ms": round(s.stream.max_playout_lag_s * 1000) if s.stream else None,
            "clears": s.stream.clears if s.stream else 0,
            "late_to_browser": s.to_browser.late,
            "shrinks_to_browser": s.to_browser.shrinks,
            "max_late_to_browser_ms": round(s.to_browser.max_late_s * 1000, 1),
            "max_phone_arrival_gap_ms": (
                round(s.stream.max_arrival_gap_s * 1000, 1) if s.stream else None
            ),
            "underruns": s.to_browser.underruns,
            "dropped_to_browser": s.to_browser.dropped,
            "dropped_to_phone": s.stream.dropped if s.stream else 0,
        }

    async def _delete(self, request: web.Request) -> web.Response:
        self._authorize(request)
        await self.end(self._session(request).session_id)
        return web.Response(status=204)

    async def _health(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.Response(status=204)

    async def _stats(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.json_response(
            {
                "sessions": len(self.sessions),
                "max_sessions": self._max_sessions,
                "calls": {s.session_id: self._stats_of(s) for s in self.sessions.values()},
                "late_frames": list(self.late_frames),
                "slow_collections": list(self.collections),
            }
        )

    # --- Twilio's side -------------------------------------------------------------------

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        session = self.sessions.get(request.match_info["session"])
        if session is None:
            raise NotFound("no such media session")
        signature = request.headers.get(SIGNATURE_HEADER)
        if not self._signatures.valid(request.raw_path, MultiDict(), signature):
            raise Forbidden("not a stream Twilio signed", code="invalid_signature")
        if session.stream is not None:
            raise Conflict("this call has its stream already", code="stream_taken")
        ws = web.WebSocketResponse(max_msg_size=MAX_OFFER_BYTES)
        await ws.prepare(request)
        session.stream = PhoneStream(
            ws, session.to_browser, on_digit=lambda key: self._key_from_phone(session, key)
        )
        session.stream.hold(session.held, tones=session.held_side == "phone")
        session.ended = await session.stream.run()
        log.info("media session %s: stream ended (%s)", session.session_id, session.ended)
        # The session first: a closing handshake waits on the client (up to aiohttp's 10 s),
        # and one that broke the protocol may never answer.
        await self.end(session.session_id)
        await ws.close()
        return ws

    def _key_from_phone(self, session: Session, key: str) -> None:
        """A key the phone pressed: its tone to the browser, and the key to the gateway
        (``on_key``), which may show it or act on it."""
        if len(key) != 1 or key not in KEYS:
            if session.stream is not None:
                session.stream.malformed += 1
            return  # not a key: nothing to play or to report
        session.key_to_browser(key)
        if self._on_key is not None:
            self._on_key(session.session_id, key)

    # --- ending ----------------------------------------------------------------------------

    async def end(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        if session.stream is not None and session.ended is None:
            await session.stream.close()  # its handler then finds the session gone
        session.to_browser.stop()
        await session.stop_tones()
        pumping = session.stop_transcoding()
        if pumping is not None:
            await asyncio.gather(pumping, return_exceptions=True)
        await session.pc.close()
        if self._on_end is not None:
            self._on_end(session_id, session.ended)

    async def _close_all(self, app: web.Application) -> None:
        for session_id in list(self.sessions):
            await self.end(session_id)


async def until_stdin_ends() -> None:
    """Returns once standard input ends: the node that started the worker holds the other
    end, so a SIGKILLed node does not leave its workers behind."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
    log.warning("media worker: the node that started it is gone; stopping")


def report(line: str) -> None:
    """A line for the node that started the worker (``media.pool`` reads its stdout)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve(args: Any) -> None:
    worker = MediaWorker(
        api_token=os.environ["MEMBRANE_MEDIA_TOKEN"],
        twilio_auth_token=os.environ["MEMBRANE_TWILIO_AUTH_TOKEN"],
        previous_auth_token=os.environ.get("MEMBRANE_TWILIO_PREVIOUS_AUTH_TOKEN", ""),
        public_ws_url=args.public_ws_url,
        max_sessions=args.max_sessions,
        on_end=lambda session_id, _: report(f"ended {session_id}"),
        on_key=lambda session_id, key: report(f"key {session_id} {key}"),
    )
    runner = web.AppRunner(worker.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    port = runner.addresses[0][1]
    worker.public_ws_url = args.public_ws_url.replace("{port}", str(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # The collector on a clock, as on a node: every call holds aiortc's objects for its
    # whole length, and a full collection over them would stall every call's frames.
    paced = PROCESS_PACER.acquire(worker.observe_collection)
    watching = asyncio.create_task(until_stdin_ends()) if args.exit_with_stdin else None
    if watching is not None:
        watching.add_done_callback(lambda _: stop.set())
    report(f"listening {port}")
    try:
        await stop.wait()
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        if paced:
            PROCESS_PACER.release(worker.observe_collection)
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """``python -m mobile_bridge.media.worker --port 9100 --public-ws-url wss://...``, with
    ``MEMBRANE_MEDIA_TOKEN`` and ``MEMBRANE_TWILIO_AUTH_TOKEN`` in the environment. A node
    starts its workers so (``media.pool``), reading ``listening PORT`` and ``ended SESSION``
    lines from stdout; bench/media_bridge.py runs one alone."""
    import argparse

    import uvloop

    parser = argparse.ArgumentParser(description="a Membrane media worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0: any free port")
    parser.add_argument(
        "--public-ws-url", required=True, help="where Twilio reaches this worker ({port}: its port)"
    )
    parser.add_argument("--max-sessions", type=int, default=30)
    parser.add_argument(
        "--exit-with-stdin", action="store_true", help="stop when standard input ends"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
