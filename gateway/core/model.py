"""The domain model: sites, branches, agents, devices and aggregated presence.

Plain frozen dataclasses and enums, no I/O. Times are POSIX seconds (float); the wire
codec turns them into ISO 8601 at the edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, time
from enum import StrEnum


class DeviceKind(StrEnum):
    DESKTOP = "desktop"
    IM = "im"
    MOBILE = "mobile"


class DeviceState(StrEnum):
    AVAILABLE = "available"
    AWAY = "away"
    BUSY = "busy"
    DND = "dnd"
    OFFLINE = "offline"


class PresenceStatus(StrEnum):
    AVAILABLE = "available"
    ON_CALL = "on_call"
    BUSY = "busy"
    AWAY = "away"
    DND = "dnd"
    OFFLINE = "offline"


class Channel(StrEnum):
    WEBRTC = "webrtc"
    PSTN = "pstn"


class Role(StrEnum):
    AGENT = "agent"
    SUPERVISOR = "supervisor"
    VISITOR = "visitor"


# Which channels a device of each kind can take a call on. An IM client only reports presence.
CHANNELS_BY_KIND: dict[DeviceKind, tuple[Channel, ...]] = {
    DeviceKind.DESKTOP: (Channel.WEBRTC,),
    DeviceKind.MOBILE: (Channel.PSTN,),
    DeviceKind.IM: (),
}


@dataclass(frozen=True, slots=True)
class OpeningSpan:
    """One span of opening time on a weekday, in the branch's local time."""

    opens: time
    closes: time


@dataclass(frozen=True, slots=True)
class Branch:
    branch_id: str
    name: str
    timezone: str
    lat: float | None = None
    lon: float | None = None
    languages: tuple[str, ...] = ()
    # Monday is 0, as in datetime.weekday(); a missing weekday is closed all day.
    hours: Mapping[int, tuple[OpeningSpan, ...]] = field(default_factory=dict)
    holidays: frozenset[date] = frozenset()


@dataclass(frozen=True, slots=True)
class Agent:
    agent_id: str
    site: str
    name: str
    branch: str | None = None
    languages: tuple[str, ...] = ()
    skills: tuple[str, ...] = ()
    mobile: str | None = None  # E.164
    role: Role = Role.AGENT


class FollowUpPolicy(StrEnum):
    WAIT = "wait"
    COLLEAGUE = "colleague"


@dataclass(frozen=True, slots=True)
class CallbackPolicy:
    """Limits on outbound PSTN callbacks; a site may only tighten the defaults."""

    allowed_countries: tuple[str, ...] = ("US", "CA", "GB", "IE", "DE", "FR", "NL", "ES", "IT")
    blocked_number_types: tuple[str, ...] = (
        "PREMIUM_RATE",
        "SHARED_COST",
        "UAN",
        "VOICEMAIL",
        "PAGER",
        "PERSONAL_NUMBER",
    )
    per_number_15min: int = 7
    per_number_hour: int = 9
    per_number_day: int = 15
    numbers_per_visitor_hour: int = 3
    per_ip_hour: int = 20
    per_site_hour: int = 500
    max_concurrent_calls: int = 20
    daily_spend_cap_usd: float = 50.0
    retries: int = 2
    retry_interval_s: int = 120
    quiet_hours_start: time = time(21, 0)
    quiet_hours_end: time = time(8, 0)
    agent_first: bool = True
    text_ticket_link: bool = True
    """Text a new callback's customer the link to its ticket page (gateway/services/
    customer_texts.py); also the reminders and late notices below."""
    reminder_interval_s: int = 1800
    """The longest a waiting customer goes without word from us once the time promised has
    come: a reminder then (a text, and a note on the ticket). 600 to 86,400."""
    late_after_s: int = 600
    """A promise slips when the call is expected more than this after the time promised:
    the customer is told first, with the new time (gateway/core/promise.py). 60 to 7,200."""
    late_notice_ahead_s: int = 900
    """How long before the time promised the gateway starts judging whether it will slip
    (sooner, the queue says little about it). 60 to 7,200."""
    max_texts: int = 5
    """Texts about one callback, its confirmation included; may only be lowered (0: none)."""
    follow_up_policy: FollowUpPolicy = FollowUpPolicy.WAIT
    """A follow-up whose agent is not free at its time: ``wait`` for her up to
    ``follow_up_wait_s``, then a colleague of her branch; ``colleague``: one at once
    (gateway/core/follow_up.py)."""
    follow_up_wait_s: int = 1800
    """How long a follow-up waits for its agent under ``wait``. 60 to 86,400."""


@dataclass(frozen=True, slots=True)
class Site:
    site_id: str
    name: str
    allowed_origins: tuple[str, ...]
    branches: dict[str, Branch]
    agents: dict[str, Agent]
    caller_ids: tuple[str, ...] = ()
    callback_policy: CallbackPolicy = field(default_factory=CallbackPolicy)
    ring_timeout_s: float = 20.0
    sms_aliases: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    """Words agents may text for each SMS presence command, by language then command
    (``in``, ``out``, ``busy``, ``back``); they replace the built-in words of that language
    (gateway/core/sms_presence.py)."""
    # The key of the IM presence webhook (HMAC-SHA256); empty: the webhook is off for the site.
    presence_webhook_secret: str = field(default="", repr=False)
    survey: bool = True
    """Ask the question after each call that reached an agent (gateway/core/survey.py)."""
    referral_url: str = ""
    """Offered to promoters after the question: where they may tell a friend."""
    mobile_after_desktop: bool = False
    """A callback ring the agent lets run out in the app rings their mobile next (with the
    whisper and press 1), before the next agent is tried."""
    history_retention_days: int = 400
    """How long the call history keeps the site's calls (gateway/services/
    history_retention.py); 1 to 3,650."""


@dataclass(frozen=True, slots=True)
class Device:
    """One of an agent's endpoints, like an XMPP resource."""

    device_id: str
    kind: DeviceKind
    state: DeviceState
    priority: int
    last_seen: float
    # When the device goes offline unless it is heard from again (heartbeat TTL).
    expires_at: float


@dataclass(frozen=True, slots=True)
class PresenceRecord:
    """What the store keeps for one agent: raw devices plus the facts aggregation needs."""

    devices: tuple[Device, ...] = ()
    active_call: str | None = None
    status: PresenceStatus = PresenceStatus.OFFLINE
    since: float = 0.0
    # When the agent last ended a call or came available: the "longest idle" routing key.
    idle_since: float = 0.0
    # Bumped by every change to the devices or the call, so that nodes can drop a presence
    # event that arrives after a newer one.
    rev: int = 0


@dataclass(frozen=True, slots=True)
class Presence:
    """An agent's one aggregated status and the channels they can be reached on now."""

    agent_id: str
    site: str
    name: str
    branch: str | None
    status: PresenceStatus
    channels: tuple[Channel, ...]
    devices: tuple[Device, ...]
    since: float
    idle_since: float = 0.0
    active_call: str | None = None
    rev: int = 0


def sites_by_caller_id(sites: Mapping[str, Site]) -> dict[str, list[Site]]:
    """Each number sites call and text from, with the sites that use it (by id): whom a text
    to that number is for."""
    found: dict[str, list[Site]] = {}
    for site_id in sorted(sites):
        for number in sites[site_id].caller_ids:
            found.setdefault(number, []).append(sites[site_id])
    return found


def languages_of(agent: Agent, branch: Branch | None) -> tuple[str, ...]:
    """The languages the agent speaks, most fluent first: their own, or, when none are
    configured, their branch's."""
    return agent.languages or (branch.languages if branch is not None else ())
