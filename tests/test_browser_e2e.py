"""End to end in a real browser: the demo site's widget calls an agent in the agent app.

Debian's Chromium (driven by Playwright) opens the demo site on node A and the agent app on
node B; the two nodes share one Redis. Fake microphones make real audio flow over WebRTC
between two browser contexts, so these tests prove what the unit tests cannot: the widget,
the agent app and the gateway together connect a call a person can hear.

Screenshots of every state land in test-artifacts/screenshots/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import Node, NodeFactory, free_port, make_settings, mint, replace
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Response,
    Route,
    async_playwright,
    expect,
)
from twilio_sim import TwilioSim

from gateway.edge.http import appkeys as keys
from gateway.settings import Settings, TwilioSettings

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]
RING_TIMEOUT_S = 4.0
WAIT_MS = 10_000  # for any one thing to show up in a page
MEDIA_WAIT_MS = 15_000  # for ICE, DTLS and the first audio packets

pytestmark = pytest.mark.skipif(
    not HAVE_CHROMIUM and not os.environ.get("CI"),
    reason=f"browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium); "
    "in CI (CI set) they run and fail instead",
)

# The JavaScript each page exposes for tests: the widget's `Membrane._pc`, the agent app's
# `MembraneAgent.pc` (both RTCPeerConnection, kept after the call ends, then closed).
WIDGET_PC = "window.Membrane && window.Membrane._pc"
AGENT_PC = "window.MembraneAgent && window.MembraneAgent.pc"


def connected_js(pc: str) -> str:
    return f"() => {{ const pc = {pc}; return !!pc && pc.connectionState === 'connected'; }}"


def inbound_bytes_above_js(pc: str) -> str:
    """A predicate: the audio bytes received so far once they exceed `min`, else false.

    wait_for_function does not await a promise, so each poll starts a getStats() (one at a
    time) and judges the last reading it finished.
    """
    return f"""(min) => {{
      const pc = {pc};
      if (!pc || pc.connectionState !== "connected") return false;
      const probe = (window.__inboundProbe ||= {{ pc: null, received: 0, pending: false }});
      if (probe.pc !== pc) Object.assign(probe, {{ pc, received: 0, pending: false }});
      if (!probe.pending) {{
        probe.pending = true;
        pc.getStats().then((stats) => {{
          let received = 0;
          stats.forEach((r) => {{
            if (r.type === "inbound-rtp" && r.kind === "audio") received += r.bytesReceived || 0;
          }});
          if (probe.pc === pc) Object.assign(probe, {{ received, pending: false }});
        }});
      }}
      return probe.received > min ? probe.received : false;
    }}"""


async def pc_state(page: Page, pc: str) -> str | None:
    state: str | None = await page.evaluate(
        f"() => {{ const pc = {pc}; return pc ? pc.connectionState : null; }}"
    )
    return state


async def audio_flows(page: Page, pc: str) -> None:
    """The peer connection is connected and receives audio: past 2000 bytes, then more."""
    await page.wait_for_function(connected_js(pc), timeout=MEDIA_WAIT_MS)
    first = await page.wait_for_function(
        inbound_bytes_above_js(pc), arg=2000, polling=100, timeout=MEDIA_WAIT_MS
    )
    seen = await first.json_value()
    assert type(seen) in (int, float) and seen > 2000, seen
    grown = await page.wait_for_function(
        inbound_bytes_above_js(pc), arg=seen, polling=100, timeout=MEDIA_WAIT_MS
    )
    assert await grown.json_value() > seen


# --- the gateway: two nodes on known ports, the demo site allowing both ------------------------


@dataclass
class Gateway:
    a: Node  # serves the demo site (the widget's gateway)
    b: Node  # serves the agent app
    settings: Settings
    phones: TwilioSim  # the phone network, for callbacks

    def demo_url(self) -> str:
        return f"{self.a.url}/demo/"

    def agent_url(self, agent: str, node: Node | None = None) -> str:
        return f"{(node or self.b).url}/agent/#token={mint(self.settings, agent)}"


@pytest.fixture
async def phones() -> AsyncIterator[TwilioSim]:
    sim = TwilioSim(time_scale=0.05)
    await sim.start()
    yield sim
    await sim.close()
    assert sim.contract_violations == []


REFERRAL_URL = "https://acme.example/refer?from=membrane"


@pytest.fixture
async def gateway(nodes: NodeFactory, redis_url: str, tmp_path: Path, phones: TwilioSim) -> Gateway:
    port_a, port_b = free_port(), free_port()
    twilio = TwilioSettings(phones.account_sid, phones.auth_token, phones.base_url)
    base = make_settings(tmp_path, redis_url=redis_url, port=port_a, twilio=twilio)
    origins = (f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}")
    acme = base.sites["acme"]
    acme = replace(
        acme,
        allowed_origins=(*acme.allowed_origins, *origins),
        ring_timeout_s=RING_TIMEOUT_S,
        referral_url=REFERRAL_URL,
    )
    # Callbacks are refused in the number's night (21:00-08:00 by default): the test moves
    # the quiet hours away from now, as a site cannot in its config.
    quiet = (datetime.now(UTC) + timedelta(hours=12)).time().replace(second=0, microsecond=0)
    quiet_end = (datetime.combine(datetime.now(UTC).date(), quiet) + timedelta(minutes=1)).time()
    policy = replace(acme.callback_policy, quiet_hours_start=quiet, quiet_hours_end=quiet_end)
    acme = replace(acme, callback_policy=policy)
    settings = replace(base, sites={**base.sites, "acme": acme})
    a = await nodes(replace(settings, node_id="node-a", public_url=origins[0]))
    b = await nodes(replace(settings, node_id="node-b", port=port_b, public_url=origins[1]))
    assert (a.url, b.url) == origins
    return Gateway(a, b, settings, phones)


# --- the browser ---------------------------------------------------------------------------------


@dataclass
class Browsers:
    """One Chromium; each person (visitor, agent) gets a context of their own."""

    browser: Browser
    contexts: list[BrowserContext] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def open(self, who: str, url: str, locale: str = "en-US") -> Page:
        context = await self.browser.new_context(
            permissions=["microphone"], viewport={"width": 1100, "height": 760}, locale=locale
        )
        self.contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda e: self.errors.append(f"{who}: uncaught {e}"))
        page.on("console", lambda m: self._console(who, m))
        page.on("response", lambda r: self._response(who, r))
        await page.goto(url)
        return page

    def _console(self, who: str, message: ConsoleMessage) -> None:
        # HTTP errors show up as "Failed to load resource"; _response judges those.
        if message.type in ("error", "warning") and "Failed to load resource" not in message.text:
            self.errors.append(f"{who}: console.{message.type}: {message.text}")

    def _response(self, who: str, response: Response) -> None:
        path = urlsplit(response.url).path
        if response.status >= 400:
            self.errors.append(f"{who}: HTTP {response.status} {response.request.method} {path}")

    async def close(self) -> None:
        try:
            for context in self.contexts:
                await context.close()  # and its pages
        finally:
            await self.browser.close()


@pytest.fixture
async def browsers(gateway: Gateway) -> AsyncIterator[Browsers]:
    """Depends on `gateway` so the pages close before the nodes stop."""
    if not HAVE_CHROMIUM:
        pytest.fail(f"CI is set but {CHROMIUM} is missing: install Debian's chromium")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        b = Browsers(browser)
        try:
            yield b
        finally:
            await b.close()


Shot = Callable[[Page, str], Awaitable[None]]


@pytest.fixture
def shot(request: pytest.FixtureRequest) -> Shot:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    prefix = request.node.name.removeprefix("test_")

    async def take(page: Page, state: str) -> None:
        # Finite animations (the ring card sliding in) are finished first, so a screenshot
        # shows the state as a person sees it, not a half-faded frame.
        await page.screenshot(
            path=str(SCREENSHOTS / f"{prefix}--{state}.png"), animations="disabled"
        )

    return take


# --- page helpers --------------------------------------------------------------------------------


async def agent_signed_in(page: Page, status: str = "available") -> None:
    await expect(page.get_by_test_id("agent-status")).to_have_attribute(
        "data-status", status, timeout=WAIT_MS
    )


async def visitor_calls_and_talks(visitor: Page, agent: Page, name: str = "Anna") -> None:
    """The visitor presses the button, the agent answers, and audio flows both ways."""
    button = visitor.get_by_test_id("membrane-button")
    await expect(button).to_have_text("Talk to us now", timeout=WAIT_MS)
    await button.click()
    await expect(agent.get_by_test_id("agent-ring")).to_be_visible(timeout=WAIT_MS)
    await agent.get_by_test_id("agent-accept").click()
    await widget_says(visitor, f"Connected with {name}")
    await audio_flows(visitor, WIDGET_PC)
    await audio_flows(agent, AGENT_PC)


async def widget_says(page: Page, text: str | re.Pattern[str]) -> None:
    await expect(page.get_by_test_id("membrane-status")).to_have_text(text, timeout=WAIT_MS)


async def membrane_state(page: Page) -> dict[str, Any]:
    state: dict[str, Any] = await page.evaluate("() => Membrane.state()")
    return state


def no_errors(browsers: Browsers) -> None:
    assert not browsers.errors, "the pages reported errors:\n" + "\n".join(browsers.errors)


# --- the scenarios -------------------------------------------------------------------------------


async def test_a_visitor_calls_anna_in_the_browser_talks_and_hangs_up(
    gateway: Gateway, browsers: Browsers, shot: Shot
) -> None:
    anna = await browsers.open("anna", gateway.agent_url("anna"))
    await agent_signed_in(anna)
    assert "#token" not in anna.url, "the token leaves the address bar"

    visitor = await browsers.open("visitor", gateway.demo_url())
    button = visitor.get_by_test_id("membrane-button")
    await expect(button).to_have_text("Talk to us now", timeout=WAIT_MS)
    avail = (await membrane_state(visitor))["availability"]
    # Anna is in the app and has a mobile number, and this gateway places callbacks: a
    # browser call and a callback can both reach her.
    assert avail["available"] and avail["agents_available"] == 1
    assert avail["channels"] == ["webrtc", "pstn"] and avail["callbacks"]
    await shot(visitor, "widget-idle-available")

    await button.click()
    await widget_says(visitor, "Ringing Anna in Dublin…")
    await expect(visitor.get_by_test_id("membrane-hangup")).to_be_visible()
    await expect(button).to_have_text("Your call")
    ring = anna.get_by_test_id("agent-ring")
    await expect(ring).to_be_visible(timeout=WAIT_MS)
    await expect(ring).to_contain_text("New visitor")
    await expect(ring).to_contain_text(gateway.demo_url())  # the page the visitor is on
    await expect(ring).to_contain_text("s to answer")
    # Both at once: the ring lasts only RING_TIMEOUT_S.
    await asyncio.gather(shot(visitor, "widget-ringing"), shot(anna, "agent-ringing"))
    await anna.get_by_test_id("agent-accept").click()

    await expect(ring).to_have_count(0)
    await expect(anna.get_by_test_id("agent-call-state")).to_have_text("connected")
    await expect(anna.get_by_test_id("agent-status")).to_have_attribute("data-status", "on_call")
    await widget_says(visitor, "Connected with Anna")
    await expect(visitor.get_by_test_id("membrane-mute")).to_be_visible()

    # Real audio both ways: each side's peer connection is connected and receives bytes.
    await audio_flows(visitor, WIDGET_PC)
    await audio_flows(anna, AGENT_PC)
    await shot(visitor, "widget-connected")
    await shot(anna, "agent-in-call")
    # Anna is on a call, so nobody else can be offered a browser call now.
    await expect(button).to_have_text("Back to your call")
    call_id = (await membrane_state(visitor))["call"]["call_id"]
    assert call_id == await anna.evaluate("() => MembraneAgent.call.call_id")

    await visitor.get_by_test_id("membrane-hangup").click()
    await widget_says(visitor, "Call ended")
    ended = (await membrane_state(visitor))["call"]
    assert ended["state"] == "completed" and ended["reason"] == "visitor_hung_up"
    await expect(visitor.get_by_test_id("membrane-hangup")).to_be_hidden()
    await expect(anna.get_by_test_id("agent-call-state")).to_have_text("completed")
    await expect(anna.get_by_test_id("agent-hangup")).to_be_hidden()
    await agent_signed_in(anna, "available")  # free again
    assert await pc_state(visitor, WIDGET_PC) == "closed", "the widget released the call"
    assert await pc_state(anna, AGENT_PC) == "closed", "the agent app released the call"
    # And the button offers a call again (the availability stream saw Anna free up).
    await expect(button).to_have_text("Talk to us now", timeout=WAIT_MS)
    await shot(visitor, "widget-ended")
    await shot(anna, "agent-call-ended")
    # The question after the call: the visitor answers 9 and is offered the referral link.
    survey = visitor.get_by_test_id("membrane-survey")
    await expect(survey).to_be_visible()
    await expect(survey).to_contain_text("How likely are you to recommend us to a friend?")
    await visitor.get_by_test_id("membrane-score-9").click()
    await visitor.get_by_test_id("membrane-comment").fill("Quick and friendly")
    await shot(visitor, "widget-survey")
    await visitor.get_by_test_id("membrane-survey-send").click()
    await expect(visitor.get_by_test_id("membrane-survey-thanks")).to_have_text("Thank you!")
    await expect(survey).to_be_hidden()
    referral = visitor.get_by_test_id("membrane-referral")
    await expect(referral).to_have_attribute("href", REFERRAL_URL)
    stored = await gateway.a.app[keys.STORE].get_call(call_id)
    assert stored is not None and stored.data["survey_score"] == 9
    assert stored.data["survey_comment"] == "Quick and friendly"
    # Anna promises to call the visitor back, at the first time her branch is open, on the
    # number they gave her.
    follow_up = anna.get_by_test_id("agent-follow-up")
    await expect(follow_up).to_be_visible()
    first_open = await anna.evaluate(
        """async () => {
          const r = await fetch("/v1/sites/acme/callback-slots?branch=dublin");
          const at = new Date((await r.json()).slots[0]);
          const pad = (n) => String(n).padStart(2, "0");
          const day = `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())}`;
          return `${day}T${pad(at.getHours())}:${pad(at.getMinutes())}`;
        }"""
    )
    await anna.get_by_test_id("agent-follow-up-at").fill(first_open)
    await anna.get_by_test_id("agent-follow-up-phone").fill("+353 86 111 0001")
    await anna.get_by_test_id("agent-follow-up-note").fill("Send the new contract first")
    await shot(anna, "agent-follow-up")
    await anna.get_by_test_id("agent-follow-up-save").click()
    await expect(anna.get_by_test_id("agent-follow-up-done")).to_contain_text(
        "Follow-up promised for", timeout=WAIT_MS
    )
    await expect(follow_up).to_be_hidden()
    # The call's ticket page, linked from the widget, keeps who the visitor spoke to, and the
    # follow-up Anna promised, whose own page the same link opens.
    link = visitor.get_by_test_id("membrane-call-ticket-link")
    await expect(link).to_be_visible()
    async with visitor.context.expect_page() as opened:
        await link.click()
    ticket = await opened.value
    await expect(ticket.get_by_test_id("ticket-status")).to_have_text(
        "You spoke with Anna from our Dublin branch.", timeout=WAIT_MS
    )
    await expect(ticket.get_by_test_id("ticket-follow-up")).to_contain_text(
        "Anna will call you back:"
    )
    await shot(ticket, "ticket-after-browser-call")
    await ticket.get_by_test_id("ticket-follow-up-link").click()
    await expect(ticket.get_by_test_id("ticket-status")).to_have_text(
        re.compile(r"^Anna from our Dublin branch will call you at .+"), timeout=WAIT_MS
    )
    await shot(ticket, "ticket-follow-up")
    await ticket.close()

    # Back on the site later (a new page load): the widget proves who the visitor is with the
    # secret it kept, so Anna rings again and sees she spoke with them before.
    await visitor.reload()
    await expect(button).to_have_text("Talk to us now", timeout=WAIT_MS)
    await button.click()
    await expect(ring).to_contain_text("Spoke with Anna before", timeout=WAIT_MS)
    await visitor.get_by_test_id("membrane-hangup").click()
    await expect(ring).to_have_count(0, timeout=WAIT_MS)
    no_errors(browsers)


async def test_a_german_visitor_gets_the_widget_in_german(
    gateway: Gateway, browsers: Browsers, shot: Shot
) -> None:
    """The widget speaks the visitor's language from the gateway's catalogues, as the ticket
    page and the phone prompts do; so does the agent app, in its agent's browser's language
    (here German too), and Anna sees the call's language on the ring."""
    anna = await browsers.open("anna", gateway.agent_url("anna"), locale="de-DE")
    await agent_signed_in(anna)
    await expect(anna.get_by_role("tabpanel", name="Ich")).to_be_visible()
    await expect(anna.get_by_test_id("agent-status")).to_have_text("verfügbar")
    visitor = await browsers.open("visitor", gateway.demo_url(), locale="de-DE")
    button = visitor.get_by_test_id("membrane-button")
    await expect(button).to_have_text("Jetzt mit uns sprechen", timeout=WAIT_MS)
    await button.click()
    await widget_says(visitor, "Es klingelt bei Anna in Dublin…")
    await expect(visitor.get_by_test_id("membrane-hangup")).to_have_text("Auflegen")
    ring = anna.get_by_test_id("agent-ring")
    await expect(ring).to_contain_text("de-DE", timeout=WAIT_MS)
    await expect(ring).to_contain_text("Eingehender Anruf")
    await expect(anna.get_by_test_id("agent-accept")).to_have_text("Annehmen")
    await shot(anna, "agent-german-ring")
    await anna.get_by_test_id("agent-accept").click()
    await expect(anna.get_by_test_id("agent-call-state")).to_have_text("verbunden")
    await widget_says(visitor, "Verbunden mit Anna")
    await visitor.get_by_test_id("membrane-hangup").click()
    await widget_says(visitor, "Anruf beendet")
    await expect(visitor.get_by_test_id("membrane-survey")).to_contain_text(
        "Wie wahrscheinlich ist es, dass Sie uns einem Freund empfehlen?"
    )
    await shot(visitor, "widget-german-survey")
    no_errors(browsers)


async def test_a_declined_call_rings_the_next_agent_who_answers(
    gateway: Gateway, browsers: Browsers, shot: Shot
) -> None:
    # Anna on node B, Carla on node A: the ring and the signals cross nodes either way.
    agents = {
        "Anna": await browsers.open("anna", gateway.agent_url("anna")),
        "Carla": await browsers.open("carla", gateway.agent_url("carla", gateway.a)),
    }
    for page in agents.values():
        await agent_signed_in(page)

    visitor = await browsers.open("visitor", gateway.demo_url())
    button = visitor.get_by_test_id("membrane-button")
    await expect(button).to_have_text("Talk to us now", timeout=WAIT_MS)
    await visitor.wait_for_function(  # both agents counted
        "() => (Membrane.state().availability || {}).agents_available === 2", timeout=WAIT_MS
    )
    await button.click()
    await widget_says(visitor, re.compile(r"^Ringing (Anna|Carla) in "))
    first_name = (await membrane_state(visitor))["call"]["agent"]["name"]
    second_name = "Carla" if first_name == "Anna" else "Anna"
    first, second = agents[first_name], agents[second_name]

    await expect(first.get_by_test_id("agent-ring")).to_be_visible(timeout=WAIT_MS)
    await expect(second.get_by_test_id("agent-ring")).to_have_count(0)  # one at a time
    await first.get_by_test_id("agent-decline").click()
    await expect(first.get_by_test_id("agent-ring")).to_have_count(0)

    await expect(second.get_by_test_id("agent-ring")).to_be_visible(timeout=WAIT_MS)
    await widget_says(visitor, re.compile(rf"^Ringing {second_name} in "))
    await shot(second, "agent-ringing-after-decline")
    await second.get_by_test_id("agent-accept").click()

    await widget_says(visitor, f"Connected with {second_name}")
    await expect(second.get_by_test_id("agent-call-state")).to_have_text("connected")
    await audio_flows(visitor, WIDGET_PC)
    await audio_flows(second, AGENT_PC)
    await shot(visitor, "widget-connected")
    await shot(second, "agent-in-call")
    # The agent who declined has no call and is still available.
    await expect(first.locator("#call")).to_be_hidden()
    await agent_signed_in(first, "available")
    assert await first.evaluate("() => MembraneAgent.pc") is None
    events = [e["event"] for e in (await membrane_state(visitor))["call"]["timeline"]]
    assert events == ["requested", "ringing", "declined", "ringing", "connected"], events

    # This time the agent hangs up.
    await second.get_by_test_id("agent-hangup").click()
    await expect(second.get_by_test_id("agent-call-state")).to_have_text("completed")
    await widget_says(visitor, "Call ended")
    await expect(visitor.get_by_test_id("membrane-panel")).to_contain_text("agent_hung_up")
    assert await pc_state(visitor, WIDGET_PC) == "closed"
    await agent_signed_in(second, "available")
    await shot(visitor, "widget-ended")
    no_errors(browsers)


async def test_nobody_free_offers_a_callback(
    gateway: Gateway, browsers: Browsers, shot: Shot
) -> None:
    anna = await browsers.open("anna", gateway.agent_url("anna"))
    await agent_signed_in(anna)
    await anna.get_by_test_id("agent-state-select").select_option("away")
    await agent_signed_in(anna, "away")

    visitor = await browsers.open("visitor", gateway.demo_url())
    button = visitor.get_by_test_id("membrane-button")
    # The online team is open round the clock, so the button offers a callback, not a call.
    await expect(button).to_contain_text("Call me back", timeout=WAIT_MS)
    avail = (await membrane_state(visitor))["availability"]
    assert avail["open"] and not avail["available"] and avail["agents_available"] == 0
    await shot(visitor, "widget-idle-callback")

    # A browser call started from the page's JavaScript finds nobody: a callback offer.
    await visitor.evaluate("() => { Membrane.call(); }")
    await widget_says(visitor, "Nobody could answer right now")
    call = (await membrane_state(visitor))["call"]
    assert call["state"] == "failed" and call["reason"] == "no_agents_online", call
    assert call["callback_offer"] is not None, call
    panel = visitor.get_by_test_id("membrane-panel")
    offer = panel.get_by_role("button", name="Call me back")
    await expect(offer).to_be_visible()
    await expect(visitor.get_by_test_id("membrane-hangup")).to_be_hidden()
    await shot(visitor, "widget-callback-offer")

    await offer.click()
    form = visitor.get_by_test_id("membrane-callback-form")
    await expect(form).to_be_visible()
    await expect(visitor.get_by_test_id("membrane-phone")).to_be_focused()
    await expect(visitor.get_by_test_id("membrane-submit")).to_be_visible()
    await expect(panel.get_by_role("heading")).to_have_text("We'll call you back")
    await expect(panel.get_by_role("radio", name="Call me now")).to_be_checked()
    # The online team is open round the clock: there are slots to book too.
    await expect(panel.get_by_role("radio", name="At a time")).to_be_visible()
    await shot(visitor, "widget-callback-form")

    # The floating button leads to the same form.
    await visitor.keyboard.press("Escape")
    await expect(panel).to_be_hidden()
    await button.click()
    await expect(form).to_be_visible()
    await expect(anna.get_by_test_id("agent-ring")).to_have_count(0)  # nobody was rung
    no_errors(browsers)


async def test_a_callback_whose_answer_was_lost_is_shown_when_the_visitor_asks_again(
    gateway: Gateway, browsers: Browsers
) -> None:
    """The gateway stored the request, but its answer never reached the page (the connection
    dropped): the widget says it could not get through. The visitor presses again and sees
    the callback already booked, not a refusal, and nothing is booked twice."""
    anna = await browsers.open("anna", gateway.agent_url("anna"))
    await agent_signed_in(anna)
    await anna.get_by_test_id("agent-state-select").select_option("away")
    await agent_signed_in(anna, "away")

    visitor = await browsers.open("visitor", gateway.demo_url())
    answers: list[tuple[int, dict[str, Any]]] = []

    async def lose_the_first_answer(route: Route) -> None:
        if route.request.method != "POST":
            await route.continue_()
            return
        response = await route.fetch()  # the gateway gets the request either way
        answers.append((response.status, await response.json()))
        if len(answers) == 1:
            await route.abort("connectionreset")
        else:
            await route.fulfill(response=response)

    await visitor.route("**/v1/sites/acme/callbacks", lose_the_first_answer)
    button = visitor.get_by_test_id("membrane-button")
    await expect(button).to_contain_text("Call me back", timeout=WAIT_MS)
    await button.click()
    await visitor.get_by_test_id("membrane-country").select_option("IE")
    await visitor.get_by_test_id("membrane-phone").fill("086 111 0001")
    submit = visitor.get_by_test_id("membrane-submit")
    await submit.click()
    error = visitor.locator("#membrane-phone-error")
    await expect(error).to_contain_text("We couldn't reach our phone system", timeout=WAIT_MS)
    ticket = visitor.get_by_test_id("membrane-ticket")
    await expect(ticket).to_be_hidden()

    await submit.click()
    await expect(ticket).to_be_visible(timeout=WAIT_MS)
    await expect(ticket).to_contain_text("We'll call you")
    (first_status, first), (again_status, again) = answers
    assert (first_status, again_status) == (201, 200), answers
    assert again["call_id"] == first["call_id"], answers
    booked = (await membrane_state(visitor))["callback"]
    assert booked["call_id"] == first["call_id"] and booked["state"] == "queued", booked
    stored = await gateway.a.app[keys.STORE].list_calls("acme")
    assert [r.call_id for r in stored if r.data.get("channel") == "callback"] == [first["call_id"]]
    no_errors(browsers)


async def test_a_visitor_books_a_callback_and_anna_calls_them_back(
    gateway: Gateway, browsers: Browsers, shot: Shot
) -> None:
    """Nobody free: the visitor leaves their number in the widget; Anna comes back, accepts the
    callback in the agent app, the gateway dials the visitor's phone and bridges it to Anna's
    own phone; the widget's ticket follows every step."""
    sim = gateway.phones
    sim.phone("+353861110001", answer_after=1)
    sim.phone("+353871234567", answer_after=1)  # Anna's mobile, from the demo config
    anna = await browsers.open("anna", gateway.agent_url("anna"))
    await agent_signed_in(anna)
    await anna.get_by_test_id("agent-state-select").select_option("away")
    await agent_signed_in(anna, "away")

    visitor = await browsers.open("visitor", gateway.demo_url())
    button = visitor.get_by_test_id("membrane-button")
    await expect(button).to_contain_text("Call me back", timeout=WAIT_MS)
    await button.click()
    panel = visitor.get_by_test_id("membrane-panel")
    await visitor.get_by_test_id("membrane-country").select_option("IE")
    await visitor.get_by_test_id("membrane-phone").fill("086 111 0001")
    await visitor.get_by_test_id("membrane-submit").click()
    ticket = visitor.get_by_test_id("membrane-ticket")
    await expect(ticket).to_be_visible(timeout=WAIT_MS)
    await expect(ticket).to_contain_text("We'll call you")
    booked = (await membrane_state(visitor))["callback"]
    assert booked["state"] == "queued" and booked["position"] == 1, booked
    await shot(visitor, "widget-callback-ticket-queued")

    await anna.get_by_test_id("agent-state-select").select_option("available")
    ring = anna.get_by_test_id("agent-ring")
    await expect(ring).to_be_visible(timeout=WAIT_MS)
    await expect(ring).to_contain_text("Callback request")
    await expect(ring).to_contain_text("+353861110001")
    await shot(anna, "agent-callback-ring")
    await anna.get_by_test_id("agent-accept").click()
    await expect(anna.get_by_test_id("agent-call-state")).to_have_text(
        re.compile("dialing|connected"), timeout=WAIT_MS
    )
    leg = await sim.wait_for_call(to="+353861110001", status="in-progress", timeout=10)
    await sim.wait_for_call(to="+353871234567", status="in-progress", timeout=10)
    await expect(anna.get_by_test_id("agent-call-state")).to_have_text("connected")
    await expect(ticket).to_contain_text("You're on the phone with Anna", timeout=WAIT_MS)
    await asyncio.gather(shot(visitor, "widget-callback-connected"), shot(anna, "agent-callback"))

    sim.hangup(leg.sid)
    await expect(ticket).to_contain_text("Done. Thanks for talking to us!", timeout=WAIT_MS)
    await expect(anna.get_by_test_id("agent-call-state")).to_have_text("completed")
    await agent_signed_in(anna, "available")
    await expect(panel.get_by_role("button", name="Cancel my callback")).to_be_hidden()
    await shot(visitor, "widget-callback-done")
    assert [c.to for c in sim.calls] == ["+353861110001", "+353871234567"]
    no_errors(browsers)
