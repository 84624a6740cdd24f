// The trading page: plain browser APIs (fetch, WebSocket, DataView), no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const rupees = (paise) => (paise / 100).toLocaleString("en-IN", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const WATCH = 8;
let token = sessionStorage.getItem("token") || "";
let user = sessionStorage.getItem("user") || "";
let instruments = [];
const bySymbol = new Map();
const byToken = new Map();
const quotes = new Map();
let selected = null;
let ws = null;

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

async function auth(kind) {
  $("auth-error").textContent = "";
  try {
    const got = await api("POST", `/api/${kind}`, { user: $("user").value, password: $("password").value });
    token = got.token; user = got.user;
    sessionStorage.setItem("token", token); sessionStorage.setItem("user", user);
    await start();
  } catch (e) { $("auth-error").textContent = e.message; }
}

// -- market data: Kite-style binary packets (big-endian, prices in paise) -------------------
function parse(buf) {
  const v = new DataView(buf);
  const n = v.getInt16(0);
  let off = 2;
  const out = [];
  for (let i = 0; i < n; i++) {
    const size = v.getInt16(off); off += 2;
    const t = { token: v.getInt32(off), ltp: v.getInt32(off + 4) };
    if (size >= 44) t.close = v.getInt32(off + 40);
    if (size >= 184) {
      t.depth = { buy: [], sell: [] };
      for (let k = 0; k < 10; k++) {
        const p = off + 64 + k * 12;
        const lvl = { qty: v.getInt32(p), price: v.getInt32(p + 4), orders: v.getInt16(p + 8) };
        (k < 5 ? t.depth.buy : t.depth.sell).push(lvl);
      }
    }
    out.push(t);
    off += size;
  }
  return out;
}

function connectTicker(url) {
  ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    $("feed").textContent = "ticker: live";
    ws.send(JSON.stringify({ a: "subscribe", v: instruments.slice(0, WATCH).map((i) => i.token) }));
    if (selected) ws.send(JSON.stringify({ a: "mode", v: ["full", [selected.token]] }));
  };
  ws.onclose = () => { $("feed").textContent = "ticker: reconnecting"; setTimeout(() => connectTicker(url), 1000); };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") { console.warn("ticker:", ev.data); return; }
    for (const t of parse(ev.data)) {
      const q = quotes.get(t.token) || {};
      Object.assign(q, t);
      quotes.set(t.token, q);
      paintQuote(t.token);
      if (selected && t.token === selected.token && t.depth) paintDepth(t.depth);
    }
  };
}

function paintQuote(tok) {
  const row = $(`w-${tok}`);
  const q = quotes.get(tok);
  if (!row || !q) return;
  const inst = byToken.get(tok);
  const base = q.close || inst.ltp;
  const chg = ((q.ltp - base) / base) * 100;
  row.children[1].textContent = rupees(q.ltp);
  row.children[2].textContent = `${chg >= 0 ? "+" : ""}${chg.toFixed(2)}%`;
  row.children[2].className = chg >= 0 ? "up" : "down";
}

function paintDepth(d) {
  $("depth").innerHTML = d.buy.map((b, i) => {
    const s = d.sell[i];
    return `<tr><td>${b.qty || ""}</td><td class="up">${b.price ? rupees(b.price) : ""}</td>`
      + `<td class="down">${s.price ? rupees(s.price) : ""}</td><td>${s.qty || ""}</td></tr>`;
  }).join("");
}

function select(sym) {
  const inst = bySymbol.get(sym);
  if (!inst) return;
  if (ws && ws.readyState === 1) {
    if (selected && selected.token !== inst.token) {
      ws.send(JSON.stringify({ a: "mode", v: ["quote", [selected.token]] }));
    }
    ws.send(JSON.stringify({ a: "subscribe", v: [inst.token] }));
    ws.send(JSON.stringify({ a: "mode", v: ["full", [inst.token]] }));
  }
  selected = inst;
  $("symbol").value = sym;
  $("depth-symbol").textContent = sym;
  document.querySelectorAll("#watchlist tr").forEach((r) => r.classList.toggle("sel", r.dataset.symbol === sym));
  api("GET", `/api/depth/${sym}`).then((d) => paintDepth({
    buy: padDepth(d.bids), sell: padDepth(d.asks),
  })).catch(() => {});
}

function padDepth(levels) {
  const out = levels.slice(0, 5).map(([price, qty, orders]) => ({ price, qty, orders }));
  while (out.length < 5) out.push({ price: 0, qty: 0, orders: 0 });
  return out;
}

// -- orders and portfolio -----------------------------------------------------------------
async function place() {
  const paise = (id) => Math.round(parseFloat($(id).value || "0") * 100);
  const body = {
    symbol: $("symbol").value, side: $("side").value, type: $("type").value,
    qty: parseInt($("qty").value, 10), validity: $("validity").value,
    price: paise("price"), trigger: paise("trigger"), tag: `web-${Date.now()}`,
  };
  $("order-msg").className = "";
  try {
    const o = await api("POST", "/api/orders", body);
    $("order-msg").textContent = `${o.order_id}: ${o.status}, filled ${o.filled}/${o.qty}`
      + (o.filled ? ` at ${rupees(o.avg_price)}` : "") + (o.reason ? ` (${o.reason})` : "");
  } catch (e) {
    $("order-msg").className = "error";
    $("order-msg").textContent = e.message;
  }
  refresh();
}

async function cancel(oid) {
  try { await api("DELETE", `/api/orders/${oid}`); } catch (e) { $("order-msg").textContent = e.message; }
  refresh();
}

async function refresh() {
  if (!token) return;
  try {
    const [orders, p] = await Promise.all([api("GET", "/api/orders"), api("GET", "/api/portfolio")]);
    $("orders").innerHTML = orders.map((o) => `<tr data-status="${o.status}"><td>${o.order_id}</td><td>${o.symbol}</td>`
      + `<td>${o.side}</td><td>${o.type}</td><td>${o.qty}</td><td>${o.filled}</td>`
      + `<td>${o.avg_price ? rupees(o.avg_price) : ""}</td><td class="status">${o.status}</td>`
      + `<td>${["OPEN", "TRIGGER PENDING"].includes(o.status) ? `<button data-cancel="${o.order_id}">Cancel</button>` : ""}</td></tr>`).join("");
    $("cash").textContent = rupees(p.cash);
    $("reserved").textContent = rupees(p.reserved);
    $("pnl").textContent = rupees(p.pnl);
    $("pnl").className = p.pnl >= 0 ? "up" : "down";
    $("positions").innerHTML = p.positions.map((x) => `<tr><td>${x.symbol}</td><td>${x.net_qty}</td>`
      + `<td>${x.buy_qty ? rupees(Math.round(x.buy_value / x.buy_qty)) : ""}</td><td>${rupees(x.ltp)}</td>`
      + `<td class="${x.pnl >= 0 ? "up" : "down"}">${rupees(x.pnl)}</td></tr>`).join("");
    $("holdings").innerHTML = p.holdings.map((h) => `<tr data-symbol="${h.symbol}"><td>${h.symbol}</td>`
      + `<td class="qty">${h.qty}</td><td>${h.blocked}</td></tr>`).join("");
  } catch (e) {
    if (/token|log in/.test(e.message)) { sessionStorage.clear(); location.reload(); }
  }
}

async function start() {
  const [cfg, list, me] = await Promise.all([api("GET", "/api/config"), api("GET", "/api/instruments"), api("GET", "/api/profile")]);
  instruments = list;
  for (const i of list) { bySymbol.set(i.symbol, i); byToken.set(i.token, i); }
  $("who").textContent = `logged in as ${me.user}`;
  $("auth").hidden = true;
  $("app").hidden = false;
  $("symbol").innerHTML = list.map((i) => `<option>${i.symbol}</option>`).join("");
  $("watchlist").innerHTML = list.slice(0, WATCH).map((i) => `<tr id="w-${i.token}" data-symbol="${i.symbol}">`
    + `<td>${i.symbol}</td><td>${rupees(i.ltp)}</td><td></td></tr>`).join("");
  const wsUrl = cfg.ticker || `ws://${location.host}/ws`;
  selected = list[0];
  connectTicker(wsUrl);
  select(list[0].symbol);
  refresh();
  setInterval(refresh, 1000);
}

$("signup").onclick = () => auth("signup");
$("login").onclick = () => auth("login");
$("place").onclick = place;
$("symbol").onchange = (e) => select(e.target.value);
$("watchlist").onclick = (e) => { const r = e.target.closest("tr"); if (r) select(r.dataset.symbol); };
$("orders").onclick = (e) => { const id = e.target.dataset && e.target.dataset.cancel; if (id) cancel(id); };
if (token) start().catch(() => { sessionStorage.clear(); });
