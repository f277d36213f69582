//! Arithmetic on [`ExponentialHistogram`]: building from sparse buckets, exact merging and
//! quantile estimation. Agents and the collector share it, so a merged histogram answers
//! exactly as if one agent had counted every request.

use std::collections::BTreeMap;

use crate::v1::ExponentialHistogram;

/// Buckets in a dense histogram beyond which [`ExponentialHistogram::from_sparse`] refuses:
/// 1 µs to 60 s at scale 6 needs 1 652, so this bounds memory against garbage input.
pub const MAX_DENSE_BUCKETS: usize = 8_192;

/// Why a histogram could not be built or merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistogramError {
    #[error("histograms of different scales ({0} and {1}) cannot be merged exactly")]
    ScaleMismatch(i32, i32),
    #[error("histogram would span {0} buckets, more than the limit of {MAX_DENSE_BUCKETS}")]
    TooWide(usize),
}

impl ExponentialHistogram {
    /// A dense histogram from `(bucket index, count)` pairs; zero counts are dropped.
    pub fn from_sparse(scale: i32, buckets: &BTreeMap<i32, u64>) -> Result<Self, HistogramError> {
        let mut nonzero = buckets.iter().filter(|(_, count)| **count > 0);
        let Some((&first, _)) = nonzero.next() else {
            return Ok(Self {
                scale,
                offset: 0,
                bucket_counts: Vec::new(),
            });
        };
        let last = nonzero.next_back().map_or(first, |(&index, _)| index);
        let width = (i64::from(last) - i64::from(first) + 1) as usize;
        if width > MAX_DENSE_BUCKETS {
            return Err(HistogramError::TooWide(width));
        }
        let mut bucket_counts = vec![0u64; width];
        for (&index, &count) in buckets.range(first..=last) {
            bucket_counts[(index - first) as usize] += count;
        }
        Ok(Self {
            scale,
            offset: first,
            bucket_counts,
        })
    }

    /// Total number of values counted.
    pub fn total(&self) -> u64 {
        self.bucket_counts
            .iter()
            .fold(0u64, |total, &count| total.saturating_add(count))
    }

    /// `(bucket index, count)` of every non-empty bucket.
    pub fn sparse(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        self.bucket_counts
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(position, &count)| (self.offset.saturating_add(position as i32), count))
    }

    /// Adds `other`'s counts to this histogram: exact, since both use the same buckets.
    ///
    /// Works on the dense form in place (no allocation when `other`'s range lies within this
    /// one's), so the collector can merge at ingest rate. Counts saturate instead of
    /// overflowing: garbage input can make a histogram wrong, never make the process panic.
    pub fn merge(&mut self, other: &Self) -> Result<(), HistogramError> {
        if other.bucket_counts.is_empty() {
            return Ok(());
        }
        if self.bucket_counts.is_empty() {
            self.scale = other.scale;
            self.offset = other.offset;
            self.bucket_counts.clear();
            self.bucket_counts.extend_from_slice(&other.bucket_counts);
            return Ok(());
        }
        if self.scale != other.scale {
            return Err(HistogramError::ScaleMismatch(self.scale, other.scale));
        }
        let self_start = i64::from(self.offset);
        let other_start = i64::from(other.offset);
        let start = self_start.min(other_start);
        let end = (self_start + self.bucket_counts.len() as i64)
            .max(other_start + other.bucket_counts.len() as i64);
        let width = (end - start) as usize;
        if width > MAX_DENSE_BUCKETS {
            return Err(HistogramError::TooWide(width));
        }
        if start < self_start {
            let mut widened = vec![0u64; (self_start - start) as usize];
            widened.extend_from_slice(&self.bucket_counts);
            self.bucket_counts = widened;
            // `start` is one of the two offsets, so it fits an i32.
            self.offset = other.offset;
        }
        self.bucket_counts.resize(width, 0);
        let shift = (other_start - start) as usize;
        for (into, &count) in self.bucket_counts[shift..]
            .iter_mut()
            .zip(&other.bucket_counts)
        {
            *into = into.saturating_add(count);
        }
        Ok(())
    }

    /// Estimated `quantile` (in [0, 1]) of the counted values, or None when empty.
    ///
    /// Takes the bucket holding the value of rank ceil(q * n) and answers the point of that
    /// bucket `(L, U]` with the smallest worst-case relative error, 2LU / (L + U): within
    /// (base - 1) / (base + 1) of every value in it (0.54 % at scale 6).
    pub fn quantile(&self, quantile: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((quantile.clamp(0.0, 1.0) * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (index, count) in self.sparse() {
            seen += count;
            if seen >= rank {
                let base = 2f64.powf(2f64.powi(-self.scale));
                let lower = base.powi(index);
                let upper = lower * base;
                return Some(2.0 * lower * upper / (lower + upper));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(pairs: &[(i32, u64)]) -> ExponentialHistogram {
        ExponentialHistogram::from_sparse(6, &pairs.iter().copied().collect()).unwrap()
    }

    #[test]
    fn dense_form_keeps_every_count_at_its_index() {
        let h = histogram(&[(100, 2), (103, 5)]);
        assert_eq!(h.offset, 100);
        assert_eq!(h.bucket_counts, vec![2, 0, 0, 5]);
        assert_eq!(h.sparse().collect::<Vec<_>>(), vec![(100, 2), (103, 5)]);
        assert_eq!(h.total(), 7);
    }

    #[test]
    fn merge_is_exact_and_order_independent() {
        let a = histogram(&[(10, 1), (12, 4)]);
        let b = histogram(&[(8, 3), (12, 1), (20, 2)]);
        let mut ab = a.clone();
        ab.merge(&b).unwrap();
        let mut ba = b.clone();
        ba.merge(&a).unwrap();
        assert_eq!(ab, ba);
        assert_eq!(
            ab.sparse().collect::<Vec<_>>(),
            vec![(8, 3), (10, 1), (12, 5), (20, 2)]
        );
    }

    #[test]
    fn merge_widens_on_either_side_and_matches_sparse_addition() {
        let mut a = histogram(&[(50, 1), (52, 2)]);
        a.merge(&histogram(&[(40, 3), (51, 1)])).unwrap();
        a.merge(&histogram(&[(60, 4)])).unwrap();
        a.merge(&histogram(&[(45, 5)])).unwrap();
        assert_eq!(a.offset, 40);
        assert_eq!(
            a.sparse().collect::<Vec<_>>(),
            vec![(40, 3), (45, 5), (50, 1), (51, 1), (52, 2), (60, 4)]
        );
        assert_eq!(a.total(), 16);
        let far = ExponentialHistogram {
            scale: 6,
            offset: 40 + MAX_DENSE_BUCKETS as i32,
            bucket_counts: vec![1],
        };
        assert!(matches!(a.merge(&far), Err(HistogramError::TooWide(_))));
        assert_eq!(
            a.total(),
            16,
            "a refused merge leaves the histogram as it was"
        );
    }

    #[test]
    fn merge_refuses_other_scales() {
        let mut a = histogram(&[(1, 1)]);
        let b = ExponentialHistogram {
            scale: 5,
            offset: 0,
            bucket_counts: vec![1],
        };
        assert_eq!(a.merge(&b), Err(HistogramError::ScaleMismatch(6, 5)));
    }

    #[test]
    fn absurd_width_is_an_error_not_an_allocation() {
        let sparse = [(i32::MIN, 1), (i32::MAX, 1)].into_iter().collect();
        assert!(matches!(
            ExponentialHistogram::from_sparse(6, &sparse),
            Err(HistogramError::TooWide(_))
        ));
    }

    #[test]
    fn quantiles_land_within_the_error_bound() {
        // 1..=1000 ms, one value each, bucketed as the kernel does.
        let base = 2f64.powf(1.0 / 64.0);
        let mut sparse = BTreeMap::new();
        for ms in 1..=1000u64 {
            let nanos = (ms * 1_000_000) as f64;
            let index = (nanos.log2() * 64.0).ceil() as i32 - 1;
            *sparse.entry(index).or_insert(0) += 1;
        }
        let h = ExponentialHistogram::from_sparse(6, &sparse).unwrap();
        for (q, exact_ms) in [(0.5, 500.0), (0.95, 950.0), (0.99, 990.0), (1.0, 1000.0)] {
            let estimate = h.quantile(q).unwrap() / 1e6;
            let bound = (base - 1.0) / (base + 1.0) + 1e-9;
            assert!(
                ((estimate - exact_ms) / exact_ms).abs() <= bound,
                "q{q}: {estimate} vs {exact_ms}"
            );
        }
        assert_eq!(ExponentialHistogram::default().quantile(0.5), None);
    }
}
