//! All `TraceProfile`s → one [`NodeAgentConfig`], plus a verdict for each profile.
//!
//! Pure: it reads profiles and a snapshot of pods and returns what to write, so every rule
//! (validation, conflicts, ordering, counts) is unit-tested without an API server.
//!
//! The node-agent ConfigMap aggregates every profile in the cluster, so it is always rendered
//! from the whole set, whichever profile triggered the reconcile. The output is deterministic
//! (profiles sorted by namespace and name, maps sorted), so an unchanged set of profiles renders
//! byte-identical JSON and the server-side apply is a no-op.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::ObjectMeta;
use trazor_proto::agent_config::{CONFIG_KEY, CONFIG_VERSION, NodeAgentConfig, ProfileConfig};

use crate::{
    Error, Result,
    daemonset::{AgentSettings, CONFIG_MAP_NAME, agent_labels},
    profile::{Problem, TraceProfile},
};

/// What the operator concluded about one profile.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Valid and part of the node-agent configuration.
    Applied,
    /// Breaks a rule; the message lists every problem.
    Invalid(Vec<Problem>),
    /// Valid on its own, but selects pods that an older profile already measures with a
    /// different window. Left out so that the older profile keeps working unchanged.
    Conflicting {
        /// `namespace/name` of the profile that wins.
        winner: String,
        /// What to change.
        message: String,
    },
}

impl Verdict {
    /// Condition reason, CamelCase as Kubernetes expects.
    pub fn reason(&self) -> &'static str {
        match self {
            Verdict::Applied => "Applied",
            Verdict::Invalid(_) => "InvalidSpec",
            Verdict::Conflicting { .. } => "ConflictingProfile",
        }
    }

    /// A message a person can act on.
    pub fn message(&self) -> String {
        match self {
            Verdict::Applied => "part of the node-agent configuration".to_owned(),
            Verdict::Invalid(problems) => {
                let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
                format!("not applied, fix the spec: {}", list.join("; "))
            }
            Verdict::Conflicting { message, .. } => message.clone(),
        }
    }
}

/// The few facts about a pod the operator needs; see [`PodFacts::from_pod`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node_name: Option<String>,
    /// Pending or Running: it can serve requests now or soon.
    pub active: bool,
    /// Its `Ready` condition is true.
    pub ready: bool,
}

impl PodFacts {
    /// Extracts the facts from a (possibly stripped, see [`strip_pod`]) pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        PodFacts {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            active: matches!(phase, Some("Pending" | "Running")),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                }),
        }
    }
}

/// Drops everything from a watched pod but what [`PodFacts::from_pod`] reads, so that caching
/// every pod of the cluster costs a few hundred bytes each rather than kilobytes.
pub fn strip_pod(pod: &mut Pod) {
    let metadata = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name: metadata.name,
        namespace: metadata.namespace,
        labels: metadata.labels,
        resource_version: metadata.resource_version,
        uid: metadata.uid,
        ..ObjectMeta::default()
    };
    let node_name = pod.spec.take().and_then(|s| s.node_name);
    pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
        node_name,
        ..Default::default()
    });
    let status = pod.status.take();
    pod.status = status.map(|s| k8s_openapi::api::core::v1::PodStatus {
        phase: s.phase,
        conditions: s
            .conditions
            .map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect()),
        ..Default::default()
    });
}

/// How much of the cluster a profile covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Active pods its selector matches.
    pub matched_pods: u32,
    /// Nodes that run a matched pod and a ready node agent.
    pub nodes_reporting: u32,
}

/// The result of rendering all profiles.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rendered {
    /// What the agents read.
    pub config: NodeAgentConfig,
    /// Per profile (`namespace/name`), why it is or is not in [`Rendered::config`].
    pub verdicts: BTreeMap<String, Verdict>,
    /// Per profile (`namespace/name`), what it covers.
    pub coverage: BTreeMap<String, Coverage>,
}

impl Rendered {
    /// The configuration document as written to the ConfigMap.
    pub fn config_json(&self) -> Result<String> {
        serde_json::to_string_pretty(&self.config).map_err(Error::Serialize)
    }
}

/// Renders the profiles that are not being deleted into the agent configuration.
///
/// `pods` is every known pod; `agent_namespace` is where the node-agent pods run, so that
/// nodes with a ready agent can be told apart.
pub fn render(profiles: &[&TraceProfile], pods: &[PodFacts], agent_namespace: &str) -> Rendered {
    let agent_label = agent_labels();
    let agent_nodes: BTreeSet<&str> = pods
        .iter()
        .filter(|p| p.namespace == agent_namespace && p.ready)
        .filter(|p| agent_label.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .filter_map(|p| p.node_name.as_deref())
        .collect();

    // Older profiles win conflicts: creating a new profile never breaks one that works.
    let mut ordered: Vec<&TraceProfile> = profiles
        .iter()
        .copied()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    ordered.sort_by(|a, b| {
        let created = |p: &TraceProfile| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        // Profiles without a timestamp (not yet stored) sort last.
        (created(a).is_none(), created(a), a.key()).cmp(&(
            created(b).is_none(),
            created(b),
            b.key(),
        ))
    });

    let mut rendered = Rendered::default();
    let mut accepted: Vec<(ProfileConfig, Vec<&PodFacts>)> = Vec::new();
    for profile in ordered {
        let key = profile.key();
        let config = match profile.resolve() {
            Ok(config) => config,
            Err(problems) => {
                rendered.coverage.insert(key.clone(), Coverage::default());
                rendered.verdicts.insert(key, Verdict::Invalid(problems));
                continue;
            }
        };
        let matched: Vec<&PodFacts> = pods
            .iter()
            .filter(|pod| {
                pod.active && pod.namespace == config.namespace && selects(&config, &pod.labels)
            })
            .collect();
        let nodes: BTreeSet<&str> = matched
            .iter()
            .filter_map(|pod| pod.node_name.as_deref())
            .filter(|node| agent_nodes.contains(node))
            .collect();
        rendered.coverage.insert(
            key.clone(),
            Coverage {
                matched_pods: u32::try_from(matched.len()).unwrap_or(u32::MAX),
                nodes_reporting: u32::try_from(nodes.len()).unwrap_or(u32::MAX),
            },
        );

        let conflict = accepted.iter().find_map(|(other, other_pods)| {
            conflicts(&config, &matched, other, other_pods).map(|shared| (other, shared))
        });
        if let Some((winner, shared)) = conflict {
            let winner_key = format!("{}/{}", winner.namespace, winner.name);
            let message = format!(
                "not applied: selects the same pods as TraceProfile {winner_key} ({shared}), which \
                 measures them in {}s windows, but asks for {}s; an agent measures a pod in one \
                 window length, so use window \"{}s\" or make the pod selectors disjoint",
                winner.window_seconds, config.window_seconds, winner.window_seconds
            );
            rendered.verdicts.insert(
                key,
                Verdict::Conflicting {
                    winner: winner_key,
                    message,
                },
            );
            continue;
        }
        rendered.verdicts.insert(key, Verdict::Applied);
        accepted.push((config, matched));
    }

    let mut profiles: Vec<ProfileConfig> = accepted.into_iter().map(|(config, _)| config).collect();
    profiles.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    rendered.config = NodeAgentConfig {
        version: CONFIG_VERSION,
        profiles,
    };
    rendered
}

/// Whether two profiles disagree on a pod they both select; returns what they share.
///
/// Overlap is judged on the pods that exist now, and on identical selectors for pods that do
/// not exist yet (a Deployment scaled to zero still conflicts).
fn conflicts(
    candidate: &ProfileConfig,
    candidate_pods: &[&PodFacts],
    other: &ProfileConfig,
    other_pods: &[&PodFacts],
) -> Option<String> {
    if candidate.namespace != other.namespace || candidate.window_seconds == other.window_seconds {
        return None;
    }
    if let Some(pod) = candidate_pods
        .iter()
        .find(|pod| other_pods.iter().any(|o| o.name == pod.name))
    {
        return Some(format!("e.g. pod {}", pod.name));
    }
    (candidate.match_labels == other.match_labels
        && candidate.match_expressions == other.match_expressions)
        .then(|| "identical pod selectors".to_owned())
}

/// Label selector semantics of Kubernetes, on the agents' form of the selector.
pub fn selects(config: &ProfileConfig, labels: &BTreeMap<String, String>) -> bool {
    config
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && config.match_expressions.iter().all(|req| {
            let value = labels.get(&req.key);
            match req.operator.as_str() {
                "In" => value.is_some_and(|v| req.values.contains(v)),
                "NotIn" => value.is_none_or(|v| !req.values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                // Unknown operators never get here: `TraceProfile::resolve` rejects them.
                _ => false,
            }
        })
}

/// The node-agent ConfigMap holding `json` under [`CONFIG_KEY`], as applied (server-side).
pub fn node_agent_config_map(settings: &AgentSettings, json: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP_NAME.to_owned()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(crate::daemonset::common_labels()),
            owner_references: settings.owner.clone().map(|owner| vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), json.to_owned())])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::TraceProfileSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn profile(ns: &str, name: &str, created: i64, spec: serde_json::Value) -> TraceProfile {
        let spec: TraceProfileSpec = serde_json::from_value(spec).unwrap();
        let mut p = TraceProfile::new(name, spec);
        p.metadata.namespace = Some(ns.into());
        p.metadata.generation = Some(1);
        p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        p
    }

    fn pod(ns: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            node_name: Some(node.into()),
            active: true,
            ready: true,
        }
    }

    fn agent(node: &str) -> PodFacts {
        let labels = agent_labels();
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        pod("trazor-system", &format!("agent-{node}"), node, &labels)
    }

    #[test]
    fn renders_sorted_and_deterministic() {
        let b = profile(
            "shop",
            "b",
            2,
            serde_json::json!({"podSelector": {"matchLabels": {"app": "b"}}}),
        );
        let a = profile(
            "shop",
            "a",
            3,
            serde_json::json!({"podSelector": {"matchLabels": {"app": "a"}}}),
        );
        let z = profile("api", "z", 1, serde_json::json!({"podSelector": {}}));
        let one = render(&[&b, &a, &z], &[], "trazor-system");
        let two = render(&[&z, &a, &b], &[], "trazor-system");
        assert_eq!(one, two);
        let names: Vec<_> = one
            .config
            .profiles
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        assert_eq!(names, vec!["api/z", "shop/a", "shop/b"]);
        assert_eq!(one.config_json().unwrap(), two.config_json().unwrap());
        assert!(one.verdicts.values().all(|v| *v == Verdict::Applied));
    }

    #[test]
    fn invalid_profile_is_left_out_and_others_stay() {
        let good = profile("shop", "good", 1, serde_json::json!({"podSelector": {}}));
        let bad = profile(
            "shop",
            "bad",
            2,
            serde_json::json!({"podSelector": {}, "routeTemplates": ["/users/{id"]}),
        );
        let out = render(&[&good, &bad], &[], "trazor-system");
        assert_eq!(out.config.profiles.len(), 1);
        assert_eq!(out.config.profiles[0].name, "good");
        let verdict = &out.verdicts["shop/bad"];
        assert_eq!(verdict.reason(), "InvalidSpec");
        assert!(
            verdict.message().contains("spec.routeTemplates[0]"),
            "{}",
            verdict.message()
        );
    }

    #[test]
    fn deleting_profiles_are_left_out() {
        let mut gone = profile("shop", "gone", 1, serde_json::json!({"podSelector": {}}));
        gone.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(5).unwrap()));
        let out = render(&[&gone], &[], "trazor-system");
        assert!(out.config.profiles.is_empty());
        assert!(!out.verdicts.contains_key("shop/gone"));
    }

    #[test]
    fn younger_profile_with_other_window_on_same_pods_conflicts() {
        let old = profile(
            "shop",
            "old",
            1,
            serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}}),
        );
        let young = profile(
            "shop",
            "young",
            2,
            serde_json::json!({"podSelector": {"matchLabels": {"tier": "front"}}, "window": "30s"}),
        );
        let pods = [pod(
            "shop",
            "web-1",
            "n1",
            &[("app", "web"), ("tier", "front")],
        )];
        // Whatever the input order, the older profile wins.
        for input in [vec![&old, &young], vec![&young, &old]] {
            let out = render(&input, &pods, "trazor-system");
            assert_eq!(out.verdicts["shop/old"], Verdict::Applied);
            let Verdict::Conflicting { winner, message } = &out.verdicts["shop/young"] else {
                panic!("young should conflict: {:?}", out.verdicts);
            };
            assert_eq!(winner, "shop/old");
            assert!(
                message.contains("web-1") && message.contains("10s"),
                "{message}"
            );
            assert_eq!(out.config.profiles.len(), 1);
        }
    }

    #[test]
    fn same_window_or_disjoint_pods_do_not_conflict() {
        let a = profile(
            "shop",
            "a",
            1,
            serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}}),
        );
        let same_window = profile(
            "shop",
            "b",
            2,
            serde_json::json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}}),
        );
        let disjoint = profile(
            "shop",
            "c",
            3,
            serde_json::json!({"podSelector": {"matchLabels": {"app": "db"}}, "window": "1m"}),
        );
        let other_ns = profile(
            "blog",
            "d",
            4,
            serde_json::json!({"podSelector": {}, "window": "1m"}),
        );
        let pods = [
            pod("shop", "web-1", "n1", &[("app", "web")]),
            pod("shop", "db-1", "n1", &[("app", "db")]),
            pod("blog", "web-1", "n1", &[("app", "web")]),
        ];
        let out = render(
            &[&a, &same_window, &disjoint, &other_ns],
            &pods,
            "trazor-system",
        );
        assert!(
            out.verdicts.values().all(|v| *v == Verdict::Applied),
            "{:?}",
            out.verdicts
        );
        assert_eq!(out.config.profiles.len(), 4);
    }

    #[test]
    fn identical_selectors_conflict_even_without_pods() {
        let a = profile(
            "shop",
            "a",
            1,
            serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}}),
        );
        let b = profile(
            "shop",
            "b",
            2,
            serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}, "window": "20s"}),
        );
        let out = render(&[&a, &b], &[], "trazor-system");
        assert_eq!(out.verdicts["shop/b"].reason(), "ConflictingProfile");
    }

    #[test]
    fn coverage_counts_matched_pods_and_nodes_with_ready_agents() {
        let p = profile(
            "shop",
            "web",
            1,
            serde_json::json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}}),
        );
        let mut finished = pod("shop", "web-old", "n3", &[("app", "web")]);
        finished.active = false;
        let mut unready_agent = agent("n2");
        unready_agent.ready = false;
        let pods = [
            pod("shop", "web-1", "n1", &[("app", "web")]),
            pod("shop", "web-2", "n1", &[("app", "web")]),
            pod("shop", "web-3", "n2", &[("app", "web")]),
            pod("shop", "db-1", "n1", &[("app", "db")]),
            finished,
            agent("n1"),
            unready_agent,
        ];
        let out = render(&[&p], &pods, "trazor-system");
        assert_eq!(
            out.coverage["shop/web"],
            Coverage {
                matched_pods: 3,
                nodes_reporting: 1
            }
        );
    }

    #[test]
    fn selector_semantics() {
        let config = |exprs: serde_json::Value| ProfileConfig {
            match_expressions: serde_json::from_value(exprs).unwrap(),
            ..ProfileConfig::default()
        };
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let yes = |e| assert!(selects(&config(e), &labels));
        let no = |e| assert!(!selects(&config(e), &labels));
        yes(serde_json::json!([{"key": "app", "operator": "In", "values": ["web", "api"]}]));
        no(serde_json::json!([{"key": "app", "operator": "NotIn", "values": ["web"]}]));
        yes(serde_json::json!([{"key": "tier", "operator": "NotIn", "values": ["x"]}]));
        yes(serde_json::json!([{"key": "app", "operator": "Exists"}]));
        no(serde_json::json!([{"key": "app", "operator": "DoesNotExist"}]));
        no(serde_json::json!([{"key": "tier", "operator": "In", "values": ["x"]}]));
    }

    #[test]
    fn stripped_pods_keep_what_facts_need() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                         "annotations": {"big": "x"}, "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "web", "image": "nginx"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}]}
        }))
        .unwrap();
        let before = PodFacts::from_pod(&pod);
        strip_pod(&mut pod);
        assert_eq!(PodFacts::from_pod(&pod), before);
        assert!(pod.metadata.annotations.is_none() && pod.metadata.managed_fields.is_none());
        assert!(pod.spec.as_ref().unwrap().containers.is_empty());
        assert!(before.ready && before.active);
    }
}
