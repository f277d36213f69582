// Charts as hand-written SVG: no library to bundle or fetch (the page works in a cluster
// without internet access), crisp at any size, a few hundred points at most per chart, and
// every point is an element carrying its values (data-*), so a person gets a tooltip and a
// test can read exactly what is drawn.
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 520, HEIGHT = 120, LEFT = 46, RIGHT = 8, TOP = 8, BOTTOM = 18;

function el(name, attributes, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * magnitude) return step * magnitude;
  return 10 * magnitude;
}

function label(value) {
  // Short enough for the axis' margin.
  if (value >= 1e6) return (value / 1e6).toFixed(value >= 1e7 ? 0 : 1) + "M";
  if (value >= 1e4) return (value / 1e3).toFixed(0) + "k";
  return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

function clock(unixMs) {
  return new Date(unixMs).toLocaleTimeString([], { hour12: false, hour: "2-digit", minute: "2-digit" });
}

/**
 * A chart of `points` between `from` and `to` (Unix ms). `lines`: [{key, className}], the
 * point fields drawn as lines (or with `bars`, the first one as bars). `onPick(point)` is
 * called when a point is clicked.
 */
export function chart({ points, from, to, lines, bars = false, unit, onPick, kind }) {
  const svg = el("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart " + kind, "data-chart": kind,
                          preserveAspectRatio: "none", role: "img" });
  const plotWidth = WIDTH - LEFT - RIGHT, plotHeight = HEIGHT - TOP - BOTTOM;
  const visible = points.filter((p) => p.end >= from && p.end <= to);
  const top = niceMax(Math.max(0, ...visible.flatMap((p) => lines.map((line) => p[line.key] || 0))) * 1.05);
  const x = (t) => LEFT + plotWidth * (t - from) / (to - from);
  const y = (v) => TOP + plotHeight * (1 - v / top);
  // Grid: three horizontal lines with values, and a time label every five minutes.
  for (const fraction of [0, 0.5, 1]) {
    el("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: y(top * fraction), y2: y(top * fraction), class: "grid" }, svg);
    el("text", { x: LEFT - 4, y: y(top * fraction) + 3, class: "axis", "text-anchor": "end" }, svg)
      .textContent = label(top * fraction) + (fraction === 1 ? " " + unit : "");
  }
  const step = 5 * 60 * 1000;
  for (let t = Math.ceil(from / step) * step; t <= to; t += step) {
    el("text", { x: x(t), y: HEIGHT - 4, class: "axis", "text-anchor": "middle" }, svg).textContent = clock(t);
  }
  if (bars) {
    const line = lines[0];
    const width = Math.max(2, Math.min(12, plotWidth / 180));
    for (const p of visible) {
      const value = p[line.key] || 0;
      el("rect", { x: x(p.end) - width / 2, y: y(value), width, height: Math.max(0, y(0) - y(value)),
                   class: line.className }, svg);
      if (lines[1] && p[lines[1].key]) {
        const errors = value * p.errorShare;
        el("rect", { x: x(p.end) - width / 2, y: y(errors), width, height: Math.max(0, y(0) - y(errors)),
                     class: lines[1].className }, svg);
      }
    }
  } else {
    for (const line of lines) {
      const drawn = visible.filter((p) => p[line.key] !== null && p[line.key] !== undefined);
      if (drawn.length === 1) {
        el("circle", { cx: x(drawn[0].end), cy: y(drawn[0][line.key]), r: 2.5, class: line.className + " dot" }, svg);
      } else if (drawn.length > 1) {
        el("polyline", { points: drawn.map((p) => x(p.end).toFixed(1) + "," + y(p[line.key]).toFixed(1)).join(" "),
                         class: line.className }, svg);
      }
    }
  }
  // One transparent hit area per point: its values as data attributes and a tooltip.
  const hits = el("g", { class: "points" }, svg);
  const slot = Math.max(4, plotWidth / Math.max(visible.length, 1));
  for (const p of visible) {
    const hit = el("rect", {
      x: x(p.end) - Math.min(slot, 10) / 2, y: TOP, width: Math.min(slot, 10), height: plotHeight,
      class: "hit", "data-end": p.end, "data-count": p.count, "data-errors": p.errors,
      "data-rps": p.rps.toFixed(3), "data-error-share": p.errorShare.toFixed(4),
      "data-p50": fixed(p.p50), "data-p95": fixed(p.p95), "data-p99": fixed(p.p99),
      "data-exemplars": p.exemplars.length,
    }, hits);
    el("title", {}, hit).textContent = new Date(p.end).toLocaleTimeString([], { hour12: false }) +
      `\np50 ${fixed(p.p50)} ms · p95 ${fixed(p.p95)} ms · p99 ${fixed(p.p99)} ms` +
      `\n${p.rps.toFixed(2)} req/s · ${(100 * p.errorShare).toFixed(1)} % errors` +
      (p.exemplars.length ? `\n${p.exemplars.length} exemplars: click` : "");
    hit.addEventListener("click", () => onPick(p));
  }
  return svg;
}

function fixed(value) {
  return value === null || value === undefined ? "" : value.toFixed(3);
}
