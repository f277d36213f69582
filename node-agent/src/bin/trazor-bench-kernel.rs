//! Kernel time per traced request, on each side of a connection, from the programs' own run
//! statistics (`run_time_ns` and `run_cnt`, which the kernel keeps while its BPF statistics
//! are on).
//!
//! Two child processes of this binary, each in a cgroup of its own, exchange requests over
//! one keep-alive loopback TCP connection as fast as they can: the client writes a request
//! and reads its response, the server reads the request and writes the response, one
//! socket call each when the bytes arrive whole (they are small; the calls are counted, and
//! a call beyond one per direction is reported). So a request is one receive and one send
//! on each side: "one request per call pair".
//!
//! This process loads the programs once and switches modes every slot: another cgroup
//! selected (both sides pay the filter alone), the server's cgroup selected, the client's.
//! Per slot it reads the statistics of `sock_recv_length` and `sock_send_length` (global:
//! every process's socket calls on the host run them) and both children's counts of requests
//! and socket calls. Then, with `f` the filter's ns per call in the same cycle's
//! not-selected slot (all calls / all run time, other processes' included):
//!
//! - server side, ns per request = (the server-selected slot's run time - f × every call
//!   that is not the server's: the client's and other processes') / requests;
//! - client side likewise;
//! - a call outside the selection costs `f`;
//! - and the run statistics themselves add to each call what an empty program on the same
//!   tracepoints measures (`floor`): the clock reads around the program.
//!
//! Each figure is the median over the cycles. Run as root, by `scripts/bench-capture.sh`.
#![allow(clippy::print_stdout)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use clap::Parser;
use trazor_node_agent::capture::{
    CaptureSettings, DEFAULT_MAX_CONNECTIONS, FLOOR, KernelCapture, TraceRule,
};

/// A cgroup id no cgroup has (ids are inode numbers): selecting it keeps the programs
/// attached while tracing nothing.
const NO_SUCH_CGROUP: u64 = u64::MAX - 1;

/// The response the server writes to every request: a complete HTTP/1.1 response.
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";

#[derive(Parser)]
#[command(
    about = "Measures the kernel time of a traced request on each side (see the module docs)"
)]
struct Args {
    /// cgroup v2 directory for the server process (created beforehand).
    #[arg(long)]
    server_cgroup: Option<PathBuf>,
    /// cgroup v2 directory for the client process (created beforehand).
    #[arg(long)]
    client_cgroup: Option<PathBuf>,
    /// Cycles; each runs every mode for one slot, in an order that rotates per cycle.
    #[arg(long, default_value_t = 30)]
    cycles: usize,
    /// Length of the measured part of a slot.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    slot: Duration,
    /// Time after switching modes before a slot's measurement starts.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Path of the requests; `{id}` in it becomes a number that changes with every request
    /// (digit segments are folded into one route by the kernel). With `{id}`, no request
    /// begins like the one before it on the connection, so each is parsed and hashed.
    #[arg(long, default_value = "/api/items/{id}")]
    path: String,
    /// Requests per second the client makes, evenly spaced (0: as fast as the server
    /// answers). Spaced requests find the programs' code and data cold, as on a real server
    /// between requests of its own work; back-to-back ones find them hot.
    #[arg(long, default_value_t = 5000)]
    rate: u32,
    /// The server writes each response in two writes, its head and then its body: so each
    /// request also makes calls that start and end nothing (the body's send, and the
    /// client's receive of it when it arrives apart), which the programs must dismiss.
    #[arg(long)]
    split_response: bool,
    /// Do not require the kernel to have counted the requests: for the ablation builds of
    /// `scripts/bench-kernel-ablation.sh`, whose programs skip parts of the work (counting
    /// included), to see what each part costs.
    #[arg(long)]
    ablation: bool,
    /// Internal: run as the server (prints its port, then serves one connection).
    #[arg(long, hide = true)]
    serve: bool,
    /// Internal: run as the client of the server on this port.
    #[arg(long, hide = true)]
    drive: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// An empty program on the same tracepoints: its run time per call is what the run
    /// statistics themselves add to every call (the clock reads around the program).
    Floor,
    /// Attached, another cgroup selected: both sides pay the filter alone.
    NotSelected,
    /// The server's cgroup selected.
    Server,
    /// The client's cgroup selected.
    Client,
}

const MODES: [Mode; 4] = [Mode::Floor, Mode::NotSelected, Mode::Server, Mode::Client];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Floor => "floor",
            Mode::NotSelected => "not-selected",
            Mode::Server => "server-selected",
            Mode::Client => "client-selected",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.serve {
        return serve(args.split_response);
    }
    if let Some(port) = args.drive {
        return drive(port, &args.path, args.rate);
    }
    let (Some(server_cgroup), Some(client_cgroup)) = (&args.server_cgroup, &args.client_cgroup)
    else {
        bail!("--server-cgroup and --client-cgroup are required");
    };
    measure(&args, server_cgroup, client_cgroup)
}

/// Serves one connection: one read per request (as long as requests arrive whole), one
/// write per response (or two: `split`).
fn serve(split: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let calls = Arc::new(AtomicU64::new(0));
    answer_queries(calls.clone());
    let (mut connection, _) = listener.accept()?;
    connection.set_nodelay(true)?;
    let mut buffer = [0u8; 4096];
    let mut pending = 0usize;
    loop {
        let read = match connection.read(&mut buffer[pending..]) {
            // The client stopped (killed at the end of the measurement).
            Ok(0) | Err(_) => return Ok(()),
            Ok(read) => read,
        };
        let mut made = 1;
        pending += read;
        // Answer every complete request (ends with the blank line; no bodies).
        while let Some(end) = buffer[..pending].windows(4).position(|w| w == b"\r\n\r\n") {
            if split {
                let body = RESPONSE.len() - 2;
                connection.write_all(&RESPONSE[..body])?;
                connection.write_all(&RESPONSE[body..])?;
                made += 2;
            } else {
                connection.write_all(RESPONSE)?;
                made += 1;
            }
            buffer.copy_within(end + 4..pending, 0);
            pending -= end + 4;
        }
        calls.fetch_add(made, Ordering::Relaxed);
        if pending == buffer.len() {
            bail!("a request longer than {} bytes", buffer.len());
        }
    }
}

/// Answers each line on stdin, in a thread, with the count of socket calls made so far;
/// exits the process when stdin closes (the measuring process is gone).
fn answer_queries(calls: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let mut stdin = BufReader::new(std::io::stdin());
        let mut line = String::new();
        while matches!(stdin.read_line(&mut line), Ok(n) if n > 0) {
            line.clear();
            println!("{}", calls.load(Ordering::Relaxed));
            let _ = std::io::stdout().flush();
        }
        std::process::exit(0);
    });
}

/// Makes `rate` requests per second on one connection (0: as fast as the server answers),
/// and answers each line on stdin with "requests calls": the requests made and the socket
/// calls they took.
fn drive(port: u16, path: &str, rate: u32) -> anyhow::Result<()> {
    // Starts when told: by then this process is in its cgroup.
    let mut stdin = BufReader::new(std::io::stdin());
    let mut line = String::new();
    stdin.read_line(&mut line)?;
    let mut connection = TcpStream::connect(("127.0.0.1", port))?;
    connection.set_nodelay(true)?;
    let request_for = |id: u64| {
        format!(
            "GET {} HTTP/1.1\r\nHost: bench\r\n\r\n",
            path.replace("{id}", &(1000 + id % 9000).to_string())
        )
    };
    let mut id = 0u64;
    let requests = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let (report_requests, report_calls) = (requests.clone(), calls.clone());
    std::thread::spawn(move || {
        let mut line = String::new();
        while matches!(stdin.read_line(&mut line), Ok(n) if n > 0) {
            line.clear();
            println!(
                "{} {}",
                report_requests.load(Ordering::Relaxed),
                report_calls.load(Ordering::Relaxed)
            );
            let _ = std::io::stdout().flush();
        }
        // The measuring process is gone: so is the load.
        std::process::exit(0);
    });
    let mut buffer = [0u8; 256];
    let interval = (rate > 0).then(|| Duration::from_secs(1) / rate);
    let mut next = Instant::now();
    loop {
        if let Some(interval) = interval {
            next += interval;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else if now - next > Duration::from_millis(100) {
                // Far behind (descheduled): catch up no faster than the rate.
                next = now;
            }
        }
        let mut made = 0u64;
        let request = request_for(id);
        id += 1;
        let written = connection.write(request.as_bytes())?;
        made += 1;
        if written != request.len() {
            bail!("a short write of {written} bytes");
        }
        let mut received = 0usize;
        while received < RESPONSE.len() {
            let read = connection.read(&mut buffer[received..])?;
            made += 1;
            if read == 0 {
                bail!("the server closed the connection");
            }
            received += read;
        }
        calls.fetch_add(made, Ordering::Relaxed);
        requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// A child process of this binary, moved into `cgroup`.
fn spawn_in(cgroup: &Path, role: &[&str]) -> anyhow::Result<(Child, ChildStdin, ChildStdout)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a child of this benchmark")?;
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, child.id().to_string())
        .with_context(|| format!("moving a child into {}", procs.display()))?;
    let stdin = child.stdin.take().context("child stdin")?;
    let stdout = child.stdout.take().context("child stdout")?;
    Ok((child, stdin, stdout))
}

/// One measured slot.
#[derive(Clone, Copy, Default)]
struct Slot {
    requests: u64,
    client_calls: u64,
    server_calls: u64,
    /// Run time and calls of the receive and send programs, every process's calls.
    nanos: u64,
    calls: u64,
}

impl Slot {
    fn per_request(&self, value: u64) -> f64 {
        value as f64 / self.requests.max(1) as f64
    }
    /// The filter's price: ns per call when no call is selected.
    fn nanos_per_call(&self) -> f64 {
        self.nanos as f64 / self.calls.max(1) as f64
    }
    /// Kernel ns per request of the side making `side_calls`: the slot's run time, less
    /// every other call (the other side's, and other processes' on this host) at the
    /// filter's price `filter`.
    fn side_nanos_per_request(&self, side_calls: u64, filter: f64) -> f64 {
        let others = self.calls.saturating_sub(side_calls) as f64;
        (self.nanos as f64 - filter * others) / self.requests.max(1) as f64
    }
}

/// Asks a child for its counters: one line out, one line of numbers back.
struct Counters {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Counters {
    fn read(&mut self) -> anyhow::Result<Vec<u64>> {
        writeln!(self.stdin, "?")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let numbers: Result<Vec<u64>, _> = line.split_whitespace().map(str::parse).collect();
        match numbers {
            Ok(numbers) if !numbers.is_empty() => Ok(numbers),
            _ => bail!("a child of the benchmark answered {line:?}"),
        }
    }
}

fn measure(args: &Args, server_cgroup: &Path, client_cgroup: &Path) -> anyhow::Result<()> {
    let cgroup_id = |path: &Path| -> anyhow::Result<u64> {
        Ok(std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .ino())
    };
    let (server_id, client_id) = (cgroup_id(server_cgroup)?, cgroup_id(client_cgroup)?);
    let mut capture = KernelCapture::load(DEFAULT_MAX_CONNECTIONS)?;
    // The kernel keeps run statistics while this descriptor is open.
    let _statistics = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("turning on the kernel's BPF run statistics")?;
    let server_role: &[&str] = if args.split_response {
        &["--serve", "--split-response"]
    } else {
        &["--serve"]
    };
    let (mut server, server_stdin, server_stdout) = spawn_in(server_cgroup, server_role)?;
    let mut server_stdout = BufReader::new(server_stdout);
    let mut port = String::new();
    server_stdout.read_line(&mut port)?;
    let port = port.trim().to_owned();
    let mut server_counters = Counters {
        stdin: server_stdin,
        stdout: server_stdout,
    };
    let (mut client, mut client_stdin, client_stdout) = spawn_in(
        client_cgroup,
        &[
            "--drive",
            &port,
            "--path",
            &args.path,
            "--rate",
            &args.rate.to_string(),
        ],
    )?;
    writeln!(client_stdin, "go")?;
    let mut client_counters = Counters {
        stdin: client_stdin,
        stdout: BufReader::new(client_stdout),
    };
    let settings = |cgroups: Vec<u64>| CaptureSettings {
        window: Duration::from_secs(1),
        slow_threshold: None,
        sample_rate: 0.0,
        server: true,
        client: true,
        cgroups: Some(TraceRule::every_port_of(cgroups, true, true)),
    };
    let result = (|| -> anyhow::Result<()> {
        let mut slots: Vec<Vec<Slot>> = vec![Vec::new(); MODES.len()];
        let mut counted = 0u64;
        for cycle in 0..args.cycles {
            for step in 0..MODES.len() {
                let index = (cycle + step) % MODES.len();
                let selection = match MODES[index] {
                    Mode::Floor => None,
                    Mode::NotSelected => Some(NO_SUCH_CGROUP),
                    Mode::Server => Some(server_id),
                    Mode::Client => Some(client_id),
                };
                match selection {
                    None => capture.attach_stand_in(FLOOR)?,
                    Some(cgroup) => {
                        capture.configure(&settings(vec![cgroup]))?;
                        capture.attach()?;
                    }
                }
                std::thread::sleep(args.settle);
                let client_before = client_counters.read()?;
                let server_before = server_counters.read()?;
                let (nanos, calls) = socket_stats(&capture, MODES[index])?;
                std::thread::sleep(args.slot);
                let (nanos_after, calls_after) = socket_stats(&capture, MODES[index])?;
                let server_after = server_counters.read()?;
                let client_after = client_counters.read()?;
                let (Some(requests), Some(client_calls)) = (
                    client_after.first().zip(client_before.first()),
                    client_after.get(1).zip(client_before.get(1)),
                ) else {
                    bail!("the client's counters were incomplete");
                };
                let slot = Slot {
                    requests: requests.0 - requests.1,
                    client_calls: client_calls.0 - client_calls.1,
                    server_calls: server_after[0] - server_before[0],
                    nanos: nanos_after - nanos,
                    calls: calls_after - calls,
                };
                slots[index].push(slot);
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                counted += capture
                    .drain_closed(now as u32)?
                    .iter()
                    .map(|series| series.totals.count)
                    .sum::<u64>();
                capture.drain_events();
            }
            eprintln!("[kernel] cycle {}/{}", cycle + 1, args.cycles);
        }
        // Every request the kernel counted was one the client made (windows are 1 s: the
        // last ones are still open, so fewer were counted than made in the traced modes).
        let made = client_counters.read()?.first().copied().unwrap_or(0);
        if !args.ablation && (counted == 0 || counted > made) {
            bail!(
                "the kernel counted {counted} requests in the traced modes, and the client \
                 made {made} in all: it did not trace them as made"
            );
        }
        report(&capture, &slots)
    })();
    let _ = client.kill();
    let _ = server.kill();
    let _ = client.wait();
    let _ = server.wait();
    result
}

/// The run time and calls of the programs `mode` attaches to the receive and send
/// tracepoints, summed: ours, or the empty one (attached to the connection-end tracepoints
/// too, which fire a few times per connection: none in a slot).
fn socket_stats(capture: &KernelCapture, mode: Mode) -> anyhow::Result<(u64, u64)> {
    let names: &[&str] = if mode == Mode::Floor {
        &[FLOOR]
    } else {
        &["sock_recv_length", "sock_send_length"]
    };
    let mut found = 0;
    let (mut nanos, mut calls) = (0, 0);
    for program in capture.program_stats()? {
        if names.contains(&program.name) {
            nanos += program.run_time_nanos;
            calls += program.run_count;
            found += 1;
        }
    }
    if found != names.len() {
        bail!("no statistics for {names:?}");
    }
    Ok((nanos, calls))
}

fn report(capture: &KernelCapture, slots: &[Vec<Slot>]) -> anyhow::Result<()> {
    let of = |mode: Mode| &slots[MODES.iter().position(|m| *m == mode).unwrap_or(0)];
    let filtered = of(Mode::NotSelected);
    // Per cycle, with the same cycle's filter price.
    let side = |mode: Mode, side_calls: fn(&Slot) -> u64| {
        median(
            &of(mode)
                .iter()
                .zip(filtered)
                .map(|(slot, filter)| {
                    slot.side_nanos_per_request(side_calls(slot), filter.nanos_per_call())
                })
                .collect::<Vec<_>>(),
        )
    };
    let server_side = side(Mode::Server, |slot| slot.server_calls);
    let client_side = side(Mode::Client, |slot| slot.client_calls);
    let filter = median(
        &filtered
            .iter()
            .map(Slot::nanos_per_call)
            .collect::<Vec<_>>(),
    );
    let floor = median(
        &of(Mode::Floor)
            .iter()
            .map(Slot::nanos_per_call)
            .collect::<Vec<_>>(),
    );
    println!(
        "| mode | requests per slot | socket calls per request: server, client, other processes | \
         run time of the receive and send programs per request, all calls | kernel ns per \
         request of the selected side (other calls at the filter's price) |"
    );
    println!("|---|---|---|---|---|");
    for (mode, mode_slots) in MODES.iter().zip(slots) {
        let column =
            |value: fn(&Slot) -> f64| median(&mode_slots.iter().map(value).collect::<Vec<_>>());
        let selected = match mode {
            Mode::Floor => format!("- (empty program: {floor:.0} ns per call)"),
            Mode::NotSelected => format!("- (filter: {filter:.0} ns per call)"),
            Mode::Server => format!("{server_side:.0}"),
            Mode::Client => format!("{client_side:.0}"),
        };
        println!(
            "| {} | {:.0} | {:.2}, {:.2}, {:.2} | {:.0} | {} |",
            mode.name(),
            column(|slot| slot.requests as f64),
            column(|slot| slot.per_request(slot.server_calls)),
            column(|slot| slot.per_request(slot.client_calls)),
            column(|slot| slot.per_request(
                slot.calls
                    .saturating_sub(slot.server_calls + slot.client_calls)
            )),
            column(|slot| slot.per_request(slot.nanos)),
            selected,
        );
    }
    println!();
    println!("server_side_ns_per_request {server_side:.0}");
    println!("client_side_ns_per_request {client_side:.0}");
    println!("not_selected_ns_per_call {filter:.0}");
    println!("floor_ns_per_call {floor:.0}");
    for program in capture.program_stats()? {
        println!(
            "program {} translated_bytes {} instructions {} jitted_bytes {}",
            program.name,
            program.translated_bytes,
            program.translated_bytes / 8,
            program.jitted_bytes
        );
    }
    Ok(())
}

/// The median (linear interpolation); 0 when empty.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    let position = 0.5 * (sorted.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}
