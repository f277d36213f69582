//! `trazor-watch`: prints the collector's live feed as a table in the terminal.
use std::process::ExitCode;

use clap::Parser;
use futures::StreamExt as _;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Shows live per-window latencies from a Trazor collector's WebSocket feed.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Flags {
    /// The collector's feed URL.
    #[arg(default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Only windows of processes with this name.
    #[arg(long)]
    process: Option<String>,
    /// Exit after this many windows.
    #[arg(long)]
    count: Option<usize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::parse();
    let (mut socket, _) = match tokio_tungstenite::connect_async(&flags.url).await {
        Ok(connected) => connected,
        Err(error) => {
            eprintln!(
                "trazor-watch: error: cannot open {}: {error}; is the collector running \
                 (trazor-collector --http-listen ...)?",
                flags.url
            );
            return ExitCode::FAILURE;
        }
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
        let Ok(window) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if window["type"] == "lagged" {
            println!(
                "... missed {} windows (terminal too slow)",
                window["missed"]
            );
            continue;
        }
        if window["type"] != "window" {
            continue;
        }
        let process = window["process"].as_str().unwrap_or("?");
        if flags
            .process
            .as_deref()
            .is_some_and(|wanted| wanted != process)
        {
            continue;
        }
        let ms = |key: &str| window["percentiles"][key].as_f64().unwrap_or(f64::NAN);
        let start = window["start"].as_str().unwrap_or("");
        let time = start.get(11..19).unwrap_or(start);
        let mut route = window["route"].as_str().unwrap_or("").to_owned();
        if route.is_empty() {
            route.push('-');
        }
        if let Some(method) = window["method"]
            .as_str()
            .filter(|method| !method.is_empty())
        {
            route = format!("{method} {route}");
        }
        if window["direction"] == "client" {
            route = format!(
                "{route} → {}:{}",
                window["peer"]["address"].as_str().unwrap_or("?"),
                window["peer"]["port"]
            );
        }
        let who = match window["pod"]["name"].as_str() {
            Some(pod) => format!(
                "{}/{pod}",
                window["pod"]["namespace"].as_str().unwrap_or("")
            ),
            None => format!("{process}[{}]", window["pid"]),
        };
        println!(
            "{:<8} {:<24} {:<36} {:>6} {:>4} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            time,
            who,
            route,
            window["count"].as_u64().unwrap_or(0),
            window["errors"].as_u64().unwrap_or(0),
            ms("p50"),
            ms("p95"),
            ms("p99"),
            window["max_ms"].as_f64().unwrap_or(f64::NAN),
        );
        shown += 1;
        if flags.count.is_some_and(|count| shown >= count) {
            break;
        }
    }
    ExitCode::SUCCESS
}
