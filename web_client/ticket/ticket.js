/* The customer's ticket page: /t/{call_id}#{status token}.
 *
 * Where the request stands in plain words, live (Server-Sent Events), with its timeline and
 * buttons to move or cancel it. The status token is in the URL's fragment, which the browser
 * never sends to a server; the page sends it only to the gateway's ticket API.
 *
 * Every sentence is a gettext("...") message id looked up in the gateway's catalogue for the
 * visitor's language (GET /v1/messages/{language}, from gateway/locale/*.po, the same files
 * as the phone prompts); dates and relative times are the browser's Intl. Sentences are
 * whole, with {placeholders}, never put together from pieces.
 */
(function () {
  "use strict";

  const callId = decodeURIComponent(location.pathname.split("/").filter(Boolean)[1] || "");
  const token = decodeURIComponent(location.hash.slice(1));
  const wanted = new URLSearchParams(location.search).get("lang")
    || (navigator.languages && navigator.languages[0]) || navigator.language || "en";
  const $ = (id) => document.getElementById(id);

  let catalogue = {};
  let language = "en";
  let call = null; // the visitor's view of the call, as last shown
  let shownVersion = -1;
  let etaAt = null; // performance.now() when eta_s runs out
  let stream = null;

  function gettext(id, params) {
    const text = catalogue[id] || id;
    return params ? text.replace(/\{(\w+)\}/g, (m, k) => (k in params ? String(params[k]) : m)) : text;
  }

  async function loadCatalogue() {
    try {
      const r = await fetch(`/v1/messages/${encodeURIComponent(wanted)}`);
      if (r.ok) {
        const body = await r.json();
        catalogue = body.messages || {};
        language = body.language || "en";
      }
    } catch { /* English, then */ }
    document.documentElement.lang = language;
    document.title = gettext("Your request");
    $("title").textContent = gettext("Your request");
    $("move").textContent = gettext("Pick another time");
    $("cancel").textContent = gettext("Cancel my callback");
    $("keep").textContent = gettext("Keep my place");
    $("follow-up-link").textContent = gettext("Follow it");
    $("late-move").textContent = gettext("Pick another time");
    document.querySelector("label[for=slots]").textContent = gettext("When should we call you?");
    $("move-confirm").textContent = gettext("Call me then");
    $("move-back").textContent = gettext("Keep my time");
    document.querySelector("#confirm-cancel p").textContent = gettext("Cancel this callback? We won't call you.");
    $("cancel-yes").textContent = gettext("Yes, cancel it");
    $("cancel-no").textContent = gettext("Keep it");
    $("timeline-title").textContent = gettext("What happened so far");
    $("share-title").textContent = gettext("Share");
    $("share-hint").textContent = gettext("Anyone with the link sees where this stands, and nothing else.");
    $("share-on").textContent = gettext("Share a read-only link");
    $("share-url-label").textContent = gettext("The link");
    $("share-copy").textContent = gettext("Copy");
    $("share-off").textContent = gettext("Stop sharing");
    $("privacy-title").textContent = gettext("Your data");
    $("erase").textContent = gettext("Erase my personal data");
    $("erase-question").textContent = gettext("Erase your number and the rest of your personal data from this request? A callback still waiting is canceled.");
    $("erase-yes").textContent = gettext("Yes, erase it");
    $("erase-no").textContent = gettext("Keep it");
  }

  // ---- words ------------------------------------------------------------------------------

  function clock(iso) {
    const at = new Date(iso);
    const sameDay = at.toDateString() === new Date().toDateString();
    const opts = sameDay
      ? { hour: "2-digit", minute: "2-digit" }
      : { weekday: "long", day: "numeric", month: "long", hour: "2-digit", minute: "2-digit" };
    return new Intl.DateTimeFormat(language, opts).format(at);
  }

  function relative(seconds) {
    const rtf = new Intl.RelativeTimeFormat(language, { numeric: "auto" });
    const minutes = Math.max(1, Math.round(seconds / 60));
    if (minutes < 90) return rtf.format(minutes, "minute");
    const hours = Math.round(minutes / 60);
    if (hours < 36) return rtf.format(hours, "hour");
    return rtf.format(Math.round(hours / 24), "day");
  }

  function secondsLeft() {
    return etaAt === null ? null : Math.max(0, (etaAt - performance.now()) / 1000);
  }

  function headline(c) {
    const a = c.agent;
    // A shared link knows the agent's first name only.
    const who = a ? { agent: a.name || a.first_name, branch: a.branch || "" } : null;
    const left = secondsLeft();
    switch (c.state) {
      case "scheduled": {
        // Told it runs late, the customer was given a new time: that is the one to show.
        const at = c.promised_at && c.scheduled_at && c.promised_at > c.scheduled_at ? c.promised_at : c.scheduled_at;
        const until = at === c.scheduled_at ? left || 0 : Math.max(0, (Date.parse(at) - Date.now()) / 1000);
        const when = { time: at ? clock(at) : "", relative: relative(until) };
        return who && who.branch
          ? gettext("{agent} from our {branch} branch will call you at {time}, {relative}.", { ...who, ...when })
          : gettext("We'll call you at {time}, {relative}.", when);
      }
      case "queued":
        return left !== null && left > 0
          ? gettext("We'll call you {relative}.", { relative: relative(left) })
          : gettext("We'll call you as soon as someone is free.");
      case "ringing":
        if (who && who.branch) return gettext("{agent} from our {branch} branch will call you in a moment.", who);
        return who ? gettext("{agent} will call you in a moment.", who) : gettext("We're calling you now.");
      case "dialing":
        return who ? gettext("{agent} is calling you now.", who) : gettext("We're calling you now.");
      case "connected":
        return who ? gettext("You're on the phone with {agent}.", who) : gettext("You're on the phone with us.");
      case "completed":
        if (who && who.branch) return gettext("You spoke with {agent} from our {branch} branch.", who);
        return who ? gettext("You spoke with {agent}.", who) : gettext("Done. Thanks for talking to us!");
      case "failed":
        return gettext("We couldn't reach you.");
      case "canceled":
        return gettext("Your callback was canceled.");
      default:
        return "";
    }
  }

  function detail(c) {
    if (c.state === "queued" && c.position) return gettext("You're number {position} in line.", { position: c.position });
    return "";
  }

  function happened(e) {
    switch (e.event) {
      case "requested":
        return call && call.channel === "webrtc" ? gettext("You called us.") : gettext("You asked us to call you back.");
      case "moved": return gettext("You picked a new time.");
      case "late": return gettext("We told you we're running late, with a new time.");
      case "kept": return gettext("You kept your place.");
      case "follow_up": return gettext("We promised to call you back.");
      case "waiting_for_agent": return gettext("The person who promised to call wasn't free yet; we waited for them.");
      case "colleague": return gettext("A colleague took over, with the notes from your last call.");
      case "reminder": return gettext("We let you know you're still on our list.");
      case "texted": return gettext("We texted you a link to this page.");
      case "erased": return gettext("You erased your personal data.");
      case "queued": return gettext("Finding someone to call you.");
      case "closed": return gettext("We were closed; we'll call when we open.");
      case "quiet_hours": return gettext("It was night at your number; we'll call in the morning.");
      case "ringing": return gettext("We asked someone to call you.");
      case "declined":
      case "no_answer": return gettext("They couldn't take it; we asked someone else.");
      case "dialing": return gettext("We called you.");
      case "phone_ringing": return gettext("Your phone rang.");
      case "connected": return gettext("You were connected.");
      case "retry": return gettext("We couldn't reach you; we'll try again.");
      case "failed": return gettext("We couldn't reach you; we won't try again.");
      case "completed": return gettext("The call ended.");
      case "canceled": return gettext("You canceled.");
      default: return e.detail || e.event;
    }
  }

  // ---- showing it -------------------------------------------------------------------------

  function render() {
    const main = document.querySelector("main");
    main.removeAttribute("aria-busy");
    if (!call) return;
    const text = headline(call);
    if ($("status").textContent !== text) $("status").textContent = text;
    $("detail").textContent = detail(call);
    const items = (call.timeline || []).map((e) => {
      const li = document.createElement("li");
      const time = document.createElement("time");
      time.dateTime = e.at;
      time.textContent = new Intl.DateTimeFormat(language, { hour: "2-digit", minute: "2-digit" }).format(new Date(e.at));
      const what = document.createElement("span");
      what.textContent = happened(e);
      li.append(time, what);
      return li;
    });
    $("timeline").replaceChildren(...items);
    const waiting = !call.shared && call.channel === "callback"
      && (call.state === "scheduled" || call.state === "queued");
    $("actions").hidden = !waiting;
    $("late").hidden = !(waiting && call.late && call.promised_at);
    $("move").hidden = !$("late").hidden; // the notice offers it, next to keeping the place
    const f = call.follow_up;
    $("follow-up").hidden = !f || !!call.shared;
    if (f && !call.shared) {
      $("follow-up-text").textContent = gettext("{agent} will call you back: {time}.", { agent: f.agent.name, time: clock(f.at) });
      // The same token opens the follow-up's own page.
      $("follow-up-link").href = `/t/${encodeURIComponent(f.call_id)}${location.search}#${token}`;
    }
    if (!$("late").hidden) {
      const seconds = Math.max(0, (Date.parse(call.promised_at) - Date.now()) / 1000);
      $("late-text").textContent = gettext(
        "Sorry, we're running late. We now expect to call you at {time}, {relative}.",
        { time: clock(call.promised_at), relative: relative(seconds) });
    }
    $("share").hidden = !!call.shared || isFinal(call);
    // The link itself is shown once, when made: only its hash is kept. After a reload the
    // customer may stop sharing, or make a new link (the old one then stops working).
    if (!call.sharing) $("share-link").hidden = true;
    $("share-on").hidden = !$("share-link").hidden;
    $("share-copy").hidden = $("share-link").hidden;
    $("share-off").hidden = !call.sharing;
    $("shared-note").hidden = !call.shared;
    const live = ["ringing", "dialing", "connected"].includes(call.state);
    const erased = (call.timeline || []).some((e) => e.event === "erased");
    $("privacy").hidden = !!call.shared || live || erased;
    $("shared-note").textContent = call.shared ? gettext("Shared with you: a read-only view.") : "";
    if (!waiting) {
      $("move-form").hidden = true;
      $("confirm-cancel").hidden = true;
    }
  }

  function show(c, version) {
    if (version !== undefined) {
      if (version < shownVersion) return; // an older read, overtaken
      shownVersion = version;
    }
    call = c;
    etaAt = typeof c.eta_s === "number" ? performance.now() + c.eta_s * 1000 : null;
    render();
    if (isFinal(c) && stream) {
      stream.close();
      stream = null;
    }
  }

  const isFinal = (c) => ["completed", "failed", "canceled"].includes(c.state);

  function fail(text) {
    $("error").textContent = text;
    $("error").hidden = !text;
  }

  // ---- the gateway --------------------------------------------------------------------------

  const ticketUrl = (suffix = "") =>
    `/v1/calls/${encodeURIComponent(callId)}${suffix}?token=${encodeURIComponent(token)}`;

  async function api(method, url, body) {
    const r = await fetch(url, {
      method,
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
      cache: "no-store",
    });
    const answer = await r.json().catch(() => ({}));
    if (!r.ok) {
      const error = new Error((answer.error && answer.error.message) || `HTTP ${r.status}`);
      error.status = r.status;
      error.code = answer.error && answer.error.code;
      throw error;
    }
    return answer;
  }

  function follow() {
    stream = new EventSource(ticketUrl("/stream"));
    stream.addEventListener("unshared", () => {
      stream.close();
      stream = null;
      call = null;
      $("status").textContent = "";
      $("timeline").replaceChildren();
      $("shared-note").hidden = true;
      fail(gettext("This link is no longer shared."));
    });
    stream.addEventListener("ticket", (event) => {
      fail("");
      const frame = JSON.parse(event.data);
      show(frame.call, frame.version);
    });
    stream.addEventListener("error", () => {
      if (stream && stream.readyState === EventSource.CLOSED) fail(gettext("We can't reach the server. Reload the page to try again."));
    });
  }

  async function openMove() {
    $("confirm-cancel").hidden = true;
    const select = $("slots");
    select.replaceChildren();
    try {
      const { slots } = await api("GET", `/v1/sites/${encodeURIComponent(call.site)}/callback-slots`);
      for (const at of slots) {
        const option = document.createElement("option");
        option.value = at;
        option.textContent = new Intl.DateTimeFormat(language, {
          weekday: "long", day: "numeric", month: "long", hour: "2-digit", minute: "2-digit",
        }).format(new Date(at));
        select.append(option);
      }
      if (!slots.length) {
        fail(gettext("No other times are free in the next days."));
        return;
      }
    } catch {
      fail(gettext("Something went wrong. Please try again."));
      return;
    }
    $("move-form").hidden = false;
    select.focus();
  }

  async function move(event) {
    event.preventDefault();
    const button = $("move-confirm");
    button.disabled = true;
    try {
      show(await api("POST", ticketUrl("/move"), { at: $("slots").value }));
      $("move-form").hidden = true;
      fail("");
      $("move").focus();
    } catch (e) {
      fail(e.status === 422 ? gettext("That time is no longer free. Please pick another.")
        : e.status === 409 ? gettext("It's too late to change this now.")
          : gettext("Something went wrong. Please try again."));
    } finally {
      button.disabled = false;
    }
  }

  async function cancel() {
    const button = $("cancel-yes");
    button.disabled = true;
    try {
      show(await api("DELETE", ticketUrl()));
      $("confirm-cancel").hidden = true;
      fail("");
    } catch {
      fail(gettext("Something went wrong. Please try again."));
    } finally {
      button.disabled = false;
    }
  }

  async function keep() {
    await change($("keep"), () => api("POST", ticketUrl("/keep")));
  }

  async function share() {
    try {
      const answer = await api("POST", ticketUrl("/share"));
      $("share-url").value = answer.share_url;
      $("share-link").hidden = false;
      show(answer.call);
      $("share-url").focus();
      $("share-url").select();
    } catch {
      fail(gettext("Something went wrong. Please try again."));
    }
  }

  async function unshare() {
    try {
      show(await api("DELETE", ticketUrl("/share")));
      $("share-link").hidden = true;
      render();
      $("share-on").focus();
    } catch {
      fail(gettext("Something went wrong. Please try again."));
    }
  }

  async function erase() {
    await change($("erase-yes"), () => api("DELETE", ticketUrl("/personal-data")), () => {
      $("confirm-erase").hidden = true;
    });
  }

  /** A change to the ticket from ``button``: shown when it is done, the status then read out;
   * a change that came too late (409) says so. */
  async function change(button, request, done = () => {}) {
    button.disabled = true;
    try {
      show(await request());
      done();
      fail("");
      $("status").focus();
    } catch (e) {
      fail(e.status === 409 ? gettext("It's too late to change this now.")
        : gettext("Something went wrong. Please try again."));
    } finally {
      button.disabled = false;
    }
  }

  async function start() {
    $("erase").addEventListener("click", () => { $("confirm-erase").hidden = false; $("erase-no").focus(); });
    $("erase-no").addEventListener("click", () => { $("confirm-erase").hidden = true; $("erase").focus(); });
    $("erase-yes").addEventListener("click", erase);
    $("share-on").addEventListener("click", share);
    $("share-off").addEventListener("click", unshare);
    $("share-copy").addEventListener("click", () => {
      $("share-url").select();
      if (navigator.clipboard) navigator.clipboard.writeText($("share-url").value).catch(() => {});
    });
    $("move").addEventListener("click", openMove);
    $("keep").addEventListener("click", keep);
    $("late-move").addEventListener("click", openMove);
    $("move-form").addEventListener("submit", move);
    $("move-back").addEventListener("click", () => { $("move-form").hidden = true; $("move").focus(); });
    $("cancel").addEventListener("click", () => {
      $("move-form").hidden = true;
      $("confirm-cancel").hidden = false;
      $("cancel-no").focus();
    });
    $("cancel-no").addEventListener("click", () => { $("confirm-cancel").hidden = true; $("cancel").focus(); });
    $("cancel-yes").addEventListener("click", cancel);
    await loadCatalogue();
    if (!callId || !token) {
      fail(gettext("This link isn't valid. Check that you copied all of it."));
      render();
      return;
    }
    try {
      show(await api("GET", ticketUrl()));
    } catch (e) {
      fail(e.status >= 400 && e.status < 500
        ? gettext("This link isn't valid. Check that you copied all of it.")
        : gettext("We can't reach the server. Reload the page to try again."));
      render();
      return;
    }
    if (!isFinal(call)) follow();
    setInterval(render, 15000); // the "in 12 minutes" counts down
  }

  window.MembraneTicket = { state: () => ({ call, version: shownVersion, language }) };
  start();
})();
