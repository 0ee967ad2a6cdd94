"""The supervisor's board at /board/ (issue 15) in headless Chromium: two nodes share one
Redis and one PostgreSQL history. The board, opened on node B, loads the day so far from
the history (rows the test wrote, whose sums it knows), draws it (the charts' rendered
points are checked, not only that a canvas exists), and follows agents and calls on node A
live. A supervisor of another site sees none of it. Screenshots, on a laptop and on a wall
screen, land in test-artifacts/screenshots/."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from conftest import Node, NodeFactory, SocketClient, free_port, make_settings, mint
from playwright.async_api import Browser, Page, async_playwright, expect
from test_browser_e2e import CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM, SCREENSHOTS
from test_callbacks import agent, visitor_token

from gateway.core.history import HistoryRow
from gateway.core.model import Role, Site
from gateway.edge.http import appkeys as keys
from gateway.settings import Settings

WAIT_MS = 15_000
STEP = 900  # the day span's slots

pytestmark = pytest.mark.skipif(
    not HAVE_CHROMIUM and not __import__("os").environ.get("CI"),
    reason=f"browser tests need Debian's Chromium at {CHROMIUM}",
)


def two_sites(settings: Settings) -> Settings:
    """acme, and globex with a supervisor of its own (gus)."""
    acme = settings.sites["acme"]
    gus = replace(acme.agents["sam"], agent_id="gus", site="globex", name="Gus", branch=None)
    globex = Site("globex", "Globex", ("https://globex.example",), {}, {"gus": gus})
    return msgspec.structs.replace(settings, sites={"acme": acme, "globex": globex})


@pytest.fixture
async def two_nodes(
    postgres_url: str, redis_url: str, nodes: NodeFactory, tmp_path: Path
) -> tuple[Node, Node]:
    # The database first: it is dropped after the nodes stop (they write what is pending).
    base = two_sites(make_settings(tmp_path, redis_url=redis_url, history_url=postgres_url))
    started = []
    for name in ("node-a", "node-b"):
        port = free_port()  # the board's page and its socket: the node's own origin
        url = f"http://127.0.0.1:{port}"
        settings = msgspec.structs.replace(base, node_id=name, port=port, public_url=url)
        started.append(await nodes(settings))
    a, b = started
    for node in (a, b):
        await node.app[keys.HISTORY].opened.wait()
    return a, b


@pytest.fixture
async def browser(two_nodes: tuple[Node, Node]) -> AsyncIterator[Browser]:
    """Depends on the nodes so that the pages close before the nodes stop."""
    if not HAVE_CHROMIUM:
        pytest.fail(f"CI is set but {CHROMIUM} is missing: install Debian's chromium")
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_board(
    browser: Browser, node: Node, token: str, errors: list[str], width: int = 1366
) -> Page:
    height = 900 if width < 2000 else 1440
    context = await browser.new_context(locale="en", viewport={"width": width, "height": height})
    page = await context.new_page()
    page.on("pageerror", lambda e: errors.append(f"uncaught {e}"))
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and "Failed to load resource" not in m.text
            else None
        ),
    )
    await page.goto(f"{node.url}/board/#token={token}")
    return page


async def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"board--{name}.png"), full_page=True)


def history_of_the_day(day_start: float, now: float) -> tuple[list[HistoryRow], dict[str, Any]]:
    """Calls in two slots of today, and what the board must show for them."""
    first = max(day_start, (now - 5 * 3600) // STEP * STEP)  # a slot five hours ago
    second = first + 2 * STEP
    rows: list[HistoryRow] = []

    def call(
        n: int,
        at: float,
        channel: str,
        outcome: str,
        to_human: float | None,
        agent: str | None = None,
        branch: str | None = None,
        score: int | None = None,
        on_time: bool | None = None,
    ) -> None:
        connected = None if to_human is None else at + to_human
        rows.append(
            HistoryRow(
                f"c_hist_{n}", "acme", channel, outcome, None, agent, branch, at, connected,
                at + 120, score, "[]", on_time=on_time,
            )
        )  # fmt: skip

    # Slot one: four browser calls reached (3, 3, 5 and 40 s), one customer gave up.
    call(1, first + 10, "webrtc", "completed", 3.2, "anna", "dublin", 10)
    call(2, first + 20, "webrtc", "completed", 3.7, "anna", "dublin", 9)
    call(3, first + 30, "webrtc", "completed", 5.5, "ben", "berlin", 3)
    call(4, first + 40, "webrtc", "completed", 41.0, "ben", "berlin", 8)
    call(5, first + 50, "webrtc", "canceled", None)
    # Slot three: three callbacks, two on time and one late; one request nobody could take.
    call(6, second + 10, "callback", "completed", 30.0, "anna", "dublin", 10, on_time=True)
    call(7, second + 20, "callback", "completed", 60.0, "ben", "berlin", 6, on_time=True)
    call(8, second + 30, "callback", "completed", 90.0, "ben", "berlin", on_time=False)
    call(9, second + 40, "webrtc", "failed", None)
    expected = {"first": first, "second": second}
    return rows, expected


async def chart_points(page: Page, chart: str) -> list[dict[str, Any]]:
    """Each dataset of a chart as drawn: its label, its values, and for each value the
    rendered element's place and whether the canvas is painted there."""
    points: list[dict[str, Any]] = await page.evaluate(
        """(id) => {
          const chart = window.MembraneBoard.charts[id];
          const ctx = chart.canvas.getContext("2d");
          const ratio = chart.currentDevicePixelRatio;
          return chart.data.datasets.map((ds, i) => ({
            label: ds.label,
            data: ds.data,
            drawn: chart.getDatasetMeta(i).data.map((el, j) => {
              if (ds.data[j] == null || ds.data[j] === 0) return null;
              const p = el.getCenterPoint ? el.getCenterPoint() : { x: el.x, y: el.y };
              const x = Math.round(p.x * ratio), y = Math.round(p.y * ratio);
              const pixel = ctx.getImageData(x, y, 1, 1).data;
              return { x: p.x, y: p.y, painted: pixel[3] > 0 };
            }),
          }));
        }""",
        chart,
    )
    return points


async def test_the_board_loads_the_day_from_history_and_follows_calls_across_nodes(
    two_nodes: tuple[Node, Node],
    browser: Browser,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    a, b = two_nodes
    now = time.time()
    day_start = (now // STEP + 1) * STEP - 86_400
    rows, when = history_of_the_day(day_start, now)
    await a.app[keys.HISTORY].history.put(rows)  # the day so far, before the board opens

    errors: list[str] = []
    page = await open_board(browser, b, mint(b.settings, "sam", Role.SUPERVISOR), errors)
    await expect(page.get_by_test_id("board-conn")).to_have_text("live", timeout=WAIT_MS)
    await page.wait_for_function("() => window.MembraneBoard.loaded >= 1", timeout=WAIT_MS)
    figures = await page.evaluate("window.MembraneBoard.figures")
    assert figures["span"] == "day" and figures["slots"] == 96
    start = figures["start"]
    first = int((when["first"] - day_start) // STEP)
    second = int((when["second"] - day_start) // STEP)
    assert start.startswith(time.strftime("%Y-%m-%dT%H:%M", time.gmtime(day_start)))

    # The tiles: nine requests, one gave up, two of three callbacks on time.
    await expect(page.locator("#t-requests")).to_have_text("9")
    await expect(page.locator("#t-abandoned")).to_have_text("1")
    await expect(page.locator("#t-ontime")).to_have_text("66.7%")

    outcomes = await chart_points(page, "c-outcomes")
    by_label = {d["label"]: d for d in outcomes}
    assert by_label["reached"]["data"][first] == 4 and by_label["reached"]["data"][second] == 3
    assert by_label["gave up"]["data"][first] == 1 and by_label["nobody free"]["data"][second] == 1
    assert sum(by_label["reached"]["data"]) == 7
    for label in ("reached", "gave up", "nobody free"):
        drawn = [p for p in by_label[label]["drawn"] if p is not None]
        assert drawn and all(p["painted"] for p in drawn), label
    reached_bar = by_label["reached"]["drawn"][first]
    taller = by_label["reached"]["drawn"][second]
    assert reached_bar["y"] < taller["y"], "four reached stand taller than three"
    assert taller["x"] > reached_bar["x"], "later slots to the right"

    to_human = await chart_points(page, "c-to-human")
    median, p90 = to_human[0], to_human[1]
    # Slot one's four waits (3.2, 3.7, 5.5, 41 s): the median in the 3-4 s bucket, the 90th
    # percentile in the 40-50 s one; the history's buckets are a second wide down there.
    assert 3 <= median["data"][first] <= 4 and 40 <= p90["data"][first] <= 50
    assert 30 <= median["data"][second] <= 75
    assert [i for i, v in enumerate(median["data"]) if v is not None] == [first, second]
    assert median["drawn"][first]["y"] > p90["drawn"][first]["y"], "the 90% line above"

    on_time = await chart_points(page, "c-on-time")
    assert on_time[0]["data"][second] == 66.7 and on_time[0]["data"][first] is None

    channels = {d["label"]: d["data"] for d in await chart_points(page, "c-channels")}
    assert channels["browser"][first] == 5 and channels["callback"][second] == 3

    branches = await page.evaluate(
        """() => { const c = window.MembraneBoard.charts["c-nps-branches"];
                   return { labels: c.data.labels, data: c.data.datasets[0].data,
                            drawn: c.getDatasetMeta(0).data.map((e) => e.x) }; }"""
    )
    # Dublin: 10, 9, 10 (all promoters) = 100; Berlin: 3, 8, 6 = one passive, two detractors.
    assert dict(zip(branches["labels"], branches["data"], strict=True)) == {
        "Dublin": 100.0,
        "Berlin": -66.7,
    }
    assert branches["drawn"][0] > branches["drawn"][1], "Dublin's bar reaches further right"
    await expect(page.locator("#t-nps")).to_have_text("17")  # (3 - 2) of 6 answers
    await shot(page, "laptop-day")

    # Live, across nodes: Anna comes online on node A, a visitor calls there.
    anna = await agent(clients, a, "anna")
    await expect(page.locator('#agents-table tr[data-agent="anna"] .pill')).to_have_text(
        "available", timeout=WAIT_MS
    )
    visitor = clients()
    await visitor.connect(a.url, "/visitor", {"token": await visitor_token(http, a)})
    started = await visitor.call("call:start", {"language": "en"}, "/visitor")
    call_id = started["call"]["call_id"]
    row = page.locator(f'#calls-table tr[data-call="{call_id}"]')
    await expect(row.locator(".pill")).to_have_text("ringing", timeout=WAIT_MS)
    assert (await anna.call("call:accept", {"call_id": call_id}, "/agent"))["ok"]
    await expect(row.locator(".pill")).to_have_text("connected", timeout=WAIT_MS)
    await expect(page.locator('#agents-table tr[data-agent="anna"] .pill')).to_have_text(
        "on call", timeout=WAIT_MS
    )
    await shot(page, "laptop-live")
    await anna.call("call:hangup", {"call_id": call_id}, "/agent")
    await expect(row).to_have_count(0, timeout=WAIT_MS)
    # The ended call reaches the history, and the board's figures, without a reload.
    await expect(page.locator("#t-requests")).to_have_text("10", timeout=WAIT_MS)
    assert not errors, errors
    await visitor.close()
    await anna.close()

    # The same board on a wall screen, over the last hour and the last week.
    wall = await open_board(browser, a, mint(a.settings, "sam", Role.SUPERVISOR), errors, 2560)
    await wall.wait_for_function("() => window.MembraneBoard.loaded >= 1", timeout=WAIT_MS)
    await wall.get_by_role("button", name="Last week").click()
    await wall.wait_for_function(
        "() => window.MembraneBoard.figures && window.MembraneBoard.figures.span === 'week'",
        timeout=WAIT_MS,
    )
    week = await wall.evaluate("window.MembraneBoard.figures")
    assert week["slots"] == 56 and week["totals"]["requests"] == 10
    await shot(wall, "wall-week")
    await wall.get_by_role("button", name="Last hour").click()
    await wall.wait_for_function(
        "() => window.MembraneBoard.figures.span === 'hour'", timeout=WAIT_MS
    )
    hour = await wall.evaluate("window.MembraneBoard.figures")
    assert hour["totals"]["requests"] == 1 and hour["totals"]["reached"] == 1
    assert not errors, errors


async def test_a_supervisor_of_another_site_sees_none_of_it(
    two_nodes: tuple[Node, Node],
    browser: Browser,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
) -> None:
    a, b = two_nodes
    gus = mint(b.settings, "gus", Role.SUPERVISOR, site="globex")
    for path in ("figures", "experiment", "agents", "history.csv?day=2026-12-04"):
        async with http.get(
            f"{b.url}/v1/sites/acme/{path}", headers={"Authorization": f"Bearer {gus}"}
        ) as r:
            assert r.status == 403, path
            assert (await r.json())["error"]["code"] == "forbidden"
    errors: list[str] = []
    page = await open_board(browser, b, gus, errors)
    sams = await open_board(browser, b, mint(b.settings, "sam", Role.SUPERVISOR), errors)
    for board in (page, sams):
        await expect(board.get_by_test_id("board-conn")).to_have_text("live", timeout=WAIT_MS)
        await board.wait_for_function("() => window.MembraneBoard.loaded >= 1", timeout=WAIT_MS)
    anna = await agent(clients, a, "anna")  # an acme agent comes online: not Gus's to see
    await expect(sams.locator('#agents-table tr[data-agent="anna"] .pill')).to_have_text(
        "available", timeout=WAIT_MS
    )
    await expect(page.locator('#agents-table tr[data-agent="gus"]')).to_have_count(1)
    await expect(page.locator('#agents-table tr[data-agent="anna"]')).to_have_count(0)
    assert await page.evaluate("window.MembraneBoard.agents.has('anna')") is False
    await anna.close()
    # An agent's token opens no board.
    agent_page = await open_board(browser, b, mint(b.settings, "anna"), errors)
    await expect(agent_page.get_by_test_id("board-error")).to_contain_text("for supervisors")
    assert not errors, errors
