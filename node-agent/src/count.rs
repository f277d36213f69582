//! Counting: the kernel's finished requests into the series of their windows.
//!
//! The kernel hands over each finished request as one [`FinishedRequest`] (series key and
//! latency) through its `REQUESTS` ring buffer, because writing that record costs the traced
//! process far less than counting it in kernel maps did (bench/results/capture.md). Here
//! each record lands in its series' totals (count, sum, min, max) and in the bucket of its
//! latency ([`bucket_index`], the same code the kernel used to run), so a closed window
//! holds exactly what kernel-side counting gave. The series are bounded as the kernel maps
//! were: what does not fit is counted, never silently lost.
//!
//! This runs for every request on the node, so it is kept cheap: records come in batches
//! (a ring drained every 100 ms), consecutive records of one series (a keep-alive
//! connection's requests) take one table lookup between them, and the tables hash with
//! foldhash rather than SipHash (bench/results/capture.md has the agent's CPU per request).

use std::collections::HashMap;

use foldhash::fast::RandomState;

use trazor_node_agent_ebpf_common::{FinishedRequest, SeriesKey, SeriesTotals, bucket_index};

use crate::capture::ClosedSeries;

/// Series of the open windows at most (cgroup, process, route, peer, method, status code,
/// window): beyond it a request is not counted (`series_table_full`).
pub const MAX_OPEN_SERIES: usize = 16_384;
/// Non-empty histogram buckets across the open series at most: beyond it a request's bucket
/// is not counted (`histogram_table_full`), its series' totals are.
pub const MAX_OPEN_BUCKETS: usize = 131_072;

/// The requests counted into series, for windows not yet closed.
#[derive(Debug, Default)]
pub struct SeriesCounter {
    open: HashMap<SeriesKey, OpenSeries, RandomState>,
    /// Non-empty buckets across `open`.
    buckets: usize,
    /// Requests not counted: the series table was full.
    series_table_full: u64,
    /// Requests whose bucket was not counted: the bucket table was full.
    histogram_table_full: u64,
}

#[derive(Debug, Default)]
struct OpenSeries {
    totals: SeriesTotals,
    buckets: HashMap<i32, u64, RandomState>,
}

impl SeriesCounter {
    /// Counts finished requests into their series, in order.
    pub fn count_all(&mut self, requests: &[FinishedRequest]) {
        let mut rest = requests;
        while let Some(first) = rest.first() {
            // A run of records of one series: one lookup for all of them.
            let run = rest
                .iter()
                .position(|request| request.series != first.series)
                .unwrap_or(rest.len());
            let (same_series, after) = rest.split_at(run);
            rest = after;
            let open_series = self.open.len();
            let series = match self.open.entry(first.series) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    if open_series >= MAX_OPEN_SERIES {
                        self.series_table_full += same_series.len() as u64;
                        continue;
                    }
                    entry.insert(OpenSeries::default())
                }
            };
            for request in same_series {
                series.totals.record(request.latency_nanos);
                let bucket = bucket_index(request.latency_nanos);
                if let Some(count) = series.buckets.get_mut(&bucket) {
                    *count += 1;
                } else if self.buckets >= MAX_OPEN_BUCKETS {
                    self.histogram_table_full += 1;
                } else {
                    series.buckets.insert(bucket, 1);
                    self.buckets += 1;
                }
            }
        }
    }

    /// Removes and returns every series of the windows numbered below `open_window`.
    pub fn take_closed(&mut self, open_window: u32) -> Vec<ClosedSeries> {
        let closing: Vec<SeriesKey> = self
            .open
            .keys()
            .filter(|key| key.window < open_window)
            .copied()
            .collect();
        closing
            .into_iter()
            .filter_map(|key| {
                let series = self.open.remove(&key)?;
                self.buckets -= series.buckets.len();
                Some(ClosedSeries {
                    key,
                    totals: series.totals,
                    buckets: series.buckets.into_iter().collect(),
                })
            })
            .collect()
    }

    /// Series of the open windows now.
    pub fn open_series(&self) -> usize {
        self.open.len()
    }

    /// Requests not counted because the series table was full, since the start.
    pub fn series_table_full(&self) -> u64 {
        self.series_table_full
    }

    /// Requests whose bucket was not counted because the bucket table was full.
    pub fn histogram_table_full(&self) -> u64 {
        self.histogram_table_full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_one(counter: &mut SeriesCounter, request: &FinishedRequest) {
        counter.count_all(std::slice::from_ref(request));
    }

    fn request(window: u32, route: u32, status: u16, latency_nanos: u64) -> FinishedRequest {
        FinishedRequest {
            series: SeriesKey {
                cgroup_id: 7,
                window,
                tgid: 42,
                route,
                status,
                ..SeriesKey::default()
            },
            latency_nanos,
        }
    }

    #[test]
    fn counts_each_series_exactly_and_closes_only_past_windows() {
        let mut counter = SeriesCounter::default();
        for latency in [3_000, 1_000, 2_000_000, 1_000] {
            count_one(&mut counter, &request(10, 1, 200, latency));
        }
        count_one(&mut counter, &request(10, 1, 500, 9_000));
        count_one(&mut counter, &request(11, 1, 200, 5_000));

        let mut closed = counter.take_closed(11);
        closed.sort_by_key(|series| series.key.status);
        assert_eq!(closed.len(), 2, "window 11 is still open");
        let ok = &closed[0];
        assert_eq!(
            ok.totals,
            SeriesTotals {
                count: 4,
                sum_nanos: 2_005_000,
                min_nanos: 1_000,
                max_nanos: 2_000_000,
            }
        );
        let expected: std::collections::BTreeMap<i32, u64> = [
            (bucket_index(1_000), 2),
            (bucket_index(3_000), 1),
            (bucket_index(2_000_000), 1),
        ]
        .into();
        assert_eq!(ok.buckets, expected);
        assert_eq!(closed[1].totals.count, 1);
        assert_eq!(closed[1].key.status, 500);

        assert_eq!(counter.open_series(), 1);
        assert_eq!(counter.buckets, 1, "closed series give their buckets back");
        let rest = counter.take_closed(12);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].totals.min_nanos, 5_000);
        assert_eq!(counter.buckets, 0);
    }

    #[test]
    fn runs_of_one_series_count_as_their_records_do_one_by_one() {
        let requests: Vec<FinishedRequest> = [(1, 200, 1_000), (1, 200, 7_000), (2, 200, 3_000)]
            .into_iter()
            .chain([(1, 200, 2_000), (1, 500, 2_000), (1, 500, 9_000)])
            .map(|(route, status, latency)| request(4, route, status, latency))
            .collect();
        let mut batched = SeriesCounter::default();
        batched.count_all(&requests);
        let mut single = SeriesCounter::default();
        for request in &requests {
            count_one(&mut single, request);
        }
        let sorted = |mut closed: Vec<ClosedSeries>| {
            closed.sort_by_key(|series| (series.key.route, series.key.status));
            closed
        };
        let closed = sorted(batched.take_closed(5));
        assert_eq!(closed, sorted(single.take_closed(5)));
        assert_eq!(closed.len(), 3);
        assert_eq!(closed[0].totals.count, 3);
        assert_eq!(closed[0].totals.sum_nanos, 10_000);
    }

    #[test]
    fn a_full_table_counts_what_it_cannot_hold() {
        let mut counter = SeriesCounter::default();
        for route in 0..MAX_OPEN_SERIES as u32 {
            count_one(&mut counter, &request(1, route, 200, 1_000));
        }
        count_one(&mut counter, &request(1, u32::MAX, 200, 1_000));
        count_one(&mut counter, &request(1, u32::MAX, 200, 2_000));
        assert_eq!(counter.series_table_full(), 2);
        // A series already open still counts.
        count_one(&mut counter, &request(1, 0, 200, 1_000));
        assert_eq!(counter.series_table_full(), 2);

        let mut counter = SeriesCounter {
            buckets: MAX_OPEN_BUCKETS,
            ..SeriesCounter::default()
        };
        count_one(&mut counter, &request(1, 1, 200, 1_000));
        count_one(&mut counter, &request(1, 1, 200, 1_000_000));
        assert_eq!(counter.histogram_table_full(), 2);
        let closed = counter.take_closed(2);
        assert_eq!(closed[0].totals.count, 2, "the totals still count them");
        assert!(closed[0].buckets.is_empty());
    }
}
