//! Bad input to `trazor-node-agent`: each gets a clear one-line error naming what to do,
//! an exit code, and never a panic or a hang.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

const AGENT: &str = env!("CARGO_BIN_EXE_trazor-node-agent");

fn run(args: &[&str]) -> Output {
    let mut child = Command::new(AGENT)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("trazor-node-agent {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!text.contains("panicked"), "panicked: {text}");
    text
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Tests that must run as root fail without it, unless skipping is asked for explicitly.
fn require_root(test: &str) -> bool {
    if std::env::var("TRAZOR_SKIP_EBPF_TESTS").is_ok_and(|v| !v.is_empty() && v != "0") {
        eprintln!("SKIPPED {test}: TRAZOR_SKIP_EBPF_TESTS is set");
        return false;
    }
    assert!(
        is_root(),
        "{test} needs root: run the tests as root, or set TRAZOR_SKIP_EBPF_TESTS=1"
    );
    true
}

#[test]
fn out_of_range_window_is_refused_before_anything_loads() {
    let output = run(&["--window", "0s"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("1s to 5m"), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
}

#[test]
fn collector_address_without_scheme_is_explained() {
    let output = run(&["--collector", "localhost:50051"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("http://"), "{text}");
}

#[test]
fn bad_percentile_and_unknown_flags_are_refused() {
    let output = run(&["--percentiles", "0.5,99"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("between 0 and 1"));
    let output = run(&["--no-such-flag"]);
    assert_eq!(output.status.code(), Some(2), "clap's usage error");
    assert!(stderr(&output).contains("--no-such-flag"));
}

#[test]
fn missing_privileges_name_the_capabilities() {
    // Run as an unprivileged user: as root, drop to nobody with setpriv.
    let output = if is_root() {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", AGENT])
            .output()
            .expect("setpriv (util-linux) runs the agent as nobody")
    } else {
        run(&[])
    };
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stderr(&output);
    assert!(
        text.contains("needs root") && text.contains("CAP_BPF"),
        "{text}"
    );
}

#[test]
fn unreachable_collector_is_retried_not_fatal() {
    if !require_root("unreachable_collector_is_retried_not_fatal") {
        return;
    }
    // Port 1 on loopback: nothing listens there.
    let mut child = Command::new(AGENT)
        .args(["--collector", "http://127.0.0.1:1", "--window", "1s"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let saw_warning = (0..200).any(|_| {
        receiver
            .recv_timeout(Duration::from_millis(100))
            .is_ok_and(|line| {
                line.contains("collector unreachable") && line.contains("--collector")
            })
    });
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        saw_warning,
        "the agent says the collector is unreachable and what to check"
    );
    assert!(
        still_running,
        "the agent keeps measuring while the collector is away"
    );
}
