//! What tracing costs a server, measured to a fraction of a percent on a noisy machine.
//!
//! A load generator (wrk) keeps a server (nginx) saturated for the whole run; this tool
//! loads the eBPF programs once and switches between modes every slot (half a second by
//! default): programs detached, attached with the server's cgroup selected, attached with
//! another cgroup selected, attached tracing every process. The server's own request counter
//! (nginx `stub_status`) is read at each slot's start and end. Neighbouring slots see the
//! same machine, so each cycle's rate of a mode divided by the same cycle's untraced rate
//! cancels the slow swings of a shared host; the median of those ratios over many cycles
//! is the figure.
//!
//! Run as root (it loads eBPF programs), by `scripts/bench-capture.sh`. Alone,
//! `--cost-repeats` prints how many times each cost-* program repeats its operation per
//! call (the divisor that prices one operation) and exits.
#![allow(clippy::print_stdout)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use clap::Parser;
use trazor_node_agent::capture::{
    COST_CLOCK_READ, COST_LOOKUP, COST_USER_READ, CaptureSettings, DEFAULT_MAX_CONNECTIONS, FLOOR,
    KernelCapture, TraceRule,
};
use trazor_node_agent_ebpf_common::COST_REPEATS;

/// A cgroup id no cgroup has (ids are inode numbers): selecting it keeps the programs
/// attached while tracing nothing.
const NO_SUCH_CGROUP: u64 = u64::MAX - 1;

#[derive(Parser)]
#[command(about = "Measures what tracing costs a saturated server (see the module docs)")]
struct Args {
    /// `host:port` of the server's nginx stub_status endpoint.
    #[arg(long)]
    status_addr: String,
    /// Path of the stub_status location.
    #[arg(long, default_value = "/status")]
    status_path: String,
    /// cgroup v2 directory holding the server, selected in the `traced` mode.
    #[arg(long)]
    server_cgroup: PathBuf,
    /// Modes to compare, comma-separated, starting with untraced: untraced, floor, traced,
    /// not-selected, traced-all; with --syscall-loop also cost-clock-read, cost-user-read,
    /// cost-lookup.
    #[arg(
        long,
        default_value = "untraced,traced,not-selected,traced-all",
        value_delimiter = ','
    )]
    modes: Vec<Mode>,
    /// Cycles; each runs every mode for one slot, in an order that rotates per cycle.
    #[arg(long, default_value_t = 40)]
    cycles: usize,
    /// Length of the measured part of a slot.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    slot: Duration,
    /// Time after switching modes before a slot's measurement starts.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// cgroup v2 directories whose CPU time (cpu.stat usage_usec) is charged to the requests:
    /// the server's and the load generator's.
    #[arg(long, value_delimiter = ',')]
    cpu_cgroups: Vec<PathBuf>,
    /// Instead of reading the server's counter, time a loop of write/read syscalls over a
    /// socket pair on this thread: the per-call cost of the hooks for a process that is not
    /// traced, in ns.
    #[arg(long)]
    syscall_loop: bool,
    /// Also time requests for this path on a keep-alive connection of our own, one per
    /// `--probe-interval`, to report each mode's p99 latency next to its throughput.
    #[arg(long)]
    probe_path: Option<String>,
    /// Pause between two probe requests.
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    probe_interval: Duration,
}

/// Probe latencies, in ns, per mode: recorded only while a slot is being measured.
struct Probe {
    /// 1 + the index of the mode being measured; 0 between measurements.
    measuring: AtomicUsize,
    stop: AtomicBool,
    latencies: Mutex<Vec<Vec<u64>>>,
}

impl Probe {
    /// Starts timing requests for `path` on a connection to `address`, in a thread.
    fn start(
        address: &str,
        path: &str,
        interval: Duration,
        modes: usize,
    ) -> anyhow::Result<Arc<Self>> {
        let probe = Arc::new(Self {
            measuring: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            latencies: Mutex::new(vec![Vec::new(); modes]),
        });
        let mut connection = BufReader::new(
            TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?,
        );
        connection.get_ref().set_nodelay(true)?;
        connection
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        let thread_probe = probe.clone();
        std::thread::spawn(move || {
            while !thread_probe.stop.load(Ordering::Relaxed) {
                let mode = thread_probe.measuring.load(Ordering::Relaxed);
                let started = Instant::now();
                if let Err(error) = connection
                    .get_mut()
                    .write_all(request.as_bytes())
                    .and_then(|()| read_response(&mut connection))
                {
                    eprintln!("[overhead] latency probe stopped: {error}");
                    return;
                }
                let nanos = started.elapsed().as_nanos() as u64;
                // Only requests that started and ended within one measured slot count.
                if mode != 0
                    && thread_probe.measuring.load(Ordering::Relaxed) == mode
                    && let Ok(mut latencies) = thread_probe.latencies.lock()
                {
                    latencies[mode - 1].push(nanos);
                }
                std::thread::sleep(interval);
            }
        });
        Ok(probe)
    }

    /// Each mode's latencies, sorted.
    fn finish(&self) -> Vec<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut latencies = self
            .latencies
            .lock()
            .map(|latencies| latencies.clone())
            .unwrap_or_default();
        for mode in &mut latencies {
            mode.sort_unstable();
        }
        latencies
    }
}

/// Reads one response with a Content-Length body.
fn read_response(connection: &mut BufReader<TcpStream>) -> std::io::Result<()> {
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if connection.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        if line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    connection.read_exact(&mut body)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Programs detached: the baseline.
    Untraced,
    /// An empty program on the same tracepoints: what the tracing mechanism alone costs.
    Floor,
    /// Programs attached, the server's cgroup selected (its requests traced, the load
    /// generator's socket calls filtered out).
    Traced,
    /// Programs attached, the server not selected (another cgroup is): the cost of the
    /// filter alone.
    NotSelected,
    /// Programs attached, every process traced (the load generator's requests too).
    TracedAll,
    /// With --syscall-loop: a program repeating a clock read COST_REPEATS times per call,
    /// instead of ours (its ns per call over floor's, / COST_REPEATS, prices the operation).
    CostClockRead,
    /// With --syscall-loop: likewise, a read of the call's user buffer.
    CostUserRead,
    /// With --syscall-loop: likewise, a hash map lookup that finds its key.
    CostLookup,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Floor => "floor",
            Mode::Traced => "traced",
            Mode::NotSelected => "not-selected",
            Mode::TracedAll => "traced-all",
            Mode::CostClockRead => "cost-clock-read",
            Mode::CostUserRead => "cost-user-read",
            Mode::CostLookup => "cost-lookup",
        }
    }

    /// A mode that prices one operation per socket call (with --syscall-loop only).
    fn prices_an_operation(self) -> bool {
        matches!(
            self,
            Mode::CostClockRead | Mode::CostUserRead | Mode::CostLookup
        )
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::args().skip(1).eq(["--cost-repeats"]) {
        println!("{COST_REPEATS}");
        return Ok(());
    }
    let args = Args::parse();
    if args.modes.first() != Some(&Mode::Untraced) {
        bail!("--modes must start with untraced: every ratio is against it");
    }
    if !args.syscall_loop
        && let Some(mode) = args.modes.iter().find(|mode| mode.prices_an_operation())
    {
        bail!(
            "mode {} prices an operation per socket call: use it with --syscall-loop",
            mode.name()
        );
    }
    let server_cgroup = std::fs::metadata(&args.server_cgroup)
        .with_context(|| format!("reading {}", args.server_cgroup.display()))?
        .ino();
    let mut capture = KernelCapture::load(DEFAULT_MAX_CONNECTIONS)?;
    let settings = |cgroups: Option<Vec<u64>>| CaptureSettings {
        window: Duration::from_secs(1),
        slow_threshold: None,
        sample_rate: 0.0,
        server: true,
        client: true,
        cgroups: cgroups.map(|ids| TraceRule::every_port_of(ids, true, true)),
    };
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); args.modes.len()];
    let mut cpu_per_request: Vec<Vec<f64>> = vec![Vec::new(); args.modes.len()];
    let modes = args.modes.len();
    // Requests the kernel counted, and requests the server served in slots that trace it:
    // a sanity check that the traced modes really traced.
    let (mut counted, mut served_traced) = (0u64, 0u64);
    let probe = match (&args.probe_path, args.syscall_loop) {
        (Some(path), false) => Some(Probe::start(
            &args.status_addr,
            path,
            args.probe_interval,
            modes,
        )?),
        _ => None,
    };
    for cycle in 0..args.cycles {
        for step in 0..modes {
            let index = (cycle + step) % modes;
            let mode = args.modes[index];
            match mode {
                Mode::Untraced => capture.detach()?,
                Mode::Floor => capture.attach_stand_in(FLOOR)?,
                Mode::CostClockRead => capture.attach_stand_in(COST_CLOCK_READ)?,
                Mode::CostUserRead => capture.attach_stand_in(COST_USER_READ)?,
                Mode::CostLookup => capture.attach_stand_in(COST_LOOKUP)?,
                Mode::Traced => {
                    capture.configure(&settings(Some(vec![server_cgroup])))?;
                    capture.attach()?;
                }
                Mode::NotSelected => {
                    // Another cgroup selected, as on a node where other pods are traced:
                    // with nothing selected at all the programs would be detached.
                    capture.configure(&settings(Some(vec![NO_SUCH_CGROUP])))?;
                    capture.attach()?;
                }
                Mode::TracedAll => {
                    capture.configure(&settings(None))?;
                    capture.attach()?;
                }
            }
            std::thread::sleep(args.settle);
            if args.syscall_loop {
                let (calls, nanos) = syscall_loop(args.slot)?;
                rates[index].push(calls as f64 / (nanos as f64 / 1e9));
                cpu_per_request[index].push(nanos as f64 / calls as f64);
                continue;
            }
            let (before, cpu_before, started) =
                (served(&args)?, cpu_micros(&args)?, Instant::now());
            if let Some(probe) = &probe {
                probe.measuring.store(index + 1, Ordering::Relaxed);
            }
            std::thread::sleep(args.slot);
            if let Some(probe) = &probe {
                probe.measuring.store(0, Ordering::Relaxed);
            }
            let (after, cpu_after, elapsed) =
                (served(&args)?, cpu_micros(&args)?, started.elapsed());
            rates[index].push((after - before) as f64 / elapsed.as_secs_f64());
            if matches!(mode, Mode::Traced | Mode::TracedAll) {
                served_traced += after - before;
            }
            cpu_per_request[index]
                .push((cpu_after - cpu_before) as f64 * 1000.0 / (after - before).max(1) as f64);
            // Keep the kernel's tables from filling: what a running agent does every window.
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            counted += count(capture.drain_closed(now as u32)?);
            capture.drain_events();
        }
        eprintln!(
            "[overhead] cycle {}/{}: {}",
            cycle + 1,
            args.cycles,
            args.modes
                .iter()
                .zip(&rates)
                .map(|(mode, rates)| format!(
                    "{} {:.0}",
                    mode.name(),
                    rates.last().copied().unwrap_or(0.0)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    capture.detach()?;
    if !args.syscall_loop && quantile(&rates[0], 0.5) < 1000.0 {
        bail!("the server served under 1000 req/s untraced: is the load generator running?");
    }
    counted += count(capture.drain_closed(u32::MAX)?);
    if !args.syscall_loop
        && args
            .modes
            .iter()
            .any(|mode| matches!(mode, Mode::Traced | Mode::TracedAll))
    {
        eprintln!(
            "[overhead] requests counted by the kernel: {counted}; served in traced slots \
             (settling excluded): {served_traced}"
        );
        if counted < served_traced {
            bail!(
                "the kernel counted {counted} requests, fewer than the {served_traced} served \
                 while tracing: the traced modes did not trace the server"
            );
        }
    }

    let latencies = probe.map(|probe| probe.finish()).unwrap_or_default();
    let p99 = |index: usize| {
        latencies
            .get(index)
            .filter(|sorted| !sorted.is_empty())
            .map(|sorted| true_quantile(sorted, 0.99))
    };
    println!(
        "| mode | median req/s | throughput ratio: median (25th–75th pct) | CPU ns/request | untraced / this CPU per request: median (25th–75th pct) | probe p99 µs (requests) | p99 / untraced p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (index, ((mode, mode_rates), mode_cpu)) in args
        .modes
        .iter()
        .zip(&rates)
        .zip(&cpu_per_request)
        .enumerate()
    {
        let ratios: Vec<f64> = mode_rates
            .iter()
            .zip(&rates[0])
            .map(|(rate, untraced)| rate / untraced)
            .collect();
        let cpu_ratios: Vec<f64> = mode_cpu
            .iter()
            .zip(&cpu_per_request[0])
            .map(|(cpu, untraced)| untraced / cpu)
            .collect();
        let (probe_p99, p99_ratio) = match (p99(index), p99(0)) {
            (Some(p99), Some(untraced)) => (
                format!("{:.1} ({})", p99 as f64 / 1e3, latencies[index].len()),
                format!("{:.3}", p99 as f64 / untraced as f64),
            ),
            _ => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "| {} | {:.0} | {:.4} ({:.4}–{:.4}) | {:.0} | {:.4} ({:.4}–{:.4}) | {probe_p99} | {p99_ratio} |",
            mode.name(),
            quantile(mode_rates, 0.5),
            quantile(&ratios, 0.5),
            quantile(&ratios, 0.25),
            quantile(&ratios, 0.75),
            quantile(mode_cpu, 0.5),
            quantile(&cpu_ratios, 0.5),
            quantile(&cpu_ratios, 0.25),
            quantile(&cpu_ratios, 0.75),
        );
    }
    Ok(())
}

/// The nearest-rank quantile of sorted values.
fn true_quantile(sorted: &[u64], quantile: f64) -> u64 {
    let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn count(closed: Vec<trazor_node_agent::capture::ClosedSeries>) -> u64 {
    closed.iter().map(|series| series.totals.count).sum()
}

/// Requests the server has served so far, from nginx's stub_status.
fn served(args: &Args) -> anyhow::Result<u64> {
    let mut stream = TcpStream::connect(&args.status_addr)
        .with_context(|| format!("connecting to {}", args.status_addr))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {} HTTP/1.0\r\nHost: bench\r\n\r\n",
        args.status_path
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    // "...\r\n\r\nActive connections: 17 \nserver accepts handled requests\n 17 17 1234 \n..."
    let counters = response
        .lines()
        .skip_while(|line| !line.starts_with("server accepts"))
        .nth(1)
        .with_context(|| format!("no stub_status counters in {response:?}"))?;
    counters
        .split_whitespace()
        .nth(2)
        .and_then(|requests| requests.parse().ok())
        .with_context(|| format!("no request count in {counters:?}"))
}

/// Runs write/read pairs over a connected pair of (Unix) sockets for about `length`, so
/// every syscall passes a socket tracepoint; returns the syscalls made and the thread's
/// CPU time they took.
fn syscall_loop(length: Duration) -> anyhow::Result<(u64, u64)> {
    let (mut sender, mut receiver) = std::os::unix::net::UnixStream::pair()?;
    let mut buffer = [0u8; 64];
    let thread_cpu = || {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
        now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
    };
    let started = Instant::now();
    let cpu_before = thread_cpu();
    let mut calls = 0u64;
    while started.elapsed() < length {
        for _ in 0..1000 {
            sender.write_all(&buffer)?;
            receiver.read_exact(&mut buffer)?;
        }
        calls += 2000;
    }
    Ok((calls, thread_cpu() - cpu_before))
}

/// CPU time used so far by the processes in `--cpu-cgroups`, in microseconds.
fn cpu_micros(args: &Args) -> anyhow::Result<u64> {
    let mut total = 0;
    for cgroup in &args.cpu_cgroups {
        let path = cgroup.join("cpu.stat");
        let stat = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        total += stat
            .lines()
            .find_map(|line| line.strip_prefix("usage_usec "))
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .with_context(|| format!("no usage_usec in {}", path.display()))?;
    }
    Ok(total)
}

/// The q-quantile (linear interpolation) of `values`; 0 when empty.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    let position = q * (sorted.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}
