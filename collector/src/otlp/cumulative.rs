//! Cumulative temporality (`OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=cumulative`),
//! for backends that store only cumulative series (Prometheus's and Mimir's OTLP receivers
//! without a delta conversion): each series' points are running totals since its first
//! window, as an OpenTelemetry SDK's cumulative exporter reports them.
//!
//! A series is what an aggregate measures without its interval: entity, direction,
//! profile, route, method and (client side) peer. Its total is the exact merge of every
//! aggregate exported for it (histograms add bucket by bucket, as the merger's do), its
//! start the first aggregate's start, its time the latest end. A late window adds to its
//! series like any aggregate. Totals live in memory: a restart starts every series again
//! with a new start time, which backends read as a counter reset. At most `max_series` are
//! kept; a new one beyond evicts the one updated longest ago (counted in
//! `trazor_collector_otlp_series_evicted_total`), which then starts again if it comes back.

use std::{collections::HashMap, str::FromStr, sync::Mutex};

use crate::merge::{Aggregate, Subject};

/// How metric points relate to each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Temporality {
    /// Each point is its window alone (Trazor's default).
    #[default]
    Delta,
    /// Each point is its series' total since the series' first window.
    Cumulative,
}

impl FromStr for Temporality {
    type Err = String;

    /// The values of `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`; `lowmemory` is
    /// delta for histograms and counters, which is all Trazor exports.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "delta" | "lowmemory" => Ok(Self::Delta),
            "cumulative" => Ok(Self::Cumulative),
            other => Err(format!(
                "OTLP metrics temporality {other:?} is not one of cumulative, delta, lowmemory"
            )),
        }
    }
}

/// A series: an aggregate's identity without its interval.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    subject: Subject,
    direction: i32,
    profile: String,
    route: String,
    method: String,
    peer: Option<(String, u32)>,
}

impl SeriesKey {
    fn of(aggregate: &Aggregate) -> Self {
        Self {
            subject: aggregate.subject.clone(),
            direction: aggregate.direction,
            profile: aggregate.profile.clone(),
            route: aggregate.route.clone(),
            method: aggregate.method.clone(),
            peer: aggregate
                .peer
                .as_ref()
                .map(|peer| (peer.address.clone(), peer.port)),
        }
    }
}

#[derive(Debug)]
struct Series {
    total: Aggregate,
    /// When it was last added to, as an export number (for eviction).
    used: u64,
}

/// Running totals of every series exported.
#[derive(Debug)]
pub struct Cumulative {
    max_series: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    series: HashMap<SeriesKey, Series>,
    exports: u64,
}

impl Cumulative {
    pub fn new(max_series: usize) -> Self {
        Self {
            max_series: max_series.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// Adds `aggregates` to their series and returns each series' new total, in the same
    /// order (two aggregates of one series give its total after each), and how many series
    /// were evicted to make room.
    pub fn accumulate(&self, aggregates: &[Aggregate]) -> (Vec<Aggregate>, u64) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.exports += 1;
        let used = state.exports;
        let mut evicted = 0;
        let mut totals = Vec::with_capacity(aggregates.len());
        for aggregate in aggregates {
            let key = SeriesKey::of(aggregate);
            if !state.series.contains_key(&key) && state.series.len() >= self.max_series {
                let stalest = state
                    .series
                    .iter()
                    .min_by_key(|(_, series)| series.used)
                    .map(|(key, _)| key.clone());
                if let Some(stalest) = stalest {
                    state.series.remove(&stalest);
                    evicted += 1;
                }
            }
            let series = state.series.entry(key).or_insert_with(|| Series {
                total: Aggregate {
                    windows: 0,
                    count: 0,
                    error_count: 0,
                    sum_nanos: 0,
                    min_nanos: u64::MAX,
                    max_nanos: 0,
                    status_class_counts: Vec::new(),
                    histogram: Default::default(),
                    statuses: Default::default(),
                    unmergeable: 0,
                    ..aggregate.clone()
                },
                used,
            });
            series.used = used;
            add(&mut series.total, aggregate);
            totals.push(series.total.clone());
        }
        (totals, evicted)
    }

    /// Series kept now.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .series
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Adds `aggregate` into `total`: exact for every field, as the merger adds windows.
fn add(total: &mut Aggregate, aggregate: &Aggregate) {
    total.start_unix_nanos = total.start_unix_nanos.min(aggregate.start_unix_nanos);
    total.end_unix_nanos = total.end_unix_nanos.max(aggregate.end_unix_nanos);
    total.windows = total.windows.saturating_add(aggregate.windows);
    total.count = total.count.saturating_add(aggregate.count);
    total.error_count = total.error_count.saturating_add(aggregate.error_count);
    total.sum_nanos = total.sum_nanos.saturating_add(aggregate.sum_nanos);
    if aggregate.count > 0 {
        total.min_nanos = total.min_nanos.min(aggregate.min_nanos);
        total.max_nanos = total.max_nanos.max(aggregate.max_nanos);
    }
    if total.status_class_counts.len() < aggregate.status_class_counts.len() {
        total
            .status_class_counts
            .resize(aggregate.status_class_counts.len(), 0);
    }
    for (into, count) in total
        .status_class_counts
        .iter_mut()
        .zip(&aggregate.status_class_counts)
    {
        *into = into.saturating_add(*count);
    }
    total.unmergeable = total.unmergeable.saturating_add(aggregate.unmergeable);
    if total.histogram.merge(&aggregate.histogram).is_err() {
        total.unmergeable = total.unmergeable.saturating_add(1);
    }
    for (&status_code, status) in &aggregate.statuses {
        total.statuses.entry(status_code).or_default().merge(status);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trazor_proto::v1::{
        ExponentialHistogram, LatencyStats, LatencyWindow, PodIdentity, Source,
    };

    use super::*;

    fn aggregate(route: &str, start: u64, buckets: &[(i32, u64)], classes: &[u64]) -> Aggregate {
        let histogram = ExponentialHistogram::from_sparse(
            6,
            &buckets.iter().copied().collect::<BTreeMap<_, _>>(),
        )
        .unwrap();
        let count = histogram.total();
        Aggregate::of_window(&LatencyWindow {
            sequence: 1,
            source: Some(Source {
                pod: Some(PodIdentity {
                    namespace: "shop".into(),
                    name: "checkout-1".into(),
                    workload_kind: "Deployment".into(),
                    workload_name: "checkout".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            route: route.into(),
            method: "GET".into(),
            start_unix_nanos: start,
            end_unix_nanos: start + 10,
            stats: Some(LatencyStats {
                count,
                error_count: classes.get(5).copied().unwrap_or(0),
                sum_nanos: count * 100,
                min_nanos: 90 + start,
                max_nanos: 110 + start,
                quantiles: Vec::new(),
            }),
            histogram: Some(histogram),
            status_class_counts: classes.to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn totals_add_up_per_series_from_the_first_start() {
        let cumulative = Cumulative::new(10);
        let (first, _) = cumulative.accumulate(&[
            aggregate("/a", 100, &[(10, 2)], &[0, 0, 2]),
            aggregate("/b", 100, &[(12, 1)], &[0, 0, 0, 0, 0, 1]),
        ]);
        assert_eq!(first[0].count, 2);
        let (second, evicted) =
            cumulative.accumulate(&[aggregate("/a", 110, &[(10, 1), (11, 3)], &[0, 0, 3, 1])]);
        assert_eq!(evicted, 0);
        let total = &second[0];
        assert_eq!(
            (total.start_unix_nanos, total.end_unix_nanos),
            (100, 120),
            "from the first start to the latest end"
        );
        assert_eq!((total.count, total.sum_nanos), (6, 600));
        assert_eq!((total.min_nanos, total.max_nanos), (190, 220));
        assert_eq!(total.status_class_counts, vec![0, 0, 5, 1]);
        assert_eq!(
            total.histogram.sparse().collect::<Vec<_>>(),
            vec![(10, 3), (11, 3)]
        );
        assert_eq!(cumulative.len(), 2);
    }

    #[test]
    fn the_series_updated_longest_ago_is_evicted_and_starts_again() {
        let cumulative = Cumulative::new(2);
        cumulative.accumulate(&[aggregate("/a", 100, &[(10, 1)], &[0, 0, 1])]);
        cumulative.accumulate(&[aggregate("/b", 100, &[(10, 1)], &[0, 0, 1])]);
        cumulative.accumulate(&[aggregate("/b", 110, &[(10, 1)], &[0, 0, 1])]);
        let (_, evicted) = cumulative.accumulate(&[aggregate("/c", 110, &[(10, 1)], &[0, 0, 1])]);
        assert_eq!((evicted, cumulative.len()), (1, 2));
        // /a went: it comes back from zero, with a new start.
        let (totals, evicted) =
            cumulative.accumulate(&[aggregate("/a", 120, &[(10, 1)], &[0, 0, 1])]);
        assert_eq!(evicted, 1, "/b was used before /c");
        assert_eq!((totals[0].count, totals[0].start_unix_nanos), (1, 120));
    }

    #[test]
    fn the_variable_values_parse() {
        assert_eq!("cumulative".parse(), Ok(Temporality::Cumulative));
        assert_eq!("Delta".parse(), Ok(Temporality::Delta));
        assert_eq!("lowmemory".parse(), Ok(Temporality::Delta));
        assert!(
            "monthly"
                .parse::<Temporality>()
                .unwrap_err()
                .contains("not one of cumulative, delta, lowmemory")
        );
    }
}
