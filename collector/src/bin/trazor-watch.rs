//! `trazor-watch`: the collector's live feed in a terminal.
//!
//! On a terminal it is a `top`-like view: one row per series (the latest window of each
//! pod or process, direction, method, route and peer), sorted by p99 or a chosen column,
//! redrawn in place as windows arrive. When its output is not a terminal (a pipe, a file,
//! `--stream`) it prints one line per window instead, so scripts can read it.
//!
//! Filters are the feed's own (`collector/FEED.md`): the collector sends only what matches,
//! so a narrow view of a big cluster costs neither side anything for the rest.
//!
//! The feed token comes from `--token-file` or `TRAZOR_FEED_TOKEN`, never from an argument:
//! a process's arguments are readable by every user of the machine (`ps`,
//! `/proc/PID/cmdline`) and land in shell history.
use std::{
    collections::HashMap,
    io::{IsTerminal as _, Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, ValueEnum};
use futures::StreamExt as _;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest as _};
use trazor_proto::auth::{TokenError, load_secret};

/// The environment variable holding the feed token when no `--token-file` is given.
const TOKEN_ENV: &str = "TRAZOR_FEED_TOKEN";

/// Shows live per-window latencies from a Trazor collector's WebSocket feed, as a top-like
/// view sorted by p99 (on a terminal) or one line per window (otherwise).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Flags {
    /// The collector's feed URL.
    #[arg(default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Only these namespaces (repeat, or comma-separated; values of one filter are OR'd,
    /// different filters AND'd).
    #[arg(long, value_delimiter = ',')]
    namespace: Vec<String>,
    /// Only pods of these workloads (e.g. a Deployment's name).
    #[arg(long, value_delimiter = ',')]
    workload: Vec<String>,
    /// Only these pods.
    #[arg(long, value_delimiter = ',')]
    pod: Vec<String>,
    /// Only these nodes.
    #[arg(long, value_delimiter = ',')]
    node: Vec<String>,
    /// Only windows of these TraceProfiles (namespace/name).
    #[arg(long, value_delimiter = ',')]
    profile: Vec<String>,
    /// Only this direction: server or client.
    #[arg(long, value_delimiter = ',')]
    direction: Vec<String>,
    /// Only these routes (e.g. /cart/{id}).
    #[arg(long, value_delimiter = ',')]
    route: Vec<String>,
    /// Only these HTTP methods.
    #[arg(long, value_delimiter = ',')]
    method: Vec<String>,
    /// Only windows of processes with these names (standalone mode has no pods).
    #[arg(long, value_delimiter = ',')]
    process: Vec<String>,
    /// Column the view is sorted by (largest first; `name` alphabetically). Keys `s` and `S`
    /// change it while running.
    #[arg(long, value_enum, default_value_t = Column::P99)]
    sort: Column,
    /// How far back the view starts (windows the collector still keeps).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    since: Duration,
    /// One line per window, even on a terminal.
    #[arg(long)]
    stream: bool,
    /// Exit after this many windows (with --stream) or screen refreshes (the view).
    #[arg(long)]
    count: Option<usize>,
    /// File holding the feed token (sent as `Authorization: Bearer`). Without it,
    /// TRAZOR_FEED_TOKEN; without either, no token is sent. Never an argument: arguments
    /// are visible to every user of the machine.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// What the view can be sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Column {
    P99,
    P95,
    P50,
    Max,
    Rps,
    Errors,
    Name,
}

impl Column {
    const ALL: [Column; 7] = [
        Column::P99,
        Column::P95,
        Column::P50,
        Column::Max,
        Column::Rps,
        Column::Errors,
        Column::Name,
    ];

    fn label(self) -> &'static str {
        match self {
            Column::P99 => "p99",
            Column::P95 => "p95",
            Column::P50 => "p50",
            Column::Max => "max",
            Column::Rps => "req/s",
            Column::Errors => "errors",
            Column::Name => "name",
        }
    }

    fn step(self, forward: bool) -> Column {
        let index = Column::ALL.iter().position(|c| *c == self).unwrap_or(0);
        let len = Column::ALL.len();
        Column::ALL[if forward {
            (index + 1) % len
        } else {
            (index + len - 1) % len
        }]
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// The feed token: the file's content (trimmed), else `TRAZOR_FEED_TOKEN`, else none. An
/// empty one is an error, never "no token" by accident.
fn load_token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    load_secret(file, TOKEN_ENV).map_err(|error| match error {
        TokenError::File { .. } => error.to_string(),
        TokenError::Empty { env } => {
            format!("the feed token is empty; put it in the file (or {env}), or give neither")
        }
    })
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

impl Flags {
    fn filters(&self) -> [(&'static str, &[String]); 9] {
        [
            ("namespace", &self.namespace),
            ("workload", &self.workload),
            ("pod", &self.pod),
            ("node", &self.node),
            ("profile", &self.profile),
            ("direction", &self.direction),
            ("route", &self.route),
            ("method", &self.method),
            ("process", &self.process),
        ]
    }

    /// The feed URL with the filters, `kind=windows` and where the replay starts.
    fn feed_url(&self, since_unix_ms: Option<u64>) -> String {
        let mut query = vec!["kind=windows".to_owned()];
        for (key, values) in self.filters() {
            for value in values {
                query.push(format!("{key}={}", encode(value)));
            }
        }
        if let Some(since) = since_unix_ms {
            query.push(format!("since={since}"));
        }
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{separator}{}", self.url, query.join("&"))
    }

    /// The filters as the title line shows them.
    fn filter_summary(&self) -> String {
        let parts: Vec<String> = self
            .filters()
            .iter()
            .filter(|(_, values)| !values.is_empty())
            .map(|(key, values)| format!("{key}={}", values.join(",")))
            .collect();
        if parts.is_empty() {
            "everything".to_owned()
        } else {
            parts.join(" ")
        }
    }
}

/// Why the feed could not be read.
enum FeedError {
    /// The collector refused the token: retrying cannot help.
    Refused(String),
    /// The connection failed or ended; worth retrying.
    Lost(String),
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, token: Option<&str>) -> Result<Socket, FeedError> {
    let mut request = url
        .into_client_request()
        .map_err(|error| FeedError::Refused(format!("{url} is not a WebSocket URL: {error}")))?;
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().map_err(|_| {
            FeedError::Refused("the token has characters a header cannot carry".to_owned())
        })?;
        request.headers_mut().insert("authorization", value);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) if response.status() == 401 => {
            Err(FeedError::Refused(if token.is_some() {
                "the collector refused the token (401); check --token-file or TRAZOR_FEED_TOKEN"
                    .to_owned()
            } else {
                "the collector wants a token (401); give it in a file (--token-file) or in \
                 TRAZOR_FEED_TOKEN"
                    .to_owned()
            }))
        }
        Err(tungstenite::Error::Http(response)) => Err(FeedError::Lost(format!(
            "the collector answered HTTP {}",
            response.status()
        ))),
        Err(error) => Err(FeedError::Lost(error.to_string())),
    }
}

/// One series' latest window, as a row.
#[derive(Debug, Clone)]
struct Row {
    who: String,
    node: String,
    direction: String,
    target: String,
    end_unix_ms: u64,
    length_ms: u64,
    count: u64,
    errors: u64,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

impl Row {
    fn of(window: &Value) -> Self {
        let process = window["process"].as_str().unwrap_or("?");
        let who = match window["pod"]["name"].as_str() {
            Some(pod) => format!(
                "{}/{pod}",
                window["pod"]["namespace"].as_str().unwrap_or("")
            ),
            None => format!("{process}[{}]", window["pid"]),
        };
        let mut target = window["route"].as_str().unwrap_or("").to_owned();
        if target.is_empty() {
            target.push('-');
        }
        if let Some(method) = window["method"]
            .as_str()
            .filter(|method| !method.is_empty())
        {
            target = format!("{method} {target}");
        }
        if window["direction"] == "client" {
            target = format!(
                "{target} → {}:{}",
                window["peer"]["address"].as_str().unwrap_or("?"),
                window["peer"]["port"]
            );
        }
        let ms = |key: &str| window["percentiles"][key].as_f64().unwrap_or(f64::NAN);
        let start = window["start_unix_ms"].as_u64().unwrap_or(0);
        let end = window["end_unix_ms"].as_u64().unwrap_or(0);
        Self {
            who,
            node: window["node"].as_str().unwrap_or("").to_owned(),
            direction: window["direction"].as_str().unwrap_or("").to_owned(),
            target,
            end_unix_ms: end,
            length_ms: end.saturating_sub(start).max(1),
            count: window["count"].as_u64().unwrap_or(0),
            errors: window["errors"].as_u64().unwrap_or(0),
            p50: ms("p50"),
            p95: ms("p95"),
            p99: ms("p99"),
            max: window["max_ms"].as_f64().unwrap_or(f64::NAN),
        }
    }

    fn rate(&self) -> f64 {
        self.count as f64 * 1000.0 / self.length_ms as f64
    }

    fn error_share(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            100.0 * self.errors as f64 / self.count as f64
        }
    }

    /// The value sorted on; larger first.
    fn sort_value(&self, column: Column) -> f64 {
        let value = match column {
            Column::P99 => self.p99,
            Column::P95 => self.p95,
            Column::P50 => self.p50,
            Column::Max => self.max,
            Column::Rps => self.rate(),
            Column::Errors => self.error_share(),
            Column::Name => 0.0,
        };
        if value.is_nan() { f64::MIN } else { value }
    }
}

/// Identity of a series: a row per distinct value.
fn series_key(window: &Value) -> String {
    [
        &window["agent_id"],
        &window["pid"],
        &window["cgroup_id"],
        &window["pod"]["uid"],
        &window["pod"]["name"],
        &window["direction"],
        &window["method"],
        &window["route"],
        &window["peer"],
        &window["profile"],
    ]
    .iter()
    .map(|value| value.to_string())
    .collect::<Vec<_>>()
    .join("\u{1}")
}

fn clock(unix_ms: u64) -> String {
    let text =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string();
    text.get(11..19).unwrap_or(&text).to_owned()
}

/// The view's state: rows and what the title line says.
struct View {
    rows: HashMap<String, Row>,
    sort: Column,
    state: String,
    notice: String,
    missed: u64,
    windows: u64,
    filter: String,
    url: String,
}

impl View {
    fn accept(&mut self, window: &Value) {
        let row = Row::of(window);
        self.windows += 1;
        let key = series_key(window);
        // A replayed or late window older than the one shown does not replace it.
        if self
            .rows
            .get(&key)
            .is_some_and(|shown| shown.end_unix_ms > row.end_unix_ms)
        {
            return;
        }
        self.rows.insert(key, row);
        // Series that stopped (no window for three of their lengths) leave the view.
        let newest = self.rows.values().map(|r| r.end_unix_ms).max().unwrap_or(0);
        self.rows
            .retain(|_, r| r.end_unix_ms + 3 * r.length_ms.max(1_000) >= newest);
    }

    fn sorted(&self) -> Vec<&Row> {
        let mut rows: Vec<&Row> = self.rows.values().collect();
        let column = self.sort;
        rows.sort_by(|a, b| {
            let by_name = a
                .who
                .cmp(&b.who)
                .then_with(|| a.target.cmp(&b.target))
                .then_with(|| a.node.cmp(&b.node));
            if column == Column::Name {
                by_name
            } else {
                b.sort_value(column)
                    .total_cmp(&a.sort_value(column))
                    .then(by_name)
            }
        });
        rows
    }

    /// The screen, `width` × `height` characters at most.
    fn render(&self, width: usize, height: usize) -> Vec<String> {
        let newest = self.rows.values().map(|r| r.end_unix_ms).max();
        let mut lines = vec![
            format!(
                "trazor-watch  {}  [{}]  window {}  {} series  {} windows  missed {}",
                self.url,
                self.state,
                newest.map_or_else(|| "-".to_owned(), clock),
                self.rows.len(),
                self.windows,
                self.missed
            ),
            format!(
                "filter: {}   sorted by {} (s/S: change, q: quit){}",
                self.filter,
                self.sort.label(),
                if self.notice.is_empty() {
                    String::new()
                } else {
                    format!("   {}", self.notice)
                }
            ),
            String::new(),
        ];
        let mark = |column: Column, label: &str| {
            if column == self.sort {
                format!("*{label}")
            } else {
                label.to_owned()
            }
        };
        lines.push(format!(
            "{:<28} {:<16} {:<6} {:<34} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
            mark(Column::Name, "WHO"),
            "NODE",
            "DIR",
            "METHOD ROUTE (→ PEER)",
            mark(Column::Rps, "REQ/S"),
            mark(Column::Errors, "ERR%"),
            mark(Column::P50, "P50 MS"),
            mark(Column::P95, "P95 MS"),
            mark(Column::P99, "P99 MS"),
            mark(Column::Max, "MAX MS"),
            "END"
        ));
        let room = height.saturating_sub(lines.len());
        let rows = self.sorted();
        let hidden = rows.len().saturating_sub(room);
        let shown = if hidden > 0 {
            room.saturating_sub(1)
        } else {
            room
        };
        for row in rows.iter().take(shown) {
            lines.push(format!(
                "{:<28} {:<16} {:<6} {:<34} {:>8.1} {:>6.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8}",
                truncate(&row.who, 28),
                truncate(&row.node, 16),
                row.direction,
                truncate(&row.target, 34),
                row.rate(),
                row.error_share(),
                row.p50,
                row.p95,
                row.p99,
                row.max,
                clock(row.end_unix_ms)
            ));
        }
        if hidden > 0 {
            lines.push(format!(
                "… {} more rows (a taller terminal shows them)",
                rows.len() - shown
            ));
        }
        lines
            .into_iter()
            .map(|line| truncate(&line, width))
            .collect()
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// The terminal's size (columns, rows); 80 × 24 when it cannot be asked.
fn terminal_size() -> (usize, usize) {
    // SAFETY: TIOCGWINSZ fills the winsize struct we pass; nothing else is touched.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let asked = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    if asked == 0 && size.ws_col > 0 && size.ws_row > 0 {
        (size.ws_col as usize, size.ws_row as usize)
    } else {
        (80, 24)
    }
}

/// Keys are read one at a time without echo while the view runs; the terminal's settings
/// come back when this is dropped.
struct KeyboardMode {
    saved: Option<libc::termios>,
}

impl KeyboardMode {
    fn enter() -> Self {
        if !std::io::stdin().is_terminal() {
            return Self { saved: None };
        }
        // SAFETY: tcgetattr/tcsetattr on stdin with termios structs we own.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return Self { saved: None };
            }
            let mut keys = saved;
            // Ctrl-C still interrupts (ISIG stays); only line editing and echo go.
            keys.c_lflag &= !(libc::ICANON | libc::ECHO);
            keys.c_cc[libc::VMIN] = 1;
            keys.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &keys) != 0 {
                return Self { saved: None };
            }
            Self { saved: Some(saved) }
        }
    }
}

impl Drop for KeyboardMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores the settings read in `enter`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
        // The cursor was hidden while drawing.
        print!("\x1b[?25h");
        let _ = std::io::stdout().flush();
    }
}

/// Key presses, read by a thread (stdin has no async reader that stops cleanly).
fn keys() -> mpsc::Receiver<u8> {
    let (sender, receiver) = mpsc::channel(16);
    if std::io::stdin().is_terminal() {
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let mut stdin = std::io::stdin();
            while let Ok(1) = stdin.read(&mut byte) {
                if sender.blocking_send(byte[0]).is_err() {
                    break;
                }
            }
        });
    }
    receiver
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::parse();
    let token = match load_token(flags.token_file.as_deref()) {
        Ok(token) => token,
        Err(error) => {
            eprintln!("trazor-watch: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    if flags.stream || !std::io::stdout().is_terminal() {
        stream(&flags, token.as_deref()).await
    } else {
        top(&flags, token.as_deref()).await
    }
}

/// The first connection, which must work: a wrong URL or token is reported (on stderr)
/// and ends the program rather than being retried.
async fn open_first(flags: &Flags, url: &str, token: Option<&str>) -> Result<Socket, ExitCode> {
    connect(url, token).await.map_err(|error| {
        match error {
            FeedError::Refused(reason) => eprintln!("trazor-watch: error: {reason}"),
            FeedError::Lost(reason) => eprintln!(
                "trazor-watch: error: cannot open {}: {reason}; is the collector running \
                 (trazor-collector --http-listen ...)?",
                flags.url
            ),
        }
        ExitCode::FAILURE
    })
}

/// One line per window: the format scripts (and the demo's smoke check) read.
async fn stream(flags: &Flags, token: Option<&str>) -> ExitCode {
    let url = flags.feed_url(None);
    let mut socket = match open_first(flags, &url, token).await {
        Ok(socket) => socket,
        Err(code) => return code,
    };
    println!(
        "{:<8} {:<24} {:<36} {:>6} {:>4} {:>9} {:>9} {:>9} {:>9}",
        "window",
        "process[pid]",
        "method route (→ peer)",
        "count",
        "5xx",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms"
    );
    let mut shown = 0usize;
    while let Some(message) = socket.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(error) => {
                eprintln!("trazor-watch: error: the feed failed: {error}");
                return ExitCode::FAILURE;
            }
        };
        let Ok(document) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        match document["type"].as_str() {
            Some("missed" | "lagged") => {
                println!(
                    "... missed {} windows (terminal too slow)",
                    document["missed"]
                );
                continue;
            }
            Some("error") => {
                eprintln!(
                    "trazor-watch: the collector says: {} ({})",
                    document["message"].as_str().unwrap_or(""),
                    document["code"].as_str().unwrap_or("")
                );
                continue;
            }
            Some("window") => {}
            _ => continue,
        }
        let row = Row::of(&document);
        let start = document["start"].as_str().unwrap_or("");
        println!(
            "{:<8} {:<24} {:<36} {:>6} {:>4} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            start.get(11..19).unwrap_or(start),
            row.who,
            row.target,
            row.count,
            row.errors,
            row.p50,
            row.p95,
            row.p99,
            row.max,
        );
        shown += 1;
        if flags.count.is_some_and(|count| shown >= count) {
            break;
        }
    }
    ExitCode::SUCCESS
}

/// The top-like view: redrawn in place whenever a window changed it, reconnecting (and
/// saying so) when the collector goes away.
async fn top(flags: &Flags, token: Option<&str>) -> ExitCode {
    let since = unix_ms_now().saturating_sub(flags.since.as_millis() as u64);
    // The first connection must work: a wrong URL or token should not spin.
    let socket = match open_first(flags, &flags.feed_url(Some(since)), token).await {
        Ok(socket) => socket,
        Err(code) => return code,
    };
    let _keyboard = KeyboardMode::enter();
    let mut keys = keys();
    let mut keys_open = true;
    let mut view = View {
        rows: HashMap::new(),
        sort: flags.sort,
        state: "live".to_owned(),
        notice: String::new(),
        missed: 0,
        windows: 0,
        filter: flags.filter_summary(),
        url: flags.url.clone(),
    };
    let mut socket = Some(socket);
    let mut retry_at = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(500);
    let mut refreshes = 0usize;
    let mut dirty = true;
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                eprintln!("trazor-watch: error: cannot handle SIGTERM: {error}");
                return ExitCode::FAILURE;
            }
        };
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if socket.is_none() && tokio::time::Instant::now() >= retry_at {
                    // Resume where the view is: windows from just before the newest shown.
                    let newest = view.rows.values().map(|r| r.end_unix_ms).max().unwrap_or(since);
                    // Bounded, so keys still work while a vanished host does not answer.
                    let url = flags.feed_url(Some(newest.saturating_sub(1)));
                    let attempt = tokio::time::timeout(Duration::from_secs(5), connect(&url, token))
                        .await
                        .unwrap_or_else(|_| Err(FeedError::Lost("no answer within 5 s".to_owned())));
                    match attempt {
                        Ok(connected) => {
                            socket = Some(connected);
                            view.state = "live".to_owned();
                            backoff = Duration::from_millis(500);
                        }
                        Err(FeedError::Refused(reason) | FeedError::Lost(reason)) => {
                            view.state = format!(
                                "disconnected: {reason}; retrying in {:.1} s",
                                backoff.as_secs_f64()
                            );
                            retry_at = tokio::time::Instant::now() + backoff;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                    dirty = true;
                }
                if dirty {
                    dirty = false;
                    let (width, height) = terminal_size();
                    let mut screen = String::from("\x1b[?25l\x1b[H");
                    for line in view.render(width, height) {
                        screen.push_str(&line);
                        screen.push_str("\x1b[K\r\n");
                    }
                    screen.push_str("\x1b[J");
                    let mut stdout = std::io::stdout().lock();
                    if stdout.write_all(screen.as_bytes()).and_then(|()| stdout.flush()).is_err() {
                        return ExitCode::FAILURE;
                    }
                    refreshes += 1;
                    if flags.count.is_some_and(|count| refreshes >= count) {
                        return ExitCode::SUCCESS;
                    }
                }
            }
            message = async { match socket.as_mut() {
                Some(socket) => socket.next().await,
                None => std::future::pending().await,
            } } => {
                match message {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(document) = serde_json::from_str::<Value>(&text) {
                            dirty |= handle(&mut view, &document);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        socket = None;
                        view.state = "disconnected: the feed closed; reconnecting".to_owned();
                        retry_at = tokio::time::Instant::now() + backoff;
                        dirty = true;
                    }
                }
            }
            key = keys.recv(), if keys_open => match key {
                Some(b'q') => return ExitCode::SUCCESS,
                Some(b's') => { view.sort = view.sort.step(true); dirty = true; }
                Some(b'S') => { view.sort = view.sort.step(false); dirty = true; }
                Some(_) => {}
                // No terminal to read keys from: Ctrl-C or SIGTERM end the view.
                None => keys_open = false,
            },
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            _ = terminate.recv() => return ExitCode::SUCCESS,
        }
    }
}

/// Applies one feed document to the view; whether the screen changed.
fn handle(view: &mut View, document: &Value) -> bool {
    match document["type"].as_str() {
        Some("window") => {
            view.accept(document);
            true
        }
        Some("missed" | "lagged") => {
            // `missed` counts the drops since the previous such frame: summed, it is the
            // total over every connection this view had.
            view.missed += document["missed"].as_u64().unwrap_or(0);
            true
        }
        Some("subscribed") => {
            view.notice = format!(
                "subscribed ({} replayed)",
                document["replayed"].as_u64().unwrap_or(0)
            );
            true
        }
        Some("error") => {
            view.notice = format!(
                "collector: {} ({})",
                document["message"].as_str().unwrap_or(""),
                document["code"].as_str().unwrap_or("")
            );
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(pod: &str, p99: f64, end: u64) -> Value {
        serde_json::json!({
            "type": "window", "agent_id": "a", "pid": 1, "cgroup_id": 2, "node": "n1",
            "pod": {"namespace": "shop", "name": pod, "uid": pod},
            "direction": "server", "method": "GET", "route": "/x", "peer": null, "profile": "",
            "start_unix_ms": end - 1000, "end_unix_ms": end, "count": 10, "errors": 1,
            "percentiles": {"p50": 1.0, "p95": 2.0, "p99": p99}, "max_ms": p99 + 1.0,
        })
    }

    #[test]
    fn rows_sort_by_the_chosen_column_and_newer_windows_replace_older() {
        let mut view = View {
            rows: HashMap::new(),
            sort: Column::P99,
            state: String::new(),
            notice: String::new(),
            missed: 0,
            windows: 0,
            filter: String::new(),
            url: String::new(),
        };
        view.accept(&window("a", 5.0, 10_000));
        view.accept(&window("b", 9.0, 10_000));
        view.accept(&window("a", 3.0, 9_000)); // older: ignored
        let order: Vec<_> = view.sorted().iter().map(|r| r.who.clone()).collect();
        assert_eq!(order, ["shop/b", "shop/a"]);
        view.accept(&window("a", 20.0, 11_000));
        assert_eq!(view.sorted()[0].p99, 20.0);
        view.sort = Column::Name;
        assert_eq!(view.sorted()[0].who, "shop/a");
        // A series silent for three of its windows leaves.
        view.accept(&window("a", 20.0, 14_000));
        assert_eq!(view.rows.len(), 1);
    }

    #[test]
    fn filters_become_query_parameters() {
        let flags = Flags::parse_from([
            "trazor-watch",
            "ws://h/ws",
            "--namespace",
            "shop,prod",
            "--route",
            "/cart/{id}",
        ]);
        assert_eq!(
            flags.feed_url(Some(5)),
            "ws://h/ws?kind=windows&namespace=shop&namespace=prod&route=%2Fcart%2F%7Bid%7D&since=5"
        );
    }
}
