//! Latency histograms in seconds, as the HTTP semantic conventions want them, from the
//! kernel's histograms in nanoseconds.
//!
//! Why re-bucketing is needed: bucket `i` of an exponential histogram at scale `s` is
//! `(2^(i/2^s), 2^((i+1)/2^s)]`. Dividing every value by 10^9 keeps the buckets only if
//! 10^9 is a power of the base, i.e. if `2^s * log2(10^9)` is an integer; it never is
//! (log2(10^9) = 29.897… is irrational), so a kernel bucket in ns straddles buckets in s.
//!
//! The method: each kernel bucket (scale `s`, ns) goes whole, count unsplit, to the one
//! bucket at scale `s + 2` (in s) that holds the logarithmic middle of its interval in
//! seconds. A bucket at scale `s + 2` is a quarter of a kernel bucket, and the one holding
//! the middle lies wholly inside the kernel bucket's interval (its ends are at most 1 and
//! 3 quarters from the interval's start). Therefore:
//!
//! - counts, their order and so every rank are exact: the map from kernel bucket to
//!   exported bucket is strictly increasing (`index * 4 + constant`);
//! - any value a reader takes from an exported bucket (its ends, its middle, Prometheus's
//!   interpolation) is a value of the kernel's bucket: every bound that holds for "a point
//!   of the kernel bucket" holds unchanged, e.g. `2^(1/64) - 1` = 1.09 % for any point;
//! - the least-error point of the exported bucket (`2LU/(L+U)`, what
//!   [`ExponentialHistogram::quantile`] answers) is within [`QUANTILE_ERROR_BOUND`]
//!   (0.605 %) of the true value, against (2^(1/64) - 1)/(2^(1/64) + 1) = 0.5415 % for the
//!   kernel's histogram in ns: the cost of not being able to split a count. For the
//!   kernel's scale 6 the exported scale is 8, the finest Prometheus and Mimir keep (they
//!   downscale anything finer to 8), so the bound is also what such a backend gives.
//!
//! The `seconds` unit test proves the bound over every kernel bucket from 1 µs to 60 s
//! and over random sets of latencies (their exact quantiles against the exported
//! histogram's).

use trazor_proto::v1::ExponentialHistogram;

/// Nanoseconds in a second, as the divisor of every exported value.
pub const NANOS_PER_SECOND: f64 = 1e9;

/// Exported buckets per kernel bucket: a kernel histogram at scale `s` is exported at
/// scale `s + 2`.
const REFINEMENT: i64 = 4;

/// Relative error of the exported histogram's quantile (the least-error point of the
/// bucket holding the rank), for the kernel's scale 6: `2^(d/256) - 1` where `d` =
/// 2.2223 is the greatest distance, in scale-8 buckets, from that point to an end of the
/// kernel bucket it came from (see the module documentation; a test recomputes it).
pub const QUANTILE_ERROR_BOUND: f64 = 0.00605;

/// Exported index of kernel bucket 0 at `scale` (ns): `floor(4 * 0.5 - 2^(scale+2) *
/// log2(10^9))`, the scale-`s+2` bucket (in s) holding the logarithmic middle of kernel
/// bucket 0. Kernel bucket `i` goes to `4i` plus this.
fn shift(scale: i32) -> i64 {
    let target_scale = f64::from(scale + 2);
    let middle = REFINEMENT as f64 * 0.5 - target_scale.exp2() * NANOS_PER_SECOND.log2();
    middle.floor() as i64
}

/// `histogram` (nanoseconds) in seconds: scale + 2, each count moved whole (see the module
/// documentation). Returns `None` for a scale outside what an exponential histogram allows
/// after refinement (OTLP's scale is -10..=20), which no agent sends.
pub fn to_seconds(histogram: &ExponentialHistogram) -> Option<ExponentialHistogram> {
    if !(-10..=18).contains(&histogram.scale) {
        return None;
    }
    let scale = histogram.scale + 2;
    let Some(last) = histogram.bucket_counts.iter().rposition(|count| *count > 0) else {
        return Some(ExponentialHistogram {
            scale,
            offset: 0,
            bucket_counts: Vec::new(),
        });
    };
    let first = histogram
        .bucket_counts
        .iter()
        .position(|count| *count > 0)
        .unwrap_or(last);
    let offset = (i64::from(histogram.offset) + first as i64) * REFINEMENT + shift(histogram.scale);
    let offset = i32::try_from(offset).ok()?;
    // Kernel buckets first..=last, every fourth exported bucket, zeros between.
    let mut bucket_counts = vec![0u64; (last - first) * REFINEMENT as usize + 1];
    for (position, count) in histogram.bucket_counts[first..=last].iter().enumerate() {
        bucket_counts[position * REFINEMENT as usize] = *count;
    }
    Some(ExponentialHistogram {
        scale,
        offset,
        bucket_counts,
    })
}

/// The kernel's buckets as OTLP defines them, for the OTLP tests (this module's, the
/// explicit buckets', the exporter's).
#[cfg(test)]
pub(crate) mod kernel_buckets {
    /// The agents' scale (`trazor_node_agent_ebpf_common::HISTOGRAM_SCALE`).
    pub const HISTOGRAM_SCALE: i32 = 6;

    /// The kernel's bucket of `nanos`: OTLP's definition, `ceil(log2(v) * 64) - 1`, which
    /// the kernel's `bucket_index` is tested to match; `None` within float error of a
    /// boundary, where f64 cannot tell (the kernel's test skips those too).
    pub fn bucket_index(nanos: u64) -> Option<i32> {
        let exact = (nanos as f64).log2() * 64.0;
        ((exact - exact.round()).abs() > 1e-9).then(|| exact.ceil() as i32 - 1)
    }

    /// `(lower, upper]` of bucket `index` at `scale`.
    pub fn bounds(scale: i32, index: i64) -> (f64, f64) {
        let width = (-f64::from(scale)).exp2();
        (
            (index as f64 * width).exp2(),
            ((index + 1) as f64 * width).exp2(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

    use super::{
        kernel_buckets::{HISTOGRAM_SCALE, bounds, bucket_index},
        *,
    };

    /// The point of `(lower, upper]` with the least worst-case relative error.
    fn best_point((lower, upper): (f64, f64)) -> f64 {
        2.0 * lower * upper / (lower + upper)
    }

    fn relative_error(estimate: f64, truth: f64) -> f64 {
        (estimate - truth).abs() / truth
    }

    /// A histogram of one count in kernel bucket `index`, in seconds: (scale, index).
    fn exported_bucket(index: i32) -> (i32, i64) {
        let histogram = ExponentialHistogram {
            scale: HISTOGRAM_SCALE,
            offset: index,
            bucket_counts: vec![1],
        };
        let seconds = to_seconds(&histogram).unwrap();
        assert_eq!(seconds.bucket_counts, vec![1]);
        (seconds.scale, i64::from(seconds.offset))
    }

    #[test]
    fn every_exported_bucket_lies_inside_its_kernel_bucket_and_the_bound_is_what_it_says() {
        // Every kernel bucket from 1 µs to 60 s (and well beyond, both ways).
        let mut worst = 0f64;
        for index in 0..3_000 {
            let (lower, upper) = bounds(HISTOGRAM_SCALE, i64::from(index));
            let (lower, upper) = (lower / NANOS_PER_SECOND, upper / NANOS_PER_SECOND);
            let (scale, exported) = exported_bucket(index);
            assert_eq!(scale, 8);
            let (low, high) = bounds(scale, exported);
            // Inside, with room: a quarter of the kernel bucket is 2^(1/256), so float
            // rounding (1e-15) cannot decide this.
            assert!(
                low > lower * 1.000_001 && high < upper / 1.000_001,
                "kernel bucket {index}: ({lower}, {upper}] s, exported ({low}, {high}]"
            );
            // The worst value of the kernel bucket against the exported best point.
            let point = best_point((low, high));
            worst = worst
                .max(relative_error(point, lower))
                .max(relative_error(point, upper));
        }
        assert!(worst <= QUANTILE_ERROR_BOUND, "{worst}");
        // The bound is tight (not a comfortable overestimate), and above the kernel's.
        assert!(worst > 0.00603, "{worst}");
        let base = (1f64 / 64.0).exp2();
        assert!((base - 1.0) / (base + 1.0) < worst);
    }

    #[test]
    fn random_latencies_keep_count_order_and_the_quantile_bound() {
        let mut random = StdRng::seed_from_u64(15);
        let mut worst = 0f64;
        let mut compared = 0u64;
        for _ in 0..400 {
            // Latencies log-uniform over a random span inside 1 µs .. 60 s.
            let low = random.random_range(3.0..10.7f64);
            let high = random.random_range(low..10.78f64);
            let size = random.random_range(1..2_000usize);
            let mut latencies: Vec<u64> = (0..size)
                .map(|_| 10f64.powf(random.random_range(low..=high)) as u64)
                .filter(|&nanos| bucket_index(nanos).is_some())
                .collect();
            let size = latencies.len();
            if size == 0 {
                continue;
            }
            let mut buckets = BTreeMap::new();
            for &nanos in &latencies {
                let index = bucket_index(nanos).unwrap();
                *buckets.entry(index).or_insert(0u64) += 1;
            }
            let kernel = ExponentialHistogram::from_sparse(HISTOGRAM_SCALE, &buckets).unwrap();
            let seconds = to_seconds(&kernel).unwrap();
            assert_eq!(seconds.total(), kernel.total());
            assert_eq!(
                seconds.sparse().map(|(_, count)| count).collect::<Vec<_>>(),
                kernel.sparse().map(|(_, count)| count).collect::<Vec<_>>(),
                "counts in the same order"
            );
            latencies.sort_unstable();
            for quantile in [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
                let rank = ((quantile * size as f64).ceil() as usize).clamp(1, size);
                let truth = latencies[rank - 1] as f64 / NANOS_PER_SECOND;
                let estimate = seconds.quantile(quantile).unwrap();
                let error = relative_error(estimate, truth);
                assert!(
                    error <= QUANTILE_ERROR_BOUND,
                    "q{quantile} of {size}: {estimate} s for {truth} s ({error})"
                );
                worst = worst.max(error);
                compared += 1;
            }
        }
        assert!(compared > 3_500, "{compared}");
        // The random values come near the bound, so it is not loose.
        assert!(worst > 0.0055, "{worst}");
    }

    #[test]
    fn merging_then_converting_equals_converting_then_merging() {
        let a = ExponentialHistogram::from_sparse(6, &BTreeMap::from([(1_300, 2), (1_400, 1)]))
            .unwrap();
        let b = ExponentialHistogram::from_sparse(6, &BTreeMap::from([(1_350, 5), (1_500, 3)]))
            .unwrap();
        let mut merged = a.clone();
        merged.merge(&b).unwrap();
        let mut converted = to_seconds(&a).unwrap();
        converted.merge(&to_seconds(&b).unwrap()).unwrap();
        assert_eq!(to_seconds(&merged).unwrap(), converted);
    }

    #[test]
    fn empty_and_unusable_histograms() {
        let empty = ExponentialHistogram {
            scale: 6,
            offset: 5,
            bucket_counts: vec![0, 0],
        };
        let seconds = to_seconds(&empty).unwrap();
        assert_eq!((seconds.scale, seconds.total()), (8, 0));
        let too_fine = ExponentialHistogram {
            scale: 19,
            offset: 0,
            bucket_counts: vec![1],
        };
        assert_eq!(to_seconds(&too_fine), None);
        // Leading and trailing zeros are not carried over.
        let padded = ExponentialHistogram {
            scale: 6,
            offset: 1_000,
            bucket_counts: vec![0, 3, 0, 2, 0],
        };
        let seconds = to_seconds(&padded).unwrap();
        assert_eq!(seconds.bucket_counts, vec![3, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(i64::from(seconds.offset), 1_001 * 4 + shift(6));
    }
}
