//! Trazor's eBPF programs: HTTP/1.x request latency from socket reads and writes, on both
//! sides of a connection.
//!
//! Where they hook: the `sock_recv_length` and `sock_send_length` tracepoints, which the
//! kernel fires once per socket receive and send (whatever the syscall: `read`, `recvfrom`,
//! `readv`, `recvmsg`, `write`, `sendto`, `writev`, `sendmsg`, `sendfile`, ...) as it
//! returns, and `inet_sock_set_state` and `tcp_destroy_sock` for the end of a TCP
//! connection. All are attached as raw tracepoints: a direct call with the tracepoint's
//! arguments, no record to fill. Nothing else a process does reaches us: syscalls that
//! touch no socket cost nothing at all (a `syscalls:` tracepoint would send every syscall
//! of every process through the kernel's syscall-tracing path). A failed receive stops at
//! once; then a process outside the selection stops at one slot of `TRACED_CGROUP_SLOTS`,
//! before any hash lookup.
//!
//! The user buffer (to read a request or status line) comes from the syscall's arguments,
//! which the task saved in its registers on entry: the syscall number tells where the
//! buffer is (`fd, buf, len`; `fd, iov, iovcnt`; `fd, msghdr, flags`). Sends without a
//! user buffer (`sendfile`, `splice`) are body bytes to us.
//!
//! A connection is a TCP socket, keyed in `CONNECTIONS` by its kernel address, from the
//! first request line seen on it, read (server side) or written (client side), until the
//! socket reaches `TCP_CLOSE` (`inet_sock_set_state`), or at the latest until it is
//! destroyed (`tcp_destroy_sock`), before its memory can be reused: so a new connection can
//! never inherit an old one's request, whatever fd numbers are reused, and connections
//! opened before the agent started are traced from their next request.
//!
//! Server side, a request starts when a receive returns bytes that begin with an HTTP
//! method and ends when the send of its status line (`HTTP/1.x NNN`, not a `1xx` interim)
//! returns. Client side, it starts when the send of a request line returns and ends when a
//! receive returns the status line. Each finished request goes to user space as one small
//! record (its series key and latency) through the `REQUESTS` ring buffer, where the agent
//! counts it into its series' totals and histogram: writing a record costs the traced
//! process less than counting in the kernel did (two per-CPU hash lookups, found cold
//! between requests; see bench/results/capture.md). The path of a request reaches user
//! space only when needed, through the `EVENTS` ring buffer: to name a route the agent has
//! not learnt (`KNOWN_ROUTES`), a connection's process and peer, and for exemplars.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{self, bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use trazor_node_agent_ebpf_common::{
    AgentSettings, CGROUP_SLOT_SHARED, CGROUP_SLOTS, COST_REPEATS, CgroupRule, Connection,
    Direction, FinishedRequest, HEAD_LEN, IGNORED_CONNECTION, PATH_LEN, PortKey, RequestEvent,
    SeriesKey, cgroup_slot, connection_count, drop_reason, event_flag, method, peer_hash,
    route_hash_at,
};

/// Connections traced at once by default (the agent can load the map with another size):
/// most hosts have far fewer open connections than this.
const MAX_CONNECTIONS: u32 = 32_768;
/// Ring buffer of exemplars and announcements to user space, bytes (a power of two,
/// multiple of the page size).
const EVENTS_BYTES: u32 = 1 << 20;
/// Ring buffer of finished requests, bytes: 43 690 records of 48 bytes (with the ring's
/// header), drained every 100 ms, so it takes 430 000 requests a second before it fills.
const REQUESTS_BYTES: u32 = 1 << 21;
/// Routes the agent has learnt the names of.
const MAX_KNOWN_ROUTES: u32 = 16_384;

#[map]
static SETTINGS: Array<AgentSettings> = Array::with_max_entries(1, 0);

/// cgroup ids to trace when `AgentSettings::trace_all` is 0, with what to trace of each.
#[map]
static TRACED_CGROUPS: HashMap<u64, CgroupRule> = HashMap::with_max_entries(16_384, 0);

/// The ports of the cgroups whose rule filters by port.
#[map]
static TRACED_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(16_384, 0);

/// At `cgroup_slot(id)` of every id in `TRACED_CGROUPS`: that id, or `CGROUP_SLOT_SHARED`
/// when several share the slot; elsewhere 0. One inlined array access decides for a
/// process, selected or not, without a hash lookup (unless its slot is shared).
#[map]
static TRACED_CGROUP_SLOTS: Array<u64> = Array::with_max_entries(CGROUP_SLOTS, 0);

/// Keyed by the socket's kernel address. LRU as a backstop: every entry is removed when its
/// socket reaches `TCP_CLOSE`, so only a full table of live connections evicts.
#[map]
static CONNECTIONS: LruHashMap<u64, Connection> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// An all-zero connection entry (never written), which new entries are copied from.
#[map]
static ZEROED_CONNECTION: Array<Connection> = Array::with_max_entries(1, 0);

/// Every finished request, for the agent to count.
#[map]
static REQUESTS: RingBuf = RingBuf::with_byte_size(REQUESTS_BYTES, 0);

/// Route hashes whose names the agent has learnt (written by the agent): a connection whose
/// route changes to one of these sends no announcement.
#[map]
static KNOWN_ROUTES: HashMap<u32, u8> = HashMap::with_max_entries(MAX_KNOWN_ROUTES, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

/// Entries added to and removed from `CONNECTIONS`, so the agent can count evictions.
#[map]
static CONNECTION_COUNTS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(connection_count::COUNT, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

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

/// The head of `struct sock_common`, which starts every `struct sock`: a layout unchanged
/// since Linux 2.6 (`include/net/sock.h`), read once when a connection is adopted.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockCommonHead {
    /// `skc_daddr`: the peer's IPv4 address (network order; IPv4-mapped for IPv6 sockets).
    peer_addr: u32,
    rcv_saddr: u32,
    hash: u32,
    /// `skc_dport`: the peer's port (network order).
    peer_port: u16,
    local_port: u16,
    family: u16,
    /// `skc_state`: a TCP state.
    state: u8,
    reuse: u8,
}

// The syscall's arguments and number, from the registers the task saved on entry (`struct
// pt_regs`; the syscall ABI leaves argument registers intact, and where the return value
// overwrites the first one, the kernel keeps a copy).
#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
compile_error!("pt_regs offsets are written for x86_64 and aarch64 only");

#[cfg(bpf_target_arch = "x86_64")]
mod regs {
    /// `si` in x86-64's `struct pt_regs`, as a u64 index: the second argument.
    pub const ARG1: usize = 13;
    /// `orig_ax`: the syscall number.
    pub const SYSCALL: usize = 15;
    /// `cs`: a 64-bit syscall comes from the 64-bit user code segment (its selector in the
    /// low 16 bits; FRED kernels keep more state above them).
    pub const MODE: usize = 17;
    pub const MODE_MASK: u64 = 0xffff;
    pub const MODE_NATIVE: u64 = 0x33;
    /// arch/x86/entry/syscalls/syscall_64.tbl
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
    pub const READV: u32 = 19;
    pub const WRITEV: u32 = 20;
    pub const SENDTO: u32 = 44;
    pub const RECVFROM: u32 = 45;
    pub const SENDMSG: u32 = 46;
    pub const RECVMSG: u32 = 47;
}
#[cfg(bpf_target_arch = "aarch64")]
mod regs {
    /// `regs[1]` in arm64's `struct pt_regs`.
    pub const ARG1: usize = 1;
    /// `syscallno` (an s32 in the low half of this word).
    pub const SYSCALL: usize = 35;
    /// `pstate`: PSR_MODE32_BIT clear for a 64-bit task.
    pub const MODE: usize = 33;
    pub const MODE_MASK: u64 = 0x10;
    pub const MODE_NATIVE: u64 = 0;
    /// include/uapi/asm-generic/unistd.h
    pub const READ: u32 = 63;
    pub const WRITE: u32 = 64;
    pub const READV: u32 = 65;
    pub const WRITEV: u32 = 66;
    pub const SENDTO: u32 = 206;
    pub const RECVFROM: u32 = 207;
    pub const SENDMSG: u32 = 211;
    pub const RECVMSG: u32 = 212;
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

    /// Where the user buffer of the current syscall is, and how it is described: None for a
    /// 32-bit (compat) task, which numbers syscalls differently, and for syscalls without a
    /// user buffer of the bytes (`sendfile`, `splice`, io_uring's work).
    #[inline(always)]
    fn user_buffer(self) -> Option<(BufferShape, u64)> {
        if self.word(regs::MODE) & regs::MODE_MASK != regs::MODE_NATIVE {
            return None;
        }
        let shape = match self.word(regs::SYSCALL) as u32 {
            regs::READ | regs::WRITE | regs::RECVFROM | regs::SENDTO => BufferShape::Flat,
            regs::READV | regs::WRITEV => BufferShape::IoVec,
            regs::RECVMSG | regs::SENDMSG => BufferShape::MsgHdr,
            _ => return None,
        };
        Some((shape, self.word(regs::ARG1)))
    }
}

/// Bytes of a response inspected: enough for "HTTP/1.1 200".
const STATUS_LEN: usize = 16;
// A request's head (HEAD_LEN bytes) is read in one read: each read of user memory costs
// about as much as a hash lookup, so the request line is read once, not once for the
// method and again for the path.
/// Offset of `skc_v6_daddr` in `struct sock_common`: after the head, `skc_bind_node`,
/// `skc_prot` and `skc_net` (a pointer: network namespaces, which Kubernetes needs), stable
/// since Linux 3.13 (checked against this kernel's BTF when it was written).
const SKC_V6_DADDR_OFFSET: u64 = 56;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `recv(2)` flag: the bytes stay queued and will be received again.
const MSG_PEEK: u32 = 2;
/// TCP states (`include/net/tcp_states.h`).
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u8 = 8;

#[inline(always)]
fn count_drop(reason: u32) {
    increment(&DROPS, reason);
}

#[inline(always)]
fn increment(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and programs do not migrate while running.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Who is sending or receiving: the process's cgroup. (Its tgid is asked for only where
/// it is needed, when a request ends or a connection is adopted: one helper call less on
/// every other call.)
#[derive(Clone, Copy)]
struct Process {
    cgroup_id: u64,
}

/// The current process's tgid.
#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The current process and the settings, when it is one to trace. The cheapest
/// rejections come first: most processes on a node are not selected.
#[inline(always)]
fn traced_process() -> Option<(Process, AgentSettings)> {
    let settings = SETTINGS.get(0)?;
    if settings.window_nanos == 0 {
        return None;
    }
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if settings.trace_all == 0 {
        let slot = *TRACED_CGROUP_SLOTS.get(cgroup_slot(cgroup_id))?;
        if slot != cgroup_id {
            if slot != CGROUP_SLOT_SHARED {
                return None;
            }
            // SAFETY: only tested for presence.
            unsafe { TRACED_CGROUPS.get(cgroup_id) }?;
        }
    }
    // A copy, taken only for a traced process: user space may rewrite the map value while
    // this program runs. (The agent's own connections are never adopted: `on_untracked`.)
    Some((Process { cgroup_id }, *settings))
}

/// The user address of the bytes the current syscall received or sent, from its user
/// buffer as [`SavedRegisters::user_buffer`] found it.
#[inline(always)]
fn user_data((shape, buffer): (BufferShape, u64)) -> Result<u64, i32> {
    let iovec = match shape {
        BufferShape::Flat => None,
        // struct msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
        // SAFETY: reading user memory through the helper, which checks the address.
        BufferShape::MsgHdr => Some(unsafe { bpf_probe_read_user((buffer + 16) as *const u64)? }),
        BufferShape::IoVec => Some(buffer),
    };
    let data = match iovec {
        // struct iovec { void *iov_base; size_t iov_len; }
        // SAFETY: as above.
        Some(iovec) => unsafe { bpf_probe_read_user(iovec as *const u64)? },
        None => buffer,
    };
    if data == 0 {
        return Err(-1);
    }
    Ok(data)
}

/// The first STATUS_LEN bytes at `data`: a short read, so it succeeds however short the
/// buffer (a buffer that small still lies in the process's memory almost always).
#[inline(always)]
fn read_status_line(data: u64) -> Result<[u8; STATUS_LEN], i32> {
    // SAFETY: the helper checks the user address.
    unsafe { bpf_probe_read_user(data as *const [u8; STATUS_LEN]) }
}

/// `bpf_probe_read_user` of `len` bytes at user address `data` into `into`, which may be
/// uninitialised: the helper writes all `len` bytes (zeros when the read fails). Returns
/// the helper's result, 0 on success.
///
/// # Safety
/// `into` must be valid for writes of `len` bytes.
#[inline(always)]
unsafe fn read_user(into: *mut c_void, len: usize, data: u64) -> i64 {
    // SAFETY: the caller's promise; the helper checks the user address.
    unsafe { generated::bpf_probe_read_user(into, len as u32, data as *const c_void) }
}

/// The first HEAD_LEN bytes of a request, on the stack, and its method. Aligned, so that
/// the compiler moves it a word at a time, not byte by byte.
#[repr(C, align(8))]
struct RequestHead {
    bytes: [u8; HEAD_LEN],
    /// One of [`method`].
    method: u8,
    /// Length of "METHOD ": where the path starts in `bytes`.
    path_offset: u8,
    /// Whether `bytes` holds the path: when the buffer ends too close to unmapped memory for
    /// the long read, the method alone (a short read) still starts the request.
    path_known: bool,
}

impl RequestHead {
    /// The head of the bytes at `data`, when they begin with a request line.
    #[inline(always)]
    fn read(data: u64) -> Result<Option<Self>, i32> {
        let mut head = Self::read_unparsed(data)?;
        Ok(head.parse_request_line().then_some(head))
    }

    /// The first HEAD_LEN bytes at `data` (or only the first STATUS_LEN, see `path_known`),
    /// whatever they are.
    #[inline(always)]
    fn read_unparsed(data: u64) -> Result<Self, i32> {
        // Not cleared first: the helper writes every byte, the user's on success and zeros
        // on failure. (Clearing it cost a call to compiler_builtins' byte-by-byte memset of
        // 74 bytes on every request, about 370 instructions.)
        let mut bytes = MaybeUninit::<[u8; HEAD_LEN]>::uninit();
        let mut path_known = true;
        // SAFETY: the helper checks the user address and writes HEAD_LEN bytes into `bytes`.
        if unsafe { read_user(bytes.as_mut_ptr().cast(), HEAD_LEN, data) } != 0 {
            path_known = false;
            // SAFETY: as above; into the first STATUS_LEN bytes (the failed read zeroed all).
            let status = unsafe { read_user(bytes.as_mut_ptr().cast(), STATUS_LEN, data) };
            if status != 0 {
                return Err(status as i32);
            }
        }
        Ok(RequestHead {
            // SAFETY: every byte written by the helper, as above.
            bytes: unsafe { bytes.assume_init() },
            method: method::UNKNOWN,
            path_offset: 0,
            path_known,
        })
    }

    /// Fills in the method and where the path starts; false when the bytes do not begin
    /// with a request line.
    #[inline(always)]
    fn parse_request_line(&mut self) -> bool {
        let Some((method, path_offset)) = parse_method(&self.bytes) else {
            return false;
        };
        self.method = method;
        self.path_offset = path_offset as u8;
        true
    }
}

/// The method a request starts with and the length of "METHOD ", or None.
#[inline(always)]
fn parse_method(bytes: &[u8; HEAD_LEN]) -> Option<(u8, usize)> {
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

/// The status code of a response's status line (`HTTP/1.x NNN`) at the start of `bytes`
/// (at least 12 of them), or None.
#[inline(always)]
fn parse_status<const N: usize>(bytes: &[u8; N]) -> Option<u16> {
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

/// Words of a request's head.
const HEAD_WORDS: usize = HEAD_LEN / 8;

/// Marks `connection` as carrying the request `head` began, started at `start`.
#[inline(always)]
fn start_request(connection: *mut Connection, head: &RequestHead, start: u64) {
    // SAFETY: a valid map value pointer for the duration of this program.
    let connection = unsafe { &mut *connection };
    connection.request_start_nanos = start;
    connection.batch_start_nanos = start;
    // Both heads are 8-byte aligned (`RequestHead` is align(8); `head` sits at offset 32 of
    // the map value), so they compare and copy a word at a time, without a helper.
    let stored = connection.head.as_mut_ptr() as *mut u64;
    let received = head.bytes.as_ptr() as *const u64;
    if head.path_known {
        let mut same = true;
        for word in 0..HEAD_WORDS {
            // SAFETY: word < HEAD_WORDS, within both heads.
            same &= unsafe { *stored.add(word) == *received.add(word) };
        }
        // The same bytes as the connection's last request: the same method and path, so
        // the same route (a keep-alive client repeating itself). Nothing to parse or hash.
        if same {
            return;
        }
        for word in 0..HEAD_WORDS {
            // SAFETY: as above.
            unsafe { *stored.add(word) = *received.add(word) };
        }
    } else {
        // The method alone (the buffer ended too close to unmapped memory for the long
        // read): an empty path, and a head that no request will match.
        connection.head[0] = 0;
    }
    // Bounded again here for the verifier (it loses the bound through the stack).
    let path_offset = usize::from(head.path_offset).min(HEAD_LEN - PATH_LEN);
    let (route, len) = if head.path_known {
        route_hash_at(&connection.head, path_offset)
    } else {
        route_hash_at(&[0u8; 1], 0)
    };
    // SAFETY: only tested for presence.
    if connection.announce == 0
        && route != connection.route
        && unsafe { KNOWN_ROUTES.get(route) }.is_none()
    {
        connection.announce = 1;
    }
    connection.route = route;
    connection.path_len = len as u8;
    connection.path_offset = path_offset as u8;
    connection.method = head.method;
}

/// What is traced of the current process's cgroup.
#[inline(always)]
fn cgroup_rule(settings: &AgentSettings, process: Process) -> CgroupRule {
    if settings.trace_all != 0 {
        return CgroupRule {
            directions: settings.directions as u8,
            port_filtered: 0,
            _pad: [0; 6],
        };
    }
    // SAFETY: a plain value, copied out at once.
    unsafe { TRACED_CGROUPS.get(process.cgroup_id) }
        .copied()
        .unwrap_or_default()
}

/// The head of `socket` when it is a TCP connection (over IPv4 or IPv6) that is open.
#[inline(always)]
fn open_tcp_socket(socket: u64) -> Option<SockCommonHead> {
    // SAFETY: `socket` is the `struct sock *` the tracepoint passed; the helper checks the
    // kernel address and fails rather than fault.
    let head = unsafe { bpf_probe_read_kernel(socket as *const SockCommonHead) }.ok()?;
    // Only TCP sockets report their end (`inet_sock_set_state`, `tcp_destroy_sock`), which
    // ends tracking. A socket already closing is not adopted: its TCP_CLOSE may have passed.
    (matches!(head.family, AF_INET | AF_INET6)
        && matches!(head.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT))
    .then_some(head)
}

/// `::ffff:a.b.c.d`: an IPv4 peer of an IPv6 socket.
#[inline(always)]
fn is_ipv4_mapped(address: &[u8; 16]) -> bool {
    address[..10] == [0; 10] && address[10] == 0xff && address[11] == 0xff
}

/// Whether `rule` traces a connection of `direction` on `head`'s port: its local port
/// server side, its peer's client side.
#[inline(always)]
fn port_selected(
    rule: &CgroupRule,
    process: Process,
    head: &SockCommonHead,
    direction: Direction,
) -> bool {
    if rule.port_filtered & direction as u8 == 0 {
        return true;
    }
    let port = match direction {
        Direction::Server => head.local_port,
        Direction::Client => u16::from_be(head.peer_port),
    };
    let key = PortKey {
        cgroup_id: process.cgroup_id,
        port,
        direction: direction as u8,
        _pad: [0; 5],
    };
    // SAFETY: only tested for presence.
    unsafe { TRACED_PORTS.get(key) }.is_some()
}

/// Starts tracking `socket` as a connection of `direction` when it is an open TCP
/// connection (client side, the peer is its address, IPv4 or IPv6, and port). On a
/// port the cgroup's rule does not select, it is remembered as ignored instead, so that
/// its later receives and sends stop at one lookup.
#[inline(always)]
fn track_connection(
    socket: u64,
    direction: Direction,
    rule: &CgroupRule,
    process: Process,
) -> Option<*mut Connection> {
    let head = open_tcp_socket(socket)?;
    let selected = port_selected(rule, process, &head, direction);
    // An entry starts as a copy of an all-zero value (idle, and ignored until filled in)
    // and the program that adopted it fills in what it is: an entry built on the stack had
    // to be cleared first, by a byte-by-byte memset (about 500 instructions per new
    // connection, trazor-count-instructions). A program racing on another CPU that finds
    // the entry before it is filled in takes it for ignored and starts nothing on it.
    let zeroed = ZEROED_CONNECTION.get(0)?;
    // Only a new entry counts as adopted, so that evictions can be counted exactly; a
    // receive and a send racing on two CPUs may both get here, and one finds the other's.
    let adopted = CONNECTIONS
        .insert(socket, zeroed, BPF_NOEXIST as u64)
        .is_ok();
    let Some(connection) = CONNECTIONS.get_ptr_mut(socket) else {
        // Neither inserted nor there already: the table could not take it.
        if selected {
            count_drop(drop_reason::CONNECTION_TABLE_FULL);
        }
        return None;
    };
    if adopted {
        increment(&CONNECTION_COUNTS, connection_count::ADOPTED);
        // SAFETY: a valid map value pointer for the duration of this program.
        let entry = unsafe { &mut *connection };
        // Its first request names its process and peer to the agent.
        entry.announce = 1;
        if direction == Direction::Client {
            entry.peer_port = u16::from_be(head.peer_port);
            // An IPv6 socket's peer may be an IPv4 address (IPv4-mapped), which `skc_daddr`
            // holds as for an IPv4 socket; otherwise the series names the peer by its hash.
            entry.peer_addr = head.peer_addr;
            if head.family == AF_INET6 {
                // SAFETY: as for the head; `skc_v6_daddr` follows it at a fixed offset.
                let address = unsafe {
                    bpf_probe_read_kernel((socket + SKC_V6_DADDR_OFFSET) as *const [u8; 16])
                }
                .unwrap_or([0; 16]);
                if !is_ipv4_mapped(&address) {
                    entry.peer_addr = peer_hash(&address);
                    entry.peer_ipv6 = 1;
                    entry.peer_addr6 = address;
                }
            }
        }
        entry.direction = if selected {
            direction as u8
        } else {
            IGNORED_CONNECTION
        };
    }
    // SAFETY: a valid map value pointer for the duration of this program.
    (unsafe { (*connection).direction } != IGNORED_CONNECTION).then_some(connection)
}

/// `length` bytes from `buffer` just went over `socket`, which is not tracked. If they begin
/// with a request line, `socket` becomes a connection of `request_direction` (server side
/// for a receive, client side for a send) and that request starts now. If they begin with
/// a final status line instead, they answer a request that was never timed: counted.
#[inline(always)]
fn on_untracked(
    settings: &AgentSettings,
    process: Process,
    socket: u64,
    buffer: (BufferShape, u64),
    length: i64,
    request_direction: Direction,
) -> Result<(), i32> {
    // The agent's own connections (to the collector, the API server) are never traced.
    if length < 4 || current_tgid() == settings.agent_tgid {
        return Ok(());
    }
    // A response goes the other way: sent by a server, received by a client.
    let response_direction = match request_direction {
        Direction::Server => Direction::Client,
        Direction::Client => Direction::Server,
    };
    let rule = cgroup_rule(settings, process);
    let requests = rule.directions & request_direction as u8 != 0;
    let responses = rule.directions & response_direction as u8 != 0;
    if !(requests || responses) {
        return Ok(());
    }
    let data = user_data(buffer)?;
    let status = if requests {
        let mut head = RequestHead::read_unparsed(data)?;
        if head.parse_request_line() {
            let start = now();
            if let Some(connection) = track_connection(socket, request_direction, &rule, process) {
                start_request(connection, &head, start);
            }
            return Ok(());
        }
        parse_status(&head.bytes)
    } else {
        parse_status(&read_status_line(data)?)
    };
    // A 408 is a server timing out an idle connection: no request is missing.
    if let Some(status) = status
        && responses
        && !is_interim(status)
        && status != 408
        && open_tcp_socket(socket)
            .is_some_and(|head| port_selected(&rule, process, &head, response_direction))
    {
        count_drop(drop_reason::RESPONSE_WITHOUT_REQUEST);
    }
    Ok(())
}

/// A process received `returned` bytes on `socket`.
#[inline(always)]
fn on_receive(
    settings: &AgentSettings,
    process: Process,
    socket: u64,
    returned: i64,
) -> Result<(), i32> {
    if returned == 0 {
        // End of stream: nothing more was pipelined.
        if let Some(connection) = CONNECTIONS.get_ptr_mut(socket) {
            // SAFETY: a valid map value pointer for the duration of this program.
            unsafe { (*connection).batch_start_nanos = 0 };
        }
        return Ok(());
    }
    // Bytes we cannot see (received by io_uring's work, or spliced) start or end nothing.
    let Some(buffer) = SavedRegisters::current().user_buffer() else {
        return Ok(());
    };
    let Some(connection) = CONNECTIONS.get_ptr_mut(socket) else {
        // A connection is served from its first request line.
        return on_untracked(
            settings,
            process,
            socket,
            buffer,
            returned,
            Direction::Server,
        );
    };
    // SAFETY: a valid map value pointer for the duration of this program.
    let (direction, busy) = unsafe {
        (
            (*connection).direction,
            (*connection).request_start_nanos != 0,
        )
    };
    // Server side receives matter when idle (a request may start), client side when a
    // request is out (its response may arrive). Anything else is body bytes, or bytes of
    // an ignored connection (never busy, not server side: it stops here).
    let server = direction == Direction::Server as u8;
    if returned < 4 || server == busy {
        return Ok(());
    }
    let data = user_data(buffer)?;
    if server {
        if let Some(head) = RequestHead::read(data)? {
            start_request(connection, &head, now());
        }
        return Ok(());
    }
    // Client side: the response to our request.
    match parse_status(&read_status_line(data)?) {
        Some(status) if !is_interim(status) => {
            // SAFETY: as above.
            let start = unsafe { (*connection).request_start_nanos };
            finish_request(settings, connection, process, start, status)
        }
        _ => Ok(()),
    }
}

/// A process sent `written` bytes on `socket`.
#[inline(always)]
fn on_send(
    settings: &AgentSettings,
    process: Process,
    socket: u64,
    written: i64,
) -> Result<(), i32> {
    // Bytes from no user buffer (`sendfile`'s body, spliced data) start or end nothing, so
    // they cost no lookup.
    let Some(buffer) = SavedRegisters::current().user_buffer() else {
        return Ok(());
    };
    let Some(connection) = CONNECTIONS.get_ptr_mut(socket) else {
        // A connection is made from its first request line.
        return on_untracked(
            settings,
            process,
            socket,
            buffer,
            written,
            Direction::Client,
        );
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
            // A request went out: it started when its send returned.
            if let Some(head) = RequestHead::read(user_data(buffer)?)? {
                start_request(connection, &head, now());
            }
        }
        return Ok(());
    }
    // Nothing to answer (an ignored connection never has anything).
    if start == 0 && batch_start == 0 {
        return Ok(());
    }
    let Some(status) = parse_status(&read_status_line(user_data(buffer)?)?) else {
        // Body bytes, or a response we cannot read: the request stays open.
        return Ok(());
    };
    if is_interim(status) {
        return Ok(());
    }
    if start != 0 {
        return finish_request(settings, connection, process, start, status);
    }
    // A response on an idle connection answers a pipelined request received with the last
    // batch. A 408 is a server timing out an idle connection: not an answer.
    if status == 408 {
        return Ok(());
    }
    finish_request(settings, connection, process, batch_start, status)
}

/// Ends the connection's request, started at `start`, now with `status`, and counts it.
#[inline(always)]
fn finish_request(
    settings: &AgentSettings,
    connection: *mut Connection,
    process: Process,
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
        cgroup_id: process.cgroup_id,
        window: ((end + settings.realtime_offset_nanos) / window_nanos) as u32,
        tgid: current_tgid(),
        route: connection.route,
        peer_addr: connection.peer_addr,
        peer_port: connection.peer_port,
        direction: connection.direction,
        method: connection.method,
        peer_ipv6: connection.peer_ipv6,
        _pad: 0,
        status,
    };
    // No wake-up: the agent reads the ring on its own schedule, and a wake-up per request
    // would cost the traced process more than the record itself.
    let Some(mut record) = REQUESTS.reserve::<FinishedRequest>(0) else {
        count_drop(drop_reason::REQUEST_RING_FULL);
        return Ok(());
    };
    record.write(FinishedRequest {
        series,
        latency_nanos: latency,
    });
    record.submit(BPF_RB_NO_WAKEUP as u64);
    let mut flags = 0u8;
    if connection.announce != 0 {
        flags |= event_flag::ANNOUNCE;
    }
    let slow = settings.slow_threshold_nanos != 0 && latency >= settings.slow_threshold_nanos;
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let sampled =
        settings.sample_below != 0 && unsafe { bpf_get_prandom_u32() } < settings.sample_below;
    if slow || status >= 500 || sampled {
        flags |= event_flag::EXEMPLAR;
    }
    if flags != 0 && emit(series, connection, start, latency, status, flags) {
        connection.announce = 0;
    }
    Ok(())
}

/// Sends one request to user space; false (and counted) when the ring buffer is full.
#[inline(always)]
fn emit(
    series: SeriesKey,
    connection: &Connection,
    start: u64,
    latency: u64,
    status: u16,
    flags: u8,
) -> bool {
    let Some(mut entry) = EVENTS.reserve::<RequestEvent>(0) else {
        count_drop(drop_reason::EVENT_RING_FULL);
        return false;
    };
    // Written field by field in place: the path and the thread's name straight from their
    // helpers into the ring, never through a zeroed copy on the stack (BPF has no wide
    // memset: clearing 16 bytes cost 83 instructions, see trazor-count-instructions).
    let event = entry.as_mut_ptr();
    // The path, from where it lies in the connection's head (a helper: the offset varies).
    let path_offset = usize::from(connection.path_offset).min(HEAD_LEN - PATH_LEN);
    // SAFETY: `event` points to a whole RequestEvent reserved in the ring; each field is
    // written through its own raw pointer. `path_offset` <= HEAD_LEN - PATH_LEN, so the
    // source is within the head; the helpers check their addresses and write every byte of
    // their destination (zeros on failure).
    unsafe {
        let copied = generated::bpf_probe_read_kernel(
            (&raw mut (*event).path).cast(),
            PATH_LEN as u32,
            connection.head.as_ptr().add(path_offset).cast(),
        ) == 0;
        // A head starting with 0 holds no path (see `start_request`).
        let path_len = if copied && connection.head[0] != 0 {
            connection.path_len
        } else {
            0
        };
        if generated::bpf_get_current_comm((&raw mut (*event).comm).cast(), 16) != 0 {
            (&raw mut (*event).comm).write([0; 16]);
        }
        (&raw mut (*event).series).write(series);
        (&raw mut (*event).start_nanos).write(start);
        (&raw mut (*event).duration_nanos).write(latency);
        (&raw mut (*event).tid).write(bpf_get_current_pid_tgid() as u32);
        (&raw mut (*event).status).write(status);
        (&raw mut (*event).flags).write(flags);
        (&raw mut (*event).path_len).write(path_len);
        // Two words, not a byte array (that is a byte-by-byte memmove): the address lies
        // 8-byte aligned in both (checked in the common crate's tests).
        let source = connection.peer_addr6.as_ptr().cast::<u64>();
        let destination = (&raw mut (*event).peer_addr6).cast::<u64>();
        destination.write(source.read());
        destination.add(1).write(source.add(1).read());
    }
    entry.submit(0);
    true
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`: a receive on a socket returned.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> i32 {
    // Raw tracepoint arguments are zero-extended to u64: an int is the low half.
    let returned = ctx.arg::<u64>(1) as u32 as i32;
    // A failed receive (one that would block) tells us nothing, and a peek will be
    // received again: skip both before asking whose they are.
    if returned < 0 || ctx.arg::<u64>(2) as u32 & MSG_PEEK != 0 {
        return 0;
    }
    if let Some((process, settings)) = traced_process() {
        let _ = on_receive(&settings, process, ctx.arg::<u64>(0), i64::from(returned));
    }
    0
}

/// `sock_send_length(struct sock *sk, int ret, int flags)`: a send on a socket returned.
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length(ctx: RawTracePointContext) -> i32 {
    let written = ctx.arg::<u64>(1) as u32 as i32;
    if written <= 0 {
        return 0;
    }
    if let Some((process, settings)) = traced_process() {
        let _ = on_send(&settings, process, ctx.arg::<u64>(0), i64::from(written));
    }
    0
}

/// `inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)`:
/// a TCP socket reaching TCP_CLOSE is done, so its connection entry goes now. (Called in
/// whatever context moved the state, often a softirq: no process filter applies here.)
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    if ctx.arg::<u64>(2) as u32 == TCP_CLOSE {
        forget_connection(ctx.arg::<u64>(0));
    }
    0
}

/// `tcp_destroy_sock(struct sock *sk)`: the socket is being freed, and its memory may be
/// reused for a new one. By now no process can receive or send on it, so no entry can be
/// created for it after this: an entry adopted just as the socket reached TCP_CLOSE (a
/// receive racing with a reset on another CPU) ends here at the latest, and a new socket
/// at the same address never inherits it.
#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: RawTracePointContext) -> i32 {
    forget_connection(ctx.arg::<u64>(0));
    0
}

#[inline(always)]
fn forget_connection(socket: u64) {
    if let Some(connection) = CONNECTIONS.get_ptr(socket) {
        // SAFETY: a valid map value pointer for the duration of this program.
        if unsafe { (*connection).request_start_nanos } != 0 {
            count_drop(drop_reason::UNANSWERED_AT_CLOSE);
        }
        // Fails only when the other end-of-connection program removed it first.
        if CONNECTIONS.remove(socket).is_ok() {
            increment(&CONNECTION_COUNTS, connection_count::FORGOTTEN);
        }
    }
}

/// Does nothing: attached to every tracepoint the real programs use, it measures what the
/// mechanism alone costs. Only the overhead benchmark attaches it.
#[raw_tracepoint]
pub fn floor(_ctx: RawTracePointContext) -> i32 {
    0
}

// The benchmark's price list: each program below, attached like `floor`, repeats one
// operation of the traced path COST_REPEATS times, so that its run time over floor's, per
// socket call, divided by COST_REPEATS is what the operation costs on this machine.

/// A clock read (two per request: at its start and at its end).
#[raw_tracepoint]
pub fn cost_clock_read(_ctx: RawTracePointContext) -> i32 {
    for _ in 0..COST_REPEATS {
        // A helper call: the compiler cannot drop it.
        let _ = now();
    }
    0
}

/// A read of the socket call's user buffer (a request line, a status line, an iovec).
#[raw_tracepoint]
pub fn cost_user_read(_ctx: RawTracePointContext) -> i32 {
    let Some(Ok(data)) = SavedRegisters::current().user_buffer().map(user_data) else {
        return 0;
    };
    for _ in 0..COST_REPEATS {
        let _ = read_status_line(data);
    }
    0
}

/// The benchmark's own map for `cost_lookup`, so that its keys touch no real table.
#[map]
static COST_LOOKUPS: HashMap<SeriesKey, u64> = HashMap::with_max_entries(COST_REPEATS, 0);

/// A hash map lookup that finds its key (as a connection's or a known route's), here with
/// a series key.
#[raw_tracepoint]
pub fn cost_lookup(_ctx: RawTracePointContext) -> i32 {
    for route in 0..COST_REPEATS {
        let key = SeriesKey {
            window: u32::MAX,
            route,
            ..SeriesKey::default()
        };
        match COST_LOOKUPS.get_ptr_mut(key) {
            // SAFETY: a valid map value pointer for the duration of this program.
            Some(count) => unsafe { *count += 1 },
            None => {
                let _ = COST_LOOKUPS.insert(key, 0, 0);
            }
        }
    }
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
