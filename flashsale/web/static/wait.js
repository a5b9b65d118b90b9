// The waiting page (contract v1.1): join the sale's waiting room, show the place
// and the ETA as they change (polling is the heartbeat, at poll_after_ms), and once
// admitted reserve one unit with the pass. Plain JS, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const saleId = decodeURIComponent(location.pathname.split("/")[2] || "");
const TOKEN_KEY = "flashsale.buyer_token";
let ticket = null;
let timer = null;
let reserving = false;
let order = null;

function say(text, isError) {
  const m = $("#message");
  m.textContent = text || "";
  m.className = "message" + (isError ? " error" : "");
}

async function api(method, path, extra) {
  const headers = Object.assign({ Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) },
    (extra && extra.headers) || {});
  const init = { method, headers };
  if (extra && extra.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(extra.body);
  }
  const r = await fetch(path, init);
  const body = await r.json().catch(() => null);
  return { status: r.status, body };
}

function fmtEta(eta) {
  if (!eta) return "unknown for now";
  if (eta.low === eta.high) return `${eta.low} s`;
  return `${eta.low}–${eta.high} s`;
}

function render(t) {
  ticket = t;
  const st = $("#state");
  st.textContent = t.state;
  st.dataset.state = t.state;
  st.className = "pill " + ({ admitted: "ok", used: "ok", sold_out: "warn", expired: "bad" }[t.state] || "");
  $("#position").textContent = t.position === null ? (t.state === "waiting" ? "drawn at the start" : "–") : String(t.position);
  $("#position").dataset.position = t.position === null ? "" : String(t.position);
  $("#eta").textContent = t.state === "waiting" ? fmtEta(t.eta_seconds) : "–";
  $("#eta").dataset.low = t.eta_seconds ? String(t.eta_seconds.low) : "";
  $("#eta").dataset.high = t.eta_seconds ? String(t.eta_seconds.high) : "";
  $("#poll").textContent = `${(t.poll_after_ms / 1000).toFixed(1)} s`;
  $("#pass-exp").textContent = t.pass_expires_at ? new Date(t.pass_expires_at).toLocaleTimeString() : "–";
  $("#ticket").textContent = t.ticket_id;
  if (t.state === "sold_out") say("Sold out: nothing can be had any more.");
  if (t.state === "expired") say("Your place expired.", true);
}

function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(poll, ms);
}

async function reserve() {
  if (reserving || order) return;
  reserving = true;
  try {
    const r = await api("POST", `/api/v1/sales/${encodeURIComponent(saleId)}/orders`, {
      headers: { "Flashsale-Pass": ticket.pass, "Idempotency-Key": ticket.ticket_id },
      body: { quantity: 1 },
    });
    if (r.status === 202) {
      order = r.body;
      $("#order").textContent = `${order.order_id} (${order.status}, pay before ${new Date(order.expires_at).toLocaleTimeString()})`;
      $("#order").dataset.orderId = order.order_id;
      say("Reserved! Pay before the hold expires.");
    } else {
      say(`Reservation refused: ${r.body && r.body.error ? r.body.error.code : r.status}`, true);
    }
  } finally {
    reserving = false;
  }
}

async function poll() {
  if (!ticket) return;
  try {
    const r = await api("GET", `/api/v1/sales/${encodeURIComponent(saleId)}/queue/${encodeURIComponent(ticket.ticket_id)}`);
    if (r.status !== 200) {
      say(`Could not read your ticket: ${r.body && r.body.error ? r.body.error.message : r.status}`, true);
      schedule(5000);
      return;
    }
    render(r.body);
    if (r.body.state === "admitted") await reserve();
    if (r.body.state === "waiting" || r.body.state === "admitted" || r.body.state === "used") {
      schedule(r.body.poll_after_ms);
    }
  } catch (e) {
    say(`Network error: ${e.message}; retrying`, true);
    schedule(3000);
  }
}

async function join() {
  const token = $("#token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  if (!sessionStorage.getItem(TOKEN_KEY)) { say("Enter your buyer token first.", true); return; }
  const r = await api("POST", `/api/v1/sales/${encodeURIComponent(saleId)}/queue`);
  if (r.status === 200 || r.status === 201) {
    say(r.status === 201 ? "You are in the queue." : "Welcome back: this is your place.");
    render(r.body);
    if (r.body.state === "admitted") await reserve();
    schedule(r.body.poll_after_ms);
  } else {
    const code = r.body && r.body.error ? r.body.error.code : String(r.status);
    $("#state").textContent = code;
    $("#state").dataset.state = code;
    say(r.body && r.body.error ? r.body.error.message : `error ${r.status}`, true);
  }
}

async function loadSale() {
  const r = await fetch(`/api/v1/sales/${encodeURIComponent(saleId)}`);
  if (r.ok) {
    const s = await r.json();
    $("#sale-name").textContent = `${s.name} (${s.sale_id})`;
  }
}

$("#join").addEventListener("click", join);
loadSale();
if (sessionStorage.getItem(TOKEN_KEY)) join();
