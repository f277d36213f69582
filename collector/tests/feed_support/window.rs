//! Windows the tests send: who (a pod, an ownerless pod, or a process outside any pod),
//! when, and a scale-6 histogram from which the stats are derived as an agent derives
//! them, so what a page or terminal should show can be computed from the same window.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use trazor_proto::v1::{
    AgentMessage, Direction, Exemplar, ExponentialHistogram, LatencyStats, LatencyWindow, Peer,
    PodIdentity, Quantile, Source, agent_message,
};

pub const SECOND: u64 = 1_000_000_000;

/// Unix nanoseconds now.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Unix milliseconds now (the feed's own unit).
pub fn unix_ms() -> u64 {
    unix_nanos() / 1_000_000
}

/// One window a test sends. The default is a 1 s window of pod shop/checkout-1 ending now,
/// served, 10 requests (one a 5xx) in 8 adjacent buckets, with one exemplar.
#[derive(Clone, Debug)]
pub struct TestWindow {
    /// Empty: a process outside any pod.
    pub namespace: &'static str,
    /// Empty: a pod no workload owns.
    pub workload: &'static str,
    pub pod: &'static str,
    pub node: &'static str,
    pub process: &'static str,
    pub profile: &'static str,
    /// A client window has a peer (10.0.0.9:8080).
    pub direction: Direction,
    pub route: &'static str,
    pub method: &'static str,
    pub end_unix_nanos: u64,
    pub length_nanos: u64,
    /// (bucket index at scale 6, requests); the span from lowest to highest is sent dense,
    /// so a wide span makes a big frame.
    pub buckets: Vec<(i32, u64)>,
    /// 5xx responses among the requests (the rest are 2xx).
    pub errors: u64,
    /// (path, status, duration in ns)
    pub exemplars: Vec<(&'static str, u32, u64)>,
}

impl Default for TestWindow {
    fn default() -> Self {
        Self {
            namespace: "shop",
            workload: "checkout",
            pod: "checkout-1",
            node: "node-a",
            process: "app",
            profile: "shop/latency",
            direction: Direction::Server,
            route: "/cart/{id}",
            method: "GET",
            end_unix_nanos: unix_nanos(),
            length_nanos: SECOND,
            buckets: vec![(1300, 9), (1307, 1)],
            errors: 1,
            exemplars: vec![("/cart/17", 503, 1_390_000)],
        }
    }
}

/// The lower bound of bucket `index` at scale 6, in ns.
pub fn bucket_lower(index: i32) -> f64 {
    2f64.powf(index as f64 / 64.0)
}

impl TestWindow {
    pub fn histogram(&self) -> ExponentialHistogram {
        ExponentialHistogram::from_sparse(
            6,
            &self.buckets.iter().copied().collect::<BTreeMap<_, _>>(),
        )
        .unwrap()
    }

    /// The fastest and slowest request: just inside the lowest and highest bucket.
    pub fn min_max_nanos(&self) -> (u64, u64) {
        let low = self.buckets.iter().map(|b| b.0).min().unwrap();
        let high = self.buckets.iter().map(|b| b.0).max().unwrap();
        (
            bucket_lower(low).ceil() as u64 + 1,
            bucket_lower(high + 1).floor() as u64,
        )
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.1).sum()
    }

    /// The window as an agent sends it, sequence 0 (the sender numbers it).
    pub fn window(&self) -> LatencyWindow {
        let histogram = self.histogram();
        let count = histogram.total();
        let (min, max) = self.min_max_nanos();
        let start = self.end_unix_nanos - self.length_nanos;
        LatencyWindow {
            sequence: 0,
            source: Some(Source {
                node_name: self.node.into(),
                cgroup_id: 42,
                cgroup_path: "/kubepods/pod-1/c1".into(),
                pid: 4242,
                process_name: self.process.into(),
                pod: (!self.namespace.is_empty()).then(|| PodIdentity {
                    namespace: self.namespace.into(),
                    name: self.pod.into(),
                    uid: format!("uid-{}", self.pod),
                    container: "app".into(),
                    workload_kind: if self.workload.is_empty() {
                        String::new()
                    } else {
                        "Deployment".into()
                    },
                    workload_name: self.workload.into(),
                }),
            }),
            direction: self.direction as i32,
            start_unix_nanos: start,
            end_unix_nanos: self.end_unix_nanos,
            stats: Some(LatencyStats {
                count,
                error_count: self.errors,
                sum_nanos: count * (min + max) / 2,
                min_nanos: min,
                max_nanos: max,
                quantiles: [0.5, 0.95, 0.99]
                    .into_iter()
                    .map(|quantile| Quantile {
                        quantile,
                        value_nanos: (histogram.quantile(quantile).unwrap() as u64).clamp(min, max),
                    })
                    .collect(),
            }),
            histogram: Some(histogram),
            status_class_counts: vec![0, 0, count - self.errors, 0, 0, self.errors],
            // The feed reads the window's totals, not its split by status.
            statuses: Vec::new(),
            profile: self.profile.into(),
            route: self.route.into(),
            peer: (self.direction == Direction::Client).then(|| Peer {
                address: "10.0.0.9".into(),
                port: 8080,
            }),
            exemplars: self
                .exemplars
                .iter()
                .enumerate()
                .map(|(n, (path, status, duration))| Exemplar {
                    start_unix_nanos: start + n as u64 * 1_000_000,
                    duration_nanos: *duration,
                    method: self.method.into(),
                    status_code: *status,
                    path: (*path).into(),
                    tid: 8,
                })
                .collect(),
            method: self.method.into(),
        }
    }

    /// The window numbered `sequence`, as the message that carries it.
    pub fn message(&self, sequence: u64) -> AgentMessage {
        AgentMessage {
            kind: Some(agent_message::Kind::Window(LatencyWindow {
                sequence,
                ..self.window()
            })),
        }
    }
}

/// What a page or terminal should show for `windows` merged (one chart point, or one
/// row): percentiles of the merged histogram clamped to the smallest and largest request,
/// in ms to the µs, written with three decimals; requests/s with three.
pub fn expected_point(windows: &[&TestWindow]) -> BTreeMap<&'static str, String> {
    let mut merged = windows[0].histogram();
    for window in &windows[1..] {
        merged.merge(&window.histogram()).unwrap();
    }
    let ms = |nanos: u64| (nanos as f64 / 1e3).round() / 1e3;
    let min = windows
        .iter()
        .map(|w| ms(w.min_max_nanos().0))
        .fold(f64::INFINITY, f64::min);
    let max = windows
        .iter()
        .map(|w| ms(w.min_max_nanos().1))
        .fold(0.0, f64::max);
    let count: u64 = windows.iter().map(|w| w.count()).sum();
    let errors: u64 = windows.iter().map(|w| w.errors).sum();
    let length = windows.iter().map(|w| w.length_nanos).max().unwrap() as f64 / 1e9;
    let mut point = BTreeMap::new();
    for (name, q) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)] {
        let value = ms(merged.quantile(q).unwrap().floor() as u64).clamp(min, max);
        point.insert(name, format!("{value:.3}"));
    }
    point.insert("rps", format!("{:.3}", count as f64 / length));
    point.insert("count", count.to_string());
    point.insert("errors", errors.to_string());
    point
}
