//! OTLP export: every closed aggregate (and every late window, alone) as OTLP metrics, sent
//! over OTLP/HTTP with protobuf (`POST {endpoint}/v1/metrics`) to an OpenTelemetry
//! Collector, or to any backend that receives OTLP (Prometheus with its OTLP receiver,
//! Mimir, ...).
//!
//! Each aggregate is one data point per metric, with delta temporality and its window as
//! the interval (`start_time_unix_nano` to `time_unix_nano`):
//!
//! - `trazor.http.request.duration` (unit `ns`), an exponential histogram: the aggregate's
//!   histogram itself, same scale and buckets (Trazor's histograms are OTLP's layout, so
//!   nothing is re-bucketed and no error is added), with count, sum, min and max.
//! - `trazor.http.responses`, a monotonic sum: requests by `http.response.status_class`
//!   (`1xx` … `5xx`, `unknown`).
//!
//! Attributes: `k8s.namespace.name` and `k8s.<kind>.name` (deployment, statefulset, …) with
//! `trazor.workload.kind`/`trazor.workload.name` for a workload, `k8s.pod.name` for a pod
//! without one, `process.executable.name` in standalone mode; `http.route`,
//! `http.request.method`, `trazor.direction` (server or client) and `trazor.profile`.
//!
//! Exemplars (slow, failed or sampled requests the agents report with their windows) go to
//! `{endpoint}/v1/traces` as spans ([`spans_of`]).
//!
//! Delivery: closed aggregates (one batch per publishing tick) and each window's exemplars
//! queue as batches (bounded; a full queue drops the new batch and counts its data points
//! or spans); one batch is one request. A failed request (connection error, timeout, 429,
//! 502, 503, 504) is retried with exponential backoff, honouring `Retry-After`, then
//! dropped and counted; any other error status is dropped at once and counted. Points and
//! spans the receiver rejects (a partial success) are counted too.

use std::{
    str::FromStr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse},
        trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, ExponentialHistogram, ExponentialHistogramDataPoint, Metric,
        NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, exponential_histogram_data_point,
        metric, number_data_point,
    },
    resource::v1::Resource,
    trace::v1::{
        ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode as SpanStatus,
    },
};
use prost::Message as _;
use tokio::sync::mpsc;
use trazor_proto::v1::{Direction, LatencyWindow};

use crate::{
    merge::{Aggregate, Subject},
    stats::CollectorStats,
    view::direction_name,
};

/// Name of the latency histogram.
pub const DURATION_METRIC: &str = "trazor.http.request.duration";
/// Name of the requests-by-status-class sum.
pub const RESPONSES_METRIC: &str = "trazor.http.responses";

/// Where and how to export.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// Base URL (`http://host:4318`); requests go to `{endpoint}/v1/metrics` and
    /// `{endpoint}/v1/traces`.
    pub endpoint: String,
    /// Extra request headers (an API key, a tenant id).
    pub headers: Vec<(String, String)>,
    /// Batches waiting to be sent at most; more are dropped and counted.
    pub queue_batches: usize,
    /// Tries per batch, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry; doubles after each, up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest one request may take.
    pub timeout: Duration,
}

impl OtlpConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            headers: Vec::new(),
            queue_batches: 1_024,
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }

    /// The URL of the signal at `path` (`/v1/metrics`, `/v1/traces`), or why the endpoint
    /// cannot be used.
    fn uri(&self, path: &str) -> Result<Uri, String> {
        if self.endpoint.starts_with("https://") {
            return Err(format!(
                "OTLP endpoint {:?}: https is not supported yet; send to an OpenTelemetry \
                 Collector over http (in the cluster, or beside the collector) and let it \
                 forward over TLS",
                self.endpoint
            ));
        }
        if !self.endpoint.starts_with("http://") {
            return Err(format!(
                "OTLP endpoint {:?} must start with http:// (e.g. http://otel-collector:4318)",
                self.endpoint
            ));
        }
        let endpoint = self.endpoint.trim_end_matches('/');
        let uri = Uri::from_str(&format!("{endpoint}{path}"))
            .map_err(|error| format!("OTLP endpoint {:?} is not a URL: {error}", self.endpoint))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("OTLP endpoint {:?} has no host", self.endpoint));
        }
        Ok(uri)
    }

    /// The configured headers, checked.
    fn header_map(&self) -> Result<HeaderMap, String> {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let name = HeaderName::from_str(name)
                .map_err(|error| format!("OTLP header name {name:?}: {error}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|error| format!("OTLP header {name} has a bad value: {error}"))?;
            headers.insert(name, value);
        }
        Ok(headers)
    }
}

/// Parses `KEY=VALUE` (a `--otlp-header`), and `k1=v1,k2=v2` lists (as in
/// `OTEL_EXPORTER_OTLP_HEADERS`).
pub fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("OTLP header {pair:?} is not KEY=VALUE"))?;
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// The sending half: hands batches to the task that exports them.
#[derive(Clone, Debug)]
pub struct OtlpExporter {
    batches: mpsc::Sender<Batch>,
    stats: Arc<CollectorStats>,
}

/// What a batch carries: metrics (aggregates) or spans (exemplars).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    Metrics,
    Spans,
}

impl Signal {
    fn items(self) -> &'static str {
        match self {
            Self::Metrics => "data points",
            Self::Spans => "spans",
        }
    }
}

/// One request's worth, encoded.
#[derive(Debug)]
struct Batch {
    signal: Signal,
    body: Bytes,
    /// Data points or spans in it.
    items: u64,
}

impl OtlpExporter {
    /// Checks `config` and starts the export task (on the current Tokio runtime).
    pub fn start(config: OtlpConfig, stats: Arc<CollectorStats>) -> Result<Self, String> {
        let metrics_uri = config.uri("/v1/metrics")?;
        let traces_uri = config.uri("/v1/traces")?;
        let headers = config.header_map()?;
        let (batches, receiver) = mpsc::channel(config.queue_batches.max(1));
        let sender = Sender {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            metrics_uri,
            traces_uri,
            headers,
            config,
            stats: stats.clone(),
        };
        tokio::spawn(sender.run(receiver));
        Ok(Self { batches, stats })
    }

    /// Queues `aggregates` for export as metrics.
    pub fn export(&self, aggregates: Vec<Aggregate>) {
        if aggregates.is_empty() {
            return;
        }
        self.queue(Batch {
            signal: Signal::Metrics,
            items: points_of(&aggregates),
            body: Bytes::from(request_of(&aggregates).encode_to_vec()),
        });
    }

    /// Queues the exemplars of `window` (its slow, failed or sampled requests) for export
    /// as spans.
    pub fn export_exemplars(&self, window: &LatencyWindow) {
        if window.exemplars.is_empty() {
            return;
        }
        self.queue(Batch {
            signal: Signal::Spans,
            items: window.exemplars.len() as u64,
            body: Bytes::from(spans_of(window).encode_to_vec()),
        });
    }

    /// Queues `batch`, or counts its items as dropped when the queue is full (the receiver
    /// has been failing for a long time).
    fn queue(&self, batch: Batch) {
        let (signal, items) = (batch.signal, batch.items);
        match self.batches.try_send(batch) {
            Ok(()) => {
                self.stats.otlp_queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.stats.otlp_dropped(signal, items);
                tracing::warn!(
                    items,
                    "OTLP export queue is {}: {} dropped",
                    match error {
                        mpsc::error::TrySendError::Full(_) => "full",
                        mpsc::error::TrySendError::Closed(_) => "closed",
                    },
                    signal.items()
                );
            }
        }
    }
}

impl CollectorStats {
    fn otlp_dropped(&self, signal: Signal, items: u64) {
        match signal {
            Signal::Metrics => &self.otlp_points_dropped,
            Signal::Spans => &self.otlp_spans_dropped,
        }
        .fetch_add(items, Ordering::Relaxed);
    }

    fn otlp_delivered(&self, signal: Signal, accepted: u64, rejected: u64) {
        let (exported, refused) = match signal {
            Signal::Metrics => (&self.otlp_points_exported, &self.otlp_points_rejected),
            Signal::Spans => (&self.otlp_spans_exported, &self.otlp_spans_rejected),
        };
        exported.fetch_add(accepted, Ordering::Relaxed);
        refused.fetch_add(rejected, Ordering::Relaxed);
    }
}

/// Data points a batch makes: one histogram point per aggregate, one sum point per
/// status class seen.
fn points_of(aggregates: &[Aggregate]) -> u64 {
    aggregates
        .iter()
        .map(|aggregate| {
            1 + aggregate
                .status_class_counts
                .iter()
                .filter(|count| **count > 0)
                .count() as u64
        })
        .sum()
}

struct Sender {
    client: Client<HttpConnector, Full<Bytes>>,
    metrics_uri: Uri,
    traces_uri: Uri,
    headers: HeaderMap,
    config: OtlpConfig,
    stats: Arc<CollectorStats>,
}

/// How one attempt ended.
enum Attempt {
    Sent {
        rejected: u64,
        message: String,
    },
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Fail {
        reason: String,
    },
}

impl Sender {
    async fn run(self, mut batches: mpsc::Receiver<Batch>) {
        while let Some(batch) = batches.recv().await {
            self.stats.otlp_queued.fetch_sub(1, Ordering::Relaxed);
            self.deliver(batch).await;
        }
    }

    /// Sends one batch, retrying what can be retried; counts how it ended.
    async fn deliver(&self, batch: Batch) {
        let uri = match batch.signal {
            Signal::Metrics => &self.metrics_uri,
            Signal::Spans => &self.traces_uri,
        };
        let mut backoff = self.config.initial_backoff;
        for attempt in 1..=self.config.max_attempts.max(1) {
            let post = self.post(uri, batch.signal, batch.body.clone());
            let outcome = match tokio::time::timeout(self.config.timeout, post).await {
                Ok(outcome) => outcome,
                Err(_) => Attempt::Retry {
                    reason: format!(
                        "no answer within {}",
                        humantime::format_duration(self.config.timeout)
                    ),
                    after: None,
                },
            };
            match outcome {
                Attempt::Sent { rejected, message } => {
                    let rejected = rejected.min(batch.items);
                    self.stats
                        .otlp_delivered(batch.signal, batch.items - rejected, rejected);
                    if rejected > 0 {
                        tracing::warn!(
                            rejected, %message,
                            "the OTLP receiver rejected {}", batch.signal.items()
                        );
                    }
                    return;
                }
                Attempt::Fail { reason } => {
                    self.stats.otlp_failures.fetch_add(1, Ordering::Relaxed);
                    self.drop_batch(uri, &batch, &reason);
                    return;
                }
                Attempt::Retry { reason, after } => {
                    self.stats.otlp_failures.fetch_add(1, Ordering::Relaxed);
                    if attempt == self.config.max_attempts.max(1) {
                        self.drop_batch(
                            uri,
                            &batch,
                            &format!("{reason} (gave up after {attempt} attempts)"),
                        );
                        return;
                    }
                    let wait = after.unwrap_or(backoff).min(self.config.max_backoff);
                    tracing::warn!(
                        %uri, attempt, %reason,
                        "OTLP export failed; retrying in {}", humantime::format_duration(wait)
                    );
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    fn drop_batch(&self, uri: &Uri, batch: &Batch, reason: &str) {
        self.stats.otlp_dropped(batch.signal, batch.items);
        tracing::error!(
            %uri, items = batch.items, %reason,
            "OTLP export failed: {} dropped", batch.signal.items()
        );
    }

    async fn post(&self, uri: &Uri, signal: Signal, body: Bytes) -> Attempt {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("trazor-collector/", env!("CARGO_PKG_VERSION"))),
        );
        headers.extend(self.headers.clone());
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) => {
                return Attempt::Retry {
                    reason: format!("{error} ({})", error_chain(&error)),
                    after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(error) => {
                return Attempt::Retry {
                    reason: format!("reading the answer: {error}"),
                    after: None,
                };
            }
        };
        if status.is_success() {
            // An empty or undecodable answer is a full success.
            let (rejected, message) = match signal {
                Signal::Metrics => ExportMetricsServiceResponse::decode(body)
                    .ok()
                    .and_then(|answer| answer.partial_success)
                    .map(|partial| (partial.rejected_data_points, partial.error_message)),
                Signal::Spans => ExportTraceServiceResponse::decode(body)
                    .ok()
                    .and_then(|answer| answer.partial_success)
                    .map(|partial| (partial.rejected_spans, partial.error_message)),
            }
            .unwrap_or_default();
            return Attempt::Sent {
                rejected: u64::try_from(rejected).unwrap_or(0),
                message,
            };
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        let reason = format!("{status}: {text}");
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        ) {
            Attempt::Retry {
                reason,
                after: retry_after,
            }
        } else {
            Attempt::Fail { reason }
        }
    }
}

/// The causes behind a client error (the top one alone says "client error (Connect)").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    causes.join(": ")
}

/// One OTLP request for `aggregates`.
pub fn request_of(aggregates: &[Aggregate]) -> ExportMetricsServiceRequest {
    let mut durations = Vec::with_capacity(aggregates.len());
    let mut responses = Vec::new();
    for aggregate in aggregates {
        let attributes = attributes_of(aggregate);
        let histogram = &aggregate.histogram;
        // OTLP wants count = the buckets' total; a window whose histogram could not be
        // merged (another scale) is in the count but not the buckets, so the point says
        // what its buckets hold.
        let bucket_total = histogram.total();
        durations.push(ExponentialHistogramDataPoint {
            attributes: attributes.clone(),
            start_time_unix_nano: aggregate.start_unix_nanos,
            time_unix_nano: aggregate.end_unix_nanos,
            count: if aggregate.unmergeable == 0 {
                aggregate.count
            } else {
                bucket_total
            },
            sum: Some(aggregate.sum_nanos as f64),
            scale: histogram.scale,
            zero_count: 0,
            positive: Some(exponential_histogram_data_point::Buckets {
                offset: histogram.offset,
                bucket_counts: histogram.bucket_counts.clone(),
            }),
            negative: None,
            flags: 0,
            exemplars: Vec::new(),
            min: (aggregate.count > 0).then_some(aggregate.min_nanos as f64),
            max: (aggregate.count > 0).then_some(aggregate.max_nanos as f64),
            zero_threshold: 0.0,
        });
        for (class, &count) in aggregate.status_class_counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let mut attributes = attributes.clone();
            attributes.push(string_attribute(
                "http.response.status_class",
                match class {
                    1..=5 => format!("{class}xx"),
                    _ => "unknown".to_owned(),
                },
            ));
            responses.push(NumberDataPoint {
                attributes,
                start_time_unix_nano: aggregate.start_unix_nanos,
                time_unix_nano: aggregate.end_unix_nanos,
                exemplars: Vec::new(),
                flags: 0,
                value: Some(number_data_point::Value::AsInt(
                    i64::try_from(count).unwrap_or(i64::MAX),
                )),
            });
        }
    }
    let delta = AggregationTemporality::Delta as i32;
    let mut metrics = vec![Metric {
        name: DURATION_METRIC.to_owned(),
        description: "Latency of HTTP requests served or made, measured in the kernel by Trazor: \
                      first byte of a request received (or sent) to its response's status line."
            .to_owned(),
        unit: "ns".to_owned(),
        metadata: Vec::new(),
        data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
            data_points: durations,
            aggregation_temporality: delta,
        })),
    }];
    if !responses.is_empty() {
        metrics.push(Metric {
            name: RESPONSES_METRIC.to_owned(),
            description: "HTTP requests by the class of their response's status.".to_owned(),
            unit: "{request}".to_owned(),
            metadata: Vec::new(),
            data: Some(metric::Data::Sum(Sum {
                data_points: responses,
                aggregation_temporality: delta,
                is_monotonic: true,
            })),
        });
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![string_attribute("service.name", "trazor".to_owned())],
                dropped_attributes_count: 0,
                entity_refs: Vec::new(),
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// What an aggregate is about, as OTLP attributes (OpenTelemetry's semantic conventions
/// where one fits).
fn attributes_of(aggregate: &Aggregate) -> Vec<KeyValue> {
    let mut attributes = subject_attributes(&aggregate.subject);
    if !aggregate.route.is_empty() {
        attributes.push(string_attribute("http.route", aggregate.route.clone()));
    }
    if !aggregate.method.is_empty() {
        attributes.push(string_attribute(
            "http.request.method",
            aggregate.method.clone(),
        ));
    }
    attributes.push(string_attribute(
        "trazor.direction",
        direction_name(aggregate.direction).to_owned(),
    ));
    if !aggregate.profile.is_empty() {
        attributes.push(string_attribute(
            "trazor.profile",
            aggregate.profile.clone(),
        ));
    }
    attributes
}

/// The workload, pod or process as attributes.
fn subject_attributes(subject: &Subject) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(8);
    match subject {
        Subject::Workload {
            namespace,
            workload_kind,
            workload_name,
        } => {
            attributes.push(string_attribute("k8s.namespace.name", namespace.clone()));
            let conventional = match workload_kind.as_str() {
                "Deployment" => Some("k8s.deployment.name"),
                "StatefulSet" => Some("k8s.statefulset.name"),
                "DaemonSet" => Some("k8s.daemonset.name"),
                "Job" => Some("k8s.job.name"),
                "CronJob" => Some("k8s.cronjob.name"),
                "ReplicaSet" => Some("k8s.replicaset.name"),
                _ => None,
            };
            if let Some(key) = conventional {
                attributes.push(string_attribute(key, workload_name.clone()));
            }
            attributes.push(string_attribute(
                "trazor.workload.kind",
                workload_kind.clone(),
            ));
            attributes.push(string_attribute(
                "trazor.workload.name",
                workload_name.clone(),
            ));
        }
        Subject::Pod { namespace, name } => {
            attributes.push(string_attribute("k8s.namespace.name", namespace.clone()));
            attributes.push(string_attribute("k8s.pod.name", name.clone()));
        }
        Subject::Process { name } => {
            attributes.push(string_attribute("process.executable.name", name.clone()));
        }
    }
    attributes
}

/// One OTLP traces request for the exemplars of `window`: a span per request, under a
/// resource named after its workload (or pod, or process), so tracing backends list it as
/// a service. Each span is its own trace: Trazor sees requests, not their propagation.
pub fn spans_of(window: &LatencyWindow) -> ExportTraceServiceRequest {
    let subject = Subject::of(window);
    let service = match &subject {
        Subject::Workload { workload_name, .. } => workload_name.clone(),
        Subject::Pod { name, .. } | Subject::Process { name } => name.clone(),
    };
    let mut resource = vec![string_attribute("service.name", service)];
    resource.extend(subject_attributes(&subject));
    let source = window.source.clone().unwrap_or_default();
    if !source.node_name.is_empty() {
        resource.push(string_attribute("k8s.node.name", source.node_name));
    }
    if let Some(pod) = source.pod {
        if !pod.name.is_empty() && !matches!(subject, Subject::Pod { .. }) {
            resource.push(string_attribute("k8s.pod.name", pod.name));
        }
    } else if source.pid != 0 {
        resource.push(int_attribute("process.pid", i64::from(source.pid)));
    }
    let client = window.direction == Direction::Client as i32;
    let spans = window
        .exemplars
        .iter()
        .map(|exemplar| {
            let method = if exemplar.method.is_empty() {
                &window.method
            } else {
                &exemplar.method
            };
            let mut attributes = vec![
                string_attribute("http.request.method", method.clone()),
                int_attribute("http.response.status_code", i64::from(exemplar.status_code)),
                string_attribute("url.path", exemplar.path.clone()),
                int_attribute("thread.id", i64::from(exemplar.tid)),
            ];
            if !window.route.is_empty() {
                attributes.push(string_attribute("http.route", window.route.clone()));
            }
            if let Some(peer) = window.peer.as_ref().filter(|_| client) {
                attributes.push(string_attribute("server.address", peer.address.clone()));
                attributes.push(int_attribute("server.port", i64::from(peer.port)));
            }
            if !window.profile.is_empty() {
                attributes.push(string_attribute("trazor.profile", window.profile.clone()));
            }
            let target = if window.route.is_empty() {
                &exemplar.path
            } else {
                &window.route
            };
            Span {
                trace_id: rand::random::<[u8; 16]>().to_vec(),
                span_id: rand::random::<[u8; 8]>().to_vec(),
                name: format!("{method} {target}").trim().to_owned(),
                kind: if client {
                    SpanKind::Client
                } else {
                    SpanKind::Server
                } as i32,
                start_time_unix_nano: exemplar.start_unix_nanos,
                end_time_unix_nano: exemplar
                    .start_unix_nanos
                    .saturating_add(exemplar.duration_nanos),
                attributes,
                // Server errors are the server's; a client's span errs on either class.
                status: Some(Status {
                    message: String::new(),
                    code: if exemplar.status_code >= 500 || (client && exemplar.status_code >= 400)
                    {
                        SpanStatus::Error
                    } else {
                        SpanStatus::Unset
                    } as i32,
                }),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource,
                dropped_attributes_count: 0,
                entity_refs: Vec::new(),
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "trazor-collector".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        attributes: Vec::new(),
        dropped_attributes_count: 0,
    }
}

fn int_attribute(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

fn string_attribute(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_with_clear_errors() {
        let uri = OtlpConfig::new("http://otel-collector:4318/")
            .uri("/v1/metrics")
            .unwrap();
        assert_eq!(uri.to_string(), "http://otel-collector:4318/v1/metrics");
        for (endpoint, says) in [
            ("https://otel:4318", "https is not supported yet"),
            ("otel:4318", "must start with http://"),
            ("http://", "not a URL"),
            ("HTTP://otel:4318", "must start with http://"),
            ("http://exa mple", "not a URL"),
        ] {
            let error = OtlpConfig::new(endpoint).uri("/v1/metrics").unwrap_err();
            assert!(error.contains(says), "{endpoint}: {error}");
        }
    }

    #[test]
    fn headers_parse_one_or_a_list() {
        assert_eq!(
            parse_headers("x-scope-orgid=tenant-1, authorization=Bearer abc").unwrap(),
            vec![
                ("x-scope-orgid".to_owned(), "tenant-1".to_owned()),
                ("authorization".to_owned(), "Bearer abc".to_owned())
            ]
        );
        assert!(parse_headers("no-equals-sign").is_err());
        let mut config = OtlpConfig::new("http://otel:4318");
        config.headers = vec![("bad header".to_owned(), "v".to_owned())];
        assert!(config.header_map().unwrap_err().contains("bad header"));
    }
}
