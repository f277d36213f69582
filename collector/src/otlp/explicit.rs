//! Explicit-bucket duration histograms, for backends and dashboards that read classic
//! buckets (`http_server_request_duration_seconds_bucket{le="0.005"}` after Prometheus's
//! translation): `OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=
//! explicit_bucket_histogram`, as any OpenTelemetry SDK reads it. Trazor's default stays
//! the exponential histogram, which keeps the kernel's accuracy ([`super::seconds`]).
//!
//! The boundaries are the HTTP semantic conventions' advice for `http.server.request.duration`
//! and `http.client.request.duration` ([`DURATION_BOUNDARIES`], seconds), so dashboards
//! built on SDK-instrumented services find the same `le` values.
//!
//! The method: each kernel bucket (scale `s`, ns) goes whole, count unsplit, to the explicit
//! bucket `(b[j-1], b[j]]` that holds the logarithmic middle of its interval. A kernel bucket
//! inside one explicit bucket is counted there exactly; one that straddles a boundary (its
//! latencies lie within one kernel bucket, 1.09 % at scale 6, of the boundary) is counted in
//! one of the two buckets beside the boundary. So: count, sum, min and max are exact, and
//! each request is counted in the bucket of a latency within [`MISPLACEMENT_BOUND`] of its
//! own. The unit test checks this over every kernel bucket from 1 µs to 60 s.

use std::str::FromStr;

use trazor_proto::v1::ExponentialHistogram;

use super::seconds::NANOS_PER_SECOND;

/// The HTTP semantic conventions' explicit bucket boundaries for request durations, seconds.
pub const DURATION_BOUNDARIES: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// At the kernel's scale 6, how far (relative) a request's latency may be from the bucket
/// it is counted in: one kernel bucket, `2^(1/64) - 1`.
pub const MISPLACEMENT_BOUND: f64 = 0.010_889_286_051_700_46;

/// How duration histograms are exported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HistogramAggregation {
    /// Exponential (base-2) buckets: the kernel's accuracy (Trazor's default).
    #[default]
    Exponential,
    /// The conventions' explicit buckets ([`DURATION_BOUNDARIES`]).
    Explicit,
}

impl FromStr for HistogramAggregation {
    type Err = String;

    /// The values of `OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION`.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "base2_exponential_bucket_histogram" => Ok(Self::Exponential),
            "explicit_bucket_histogram" => Ok(Self::Explicit),
            other => Err(format!(
                "OTLP histogram aggregation {other:?} is not one of \
                 base2_exponential_bucket_histogram, explicit_bucket_histogram"
            )),
        }
    }
}

/// `histogram` (nanoseconds, any scale) as counts of the explicit buckets of `boundaries`
/// (seconds, ascending): `boundaries.len() + 1` counts, the last for values above the last
/// boundary. Each kernel bucket is counted whole where the middle of its interval falls.
pub fn bucket_counts(histogram: &ExponentialHistogram, boundaries: &[f64]) -> Vec<u64> {
    let mut counts = vec![0u64; boundaries.len() + 1];
    let base_log2 = (-f64::from(histogram.scale)).exp2();
    for (index, count) in histogram.sparse() {
        let middle = ((f64::from(index) + 0.5) * base_log2).exp2() / NANOS_PER_SECOND;
        let bucket = boundaries.partition_point(|&boundary| boundary < middle);
        counts[bucket] = counts[bucket].saturating_add(count);
    }
    counts
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::otlp::seconds::kernel_buckets::{HISTOGRAM_SCALE as SCALE, bounds, bucket_index};

    /// The kernel's bucket of `nanos` (none of the values here is on a boundary).
    fn kernel_bucket(nanos: u64) -> i32 {
        bucket_index(nanos).unwrap()
    }

    /// The explicit bucket holding `seconds`.
    fn explicit_bucket(seconds: f64) -> usize {
        DURATION_BOUNDARIES.partition_point(|&boundary| boundary < seconds)
    }

    #[test]
    fn every_kernel_bucket_lands_in_its_own_explicit_bucket_or_beside_a_boundary_it_straddles() {
        let mut straddling = 0;
        for index in kernel_bucket(1_000)..=kernel_bucket(60_000_000_000) {
            let histogram =
                ExponentialHistogram::from_sparse(SCALE, &BTreeMap::from([(index, 3)])).unwrap();
            let counts = bucket_counts(&histogram, &DURATION_BOUNDARIES);
            assert_eq!(counts.iter().sum::<u64>(), 3);
            let landed = counts.iter().position(|&count| count == 3).unwrap();
            let (low, high) = bounds(SCALE, i64::from(index));
            let (low, high) = (low / NANOS_PER_SECOND, high / NANOS_PER_SECOND);
            // Latencies in the kernel bucket: just above its low end, and its high end.
            let (first, last) = (explicit_bucket(low * (1.0 + 1e-12)), explicit_bucket(high));
            if first == last {
                assert_eq!(landed, first, "kernel bucket {index} ({low} s, {high} s]");
            } else {
                // Straddles a boundary: one of the two buckets beside it, and every latency
                // of the kernel bucket within one kernel bucket of that explicit bucket.
                straddling += 1;
                assert_eq!(last, first + 1, "kernel bucket {index} spans one boundary");
                assert!(landed == first || landed == last, "kernel bucket {index}");
                assert!(high / low - 1.0 <= MISPLACEMENT_BOUND * (1.0 + 1e-9));
            }
        }
        // Each of the 14 boundaries between 1 µs and 60 s lies inside one kernel bucket.
        assert_eq!(straddling, DURATION_BOUNDARIES.len());
    }

    #[test]
    fn counts_are_kept_and_ordered() {
        // 1 ms ×5, 7 ms ×2, 80 ms, 3 s, 20 s: buckets (…, 0.005], (0.005, 0.01],
        // (0.075, 0.1], (2.5, 5], and the overflow.
        let mut buckets = BTreeMap::new();
        for (millis, count) in [(1, 5), (7, 2), (80, 1), (3_000, 1), (20_000, 1)] {
            *buckets
                .entry(kernel_bucket(millis * 1_000_000))
                .or_insert(0) += count;
        }
        let histogram = ExponentialHistogram::from_sparse(SCALE, &buckets).unwrap();
        let counts = bucket_counts(&histogram, &DURATION_BOUNDARIES);
        assert_eq!(counts, vec![5, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1]);
    }

    #[test]
    fn the_bound_is_one_kernel_bucket() {
        assert!(((1.0f64 / 64.0).exp2() - 1.0 - MISPLACEMENT_BOUND).abs() < 1e-15);
    }

    #[test]
    fn reads_the_sdk_variables_values() {
        assert_eq!(
            "explicit_bucket_histogram".parse(),
            Ok(HistogramAggregation::Explicit)
        );
        assert_eq!(
            " BASE2_EXPONENTIAL_BUCKET_HISTOGRAM".parse(),
            Ok(HistogramAggregation::Exponential)
        );
        let error = "linear".parse::<HistogramAggregation>().unwrap_err();
        assert!(error.contains("explicit_bucket_histogram"), "{error}");
    }
}
