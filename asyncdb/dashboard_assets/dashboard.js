// asyncdb dashboard: polls api/state (relative, so it works under any prefix) and
// draws each curve on its own canvas. No libraries, nothing fetched from elsewhere.
"use strict";

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
const POLL_MS = 300;

// Each chart: a title and a function from (entry, previous entry) to named y values.
const accuracy = (e) => (e.val_accuracy !== undefined && e.val_accuracy !== null)
  ? e.val_accuracy : e.test_accuracy;
const rate = (now, before, key) => {
  if (!before || now.time <= before.time) return null;
  return (now[key] - before[key]) / (now.time - before.time);
};
const perKey = (now, before, key, label) => {
  const out = {};
  const a = now[key] || {}, b = (before && before[key]) || {};
  for (const k of Object.keys(a)) {
    if (!before || now.time <= before.time) continue;
    out[`${label} ${k}`] = ((a[k] || 0) - (b[k] || 0)) / (now.time - before.time);
  }
  return out;
};
const CHARTS = [
  {id: "loss", title: "training loss", y: (e) => ({loss: e.loss})},
  {id: "accuracy", title: "validation accuracy (test accuracy without a split)",
   y: (e) => (e.val_accuracy !== undefined && e.val_accuracy !== null)
     ? {validation: e.val_accuracy} : {test: e.test_accuracy}},
  {id: "replica_rate", title: "examples/s per replica",
   y: (e, p) => perKey(e, p, "replica_examples", "replica")},
  {id: "staleness", title: "staleness (versions)",
   y: (e) => ({mean: e.staleness_mean, max: e.staleness_max})},
  {id: "shard_rate", title: "shard updates/s", y: (e, p) => {
    const now = {time: e.time, s: Object.assign({}, e.shard_updates || [])};
    const before = p && {time: p.time, s: Object.assign({}, p.shard_updates || [])};
    return perKey(now, before, "s", "shard");
  }},
  {id: "traffic", title: "fetches and pushes (total)",
   y: (e) => ({fetches: e.fetches, pushes: e.pushes})},
  {id: "limits", title: "skipped fetches, deferred pushes, rejected pushes",
   y: (e) => ({skipped: e.skipped_fetches, deferred: e.deferred_pushes,
               rejected: e.rejected})},
  {id: "replicas", title: "replicas alive and lost",
   y: (e) => ({alive: e.replicas, lost: (e.lost || []).length})},
];

class Chart {
  constructor(spec, parent) {
    this.spec = spec;
    this.series = new Map();
    const box = document.createElement("div");
    box.className = "chart";
    box.innerHTML = `<h3>${spec.title}</h3>`;
    this.canvas = document.createElement("canvas");
    this.canvas.id = `chart-${spec.id}`;
    this.canvas.dataset.points = "0";
    box.appendChild(this.canvas);
    parent.appendChild(box);
  }

  add(x, values) {
    for (const [name, y] of Object.entries(values)) {
      if (y === null || y === undefined || !isFinite(y)) continue;
      if (!this.series.has(name)) this.series.set(name, []);
      this.series.get(name).push([x, y]);
    }
  }

  points() {
    let n = 0;
    for (const s of this.series.values()) n += s.length;
    return n;
  }

  draw() {
    const c = this.canvas, ratio = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    c.width = w * ratio; c.height = h * ratio;
    const g = c.getContext("2d");
    g.scale(ratio, ratio);
    g.clearRect(0, 0, w, h);
    g.font = "11px system-ui, sans-serif";
    const all = [...this.series.values()].flat();
    c.dataset.points = String(this.points());
    if (!all.length) { g.fillStyle = "#999"; g.fillText("waiting for points…", 50, h / 2); return; }
    let [x0, x1] = extent(all.map((p) => p[0]));
    let [y0, y1] = extent(all.map((p) => p[1]));
    if (y0 > 0 && y0 < 0.5 * y1) y0 = 0;
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= Math.abs(y0) * 0.1 || 0; }
    const left = 52, right = 8, top = 16, bottom = 22;
    const px = (x) => left + (x - x0) / (x1 - x0) * (w - left - right);
    const py = (y) => h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    g.strokeStyle = "#ccc"; g.fillStyle = "#555"; g.lineWidth = 1;
    g.beginPath(); g.moveTo(left, top); g.lineTo(left, h - bottom); g.lineTo(w - right, h - bottom);
    g.stroke();
    for (const y of [y0, (y0 + y1) / 2, y1]) {
      g.fillText(fmt(y), 2, py(y) + 4);
      g.strokeStyle = "#eee"; g.beginPath(); g.moveTo(left, py(y)); g.lineTo(w - right, py(y)); g.stroke();
    }
    g.fillText(`${fmt(x0)} s`, left, h - 6);
    g.fillText(`${fmt(x1)} s`, w - right - 40, h - 6);
    let i = 0, legend = left + 4;
    for (const [name, pts] of this.series) {
      const color = COLORS[i++ % COLORS.length];
      g.strokeStyle = color; g.lineWidth = 1.6; g.beginPath();
      pts.forEach(([x, y], k) => (k ? g.lineTo(px(x), py(y)) : g.moveTo(px(x), py(y))));
      g.stroke();
      if (pts.length === 1) { g.fillStyle = color; g.fillRect(px(pts[0][0]) - 2, py(pts[0][1]) - 2, 4, 4); }
      g.fillStyle = color; g.fillText(name, legend, 11);
      legend += g.measureText(name).width + 12;
    }
  }
}

function extent(values) {
  return [Math.min(...values), Math.max(...values)];
}

function fmt(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return v.toFixed(2);
  return v.toFixed(3);
}

const charts = CHARTS.map((spec) => new Chart(spec, document.getElementById("charts")));
let seen = 0, previous = null, last = null;

function ingest(entries) {
  for (const e of entries) {
    for (const chart of charts) chart.add(e.time, chart.spec.y(e, previous));
    previous = e; last = e;
  }
}

function summary(state) {
  const s = document.getElementById("summary");
  if (!last) { s.textContent = ""; return; }
  const acc = accuracy(last);
  const items = [
    ["elapsed", `${last.time.toFixed(1)} s`], ["examples", last.examples],
    ["examples/s", Math.round(last.examples_per_s)],
    ["loss", last.loss === null ? "-" : last.loss.toFixed(4)],
    ["accuracy", acc === null || acc === undefined ? "-" : acc.toFixed(4)],
    ["staleness", last.staleness_mean.toFixed(2)], ["updates", last.updates],
    ["replicas", last.replicas], ["lost", (last.lost || []).join(", ") || "none"],
  ];
  s.innerHTML = items.map(([k, v]) => `<span>${k} <b>${v}</b></span>`).join("");
}

function actors(list) {
  const body = document.querySelector("#actors tbody");
  body.innerHTML = list.map((a) => `<tr><td>${a.role}</td><td>${a.index}</td>` +
    `<td>${a.node}</td><td>${a.pid === null ? "-" : a.pid}</td><td>${a.host}</td>` +
    `<td class="${a.alive ? "" : "dead"}">${a.alive ? "yes" : "no"}</td></tr>`).join("");
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const reply = await fetch(`api/state?since=${seen}`, {cache: "no-store"});
    const state = await reply.json();
    if (state.count < seen) {  // a new run: start over
      seen = 0; previous = null; last = null;
      for (const chart of charts) chart.series.clear();
      return;
    }
    ingest(state.entries);
    seen = state.count;
    document.getElementById("title").textContent = state.title;
    status.textContent = state.done ? "run finished" : (seen ? "training" : "waiting for the run");
    status.className = "status " + (state.done ? "done" : "live");
    summary(state);
    if (state.actors.length) actors(state.actors);
    for (const chart of charts) chart.draw();
    document.body.dataset.entries = String(seen);
  } catch (err) {
    status.textContent = `no answer from the server (${err})`;
    status.className = "status";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
