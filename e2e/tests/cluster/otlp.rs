//! The OTLP backend the collector exports to: Rotel, a third-party OpenTelemetry collector
//! (PyPI `rotel`, installed by `scripts/setup.sh`), receiving OTLP/HTTP on this machine and
//! printing everything it receives with its detailed debug log, resources included (the
//! OpenTelemetry Collector's debug-exporter layout). The suite reads that log.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};

// The log parser, shared with the collector's OTLP tests.
#[path = "../../../collector/tests/common/rotel_log.rs"]
mod rotel_log;

pub use rotel_log::{ResourceBlock, strip_ansi};

/// A running Rotel; killed on drop.
pub struct OtlpReceiver {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Where setup.sh installs Rotel, unless `TRAZOR_E2E_ROTEL` names the binary.
pub fn rotel_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("TRAZOR_E2E_ROTEL") {
        return Ok(PathBuf::from(path));
    }
    let home = std::env::var_os("HOME").context("HOME not set")?;
    let venv = Path::new(&home).join(".cache/trazor/rotel-venv/lib");
    let found = std::fs::read_dir(&venv)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/rotel/rotel-agent"))
        .find(|path| path.is_file());
    found.with_context(|| {
        format!(
            "Rotel not found under {}: run scripts/setup.sh (or set TRAZOR_E2E_ROTEL)",
            venv.display()
        )
    })
}

impl OtlpReceiver {
    /// Starts Rotel receiving OTLP/HTTP on `0.0.0.0:port` (pods reach it at the host's
    /// address), exporting nowhere.
    pub async fn start(port: u16) -> Result<Self> {
        let binary = rotel_binary()?;
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
                "--otlp-http-endpoint",
                &format!("0.0.0.0:{port}"),
                // gRPC is not used here; keep it off the well-known port.
                "--otlp-grpc-endpoint",
                &format!("127.0.0.1:{}", port + 1),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        for output in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(output).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push(strip_ansi(&line));
                }
            });
        }
        let receiver = Self { child, lines };
        crate::kube_io::wait_for(
            "Rotel to say it started",
            std::time::Duration::from_secs(20),
            || async {
                Ok(if receiver.text().contains("Starting Rotel") {
                    crate::kube_io::Seen::Done(())
                } else {
                    crate::kube_io::Seen::NotYet(receiver.text())
                })
            },
        )
        .await?;
        Ok(receiver)
    }

    fn text(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .join("\n")
    }

    /// Every resource block received so far.
    pub fn blocks(&self) -> Result<Vec<ResourceBlock>> {
        let lines = self
            .lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        parse_debug_log(&lines)
    }
}

/// Every resource block in Rotel's log `lines`; an error when Rotel logged errors and
/// printed nothing it received.
pub fn parse_debug_log(lines: &[String]) -> Result<Vec<ResourceBlock>> {
    let blocks = rotel_log::parse_debug_log(lines);
    if lines.iter().any(|line| line.contains("ERROR")) && blocks.is_empty() {
        bail!(
            "Rotel reported errors: {}",
            lines
                .iter()
                .filter(|line| line.contains("ERROR"))
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(blocks)
}
