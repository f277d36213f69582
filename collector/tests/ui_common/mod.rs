//! Helpers of the clients' tests (dashboard in Chromium, trazor-watch in tmux): the real
//! `trazor-collector` binary as a child process (so a test can stop it and start it again
//! on the same port), and windows of several namespaces, pods and nodes with exemplars.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use trazor_proto::v1::{
    AgentMessage, Exemplar, ExponentialHistogram, LatencyStats, LatencyWindow, PodIdentity,
    Quantile, Source, agent_message,
};

/// A `trazor-collector` process on loopback, killed on drop.
pub struct CollectorProcess {
    child: Option<Child>,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub log: PathBuf,
    feed_token: Option<String>,
    state_dir: Option<PathBuf>,
    extra_args: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl CollectorProcess {
    /// Starts a collector on free ports, with a feed token and a state dir when given.
    pub fn start(feed_token: Option<&str>, state_dir: Option<&Path>) -> Self {
        Self::start_with(feed_token, state_dir, &[])
    }

    /// Same, with more flags.
    pub fn start_with(feed_token: Option<&str>, state_dir: Option<&Path>, extra: &[&str]) -> Self {
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut collector = Self {
            child: None,
            http,
            grpc,
            log: std::env::temp_dir().join(format!(
                "trazor-ui-collector-{}-{}.log",
                std::process::id(),
                http.port()
            )),
            feed_token: feed_token.map(str::to_owned),
            state_dir: state_dir.map(Path::to_path_buf),
            extra_args: extra.iter().map(|arg| (*arg).to_owned()).collect(),
        };
        collector.spawn();
        collector
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_trazor-collector"));
        command
            .arg("--http-listen")
            .arg(self.http.to_string())
            .arg("--grpc-listen")
            .arg(self.grpc.to_string())
            // Aggregates close soon after their window (the dashboard reads windows).
            .args(["--late-grace", "1s"])
            .env_remove("TRAZOR_TOKEN")
            .env_remove("TRAZOR_FEED_TOKEN")
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(token) = &self.feed_token {
            command.env("TRAZOR_FEED_TOKEN", token);
        }
        if let Some(dir) = &self.state_dir {
            command.arg("--state-dir").arg(dir);
        }
        self.child = Some(command.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_status(self.http, "/readyz") != Some(200) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the collector exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the collector never got ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://` address of the gRPC ingest, for `common::send`.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Stops the collector as Kubernetes does (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signals the child this helper started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap();
        }
    }

    /// Starts it again on the same ports (and state dir) with another feed token.
    pub fn restart_with_feed_token(&mut self, token: Option<&str>) {
        self.stop();
        self.feed_token = token.map(str::to_owned);
        self.spawn();
    }

    /// Starts it again on the same ports (and state dir).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of counter `name` on `/metrics`.
pub fn metric(address: SocketAddr, name: &str) -> u64 {
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name} on /metrics: {text}"))
}

/// The status of `GET path`, or `None` when nothing answers.
pub fn http_status(address: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Unix nanoseconds now.
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// One window a test sends: who, when, the histogram (scale 6 buckets) and what else.
#[derive(Clone, Debug)]
pub struct TestWindow {
    pub namespace: &'static str,
    pub workload: &'static str,
    pub pod: &'static str,
    pub node: &'static str,
    pub route: &'static str,
    pub method: &'static str,
    pub end_unix_nanos: u64,
    pub length_nanos: u64,
    pub buckets: Vec<(i32, u64)>,
    /// 5xx responses among the requests (the rest are 2xx).
    pub errors: u64,
    /// (path, status, duration in ns)
    pub exemplars: Vec<(&'static str, u32, u64)>,
}

/// The lower bound of bucket `index` at scale 6, in ns.
pub fn bucket_lower(index: i32) -> f64 {
    2f64.powf(index as f64 / 64.0)
}

impl TestWindow {
    pub fn histogram(&self) -> ExponentialHistogram {
        ExponentialHistogram::from_sparse(
            6,
            &self.buckets.iter().copied().collect::<BTreeMap<_, _>>(),
        )
        .unwrap()
    }

    /// The fastest and slowest request: just inside the lowest and highest bucket.
    pub fn min_max_nanos(&self) -> (u64, u64) {
        let low = self.buckets.iter().map(|b| b.0).min().unwrap();
        let high = self.buckets.iter().map(|b| b.0).max().unwrap();
        (
            bucket_lower(low).ceil() as u64 + 1,
            bucket_lower(high + 1).floor() as u64,
        )
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.1).sum()
    }

    pub fn message(&self, sequence: u64) -> AgentMessage {
        let histogram = self.histogram();
        let count = histogram.total();
        let (min, max) = self.min_max_nanos();
        let start = self.end_unix_nanos - self.length_nanos;
        AgentMessage {
            kind: Some(agent_message::Kind::Window(LatencyWindow {
                sequence,
                source: Some(Source {
                    node_name: self.node.into(),
                    pid: 4242,
                    process_name: "server".into(),
                    cgroup_id: 7,
                    pod: Some(PodIdentity {
                        namespace: self.namespace.into(),
                        name: self.pod.into(),
                        uid: format!("uid-{}", self.pod),
                        container: "main".into(),
                        workload_kind: "Deployment".into(),
                        workload_name: self.workload.into(),
                    }),
                    ..Default::default()
                }),
                direction: trazor_proto::v1::Direction::Server as i32,
                route: self.route.into(),
                method: self.method.into(),
                start_unix_nanos: start,
                end_unix_nanos: self.end_unix_nanos,
                stats: Some(LatencyStats {
                    count,
                    error_count: self.errors,
                    sum_nanos: count * (min + max) / 2,
                    min_nanos: min,
                    max_nanos: max,
                    quantiles: [0.5, 0.95, 0.99]
                        .into_iter()
                        .map(|quantile| Quantile {
                            quantile,
                            value_nanos: (histogram.quantile(quantile).unwrap() as u64)
                                .clamp(min, max),
                        })
                        .collect(),
                }),
                histogram: Some(histogram),
                status_class_counts: vec![0, 0, count - self.errors, 0, 0, self.errors],
                exemplars: self
                    .exemplars
                    .iter()
                    .enumerate()
                    .map(|(n, (path, status, duration))| Exemplar {
                        start_unix_nanos: start + n as u64 * 1_000_000,
                        duration_nanos: *duration,
                        method: self.method.into(),
                        status_code: *status,
                        path: (*path).into(),
                        tid: 1,
                    })
                    .collect(),
                ..Default::default()
            })),
        }
    }
}

/// What a page or terminal should show for `windows` merged (one chart point, or one
/// row): percentiles of the merged histogram clamped to the smallest and largest request,
/// in ms to the µs, written with three decimals; requests/s with three.
pub fn expected_point(windows: &[&TestWindow]) -> BTreeMap<&'static str, String> {
    let mut merged = windows[0].histogram();
    for window in &windows[1..] {
        merged.merge(&window.histogram()).unwrap();
    }
    let ms = |nanos: u64| (nanos as f64 / 1e3).round() / 1e3;
    let min = windows
        .iter()
        .map(|w| ms(w.min_max_nanos().0))
        .fold(f64::INFINITY, f64::min);
    let max = windows
        .iter()
        .map(|w| ms(w.min_max_nanos().1))
        .fold(0.0, f64::max);
    let count: u64 = windows.iter().map(|w| w.count()).sum();
    let errors: u64 = windows.iter().map(|w| w.errors).sum();
    let length = windows.iter().map(|w| w.length_nanos).max().unwrap() as f64 / 1e9;
    let mut point = BTreeMap::new();
    for (name, q) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)] {
        let value = ms(merged.quantile(q).unwrap().floor() as u64).clamp(min, max);
        point.insert(name, format!("{value:.3}"));
    }
    point.insert("rps", format!("{:.3}", count as f64 / length));
    point.insert("count", count.to_string());
    point.insert("errors", errors.to_string());
    point
}
