"""The manager's figures in Prometheus: calls made and ended by channel and outcome, the
time to the first human, callbacks' lateness and the answers to the question after the
call; counted once across two nodes (by the node that made each change), and the Grafana
dashboard in deploy/ asking only for figures the gateway exports."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
from conftest import NodeFactory, SocketClient
from prometheus_client.parser import text_string_to_metric_families
from test_surveys import answer, browser_call

from gateway.core.call import Call, CallChannel, CallState
from gateway.core.call_figures import figures
from gateway.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "membrane-calls.json"
T0 = 1_800_000_000.0


def test_each_change_adds_what_it_means() -> None:
    made = Call(
        "c_1", "acme", "v_1", CallChannel.CALLBACK, CallState.QUEUED, T0, promised_at=T0 + 300
    )
    assert figures(None, made).started
    talking = replace(made, state=CallState.CONNECTED, connected_at=T0 + 420)
    seen = figures(made, talking)
    assert (seen.started, seen.ended, seen.to_first_human_s, seen.callback_late_s) == (
        False,
        None,
        420.0,
        120.0,
    )
    assert figures(talking, replace(talking, version=3)).to_first_human_s is None, "once"
    done = replace(talking, state=CallState.COMPLETED, ended_at=T0 + 600)
    assert figures(talking, done).ended == "completed"
    assert figures(done, replace(done, survey_score=9)).ended is None, "ended once"
    browser = Call("c_2", "acme", "v_2", CallChannel.WEBRTC, CallState.RINGING, T0)
    seen = figures(browser, replace(browser, state=CallState.CONNECTED, connected_at=T0 + 7))
    assert (seen.to_first_human_s, seen.callback_late_s) == (7.0, None)


def samples(*texts: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the nodes' scrapes, summed over the nodes."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                found[key] = found.get(key, 0.0) + s.value
    return found


async def test_a_call_is_counted_once_across_nodes(
    nodes: NodeFactory,
    redis_url: str,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    a, b = await nodes(redis_url=redis_url), await nodes(redis_url=redis_url)
    started = await browser_call(clients, http, a, talk=True, agent_node=b)
    status, answered = await answer(http, b, started, {"score": 10})
    assert status == 200, answered

    scraped = []
    for node in (a, b):
        async with http.get(f"{node.url}/metrics") as r:
            scraped.append(await r.text())
    seen = samples(*scraped)
    web = (("channel", "webrtc"), ("site", "acme"))
    assert seen[("membrane_calls_started_total", web)] == 1
    assert seen[("membrane_calls_ended_total", (*web[:1], ("outcome", "completed"), web[1]))] == 1
    assert seen[("membrane_time_to_first_human_seconds_count", web)] == 1
    answers = ("membrane_survey_answers_total", (("group", "promoter"), ("site", "acme")))
    assert seen[answers] == 1


def test_the_dashboard_asks_only_for_what_the_gateway_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = {
        family.name for family in Metrics().registry.collect() if family.name.startswith("membrane")
    }
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 6
    for expr in exprs:
        for name in re.findall(r"membrane_[a-z_]+", expr):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert base in exported, f"{name} in {expr!r} is not a metric of the gateway"
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Time to first human", "Callbacks on time", "Net Promoter Score"} <= titles
