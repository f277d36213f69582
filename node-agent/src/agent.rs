//! The agent's main loop: at each window boundary, drain the closed windows from the kernel,
//! attribute and build them, and hand them to the shipper.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::task::JoinHandle;
use trazor_proto::v1::AgentHello;

use std::os::unix::fs::MetadataExt as _;

use trazor_node_agent_ebpf_common::RequestEvent;

use crate::{
    Error, Result,
    attribute::{SourceResolver, cgroup2_mount},
    capture::{CaptureSettings, KernelCapture},
    route::{RouteNamer, RouteTemplate},
    ship::{Outbox, ShipperStats, collector_endpoint, deliver},
    window::WindowBuilder,
};

/// How often the kernel's event ring buffer is emptied between window boundaries.
const EVENT_POLL: Duration = Duration::from_millis(200);
/// Events held between two window closes at most; beyond, they are dropped and counted.
const MAX_PENDING_EVENTS: usize = 200_000;

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
    /// Trace only processes in these cgroups (paths under the cgroup2 mount, or absolute);
    /// empty: every process on the host.
    pub select_cgroups: Vec<PathBuf>,
    /// Measure requests served (accepted connections).
    pub server: bool,
    /// Measure requests made (connected sockets).
    pub client: bool,
    /// Requests at least this slow are kept as exemplars.
    pub slow_threshold: Option<Duration>,
    /// Fraction of other requests kept as exemplars, in [0, 1].
    pub sample_rate: f64,
    /// Route templates such as `/users/{id}`, first match wins.
    pub route_templates: Vec<String>,
    /// Distinct (route, peer) series per process and window; the rest go to `other`.
    pub max_series_per_source: usize,
}

impl AgentConfig {
    /// A configuration with the defaults the command line uses.
    pub fn new(collector: impl Into<String>, node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        Self {
            collector: collector.into(),
            agent_id: node_name.clone(),
            node_name,
            window: Duration::from_secs(10),
            quantiles: vec![0.5, 0.95, 0.99],
            buffer_windows: 120_000,
            tracefs: PathBuf::from("/sys/kernel/tracing"),
            select_cgroups: Vec::new(),
            server: true,
            client: true,
            slow_threshold: Some(Duration::from_millis(500)),
            sample_rate: 0.0,
            route_templates: Vec::new(),
            max_series_per_source: 200,
        }
    }
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
    let templates = config
        .route_templates
        .iter()
        .map(|template| RouteTemplate::parse(template).map_err(Error::Config))
        .collect::<Result<Vec<_>>>()?;
    let cgroup_root = cgroup2_mount();
    let cgroups = resolve_cgroups(&config.select_cgroups, cgroup_root.as_deref())?;
    let mut capture = KernelCapture::load(&config.tracefs)?;
    capture.configure(&CaptureSettings {
        window: config.window,
        slow_threshold: config.slow_threshold,
        sample_rate: config.sample_rate,
        server: config.server,
        client: config.client,
        cgroups,
    })?;

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
    let resolver = SourceResolver::new(config.node_name.clone(), cgroup_root);
    let routes = RouteNamer::new(templates, config.max_series_per_source);
    let builder = WindowBuilder::new(config.window, config.quantiles.clone());
    let windows = tokio::spawn(close_windows(
        capture,
        resolver,
        routes,
        builder,
        outbox.clone(),
    ));
    Ok(RunningAgent {
        stats,
        outbox,
        tasks: vec![shipper, windows],
    })
}

/// cgroup ids (directory inodes) of the selected cgroups; None selects every process.
fn resolve_cgroups(
    selected: &[PathBuf],
    cgroup_root: Option<&std::path::Path>,
) -> Result<Option<Vec<u64>>> {
    if selected.is_empty() {
        return Ok(None);
    }
    selected
        .iter()
        .map(|path| {
            let full = match cgroup_root {
                Some(root) if !path.starts_with(root) => {
                    root.join(path.strip_prefix("/").unwrap_or(path))
                }
                _ => path.clone(),
            };
            std::fs::metadata(&full)
                .map(|metadata| metadata.ino())
                .map_err(|source| Error::Io {
                    what: format!(
                        "finding cgroup {} (selected with --select-cgroup)",
                        full.display()
                    ),
                    source,
                })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

async fn close_windows(
    mut capture: KernelCapture,
    mut resolver: SourceResolver,
    mut routes: RouteNamer,
    builder: WindowBuilder,
    outbox: Arc<Outbox>,
) {
    let window_nanos = builder.window().as_nanos();
    let mut reported_drops: Vec<u64> = Vec::new();
    let mut events: Vec<RequestEvent> = Vec::new();
    let mut events_dropped = 0u64;
    let mut requests_over_cap = 0u64;
    let mut open_window = unix_nanos() / window_nanos;
    loop {
        tokio::time::sleep(EVENT_POLL).await;
        let fresh = capture.drain_events();
        let room = MAX_PENDING_EVENTS.saturating_sub(events.len());
        events_dropped += fresh.len().saturating_sub(room) as u64;
        events.extend(fresh.into_iter().take(room));

        // Close when the boundary plus the grace has passed.
        let now = unix_nanos();
        let grace = DRAIN_GRACE.as_nanos();
        if now.saturating_sub(grace) / window_nanos <= open_window {
            continue;
        }
        open_window = now.saturating_sub(grace) / window_nanos;
        events.extend(capture.drain_events());
        if let Err(error) = capture.refresh_clock() {
            tracing::warn!(%error, "could not refresh the kernel's clock offset");
        }
        let closed = match capture.drain_closed(open_window as u32) {
            Ok(closed) => closed,
            Err(error) => {
                tracing::error!(%error, "reading closed windows failed; retrying next window");
                continue;
            }
        };
        // Events of the still-open window wait for it to close.
        let (closing, pending): (Vec<RequestEvent>, Vec<RequestEvent>) = events
            .drain(..)
            .partition(|event| u128::from(event.series.window) < open_window);
        events = pending;
        let (windows, report) = builder.build(
            closed,
            &closing,
            capture.realtime_offset_nanos(),
            &mut resolver,
            &mut routes,
        );
        if report.requests_over_series_cap > 0 {
            requests_over_cap += report.requests_over_series_cap;
            tracing::warn!(
                total = requests_over_cap,
                "requests folded into route \"other\" by the per-process series cap \
                 (raise it, or add route templates)"
            );
        }
        if events_dropped > 0 {
            tracing::warn!(
                total = events_dropped,
                "exemplar events dropped: agent backlog full"
            );
        }
        for window in &windows {
            if let (Some(source), Some(stats)) = (&window.source, &window.stats) {
                tracing::debug!(
                    pid = source.pid,
                    process = %source.process_name,
                    cgroup = %source.cgroup_path,
                    route = %window.route,
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
        AgentConfig::new("http://127.0.0.1:50051", "n")
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
