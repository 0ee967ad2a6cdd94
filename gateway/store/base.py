"""The storage seam, one protocol per role (presence, events, call records, timers, the
callback queue, coordination); ``Store`` is all of them. Two implementations pass the same
behavioural suite (tests/test_store.py): ``EmbeddedStore`` (one node) and ``RedisStore``
(many nodes). Services take the narrowest role they use."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import orjson

from gateway.core.callback_admission import QuotaSpec, Subject
from gateway.core.errors import StoreUnavailable
from gateway.core.model import Device, DeviceKind, DeviceState, PresenceRecord, PresenceStatus

Json = dict[str, Any]
EventHandler = Callable[[Json], Awaitable[None]]
ResyncHandler = Callable[[], Awaitable[None]]


C = TypeVar("C", bound=type)

# Opened and closed by the node, not by a request: a failure there is the node's, and keeps
# its own type (the CLI explains a Redis refusing its password at start-up).
_LIFECYCLE = frozenset({"start", "close"})


def failures_become_unavailable(
    failures: tuple[type[BaseException], ...], exempt: tuple[type[BaseException], ...] = ()
) -> Callable[[C], C]:
    """Class decorator for a store backend: each public coroutine method, its own or one of
    the parts it is mixed from, raises ``StoreUnavailable`` (the cause chained) when the
    backend fails with one of ``failures`` (and not one of ``exempt``, which are bugs rather
    than outages). Callers then see one error for every backend: the edges answer it 503
    with ``Retry-After``, never 500."""

    def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def translated(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except exempt:
                raise
            except failures as e:
                raise StoreUnavailable() from e

        return translated

    def decorate(cls: C) -> C:
        for name in dir(cls):
            if name.startswith("_") or name in _LIFECYCLE:
                continue
            member = inspect.getattr_static(cls, name)
            if inspect.iscoroutinefunction(member):
                setattr(cls, name, wrap(member))
        return cls

    return decorate


@dataclass(frozen=True, slots=True)
class StoreHealth:
    reachable: bool
    """The store answers."""
    persistent: bool
    """Durable records survive a restart of the store itself."""
    listening: bool
    """This node receives other nodes' events (always true on one node)."""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DeviceRef:
    site: str
    agent_id: str
    device_id: str


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a node predicted an agent's record to be after its write (see put_device_if)."""

    rev: int
    live: tuple[str, ...]
    """Ids of the devices live at ``now``, sorted."""
    now: float
    status: tuple[PresenceStatus, float, float] | None
    """Status, since and idle_since to save, when the status bookkeeping changed."""
    event: Json
    """The presence event without ``devices`` and ``rev``."""


@dataclass(frozen=True, slots=True)
class CallRow:
    """A call as stored: indexable columns plus the serialized call (gateway.calls codec)."""

    call_id: str
    site: str
    version: int
    data: Json


@dataclass(frozen=True, slots=True)
class Quota:
    """One sliding-window limit. Counting mode (member None): at most `limit` events in the
    last `window_s` seconds. Distinct mode (member set): at most `limit` distinct members in
    the window; a member already counted in the window always passes (and is refreshed)."""

    key: str
    window_s: int
    limit: int
    member: str | None = None


HANDLE_TIMES_KEPT = 50
"""How many of a site's most recent handling times the store keeps."""


class StoreLifecycle(Protocol):
    node_id: str

    async def start(self, on_event: EventHandler, on_resync: ResyncHandler) -> None:
        """Connect and start delivering events; ``on_resync`` runs after any gap in events."""

    async def close(self) -> None: ...

    async def health(self) -> StoreHealth: ...


class PresenceStore(Protocol):
    """Agents' devices, leases and presence bookkeeping: short-lived, shared by all nodes."""

    async def put_device(self, site: str, agent_id: str, device: Device) -> PresenceRecord: ...

    async def put_device_if(
        self, site: str, agent_id: str, device: Device, expect: Expectation
    ) -> tuple[bool, PresenceRecord]:
        """Write the device and, in the same atomic step, if the agent is then at
        ``expect.rev`` with exactly ``expect.live`` devices live, save ``expect.status`` and
        publish ``expect.event`` (the store adds the devices and revision): the common case
        of a presence change in one round trip. Otherwise only the device is written and
        the caller aggregates the returned record itself."""

    async def remove_device(self, site: str, agent_id: str, device_id: str) -> PresenceRecord: ...

    async def touch_devices(
        self, refs: Sequence[DeviceRef], last_seen: float, expires_at: float
    ) -> list[DeviceRef]:
        """Extend existing devices' leases; a device removed meanwhile stays removed. Returns
        the refs whose device was gone."""

    async def get_presence(self, site: str, agent_id: str) -> PresenceRecord: ...

    async def get_site_presence(
        self, site: str, agent_ids: Sequence[str]
    ) -> dict[str, PresenceRecord]: ...

    async def save_status(
        self, site: str, agent_id: str, status: PresenceStatus, since: float, idle_since: float
    ) -> None: ...

    async def set_active_call(
        self, site: str, agent_id: str, call_id: str | None
    ) -> PresenceRecord: ...

    async def set_active_call_if(
        self, site: str, agent_id: str, call_id: str | None, expect: Expectation
    ) -> tuple[bool, PresenceRecord]:
        """``set_active_call``, then as ``put_device_if``: the status saved and the event
        published in the same step when the record is as predicted."""

    async def claim_lapsed(self, now: float) -> list[tuple[str, str]]:
        """Remove devices whose lease ran out; each (site, agent) is returned by one node only."""


class EventBus(Protocol):
    """Events between nodes."""

    async def publish(self, event: Json) -> None:
        """Deliver to every other node's handler (never back to this one: the sender handles
        its own change first, with the typed object in hand, as python-socketio does)."""


class CallRecordStore(Protocol):
    """Durable records of calls and of whom each visitor talked to."""

    async def put_call(self, row: CallRow) -> bool:
        """Insert version 1, or replace version n-1 with n; False if someone else won."""

    async def put_call_holding(self, row: CallRow, agent_id: str, ttl_s: float) -> bool | None:
        """``put_call`` of a call that must still hold ``agent_id``'s reservation (an
        accept), which is kept ``ttl_s`` more, in one step: None, and nothing written, once
        ``row.call_id`` no longer holds it (it lapsed, and maybe went to another call). The
        version is checked first: False for a stale row, whatever the reservation."""

    async def get_call(self, call_id: str) -> CallRow | None: ...

    async def list_calls(self, site: str, limit: int = 100) -> list[CallRow]: ...

    async def calls_unchanged_since(self, site: str, before: float, limit: int) -> list[CallRow]:
        """Up to ``limit`` of the site's calls last written before ``before`` (wall clock),
        oldest first: what the retention period may delete."""

    async def delete_call(self, row: CallRow) -> bool:
        """Delete the call if it is still at ``row.version``; False if it changed meanwhile
        (or is gone)."""

    async def record_served(self, site: str, visitor_id: str, agent_id: str) -> None: ...

    async def last_agent(self, site: str, visitor_id: str) -> str | None: ...

    async def set_open_call(self, site: str, visitor_id: str, call_id: str) -> None:
        """Remember the visitor's live call, so a reconnecting socket can pick it up again."""

    async def open_call(self, site: str, visitor_id: str) -> str | None: ...

    async def open_call_row(self, site: str, visitor_id: str) -> CallRow | None:
        """The visitor's live call as stored (``open_call``, then ``get_call``, in one round
        trip); None when there is none, or its record is gone."""

    async def record_handle_time(self, site: str, seconds: float) -> None:
        """Keep the site's ``HANDLE_TIMES_KEPT`` most recent handling times."""

    async def handle_times(self, site: str) -> list[float]:
        """The kept handling times, newest first."""


class TimerStore(Protocol):
    """Durable timers, leased to one node at a time."""

    async def schedule_timer(self, timer_id: str, due: float, keep: bool = False) -> None:
        """A durable timer; scheduling an existing id moves it, unless ``keep``: then a timer
        already there (due, or leased to a node running it) stays as it is."""

    async def claim_timers(self, now: float, lease_s: float, limit: int = 100) -> list[str]:
        """Due timers, each leased to the caller for ``lease_s``: a node that dies before
        ``finish_timer`` lets the lease run out and another node gets the timer again."""

    async def finish_timer(self, timer_id: str) -> None: ...


class CallbackQueueStore(Protocol):
    """Each site's queue of PSTN callbacks waiting for an agent (durable)."""

    async def queue_put(self, site: str, call_id: str, score: float) -> None:
        """Add or move a call in the site's callback queue; lower scores go first, equal
        scores in call id order."""

    async def queue_remove(self, site: str, call_id: str) -> None: ...

    async def queue_rank(self, site: str, call_id: str) -> int | None:
        """The call's 0-based place in the queue; None when it is not queued."""

    async def queue_ahead(self, site: str, call_id: str, limit: int) -> list[str] | None:
        """The first ``limit`` calls ahead of ``call_id`` in the queue, in order; None when
        it is not queued."""

    async def queue_size(self, site: str) -> int: ...

    async def queue_head(self, site: str, limit: int) -> list[str]:
        """The first ``limit`` calls of the queue, in order (the board's callback queue)."""

    async def queue_count_before(self, site: str, score: float) -> int:
        """How many queued calls have a place before ``score`` (where a call kept at that
        place would join)."""


class SurveyStore(Protocol):
    """The question after the call (gateway/core/survey.py): who was asked it by text, and
    each site's tallies (durable)."""

    async def set_survey_asked(
        self, site: str, number: str, call_id: str, now: float, ttl_s: float
    ) -> None:
        """``number`` was asked about ``call_id``: its next texted score answers it."""

    async def survey_asked(self, site: str, number: str, now: float) -> str | None:
        """The call ``number`` was last asked about, while its question is open."""

    async def clear_survey_asked(self, site: str, number: str, call_id: str) -> None:
        """Answered: ``number`` is asked about nothing (unless since asked about another)."""

    async def add_to_tally(self, site: str, subjects: Sequence[str], group: str) -> None:
        """One more answer in ``group`` for each subject (``agent:{id}``, ``branch:{id}``)."""

    async def tallies(self, site: str) -> dict[str, dict[str, int]]:
        """Every subject's count per group."""


class ExperimentStore(Protocol):
    """Each site's running routing experiment, as JSON (gateway/services/experiments.py);
    durable."""

    async def replace_experiment(self, site: str, expected: str | None, data: str) -> bool:
        """Store ``data`` as the site's experiment if the stored one is still ``expected``
        (None: none yet); False if another node changed it first."""

    async def experiment(self, site: str) -> str | None: ...


class TextConsentStore(Protocol):
    """The numbers that texted STOP to a site: no text of ours goes to them (durable)."""

    async def set_text_opt_out(self, site: str, number: str, opted_out: bool) -> None: ...

    async def text_opted_out(self, site: str, number: str) -> bool: ...


class CoordinationPrimitives(Protocol):
    """Coordination between nodes, by key: agent reservations, rate-limit hits, quotas,
    leased slots, counters and once-only claims. Callers outside gateway/store use the
    named methods of ``CoordinationStore`` (gateway/store/coordination.py), which own the
    key names; these primitives take keys and are what each backend implements.

    Quotas, slots, counters and claims survive a restart of the store: a restart must not
    reset a limit or allow a second dial."""

    async def reserve_agent(self, site: str, agent_id: str, call_id: str, ttl_s: float) -> bool:
        """Atomically claim an agent for one call; False if another call holds them."""

    async def reserve_first(
        self, site: str, agent_ids: Sequence[str], call_id: str, ttl_s: float
    ) -> str | None:
        """``reserve_agent`` for each of ``agent_ids`` in order, in one step, stopping at the
        first that succeeds: that agent's id, or None if every one is held by another call."""

    async def extend_reservation(
        self, site: str, agent_id: str, call_id: str, ttl_s: float
    ) -> bool:
        """Keep the claim for ``ttl_s`` more, only if ``call_id`` still holds it."""

    async def release_agent(self, site: str, agent_id: str, call_id: str) -> None:
        """Release the claim, only if ``call_id`` still holds it."""

    async def hit(self, key: str, window_s: int, limit: int, now: float) -> bool:
        """Count one event in the fixed window containing ``now``; False past ``limit``."""

    async def take_quotas(self, quotas: Sequence[Quota], event_id: str, now: float) -> int | None:
        """Atomically across all quotas: if every one has room at ``now``, record the event in
        each (counting mode: member ``event_id``; distinct mode: ``quota.member``; score
        ``now``) and return None; otherwise record nothing and return the index of the first
        full quota. An entry older than ``now - window_s`` no longer counts (and is purged).
        A member already in a quota's window passes it, in either mode, so retrying the same
        ``event_id`` is not counted twice."""

    async def acquire_slot(
        self, key: str, holder: str, limit: int, ttl_s: float, now: float
    ) -> bool:
        """A counting semaphore with leases: drop leases ended by ``now``; a holder that has a
        slot renews it to ``now + ttl_s`` (True); a new holder gets one while fewer than
        ``limit`` are held (True); otherwise False."""

    async def release_slot(self, key: str, holder: str) -> None: ...

    async def slot_holders(self, key: str, now: float) -> list[str]:
        """The holders whose leases have not ended by ``now``."""

    async def add_to_counter(self, key: str, delta: int, ttl_s: int) -> int:
        """Add ``delta`` (0 reads, creating nothing) and return the new value; the counter
        expires ``ttl_s`` after it was created, then starts again from 0."""

    async def claim_once(self, key: str, ttl_s: float) -> bool:
        """True for the first caller only, until ``ttl_s`` has passed (an idempotency key)."""


OpenCallbackKind = Literal["visitor", "number"]


class CoordinationStore(CoordinationPrimitives, Protocol):
    """The primitives plus one method per use, each naming its own keys (the stored key
    strings are part of a running cluster's data: they never change)."""

    async def hit_start_limit(
        self, site: str, visitor_id: str, window_s: int, limit: int, now: float
    ) -> bool:
        """Count a visitor's call start (``hit``)."""

    async def hit_session_limit(
        self, client_ip: str, window_s: int, limit: int, now: float
    ) -> bool:
        """Count a visitor session opened from an address (``hit``)."""

    async def acquire_open_callback_slot(
        self,
        site: str,
        kind: OpenCallbackKind,
        subject: str,
        call_id: str,
        ttl_s: float,
        now: float,
    ) -> bool:
        """The one open callback a visitor (``subject`` a visitor id) or a number (an E.164
        number) may have at a time, held by ``call_id``."""

    async def release_open_callback_slot(
        self, site: str, kind: OpenCallbackKind, subject: str, call_id: str
    ) -> None: ...

    async def open_callback_holder(
        self, site: str, kind: OpenCallbackKind, subject: str, now: float
    ) -> str | None:
        """The call holding the visitor's or the number's open callback slot, if any."""

    async def acquire_outbound_line(
        self, site: str, call_id: str, limit: int, ttl_s: float, now: float
    ) -> bool:
        """One of the site's ``limit`` concurrent outbound lines, held by ``call_id``."""

    async def release_outbound_line(self, site: str, call_id: str) -> None: ...

    async def add_spend(self, site: str, now: float, delta: int, ttl_s: int) -> int:
        """Add ``delta`` (0 reads) to the site's spend of the UTC day containing ``now``."""

    async def take_callback_quotas(
        self,
        specs: Sequence[QuotaSpec],
        site: str,
        subjects: Mapping[Subject, str],
        event_id: str,
        now: float,
    ) -> int | None:
        """``take_quotas`` for the callback quotas ``specs`` describe, their keys made here."""

    async def claim_dial_once(self, idempotency_key: str, ttl_s: float) -> bool:
        """True for the first caller only: one dial per dial attempt's idempotency key."""

    async def hit_stranger_reply_limit(
        self, number: str, window_s: int, limit: int, now: float
    ) -> bool:
        """Count a reply to a number that is no agent's (``hit``): each costs an SMS."""

    async def claim_message_once(self, account_sid: str, message_sid: str, ttl_s: float) -> bool:
        """True for the first caller only: an inbound message (SMS) is acted on once, however
        often its webhook is delivered."""

    async def claim_webhook_once(self, site: str, what: str, ttl_s: float) -> bool:
        """True for the first caller only: a presence webhook's event id (``what``,
        ``event:<id>``) is accepted once per site."""


class PresenceAndEvents(PresenceStore, EventBus, Protocol):
    """What the presence service uses: devices, and events to publish their changes."""


class Store(
    StoreLifecycle,
    PresenceStore,
    EventBus,
    CallRecordStore,
    TimerStore,
    CallbackQueueStore,
    TextConsentStore,
    ExperimentStore,
    SurveyStore,
    CoordinationStore,
    Protocol,
):
    """Every role: what a backend implements (the embedded store and the Redis store).

    Every method but ``start`` and ``close`` raises ``StoreUnavailable`` when the backend
    fails (unreachable, timing out, locked, unreadable), never the backend's own error
    (``failures_become_unavailable``)."""


# --- shared encoding of presence records (both stores keep devices as JSON) ----------------

CALL_FIELD = "~call"
STATUS_FIELD = "~status"
REV_FIELD = "~rev"


def encode_device(device: Device) -> str:
    return json.dumps(
        {
            "device_id": device.device_id,
            "kind": device.kind.value,
            "state": device.state.value,
            "priority": device.priority,
            "last_seen": device.last_seen,
            "expires_at": device.expires_at,
        },
        separators=(",", ":"),
    )


def decode_device(raw: str | bytes) -> Device:
    d = json.loads(raw)
    return Device(
        device_id=d["device_id"],
        kind=DeviceKind(d["kind"]),
        state=DeviceState(d["state"]),
        priority=int(d["priority"]),
        last_seen=float(d["last_seen"]),
        expires_at=float(d["expires_at"]),
    )


def encode_status(status: PresenceStatus, since: float, idle_since: float) -> str:
    return orjson.dumps([status.value, since, idle_since]).decode()


def record_from_fields(fields: dict[str, str]) -> PresenceRecord:
    """A presence record from a hash of device id -> device JSON plus bookkeeping fields."""
    devices = tuple(
        sorted(
            (decode_device(v) for k, v in fields.items() if not k.startswith("~")),
            key=lambda d: d.device_id,
        )
    )
    status, since, idle_since = PresenceStatus.OFFLINE, 0.0, 0.0
    if STATUS_FIELD in fields:
        raw_status, since, idle_since = json.loads(fields[STATUS_FIELD])
        status = PresenceStatus(raw_status)
    return PresenceRecord(
        devices=devices,
        active_call=fields.get(CALL_FIELD) or None,
        status=status,
        since=since,
        idle_since=idle_since,
        rev=int(fields.get(REV_FIELD, 0)),
    )
