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

/// One `ResourceMetrics` or `ResourceSpans` block as Rotel printed it.
#[derive(Clone, Debug, Default)]
pub struct ResourceBlock {
    /// "metrics" or "spans".
    pub signal: &'static str,
    /// Resource attributes, `key` → printed value (`Str(x)` → `x`).
    pub resource: Vec<(String, String)>,
    /// Metric names, or span names.
    pub names: Vec<String>,
}

impl ResourceBlock {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.resource
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

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
                        .push(crate::kube_io::strip_ansi(&line));
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

/// Parses Rotel's detailed debug log (the OpenTelemetry Collector debug exporter's layout):
///
/// ```text
/// ResourceMetrics #0
/// Resource attributes:
///      -> k8s.pod.name: Str(p1)
/// ...
/// Descriptor:
///      -> Name: trazor.http.request.duration
/// ResourceSpans #0
/// Resource attributes:
///      -> service.name: Str(checkout)
/// ...
///     Name           : GET /
/// ```
pub fn parse_debug_log(lines: &[String]) -> Result<Vec<ResourceBlock>> {
    let mut blocks: Vec<ResourceBlock> = Vec::new();
    let mut in_resource = false;
    let mut in_descriptor = false;
    for line in lines {
        let trimmed = line.trim();
        if trimmed.starts_with("ResourceMetrics #") || trimmed.starts_with("ResourceSpans #") {
            blocks.push(ResourceBlock {
                signal: if trimmed.starts_with("ResourceMetrics") {
                    "metrics"
                } else {
                    "spans"
                },
                ..ResourceBlock::default()
            });
            in_resource = false;
            in_descriptor = false;
            continue;
        }
        let Some(block) = blocks.last_mut() else {
            continue;
        };
        if trimmed == "Resource attributes:" {
            in_resource = true;
            continue;
        }
        if trimmed == "Descriptor:" {
            in_descriptor = true;
            continue;
        }
        if let Some(entry) = trimmed.strip_prefix("-> ") {
            let Some((key, value)) = entry.split_once(": ") else {
                continue;
            };
            if in_resource {
                block.resource.push((key.to_owned(), printed_value(value)));
            } else if in_descriptor && key == "Name" {
                block.names.push(value.to_owned());
                in_descriptor = false;
            }
            continue;
        }
        in_resource = false;
        if block.signal == "spans"
            && let Some(name) = trimmed.strip_prefix("Name")
            && let Some((_, name)) = name.split_once(':')
        {
            block.names.push(name.trim().to_owned());
        }
    }
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

/// `Str(x)` → `x`; `Int(3)` → `3`.
fn printed_value(value: &str) -> String {
    value
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or(value)
        .to_owned()
}
