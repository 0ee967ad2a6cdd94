"""Reading config values: every problem is a ``ConfigError`` whose message names the key."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import phonenumbers

from gateway.wire.codec import ID_PATTERN

T = TypeVar("T")
_STEP = re.compile(r"\.([^.\[]+)|\[([0-9]+)\]")
_EXPECTED = re.compile(r"Expected `([^`]+)`, got `[^`]+`")
# msgspec's names of types, as TOML calls them.
_TOML_TYPES = {"object": "a table", "array": "an array", "str": "a string", "bool": "a boolean"}


class ConfigError(Exception):
    """A config value that cannot work; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key


def _path_hook(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise TypeError(f"must be a string (a path), got {value!r}")


def decode(table: Mapping[str, Any], kind: type[T], path: str) -> T:
    """``table`` as a ``kind`` struct, each key left out taking the struct's default. A
    value of the wrong type names its key: ``path`` (the table's) and the key within it."""
    try:
        return msgspec.convert(table, kind, dec_hook=_path_hook)
    except msgspec.ValidationError as e:
        problem, _, where = str(e).partition(" - at `$")
        where = where.rstrip("`")
        value: Any = table
        for name, index in _STEP.findall(where):
            value = value[name] if name else value[int(index)]
        expected = _EXPECTED.fullmatch(problem)
        if expected is not None:
            wanted = expected.group(1).removesuffix(" | null")  # null: left out
            problem = f"must be {_TOML_TYPES.get(wanted, wanted)}, got {value!r}"
        raise ConfigError(f"{path}{where}", problem) from None


def get(table: Mapping[str, Any], key: str, path: str, kind: type, default: Any) -> Any:
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}{key}", f"must be {kind.__name__}, got {value!r}")
    return value


def positive(value: float, key: str) -> None:
    """A count, size or duration must be above zero (and finite)."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(key, f"must be greater than 0, got {value!r}")


def table(parent: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
    """A sub-table (absent: empty); anything else names the key."""
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}{key}", "must be a table")
    return value


def array(parent: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = parent.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{path}{key}", "must be an array of tables")
    return value


def str_list(parent: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = parent.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}{key}", "must be a list of strings")
    return tuple(value)


def ident(value: Any, key: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ConfigError(key, f"must be an id of letters, digits or _.:- (got {value!r})")
    return value


def e164(value: str, key: str) -> str:
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        raise ConfigError(key, f"{value!r} is not an E.164 phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise ConfigError(key, f"{value!r} is not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
