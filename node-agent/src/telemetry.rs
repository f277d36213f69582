//! The agent's own telemetry: Prometheus `/metrics`, `/healthz` and `/readyz` on
//! `--metrics-listen`. Every metric is declared in [`AgentTelemetry::render`], so names
//! live in one place.
//!
//! `/healthz` answers while the process serves. `/readyz` answers 200 only while the agent
//! can do its job: the eBPF programs are loaded, a stream to the collector is open and, in
//! Kubernetes mode, this node's pods and the operator's configuration are being watched
//! through the API. Otherwise 503 with every reason, so a DaemonSet rollout shows agents
//! that cannot attribute or deliver instead of counting them ready.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::{Router, http::StatusCode, routing::get};
use tokio::net::TcpListener;

use crate::{Error, Result, capture::ConnectionTable, ship::Outbox};

/// A Kubernetes API watch the agent depends on (Kubernetes mode only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiWatch {
    /// This node's pods: without them no cgroup can be attributed or selected.
    Pods,
    /// The operator's configuration document: without it profile changes go unseen.
    Configuration,
}

impl ApiWatch {
    fn label(self) -> &'static str {
        match self {
            ApiWatch::Pods => "pods",
            ApiWatch::Configuration => "configuration",
        }
    }
}

/// Shared between the agent's loops and the metrics server.
#[derive(Debug)]
pub struct AgentTelemetry {
    outbox: Arc<Outbox>,
    kernel_drops: Mutex<Vec<(&'static str, u64)>>,
    connection_table: Mutex<Option<ConnectionTable>>,
    attached: AtomicBool,
    /// The programs sit on their tracepoints now (off while nothing is selected).
    programs_attached: AtomicBool,
    /// The API watches this agent depends on, each with why it is failing (`None`: synced).
    api_watches: Mutex<BTreeMap<ApiWatch, Option<String>>>,
}

impl AgentTelemetry {
    pub fn new(outbox: Arc<Outbox>) -> Self {
        Self {
            outbox,
            kernel_drops: Mutex::new(Vec::new()),
            connection_table: Mutex::new(None),
            attached: AtomicBool::new(false),
            programs_attached: AtomicBool::new(false),
            api_watches: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records that `watch` is not (or no longer) in sync, and why; the agent is not ready
    /// until [`AgentTelemetry::api_watch_synced`] is called for it.
    pub fn api_watch_failing(&self, watch: ApiWatch, reason: impl Into<String>) {
        self.api_watches
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(watch, Some(reason.into()));
    }

    /// Records that `watch` has listed what it follows and is watching.
    pub fn api_watch_synced(&self, watch: ApiWatch) {
        self.api_watches
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(watch, None);
    }

    /// Whether `watch` has listed and follows its objects now.
    pub fn api_watch_in_sync(&self, watch: ApiWatch) -> bool {
        matches!(self.api_watches().get(&watch), Some(None))
    }

    fn api_watches(&self) -> BTreeMap<ApiWatch, Option<String>> {
        self.api_watches
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The kernel's cumulative drop counters by reason, as `KernelCapture::drop_counts`
    /// returns them; call after each drain.
    pub fn set_kernel_drops(&self, drops: Vec<(&'static str, u64)>) {
        *self
            .kernel_drops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = drops;
    }

    /// The kernel's cumulative drop counters by reason, as last set.
    pub fn kernel_drops(&self) -> Vec<(&'static str, u64)> {
        self.kernel_drops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The connection table as the agent last looked through it.
    pub fn set_connection_table(&self, table: ConnectionTable) {
        *self
            .connection_table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(table);
    }

    /// The last look at the connection table, once there was one.
    pub fn connection_table(&self) -> Option<ConnectionTable> {
        *self
            .connection_table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The eBPF programs are attached (or detached).
    pub fn set_attached(&self, attached: bool) {
        self.attached.store(attached, Ordering::Relaxed);
    }

    /// Whether the programs are on their tracepoints now, after each change of selection.
    pub fn set_programs_attached(&self, attached: bool) {
        self.programs_attached.store(attached, Ordering::Relaxed);
    }

    /// Why the agent is not ready (every reason, joined by "; "), or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        let mut reasons = Vec::new();
        if !self.attached.load(Ordering::Relaxed) {
            reasons.push("eBPF programs not loaded".to_owned());
        }
        if !self.outbox.stats().connected.load(Ordering::Relaxed) {
            reasons.push("no stream to the collector".to_owned());
        }
        for (watch, failing) in self.api_watches() {
            if let Some(reason) = failing {
                reasons.push(format!(
                    "Kubernetes API watch of {}: {reason}",
                    watch.label()
                ));
            }
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Prometheus exposition text.
    pub fn render(&self) -> String {
        let stats = self.outbox.stats();
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let metrics: [(&str, &str, &str, u64); 16] = [
            (
                "trazor_agent_windows_closed_total",
                "counter",
                "Windows closed and queued for the collector.",
                load(&stats.windows_closed),
            ),
            (
                "trazor_agent_windows_sent_total",
                "counter",
                "Window messages written to a stream, resends included.",
                load(&stats.windows_sent),
            ),
            (
                "trazor_agent_windows_resent_total",
                "counter",
                "Windows sent again after a reconnect.",
                load(&stats.windows_resent),
            ),
            (
                "trazor_agent_windows_acked_total",
                "counter",
                "Windows the collector acknowledged.",
                load(&stats.windows_acked),
            ),
            (
                "trazor_agent_windows_dropped_total",
                "counter",
                "Windows dropped unacknowledged because the outbox was full (oldest first).",
                load(&stats.windows_dropped),
            ),
            (
                "trazor_agent_queue_depth",
                "gauge",
                "Windows waiting for an acknowledgement.",
                self.outbox.len() as u64,
            ),
            (
                "trazor_agent_queue_capacity",
                "gauge",
                "Windows the outbox holds before dropping the oldest.",
                self.outbox.capacity() as u64,
            ),
            (
                "trazor_agent_reconnects_total",
                "counter",
                "Streams to the collector opened after the first.",
                load(&stats.reconnects),
            ),
            (
                "trazor_agent_stream_failures_total",
                "counter",
                "Streams that failed or could not be opened.",
                load(&stats.stream_failures),
            ),
            (
                "trazor_agent_connected",
                "gauge",
                "1 while a stream to the collector is open.",
                u64::from(stats.connected.load(Ordering::Relaxed)),
            ),
            (
                "trazor_agent_spool_recovered",
                "gauge",
                "Unacknowledged windows read back from the spool at start.",
                load(&stats.spool_recovered),
            ),
            (
                "trazor_agent_spool_truncated_total",
                "counter",
                "Torn or corrupt spool records truncated at start.",
                load(&stats.spool_truncated),
            ),
            (
                "trazor_agent_spool_dropped_total",
                "counter",
                "Unacknowledged windows deleted from a full spool.",
                load(&stats.spool_dropped),
            ),
            (
                "trazor_agent_spool_errors_total",
                "counter",
                "Spool writes that failed.",
                load(&stats.spool_errors),
            ),
            (
                "trazor_agent_ebpf_attached",
                "gauge",
                "1 once the eBPF programs are loaded and the selection applied (while no process is selected they stay detached, at no cost to the node).",
                u64::from(self.attached.load(Ordering::Relaxed)),
            ),
            (
                "trazor_agent_ebpf_programs_on_tracepoints",
                "gauge",
                "1 while the eBPF programs sit on their tracepoints; 0 while nothing on this node is selected (detached: the node pays nothing).",
                u64::from(self.programs_attached.load(Ordering::Relaxed)),
            ),
        ];
        let mut text = String::new();
        for (name, kind, help, value) in metrics {
            write_metric(&mut text, name, kind, help, value);
        }
        if let Some(table) = self.connection_table() {
            write_metric(
                &mut text,
                "trazor_agent_connections_tracked",
                "gauge",
                "Connections in the kernel's connection table.",
                table.tracked,
            );
            write_metric(
                &mut text,
                "trazor_agent_connection_table_capacity",
                "gauge",
                "Connections the table holds before evicting the least recently used (--max-connections).",
                table.capacity,
            );
            write_metric(
                &mut text,
                "trazor_agent_connections_evicted_total",
                "counter",
                "Connections evicted from the full table; a request one had in flight also counts as a kernel drop, reason response_without_request.",
                table.evicted,
            );
            write_metric(
                &mut text,
                "trazor_agent_requests_in_flight",
                "gauge",
                "Requests received (or sent) whose response has not gone out (or come back) yet.",
                table.in_flight,
            );
            write_metric(
                &mut text,
                "trazor_agent_oldest_request_in_flight_seconds",
                "gauge",
                "How long the oldest request in flight has waited; 0 with none.",
                table.oldest_in_flight.map_or(0.0, |age| age.as_secs_f64()),
            );
        }
        let watches = self.api_watches();
        if !watches.is_empty() {
            let name = "trazor_agent_api_watch_synced";
            let _ = writeln!(
                text,
                "# HELP {name} 1 while the Kubernetes API watch has listed and is following what it watches."
            );
            let _ = writeln!(text, "# TYPE {name} gauge");
            for (watch, failing) in watches {
                let _ = writeln!(
                    text,
                    "{name}{{watch=\"{}\"}} {}",
                    watch.label(),
                    u8::from(failing.is_none())
                );
            }
        }
        let drops = self.kernel_drops();
        let name = "trazor_agent_kernel_drops_total";
        let _ = writeln!(
            text,
            "# HELP {name} Events the eBPF programs could not record, by reason (from the kernel's maps)."
        );
        let _ = writeln!(text, "# TYPE {name} counter");
        for (reason, count) in drops {
            let _ = writeln!(text, "{name}{{reason=\"{reason}\"}} {count}");
        }
        text
    }
}

fn write_metric(
    text: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(text, "# HELP {name} {help}");
    let _ = writeln!(text, "# TYPE {name} {kind}");
    let _ = writeln!(text, "{name} {value}");
}

/// Binds the metrics address (so a bad flag fails at start) and returns the server to run.
pub async fn bind(
    address: SocketAddr,
    telemetry: Arc<AgentTelemetry>,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static)> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| Error::Io {
            what: format!(
                "listening for /metrics on {address} (pick a free address with --metrics-listen)"
            ),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Io {
        what: "reading the metrics address".into(),
        source,
    })?;
    let metrics = telemetry.clone();
    let ready = telemetry;
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let reason = ready.not_ready();
                async move {
                    match reason {
                        None => (StatusCode::OK, "ready\n".to_owned()),
                        Some(reason) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {reason}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move { text }
            }),
        );
    let server = async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the metrics server failed");
        }
    };
    Ok((local, server))
}
