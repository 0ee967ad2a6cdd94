"""Rotating secrets without dropping anyone (issue 16, docs/OPERATIONS.md): while the JWT
secret changes, tokens signed with the one before still hold until they expire; while the
Twilio auth token changes, webhooks signed with either are accepted. Neither old key ever
signs anything, and neither is accepted once it is no longer configured."""

from __future__ import annotations

import pytest
from multidict import MultiDict
from twilio.request_validator import RequestValidator

from gateway.core.errors import Unauthenticated
from gateway.core.model import Role
from gateway.edge.auth import TokenService
from gateway.settings import AuthSettings, ConfigError, load_settings
from mobile_bridge.twilio_webhooks import WebhookSignatures

OLD, NEW = "o" * 40, "n" * 40


async def test_tokens_of_the_previous_secret_hold_while_it_is_configured() -> None:
    old_token, _ = TokenService(AuthSettings(secret=OLD)).mint("anna", "acme", Role.AGENT)
    rotating = TokenService(AuthSettings(secret=NEW, previous_secret=OLD))
    assert (await rotating.verify(old_token)).sub == "anna"
    new_token, _ = rotating.mint("anna", "acme", Role.AGENT)
    # What is minted now is signed with the new secret only.
    with pytest.raises(Unauthenticated):
        await TokenService(AuthSettings(secret=OLD)).verify(new_token)
    with pytest.raises(Unauthenticated):  # the rotation done: the old secret is gone
        await TokenService(AuthSettings(secret=NEW)).verify(old_token)
    stranger, _ = TokenService(AuthSettings(secret="s" * 40)).mint("x", "acme", Role.AGENT)
    with pytest.raises(Unauthenticated):
        await rotating.verify(stranger)


def test_the_previous_secret_must_be_a_real_former_secret() -> None:
    env = {"MEMBRANE_JWT_SECRET": NEW}
    settings = load_settings(None, env={**env, "MEMBRANE_JWT_PREVIOUS_SECRET": OLD})
    assert settings.auth.previous_secret == OLD
    for bad in ("short", NEW):
        with pytest.raises(ConfigError, match=r"auth\.previous_secret"):
            load_settings(None, env={**env, "MEMBRANE_JWT_PREVIOUS_SECRET": bad})


def test_webhooks_signed_with_the_previous_twilio_token_hold_while_it_is_configured() -> None:
    url, params = "https://gw.example/twilio/voice?call=c_1", {"CallSid": "CA1", "To": "+3531"}

    def signed(token: str) -> str:
        return str(RequestValidator(token).compute_signature(url, params))

    form = MultiDict(params)
    rotating = WebhookSignatures("new-token", "https://gw.example", "old-token")
    assert rotating.valid("/twilio/voice?call=c_1", form, signed("new-token"))
    assert rotating.valid("/twilio/voice?call=c_1", form, signed("old-token"))
    assert not rotating.valid("/twilio/voice?call=c_1", form, signed("other-token"))
    done = WebhookSignatures("new-token", "https://gw.example")
    assert not done.valid("/twilio/voice?call=c_1", form, signed("old-token"))
