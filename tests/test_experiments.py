"""Routing experiments (issue 15): "send 1% of calls to someone who cares, and measure".
Assignment lands at the configured share (a binomial test over many simulated requests);
the comparison never calls a winner the data cannot carry (A/A experiments) and finds a
real difference; and across two nodes a supervisor starts one, the variant's calls ring
the variant's choice, each call's arm is recorded in the history, and stopping it returns
every call to the default policy."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from conftest import Node, NodeFactory, SocketClient, eventually, make_settings, mint
from test_callbacks import agent, visitor_token

from gateway.core.call import Call, CallChannel, CallState
from gateway.core.experiment import Arm, Experiment, assign, policy_for
from gateway.core.experiment_stats import (
    MIN_SAMPLES,
    ArmFigures,
    Verdict,
    compare,
    compare_abandonment,
    compare_nps,
    compare_time_to_human,
)
from gateway.core.model import Role
from gateway.core.routing import RoutingPolicy
from gateway.edge.http import appkeys as keys

EXPERIMENT = Experiment("x_1", "mobile", RoutingPolicy.MOBILE_FIRST, 0.1, 0.0, "sam")


@pytest.mark.parametrize("share", [0.01, 0.1, 0.5])
def test_a_share_of_requests_lands_in_the_variant(share: float) -> None:
    """A two-sided binomial test at the 0.01% level over 50,000 requests: the variant's
    count is what the share says, and so is every tenth of the requests (no drift along
    the ids)."""
    experiment = Experiment("x_share", "s", RoutingPolicy.BEST_NPS, share, 0.0, "sam")
    n = 50_000
    arms = [assign(experiment, f"c_{i:032x}") for i in range(n)]
    z_limit = 3.9  # two-sided 0.01%

    def z(k: int, m: int) -> float:
        return (k - m * share) / math.sqrt(m * share * (1 - share))

    assert abs(z(arms.count(Arm.VARIANT), n)) < z_limit
    for part in range(10):
        chunk = arms[part * 5000 : (part + 1) * 5000]
        assert abs(z(chunk.count(Arm.VARIANT), len(chunk))) < z_limit
    # The same request is always in the same arm; another experiment draws afresh.
    again = [assign(experiment, f"c_{i:032x}") for i in range(1000)]
    assert again == arms[:1000]
    other = Experiment("x_other", "s", RoutingPolicy.BEST_NPS, share, 0.0, "sam")
    assert [assign(other, f"c_{i:032x}") for i in range(1000)] != arms[:1000]


def _call(arm: Arm | None, experiment: str | None = "x_1") -> Call:
    return Call(
        "c_1", "acme", "v", CallChannel.WEBRTC, CallState.QUEUED, 0.0,
        experiment=experiment if arm else None, arm=arm.value if arm else None,
    )  # fmt: skip


def test_only_a_variant_call_of_the_running_experiment_takes_its_policy() -> None:
    assert policy_for(_call(Arm.VARIANT), EXPERIMENT) is RoutingPolicy.MOBILE_FIRST
    assert policy_for(_call(Arm.CONTROL), EXPERIMENT) is RoutingPolicy.DEFAULT
    assert policy_for(_call(None), EXPERIMENT) is RoutingPolicy.DEFAULT
    assert policy_for(_call(Arm.VARIANT, "x_old"), EXPERIMENT) is RoutingPolicy.DEFAULT
    assert policy_for(_call(Arm.VARIANT), replace(EXPERIMENT, stopped_at=5.0)) is (
        RoutingPolicy.DEFAULT
    )
    assert policy_for(_call(Arm.VARIANT), None) is RoutingPolicy.DEFAULT


def _simulated_arm(
    rng: random.Random, n: int, abandon: float, mean_wait: float, promoter: float
) -> ArmFigures:
    reached = abandoned = pro = pas = det = 0
    waits = squares = 0.0
    for _ in range(n):
        if rng.random() < abandon:
            abandoned += 1
            continue
        reached += 1
        wait = rng.expovariate(1 / mean_wait)
        waits += wait
        squares += wait * wait
        score = rng.random()
        if score < promoter:
            pro += 1
        elif score < promoter + 0.3:
            pas += 1
        else:
            det += 1
    return ArmFigures(n, reached, waits, squares, abandoned, pro, pas, det)


def test_no_winner_is_called_between_equal_arms() -> None:
    """400 A/A experiments (both arms alike): a verdict on any measure is a false winner.
    At the 1% level over three measures, about 3% of them may say one; never 10%."""
    rng = random.Random(15)
    false_winners = 0
    for _ in range(400):
        control = _simulated_arm(rng, 600, 0.2, 20.0, 0.5)
        variant = _simulated_arm(rng, 600, 0.2, 20.0, 0.5)
        verdicts = {m.verdict for m in compare(control, variant)}
        assert Verdict.TOO_EARLY not in verdicts
        false_winners += bool(verdicts & {Verdict.VARIANT_BETTER, Verdict.VARIANT_WORSE})
    assert false_winners <= 40, false_winners


def test_too_few_samples_give_no_verdict_however_large_the_gap() -> None:
    rng = random.Random(7)
    control = _simulated_arm(rng, MIN_SAMPLES - 1, 0.5, 60.0, 0.1)
    variant = _simulated_arm(rng, MIN_SAMPLES - 1, 0.0, 5.0, 0.9)
    for measure in compare(control, variant):
        assert measure.verdict is Verdict.TOO_EARLY, measure
    assert compare_abandonment(ArmFigures(), ArmFigures()).verdict is Verdict.TOO_EARLY


def test_a_real_difference_is_found_and_its_direction_named() -> None:
    rng = random.Random(3)
    control = _simulated_arm(rng, 3000, 0.25, 30.0, 0.4)
    better = _simulated_arm(rng, 3000, 0.10, 15.0, 0.7)
    tth, abandonment, nps = compare(control, better)
    assert tth.verdict is Verdict.VARIANT_BETTER and tth.difference.value is not None
    assert tth.difference.high is not None and tth.difference.high < 0
    assert abandonment.verdict is Verdict.VARIANT_BETTER
    assert nps.verdict is Verdict.VARIANT_BETTER and nps.p_value is not None
    assert nps.p_value < 0.01
    # Swapped, the variant is the worse one.
    assert compare_time_to_human(better, control).verdict is Verdict.VARIANT_WORSE
    assert compare_nps(better, control).verdict is Verdict.VARIANT_WORSE
    # The intervals hold the true values: 25% and 10% gave up.
    assert abandonment.control.low is not None and abandonment.control.high is not None
    assert abandonment.control.low < 0.25 < abandonment.control.high


# --- end to end, across two nodes ------------------------------------------------------------


@pytest.fixture
async def two_nodes(
    postgres_url: str, redis_url: str, nodes: NodeFactory, tmp_path: Path
) -> tuple[Node, Node]:
    # The database first: it is dropped after the nodes stop (they write what is pending).
    base = make_settings(tmp_path, redis_url=redis_url, history_url=postgres_url)
    a = await nodes(msgspec.structs.replace(base, node_id="node-a"))
    b = await nodes(msgspec.structs.replace(base, node_id="node-b"))
    for node in (a, b):
        await node.app[keys.HISTORY].opened.wait()
    return a, b


async def test_a_supervisor_runs_an_experiment_across_nodes_and_stops_it(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    a, b = two_nodes
    sam = {"Authorization": f"Bearer {mint(a.settings, 'sam', Role.SUPERVISOR)}"}
    # Anna is at her desk only (idle longest: the default policy rings her first); Ben is
    # at his desk and has his mobile phone on too.
    anna = await agent(clients, a, "anna")
    ben = await agent(clients, b, "ben")
    phone = {"kind": "mobile", "state": "available", "priority": 5}
    ben_token = {"Authorization": f"Bearer {mint(b.settings, 'ben')}"}
    async with http.put(f"{b.url}/v1/agents/me/devices/phone", json=phone, headers=ben_token) as r:
        assert r.status == 200

    async with http.put(
        f"{a.url}/v1/sites/acme/experiment",
        json={"variant": "mobile_first", "share": 0.5, "name": "mobile first"},
        headers=sam,
    ) as r:
        assert r.status == 201, await r.text()
        experiment_id = (await r.json())["experiment_id"]

    async def one_call(node: Node) -> tuple[str, str]:
        """A visitor calls on ``node``: who rang first, and the call's id; then gives up."""
        visitor = clients()
        await visitor.connect(node.url, "/visitor", {"token": await visitor_token(http, node)})
        started = await visitor.call("call:start", {"language": "en"}, "/visitor")
        call_id = started["call"]["call_id"]
        rang = started["call"]["agent"]["name"]
        await visitor.call("call:cancel", {"call_id": call_id}, "/visitor")
        await visitor.close()
        return call_id, rang

    # Calls made on node B (the experiment was started on node A) until both arms have some.
    rang: dict[str, str] = {}
    arms: dict[str, str] = {}
    for _ in range(40):
        call_id, who = await one_call(b)
        rang[call_id] = who
        stored = await stored_call(b, call_id)
        assert stored["experiment"] == experiment_id and stored["arm"] in ("control", "variant")
        arms[call_id] = stored["arm"]
        if len(set(arms.values())) == 2 and len(arms) >= 6:
            break
    assert set(arms.values()) == {"control", "variant"}
    for call_id, arm in arms.items():
        # The variant rings the agent on mobile first; control calls go as always: the one
        # idle longest, Anna, whose idle time no canceled ring resets.
        assert rang[call_id] == ("Ben" if arm == "variant" else "Anna"), (arm, rang[call_id])

    # The board's comparison reads each arm from the history, written by node B.
    async def report() -> dict[str, object]:
        async with http.get(f"{a.url}/v1/sites/acme/experiment", headers=sam) as r:
            assert r.status == 200
            found: dict[str, object] = await r.json()
            return found

    counts = {arm: list(arms.values()).count(arm) for arm in ("control", "variant")}

    async def all_written() -> bool:
        got = await report()
        arms_seen = got["arms"]
        assert isinstance(arms_seen, dict)
        return {k: v["requests"] for k, v in arms_seen.items()} == counts

    await eventually(all_written, timeout=10)
    got = await report()
    measures = got["measures"]
    assert isinstance(measures, list)
    assert {m["measure"]: m["verdict"] for m in measures} == {
        "time_to_first_human_s": "too_early",
        "abandonment": "too_early",
        "nps": "too_early",
    }

    # Stopped on node B: every call is routed by the default policy again, on both nodes.
    async with http.delete(f"{b.url}/v1/sites/acme/experiment", headers=sam) as r:
        assert r.status == 200
        assert (await r.json())["experiment"]["running"] is False
    for node in (a, b):
        await eventually(partial(_not_running, node), timeout=5)
        for _ in range(3):
            call_id, who = await one_call(node)
            stored = await stored_call(node, call_id)
            assert stored["experiment"] is None and stored["arm"] is None
            assert who == "Anna"
    await anna.close()
    await ben.close()


async def _not_running(node: Node) -> bool:
    return await node.app[keys.EXPERIMENTS].current("acme") is None


async def stored_call(node: Node, call_id: str) -> dict[str, Any]:
    row = await node.app[keys.STORE].get_call(call_id)
    assert row is not None
    return row.data


async def test_nodes_without_a_history_run_experiments_but_cannot_compare_them(
    nodes: NodeFactory, redis_url: str, http: aiohttp.ClientSession
) -> None:
    node = await nodes(redis_url=redis_url)  # nodes sharing Redis, no history_url
    sam = {"Authorization": f"Bearer {mint(node.settings, 'sam', Role.SUPERVISOR)}"}
    url = f"{node.url}/v1/sites/acme/experiment"
    async with http.put(url, json={"variant": "best_nps", "share": 0.01}, headers=sam) as r:
        assert r.status == 201
    async with http.get(url, headers=sam) as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "history_unavailable"
    async with http.delete(url, headers=sam) as r:  # stopped all the same, and said so
        assert r.status == 200
        stopped = await r.json()
        assert stopped["experiment"]["running"] is False and stopped["arms"] == {}
    assert await node.app[keys.EXPERIMENTS].current("acme") is None
