//! Rotel, a third-party OpenTelemetry collector (PyPI `rotel`, installed by
//! scripts/setup.sh), as the OTLP receiver of a test: it listens for OTLP/gRPC and OTLP/HTTP
//! on 127.0.0.1 and prints everything it receives, which the test reads back.

use std::{
    io::{BufRead as _, BufReader, Read},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub use super::rotel_log::ResourceBlock;
use super::rotel_log::{parse_debug_log, strip_ansi};

/// A running Rotel, killed on drop.
pub struct Rotel {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Its OTLP/gRPC port.
    pub grpc_port: u16,
    /// Its OTLP/HTTP port.
    pub http_port: u16,
}

/// Where scripts/setup.sh installs Rotel, unless `TRAZOR_E2E_ROTEL` names the binary (as
/// for the cluster suite).
fn rotel_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TRAZOR_E2E_ROTEL") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "TRAZOR_E2E_ROTEL names {}, which is not a file: point it at a rotel-agent binary, \
             or unset it and run scripts/setup.sh",
            path.display()
        );
        return path;
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let venv = PathBuf::from(home).join(".cache/trazor/rotel-venv/lib");
    std::fs::read_dir(&venv)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/rotel/rotel-agent"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "Rotel is not installed under {}: this test needs the Rotel OTLP receiver that \
                 scripts/setup.sh installs (run scripts/setup.sh, or set TRAZOR_E2E_ROTEL to a \
                 rotel-agent binary)",
                venv.display()
            )
        })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Rotel {
    /// Starts Rotel, exporting nowhere, and waits until it listens.
    pub fn start() -> Self {
        Self::start_on(free_port(), free_port())
    }

    /// The same on the given ports (a receiver that comes up where a collector has been
    /// failing to reach one).
    pub fn start_on(grpc_port: u16, http_port: u16) -> Self {
        let binary = rotel_binary();
        let mut child = Command::new(&binary)
            .args([
                "start",
                "--exporter",
                "blackhole",
                "--debug-log",
                "metrics",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
                "--otlp-grpc-endpoint",
                &format!("127.0.0.1:{grpc_port}"),
                "--otlp-http-endpoint",
                &format!("127.0.0.1:{http_port}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let outputs: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn Read + Send>),
        ];
        for output in outputs.into_iter().flatten() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(strip_ansi(&line));
                }
            });
        }
        let rotel = Self {
            child,
            lines,
            grpc_port,
            http_port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !rotel.text().contains("Starting Rotel") {
            assert!(
                Instant::now() < deadline,
                "Rotel did not start within 20 s; it printed:\n{}",
                rotel.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // It says so just before binding.
        std::thread::sleep(Duration::from_millis(200));
        rotel
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Every resource block received so far.
    pub fn blocks(&self) -> Vec<ResourceBlock> {
        parse_debug_log(&self.lines.lock().unwrap())
    }

    /// The first block `wanted` picks, within 20 s; panics naming `what` and showing what
    /// Rotel printed otherwise.
    pub async fn wait_for(
        &self,
        what: &str,
        wanted: impl Fn(&ResourceBlock) -> bool,
    ) -> ResourceBlock {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(block) = self.blocks().into_iter().find(|block| wanted(block)) {
                return block;
            }
            assert!(
                Instant::now() < deadline,
                "Rotel received no {what} within 20 s; it printed:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
