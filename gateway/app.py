"""The app factory: one ``create_app(settings)`` for a node, resources opened and closed in
pairs (``cleanup_ctx``), nothing global, so tests run several nodes in one process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from importlib.metadata import entry_points

from aiohttp import web

from gateway import i18n
from gateway.core.admission import StartLimit
from gateway.core.ringing import RING_EVENT, RING_OVER_EVENT
from gateway.edge.auth import TokenService
from gateway.edge.http import appkeys as keys
from gateway.edge.http import (
    board_api,
    callback_api,
    http_api,
    im_webhook,
    ticket_api,
    visitor_api,
    web_static,
)
from gateway.edge.http.availability_feed import AvailabilityFeed
from gateway.edge.http.http_api import error_middleware
from gateway.edge.http.security import security_headers, security_middleware, trusted_networks
from gateway.edge.http.ticket_feed import TicketFeed, TicketView
from gateway.edge.http.visitor_api import cors_middleware
from gateway.edge.sio.agent import AgentNamespace
from gateway.edge.sio.board import BoardNamespace
from gateway.edge.sio.handover import send_sockets_elsewhere
from gateway.edge.sio.notifier import SocketCallNotifier
from gateway.edge.sio.sio_manager import LocalManager, ObservedRedisManager, RingDelivery
from gateway.edge.sio.upstream import JsonPacket, MembraneServer
from gateway.edge.sio.visitor import VisitorNamespace
from gateway.edge.visitor_identity import VisitorIdentity
from gateway.ops.clock import SYSTEM_CLOCK, Clock
from gateway.ops.gc_pacer import PROCESS_PACER, SharedPacer
from gateway.ops.load import LoadMonitor
from gateway.ops.metrics import Metrics
from gateway.ops.tasks import TaskGroup
from gateway.services.call_desk import CallDesk
from gateway.services.call_metrics import CallMetrics
from gateway.services.call_records import CallRecords, TimerKind
from gateway.services.call_service import CallService
from gateway.services.callback_service import CallbackService
from gateway.services.customer_texts import CustomerTexts
from gateway.services.drain import Drain
from gateway.services.events import EventRouter
from gateway.services.experiments import Experiments
from gateway.services.follow_ups import FollowUps
from gateway.services.history_retention import HistoryRetention
from gateway.services.history_writer import HistoryWriter
from gateway.services.im_presence import ImPresence
from gateway.services.presence_service import PRESENCE_EVENT, PresenceService
from gateway.services.retention import Retention
from gateway.services.sms_presence import SmsPresence
from gateway.services.status_token import StatusTokens
from gateway.services.surveys import Surveys
from gateway.services.text_consent import TextConsent
from gateway.services.tickets import Tickets
from gateway.services.timers import TimerLoop
from gateway.settings import Settings
from gateway.store.base import Store, StoreHealth
from gateway.store.embedded import EmbeddedStore
from gateway.store.history import PostgresHistory, SqliteHistory
from gateway.store.history_process import HistoryProcess
from gateway.store.redis import RedisStore
from gateway.store.redis_lane import RedisLane
from gateway.store.redis_url import redis_target
from gateway.telephony import (
    ENTRY_POINT_GROUP,
    AgentPhones,
    CarriesMedia,
    TelephonyInstaller,
    Texts,
)
from gateway.wire import fastjson
from gateway.wire.codec import Json

log = logging.getLogger(__name__)


class ObservedHealth:
    """Folds the socket.io manager's listener into the store's health."""

    def __init__(self, store: Store, manager: ObservedRedisManager | None) -> None:
        self.store = store
        self.manager = manager

    async def health(self) -> StoreHealth:
        health = await self.store.health()
        if self.manager is not None and not self.manager.listening:
            return StoreHealth(
                health.reachable,
                health.persistent,
                False,
                f"socket.io listener down: {self.manager.last_error}",
            )
        return health


def build_store(settings: Settings, clock: Clock = SYSTEM_CLOCK) -> Store:
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.node_id, clock.now)
    return EmbeddedStore(settings.data_dir, settings.node_id, clock.now)


def shared_lane(store: Store, redis_url: str) -> RedisLane | None:
    """The store's Redis lane, for the socket.io manager to publish over, when the store is
    on the same Redis: one connection, and a call's emits and store commands in the same
    writes."""
    if isinstance(store, RedisStore) and store.target == redis_target(redis_url):
        return store.lane
    return None


def allowed_origins(settings: Settings) -> list[str]:
    origins = {settings.public_url.rstrip("/")}
    for site in settings.sites.values():
        origins.update(site.allowed_origins)
    return sorted(origins)


def load_telephony(settings: Settings) -> TelephonyInstaller | None:
    """The installed provider (mobile_bridge registers Twilio), when one is configured: the
    gateway never imports it, so it runs without one (browser calls only)."""
    if not settings.twilio.enabled:
        return None
    for entry in entry_points(group=ENTRY_POINT_GROUP, name="twilio"):
        installer: TelephonyInstaller = entry.load()
        return installer
    log.warning("Twilio is configured but no telephony provider is installed")
    return None


def create_app(
    settings: Settings,
    store: Store | None = None,
    telephony: TelephonyInstaller | None = None,
    clock: Clock | None = None,
    pacer: SharedPacer | None = None,
) -> web.Application:
    """A node. ``telephony`` installs a phone provider (tests pass one); by default the one
    registered for Twilio is used when Twilio is configured. ``clock`` is where every due
    time, lease and grace is read (``SYSTEM_CLOCK``; a test passes a ``ManualClock`` and
    moves it on); a store passed in reads its own. ``pacer`` is the process's collector
    pacer (``gc_pacer.PROCESS_PACER`` unless a test passes its own)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[security_middleware, cors_middleware, error_middleware],
    )
    app[keys.TRUSTED_PROXIES] = trusted_networks(settings.trusted_proxies)
    app[keys.SECURITY_HEADERS] = security_headers(settings)
    clock = clock or SYSTEM_CLOCK
    i18n.load_all()
    store = store or build_store(settings, clock)
    metrics = Metrics()
    tokens = TokenService(settings.auth)
    node_tasks = TaskGroup(f"node-{settings.node_id}")
    presence = PresenceService(dict(settings.sites), store, settings.presence, node_tasks, clock)
    events = EventRouter()
    events.on(PRESENCE_EVENT, presence.on_event)

    async def count_presence_change(change: object) -> None:
        metrics.presence_changes.inc()

    presence.add_listener(count_presence_change)
    predictions = metrics.presence_predictions
    held, missed = predictions.labels("held"), predictions.labels("missed")
    presence.on_prediction = lambda done: (held if done else missed).inc()

    rings = RingDelivery(metrics, clock.now)
    manager = (
        ObservedRedisManager(
            settings.redis_url,
            channel="m:sio",
            rings=rings,
            clock=clock.now,
            lane=shared_lane(store, settings.redis_url),
        )
        if settings.redis_url
        else None
    )
    client_manager = manager or LocalManager(rings)
    sio = MembraneServer(
        async_mode="aiohttp",
        client_manager=client_manager,
        cors_allowed_origins=allowed_origins(settings),
        # WebSocket only, as every shipped client connects: long-polling adds per-session
        # HTTP bodies, queues and timers for no client, and a GET asking for it gets a 400.
        transports=["websocket"],
        # Bounds every inbound websocket message (aiohttp's max_msg_size) and HTTP body.
        max_http_buffer_size=settings.max_body_bytes,
        metrics=metrics,
        # Handle a client's events in order, on its own connection's task: no task per
        # event, and presence changes from one device can never overtake each other.
        async_handlers=False,
        ping_interval=25,
        ping_timeout=20,
        serializer=JsonPacket,
        json=fastjson,
    )
    calls_notifier = SocketCallNotifier(sio, settings.sites, clock.now)
    # One flow per channel over the shared call records; the paths every channel shares
    # (accept, decline, ring timeouts, ends) reach a call's flow through this registry.
    records = CallRecords(
        dict(settings.sites),
        store,
        presence,
        calls_notifier,
        node_tasks,
        StatusTokens.from_auth(settings.auth),
        clock.now,
    )
    call_metrics = CallMetrics(metrics)
    records.observers.append(call_metrics.changed)
    # Call history: in PostgreSQL when configured (nodes sharing Redis share it); else one
    # node keeps it in SQLite beside its embedded store, and nodes sharing Redis keep none.
    history: HistoryWriter | None = None
    if settings.history_url:
        history = HistoryWriter(
            PostgresHistory(settings.history_url),
            settings.sites,
            metrics,
            HistoryProcess(settings.history_url),
        )
    elif not settings.redis_url:
        history = HistoryWriter(
            SqliteHistory(settings.data_dir / "history.sqlite3"), settings.sites, metrics
        )
    if history is not None:
        records.observers.append(history.changed)
    calls = CallService(records)
    callbacks = CallbackService(records, metrics)
    records.register(calls)
    records.register(callbacks)
    desk = CallDesk(records)
    presence.add_lapse_listener(desk.agent_devices_lapsed)
    if manager is not None:
        manager.on_rejoin = desk.replay_since
    feed = AvailabilityFeed(presence, records.ringing, clock.now)

    tickets = Tickets(records, callbacks)
    retention = Retention(
        store, lambda: settings.sites.keys(), settings.retention_days * 86400, clock
    )

    async def ticket_view(call_id: str) -> TicketView | None:
        call = await records.find(call_id)
        if call is None:
            return None
        return TicketView(call.version, await tickets.view(call), call.share_hash)

    ticket_feed = TicketFeed(ticket_view)
    client_manager.tap("call:update", "/visitor", ticket_feed.on_call_update)

    async def ring_event(event: Json) -> None:
        records.ringing.apply(event)

    events.on(RING_EVENT, ring_event)
    events.on(RING_OVER_EVENT, ring_event)
    timers = TimerLoop(store, clock=clock)
    for kind, handler in records.timer_handlers().items():
        timers.on(kind.value, handler)
    # Every node runs SMS presence timers, with or without telephony of its own.
    sms_presence = SmsPresence(dict(settings.sites), presence, store, settings.presence, clock)
    timers.on(TimerKind.SMS_BACK.value, sms_presence.on_back_timer)
    installer = telephony or load_telephony(settings)
    phones = installer(app, settings, callbacks.dialer) if installer is not None else None
    callbacks.dialer.telephony = phones
    customer_texts = CustomerTexts(records, node_tasks, settings.public_url)
    customer_texts.texts = phones if isinstance(phones, Texts) else None
    callbacks.customer_texts = callbacks.promises.texts = customer_texts
    surveys = Surveys(records, customer_texts, node_tasks)
    experiments = Experiments(store, clock.now, surveys.agent_nps)
    records.experiments = experiments
    surveys.on_answer = call_metrics.answered
    records.observers.append(surveys.changed)
    feed.telephony = phones is not None
    # A provider that can also call agents' own phones rings mobile-only agents.
    callbacks.devices.phones = phones if isinstance(phones, AgentPhones) else None
    calls.devices = callbacks.devices
    callbacks.dialer.bridge = calls.bridge
    # With media workers, a browser call reaches an agent on their phone too.
    media = phones.media_bridge if isinstance(phones, CarriesMedia) else None
    if media is not None and callbacks.devices.phones is not None:
        calls.bridge.attach(media, metrics)
        callbacks.devices.bridge = feed.bridge = True
    follow_ups = FollowUps(records, callbacks)
    sio.register_namespace(AgentNamespace(tokens, metrics, presence, desk, follow_ups, settings))
    sio.register_namespace(BoardNamespace(tokens, metrics, presence, records))
    load = LoadMonitor(gauge=metrics.loop_lag_smoothed, histogram=metrics.loop_lag)
    load.start_limit = StartLimit.of(settings.admission)
    if manager is not None:
        load.emit_backlog = lambda: manager.backlog
    if isinstance(store, RedisStore):
        load.store_in_flight = lambda: store.in_flight + (manager.publishing if manager else 0)
    sio.register_namespace(
        VisitorNamespace(
            tokens, metrics, presence, calls, load, settings.admission, settings.public_url
        )
    )
    sio.attach(app)
    drain = Drain(settings.drain_grace_s, clock.monotonic)
    sio.drain = drain

    app[keys.SETTINGS] = settings
    app[keys.CLOCK] = clock
    app[keys.STORE] = store
    app[keys.TOKENS] = tokens
    app[keys.VISITORS] = VisitorIdentity.from_auth(settings.auth)
    app[keys.METRICS] = metrics
    app[keys.PRESENCE] = presence
    app[keys.IM_PRESENCE] = ImPresence(presence, store, settings.presence)
    app[keys.SIO] = sio
    app[keys.TASKS] = node_tasks
    app[keys.REST_BUCKETS] = {}
    app[keys.HEALTH] = ObservedHealth(store, manager)
    app[keys.CALLS] = calls
    app[keys.CALLBACKS] = callbacks
    app[keys.AVAILABILITY] = feed
    app[keys.TICKETS] = tickets
    app[keys.RETENTION] = retention
    app[keys.TICKET_FEED] = ticket_feed
    app[keys.DRAIN] = drain
    app[keys.SMS_PRESENCE] = sms_presence
    app[keys.TEXT_CONSENT] = TextConsent(settings.sites, store)
    app[keys.SURVEYS] = surveys
    app[keys.EXPERIMENTS] = experiments
    if history is not None:
        app[keys.HISTORY] = history
        app[keys.HISTORY_RETENTION] = HistoryRetention(history.history, settings.sites, clock.now)

    async def pace_collector(app: web.Application) -> AsyncIterator[None]:
        shared = pacer or PROCESS_PACER
        running = settings.gc_pacer and shared.acquire(metrics.observe_gc)
        metrics.gc_pacer.set(1 if running else 0)
        metrics.gc_frozen.set_function(
            lambda: shared.pacer.frozen_objects if shared.pacer is not None else 0
        )
        yield
        if running:
            shared.release(metrics.observe_gc)
        metrics.gc_pacer.set(0)

    async def open_store(app: web.Application) -> AsyncIterator[None]:
        await store.start(events, presence.resync)
        log.info("node %s: store %s ready", settings.node_id, type(store).__name__)
        yield
        await store.close()

    async def run_history(app: web.Application) -> AsyncIterator[None]:
        if history is None:
            yield
            return
        # Opened by the writer, which tries again while the database cannot be reached: the
        # node serves calls meanwhile.
        loop = asyncio.get_running_loop()
        writer = loop.create_task(history.run(), name="history-writer")
        sweeper = loop.create_task(
            app[keys.HISTORY_RETENTION].run(history.opened), name="history-retention"
        )
        yield
        writer.cancel()
        sweeper.cancel()
        await asyncio.gather(writer, sweeper, return_exceptions=True)
        await history.flush(settings.drain_grace_s)
        await history.close()

    async def run_telephony(app: web.Application) -> AsyncIterator[None]:
        if phones is not None:
            await phones.start()
        yield
        if phones is not None:
            await phones.close()

    async def run_presence(app: web.Application) -> AsyncIterator[None]:
        await presence.resync()
        tasks = app[keys.TASKS]
        tasks.spawn(presence.run_sweeper(), "presence-sweeper")
        tasks.spawn(presence.run_lease_renewal(), "socket-leases")
        timer_task = tasks.spawn(timers.run(), "timers")

        async def hand_over_timers(deadline: float) -> None:
            await timers.hand_over(timer_task, deadline)

        drain.on_drain("timers", hand_over_timers)
        tasks.spawn(feed.run_keepalive(), "availability-keepalive")
        tasks.spawn(ticket_feed.run_keepalive(), "ticket-keepalive")
        tasks.spawn(retention.run(), "retention")
        yield
        await feed.close()
        await ticket_feed.close()
        await tasks.close()

    async def run_socketio(app: web.Application) -> AsyncIterator[None]:
        if manager is not None:
            sio.manager_initialized = True
            manager.initialize()
        load.start()
        yield
        load.stop()
        await sio.eio.tasks.close()
        if manager is not None:
            await manager.close()

    async def end_streams(deadline: float) -> None:
        await feed.close_watchers()  # EventSource reconnects by itself
        await ticket_feed.close_watchers()

    async def move_sockets(deadline: float) -> None:
        await send_sockets_elsewhere(sio)

    drain.on_drain("streams", end_streams)
    drain.on_drain("sockets", move_sockets)

    async def disconnect_clients(app: web.Application) -> None:
        # Before aiohttp waits for open requests: sockets leave while the store is open,
        # availability streams end, running timers are handed over. A node told to stop
        # (SIGTERM) has drained already; the steps then find nothing left to do.
        await drain.run()
        await sio.shutdown()
        sio.eio.end_transports()

    app.cleanup_ctx.append(pace_collector)
    app.cleanup_ctx.append(open_store)
    app.cleanup_ctx.append(run_history)
    app.cleanup_ctx.append(run_telephony)
    app.cleanup_ctx.append(run_presence)
    app.cleanup_ctx.append(run_socketio)
    app.on_shutdown.append(disconnect_clients)
    http_api.add_routes(app)
    visitor_api.add_routes(app)
    callback_api.add_routes(app)
    ticket_api.add_routes(app)
    board_api.add_routes(app)
    im_webhook.add_routes(app)
    web_static.add_routes(app, web_static.web_client_root(settings.web_client_dir))
    return app


__all__ = ["create_app"]
