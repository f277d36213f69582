//! The `TraceProfile` custom resource (`trazor.dev/v1alpha1`): its Rust types, which are the
//! source of the CRD in `crds/traceprofile.yaml`, and the checks the schema cannot express.
//!
//! Validation happens in two places, each doing what it is good at:
//! - **In the API server**, from the schema generated here: shapes, ranges, enums, list
//!   uniqueness (`x-kubernetes-list-type: set`) and CEL rules such as the window range. A
//!   profile that breaks these is rejected by `kubectl apply` with the rule's message.
//! - **In the operator**, by [`TraceProfile::resolve`]: what the schema cannot say (route
//!   template syntax, label selector operators, a window in whole seconds) and, in
//!   [`crate::render`], conflicts between profiles. Such a profile gets a `Degraded` condition
//!   saying what to change and is left out of the agent configuration, while the others keep
//!   working.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use trazor_proto::agent_config::{self, LabelRequirement, ProfileConfig};

/// Name of the finalizer the operator puts on every profile, so that deleting a profile
/// re-renders the agent configuration without it before the object goes away.
pub const FINALIZER: &str = "trazor.dev/node-agent-config";

/// Condition type: the profile is part of the node-agent configuration.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the profile is invalid or conflicts with another one and is not applied.
pub const CONDITION_DEGRADED: &str = "Degraded";

/// Shortest and longest window an agent supports (seconds).
pub const WINDOW_SECONDS_MIN: u32 = 1;
/// See [`WINDOW_SECONDS_MIN`].
pub const WINDOW_SECONDS_MAX: u32 = 300;
/// Upper bound of `maxSeriesPerPod`: beyond this an agent's memory per pod is unbounded in practice.
pub const MAX_SERIES_PER_POD_LIMIT: u32 = 10_000;

/// Go-style duration (`500ms`, `10s`, `1m30s`), the syntax CEL's `duration()` accepts.
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";

/// What to measure, where, and how to report it: one `TraceProfile` per set of workloads.
///
/// The operator merges all valid profiles into the configuration every node agent reads.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
// The lint mistakes the repeated `type_ = ...` inside distinct `printcolumn(...)` entries for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "trazor.dev",
    version = "v1alpha1",
    kind = "TraceProfile",
    plural = "traceprofiles",
    singular = "traceprofile",
    shortname = "tp",
    category = "trazor",
    namespaced,
    status = "TraceProfileStatus",
    derive = "PartialEq",
    doc = "TraceProfile selects pods whose request latency Trazor's node agents measure, and how.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the profile is part of the node-agent configuration"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].reason",
        description = "Why the profile is degraded, if it is"
    ),
    printcolumn(
        name = "Window",
        type_ = "string",
        json_path = ".spec.window",
        description = "Length of each latency window"
    ),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        json_path = ".status.matchedPods",
        description = "Running pods the selector matches"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodesReporting",
        description = "Nodes with matched pods and a ready node agent"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TraceProfileSpec {
    /// Pods in this profile's namespace to measure. `{}` selects every pod in the namespace.
    pub pod_selector: LabelSelector,

    /// Only these containers of a selected pod are measured (all containers when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "container_names_schema")]
    pub containers: Vec<String>,

    /// Only connections on these ports are measured: local ports for `server`, remote ports
    /// for `client` (all ports when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "ports_schema")]
    pub ports: Vec<u16>,

    /// Application protocols to parse.
    #[serde(default = "default_protocols")]
    #[schemars(schema_with = "protocols_schema")]
    pub protocols: Vec<Protocol>,

    /// Which side of a connection to measure: requests the pod serves, makes, or both.
    #[serde(default)]
    pub direction: Direction,

    /// Length of each tumbling latency window, from 1s to 5m in whole seconds, e.g. `10s`.
    #[serde(default = "default_window")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new(
        "duration(self) >= duration('1s') && duration(self) <= duration('5m')"
    ).message("window must be between 1s and 5m"))]
    pub window: String,

    /// Quantiles to report for each window, each strictly between 0 and 1, e.g. `0.99`.
    #[serde(default = "default_percentiles")]
    #[schemars(schema_with = "percentiles_schema")]
    pub percentiles: Vec<f64>,

    /// Requests slower than this are kept as exemplar spans, e.g. `500ms`. No latency
    /// threshold when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new(
        "duration(self) > duration('0s') && duration(self) <= duration('1h')"
    ).message("slowThreshold must be more than 0 and at most 1h"))]
    pub slow_threshold: Option<String>,

    /// Fraction of the other requests sampled as exemplar spans, from 0 (none) to 1 (all).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_rate: f64,

    /// Route templates such as `/users/{id}`, matched in order; a request path that matches
    /// none is reported as its first segment. Parameters are whole segments; a final `*`
    /// matches the rest of the path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "route_templates_schema")]
    pub route_templates: Vec<String>,

    /// Per-pod cap on distinct series (route × method × direction × peer); more are folded into
    /// `other` and counted.
    #[serde(default = "default_max_series_per_pod")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_series_per_pod: u32,

    /// Where the windows go.
    #[serde(default)]
    pub export: ExportSpec,

    /// Only nodes with all of these labels run this profile (all nodes when empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// An application protocol the agents can parse.
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.x request/response latency.
    Http,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
        }
    }
}

/// Which side of a connection a profile measures.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
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

impl From<Direction> for agent_config::Direction {
    fn from(direction: Direction) -> Self {
        match direction {
            Direction::Server => agent_config::Direction::Server,
            Direction::Client => agent_config::Direction::Client,
            Direction::Both => agent_config::Direction::Both,
        }
    }
}

/// Export toggles.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExportSpec {
    /// Export windows (as exponential histograms) and exemplars over OTLP.
    #[serde(default = "default_true")]
    pub otlp: bool,
    /// Publish windows on the collector's live WebSocket feed.
    #[serde(default = "default_true")]
    pub websocket: bool,
}

impl Default for ExportSpec {
    fn default() -> Self {
        Self {
            otlp: true,
            websocket: true,
        }
    }
}

/// What the operator observed about a profile.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TraceProfileStatus {
    /// `Ready` (part of the node-agent configuration) and `Degraded` (invalid or
    /// conflicting, with a reason and a message saying what to change).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Running or pending pods the selector matches.
    #[serde(default)]
    pub matched_pods: u32,
    /// Nodes that run matched pods and a ready node agent, so report windows for this profile.
    #[serde(default)]
    pub nodes_reporting: u32,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Http]
}
fn default_window() -> String {
    "10s".to_owned()
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

// Schemas written out by hand where schemars' attributes cannot say it: exclusive bounds,
// `x-kubernetes-list-type: set` (the API server then rejects duplicates) and item bounds that
// keep the CEL cost estimate of the API server low.

fn container_names_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 32,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": 63,
            "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
        }
    })
}

fn ports_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 64,
        "x-kubernetes-list-type": "set",
        "items": { "type": "integer", "format": "int32", "minimum": 1, "maximum": 65535 }
    })
}

fn protocols_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 8,
        "x-kubernetes-list-type": "set",
        "default": ["http"],
        "items": { "type": "string", "enum": ["http"] }
    })
}

fn percentiles_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 16,
        "x-kubernetes-list-type": "set",
        "default": [0.5, 0.95, 0.99],
        "items": {
            "type": "number",
            "format": "double",
            "minimum": 0,
            "exclusiveMinimum": true,
            "maximum": 1,
            "exclusiveMaximum": true
        }
    })
}

fn route_templates_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 128,
        "items": { "type": "string", "minLength": 1, "maxLength": 256, "pattern": "^/" }
    })
}

/// One thing wrong with a profile, addressed to the person who wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// JSON path of the field, e.g. `spec.routeTemplates[1]`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl TraceProfile {
    /// `namespace/name`, for messages and sorting.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// Checks what the schema cannot and resolves the profile into the agents' form.
    ///
    /// Returns every problem found, not just the first, so one edit can fix them all. Rules the
    /// schema also enforces are checked again: a profile stored under an older CRD version
    /// could break them, and an agent must never receive such a configuration.
    pub fn resolve(&self) -> Result<ProfileConfig, Vec<Problem>> {
        let spec = &self.spec;
        let mut problems = Vec::new();
        let mut problem =
            |field: String, message: String| problems.push(Problem { field, message });

        let (match_labels, match_expressions) = match resolve_selector(&spec.pod_selector) {
            Ok(resolved) => resolved,
            Err(message) => {
                problem("spec.podSelector".into(), message);
                Default::default()
            }
        };

        let window_seconds = match parse_duration(&spec.window) {
            Some(window) if window.subsec_nanos() != 0 => {
                problem(
                    "spec.window".into(),
                    format!(
                        "{:?} is not a whole number of seconds; use e.g. \"10s\"",
                        spec.window
                    ),
                );
                0
            }
            Some(window)
                if (u64::from(WINDOW_SECONDS_MIN)..=u64::from(WINDOW_SECONDS_MAX))
                    .contains(&window.as_secs()) =>
            {
                u32::try_from(window.as_secs()).unwrap_or(WINDOW_SECONDS_MAX)
            }
            Some(_) => {
                problem(
                    "spec.window".into(),
                    format!("{:?} is outside 1s..5m", spec.window),
                );
                0
            }
            None => {
                problem(
                    "spec.window".into(),
                    format!(
                        "{:?} is not a duration such as \"10s\" or \"1m\"",
                        spec.window
                    ),
                );
                0
            }
        };

        let slow_threshold_ms = match spec.slow_threshold.as_deref() {
            None => None,
            Some(text) => match parse_duration(text) {
                Some(threshold) if threshold.as_millis() >= 1 => {
                    Some(u64::try_from(threshold.as_millis()).unwrap_or(u64::MAX))
                }
                Some(_) => {
                    problem(
                        "spec.slowThreshold".into(),
                        format!(
                            "{text:?} is below the 1ms resolution of exemplars; use e.g. \"1ms\""
                        ),
                    );
                    None
                }
                None => {
                    problem(
                        "spec.slowThreshold".into(),
                        format!("{text:?} is not a duration such as \"500ms\""),
                    );
                    None
                }
            },
        };

        let mut seen = Vec::new();
        for (i, &p) in spec.percentiles.iter().enumerate() {
            if !(p > 0.0 && p < 1.0) {
                problem(
                    format!("spec.percentiles[{i}]"),
                    format!(
                        "{p} is not strictly between 0 and 1; write the 99th percentile as 0.99"
                    ),
                );
            } else if seen.contains(&p) {
                problem(
                    format!("spec.percentiles[{i}]"),
                    format!("{p} is listed twice"),
                );
            }
            seen.push(p);
        }
        if spec.percentiles.is_empty() {
            problem(
                "spec.percentiles".into(),
                "list at least one quantile, e.g. [0.99]".into(),
            );
        }

        if !(0.0..=1.0).contains(&spec.sample_rate) {
            problem(
                "spec.sampleRate".into(),
                format!("{} is outside 0..1", spec.sample_rate),
            );
        }
        if !(1..=MAX_SERIES_PER_POD_LIMIT).contains(&spec.max_series_per_pod) {
            problem(
                "spec.maxSeriesPerPod".into(),
                format!("{} is outside 1..10000", spec.max_series_per_pod),
            );
        }
        for (i, port) in spec.ports.iter().enumerate() {
            if *port == 0 {
                problem(
                    format!("spec.ports[{i}]"),
                    "port 0 never carries traffic".into(),
                );
            }
        }
        if spec.protocols.is_empty() {
            problem(
                "spec.protocols".into(),
                "list at least one protocol, e.g. [http]".into(),
            );
        }
        for (i, template) in spec.route_templates.iter().enumerate() {
            if let Err(message) = check_route_template(template) {
                problem(format!("spec.routeTemplates[{i}]"), message);
            }
        }

        if !problems.is_empty() {
            return Err(problems);
        }

        let mut ports = spec.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        let protocols: BTreeSet<&str> = spec.protocols.iter().map(|p| p.as_str()).collect();
        Ok(ProfileConfig {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone().unwrap_or_default(),
            generation: self.metadata.generation.unwrap_or_default(),
            match_labels,
            match_expressions,
            containers: spec.containers.clone(),
            ports,
            protocols: protocols.into_iter().map(str::to_owned).collect(),
            direction: spec.direction.into(),
            window_seconds,
            percentiles: spec.percentiles.clone(),
            slow_threshold_ms,
            sample_rate: spec.sample_rate,
            route_templates: spec.route_templates.clone(),
            max_series_per_pod: spec.max_series_per_pod,
            export_otlp: spec.export.otlp,
            export_websocket: spec.export.websocket,
            node_selector: spec.node_selector.clone(),
        })
    }
}

/// Checks a label selector's operators and values (the schema only knows they are strings) and
/// returns it in the agents' form.
fn resolve_selector(
    selector: &LabelSelector,
) -> Result<(BTreeMap<String, String>, Vec<LabelRequirement>), String> {
    let mut requirements = Vec::new();
    for (i, expression) in selector.match_expressions.iter().flatten().enumerate() {
        let values = expression.values.clone().unwrap_or_default();
        match expression.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "matchExpressions[{i}] ({} {}) needs at least one value",
                    expression.key, expression.operator
                ));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!(
                    "matchExpressions[{i}] ({} {}) takes no values; remove them",
                    expression.key, expression.operator
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(format!(
                    "matchExpressions[{i}] has operator {other:?}; use In, NotIn, Exists or DoesNotExist"
                ));
            }
        }
        requirements.push(LabelRequirement {
            key: expression.key.clone(),
            operator: expression.operator.clone(),
            values,
        });
    }
    Ok((
        selector.match_labels.clone().unwrap_or_default(),
        requirements,
    ))
}

/// Checks route template syntax: `/` followed by segments that are literals, `{name}`
/// parameters (a whole segment each, names unique), or a final `*`.
pub fn check_route_template(template: &str) -> Result<(), String> {
    let Some(rest) = template.strip_prefix('/') else {
        return Err(format!("{template:?} must start with '/'"));
    };
    if rest.is_empty() {
        return Ok(());
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let mut names = BTreeSet::new();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        if segment.is_empty() {
            return Err(format!(
                "{template:?} has an empty segment ('//' or a trailing '/')"
            ));
        }
        if *segment == "*" {
            if !last {
                return Err(format!(
                    "{template:?}: '*' is only allowed as the last segment"
                ));
            }
            continue;
        }
        if let Some(inner) = segment.strip_prefix('{') {
            let Some(name) = inner.strip_suffix('}') else {
                return Err(format!(
                    "{template:?}: segment {segment:?} opens '{{' but does not end with '}}'; \
                     a parameter must be a whole segment such as {{id}}"
                ));
            };
            let mut chars = name.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "{template:?}: parameter name {name:?} must be letters, digits and '_', \
                     not starting with a digit"
                ));
            }
            if !names.insert(name) {
                return Err(format!("{template:?}: parameter {{{name}}} is used twice"));
            }
            continue;
        }
        if let Some(bad) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-._~!$&'()+,;=:@%".contains(*c)))
        {
            return Err(format!(
                "{template:?}: segment {segment:?} contains {bad:?}; parameters are written {{name}} \
                 and take a whole segment"
            ));
        }
    }
    Ok(())
}

/// Parses a Go-style duration (`500ms`, `1m30s`, `1.5s`), the syntax of the schema pattern and
/// of CEL's `duration()`, so the operator and the API server agree on what a string means.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    const UNITS: [(&str, u128); 6] = [
        ("ns", 1),
        ("us", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if int_len == 0 {
            return None;
        }
        let integer: u128 = rest[..int_len].parse().ok()?;
        rest = &rest[int_len..];
        let mut fraction = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_len = after_dot
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after_dot.len());
            if frac_len == 0 {
                return None;
            }
            fraction = &after_dot[..frac_len];
            rest = &after_dot[frac_len..];
        }
        // Two-letter units first, so "ms" is not read as "m" followed by garbage.
        let (unit, scale) = UNITS
            .iter()
            .filter(|(unit, _)| rest.starts_with(unit))
            .max_by_key(|(unit, _)| unit.len())?;
        rest = &rest[unit.len()..];
        let mut nanos = integer.checked_mul(*scale)?;
        if !fraction.is_empty() {
            // Digits beyond nanosecond precision cannot change the result; cap to avoid overflow.
            let digits = &fraction[..fraction.len().min(18)];
            let numerator: u128 = digits.parse().ok()?;
            let denominator = 10u128.checked_pow(u32::try_from(digits.len()).ok()?)?;
            nanos = nanos.checked_add(numerator.checked_mul(*scale)? / denominator)?;
        }
        total_nanos = total_nanos.checked_add(nanos)?;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).ok()?;
    let subsec = u32::try_from(total_nanos % 1_000_000_000).ok()?;
    Some(std::time::Duration::new(secs, subsec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use std::time::Duration;

    pub(crate) fn spec() -> TraceProfileSpec {
        serde_json::from_value(serde_json::json!({
            "podSelector": {"matchLabels": {"app": "checkout"}}
        }))
        .unwrap()
    }

    fn profile(spec: TraceProfileSpec) -> TraceProfile {
        let mut p = TraceProfile::new("checkout", spec);
        p.metadata.namespace = Some("shop".into());
        p.metadata.generation = Some(3);
        p
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec = spec();
        assert_eq!(spec.window, "10s");
        assert_eq!(spec.percentiles, vec![0.5, 0.95, 0.99]);
        assert_eq!(spec.protocols, vec![Protocol::Http]);
        assert_eq!(spec.direction, Direction::Server);
        assert_eq!(spec.max_series_per_pod, 200);
        assert!(spec.export.otlp && spec.export.websocket);
    }

    #[test]
    fn resolves_a_full_profile() {
        let mut spec = spec();
        spec.window = "1m".into();
        spec.slow_threshold = Some("1.5s".into());
        spec.ports = vec![8080, 80, 8080];
        spec.direction = Direction::Both;
        spec.route_templates = vec!["/users/{id}".into(), "/static/*".into(), "/".into()];
        let config = profile(spec).resolve().unwrap();
        assert_eq!(config.namespace, "shop");
        assert_eq!(config.name, "checkout");
        assert_eq!(config.generation, 3);
        assert_eq!(config.window_seconds, 60);
        assert_eq!(config.slow_threshold_ms, Some(1500));
        assert_eq!(config.ports, vec![80, 8080]);
        assert_eq!(config.direction, agent_config::Direction::Both);
        assert_eq!(config.protocols, vec!["http"]);
        assert_eq!(
            config.match_labels.get("app").map(String::as_str),
            Some("checkout")
        );
    }

    #[test]
    fn reports_every_problem_with_its_field() {
        let mut spec = spec();
        spec.window = "1500ms".into();
        spec.percentiles = vec![0.5, 1.0, 0.5];
        spec.route_templates = vec!["/ok".into(), "/users/{id".into()];
        spec.pod_selector.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "In".into(),
            values: None,
        }]);
        let problems = profile(spec).resolve().unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.podSelector",
                "spec.window",
                "spec.percentiles[1]",
                "spec.percentiles[2]",
                "spec.routeTemplates[1]"
            ]
        );
        assert!(problems[1].message.contains("whole number of seconds"));
    }

    #[test]
    fn window_outside_range_is_a_problem() {
        for window in ["0s", "301s", "1h", "ten"] {
            let mut spec = spec();
            spec.window = window.into();
            let problems = profile(spec).resolve().unwrap_err();
            assert_eq!(problems[0].field, "spec.window", "{window}");
        }
    }

    #[test]
    fn route_template_syntax() {
        for ok in [
            "/",
            "/users",
            "/users/{id}",
            "/a/{x}/b/{y_2}",
            "/files/*",
            "/v1/a-b.c~d",
        ] {
            assert_eq!(check_route_template(ok), Ok(()), "{ok}");
        }
        for bad in [
            "users",
            "/users//x",
            "/users/",
            "/users/{id",
            "/users/id}",
            "/u/{1d}",
            "/u/{id}/{id}",
            "/*/x",
            "/u/x{id}",
            "/a b",
        ] {
            assert!(
                check_route_template(bad).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        for bad in [
            "",
            "10",
            "s",
            "1.s",
            "-1s",
            "1 s",
            "1d",
            "99999999999999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
