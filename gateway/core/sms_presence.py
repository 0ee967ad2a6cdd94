"""Presence by SMS: what an agent's text means and what the reply says. Pure: no I/O, no clock.

An agent texts the site's number ``IN``, ``OUT``, ``BUSY`` or ``BACK 15`` (or a word of their
own language, per site or built in); ``parse`` reads it against the agent's ``Vocabulary``.
The service applies the command to the agent's ``mobile`` device (``sms``) and answers with
``reply``, in the agent's language, saying what the gateway now believes.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final
from zoneinfo import ZoneInfo

from gateway.core.hours import closes_at
from gateway.core.model import Branch
from gateway.core.text import Text


class SmsCommand(StrEnum):
    """What an agent can text; the value is the English word, which is always understood."""

    IN = "in"
    OUT = "out"
    BUSY = "busy"
    BACK = "back"


MIN_BACK_MINUTES: Final = 1
MAX_BACK_MINUTES: Final = 240

DEFAULT_ALIASES: Final[Mapping[str, Mapping[SmsCommand, tuple[str, ...]]]] = {
    "en": {
        SmsCommand.IN: ("IN",),
        SmsCommand.OUT: ("OUT",),
        SmsCommand.BUSY: ("BUSY",),
        SmsCommand.BACK: ("BACK",),
    },
    "de": {
        SmsCommand.IN: ("DA", "EIN"),
        SmsCommand.OUT: ("WEG", "AUS"),
        SmsCommand.BUSY: ("BESETZT",),
        SmsCommand.BACK: ("ZURÜCK", "ZURUECK"),
    },
}
"""The built-in words per language. A site's ``sms_aliases`` replace a language's words for
the commands they name (the first word of each is the one the help reply shows)."""

_BACK_MINUTES = re.compile(r"([0-9]{1,4})")
"""ASCII digits only; more than four is refused as out of range rather than parsed."""


def _fold(text: str) -> str:
    """Case- and form-insensitive: phones send "Zurück" composed or decomposed."""
    return unicodedata.normalize("NFC", text).casefold()


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """The words one agent may text, and the language replies are written in."""

    language: str
    words: Mapping[str, SmsCommand]
    """Folded word -> command."""
    shown: Mapping[SmsCommand, str]
    """The word of each command the help reply shows (in ``language``)."""


def aliases_for(
    language: str, site_aliases: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> Mapping[SmsCommand, tuple[str, ...]]:
    """The words of ``language``: the built-in ones, with the site's replacing those it names."""
    words = dict(DEFAULT_ALIASES.get(language, {}))
    for name, given in site_aliases.get(language, {}).items():
        if given:
            words[SmsCommand(name)] = tuple(given)
    return words


def vocabulary(
    languages: tuple[str, ...],
    site_aliases: Mapping[str, Mapping[str, tuple[str, ...]]],
    reply_language: str = "en",
) -> Vocabulary:
    """English always, plus the words of each of the agent's languages; the help reply shows
    the words of ``reply_language`` (the language replies are written in)."""
    words: dict[str, SmsCommand] = {command.value: command for command in SmsCommand}
    for language in ("en", *languages):
        for command, given in aliases_for(language, site_aliases).items():
            for word in given:
                words.setdefault(_fold(word), command)
    ours = aliases_for(reply_language, site_aliases)
    shown = {c: (ours.get(c) or (c.value.upper(),))[0] for c in SmsCommand}
    return Vocabulary(reply_language, words, shown)


@dataclass(frozen=True, slots=True)
class Command:
    command: SmsCommand
    minutes: int = 0
    """For ``BACK``: minutes until available again."""


class ParseProblem(StrEnum):
    UNKNOWN = "unknown"
    """Not a command: answered with the help text."""
    BAD_MINUTES = "bad_minutes"
    """``BACK`` without minutes, or out of range."""


def parse(body: str, words: Vocabulary) -> Command | ParseProblem:
    """The command in an SMS body: one word, and for ``BACK`` its minutes (``BACK 15``,
    ``back15``); case, surrounding space and repeated spaces do not matter."""
    text = " ".join(_fold(body).split())
    if not text:
        return ParseProblem.UNKNOWN
    head, _, rest = text.partition(" ")
    command = words.words.get(head)
    if command is None:
        # "BACK15": the word with the minutes glued on.
        stripped = head.rstrip("0123456789")
        if stripped != head and not rest:
            command = words.words.get(stripped)
            rest = head[len(stripped) :]
        if command is not SmsCommand.BACK:
            return ParseProblem.UNKNOWN
    if command is not SmsCommand.BACK:
        return Command(command) if not rest else ParseProblem.UNKNOWN
    match = _BACK_MINUTES.fullmatch(rest)
    if match is None:
        return ParseProblem.BAD_MINUTES if not rest or rest.isdigit() else ParseProblem.UNKNOWN
    minutes = int(match.group(1))
    if not MIN_BACK_MINUTES <= minutes <= MAX_BACK_MINUTES:
        return ParseProblem.BAD_MINUTES
    return Command(SmsCommand.BACK, minutes)


def lease_end(branch: Branch | None, now: float, default_lease_s: float) -> float:
    """When SMS presence set at ``now`` ends: when the agent's branch next closes if it is
    open now, otherwise (no branch, closed now, or open around the clock) after the default
    lease."""
    if branch is not None:
        closing = closes_at(branch, now)
        if closing is not None:
            return closing
    return now + default_lease_s


# --- replies -----------------------------------------------------------------------------------


class Belief(StrEnum):
    """What the gateway believes of the agent's mobile after the command."""

    AVAILABLE = "available"
    SIGNED_OUT = "signed_out"
    BUSY = "busy"
    AWAY = "away"
    """Away, and available again at ``back_at``."""
    AWAY_UNTIL_CLOSE = "away_until_close"
    """Away until the lease ends: the branch closes before ``back_at``."""


def unknown_sender_reply(text: Text) -> str:
    """To a sender who is no agent (whose language is not known)."""
    return text.gettext("This number isn't registered with Membrane.")


def clock_time(at: float, zone: str) -> str:
    """``at`` as the agent reads a clock: HH:MM in their branch's zone (``UTC`` said)."""
    local = datetime.fromtimestamp(at, ZoneInfo(zone))
    return f"{local:%H:%M}" + (" UTC" if zone == "UTC" else "")


def reply(
    words: Vocabulary, belief: Belief, zone: str, until: float, text: Text, back_at: float = 0.0
) -> str:
    """What the gateway now believes, in the agent's language (``text``)."""
    template = {
        Belief.AVAILABLE: text.gettext("You're available on your mobile until {until}."),
        Belief.SIGNED_OUT: text.gettext("You're signed out on your mobile."),
        Belief.BUSY: text.gettext("You're busy until {until}."),
        Belief.AWAY: text.gettext("You're away; available again at {back}."),
        Belief.AWAY_UNTIL_CLOSE: text.gettext(
            "You're away until {until}, when your branch closes."
        ),
    }[belief]
    return template.format(until=clock_time(until, zone), back=clock_time(back_at, zone))


def problem_reply(words: Vocabulary, problem: ParseProblem, text: Text) -> str:
    if problem is ParseProblem.BAD_MINUTES:
        template = text.gettext("Text {back} and the minutes, from 1 to 240: {back} 15.")
    else:
        template = text.gettext(
            "Text {in_} to be available, {out} to sign out, {busy}, or {back} 15 (minutes)."
        )
    shown = words.shown
    return template.format(
        in_=shown[SmsCommand.IN],
        out=shown[SmsCommand.OUT],
        busy=shown[SmsCommand.BUSY],
        back=shown[SmsCommand.BACK],
    )
