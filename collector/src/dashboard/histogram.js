// Exponential histograms as the feed sends them ({scale, offset, counts}: bucket
// offset + i holds values in (base^(offset+i), base^(offset+i+1)] ns, base = 2^(2^-scale)).
// Merging is exact, so a workload's percentiles over all its pods and routes are computed
// here from the buckets, the same way the collector computes an aggregate's
// (proto/src/histogram.rs: ExponentialHistogram::merge and ::quantile).

/** A mutable sparse histogram: scale and a Map from bucket index to count. */
export function emptyHistogram() {
  return { scale: null, buckets: new Map(), total: 0 };
}

/** Adds the feed's histogram `h` into `into`, lowering the scale when they differ. */
export function mergeInto(into, h) {
  if (!h || !Array.isArray(h.counts) || h.counts.length === 0) return;
  if (into.scale === null) into.scale = h.scale;
  if (h.scale < into.scale) {
    // Lower `into` to h's scale: each step halves the resolution.
    const shift = into.scale - h.scale;
    const lowered = new Map();
    for (const [index, count] of into.buckets) {
      const target = index >> shift;
      lowered.set(target, (lowered.get(target) || 0) + count);
    }
    into.buckets = lowered;
    into.scale = h.scale;
  }
  const shift = h.scale - into.scale;
  h.counts.forEach((count, i) => {
    if (!count) return;
    const index = (h.offset + i) >> shift;
    into.buckets.set(index, (into.buckets.get(index) || 0) + count);
    into.total += count;
  });
}

/** The q-quantile in nanoseconds (the bucket's point of least relative error), or null. */
export function quantile(h, q) {
  if (!h.total) return null;
  const rank = Math.min(Math.max(Math.ceil(Math.min(Math.max(q, 0), 1) * h.total), 1), h.total);
  const indices = [...h.buckets.keys()].sort((a, b) => a - b);
  let seen = 0;
  const base = Math.pow(2, Math.pow(2, -h.scale));
  for (const index of indices) {
    seen += h.buckets.get(index);
    if (seen >= rank) {
      const lower = Math.pow(base, index);
      const upper = lower * base;
      return 2 * lower * upper / (lower + upper);
    }
  }
  return null;
}

/** Milliseconds with microsecond resolution, as the feed writes them. */
export function millis(nanos) {
  return Math.round(nanos / 1e3) / 1e3;
}
