//! The collector's counters, exported on `/metrics` in the Prometheus text format. Every
//! metric is declared here, so names live in one place.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

#[derive(Debug, Default)]
pub struct CollectorStats {
    pub streams_opened: AtomicU64,
    pub streams_open: AtomicU64,
    pub streams_rejected: AtomicU64,
    pub windows_received: AtomicU64,
    pub windows_duplicate: AtomicU64,
    pub windows_published: AtomicU64,
    pub feed_subscribers: AtomicU64,
    /// Windows a slow WebSocket subscriber missed (its queue overflowed).
    pub feed_dropped: AtomicU64,
}

impl CollectorStats {
    /// Prometheus exposition text.
    pub fn render(&self) -> String {
        let metrics: [(&str, &str, &str, &AtomicU64); 8] = [
            (
                "trazor_collector_streams_opened_total",
                "counter",
                "Agent streams accepted.",
                &self.streams_opened,
            ),
            (
                "trazor_collector_streams_open",
                "gauge",
                "Agent streams open now.",
                &self.streams_open,
            ),
            (
                "trazor_collector_streams_rejected_total",
                "counter",
                "Agent streams rejected for bad input.",
                &self.streams_rejected,
            ),
            (
                "trazor_collector_windows_received_total",
                "counter",
                "Windows received, duplicates included.",
                &self.windows_received,
            ),
            (
                "trazor_collector_windows_duplicate_total",
                "counter",
                "Windows dropped as already received (agent, boot, sequence).",
                &self.windows_duplicate,
            ),
            (
                "trazor_collector_windows_published_total",
                "counter",
                "Windows published on the feed.",
                &self.windows_published,
            ),
            (
                "trazor_collector_feed_subscribers",
                "gauge",
                "WebSocket subscribers connected now.",
                &self.feed_subscribers,
            ),
            (
                "trazor_collector_feed_dropped_total",
                "counter",
                "Windows slow WebSocket subscribers missed.",
                &self.feed_dropped,
            ),
        ];
        let mut text = String::new();
        for (name, kind, help, value) in metrics {
            let _ = writeln!(text, "# HELP {name} {help}");
            let _ = writeln!(text, "# TYPE {name} {kind}");
            let _ = writeln!(text, "{name} {}", value.load(Ordering::Relaxed));
        }
        text
    }
}
