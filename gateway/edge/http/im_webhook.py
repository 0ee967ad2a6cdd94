"""``POST /v1/sites/{site}/presence/im``: chat integrations report agents' IM presence,
signed with the site's ``presence_webhook_secret`` instead of holding a token per agent.

Checked in this order, the first failure answering: the site and its secret (404: a site
without one has no webhook), the signature (403 ``invalid_signature``), the timestamp (403
``stale_webhook``), the site's rate limit, the body (400), the agents (422
``unknown_agent``), then replays (409 ``replayed_webhook``). Only then is anything applied.
"""

from __future__ import annotations

import json
import time

from aiohttp import web

from gateway.core.errors import Forbidden, Invalid, NotFound, RateLimited
from gateway.edge.http import appkeys as keys
from gateway.ops.ratelimit import TokenBucket
from gateway.wire.base import to_wire
from gateway.wire.codec import check_id
from gateway.wire.im_presence import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TOLERANCE_S,
    ImPresenceAnswer,
    ImPresenceResult,
    parse_timestamp,
    signature_matches,
    updates_from_wire,
)

PATH = "/v1/sites/{site}/presence/im"


async def post_im_presence(request: web.Request) -> web.Response:
    site_id = check_id(request.match_info["site"], "site")
    site = request.app[keys.SETTINGS].sites.get(site_id)
    if site is None or not site.presence_webhook_secret:
        raise NotFound(f"no IM presence webhook for site {site_id!r}")
    body = await request.read()
    raw_timestamp = request.headers.get(TIMESTAMP_HEADER, "")
    timestamp = parse_timestamp(raw_timestamp)
    given = request.headers.get(SIGNATURE_HEADER)
    if timestamp is None or not signature_matches(
        site.presence_webhook_secret, raw_timestamp, body, given
    ):
        raise Forbidden(
            f"{SIGNATURE_HEADER} is not this request's signature under the site's secret",
            code="invalid_signature",
        )
    # The sender's clock, checked against this node's real one: a lease clock a test moves
    # on has nothing to do with when the request was signed.
    if abs(time.time() - timestamp) > TOLERANCE_S:
        raise Forbidden(
            f"{TIMESTAMP_HEADER} is more than {TOLERANCE_S} s from the gateway's time",
            code="stale_webhook",
        )
    presence = request.app[keys.SETTINGS].presence
    buckets = request.app[keys.REST_BUCKETS]
    bucket = buckets.setdefault(
        f"im:{site_id}", TokenBucket(presence.im_webhook_rate, presence.im_webhook_burst)
    )
    if not bucket.take(time.monotonic()):
        raise RateLimited("too many IM presence requests for this site; slow down")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Invalid("body is not valid JSON") from None
    updates = updates_from_wire(payload)
    outcomes = await request.app[keys.IM_PRESENCE].apply(site_id, updates)
    answer = ImPresenceAnswer(
        [
            ImPresenceResult(
                o.agent_id, o.event_id, "applied" if o.applied else "duplicate", o.status
            )
            for o in outcomes
        ]
    )
    return web.json_response(to_wire(answer))


def add_routes(app: web.Application) -> None:
    app.router.add_post(PATH, post_im_presence)
