//! The JSON form of a window on the WebSocket feed: the proto's content, with units in the
//! names (`_ms`, `_unix_ms`) and percentiles keyed as people write them (`p99`).

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use trazor_proto::v1::{Direction, LatencyWindow};

#[derive(Debug, Serialize)]
pub struct WindowView {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub agent_id: String,
    pub boot_id: String,
    pub sequence: u64,
    pub node: String,
    pub pid: u32,
    pub process: String,
    pub cgroup_id: u64,
    pub cgroup_path: String,
    pub pod: Option<PodView>,
    pub direction: &'static str,
    pub start: String,
    pub end: String,
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    pub count: u64,
    pub errors: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    /// e.g. {"p50": 20.1, "p99": 20.9}, in milliseconds, in configured order.
    pub percentiles: serde_json::Map<String, serde_json::Value>,
    /// Requests by status class, e.g. {"2xx": 98, "5xx": 2}.
    pub status_classes: serde_json::Map<String, serde_json::Value>,
    pub histogram: HistogramView,
    /// Arrived after its aggregate closed (see `merge`): counted once, not merged.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
    /// Route template, "other" past the series cap, "" when the path was not captured.
    pub route: String,
    /// HTTP method ("OTHER" when not recognised).
    pub method: String,
    /// Remote end of client-side windows.
    pub peer: Option<PeerView>,
    /// TraceProfile (namespace/name) that selected the source; "" in standalone mode.
    pub profile: String,
    pub exemplars: Vec<ExemplarView>,
}

#[derive(Debug, Serialize)]
pub struct PeerView {
    pub address: String,
    pub port: u32,
}

/// One request kept as an example (slow, failed or sampled).
#[derive(Debug, Serialize)]
pub struct ExemplarView {
    pub start: String,
    pub duration_ms: f64,
    pub method: String,
    pub status: u32,
    pub path: String,
    pub tid: u32,
}

#[derive(Debug, Serialize)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container: String,
    pub workload_kind: String,
    pub workload_name: String,
}

/// The latency histogram in nanoseconds, OTLP exponential layout.
#[derive(Debug, Serialize)]
pub struct HistogramView {
    pub scale: i32,
    pub offset: i32,
    pub counts: Vec<u64>,
}

fn millis(nanos: u64) -> f64 {
    // Three decimals: microsecond resolution is plenty for a feed.
    (nanos as f64 / 1e3).round() / 1e3
}

fn rfc3339(unix_nanos: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(unix_nanos)).to_string()
}

/// The feed's name for a `Direction`.
pub fn direction_name(direction: i32) -> &'static str {
    match Direction::try_from(direction) {
        Ok(Direction::Client) => "client",
        Ok(Direction::Server) => "server",
        _ => "unspecified",
    }
}

/// `0.5` → `p50`, `0.999` → `p99.9`.
pub fn percentile_label(quantile: f64) -> String {
    let percent = (quantile * 100_000.0).round() / 1000.0;
    format!("p{percent}")
}

impl WindowView {
    pub fn new(agent_id: &str, boot_id: &str, window: &LatencyWindow) -> Self {
        let source = window.source.clone().unwrap_or_default();
        let stats = window.stats.clone().unwrap_or_default();
        let histogram = window.histogram.clone().unwrap_or_default();
        let percentiles = stats
            .quantiles
            .iter()
            .map(|q| (percentile_label(q.quantile), millis(q.value_nanos).into()))
            .collect();
        let status_classes = window
            .status_class_counts
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(class, count)| {
                let label = if class == 0 {
                    "unknown".to_owned()
                } else {
                    format!("{class}xx")
                };
                (label, (*count).into())
            })
            .collect();
        Self {
            kind: "window",
            agent_id: agent_id.to_owned(),
            boot_id: boot_id.to_owned(),
            sequence: window.sequence,
            node: source.node_name,
            pid: source.pid,
            process: source.process_name,
            cgroup_id: source.cgroup_id,
            cgroup_path: source.cgroup_path,
            pod: source.pod.map(|pod| PodView {
                namespace: pod.namespace,
                name: pod.name,
                uid: pod.uid,
                container: pod.container,
                workload_kind: pod.workload_kind,
                workload_name: pod.workload_name,
            }),
            direction: direction_name(window.direction),
            late: false,
            start: rfc3339(window.start_unix_nanos),
            end: rfc3339(window.end_unix_nanos),
            start_unix_ms: window.start_unix_nanos / 1_000_000,
            end_unix_ms: window.end_unix_nanos / 1_000_000,
            count: stats.count,
            errors: stats.error_count,
            min_ms: millis(stats.min_nanos),
            mean_ms: stats.sum_nanos.checked_div(stats.count).map_or(0.0, millis),
            max_ms: millis(stats.max_nanos),
            percentiles,
            status_classes,
            histogram: HistogramView {
                scale: histogram.scale,
                offset: histogram.offset,
                counts: histogram.bucket_counts,
            },
            route: window.route.clone(),
            method: window.method.clone(),
            peer: window.peer.as_ref().map(|peer| PeerView {
                address: peer.address.clone(),
                port: peer.port,
            }),
            profile: window.profile.clone(),
            exemplars: window
                .exemplars
                .iter()
                .map(|exemplar| ExemplarView {
                    start: rfc3339(exemplar.start_unix_nanos),
                    duration_ms: millis(exemplar.duration_nanos),
                    method: exemplar.method.clone(),
                    status: exemplar.status_code,
                    path: exemplar.path.clone(),
                    tid: exemplar.tid,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use trazor_proto::v1::{LatencyStats, Quantile, Source};

    use super::*;

    #[test]
    fn percentile_labels_read_as_people_write_them() {
        assert_eq!(percentile_label(0.5), "p50");
        assert_eq!(percentile_label(0.99), "p99");
        assert_eq!(percentile_label(0.999), "p99.9");
    }

    #[test]
    fn window_json_carries_units_in_names() {
        let window = LatencyWindow {
            sequence: 3,
            source: Some(Source {
                node_name: "n1".into(),
                pid: 42,
                process_name: "nginx".into(),
                ..Default::default()
            }),
            direction: Direction::Server as i32,
            start_unix_nanos: 1_700_000_000_000_000_000,
            end_unix_nanos: 1_700_000_010_000_000_000,
            stats: Some(LatencyStats {
                count: 4,
                error_count: 1,
                sum_nanos: 80_000_000,
                min_nanos: 10_000_000,
                max_nanos: 30_000_000,
                quantiles: vec![Quantile {
                    quantile: 0.5,
                    value_nanos: 20_123_456,
                }],
            }),
            status_class_counts: vec![0, 0, 3, 0, 0, 1],
            ..Default::default()
        };
        let json = serde_json::to_value(WindowView::new("a", "b", &window)).unwrap();
        assert_eq!(json["type"], "window");
        assert_eq!(json["process"], "nginx");
        assert_eq!(json["mean_ms"], 20.0);
        assert_eq!(json["percentiles"]["p50"], 20.123);
        assert_eq!(json["status_classes"]["5xx"], 1);
        assert_eq!(json["start"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["end_unix_ms"], 1_700_000_010_000u64);
    }
}
