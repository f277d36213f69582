//! Nothing lost on restart (`--state-dir`): the real `trazor-collector` binary exports
//! over OTLP/gRPC to a port where no receiver listens yet, is killed with SIGKILL while it
//! retries, and is started again once Rotel (a third-party OpenTelemetry collector that
//! scripts/setup.sh installs) listens there: every data point and span arrives, both the
//! batches that were queued and a window whose aggregate was still open at the kill and
//! whose grace ran out while the collector was down. (The full spool's test is in
//! `otlp.rs`: an in-process collector binding ports in parallel here could take the
//! process's ports.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{assert_line, pod_window, rotel::Rotel, send, window_end, with_exemplars};
use trazor_collector::otlp::SERVER_DURATION_METRIC;
use trazor_proto::v1::AgentMessage;

mod common;

/// A `trazor-collector` process, SIGKILLed on drop.
struct Collector {
    child: Child,
    grpc: String,
    http: u16,
}

impl Collector {
    /// Starts the binary with `state_dir`, exporting over gRPC to `otlp_port`, and waits
    /// until it serves; its own ports are `ports`.
    fn start(state_dir: &Path, otlp_port: u16, [grpc_port, http_port]: [u16; 2]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_trazor-collector"))
            .args([
                "--grpc-listen",
                &format!("127.0.0.1:{grpc_port}"),
                "--http-listen",
                &format!("127.0.0.1:{http_port}"),
                "--late-grace",
                "2s",
                "--otlp-protocol",
                "grpc",
                "--otlp-timeout",
                "1s",
            ])
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--otlp-endpoint", &format!("http://127.0.0.1:{otlp_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let collector = Self {
            child,
            grpc: format!("http://127.0.0.1:{grpc_port}"),
            http: http_port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while collector.try_metrics().is_none() {
            assert!(Instant::now() < deadline, "the collector did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The answer must be this process's: one that failed to bind its port (taken in
        // the meantime) would have exited, and another server would have answered.
        std::thread::sleep(Duration::from_millis(200));
        let mut collector = collector;
        if let Ok(Some(status)) = collector.child.try_wait() {
            panic!("the collector exited ({status}) at start: see its error above");
        }
        collector
    }

    /// Its /metrics text, if it answers.
    fn try_metrics(&self) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.http)).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: collector\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    }

    /// Its /metrics once every line of `lines` is there (within 30 s).
    async fn metrics_with(&self, lines: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = self.try_metrics().unwrap_or_default();
            if lines
                .iter()
                .all(|line| metrics.lines().any(|metric| metric == *line))
            {
                return metrics;
            }
            assert!(Instant::now() < deadline, "never {lines:?}:\n{metrics}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown code runs.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A window of Deployment shop/checkout (`count` requests) ending at `end`, with
/// `exemplars` requests of its own as exemplars.
fn window(sequence: u64, end: u64, count: u64, exemplars: u32) -> AgentMessage {
    with_exemplars(
        pod_window(
            sequence,
            "checkout-1",
            end,
            &[(1_400, count)],
            &[0, 0, count],
        ),
        exemplars,
    )
}

/// `N` free ports, all different (each listener is held until all are picked, so one
/// port cannot come back twice: the collector must not export to its own gRPC port).
fn distinct_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|index| listeners[index].local_addr().unwrap().port())
}

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trazor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_queued_or_in_flight_at_a_kill_arrive_after_the_restart() {
    let dir = state_dir("otlp-restart");
    let [
        rotel_grpc,
        rotel_http,
        first_grpc,
        first_http,
        second_grpc,
        second_http,
    ] = distinct_ports::<6>();
    let first = Collector::start(&dir, rotel_grpc, [first_grpc, first_http]);
    // Window A: 5 requests and 3 exemplars. Its spans are queued at once, its metrics when
    // its aggregate closes (2 s after its end); no receiver listens, so both wait on disk
    // while the exporter retries.
    let end = window_end();
    send(&first.grpc, "agent-a", vec![window(1, end, 5, 3)]).await;
    first
        .metrics_with(&["trazor_collector_otlp_spool_batches 2"])
        .await;
    let metrics = first.try_metrics().unwrap();
    assert!(
        !metrics.contains("trazor_collector_otlp_failures_total 0\n"),
        "no export attempt failed yet:\n{metrics}"
    );
    // Window C, three seconds later (so that on a slow machine too its aggregate is far
    // from closing): journaled and acknowledged, its aggregate still open (until 2 s after
    // its end) when the collector is killed.
    send(
        &first.grpc,
        "agent-a",
        vec![window(2, end + 3_000_000_000, 7, 0)],
    )
    .await;
    first.kill();

    // The receiver comes up where the collector was sending; the collector comes back
    // after C's aggregate would have closed.
    let rotel = Rotel::start_on(rotel_grpc, rotel_http);
    let closes = end + 5_000_000_000;
    let wait = closes.saturating_sub(unix_nanos());
    tokio::time::sleep(Duration::from_nanos(wait) + Duration::from_millis(300)).await;
    let second = Collector::start(&dir, rotel_grpc, [second_grpc, second_http]);

    // A's histogram point (5), A's three spans, and C's point (7).
    let metrics_of = |count: u64| {
        move |block: &common::rotel::ResourceBlock| {
            block.signal == "metrics"
                && block.attribute("service.name") == Some("checkout")
                && block.counts.contains(&count)
        }
    };
    let a = rotel.wait_for("window A's metrics", metrics_of(5)).await;
    assert!(a.names.iter().any(|name| name == SERVER_DURATION_METRIC));
    rotel.wait_for("window C's metrics", metrics_of(7)).await;
    let spans: usize = {
        rotel
            .wait_for("window A's spans", |block| block.signal == "spans")
            .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans: usize = rotel
                .blocks()
                .iter()
                .filter(|block| block.signal == "spans")
                .map(|block| block.names.len())
                .sum();
            if spans >= 3 || Instant::now() > deadline {
                break spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(spans, 3, "{:?}", rotel.blocks());
    // Both spooled batches were found and sent, C's point went out too (a histogram and a
    // status-class point each), nothing was dropped, and the spool is empty again.
    let metrics = second
        .metrics_with(&[
            "trazor_collector_otlp_spool_recovered_total 2",
            "trazor_collector_otlp_points_exported_total 4",
            "trazor_collector_otlp_spans_exported_total 3",
            "trazor_collector_otlp_spool_batches 0",
        ])
        .await;
    assert_line(&metrics, "trazor_collector_otlp_points_dropped_total 0");
    assert_line(&metrics, "trazor_collector_otlp_spans_dropped_total 0");
    assert_line(&metrics, "trazor_collector_otlp_spool_corrupt_total 0");
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}
