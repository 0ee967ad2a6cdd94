"""The message catalogues: every sentence Membrane says to a person, in their language.

A sentence is written in English in the code, as gettext's message id
(``text.gettext("You're busy until {until}.")``), and translated in ``gateway/locale/<lang>.po``,
one standard PO file per language, which translators edit with any PO tool. The files are
read once, when first asked for (Babel compiles each to gettext's form in memory, so there is
no build step); ``tests/test_i18n.py`` checks that each file translates every message the code
uses, with the same ``{placeholders}``.

Sentences are whole, with placeholders, never put together from pieces: word order differs
between languages. The pure core takes a ``Messages`` as its ``Text`` (``gateway.core.text``).
"""

from __future__ import annotations

import gettext
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Final

from babel import Locale, UnknownLocaleError
from babel.core import get_global
from babel.dates import format_datetime, format_time
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

SOURCE_LANGUAGE: Final = "en"
"""The language the message ids are written in: it needs no catalogue."""
CATALOGUE_DIR: Final = "locale"


@dataclass(frozen=True, slots=True)
class Messages:
    """One language's sentences (``gateway.core.text.Text``)."""

    language: str
    """BCP 47, as given in settings and by browsers: ``de``, ``pt-BR``."""
    _translations: gettext.NullTranslations

    def gettext(self, message: str) -> str:
        return self._translations.gettext(message)

    @property
    def say_language(self) -> str:
        """The language tag for a voice reading these sentences out (Twilio's ``<Say
        language>`` takes a language with its region: ``de-DE``)."""
        return speech_tag(self.language)


def _tag(file_stem: str) -> str:
    return file_stem.replace("_", "-")


@cache
def languages() -> tuple[str, ...]:
    """Every language Membrane speaks: English, then one per catalogue file, sorted."""
    found = sorted(
        _tag(entry.name.removesuffix(".po"))
        for entry in resources.files("gateway").joinpath(CATALOGUE_DIR).iterdir()
        if entry.name.endswith(".po")
    )
    return (SOURCE_LANGUAGE, *found)


@cache
def _read(language: str) -> Catalog:
    name = language.replace("-", "_") + ".po"
    with resources.files("gateway").joinpath(CATALOGUE_DIR, name).open("rb") as po:
        return read_po(po, locale=language.replace("-", "_"))


@cache
def _load(language: str) -> gettext.NullTranslations:
    if language == SOURCE_LANGUAGE:
        return gettext.NullTranslations()
    catalog = _read(language)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)  # fuzzy entries are left out, as msgfmt does
    compiled.seek(0)
    return gettext.GNUTranslations(compiled)


@cache
def browser_catalogue(language: str) -> Mapping[str, str]:
    """Every translated sentence of ``language`` (one Membrane speaks), message id to
    translation, for the pages the gateway serves (the ticket page, the widget, the agent
    app), which look their sentences up in the same catalogues as the phone prompts. Fuzzy
    entries are left out, as gettext leaves them out."""
    if language == SOURCE_LANGUAGE:
        return MappingProxyType({})
    return MappingProxyType(
        {
            m.id: m.string
            for m in _read(language)
            if isinstance(m.id, str)
            and m.id
            and isinstance(m.string, str)
            and m.string
            and not m.fuzzy
        }
    )


def load_all() -> None:
    """Read every catalogue now (a node calls this as it starts): a broken file fails the
    start, not a ring, and no request waits on the disk."""
    for language in languages():
        _load(language)


def best_language(wanted: Iterable[str | None]) -> str:
    """The first of ``wanted`` (most preferred first) that Membrane speaks, matching a
    region to its language (``de-AT`` is spoken as ``de``); English when none is."""
    known = languages()
    for tag in wanted:
        if not tag:
            continue
        if tag in known:
            return tag
        base = tag.split("-", 1)[0].split("_", 1)[0].lower()
        if base in known:
            return base
    return SOURCE_LANGUAGE


def messages_for(*wanted: str | None) -> Messages:
    """The sentences in the first language of ``wanted`` that Membrane speaks."""
    language = best_language(wanted)
    return Messages(language, _load(language))


def clock_time(at: float, zone: tzinfo, language: str, now: float) -> str:
    """``at`` as the clock reads it in ``zone``, written the way ``language`` writes times
    (15:20, 3:20 PM), with the date when it is not the day of ``now`` there."""
    when = datetime.fromtimestamp(at, zone)
    try:
        locale = Locale.parse(language, sep="-")
    except (ValueError, TypeError, UnknownLocaleError):
        locale = Locale.parse(SOURCE_LANGUAGE)
    if when.date() == datetime.fromtimestamp(now, zone).date():
        return format_time(when, format="short", locale=locale)
    return format_datetime(when, format="short", locale=locale)


@cache
def speech_tag(language: str) -> str:
    """``de`` -> ``de-DE``, ``en`` -> ``en-US``, ``pt-BR`` as it is: a voice needs the region,
    which a bare language gets from CLDR's likely subtags."""
    try:
        locale = Locale.parse(language, sep="-")
    except (ValueError, TypeError, UnknownLocaleError):
        return "en-US"
    territory = locale.territory
    if territory is None:
        likely = get_global("likely_subtags").get(locale.language, "")
        territory = likely.split("_")[-1] if likely.count("_") >= 1 else None
    return f"{locale.language}-{territory}" if territory else locale.language
