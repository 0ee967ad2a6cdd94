"""A development JWT secret, generated once and kept in the data directory."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from msgspec.structs import replace

from gateway.settings.checks import ConfigError
from gateway.settings.model import Settings

PLACEHOLDER_SECRETS = frozenset({"", "change-me", "changeme", "secret", "please-change"})
MIN_DEV_SECRET_CHARS = 32


def with_dev_secret(settings: Settings) -> Settings:
    """Fill an empty HS256 secret with one generated once and kept in the data directory.

    This lets the demo run with no set-up while ``membrane token`` mints tokens the running
    gateway accepts. A placeholder secret is refused: it would let anyone mint tokens.
    """
    auth = settings.auth
    if auth.algorithm != "HS256":
        return settings
    if auth.secret:
        if auth.secret.lower() in PLACEHOLDER_SECRETS or len(auth.secret) < 32:
            raise ConfigError("auth.secret", "is a placeholder or shorter than 32 characters")
        return settings
    if settings.redis_url:
        # Each node would make its own secret and refuse the others' tokens.
        raise ConfigError(
            "auth.secret", "is required when nodes share Redis (set MEMBRANE_JWT_SECRET)"
        )
    path = settings.data_dir / "dev-jwt-secret"
    try:
        secret = _stored_dev_secret(path)
        if secret is None:
            secret = _store_dev_secret(path)
    except OSError as e:
        raise ConfigError("server.data_dir", f"cannot keep the dev secret in {path}: {e}") from None
    return replace(settings, auth=replace(auth, secret=secret))


def _stored_dev_secret(path: Path) -> str | None:
    """The secret kept in ``path``, or None when there is none fit to sign with.

    An empty or short file (left by a crash, or edited by hand) is never used: HS256 with an
    empty key would let anyone mint tokens.
    """
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return None
    return secret if len(secret) >= MIN_DEV_SECRET_CHARS else None


def _store_dev_secret(path: Path) -> str:
    """Generate a secret and put it in ``path`` atomically; return the secret now kept there.

    The secret is written and fsynced to a temporary file beside ``path`` first, so ``path``
    only ever holds a whole secret. It is linked in only if ``path`` is still absent, so a
    node starting at the same moment that already stored one keeps it; an unusable file is
    replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = _stored_dev_secret(path)
            if existing is not None:
                return existing
            os.replace(tmp, path)
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return secret


def _fsync_dir(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
