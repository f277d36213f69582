//! The node-agent configuration that the operator writes and every agent reads.
//!
//! The operator renders all `TraceProfile`s into one [`NodeAgentConfig`], serialises it as
//! JSON under [`CONFIG_KEY`] in the node-agent ConfigMap, and the agents watch the mounted
//! file and apply changes without restarting. Both sides use these types, so the contract
//! lives in one place.
//!
//! Evolution: fields are only added, always with a serde default, so an older agent reads a
//! newer operator's config (unknown fields are ignored) and a newer agent reads an older one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Key of the configuration document in the node-agent ConfigMap.
pub const CONFIG_KEY: &str = "agent-config.json";

/// Version of the configuration format written by this build.
pub const CONFIG_VERSION: u32 = 1;

/// Everything a node agent needs to know about what to trace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentConfig {
    /// Format version; see [`CONFIG_VERSION`].
    #[serde(default = "default_version")]
    pub version: u32,
    /// One entry per valid `TraceProfile`, sorted by namespace and name.
    #[serde(default)]
    pub profiles: Vec<ProfileConfig>,
}

fn default_version() -> u32 {
    CONFIG_VERSION
}

/// One `TraceProfile`, resolved to what an agent needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileConfig {
    /// Namespace of the `TraceProfile` (it selects pods in this namespace only).
    pub namespace: String,
    /// Name of the `TraceProfile`.
    pub name: String,
    /// `metadata.generation` of the profile this entry was rendered from.
    #[serde(default)]
    pub generation: i64,
    /// Pods whose labels match all of these are selected.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements, as in a Kubernetes label selector.
    #[serde(default)]
    pub match_expressions: Vec<LabelRequirement>,
    /// Only these containers of a selected pod (all when empty).
    #[serde(default)]
    pub containers: Vec<String>,
    /// Only connections on these local (server) or remote (client) ports (all when empty).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Application protocols to parse; `http` today.
    #[serde(default = "default_protocols")]
    pub protocols: Vec<String>,
    /// Which side of a connection to measure.
    #[serde(default)]
    pub direction: Direction,
    /// Window length in seconds (1 to 300).
    #[serde(default = "default_window_seconds")]
    pub window_seconds: u32,
    /// Quantiles to report, each in (0, 1).
    #[serde(default = "default_percentiles")]
    pub percentiles: Vec<f64>,
    /// Requests slower than this become exemplars (milliseconds).
    #[serde(default)]
    pub slow_threshold_ms: Option<u64>,
    /// Fraction of all other requests sampled as exemplars, in [0, 1].
    #[serde(default)]
    pub sample_rate: f64,
    /// Route templates such as `/users/{id}`, matched in order.
    #[serde(default)]
    pub route_templates: Vec<String>,
    /// Per-pod cap on distinct series; overflow is folded into `other` and counted.
    #[serde(default = "default_max_series_per_pod")]
    pub max_series_per_pod: u32,
    /// Export the windows over OTLP.
    #[serde(default = "default_true")]
    pub export_otlp: bool,
    /// Publish the windows on the WebSocket feed.
    #[serde(default = "default_true")]
    pub export_websocket: bool,
    /// Only nodes whose labels match all of these run this profile (all nodes when empty).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
}

/// A set-based label requirement (`key In (a, b)`, `key Exists`, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelRequirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// Which side of a connection a profile measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Requests the pod serves (accepted connections).
    #[default]
    Server,
    /// Requests the pod makes (connected sockets).
    Client,
    /// Both.
    Both,
}

fn default_protocols() -> Vec<String> {
    vec!["http".to_owned()]
}
fn default_window_seconds() -> u32 {
    10
}
fn default_percentiles() -> Vec<f64> {
    vec![0.5, 0.95, 0.99]
}
fn default_max_series_per_pod() -> u32 {
    200
}
fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_take_defaults() {
        let config: NodeAgentConfig =
            serde_json::from_str(r#"{"profiles":[{"namespace":"shop","name":"checkout"}]}"#)
                .unwrap();
        assert_eq!(config.version, CONFIG_VERSION);
        let profile = &config.profiles[0];
        assert_eq!(profile.window_seconds, 10);
        assert_eq!(profile.percentiles, vec![0.5, 0.95, 0.99]);
        assert_eq!(profile.direction, Direction::Server);
        assert!(profile.export_otlp && profile.export_websocket);
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let config: NodeAgentConfig =
            serde_json::from_str(r#"{"version":1,"futureField":true,"profiles":[]}"#).unwrap();
        assert!(config.profiles.is_empty());
    }
}
