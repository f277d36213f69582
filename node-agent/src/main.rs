//! `trazor-node-agent`: traces this host's HTTP servers with eBPF and streams per-window
//! latencies to a Trazor collector.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use trazor_node_agent::AgentConfig;

/// Measures the latency of every HTTP/1.x request served on this host, with eBPF.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Flags {
    /// Collector gRPC address.
    #[arg(
        long,
        env = "TRAZOR_COLLECTOR",
        default_value = "http://127.0.0.1:50051"
    )]
    collector: String,
    /// Window length, 1s to 5m; windows are aligned to the wall clock.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Percentiles to report per window, as fractions.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.95,0.99")]
    percentiles: Vec<f64>,
    /// Node name reported with each window (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Stable agent identity (default: the node name).
    #[arg(long)]
    agent_id: Option<String>,
    /// Unacknowledged windows kept while the collector is unreachable; the oldest is
    /// dropped (and counted) beyond this.
    #[arg(long, default_value_t = 120_000)]
    buffer_windows: usize,
    /// Where tracefs is mounted (the agent mounts it there if it can).
    #[arg(long, default_value = "/sys/kernel/tracing")]
    tracefs: PathBuf,
    /// Log filter, e.g. `info` or `trazor_node_agent=debug`.
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
    let node_name = flags.node_name.unwrap_or_else(host_name);
    let config = AgentConfig {
        collector: flags.collector,
        agent_id: flags.agent_id.unwrap_or_else(|| node_name.clone()),
        node_name,
        window: flags.window,
        quantiles: flags.percentiles,
        buffer_windows: flags.buffer_windows,
        tracefs: flags.tracefs,
    };
    let agent = match trazor_node_agent::start(config).await {
        Ok(agent) => agent,
        Err(error) => {
            eprintln!("trazor-node-agent: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        () = agent.wait() => {
            eprintln!("trazor-node-agent: error: the agent stopped unexpectedly");
            ExitCode::FAILURE
        }
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
