"""A local stand-in for Twilio Programmable Voice: the Calls REST API, call progress,
signed webhooks, TwiML execution, simulated phones and bidirectional Media Streams.

See README.md in this directory for how each behaviour maps to tests/twilio_sim/spec/.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from .audio import FRAME_BYTES, AudioSource
from .contract import (
    API_VERSION,
    CALL_PATH,
    GENERIC_CALLS_ERROR,
    TIMEOUT_MAX,
    Contract,
    ContractViolation,
    TwilioApiError,
    check_call_resource,
    check_list_page,
    format_nanp,
    is_absolute_url,
    is_phone_number,
)
from .interactive import Room, check_node, run_conference, run_gather
from .messaging import Messaging
from .records import (
    CANCELED,
    FINAL_STATUSES,
    CallRecord,
    ConferenceRecord,
    Notification,
    PhoneConfig,
    StatusChange,
    StreamRecord,
    VerbRecord,
    WebhookRecord,
)
from .signature import SIGNATURE_HEADER, sdk_signature
from .twiml import (
    DIAL_NOUNS,
    KNOWN_UNSIMULATED_VERBS,
    Document,
    Node,
    TwimlError,
    parse,
)

log = logging.getLogger("twilio_sim")

_T = TypeVar("_T")
Next: TypeAlias = Document | Literal["hangup"] | None

QUEUE_TIME = 0.1  # simulated seconds between the REST create and "initiated"
WEBHOOK_TIMEOUT = 15.0  # real seconds; Twilio's own limit for call-processing requests
TWIML_CONTENT_TYPES = frozenset({"text/xml", "application/xml", "text/html"})
PRICE_PER_MINUTE = 0.013
MAX_CATCH_UP_FRAMES = 10


def new_sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def rfc2822(dt: datetime) -> str:
    return format_datetime(dt.astimezone(UTC).replace(microsecond=0))


def _int_attr(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _first(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


class CallInterrupted(Exception):
    """Raised inside a call's task when something outside the TwiML flow ends or redirects it.

    Reasons: ``canceled`` (REST cancel before answer), ``api-completed`` (REST Status=completed),
    ``redirect`` (REST Url/Twiml), ``callee-hangup`` (the phone hung up), ``time-limit``,
    ``parent-hangup`` (the parent leg of a <Dial> ended).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Webhook:
    kind: str
    url: str
    method: str
    params: list[tuple[str, str]]


@dataclass
class _Redirect:
    url: str | None
    method: str
    twiml: str | None


@dataclass
class _Mark:
    name: str


class _Call:
    """Runtime state of one call leg (the public view is ``record``)."""

    def __init__(self, sim: TwilioSim, record: CallRecord, phone: PhoneConfig) -> None:
        self.sim = sim
        self.record = record
        self.phone = phone
        self.parent: _Call | None = None
        self.url: str | None = None
        self.method = "POST"
        self.twiml: str | None = None
        self.fallback_url: str | None = None
        self.fallback_method = "POST"
        self.status_callback: str | None = None
        self.status_callback_method = "POST"
        self.events: frozenset[str] = frozenset({"completed"})
        self.timeout = 60
        self.time_limit: int | None = None
        self.machine_detection: str | None = None
        self.amd_timeout = 30
        self.async_amd = False
        self.amd_callback: str | None = None
        self.amd_callback_method = "POST"
        self.record_call = False
        self.whisper_url: str | None = None
        self.whisper_method = "POST"
        self.seq = 0
        self.answered = False
        self.bridge_ready = False
        self.answer_at: float | None = None
        self.created_at = 0.0
        self.initiated_at: float | None = None
        self.interrupt: str | None = None
        self.redirect: _Redirect | None = None
        self.hangup_at: float | None = None
        self.limit_at: float | None = None
        self.stream_state: _StreamState | None = None
        self.queue: asyncio.Queue[_Webhook | None] = asyncio.Queue()
        self.lifecycle_done = False
        self.webhooks_done = False
        self.aux_tasks: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()

    @property
    def ended(self) -> bool:
        return self.record.status in FINAL_STATUSES

    def poke(self) -> None:
        self._wakeup.set()

    def interrupt_with(self, reason: str) -> None:
        if reason == "redirect":
            if self.interrupt is None:
                self.interrupt = reason
        elif self.interrupt in (None, "redirect"):
            self.interrupt = reason
        self.poke()

    def check(self) -> None:
        now = asyncio.get_running_loop().time()
        if self.interrupt is None:
            if self.hangup_at is not None and now >= self.hangup_at:
                self.interrupt = "callee-hangup"
            elif self.limit_at is not None and now >= self.limit_at:
                self.interrupt = "time-limit"
        if self.interrupt is not None:
            raise CallInterrupted(self.interrupt)

    async def wait_until(
        self,
        cond: Callable[[], bool] | None = None,
        *,
        delay: float | None = None,
        until: float | None = None,
    ) -> bool:
        """Wait for ``cond`` (True), for ``delay`` simulated seconds or the loop time ``until``
        (False), raising :class:`CallInterrupted` if the call is interrupted meanwhile."""
        loop = asyncio.get_running_loop()
        end = until
        if delay is not None:
            d_end = loop.time() + self.sim.scaled(delay)
            end = d_end if end is None else min(end, d_end)
        while True:
            self.check()
            if cond is not None and cond():
                return True
            now = loop.time()
            if end is not None and now >= end:
                return False
            targets = [t for t in (end, self.hangup_at, self.limit_at) if t is not None]
            timeout = max(0.0, min(targets) - now) if targets else None
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()


class _StreamState:
    def __init__(
        self,
        call: _Call,
        record: StreamRecord,
        ws: aiohttp.ClientWebSocketResponse,
        source: AudioSource,
    ) -> None:
        self.call = call
        self.record = record
        self.ws = ws
        self.source = source
        self.seq = 0
        self.playout: deque[bytes | _Mark] = deque()
        self.clear_requested = False
        self.app_closed = False
        self.twilio_closing = False
        self.dirty = False
        self.dtmf: deque[str] = deque()


class TwilioSim:
    """Local Twilio stand-in.  ``await start()``, point the SDK at ``base_url``, ``await close()``.

    ``time_scale`` multiplies every simulated delay (ringing, answering, <Pause>, hangups,
    timeouts); durations and timestamps the simulator reports are in simulated seconds.
    Media Stream frames are paced in real time (``media_interval``, 20 ms).
    """

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        account_sid: str | None = None,
        auth_token: str | None = None,
        contract: Contract | None = None,
        media_interval: float = 0.020,
        default_answer_after: float = 1.0,
        host: str = "127.0.0.1",
        webhook_ca: Path | None = None,
    ) -> None:
        """``webhook_ca``: the certificate authority whose certificates the webhooks' https
        servers present (Twilio checks them against the public ones; a test has its own)."""
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.time_scale = time_scale
        self.account_sid = account_sid or new_sid("AC")
        self.auth_token = auth_token or secrets.token_hex(16)
        self.contract = contract or Contract()
        self.media_interval = media_interval
        self.default_answer_after = default_answer_after
        self.host = host
        self._webhook_ca = webhook_ca
        self.phones: dict[str, PhoneConfig] = {}
        self.contract_violations: list[str] = []
        self.rooms: dict[str, Room] = {}
        self.conferences: list[ConferenceRecord] = []
        """Every ``<Conference>`` room, in the order they started."""
        self._calls: dict[str, _Call] = {}
        self._order: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._waiters: list[tuple[Callable[[], object], asyncio.Future[object]]] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._epoch = datetime.now(UTC).replace(microsecond=0)
        self._t0: float | None = None
        self._closed = False
        self.base_url = ""
        self.port = 0
        self.messaging = Messaging(self)
        """Inbound SMS and the Messages resource (messaging.py)."""

    # ================================================================ lifecycle

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("TwilioSim already started")
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        app = web.Application(middlewares=[self._error_middleware])
        calls = "/2010-04-01/Accounts/{account_sid}/Calls.json"
        call = "/2010-04-01/Accounts/{account_sid}/Calls/{sid}.json"
        app.router.add_post(calls, self._create_call)
        app.router.add_get(calls, self._list_calls)
        app.router.add_get(call, self._fetch_call)
        app.router.add_post(call, self._update_call)
        app.router.add_delete(call, self._delete_call)
        self.messaging.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.base_url = f"http://{self.host}:{self.port}"
        tls = ssl.create_default_context(cafile=str(self._webhook_ca)) if self._webhook_ca else True
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT),
            connector=aiohttp.TCPConnector(ssl=tls),
        )

    async def close(self) -> None:
        """Stop everything: cancels and awaits every task the simulator started.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> TwilioSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._closed:
            coro.close()
            raise RuntimeError("TwilioSim is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("twilio_sim task %s failed", task.get_name(), exc_info=task.exception())

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("TwilioSim not started")
        return self._session

    # ================================================================ time

    def scaled(self, sim_seconds: float) -> float:
        return sim_seconds * self.time_scale

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def now(self) -> datetime:
        """The simulated wall clock (advances 1/time_scale times faster than real time)."""
        if self._t0 is None:
            return self._epoch
        return self._epoch + timedelta(seconds=(self._loop_time() - self._t0) / self.time_scale)

    def _sim_elapsed(self, since: float) -> int:
        return round((self._loop_time() - since) / self.time_scale)

    # ================================================================ public test API

    def phone(
        self,
        number: str,
        *,
        answer_after: float | None = None,
        ring_after: float = 0.2,
        busy: bool = False,
        no_answer: bool = False,
        fail: bool = False,
        voicemail: bool = False,
        hangup_after: float | None = None,
        tone_hz: float | None = None,
        audio: AudioSource | None = None,
        amd_result: str | None = None,
        amd_after: float | None = None,
        greeting_length: float = 4.0,
        press: str | None = None,
        press_after: float = 1.0,
    ) -> PhoneConfig:
        """Configure the simulated phone reached at ``number`` (times in simulated seconds)."""
        cfg = PhoneConfig(
            number=number,
            answer_after=self.default_answer_after if answer_after is None else answer_after,
            ring_after=ring_after,
            busy=busy,
            no_answer=no_answer,
            fail=fail,
            voicemail=voicemail,
            hangup_after=hangup_after,
            tone_hz=tone_hz,
            audio=audio,
            amd_result=amd_result,
            amd_after=amd_after,
            greeting_length=greeting_length,
            press=press,
            press_after=press_after,
        )
        self.phones[number] = cfg
        return cfg

    def phone_for(self, number: str) -> PhoneConfig:
        cfg = self.phones.get(number)
        if cfg is None:
            cfg = PhoneConfig(number=number, answer_after=self.default_answer_after)
        return cfg

    @property
    def calls(self) -> list[CallRecord]:
        """Every call leg in creation order (REST calls and <Dial> child legs)."""
        return [self._calls[sid].record for sid in self._order]

    def call(self, sid: str) -> CallRecord:
        return self._calls[sid].record

    def conference(self, name: str) -> ConferenceRecord | None:
        """The latest room named ``name``."""
        return next((r for r in reversed(self.conferences) if r.name == name), None)

    def new_conference_sid(self) -> str:
        return new_sid("CF")

    def hangup(self, call_sid: str) -> None:
        """The simulated phone on ``call_sid`` hangs up now."""
        c = self._calls[call_sid]
        if c.answered and not c.ended:
            c.interrupt_with("callee-hangup")

    def send_dtmf(self, call_sid: str, digits: str) -> None:
        """The phone presses keys; sent as ``dtmf`` messages on the call's active stream."""
        c = self._calls[call_sid]
        if c.stream_state is None:
            raise RuntimeError(f"call {call_sid} has no active media stream")
        c.stream_state.dtmf.extend(digits)
        c.stream_state.dirty = True
        c.poke()

    async def inbound_call(
        self,
        from_: str,
        to: str,
        url: str,
        *,
        method: str = "POST",
        status_callback: str | None = None,
        status_callback_method: str = "POST",
    ) -> CallRecord:
        """A phone (``from_``, configured with :meth:`phone`) calls the Twilio number ``to``
        whose voice webhook is ``url``."""
        now = self.now()
        rec = CallRecord(
            sid=new_sid("CA"),
            account_sid=self.account_sid,
            direction="inbound",
            to=to,
            from_=from_,
            params={"Url": [url], "Method": [method]},
            date_created=now,
            date_updated=now,
            start_time=now,
        )
        c = _Call(self, rec, self.phone_for(from_))
        c.url, c.method = url, method
        c.status_callback, c.status_callback_method = status_callback, status_callback_method
        self._register(c)
        self._set_status(c, "ringing", "ringing")
        self._spawn(self._run_inbound(c), f"twilio-sim-call-{rec.sid}")
        self._spawn(self._webhook_sender(c), f"twilio-sim-webhooks-{rec.sid}")
        return rec

    async def wait_until(
        self,
        predicate: Callable[[], _T | None],
        *,
        timeout: float = 5.0,
        what: str = "condition",
    ) -> _T:
        """Resolve with the predicate's first value that is not None/False (re-checked on every
        simulator state change).  ``timeout`` is in real seconds."""
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        entry: tuple[Callable[[], object], asyncio.Future[object]] = (predicate, fut)
        self._waiters.append(entry)
        self._check_waiter(entry)
        try:
            async with asyncio.timeout(timeout):
                result = await fut
        except TimeoutError:
            raise TimeoutError(
                f"twilio_sim: timed out after {timeout}s waiting for {what}; calls: "
                + "; ".join(f"{r.sid} to={r.to} statuses={r.statuses}" for r in self.calls)
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        return result  # type: ignore[return-value]

    async def wait_for_call(
        self,
        *,
        to: str | None = None,
        sid: str | None = None,
        status: str | None = None,
        timeout: float = 5.0,
    ) -> CallRecord:
        """A call matching ``to``/``sid`` that reached ``status`` (any value of
        :attr:`CallRecord.statuses`, or ``"ended"`` for any final status).  For final statuses
        this also waits until every webhook of the call has been delivered."""

        def find() -> CallRecord | None:
            for r in self.calls:
                if to is not None and r.to != to:
                    continue
                if sid is not None and r.sid != sid:
                    continue
                if status is None:
                    return r
                if status == "ended":
                    if r.finished:
                        return r
                    continue
                if status in r.statuses and (status not in FINAL_STATUSES or r.finished):
                    return r
            return None

        return await self.wait_until(
            find, timeout=timeout, what=f"call to={to} sid={sid} status={status}"
        )

    async def wait_for_webhook(
        self,
        call_sid: str,
        kind: str = "status",
        *,
        timeout: float = 5.0,
        **params: str,
    ) -> WebhookRecord:
        """A delivered webhook of ``kind`` on ``call_sid`` whose parameters include ``params``."""

        def find() -> WebhookRecord | None:
            for w in self._calls[call_sid].record.webhooks:
                if w.kind != kind or (w.status is None and w.error is None):
                    continue
                if all(w.param(k) == v for k, v in params.items()):
                    return w
            return None

        return await self.wait_until(find, timeout=timeout, what=f"{kind} webhook {params}")

    async def wait_for_stream(
        self,
        call_sid: str,
        *,
        timeout: float = 5.0,
    ) -> StreamRecord:
        """The call's media stream, once ``connected`` and ``start`` have been sent."""

        def find() -> StreamRecord | None:
            s = self._calls[call_sid].record.stream
            return s if s is not None and s.started else None

        return await self.wait_until(find, timeout=timeout, what=f"stream on {call_sid}")

    async def wait_for_audio(
        self,
        call_sid: str,
        nbytes: int,
        *,
        timeout: float = 5.0,
    ) -> StreamRecord:
        """The call's stream once the app has sent at least ``nbytes`` of mu-law audio."""

        def find() -> StreamRecord | None:
            s = self._calls[call_sid].record.stream
            return s if s is not None and len(s.audio_received) >= nbytes else None

        return await self.wait_until(find, timeout=timeout, what=f"{nbytes} B of audio")

    # ================================================================ change notification

    def _check_waiter(self, entry: tuple[Callable[[], object], asyncio.Future[object]]) -> None:
        predicate, fut = entry
        if fut.done():
            return
        try:
            value = predicate()
        except Exception as exc:  # a broken predicate fails its waiter, not the simulator
            fut.set_exception(exc)
            return
        if value is not None and value is not False:
            fut.set_result(value)

    def _notify(self) -> None:
        for entry in list(self._waiters):
            self._check_waiter(entry)

    # ================================================================ REST: plumbing

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except TwilioApiError as exc:
            return self._error_response(exc)
        except ContractViolation as exc:
            self.contract_violations.append(str(exc))
            log.error("twilio_sim contract violation: %s", exc)
            return self._error_response(TwilioApiError(500, 20500, f"simulator bug: {exc}"))
        except web.HTTPException as exc:
            if exc.status == 404:
                return self._error_response(
                    TwilioApiError(
                        404, 20404, f"The requested resource {request.path} was not found"
                    )
                )
            if exc.status == 405:
                return self._error_response(TwilioApiError(405, 20004, "Method not allowed"))
            raise

    def _error_response(self, exc: TwilioApiError) -> web.Response:
        headers = {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
        return web.json_response(exc.body(), status=exc.status, headers=headers)

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        try:
            creds = aiohttp.BasicAuth.decode(header) if header else None
        except ValueError:
            creds = None
        if (
            creds is None
            or not hmac.compare_digest(creds.login, self.account_sid)
            or not hmac.compare_digest(creds.password, self.auth_token)
        ):
            raise TwilioApiError(401, 20003, "Authentication Error - invalid username")
        account = request.match_info["account_sid"]
        if not self.contract.check_path_sid("AccountSid", account):
            raise TwilioApiError(404, 20404, f"The requested resource {request.path} was not found")
        if account != self.account_sid:
            raise TwilioApiError(401, 20003, "Authentication Error - AccountSid mismatch")

    def _lookup(self, request: web.Request) -> _Call:
        sid = request.match_info["sid"]
        c = self._calls.get(sid)
        if not self.contract.check_path_sid("Sid", sid) or c is None or c.record.deleted:
            raise TwilioApiError(404, 20404, f"The requested resource {request.path} was not found")
        return c

    @staticmethod
    async def _form(request: web.Request) -> dict[str, list[str]]:
        if request.content_type != "application/x-www-form-urlencoded":
            return {}
        data = await request.post()
        out: dict[str, list[str]] = {}
        for k, v in data.items():
            if isinstance(v, str):
                out.setdefault(k, []).append(v)
        return out

    def _resource(self, c: _Call) -> dict[str, object]:
        r = c.record
        uri = CALL_PATH.replace("{AccountSid}", r.account_sid).replace("{Sid}", r.sid)
        subresources = {
            name: tmpl.replace("{account_sid}", r.account_sid).replace("{call_sid}", r.sid)
            for name, tmpl in self.contract.subresources.items()
        }
        price: str | None = None
        if r.status == "completed" and r.duration is not None:
            minutes = max(1, math.ceil(r.duration / 60))
            price = f"-{PRICE_PER_MINUTE * minutes:.5f}"
        queue_ms = 0
        if c.initiated_at is not None:
            queue_ms = round((c.initiated_at - c.created_at) / self.time_scale * 1000)
        pn: str | None = None
        if is_phone_number(r.from_) and r.direction != "outbound-dial":
            pn = "PN" + hashlib.md5(r.from_.encode()).hexdigest()
        obj: dict[str, object] = {
            "account_sid": r.account_sid,
            "answered_by": r.answered_by,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": rfc2822(r.date_created) if r.date_created else None,
            "date_updated": rfc2822(r.date_updated) if r.date_updated else None,
            "direction": r.direction,
            "duration": str(r.duration) if r.duration is not None else None,
            "end_time": rfc2822(r.end_time) if r.end_time else None,
            "forwarded_from": None,
            "from": r.from_,
            "from_formatted": format_nanp(r.from_),
            "group_sid": None,
            "parent_call_sid": r.parent_sid,
            "phone_number_sid": pn,
            "price": price,
            "price_unit": "USD",
            "queue_time": str(queue_ms),
            "sid": r.sid,
            "start_time": rfc2822(r.start_time) if r.start_time else None,
            "status": r.status,
            "subresource_uris": subresources,
            "to": r.to,
            "to_formatted": format_nanp(r.to),
            "trunk_sid": None,
            "uri": uri,
        }
        check_call_resource(self.contract, obj)
        return obj

    # ================================================================ REST: handlers

    async def _create_call(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        form = await self._form(request)
        contract = self.contract
        if not _first(form, "To"):
            raise TwilioApiError(400, 21201, "No 'To' number is specified")
        if not _first(form, "From"):
            raise TwilioApiError(400, 21213, "No 'From' number is specified")
        params = contract.validate_form(contract.create_params, form)
        to = params["To"][0]
        from_ = params["From"][0]
        if is_phone_number(to) and not is_phone_number(from_):
            raise TwilioApiError(
                400, 21212, "If 'To' is a phone number, 'From' must also be a phone number"
            )
        if to == from_:
            raise TwilioApiError(400, 21211, "'To' and 'From' must be different")
        if "ApplicationSid" in params:
            raise TwilioApiError(
                400, 21218, "ApplicationSid not found (the simulator has no Applications)"
            )
        url = _first(params, "Url")
        twiml = _first(params, "Twiml")
        if url is None and twiml is None:
            raise TwilioApiError(400, 21205, "Url parameter is required (or Twiml/ApplicationSid)")
        if url is not None:
            twiml = None  # "If both `twiml` and `url` are provided then `twiml` ... ignored"
        if twiml is not None:
            self._check_inline_twiml(twiml)

        now = self.now()
        rec = CallRecord(
            sid=new_sid("CA"),
            account_sid=self.account_sid,
            direction="outbound-api",
            to=to,
            from_=from_,
            params=params,
            date_created=now,
            date_updated=now,
        )
        c = _Call(self, rec, self.phone_for(to))
        c.url, c.twiml = url, twiml
        c.method = _first(params, "Method") or "POST"
        c.fallback_url = _first(params, "FallbackUrl")
        c.fallback_method = _first(params, "FallbackMethod") or "POST"
        c.status_callback = _first(params, "StatusCallback")
        c.status_callback_method = _first(params, "StatusCallbackMethod") or "POST"
        if "StatusCallbackEvent" in params:
            c.events = frozenset(params["StatusCallbackEvent"])
        c.timeout = min(int(_first(params, "Timeout") or 60), TIMEOUT_MAX)
        tl = _first(params, "TimeLimit")
        c.time_limit = int(tl) if tl else None
        md = _first(params, "MachineDetection")
        if md is not None and "SendDigits" in params:
            rec.notifications.append(
                Notification(0, "MachineDetection ignored because SendDigits is set", "warning")
            )
            md = None
        c.machine_detection = md
        c.amd_timeout = int(_first(params, "MachineDetectionTimeout") or 30)
        c.async_amd = (_first(params, "AsyncAmd") or "false") == "true"
        c.amd_callback = _first(params, "AsyncAmdStatusCallback")
        c.amd_callback_method = _first(params, "AsyncAmdStatusCallbackMethod") or "POST"
        c.record_call = (_first(params, "Record") or "false").lower() == "true"
        self._register(c)
        self._set_status(c, "queued", "queued")
        self._spawn(self._run_outbound(c), f"twilio-sim-call-{rec.sid}")
        self._spawn(self._webhook_sender(c), f"twilio-sim-webhooks-{rec.sid}")
        return web.json_response(self._resource(c), status=201)

    def _check_inline_twiml(self, twiml: str) -> None:
        if len(twiml) > self.contract.twiml_max_chars:
            raise TwilioApiError(
                400,
                GENERIC_CALLS_ERROR,
                f"Twiml is longer than {self.contract.twiml_max_chars} characters",
            )
        try:
            parse(twiml)
        except TwimlError as exc:
            raise TwilioApiError(400, exc.code, f"Invalid Twiml: {exc.message}") from exc

    async def _fetch_call(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        return web.json_response(self._resource(self._lookup(request)))

    async def _update_call(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        c = self._lookup(request)
        form = await self._form(request)
        params = self.contract.validate_form(self.contract.update_params, form)
        c.record.rest_updates.append(params)
        url = _first(params, "Url")
        twiml = _first(params, "Twiml")
        status = _first(params, "Status")
        if url is not None and twiml is not None:
            raise TwilioApiError(
                400, GENERIC_CALLS_ERROR, "Twiml and Url parameters are mutually exclusive"
            )
        if twiml is not None:
            self._check_inline_twiml(twiml)
        if c.ended and (url is not None or twiml is not None):
            raise TwilioApiError(400, 21220, "Call is not in-progress. Cannot redirect.")
        for name, attr in (
            ("Method", "method"),
            ("FallbackUrl", "fallback_url"),
            ("FallbackMethod", "fallback_method"),
            ("StatusCallback", "status_callback"),
            ("StatusCallbackMethod", "status_callback_method"),
        ):
            value = _first(params, name)
            if value is not None:
                setattr(c, attr, value)
        tl = _first(params, "TimeLimit")
        if tl is not None:
            c.time_limit = int(tl)
            if c.answer_at is not None:
                c.limit_at = c.answer_at + self.scaled(int(tl))
                c.poke()
        if not c.ended:
            if status == "canceled" and c.record.status in ("queued", "ringing"):
                self._finish(c, "canceled", 487)
                c.interrupt_with("canceled")
            elif status == "completed":
                if c.answered:
                    self._finish(c, "completed", 200)
                    c.interrupt_with("api-completed")
                else:
                    self._finish(c, "canceled", 487)
                    c.interrupt_with("canceled")
            elif url is not None or twiml is not None:
                if c.answered:
                    c.redirect = _Redirect(url=url, method=c.method, twiml=twiml)
                    c.interrupt_with("redirect")
                else:
                    c.url, c.twiml = url, twiml
        return web.json_response(self._resource(c))

    async def _delete_call(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        c = self._lookup(request)
        if not c.ended:
            raise TwilioApiError(400, GENERIC_CALLS_ERROR, "Cannot delete a call in progress")
        c.record.deleted = True
        return web.Response(status=204)

    async def _list_calls(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        query: dict[str, list[str]] = {}
        for k, v in request.query.items():
            query.setdefault(k, []).append(v)
        params = self.contract.validate_form(self.contract.list_params, query)
        size = int(_first(params, "PageSize") or 50)
        page = int(_first(params, "Page") or 0)
        filters = [
            (k, _first(params, k) or "")
            for k in ("To", "From", "ParentCallSid", "Status")
            if _first(params, k) is not None
        ]
        date_filters = [
            (k, (_first(params, k) or "")[:10])
            for k in ("StartTime", "StartTime<", "StartTime>", "EndTime", "EndTime<", "EndTime>")
            if _first(params, k) is not None
        ]

        def keep(c: _Call) -> bool:
            r = c.record
            values = {
                "To": r.to,
                "From": r.from_,
                "ParentCallSid": r.parent_sid,
                "Status": r.status,
            }
            if r.deleted or any(values[k] != v for k, v in filters):
                return False
            for k, day in date_filters:
                t = r.start_time if k.startswith("Start") else r.end_time
                if t is None:
                    return False
                d = t.strftime("%Y-%m-%d")
                if (
                    (k.endswith("<") and not d <= day)
                    or (k.endswith(">") and not d >= day)
                    or (k[-1] not in "<>" and d != day)
                ):
                    return False
            return True

        matching = [self._calls[s] for s in reversed(self._order) if keep(self._calls[s])]
        chunk = matching[page * size : (page + 1) * size]
        base = f"/2010-04-01/Accounts/{self.account_sid}/Calls.json"

        def page_uri(p: int, token: str | None = None) -> str:
            q = [*filters, *date_filters, ("PageSize", str(size)), ("Page", str(p))]
            if token:
                q.append(("PageToken", token))
            return f"{base}?{urlencode(q)}"

        has_next = len(matching) > (page + 1) * size
        body: dict[str, object] = {
            "calls": [self._resource(c) for c in chunk],
            "end": page * size + max(len(chunk) - 1, 0),
            "first_page_uri": page_uri(0),
            "next_page_uri": page_uri(page + 1, "PA" + chunk[-1].record.sid) if has_next else None,
            "page": page,
            "page_size": size,
            "previous_page_uri": page_uri(page - 1, "PB" + chunk[0].record.sid)
            if page > 0 and chunk
            else None,
            "start": page * size,
            "uri": page_uri(page),
        }
        check_list_page(self.contract, body)
        return web.json_response(body)

    # ================================================================ call state

    def _register(self, c: _Call) -> None:
        c.created_at = self._loop_time()
        self._calls[c.record.sid] = c
        self._order.append(c.record.sid)

    def _set_status(self, c: _Call, event_status: str, resource_status: str | None) -> None:
        r = c.record
        now = self.now()
        r.history.append(StatusChange(event_status, now))
        if resource_status is not None:
            r.status = resource_status
        r.date_updated = now
        self._notify()

    def _base_params(self, c: _Call, call_status: str) -> list[tuple[str, str]]:
        r = c.record
        params = [
            ("AccountSid", r.account_sid),
            ("ApiVersion", API_VERSION),
            ("CallSid", r.sid),
            ("CallStatus", call_status),
            ("Called", r.to),
            ("Caller", r.from_),
            ("Direction", r.direction),
            ("From", r.from_),
            ("To", r.to),
        ]
        if r.parent_sid is not None:
            params.append(("ParentCallSid", r.parent_sid))
        return params

    def _voice_status(self, c: _Call) -> str:
        if c.ended:
            return "completed" if c.record.status == "completed" else c.record.status
        return "in-progress" if c.answered else "ringing"

    def _status_callback(
        self, c: _Call, event: str, call_status: str, extra: Sequence[tuple[str, str]] = ()
    ) -> None:
        if c.status_callback is None or event not in c.events:
            return
        params = self._base_params(c, call_status)
        params += [
            ("CallbackSource", "call-progress-events"),
            ("SequenceNumber", str(c.seq)),
            ("Timestamp", rfc2822(self.now())),
        ]
        if c.record.answered_by is not None:
            params.append(("AnsweredBy", c.record.answered_by))
        params += list(extra)
        c.seq += 1
        c.queue.put_nowait(_Webhook("status", c.status_callback, c.status_callback_method, params))

    def _progress(self, c: _Call, event: str) -> None:
        if event == "initiated":
            c.initiated_at = self._loop_time()
            c.record.start_time = self.now()
            self._set_status(c, "initiated", None)
        else:
            self._set_status(c, "ringing", "ringing")
        self._status_callback(c, event, event)

    def _answer(self, c: _Call) -> None:
        c.answered = True
        c.answer_at = self._loop_time()
        c.record.answer_time = self.now()
        if c.phone.hangup_after is not None:
            c.hangup_at = c.answer_at + self.scaled(c.phone.hangup_after)
        if c.time_limit is not None:
            c.limit_at = c.answer_at + self.scaled(c.time_limit)
        self._set_status(c, "in-progress", "in-progress")
        self._status_callback(c, "answered", "in-progress")
        if c.parent is not None:
            c.parent.poke()

    def _finish(self, c: _Call, status: str, sip_code: int) -> None:
        r = c.record
        if r.status in FINAL_STATUSES:
            return
        if c.answer_at is not None:
            duration = self._sim_elapsed(c.answer_at)
        else:
            duration = 0
        if status == "completed":
            r.duration = duration
            r.end_time = self.now()
        r.sip_response_code = sip_code
        self._set_status(c, status, status)
        extra = [
            ("CallDuration", str(duration)),
            ("Duration", str(math.ceil(duration / 60))),
            ("SipResponseCode", str(sip_code)),
        ]
        if c.record_call and status == "completed":
            re_sid = new_sid("RE")
            extra += [
                (
                    "RecordingUrl",
                    f"{self.base_url}/2010-04-01/Accounts/{r.account_sid}/Recordings/{re_sid}",
                ),
                ("RecordingSid", re_sid),
                ("RecordingDuration", str(duration)),
            ]
        self._status_callback(c, "completed", status, extra)
        for t in list(c.aux_tasks):
            t.cancel()
        if c.parent is not None:
            c.parent.poke()

    def _maybe_finished(self, c: _Call) -> None:
        if c.lifecycle_done and c.webhooks_done and not c.record.finished:
            c.record.finished = True
            self._notify()

    # ================================================================ webhooks

    async def _webhook_sender(self, c: _Call) -> None:
        """Delivers a call's asynchronous webhooks (status, AMD, stream status) in order."""
        try:
            while True:
                item = await c.queue.get()
                if item is None:
                    break
                await self._http(c, item.kind, item.url, item.method, item.params)
        finally:
            c.webhooks_done = True
            self._maybe_finished(c)

    async def _http(
        self, c: _Call, kind: str, url: str, method: str, params: Sequence[tuple[str, str]]
    ) -> tuple[WebhookRecord, str]:
        """One signed request to the application; returns its record and content type."""
        params = list(params)
        if method == "GET":
            sep = "&" if urlsplit(url).query else "?"
            target = url + sep + urlencode(params) if params else url
            signature = sdk_signature(self.auth_token, target)
            data: list[tuple[str, str]] | None = None
        else:
            target = url
            signature = sdk_signature(self.auth_token, url, params)
            data = params
        record = WebhookRecord(
            kind=kind, url=url, method=method, params=params, signature=signature, at=self.now()
        )
        c.record.webhooks.append(record)
        headers = {
            SIGNATURE_HEADER: signature,
            "User-Agent": "TwilioProxy/1.1",
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
        }
        content_type = ""
        try:
            async with self.session.request(
                method, URL(target, encoded=True), data=data, headers=headers
            ) as resp:
                record.body = await resp.text()
                record.status = resp.status
                content_type = resp.content_type
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            record.error = CANCELED  # the simulator closing, not the application failing
            raise
        self._notify()
        return record, content_type

    async def _fetch_document(
        self,
        c: _Call,
        url: str,
        method: str,
        kind: str,
        extra: Sequence[tuple[str, str]] = (),
    ) -> Document | None:
        """Request TwiML; on failure try FallbackUrl, else play the application error."""
        params = self._base_params(c, self._voice_status(c)) + list(extra)
        if c.record.answered_by is not None and not any(k == "AnsweredBy" for k, _ in extra):
            params.append(("AnsweredBy", c.record.answered_by))
        record, ctype = await self._http(c, kind, url, method, params)
        error: tuple[int, str] | None = None
        doc: Document | None = None
        if record.error is not None:
            error = (11200, f"HTTP retrieval failure: {record.error}")
        elif record.status is None or not 200 <= record.status < 300:
            error = (11200, f"HTTP retrieval failure: status {record.status}")
        elif ctype not in TWIML_CONTENT_TYPES:
            error = (12300, f"Invalid Content-Type {ctype!r}")
        else:
            try:
                doc = parse(record.body, url)
            except TwimlError as exc:
                error = (exc.code, exc.message)
        if doc is not None:
            c.record.twiml.append(record.body)
            return doc
        assert error is not None
        c.record.notifications.append(Notification(error[0], f"{url}: {error[1]}"))
        if kind == "twiml" and c.fallback_url:
            fb_extra = [*extra, ("ErrorCode", str(error[0])), ("ErrorUrl", url)]
            return await self._fetch_document(
                c, c.fallback_url, c.fallback_method, "fallback", fb_extra
            )
        return None

    def _record_verb(self, c: _Call, verb: VerbRecord) -> None:
        c.record.verbs.append(verb)
        self._notify()

    def _application_error(self, c: _Call) -> None:
        text = "We are sorry, an application error has occurred. Goodbye."
        c.record.said.append(text)
        self._record_verb(c, VerbRecord("Say", {}, text, {"generated": "application-error"}))

    def _inline(self, c: _Call, twiml: str) -> Document | None:
        try:
            doc = parse(twiml)
        except TwimlError as exc:
            c.record.notifications.append(Notification(exc.code, exc.message))
            return None
        c.record.twiml.append(twiml)
        return doc

    # ================================================================ call flows

    async def _run_outbound(self, c: _Call) -> None:
        phone = c.phone
        try:
            try:
                await c.wait_until(delay=QUEUE_TIME)
                self._progress(c, "initiated")
                await c.wait_until(delay=phone.ring_after)
                if phone.fail:
                    self._finish(c, "failed", 404)
                    return
                if phone.busy:
                    self._finish(c, "busy", 486)
                    return
                self._progress(c, "ringing")
                if phone.no_answer or phone.answer_after >= c.timeout:
                    await c.wait_until(delay=c.timeout)
                    self._finish(c, "no-answer", 487)
                    return
                await c.wait_until(delay=phone.answer_after)
            except CallInterrupted:
                self._finish(c, "canceled", 487)
                return
            self._answer(c)
            with contextlib.suppress(CallInterrupted):
                await self._after_answer(c)
            self._finish(c, "completed", 200)
        finally:
            self._lifecycle_end(c)

    def _lifecycle_end(self, c: _Call) -> None:
        c.lifecycle_done = True
        c.queue.put_nowait(None)
        self._maybe_finished(c)

    async def _after_answer(self, c: _Call) -> None:
        extra: list[tuple[str, str]] = []
        mode = c.machine_detection
        try:
            if mode is not None:
                if c.async_amd:
                    task = self._spawn(self._async_amd(c, mode), f"twilio-sim-amd-{c.record.sid}")
                    c.aux_tasks.add(task)
                    task.add_done_callback(c.aux_tasks.discard)
                else:
                    answered_by, took = self._amd(c, mode)
                    await c.wait_until(delay=took)
                    c.record.answered_by = answered_by
                    extra.append(("AnsweredBy", answered_by))
            if c.twiml is not None:
                doc = self._inline(c, c.twiml)
            else:
                assert c.url is not None
                doc = await self._fetch_document(c, c.url, c.method, "twiml", extra)
        except CallInterrupted as exc:
            if exc.reason != "redirect":
                raise
            doc = await self._take_redirect(c)
        if doc is None:
            self._application_error(c)
            return
        await self._run_documents(c, doc)

    async def _take_redirect(self, c: _Call) -> Document | None:
        """Load the document a REST UpdateCall (Url/Twiml) redirected the live call to."""
        target, c.redirect, c.interrupt = c.redirect, None, None
        if target is None:
            return None
        if target.twiml is not None:
            return self._inline(c, target.twiml)
        assert target.url is not None
        return await self._fetch_document(c, target.url, target.method, "redirect")

    def _amd(self, c: _Call, mode: str) -> tuple[str, float]:
        took = c.phone.detection_time(mode)
        if took > c.amd_timeout:
            return "unknown", float(c.amd_timeout)
        return c.phone.answered_by(mode), took

    async def _async_amd(self, c: _Call, mode: str) -> None:
        answered_by, took = self._amd(c, mode)
        await asyncio.sleep(self.scaled(took))
        if c.ended:
            return
        c.record.answered_by = answered_by
        self._notify()
        if c.amd_callback is None:
            c.record.notifications.append(
                Notification(21262, "AsyncAmd result with no AsyncAmdStatusCallback", "warning")
            )
            return
        params = [
            ("AccountSid", c.record.account_sid),
            ("AnsweredBy", answered_by),
            ("CallSid", c.record.sid),
            ("MachineDetectionDuration", str(round(took * 1000))),
        ]
        c.queue.put_nowait(_Webhook("amd", c.amd_callback, c.amd_callback_method, params))

    async def _run_inbound(self, c: _Call) -> None:
        try:
            with contextlib.suppress(CallInterrupted):
                assert c.url is not None
                doc = await self._fetch_document(c, c.url, c.method, "twiml")
                if doc is None:
                    self._application_error(c)
                else:
                    await self._run_documents(c, doc)
            self._finish(c, "completed", 200)
        finally:
            self._lifecycle_end(c)

    async def _run_documents(self, c: _Call, doc: Document | None) -> None:
        while doc is not None:
            try:
                nxt = await self._run_document(c, doc)
                doc = nxt if isinstance(nxt, Document) else None
            except CallInterrupted as exc:
                if exc.reason != "redirect":
                    raise
                doc = await self._take_redirect(c)
                if doc is None:
                    self._application_error(c)

    async def _run_document(self, c: _Call, doc: Document) -> Next:
        for node in doc.verbs:
            if (
                c.record.direction == "inbound"
                and not c.answered
                and node.tag != "Reject"
                and not (node.tag == "Dial" and node.attrs.get("answerOnBridge") == "true")
            ):
                self._answer(c)
            c.check()
            result = await self._run_verb(c, node, doc)
            if result is not None:
                return result
        return None

    def _resolve(self, c: _Call, doc: Document, raw: str | None) -> str | None:
        if not raw:
            return None
        url = urljoin(doc.url or "", raw.strip())
        if not is_absolute_url(url):
            c.record.notifications.append(Notification(11100, f"Invalid URL format: {raw!r}"))
            return None
        return url

    async def _run_verb(self, c: _Call, node: Node, doc: Document) -> Next:
        r = c.record
        tag = node.tag
        if tag == "Gather":
            return await run_gather(self, c, node, doc)
        if tag == "Say":
            check_node(c, node)
            loops = _int_attr(node.attrs.get("loop"), 1)
            r.said.append(node.text)
            self._record_verb(c, VerbRecord("Say", node.attrs, node.text))
            per = max(1.0, 0.4 * len(node.text.split()))
            await c.wait_until(delay=per * loops if loops > 0 else None)
            return None
        if tag == "Play":
            loops = _int_attr(node.attrs.get("loop"), 1)
            digits = node.attrs.get("digits")
            self._record_verb(c, VerbRecord("Play", node.attrs, node.text))
            per = 0.5 * len(digits) if digits else 1.0
            await c.wait_until(delay=per * loops if loops > 0 else None)
            return None
        if tag == "Pause":
            length = max(0, _int_attr(node.attrs.get("length"), 1))
            self._record_verb(c, VerbRecord("Pause", node.attrs, detail={"length": length}))
            await c.wait_until(delay=length)
            return None
        if tag == "Hangup":
            self._record_verb(c, VerbRecord("Hangup", node.attrs))
            return "hangup"
        if tag == "Reject":
            self._record_verb(c, VerbRecord("Reject", node.attrs))
            if not c.answered:
                self._finish(c, "busy", 486 if node.attrs.get("reason") == "busy" else 603)
            return "hangup"
        if tag == "Redirect":
            url = self._resolve(c, doc, node.text)
            self._record_verb(c, VerbRecord("Redirect", node.attrs, node.text, {"url": url}))
            if url is None:
                return "hangup"
            nxt = await self._fetch_document(c, url, node.attrs.get("method", "POST"), "redirect")
            if nxt is None:
                self._application_error(c)
                return "hangup"
            return nxt
        if tag == "Dial":
            return await self._verb_dial(c, node, doc)
        if tag == "Connect":
            return await self._verb_connect(c, node, doc)
        level = "warning" if tag in KNOWN_UNSIMULATED_VERBS else "error"
        self._record_verb(c, VerbRecord(tag, node.attrs, node.text, {"simulated": False}))
        r.notifications.append(Notification(12200, f"<{tag}> is not simulated; skipped", level))
        return None

    # ---------------------------------------------------------------- <Dial>

    async def _verb_dial(self, c: _Call, node: Node, doc: Document) -> Next:
        attrs = node.attrs
        timeout = min(max(_int_attr(attrs.get("timeout"), 30), 5), 600)
        action = self._resolve(c, doc, attrs.get("action"))
        method = attrs.get("method", "POST")
        caller_id = attrs.get("callerId") or c.record.from_
        time_limit = _int_attr(attrs.get("timeLimit"), 14400)
        answer_on_bridge = attrs.get("answerOnBridge", "false").lower() == "true"
        room = node.child("Conference")
        if room is not None:
            return await run_conference(self, c, node, room, doc)
        targets: list[tuple[str, str, dict[str, str]]] = []
        if node.text and not node.children:
            targets.append(("Number", node.text, {}))
        for noun in node.children:
            if noun.tag == "Number":
                targets.append(("Number", noun.text, noun.attrs))
            elif noun.tag == "Client":
                ident = noun.child("Identity")
                name = ident.text if ident is not None else noun.text
                targets.append(("Client", f"client:{name}", noun.attrs))
            elif noun.tag == "Sip":
                targets.append(("Sip", noun.text, noun.attrs))
            else:
                level = "warning" if noun.tag in DIAL_NOUNS else "error"
                c.record.notifications.append(
                    Notification(12200, f"<Dial><{noun.tag}> is not simulated", level)
                )
        verb = VerbRecord(
            "Dial",
            attrs,
            node.text,
            {
                "targets": [t for _, t, _ in targets],
                "answerOnBridge": answer_on_bridge,
                "timeout": timeout,
                "callerId": caller_id,
            },
        )
        self._record_verb(c, verb)
        legs: list[_Call] = []
        for kind, target, noun_attrs in targets:
            if kind == "Number" and not is_phone_number(target):
                c.record.notifications.append(
                    Notification(13223, f"Dial: Invalid phone number format {target!r}")
                )
                continue
            legs.append(self._start_leg(c, target, caller_id, timeout, noun_attrs, doc))
        winner: _Call | None = None
        bridged_at: float | None = None
        try:
            if legs:
                await c.wait_until(
                    lambda: any(g.bridge_ready for g in legs) or all(g.ended for g in legs)
                )
                ready = [g for g in legs if g.bridge_ready and not g.ended]
                winner = min(ready, key=lambda g: g.answer_at or 0.0) if ready else None
                for g in legs:
                    if g is not winner:
                        g.interrupt_with("canceled" if not g.answered else "parent-hangup")
            if winner is not None:
                if not c.answered:  # inbound call with answerOnBridge
                    self._answer(c)
                bridged_at = self._loop_time()
                verb.detail["bridged_to"] = winner.record.sid
                self._notify()  # a state change tests wait for, as a status is
                limit = bridged_at + self.scaled(time_limit)
                done = await c.wait_until(lambda: winner is not None and winner.ended, until=limit)
                if not done:
                    winner.interrupt_with("time-limit")
                dial_status = "completed"
            else:
                statuses = [g.record.status for g in legs]
                dial_status = next(
                    (s for s in ("busy", "no-answer", "canceled") if s in statuses), "failed"
                )
        except CallInterrupted as exc:
            for g in legs:
                g.interrupt_with("parent-hangup" if g.answered else "canceled")
            if action is not None:
                status = "completed" if winner is not None else "canceled"
                params = self._dial_params(legs, winner, status, bridged_at)
                if exc.reason != "redirect":
                    self._finish(c, "completed", 200)
                await self._fetch_document(c, action, method, "action", params)
            raise
        verb.detail["DialCallStatus"] = dial_status
        self._notify()
        if action is None:
            return None
        params = self._dial_params(legs, winner, dial_status, bridged_at)
        nxt = await self._fetch_document(c, action, method, "action", params)
        if nxt is None:
            self._application_error(c)
            return "hangup"
        return nxt

    def _dial_params(
        self, legs: list[_Call], winner: _Call | None, status: str, bridged_at: float | None
    ) -> list[tuple[str, str]]:
        params = [("DialCallStatus", status)]
        leg = winner or (legs[0] if legs else None)
        if leg is not None:
            params.append(("DialCallSid", leg.record.sid))
        duration = 0
        if winner is not None and winner.record.duration is not None:
            duration = winner.record.duration  # the dialled leg's own call duration
        elif bridged_at is not None:
            duration = self._sim_elapsed(bridged_at)
        params.append(("DialCallDuration", str(duration)))
        params.append(("DialBridged", "true" if winner is not None else "false"))
        return params

    def _start_leg(
        self,
        parent: _Call,
        to: str,
        from_: str,
        timeout: int,
        noun_attrs: Mapping[str, str],
        doc: Document,
    ) -> _Call:
        now = self.now()
        rec = CallRecord(
            sid=new_sid("CA"),
            account_sid=self.account_sid,
            direction="outbound-dial",
            to=to,
            from_=from_,
            params={k: [v] for k, v in noun_attrs.items()},
            parent_sid=parent.record.sid,
            date_created=now,
            date_updated=now,
        )
        leg = _Call(self, rec, self.phone_for(to))
        leg.parent = parent
        leg.timeout = timeout
        leg.status_callback = self._resolve(parent, doc, noun_attrs.get("statusCallback"))
        leg.status_callback_method = noun_attrs.get("statusCallbackMethod", "POST")
        events = noun_attrs.get("statusCallbackEvent")
        if events:
            leg.events = frozenset(events.split())
        leg.whisper_url = self._resolve(parent, doc, noun_attrs.get("url"))
        leg.whisper_method = noun_attrs.get("method", "POST")
        parent.record.children.append(rec.sid)
        self._register(leg)
        self._set_status(leg, "queued", "queued")
        self._spawn(self._run_leg(leg), f"twilio-sim-call-{rec.sid}")
        self._spawn(self._webhook_sender(leg), f"twilio-sim-webhooks-{rec.sid}")
        return leg

    async def _run_leg(self, leg: _Call) -> None:
        phone = leg.phone
        try:
            try:
                self._progress(leg, "initiated")
                await leg.wait_until(delay=phone.ring_after)
                if phone.fail:
                    self._finish(leg, "failed", 404)
                    return
                if phone.busy:
                    self._finish(leg, "busy", 486)
                    return
                self._progress(leg, "ringing")
                if phone.no_answer or phone.answer_after >= leg.timeout:
                    await leg.wait_until(delay=leg.timeout)
                    self._finish(leg, "no-answer", 487)
                    return
                await leg.wait_until(delay=phone.answer_after)
            except CallInterrupted:
                self._finish(leg, "canceled", 487)
                return
            self._answer(leg)
            with contextlib.suppress(CallInterrupted):
                if leg.whisper_url is not None:
                    whisper = await self._fetch_document(
                        leg, leg.whisper_url, leg.whisper_method, "twiml"
                    )
                    if whisper is None:
                        return
                    # A <Gather action> or <Redirect> in the whisper hands over to its
                    # document, which may still hang up before the bridge.
                    ran = await self._run_document(leg, whisper)
                    while isinstance(ran, Document):
                        ran = await self._run_document(leg, ran)
                    if ran == "hangup":
                        return
                leg.bridge_ready = True
                if leg.parent is not None:
                    leg.parent.poke()
                await leg.wait_until()
        finally:
            self._finish(leg, "completed", 200)
            self._lifecycle_end(leg)

    # ---------------------------------------------------------------- <Connect><Stream>

    async def _verb_connect(self, c: _Call, node: Node, doc: Document) -> Next:
        stream = node.child("Stream")
        action = self._resolve(c, doc, node.attrs.get("action"))
        method = node.attrs.get("method", "POST")
        self._record_verb(
            c,
            VerbRecord("Connect", node.attrs, detail={"stream": stream.attrs if stream else None}),
        )
        if stream is None:
            c.record.notifications.append(
                Notification(12200, "<Connect> without <Stream> is not simulated", "warning")
            )
            return None
        await self._run_stream(c, stream, doc)
        if action is None:
            return None
        nxt = await self._fetch_document(c, action, method, "action")
        if nxt is None:
            self._application_error(c)
            return "hangup"
        return nxt

    def _stream_status(
        self,
        c: _Call,
        node: Node,
        doc: Document,
        srec: StreamRecord,
        event: str,
        error: str | None = None,
    ) -> None:
        url = self._resolve(c, doc, node.attrs.get("statusCallback"))
        if url is None:
            return
        params = [
            ("AccountSid", c.record.account_sid),
            ("CallSid", c.record.sid),
            ("StreamSid", srec.stream_sid),
            ("StreamName", srec.name or srec.stream_sid),
            ("StreamEvent", event),
            ("Timestamp", self.now().isoformat()),
        ]
        if error is not None:
            params.append(("StreamError", error))
        method = node.attrs.get("statusCallbackMethod", "POST")
        c.queue.put_nowait(_Webhook("stream-status", url, method, params))

    def _stream_error(
        self, c: _Call, node: Node, doc: Document, srec: StreamRecord, code: int, msg: str
    ) -> None:
        n = Notification(code, msg)
        srec.errors.append(n)
        c.record.notifications.append(n)
        self._stream_status(c, node, doc, srec, "stream-error", msg)
        self._notify()

    async def _run_stream(self, c: _Call, node: Node, doc: Document) -> None:
        url = node.attrs.get("url", "")
        custom: dict[str, str] = {}
        for p in node.children:
            if p.tag == "Parameter" and "name" in p.attrs:
                custom[p.attrs["name"]] = p.attrs.get("value", "")
        srec = StreamRecord(
            url=url,
            name=node.attrs.get("name"),
            custom_parameters=custom,
            stream_sid=new_sid("MZ"),
        )
        c.record.streams.append(srec)
        for k, v in custom.items():
            if len(k) + len(v) >= 500:
                srec.errors.append(
                    Notification(0, f"Stream parameter {k!r}: name+value >= 500 chars", "warning")
                )
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            self._stream_error(
                c, node, doc, srec, 31920, f"Stream - WebSocket - Handshake Error: bad url {url!r}"
            )
            return
        if parts.query:
            self._stream_error(
                c,
                node,
                doc,
                srec,
                31920,
                "Stream - WebSocket - Handshake Error: the url must not have a "
                "query string (use <Parameter>)",
            )
            return
        srec.signature = sdk_signature(self.auth_token, url)
        try:
            ws = await self.session.ws_connect(
                url,
                headers={SIGNATURE_HEADER: srec.signature},
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._stream_error(
                c, node, doc, srec, 31920, f"Stream - WebSocket - Handshake Error: {exc}"
            )
            return
        state = _StreamState(c, srec, ws, c.phone.source())
        c.stream_state = state
        srec.connected = True
        reader = self._spawn(self._stream_reader(state), f"twilio-sim-ws-{srec.stream_sid}")
        try:
            await self._ws_send(
                state, {"event": "connected", "protocol": "Call", "version": "1.0.0"}
            )
            await self._ws_send(
                state,
                {
                    "event": "start",
                    "start": {
                        "accountSid": c.record.account_sid,
                        "streamSid": srec.stream_sid,
                        "callSid": c.record.sid,
                        "tracks": ["inbound"],
                        "customParameters": custom,
                        "mediaFormat": {
                            "encoding": "audio/x-mulaw",
                            "sampleRate": 8000,
                            "channels": 1,
                        },
                    },
                },
            )
            srec.started = True
            self._stream_status(c, node, doc, srec, "stream-started")
            self._notify()
            await self._media_loop(state)
            srec.closed_by = "app"
        except CallInterrupted:
            srec.closed_by = "twilio"
            raise
        finally:
            c.stream_state = None
            state.twilio_closing = True
            if not state.app_closed and not ws.closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await self._ws_send(
                            state,
                            {
                                "event": "stop",
                                "stop": {
                                    "accountSid": c.record.account_sid,
                                    "callSid": c.record.sid,
                                },
                            },
                        )
                        srec.stopped = True
                        await ws.close()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if not ws.closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.5):
                        await ws.close()
            self._stream_status(c, node, doc, srec, "stream-stopped")
            self._notify()

    async def _ws_send(self, state: _StreamState, msg: dict[str, Any]) -> None:
        if msg["event"] != "connected":
            state.seq += 1
            msg = {
                "event": msg["event"],
                "sequenceNumber": str(state.seq),
                **{k: v for k, v in msg.items() if k != "event"},
                "streamSid": state.record.stream_sid,
            }
        if msg["event"] == "media":
            state.record.media_frames_sent += 1
        else:
            state.record.sent.append(msg)
        await state.ws.send_str(json.dumps(msg, separators=(",", ":")))

    async def _media_loop(self, state: _StreamState) -> None:
        c = state.call
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        index = 0
        while True:
            due = int((loop.time() - t0) / self.media_interval) + 1
            sent = 0
            while index < due and sent < MAX_CATCH_UP_FRAMES and not state.app_closed:
                payload = base64.b64encode(state.source.frame(index)).decode()
                try:
                    await self._ws_send(
                        state,
                        {
                            "event": "media",
                            "media": {
                                "track": "inbound",
                                "chunk": str(index + 1),
                                "timestamp": str((index + 1) * 20),
                                "payload": payload,
                            },
                        },
                    )
                except (ConnectionError, aiohttp.ClientError):
                    state.app_closed = True
                    break
                self._play_frame(state)
                index += 1
                sent += 1
            await self._stream_housekeeping(state)
            if state.app_closed:
                return
            state.dirty = False
            await c.wait_until(
                lambda: state.app_closed or state.dirty, until=t0 + index * self.media_interval
            )

    def _play_frame(self, state: _StreamState) -> None:
        need = FRAME_BYTES
        while need > 0 and state.playout and isinstance(state.playout[0], bytes):
            chunk = state.playout.popleft()
            assert isinstance(chunk, bytes)
            take = chunk[:need]
            state.record.audio_played.extend(take)
            need -= len(take)
            if len(chunk) > len(take):
                state.playout.appendleft(chunk[len(take) :])

    async def _stream_housekeeping(self, state: _StreamState) -> None:
        """Echo marks whose audio has played (all of them after a clear); send DTMF."""
        try:
            if state.clear_requested:
                state.clear_requested = False
                marks = [m for m in state.playout if isinstance(m, _Mark)]
                state.playout.clear()
                for m in marks:
                    await self._echo_mark(state, m)
            while state.playout and isinstance(state.playout[0], _Mark):
                mark = state.playout.popleft()
                assert isinstance(mark, _Mark)
                await self._echo_mark(state, mark)
            while state.dtmf:
                digit = state.dtmf.popleft()
                await self._ws_send(
                    state, {"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": digit}}
                )
        except (ConnectionError, aiohttp.ClientError):
            state.app_closed = True

    async def _echo_mark(self, state: _StreamState, mark: _Mark) -> None:
        await self._ws_send(state, {"event": "mark", "mark": {"name": mark.name}})
        state.record.marks_echoed.append(mark.name)
        self._notify()

    async def _stream_reader(self, state: _StreamState) -> None:
        srec = state.record
        try:
            async for msg in state.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._app_message(state, str(msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._protocol_error(state, 31950, "binary frame received (JSON text only)")
                else:
                    break
        finally:
            if not state.twilio_closing:
                state.app_closed = True
                srec.closed_by = srec.closed_by or "app"
            state.call.poke()
            self._notify()

    def _protocol_error(self, state: _StreamState, code: int, message: str) -> None:
        n = Notification(code, message)
        state.record.errors.append(n)
        state.call.record.notifications.append(n)
        self._notify()

    def _app_message(self, state: _StreamState, text: str) -> None:
        srec = state.record
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            self._protocol_error(state, 31951, f"message is not JSON: {text[:80]!r}")
            return
        if not isinstance(msg, dict):
            self._protocol_error(state, 31951, "message is not a JSON object")
            return
        event = msg.get("event")
        shapes: dict[str, tuple[set[str], set[str] | None]] = {
            "media": ({"event", "streamSid", "media"}, {"payload"}),
            "mark": ({"event", "streamSid", "mark"}, {"name"}),
            "clear": ({"event", "streamSid"}, None),
        }
        if event not in shapes:
            self._protocol_error(state, 31951, f"unknown event {event!r}")
            return
        assert isinstance(event, str)
        keys, inner = shapes[event]
        if set(msg) != keys:
            self._protocol_error(state, 31951, f"{event}: fields {sorted(msg)} != {sorted(keys)}")
            return
        if msg["streamSid"] != srec.stream_sid:
            self._protocol_error(state, 31951, f"{event}: wrong streamSid {msg['streamSid']!r}")
            return
        if inner is not None:
            body = msg[event]
            if (
                not isinstance(body, dict)
                or set(body) != inner
                or not all(isinstance(v, str) for v in body.values())
            ):
                self._protocol_error(state, 31951, f"{event}: body must be {sorted(inner)}")
                return
        if event == "media":
            srec.app_media_messages += 1
            try:
                audio = base64.b64decode(msg["media"]["payload"], validate=True)
            except (binascii.Error, ValueError):
                self._protocol_error(state, 31951, "media: payload is not base64")
                return
            srec.audio_received.extend(audio)
            state.playout.append(audio)
        elif event == "mark":
            srec.app_messages.append(msg)
            state.playout.append(_Mark(msg["mark"]["name"]))
            state.dirty = True
        else:
            srec.app_messages.append(msg)
            state.clear_requested = True
            state.dirty = True
        state.call.poke()
        self._notify()
