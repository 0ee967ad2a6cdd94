"""orjson behind the stdlib's ``dumps``/``loads`` names, for python-socketio's ``json=``:
every socket.io packet in and out is encoded with it (several times faster than ``json``).

orjson refuses integers wider than 64 bits, so a message cannot make the parser spend
quadratic time on a huge number (the guard engine.io adds to the stdlib parser)."""

from __future__ import annotations

from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError


def dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj).decode()


def loads(data: str | bytes, **_: Any) -> Any:
    return orjson.loads(data)
