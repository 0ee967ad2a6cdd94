"""The agent's side of every call, whatever its channel: accept, decline, hang up, take a call
over on a new socket, the ring missed while away, a socket that left or lapsed; and the replay
for a node that missed other nodes' emits. What differs by channel is asked of the call's flow
(``CallRecords.flow``)."""

from __future__ import annotations

from functools import partial

from gateway.core import call as calls
from gateway.core.call import Call, CallState
from gateway.core.errors import Conflict, Forbidden, NotFound
from gateway.core.model import PresenceRecord
from gateway.services.call_records import CallRecords
from gateway.services.presence_service import socket_device_id
from gateway.wire.codec import Json, call_from_record

# After a node missed other nodes' emits, it replays at most this many of each site's most
# recently changed calls to its sockets (CallDesk.replay_since).
REPLAY_LIMIT = 200


class CallDesk:
    def __init__(self, records: CallRecords) -> None:
        self._records = records
        self._store = records.store
        self._notify = records.notify

    def _own(self, call: Call, site_id: str) -> Call:
        if call.site != site_id:
            raise NotFound(f"no call {call.call_id!r}")
        return call

    async def accept(self, site_id: str, agent_id: str, agent_sid: str, call_id: str) -> Call:
        records = self._records
        now = records.clock()

        def ringing_here(c: Call) -> bool:
            return (
                c.site == site_id
                and c.state is CallState.RINGING
                and c.agent_id == agent_id
                and not calls.ring_over(c, agent_id, now)
            )

        seen = self._own(await records.remembered(call_id, ringing_here), site_id)
        if seen.state is not CallState.RINGING or seen.agent_id != agent_id:
            raise Conflict("this call is not ringing for you", code="not_ringing")
        if calls.ring_over(seen, agent_id, now):
            # Answered after its end (it reached the agent late, or the timer runs behind):
            # end the ring now rather than when the timer gets to it.
            await records.ring_timeout(call_id, seen.attempt)
            raise Conflict("this ring has ended", code="ring_expired")
        # The agent must still be reserved for this call: a ring answered after its
        # reservation lapsed (a node far behind) may have been given to another call. The
        # check, and the reservation kept for the call, go with the call's write.
        try:
            _, call = await records.update(
                call_id,
                lambda c: calls.accept(c, agent_id, agent_sid, records.clock()),
                seen,
                holding=agent_id,
            )
        except (Conflict, NotFound):
            await records.release_agent(site_id, agent_id, call_id)  # if it is still the call's
            raise
        # Stored: what follows must happen even if the store goes away now, since the agent's
        # retry would find the call no longer ringing.
        await records.until_stored(
            partial(records.after_accept, call, agent_id), f"accepted:{call_id}"
        )
        return call

    async def decline(self, site_id: str, agent_id: str, call_id: str) -> Call:
        records = self._records
        self._own(await records.get(call_id), site_id)
        before, call = await records.update(
            call_id, lambda c: calls.decline(c, agent_id, records.clock())
        )
        await records.ring_over(before, call, agent_id, "declined")
        return await records.flow(call).ring_missed(call)

    async def hangup(self, site_id: str, agent_id: str, call_id: str) -> Call:
        call = self._own(
            await self._records.remembered(
                call_id, lambda c: c.site == site_id and c.agent_id == agent_id
            ),
            site_id,
        )
        if call.agent_id != agent_id:
            raise Forbidden("this is not your call")
        return await self._records.end(call_id, "agent_hung_up", "The agent ended the call", call)

    async def hold(
        self, site_id: str, agent_id: str, agent_sid: str, call_id: str, on: bool
    ) -> Call:
        """Hold the call the agent talks in from this socket, or take it off hold: noted in
        the timeline (both parties see it), and, bridged to a phone, done by the bridge (the
        agent app itself stops its microphone and speaker in a browser call)."""
        call = self._own(await self._records.get(call_id), site_id)
        if call.agent_id != agent_id or call.agent_sid != agent_sid:
            raise Forbidden("not your call on this socket")
        return await self._records.hold(call, on)

    async def relay_signal(
        self, site_id: str, sender_id: str, sender_sid: str, from_agent: bool, payload: Json
    ) -> None:
        await self._records.relay_signal(site_id, sender_id, sender_sid, from_agent, payload)

    async def resume_agent(
        self, site_id: str, agent_id: str, agent_sid: str, call_id: str
    ) -> Call | None:
        """An agent's new socket takes over the connected browser call it names (its old
        socket dropped, or that socket's node drained), if the call is still this agent's."""
        try:
            call = self._own(await self._records.get(call_id), site_id)
            _, call = await self._records.update(
                call_id, lambda c: calls.reattach_agent(c, agent_id, agent_sid), call
            )
        except (Conflict, NotFound):
            return None
        return call

    async def missed_ring(self, site_id: str, agent_id: str) -> Json | None:
        """The ``call:ring`` of a call ringing the agent now, for a socket that connected
        after it went out (the agent app reconnecting, e.g. from a draining node)."""
        call_id = self._records.ringing.ringing_for(site_id, agent_id)
        if call_id is None:
            return None
        call = await self._records.find(call_id)
        if (
            call is None
            or call.state is not CallState.RINGING
            or call.agent_id != agent_id
            or call.ring_expires_at is None
            or call.ring_expires_at <= self._records.clock()
        ):
            return None
        return await self._records.flow(call).ring_payload(call)

    async def agent_left(
        self, site_id: str, agent_id: str, agent_sid: str, call_ids: set[str]
    ) -> None:
        """An agent's socket closed: each call it was talking on is told (a browser call
        gets a grace period to be taken over by a new socket). Nothing else would ever do it
        (the socket is gone), so a store outage only delays it."""
        left_at = self._records.clock()
        for call_id in call_ids:
            await self._records.until_stored(
                partial(self._agent_left, agent_sid, call_id, left_at), f"agent-left:{call_id}"
            )

    async def _agent_left(self, agent_sid: str, call_id: str, left_at: float) -> None:
        call = await self._records.find(call_id)
        if call is None or call.final or call.agent_sid != agent_sid:
            return
        await self._records.flow(call).agent_left(call, agent_sid, left_at)

    async def agent_devices_lapsed(
        self, site_id: str, agent_id: str, record: PresenceRecord
    ) -> None:
        """The agent's node died mid-call (its socket's lease lapsed, so no disconnect handler
        ran): end the call, or the agent would stay on_call and never be routed again. This
        node alone claimed the lapse, so nothing else would: a store outage only delays it."""
        if record.active_call is None:
            return
        live = frozenset(d.device_id for d in record.devices)
        await self._records.until_stored(
            partial(self._agent_devices_lapsed, site_id, agent_id, record.active_call, live),
            f"agent-lapsed:{record.active_call}",
        )

    async def _agent_devices_lapsed(
        self, site_id: str, agent_id: str, call_id: str, live: frozenset[str]
    ) -> None:
        call = await self._records.find(call_id)
        if call is not None and not call.final:
            if call.agent_sid is not None and socket_device_id(call.agent_sid) not in live:
                # The socket has been gone for a whole lease, longer than the grace period.
                await self._records.flow(call).agent_gone(call.call_id, call.agent_sid)
            return
        # Ended (or gone) elsewhere, or by an earlier try of this step that the store cut
        # short once the end was stored: the agent is freed as the end would have freed her.
        await self._records.free_if_held(site_id, agent_id, call_id)

    async def replay_since(self, since: float) -> None:
        """This node heard no other node's emits from about ``since`` (its socket.io listener
        lost Redis): tell its own sockets where each call that changed since then stands, as
        the emits they missed would have (pub/sub does not keep them)."""
        for site_id in self._records.sites:
            # Oldest first, as the emits would have come.
            for row in reversed(await self._store.list_calls(site_id, REPLAY_LIMIT)):
                call = call_from_record(row.data, row.version)
                if calls.last_changed(call) < since:
                    continue
                ring, over = await self._records.flow(call).replay(call)
                await self._notify.replay(call, ring, over)
