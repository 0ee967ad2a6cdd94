"""The message catalogues (gateway/i18n.py, gateway/locale/*.po): every sentence the code
marks for translation is translated in every language, with the same placeholders, and a
person's languages pick the catalogue and the voice."""

from __future__ import annotations

import string
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.pofile import read_po

from gateway.i18n import best_language, languages, messages_for, speech_tag

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"
WEB_CLIENT = ROOT / "web_client"
TRANSLATED_PAGES = [
    ("ticket/**.js", "javascript"),
    ("widget.js", "javascript"),
    ("agent/**.js", "javascript"),
    ("board/**.js", "javascript"),
]
"""The browser pages whose sentences come from the catalogues (``gettext("...")``, and the
widget's ``T("...")`` for the words its panels are built with)."""
PAGE_KEYWORDS = {**DEFAULT_KEYWORDS, "T": None}


TRANSLATED_HTML = [WEB_CLIENT / "agent" / "index.html", WEB_CLIENT / "board" / "index.html"]
"""Pages whose own words are put in the catalogue's language as they load (the agent app's
``translatePage``): every text and ``aria-label`` outside ``translate="no"`` and code."""


class PageWords(HTMLParser):
    """The texts and ``aria-label`` values of a page that its script translates."""

    SKIPPED = frozenset({"code", "script", "style"})

    def __init__(self) -> None:
        super().__init__()
        self.words: set[str] = set()
        self._open: list[tuple[str, bool]] = []  # each open element: skipped (with its parents)?

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        given = dict(attrs)
        parent = self._open[-1][1] if self._open else False
        skipped = parent or tag in self.SKIPPED or given.get("translate") == "no"
        if tag not in VOID_ELEMENTS:
            self._open.append((tag, skipped))
        label = given.get("aria-label")
        if label and not skipped:
            self.words.add(label)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        text = data.strip()
        if text and any(c.isalpha() for c in text) and not (self._open and self._open[-1][1]):
            self.words.add(text)


VOID_ELEMENTS = frozenset({"meta", "link", "input", "br", "img", "hr", "source"})


def page_words(path: Path) -> set[str]:
    parser = PageWords()
    parser.feed(path.read_text())
    return parser.words


def used_messages() -> set[str]:
    """The message ids in the code: arguments of ``gettext(...)`` and ``N_(...)``, in the
    gateway and in the pages it serves, and the words of the pages translated as they load."""
    pages = {word for path in TRANSLATED_HTML for word in page_words(path)}
    found = [
        *extract_from_dir(str(GATEWAY), method_map=[("**.py", "python")]),
        *extract_from_dir(str(WEB_CLIENT), method_map=TRANSLATED_PAGES, keywords=PAGE_KEYWORDS),
    ]
    return pages | {message for _, _, message, _, _ in found if isinstance(message, str)}


def fields(message: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(message) if name is not None}


def test_the_code_marks_its_sentences() -> None:
    used = used_messages()
    assert "Press 1 to take the call." in used and "Thank you. Goodbye." in used
    assert "You're on the phone with {agent}." in used  # the ticket page's
    assert len(used) >= 70


@pytest.mark.parametrize("language", [lang for lang in languages() if lang != "en"])
def test_every_sentence_is_translated_with_the_same_placeholders(language: str) -> None:
    name = language.replace("-", "_") + ".po"
    with resources.files("gateway").joinpath("locale", name).open("rb") as po:
        catalog = read_po(po, locale=language.replace("-", "_"))
    translated = {m.id: m for m in catalog if m.id}
    used = used_messages()
    assert sorted(used - set(translated)) == [], f"{name} lacks these"
    assert sorted(set(translated) - used) == [], f"{name} has these, which the code no longer says"
    for message_id, message in translated.items():
        assert isinstance(message_id, str) and isinstance(message.string, str)
        assert message.string and not message.fuzzy, f"{message_id!r} is not translated"
        assert fields(message.string) == fields(message_id), message_id
    text = messages_for(language)
    assert all(text.gettext(m) == translated[m].string for m in used), "as loaded"


def test_a_persons_languages_pick_the_first_one_spoken() -> None:
    assert languages()[0] == "en" and "de" in languages()
    assert best_language(["ga", "de-AT", "en"]) == "de"
    assert best_language(["ga", None, ""]) == "en"
    assert best_language([]) == "en"
    assert messages_for("de").gettext("Thank you. Goodbye.") == "Danke. Auf Wiederhören."
    assert messages_for("fr", None).gettext("Thank you. Goodbye.") == "Thank you. Goodbye."


@pytest.mark.parametrize(
    ("language", "tag"),
    [("en", "en-US"), ("de", "de-DE"), ("pt-BR", "pt-BR"), ("fr", "fr-FR"), ("nonsense!", "en-US")],
)
def test_a_voice_gets_the_language_with_its_region(language: str, tag: str) -> None:
    assert speech_tag(language) == tag
