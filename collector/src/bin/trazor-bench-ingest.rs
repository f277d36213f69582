//! `trazor-bench-ingest`: the collector's ingest throughput, in windows per second per core.
//!
//! The collector runs on one thread (a current-thread runtime: gRPC, HTTP/2, decoding,
//! dedup, merge, feed, acks all on it) and the agents on other threads, over real loopback
//! sockets. The figure is windows accepted divided by the CPU time of the collector's thread
//! (`CLOCK_THREAD_CPUTIME_ID`), so it does not depend on how busy the rest of the machine
//! is. Run it with `scripts/bench-ingest.sh`, which builds in release mode and writes
//! `bench/results/ingest.md`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::mpsc as std_mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use clap::Parser;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use trazor_collector::{BoundCollector, CollectorConfig, limits::AgentLimitConfig};
use trazor_proto::v1::{
    AgentHello, AgentMessage, Direction, ExponentialHistogram, LatencyStats, LatencyWindow,
    PodIdentity, Quantile, Source, agent_message, collector_message,
    latency_ingest_client::LatencyIngestClient,
};

/// The target from the issue: windows per second per collector core.
const TARGET: f64 = 100_000.0;

/// Measures collector ingest throughput (decode + dedup + merge) per core.
#[derive(Parser, Debug)]
#[command(about)]
struct Flags {
    /// Windows each agent sends per run.
    #[arg(long, default_value_t = 150_000)]
    windows_per_agent: u64,
    /// Agents streaming at once (one stream each).
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Pods per agent (distinct sources per window period).
    #[arg(long, default_value_t = 200)]
    pods: u64,
    /// Write the results as Markdown here (e.g. bench/results/ingest.md).
    #[arg(long)]
    output: Option<PathBuf>,
}

struct Run {
    name: &'static str,
    windows: u64,
    wall: Duration,
    cpu: Duration,
}

impl Run {
    fn per_core(&self) -> f64 {
        self.windows as f64 / self.cpu.as_secs_f64()
    }
}

fn thread_cpu() -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    if result != 0 {
        return Duration::ZERO;
    }
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

/// A realistic window: a pod of a Deployment, three quantiles, ~40 histogram buckets.
fn window(agent: usize, pod: u64, start: u64) -> LatencyWindow {
    let sparse: BTreeMap<i32, u64> = (0..40)
        .map(|b| (1_300 + b * 3 + (pod % 5) as i32, 1 + b as u64))
        .collect();
    let histogram = ExponentialHistogram::from_sparse(6, &sparse).unwrap_or_default();
    let count = histogram.total();
    LatencyWindow {
        sequence: 0,
        source: Some(Source {
            node_name: format!("node-{agent}"),
            cgroup_id: 10_000 + pod,
            cgroup_path: format!("/kubepods/burstable/pod{pod}/container"),
            pid: 1_000 + pod as u32,
            process_name: "server".into(),
            pod: Some(PodIdentity {
                namespace: "shop".into(),
                name: format!("checkout-{agent}-{pod}"),
                uid: format!("uid-{agent}-{pod}"),
                container: "app".into(),
                workload_kind: "Deployment".into(),
                workload_name: format!("workload-{}", pod % 20),
            }),
        }),
        direction: Direction::Server as i32,
        start_unix_nanos: start,
        end_unix_nanos: start + 10_000_000_000,
        stats: Some(LatencyStats {
            count,
            error_count: count / 100,
            sum_nanos: count * 20_000_000,
            min_nanos: 1_000_000,
            max_nanos: 90_000_000,
            quantiles: [0.5, 0.95, 0.99]
                .into_iter()
                .map(|quantile| Quantile {
                    quantile,
                    value_nanos: 20_000_000,
                })
                .collect(),
        }),
        histogram: Some(histogram),
        status_class_counts: vec![0, 0, count - count / 100, 0, 0, count / 100],
        route: "/checkout/{id}".into(),
        ..Default::default()
    }
}

/// One agent: streams `total` windows and waits for the last ack.
async fn agent(grpc: String, agent: usize, total: u64, pods: u64) -> anyhow::Result<()> {
    let mut client = LatencyIngestClient::connect(grpc).await?;
    let (sender, receiver) = mpsc::channel(1_024);
    sender
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(AgentHello {
                node_name: format!("node-{agent}"),
                agent_id: format!("bench-agent-{agent}"),
                boot_id: format!("{:x}", rand_boot()),
                version: "bench".into(),
                capabilities: vec![],
            })),
        })
        .await?;
    let mut acks = client
        .stream(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    let start = now / 10_000_000_000 * 10_000_000_000;
    let templates: Vec<LatencyWindow> = (0..pods).map(|pod| window(agent, pod, start)).collect();
    tokio::spawn(async move {
        for sequence in 1..=total {
            let mut window = templates[(sequence % pods) as usize].clone();
            window.sequence = sequence;
            let message = AgentMessage {
                kind: Some(agent_message::Kind::Window(window)),
            };
            if sender.send(message).await.is_err() {
                return;
            }
        }
    });
    while let Some(message) = acks.message().await? {
        if let Some(collector_message::Kind::Ack(ack)) = message.kind
            && ack.acked_through >= total
        {
            return Ok(());
        }
    }
    anyhow::bail!("the collector closed agent {agent}'s stream before the last ack")
}

fn rand_boot() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos())
}

/// Runs the collector on this thread's own runtime and the agents on another.
fn run(name: &'static str, flags: &Flags, state_dir: Option<PathBuf>) -> anyhow::Result<Run> {
    let (address_sender, address) = std_mpsc::channel();
    let (stop_sender, stop) = oneshot::channel::<()>();
    let (cpu_sender, cpu_reader) = std_mpsc::channel::<(Duration, Duration)>();
    let (measure_sender, mut measure) = mpsc::channel::<()>(4);
    let collector = std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let collector = BoundCollector::bind(&CollectorConfig {
                history: 1_000,
                agent_limits: AgentLimitConfig {
                    windows_per_second: 0,
                    ..Default::default()
                },
                late_grace: Duration::from_secs(60),
                state_dir,
                ..Default::default()
            })
            .await?;
            address_sender.send(collector.grpc_addr())?;
            let serve = tokio::spawn(collector.serve());
            // Reports (wall-clock, thread CPU) when asked: the same thread serves gRPC.
            tokio::spawn(async move {
                let start = Instant::now();
                while measure.recv().await.is_some() {
                    let _ = cpu_sender.send((start.elapsed(), thread_cpu()));
                }
            });
            let _ = stop.await;
            serve.abort();
            anyhow::Ok(())
        })
    });
    let grpc = format!("http://{}", address.recv_timeout(Duration::from_secs(10))?);
    let agents = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let sample = || -> anyhow::Result<(Duration, Duration)> {
        measure_sender.blocking_send(())?;
        Ok(cpu_reader.recv_timeout(Duration::from_secs(10))?)
    };
    let (wall_0, cpu_0) = sample()?;
    agents.block_on(async {
        let tasks: Vec<_> = (0..flags.agents)
            .map(|n| tokio::spawn(agent(grpc.clone(), n, flags.windows_per_agent, flags.pods)))
            .collect();
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })?;
    let (wall_1, cpu_1) = sample()?;
    let _ = stop_sender.send(());
    collector
        .join()
        .map_err(|_| anyhow::anyhow!("the collector thread panicked"))??;
    Ok(Run {
        name,
        windows: flags.windows_per_agent * flags.agents as u64,
        wall: wall_1 - wall_0,
        cpu: cpu_1 - cpu_0,
    })
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let state_dir =
        std::env::temp_dir().join(format!("trazor-bench-ingest-{}", std::process::id()));
    let runs = [
        run("in memory (default)", &flags, None)?,
        run("with --state-dir journal", &flags, Some(state_dir.clone()))?,
    ];
    let _ = std::fs::remove_dir_all(&state_dir);
    let mut table = String::new();
    writeln!(
        table,
        "| configuration | windows | wall s | collector CPU s | windows/s per core | vs. 100 000 target |"
    )?;
    writeln!(table, "|---|---:|---:|---:|---:|---:|")?;
    for run in &runs {
        writeln!(
            table,
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.2}× |",
            run.name,
            run.windows,
            run.wall.as_secs_f64(),
            run.cpu.as_secs_f64(),
            run.per_core(),
            run.per_core() / TARGET
        )?;
    }
    print!("{table}");
    if let Some(path) = &flags.output {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split(':').nth(1))
                    .map(|name| name.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let date = humantime::format_rfc3339_seconds(SystemTime::now());
        let mut text = String::new();
        writeln!(text, "# Collector ingest benchmark\n")?;
        writeln!(
            text,
            "Produced by `scripts/bench-ingest.sh` (release build of `trazor-bench-ingest --agents {} --windows-per-agent {} --pods {}`) on {date}, {cpu}, {} cores.\n",
            flags.agents,
            flags.windows_per_agent,
            flags.pods,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        )?;
        writeln!(
            text,
            "Each window is realistic (pod identity, route, 3 quantiles, 40-bucket histogram); {} agents stream over loopback gRPC to a collector running on one thread. Counted per window on that thread: HTTP/2 + protobuf decode, dedup, merge into its workload aggregate, feed publish (JSON is only written for subscribers; none here), batched acks. \"per core\" = windows / CPU time of the collector thread.\n",
            flags.agents
        )?;
        text.push_str(&table);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
