//! The node-agent DaemonSet, built from [`AgentSettings`]. Pure: unit-tested field by field.
//!
//! Least privilege: the agent is not `privileged`. It runs as root (its spool is a host
//! directory) with every capability dropped and only these added back:
//! - `CAP_BPF` (Linux ≥ 5.8): create BPF maps and load the programs.
//! - `CAP_PERFMON` (Linux ≥ 5.8): attach tracing programs to raw tracepoints and let them
//!   read kernel and user memory (`bpf_probe_read_*`) for request parsing.
//!
//! Left out on purpose:
//! - `CAP_SYS_ADMIN`: the programs attach as raw tracepoints, so no tracefs is mounted.
//! - `CAP_SYS_RESOURCE`: only raises `RLIMIT_MEMLOCK`, which kernels ≥ 5.11 no longer use for
//!   BPF memory (it is charged to the cgroup); the agent treats a failed `setrlimit` as harmless.
//! - `CAP_SYS_PTRACE`: only needed to open `/proc/<pid>/root` of other processes (uprobes on
//!   TLS libraries inside containers); attribution by cgroup id needs no ptrace.
//! - `CAP_NET_ADMIN`: the agent uses tracepoints, not TC/XDP programs.
//!
//! Kernels older than 5.8 have no `CAP_BPF`/`CAP_PERFMON`; for them the operator's
//! `--agent-privileged` flag switches to a privileged container, deliberately and visibly.
//!
//! The pod template carries no hash of the configuration: a changed configuration is picked up
//! by the running agents (hot reload), and restarting them would lose the current window.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet},
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
            EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath,
            ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
            SecretKeySelector, SecurityContext, Toleration, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::api::ObjectMeta;
use trazor_proto::agent_config::CONFIG_KEY;

/// Name of the node-agent DaemonSet.
pub const DAEMONSET_NAME: &str = "trazor-node-agent";
/// Name of the ConfigMap holding the rendered [`trazor_proto::agent_config::NodeAgentConfig`].
/// Node directory for the agent's spool (hostPath), so a restarted agent resends what it
/// had closed.
pub const SPOOL_DIR: &str = "/var/lib/trazor";
/// The agent's `/metrics`, `/healthz`, `/readyz` port (its `--metrics-listen` default).
pub const AGENT_METRICS_PORT: i32 = 9464;
pub const CONFIG_MAP_NAME: &str = "trazor-node-agent-config";
/// Where the ConfigMap is mounted in the agent container.
pub const CONFIG_DIR: &str = "/etc/trazor";
/// Environment variable carrying the collector auth token into the agent.
pub const TOKEN_ENV: &str = "TRAZOR_TOKEN";

/// How the operator deploys the node agents; set from the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    /// Namespace of the DaemonSet and the ConfigMap (the operator's own, usually).
    pub namespace: String,
    /// Agent container image.
    pub image: String,
    /// `imagePullPolicy` of the agent container; the cluster's default when unset.
    pub image_pull_policy: Option<String>,
    /// Collector gRPC address the agents stream to, e.g. `http://trazor-collector.trazor-system:50051`.
    pub collector: String,
    /// Secret with the collector auth token; no token when unset.
    pub auth_secret: Option<String>,
    /// Key of the token in [`AgentSettings::auth_secret`].
    pub auth_secret_key: String,
    /// ServiceAccount of the agents (they watch the pods of their node).
    pub service_account: String,
    /// Run the agent privileged, for kernels without `CAP_BPF`/`CAP_PERFMON` (< 5.8).
    pub privileged: bool,
    /// The agent's `--max-connections`; its default when unset.
    pub max_connections: Option<u32>,
    /// Extra node labels the agents' nodes must have (besides `kubernetes.io/os: linux`).
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the agents; [`tolerate_everything`] by default so every node is measured.
    pub tolerations: Vec<Toleration>,
    /// Owner of the DaemonSet and ConfigMap, normally the operator's Deployment; see
    /// [`crate::controller`] for why it is not a `TraceProfile`.
    pub owner: Option<OwnerReference>,
}

impl AgentSettings {
    /// Settings with the defaults used by the Helm chart; tests and `main` override fields.
    pub fn new(
        namespace: impl Into<String>,
        image: impl Into<String>,
        collector: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            image: image.into(),
            image_pull_policy: None,
            collector: collector.into(),
            auth_secret: None,
            auth_secret_key: "token".to_owned(),
            service_account: DAEMONSET_NAME.to_owned(),
            privileged: false,
            max_connections: None,
            node_selector: BTreeMap::new(),
            tolerations: tolerate_everything(),
            owner: None,
        }
    }
}

fn agent_args(settings: &AgentSettings) -> Vec<String> {
    let mut args = vec![
        "--mode".to_owned(),
        "kubernetes".to_owned(),
        "--collector".to_owned(),
        settings.collector.clone(),
        "--config".to_owned(),
        format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        // Closed windows survive an agent restart (same boot id, same sequences).
        "--spool-dir".to_owned(),
        format!("{SPOOL_DIR}/spool"),
    ];
    if let Some(connections) = settings.max_connections {
        args.extend(["--max-connections".to_owned(), connections.to_string()]);
    }
    args
}

fn http_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

/// A toleration of every taint: latency is measured on every node, control plane included.
pub fn tolerate_everything() -> Vec<Toleration> {
    vec![Toleration {
        operator: Some("Exists".to_owned()),
        ..Toleration::default()
    }]
}

/// Labels on everything the operator creates.
pub fn common_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/part-of".to_owned(), "trazor".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "trazor-operator".to_owned(),
        ),
    ])
}

/// Labels selecting the node-agent pods (also how [`crate::render`] finds them).
pub fn agent_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "trazor-node-agent".to_owned(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            "node-agent".to_owned(),
        ),
    ])
}

fn host_path(name: &str, path: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        host_path: Some(HostPathVolumeSource {
            path: path.to_owned(),
            type_: Some("Directory".to_owned()),
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn quantities(cpu: &str, memory: &str) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".to_owned(), Quantity(cpu.to_owned())),
        ("memory".to_owned(), Quantity(memory.to_owned())),
    ])
}

/// The node-agent DaemonSet, as applied (server-side) by the operator.
pub fn node_agent_daemonset(settings: &AgentSettings) -> DaemonSet {
    let mut labels = common_labels();
    labels.extend(agent_labels());

    let mut env = vec![
        // The agent attributes only the pods of its own node (`spec.nodeName=` watch).
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    if let Some(secret) = &settings.auth_secret {
        env.push(EnvVar {
            name: TOKEN_ENV.to_owned(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.clone(),
                    key: settings.auth_secret_key.clone(),
                    // A missing Secret keeps the agent from starting with a clear pod event,
                    // instead of streaming unauthenticated and being rejected.
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }

    let security_context = if settings.privileged {
        SecurityContext {
            privileged: Some(true),
            run_as_user: Some(0),
            ..SecurityContext::default()
        }
    } else {
        SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            // Root because the spool is a root-owned host directory; the capabilities
            // below, not the uid, decide what it may do.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: Some(vec!["BPF".to_owned(), "PERFMON".to_owned()]),
            }),
            ..SecurityContext::default()
        }
    };

    let container = Container {
        name: "node-agent".to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(agent_args(settings)),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".to_owned()),
            container_port: AGENT_METRICS_PORT,
            ..ContainerPort::default()
        }]),
        env: Some(env),
        // Ready only while the agent can do its job (programs loaded, collector stream, API
        // watches of its pods and configuration listed: its /readyz says which is missing),
        // so a rollout stops at an agent that measures nothing useful.
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        // Alive while it serves; not tied to readiness, so an unreachable API server or
        // collector never restarts agents (their spool and kernel maps stay).
        liveness_probe: Some(http_probe("/healthz", 20, 3)),
        security_context: Some(security_context),
        resources: Some(ResourceRequirements {
            requests: Some(quantities("50m", "64Mi")),
            // No CPU limit: throttling an agent delays window flushes; its work is bounded by
            // the kernel doing the counting. Memory is bounded by the per-pod series cap.
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("256Mi".to_owned()),
            )])),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![
            mount("cgroup", "/sys/fs/cgroup", true),
            mount("config", CONFIG_DIR, true),
            mount("spool", SPOOL_DIR, false),
            // The root filesystem is read-only; the agent may need scratch space.
            mount("tmp", "/tmp", false),
        ]),
        ..Container::default()
    };

    let mut node_selector = BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]);
    node_selector.extend(settings.node_selector.clone());

    DaemonSet {
        metadata: ObjectMeta {
            name: Some(DAEMONSET_NAME.to_owned()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels.clone()),
            owner_references: settings.owner.clone().map(|owner| vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(agent_labels()),
                ..LabelSelector::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::String("10%".to_owned())),
                    ..RollingUpdateDaemonSet::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(settings.service_account.clone()),
                    // The agent maps kernel pids and cgroups to pods, so it must see every
                    // process of the node.
                    host_pid: Some(true),
                    node_selector: Some(node_selector),
                    tolerations: Some(settings.tolerations.clone()),
                    // Time to flush the current window to the collector on shutdown.
                    termination_grace_period_seconds: Some(30),
                    containers: vec![container],
                    volumes: Some(vec![
                        host_path("cgroup", "/sys/fs/cgroup"),
                        // No BTF mount: the programs need no CO-RE relocation.
                        Volume {
                            name: "spool".to_owned(),
                            host_path: Some(HostPathVolumeSource {
                                path: SPOOL_DIR.to_owned(),
                                type_: Some("DirectoryOrCreate".to_owned()),
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "config".to_owned(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: CONFIG_MAP_NAME.to_owned(),
                                items: Some(vec![KeyToPath {
                                    key: CONFIG_KEY.to_owned(),
                                    path: CONFIG_KEY.to_owned(),
                                    ..KeyToPath::default()
                                }]),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "tmp".to_owned(),
                            empty_dir: Some(EmptyDirVolumeSource {
                                size_limit: Some(Quantity("64Mi".to_owned())),
                                ..EmptyDirVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AgentSettings {
        let mut s = AgentSettings::new(
            "trazor-system",
            "ghcr.io/trazor-dev/node-agent:0.1.0",
            "http://trazor-collector.trazor-system:50051",
        );
        s.auth_secret = Some("trazor-auth".into());
        s
    }

    fn pod_spec(ds: &DaemonSet) -> &PodSpec {
        ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn least_privilege_not_privileged() {
        let ds = node_agent_daemonset(&settings());
        let sc = pod_spec(&ds).containers[0]
            .security_context
            .clone()
            .unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let caps = sc.capabilities.unwrap();
        assert_eq!(caps.drop.unwrap(), vec!["ALL"]);
        assert_eq!(caps.add.unwrap(), vec!["BPF", "PERFMON"]);
        assert_eq!(pod_spec(&ds).host_pid, Some(true));
    }

    #[test]
    fn privileged_fallback_for_old_kernels() {
        let mut s = settings();
        s.privileged = true;
        let ds = node_agent_daemonset(&s);
        let sc = pod_spec(&ds).containers[0]
            .security_context
            .clone()
            .unwrap();
        assert_eq!(sc.privileged, Some(true));
        // The API server rejects privileged together with allowPrivilegeEscalation=false.
        assert_eq!(sc.allow_privilege_escalation, None);
    }

    #[test]
    fn mounts_kernel_interfaces_read_only_and_the_config() {
        let ds = node_agent_daemonset(&settings());
        let spec = pod_spec(&ds);
        let mounts: Vec<(String, String, Option<bool>)> = spec.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.mount_path, m.read_only))
            .collect();
        for (name, path) in [("cgroup", "/sys/fs/cgroup"), ("config", "/etc/trazor")] {
            assert!(
                mounts.contains(&(name.into(), path.into(), Some(true))),
                "{name} in {mounts:?}"
            );
        }
        let config = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "config")
            .unwrap();
        assert_eq!(config.config_map.as_ref().unwrap().name, CONFIG_MAP_NAME);
    }

    #[test]
    fn the_connection_table_size_reaches_the_agent_when_set() {
        let mut s = settings();
        s.max_connections = Some(131_072);
        let ds = node_agent_daemonset(&s);
        let args = pod_spec(&ds).containers[0].args.clone().unwrap();
        assert_eq!(args[args.len() - 2..], ["--max-connections", "131072"]);
    }

    #[test]
    fn args_env_and_token() {
        let ds = node_agent_daemonset(&settings());
        let container = &pod_spec(&ds).containers[0];
        assert_eq!(
            container.args.clone().unwrap(),
            vec![
                "--mode",
                "kubernetes",
                "--collector",
                "http://trazor-collector.trazor-system:50051",
                "--config",
                "/etc/trazor/agent-config.json",
                "--spool-dir",
                "/var/lib/trazor/spool"
            ]
        );
        assert!(
            container
                .volume_mounts
                .clone()
                .unwrap()
                .iter()
                .any(|m| m.name == "spool"
                    && m.mount_path == "/var/lib/trazor"
                    && m.read_only == Some(false)),
            "the spool is on the node, writable"
        );
        assert_eq!(container.ports.clone().unwrap()[0].container_port, 9464);
        let env = container.env.clone().unwrap();
        let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
        assert_eq!(
            node.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "spec.nodeName"
        );
        let token = env.iter().find(|e| e.name == TOKEN_ENV).unwrap();
        let secret = token
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("trazor-auth", "token")
        );

        let mut no_auth = settings();
        no_auth.auth_secret = None;
        let ds = node_agent_daemonset(&no_auth);
        assert!(
            !pod_spec(&ds).containers[0]
                .env
                .clone()
                .unwrap()
                .iter()
                .any(|e| e.name == TOKEN_ENV)
        );
    }

    #[test]
    fn runs_on_every_linux_node_and_selects_its_pods() {
        let mut s = settings();
        s.node_selector
            .insert("trazor.dev/trace".into(), "true".into());
        let ds = node_agent_daemonset(&s);
        let spec = pod_spec(&ds);
        assert_eq!(spec.tolerations.clone().unwrap(), tolerate_everything());
        let selector = spec.node_selector.clone().unwrap();
        assert_eq!(
            selector.get("kubernetes.io/os").map(String::as_str),
            Some("linux")
        );
        assert_eq!(
            selector.get("trazor.dev/trace").map(String::as_str),
            Some("true")
        );
        let ds_spec = ds.spec.as_ref().unwrap();
        let template_labels = ds_spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        for (k, v) in ds_spec.selector.match_labels.clone().unwrap() {
            assert_eq!(template_labels.get(&k), Some(&v));
        }
        assert!(ds.metadata.owner_references.is_none());
    }

    #[test]
    fn readiness_and_liveness_probe_the_agent_separately() {
        let ds = node_agent_daemonset(&settings());
        let container = &pod_spec(&ds).containers[0];
        let path = |probe: &Option<Probe>| {
            let get = probe.as_ref().and_then(|p| p.http_get.clone()).unwrap();
            assert_eq!(get.port, IntOrString::String("metrics".into()));
            get.path.unwrap()
        };
        assert_eq!(path(&container.readiness_probe), "/readyz");
        assert_eq!(path(&container.liveness_probe), "/healthz");
    }
}
