// The kvlink receiver's dashboard: plain JavaScript, no build step, nothing from another host.
//
// It reads the receiver's REST API every POLL_MS with the operator's bearer token:
//   GET /v1/info       the model, the caller's identity           -> header
//   GET /v1/limits     the limits, whether a fleet store is shared -> "Limits"
//   GET /v1/stats      totals, per-config aggregates, store, calls (?scope=fleet with a shared store)
//   GET /v1/messages   the latest records, newest first            -> "Messages" and the plot
// The token comes from the URL fragment (/#token=..., which browsers never send to the server) or the
// form; it is kept in sessionStorage (this tab only) and the fragment is taken out of the address bar.
// Without a token the receiver accepts, the page shows why and no data: every rendered value is
// removed. Text from the receiver (questions, answers, ids) is only ever set as textContent.
(function () {
  "use strict";

  const POLL_MS = 2000;
  const MESSAGES_SHOWN = 50;
  const TOKEN_KEY = "kvlink-dashboard-token";
  const SVG_NS = "http://www.w3.org/2000/svg"; // a namespace name, not a URL that is fetched
  const CATEGORIES = ["payload", "metadata", "framing", "signaling"];
  const SENDER_STAGES = ["plan_s", "prefill_s", "select_s", "quantize_s", "pack_s", "transfer_s"];
  const FAMILY_CLASSES = 8;

  const state = {
    token: null,
    timer: null,
    seen: new Set(), // message keys already shown: a new one is highlighted once
    families: new Map(), // config family -> class index, in order of first appearance
    last: null, // the latest data, redrawn when the plot's axis changes
    generation: 0, // bumped when the token changes: late replies of an older one are dropped
    busy: false, // a poll is running
    again: false, // another was asked for meanwhile
  };

  class AuthError extends Error {}

  // --- DOM helpers: elements from tags, attributes and children (strings become text nodes) -------------
  function build(ns, tag, attrs, children) {
    const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const el = (tag, attrs, ...children) => build(null, tag, attrs, children);
  const svg = (tag, attrs, ...children) => build(SVG_NS, tag, attrs, children);
  const $ = (id) => document.getElementById(id);

  // A config label, breakable after each "+" and "/" of its grammar (never inside a token).
  function configLabel(label) {
    const code = el("code", {});
    label.split(/(?<=[+/])/).forEach((part, i) => {
      if (i) code.append(el("wbr", {}));
      code.append(part);
    });
    return code;
  }
  const shortId = (id) => (id.length > 14 ? `${id.slice(0, 12)}…` : id);

  // --- formatting ---------------------------------------------------------------------------------
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let value = n;
    let unit = 0;
    while (Math.abs(value) >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(value >= 100 ? 0 : 1)} ${units[unit]}`;
  }
  const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const count = (n, noun) => `${fmtInt(n)} ${noun}${n === 1 ? "" : "s"}`;
  const fmtPct = (p) => (p === null || p === undefined ? "–" : `${p.toFixed(p < 10 ? 2 : 1)}%`);
  const fmtRatio = (r) => (r === null || r === undefined ? "–" : `${r.toFixed(1)}×`);
  const fmtScore = (s) => (s === null || s === undefined ? "–" : s.toFixed(2));
  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 0.001) return `${(s * 1e6).toFixed(0)} µs`;
    if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
    return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  }
  function fmtDuration(s) {
    if (s < 120) return `${Math.round(s)} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  }
  const fmtTime = (epoch) => new Date(epoch * 1000).toLocaleTimeString("en-GB", { hour12: false });
  const stageName = (key) => key.replace(/_s$/, "");

  function familyClass(family) {
    if (!state.families.has(family)) state.families.set(family, state.families.size % FAMILY_CLASSES);
    return `f${state.families.get(family)}`;
  }

  // --- the token ------------------------------------------------------------------------------------
  function tokenFromFragment() {
    const fragment = window.location.hash.replace(/^#/, "");
    let token = null;
    let given = false;
    for (const part of fragment.split("&")) {
      const eq = part.indexOf("=");
      if (eq > 0 && part.slice(0, eq) === "token") {
        given = true;
        try {
          token = decodeURIComponent(part.slice(eq + 1)).trim(); // not form encoding: a "+" stays a "+"
        } catch (err) {
          token = null;
        }
      }
    }
    if (given) {
      // Out of the address bar (and so out of history and bookmarks): the token lives in this tab only.
      window.history.replaceState(null, "", window.location.pathname + window.location.search);
    }
    return token || null;
  }

  function storedToken() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY);
    } catch (err) {
      return null; // storage refused (a privacy mode): the token lasts as long as the page
    }
  }

  function keepToken(token) {
    state.token = token;
    state.generation += 1;
    try {
      if (token) window.sessionStorage.setItem(TOKEN_KEY, token);
      else window.sessionStorage.removeItem(TOKEN_KEY);
    } catch (err) {
      // kept in memory only
    }
    $("forget-token").hidden = !token;
  }

  // --- the REST API ---------------------------------------------------------------------------------
  async function api(path) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    let reply;
    try {
      reply = await fetch(path, { headers, cache: "no-store", credentials: "omit", redirect: "error" });
    } catch (err) {
      throw new Error(`the receiver did not answer ${path} (${err.message})`);
    }
    if (reply.status === 401) throw new AuthError(await detail(reply));
    if (!reply.ok) throw new Error(`${path}: HTTP ${reply.status} ${await detail(reply)}`);
    return reply.json();
  }

  async function detail(reply) {
    try {
      const body = await reply.json();
      return typeof body.detail === "string" ? body.detail : "";
    } catch (err) {
      return "";
    }
  }

  async function load() {
    const [info, limits, messages] = await Promise.all([
      api("/v1/info"),
      api("/v1/limits"),
      api(`/v1/messages?limit=${MESSAGES_SHOWN}`),
    ]);
    let stats;
    let fleetError = null;
    if (limits.shared_store) {
      try {
        stats = await api("/v1/stats?scope=fleet");
      } catch (err) {
        if (err instanceof AuthError) throw err;
        fleetError = err.message; // the store is down: this replica's figures still show
        stats = await api("/v1/stats");
      }
    } else {
      stats = await api("/v1/stats");
    }
    return { info, limits, messages, stats, fleetError };
  }

  // --- states: locked (no usable token), live, error ------------------------------------------------
  function setStatus(kind, text) {
    const status = $("status");
    status.dataset.state = kind;
    status.textContent = text;
  }

  function clearData() {
    for (const id of ["receiver", "totals", "plot", "plot-note", "plot-legend", "messages-note", "store", "fleet",
      "limits", "calls", "errors"]) {
      $(id).replaceChildren();
    }
    for (const id of ["configs", "messages"]) $(id).tBodies[0].replaceChildren();
    state.seen.clear();
    state.last = null;
  }

  function lock(reason, message) {
    stop();
    clearData();
    $("dashboard").hidden = true;
    $("banner").hidden = true;
    const auth = $("auth");
    auth.hidden = false;
    auth.dataset.state = reason;
    $("auth-title").textContent = reason === "refused" ? "Token refused" : "Token required";
    $("auth-message").textContent =
      reason === "refused"
        ? `The receiver refused this token${message ? ` (${message})` : ""}. Enter a valid one: nothing is shown without it.`
        : "This receiver needs a bearer token (kvlink-serve --auth-token-file or --tenants-file). Enter it " +
          "below: nothing is shown without it.";
    setStatus("locked", reason === "refused" ? "token refused" : "token required");
    $("token-input").focus();
  }

  function stop() {
    if (state.timer !== null) window.clearTimeout(state.timer);
    state.timer = null;
  }

  // One poll at a time: a refresh asked for while one runs (a token typed, the tab shown again) runs
  // right after it, so that there is never more than one timer.
  async function refresh() {
    if (state.busy) {
      state.again = true;
      return;
    }
    state.busy = true;
    stop();
    try {
      await poll();
    } finally {
      state.busy = false;
    }
    if (state.again) {
      state.again = false;
      refresh();
    }
  }

  async function poll() {
    const generation = state.generation;
    try {
      const data = await load();
      if (generation !== state.generation) return;
      $("auth").hidden = true;
      $("banner").hidden = true;
      $("dashboard").hidden = false;
      state.last = data;
      render(data);
      const serving = data.info.status === "serving";
      setStatus(serving ? "live" : "stopping", `${serving ? "live" : data.info.status} · ${fmtTime(Date.now() / 1000)}`);
    } catch (err) {
      if (generation !== state.generation) return;
      if (err instanceof AuthError) {
        lock(state.token ? "refused" : "required", err.message);
        return; // no polling without a usable token: the form starts it again
      }
      // The receiver is restarting or unreachable: keep the last figures, say so, and keep trying.
      const banner = $("banner");
      banner.hidden = false;
      banner.textContent = `Not updated: ${err.message}`;
      setStatus("error", "not updated");
    }
    if (!document.hidden) state.timer = window.setTimeout(refresh, POLL_MS);
  }

  // --- rendering --------------------------------------------------------------------------------------
  function render(data) {
    renderReceiver(data.info);
    renderTotals(data.stats, data.messages);
    renderPlot(data.messages, data.stats.configs);
    renderConfigs(data.stats.configs);
    renderMessages(data.messages, data.stats, data.info);
    renderStore(data.stats, data.fleetError);
    renderLimits(data.limits);
    renderCalls(data.stats);
  }

  function renderReceiver(info) {
    const who = info.operator ? `${info.identity} (operator)` : info.identity;
    $("receiver").replaceChildren(
      el("strong", {}, info.model), ` · fingerprint `, el("code", { title: info.fingerprint }, info.fingerprint.slice(0, 12)),
      ` · ${info.device} · up ${fmtDuration(info.uptime_s)} · auth ${info.auth} · as ${who}`,
    );
  }

  function renderTotals(stats, messages) {
    const scored = messages.flatMap((m) => m.asks).filter((a) => a.f1 !== null);
    const f1 = scored.length ? scored.reduce((s, a) => s + a.f1, 0) / scored.length : null;
    const wire = stats.bytes.total;
    const items = [
      ["messages", fmtInt(stats.messages)],
      ["questions", fmtInt(stats.questions)],
      ["wire bytes", fmtBytes(wire), `${fmtInt(wire)} B`],
      ["FP16 bytes", fmtBytes(stats.fp16_bytes), `${fmtInt(stats.fp16_bytes)} B`],
      ["% of FP16", fmtPct(stats.fp16_bytes ? (100 * wire) / stats.fp16_bytes : null)],
      ["compression", fmtRatio(stats.compression_ratio)],
      ["F1 (latest scored)", fmtScore(f1), `${scored.length} scored answers among the latest messages`],
      ["refusals", fmtInt(Object.values(stats.errors).reduce((s, n) => s + n, 0))],
    ];
    $("totals").replaceChildren(
      ...items.map(([label, value, title]) =>
        el("div", { class: "total", title }, el("span", { class: "value" }, value), el("span", { class: "label" }, label)),
      ),
    );
  }

  function meanF1(message) {
    const scored = message.asks.filter((a) => a.f1 !== null);
    return scored.length ? scored.reduce((s, a) => s + a.f1, 0) / scored.length : null;
  }

  function meanEM(message) {
    const scored = message.asks.filter((a) => a.exact_match !== null);
    return scored.length ? scored.reduce((s, a) => s + a.exact_match, 0) / scored.length : null;
  }

  // The plot: one point per message whose answers were scored (F1 against the reference answers given
  // with the question), x its wire bytes (or % of FP16) on a log scale; a ring per config at its mean,
  // and the frontier of the configs (the best F1 reached at or below each size).
  function renderPlot(messages, configs) {
    const percent = $("plot-axis").value === "percent";
    const xOf = (bytes, pct) => (percent ? pct : bytes);
    const points = messages
      .map((m) => ({ m, x: xOf(m.bytes.total, m.percent_of_fp16), y: meanF1(m) }))
      .filter((p) => p.y !== null && p.x > 0);
    const means = Object.entries(configs)
      .map(([label, g]) => ({ label, g, x: xOf(g.bytes_per_message.total, g.percent_of_fp16), y: g.f1_mean }))
      .filter((p) => p.y !== null && p.x > 0);

    // Drawn at the panel's own width, so that text keeps its size whatever the window's.
    const W = Math.max(480, Math.round($("plot").clientWidth || 760));
    const H = 250;
    const m = { left: 56, right: 16, top: 12, bottom: 42 };
    const plotW = W - m.left - m.right;
    const plotH = H - m.top - m.bottom;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "F1 against wire bytes" });
    const xs = [...points, ...means].map((p) => Math.log10(p.x));
    let lo = xs.length ? Math.min(...xs) : 3;
    let hi = xs.length ? Math.max(...xs) : 6;
    if (hi - lo < 0.5) {
      const mid = (hi + lo) / 2;
      lo = mid - 0.25;
      hi = mid + 0.25;
    }
    const pad = (hi - lo) * 0.06;
    lo -= pad;
    hi += pad;
    const sx = (v) => m.left + ((Math.log10(v) - lo) / (hi - lo)) * plotW;
    const sy = (f) => m.top + (1 - f) * plotH;

    for (const f of [0, 0.25, 0.5, 0.75, 1]) {
      root.append(svg("line", { class: "grid", x1: m.left, x2: W - m.right, y1: sy(f), y2: sy(f) }));
      root.append(svg("text", { class: "tick", x: m.left - 6, y: sy(f) + 4, "text-anchor": "end" }, f.toFixed(2)));
    }
    for (const v of ticks(lo, hi)) {
      const x = sx(v);
      root.append(svg("line", { class: "grid", x1: x, x2: x, y1: m.top, y2: m.top + plotH }));
      const text = percent ? fmtPct(v) : fmtBytes(v);
      root.append(svg("text", { class: "tick", x, y: m.top + plotH + 15, "text-anchor": "middle" }, text));
    }
    root.append(svg("line", { class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: m.top + plotH }));
    root.append(svg("line", { class: "axis", x1: m.left, x2: W - m.right, y1: m.top + plotH, y2: m.top + plotH }));
    const xLabel = percent ? "wire bytes, % of the FP16 size of the full context KV" : "wire bytes per message";
    root.append(svg("text", { class: "axis-label", x: m.left + plotW / 2, y: H - 6, "text-anchor": "middle" }, xLabel));
    root.append(
      svg("text", { class: "axis-label", transform: `translate(14 ${m.top + plotH / 2}) rotate(-90)`, "text-anchor": "middle" }, "F1"),
    );

    // The frontier: configs by size, each step where a larger one answers better.
    const frontier = [];
    for (const p of [...means].sort((a, b) => a.x - b.x)) {
      if (!frontier.length || p.y > frontier[frontier.length - 1].y) frontier.push(p);
    }
    if (frontier.length > 1) {
      const path = frontier
        .map((p, i) => (i === 0 ? `M${sx(p.x)},${sy(p.y)}` : `H${sx(p.x)}V${sy(p.y)}`))
        .join("");
      root.append(svg("path", { class: "frontier", d: path }));
    }
    for (const p of means) {
      const family = familyOfConfig(p.label);
      root.append(
        svg(
          "circle",
          { class: `config-mean ${familyClass(family)}`, cx: sx(p.x), cy: sy(p.y), r: 8, "data-config": p.label },
          svg("title", {}, `${p.label}: mean F1 ${fmtScore(p.y)} over ${p.g.scored_questions} scored answers, ` +
            `${fmtBytes(p.g.bytes_per_message.total)} per message`),
        ),
      );
    }
    for (const p of points) {
      root.append(
        svg(
          "circle",
          { class: `point ${familyClass(p.m.family)}`, cx: sx(p.x), cy: sy(p.y), r: 4.5, "data-message": p.m.message_id },
          svg("title", {}, `${p.m.message_id}: ${p.m.config_label}, ${fmtInt(p.m.bytes.total)} B ` +
            `(${fmtPct(p.m.percent_of_fp16)} of FP16), F1 ${fmtScore(p.y)}`),
        ),
      );
    }
    if (!points.length) {
      root.append(
        svg("text", { class: "empty-note", x: m.left + plotW / 2, y: m.top + plotH / 2, "text-anchor": "middle" },
          "No scored answers yet: send questions with reference answers (kvlink-send --reference-answer)"),
      );
    }
    $("plot").replaceChildren(root);
    const unscored = messages.length - points.length;
    $("plot-note").textContent =
      `${points.length} of the latest ${messages.length} messages scored` +
      (unscored ? ` (${unscored} without reference answers are not plotted)` : "") +
      "; rings: each config's mean; dashed: the best F1 reached at each size.";
    const families = [...new Set([...points.map((p) => p.m.family), ...messages.map((x) => x.family)])].sort();
    $("plot-legend").replaceChildren(
      ...families.map((f) => el("li", {}, el("span", { class: `swatch ${familyClass(f)}` }), f)),
    );
  }

  function familyOfConfig(label) {
    // A group carries its config, not its family; the latest messages of that config say which it is.
    const messages = state.last ? state.last.messages : [];
    const message = messages.find((m) => m.config_label === label);
    return message ? message.family : label;
  }

  // Ticks on a log axis over [lo, hi] (log10 values): more steps per decade the narrower it is.
  function ticks(lo, hi) {
    const span = hi - lo;
    const steps = span > 3 ? [1] : span > 1.5 ? [1, 3] : span > 0.7 ? [1, 2, 5] : [1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9];
    const out = [];
    for (let decade = Math.floor(lo); decade <= Math.ceil(hi); decade += 1) {
      for (const step of steps) {
        const v = step * 10 ** decade;
        const l = Math.log10(v);
        if (l >= lo && l <= hi) out.push(v);
      }
    }
    return out;
  }

  function renderConfigs(configs) {
    const rows = Object.entries(configs)
      .sort((a, b) => a[1].bytes_per_message.total - b[1].bytes_per_message.total)
      .map(([label, g]) => {
        const family = familyOfConfig(label);
        const timing = (key) => (g.timings[key] ? fmtSeconds(g.timings[key].p50) : "–");
        return el(
          "tr",
          { "data-config": label },
          el("td", { class: "config" }, configLabel(label)),
          el("td", {}, el("span", { class: `swatch ${familyClass(family)}` }), family),
          el("td", { class: "num" }, fmtInt(g.messages)),
          el("td", { class: "num" }, fmtInt(g.questions)),
          el("td", { class: "num", title: `${fmtInt(Math.round(g.bytes_per_message.total))} B` }, fmtBytes(Math.round(g.bytes_per_message.total))),
          el("td", { class: "num" }, fmtPct(g.percent_of_fp16)),
          el("td", { class: "num" }, fmtRatio(g.compression_ratio)),
          el("td", { class: "num" }, fmtScore(g.f1_mean)),
          el("td", { class: "num" }, fmtScore(g.exact_match_mean)),
          el("td", { class: "num" }, fmtInt(g.scored_questions)),
          el("td", { class: "num" }, timing("decode_s")),
          el("td", { class: "num" }, timing("answer_s")),
        );
      });
    $("configs").tBodies[0].replaceChildren(
      ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 12, class: "empty" }, "No messages yet"))]),
    );
  }

  function byteBar(bytes) {
    const W = 120;
    const root = svg("svg", { class: "bar", width: W, height: 10, viewBox: `0 0 ${W} 10` });
    let x = 0;
    for (const c of CATEGORIES) {
      const w = bytes.total ? (bytes[c] / bytes.total) * W : 0;
      if (w > 0) root.append(svg("rect", { class: `cat-${c}`, x, y: 0, width: w, height: 10 }, svg("title", {}, `${c}: ${fmtInt(bytes[c])} B`)));
      x += w;
    }
    return root;
  }

  function stagesCell(message) {
    const t = message.timings;
    const sender = SENDER_STAGES.filter((k) => k in t).map((k) => `${stageName(k)} ${fmtSeconds(t[k])}`);
    const receiver = Object.keys(t)
      .filter((k) => !SENDER_STAGES.includes(k))
      .sort()
      .map((k) => `${stageName(k)} ${fmtSeconds(t[k])}`);
    const last = message.asks[message.asks.length - 1];
    if (last && last.timings.answer_s !== undefined) receiver.push(`answer ${fmtSeconds(last.timings.answer_s)}`);
    return el(
      "td",
      { class: "stages" },
      sender.length ? el("span", { class: "sub" }, `sender: ${sender.join(" · ")}`) : null,
      receiver.length ? el("span", { class: "sub" }, `receiver: ${receiver.join(" · ")}`) : null,
    );
  }

  function answerCell(message) {
    const last = message.asks[message.asks.length - 1];
    if (!last) return el("td", { class: "answer" }, el("span", { class: "sub" }, "no question yet"));
    const more = message.questions > 1 ? el("span", { class: "sub" }, `${message.questions} questions; the latest shown`) : null;
    const references = [...new Set(last.reference_answers)];
    const refs = references.length ? el("span", { class: "sub" }, `reference: ${references.join(" | ")}`) : null;
    return el(
      "td",
      { class: "answer" },
      el("span", { class: "sub" }, `Q: ${last.question}`),
      last.answer ? el("span", { class: "a" }, last.answer) : el("span", { class: "sub" }, "(an empty answer)"),
      refs,
      more,
    );
  }

  function renderMessages(messages, stats, info) {
    const rows = messages.map((m) => {
      const key = `${m.owner}/${m.message_id}`;
      const fresh = state.seen.size > 0 && !state.seen.has(key);
      state.seen.add(key);
      const f1 = meanF1(m);
      const em = meanEM(m);
      return el(
        "tr",
        { class: fresh ? "message fresh" : "message", "data-message-id": m.message_id, "data-config": m.config_label },
        el(
          "td",
          {},
          el("code", { title: m.message_id }, shortId(m.message_id)),
          el("span", { class: "sub" }, `at ${fmtTime(m.received_at)}`),
          el("span", { class: "sub", title: m.session_id }, `session ${shortId(m.session_id)}`),
          info.operator ? el("span", { class: "sub" }, `from ${m.owner}`) : null,
        ),
        el("td", { class: "config" }, configLabel(m.config_label), el("span", { class: "sub" }, m.family)),
        el("td", { class: "num" }, `${fmtInt(m.length)} tok`, el("span", { class: "sub" }, `${fmtInt(m.kept)} kept`)),
        el(
          "td",
          { title: CATEGORIES.map((c) => `${c} ${fmtInt(m.bytes[c])} B`).join(", ") },
          `${fmtBytes(m.bytes.total)}`,
          byteBar(m.bytes),
          m.retransmits ? el("span", { class: "sub" }, `${m.retransmits} chunks resent`) : null,
        ),
        el("td", { class: "num" }, fmtPct(m.percent_of_fp16), el("span", { class: "sub" }, `${fmtRatio(m.compression_ratio)} · FP16 ${fmtBytes(m.fp16_bytes)}`)),
        stagesCell(m),
        answerCell(m),
        el("td", { class: "num" }, f1 === null ? "–" : `${fmtScore(f1)} / ${fmtScore(em)}`),
      );
    });
    $("messages").tBodies[0].replaceChildren(
      ...(rows.length
        ? rows
        : [el("tr", {}, el("td", { colspan: 8, class: "empty" }, "No messages yet: send one with kvlink-send"))]),
    );
    $("messages-note").textContent = `the latest ${messages.length} of ${fmtInt(stats.records_held)} records held`;
  }

  function facts(id, pairs) {
    const children = [];
    for (const [label, value, title] of pairs) {
      if (value === null || value === undefined) continue;
      children.push(el("dt", {}, label), el("dd", { title }, value));
    }
    $(id).replaceChildren(...children);
  }

  const withCap = (bytes, cap) => (cap ? `${fmtBytes(bytes)} of ${fmtBytes(cap)}` : fmtBytes(bytes));

  function renderStore(stats, fleetError) {
    const s = stats.store;
    facts("store", [
      ["decoded contexts", fmtInt(s.messages)],
      ["sessions", fmtInt(s.sessions)],
      ["held", withCap(s.bytes, s.max_bytes), `${fmtInt(s.bytes)} B`],
      ["peak", s.peak_bytes === undefined || s.peak_bytes === null ? null : fmtBytes(s.peak_bytes)],
      ["reserved for decodes", s.reserved_bytes === undefined || s.reserved_bytes === null ? null : fmtBytes(s.reserved_bytes)],
      ["evicted", s.evicted === undefined ? null : fmtInt(s.evicted)],
      ["expired", s.expired === undefined ? null : fmtInt(s.expired)],
      ["refused busy", s.refused_busy === undefined ? null : fmtInt(s.refused_busy)],
    ]);
    const fleet = stats.fleet;
    const shown = Boolean(fleet || fleetError);
    $("fleet-title").hidden = !shown;
    $("fleet").hidden = !shown;
    if (fleetError) {
      facts("fleet", [["shared store", fleetError]]);
    } else if (fleet) {
      const held = fleet.held || {};
      facts("fleet", [
        ["store", fleet.store],
        ["messages stored", fmtInt(fleet.messages)],
        ["wire bytes", fmtBytes(fleet.bytes.total), `${fmtInt(fleet.bytes.total)} B`],
        ["compression", fmtRatio(fleet.compression_ratio)],
        ["held now", `${count(held.messages, "message")}, ${withCap(held.bytes, held.max_bytes)}`],
        ["evicted", held.evicted === undefined ? null : fmtInt(held.evicted)],
        ["expired", held.expired === undefined ? null : fmtInt(held.expired)],
        ["released", held.released === undefined ? null : fmtInt(held.released)],
        ...Object.entries(fleet.families || {}).map(([family, f]) => [family, `${count(f.messages, "message")}, ${fmtBytes(f.bytes.total)}`]),
      ]);
    } else {
      $("fleet").replaceChildren();
    }
  }

  function renderLimits(l) {
    const opt = (v, f) => (v === null || v === undefined ? null : f(v));
    facts("limits", [
      ["largest message", fmtBytes(l.max_message_bytes), `${fmtInt(l.max_message_bytes)} B`],
      ["largest chunk", fmtBytes(l.max_chunk_bytes)],
      ["longest context", `${fmtInt(l.max_context_tokens)} tokens`],
      ["longest answer", `${fmtInt(l.max_new_tokens)} tokens`],
      ["longest question", `${fmtInt(l.max_question_tokens)} tokens`],
      ["decoded contexts, all", opt(l.max_cached_bytes, fmtBytes)],
      ["decoded contexts, one identity", fmtBytes(l.max_cached_bytes_per_identity)],
      ["context kept after last use", fmtDuration(l.session_ttl_s)],
      ["calls at once, all", opt(l.max_concurrent_sessions, fmtInt)],
      ["calls at once, one sender", fmtInt(l.per_peer_concurrency)],
      ["transfer buffers, all", opt(l.max_buffered_bytes, fmtBytes)],
      ["stall timeout", opt(l.stall_timeout_s, fmtSeconds)],
      ["message deadline", opt(l.message_deadline_s, fmtSeconds)],
      ["shared store", l.shared_store ? "yes (--store)" : "no: this receiver's memory"],
      ["shared store, all", opt(l.store_max_bytes, fmtBytes)],
      ["shared store, one identity", opt(l.store_max_bytes_per_identity, fmtBytes)],
    ]);
  }

  function renderCalls(stats) {
    const c = stats.calls;
    if (c) {
      facts("calls", [
        ["transfers in flight", fmtInt(c.transfers_in_flight)],
        ["asks in flight", fmtInt(c.asks_in_flight)],
        ["calls / max", `${fmtInt(c.calls)} / ${fmtInt(c.max_concurrent_sessions)}`],
        ["peers", fmtInt(c.peers)],
        ["buffered", withCap(c.buffered_bytes, c.max_buffered_bytes)],
        ["forwards waiting", fmtInt(c.forwards_waiting)],
        ["refused busy", fmtInt(c.refused_busy)],
        ["refused unauthenticated", fmtInt(c.refused_unauthenticated)],
      ]);
    } else {
      facts("calls", [["calls in progress", "an operator's token shows them"]]);
    }
    const memory = stats.memory;
    if (memory && memory.host) {
      const calls = $("calls");
      const extra = [["resident memory", fmtBytes(memory.host.rss_bytes)], ["peak resident", fmtBytes(memory.host.peak_rss_bytes)]];
      if (memory.device) extra.push(["device allocated", withCap(memory.device.allocated_bytes, memory.device.total_bytes)]);
      for (const [label, value] of extra) calls.append(el("dt", {}, label), el("dd", {}, value));
    }
    const errors = Object.entries(stats.errors);
    facts("errors", errors.length ? errors.map(([code, n]) => [code, fmtInt(n)]) : [["none", "0"]]);
  }

  // --- start ------------------------------------------------------------------------------------------
  function start() {
    const fromFragment = tokenFromFragment();
    keepToken(fromFragment || storedToken());
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token-input");
      const token = input.value.trim();
      input.value = "";
      if (!token) return;
      keepToken(token);
      setStatus("starting", "checking token");
      refresh();
    });
    $("forget-token").addEventListener("click", () => {
      keepToken(null);
      lock("required", "");
    });
    const redrawPlot = () => {
      if (state.last) renderPlot(state.last.messages, state.last.stats.configs);
    };
    $("plot-axis").addEventListener("change", redrawPlot);
    window.addEventListener("resize", redrawPlot);
    window.addEventListener("hashchange", () => {
      const token = tokenFromFragment();
      if (token) {
        keepToken(token);
        refresh();
      }
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && $("auth").hidden) refresh();
    });
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
