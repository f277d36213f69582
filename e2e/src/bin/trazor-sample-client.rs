//! `trazor-sample-client`: an HTTP/1.1 load generator that counts exactly, for tests and
//! benchmarks. Blocking std sockets, a thread per connection, one request at a time per
//! connection; a fixed number of requests, a fixed duration, and optionally a fixed rate.
//!
//! It prints one JSON line when done:
//! `{"sent":N,"responses":N,"ok":N,"errors":N,"failures":N,"elapsed_secs":S,"rate":R}` where
//! `responses` counts complete responses (status line, headers and the whole body read),
//! `ok` the 2xx ones, `errors` the others, and `failures` the requests that got no complete
//! response (connect, I/O or parse errors).
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::Parser;

/// Sends HTTP/1.1 GETs and counts the responses exactly.
#[derive(Parser, Debug, Clone)]
#[command(about)]
struct Flags {
    /// Server address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    target: SocketAddr,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests to send in total (ignored with --duration).
    #[arg(long, default_value_t = 100)]
    requests: u64,
    /// Send for this long instead of a fixed number of requests.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Connections (each its own thread) used at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u64,
    /// Total request rate, per second, spread evenly over the connections; 0: as fast as
    /// the responses come.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// A new connection for every request (`Connection: close`), instead of keep-alive.
    #[arg(long)]
    new_connection: bool,
    /// Pause this long after each connection's first response (tests start a tracer in
    /// between, to see connections opened before it).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pause_after_first: Duration,
    /// Stay alive this long after printing the counts, so the process can still be looked
    /// up (e.g. its name in /proc) when its last window closes.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    linger: Duration,
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    responses: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    failures: AtomicU64,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let counts = Arc::new(Counts::default());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = flags.duration.map(|duration| started + duration);
    let concurrency = flags.concurrency.max(1);
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (flags, counts, next) = (flags.clone(), counts.clone(), next.clone());
            thread::spawn(move || {
                run_worker(
                    &flags,
                    worker,
                    concurrency,
                    &counts,
                    &next,
                    started,
                    deadline,
                )
            })
        })
        .collect();
    for worker in workers {
        if worker.join().is_err() {
            eprintln!("trazor-sample-client: a worker panicked");
            return ExitCode::FAILURE;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let responses = load(&counts.responses);
    println!(
        "{{\"sent\":{},\"responses\":{responses},\"ok\":{},\"errors\":{},\"failures\":{},\"elapsed_secs\":{elapsed:.6},\"rate\":{:.1}}}",
        load(&counts.sent),
        load(&counts.ok),
        load(&counts.errors),
        load(&counts.failures),
        responses as f64 / elapsed.max(1e-9),
    );
    let _ = std::io::stdout().flush();
    thread::sleep(flags.linger);
    ExitCode::SUCCESS
}

fn run_worker(
    flags: &Flags,
    worker: u64,
    concurrency: u64,
    counts: &Counts,
    next: &AtomicU64,
    started: Instant,
    deadline: Option<Instant>,
) {
    let interval =
        (flags.rate > 0.0).then(|| Duration::from_secs_f64(concurrency as f64 / flags.rate));
    // Workers start staggered over one interval so the total rate is even.
    let mut due = started
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(worker as f64 / concurrency as f64)
        });
    let mut connection: Option<BufReader<TcpStream>> = None;
    let mut first = true;
    loop {
        match deadline {
            Some(deadline) if Instant::now() >= deadline => return,
            Some(_) => {}
            None => {
                if next.fetch_add(1, Ordering::Relaxed) >= flags.requests {
                    return;
                }
            }
        }
        if let Some(interval) = interval {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            due += interval;
        }
        counts.sent.fetch_add(1, Ordering::Relaxed);
        match request(flags, &mut connection) {
            Ok(status) => {
                counts.responses.fetch_add(1, Ordering::Relaxed);
                let counter = if (200..300).contains(&status) {
                    &counts.ok
                } else {
                    &counts.errors
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                counts.failures.fetch_add(1, Ordering::Relaxed);
                connection = None;
                eprintln!("trazor-sample-client: request failed: {error}");
            }
        }
        if first {
            first = false;
            thread::sleep(flags.pause_after_first);
        }
        if flags.new_connection {
            connection = None;
        }
    }
}

/// One request and its whole response; returns the status code.
fn request(flags: &Flags, connection: &mut Option<BufReader<TcpStream>>) -> std::io::Result<u16> {
    if connection.is_none() {
        let stream = TcpStream::connect(flags.target)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        *connection = Some(BufReader::new(stream));
    }
    let reader = connection
        .as_mut()
        .ok_or_else(|| std::io::Error::other("no connection"))?;
    let keep = if flags.new_connection {
        "close"
    } else {
        "keep-alive"
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: {keep}\r\n\r\n",
        flags.path, flags.target
    );
    reader.get_mut().write_all(request.as_bytes())?;
    read_response(reader)
}

/// Reads a response with a Content-Length or chunked body; returns its status code.
fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::other("connection closed before a response"));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut content_length = 0u64;
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection closed in the headers"));
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            content_length = value.trim().parse().unwrap_or(0);
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if !chunked {
        skip(reader, content_length)?;
        return Ok(status);
    }
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
        // The chunk and its CRLF; the last chunk is followed by (no trailers) one CRLF.
        skip(reader, size + 2)?;
        if size == 0 {
            return Ok(status);
        }
    }
}

fn skip(reader: &mut BufReader<TcpStream>, bytes: u64) -> std::io::Result<()> {
    let copied = std::io::copy(&mut reader.by_ref().take(bytes), &mut std::io::sink())?;
    if copied == bytes {
        Ok(())
    } else {
        Err(std::io::Error::other("connection closed in the body"))
    }
}
