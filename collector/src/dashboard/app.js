// The dashboard: cards of charts per workload (or per pod of one workload on drill-down)
// over the last 15 minutes, filled from the feed's replay and then live; exemplars of a
// point on click; the feed's filters; connection state and missed frames.
import { Feed, FILTER_KEYS } from "./feed.js";
import { Store, RANGE_MS, totals } from "./model.js";
import { chart } from "./chart.js";

const store = new Store();
const view = { level: "workload", workload: null, workloadName: "" };
const stats = { windows: 0 };
let dirty = true;

const $ = (id) => document.getElementById(id);

function text(tag, content, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.textContent = content;
  return node;
}

function ms(value) {
  return value === null || value === undefined ? "–" : value.toFixed(value < 10 ? 2 : 1) + " ms";
}

// --- The feed ---------------------------------------------------------------------------

const feed = new Feed({
  onDocument(doc) {
    if (doc.type === "window") {
      stats.windows += 1;
      if (store.add(doc)) dirty = true;
    } else if (doc.type === "missed") {
      dirty = true;
    } else if (doc.type === "error") {
      showNotice(`The collector refused that: ${doc.message} (${doc.code})`);
    }
  },
  onSubscribed(frame) {
    // The replay of the new subscription follows: start over from it.
    store.clear();
    stats.windows = 0;
    showAck(frame);
    showNotice("");
    dirty = true;
  },
  onState(state, detail) {
    const status = $("status");
    status.dataset.state = state;
    status.textContent = { connecting: "connecting…", live: "live", down: "disconnected" }[state] +
      (detail ? ": " + detail : "");
    drawCounters();
  },
  onLoginNeeded() {
    $("status").dataset.state = "login";
    $("status").textContent = "session ended: log in again";
    location.reload();
  },
}, RANGE_MS);

function showAck(frame) {
  const parts = FILTER_KEYS.filter((key) => (frame.filter[key] || []).length)
    .map((key) => key + " = " + frame.filter[key].join(" | "));
  const ack = $("filter-ack");
  ack.textContent = (parts.length ? "showing " + parts.join(", ") : "showing everything") +
    ` · ${frame.replayed} windows replayed`;
  ack.dataset.filter = JSON.stringify(frame.filter);
}

function showNotice(message) {
  $("notice").textContent = message;
  $("notice").hidden = !message;
}

function drawCounters() {
  const counters = $("counters");
  counters.dataset.windows = stats.windows;
  counters.dataset.missed = feed.missedTotal;
  counters.dataset.reconnects = feed.reconnects;
  counters.textContent = `${stats.windows} windows · ${feed.missedTotal} missed` +
    (feed.missedTotal ? ` (${feed.missedHere} on this connection: this page fell behind)` : "") +
    (feed.reconnects ? ` · ${feed.reconnects} reconnects` : "");
  counters.className = feed.missedTotal ? "warn" : "";
}

// --- Filters ----------------------------------------------------------------------------

function readForm() {
  const filter = {};
  for (const key of FILTER_KEYS) {
    const values = $("filter-" + key).value.split(",").map((v) => v.trim()).filter(Boolean);
    if (values.length) filter[key] = values;
  }
  return filter;
}

function writeForm(filter) {
  for (const key of FILTER_KEYS) $("filter-" + key).value = (filter[key] || []).join(", ");
}

function filterFromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const filter = {};
  for (const key of FILTER_KEYS) {
    const values = params.getAll(key).flatMap((v) => v.split(",")).map((v) => v.trim()).filter(Boolean);
    if (values.length) filter[key] = values;
  }
  return filter;
}

function applyFilter(filter) {
  const params = new URLSearchParams();
  for (const [key, values] of Object.entries(filter)) params.set(key, values.join(","));
  history.replaceState(null, "", params.toString() ? "#" + params : location.pathname);
  feed.subscribe(filter);
}

$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  applyFilter(readForm());
});
$("filter-clear").addEventListener("click", () => {
  writeForm({});
  applyFilter({});
});

// --- Drill-down and exemplars -----------------------------------------------------------

function drill(series) {
  view.level = "pod";
  view.workload = series.key;
  view.workloadName = series.name + " (" + series.direction + ")";
  hideExemplars();
  dirty = true;
  redraw();
}

$("crumb-all").addEventListener("click", (event) => {
  event.preventDefault();
  view.level = "workload";
  view.workload = null;
  hideExemplars();
  dirty = true;
  redraw();
});

function hideExemplars() { $("exemplars").hidden = true; }

function showExemplars(title, exemplars) {
  const panel = $("exemplars");
  panel.hidden = false;
  $("exemplars-title").textContent = title;
  const rows = [...exemplars].sort((a, b) => b.duration_ms - a.duration_ms).map((e) => {
    const tr = document.createElement("tr");
    tr.append(text("td", e.start.slice(11, 23), "text"), text("td", e.pod, "text"),
              text("td", e.node, "text"), text("td", e.method, "text"), text("td", e.path, "text path"),
              text("td", String(e.status), e.status >= 500 ? "status bad" : "status"),
              text("td", e.duration_ms.toFixed(3), "duration"));
    return tr;
  });
  $("exemplars-body").replaceChildren(...rows);
  $("exemplars-empty").hidden = rows.length > 0;
  panel.scrollIntoView({ block: "nearest" });
}

$("exemplars-close").addEventListener("click", hideExemplars);

// --- Cards ------------------------------------------------------------------------------

function card(series, now) {
  const from = now - RANGE_MS;
  const node = document.createElement("section");
  node.className = "card";
  node.dataset.series = series.key;
  node.dataset.name = series.name;
  node.dataset.direction = series.direction;
  const latest = series.points[series.points.length - 1];
  const total = totals(series.points.filter((p) => p.end >= from));
  node.dataset.errorShare = total.errorShare.toFixed(4);
  node.dataset.count = total.count;

  const head = document.createElement("header");
  const title = document.createElement("div");
  title.append(text("h3", series.name), text("span", series.detail + " · " + series.direction, "detail"));
  const numbers = document.createElement("div");
  numbers.className = "numbers";
  numbers.append(
    text("span", "p99 " + ms(latest && latest.p99), "p99-now"),
    text("span", (latest ? latest.rps.toFixed(latest.rps < 10 ? 2 : 0) : "–") + " req/s", "rps-now"),
    text("span", (100 * total.errorShare).toFixed(1) + " % errors (15 min)",
         "error-share" + (total.errors ? " bad" : "")),
  );
  const actions = document.createElement("div");
  actions.className = "actions";
  if (view.level === "workload") {
    const pods = text("button", "pods ›", "drill");
    pods.addEventListener("click", () => drill(series));
    actions.append(pods);
  }
  const all = text("button", "exemplars", "all-exemplars");
  all.addEventListener("click", () => showExemplars(series.name + ": slow or failed requests, last 15 min",
    series.points.filter((p) => p.end >= from).flatMap((p) => p.exemplars)));
  actions.append(all);
  head.append(title, numbers, actions);
  node.append(head);

  const pick = (p) => showExemplars(series.name + ": requests of the window ending " +
    new Date(p.end).toLocaleTimeString([], { hour12: false }), p.exemplars);
  node.append(
    legend("latency (ms):", [["p50", "p50"], ["p95", "p95"], ["p99", "p99"]]),
    chart({ points: series.points, from, to: now, kind: "latency", unit: "ms", onPick: pick,
            lines: [{ key: "p50", className: "p50" }, { key: "p95", className: "p95" },
                    { key: "p99", className: "p99" }] }),
    legend("requests/s:", [["all", "rps"], ["failed (5xx)", "err"]]),
    chart({ points: series.points, from, to: now, kind: "rate", unit: "/s", bars: true, onPick: pick,
            lines: [{ key: "rps", className: "rps" }, { key: "errorShare", className: "err" }] }),
  );
  return node;
}

/** A chart's key: each series' name in its colour. */
function legend(title, entries) {
  const node = text("div", title, "legend");
  for (const [name, className] of entries) node.append(" ", text("span", "■ " + name, "key " + className));
  return node;
}

function redraw() {
  drawCounters();
  if (!dirty) return;
  dirty = false;
  const now = Date.now();
  store.prune(now);
  const series = store.series(view.level, view.workload);
  $("cards").replaceChildren(...series.map((s) => card(s, now)));
  $("cards").dataset.level = view.level;
  $("crumb-workload").textContent = view.level === "pod" ? " › " + view.workloadName + ": pods" : "";
  $("empty").hidden = series.length > 0;
}

setInterval(redraw, 300);
// The time axis moves even when nothing arrives.
setInterval(() => { dirty = true; }, 5000);

const initial = filterFromHash();
writeForm(initial);
feed.filter = initial;
feed.connect();
