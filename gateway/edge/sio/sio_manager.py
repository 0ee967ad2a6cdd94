"""python-socketio's client managers: the Redis one made observable (``/readyz`` must say
when the node stopped hearing other nodes' emits, which the stock manager only logs), and
both passing rings through a ``RingGate`` as they reach this node's agent sockets."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import socketio
from engineio import packet as eio_packet
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.core.errors import StoreUnavailable
from gateway.core.ringing import Offer, RingGate
from gateway.ops.metrics import Metrics
from gateway.store.redis import PING_INTERVAL_S, RESUBSCRIBE_BACKOFF_MAX_S
from gateway.store.redis_lane import RedisLane, RedisSubscription
from gateway.store.redis_url import RedisTarget, redis_target

BATCH = "membrane_emit_batch"
# A rejoining listener replays the calls changed since it last heard Redis, less this much:
# another node's clock may be a little behind, and its emit a little late.
REPLAY_MARGIN_S = 2.0


def _deliver(inbox: collections.deque[str | None], arrived: asyncio.Event, message: str) -> None:
    inbox.append(message)
    arrived.set()


def _lost(
    inbox: collections.deque[str | None], arrived: asyncio.Event, _: asyncio.Future[None]
) -> None:
    inbox.append(None)  # the subscription is gone: resubscribe
    arrived.set()


RING = "call:ring"
RING_STOP = "call:ring_stop"
AGENT_NAMESPACE = "/agent"

Emit = tuple[str, Any]


class RingDelivery:
    """Applies gateway.core.ringing's ``RingGate`` to the ``call:ring`` and ``call:ring_stop``
    emits that reach this node's agent sockets, from this node or another: at the moment
    they are handed to the sockets, not when they were sent."""

    def __init__(
        self, metrics: Metrics | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.gate = RingGate()
        self._metrics = metrics
        self._clock = clock

    def applies(self, event: str, namespace: str | None) -> bool:
        return namespace == AGENT_NAMESPACE and event in (RING, RING_STOP)

    def admit(self, event: str, payload: Any, room: str | None) -> list[Emit]:
        """What to send the room instead of ``event``: nothing, the event, or a stop of an
        older ring and then the event. Payloads not in Membrane's shape pass unchanged."""
        if room is None or not isinstance(payload, dict):
            return [(event, payload)]
        call_id = payload.get("call_id")
        now = self._clock()
        if event == RING_STOP:
            if isinstance(call_id, str):
                attempt = payload.get("attempt")
                self.gate.ring_stop(
                    room, call_id, attempt if isinstance(attempt, int) else None, now
                )
            return [(event, payload)]
        expires_ms = payload.get("ring_expires_at")
        if not isinstance(call_id, str) or not isinstance(expires_ms, int | float):
            return [(event, payload)]
        offer = Offer(call_id, int(payload.get("attempt") or 0), expires_ms / 1000)
        delivery = self.gate.ring(room, offer, now)
        if not delivery.deliver:
            if self._metrics is not None:
                self._metrics.rings_dropped.labels(delivery.dropped or "?").inc()
            return []
        if delivery.stop_first is None:
            return [(event, payload)]
        older = delivery.stop_first
        stop = {"call_id": older.call_id, "attempt": older.attempt, "reason": "superseded"}
        return [(RING_STOP, stop), (event, payload)]


class SidSet:
    """The list upstream keeps of sids connecting or disconnecting, with the membership test
    in O(1): upstream appends, removes, tests ``in`` and takes ``len``, and nothing else.
    With thousands of sockets closing at once (a node draining, a network blip), the stock
    list made each ``is_connected`` walk all of them."""

    __slots__ = ("_sids",)

    def __init__(self, sids: Any = ()) -> None:
        self._sids: dict[str, None] = dict.fromkeys(sids)

    def append(self, sid: str) -> None:
        self._sids[sid] = None

    def remove(self, sid: str) -> None:
        del self._sids[sid]

    def __contains__(self, sid: object) -> bool:
        """What ``BaseManager.is_connected`` asks of every sid it is given."""
        return sid in self._sids

    def __len__(self) -> int:
        return len(self._sids)

    def __iter__(self) -> Any:
        return iter(self._sids)


class SidSets(dict[str, SidSet]):
    """``pending_connect`` and ``pending_disconnect``, one ``SidSet`` per namespace."""

    def __setitem__(self, namespace: str, sids: Any) -> None:
        """Upstream stores a new ``[]`` per namespace (``BaseManager.pre_connect``,
        ``BaseManager.pre_disconnect``); it becomes a ``SidSet``."""
        super().__setitem__(namespace, sids if isinstance(sids, SidSet) else SidSet(sids))


class IndexedRooms(socketio.AsyncManager):  # type: ignore[misc]
    """Keeps, for each socket, the rooms it is in. Upstream finds them by testing every room
    of the namespace, so a disconnect cost O(rooms) and a node losing n sockets at once (its
    drain, or every widget of a site reloading) spent O(n^2): about 9 s of CPU for 8,000."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rooms_of: dict[tuple[str, str], set[str | None]] = {}
        self._taps: dict[tuple[str, str], Callable[[Any], None]] = {}
        self.pending_connect = SidSets()
        self.pending_disconnect = SidSets()

    def basic_enter_room(
        self, sid: str, namespace: str, room: str | None, eio_sid: str | None = None
    ) -> None:
        """As ``BaseManager.basic_enter_room``, remembering the room."""
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        self._rooms_of.setdefault((namespace, sid), set()).add(room)

    def basic_leave_room(self, sid: str, namespace: str, room: str | None) -> None:
        """As ``BaseManager.basic_leave_room``, forgetting the room."""
        super().basic_leave_room(sid, namespace, room)
        rooms = self._rooms_of.get((namespace, sid))
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._rooms_of[(namespace, sid)]

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        """``BaseManager.basic_disconnect``, leaving the rooms the index names instead of
        testing every room of the namespace."""
        if namespace not in self.rooms:
            return
        for room in list(self._rooms_of.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self._rooms_of.pop((namespace, sid), None)
        if sid in self.callbacks:
            del self.callbacks[sid]
        for pending in (self.pending_connect, self.pending_disconnect):
            if namespace in pending and sid in pending[namespace]:
                pending[namespace].remove(sid)
                if len(pending[namespace]) == 0:
                    del pending[namespace]

    def tap(self, event: str, namespace: str, listener: Callable[[Any], None]) -> None:
        """Hand ``listener`` the payload of every ``event`` on ``namespace`` that reaches
        this node (emitted here or by another node, to any room), before its sockets get it:
        a ticket page's stream hears each visitor's ``call:update`` with no message of its
        own on the wire. It must not block (it runs inside delivery)."""
        self._taps[(event, namespace)] = listener

    def has_members(self, namespace: str, room: str) -> bool:
        """Whether any of this node's sockets is in ``room`` (upstream drops a room when its
        last socket leaves)."""
        return room in self.rooms.get(namespace, ())

    def get_rooms(self, sid: str, namespace: str) -> list[str]:
        """``BaseManager.get_rooms`` from the index."""
        return [r for r in self._rooms_of.get((namespace, sid), ()) if r is not None]

    async def deliver(
        self, event: str, args: list[Any], namespace: str | None, room: Any, skip_sid: Any
    ) -> None:
        """``AsyncManager.emit`` without a callback, to this node's sockets in ``room``. The
        packet is encoded only when one of them is there (an emit published for another
        node's socket reaches every node), and queued to each in turn: upstream starts a
        Task per recipient and waits for them all, though sending only queues the packet
        (``LeanSocket.send``). Those Tasks and waits stood out in a node's profile under call
        load; with the other cuts of the same change, a call's node CPU went from 4.0-5.3 ms
        to 2.9-4.3 ms (bench/overload.py at 200/s)."""
        if self._taps and args and namespace is not None:
            listener = self._taps.get((event, namespace))
            if listener is not None:
                listener(args[0])
        rooms = self.rooms.get(namespace)
        if rooms is None or (isinstance(room, str) and room not in rooms):
            return  # (most emits published by other nodes are for their own sockets)
        skip = skip_sid if isinstance(skip_sid, list) else (skip_sid,)
        recipients = [e for sid, e in self.get_participants(namespace, room) if sid not in skip]
        if not recipients:
            return
        encoded = self.server.packet_class(
            socketio.packet.EVENT, namespace=namespace, data=[event, *args]
        ).encode()
        parts = encoded if isinstance(encoded, list) else [encoded]
        packets = [eio_packet.Packet(eio_packet.MESSAGE, part) for part in parts]
        for eio_sid in recipients:
            for pkt in packets:
                try:
                    await self.server._send_eio_packet(eio_sid, pkt)
                except Exception:
                    # One recipient's failure is not the others' (upstream's Tasks were
                    # independent too).
                    self._get_logger().exception("emit of %s to %s failed", event, eio_sid)


class LocalManager(IndexedRooms):
    """The manager of a node without Redis: every emit is delivered here, rings through
    the gate."""

    def __init__(self, rings: RingDelivery) -> None:
        super().__init__()
        self.rings = rings

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: str | None = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """As ``AsyncManager.emit`` (``deliver``), rings through the gate."""
        room = to or room
        if callback is not None:
            return await super().emit(
                event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, **kwargs
            )
        if not self.rings.applies(event, namespace):
            args = list(data) if isinstance(data, tuple) else [] if data is None else [data]
            await self.deliver(event, args, namespace, room, skip_sid)
            return None
        for gated_event, payload in self.rings.admit(event, data, room):
            await self.deliver(gated_event, [payload], namespace, room, skip_sid)
        return None


class ObservedRedisManager(IndexedRooms, socketio.AsyncRedisManager):  # type: ignore[misc]
    """Connects only through the lane and ``RedisSubscription`` (``_publish`` and ``_listen``
    are both replaced), so to the same target, TLS or unix socket, as the store: the stock
    manager's own redis-py client is never made."""

    def __init__(
        self,
        url: str | RedisTarget,
        channel: str,
        rings: RingDelivery | None = None,
        clock: Callable[[], float] = time.time,
        lane: RedisLane | None = None,
    ) -> None:
        """``lane``: the store's, to publish over (the store closes it); by default one of
        its own."""
        self._target = redis_target(url)
        self._clock = clock  # the time call rows are written in, for ``on_rejoin``
        super().__init__(url=str(self._target), channel=channel)
        self.rings = rings or RingDelivery()
        self.listening = False
        self.last_error = ""
        self.on_rejoin: Callable[[float], Awaitable[None]] | None = None
        """Called with a wall-clock time when the listener subscribed again after missing
        emits from about then on (CallDesk.replay_since)."""
        # Emits are published over a pipelined connection (see store.redis_lane): a call
        # sends a dozen, and redis-py costs ~4x the CPU a publish. The store's, when given:
        # a call's publishes and its store commands then share writes to Redis.
        self._owns_lane = lane is None
        self._lane = lane or RedisLane(self._target)
        self._inbox: collections.deque[str | None] = collections.deque()
        self._open_publish: _OpenPublish | None = None
        """The last publish queued, while later emits may still join it."""
        self._suffix = self._own_suffix()  # (``host_id`` is fixed by upstream's __init__)

    @property
    def backlog(self) -> int:
        """Other nodes' messages received and not yet delivered here (a batch counts once)."""
        return len(self._inbox)

    @property
    def publishing(self) -> int:
        """Emits handed to Redis and not confirmed yet, on a lane of its own (on the store's,
        the store counts them)."""
        return self._lane.in_flight if self._owns_lane else 0

    async def sent(self) -> None:
        """Returns once Redis has taken every emit published so far: whatever this node
        does next (releasing an agent) happens after other nodes were sent them. If Redis
        does not answer, returns anyway: what follows must still happen (the emits that
        failed are logged), and the ring gate on the agent's node still keeps her rings
        apart.

        On the store's lane, at once: Redis takes a connection's commands in the order they
        were written, so whatever the node does next in the store comes after the emits
        anyway, without a round trip to confirm them."""
        if not self._owns_lane:
            return
        try:
            await self._lane.execute("PING")
        except Exception as exc:
            self._get_logger().warning("could not confirm emits were published: %r", exc)

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        """An emit reaching this node's sockets (its own or another node's), rings gated,
        through ``deliver``; one with a callback or binary parts (which Membrane never
        publishes) through upstream's ``AsyncPubSubManager._handle_emit``."""
        event, namespace, data = message.get("event"), message.get("namespace"), message["data"]
        if (
            not isinstance(event, str)
            or not isinstance(data, list)
            or message.get("callback") is not None
            or message.get("binary")
        ):
            await super()._handle_emit(message)
            return
        room, skip_sid = message.get("room"), message.get("skip_sid")
        if not self.rings.applies(event, namespace) or len(data) != 1:
            await self.deliver(event, data, namespace, room, skip_sid)
            return
        for gated_event, payload in self.rings.admit(event, data[0], room):
            await self.deliver(gated_event, [payload], namespace, room, skip_sid)

    async def deliver_here(self, event: str, data: Any, namespace: str, room: str) -> None:
        """An emit for this node's sockets only (rings gated), published to no other node."""
        await self._handle_emit(self._emit_message(event, data, namespace, room))

    async def emit_batch(self, emits: list[tuple[str, Any, str, str]]) -> None:
        """Several ``(event, data, namespace, room)`` emits, delivered here, and to the other
        nodes in one message: a call update goes to the visitor, the agent and the board,
        and one publish instead of three saves each node two messages to send or receive.
        A node without ``_listen``'s unpacking (mid-upgrade) ignores the message, an unknown
        method, rather than mis-delivering it."""
        messages = [
            self._emit_message(event, data, namespace, room)
            for event, data, namespace, room in emits
        ]
        for message in messages:
            await self._handle_emit(message)
        await self._publish({"method": BATCH, "emits": messages, "host_id": self.host_id})

    def _emit_message(
        self, event: str, data: Any, namespace: str | None, room: str | None, skip_sid: Any = None
    ) -> dict[str, Any]:
        """The message ``AsyncPubSubManager.emit`` publishes, as ``AsyncPubSubManager._handle_emit``
        takes it."""
        return {
            "method": "emit",
            "event": event,
            "data": list(data) if isinstance(data, tuple) else [data],
            "binary": False,
            "namespace": namespace or "/",
            "room": room,
            "skip_sid": skip_sid,
            "callback": None,
            "host_id": self.host_id,
        }

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str | None = None,
        room: str | None = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """As ``AsyncPubSubManager.emit``, without its search of every payload for binary
        parts, which cost ~5% of a node's CPU under call load (Membrane never sends binary).
        With ``ignore_queue`` (this node's sockets only: every node sends each presence
        change to its own), delivered as the others are, rather than by upstream's task per
        recipient."""
        room = to or room
        if callback is not None:
            return await super().emit(
                event, data, namespace=namespace, room=room, skip_sid=skip_sid,
                callback=callback, **kwargs,
            )  # fmt: skip
        message = self._emit_message(event, data, namespace, room, skip_sid)
        await self._handle_emit(message)  # this node's sockets
        if not kwargs.get("ignore_queue"):
            await self._publish(message)  # the other nodes'
        return None

    async def _publish(self, data: Any) -> Any:
        """As ``AsyncRedisManager._publish`` (two attempts, then log and give up), over the
        lane, and without waiting for Redis to confirm: emits still go out in order, one write
        for all those of a turn of the event loop, and a failure is retried once in the
        background.

        Emits published one right after the other, with nothing queued on the lane between
        them (a ring and its call's update; a ring's stop and the accepted call's update),
        go out as one batch (``_OpenPublish``): one message for each node to receive and
        read instead of several. Anything queued after a publish ends its batch, so what
        follows an emit still reaches Redis after it."""
        parts = self._emit_parts(data)
        open_publish = self._open_publish
        if parts is not None and open_publish is not None and open_publish.extend(parts):
            return None
        self._open_publish = None
        if parts is None:
            message = self.json.dumps(data)
        else:
            message = parts[0] if data.get("method") == "emit" else self._batch_text(parts)
        sent = self._lane.send("PUBLISH", self.channel, message)
        if sent is None:
            return await self._publish_again(message)
        publish = _OpenPublish(self, sent, message, parts)
        if parts is not None:
            self._open_publish = publish
        sent.add_done_callback(publish.done)
        return None

    def _emit_parts(self, data: Any) -> list[str] | None:
        """The emits of ``data`` a batch may carry, each encoded: an emit without a callback,
        or a batch's emits; None for anything else (upstream's other messages)."""
        if not isinstance(data, dict):
            return None
        if data.get("method") == BATCH:
            return [self.json.dumps(e) for e in data["emits"]]
        if data.get("method") == "emit" and data.get("callback") is None:
            return [self.json.dumps(data)]
        return None

    def _batch_text(self, parts: list[str]) -> str:
        """``emit_batch``'s message of the encoded emits ``parts``, ending as every message
        of this node does (``_own_suffix``)."""
        return f'{{"method":"{BATCH}","emits":[{",".join(parts)}],{self._suffix}'

    def _published(self, message: str, sent: asyncio.Future[Any]) -> None:
        if sent.cancelled() or sent.exception() is None:
            return
        self._get_logger().error("Cannot publish to redis... retrying: %r", sent.exception())
        self.server.start_background_task(self._publish_again, message, retrying=True)

    async def _publish_again(self, message: str, retrying: bool = False) -> Any:
        for retries_left in (0,) if retrying else (1, 0):
            try:
                return await self._lane.execute("PUBLISH", self.channel, message)
            except Exception as exc:
                if retries_left:
                    self._get_logger().error("Cannot publish to redis... retrying: %r", exc)
                else:
                    self._get_logger().error("Cannot publish to redis... giving up: %r", exc)
        return None

    async def _listen(self) -> AsyncIterator[str]:
        """Other nodes' emits, for ``AsyncPubSubManager._thread`` (replaces
        ``AsyncRedisManager._listen``): over a hiredis subscription (store.redis_lane) rather
        than redis-py's PubSub, whose per-message parsing cost several times more CPU. On a lost
        or silent connection: resubscribe with backoff capped at 2 s, so a node rejoins soon
        after Redis comes back, and have the calls changed meanwhile replayed (``on_rejoin``),
        since the emits published while it was away are gone."""
        retry_sleep = 0.1
        heard_at: float | None = None  # when it last knew it was subscribed (wall clock)
        deaf_since: float | None = None
        while True:
            inbox: collections.deque[str | None] = collections.deque()
            self._inbox = inbox
            arrived = asyncio.Event()
            # Bound now, to this subscription's own inbox: a closure over the loop's
            # variables would let each closing subscription wake the next one with its
            # "lost" (None), which then gave up at once, for good (seen after a Redis pause).
            subscription = RedisSubscription(partial(_deliver, inbox, arrived))
            keep_alive: asyncio.Task[str] | None = None
            try:
                await subscription.open(self._target, self.channel)
                assert subscription.closed is not None
                subscription.closed.add_done_callback(partial(_lost, inbox, arrived))
                if deaf_since is not None:
                    await self._rejoined(deaf_since)
                    deaf_since = None
                self.listening, self.last_error = True, ""
                retry_sleep = 0.1
                heard_at = self._clock()
                own = self._suffix
                keep_alive = asyncio.create_task(self._keep_alive(subscription))
                while True:
                    while inbox:
                        message = inbox.popleft()
                        if message is None:
                            raise RedisConnectionError(
                                keep_alive.result() if keep_alive.done() else "connection lost"
                            )
                        if message.endswith(own):
                            continue  # this node's own publish, already delivered here
                        if BATCH in message[:40]:  # "method" is the first key
                            for emit in self._unbatch(message):
                                yield emit
                        else:
                            yield message
                    arrived.clear()
                    await arrived.wait()
                    heard_at = self._clock()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if deaf_since is None and heard_at is not None:
                    deaf_since = heard_at - REPLAY_MARGIN_S
                self.listening, self.last_error = False, repr(exc)
                self._get_logger().warning("socket.io Redis listener lost: %r", exc)
                await asyncio.sleep(retry_sleep)
                retry_sleep = min(retry_sleep * 2, RESUBSCRIBE_BACKOFF_MAX_S)
            finally:
                if keep_alive is not None:
                    keep_alive.cancel()
                    # Awaited by its owner; ``wait`` neither raises the task's cancellation
                    # nor hides this one's.
                    await asyncio.wait([keep_alive])
                subscription.close()

    @staticmethod
    async def _keep_alive(subscription: RedisSubscription) -> str:
        """Pings ``subscription`` every ``PING_INTERVAL_S`` and closes it when a ping goes
        unanswered as long (a silent link: ``_listen`` resubscribes); returns why. Not a
        timeout around each wait for a message instead: that armed and cancelled a timer
        for every message heard, about 2% of a node's CPU under call load."""
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            if not await subscription.ping(PING_INTERVAL_S):
                subscription.close()
                return "subscription stopped answering pings"

    def _own_suffix(self) -> str:
        """How every message this node publishes ends: with its ``host_id``, the last key
        (``_emit_message``, ``emit_batch``, and upstream's own messages). Upstream decodes
        each message, its own too, and only then drops its own (``_thread``): half of all it
        decodes, with every node publishing as much as the others. A callback returned to
        this node names it too, but not last, so it still passes."""
        return str(self.json.dumps({"host_id": self.host_id}))[1:]

    async def _rejoined(self, since: float) -> None:
        """Replay what was missed. The store failing again fails the listener too, so that it
        replays from the same time once it is back; any other failure is logged and passed
        over, or a bug in one call's record would keep the node unready for good."""
        if self.on_rejoin is None:
            return
        try:
            await self.on_rejoin(since)
        except StoreUnavailable:
            raise
        except Exception:
            self._get_logger().exception("replaying calls after rejoining failed")

    def _unbatch(self, message: str) -> list[Any]:
        """A batch's emits, each as ``AsyncPubSubManager._thread`` takes a decoded message."""
        try:
            batch = self.json.loads(message)
            emits = batch["emits"]
        except (ValueError, KeyError, TypeError):
            return []
        return [e for e in emits if isinstance(e, dict)] if isinstance(emits, list) else []

    async def close(self) -> None:
        """Close its Redis connection (not the store's); the listener task belongs to the
        server's TaskGroup."""
        if self._owns_lane:
            await self._lane.close()


class _OpenPublish:
    """A publish queued on the lane and not written yet, which the emits published right
    after it join (``ObservedRedisManager._publish``): its message grows into a batch."""

    __slots__ = ("_manager", "_parts", "_sent", "message")

    def __init__(
        self,
        manager: ObservedRedisManager,
        sent: asyncio.Future[Any],
        message: str,
        parts: list[str] | None,
    ) -> None:
        self._manager = manager
        self._sent = sent
        self._parts = parts or []
        self.message = message
        """What is published, as it is now (retried whole should Redis refuse it)."""

    def extend(self, parts: list[str]) -> bool:
        """Add the encoded emits ``parts``; False when the publish can no longer take them."""
        manager = self._manager
        joined = [*self._parts, *parts]
        message = manager._batch_text(joined)
        if not manager._lane.amend_last(self._sent, "PUBLISH", manager.channel, message):
            return False
        self._parts, self.message = joined, message
        return True

    def done(self, sent: asyncio.Future[Any]) -> None:
        self._manager._published(self.message, sent)
