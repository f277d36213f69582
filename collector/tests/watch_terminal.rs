//! `trazor-watch` in a real terminal: tmux (installed by scripts/setup.sh) runs it,
//! detached, against a real `trazor-collector` process that a test agent feeds over gRPC,
//! and the test reads the screen with `tmux capture-pane`: the rows and their values, the
//! order (p99 first, or the column chosen with a key), the refresh in place when new windows
//! arrive, the feed's filters, the token from a file, and `q` to quit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod feed_support;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use feed_support::{CollectorProcess, SECOND, TestWindow, metric, send, unix_nanos};

const TOKEN: &str = "watch-secret";

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start() -> Self {
        let socket = format!("trazor-watch-test-{}", std::process::id());
        let tmux = Self { socket };
        // Fails clearly when tmux is missing (setup.sh installs it).
        let version = Command::new("tmux")
            .arg("-V")
            .output()
            .unwrap_or_else(|error| {
                panic!("this test needs tmux ({error}); scripts/setup.sh installs it")
            });
        assert!(version.status.success());
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .args(["-u", "-L", &self.socket])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs `command` in a new 180 × 30 session `name`; the pane stays after it exits and
    /// shows its exit status.
    fn session(&self, name: &str, command: &str) {
        let shell = format!("{command}; echo \"exit status $?\"; sleep 600");
        self.run(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "180",
            "-y",
            "30",
            "env",
            "LANG=C.UTF-8",
            "sh",
            "-c",
            &shell,
        ]);
    }

    fn screen(&self, name: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", name])
    }

    /// Waits until the screen of `name` satisfies `done` (20 s at most).
    fn wait(&self, name: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen(name);
            if done(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "{what}; the screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The table rows on a screen: lines that start with a namespace/pod name.
fn rows(screen: &str) -> Vec<Vec<String>> {
    screen
        .lines()
        .filter(|line| line.starts_with("shop/") || line.starts_with("ops/"))
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// A 10 s window of `pod` ending `end`, every request in `bucket`s.
fn window(
    namespace: &'static str,
    workload: &'static str,
    pod: &'static str,
    end: u64,
    buckets: Vec<(i32, u64)>,
    errors: u64,
) -> TestWindow {
    TestWindow {
        namespace,
        workload,
        pod,
        node: "node-a",
        end_unix_nanos: end,
        length_nanos: 10 * SECOND,
        buckets,
        errors,
        exemplars: vec![],
        ..Default::default()
    }
}

/// The p99 the row shows: the window's own, as the feed writes it (ms to the µs), with
/// two decimals.
fn p99(window: &TestWindow) -> String {
    let (min, max) = window.min_max_nanos();
    let nanos = (window.histogram().quantile(0.99).unwrap() as u64).clamp(min, max);
    format!("{:.2}", (nanos as f64 / 1e3).round() / 1e3)
}

/// (windows received, missed, replayed at subscription) from the title lines.
fn counts(screen: &str) -> Option<(u64, u64, u64)> {
    let number_before = |line: &str, word: &str| -> Option<u64> {
        let words: Vec<&str> = line
            .split([' ', '(', ')'])
            .filter(|w| !w.is_empty())
            .collect();
        let at = words.iter().position(|w| *w == word)?;
        words.get(at.checked_sub(1)?)?.parse().ok()
    };
    let mut lines = screen.lines();
    let title = lines.next()?;
    let filter = lines.next()?;
    let missed: u64 = title
        .split("missed ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((
        number_before(title, "windows")?,
        missed,
        number_before(filter, "replayed")?,
    ))
}

fn who(row: &[String]) -> &str {
    &row[0]
}

#[test]
fn trazor_watch_is_a_top_like_view_sorted_by_p99_refreshed_in_place() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Eight items queued per connection: a view that stops reading loses the oldest.
    let mut collector = CollectorProcess::start_with(Some(TOKEN), None, &["--feed-queue", "8"]);
    let grpc = collector.grpc_url();
    let end = (unix_nanos() / (10 * SECOND)) * 10 * SECOND;
    let fast = window("shop", "checkout", "checkout-1", end, vec![(1275, 50)], 0);
    let slow = window(
        "shop",
        "checkout",
        "checkout-2",
        end,
        vec![(1280, 40), (1400, 5)],
        1,
    );
    let slowest = window("ops", "billing", "billing-1", end, vec![(1500, 20)], 0);
    runtime.block_on(async {
        send(&grpc, "agent-a", vec![fast.message(1), slowest.message(2)]).await;
        send(&grpc, "agent-b", vec![slow.message(1)]).await;
    });

    let token_file =
        std::env::temp_dir().join(format!("trazor-watch-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let watch = env!("CARGO_BIN_EXE_trazor-watch");
    let feed = format!("ws://{}/ws", collector.http);
    let tmux = Tmux::start();
    tmux.session(
        "all",
        &format!("{watch} {feed} --token-file {}", token_file.display()),
    );

    // Rows: ops/billing-1 (p99 11 ms) above shop/checkout-2 (3.8 ms) above checkout-1 (1 ms).
    let screen = tmux.wait("all", "three rows", |screen| rows(screen).len() == 3);
    // Left for a person to look at, as the dashboard's screenshots.
    std::fs::write(
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("trazor-watch-screen.txt"),
        &screen,
    )
    .unwrap();
    let shown = rows(&screen);
    assert_eq!(
        shown.iter().map(|row| who(row)).collect::<Vec<_>>(),
        ["ops/billing-1", "shop/checkout-2", "shop/checkout-1"],
        "{screen}"
    );
    // WHO NODE DIR METHOD ROUTE REQ/S ERR% P50 P95 P99 MAX END
    for (row, window) in shown.iter().zip([&slowest, &slow, &fast]) {
        assert_eq!(
            row[1..5],
            ["node-a", "server", "GET", "/cart/{id}"],
            "{screen}"
        );
        assert_eq!(
            row[5],
            format!("{:.1}", window.count() as f64 / 10.0),
            "{screen}"
        );
        assert_eq!(
            row[6],
            format!(
                "{:.1}",
                100.0 * window.errors as f64 / window.count() as f64
            )
        );
        assert_eq!(row[9], p99(window), "{screen}");
    }
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines[0].starts_with("trazor-watch  ws://"), "{screen}");
    assert!(
        lines[0].contains("[live]") && lines[0].contains("3 series"),
        "{screen}"
    );
    assert!(lines[1].contains("sorted by p99"), "{screen}");

    // A new window: checkout-1 becomes the slowest, and the screen is redrawn in place
    // (one title line, at the top; the row moved, not appended).
    let later = window(
        "shop",
        "checkout",
        "checkout-1",
        end + 10 * SECOND,
        vec![(1600, 30)],
        3,
    );
    runtime.block_on(send(&grpc, "agent-a", vec![later.message(3)]));
    let screen = tmux.wait("all", "checkout-1 first", |screen| {
        rows(screen)
            .first()
            .is_some_and(|row| who(row) == "shop/checkout-1")
    });
    let shown = rows(&screen);
    assert_eq!(shown.len(), 3, "{screen}");
    assert_eq!(shown[0][9], p99(&later), "{screen}");
    assert_eq!(shown[0][6], "10.0", "{screen}");
    assert_eq!(screen.matches("trazor-watch  ws://").count(), 1, "{screen}");
    assert!(
        screen.lines().next().unwrap().contains("4 windows"),
        "{screen}"
    );

    // Keys: `s` steps through the columns; six steps from p99 reach `name`.
    for _ in 0..6 {
        tmux.run(&["send-keys", "-t", "all", "s"]);
    }
    let screen = tmux.wait("all", "sorted by name", |screen| {
        screen.contains("sorted by name")
    });
    assert_eq!(
        rows(&screen).iter().map(|row| who(row)).collect::<Vec<_>>(),
        ["ops/billing-1", "shop/checkout-1", "shop/checkout-2"],
        "{screen}"
    );
    tmux.run(&["send-keys", "-t", "all", "q"]);
    tmux.wait("all", "exit after q", |screen| {
        screen.contains("exit status 0")
    });

    // The collector's filters: only namespace shop, sorted by req/s.
    tmux.session(
        "shop",
        &format!("TRAZOR_FEED_TOKEN={TOKEN} {watch} {feed} --namespace shop --sort rps"),
    );
    let screen = tmux.wait("shop", "two shop rows", |screen| rows(screen).len() == 2);
    assert!(screen.contains("filter: namespace=shop"), "{screen}");
    assert!(screen.contains("sorted by req/s"), "{screen}");
    assert_eq!(
        rows(&screen).iter().map(|row| who(row)).collect::<Vec<_>>(),
        ["shop/checkout-2", "shop/checkout-1"],
        "{screen}"
    );

    // The collector restarts: the view says so, reconnects with the same filter and token,
    // and goes on with new windows.
    collector.stop();
    tmux.wait("shop", "disconnected", |screen| {
        screen
            .lines()
            .next()
            .unwrap_or("")
            .contains("[disconnected")
    });
    collector.restart();
    let after = window(
        "shop",
        "cart",
        "cart-1",
        end + 20 * SECOND,
        vec![(1700, 10)],
        0,
    );
    let other = window(
        "ops",
        "billing",
        "billing-1",
        end + 20 * SECOND,
        vec![(1800, 10)],
        0,
    );
    runtime.block_on(send(
        &collector.grpc_url(),
        "agent-c",
        vec![other.message(1), after.message(2)],
    ));
    let screen = tmux.wait("shop", "live again with cart-1", |screen| {
        screen.lines().next().unwrap_or("").contains("[live]")
            && rows(screen).iter().any(|row| who(row) == "shop/cart-1")
    });
    assert!(
        !rows(&screen).iter().any(|row| who(row).starts_with("ops/")),
        "{screen}"
    );

    // Without the token: a clear refusal, exit status 1.
    tmux.session(
        "refused",
        &format!("env -u TRAZOR_FEED_TOKEN {watch} {feed}"),
    );
    let screen = tmux.wait("refused", "refusal", |screen| {
        screen.contains("exit status")
    });
    assert!(
        screen.contains("the collector wants a token (401)"),
        "{screen}"
    );
    assert!(screen.contains("exit status 1"), "{screen}");

    // A view that falls behind (stopped with SIGSTOP while 3 000 big windows go by) says
    // how many windows the collector dropped for it. It is the only subscriber, so that
    // the collector's count of drops is its own (the shop view could fall behind too).
    tmux.run(&["kill-session", "-t", "shop"]);
    tmux.session(
        "slow",
        &format!("{watch} {feed} --token-file {}", token_file.display()),
    );
    tmux.wait("slow", "live", |screen| screen.contains("[live]"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while runtime.block_on(metric(collector.http, "trazor_collector_feed_subscribers")) != 1 {
        assert!(Instant::now() < deadline, "the other views never left");
        std::thread::sleep(Duration::from_millis(100));
    }
    let shell = tmux.run(&["list-panes", "-t", "slow", "-F", "#{pane_pid}"]);
    let pgrep = Command::new("pgrep")
        .args(["-P", shell.trim(), "trazor-watch"])
        .output()
        .unwrap();
    let pid: i32 = String::from_utf8_lossy(&pgrep.stdout)
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signals the trazor-watch this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let big = window(
        "shop",
        "checkout",
        "checkout-9",
        end,
        vec![(1000, 1), (2900, 1)],
        0,
    );
    let messages = (1..=3_000).map(|sequence| big.message(sequence)).collect();
    runtime.block_on(send(&collector.grpc_url(), "agent-d", messages));
    let deadline = Instant::now() + Duration::from_secs(30);
    while runtime.block_on(metric(
        collector.http,
        "trazor_collector_feed_dropped_total",
    )) == 0
    {
        assert!(
            Instant::now() < deadline,
            "nothing dropped for the stopped view"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // Every window sent is either received or missed, and the view's count of missed
    // windows is the collector's count of drops.
    let screen = tmux.wait("slow", "every window received or missed", |screen| {
        counts(screen).is_some_and(|(received, missed, replayed)| {
            missed > 0 && received + missed == 3_000 + replayed
        })
    });
    let (_, missed, _) = counts(&screen).unwrap();
    assert_eq!(
        missed,
        runtime.block_on(metric(
            collector.http,
            "trazor_collector_feed_dropped_total"
        )),
        "{screen}"
    );
    let _ = std::fs::remove_file(&token_file);
}

#[test]
fn into_a_pipe_trazor_watch_prints_one_line_per_window() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let collector = CollectorProcess::start(None, None);
    let end = (unix_nanos() / (10 * SECOND)) * 10 * SECOND;
    let windows = [
        window("shop", "checkout", "checkout-1", end, vec![(1275, 50)], 0),
        window("shop", "checkout", "checkout-2", end, vec![(1400, 20)], 2),
        window("ops", "billing", "billing-1", end, vec![(1500, 20)], 0),
    ];
    runtime.block_on(send(
        &collector.grpc_url(),
        "agent-a",
        windows
            .iter()
            .zip(1..)
            .map(|(window, sequence)| window.message(sequence))
            .collect(),
    ));
    // stdout is a pipe here: the line format scripts read (scripts/test.sh's demo check).
    let output = Command::new(env!("CARGO_BIN_EXE_trazor-watch"))
        .arg(format!("ws://{}/ws", collector.http))
        .args(["--namespace", "shop", "--count", "2"])
        .env_remove("TRAZOR_FEED_TOKEN")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0][..2], ["window", "process[pid]"], "{text}");
    // window, who, method, route, count, 5xx, p50, p95, p99, max
    for (line, window) in lines[1..].iter().zip(&windows) {
        assert_eq!(line[1], format!("shop/{}", window.pod), "{text}");
        assert_eq!(
            line[2..6],
            [
                "GET",
                "/cart/{id}",
                &window.count().to_string(),
                &window.errors.to_string()
            ],
            "{text}"
        );
        assert_eq!(line[8], p99(window), "{text}");
        assert_eq!(line[0].len(), 8, "{text}");
    }
}
