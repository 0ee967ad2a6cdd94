"""Every error code, in one place: the stable codes clients see (docs/PROTOCOL.md section 2,
its table) and the internal ones that never reach a client (the list below that table).

tests/test_protocol_doc.py holds both lists equal to the document and checks that every code
the gateway's source raises, refuses or counts is one of them.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Codes a client may receive: REST errors, socket.io acks, ``error`` events and
    ``connect_error``s, and WebSocket close reasons."""

    INVALID_TOKEN = "invalid_token"
    FORBIDDEN = "forbidden"
    ROLE_MISMATCH = "role_mismatch"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    INVALID_SIGNATURE = "invalid_signature"
    UNKNOWN_LEG = "unknown_leg"
    INVALID_OFFER = "invalid_offer"
    MEDIA_FULL = "media_full"
    STREAM_TAKEN = "stream_taken"
    OFFER_TAKEN = "offer_taken"
    RENEGOTIATION_REFUSED = "renegotiation_refused"
    MEDIA_ENDED = "media_ended"
    STALE_WEBHOOK = "stale_webhook"
    REPLAYED_WEBHOOK = "replayed_webhook"
    UNKNOWN_AGENT = "unknown_agent"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INVALID_PAYLOAD = "invalid_payload"
    BAD_REQUEST = "bad_request"
    INVALID_PHONE = "invalid_phone"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_EVENT = "unknown_event"
    MALFORMED_PACKET = "malformed_packet"
    BINARY_UNSUPPORTED = "binary_unsupported"
    SLOW_CONSUMER = "slow_consumer"
    COUNTRY_NOT_ALLOWED = "country_not_allowed"
    NUMBER_TYPE_NOT_ALLOWED = "number_type_not_allowed"
    SLOT_UNAVAILABLE = "slot_unavailable"
    QUIET_HOURS = "quiet_hours"
    RATE_LIMITED = "rate_limited"
    NUMBER_RATE_LIMITED = "number_rate_limited"
    TOO_MANY_NUMBERS = "too_many_numbers"
    IP_RATE_LIMITED = "ip_rate_limited"
    SITE_RATE_LIMITED = "site_rate_limited"
    CONFLICT = "conflict"
    NOT_RINGING = "not_ringing"
    RING_EXPIRED = "ring_expired"
    CALL_ENDED = "call_ended"
    CALL_IN_PROGRESS = "call_in_progress"
    CALLBACK_IN_PROGRESS = "callback_in_progress"
    NUMBER_HAS_CALLBACK = "number_has_callback"
    NOT_CONNECTED = "not_connected"
    NOT_YOUR_CALL = "not_your_call"
    TOO_LATE = "too_late"
    FOLLOW_UP_EXISTS = "follow_up_exists"
    NO_SURVEY = "no_survey"
    SURVEY_CLOSED = "survey_closed"
    ALREADY_ANSWERED = "already_answered"
    EXPERIMENT_RUNNING = "experiment_running"
    NO_EXPERIMENT = "no_experiment"
    TOO_MANY_WATCHERS = "too_many_watchers"
    OVERLOADED = "overloaded"
    DRAINING = "draining"
    CALLBACKS_UNAVAILABLE = "callbacks_unavailable"
    HISTORY_UNAVAILABLE = "history_unavailable"
    SPEND_CAP_REACHED = "spend_cap_reached"
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL = "internal"


class InternalCode(StrEnum):
    """Codes of failures the gateway handles itself: logged, or turned into one of
    ``ErrorCode`` or a call's ``reason``, never sent as an error."""

    INVALID_STATE = "invalid_state"
    STALE = "stale"
    OLD_STATUS = "old_status"
    NO_CALLABLE_HOURS = "no_callable_hours"
    TELEPHONY_AUTH_FAILED = "telephony_auth_failed"
    TELEPHONY_REFUSED = "telephony_refused"
    TELEPHONY_UNAVAILABLE = "telephony_unavailable"
    OPTED_OUT = "opted_out"
    MEDIA_UNREACHABLE = "media_unreachable"
    MEDIA_ERROR = "media_error"
    UNAVAILABLE = "unavailable"
