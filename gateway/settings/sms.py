"""A site's ``[sites.sms_aliases]``: the words its agents may text for each SMS presence
command, by language (gateway/core/sms_presence.py has the built-in ones)::

    [sites.sms_aliases.de]
    in = ["DA", "HIER"]
    back = ["ZURÜCK"]
"""

from __future__ import annotations

import re
from typing import Any

from gateway.core.sms_presence import SmsCommand
from gateway.settings.checks import ConfigError, str_list

_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?")
_WORD = re.compile(r"[^\s0-9]{1,20}")
"""One word, no digits (``BACK`` is followed by its minutes) and no spaces (one word)."""


def sms_aliases(raw: Any, path: str) -> dict[str, dict[str, tuple[str, ...]]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, 'must be a table of language = { in = ["..."], ... }')
    commands = {c.value for c in SmsCommand}
    aliases: dict[str, dict[str, tuple[str, ...]]] = {}
    for language, table in raw.items():
        where = f"{path}.{language}"
        if not _LANGUAGE.fullmatch(language):
            raise ConfigError(where, "must be a language code such as en or de")
        if not isinstance(table, dict):
            raise ConfigError(where, 'must be a table of command = ["word", ...]')
        words: dict[str, tuple[str, ...]] = {}
        for command in table:
            if command not in commands:
                raise ConfigError(f"{where}.{command}", f"must be one of {sorted(commands)}")
            given = str_list(table, command, f"{where}.")
            for i, word in enumerate(given):
                if not _WORD.fullmatch(word):
                    raise ConfigError(
                        f"{where}.{command}[{i}]", f"{word!r} must be one word without digits"
                    )
            words[command] = given
        aliases[language] = words
    return aliases
