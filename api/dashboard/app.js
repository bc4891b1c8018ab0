// Tidal's dashboard: queues, workers and jobs from the REST API, a job's log live over the
// WebSocket. No build step and no framework; every value from the server is written with
// textContent, never as HTML.
"use strict";

// Every endpoint the page uses (tests/integration/test_dashboard.py checks they exist).
const PATHS = {
  queues: "/queues",
  workers: "/workers",
  jobs: "/jobs",
  job: "/jobs/{id}",
  retry: "/jobs/{id}/retry",
  ws: "/ws",
};
const REFRESH_MS = 2000;
const LOG_MAX_LINES = 5000; // the log pane keeps the last lines only
const TOKEN_KEY = "tidal.token";
const TERMINAL = new Set(["completed", "failed", "cancelled", "expired"]);

const $ = (id) => document.getElementById(id);
let token = null;
let timer = null;
let openJob = null; // {id, ws, lines}

// -- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const err = body && body.error ? body.error : { code: "http_" + status, message: "" };
    super(err.message || err.code);
    this.status = status;
    this.code = err.code;
  }
}

function path(name, id) {
  const p = PATHS[name];
  return id === undefined ? p : p.replace("{id}", encodeURIComponent(id));
}

async function api(method, url, body) {
  const headers = { Authorization: "Bearer " + token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(url, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    const err = new ApiError(res.status, data);
    if (res.status === 401) signOut(err.message);
    throw err;
  }
  return data;
}

// -- drawing ----------------------------------------------------------------------------

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows, makeRow) {
  const body = $(tableId).querySelector("tbody");
  const fresh = document.createElement("tbody");
  for (const row of rows) fresh.appendChild(makeRow(row));
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell("none", "muted");
    td.colSpan = $(tableId).querySelectorAll("th").length;
    tr.appendChild(td);
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return new Date(iso).toLocaleString();
}

function what(job) {
  if (job.function) return job.function;
  return Array.isArray(job.command) ? job.command.join(" ") : job.command || "";
}

function drawQueues(queues) {
  fill("queues", queues, (q) => {
    const tr = document.createElement("tr");
    for (const v of [q.queue, q.queued, q.running, q.delayed, q.workers, q.slots,
      q.completed_1m, q.failed_1m]) tr.appendChild(cell(v));
    return tr;
  });
}

function drawWorkers(workers) {
  fill("workers", workers, (w) => {
    const tr = document.createElement("tr");
    tr.appendChild(cell(w.id));
    tr.appendChild(cell(w.queues.join(", ")));
    tr.appendChild(cell(w.running.length + " / " + w.slots));
    tr.appendChild(cell(ago(w.last_heartbeat)));
    return tr;
  });
}

function drawJobs(jobs) {
  fill("jobs", jobs, (j) => {
    const tr = document.createElement("tr");
    tr.appendChild(cell(j.id, "mono"));
    tr.appendChild(cell(j.state, "state " + j.state));
    tr.appendChild(cell(what(j), "mono cut"));
    for (const v of [j.queue, j.priority, j.owner, ago(j.created_at)]) tr.appendChild(cell(v));
    tr.addEventListener("click", () => showJob(j.id));
    if (openJob && openJob.id === j.id) tr.className = "selected";
    return tr;
  });
}

function summarise(queues, workers) {
  const sum = (k) => queues.reduce((n, q) => n + (q[k] || 0), 0);
  const slots = workers.reduce((n, w) => n + w.slots, 0);
  $("summary").textContent = `${sum("queued")} queued · ${sum("running")} running · ` +
    `${workers.length} workers, ${slots} slots · ${sum("completed_1m")} done in the last minute`;
}

// -- refresh ----------------------------------------------------------------------------

async function refresh() {
  const state = $("state-filter").value;
  const query = "?limit=50" + (state ? "&state=" + encodeURIComponent(state) : "");
  const jobsUrl = path("jobs") + query;
  try {
    const [queues, workers, page] = await Promise.all([
      api("GET", path("queues")), api("GET", path("workers")), api("GET", jobsUrl),
    ]);
    drawQueues(queues);
    drawWorkers(workers);
    drawJobs(page.jobs);
    summarise(queues, workers);
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
    $("status").className = "muted";
  } catch (err) {
    $("status").textContent = "cannot reach the API: " + err.message;
    $("status").className = "error";
  }
}

function schedule() {
  clearTimeout(timer);
  timer = null;
  if (token && !document.hidden) timer = setTimeout(async () => {
    await refresh();
    schedule();
  }, REFRESH_MS);
}

// -- one job ----------------------------------------------------------------------------

function drawJob(job) {
  const fields = $("job-fields");
  fields.replaceChildren();
  const rows = [
    ["state", job.state + (job.reason ? ` (${job.reason})` : "")],
    ["what", what(job)], ["queue", job.queue], ["priority", job.priority],
    ["host", job.host], ["owner", job.owner], ["attempt", job.attempt],
    ["worker", job.worker], ["exit code", job.exit_code], ["error", job.error],
    ["waited", job.wait_ms == null ? null : job.wait_ms + " ms"],
    ["ran", job.run_ms == null ? null : job.run_ms + " ms"],
  ];
  for (const [k, v] of rows) {
    if (v === null || v === undefined || v === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    fields.append(dt, dd);
  }
  const done = TERMINAL.has(job.state);
  $("job-cancel").hidden = done;
  $("job-retry").hidden = !done;
  if (job.progress && job.progress.percent != null) drawProgress(job.progress);
}

function drawProgress(p) {
  $("job-progress").hidden = false;
  $("job-progress").value = p.percent;
  $("job-stage").textContent = [p.percent + " %", p.stage, p.message].filter(Boolean).join(" · ");
}

function appendLines(lines) {
  if (!openJob) return;
  const pane = $("job-log");
  const atBottom = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
  for (const line of lines) {
    const span = document.createElement("span");
    span.className = line.stream;
    span.textContent = line.text + "\n";
    pane.appendChild(span);
    openJob.after = line.id;
  }
  while (pane.childNodes.length > LOG_MAX_LINES) pane.removeChild(pane.firstChild);
  if (atBottom) pane.scrollTop = pane.scrollHeight;
}

function follow(job) {
  // the WebSocket: what was missed since `after`, then live; reconnects after a drop
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + path("ws") + "?token=" +
    encodeURIComponent(token));
  job.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({
    cmd: "reconnect_job", id: job.id, after: job.after || null, batch: true,
  }));
  ws.onmessage = (ev) => {
    if (openJob !== job) return;
    const msg = JSON.parse(ev.data);
    if (msg.type === "line") appendLines([msg]);
    else if (msg.type === "lines") appendLines(msg.lines);
    else if (msg.type === "progress") { drawProgress(msg); job.after = msg.id; }
    else if (msg.type === "state") loadJob(job);
    else if (msg.type === "end") { job.ended = true; drawJob(msg.job); ws.close(); }
    else if (msg.type === "error") $("job-error").textContent = msg.error.message;
  };
  ws.onclose = () => {
    if (openJob === job && !job.ended) setTimeout(() => openJob === job && follow(job), 1000);
  };
}

async function loadJob(job) {
  try {
    drawJob(await api("GET", path("job", job.id)));
  } catch (err) {
    $("job-error").textContent = err.message;
  }
}

function closeJob() {
  if (openJob && openJob.ws) openJob.ws.close();
  openJob = null;
  $("job").hidden = true;
}

function showJob(id) {
  closeJob();
  openJob = { id, ws: null, after: null, ended: false };
  $("job").hidden = false;
  $("job-id").textContent = id;
  $("job-log").replaceChildren();
  $("job-error").textContent = "";
  $("job-progress").hidden = true;
  $("job-stage").textContent = "";
  loadJob(openJob);
  follow(openJob);
  $("job").scrollIntoView({ behavior: "smooth" });
}

async function jobAction(method, name) {
  if (!openJob) return;
  const job = openJob;
  try {
    drawJob(await api(method, path(name, job.id)));
    if (name === "retry") showJob(job.id); // a new attempt: follow it from the start
    refresh();
  } catch (err) {
    $("job-error").textContent = err.message;
  }
}

// -- sign in and the forms --------------------------------------------------------------

function signIn(t) {
  token = t;
  localStorage.setItem(TOKEN_KEY, t);
  $("signin").hidden = true;
  $("main").hidden = false;
  $("signout").hidden = false;
  refresh().then(schedule);
}

function signOut(why) {
  token = null;
  localStorage.removeItem(TOKEN_KEY);
  closeJob();
  clearTimeout(timer);
  $("main").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = why || "";
}

function init() {
  // `tidal dashboard` opens /#token=…: the fragment never reaches a server or a log
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl) history.replaceState(null, "", location.pathname + location.search);
  const saved = fromUrl || localStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved); else signOut();

  $("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("token").value.trim());
    $("token").value = "";
  });
  $("signout").addEventListener("click", () => signOut());
  $("state-filter").addEventListener("change", refresh);
  $("job-close").addEventListener("click", closeJob);
  $("job-cancel").addEventListener("click", () => jobAction("DELETE", "job"));
  $("job-retry").addEventListener("click", () => jobAction("POST", "retry"));
  $("submit-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("submit-error").textContent = "";
    try {
      const job = await api("POST", path("jobs"), {
        command: $("submit-command").value, priority: $("submit-priority").value,
      });
      $("submit-command").value = "";
      await refresh();
      showJob(job.id);
    } catch (err) {
      $("submit-error").textContent = err.message;
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && token) refresh();
    schedule();
  });
}

document.addEventListener("DOMContentLoaded", init);
