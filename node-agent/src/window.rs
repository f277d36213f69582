//! Window: turns the kernel's closed series into [`LatencyWindow`]s, one per source and
//! direction and window, with totals, status classes, quantiles and the histogram itself.
//!
//! The kernel keys series finer (method, status class); they are merged here exactly, by
//! adding histogram buckets, never by combining percentiles.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use trazor_node_agent_ebpf_common::{HISTOGRAM_SCALE, SeriesKey};
use trazor_proto::v1::{Direction, ExponentialHistogram, LatencyStats, LatencyWindow, Quantile};

use crate::{attribute::SourceResolver, capture::ClosedSeries};

/// Requests whose status is 5xx count as errors.
const ERROR_STATUS_CLASS: u8 = 5;

/// Builds windows from closed series.
#[derive(Clone, Debug)]
pub struct WindowBuilder {
    window: Duration,
    quantiles: Vec<f64>,
}

#[derive(Hash, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
struct WindowKey {
    window: u32,
    cgroup_id: u64,
    tgid: u32,
    direction: u8,
}

#[derive(Default)]
struct Accumulator {
    count: u64,
    errors: u64,
    sum: u64,
    min: u64,
    max: u64,
    status_classes: [u64; 6],
    buckets: BTreeMap<i32, u64>,
}

impl WindowBuilder {
    pub fn new(window: Duration, quantiles: Vec<f64>) -> Self {
        Self { window, quantiles }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// One [`LatencyWindow`] per (window, cgroup, process, direction), sequence unset (0),
    /// ordered by window then source.
    pub fn build(
        &self,
        closed: Vec<ClosedSeries>,
        resolver: &mut SourceResolver,
    ) -> Vec<LatencyWindow> {
        let mut grouped: HashMap<WindowKey, Accumulator> = HashMap::new();
        for series in closed {
            let SeriesKey {
                cgroup_id,
                window,
                tgid,
                direction,
                status_class,
                ..
            } = series.key;
            if series.totals.count == 0 {
                continue;
            }
            let entry = grouped
                .entry(WindowKey {
                    window,
                    cgroup_id,
                    tgid,
                    direction,
                })
                .or_default();
            entry.min = if entry.count == 0 {
                series.totals.min_nanos
            } else {
                entry.min.min(series.totals.min_nanos)
            };
            entry.max = entry.max.max(series.totals.max_nanos);
            entry.count += series.totals.count;
            entry.sum += series.totals.sum_nanos;
            if status_class == ERROR_STATUS_CLASS {
                entry.errors += series.totals.count;
            }
            entry.status_classes[usize::from(status_class.min(5))] += series.totals.count;
            for (bucket, count) in series.buckets {
                *entry.buckets.entry(bucket).or_default() += count;
            }
        }
        let mut keys: Vec<WindowKey> = grouped.keys().copied().collect();
        keys.sort();
        let window_nanos = self.window.as_nanos() as u64;
        keys.into_iter()
            .filter_map(|key| {
                let totals = grouped.remove(&key)?;
                let histogram =
                    match ExponentialHistogram::from_sparse(HISTOGRAM_SCALE, &totals.buckets) {
                        Ok(histogram) => histogram,
                        Err(error) => {
                            tracing::warn!(%error, "dropping a malformed histogram");
                            ExponentialHistogram::default()
                        }
                    };
                let quantiles = self
                    .quantiles
                    .iter()
                    .filter_map(|&quantile| {
                        let value = histogram.quantile(quantile)?;
                        Some(Quantile {
                            quantile,
                            value_nanos: (value.round() as u64).clamp(totals.min, totals.max),
                        })
                    })
                    .collect();
                let start = u64::from(key.window) * window_nanos;
                Some(LatencyWindow {
                    sequence: 0,
                    source: Some(resolver.resolve(key.cgroup_id, key.tgid)),
                    direction: match key.direction {
                        2 => Direction::Client,
                        _ => Direction::Server,
                    } as i32,
                    start_unix_nanos: start,
                    end_unix_nanos: start + window_nanos,
                    stats: Some(LatencyStats {
                        count: totals.count,
                        error_count: totals.errors,
                        sum_nanos: totals.sum,
                        min_nanos: totals.min,
                        max_nanos: totals.max,
                        quantiles,
                    }),
                    histogram: Some(histogram),
                    status_class_counts: totals.status_classes.to_vec(),
                    profile: String::new(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use trazor_node_agent_ebpf_common::{SeriesTotals, bucket_index};

    use super::*;

    fn series(window: u32, tgid: u32, status_class: u8, latencies_ms: &[u64]) -> ClosedSeries {
        let nanos: Vec<u64> = latencies_ms.iter().map(|ms| ms * 1_000_000).collect();
        let mut buckets = BTreeMap::new();
        for &latency in &nanos {
            *buckets.entry(bucket_index(latency)).or_default() += 1;
        }
        ClosedSeries {
            key: SeriesKey {
                cgroup_id: 1,
                window,
                tgid,
                direction: 1,
                method: 1,
                status_class,
                _pad: [0; 5],
            },
            totals: SeriesTotals {
                count: nanos.len() as u64,
                sum_nanos: nanos.iter().sum(),
                min_nanos: *nanos.iter().min().unwrap(),
                max_nanos: *nanos.iter().max().unwrap(),
            },
            buckets,
        }
    }

    #[test]
    fn merges_status_classes_of_one_process_into_one_window() {
        let builder = WindowBuilder::new(Duration::from_secs(10), vec![0.5, 0.99]);
        let mut resolver = SourceResolver::new("n".into(), None);
        let windows = builder.build(
            vec![
                series(7, 100, 2, &[10, 20, 30, 40]),
                series(7, 100, 5, &[50]),
                series(7, 200, 2, &[1]),
                series(8, 100, 2, &[5]),
            ],
            &mut resolver,
        );
        assert_eq!(windows.len(), 3);
        let first = &windows[0];
        let stats = first.stats.as_ref().unwrap();
        assert_eq!(first.source.as_ref().unwrap().pid, 100);
        assert_eq!((stats.count, stats.error_count), (5, 1));
        assert_eq!((stats.min_nanos, stats.max_nanos), (10_000_000, 50_000_000));
        assert_eq!(stats.sum_nanos, 150_000_000);
        assert_eq!(first.status_class_counts, vec![0, 0, 4, 0, 0, 1]);
        assert_eq!(first.start_unix_nanos, 70_000_000_000);
        assert_eq!(first.end_unix_nanos, 80_000_000_000);
        assert_eq!(first.histogram.as_ref().unwrap().total(), 5);
        let p50 = stats.quantiles[0].value_nanos as f64;
        assert!((p50 - 30e6).abs() / 30e6 < 0.0055, "p50 {p50}");
        // p99 is the largest value, clamped to the exact max.
        assert!(stats.quantiles[1].value_nanos <= 50_000_000);
        assert_eq!(windows[1].source.as_ref().unwrap().pid, 200);
        assert_eq!(windows[2].start_unix_nanos, 80_000_000_000);
    }
}
