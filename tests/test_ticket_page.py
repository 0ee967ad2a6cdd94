"""The customer's ticket page (/t/{call_id}) in headless Chromium, in English and German.

Two gateway nodes share one Redis and one ManualClock, so a callback's time comes when the
test moves the clock, not after a wait. The page is opened on node B; the callback is made,
rung and connected on node A (an agent socket, the Twilio simulator for the phones), and the
page follows it live. Screenshots of each state land in test-artifacts/screenshots/.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import test_callbacks
from conftest import Node, NodeFactory, SocketClient, mint
from playwright.async_api import Browser, Page, async_playwright, expect
from test_browser_e2e import CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM, SCREENSHOTS
from test_callbacks import (
    ANNA_PHONE,
    VISITOR_PHONE,
    agent,
    phone_node,
    request_callback,
)
from test_follow_ups import talked, team_settings
from test_promises import anna_on_a_call, texts_to
from twilio_sim import TwilioSim

from gateway.edge.http import appkeys as keys
from gateway.ops.clock import ManualClock

WAIT_MS = 10_000
sim = test_callbacks.sim  # the fixture: a Twilio simulator

pytestmark = pytest.mark.skipif(
    not HAVE_CHROMIUM and not __import__("os").environ.get("CI"),
    reason=f"browser tests need Debian's Chromium at {CHROMIUM}",
)

# What the page says at each step, in each language it is tested in.
SAYS: dict[str, dict[str, str | re.Pattern[str]]] = {
    "en": {
        "scheduled": re.compile(r"^We'll call you at .+, in \d+ minutes\.$"),
        "moved": "You picked a new time.",
        "ringing": "Anna from our Dublin branch will call you in a moment.",
        "connected": "You're on the phone with Anna.",
        "completed": "You spoke with Anna from our Dublin branch.",
        "canceled": "Your callback was canceled.",
        "invalid": "This link isn't valid. Check that you copied all of it.",
    },
    "de": {
        "scheduled": re.compile(r"^Wir rufen Sie um .+ an, in \d+ Minuten\.$"),
        "moved": "Sie haben eine neue Zeit gewählt.",
        "ringing": "Anna aus unserer Filiale Dublin ruft Sie gleich an.",
        "connected": "Sie telefonieren mit Anna.",
        "completed": "Sie haben mit Anna aus unserer Filiale Dublin gesprochen.",
        "canceled": "Ihr Rückruf wurde abgesagt.",
        "invalid": "Dieser Link ist ungültig. Prüfen Sie, ob Sie ihn vollständig kopiert haben.",
    },
}


@pytest.fixture
async def two_nodes(
    nodes: NodeFactory, tmp_path: Path, sim: TwilioSim, redis_url: str, clock: ManualClock
) -> tuple[Node, Node]:
    # A promise is judged from 10 minutes ahead, and a minute late is late; a follow-up
    # waits 10 minutes for its agent. Olivia and Oscar are a team (tests/test_follow_ups.py).
    policy = {"late_after_s": 60, "late_notice_ahead_s": 600, "follow_up_wait_s": 600}
    a = await phone_node(nodes, team_settings(tmp_path, sim, redis_url, "node-a", **policy), clock)
    b = await phone_node(nodes, team_settings(tmp_path, sim, redis_url, "node-b", **policy), clock)
    sim.messaging.number(a.settings.sites["acme"].caller_ids[0], sms_url=f"{b.url}/v1/twilio/sms")
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


@pytest.fixture
def errors() -> list[str]:
    return []


@pytest.fixture
def open_page(browser: Browser, errors: list[str]) -> Callable[..., Any]:
    async def open_it(url: str, language: str, width: int = 390) -> Page:
        # A phone's screen: the page is for the customer, who is most often on one.
        context = await browser.new_context(
            locale=language, viewport={"width": width, "height": 780}
        )
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
        await page.goto(url)
        return page

    return open_it


def shot(request: pytest.FixtureRequest) -> Callable[[Page, str], Any]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    prefix = request.node.name.removeprefix("test_")

    async def take(page: Page, state: str) -> None:
        path = SCREENSHOTS / f"{prefix}--{state}.png"
        await page.screenshot(path=str(path), animations="disabled", full_page=True)

    return take


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def page_url(node: Node, created: dict[str, Any], language: str) -> str:
    return f"{node.url}/t/{created['call_id']}?lang={language}#{created['status_token']}"


async def says(page: Page, text: str | re.Pattern[str]) -> None:
    await expect(page.get_by_test_id("ticket-status")).to_have_text(text, timeout=WAIT_MS)


@pytest.mark.parametrize("language", ["en", "de"])
async def test_the_ticket_page_follows_a_callback_from_request_to_completion(
    language: str,
    two_nodes: tuple[Node, Node],
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
    open_page: Callable[..., Any],
    errors: list[str],
    request: pytest.FixtureRequest,
) -> None:
    a, b = two_nodes
    take = shot(request)
    say = SAYS[language]
    sim.phone(VISITOR_PHONE, answer_after=1, hangup_after=30)
    sim.phone(ANNA_PHONE, answer_after=1)
    anna = await agent(clients, a, "anna")
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600), "language": language}
    )
    assert status == 201, created
    assert created["ticket_url"] == (f"{a.url}/t/{created['call_id']}#{created['status_token']}"), (
        "the link to send the customer"
    )

    page = await open_page(page_url(b, created, language), language)
    await says(page, say["scheduled"])
    await expect(page.locator("html")).to_have_attribute("lang", language)
    await take(page, f"{language}-scheduled")

    # The customer picks another time on the page.
    await page.get_by_test_id("ticket-move").click()
    slots = page.get_by_test_id("ticket-slots")
    await expect(slots).to_be_focused()
    second = await slots.locator("option").nth(1).get_attribute("value")
    assert second is not None
    await slots.select_option(second)
    await take(page, f"{language}-picking-a-time")
    await page.get_by_test_id("ticket-move-confirm").click()
    await expect(page.get_by_test_id("ticket-timeline")).to_contain_text(str(say["moved"]))
    await says(page, say["scheduled"])
    state = await page.evaluate("() => MembraneTicket.state()")
    moved_to = datetime.fromisoformat(state["call"]["scheduled_at"]).timestamp()
    assert abs(moved_to - datetime.fromisoformat(second).timestamp()) < 1

    # Its time comes (node A's timers); the page on node B follows every step.
    await clock.advance(moved_to - clock.now() + 1)
    await says(page, say["ringing"])
    await expect(page.get_by_test_id("ticket-move")).to_be_hidden()
    await take(page, f"{language}-ringing")
    ack = await anna.call("call:accept", {"call_id": created["call_id"]}, "/agent")
    assert ack["ok"], ack
    leg = await sim.wait_for_call(to=VISITOR_PHONE, status="in-progress", timeout=10)
    await says(page, say["connected"])
    await take(page, f"{language}-connected")
    sim.hangup(leg.sid)
    await says(page, say["completed"])
    await take(page, f"{language}-completed")
    assert not errors, errors


async def test_the_page_says_first_when_a_callback_will_run_late_and_the_customer_keeps_it(
    two_nodes: tuple[Node, Node],
    sim: TwilioSim,
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
    open_page: Callable[..., Any],
    errors: list[str],
    request: pytest.FixtureRequest,
) -> None:
    a, b = two_nodes
    take = shot(request)
    await anna_on_a_call(clients, http, a)  # the only agent, busy: the callback will be late
    at = round(clock.now()) + 1200
    status, created = await request_callback(http, a, {"phone": VISITOR_PHONE, "at": iso(at)})
    assert status == 201, created
    page = await open_page(page_url(b, created, "en"), "en")
    await says(page, SAYS["en"]["scheduled"])
    await expect(page.get_by_test_id("ticket-late")).to_be_hidden()
    first = await page.get_by_test_id("ticket-status").text_content()

    await clock.advance(at - 600 - clock.now())  # ten minutes before the time
    late = page.get_by_test_id("ticket-late")
    await expect(late).to_be_visible(timeout=WAIT_MS)
    await expect(late).to_contain_text(
        re.compile(r"Sorry, we're running late\. We now expect to call you at .+, in \d+ minutes\.")
    )
    # The headline now gives the new time, not the one first promised; the text went too.
    await expect(page.get_by_test_id("ticket-status")).not_to_have_text(str(first))
    await take(page, "late")
    assert any("we're running late" in t for t in texts_to(sim, VISITOR_PHONE))

    await page.get_by_test_id("ticket-keep").focus()
    await page.keyboard.press("Enter")
    await expect(late).to_be_hidden(timeout=WAIT_MS)
    await expect(page.get_by_test_id("ticket-timeline")).to_contain_text("You kept your place.")
    await expect(page.get_by_test_id("ticket-status")).to_be_focused()
    state = await page.evaluate("() => MembraneTicket.state()")
    assert state["call"]["late"] is False and state["call"]["promised_at"] > iso(at)
    await take(page, "kept")
    assert not errors, errors


def agent_app(node: Node, agent_id: str) -> str:
    return f"{node.url}/agent/#token={mint(node.settings, agent_id)}"


@pytest.mark.parametrize("away", [False, True])
async def test_a_follow_up_rings_its_agent_or_with_her_away_a_colleague_who_sees_her_note(
    away: bool,
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clients: Callable[[], SocketClient],
    clock: ManualClock,
    open_page: Callable[..., Any],
    errors: list[str],
    request: pytest.FixtureRequest,
) -> None:
    a, b = two_nodes
    take = shot(request)
    olivia = await agent(clients, a, "olivia")
    started = await talked(clients, http, a, olivia)
    at = round(clock.now()) + 1200
    note = "Refund approved; confirm the account"
    ask = {"call_id": started["call"]["call_id"], "at": iso(at), "note": note}
    ack = await olivia.call("call:follow_up", {**ask, "phone": VISITOR_PHONE}, "/agent")
    assert ack["ok"], ack
    await olivia.close()
    # The customer's page names the follow-up and who will call.
    ticket = await open_page(
        f"{b.url}/t/{started['call']['call_id']}?lang=en#{started['status_token']}", "en"
    )
    await expect(ticket.get_by_test_id("ticket-follow-up")).to_contain_text(
        "Olivia Byrne will call you back:", timeout=WAIT_MS
    )
    # The one who takes it has the agent app open: Olivia herself, or (away) Oscar.
    taker = "oscar" if away else "olivia"
    app = await open_page(agent_app(b, taker), "en", width=1024)
    await expect(app.get_by_test_id("agent-status")).to_have_attribute(
        "data-status", "available", timeout=WAIT_MS
    )
    await clock.advance(at - clock.now() + 1)
    if away:
        await clock.advance(600)  # the site waits 10 minutes for her, then her branch
    ring = app.get_by_test_id("agent-ring")
    await expect(ring).to_be_visible(timeout=WAIT_MS)
    await expect(app.get_by_test_id("agent-ring-follow-up")).to_have_text(
        f"Promised by Olivia Byrne: {note}"
    )
    await take(app, f"{taker}-rung")
    await ticket.get_by_test_id("ticket-follow-up-link").click()
    who = "Oscar Walsh" if away else "Olivia Byrne"
    await expect(ticket.get_by_test_id("ticket-status")).to_have_text(
        f"{who} from our Online team branch will call you in a moment.", timeout=WAIT_MS
    )
    if away:
        await expect(ticket.get_by_test_id("ticket-timeline")).to_contain_text(
            "A colleague took over, with the notes from your last call."
        )
    await take(ticket, f"follow-up-{taker}")
    assert not errors, errors


async def test_the_customer_cancels_from_the_page_and_a_wrong_link_shows_nothing(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clock: ManualClock,
    open_page: Callable[..., Any],
    request: pytest.FixtureRequest,
) -> None:
    a, b = two_nodes
    take = shot(request)
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    page = await open_page(page_url(b, created, "en"), "en-GB", width=1024)
    await says(page, SAYS["en"]["scheduled"])

    # Keyboard only: the buttons are reachable and work with Enter.
    await page.get_by_test_id("ticket-cancel").focus()
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("ticket-cancel-confirm")).to_be_visible()
    await take(page, "confirm")
    await page.get_by_test_id("ticket-cancel-confirm").click()
    await says(page, SAYS["en"]["canceled"])
    await expect(page.get_by_test_id("ticket-cancel")).to_be_hidden()
    r = await http.get(
        f"{a.url}/v1/calls/{created['call_id']}", params={"token": created["status_token"]}
    )
    assert (await r.json())["state"] == "canceled"

    # And erases their personal data: the number is gone from the stored call.
    await page.get_by_test_id("ticket-erase").click()
    await page.get_by_test_id("ticket-erase-confirm").click()
    await expect(page.get_by_test_id("ticket-timeline")).to_contain_text(
        "You erased your personal data."
    )
    await expect(page.get_by_test_id("ticket-erase")).to_be_hidden()
    await take(page, "erased")
    row = await a.app[keys.STORE].get_call(created["call_id"])
    assert row is not None and VISITOR_PHONE not in str(row.data)

    # A wrong token and an unknown call: the same page, the same words, nothing about it.
    wrong = await open_page(
        f"{b.url}/t/{created['call_id']}?lang=de#not-the-token", "de", width=1024
    )
    unknown = await open_page(f"{b.url}/t/c_{'0' * 32}?lang=de#{created['status_token']}", "de")
    for shown in (wrong, unknown):
        await expect(shown.get_by_test_id("ticket-error")).to_have_text(SAYS["de"]["invalid"])
        await expect(shown.get_by_test_id("ticket-status")).to_have_text("")
        await expect(shown.get_by_test_id("ticket-timeline")).to_be_empty()
    await take(wrong, "wrong-token")


async def test_a_shared_link_shows_a_colleague_where_it_stands_until_the_customer_stops_it(
    two_nodes: tuple[Node, Node],
    http: aiohttp.ClientSession,
    clock: ManualClock,
    open_page: Callable[..., Any],
    errors: list[str],
    request: pytest.FixtureRequest,
) -> None:
    a, b = two_nodes
    take = shot(request)
    status, created = await request_callback(
        http, a, {"phone": VISITOR_PHONE, "at": iso(clock.now() + 600)}
    )
    assert status == 201, created
    owner = await open_page(page_url(a, created, "en"), "en")
    await says(owner, SAYS["en"]["scheduled"])
    await owner.get_by_test_id("ticket-share").click()
    link = owner.get_by_test_id("ticket-share-url")
    await expect(link).to_be_visible()
    await expect(link).to_be_focused()
    share_url = await link.input_value()
    assert share_url.startswith(f"{a.url}/t/{created['call_id']}#")
    await take(owner, "sharing")

    colleague = await open_page(share_url.replace(a.url, b.url) + "", "de")
    await says(colleague, SAYS["de"]["scheduled"])
    await expect(colleague.get_by_test_id("ticket-shared-note")).to_have_text(
        "Mit Ihnen geteilt: nur zum Ansehen."
    )
    for hidden in ("ticket-move", "ticket-cancel", "ticket-share"):
        await expect(colleague.get_by_test_id(hidden)).to_be_hidden()
    assert VISITOR_PHONE not in await colleague.content()
    await take(colleague, "shared-view")

    await owner.get_by_test_id("ticket-unshare").click()
    await expect(colleague.get_by_test_id("ticket-error")).to_have_text(
        "Dieser Link wird nicht mehr geteilt.", timeout=WAIT_MS
    )
    await expect(colleague.get_by_test_id("ticket-status")).to_have_text("")
    await expect(owner.get_by_test_id("ticket-share")).to_be_visible()
    await take(colleague, "unshared")
    assert not errors, errors
