//! End-to-end harness for Trazor: start the sample workload, send it real HTTP requests.
//!
//! The tests in `tests/` run the whole pipeline on this machine (eBPF agent, gRPC, collector,
//! WebSocket). The same scenario on a kind cluster (it needs Docker) will live in `kind/`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A running `trazor-sample-server`, killed on drop.
pub struct SampleServer {
    child: Child,
    pub address: SocketAddr,
}

impl SampleServer {
    /// Starts the binary at `program` with `args` and waits for its address.
    pub fn start(program: &Path, args: &[&str]) -> std::io::Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|address| address.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("unexpected first line {line:?}")))?;
        Ok(Self { child, address })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SampleServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client over a real socket, for tests that must control connection
/// reuse exactly.
pub struct HttpClient {
    address: SocketAddr,
    connection: Option<BufReader<TcpStream>>,
}

impl HttpClient {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            connection: None,
        }
    }

    /// Sends `GET path` (on the kept-alive connection when `reuse`, else on a new one) and
    /// returns the status code.
    pub fn get(&mut self, path: &str, reuse: bool) -> std::io::Result<u16> {
        if !reuse || self.connection.is_none() {
            let stream = TcpStream::connect(self.address)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.connection = Some(BufReader::new(stream));
        }
        let reader = self
            .connection
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no connection"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: keep-alive\r\n\r\n");
        reader.get_mut().write_all(request.as_bytes())?;
        let mut status_line = String::new();
        reader.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut content_length = 0usize;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            if header == "\r\n" || header.is_empty() {
                break;
            }
            if let Some(value) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body)?;
        Ok(status)
    }
}

/// Whether this process may load eBPF programs. Tests that need it call
/// [`require_ebpf_privileges`].
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// The environment variable that skips tests needing root and eBPF, documented in the
/// README. Anything but unset, "" or "0" skips.
pub const SKIP_EBPF_TESTS: &str = "TRAZOR_SKIP_EBPF_TESTS";

/// Returns false (test should return early) only when skipping was asked for explicitly;
/// panics with instructions when eBPF is not possible and skipping was not asked for.
pub fn require_ebpf_privileges(test: &str) -> bool {
    let skip = std::env::var(SKIP_EBPF_TESTS).is_ok_and(|value| !value.is_empty() && value != "0");
    if skip {
        eprintln!("SKIPPED {test}: {SKIP_EBPF_TESTS} is set");
        return false;
    }
    assert!(
        is_root(),
        "{test} loads eBPF programs and needs root (or CAP_BPF + CAP_PERFMON): run the tests \
         as root (e.g. `sudo -E scripts/test.sh`), or set {SKIP_EBPF_TESTS}=1 to skip them"
    );
    true
}
