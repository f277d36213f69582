//! The dashboard page in a real browser: headless Chromium (installed by scripts/setup.sh)
//! loads `/` from a collector that two test agents feed, and the test reads the page through
//! the DevTools protocol: the feed connects, each node's window and the merged aggregate
//! show with their rates and percentiles, and the filter narrows the rows. A screenshot is
//! left in the target directory (`tmp/dashboard.png`) for a person to look at.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use common::{pod_window, send, start_collector, window_end};
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};
use trazor_proto::v1::ExponentialHistogram;

/// Headless Chromium with the DevTools protocol on a port of its choosing; the whole
/// process group is killed on drop.
struct Browser {
    child: Child,
    profile: PathBuf,
    devtools_port: u16,
}

impl Browser {
    fn open(url: &str) -> Self {
        let program = std::env::var("TRAZOR_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = std::env::temp_dir().join(format!("trazor-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let child = Command::new(&program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1400,800",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "this test needs Chromium ({program}: {error}); scripts/setup.sh installs \
                     it (Debian's chromium), or point TRAZOR_CHROMIUM at one"
                )
            });
        // Chromium writes the port it chose into the profile once DevTools listens.
        let deadline = Instant::now() + Duration::from_secs(30);
        let devtools_port = loop {
            if let Ok(text) = std::fs::read_to_string(profile.join("DevToolsActivePort"))
                && let Some(port) = text.lines().next().and_then(|line| line.parse().ok())
            {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "Chromium never opened its DevTools port"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Self {
            child,
            profile,
            devtools_port,
        }
    }

    /// The DevTools connection of the page showing `url`.
    async fn page(&self, url: &str) -> Page {
        let deadline = Instant::now() + Duration::from_secs(20);
        let address = loop {
            // Empty until the browser has set up its first page.
            let targets: Vec<serde_json::Value> =
                serde_json::from_str(&http_get(self.devtools_port, "/json/list"))
                    .unwrap_or_default();
            if let Some(page) = targets
                .iter()
                .find(|target| target["type"] == "page" && target["url"] == url)
            {
                break page["webSocketDebuggerUrl"].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "no page for {url}: {targets:?}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let (socket, _) = tokio_tungstenite::connect_async(address).await.unwrap();
        Page { socket, next_id: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: signals the process group this test started; no memory is involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The body of `GET path` from the DevTools HTTP server (which keeps connections open:
/// read up to its Content-Length).
fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The page addresses it answers are built from this Host.
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return body.to_owned();
            }
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return String::new(),
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    }
}

struct Page {
    socket: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
}

impl Page {
    /// Sends a DevTools command and returns its result.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = serde_json::json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        loop {
            let Some(Ok(Message::Text(text))) = self.socket.next().await else {
                panic!("DevTools connection closed");
            };
            let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
            // Events have no id; answers to earlier commands were already read.
            if answer["id"] == id {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page; its value (JSON-serialisable).
    async fn evaluate(&mut self, expression: &str) -> serde_json::Value {
        let result = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// The rows of table `id` (`live` or `merged`): the text of each cell, without the
    /// small print under a name.
    async fn rows(&mut self, id: &str) -> Vec<Vec<String>> {
        // (Before the page has loaded, there is no table: no rows.)
        let rows = self
            .evaluate(&format!(
                "[...document.querySelectorAll('#{id} tbody tr')].map(tr => [...tr.cells]\
                 .map(td => td.firstChild ? td.firstChild.textContent : ''))"
            ))
            .await;
        serde_json::from_value(rows).unwrap()
    }

    /// Waits until table `id` has `count` rows.
    async fn wait_for_rows(&mut self, id: &str, count: usize) -> Vec<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = self.rows(id).await;
            if rows.len() == count {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "table #{id} has {} rows, not {count}: {rows:?}",
                rows.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How the page writes a latency: ms with two decimals below 10 ms (from the feed's ms,
/// which have three).
fn shown_ms(nanos: f64) -> String {
    let feed_ms = (nanos / 1e3).round() / 1e3;
    format!("{feed_ms:.2}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_each_nodes_windows_and_the_merged_one_in_a_browser() {
    let collector = start_collector(None).await;
    let (grpc, url) = (collector.grpc, format!("http://{}/", collector.http));

    // Two pods of one Deployment on two nodes, about 1 ms per request.
    let end = window_end();
    let a_buckets = [(1_275, 3), (1_280, 1)];
    let b_buckets = [(1_275, 2), (1_285, 4)];
    send(
        &grpc,
        "agent-a",
        vec![pod_window(1, "checkout-1", end, &a_buckets, &[0, 0, 4])],
    )
    .await;
    send(
        &grpc,
        "agent-b",
        vec![pod_window(
            1,
            "checkout-2",
            end,
            &b_buckets,
            &[0, 0, 5, 0, 0, 1],
        )],
    )
    .await;

    let browser = Browser::open(&url);
    let mut page = browser.page(&url).await;
    let live = page.wait_for_rows("live", 2).await;
    let status = page
        .evaluate("document.getElementById('status').textContent")
        .await;
    // workload, node, direction, method, route, end, req/s, errors, p50, p95, p99, max
    let histogram = |buckets: &[(i32, u64)]| {
        ExponentialHistogram::from_sparse(6, &buckets.iter().copied().collect::<BTreeMap<_, _>>())
            .unwrap()
    };
    for (row, node, buckets, rate, errors) in [
        (&live[0], "node-of-checkout-1", &a_buckets[..], "4.00", "0"),
        (
            &live[1],
            "node-of-checkout-2",
            &b_buckets[..],
            "6.00",
            "16.7 %",
        ),
    ] {
        let p99 = shown_ms(histogram(buckets).quantile(0.99).unwrap().floor());
        assert_eq!(
            (
                row[0].as_str(),
                row[1].as_str(),
                row[2].as_str(),
                row[3].as_str()
            ),
            ("shop/checkout", node, "server", "GET"),
            "{row:?}"
        );
        assert_eq!(
            (
                row[4].as_str(),
                row[6].as_str(),
                row[7].as_str(),
                row[10].as_str()
            ),
            ("/cart/{id}", rate, errors, p99.as_str()),
            "{row:?}"
        );
    }
    assert_eq!(status, "live");

    // The aggregate closes 300 ms after the window's end, a second or two from now.
    let merged = page.wait_for_rows("merged", 1).await;
    let mut both = histogram(&a_buckets);
    both.merge(&histogram(&b_buckets)).unwrap();
    let p99 = both.quantile(0.99).unwrap().clamp(900_000.0, 1_200_000.0);
    // workload, direction, method, route, end, windows, req/s, errors, p50, p95, p99, max
    let row = &merged[0];
    assert_eq!(
        (
            row[0].as_str(),
            row[3].as_str(),
            row[5].as_str(),
            row[6].as_str()
        ),
        ("shop/checkout", "/cart/{id}", "2", "10"),
        "{row:?}"
    );
    assert_eq!(
        (row[7].as_str(), row[10].as_str(), row[11].as_str()),
        ("10.0 %", shown_ms(p99.floor()).as_str(), "1.20"),
        "{row:?}"
    );

    // The filter narrows both tables as one types.
    page.evaluate(
        "const filter = document.getElementById('filter'); filter.value = 'checkout-2'; \
         filter.dispatchEvent(new Event('input')); true",
    )
    .await;
    let filtered = page.wait_for_rows("live", 1).await;
    assert_eq!(filtered[0][1], "node-of-checkout-2");
    page.evaluate("filter.value = ''; filter.dispatchEvent(new Event('input')); true")
        .await;
    page.wait_for_rows("live", 2).await;

    let shot = page
        .call("Page.captureScreenshot", serde_json::json!({}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    std::fs::write(
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"),
        png,
    )
    .unwrap();
}
