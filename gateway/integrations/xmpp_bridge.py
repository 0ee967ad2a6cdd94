"""The XMPP presence bridge (``membrane xmpp-bridge --config FILE``): a bot account on the
company's XMPP server, subscribed to each agent's presence, posts every change to the
site's IM presence webhook (``POST /v1/sites/{site}/presence/im``), signed with the site's
secret. The gateway then shows the agent on the board and routes by it, with no token per
agent.

- XMPP ``show`` to Membrane: none or ``chat`` is available, ``away`` and ``xa`` are away,
  ``dnd`` is dnd, and no resource online is offline. An agent logged in from several
  resources is dnd if any says dnd (as Membrane's own rule), else the most available.
- Every ``renew_s`` (an hour) each agent's state is posted again, renewing the im device's
  lease (12 h), and once ``settle_s`` after each (re)connection, so that an agent who went
  offline while the bridge was away is reported offline.
- A failed post (the gateway unreachable, 5xx, 429) is retried with backoff, signed anew
  with new event ids: an update sets a state, so one applied before the failure is merely
  applied again, while an event id a half-failed request took would be refused for good.
- A lost XMPP connection is made again, after 1 s and then up to a minute apart while it
  keeps failing (a refused login included), the agents' im devices left as they were.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import slixmpp
from slixmpp.stanza import Presence

from gateway.integrations.bridge_config import BridgeConfig
from gateway.wire.im_presence import MAX_UPDATES, ImState, signed_headers

log = logging.getLogger(__name__)

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0


def im_state(resources: Mapping[str, Mapping[str, Any]]) -> ImState:
    """An agent's state from their online XMPP resources (resource -> {"show": ...})."""
    shows = {str(r.get("show") or "") for r in resources.values()}
    if not shows:
        return "offline"
    if "dnd" in shows:
        return "dnd"
    if shows & {"", "chat"}:
        return "available"
    return "away"  # away, xa (and any show XMPP does not define)


class WebhookError(Exception):
    """The gateway refused updates for good (a 4xx other than 409 and 429): the
    configuration is wrong (secret, site, agent ids) or the clock is off."""


class Webhook:
    """Posts signed batches to the site's IM presence webhook."""

    def __init__(self, config: BridgeConfig, session: aiohttp.ClientSession) -> None:
        self._url = f"{config.gateway_url}/v1/sites/{config.site}/presence/im"
        self._secret = config.secret
        self._session = session

    async def post(self, states: list[tuple[str, ImState]]) -> bool:
        """True when delivered, False to try again later; ``WebhookError`` when retrying
        cannot help. Each call is a new request: new event ids, a new signature."""
        updates = [
            {"agent_id": agent, "state": state, "event_id": uuid.uuid4().hex}
            for agent, state in states
        ]
        body = json.dumps({"updates": updates}, separators=(",", ":")).encode()
        headers = signed_headers(self._secret, int(time.time()), body)
        try:
            async with self._session.post(self._url, data=body, headers=headers) as r:
                text = await r.text()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("presence webhook unreachable: %r", e)
            return False
        if status == 200:
            return True
        if status == 429 or status >= 500:
            log.warning("presence webhook answered %s: %s", status, text[:200])
            return False
        raise WebhookError(f"presence webhook refused the updates ({status}): {text[:300]}")


class PresenceBridge:
    """One bot connection and the posting of what it sees. ``run()`` until ``stop()``."""

    def __init__(self, config: BridgeConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.webhook = Webhook(config, session)
        self.xmpp = slixmpp.ClientXMPP(f"{config.jid}/membrane-bridge", config.password)
        self.xmpp.register_plugin("xep_0199")  # answers and sends pings: finds dead links
        if config.allow_unencrypted:
            self.xmpp.enable_starttls = False
            self.xmpp.enable_direct_tls = False
            self.xmpp.enable_plaintext = True
            self.xmpp.plugin["feature_mechanisms"].unencrypted_scram = True
        # Subscriptions are ours to decide: only the configured agents, both ways.
        self.xmpp.client_roster.auto_authorize = False
        self.xmpp.client_roster.auto_subscribe = False
        for event in ("got_online", "changed_status", "got_offline"):
            self.xmpp.add_event_handler(event, self._presence)
        self.xmpp.add_event_handler("presence_subscribe", self._subscribe_request)
        self.xmpp.add_event_handler("session_start", self._session_start)
        self.xmpp.add_event_handler("session_end", self._session_end)
        self.xmpp.add_event_handler("disconnected", self._disconnected)
        self.xmpp.add_event_handler("failed_all_auth", self._auth_failed)
        self.online = asyncio.Event()
        """Set while the bot's session is up (tests wait on it)."""
        self.offline = asyncio.Event()
        """Set while it is not."""
        self.offline.set()
        self.delivered: asyncio.Queue[tuple[str, ImState]] = asyncio.Queue()
        """Every (agent, state) the gateway took, in order (for tests)."""
        self._pending: dict[str, ImState] = {}
        self._last: dict[str, ImState] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync: asyncio.TimerHandle | None = None
        self._reconnect: asyncio.TimerHandle | None = None
        self._reconnect_delay = RETRY_FIRST_S

    # --- XMPP side ------------------------------------------------------------------------

    def _agent(self, jid: Any) -> str | None:
        return self.config.agents.get(str(jid.bare).lower())

    async def _session_start(self, _: Any) -> None:
        self.xmpp.send_presence(ppriority=-1)  # never the resource a chat goes to
        await self.xmpp.get_roster()
        roster = self.xmpp.client_roster
        for agent_jid in self.config.agents:
            item = roster[agent_jid]
            if item["subscription"] not in ("to", "both") and not item["pending_out"]:
                roster.subscribe(agent_jid)
        log.info("XMPP session up as %s; %d agents", self.config.jid, len(self.config.agents))
        self._reconnect_delay = RETRY_FIRST_S
        self.offline.clear()
        self.online.set()
        self._schedule_sync(self.config.settle_s, everyone=True)

    def _session_end(self, _: Any) -> None:
        self.online.clear()
        self.offline.set()
        if self._sync is not None:
            self._sync.cancel()
            self._sync = None

    def _auth_failed(self, _: Any) -> None:
        log.error("XMPP login refused for %s: check xmpp.jid and the password", self.config.jid)

    def _disconnected(self, reason: Any) -> None:
        if self._stopping:
            return
        delay = self._reconnect_delay
        self._reconnect_delay = min(RETRY_MAX_S, delay * 2)
        log.warning("XMPP connection lost (%s); connecting again in %.0f s", reason, delay)
        if self._reconnect is not None:
            self._reconnect.cancel()
        self._reconnect = asyncio.get_running_loop().call_later(delay, self._connect)

    def _subscribe_request(self, presence: Presence) -> None:
        jid = presence["from"].bare
        if self._agent(presence["from"]) is None:
            self.xmpp.send_presence(pto=jid, ptype="unsubscribed")
            return
        self.xmpp.send_presence(pto=jid, ptype="subscribed")
        item = self.xmpp.client_roster[jid]
        if item["subscription"] not in ("to", "both"):
            self.xmpp.client_roster.subscribe(jid)

    def _presence(self, presence: Presence) -> None:
        agent = self._agent(presence["from"])
        if agent is None:
            return
        state = im_state(self.xmpp.client_roster[presence["from"].bare].resources)
        if self._last.get(agent) != state or agent in self._pending:
            self._enqueue(agent, state)

    def current(self) -> dict[str, ImState]:
        """What the roster says of every configured agent now."""
        roster = self.xmpp.client_roster
        return {
            agent: im_state(roster[jid].resources if roster.has_jid(jid) else {})
            for jid, agent in self.config.agents.items()
        }

    def _schedule_sync(self, delay: float, everyone: bool) -> None:
        if self._sync is not None:
            self._sync.cancel()
        self._sync = asyncio.get_running_loop().call_later(delay, self._full_sync, everyone)

    def _full_sync(self, everyone: bool) -> None:
        """Every agent's state, posted again whether it changed or not: renewing the leases
        of the agents online in XMPP, and (``everyone``, after connecting) telling the
        offline ones too, in case they went while the bridge was away."""
        self._sync = None
        if not self.online.is_set():
            return  # while disconnected the roster is stale: the next session syncs
        for agent, state in self.current().items():
            if everyone or state != "offline":
                self._enqueue(agent, state)
        self._schedule_sync(self.config.renew_s, everyone=False)

    # --- gateway side ---------------------------------------------------------------------

    def _enqueue(self, agent: str, state: ImState) -> None:
        self._pending[agent] = state
        self._wake.set()

    async def _deliver(self, updates: list[tuple[str, ImState]]) -> None:
        """Post until the gateway takes the updates, backing off while it cannot."""
        delay = RETRY_FIRST_S
        while not await self.webhook.post(updates):
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)

    async def _post_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = list(self._pending.items())[:MAX_UPDATES]  # each agent's newest
                refused = await self._deliver_batch(batch)
                for agent, state in batch:
                    self._last[agent] = state
                    if self._pending.get(agent) == state:
                        del self._pending[agent]  # else changed meanwhile: goes next
                    if agent not in refused:
                        self.delivered.put_nowait((agent, state))

    async def _deliver_batch(self, updates: list[tuple[str, ImState]]) -> set[str]:
        """Deliver, and return the agents whose update the gateway refused for good."""
        try:
            await self._deliver(updates)
            return set()
        except WebhookError as e:
            if len(updates) == 1:
                log.error("%s; dropped", e)
                return {updates[0][0]}
        # One bad update (an agent id the site does not have) must not hold up the others:
        # each alone, and only the bad one is dropped.
        refused = set()
        for update in updates:
            refused |= await self._deliver_batch([update])
        return refused

    # --- running --------------------------------------------------------------------------

    def _connect(self) -> None:
        if self.config.host:
            self.xmpp.connect(self.config.host, self.config.port)
        else:
            self.xmpp.connect()

    async def run(self) -> None:
        """Connect and post until ``stop()``."""
        poster = asyncio.create_task(self._post_loop(), name="xmpp-bridge-poster")
        self._tasks.add(poster)
        self._connect()
        try:
            await poster
        except asyncio.CancelledError:
            if not self._stopping:
                raise

    async def stop(self) -> None:
        """Leave XMPP cleanly (the server tells nobody we were there) and stop posting.
        Updates not yet delivered are dropped: the next run posts every agent's state."""
        self._stopping = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        self._session_end(None)
        await close_client(self.xmpp)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def close_client(xmpp: slixmpp.ClientXMPP, wait: float = 2.0) -> None:
    """Disconnect and end the tasks slixmpp keeps: its outgoing filter task outlives a
    disconnect (it is made again on the next connect) and would leak otherwise."""
    xmpp.cancel_connection_attempt()
    await xmpp.disconnect(wait)
    filters: asyncio.Future[Any] | None = getattr(xmpp, "_run_out_filters", None)
    if filters is not None and not filters.done():
        filters.cancel()
        await asyncio.gather(filters, return_exceptions=True)


async def serve(config: BridgeConfig) -> None:
    """The CLI's bridge: runs until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        bridge = PresenceBridge(config, session)
        running = asyncio.create_task(bridge.run(), name="xmpp-bridge")
        stopped = asyncio.create_task(stop.wait(), name="xmpp-bridge-stop")
        await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        await bridge.stop()
        stopped.cancel()
        await asyncio.gather(running, stopped, return_exceptions=True)
