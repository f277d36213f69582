//! Trazor's eBPF programs: server-side HTTP/1.x request latency from syscall tracepoints.
//!
//! A connection is tracked from the `accept`/`accept4` that created it to its `close`, in
//! `CONNECTIONS`, keyed by (tgid, fd). Every other hook starts with one lookup there, so
//! untraced processes and non-socket fds cost one map lookup per syscall and nothing else.
//!
//! A request starts when a read on a tracked connection returns bytes that begin with an
//! HTTP method, and ends when a write on it that begins with an `HTTP/1.x` status line
//! (other than `1xx` interim responses) returns. Its latency is counted right here, into
//! per-CPU maps keyed by window number: `SERIES` (count, sum, min, max) and `HISTOGRAM`
//! (log-bucketed, see `bucket_index`). User space reads a window once it has closed and
//! deletes its keys; it never sees a per-request event.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};
use trazor_node_agent_ebpf_common::{
    AgentSettings, BucketKey, Direction, SeriesKey, SeriesTotals, bucket_index, drop_reason,
    method,
};

/// Connections traced: most hosts have far fewer open server connections than this.
const MAX_CONNECTIONS: u32 = 65_536;
/// Threads inside a read or write on a traced connection at one time.
const MAX_SYSCALLS_IN_FLIGHT: u32 = 16_384;
/// Distinct (cgroup, process, method, status class) series per open window pair.
const MAX_SERIES: u32 = 16_384;
/// Non-empty histogram buckets across all series of the open windows.
const MAX_BUCKETS: u32 = 131_072;

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

/// The buffer of a read or write between its syscall's entry and exit, by thread.
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

#[repr(C)]
#[derive(Clone, Copy)]
struct ConnectionKey {
    tgid: u32,
    fd: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Connection {
    /// `bpf_ktime_get_ns` when the current request's first bytes were read; 0 when idle.
    request_start_nanos: u64,
    method: u8,
    _pad: [u8; 7],
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
    /// Status code parsed from a response at write entry; 0 for reads.
    status: u16,
    shape: u8,
    _pad: u8,
    buffer: u64,
}

/// Offset of the first syscall argument in a `syscalls:sys_enter_*` record (after the common
/// header and `__syscall_nr`), and of `ret` in a `sys_exit_*` record.
const ARGS_OFFSET: usize = 16;
const RET_OFFSET: usize = 16;
/// Bytes of a buffer inspected: enough for "OPTIONS " and "HTTP/1.1 200".
const PEEK_LEN: usize = 16;

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
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The first bytes of the user buffer a syscall read into or writes from.
#[inline(always)]
fn peek(shape: u8, buffer: u64) -> Result<[u8; PEEK_LEN], i32> {
    let data = if shape == BufferShape::Flat as u8 {
        buffer
    } else {
        let iovec = if shape == BufferShape::MsgHdr as u8 {
            // struct msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
            // SAFETY: reading user memory through the helper, which checks the address.
            unsafe { bpf_probe_read_user((buffer + 16) as *const u64)? }
        } else {
            buffer
        };
        // struct iovec { void *iov_base; size_t iov_len; }: the first buffer's address.
        // SAFETY: as above.
        unsafe { bpf_probe_read_user(iovec as *const u64)? }
    };
    let mut bytes = [0u8; PEEK_LEN];
    if data == 0 {
        return Err(-1);
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_user_buf(data as *const u8, &mut bytes)? };
    Ok(bytes)
}

/// The method a request starts with, or None if the bytes are not a request line.
#[inline(always)]
fn parse_method(bytes: &[u8; PEEK_LEN]) -> Option<u8> {
    let word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let method = match &word.to_le_bytes() {
        b"GET " => method::GET,
        b"PUT " => method::PUT,
        b"POST" if bytes[4] == b' ' => method::POST,
        b"HEAD" if bytes[4] == b' ' => method::HEAD,
        b"DELE" if bytes[6] == b' ' => method::DELETE,
        b"PATC" if bytes[5] == b' ' => method::PATCH,
        b"OPTI" if bytes[7] == b' ' => method::OPTIONS,
        b"CONN" if bytes[7] == b' ' => method::CONNECT,
        b"TRAC" if bytes[5] == b' ' => method::TRACE,
        _ => return None,
    };
    Some(method)
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

fn try_accept_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let fd = ret(ctx)?;
    if fd < 0 {
        return Ok(());
    }
    let settings = settings().ok_or(-1)?;
    let tgid = current_tgid();
    if settings.window_nanos == 0 || tgid == settings.agent_tgid {
        return Ok(());
    }
    if settings.trace_all == 0 {
        // SAFETY: bpf_get_current_cgroup_id has no preconditions.
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        // SAFETY: the value is a plain u8 and only tested for presence.
        if unsafe { TRACED_CGROUPS.get(&cgroup_id) }.is_none() {
            return Ok(());
        }
    }
    let key = ConnectionKey {
        tgid,
        fd: fd as u32,
    };
    let idle = Connection {
        request_start_nanos: 0,
        method: method::UNKNOWN,
        _pad: [0; 7],
    };
    if CONNECTIONS.insert(&key, &idle, 0).is_err() {
        count_drop(drop_reason::CONNECTION_TABLE_FULL);
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
    if unsafe { (*connection).request_start_nanos } != 0 {
        // Mid-request (body or pipelined bytes): nothing to learn from this read.
        return Ok(());
    }
    let in_flight = SyscallInFlight {
        fd,
        status: 0,
        shape: shape as u8,
        _pad: 0,
        buffer: arg(ctx, 1)?,
    };
    if SYSCALLS_IN_FLIGHT
        .insert(&bpf_get_current_pid_tgid(), &in_flight, 0)
        .is_err()
    {
        count_drop(drop_reason::SYSCALL_TABLE_FULL);
    }
    Ok(())
}

fn try_read_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let Some(in_flight) = (unsafe { SYSCALLS_IN_FLIGHT.get(&thread) }).copied() else {
        return Ok(());
    };
    let _ = SYSCALLS_IN_FLIGHT.remove(&thread);
    if in_flight.status != 0 || ret(ctx)? < 4 {
        return Ok(());
    }
    let key = ConnectionKey {
        tgid: (thread >> 32) as u32,
        fd: in_flight.fd,
    };
    let Some(connection) = CONNECTIONS.get_ptr_mut(&key) else {
        return Ok(());
    };
    let bytes = peek(in_flight.shape, in_flight.buffer)?;
    if let Some(method) = parse_method(&bytes) {
        // SAFETY: a valid map value pointer for the duration of this program.
        unsafe {
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            (*connection).request_start_nanos = bpf_ktime_get_ns();
            (*connection).method = method;
        }
    }
    Ok(())
}

fn try_write_enter(ctx: &TracePointContext, shape: BufferShape) -> Result<(), i32> {
    let fd = arg(ctx, 0)? as u32;
    let key = ConnectionKey {
        tgid: current_tgid(),
        fd,
    };
    let Some(connection) = CONNECTIONS.get_ptr(&key) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer for the duration of this program.
    if unsafe { (*connection).request_start_nanos } == 0 {
        return Ok(());
    }
    let buffer = arg(ctx, 1)?;
    let bytes = peek(shape as u8, buffer)?;
    let Some(status) = parse_status(&bytes) else {
        // Body bytes, or a response we cannot read: the request stays open.
        return Ok(());
    };
    if (100..200).contains(&status) && status != 101 {
        // An interim response (100 Continue): the final one is still to come.
        return Ok(());
    }
    let in_flight = SyscallInFlight {
        fd,
        status,
        shape: shape as u8,
        _pad: 0,
        buffer,
    };
    if SYSCALLS_IN_FLIGHT
        .insert(&bpf_get_current_pid_tgid(), &in_flight, 0)
        .is_err()
    {
        count_drop(drop_reason::SYSCALL_TABLE_FULL);
    }
    Ok(())
}

fn try_write_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let Some(in_flight) = (unsafe { SYSCALLS_IN_FLIGHT.get(&thread) }).copied() else {
        return Ok(());
    };
    let _ = SYSCALLS_IN_FLIGHT.remove(&thread);
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
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let end = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a valid map value pointer for the duration of this program.
    let (start, method) = unsafe {
        let request = ((*connection).request_start_nanos, (*connection).method);
        (*connection).request_start_nanos = 0;
        request
    };
    if start == 0 || end < start {
        return Ok(());
    }
    count_request(key.tgid, method, in_flight.status, start, end)
}

/// Counts one finished request into the open window's series and histogram.
#[inline(always)]
fn count_request(tgid: u32, method: u8, status: u16, start: u64, end: u64) -> Result<(), i32> {
    let settings = settings().ok_or(-1)?;
    if settings.window_nanos == 0 {
        return Ok(());
    }
    let latency = end - start;
    let window = ((end + settings.realtime_offset_nanos) / settings.window_nanos) as u32;
    let series = SeriesKey {
        // SAFETY: bpf_get_current_cgroup_id has no preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        window,
        tgid,
        direction: Direction::Server as u8,
        method,
        status_class: if status < 600 { (status / 100) as u8 } else { 0 },
        _pad: [0; 5],
    };
    match SERIES.get_ptr_mut(&series) {
        Some(totals) => {
            // SAFETY: this CPU's slot of a per-CPU value; programs do not migrate.
            unsafe {
                // Another CPU may have created the key, leaving this CPU's slot zeroed.
                if (*totals).count == 0 || latency < (*totals).min_nanos {
                    (*totals).min_nanos = latency;
                }
                if latency > (*totals).max_nanos {
                    (*totals).max_nanos = latency;
                }
                (*totals).count += 1;
                (*totals).sum_nanos += latency;
            }
        }
        None => {
            let first = SeriesTotals {
                count: 1,
                sum_nanos: latency,
                min_nanos: latency,
                max_nanos: latency,
            };
            if SERIES.insert(&series, &first, BPF_NOEXIST as u64).is_err() {
                count_drop(drop_reason::SERIES_TABLE_FULL);
                return Ok(());
            }
        }
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
                count_drop(drop_reason::HISTOGRAM_TABLE_FULL);
            }
        }
    }
    Ok(())
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
hook!(sys_enter_close, try_close_enter);
hook!(sys_enter_read, |ctx| try_read_enter(ctx, BufferShape::Flat));
hook!(sys_enter_recvfrom, |ctx| try_read_enter(ctx, BufferShape::Flat));
hook!(sys_enter_readv, |ctx| try_read_enter(ctx, BufferShape::IoVec));
hook!(sys_enter_recvmsg, |ctx| try_read_enter(ctx, BufferShape::MsgHdr));
hook!(sys_exit_read, try_read_exit);
hook!(sys_exit_recvfrom, try_read_exit);
hook!(sys_exit_readv, try_read_exit);
hook!(sys_exit_recvmsg, try_read_exit);
hook!(sys_enter_write, |ctx| try_write_enter(ctx, BufferShape::Flat));
hook!(sys_enter_sendto, |ctx| try_write_enter(ctx, BufferShape::Flat));
hook!(sys_enter_writev, |ctx| try_write_enter(ctx, BufferShape::IoVec));
hook!(sys_enter_sendmsg, |ctx| try_write_enter(ctx, BufferShape::MsgHdr));
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
