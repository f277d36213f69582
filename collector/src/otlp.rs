//! OTLP export: every closed aggregate (and every late window, alone) as OTLP metrics, sent
//! over OTLP/HTTP with protobuf (`POST {endpoint}/v1/metrics`) or over OTLP/gRPC, gzipped
//! or not, to an OpenTelemetry Collector, or to any backend that receives OTLP (Prometheus
//! with its OTLP receiver, Mimir, ...). Configured as every OpenTelemetry exporter is
//! ([`OtlpSettings`]: the `OTEL_EXPORTER_OTLP_*` variables, per-signal endpoints included).
//!
//! Each aggregate is one data point per metric, with delta temporality and its window as
//! the interval (`start_time_unix_nano` to `time_unix_nano`), named as the HTTP semantic
//! conventions name them:
//!
//! - `http.server.request.duration` (requests served) or `http.client.request.duration`
//!   (requests made), unit `s`, an exponential histogram: the aggregate's histogram
//!   re-bucketed from nanoseconds to seconds ([`seconds`]: scale 6 in ns becomes scale 8 in
//!   s, each count moved whole into a bucket inside its kernel bucket; quantiles within
//!   [`QUANTILE_ERROR_BOUND`]), with count, sum, min and max in seconds. One point per
//!   status code: the kernel keeps each code's latencies in their own histogram, so each
//!   point's `http.response.status_code` (and `error.type`) is exact. Attributes:
//!   [`point_attributes`] and [`status_attributes`]. With
//!   `OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=explicit_bucket_histogram`,
//!   explicit buckets at the conventions' boundaries instead ([`explicit`]: counts, sum,
//!   min and max exact; a request counted in the bucket of a latency within
//!   [`MISPLACEMENT_BOUND`] of its own).
//! - `trazor.http.responses`, a monotonic sum: requests by
//!   `trazor.http.response.status_class` (`1xx` … `5xx`, `unknown`) and `trazor.direction`,
//!   the exact counts behind an error rate.
//!
//! Exemplars (slow, failed or sampled requests the agents report with their windows) go to
//! `{endpoint}/v1/traces` as spans ([`spans_of`]), under the same entity's resource plus
//! the pod, container and node the window came from.
//!
//! Delivery: closed aggregates (one batch per publishing tick) and each window's exemplars
//! queue as batches (bounded; a full queue drops the new batch and counts its data points
//! or spans); one batch is one request. A failed request (connection error, timeout, 429,
//! 502, 503, 504) is retried with exponential backoff, honouring `Retry-After`, then
//! dropped and counted; any other error status is dropped at once and counted. Over gRPC,
//! the codes the OTLP specification calls transient are retried (`grpc_failure`). A failed
//! TLS handshake is not retried over either (`tls_failure`): a certificate does not fix
//! itself. Points and spans the receiver rejects (a partial success) are counted too.
//!
//! TLS: `https://` endpoints are checked against the system roots or the CA given
//! (`--otlp-certificate`), with an optional client certificate; the files are read and
//! checked at start (`TlsFiles`).

use std::{
    collections::HashMap,
    io::Write as _,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_client::MetricsServiceClient,
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_client::TraceServiceClient,
        },
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, ExponentialHistogram as OtlpExponentialHistogram,
        ExponentialHistogramDataPoint, Histogram as OtlpHistogram, HistogramDataPoint, Metric,
        NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, exponential_histogram_data_point,
        metric, number_data_point,
    },
    resource::v1::Resource,
    trace::v1::{
        ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode as SpanStatus,
    },
};
use prost::Message as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::sync::mpsc;
use tonic::{
    Code,
    codec::CompressionEncoding,
    metadata::MetadataMap,
    transport::{Channel, ClientTlsConfig, Endpoint},
};
use trazor_proto::v1::{Direction, ExponentialHistogram, LatencyWindow};

pub mod cumulative;
mod explicit;
mod seconds;
pub mod spool;

use cumulative::Cumulative;
pub use cumulative::Temporality;
pub use explicit::{DURATION_BOUNDARIES, HistogramAggregation, MISPLACEMENT_BOUND};
pub use seconds::QUANTILE_ERROR_BOUND;
use spool::{PutError, Spool, SpoolConfig};

use crate::{
    merge::{Aggregate, StatusAggregate, Subject},
    stats::CollectorStats,
    view::direction_name,
};

/// The latency histogram of requests served, as the HTTP semantic conventions name it.
pub const SERVER_DURATION_METRIC: &str = "http.server.request.duration";
/// The latency histogram of requests made.
pub const CLIENT_DURATION_METRIC: &str = "http.client.request.duration";
/// Name of the requests-by-status-class sum.
pub const RESPONSES_METRIC: &str = "trazor.http.responses";
/// Its attribute: `1xx` … `5xx`, or `unknown` (Trazor's key: the conventions have none
/// for a class, and `http.*` is theirs).
pub const STATUS_CLASS_ATTRIBUTE: &str = "trazor.http.response.status_class";

/// How requests are carried (`--otlp-protocol`, `OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`), the default.
    #[default]
    HttpProtobuf,
    /// OTLP/gRPC (`grpc`).
    Grpc,
}

impl FromStr for OtlpProtocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "grpc" => Ok(Self::Grpc),
            "http/json" => Err(
                "OTLP protocol http/json is not supported; use http/protobuf or grpc".to_owned(),
            ),
            other => Err(format!(
                "OTLP protocol {other:?} is not one of grpc, http/protobuf"
            )),
        }
    }
}

/// Compression of request bodies (`--otlp-compression`, `OTEL_EXPORTER_OTLP_COMPRESSION`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OtlpCompression {
    #[default]
    None,
    Gzip,
}

impl FromStr for OtlpCompression {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "none" | "" => Ok(Self::None),
            "gzip" => Ok(Self::Gzip),
            other => Err(format!(
                "OTLP compression {other:?} is not one of gzip, none"
            )),
        }
    }
}

/// Where and how to export.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    pub protocol: OtlpProtocol,
    pub compression: OtlpCompression,
    /// Endpoint of both signals (`http://host:4318`). Over HTTP, requests go to
    /// `{endpoint}/v1/metrics` and `{endpoint}/v1/traces`; over gRPC, to the endpoint itself.
    pub endpoint: Option<String>,
    /// Endpoint of metrics alone, used as it is (no `/v1/metrics` appended, as the OTLP
    /// exporter specification says); wins over `endpoint`.
    pub metrics_endpoint: Option<String>,
    /// Endpoint of spans alone, used as it is; wins over `endpoint`.
    pub traces_endpoint: Option<String>,
    /// Extra request headers (an API key, a tenant id); gRPC metadata over gRPC.
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
    /// CA certificates (PEM file) an https endpoint must present a certificate from;
    /// `None`: the system roots.
    pub certificate: Option<PathBuf>,
    /// Client certificate chain and its key (PEM files), for receivers that require
    /// mutual TLS.
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Each signal's own TLS files (`OTEL_EXPORTER_OTLP_{METRICS,TRACES}_CERTIFICATE`,
    /// `_CLIENT_CERTIFICATE`, `_CLIENT_KEY`), each winning over the generic one.
    pub metrics_tls: TlsPaths,
    pub traces_tls: TlsPaths,
    /// Each signal's own protocol (`OTEL_EXPORTER_OTLP_{METRICS,TRACES}_PROTOCOL`), winning
    /// over `protocol` for that signal: spans to Tempo over gRPC, metrics to Mimir over HTTP.
    pub metrics_protocol: Option<OtlpProtocol>,
    pub traces_protocol: Option<OtlpProtocol>,
    /// Delta (each window alone, the default) or cumulative (running totals per series,
    /// for backends that store only those): `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`.
    pub temporality: Temporality,
    /// Exponential duration histograms (the default: the kernel's accuracy) or the
    /// conventions' explicit buckets, for dashboards that read classic buckets:
    /// `OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION`.
    pub histogram: HistogramAggregation,
    /// Series whose totals are kept at most with cumulative temporality.
    pub max_series: usize,
    /// Largest request body (protobuf, before compression): a bigger batch of aggregates
    /// is split into several requests, so that it fits a receiver's limit (gRPC's default
    /// is 4 MiB) and the spool's bound per batch.
    pub max_batch_bytes: usize,
    /// Where batches wait on disk until the receiver accepts them (`--state-dir`); `None`:
    /// in memory only.
    pub spool: Option<SpoolConfig>,
}

/// The spool's directory in a collector's state dir.
pub fn spool_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("otlp")
}

/// Bytes the spool holds at most, by default.
pub const SPOOL_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Paths of one signal's TLS files; `None`: the generic setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsPaths {
    pub certificate: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl OtlpConfig {
    /// A signal's protocol: its own, else the generic one.
    fn signal_protocol(&self, signal: Signal) -> OtlpProtocol {
        match signal {
            Signal::Metrics => self.metrics_protocol,
            Signal::Spans => self.traces_protocol,
        }
        .unwrap_or(self.protocol)
    }

    /// A signal's TLS files: its own, else the generic ones, file by file (as each
    /// variable is on its own in the OTLP exporter specification).
    fn signal_tls(&self, signal: Signal) -> TlsPaths {
        let specific = match signal {
            Signal::Metrics => &self.metrics_tls,
            Signal::Spans => &self.traces_tls,
        };
        TlsPaths {
            certificate: specific.certificate.clone().or(self.certificate.clone()),
            client_certificate: specific
                .client_certificate
                .clone()
                .or(self.client_certificate.clone()),
            client_key: specific.client_key.clone().or(self.client_key.clone()),
        }
    }

    /// Both signals to `endpoint` over OTLP/HTTP, uncompressed.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: Some(endpoint.into()),
            ..Self::default()
        }
    }

    /// The URL a signal's requests go to, `None` when that signal is not exported, or why
    /// the endpoint cannot be used.
    fn signal_uri(&self, signal: Signal) -> Result<Option<Uri>, String> {
        let (specific, path) = match signal {
            Signal::Metrics => (&self.metrics_endpoint, "/v1/metrics"),
            Signal::Spans => (&self.traces_endpoint, "/v1/traces"),
        };
        match (specific, &self.endpoint, self.signal_protocol(signal)) {
            (Some(endpoint), _, _) => check_endpoint(endpoint, "").map(Some),
            (None, Some(endpoint), OtlpProtocol::HttpProtobuf) => {
                check_endpoint(endpoint, path).map(Some)
            }
            (None, Some(endpoint), OtlpProtocol::Grpc) => check_endpoint(endpoint, "").map(Some),
            (None, None, _) => Ok(None),
        }
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

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            protocol: OtlpProtocol::default(),
            compression: OtlpCompression::default(),
            endpoint: None,
            metrics_endpoint: None,
            traces_endpoint: None,
            headers: Vec::new(),
            queue_batches: 1_024,
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            certificate: None,
            client_certificate: None,
            client_key: None,
            metrics_tls: TlsPaths::default(),
            traces_tls: TlsPaths::default(),
            metrics_protocol: None,
            traces_protocol: None,
            temporality: Temporality::Delta,
            histogram: HistogramAggregation::Exponential,
            max_series: 100_000,
            max_batch_bytes: 2 * 1024 * 1024,
            spool: None,
        }
    }
}

/// `endpoint` with `path` appended, as a URI, or why it cannot be used.
fn check_endpoint(endpoint: &str, path: &str) -> Result<Uri, String> {
    if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
        return Err(format!(
            "OTLP endpoint {endpoint:?} must start with http:// or https:// (e.g. \
             http://otel-collector:4318)"
        ));
    }
    let base = if path.is_empty() {
        endpoint
    } else {
        endpoint.trim_end_matches('/')
    };
    let uri = Uri::from_str(&format!("{base}{path}"))
        .map_err(|error| format!("OTLP endpoint {endpoint:?} is not a URL: {error}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("OTLP endpoint {endpoint:?} has no host"));
    }
    Ok(uri)
}

/// The export settings as given on the command line, each `None` when its flag is absent;
/// [`OtlpSettings::resolve`] fills them from the `OTEL_EXPORTER_OTLP_*` variables.
#[derive(Clone, Debug, Default)]
pub struct OtlpSettings {
    pub endpoint: Option<String>,
    pub metrics_endpoint: Option<String>,
    pub traces_endpoint: Option<String>,
    pub protocol: Option<String>,
    pub compression: Option<String>,
    /// Milliseconds (as the variable), or a duration such as `10s`.
    pub timeout: Option<String>,
    /// `KEY=VALUE` each (or comma-separated lists of them).
    pub headers: Vec<String>,
    /// Paths of PEM files: the CA, the client certificate and its key.
    pub certificate: Option<String>,
    pub client_certificate: Option<String>,
    pub client_key: Option<String>,
}

impl OtlpSettings {
    /// The export configuration, `None` when no endpoint is set (no export). A flag wins
    /// over its variable, and a signal's own endpoint (flag, then variable) over the
    /// generic one (flag, then variable), as the OTLP exporter specification says; `env`
    /// looks a variable up (`std::env::var` in the binary, a table in tests).
    pub fn resolve(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<OtlpConfig>, String> {
        // An empty variable counts as unset, as in the OpenTelemetry SDKs.
        let or_env = |flag: Option<String>, name: &str| {
            flag.or_else(|| env(name).filter(|value| !value.trim().is_empty()))
        };
        let endpoint = or_env(self.endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let metrics_endpoint = or_env(self.metrics_endpoint, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT");
        let traces_endpoint = or_env(self.traces_endpoint, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        if endpoint.is_none() && metrics_endpoint.is_none() && traces_endpoint.is_none() {
            return Ok(None);
        }
        let protocol = or_env(self.protocol, "OTEL_EXPORTER_OTLP_PROTOCOL")
            .map(|text| text.parse())
            .transpose()?
            .unwrap_or_default();
        let compression = or_env(self.compression, "OTEL_EXPORTER_OTLP_COMPRESSION")
            .map(|text| text.parse())
            .transpose()?
            .unwrap_or_default();
        let mut config = OtlpConfig {
            protocol,
            compression,
            endpoint,
            metrics_endpoint,
            traces_endpoint,
            ..OtlpConfig::default()
        };
        if let Some(timeout) = or_env(self.timeout, "OTEL_EXPORTER_OTLP_TIMEOUT") {
            config.timeout = parse_timeout(&timeout)?;
        }
        let headers = if self.headers.is_empty() {
            env("OTEL_EXPORTER_OTLP_HEADERS").unwrap_or_default()
        } else {
            self.headers.join(",")
        };
        config.headers = parse_headers(&headers)?;
        config.certificate =
            or_env(self.certificate, "OTEL_EXPORTER_OTLP_CERTIFICATE").map(PathBuf::from);
        config.client_certificate = or_env(
            self.client_certificate,
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        )
        .map(PathBuf::from);
        config.client_key =
            or_env(self.client_key, "OTEL_EXPORTER_OTLP_CLIENT_KEY").map(PathBuf::from);
        // Variables only: a flag per signal and file would be six more flags for a rare need.
        let signal_tls = |signal: &str| {
            let path = |file: &str| {
                or_env(None, &format!("OTEL_EXPORTER_OTLP_{signal}_{file}")).map(PathBuf::from)
            };
            TlsPaths {
                certificate: path("CERTIFICATE"),
                client_certificate: path("CLIENT_CERTIFICATE"),
                client_key: path("CLIENT_KEY"),
            }
        };
        config.metrics_tls = signal_tls("METRICS");
        config.traces_tls = signal_tls("TRACES");
        // Variables only, as the TLS files per signal.
        let signal_protocol = |signal: &str| {
            or_env(None, &format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
                .map(|text| text.parse::<OtlpProtocol>())
                .transpose()
        };
        config.metrics_protocol = signal_protocol("METRICS")?;
        config.traces_protocol = signal_protocol("TRACES")?;
        if let Some(temporality) = or_env(None, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
        {
            config.temporality = temporality.parse()?;
        }
        if let Some(histogram) = or_env(
            None,
            "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
        ) {
            config.histogram = histogram.parse()?;
        }
        Ok(Some(config))
    }
}

/// A request timeout: milliseconds (`OTEL_EXPORTER_OTLP_TIMEOUT`'s unit), or a duration
/// with its unit (`10s`).
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let timeout = match text.parse::<u64>() {
        Ok(millis) => Duration::from_millis(millis),
        Err(_) => humantime::parse_duration(text).map_err(|error| {
            format!(
                "OTLP timeout {text:?} is neither milliseconds nor a duration like 10s: {error}"
            )
        })?,
    };
    if timeout.is_zero() {
        return Err("OTLP timeout must be more than 0".to_owned());
    }
    Ok(timeout)
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
    /// Every queued batch is here too, until it is accepted or dropped for good.
    spool: Option<Arc<Spool>>,
    max_batch_bytes: usize,
    /// Series totals, with cumulative temporality.
    cumulative: Option<Arc<Cumulative>>,
    histogram: HistogramAggregation,
    /// Whether metrics, and spans, have an endpoint: a signal without one is not exported
    /// (the user's choice, so nothing is counted as dropped).
    exports_metrics: bool,
    exports_spans: bool,
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

/// One request's worth.
#[derive(Debug)]
struct Batch {
    payload: Payload,
    /// Data points or spans in it.
    items: u64,
    /// Its file in the spool, if spooled.
    spool_id: Option<u64>,
}

/// Spool record kinds: `[kind u8][items u64 LE][the request's protobuf]`.
const SPOOLED_METRICS: u8 = 1;
const SPOOLED_SPANS: u8 = 2;

#[derive(Debug)]
enum Payload {
    Metrics(ExportMetricsServiceRequest),
    Spans(ExportTraceServiceRequest),
}

impl Batch {
    fn signal(&self) -> Signal {
        match self.payload {
            Payload::Metrics(_) => Signal::Metrics,
            Payload::Spans(_) => Signal::Spans,
        }
    }

    /// The protobuf body of an OTLP/HTTP request.
    fn encode(&self) -> Vec<u8> {
        match &self.payload {
            Payload::Metrics(request) => request.encode_to_vec(),
            Payload::Spans(request) => request.encode_to_vec(),
        }
    }

    /// The batch as a spool record.
    fn spooled(&self) -> Vec<u8> {
        let kind = match self.payload {
            Payload::Metrics(_) => SPOOLED_METRICS,
            Payload::Spans(_) => SPOOLED_SPANS,
        };
        let mut record = vec![kind];
        record.extend_from_slice(&self.items.to_le_bytes());
        // Encoding into a Vec cannot fail.
        let _ = match &self.payload {
            Payload::Metrics(request) => request.encode(&mut record),
            Payload::Spans(request) => request.encode(&mut record),
        };
        record
    }

    /// A batch read back from the spool, `None` if the record is not one.
    fn unspooled(id: u64, record: &[u8]) -> Option<Self> {
        let (&kind, rest) = record.split_first()?;
        let (items, protobuf) = rest.split_first_chunk::<8>()?;
        let payload = match kind {
            SPOOLED_METRICS => {
                Payload::Metrics(ExportMetricsServiceRequest::decode(protobuf).ok()?)
            }
            SPOOLED_SPANS => Payload::Spans(ExportTraceServiceRequest::decode(protobuf).ok()?),
            _ => return None,
        };
        Some(Self {
            payload,
            items: u64::from_le_bytes(*items),
            spool_id: Some(id),
        })
    }
}

impl OtlpExporter {
    /// Checks `config` and starts the export task (on the current Tokio runtime).
    pub fn start(config: OtlpConfig, stats: Arc<CollectorStats>) -> Result<Self, String> {
        let metrics_uri = config.signal_uri(Signal::Metrics)?;
        let traces_uri = config.signal_uri(Signal::Spans)?;
        if metrics_uri.is_none() && traces_uri.is_none() {
            return Err("OTLP export has no endpoint: set --otlp-endpoint (or \
                        --otlp-metrics-endpoint, --otlp-traces-endpoint)"
                .to_owned());
        }
        let headers = config.header_map()?;
        let max_batch_bytes = config.max_batch_bytes.max(1);
        let cumulative = (config.temporality == Temporality::Cumulative)
            .then(|| Arc::new(Cumulative::new(config.max_series)));
        let histogram = config.histogram;
        let destination =
            |signal: Signal, uri: Option<Uri>| -> Result<Option<Destination>, String> {
                let Some(uri) = uri else { return Ok(None) };
                let tls = TlsFiles::load(&config.signal_tls(signal), &uri)?;
                match config.signal_protocol(signal) {
                    OtlpProtocol::HttpProtobuf => {
                        let mut http = HttpConnector::new();
                        // Lets https:// through to the TLS layer (HttpConnector refuses it by
                        // default).
                        http.enforce_http(false);
                        let connector = hyper_rustls::HttpsConnectorBuilder::new()
                            .with_tls_config(tls.rustls()?)
                            .https_or_http()
                            .enable_http1()
                            .wrap_connector(http);
                        let client = Client::builder(TokioExecutor::new()).build(connector);
                        Ok(Some(Destination::Http(uri, Box::new(client))))
                    }
                    // Connected at the first request, and again after a failure, so a receiver
                    // that starts after the collector is no error.
                    OtlpProtocol::Grpc => {
                        let mut endpoint = Endpoint::from(uri.clone())
                            .connect_timeout(config.timeout)
                            .timeout(config.timeout);
                        if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                            endpoint = endpoint.tls_config(tls.tonic()).map_err(|error| {
                                format!("OTLP endpoint {uri}: TLS settings: {error}")
                            })?;
                        }
                        Ok(Some(Destination::Grpc(uri, endpoint.connect_lazy())))
                    }
                }
            };
        let (exports_metrics, exports_spans) = (metrics_uri.is_some(), traces_uri.is_some());
        let (spool, recovered) = match &config.spool {
            Some(spool_config) => {
                let (spool, recovered) = Spool::open(spool_config.clone()).map_err(|error| {
                    format!(
                        "cannot open the OTLP spool in {}: {error}",
                        spool_config.dir.display()
                    )
                })?;
                let mut batches = Vec::with_capacity(recovered.batches.len());
                let mut corrupt = recovered.corrupt;
                for (id, record) in recovered.batches {
                    match Batch::unspooled(id, &record) {
                        Some(batch) => batches.push(batch),
                        None => {
                            corrupt += 1;
                            let _ = spool.remove(id);
                        }
                    }
                }
                stats
                    .otlp_spool_corrupt
                    .fetch_add(corrupt, Ordering::Relaxed);
                stats
                    .otlp_spool_recovered
                    .fetch_add(batches.len() as u64, Ordering::Relaxed);
                if !batches.is_empty() {
                    tracing::info!(
                        batches = batches.len(),
                        "OTLP spool: sending the batches left from before the restart first"
                    );
                }
                let spool = Arc::new(spool);
                stats.otlp_spool_usage(&spool);
                (Some(spool), batches)
            }
            None => (None, Vec::new()),
        };
        let (batches, receiver) = mpsc::channel(config.queue_batches.max(1));
        let sender = Sender {
            metrics: destination(Signal::Metrics, metrics_uri)?,
            traces: destination(Signal::Spans, traces_uri)?,
            metadata: MetadataMap::from_headers(headers.clone()),
            headers,
            config,
            stats: stats.clone(),
            spool: spool.clone(),
        };
        tokio::spawn(sender.run(recovered, receiver));
        Ok(Self {
            batches,
            stats,
            spool,
            max_batch_bytes,
            cumulative,
            histogram,
            exports_metrics,
            exports_spans,
        })
    }

    /// Queues `aggregates` for export as metrics: one request, or several when one would
    /// be over `max_batch_bytes`.
    pub fn export(&self, aggregates: Vec<Aggregate>) {
        if aggregates.is_empty() || !self.exports_metrics {
            return;
        }
        match &self.cumulative {
            Some(cumulative) => {
                let (totals, evicted) = cumulative.accumulate(&aggregates);
                self.stats
                    .otlp_series_evicted
                    .fetch_add(evicted, Ordering::Relaxed);
                self.queue_split(&totals, Temporality::Cumulative);
            }
            None => self.queue_split(&aggregates, Temporality::Delta),
        }
    }

    /// Queues the aggregates closed at `now` ([`Self::export`]), then records in the spool
    /// that every aggregate due by `now` is closed and spooled, so a restart re-merges only
    /// the windows of aggregates that were still open.
    pub fn export_closed(&self, aggregates: Vec<Aggregate>, now_unix_nanos: u64) {
        let closed_any = !aggregates.is_empty();
        self.export(aggregates);
        if let Some(spool) = &self.spool
            && closed_any
            && let Err(error) = spool.set_closed_through(now_unix_nanos)
        {
            self.stats.otlp_spool_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "OTLP spool: cannot record the aggregates closed");
        }
    }

    /// Halves `aggregates` until each half's request fits `max_batch_bytes` (one aggregate
    /// always goes, whatever its size).
    fn queue_split(&self, aggregates: &[Aggregate], temporality: Temporality) {
        let request = request_shaped(aggregates, temporality, self.histogram);
        if aggregates.len() > 1 && request.encoded_len() > self.max_batch_bytes {
            let (first, second) = aggregates.split_at(aggregates.len() / 2);
            self.queue_split(first, temporality);
            self.queue_split(second, temporality);
            return;
        }
        self.queue(Batch {
            items: points_of(aggregates),
            payload: Payload::Metrics(request),
            spool_id: None,
        });
    }

    /// Queues the exemplars of `window` (its slow, failed or sampled requests) for export
    /// as spans.
    pub fn export_exemplars(&self, window: &LatencyWindow) {
        if window.exemplars.is_empty() || !self.exports_spans {
            return;
        }
        self.queue(Batch {
            items: window.exemplars.len() as u64,
            payload: Payload::Spans(spans_of(window)),
            spool_id: None,
        });
    }

    /// Queues `batch` (and, with a spool, writes it there first), or counts its items as
    /// dropped when the queue or the spool is full (the receiver has been failing for a
    /// long time).
    fn queue(&self, mut batch: Batch) {
        let (signal, items) = (batch.signal(), batch.items);
        let permit = match self.batches.try_reserve() {
            Ok(permit) => permit,
            Err(error) => {
                self.stats.otlp_dropped(signal, items);
                tracing::warn!(
                    items,
                    "OTLP export queue is {}: {} dropped",
                    match error {
                        mpsc::error::TrySendError::Full(()) => "full",
                        mpsc::error::TrySendError::Closed(()) => "closed",
                    },
                    signal.items()
                );
                return;
            }
        };
        if let Some(spool) = &self.spool {
            match spool.put(&batch.spooled()) {
                Ok(id) => batch.spool_id = Some(id),
                Err(PutError::Full) => {
                    self.stats.otlp_spool_full.fetch_add(1, Ordering::Relaxed);
                    self.stats.otlp_dropped(signal, items);
                    tracing::warn!(items, "OTLP spool is full: {} dropped", signal.items());
                    return;
                }
                // Still sent, from memory: a disk error loses it only if a restart
                // comes before the receiver accepts it.
                Err(PutError::Io(error)) => {
                    self.stats.otlp_spool_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%error, "OTLP spool: cannot write a batch; sending it unspooled");
                }
            }
            self.stats.otlp_spool_usage(spool);
        }
        self.stats.otlp_queued.fetch_add(1, Ordering::Relaxed);
        permit.send(batch);
    }
}

impl CollectorStats {
    fn otlp_spool_usage(&self, spool: &Spool) {
        let (batches, bytes) = spool.usage();
        self.otlp_spool_batches.store(batches, Ordering::Relaxed);
        self.otlp_spool_bytes.store(bytes, Ordering::Relaxed);
    }

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

/// Data points a batch makes: one histogram point per status code of each aggregate, one
/// sum point per status class seen.
fn points_of(aggregates: &[Aggregate]) -> u64 {
    aggregates
        .iter()
        .map(|aggregate| {
            aggregate.statuses.len() as u64
                + aggregate
                    .status_class_counts
                    .iter()
                    .filter(|count| **count > 0)
                    .count() as u64
        })
        .sum()
}

struct Sender {
    /// Where each signal goes; `None`: not exported.
    metrics: Option<Destination>,
    traces: Option<Destination>,
    headers: HeaderMap,
    /// The headers as gRPC metadata.
    metadata: MetadataMap,
    config: OtlpConfig,
    stats: Arc<CollectorStats>,
    spool: Option<Arc<Spool>>,
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
    /// Sends the batches recovered from the spool, then those queued, one at a time.
    async fn run(self, recovered: Vec<Batch>, mut batches: mpsc::Receiver<Batch>) {
        for batch in recovered {
            self.deliver_and_forget(batch).await;
        }
        while let Some(batch) = batches.recv().await {
            self.stats.otlp_queued.fetch_sub(1, Ordering::Relaxed);
            self.deliver_and_forget(batch).await;
        }
    }

    /// Delivers `batch`, then deletes it from the spool: accepted, or dropped for good and
    /// counted. A kill before the delete sends it again after the restart.
    async fn deliver_and_forget(&self, batch: Batch) {
        let spool_id = batch.spool_id;
        self.deliver(batch).await;
        if let (Some(spool), Some(id)) = (&self.spool, spool_id) {
            if let Err(error) = spool.remove(id) {
                self.stats.otlp_spool_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "OTLP spool: cannot delete a delivered batch (it will be sent again after a restart)");
            }
            self.stats.otlp_spool_usage(spool);
        }
    }

    /// Sends one batch, retrying what can be retried; counts how it ended.
    async fn deliver(&self, batch: Batch) {
        let signal = batch.signal();
        let destination = match signal {
            Signal::Metrics => &self.metrics,
            Signal::Spans => &self.traces,
        };
        let Some(destination) = destination else {
            // Unreachable: the exporter queues no batch for a signal without an endpoint.
            return;
        };
        let target = destination.to_string();
        // Encoded (and compressed) once for all attempts.
        let body = match destination {
            Destination::Http(..) => match http_body(&batch, self.config.compression) {
                Ok(body) => body,
                Err(error) => {
                    self.stats.otlp_failures.fetch_add(1, Ordering::Relaxed);
                    self.drop_batch(&target, &batch, &format!("compressing: {error}"));
                    return;
                }
            },
            Destination::Grpc(..) => Bytes::new(),
        };
        let mut backoff = self.config.initial_backoff;
        for attempt in 1..=self.config.max_attempts.max(1) {
            let outcome = match destination {
                Destination::Http(uri, client) => {
                    let post = self.post(client, uri, signal, body.clone());
                    tokio::time::timeout(self.config.timeout, post).await
                }
                Destination::Grpc(_, channel) => {
                    let call = self.call(channel.clone(), &batch);
                    tokio::time::timeout(self.config.timeout, call).await
                }
            };
            let outcome = outcome.unwrap_or_else(|_| Attempt::Retry {
                reason: format!(
                    "no answer within {}",
                    humantime::format_duration(self.config.timeout)
                ),
                after: None,
            });
            match outcome {
                Attempt::Sent { rejected, message } => {
                    let rejected = rejected.min(batch.items);
                    self.stats
                        .otlp_delivered(signal, batch.items - rejected, rejected);
                    if rejected > 0 {
                        tracing::warn!(
                            rejected, %message,
                            "the OTLP receiver rejected {}", signal.items()
                        );
                    }
                    return;
                }
                Attempt::Fail { reason } => {
                    self.stats.otlp_failures.fetch_add(1, Ordering::Relaxed);
                    self.drop_batch(&target, &batch, &reason);
                    return;
                }
                Attempt::Retry { reason, after } => {
                    self.stats.otlp_failures.fetch_add(1, Ordering::Relaxed);
                    if attempt == self.config.max_attempts.max(1) {
                        self.drop_batch(
                            &target,
                            &batch,
                            &format!("{reason} (gave up after {attempt} attempts)"),
                        );
                        return;
                    }
                    let wait = after.unwrap_or(backoff).min(self.config.max_backoff);
                    tracing::warn!(
                        %target, attempt, %reason,
                        "OTLP export failed; retrying in {}", humantime::format_duration(wait)
                    );
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    fn drop_batch(&self, target: &str, batch: &Batch, reason: &str) {
        self.stats.otlp_dropped(batch.signal(), batch.items);
        tracing::error!(
            %target, items = batch.items, %reason,
            "OTLP export failed: {} dropped", batch.signal().items()
        );
    }

    /// One OTLP/gRPC export call.
    async fn call(&self, channel: Channel, batch: &Batch) -> Attempt {
        let gzip = self.config.compression == OtlpCompression::Gzip;
        let answer = match &batch.payload {
            Payload::Metrics(request) => {
                let mut client = MetricsServiceClient::new(channel);
                if gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                client
                    .export(self.grpc_request(request.clone()))
                    .await
                    .map(|answer| {
                        answer
                            .into_inner()
                            .partial_success
                            .map(|partial| (partial.rejected_data_points, partial.error_message))
                    })
            }
            Payload::Spans(request) => {
                let mut client = TraceServiceClient::new(channel);
                if gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                client
                    .export(self.grpc_request(request.clone()))
                    .await
                    .map(|answer| {
                        answer
                            .into_inner()
                            .partial_success
                            .map(|partial| (partial.rejected_spans, partial.error_message))
                    })
            }
        };
        match answer {
            Ok(partial) => {
                let (rejected, message) = partial.unwrap_or_default();
                Attempt::Sent {
                    rejected: u64::try_from(rejected).unwrap_or(0),
                    message,
                }
            }
            Err(status) => grpc_failure(&status),
        }
    }

    fn grpc_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = self.metadata.clone();
        request
    }

    async fn post(&self, client: &HttpsClient, uri: &Uri, signal: Signal, body: Bytes) -> Attempt {
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
        if self.config.compression == OtlpCompression::Gzip {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        headers.extend(self.headers.clone());
        let response = match client.request(request).await {
            Ok(response) => response,
            // A certificate refused, by us or by the receiver, stays refused until someone
            // changes one: retrying would only delay the drop.
            Err(error) if tls_failure(&error).is_some() => {
                return Attempt::Fail {
                    reason: format!("TLS: {} ({})", error_chain(&error), TLS_ADVICE),
                };
            }
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

/// What to check when a TLS handshake fails.
const TLS_ADVICE: &str = "check that --otlp-certificate is the CA that signed the \
                          receiver's certificate, that the endpoint's host name is in that \
                          certificate, and, if the receiver requires client certificates, \
                          --otlp-client-certificate and --otlp-client-key";

/// The TLS error in `error`'s chain, if any. tokio-rustls wraps rustls errors in an
/// `io::Error` (and hyper-rustls wraps that in another), and an `io::Error`'s `source()`
/// skips the error it wraps, so the chain goes through `get_ref` there.
fn tls_failure<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = match error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    None
}

/// The TLS files, read and checked once at start.
struct TlsFiles {
    /// Whether an endpoint is https (the system roots are then needed without a CA).
    https: bool,
    /// The CA's PEM and its certificates; `None`: the system roots.
    ca: Option<(Vec<u8>, Vec<CertificateDer<'static>>)>,
    /// The client certificate's and key's PEM, and what they hold.
    identity: Option<ClientIdentity>,
}

struct ClientIdentity {
    certificate_pem: Vec<u8>,
    key_pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl TlsFiles {
    /// Reads the configured files, refusing what could only fail later: TLS settings with
    /// a plain http:// endpoint, a key without its certificate (or the reverse), a file
    /// that cannot be read or holds no PEM certificate or key.
    fn load(config: &TlsPaths, uri: &Uri) -> Result<Self, String> {
        let any_tls_setting = config.certificate.is_some()
            || config.client_certificate.is_some()
            || config.client_key.is_some();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        if any_tls_setting && !https {
            return Err(format!(
                "OTLP endpoint {uri} is plain http:// but a TLS certificate or key is set: use \
                 an https:// endpoint, or remove the --otlp-certificate/--otlp-client-* \
                 settings (and the OTEL_EXPORTER_OTLP_*CERTIFICATE/_CLIENT_KEY variables)"
            ));
        }
        let read = |what: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|error| {
                format!(
                    "cannot read the OTLP {what} {}: {error}; give a readable PEM file",
                    path.display()
                )
            })
        };
        let certificates = |what: &str, path: &PathBuf, pem: &[u8]| {
            let certificates = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| {
                    format!("OTLP {what} {} is not valid PEM: {error}", path.display())
                })?;
            if certificates.is_empty() {
                return Err(format!(
                    "OTLP {what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    path.display()
                ));
            }
            Ok(certificates)
        };
        let ca = match &config.certificate {
            Some(path) => {
                let pem = read("CA certificate", path)?;
                let certificates = certificates("CA certificate", path, &pem)?;
                Some((pem, certificates))
            }
            None => None,
        };
        let identity = match (&config.client_certificate, &config.client_key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(
                    "--otlp-client-certificate needs its key: set --otlp-client-key \
                            (or OTEL_EXPORTER_OTLP_CLIENT_KEY)"
                        .to_owned(),
                );
            }
            (None, Some(_)) => {
                return Err("--otlp-client-key needs its certificate: set \
                            --otlp-client-certificate (or OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE)"
                    .to_owned());
            }
            (Some(certificate_path), Some(key_path)) => {
                let certificate_pem = read("client certificate", certificate_path)?;
                let chain = certificates("client certificate", certificate_path, &certificate_pem)?;
                let key_pem = read("client key", key_path)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| {
                    format!(
                        "OTLP client key {} holds no usable PEM private key: {error}",
                        key_path.display()
                    )
                })?;
                Some(ClientIdentity {
                    certificate_pem,
                    key_pem,
                    chain,
                    key,
                })
            }
        };
        Ok(Self {
            https,
            ca,
            identity,
        })
    }

    /// The rustls configuration of the OTLP/HTTP client.
    fn rustls(&self) -> Result<rustls::ClientConfig, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some((_, certificates)) => {
                for certificate in certificates {
                    roots.add(certificate.clone()).map_err(|error| {
                        format!("OTLP CA certificate (--otlp-certificate) is unusable: {error}")
                    })?;
                }
            }
            None => {
                // Unreadable system certificates are skipped, as by every TLS client.
                let native = rustls_native_certs::load_native_certs();
                let (usable, _) = roots.add_parsable_certificates(native.certs);
                // The collector's image (FROM scratch) has no CA bundle: without this check
                // every https request would fail its handshake, far from the cause.
                if usable == 0 && self.https {
                    return Err("an OTLP endpoint is https:// but this system has no root \
                                certificates (the collector's image has none): give the \
                                endpoint's CA with --otlp-certificate (or \
                                OTEL_EXPORTER_OTLP_CERTIFICATE; in the chart, \
                                collector.otlp.tls.secret)"
                        .to_owned());
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS for OTLP: {error}"))?
        .with_root_certificates(roots);
        match &self.identity {
            Some(identity) => builder
                .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                .map_err(|error| {
                    format!("OTLP client certificate and key do not make a usable pair: {error}")
                }),
            None => Ok(builder.with_no_client_auth()),
        }
    }

    /// The same for OTLP/gRPC (tonic builds its own rustls configuration).
    fn tonic(&self) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some((pem, _)) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        if let Some(identity) = &self.identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &identity.certificate_pem,
                &identity.key_pem,
            ));
        }
        tls
    }
}

/// An OTLP/HTTP body: the protobuf, gzipped when so configured.
fn http_body(batch: &Batch, compression: OtlpCompression) -> std::io::Result<Bytes> {
    let protobuf = batch.encode();
    match compression {
        OtlpCompression::None => Ok(Bytes::from(protobuf)),
        OtlpCompression::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(protobuf.len() / 2),
                flate2::Compression::default(),
            );
            encoder.write_all(&protobuf)?;
            encoder.finish().map(Bytes::from)
        }
    }
}

/// Where one signal's requests go.
/// The OTLP/HTTP client: plain http, or https with a signal's TLS settings.
type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

enum Destination {
    /// The URL and a client with that signal's TLS settings (boxed: a client is large).
    Http(Uri, Box<HttpsClient>),
    /// The endpoint (for logs) and its channel.
    Grpc(Uri, Channel),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http(uri, _) => write!(formatter, "{uri}"),
            Self::Grpc(uri, _) => write!(formatter, "{uri} (gRPC)"),
        }
    }
}

/// How a failed gRPC export ends, as the OTLP specification says: these codes are
/// transient and retried (`RESOURCE_EXHAUSTED` only when the server says, with a
/// `RetryInfo`, that a later try can succeed); the others fail at once. A `RetryInfo`
/// delay is waited before the retry.
fn grpc_failure(status: &tonic::Status) -> Attempt {
    // As over HTTP: a refused certificate is not transient.
    if tls_failure(status).is_some() {
        return Attempt::Fail {
            reason: format!("TLS: {} ({})", error_chain(status), TLS_ADVICE),
        };
    }
    let reason = format!("gRPC {:?}: {}", status.code(), status.message());
    let after = retry_delay(status);
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::OutOfRange
        | Code::DataLoss => Attempt::Retry { reason, after },
        Code::ResourceExhausted if after.is_some() => Attempt::Retry { reason, after },
        _ => Attempt::Fail { reason },
    }
}

/// The delay of a `google.rpc.RetryInfo` in the status details, if there is one.
fn retry_delay(status: &tonic::Status) -> Option<Duration> {
    const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";
    let details = RpcStatus::decode(status.details()).ok()?;
    let info = details
        .details
        .iter()
        .find(|detail| detail.type_url == RETRY_INFO)?;
    let delay = RetryInfo::decode(info.value.as_slice()).ok()?.retry_delay?;
    Some(Duration::new(
        u64::try_from(delay.seconds).ok()?,
        u32::try_from(delay.nanos).ok()?,
    ))
}

/// `google.rpc.Status`, `google.protobuf.Any`, `google.rpc.RetryInfo` and
/// `google.protobuf.Duration`: the few fields read from a gRPC error's details (declared
/// here rather than pulling in a crate of all Google's RPC types).
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(message, repeated, tag = "3")]
    details: Vec<RpcAny>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<RpcDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
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
    request_with(aggregates, Temporality::Delta)
}

/// The same with points of `temporality` (cumulative: each aggregate is its series' total).
pub fn request_with(
    aggregates: &[Aggregate],
    temporality: Temporality,
) -> ExportMetricsServiceRequest {
    request_shaped(aggregates, temporality, HistogramAggregation::Exponential)
}

/// The same with duration histograms of `histogram`'s kind.
pub fn request_shaped(
    aggregates: &[Aggregate],
    temporality: Temporality,
    histogram: HistogramAggregation,
) -> ExportMetricsServiceRequest {
    let mut entities: Vec<EntityPoints<'_>> = Vec::new();
    let mut index_of: HashMap<&Subject, usize> = HashMap::new();
    for aggregate in aggregates {
        let index = *index_of.entry(&aggregate.subject).or_insert_with(|| {
            entities.push(EntityPoints {
                subject: &aggregate.subject,
                server_durations: DurationPoints::new(histogram),
                client_durations: DurationPoints::new(histogram),
                responses: Vec::new(),
            });
            entities.len() - 1
        });
        let entity = &mut entities[index];
        let attributes = point_attributes(aggregate);
        let client = aggregate.direction == Direction::Client as i32;
        for (&status_code, status) in &aggregate.statuses {
            let mut attributes = attributes.clone();
            attributes.extend(status_attributes(status_code, client));
            let durations = if client {
                &mut entity.client_durations
            } else {
                &mut entity.server_durations
            };
            durations.push(aggregate, status, attributes);
        }
        for (class, &count) in aggregate.status_class_counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let mut attributes = attributes.clone();
            attributes.push(string_attribute(
                "trazor.direction",
                direction_name(aggregate.direction).to_owned(),
            ));
            attributes.push(string_attribute(
                STATUS_CLASS_ATTRIBUTE,
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
                    metrics: metrics_of(
                        entity.server_durations,
                        entity.client_durations,
                        entity.responses,
                        temporality,
                    ),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

/// One metric's duration data points, of the kind the export was configured for.
enum DurationPoints {
    Exponential(Vec<ExponentialHistogramDataPoint>),
    Explicit(Vec<HistogramDataPoint>),
}

impl DurationPoints {
    fn new(aggregation: HistogramAggregation) -> Self {
        match aggregation {
            HistogramAggregation::Exponential => Self::Exponential(Vec::new()),
            HistogramAggregation::Explicit => Self::Explicit(Vec::new()),
        }
    }

    /// Adds the point of one status's requests in `aggregate`.
    fn push(&mut self, aggregate: &Aggregate, status: &StatusAggregate, attributes: Vec<KeyValue>) {
        match self {
            Self::Exponential(points) => {
                points.push(exponential_point(aggregate, status, attributes))
            }
            Self::Explicit(points) => points.push(explicit_point(aggregate, status, attributes)),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Exponential(points) => points.is_empty(),
            Self::Explicit(points) => points.is_empty(),
        }
    }

    fn into_data(self, aggregation_temporality: i32) -> metric::Data {
        match self {
            Self::Exponential(data_points) => {
                metric::Data::ExponentialHistogram(OtlpExponentialHistogram {
                    data_points,
                    aggregation_temporality,
                })
            }
            Self::Explicit(data_points) => metric::Data::Histogram(OtlpHistogram {
                data_points,
                aggregation_temporality,
            }),
        }
    }
}

/// Nanoseconds as the seconds of a data point.
fn seconds_of(nanos: u64) -> f64 {
    nanos as f64 / seconds::NANOS_PER_SECOND
}

/// A status's min and max in seconds, when it counted a request.
fn min_max_seconds(status: &StatusAggregate) -> (Option<f64>, Option<f64>) {
    if status.count == 0 {
        return (None, None);
    }
    (
        Some(seconds_of(status.min_nanos)),
        Some(seconds_of(status.max_nanos)),
    )
}

/// The duration point of one status's requests in an aggregate: their histogram in seconds
/// ([`seconds::to_seconds`]), with count, sum, min and max in seconds.
fn exponential_point(
    aggregate: &Aggregate,
    status: &StatusAggregate,
    attributes: Vec<KeyValue>,
) -> ExponentialHistogramDataPoint {
    // OTLP wants count = the buckets' total; a window whose histogram could not be merged
    // (another scale) is in the count but not the buckets, so the point says what its
    // buckets hold. A histogram of a scale that cannot be refined (no agent sends one)
    // leaves the point with its count and no buckets.
    let histogram = seconds::to_seconds(&status.histogram);
    let bucket_total = histogram.as_ref().map_or(0, ExponentialHistogram::total);
    let count = if status.unmergeable == 0 && histogram.is_some() {
        status.count
    } else {
        bucket_total
    };
    let histogram = histogram.unwrap_or_default();
    let (min, max) = min_max_seconds(status);
    ExponentialHistogramDataPoint {
        attributes,
        start_time_unix_nano: aggregate.start_unix_nanos,
        time_unix_nano: aggregate.end_unix_nanos,
        count,
        sum: Some(seconds_of(status.sum_nanos)),
        scale: histogram.scale,
        zero_count: 0,
        positive: Some(exponential_histogram_data_point::Buckets {
            offset: histogram.offset,
            bucket_counts: histogram.bucket_counts,
        }),
        negative: None,
        flags: 0,
        exemplars: Vec::new(),
        min,
        max,
        zero_threshold: 0.0,
    }
}

/// The same as an explicit-bucket histogram over [`DURATION_BOUNDARIES`]
/// ([`explicit::bucket_counts`]).
fn explicit_point(
    aggregate: &Aggregate,
    status: &StatusAggregate,
    attributes: Vec<KeyValue>,
) -> HistogramDataPoint {
    let bucket_counts = explicit::bucket_counts(&status.histogram, &DURATION_BOUNDARIES);
    // As for the exponential point: the point says what its buckets hold.
    let count = if status.unmergeable == 0 {
        status.count
    } else {
        bucket_counts.iter().sum()
    };
    let (min, max) = min_max_seconds(status);
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: aggregate.start_unix_nanos,
        time_unix_nano: aggregate.end_unix_nanos,
        count,
        sum: Some(seconds_of(status.sum_nanos)),
        bucket_counts,
        explicit_bounds: DURATION_BOUNDARIES.to_vec(),
        exemplars: Vec::new(),
        flags: 0,
        min,
        max,
    }
}

/// The data points of one entity, on their way into its `ResourceMetrics`.
struct EntityPoints<'a> {
    subject: &'a Subject,
    server_durations: DurationPoints,
    client_durations: DurationPoints,
    responses: Vec<NumberDataPoint>,
}

/// The metrics of one entity: the durations of requests served and made (each only when
/// there are some), and the responses by status class when some request had a status.
fn metrics_of(
    server_durations: DurationPoints,
    client_durations: DurationPoints,
    responses: Vec<NumberDataPoint>,
    temporality: Temporality,
) -> Vec<Metric> {
    let delta = match temporality {
        Temporality::Delta => AggregationTemporality::Delta,
        Temporality::Cumulative => AggregationTemporality::Cumulative,
    } as i32;
    let duration = |name: &str, description: &str, points: DurationPoints| Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: "s".to_owned(),
        metadata: Vec::new(),
        data: Some(points.into_data(delta)),
    };
    let mut metrics = Vec::with_capacity(3);
    if !server_durations.is_empty() {
        metrics.push(duration(
            SERVER_DURATION_METRIC,
            "Duration of HTTP server requests, measured in the kernel by Trazor: first byte \
             of the request received to the response's status line sent.",
            server_durations,
        ));
    }
    if !client_durations.is_empty() {
        metrics.push(duration(
            CLIENT_DURATION_METRIC,
            "Duration of HTTP client requests, measured in the kernel by Trazor: request \
             line sent to the response's status line received.",
            client_durations,
        ));
    }
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

/// The HTTP semantic conventions' method value: the kernel's method names are the
/// conventions' known methods, and a method it does not recognise (`OTHER`) is `_OTHER`.
fn semconv_method(method: &str) -> &str {
    if method == "OTHER" { "_OTHER" } else { method }
}

/// What a data point measures within its entity, under the HTTP semantic conventions'
/// keys: `http.request.method`, `url.scheme` (`http`: the kernel reads requests off
/// sockets in plain text, so a request it parsed was not inside TLS), and server side
/// `http.route`, client side `server.address`/`server.port` (the peer's IP address, as
/// the conventions say when no host name is known) and `url.template` (the route the
/// agent folded the path into). And `trazor.profile`. The status is each point's own
/// ([`status_attributes`]). Who was measured is the resource's ([`subject_resource`]).
fn point_attributes(aggregate: &Aggregate) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(6);
    if !aggregate.method.is_empty() {
        attributes.push(string_attribute(
            "http.request.method",
            semconv_method(&aggregate.method).to_owned(),
        ));
    }
    attributes.push(string_attribute("url.scheme", "http".to_owned()));
    let client = aggregate.direction == Direction::Client as i32;
    if !aggregate.route.is_empty() {
        let key = if client { "url.template" } else { "http.route" };
        attributes.push(string_attribute(key, aggregate.route.clone()));
    }
    if let Some(peer) = aggregate.peer.as_ref().filter(|_| client) {
        attributes.push(string_attribute("server.address", peer.address.clone()));
        attributes.push(int_attribute("server.port", i64::from(peer.port)));
    }
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
    attributes.extend(telemetry_sdk());
    attributes
}

/// What produced the telemetry, as every OTel resource says (`telemetry.sdk.*`): Trazor's
/// collector, in Rust, at its version. `service.instance.id` is not here: a metrics
/// resource is a whole service (every pod of a workload, on every node), not an instance;
/// a span's resource adds it ([`window_resource`]).
fn telemetry_sdk() -> [KeyValue; 3] {
    [
        string_attribute("telemetry.sdk.name", "trazor".to_owned()),
        string_attribute("telemetry.sdk.language", "rust".to_owned()),
        string_attribute(
            "telemetry.sdk.version",
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ]
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
/// trace: Trazor sees requests, not their propagation. Spans follow the HTTP span
/// conventions ([`http_span`]).
pub fn spans_of(window: &LatencyWindow) -> ExportTraceServiceRequest {
    let subject = Subject::of(window);
    let spans = window
        .exemplars
        .iter()
        .map(|exemplar| http_span(window, exemplar))
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

/// Whether a response of `status` is an error under the HTTP conventions: a 5xx served, or
/// a 4xx or 5xx received by a client (a server's 4xx is the client's error).
fn is_error_status(status: u32, client: bool) -> bool {
    status >= 500 || (client && status >= 400)
}

/// `http.response.status_code` (unless unknown, 0) and, for an error
/// ([`is_error_status`]), `error.type` the code as a string, as the HTTP conventions set
/// them on both the duration metrics and the spans.
fn status_attributes(status: u32, client: bool) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(2);
    if status != 0 {
        attributes.push(int_attribute(
            "http.response.status_code",
            i64::from(status),
        ));
        if is_error_status(status, client) {
            attributes.push(string_attribute("error.type", status.to_string()));
        }
    }
    attributes
}

/// One request as an HTTP span, after the HTTP span conventions: kind server or client;
/// named `{method} {route}` (`{method}` alone without a route: a raw path would make
/// names unbounded; `HTTP` for a method the kernel does not know); `http.request.method`
/// (`_OTHER` for such a method), `http.response.status_code` when a status line was seen;
/// server side `url.scheme`, `url.path` and `http.route`; client side `server.address`,
/// `server.port`, `url.full` (the peer's address, as no host name is known) and
/// `url.template`. Status Error, with `error.type` the code, for a 5xx served, or a 4xx or
/// 5xx received by a client (the spec leaves a server's 4xx unset: the client erred);
/// otherwise unset.
fn http_span(window: &LatencyWindow, exemplar: &trazor_proto::v1::Exemplar) -> Span {
    let client = window.direction == Direction::Client as i32;
    let method = if exemplar.method.is_empty() {
        window.method.as_str()
    } else {
        exemplar.method.as_str()
    };
    let method = semconv_method(method);
    let mut attributes = Vec::with_capacity(10);
    if !method.is_empty() {
        attributes.push(string_attribute("http.request.method", method.to_owned()));
    }
    let status = exemplar.status_code;
    let peer = window.peer.as_ref().filter(|_| client);
    if client {
        if let Some(peer) = peer {
            attributes.push(string_attribute("server.address", peer.address.clone()));
            attributes.push(int_attribute("server.port", i64::from(peer.port)));
            // An IPv6 address is bracketed in a URL.
            let host = if peer.address.contains(':') {
                format!("[{}]", peer.address)
            } else {
                peer.address.clone()
            };
            attributes.push(string_attribute(
                "url.full",
                format!("http://{host}:{}{}", peer.port, exemplar.path),
            ));
        }
        if !window.route.is_empty() {
            attributes.push(string_attribute("url.template", window.route.clone()));
        }
    } else {
        attributes.push(string_attribute("url.scheme", "http".to_owned()));
        attributes.push(string_attribute("url.path", exemplar.path.clone()));
        if !window.route.is_empty() {
            attributes.push(string_attribute("http.route", window.route.clone()));
        }
    }
    let error = is_error_status(status, client);
    attributes.extend(status_attributes(status, client));
    attributes.push(int_attribute("thread.id", i64::from(exemplar.tid)));
    if !window.profile.is_empty() {
        attributes.push(string_attribute("trazor.profile", window.profile.clone()));
    }
    let name = match (method, window.route.is_empty()) {
        ("_OTHER" | "", _) => "HTTP".to_owned(),
        (method, true) => method.to_owned(),
        (method, false) => format!("{method} {}", window.route),
    };
    Span {
        trace_id: rand::random::<[u8; 16]>().to_vec(),
        span_id: rand::random::<[u8; 8]>().to_vec(),
        name,
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
        status: Some(Status {
            message: String::new(),
            code: if error {
                SpanStatus::Error
            } else {
                SpanStatus::Unset
            } as i32,
        }),
        ..Default::default()
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

    /// An entity's resource: `entity`, then the `telemetry.sdk.*` keys.
    fn entity(entity: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut attributes = pairs(entity);
        attributes.extend(pairs(&[
            ("telemetry.sdk.name", "trazor"),
            ("telemetry.sdk.language", "rust"),
            ("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
        ]));
        attributes
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
                entity(&[
                    ("service.name", "checkout"),
                    ("service.namespace", "shop"),
                    ("k8s.namespace.name", "shop"),
                    ("k8s.deployment.name", "checkout"),
                    ("trazor.workload.kind", "Deployment"),
                    ("trazor.workload.name", "checkout"),
                ]),
                entity(&[
                    ("service.name", "nginx"),
                    ("process.executable.name", "nginx"),
                ]),
                entity(&[
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
                assert_eq!(
                    (metrics[0].name.as_str(), metrics[0].unit.as_str()),
                    (SERVER_DURATION_METRIC, "s")
                );
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
                ("http.request.method", "GET"),
                ("url.scheme", "http"),
                ("http.route", route),
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

    /// A window of `route` from `pod` with requests of each `(status, [latency ns])`,
    /// split by status as an agent sends it (one status: compact).
    fn window_by_status(
        pod: &str,
        direction: Direction,
        statuses: &[(u32, &[u64])],
    ) -> LatencyWindow {
        let histogram_of = |latencies: &[u64]| {
            let mut buckets = std::collections::BTreeMap::new();
            for &latency in latencies {
                *buckets
                    .entry(seconds::kernel_buckets::bucket_index(latency).unwrap())
                    .or_insert(0u64) += 1;
            }
            ExponentialHistogram::from_sparse(6, &buckets).unwrap()
        };
        let all: Vec<u64> = statuses
            .iter()
            .flat_map(|(_, latencies)| latencies.iter().copied())
            .collect();
        let mut window = window(
            "/pay",
            pod_source(pod, "app", Some(("Deployment", "checkout"))),
        );
        window.direction = direction as i32;
        window.stats = Some(trazor_proto::v1::LatencyStats {
            count: all.len() as u64,
            sum_nanos: all.iter().sum(),
            min_nanos: *all.iter().min().unwrap(),
            max_nanos: *all.iter().max().unwrap(),
            ..Default::default()
        });
        window.histogram = Some(histogram_of(&all));
        window.statuses = statuses
            .iter()
            .map(
                |&(status_code, latencies)| trazor_proto::v1::StatusLatency {
                    status_code,
                    count: latencies.len() as u64,
                    sum_nanos: latencies.iter().sum(),
                    min_nanos: *latencies.iter().min().unwrap(),
                    max_nanos: *latencies.iter().max().unwrap(),
                    histogram: Some(histogram_of(latencies)),
                },
            )
            .collect();
        if let [only] = window.statuses.as_mut_slice() {
            *only = trazor_proto::v1::StatusLatency {
                status_code: only.status_code,
                count: only.count,
                ..Default::default()
            };
        }
        window
    }

    /// (status code, error.type, count, sum s, min s, max s, bucket total) of each point.
    type StatusPoint = (String, Option<String>, u64, f64, f64, f64, u64);

    fn status_points(request: &ExportMetricsServiceRequest, metric: &str) -> Vec<StatusPoint> {
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let found = metrics.iter().find(|m| m.name == metric).unwrap();
        let Some(metric::Data::ExponentialHistogram(histogram)) = &found.data else {
            panic!("not a histogram: {found:?}");
        };
        histogram
            .data_points
            .iter()
            .map(|point| {
                let attributes = strings(&point.attributes);
                let value = |key: &str| {
                    attributes
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.clone())
                };
                (
                    value("http.response.status_code").unwrap_or_default(),
                    value("error.type"),
                    point.count,
                    point.sum.unwrap(),
                    point.min.unwrap(),
                    point.max.unwrap(),
                    point.positive.as_ref().unwrap().bucket_counts.iter().sum(),
                )
            })
            .collect()
    }

    #[test]
    fn duration_points_are_split_by_status_code_exactly() {
        // Two pods of one Deployment: their windows merge, status by status.
        let first = window_by_status(
            "checkout-1",
            Direction::Server,
            &[
                (200, &[1_000_000, 2_000_000, 3_000_000]),
                (503, &[40_000_000]),
            ],
        );
        let second = window_by_status("checkout-2", Direction::Server, &[(200, &[5_000_000])]);
        let mut aggregate = Aggregate::of_window(&first);
        aggregate.add(&second);
        let points = status_points(&request_of(&[aggregate]), SERVER_DURATION_METRIC);
        assert_eq!(
            points,
            vec![
                ("200".into(), None, 4, 0.011, 0.001, 0.005, 4),
                ("503".into(), Some("503".into()), 1, 0.04, 0.04, 0.04, 1),
            ]
        );
        // Client side a 4xx is an error too; a window without a breakdown (an older agent)
        // is one point with no status code.
        let client = window_by_status(
            "checkout-1",
            Direction::Client,
            &[(200, &[1_000_000]), (404, &[2_000_000, 2_000_000])],
        );
        let mut older = client.clone();
        older.statuses.clear();
        let client_points = |window: &LatencyWindow| {
            status_points(
                &request_of(&[Aggregate::of_window(window)]),
                CLIENT_DURATION_METRIC,
            )
        };
        assert_eq!(
            client_points(&client),
            vec![
                ("200".into(), None, 1, 0.001, 0.001, 0.001, 1),
                ("404".into(), Some("404".into()), 2, 0.004, 0.002, 0.002, 2),
            ]
        );
        assert_eq!(
            client_points(&older),
            vec![(String::new(), None, 3, 0.005, 0.001, 0.002, 3)]
        );
    }

    #[test]
    fn client_points_name_their_server_and_durations_are_in_seconds() {
        let mut made = window("/stock/{id}", pod_source("checkout-1", "app", None));
        made.direction = Direction::Client as i32;
        made.method = "OTHER".into();
        made.peer = Some(trazor_proto::v1::Peer {
            address: "10.0.0.7".into(),
            port: 8080,
        });
        made.stats = Some(trazor_proto::v1::LatencyStats {
            count: 1,
            sum_nanos: 2_400_000,
            min_nanos: 2_400_000,
            max_nanos: 2_400_000,
            ..Default::default()
        });
        made.histogram = Some(ExponentialHistogram {
            scale: 6,
            offset: 1_356,
            bucket_counts: vec![1],
        });
        let mut served = window("/cart/{id}", pod_source("checkout-1", "app", None));
        served.histogram = made.histogram.clone();
        served.stats = made.stats.clone();
        let request = request_of(&[Aggregate::of_window(&made), Aggregate::of_window(&served)]);
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let names: Vec<_> = metrics
            .iter()
            .map(|metric| (metric.name.as_str(), metric.unit.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                (SERVER_DURATION_METRIC, "s"),
                (CLIENT_DURATION_METRIC, "s"),
                (RESPONSES_METRIC, "{request}")
            ]
        );
        let Some(metric::Data::ExponentialHistogram(client)) = &metrics[1].data else {
            panic!("not a histogram: {:?}", metrics[1]);
        };
        let point = &client.data_points[0];
        assert_eq!(
            strings(&point.attributes),
            pairs(&[
                ("http.request.method", "_OTHER"),
                ("url.scheme", "http"),
                ("url.template", "/stock/{id}"),
                ("server.address", "10.0.0.7"),
                ("server.port", "8080"),
            ])
        );
        assert_eq!(point.sum, Some(0.0024));
        assert_eq!((point.min, point.max), (Some(0.0024), Some(0.0024)));
        // Kernel bucket 1356 (ns, scale 6) is scale-8 bucket 4 * 1356 - 7652 in seconds.
        assert_eq!(point.scale, 8);
        let buckets = point.positive.as_ref().unwrap();
        assert_eq!(
            (buckets.offset, &buckets.bucket_counts[..]),
            (-2_228, &[1][..])
        );
        // Responses carry the direction and the class, under Trazor's keys.
        let Some(metric::Data::Sum(responses)) = &metrics[2].data else {
            panic!("not a sum: {:?}", metrics[2]);
        };
        let classes: Vec<_> = responses
            .data_points
            .iter()
            .map(|point| {
                strings(&point.attributes)
                    .into_iter()
                    .filter(|(key, _)| key.starts_with("trazor."))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            classes,
            vec![
                pairs(&[
                    ("trazor.direction", "client"),
                    ("trazor.http.response.status_class", "2xx")
                ]),
                pairs(&[
                    ("trazor.direction", "server"),
                    ("trazor.http.response.status_class", "2xx")
                ]),
            ]
        );
    }

    #[test]
    fn every_metric_says_its_temporality() {
        let aggregates = [Aggregate::of_window(&window(
            "/a",
            pod_source("p", "c", None),
        ))];
        for (temporality, expected) in [
            (Temporality::Delta, AggregationTemporality::Delta),
            (Temporality::Cumulative, AggregationTemporality::Cumulative),
        ] {
            let request = request_with(&aggregates, temporality);
            let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
            assert_eq!(metrics.len(), 2);
            for metric in metrics {
                let said = match &metric.data {
                    Some(metric::Data::ExponentialHistogram(histogram)) => {
                        histogram.aggregation_temporality
                    }
                    Some(metric::Data::Sum(sum)) => sum.aggregation_temporality,
                    other => panic!("{other:?}"),
                };
                assert_eq!(said, expected as i32, "{}", metric.name);
            }
        }
    }

    #[test]
    fn a_client_to_two_servers_is_two_aggregates() {
        let merger = crate::merge::WindowMerger::new(Duration::from_secs(1));
        for address in ["10.0.0.7", "10.0.0.8", "10.0.0.7"] {
            let mut made = window("/stock/{id}", pod_source("checkout-1", "app", None));
            made.direction = Direction::Client as i32;
            made.peer = Some(trazor_proto::v1::Peer {
                address: address.into(),
                port: 80,
            });
            merger.accept(&made, 0);
        }
        let closed = merger.close_due(u64::MAX);
        let mut peers: Vec<_> = closed
            .iter()
            .map(|aggregate| (aggregate.peer.clone().unwrap().address, aggregate.windows))
            .collect();
        peers.sort();
        assert_eq!(
            peers,
            vec![("10.0.0.7".to_owned(), 2), ("10.0.0.8".to_owned(), 1)]
        );
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
                ("telemetry.sdk.name", "trazor"),
                ("telemetry.sdk.language", "rust"),
                ("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
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
                ("telemetry.sdk.name", "trazor"),
                ("telemetry.sdk.language", "rust"),
                ("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
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
                ("telemetry.sdk.name", "trazor"),
                ("telemetry.sdk.language", "rust"),
                ("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
                ("process.pid", "9"),
                ("k8s.node.name", "host-1"),
            ])
        );
    }

    /// The one span of `window` with one exemplar of `method`, `status` and path `/s/1`.
    fn one_span(window: &mut LatencyWindow, method: &str, status: u32) -> Span {
        window.exemplars = vec![trazor_proto::v1::Exemplar {
            start_unix_nanos: 100,
            duration_nanos: 50,
            method: method.into(),
            status_code: status,
            path: "/s/1".into(),
            tid: 7,
        }];
        spans_of(window).resource_spans[0].scope_spans[0].spans[0].clone()
    }

    #[test]
    fn spans_follow_the_http_span_conventions() {
        let mut served = window("/s/{id}", pod_source("p", "c", None));
        let span = one_span(&mut served, "GET", 503);
        assert_eq!(span.name, "GET /s/{id}");
        assert_eq!(span.kind, SpanKind::Server as i32);
        assert_eq!(span.status.as_ref().unwrap().code, SpanStatus::Error as i32);
        assert_eq!(
            (span.start_time_unix_nano, span.end_time_unix_nano),
            (100, 150)
        );
        assert_eq!(
            strings(&span.attributes),
            pairs(&[
                ("http.request.method", "GET"),
                ("url.scheme", "http"),
                ("url.path", "/s/1"),
                ("http.route", "/s/{id}"),
                ("http.response.status_code", "503"),
                ("error.type", "503"),
                ("thread.id", "7"),
            ])
        );
        // A server's 4xx is the client's error: unset, no error.type.
        let span = one_span(&mut served, "GET", 404);
        assert_eq!(span.status.as_ref().unwrap().code, SpanStatus::Unset as i32);
        assert!(
            !strings(&span.attributes)
                .iter()
                .any(|(key, _)| key == "error.type")
        );
        // No route: the method alone (never the raw path); an unknown method: HTTP.
        let mut bare = window("", pod_source("p", "c", None));
        assert_eq!(one_span(&mut bare, "PUT", 200).name, "PUT");
        let span = one_span(&mut bare, "OTHER", 200);
        assert_eq!(span.name, "HTTP");
        assert_eq!(
            strings(&span.attributes)[0],
            pairs(&[("http.request.method", "_OTHER")])[0]
        );
        // No status line seen: no status code, status unset.
        let span = one_span(&mut bare, "GET", 0);
        assert!(
            !strings(&span.attributes)
                .iter()
                .any(|(key, _)| key == "http.response.status_code")
        );
        assert_eq!(span.status.as_ref().unwrap().code, SpanStatus::Unset as i32);

        // A client: its server, the full URL, and 4xx is an error too.
        let mut made = window("/stock/{id}", pod_source("p", "c", None));
        made.direction = Direction::Client as i32;
        made.peer = Some(trazor_proto::v1::Peer {
            address: "fd00::7".into(),
            port: 8080,
        });
        let span = one_span(&mut made, "POST", 404);
        assert_eq!(span.name, "POST /stock/{id}");
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(span.status.as_ref().unwrap().code, SpanStatus::Error as i32);
        assert_eq!(
            strings(&span.attributes),
            pairs(&[
                ("http.request.method", "POST"),
                ("server.address", "fd00::7"),
                ("server.port", "8080"),
                ("url.full", "http://[fd00::7]:8080/s/1"),
                ("url.template", "/stock/{id}"),
                ("http.response.status_code", "404"),
                ("error.type", "404"),
                ("thread.id", "7"),
            ])
        );
        let span = one_span(&mut made, "POST", 302);
        assert_eq!(span.status.as_ref().unwrap().code, SpanStatus::Unset as i32);
    }

    #[test]
    fn endpoints_are_checked_with_clear_errors() {
        let uri = OtlpConfig::new("http://otel-collector:4318/")
            .signal_uri(Signal::Metrics)
            .unwrap();
        assert_eq!(
            uri.unwrap().to_string(),
            "http://otel-collector:4318/v1/metrics"
        );
        for (endpoint, says) in [
            ("otel:4318", "must start with http://"),
            ("http://", "not a URL"),
            ("HTTP://otel:4318", "must start with http://"),
            ("http://exa mple", "not a URL"),
        ] {
            let error = OtlpConfig::new(endpoint)
                .signal_uri(Signal::Metrics)
                .unwrap_err();
            assert!(error.contains(says), "{endpoint}: {error}");
        }
    }

    #[test]
    fn https_endpoints_keep_their_scheme() {
        let uri = OtlpConfig::new("https://otel:4318").signal_uri(Signal::Spans);
        assert_eq!(
            uri.unwrap().unwrap().to_string(),
            "https://otel:4318/v1/traces"
        );
    }

    #[test]
    fn tls_variables_are_read_and_flags_win() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel:4318"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/tls/ca.crt"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/tls/tls.crt"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/tls/tls.key"),
        ];
        let config = resolve(OtlpSettings::default(), &env).unwrap().unwrap();
        assert_eq!(config.certificate, Some(PathBuf::from("/tls/ca.crt")));
        assert_eq!(
            config.client_certificate,
            Some(PathBuf::from("/tls/tls.crt"))
        );
        assert_eq!(config.client_key, Some(PathBuf::from("/tls/tls.key")));
        let flags = OtlpSettings {
            certificate: Some("/flag/ca.pem".into()),
            ..OtlpSettings::default()
        };
        let config = resolve(flags, &env).unwrap().unwrap();
        assert_eq!(config.certificate, Some(PathBuf::from("/flag/ca.pem")));
    }

    #[test]
    fn a_signal_tls_variable_wins_over_the_generic_one_for_that_signal_alone() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel:4318"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/generic/ca.crt"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/generic/tls.crt"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/generic/tls.key"),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/tempo/ca.crt"),
            (
                "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE",
                "/mimir/tls.crt",
            ),
            ("OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY", "/mimir/tls.key"),
        ];
        let config = resolve(OtlpSettings::default(), &env).unwrap().unwrap();
        let paths = |ca: &str, certificate: &str, key: &str| TlsPaths {
            certificate: Some(PathBuf::from(ca)),
            client_certificate: Some(PathBuf::from(certificate)),
            client_key: Some(PathBuf::from(key)),
        };
        assert_eq!(
            config.signal_tls(Signal::Metrics),
            paths("/generic/ca.crt", "/mimir/tls.crt", "/mimir/tls.key")
        );
        assert_eq!(
            config.signal_tls(Signal::Spans),
            paths("/tempo/ca.crt", "/generic/tls.crt", "/generic/tls.key")
        );
        // The other three, the other way round.
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel:4318"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/generic/ca.crt"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/generic/tls.crt"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/generic/tls.key"),
            ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "/mimir/ca.crt"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                "/tempo/tls.crt",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/tempo/tls.key"),
        ];
        let config = resolve(OtlpSettings::default(), &env).unwrap().unwrap();
        assert_eq!(
            config.signal_tls(Signal::Metrics),
            paths("/mimir/ca.crt", "/generic/tls.crt", "/generic/tls.key")
        );
        assert_eq!(
            config.signal_tls(Signal::Spans),
            paths("/generic/ca.crt", "/tempo/tls.crt", "/tempo/tls.key")
        );
    }

    #[test]
    fn tls_settings_that_cannot_work_are_refused_at_start() {
        let directory =
            std::env::temp_dir().join(format!("trazor-otlp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let not_pem = directory.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let missing = directory.join("missing.pem");
        let load = |config: OtlpConfig| {
            let uri = config.signal_uri(Signal::Metrics).unwrap().unwrap();
            TlsFiles::load(&config.signal_tls(Signal::Metrics), &uri).map(|_| ())
        };
        let https = || OtlpConfig::new("https://otel:4318");
        for (config, says) in [
            (
                OtlpConfig {
                    certificate: Some(not_pem.clone()),
                    ..OtlpConfig::new("http://otel:4318")
                },
                "is plain http:// but a TLS certificate or key is set: use an https:// endpoint",
            ),
            (
                OtlpConfig {
                    certificate: Some(missing.clone()),
                    ..https()
                },
                "cannot read the OTLP CA certificate",
            ),
            (
                OtlpConfig {
                    certificate: Some(not_pem.clone()),
                    ..https()
                },
                "holds no PEM certificate",
            ),
            (
                OtlpConfig {
                    client_key: Some(not_pem.clone()),
                    ..https()
                },
                "--otlp-client-key needs its certificate",
            ),
            (
                OtlpConfig {
                    client_certificate: Some(not_pem.clone()),
                    ..https()
                },
                "--otlp-client-certificate needs its key",
            ),
        ] {
            let error = load(config).unwrap_err();
            assert!(error.contains(says), "{error}");
        }
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// The URLs each signal goes to.
    fn uris(config: &OtlpConfig) -> (Option<String>, Option<String>) {
        let uri = |signal| {
            config
                .signal_uri(signal)
                .unwrap()
                .map(|uri: Uri| uri.to_string())
        };
        (uri(Signal::Metrics), uri(Signal::Spans))
    }

    #[test]
    fn signal_endpoints_are_used_as_they_are_and_the_generic_one_gets_the_path() {
        let both = |metrics: &str, traces: &str| (Some(metrics.into()), Some(traces.into()));
        let mut config = OtlpConfig::new("http://otel:4318");
        assert_eq!(
            uris(&config),
            both("http://otel:4318/v1/metrics", "http://otel:4318/v1/traces")
        );
        config.traces_endpoint = Some("http://tempo:4318/v1/traces".into());
        config.metrics_endpoint = Some("http://mimir:9009/otlp/v1/metrics".into());
        assert_eq!(
            uris(&config),
            both(
                "http://mimir:9009/otlp/v1/metrics",
                "http://tempo:4318/v1/traces"
            )
        );
        // One signal only.
        let config = OtlpConfig {
            traces_endpoint: Some("http://tempo:4318/v1/traces".into()),
            ..OtlpConfig::default()
        };
        assert_eq!(
            uris(&config),
            (None, Some("http://tempo:4318/v1/traces".into()))
        );
        // A signal's own protocol: spans over gRPC get the endpoint as it is, metrics over
        // HTTP the path.
        let config = OtlpConfig {
            traces_protocol: Some(OtlpProtocol::Grpc),
            ..OtlpConfig::new("http://otel:4318")
        };
        assert_eq!(
            uris(&config),
            both("http://otel:4318/v1/metrics", "http://otel:4318/")
        );
        // gRPC: no path, whatever the endpoint.
        let config = OtlpConfig {
            protocol: OtlpProtocol::Grpc,
            ..OtlpConfig::new("http://otel:4317")
        };
        assert_eq!(
            uris(&config),
            both("http://otel:4317/", "http://otel:4317/")
        );
    }

    /// Resolves `flags` against the variables `env`.
    fn resolve(flags: OtlpSettings, env: &[(&str, &str)]) -> Result<Option<OtlpConfig>, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        flags.resolve(|name| env.get(name).cloned())
    }

    #[test]
    fn every_variable_is_read() {
        let config = resolve(
            OtlpSettings::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317"),
                ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://mimir:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://tempo:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-scope-orgid=t1,api-key=k"),
                ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
                (
                    "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                    "cumulative",
                ),
                (
                    "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
                    "explicit_bucket_histogram",
                ),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(config.endpoint.as_deref(), Some("http://otel:4317"));
        assert_eq!(
            config.metrics_endpoint.as_deref(),
            Some("http://mimir:4317")
        );
        assert_eq!(config.traces_endpoint.as_deref(), Some("http://tempo:4317"));
        assert_eq!(config.protocol, OtlpProtocol::Grpc);
        assert_eq!(
            config.signal_protocol(Signal::Metrics),
            OtlpProtocol::HttpProtobuf
        );
        assert_eq!(config.signal_protocol(Signal::Spans), OtlpProtocol::Grpc);
        assert_eq!(config.temporality, Temporality::Cumulative);
        assert_eq!(config.histogram, HistogramAggregation::Explicit);
        // And the traces one, over an HTTP default.
        let traces = resolve(
            OtlpSettings::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                traces.signal_protocol(Signal::Metrics),
                traces.signal_protocol(Signal::Spans)
            ),
            (OtlpProtocol::HttpProtobuf, OtlpProtocol::Grpc)
        );
        assert_eq!(config.compression, OtlpCompression::Gzip);
        assert_eq!(config.timeout, Duration::from_millis(2_500));
        assert_eq!(
            config.headers,
            vec![
                ("x-scope-orgid".to_owned(), "t1".to_owned()),
                ("api-key".to_owned(), "k".to_owned())
            ]
        );
    }

    #[test]
    fn defaults_without_variables_and_no_export_without_an_endpoint() {
        assert!(resolve(OtlpSettings::default(), &[]).unwrap().is_none());
        // Set but empty is unset.
        assert!(
            resolve(
                OtlpSettings::default(),
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]
            )
            .unwrap()
            .is_none()
        );
        let config = resolve(
            OtlpSettings {
                endpoint: Some("http://otel:4318".into()),
                ..OtlpSettings::default()
            },
            &[],
        )
        .unwrap()
        .unwrap();
        assert_eq!(config.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(config.compression, OtlpCompression::None);
        assert_eq!(config.timeout, Duration::from_secs(10));
        assert!(config.headers.is_empty());
        assert_eq!(config.temporality, Temporality::Delta);
        assert_eq!(config.histogram, HistogramAggregation::Exponential);
    }

    #[test]
    fn a_flag_wins_over_its_variable_and_a_signal_endpoint_over_the_generic_one() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env-generic:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://env-tempo:4318/v1/traces",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "100"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "from=env"),
        ];
        let flags = OtlpSettings {
            endpoint: Some("http://flag-generic:4318".into()),
            metrics_endpoint: None,
            traces_endpoint: None,
            protocol: Some("http/protobuf".into()),
            compression: Some("none".into()),
            timeout: Some("3s".into()),
            headers: vec!["from=flag".into()],
            ..OtlpSettings::default()
        };
        let config = resolve(flags.clone(), &env).unwrap().unwrap();
        assert_eq!(config.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(config.compression, OtlpCompression::None);
        assert_eq!(config.timeout, Duration::from_secs(3));
        assert_eq!(config.headers, vec![("from".to_owned(), "flag".to_owned())]);
        // The traces variable beats the generic flag; metrics fall back to the generic flag.
        assert_eq!(
            uris(&config),
            (
                Some("http://flag-generic:4318/v1/metrics".into()),
                Some("http://env-tempo:4318/v1/traces".into())
            )
        );
        // The traces flag beats the traces variable.
        let config = resolve(
            OtlpSettings {
                traces_endpoint: Some("http://flag-tempo:4318/v1/traces".into()),
                ..flags
            },
            &env,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            uris(&config).1.as_deref(),
            Some("http://flag-tempo:4318/v1/traces")
        );
    }

    #[test]
    fn bad_settings_say_what_is_allowed() {
        for (name, value, says) in [
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "http/json",
                "use http/protobuf or grpc",
            ),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "udp",
                "not one of grpc, http/protobuf",
            ),
            (
                "OTEL_EXPORTER_OTLP_COMPRESSION",
                "zstd",
                "not one of gzip, none",
            ),
            (
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                "soon",
                "neither milliseconds nor a duration",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "0", "more than 0"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "thrift",
                "not one of grpc, http/protobuf",
            ),
            (
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                "monthly",
                "not one of cumulative, delta, lowmemory",
            ),
            (
                "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
                "linear",
                "not one of base2_exponential_bucket_histogram, explicit_bucket_histogram",
            ),
        ] {
            let error = resolve(
                OtlpSettings::default(),
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318"),
                    (name, value),
                ],
            )
            .unwrap_err();
            assert!(error.contains(says), "{name}={value}: {error}");
        }
    }

    #[test]
    fn a_gzip_body_is_the_protobuf_gzipped() {
        let aggregates = vec![Aggregate::of_window(&window(
            "/cart/{id}",
            pod_source("p", "c", None),
        ))];
        let batch = Batch {
            items: points_of(&aggregates),
            payload: Payload::Metrics(request_of(&aggregates)),
            spool_id: None,
        };
        let plain = http_body(&batch, OtlpCompression::None).unwrap();
        assert_eq!(plain, batch.encode());
        let gzipped = http_body(&batch, OtlpCompression::Gzip).unwrap();
        assert_eq!(&gzipped[..2], [0x1f, 0x8b], "no gzip magic");
        let mut unzipped = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&gzipped[..]),
            &mut unzipped,
        )
        .unwrap();
        assert_eq!(unzipped, plain);
    }

    #[test]
    fn grpc_codes_are_retried_as_the_otlp_specification_says() {
        let retried =
            |status: tonic::Status| matches!(grpc_failure(&status), Attempt::Retry { .. });
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::Cancelled,
            Code::OutOfRange,
            Code::DataLoss,
        ] {
            assert!(retried(tonic::Status::new(code, "x")), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::Unimplemented,
            Code::Internal,
            // Without a RetryInfo the server has not said a retry can succeed.
            Code::ResourceExhausted,
        ] {
            assert!(!retried(tonic::Status::new(code, "x")), "{code:?}");
        }
        // With one, it is retried after the delay it gives.
        let details = RpcStatus {
            details: vec![RpcAny {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                value: RetryInfo {
                    retry_delay: Some(RpcDuration {
                        seconds: 2,
                        nanos: 500_000_000,
                    }),
                }
                .encode_to_vec(),
            }],
        };
        let status = tonic::Status::with_details(
            Code::ResourceExhausted,
            "slow down",
            Bytes::from(details.encode_to_vec()),
        );
        match grpc_failure(&status) {
            Attempt::Retry { after, .. } => assert_eq!(after, Some(Duration::from_millis(2_500))),
            _ => panic!("RESOURCE_EXHAUSTED with RetryInfo is not retried"),
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
