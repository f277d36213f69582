//! The agent's main loop: at each window boundary, drain the closed windows from the kernel,
//! attribute and build them, and hand them to the shipper.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::task::JoinHandle;
use trazor_proto::v1::AgentHello;

use crate::{
    Error, Result,
    attribute::{SourceResolver, cgroup2_mount},
    capture::KernelCapture,
    ship::{Outbox, ShipperStats, collector_endpoint, deliver},
    window::WindowBuilder,
};

/// Time after a window's end before it is read: lets a program that computed its window
/// number just before the boundary finish its map update.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Collector gRPC address, e.g. `http://127.0.0.1:50051`.
    pub collector: String,
    /// Node name reported with every window.
    pub node_name: String,
    /// Stable agent identity; defaults to the node name.
    pub agent_id: String,
    /// Window length (1 s to 5 min).
    pub window: Duration,
    /// Quantiles reported per window, each in (0, 1).
    pub quantiles: Vec<f64>,
    /// Unacknowledged windows kept for the collector before the oldest is dropped.
    pub buffer_windows: usize,
    /// Where tracefs is (or is to be) mounted.
    pub tracefs: PathBuf,
}

impl AgentConfig {
    /// Checks ranges, so a bad flag fails at start with a clear message.
    pub fn validate(&self) -> Result<()> {
        if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&self.window) {
            return Err(Error::Config(format!(
                "window {} is out of range: use 1s to 5m",
                humantime::format_duration(self.window)
            )));
        }
        if self.window.subsec_nanos() != 0 {
            return Err(Error::Config(
                "window must be a whole number of seconds, so windows align across nodes".into(),
            ));
        }
        if let Some(bad) = self.quantiles.iter().find(|q| !(**q > 0.0 && **q < 1.0)) {
            return Err(Error::Config(format!(
                "percentile {bad} is out of range: use values between 0 and 1 (exclusive), e.g. 0.99"
            )));
        }
        if self.buffer_windows == 0 {
            return Err(Error::Config(
                "buffer size must be at least 1 window".into(),
            ));
        }
        collector_endpoint(&self.collector)?;
        Ok(())
    }
}

/// A running agent; dropping it stops the agent and detaches the programs.
pub struct RunningAgent {
    pub stats: Arc<ShipperStats>,
    pub outbox: Arc<Outbox>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl RunningAgent {
    /// Waits until the agent stops (it only stops on a fatal error).
    pub async fn wait(mut self) {
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

/// Loads the programs (errors come back here, before anything runs) and starts the loops.
pub async fn start(config: AgentConfig) -> Result<RunningAgent> {
    config.validate()?;
    let endpoint = collector_endpoint(&config.collector)?;
    let mut capture = KernelCapture::load(&config.tracefs)?;
    capture.configure(config.window, true)?;

    let stats = Arc::new(ShipperStats::default());
    let outbox = Arc::new(Outbox::new(config.buffer_windows, stats.clone()));
    let hello = AgentHello {
        node_name: config.node_name.clone(),
        agent_id: config.agent_id.clone(),
        boot_id: boot_id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities: vec!["http1-server".to_owned()],
    };
    tracing::info!(
        node = %config.node_name,
        boot_id = %hello.boot_id,
        window = %humantime::format_duration(config.window),
        "eBPF programs attached; tracing HTTP/1.x servers on this host"
    );
    let shipper = tokio::spawn(deliver(endpoint, hello, outbox.clone()));
    let resolver = SourceResolver::new(config.node_name.clone(), cgroup2_mount());
    let builder = WindowBuilder::new(config.window, config.quantiles.clone());
    let windows = tokio::spawn(close_windows(capture, resolver, builder, outbox.clone()));
    Ok(RunningAgent {
        stats,
        outbox,
        tasks: vec![shipper, windows],
    })
}

async fn close_windows(
    mut capture: KernelCapture,
    mut resolver: SourceResolver,
    builder: WindowBuilder,
    outbox: Arc<Outbox>,
) {
    let window_nanos = builder.window().as_nanos();
    let mut reported_drops: Vec<u64> = Vec::new();
    loop {
        let now = unix_nanos();
        let next_boundary = (now / window_nanos + 1) * window_nanos;
        let wait = Duration::from_nanos((next_boundary - now) as u64) + DRAIN_GRACE;
        tokio::time::sleep(wait).await;

        let open_window = (unix_nanos() / window_nanos) as u32;
        if let Err(error) = capture.refresh_clock() {
            tracing::warn!(%error, "could not refresh the kernel's clock offset");
        }
        let closed = match capture.drain_closed(open_window) {
            Ok(closed) => closed,
            Err(error) => {
                tracing::error!(%error, "reading closed windows failed; retrying next window");
                continue;
            }
        };
        let windows = builder.build(closed, &mut resolver);
        for window in &windows {
            if let (Some(source), Some(stats)) = (&window.source, &window.stats) {
                tracing::debug!(
                    pid = source.pid,
                    process = %source.process_name,
                    cgroup = %source.cgroup_path,
                    count = stats.count,
                    "window closed"
                );
            }
        }
        outbox.push(windows);
        match capture.drop_counts() {
            Ok(drops) => {
                let counts: Vec<u64> = drops.iter().map(|(_, count)| *count).collect();
                if counts != reported_drops {
                    for (reason, count) in &drops {
                        if *count > 0 {
                            tracing::warn!(reason, count, "kernel-side drops (cumulative)");
                        }
                    }
                    reported_drops = counts;
                }
            }
            Err(error) => tracing::warn!(%error, "could not read kernel drop counters"),
        }
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos())
}

/// A fresh random id per process start: sequences restart at 1 under it.
fn boot_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        AgentConfig {
            collector: "http://127.0.0.1:50051".into(),
            node_name: "n".into(),
            agent_id: "n".into(),
            window: Duration::from_secs(10),
            quantiles: vec![0.5, 0.95, 0.99],
            buffer_windows: 100,
            tracefs: "/sys/kernel/tracing".into(),
        }
    }

    #[test]
    fn rejects_out_of_range_settings_with_a_reason() {
        assert!(config().validate().is_ok());
        let short = AgentConfig {
            window: Duration::from_millis(500),
            ..config()
        };
        assert!(
            short
                .validate()
                .unwrap_err()
                .to_string()
                .contains("1s to 5m")
        );
        let fractional = AgentConfig {
            window: Duration::from_millis(1500),
            ..config()
        };
        assert!(fractional.validate().is_err());
        let quantile = AgentConfig {
            quantiles: vec![0.5, 1.5],
            ..config()
        };
        assert!(quantile.validate().unwrap_err().to_string().contains("1.5"));
        let address = AgentConfig {
            collector: "localhost".into(),
            ..config()
        };
        assert!(address.validate().is_err());
    }
}
