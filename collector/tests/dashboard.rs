//! The dashboard page in a real browser: headless Chromium (installed by scripts/setup.sh)
//! loads `/` from a real `trazor-collector` process that test agents feed over gRPC, and the
//! test reads the page through the DevTools protocol. The charts' points carry what they
//! draw (`data-p99`, `data-rps`, ...), compared with values computed here from the windows
//! sent: history replayed on load, live windows, drill-down to pods, exemplars on click,
//! the feed's filters, reconnection after the collector restarts, and the login page when a
//! feed token is set. Screenshots are left in the target directory (`tmp/dashboard*.png`)
//! for a person to look at.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod feed_support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use feed_support::{
    CollectorProcess, SECOND, TestWindow, expected_point, metric, send, unix_nanos,
};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

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
        // One profile per browser: the tests of this file run at once.
        static BROWSERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let profile = std::env::temp_dir().join(format!(
            "trazor-chromium-{}-{}",
            std::process::id(),
            BROWSERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
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
        match self.try_evaluate(expression).await {
            Ok(value) => value,
            Err(error) => panic!("{expression}: {error}"),
        }
    }

    /// Evaluates `expression`; the exception it threw as `Err`.
    async fn try_evaluate(&mut self, expression: &str) -> Result<Value, Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        if result["exceptionDetails"].is_null() {
            Ok(result["result"]["value"].clone())
        } else {
            Err(result)
        }
    }

    /// Evaluates `expression` until `done` holds for its value (20 s at most).
    async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Before the page has loaded (or while it navigates), its elements are missing.
            let value = self
                .try_evaluate(expression)
                .await
                .unwrap_or_else(|error| error);
            if done(&value) {
                return value;
            }
            assert!(Instant::now() < deadline, "{what}: still {value}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The cards shown: name, direction, 15-minute error share, and each point of the
    /// latency chart with the values it carries.
    async fn cards(&mut self) -> Value {
        self.evaluate(
            "[...document.querySelectorAll('#cards .card')].map(card => ({ \
               name: card.dataset.name, direction: card.dataset.direction, \
               error_share: card.dataset.errorShare, count: card.dataset.count, \
               points: [...card.querySelectorAll('svg[data-chart=latency] rect.hit')].map(hit => ({ \
                 end: Number(hit.dataset.end), p50: hit.dataset.p50, p95: hit.dataset.p95, \
                 p99: hit.dataset.p99, rps: hit.dataset.rps, count: hit.dataset.count, \
                 errors: hit.dataset.errors, exemplars: Number(hit.dataset.exemplars) })), \
               rate_points: card.querySelectorAll('svg[data-chart=rate] rect.hit').length }))",
        )
        .await
    }

    /// Waits until the cards' names are `names` (in order).
    async fn wait_for_cards(&mut self, names: &[&str]) -> Value {
        let expected: Vec<Value> = names.iter().map(|name| Value::from(*name)).collect();
        self.wait_for(
            "cards",
            "[...document.querySelectorAll('#cards .card')].map(card => card.dataset.name)",
            |value| value.as_array() == Some(&expected),
        )
        .await;
        self.cards().await
    }

    async fn wait_for_state(&mut self, state: &str) {
        self.wait_for(
            &format!("connection state {state}"),
            "document.getElementById('status').dataset.state",
            |value| value == state,
        )
        .await;
    }

    /// Leaves a screenshot in the target directory, for a person to look at.
    async fn screenshot(&mut self, name: &str) {
        let shot = self
            .call("Page.captureScreenshot", serde_json::json!({}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name), png).unwrap();
    }
}

/// The chart point of `card` that ends at `end_ms`.
fn point(card: &Value, end_ms: u64) -> &Value {
    card["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|point| point["end"] == end_ms)
        .unwrap_or_else(|| panic!("no point at {end_ms} in {card}"))
}

/// Asserts that `point` shows what `windows` merged give.
fn assert_point(point: &Value, windows: &[&TestWindow]) {
    let expected = expected_point(windows);
    for (key, value) in &expected {
        assert_eq!(
            point[key],
            value.as_str(),
            "{key} of {point}; expected {expected:?}"
        );
    }
}

/// Windows of 10 s ending on a multiple of 10 s, `minutes_ago` minutes before the last.
fn window_end(minutes_ago: u64) -> u64 {
    (unix_nanos() / (10 * SECOND)) * 10 * SECOND - minutes_ago * 60 * SECOND
}

fn checkout(
    pod: &'static str,
    node: &'static str,
    end: u64,
    buckets: Vec<(i32, u64)>,
    errors: u64,
) -> TestWindow {
    TestWindow {
        namespace: "shop",
        workload: "checkout",
        pod,
        node,
        end_unix_nanos: end,
        length_nanos: 10 * SECOND,
        buckets,
        errors,
        exemplars: vec![],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charts_show_history_then_live_windows_with_drill_down_exemplars_and_filters() {
    let collector = CollectorProcess::start(None, None);
    let grpc = collector.grpc_url();
    let url = format!("http://{}/", collector.http);

    // Two pods of shop/checkout on two nodes, 6 and 3 minutes ago; one pod of ops/billing.
    let (t1, t2) = (window_end(6), window_end(3));
    let a1 = checkout("checkout-1", "node-a", t1, vec![(1275, 30), (1300, 5)], 0);
    let mut b1 = checkout("checkout-2", "node-b", t1, vec![(1280, 20), (1400, 2)], 2);
    b1.exemplars = vec![("/cart/7", 500, 3_900_000), ("/cart/9", 200, 3_700_000)];
    let a2 = checkout("checkout-1", "node-a", t2, vec![(1290, 40), (1350, 8)], 1);
    let b2 = checkout("checkout-2", "node-b", t2, vec![(1260, 10)], 0);
    let billing = TestWindow {
        namespace: "ops",
        workload: "billing",
        pod: "billing-1",
        route: "/invoice",
        method: "POST",
        ..checkout("billing-1", "node-a", t2, vec![(1500, 12)], 0)
    };
    send(
        &grpc,
        "agent-a",
        vec![a1.message(1), a2.message(2), billing.message(3)],
    )
    .await;
    send(&grpc, "agent-b", vec![b1.message(1), b2.message(2)]).await;

    let browser = Browser::open(&url);
    let mut page = browser.page(&url).await;
    page.wait_for_state("live").await;

    // Filled from history: one card per workload, a point per window end, every pod merged.
    let cards = page.wait_for_cards(&["ops/billing", "shop/checkout"]).await;
    let shop = &cards[1];
    assert_eq!(shop["direction"], "server");
    assert_eq!(shop["points"].as_array().unwrap().len(), 2, "{shop}");
    assert_eq!(shop["rate_points"], 2);
    assert_point(point(shop, t1 / 1_000_000), &[&a1, &b1]);
    assert_point(point(shop, t2 / 1_000_000), &[&a2, &b2]);
    // Error share over the 15 minutes: 3 of 115 requests.
    assert_eq!(shop["error_share"], format!("{:.4}", 3.0 / 115.0));
    assert_point(point(&cards[0], t2 / 1_000_000), &[&billing]);

    // Live: a window sent now appears as a new point.
    let t3 = window_end(0);
    let a3 = checkout("checkout-1", "node-a", t3, vec![(1310, 25), (1450, 3)], 0);
    send(&grpc, "agent-a", vec![a3.message(4)]).await;
    let cards = page
        .wait_for("live point", "document.querySelectorAll('.card[data-name=\"shop/checkout\"] svg[data-chart=latency] rect.hit').length", |n| n == 3)
        .await;
    assert_eq!(cards, 3);
    let cards = page.cards().await;
    assert_point(point(&cards[1], t3 / 1_000_000), &[&a3]);
    page.screenshot("dashboard.png").await;

    // Exemplars on click: the slow and failed requests of the point at t1, slowest first.
    page.evaluate(&format!(
        "document.querySelector('.card[data-name=\"shop/checkout\"] svg[data-chart=latency] \
         rect.hit[data-end=\"{}\"]').dispatchEvent(new MouseEvent('click')); true",
        t1 / 1_000_000
    ))
    .await;
    let exemplars = page
        .wait_for(
            "exemplars",
            "[...document.querySelectorAll('#exemplars-body tr')].map(tr => [...tr.cells].map(td => td.textContent))",
            |rows| rows.as_array().is_some_and(|rows| rows.len() == 2),
        )
        .await;
    // start, pod, node, method, path, status, ms
    let shown: Vec<Vec<String>> = serde_json::from_value(exemplars).unwrap();
    assert_eq!(
        shown[0][1..],
        ["checkout-2", "node-b", "GET", "/cart/7", "500", "3.900"]
    );
    assert_eq!(
        shown[1][1..],
        ["checkout-2", "node-b", "GET", "/cart/9", "200", "3.700"]
    );
    assert_eq!(
        page.evaluate("document.getElementById('exemplars').hidden")
            .await,
        false
    );
    page.screenshot("dashboard-exemplars.png").await;

    // Drill-down: the pods of shop/checkout, each with its own windows.
    page.evaluate(
        "document.querySelector('.card[data-name=\"shop/checkout\"] button.drill').click(); true",
    )
    .await;
    let pods = page.wait_for_cards(&["checkout-1", "checkout-2"]).await;
    assert_eq!(pods[0]["points"].as_array().unwrap().len(), 3, "{pods}");
    assert_point(point(&pods[0], t1 / 1_000_000), &[&a1]);
    assert_point(point(&pods[0], t2 / 1_000_000), &[&a2]);
    assert_point(point(&pods[1], t1 / 1_000_000), &[&b1]);
    assert_eq!(pods[1]["error_share"], format!("{:.4}", 2.0 / 32.0));
    page.screenshot("dashboard-pods.png").await;
    page.evaluate("document.getElementById('crumb-all').click(); true")
        .await;
    page.wait_for_cards(&["ops/billing", "shop/checkout"]).await;

    // Filters go to the collector (a `subscribe` on the live connection); its answer is shown.
    page.evaluate(
        "document.getElementById('filter-namespace').value = 'ops'; \
         document.getElementById('filter-apply').click(); true",
    )
    .await;
    let cards = page.wait_for_cards(&["ops/billing"]).await;
    assert_point(point(&cards[0], t2 / 1_000_000), &[&billing]);
    let ack = page
        .wait_for(
            "filter acknowledged",
            "document.getElementById('filter-ack').dataset.filter || ''",
            |filter| {
                filter
                    .as_str()
                    .is_some_and(|f| f.contains("\"namespace\":[\"ops\"]"))
            },
        )
        .await;
    assert!(ack.as_str().unwrap().contains("\"workload\":[]"), "{ack}");
    // A live window outside the filter does not show; one inside does.
    let b4 = checkout("checkout-2", "node-b", t3, vec![(1280, 5)], 0);
    let billing_now = TestWindow {
        end_unix_nanos: t3,
        ..billing.clone()
    };
    send(&grpc, "agent-b", vec![b4.message(3)]).await;
    send(&grpc, "agent-a", vec![billing_now.message(5)]).await;
    let cards = page
        .wait_for(
            "live billing point",
            "document.querySelectorAll('.card svg[data-chart=latency] rect.hit').length",
            |n| n == 2,
        )
        .await;
    assert_eq!(cards, 2);
    assert_eq!(
        page.wait_for_cards(&["ops/billing"])
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Filters on two keys: workload checkout of namespace shop, node-b only.
    page.evaluate(
        "document.getElementById('filter-namespace').value = 'shop'; \
         document.getElementById('filter-node').value = 'node-b'; \
         document.getElementById('filter-apply').click(); true",
    )
    .await;
    let cards = page.wait_for_cards(&["shop/checkout"]).await;
    assert_point(point(&cards[0], t1 / 1_000_000), &[&b1]);
    assert_point(point(&cards[0], t3 / 1_000_000), &[&b4]);
    page.screenshot("dashboard-filtered.png").await;
    page.evaluate("document.getElementById('filter-clear').click(); true")
        .await;
    page.wait_for_cards(&["ops/billing", "shop/checkout"]).await;
    let counters = page
        .evaluate("({...document.getElementById('counters').dataset})")
        .await;
    assert_eq!(counters["missed"], "0", "{counters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reconnects_after_the_collector_restarts_and_refills_its_charts() {
    let state = std::env::temp_dir().join(format!("trazor-dashboard-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut collector = CollectorProcess::start(None, Some(&state));
    let url = format!("http://{}/", collector.http);
    let t1 = window_end(2);
    let a1 = checkout("checkout-1", "node-a", t1, vec![(1275, 30), (1300, 5)], 0);
    send(&collector.grpc_url(), "agent-a", vec![a1.message(1)]).await;

    let browser = Browser::open(&url);
    let mut page = browser.page(&url).await;
    page.wait_for_state("live").await;
    page.wait_for_cards(&["shop/checkout"]).await;

    collector.stop();
    page.wait_for_state("down").await;
    let status = page
        .evaluate("document.getElementById('status').textContent")
        .await;
    assert!(
        status
            .as_str()
            .unwrap()
            .starts_with("disconnected: retrying in"),
        "{status}"
    );
    page.screenshot("dashboard-disconnected.png").await;

    collector.restart();
    page.wait_for_state("live").await;
    // The journal brought the window back; the page asked for the last 15 minutes again.
    let cards = page.wait_for_cards(&["shop/checkout"]).await;
    assert_point(point(&cards[0], t1 / 1_000_000), &[&a1]);
    let t2 = window_end(0);
    let a2 = checkout("checkout-1", "node-a", t2, vec![(1330, 12)], 1);
    send(&collector.grpc_url(), "agent-a", vec![a2.message(2)]).await;
    page.wait_for(
        "live after restart",
        "document.querySelectorAll('svg[data-chart=latency] rect.hit').length",
        |n| n == 2,
    )
    .await;
    let cards = page.cards().await;
    assert_point(point(&cards[0], t2 / 1_000_000), &[&a2]);
    let reconnects = page
        .evaluate("document.getElementById('counters').dataset.reconnects")
        .await;
    assert_eq!(reconnects, "1");
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_feed_token_the_page_asks_for_it_and_then_shows_the_feed() {
    let mut collector = CollectorProcess::start(Some("viewer-secret"), None);
    let url = format!("http://{}/", collector.http);
    let a1 = checkout("checkout-1", "node-a", window_end(1), vec![(1275, 30)], 0);
    send(&collector.grpc_url(), "agent-a", vec![a1.message(1)]).await;

    let browser = Browser::open(&url);
    let mut page = browser.page(&url).await;
    let has_form = "!!document.querySelector('form input[name=token]')";
    page.wait_for("login page", has_form, |found| found == true)
        .await;
    assert_eq!(
        page.evaluate("!!document.getElementById('cards')").await,
        false
    );

    // A wrong token: the login page again.
    page.evaluate(
        "const field = document.querySelector('input[name=token]'); field.value = 'wrong'; \
         field.form.submit(); true",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    page.wait_for("login page after a wrong token", has_form, |found| {
        found == true
    })
    .await;
    assert_eq!(
        page.evaluate("!!document.getElementById('cards')").await,
        false
    );

    page.evaluate(
        "const input = document.querySelector('input[name=token]'); input.value = 'viewer-secret'; \
         input.form.submit(); true",
    )
    .await;
    page.wait_for(
        "dashboard after login",
        "!!document.getElementById('cards')",
        |found| found == true,
    )
    .await;
    page.wait_for_state("live").await;
    let cards = page.wait_for_cards(&["shop/checkout"]).await;
    assert_point(&cards[0]["points"][0], &[&a1]);
    // The token is nowhere in the page's address.
    let address = page.evaluate("location.href").await;
    assert!(
        !address.as_str().unwrap().contains("viewer-secret"),
        "{address}"
    );
    page.screenshot("dashboard-after-login.png").await;

    // The token changes (the collector restarts with a new Secret): the session no longer
    // opens the feed, and the page goes back to the login page by itself.
    collector.restart_with_feed_token(Some("rotated-secret"));
    page.wait_for("login page after the token changed", has_form, |found| {
        found == true
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_falls_behind_shows_how_many_windows_it_missed() {
    // Eight items queued per connection: a page that stops reading loses the oldest.
    let collector = CollectorProcess::start_with(None, None, &["--feed-queue", "8"]);
    let url = format!("http://{}/", collector.http);
    let browser = Browser::open(&url);
    let mut page = browser.page(&url).await;
    page.wait_for_state("live").await;

    // The page's script stops (paused in the debugger): the browser stops taking frames
    // off the socket once its buffers are full, and the collector's queue for it overflows.
    page.call("Debugger.enable", serde_json::json!({})).await;
    page.call("Debugger.pause", serde_json::json!({})).await;
    // Big windows (a histogram of 1 900 buckets, about 4 kB of JSON each) fill the
    // socket buffers sooner.
    let end = window_end(1);
    let big = checkout("checkout-1", "node-a", end, vec![(1000, 1), (2900, 1)], 0);
    let sent: u64 = 3_000;
    let grpc = collector.grpc_url();
    let messages = (1..=sent).map(|sequence| big.message(sequence)).collect();
    send(&grpc, "agent-a", messages).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(collector.http, "trazor_collector_feed_dropped_total").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the collector dropped nothing for the paused page"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    page.call("Debugger.resume", serde_json::json!({})).await;
    page.call("Debugger.disable", serde_json::json!({})).await;

    // Everything sent is either on the page or counted as missed there, and the page's count
    // is the collector's.
    let counters = page
        .wait_for(
            "every window received or missed",
            "({...document.getElementById('counters').dataset})",
            |counters| {
                let number = |key: &str| counters[key].as_str().and_then(|n| n.parse::<u64>().ok());
                number("windows")
                    .zip(number("missed"))
                    .is_some_and(|(w, m)| m > 0 && w + m == sent)
            },
        )
        .await;
    let dropped = metric(collector.http, "trazor_collector_feed_dropped_total").await;
    assert_eq!(counters["missed"], dropped.to_string(), "{counters}");
    let text = page
        .evaluate("document.getElementById('counters').textContent")
        .await;
    assert!(
        text.as_str()
            .unwrap()
            .contains(&format!("{dropped} missed")),
        "{text}"
    );
    page.screenshot("dashboard-missed.png").await;
}
