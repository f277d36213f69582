//! The whole pipeline on this machine, all real: eBPF programs on socket tracepoints, a
//! node agent, gRPC to a collector, and its WebSocket feed, measuring sample servers whose
//! response time is known.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use trazor_collector::{BoundCollector, CollectorConfig};
use trazor_e2e::{HttpClient, SampleServer, require_ebpf_privileges};
use trazor_node_agent::{AgentConfig, RunningAgent};
use trazor_proto::v1::ExponentialHistogram;

const SAMPLE_SERVER: &str = env!("CARGO_BIN_EXE_trazor-sample-server");

/// One agent at a time: each traces the whole host, and the timings want the CPUs.
static PIPELINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Pipeline {
    _agent: RunningAgent,
    feed: String,
}

async fn start_pipeline(window: Duration) -> Pipeline {
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let collector = BoundCollector::bind(&CollectorConfig {
        grpc_listen: loopback,
        http_listen: loopback,
        history: 10_000,
        ..Default::default()
    })
    .await
    .unwrap();
    let grpc = collector.grpc_addr();
    let feed = format!("ws://{}/ws", collector.http_addr());
    tokio::spawn(collector.serve());
    let mut config = AgentConfig::new(format!("http://{grpc}"), "e2e-node");
    config.window = window;
    let agent = trazor_node_agent::start(config)
        .await
        .expect("the agent starts (root, eBPF)");
    Pipeline {
        _agent: agent,
        feed,
    }
}

/// Reads the feed (history first, then live) until `expected[pid]` requests have been
/// counted for every pid, and returns each pid's windows.
async fn collect_windows(
    feed: &str,
    expected: &HashMap<u32, u64>,
    timeout: Duration,
) -> HashMap<u32, Vec<Value>> {
    let (mut socket, _) = tokio_tungstenite::connect_async(feed).await.unwrap();
    let mut windows: HashMap<u32, Vec<Value>> = HashMap::new();
    let counted = |windows: &HashMap<u32, Vec<Value>>, pid: &u32| -> u64 {
        windows.get(pid).map_or(0, |list| {
            list.iter().map(|w| w["count"].as_u64().unwrap()).sum()
        })
    };
    let deadline = Instant::now() + timeout;
    while !expected.iter().all(|(pid, n)| counted(&windows, pid) >= *n) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(remaining, socket.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = message else {
            let summary: BTreeMap<u32, (u64, u64)> = expected
                .iter()
                .map(|(pid, n)| (*pid, (counted(&windows, pid), *n)))
                .collect();
            panic!("feed ended or timed out; (counted, expected) per pid: {summary:?}");
        };
        let window: Value = serde_json::from_str(&text).unwrap();
        if window["type"] != "window" {
            continue;
        }
        let pid = window["pid"].as_u64().unwrap() as u32;
        if expected.contains_key(&pid) {
            windows.entry(pid).or_default().push(window);
        }
    }
    windows
}

fn merged_histogram(windows: &[Value]) -> ExponentialHistogram {
    let mut merged = ExponentialHistogram::default();
    for window in windows {
        let histogram = &window["histogram"];
        merged
            .merge(&ExponentialHistogram {
                scale: histogram["scale"].as_i64().unwrap() as i32,
                offset: histogram["offset"].as_i64().unwrap() as i32,
                bucket_counts: histogram["counts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_u64().unwrap())
                    .collect(),
            })
            .unwrap();
    }
    merged
}

/// The histogram's relative error: a value is reported within ±0.54 % of itself (scale 6).
const BUCKET_ERROR: f64 = 0.0054;

/// A latency the server measured for requests whose handler sleeps `nominal_ms`: never less
/// than the sleep, and never more than the client waited for the same requests (`bound_ms`,
/// its own round trip, which holds the server's time and the network's), both within the
/// histogram's bucket error. Bounds from the client, not from the nominal sleep, because how
/// late a loaded machine wakes a sleeping handler is the scheduler's business, not Trazor's.
/// Exact accuracy against the latencies servers record themselves is checked in `capture.rs`.
fn assert_between(what: &str, measured_ms: f64, nominal_ms: f64, bound_ms: f64) {
    let (low, high) = (
        nominal_ms * (1.0 - BUCKET_ERROR),
        bound_ms * (1.0 + BUCKET_ERROR),
    );
    assert!(
        (low..=high).contains(&measured_ms),
        "{what}: measured {measured_ms:.3} ms, expected {low:.3} to {high:.3} ms (the handler's \
         {nominal_ms:.3} ms sleep up to the client's round trip of {bound_ms:.3} ms, each within \
         the histogram's {:.2} % bucket error)",
        BUCKET_ERROR * 100.0
    );
}

/// The `rank`-th smallest (1-based, as the histogram's quantiles count) of `values`.
fn order_statistic(values: &[f64], quantile: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Sends `count` GETs, alternating fresh and kept-alive connections, and returns each one's
/// round trip as the client saw it, in milliseconds (connect included on fresh connections).
fn send_requests(address: SocketAddr, count: u64) -> Vec<f64> {
    let mut client = HttpClient::new(address);
    (0..count)
        .map(|n| {
            let started = Instant::now();
            let status = client.get(&format!("/item/{n}"), n % 2 == 1).unwrap();
            assert_eq!(status, 200);
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measures_known_latencies_and_separates_processes() {
    if !require_ebpf_privileges("measures_known_latencies_and_separates_processes") {
        return;
    }
    let _serial = PIPELINE.lock().await;
    let pipeline = start_pipeline(Duration::from_secs(2)).await;
    let fast = SampleServer::start(Path::new(SAMPLE_SERVER), &["--delay", "20ms"]).unwrap();
    let slow = SampleServer::start(Path::new(SAMPLE_SERVER), &["--delay", "50ms"]).unwrap();
    const REQUESTS: u64 = 40;

    let (fast_address, slow_address) = (fast.address, slow.address);
    let senders = [
        tokio::task::spawn_blocking(move || send_requests(fast_address, REQUESTS)),
        tokio::task::spawn_blocking(move || send_requests(slow_address, REQUESTS)),
    ];
    let mut round_trips = Vec::new();
    for sender in senders {
        round_trips.push(sender.await.unwrap());
    }
    let expected = HashMap::from([(fast.pid(), REQUESTS), (slow.pid(), REQUESTS)]);
    let windows = collect_windows(&pipeline.feed, &expected, Duration::from_secs(20)).await;

    for ((server, delay_ms), client_ms) in
        [(&fast, 20.0), (&slow, 50.0)].into_iter().zip(round_trips)
    {
        let slowest_client_ms = order_statistic(&client_ms, 1.0);
        let list = &windows[&server.pid()];
        let total: u64 = list.iter().map(|w| w["count"].as_u64().unwrap()).sum();
        assert_eq!(
            total, REQUESTS,
            "every request counted exactly once: {list:?}"
        );
        for window in list {
            assert_eq!(
                window["process"], "trazor-sample-s",
                "comm is the process name"
            );
            assert_eq!(window["errors"], 0);
            assert_eq!(window["direction"], "server");
            // Nothing can be answered faster than the handler sleeps.
            assert!(window["min_ms"].as_f64().unwrap() >= delay_ms, "{window}");
            // Nor slower than its client waited.
            assert!(
                window["max_ms"].as_f64().unwrap() <= slowest_client_ms,
                "{window} vs the slowest round trip, {slowest_client_ms:.3} ms"
            );
            let start = window["start_unix_ms"].as_u64().unwrap();
            assert_eq!(start % 2_000, 0, "windows align to the 2 s wall-clock grid");
            if window["count"].as_u64().unwrap() >= 5 {
                for p in ["p50", "p95", "p99"] {
                    let value = window["percentiles"][p].as_f64().unwrap();
                    assert_between(
                        &format!("{delay_ms} ms server, window {p}"),
                        value,
                        delay_ms,
                        slowest_client_ms,
                    );
                }
            }
        }
        let merged = merged_histogram(list);
        assert_eq!(merged.total(), REQUESTS);
        for q in [0.5, 0.99] {
            let value_ms = merged.quantile(q).unwrap() / 1e6;
            // Each request took the server no longer than its client, so neither does any
            // order statistic of the forty.
            assert_between(
                &format!("{delay_ms} ms server, merged q{q}"),
                value_ms,
                delay_ms,
                order_statistic(&client_ms, q),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_server_errors_and_every_request_across_window_rotations() {
    if !require_ebpf_privileges("counts_server_errors_and_every_request_across_window_rotations") {
        return;
    }
    let _serial = PIPELINE.lock().await;
    let pipeline = start_pipeline(Duration::from_secs(1)).await;
    let failing = SampleServer::start(
        Path::new(SAMPLE_SERVER),
        &["--delay", "2ms", "--error-rate", "1.0"],
    )
    .unwrap();
    // ~3 s of requests over 1 s windows: several rotations while requests are in flight.
    const REQUESTS: u64 = 1_000;
    let address = failing.address;
    tokio::task::spawn_blocking(move || {
        let mut client = HttpClient::new(address);
        for n in 0..REQUESTS {
            assert_eq!(client.get(&format!("/fail/{n}"), n % 10 != 0).unwrap(), 500);
        }
    })
    .await
    .unwrap();
    let expected = HashMap::from([(failing.pid(), REQUESTS)]);
    let windows = collect_windows(&pipeline.feed, &expected, Duration::from_secs(15)).await;
    let list = &windows[&failing.pid()];
    assert!(
        list.len() >= 2,
        "requests spanned several windows: {}",
        list.len()
    );
    let errors: u64 = list.iter().map(|w| w["errors"].as_u64().unwrap()).sum();
    let total: u64 = list.iter().map(|w| w["count"].as_u64().unwrap()).sum();
    assert_eq!((total, errors), (REQUESTS, REQUESTS));
    for window in list {
        assert_eq!(window["status_classes"]["5xx"], window["count"]);
    }
}
