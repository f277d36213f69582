//! How many eBPF instructions each of Trazor's programs executes on each path of a traced
//! request, counted exactly, by running the object the agent loads in an interpreter.
//!
//! Why an interpreter: instructions executed are the one cost figure that does not move
//! with the machine's load, and the kernel cannot count them on hardware without
//! performance counters (`perf stat -e instructions` reports `<not supported>`, and
//! `bpftool prog profile` reads the same counters; the kernel's own `run_time_ns` is time).
//! So this tool runs the very bytecode: the ELF object node-agent/build.rs builds, embedded
//! exactly as `capture::KernelCapture::load` embeds it, parsed and relocated by aya-obj as
//! aya's loader does (map references, BPF-to-BPF calls; no BTF, as the agent loads it).
//!
//! The interpreter models what the programs touch: the 512-byte stack of each frame, the
//! raw tracepoint's arguments, map values (every map is modelled from the object's own
//! definition, one CPU), the task and its saved registers (x86-64 `struct pt_regs`), the
//! traced process's memory (the bytes it received or sent), and a kernel `struct sock`.
//! Helpers are implemented by number; an unknown one fails with its number. A helper call
//! is one instruction, and is listed by name besides.
//!
//! The scenarios drive each path the way the kernel would (the same tracepoint arguments,
//! syscall registers and bytes), and each checks in the maps that its path was taken, so a
//! changed program cannot silently have its count taken on another path.
#![allow(clippy::print_stdout)]

use std::{
    collections::{BTreeMap, BTreeSet},
    mem::{offset_of, size_of},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{Pod, include_bytes_aligned};
use aya_obj::{EbpfSectionKind, Object, generated::bpf_insn};
use clap::Parser;
use trazor_node_agent_ebpf_common::{
    AgentSettings, CGROUP_SLOT_SHARED, CgroupRule, Connection, Direction, SeriesTotals,
    cgroup_slot, method, route_hash_at,
};

#[derive(Parser)]
#[command(
    about = "Counts the eBPF instructions each program executes on each path of a traced \
                   request, by interpreting the agent's eBPF object (see the module docs)"
)]
struct Args {
    /// An eBPF object to count instead of the one this binary embeds, say a build from
    /// before a change (node-agent/build.rs leaves it in OUT_DIR, named `trazor`).
    object: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (object, source) = match &args.object {
        Some(path) => {
            let file = ObjectFile::read(path)?;
            let object = AgentObject::parse(file.bytes())
                .with_context(|| format!("in {}", path.display()))?;
            (object, format!("{} ({} bytes)", path.display(), file.len))
        }
        None => (
            AgentObject::parse(agent_object())?,
            format!("the agent's object ({} bytes)", agent_object().len()),
        ),
    };
    let measurements = run_scenarios(&object)?;
    print_report(&source, &object, &measurements);
    Ok(())
}

/// The object the agent loads.
fn agent_object() -> &'static [u8] {
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/trazor"))
}

/// An object file's bytes, 8-byte aligned as the ELF parser requires.
struct ObjectFile {
    words: Vec<u64>,
    len: usize,
}

impl ObjectFile {
    fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(word)
            })
            .collect();
        Ok(Self {
            words,
            len: bytes.len(),
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the words' memory, read as the bytes it holds (u8 has no alignment or
        // validity requirement); `len` is at most 8 × their number.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

const RECEIVE: &str = "sock_recv_length";
const SEND: &str = "sock_send_length";
const STATE_CHANGE: &str = "inet_sock_set_state";
const DESTROY: &str = "tcp_destroy_sock";
/// The programs the agent attaches, all of which the scenarios run.
const PROGRAMS: [&str; 4] = [RECEIVE, SEND, STATE_CHANGE, DESTROY];

const REQUEST_1: &[u8] = b"GET /api/items/1 HTTP/1.1\r\nHost: x\r\n\r\n";
const REQUEST_2: &[u8] = b"GET /api/items/2 HTTP/1.1\r\nHost: x\r\n\r\n";
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";
const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n";
const RESPONSE_BODY: &[u8] = b"{\"id\": 1}\r\n";
const CLIENT_REQUEST: &[u8] = b"GET /api/items/1 HTTP/1.1\r\nHost: inventory\r\n\r\n";

/// `EAGAIN`: a receive that would block.
const EAGAIN: i32 = 11;

/// The agent's defaults (`agent::AgentConfig`): 5 s windows, exemplars from 500 ms, no
/// sampling; only the selected cgroups traced.
fn agent_settings() -> AgentSettings {
    AgentSettings {
        window_nanos: 5_000_000_000,
        // A wall clock in 2023 at boot: only window numbers depend on it.
        realtime_offset_nanos: 1_700_000_000_000_000_000,
        slow_threshold_nanos: 500_000_000,
        sample_below: 0,
        trace_all: 0,
        agent_tgid: AGENT_TGID,
        directions: u32::from(Direction::Server as u8 | Direction::Client as u8),
    }
}

const AGENT_TGID: u32 = 700;

/// A process of a selected pod (its cgroup is in the slot table).
const SELECTED: Process = Process {
    tgid: 4242,
    tid: 4243,
    cgroup_id: 0x2_0042,
    comm: *b"checkout\0\0\0\0\0\0\0\0",
};

/// A process of no selected pod: its cgroup's slot is empty.
const UNSELECTED: Process = Process {
    tgid: 5151,
    tid: 5151,
    cgroup_id: 0x3_0077,
    comm: *b"postgres\0\0\0\0\0\0\0\0",
};

/// What the selected cgroup traces: both directions, every port (`TraceRule::every_port`).
const SELECTED_RULE: CgroupRule = CgroupRule {
    directions: Direction::Server as u8 | Direction::Client as u8,
    port_filtered: 0,
    _pad: [0; 6],
};

/// An accepted connection on the server's port 8080.
const SERVER_SOCKET: SocketHead = SocketHead {
    peer: [10, 0, 0, 7],
    peer_port: 51_234,
    local: [10, 0, 0, 5],
    local_port: 8080,
};

/// A connection the process made to a peer's port 80.
const CLIENT_SOCKET: SocketHead = SocketHead {
    peer: [10, 0, 0, 9],
    peer_port: 80,
    local: [10, 0, 0, 5],
    local_port: 40_000,
};

/// Nanoseconds since boot at the first step of every scenario.
const BOOT_CLOCK: u64 = 1_000_000_000_000;
/// How long a server takes to answer, and a client's request is out.
const LATENCY: u64 = 2_000_000;
/// Between a response and the next request on the same connection.
const THINK_TIME: u64 = 10_000_000;

/// One program run of a scenario.
#[derive(Clone, Debug)]
struct Measurement {
    scenario: &'static str,
    step: String,
    program: &'static str,
    execution: Execution,
}

/// All scenarios, in order; each fails when its path was not taken.
fn run_scenarios(object: &AgentObject) -> Result<Vec<Measurement>> {
    // The object is built for this machine's architecture, and the scenarios' saved
    // registers and syscall numbers are x86-64's.
    ensure!(
        cfg!(target_arch = "x86_64"),
        "the scenarios model x86-64 (struct pt_regs, syscall numbers): run this on x86-64"
    );
    let mut measurements = Vec::new();
    let scenarios: [(&'static str, ScenarioFn); 6] = [
        ("a. outside the selection", outside_the_selection),
        ("b. failed receive", failed_receive),
        ("c+d. server, keep-alive connection", server_connection),
        ("e. client, keep-alive connection", client_connection),
        ("f. server, body send and writev", body_and_writev),
        ("g. connection end", connection_end),
    ];
    for (name, scenario) in scenarios {
        let mut run = ScenarioRun {
            name,
            host: Host::new(object)?,
            measurements: &mut measurements,
        };
        run.host
            .configure(&agent_settings(), &[(SELECTED.cgroup_id, SELECTED_RULE)])?;
        scenario(&mut run).with_context(|| format!("scenario \"{name}\""))?;
    }
    Ok(measurements)
}

type ScenarioFn = fn(&mut ScenarioRun<'_, '_>) -> Result<()>;

/// a. A process outside the selection receives a request: the programs stop at its
/// cgroup's slot.
fn outside_the_selection(run: &mut ScenarioRun<'_, '_>) -> Result<()> {
    run.host.switch_to(UNSELECTED);
    let socket = run.host.open_socket(&SERVER_SOCKET);
    let before = run.host.map_contents();
    let receive = run.socket_call(
        "a1. a process outside the selection receives a request (read)",
        RECEIVE,
        socket,
        returned_length(REQUEST_1),
        Syscall::Read,
        REQUEST_1,
    )?;
    ensure!(
        receive.helper_calls.contains_key("get_current_cgroup_id"),
        "the receive never asked for the process's cgroup: it stopped before the selection"
    );
    ensure!(
        run.host.map_contents() == before,
        "the receive of a process outside the selection changed the maps: it was traced"
    );
    Ok(())
}

/// b. A selected process's receive fails (EAGAIN): nothing to see.
fn failed_receive(run: &mut ScenarioRun<'_, '_>) -> Result<()> {
    let socket = run.host.open_socket(&SERVER_SOCKET);
    let before = run.host.map_contents();
    run.socket_call(
        "b1. a selected process's receive fails (EAGAIN)",
        RECEIVE,
        socket,
        -EAGAIN,
        Syscall::Read,
        &[],
    )?;
    ensure!(
        run.host.map_contents() == before,
        "a failed receive changed the maps"
    );
    Ok(())
}

/// c. The first request on a new server connection and its response; d. the next request
/// with another path, its response, and a request repeating it byte for byte.
fn server_connection(run: &mut ScenarioRun<'_, '_>) -> Result<()> {
    let socket = run.host.open_socket(&SERVER_SOCKET);
    let mut counted = run.host.requests_counted()?;

    let start = run.host.now_nanos;
    run.socket_call(
        "c1. first request on a new connection (read)",
        RECEIVE,
        socket,
        returned_length(REQUEST_1),
        Syscall::Read,
        REQUEST_1,
    )?;
    run.expect_in_flight(socket, Direction::Server, start)?;
    run.host.now_nanos += LATENCY;
    run.socket_call(
        "c2. its response (write)",
        SEND,
        socket,
        returned_length(RESPONSE),
        Syscall::Write,
        RESPONSE,
    )?;
    counted = run.expect_counted(socket, counted)?;

    run.host.now_nanos += THINK_TIME;
    let start = run.host.now_nanos;
    run.socket_call(
        "d1. next request, another id (read): head copied, route re-hashed",
        RECEIVE,
        socket,
        returned_length(REQUEST_2),
        Syscall::Read,
        REQUEST_2,
    )?;
    let connection = run.expect_in_flight(socket, Direction::Server, start)?;
    ensure!(
        connection.head.starts_with(REQUEST_2),
        "the connection's head does not hold the second request: it was not copied"
    );
    let head = connection.head;
    run.host.now_nanos += LATENCY;
    run.socket_call(
        "d2. its response (write)",
        SEND,
        socket,
        returned_length(RESPONSE),
        Syscall::Write,
        RESPONSE,
    )?;
    counted = run.expect_counted(socket, counted)?;

    run.host.now_nanos += THINK_TIME;
    let start = run.host.now_nanos;
    run.socket_call(
        "d3. the same request again (read): head unchanged",
        RECEIVE,
        socket,
        returned_length(REQUEST_2),
        Syscall::Read,
        REQUEST_2,
    )?;
    let connection = run.expect_in_flight(socket, Direction::Server, start)?;
    ensure!(
        connection.head == head,
        "the connection's head changed on a request repeating the last one"
    );
    run.host.now_nanos += LATENCY;
    run.socket_call(
        "d4. its response (write)",
        SEND,
        socket,
        returned_length(RESPONSE),
        Syscall::Write,
        RESPONSE,
    )?;
    run.expect_counted(socket, counted)?;
    Ok(())
}

/// e. A client's request and response on a new connection, then on the same one again.
fn client_connection(run: &mut ScenarioRun<'_, '_>) -> Result<()> {
    let socket = run.host.open_socket(&CLIENT_SOCKET);
    let mut counted = run.host.requests_counted()?;
    for (send, receive) in [
        (
            "e1. request on a new connection (write)",
            "e2. its response's status line (read)",
        ),
        (
            "e3. next request on the same connection (write)",
            "e4. its response's status line (read)",
        ),
    ] {
        let start = run.host.now_nanos;
        run.socket_call(
            send,
            SEND,
            socket,
            returned_length(CLIENT_REQUEST),
            Syscall::Write,
            CLIENT_REQUEST,
        )?;
        let connection = run.expect_in_flight(socket, Direction::Client, start)?;
        ensure!(
            connection.peer_addr == u32::from_ne_bytes(CLIENT_SOCKET.peer)
                && connection.peer_port == CLIENT_SOCKET.peer_port,
            "the connection's peer is {:#x} port {}, expected {:?} port {}",
            connection.peer_addr,
            connection.peer_port,
            CLIENT_SOCKET.peer,
            CLIENT_SOCKET.peer_port
        );
        run.host.now_nanos += LATENCY;
        run.socket_call(
            receive,
            RECEIVE,
            socket,
            returned_length(RESPONSE),
            Syscall::Read,
            RESPONSE,
        )?;
        counted = run.expect_counted(socket, counted)?;
        run.host.now_nanos += THINK_TIME;
    }
    Ok(())
}

/// f. A response written with writev (iovec), then its body sent on the connection that
/// has no request in flight any more.
fn body_and_writev(run: &mut ScenarioRun<'_, '_>) -> Result<()> {
    let socket = run.host.open_socket(&SERVER_SOCKET);
    let counted = run.host.requests_counted()?;
    let start = run.host.now_nanos;
    run.socket_call(
        "f1. request on a new connection (read)",
        RECEIVE,
        socket,
        returned_length(REQUEST_1),
        Syscall::Read,
        REQUEST_1,
    )?;
    run.expect_in_flight(socket, Direction::Server, start)?;
    run.host.now_nanos += LATENCY;
    run.socket_call(
        "f2. its response's head (writev, one iovec)",
        SEND,
        socket,
        returned_length(RESPONSE_HEAD),
        Syscall::Writev,
        RESPONSE_HEAD,
    )?;
    let counted = run.expect_counted(socket, counted)?;
    let before = run.host.map_contents();
    run.socket_call(
        "f3. body send, no request in flight (write)",
        SEND,
        socket,
        returned_length(RESPONSE_BODY),
        Syscall::Write,
        RESPONSE_BODY,
    )?;
    ensure!(
        run.host.requests_counted()? == counted,
        "a body send counted a request"
    );
    ensure!(
        run.host.map_contents() == before,
        "a body send on a connection without a request in flight changed the maps"
    );
    Ok(())
}

/// g. A traced connection reaches TCP_CLOSE (its entry goes), then its socket is destroyed
/// (nothing left to do).
fn connection_end(run: &mut ScenarioRun<'_, '_>) -> Result<()> {
    let socket = run.host.open_socket(&SERVER_SOCKET);
    let start = run.host.now_nanos;
    run.socket_call(
        "g1. request on a new connection (read)",
        RECEIVE,
        socket,
        returned_length(REQUEST_1),
        Syscall::Read,
        REQUEST_1,
    )?;
    run.expect_in_flight(socket, Direction::Server, start)?;
    run.host.now_nanos += LATENCY;
    run.socket_call(
        "g2. its response (write)",
        SEND,
        socket,
        returned_length(RESPONSE),
        Syscall::Write,
        RESPONSE,
    )?;
    run.host.now_nanos += THINK_TIME;
    run.call(
        "g3. the socket reaches TCP_CLOSE",
        STATE_CHANGE,
        [socket, TCP_ESTABLISHED, TCP_CLOSE],
    )?;
    ensure!(
        run.host.connection(socket)?.is_none(),
        "the connection is still in CONNECTIONS after its socket reached TCP_CLOSE"
    );
    let before = run.host.map_contents();
    run.call("g4. the socket is destroyed", DESTROY, [socket, 0, 0])?;
    ensure!(
        run.host.map_contents() == before,
        "destroying a socket already forgotten changed the maps"
    );
    Ok(())
}

/// TCP states (`include/net/tcp_states.h`), as tracepoint arguments.
const TCP_ESTABLISHED: u64 = 1;
const TCP_CLOSE: u64 = 7;

/// A byte count as a socket call returns it.
fn returned_length(bytes: &[u8]) -> i32 {
    i32::try_from(bytes.len()).unwrap_or(i32::MAX)
}

/// A scenario under way: its host, and where its measurements go.
struct ScenarioRun<'o, 'm> {
    name: &'static str,
    host: Host<'o>,
    measurements: &'m mut Vec<Measurement>,
}

impl ScenarioRun<'_, '_> {
    /// The current process makes `syscall` with `bytes` on `socket`, which returns
    /// `returned`; `program` is the tracepoint it fires.
    fn socket_call(
        &mut self,
        step: &str,
        program: &'static str,
        socket: u64,
        returned: i32,
        syscall: Syscall,
        bytes: &[u8],
    ) -> Result<Execution> {
        self.host.enter_syscall(syscall, bytes)?;
        // Raw tracepoint arguments are widened as unsigned: an int's bits in the low half.
        let returned = u64::from(returned as u32);
        let flags = 0;
        self.call(step, program, [socket, returned, flags])
    }

    fn call(&mut self, step: &str, program: &'static str, args: [u64; 3]) -> Result<Execution> {
        let execution = self
            .host
            .run(program, &args)
            .with_context(|| format!("step \"{step}\""))?;
        self.measurements.push(Measurement {
            scenario: self.name,
            step: step.to_owned(),
            program,
            execution: execution.clone(),
        });
        Ok(execution)
    }

    /// The connection of `socket`, which must be of `direction` with a request in flight
    /// since `start`.
    fn expect_in_flight(
        &self,
        socket: u64,
        direction: Direction,
        start: u64,
    ) -> Result<Connection> {
        let Some(connection) = self.host.connection(socket)? else {
            bail!("no CONNECTIONS entry for the socket: the request did not start a connection");
        };
        ensure!(
            connection.direction == direction as u8,
            "the connection's direction is {}, expected {direction:?}",
            connection.direction
        );
        ensure!(
            connection.request_start_nanos == start,
            "the connection's request_start_nanos is {}, expected {start}: the request did not \
             start",
            connection.request_start_nanos
        );
        // What the program computed, checked against the common crate's own code: an
        // interpreter that got an operation wrong would not agree.
        ensure!(
            connection.method == method::GET,
            "the connection's method is {}, expected GET",
            connection.method
        );
        let (route, path_len) =
            route_hash_at(&connection.head, usize::from(connection.path_offset));
        ensure!(
            connection.route == route && usize::from(connection.path_len) == path_len,
            "the connection's route is {:#x} ({} bytes), but its head hashes to {route:#x} \
             ({path_len} bytes)",
            connection.route,
            connection.path_len
        );
        Ok(connection)
    }

    /// Checks that one more request than `before` was counted and none is in flight on
    /// `socket` any more; returns the new count.
    fn expect_counted(&self, socket: u64, before: u64) -> Result<u64> {
        let counted = self.host.requests_counted()?;
        ensure!(
            counted == before + 1,
            "{counted} requests counted, expected {}: the response did not finish a request",
            before + 1
        );
        let connection = self.host.connection(socket)?;
        ensure!(
            connection.is_some_and(|connection| connection.request_start_nanos == 0),
            "after the response the connection is {connection:?}, expected one with no request \
             in flight"
        );
        Ok(counted)
    }
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn print_report(source: &str, object: &AgentObject, measurements: &[Measurement]) {
    println!(
        "eBPF instructions executed per program call, by interpreting {source} (maps: {}).\n",
        object
            .maps
            .iter()
            .map(|map| format!("{} ({})", map.name, map.kind.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| scenario | step | program | instructions | helper calls | helpers | map lookups \
         | BPF-to-BPF calls |"
    );
    println!("|---|---|---|---:|---:|---|---|---|");
    let mut last_scenario = "";
    for measurement in measurements {
        let execution = &measurement.execution;
        let scenario = if measurement.scenario == last_scenario {
            ""
        } else {
            measurement.scenario
        };
        last_scenario = measurement.scenario;
        println!(
            "| {scenario} | {} | {} | {} | {} | {} | {} | {} |",
            measurement.step,
            measurement.program,
            execution.instructions,
            execution.helper_calls.values().sum::<u64>(),
            tally(&execution.helper_calls),
            tally(&execution.lookups),
            subprogram_tally(&execution.subprogram_calls),
        );
    }
    println!("{NOTES}");
}

/// "name ×count, ..." or "-".
fn tally<K: AsRef<str>>(counts: &BTreeMap<K, u64>) -> String {
    if counts.is_empty() {
        return "-".to_owned();
    }
    counts
        .iter()
        .map(|(name, count)| format!("{} ×{count}", name.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "memset ×2 (311 instructions), ..." or "-".
fn subprogram_tally(calls: &BTreeMap<String, SubprogramCalls>) -> String {
    if calls.is_empty() {
        return "-".to_owned();
    }
    calls
        .iter()
        .map(|(name, calls)| {
            format!(
                "{name} ×{} ({} instructions)",
                calls.calls, calls.instructions
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

const NOTES: &str = "
Instructions are BPF instructions of the object as aya's loader hands it to the kernel, \
before the verifier: a helper call counts as one (its own work, hashing or copying, not at \
all), a 16-byte ld_imm64 as one, and BPF-to-BPF callees' instructions are included.

Not reflected: the JIT's translation, and the verifier's rewrites. As Linux 6.18 on x86-64 \
rewrites these programs (`bpftool prog dump xlated`), a map_lookup_elem of an Array is \
inlined into 6 instructions (4 when the index is out of range), of a PerCpuArray into 8 \
(4); a Hash lookup becomes a direct call to __htab_map_lookup_elem and 2 more (1 when not \
found), an LruHash lookup the call and 4 more (5 when it sets the entry's reference bit, 1 \
when not found). The other helpers stay calls.";

// ---------------------------------------------------------------------------------------
// The object: programs and map definitions, as aya's loader prepares them
// ---------------------------------------------------------------------------------------

/// What a relocated map reference carries in place of a file descriptor: the map's index
/// plus this (nothing here is a kernel object, any number does).
const FIRST_MAP_NUMBER: i32 = 1000;

struct AgentObject {
    programs: BTreeMap<String, Program>,
    /// Map definitions by index (`FIRST_MAP_NUMBER` + index is the map's number).
    maps: Vec<MapDefinition>,
}

/// A program as the loader hands it to the kernel: map references relocated to map
/// numbers, BPF-to-BPF callees appended.
struct Program {
    instructions: Vec<Instruction>,
    /// The name of the function each BPF-to-BPF call lands on, by instruction index.
    callees: BTreeMap<usize, String>,
}

struct MapDefinition {
    name: String,
    kind: MapKind,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    /// Initial contents of a global data map (`.rodata`, `.data`, `.bss`); else empty.
    initial: Vec<u8>,
    /// `.rodata`: the loader freezes it, so programs may only read it.
    read_only: bool,
}

impl AgentObject {
    fn parse(elf: &[u8]) -> Result<Self> {
        let mut object = Object::parse(elf).context("parsing the agent's eBPF object")?;
        // The agent loads without BTF (`EbpfLoader::btf(None)`), so it applies none either.
        ensure!(
            !object.has_btf_relocations(),
            "the object has CO-RE (BTF) relocations, which the agent does not apply (it loads \
             without BTF) and neither does this tool"
        );
        let mut names: Vec<&String> = object.maps.keys().collect();
        names.sort();
        let mut numbered = Vec::with_capacity(names.len());
        for (index, name) in names.into_iter().enumerate() {
            let number = FIRST_MAP_NUMBER + i32::try_from(index).context("too many maps")?;
            numbered.push((name.clone(), number, object.maps[name].clone()));
        }
        // As aya's `EbpfLoader::load`: map references first, then calls.
        let text_sections = object
            .functions
            .keys()
            .map(|(section, _)| *section)
            .collect();
        object
            .relocate_maps(
                numbered
                    .iter()
                    .map(|(name, number, map)| (name.as_str(), *number, map)),
                &text_sections,
            )
            .context("relocating map references")?;
        let functions = object
            .functions
            .values()
            .map(|function| Ok((function.name.clone(), decode(&function.instructions)?)))
            .collect::<Result<Vec<_>>>()?;
        object
            .relocate_calls(&text_sections)
            .context("linking BPF-to-BPF calls")?;

        let mut programs = BTreeMap::new();
        for (name, program) in &object.programs {
            let function = object
                .functions
                .get(&program.function_key())
                .with_context(|| format!("program {name} has no function"))?;
            let instructions =
                decode(&function.instructions).with_context(|| format!("program {name}"))?;
            let callees = callee_names(&instructions, &functions);
            programs.insert(
                name.clone(),
                Program {
                    instructions,
                    callees,
                },
            );
        }
        let mut maps = Vec::with_capacity(numbered.len());
        for (name, _, map) in numbered {
            let kind = MapKind::from_type(map.map_type()).with_context(|| {
                format!(
                    "map {name} has type {}, which this tool does not model (Array, \
                     PerCpuArray, Hash, LruHash, PerCpuHash, LruPerCpuHash, RingBuf)",
                    map.map_type()
                )
            })?;
            maps.push(MapDefinition {
                kind,
                key_size: usize::try_from(map.key_size())?,
                value_size: usize::try_from(map.value_size())?,
                max_entries: map.max_entries(),
                initial: map.data().to_vec(),
                read_only: matches!(map.section_kind(), EbpfSectionKind::Rodata),
                name,
            });
        }
        let object = Self { programs, maps };
        object.check_helpers()?;
        Ok(object)
    }

    /// Fails now, naming it, on a helper the programs may call that is not modelled.
    fn check_helpers(&self) -> Result<()> {
        for name in PROGRAMS {
            let program = self.program(name)?;
            for (pc, instruction) in program.instructions.iter().enumerate() {
                if instruction.code == BPF_JMP | BPF_CALL
                    && instruction.src == 0
                    && helper_name(instruction.imm).is_none()
                {
                    bail!(
                        "{name} calls helper id {} (instruction {pc}), which this tool does \
                         not model: add it to `Host::call_helper`",
                        instruction.imm
                    );
                }
            }
        }
        Ok(())
    }

    fn program(&self, name: &str) -> Result<&Program> {
        self.programs.get(name).with_context(|| {
            format!(
                "no program {name} in the object (it has: {})",
                self.programs
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    fn map_index(&self, name: &str) -> Option<usize> {
        self.maps.iter().position(|map| map.name == name)
    }
}

fn decode(raw: &[bpf_insn]) -> Result<Vec<Instruction>> {
    raw.iter()
        .enumerate()
        .map(|(index, raw)| {
            Instruction::decode(raw).with_context(|| format!("instruction {index}"))
        })
        .collect()
}

/// Names each BPF-to-BPF callee linked into `program`: the linker appends a copy of each
/// callee's instructions, its calls re-pointed, so the callee is the function of the object
/// whose instructions are found where the call lands (several names when bodies are equal,
/// as `bcmp` and `memcmp` may be).
fn callee_names(
    program: &[Instruction],
    functions: &[(String, Vec<Instruction>)],
) -> BTreeMap<usize, String> {
    let mut names = BTreeMap::new();
    for (pc, instruction) in program.iter().enumerate() {
        if !instruction.is_subprogram_call() {
            continue;
        }
        let Ok(target) = jump_target(pc, i64::from(instruction.imm), program.len()) else {
            continue;
        };
        let matching: Vec<&str> = functions
            .iter()
            .filter(|(_, body)| {
                program
                    .get(target..target + body.len())
                    .is_some_and(|linked| linked.iter().zip(body).all(|(a, b)| a.links_to(b)))
            })
            .map(|(name, _)| name.as_str())
            .collect();
        let name = if matching.is_empty() {
            format!("function at {target}")
        } else {
            matching.join("/")
        };
        names.insert(target, name);
    }
    names
}

/// One instruction, its fields decoded (`struct bpf_insn`).
#[derive(Clone, Copy, Debug)]
struct Instruction {
    code: u8,
    dst: usize,
    src: usize,
    offset: i16,
    imm: i32,
}

impl Instruction {
    fn is_subprogram_call(&self) -> bool {
        self.code == BPF_JMP | BPF_CALL && self.src == BPF_PSEUDO_CALL
    }

    /// Whether `self` is `original` as the linker copies it (only call targets change).
    fn links_to(&self, original: &Instruction) -> bool {
        self.code == original.code
            && self.dst == original.dst
            && self.src == original.src
            && self.offset == original.offset
            && (self.imm == original.imm || self.is_subprogram_call())
    }

    fn decode(raw: &bpf_insn) -> Result<Self> {
        let (dst, src) = (usize::from(raw.dst_reg()), usize::from(raw.src_reg()));
        ensure!(
            dst < REGISTERS && src < REGISTERS,
            "register r{dst} or r{src} does not exist (code {:#04x})",
            raw.code
        );
        Ok(Self {
            code: raw.code,
            dst,
            src,
            offset: raw.off,
            imm: raw.imm,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The ISA (include/uapi/linux/bpf.h, bpf_common.h; Documentation/bpf/standardization)
// ---------------------------------------------------------------------------------------

const REGISTERS: usize = 11;
const FRAME_POINTER: usize = 10;

const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_ALU: u8 = 0x04;
const BPF_JMP: u8 = 0x05;
const BPF_JMP32: u8 = 0x06;
const BPF_ALU64: u8 = 0x07;

const BPF_W: u8 = 0x00;
const BPF_H: u8 = 0x08;
const BPF_B: u8 = 0x10;
const BPF_DW: u8 = 0x18;

const BPF_IMM: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_MEMSX: u8 = 0x80;
const BPF_ATOMIC: u8 = 0xc0;

/// Source operand: a register rather than the immediate.
const BPF_X: u8 = 0x08;

const BPF_ADD: u8 = 0x00;
const BPF_SUB: u8 = 0x10;
const BPF_MUL: u8 = 0x20;
const BPF_DIV: u8 = 0x30;
const BPF_OR: u8 = 0x40;
const BPF_AND: u8 = 0x50;
const BPF_LSH: u8 = 0x60;
const BPF_RSH: u8 = 0x70;
const BPF_NEG: u8 = 0x80;
const BPF_MOD: u8 = 0x90;
const BPF_XOR: u8 = 0xa0;
const BPF_MOV: u8 = 0xb0;
const BPF_ARSH: u8 = 0xc0;
const BPF_END: u8 = 0xd0;

const BPF_JA: u8 = 0x00;
const BPF_JEQ: u8 = 0x10;
const BPF_JGT: u8 = 0x20;
const BPF_JGE: u8 = 0x30;
const BPF_JSET: u8 = 0x40;
const BPF_JNE: u8 = 0x50;
const BPF_JSGT: u8 = 0x60;
const BPF_JSGE: u8 = 0x70;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
const BPF_JLT: u8 = 0xa0;
const BPF_JLE: u8 = 0xb0;
const BPF_JSLT: u8 = 0xc0;
const BPF_JSLE: u8 = 0xd0;

/// Atomic operations (the immediate of `BPF_STX | BPF_ATOMIC`).
const BPF_FETCH: i32 = 0x01;
const BPF_XCHG: i32 = 0xe0 | BPF_FETCH;
const BPF_CMPXCHG: i32 = 0xf0 | BPF_FETCH;
const BPF_LOAD_ACQ: i32 = 0x100;
const BPF_STORE_REL: i32 = 0x110;

/// `src_reg` of a call: a BPF-to-BPF call, the immediate being the callee's offset.
const BPF_PSEUDO_CALL: usize = 1;
/// `src_reg` of an ld_imm64: the immediate is a map's number; or a map's number and an
/// offset into its value (the next slot's immediate).
const BPF_PSEUDO_MAP_FD: usize = 1;
const BPF_PSEUDO_MAP_VALUE: usize = 2;

/// Instructions after which a run is declared runaway (the verifier caps a program at a
/// million processed instructions; none of ours comes near).
const INSTRUCTION_LIMIT: u64 = 1_000_000;
/// BPF-to-BPF call depth the kernel allows.
const MAX_CALL_DEPTH: usize = 8;
const STACK_SIZE: usize = 512;

fn access_size(code: u8) -> usize {
    match code & 0x18 {
        BPF_W => 4,
        BPF_H => 2,
        BPF_B => 1,
        _ => 8,
    }
}

/// What one program run did.
#[derive(Clone, Debug, Default)]
struct Execution {
    /// Instructions executed, helper calls included (one each).
    instructions: u64,
    /// Helper calls by helper name.
    helper_calls: BTreeMap<&'static str, u64>,
    /// BPF-to-BPF calls by callee name.
    subprogram_calls: BTreeMap<String, SubprogramCalls>,
    /// `map_lookup_elem` calls by map name.
    lookups: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SubprogramCalls {
    calls: u64,
    /// Instructions executed in the function itself (not in functions it calls).
    instructions: u64,
}

/// A caller's state, restored when its callee exits.
struct Frame {
    /// The function this frame runs.
    callee: String,
    return_pc: usize,
    /// r6-r9 are callee-saved and r10 is the caller's frame.
    saved: [u64; 5],
    stack: u64,
}

fn alu64(op: u8, dst: u64, src: u64, offset: i16) -> Result<u64> {
    let shift = (src & 63) as u32;
    Ok(match op {
        BPF_ADD => dst.wrapping_add(src),
        BPF_SUB => dst.wrapping_sub(src),
        BPF_MUL => dst.wrapping_mul(src),
        // Division by zero gives 0 and modulo by zero leaves dst (the ISA's definition).
        BPF_DIV if src == 0 => 0,
        BPF_DIV if offset == 1 => (dst as i64).wrapping_div(src as i64) as u64,
        BPF_DIV => dst / src,
        BPF_MOD if src == 0 => dst,
        BPF_MOD if offset == 1 => (dst as i64).wrapping_rem(src as i64) as u64,
        BPF_MOD => dst % src,
        BPF_OR => dst | src,
        BPF_AND => dst & src,
        BPF_XOR => dst ^ src,
        BPF_LSH => dst << shift,
        BPF_RSH => dst >> shift,
        BPF_ARSH => ((dst as i64) >> shift) as u64,
        BPF_NEG => dst.wrapping_neg(),
        BPF_MOV => match offset {
            0 => src,
            8 => src as i8 as i64 as u64,
            16 => src as i16 as i64 as u64,
            32 => src as i32 as i64 as u64,
            _ => bail!("movsx with offset {offset}"),
        },
        _ => bail!("unknown ALU64 operation {op:#04x}"),
    })
}

/// A 32-bit ALU operation; the caller zero-extends the result.
fn alu32(op: u8, dst: u32, src: u32, offset: i16) -> Result<u32> {
    let shift = src & 31;
    Ok(match op {
        BPF_ADD => dst.wrapping_add(src),
        BPF_SUB => dst.wrapping_sub(src),
        BPF_MUL => dst.wrapping_mul(src),
        BPF_DIV if src == 0 => 0,
        BPF_DIV if offset == 1 => (dst as i32).wrapping_div(src as i32) as u32,
        BPF_DIV => dst / src,
        BPF_MOD if src == 0 => dst,
        BPF_MOD if offset == 1 => (dst as i32).wrapping_rem(src as i32) as u32,
        BPF_MOD => dst % src,
        BPF_OR => dst | src,
        BPF_AND => dst & src,
        BPF_XOR => dst ^ src,
        BPF_LSH => dst << shift,
        BPF_RSH => dst >> shift,
        BPF_ARSH => ((dst as i32) >> shift) as u32,
        BPF_NEG => dst.wrapping_neg(),
        BPF_MOV => match offset {
            0 => src,
            8 => src as i8 as i32 as u32,
            16 => src as i16 as i32 as u32,
            _ => bail!("32-bit movsx with offset {offset}"),
        },
        _ => bail!("unknown ALU operation {op:#04x}"),
    })
}

/// `BPF_END`: byte order conversion on this little-endian machine (ALU class), or an
/// unconditional byte swap (ALU64 class).
fn byte_order(class: u8, to_big_endian: bool, value: u64, bits: i32) -> Result<u64> {
    let swap = class == BPF_ALU64 || to_big_endian;
    Ok(match (bits, swap) {
        (16, false) => u64::from(value as u16),
        (32, false) => u64::from(value as u32),
        (64, false) => value,
        (16, true) => u64::from((value as u16).swap_bytes()),
        (32, true) => u64::from((value as u32).swap_bytes()),
        (64, true) => value.swap_bytes(),
        _ => bail!("byte order conversion of {bits} bits"),
    })
}

fn jump_taken(op: u8, dst: u64, src: u64, wide: bool) -> Result<bool> {
    let (dst, src, signed_dst, signed_src) = if wide {
        (dst, src, dst as i64, src as i64)
    } else {
        (
            u64::from(dst as u32),
            u64::from(src as u32),
            i64::from(dst as i32),
            i64::from(src as i32),
        )
    };
    Ok(match op {
        BPF_JEQ => dst == src,
        BPF_JNE => dst != src,
        BPF_JGT => dst > src,
        BPF_JGE => dst >= src,
        BPF_JLT => dst < src,
        BPF_JLE => dst <= src,
        BPF_JSET => dst & src != 0,
        BPF_JSGT => signed_dst > signed_src,
        BPF_JSGE => signed_dst >= signed_src,
        BPF_JSLT => signed_dst < signed_src,
        BPF_JSLE => signed_dst <= signed_src,
        _ => bail!("unknown jump operation {op:#04x}"),
    })
}

/// A pc plus a jump offset, when it lands in the program.
fn jump_target(pc: usize, offset: i64, length: usize) -> Result<usize> {
    let target = i64::try_from(pc)? + 1 + offset;
    usize::try_from(target)
        .ok()
        .filter(|target| *target < length)
        .with_context(|| format!("jump to {target}, outside the program's {length} instructions"))
}

// ---------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------

const PAGE: u64 = 4096;
/// Where kernel objects are placed (x86-64's direct map, so addresses look like real ones).
const KERNEL_BASE: u64 = 0xffff_8880_0000_0000;
/// Where the traced process's memory is placed.
const USER_BASE: u64 = 0x0000_7f00_0000_0000;
/// What map references load: nothing is mapped there, so a program dereferencing a map
/// reference (rather than passing it to a helper) fails loudly.
const MAP_REFERENCE_BASE: u64 = 0xffff_c900_0000_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegionKind {
    /// A program's stack frame.
    Stack,
    /// The raw tracepoint's arguments: read only.
    Context,
    /// Map values, which lookups point into.
    MapValue,
    /// `.rodata`: read only.
    ReadOnlyMapValue,
    /// Kernel memory the program does not own: the task, its saved registers, `struct
    /// sock`. Read only.
    Kernel,
    /// A ring buffer record reserved and not yet submitted.
    RingRecord,
    /// The traced process's memory: only `bpf_probe_read_user` reads it.
    User,
}

impl RegionKind {
    /// Whether a program may write here (by a store, or by a helper into a buffer it
    /// passes): the verifier allows nothing else.
    fn writable(self) -> bool {
        matches!(self, Self::Stack | Self::MapValue | Self::RingRecord)
    }
}

struct Region {
    kind: RegionKind,
    name: String,
    bytes: Vec<u8>,
}

/// A flat address space of regions, each with a guard page after it so that an access
/// past its end fails instead of landing in the next one.
#[derive(Default)]
struct Memory {
    regions: BTreeMap<u64, Region>,
    kernel_used: u64,
    user_used: u64,
}

impl Memory {
    fn map(&mut self, kind: RegionKind, name: impl Into<String>, bytes: Vec<u8>) -> u64 {
        let (base, used) = if kind == RegionKind::User {
            (USER_BASE, &mut self.user_used)
        } else {
            (KERNEL_BASE, &mut self.kernel_used)
        };
        let address = base + *used;
        *used += (bytes.len() as u64).div_ceil(PAGE).max(1) * PAGE + PAGE;
        self.regions.insert(
            address,
            Region {
                kind,
                name: name.into(),
                bytes,
            },
        );
        address
    }

    fn unmap(&mut self, address: u64) {
        self.regions.remove(&address);
    }

    /// The region holding all of `[address, address + len)`, and where in it.
    fn find(&self, address: u64, len: usize) -> Option<(&Region, usize)> {
        let (&base, region) = self.regions.range(..=address).next_back()?;
        let start = usize::try_from(address - base).ok()?;
        (start.checked_add(len)? <= region.bytes.len()).then_some((region, start))
    }

    fn find_mut(&mut self, address: u64, len: usize) -> Option<(&mut Region, usize)> {
        let (&base, region) = self.regions.range_mut(..=address).next_back()?;
        let start = usize::try_from(address - base).ok()?;
        (start.checked_add(len)? <= region.bytes.len()).then_some((region, start))
    }

    /// Bytes in any region (what the kernel itself can read).
    fn read(&self, address: u64, len: usize) -> Result<&[u8]> {
        let (region, start) = self
            .find(address, len)
            .with_context(|| format!("{len} bytes at {address:#x} lie outside every region"))?;
        Ok(&region.bytes[start..start + len])
    }

    /// Bytes in any region, whether or not programs may write it (what the kernel itself
    /// can write: map updates, ring records).
    fn write(&mut self, address: u64, data: &[u8]) -> Result<()> {
        let (region, start) = self.find_mut(address, data.len()).with_context(|| {
            format!(
                "{} bytes at {address:#x} lie outside every region",
                data.len()
            )
        })?;
        region.bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// A program's load: anywhere but the process's memory.
    fn program_load(&self, address: u64, size: usize) -> Result<u64> {
        let (region, start) = self
            .find(address, size)
            .with_context(|| format!("{size}-byte load from {address:#x}, outside every region"))?;
        ensure!(
            region.kind != RegionKind::User,
            "{size}-byte load from {address:#x} in user memory ({}): only \
             bpf_probe_read_user may read it",
            region.name
        );
        let mut word = [0u8; 8];
        word[..size].copy_from_slice(&region.bytes[start..start + size]);
        Ok(u64::from_le_bytes(word))
    }

    /// A program's store, or a helper's write into a buffer the program passed.
    fn program_write(&mut self, address: u64, data: &[u8]) -> Result<()> {
        let (region, start) = self.find_mut(address, data.len()).with_context(|| {
            format!(
                "{}-byte write to {address:#x}, outside every region",
                data.len()
            )
        })?;
        ensure!(
            region.kind.writable(),
            "{}-byte write to {address:#x} in {} ({:?}), which programs may not write",
            data.len(),
            region.name,
            region.kind
        );
        region.bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn program_store(&mut self, address: u64, size: usize, value: u64) -> Result<()> {
        self.program_write(address, &value.to_le_bytes()[..size])
    }

    /// Whether all of `[address, address + len)` is in a region of kind `user` or not.
    fn is_readable_as(&self, address: u64, len: usize, user: bool) -> bool {
        self.find(address, len)
            .is_some_and(|(region, _)| (region.kind == RegionKind::User) == user)
    }
}

// ---------------------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MapKind {
    Array,
    PerCpuArray,
    Hash,
    LruHash,
    PerCpuHash,
    LruPerCpuHash,
    RingBuf,
}

impl MapKind {
    /// From `enum bpf_map_type` (include/uapi/linux/bpf.h).
    fn from_type(map_type: u32) -> Option<Self> {
        Some(match map_type {
            1 => Self::Hash,
            2 => Self::Array,
            5 => Self::PerCpuHash,
            6 => Self::PerCpuArray,
            9 => Self::LruHash,
            10 => Self::LruPerCpuHash,
            27 => Self::RingBuf,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Array => "Array",
            Self::PerCpuArray => "PerCpuArray",
            Self::Hash => "Hash",
            Self::LruHash => "LruHash",
            Self::PerCpuHash => "PerCpuHash",
            Self::LruPerCpuHash => "LruPerCpuHash",
            Self::RingBuf => "RingBuf",
        }
    }

    fn is_lru(self) -> bool {
        matches!(self, Self::LruHash | Self::LruPerCpuHash)
    }
}

/// A map's contents. Per-CPU maps hold one CPU's values: every program here runs on CPU 0.
enum MapStorage {
    /// Every element in one region, element `i` at `base + i * stride`.
    Array { base: u64, stride: usize },
    Hash {
        entries: BTreeMap<Vec<u8>, HashEntry>,
        /// Advances at every use, for LRU eviction.
        clock: u64,
    },
    RingBuf {
        submitted: Vec<Vec<u8>>,
        /// Records reserved and not yet submitted or discarded.
        reserved: BTreeSet<u64>,
    },
}

struct HashEntry {
    value: u64,
    last_use: u64,
}

/// A map's contents as user space would dump them, to compare before and after a step.
#[derive(Debug, PartialEq, Eq)]
enum MapContents {
    Values(Vec<u8>),
    Entries(Vec<(Vec<u8>, Vec<u8>)>),
    Records(Vec<Vec<u8>>),
}

/// Map flags (`BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`) and errno values helpers return.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;
const ENOENT: i64 = 2;
const E2BIG: i64 = 7;
const EFAULT: i64 = 14;
const EEXIST: i64 = 17;
const EINVAL: i64 = 22;

// ---------------------------------------------------------------------------------------
// The host: the kernel state the programs see
// ---------------------------------------------------------------------------------------

/// Who is on the CPU when a socket tracepoint fires.
#[derive(Clone, Copy, Debug)]
struct Process {
    tgid: u32,
    tid: u32,
    cgroup_id: u64,
    comm: [u8; 16],
}

/// The head of `struct sock_common` (include/net/sock.h), as `SockCommonHead` in the
/// programs reads it: for an open TCP connection over IPv4.
struct SocketHead {
    peer: [u8; 4],
    peer_port: u16,
    local: [u8; 4],
    local_port: u16,
}

/// `sizeof(struct tcp_sock)` is about 2 KiB: room for every field the programs may read.
const SOCK_SIZE: usize = 2048;
const AF_INET: u16 = 2;
const TCP_ESTABLISHED_STATE: u8 = 1;

/// The socket syscalls the scenarios make (arch/x86/entry/syscalls/syscall_64.tbl).
#[derive(Clone, Copy, Debug)]
enum Syscall {
    Read,
    Write,
    Writev,
}

impl Syscall {
    fn number(self) -> u64 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Writev => 20,
        }
    }
}

/// Words of x86-64's `struct pt_regs` (arch/x86/include/asm/ptrace.h).
mod pt_regs {
    pub const WORDS: usize = 21;
    pub const AX: usize = 10;
    pub const DX: usize = 12;
    pub const SI: usize = 13;
    pub const DI: usize = 14;
    pub const ORIG_AX: usize = 15;
    pub const CS: usize = 17;
    pub const SS: usize = 20;
    /// `__USER_CS` and `__USER_DS`: a 64-bit task.
    pub const USER_CS: u64 = 0x33;
    pub const USER_DS: u64 = 0x2b;
}

/// A read buffer is larger than what a receive returns, and a written response lies in a
/// larger allocation: the bytes go at the start of a whole page of the process's memory,
/// so reads of a fixed length past their end succeed, as they do in a real process.
const USER_BUFFER_SIZE: usize = PAGE as usize;
/// The fd the scenarios' syscalls name (the programs never look at it).
const SOCKET_FD: u64 = 7;
const ENOSYS: i64 = 38;

struct Host<'o> {
    object: &'o AgentObject,
    memory: Memory,
    maps: Vec<MapStorage>,
    /// Hash values deleted while a program runs, unmapped once it returns: the kernel
    /// frees them only after an RCU grace period, so a program may still read them.
    retired: Vec<u64>,
    current: Process,
    task: u64,
    saved_registers: u64,
    now_nanos: u64,
    random_state: u32,
}

impl<'o> Host<'o> {
    fn new(object: &'o AgentObject) -> Result<Self> {
        let mut memory = Memory::default();
        let mut maps = Vec::with_capacity(object.maps.len());
        for definition in &object.maps {
            let storage = match definition.kind {
                MapKind::Array | MapKind::PerCpuArray => {
                    // As the kernel lays out array elements.
                    let stride = definition.value_size.next_multiple_of(8);
                    let mut values = vec![0; stride * definition.max_entries as usize];
                    ensure!(
                        definition.initial.len() <= values.len(),
                        "map {}: {} bytes of initial data for {} of values",
                        definition.name,
                        definition.initial.len(),
                        values.len()
                    );
                    values[..definition.initial.len()].copy_from_slice(&definition.initial);
                    let kind = if definition.read_only {
                        RegionKind::ReadOnlyMapValue
                    } else {
                        RegionKind::MapValue
                    };
                    let base = memory.map(kind, format!("{} values", definition.name), values);
                    MapStorage::Array { base, stride }
                }
                MapKind::Hash | MapKind::LruHash | MapKind::PerCpuHash | MapKind::LruPerCpuHash => {
                    MapStorage::Hash {
                        entries: BTreeMap::new(),
                        clock: 0,
                    }
                }
                MapKind::RingBuf => MapStorage::RingBuf {
                    submitted: Vec::new(),
                    reserved: BTreeSet::new(),
                },
            };
            maps.push(storage);
        }
        // The programs only hand the task to bpf_task_pt_regs: a zeroed page will do.
        let task = memory.map(RegionKind::Kernel, "task_struct", vec![0; PAGE as usize]);
        let saved_registers =
            memory.map(RegionKind::Kernel, "pt_regs", vec![0; pt_regs::WORDS * 8]);
        Ok(Self {
            object,
            memory,
            maps,
            retired: Vec::new(),
            current: SELECTED,
            task,
            saved_registers,
            now_nanos: BOOT_CLOCK,
            random_state: 0x2545_f491,
        })
    }

    /// What the agent writes when it configures capture (`KernelCapture::configure`): the
    /// settings, and each traced cgroup's rule and slot. Maps the object does not have
    /// are skipped.
    fn configure(&mut self, settings: &AgentSettings, traced: &[(u64, CgroupRule)]) -> Result<()> {
        self.update_from_user("SETTINGS", &0u32, settings)?;
        let mut slots: BTreeMap<u32, u64> = BTreeMap::new();
        for (cgroup_id, rule) in traced {
            self.update_from_user("TRACED_CGROUPS", cgroup_id, rule)?;
            slots
                .entry(cgroup_slot(*cgroup_id))
                .and_modify(|slot| *slot = CGROUP_SLOT_SHARED)
                .or_insert(*cgroup_id);
        }
        for (slot, value) in slots {
            self.update_from_user("TRACED_CGROUP_SLOTS", &slot, &value)?;
        }
        Ok(())
    }

    /// A user-space `bpf_map_update_elem(BPF_ANY)`; nothing when the object has no such map.
    fn update_from_user<K: Pod, V: Pod>(&mut self, name: &str, key: &K, value: &V) -> Result<()> {
        let Some(map) = self.object.map_index(name) else {
            return Ok(());
        };
        let definition = &self.object.maps[map];
        ensure!(
            definition.key_size == size_of::<K>() && definition.value_size == size_of::<V>(),
            "map {name} has {}-byte keys and {}-byte values, but the agent's types are {} and \
             {} bytes: the object and the common crate disagree",
            definition.key_size,
            definition.value_size,
            size_of::<K>(),
            size_of::<V>()
        );
        let result = self.update(map, bytes_of(key), bytes_of(value), BPF_ANY)?;
        ensure!(result == 0, "updating map {name} failed with {result}");
        Ok(())
    }

    fn switch_to(&mut self, process: Process) {
        self.current = process;
    }

    /// A new kernel socket, an open TCP connection: its address (what the tracepoints pass).
    fn open_socket(&mut self, head: &SocketHead) -> u64 {
        let mut sock = vec![0u8; SOCK_SIZE];
        // skc_daddr, skc_rcv_saddr (network order), skc_dport (network order), skc_num
        // (host order), skc_family, skc_state.
        sock[0..4].copy_from_slice(&head.peer);
        sock[4..8].copy_from_slice(&head.local);
        sock[12..14].copy_from_slice(&head.peer_port.to_be_bytes());
        sock[14..16].copy_from_slice(&head.local_port.to_ne_bytes());
        sock[16..18].copy_from_slice(&AF_INET.to_ne_bytes());
        sock[18] = TCP_ESTABLISHED_STATE;
        self.memory.map(RegionKind::Kernel, "struct sock", sock)
    }

    /// The current task enters `syscall` on `bytes` (placed in its memory): what the
    /// registers it saved on entry hold when the socket tracepoint fires.
    fn enter_syscall(&mut self, syscall: Syscall, bytes: &[u8]) -> Result<()> {
        let data = self.map_user(bytes)?;
        let (argument, count) = match syscall {
            Syscall::Read | Syscall::Write => (data, bytes.len() as u64),
            Syscall::Writev => {
                // One `struct iovec { void *iov_base; size_t iov_len; }`.
                let mut iovec = data.to_le_bytes().to_vec();
                iovec.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                (self.map_user(&iovec)?, 1)
            }
        };
        let mut words = [0u64; pt_regs::WORDS];
        words[pt_regs::DI] = SOCKET_FD;
        words[pt_regs::SI] = argument;
        words[pt_regs::DX] = count;
        words[pt_regs::ORIG_AX] = syscall.number();
        // The entry code sets ax to -ENOSYS until the syscall returns.
        words[pt_regs::AX] = (-ENOSYS) as u64;
        words[pt_regs::CS] = pt_regs::USER_CS;
        words[pt_regs::SS] = pt_regs::USER_DS;
        let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
        self.memory.write(self.saved_registers, &bytes)
    }

    fn map_user(&mut self, bytes: &[u8]) -> Result<u64> {
        ensure!(
            bytes.len() <= USER_BUFFER_SIZE,
            "{} bytes do not fit a user buffer",
            bytes.len()
        );
        let mut buffer = vec![0u8; USER_BUFFER_SIZE];
        buffer[..bytes.len()].copy_from_slice(bytes);
        Ok(self.memory.map(RegionKind::User, "user buffer", buffer))
    }

    // -- Inspection, as user space would read the maps -----------------------------------

    /// The value of `key` in the map `name`, if both exist.
    fn value_of(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(map) = self.object.map_index(name) else {
            bail!("the object has no map {name}");
        };
        let MapStorage::Hash { entries, .. } = &self.maps[map] else {
            bail!("map {name} is not a hash map");
        };
        let Some(entry) = entries.get(key) else {
            return Ok(None);
        };
        let value_size = self.object.maps[map].value_size;
        Ok(Some(self.memory.read(entry.value, value_size)?.to_vec()))
    }

    fn connection(&self, socket: u64) -> Result<Option<Connection>> {
        self.value_of("CONNECTIONS", &socket.to_ne_bytes())?
            .map(|value| from_bytes::<Connection>(&value).context("a CONNECTIONS value"))
            .transpose()
    }

    /// Requests counted so far: records in the `REQUESTS` ring buffer, or when the object
    /// counts in the kernel, the counts in `SERIES`.
    fn requests_counted(&self) -> Result<u64> {
        if let Some(map) = self.object.map_index("REQUESTS") {
            let MapStorage::RingBuf { submitted, .. } = &self.maps[map] else {
                bail!("REQUESTS is not a ring buffer");
            };
            return Ok(submitted.len() as u64);
        }
        if let Some(map) = self.object.map_index("SERIES") {
            let MapStorage::Hash { entries, .. } = &self.maps[map] else {
                bail!("SERIES is not a hash map");
            };
            let count_at = offset_of!(SeriesTotals, count);
            let mut count = 0;
            for entry in entries.values() {
                let bytes = self.memory.read(entry.value + count_at as u64, 8)?;
                count += from_bytes::<u64>(bytes)?;
            }
            return Ok(count);
        }
        bail!(
            "the object has neither a REQUESTS ring buffer nor a SERIES map: where does it count \
             a finished request? (update `Host::requests_counted`)"
        )
    }

    /// Every map's contents, by name.
    fn map_contents(&self) -> BTreeMap<&'o str, MapContents> {
        let object = self.object;
        let mut contents = BTreeMap::new();
        for (definition, storage) in object.maps.iter().zip(&self.maps) {
            let dump = match storage {
                MapStorage::Array { base, stride } => MapContents::Values(
                    self.memory
                        .read(*base, stride * definition.max_entries as usize)
                        .map(<[u8]>::to_vec)
                        .unwrap_or_default(),
                ),
                MapStorage::Hash { entries, .. } => MapContents::Entries(
                    entries
                        .iter()
                        .map(|(key, entry)| {
                            let value = self
                                .memory
                                .read(entry.value, definition.value_size)
                                .map(<[u8]>::to_vec)
                                .unwrap_or_default();
                            (key.clone(), value)
                        })
                        .collect(),
                ),
                MapStorage::RingBuf { submitted, .. } => MapContents::Records(submitted.clone()),
            };
            contents.insert(definition.name.as_str(), dump);
        }
        contents
    }

    // -- Maps, as the kernel implements them ---------------------------------------------

    fn lookup(&mut self, map: usize, key: &[u8]) -> Result<Option<u64>> {
        let definition = &self.object.maps[map];
        match &mut self.maps[map] {
            MapStorage::Array { base, stride } => {
                let index = u32::from_ne_bytes(key.try_into()?);
                Ok((index < definition.max_entries)
                    .then(|| *base + u64::from(index) * *stride as u64))
            }
            MapStorage::Hash { entries, clock } => {
                *clock += 1;
                Ok(entries.get_mut(key).map(|entry| {
                    entry.last_use = *clock;
                    entry.value
                }))
            }
            MapStorage::RingBuf { .. } => bail!("lookup in ring buffer {}", definition.name),
        }
    }

    /// `bpf_map_update_elem`: 0 or a negative errno.
    fn update(&mut self, map: usize, key: &[u8], value: &[u8], flags: u64) -> Result<i64> {
        let definition = &self.object.maps[map];
        ensure!(
            key.len() == definition.key_size && value.len() == definition.value_size,
            "update of map {} with a {}-byte key and a {}-byte value",
            definition.name,
            key.len(),
            value.len()
        );
        if flags > BPF_EXIST {
            return Ok(-EINVAL);
        }
        let address = match &mut self.maps[map] {
            MapStorage::Array { base, stride } => {
                let index = u32::from_ne_bytes(key.try_into()?);
                if index >= definition.max_entries {
                    return Ok(-E2BIG);
                }
                if flags == BPF_NOEXIST {
                    return Ok(-EEXIST);
                }
                *base + u64::from(index) * *stride as u64
            }
            MapStorage::Hash { entries, clock } => {
                *clock += 1;
                if let Some(entry) = entries.get_mut(key) {
                    if flags == BPF_NOEXIST {
                        return Ok(-EEXIST);
                    }
                    entry.last_use = *clock;
                    entry.value
                } else {
                    if flags == BPF_EXIST {
                        return Ok(-ENOENT);
                    }
                    if entries.len() >= definition.max_entries as usize {
                        if !definition.kind.is_lru() {
                            return Ok(-E2BIG);
                        }
                        let oldest = entries
                            .iter()
                            .min_by_key(|(_, entry)| entry.last_use)
                            .map(|(key, entry)| (key.clone(), entry.value));
                        if let Some((key, value)) = oldest {
                            entries.remove(&key);
                            self.retired.push(value);
                        }
                    }
                    let value_address = self.memory.map(
                        RegionKind::MapValue,
                        format!("{} value", definition.name),
                        vec![0; definition.value_size],
                    );
                    entries.insert(
                        key.to_vec(),
                        HashEntry {
                            value: value_address,
                            last_use: *clock,
                        },
                    );
                    value_address
                }
            }
            MapStorage::RingBuf { .. } => bail!("update of ring buffer {}", definition.name),
        };
        self.memory.write(address, value)?;
        Ok(0)
    }

    /// `bpf_map_delete_elem`: 0 or a negative errno.
    fn delete(&mut self, map: usize, key: &[u8]) -> Result<i64> {
        let definition = &self.object.maps[map];
        match &mut self.maps[map] {
            MapStorage::Array { .. } => Ok(-EINVAL),
            MapStorage::Hash { entries, .. } => match entries.remove(key) {
                Some(entry) => {
                    self.retired.push(entry.value);
                    Ok(0)
                }
                None => Ok(-ENOENT),
            },
            MapStorage::RingBuf { .. } => bail!("delete from ring buffer {}", definition.name),
        }
    }

    /// The map a reference (what ld_imm64 of a map loads) names.
    fn map_of_reference(&self, reference: u64) -> Result<usize> {
        let index = reference
            .checked_sub(MAP_REFERENCE_BASE)
            .map(|offset| offset / PAGE)
            .and_then(|index| usize::try_from(index).ok())
            .filter(|index| *index < self.maps.len() && reference.is_multiple_of(PAGE));
        index.with_context(|| format!("{reference:#x} is not a map reference"))
    }

    fn map_number_to_index(&self, number: i32) -> Result<usize> {
        usize::try_from(number - FIRST_MAP_NUMBER)
            .ok()
            .filter(|index| *index < self.maps.len())
            .with_context(|| format!("ld_imm64 names map number {number}, which does not exist"))
    }

    // -- Running a program ---------------------------------------------------------------

    /// Runs `program` as its raw tracepoint would, with these arguments.
    fn run(&mut self, program: &str, args: &[u64]) -> Result<Execution> {
        let code = self.object.program(program)?;
        let context = self.memory.map(
            RegionKind::Context,
            "raw tracepoint arguments",
            args.iter().flat_map(|arg| arg.to_le_bytes()).collect(),
        );
        let result = self.interpret(code, context);
        self.memory.unmap(context);
        for value in std::mem::take(&mut self.retired) {
            self.memory.unmap(value);
        }
        result.with_context(|| format!("running {program}"))
    }

    fn interpret(&mut self, program: &Program, context: u64) -> Result<Execution> {
        let code = program.instructions.as_slice();
        let mut registers = [0u64; REGISTERS];
        let mut frames: Vec<Frame> = Vec::new();
        let mut stack = self.map_stack_frame(0);
        registers[1] = context;
        registers[FRAME_POINTER] = stack + STACK_SIZE as u64;
        let mut execution = Execution::default();
        let mut pc = 0;
        loop {
            let instruction = *code.get(pc).with_context(|| {
                format!(
                    "ran off the end of the program ({} instructions)",
                    code.len()
                )
            })?;
            execution.instructions += 1;
            if let Some(frame) = frames.last()
                && let Some(calls) = execution.subprogram_calls.get_mut(&frame.callee)
            {
                calls.instructions += 1;
            }
            ensure!(
                execution.instructions <= INSTRUCTION_LIMIT,
                "more than {INSTRUCTION_LIMIT} instructions: a runaway loop"
            );
            let step = self.execute(code, pc, instruction, &mut registers, &mut execution);
            let next = step.with_context(|| {
                format!(
                    "at instruction {pc} (code {:#04x}, dst r{}, src r{}, offset {}, imm {})",
                    instruction.code,
                    instruction.dst,
                    instruction.src,
                    instruction.offset,
                    instruction.imm
                )
            })?;
            pc = match next {
                Next::At(next) => next,
                Next::Call(target) => {
                    ensure!(
                        frames.len() + 1 < MAX_CALL_DEPTH,
                        "BPF-to-BPF calls nested deeper than {MAX_CALL_DEPTH}"
                    );
                    let callee = program
                        .callees
                        .get(&target)
                        .cloned()
                        .unwrap_or_else(|| format!("function at {target}"));
                    execution
                        .subprogram_calls
                        .entry(callee.clone())
                        .or_default()
                        .calls += 1;
                    frames.push(Frame {
                        callee,
                        return_pc: pc + 1,
                        saved: [
                            registers[6],
                            registers[7],
                            registers[8],
                            registers[9],
                            registers[FRAME_POINTER],
                        ],
                        stack,
                    });
                    stack = self.map_stack_frame(frames.len());
                    registers[FRAME_POINTER] = stack + STACK_SIZE as u64;
                    target
                }
                Next::Exit => {
                    let Some(caller) = frames.pop() else {
                        // The return value: tracepoint programs' is ignored by the kernel.
                        self.memory.unmap(stack);
                        return Ok(execution);
                    };
                    self.memory.unmap(stack);
                    stack = caller.stack;
                    registers[6..=FRAME_POINTER].copy_from_slice(&caller.saved);
                    caller.return_pc
                }
            };
        }
    }

    fn map_stack_frame(&mut self, depth: usize) -> u64 {
        self.memory.map(
            RegionKind::Stack,
            format!("stack frame {depth}"),
            vec![0; STACK_SIZE],
        )
    }

    /// Executes one instruction; says where to go next.
    fn execute(
        &mut self,
        code: &[Instruction],
        pc: usize,
        instruction: Instruction,
        registers: &mut [u64; REGISTERS],
        execution: &mut Execution,
    ) -> Result<Next> {
        let Instruction {
            code: opcode,
            dst,
            src,
            offset,
            imm,
        } = instruction;
        let class = opcode & 0x07;
        let writes_dst = matches!(class, BPF_ALU | BPF_ALU64 | BPF_LDX | BPF_LD);
        ensure!(
            !(writes_dst && dst == FRAME_POINTER),
            "writes r10, the read-only frame pointer"
        );
        let next = Next::At(pc + 1);
        match class {
            BPF_ALU64 | BPF_ALU => {
                let op = opcode & 0xf0;
                let source = if opcode & BPF_X != 0 {
                    registers[src]
                } else {
                    imm as i64 as u64
                };
                registers[dst] = if op == BPF_END {
                    byte_order(class, opcode & BPF_X != 0, registers[dst], imm)?
                } else if class == BPF_ALU64 {
                    alu64(op, registers[dst], source, offset)?
                } else {
                    u64::from(alu32(op, registers[dst] as u32, source as u32, offset)?)
                };
                Ok(next)
            }
            BPF_JMP | BPF_JMP32 => {
                let op = opcode & 0xf0;
                match op {
                    BPF_JA => {
                        // JMP32 | JA ("gotol") takes its offset from the immediate.
                        let jump = if class == BPF_JMP32 {
                            i64::from(imm)
                        } else {
                            i64::from(offset)
                        };
                        Ok(Next::At(jump_target(pc, jump, code.len())?))
                    }
                    BPF_CALL if class == BPF_JMP => {
                        if src == BPF_PSEUDO_CALL {
                            return Ok(Next::Call(jump_target(pc, i64::from(imm), code.len())?));
                        }
                        ensure!(src == 0, "call kind {src} (a kfunc?) is not modelled");
                        let name = helper_name(imm).with_context(|| {
                            format!("helper id {imm} is not modelled: add it to `call_helper`")
                        })?;
                        *execution.helper_calls.entry(name).or_default() += 1;
                        registers[0] = self
                            .call_helper(imm, registers, execution)
                            .with_context(|| format!("in helper {name} (id {imm})"))?;
                        Ok(next)
                    }
                    BPF_EXIT if class == BPF_JMP => Ok(Next::Exit),
                    _ => {
                        let source = if opcode & BPF_X != 0 {
                            registers[src]
                        } else {
                            imm as i64 as u64
                        };
                        if jump_taken(op, registers[dst], source, class == BPF_JMP)? {
                            Ok(Next::At(jump_target(pc, i64::from(offset), code.len())?))
                        } else {
                            Ok(next)
                        }
                    }
                }
            }
            BPF_LDX => {
                let size = access_size(opcode);
                let address = registers[src].wrapping_add(offset as i64 as u64);
                let value = self.memory.program_load(address, size)?;
                registers[dst] = match opcode & 0xe0 {
                    BPF_MEM => value,
                    BPF_MEMSX => match size {
                        1 => value as i8 as i64 as u64,
                        2 => value as i16 as i64 as u64,
                        4 => value as i32 as i64 as u64,
                        _ => bail!("sign-extending load of {size} bytes"),
                    },
                    mode => bail!("load mode {mode:#04x}"),
                };
                Ok(next)
            }
            BPF_ST | BPF_STX => {
                let size = access_size(opcode);
                let address = registers[dst].wrapping_add(offset as i64 as u64);
                match opcode & 0xe0 {
                    BPF_MEM => {
                        let value = if class == BPF_STX {
                            registers[src]
                        } else {
                            imm as i64 as u64
                        };
                        self.memory.program_store(address, size, value)?;
                    }
                    BPF_ATOMIC if class == BPF_STX => {
                        self.atomic(size, instruction, registers)?;
                    }
                    mode => bail!("store mode {mode:#04x}"),
                }
                Ok(next)
            }
            BPF_LD => {
                ensure!(
                    opcode == BPF_LD | BPF_IMM | BPF_DW,
                    "legacy packet load {opcode:#04x}"
                );
                let high = code
                    .get(pc + 1)
                    .context("ld_imm64 without its second half")?
                    .imm;
                registers[dst] = match src {
                    0 => u64::from(imm as u32) | (u64::from(high as u32) << 32),
                    BPF_PSEUDO_MAP_FD => {
                        MAP_REFERENCE_BASE + self.map_number_to_index(imm)? as u64 * PAGE
                    }
                    BPF_PSEUDO_MAP_VALUE => {
                        let map = self.map_number_to_index(imm)?;
                        let MapStorage::Array { base, .. } = self.maps[map] else {
                            bail!(
                                "a map value reference to {}, not an array",
                                self.object.maps[map].name
                            );
                        };
                        base + u64::from(high as u32)
                    }
                    kind => bail!("ld_imm64 of kind {kind} is not modelled"),
                };
                // One instruction in two slots: counted once, as the kernel runs it.
                Ok(Next::At(pc + 2))
            }
            _ => bail!("unknown instruction class {class:#x}"),
        }
    }

    /// `BPF_STX | BPF_ATOMIC`: the operation is the immediate.
    fn atomic(
        &mut self,
        size: usize,
        instruction: Instruction,
        registers: &mut [u64; REGISTERS],
    ) -> Result<()> {
        let Instruction {
            dst,
            src,
            offset,
            imm: operation,
            ..
        } = instruction;
        ensure!(size == 4 || size == 8, "atomic operation on {size} bytes");
        let truncate = |value: u64| {
            if size == 4 {
                u64::from(value as u32)
            } else {
                value
            }
        };
        let displaced = |base: u64| base.wrapping_add(offset as i64 as u64);
        if operation == BPF_LOAD_ACQ {
            // The one atomic whose address is in `src` and whose result goes to `dst`.
            ensure!(dst != FRAME_POINTER, "load-acquire into r10");
            registers[dst] = self.memory.program_load(displaced(registers[src]), size)?;
            return Ok(());
        }
        let address = displaced(registers[dst]);
        if operation == BPF_STORE_REL {
            return self.memory.program_store(address, size, registers[src]);
        }
        let old = self.memory.program_load(address, size)?;
        let operand = truncate(registers[src]);
        let new = match operation & !BPF_FETCH {
            _ if operation == BPF_XCHG => operand,
            _ if operation == BPF_CMPXCHG => {
                if truncate(registers[0]) == old {
                    operand
                } else {
                    old
                }
            }
            0x00 => truncate(old.wrapping_add(operand)),
            0x40 => old | operand,
            0x50 => old & operand,
            0xa0 => old ^ operand,
            _ => bail!("atomic operation {operation:#x}"),
        };
        self.memory.program_store(address, size, new)?;
        if operation == BPF_CMPXCHG {
            registers[0] = old;
        } else if operation & BPF_FETCH != 0 {
            ensure!(src != FRAME_POINTER, "atomic fetch into r10");
            registers[src] = old;
        }
        Ok(())
    }

    // -- Helpers -------------------------------------------------------------------------

    /// Runs helper `id` with r1-r5; its result goes to r0.
    fn call_helper(
        &mut self,
        id: i32,
        registers: &[u64; REGISTERS],
        execution: &mut Execution,
    ) -> Result<u64> {
        let [_, r1, r2, r3, r4, ..] = *registers;
        let status = |result: i64| result as u64;
        Ok(match id {
            HELPER_MAP_LOOKUP_ELEM => {
                let map = self.map_of_reference(r1)?;
                *execution
                    .lookups
                    .entry(self.object.maps[map].name.clone())
                    .or_default() += 1;
                let key = self
                    .memory
                    .read(r2, self.object.maps[map].key_size)?
                    .to_vec();
                self.lookup(map, &key)?.unwrap_or(0)
            }
            HELPER_MAP_UPDATE_ELEM => {
                let map = self.map_of_reference(r1)?;
                let definition = &self.object.maps[map];
                let key = self.memory.read(r2, definition.key_size)?.to_vec();
                let value = self.memory.read(r3, definition.value_size)?.to_vec();
                status(self.update(map, &key, &value, r4)?)
            }
            HELPER_MAP_DELETE_ELEM => {
                let map = self.map_of_reference(r1)?;
                let key = self
                    .memory
                    .read(r2, self.object.maps[map].key_size)?
                    .to_vec();
                status(self.delete(map, &key)?)
            }
            HELPER_KTIME_GET_NS | HELPER_KTIME_GET_BOOT_NS | HELPER_KTIME_GET_COARSE_NS => {
                self.now_nanos
            }
            HELPER_GET_PRANDOM_U32 => {
                // xorshift32: deterministic, so every run counts the same instructions.
                let mut state = self.random_state;
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                self.random_state = state;
                u64::from(state)
            }
            HELPER_GET_SMP_PROCESSOR_ID => 0,
            HELPER_GET_CURRENT_PID_TGID => {
                (u64::from(self.current.tgid) << 32) | u64::from(self.current.tid)
            }
            HELPER_GET_CURRENT_UID_GID => 0,
            HELPER_GET_CURRENT_COMM => {
                let size = usize::try_from(r2)?;
                let mut comm = vec![0u8; size];
                let copied = size.saturating_sub(1).min(self.current.comm.len());
                comm[..copied].copy_from_slice(&self.current.comm[..copied]);
                self.memory.program_write(r1, &comm)?;
                0
            }
            HELPER_GET_CURRENT_TASK | HELPER_GET_CURRENT_TASK_BTF => self.task,
            HELPER_GET_CURRENT_CGROUP_ID => self.current.cgroup_id,
            HELPER_TASK_PT_REGS => {
                ensure!(
                    r1 == self.task,
                    "bpf_task_pt_regs of {r1:#x}, not the current task"
                );
                self.saved_registers
            }
            HELPER_PROBE_READ_USER | HELPER_PROBE_READ_KERNEL => {
                let user = id == HELPER_PROBE_READ_USER;
                status(self.probe_read(r1, r2, r3, user)?)
            }
            HELPER_PROBE_READ_USER_STR | HELPER_PROBE_READ_KERNEL_STR => {
                let user = id == HELPER_PROBE_READ_USER_STR;
                status(self.probe_read_str(r1, r2, r3, user)?)
            }
            HELPER_RINGBUF_RESERVE => {
                let map = self.map_of_reference(r1)?;
                // As `__bpf_ringbuf_reserve`: no flags, and the record with its 8-byte header
                // must fit the ring.
                let capacity = u64::from(self.object.maps[map].max_entries);
                if r3 != 0 || r2 == 0 || r2.saturating_add(8) > capacity {
                    return Ok(0);
                }
                let record = self.memory.map(
                    RegionKind::RingRecord,
                    format!("{} record", self.object.maps[map].name),
                    vec![0; usize::try_from(r2)?],
                );
                let MapStorage::RingBuf { reserved, .. } = &mut self.maps[map] else {
                    bail!("ringbuf_reserve on {}", self.object.maps[map].name);
                };
                reserved.insert(record);
                record
            }
            HELPER_RINGBUF_SUBMIT | HELPER_RINGBUF_DISCARD => {
                let submit = id == HELPER_RINGBUF_SUBMIT;
                self.finish_record(r1, submit)?;
                0
            }
            HELPER_RINGBUF_OUTPUT => {
                let map = self.map_of_reference(r1)?;
                let record = self.memory.read(r2, usize::try_from(r3)?)?.to_vec();
                let MapStorage::RingBuf { submitted, .. } = &mut self.maps[map] else {
                    bail!("ringbuf_output to {}", self.object.maps[map].name);
                };
                submitted.push(record);
                0
            }
            HELPER_RINGBUF_QUERY => 0,
            HELPER_MAP_LOOKUP_PERCPU_ELEM => {
                let map = self.map_of_reference(r1)?;
                let key = self
                    .memory
                    .read(r2, self.object.maps[map].key_size)?
                    .to_vec();
                // Only CPU 0 exists here.
                if r3 == 0 {
                    self.lookup(map, &key)?.unwrap_or(0)
                } else {
                    0
                }
            }
            _ => bail!("helper id {id} is not modelled"),
        })
    }

    /// `bpf_probe_read_{user,kernel}(dst, size, src)`: on a fault, zeros and -EFAULT.
    fn probe_read(&mut self, into: u64, size: u64, from: u64, user: bool) -> Result<i64> {
        let size = usize::try_from(size)?;
        let (bytes, result) = if self.memory.is_readable_as(from, size, user) {
            (self.memory.read(from, size)?.to_vec(), 0)
        } else {
            (vec![0; size], -EFAULT)
        };
        self.memory.program_write(into, &bytes)?;
        Ok(result)
    }

    /// `bpf_probe_read_{user,kernel}_str`: the string and its NUL; its length with the NUL.
    fn probe_read_str(&mut self, into: u64, size: u64, from: u64, user: bool) -> Result<i64> {
        let size = usize::try_from(size)?;
        if size == 0 {
            return Ok(0);
        }
        let mut copied = Vec::with_capacity(size);
        while copied.len() < size - 1 {
            let address = from + copied.len() as u64;
            if !self.memory.is_readable_as(address, 1, user) {
                self.memory.program_write(into, &vec![0; size])?;
                return Ok(-EFAULT);
            }
            let byte = self.memory.read(address, 1)?[0];
            if byte == 0 {
                break;
            }
            copied.push(byte);
        }
        copied.push(0);
        self.memory.program_write(into, &copied)?;
        Ok(copied.len() as i64)
    }

    /// Submits or discards a reserved ring buffer record.
    fn finish_record(&mut self, record: u64, submit: bool) -> Result<()> {
        for storage in &mut self.maps {
            if let MapStorage::RingBuf {
                submitted,
                reserved,
            } = storage
                && reserved.remove(&record)
            {
                if submit {
                    let (region, _) = self
                        .memory
                        .find(record, 0)
                        .context("a reserved record is not mapped")?;
                    submitted.push(region.bytes.clone());
                }
                self.memory.unmap(record);
                return Ok(());
            }
        }
        bail!("{record:#x} is no reserved ring buffer record")
    }
}

/// Where the interpreter goes after an instruction.
enum Next {
    At(usize),
    /// A BPF-to-BPF call to this instruction.
    Call(usize),
    Exit,
}

// Helper ids (`enum bpf_func_id`, include/uapi/linux/bpf.h).
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_MAP_UPDATE_ELEM: i32 = 2;
const HELPER_MAP_DELETE_ELEM: i32 = 3;
const HELPER_KTIME_GET_NS: i32 = 5;
const HELPER_GET_PRANDOM_U32: i32 = 7;
const HELPER_GET_SMP_PROCESSOR_ID: i32 = 8;
const HELPER_GET_CURRENT_PID_TGID: i32 = 14;
const HELPER_GET_CURRENT_UID_GID: i32 = 15;
const HELPER_GET_CURRENT_COMM: i32 = 16;
const HELPER_GET_CURRENT_TASK: i32 = 35;
const HELPER_GET_CURRENT_CGROUP_ID: i32 = 80;
const HELPER_PROBE_READ_USER: i32 = 112;
const HELPER_PROBE_READ_KERNEL: i32 = 113;
const HELPER_PROBE_READ_USER_STR: i32 = 114;
const HELPER_PROBE_READ_KERNEL_STR: i32 = 115;
const HELPER_KTIME_GET_BOOT_NS: i32 = 125;
const HELPER_RINGBUF_OUTPUT: i32 = 130;
const HELPER_RINGBUF_RESERVE: i32 = 131;
const HELPER_RINGBUF_SUBMIT: i32 = 132;
const HELPER_RINGBUF_DISCARD: i32 = 133;
const HELPER_RINGBUF_QUERY: i32 = 134;
const HELPER_GET_CURRENT_TASK_BTF: i32 = 158;
const HELPER_KTIME_GET_COARSE_NS: i32 = 160;
const HELPER_TASK_PT_REGS: i32 = 175;
const HELPER_MAP_LOOKUP_PERCPU_ELEM: i32 = 195;

/// The name of a modelled helper.
fn helper_name(id: i32) -> Option<&'static str> {
    Some(match id {
        HELPER_MAP_LOOKUP_ELEM => "map_lookup_elem",
        HELPER_MAP_UPDATE_ELEM => "map_update_elem",
        HELPER_MAP_DELETE_ELEM => "map_delete_elem",
        HELPER_KTIME_GET_NS => "ktime_get_ns",
        HELPER_GET_PRANDOM_U32 => "get_prandom_u32",
        HELPER_GET_SMP_PROCESSOR_ID => "get_smp_processor_id",
        HELPER_GET_CURRENT_PID_TGID => "get_current_pid_tgid",
        HELPER_GET_CURRENT_UID_GID => "get_current_uid_gid",
        HELPER_GET_CURRENT_COMM => "get_current_comm",
        HELPER_GET_CURRENT_TASK => "get_current_task",
        HELPER_GET_CURRENT_CGROUP_ID => "get_current_cgroup_id",
        HELPER_PROBE_READ_USER => "probe_read_user",
        HELPER_PROBE_READ_KERNEL => "probe_read_kernel",
        HELPER_PROBE_READ_USER_STR => "probe_read_user_str",
        HELPER_PROBE_READ_KERNEL_STR => "probe_read_kernel_str",
        HELPER_KTIME_GET_BOOT_NS => "ktime_get_boot_ns",
        HELPER_RINGBUF_OUTPUT => "ringbuf_output",
        HELPER_RINGBUF_RESERVE => "ringbuf_reserve",
        HELPER_RINGBUF_SUBMIT => "ringbuf_submit",
        HELPER_RINGBUF_DISCARD => "ringbuf_discard",
        HELPER_RINGBUF_QUERY => "ringbuf_query",
        HELPER_GET_CURRENT_TASK_BTF => "get_current_task_btf",
        HELPER_KTIME_GET_COARSE_NS => "ktime_get_coarse_ns",
        HELPER_TASK_PT_REGS => "task_pt_regs",
        HELPER_MAP_LOOKUP_PERCPU_ELEM => "map_lookup_percpu_elem",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Plain old data
// ---------------------------------------------------------------------------------------

fn bytes_of<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: `Pod` types are plain old data without implicit padding, so every one of
    // their `size_of::<T>()` bytes is initialised.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

fn from_bytes<T: Pod>(bytes: &[u8]) -> Result<T> {
    ensure!(
        bytes.len() == size_of::<T>(),
        "{} bytes where a {} of {} bytes was expected: the object and the common crate disagree",
        bytes.len(),
        std::any::type_name::<T>(),
        size_of::<T>()
    );
    // SAFETY: the length is checked, and any bit pattern is a valid `Pod` value.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_takes_its_path_and_executes_instructions() -> Result<()> {
        let object = AgentObject::parse(agent_object())?;
        let measurements = run_scenarios(&object)?;
        for program in PROGRAMS {
            ensure!(
                measurements.iter().any(|m| m.program == program),
                "no scenario ran {program}"
            );
        }
        for measurement in &measurements {
            ensure!(
                measurement.execution.instructions > 0,
                "{} / {}: no instruction executed",
                measurement.scenario,
                measurement.step
            );
        }
        Ok(())
    }

    #[test]
    fn runs_are_deterministic() -> Result<()> {
        let object = AgentObject::parse(agent_object())?;
        let counts = |measurements: Vec<Measurement>| {
            measurements
                .into_iter()
                .map(|m| (m.step, m.execution.instructions, m.execution.helper_calls))
                .collect::<Vec<_>>()
        };
        ensure!(counts(run_scenarios(&object)?) == counts(run_scenarios(&object)?));
        Ok(())
    }

    #[test]
    fn alu_follows_the_isa_edge_cases() -> Result<()> {
        ensure!(alu64(BPF_DIV, 7, 0, 0)? == 0, "division by zero gives 0");
        ensure!(alu64(BPF_MOD, 7, 0, 0)? == 7, "modulo by zero leaves dst");
        ensure!(alu32(BPF_MOD, 7, 0, 0)? == 7);
        ensure!(
            alu64(BPF_DIV, (-7i64) as u64, 2, 1)? == (-3i64) as u64,
            "sdiv truncates"
        );
        ensure!(alu64(BPF_ARSH, (-8i64) as u64, 1, 0)? == (-4i64) as u64);
        ensure!(alu32(BPF_ARSH, (-8i32) as u32, 1, 0)? == (-4i32) as u32);
        ensure!(alu64(BPF_LSH, 1, 65, 0)? == 2, "shift amounts are masked");
        ensure!(alu64(BPF_MOV, 0x80, 0x80, 8)? == (-128i64) as u64, "movsx");
        ensure!(
            byte_order(BPF_ALU, true, 0x1234, 16)? == 0x3412,
            "to big endian"
        );
        ensure!(
            byte_order(BPF_ALU, false, 0xffff_1234, 16)? == 0x1234,
            "to little endian"
        );
        ensure!(
            jump_taken(BPF_JSGT, 1, (-1i64) as u64, true)?,
            "signed compare"
        );
        ensure!(
            !jump_taken(BPF_JGT, 1, (-1i64) as u64, true)?,
            "unsigned compare"
        );
        ensure!(
            jump_taken(BPF_JEQ, 0xffff_ffff_0000_0001, 1, false)?,
            "jmp32 compares the low halves"
        );
        Ok(())
    }
}
