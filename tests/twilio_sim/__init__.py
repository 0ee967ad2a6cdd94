"""A faithful local Twilio stand-in for tests (see README.md in this directory)."""

from .audio import (
    FRAME_BYTES,
    SAMPLE_RATE,
    AudioSource,
    Silence,
    Tone,
    dominant_frequency,
    rms,
    tone_pcm,
    ulaw_decode,
    ulaw_encode,
)
from .contract import (
    CONTRACT_DIR,
    Contract,
    ContractViolation,
    TwilioApiError,
    check_call_resource,
    check_list_page,
)
from .contract_messaging import MessagingContract, check_message_resource
from .messaging import IncomingNumber, MessageRecord, Messaging
from .records import (
    CallRecord,
    ConferenceRecord,
    Notification,
    PhoneConfig,
    StatusChange,
    StreamRecord,
    VerbRecord,
    WebhookRecord,
)
from .sdk import sdk_client
from .server import CallInterrupted, TwilioSim
from .signature import SIGNATURE_HEADER, sdk_signature, twilio_signature

__all__ = [
    "CONTRACT_DIR",
    "FRAME_BYTES",
    "SAMPLE_RATE",
    "SIGNATURE_HEADER",
    "AudioSource",
    "CallInterrupted",
    "CallRecord",
    "ConferenceRecord",
    "Contract",
    "ContractViolation",
    "IncomingNumber",
    "MessageRecord",
    "Messaging",
    "MessagingContract",
    "Notification",
    "PhoneConfig",
    "Silence",
    "StatusChange",
    "StreamRecord",
    "Tone",
    "TwilioApiError",
    "TwilioSim",
    "VerbRecord",
    "WebhookRecord",
    "check_call_resource",
    "check_list_page",
    "check_message_resource",
    "dominant_frequency",
    "rms",
    "sdk_client",
    "sdk_signature",
    "tone_pcm",
    "twilio_signature",
    "ulaw_decode",
    "ulaw_encode",
]
