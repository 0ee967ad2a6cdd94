"""The ``[[sites]]`` tables: each site, its branches, agents and callback policy, as the core's
model (gateway/core/model.py, where their defaults are written). A key left out is left to
the model's default; only what the file does not say of the model (a branch's time zone, a
name that defaults to the id) is decided here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import date, time
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.core.model import Agent, Branch, CallbackPolicy, OpeningSpan, Role, Site
from gateway.settings.checks import ConfigError, array, e164, get, ident, str_list
from gateway.settings.sms import sms_aliases

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_ORIGIN = re.compile(r"https?://[^/\s]+")


def _hours(table: Mapping[str, Any], path: str) -> dict[int, tuple[OpeningSpan, ...]]:
    hours: dict[int, tuple[OpeningSpan, ...]] = {}
    for day, spans in table.items():
        if day not in WEEKDAYS:
            raise ConfigError(f"{path}{day}", f"weekday must be one of {', '.join(WEEKDAYS)}")
        if not isinstance(spans, list):
            raise ConfigError(f"{path}{day}", 'must be a list like ["09:00-17:00"]')
        parsed = []
        for span in spans:
            m = _SPAN.fullmatch(span) if isinstance(span, str) else None
            try:
                if m is None:
                    raise ValueError
                h1, m1, h2, m2 = (int(g) for g in m.groups())
                # Only exactly 24:00 closes at midnight; time() refuses 24:30, 25:00 and :60.
                closes = time(0, 0) if (h2, m2) == (24, 0) else time(h2, m2)
                parsed.append(OpeningSpan(time(h1, m1), closes))
            except ValueError:
                raise ConfigError(f"{path}{day}", f"bad span {span!r}, want HH:MM-HH:MM") from None
        hours[WEEKDAYS.index(day)] = tuple(parsed)
    return hours


def _branch(raw: Any, path: str) -> Branch:
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a table")
    tz = get(raw, "timezone", f"{path}.", str, "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{path}.timezone", f"unknown time zone {tz!r}") from None
    holidays = []
    for i, day in enumerate(str_list(raw, "holidays", f"{path}.")):
        try:
            holidays.append(date.fromisoformat(day))
        except ValueError:
            raise ConfigError(f"{path}.holidays[{i}]", f"{day!r} is not YYYY-MM-DD") from None
    lat, lon = raw.get("lat"), raw.get("lon")
    for key, val, bound in (("lat", lat, 90), ("lon", lon, 180)):
        if val is not None and (
            not isinstance(val, int | float) or isinstance(val, bool) or not abs(val) <= bound
        ):
            raise ConfigError(f"{path}.{key}", f"must be a number within ±{bound}")
    hours_table = raw.get("hours", {})
    if not isinstance(hours_table, dict):
        raise ConfigError(f"{path}.hours", "must be a table of weekday = [spans]")
    return Branch(
        branch_id=ident(raw.get("id"), f"{path}.id"),
        name=get(raw, "name", f"{path}.", str, raw.get("id")),
        timezone=tz,
        lat=float(lat) if lat is not None else None,
        lon=float(lon) if lon is not None else None,
        languages=str_list(raw, "languages", f"{path}."),
        hours=_hours(hours_table, f"{path}.hours."),
        holidays=frozenset(holidays),
    )


def _agent(raw: Any, site_id: str, branches: Mapping[str, Branch], path: str) -> Agent:
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a table")
    branch = raw.get("branch")
    if branch is not None:
        branch = get(raw, "branch", f"{path}.", str, None)
    if branch is not None and branch not in branches:
        raise ConfigError(f"{path}.branch", f"no branch {branch!r} in this site")
    mobile = raw.get("mobile")
    if mobile is not None:
        mobile = e164(get(raw, "mobile", f"{path}.", str, ""), f"{path}.mobile")
    given: dict[str, Any] = {}
    if "role" in raw:
        role_name = get(raw, "role", f"{path}.", str, None)
        if role_name not in (Role.AGENT, Role.SUPERVISOR):
            raise ConfigError(f"{path}.role", "must be agent or supervisor")
        given["role"] = Role(role_name)
    return Agent(
        agent_id=ident(raw.get("id"), f"{path}.id"),
        site=site_id,
        name=get(raw, "name", f"{path}.", str, raw.get("id")),
        branch=branch,
        languages=str_list(raw, "languages", f"{path}."),
        skills=str_list(raw, "skills", f"{path}."),
        mobile=mobile,
        **given,
    )


_DAY_US = 86_400 * 1_000_000


def _quiet_window(start: time, end: time) -> list[tuple[int, int]]:
    """Quiet hours ``[start, end)`` as same-day intervals in microseconds since midnight.

    A window whose end is not after its start runs past midnight, as opening spans do.
    """

    def us(t: time) -> int:
        return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond

    a, b = us(start), us(end)
    return [(a, b)] if a < b else [(a, _DAY_US), (0, b)]


def _covers(outer: list[tuple[int, int]], inner: list[tuple[int, int]]) -> bool:
    # Each piece of ``inner`` lies on one side of midnight, so it must fit in one outer piece.
    return all(any(o0 <= i0 and i1 <= o1 for o0, o1 in outer) for i0, i1 in inner if i0 < i1)


FREE_RANGES: dict[str, tuple[int, int]] = {
    "reminder_interval_s": (600, 86_400),
    "late_after_s": (60, 7_200),
    "late_notice_ahead_s": (60, 7_200),
    "follow_up_wait_s": (60, 86_400),
}
"""Callback policy keys a site sets freely within a range (not only tightens)."""


def _policy(raw: Any, path: str) -> CallbackPolicy:
    """A site's callback policy: the defaults, which a site may only tighten.

    Limits may be lowered (but stay above 0; ``retries`` and ``max_texts`` may be 0), the
    keys of ``FREE_RANGES`` are set anywhere in their range, ``retry_interval_s`` may
    only grow, ``allowed_countries`` may only drop countries, ``blocked_number_types`` may
    only add types, and quiet hours may only widen: the new window must contain the default
    one (start == end is ambiguous, all day or never, and refused). Flags are free choices.
    """
    if raw is None:
        return CallbackPolicy()
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a table")
    base = CallbackPolicy()
    changes: dict[str, Any] = {}
    for key in raw:
        if not hasattr(base, key):
            raise ConfigError(f"{path}.{key}", "unknown callback policy key")
        default = getattr(base, key)
        if isinstance(default, tuple):
            value = str_list(raw, key, f"{path}.")
            if key == "allowed_countries":
                extra = [c for c in value if c not in default]
                if extra:
                    raise ConfigError(
                        f"{path}.{key}",
                        f"may only drop countries from the default list, not add {extra}",
                    )
            elif key == "blocked_number_types":
                missing = [t for t in default if t not in value]
                if missing:
                    raise ConfigError(
                        f"{path}.{key}",
                        f"may only add to the default list, not unblock {missing}",
                    )
            changes[key] = value
        elif isinstance(default, bool):
            changes[key] = get(raw, key, f"{path}.", bool, default)
        elif isinstance(default, StrEnum):
            value = get(raw, key, f"{path}.", str, default)
            choices = [c.value for c in type(default)]
            if value not in choices:
                raise ConfigError(f"{path}.{key}", f"must be one of {choices}")
            changes[key] = type(default)(value)
        elif isinstance(default, time):
            try:
                changes[key] = time.fromisoformat(get(raw, key, f"{path}.", str, ""))
            except ValueError:
                raise ConfigError(f"{path}.{key}", "must be HH:MM") from None
        else:
            value = get(raw, key, f"{path}.", type(default), default)
            if key in FREE_RANGES:
                # How often the customer hears from us is the site's choice, within reason.
                low, high = FREE_RANGES[key]
                if not low <= value <= high:
                    raise ConfigError(f"{path}.{key}", f"must be from {low} to {high}")
            elif key == "retry_interval_s":
                # Waiting longer between retries is tighter; retrying sooner is not.
                if not value >= default:
                    raise ConfigError(f"{path}.{key}", f"may not be below the default {default}")
            elif not value <= default:
                raise ConfigError(f"{path}.{key}", f"may not exceed the default {default}")
            elif key in ("retries", "max_texts"):
                if value < 0:
                    raise ConfigError(f"{path}.{key}", "may not be negative")
            elif not value > 0:
                raise ConfigError(f"{path}.{key}", "must be greater than 0")
            changes[key] = value
    policy = replace(base, **changes)
    quiet_key = next((k for k in ("quiet_hours_start", "quiet_hours_end") if k in raw), None)
    if quiet_key is not None:
        if policy.quiet_hours_start == policy.quiet_hours_end:
            raise ConfigError(
                f"{path}.{quiet_key}", "quiet hours may not start and end at the same time"
            )
        window = _quiet_window(policy.quiet_hours_start, policy.quiet_hours_end)
        if not _covers(window, _quiet_window(base.quiet_hours_start, base.quiet_hours_end)):
            raise ConfigError(
                f"{path}.{quiet_key}",
                "quiet hours may only widen the default "
                f"{base.quiet_hours_start:%H:%M}-{base.quiet_hours_end:%H:%M}",
            )
    return policy


MIN_WEBHOOK_SECRET = 32


def webhook_secret(value: str, key: str) -> str:
    """A site's ``presence_webhook_secret``: empty (the webhook is off) or long enough."""
    if value and len(value) < MIN_WEBHOOK_SECRET:
        raise ConfigError(key, f"must be at least {MIN_WEBHOOK_SECRET} characters (or empty)")
    return value


def secret_env_name(site_id: str) -> str:
    """The variable (after ``MEMBRANE_``) that sets a site's webhook secret: the id upper
    case, each character other than a letter or digit an underscore."""
    return f"SITE_{re.sub(r'[^A-Z0-9]', '_', site_id.upper())}_PRESENCE_WEBHOOK_SECRET"


_REFERRAL = re.compile(r"https?://[^\s\x00-\x1f]{1,2000}")


def load_site(raw: Any, path: str) -> Site:
    """One ``[[sites]]`` table (``path`` is ``sites[i]``)."""
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a table")
    site_id = ident(raw.get("id"), f"{path}.id")
    branches: dict[str, Branch] = {}
    for i, b in enumerate(array(raw, "branches", f"{path}.")):
        branch = _branch(b, f"{path}.branches[{i}]")
        if branch.branch_id in branches:
            raise ConfigError(f"{path}.branches[{i}].id", f"duplicate {branch.branch_id!r}")
        branches[branch.branch_id] = branch
    agents: dict[str, Agent] = {}
    for i, a in enumerate(array(raw, "agents", f"{path}.")):
        agent = _agent(a, site_id, branches, f"{path}.agents[{i}]")
        if agent.agent_id in agents:
            raise ConfigError(f"{path}.agents[{i}].id", f"duplicate {agent.agent_id!r}")
        agents[agent.agent_id] = agent
    origins = str_list(raw, "origins", f"{path}.")
    for i, origin in enumerate(origins):
        if not _ORIGIN.fullmatch(origin):
            raise ConfigError(f"{path}.origins[{i}]", f"{origin!r} is not scheme://host[:port]")
    given: dict[str, Any] = {}
    if "ring_timeout_s" in raw:
        ring_timeout = get(raw, "ring_timeout_s", f"{path}.", float, None)
        if not 3 <= ring_timeout <= 120:
            raise ConfigError(f"{path}.ring_timeout_s", "must be between 3 and 120 seconds")
        given["ring_timeout_s"] = ring_timeout
    if "presence_webhook_secret" in raw:
        given["presence_webhook_secret"] = webhook_secret(
            get(raw, "presence_webhook_secret", f"{path}.", str, ""),
            f"{path}.presence_webhook_secret",
        )
    if "survey" in raw:
        given["survey"] = get(raw, "survey", f"{path}.", bool, True)
    if "referral_url" in raw:
        referral = get(raw, "referral_url", f"{path}.", str, "")
        if referral and not _REFERRAL.fullmatch(referral):
            raise ConfigError(f"{path}.referral_url", "must be an https:// or http:// URL")
        given["referral_url"] = referral
    if "mobile_after_desktop" in raw:
        given["mobile_after_desktop"] = get(raw, "mobile_after_desktop", f"{path}.", bool, False)
    if "history_retention_days" in raw:
        days = get(raw, "history_retention_days", f"{path}.", int, 400)
        if not 1 <= days <= 3650:
            raise ConfigError(f"{path}.history_retention_days", "must be 1 to 3650 days")
        given["history_retention_days"] = days
    return Site(
        site_id=site_id,
        name=get(raw, "name", f"{path}.", str, site_id),
        allowed_origins=origins,
        branches=branches,
        agents=agents,
        caller_ids=tuple(
            e164(n, f"{path}.caller_ids[{i}]")
            for i, n in enumerate(str_list(raw, "caller_ids", f"{path}."))
        ),
        callback_policy=_policy(raw.get("callback_policy"), f"{path}.callback_policy"),
        sms_aliases=sms_aliases(raw.get("sms_aliases"), f"{path}.sms_aliases"),
        **given,
    )
