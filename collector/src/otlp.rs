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
//! Who was measured is the resource: one `ResourceMetrics` per entity, after OpenTelemetry's
//! Kubernetes conventions ([`subject_resource`]): a workload (`service.name` its name,
//! `service.namespace` and `k8s.namespace.name`, `k8s.<kind>.name` for deployment,
//! statefulset, …, `trazor.workload.kind`/`trazor.workload.name`), a pod without one
//! (`k8s.pod.name`, `k8s.pod.uid`), or a process in standalone mode (`service.name` and
//! `process.executable.name`). What was measured is on the data points: `http.route`,
//! `http.request.method`, `trazor.direction` (server or client) and `trazor.profile`.
//!
//! Exemplars (slow, failed or sampled requests the agents report with their windows) go to
//! `{endpoint}/v1/traces` as spans ([`spans_of`]), under the same entity's resource plus
//! the pod, container and node the window came from.
//!
//! Delivery: closed aggregates (one batch per publishing tick) and each window's exemplars
//! queue as batches (bounded; a full queue drops the new batch and counts its data points
//! or spans); one batch is one request. A failed request (connection error, timeout, 429,
//! 502, 503, 504) is retried with exponential backoff, honouring `Retry-After`, then
//! dropped and counted; any other error status is dropped at once and counted. Points and
//! spans the receiver rejects (a partial success) are counted too.

use std::{
    collections::HashMap,
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

/// One OTLP request for `aggregates`: one `ResourceMetrics` per entity they describe (a
/// workload, a pod without one, or a process name), in the order first seen, so that a
/// backend files each point under its service and its Kubernetes object.
pub fn request_of(aggregates: &[Aggregate]) -> ExportMetricsServiceRequest {
    let mut entities: Vec<EntityPoints<'_>> = Vec::new();
    let mut index_of: HashMap<&Subject, usize> = HashMap::new();
    for aggregate in aggregates {
        let index = *index_of.entry(&aggregate.subject).or_insert_with(|| {
            entities.push(EntityPoints {
                subject: &aggregate.subject,
                durations: Vec::new(),
                responses: Vec::new(),
            });
            entities.len() - 1
        });
        let entity = &mut entities[index];
        let attributes = point_attributes(aggregate);
        let histogram = &aggregate.histogram;
        // OTLP wants count = the buckets' total; a window whose histogram could not be
        // merged (another scale) is in the count but not the buckets, so the point says
        // what its buckets hold.
        let bucket_total = histogram.total();
        entity.durations.push(ExponentialHistogramDataPoint {
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
            entity.responses.push(NumberDataPoint {
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
    ExportMetricsServiceRequest {
        resource_metrics: entities
            .into_iter()
            .map(|entity| ResourceMetrics {
                resource: Some(resource(subject_resource(entity.subject))),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope()),
                    metrics: metrics_of(entity.durations, entity.responses),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

/// The data points of one entity, on their way into its `ResourceMetrics`.
struct EntityPoints<'a> {
    subject: &'a Subject,
    durations: Vec<ExponentialHistogramDataPoint>,
    responses: Vec<NumberDataPoint>,
}

/// The two metrics of one entity: every aggregate has a duration point; the responses sum
/// only when some request had a status.
fn metrics_of(
    durations: Vec<ExponentialHistogramDataPoint>,
    responses: Vec<NumberDataPoint>,
) -> Vec<Metric> {
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
    metrics
}

/// What a data point measures within its entity: route, method, direction and profile.
/// Who was measured is the resource's ([`subject_resource`]).
fn point_attributes(aggregate: &Aggregate) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(5);
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

/// Resource attributes of the workload, pod or process an aggregate (or a window) is
/// about, after OpenTelemetry's Kubernetes conventions: `service.name` is the workload's
/// name (the conventions' first Kubernetes choice, from Deployment down to Job), else the
/// pod's; `service.namespace` is the Kubernetes namespace. The pod annotations and labels
/// the conventions would look at first do not reach the collector. A process (standalone
/// mode) is a service of its own name.
fn subject_resource(subject: &Subject) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(8);
    match subject {
        Subject::Workload {
            namespace,
            workload_kind,
            workload_name,
        } => {
            attributes.push(string_attribute("service.name", workload_name.clone()));
            attributes.push(string_attribute("service.namespace", namespace.clone()));
            attributes.push(string_attribute("k8s.namespace.name", namespace.clone()));
            if let Some(key) = workload_key(workload_kind) {
                attributes.push(string_attribute(key, workload_name.clone()));
            }
            // The kind and name again under Trazor's keys, for a kind the conventions have
            // no key for (an Argo Rollout, a custom controller's).
            attributes.push(string_attribute(
                "trazor.workload.kind",
                workload_kind.clone(),
            ));
            attributes.push(string_attribute(
                "trazor.workload.name",
                workload_name.clone(),
            ));
        }
        Subject::Pod {
            namespace,
            name,
            uid,
        } => {
            attributes.push(string_attribute("service.name", name.clone()));
            attributes.push(string_attribute("service.namespace", namespace.clone()));
            attributes.push(string_attribute("k8s.namespace.name", namespace.clone()));
            attributes.push(string_attribute("k8s.pod.name", name.clone()));
            if !uid.is_empty() {
                attributes.push(string_attribute("k8s.pod.uid", uid.clone()));
            }
        }
        Subject::Process { name } => {
            // What the metrics' resource said before it named processes: better than an
            // empty service name, which backends reject or file under "unknown".
            let service = if name.is_empty() { "trazor" } else { name };
            attributes.push(string_attribute("service.name", service.to_owned()));
            if !name.is_empty() {
                attributes.push(string_attribute("process.executable.name", name.clone()));
            }
        }
    }
    attributes
}

/// The semantic-convention key naming a workload of `kind`, if the conventions have one.
fn workload_key(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Deployment" => "k8s.deployment.name",
        "StatefulSet" => "k8s.statefulset.name",
        "DaemonSet" => "k8s.daemonset.name",
        "Job" => "k8s.job.name",
        "CronJob" => "k8s.cronjob.name",
        "ReplicaSet" => "k8s.replicaset.name",
        _ => return None,
    })
}

/// Resource attributes of the one source a window comes from: its entity's
/// ([`subject_resource`], the same keys and values as that entity's metrics), then the pod
/// and container on their node. A window is one container's, so it names a service
/// instance, `{pod uid}.{container}` as the conventions derive it; a process's window, its
/// pid.
fn window_resource(window: &LatencyWindow, subject: &Subject) -> Vec<KeyValue> {
    let mut attributes = subject_resource(subject);
    let Some(source) = window.source.as_ref() else {
        return attributes;
    };
    match source.pod.as_ref() {
        Some(pod) => {
            // A pod's own resource already names it.
            if !matches!(subject, Subject::Pod { .. }) {
                if !pod.name.is_empty() {
                    attributes.push(string_attribute("k8s.pod.name", pod.name.clone()));
                }
                if !pod.uid.is_empty() {
                    attributes.push(string_attribute("k8s.pod.uid", pod.uid.clone()));
                }
            }
            if !pod.container.is_empty() {
                attributes.push(string_attribute(
                    "k8s.container.name",
                    pod.container.clone(),
                ));
                if !pod.uid.is_empty() {
                    attributes.push(string_attribute(
                        "service.instance.id",
                        format!("{}.{}", pod.uid, pod.container),
                    ));
                }
            }
        }
        None if source.pid != 0 => {
            attributes.push(int_attribute("process.pid", i64::from(source.pid)));
        }
        None => {}
    }
    if !source.node_name.is_empty() {
        attributes.push(string_attribute("k8s.node.name", source.node_name.clone()));
    }
    attributes
}

/// One OTLP traces request for the exemplars of `window`: a span per request, under a
/// resource naming its workload (or pod, or process) as a service, as its metrics do, so
/// tracing backends list it as one, and its pod, container and node. Each span is its own
/// trace: Trazor sees requests, not their propagation.
pub fn spans_of(window: &LatencyWindow) -> ExportTraceServiceRequest {
    let subject = Subject::of(window);
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
            resource: Some(resource(window_resource(window, &subject))),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn resource(attributes: Vec<KeyValue>) -> Resource {
    Resource {
        attributes,
        dropped_attributes_count: 0,
        entity_refs: Vec::new(),
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
    use trazor_proto::v1::{PodIdentity, Source};

    use super::*;

    fn window(route: &str, source: Source) -> LatencyWindow {
        LatencyWindow {
            sequence: 1,
            source: Some(source),
            direction: Direction::Server as i32,
            route: route.into(),
            method: "GET".into(),
            start_unix_nanos: 10,
            end_unix_nanos: 20,
            status_class_counts: vec![0, 0, 1],
            ..Default::default()
        }
    }

    fn pod_source(pod: &str, container: &str, workload: Option<(&str, &str)>) -> Source {
        let (workload_kind, workload_name) = workload.unwrap_or_default();
        Source {
            node_name: "node-1".into(),
            pid: 77,
            pod: Some(PodIdentity {
                namespace: "shop".into(),
                name: pod.into(),
                uid: format!("uid-{pod}"),
                container: container.into(),
                workload_kind: workload_kind.into(),
                workload_name: workload_name.into(),
            }),
            ..Default::default()
        }
    }

    fn strings(attributes: &[KeyValue]) -> Vec<(String, String)> {
        attributes
            .iter()
            .map(|attribute| {
                let value = match attribute
                    .value
                    .as_ref()
                    .and_then(|value| value.value.as_ref())
                {
                    Some(any_value::Value::StringValue(text)) => text.clone(),
                    Some(any_value::Value::IntValue(number)) => number.to_string(),
                    other => panic!("{}: unexpected value {other:?}", attribute.key),
                };
                (attribute.key.clone(), value)
            })
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn points_are_grouped_under_one_resource_per_entity() {
        let checkout = Some(("Deployment", "checkout"));
        let aggregates = [
            window("/a", pod_source("checkout-1", "app", checkout)),
            window(
                "/",
                Source {
                    node_name: "host-1".into(),
                    pid: 9,
                    process_name: "nginx".into(),
                    ..Default::default()
                },
            ),
            // Another pod of the same Deployment, on another route: same resource.
            window("/b", pod_source("checkout-2", "app", checkout)),
            window("/c", pod_source("debug", "shell", None)),
        ]
        .map(|window| Aggregate::of_window(&window));
        let request = request_of(&aggregates);
        let resources: Vec<_> = request
            .resource_metrics
            .iter()
            .map(|entity| strings(&entity.resource.as_ref().unwrap().attributes))
            .collect();
        assert_eq!(
            resources,
            vec![
                pairs(&[
                    ("service.name", "checkout"),
                    ("service.namespace", "shop"),
                    ("k8s.namespace.name", "shop"),
                    ("k8s.deployment.name", "checkout"),
                    ("trazor.workload.kind", "Deployment"),
                    ("trazor.workload.name", "checkout"),
                ]),
                pairs(&[
                    ("service.name", "nginx"),
                    ("process.executable.name", "nginx"),
                ]),
                pairs(&[
                    ("service.name", "debug"),
                    ("service.namespace", "shop"),
                    ("k8s.namespace.name", "shop"),
                    ("k8s.pod.name", "debug"),
                    ("k8s.pod.uid", "uid-debug"),
                ]),
            ]
        );
        // Each entity's points, and on them only what was measured.
        let routes: Vec<Vec<Vec<(String, String)>>> = request
            .resource_metrics
            .iter()
            .map(|entity| {
                let metrics = &entity.scope_metrics[0].metrics;
                assert_eq!(metrics.len(), 2, "duration and responses");
                let Some(metric::Data::ExponentialHistogram(histogram)) = &metrics[0].data else {
                    panic!("not a histogram: {:?}", metrics[0]);
                };
                histogram
                    .data_points
                    .iter()
                    .map(|point| strings(&point.attributes))
                    .collect()
            })
            .collect();
        let point = |route: &str| {
            pairs(&[
                ("http.route", route),
                ("http.request.method", "GET"),
                ("trazor.direction", "server"),
            ])
        };
        assert_eq!(
            routes,
            vec![
                vec![point("/a"), point("/b")],
                vec![point("/")],
                vec![point("/c")]
            ]
        );
        assert_eq!(points_of(&aggregates), 8);
    }

    #[test]
    fn spans_name_the_entity_of_their_metrics_then_pod_container_and_node() {
        let mut served = window(
            "/a",
            pod_source("checkout-1", "app", Some(("StatefulSet", "checkout"))),
        );
        served.exemplars = vec![Default::default()];
        let spans = spans_of(&served);
        let span_resource = strings(
            &spans.resource_spans[0]
                .resource
                .as_ref()
                .unwrap()
                .attributes,
        );
        assert_eq!(
            span_resource,
            pairs(&[
                ("service.name", "checkout"),
                ("service.namespace", "shop"),
                ("k8s.namespace.name", "shop"),
                ("k8s.statefulset.name", "checkout"),
                ("trazor.workload.kind", "StatefulSet"),
                ("trazor.workload.name", "checkout"),
                ("k8s.pod.name", "checkout-1"),
                ("k8s.pod.uid", "uid-checkout-1"),
                ("k8s.container.name", "app"),
                ("service.instance.id", "uid-checkout-1.app"),
                ("k8s.node.name", "node-1"),
            ])
        );
        // The metrics' resource is where the span's starts: one service in both.
        let metrics = request_of(&[Aggregate::of_window(&served)]);
        let metric_resource = strings(
            &metrics.resource_metrics[0]
                .resource
                .as_ref()
                .unwrap()
                .attributes,
        );
        assert_eq!(span_resource[..metric_resource.len()], metric_resource[..]);

        // A pod without a workload names itself once; a process its pid.
        let mut bare = window("/c", pod_source("debug", "", None));
        bare.exemplars = vec![Default::default()];
        assert_eq!(
            strings(
                &spans_of(&bare).resource_spans[0]
                    .resource
                    .as_ref()
                    .unwrap()
                    .attributes
            ),
            pairs(&[
                ("service.name", "debug"),
                ("service.namespace", "shop"),
                ("k8s.namespace.name", "shop"),
                ("k8s.pod.name", "debug"),
                ("k8s.pod.uid", "uid-debug"),
                ("k8s.node.name", "node-1"),
            ])
        );
        let mut process = window(
            "/",
            Source {
                node_name: "host-1".into(),
                pid: 9,
                process_name: "nginx".into(),
                ..Default::default()
            },
        );
        process.exemplars = vec![Default::default()];
        assert_eq!(
            strings(
                &spans_of(&process).resource_spans[0]
                    .resource
                    .as_ref()
                    .unwrap()
                    .attributes
            ),
            pairs(&[
                ("service.name", "nginx"),
                ("process.executable.name", "nginx"),
                ("process.pid", "9"),
                ("k8s.node.name", "host-1"),
            ])
        );
    }

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
