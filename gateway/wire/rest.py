"""The REST-only bodies: health, errors, visitor sessions and callback requests
(docs/PROTOCOL.md sections 2, 4 and 5). Presence and Call are in their own modules."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.wire.base import (
    Id,
    Json,
    Language,
    Phone,
    Time,
    VisitorId,
    VisitorSecret,
    decode,
    iso,
    parse_iso,
    to_wire,
)
from gateway.wire.calls import Call, CallStart

# --- operations ----------------------------------------------------------------------------


class Health(Struct):
    status: Literal["ok"]
    node: str


class StoreHealth(Struct):
    reachable: bool
    listening: bool
    persistent: bool
    detail: str


class Readiness(Struct):
    ready: bool
    draining: Annotated[
        bool, Meta(description="Shutting down (SIGTERM): not ready, whatever the store says.")
    ]
    node: str
    store: StoreHealth
    warnings: list[str]


class ErrorDetail(Struct):
    code: Annotated[
        str,
        Meta(
            pattern="^[a-z][a-z0-9_]*$",
            description="Stable; every code is listed in docs/PROTOCOL.md section 2.",
        ),
    ]
    message: Annotated[str, Meta(description="Human text; may change.")]
    retry_after_ms: Annotated[int, Meta(ge=0)] | UnsetType = UNSET
    """``overloaded`` only: retry no sooner."""


class Error(Struct):
    """Every refusal: a stable code and a human message."""

    error: ErrorDetail


# --- visitor sessions ----------------------------------------------------------------------


class IceServer(Struct):
    urls: list[str]
    username: str | UnsetType = UNSET
    credential: str | UnsetType = UNSET


class SessionRequest(Struct):
    """A visitor's claim to be someone the gateway met before: both parts, or neither. An
    id or secret the gateway cannot have issued is no claim (the visitor is new), not an
    error."""

    visitor_id: (
        Annotated[
            VisitorId,
            Meta(
                description="The id of an earlier session: kept only together with its "
                "visitor_secret; without it, or with a wrong one, a new id is made."
            ),
        ]
        | None
    ) = None
    visitor_secret: (
        Annotated[VisitorSecret, Meta(description="The visitor_secret that came with visitor_id.")]
        | None
    ) = None


class Session(Struct):
    token: Annotated[str, Meta(description="Visitor JWT for /visitor.")]
    visitor_id: VisitorId
    visitor_secret: Annotated[
        VisitorSecret,
        Meta(
            description="Proves visitor_id in later session requests: whoever holds it is "
            "this visitor, so the client keeps it to itself."
        ),
    ]
    expires_at: Time
    ice_servers: list[IceServer]


def session_to_wire(
    token: str,
    visitor_id: str,
    visitor_secret: str,
    expires_at: float,
    ice_servers: list[Json],
) -> Json:
    expires = iso(expires_at)
    assert expires is not None
    servers = [IceServer(**server) for server in ice_servers]
    return to_wire(Session(token, visitor_id, visitor_secret, expires, servers))


# --- callbacks -----------------------------------------------------------------------------


class CallbackRequest(CallStart, kw_only=True):
    """``POST /v1/sites/{site}/callbacks``: a number to call, when, and the routing hints of
    ``call:start``."""

    phone: Phone
    at: (
        Annotated[
            str,
            Meta(
                max_length=64,
                extra_json_schema={"format": "date-time"},
                description="When to call; absent or null: as soon as possible.",
            ),
        ]
        | None
    ) = None
    after_call: (
        Annotated[
            Id,
            Meta(
                description="Keep my place: the visitor's own browser call that failed at most "
                "30 minutes ago."
            ),
        ]
        | None
    ) = None


class CallbackCreated(Struct):
    call_id: Id
    status_token: Annotated[
        str, Meta(description="Shown only here: reads, moves and cancels this callback.")
    ]
    call: Call
    ticket_url: Annotated[
        str,
        Meta(
            description="The customer's live ticket page, status token included (in the "
            "fragment, which browsers never send to a server)."
        ),
    ]


def ticket_url(public_url: str, call_id: str, status_token: str) -> str:
    return f"{public_url.rstrip('/')}/t/{call_id}#{status_token}"


class CallbackSlots(Struct):
    slots: list[Time]
    """Ascending."""


def callback_created_to_wire(call_id: str, status_token: str, call: Json, public_url: str) -> Json:
    """The 201 of ``POST .../callbacks``; ``call`` is the ticket's view, already on the wire
    (and checked against its struct once more on the way: a callback is created rarely)."""
    return to_wire(
        CallbackCreated(
            call_id,
            status_token,
            msgspec.convert(call, Call),
            ticket_url(public_url, call_id, status_token),
        )
    )


def slots_to_wire(slots: list[float]) -> Json:
    return to_wire(CallbackSlots([t for t in (iso(s) for s in slots) if t is not None]))


class TicketMove(Struct):
    """``POST /v1/calls/{call_id}/move``: call me at another time instead."""

    at: Annotated[
        str,
        Meta(
            max_length=64,
            extra_json_schema={"format": "date-time"},
            description="One of the callback slots (GET .../callback-slots).",
        ),
    ]


def ticket_move_from_wire(payload: object) -> float:
    return parse_iso(decode(payload, TicketMove).at, "at")


class CatalogueAsk(Struct):
    language: Language


def catalogue_language_from_path(language: str) -> str:
    """The language a page asks its sentences in (a BCP 47 tag, as ``?language=``)."""
    return decode({"language": language}, CatalogueAsk, "path").language


class Catalogue(Struct):
    """The sentences a browser page shows, in one language (``GET /v1/messages/{language}``):
    each English sentence (the message id) with its translation, placeholders in braces."""

    language: str
    """The language served: the best Membrane speaks for the one asked."""
    messages: dict[str, str]


def catalogue_to_wire(language: str, messages: dict[str, str]) -> Json:
    return to_wire(Catalogue(language, messages))


class ShareLink(Struct):
    """``POST /v1/calls/{call_id}/share``: the read-only link, shown only here."""

    share_url: Annotated[
        str,
        Meta(
            description="The ticket page on the share link: state and times, the agent's "
            "first name, nothing else. A new one each time; the last one stops working."
        ),
    ]
    call: Call


def share_link_to_wire(share_url: str, call: Json) -> Json:
    return to_wire(ShareLink(share_url, msgspec.convert(call, Call)))


class SurveyAnswerIn(Struct):
    """``POST /v1/calls/{call_id}/survey``: how likely the customer is to recommend us."""

    score: Annotated[
        float,
        Meta(
            ge=0,
            le=10,
            multiple_of=1,  # 9.0 is the integer 9, as JSON counts it; 8.5 is refused
            description="An integer from 0 (not likely) to 10 (very likely).",
        ),
    ]
    comment: Annotated[str, Meta(max_length=1000)] = ""


class SurveyAnswered(Struct):
    call: Call
    referral_url: str | None
    """The site's referral link, for a promoter (9 or 10); else null."""


def survey_answer_from_wire(payload: object) -> tuple[int, str]:
    answer = decode(payload, SurveyAnswerIn)
    return int(answer.score), answer.comment.strip()


def survey_answered_to_wire(call: Json, referral_url: str | None) -> Json:
    return to_wire(SurveyAnswered(msgspec.convert(call, Call), referral_url))


class ScoreRow(Struct):
    """One agent's or branch's answers to the question after the call."""

    id: Id
    name: str
    responses: int
    promoters: int
    passives: int
    detractors: int
    nps: float | None
    """Percent promoters minus percent detractors (-100 to 100); null with no answer."""


class SurveyScores(Struct):
    """``GET /v1/sites/{site}/survey-scores``: every agent's and branch's tally."""

    agents: list[ScoreRow]
    branches: list[ScoreRow]


def score_row(
    subject_id: str, name: str, promoters: int, passives: int, detractors: int, nps: float | None
) -> ScoreRow:
    return ScoreRow(
        subject_id, name, promoters + passives + detractors, promoters, passives, detractors, nps
    )


def survey_scores_to_wire(agents: list[ScoreRow], branches: list[ScoreRow]) -> Json:
    return to_wire(SurveyScores(agents, branches))
