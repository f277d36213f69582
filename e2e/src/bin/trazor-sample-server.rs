//! `trazor-sample-server`: an HTTP/1.1 server whose response time is known, for tests,
//! benchmarks and the demo. Thread per connection, keep-alive, blocking std sockets: the
//! same read/write syscalls real servers make.
//!
//! With `--latency-log FILE` it appends, per request, the latency it measured itself over
//! the same interval the agent measures (from the return of the read that brought the
//! request's first bytes to the return of the write carrying the status line), so tests
//! compare the agent's percentiles with true ones, not with the configured sleep.
//!
//! A request for `/status/{code}/{milliseconds}` is answered with that status code after
//! that many milliseconds instead (tests of latency by status code).
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read, Write as _},
    net::{TcpListener, TcpStream},
    process::ExitCode,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, ValueEnum};
use rand::Rng as _;

/// Serves HTTP/1.1 requests after a configured delay.
#[derive(Parser, Debug, Clone)]
#[command(about)]
struct Flags {
    /// Address to listen on (port 0 picks a free port; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Time each request takes.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Extra time, uniform in [0, jitter), added to every request's delay.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    jitter: Duration,
    /// Fraction of requests that take --slow-delay instead (a bimodal distribution).
    #[arg(long, default_value_t = 0.0)]
    slow_fraction: f64,
    /// Time a slow request takes.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    slow_delay: Duration,
    /// Fraction of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// How the response is written.
    #[arg(long, value_enum, default_value_t = Shape::Single)]
    shape: Shape,
    /// Pause between the writes of a split or chunked response.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    part_pause: Duration,
    /// Append each request's measured latency here: one line per request,
    /// "<latency ns> <wall-clock ns when the status line's write returned>".
    #[arg(long)]
    latency_log: Option<std::path::PathBuf>,
    /// Read the socket BYTES at a time into the last BYTES of a page that is followed by an
    /// inaccessible one: received bytes that end right before unmapped memory, as a server
    /// reading into the tail of a large buffer can have them (tests the agent's reads).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(1..=4096))]
    read_at_page_end: Option<u16>,
}

/// How a response goes out on the socket.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Status line, headers and body in one write.
    Single,
    /// Status line and headers in one write, then (after --part-pause) the body in another.
    Split,
    /// `Transfer-Encoding: chunked`: the head, then three chunks and the last chunk, each in
    /// its own write with --part-pause between them.
    Chunked,
}

type LatencyLog = Option<Arc<Mutex<File>>>;

fn main() -> ExitCode {
    let flags = Flags::parse();
    let log: LatencyLog = match &flags.latency_log {
        Some(path) => match File::options().create(true).append(true).open(path) {
            Ok(file) => Some(Arc::new(Mutex::new(file))),
            Err(error) => {
                eprintln!(
                    "trazor-sample-server: error: cannot open {}: {error}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let listener = match TcpListener::bind(&flags.listen) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "trazor-sample-server: error: cannot listen on {}: {error}",
                flags.listen
            );
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(address) => println!("listening on {address}"),
        Err(error) => {
            eprintln!("trazor-sample-server: error: {error}");
            return ExitCode::FAILURE;
        }
    }
    let _ = std::io::stdout().flush();
    for connection in listener.incoming() {
        match connection {
            Ok(stream) => {
                let flags = flags.clone();
                let log = log.clone();
                thread::spawn(move || {
                    let _ = serve_connection(stream, &flags, &log);
                });
            }
            Err(error) => eprintln!("trazor-sample-server: accept failed: {error}"),
        }
    }
    ExitCode::SUCCESS
}

/// The socket, remembering when the first read after [`TimedReads::arm`] returned bytes.
struct TimedReads<'a> {
    stream: &'a TcpStream,
    first_return: Option<Instant>,
    /// With --read-at-page-end: where the socket's bytes are received first.
    page_end: Option<PageEnd>,
}

impl TimedReads<'_> {
    fn arm(&mut self) {
        self.first_return = None;
    }
}

impl Read for TimedReads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = match &mut self.page_end {
            Some(page_end) => page_end.read(self.stream, buf)?,
            None => (&mut &*self.stream).read(buf)?,
        };
        if read > 0 && self.first_return.is_none() {
            self.first_return = Some(Instant::now());
        }
        Ok(read)
    }
}

/// The last `len` bytes of a page mapped just before an inaccessible one.
struct PageEnd {
    mapping: *mut libc::c_void,
    mapping_len: usize,
    tail: *mut u8,
    len: usize,
}

impl PageEnd {
    fn new(len: usize) -> std::io::Result<Self> {
        const PAGE: usize = 4096;
        // SAFETY: a fresh private anonymous mapping: no other reference to it exists.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page_end = PageEnd {
            mapping,
            mapping_len: 2 * PAGE,
            // SAFETY: len <= PAGE (the flag's range), so this stays in the first page.
            tail: unsafe { mapping.cast::<u8>().add(PAGE - len.min(PAGE)) },
            len: len.min(PAGE),
        };
        // SAFETY: the second page of our own mapping.
        if unsafe { libc::mprotect(mapping.cast::<u8>().add(PAGE).cast(), PAGE, libc::PROT_NONE) }
            != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(page_end)
    }

    /// Receives up to `len` bytes into the page's tail, then copies them to `buf`.
    fn read(&mut self, stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: `len` bytes of our mapping, borrowed mutably through `self` only.
        let tail = unsafe { std::slice::from_raw_parts_mut(self.tail, self.len) };
        let wanted = self.len.min(buf.len());
        let read = (&mut &*stream).read(&mut tail[..wanted])?;
        buf[..read].copy_from_slice(&tail[..read]);
        Ok(read)
    }
}

impl Drop for PageEnd {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.mapping, self.mapping_len) };
    }
}

/// The status code and delay a request line `GET /status/{code}/{ms} HTTP/1.1` asks for.
fn asked_status(request_line: &str) -> Option<(u16, Duration)> {
    let path = request_line.split(' ').nth(1)?;
    let mut parts = path.strip_prefix("/status/")?.split('/');
    let code: u16 = parts.next()?.parse().ok()?;
    let millis: u64 = parts.next()?.parse().ok()?;
    (100..1000)
        .contains(&code)
        .then(|| (code, Duration::from_millis(millis)))
}

fn serve_connection(stream: TcpStream, flags: &Flags, log: &LatencyLog) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Reads and writes on the same fd (no try_clone/dup needed: the agent follows the socket,
    // whatever fds point at it).
    let mut writer = &stream;
    let page_end = match flags.read_at_page_end {
        Some(bytes) => Some(PageEnd::new(usize::from(bytes))?),
        None => None,
    };
    let mut reader = BufReader::new(TimedReads {
        stream: &stream,
        first_return: None,
        page_end,
    });
    loop {
        // A request already buffered (pipelined) arrived with the read that brought the
        // previous one: its start is that read's return, so only re-arm when nothing is.
        if reader.buffer().is_empty() {
            reader.get_mut().arm();
        }
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        // Armed: the read that just brought the request line. Not armed: unchanged.
        let start = reader.get_ref().first_return;
        let mut content_length = 0usize;
        let mut expects_continue = false;
        let mut close = request_line.ends_with("HTTP/1.0\r\n");
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            if header == "\r\n" {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                content_length = value.trim().parse().unwrap_or(0);
            } else if lower.starts_with("connection:") {
                close = lower.contains("close");
            } else if let Some(value) = lower.strip_prefix("expect:") {
                expects_continue = value.trim() == "100-continue";
            }
        }
        if expects_continue && content_length > 0 {
            // The client waits for this before it sends the body (RFC 9110, 10.1.1).
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body)?;

        let mut rng = rand::rng();
        let mut delay = if rng.random_bool(flags.slow_fraction.clamp(0.0, 1.0)) {
            flags.slow_delay
        } else {
            flags.delay
        };
        if !flags.jitter.is_zero() {
            delay += flags.jitter.mul_f64(rng.random::<f64>());
        }
        let asked = asked_status(&request_line);
        if let Some((_, asked_delay)) = asked {
            delay = asked_delay;
        }
        thread::sleep(delay);
        let (status, body) = if let Some((code, _)) = asked {
            (format!("{code} Asked For"), "asked\n")
        } else if rng.random_bool(flags.error_rate.clamp(0.0, 1.0)) {
            ("500 Internal Server Error".to_owned(), "error\n")
        } else {
            ("200 OK".to_owned(), "ok\n")
        };
        let connection = if close { "close" } else { "keep-alive" };
        let head = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n");
        let answered = match flags.shape {
            Shape::Single => {
                let response = format!(
                    "{head}Content-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                    body.len()
                );
                writer.write_all(response.as_bytes())?;
                Instant::now()
            }
            Shape::Split => {
                let head = format!(
                    "{head}Content-Length: {}\r\nConnection: {connection}\r\n\r\n",
                    body.len()
                );
                writer.write_all(head.as_bytes())?;
                let answered = Instant::now();
                thread::sleep(flags.part_pause);
                writer.write_all(body.as_bytes())?;
                answered
            }
            Shape::Chunked => {
                let head =
                    format!("{head}Transfer-Encoding: chunked\r\nConnection: {connection}\r\n\r\n");
                writer.write_all(head.as_bytes())?;
                let answered = Instant::now();
                for chunk in [body, "more\n", "last\n"] {
                    thread::sleep(flags.part_pause);
                    writer.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())?;
                }
                thread::sleep(flags.part_pause);
                writer.write_all(b"0\r\n\r\n")?;
                answered
            }
        };
        if let (Some(log), Some(start)) = (log, start) {
            let latency = answered.duration_since(start).as_nanos();
            let wall = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos())
                .saturating_sub(answered.elapsed().as_nanos());
            let line = format!("{latency} {wall}\n");
            let mut file = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            file.write_all(line.as_bytes())?;
        }
        if close {
            return Ok(());
        }
    }
}
