//! `trazor-bench-feed`: the live feed's fan-out, measured against a real collector process.
//!
//! Starts `trazor-collector` (release build), an agent that streams windows to it over gRPC
//! at a steady rate, and 1 000 WebSocket subscribers (plus one with a narrow filter) in this
//! process, all over loopback. Each window's send time is kept by sequence; a subscriber
//! that receives it records the delay (publish to receipt: gRPC ingest, dedup, merge,
//! publish, fan-out, WebSocket, and this process's own scheduling). Phases:
//!
//! 1. no subscribers: the collector's CPU for ingest alone;
//! 2. 1 000 + 1 subscribers: latency per window (p50/p99/max over every delivery), CPU, memory;
//! 3. the same plus one subscriber that stops reading for 60 s: the others' latency and the
//!    collector's memory while its queue overflows; then it reads again and must account for
//!    every window (received + missed).
//!
//! Memory is the collector's RSS (`/proc/<pid>/status`), CPU its utime + stime
//! (`/proc/<pid>/stat`). Run it with `scripts/bench-feed.sh`, which builds in release mode
//! and writes `bench/results/feed.md`.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpSocket,
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::{Message, protocol::Role};
use trazor_proto::v1::{
    AgentHello, AgentMessage, Direction, Exemplar, ExponentialHistogram, LatencyStats,
    LatencyWindow, PodIdentity, Quantile, Source, agent_message,
    latency_ingest_client::LatencyIngestClient,
};

/// Fan-out benchmark of the collector's live feed.
#[derive(Parser, Debug)]
#[command(about)]
struct Flags {
    /// The collector binary (a release build).
    #[arg(long, default_value = "target/release/trazor-collector")]
    collector: PathBuf,
    /// Subscribers that take every window.
    #[arg(long, default_value_t = 1_000)]
    subscribers: usize,
    /// Windows the agent sends per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Length of the measured phases without a slow subscriber.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long the slow subscriber stops reading.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    slow_duration: Duration,
    /// Write the results as Markdown here (e.g. bench/results/feed.md).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Namespaces the windows are spread over; the narrow subscriber takes one.
const NAMESPACES: u64 = 50;
const WORKLOADS: u64 = 10;

/// Send times by sequence, in ns since `epoch`; 0 = not sent yet.
struct SendTimes {
    epoch: Instant,
    nanos: Vec<AtomicU64>,
}

impl SendTimes {
    fn latency_us(&self, sequence: u64, received: Instant) -> Option<u32> {
        let sent = self.nanos.get(sequence as usize)?.load(Ordering::Acquire);
        if sent == 0 {
            return None;
        }
        let received = received.duration_since(self.epoch).as_nanos() as u64;
        Some((received.saturating_sub(sent) / 1_000) as u32)
    }
}

/// What one subscriber saw: (sequence, latency in µs) per window. Each subscriber has its
/// own, so the lock is never contended.
type Deliveries = Arc<Mutex<Vec<(u32, u32)>>>;

fn window(sequence: u64, end_unix_nanos: u64) -> LatencyWindow {
    let namespace = sequence % NAMESPACES;
    let workload = (sequence / NAMESPACES) % WORKLOADS;
    let pod = format!("wl-{workload}-7d4b9c-{:05}", sequence % 997);
    LatencyWindow {
        sequence,
        source: Some(Source {
            node_name: format!("node-{}", sequence % 20),
            cgroup_id: 10_000 + sequence % 997,
            cgroup_path: format!("/kubepods/burstable/pod{pod}/c0ffee"),
            pid: 4_000 + (sequence % 997) as u32,
            process_name: "server".into(),
            pod: Some(PodIdentity {
                namespace: format!("ns-{namespace}"),
                name: pod.clone(),
                uid: format!("uid-{pod}"),
                container: "app".into(),
                workload_kind: "Deployment".into(),
                workload_name: format!("wl-{workload}"),
            }),
        }),
        direction: Direction::Server as i32,
        start_unix_nanos: end_unix_nanos - 10_000_000_000,
        end_unix_nanos,
        stats: Some(LatencyStats {
            count: 1_445,
            error_count: 11,
            sum_nanos: 1_445 * 13_700_000,
            min_nanos: 9_800_000,
            max_nanos: 80_260_000,
            quantiles: [(0.5, 10_140_000), (0.95, 80_240_000), (0.99, 80_240_000)]
                .into_iter()
                .map(|(quantile, value_nanos)| Quantile {
                    quantile,
                    value_nanos,
                })
                .collect(),
        }),
        histogram: Some(ExponentialHistogram {
            scale: 6,
            offset: 1_480,
            bucket_counts: (0..40).map(|bucket| 10 + bucket * 7).collect(),
        }),
        status_class_counts: vec![0, 0, 1_434, 0, 0, 11],
        statuses: Vec::new(),
        profile: "shop/latency".into(),
        route: "/cart/{id}".into(),
        peer: None,
        exemplars: vec![Exemplar {
            start_unix_nanos: end_unix_nanos - 3_000_000_000,
            duration_nanos: 80_260_000,
            method: "GET".into(),
            status_code: 503,
            path: "/cart/17".into(),
            tid: 4_242,
        }],
        method: "GET".into(),
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}

/// The collector process and what /proc says about it.
struct Collector {
    child: tokio::process::Child,
    pid: u32,
    http: SocketAddr,
    grpc: SocketAddr,
}

impl Collector {
    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")
    }

    /// utime + stime.
    fn cpu(&self) -> anyhow::Result<Duration> {
        process_cpu(&self.pid.to_string())
    }

    async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let mut stream = tokio::net::TcpStream::connect(self.http).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        body.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.trim().parse().ok())
            .with_context(|| format!("no {name} in /metrics"))
    }
}

/// utime + stime of a process (`self` for this one).
fn process_cpu(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let after = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_collector(flags: &Flags) -> anyhow::Result<Collector> {
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let slow_bound = flags.slow_duration + Duration::from_secs(60);
    let child = tokio::process::Command::new(&flags.collector)
        .args([
            "--http-listen",
            &http.to_string(),
            "--grpc-listen",
            &grpc.to_string(),
        ])
        // A history that fills within the first phase, so that later growth of the RSS is
        // the subscribers' and not the history still filling.
        .args(["--feed-max-connections", "5000", "--history", "2000"])
        // The slow subscriber reads nothing (so answers no ping) for `slow_duration`; the
        // default heartbeat would close it after 30 s, which frees its memory. To measure
        // a slow client that stays, the bound here is longer than its pause.
        .args(["--feed-ping-interval", "15s", "--feed-pong-timeout"])
        .arg(format!("{}s", slow_bound.as_secs()))
        .env_remove("TRAZOR_TOKEN")
        .env_remove("TRAZOR_FEED_TOKEN")
        .env("TRAZOR_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", flags.collector.display()))?;
    let pid = child.id().context("collector exited")?;
    let collector = Collector {
        child,
        pid,
        http,
        grpc,
    };
    for _ in 0..100 {
        if collector
            .metric("trazor_collector_feed_subscribers")
            .await
            .is_ok()
        {
            return Ok(collector);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the collector did not answer on {http}")
}

/// A subscriber that reads every frame and records each window's delay.
async fn subscriber(
    url: String,
    times: Arc<SendTimes>,
    deliveries: Deliveries,
    subscribed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
    while let Some(message) = socket.next().await {
        let received = Instant::now();
        let Message::Text(text) = message? else {
            continue;
        };
        let text = text.as_str();
        if text.starts_with(r#"{"type":"subscribed""#) {
            subscribed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if !text.starts_with(r#"{"type":"window""#) {
            continue;
        }
        // Cheap on purpose: a thousand subscribers share two cores with the collector.
        let Some(sequence) = text
            .split_once(r#""sequence":"#)
            .and_then(|(_, rest)| rest.split(',').next())
            .and_then(|number| number.parse::<u64>().ok())
        else {
            continue;
        };
        if let Some(latency) = times.latency_us(sequence, received) {
            deliveries
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push((sequence as u32, latency));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    Ok(())
}

/// Percentile of `values` (sorted), in ms.
fn percentile_ms(sorted: &[u32], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
    f64::from(sorted[index]) / 1_000.0
}

#[derive(Default, Clone)]
struct Phase {
    name: String,
    windows: u64,
    seconds: f64,
    frames_sent: u64,
    deliveries: usize,
    p50: f64,
    p99: f64,
    max: f64,
    narrow_deliveries: usize,
    narrow_p50: f64,
    narrow_p99: f64,
    cpu_cores: f64,
    /// This process (the subscribers and the agent) over the phase.
    bench_cpu_cores: f64,
    rss_max_mib: f64,
    dropped: u64,
}

fn latencies(deliveries: &[Deliveries], range: &std::ops::Range<u64>) -> Vec<u32> {
    let mut latencies: Vec<u32> = deliveries
        .iter()
        .flat_map(|one| {
            one.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
                .filter(|(sequence, _)| range.contains(&u64::from(*sequence)))
                .map(|(_, latency)| *latency)
                .collect::<Vec<_>>()
        })
        .collect();
    latencies.sort_unstable();
    latencies
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    raise_open_files_limit();
    let collector = start_collector(&flags).await?;
    let total_windows = (u64::from(flags.rate)
        * (flags.duration.as_secs() * 2 + flags.slow_duration.as_secs() + 30))
        as usize;
    let times = Arc::new(SendTimes {
        epoch: Instant::now(),
        nanos: (0..=total_windows).map(|_| AtomicU64::new(0)).collect(),
    });

    // The agent: one stream, windows at a steady rate, acks drained.
    let mut client = LatencyIngestClient::connect(format!("http://{}", collector.grpc)).await?;
    let (sender, receiver) = mpsc::channel(4_096);
    sender
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(AgentHello {
                node_name: "bench".into(),
                agent_id: "bench-agent".into(),
                boot_id: "boot-1".into(),
                version: "bench".into(),
                capabilities: vec![],
            })),
        })
        .await?;
    let mut acks = client
        .stream(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = acks.message().await {} });
    let next_sequence = Arc::new(AtomicU64::new(1));
    let publishing = Arc::new(AtomicBool::new(false));
    {
        let times = times.clone();
        let next_sequence = next_sequence.clone();
        let publishing = publishing.clone();
        let period = Duration::from_secs_f64(1.0 / f64::from(flags.rate));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            loop {
                ticks.tick().await;
                if !publishing.load(Ordering::Relaxed) {
                    continue;
                }
                let sequence = next_sequence.load(Ordering::Relaxed);
                let Some(slot) = times.nanos.get(sequence as usize) else {
                    return;
                };
                // Windows end on 10 s boundaries, as agents' do.
                let end = unix_nanos() / 10_000_000_000 * 10_000_000_000;
                let message = AgentMessage {
                    kind: Some(agent_message::Kind::Window(window(sequence, end))),
                };
                slot.store(times.epoch.elapsed().as_nanos() as u64, Ordering::Release);
                if sender.send(message).await.is_err() {
                    return;
                }
                next_sequence.store(sequence + 1, Ordering::Relaxed);
            }
        });
    }
    // Phase 1: no subscribers.
    let rss_idle = collector.rss_kib()?;
    resume(&publishing).await;
    let (cpu_start, start, first) = (
        collector.cpu()?,
        Instant::now(),
        next_sequence.load(Ordering::Relaxed),
    );
    tokio::time::sleep(flags.duration.min(Duration::from_secs(15))).await;
    let mut alone = Phase {
        name: "no subscribers".to_owned(),
        windows: next_sequence.load(Ordering::Relaxed) - first,
        seconds: start.elapsed().as_secs_f64(),
        cpu_cores: (collector.cpu()? - cpu_start).as_secs_f64() / start.elapsed().as_secs_f64(),
        rss_max_mib: collector.rss_kib()? as f64 / 1024.0,
        ..Default::default()
    };
    (alone.p50, alone.p99, alone.max) = (f64::NAN, f64::NAN, f64::NAN);
    (alone.narrow_p50, alone.narrow_p99) = (f64::NAN, f64::NAN);
    publishing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = collector.rss_kib()?;

    // Connect the subscribers (with publishing paused, so memory is the connections').
    let deliveries: Vec<Deliveries> = (0..flags.subscribers).map(|_| Arc::default()).collect();
    let narrow: Vec<Deliveries> = vec![Arc::default()];
    let subscribed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let url = format!("ws://{}/ws?history=0&kind=windows", collector.http);
    for one in &deliveries {
        tasks.push(tokio::spawn(subscriber(
            url.clone(),
            times.clone(),
            one.clone(),
            subscribed.clone(),
            stop.clone(),
        )));
        // Pace connects a little: 1 000 handshakes at once would only measure the
        // listen backlog.
        tokio::task::yield_now().await;
    }
    let narrow_url = format!(
        "ws://{}/ws?history=0&kind=windows&namespace=ns-7",
        collector.http
    );
    tasks.push(tokio::spawn(subscriber(
        narrow_url,
        times.clone(),
        narrow[0].clone(),
        subscribed.clone(),
        stop.clone(),
    )));
    let connecting = Instant::now();
    while subscribed.load(Ordering::Relaxed) < flags.subscribers as u64 + 1 {
        if connecting.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {} of {} subscribers connected in 60 s",
                subscribed.load(Ordering::Relaxed),
                flags.subscribers + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = collector.rss_kib()?;

    // Phase 2: 1 000 + 1 subscribers.
    let probes = Probes {
        collector: &collector,
        next_sequence: &next_sequence,
        deliveries: &deliveries,
        narrow: &narrow,
    };
    resume(&publishing).await;
    let fanout = probes
        .phase(
            &format!("{} + 1 narrow subscribers", flags.subscribers),
            flags.duration,
        )
        .await?;
    let rss_after_fanout = collector.rss_kib()?;

    // Phase 3: plus one subscriber that stops reading.
    let published_before = collector
        .metric("trazor_collector_windows_published_total")
        .await?;
    let mut slow = slow_subscriber(collector.http).await?;
    let dropped_before = collector
        .metric("trazor_collector_feed_dropped_total")
        .await?;
    let slow_first = next_sequence.load(Ordering::Relaxed);
    let slowed = probes
        .phase(
            &format!("… + 1 not reading for {} s", flags.slow_duration.as_secs()),
            flags.slow_duration,
        )
        .await?;
    let slow_last = next_sequence.load(Ordering::Relaxed) - 1;
    // The slow subscriber reads again, with no new windows: everything published since it
    // connected is either received or reported missed, and the drops it is told of are
    // all the collector counted (no other subscriber drops any).
    publishing.store(false, Ordering::Relaxed);
    let published_after = collector
        .metric("trazor_collector_windows_published_total")
        .await?;
    let drain = drain_slow(&mut slow, slow_last).await?;
    drop(slow);
    let dropped_total = collector
        .metric("trazor_collector_feed_dropped_total")
        .await?
        - dropped_before;
    // The same fan-out again once it is gone: a fair reference for the phase with it,
    // whatever else the machine did meanwhile.
    resume(&publishing).await;
    let after = probes
        .phase(
            &format!("{} + 1 again, slow one gone", flags.subscribers),
            flags.duration,
        )
        .await?;
    publishing.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut collector = collector;
    let _ = collector.child.kill().await;

    let per_subscriber_kib =
        (rss_connected.saturating_sub(rss_before)) as f64 / (flags.subscribers + 1) as f64;
    let cpu_per_thousand =
        (fanout.cpu_cores - alone.cpu_cores) * 1_000.0 / (flags.subscribers + 1) as f64;
    let mut report = String::new();
    let machine = machine_description();
    let _ = writeln!(report, "# Live feed fan-out benchmark\n");
    let _ = writeln!(
        report,
        "Produced by `scripts/bench-feed.sh` (release build of `trazor-bench-feed --subscribers {} --rate {} --duration {}s --slow-duration {}s`) on {}, {machine}.\n",
        flags.subscribers,
        flags.rate,
        flags.duration.as_secs(),
        flags.slow_duration.as_secs(),
        humantime::format_rfc3339_seconds(SystemTime::now()),
    );
    let _ = writeln!(
        report,
        "A real `trazor-collector` process; one agent streams realistic windows (pod identity, route, 3 quantiles, 40-bucket histogram, an exemplar; about 1.2 KB of JSON each) over loopback gRPC at {} windows/s, spread over {} namespaces × {} workloads; aggregates close 30 s after their 10 s window and go out too. {} subscribers take every window (`?kind=windows`), one takes a narrow filter (`namespace=ns-7`, 1 window in {}), all in this benchmark process on the same two cores as the collector. Latency = from just before the agent's gRPC send to the subscriber's receipt of the frame, over every delivery in the phase. Memory = the collector's RSS; CPU = its utime + stime over wall time.\n",
        flags.rate, NAMESPACES, WORKLOADS, flags.subscribers, NAMESPACES
    );
    let phases = [&alone, &fanout, &slowed, &after];
    let _ = writeln!(
        report,
        "| | {} |\n|---|{}",
        phases
            .iter()
            .map(|phase| phase.name.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(phases.len())
    );
    let row = |report: &mut String, label: &str, value: &dyn Fn(&Phase) -> String| {
        let _ = writeln!(
            report,
            "| {label} | {} |",
            phases
                .iter()
                .map(|phase| value(phase))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    };
    let ms = |value: f64| {
        if value.is_nan() {
            "—".to_owned()
        } else {
            format!("{value:.1} ms")
        }
    };
    row(&mut report, "windows published", &|phase| {
        format!("{} in {:.0} s", phase.windows, phase.seconds)
    });
    row(
        &mut report,
        "frames sent (windows and aggregates)",
        &|phase| {
            format!(
                "{:.0}/s",
                phase.frames_sent as f64 / phase.seconds.max(1e-9)
            )
        },
    );
    row(&mut report, "deliveries measured", &|phase| {
        phase.deliveries.to_string()
    });
    row(&mut report, "latency p50", &|phase| ms(phase.p50));
    row(&mut report, "latency p99 (goal ≤ 100 ms)", &|phase| {
        ms(phase.p99)
    });
    row(&mut report, "latency max", &|phase| ms(phase.max));
    row(
        &mut report,
        "narrow subscriber: deliveries, p50 / p99",
        &|phase| {
            if phase.narrow_deliveries == 0 {
                "—".to_owned()
            } else {
                format!(
                    "{}, {} / {}",
                    phase.narrow_deliveries,
                    ms(phase.narrow_p50),
                    ms(phase.narrow_p99)
                )
            }
        },
    );
    row(&mut report, "collector CPU", &|phase| {
        format!("{:.2} cores", phase.cpu_cores)
    });
    row(
        &mut report,
        "this benchmark's CPU (agent + subscribers)",
        &|phase| {
            if phase.bench_cpu_cores == 0.0 {
                "—".to_owned()
            } else {
                format!("{:.2} cores", phase.bench_cpu_cores)
            }
        },
    );
    row(&mut report, "collector RSS (max sampled)", &|phase| {
        format!("{:.1} MiB", phase.rss_max_mib)
    });
    row(
        &mut report,
        "items dropped from subscribers' queues",
        &|phase| phase.dropped.to_string(),
    );
    let _ = writeln!(report);
    let _ = writeln!(
        report,
        "- **Collector memory per subscriber**: {per_subscriber_kib:.1} KiB (RSS {:.1} MiB idle at start, {:.1} MiB before connecting, {:.1} MiB with {} subscribers connected and idle, {:.1} MiB after the fan-out phase).",
        rss_idle as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        rss_connected as f64 / 1024.0,
        flags.subscribers + 1,
        rss_after_fanout as f64 / 1024.0
    );
    let _ = writeln!(
        report,
        "- **CPU per 1 000 subscribers** at {} windows/s: {:.2} cores ({:.0} ms of CPU per second; the fan-out phase's CPU minus the no-subscriber phase's), i.e. {:.1} µs of collector CPU per frame delivered.",
        flags.rate,
        cpu_per_thousand,
        cpu_per_thousand * 1_000.0,
        (fanout.cpu_cores - alone.cpu_cores) * 1e6
            / (fanout.deliveries as f64 / fanout.seconds).max(1e-9)
    );
    let _ = writeln!(
        report,
        "- **Slow subscriber** (no filter: windows and aggregates, like a dashboard tab): stopped reading for {} s (socket receive buffer 4 KiB; the collector's queue for it `--feed-queue` 4 096 items, plus what the kernel's socket buffers hold). Its queue dropped {} items, all counted in `trazor_collector_feed_dropped_total`. When it read again it got {} windows and {} aggregates, windows in publish order: {}, and `missed` frames totalling {} (equal to the collector's drop count: {}). Received + missed = {} of the {} items the collector published while it was connected (read from `/metrics` around its connect and the end, so a few items apart; {} of them windows).",
        flags.slow_duration.as_secs(),
        dropped_total,
        drain.windows,
        drain.aggregates,
        if drain.in_order { "yes" } else { "NO" },
        drain.missed,
        if drain.missed == dropped_total {
            "yes"
        } else {
            "NO"
        },
        drain.windows + drain.aggregates + drain.missed,
        published_after - published_before,
        slow_last + 1 - slow_first,
    );
    let _ = writeln!(
        report,
        "- The others' latency with the slow subscriber: p50 {} and p99 {}, against {} and {} before it and {} and {} after it; the collector's RSS peaked at {:.1} MiB with it, {:.1} MiB before and {:.1} MiB after.",
        ms(slowed.p50),
        ms(slowed.p99),
        ms(fanout.p50),
        ms(fanout.p99),
        ms(after.p50),
        ms(after.p99),
        slowed.rss_max_mib,
        fanout.rss_max_mib,
        after.rss_max_mib,
    );
    print!("{report}");
    if let Some(path) = &flags.output {
        std::fs::write(path, &report).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("written to {}", path.display());
    }
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// Publishes again, and waits 3 s (a warm-up, and time for the fan-out to settle) before
/// a phase is measured.
async fn resume(publishing: &AtomicBool) {
    publishing.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
}

/// What a measured phase reads: the collector, the agent's next sequence, and what the
/// subscribers that take every window and the narrow one received.
struct Probes<'a> {
    collector: &'a Collector,
    next_sequence: &'a AtomicU64,
    deliveries: &'a [Deliveries],
    narrow: &'a [Deliveries],
}

impl Probes<'_> {
    async fn phase(&self, name: &str, duration: Duration) -> anyhow::Result<Phase> {
        let Self {
            collector,
            next_sequence,
            deliveries,
            narrow,
        } = *self;
        let first = next_sequence.load(Ordering::Relaxed);
        let dropped_start = collector
            .metric("trazor_collector_feed_dropped_total")
            .await?;
        let frames_start = collector
            .metric("trazor_collector_feed_frames_sent_total")
            .await?;
        let cpu_start = collector.cpu()?;
        let bench_cpu_start = process_cpu("self")?;
        let start = Instant::now();
        let mut rss_max = 0;
        while start.elapsed() < duration {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss_max = rss_max.max(collector.rss_kib()?);
        }
        let seconds = start.elapsed().as_secs_f64();
        let cpu = collector.cpu()? - cpu_start;
        let bench_cpu = process_cpu("self")? - bench_cpu_start;
        let frames_sent = collector
            .metric("trazor_collector_feed_frames_sent_total")
            .await?
            - frames_start;
        let dropped = collector
            .metric("trazor_collector_feed_dropped_total")
            .await?
            - dropped_start;
        let last = next_sequence.load(Ordering::Relaxed);
        // Give the last windows time to arrive everywhere.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let range = first..last;
        let all = latencies(deliveries, &range);
        let narrow = latencies(narrow, &range);
        Ok(Phase {
            name: name.to_owned(),
            windows: last - first,
            seconds,
            frames_sent,
            deliveries: all.len(),
            p50: percentile_ms(&all, 0.5),
            p99: percentile_ms(&all, 0.99),
            max: percentile_ms(&all, 1.0),
            narrow_deliveries: narrow.len(),
            narrow_p50: percentile_ms(&narrow, 0.5),
            narrow_p99: percentile_ms(&narrow, 0.99),
            cpu_cores: cpu.as_secs_f64() / seconds,
            bench_cpu_cores: bench_cpu.as_secs_f64() / seconds,
            rss_max_mib: rss_max as f64 / 1024.0,
            dropped,
        })
    }
}

type RawSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A subscriber with a 4 KiB receive buffer that reads nothing until `drain_slow`.
async fn slow_subscriber(http: SocketAddr) -> anyhow::Result<RawSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4_096)?;
    let mut stream = socket.connect(http).await?;
    let request = format!(
        "GET /ws?history=0 HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        stream.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!(
            "slow subscriber refused: {}",
            String::from_utf8_lossy(&head)
        );
    }
    Ok(tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Client, None).await)
}

/// What the slow subscriber got once it read again.
struct SlowDrain {
    windows: u64,
    aggregates: u64,
    /// Sum of its `missed` frames.
    missed: u64,
    /// Window sequences strictly increasing (nothing repeated, publish order kept).
    in_order: bool,
}

/// Reads the slow subscriber until window `last`.
async fn drain_slow(socket: &mut RawSocket, last: u64) -> anyhow::Result<SlowDrain> {
    let mut drain = SlowDrain {
        windows: 0,
        aggregates: 0,
        missed: 0,
        in_order: true,
    };
    let mut previous = 0;
    loop {
        let Some(message) = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .context("the slow subscriber got nothing for 30 s")?
        else {
            bail!("the slow subscriber was closed");
        };
        let Message::Text(text) = message? else {
            continue;
        };
        let json: serde_json::Value = serde_json::from_str(text.as_str())?;
        match json["type"].as_str() {
            Some("missed") => drain.missed += json["missed"].as_u64().unwrap_or(0),
            Some("aggregate") => drain.aggregates += 1,
            Some("window") => {
                drain.windows += 1;
                let sequence = json["sequence"].as_u64().unwrap_or(0);
                drain.in_order &= sequence > previous;
                previous = sequence;
                if sequence >= last {
                    return Ok(drain);
                }
            }
            _ => {}
        }
    }
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|name| name.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");
    format!("{cpu}, {cores} cores, load average {load} at the end")
}

/// A thousand sockets here and in the collector (which inherits the limit) need more than
/// the usual soft limit of 1 024 open files.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
