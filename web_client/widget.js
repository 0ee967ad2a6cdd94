/*! Membrane click-to-call widget | Apache-2.0
 * Embed: <script src="https://gateway.example/widget.js" data-site="acme" async></script>
 * Options on the tag: data-language, data-branch, data-position (bottom-right | bottom-left |
 * top-right | top-left), data-button="none" (API and panels only).
 * API: window.Membrane.{onAvailabilityChange, call, callback, hangup, state}. See web_client/README.md.
 */
(() => {
  "use strict";
  const tag =
    document.currentScript || document.querySelector('script[src*="widget.js"][data-site]');
  if (!tag || !tag.dataset.site || (window.Membrane && window.Membrane.version)) return;

  // ---- configuration ------------------------------------------------------------------------
  const cfg = tag.dataset;
  const site = cfg.site;
  const gw = new URL(tag.src, location.href).origin;
  const siteUrl = `${gw}/v1/sites/${encodeURIComponent(site)}`;
  const query = new URLSearchParams();
  if (cfg.language) query.set("language", cfg.language);
  if (cfg.branch) query.set("branch", cfg.branch);
  const qs = query.toString() ? `?${query}` : "";
  // Routing prefers someone who speaks the visitor's language (a preference, not a filter).
  const browserLanguage = () => {
    const tag = (navigator.languages && navigator.languages[0]) || navigator.language || "";
    if (!/^[a-z]{2,3}(-[a-z0-9]{2,8})?$/i.test(tag)) return undefined;
    return tag.replace(/^[a-z]+/i, (primary) => primary.toLowerCase());
  };
  const callLanguage = () => cfg.language || browserLanguage();
  // Every sentence is a gettext("...") message id, looked up in the gateway's catalogue for
  // the visitor's language (GET /v1/messages/{language}: the same catalogues as the ticket
  // page, the agent app and the phone prompts); English until it has loaded.
  let catalogue = {};
  let uiLanguage = "en";
  const N_ = (id) => id;
  function gettext(id, params) {
    const text = catalogue[id] || id;
    return params ? text.replace(/\{(\w+)\}/g, (m, k) => (k in params ? String(params[k]) : m)) : text;
  }
  // The words built into the panels before the catalogue came: put in its language after.
  const fixed = [];
  const T = (id) => {
    const node = document.createTextNode(id);
    fixed.push([node, id]);
    return node;
  };
  async function loadCatalogue() {
    const wanted = callLanguage() || "en";
    try {
      // The button waits for its words, but not for long: English after 3 s.
      const r = await fetch(`${gw}/v1/messages/${encodeURIComponent(wanted)}`,
        { signal: AbortSignal.timeout(3000) });
      if (r.ok) {
        const body = await r.json();
        catalogue = body.messages || {};
        uiLanguage = body.language || "en";
      }
    } catch { /* English, then */ }
    for (const [node, id] of fixed) node.data = gettext(id);
    for (const [el, name, id] of fixedAttributes) el.setAttribute(name, gettext(id));
  }
  const fixedAttributes = [];
  // A callback's timeline, in the words of its ticket page (web_client/ticket/ticket.js).
  const HAPPENED = {
    requested: N_("You asked us to call you back."),
    moved: N_("You picked a new time."),
    texted: N_("We texted you a link to this page."),
    late: N_("We told you we're running late, with a new time."),
    kept: N_("You kept your place."),
    reminder: N_("We let you know you're still on our list."),
    queued: N_("Finding someone to call you."),
    closed: N_("We were closed; we'll call when we open."),
    quiet_hours: N_("It was night at your number; we'll call in the morning."),
    ringing: N_("We asked someone to call you."),
    declined: N_("They couldn't take it; we asked someone else."),
    no_answer: N_("They couldn't take it; we asked someone else."),
    dialing: N_("We called you."),
    phone_ringing: N_("Your phone rang."),
    connected: N_("You were connected."),
    retry: N_("We couldn't reach you; we'll try again."),
    failed: N_("We couldn't reach you; we won't try again."),
    completed: N_("The call ended."),
    canceled: N_("You canceled."),
  };
  const ICE_RESTARTS = 3; // in a row; then the visitor is told
  const FINAL = ["completed", "failed", "canceled"];
  const isFinal = (c) => !!c && FINAL.includes(c.state);
  // {visitor_id, visitor_secret} in one value, so two tabs cannot mix one's id with another's
  // secret; per site, as a secret proves its id on one site only. Share it with no one.
  const VISITOR_KEY = `membrane.visitor.${site}`;
  const TICKET_KEY = "membrane.ticket";
  const COUNTRIES = [
    ["IE", "+353"], ["GB", "+44"], ["US", "+1"], ["DE", "+49"], ["FR", "+33"],
    ["ES", "+34"], ["NL", "+31"], ["IT", "+39"], ["CA", "+1"],
  ];
  const MESSAGES = {
    network: N_("We couldn't reach our phone system. Check your connection and try again."),
    rate_limited: N_("Too many requests. Please wait a minute and try again."),
    invalid_token: N_("Your session expired. Please try again."),
    invalid_phone: N_("That doesn't look like a phone number. Check it and try again."),
    number_not_allowed: N_("Sorry, we can't call that number. Try a number in a country we serve."),
    country_not_allowed: N_("Sorry, we can't call numbers in that country. Try another number."),
    number_type_not_allowed: N_("Sorry, we can't call that kind of number. Try a mobile or landline."),
    number_rate_limited: N_("We've called that number a lot recently. Please try again later."),
    too_many_numbers: N_("You've asked us to call several numbers. Please try again later."),
    ip_rate_limited: N_("Too many callback requests. Please try again later."),
    site_rate_limited: N_("We're very busy right now. Please try again later."),
    overloaded: N_("We're very busy right now. Please try again in a moment."),
    callback_in_progress: N_("You already have a callback booked."),
    number_has_callback: N_("That number already has a callback booked."),
    quiet_hours: N_("That's night time where your phone is. Please pick another time."),
    slot_unavailable: N_("We can't call at that time. Please pick another one."),
    spend_cap_reached: N_("We can't take more callbacks today. Please try again tomorrow."),
    callbacks_unavailable: N_("Callbacks aren't available right now."),
    not_found: N_("This request no longer exists."),
    no_microphone: N_("We need your microphone to talk in the browser. Allow it, or let us call you back."),
    unsupported: N_("Your browser can't make calls. We can call you back instead."),
  };
  const friendly = (e) => {
    const known = MESSAGES[e && e.code];
    if (known) return gettext(known);
    return (e && e.message) || gettext("Something went wrong. Please try again.");
  };
  /** The {code, message} of a refused socket.io connection (err.data, or a server that sent
   * only a message); null for a network failure, which socket.io retries by itself. */
  const refusal = (e) => {
    if (e && e.data && e.data.code) return e.data;
    const m = /["']code["']: ["'](\w+)["']/.exec((e && e.message) || "");
    return m ? { code: m[1] } : null;
  };

  // ---- small helpers ------------------------------------------------------------------------
  const raw = {
    get: (k) => { try { return localStorage.getItem(k); } catch { return null; } },
    set: (k, v) => {
      try { v == null ? localStorage.removeItem(k) : localStorage.setItem(k, v); } catch { /* private mode */ }
    },
  };
  const minutes = (s) => Math.max(1, Math.round(s / 60));
  const hhmm = (d) => d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  /** "14:30" today, "Tue 14:30" on another day, in the visitor's own time zone. */
  const when = (iso) => {
    const d = new Date(iso);
    if (isNaN(d)) return "";
    const today = d.toDateString() === new Date().toDateString();
    return today ? hhmm(d) : `${d.toLocaleDateString([], { weekday: "short" })} ${hhmm(d)}`;
  };
  /** "We open at 09:00" today, "We open Mon at 09:00" on another day. */
  const opens = (iso) => {
    const d = new Date(iso);
    if (isNaN(d)) return gettext("Schedule a call");
    if (d.toDateString() === new Date().toDateString()) return gettext("We open at {time}", { time: hhmm(d) });
    return gettext("We open {day} at {time}", { day: d.toLocaleDateString([], { weekday: "short" }), time: hhmm(d) });
  };
  const clock = (ms) => {
    const s = Math.max(0, Math.floor(ms / 1000));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  };

  function h(name, props, ...kids) {
    const el = document.createElement(name);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "text") el.textContent = v;
      else el.setAttribute(k === "testid" ? "data-testid" : k, v === true ? "" : v);
    }
    el.append(...kids.filter((x) => x != null));
    return el;
  }

  async function api(method, url, body, token) {
    const headers = {};
    if (body) headers["Content-Type"] = "application/json";
    if (token) headers.Authorization = `Bearer ${token}`;
    let r;
    try {
      r = await fetch(url, { method, headers, body: body ? JSON.stringify(body) : undefined });
    } catch {
      throw { code: "network", status: 0 };
    }
    let data = null;
    try { data = await r.json(); } catch { /* empty body */ }
    if (!r.ok) throw { status: r.status, ...((data && data.error) || { code: `http_${r.status}` }) };
    return data;
  }

  // ---- state --------------------------------------------------------------------------------
  let avail = null; // latest availability object
  const listeners = new Set();
  let session = null; // {token, visitor_id, visitor_secret, expires_at, ice_servers}
  let sock = null; // socket.io socket on /visitor, only while a browser call is live
  let pc = null;
  let mic = null; // local MediaStream
  let call = null; // the live browser Call
  let calling = 0; // generation of the browser call: bumped to abandon one still being set up
  let busy = false; // a browser call is being set up or is live
  let connectedAt = 0;
  let signals = Promise.resolve(); // incoming rtc:signal, applied in order
  let ticket = null; // {call_id, status_token, call}
  let pollTimer = 0;
  let slots = null; // callback slots (ISO strings), null = not loaded / unavailable
  let prevFocus = null;

  async function getSession() {
    if (session && Date.parse(session.expires_at) - Date.now() > 30000) return session;
    let known = {};
    try { known = JSON.parse(raw.get(VISITOR_KEY)) || {}; } catch { /* none yet */ }
    const body = { visitor_id: known.visitor_id, visitor_secret: known.visitor_secret };
    for (let tries = 1; ; tries++) {
      try {
        session = await api("POST", `${siteUrl}/sessions`, body);
        break;
      } catch (e) {
        // A node shutting down answers 503 draining (unreadable across origins: a network
        // error here); the load balancer sends the retry to another node.
        if (tries >= 3 || !(e.code === "draining" || e.code === "network")) throw e;
        await new Promise((resolve) => setTimeout(resolve, 1000 * tries));
      }
    }
    raw.set(VISITOR_KEY, JSON.stringify({
      visitor_id: session.visitor_id, visitor_secret: session.visitor_secret,
    }));
    raw.set("membrane.visitor_id", null); // the bare id of older versions proves nothing
    return session;
  }

  // ---- DOM (Shadow DOM, so the host page's CSS cannot reach in) ------------------------------
  const CSS = `
:host{all:initial}
*{box-sizing:border-box}
.root{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f1f1f}
button,input,select{font:inherit;color:inherit}
[hidden]{display:none!important}
:focus-visible{outline:3px solid #174ea6;outline-offset:2px;box-shadow:0 0 0 2px #fff}
.fab,.panel{position:fixed;z-index:2147483000;right:20px;bottom:20px}
.pos-left .fab,.pos-left .panel{right:auto;left:20px}
.pos-top .fab{bottom:auto;top:20px}
.fab{display:flex;align-items:center;gap:8px;padding:12px 20px;border:0;border-radius:999px;
 background:#0b57d0;color:#fff;font-weight:600;cursor:pointer;box-shadow:0 4px 16px rgba(0,0,0,.28)}
.fab:hover{background:#0842a0}
.dot{width:10px;height:10px;border-radius:50%;background:#34c759;box-shadow:0 0 0 2px #fff}
.sub{font-weight:400}
.panel{bottom:84px;width:min(360px,calc(100vw - 24px));max-height:calc(100vh - 108px);overflow:auto;
 background:#fff;border-radius:14px;padding:16px 18px 18px;box-shadow:0 10px 40px rgba(0,0,0,.32)}
.pos-top .panel{bottom:auto;top:84px}
.nobutton .panel{bottom:20px}
.pos-top.nobutton .panel{top:20px}
@media (max-width:420px){.fab{right:12px;bottom:12px}.pos-left .fab{left:12px}.pos-top .fab{top:12px}
 .panel,.pos-left .panel{left:12px;right:12px;width:auto;bottom:72px}.pos-top .panel{top:72px}}
.head{display:flex;align-items:center;justify-content:space-between;gap:8px;margin-bottom:6px}
h2{margin:0;font-size:17px;font-weight:650;color:#1f1f1f}
h2:focus{outline:none}
.x{border:0;background:none;font-size:22px;line-height:1;width:36px;height:36px;border-radius:50%;cursor:pointer;color:#444}
.x:hover{background:#eef}
.status{margin:4px 0 2px;font-size:16px;font-weight:600}
.muted{margin:2px 0;color:#4a4a4a;font-size:14px}
.timer{font-variant-numeric:tabular-nums}
.row{display:flex;gap:8px;flex-wrap:wrap;margin-top:12px}
.btn{flex:1;min-height:42px;padding:8px 14px;border-radius:10px;border:1px solid #747775;background:#fff;cursor:pointer;font-weight:600}
.btn:hover{background:#f2f2f2}
.btn.primary{background:#0b57d0;border-color:#0b57d0;color:#fff}
.btn.primary:hover{background:#0842a0}
.btn.danger{background:#b3261e;border-color:#b3261e;color:#fff}
.btn.danger:hover{background:#8c1d18}
.btn[aria-pressed=true]{background:#1f1f1f;color:#fff}
.btn:disabled{opacity:.6;cursor:default}
label,legend{display:block;font-size:14px;font-weight:600;margin:12px 0 4px;padding:0}
fieldset{border:0;margin:0;padding:0}
.choice{display:flex;align-items:center;gap:6px;font-weight:400;margin:4px 0}
.phone{display:flex;gap:6px}
.phone select{flex:0 0 auto}
input[type=tel],select{min-height:42px;padding:6px 8px;border:1px solid #747775;border-radius:8px;background:#fff;width:100%}
.phone select{width:auto}
input[aria-invalid=true]{border-color:#b3261e}
.err{color:#b3261e;font-size:14px;margin:6px 0 0}
ol{margin:10px 0 0;padding:0 0 0 18px;color:#4a4a4a;font-size:13px}
li{margin:2px 0}
.scores{display:grid;grid-template-columns:repeat(11,1fr);gap:3px}
.scores .btn{min-height:36px;padding:4px 0;font-weight:500}
.scale{display:flex;justify-content:space-between;font-size:12px;color:#4a4a4a;margin-top:2px}
textarea{width:100%;min-height:56px;padding:6px 8px;border:1px solid #747775;border-radius:8px;font:inherit}
`;
  const pos = (cfg.position || "bottom-right").split("-");
  const showButton = cfg.button !== "none";
  const host = h("membrane-widget", {});
  const shadow = host.attachShadow({ mode: "open" });
  const root = h("div", {
    class: `root${pos[0] === "top" ? " pos-top" : ""}${pos[1] === "left" ? " pos-left" : ""}${
      showButton ? "" : " nobutton"}`,
  });
  // A constructed stylesheet, not a <style> element: a host page whose content security
  // policy forbids inline styles (as the gateway's own pages do) styles the widget all the same.
  if ("adoptedStyleSheets" in shadow && typeof CSSStyleSheet === "function" && "replaceSync" in CSSStyleSheet.prototype) {
    const sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    shadow.adoptedStyleSheets = [sheet];
    shadow.append(root);
  } else {
    shadow.append(h("style", { text: CSS }), root);
  }

  const btnDot = h("span", { class: "dot", "aria-hidden": "true", hidden: true });
  const btnLabel = h("span", {});
  const btnSub = h("span", { class: "sub" });
  const button = h("button", {
    type: "button", class: "fab", testid: "membrane-button", hidden: true,
    "aria-haspopup": "dialog", "aria-expanded": "false", onclick: primaryAction,
  }, btnDot, btnLabel, btnSub);

  const title = h("h2", { id: "membrane-title", tabindex: "-1" });
  const status = h("p", { class: "status", role: "status", "aria-live": "polite", testid: "membrane-status" });
  const closeX = h("button", { type: "button", class: "x", "aria-label": "Close", onclick: () => closePanel() }, "×");
  fixedAttributes.push([closeX, "aria-label", N_("Close")]);

  // the browser call
  const detail = h("p", { class: "muted" });
  const timer = h("p", { class: "muted timer", hidden: true });
  const audio = h("audio", { autoplay: true });
  const muteBtn = h("button", {
    type: "button", class: "btn", testid: "membrane-mute", "aria-pressed": "false", onclick: toggleMute,
  }, T("Mute"));
  const hangupBtn = h("button", { type: "button", class: "btn danger", testid: "membrane-hangup", onclick: () => hangup() }, T("Hang up"));
  const offerBtn = h("button", { type: "button", class: "btn primary", onclick: () => openForm("now") }, T("Call me back"));
  const doneBtn = h("button", { type: "button", class: "btn", onclick: () => closePanel() }, T("Close"));
  // After the call, its ticket page keeps who the visitor spoke to (and what they promised).
  const callTicketLink = h("a", {
    testid: "membrane-call-ticket-link", target: "_blank", rel: "noopener noreferrer", hidden: true,
  }, T("Your call's page"));
  let callTicketUrl = null;
  // The question after the call: one, once, on the ticket's token.
  let callToken = null;
  let score = null;
  const scoreBtns = Array.from({ length: 11 }, (_, n) => h("button", {
    type: "button", class: "btn", "aria-pressed": "false", testid: `membrane-score-${n}`,
    onclick: () => pickScore(n),
  }, String(n)));
  const comment = h("textarea", { id: "membrane-comment", maxlength: "1000", testid: "membrane-comment" });
  const surveySend = h("button", { type: "submit", class: "btn primary", testid: "membrane-survey-send", disabled: true }, T("Send"));
  const surveyThanks = h("p", { class: "status", role: "status", testid: "membrane-survey-thanks", hidden: true });
  const referral = h("a", { testid: "membrane-referral", target: "_blank", rel: "noopener", hidden: true }, T("Tell a friend about us"));
  const survey = h("form", { testid: "membrane-survey", hidden: true, novalidate: true, onsubmit: sendSurvey },
    h("fieldset", {},
      h("legend", { id: "membrane-survey-q" }, T("How likely are you to recommend us to a friend?")),
      h("div", { class: "scores", role: "group", "aria-labelledby": "membrane-survey-q" }, ...scoreBtns),
      h("div", { class: "scale", "aria-hidden": "true" }, h("span", {}, T("Not likely")), h("span", {}, T("Very likely")))),
    h("label", { for: "membrane-comment" }, T("Anything to add? (optional)")),
    comment,
    h("div", { class: "row" }, surveySend));
  const callView = h("div", {}, detail, timer, audio, h("p", {}, callTicketLink), survey, surveyThanks,
    h("p", {}, referral), h("div", { class: "row" }, muteBtn, hangupBtn, offerBtn, doneBtn));

  // the callback form
  const country = h("select", { id: "membrane-country", testid: "membrane-country", "aria-label": "Country code" },
    ...COUNTRIES.map(([c, code]) => h("option", { value: c }, `${c} ${code}`)));
  const phoneErr = h("p", { id: "membrane-phone-error", class: "err", role: "alert", hidden: true });
  const phone = h("input", {
    id: "membrane-phone", type: "tel", autocomplete: "tel", inputmode: "tel", required: true,
    testid: "membrane-phone", "aria-describedby": "membrane-phone-error", placeholder: "87 123 4567",
  });
  const nowLabel = h("span", {}, T("Call me now"));
  const whenNow = h("input", { type: "radio", name: "when", value: "now", checked: true });
  const whenAt = h("input", { type: "radio", name: "when", value: "at" });
  const slotSelect = h("select", { id: "membrane-slot" });
  const atChoice = h("label", { class: "choice", hidden: true }, whenAt, T("At a time"));
  const slotRow = h("div", { hidden: true }, h("label", { for: "membrane-slot" }, T("Time")), slotSelect);
  const submitBtn = h("button", { type: "submit", class: "btn primary", testid: "membrane-submit" }, T("Call me"));
  const form = h("form", { testid: "membrane-callback-form", novalidate: true, onsubmit: submitCallback },
    h("label", { for: "membrane-phone" }, T("Your phone number")),
    h("div", { class: "phone" }, country, phone),
    phoneErr,
    h("fieldset", {}, h("legend", {}, T("When should we call?")),
      h("label", { class: "choice" }, whenNow, nowLabel), atChoice),
    slotRow,
    h("div", { class: "row" }, submitBtn));
  form.addEventListener("change", () => { slotRow.hidden = !whenAt.checked; });

  // the callback ticket
  const eta = h("p", { class: "status", role: "status", "aria-live": "polite" });
  const ticketInfo = h("p", { class: "muted" });
  const timeline = h("ol", { "aria-label": "What happened so far" });
  fixedAttributes.push([timeline, "aria-label", N_("What happened so far")]);
  const cancelBtn = h("button", { type: "button", class: "btn", onclick: cancelCallback }, T("Cancel my callback"));
  // The ticket page follows the request after this page is closed, on any device.
  const ticketLink = h("a", { testid: "membrane-ticket-link", target: "_blank", rel: "noopener noreferrer" },
    T("Follow your request on its own page"));
  const ticketView = h("div", { testid: "membrane-ticket" }, eta, ticketInfo, h("p", {}, ticketLink), timeline,
    h("div", { class: "row" }, cancelBtn, h("button", { type: "button", class: "btn", onclick: () => closePanel() }, T("Close"))));

  const views = { call: callView, form, ticket: ticketView };
  const panel = h("div", {
    class: "panel", role: "dialog", "aria-modal": "false", "aria-labelledby": "membrane-title",
    testid: "membrane-panel", hidden: true,
  }, h("div", { class: "head" }, title, closeX), status, callView, form, ticketView);
  root.append(button, panel);
  root.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !panel.hidden) { e.stopPropagation(); closePanel(); }
  });

  // ---- panel --------------------------------------------------------------------------------
  let view = null;
  function openPanel(name, { focus = true } = {}) {
    if (panel.hidden) prevFocus = shadow.activeElement || document.activeElement;
    if (view !== name) say("");
    view = name;
    for (const [k, el] of Object.entries(views)) el.hidden = k !== name;
    title.textContent = gettext({ call: N_("Talk to us"), form: N_("We'll call you back"), ticket: N_("Your callback") }[name]);
    panel.hidden = false;
    button.setAttribute("aria-expanded", "true");
    if (focus) (name === "form" ? phone : title).focus();
  }
  function closePanel() {
    if (panel.hidden) return;
    panel.hidden = true;
    button.setAttribute("aria-expanded", "false");
    const back = prevFocus && prevFocus !== document.body && prevFocus.isConnected ? prevFocus : button;
    if (back && back.focus && !back.hidden) back.focus();
    renderButton();
  }
  const say = (text) => { status.textContent = text; };

  // ---- availability -------------------------------------------------------------------------
  const canTalk = () =>
    !!avail && avail.available && (avail.channels || []).includes("webrtc") && !!window.RTCPeerConnection;
  // The gateway says whether the site takes callbacks at all (no telephony: never offer one).
  const canCallBack = () => !avail || avail.callbacks !== false;

  function setAvailability(a) {
    if (!a || typeof a !== "object" || JSON.stringify(a) === JSON.stringify(avail)) return;
    avail = a;
    renderButton();
    for (const fn of listeners) notify(fn);
  }
  function notify(fn) {
    try { fn({ ...avail }); } catch (e) { console.error("[membrane] availability listener failed", e); }
  }

  function renderButton() {
    let label = "", sub = "", dot = false;
    if (call && !isFinal(call)) {
      label = call.state === "connected" ? gettext("Back to your call") : gettext("Your call");
    } else if (ticket && !isFinal(ticket.call)) {
      label = gettext("Your callback");
      sub = shortEta(ticket.call);
    } else if (avail) {
      if (canTalk()) {
        label = gettext("Talk to us now");
        dot = true;
      } else if (!canCallBack()) {
        label = ""; // nothing true to offer: no button
      } else if (avail.open || avail.available) {
        label = gettext("Call me back");
        if (avail.estimated_wait_s > 0) sub = gettext("~{minutes} min", { minutes: minutes(avail.estimated_wait_s) });
      } else {
        label = avail.next_open_at ? opens(avail.next_open_at) : gettext("Schedule a call");
      }
    }
    btnLabel.textContent = label;
    btnSub.textContent = sub;
    btnSub.hidden = !sub;
    btnDot.hidden = !dot;
    button.hidden = !showButton || !label;
  }

  function primaryAction() {
    const live = call && !isFinal(call) ? "call" : ticket && !isFinal(ticket.call) ? "ticket" : null;
    const target = live || (canTalk() ? "call" : "form");
    if (!panel.hidden && view === target && (live || target === "form")) return closePanel();
    if (live) return openPanel(live);
    if (canTalk()) return startCall();
    return openForm(avail && !avail.open && !avail.available ? "at" : "now");
  }

  async function watchAvailability() {
    try {
      const r = await fetch(`${siteUrl}/availability${qs}`);
      if (r.status === 404) return console.warn(`[membrane] unknown site "${site}"`);
      if (r.ok) setAvailability(await r.json());
    } catch { /* the stream below retries */ }
    openStream();
  }
  let streamRetry = 0;
  function openStream() {
    if (!window.EventSource) return;
    const es = new EventSource(`${siteUrl}/availability/stream${qs}`);
    es.addEventListener("availability", (e) => {
      streamRetry = 0;
      try { setAvailability(JSON.parse(e.data)); } catch { /* ignore a bad frame */ }
    });
    // EventSource retries by itself after a dropped connection; it gives up only on an HTTP
    // error, and then we try again later. Either way the last known state stays on screen.
    es.onerror = () => {
      if (es.readyState !== 2) return;
      streamRetry = Math.min(streamRetry ? streamRetry * 2 : 5000, 300000);
      setTimeout(openStream, streamRetry);
    };
  }

  // ---- browser call (socket.io + WebRTC, the visitor offers) --------------------------------
  let ioLoading = null;
  function loadIo() {
    if (!ioLoading) {
      ioLoading = new Promise((resolve, reject) => {
        const prev = window.io; // a host page's own socket.io stays untouched
        const s = document.createElement("script");
        s.src = `${gw}/static/vendor/socket.io.min.js`;
        s.async = true;
        s.onload = () => {
          const io = window.io;
          if (prev) window.io = prev;
          io ? resolve(io) : reject({ code: "network" });
        };
        s.onerror = () => { ioLoading = null; reject({ code: "network" }); };
        document.head.append(s);
      });
    }
    return ioLoading;
  }

  function pickScore(n) {
    score = n;
    scoreBtns.forEach((b, i) => b.setAttribute("aria-pressed", String(i === n)));
    surveySend.disabled = false;
  }

  async function sendSurvey(ev) {
    ev.preventDefault();
    if (score === null || !call || !callToken) return;
    surveySend.disabled = true;
    const url = `${gw}/v1/calls/${encodeURIComponent(call.call_id)}/survey?token=${encodeURIComponent(callToken)}`;
    try {
      const res = await api("POST", url, { score, comment: comment.value.trim() });
      survey.hidden = true;
      surveyThanks.hidden = false;
      surveyThanks.textContent = gettext("Thank you!");
      if (res.referral_url && /^https?:\/\//i.test(res.referral_url)) {
        referral.href = res.referral_url;
        referral.hidden = false;
      }
    } catch (e) {
      survey.hidden = true;
      surveyThanks.hidden = false;
      surveyThanks.textContent = e && e.code === "already_answered"
        ? gettext("You have answered already. Thank you!") : gettext("Sorry, we couldn't send that.");
    }
  }

  function resetSurvey() {
    score = null;
    survey.reset();
    survey.hidden = true;
    surveyThanks.hidden = true;
    referral.hidden = true;
    scoreBtns.forEach((b) => b.setAttribute("aria-pressed", "false"));
    surveySend.disabled = true;
  }

  function resetCallView() {
    call = null;
    connectedAt = 0;
    callTicketUrl = null;
    callToken = null;
    resetSurvey();
    callTicketLink.hidden = true;
    detail.textContent = "";
    timer.hidden = true;
    muteBtn.setAttribute("aria-pressed", "false");
    muteBtn.textContent = gettext("Mute");
    showControls({ live: true });
  }
  function showControls({ live = false, offer = false }) {
    muteBtn.hidden = !(live && call && call.state === "connected");
    hangupBtn.hidden = !live;
    offerBtn.hidden = !offer;
    doneBtn.hidden = live;
  }

  async function startCall() {
    if (busy || (call && !isFinal(call))) return openPanel("call");
    resetCallView();
    openPanel("call");
    say(gettext("Connecting…"));
    if (!window.RTCPeerConnection || !navigator.mediaDevices) return callError({ code: "unsupported" }, true);
    busy = true;
    const attempt = ++calling;
    try {
      await getSession();
      const io = await loadIo();
      if (attempt !== calling) return; // hung up while loading
      const s = io(`${gw}/visitor`, {
        // Reconnecting in a call: name it, so that a call that ended meanwhile is told too.
        auth: (cb) => getSession().then(
          (x) => cb(call && call.call_id ? { token: x.token, call_id: call.call_id } : { token: x.token }),
          () => cb({})),
        transports: ["websocket"],
      });
      sock = s;
      let started = false;
      s.on("connect", () => {
        if (started) return; // a reconnect: the gateway knows our call by the visitor id
        started = true;
        const payload = { page: location.href.slice(0, 500) };
        const language = callLanguage();
        if (language) payload.language = language;
        if (cfg.branch) payload.branch = cfg.branch;
        const send = (tries) => s.timeout(15000).emit("call:start", payload, (err, res) => {
          // A final call:update can come before this ack: the call is over and endCall()
          // closed the socket, which fails this ack with "socket has been disconnected".
          if (attempt !== calling) return;
          // No answer, but the call came anyway: a socket that reconnected took it over.
          if (err && call && !isFinal(call)) return;
          if (err) return callError({ code: "network" });
          if (res && res.ok) {
            callTicketUrl = res.ticket_url || null;
            callToken = res.status_token || null;
            return applyCall(res.call);
          }
          const e = res && res.error;
          if (e && e.code === "draining") { // start it on another node
            started = false;
            return reconnectElsewhere(s);
          }
          // A busy gateway sheds starts at once and says when to come back: try again a
          // few times, a little later than asked so that visitors do not come back together.
          if (e && e.code === "overloaded" && tries < 3) {
            say(gettext("Connecting…"));
            const wait = (Number(e.retry_after_ms) || 1000) * (1 + Math.random() * 0.5);
            return setTimeout(() => { if (attempt === calling) send(tries + 1); }, wait);
          }
          callError(e, e && e.code === "overloaded");
        });
        send(0);
      });
      // The node is shutting down and closes this connection next; socket.io reconnects by
      // itself (to the same URL: behind a load balancer, another node), and the call, whose
      // audio flows between the browsers, carries on: the gateway sends it again.
      s.on("server:draining", (m) => {
        if (m && m.retry_after_s > 0) retryMs = Math.min(m.retry_after_s * 1000, 30000);
        if (call && !isFinal(call)) say(gettext("Reconnecting…"));
      });
      s.on("connect_error", (e) => {
        const why = refusal(e);
        if (why && why.code === "draining") return reconnectElsewhere(s); // reached it anyway
        if (s.active && !why) return say(gettext("Reconnecting…"));
        if (why && why.code === "invalid_token") session = null;
        callError(why || { code: "network" });
      });
      s.on("disconnect", (reason) => {
        if (sock === s && call && !isFinal(call) && reason !== "io client disconnect") say(gettext("Reconnecting…"));
      });
      s.on("call:update", (c) => { if (c && (!call || c.call_id === call.call_id)) applyCall(c); });
      s.on("availability", setAvailability);
      s.on("rtc:signal", (m) => { signals = signals.then(() => onSignal(m)).catch(rtcError); });
      // The call's audio moved (its media worker died).
      s.on("rtc:restart", (m) => {
        if (pc && call && !isFinal(call) && m && m.call_id === call.call_id) pc.restartIce();
      });
      s.on("error", (e) => console.warn("[membrane]", e));
    } catch (e) {
      if (attempt === calling) callError(e);
    }
  }

  let retryMs = 1000;
  /** Reconnect on a new connection after a while: a load balancer sends it to another node. */
  function reconnectElsewhere(s) {
    if (call && !isFinal(call)) say(gettext("Reconnecting…"));
    s.disconnect();
    setTimeout(() => { if (sock === s) s.connect(); }, retryMs * (0.5 + Math.random()));
  }

  function callError(e, offerCallback) {
    endCall();
    if (call && !isFinal(call)) call = { ...call, state: "failed" };
    say(friendly(e));
    detail.textContent = "";
    showControls({ offer: !!offerCallback });
    renderButton();
  }

  /** Whether the agent has the call on hold now: its last hold event says so. */
  function onHold(c) {
    const last = (c.timeline || []).filter((e) => e.event === "on_hold" || e.event === "off_hold").pop();
    return !!last && last.event === "on_hold";
  }

  function applyCall(c) {
    if (!c || !c.state) return;
    call = c;
    if (callTicketUrl) callTicketLink.href = callTicketUrl;
    callTicketLink.hidden = !(callTicketUrl && c.state === "completed" && c.agent);
    // Asked once the visitor has talked to someone and hung up, until answered.
    const ask = !!callToken && c.state === "completed" && !!c.agent && !!connectedAt;
    if (ask && survey.hidden && surveyThanks.hidden) survey.hidden = false;
    if (!ask) survey.hidden = true;
    const agent = c.agent && c.agent.name;
    const branch = c.agent && c.agent.branch;
    let text = "", more = "", offer = false;
    switch (c.state) {
      case "queued":
        text = gettext("Finding someone for you…");
        if (c.position) more = gettext("You're number {position} in line", { position: c.position });
        if (c.eta_s) {
          const wait = gettext("about {minutes} min", { minutes: minutes(c.eta_s) });
          more = more ? `${more} · ${wait}` : wait;
        }
        break;
      case "scheduled":
        text = c.scheduled_at ? gettext("We'll call you at {time}", { time: when(c.scheduled_at) }) : gettext("Scheduled");
        break;
      case "ringing":
        text = !agent ? gettext("Ringing…")
          : branch ? gettext("Ringing {agent} in {branch}…", { agent, branch }) : gettext("Ringing {agent}…", { agent });
        break;
      case "dialing":
        text = !agent ? gettext("Calling…")
          : branch ? gettext("Calling {agent} in {branch}…", { agent, branch }) : gettext("Calling {agent}…", { agent });
        break;
      case "connected":
        text = onHold(c)
          ? (agent ? gettext("{agent} put you on hold. Please stay on the line.", { agent }) : gettext("On hold. Please stay on the line."))
          : (agent ? gettext("Connected with {agent}", { agent }) : gettext("Connected"));
        if (!connectedAt) {
          const t = (c.timeline || []).find((x) => x.event === "connected");
          connectedAt = Math.min(Date.now(), (t && Date.parse(t.at)) || Date.now());
        }
        break;
      case "completed": text = gettext("Call ended"); more = c.reason || ""; break;
      case "canceled": text = gettext("Call canceled"); more = c.reason || ""; break;
      case "failed":
        offer = !!c.callback_offer && canCallBack();
        text = offer ? gettext("Nobody could answer right now") : gettext("The call could not be connected");
        more = offer
          ? gettext("We can call you back in about {minutes} min.", { minutes: minutes(c.callback_offer.estimated_wait_s || 60) })
          : c.reason || "";
        break;
      default: text = c.state;
    }
    if (status.textContent !== text) say(text);
    ringback(c.state === "queued" || c.state === "ringing");
    detail.textContent = more;
    timer.hidden = !connectedAt;
    if (isFinal(c)) {
      endCall();
      showControls({ offer: c.state === "failed" && offer });
    } else {
      showControls({ live: true });
      if (c.state === "connected" && !pc) startRtc().catch(rtcError);
    }
    renderButton();
  }

  function tick() {
    if (connectedAt && call && call.state === "connected") timer.textContent = clock(Date.now() - connectedAt);
  }
  setInterval(tick, 1000);

  async function startRtc() {
    const callId = call.call_id;
    pc = new RTCPeerConnection({ iceServers: (session && session.ice_servers) || [] });
    Membrane._pc = pc;
    const thisPc = pc;
    pc.onicecandidate = (e) => {
      if (e.candidate && sock) sock.emit("rtc:signal", { call_id: callId, candidate: e.candidate.toJSON() });
    };
    pc.ontrack = (e) => {
      audio.srcObject = e.streams[0] || new MediaStream([e.track]);
      audio.play().catch(() => { /* autoplay: the click on the button normally allows it */ });
    };
    // The network changed or dropped: restart ICE (only this side, the first offerer).
    let restarts = 0;
    let stalled = 0;
    const restartIce = () => {
      if (thisPc !== pc || isFinal(call)) return;
      if (restarts++ < ICE_RESTARTS) return thisPc.restartIce();
      detail.textContent = gettext("The audio connection failed. Hang up and try again, or ask us to call you.");
    };
    pc.oniceconnectionstatechange = () => {
      clearTimeout(stalled);
      const s = thisPc.iceConnectionState;
      if (s === "failed") restartIce();
      if (s === "disconnected") stalled = setTimeout(restartIce, 2000); // it may heal itself
      if (s === "connected" || s === "completed") restarts = 0;
    };
    pc.onnegotiationneeded = () => { // a restart
      if (thisPc === pc && thisPc.remoteDescription) offer(thisPc, callId).catch(rtcError);
    };
    try {
      mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch {
      if (sock) sock.emit("call:cancel", { call_id: callId }); // sent before the socket closes
      return callError({ code: "no_microphone" }, true);
    }
    if (pc !== thisPc) return mic.getTracks().forEach((t) => t.stop()); // ended meanwhile
    for (const t of mic.getTracks()) pc.addTrack(t, mic);
    await offer(pc, callId);
  }

  async function offer(thisPc, callId) {
    if (thisPc.signalingState !== "stable") return;
    await thisPc.setLocalDescription(await thisPc.createOffer());
    const d = thisPc.localDescription;
    if (sock) sock.emit("rtc:signal", { call_id: callId, description: { type: d.type, sdp: d.sdp } });
  }

  async function onSignal(m) {
    if (!m || !pc || !call || m.call_id !== call.call_id) return;
    if (m.description) await pc.setRemoteDescription(m.description);
    else if (m.candidate) await pc.addIceCandidate(m.candidate);
  }
  const rtcError = (e) => console.warn("[membrane] WebRTC:", e);

  function toggleMute() {
    if (!mic) return;
    const muted = muteBtn.getAttribute("aria-pressed") !== "true";
    for (const t of mic.getAudioTracks()) t.enabled = !muted;
    muteBtn.setAttribute("aria-pressed", String(muted));
    muteBtn.textContent = muted ? gettext("Unmute") : gettext("Mute");
  }

  // Ringback, as a phone plays it while the other end rings (440 + 480 Hz, 2 s on, 4 s off):
  // the visitor hears the call going somewhere, whether the agent is in the app or on a phone.
  let ringCtx = null;
  let ringTimer = null;
  function ringback(on) {
    if (!on) {
      clearInterval(ringTimer);
      ringTimer = null;
      if (ringCtx) ringCtx.close().catch(() => {});
      ringCtx = null;
      return;
    }
    if (ringCtx || !window.AudioContext) return;
    const ctx = (ringCtx = new AudioContext());
    const gain = ctx.createGain();
    gain.gain.value = 0;
    gain.connect(ctx.destination);
    for (const hz of [440, 480]) {
      const tone = ctx.createOscillator();
      tone.frequency.value = hz;
      tone.connect(gain);
      tone.start();
    }
    const burst = () => {
      const t = ctx.currentTime;
      gain.gain.setValueAtTime(0.06, t);
      gain.gain.setValueAtTime(0, t + 2);
    };
    burst();
    ringTimer = setInterval(burst, 6000);
  }

  /** Close the media and the socket: the call is over (or never started). */
  function endCall() {
    ringback(false);
    busy = false;
    calling++;
    if (pc) pc.close();
    pc = null;
    if (mic) mic.getTracks().forEach((t) => t.stop());
    mic = null;
    audio.srcObject = null;
    if (sock) sock.disconnect();
    sock = null;
  }

  /** Cancel or end the browser call, in any state that is not final. */
  function hangup() {
    return new Promise((resolve) => {
      if (!call || !sock) { // still setting up: just stop
        if (busy) {
          endCall();
          say(gettext("Call canceled"));
          showControls({});
        }
        renderButton();
        return resolve(Membrane.state());
      }
      if (isFinal(call)) return resolve(Membrane.state());
      hangupBtn.disabled = true;
      sock.timeout(5000).emit("call:cancel", { call_id: call.call_id }, (err, res) => {
        hangupBtn.disabled = false;
        if (!err && res && res.ok && res.call) applyCall(res.call);
        if (!isFinal(call)) applyCall({ ...call, state: "canceled" });
        resolve(Membrane.state());
      });
    });
  }

  // ---- callback form and ticket (REST only) -------------------------------------------------
  function guessCountry() {
    const langs = navigator.languages || [navigator.language || ""];
    for (const l of langs) {
      const region = (l.split("-")[1] || "").toUpperCase();
      if (COUNTRIES.some(([c]) => c === region)) return region;
    }
    const byLang = { ga: "IE", de: "DE", fr: "FR", es: "ES", nl: "NL", it: "IT", en: "US" };
    return byLang[(langs[0] || "").split("-")[0]] || "IE";
  }
  country.value = guessCountry();

  /** E.164 from what the visitor typed: "+…" and "00…" as given, else the country code
   * with the national trunk 0 dropped (Italy keeps it). The gateway validates the result. */
  function toE164(input, cc) {
    let n = input.replace(/[\s().\-/]/g, "");
    if (n.startsWith("00")) n = `+${n.slice(2)}`;
    if (n.startsWith("+")) return n;
    if (cc !== "IT") n = n.replace(/^0/, "");
    return COUNTRIES.find(([c]) => c === cc)[1] + n;
  }

  async function loadSlots() {
    try {
      const data = await api("GET", `${siteUrl}/callback-slots${qs}`);
      slots = Array.isArray(data && data.slots) ? data.slots : [];
    } catch {
      slots = [];
    }
    slotSelect.replaceChildren(...slots.map((s) => h("option", { value: s }, when(s))));
    atChoice.hidden = !slots.length;
    if (!slots.length && whenAt.checked) whenNow.checked = true;
    slotRow.hidden = !whenAt.checked;
  }

  function openForm(mode) {
    if (!canCallBack()) return;
    closedMessage();
    phoneErr.hidden = true;
    phone.removeAttribute("aria-invalid");
    (mode === "at" && slots && slots.length ? whenAt : whenNow).checked = true;
    slotRow.hidden = !whenAt.checked;
    openPanel("form");
    const wait = avail && avail.open && avail.estimated_wait_s > 0;
    say(wait ? gettext("About {minutes} min wait right now.", { minutes: minutes(avail.estimated_wait_s) }) : "");
    loadSlots().then(() => {
      if (mode === "at" && slots.length) { whenAt.checked = true; slotRow.hidden = false; }
    });
  }
  function closedMessage() {
    nowLabel.textContent = avail && !avail.open && !avail.available ? gettext("As soon as we open") : gettext("Call me now");
  }

  function fieldError(e) {
    phoneErr.textContent = friendly(e);
    phoneErr.hidden = false;
    if (e && /^(invalid_phone|invalid_payload|number_not_allowed|country_not_allowed|number_type_not_allowed)$/.test(e.code)) {
      phone.setAttribute("aria-invalid", "true");
      phone.focus();
    }
  }

  async function submitCallback(ev) {
    ev.preventDefault();
    phoneErr.hidden = true;
    phone.removeAttribute("aria-invalid");
    if (!phone.value.trim()) return fieldError({ code: "invalid_phone", message: "" });
    const body = { phone: toE164(phone.value.trim(), country.value), page: location.href.slice(0, 500) };
    if (whenAt.checked && slotSelect.value) body.at = slotSelect.value;
    const language = callLanguage();
    if (language) body.language = language;
    if (cfg.branch) body.branch = cfg.branch;
    // Keep-my-place: a browser call nobody could answer lends its place in line.
    if (call && call.state === "failed" && call.callback_offer) body.after_call = call.call_id;
    submitBtn.disabled = true;
    say(gettext("Sending…"));
    try {
      const s = await getSession();
      const res = await api("POST", `${siteUrl}/callbacks`, body, s.token);
      setTicket({ call_id: res.call_id, status_token: res.status_token, call: res.call });
      openPanel("ticket");
    } catch (e) {
      if (e.code === "invalid_token") session = null;
      say("");
      fieldError(e);
    } finally {
      submitBtn.disabled = false;
    }
  }

  function setTicket(t) {
    ticket = t;
    raw.set(TICKET_KEY, t && !isFinal(t.call)
      ? JSON.stringify({ site, call_id: t.call_id, status_token: t.status_token }) : null);
    renderTicket();
    clearTimeout(pollTimer);
    if (t && !isFinal(t.call)) pollTimer = setTimeout(poll, 5000);
  }

  async function poll() {
    if (!ticket) return;
    if (document.hidden) { pollTimer = setTimeout(poll, 5000); return; }
    const t = ticket;
    try {
      const c = await api("GET", ticketUrl(t));
      if (ticket === t) setTicket({ ...t, call: c });
    } catch (e) {
      if (ticket !== t) return;
      if ([401, 403, 404].includes(e.status)) {
        raw.set(TICKET_KEY, null);
        ticket = null;
        renderButton();
        if (view === "ticket" && !panel.hidden) say(friendly({ code: "not_found" }));
      } else {
        pollTimer = setTimeout(poll, 5000);
      }
    }
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && ticket && !isFinal(ticket.call)) { clearTimeout(pollTimer); poll(); }
  });
  const ticketUrl = (t) => `${gw}/v1/calls/${encodeURIComponent(t.call_id)}?token=${encodeURIComponent(t.status_token)}`;

  function shortEta(c) {
    if (!c) return "";
    if (c.state === "scheduled" && c.scheduled_at) return when(c.scheduled_at);
    if (c.state === "queued" && c.eta_s) return `~${minutes(c.eta_s)} min`;
    return "";
  }

  function renderTicket() {
    renderButton();
    if (!ticket) return;
    const c = ticket.call || {};
    const agent = c.agent && c.agent.name;
    const texts = {
      queued: c.eta_s ? gettext("We'll call you in about {minutes} min", { minutes: minutes(c.eta_s) }) : gettext("We'll call you shortly"),
      scheduled: c.scheduled_at ? gettext("We'll call you at {time}", { time: when(c.scheduled_at) }) : gettext("Your call is scheduled"),
      ringing: agent ? gettext("{agent} will call you in a moment", { agent }) : gettext("We'll call you in a moment"),
      dialing: gettext("We're calling you now"),
      connected: agent ? gettext("You're on the phone with {agent}", { agent }) : gettext("You're on the phone with us"),
      completed: gettext("Done. Thanks for talking to us!"),
      failed: gettext("We couldn't reach you"),
      canceled: gettext("Your callback was canceled"),
    };
    const text = texts[c.state] || c.state || "";
    if (eta.textContent !== text) eta.textContent = text;
    ticketInfo.textContent = c.reason || (c.position ? gettext("You're number {position} in line.", { position: c.position }) : "");
    timeline.replaceChildren(...(c.timeline || []).slice(-8).map((e) => {
      const what = HAPPENED[e.event] ? gettext(HAPPENED[e.event]) : e.detail || e.event;
      return h("li", {}, `${e.at && !isNaN(new Date(e.at)) ? `${hhmm(new Date(e.at))} ` : ""}${what}`);
    }));
    cancelBtn.hidden = isFinal(c) || c.state === "connected";
    ticketLink.href = `${gw}/t/${encodeURIComponent(ticket.call_id)}#${encodeURIComponent(ticket.status_token)}`;
  }

  async function cancelCallback() {
    if (!ticket) return;
    cancelBtn.disabled = true;
    try {
      const c = await api("DELETE", ticketUrl(ticket));
      setTicket({ ...ticket, call: c && c.state ? c : { ...ticket.call, state: "canceled" } });
    } catch (e) {
      say(friendly(e));
    } finally {
      cancelBtn.disabled = false;
    }
  }

  async function restoreTicket() {
    let saved = null;
    try { saved = JSON.parse(raw.get(TICKET_KEY)); } catch { /* none */ }
    if (!saved || saved.site !== site || !saved.call_id || !saved.status_token) return;
    try {
      const c = await api("GET", ticketUrl(saved));
      setTicket({ call_id: saved.call_id, status_token: saved.status_token, call: c });
      if (!isFinal(c)) openPanel("ticket", { focus: false });
    } catch (e) {
      if (e.status >= 400 && e.status < 500) raw.set(TICKET_KEY, null);
    }
  }

  // ---- public API ---------------------------------------------------------------------------
  const Membrane = {
    version: "1",
    _pc: null, // the RTCPeerConnection of the current or last browser call (for tests)
    _ringback: () => !!ringCtx, // whether the ringback tone plays (for tests)
    onAvailabilityChange(fn) {
      if (typeof fn !== "function") throw new TypeError("onAvailabilityChange needs a function");
      listeners.add(fn);
      if (avail) notify(fn);
      return () => { listeners.delete(fn); };
    },
    call: () => startCall(),
    callback() {
      if (ticket && !isFinal(ticket.call)) return openPanel("ticket");
      openForm(avail && !avail.open && !avail.available ? "at" : "now");
    },
    hangup,
    state: () => ({
      availability: avail ? { ...avail } : null,
      call: call ? { ...call } : null,
      callback: ticket ? { call_id: ticket.call_id, ...ticket.call } : null,
    }),
  };
  // A page may queue calls before this async script runs: window.Membrane = {q: [["call"]]}.
  const queued = window.Membrane && Array.isArray(window.Membrane.q) ? window.Membrane.q : [];
  window.Membrane = Membrane;

  function mount() {
    document.body.append(host);
    watchAvailability();
    restoreTicket();
    for (const [name, ...args] of queued) if (typeof Membrane[name] === "function") Membrane[name](...args);
    window.dispatchEvent(new CustomEvent("membrane:ready"));
  }
  const ready = () => { loadCatalogue().then(mount); };
  if (document.body) ready();
  else document.addEventListener("DOMContentLoaded", ready);
})();
