//! Trazor's eBPF programs: HTTP/1.x request latency from syscall tracepoints, on both
//! sides of a connection.
//!
//! A connection is tracked from the `accept`/`accept4` (server side) or `connect` (client
//! side) that created it to its `close`, in `CONNECTIONS`, keyed by (tgid, fd). Every other
//! hook starts with one lookup there, so untraced processes and non-socket fds cost one map
//! lookup per syscall and nothing else.
//!
//! Server side, a request starts when a read returns bytes that begin with an HTTP method
//! and ends when the write of its status line (`HTTP/1.x NNN`, not a `1xx` interim) returns.
//! Client side, it starts when the process writes a request line and ends when a read
//! returns the status line. The latency is counted right here, into per-CPU maps keyed by
//! window number: `SERIES` (count, sum, min, max) and `HISTOGRAM` (log buckets, see
//! `bucket_index`). User space reads a window once it has closed and deletes its keys. Only
//! exemplars and the first request of each series (to name its route) reach user space,
//! through the `EVENTS` ring buffer.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TracePointContext,
};
use trazor_node_agent_ebpf_common::{
    AgentSettings, BucketKey, Direction, PATH_LEN, RequestEvent, SeriesKey, SeriesTotals,
    bucket_index, drop_reason, event_flag, method, route_hash,
};

/// Connections traced: most hosts have far fewer open connections than this.
const MAX_CONNECTIONS: u32 = 32_768;
/// Threads inside a read, write or connect on a traced connection at one time.
const MAX_SYSCALLS_IN_FLIGHT: u32 = 16_384;
/// Distinct series (cgroup, process, route, peer, method, status class) per open window.
const MAX_SERIES: u32 = 16_384;
/// Non-empty histogram buckets across all series of the open windows.
const MAX_BUCKETS: u32 = 131_072;
/// Ring buffer to user space, bytes (a power of two, multiple of the page size).
const EVENTS_BYTES: u32 = 1 << 20;

#[map]
static SETTINGS: Array<AgentSettings> = Array::with_max_entries(1, 0);

/// cgroup ids to trace when `AgentSettings::trace_all` is 0.
#[map]
static TRACED_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(16_384, 0);

/// LRU: a connection whose `close` we never see (a process that exits closes its fds
/// without the syscall) ages out instead of pinning an entry.
#[map]
static CONNECTIONS: LruHashMap<ConnectionKey, Connection> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// The buffer of a read or write (or the address of a connect) between its syscall's entry
/// and exit, by thread.
#[map]
static SYSCALLS_IN_FLIGHT: LruHashMap<u64, SyscallInFlight> =
    LruHashMap::with_max_entries(MAX_SYSCALLS_IN_FLIGHT, 0);

#[map]
static SERIES: PerCpuHashMap<SeriesKey, SeriesTotals> =
    PerCpuHashMap::with_max_entries(MAX_SERIES, 0);

#[map]
static HISTOGRAM: PerCpuHashMap<BucketKey, u64> = PerCpuHashMap::with_max_entries(MAX_BUCKETS, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per-CPU scratch for the path being captured (too big for the 512-byte BPF stack next to
/// everything else).
#[map]
static PATH_SCRATCH: PerCpuArray<[u8; PEEK_LEN]> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct ConnectionKey {
    tgid: u32,
    fd: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Connection {
    /// `bpf_ktime_get_ns` when the current request started; 0 when idle.
    request_start_nanos: u64,
    /// Server side: when the read that started the last request returned. Requests
    /// pipelined behind it arrived in that read (or just after), so a status line written
    /// on an idle connection answers one of them and is timed from here. 0: none pending.
    batch_start_nanos: u64,
    peer_addr: u32,
    route: u32,
    peer_port: u16,
    direction: u8,
    method: u8,
    path_len: u8,
    _pad: [u8; 3],
    path: [u8; PATH_LEN],
}

/// How the user buffer of a syscall is described by its arguments.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum BufferShape {
    /// `(fd, buf, len)`: read, write, recvfrom, sendto.
    Flat = 0,
    /// `(fd, iov, iovcnt)`: readv, writev.
    IoVec = 1,
    /// `(fd, msghdr, flags)`: recvmsg, sendmsg.
    MsgHdr = 2,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SyscallInFlight {
    fd: u32,
    /// Server side: status code parsed from a response at write entry.
    status: u16,
    shape: u8,
    _pad: u8,
    /// User buffer, or for connect the remote IPv4 address in the low 32 bits.
    buffer: u64,
    /// connect: remote port.
    port: u16,
    _pad2: [u8; 6],
}

/// Offset of the first syscall argument in a `syscalls:sys_enter_*` record (after the common
/// header and `__syscall_nr`), and of `ret` in a `sys_exit_*` record.
const ARGS_OFFSET: usize = 16;
const RET_OFFSET: usize = 16;
/// Bytes of a buffer inspected: "OPTIONS " plus a path of PATH_LEN bytes.
const PEEK_LEN: usize = 8 + PATH_LEN;
const EINPROGRESS: i64 = 115;
const AF_INET: u16 = 2;

#[inline(always)]
fn arg(ctx: &TracePointContext, index: usize) -> Result<u64, i32> {
    // SAFETY: syscall tracepoint records hold six u64 arguments after ARGS_OFFSET.
    unsafe { ctx.read_at::<u64>(ARGS_OFFSET + index * 8) }
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> Result<i64, i32> {
    // SAFETY: every syscall exit record holds `long ret` at RET_OFFSET.
    unsafe { ctx.read_at::<i64>(RET_OFFSET) }
}

#[inline(always)]
fn count_drop(reason: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, and programs do not migrate while running.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn settings() -> Option<AgentSettings> {
    SETTINGS.get(0).copied()
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Whether the current process is to be traced, for a new connection in `direction`.
#[inline(always)]
fn traced(direction: Direction) -> bool {
    let Some(settings) = settings() else {
        return false;
    };
    if settings.window_nanos == 0
        || current_tgid() == settings.agent_tgid
        || settings.directions & (direction as u32) == 0
    {
        return false;
    }
    if settings.trace_all != 0 {
        return true;
    }
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is a plain u8 and only tested for presence.
    unsafe { TRACED_CGROUPS.get(&cgroup_id) }.is_some()
}

/// Remembers a syscall's arguments, by thread, until its exit.
#[inline(always)]
fn remember_syscall(in_flight: &SyscallInFlight) {
    if SYSCALLS_IN_FLIGHT
        .insert(&bpf_get_current_pid_tgid(), in_flight, 0)
        .is_err()
    {
        count_drop(drop_reason::SYSCALL_TABLE_FULL);
    }
}

/// Takes back what `thread`'s syscall entry remembered, if anything.
#[inline(always)]
fn take_syscall(thread: u64) -> Option<SyscallInFlight> {
    // SAFETY: copied out before the entry is removed.
    let in_flight = unsafe { SYSCALLS_IN_FLIGHT.get(&thread) }.copied()?;
    let _ = SYSCALLS_IN_FLIGHT.remove(&thread);
    Some(in_flight)
}

/// The address of the first user buffer a syscall reads into or writes from.
#[inline(always)]
fn first_buffer(shape: u8, buffer: u64) -> Result<u64, i32> {
    if shape == BufferShape::Flat as u8 {
        return Ok(buffer);
    }
    let iovec = if shape == BufferShape::MsgHdr as u8 {
        // struct msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
        // SAFETY: reading user memory through the helper, which checks the address.
        unsafe { bpf_probe_read_user((buffer + 16) as *const u64)? }
    } else {
        buffer
    };
    // struct iovec { void *iov_base; size_t iov_len; }
    // SAFETY: as above.
    unsafe { bpf_probe_read_user(iovec as *const u64) }
}

/// Copies the first PEEK_LEN bytes of the user buffer into the per-CPU scratch; returns
/// them and the buffer's address.
#[inline(always)]
fn peek(shape: u8, buffer: u64) -> Result<(&'static mut [u8; PEEK_LEN], u64), i32> {
    let data = first_buffer(shape, buffer)?;
    if data == 0 {
        return Err(-1);
    }
    let scratch = PATH_SCRATCH.get_ptr_mut(0).ok_or(-1)?;
    // SAFETY: this CPU's scratch slot, used by one program at a time on this CPU.
    let bytes = unsafe { &mut *scratch };
    // A buffer shorter than PEEK_LEN still lies in the process's memory almost always; if
    // not, the read fails and the request is simply not recognised.
    // SAFETY: the helper checks the user address.
    unsafe { bpf_probe_read_user_buf(data as *const u8, bytes)? };
    Ok((bytes, data))
}

/// The method a request starts with and the length of "METHOD ", or None.
#[inline(always)]
fn parse_method(bytes: &[u8; PEEK_LEN]) -> Option<(u8, usize)> {
    let parsed = match &[bytes[0], bytes[1], bytes[2], bytes[3]] {
        b"GET " => (method::GET, 4),
        b"PUT " => (method::PUT, 4),
        b"POST" if bytes[4] == b' ' => (method::POST, 5),
        b"HEAD" if bytes[4] == b' ' => (method::HEAD, 5),
        b"DELE" if bytes[6] == b' ' => (method::DELETE, 7),
        b"PATC" if bytes[5] == b' ' => (method::PATCH, 6),
        b"OPTI" if bytes[7] == b' ' => (method::OPTIONS, 8),
        b"CONN" if bytes[7] == b' ' => (method::CONNECT, 8),
        b"TRAC" if bytes[5] == b' ' => (method::TRACE, 6),
        _ => return None,
    };
    Some(parsed)
}

/// The status code of a response's status line (`HTTP/1.x NNN`), or None.
#[inline(always)]
fn parse_status(bytes: &[u8; PEEK_LEN]) -> Option<u16> {
    if &bytes[..7] != b"HTTP/1." || bytes[8] != b' ' {
        return None;
    }
    let mut status = 0u16;
    for &digit in &bytes[9..12] {
        if !digit.is_ascii_digit() {
            return None;
        }
        status = status * 10 + (digit - b'0') as u16;
    }
    Some(status)
}

/// An interim response (100 Continue, 102, 103): the final one is still to come.
#[inline(always)]
fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

/// Marks `connection` as carrying a request that started at `start`, keeping its path.
/// `data` is the user address of `bytes`.
#[inline(always)]
fn start_request(connection: *mut Connection, bytes: &[u8; PEEK_LEN], data: u64, start: u64) {
    let Some((method, skip)) = parse_method(bytes) else {
        return;
    };
    // SAFETY: a valid map value pointer for the duration of this program.
    let connection = unsafe { &mut *connection };
    // The path straight from user memory into the map value: no copy loop to verify.
    // SAFETY: the helper checks the user address.
    if unsafe { bpf_probe_read_user_buf((data + skip as u64) as *const u8, &mut connection.path) }
        .is_err()
    {
        connection.path = [0; PATH_LEN];
    }
    let (route, len) = route_hash(&connection.path);
    connection.route = route;
    connection.path_len = len as u8;
    connection.method = method;
    connection.request_start_nanos = start;
    connection.batch_start_nanos = start;
}

fn try_accept_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let fd = ret(ctx)?;
    if fd < 0 || !traced(Direction::Server) {
        return Ok(());
    }
    track_connection(fd as u32, Direction::Server, 0, 0);
    Ok(())
}

/// Starts tracking a connection, replacing whatever a reused fd left behind.
#[inline(always)]
fn track_connection(fd: u32, direction: Direction, peer_addr: u32, peer_port: u16) {
    let key = ConnectionKey {
        tgid: current_tgid(),
        fd,
    };
    if let Some(stale) = CONNECTIONS.get_ptr(&key) {
        // SAFETY: a valid map value pointer for the duration of this program.
        if unsafe { (*stale).request_start_nanos } != 0 {
            count_drop(drop_reason::STALE_REQUEST_DISCARDED);
        }
    }
    let idle = Connection {
        request_start_nanos: 0,
        batch_start_nanos: 0,
        peer_addr,
        route: 0,
        peer_port,
        direction: direction as u8,
        method: method::UNKNOWN,
        path_len: 0,
        _pad: [0; 3],
        path: [0; PATH_LEN],
    };
    if CONNECTIONS.insert(&key, &idle, 0).is_err() {
        count_drop(drop_reason::CONNECTION_TABLE_FULL);
    }
}

fn try_connect_enter(ctx: &TracePointContext) -> Result<(), i32> {
    if !traced(Direction::Client) {
        return Ok(());
    }
    let fd = arg(ctx, 0)? as u32;
    let address = arg(ctx, 1)?;
    // struct sockaddr_in { u16 family; u16 port (BE); u32 addr (BE); }
    // SAFETY: the helper checks the user address.
    let head: u64 = unsafe { bpf_probe_read_user(address as *const u64)? };
    let family = head as u16;
    let port = u16::from_be((head >> 16) as u16);
    let addr = (head >> 32) as u32;
    if family != AF_INET {
        // IPv6 and Unix sockets: tracked without a peer address.
        if family != 10 {
            return Ok(());
        }
    }
    let in_flight = SyscallInFlight {
        fd,
        status: 0,
        shape: 0,
        _pad: 0,
        buffer: if family == AF_INET {
            u64::from(addr)
        } else {
            0
        },
        port,
        _pad2: [0; 6],
    };
    remember_syscall(&in_flight);
    Ok(())
}

fn try_connect_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let thread = bpf_get_current_pid_tgid();
    let Some(in_flight) = take_syscall(thread) else {
        return Ok(());
    };
    let result = ret(ctx)?;
    if result == 0 || result == -EINPROGRESS {
        track_connection(
            in_flight.fd,
            Direction::Client,
            in_flight.buffer as u32,
            in_flight.port,
        );
    }
    Ok(())
}

fn try_close_enter(ctx: &TracePointContext) -> Result<(), i32> {
    let key = ConnectionKey {
        tgid: current_tgid(),
        fd: arg(ctx, 0)? as u32,
    };
    if let Some(connection) = CONNECTIONS.get_ptr(&key) {
        // SAFETY: a valid map value pointer for the duration of this program.
        if unsafe { (*connection).request_start_nanos } != 0 {
            count_drop(drop_reason::UNANSWERED_AT_CLOSE);
        }
        let _ = CONNECTIONS.remove(&key);
    }
    Ok(())
}

fn try_read_enter(ctx: &TracePointContext, shape: BufferShape) -> Result<(), i32> {
    let fd = arg(ctx, 0)? as u32;
    let key = ConnectionKey {
        tgid: current_tgid(),
        fd,
    };
    let Some(connection) = CONNECTIONS.get_ptr(&key) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer for the duration of this program.
    let (direction, busy) = unsafe {
        (
            (*connection).direction,
            (*connection).request_start_nanos != 0,
        )
    };
    // Server side reads matter when idle (a request may start), client side when a request
    // is out (its response may arrive). Anything else is body bytes.
    let interesting = if direction == Direction::Server as u8 {
        !busy
    } else {
        busy
    };
    if !interesting {
        return Ok(());
    }
    let in_flight = SyscallInFlight {
        fd,
        status: 0,
        shape: shape as u8,
        _pad: 0,
        buffer: arg(ctx, 1)?,
        port: 0,
        _pad2: [0; 6],
    };
    remember_syscall(&in_flight);
    Ok(())
}

fn try_read_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let thread = bpf_get_current_pid_tgid();
    let Some(in_flight) = take_syscall(thread) else {
        return Ok(());
    };
    let returned = ret(ctx)?;
    let key = ConnectionKey {
        tgid: (thread >> 32) as u32,
        fd: in_flight.fd,
    };
    let Some(connection) = CONNECTIONS.get_ptr_mut(&key) else {
        return Ok(());
    };
    if returned == 0 {
        // End of stream: nothing more was pipelined.
        // SAFETY: a valid map value pointer for the duration of this program.
        unsafe { (*connection).batch_start_nanos = 0 };
        return Ok(());
    }
    if returned < 4 {
        return Ok(());
    }
    let (bytes, data) = peek(in_flight.shape, in_flight.buffer)?;
    // SAFETY: a valid map value pointer for the duration of this program.
    let direction = unsafe { (*connection).direction };
    if direction == Direction::Server as u8 {
        start_request(connection, bytes, data, now());
        return Ok(());
    }
    // Client side: the response to our request.
    let Some(status) = parse_status(bytes) else {
        return Ok(());
    };
    if is_interim(status) {
        return Ok(());
    }
    finish_request(connection, key.tgid, status)
}

fn try_write_enter(ctx: &TracePointContext, shape: BufferShape) -> Result<(), i32> {
    let fd = arg(ctx, 0)? as u32;
    let key = ConnectionKey {
        tgid: current_tgid(),
        fd,
    };
    let Some(connection) = CONNECTIONS.get_ptr_mut(&key) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer for the duration of this program.
    let (direction, busy) = unsafe {
        (
            (*connection).direction,
            (*connection).request_start_nanos != 0,
        )
    };
    if direction == Direction::Client as u8 {
        if !busy {
            // A request going out: it starts now.
            let (bytes, data) = peek(shape as u8, arg(ctx, 1)?)?;
            start_request(connection, bytes, data, now());
        }
        return Ok(());
    }
    // SAFETY: a valid map value pointer for the duration of this program.
    let batch_start = unsafe { (*connection).batch_start_nanos };
    if !busy && batch_start == 0 {
        return Ok(());
    }
    let buffer = arg(ctx, 1)?;
    let (bytes, _) = peek(shape as u8, buffer)?;
    let Some(status) = parse_status(bytes) else {
        // Body bytes, or a response we cannot read: the request stays open.
        return Ok(());
    };
    if is_interim(status) {
        return Ok(());
    }
    if !busy {
        // A response on an idle connection answers a pipelined request read with the last
        // batch. A 408 is a server timing out an idle connection: not an answer.
        if status == 408 {
            return Ok(());
        }
        // SAFETY: as above.
        unsafe { (*connection).request_start_nanos = batch_start };
    }
    let in_flight = SyscallInFlight {
        fd,
        status,
        shape: shape as u8,
        _pad: 0,
        buffer,
        port: 0,
        _pad2: [0; 6],
    };
    remember_syscall(&in_flight);
    Ok(())
}

fn try_write_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let thread = bpf_get_current_pid_tgid();
    let Some(in_flight) = take_syscall(thread) else {
        return Ok(());
    };
    if in_flight.status == 0 || ret(ctx)? <= 0 {
        return Ok(());
    }
    let key = ConnectionKey {
        tgid: (thread >> 32) as u32,
        fd: in_flight.fd,
    };
    let Some(connection) = CONNECTIONS.get_ptr_mut(&key) else {
        return Ok(());
    };
    finish_request(connection, key.tgid, in_flight.status)
}

/// Ends the connection's request now with `status`, and counts it.
#[inline(always)]
fn finish_request(connection: *mut Connection, tgid: u32, status: u16) -> Result<(), i32> {
    let end = now();
    // SAFETY: a valid map value pointer for the duration of this program.
    let connection = unsafe { &mut *connection };
    let start = connection.request_start_nanos;
    connection.request_start_nanos = 0;
    if start == 0 || end < start {
        return Ok(());
    }
    let settings = settings().ok_or(-1)?;
    if settings.window_nanos == 0 {
        return Ok(());
    }
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // A connection opened while its cgroup was selected stops counting as soon as the
    // selection drops it: one lookup per request, not per syscall.
    // SAFETY: the value is a plain u8 and only tested for presence.
    if settings.trace_all == 0 && unsafe { TRACED_CGROUPS.get(&cgroup_id) }.is_none() {
        return Ok(());
    }
    let latency = end - start;
    let series = SeriesKey {
        cgroup_id,
        window: ((end + settings.realtime_offset_nanos) / settings.window_nanos) as u32,
        tgid,
        route: connection.route,
        peer_addr: connection.peer_addr,
        peer_port: connection.peer_port,
        direction: connection.direction,
        method: connection.method,
        status_class: if status < 600 {
            (status / 100) as u8
        } else {
            0
        },
        _pad: [0; 3],
    };
    let mut flags = 0u8;
    // Creating a key races with other CPUs counting the same series: an insert that loses
    // (EEXIST) falls back to this CPU's slot of the key the winner created.
    let existing = match SERIES.get_ptr_mut(&series) {
        Some(totals) => Some(totals),
        None => {
            let first = SeriesTotals {
                count: 1,
                sum_nanos: latency,
                min_nanos: latency,
                max_nanos: latency,
            };
            if SERIES.insert(&series, &first, BPF_NOEXIST as u64).is_ok() {
                flags |= event_flag::NEW_SERIES;
                None
            } else if let Some(totals) = SERIES.get_ptr_mut(&series) {
                Some(totals)
            } else {
                count_drop(drop_reason::SERIES_TABLE_FULL);
                return Ok(());
            }
        }
    };
    if let Some(totals) = existing {
        // SAFETY: this CPU's slot of a per-CPU value; programs do not migrate.
        let totals = unsafe { &mut *totals };
        // Another CPU may have created the key, leaving this CPU's slot zeroed.
        if totals.count == 0 || latency < totals.min_nanos {
            totals.min_nanos = latency;
        }
        if latency > totals.max_nanos {
            totals.max_nanos = latency;
        }
        totals.count += 1;
        totals.sum_nanos += latency;
    }
    let bucket = BucketKey {
        series,
        bucket: bucket_index(latency),
        _pad: 0,
    };
    match HISTOGRAM.get_ptr_mut(&bucket) {
        // SAFETY: this CPU's slot of a per-CPU value.
        Some(count) => unsafe { *count += 1 },
        None => {
            if HISTOGRAM.insert(&bucket, &1, BPF_NOEXIST as u64).is_err() {
                match HISTOGRAM.get_ptr_mut(&bucket) {
                    // SAFETY: as above; another CPU created the key first.
                    Some(count) => unsafe { *count += 1 },
                    None => count_drop(drop_reason::HISTOGRAM_TABLE_FULL),
                }
            }
        }
    }
    let slow = settings.slow_threshold_nanos != 0 && latency >= settings.slow_threshold_nanos;
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let sampled =
        settings.sample_below != 0 && unsafe { bpf_get_prandom_u32() } < settings.sample_below;
    if slow || status >= 500 || sampled {
        flags |= event_flag::EXEMPLAR;
    }
    if flags != 0 {
        emit(series, connection, start, latency, status, flags);
    }
    Ok(())
}

/// Sends one request to user space; counts it when the ring buffer is full.
#[inline(always)]
fn emit(
    series: SeriesKey,
    connection: &Connection,
    start: u64,
    latency: u64,
    status: u16,
    flags: u8,
) {
    let Some(mut entry) = EVENTS.reserve::<RequestEvent>(0) else {
        count_drop(drop_reason::EVENT_RING_FULL);
        return;
    };
    entry.write(RequestEvent {
        series,
        start_nanos: start,
        duration_nanos: latency,
        tid: bpf_get_current_pid_tgid() as u32,
        status,
        flags,
        path_len: connection.path_len,
        path: connection.path,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
}

macro_rules! hook {
    ($name:ident, $body:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let handler = $body;
            let _ = handler(&ctx);
            0
        }
    };
}

hook!(sys_exit_accept, try_accept_exit);
hook!(sys_exit_accept4, try_accept_exit);
hook!(sys_enter_connect, try_connect_enter);
hook!(sys_exit_connect, try_connect_exit);
hook!(sys_enter_close, try_close_enter);
hook!(sys_enter_read, |ctx| try_read_enter(ctx, BufferShape::Flat));
hook!(sys_enter_recvfrom, |ctx| try_read_enter(
    ctx,
    BufferShape::Flat
));
hook!(sys_enter_readv, |ctx| try_read_enter(
    ctx,
    BufferShape::IoVec
));
hook!(sys_enter_recvmsg, |ctx| try_read_enter(
    ctx,
    BufferShape::MsgHdr
));
hook!(sys_exit_read, try_read_exit);
hook!(sys_exit_recvfrom, try_read_exit);
hook!(sys_exit_readv, try_read_exit);
hook!(sys_exit_recvmsg, try_read_exit);
hook!(sys_enter_write, |ctx| try_write_enter(
    ctx,
    BufferShape::Flat
));
hook!(sys_enter_sendto, |ctx| try_write_enter(
    ctx,
    BufferShape::Flat
));
hook!(sys_enter_writev, |ctx| try_write_enter(
    ctx,
    BufferShape::IoVec
));
hook!(sys_enter_sendmsg, |ctx| try_write_enter(
    ctx,
    BufferShape::MsgHdr
));
hook!(sys_exit_write, try_write_exit);
hook!(sys_exit_sendto, try_write_exit);
hook!(sys_exit_writev, try_write_exit);
hook!(sys_exit_sendmsg, try_write_exit);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// bpf_probe_read_user and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
