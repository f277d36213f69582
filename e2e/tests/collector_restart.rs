//! The real pipeline through a collector crash: eBPF measures a sample server under load,
//! the node agent streams the windows, and the collector process is SIGKILLed mid-stream
//! and started again on the same port and state dir. Every request is counted exactly
//! once: the windows on the restarted collector's feed add up to the requests sent, and its
//! journal holds each (boot id, sequence) once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use tokio_tungstenite::tungstenite::Message;
use trazor_collector::{
    BoundCollector, CollectorConfig,
    journal::{Journal, JournalConfig},
};
use trazor_e2e::{HttpClient, SampleServer, require_ebpf_privileges};
use trazor_node_agent::AgentConfig;

const SAMPLE_SERVER: &str = env!("CARGO_BIN_EXE_trazor-sample-server");
const CHILD_ENV: &str = "TRAZOR_E2E_COLLECTOR_CHILD";
const GUARD: Duration = Duration::from_secs(40);

/// When this binary runs as the collector child (`CHILD_ENV` set), serves a collector until
/// killed. A plain test run skips it.
#[test]
fn collector_process() {
    let Ok(state_dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let collector = BoundCollector::bind(&CollectorConfig {
            grpc_listen: std::env::var("TRAZOR_E2E_GRPC").unwrap().parse().unwrap(),
            http_listen: std::env::var("TRAZOR_E2E_HTTP").unwrap().parse().unwrap(),
            history: 100_000,
            state_dir: Some(state_dir.into()),
            ..Default::default()
        })
        .await
        .unwrap();
        collector.serve().await.unwrap();
    });
}

struct CollectorProcess(Child);

impl CollectorProcess {
    fn start(grpc: SocketAddr, http: SocketAddr, state_dir: &Path) -> Self {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "collector_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, state_dir)
            .env("TRAZOR_E2E_GRPC", grpc.to_string())
            .env("TRAZOR_E2E_HTTP", http.to_string())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + GUARD;
        while std::net::TcpStream::connect(http).is_err() {
            assert!(
                Instant::now() < deadline,
                "the collector process did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        // SIGKILL: no shutdown code runs.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_mid_stream_every_request_counted_once() {
    if !require_ebpf_privileges("collector_killed_mid_stream_every_request_counted_once") {
        return;
    }
    let state_dir: PathBuf =
        std::env::temp_dir().join(format!("trazor-e2e-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let (grpc, http) = (free_port(), free_port());
    let first = CollectorProcess::start(grpc, http, &state_dir);

    let mut config = AgentConfig::new(format!("http://{grpc}"), "e2e-restart");
    config.window = Duration::from_secs(1);
    let agent = trazor_node_agent::start(config)
        .await
        .expect("the agent starts (root, eBPF)");
    let server = SampleServer::start(Path::new(SAMPLE_SERVER), &["--delay", "2ms"]).unwrap();

    // ~3 s of requests across 1 s windows; the collector dies after the first windows
    // were acknowledged, while requests are still being measured.
    const REQUESTS: u64 = 900;
    let sent = Arc::new(AtomicU64::new(0));
    let (address, progress) = (server.address, sent.clone());
    let load = tokio::task::spawn_blocking(move || {
        let mut client = HttpClient::new(address);
        for n in 0..REQUESTS {
            assert_eq!(client.get(&format!("/r/{n}"), n % 4 != 0).unwrap(), 200);
            progress.fetch_add(1, Ordering::Relaxed);
        }
    });
    let deadline = Instant::now() + GUARD;
    while agent.stats.windows_acked.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no window acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sent.load(Ordering::Relaxed) < REQUESTS,
        "the kill must land while requests are in flight"
    );
    drop(first);
    let second = CollectorProcess::start(grpc, http, &state_dir);
    load.await.unwrap();

    // The restarted collector's feed: history (replayed from the journal) then live.
    let (mut feed, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
        .await
        .unwrap();
    let mut counted = 0;
    let mut keys = HashSet::new();
    while counted < REQUESTS {
        let message = tokio::time::timeout(GUARD, feed.next())
            .await
            .unwrap_or_else(|_| panic!("only {counted} of {REQUESTS} requests reached the feed"));
        let Some(Ok(Message::Text(text))) = message else {
            panic!("feed closed");
        };
        let window: serde_json::Value = serde_json::from_str(&text).unwrap();
        if window["type"] != "window" || window["pid"] != server.pid() {
            continue;
        }
        let key = (
            window["boot_id"].as_str().unwrap().to_owned(),
            window["sequence"].as_u64().unwrap(),
        );
        assert!(keys.insert(key.clone()), "window {key:?} published twice");
        counted += window["count"].as_u64().unwrap();
    }
    assert_eq!(counted, REQUESTS, "every request counted exactly once");
    assert!(agent.stats.reconnects.load(Ordering::Relaxed) >= 1);

    // And the durable record agrees: each (boot, sequence) once, the server's total exact.
    drop(second);
    let (_, replay) = Journal::open(JournalConfig {
        dir: state_dir.clone(),
        segment_bytes: u64::MAX,
        keep_segments: usize::MAX,
        fsync: false,
    })
    .unwrap();
    let mut journaled = HashSet::new();
    let mut total = 0;
    for (_, boot, window) in &replay.windows {
        assert!(
            journaled.insert((boot.clone(), window.sequence)),
            "journal holds ({boot}, {}) twice",
            window.sequence
        );
        if window
            .source
            .as_ref()
            .is_some_and(|s| s.pid == server.pid())
        {
            total += window.stats.as_ref().map_or(0, |stats| stats.count);
        }
    }
    assert_eq!(total, REQUESTS);
    let _ = std::fs::remove_dir_all(&state_dir);
}
