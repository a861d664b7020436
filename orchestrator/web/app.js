// gpuhop dashboard: a small single-page view over the daemon's /v1 API, no framework, no build.
// Every value from the API is written with textContent (never as HTML), so a hostile job name,
// command or log line stays text. The API token lives in this tab's sessionStorage only.
"use strict";

const TOKEN_KEY = "gpuhop-token";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const REFRESH_MS = 2000;
let timer = null;        // the current view's refresh
let logAbort = null;     // the current log stream

// ------------------------------------------------------------------ small helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const money = (x) => (x === null || x === undefined) ? "-" : "$" + (x < 10 ? x.toFixed(4) : x.toFixed(2));
const when = (iso) => iso ? new Date(iso).toLocaleString() : "-";

function ago(iso) {
  if (!iso) return "-";
  const s = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return Math.round(s / 86400) + " d";
}

function statusSpan(status) {
  return el("span", { class: "status s-" + status, "data-testid": "status", text: status });
}

function where(attempt) {
  if (!attempt) return "-";
  const gpu = attempt.gpu ? `${attempt.gpu} x${attempt.gpu_count}` : "cpu";
  return `${attempt.provider} ${attempt.region || ""} ${gpu}`.replace(/\s+/g, " ");
}

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { "Authorization": "Bearer " + sessionStorage.getItem(TOKEN_KEY), ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, { ...options, headers, body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  } catch (exc) {
    throw new ApiError("the daemon does not answer (is it running?); retrying", 0);
  }
  if (resp.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new ApiError("the token was refused", 401);
  }
  const ctype = resp.headers.get("Content-Type") || "";
  const data = ctype.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) throw new ApiError((data && data.error && data.error.message) || resp.statusText, resp.status);
  return data;
}

// ------------------------------------------------------------------ views

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function every(fn) {
  // run fn now and every REFRESH_MS while this view is shown; an error shows, the loop goes on
  const box = el("div", { class: "error", "data-testid": "refresh-error" });
  const run = async () => {
    try { await fn(); box.textContent = ""; }
    catch (exc) {
      if (exc.status === 401) { route(); loginView("The daemon refused the token (was it changed?): log in again."); }
      else box.textContent = exc.message;
    }
  };
  run();
  timer = setInterval(run, REFRESH_MS);
  return box;
}

function loginView(message) {
  const input = el("input", { type: "password", id: "token", autocomplete: "current-password", "data-testid": "token",
                              placeholder: "the daemon's API token" });
  const err = el("div", { class: "error", "data-testid": "login-error", text: message || "" });
  const form = el("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      try { await api("/v1/status"); location.hash = "#/jobs"; route(); }
      catch (exc) { err.textContent = exc.status === 401 ? "That token was refused." : exc.message; }
    },
  }, el("p", {}, "Paste the daemon's API token (the file ", el("code", { text: "token" }),
               " in its state directory), or run ", el("code", { text: "gpuhop dashboard" }),
               " on the daemon's host for a link that logs in."),
     input, el("p", {}, el("button", { type: "submit", "data-testid": "login" }, "Log in")), err);
  show(el("div", { class: "login" }, el("h1", { text: "Log in to gpuhop" }), form));
}

function jobsTable(jobs) {
  const body = jobs.map((j) => {
    const last = j.attempts[j.attempts.length - 1];
    return el("tr", { class: "click", "data-testid": "job-row", "data-job": j.id, onclick: () => { location.hash = "#/jobs/" + j.id; } },
      el("td", { class: "mono", text: j.id.slice(0, 12) }), el("td", { text: j.name }), el("td", {}, statusSpan(j.status)),
      el("td", { class: "num", text: j.attempt_count }), el("td", { text: where(last) }),
      el("td", { class: "num", text: money(j.cost_usd) }), el("td", { text: ago(j.created_at) }),
      el("td", { class: "muted", text: j.end_reason || j.message || "" }));
  });
  return el("table", { "data-testid": "jobs" },
    el("thead", {}, el("tr", {}, ...["id", "name", "status", "attempts", "where", "cost", "age", "why / now"]
      .map((h) => el("th", { class: ["attempts", "cost"].includes(h) ? "num" : null, text: h })))),
    el("tbody", {}, body.length ? body : [el("tr", {}, el("td", { colspan: 8, class: "muted", text: "No jobs yet: submit one below, or with gpuhop submit." }))]));
}

function submitForm() {
  const f = (name, attrs) => el("input", { name, id: "f-" + name, "data-testid": "f-" + name, ...attrs });
  const err = el("div", { class: "error", "data-testid": "submit-error" });
  const form = el("form", { class: "grid", "data-testid": "submit-form" },
    el("label", { for: "f-name", text: "name" }), f("name", { required: true, maxlength: 64, placeholder: "llama-finetune" }),
    el("label", { for: "f-command", text: "command" }), f("command", { required: true, placeholder: "python train.py --resume" }),
    el("label", { for: "f-image", text: "image" }), f("image", { placeholder: "python:3.11-slim" }),
    el("label", { for: "f-gpu", text: "GPU types" }), f("gpu", { placeholder: "any; or e.g. A100-80GB, H100" }),
    el("label", { for: "f-gpu_count", text: "GPUs" }), f("gpu_count", { type: "number", min: 0, max: 16, value: 1 }),
    el("label", { for: "f-max_price", text: "max $/h" }), f("max_price", { type: "number", min: 0, step: "0.01", placeholder: "no limit" }),
    el("label", { for: "f-volume", text: "volume" }), f("volume", { maxlength: 64, placeholder: "none; a name to checkpoint into" }),
    el("label", { for: "f-volume_gb", text: "volume GB" }), f("volume_gb", { type: "number", min: 1, value: 50 }),
    el("label", { for: "f-force", text: "queue anyway" }),
    el("label", {}, f("force", { type: "checkbox" }), " even if no configured provider offers it"),
    el("span"), el("span", {}, el("button", { type: "submit", "data-testid": "submit" }, "Submit")),
    el("span"), err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const v = (name) => form.elements[name].value.trim();
    const spec = { name: v("name"), command: ["sh", "-c", v("command")],
                   resources: { gpu_count: Number(v("gpu_count") || 0) } };
    if (v("image")) spec.image = v("image");
    if (v("gpu")) spec.resources.gpu = v("gpu").split(",").map((s) => s.trim()).filter(Boolean);
    if (v("max_price")) spec.placement = { max_price_per_hour: Number(v("max_price")) };
    if (v("volume")) spec.volume = { name: v("volume"), size_gb: Number(v("volume_gb") || 50) };
    const force = form.elements.force.checked ? "?force=true" : "";
    try {
      const job = await api("/v1/jobs" + force, { method: "POST", body: spec });
      location.hash = "#/jobs/" + job.id;
    } catch (exc) { err.textContent = exc.message; }
  });
  return el("details", { "data-testid": "submit-details" }, el("summary", { text: "Submit a job" }), form);
}

function jobsView() {
  const holder = el("div");
  const counts = el("div", { class: "cards" });
  show(el("h1", { text: "Jobs" }), counts, holder, submitForm(), every(async () => {
    const [list, status] = await Promise.all([api("/v1/jobs?limit=200"), api("/v1/status")]);
    holder.replaceChildren(jobsTable(list.jobs));
    counts.replaceChildren(...Object.entries(status.jobs).filter(([, n]) => n)
      .map(([s, n]) => el("div", { class: "card" }, el("div", { class: "k", text: s }), el("div", { class: "v", text: n }))));
  }));
}

function timeline(job) {
  // one bar per attempt, from its launch to its end (or now), on the job's own time axis
  const now = Date.now();
  const t0 = new Date(job.created_at).getTime();
  const t1 = job.finished_at ? new Date(job.finished_at).getTime() : now;
  const span = Math.max(1000, t1 - t0);
  const W = 900, row = 26, left = 8, top = 20;
  const x = (ms) => left + ((ms - t0) / span) * (W - 2 * left);
  const g = svg("svg", { viewBox: `0 0 ${W} ${top + row * Math.max(1, job.attempts.length) + 6}`, width: "100%",
                         role: "img", "aria-label": "attempts over time", "data-testid": "timeline" });
  g.append(svg("text", { x: left, y: 12 }, new Date(t0).toLocaleTimeString()));
  g.append(svg("text", { x: W - left, y: 12, "text-anchor": "end" }, job.finished_at ? new Date(t1).toLocaleTimeString() : "now"));
  job.attempts.forEach((a, i) => {
    const start = new Date(a.launched_at || a.created_at || job.created_at).getTime();
    const end = a.ended_at ? new Date(a.ended_at).getTime() : now;
    const cls = a.status !== "ended" ? "bar-running" : ["succeeded", "failed", "preempted", "lost"].includes(a.end_reason) ? "bar-" + a.end_reason : "bar-other";
    const y = top + i * row;
    const rect = svg("rect", { x: x(start), y, width: Math.max(3, x(end) - x(start)), height: row - 8, rx: 3, class: cls });
    rect.append(svg("title", {}, `attempt ${a.number}: ${where(a)} ${a.capacity}, ${a.end_reason || a.status}, ${money(a.cost_usd)}`));
    g.append(rect);
    const label = `#${a.number} ${where(a)} · ${a.end_reason || a.status} · ${money(a.cost_usd)}`;
    const lx = Math.min(x(start) + 4, W - 300);
    g.append(svg("text", { x: lx, y: y + row - 13 }, label));
  });
  return g;
}

function attemptsTable(attempts) {
  const head = ["#", "provider", "region", "GPU", "capacity", "$/h", "instance", "status", "ended", "cost", "detail"];
  return el("table", { "data-testid": "attempts" },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...attempts.map((a) => el("tr", {},
      el("td", { text: a.number }), el("td", { text: a.provider }), el("td", { text: a.region || "-" }),
      el("td", { text: a.gpu ? `${a.gpu} x${a.gpu_count}` : "cpu" }), el("td", { text: a.capacity }),
      el("td", { class: "num", text: a.price_per_hour.toFixed(3) }), el("td", { class: "mono", text: a.instance_id || "-" }),
      el("td", {}, statusSpan(a.status)), el("td", { text: a.end_reason || "-" }),
      el("td", { class: "num", text: money(a.cost_usd) }), el("td", { class: "muted", text: a.detail || a.placement_reason || "" })))));
}

async function followLogs(jobId, pre) {
  // the job's output as it comes (logs?follow=true), read as a stream; reconnects while the job runs
  if (logAbort) logAbort.abort();
  const abort = new AbortController();
  logAbort = abort;
  let shown = 0;
  while (!abort.signal.aborted) {
    try {
      const resp = await fetch(`/v1/jobs/${jobId}/logs?follow=true`, {
        headers: { "Authorization": "Bearer " + sessionStorage.getItem(TOKEN_KEY) }, signal: abort.signal });
      if (!resp.ok) { pre.dataset.state = "error"; return; }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let seen = 0;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        let text = decoder.decode(value, { stream: true });
        if (seen + text.length <= shown) { seen += text.length; continue; }   // already shown before a reconnect
        if (seen < shown) { text = text.slice(shown - seen); seen = shown; }
        seen += text.length; shown = seen;
        const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.append(document.createTextNode(text));
        if (stick) pre.scrollTop = pre.scrollHeight;
      }
      pre.dataset.state = "ended";
      const job = await api(`/v1/jobs/${jobId}`);
      if (TERMINAL.has(job.status)) return;
    } catch (exc) {
      if (abort.signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, REFRESH_MS));
  }
}

function jobView(jobId) {
  const head = el("div");
  const line = el("div");
  const table = el("div");
  const events = el("div");
  const pre = el("pre", { class: "logs", "data-testid": "logs" });
  const cancel = el("button", {
    class: "danger", "data-testid": "cancel", hidden: true,
    onclick: async () => {
      if (!confirm("Cancel this job? Its machine is stopped; its volume is kept.")) return;
      cancel.disabled = true;
      try { await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" }); } catch (exc) { alert(exc.message); cancel.disabled = false; }
    },
  }, "Cancel job");
  show(el("p", {}, el("a", { href: "#/jobs", text: "← all jobs" })), head, cancel, el("h2", { text: "Attempts" }), line, table,
       el("h2", { text: "Output" }), pre, el("h2", { text: "Events" }), events,
       every(async () => {
         const job = await api(`/v1/jobs/${jobId}`);
         const v = job.volume;
         const vol = v ? `${v.name} (${v.size_gb} GB${v.provider ? ", " + v.provider + " " + v.region : ""}` +
           `${v.storage_usd_per_month ? ", " + money(v.storage_usd_per_month) + "/month" : ""})` : "none";
         head.replaceChildren(el("h1", {}, job.name, " ", statusSpan(job.status)),
           el("div", { class: "cards" },
             ...[["cost", money(job.cost_usd)], ["attempts", job.attempt_count], ["relaunches", job.relaunches],
                 ["retries", job.retries], ["volume", vol], ["submitted", ago(job.created_at) + " ago"]]
               .map(([k, v]) => el("div", { class: "card" }, el("div", { class: "k", text: k }), el("div", { class: "v", text: v })))),
           el("p", { class: "muted", "data-testid": "why", text: job.end_reason ? "why it ended: " + job.end_reason : job.message }));
         cancel.hidden = TERMINAL.has(job.status) || job.cancel_requested;
         line.replaceChildren(job.attempts.length ? timeline(job) : el("p", { class: "muted", text: "no attempt yet" }));
         table.replaceChildren(job.attempts.length ? attemptsTable(job.attempts) : "");
         events.replaceChildren(el("table", {}, el("tbody", {}, ...(job.events || []).slice().reverse().map((e) =>
           el("tr", {}, el("td", { class: "muted", text: when(e.at) }), el("td", { text: e.kind }),
                    el("td", { text: e.attempt ?? "" }), el("td", { text: e.message + (e.repeats ? ` (x${e.repeats + 1})` : "") }))))));
       }));
  followLogs(jobId, pre);
}

function offersView() {
  const holder = el("div");
  show(el("h1", { text: "Offers" }), el("p", { class: "muted", text: "What each provider offers now, by expected cost per hour (price plus the expected cost of interruptions)." }),
       holder, every(async () => {
    const data = await api("/v1/offers");
    const head = ["provider", "region", "GPU", "VRAM", "capacity", "$/h", "expected $/h", "available", "volumes"];
    holder.replaceChildren(el("table", { "data-testid": "offers" },
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
      el("tbody", {}, ...data.offers.slice(0, 300).map((o) => el("tr", {},
        el("td", { text: o.provider }), el("td", { text: o.region }), el("td", { text: o.gpu ? `${o.gpu} x${o.gpu_count}` : `cpu (${o.vcpu} vCPU)` }),
        el("td", { class: "num", text: o.vram_gb ? o.vram_gb + " GB" : "-" }), el("td", { text: o.capacity }),
        el("td", { class: "num", text: o.price_per_hour.toFixed(3) }), el("td", { class: "num", text: o.expected_cost_per_hour.toFixed(3) }),
        el("td", { class: "num", text: o.available }), el("td", { text: o.supports_volumes ? "yes" : "no" }))))));
  }));
}

function volumesView() {
  const holder = el("div");
  const err = el("div", { class: "error", "data-testid": "volume-error" });
  show(el("h1", { text: "Volumes" }), err, holder, every(async () => {
    const data = await api("/v1/volumes");
    const head = ["name", "provider", "region", "size", "jobs", "in use by", "last used", "$/month", "so far", ""];
    holder.replaceChildren(el("p", { class: "muted", text: `Storage: ${money(data.storage_usd_per_month)} per month for all volumes.` }),
      el("table", { "data-testid": "volumes" },
        el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
        el("tbody", {}, ...data.volumes.map((v) => el("tr", {},
          el("td", { text: v.name }), el("td", { text: v.provider || "not created yet" }), el("td", { text: v.region || "-" }),
          el("td", { class: "num", text: v.size_gb + " GB" }), el("td", { class: "num", text: v.jobs }),
          el("td", {}, v.active_job ? el("a", { href: "#/jobs/" + v.active_job, text: v.active_job.slice(0, 12) }) : "-"),
          el("td", { text: ago(v.last_used_at) }), el("td", { class: "num", text: money(v.storage_usd_per_month) }),
          el("td", { class: "num", text: money(v.storage_usd_so_far) }),
          el("td", {}, v.active_job ? "" : el("button", {
            class: "secondary", "data-testid": "delete-volume", "data-volume": v.name,
            onclick: async (ev) => {
              if (!confirm(`Delete volume ${v.name}? Its checkpoints are lost for good.`)) return;
              ev.target.disabled = true;
              try { await api(`/v1/volumes/${encodeURIComponent(v.name)}`, { method: "DELETE" }); }
              catch (exc) { err.textContent = exc.message; ev.target.disabled = false; }
            },
          }, "Delete")))))));
  }));
}

function costChart(days) {
  const W = 900, H = 180, pad = 30;
  const max = Math.max(0.0001, ...days.map((d) => d.cost_usd));
  const bw = Math.max(4, Math.min(40, (W - 2 * pad) / Math.max(1, days.length) - 4));
  const g = svg("svg", { viewBox: `0 0 ${W} ${H + 30}`, width: "100%", role: "img", "aria-label": "cost per day", "data-testid": "cost-chart" });
  g.append(svg("line", { x1: pad, y1: H, x2: W - pad, y2: H, class: "axis" }));
  g.append(svg("text", { x: 2, y: 12 }, money(max)));
  days.forEach((d, i) => {
    const h = (d.cost_usd / max) * (H - 20);
    const x = pad + i * (bw + 4);
    const rect = svg("rect", { x, y: H - h, width: bw, height: Math.max(1, h), class: "bar-cost" });
    rect.append(svg("title", {}, `${d.key}: ${money(d.cost_usd)}`));
    g.append(rect);
    g.append(svg("text", { x: x + bw / 2, y: H + 14, "text-anchor": "middle" }, d.key.slice(5)));
  });
  return g;
}

function costLines(data) {
  const head = [data.by, "attempts", "GPU hours", "cost", "on-demand", "saved"];
  const row = (l, bold) => el("tr", { class: bold ? "status" : null },
    el("td", { text: l.key }), el("td", { class: "num", text: l.attempts }), el("td", { class: "num", text: l.hours.toFixed(2) }),
    el("td", { class: "num", text: money(l.cost_usd) }), el("td", { class: "num", text: money(l.on_demand_usd) }),
    el("td", { class: "num", text: l.saved_usd === null ? "-" : money(l.saved_usd) + (l.on_demand_usd ? ` (${Math.round(100 * l.saved_usd / l.on_demand_usd)}%)` : "") }));
  return el("table", { "data-testid": "costs-" + data.by },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...data.lines.map((l) => row(l, false)), row(data.total, true)));
}

function costsView() {
  const cards = el("div", { class: "cards" });
  const chart = el("div");
  const byProvider = el("div");
  show(el("h1", { text: "Costs, last 30 days" }), cards, chart, el("h2", { text: "By provider" }), byProvider, every(async () => {
    const [days, providers] = await Promise.all([api("/v1/costs?by=day&since=30d"), api("/v1/costs?by=provider&since=30d")]);
    const t = providers.total;
    cards.replaceChildren(...[["spent", money(t.cost_usd)], ["GPU hours", t.hours.toFixed(2)],
      ["on-demand would be", money(t.on_demand_usd)], ["saved", t.saved_usd === null ? "-" : money(t.saved_usd)]]
      .map(([k, v]) => el("div", { class: "card" }, el("div", { class: "k", text: k }), el("div", { class: "v", "data-testid": "cost-" + k.replace(/ /g, "-"), text: v }))));
    chart.replaceChildren(days.lines.length ? costChart(days.lines.slice().sort((a, b) => a.key.localeCompare(b.key))) : el("p", { class: "muted", text: "Nothing spent in the last 30 days." }));
    byProvider.replaceChildren(costLines(providers));
  }));
}

// ------------------------------------------------------------------ the frame

async function daemonLine() {
  try {
    const s = await api("/v1/status");
    const bad = Object.entries(s.providers).filter(([, h]) => !h.ok).map(([n]) => n);
    document.getElementById("daemon").textContent =
      `gpuhop ${s.version} · up ${ago(s.started_at)} · ${s.ok ? "loop ok" : "loop stalled"}` +
      (bad.length ? ` · degraded: ${bad.join(", ")}` : "");
  } catch (exc) {
    document.getElementById("daemon").textContent = exc.message;
  }
}

function route() {
  if (timer) { clearInterval(timer); timer = null; }
  if (logAbort) { logAbort.abort(); logAbort = null; }
  const fragment = location.hash.match(/^#token=([A-Za-z0-9._~+/=-]+)$/);
  if (fragment) {  // a login link from `gpuhop dashboard`: keep the token, drop it from the address bar
    sessionStorage.setItem(TOKEN_KEY, fragment[1]);
    history.replaceState(null, "", location.pathname + "#/jobs");
  }
  const logged = !!sessionStorage.getItem(TOKEN_KEY);
  document.getElementById("nav").hidden = !logged;
  document.getElementById("logout").hidden = !logged;
  if (!logged) { document.getElementById("daemon").textContent = ""; return loginView(); }
  const hash = location.hash || "#/jobs";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", hash.startsWith(a.getAttribute("href")));
  daemonLine();
  const job = hash.match(/^#\/jobs\/([0-9a-f]{1,32})$/);
  if (job) return jobView(job[1]);
  if (hash === "#/offers") return offersView();
  if (hash === "#/volumes") return volumesView();
  if (hash === "#/costs") return costsView();
  return jobsView();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); route(); });
  window.addEventListener("hashchange", route);
  route();
});
