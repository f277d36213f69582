//! Merge: windows of the same workload (or pod, or process name when there is no pod),
//! route, method, direction (and, client side, server) and wall-clock window, from every
//! agent, added into one aggregate.
//!
//! The merge is exact: counts, errors, sums and status classes add, min and max take the
//! extremes, and the histograms add bucket by bucket ([`ExponentialHistogram::merge`]), so
//! the aggregate's percentiles are what one agent counting every request would report —
//! never an average of percentiles. The same holds for each status code's share.
//!
//! An aggregate stays open until `grace` after its window's end, then is closed and
//! published. A window arriving after that is late: it is still published on its own (it
//! is counted exactly once), counted in `trazor_collector_windows_late_total`, and not
//! merged (its aggregate is already out).

use std::{
    collections::{BTreeMap, HashMap},
    hash::{DefaultHasher, Hash, Hasher},
    sync::Mutex,
    time::Duration,
};

use serde::Serialize;
use trazor_proto::{
    histogram::MAX_DENSE_BUCKETS,
    status::StatusShare,
    v1::{ExponentialHistogram, LatencyWindow, Peer},
};

use crate::view::{HistogramView, PeerView, percentile_label};

/// What an aggregate is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Subject {
    /// A Kubernetes workload, e.g. Deployment shop/checkout: every pod of it, every node.
    Workload {
        namespace: String,
        workload_kind: String,
        workload_name: String,
    },
    /// A pod without a known owner (every container of it). Its uid is part of what it is:
    /// a pod deleted and made again under the same name is another pod.
    Pod {
        namespace: String,
        name: String,
        uid: String,
    },
    /// Standalone mode: every process of this name, on every node.
    Process { name: String },
}

impl Subject {
    pub fn of(window: &LatencyWindow) -> Self {
        let source = window.source.as_ref();
        match source.and_then(|source| source.pod.as_ref()) {
            Some(pod) if !pod.workload_name.is_empty() => Self::Workload {
                namespace: pod.namespace.clone(),
                workload_kind: pod.workload_kind.clone(),
                workload_name: pod.workload_name.clone(),
            },
            Some(pod) => Self::Pod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
            },
            None => Self::Process {
                name: source.map(|s| s.process_name.clone()).unwrap_or_default(),
            },
        }
    }

    /// Whether `window` belongs to this subject, without allocating.
    fn matches(&self, window: &LatencyWindow) -> bool {
        let source = window.source.as_ref();
        match (self, source.and_then(|source| source.pod.as_ref())) {
            (
                Self::Workload {
                    namespace,
                    workload_kind,
                    workload_name,
                },
                Some(pod),
            ) => {
                !pod.workload_name.is_empty()
                    && *namespace == pod.namespace
                    && *workload_kind == pod.workload_kind
                    && *workload_name == pod.workload_name
            }
            (
                Self::Pod {
                    namespace,
                    name,
                    uid,
                },
                Some(pod),
            ) => {
                pod.workload_name.is_empty()
                    && *namespace == pod.namespace
                    && *name == pod.name
                    && *uid == pod.uid
            }
            (Self::Process { name }, None) => {
                *name == source.map_or("", |source| source.process_name.as_str())
            }
            _ => false,
        }
    }

    fn hash_window(window: &LatencyWindow, hasher: &mut impl Hasher) {
        let source = window.source.as_ref();
        match source.and_then(|source| source.pod.as_ref()) {
            Some(pod) if !pod.workload_name.is_empty() => {
                (0u8, &pod.namespace, &pod.workload_kind, &pod.workload_name).hash(hasher);
            }
            Some(pod) => (1u8, &pod.namespace, &pod.name, &pod.uid).hash(hasher),
            None => (
                2u8,
                source.map_or("", |source| source.process_name.as_str()),
            )
                .hash(hasher),
        }
    }
}

/// Why a window cannot be accepted at all (it is acknowledged and dropped, and counted).
pub fn validate(window: &LatencyWindow) -> Result<(), String> {
    if window.sequence == 0 {
        return Err("sequence 0 (sequences start at 1)".into());
    }
    if window.end_unix_nanos <= window.start_unix_nanos {
        return Err(format!(
            "window end {} is not after its start {}",
            window.end_unix_nanos, window.start_unix_nanos
        ));
    }
    if let Some(histogram) = &window.histogram
        && histogram.bucket_counts.len() > MAX_DENSE_BUCKETS
    {
        return Err(format!(
            "histogram has {} buckets, more than the limit of {MAX_DENSE_BUCKETS}",
            histogram.bucket_counts.len()
        ));
    }
    let shares = window
        .status_shares()
        .map_err(|reason| format!("status breakdown: {reason}"))?;
    for share in shares {
        if share.status_code != 0 && !(100..600).contains(&share.status_code) {
            return Err(format!(
                "status code {} is not one of 100..=599 (0 for unknown)",
                share.status_code
            ));
        }
        if let Some(histogram) = share.histogram
            && histogram.bucket_counts.len() > MAX_DENSE_BUCKETS
        {
            return Err(format!(
                "status {}'s histogram has {} buckets, more than the limit of \
                 {MAX_DENSE_BUCKETS}",
                share.status_code,
                histogram.bucket_counts.len()
            ));
        }
    }
    Ok(())
}

/// The requests of one status code in an aggregate: merged exactly, as the aggregate's.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusAggregate {
    pub count: u64,
    pub sum_nanos: u64,
    /// `u64::MAX` until a request is counted.
    pub min_nanos: u64,
    pub max_nanos: u64,
    pub histogram: ExponentialHistogram,
    /// Shares whose histogram could not be merged (other scale): counted, not merged.
    pub unmergeable: u64,
}

impl Default for StatusAggregate {
    fn default() -> Self {
        Self {
            count: 0,
            sum_nanos: 0,
            min_nanos: u64::MAX,
            max_nanos: 0,
            histogram: ExponentialHistogram::default(),
            unmergeable: 0,
        }
    }
}

impl StatusAggregate {
    /// Adds one window's share of this status.
    pub fn add(&mut self, share: &StatusShare<'_>) {
        self.count = self.count.saturating_add(share.count);
        self.sum_nanos = self.sum_nanos.saturating_add(share.sum_nanos);
        if share.count > 0 {
            self.min_nanos = self.min_nanos.min(share.min_nanos);
            self.max_nanos = self.max_nanos.max(share.max_nanos);
        }
        if let Some(histogram) = share.histogram
            && self.histogram.merge(histogram).is_err()
        {
            self.unmergeable += 1;
        }
    }

    /// Adds another aggregate of this status.
    pub fn merge(&mut self, other: &Self) {
        self.add(&StatusShare {
            status_code: 0,
            count: other.count,
            sum_nanos: other.sum_nanos,
            min_nanos: other.min_nanos,
            max_nanos: other.max_nanos,
            histogram: Some(&other.histogram),
        });
        self.unmergeable = self.unmergeable.saturating_add(other.unmergeable);
    }
}

/// Windows of one subject and window, merged.
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub subject: Subject,
    pub direction: i32,
    pub profile: String,
    /// Route template; windows of different routes are separate aggregates.
    pub route: String,
    /// HTTP method; likewise.
    pub method: String,
    /// The server a client made its requests to (client windows only); likewise, so a
    /// client's latency to each server is its own series (OTel's `server.address` and
    /// `server.port`).
    pub peer: Option<Peer>,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// Windows merged in.
    pub windows: u64,
    pub count: u64,
    pub error_count: u64,
    pub sum_nanos: u64,
    pub min_nanos: u64,
    pub max_nanos: u64,
    pub status_class_counts: Vec<u64>,
    pub histogram: ExponentialHistogram,
    /// The requests by status code (0: unknown), each with its own distribution; they add
    /// up to the aggregate's.
    pub statuses: BTreeMap<u32, StatusAggregate>,
    /// Quantiles to report: those the agents asked for.
    pub quantiles: Vec<f64>,
    /// Windows whose histogram could not be merged (other scale): counted, not merged.
    pub unmergeable: u64,
}

impl Aggregate {
    fn new(window: &LatencyWindow) -> Self {
        Self {
            subject: Subject::of(window),
            direction: window.direction,
            profile: window.profile.clone(),
            route: window.route.clone(),
            method: window.method.clone(),
            peer: window.peer.clone(),
            start_unix_nanos: window.start_unix_nanos,
            end_unix_nanos: window.end_unix_nanos,
            windows: 0,
            count: 0,
            error_count: 0,
            sum_nanos: 0,
            min_nanos: u64::MAX,
            max_nanos: 0,
            status_class_counts: Vec::new(),
            histogram: ExponentialHistogram::default(),
            statuses: BTreeMap::new(),
            quantiles: Vec::new(),
            unmergeable: 0,
        }
    }

    /// An aggregate of `window` alone (a late window, exported on its own).
    pub fn of_window(window: &LatencyWindow) -> Self {
        let mut aggregate = Self::new(window);
        aggregate.add(window);
        aggregate
    }

    fn matches(&self, window: &LatencyWindow) -> bool {
        self.start_unix_nanos == window.start_unix_nanos
            && self.end_unix_nanos == window.end_unix_nanos
            && self.direction == window.direction
            && self.profile == window.profile
            && self.route == window.route
            && self.method == window.method
            && self.peer == window.peer
            && self.subject.matches(window)
    }

    /// Adds one window: exact for every field.
    pub fn add(&mut self, window: &LatencyWindow) {
        self.windows += 1;
        if let Some(stats) = &window.stats {
            self.count = self.count.saturating_add(stats.count);
            self.error_count = self.error_count.saturating_add(stats.error_count);
            self.sum_nanos = self.sum_nanos.saturating_add(stats.sum_nanos);
            if stats.count > 0 {
                self.min_nanos = self.min_nanos.min(stats.min_nanos);
                self.max_nanos = self.max_nanos.max(stats.max_nanos);
            }
            for quantile in &stats.quantiles {
                // Bounded: a quantile list is a handful; garbage input must not grow it.
                if self.quantiles.len() < 16 && !self.quantiles.contains(&quantile.quantile) {
                    self.quantiles.push(quantile.quantile);
                }
            }
        }
        if self.status_class_counts.len() < window.status_class_counts.len() {
            self.status_class_counts
                .resize(window.status_class_counts.len().min(16), 0);
        }
        for (into, count) in self
            .status_class_counts
            .iter_mut()
            .zip(&window.status_class_counts)
        {
            *into = into.saturating_add(*count);
        }
        if let Some(histogram) = &window.histogram
            && self.histogram.merge(histogram).is_err()
        {
            self.unmergeable += 1;
        }
        for share in window.status_shares_or_unknown() {
            self.statuses
                .entry(share.status_code)
                .or_default()
                .add(&share);
        }
    }

    /// The aggregate as a feed document.
    pub fn view(&self) -> AggregateView {
        let millis = |nanos: u64| (nanos as f64 / 1e3).round() / 1e3;
        let min = if self.count == 0 { 0 } else { self.min_nanos };
        let percentiles = self
            .quantiles
            .iter()
            .filter_map(|&q| {
                let value = self.histogram.quantile(q)?;
                // Clamped to what was seen, as the agent does.
                let nanos = (value as u64).clamp(min, self.max_nanos.max(min));
                Some((percentile_label(q), millis(nanos).into()))
            })
            .collect();
        AggregateView {
            kind: "aggregate",
            subject: self.subject.clone(),
            direction: crate::view::direction_name(self.direction),
            profile: self.profile.clone(),
            route: self.route.clone(),
            method: self.method.clone(),
            start_unix_ms: self.start_unix_nanos / 1_000_000,
            end_unix_ms: self.end_unix_nanos / 1_000_000,
            windows: self.windows,
            count: self.count,
            errors: self.error_count,
            min_ms: millis(min),
            mean_ms: self.sum_nanos.checked_div(self.count).map_or(0.0, millis),
            max_ms: millis(self.max_nanos),
            percentiles,
            status_class_counts: self.status_class_counts.clone(),
            histogram: HistogramView {
                scale: self.histogram.scale,
                offset: self.histogram.offset,
                counts: self.histogram.bucket_counts.clone(),
            },
            peer: self.peer.as_ref().map(|peer| PeerView {
                address: peer.address.clone(),
                port: peer.port,
            }),
        }
    }
}

/// The JSON of a closed aggregate on the feed (`"type": "aggregate"`).
#[derive(Debug, Serialize)]
pub struct AggregateView {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub subject: Subject,
    pub direction: &'static str,
    pub profile: String,
    pub route: String,
    pub method: String,
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    pub windows: u64,
    pub count: u64,
    pub errors: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    pub percentiles: serde_json::Map<String, serde_json::Value>,
    pub status_class_counts: Vec<u64>,
    pub histogram: HistogramView,
    /// The server of a client-side aggregate: client windows to different servers are
    /// separate aggregates, and this tells them apart. `null` server side.
    pub peer: Option<PeerView>,
}

/// What happened to a window handed to [`WindowMerger::accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// Added to its open aggregate.
    Merged,
    /// Arrived after its aggregate closed (window end + grace).
    Late,
}

/// Open aggregates, keyed by a hash of (subject, window, direction, profile).
#[derive(Debug)]
pub struct WindowMerger {
    grace: Duration,
    open: Mutex<HashMap<u64, Vec<Aggregate>>>,
}

impl WindowMerger {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    fn key(window: &LatencyWindow) -> u64 {
        let mut hasher = DefaultHasher::new();
        Subject::hash_window(window, &mut hasher);
        (
            window.start_unix_nanos,
            window.end_unix_nanos,
            window.direction,
            &window.profile,
            &window.route,
            &window.method,
        )
            .hash(&mut hasher);
        hasher.finish()
    }

    fn closes_at(&self, end_unix_nanos: u64) -> u64 {
        end_unix_nanos.saturating_add(self.grace.as_nanos() as u64)
    }

    /// Merges `window` into its aggregate unless that has closed (`now` past its end plus
    /// the grace period).
    pub fn accept(&self, window: &LatencyWindow, now_unix_nanos: u64) -> Merged {
        if now_unix_nanos > self.closes_at(window.end_unix_nanos) {
            return Merged::Late;
        }
        let key = Self::key(window);
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bucket = open.entry(key).or_default();
        match bucket
            .iter_mut()
            .find(|aggregate| aggregate.matches(window))
        {
            Some(aggregate) => aggregate.add(window),
            None => {
                let mut aggregate = Aggregate::new(window);
                aggregate.add(window);
                bucket.push(aggregate);
            }
        }
        Merged::Merged
    }

    /// Removes and returns the aggregates whose grace period is over, oldest first.
    pub fn close_due(&self, now_unix_nanos: u64) -> Vec<Aggregate> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut closed = Vec::new();
        open.retain(|_, bucket| {
            bucket.retain(|aggregate| {
                if now_unix_nanos > self.closes_at(aggregate.end_unix_nanos) {
                    closed.push(aggregate.clone());
                    false
                } else {
                    true
                }
            });
            !bucket.is_empty()
        });
        closed.sort_by_key(|aggregate| aggregate.start_unix_nanos);
        closed
    }

    /// Aggregates open now.
    pub fn open_len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trazor_proto::v1::{Direction, LatencyStats, PodIdentity, Quantile, Source};

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn window(pod: &str, workload: &str, latencies: &[(i32, u64)]) -> LatencyWindow {
        let histogram = ExponentialHistogram::from_sparse(
            6,
            &latencies.iter().copied().collect::<BTreeMap<_, _>>(),
        )
        .unwrap();
        let count = histogram.total();
        LatencyWindow {
            sequence: 1,
            source: Some(Source {
                node_name: format!("node-of-{pod}"),
                pod: Some(PodIdentity {
                    namespace: "shop".into(),
                    name: pod.into(),
                    workload_kind: "Deployment".into(),
                    workload_name: workload.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            start_unix_nanos: 100 * SECOND,
            end_unix_nanos: 110 * SECOND,
            stats: Some(LatencyStats {
                count,
                error_count: 1,
                sum_nanos: count * 1_000,
                min_nanos: 900,
                max_nanos: 5_000,
                quantiles: vec![Quantile {
                    quantile: 0.5,
                    value_nanos: 1_000,
                }],
            }),
            histogram: Some(histogram),
            status_class_counts: vec![0, 0, count - 1, 0, 0, 1],
            ..Default::default()
        }
    }

    #[test]
    fn workload_windows_from_several_agents_merge_exactly() {
        let merger = WindowMerger::new(Duration::from_secs(5));
        let now = 111 * SECOND;
        // Two pods of one Deployment on two nodes, plus another workload.
        let a = window("checkout-1", "checkout", &[(600, 3), (640, 1)]);
        let b = window("checkout-2", "checkout", &[(600, 1), (700, 5)]);
        let other = window("cart-1", "cart", &[(500, 2)]);
        for w in [&a, &b, &other] {
            assert_eq!(merger.accept(w, now), Merged::Merged);
        }
        assert_eq!(merger.open_len(), 2);
        assert!(merger.close_due(now).is_empty(), "still within grace");
        let closed = merger.close_due(116 * SECOND);
        assert_eq!(closed.len(), 2);
        let checkout = closed
            .iter()
            .find(|aggregate| {
                matches!(&aggregate.subject, Subject::Workload { workload_name, .. } if workload_name == "checkout")
            })
            .unwrap();
        assert_eq!(
            (checkout.windows, checkout.count, checkout.error_count),
            (2, 10, 2)
        );
        let mut expected = a.histogram.clone().unwrap();
        expected.merge(b.histogram.as_ref().unwrap()).unwrap();
        assert_eq!(checkout.histogram, expected);
        // The median of the merged distribution, not the mean of two medians.
        assert_eq!(checkout.histogram.quantile(0.5), expected.quantile(0.5));
        assert_eq!(checkout.status_class_counts, vec![0, 0, 8, 0, 0, 2]);
        let json = serde_json::to_value(checkout.view()).unwrap();
        assert_eq!(json["type"], "aggregate");
        assert_eq!(json["subject"]["kind"], "workload");
        assert!(json["percentiles"]["p50"].as_f64().is_some());
        assert_eq!(merger.open_len(), 0);
    }

    #[test]
    fn an_ownerless_pod_made_again_under_its_name_is_another_subject() {
        let merger = WindowMerger::new(Duration::from_secs(5));
        let mut first = window("debug", "", &[(600, 1)]);
        let mut again = first.clone();
        for (window, uid) in [(&mut first, "uid-1"), (&mut again, "uid-2")] {
            if let Some(pod) = window
                .source
                .as_mut()
                .and_then(|source| source.pod.as_mut())
            {
                pod.uid = uid.into();
            }
        }
        let mut same = first.clone();
        if let Some(pod) = same.source.as_mut().and_then(|source| source.pod.as_mut()) {
            pod.container = "sidecar".into();
        }
        for w in [&first, &again, &same] {
            assert_eq!(merger.accept(w, 111 * SECOND), Merged::Merged);
        }
        let mut closed = merger.close_due(116 * SECOND);
        closed.sort_by_key(|aggregate| aggregate.windows);
        let subjects: Vec<_> = closed
            .iter()
            .map(|aggregate| (aggregate.subject.clone(), aggregate.windows))
            .collect();
        let pod = |uid: &str| Subject::Pod {
            namespace: "shop".into(),
            name: "debug".into(),
            uid: uid.into(),
        };
        // Its containers are one pod, as a workload's pods are one workload.
        assert_eq!(subjects, vec![(pod("uid-2"), 1), (pod("uid-1"), 2)]);
    }

    #[test]
    fn client_windows_to_different_servers_are_separate_aggregates_that_name_their_server() {
        let merger = WindowMerger::new(Duration::from_secs(5));
        let to = |address: &str| {
            let mut client = window("checkout-1", "checkout", &[(600, 1)]);
            client.direction = Direction::Client as i32;
            client.peer = Some(Peer {
                address: address.into(),
                port: 8080,
            });
            client
        };
        for w in [to("10.0.0.1"), to("10.0.0.2"), to("10.0.0.1")] {
            assert_eq!(merger.accept(&w, 111 * SECOND), Merged::Merged);
        }
        let mut views: Vec<_> = merger
            .close_due(116 * SECOND)
            .iter()
            .map(|aggregate| serde_json::to_value(aggregate.view()).unwrap())
            .map(|json| (json["peer"].clone(), json["windows"].clone()))
            .collect();
        views.sort_by_key(|(peer, _)| peer.to_string());
        assert_eq!(
            views,
            vec![
                (
                    serde_json::json!({"address": "10.0.0.1", "port": 8080}),
                    2.into()
                ),
                (
                    serde_json::json!({"address": "10.0.0.2", "port": 8080}),
                    1.into()
                ),
            ]
        );
        // Server side, no peer: null, as windows say it.
        let server = Aggregate::of_window(&window("p", "w", &[(600, 1)]));
        assert_eq!(
            serde_json::to_value(server.view()).unwrap()["peer"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn windows_after_the_grace_period_are_late() {
        let merger = WindowMerger::new(Duration::from_secs(5));
        let w = window("p", "w", &[(600, 1)]);
        assert_eq!(merger.accept(&w, 115 * SECOND), Merged::Merged);
        assert_eq!(merger.accept(&w, 115 * SECOND + 1), Merged::Late);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut w = window("p", "w", &[(600, 1)]);
        assert!(validate(&w).is_ok());
        w.sequence = 0;
        assert!(validate(&w).unwrap_err().contains("sequence 0"));
        w.sequence = 1;
        w.end_unix_nanos = w.start_unix_nanos;
        assert!(validate(&w).unwrap_err().contains("not after"));
        w.end_unix_nanos = w.start_unix_nanos + SECOND;
        let status = |status_code, count| trazor_proto::v1::StatusLatency {
            status_code,
            count,
            ..Default::default()
        };
        w.statuses = vec![status(200, 2)];
        let error = validate(&w).unwrap_err();
        assert!(
            error.contains("status breakdown") && error.contains("the window 1"),
            "{error}"
        );
        w.statuses = vec![status(700, 1)];
        assert!(validate(&w).unwrap_err().contains("status code 700"));
        w.statuses = vec![status(200, 1)];
        assert!(validate(&w).is_ok());
    }

    #[test]
    fn statuses_merge_code_by_code_and_add_up_to_the_aggregate() {
        let with_statuses = |pod, statuses: &[(u32, i32, u64)]| {
            let mut w = window(
                pod,
                "checkout",
                &statuses
                    .iter()
                    .map(|&(_, bucket, count)| (bucket, count))
                    .collect::<Vec<_>>(),
            );
            w.statuses = statuses
                .iter()
                .map(
                    |&(status_code, bucket, count)| trazor_proto::v1::StatusLatency {
                        status_code,
                        count,
                        sum_nanos: count * 1_000,
                        min_nanos: 900,
                        max_nanos: 5_000,
                        histogram: Some(
                            ExponentialHistogram::from_sparse(
                                6,
                                &BTreeMap::from([(bucket, count)]),
                            )
                            .unwrap(),
                        ),
                    },
                )
                .collect();
            w
        };
        let merger = WindowMerger::new(Duration::from_secs(5));
        merger.accept(&with_statuses("a", &[(200, 600, 3), (500, 700, 1)]), 0);
        // One status: the compact form (code and count; the rest is the window's).
        let mut single = window("b", "checkout", &[(610, 2)]);
        single.statuses = vec![trazor_proto::v1::StatusLatency {
            status_code: 200,
            count: 2,
            ..Default::default()
        }];
        merger.accept(&single, 0);
        // An agent before statuses: its requests' status is unknown (code 0).
        merger.accept(&window("c", "checkout", &[(620, 1)]), 0);
        let closed = merger.close_due(200 * SECOND);
        assert_eq!(closed.len(), 1);
        let aggregate = &closed[0];
        // (code, count, histogram buckets) of each status.
        type StatusBuckets = (u32, u64, Vec<(i32, u64)>);
        let by_code: Vec<StatusBuckets> = aggregate
            .statuses
            .iter()
            .map(|(&code, status)| (code, status.count, status.histogram.sparse().collect()))
            .collect();
        assert_eq!(
            by_code,
            vec![
                (0, 1, vec![(620, 1)]),
                (200, 5, vec![(600, 3), (610, 2)]),
                (500, 1, vec![(700, 1)]),
            ]
        );
        let mut total = ExponentialHistogram::default();
        for status in aggregate.statuses.values() {
            total.merge(&status.histogram).unwrap();
        }
        assert_eq!(total, aggregate.histogram);
    }
}
