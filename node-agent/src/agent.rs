//! The agent's main loop: at each window boundary, drain the closed windows from the kernel,
//! attribute and build them, and hand them to the shipper. With profiles, it also follows
//! the operator's configuration and the node's pods, and re-targets the kernel when either
//! changes, without a restart and without losing a window.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{sync::watch, task::JoinHandle};
use trazor_node_agent_ebpf_common::{RequestEvent, event_flag};
use trazor_proto::{agent_config::NodeAgentConfig, v1::AgentHello};

use crate::{
    Error, Result,
    attribute::{SourceResolver, cgroup2_mount},
    capture::{CaptureSettings, KernelCapture, TraceRule, check_max_connections},
    pods::{PodDirectory, PodSource, follow},
    route::{RouteNamer, RouteTemplate},
    select::{Selection, pod_cgroups, profile_settings, select},
    ship::{
        Delivery, Outbox, ShipperStats, TransportConfig, collector_endpoint, deliver, open_outbox,
        with_tls,
    },
    telemetry::{AgentTelemetry, ApiWatch},
    window::{WindowBuilder, learn_announcements},
};

/// How often the kernel's ring buffers (finished requests, events) are emptied between
/// window boundaries: the finished requests' ring holds about 43 000, so 100 ms keeps up
/// with 430 000 requests a second on the node.
const EVENT_POLL: Duration = Duration::from_millis(100);
/// How often the configuration file is checked for changes.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// Events held between two window closes at most; beyond, they are dropped and counted.
const MAX_PENDING_EVENTS: usize = 200_000;

/// Time after a window's end before it is read: lets a program that computed its window
/// number just before the boundary write its record.
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
    /// Distinct (route, method, peer) series per process and window; the rest go to `other`.
    pub max_series_per_source: usize,
    /// Connections the kernel tracks at once; beyond, the least recently used is evicted.
    pub max_connections: u32,
    /// How often the connection table is looked through for its gauges and evictions (two
    /// system calls per tracked connection).
    pub connection_sweep: Duration,
    /// Select what to trace from TraceProfiles and pods instead of the settings above.
    pub profiles: Option<ProfileSource>,
    /// Auth, spool and self-metrics of the delivery path (see `ship`).
    pub transport: TransportConfig,
}

/// Where profile-driven selection comes from (Kubernetes mode, or a local equivalent).
#[derive(Clone, Debug)]
pub struct ProfileSource {
    /// The operator's configuration document (the mounted ConfigMap key), watched for
    /// changes and applied without a restart.
    pub config_file: PathBuf,
    /// The pods on this node.
    pub pods: PodSource,
    /// Also watch the document in this ConfigMap (namespace, name) through the API, for
    /// reloads within seconds.
    pub config_map: Option<(String, String)>,
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
            select_cgroups: Vec::new(),
            server: true,
            client: true,
            slow_threshold: Some(Duration::from_millis(500)),
            sample_rate: 0.0,
            route_templates: Vec::new(),
            max_series_per_source: 200,
            max_connections: crate::capture::DEFAULT_MAX_CONNECTIONS,
            connection_sweep: Duration::from_secs(10),
            profiles: None,
            transport: TransportConfig::default(),
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
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(Error::Config(format!(
                "sample rate {} is out of range: use 0 to 1",
                self.sample_rate
            )));
        }
        if !self.server && !self.client {
            return Err(Error::Config(
                "nothing to measure: enable server side, client side or both".into(),
            ));
        }
        if self.max_series_per_source == 0 {
            return Err(Error::Config("the series cap must be at least 1".into()));
        }
        check_max_connections(self.max_connections)?;
        if self.connection_sweep < Duration::from_millis(100) {
            return Err(Error::Config(
                "the connection table sweep interval must be at least 100ms".into(),
            ));
        }
        for template in &self.route_templates {
            RouteTemplate::parse(template).map_err(Error::Config)?;
        }
        collector_endpoint(&self.collector)?;
        Ok(())
    }
}

/// A running agent; dropping it stops the agent and detaches the programs.
pub struct RunningAgent {
    pub stats: Arc<ShipperStats>,
    pub outbox: Arc<Outbox>,
    /// Configurations applied so far (1 after start with profiles; +1 per reload).
    pub config_generation: Arc<AtomicU64>,
    /// What `/metrics` and `/readyz` report.
    pub telemetry: Arc<AgentTelemetry>,
    /// Where `/metrics` is served, when it is.
    pub metrics_addr: Option<std::net::SocketAddr>,
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
    let endpoint = with_tls(
        collector_endpoint(&config.collector)?,
        config.transport.tls.as_ref(),
    )?;
    let cgroup_root = cgroup2_mount();
    let cgroups = resolve_cgroups(&config.select_cgroups, cgroup_root.as_deref())?;
    let profiles = match &config.profiles {
        Some(source) => Some(read_profiles(&source.config_file)?),
        None => None,
    };
    let capture = KernelCapture::load(config.max_connections)?;

    let stats = Arc::new(ShipperStats::default());
    let (outbox, boot_id) = open_outbox(
        config.buffer_windows,
        stats.clone(),
        config.transport.spool.as_ref(),
    )?;
    let telemetry = Arc::new(AgentTelemetry::new(outbox.clone()));
    let hello = AgentHello {
        node_name: config.node_name.clone(),
        agent_id: config.agent_id.clone(),
        boot_id,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities: vec!["http1-server".to_owned(), "http1-client".to_owned()],
    };
    let mut tasks = vec![tokio::spawn(deliver(
        Delivery {
            endpoint,
            hello: hello.clone(),
            token: config.transport.token.clone(),
        },
        outbox.clone(),
    ))];
    let mut metrics_addr = None;
    if let Some(address) = config.transport.metrics_listen {
        let (bound, server) = crate::telemetry::bind(address, telemetry.clone()).await?;
        metrics_addr = Some(bound);
        tasks.push(tokio::spawn(server));
    }
    let pods = PodDirectory::default();
    let (pods_changed_sender, pods_changed) = watch::channel(0u64);
    let mut resolver = SourceResolver::new(config.node_name.clone(), cgroup_root.clone());
    if let Some(source) = &config.profiles {
        resolver = resolver.with_pods(pods.clone());
        tasks.push(tokio::spawn(follow(
            source.pods.clone(),
            pods.clone(),
            pods_changed_sender,
            telemetry.clone(),
        )));
    }
    let config_generation = Arc::new(AtomicU64::new(0));
    let mut windows = WindowLoop {
        settings: CaptureSettings {
            window: config.window,
            slow_threshold: config.slow_threshold,
            sample_rate: config.sample_rate,
            server: config.server,
            client: config.client,
            cgroups: cgroups.map(|ids| TraceRule::every_port_of(ids, config.server, config.client)),
        },
        builder: WindowBuilder::new(config.window, config.quantiles.clone()),
        routes: RouteNamer::new(
            parse_templates(&config.route_templates)?,
            config.max_series_per_source,
        ),
        routes_forgotten: 0,
        capture,
        resolver,
        outbox: outbox.clone(),
        cgroup_root,
        pods,
        pods_changed,
        profiles: None,
        config_updates: None,
        last_file_text: None,
        profile_of_pod: HashMap::new(),
        config_generation: config_generation.clone(),
        events: Vec::new(),
        events_dropped: 0,
        requests_over_cap: 0,
        requests_over_status_cap: 0,
        reported_drops: Vec::new(),
        connection_sweep: config.connection_sweep,
        reported_evictions: 0,
        telemetry: telemetry.clone(),
        open_window: unix_nanos() / config.window.as_nanos(),
    };
    match (profiles, &config.profiles) {
        (Some(document), Some(source)) => {
            if let Some((namespace, name)) = source.config_map.clone() {
                let (sender, receiver) = watch::channel(document.0.clone());
                tasks.push(tokio::spawn(crate::pods::follow_config_map(
                    namespace,
                    name,
                    trazor_proto::agent_config::CONFIG_KEY.to_owned(),
                    sender,
                    telemetry.clone(),
                )));
                windows.config_updates = Some(receiver);
            }
            windows.last_file_text = Some(document.0.clone());
            windows.apply_profiles(source.config_file.clone(), document)?;
        }
        _ => windows.capture.configure(&windows.settings)?,
    }
    telemetry.set_programs_attached(windows.capture.is_attached());
    tracing::info!(
        node = %config.node_name,
        boot_id = %hello.boot_id,
        window = %humantime::format_duration(windows.settings.window),
        mode = match (&config.profiles, config.select_cgroups.is_empty()) {
            (Some(_), _) => "profiles".to_owned(),
            (None, true) => "standalone: every process".to_owned(),
            (None, false) => format!("standalone: cgroups {:?}", config.select_cgroups),
        },
        "eBPF programs attached; measuring HTTP/1.x requests"
    );
    tasks.push(tokio::spawn(windows.run()));
    telemetry.set_attached(true);
    Ok(RunningAgent {
        stats,
        outbox,
        config_generation,
        telemetry,
        metrics_addr,
        tasks,
    })
}

fn parse_templates(templates: &[String]) -> Result<Vec<RouteTemplate>> {
    templates
        .iter()
        .map(|template| RouteTemplate::parse(template).map_err(Error::Config))
        .collect()
}

/// Reads and parses the operator's configuration document.
fn read_profiles(path: &Path) -> Result<(String, NodeAgentConfig)> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: format!("reading the agent configuration {}", path.display()),
        source,
    })?;
    let document = serde_json::from_str(&text).map_err(|error| {
        Error::Config(format!(
            "{} is not a valid agent configuration: {error}",
            path.display()
        ))
    })?;
    Ok((text, document))
}

/// cgroup ids (directory inodes) of the selected cgroups; None selects every process.
fn resolve_cgroups(selected: &[PathBuf], cgroup_root: Option<&Path>) -> Result<Option<Vec<u64>>> {
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

/// The loop that owns the kernel side: closes windows, follows configuration and pods.
struct WindowLoop {
    capture: KernelCapture,
    settings: CaptureSettings,
    builder: WindowBuilder,
    routes: RouteNamer,
    /// [`RouteNamer::forgotten`] when last seen: the kernel's known routes go with them.
    routes_forgotten: u64,
    resolver: SourceResolver,
    outbox: Arc<Outbox>,
    cgroup_root: Option<PathBuf>,
    pods: PodDirectory,
    pods_changed: watch::Receiver<u64>,
    /// The configuration's source, its last text, and what it said.
    profiles: Option<(PathBuf, String, NodeAgentConfig)>,
    /// New configuration texts from the API (kubernetes mode).
    config_updates: Option<watch::Receiver<String>>,
    /// The configuration file's text when last read, so only a change of the file applies.
    last_file_text: Option<String>,
    profile_of_pod: HashMap<String, String>,
    config_generation: Arc<AtomicU64>,
    events: Vec<RequestEvent>,
    events_dropped: u64,
    requests_over_cap: u64,
    /// Requests whose status code was folded into code 0 by the per-window status limit.
    requests_over_status_cap: u64,
    reported_drops: Vec<u64>,
    connection_sweep: Duration,
    reported_evictions: u64,
    telemetry: Arc<AgentTelemetry>,
    /// Number of the window being counted now, in the current window length.
    open_window: u128,
}

impl WindowLoop {
    async fn run(mut self) {
        let mut since_config_check = Duration::ZERO;
        let mut since_sweep = Duration::ZERO;
        self.sweep_connections();
        loop {
            tokio::time::sleep(EVENT_POLL).await;
            self.take_events();

            since_config_check += EVENT_POLL;
            if since_config_check >= CONFIG_POLL {
                since_config_check = Duration::ZERO;
                self.reload_if_changed();
            }
            since_sweep += EVENT_POLL;
            if since_sweep >= self.connection_sweep {
                since_sweep = Duration::ZERO;
                self.sweep_connections();
            }
            if self.pods_changed.has_changed().unwrap_or(false) {
                self.pods_changed.mark_unchanged();
                self.reselect();
            }

            // Close when the boundary plus the grace has passed.
            let window_nanos = self.builder.window().as_nanos();
            let now = unix_nanos().saturating_sub(DRAIN_GRACE.as_nanos());
            if now / window_nanos <= self.open_window {
                continue;
            }
            self.open_window = now / window_nanos;
            self.close_windows_before(self.open_window as u32);
        }
    }

    fn take_events(&mut self) {
        self.capture.take_requests();
        let fresh = self.capture.drain_events();
        // Routes are learnt as soon as they are announced, so that the kernel stops
        // announcing them.
        let announced = learn_announcements(&fresh, &mut self.resolver, &mut self.routes);
        if self.routes.forgotten() != self.routes_forgotten {
            self.routes_forgotten = self.routes.forgotten();
            if let Err(error) = self.capture.forget_known_routes() {
                tracing::warn!(%error, "could not clear the kernel's known routes");
            }
        }
        if let Err(error) = self.capture.mark_routes_known(announced) {
            tracing::warn!(%error, "could not update the kernel's known routes");
        }
        // Announcements are learnt; only exemplars wait for their window.
        let exemplars: Vec<RequestEvent> = fresh
            .into_iter()
            .filter(|event| event.flags & event_flag::EXEMPLAR != 0)
            .collect();
        let room = MAX_PENDING_EVENTS.saturating_sub(self.events.len());
        self.events_dropped += exemplars.len().saturating_sub(room) as u64;
        self.events.extend(exemplars.into_iter().take(room));
    }

    /// Drains, builds and ships every window numbered below `open_window`.
    fn close_windows_before(&mut self, open_window: u32) {
        self.take_events();
        if let Err(error) = self.capture.refresh_clock() {
            tracing::warn!(%error, "could not refresh the kernel's clock offset");
        }
        let closed = match self.capture.drain_closed(open_window) {
            Ok(closed) => closed,
            Err(error) => {
                tracing::error!(%error, "reading closed windows failed; retrying next window");
                return;
            }
        };
        // Events of the still-open window wait for it to close.
        let (closing, pending): (Vec<RequestEvent>, Vec<RequestEvent>) = self
            .events
            .drain(..)
            .partition(|event| event.series.window < open_window);
        self.events = pending;
        let (mut windows, report) = self.builder.build(
            closed,
            &closing,
            self.capture.realtime_offset_nanos(),
            &mut self.resolver,
            &self.routes,
        );
        for window in &mut windows {
            let uid = window
                .source
                .as_ref()
                .and_then(|source| source.pod.as_ref())
                .map(|pod| pod.uid.as_str());
            if let Some(profile) = uid.and_then(|uid| self.profile_of_pod.get(uid)) {
                window.profile = profile.clone();
            }
        }
        if report.requests_over_series_cap > 0 {
            self.requests_over_cap += report.requests_over_series_cap;
            tracing::warn!(
                total = self.requests_over_cap,
                "requests folded into route \"other\" by the per-process series cap \
                 (raise it, or add route templates)"
            );
        }
        if report.requests_over_status_cap > 0 {
            self.requests_over_status_cap += report.requests_over_status_cap;
            tracing::warn!(
                total = self.requests_over_status_cap,
                limit = crate::window::MAX_STATUS_CODES_PER_WINDOW,
                "requests reported with status code 0 (unknown): their window had more \
                 distinct status codes than the limit"
            );
        }
        if self.events_dropped > 0 {
            tracing::warn!(
                total = self.events_dropped,
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
        self.outbox.push(windows);
        self.report_kernel_drops();
    }

    /// Looks through the kernel's connection table for the gauges, and says when it evicts.
    fn sweep_connections(&mut self) {
        match self.capture.connection_table() {
            Ok(table) => {
                if table.evicted > self.reported_evictions {
                    tracing::warn!(
                        evicted = table.evicted,
                        capacity = table.capacity,
                        "connection table full: least recently used connections evicted \
                         (requests they had in flight count as response_without_request; \
                         raise --max-connections)"
                    );
                    self.reported_evictions = table.evicted;
                }
                self.telemetry.set_connection_table(table);
            }
            Err(error) => tracing::warn!(%error, "could not read the connection table"),
        }
    }

    fn report_kernel_drops(&mut self) {
        match self.capture.drop_counts() {
            Ok(drops) => {
                self.telemetry.set_kernel_drops(drops.clone());
                let counts: Vec<u64> = drops.iter().map(|(_, count)| *count).collect();
                if counts != self.reported_drops {
                    for (reason, count) in &drops {
                        if *count > 0 {
                            tracing::warn!(reason, count, "kernel-side drops (cumulative)");
                        }
                    }
                    self.reported_drops = counts;
                }
            }
            Err(error) => tracing::warn!(%error, "could not read kernel drop counters"),
        }
    }

    /// Takes a changed configuration, from the API or the file, and applies it if valid.
    ///
    /// The API watch, when there is one, is in charge while it is in sync: the mounted file
    /// lags it by up to a minute (the kubelet's sync), so a file that still holds an older
    /// document must never undo what the API delivered. The file is read only without an
    /// API watch (a local run) or while that watch is failing, and then only a change *of
    /// the file* is applied, never a file that merely differs from the API's document.
    fn reload_if_changed(&mut self) {
        let Some((path, last_text, _)) = &self.profiles else {
            return;
        };
        let path = path.clone();
        let last_text = last_text.clone();
        let from_api = self
            .config_updates
            .as_mut()
            .filter(|updates| updates.has_changed().unwrap_or(false))
            .map(|updates| updates.borrow_and_update().clone());
        let text = match from_api {
            Some(text) => text,
            None => {
                let api_in_charge = self.config_updates.is_some()
                    && self.telemetry.api_watch_in_sync(ApiWatch::Configuration);
                if api_in_charge {
                    return;
                }
                match std::fs::read_to_string(&path) {
                    Ok(text) if self.last_file_text.as_ref() == Some(&text) => return,
                    Ok(text) => {
                        self.last_file_text = Some(text.clone());
                        text
                    }
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "cannot read the configuration file");
                        return;
                    }
                }
            }
        };
        if text == last_text {
            return;
        }
        match serde_json::from_str::<NodeAgentConfig>(&text) {
            Ok(document) => {
                if let Err(error) = self.apply_profiles(path, (text, document)) {
                    tracing::error!(%error, "could not apply the new configuration; keeping the old one");
                }
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    "ignoring an invalid agent configuration; keeping the last good one"
                );
                // Do not complain again until it changes.
                if let Some((_, last_text, _)) = &mut self.profiles {
                    *last_text = text;
                }
            }
        }
    }

    /// Makes `document` the configuration: settings, then selection.
    fn apply_profiles(
        &mut self,
        path: PathBuf,
        (text, document): (String, NodeAgentConfig),
    ) -> Result<()> {
        let settings = profile_settings(&document);
        if let Some(new) = &settings {
            if new.window != self.builder.window() {
                // The kernel numbers windows by their length: close everything counted under
                // the old length first (the current window closes early; nothing is lost).
                self.close_windows_before(u32::MAX);
                self.builder = WindowBuilder::new(new.window, new.quantiles.clone());
                self.open_window = unix_nanos() / new.window.as_nanos();
            } else {
                self.builder = WindowBuilder::new(new.window, new.quantiles.clone());
            }
            self.routes.reconfigure(
                parse_templates(&new.route_templates)?,
                new.max_series_per_source,
            );
            self.settings.window = new.window;
            self.settings.slow_threshold = new.slow_threshold;
            self.settings.sample_rate = new.sample_rate;
            self.settings.server = new.server;
            self.settings.client = new.client;
        }
        self.profiles = Some((path, text, document));
        self.reselect();
        let generation = self.config_generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(
            generation,
            profiles = self.profiles.as_ref().map_or(0, |(_, _, d)| d.profiles.len()),
            window = %humantime::format_duration(self.settings.window),
            "configuration applied"
        );
        Ok(())
    }

    /// Recomputes which cgroups are traced from the profiles and the pods.
    fn reselect(&mut self) {
        let Some((_, _, document)) = &self.profiles else {
            return;
        };
        let cgroups = self
            .cgroup_root
            .as_deref()
            .map(pod_cgroups)
            .unwrap_or_default();
        let Selection {
            cgroups: selected,
            profile_of_pod,
        } = select(
            document,
            &self.pods.snapshot(),
            &self.pods.node_labels(),
            &cgroups,
        );
        tracing::info!(
            pods = profile_of_pod.len(),
            cgroups = selected.len(),
            "selection updated"
        );
        self.profile_of_pod = profile_of_pod;
        self.settings.cgroups = Some(selected);
        if let Err(error) = self.capture.configure(&self.settings) {
            tracing::error!(%error, "could not update the kernel's selection");
        }
        self.telemetry
            .set_programs_attached(self.capture.is_attached());
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos())
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
