//! A window's requests by status code ([`LatencyWindow::statuses`]), read the same way by
//! every consumer: the compact single-entry form resolved, and a breakdown that contradicts
//! its window refused with a reason.

use crate::v1::{ExponentialHistogram, LatencyWindow};

/// Status codes a window may carry. Agents fold the codes past their own limit (16) into
/// code 0, so this is a bound against garbage input, not a limit a real agent meets.
pub const MAX_STATUS_CODES: usize = 64;

/// One status code's share of a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatusShare<'a> {
    /// 100..=599, or 0 when unknown (see [`crate::v1::StatusLatency::status_code`]).
    pub status_code: u32,
    pub count: u64,
    pub sum_nanos: u64,
    pub min_nanos: u64,
    pub max_nanos: u64,
    /// `None` when the window has none.
    pub histogram: Option<&'a ExponentialHistogram>,
}

impl LatencyWindow {
    /// The window's requests by status code, in code order. A window without a breakdown
    /// (from an agent before it) is one share of code 0: all of it, status unknown.
    pub fn status_shares(&self) -> Result<Vec<StatusShare<'_>>, String> {
        let count = self.stats.as_ref().map_or(0, |stats| stats.count);
        match self.statuses.as_slice() {
            [] => return Ok(vec![self.whole_share(0)]),
            [only] => {
                if only.count != count {
                    return Err(format!(
                        "its only status ({}) counts {} requests, the window {count}",
                        only.status_code, only.count
                    ));
                }
                return Ok(vec![self.whole_share(only.status_code)]);
            }
            _ => {}
        }
        if self.statuses.len() > MAX_STATUS_CODES {
            return Err(format!(
                "{} status codes, more than the limit of {MAX_STATUS_CODES}",
                self.statuses.len()
            ));
        }
        let mut shares = Vec::with_capacity(self.statuses.len());
        let mut total = 0u64;
        for status in &self.statuses {
            if let Some(previous) = shares
                .last()
                .map(|share: &StatusShare<'_>| share.status_code)
                && previous >= status.status_code
            {
                return Err(format!(
                    "status {} follows {previous}: codes must be distinct and ascending",
                    status.status_code
                ));
            }
            total = total.saturating_add(status.count);
            shares.push(StatusShare {
                status_code: status.status_code,
                count: status.count,
                sum_nanos: status.sum_nanos,
                min_nanos: status.min_nanos,
                max_nanos: status.max_nanos,
                histogram: status.histogram.as_ref(),
            });
        }
        if total != count {
            return Err(format!(
                "its statuses count {total} requests, the window {count}"
            ));
        }
        Ok(shares)
    }

    /// [`Self::status_shares`], or when the breakdown contradicts the window (which
    /// ingest refuses, so only a window that skipped it), the whole window as status unknown:
    /// nothing is lost, only the split.
    pub fn status_shares_or_unknown(&self) -> Vec<StatusShare<'_>> {
        self.status_shares()
            .unwrap_or_else(|_| vec![self.whole_share(0)])
    }

    /// All of the window, as the share of `status_code`.
    fn whole_share(&self, status_code: u32) -> StatusShare<'_> {
        let stats = self.stats.as_ref();
        StatusShare {
            status_code,
            count: stats.map_or(0, |stats| stats.count),
            sum_nanos: stats.map_or(0, |stats| stats.sum_nanos),
            min_nanos: stats.map_or(0, |stats| stats.min_nanos),
            max_nanos: stats.map_or(0, |stats| stats.max_nanos),
            histogram: self.histogram.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{LatencyStats, StatusLatency};

    fn window(count: u64, statuses: Vec<StatusLatency>) -> LatencyWindow {
        LatencyWindow {
            stats: Some(LatencyStats {
                count,
                sum_nanos: 60,
                min_nanos: 5,
                max_nanos: 30,
                ..LatencyStats::default()
            }),
            histogram: Some(ExponentialHistogram {
                scale: 6,
                offset: 10,
                bucket_counts: vec![count],
            }),
            statuses,
            ..LatencyWindow::default()
        }
    }

    fn status(status_code: u32, count: u64) -> StatusLatency {
        StatusLatency {
            status_code,
            count,
            sum_nanos: 10 * count,
            min_nanos: 10,
            max_nanos: 10,
            histogram: Some(ExponentialHistogram {
                scale: 6,
                offset: 10,
                bucket_counts: vec![count],
            }),
        }
    }

    #[test]
    fn a_window_without_statuses_is_one_unknown_share_of_everything() {
        let window = window(3, Vec::new());
        let shares = window.status_shares().unwrap();
        assert_eq!(shares.len(), 1);
        assert_eq!((shares[0].status_code, shares[0].count), (0, 3));
        assert_eq!(
            (
                shares[0].sum_nanos,
                shares[0].min_nanos,
                shares[0].max_nanos
            ),
            (60, 5, 30)
        );
        assert_eq!(shares[0].histogram, window.histogram.as_ref());
    }

    #[test]
    fn a_single_status_takes_the_windows_distribution() {
        let window = window(
            3,
            vec![StatusLatency {
                status_code: 404,
                count: 3,
                ..StatusLatency::default()
            }],
        );
        let shares = window.status_shares().unwrap();
        assert_eq!(shares.len(), 1);
        assert_eq!((shares[0].status_code, shares[0].count), (404, 3));
        assert_eq!((shares[0].sum_nanos, shares[0].max_nanos), (60, 30));
        assert_eq!(shares[0].histogram, window.histogram.as_ref());
    }

    #[test]
    fn several_statuses_keep_their_own_distributions() {
        let window = window(5, vec![status(200, 4), status(503, 1)]);
        let shares = window.status_shares().unwrap();
        let codes: Vec<(u32, u64, u64)> = shares
            .iter()
            .map(|share| {
                (
                    share.status_code,
                    share.count,
                    share.histogram.unwrap().total(),
                )
            })
            .collect();
        assert_eq!(codes, vec![(200, 4, 4), (503, 1, 1)]);
        assert_eq!(shares[0].sum_nanos, 40);
    }

    #[test]
    fn a_breakdown_that_contradicts_its_window_is_refused() {
        let error = window(5, vec![status(200, 4)]).status_shares().unwrap_err();
        assert!(error.contains("counts 4 requests, the window 5"), "{error}");
        let error = window(5, vec![status(200, 3), status(500, 1)])
            .status_shares()
            .unwrap_err();
        assert!(error.contains("count 4 requests, the window 5"), "{error}");
        let error = window(2, vec![status(500, 1), status(200, 1)])
            .status_shares()
            .unwrap_err();
        assert!(error.contains("distinct and ascending"), "{error}");
        let many = (0..=MAX_STATUS_CODES as u32).map(|code| status(100 + code, 1));
        let error = window(MAX_STATUS_CODES as u64 + 1, many.collect())
            .status_shares()
            .unwrap_err();
        assert!(error.contains("more than the limit"), "{error}");
    }
}
