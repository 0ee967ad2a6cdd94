"""Typed settings, loaded from a TOML file and ``MEMBRANE_*`` environment variables.

The model (one msgspec Struct per section, each default written once) is in model.py; the
loading and checking in load.py (and sites.py for the ``[[sites]]`` tables). A bad value
stops start-up with one line naming the key (``ConfigError``).
"""

from gateway.settings.checks import ConfigError
from gateway.settings.dev_secret import with_dev_secret
from gateway.settings.load import ENV_PREFIX, demo_config_text, load_settings
from gateway.settings.model import (
    AuthSettings,
    MediaSettings,
    PresenceSettings,
    Settings,
    TwilioSettings,
    VerifyKey,
    WebRTCSettings,
)

__all__ = [
    "ENV_PREFIX",
    "AuthSettings",
    "ConfigError",
    "MediaSettings",
    "PresenceSettings",
    "Settings",
    "TwilioSettings",
    "VerifyKey",
    "WebRTCSettings",
    "demo_config_text",
    "load_settings",
    "with_dev_secret",
]
