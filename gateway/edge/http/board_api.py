"""The supervisor's board over HTTP: its figures from the call history, and the site's
routing experiment (start, stop, and its arms compared). Supervisors of the site only."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.core import experiment_stats
from gateway.core.board_figures import board_figures, nps_rows, span_window
from gateway.core.errors import Invalid, StoreUnavailable, Unavailable
from gateway.edge.http import appkeys as keys
from gateway.edge.http.http_api import read_json, supervised_site, supervisor_claims
from gateway.services.experiments import Experiments
from gateway.store.history import CallHistory
from gateway.wire.board import (
    experiment_report_to_wire,
    experiment_start_from_wire,
    experiment_to_wire,
    figures_to_wire,
    span_from_query,
)


def _history(request: web.Request) -> CallHistory:
    if keys.HISTORY not in request.app:
        raise Unavailable("this node keeps no call history", code="history_unavailable")
    return request.app[keys.HISTORY].history


async def figures(request: web.Request) -> web.Response:
    """The board's charts: the span's slots, from the history's sums."""
    site_id = await supervised_site(request)
    span = span_from_query(request.query)
    history = _history(request)
    start, end = span_window(span, request.app[keys.CLOCK].now())
    counts, scores = await asyncio.gather(
        history.figures(site_id, start, end, span.step_s),
        # The answers by the hour: the hour view's NPS is that of the hours it touches.
        history.scores(site_id, start // 3600 * 3600, end),
    )
    site = request.app[keys.PRESENCE].site(site_id)
    names = {a.agent_id: a.name for a in site.agents.values()}
    names.update({b.branch_id: b.name for b in site.branches.values()})
    agents, branches = nps_rows(scores)
    found = board_figures(counts, start, span.step_s, span.seconds // span.step_s)
    return web.json_response(figures_to_wire(span, found, agents, branches, names))


def _experiments(request: web.Request) -> Experiments:
    return request.app[keys.EXPERIMENTS]


async def _report(request: web.Request, site_id: str, strict: bool = True) -> web.Response:
    """The experiment and its arms; not ``strict`` (it was just stopped, which is done),
    without arms when the history cannot say."""
    latest = await _experiments(request).latest(site_id)
    arms = {}
    if latest is not None:
        try:
            arms = await _history(request).arms(site_id, latest.experiment_id)
        except (Unavailable, StoreUnavailable):
            if strict:
                raise
    control = arms.get("control", experiment_stats.ArmFigures())
    variant = arms.get("variant", experiment_stats.ArmFigures())
    measures = experiment_stats.compare(control, variant) if latest is not None else []
    return web.json_response(
        experiment_report_to_wire(
            latest,
            arms,
            measures,
            1 - experiment_stats.ALPHA,
            experiment_stats.MIN_SAMPLES,
        )
    )


async def get_experiment(request: web.Request) -> web.Response:
    return await _report(request, await supervised_site(request))


async def start_experiment(request: web.Request) -> web.Response:
    claims = await supervisor_claims(request)
    name, variant, share = experiment_start_from_wire(await read_json(request))
    try:
        started = await _experiments(request).start(claims.site, name, variant, share, claims.sub)
    except ValueError as e:
        raise Invalid(str(e)) from None
    return web.json_response(experiment_to_wire(started), status=201)


async def stop_experiment(request: web.Request) -> web.Response:
    site_id = await supervised_site(request)
    await _experiments(request).stop(site_id)
    return await _report(request, site_id, strict=False)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/sites/{site}/figures", figures)
    app.router.add_get("/v1/sites/{site}/experiment", get_experiment)
    app.router.add_put("/v1/sites/{site}/experiment", start_experiment)
    app.router.add_delete("/v1/sites/{site}/experiment", stop_experiment)
