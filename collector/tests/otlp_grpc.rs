//! OTLP/gRPC export, and gzip over gRPC and HTTP, against Rotel, a third-party
//! OpenTelemetry collector that scripts/setup.sh installs (no Rotel: these tests fail and
//! say so). The retry rules for gRPC status codes, the timeout, and the metadata a request
//! carries are checked against gRPC servers here that answer as each test needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    assert_line, collector, metrics_once, pod_window, rotel::Rotel, send, window_by_status,
    window_end,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    metrics_service_server::{MetricsService, MetricsServiceServer},
};
use trazor_collector::otlp::{
    OtlpCompression, OtlpConfig, OtlpProtocol, RESPONSES_METRIC, SERVER_DURATION_METRIC,
};
use trazor_proto::v1::{AgentMessage, Exemplar, agent_message};

mod common;

/// A window of Deployment shop/checkout's pod `pod` holding `count` requests (in one
/// bucket), with two exemplars: a 503 and a slow 200.
fn checkout_window(sequence: u64, pod: &str, end: u64, count: u64) -> AgentMessage {
    let mut message = pod_window(sequence, pod, end, &[(1_400, count)], &[0, 0, count]);
    let Some(agent_message::Kind::Window(window)) = &mut message.kind else {
        panic!("pod_window made no window");
    };
    let start = end - 500_000_000;
    window.exemplars = vec![
        Exemplar {
            start_unix_nanos: start,
            duration_nanos: 2_000_000,
            method: "GET".into(),
            status_code: 503,
            path: "/cart/42".into(),
            tid: 1,
        },
        Exemplar {
            start_unix_nanos: start + 1_000,
            duration_nanos: 900_000_000,
            method: "GET".into(),
            status_code: 200,
            path: "/cart/7".into(),
            tid: 2,
        },
    ];
    message
}

/// Checks that Rotel printed Deployment shop/checkout's metrics, with a histogram point
/// of `count` requests, and its two spans.
async fn assert_checkout_arrived(rotel: &Rotel, count: u64) {
    let metrics = rotel
        .wait_for(
            &format!("checkout metrics with a count of {count}"),
            |block| {
                block.signal == "metrics"
                    && block.attribute("service.name") == Some("checkout")
                    && block.counts.contains(&count)
            },
        )
        .await;
    assert_eq!(metrics.attribute("service.namespace"), Some("shop"));
    assert_eq!(metrics.attribute("k8s.deployment.name"), Some("checkout"));
    assert!(
        metrics
            .names
            .iter()
            .any(|name| name == SERVER_DURATION_METRIC)
            && metrics.names.iter().any(|name| name == RESPONSES_METRIC),
        "{metrics:?}"
    );
    // The conventions' unit, seconds, and what made the data.
    assert_eq!(metrics.attribute("telemetry.sdk.name"), Some("trazor"));
    assert_eq!(metrics.attribute("telemetry.sdk.language"), Some("rust"));
    assert!(
        metrics
            .units
            .contains(&(SERVER_DURATION_METRIC.to_owned(), "s".to_owned())),
        "{metrics:?}"
    );
    let spans = rotel
        .wait_for("checkout spans", |block| {
            block.signal == "spans" && block.attribute("service.name") == Some("checkout")
        })
        .await;
    assert_eq!(
        spans.names,
        ["GET /cart/{id}", "GET /cart/{id}"],
        "{spans:?}"
    );
    assert_eq!(spans.attribute("k8s.deployment.name"), Some("checkout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_spans_reach_rotel_over_grpc() {
    let rotel = Rotel::start();
    let (grpc, stats) = collector(OtlpConfig {
        protocol: OtlpProtocol::Grpc,
        ..OtlpConfig::new(format!("http://127.0.0.1:{}", rotel.grpc_port))
    })
    .await;
    send(
        &grpc,
        "agent-a",
        vec![checkout_window(1, "checkout-1", window_end(), 5)],
    )
    .await;
    assert_checkout_arrived(&rotel, 5).await;
    // One histogram point and one status-class point; two spans; nothing failed.
    let metrics = metrics_once(&stats, "trazor_collector_otlp_points_exported_total 2").await;
    assert_line(&metrics, "trazor_collector_otlp_failures_total 0");
    metrics_once(&stats, "trazor_collector_otlp_spans_exported_total 2").await;
}

/// The duration points by status code, as a second receiver decodes them from gRPC:
/// `http.response.status_code` on each, `error.type` on the 5xx one only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_points_carry_their_status_code_over_grpc() {
    let rotel = Rotel::start();
    let (grpc, _stats) = collector(OtlpConfig {
        protocol: OtlpProtocol::Grpc,
        ..OtlpConfig::new(format!("http://127.0.0.1:{}", rotel.grpc_port))
    })
    .await;
    send(
        &grpc,
        "agent-a",
        vec![window_by_status(
            1,
            "checkout-1",
            window_end(),
            &[(200, &[(1_400, 4)]), (503, &[(1_600, 1)])],
        )],
    )
    .await;
    let metrics = rotel
        .wait_for("checkout durations by status", |block| {
            block.signal == "metrics" && block.attribute("service.name") == Some("checkout")
        })
        .await;
    let by_status: Vec<(u64, Option<&str>, Option<&str>)> = metrics
        .counts
        .iter()
        .zip(&metrics.point_attributes)
        .map(|(&count, attributes)| {
            let value = |key: &str| {
                attributes
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
            };
            (
                count,
                value("http.response.status_code"),
                value("error.type"),
            )
        })
        .collect();
    assert_eq!(
        by_status,
        vec![(4, Some("200"), None), (1, Some("503"), Some("503"))],
        "{metrics:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_reaches_rotel_over_grpc_and_over_http() {
    let rotel = Rotel::start();
    let (over_grpc, grpc_stats) = collector(OtlpConfig {
        protocol: OtlpProtocol::Grpc,
        compression: OtlpCompression::Gzip,
        ..OtlpConfig::new(format!("http://127.0.0.1:{}", rotel.grpc_port))
    })
    .await;
    let (over_http, http_stats) = collector(OtlpConfig {
        compression: OtlpCompression::Gzip,
        ..OtlpConfig::new(format!("http://127.0.0.1:{}", rotel.http_port))
    })
    .await;
    // Told apart by their counts.
    send(
        &over_grpc,
        "agent-a",
        vec![checkout_window(1, "checkout-1", window_end(), 3)],
    )
    .await;
    assert_checkout_arrived(&rotel, 3).await;
    send(
        &over_http,
        "agent-b",
        vec![checkout_window(1, "checkout-2", window_end(), 7)],
    )
    .await;
    assert_checkout_arrived(&rotel, 7).await;
    for stats in [grpc_stats, http_stats] {
        let metrics = metrics_once(&stats, "trazor_collector_otlp_points_exported_total 2").await;
        assert_line(&metrics, "trazor_collector_otlp_failures_total 0");
        metrics_once(&stats, "trazor_collector_otlp_spans_exported_total 2").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_signal_can_have_its_own_protocol() {
    // Metrics over HTTP to Rotel's HTTP port (the generic endpoint, /v1/metrics appended),
    // spans over gRPC to its gRPC port (as a Tempo on :4317 beside a Mimir over HTTP). A
    // signal sent with the other protocol would reach a port that does not speak it.
    let rotel = Rotel::start();
    let (grpc, stats) = collector(OtlpConfig {
        traces_endpoint: Some(format!("http://127.0.0.1:{}", rotel.grpc_port)),
        traces_protocol: Some(OtlpProtocol::Grpc),
        ..OtlpConfig::new(format!("http://127.0.0.1:{}", rotel.http_port))
    })
    .await;
    send(
        &grpc,
        "agent-a",
        vec![checkout_window(1, "checkout-1", window_end(), 4)],
    )
    .await;
    assert_checkout_arrived(&rotel, 4).await;
    let metrics = metrics_once(&stats, "trazor_collector_otlp_points_exported_total 2").await;
    assert_line(&metrics, "trazor_collector_otlp_failures_total 0");
    metrics_once(&stats, "trazor_collector_otlp_spans_exported_total 2").await;
}

/// Each request a `RecordingReceiver` received: when, and its metadata.
type Received = Arc<std::sync::Mutex<Vec<(Instant, tonic::metadata::MetadataMap)>>>;

/// A metrics service that accepts every export after `delay`, keeping each request's
/// arrival and metadata.
struct RecordingReceiver {
    delay: Duration,
    received: Received,
}

#[tonic::async_trait]
impl MetricsService for RecordingReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.received
            .lock()
            .unwrap()
            .push((Instant::now(), request.metadata().clone()));
        tokio::time::sleep(self.delay).await;
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Serves `service` on a free port of 127.0.0.1; its address.
async fn serve<S: MetricsService>(service: MetricsServiceServer<S>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_carry_the_headers_as_metadata_and_say_they_are_gzipped() {
    let received = Received::default();
    // A server that does not accept gzip would answer UNIMPLEMENTED.
    let address = serve(
        MetricsServiceServer::new(RecordingReceiver {
            delay: Duration::ZERO,
            received: received.clone(),
        })
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
    )
    .await;
    let (grpc, stats) = collector(OtlpConfig {
        protocol: OtlpProtocol::Grpc,
        compression: OtlpCompression::Gzip,
        headers: vec![("X-Scope-OrgID".into(), "tenant-1".into())],
        ..OtlpConfig::new(format!("http://{address}"))
    })
    .await;
    send(
        &grpc,
        "agent-a",
        vec![pod_window(
            1,
            "checkout-1",
            window_end(),
            &[(1_400, 3)],
            &[],
        )],
    )
    .await;
    metrics_once(&stats, "trazor_collector_otlp_points_exported_total 1").await;
    let received = received.lock().unwrap();
    let [(_, request)] = received.as_slice() else {
        panic!("{} requests, not one", received.len());
    };
    assert_eq!(request.get("x-scope-orgid").unwrap(), "tenant-1");
    assert_eq!(request.get("grpc-encoding").unwrap(), "gzip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_receiver_slower_than_the_timeout_is_retried_then_dropped() {
    let received = Received::default();
    let address = serve(MetricsServiceServer::new(RecordingReceiver {
        delay: Duration::from_secs(5),
        received: received.clone(),
    }))
    .await;
    let (grpc, stats) = collector(OtlpConfig {
        protocol: OtlpProtocol::Grpc,
        timeout: Duration::from_millis(200),
        max_attempts: 2,
        initial_backoff: Duration::from_millis(50),
        ..OtlpConfig::new(format!("http://{address}"))
    })
    .await;
    send(
        &grpc,
        "agent-a",
        vec![pod_window(
            1,
            "checkout-1",
            window_end(),
            &[(1_400, 3)],
            &[],
        )],
    )
    .await;
    let metrics = metrics_once(&stats, "trazor_collector_otlp_points_dropped_total 1").await;
    assert_line(&metrics, "trazor_collector_otlp_failures_total 2");
    let received = received.lock().unwrap();
    let [(first, _), (second, _)] = received.as_slice() else {
        panic!("{} requests, not two", received.len());
    };
    // The retry came after the 200 ms timeout and 50 ms backoff, not after the
    // receiver's 5 s.
    let gap = second.duration_since(*first);
    assert!(
        gap < Duration::from_secs(2),
        "the retry came {gap:?} after the first try"
    );
}

/// A metrics service that answers every export with `code`, counting the calls.
struct FailingReceiver {
    code: tonic::Code,
    calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl MetricsService for FailingReceiver {
    async fn export(
        &self,
        _request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Err(tonic::Status::new(self.code, "refused by the test"))
    }
}

/// Exports one window to a gRPC receiver answering `code`; the calls it received, and the
/// collector's metrics once the batch is dropped.
async fn export_to_failing_receiver(code: tonic::Code) -> (u64, String) {
    let calls = Arc::new(AtomicU64::new(0));
    let address = serve(MetricsServiceServer::new(FailingReceiver {
        code,
        calls: calls.clone(),
    }))
    .await;
    let (grpc, stats) = collector(OtlpConfig {
        protocol: OtlpProtocol::Grpc,
        max_attempts: 3,
        initial_backoff: Duration::from_millis(50),
        ..OtlpConfig::new(format!("http://{address}"))
    })
    .await;
    send(
        &grpc,
        "agent-a",
        vec![pod_window(
            1,
            "checkout-1",
            window_end(),
            &[(1_400, 3)],
            &[],
        )],
    )
    .await;
    let metrics = metrics_once(&stats, "trazor_collector_otlp_points_dropped_total 1").await;
    // Room for a retry that should not happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (calls.load(Ordering::Relaxed), metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_receiver_that_refuses_the_request_is_not_retried() {
    let (calls, metrics) = export_to_failing_receiver(tonic::Code::InvalidArgument).await;
    assert_eq!(calls, 1, "INVALID_ARGUMENT was retried");
    assert_line(&metrics, "trazor_collector_otlp_failures_total 1");
    assert_line(&metrics, "trazor_collector_otlp_points_exported_total 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_grpc_receiver_is_retried_then_its_points_are_dropped() {
    let (calls, metrics) = export_to_failing_receiver(tonic::Code::Unavailable).await;
    assert_eq!(calls, 3, "UNAVAILABLE was not tried three times");
    assert_line(&metrics, "trazor_collector_otlp_failures_total 3");
    assert_line(&metrics, "trazor_collector_otlp_points_exported_total 0");
}
