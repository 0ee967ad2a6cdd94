"""A media worker: the process that holds the audio bridge's calls, so that media never
stalls a gateway node's signaling loop and a node scales by adding workers.

Over HTTP, for the gateway node that hands it a call (``Authorization: Bearer`` with the
worker's token, compared in constant time):

- ``POST /v1/media/sessions`` ``{"offer": sdp}``: a browser's WebRTC offer; the answer
  comes back with PCMU first (``pcmu.bridge_transceiver``), with the session's id and the
  path of its stream. ``503 media_full`` past ``max_sessions``.
- ``DELETE /v1/media/sessions/{id}``: the call is over; its peer connection is closed.
- ``GET /v1/media/stats``: sessions, and each one's gaps and drops.

And for Twilio, ``GET /v1/media/sessions/{id}/stream``: the websocket of the call's
``<Connect><Stream>``, whose ``X-Twilio-Signature`` is checked against the worker's public
websocket URL as every webhook's is. One stream per session; when it ends, so does the
session. Not wired to the gateway yet: the gateway's flow for a browser visitor reaching an
agent's phone is the next part of the bridge.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
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
from mobile_bridge.media.pcmu import MuLawTrack, bridge_transceiver
from mobile_bridge.media.stream import PhoneStream, StreamEnd
from mobile_bridge.twilio_webhooks import SIGNATURE_HEADER, WebhookSignatures

log = logging.getLogger(__name__)

MAX_OFFER_BYTES: Final = 64 * 1024
"""An audio-only offer is a few KB; anything near this is not a browser's."""
SESSIONS: Final = "/v1/media/sessions"


@dataclass
class Session:
    session_id: str
    pc: RTCPeerConnection
    to_browser: MuLawTrack
    stream: PhoneStream | None = None
    ended: StreamEnd | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_phone(self, payload: bytes) -> None:
        if self.stream is not None:
            self.stream.to_phone(payload)


@web.middleware
async def refusals(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A refusal, answered as the gateway answers its own (status, ``{"error": ...}``)."""
    try:
        return await handler(request)
    except DomainError as e:
        return rest_response(e)


class MediaWorker:
    def __init__(
        self,
        *,
        api_token: str,
        twilio_auth_token: str,
        public_ws_url: str,
        max_sessions: int = 50,
        ice: RTCConfiguration | None = None,
        on_end: Callable[[str, StreamEnd | None], None] | None = None,
    ) -> None:
        if len(api_token) < 32:
            raise ValueError("the media worker's API token must be 32 characters or more")
        self._api_token = api_token.encode()
        self._signatures = WebhookSignatures(twilio_auth_token, public_ws_url)
        self._max_sessions = max_sessions
        self._ice = ice or RTCConfiguration(iceServers=[])
        self.sessions: dict[str, Session] = {}
        self._on_end = on_end
        """Told each session that ends, and how its stream did (None: the gateway ended it
        first, or no stream came)."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_OFFER_BYTES, middlewares=[refusals])
        app.router.add_post(SESSIONS, self._create)
        app.router.add_delete(SESSIONS + "/{session}", self._delete)
        app.router.add_get(SESSIONS + "/{session}/stream", self._stream)
        app.router.add_get("/v1/media/stats", self._stats)
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
        offer = await self._offer(request)
        if len(self.sessions) >= self._max_sessions:
            raise Unavailable("this media worker is full", code="media_full", retry_after_s=1)
        session_id = "m_" + secrets.token_hex(12)
        pc = RTCPeerConnection(self._ice)
        session = Session(session_id, pc, MuLawTrack())
        bridge_transceiver(pc, session.to_browser, session.to_phone)
        # Counted from now: answering waits for ICE gathering, and offers arriving meanwhile
        # must find the worker as full as it will be.
        self.sessions[session_id] = session
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # aiortc raises ValueError and its own errors for bad SDP
            self.sessions.pop(session_id, None)
            await pc.close()
            log.info("media session refused an offer: %r", e)
            raise Invalid(
                "the offer is not an audio offer this worker can answer", code="invalid_offer"
            ) from None
        if session_id not in self.sessions:  # the worker shut down meanwhile
            raise Unavailable("this media worker is stopping", code="media_full")
        answer = pc.localDescription
        return web.json_response(
            {
                "session": session_id,
                "answer": answer.sdp,
                "stream_path": f"{SESSIONS}/{session_id}/stream",
            },
            status=201,
        )

    async def _offer(self, request: web.Request) -> str:
        try:
            body = await request.json()
        except ValueError:
            raise Invalid("the body is not JSON") from None
        offer = body.get("offer") if isinstance(body, dict) else None
        if not isinstance(offer, str) or "m=audio" not in offer:
            raise Invalid('"offer" must be an SDP offer with audio', code="invalid_offer")
        return offer

    async def _delete(self, request: web.Request) -> web.Response:
        self._authorize(request)
        if request.match_info["session"] not in self.sessions:
            raise NotFound("no such media session")
        await self.end(request.match_info["session"])
        return web.Response(status=204)

    async def _stats(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.json_response(
            {
                "sessions": len(self.sessions),
                "max_sessions": self._max_sessions,
                "calls": {
                    s.session_id: {
                        "streaming": s.stream is not None,
                        "underruns": s.to_browser.underruns,
                        "dropped_to_browser": s.to_browser.dropped,
                        "dropped_to_phone": s.stream.dropped if s.stream else 0,
                    }
                    for s in self.sessions.values()
                },
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
        session.stream = PhoneStream(ws, session.to_browser)
        session.ended = await session.stream.run()
        log.info("media session %s: stream ended (%s)", session.session_id, session.ended)
        # The session first: a closing handshake waits on the client (up to aiohttp's 10 s),
        # and one that broke the protocol may never answer.
        await self.end(session.session_id)
        await ws.close()
        return ws

    # --- ending ----------------------------------------------------------------------------

    async def end(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        if session.stream is not None and session.ended is None:
            await session.stream.close()  # its handler then finds the session gone
        session.to_browser.stop()
        await session.pc.close()
        if self._on_end is not None:
            self._on_end(session_id, session.ended)

    async def _close_all(self, app: web.Application) -> None:
        for session_id in list(self.sessions):
            await self.end(session_id)


def main(argv: list[str] | None = None) -> None:
    """``python -m mobile_bridge.media.worker --port 9100 --public-ws-url wss://...``, with
    ``MEMBRANE_MEDIA_TOKEN`` and ``MEMBRANE_TWILIO_AUTH_TOKEN`` in the environment. (The
    gateway will start its workers itself; this runs one alone, for bench/media_bridge.py.)"""
    import argparse
    import os

    import uvloop

    parser = argparse.ArgumentParser(description="a Membrane media worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--public-ws-url", required=True, help="where Twilio reaches this worker")
    parser.add_argument("--max-sessions", type=int, default=50)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    worker = MediaWorker(
        api_token=os.environ["MEMBRANE_MEDIA_TOKEN"],
        twilio_auth_token=os.environ["MEMBRANE_TWILIO_AUTH_TOKEN"],
        public_ws_url=args.public_ws_url,
        max_sessions=args.max_sessions,
    )
    uvloop.install()
    web.run_app(worker.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
