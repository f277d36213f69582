//! `trazor-sample-server`: an HTTP/1.1 server whose response time is known, for tests,
//! benchmarks and the demo. Thread per connection, keep-alive, blocking std sockets: the
//! same read/write syscalls real servers make.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

use clap::Parser;
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
    /// Fraction of requests that take --slow-delay instead (a bimodal distribution).
    #[arg(long, default_value_t = 0.0)]
    slow_fraction: f64,
    /// Time a slow request takes.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    slow_delay: Duration,
    /// Fraction of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
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
                thread::spawn(move || {
                    let _ = serve_connection(stream, &flags);
                });
            }
            Err(error) => eprintln!("trazor-sample-server: accept failed: {error}"),
        }
    }
    ExitCode::SUCCESS
}

fn serve_connection(stream: TcpStream, flags: &Flags) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Reads and writes on the same fd (no try_clone/dup): the agent follows a connection by
    // (process, fd), as it sees it in the syscalls.
    let mut writer = &stream;
    let mut reader = BufReader::new(&stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0usize;
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
            }
        }
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body)?;

        let mut rng = rand::rng();
        let delay = if rng.random_bool(flags.slow_fraction.clamp(0.0, 1.0)) {
            flags.slow_delay
        } else {
            flags.delay
        };
        thread::sleep(delay);
        let (status, body) = if rng.random_bool(flags.error_rate.clamp(0.0, 1.0)) {
            ("500 Internal Server Error", "error\n")
        } else {
            ("200 OK", "ok\n")
        };
        let connection = if close { "close" } else { "keep-alive" };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        writer.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}
