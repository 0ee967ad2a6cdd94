"""Presence by SMS, the pure part (gateway/core/sms_presence.py): what a text means, how long
its lease lasts and what the reply says, as tables."""

from __future__ import annotations

from datetime import UTC, datetime
from datetime import time as clock_time

import pytest

from gateway.core import sms_presence as sms
from gateway.core.model import Branch, OpeningSpan
from gateway.core.sms_presence import Command, ParseProblem, SmsCommand
from gateway.core.text import Text
from gateway.i18n import languages, messages_for
from gateway.settings import ConfigError
from gateway.settings.sites import load_site

EN = sms.vocabulary(("en",), {})
DE = sms.vocabulary(("de", "en"), {}, "de")
SITE_ALIASES = {"de": {"in": ("HIER",), "back": ("GLEICH",)}}
DE_SITE = sms.vocabulary(("de",), SITE_ALIASES, "de")


def text(words: sms.Vocabulary) -> Text:
    return messages_for(words.language)


IN, OUT, BUSY = Command(SmsCommand.IN), Command(SmsCommand.OUT), Command(SmsCommand.BUSY)


@pytest.mark.parametrize(
    ("words", "body", "expected"),
    [
        (EN, "IN", IN),
        (EN, "in", IN),
        (EN, "  In \n", IN),
        (EN, "OUT", OUT),
        (EN, "busy", BUSY),
        (EN, "BACK 15", Command(SmsCommand.BACK, 15)),
        (EN, "back   15 ", Command(SmsCommand.BACK, 15)),
        (EN, "Back15", Command(SmsCommand.BACK, 15)),
        (EN, "BACK 1", Command(SmsCommand.BACK, 1)),
        (EN, "BACK 240", Command(SmsCommand.BACK, 240)),
        (EN, "BACK 0", ParseProblem.BAD_MINUTES),
        (EN, "BACK 241", ParseProblem.BAD_MINUTES),
        (EN, "BACK 99999", ParseProblem.BAD_MINUTES),
        (EN, "BACK", ParseProblem.BAD_MINUTES),
        (EN, "BACK fifteen", ParseProblem.UNKNOWN),
        (EN, "BACK 1 5", ParseProblem.UNKNOWN),
        (EN, "BACK -5", ParseProblem.UNKNOWN),
        (EN, "IN now", ParseProblem.UNKNOWN),
        (EN, "IN5", ParseProblem.UNKNOWN),
        (EN, "", ParseProblem.UNKNOWN),
        (EN, "   ", ParseProblem.UNKNOWN),
        (EN, "hello", ParseProblem.UNKNOWN),
        (EN, "15", ParseProblem.UNKNOWN),
        (EN, "DA", ParseProblem.UNKNOWN),  # German words only for agents who speak it
        (DE, "da", IN),
        (DE, "WEG", OUT),
        (DE, "Besetzt", BUSY),
        (DE, "ZURÜCK 15", Command(SmsCommand.BACK, 15)),
        (DE, "zurück 15", Command(SmsCommand.BACK, 15)),
        (DE, "ZURU\u0308CK 15", Command(SmsCommand.BACK, 15)),  # decomposed Ü
        (DE, "zurueck 5", Command(SmsCommand.BACK, 5)),
        (DE, "IN", IN),  # English always understood
        (DE, "back 5", Command(SmsCommand.BACK, 5)),
        (DE_SITE, "hier", IN),  # the site's word replaces the built-in one...
        (DE_SITE, "DA", ParseProblem.UNKNOWN),
        (DE_SITE, "gleich 10", Command(SmsCommand.BACK, 10)),
        (DE_SITE, "WEG", OUT),  # ...only for the commands it names
    ],
)
def test_parse(words: sms.Vocabulary, body: str, expected: Command | ParseProblem) -> None:
    assert sms.parse(body, words) == expected


def test_the_help_shows_the_words_of_the_reply_language() -> None:
    assert EN.shown[SmsCommand.BACK] == "BACK"
    assert DE.shown[SmsCommand.BACK] == "ZURÜCK"
    assert sms.vocabulary(("de",), {}, "en").shown[SmsCommand.BACK] == "BACK"
    assert sms.parse("zurück 5", sms.vocabulary(("de",), {}, "en")) == Command(SmsCommand.BACK, 5)


# 2026-12-02 is a Wednesday; Berlin is UTC+1 in December.
NOON_UTC = datetime(2026, 12, 2, 12, 0, tzinfo=UTC).timestamp()
BERLIN = Branch(
    "berlin",
    "Berlin",
    "Europe/Berlin",
    hours={d: (OpeningSpan(clock_time(9, 0), clock_time(18, 0)),) for d in range(5)},
)
AROUND_THE_CLOCK = Branch(
    "online",
    "Online",
    "UTC",
    hours={d: (OpeningSpan(clock_time(0, 0), clock_time(0, 0)),) for d in range(7)},
)
EIGHT_H = 8 * 3600.0


@pytest.mark.parametrize(
    ("branch", "now", "expected"),
    [
        (BERLIN, NOON_UTC, datetime(2026, 12, 2, 17, 0, tzinfo=UTC).timestamp()),  # 18:00 local
        (BERLIN, NOON_UTC + 6 * 3600, NOON_UTC + 6 * 3600 + EIGHT_H),  # closed: default
        (AROUND_THE_CLOCK, NOON_UTC, NOON_UTC + EIGHT_H),  # never closes: default
        (None, NOON_UTC, NOON_UTC + EIGHT_H),
    ],
)
def test_lease_end(branch: Branch | None, now: float, expected: float) -> None:
    assert sms.lease_end(branch, now, EIGHT_H) == expected


UNTIL = datetime(2026, 12, 2, 17, 0, tzinfo=UTC).timestamp()
BACK_AT = datetime(2026, 12, 2, 14, 32, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("words", "belief", "zone", "expected"),
    [
        (EN, sms.Belief.AVAILABLE, "Europe/Berlin", "You're available on your mobile until 18:00."),
        (EN, sms.Belief.AVAILABLE, "UTC", "You're available on your mobile until 17:00 UTC."),
        (EN, sms.Belief.SIGNED_OUT, "Europe/Berlin", "You're signed out on your mobile."),
        (EN, sms.Belief.BUSY, "Europe/Berlin", "You're busy until 18:00."),
        (EN, sms.Belief.AWAY, "Europe/Berlin", "You're away; available again at 15:32."),
        (
            EN,
            sms.Belief.AWAY_UNTIL_CLOSE,
            "Europe/Berlin",
            "You're away until 18:00, when your branch closes.",
        ),
        (DE, sms.Belief.AVAILABLE, "Europe/Berlin", "Sie sind auf dem Handy erreichbar bis 18:00."),
        (DE, sms.Belief.SIGNED_OUT, "Europe/Berlin", "Sie sind auf dem Handy abgemeldet."),
        (DE, sms.Belief.BUSY, "Europe/Berlin", "Sie sind besetzt bis 18:00."),
        (
            DE,
            sms.Belief.AWAY,
            "Europe/Berlin",
            "Sie sind abwesend; wieder erreichbar um 15:32.",
        ),
    ],
)
def test_reply(words: sms.Vocabulary, belief: sms.Belief, zone: str, expected: str) -> None:
    assert sms.reply(words, belief, zone, UNTIL, text(words), BACK_AT) == expected


def test_help_names_the_agents_own_words() -> None:
    assert sms.problem_reply(EN, ParseProblem.UNKNOWN, text(EN)) == (
        "Text IN to be available, OUT to sign out, BUSY, or BACK 15 (minutes)."
    )
    assert sms.problem_reply(DE_SITE, ParseProblem.UNKNOWN, text(DE_SITE)) == (
        "Schreiben Sie HIER (erreichbar), WEG (abmelden), BESETZT oder GLEICH 15 (Minuten)."
    )
    assert sms.problem_reply(DE, ParseProblem.BAD_MINUTES, text(DE)) == (
        "Schreiben Sie ZURÜCK und die Minuten, 1 bis 240: ZURÜCK 15."
    )
    # Every language with built-in words has a catalogue, and every reply fills in.
    assert set(sms.DEFAULT_ALIASES) <= set(languages())
    for language in sms.DEFAULT_ALIASES:
        words = sms.vocabulary((language,), {}, language)
        for problem in ParseProblem:
            assert "{" not in sms.problem_reply(words, problem, text(words))
        for belief in sms.Belief:
            assert "{" not in sms.reply(words, belief, "UTC", UNTIL, text(words), BACK_AT)


# --- the site's words, as configured (gateway/settings/sms.py) ----------------------------------

SITE = {"id": "s", "caller_ids": ["+15005550006"]}


def test_a_sites_words_load() -> None:
    site = load_site(SITE | {"sms_aliases": {"de": {"in": ["HIER"], "back": ["GLEICH"]}}}, "s")
    assert site.sms_aliases == {"de": {"in": ("HIER",), "back": ("GLEICH",)}}
    assert load_site(SITE, "s").sms_aliases == {}


@pytest.mark.parametrize(
    ("aliases", "key"),
    [
        (["DA"], "s.sms_aliases"),
        ({"Deutsch": {"in": ["DA"]}}, "s.sms_aliases.Deutsch"),
        ({"de": ["DA"]}, "s.sms_aliases.de"),
        ({"de": {"on": ["DA"]}}, "s.sms_aliases.de.on"),
        ({"de": {"in": "DA"}}, "s.sms_aliases.de.in"),
        ({"de": {"in": ["BIN DA"]}}, "s.sms_aliases.de.in[0]"),
        ({"de": {"back": ["ZURÜCK15"]}}, "s.sms_aliases.de.back[0]"),
        ({"de": {"in": [""]}}, "s.sms_aliases.de.in[0]"),
    ],
)
def test_bad_words_are_refused_naming_the_key(aliases: object, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_site(SITE | {"sms_aliases": aliases}, "s")
    assert refused.value.key == key
