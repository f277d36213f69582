// What the page knows: the windows of the last 15 minutes (from the replay, then live),
// grouped into series (a workload, or one pod of it on drill-down) and, within a series,
// into points (all its windows that end at the same time, merged).
import { emptyHistogram, mergeInto, quantile, millis } from "./histogram.js";

export const RANGE_MS = 15 * 60 * 1000;
/** Windows kept at most: the oldest go first (a huge cluster on an unfiltered page). */
const MAX_WINDOWS = 60000;

/** The workload a window belongs to, named as people do: namespace/workload. */
export function workloadOf(w) {
  const pod = w.pod;
  if (pod && pod.workload_name) {
    return { key: "w:" + pod.namespace + "/" + pod.workload_name + "|" + w.direction,
             name: pod.namespace + "/" + pod.workload_name, kind: pod.workload_kind || "workload",
             direction: w.direction };
  }
  if (pod) {
    return { key: "p:" + pod.namespace + "/" + pod.name + "|" + w.direction,
             name: pod.namespace + "/" + pod.name, kind: "Pod", direction: w.direction };
  }
  return { key: "c:" + w.process + "|" + w.direction, name: w.process, kind: "process",
           direction: w.direction };
}

/** The unit of drill-down: a pod, or without pods a process on a node. */
export function podOf(w) {
  if (w.pod) return { key: w.pod.namespace + "/" + w.pod.name, name: w.pod.name, node: w.node };
  return { key: w.process + "[" + w.pid + "]@" + w.node, name: w.process + "[" + w.pid + "]", node: w.node };
}

export class Store {
  constructor() { this.clear(); }

  clear() {
    this.windows = [];
    this.seen = new Set();
    this.latestEnd = 0;
    // Merged points by series and end: a window arriving invalidates only its own two
    // (its workload's and its pod's), so a redraw re-merges what changed, not 15 minutes.
    this.pointCache = new Map();
  }

  /** Keeps a window document; false when it was already kept (or is out of range). */
  add(doc) {
    const id = doc.agent_id + "\u0000" + doc.boot_id + "\u0000" + doc.sequence;
    if (this.seen.has(id)) return false;
    this.seen.add(id);
    const workload = workloadOf(doc);
    const pod = podOf(doc);
    this.windows.push({ id, doc, workload, pod, end: doc.end_unix_ms, start: doc.start_unix_ms });
    this.pointCache.delete("workload\u0000" + workload.key + "\u0000" + doc.end_unix_ms);
    this.pointCache.delete("pod\u0000" + workload.key + "\u0000" + pod.key + "\u0000" + doc.end_unix_ms);
    this.latestEnd = Math.max(this.latestEnd, doc.end_unix_ms);
    if (this.windows.length > MAX_WINDOWS) this.prune(Infinity);
    return true;
  }

  /** Forgets windows older than the range (and the oldest past MAX_WINDOWS). */
  prune(now) {
    const horizon = Math.min(now, Date.now()) - RANGE_MS;
    let kept = this.windows.filter((w) => w.end >= horizon);
    if (kept.length > MAX_WINDOWS) {
      kept.sort((a, b) => a.end - b.end);
      kept = kept.slice(kept.length - MAX_WINDOWS);
    }
    if (kept.length !== this.windows.length) {
      const ids = new Set(kept.map((w) => w.id));
      for (const id of this.seen) if (!ids.has(id)) this.seen.delete(id);
      this.windows = kept;
      this.pointCache.clear();
    }
  }

  /**
   * Series at one level: "workload" (every workload) or "pod" (the pods of workload
   * `workloadKey`). Each: {key, name, detail, points: [...]}, points oldest first.
   */
  series(level, workloadKey) {
    const groups = new Map();
    for (const w of this.windows) {
      if (level === "pod" && w.workload.key !== workloadKey) continue;
      const key = level === "pod" ? w.pod.key : w.workload.key;
      let group = groups.get(key);
      if (!group) {
        group = level === "pod"
          ? { key, name: w.pod.name, detail: "node " + w.pod.node, direction: w.workload.direction, windows: [] }
          : { key, name: w.workload.name, detail: w.workload.kind, direction: w.workload.direction, windows: [] };
        groups.set(key, group);
      }
      if (level === "pod" && !group.detail.includes(w.pod.node)) group.detail += ", " + w.pod.node;
      group.windows.push(w);
    }
    const prefix = level === "pod" ? "pod\u0000" + workloadKey + "\u0000" : "workload\u0000";
    const list = [...groups.values()].map((group) => ({
      ...group, points: points(group.windows, this.pointCache, prefix + group.key + "\u0000"),
    }));
    list.sort((a, b) => a.name.localeCompare(b.name) || a.direction.localeCompare(b.direction));
    return list;
  }
}

/** Windows of one series merged per end time: the chart's points (cached by `prefix`+end). */
export function points(windows, cache, prefix) {
  const byEnd = new Map();
  for (const w of windows) {
    let list = byEnd.get(w.end);
    if (!list) byEnd.set(w.end, (list = []));
    list.push(w);
  }
  return [...byEnd.entries()].sort((a, b) => a[0] - b[0]).map(([end, list]) => {
    const key = prefix + end;
    let point = cache.get(key);
    if (!point) cache.set(key, (point = merge(end, list)));
    return point;
  });
}

/**
 * One point: requests, errors, rate and p50/p95/p99 of the merged histogram, each
 * percentile clamped to the smallest and largest request seen (as the collector does for
 * aggregates), in ms to the microsecond.
 */
export function merge(end, list) {
  const histogram = emptyHistogram();
  let count = 0, errors = 0, min = Infinity, max = 0, length = 0;
  const exemplars = [];
  for (const w of list) {
    const doc = w.doc;
    mergeInto(histogram, doc.histogram);
    count += doc.count;
    errors += doc.errors;
    if (doc.count) { min = Math.min(min, doc.min_ms); max = Math.max(max, doc.max_ms); }
    length = Math.max(length, doc.end_unix_ms - doc.start_unix_ms);
    for (const exemplar of doc.exemplars || []) {
      exemplars.push({ ...exemplar, pod: w.pod.name, node: doc.node, route: doc.route });
    }
  }
  const percentile = (q) => {
    const nanos = quantile(histogram, q);
    if (nanos === null) return null;
    return Math.min(Math.max(millis(Math.floor(nanos)), min), max);
  };
  const seconds = Math.max(length, 1) / 1000;
  return {
    end, count, errors, windows: list.length,
    p50: percentile(0.5), p95: percentile(0.95), p99: percentile(0.99),
    max: count ? max : null,
    rps: count / seconds,
    errorShare: count ? errors / count : 0,
    exemplars,
  };
}

/** Totals over a series' points (the card's headline). */
export function totals(points) {
  const count = points.reduce((sum, p) => sum + p.count, 0);
  const errors = points.reduce((sum, p) => sum + p.errors, 0);
  return { count, errors, errorShare: count ? errors / count : 0 };
}
