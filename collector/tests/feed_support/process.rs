//! The real `trazor-collector` binary as a child process, so a test can stop it and start
//! it again on the same ports (the clients' reconnection) and read its log.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
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

// Only its `strip_ansi` is used here (the file is shared with the OTLP tests and the
// cluster suite).
#[allow(dead_code)]
#[path = "../common/rotel_log.rs"]
mod rotel_log;

use rotel_log::strip_ansi;

/// Collectors started by this test process, so each gets its own log file.
static COLLECTORS_STARTED: AtomicUsize = AtomicUsize::new(0);

/// The gRPC and HTTP addresses in the collector's "collector serving" log line (`grpc=ADDR
/// feed=ws://ADDR/ws`, among terminal colour escapes).
fn serving_addresses(log: &str) -> Option<(SocketAddr, SocketAddr)> {
    let line = log
        .lines()
        .find(|line| line.contains("collector serving"))?;
    let plain = strip_ansi(line);
    let value = |key: &str| {
        plain
            .split_whitespace()
            .find_map(|word| word.strip_prefix(key))
            .map(str::to_owned)
    };
    let grpc = value("grpc=")?.parse().ok()?;
    let http = value("feed=ws://")?.strip_suffix("/ws")?.parse().ok()?;
    Some((grpc, http))
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
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
        // Port 0: the collector picks free ports itself and logs them, so no other test can
        // take a port between our picking it and the collector binding it.
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut collector = Self {
            child: None,
            http: any_port,
            grpc: any_port,
            log: std::env::temp_dir().join(format!(
                "trazor-test-collector-{}-{}.log",
                std::process::id(),
                COLLECTORS_STARTED.fetch_add(1, Ordering::Relaxed)
            )),
            feed_token: feed_token.map(str::to_owned),
            state_dir: state_dir.map(Path::to_path_buf),
            extra_args: extra.iter().map(|arg| (*arg).to_owned()).collect(),
        };
        collector.spawn();
        collector
    }

    /// Starts the process on `self.http`/`self.grpc` (port 0 the first time: then they become
    /// the ports it logs), and waits until it says it serves and answers `/readyz`.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let log_start = log.metadata().unwrap().len() as usize;
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
        let (grpc, http) = loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the collector exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(addresses) = text.get(log_start..).and_then(serving_addresses) {
                break addresses;
            }
            assert!(
                Instant::now() < deadline,
                "the collector never logged 'collector serving': {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        (self.grpc, self.http) = (grpc, http);
        while http_status(self.http, "/readyz") != Some(200) {
            assert!(Instant::now() < deadline, "the collector never got ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://` address of the gRPC ingest, for [`super::send`].
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
