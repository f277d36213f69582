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
    pub streams_unauthenticated: AtomicU64,
    pub streams_over_limit: AtomicU64,
    pub messages_malformed: AtomicU64,
    pub messages_oversized: AtomicU64,
    pub windows_received: AtomicU64,
    pub windows_duplicate: AtomicU64,
    pub windows_invalid: AtomicU64,
    pub windows_late: AtomicU64,
    pub windows_merged: AtomicU64,
    pub windows_throttled: AtomicU64,
    pub windows_published: AtomicU64,
    pub acks_sent: AtomicU64,
    pub aggregates_published: AtomicU64,
    pub aggregates_open: AtomicU64,
    pub dedup_marks: AtomicU64,
    pub journal_truncated: AtomicU64,
    pub journal_errors: AtomicU64,
    pub feed_subscribers: AtomicU64,
    /// Windows a slow WebSocket subscriber missed (its queue overflowed).
    pub feed_dropped: AtomicU64,
    /// OTLP export (see `otlp`): batches waiting, data points accepted by the receiver,
    /// dropped (queue full, or failed for good), rejected by the receiver, failed attempts.
    pub otlp_queued: AtomicU64,
    pub otlp_points_exported: AtomicU64,
    pub otlp_points_dropped: AtomicU64,
    pub otlp_points_rejected: AtomicU64,
    pub otlp_failures: AtomicU64,
    /// Spans (exemplars) accepted, dropped, rejected.
    pub otlp_spans_exported: AtomicU64,
    pub otlp_spans_dropped: AtomicU64,
    pub otlp_spans_rejected: AtomicU64,
    /// The OTLP spool (`--state-dir`, see `otlp::spool`): batches and bytes on disk,
    /// batches refused because it was full (their items are also counted as dropped),
    /// disk errors, corrupt batch files deleted at start, batches sent after a restart.
    pub otlp_spool_batches: AtomicU64,
    pub otlp_spool_bytes: AtomicU64,
    pub otlp_spool_full: AtomicU64,
    pub otlp_spool_errors: AtomicU64,
    pub otlp_spool_corrupt: AtomicU64,
    pub otlp_spool_recovered: AtomicU64,
    /// Series whose cumulative totals were dropped to stay within the bound.
    pub otlp_series_evicted: AtomicU64,
}

impl CollectorStats {
    /// Prometheus exposition text.
    pub fn render(&self) -> String {
        let metrics: [(&str, &str, &str, &AtomicU64); 37] = [
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
                "Agent streams rejected for bad input (no or bad hello, undecodable or truncated message).",
                &self.streams_rejected,
            ),
            (
                "trazor_collector_streams_unauthenticated_total",
                "counter",
                "Agent streams refused for a missing or wrong bearer token.",
                &self.streams_unauthenticated,
            ),
            (
                "trazor_collector_streams_over_limit_total",
                "counter",
                "Agent streams refused because their agent already had the maximum open.",
                &self.streams_over_limit,
            ),
            (
                "trazor_collector_messages_malformed_total",
                "counter",
                "Messages that could not be decoded (their stream was ended).",
                &self.messages_malformed,
            ),
            (
                "trazor_collector_messages_oversized_total",
                "counter",
                "Messages over the size limit (their stream was ended).",
                &self.messages_oversized,
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
                "trazor_collector_windows_invalid_total",
                "counter",
                "Windows acknowledged but dropped as invalid (sequence 0, end before start, oversized histogram).",
                &self.windows_invalid,
            ),
            (
                "trazor_collector_windows_late_total",
                "counter",
                "Windows that arrived after their aggregate closed (published alone, not merged).",
                &self.windows_late,
            ),
            (
                "trazor_collector_windows_merged_total",
                "counter",
                "Windows merged into an aggregate.",
                &self.windows_merged,
            ),
            (
                "trazor_collector_windows_throttled_total",
                "counter",
                "Windows read only after waiting for their agent's rate limit.",
                &self.windows_throttled,
            ),
            (
                "trazor_collector_windows_published_total",
                "counter",
                "Documents published on the feed (windows and aggregates).",
                &self.windows_published,
            ),
            (
                "trazor_collector_acks_sent_total",
                "counter",
                "Cumulative acks sent to agents.",
                &self.acks_sent,
            ),
            (
                "trazor_collector_aggregates_published_total",
                "counter",
                "Merged aggregates closed and published.",
                &self.aggregates_published,
            ),
            (
                "trazor_collector_aggregates_open",
                "gauge",
                "Aggregates waiting for their grace period to end.",
                &self.aggregates_open,
            ),
            (
                "trazor_collector_dedup_marks",
                "gauge",
                "(agent, boot) pairs whose highest sequence is remembered.",
                &self.dedup_marks,
            ),
            (
                "trazor_collector_journal_truncated_total",
                "counter",
                "Torn or corrupt journal records truncated at start.",
                &self.journal_truncated,
            ),
            (
                "trazor_collector_journal_errors_total",
                "counter",
                "Journal writes that failed (their windows were not acknowledged).",
                &self.journal_errors,
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
            (
                "trazor_collector_otlp_queued_batches",
                "gauge",
                "OTLP export batches waiting to be sent.",
                &self.otlp_queued,
            ),
            (
                "trazor_collector_otlp_points_exported_total",
                "counter",
                "OTLP data points the receiver accepted.",
                &self.otlp_points_exported,
            ),
            (
                "trazor_collector_otlp_points_dropped_total",
                "counter",
                "OTLP data points dropped: the export queue was full, or sending failed for good.",
                &self.otlp_points_dropped,
            ),
            (
                "trazor_collector_otlp_points_rejected_total",
                "counter",
                "OTLP data points the receiver rejected (a partial success).",
                &self.otlp_points_rejected,
            ),
            (
                "trazor_collector_otlp_failures_total",
                "counter",
                "OTLP export attempts that failed (retried ones included).",
                &self.otlp_failures,
            ),
            (
                "trazor_collector_otlp_spans_exported_total",
                "counter",
                "Exemplar spans the OTLP receiver accepted.",
                &self.otlp_spans_exported,
            ),
            (
                "trazor_collector_otlp_spans_dropped_total",
                "counter",
                "Exemplar spans dropped: the export queue was full, or sending failed for good.",
                &self.otlp_spans_dropped,
            ),
            (
                "trazor_collector_otlp_spans_rejected_total",
                "counter",
                "Exemplar spans the OTLP receiver rejected (a partial success).",
                &self.otlp_spans_rejected,
            ),
            (
                "trazor_collector_otlp_spool_batches",
                "gauge",
                "OTLP batches on disk in the spool, waiting for the receiver to accept them.",
                &self.otlp_spool_batches,
            ),
            (
                "trazor_collector_otlp_spool_bytes",
                "gauge",
                "Bytes of the OTLP spool's batch files.",
                &self.otlp_spool_bytes,
            ),
            (
                "trazor_collector_otlp_spool_full_total",
                "counter",
                "OTLP batches dropped because the spool was full (their items are in the dropped totals).",
                &self.otlp_spool_full,
            ),
            (
                "trazor_collector_otlp_spool_errors_total",
                "counter",
                "OTLP spool disk errors (a batch that could not be written is still sent from memory).",
                &self.otlp_spool_errors,
            ),
            (
                "trazor_collector_otlp_spool_corrupt_total",
                "counter",
                "Corrupt OTLP spool batch files deleted at start (their items are lost).",
                &self.otlp_spool_corrupt,
            ),
            (
                "trazor_collector_otlp_spool_recovered_total",
                "counter",
                "OTLP batches found in the spool at start and sent after the restart.",
                &self.otlp_spool_recovered,
            ),
            (
                "trazor_collector_otlp_series_evicted_total",
                "counter",
                "Series whose cumulative OTLP totals were dropped to stay within the bound (they start again at zero).",
                &self.otlp_series_evicted,
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
