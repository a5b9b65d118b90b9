// flashsale operator dashboard: plain JS, no build step, no library.
// The admin token lives in sessionStorage and goes out only as a bearer header.
// The live figures come from GET /api/v1/admin/events (Server-Sent Events), read
// with fetch() and a stream reader because EventSource cannot send a header.
"use strict";

const TOKEN_KEY = "flashsale.adminToken";
const COLORS = ["#3fb950", "#58a6ff", "#d29922", "#f85149", "#bc8cff", "#39c5cf", "#ff7b72", "#8a96a3"];
const FIGURES = ["stock", "available", "pending", "awaiting_payment", "paid", "shipped",
                 "expired", "cancelled", "failed"];
const $ = (sel, root = document) => root.querySelector(sel);

let abort = null;
let lastSnapshot = null;

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function setConn(state, text) {
  const el = $("#conn");
  el.dataset.state = state;
  el.textContent = text;
  el.className = "pill " + (state === "live" ? "ok" : state === "connecting" ? "warn" : "off");
}

function say(text) { $("#message").textContent = text; }

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + token() };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  const text = await resp.text();
  let parsed = null;
  try { parsed = text ? JSON.parse(text) : null; } catch (_e) { parsed = text; }
  if (!resp.ok) {
    const msg = parsed && parsed.error ? parsed.error.code + ": " + parsed.error.message : resp.status;
    throw new Error(String(msg));
  }
  return parsed;
}

// ---- Server-Sent Events over fetch -------------------------------------------------

async function stream() {
  while (token()) {
    abort = new AbortController();
    setConn("connecting", "connecting");
    try {
      const resp = await fetch("/api/v1/admin/events", {
        headers: { "Authorization": "Bearer " + token(), "Accept": "text/event-stream" },
        cache: "no-store", credentials: "omit", signal: abort.signal,
      });
      if (resp.status === 401) {
        logout("the admin token was refused");
        return;
      }
      if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
      setConn("live", "live");
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let at;
        while ((at = buf.indexOf("\n\n")) >= 0) {
          onFrame(buf.slice(0, at));
          buf = buf.slice(at + 2);
        }
      }
    } catch (e) {
      if (e.name === "AbortError") return;
      setConn("disconnected", "disconnected: " + e.message);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function onFrame(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;
  if (event === "figures") render(JSON.parse(data.join("\n")));
  else if (event === "error") setConn("disconnected", "backend error: " + JSON.parse(data.join("\n")).message);
}

// ---- rendering -------------------------------------------------------------------

function render(snap) {
  lastSnapshot = snap;
  setConn("live", "live");
  $("#updated").textContent = "updated " + new Date(snap.time).toLocaleTimeString();
  $("#total-lag").textContent = snap.totals.lag;
  $("#total-pending").textContent = snap.totals.pending_entries;
  $("#total-dlq").textContent = snap.totals.dead_letters;
  $("#total-dlq").className = snap.totals.dead_letters > 0 ? "error" : "";
  renderWorkers(snap);
  renderSales(snap.sales);
  if (snap.series) renderCharts(snap.series);
}

function renderWorkers(snap) {
  const box = $("#workers");
  box.replaceChildren();
  for (const role of Object.keys(snap.alive)) {
    const n = snap.alive[role];
    const pill = document.createElement("span");
    pill.className = "pill worker " + (n > 0 ? "ok" : "bad");
    pill.dataset.role = role;
    pill.dataset.alive = String(n);
    pill.textContent = role + (n > 0 ? ": " + n + " alive" : ": NOT RUNNING");
    box.append(pill);
  }
  for (const w of snap.workers) {
    if (w.alive) continue;
    const s = document.createElement("div");
    s.className = "muted";
    s.textContent = w.role + " " + w.name + " silent for " + Math.round(w.age_s) + " s";
    box.append(s);
  }
}

function renderSales(sales) {
  const box = $("#sales");
  const seen = new Set();
  for (const s of sales) {
    const id = s.sale.sale_id;
    seen.add(id);
    let card = box.querySelector(`article[data-sale="${CSS.escape(id)}"]`);
    if (!card) {
      card = $("#sale-template").content.firstElementChild.cloneNode(true);
      card.dataset.sale = id;
      wireControls(card, id);
      box.append(card);
    }
    fillSale(card, s);
  }
  for (const card of [...box.children]) if (!seen.has(card.dataset.sale)) card.remove();
  $("#no-sales").hidden = sales.length > 0;
}

function fillSale(card, s) {
  const sale = s.sale;
  $(".sale-name", card).textContent = sale.name;
  $(".sale-id", card).textContent = sale.sale_id;
  const st = $(".sale-status", card);
  st.textContent = sale.status;
  st.className = "pill sale-status " + ({ active: "ok", sold_out: "warn", ended: "bad" }[sale.status] || "");
  const c = $(".sale-consistent", card);
  c.textContent = s.consistent ? "ledger consistent" : "ledger inconsistent";
  c.className = "pill sale-consistent " + (s.consistent ? "ok" : "warn");
  for (const f of FIGURES) {
    const td = card.querySelector(`[data-figure="${f}"]`);
    td.textContent = s.figures[f];
    td.dataset.sale = sale.sale_id;
  }
  for (const k of ["lag", "pending_entries", "dead_letters"]) {
    card.querySelector(`[data-stream="${k}"]`).textContent = s.stream[k];
  }
  $(".sale-ends", card).textContent = sale.ends_at ? new Date(sale.ends_at).toLocaleString() : "never";
  $(".end", card).disabled = sale.status === "ended";
  renderWaitingRoom(card, sale, s.waiting_room_figures);
  renderSaleCharts(card, s.series);
}

// This sale's charts: its own series in the same event (null: no reservation lately).
function renderSaleCharts(card, series) {
  $(".sale-charts", card).hidden = !series;
  $(".sale-no-series", card).hidden = !!series;
  if (series) {
    drawCharts(series, $(".sale-chart-rate", card), $(".sale-legend-rate", card),
               $(".sale-chart-latency", card), $(".sale-legend-latency", card));
  }
}

// The waiting room (contract v1.1) is rendered only when the sale has one.
function renderWaitingRoom(card, sale, figures) {
  const box = $(".waiting-room", card);
  box.hidden = !sale.waiting_room;
  if (!sale.waiting_room) return;
  const rows = Object.entries(Object.assign({}, sale.waiting_room, figures || {}));
  const table = $(".wr-figures", card);
  table.replaceChildren();
  for (const [k, v] of rows) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    const td = document.createElement("td");
    th.textContent = k.replace(/_/g, " ");
    td.textContent = String(v);
    td.dataset.waitingRoom = k;
    tr.append(th, td);
    table.append(tr);
  }
}

// ---- controls: each one confirmed, each one an admin API call --------------------

function wireControls(card, id) {
  const name = () => $(".sale-name", card).textContent || id;
  $(".restock", card).addEventListener("click", async () => {
    const qty = parseInt($(".restock-qty", card).value, 10);
    if (!(qty >= 1 && qty <= 1000000)) { say("restock quantity must be 1..1000000"); return; }
    if (!confirm(`Restock ${qty} units of "${name()}" (${id})?`)) return;
    try {
      const sale = await api("POST", `/api/v1/sales/${encodeURIComponent(id)}/restock`, { quantity: qty });
      say(`restocked ${id}: stock ${sale.stock}, available ${sale.available}`);
    } catch (e) { say(`restock of ${id} failed: ${e.message}`); }
  });
  $(".end", card).addEventListener("click", async () => {
    if (!confirm(`End sale "${name()}" (${id}) NOW? Every reservation will be refused from this moment.`)) return;
    try {
      const sale = await api("POST", `/api/v1/sales/${encodeURIComponent(id)}/end`);
      say(`ended ${id} at ${sale.ends_at}`);
    } catch (e) { say(`ending ${id} failed: ${e.message}`); }
  });
  const wr = (body, what) => async () => {
    if (!confirm(`${what} the waiting room of "${name()}" (${id})?`)) return;
    try {
      await api("PATCH", `/api/v1/admin/sales/${encodeURIComponent(id)}/waiting-room`, body());
      say(`${what}: done for ${id}`);
    } catch (e) { say(`${what} for ${id} failed: ${e.message}`); }
  };
  $(".wr-pause", card).addEventListener("click", wr(() => ({ paused: true }), "Pause"));
  $(".wr-resume", card).addEventListener("click", wr(() => ({ paused: false }), "Resume"));
  $(".wr-set-rate", card).addEventListener("click",
    wr(() => ({ admit_per_s: parseInt($(".wr-rate", card).value, 10) }), "Set the admission rate of"));
}

// ---- charts: a line chart on a canvas ------------------------------------------

function renderCharts(series) {
  drawCharts(series, $("#chart-rate"), $("#legend-rate"), $("#chart-latency"), $("#legend-latency"));
}

// One colour per outcome, the same on every chart of the page.
const outcomeColors = new Map([["accepted", COLORS[0]], ["replay", COLORS[1]]]);
function outcomeColor(name) {
  if (!outcomeColors.has(name)) outcomeColors.set(name, COLORS[(outcomeColors.size + 2) % COLORS.length]);
  return outcomeColors.get(name);
}

function drawCharts(series, rateCanvas, rateLegend, latencyCanvas, latencyLegend) {
  const names = Object.keys(series.outcomes);
  lineChart(rateCanvas, rateLegend, series.t,
    names.map((n) => ({ name: n, color: outcomeColor(n), values: series.outcomes[n] })), "/s");
  lineChart(latencyCanvas, latencyLegend, series.t, [
    { name: "p50", color: COLORS[1], values: series.p50_ms },
    { name: "p99", color: COLORS[3], values: series.p99_ms },
  ], " ms");
}

function lineChart(canvas, legend, t, lines, unit) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const pad = { l: 48, r: 8, t: 8, b: 20 };
  let max = 0;
  for (const l of lines) for (const v of l.values) if (v !== null && v > max) max = v;
  max = max > 0 ? niceCeil(max) : 1;
  ctx.strokeStyle = "#2a333d"; ctx.fillStyle = "#8a96a3"; ctx.font = "11px system-ui"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + (h - pad.t - pad.b) * (1 - i / 4);
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
    ctx.fillText(fmt(max * i / 4) + unit, 2, y + 4);
  }
  const n = t.length;
  const x = (i) => pad.l + (w - pad.l - pad.r) * (n > 1 ? i / (n - 1) : 0);
  const y = (v) => pad.t + (h - pad.t - pad.b) * (1 - v / max);
  if (n) {
    ctx.fillText(new Date(t[0] * 1000).toLocaleTimeString(), pad.l, h - 4);
    const end = new Date(t[n - 1] * 1000).toLocaleTimeString();
    ctx.fillText(end, w - pad.r - ctx.measureText(end).width, h - 4);
  }
  for (const l of lines) {
    ctx.strokeStyle = l.color; ctx.lineWidth = 1.5; ctx.beginPath();
    let pen = false;
    l.values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      if (pen) ctx.lineTo(x(i), y(v)); else ctx.moveTo(x(i), y(v));
      pen = true;
    });
    ctx.stroke();
    ctx.fillStyle = l.color;  // a second alone (no neighbour to join) is a dot
    l.values.forEach((v, i) => {
      const alone = (i === 0 || l.values[i - 1] === null) && (i === n - 1 || l.values[i + 1] === null);
      if (v !== null && alone) { ctx.beginPath(); ctx.arc(x(i), y(v), 2.5, 0, 2 * Math.PI); ctx.fill(); }
    });
  }
  legend.replaceChildren(...lines.map((l) => {
    const s = document.createElement("span");
    const i = document.createElement("i");
    i.style.background = l.color;  // CSSOM, allowed by the page's CSP
    const last = [...l.values].reverse().find((v) => v !== null);
    s.append(i, `${l.name} ${last === undefined ? "–" : fmt(last) + unit}`);
    s.dataset.series = l.name;
    return s;
  }));
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function fmt(v) { return v >= 100 ? String(Math.round(v)) : String(Math.round(v * 100) / 100); }

// ---- token ----------------------------------------------------------------------

function showDashboard() {
  $("#login").hidden = true;
  $("#dash").hidden = false;
  $("#logout").hidden = false;
  stream();
}

function logout(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (abort) abort.abort();
  $("#login").hidden = false;
  $("#dash").hidden = true;
  $("#logout").hidden = true;
  $("#login-error").textContent = reason || "";
  setConn("disconnected", "disconnected");
}

$("#login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const value = $("#token").value.trim();
  $("#token").value = "";
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("#login-error").textContent = "";
  showDashboard();
});
$("#logout").addEventListener("click", () => logout());
window.addEventListener("resize", () => { if (lastSnapshot) render(lastSnapshot); });
if (token()) showDashboard();
