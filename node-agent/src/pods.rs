//! Pods on this node, for attribution and selection: who owns a cgroup.
//!
//! The kubelet puts every container in a cgroup whose path carries the pod UID and the
//! container id ([`pod_in_cgroup_path`] knows the systemd and cgroupfs drivers' layouts for
//! containerd, CRI-O and Docker). The pods themselves (namespace, name, labels, owning
//! workload) come from the Kubernetes API, watching only this node's pods
//! (`spec.nodeName=<node>`), or, without a cluster, from a JSON file in the same shape.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::telemetry::{AgentTelemetry, ApiWatch};

/// One pod, as far as attribution needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Containers with their runtime ids (without the `containerd://` scheme).
    #[serde(default)]
    pub containers: Vec<ContainerInfo>,
    /// Owning workload, e.g. ("Deployment", "checkout"); empty for bare pods.
    #[serde(default)]
    pub workload_kind: String,
    #[serde(default)]
    pub workload_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub name: String,
    pub id: String,
}

/// The pods currently on this node, by UID, and the node's labels (for profiles' node
/// selectors), shared between the source and the agent loop.
#[derive(Clone, Debug, Default)]
pub struct PodDirectory {
    pods: Arc<RwLock<HashMap<String, PodInfo>>>,
    node_labels: Arc<RwLock<BTreeMap<String, String>>>,
}

impl PodDirectory {
    pub fn node_labels(&self) -> BTreeMap<String, String> {
        self.node_labels
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_node_labels(&self, labels: BTreeMap<String, String>) {
        *self
            .node_labels
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = labels;
    }

    pub fn get(&self, uid: &str) -> Option<PodInfo> {
        self.read().get(uid).cloned()
    }

    pub fn snapshot(&self) -> Vec<PodInfo> {
        self.read().values().cloned().collect()
    }

    pub fn replace_all(&self, pods: impl IntoIterator<Item = PodInfo>) {
        let pods = pods.into_iter().map(|pod| (pod.uid.clone(), pod)).collect();
        *self
            .pods
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = pods;
    }

    fn upsert(&self, pod: PodInfo) {
        self.pods
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(pod.uid.clone(), pod);
    }

    fn remove(&self, uid: &str) {
        self.pods
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(uid);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, PodInfo>> {
        self.pods
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Where the pods come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSource {
    /// The Kubernetes API (in-cluster config or KUBECONFIG), this node's pods only.
    Api { node_name: String },
    /// A JSON array of [`PodInfo`], re-read when it changes.
    File(PathBuf),
}

/// The pod UID and container id a cgroup path belongs to, for the kubelet layouts in use:
///
/// - systemd driver: `…/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`
///   (`crio-<id>.scope` for CRI-O, `docker-<id>.scope` for Docker)
/// - cgroupfs driver: `…/kubepods/burstable/pod<uid>/<id>` (or `crio-<id>`, `docker-<id>`)
///
/// Returns the pod UID alone for the pod's own cgroup (no container segment).
pub fn pod_in_cgroup_path(path: &str) -> Option<(String, Option<String>)> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (position, uid) = segments.iter().enumerate().find_map(|(index, segment)| {
        let systemd = segment
            .strip_suffix(".slice")
            .and_then(|slice| slice.rsplit_once("-pod"))
            .map(|(_, uid)| uid.replace('_', "-"));
        let cgroupfs = segment.strip_prefix("pod").map(str::to_owned);
        systemd
            .or(cgroupfs)
            .filter(|uid| looks_like_uid(uid))
            .map(|uid| (index, uid))
    })?;
    let container = segments.get(position + 1).map(|segment| {
        let id = segment.strip_suffix(".scope").unwrap_or(segment);
        let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
            .iter()
            .find_map(|prefix| id.strip_prefix(prefix))
            .unwrap_or(id);
        id.to_owned()
    });
    Some((
        uid,
        container.filter(|id| !id.is_empty() && !id.contains("conmon")),
    ))
}

fn looks_like_uid(uid: &str) -> bool {
    uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The runtime id of a `containerd://<id>`-style container id.
fn strip_runtime_scheme(id: &str) -> String {
    id.split_once("://").map_or(id, |(_, id)| id).to_owned()
}

/// What attribution needs from a Kubernetes Pod object.
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let metadata = &pod.metadata;
    let uid = metadata.uid.clone()?;
    let labels = metadata.labels.clone().unwrap_or_default();
    let containers = pod
        .status
        .iter()
        .flat_map(|status| {
            status
                .container_statuses
                .iter()
                .flatten()
                .chain(status.init_container_statuses.iter().flatten())
        })
        .filter_map(|status| {
            Some(ContainerInfo {
                name: status.name.clone(),
                id: strip_runtime_scheme(status.container_id.as_deref()?),
            })
        })
        .collect();
    let (workload_kind, workload_name) = metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| {
            // A ReplicaSet named <deployment>-<pod-template-hash> belongs to a Deployment.
            let template_hash = labels.get("pod-template-hash");
            match (owner.kind.as_str(), template_hash) {
                ("ReplicaSet", Some(hash)) => owner.name.strip_suffix(&format!("-{hash}")).map_or(
                    ("ReplicaSet".to_owned(), owner.name.clone()),
                    |deployment| ("Deployment".to_owned(), deployment.to_owned()),
                ),
                (kind, _) => (kind.to_owned(), owner.name.clone()),
            }
        })
        .unwrap_or_default();
    Some(PodInfo {
        namespace: metadata.namespace.clone().unwrap_or_default(),
        name: metadata.name.clone().unwrap_or_default(),
        uid,
        labels,
        containers,
        workload_kind,
        workload_name,
    })
}

/// Keeps `directory` in sync with `source` forever; bumps `changed` after every change.
/// From the API, `health` learns whether the watch is in sync (the agent's readiness).
pub async fn follow(
    source: PodSource,
    directory: PodDirectory,
    changed: watch::Sender<u64>,
    health: Arc<AgentTelemetry>,
) {
    match source {
        PodSource::File(path) => follow_file(&path, &directory, &changed).await,
        PodSource::Api { node_name } => follow_api(&node_name, &directory, &changed, &health).await,
    }
}

async fn follow_file(path: &Path, directory: &PodDirectory, changed: &watch::Sender<u64>) {
    let mut last: Option<String> = None;
    loop {
        match tokio::fs::read_to_string(path).await {
            Ok(text) if last.as_deref() != Some(text.as_str()) => {
                match serde_json::from_str::<Vec<PodInfo>>(&text) {
                    Ok(pods) => {
                        directory.replace_all(pods);
                        changed.send_modify(|generation| *generation += 1);
                    }
                    Err(error) => tracing::error!(
                        path = %path.display(),
                        "the pods file is not a JSON array of pods ({error}); keeping the last good one"
                    ),
                }
                last = Some(text);
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read the pods file")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits between two attempts at an API watch: 1 s doubling to 30 s, back to 1 s once a
/// watch has listed.
struct WatchBackoff(Duration);

impl WatchBackoff {
    const FIRST: Duration = Duration::from_secs(1);
    const LONGEST: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self(Self::FIRST)
    }

    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Self::LONGEST);
    }
}

/// A watch error ends the watch: the next attempt lists again, so readiness comes back only
/// once the agent has a complete, current view (a watch resumed without a list would give no
/// sign that it works until something changes).
async fn follow_api(
    node_name: &str,
    directory: &PodDirectory,
    changed: &watch::Sender<u64>,
    health: &AgentTelemetry,
) {
    use kube::runtime::watcher::{self, Event};
    health.api_watch_failing(ApiWatch::Pods, "this node's pods not listed yet");
    let mut backoff = WatchBackoff::new();
    loop {
        let client = match kube::Client::try_default().await {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(
                    %error,
                    "cannot reach the Kubernetes API (in-cluster config or KUBECONFIG); retrying"
                );
                health.api_watch_failing(ApiWatch::Pods, format!("no API client: {error}"));
                backoff.wait().await;
                continue;
            }
        };
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
        match nodes.get(node_name).await {
            Ok(node) => directory.set_node_labels(node.metadata.labels.unwrap_or_default()),
            Err(error) => tracing::warn!(
                %error,
                node = node_name,
                "cannot read this node's labels; profiles with a nodeSelector will not apply"
            ),
        }
        let pods: kube::Api<Pod> = kube::Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let mut events = watcher::watcher(pods, config).boxed();
        let mut initial: Vec<PodInfo> = Vec::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Init) => initial.clear(),
                Ok(Event::InitApply(pod)) => initial.extend(pod_info(&pod)),
                Ok(Event::InitDone) => {
                    tracing::info!(
                        pods = initial.len(),
                        node = node_name,
                        "pods on this node listed"
                    );
                    directory.replace_all(std::mem::take(&mut initial));
                    changed.send_modify(|generation| *generation += 1);
                    health.api_watch_synced(ApiWatch::Pods);
                    backoff.reset();
                }
                Ok(Event::Apply(pod)) => {
                    if let Some(info) = pod_info(&pod) {
                        directory.upsert(info);
                        changed.send_modify(|generation| *generation += 1);
                    }
                }
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        directory.remove(uid);
                        changed.send_modify(|generation| *generation += 1);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "pod watch failed; listing again after a pause");
                    health.api_watch_failing(ApiWatch::Pods, error.to_string());
                    break;
                }
            }
        }
        backoff.wait().await;
    }
}

/// Sends the agent configuration document (`key` of ConfigMap `namespace/name`) whenever
/// it changes, through the API: within seconds, where the kubelet's refresh of a mounted
/// ConfigMap can take a minute. `health` learns whether the watch is in sync.
pub async fn follow_config_map(
    namespace: String,
    name: String,
    key: String,
    document: watch::Sender<String>,
    health: Arc<AgentTelemetry>,
) {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::watcher::{self, Event};
    health.api_watch_failing(
        ApiWatch::Configuration,
        format!("ConfigMap {namespace}/{name} not read yet"),
    );
    let mut backoff = WatchBackoff::new();
    loop {
        let client = match kube::Client::try_default().await {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(%error, "cannot reach the Kubernetes API to watch the configuration; relying on the mounted file");
                health
                    .api_watch_failing(ApiWatch::Configuration, format!("no API client: {error}"));
                backoff.wait().await;
                continue;
            }
        };
        let config_maps: kube::Api<ConfigMap> = kube::Api::namespaced(client, &namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher::watcher(config_maps, config).boxed();
        let mut listed = false;
        while let Some(event) = events.next().await {
            let config_map = match event {
                Ok(Event::Init) => {
                    listed = false;
                    continue;
                }
                Ok(Event::InitApply(config_map)) => {
                    listed = true;
                    config_map
                }
                Ok(Event::InitDone) => {
                    if listed {
                        health.api_watch_synced(ApiWatch::Configuration);
                    } else {
                        health.api_watch_failing(
                            ApiWatch::Configuration,
                            format!("ConfigMap {namespace}/{name} does not exist (the operator writes it)"),
                        );
                    }
                    backoff.reset();
                    continue;
                }
                Ok(Event::Apply(config_map)) => {
                    health.api_watch_synced(ApiWatch::Configuration);
                    config_map
                }
                Ok(Event::Delete(_)) => {
                    health.api_watch_failing(
                        ApiWatch::Configuration,
                        format!("ConfigMap {namespace}/{name} was deleted; keeping the last configuration"),
                    );
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "configuration watch failed; reading it again after a pause");
                    health.api_watch_failing(ApiWatch::Configuration, error.to_string());
                    break;
                }
            };
            if let Some(text) = config_map.data.and_then(|mut data| data.remove(&key)) {
                document.send_if_modified(|current| {
                    let changed = *current != text;
                    if changed {
                        *current = text;
                    }
                    changed
                });
            }
        }
        backoff.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    const UID: &str = "0f8d6c2e-3b1a-4c5d-9e7f-123456789abc";

    #[test]
    fn parses_the_systemd_driver_layouts() {
        let uid_ = UID.replace('-', "_");
        for (path, id) in [
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-abc123.scope"
                ),
                "abc123",
            ),
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-def456.scope"),
                "def456",
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/docker-0a1b.scope"
                ),
                "0a1b",
            ),
            // kind: the node's kubelet runs nested under its own slice.
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{uid_}.slice/cri-containerd-77.scope"
                ),
                "77",
            ),
        ] {
            assert_eq!(
                pod_in_cgroup_path(&path),
                Some((UID.to_owned(), Some(id.to_owned()))),
                "{path}"
            );
        }
    }

    #[test]
    fn parses_the_cgroupfs_driver_layouts() {
        assert_eq!(
            pod_in_cgroup_path(&format!("/kubepods/burstable/pod{UID}/3f9e")),
            Some((UID.to_owned(), Some("3f9e".to_owned())))
        );
        assert_eq!(
            pod_in_cgroup_path(&format!("/kubepods/pod{UID}/crio-88")),
            Some((UID.to_owned(), Some("88".to_owned())))
        );
        assert_eq!(
            pod_in_cgroup_path(&format!("/kubepods/pod{UID}")),
            Some((UID.to_owned(), None))
        );
    }

    #[test]
    fn other_cgroups_are_not_pods() {
        for path in [
            "/",
            "/system.slice/nginx.service",
            "/user.slice/user-0.slice",
            "/kubepods/podnotauid/x",
        ] {
            assert_eq!(pod_in_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn resolves_deployments_through_their_replica_set() {
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some("checkout-5d8f7c9b4-x2x7q".into()),
                uid: Some(UID.into()),
                labels: Some(BTreeMap::from([
                    ("app".into(), "checkout".into()),
                    ("pod-template-hash".into(), "5d8f7c9b4".into()),
                ])),
                owner_references: Some(vec![OwnerReference {
                    kind: "ReplicaSet".into(),
                    name: "checkout-5d8f7c9b4".into(),
                    controller: Some(true),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                container_statuses: Some(vec![k8s_openapi::api::core::v1::ContainerStatus {
                    name: "server".into(),
                    container_id: Some("containerd://abc123".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let info = pod_info(&pod).unwrap();
        assert_eq!(
            (info.workload_kind.as_str(), info.workload_name.as_str()),
            ("Deployment", "checkout")
        );
        assert_eq!(
            info.containers,
            vec![ContainerInfo {
                name: "server".into(),
                id: "abc123".into()
            }]
        );
    }
}
