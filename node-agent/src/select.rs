//! Selection: which cgroups the kernel traces, from the TraceProfiles (as rendered by the
//! operator into [`NodeAgentConfig`]) and the pods on this node.
//!
//! A profile selects the pods of its namespace whose labels match its selector (and, when it
//! names containers, only those containers). The kernel then traces exactly the cgroups of
//! the selected containers, in the profile's direction and on its ports: everything else
//! costs one array lookup per socket receive or send, and a connection on another port one
//! hash lookup more.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::Duration,
};

use trazor_proto::agent_config::{Direction, LabelRequirement, NodeAgentConfig, ProfileConfig};

use crate::{
    capture::TraceRule,
    pods::{PodInfo, pod_in_cgroup_path},
};

/// What the profiles select on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// cgroup ids the kernel traces, and what of each.
    pub cgroups: BTreeMap<u64, TraceRule>,
    /// Profile (`namespace/name`) of each selected pod, by pod UID.
    pub profile_of_pod: HashMap<String, String>,
}

/// Whether `pod` is selected by `profile` (namespace, labels, node).
pub fn profile_selects(
    profile: &ProfileConfig,
    pod: &PodInfo,
    node_labels: &BTreeMap<String, String>,
) -> bool {
    profile.namespace == pod.namespace
        && profile
            .match_labels
            .iter()
            .all(|(key, value)| pod.labels.get(key) == Some(value))
        && profile
            .match_expressions
            .iter()
            .all(|requirement| requirement_holds(requirement, &pod.labels))
        && profile
            .node_selector
            .iter()
            .all(|(key, value)| node_labels.get(key) == Some(value))
}

fn requirement_holds(requirement: &LabelRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&requirement.key);
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|value| requirement.values.contains(value)),
        "NotIn" => value.is_none_or(|value| !requirement.values.contains(value)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        // The CRD's schema only admits the four; anything else selects nothing.
        _ => false,
    }
}

/// Every pod cgroup under `root`: pod UID → (container id, cgroup id) pairs. The pod's
/// own cgroup has no container id.
pub fn pod_cgroups(root: &Path) -> HashMap<String, Vec<(Option<String>, u64)>> {
    let mut found: HashMap<String, Vec<(Option<String>, u64)>> = HashMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let path = entry.path();
            if let (Some(relative), Ok(metadata)) = (path.strip_prefix(root).ok(), entry.metadata())
                && let Some((uid, container)) = pod_in_cgroup_path(&relative.to_string_lossy())
            {
                found
                    .entry(uid)
                    .or_default()
                    .push((container, metadata.ino()));
            }
            pending.push(path);
        }
    }
    found
}

/// The selection for `config` over `pods`, with their cgroups from `cgroups`.
pub fn select(
    config: &NodeAgentConfig,
    pods: &[PodInfo],
    node_labels: &BTreeMap<String, String>,
    cgroups: &HashMap<String, Vec<(Option<String>, u64)>>,
) -> Selection {
    let mut selection = Selection::default();
    let mut pods: Vec<&PodInfo> = pods.iter().collect();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for pod in pods {
        // Profiles are sorted by the operator; the first that selects a pod owns it (its
        // windows carry that profile's name), and what all of them ask for is traced.
        let mut selecting = config
            .profiles
            .iter()
            .filter(|profile| profile_selects(profile, pod, node_labels))
            .peekable();
        let Some(owner) = selecting.peek() else {
            continue;
        };
        selection.profile_of_pod.insert(
            pod.uid.clone(),
            format!("{}/{}", owner.namespace, owner.name),
        );
        for profile in selecting {
            let rule = trace_rule(profile);
            for (container_id, cgroup_id) in cgroups.get(&pod.uid).into_iter().flatten() {
                let wanted = profile.containers.is_empty()
                    || container_id.as_ref().is_some_and(|id| {
                        pod.containers.iter().any(|container| {
                            &container.id == id && profile.containers.contains(&container.name)
                        })
                    });
                if wanted {
                    selection
                        .cgroups
                        .entry(*cgroup_id)
                        .and_modify(|other| *other = other.union(&rule))
                        .or_insert_with(|| rule.clone());
                }
            }
        }
    }
    selection
}

/// What `profile` traces of the cgroups it selects: its direction, on its ports (local
/// ports server side, the peer's client side; every port when it lists none).
pub fn trace_rule(profile: &ProfileConfig) -> TraceRule {
    let server = matches!(profile.direction, Direction::Server | Direction::Both);
    let client = matches!(profile.direction, Direction::Client | Direction::Both);
    let ports: BTreeSet<u16> = profile.ports.iter().copied().collect();
    TraceRule {
        server,
        client,
        server_ports: if server {
            ports.clone()
        } else {
            BTreeSet::new()
        },
        client_ports: if client { ports } else { BTreeSet::new() },
    }
}

/// Agent-wide settings from all profiles. The kernel keeps one window length: the shortest
/// any profile asks for (windows merge exactly into longer ones downstream).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileSettings {
    pub window: Duration,
    pub quantiles: Vec<f64>,
    pub slow_threshold: Option<Duration>,
    pub sample_rate: f64,
    pub server: bool,
    pub client: bool,
    pub route_templates: Vec<String>,
    pub max_series_per_source: usize,
}

/// [`ProfileSettings`] for `config`, or None when it has no profile.
pub fn profile_settings(config: &NodeAgentConfig) -> Option<ProfileSettings> {
    let profiles = &config.profiles;
    let window = profiles
        .iter()
        .map(|p| p.window_seconds.clamp(1, 300))
        .min()?;
    let mut quantiles: Vec<f64> = profiles
        .iter()
        .flat_map(|p| p.percentiles.iter().copied())
        .filter(|q| *q > 0.0 && *q < 1.0)
        .collect();
    quantiles.sort_by(f64::total_cmp);
    quantiles.dedup();
    let mut route_templates: Vec<String> = Vec::new();
    for template in profiles.iter().flat_map(|p| &p.route_templates) {
        if !route_templates.contains(template) {
            route_templates.push(template.clone());
        }
    }
    let has = |direction: Direction| {
        profiles
            .iter()
            .any(|p| p.direction == direction || p.direction == Direction::Both)
    };
    Some(ProfileSettings {
        window: Duration::from_secs(u64::from(window)),
        quantiles,
        slow_threshold: profiles
            .iter()
            .filter_map(|p| p.slow_threshold_ms)
            .min()
            .map(Duration::from_millis),
        sample_rate: profiles
            .iter()
            .map(|p| p.sample_rate.clamp(0.0, 1.0))
            .fold(0.0, f64::max),
        server: has(Direction::Server),
        client: has(Direction::Client),
        route_templates,
        max_series_per_source: profiles
            .iter()
            .map(|p| p.max_series_per_pod as usize)
            .max()
            .unwrap_or(200)
            .max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::ContainerInfo;

    fn pod(namespace: &str, name: &str, uid: &str, labels: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            containers: vec![
                ContainerInfo {
                    name: "app".into(),
                    id: format!("{uid}-app"),
                },
                ContainerInfo {
                    name: "sidecar".into(),
                    id: format!("{uid}-sidecar"),
                },
            ],
            ..Default::default()
        }
    }

    fn profile(name: &str, labels: &[(&str, &str)]) -> ProfileConfig {
        ProfileConfig {
            namespace: "shop".into(),
            name: name.into(),
            match_labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            window_seconds: 10,
            percentiles: vec![0.5, 0.99],
            max_series_per_pod: 100,
            ..Default::default()
        }
    }

    fn cgroups(uids: &[&str]) -> HashMap<String, Vec<(Option<String>, u64)>> {
        uids.iter()
            .enumerate()
            .map(|(n, uid)| {
                let base = (n as u64 + 1) * 10;
                (
                    uid.to_string(),
                    vec![
                        (None, base),
                        (Some(format!("{uid}-app")), base + 1),
                        (Some(format!("{uid}-sidecar")), base + 2),
                    ],
                )
            })
            .collect()
    }

    fn ids(selection: &Selection) -> Vec<u64> {
        selection.cgroups.keys().copied().collect()
    }

    #[test]
    fn selects_matching_pods_of_the_profile_namespace_only() {
        let pods = [
            pod("shop", "checkout-1", "a", &[("app", "checkout")]),
            pod("shop", "cart-1", "b", &[("app", "cart")]),
            pod("other", "checkout-9", "c", &[("app", "checkout")]),
        ];
        let config = NodeAgentConfig {
            version: 1,
            profiles: vec![profile("checkout", &[("app", "checkout")])],
        };
        let selection = select(&config, &pods, &BTreeMap::new(), &cgroups(&["a", "b", "c"]));
        assert_eq!(ids(&selection), vec![10, 11, 12]);
        assert_eq!(
            selection.profile_of_pod.get("a").map(String::as_str),
            Some("shop/checkout")
        );
        assert_eq!(selection.profile_of_pod.len(), 1);
    }

    #[test]
    fn container_names_narrow_the_cgroups_and_expressions_apply() {
        let pods = [pod(
            "shop",
            "checkout-1",
            "a",
            &[("app", "checkout"), ("tier", "web")],
        )];
        let mut narrowed = profile("web", &[]);
        narrowed.containers = vec!["app".into()];
        narrowed.match_expressions = vec![LabelRequirement {
            key: "tier".into(),
            operator: "In".into(),
            values: vec!["web".into(), "api".into()],
        }];
        let config = NodeAgentConfig {
            version: 1,
            profiles: vec![narrowed],
        };
        let selection = select(&config, &pods, &BTreeMap::new(), &cgroups(&["a"]));
        assert_eq!(ids(&selection), vec![11]);
        let mut excluded = profile("none", &[]);
        excluded.match_expressions = vec![LabelRequirement {
            key: "tier".into(),
            operator: "DoesNotExist".into(),
            values: vec![],
        }];
        let config = NodeAgentConfig {
            version: 1,
            profiles: vec![excluded],
        };
        assert!(
            select(&config, &pods, &BTreeMap::new(), &cgroups(&["a"]))
                .cgroups
                .is_empty()
        );
    }

    #[test]
    fn node_selector_needs_the_node_labels() {
        let pods = [pod("shop", "checkout-1", "a", &[])];
        let mut on_linux = profile("linux", &[]);
        on_linux.node_selector = BTreeMap::from([("kubernetes.io/os".into(), "linux".into())]);
        let config = NodeAgentConfig {
            version: 1,
            profiles: vec![on_linux],
        };
        assert!(
            select(&config, &pods, &BTreeMap::new(), &cgroups(&["a"]))
                .cgroups
                .is_empty()
        );
        let labels = BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]);
        assert_eq!(
            select(&config, &pods, &labels, &cgroups(&["a"]))
                .cgroups
                .len(),
            3
        );
    }

    #[test]
    fn each_cgroup_is_traced_in_its_profiles_direction_on_its_ports() {
        let pods = [
            pod("shop", "checkout-1", "a", &[("app", "checkout")]),
            pod("shop", "cart-1", "b", &[("app", "cart")]),
        ];
        let mut checkout = profile("checkout", &[("app", "checkout")]);
        checkout.ports = vec![8080, 80, 8080];
        let mut cart = profile("cart", &[("app", "cart")]);
        cart.direction = Direction::Client;
        let config = NodeAgentConfig {
            version: 1,
            profiles: vec![checkout, cart],
        };
        let selection = select(&config, &pods, &BTreeMap::new(), &cgroups(&["a", "b"]));
        let served_on_80_and_8080 = TraceRule {
            server: true,
            client: false,
            server_ports: BTreeSet::from([80, 8080]),
            client_ports: BTreeSet::new(),
        };
        assert_eq!(selection.cgroups[&11], served_on_80_and_8080);
        assert_eq!(selection.cgroups[&21], TraceRule::every_port(false, true));

        let mut both = profile("both", &[("app", "cart")]);
        both.direction = Direction::Both;
        both.ports = vec![443];
        let rule = trace_rule(&both);
        assert_eq!(
            (rule.server_ports, rule.client_ports),
            (BTreeSet::from([443]), BTreeSet::from([443]))
        );
    }

    #[test]
    fn profiles_selecting_one_pod_trace_what_any_of_them_asks_for() {
        let pods = [pod("shop", "checkout-1", "a", &[("app", "checkout")])];
        let mut on_80 = profile("web", &[("app", "checkout")]);
        on_80.ports = vec![80];
        let mut on_9090 = profile("metrics", &[("app", "checkout")]);
        on_9090.ports = vec![9090];
        let mut outbound = profile("outbound", &[("app", "checkout")]);
        outbound.direction = Direction::Client;
        let config = NodeAgentConfig {
            version: 1,
            profiles: vec![on_80, on_9090, outbound],
        };
        let selection = select(&config, &pods, &BTreeMap::new(), &cgroups(&["a"]));
        assert_eq!(
            selection.cgroups[&11],
            TraceRule {
                server: true,
                client: true,
                server_ports: BTreeSet::from([80, 9090]),
                client_ports: BTreeSet::new(),
            }
        );
        assert_eq!(
            selection.profile_of_pod.get("a").map(String::as_str),
            Some("shop/web"),
            "the first profile owns the pod"
        );
        // A profile without ports traces every port of its direction.
        let every = TraceRule::every_port(true, false);
        assert_eq!(
            selection.cgroups[&11].union(&every).server_ports,
            BTreeSet::new()
        );
    }

    #[test]
    fn settings_take_the_shortest_window_and_union_the_rest() {
        let mut fast = profile("fast", &[]);
        fast.window_seconds = 5;
        fast.percentiles = vec![0.9];
        fast.direction = Direction::Client;
        fast.slow_threshold_ms = Some(300);
        let mut slow = profile("slow", &[]);
        slow.slow_threshold_ms = Some(800);
        slow.sample_rate = 0.1;
        slow.route_templates = vec!["/users/{id}".into()];
        let settings = profile_settings(&NodeAgentConfig {
            version: 1,
            profiles: vec![fast, slow],
        })
        .unwrap();
        assert_eq!(settings.window, Duration::from_secs(5));
        assert_eq!(settings.quantiles, vec![0.5, 0.9, 0.99]);
        assert_eq!(settings.slow_threshold, Some(Duration::from_millis(300)));
        assert_eq!(settings.sample_rate, 0.1);
        assert!(settings.server && settings.client);
        assert_eq!(settings.route_templates, vec!["/users/{id}".to_owned()]);
        assert_eq!(profile_settings(&NodeAgentConfig::default()), None);
    }
}
