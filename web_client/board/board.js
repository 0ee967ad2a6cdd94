/* Membrane supervisor board: who is reachable now and on which device, what is ringing,
 * talking and waiting (live, over socket.io /board, across every node), and the figures from
 * the call history as charts (GET /v1/sites/{site}/figures), plus the site's routing
 * experiment. See web_client/README.md and docs/PROTOCOL.md. */
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "membrane.board.token"; // sessionStorage: gone when the tab closes
  const FINAL = ["completed", "failed", "canceled"];
  const WAITING = ["queued", "scheduled"];
  const STATUS_ORDER = ["available", "on_call", "busy", "away", "dnd", "offline"];
  const REFRESH_MS = 30000;
  let catalogue = {};
  const N_ = (id) => id;
  function gettext(id, params) {
    const text = catalogue[id] || id;
    return params ? text.replace(/\{(\w+)\}/g, (m, k) => (k in params ? String(params[k]) : m)) : text;
  }
  N_("available"); N_("on call"); N_("busy"); N_("away"); N_("dnd"); N_("offline");
  N_("queued"); N_("scheduled"); N_("ringing"); N_("dialing"); N_("connected");
  N_("desktop"); N_("mobile"); N_("im");
  N_("browser"); N_("callback");
  const MEASURES = {
    time_to_first_human_s: N_("Time to the first human (s)"),
    abandonment: N_("Gave up (%)"),
    nps: N_("NPS"),
  };
  const VERDICTS = {
    too_early: N_("Too early to tell"),
    no_difference_yet: N_("No difference shown yet"),
    variant_better: N_("The variant is better"),
    variant_worse: N_("The variant is worse"),
  };
  const POLICIES = { best_nps: N_("the agents with the best NPS first"), mobile_first: N_("agents on mobile first") };

  /** Exposed for tests and for a look from the console. */
  const MB = (window.MembraneBoard = {
    socket: null, charts: {}, agents: new Map(), calls: new Map(), figures: null, experiment: null, loaded: 0,
  });

  let token = null;
  let claims = null; // decoded for display only; the gateway checks the signature
  let span = "day";
  let refreshTimer = 0;
  let soonTimer = 0;

  function h(name, props, ...kids) {
    const el = document.createElement(name);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null || v === false) continue;
      if (k === "text") el.textContent = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    el.append(...kids.filter((x) => x != null));
    return el;
  }
  const human = (s) => gettext(String(s || "").replace(/_/g, " "));
  const channelName = (c) => gettext(c === "webrtc" ? "browser" : c === "pstn" ? "phone" : c);
  function ago(iso) {
    const t = Date.parse(iso);
    if (isNaN(t)) return "";
    const s = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }
  const clockTime = (iso) => {
    const d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleString([], { weekday: "short", hour: "2-digit", minute: "2-digit" });
  };
  const errorText = (e) => {
    const what = (e && e.message) || gettext("Something went wrong");
    return e && e.code ? `${what} (${e.code})` : what;
  };
  function showError(e) {
    $("error").textContent = typeof e === "string" ? e : errorText(e);
    $("error").hidden = false;
  }
  const clearError = () => { $("error").hidden = true; $("error").textContent = ""; };
  const session = {
    get: (k) => { try { return sessionStorage.getItem(k); } catch { return null; } },
    set: (k, v) => { try { v == null ? sessionStorage.removeItem(k) : sessionStorage.setItem(k, v); } catch { /* blocked */ } },
  };

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

  function refusal(err) {
    if (err && err.data && err.data.code) return err.data;
    const text = (err && err.message) || "";
    const code = /["']code["']: ["'](\w+)["']/.exec(text);
    if (!code) return null;
    const message = /["']message["']: ["']([^"']*)["']/.exec(text);
    return { code: code[1], message: message ? message[1] : text };
  }

  async function api(method, path, body) {
    const r = await fetch(path, {
      method,
      headers: { Authorization: `Bearer ${token}`, ...(body ? { "Content-Type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
      signal: AbortSignal.timeout(15000),
    });
    const answer = await r.json().catch(() => ({}));
    if (!r.ok) throw (answer && answer.error) || { code: String(r.status), message: r.statusText };
    return answer;
  }

  // ---- sign in ------------------------------------------------------------------------------
  function showSignIn(error) {
    $("signin-view").hidden = false;
    $("board-view").hidden = true;
    $("who").hidden = true;
    if (error) showError(error);
    $("token").focus();
  }

  function signIn(t) {
    t = (t || "").trim();
    const c = decodeJwt(t);
    if (!c) return showSignIn(gettext("That does not look like a Membrane token (a JWT with three parts)."));
    if (c.role !== "supervisor") return showSignIn(gettext("The board is for supervisors: this token is not a supervisor's."));
    if (c.exp && c.exp * 1000 < Date.now() - 60000) {
      session.set(TOKEN_KEY, null);
      return showSignIn(gettext("This token has expired. Mint a new one with {command}.", { command: ".venv/bin/membrane token --agent <supervisor id>" }));
    }
    if (typeof window.io !== "function" || typeof window.Chart !== "function") {
      return showSignIn(gettext("The page's scripts did not load."));
    }
    clearError();
    token = t;
    claims = c;
    session.set(TOKEN_KEY, t);
    $("signin-view").hidden = true;
    $("board-view").hidden = false;
    $("who").hidden = false;
    $("site-name").textContent = c.site || "";
    connect();
    loadFigures();
    loadExperiment();
    clearInterval(refreshTimer);
    refreshTimer = setInterval(() => { loadFigures(); loadExperiment(); }, REFRESH_MS);
  }

  function signOut() {
    if (MB.socket) MB.socket.disconnect();
    MB.socket = null;
    clearInterval(refreshTimer);
    session.set(TOKEN_KEY, null);
    token = claims = null;
    showSignIn();
  }

  // ---- live: agents, calls, the callback queue ------------------------------------------------
  function connect() {
    if (MB.socket) MB.socket.disconnect();
    const s = window.io(`${location.origin}/board`, { auth: { token }, transports: ["websocket"] });
    MB.socket = s;
    const conn = (text) => { $("conn").textContent = text; };
    conn(gettext("connecting…"));
    s.on("connect", async () => {
      conn(gettext("live"));
      let res;
      try {
        res = await s.timeout(10000).emitWithAck("board:snapshot", {});
      } catch {
        res = { ok: false, error: { code: "timeout", message: gettext("The gateway did not answer") } };
      }
      if (!res || !res.ok) return showError(res && res.error);
      MB.agents.clear();
      MB.calls.clear();
      for (const p of res.agents || []) MB.agents.set(p.agent_id, p);
      for (const c of res.calls || []) MB.calls.set(c.call_id, c);
      renderLive();
    });
    s.on("connect_error", (err) => {
      const why = refusal(err);
      if (why && why.code === "draining") {
        conn(gettext("reconnecting…"));
        s.disconnect();
        setTimeout(() => { if (MB.socket === s) s.connect(); }, 500 + Math.random() * 1000);
        return;
      }
      conn(why ? gettext("refused") : gettext("reconnecting…"));
      if (why) showError(why);
    });
    s.on("disconnect", () => conn(gettext("reconnecting…")));
    s.on("presence:update", (p) => {
      if (p && p.agent_id) { MB.agents.set(p.agent_id, p); renderLive(); }
    });
    s.on("call:update", (c) => {
      if (!c || !c.call_id) return;
      if (FINAL.includes(c.state)) {
        MB.calls.delete(c.call_id);
        figuresSoon(); // an ended call is in the history a moment later
      } else {
        MB.calls.set(c.call_id, c);
      }
      renderLive();
    });
  }

  /** When the call last changed state (its newest timeline entry). */
  const lastChange = (c) => (c.timeline && c.timeline.length ? c.timeline[c.timeline.length - 1].at : null);

  function renderLive() {
    const rank = (p) => { const i = STATUS_ORDER.indexOf(p.status); return i < 0 ? 99 : i; };
    const agents = [...MB.agents.values()].sort((a, b) => rank(a) - rank(b) || String(a.name).localeCompare(b.name));
    const reachable = agents.filter((p) => p.status === "available").length;
    $("agents-count").textContent = gettext("{free} of {all} free", { free: reachable, all: agents.length });
    $("agents-table").tBodies[0].replaceChildren(...agents.map((p) => h("tr", { "data-agent": p.agent_id },
      h("td", { text: p.name || p.agent_id }),
      h("td", { text: p.branch || "" }),
      h("td", {}, h("span", { class: "pill", "data-status": p.status, text: human(p.status) })),
      h("td", { text: (p.devices || []).filter((d) => d.state !== "offline")
        .map((d) => `${human(d.kind)} (${human(d.state)})`).join(", ") || "—" }),
      h("td", { title: p.since || "", text: p.since ? ago(p.since) : "" }))));

    const all = [...MB.calls.values()];
    const waiting = all.filter((c) => c.channel === "callback" && WAITING.includes(c.state))
      .sort((a, b) => String(a.promised_at || a.scheduled_at || "").localeCompare(String(b.promised_at || b.scheduled_at || "")));
    const active = all.filter((c) => !waiting.includes(c));
    $("calls-count").textContent = active.length ? String(active.length) : "";
    $("calls-table").tBodies[0].replaceChildren(...active.map((c) => h("tr", { "data-call": c.call_id },
      h("td", { title: c.call_id, text: String(c.call_id).slice(0, 10) }),
      h("td", { text: channelName(c.channel) }),
      h("td", {}, h("span", { class: "pill", "data-status": c.state, text: human(c.state) })),
      h("td", { text: c.agent ? `${c.agent.name}${c.agent.branch ? `, ${c.agent.branch}` : ""}` : "—" }),
      h("td", { text: ago(lastChange(c)) }))));
    $("calls-empty").hidden = active.length > 0;
    $("queue-count").textContent = waiting.length ? String(waiting.length) : "";
    const now = Date.now();
    $("queue-table").tBodies[0].replaceChildren(...waiting.map((c) => {
      const promised = c.promised_at || c.scheduled_at;
      const late = promised && Date.parse(promised) < now;
      return h("tr", { "data-call": c.call_id },
        h("td", { title: c.call_id, text: String(c.call_id).slice(0, 10) }),
        h("td", { text: c.phone || "" }),
        h("td", {}, h("span", { class: "pill", "data-status": c.state, text: human(c.state) })),
        h("td", { class: late ? "late" : null, "data-promised": promised || "", text: promised ? clockTime(promised) : "—" }));
    }));
    $("queue-empty").hidden = waiting.length > 0;
  }

  // ---- figures ------------------------------------------------------------------------------
  function figuresSoon() {
    // The node that ended the call writes it to the history in the background: look
    // twice, a moment later and a little later.
    clearTimeout(soonTimer);
    soonTimer = setTimeout(() => { loadFigures(); soonTimer = setTimeout(loadFigures, 5000); }, 1500);
  }

  async function loadFigures() {
    if (!token) return;
    try {
      const f = await api("GET", `/v1/sites/${encodeURIComponent(claims.site)}/figures?span=${span}`);
      MB.figures = f;
      renderFigures(f);
      MB.loaded += 1;
      $("figures-at").textContent = new Date().toLocaleTimeString();
    } catch (e) {
      showError(e);
    }
  }

  function slotLabels(f) {
    const start = Date.parse(f.start);
    return Array.from({ length: f.slots }, (_, i) => {
      const d = new Date(start + i * f.step_s * 1000);
      return f.span === "week"
        ? d.toLocaleString([], { weekday: "short", hour: "2-digit" })
        : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    });
  }

  const COLORS = { blue: "#0b57d0", teal: "#00796b", red: "#b3261e", amber: "#e37400", grey: "#80868b", green: "#137333" };

  function chart(id, config) {
    const existing = MB.charts[id];
    if (existing) {
      existing.data = config.data;
      existing.update("none");
      return existing;
    }
    config.options = {
      responsive: true, maintainAspectRatio: false, animation: false, normalized: true,
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
      ...config.options,
    };
    MB.charts[id] = new window.Chart($(id), config);
    return MB.charts[id];
  }

  function renderFigures(f) {
    const t = f.totals;
    const secs = (x) => (x == null ? "–" : `${x} s`);
    $("t-requests").textContent = String(t.requests);
    $("t-p50").textContent = secs(t.to_human_p50);
    $("t-p90").textContent = secs(t.to_human_p90);
    $("t-abandoned").textContent = String(t.abandoned);
    $("t-ontime").textContent = t.on_time_pct == null ? "–" : `${t.on_time_pct}%`;
    const answers = f.nps.branches.reduce((n, r) => n + r.responses, 0);
    const net = f.nps.branches.reduce((n, r) => n + r.promoters - r.detractors, 0);
    $("t-nps").textContent = answers ? String(Math.round((100 * net) / answers)) : "–";

    const labels = slotLabels(f);
    const stacked = { x: { stacked: true, ticks: { maxTicksLimit: 8 } }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } };
    chart("c-to-human", {
      type: "line",
      data: { labels, datasets: [
        { label: gettext("median"), data: f.to_human_p50, borderColor: COLORS.blue, backgroundColor: COLORS.blue, spanGaps: true, pointRadius: 2 },
        { label: gettext("90%"), data: f.to_human_p90, borderColor: COLORS.amber, backgroundColor: COLORS.amber, spanGaps: true, pointRadius: 2 },
      ] },
      options: { scales: { x: { ticks: { maxTicksLimit: 8 } }, y: { beginAtZero: true } } },
    });
    chart("c-outcomes", {
      type: "bar",
      data: { labels, datasets: [
        { label: gettext("reached"), data: f.reached, backgroundColor: COLORS.teal },
        { label: gettext("gave up"), data: f.abandoned, backgroundColor: COLORS.red },
        { label: gettext("nobody free"), data: f.failed, backgroundColor: COLORS.grey },
      ] },
      options: { scales: stacked },
    });
    chart("c-on-time", {
      type: "line",
      data: { labels, datasets: [
        { label: gettext("on time"), data: f.on_time_pct, borderColor: COLORS.green, backgroundColor: COLORS.green, spanGaps: true, pointRadius: 2 },
      ] },
      options: { scales: { x: { ticks: { maxTicksLimit: 8 } }, y: { min: 0, max: 100 } } },
    });
    const channels = Object.keys(f.by_channel).sort();
    chart("c-channels", {
      type: "bar",
      data: { labels, datasets: channels.map((c, i) => ({
        label: channelName(c), data: f.by_channel[c], backgroundColor: [COLORS.blue, COLORS.amber, COLORS.teal][i % 3],
      })) },
      options: { scales: stacked },
    });
    const npsChart = (id, rows) => chart(id, {
      type: "bar",
      data: {
        labels: rows.map((r) => r.name),
        datasets: [{
          label: gettext("NPS"),
          data: rows.map((r) => r.nps),
          backgroundColor: rows.map((r) => (r.nps >= 0 ? COLORS.teal : COLORS.red)),
        }],
      },
      options: {
        indexAxis: "y",
        scales: { x: { min: -100, max: 100 } },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { afterLabel: (ctx) => gettext("{n} answers", { n: rows[ctx.dataIndex].responses }) } },
        },
      },
    });
    npsChart("c-nps-branches", f.nps.branches);
    npsChart("c-nps-agents", f.nps.agents);
  }

  // ---- the routing experiment -----------------------------------------------------------------
  async function loadExperiment() {
    if (!token) return;
    try {
      renderExperiment(await api("GET", `/v1/sites/${encodeURIComponent(claims.site)}/experiment`));
    } catch (e) {
      showError(e);
    }
  }

  function estimate(e, measure) {
    if (!e || e.value == null) return gettext("n = {n}", { n: e ? e.n : 0 });
    const pct = measure === "abandonment" ? 100 : 1;
    const f = (x) => (x * pct).toFixed(1);
    return `${f(e.value)} [${f(e.low)}, ${f(e.high)}] · n = ${e.n}`;
  }

  function renderExperiment(report) {
    MB.experiment = report;
    const x = report.experiment;
    const running = x && x.running;
    $("experiment-form").hidden = Boolean(running);
    $("x-stop").hidden = !running;
    if (!x) {
      $("experiment-status").textContent = gettext("No experiment yet.");
      $("experiment-table").hidden = true;
      return;
    }
    const share = `${Math.round(x.share * 1000) / 10}%`;
    const policy = gettext(POLICIES[x.variant] || x.variant);
    $("experiment-status").textContent = running
      ? gettext("Running since {since}: {share} of requests go to {policy}. Intervals at {confidence}%; no verdict before {min} per arm.",
        { since: clockTime(x.started_at), share, policy, confidence: Math.round(report.confidence * 100), min: report.min_samples })
      : gettext("Stopped at {at}: {share} of requests went to {policy}. Everyone is routed as usual.",
        { at: clockTime(x.stopped_at), share, policy });
    $("experiment-table").hidden = false;
    $("experiment-table").tBodies[0].replaceChildren(...report.measures.map((m) => h("tr", { "data-measure": m.measure },
      h("th", { scope: "row", text: gettext(MEASURES[m.measure] || m.measure) }),
      h("td", { class: "num", text: estimate(m.control, m.measure) }),
      h("td", { class: "num", text: estimate(m.variant, m.measure) }),
      h("td", { class: "num", text: estimate(m.difference, m.measure) }),
      h("td", { class: `verdict-${m.verdict}`, "data-verdict": m.verdict, text: gettext(VERDICTS[m.verdict] || m.verdict) }))));
  }

  async function startExperiment(e) {
    e.preventDefault();
    const share = Number($("x-share").value) / 100;
    const variant = $("x-variant").value;
    try {
      await api("PUT", `/v1/sites/${encodeURIComponent(claims.site)}/experiment`, { variant, share, name: variant });
      clearError();
    } catch (err) {
      showError(err);
    }
    loadExperiment();
  }

  async function stopExperiment() {
    try {
      renderExperiment(await api("DELETE", `/v1/sites/${encodeURIComponent(claims.site)}/experiment`));
      clearError();
    } catch (err) {
      showError(err);
    }
  }

  // ---- wiring -------------------------------------------------------------------------------
  $("signin-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("token").value); });
  $("signout").addEventListener("click", signOut);
  $("experiment-form").addEventListener("submit", startExperiment);
  $("x-stop").addEventListener("click", stopExperiment);
  for (const b of document.querySelectorAll(".span")) {
    b.addEventListener("click", () => {
      span = b.dataset.span;
      for (const o of document.querySelectorAll(".span")) o.setAttribute("aria-pressed", String(o === b));
      loadFigures();
    });
  }
  setInterval(() => { if (token) renderLive(); }, 15000); // the "since" texts

  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) history.replaceState(null, "", location.pathname + location.search);
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
