// The support workers' page: plain JavaScript, no libraries. Every state shown for an alert is the
// one the engine recorded (from /api/alerts or the engine's reply to an action), never a guess.
// Text is set with textContent only: nothing from the network is parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const REASONS = {
  hrv_below_baseline: "heart-rate variability lower than usual for them",
  hr_above_baseline: "heart rate higher than usual for them",
  self_report: "they asked for contact themselves",
};
const STATES = {
  raised: "Open: new", delivered: "Open", escalated: "Open: escalated",
  acknowledged: "Acknowledged", resolved: "Resolved", withheld: "Withheld", suppressed: "Suppressed",
};
const OPEN = new Set(["raised", "delivered", "escalated"]);
const OUTCOMES = { reached_out: "reached out", no_answer: "no answer", not_needed: "not needed" };
const CONNECTION = { live: "Live", reconnecting: "Reconnecting…", signed_out: "Signed out" };

let csrf = null;
let source = null;
let connection = null;
let listSeq = 0;
const alerts = new Map(); // alert_id -> the engine's view of it
const live = new Map();   // alerts pushed live that the engine's list has not shown yet
let audio = null;

const when = (iso) => (iso ? new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) : "");

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  if (method !== "GET" && csrf) opts.headers["X-CSRF-Token"] = csrf;
  let r;
  try {
    r = await fetch(path, opts);
  } catch (e) {
    return { status: 0, data: { error: "This app's server is not reachable (offline?)." } };
  }
  let data = {};
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  return { status: r.status, data };
}

function setConnection(state, text) {
  connection = state;
  const el = $("connection");
  el.hidden = false;
  el.className = "connection " + state;
  el.textContent = text || CONNECTION[state] || state;
}

function showSignIn(message) {
  if (source) { source.close(); source = null; }
  csrf = null;
  alerts.clear();
  live.clear();
  $("alerts").replaceChildren();
  $("app").hidden = true;
  $("engine").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("password").value = "";
  $("worker").focus();
}

function signedIn(data) {
  csrf = data.csrf;
  $("who").textContent = data.worker;
  $("signin").hidden = true;
  $("app").hidden = false;
  setConnection(data.connection);
  openEvents();
  refresh();
}

// A laptop that slept may hold a dead connection that no error reports: the server pings every
// keepalive_s, and a stream silent for 2.5 pings is replaced (then the list is asked for again).
let lastSeen = Date.now();
let keepaliveS = 15;
setInterval(() => {
  if (source && connection !== "signed_out" && Date.now() - lastSeen > keepaliveS * 2500) {
    setConnection("reconnecting");
    lastSeen = Date.now();
    openEvents();
  }
}, 1000);

// The engine's record also changes without a message to this page (PUBACK seen, escalation,
// another tab): ask again every half minute while live.
setInterval(() => { if (csrf && connection === "live" && !document.hidden) refresh(); }, 30000);

function openEvents() {
  if (source) source.close();
  source = new EventSource("/api/events");
  lastSeen = Date.now();
  for (const kind of ["connection", "engine", "alert", "update", "ping"]) source.addEventListener(kind, () => { lastSeen = Date.now(); });
  source.addEventListener("connection", (e) => {
    const d = JSON.parse(e.data);
    if (d.keepalive_s) keepaliveS = d.keepalive_s;
    if (d.state === "signed_out") {
      showSignIn("You were signed out: the broker no longer accepts your account (removed, or its password changed). Ask your service operator.");
      setConnection("signed_out", "Signed out: account removed");
      return;
    }
    const was = connection;
    setConnection(d.state);
    if (d.state === "live" && was !== "live") refresh(); // back after a broker restart or sleep: ask the engine again
  });
  source.addEventListener("engine", (e) => {
    const d = JSON.parse(e.data);
    const el = $("engine");
    el.hidden = d.state === "unknown";
    el.className = "engine " + d.state;
    el.textContent = d.state === "online" ? "Engine online"
      : "Engine offline: new alerts and your actions wait until it is back";
    if (d.state === "online") refresh();
  });
  source.addEventListener("alert", (e) => {
    const a = JSON.parse(e.data);
    if (!alerts.has(a.alert_id) && !live.has(a.alert_id)) notify(a, false);
    else if (a.notice > 0) notify(a, true);
    live.set(a.alert_id, a);
    render();
    refresh();
  });
  source.addEventListener("update", (e) => {
    const r = JSON.parse(e.data);
    if (r.alert) { alerts.set(r.alert.alert_id, r.alert); render(); }
  });
  source.onerror = async () => {
    if (connection !== "signed_out") setConnection("reconnecting");
    if (source && source.readyState === EventSource.CLOSED) {
      const { status } = await api("GET", "/api/session");
      if (status === 401) showSignIn("You were signed out. Sign in again.");
      else setTimeout(openEvents, 2000);
    }
  };
}

async function refresh() {
  const seq = ++listSeq;
  const filter = $("filter").value;
  $("list-status").textContent = "Asking the engine…";
  const { status, data } = await api("GET", "/api/alerts?state=" + encodeURIComponent(filter));
  if (seq !== listSeq) return; // a newer request is on its way
  if (status === 401) return showSignIn("You were signed out. Sign in again.");
  if (status !== 200 || !data.ok) {
    $("list-status").textContent = "Could not load the list: " + (data.error || "no answer") ;
    return;
  }
  alerts.clear();
  for (const a of data.alerts || []) { alerts.set(a.alert_id, a); live.delete(a.alert_id); }
  const n = alerts.size;
  $("list-status").textContent = n === 0 ? "No alerts here." : n === 1 ? "1 alert." : n + " alerts.";
  render();
}

function rank(a) { return OPEN.has(a.state) || !a.state ? 0 : a.state === "acknowledged" ? 1 : 2; }

function render() {
  const items = [...alerts.values(), ...[...live.values()].filter((a) => !alerts.has(a.alert_id))];
  items.sort((x, y) => rank(x) - rank(y) || (y.raised_at || "").localeCompare(x.raised_at || ""));
  const ul = $("alerts");
  const keep = new Set(items.map((a) => a.alert_id));
  for (const li of [...ul.children]) if (!keep.has(li.dataset.id)) li.remove();
  items.forEach((a, i) => {
    let li = ul.querySelector(`li[data-id="${CSS.escape(a.alert_id)}"]`);
    if (!li) li = build(a.alert_id);
    fill(li, a);
    if (ul.children[i] !== li) ul.insertBefore(li, ul.children[i] || null);
  });
}

function build(id) {
  const li = $("alert-template").content.firstElementChild.cloneNode(true);
  li.dataset.id = id;
  const k = "a-" + id;
  li.querySelector(".title").id = k + "-title";
  li.querySelector("article").setAttribute("aria-labelledby", k + "-title");
  li.querySelector(".outcome").id = k + "-outcome";
  li.querySelector(".outcome-label").htmlFor = k + "-outcome";
  li.querySelector(".rnote").id = k + "-note";
  li.querySelector(".rnote-label").htmlFor = k + "-note";
  li.querySelector(".ack").addEventListener("click", () => act(li, "ack"));
  li.querySelector(".resolve-form").addEventListener("submit", (e) => {
    e.preventDefault();
    act(li, "resolve", { outcome: li.querySelector(".outcome").value, note: li.querySelector(".rnote").value });
  });
  return li;
}

function fact(dl, term, value) {
  if (!value) return;
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  dl.append(dt, dd);
}

function fill(li, a) {
  const state = a.state || null; // a live alert the engine has not listed yet has no recorded state
  li.className = "alert " + (state === null || OPEN.has(state) ? "open" : state);
  li.querySelector(".title").textContent = "Reach out to " + a.user;
  li.querySelector(".badge").textContent = state ? STATES[state] || state : "New: waiting for the engine's record";
  const dl = li.querySelector(".facts");
  dl.replaceChildren();
  fact(dl, "Level", a.level);
  fact(dl, "Why", (a.reasons || []).map((r) => REASONS[r] || r).join("; "));
  fact(dl, "Raised", when(a.raised_at));
  fact(dl, "Escalates", a.escalation_due_at ? when(a.escalation_due_at) + " if no one acknowledges" : "");
  fact(dl, "Acknowledged", a.acked_by ? `by ${a.acked_by}, ${when(a.acked_at)}` : "");
  fact(dl, "Outcome", a.outcome ? `${OUTCOMES[a.outcome] || a.outcome} (by ${a.resolved_by}, ${when(a.resolved_at)})` : "");
  fact(dl, "Record note", a.resolution_note);
  li.querySelector(".note").textContent = a.note ? "In their words: “" + a.note + "”" : "";
  const ack = li.querySelector(".ack");
  ack.hidden = !(state && OPEN.has(state));
  ack.setAttribute("aria-label", "I'm reaching out to " + a.user);
  li.querySelector(".resolve-form").hidden = !(state && (OPEN.has(state) || state === "acknowledged"));
  li.querySelector(".resolve").setAttribute("aria-label", "Resolve the alert for " + a.user);
}

function recorded(a) {
  if (a.state === "acknowledged") return `The engine recorded: acknowledged by ${a.acked_by}, ${when(a.acked_at)}.`;
  if (a.state === "resolved") return `The engine recorded: resolved by ${a.resolved_by} (${OUTCOMES[a.outcome] || a.outcome}), ${when(a.resolved_at)}.`;
  return "The engine recorded: " + (STATES[a.state] || a.state) + ".";
}

async function act(li, action, body) {
  const id = li.dataset.id;
  const result = li.querySelector(".result");
  const buttons = li.querySelectorAll("button");
  buttons.forEach((b) => { b.disabled = true; });
  result.textContent = "Sent. Waiting for the engine to record it…";
  const { status, data } = await api("POST", `/api/alerts/${encodeURIComponent(id)}/${action}`, body);
  buttons.forEach((b) => { b.disabled = false; });
  if (status === 401) return showSignIn("You were signed out. Sign in again.");
  if (data.alert) alerts.set(id, data.alert);
  if (data.ok) result.textContent = recorded(data.alert);
  else result.textContent = "Not recorded: " + (data.error || "no answer") + (data.alert ? " (now: " + (STATES[data.alert.state] || data.alert.state) + ")" : "");
  render();
}

function notify(a, reminder) {
  const title = (reminder ? "Reminder: reach out to " : "Reach out to ") + a.user;
  if ("Notification" in window && Notification.permission === "granted") {
    try { new Notification(title, { body: a.note || a.message || "", tag: a.alert_id }); } catch (e) { /* not allowed here */ }
  }
  if (audio) {
    const osc = audio.createOscillator();
    const gain = audio.createGain();
    osc.frequency.value = 660;
    gain.gain.setValueAtTime(0.2, audio.currentTime);
    gain.gain.exponentialRampToValueAtTime(0.001, audio.currentTime + 0.6);
    osc.connect(gain).connect(audio.destination);
    osc.start();
    osc.stop(audio.currentTime + 0.6);
  }
}

async function allowNotifications() {
  const btn = $("notify-button");
  try {
    audio = audio || new (window.AudioContext || window.webkitAudioContext)();
    await audio.resume();
  } catch (e) { audio = null; }
  let perm = "unsupported";
  if ("Notification" in window) perm = await Notification.requestPermission();
  btn.textContent = perm === "granted" ? "Notifications and sound on" : audio ? "Sound on (notifications not allowed)" : "Not allowed by this browser";
  btn.disabled = true;
}

document.addEventListener("DOMContentLoaded", async () => {
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const button = $("signin-button");
    const worker = $("worker").value.trim();
    const password = $("password").value;
    if (!worker || !password) { $("signin-error").textContent = "Enter your worker id and password."; return; }
    button.disabled = true;
    $("signin-error").textContent = "Signing in…";
    const { status, data } = await api("POST", "/api/session", { worker, password });
    button.disabled = false;
    if (status === 200) { $("signin-error").textContent = ""; signedIn(data); }
    else { $("signin-error").textContent = data.error || "Could not sign in."; $("password").focus(); }
  });
  $("signout-button").addEventListener("click", async () => {
    await api("DELETE", "/api/session");
    showSignIn("Signed out.");
    $("connection").hidden = true;
  });
  $("notify-button").addEventListener("click", allowNotifications);
  $("filter").addEventListener("change", () => { live.clear(); refresh(); });
  $("refresh-button").addEventListener("click", refresh);
  const { status, data } = await api("GET", "/api/session");
  if (status === 200) signedIn(data);
  else showSignIn("");
});
