//! Attribute: who served a request. The kernel reports a cgroup v2 id and a tgid; this turns
//! them into a [`Source`]: the cgroup's path (the inode number of a cgroup directory is its
//! id) and the process name.
//!
//! With a pod source (see [`crate::pods`]), a cgroup path that names a pod UID and a
//! container id is resolved further to the pod's namespace, name, container and owning
//! workload. Standalone, it stops at the cgroup path and the process.

use std::{
    collections::HashMap,
    fs,
    net::Ipv6Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Least time between two full scans of the cgroup tree.
const MIN_RESCAN_INTERVAL: Duration = Duration::from_secs(1);

use trazor_proto::v1::{PodIdentity, Source};

use crate::pods::{PodDirectory, pod_in_cgroup_path};

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&mountinfo)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 25 0:31 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw,..."
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// Resolves kernel ids to [`Source`]s, caching cgroup paths.
pub struct SourceResolver {
    node_name: String,
    cgroup_root: Option<PathBuf>,
    cgroup_paths: HashMap<u64, String>,
    pods: Option<PodDirectory>,
    last_scan: Option<Instant>,
    /// Names the kernel reported with events, for processes gone from /proc by the time
    /// their window closes.
    reported_names: HashMap<u32, String>,
    /// IPv6 peers by the hash series carry, from the kernel's announcements.
    ipv6_peers: HashMap<u32, Ipv6Addr>,
}

impl SourceResolver {
    pub fn new(node_name: String, cgroup_root: Option<PathBuf>) -> Self {
        Self {
            node_name,
            cgroup_root,
            cgroup_paths: HashMap::new(),
            last_scan: None,
            pods: None,
            reported_names: HashMap::new(),
            ipv6_peers: HashMap::new(),
        }
    }

    /// Resolves pod cgroups through `pods`.
    pub fn with_pods(mut self, pods: PodDirectory) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Remembers the name the kernel saw for `tgid` (used if /proc no longer has it).
    pub fn remember_process_name(&mut self, tgid: u32, comm: &[u8]) {
        let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
        if end > 0 {
            if self.reported_names.len() >= 65_536 {
                self.reported_names.clear();
            }
            self.reported_names
                .insert(tgid, String::from_utf8_lossy(&comm[..end]).into_owned());
        }
    }

    /// Remembers the IPv6 address a series' peer hash stands for (announced by the kernel
    /// with a connection's first request).
    pub fn remember_ipv6_peer(&mut self, hash: u32, address: Ipv6Addr) {
        if self.ipv6_peers.len() >= 65_536 && !self.ipv6_peers.contains_key(&hash) {
            self.ipv6_peers.clear();
        }
        self.ipv6_peers.insert(hash, address);
    }

    /// The IPv6 address of a series' peer hash, if announced.
    pub fn ipv6_peer(&self, hash: u32) -> Option<Ipv6Addr> {
        self.ipv6_peers.get(&hash).copied()
    }

    /// The source of requests counted under `cgroup_id` in process `tgid`.
    pub fn resolve(&mut self, cgroup_id: u64, tgid: u32) -> Source {
        let cgroup_path = self.cgroup_path(cgroup_id);
        let pod = self.pod_of(&cgroup_path);
        let mut name = process_name(tgid);
        if name.is_empty() {
            name = self.reported_names.get(&tgid).cloned().unwrap_or_default();
        }
        Source {
            node_name: self.node_name.clone(),
            cgroup_id,
            cgroup_path,
            pid: tgid,
            process_name: name,
            pod,
        }
    }

    /// The pod (and container) a cgroup path belongs to, when the pod source knows it.
    fn pod_of(&self, cgroup_path: &str) -> Option<PodIdentity> {
        let (uid, container_id) = pod_in_cgroup_path(cgroup_path)?;
        let pod = self.pods.as_ref()?.get(&uid)?;
        let container = container_id
            .and_then(|id| pod.containers.iter().find(|c| c.id == id))
            .map(|container| container.name.clone())
            .unwrap_or_default();
        Some(PodIdentity {
            namespace: pod.namespace,
            name: pod.name,
            uid: pod.uid,
            container,
            workload_kind: pod.workload_kind,
            workload_name: pod.workload_name,
        })
    }

    /// The cgroup's path relative to the cgroup2 mount ("/" for the root), or "" if unknown
    /// (the cgroup may be gone already).
    pub fn cgroup_path(&mut self, cgroup_id: u64) -> String {
        if let Some(path) = self.cgroup_paths.get(&cgroup_id) {
            return path.clone();
        }
        // A miss means cgroups were created since the last scan, or the cgroup is gone
        // already: rescan, but at most once a second, so gone cgroups cannot make every
        // window walk the whole tree once per series.
        if let Some(root) = &self.cgroup_root
            && self
                .last_scan
                .is_none_or(|at| at.elapsed() >= MIN_RESCAN_INTERVAL)
        {
            self.cgroup_paths = scan_cgroups(root);
            self.last_scan = Some(Instant::now());
        }
        self.cgroup_paths
            .get(&cgroup_id)
            .cloned()
            .unwrap_or_default()
    }
}

/// Maps every cgroup directory's inode (= cgroup id) to its path below `root`.
fn scan_cgroups(root: &Path) -> HashMap<u64, String> {
    let mut paths = HashMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        if let Ok(metadata) = fs::metadata(&dir) {
            let relative = dir.strip_prefix(root).map_or_else(
                |_| "/".to_owned(),
                |relative| format!("/{}", relative.display()),
            );
            paths.insert(metadata.ino(), relative);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    paths
}

/// `/proc/<tgid>/comm`, or "" once the process is gone.
fn process_name(tgid: u32) -> String {
    fs::read_to_string(format!("/proc/{tgid}/comm"))
        .map(|name| name.trim_end().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "35 24 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:8 - cgroup cgroup rw,cpu\n\
                      36 24 0:31 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn resolves_a_cgroup_directory_by_its_inode() {
        let root = std::env::temp_dir().join(format!("trazor-cgroup-scan-{}", std::process::id()));
        let leaf = root.join("kubepods.slice/pod-a.slice");
        fs::create_dir_all(&leaf).unwrap();
        let inode = fs::metadata(&leaf).unwrap().ino();
        let mut resolver = SourceResolver::new("node-1".into(), Some(root.clone()));
        assert_eq!(resolver.cgroup_path(inode), "/kubepods.slice/pod-a.slice");
        assert_eq!(resolver.cgroup_path(u64::MAX), "");
        let source = resolver.resolve(inode, std::process::id());
        assert_eq!(source.node_name, "node-1");
        assert!(!source.process_name.is_empty());
        fs::remove_dir_all(&root).unwrap();
    }
}
