/* Membrane agent app: presence, ringing, browser calls (the agent answers), supervisor board.
 * Talks to the gateway over socket.io namespaces /agent and /board; see web_client/README.md. */
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "membrane.agent.token"; // sessionStorage: gone when the tab closes
  const STATE_KEY = "membrane.agent.state."; // + agent id, localStorage: the last state chosen here
  const STATES = ["available", "away", "busy", "dnd"];
  const FINAL = ["completed", "failed", "canceled"];
  const ICE_RESTARTS = 3; // in a row without connecting; then the agent is told
  const DISCONNECTED_GRACE_MS = 2000; // a brief loss often heals by itself
  const STATUS_ORDER = ["available", "on_call", "busy", "away", "dnd", "offline"];
  // Every sentence is a gettext("...") message id, looked up in the gateway's catalogue for
  // the agent's browser language (GET /v1/messages/{language}: the same catalogues as the
  // widget, the ticket page and the phone prompts); the page's own words are put in it by
  // translatePage. English until the catalogue has loaded, or for a language not spoken.
  let catalogue = {};
  const N_ = (id) => id;
  function gettext(id, params) {
    const text = catalogue[id] || id;
    return params ? text.replace(/\{(\w+)\}/g, (m, k) => (k in params ? String(params[k]) : m)) : text;
  }
  const CHANNEL_NAMES = { webrtc: N_("browser"), pstn: N_("phone") };
  const STATE_NAMES = {
    available: N_("Available"), away: N_("Away"), busy: N_("Busy"), dnd: N_("Do not disturb"), offline: N_("Offline"),
  };
  // The words of statuses and call states, as the pills show them.
  N_("available"); N_("on call"); N_("busy"); N_("away"); N_("dnd"); N_("offline");
  N_("queued"); N_("scheduled"); N_("ringing"); N_("dialing"); N_("connected");
  N_("completed"); N_("failed"); N_("canceled");
  N_("desktop"); N_("mobile"); N_("im"); // device kinds

  /** Exposed for tests and debugging. */
  const MA = (window.MembraneAgent = { pc: null, socket: null, board: null, presence: null, call: null });

  let token = null;
  let claims = null; // decoded for display only; the gateway checks the signature
  let socket = null;
  let presence = null;
  let presenceSeen = false; // a presence:update arrived since connecting
  const rings = new Map(); // call_id -> {data, el, timer}
  const stopped = new Map(); // call_id -> last attempt whose ring ended (a late ring of it is ignored)
  const early = new Map(); // call_id -> rtc:signal that came before our accept was acknowledged
  let current = null; // {id, ring, call, pc, mic, media, signals, connectedAt}

  // ---- helpers ------------------------------------------------------------------------------
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
  const time = (iso) => {
    const d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  };
  function ago(iso) {
    const t = Date.parse(iso);
    if (isNaN(t)) return "";
    const s = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }
  const clock = (ms) => {
    const s = Math.max(0, Math.floor(ms / 1000));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  };
  const human = (status) => gettext(String(status || "").replace(/_/g, " "));
  const channelName = (c) => (CHANNEL_NAMES[c] ? gettext(CHANNEL_NAMES[c]) : c);
  const errorText = (e) => {
    const what = (e && e.message) || gettext("Something went wrong");
    return e && e.code ? `${what} (${e.code})` : what;
  };

  /** The page's own words (and labels) in the catalogue's language. */
  function translatePage() {
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
      acceptNode: (n) => (n.parentElement && n.parentElement.closest("[translate=no], script, style, code")
        ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT),
    });
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      const id = n.data.trim();
      if (id && catalogue[id]) n.data = n.data.replace(id, catalogue[id]);
    }
    for (const el of document.querySelectorAll("[aria-label]")) {
      const id = el.getAttribute("aria-label");
      if (catalogue[id]) el.setAttribute("aria-label", catalogue[id]);
    }
    document.title = gettext(document.title);
  }

  async function loadCatalogue() {
    const wanted = new URLSearchParams(location.search).get("lang")
      || (navigator.languages && navigator.languages[0]) || navigator.language || "en";
    try {
      const r = await fetch(`/v1/messages/${encodeURIComponent(wanted)}`, { signal: AbortSignal.timeout(3000) });
      if (r.ok) {
        const body = await r.json();
        catalogue = body.messages || {};
        document.documentElement.lang = body.language || "en";
      }
    } catch { /* English, then */ }
    translatePage();
  }

  function decodeJwt(t) {
    try {
      const part = t.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const json = decodeURIComponent(
        [...atob(part)].map((c) => `%${c.charCodeAt(0).toString(16).padStart(2, "0")}`).join(""),
      );
      const payload = JSON.parse(json);
      return payload && typeof payload === "object" ? payload : null;
    } catch {
      return null;
    }
  }

  /** The {code, message} of a refused connection: err.data, or parsed from a server that put
   * it only in the message; null for network trouble, which socket.io retries by itself. */
  function refusal(err) {
    if (err && err.data && err.data.code) return err.data;
    const text = (err && err.message) || "";
    const code = /["']code["']: ["'](\w+)["']/.exec(text);
    if (!code) return null;
    const message = /["']message["']: ["']([^"']*)["']/.exec(text);
    return { code: code[1], message: message ? message[1] : text };
  }

  /** emit with an acknowledgement; resolves to the ack, or {ok:false} on timeout. */
  async function ask(sock, event, payload) {
    try {
      return (await sock.timeout(10000).emitWithAck(event, payload)) || { ok: false };
    } catch {
      return { ok: false, error: { code: "timeout", message: gettext("The gateway did not answer") } };
    }
  }

  function showError(e) {
    const el = $("error");
    el.textContent = typeof e === "string" ? e : errorText(e);
    el.hidden = false;
  }
  const clearError = () => { $("error").hidden = true; $("error").textContent = ""; };
  const banner = (text) => { $("conn").textContent = text || ""; $("conn").hidden = !text; };
  const announce = (text) => { $("announce").textContent = text; };
  const storage = (s) => ({
    get: (k) => { try { return s.getItem(k); } catch { return null; } },
    set: (k, v) => { try { v == null ? s.removeItem(k) : s.setItem(k, v); } catch { /* blocked */ } },
  });
  const session = storage(window.sessionStorage);
  const local = storage(window.localStorage);
  const stateKey = () => STATE_KEY + ((claims && claims.sub) || "");
  const chosenState = () => (STATES.includes(local.get(stateKey())) ? local.get(stateKey()) : "available");

  // ---- ringing sound (WebAudio; needs one user gesture first) --------------------------------
  const ringer = {
    ctx: null,
    out: null,
    timer: 0,
    unlock() {
      try {
        const AC = window.AudioContext || window.webkitAudioContext;
        if (!this.ctx && AC) this.ctx = new AC();
        if (this.ctx && this.ctx.state === "suspended") this.ctx.resume();
      } catch { /* no audio: the ring card still shows */ }
    },
    beep(at, seconds) {
      const ctx = this.ctx;
      const t = ctx.currentTime + at;
      for (const f of [440, 480]) {
        const osc = ctx.createOscillator();
        const gain = ctx.createGain();
        osc.frequency.value = f;
        gain.gain.setValueAtTime(0, t);
        gain.gain.linearRampToValueAtTime(0.12, t + 0.02);
        gain.gain.setValueAtTime(0.12, t + seconds - 0.03);
        gain.gain.linearRampToValueAtTime(0, t + seconds);
        osc.connect(gain).connect(this.out);
        osc.start(t);
        osc.stop(t + seconds);
      }
    },
    start() {
      if (this.timer || !this.ctx) return;
      this.out = this.ctx.createGain();
      this.out.connect(this.ctx.destination);
      const pattern = () => { this.beep(0, 0.4); this.beep(0.6, 0.4); };
      pattern();
      this.timer = setInterval(pattern, 3000);
    },
    stop() {
      clearInterval(this.timer);
      this.timer = 0;
      if (this.out) this.out.disconnect(); // cuts a beep that is playing now
      this.out = null;
    },
  };
  document.addEventListener("pointerdown", () => ringer.unlock(), { once: true });
  document.addEventListener("keydown", () => ringer.unlock(), { once: true });

  // ---- sign in and out ----------------------------------------------------------------------
  function showSignIn(error) {
    $("signin-view").hidden = false;
    $("app-view").hidden = true;
    $("who").hidden = true;
    banner("");
    if (error) showError(error);
    $("token").focus();
  }

  function signIn(t) {
    t = (t || "").trim();
    const c = decodeJwt(t);
    if (!c) return showSignIn(gettext("That does not look like a Membrane token (a JWT with three parts)."));
    if (c.exp && c.exp * 1000 < Date.now() - 60000) {
      session.set(TOKEN_KEY, null);
      return showSignIn(gettext("This token has expired. Mint a new one with {command}.", { command: ".venv/bin/membrane token --agent <id>" }));
    }
    if (typeof window.io !== "function") return showSignIn(gettext("The socket.io client did not load."));
    clearError();
    token = t;
    claims = c;
    session.set(TOKEN_KEY, t);
    ringer.unlock();
    banner(gettext("Connecting…"));
    $("state").value = chosenState();
    disconnectAll();
    presenceSeen = false;
    const s = window.io(`${location.origin}/agent`, {
      // call_id: a reconnecting app takes its browser call over (after a network blip, or
      // from a node that shut down), keeping the audio, which flows between the browsers.
      auth: (cb) => cb({ token, state: chosenState(), ...(liveCallId() ? { call_id: liveCallId() } : {}) }),
      transports: ["websocket"],
    });
    socket = MA.socket = s;
    s.on("connect", () => {
      banner("");
      clearError();
      showApp();
      presenceSeen = false;
      loadPresence();
    });
    s.on("server:draining", (m) => {
      // The node is shutting down and closes this connection next; socket.io reconnects by
      // itself, to the same URL: behind a load balancer, another node.
      if (m && m.retry_after_s > 0) retryMs = Math.min(m.retry_after_s * 1000, 30000);
      banner(gettext("Moving to another server…"));
    });
    s.on("connect_error", (err) => {
      const why = refusal(err);
      if (why && why.code === "draining") return reconnectElsewhere(s, () => socket === s);
      if (why || !s.active) {
        disconnectAll();
        if (!why || ["invalid_token", "forbidden", "unknown_agent"].includes(why.code)) session.set(TOKEN_KEY, null);
        showSignIn(why || { code: "network", message: gettext("Could not reach the gateway") });
      } else {
        banner(gettext("Can't reach the gateway. Retrying…"));
      }
    });
    s.on("disconnect", (reason) => {
      if (reason === "io client disconnect") return;
      if (reason === "io server disconnect") {
        disconnectAll();
        showSignIn(gettext("The gateway closed the connection. Sign in again."));
      } else {
        banner(gettext("Connection lost. Reconnecting…"));
      }
    });
    s.on("presence:update", (p) => {
      if (!p || (claims && p.agent_id && p.agent_id !== claims.sub)) return;
      presenceSeen = true;
      renderPresence(p);
    });
    s.on("call:ring", addRing);
    s.on("call:ring_stop", (m) => {
      if (!m) return;
      const entry = rings.get(m.call_id);
      const attempt = m.attempt ?? (entry ? entry.data.attempt : 0) ?? 0;
      stopped.set(m.call_id, Math.max(attempt, stopped.get(m.call_id) ?? 0));
      if (stopped.size > 200) stopped.delete(stopped.keys().next().value);
      removeRing(m.call_id, m.reason);
    });
    s.on("call:update", onCallUpdate);
    s.on("call:key", onCallerKey);
    s.on("rtc:signal", onSignal);
    // A bridged callback's audio moved to a new media session: restart ICE and offer to it.
    s.on("rtc:restart", (m) => { if (current && m && current.id === m.call_id && current.restart) current.restart(); });
    s.on("error", (e) => showError(e));
  }

  let retryMs = 1000;
  /** A node that is shutting down refused us: reconnect on a new connection after a while,
   * which a load balancer sends to another node. */
  function reconnectElsewhere(s, stillWanted) {
    banner(gettext("Moving to another server…"));
    s.disconnect();
    setTimeout(() => { if (stillWanted()) s.connect(); }, retryMs * (0.5 + Math.random()));
  }

  /** The call this app is talking in (a browser call, or a callback bridged here), if any. */
  function liveCallId() {
    const c = current && current.call;
    return c && c.state === "connected" && current.pc ? current.id : null;
  }

  /** The presence as it is now, in case no presence:update comes right after connecting. */
  async function loadPresence() {
    try {
      const r = await fetch("/v1/agents/me", { headers: { Authorization: `Bearer ${token}` } });
      if (r.ok && !presenceSeen) renderPresence(await r.json());
    } catch { /* the socket's updates are enough */ }
  }

  function showApp() {
    $("signin-view").hidden = true;
    $("app-view").hidden = false;
    $("who").hidden = false;
    $("who-name").textContent = `${claims.sub}${claims.role === "supervisor" ? " · supervisor" : ""} · ${claims.site || ""}`;
    $("tab-board").hidden = claims.role !== "supervisor";
    document.querySelector('[role="tablist"]').hidden = claims.role !== "supervisor";
    if (claims.role !== "supervisor") selectTab("me");
  }

  function disconnectAll() {
    if (socket) socket.disconnect();
    socket = MA.socket = null;
    if (boardSock) boardSock.disconnect();
    boardSock = MA.board = null;
    for (const id of [...rings.keys()]) removeRing(id);
    if (current) endMedia();
  }

  function signOut() {
    if (current && !isFinal(current.call) && !confirm(gettext("You are in a call. Hang up and sign out?"))) return;
    if (current && !isFinal(current.call) && socket) socket.emit("call:hangup", { call_id: current.id });
    disconnectAll();
    current = null;
    $("call").hidden = true;
    session.set(TOKEN_KEY, null);
    token = claims = null;
    $("token").value = "";
    clearError();
    showSignIn();
  }

  // ---- presence -----------------------------------------------------------------------------
  function ownDeviceId() {
    return socket && socket.id ? `desktop-${socket.id.slice(0, 8)}` : null;
  }

  function renderPresence(p) {
    presence = MA.presence = p;
    $("me-name").textContent = p.name || p.agent_id;
    $("me-branch").textContent = p.branch ? `· ${p.branch}` : "";
    const st = $("status");
    st.textContent = human(p.status);
    st.dataset.status = p.status;
    const ch = p.channels || [];
    $("channels").textContent = ch.length ? ch.map(channelName).join(", ") : gettext("nothing right now");
    const own = ownDeviceId();
    const mine = (p.devices || []).find((d) => d.device_id === own);
    if (mine && STATES.includes(mine.state)) $("state").value = mine.state;
    $("devices").replaceChildren(...(p.devices || []).map((d) => deviceRow(d, d.device_id === own)));
    if (!(p.devices || []).length) $("devices").append(h("li", { class: "muted" }, gettext("No devices online.")));
  }

  function deviceRow(d, isOwn) {
    const label = isOwn ? gettext("{kind} (this browser)", { kind: gettext(d.kind) }) : gettext(d.kind);
    let control = null;
    if (d.kind === "mobile") {
      const id = `dev-${d.device_id}`;
      const sel = h("select", { id, "data-device": d.device_id, onchange: () => setMobile(d.device_id, sel) },
        ...[...STATES, "offline"].map((s) => h("option", { value: s }, gettext(STATE_NAMES[s]))));
      sel.value = d.state;
      control = h("span", {}, h("label", { for: id, class: "sr-only" }, gettext("State of {device}", { device: d.device_id })), sel);
    }
    return h("li", { class: "device" },
      h("span", { class: "device-name" }, h("strong", {}, label), h("span", { class: "muted" }, ` ${d.device_id}`)),
      h("span", { class: "pill small", "data-status": d.state }, human(d.state)),
      control,
      h("span", { class: "muted small", title: d.last_seen || "" }, d.last_seen ? gettext("seen {ago} ago", { ago: ago(d.last_seen) }) : ""));
  }

  async function setOwnState() {
    const state = $("state").value;
    local.set(stateKey(), state);
    if (!socket || !socket.connected) return; // sent with the next connect
    const res = await ask(socket, "presence:set", { kind: "desktop", state });
    if (res.ok) {
      clearError();
      if (res.presence) renderPresence(res.presence);
    } else {
      showError(res.error);
    }
  }

  async function setMobile(deviceId, select) {
    if (!socket) return;
    const res = await ask(socket, "presence:set", { device_id: deviceId, kind: "mobile", state: select.value });
    if (res.ok && res.presence) renderPresence(res.presence);
    else if (!res.ok) showError(res.error);
  }

  // ---- ringing ------------------------------------------------------------------------------
  function addRing(r) {
    if (!r || !r.call_id || rings.has(r.call_id)) return;
    // A ring that arrives after its end, or after its stop, is over: it is never shown.
    if (typeof r.ring_expires_at === "number" && Date.now() >= r.ring_expires_at) return;
    if (stopped.has(r.call_id) && (r.attempt ?? 0) <= stopped.get(r.call_id)) return;
    // One call offered at a time: the gateway rings an agent again only once her last ring
    // ended, so a ring still shown here is over (its stop is on its way).
    for (const id of [...rings.keys()]) removeRing(id, "superseded");
    const v = r.visitor || {};
    const pageOk = /^https?:\/\//i.test(v.page || "");
    const who = v.last_agent ? gettext("Spoke with {agent} before", { agent: v.last_agent })
      : v.returning ? gettext("Returning visitor") : gettext("New visitor");
    const countdown = h("span", { class: "countdown" });
    const acceptBtn = h("button", { type: "button", class: "primary", testid: "agent-accept", onclick: () => accept(r.call_id) }, gettext("Accept"));
    const declineBtn = h("button", { type: "button", testid: "agent-decline", onclick: () => decline(r.call_id) }, gettext("Decline"));
    if (current && !isFinal(current.call)) acceptBtn.disabled = true;
    const el = h("section", { class: "card ring", testid: "agent-ring", "aria-label": "Incoming call", "data-call-id": r.call_id },
      h("div", { class: "card-head" }, h("h2", {}, r.channel === "callback" ? gettext("Callback request") : gettext("Incoming call")), countdown),
      h("dl", { class: "facts" },
        h("dt", {}, gettext("Visitor")), h("dd", {}, who),
        h("dt", {}, gettext("Language")), h("dd", {}, v.language || gettext("unknown")),
        v.phone ? h("dt", {}, gettext("Calls back")) : null, v.phone ? h("dd", {}, v.phone) : null,
        h("dt", {}, gettext("Page")), h("dd", {}, pageOk
          ? h("a", { href: v.page, target: "_blank", rel: "noopener noreferrer" }, v.page)
          : v.page || gettext("unknown")),
        r.follow_up ? h("dt", {}, gettext("Follow-up")) : null,
        r.follow_up ? h("dd", { testid: "agent-ring-follow-up" }, r.follow_up.note
          ? gettext("Promised by {agent}: {note}", { agent: r.follow_up.promised_by, note: r.follow_up.note })
          : gettext("Promised by {agent}", { agent: r.follow_up.promised_by })) : null,
        r.reasons && r.reasons.length ? h("dt", {}, gettext("Why you")) : null,
        r.reasons && r.reasons.length ? h("dd", {}, h("ul", { class: "reasons" }, ...r.reasons.map((x) => h("li", {}, x)))) : null),
      h("div", { class: "row" }, acceptBtn, declineBtn));
    const entry = { data: r, el, timer: 0 };
    const expires = typeof r.ring_expires_at === "number" ? r.ring_expires_at : Date.parse(r.expires_at);
    const tick = () => {
      if (isNaN(expires)) return;
      const left = Math.ceil((expires - Date.now()) / 1000);
      countdown.textContent = left > 0 ? gettext("{seconds} s to answer", { seconds: left }) : gettext("Missed");
      if (left <= -2) removeRing(r.call_id, "timeout"); // the gateway normally says so first
    };
    tick();
    entry.timer = setInterval(tick, 500);
    rings.set(r.call_id, entry);
    $("rings").append(el);
    selectTab("me");
    ringer.start();
    document.title = `☎ ${gettext("Incoming call")} · Membrane`;
    announce(gettext("Incoming call. {who}. Language {language}.", { who, language: v.language || gettext("unknown") }));
  }

  function removeRing(id, reason) {
    const entry = rings.get(id);
    if (!entry) return;
    clearInterval(entry.timer);
    entry.el.remove();
    rings.delete(id);
    if (reason && reason !== "accepted" && reason !== "superseded" && !(current && current.id === id)) {
      announce(reason === "answered_elsewhere" ? gettext("The call was answered elsewhere.") : gettext("The call was withdrawn."));
    }
    if (!rings.size) {
      ringer.stop();
      document.title = gettext("Membrane · Agent");
    }
  }

  async function accept(id) {
    const entry = rings.get(id);
    if (!entry || !socket) return;
    ringer.stop();
    entry.el.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    early.set(id, []);
    const res = await ask(socket, "call:accept", { call_id: id });
    removeRing(id, "accepted");
    if (!res.ok) {
      early.delete(id);
      return showError(res.error);
    }
    clearError();
    if (entry.data.channel !== "callback") {
      startCall(entry.data, res.call || { call_id: id, state: "connected" }, res.ice_servers || []);
    } else if (entry.data.audio_in_app) {
      // The audio bridge: the gateway offers once the customer answers; the app answers.
      startCall(entry.data, res.call || { call_id: id, state: "dialing" }, res.ice_servers || []);
      announce(gettext("Calling the customer. You talk to them here when they answer."));
    } else {
      startCallback(entry.data, res.call || { call_id: id, state: "dialing" });
    }
  }

  // A callback talked on the agent's own phone: the gateway dials the customer, then
  // bridges them to it.
  function startCallback(ring, call) {
    if (current) endMedia();
    current = { id: call.call_id, ring, call, pc: null, mic: null, signals: Promise.resolve(), connectedAt: 0 };
    clearCallerKeys();
    MA.pc = null;
    MA.call = call;
    renderCall(call);
    $("call").hidden = false;
    $("hangup").focus();
    announce(ring.your_phone
      ? gettext("Calling the customer. Your phone {phone} rings when they answer.", { phone: ring.your_phone })
      : gettext("Calling the customer."));
  }

  async function decline(id) {
    const entry = rings.get(id);
    if (!entry || !socket) return;
    entry.el.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    const res = await ask(socket, "call:decline", { call_id: id });
    removeRing(id, "declined");
    if (!res.ok && res.error && res.error.code !== "not_found") showError(res.error);
  }

  // ---- the call (the agent answers the visitor's offer) -------------------------------------
  const isFinal = (c) => !!c && FINAL.includes(c.state);

  function startCall(ring, call, iceServers) {
    if (current) endMedia();
    const pc = new RTCPeerConnection({ iceServers });
    current = { id: call.call_id, ring, call, pc, mic: null, signals: Promise.resolve(), connectedAt: 0 };
    clearCallerKeys();
    MA.pc = pc;
    MA.call = call;
    const id = call.call_id;
    pc.onicecandidate = (e) => {
      if (e.candidate && socket) socket.emit("rtc:signal", { call_id: id, candidate: e.candidate.toJSON() });
    };
    pc.ontrack = (e) => {
      const audio = $("remote-audio");
      audio.srcObject = e.streams[0] || new MediaStream([e.track]);
      audio.play().catch(() => { /* allowed after the click on Accept */ });
    };
    // A callback's audio comes from the gateway's media worker, which cannot restart ICE:
    // when this side's network changes or drops, the app restarts it and offers anew. On a
    // browser visitor's call the widget does (it made the first offer; one side only, so
    // the two never offer at once).
    let restarts = 0;
    let stalled = 0;
    let restarting = false;
    const failed = () => showError(gettext("The audio connection failed (no network path to the visitor)."));
    const ours = () => !!current && current.pc === pc && !isFinal(current.call) && current.call.channel === "callback";
    const restartIce = () => {
      if (!ours()) return;
      if (restarts >= ICE_RESTARTS) return failed();
      restarts++;
      restarting = true;
      pc.restartIce();
    };
    current.restart = () => {
      restarts = 0; // told to, not failing
      restartIce();
    };
    pc.oniceconnectionstatechange = () => {
      clearTimeout(stalled);
      const s = pc.iceConnectionState;
      if (s === "failed" && !ours() && current && current.pc === pc) failed();
      else if (s === "failed") restartIce();
      else if (s === "disconnected") stalled = setTimeout(restartIce, DISCONNECTED_GRACE_MS);
      else if (s === "connected" || s === "completed") restarts = 0;
    };
    pc.onnegotiationneeded = () => {
      if (!restarting || pc.signalingState !== "stable" || !current || current.pc !== pc) return;
      restarting = false;
      const cur = current;
      cur.signals = cur.signals
        .then(async () => {
          await pc.setLocalDescription(await pc.createOffer());
          const d = pc.localDescription;
          if (socket) socket.emit("rtc:signal", { call_id: cur.id, description: { type: d.type, sdp: d.sdp } });
        })
        .catch((e) => console.warn("ICE restart failed", e));
    };
    const cur = current;
    cur.media = navigator.mediaDevices
      .getUserMedia({ audio: true })
      .then((stream) => {
        if (current !== cur || pc.signalingState === "closed") return stream.getTracks().forEach((t) => t.stop());
        cur.mic = stream;
        for (const t of stream.getTracks()) pc.addTrack(t, stream);
      })
      .catch((e) => showError(gettext("Microphone unavailable: {reason}. The visitor will not hear you.", { reason: e.message || e.name })));
    $("mute").setAttribute("aria-pressed", "false");
    $("mute").textContent = gettext("Mute");
    renderCall(call);
    $("call").hidden = false;
    $("hangup").focus();
    for (const m of early.get(id) || []) onSignal(m);
    early.delete(id);
  }

  function onSignal(m) {
    if (!m || !m.call_id) return;
    if (!current || current.id !== m.call_id) {
      if (early.has(m.call_id)) early.get(m.call_id).push(m);
      return;
    }
    const cur = current;
    const pc = cur.pc;
    cur.signals = cur.signals
      .then(async () => {
        if (m.description) {
          await pc.setRemoteDescription(m.description);
          if (m.description.type === "offer") {
            await cur.media;
            await pc.setLocalDescription(await pc.createAnswer());
            const d = pc.localDescription;
            if (socket) socket.emit("rtc:signal", { call_id: cur.id, description: { type: d.type, sdp: d.sdp } });
          }
        } else if (m.candidate) {
          await pc.addIceCandidate(m.candidate);
        }
      })
      .catch((e) => console.warn("rtc:signal failed", e));
  }

  function onCallUpdate(c) {
    if (!c || !c.call_id) return;
    if (current && current.id === c.call_id) {
      current.call = MA.call = c;
      renderCall(c);
      if (isFinal(c)) endMedia();
    } else if (isFinal(c)) {
      removeRing(c.call_id, c.state);
    }
  }

  function renderCall(c) {
    const st = $("call-state");
    st.textContent = human(c.state);
    st.dataset.status = c.state;
    if (c.state === "connected" && !current.connectedAt) {
      const t = (c.timeline || []).find((x) => x.event === "connected");
      current.connectedAt = Math.min(Date.now(), (t && Date.parse(t.at)) || Date.now());
    }
    const v = (current.ring && current.ring.visitor) || {};
    const facts = [
      [gettext("Visitor"), v.last_agent ? gettext("Spoke with {agent} before", { agent: v.last_agent })
        : v.returning ? gettext("Returning visitor") : gettext("New visitor")],
      [gettext("Language"), v.language || gettext("unknown")],
      [gettext("Page"), v.page || gettext("unknown")],
      [gettext("Channel"), c.channel || (current.ring && current.ring.channel) || ""],
    ];
    if (v.phone) facts.push([gettext("Phone"), v.phone]);
    if (current.ring && current.ring.your_phone) facts.push([gettext("Your phone"), current.ring.your_phone]);
    $("call-visitor").replaceChildren(...facts.flatMap(([k, val]) => [h("dt", {}, k), h("dd", {}, val)]));
    $("timeline").replaceChildren(...(c.timeline || []).map((e) =>
      h("li", {}, h("time", { datetime: e.at || "" }, time(e.at)), " ", h("strong", {}, human(e.event)),
        e.detail ? h("span", { class: "muted" }, ` · ${e.detail}`) : null)));
    // A callback whose attempt ended (busy, no answer) goes back in line: done for this agent.
    const done = isFinal(c) || c.state === "scheduled" || c.state === "queued";
    const talking = !done && c.state === "connected" && !!current.pc;
    $("mute").hidden = !talking;
    $("hold").hidden = !talking;
    // Keys reach a phone (a callback bridged here); a visitor in a browser has no use for them.
    $("keypad").hidden = !talking || c.channel !== "callback";
    const held = (c.timeline || []).filter((e) => e.event === "on_hold" || e.event === "off_hold").pop();
    setHeld(!!held && held.event === "on_hold");
    $("hangup").hidden = done;
    $("dismiss").hidden = !done;
    // Once she has talked to the customer, she may promise to call them back.
    const promised = c.follow_up;
    const talkedToThem = c.state === "connected" || (c.state === "completed" && current.connectedAt);
    $("follow-up").hidden = !talkedToThem || !!promised;
    if (!$("follow-up").hidden && !$("follow-up-phone").value && c.phone) $("follow-up-phone").value = c.phone;
    $("follow-up-done").hidden = !promised;
    if (promised) {
      const at = new Date(promised.at).toLocaleString([], { weekday: "short", day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" });
      $("follow-up-done").textContent = gettext("Follow-up promised for {time}.", { time: at });
    }
    if (done && document.activeElement === $("hangup")) $("dismiss").focus();
    tickTimer();
  }

  function tickTimer() {
    if (!current) return;
    const live = current.call && current.call.state === "connected";
    if (current.connectedAt && live) current.endedAt = 0;
    else if (current.connectedAt && !current.endedAt) current.endedAt = Date.now();
    $("call-timer").textContent = current.connectedAt ? clock((current.endedAt || Date.now()) - current.connectedAt) : "";
  }

  function endMedia() {
    if (!current) return;
    if (current.pc) current.pc.close();
    if (current.mic) current.mic.getTracks().forEach((t) => t.stop());
    current.mic = null;
    $("remote-audio").srcObject = null;
  }

  async function hangup() {
    if (!current || !socket) return;
    $("hangup").disabled = true;
    const res = await ask(socket, "call:hangup", { call_id: current.id });
    $("hangup").disabled = false;
    if (res.ok && res.call) onCallUpdate(res.call);
    else if (!res.ok) showError(res.error);
    if (current && !isFinal(current.call)) {
      endMedia();
      current.call = { ...current.call, state: "completed" };
      renderCall(current.call);
    }
  }

  function toggleMute() {
    if (!current || !current.mic) return;
    const muted = $("mute").getAttribute("aria-pressed") !== "true";
    const held = $("hold").getAttribute("aria-pressed") === "true";
    for (const t of current.mic.getAudioTracks()) t.enabled = !muted && !held;
    $("mute").setAttribute("aria-pressed", String(muted));
    $("mute").textContent = muted ? gettext("Unmute") : gettext("Mute");
  }

  /** Hold in the app: microphone and speaker off (the gateway holds a bridged phone). */
  function setHeld(on) {
    $("hold").setAttribute("aria-pressed", String(on));
    $("hold").textContent = on ? gettext("Resume") : gettext("Hold");
    if (current && current.mic) {
      const muted = $("mute").getAttribute("aria-pressed") === "true";
      for (const t of current.mic.getAudioTracks()) t.enabled = !on && !muted;
    }
    $("remote-audio").muted = on;
  }

  async function toggleHold() {
    if (!current || !socket) return;
    const on = $("hold").getAttribute("aria-pressed") !== "true";
    const res = await ask(socket, "call:hold", { call_id: current.id, on });
    if (!res.ok) return showError(res.error);
    if (res.call && current && current.id === res.call.call_id) {
      current.call = MA.call = res.call;
      renderCall(res.call);
    }
  }

  /** A key to the phone: RFC 4733, which the gateway's bridge plays to the phone as a tone. */
  function pressKey(key) {
    const sender = current && current.pc && current.pc.getSenders().find((s) => s.dtmf);
    if (sender && sender.dtmf.canInsertDTMF) sender.dtmf.insertDTMF(key, 100, 70);
    else showError(gettext("Keys cannot be sent in this call."));
  }

  /** A key the customer pressed on their phone (an account number, a choice): shown, never kept. */
  function onCallerKey(m) {
    if (!m || !current || m.call_id !== current.id) return;
    current.keys = ((current.keys || "") + m.key).slice(-32);
    $("caller-keys-value").textContent = current.keys;
    $("caller-keys").hidden = false;
  }

  function clearCallerKeys() {
    $("caller-keys").hidden = true;
    $("caller-keys-value").textContent = "";
  }

  async function promiseFollowUp(event) {
    event.preventDefault();
    if (!current || !socket) return;
    const at = new Date($("follow-up-at").value);
    if (isNaN(at.getTime())) return showError(gettext("Pick a time for the follow-up."));
    const payload = { call_id: current.id, at: at.toISOString(), note: $("follow-up-note").value.trim() };
    const phone = $("follow-up-phone").value.trim();
    if (phone) payload.phone = phone;
    const res = await ask(socket, "call:follow_up", payload);
    if (!res.ok) return showError(res.error);
    clearError();
    current.call = MA.call = res.call;
    renderCall(res.call);
    announce(gettext("Follow-up promised."));
  }

  function dismiss() {
    $("follow-up").reset();
    current = null;
    clearCallerKeys();
    $("call").hidden = true;
    $("state").focus();
  }

  // ---- supervisor board ---------------------------------------------------------------------
  let boardSock = null;
  const boardAgents = new Map();
  const boardCalls = new Map();

  function openBoard() {
    if (boardSock || !token) return;
    const s = window.io(`${location.origin}/board`, { auth: { token }, transports: ["websocket"] });
    boardSock = MA.board = s;
    $("board-conn").textContent = gettext("connecting…");
    s.on("connect", async () => {
      $("board-conn").textContent = gettext("live");
      const res = await ask(s, "board:snapshot", {});
      if (!res.ok) return showError(res.error);
      boardAgents.clear();
      for (const p of res.agents || []) boardAgents.set(p.agent_id, p);
      for (const c of res.calls || []) boardCalls.set(c.call_id, c);
      renderBoard();
    });
    s.on("connect_error", (err) => {
      const why = refusal(err);
      if (why && why.code === "draining") return reconnectElsewhere(s, () => boardSock === s);
      $("board-conn").textContent = why ? gettext("refused") : gettext("reconnecting…");
      if (why) showError(why);
    });
    s.on("disconnect", () => { $("board-conn").textContent = gettext("reconnecting…"); });
    s.on("presence:update", (p) => {
      if (p && p.agent_id) { boardAgents.set(p.agent_id, p); renderBoard(); }
    });
    s.on("call:update", (c) => {
      if (c && c.call_id) { c._seen = Date.now(); boardCalls.set(c.call_id, c); renderBoard(); }
    });
  }

  function renderBoard() {
    const rank = (p) => { const i = STATUS_ORDER.indexOf(p.status); return i < 0 ? 99 : i; };
    const agents = [...boardAgents.values()].sort((a, b) => rank(a) - rank(b) || String(a.name).localeCompare(b.name));
    $("board-table").tBodies[0].replaceChildren(...agents.map((p) => h("tr", { "data-agent": p.agent_id },
      h("td", {}, p.name || p.agent_id),
      h("td", {}, p.branch || ""),
      h("td", {}, h("span", { class: "pill small", "data-status": p.status }, human(p.status))),
      h("td", {}, (p.channels || []).map(channelName).join(", ") || "—"),
      h("td", { title: p.since || "" }, p.since ? ago(p.since) : ""))));
    const cutoff = Date.now() - 120000; // finished calls stay on the board for two minutes
    for (const [id, c] of boardCalls) if (isFinal(c) && (c._seen || 0) < cutoff) boardCalls.delete(id);
    const calls = [...boardCalls.values()].reverse();
    $("calls-table").tBodies[0].replaceChildren(...calls.map((c) => h("tr", {},
      h("td", { title: c.call_id }, String(c.call_id).slice(0, 8)),
      h("td", {}, c.channel || ""),
      h("td", {}, h("span", { class: "pill small", "data-status": c.state }, human(c.state))),
      h("td", {}, c.agent ? `${c.agent.name}${c.agent.branch ? `, ${c.agent.branch}` : ""}` : "—"),
      h("td", {}, c._seen ? gettext("{ago} ago", { ago: ago(new Date(c._seen).toISOString()) }) : ""))));
    $("calls-empty").hidden = calls.length > 0;
  }

  // ---- tabs ---------------------------------------------------------------------------------
  function selectTab(name) {
    for (const [tab, panel] of [["me", "me-panel"], ["board", "board-panel"]]) {
      const on = tab === name;
      $(`tab-${tab}`).setAttribute("aria-selected", String(on));
      $(`tab-${tab}`).tabIndex = on ? 0 : -1;
      $(panel).hidden = !on;
    }
    if (name === "board") openBoard();
  }

  // ---- wiring -------------------------------------------------------------------------------
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn($("token").value);
  });
  $("token").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); signIn($("token").value); }
  });
  $("signout").addEventListener("click", signOut);
  $("state").addEventListener("change", setOwnState);
  $("mute").addEventListener("click", toggleMute);
  $("hold").addEventListener("click", toggleHold);
  $("keypad").addEventListener("click", (e) => {
    const key = e.target && e.target.dataset && e.target.dataset.key;
    if (key) pressKey(key);
  });
  $("hangup").addEventListener("click", hangup);
  $("dismiss").addEventListener("click", dismiss);
  $("follow-up").addEventListener("submit", promiseFollowUp);
  $("tab-me").addEventListener("click", () => selectTab("me"));
  $("tab-board").addEventListener("click", () => selectTab("board"));
  document.querySelector('[role="tablist"]').addEventListener("keydown", (e) => {
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
    if ($("tab-board").hidden) return;
    const next = $("tab-me").getAttribute("aria-selected") === "true" ? "board" : "me";
    selectTab(next);
    $(`tab-${next}`).focus();
  });
  setInterval(tickTimer, 1000);
  setInterval(() => { // refresh the "since" and "seen … ago" texts
    if (!$("board-panel").hidden) renderBoard();
    if (presence && !$("devices").contains(document.activeElement)) renderPresence(presence);
  }, 15000);
  window.addEventListener("beforeunload", (e) => {
    if (current && !isFinal(current.call)) e.preventDefault();
  });

  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) history.replaceState(null, "", location.pathname + location.search); // keep it out of history
  const saved = fromHash || session.get(TOKEN_KEY);
  loadCatalogue().then(() => {
    if (saved) {
      $("token").value = saved;
      signIn(saved);
    } else {
      showSignIn();
    }
  });
})();
