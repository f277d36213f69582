//! What the sample servers measured themselves, and how the feed's windows compare with it.
//!
//! Each `trazor-sample-server` pod runs with `--latency-log /dev/stdout`: one line per
//! request, "<latency ns> <wall-clock ns when the status line's write returned>", measured
//! over the interval the agent measures. Its pod log is the truth the windows are held to.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use trazor_proto::v1::ExponentialHistogram;

/// Requests one server logged: (latency ns, ended at unix ns).
pub fn parse_latency_log(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let latency = fields.next()?.parse().ok()?;
            let at = fields.next()?.parse().ok()?;
            fields.next().is_none().then_some((latency, at))
        })
        .collect()
}

/// The nearest-rank quantile, the definition the agent's histograms answer with.
pub fn true_quantile(sorted: &[u64], quantile: f64) -> u64 {
    let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The histogram of a feed window (`histogram: {scale, offset, counts}`, ns).
pub fn window_histogram(window: &Value) -> Result<ExponentialHistogram> {
    let histogram = &window["histogram"];
    let scale = histogram["scale"].as_i64().context("histogram.scale")? as i32;
    let offset = histogram["offset"].as_i64().context("histogram.offset")? as i32;
    let buckets: BTreeMap<i32, u64> = histogram["counts"]
        .as_array()
        .context("histogram.counts")?
        .iter()
        .enumerate()
        .filter_map(|(index, count)| Some((offset + index as i32, count.as_u64()?)))
        .filter(|(_, count)| *count > 0)
        .collect();
    Ok(ExponentialHistogram::from_sparse(scale, &buckets)?)
}

/// All windows merged into one histogram.
pub fn merged(windows: &[Value]) -> Result<ExponentialHistogram> {
    let mut total: Option<ExponentialHistogram> = None;
    for window in windows {
        let histogram = window_histogram(window)?;
        match &mut total {
            None => total = Some(histogram),
            Some(total) => total.merge(&histogram)?,
        }
    }
    total.context("no windows to merge")
}

/// One percentile compared: (label, reported ms, true ms, allowed ± ms).
pub struct Comparison {
    pub label: String,
    pub reported_ms: f64,
    pub true_ms: f64,
    pub allowed_ms: f64,
}

/// Compares the merged histogram's percentiles with the true ones: each within 1 % + 100 µs.
pub fn compare_percentiles(
    histogram: &ExponentialHistogram,
    latencies: &mut [u64],
    quantiles: &[f64],
) -> Result<Vec<Comparison>> {
    latencies.sort_unstable();
    let mut comparisons = Vec::new();
    for &quantile in quantiles {
        let reported = histogram.quantile(quantile).context("empty histogram")?;
        let truth = true_quantile(latencies, quantile) as f64;
        let allowed = truth * 0.01 + 100_000.0;
        let comparison = Comparison {
            label: format!("p{}", quantile * 100.0),
            reported_ms: reported / 1e6,
            true_ms: truth / 1e6,
            allowed_ms: allowed / 1e6,
        };
        if (reported - truth).abs() > allowed {
            bail!(
                "{}: reported {:.3} ms, the server measured {:.3} ms (allowed ± {:.3} ms) over {} requests",
                comparison.label,
                comparison.reported_ms,
                comparison.true_ms,
                comparison.allowed_ms,
                latencies.len()
            );
        }
        comparisons.push(comparison);
    }
    Ok(comparisons)
}

/// Sequences of one (agent, boot) that are missing between the first and last seen.
pub fn sequence_gaps(sequences: &[u64]) -> Vec<u64> {
    let mut sorted = sequences.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
        .windows(2)
        .flat_map(|pair| pair[0] + 1..pair[1])
        .collect()
}
