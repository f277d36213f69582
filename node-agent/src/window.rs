//! Window: turns the kernel's closed series into [`LatencyWindow`]s, one per source,
//! direction, route and peer, with totals, status classes, quantiles, the histogram itself,
//! the same split by status code, and a few exemplars.
//!
//! The kernel keys series finer (method, status code, raw route hash); they are merged
//! here exactly, by adding histogram buckets, never by combining percentiles.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use trazor_node_agent_ebpf_common::{
    HISTOGRAM_SCALE, PATH_LEN, RequestEvent, SeriesKey, SeriesTotals, event_flag, method,
};
use trazor_proto::v1::{
    Direction, Exemplar, ExponentialHistogram, LatencyStats, LatencyWindow, Peer, Quantile,
    StatusLatency,
};

use crate::{
    attribute::SourceResolver,
    capture::ClosedSeries,
    route::{OVERFLOW_ROUTE, RouteNamer},
};

/// Requests whose status is 5xx count as errors.
const ERROR_STATUS_CLASS: u8 = 5;
/// Status codes a window keeps apart; the requests of rarer codes beyond them are folded
/// into code 0 (unknown), so that a server answering with many codes cannot multiply the
/// series downstream.
pub const MAX_STATUS_CODES_PER_WINDOW: usize = 16;
/// Exemplars kept per window (the slowest).
pub const MAX_EXEMPLARS_PER_WINDOW: usize = 8;

/// Builds windows from closed series.
#[derive(Clone, Debug)]
pub struct WindowBuilder {
    window: Duration,
    quantiles: Vec<f64>,
}

/// What one build did besides producing windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildReport {
    /// Requests folded into the `other` route by the per-source series cap.
    pub requests_over_series_cap: u64,
    /// Requests whose status code was folded into code 0 by [`MAX_STATUS_CODES_PER_WINDOW`].
    pub requests_over_status_cap: u64,
}

/// (window, cgroup id, tgid): the unit the series cap applies to.
type SourceInWindow = (u32, u64, u32);
/// (route, method, peer address, peer is IPv6, peer port, direction): one series of a
/// source.
type SeriesIdentity = (String, u8, u32, u8, u16, u8);

#[derive(Hash, PartialEq, Eq, PartialOrd, Ord, Clone, Debug)]
struct WindowKey {
    window: u32,
    cgroup_id: u64,
    tgid: u32,
    direction: u8,
    route: String,
    method: u8,
    peer_addr: u32,
    peer_ipv6: u8,
    peer_port: u16,
}

#[derive(Default)]
struct Accumulator {
    totals: Totals,
    errors: u64,
    status_classes: [u64; 6],
    by_status: BTreeMap<u16, Totals>,
    exemplars: Vec<Exemplar>,
}

/// Count, sum, min, max and histogram of some requests.
#[derive(Default)]
struct Totals {
    totals: SeriesTotals,
    buckets: BTreeMap<i32, u64>,
}

impl Totals {
    fn add(&mut self, series: &SeriesTotals, buckets: &BTreeMap<i32, u64>) {
        self.totals.merge(series);
        for (&bucket, &count) in buckets {
            *self.buckets.entry(bucket).or_default() += count;
        }
    }

    fn fold_into(self, into: &mut Self) {
        into.add(&self.totals, &self.buckets);
    }

    fn histogram(&self) -> ExponentialHistogram {
        match ExponentialHistogram::from_sparse(HISTOGRAM_SCALE, &self.buckets) {
            Ok(histogram) => histogram,
            Err(error) => {
                tracing::warn!(%error, "dropping a malformed histogram");
                ExponentialHistogram::default()
            }
        }
    }
}

/// A status line's code as a window reports it: 0 for one outside 100..=599.
fn reported_status(status: u16) -> u16 {
    if (100..600).contains(&status) {
        status
    } else {
        0
    }
}

impl WindowBuilder {
    pub fn new(window: Duration, quantiles: Vec<f64>) -> Self {
        Self { window, quantiles }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// One [`LatencyWindow`] per (window, cgroup, process, direction, route, method, peer), sequence
    /// unset (0), ordered by window then source. `events` are the kernel's exemplars (what
    /// announcements name is learnt as they arrive: [`learn_announcements`]);
    /// `realtime_offset_nanos` turns their monotonic times into wall time.
    pub fn build(
        &self,
        closed: Vec<ClosedSeries>,
        events: &[RequestEvent],
        realtime_offset_nanos: u64,
        resolver: &mut SourceResolver,
        routes: &RouteNamer,
    ) -> (Vec<LatencyWindow>, BuildReport) {
        let mut report = BuildReport::default();
        let mut grouped: HashMap<WindowKey, Accumulator> = HashMap::new();
        let mut series_per_source: HashMap<SourceInWindow, HashSet<SeriesIdentity>> =
            HashMap::new();
        let key_of = |series: &SeriesKey,
                      routes: &RouteNamer,
                      series_per_source: &mut HashMap<_, HashSet<_>>,
                      report: &mut BuildReport,
                      count: u64| {
            let mut route = routes.name(series.route).to_owned();
            let seen = series_per_source
                .entry((series.window, series.cgroup_id, series.tgid))
                .or_default();
            let identity = (
                route.clone(),
                series.method,
                series.peer_addr,
                series.peer_ipv6,
                series.peer_port,
                series.direction,
            );
            if !seen.contains(&identity) {
                if seen.len() >= routes.max_series_per_source() {
                    route = OVERFLOW_ROUTE.to_owned();
                    report.requests_over_series_cap += count;
                } else {
                    seen.insert(identity);
                }
            }
            WindowKey {
                window: series.window,
                cgroup_id: series.cgroup_id,
                tgid: series.tgid,
                direction: series.direction,
                route,
                method: series.method,
                peer_addr: series.peer_addr,
                peer_ipv6: series.peer_ipv6,
                peer_port: series.peer_port,
            }
        };
        let mut closed = closed;
        // Busiest series first, so the cap folds the long tail, not the main routes.
        closed.sort_by_key(|series| std::cmp::Reverse(series.totals.count));
        let mut keys_by_series: HashMap<SeriesKey, WindowKey> = HashMap::new();
        for series in closed {
            if series.totals.count == 0 {
                continue;
            }
            let key = key_of(
                &series.key,
                routes,
                &mut series_per_source,
                &mut report,
                series.totals.count,
            );
            keys_by_series.insert(series.key, key.clone());
            let entry = grouped.entry(key).or_default();
            entry.totals.add(&series.totals, &series.buckets);
            let status = reported_status(series.key.status);
            let status_class = (status / 100) as u8;
            if status_class == ERROR_STATUS_CLASS {
                entry.errors += series.totals.count;
            }
            entry.status_classes[usize::from(status_class)] += series.totals.count;
            entry
                .by_status
                .entry(status)
                .or_default()
                .add(&series.totals, &series.buckets);
        }
        for event in events {
            if event.flags & event_flag::EXEMPLAR == 0 {
                continue;
            }
            let Some(key) = keys_by_series.get(&event.series) else {
                continue;
            };
            if let Some(entry) = grouped.get_mut(key) {
                let len = usize::from(event.path_len).min(PATH_LEN);
                entry.exemplars.push(Exemplar {
                    start_unix_nanos: event.start_nanos.saturating_add(realtime_offset_nanos),
                    duration_nanos: event.duration_nanos,
                    method: method::name(event.series.method).to_owned(),
                    status_code: u32::from(event.status),
                    path: String::from_utf8_lossy(&event.path[..len]).into_owned(),
                    tid: event.tid,
                });
            }
        }
        let mut keys: Vec<WindowKey> = grouped.keys().cloned().collect();
        keys.sort();
        let window_nanos = self.window.as_nanos() as u64;
        let windows = keys
            .into_iter()
            .filter_map(|key| {
                let mut accumulator = grouped.remove(&key)?;
                let statuses = status_latencies(
                    std::mem::take(&mut accumulator.by_status),
                    &mut report.requests_over_status_cap,
                );
                let totals = &accumulator.totals;
                let histogram = totals.histogram();
                let quantiles = self
                    .quantiles
                    .iter()
                    .filter_map(|&quantile| {
                        let value = histogram.quantile(quantile)?;
                        Some(Quantile {
                            quantile,
                            value_nanos: (value.round() as u64)
                                .clamp(totals.totals.min_nanos, totals.totals.max_nanos),
                        })
                    })
                    .collect();
                let mut exemplars = accumulator.exemplars;
                exemplars.sort_by_key(|exemplar| std::cmp::Reverse(exemplar.duration_nanos));
                exemplars.truncate(MAX_EXEMPLARS_PER_WINDOW);
                let start = u64::from(key.window) * window_nanos;
                let client = key.direction == 2;
                Some(LatencyWindow {
                    sequence: 0,
                    source: Some(resolver.resolve(key.cgroup_id, key.tgid)),
                    direction: if client {
                        Direction::Client
                    } else {
                        Direction::Server
                    } as i32,
                    start_unix_nanos: start,
                    end_unix_nanos: start + window_nanos,
                    stats: Some(LatencyStats {
                        count: totals.totals.count,
                        error_count: accumulator.errors,
                        sum_nanos: totals.totals.sum_nanos,
                        min_nanos: totals.totals.min_nanos,
                        max_nanos: totals.totals.max_nanos,
                        quantiles,
                    }),
                    histogram: Some(histogram),
                    status_class_counts: accumulator.status_classes.to_vec(),
                    profile: String::new(),
                    route: key.route,
                    peer: client.then(|| Peer {
                        address: if key.peer_ipv6 == 0 {
                            Ipv4Addr::from(key.peer_addr.to_le_bytes()).to_string()
                        } else {
                            // Unknown only if the connection's announcement was lost
                            // (counted as event_ring_full).
                            resolver
                                .ipv6_peer(key.peer_addr)
                                .map_or_else(|| "unknown IPv6".to_owned(), |peer| peer.to_string())
                        },
                        port: u32::from(key.peer_port),
                    }),
                    exemplars,
                    method: method::name(key.method).to_owned(),
                    statuses,
                })
            })
            .collect();
        (windows, report)
    }
}

/// Learns what the kernel's announcements name (see [`event_flag::ANNOUNCE`]): routes,
/// process names and IPv6 peers. Returns the route hashes announced, for the kernel's table
/// of known routes.
pub fn learn_announcements(
    events: &[RequestEvent],
    resolver: &mut SourceResolver,
    routes: &mut RouteNamer,
) -> Vec<u32> {
    let mut announced = Vec::new();
    for event in events {
        if event.flags & event_flag::ANNOUNCE == 0 {
            continue;
        }
        let len = usize::from(event.path_len).min(PATH_LEN);
        routes.learn(event.series.route, &event.path[..len]);
        announced.push(event.series.route);
        resolver.remember_process_name(event.series.tgid, &event.comm);
        if event.series.peer_ipv6 != 0 {
            resolver.remember_ipv6_peer(event.series.peer_addr, Ipv6Addr::from(event.peer_addr6));
        }
    }
    announced
}

/// A window's [`StatusLatency`]s, in code order, from its requests by status code: the
/// busiest [`MAX_STATUS_CODES_PER_WINDOW`] kept apart (the rest folded into code 0 and
/// counted into `folded`), and a single status in its compact form (code and count: the
/// rest is the window's).
fn status_latencies(by_status: BTreeMap<u16, Totals>, folded: &mut u64) -> Vec<StatusLatency> {
    let mut by_status = by_status;
    if by_status.len() > MAX_STATUS_CODES_PER_WINDOW {
        let mut busiest: Vec<(u16, u64)> = by_status
            .iter()
            .map(|(&status, totals)| (status, totals.totals.count))
            .collect();
        busiest.sort_by_key(|&(status, count)| (std::cmp::Reverse(count), status));
        let mut unknown = by_status.remove(&0).unwrap_or_default();
        // Code 0 takes one of the places kept.
        for &(status, count) in busiest
            .iter()
            .filter(|(status, _)| *status != 0)
            .skip(MAX_STATUS_CODES_PER_WINDOW - 1)
        {
            if let Some(totals) = by_status.remove(&status) {
                *folded += count;
                totals.fold_into(&mut unknown);
            }
        }
        by_status.insert(0, unknown);
    }
    let single = by_status.len() == 1;
    by_status
        .into_iter()
        .map(|(status, totals)| {
            let mut latency = StatusLatency {
                status_code: u32::from(status),
                count: totals.totals.count,
                ..StatusLatency::default()
            };
            if !single {
                latency.sum_nanos = totals.totals.sum_nanos;
                latency.min_nanos = totals.totals.min_nanos;
                latency.max_nanos = totals.totals.max_nanos;
                latency.histogram = Some(totals.histogram());
            }
            latency
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use trazor_node_agent_ebpf_common::{SeriesTotals, bucket_index};

    use crate::route::RouteTemplate;

    use super::*;

    fn series(window: u32, tgid: u32, status: u16, latencies_ms: &[u64]) -> ClosedSeries {
        let nanos: Vec<u64> = latencies_ms.iter().map(|ms| ms * 1_000_000).collect();
        let mut buckets = BTreeMap::new();
        for &latency in &nanos {
            *buckets.entry(bucket_index(latency)).or_default() += 1;
        }
        ClosedSeries {
            key: SeriesKey {
                cgroup_id: 1,
                window,
                tgid,
                route: 0,
                peer_addr: 0,
                peer_port: 0,
                direction: 1,
                method: 1,
                peer_ipv6: 0,
                _pad: 0,
                status,
            },
            totals: SeriesTotals {
                count: nanos.len() as u64,
                sum_nanos: nanos.iter().sum(),
                min_nanos: *nanos.iter().min().unwrap(),
                max_nanos: *nanos.iter().max().unwrap(),
            },
            buckets,
        }
    }

    #[test]
    fn merges_status_classes_of_one_process_into_one_window() {
        let builder = WindowBuilder::new(Duration::from_secs(10), vec![0.5, 0.99]);
        let mut resolver = SourceResolver::new("n".into(), None);
        let routes = RouteNamer::new(Vec::new(), 10);
        let (windows, _) = builder.build(
            vec![
                series(7, 100, 200, &[10, 20, 30, 40]),
                series(7, 100, 503, &[50]),
                series(7, 200, 200, &[1]),
                series(8, 100, 200, &[5]),
            ],
            &[],
            0,
            &mut resolver,
            &routes,
        );
        assert_eq!(windows.len(), 3);
        let first = &windows[0];
        let stats = first.stats.as_ref().unwrap();
        assert_eq!(first.source.as_ref().unwrap().pid, 100);
        assert_eq!((stats.count, stats.error_count), (5, 1));
        assert_eq!((stats.min_nanos, stats.max_nanos), (10_000_000, 50_000_000));
        assert_eq!(stats.sum_nanos, 150_000_000);
        assert_eq!(first.status_class_counts, vec![0, 0, 4, 0, 0, 1]);
        assert_eq!(first.start_unix_nanos, 70_000_000_000);
        assert_eq!(first.end_unix_nanos, 80_000_000_000);
        assert_eq!(first.histogram.as_ref().unwrap().total(), 5);
        let p50 = stats.quantiles[0].value_nanos as f64;
        assert!((p50 - 30e6).abs() / 30e6 < 0.0055, "p50 {p50}");
        // p99 is the largest value, clamped to the exact max.
        assert!(stats.quantiles[1].value_nanos <= 50_000_000);
        assert_eq!(windows[1].source.as_ref().unwrap().pid, 200);
        assert_eq!(windows[2].start_unix_nanos, 80_000_000_000);
        // Each status keeps its own distribution; together they are the window's.
        let statuses: Vec<(u32, u64, u64, u64, u64, u64)> = first
            .statuses
            .iter()
            .map(|status| {
                (
                    status.status_code,
                    status.count,
                    status.sum_nanos,
                    status.min_nanos,
                    status.max_nanos,
                    status.histogram.as_ref().unwrap().total(),
                )
            })
            .collect();
        assert_eq!(
            statuses,
            vec![
                (200, 4, 100_000_000, 10_000_000, 40_000_000, 4),
                (503, 1, 50_000_000, 50_000_000, 50_000_000, 1),
            ]
        );
        let mut merged = first.statuses[0].histogram.clone().unwrap();
        merged
            .merge(first.statuses[1].histogram.as_ref().unwrap())
            .unwrap();
        assert_eq!(Some(&merged), first.histogram.as_ref());
        // A single status: its code and count, the rest is the window's.
        let single = &windows[1].statuses;
        assert_eq!(single.len(), 1);
        assert_eq!((single[0].status_code, single[0].count), (200, 1));
        assert_eq!(single[0].histogram, None);
        assert_eq!(
            windows[1].status_shares().unwrap()[0].histogram,
            windows[1].histogram.as_ref()
        );
    }

    #[test]
    fn codes_of_one_class_stay_apart_and_odd_codes_are_unknown() {
        let builder = WindowBuilder::new(Duration::from_secs(10), vec![0.5]);
        let mut resolver = SourceResolver::new("n".into(), None);
        let routes = RouteNamer::new(Vec::new(), 10);
        let (windows, report) = builder.build(
            vec![
                series(7, 100, 200, &[1, 1]),
                series(7, 100, 204, &[2]),
                series(7, 100, 404, &[3]),
                series(7, 100, 999, &[4]),
            ],
            &[],
            0,
            &mut resolver,
            &routes,
        );
        assert_eq!(windows.len(), 1);
        let codes: Vec<(u32, u64)> = windows[0]
            .statuses
            .iter()
            .map(|status| (status.status_code, status.count))
            .collect();
        assert_eq!(codes, vec![(0, 1), (200, 2), (204, 1), (404, 1)]);
        assert_eq!(windows[0].status_class_counts, vec![1, 0, 3, 0, 1, 0]);
        assert_eq!(report.requests_over_status_cap, 0);
    }

    #[test]
    fn status_codes_past_the_limit_fold_into_unknown_and_are_counted() {
        let builder = WindowBuilder::new(Duration::from_secs(10), vec![0.5]);
        let mut resolver = SourceResolver::new("n".into(), None);
        let routes = RouteNamer::new(Vec::new(), 10);
        // 200 the busiest, then 20 codes of one request each.
        let mut closed = vec![series(7, 100, 200, &[1, 1, 1])];
        closed.extend((0..20).map(|code| series(7, 100, 400 + code, &[2])));
        let (windows, report) = builder.build(closed, &[], 0, &mut resolver, &routes);
        let statuses = &windows[0].statuses;
        assert_eq!(statuses.len(), MAX_STATUS_CODES_PER_WINDOW);
        assert_eq!(statuses[0].status_code, 0);
        // Code 0 takes one place, 200 another: 14 of the 20 stay apart, 6 are folded.
        assert_eq!(statuses[0].count, 6);
        assert_eq!(report.requests_over_status_cap, 6);
        assert_eq!(statuses.iter().map(|status| status.count).sum::<u64>(), 23);
        assert_eq!(statuses[1].status_code, 200);
        assert!(windows[0].status_shares().is_ok());
    }

    #[test]
    fn methods_of_one_route_are_separate_windows() {
        let builder = WindowBuilder::new(Duration::from_secs(10), vec![0.5]);
        let mut resolver = SourceResolver::new("n".into(), None);
        let routes = RouteNamer::new(Vec::new(), 10);
        let get = series(7, 100, 200, &[1, 2]);
        let mut delete = series(7, 100, 200, &[40]);
        delete.key.method = method::DELETE;
        let (windows, _) = builder.build(vec![get, delete], &[], 0, &mut resolver, &routes);
        let by_method: Vec<(&str, u64)> = windows
            .iter()
            .map(|w| (w.method.as_str(), w.stats.as_ref().unwrap().count))
            .collect();
        assert_eq!(by_method, vec![("GET", 2), ("DELETE", 1)]);
    }

    fn event(series: &ClosedSeries, path: &str, flags: u8, duration_ms: u64) -> RequestEvent {
        let mut bytes = [0u8; PATH_LEN];
        bytes[..path.len()].copy_from_slice(path.as_bytes());
        RequestEvent {
            series: series.key,
            start_nanos: 1_000,
            duration_nanos: duration_ms * 1_000_000,
            tid: 5,
            status: 200,
            flags,
            path_len: path.len() as u8,
            path: bytes,
            comm: *b"server\0\0\0\0\0\0\0\0\0\0",
            peer_addr6: [0; 16],
        }
    }

    #[test]
    fn client_windows_name_ipv4_and_ipv6_peers() {
        let builder = WindowBuilder::new(Duration::from_secs(10), vec![0.5]);
        let mut resolver = SourceResolver::new("n".into(), None);
        let mut routes = RouteNamer::new(Vec::new(), 10);
        let client = |mut series: ClosedSeries, address: u32, ipv6: u8| {
            series.key.direction = 2;
            series.key.peer_addr = address;
            series.key.peer_ipv6 = ipv6;
            series.key.peer_port = 8080;
            series
        };
        let v6: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let hash = trazor_node_agent_ebpf_common::peer_hash(&v6.octets());
        let v4 = client(
            series(7, 100, 200, &[1]),
            u32::from_le_bytes([10, 0, 0, 9]),
            0,
        );
        let named = client(series(7, 100, 200, &[2]), hash, 1);
        // Its first event lost: the window still counts, its peer is unnamed.
        let unnamed = client(series(7, 100, 200, &[3]), hash ^ 1, 1);
        let mut first = event(&named, "/", event_flag::ANNOUNCE, 2);
        first.peer_addr6 = v6.octets();
        learn_announcements(&[first], &mut resolver, &mut routes);
        let (windows, _) = builder.build(
            vec![v4, named, unnamed],
            &[first],
            0,
            &mut resolver,
            &routes,
        );
        let mut peers: Vec<String> = windows
            .iter()
            .map(|w| {
                let peer = w.peer.as_ref().unwrap();
                format!("{} {}", peer.address, peer.port)
            })
            .collect();
        peers.sort();
        assert_eq!(
            peers,
            vec!["10.0.0.9 8080", "2001:db8::7 8080", "unknown IPv6 8080"]
        );

        // A connection announces itself once, not every window: a later window of the same
        // series, without any event, still has its peer named.
        let mut later = client(series(7, 100, 200, &[2]), hash, 1);
        later.key.window += 1;
        let (windows, _) = builder.build(vec![later], &[], 0, &mut resolver, &routes);
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].peer.as_ref().unwrap().address, "2001:db8::7");
    }

    fn with_route(mut series: ClosedSeries, route: u32) -> ClosedSeries {
        series.key.route = route;
        series
    }

    #[test]
    fn routes_are_named_merged_and_capped() {
        let builder = WindowBuilder::new(Duration::from_secs(10), vec![0.5]);
        let mut resolver = SourceResolver::new("n".into(), None);
        let mut routes = RouteNamer::new(vec![RouteTemplate::parse("/users/{name}").unwrap()], 2);
        let alice = with_route(series(1, 9, 200, &[10, 10, 10]), 11);
        let bob = with_route(series(1, 9, 200, &[30]), 12);
        let items = with_route(series(1, 9, 200, &[5, 5]), 13);
        let health = with_route(series(1, 9, 200, &[1]), 14);
        let events = [
            event(&alice, "/users/alice", event_flag::ANNOUNCE, 10),
            event(
                &bob,
                "/users/bob",
                event_flag::ANNOUNCE | event_flag::EXEMPLAR,
                30,
            ),
            event(&items, "/items/42", event_flag::ANNOUNCE, 5),
            event(&health, "/healthz", event_flag::ANNOUNCE, 1),
        ];
        learn_announcements(&events, &mut resolver, &mut routes);
        let (windows, report) = builder.build(
            vec![alice, bob, items, health],
            &events,
            0,
            &mut resolver,
            &routes,
        );
        let by_route: BTreeMap<&str, &LatencyWindow> =
            windows.iter().map(|w| (w.route.as_str(), w)).collect();
        assert_eq!(
            by_route.keys().copied().collect::<Vec<_>>(),
            ["/items/{id}", "/users/{name}", "other"]
        );
        let users = by_route["/users/{name}"];
        assert_eq!(
            users.stats.as_ref().unwrap().count,
            4,
            "alice and bob merge exactly"
        );
        assert_eq!(users.histogram.as_ref().unwrap().total(), 4);
        assert_eq!(users.exemplars.len(), 1);
        assert_eq!(users.exemplars[0].path, "/users/bob");
        assert_eq!(users.exemplars[0].duration_nanos, 30_000_000);
        assert_eq!(by_route["other"].stats.as_ref().unwrap().count, 1);
        assert_eq!(report.requests_over_series_cap, 1);
    }
}
