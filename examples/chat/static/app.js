// dsys chat in the browser: standard APIs only (fetch, WebSocket, DOM).
// The protocol is described in examples/chat/common.py. Per room we keep the epoch,
// the last offset and stream sequence received; after a lost connection we say hello
// again through the load balancer and resume every room from there (Centrifugo's
// offset + epoch), and send again every post not acknowledged yet (flagged retry).
// Every message received from someone else is acknowledged ("delivered" frame); our own
// messages show ✓ once stored and ✓✓ once another member's client has received them.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  user: null,
  token: sessionStorage.getItem("chat-token"),
  ws: null,
  ready: false,
  server: null,
  connects: 0,
  rooms: new Map(),     // name -> {member, epoch, offset, seq, log: [], unread, dm}
  current: null,
  unacked: new Map(),   // cid -> {room, text}
  typing: new Map(),    // "room user" -> until (ms)
  members: [],
  backoff: 250,
  lastTyping: 0,
  receipts: new Map(),  // "room epoch" -> offsets received, to acknowledge
  receiptTimer: null,
};
window.chatState = state;  // for the browser test and for curious readers

function room(name) {
  if (!state.rooms.has(name)) {
    state.rooms.set(name, { member: false, epoch: "", offset: 0, seq: 0, log: [], unread: 0, dm: name.startsWith("dm--"), delivered: new Set() });
  }
  return state.rooms.get(name);
}

function send(frame) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(frame));
}

function showError(text) {
  $("chat-error").textContent = text;
  if (text) setTimeout(() => { if ($("chat-error").textContent === text) $("chat-error").textContent = ""; }, 6000);
}

// -- log in ----------------------------------------------------------------------------

async function auth(kind) {
  const body = { user: $("user").value.trim(), password: $("password").value };
  $("login-error").textContent = "";
  try {
    const resp = await fetch(`/api/${kind}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const data = await resp.json();
    if (!resp.ok) { $("login-error").textContent = data.message || data.error; return; }
    state.token = data.token;
    sessionStorage.setItem("chat-token", data.token);
    start();
  } catch (e) {
    $("login-error").textContent = `cannot reach the server: ${e}`;
  }
}

$("login-form").addEventListener("submit", (ev) => { ev.preventDefault(); auth("login"); });
$("signup").addEventListener("click", () => { if ($("login-form").reportValidity()) auth("signup"); });

function start() {
  $("login-view").hidden = true;
  $("chat-view").hidden = false;
  connect();
}

// -- the connection --------------------------------------------------------------------

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/ws`);
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ type: "hello", token: state.token }));
  ws.onmessage = (ev) => {
    const data = JSON.parse(ev.data);  // one frame, or an array of them under load
    for (const f of Array.isArray(data) ? data : [data]) onFrame(f);
    // acknowledge what arrived within a second in one frame per room
    if (state.receipts.size && !state.receiptTimer) state.receiptTimer = setTimeout(sendReceipts, 1000);
  };
  ws.onclose = (ev) => {
    state.ready = false;
    if (ev.code === 4001) {  // the token was refused: log in again
      sessionStorage.removeItem("chat-token");
      location.reload();
      return;
    }
    $("status").textContent = "reconnecting…";
    setTimeout(connect, state.backoff);
    state.backoff = Math.min(4000, state.backoff * 2);
  };
}

function sendReceipts() {
  state.receiptTimer = null;
  for (const [key, offsets] of state.receipts) {
    const [name, epoch] = key.split(" ");
    for (let i = 0; i < offsets.length; i += 500) {
      send({ type: "delivered", room: name, epoch, offsets: offsets.slice(i, i + 500) });
    }
  }
  state.receipts.clear();
}

function onFrame(f) {
  switch (f.type) {
    case "welcome":
      state.user = f.user;
      state.server = f.server;
      state.ready = true;
      state.connects += 1;
      state.backoff = 250;
      $("me").textContent = f.user;
      $("status").textContent = `connected to chat server ${f.server}`;
      for (const [name, r] of state.rooms) {
        if (r.member) send({ type: "sub", room: name, offset: r.offset, epoch: r.epoch, seq: r.seq });
      }
      for (const [cid, p] of state.unacked) send({ type: "send", room: p.room, cid, text: p.text, retry: true });
      send({ type: "rooms" });
      break;
    case "rooms":
      for (const r of f.rooms) {
        const st = room(r.room);
        const wasMember = st.member;
        st.member = r.member;
        if (r.member && !wasMember) {
          st.unread = r.unread;
          send({ type: "sub", room: r.room, offset: st.offset, epoch: st.epoch, seq: st.seq });
        }
      }
      renderRooms();
      if (!state.current) {
        const first = [...state.rooms.entries()].find(([, r]) => r.member);
        if (first) select(first[0]);
      }
      break;
    case "joined":
      room(f.room).member = true;
      send({ type: "sub", room: f.room });
      select(f.room);
      send({ type: "rooms" });
      break;
    case "left":
      room(f.room).member = false;
      renderRooms();
      break;
    case "msg": onMsg(f); break;
    case "ack": {
      state.unacked.delete(f.cid);
      const li = document.getElementById(`p-${f.cid}`);
      if (li) li.classList.remove("pending");
      break;
    }
    case "delivered": {
      const r = room(f.room);
      if (f.epoch !== r.epoch) break;
      for (const off of f.offsets) {
        r.delivered.add(off);
        if (f.room === state.current) {
          const li = document.querySelector(`#messages li[data-offset="${off}"]`);
          if (li) { li.classList.add("delivered"); li.querySelector(".tick").textContent = "✓✓"; }
        }
      }
      break;
    }
    case "refetch": {
      const r = room(f.room);
      r.epoch = ""; r.offset = 0; r.seq = 0; r.log = []; r.delivered = new Set();
      if (f.room === state.current) renderMessages();
      send({ type: "sub", room: f.room });
      break;
    }
    case "history": {
      const r = room(f.room);
      const known = new Set(r.log.map((m) => m.offset));
      r.log = f.messages.filter((m) => !known.has(m.offset)).concat(r.log);
      $("older").hidden = !f.more;
      if (f.room === state.current) renderMessages(false);
      break;
    }
    case "typing":
      if (f.user !== state.user) state.typing.set(`${f.room} ${f.user}`, f.until * 1000);
      renderTyping();
      break;
    case "presence":
      for (const m of state.members) if (m.user === f.user) m.state = f.state;
      renderMembers();
      break;
    case "member":  // someone joined or left a room we follow
      if (f.room === state.current) send({ type: "members", room: f.room });
      break;
    case "members":
      if (f.room === state.current) { state.members = f.members; renderMembers(); }
      break;
    case "error":
      if (f.code === "room_exists" && f.room) { send({ type: "join", room: f.room }); break; }
      if (f.code === "unavailable" && f.room && !f.ref && state.rooms.has(f.room)) {
        // the server could not subscribe us to the room (or resume it): ask again
        setTimeout(() => {
          const r = room(f.room);
          send({ type: "sub", room: f.room, offset: r.offset, epoch: r.epoch, seq: r.seq });
        }, (f.retry_after || 0.5) * 1000);
        break;
      }
      if (f.ref && state.unacked.has(f.ref) && (f.code === "unavailable" || f.code === "rate_limited")) {
        const p = state.unacked.get(f.ref);
        setTimeout(() => send({ type: "send", room: p.room, cid: f.ref, text: p.text, retry: true }), (f.retry_after || 0.5) * 1000);
        if (f.code === "rate_limited") showError("slow down: too many messages");
      } else {
        if (f.ref) { state.unacked.delete(f.ref); document.getElementById(`p-${f.ref}`)?.remove(); }
        showError(`${f.code}: ${f.message}`);
      }
      break;
    default: break;
  }
}

function onMsg(m) {
  const r = room(m.room);
  if (r.epoch && m.offset <= r.offset) return;  // already have it
  r.epoch = m.epoch; r.offset = m.offset; r.seq = m.seq;
  r.log.push(m);
  if (m.from !== state.user) {
    const key = `${m.room} ${m.epoch}`;
    if (!state.receipts.has(key)) state.receipts.set(key, []);
    state.receipts.get(key).push(m.offset);
  }
  if (r.log.length > 500) r.log.splice(0, r.log.length - 500);
  state.typing.delete(`${m.room} ${m.from}`);
  if (m.room === state.current) {
    const pending = document.getElementById(`p-${m.cid}`);
    if (pending && m.from === state.user) pending.remove();
    appendMessage(m);
    markRead();
  } else {
    r.unread += 1;
    renderRooms();
  }
}

// -- rendering -------------------------------------------------------------------------

function renderRooms() {
  const ul = $("rooms");
  ul.replaceChildren();
  for (const [name, r] of [...state.rooms.entries()].sort()) {
    const li = document.createElement("li");
    li.dataset.room = name;
    li.className = (name === state.current ? "active " : "") + (r.member ? "" : "not-member");
    const label = document.createElement("span");
    label.textContent = r.dm ? `@ ${name.slice(4).split("--").filter((u) => u !== state.user).join("")}` : `# ${name}`;
    const badge = document.createElement("span");
    badge.className = "unread";
    badge.textContent = r.unread > 0 ? String(r.unread) : "";
    li.append(label, badge);
    li.addEventListener("click", () => (r.member ? select(name) : send({ type: "join", room: name })));
    ul.append(li);
  }
}

function messageItem(m) {
  const li = document.createElement("li");
  li.dataset.offset = m.offset;
  li.dataset.id = m.id;
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = m.from;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = m.text;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `#${m.offset} ${new Date(m.ts).toLocaleTimeString()}`;
  li.append(from, text, meta);
  if (m.from === state.user) {  // ours: ✓ stored, ✓✓ received by another member
    const tick = document.createElement("span");
    tick.className = "tick";
    const done = m.offset !== "" && room(m.room || state.current).delivered.has(m.offset);
    tick.textContent = m.offset === "" ? "" : done ? "✓✓" : "✓";
    if (done) li.classList.add("delivered");
    li.append(tick);
  }
  return li;
}

function appendMessage(m) {
  const ol = $("messages");
  const atBottom = ol.scrollHeight - ol.scrollTop - ol.clientHeight < 40;
  ol.append(messageItem(m));
  if (atBottom) ol.scrollTop = ol.scrollHeight;
}

function renderMessages(scroll = true) {
  const ol = $("messages");
  ol.replaceChildren(...room(state.current).log.map(messageItem));
  for (const [cid, p] of state.unacked) {
    if (p.room === state.current) ol.append(pendingItem(cid, p.text));
  }
  if (scroll) ol.scrollTop = ol.scrollHeight;
}

function pendingItem(cid, text) {
  const li = messageItem({ offset: "", id: "", from: state.user, text, ts: Date.now() });
  li.id = `p-${cid}`;
  li.classList.add("pending");
  return li;
}

function renderTyping() {
  const now = Date.now();
  const who = [];
  for (const [key, until] of state.typing) {
    if (until < now) { state.typing.delete(key); continue; }
    const [r, user] = key.split(" ");
    if (r === state.current) who.push(user);
  }
  $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
}
setInterval(renderTyping, 1000);

function renderMembers() {
  const ul = $("members");
  ul.replaceChildren();
  for (const m of state.members) {
    const li = document.createElement("li");
    li.className = m.state;
    li.textContent = m.user + (m.state === "online" ? "" : ` (${m.state})`);
    ul.append(li);
  }
}

function select(name) {
  state.current = name;
  const r = room(name);
  r.unread = 0;
  $("room-title").textContent = r.dm ? "direct messages" : `# ${name}`;
  $("text").disabled = $("send").disabled = false;
  $("older").hidden = r.log.length === 0;
  renderRooms();
  renderMessages();
  renderTyping();
  markRead();
  send({ type: "members", room: name });
}
setInterval(() => { if (state.ready && state.current) send({ type: "members", room: state.current }); }, 15000);

function markRead() {
  const r = room(state.current);
  if (r.offset > 0 && document.visibilityState === "visible") {
    send({ type: "read", room: state.current, offset: r.offset, fully: true });
  }
}
document.addEventListener("visibilitychange", () => {
  if (state.current) markRead();
  send({ type: "presence", state: document.visibilityState === "visible" ? "online" : "away" });
});

// -- actions ---------------------------------------------------------------------------

$("send-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("text").value;
  if (!text.trim() || !state.current) return;
  const cid = crypto.randomUUID ? crypto.randomUUID().replaceAll("-", "") : String(Math.random()).slice(2);
  state.unacked.set(cid, { room: state.current, text });
  $("messages").append(pendingItem(cid, text));
  $("messages").scrollTop = $("messages").scrollHeight;
  send({ type: "send", room: state.current, cid, text });
  $("text").value = "";
  state.lastTyping = 0;  // the message ends the indicator; the next keystroke starts one
});

$("text").addEventListener("input", () => {
  const now = Date.now();
  if (state.current && now - state.lastTyping > 3000) {
    state.lastTyping = now;
    send({ type: "typing", room: state.current });
  }
});

$("room-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = $("new-room").value.trim();
  if (!name) return;
  send(state.rooms.has(name) ? { type: "join", room: name } : { type: "create", room: name });
  $("new-room").value = "";
});

$("dm-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const user = $("dm-user").value.trim();
  if (user) send({ type: "dm", user });
  $("dm-user").value = "";
});

$("older").addEventListener("click", () => {
  const r = room(state.current);
  if (r.log.length) send({ type: "history", room: state.current, before_seq: r.log[0].seq, limit: 50 });
});

$("my-state").addEventListener("change", (ev) => send({ type: "presence", state: ev.target.value }));

if (state.token) start();
