//! Fault injection on the delivery path, with real processes and real sockets: the agent's
//! real shipper (`Outbox` + `deliver`, with its spool) streams synthetic windows of known
//! sequence and request count to the real collector, while the test
//! - cuts every connection through a TCP proxy it controls, again and again;
//! - SIGKILLs the collector process mid-stream and starts it again on the same port and
//!   state dir, twice;
//! - crashes the agent with windows unacknowledged and restarts it from its spool.
//!
//! Each test then asserts exactly-once: every sequence was accepted once, and the
//! histograms' totals equal the requests the windows carried.
//!
//! The synthetic windows stand in for eBPF measurements (which `e2e` covers) so the
//! expected totals are known exactly; everything after the outbox is the production path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt as _;
use tokio::{net::TcpListener, sync::broadcast, task::JoinHandle};
use tokio_tungstenite::tungstenite::Message;
use trazor_collector::{
    BoundCollector, CollectorConfig,
    journal::{Journal, JournalConfig},
};
use trazor_node_agent::{
    ship::{Delivery, Outbox, ShipperStats, collector_endpoint, deliver, open_outbox},
    spool::SpoolConfig,
};
use trazor_proto::v1::{AgentHello, ExponentialHistogram, LatencyStats, LatencyWindow, Source};

/// Env var that turns this test binary into a collector process (see `collector_process`).
const CHILD_ENV: &str = "TRAZOR_FAULTS_COLLECTOR_CHILD";
/// Failure guard: every wait in these tests ends well before this.
const GUARD: Duration = Duration::from_secs(40);

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trazor-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A window of `requests` requests spread over a few buckets, `sequence` set by the outbox.
fn window(requests: u64) -> LatencyWindow {
    let sparse: BTreeMap<i32, u64> = (0..requests).fold(BTreeMap::new(), |mut sparse, n| {
        *sparse.entry(1_400 + (n % 7) as i32).or_insert(0) += 1;
        sparse
    });
    let end = unix_nanos() / 1_000_000_000 * 1_000_000_000;
    LatencyWindow {
        source: Some(Source {
            node_name: "fault-node".into(),
            process_name: "svc".into(),
            pid: 7,
            ..Default::default()
        }),
        start_unix_nanos: end - 1_000_000_000,
        end_unix_nanos: end,
        stats: Some(LatencyStats {
            count: requests,
            ..Default::default()
        }),
        histogram: Some(ExponentialHistogram::from_sparse(6, &sparse).unwrap()),
        ..Default::default()
    }
}

fn hello(boot_id: String) -> AgentHello {
    AgentHello {
        node_name: "fault-node".into(),
        agent_id: "fault-agent".into(),
        boot_id,
        version: "test".into(),
        capabilities: vec![],
    }
}

fn start_delivery(address: SocketAddr, boot_id: String, outbox: &Arc<Outbox>) -> JoinHandle<()> {
    let endpoint = collector_endpoint(&format!("http://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500));
    tokio::spawn(deliver(
        Delivery {
            endpoint,
            hello: hello(boot_id),
            token: None,
        },
        outbox.clone(),
    ))
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy the test controls: `cut()` closes every connection through it; while
/// `down`, new connections are closed at once.
struct Proxy {
    address: SocketAddr,
    cut: broadcast::Sender<()>,
    down: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (cut, _) = broadcast::channel::<()>(4);
        let down = Arc::new(AtomicBool::new(false));
        let (cuts, is_down) = (cut.clone(), down.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if is_down.load(Ordering::SeqCst) {
                    continue;
                }
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        Self { address, cut, down }
    }

    fn cut(&self) {
        let _ = self.cut.send(());
    }
}

/// Reads the collector's feed (history, then live) until `expected` windows have come.
async fn feed_windows(http: SocketAddr, expected: usize) -> Vec<serde_json::Value> {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
        .await
        .unwrap();
    let mut windows = Vec::new();
    while windows.len() < expected {
        let message = tokio::time::timeout(GUARD, socket.next())
            .await
            .expect("the feed delivers every window");
        let Some(Ok(Message::Text(text))) = message else {
            panic!("feed closed after {} windows", windows.len());
        };
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        if json["type"] == "window" {
            windows.push(json);
        }
    }
    windows
}

/// Every sequence 1..=n once, and the histograms add up to `requests`.
fn assert_exactly_once(sequences: &[u64], histogram_total: u64, n: u64, requests: u64) {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for sequence in sequences {
        *seen.entry(*sequence).or_default() += 1;
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, times)| **times > 1).collect();
    assert!(
        duplicated.is_empty(),
        "windows accepted more than once: {duplicated:?}"
    );
    let missing: Vec<u64> = (1..=n).filter(|s| !seen.contains_key(s)).collect();
    assert!(missing.is_empty(), "windows never accepted: {missing:?}");
    assert_eq!(sequences.len() as u64, n);
    assert_eq!(
        histogram_total, requests,
        "histogram totals equal requests sent"
    );
}

async fn in_process_collector() -> (
    SocketAddr,
    SocketAddr,
    Arc<trazor_collector::stats::CollectorStats>,
) {
    let collector = BoundCollector::bind(&CollectorConfig {
        history: 100_000,
        ..Default::default()
    })
    .await
    .unwrap();
    let (grpc, http, stats) = (
        collector.grpc_addr(),
        collector.http_addr(),
        collector.stats(),
    );
    tokio::spawn(collector.serve());
    (grpc, http, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_by_a_proxy_lose_and_duplicate_nothing() {
    let (grpc, http, stats) = in_process_collector().await;
    let proxy = Proxy::start(grpc).await;
    let outbox = Arc::new(Outbox::new(100_000, Arc::new(ShipperStats::default())));
    let _delivery = start_delivery(proxy.address, "boot-cut".into(), &outbox);

    const BATCHES: u64 = 30;
    const PER_BATCH: u64 = 40;
    let mut requests = 0;
    let mut cuts = 0;
    for batch in 0..BATCHES {
        let windows: Vec<_> = (0..PER_BATCH)
            .map(|n| window(1 + (batch + n) % 13))
            .collect();
        requests += windows
            .iter()
            .map(|w| w.stats.as_ref().unwrap().count)
            .sum::<u64>();
        outbox.push(windows);
        if batch % 5 == 4 {
            // Cut a live stream while this batch is in flight.
            until("the agent is connected", || {
                outbox.stats().connected.load(Ordering::Relaxed)
            })
            .await;
            proxy.cut();
            cuts += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let n = BATCHES * PER_BATCH;
    until("every window is acknowledged", || {
        outbox.acked_through() == n
    })
    .await;
    let shipper = outbox.stats();
    assert_eq!(cuts, 6);
    assert!(
        shipper.reconnects.load(Ordering::Relaxed) >= 5,
        "each cut of a live stream forced a reconnect"
    );
    assert_eq!(shipper.windows_dropped.load(Ordering::Relaxed), 0);

    let windows = feed_windows(http, n as usize).await;
    let sequences: Vec<u64> = windows
        .iter()
        .map(|w| w["sequence"].as_u64().unwrap())
        .collect();
    let mut merged = ExponentialHistogram::default();
    for window in &windows {
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
    assert_exactly_once(&sequences, merged.total(), n, requests);
    // The collector accepted each once (merged or late), whatever was resent.
    let accepted =
        stats.windows_merged.load(Ordering::Relaxed) + stats.windows_late.load(Ordering::Relaxed);
    assert_eq!(accepted, n);
}

/// When this binary runs as a collector child (`CHILD_ENV` set), serves a collector with
/// the state dir and addresses from the environment until killed. A plain test run skips it.
#[test]
fn collector_process() {
    let Ok(state_dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let collector = BoundCollector::bind(&CollectorConfig {
            grpc_listen: std::env::var("TRAZOR_FAULTS_GRPC")
                .unwrap()
                .parse()
                .unwrap(),
            state_dir: Some(state_dir.into()),
            ..Default::default()
        })
        .await
        .unwrap();
        collector.serve().await.unwrap();
    });
}

/// The collector as a real process of its own, killed with SIGKILL on drop.
struct CollectorProcess(Child);

impl CollectorProcess {
    async fn start(grpc: SocketAddr, state_dir: &Path) -> Self {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "collector_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, state_dir)
            .env("TRAZOR_FAULTS_GRPC", grpc.to_string())
            .spawn()
            .unwrap();
        until("the collector process listens", || {
            std::net::TcpStream::connect(grpc).is_ok()
        })
        .await;
        Self(child)
    }

    fn kill(mut self) {
        // SIGKILL: no shutdown code runs.
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the collector's journal says it accepted: (boot, sequence) list and histogram sum.
fn journaled(state_dir: &Path) -> (Vec<(String, u64)>, u64) {
    let (_, replay) = Journal::open(JournalConfig {
        dir: state_dir.to_owned(),
        segment_bytes: u64::MAX,
        keep_segments: usize::MAX,
        fsync: false,
    })
    .unwrap();
    let total = replay
        .windows
        .iter()
        .map(|(_, _, w)| w.histogram.as_ref().unwrap().total())
        .sum();
    let keys = replay
        .windows
        .into_iter()
        .map(|(_, boot, w)| (boot, w.sequence))
        .collect();
    (keys, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_and_restarted_mid_stream_loses_and_duplicates_nothing() {
    let state_dir = temp_dir("collector-state");
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut collector = Some(CollectorProcess::start(grpc, &state_dir).await);
    let outbox = Arc::new(Outbox::new(100_000, Arc::new(ShipperStats::default())));
    let _delivery = start_delivery(grpc, "boot-kill".into(), &outbox);

    const BATCHES: u64 = 24;
    const PER_BATCH: u64 = 50;
    let mut requests = 0;
    let mut kills = 0;
    for batch in 0..BATCHES {
        let windows: Vec<_> = (0..PER_BATCH)
            .map(|n| window(1 + (batch * n) % 11))
            .collect();
        requests += windows
            .iter()
            .map(|w| w.stats.as_ref().unwrap().count)
            .sum::<u64>();
        outbox.push(windows);
        if batch % 8 == 5 {
            // Mid-stream: windows of this batch are in flight or unacknowledged.
            collector.take().unwrap().kill();
            kills += 1;
            collector = Some(CollectorProcess::start(grpc, &state_dir).await);
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let n = BATCHES * PER_BATCH;
    until("every window is acknowledged", || {
        outbox.acked_through() == n
    })
    .await;
    collector.take().unwrap().kill();
    assert_eq!(kills, 3);
    assert!(outbox.stats().reconnects.load(Ordering::Relaxed) >= 3);

    let (keys, total) = journaled(&state_dir);
    let sequences: Vec<u64> = keys.iter().map(|(_, sequence)| *sequence).collect();
    assert!(keys.iter().all(|(boot, _)| boot == "boot-kill"));
    assert_exactly_once(&sequences, total, n, requests);
    let _ = std::fs::remove_dir_all(&state_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_from_its_spool_resends_exactly_the_unacknowledged() {
    let (grpc, http, stats) = in_process_collector().await;
    let proxy = Proxy::start(grpc).await;
    let spool = SpoolConfig {
        dir: temp_dir("agent-spool"),
        max_bytes: 64 * 1024 * 1024,
    };
    let mut requests = 0;
    let mut push = |outbox: &Outbox, count: u64| {
        let windows: Vec<_> = (0..count).map(|n| window(1 + n % 9)).collect();
        requests += windows
            .iter()
            .map(|w| w.stats.as_ref().unwrap().count)
            .sum::<u64>();
        outbox.push(windows);
    };

    // First life: 300 windows delivered, then the collector becomes unreachable and 200
    // more close; then the agent dies.
    let (outbox, boot_id) = open_outbox(100_000, Arc::default(), Some(&spool)).unwrap();
    let delivery = start_delivery(proxy.address, boot_id.clone(), &outbox);
    push(&outbox, 300);
    until("the first 300 are acknowledged", || {
        outbox.acked_through() == 300
    })
    .await;
    proxy.down.store(true, Ordering::SeqCst);
    proxy.cut();
    push(&outbox, 200);
    until("the agent noticed the cut", || {
        !outbox.stats().connected.load(Ordering::Relaxed)
    })
    .await;
    assert_eq!(outbox.len(), 200);
    delivery.abort();
    let _ = delivery.await;
    drop(outbox);

    // Second life: same spool; the 200 come back under the same boot id and go out first.
    proxy.down.store(false, Ordering::SeqCst);
    let (outbox, second_boot) = open_outbox(100_000, Arc::default(), Some(&spool)).unwrap();
    assert_eq!(second_boot, boot_id, "the spool keeps the sequence space");
    assert_eq!(outbox.len(), 200);
    assert_eq!(outbox.stats().spool_recovered.load(Ordering::Relaxed), 200);
    assert_eq!(outbox.next_sequence(), 501);
    let _delivery = start_delivery(proxy.address, boot_id, &outbox);
    push(&outbox, 100);
    until("all 600 are acknowledged", || outbox.acked_through() == 600).await;

    let windows = feed_windows(http, 600).await;
    let sequences: Vec<u64> = windows
        .iter()
        .map(|w| w["sequence"].as_u64().unwrap())
        .collect();
    let total: u64 = windows.iter().map(|w| w["count"].as_u64().unwrap()).sum();
    assert_exactly_once(&sequences, total, 600, requests);
    let accepted =
        stats.windows_merged.load(Ordering::Relaxed) + stats.windows_late.load(Ordering::Relaxed);
    assert_eq!(accepted, 600);
    let _ = std::fs::remove_dir_all(&spool.dir);
}

/// `GET path` over a plain socket; returns (status code, body).
async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_report_delivery_and_kernel_drops() {
    use trazor_node_agent::telemetry::{AgentTelemetry, bind};
    let (grpc, _http, _stats) = in_process_collector().await;
    let outbox = Arc::new(Outbox::new(1_000, Arc::new(ShipperStats::default())));
    let telemetry = Arc::new(AgentTelemetry::new(outbox.clone()));
    let (metrics, server) = bind("127.0.0.1:0".parse().unwrap(), telemetry.clone())
        .await
        .unwrap();
    tokio::spawn(server);
    let (status, body) = http_get(metrics, "/readyz").await;
    assert_eq!(
        status, 503,
        "not ready before the programs are attached: {body}"
    );
    assert!(body.contains("eBPF"), "{body}");
    telemetry.set_attached(true);
    telemetry.set_kernel_drops(vec![("ring_buffer_full", 3), ("map_full", 0)]);

    let _delivery = start_delivery(grpc, "boot-metrics".into(), &outbox);
    outbox.push((0..25).map(|_| window(2)).collect());
    until("every window is acknowledged", || {
        outbox.acked_through() == 25
    })
    .await;
    let (status, _) = http_get(metrics, "/readyz").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(metrics, "/healthz").await;
    assert_eq!(status, 200);
    let (status, text) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "trazor_agent_windows_closed_total 25",
        "trazor_agent_windows_acked_total 25",
        "trazor_agent_windows_dropped_total 0",
        "trazor_agent_queue_depth 0",
        "trazor_agent_connected 1",
        "trazor_agent_kernel_drops_total{reason=\"ring_buffer_full\"} 3",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}
