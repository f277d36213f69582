//! `trazor-collector`: receives windows from node agents and serves the live feed.
use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;
use trazor_collector::{BoundCollector, CollectorConfig};

/// Receives latency windows from Trazor node agents (gRPC) and publishes them live
/// (WebSocket, JSON).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Flags {
    /// Address for agents' gRPC streams.
    #[arg(long, default_value = "0.0.0.0:50051")]
    grpc_listen: SocketAddr,
    /// Address for the WebSocket feed (/ws), /metrics and /healthz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    /// Windows kept to replay to new feed subscribers.
    #[arg(long, default_value_t = 1_000)]
    history: usize,
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
    let config = CollectorConfig {
        grpc_listen: flags.grpc_listen,
        http_listen: flags.http_listen,
        history: flags.history,
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
    tokio::select! {
        result = collector.serve() => {
            if let Err(error) = result {
                eprintln!("trazor-collector: error: {error}");
            }
            ExitCode::FAILURE
        }
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
    }
}
