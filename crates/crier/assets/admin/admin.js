// crier's admin page: plain ES module, served by the node (GET /admin/admin.js), built on the
// REST API only. The API key lives in `apiKey` below and nowhere else: never in a URL, a cookie
// or the browser's storage. Everything shown is written with textContent (no HTML from data).

let apiKey = null;

const $ = (id) => document.getElementById(id);

/** Thrown by `api` for a non-2xx answer: the status and the contract's error body. */
class ApiFailure extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
  }
}

/** One REST call to this node (same origin), with the key as a Bearer token. */
async function api(method, path, body) {
  const init = {
    method,
    headers: { Authorization: `Bearer ${apiKey}` },
    cache: "no-store",
    credentials: "omit",
    redirect: "error",
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let parsed = null;
  try {
    parsed = await resp.json();
  } catch {
    parsed = null;
  }
  if (!resp.ok) throw new ApiFailure(resp.status, parsed);
  return parsed;
}

/** A message for a failed call; 404 of a route means this node does not have that feature. */
function describe(e, what) {
  if (e instanceof ApiFailure) {
    if (e.status === 401) {
      signOut("The API key was refused (401). Sign in again.");
      return `${what}: the API key was refused`;
    }
    if (e.status === 404 && e.code === "not_found") {
      return `${what}: not available on this node (404: this crier version has no such route)`;
    }
    return `${what}: ${e.status} ${e.code || ""} ${e.message}`.trim();
  }
  return `${what}: ${e.message || e}`;
}

function show(el, text, kind = "error") {
  el.replaceChildren();
  if (!text) return;
  const d = document.createElement("div");
  d.className = `msg ${kind}`;
  d.textContent = text;
  el.append(d);
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(table, rows) {
  const tbody = table.querySelector("tbody");
  tbody.replaceChildren(...rows);
}

function bytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function duration(s) {
  if (s === undefined || s === null) return "–";
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

// --- sign in / out ---

function signIn(key) {
  apiKey = key;
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("views").hidden = false;
  $("who").replaceChildren();
  const out = document.createElement("button");
  out.type = "button";
  out.className = "secondary";
  out.id = "signout";
  out.textContent = "Sign out";
  out.addEventListener("click", () => signOut(""));
  $("who").append(out);
  select("nodes");
}

function signOut(why) {
  apiKey = null;
  $("api-key").value = "";
  $("signin").hidden = false;
  $("nav").hidden = true;
  $("views").hidden = true;
  $("who").replaceChildren();
  show($("signin-msg"), why);
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = $("api-key").value.trim();
  $("api-key").value = "";
  if (!key) return;
  apiKey = key;
  try {
    await api("GET", "/api/v1/info");
    show($("signin-msg"), "");
    signIn(key);
  } catch (e) {
    apiKey = null;
    show($("signin-msg"), e instanceof ApiFailure && e.status === 401 ? "This API key was refused." : describe(e, "sign in"));
  }
});

// --- views ---

const loaders = {};

function select(view) {
  for (const b of document.querySelectorAll("#nav button")) {
    if (b.dataset.view === view) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  }
  for (const s of document.querySelectorAll("#views > section")) s.hidden = s.dataset.view !== view;
  document.body.dataset.view = view;
  if (loaders[view]) loaders[view]();
}

for (const b of document.querySelectorAll("#nav button")) {
  b.addEventListener("click", () => select(b.dataset.view));
}

// Nodes: version, uptime, connections by transport, memory.
loaders.nodes = async () => {
  try {
    const { nodes } = await api("GET", "/api/v1/info");
    nodes.sort((a, b) => a.node.localeCompare(b.node));
    show($("nodes-msg"), "");
    fill($("nodes-table"), nodes.map((n) => {
      const tr = document.createElement("tr");
      const t = n.transports || {};
      tr.append(cell(n.node), cell(n.version), cell(duration(n.uptime_s), "num"), cell(n.connections, "num"),
        cell(t.ws ?? "–", "num"), cell(t.sse ?? "–", "num"), cell(bytes(n.memory_bytes), "num"),
        cell(n.ready === false ? "no" : "yes"));
      return tr;
    }));
  } catch (e) {
    show($("nodes-msg"), describe(e, "nodes"));
  }
};
$("nodes-refresh").addEventListener("click", () => loaders.nodes());

// Channels: top by subscribers (of the pages loaded), search by prefix, paged by cursor.
let channelsLoaded = [];
let channelsCursor = null;

/** Channels read at once for "top by subscribers" (the API pages by name). */
const TOP_SCAN = 10000;

async function loadChannels(more) {
  const prefix = $("channels-prefix").value.trim();
  const top = $("channels-sort").value === "subscribers";
  try {
    let loaded = more ? channelsLoaded : [];
    let cursor = more ? channelsCursor : null;
    // Top by subscribers: read up to TOP_SCAN channels (1,000 per page) before ranking them.
    const budget = loaded.length + (top ? TOP_SCAN : 1000);
    do {
      const params = new URLSearchParams({ limit: "1000" });
      if (prefix) params.set("prefix", prefix);
      if (cursor) params.set("cursor", cursor);
      const page = await api("GET", `/api/v1/channels?${params}`);
      loaded = loaded.concat(page.channels);
      cursor = page.cursor;
    } while (cursor && loaded.length < budget);
    channelsLoaded = loaded;
    channelsCursor = cursor;
    show($("channels-msg"), channelsLoaded.length ? "" : "No active channels" + (prefix ? ` starting with “${prefix}”` : "") + ".", "info");
    renderChannels();
  } catch (e) {
    show($("channels-msg"), describe(e, "channels"));
  }
}

function renderChannels() {
  const rows = channelsLoaded.slice();
  if ($("channels-sort").value === "subscribers") rows.sort((a, b) => b.subscribers - a.subscribers || a.channel.localeCompare(b.channel));
  fill($("channels-table"), rows.slice(0, 200).map((c) => {
    const tr = document.createElement("tr");
    const name = cell("");
    const a = document.createElement("a");
    a.className = "link";
    a.textContent = c.channel;
    a.addEventListener("click", () => openChannel(c.channel));
    name.append(a);
    tr.append(name, cell(c.subscribers, "num"));
    return tr;
  }));
  $("channels-more").hidden = !channelsCursor;
  $("channels-note").textContent = `${channelsLoaded.length} channel(s) loaded` +
    (channelsCursor ? " (more exist: the top is of those loaded)" : "") + (rows.length > 200 ? ", first 200 shown" : "");
}

loaders.channels = () => loadChannels(false);
$("channels-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadChannels(false);
});
$("channels-sort").addEventListener("change", renderChannels);
$("channels-more").addEventListener("click", () => loadChannels(true));

// One channel: presence, presence_stats, recent history, publish, delete history.
let currentChannel = null;

function openChannel(name) {
  $("channel-name").value = name;
  select("channel");
}

function channelPath(name, rest) {
  return `/api/v1/channels/${encodeURIComponent(name)}/${rest}`;
}

async function loadChannel() {
  const name = $("channel-name").value.trim();
  if (!name) return;
  currentChannel = name;
  show($("channel-msg"), "");
  $("channel-body").hidden = false;
  const problems = [];
  try {
    const { clients } = await api("GET", channelPath(name, "presence"));
    fill($("presence-table"), clients.map((c) => {
      const tr = document.createElement("tr");
      tr.append(cell(c.client), cell(c.user), cell(c.node));
      return tr;
    }));
  } catch (e) {
    fill($("presence-table"), []);
    problems.push(describe(e, "presence"));
  }
  try {
    const s = await api("GET", channelPath(name, "presence_stats"));
    $("channel-stats").textContent = `${s.clients} client(s), ${s.users} user(s)`;
  } catch (e) {
    $("channel-stats").textContent = "";
    problems.push(describe(e, "presence_stats"));
  }
  try {
    const h = await api("GET", `${channelPath(name, "history")}?limit=20`);
    $("history-pos").textContent = `epoch ${h.epoch}, offset ${h.offset}`;
    fill($("history-table"), h.messages.slice().reverse().map((m) => {
      const tr = document.createElement("tr");
      const data = cell("");
      const pre = document.createElement("pre");
      pre.textContent = JSON.stringify(m.data);
      data.append(pre);
      tr.append(cell(m.offset, "num"), data);
      return tr;
    }));
  } catch (e) {
    fill($("history-table"), []);
    problems.push(describe(e, "history"));
  }
  show($("channel-msg"), problems.join("\n"));
}

loaders.channel = () => {
  if ($("channel-name").value.trim()) loadChannel();
};
$("channel-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadChannel();
});

$("publish-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!currentChannel) return;
  let data;
  try {
    data = JSON.parse($("publish-data").value);
  } catch {
    show($("publish-msg"), "The message must be JSON.");
    return;
  }
  try {
    const r = await api("POST", "/api/v1/publish", { channel: currentChannel, data });
    show($("publish-msg"), `Published at offset ${r.offset} (epoch ${r.epoch}).`, "info");
    $("publish-data").value = "";
    loadChannel();
  } catch (e) {
    show($("publish-msg"), describe(e, "publish"));
  }
});

$("history-delete").addEventListener("click", async () => {
  if (!currentChannel || !window.confirm(`Delete the history of ${currentChannel}?`)) return;
  try {
    await api("DELETE", channelPath(currentChannel, "history"));
    show($("publish-msg"), "History deleted: the channel continues in a new epoch.", "info");
    loadChannel();
  } catch (e) {
    show($("publish-msg"), describe(e, "delete history"));
  }
});

// One user: connections, disconnect, invalidate tokens.
let currentUser = null;

async function loadUser(keepMessage = false) {
  const user = $("user-name").value.trim();
  if (!user) return;
  currentUser = user;
  $("user-body").hidden = false;
  if (!keepMessage) show($("user-action-msg"), "");
  try {
    const { connections } = await api("GET", `/api/v1/users/${encodeURIComponent(user)}/connections`);
    show($("user-msg"), connections.length ? "" : "No live connection.", "info");
    fill($("connections-table"), connections.map((c) => {
      const tr = document.createElement("tr");
      tr.append(cell(c.client), cell(c.node), cell(c.transport), cell((c.channels || []).join(", ")));
      return tr;
    }));
  } catch (e) {
    fill($("connections-table"), []);
    show($("user-msg"), describe(e, "connections"));
  }
}

$("user-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadUser();
});

$("user-disconnect").addEventListener("click", async () => {
  if (!currentUser) return;
  try {
    const r = await api("POST", "/api/v1/disconnect", { user: currentUser });
    show($("user-action-msg"), `Disconnected ${r.disconnected} connection(s).`, "info");
    loadUser(true);
  } catch (e) {
    show($("user-action-msg"), describe(e, "disconnect"));
  }
});

$("user-invalidate").addEventListener("click", async () => {
  if (!currentUser || !window.confirm(`Invalidate every token of ${currentUser} issued until now?`)) return;
  try {
    const r = await api("POST", `/api/v1/users/${encodeURIComponent(currentUser)}/invalidate`, {});
    show($("user-action-msg"), `Tokens invalidated; ${r.disconnected} connection(s) closed.`, "info");
    loadUser(true);
  } catch (e) {
    show($("user-action-msg"), describe(e, "invalidate tokens"));
  }
});

document.body.dataset.ready = "1";
