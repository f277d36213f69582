//! `trazor-collector`: receives windows from node agents, serves the live feed and exports
//! OTLP metrics.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use trazor_collector::{
    BoundCollector, CollectorConfig, MAX_MESSAGE_BYTES,
    auth::{ServerTls, load_feed_token, load_token},
    feed::FeedConfig,
    limits::AgentLimitConfig,
    otlp::OtlpSettings,
};

/// Receives latency windows from Trazor node agents (gRPC) and publishes them live
/// (WebSocket, JSON) and, with --otlp-endpoint, as OTLP metrics.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Flags {
    /// Address for agents' gRPC streams.
    #[arg(long, default_value = "0.0.0.0:50051")]
    grpc_listen: SocketAddr,
    /// Address for the WebSocket feed (/ws), /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    /// Feed items (windows and aggregates) kept to replay to new subscribers.
    #[arg(long, default_value_t = FeedConfig::default().history)]
    history: usize,
    /// File holding the token that people and programs need to read the live feed and
    /// the dashboard (a Secret separate from the agents'). Without it, the
    /// TRAZOR_FEED_TOKEN environment variable; without either, the feed is open.
    #[arg(long)]
    feed_token_file: Option<PathBuf>,
    /// Feed connections open at once; more are refused with HTTP 503.
    #[arg(long, default_value_t = FeedConfig::default().max_connections)]
    feed_max_connections: usize,
    /// Items queued per feed connection; past it the oldest are dropped (and counted).
    #[arg(long, default_value_t = FeedConfig::default().queue)]
    feed_queue: usize,
    /// Largest frame a feed client may send, in bytes (closed with 1009 above it).
    #[arg(long, default_value_t = FeedConfig::default().max_frame_bytes)]
    feed_max_frame_bytes: usize,
    /// Messages per second a feed client may send (closed with 1008 above it).
    #[arg(long, default_value_t = FeedConfig::default().message_rate)]
    feed_message_rate: f64,
    /// Messages a feed client may send at once above its rate.
    #[arg(long, default_value_t = FeedConfig::default().message_burst)]
    feed_message_burst: f64,
    /// How often the feed pings each client.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    feed_ping_interval: Duration,
    /// How long after a ping a silent client is closed: a dead peer is closed at most
    /// --feed-ping-interval + --feed-pong-timeout after its last frame.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    feed_pong_timeout: Duration,
    /// File holding the bearer token agents must present (e.g. a mounted Secret). Without
    /// it, the TRAZOR_TOKEN environment variable; without either, no authentication.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Largest message accepted from an agent, in bytes.
    #[arg(long, default_value_t = MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Streams one agent id may hold open at once.
    #[arg(long, default_value_t = AgentLimitConfig::default().max_streams)]
    max_streams_per_agent: usize,
    /// Windows per second one agent may send (sustained); 0 for no limit. Above it the
    /// collector reads the agent's stream more slowly: nothing is dropped.
    #[arg(long, default_value_t = AgentLimitConfig::default().windows_per_second)]
    agent_rate: u32,
    /// Windows one agent may send at once above its rate (a backlog after an outage).
    #[arg(long, default_value_t = AgentLimitConfig::default().burst)]
    agent_burst: u32,
    /// How long after a window's end windows of other agents are still merged into its
    /// aggregate; later ones are counted as late.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    late_grace: Duration,
    /// Directory for the journal of accepted windows, so a restart neither loses nor
    /// duplicates any (an emptyDir or volume in Kubernetes), and for the OTLP batches not
    /// yet accepted by the receiver, sent after a restart. Without it, state is in memory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// OTLP batches kept on disk (in --state-dir) at most, in bytes; a batch that would go
    /// over is dropped and counted.
    #[arg(long, default_value_t = trazor_collector::otlp::SPOOL_MAX_BYTES)]
    otlp_spool_max_bytes: u64,
    /// Journal size kept on disk, in bytes.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    state_max_bytes: u64,
    /// fsync the journal before each ack (survives a node crash, not just a process crash).
    #[arg(long)]
    state_fsync: bool,
    /// TLS certificate (PEM) for the gRPC port; with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the gRPC port; with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that agents' client certificates must be signed by: mutual TLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// OTLP endpoint to export closed aggregates (metrics) and exemplars (spans) to, e.g.
    /// http://otel-collector:4318 (OTLP/HTTP: requests go to its /v1/metrics and
    /// /v1/traces) or http://otel-collector:4317 (gRPC). Without any endpoint, no export.
    /// [env: OTEL_EXPORTER_OTLP_ENDPOINT]
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Endpoint of metrics alone, used as it is (e.g. http://mimir:9009/otlp/v1/metrics).
    /// [env: OTEL_EXPORTER_OTLP_METRICS_ENDPOINT]
    #[arg(long)]
    otlp_metrics_endpoint: Option<String>,
    /// Endpoint of spans alone, used as it is (e.g. http://tempo:4318/v1/traces).
    /// [env: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT]
    #[arg(long)]
    otlp_traces_endpoint: Option<String>,
    /// OTLP transport: http/protobuf (the default) or grpc.
    /// [env: OTEL_EXPORTER_OTLP_PROTOCOL]
    #[arg(long)]
    otlp_protocol: Option<String>,
    /// Compression of OTLP requests: gzip or none (the default).
    /// [env: OTEL_EXPORTER_OTLP_COMPRESSION]
    #[arg(long)]
    otlp_compression: Option<String>,
    /// Longest one OTLP request may take: milliseconds, or a duration such as 10s
    /// (default 10000). [env: OTEL_EXPORTER_OTLP_TIMEOUT]
    #[arg(long)]
    otlp_timeout: Option<String>,
    /// Header for OTLP requests, KEY=VALUE (repeat, or a comma-separated list).
    /// [env: OTEL_EXPORTER_OTLP_HEADERS]
    #[arg(long, value_delimiter = ',')]
    otlp_header: Vec<String>,
    /// CA certificates (PEM) an https:// OTLP endpoint's certificate must be signed by,
    /// instead of the system roots. [env: OTEL_EXPORTER_OTLP_CERTIFICATE]
    #[arg(long)]
    otlp_certificate: Option<String>,
    /// Client certificate (PEM) for mutual TLS with the OTLP endpoint; with
    /// --otlp-client-key. [env: OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE]
    #[arg(long)]
    otlp_client_certificate: Option<String>,
    /// Private key (PEM) of --otlp-client-certificate.
    /// [env: OTEL_EXPORTER_OTLP_CLIENT_KEY]
    #[arg(long)]
    otlp_client_key: Option<String>,
    /// Log filter, e.g. `info` or `trazor_collector=debug`.
    #[arg(long, env = "TRAZOR_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&flags.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let token = match load_token(flags.token_file.as_deref()) {
        Ok(token) => token,
        Err(error) => {
            eprintln!("trazor-collector: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let feed_token = match load_feed_token(flags.feed_token_file.as_deref()) {
        Ok(token) => token,
        Err(error) => {
            eprintln!("trazor-collector: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match (&flags.tls_cert, &flags.tls_key) {
        (Some(cert), Some(key)) => {
            match ServerTls::from_files(cert, key, flags.tls_client_ca.as_deref()) {
                Ok(tls) => Some(tls),
                Err(error) => {
                    eprintln!("trazor-collector: error: {error}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    // The endpoints are checked when the collector binds (the exporter starts there).
    let otlp = OtlpSettings {
        endpoint: flags.otlp_endpoint,
        metrics_endpoint: flags.otlp_metrics_endpoint,
        traces_endpoint: flags.otlp_traces_endpoint,
        protocol: flags.otlp_protocol,
        compression: flags.otlp_compression,
        timeout: flags.otlp_timeout,
        headers: flags.otlp_header,
        certificate: flags.otlp_certificate,
        client_certificate: flags.otlp_client_certificate,
        client_key: flags.otlp_client_key,
    }
    .resolve(|name| std::env::var(name).ok());
    let otlp = match otlp {
        Ok(otlp) => otlp,
        Err(error) => {
            eprintln!("trazor-collector: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let config = CollectorConfig {
        grpc_listen: flags.grpc_listen,
        http_listen: flags.http_listen,
        history: flags.history,
        token,
        feed_token,
        feed: FeedConfig {
            history: flags.history,
            queue: flags.feed_queue,
            max_connections: flags.feed_max_connections,
            max_frame_bytes: flags.feed_max_frame_bytes,
            message_rate: flags.feed_message_rate,
            message_burst: flags.feed_message_burst,
            ping_interval: flags.feed_ping_interval,
            pong_timeout: flags.feed_pong_timeout,
        },
        max_message_bytes: flags.max_message_bytes,
        agent_limits: AgentLimitConfig {
            max_streams: flags.max_streams_per_agent,
            windows_per_second: flags.agent_rate,
            burst: flags.agent_burst,
        },
        late_grace: flags.late_grace,
        state_dir: flags.state_dir,
        state_max_bytes: flags.state_max_bytes,
        state_fsync: flags.state_fsync,
        tls,
        otlp,
        otlp_spool_max_bytes: flags.otlp_spool_max_bytes,
    };
    let collector = match BoundCollector::bind(&config).await {
        Ok(collector) => collector,
        Err(error) => {
            eprintln!("trazor-collector: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        grpc = %collector.grpc_addr(),
        feed = %format!("ws://{}/ws", collector.http_addr()),
        "collector serving"
    );
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                eprintln!("trazor-collector: error: cannot handle SIGTERM: {error}");
                return ExitCode::FAILURE;
            }
        };
    tokio::select! {
        result = collector.serve() => {
            if let Err(error) = result {
                eprintln!("trazor-collector: error: {error}");
            }
            ExitCode::FAILURE
        }
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        _ = terminate.recv() => ExitCode::SUCCESS,
    }
}
