// The storefront: plain browser APIs (fetch, WebSocket, DOM), talking to the gateway.
"use strict";

const state = { token: sessionStorage.getItem("token") || "", user: "", products: {},
                currency: "USD", rates: { USD: 1 }, socket: null };
const $ = (id) => document.getElementById(id);

async function api(method, path, body, extraHeaders = {}) {
  const headers = { "Content-Type": "application/json", ...extraHeaders };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.message || data.error || `HTTP ${resp.status}`);
  return data;
}

function money(cents) {
  const rate = state.rates[state.currency] || 1;
  return `${(cents * rate / 100).toFixed(2)} ${state.currency}`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function authenticate(event) {
  event.preventDefault();
  const verb = event.submitter ? event.submitter.value : "login";
  const body = { user: $("user").value, password: $("password").value };
  try {
    const data = await api("POST", `/api/${verb}`, body);
    state.token = data.token;
    sessionStorage.setItem("token", data.token);
    await enter(data.user);
  } catch (err) {
    $("auth-error").textContent = err.message;
  }
}

async function enter(user) {
  state.user = user;
  $("who").textContent = `signed in as ${user}`;
  $("auth").hidden = true;
  $("shop").hidden = false;
  await Promise.all([loadProducts(), loadCart()]);
  connect();
}

async function loadProducts() {
  const q = encodeURIComponent($("search").value);
  const list = await api("GET", `/api/products?q=${q}`);
  const grid = $("products");
  grid.replaceChildren();
  for (const p of list) {
    state.products[p.id] = p;
    grid.append(el("div", { class: "product", "data-id": p.id },
      el("h3", {}, p.name), el("p", { class: "category" }, p.category),
      el("p", { class: "price" }, money(p.price)),
      el("button", { class: "add", "data-id": p.id, onclick: () => addToCart(p.id) }, "Add to cart")));
  }
}

async function addToCart(id) {
  const current = (await api("GET", "/api/cart")).items[id] || 0;
  renderCart(await api("POST", "/api/cart/items", { product: id, qty: current + 1 }));
}

async function loadCart() { renderCart(await api("GET", "/api/cart")); }

function renderCart(cart) {
  const list = $("cart-items");
  list.replaceChildren();
  let total = 0;
  for (const [id, qty] of Object.entries(cart.items)) {
    const p = state.products[id];
    const price = p ? p.price : 0;
    total += price * qty;
    list.append(el("li", { class: "cart-item", "data-id": id }, `${qty} x ${p ? p.name : id} `,
      el("button", { onclick: async () => renderCart(await api("POST", "/api/cart/items", { product: id, qty: 0 })) }, "remove")));
  }
  $("cart-total").textContent = money(total);
  $("checkout").disabled = Object.keys(cart.items).length === 0;
}

async function checkout() {
  $("checkout").disabled = true;
  // one key per purchase, kept until it succeeds: a retried click is the same order
  state.checkoutKey = state.checkoutKey || crypto.randomUUID();
  try {
    const order = await api("POST", "/api/checkout", { card: $("card").value },
                            { "Idempotency-Key": state.checkoutKey });
    state.checkoutKey = "";
    $("checkout-msg").textContent = `order ${order.id} placed`;
    await loadCart();
  } catch (err) {
    $("checkout-msg").textContent = err.message;
    $("checkout").disabled = false;
  }
}

function renderOrders(orders) {
  const list = $("order-list");
  list.replaceChildren();
  for (const o of [...orders].reverse()) {
    const items = o.items.map(([id, qty]) => `${qty} x ${(state.products[id] || { name: id }).name}`);
    list.append(el("li", { class: `order ${o.status}`, "data-id": o.id },
      el("span", { class: "status" }, o.status), ` ${money(o.amount)} - ${items.join(", ")}`,
      o.reason ? el("small", {}, ` (${o.reason})`) : ""));
  }
}

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/api/ws?token=${encodeURIComponent(state.token)}`);
  state.socket = ws;
  ws.onopen = () => { $("live").textContent = "(live)"; };
  ws.onmessage = (ev) => renderOrders(JSON.parse(ev.data).orders);
  ws.onclose = () => {
    $("live").textContent = "(reconnecting)";
    setTimeout(connect, 1000);
  };
}

async function init() {
  $("auth-form").addEventListener("submit", authenticate);
  $("checkout").addEventListener("click", checkout);
  $("search").addEventListener("input", () => loadProducts());
  state.rates = await api("GET", "/api/currencies");
  for (const c of Object.keys(state.rates)) $("currency").append(el("option", { value: c }, c));
  $("currency").addEventListener("change", async () => {
    state.currency = $("currency").value;
    await loadProducts();
    await loadCart();
  });
  if (state.token) {
    try {
      const payload = JSON.parse(atob(state.token.split(".")[0].replace(/-/g, "+").replace(/_/g, "/")));
      await api("GET", "/api/cart");
      await enter(payload.u);
    } catch (err) {
      sessionStorage.removeItem("token");
      state.token = "";
    }
  }
}

init();
