"""``<Gather>`` (a scripted key press or silence per phone) and ``<Dial><Conference>`` (legs
meeting in a named room) for the simulator's executor (server.py); see spec/TWIML.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .contract import check_twiml_verb
from .records import ConferenceRecord, Notification, VerbRecord
from .twiml import Document, Node

if TYPE_CHECKING:
    from .server import Next, TwilioSim, _Call


GATHER_NESTED = frozenset({"Say", "Play", "Pause"})


def _attr_int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def check_node(c: _Call, node: Node, parent: str | None = None) -> bool:
    """Check ``node`` (and its children) against the TwiML contract; problems are Twilio's
    schema warnings (12200) on the call. False if there were any."""
    problems = check_twiml_verb(node.tag, node.attrs, parent)
    for child in node.children:
        problems += check_twiml_verb(child.tag, child.attrs, node.tag)
    for p in problems:
        c.record.notifications.append(Notification(12200, p))
    return not problems


async def run_gather(sim: TwilioSim, c: _Call, node: Node, doc: Document) -> Next:
    """Nested ``<Say>``/``<Play>``/``<Pause>`` run first; then the phone's scripted keys
    (``PhoneConfig.press``) arrive after ``press_after``, or nothing until ``timeout``. With
    input, ``Digits`` goes to ``action`` (default: the document's URL) and its TwiML replaces
    the document; without, ``action`` is requested only with ``actionOnEmptyResult="true"``,
    else the next verb runs."""
    check_node(c, node)
    attrs = node.attrs
    timeout = max(0, _attr_int(attrs.get("timeout"), 5))
    num_digits = _attr_int(attrs.get("numDigits"), 0)
    finish_on_key = attrs.get("finishOnKey", "#")
    verb = VerbRecord("Gather", attrs, "", {"timeout": timeout, "numDigits": num_digits})
    sim._record_verb(c, verb)
    for child in node.children:
        if child.tag in GATHER_NESTED:
            await sim._run_verb(c, child, doc)
    press = c.phone.press
    digits = ""
    if press:
        await c.wait_until(delay=min(c.phone.press_after, float(timeout)))
        if c.phone.press_after <= timeout:
            for key in press:
                if finish_on_key and key == finish_on_key:
                    break
                digits += key
                if num_digits and len(digits) >= num_digits:
                    break
    else:
        await c.wait_until(delay=timeout)
    verb.detail["Digits"] = digits
    sim._notify()
    empty_action = attrs.get("actionOnEmptyResult", "false") == "true"
    if not digits and not empty_action:
        return None
    action = sim._resolve(c, doc, attrs.get("action")) or doc.url
    if action is None:
        return None
    params = [("Digits", digits)] if digits else []
    nxt = await sim._fetch_document(c, action, attrs.get("method", "POST"), "action", params)
    if nxt is None:
        sim._application_error(c)
        return "hangup"
    return nxt


@dataclass
class Room:
    """A conference in progress: the legs in it now, and its public record."""

    record: ConferenceRecord
    members: list[_Call] = field(default_factory=list)
    starters: int = 0

    @property
    def ended(self) -> bool:
        return self.record.ended

    def note_together(self) -> None:
        if self.starters > 0 and len(self.members) >= 2:
            for m in self.members:
                if m.record.sid not in self.record.bridged:
                    self.record.bridged.append(m.record.sid)


async def run_conference(sim: TwilioSim, c: _Call, dial: Node, noun: Node, doc: Document) -> Next:
    """The leg joins room ``noun.text`` (started by a ``startConferenceOnEnter`` participant,
    default true) until it hangs up or the room ends: a participant with
    ``endConferenceOnExit="true"`` leaving ends it for everyone. Then ``<Dial action>`` gets
    ``DialCallStatus=answered`` (no ``DialCallSid``), or the next verb runs."""
    check_node(c, dial)
    name = noun.text
    room = sim.rooms.get(name)
    if room is None or room.ended:
        room = Room(ConferenceRecord(name=name, sid=sim.new_conference_sid()))
        sim.rooms[name] = room
        sim.conferences.append(room.record)
    starts = noun.attrs.get("startConferenceOnEnter", "true") == "true"
    ends = noun.attrs.get("endConferenceOnExit", "false") == "true"
    verb = VerbRecord("Dial", dial.attrs, "", {"conference": name})
    sim._record_verb(c, verb)
    room.members.append(c)
    room.record.participants.append(c.record.sid)
    room.starters += 1 if starts else 0
    room.note_together()
    for m in room.members:
        m.poke()
    sim._notify()
    interrupted: BaseException | None = None
    try:
        await c.wait_until(lambda: room.ended)
    except BaseException as exc:  # a hang-up, a redirect: the leg leaves the room
        interrupted = exc
    finally:
        room.members.remove(c)
        room.starters -= 1 if starts else 0
        if ends and not room.ended:
            room.record.ended = True
            room.record.ended_by = c.record.sid
        if not room.members:
            room.record.ended = True
        for m in room.members:
            m.poke()
        sim._notify()
    from .server import CallInterrupted  # server imports this module

    action = sim._resolve(c, doc, dial.attrs.get("action"))
    params = [("DialCallStatus", "answered"), ("DialBridged", "true")]
    if interrupted is not None:
        # As for <Dial><Number>: the action is requested (its answer ignored) when the leg
        # hangs up in the room, after the call has ended.
        if action is not None and isinstance(interrupted, CallInterrupted):
            if interrupted.reason != "redirect":
                sim._finish(c, "completed", 200)
            await sim._fetch_document(c, action, dial.attrs.get("method", "POST"), "action", params)
        raise interrupted
    if action is None:
        return None
    nxt = await sim._fetch_document(c, action, dial.attrs.get("method", "POST"), "action", params)
    if nxt is None:
        sim._application_error(c)
        return "hangup"
    return nxt
