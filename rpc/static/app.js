// The gpumesh dashboard and explorer: plain JS, no build step, no third-party code.
// It talks JSON-RPC (POST /) and WebSocket (/ws) to the node that served it. The bearer token
// arrives in the URL fragment (#token=...), which browsers never send to a server; it is kept
// in sessionStorage and the fragment is replaced by the page route.
"use strict";

const TOKEN_KEY = "gpumesh.token";
const PAGE_ITEMS = 25;
const LOG_REFRESH_MS = 1000;
const FINAL_STATES = new Set(["done", "failed", "cancelled", "refunded", "output_mismatch"]);

(function takeToken() {
  const hash = location.hash.replace(/^#/, "");
  const params = new URLSearchParams(hash.startsWith("token=") ? hash : "");
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + "#" + (params.get("page") || "/"));
  }
})();

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// -- JSON-RPC ---------------------------------------------------------------------------------

let nextId = 1;
async function rpc(method, params) {
  const response = await fetch("/", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + token() },
    body: JSON.stringify({ jsonrpc: "2.0", id: nextId++, method, params: params || {} }),
  });
  const body = await response.json();
  if (body.error) {
    const error = new Error(method + ": " + body.error.message);
    error.code = body.error.code;
    throw error;
  }
  return body.result;
}

async function rpcOrNull(method, params) {
  try {
    return await rpc(method, params);
  } catch (error) {
    if (error.code === -32004) return null;
    throw error;
  }
}

// -- WebSocket subscriptions (one connection, reopened if it drops) ---------------------------

const listeners = { newHeads: new Set(), jobs: new Set(), peers: new Set() };
let socket = null;
let socketRetryMs = 500;

function openSocket() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws?token=" +
    encodeURIComponent(token());
  const ws = new WebSocket(url);
  const topics = new Map();
  ws.onopen = () => {
    socketRetryMs = 500;
    document.getElementById("live").textContent = "live";
    document.getElementById("live").className = "on";
    let id = 1;
    for (const topic of Object.keys(listeners)) {
      topics.set(id, topic);
      ws.send(JSON.stringify({ jsonrpc: "2.0", id: id++, method: "rpc_subscribe", params: [topic] }));
    }
  };
  const subscriptions = new Map();
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.id !== undefined && topics.has(message.id) && message.result) {
      subscriptions.set(message.result, topics.get(message.id));
      return;
    }
    if (message.method === "subscription") {
      const topic = subscriptions.get(message.params.subscription);
      for (const listener of listeners[topic] || []) listener(message.params.result);
    }
  };
  ws.onclose = () => {
    document.getElementById("live").textContent = "offline";
    document.getElementById("live").className = "";
    socket = null;
    setTimeout(openSocket, socketRetryMs);
    socketRetryMs = Math.min(socketRetryMs * 2, 10000);
  };
  socket = ws;
}

// Listeners registered by a page are removed when the route changes.
let pageListeners = [];
let pageTimers = [];
function listen(topic, fn) {
  listeners[topic].add(fn);
  pageListeners.push([topic, fn]);
}
function every(ms, fn) {
  pageTimers.push(setInterval(fn, ms));
}
function leavePage() {
  for (const [topic, fn] of pageListeners) listeners[topic].delete(fn);
  for (const timer of pageTimers) clearInterval(timer);
  pageListeners = [];
  pageTimers = [];
}

// -- DOM helpers: text only, never HTML from data ---------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "href") node.setAttribute("href", value);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function short(text, keep) {
  keep = keep || 10;
  text = String(text || "");
  return text.length <= 2 * keep + 3 ? text : text.slice(0, keep) + "..." + text.slice(-keep);
}

function link(route, text, title) {
  return el("a", { href: "#" + route, title: title || "" }, text);
}

function addressLink(address) {
  return address ? link("/account/" + address, short(address), address) : "";
}

function card(label, value, testid) {
  return el("div", { class: "card", "data-testid": testid },
    el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

function table(headers, rows, testid) {
  return el("table", { "data-testid": testid },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.length ? rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c))))
      : [el("tr", {}, el("td", { colSpan: headers.length }, "none"))]));
}

function pairs(object, testid) {
  const list = el("dl", { "data-testid": testid });
  for (const [key, value] of Object.entries(object)) {
    list.append(el("dt", {}, key.replace(/_/g, " ")),
      el("dd", {}, value !== null && typeof value === "object" ? JSON.stringify(value) : String(value)));
  }
  return list;
}

function when(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
}

function b64text(data) {
  try {
    return new TextDecoder().decode(Uint8Array.from(atob(data || ""), (c) => c.charCodeAt(0)));
  } catch (error) {
    return "";
  }
}

// -- pages ------------------------------------------------------------------------------------

const pages = [];
function page(pattern, render) {
  pages.push([pattern, render]);
}

page(/^\/$/, async (view) => {
  const info = await rpc("node_info");
  const [head, peers, offers, jobs, summary] = await Promise.all([
    rpc("chain_head"), rpc("net_peerCount"), rpc("market_offers"), rpc("job_list", { role: "all" }),
    rpc("chain_accountSummary", { address: info.address }),
  ]);
  const height = el("div", { class: "value", "data-testid": "height" }, head.height);
  view.append(
    el("h1", {}, "Node ", el("span", { class: "mono", "data-testid": "peer-id" }, info.peer_id)),
    el("div", { class: "cards" },
      el("div", { class: "card" }, el("div", { class: "label" }, "height"), height),
      card("peers", peers, "peers"),
      card("offers", offers.length, "offers"),
      card("my jobs", jobs.length, "jobs"),
      card("balance", summary.account.balance, "balance"),
      card("earned", summary.totals.earned, "earned"),
      card("spent", summary.totals.spent, "spent"),
      card("chain", info.chain_id, "chain")),
    el("h2", {}, "Identity"),
    pairs({ address: info.address, version: info.version, uptime_s: info.uptime_s,
      listening: info.listen_addrs.join(", ") }, "identity"),
    el("h2", {}, "Latest blocks"),
  );
  const blocks = await rpc("chain_blocks", { limit: 5 });
  view.append(blocksTable(blocks.items));
  listen("newHeads", (block) => { height.textContent = block.height; });
});

function blocksTable(items) {
  return table(["height", "hash", "time", "proposer", "txs"], items.map((b) => [
    link("/block/" + b.height, b.height), el("span", { class: "mono" }, short(b.hash)), when(b.time_ms),
    addressLink(b.proposer), b.tx_count,
  ]), "blocks");
}

page(/^\/blocks(?:\/before\/(\d+))?$/, async (view, before) => {
  const params = { limit: PAGE_ITEMS };
  if (before) params.before = Number(before);
  const page = await rpc("chain_blocks", params);
  view.append(el("h1", {}, "Blocks"), blocksTable(page.items));
  const pager = el("div", { class: "pager" });
  if (page.next_before) pager.append(link("/blocks/before/" + page.next_before, "older blocks"));
  view.append(pager);
});

page(/^\/block\/([0-9a-fA-F]+)$/, async (view, id) => {
  const params = /^\d+$/.test(id) && id.length < 20 ? { height: Number(id) } : { hash: id };
  const block = await rpc("chain_block", params);
  const rest = Object.fromEntries(Object.entries(block).filter(([k]) => k !== "tx_hashes"));
  view.append(el("h1", {}, "Block ", el("span", { "data-testid": "block-height" }, block.height)),
    pairs(rest, "block"), el("h2", {}, "Transactions"),
    table(["hash"], block.tx_hashes.map((h) => [link("/tx/" + h, h)]), "block-txs"));
});

page(/^\/tx\/([0-9a-fA-F]{64})$/, async (view, hash) => {
  const tx = await rpc("chain_tx", { hash });
  view.append(el("h1", {}, "Transaction"),
    pairs({ hash, state: tx.state, block: tx.height, index: tx.index, ok: tx.ok, error: tx.error || "" },
      "tx"),
    el("h2", {}, "Body"), pairs(tx.tx, "tx-body"),
    el("p", {}, link("/block/" + tx.height, "block " + tx.height), " · from ",
      addressLink(tx.tx.signer)));
});

page(/^\/account\/([0-9a-fA-F]{64})(?:\/after\/([0-9a-f]+))?$/, async (view, address, cursor) => {
  const summary = await rpc("chain_accountSummary", { address });
  const params = { address, limit: PAGE_ITEMS };
  if (cursor) params.cursor = cursor;
  const txs = await rpc("chain_accountTransactions", params);
  view.append(el("h1", {}, "Account ", el("span", { class: "mono", "data-testid": "account" }, address)),
    el("div", { class: "cards" },
      card("balance", summary.account.balance, "balance"),
      card("earned", summary.totals.earned, "earned"),
      card("spent", summary.totals.spent, "spent"),
      card("fees", summary.totals.fees, "fees"),
      card("transactions", summary.totals.transactions, "tx-count")),
    el("h2", {}, "State"), pairs(summary.account, "account-state"),
    el("h2", {}, "Transactions"),
    table(["hash", "block", "kind", "from", "result"], txs.items.map((t) => [
      link("/tx/" + t.hash, short(t.hash)), link("/block/" + t.height, t.height), t.kind,
      addressLink(t.signer), t.ok ? "ok" : "failed: " + (t.error || ""),
    ]), "account-txs"),
    el("p", {}, link("/receipts/" + address, "receipts and trades of this account")));
  if (txs.next_cursor) {
    view.append(el("div", { class: "pager" },
      link("/account/" + address + "/after/" + txs.next_cursor, "older transactions")));
  }
});

function tradesTable(items, testid) {
  return table(["job", "closed at", "status", "requester", "provider", "paid"], items.map((i) => [
    link("/trade/" + i.job_id, short(i.job_id)), link("/block/" + i.closed_height, i.closed_height),
    i.trade ? i.trade.status : "", addressLink(i.trade && i.trade.terms.requester),
    addressLink(i.trade && i.trade.terms.provider), i.trade ? i.trade.paid : "",
  ]), testid);
}

page(/^\/receipts(?:\/([0-9a-fA-F]{64}))?$/, async (view, who) => {
  const address = who || (await rpc("node_info")).address;
  const [asProvider, asRequester] = await Promise.all([
    rpc("chain_receipts", { provider: address, limit: PAGE_ITEMS }),
    rpc("chain_receipts", { requester: address, limit: PAGE_ITEMS }),
  ]);
  view.append(el("h1", {}, "Receipts and trades of ", addressLink(address)),
    el("h2", {}, "As provider"), tradesTable(asProvider.items, "receipts-provider"),
    el("h2", {}, "As requester"), tradesTable(asRequester.items, "receipts-requester"));
});

page(/^\/trade\/([0-9a-fA-F]{64})$/, async (view, jobId) => {
  const [trade, receipt] = await Promise.all([
    rpcOrNull("chain_trade", { job_id: jobId }), rpcOrNull("chain_receipt", { job_id: jobId }),
  ]);
  view.append(el("h1", {}, "Trade ", el("span", { class: "mono" }, short(jobId))),
    trade ? pairs(trade, "trade") : el("p", {}, "no trade on chain for this job"),
    el("h2", {}, "Receipt"), receipt ? pairs(receipt, "receipt") : el("p", {}, "not settled"));
});

page(/^\/providers$/, async (view) => {
  const offers = await rpc("market_offers");
  view.append(el("h1", {}, "Providers"), table(["provider", "GPUs", "free", "prices", "sandbox"],
    offers.map((o) => [
      link("/provider/" + o.provider, short(o.provider), o.provider),
      o.gpus.map((g) => g.model).join(", ") || "CPU only",
      o.gpus.length ? o.free_gpus + " GPU" : o.free_cpu_slots + " CPU",
      Object.entries(o.prices || {}).map(([m, p]) => m + "=" + p).join(", "), o.sandbox,
    ]), "providers"));
});

page(/^\/provider\/([0-9a-fA-F]{64})$/, async (view, address) => {
  const [offers, summary, receipts] = await Promise.all([
    rpc("market_offers"), rpc("chain_accountSummary", { address }),
    rpc("chain_receipts", { provider: address, limit: PAGE_ITEMS }),
  ]);
  const offer = offers.find((o) => o.provider === address);
  const account = summary.account;
  view.append(el("h1", {}, "Provider ", el("span", { class: "mono" }, short(address))),
    el("div", { class: "cards" },
      card("completed", account.completed ?? summary.totals.jobs_provided, "completed"),
      card("failed", account.failed ?? 0, "failed"),
      card("slashed", account.slashed ?? 0, "slashed"),
      card("bonded", account.bonded ?? 0, "bonded"),
      card("earned", summary.totals.earned, "earned")),
    el("h2", {}, "Offer"), offer ? pairs(offer, "offer") : el("p", {}, "no live offer"),
    el("h2", {}, "Closed trades"), tradesTable(receipts.items, "provider-trades"),
    el("p", {}, link("/account/" + address, "account and transactions")));
});

page(/^\/jobs$/, async (view) => {
  const jobs = await rpc("job_list", { role: "all" });
  const body = table(["job", "role", "state", "provider", "cost"], jobs.map((j) => [
    link("/job/" + j.id, short(j.id)), j.role, j.state, addressLink(j.provider), j.cost ?? "",
  ]), "job-list");
  view.append(el("h1", {}, "Jobs on this node"), body);
  listen("jobs", () => route());
});

page(/^\/job\/([0-9a-fA-F]{64})$/, async (view, jobId) => {
  const job = await rpc("job_status", { job_id: jobId });
  const state = el("span", { "data-testid": "job-state" }, job.state);
  const details = el("div", {}, pairs(job, "job"));
  const stdout = el("pre", { "data-testid": "job-stdout" }, "");
  const stderr = el("pre", { "data-testid": "job-stderr" }, "");
  view.append(el("h1", {}, "Job ", el("span", { class: "mono" }, short(jobId)), " · ", state),
    details, el("h2", {}, "stdout"), stdout, el("h2", {}, "stderr"), stderr);
  let current = job.state;
  async function refreshLogs() {
    const logs = await rpcOrNull("job_logs", { job_id: jobId });
    if (logs) {
      stdout.textContent = b64text(logs.stdout);
      stderr.textContent = b64text(logs.stderr);
    }
  }
  await refreshLogs();
  listen("jobs", async (record) => {
    if (record.id !== jobId) return;
    current = record.state;
    state.textContent = record.state;
    details.replaceChildren(pairs(await rpc("job_status", { job_id: jobId }), "job"));
    await refreshLogs();
  });
  every(LOG_REFRESH_MS, () => { if (!FINAL_STATES.has(current)) refreshLogs(); });
});

// -- search -----------------------------------------------------------------------------------

async function search(query) {
  query = query.trim().replace(/^0x/, "").toLowerCase();
  if (/^\d+$/.test(query) && query.length < 20) return "/block/" + query;
  if (!/^[0-9a-f]{64}$/.test(query)) return null;
  if (await rpcOrNull("chain_tx", { hash: query }).catch(() => null)) return "/tx/" + query;
  if (await rpcOrNull("chain_block", { hash: query }).catch(() => null)) return "/block/" + query;
  if (await rpcOrNull("job_status", { job_id: query }).catch(() => null)) return "/job/" + query;
  if (await rpcOrNull("chain_trade", { job_id: query }).catch(() => null)) return "/trade/" + query;
  return "/account/" + query;
}

document.getElementById("search").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("search-input");
  const target = await search(input.value);
  if (target) location.hash = "#" + target;
  else document.getElementById("footer").textContent = "nothing matches " + input.value;
});

// -- router -----------------------------------------------------------------------------------

let routing = 0;
async function route() {
  const path = location.hash.replace(/^#/, "") || "/";
  const mine = ++routing;
  leavePage();
  const view = el("main", { id: "view" });
  document.body.dataset.view = "loading";
  for (const [pattern, render] of pages) {
    const match = path.match(pattern);
    if (!match) continue;
    try {
      await render(view, ...match.slice(1));
      if (mine !== routing) return;
      document.getElementById("view").replaceWith(view);
      document.body.dataset.view = path;
    } catch (error) {
      if (mine !== routing) return;
      document.getElementById("view").replaceWith(
        el("main", { id: "view" }, el("p", { class: "error", "data-testid": "error" }, error.message)));
      document.body.dataset.view = "error:" + path;
    }
    return;
  }
  document.getElementById("view").replaceWith(el("main", { id: "view" }, el("p", {}, "no such page")));
  document.body.dataset.view = "missing:" + path;
}

window.addEventListener("hashchange", route);
if (!token()) {
  document.getElementById("view").replaceChildren(el("p", { class: "error", "data-testid": "error" },
    "No token: open the URL that `gpumesh dashboard` prints."));
  document.body.dataset.view = "error:no-token";
} else {
  openSocket();
  route();
}
