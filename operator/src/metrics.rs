//! The operator's Prometheus metrics: every metric is a field of [`Metrics`], so names and
//! label sets live in this one place. Served as text on `/metrics` by `main`.

use std::time::Instant;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::Error;

/// Label of the failures counter: a bounded error kind, never an object name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

/// Label of the profiles gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// `Applied`, `InvalidSpec` or `ConflictingProfile`.
    pub reason: &'static str,
}

/// All metrics of the operator.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles started.
    pub reconciliations: Counter,
    /// Reconciles that failed, by error kind.
    pub failures: Family<ErrorLabels, Counter>,
    /// Time a reconcile takes, in seconds.
    pub reconcile_duration: Histogram,
    /// Profiles by verdict, as of the last render.
    pub profiles: Family<VerdictLabels, Gauge>,
    /// Times the node-agent configuration changed.
    pub config_updates: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciliations: Counter::default(),
            failures: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            profiles: Family::default(),
            config_updates: Counter::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `trazor_operator_` prefix.
    pub fn register(self, registry: &mut Registry) -> Self {
        let sub = registry.sub_registry_with_prefix("trazor_operator");
        sub.register(
            "reconciliations",
            "Reconciles started",
            self.reconciliations.clone(),
        );
        sub.register(
            "reconcile_failures",
            "Reconciles that failed, by error kind",
            self.failures.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "Time a reconcile takes",
            self.reconcile_duration.clone(),
        );
        sub.register(
            "profiles",
            "TraceProfiles by verdict, as of the last render",
            self.profiles.clone(),
        );
        sub.register(
            "config_updates",
            "Times the node-agent configuration changed",
            self.config_updates.clone(),
        );
        self
    }

    /// Counts a reconcile and measures it until the returned guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciliations.inc();
        ReconcileTimer {
            histogram: &self.reconcile_duration,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, error: &Error) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }

    /// Records how many profiles ended up with each verdict.
    pub fn set_profiles(&self, applied: usize, invalid: usize, conflicting: usize) {
        for (reason, count) in [
            ("Applied", applied),
            ("InvalidSpec", invalid),
            ("ConflictingProfile", conflicting),
        ] {
            self.profiles
                .get_or_create(&VerdictLabels { reason })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Renders all registered metrics in the Prometheus text format.
    pub fn encode(registry: &Registry) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error here would be a bug in the encoder.
        if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Observes the reconcile duration when dropped.
pub struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes_with_prefix() {
        let mut registry = Registry::default();
        let metrics = Metrics::default().register(&mut registry);
        drop(metrics.reconcile_started());
        metrics.reconcile_failed(&Error::CacheNotReady("pods"));
        metrics.set_profiles(2, 1, 0);
        let text = Metrics::encode(&registry);
        assert!(
            text.contains("trazor_operator_reconciliations_total 1"),
            "{text}"
        );
        assert!(
            text.contains("trazor_operator_reconcile_failures_total{error=\"cache_not_ready\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("trazor_operator_profiles{reason=\"InvalidSpec\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("trazor_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
