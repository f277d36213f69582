//! Helpers shared by the collector's integration tests: a test agent that streams windows
//! over gRPC and waits for their acks, and windows of a Deployment's pods.
// Each test crate uses its own subset.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod rotel;
pub mod rotel_log;

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trazor_collector::{BoundCollector, CollectorConfig, otlp::OtlpConfig, stats::CollectorStats};
use trazor_proto::v1::{
    AgentHello, AgentMessage, Exemplar, ExponentialHistogram, LatencyStats, LatencyWindow,
    PodIdentity, Quantile, Source, agent_message, collector_message,
    latency_ingest_client::LatencyIngestClient,
};

/// A collector serving in the background.
pub struct Running {
    /// `http://` address of its gRPC ingest.
    pub grpc: String,
    /// Its HTTP address: feed, dashboard, metrics.
    pub http: SocketAddr,
    pub stats: Arc<CollectorStats>,
}

/// Starts a collector that closes aggregates 300 ms after their window, exporting to
/// `otlp` when given.
pub async fn start_collector(otlp: Option<OtlpConfig>) -> Running {
    let collector = BoundCollector::bind(&CollectorConfig {
        late_grace: Duration::from_millis(300),
        otlp,
        ..Default::default()
    })
    .await
    .unwrap();
    let running = Running {
        grpc: format!("http://{}", collector.grpc_addr()),
        http: collector.http_addr(),
        stats: collector.stats(),
    };
    tokio::spawn(collector.serve());
    running
}

/// The end of a one-second window that closes shortly: a whole second at least one second
/// away, so the test's windows all arrive before it closes (300 ms after its end).
pub fn window_end() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (now / 1_000_000_000 + 2) * 1_000_000_000
}

/// A window of pod `pod` of Deployment shop/checkout, `GET /cart/{id}` served, with the
/// given histogram buckets (scale 6) and responses by status class.
pub fn pod_window(
    sequence: u64,
    pod: &str,
    end: u64,
    buckets: &[(i32, u64)],
    classes: &[u64],
) -> AgentMessage {
    let histogram =
        ExponentialHistogram::from_sparse(6, &buckets.iter().copied().collect::<BTreeMap<_, _>>())
            .unwrap();
    let count = histogram.total();
    AgentMessage {
        kind: Some(agent_message::Kind::Window(LatencyWindow {
            sequence,
            source: Some(Source {
                node_name: format!("node-of-{pod}"),
                pod: Some(PodIdentity {
                    namespace: "shop".into(),
                    name: pod.into(),
                    workload_kind: "Deployment".into(),
                    workload_name: "checkout".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            direction: trazor_proto::v1::Direction::Server as i32,
            route: "/cart/{id}".into(),
            method: "GET".into(),
            start_unix_nanos: end - 1_000_000_000,
            end_unix_nanos: end,
            stats: Some(LatencyStats {
                count,
                error_count: classes.get(5).copied().unwrap_or(0),
                sum_nanos: count * 1_000_000,
                min_nanos: 900_000,
                max_nanos: 1_200_000,
                quantiles: [0.5, 0.95, 0.99]
                    .into_iter()
                    .map(|quantile| Quantile {
                        quantile,
                        value_nanos: histogram.quantile(quantile).unwrap_or(0.0) as u64,
                    })
                    .collect(),
            }),
            histogram: Some(histogram),
            status_class_counts: classes.to_vec(),
            ..Default::default()
        })),
    }
}

/// A `pod_window` whose requests are split by status code as an agent sends them:
/// `statuses` are (code, its histogram buckets), and the window is their sum.
pub fn window_by_status(
    sequence: u64,
    pod: &str,
    end: u64,
    statuses: &[(u32, &[(i32, u64)])],
) -> AgentMessage {
    let all: Vec<(i32, u64)> = statuses
        .iter()
        .flat_map(|(_, buckets)| buckets.iter().copied())
        .collect();
    let mut classes = vec![0u64; 6];
    for (code, buckets) in statuses {
        classes[(code / 100) as usize] += buckets.iter().map(|(_, count)| count).sum::<u64>();
    }
    let mut message = pod_window(sequence, pod, end, &all, &classes);
    let Some(agent_message::Kind::Window(window)) = &mut message.kind else {
        panic!("not a window");
    };
    window.statuses = statuses
        .iter()
        .map(|&(status_code, buckets)| {
            let count: u64 = buckets.iter().map(|(_, count)| count).sum();
            trazor_proto::v1::StatusLatency {
                status_code,
                count,
                // As pod_window: 1 ms on average, 0.9 ms to 1.2 ms.
                sum_nanos: count * 1_000_000,
                min_nanos: 900_000,
                max_nanos: 1_200_000,
                histogram: Some(
                    ExponentialHistogram::from_sparse(6, &buckets.iter().copied().collect())
                        .unwrap(),
                ),
            }
        })
        .collect();
    message
}

/// Sends `windows` from agent `agent` and waits until each is acknowledged.
pub async fn send(grpc: &str, agent: &str, windows: Vec<AgentMessage>) {
    let mut client = LatencyIngestClient::connect(grpc.to_owned()).await.unwrap();
    let (sender, receiver) = mpsc::channel(16);
    sender
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(AgentHello {
                node_name: format!("node-of-{agent}"),
                agent_id: agent.into(),
                boot_id: "boot-1".into(),
                version: "test".into(),
                capabilities: vec![],
            })),
        })
        .await
        .unwrap();
    let mut acks = client
        .stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    for window in windows {
        let Some(agent_message::Kind::Window(LatencyWindow { sequence, .. })) = window.kind else {
            panic!("not a window");
        };
        sender.send(window).await.unwrap();
        // Acks are cumulative, and the first may answer the hello.
        loop {
            let ack = acks.message().await.unwrap().unwrap();
            if let Some(collector_message::Kind::Ack(ack)) = ack.kind
                && ack.acked_through >= sequence
            {
                break;
            }
        }
    }
}

/// A collector exporting to `otlp`: its gRPC ingest address and counters.
pub async fn collector(otlp: OtlpConfig) -> (String, Arc<CollectorStats>) {
    let running = start_collector(Some(otlp)).await;
    (running.grpc, running.stats)
}

/// The collector's metrics once they contain `line` (within 10 s).
pub async fn metrics_once(stats: &CollectorStats, line: &str) -> String {
    metrics_with_all(stats, &[line]).await
}

/// The collector's metrics once they contain every line of `lines` (within 10 s).
pub async fn metrics_with_all(stats: &CollectorStats, lines: &[&str]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = stats.render();
        if lines
            .iter()
            .all(|line| metrics.lines().any(|metric| metric == *line))
        {
            return metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never {lines:?}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `message` (a window from [`pod_window`]) with `count` of its requests kept as
/// exemplars: `GET /cart/{n}`, 200, 2 ms, starting half a second before the window's end.
pub fn with_exemplars(mut message: AgentMessage, count: u32) -> AgentMessage {
    let Some(agent_message::Kind::Window(window)) = &mut message.kind else {
        panic!("with_exemplars needs a window message");
    };
    let end = window.end_unix_nanos;
    window.exemplars = (0..count)
        .map(|n| Exemplar {
            start_unix_nanos: end - 500_000_000 + u64::from(n),
            duration_nanos: 2_000_000,
            method: "GET".into(),
            status_code: 200,
            path: format!("/cart/{n}"),
            tid: n,
        })
        .collect();
    message
}

/// Asserts that the collector's metrics text has `line` (a metric and its value).
pub fn assert_line(metrics: &str, line: &str) {
    assert!(
        metrics.lines().any(|metric| metric == line),
        "no {line:?} in:\n{metrics}"
    );
}
