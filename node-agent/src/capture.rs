//! Capture: loads the kernel programs, attaches them to the socket tracepoints, and reads
//! what they send up: every finished request (counted into series by [`SeriesCounter`]),
//! announcements and exemplars.
//!
//! The kernel numbers windows itself (wall-clock ns / window length, through
//! [`AgentSettings`]), so a request belongs to the window in which its response was written,
//! exactly, whatever the timing of the user-space drain.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs,
    time::Duration,
};

use aya::{
    Ebpf, include_bytes_aligned,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, raw_trace_point::RawTracePointLinkId},
};
use trazor_node_agent_ebpf_common::{
    AgentSettings, CGROUP_SLOT_SHARED, CgroupRule, Connection, Direction, FinishedRequest, PortKey,
    RequestEvent, SeriesKey, SeriesTotals, cgroup_slot, connection_count, drop_reason,
};

use crate::{Error, Result, count::SeriesCounter};

/// The kernel side's programs (see the eBPF crate), each attached as a raw tracepoint to
/// the tracepoint of the same name. The programs that end connections come first: a
/// connection must never be tracked without its end being seen.
pub const PROGRAMS: &[&str] = &[
    "tcp_destroy_sock",
    "inet_sock_set_state",
    "sock_recv_length",
    "sock_send_length",
];
/// An empty program, for benchmarks: attached to every tracepoint of [`PROGRAMS`], it
/// measures the cost of the mechanism alone.
pub const FLOOR: &str = "floor";
/// Programs for benchmarks that price one operation of the traced path each, repeated
/// [`trazor_node_agent_ebpf_common::COST_REPEATS`] times per call, attached like [`FLOOR`]:
/// a clock read, a read of the socket call's user buffer, a hash lookup.
pub const COST_CLOCK_READ: &str = "cost_clock_read";
pub const COST_USER_READ: &str = "cost_user_read";
pub const COST_LOOKUP: &str = "cost_lookup";

/// One series of one closed window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedSeries {
    pub key: SeriesKey,
    pub totals: SeriesTotals,
    /// Histogram bucket index → count.
    pub buckets: BTreeMap<i32, u64>,
}

/// One program's run statistics and sizes, as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    /// Time spent running it, summed over calls (kernel statistics on only).
    pub run_time_nanos: u64,
    /// Calls counted while the statistics were on.
    pub run_count: u64,
    /// Size of its eBPF code after the verifier's rewrites (8 bytes per instruction).
    pub translated_bytes: u32,
    /// Size of its JIT-compiled machine code.
    pub jitted_bytes: u32,
}

/// Connections the kernel tracks at once unless told otherwise (about 5 MiB of kernel
/// memory).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 32_768;
/// Bounds of the connection table's size: below, each CPU's reserve of free entries would
/// be most of the table; above, the table alone would take hundreds of MiB of kernel memory.
pub const MIN_CONNECTIONS: u32 = 64;
pub const MAX_CONNECTIONS: u32 = 1 << 20;

/// The kernel's connection table as the agent last looked at it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionTable {
    /// Entries the table holds at most.
    pub capacity: u32,
    /// Connections tracked now.
    pub tracked: u64,
    /// Of those, the ones with a request in flight.
    pub in_flight: u64,
    /// How long the oldest request in flight has been waiting for its response.
    pub oldest_in_flight: Option<Duration>,
    /// Entries evicted to make room in a full table since the programs were loaded. Exact
    /// when no connection opens or closes during the look; otherwise a lower bound (it is
    /// adopted - forgotten - cleared - tracked, and the kernel's counters move while the
    /// table is read), except for a close that is between removing its entry and counting
    /// the removal at that very moment.
    pub evicted: u64,
}

/// Entries of the kernel's `KNOWN_ROUTES` (`MAX_KNOWN_ROUTES` in the eBPF crate).
const MAX_KNOWN_ROUTES: usize = 16_384;

/// Events read per drain at most, so a flood cannot stall the window loop.
const MAX_EVENTS_PER_DRAIN: usize = 65_536;

/// What the kernel side counts, and which requests it sends up as exemplars.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureSettings {
    /// Window length: whole seconds, 1 s to 5 min.
    pub window: Duration,
    /// Requests at least this slow become exemplars.
    pub slow_threshold: Option<Duration>,
    /// Fraction of other requests sampled as exemplars, in [0, 1].
    pub sample_rate: f64,
    /// Trace requests served (accepted connections), when tracing every process.
    pub server: bool,
    /// Trace requests made (connected sockets), when tracing every process.
    pub client: bool,
    /// None: trace every process. Some: only these cgroup ids, each as its rule says.
    pub cgroups: Option<BTreeMap<u64, TraceRule>>,
}

/// What is traced of a selected cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceRule {
    /// Requests served.
    pub server: bool,
    /// Requests made.
    pub client: bool,
    /// Server side, only connections to these local ports (all when empty).
    pub server_ports: BTreeSet<u16>,
    /// Client side, only connections to peers on these ports (all when empty).
    pub client_ports: BTreeSet<u16>,
}

impl TraceRule {
    /// These directions, on every port.
    pub fn every_port(server: bool, client: bool) -> Self {
        Self {
            server,
            client,
            ..Self::default()
        }
    }

    /// Each of `cgroups` traced in these directions, on every port.
    pub fn every_port_of(
        cgroups: impl IntoIterator<Item = u64>,
        server: bool,
        client: bool,
    ) -> BTreeMap<u64, Self> {
        cgroups
            .into_iter()
            .map(|id| (id, Self::every_port(server, client)))
            .collect()
    }

    /// What tracing by either rule traces: each direction either traces, on the ports of
    /// both (every port if either has no list).
    pub fn union(&self, other: &TraceRule) -> TraceRule {
        TraceRule {
            server: self.server || other.server,
            client: self.client || other.client,
            server_ports: union_ports(
                (self.server, &self.server_ports),
                (other.server, &other.server_ports),
            ),
            client_ports: union_ports(
                (self.client, &self.client_ports),
                (other.client, &other.client_ports),
            ),
        }
    }

    fn in_kernel(&self) -> CgroupRule {
        let bits = |server: bool, client: bool| {
            (u8::from(server) * Direction::Server as u8)
                | (u8::from(client) * Direction::Client as u8)
        };
        CgroupRule {
            directions: bits(self.server, self.client),
            port_filtered: bits(
                self.server && !self.server_ports.is_empty(),
                self.client && !self.client_ports.is_empty(),
            ),
            _pad: [0; 6],
        }
    }

    fn port_keys(&self, cgroup_id: u64) -> impl Iterator<Item = PortKey> + '_ {
        let key = move |direction: Direction| {
            move |&port: &u16| PortKey {
                cgroup_id,
                port,
                direction: direction as u8,
                _pad: [0; 5],
            }
        };
        let server = self
            .server
            .then_some(&self.server_ports)
            .into_iter()
            .flatten();
        let client = self
            .client
            .then_some(&self.client_ports)
            .into_iter()
            .flatten();
        server
            .map(key(Direction::Server))
            .chain(client.map(key(Direction::Client)))
    }
}

/// The ports one direction is traced on under either of two rules, given whether each
/// traces that direction and on which ports (empty: every port).
fn union_ports(
    (traced, ports): (bool, &BTreeSet<u16>),
    (other_traced, other_ports): (bool, &BTreeSet<u16>),
) -> BTreeSet<u16> {
    match (traced, other_traced) {
        (false, false) => BTreeSet::new(),
        (true, false) => ports.clone(),
        (false, true) => other_ports.clone(),
        (true, true) if ports.is_empty() || other_ports.is_empty() => BTreeSet::new(),
        (true, true) => ports.union(other_ports).copied().collect(),
    }
}

/// The loaded, attached kernel programs and their maps.
pub struct KernelCapture {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    /// Every finished request, from the kernel.
    requests: RingBuf<MapData>,
    counter: SeriesCounter,
    /// The records of one drain (kept for its capacity).
    request_batch: Vec<FinishedRequest>,
    /// Route hashes written to `KNOWN_ROUTES`.
    known_routes: HashSet<u32>,
    settings: AgentSettings,
    links: Links,
    /// The non-empty slots of `TRACED_CGROUP_SLOTS`, as last written.
    cgroup_slots: HashMap<u32, u64>,
    /// The rules of the traced cgroups, as last written.
    rules: BTreeMap<u64, TraceRule>,
    max_connections: u32,
    /// Connection entries the agent removed itself (after a detach, or a rule change).
    cleared_connections: u64,
    /// The highest eviction count seen (each look gives a lower bound).
    evicted_connections: u64,
}

/// The attachments of the loaded programs: (program, link) per tracepoint.
#[derive(Default)]
struct Links {
    attached: Vec<(&'static str, RawTracePointLinkId)>,
    /// A benchmark's program attached in place of ours ([`FLOOR`], a `COST_` one).
    stand_in: Option<&'static str>,
}

impl Links {
    fn is_attached(&self) -> bool {
        !self.attached.is_empty() && self.stand_in.is_none()
    }

    /// Attaches each program to its tracepoint, or a stand-in to all of them: all or none
    /// (what a failure left attached is detached again).
    fn attach(&mut self, ebpf: &mut Ebpf, stand_in: Option<&'static str>) -> Result<()> {
        self.stand_in = stand_in;
        for &tracepoint in PROGRAMS {
            let name = stand_in.unwrap_or(tracepoint);
            match attach_one(ebpf, name, tracepoint) {
                Ok(link) => self.attached.push((name, link)),
                Err(error) => {
                    let _ = self.detach(ebpf);
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        for (name, link) in self.attached.drain(..) {
            let program: &mut RawTracePoint = program(ebpf, name)?;
            program.detach(link).map_err(Error::program(name))?;
        }
        Ok(())
    }
}

fn attach_one(
    ebpf: &mut Ebpf,
    name: &str,
    tracepoint: &'static str,
) -> Result<RawTracePointLinkId> {
    let program: &mut RawTracePoint = program(ebpf, name)?;
    if program.fd().is_err() {
        program.load().map_err(Error::program(name))?;
    }
    program.attach(tracepoint).map_err(|source| Error::Attach {
        tracepoint,
        source: Box::new(source),
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Error::MissingInObject {
            kind: "program",
            name: name.to_owned(),
        })?
        .try_into()
        .map_err(Error::program(name))
}

impl KernelCapture {
    /// Loads and attaches everything, with room for `max_connections` traced connections
    /// at once ([`DEFAULT_MAX_CONNECTIONS`] suits most hosts); counting starts with
    /// [`KernelCapture::configure`].
    pub fn load(max_connections: u32) -> Result<Self> {
        check_max_connections(max_connections)?;
        check_privileges()?;
        raise_memlock_limit();
        // No kernel BTF in user space: the program needs no CO-RE relocation (the verifier
        // checks its register loads against the kernel's own BTF), and parsing vmlinux BTF
        // here would double the agent's peak memory.
        let mut ebpf = aya::EbpfLoader::new()
            .btf(None)
            .map_max_entries("CONNECTIONS", max_connections)
            .load(include_bytes_aligned!(concat!(env!("OUT_DIR"), "/trazor")))
            .map_err(|error| Error::Load(Box::new(error)))?;
        let mut capture_links = Links::default();
        capture_links.attach(&mut ebpf, None)?;
        let mut ring = |name: &'static str| {
            RingBuf::try_from(ebpf.take_map(name).ok_or(Error::MissingInObject {
                kind: "map",
                name: name.to_owned(),
            })?)
            .map_err(Error::map(name))
        };
        let events = ring("EVENTS")?;
        let requests = ring("REQUESTS")?;
        Ok(Self {
            ebpf,
            events,
            requests,
            counter: SeriesCounter::default(),
            request_batch: Vec::new(),
            known_routes: HashSet::new(),
            settings: AgentSettings::default(),
            links: capture_links,
            cgroup_slots: HashMap::new(),
            rules: BTreeMap::new(),
            max_connections,
            cleared_connections: 0,
            evicted_connections: 0,
        })
    }

    /// Whether our programs are attached to their tracepoints now (not detached for an
    /// empty selection, not replaced by a benchmark's stand-in).
    pub fn is_attached(&self) -> bool {
        self.links.is_attached()
    }

    /// Detaches every program: the kernel stops calling them until [`KernelCapture::attach`].
    pub fn detach(&mut self) -> Result<()> {
        self.links.detach(&mut self.ebpf)
    }

    /// Attaches the programs again after [`KernelCapture::detach`]. Connections are
    /// forgotten (their closes went unseen while detached) and adopted again at their next
    /// request line.
    pub fn attach(&mut self) -> Result<()> {
        if self.links.is_attached() {
            return Ok(());
        }
        self.links.detach(&mut self.ebpf)?;
        self.forget_connections(|_| true)?;
        self.links.attach(&mut self.ebpf, None)
    }

    /// Removes the connection entries `forget` picks; each is adopted again (and judged by
    /// the rules of the moment) at its next request line. An entry forgotten while a request
    /// starts on it loses that request, counted as `response_without_request`.
    fn forget_connections(&mut self, forget: impl Fn(&Connection) -> bool) -> Result<()> {
        let mut connections: BpfHashMap<&mut MapData, u64, Connection> =
            hash_map(&mut self.ebpf, "CONNECTIONS")?;
        let sockets: Vec<u64> = connections
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(_, connection)| forget(connection))
            .map(|(socket, _)| socket)
            .collect();
        for socket in sockets {
            // Gone already (closed or evicted since the listing): fine.
            if connections.remove(&socket).is_ok() {
                self.cleared_connections += 1;
            }
        }
        Ok(())
    }

    /// Looks through the connection table: how full it is, the requests in flight, and how
    /// many entries were evicted so far. Costs two system calls per tracked connection.
    pub fn connection_table(&mut self) -> Result<ConnectionTable> {
        // Adopted before the look and forgotten after it, so that connections opening and
        // closing meanwhile can only lower the eviction count (see ConnectionTable).
        let adopted = self.connection_count(connection_count::ADOPTED)?;
        let now = monotonic_nanos();
        let mut table = ConnectionTable {
            capacity: self.max_connections,
            ..ConnectionTable::default()
        };
        let mut oldest_start = u64::MAX;
        let connections: BpfHashMap<&MapData, u64, Connection> =
            BpfHashMap::try_from(map_ref(&self.ebpf, "CONNECTIONS")?)
                .map_err(Error::map("CONNECTIONS"))?;
        // An entry removed between listing its key and reading it is an error item: skipped.
        for (_, connection) in connections.iter().filter_map(|entry| entry.ok()) {
            table.tracked += 1;
            if connection.request_start_nanos != 0 {
                table.in_flight += 1;
                oldest_start = oldest_start.min(connection.request_start_nanos);
            }
        }
        if table.in_flight > 0 {
            table.oldest_in_flight = Some(Duration::from_nanos(now.saturating_sub(oldest_start)));
        }
        let forgotten = self.connection_count(connection_count::FORGOTTEN)?;
        let evicted = adopted
            .saturating_sub(forgotten)
            .saturating_sub(self.cleared_connections)
            .saturating_sub(table.tracked);
        self.evicted_connections = self.evicted_connections.max(evicted);
        table.evicted = self.evicted_connections;
        Ok(table)
    }

    fn connection_count(&self, index: u32) -> Result<u64> {
        let counts: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map_ref(&self.ebpf, "CONNECTION_COUNTS")?)
                .map_err(Error::map("CONNECTION_COUNTS"))?;
        Ok(counts
            .get(&index, 0)
            .map_err(Error::map("CONNECTION_COUNTS"))?
            .iter()
            .sum())
    }

    /// Benchmarks only: detaches the programs and attaches in their place `program`
    /// ([`FLOOR`] or a `COST_` one) on the same tracepoints.
    pub fn attach_stand_in(&mut self, program: &'static str) -> Result<()> {
        self.links.detach(&mut self.ebpf)?;
        self.links.attach(&mut self.ebpf, Some(program))
    }

    /// Starts (or changes) counting. Safe at any time: the traced set changes between two
    /// socket calls, and windows already counted are untouched. With an empty selection
    /// the programs are detached until something is selected again.
    pub fn configure(&mut self, settings: &CaptureSettings) -> Result<()> {
        let window = settings.window;
        let window_nanos = u64::try_from(window.as_nanos())
            .ok()
            .filter(|nanos| *nanos > 0)
            .ok_or_else(|| Error::Config(format!("window {window:?} out of range")))?;
        if let Some(cgroups) = &settings.cgroups {
            self.set_traced_cgroups(cgroups)?;
        }
        self.settings = AgentSettings {
            window_nanos,
            realtime_offset_nanos: realtime_offset_nanos(),
            slow_threshold_nanos: settings.slow_threshold.map_or(0, |threshold| {
                threshold.as_nanos().clamp(1, u64::MAX as u128) as u64
            }),
            sample_below: (settings.sample_rate.clamp(0.0, 1.0) * f64::from(u32::MAX)) as u32,
            trace_all: u32::from(settings.cgroups.is_none()),
            agent_tgid: std::process::id(),
            directions: u32::from(settings.server) | (u32::from(settings.client) << 1),
        };
        self.write_settings()?;
        // Nothing selected: detached, so a node without a selected pod pays nothing at all.
        match &settings.cgroups {
            Some(cgroups) if cgroups.is_empty() => {
                if self.links.is_attached() {
                    tracing::info!("no process selected: eBPF programs detached");
                }
                self.detach()
            }
            _ => self.attach(),
        }
    }

    /// Makes `cgroups` the exact set of traced cgroup ids, with their rules and ports.
    fn set_traced_cgroups(&mut self, cgroups: &BTreeMap<u64, TraceRule>) -> Result<()> {
        let ports: HashSet<PortKey> = cgroups
            .iter()
            .flat_map(|(&id, rule)| rule.port_keys(id))
            .collect();
        let mut traced_ports: BpfHashMap<&mut MapData, PortKey, u8> =
            hash_map(&mut self.ebpf, "TRACED_PORTS")?;
        let stale_ports = keys_not_kept(&traced_ports, |key| ports.contains(key));
        // Ports go in before a rule that filters by them, and out after.
        for key in &ports {
            traced_ports
                .insert(key, 1, 0)
                .map_err(Error::map("TRACED_PORTS"))?;
        }
        let mut traced: BpfHashMap<&mut MapData, u64, CgroupRule> =
            hash_map(&mut self.ebpf, "TRACED_CGROUPS")?;
        let stale = keys_not_kept(&traced, |key| cgroups.contains_key(key));
        // The exact set gains new ids before a shared slot sends lookups to it, and loses old
        // ones after no slot does.
        for (id, rule) in cgroups {
            traced
                .insert(id, rule.in_kernel(), 0)
                .map_err(Error::map("TRACED_CGROUPS"))?;
        }
        let ids: Vec<u64> = cgroups.keys().copied().collect();
        let slots = cgroup_slot_table(&ids);
        let mut table: Array<&mut MapData, u64> =
            Array::try_from(map(&mut self.ebpf, "TRACED_CGROUP_SLOTS")?)
                .map_err(Error::map("TRACED_CGROUP_SLOTS"))?;
        let changed = slots
            .iter()
            .filter(|(index, value)| self.cgroup_slots.get(index) != Some(value))
            .map(|(&index, &value)| (index, value));
        let emptied = self
            .cgroup_slots
            .keys()
            .filter(|index| !slots.contains_key(index))
            .map(|&index| (index, 0));
        for (index, value) in changed.chain(emptied) {
            table
                .set(index, value, 0)
                .map_err(Error::map("TRACED_CGROUP_SLOTS"))?;
        }
        self.cgroup_slots = slots;
        let mut traced: BpfHashMap<&mut MapData, u64, CgroupRule> =
            hash_map(&mut self.ebpf, "TRACED_CGROUPS")?;
        for id in stale {
            traced.remove(&id).map_err(Error::map("TRACED_CGROUPS"))?;
        }
        let mut traced_ports: BpfHashMap<&mut MapData, PortKey, u8> =
            hash_map(&mut self.ebpf, "TRACED_PORTS")?;
        for key in stale_ports {
            traced_ports
                .remove(&key)
                .map_err(Error::map("TRACED_PORTS"))?;
        }
        // A connection is judged by its cgroup's rule once, when adopted: when a rule
        // changes, idle connections are judged again (a port just listed is traced on the
        // keep-alive connections already open to it, and one just unlisted stops).
        let rule_changed = cgroups
            .iter()
            .any(|(id, rule)| self.rules.get(id).is_some_and(|old| old != rule));
        self.rules = cgroups.clone();
        if rule_changed {
            // Idle: no request in flight (ignored connections never have one).
            self.forget_connections(|connection| connection.request_start_nanos == 0)?;
        }
        Ok(())
    }

    /// Requests the kernel sent up (new series, exemplars) since the last call.
    pub fn drain_events(&mut self) -> Vec<RequestEvent> {
        let mut events = Vec::new();
        while events.len() < MAX_EVENTS_PER_DRAIN {
            let Some(item) = self.events.next() else {
                break;
            };
            if item.len() >= std::mem::size_of::<RequestEvent>() {
                // SAFETY: the kernel wrote a whole RequestEvent (size checked); the read is
                // unaligned-safe, and every bit pattern is a valid RequestEvent.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        events
    }

    /// CLOCK_REALTIME - CLOCK_MONOTONIC as last given to the kernel.
    pub fn realtime_offset_nanos(&self) -> u64 {
        self.settings.realtime_offset_nanos
    }

    /// Re-reads CLOCK_REALTIME - CLOCK_MONOTONIC, so NTP adjustments do not shift windows.
    pub fn refresh_clock(&mut self) -> Result<()> {
        self.settings.realtime_offset_nanos = realtime_offset_nanos();
        self.write_settings()
    }

    fn write_settings(&mut self) -> Result<()> {
        let mut settings: Array<&mut MapData, AgentSettings> =
            Array::try_from(map(&mut self.ebpf, "SETTINGS")?).map_err(Error::map("SETTINGS"))?;
        settings
            .set(0, self.settings, 0)
            .map_err(Error::map("SETTINGS"))
    }

    /// Counts the requests the kernel finished since the last call into their series;
    /// returns how many. Called often enough that the kernel's ring does not fill (it holds
    /// about 43 000 requests; see `REQUESTS_BYTES` in the eBPF crate).
    pub fn take_requests(&mut self) -> usize {
        let mut batch = std::mem::take(&mut self.request_batch);
        batch.clear();
        while let Some(item) = self.requests.next() {
            if item.len() >= std::mem::size_of::<FinishedRequest>() {
                // SAFETY: the kernel wrote a whole FinishedRequest (size checked); the read
                // is unaligned-safe, and every bit pattern is a valid FinishedRequest.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        self.counter.count_all(&batch);
        let taken = batch.len();
        self.request_batch = batch;
        taken
    }

    /// Removes and returns every series of windows numbered below `open_window`, with the
    /// requests still in the kernel's ring counted first.
    pub fn drain_closed(&mut self, open_window: u32) -> Result<Vec<ClosedSeries>> {
        self.take_requests();
        Ok(self.counter.take_closed(open_window))
    }

    /// Tells the kernel that these routes are named, so that connections switching to them
    /// send no announcement. The table is bounded: when it is full it starts over (routes
    /// are announced again, once, and learnt again).
    pub fn mark_routes_known(&mut self, routes: impl IntoIterator<Item = u32>) -> Result<()> {
        let mut fresh: Vec<u32> = routes
            .into_iter()
            .filter(|route| !self.known_routes.contains(route))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        if fresh.is_empty() {
            return Ok(());
        }
        if self.known_routes.len() + fresh.len() > MAX_KNOWN_ROUTES {
            self.forget_known_routes()?;
            fresh.truncate(MAX_KNOWN_ROUTES);
        }
        let mut known: BpfHashMap<&mut MapData, u32, u8> =
            hash_map(&mut self.ebpf, "KNOWN_ROUTES")?;
        for route in fresh {
            known
                .insert(route, 1, 0)
                .map_err(Error::map("KNOWN_ROUTES"))?;
            self.known_routes.insert(route);
        }
        Ok(())
    }

    /// Empties `KNOWN_ROUTES`: every route is announced again when a connection switches to
    /// it or a new connection uses it (for a route namer that forgot its names). A
    /// keep-alive connection that stays on one route is not asked again: its windows go
    /// unnamed until then. The namer forgets only past 100 000 distinct routes.
    pub fn forget_known_routes(&mut self) -> Result<()> {
        let mut known: BpfHashMap<&mut MapData, u32, u8> =
            hash_map(&mut self.ebpf, "KNOWN_ROUTES")?;
        for route in self.known_routes.drain() {
            // Absent already only if the map was changed behind our back: nothing to undo.
            let _ = known.remove(&route);
        }
        Ok(())
    }

    /// Run statistics and sizes of each of [`PROGRAMS`] and of [`FLOOR`], for benchmarks.
    /// Run time and count grow only while the kernel's statistics are on
    /// (`kernel.bpf_stats_enabled`, or [`aya::sys::enable_stats`] held open).
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        PROGRAMS
            .iter()
            .chain([&FLOOR])
            .map(|&name| {
                let info = self
                    .ebpf
                    .program(name)
                    .ok_or_else(|| Error::MissingInObject {
                        kind: "program",
                        name: name.to_owned(),
                    })?
                    .info()
                    .map_err(Error::program(name))?;
                Ok(ProgramStats {
                    name,
                    run_time_nanos: info.run_time().as_nanos() as u64,
                    run_count: info.run_count(),
                    translated_bytes: info.size_translated().unwrap_or(0),
                    jitted_bytes: info.size_jitted(),
                })
            })
            .collect()
    }

    /// Drop counters by [`drop_reason`] name: the kernel's, summed over CPUs, and the
    /// counting's (series and histogram tables, which live here).
    pub fn drop_counts(&mut self) -> Result<Vec<(&'static str, u64)>> {
        let drops: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(map(&mut self.ebpf, "DROPS")?).map_err(Error::map("DROPS"))?;
        (0..drop_reason::COUNT)
            .map(|reason| {
                let values = drops.get(&reason, 0).map_err(Error::map("DROPS"))?;
                let counted_here = match reason {
                    drop_reason::SERIES_TABLE_FULL => self.counter.series_table_full(),
                    drop_reason::HISTOGRAM_TABLE_FULL => self.counter.histogram_table_full(),
                    _ => 0,
                };
                Ok((
                    drop_reason::name(reason),
                    values.iter().sum::<u64>() + counted_here,
                ))
            })
            .collect()
    }
}

/// The non-empty slots of `TRACED_CGROUP_SLOTS` for this set of cgroup ids.
fn cgroup_slot_table(cgroups: &[u64]) -> HashMap<u32, u64> {
    let unique: std::collections::BTreeSet<u64> = cgroups.iter().copied().collect();
    let mut slots = HashMap::new();
    for id in unique {
        slots
            .entry(cgroup_slot(id))
            .and_modify(|slot| *slot = CGROUP_SLOT_SHARED)
            .or_insert(id);
    }
    slots
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name).ok_or(Error::MissingInObject {
        kind: "map",
        name: name.to_owned(),
    })
}

/// The keys of `map` that `keep` does not keep.
fn keys_not_kept<K: aya::Pod, V: aya::Pod>(
    map: &BpfHashMap<&mut MapData, K, V>,
    keep: impl Fn(&K) -> bool,
) -> Vec<K> {
    map.keys()
        .filter_map(|key| key.ok())
        .filter(|key| !keep(key))
        .collect()
}

/// The hash map `name` (LRU or not), typed.
fn hash_map<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<&'a mut MapData, K, V>> {
    BpfHashMap::try_from(map(ebpf, name)?).map_err(Error::map(name))
}

fn map_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map> {
    ebpf.map(name).ok_or(Error::MissingInObject {
        kind: "map",
        name: name.to_owned(),
    })
}

/// CLOCK_REALTIME - CLOCK_MONOTONIC in nanoseconds (bpf_ktime_get_ns is CLOCK_MONOTONIC).
fn realtime_offset_nanos() -> u64 {
    let monotonic = clock_nanos(libc::CLOCK_MONOTONIC);
    let realtime = clock_nanos(libc::CLOCK_REALTIME);
    u64::try_from(realtime - monotonic).unwrap_or(0)
}

/// CLOCK_MONOTONIC in nanoseconds: the kernel programs' clock.
fn monotonic_nanos() -> u64 {
    u64::try_from(clock_nanos(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

fn clock_nanos(clock: libc::clockid_t) -> i128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; both clocks always exist.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as i128 * 1_000_000_000 + now.tv_nsec as i128
}

/// A connection table size the agent can load, or a clear error.
pub fn check_max_connections(max_connections: u32) -> Result<()> {
    if (MIN_CONNECTIONS..=MAX_CONNECTIONS).contains(&max_connections) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "max connections {max_connections} is out of range: use {MIN_CONNECTIONS} to \
             {MAX_CONNECTIONS}"
        )))
    }
}

/// Fails early, with the missing capabilities named, instead of a bare EPERM from the kernel.
fn check_privileges() -> Result<()> {
    // CAP_DAC_READ_SEARCH = 2, CAP_SYS_ADMIN = 21, CAP_PERFMON = 38, CAP_BPF = 39.
    let status = fs::read_to_string("/proc/self/status").map_err(|source| Error::Io {
        what: "reading /proc/self/status".to_owned(),
        source,
    })?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| effective & (1 << bit) != 0;
    let mut missing = Vec::new();
    if !has(39) && !has(21) {
        missing.push("CAP_BPF");
    }
    if !has(38) && !has(21) {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingPrivileges {
            missing: missing.join(", "),
        })
    }
}

/// Older kernels charge BPF memory to RLIMIT_MEMLOCK; newer ones to the cgroup, where the
/// limit may not be raisable at all. So: try, and carry on either way.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK; fine on kernels that charge BPF memory to the cgroup"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_filters_by_port_only_the_directions_that_list_ports() {
        let rule = TraceRule {
            server: true,
            client: true,
            server_ports: BTreeSet::from([80, 8080]),
            client_ports: BTreeSet::new(),
        };
        let kernel = rule.in_kernel();
        assert_eq!(kernel.directions, 0b11);
        assert_eq!(kernel.port_filtered, Direction::Server as u8);
        let keys: Vec<(u16, u8)> = rule
            .port_keys(7)
            .map(|key| {
                assert_eq!(key.cgroup_id, 7);
                (key.port, key.direction)
            })
            .collect();
        assert_eq!(keys, vec![(80, 1), (8080, 1)]);
        // Ports listed for a direction that is not traced filter nothing and go nowhere.
        let client_only = TraceRule {
            server: false,
            ..rule
        };
        assert_eq!(client_only.in_kernel().port_filtered, 0);
        assert_eq!(client_only.port_keys(7).count(), 0);
    }

    #[test]
    fn cgroup_slots_hold_their_id_or_send_a_shared_slot_to_the_exact_set() {
        let slots = u64::from(trazor_node_agent_ebpf_common::CGROUP_SLOTS);
        let table = cgroup_slot_table(&[7, 7, 9, 7 + slots, 12 + 2 * slots]);
        assert_eq!(
            table,
            HashMap::from([(7, CGROUP_SLOT_SHARED), (9, 9), (12, 12 + 2 * slots)])
        );
        assert!(cgroup_slot_table(&[]).is_empty());
    }

    #[test]
    fn realtime_offset_is_wall_clock_minus_uptime() {
        let offset = realtime_offset_nanos();
        // After 2020 and more than uptime ago: a sanity bound, not a timing assertion.
        assert!(offset > 1_577_836_800 * 1_000_000_000);
    }
}
