//! Trazor's collector.
//!
//! Agents stream latency windows to the gRPC [`ingest`] service, authenticated by a bearer
//! token ([`auth`]) and held to per-agent limits ([`limits`]); each window is deduplicated
//! ([`dedup`]), recorded in the [`journal`] when there is a state dir, merged exactly with
//! the same workload's windows from other agents ([`merge`]), and published, as JSON
//! ([`view`]), on the WebSocket [`feed`] at `/ws`, which the dashboard page at `/` shows.
//! `/metrics` exports the counters in [`stats`]; `/healthz` answers when the process
//! serves, `/readyz` once the journal is replayed and both servers run. With an OTLP
//! endpoint, closed aggregates (and late windows) are also exported as OTLP metrics
//! ([`otlp`]).

pub mod auth;
pub mod dashboard;
pub mod dedup;
mod error;
pub mod feed;
pub mod ingest;
pub mod journal;
pub mod limits;
pub mod merge;
pub mod otlp;
pub mod stats;
pub mod view;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::get};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use trazor_proto::v1::latency_ingest_server::LatencyIngestServer;

pub use error::{Error, Result};

use crate::{
    auth::{BearerAuth, ViewerAuth},
    dedup::Deduplicator,
    feed::WindowFeed,
    ingest::IngestService,
    journal::{Journal, JournalConfig},
    limits::{AgentLimitConfig, AgentLimits},
    merge::WindowMerger,
    otlp::OtlpExporter,
    stats::CollectorStats,
};

/// Default largest gRPC message accepted from an agent. A window is a few KiB.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct CollectorConfig {
    /// gRPC ingest address.
    pub grpc_listen: SocketAddr,
    /// HTTP address: WebSocket feed, metrics, health.
    pub http_listen: SocketAddr,
    /// Items (windows and aggregates) kept for new feed subscribers.
    pub history: usize,
    /// Bearer token agents must present; `None` accepts every agent.
    pub token: Option<String>,
    /// Token to read the live feed and the dashboard (see [`auth::ViewerAuth`]); `None`:
    /// open to everyone who can reach the HTTP port.
    pub feed_token: Option<String>,
    /// The feed's limits and heartbeat (its `history` is [`Self::history`]).
    pub feed: feed::FeedConfig,
    /// Largest message accepted; bigger ones end their stream with RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// Streams per agent id and per-agent rate.
    pub agent_limits: AgentLimitConfig,
    /// How long after a window's end its aggregate stays open for late windows.
    pub late_grace: Duration,
    /// Where the journal lives (see [`journal`]); `None` keeps state in memory only.
    pub state_dir: Option<PathBuf>,
    /// Journal bytes kept on disk at most (four segments).
    pub state_max_bytes: u64,
    /// Sync the journal to disk before every ack.
    pub state_fsync: bool,
    /// TLS (and mTLS) on the gRPC port; `None`: plaintext.
    pub tls: Option<auth::ServerTls>,
    /// Where to export OTLP metrics; `None`: no export.
    pub otlp: Option<otlp::OtlpConfig>,
    /// Bytes of OTLP batches kept on disk (in the state dir) at most.
    pub otlp_spool_max_bytes: u64,
}

impl Default for CollectorConfig {
    /// Loopback on ephemeral ports, no auth, no state dir: for tests and embedding. The
    /// `trazor-collector` binary has its own defaults (see `--help`).
    fn default() -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            grpc_listen: loopback,
            http_listen: loopback,
            history: feed::FeedConfig::default().history,
            token: None,
            feed_token: None,
            feed: feed::FeedConfig::default(),
            max_message_bytes: MAX_MESSAGE_BYTES,
            agent_limits: AgentLimitConfig::default(),
            late_grace: Duration::from_secs(30),
            state_dir: None,
            state_max_bytes: 256 * 1024 * 1024,
            state_fsync: false,
            tls: None,
            otlp: None,
            otlp_spool_max_bytes: otlp::SPOOL_MAX_BYTES,
        }
    }
}

/// A collector whose sockets are bound (so its addresses are known) but not yet serving.
pub struct BoundCollector {
    grpc: TcpListener,
    http: TcpListener,
    service: IngestService,
    config: CollectorConfig,
    ready: Arc<AtomicBool>,
}

impl BoundCollector {
    /// Binds both addresses and, with a state dir, replays the journal: dedup marks, feed
    /// history and open aggregates come back before the first agent is served.
    pub async fn bind(config: &CollectorConfig) -> Result<Self> {
        if config.max_message_bytes < 1024 {
            return Err(Error::Config(format!(
                "max message size {} is too small for a window; use at least 1024 bytes",
                config.max_message_bytes
            )));
        }
        let grpc = TcpListener::bind(config.grpc_listen)
            .await
            .map_err(|source| Error::Listen {
                address: config.grpc_listen,
                flag: "grpc-listen",
                source,
            })?;
        let http = TcpListener::bind(config.http_listen)
            .await
            .map_err(|source| Error::Listen {
                address: config.http_listen,
                flag: "http-listen",
                source,
            })?;
        let stats = Arc::new(CollectorStats::default());
        let otlp = match &config.otlp {
            Some(otlp) => {
                let mut otlp = otlp.clone();
                // With a state dir, batches wait on disk until the receiver accepts them.
                if let Some(dir) = &config.state_dir {
                    otlp.spool = Some(otlp::spool::SpoolConfig {
                        dir: otlp::spool_dir(dir),
                        max_bytes: config.otlp_spool_max_bytes,
                        fsync: config.state_fsync,
                    });
                }
                Some(OtlpExporter::start(otlp, stats.clone()).map_err(Error::Config)?)
            }
            None => None,
        };
        let mut service = IngestService {
            dedup: Arc::new(Deduplicator::default()),
            feed: Arc::new(WindowFeed::new(
                feed::FeedConfig {
                    history: config.history,
                    ..config.feed.clone()
                },
                Arc::new(ViewerAuth::new(config.feed_token.as_deref())),
                stats.clone(),
            )),
            merger: Arc::new(WindowMerger::new(config.late_grace)),
            limits: Arc::new(AgentLimits::new(config.agent_limits)),
            journal: None,
            otlp,
            stats,
        };
        if let Some(dir) = &config.state_dir {
            let state_error = |source| Error::State {
                path: dir.clone(),
                source,
            };
            let (journal, replay) = Journal::open(JournalConfig {
                dir: dir.clone(),
                segment_bytes: (config.state_max_bytes / 4).max(64 * 1024),
                keep_segments: 4,
                fsync: config.state_fsync,
            })
            .map_err(state_error)?;
            service
                .stats
                .journal_truncated
                .store(replay.truncated, Ordering::Relaxed);
            for (agent, boot, highest) in &replay.marks {
                let mark = service.dedup.mark(agent, boot);
                let mut mark = mark.lock();
                *mark = (*mark).max(*highest);
            }
            let now = ingest::unix_nanos();
            // Up to when aggregates were closed (and their OTLP batches spooled) before the
            // restart: a window whose aggregate was still open then is merged again even if
            // its grace ran out while the collector was down, so it is not lost.
            let spool_dir = otlp::spool_dir(dir);
            let closed_through = if config.otlp.is_some() {
                otlp::spool::closed_through(&spool_dir)
            } else {
                // Nothing records closings without export: drop a mark an earlier run left.
                if let Err(error) = otlp::spool::forget_closed_through(&spool_dir) {
                    tracing::warn!(%error, "cannot delete the OTLP spool's closed-through mark");
                }
                None
            };
            let windows = replay.windows.len();
            for (agent, boot, window) in replay.windows {
                if !service.dedup.first_sighting(&agent, &boot, window.sequence) {
                    continue;
                }
                // Aggregates already closed were published before the restart.
                let closes_at = window
                    .end_unix_nanos
                    .saturating_add(config.late_grace.as_nanos() as u64);
                let open_at_stop = closed_through.is_some_and(|through| closes_at >= through);
                if now <= closes_at || open_at_stop {
                    // At most its closing time, so the merger takes it; the first tick
                    // closes it if that time is past.
                    service.merger.accept(&window, now.min(closes_at));
                }
                service.feed.publish_window(
                    &agent.as_str().into(),
                    &boot.as_str().into(),
                    window,
                    false,
                );
            }
            tracing::info!(
                state_dir = %dir.display(), windows, agents = service.dedup.len(),
                "journal replayed"
            );
            service.journal = Some(Arc::new(journal));
        }
        Ok(Self {
            grpc,
            http,
            service,
            config: config.clone(),
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or_else(|_| unspecified())
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or_else(|_| unspecified())
    }

    pub fn stats(&self) -> Arc<CollectorStats> {
        self.service.stats.clone()
    }

    /// Serves until either server fails.
    pub async fn serve(self) -> Result<()> {
        let http_addr = self.http_addr();
        let auth = BearerAuth::new(self.config.token.as_deref(), self.service.stats.clone());
        if self.config.token.is_none() {
            tracing::warn!(
                "no token configured: accepting every agent (set --token-file or TRAZOR_TOKEN)"
            );
        }
        let ingest = LatencyIngestServer::new(self.service.clone())
            .max_decoding_message_size(self.config.max_message_bytes);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.config.tls {
            builder = builder
                .tls_config(tls.server_config())
                .map_err(|error| Error::Config(format!("TLS settings: {error}")))?;
        }
        let grpc = builder
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(InterceptedService::new(ingest, auth))
            .serve_with_incoming(TcpListenerStream::new(self.grpc));
        if self.service.feed.auth().is_open() {
            tracing::warn!(
                "the live feed and dashboard are OPEN: anyone who can reach http://{}/ can \
                 read every window (set --feed-token-file or TRAZOR_FEED_TOKEN)",
                http_addr
            );
        }
        let stats = self.service.stats.clone();
        let feed_for_metrics = self.service.feed.clone();
        let ready = self.ready.clone();
        // The dashboard's routes need a token or a session (see `auth::ViewerAuth`).
        let dashboard_routes = dashboard::routes().layer(axum::middleware::from_fn_with_state(
            self.service.feed.clone(),
            auth::require_viewer,
        ));
        let router = Router::new()
            .merge(dashboard_routes)
            .route("/ws", get(feed::websocket))
            .route("/login", axum::routing::post(auth::login))
            .route("/logout", axum::routing::post(auth::logout))
            .with_state(self.service.feed.clone())
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || {
                    let ready = ready.load(Ordering::Relaxed);
                    async move {
                        if ready {
                            (StatusCode::OK, "ready\n")
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || {
                    let stats = stats.clone();
                    let feed = feed_for_metrics.clone();
                    async move {
                        let mut text = stats.render();
                        text.push_str(&feed.render_metrics());
                        text
                    }
                }),
            );
        // The feed writes frames as items come: without TCP_NODELAY, Nagle's algorithm holds
        // a small frame until the previous one is acknowledged, which clients delay by up
        // to 40 ms (scripts/bench-feed.sh measured a p50 of 42 ms without it, 15-19 ms with).
        let http_listener = axum::serve::ListenerExt::tap_io(self.http, |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY on an HTTP connection");
            }
        });
        let http = axum::serve(http_listener, router);
        let aggregates = publish_aggregates(self.service.clone());
        self.ready.store(true, Ordering::Relaxed);
        let result = tokio::select! {
            result = grpc => result.map_err(|error| Error::Serve { server: "gRPC", reason: error.to_string() }),
            result = http => result.map_err(|error| Error::Serve { server: "HTTP", reason: error.to_string() }),
            () = aggregates => Ok(()),
        };
        self.ready.store(false, Ordering::Relaxed);
        result
    }
}

/// Closes aggregates whose grace period is over and publishes them, every quarter grace
/// (at least every 100 ms, at most every second).
async fn publish_aggregates(service: IngestService) {
    let period =
        (service.merger.grace() / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let stats = &service.stats;
        let now = ingest::unix_nanos();
        let closed = service.merger.close_due(now);
        for aggregate in &closed {
            service.feed.publish_aggregate(aggregate.clone());
            stats.aggregates_published.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(otlp) = &service.otlp {
            otlp.export_closed(closed, now);
        }
        stats
            .aggregates_open
            .store(service.merger.open_len() as u64, Ordering::Relaxed);
        stats
            .dedup_marks
            .store(service.dedup.len() as u64, Ordering::Relaxed);
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
