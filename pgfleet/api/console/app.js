// pgfleet console: plain DOM, no framework. Every value goes into the page as text
// (textContent), never as HTML. The token lives in sessionStorage and travels only in the
// Authorization header.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_EVENTS = 100;
let token = null;
let refreshTimer = null;
let streamAbort = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function api(method, path, body) {
  const resp = await fetch(path, {
    method,
    headers: Object.assign({ Authorization: "Bearer " + token }, body ? { "Content-Type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  if (resp.status === 401) { signOut("The token was not accepted."); throw new Error("unauthorized"); }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok || data.status !== "success") throw new Error(data.message || "HTTP " + resp.status);
  return data.data;
}

function notice(text, isError) {
  const n = $("notice");
  n.textContent = text;
  n.className = "notice" + (isError ? " error" : "");
}

function sparkline(wakes) {
  const w = 120, h = 22, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const title = document.createElementNS(ns, "title");
  title.textContent = wakes.length
    ? `${wakes.length} recent wakes, latest ${wakes[wakes.length - 1][1]} ms`
    : "no wakes yet";
  svg.append(title);
  const last = wakes.slice(-30);
  const max = Math.max(50, ...last.map((x) => x[1]));
  const bw = w / 30;
  last.forEach(([, ms], i) => {
    const bh = Math.max(2, (ms / max) * (h - 2));
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", (i * bw).toFixed(1));
    r.setAttribute("y", (h - bh).toFixed(1));
    r.setAttribute("width", (bw - 1).toFixed(1));
    r.setAttribute("height", bh.toFixed(1));
    r.setAttribute("fill", ms > 150 ? "#e0a030" : "#2d6cdf");
    svg.append(r);
  });
  return svg;
}

function action(label, cls, fn) {
  return el("button", { type: "button", class: cls, onclick: async (ev) => {
    ev.target.disabled = true;
    try { await fn(); } catch (e) { notice(e.message, true); } finally { ev.target.disabled = false; refreshSoon(0); }
  } }, label);
}

function renderDatabases(rows) {
  const body = $("databases").querySelector("tbody");
  body.replaceChildren();
  $("no-databases").classList.toggle("hidden", rows.length > 0);
  for (const d of rows) {
    const name = d.name;
    const path = "/v1/databases/" + encodeURIComponent(name);
    const buttons = el("td", {});
    if (d.state === "running") buttons.append(action("Suspend", "", () => api("PUT", path + "/suspend")));
    if (d.state === "standby" || d.state === "stopped") buttons.append(action("Resume", "", () => api("PUT", path + "/resume")));
    buttons.append(" ", action("Branch", "", async () => {
      const branch = window.prompt(`Name of the new branch of ${name}:`, `${name}-branch`);
      if (!branch) return;
      const made = await api("POST", path + "/branches", { name: branch });
      notice(`Branched ${name} into ${made.name}.` + (made.password ? ` Its password, shown once: ${made.password}` : ""));
    }));
    buttons.append(" ", action("Delete", "danger", async () => {
      if (!window.confirm(`Delete ${name} and all its data?`)) return;
      await api("DELETE", path);
      notice(`${name} deleted.`);
    }));
    body.append(el("tr", { "data-name": name },
      el("td", { class: "name", title: d.uri }, name),
      el("td", {}, el("span", { class: "state " + d.state }, d.state)),
      el("td", {}, d.tier || "–"),
      el("td", {}, `${d.memory_mb} MiB`),
      el("td", {}, d.clients),
      el("td", {}, sparkline(d.wakes)),
      buttons));
  }
}

function eventText(e) {
  if (e.kind === "transition") return `${e.from || "–"} → ${e.to}` + (e.reason ? ` (${e.reason})` : "");
  const skip = new Set(["seq", "at", "kind", "database", "uuid"]);
  return Object.entries(e).filter(([k, v]) => !skip.has(k) && v !== null).map(([k, v]) => `${k}=${v}`).join(" ");
}

function addEvent(e, atTop) {
  const list = $("events");
  const item = el("li", {},
    el("span", { class: "at" }, (e.at || "").replace("T", " ").replace(/\.\d+Z$/, "")),
    el("span", { class: "kind " + e.kind }, e.kind), e.database ? e.database + " " : "", eventText(e));
  if (atTop) list.prepend(item); else list.append(item);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

async function refresh() {
  const [data, status] = await Promise.all([api("GET", "/v1/console/databases"), api("GET", "/v1/status")]);
  renderDatabases(data.databases);
  $("events").replaceChildren();
  data.events.forEach((e) => addEvent(e, false));
  const states = Object.entries(status.states).map(([s, n]) => `${n} ${s}`).join(", ") || "no databases";
  $("status").textContent = `${status.version} · ${status.driver} driver · ${states}`;
}

function refreshSoon(delay) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => refresh().catch((e) => notice(e.message, true)), delay === undefined ? 250 : delay);
}

// Server-Sent Events through fetch (EventSource cannot send an Authorization header)
async function follow() {
  while (token) {
    streamAbort = new AbortController();
    try {
      const resp = await fetch("/v1/events?follow=true&limit=0", {
        headers: { Authorization: "Bearer " + token }, signal: streamAbort.signal });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      $("live").textContent = "live";
      $("live").classList.add("on");
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
          if (!data || /^event: lost/m.test(block)) continue;
          addEvent(JSON.parse(data), true);
          refreshSoon();
        }
      }
    } catch (e) {
      if (!token) return;
    }
    $("live").textContent = "reconnecting…";
    $("live").classList.remove("on");
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function signOut(message) {
  token = null;
  sessionStorage.removeItem("pgfleet-token");
  if (streamAbort) streamAbort.abort();
  $("app").classList.add("hidden");
  $("logout").classList.add("hidden");
  $("login").classList.remove("hidden");
  $("live").textContent = "";
  const err = $("login-error");
  err.textContent = message || "";
  err.classList.toggle("hidden", !message);
}

async function signIn(candidate) {
  token = candidate;
  try {
    await refresh();
  } catch (e) {
    if (token) signOut(e.message);
    return;
  }
  sessionStorage.setItem("pgfleet-token", token);
  $("login").classList.add("hidden");
  $("app").classList.remove("hidden");
  $("logout").classList.remove("hidden");
  follow();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value.trim()); });
  $("logout").addEventListener("click", () => signOut());
  $("create-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = $("new-name").value.trim();
    $("create").disabled = true;
    try {
      const d = await api("POST", "/v1/databases", { name, memory_mb: Number($("new-memory").value) });
      notice(`Created ${d.name}. Its password, shown once: ${d.password}  URI: ${d.uri}`);
      $("new-name").value = "";
    } catch (e) {
      notice(e.message, true);
    } finally {
      $("create").disabled = false;
      refreshSoon(0);
    }
  });
  // `pgfleet console` hands the token over in the fragment, which never reaches a server
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) history.replaceState(null, "", location.pathname);
  const saved = fromLink || sessionStorage.getItem("pgfleet-token");
  if (saved) signIn(saved); else signOut();
});
