//! Types shared by Trazor's kernel programs (`trazor-node-agent-ebpf`) and the node agent.
//!
//! Everything here is `#[repr(C)]`, plain old data, with explicit padding fields so that
//! map keys hash the same bytes on both sides. The `user` feature adds `aya::Pod` impls for
//! user space. The latency bucket mapping ([`bucket_index`]) lives here too, so the kernel
//! and the tests that check it run the very same code.
#![no_std]

/// OTLP exponential-histogram scale of every latency histogram: 2^6 = 64 buckets per
/// doubling, base = 2^(1/64) ≈ 1.0109, so a bucket's representative value is within
/// (base - 1) / (base + 1) ≈ 0.54 % of any value in it.
pub const HISTOGRAM_SCALE: i32 = 6;

/// Buckets per power of two (2^HISTOGRAM_SCALE).
pub const BUCKETS_PER_DOUBLING: u32 = 1 << HISTOGRAM_SCALE;

/// Lower bounds of the 64 sub-buckets of a doubling, as 64-bit fixed point with the binary
/// point after the top bit: `BOUNDARIES[k] = floor(2^63 * 2^(k/64))`, computed exactly
/// (integer 64th roots). A test recomputes them.
pub const BOUNDARIES: [u64; 64] = [
    0x8000000000000000,
    0x8164d1f3bc030773,
    0x82cd8698ac2ba1d7,
    0x843a28c3acde4046,
    0x85aac367cc487b14,
    0x871f61969e8d1010,
    0x88980e8092da8527,
    0x8a14d575496efd9a,
    0x8b95c1e3ea8bd6e6,
    0x8d1adf5b7e5ba9e5,
    0x8ea4398b45cd53c0,
    0x9031dc431466b1dc,
    0x91c3d373ab11c336,
    0x935a2b2f13e6e92b,
    0x94f4efa8fef70961,
    0x96942d3720185a00,
    0x9837f0518db8a96f,
    0x99e0459320b7fa64,
    0x9b8d39b9d54e5538,
    0x9d3ed9a72cffb750,
    0x9ef5326091a111ad,
    0xa0b0510fb9714fc2,
    0xa27043030c496818,
    0xa43515ae09e6809e,
    0xa5fed6a9b15138ea,
    0xa7cd93b4e9653569,
    0xa9a15ab4ea7c0ef8,
    0xab7a39b5a93ed337,
    0xad583eea42a14ac6,
    0xaf3b78ad690a4374,
    0xb123f581d2ac258f,
    0xb311c412a9112489,
    0xb504f333f9de6484,
    0xb6fd91e328d17791,
    0xb8fbaf4762fb9ee9,
    0xbaff5ab2133e45fb,
    0xbd08a39f580c36be,
    0xbf1799b67a731082,
    0xc12c4cca66709456,
    0xc346ccda24976407,
    0xc5672a115506dadd,
    0xc78d74c8abb9b15c,
    0xc9b9bd866e2f27a2,
    0xcbec14fef2727c5c,
    0xce248c151f8480e3,
    0xd06333daef2b2594,
    0xd2a81d91f12ae45a,
    0xd4f35aabcfedfa1f,
    0xd744fccad69d6af4,
    0xd99d15c278afd7b5,
    0xdbfbb797daf23755,
    0xde60f4825e0e9123,
    0xe0ccdeec2a94e111,
    0xe33f8972be8a5a51,
    0xe5b906e77c8348a8,
    0xe8396a503c4bdc68,
    0xeac0c6e7dd24392e,
    0xed4f301ed9942b84,
    0xefe4b99bdcdaf5cb,
    0xf281773c59ffb139,
    0xf5257d152486cc2c,
    0xf7d0df730ad13bb8,
    0xfa83b2db722a033a,
    0xfd3e0c0cf486c174,
];

/// Index of the histogram bucket holding a latency of `nanos` nanoseconds.
///
/// Bucket `i` covers `(2^(i/64), 2^((i+1)/64)]` ns, exactly OTLP's exponential histogram
/// at scale 6 (upper bound inclusive), so buckets map onto OTLP without further error.
/// Zero is treated as 1 ns. No loops and no floating point: it runs in the kernel.
#[inline(always)]
pub fn bucket_index(nanos: u64) -> i32 {
    let nanos = if nanos == 0 { 1 } else { nanos };
    let msb = 63 - nanos.leading_zeros();
    // The mantissa, normalised so its top bit is set: value = 2^msb * mantissa / 2^63.
    let mantissa = nanos << (63 - msb);
    if mantissa == 1 << 63 {
        // An exact power of two is the inclusive upper bound of the bucket below.
        return (msb * BUCKETS_PER_DOUBLING) as i32 - 1;
    }
    // Largest k with BOUNDARIES[k] < mantissa: a binary search unrolled into six steps.
    let mut k = 0usize;
    let mut step = 32usize;
    while step > 0 {
        let probe = (k + step) & 63;
        if BOUNDARIES[probe] < mantissa {
            k = probe;
        }
        step >>= 1;
    }
    (msb * BUCKETS_PER_DOUBLING) as i32 + k as i32
}

/// Which side of a connection a request was measured on.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The traced process served the request (it accepted the connection).
    Server = 1,
    /// The traced process made the request (it connected).
    Client = 2,
}

/// HTTP request methods recognised in the kernel; `0` is "other/unknown".
pub mod method {
    pub const UNKNOWN: u8 = 0;
    pub const GET: u8 = 1;
    pub const POST: u8 = 2;
    pub const PUT: u8 = 3;
    pub const DELETE: u8 = 4;
    pub const HEAD: u8 = 5;
    pub const PATCH: u8 = 6;
    pub const OPTIONS: u8 = 7;
    pub const CONNECT: u8 = 8;
    pub const TRACE: u8 = 9;

    /// The method's name, for labels.
    pub fn name(method: u8) -> &'static str {
        match method {
            GET => "GET",
            POST => "POST",
            PUT => "PUT",
            DELETE => "DELETE",
            HEAD => "HEAD",
            PATCH => "PATCH",
            OPTIONS => "OPTIONS",
            CONNECT => "CONNECT",
            TRACE => "TRACE",
            _ => "OTHER",
        }
    }
}

/// One latency series in one window: what the kernel counts requests under.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    /// cgroup v2 id of the thread that completed the request.
    pub cgroup_id: u64,
    /// Window number: (wall-clock ns) / window length. Kernel and user space agree on it
    /// through [`AgentSettings`].
    pub window: u32,
    /// Process (tgid) that served or made the request.
    pub tgid: u32,
    /// [`route_hash`] of the request path (ids normalised), 0 when not captured.
    pub route: u32,
    /// Remote IPv4 address (network byte order) of a client-side request, or with
    /// `peer_ipv6` the [`peer_hash`] of its IPv6 address; 0 otherwise.
    pub peer_addr: u32,
    /// Remote port of a client-side request (host byte order); 0 otherwise.
    pub peer_port: u16,
    /// [`Direction`] as u8.
    pub direction: u8,
    /// One of [`method`].
    pub method: u8,
    /// 1 when the peer is an IPv6 address (not IPv4-mapped): `peer_addr` is its hash, and
    /// the series' first event carries the address.
    pub peer_ipv6: u8,
    pub _pad: u8,
    /// The response's status code as its status line gave it (three digits, 100..=999),
    /// so that each status has its own histogram: a latency is attributed to its status
    /// exactly, at no extra cost (the key's size is unchanged).
    pub status: u16,
}

/// Totals of one series in one window (user space counts them from the kernel's
/// [`FinishedRequest`] records).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeriesTotals {
    pub count: u64,
    pub sum_nanos: u64,
    pub min_nanos: u64,
    pub max_nanos: u64,
}

impl SeriesTotals {
    /// Counts one request of `latency_nanos`.
    #[inline]
    pub fn record(&mut self, latency_nanos: u64) {
        if self.count == 0 || latency_nanos < self.min_nanos {
            self.min_nanos = latency_nanos;
        }
        self.max_nanos = self.max_nanos.max(latency_nanos);
        self.count += 1;
        self.sum_nanos += latency_nanos;
    }

    /// Adds `other`'s requests (series merged into a window, statuses into a whole):
    /// counts and sums add, min and max take the extremes; an empty `other` changes nothing.
    pub fn merge(&mut self, other: &Self) {
        if other.count == 0 {
            return;
        }
        self.min_nanos = if self.count == 0 {
            other.min_nanos
        } else {
            self.min_nanos.min(other.min_nanos)
        };
        self.max_nanos = self.max_nanos.max(other.max_nanos);
        self.count += other.count;
        self.sum_nanos += other.sum_nanos;
    }
}

/// Settings user space writes into the single-entry `SETTINGS` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentSettings {
    /// Window length in nanoseconds; 0 means "not configured yet: count nothing".
    pub window_nanos: u64,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC in ns, so the kernel's monotonic clock can be turned
    /// into wall-clock window numbers. User space refreshes it every window.
    pub realtime_offset_nanos: u64,
    /// Requests at least this slow are sent to user space as exemplars; 0 disables.
    pub slow_threshold_nanos: u64,
    /// Other requests are sampled as exemplars when `bpf_get_prandom_u32() < sample_below`.
    pub sample_below: u32,
    /// 1: trace every process (standalone mode). 0: only cgroups in `TRACED_CGROUPS`.
    pub trace_all: u32,
    /// The agent's own tgid, never traced (its own HTTP endpoints would feed back).
    pub agent_tgid: u32,
    /// Which directions to trace when `trace_all` is 1: bit 0 server, bit 1 client. (A
    /// traced cgroup's own [`CgroupRule`] says it otherwise.)
    pub directions: u32,
}

/// What is traced of one cgroup: the value of `TRACED_CGROUPS`, read when a connection of
/// the cgroup is adopted (never per request).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupRule {
    /// Directions traced ([`Direction`] bits).
    pub directions: u8,
    /// Directions whose connections are traced only on the ports listed in `TRACED_PORTS`
    /// for this cgroup (local ports server side, the peer's client side).
    pub port_filtered: u8,
    pub _pad: [u8; 6],
}

/// Key of `TRACED_PORTS`: a port on which a port-filtered cgroup's connections of one
/// direction are traced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub cgroup_id: u64,
    pub port: u16,
    /// [`Direction`] as u8.
    pub direction: u8,
    pub _pad: [u8; 5],
}

/// `Connection::direction` of a connection seen and deliberately not traced (its port is not
/// selected): its receives and sends stop at the lookup that finds it.
pub const IGNORED_CONNECTION: u8 = 0;

/// Bytes of a request path kept for routes and exemplars.
pub const PATH_LEN: usize = 64;

/// Bytes of a request inspected, in one read: the longest "METHOD " ("OPTIONS ", 8 bytes)
/// and the path after it.
pub const HEAD_LEN: usize = 8 + PATH_LEN;

/// Flags of a [`RequestEvent`].
pub mod event_flag {
    /// Names what the request's series refers to: the path its route hash stands for, the
    /// process's name, the IPv6 peer its hash stands for. Sent for a connection's first
    /// request, and for a request whose route the agent has not learnt yet (not in
    /// `KNOWN_ROUTES`).
    pub const ANNOUNCE: u8 = 1;
    /// Slow, failed or sampled: keep as an exemplar.
    pub const EXEMPLAR: u8 = 2;
}

/// One request sent to user space through the `EVENTS` ring buffer, with its path: only to
/// announce a route, process or peer, and for exemplars, never for every request.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestEvent {
    pub series: SeriesKey,
    /// `bpf_ktime_get_ns` at the request's start.
    pub start_nanos: u64,
    pub duration_nanos: u64,
    pub tid: u32,
    pub status: u16,
    /// [`event_flag`] bits.
    pub flags: u8,
    /// Valid bytes in `path`.
    pub path_len: u8,
    pub path: [u8; PATH_LEN],
    /// Name of the thread (`comm`), so a process that exits before its window closes is
    /// still named.
    pub comm: [u8; 16],
    /// The peer's IPv6 address when `series.peer_ipv6` is 1.
    pub peer_addr6: [u8; 16],
}

/// A finished request as the kernel hands it to user space through the `REQUESTS` ring
/// buffer: its series and latency, nothing else. User space counts it into the series'
/// totals and histogram (see [`bucket_index`]): a per-CPU hash lookup per series and per
/// bucket in the kernel, found cold between requests, cost about three times as much as
/// writing this record (bench/results/capture.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinishedRequest {
    pub series: SeriesKey,
    pub latency_nanos: u64,
}

/// FNV-1a of an IPv6 address, never 0: how a series names an IPv6 peer in its 4 bytes.
#[inline(always)]
pub fn peer_hash(address: &[u8; 16]) -> u32 {
    let mut hash = FNV_OFFSET;
    let mut index = 0;
    while index < 16 {
        hash = (hash ^ u32::from(address[index])).wrapping_mul(FNV_PRIME);
        index += 1;
    }
    if hash == 0 { 1 } else { hash }
}

/// FNV-1a over a request path with its all-digit segments replaced by `{id}`, so
/// `/users/42` and `/users/7` share a series; and the path's length. Stops at `?`, `#`, a
/// space, a line end or NUL.
///
/// Written for the BPF verifier: one bounded loop whose only data-dependent state is two
/// one-bit flags, so verification stays linear in PATH_LEN. (Longer id shapes such as UUIDs
/// are folded in user space, when routes are named.)
#[inline(always)]
pub fn route_hash(path: &[u8; PATH_LEN]) -> (u32, usize) {
    route_hash_at(path, 0)
}

/// [`route_hash`] of the (at most [`PATH_LEN`]) bytes of `bytes` from `start` on, which
/// stops at the end of `bytes` too: so the kernel hashes a request's path where it lies in
/// the request's head, without copying it out first.
#[inline(always)]
pub fn route_hash_at<const N: usize>(bytes: &[u8; N], start: usize) -> (u32, usize) {
    let mut hash = FNV_OFFSET;
    let mut segment = FNV_OFFSET;
    let mut all_digits = 1u32;
    let mut non_empty = 0u32;
    let mut index = 0usize;
    while index < PATH_LEN {
        let Some(&byte) = bytes.get(start + index) else {
            break;
        };
        if byte == b'?'
            || byte == b'#'
            || byte == b' '
            || byte == b'\r'
            || byte == b'\n'
            || byte == 0
        {
            break;
        }
        if byte == b'/' {
            hash = fold_segment(hash, segment, all_digits, non_empty);
            hash = (hash ^ u32::from(b'/')).wrapping_mul(FNV_PRIME);
            segment = FNV_OFFSET;
            all_digits = 1;
            non_empty = 0;
        } else {
            segment = (segment ^ u32::from(byte)).wrapping_mul(FNV_PRIME);
            non_empty = 1;
            if !byte.is_ascii_digit() {
                all_digits = 0;
            }
        }
        index += 1;
    }
    hash = fold_segment(hash, segment, all_digits, non_empty);
    // 0 means "no route": keep real hashes away from it.
    (if hash == 0 { 1 } else { hash }, index)
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;
/// Mixed in for an id segment: "{id}" as a u32.
const ID_MARK: u32 = 0x7b69_647d;

#[inline(always)]
fn fold_segment(hash: u32, segment: u32, all_digits: u32, non_empty: u32) -> u32 {
    if non_empty == 0 {
        hash
    } else if all_digits == 1 {
        (hash ^ ID_MARK).wrapping_mul(FNV_PRIME)
    } else {
        (hash ^ segment).wrapping_mul(FNV_PRIME)
    }
}

/// Indices of the per-CPU `DROPS` counters: every place the kernel side gives up on a
/// request counts it here, and the agent exports the counts.
pub mod drop_reason {
    /// The connection table was full: a new connection is not traced.
    pub const CONNECTION_TABLE_FULL: u32 = 0;
    /// The agent's table of open series was full: a finished request was not counted.
    /// (Counted in user space, where requests are counted into series.)
    pub const SERIES_TABLE_FULL: u32 = 1;
    /// The agent's table of histogram buckets was full: a request's latency bucket was not
    /// counted (its series' count, sum, min and max were). (Counted in user space.)
    pub const HISTOGRAM_TABLE_FULL: u32 = 2;
    /// A connection closed while a request on it had no response yet.
    pub const UNANSWERED_AT_CLOSE: u32 = 3;
    /// The ring buffer to user space was full: an exemplar or route name was lost.
    pub const EVENT_RING_FULL: u32 = 4;
    /// A traced process sent (server side) or received (client side) a final response on
    /// a connection without a request in flight: a request not timed. Its connection
    /// entry was evicted from a full table while the request was out, the table had no
    /// room for it, or its request line was not one we parse or began before the agent.
    pub const RESPONSE_WITHOUT_REQUEST: u32 = 5;
    /// The `REQUESTS` ring buffer to user space was full: a finished request was not
    /// counted (the agent fell behind by the ring's capacity).
    pub const REQUEST_RING_FULL: u32 = 6;
    /// Number of counters.
    pub const COUNT: u32 = 7;

    /// Stable metric label of a counter.
    pub fn name(reason: u32) -> &'static str {
        match reason {
            CONNECTION_TABLE_FULL => "connection_table_full",
            SERIES_TABLE_FULL => "series_table_full",
            HISTOGRAM_TABLE_FULL => "histogram_table_full",
            UNANSWERED_AT_CLOSE => "unanswered_at_close",
            EVENT_RING_FULL => "event_ring_full",
            RESPONSE_WITHOUT_REQUEST => "response_without_request",
            REQUEST_RING_FULL => "request_ring_full",
            _ => "unknown",
        }
    }
}

/// Indices of the per-CPU `CONNECTION_COUNTS` counters. Entries leave the connection table
/// when their socket closes (forgotten), when the agent clears it, or when the table is full
/// and the least recently used one is evicted, which the kernel reports to no one: the
/// agent counts evictions as adopted - forgotten - cleared - still in the table.
pub mod connection_count {
    /// New entries: a connection adopted at its first request line.
    pub const ADOPTED: u32 = 0;
    /// Entries removed because their socket closed.
    pub const FORGOTTEN: u32 = 1;
    /// Number of counters.
    pub const COUNT: u32 = 2;
}

/// A traced connection, the value of the kernel's `CONNECTIONS` map (keyed by the socket's
/// kernel address). Only the kernel reads it; user space clears the map after a detach.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// `bpf_ktime_get_ns` when the current request started; 0 when idle.
    pub request_start_nanos: u64,
    /// Server side: when the receive that started the last request returned. Requests
    /// pipelined behind it arrived in that receive (or just after), so a status line sent
    /// on an idle connection answers one of them and is timed from here. 0: none pending.
    pub batch_start_nanos: u64,
    /// Client side: the peer's IPv4 address (network order) or [`peer_hash`] of its IPv6
    /// address, 0 otherwise.
    pub peer_addr: u32,
    /// [`route_hash`] of the current request's path.
    pub route: u32,
    /// Client side: the peer's port, 0 otherwise.
    pub peer_port: u16,
    /// [`Direction`] as u8, or [`IGNORED_CONNECTION`].
    pub direction: u8,
    /// One of [`method`].
    pub method: u8,
    /// Bytes of the path (from `path_offset` in `head`) that `route` hashed.
    pub path_len: u8,
    /// Client side: 1 when the peer is an IPv6 address (see [`SeriesKey::peer_ipv6`]).
    pub peer_ipv6: u8,
    /// Where the path starts in `head` (the length of "METHOD ").
    pub path_offset: u8,
    /// 1 when the connection's next finished request is to be announced
    /// ([`event_flag::ANNOUNCE`]): set when it is adopted and when its route changes to one
    /// the agent has not learnt; cleared once the announcement is sent.
    pub announce: u8,
    /// The first [`HEAD_LEN`] bytes of the current request as received (server side) or
    /// sent (client side). The next request on the connection is compared with them: when
    /// it begins with the very same bytes (a keep-alive client asking for the same path
    /// again), `method`, `route` and `path_len` stand as they are, and nothing is parsed,
    /// copied or hashed again. A head that starts with 0 matches no request.
    pub head: [u8; HEAD_LEN],
    /// Client side: the peer's IPv6 address when `peer_ipv6` is 1.
    pub peer_addr6: [u8; 16],
}

/// How many times each of the benchmark's `cost_*` programs repeats its operation.
pub const COST_REPEATS: u32 = 8;

/// Slots of the traced-cgroup table `TRACED_CGROUP_SLOTS`: a power of two.
pub const CGROUP_SLOTS: u32 = 65_536;

/// A slot that several traced cgroups share: the exact set `TRACED_CGROUPS` decides. (An
/// empty slot holds 0, which is no cgroup's id: the root cgroup's is 1.)
pub const CGROUP_SLOT_SHARED: u64 = u64::MAX;

/// The slot of `cgroup_id` in the traced-cgroup table. cgroup ids are inode numbers, handed
/// out in sequence, so their low bits spread well.
#[inline(always)]
pub fn cgroup_slot(cgroup_id: u64) -> u32 {
    (cgroup_id as u32) & (CGROUP_SLOTS - 1)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are #[repr(C)] structs of integers with explicit padding fields, so
    // every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::SeriesKey {}
    unsafe impl aya::Pod for super::SeriesTotals {}
    unsafe impl aya::Pod for super::AgentSettings {}
    unsafe impl aya::Pod for super::RequestEvent {}
    unsafe impl aya::Pod for super::FinishedRequest {}
    unsafe impl aya::Pod for super::Connection {}
    unsafe impl aya::Pod for super::CgroupRule {}
    unsafe impl aya::Pod for super::PortKey {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn totals_merge_and_record_ignore_empty_totals_for_min() {
        let mut sum = SeriesTotals::default();
        for part in [
            SeriesTotals::default(),
            SeriesTotals {
                count: 2,
                sum_nanos: 30,
                min_nanos: 10,
                max_nanos: 20,
            },
            SeriesTotals {
                count: 1,
                sum_nanos: 5,
                min_nanos: 5,
                max_nanos: 5,
            },
        ] {
            sum.merge(&part);
        }
        let expected = SeriesTotals {
            count: 3,
            sum_nanos: 35,
            min_nanos: 5,
            max_nanos: 20,
        };
        assert_eq!(sum, expected);
        let mut recorded = SeriesTotals::default();
        for latency in [10, 5, 20] {
            recorded.record(latency);
        }
        assert_eq!(recorded, expected);
    }

    #[test]
    fn boundaries_are_two_to_the_k_over_64() {
        for (k, &boundary) in BOUNDARIES.iter().enumerate() {
            let exact = 2f64.powf(k as f64 / 64.0) * 2f64.powi(63);
            let relative = (boundary as f64 - exact).abs() / exact;
            assert!(
                relative < 1e-14,
                "BOUNDARIES[{k}] = {boundary:#x}, expected ≈ {exact}"
            );
        }
        assert!(BOUNDARIES.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn bucket_index_matches_the_otlp_definition() {
        // OTLP: index = ceil(log2(v) * 2^scale) - 1. Checked on a dense sweep from 1 µs to
        // 60 s, skipping values within float error of a boundary.
        let mut v: u64 = 1_000;
        while v < 60_000_000_000 {
            let exact = (v as f64).log2() * 64.0;
            if (exact - exact.round()).abs() > 1e-9 {
                let expected = exact.ceil() as i32 - 1;
                assert_eq!(bucket_index(v), expected, "v = {v}");
            }
            v += v / 997 + 1;
        }
    }

    #[test]
    fn powers_of_two_close_their_bucket() {
        for exponent in 0..63 {
            let v = 1u64 << exponent;
            assert_eq!(bucket_index(v), exponent * 64 - 1, "v = {v}");
            // From 2^7 on, v + 1 is within the first sub-bucket above the power of two.
            if exponent >= 7 {
                assert_eq!(bucket_index(v + 1), exponent * 64, "v = {v} + 1");
            }
        }
    }

    #[test]
    fn relative_error_of_bucket_midpoint_is_below_one_percent() {
        let base = 2f64.powf(1.0 / 64.0);
        for v in [1_000u64, 1_234, 20_000_000, 59_999_999_999] {
            let index = bucket_index(v);
            let lower = base.powi(index);
            let upper = lower * base;
            let estimate = 2.0 * lower * upper / (lower + upper);
            assert!(((estimate - v as f64) / v as f64).abs() < 0.0055, "v = {v}");
        }
    }

    #[test]
    fn shared_types_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<SeriesKey>(), 32);
        assert_eq!(size_of::<FinishedRequest>(), 40);
        // The kernel copies IPv6 addresses between these a word at a time.
        assert_eq!(core::mem::offset_of!(Connection, peer_addr6) % 8, 0);
        assert_eq!(core::mem::offset_of!(RequestEvent, peer_addr6) % 8, 0);
        assert_eq!(core::mem::align_of::<Connection>(), 8);
        assert_eq!(core::mem::align_of::<RequestEvent>(), 8);
        assert_eq!(size_of::<SeriesTotals>(), 32);
        assert_eq!(size_of::<AgentSettings>(), 40);
        assert_eq!(
            size_of::<RequestEvent>(),
            32 + 8 + 8 + 4 + 2 + 1 + 1 + PATH_LEN + 16 + 16
        );
        assert_eq!(
            size_of::<Connection>(),
            8 + 8 + 4 + 4 + 2 + 1 + 1 + 1 + 1 + 1 + 1 + HEAD_LEN + 16
        );
        assert_eq!(size_of::<CgroupRule>(), 8);
        assert_eq!(size_of::<PortKey>(), 16);
    }

    fn hash(path: &str) -> u32 {
        let mut buffer = [0u8; PATH_LEN];
        let len = path.len().min(PATH_LEN);
        buffer[..len].copy_from_slice(&path.as_bytes()[..len]);
        route_hash(&buffer).0
    }

    #[test]
    fn ipv6_peers_hash_apart_and_never_to_zero() {
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        let mut other = loopback;
        other[15] = 2;
        assert_ne!(peer_hash(&loopback), peer_hash(&other));
        assert_ne!(peer_hash(&[0; 16]), 0);
    }

    #[test]
    fn route_hash_folds_ids_and_ignores_queries() {
        assert_eq!(hash("/users/42"), hash("/users/7"));
        assert_eq!(hash("/users/42/orders"), hash("/users/1/orders"));
        assert_ne!(hash("/users/42"), hash("/users/42/orders"));
        assert_ne!(hash("/users/me"), hash("/users/42"));
        assert_eq!(hash("/items?page=2"), hash("/items"));
        assert_eq!(hash("/a HTTP/1.1"), hash("/a"));
        let mut buffer = [0u8; PATH_LEN];
        buffer[..9].copy_from_slice(b"/a/1?q=2 ");
        assert_eq!(route_hash(&buffer).1, 4, "length stops at the query");
        assert_ne!(
            hash("/v1/items"),
            hash("/v2/items"),
            "short mixed segments stay"
        );
        assert_ne!(hash(""), 0);
    }

    #[test]
    fn route_hash_at_an_offset_hashes_the_path_there() {
        let mut head = [0u8; HEAD_LEN];
        let line = b"DELETE /users/42/orders?x=1 HTTP/1.1";
        head[..line.len()].copy_from_slice(line);
        assert_eq!(route_hash_at(&head, 7), (hash("/users/7/orders"), 16));
        // A long path stops after PATH_LEN bytes, and at the end of the head.
        let mut long = [b'a'; HEAD_LEN];
        long[..5].copy_from_slice(b"POST ");
        long[5] = b'/';
        assert_eq!(route_hash_at(&long, 5).1, PATH_LEN);
        assert_eq!(route_hash_at(&long, HEAD_LEN - 3).1, 3);
        assert_eq!(route_hash_at(&[0u8; HEAD_LEN], 4).0, hash(""));
    }
}
