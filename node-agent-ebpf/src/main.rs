//! Trazor's eBPF programs: HTTP/1.x request latency from syscalls, on both sides of a
//! connection.
//!
//! One program per followed syscall, on its `syscalls:sys_exit_*` tracepoint, sees it as it
//! returns, and reads its arguments from the registers the task saved on entry, so nothing
//! has to be remembered between a syscall's entry and its exit: no entry programs, no
//! in-flight table. (A `sys_enter_close` program sees closes before their fd can be
//! reused.) A failed syscall stops at once; then a process outside the selection stops at
//! one bit of `TRACED_CGROUP_BITS` (an inlined array access), before any hash lookup.
//!
//! A connection is tracked from the `accept`/`accept4` (server side) or `connect` (client
//! side) that created it to its `close`, in `CONNECTIONS`, keyed by (tgid, fd). A server
//! connection accepted before the agent started is adopted when a request line arrives on
//! it, so long-lived keep-alive connections are traced after an agent restart too.
//!
//! Server side, a request starts when a read returns bytes that begin with an HTTP method
//! and ends when the write of its status line (`HTTP/1.x NNN`, not a `1xx` interim) returns.
//! Client side, it starts when the write of a request line returns and ends when a read
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
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TracePointContext,
};
use trazor_node_agent_ebpf_common::{
    AgentSettings, BucketKey, CGROUP_BITS_WORDS, Direction, PATH_LEN, RequestEvent, SeriesKey,
    SeriesTotals, bucket_index, cgroup_bit, drop_reason, event_flag, method, route_hash,
};

/// Connections traced: most hosts have far fewer open connections than this.
const MAX_CONNECTIONS: u32 = 32_768;
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

/// A bit per `cgroup_bit(id)` of every id in `TRACED_CGROUPS`: a clear bit rules a process
/// out with one inlined array access, before any hash lookup.
#[map]
static TRACED_CGROUP_BITS: Array<[u64; CGROUP_BITS_WORDS]> = Array::with_max_entries(1, 0);

/// LRU: a connection whose `close` we never see (a process that exits closes its fds
/// without the syscall) ages out instead of pinning an entry.
#[map]
static CONNECTIONS: LruHashMap<ConnectionKey, Connection> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map]
static SERIES: PerCpuHashMap<SeriesKey, SeriesTotals> =
    PerCpuHashMap::with_max_entries(MAX_SERIES, 0);

#[map]
static HISTOGRAM: PerCpuHashMap<BucketKey, u64> = PerCpuHashMap::with_max_entries(MAX_BUCKETS, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

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
enum BufferShape {
    /// `(fd, buf, len)`: read, write, recvfrom, sendto.
    Flat,
    /// `(fd, iov, iovcnt)`: readv, writev.
    IoVec,
    /// `(fd, msghdr, flags)`: recvmsg, sendmsg.
    MsgHdr,
}

/// What a returning syscall means to us.
#[derive(Clone, Copy)]
enum Syscall {
    Accept,
    Connect,
    Read(BufferShape),
    Write(BufferShape),
}

/// The returning syscall's first two arguments and mode, from the registers the task saved
/// on entry (`struct pt_regs`; the syscall ABI leaves argument registers intact, and
/// where the return value overwrites the first one, the kernel keeps a copy).
#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
compile_error!("pt_regs offsets are written for x86_64 and aarch64 only");

#[cfg(bpf_target_arch = "x86_64")]
mod regs {
    /// `di`, `si` in x86-64's `struct pt_regs`, as u64 indices.
    pub const ARG0: usize = 14;
    pub const ARG1: usize = 13;
    /// `cs`: a 64-bit syscall comes from the 64-bit user code segment (its selector in the
    /// low 16 bits; FRED kernels keep more state above them).
    pub const MODE: usize = 17;
    pub const MODE_MASK: u64 = 0xffff;
    pub const MODE_NATIVE: u64 = 0x33;
}
#[cfg(bpf_target_arch = "aarch64")]
mod regs {
    /// `orig_x0`, `regs[1]` in arm64's `struct pt_regs`.
    pub const ARG0: usize = 34;
    pub const ARG1: usize = 1;
    /// `pstate`: PSR_MODE32_BIT clear for a 64-bit task.
    pub const MODE: usize = 33;
    pub const MODE_MASK: u64 = 0x10;
    pub const MODE_NATIVE: u64 = 0;
}

#[derive(Clone, Copy)]
struct SavedRegisters(*const u64);

impl SavedRegisters {
    #[inline(always)]
    fn current() -> Self {
        // SAFETY: both helpers take no untrusted input; the result is a BTF-typed pointer
        // to this task's `struct pt_regs`, which the verifier checks every load from.
        Self(unsafe { bpf_task_pt_regs(bpf_get_current_task_btf() as *mut _) } as *const u64)
    }

    #[inline(always)]
    fn word(self, index: usize) -> u64 {
        // SAFETY: in bounds of `struct pt_regs`; the verifier checks the offset against its BTF.
        unsafe { *self.0.add(index) }
    }

    /// Whether the syscall came from a 64-bit task: 32-bit (compat) tasks number their
    /// syscalls differently and pass arguments in other registers.
    #[inline(always)]
    fn native(self) -> bool {
        self.word(regs::MODE) & regs::MODE_MASK == regs::MODE_NATIVE
    }
}

/// Bytes of a buffer inspected: enough for "OPTIONS " and for "HTTP/1.1 200" (the path is
/// read straight into the connection entry by `start_request`).
const PEEK_LEN: usize = 16;
const EINPROGRESS: i64 = 115;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[inline(always)]
fn count_drop(reason: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, and programs do not migrate while running.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The current process (tgid) and the settings, when it is one to trace. The cheapest
/// rejections come first: most processes on a node are not selected.
#[inline(always)]
fn traced_process() -> Option<(u32, AgentSettings)> {
    // A copy: user space may rewrite the map value while this program runs.
    let settings = *SETTINGS.get(0)?;
    if settings.window_nanos == 0 {
        return None;
    }
    if settings.trace_all == 0 {
        // SAFETY: bpf_get_current_cgroup_id has no preconditions.
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        let (word, bit) = cgroup_bit(cgroup_id);
        let bits = TRACED_CGROUP_BITS.get(0)?;
        if bits[word] & bit == 0 {
            return None;
        }
        // SAFETY: the value is a plain u8 and only tested for presence.
        unsafe { TRACED_CGROUPS.get(&cgroup_id) }?;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == settings.agent_tgid {
        return None;
    }
    Some((tgid, settings))
}

/// The address of the first user buffer a syscall read into or wrote from.
#[inline(always)]
fn first_buffer(shape: BufferShape, buffer: u64) -> Result<u64, i32> {
    let iovec = match shape {
        BufferShape::Flat => return Ok(buffer),
        // struct msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
        // SAFETY: reading user memory through the helper, which checks the address.
        BufferShape::MsgHdr => unsafe { bpf_probe_read_user((buffer + 16) as *const u64)? },
        BufferShape::IoVec => buffer,
    };
    // struct iovec { void *iov_base; size_t iov_len; }
    // SAFETY: as above.
    unsafe { bpf_probe_read_user(iovec as *const u64) }
}

/// The first PEEK_LEN bytes of the user buffer, and the buffer's address.
#[inline(always)]
fn peek(shape: BufferShape, buffer: u64) -> Result<([u8; PEEK_LEN], u64), i32> {
    let data = first_buffer(shape, buffer)?;
    if data == 0 {
        return Err(-1);
    }
    // A buffer shorter than PEEK_LEN still lies in the process's memory almost always; if
    // not, the read fails and the request is simply not recognised.
    // SAFETY: the helper checks the user address.
    let bytes = unsafe { bpf_probe_read_user(data as *const [u8; PEEK_LEN])? };
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
/// `data` is the user address of `bytes`; `method` and `skip` come from [`parse_method`].
#[inline(always)]
fn start_request(connection: *mut Connection, method: (u8, usize), data: u64, start: u64) {
    let (method, skip) = method;
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

/// Starts tracking a connection, replacing whatever a reused fd left behind.
#[inline(always)]
fn track_connection(
    key: &ConnectionKey,
    direction: Direction,
    peer_addr: u32,
    peer_port: u16,
) -> Option<*mut Connection> {
    if let Some(stale) = CONNECTIONS.get_ptr(key) {
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
    if CONNECTIONS.insert(key, &idle, 0).is_err() {
        count_drop(drop_reason::CONNECTION_TABLE_FULL);
        return None;
    }
    CONNECTIONS.get_ptr_mut(key)
}

#[inline(always)]
fn wants(settings: &AgentSettings, direction: Direction) -> bool {
    settings.directions & (direction as u32) != 0
}

#[inline(always)]
fn on_accept(settings: &AgentSettings, tgid: u32, fd: i64) {
    if wants(settings, Direction::Server) {
        let key = ConnectionKey {
            tgid,
            fd: fd as u32,
        };
        track_connection(&key, Direction::Server, 0, 0);
    }
}

#[inline(always)]
fn on_connect(settings: &AgentSettings, tgid: u32, regs: SavedRegisters, result: i64) {
    if !wants(settings, Direction::Client) {
        return;
    }
    // struct sockaddr_in { u16 family; u16 port (BE); u32 addr (BE); }
    // SAFETY: the helper checks the user address.
    let Ok(head) = (unsafe { bpf_probe_read_user(regs.word(regs::ARG1) as *const u64) }) else {
        return;
    };
    let family = head as u16;
    let (addr, port) = match family {
        AF_INET => ((head >> 32) as u32, u16::from_be((head >> 16) as u16)),
        // IPv6: tracked without a peer address. Unix sockets and others: not tracked.
        AF_INET6 => (0, u16::from_be((head >> 16) as u16)),
        _ => return,
    };
    let key = ConnectionKey {
        tgid,
        fd: regs.word(regs::ARG0) as u32,
    };
    track_connection(&key, Direction::Client, addr, port);
}

/// Closes are seen as they start, not as they return: by then another thread may have
/// been given the same fd number for a new connection, whose entry must not be removed.
#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let Some((tgid, _)) = traced_process() else {
        return 0;
    };
    // syscalls:sys_enter_close: common header (8 bytes), __syscall_nr (padded to 8), fd.
    // SAFETY: the record holds the u64 argument at this offset.
    if let Ok(fd) = unsafe { ctx.read_at::<u64>(16) } {
        forget_connection(tgid, fd as u32);
    }
    0
}

fn forget_connection(tgid: u32, fd: u32) {
    let key = ConnectionKey { tgid, fd };
    if let Some(connection) = CONNECTIONS.get_ptr(&key) {
        // SAFETY: a valid map value pointer for the duration of this program.
        if unsafe { (*connection).request_start_nanos } != 0 {
            count_drop(drop_reason::UNANSWERED_AT_CLOSE);
        }
        let _ = CONNECTIONS.remove(&key);
    }
}

#[inline(always)]
fn on_read(
    settings: &AgentSettings,
    tgid: u32,
    regs: SavedRegisters,
    shape: BufferShape,
    returned: i64,
) -> Result<(), i32> {
    let key = ConnectionKey {
        tgid,
        fd: regs.word(regs::ARG0) as u32,
    };
    let Some(connection) = CONNECTIONS.get_ptr_mut(&key) else {
        // Not a connection we saw open: one accepted before the agent started, if what
        // arrived is a request line.
        if returned < 4 || !wants(settings, Direction::Server) {
            return Ok(());
        }
        let (bytes, data) = peek(shape, regs.word(regs::ARG1))?;
        let Some(method) = parse_method(&bytes) else {
            return Ok(());
        };
        let start = now();
        if let Some(connection) = track_connection(&key, Direction::Server, 0, 0) {
            start_request(connection, method, data, start);
        }
        return Ok(());
    };
    // SAFETY: a valid map value pointer for the duration of this program.
    let (direction, busy) = unsafe {
        (
            (*connection).direction,
            (*connection).request_start_nanos != 0,
        )
    };
    if returned == 0 {
        // End of stream: nothing more was pipelined.
        // SAFETY: as above.
        unsafe { (*connection).batch_start_nanos = 0 };
        return Ok(());
    }
    // Server side reads matter when idle (a request may start), client side when a request
    // is out (its response may arrive). Anything else is body bytes.
    let server = direction == Direction::Server as u8;
    if returned < 4 || server == busy {
        return Ok(());
    }
    let (bytes, data) = peek(shape, regs.word(regs::ARG1))?;
    if server {
        if let Some(method) = parse_method(&bytes) {
            start_request(connection, method, data, now());
        }
        return Ok(());
    }
    // Client side: the response to our request.
    match parse_status(&bytes) {
        Some(status) if !is_interim(status) => {
            // SAFETY: as above.
            let start = unsafe { (*connection).request_start_nanos };
            finish_request(settings, connection, tgid, start, status)
        }
        _ => Ok(()),
    }
}

#[inline(always)]
fn on_write(
    settings: &AgentSettings,
    tgid: u32,
    regs: SavedRegisters,
    shape: BufferShape,
    written: i64,
) -> Result<(), i32> {
    let key = ConnectionKey {
        tgid,
        fd: regs.word(regs::ARG0) as u32,
    };
    let Some(connection) = CONNECTIONS.get_ptr_mut(&key) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer for the duration of this program.
    let (direction, start, batch_start) = unsafe {
        (
            (*connection).direction,
            (*connection).request_start_nanos,
            (*connection).batch_start_nanos,
        )
    };
    if direction == Direction::Client as u8 {
        if start == 0 {
            // A request went out: it started when its write returned.
            let (bytes, data) = peek(shape, regs.word(regs::ARG1))?;
            if let Some(method) = parse_method(&bytes) {
                start_request(connection, method, data, now());
            }
        }
        return Ok(());
    }
    if start == 0 && batch_start == 0 {
        return Ok(());
    }
    let (bytes, _) = peek(shape, regs.word(regs::ARG1))?;
    let Some(status) = parse_status(&bytes) else {
        // Body bytes, or a response we cannot read: the request stays open.
        return Ok(());
    };
    if is_interim(status) {
        return Ok(());
    }
    if start != 0 {
        return finish_request(settings, connection, tgid, start, status);
    }
    // A response on an idle connection answers a pipelined request read with the last
    // batch. A 408 is a server timing out an idle connection: not an answer.
    if status == 408 {
        return Ok(());
    }
    finish_request(settings, connection, tgid, batch_start, status)
}

/// Ends the connection's request, started at `start`, now with `status`, and counts it.
#[inline(always)]
fn finish_request(
    settings: &AgentSettings,
    connection: *mut Connection,
    tgid: u32,
    start: u64,
    status: u16,
) -> Result<(), i32> {
    let end = now();
    // SAFETY: a valid map value pointer for the duration of this program.
    let connection = unsafe { &mut *connection };
    connection.request_start_nanos = 0;
    if start == 0 || end < start {
        return Ok(());
    }
    let window_nanos = settings.window_nanos;
    if window_nanos == 0 {
        return Ok(());
    }
    let latency = end - start;
    let series = SeriesKey {
        // SAFETY: bpf_get_current_cgroup_id has no preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        window: ((end + settings.realtime_offset_nanos) / window_nanos) as u32,
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

/// What every exit program does once it knows which syscall returned, and with what.
#[inline(always)]
fn on_exit(syscall: Syscall, result: i64) {
    // A failed syscall (say, a read that would block) tells us nothing: skip it before
    // asking whose it is.
    let informative = match syscall {
        Syscall::Accept | Syscall::Read(_) => result >= 0,
        Syscall::Connect => result == 0 || result == -EINPROGRESS,
        Syscall::Write(_) => result > 0,
    };
    if !informative {
        return;
    }
    let Some((tgid, settings)) = traced_process() else {
        return;
    };
    let regs = SavedRegisters::current();
    if !regs.native() {
        return;
    }
    let settings = &settings;
    let _ = match syscall {
        Syscall::Accept => {
            on_accept(settings, tgid, result);
            Ok(())
        }
        Syscall::Connect => {
            on_connect(settings, tgid, regs, result);
            Ok(())
        }
        Syscall::Read(shape) => on_read(settings, tgid, regs, shape, result),
        Syscall::Write(shape) => on_write(settings, tgid, regs, shape, result),
    };
}

/// One program per followed syscall's exit tracepoint, so the kernel calls us only for
/// those (every other syscall costs nothing beyond the kernel's syscall-tracing path).
macro_rules! exit_hook {
    ($name:ident, $syscall:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            // syscalls:sys_exit_*: common header (8 bytes), __syscall_nr (padded), ret.
            // SAFETY: every syscall exit record holds `long ret` at this offset.
            if let Ok(result) = unsafe { ctx.read_at::<i64>(16) } {
                on_exit($syscall, result);
            }
            0
        }
    };
}

exit_hook!(sys_exit_accept, Syscall::Accept);
exit_hook!(sys_exit_accept4, Syscall::Accept);
exit_hook!(sys_exit_connect, Syscall::Connect);
exit_hook!(sys_exit_read, Syscall::Read(BufferShape::Flat));
exit_hook!(sys_exit_recvfrom, Syscall::Read(BufferShape::Flat));
exit_hook!(sys_exit_readv, Syscall::Read(BufferShape::IoVec));
exit_hook!(sys_exit_recvmsg, Syscall::Read(BufferShape::MsgHdr));
exit_hook!(sys_exit_write, Syscall::Write(BufferShape::Flat));
exit_hook!(sys_exit_sendto, Syscall::Write(BufferShape::Flat));
exit_hook!(sys_exit_writev, Syscall::Write(BufferShape::IoVec));
exit_hook!(sys_exit_sendmsg, Syscall::Write(BufferShape::MsgHdr));

/// Does nothing: attached to every tracepoint the real programs use, it measures what the
/// mechanism alone costs (the kernel's syscall-tracing path plus one program call per
/// followed syscall). Only the overhead benchmark attaches it.
#[tracepoint]
pub fn floor(_ctx: TracePointContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// bpf_probe_read_user and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
