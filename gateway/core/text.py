"""What the core needs of a language's sentences, without reading catalogues itself.

``gateway.i18n.Messages`` is the real one; tests may pass ``english()``.
"""

from __future__ import annotations

import gettext
from typing import Protocol


def N_(message: str) -> str:
    """Mark ``message`` as a message id to translate later, where its language is known
    (gettext's convention: the extractor in tests/test_i18n.py looks for it)."""
    return message


class Text(Protocol):
    """One language's sentences: a message id (the English sentence) in, its translation out."""

    @property
    def language(self) -> str:
        """BCP 47: ``en``, ``de``, ``pt-BR``."""
        ...

    def gettext(self, message: str) -> str: ...


class _English:
    language = "en"
    _identity = gettext.NullTranslations()

    def gettext(self, message: str) -> str:
        return self._identity.gettext(message)


def english() -> Text:
    """The sentences as written: English, the catalogues' source language."""
    return _English()
