//! Trazor's collector.
//!
//! Agents stream latency windows to the gRPC [`ingest`] service; each window is
//! deduplicated ([`dedup`]) and published, as JSON ([`view`]), on the WebSocket [`feed`]
//! at `/ws`. `/metrics` exports the counters in [`stats`]; `/healthz` answers when serving.

pub mod dedup;
mod error;
pub mod feed;
pub mod ingest;
pub mod stats;
pub mod view;

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, routing::get};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use trazor_proto::v1::latency_ingest_server::LatencyIngestServer;

pub use error::{Error, Result};

use crate::{feed::WindowFeed, ingest::IngestService, stats::CollectorStats};

/// Largest gRPC message accepted from an agent. A window is a few KiB.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct CollectorConfig {
    /// gRPC ingest address.
    pub grpc_listen: SocketAddr,
    /// HTTP address: WebSocket feed, metrics, health.
    pub http_listen: SocketAddr,
    /// Windows kept for new feed subscribers.
    pub history: usize,
}

/// A collector whose sockets are bound (so its addresses are known) but not yet serving.
pub struct BoundCollector {
    grpc: TcpListener,
    http: TcpListener,
    service: IngestService,
}

impl BoundCollector {
    pub async fn bind(config: &CollectorConfig) -> Result<Self> {
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
        let service = IngestService {
            dedup: Default::default(),
            feed: Arc::new(WindowFeed::new(config.history, stats.clone())),
            stats,
        };
        Ok(Self {
            grpc,
            http,
            service,
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
        let grpc = tonic::transport::Server::builder()
            .add_service(
                LatencyIngestServer::new(self.service.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(TcpListenerStream::new(self.grpc));
        let stats = self.service.stats.clone();
        let router = Router::new()
            .route("/ws", get(feed::websocket))
            .with_state(self.service.feed.clone())
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/metrics",
                get(move || {
                    let stats = stats.clone();
                    async move { stats.render() }
                }),
            );
        let http = axum::serve(self.http, router);
        tokio::select! {
            result = grpc => result.map_err(|error| Error::Serve { server: "gRPC", reason: error.to_string() }),
            result = http => result.map_err(|error| Error::Serve { server: "HTTP", reason: error.to_string() }),
        }
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
