//! The Helm chart, rendered by a real `helm template` and read as Kubernetes would read it.
//!
//! - Every rendered manifest (default values, and `charts/trazor/ci/non-default-values.yaml`;
//!   the CRD included) parses into its k8s-openapi type by apiVersion and kind, strictly:
//!   k8s-openapi ignores unknown fields, so each manifest is also serialised back and compared
//!   with what helm rendered; a field lost on the way is unknown or misplaced, and fails the
//!   test with the manifest and its JSON path. A kind this test does not know fails too.
//! - The RBAC grants the operator's and the agents' ServiceAccounts exactly the calls in
//!   `trazor_operator::rbac::API_CALLS` and `trazor_node_agent::rbac::API_CALLS`: each with its
//!   scope (ClusterRole, or Role in the release namespace) and resource names, and nothing more;
//!   the collector's ServiceAccount gets nothing.
//! - `values.schema.json` covers every value of `values.yaml`, and helm rejects a misspelt one.
//!
//! helm is found through `TRAZOR_HELM`, then `~/.cache/trazor/bin/helm` (where
//! `scripts/setup.sh` installs it), then `PATH`. Without it these tests fail, unless
//! `TRAZOR_SKIP_HELM_TESTS=1` is set: then the tests that need helm print SKIPPED.

// Test helpers fail the test with a message saying what was expected.
#![allow(clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Secret, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use trazor_proto::api_access::{ApiCall, ObjectName, Scope};

const RELEASE: &str = "trazor";
const NAMESPACE: &str = "trazor-system";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn chart_dir() -> PathBuf {
    repo_path("charts/trazor")
}

fn non_default_values() -> PathBuf {
    repo_path("charts/trazor/ci/non-default-values.yaml")
}

/// The helm binary, or `None` (after printing SKIPPED) when there is none and
/// `TRAZOR_SKIP_HELM_TESTS=1` says that is fine.
fn helm(test: &str) -> Option<PathBuf> {
    let candidates = std::env::var_os("TRAZOR_HELM")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/trazor/bin/helm")),
        )
        .chain(
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
                .map(|dir| dir.join("helm")),
        );
    for candidate in candidates {
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    if std::env::var("TRAZOR_SKIP_HELM_TESTS").as_deref() == Ok("1") {
        println!("SKIPPED {test}: no helm (TRAZOR_SKIP_HELM_TESTS=1)");
        return None;
    }
    panic!(
        "{test} needs helm: run scripts/setup.sh (it installs helm into ~/.cache/trazor/bin), \
         or point TRAZOR_HELM at one; TRAZOR_SKIP_HELM_TESTS=1 skips these tests instead"
    );
}

/// One document of helm's output.
#[derive(Clone, Debug)]
struct Manifest {
    /// The template it came from (helm's `# Source:` line).
    source: String,
    value: Value,
}

impl Manifest {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    /// How failures name it.
    fn label(&self) -> String {
        format!("{} {} (from {})", self.kind(), self.name(), self.source)
    }

    fn typed<T: DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.value.clone())
            .unwrap_or_else(|error| panic!("{}: {error}", self.label()))
    }
}

/// `helm template` of the chart in [`NAMESPACE`], with the CRD, with `extra` arguments.
fn helm_template(helm: &Path, extra: &[&str]) -> anyhow::Result<Vec<Manifest>> {
    let output = Command::new(helm)
        .args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE, "--include-crds"])
        .args(extra)
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if !output.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    split_documents(&String::from_utf8(output.stdout)?)
}

fn render(helm: &Path, values: Option<&Path>) -> Vec<Manifest> {
    let mut extra = Vec::new();
    if let Some(values) = values {
        extra.extend(["--values", values.to_str().expect("UTF-8 path")]);
    }
    helm_template(helm, &extra).expect("the chart renders")
}

/// Splits a YAML stream into its documents, each parsed with serde_norway.
fn split_documents(stream: &str) -> anyhow::Result<Vec<Manifest>> {
    let mut documents = vec![String::new()];
    for line in stream.lines() {
        if line.trim_end() == "---" {
            documents.push(String::new());
        } else if let Some(current) = documents.last_mut() {
            current.push_str(line);
            current.push('\n');
        }
    }
    let mut manifests = Vec::new();
    for text in documents {
        let source = text
            .lines()
            .find_map(|line| line.strip_prefix("# Source: "))
            .unwrap_or("?")
            .to_owned();
        let value: Value = serde_norway::from_str(&text)
            .with_context(|| format!("YAML of {source} does not parse"))?;
        if !value.is_null() {
            manifests.push(Manifest { source, value });
        }
    }
    Ok(manifests)
}

// --- strict parsing -------------------------------------------------------------------------

/// Parses `manifest` into the k8s-openapi type of its apiVersion and kind, serialises it back
/// and returns every difference: fields the type does not have (unknown or misplaced), or a
/// kind this test does not know.
fn strict_problems(manifest: &Manifest) -> Vec<String> {
    let api_version = manifest.value["apiVersion"].as_str().unwrap_or("");
    let problems = match (api_version, manifest.kind()) {
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(&manifest.value),
        ("v1", "Service") => round_trip::<Service>(&manifest.value),
        ("v1", "Secret") => round_trip::<Secret>(&manifest.value),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(&manifest.value),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(&manifest.value),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(&manifest.value),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            round_trip::<ClusterRole>(&manifest.value)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(&manifest.value)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(&manifest.value),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            round_trip::<RoleBinding>(&manifest.value)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(&manifest.value)
        }
        (api_version, kind) => vec![format!(
            "unknown kind {api_version}/{kind}: add its k8s-openapi type to strict_problems in \
             operator/tests/chart.rs"
        )],
    };
    problems
        .into_iter()
        .map(|problem| format!("{}: {problem}", manifest.label()))
        .collect()
}

fn round_trip<T: DeserializeOwned + Serialize>(rendered: &Value) -> Vec<String> {
    let typed: T = match serde_json::from_value(rendered.clone()) {
        Ok(typed) => typed,
        Err(error) => return vec![format!("does not parse: {error}")],
    };
    let back = match serde_json::to_value(&typed) {
        Ok(back) => back,
        Err(error) => return vec![format!("does not serialise back: {error}")],
    };
    let mut problems = Vec::new();
    compare(&normalised(rendered), &normalised(&back), "", &mut problems);
    problems
}

/// Drops what serialising may legitimately drop or add: nulls, empty objects and lists
/// (`annotations: {}` and an absent `annotations` mean the same to the API server).
fn normalised(value: &Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, value)| (key.clone(), normalised(value)))
                .filter(|(_, value)| !is_empty(value))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalised).collect()),
        other => other.clone(),
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(fields) => fields.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

fn compare(rendered: &Value, back: &Value, path: &str, problems: &mut Vec<String>) {
    let at = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match (rendered, back) {
        (Value::Object(rendered), Value::Object(back)) => {
            for (key, value) in rendered {
                match back.get(key) {
                    Some(back_value) => compare(value, back_value, &at(key), problems),
                    None => problems.push(format!(
                        "{}: no such field here (unknown or misplaced)",
                        at(key)
                    )),
                }
            }
            for key in back.keys().filter(|key| !rendered.contains_key(*key)) {
                problems.push(format!("{}: appeared when serialised back", at(key)));
            }
        }
        (Value::Array(rendered), Value::Array(back)) if rendered.len() == back.len() => {
            for (index, (value, back_value)) in rendered.iter().zip(back).enumerate() {
                compare(value, back_value, &format!("{path}[{index}]"), problems);
            }
        }
        // 1 and 1.0 (JSONSchemaProps keeps numbers as f64) are the same number.
        (Value::Number(rendered), Value::Number(back)) if rendered.as_f64() == back.as_f64() => {}
        // A quantity or int-or-string given as a number comes back as its text.
        (Value::Number(rendered), Value::String(back)) if rendered.to_string() == *back => {}
        (rendered, back) if rendered == back => {}
        (rendered, back) => problems.push(format!(
            "{}: rendered {rendered}, read back as {back}",
            if path.is_empty() { "(root)" } else { path }
        )),
    }
}

/// Fails with every problem of every manifest, each named by manifest and path.
fn assert_strict(manifests: &[Manifest]) {
    let problems: Vec<String> = manifests.iter().flat_map(strict_problems).collect();
    assert!(
        problems.is_empty(),
        "rendered manifests with fields Kubernetes does not know:\n{}",
        problems.join("\n")
    );
}

fn kinds(manifests: &[Manifest]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for manifest in manifests {
        *kinds.entry(manifest.kind().to_owned()).or_default() += 1;
    }
    kinds
}

fn find<'a>(manifests: &'a [Manifest], kind: &str, name: &str) -> &'a Manifest {
    manifests
        .iter()
        .find(|m| m.kind() == kind && m.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// The operator container's `--flag=value` arguments.
fn operator_flags(manifests: &[Manifest]) -> BTreeMap<String, String> {
    let deployment: Deployment = find(manifests, "Deployment", "trazor-operator").typed();
    let pod = deployment
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec");
    let container = pod
        .containers
        .into_iter()
        .find(|c| c.name == "operator")
        .expect("operator container");
    container
        .args
        .unwrap_or_default()
        .into_iter()
        .filter_map(|arg| {
            arg.split_once('=')
                .map(|(flag, value)| (flag.to_owned(), value.to_owned()))
        })
        .collect()
}

#[test]
fn default_values_render_only_fields_kubernetes_knows() {
    let Some(helm) = helm("default_values_render_only_fields_kubernetes_knows") else {
        return;
    };
    let manifests = render(&helm, None);
    assert_strict(&manifests);
    let expected: BTreeMap<String, usize> = [
        ("ClusterRole", 2),
        ("ClusterRoleBinding", 2),
        ("CustomResourceDefinition", 1),
        ("Deployment", 2),
        ("Role", 2),
        ("RoleBinding", 2),
        ("Service", 2),
        ("ServiceAccount", 3),
    ]
    .into_iter()
    .map(|(kind, count)| (kind.to_owned(), count))
    .collect();
    assert_eq!(kinds(&manifests), expected, "what the defaults render");

    // By default the agents find the collector by DNS and Kubernetes picks its address.
    let flags = operator_flags(&manifests);
    assert_eq!(
        flags["--collector"],
        format!("http://trazor-collector.{NAMESPACE}.svc:50051")
    );
    let service: Service = find(&manifests, "Service", "trazor-collector").typed();
    assert_eq!(service.spec.and_then(|s| s.cluster_ip), None);
}

#[test]
fn non_default_values_render_only_fields_kubernetes_knows() {
    let Some(helm) = helm("non_default_values_render_only_fields_kubernetes_knows") else {
        return;
    };
    let manifests = render(&helm, Some(&non_default_values()));
    assert_strict(&manifests);
    assert_eq!(kinds(&manifests).get("Secret"), Some(&1), "the auth Secret");

    // Without DNS: a pinned Service address, and the agents sent to it.
    let service: Service = find(&manifests, "Service", "obs-collector").typed();
    let spec = service.spec.expect("Service spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.50"));
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    let deployment: Deployment = find(&manifests, "Deployment", "obs-operator").typed();
    let args = deployment
        .spec
        .and_then(|s| s.template.spec)
        .map(|pod| pod.containers[0].args.clone().unwrap_or_default())
        .unwrap_or_default();
    for expected in [
        "--collector=http://10.96.0.50:50051",
        "--leader-election=false",
        "--agent-privileged",
        "--agent-max-connections=65536",
        "--auth-secret=obs-auth",
        "--agent-node-selector=tracing=enabled",
    ] {
        assert!(
            args.iter().any(|arg| arg == expected),
            "{expected} not in {args:?}"
        );
    }
    // The feed's own token reaches the collector from its own Secret.
    let collector: Deployment = find(&manifests, "Deployment", "obs-collector").typed();
    let env = collector
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|pod| pod.containers[0].env.clone())
        .unwrap_or_default();
    let feed_token = env
        .iter()
        .find(|var| var.name == "TRAZOR_FEED_TOKEN")
        .and_then(|var| var.value_from.as_ref())
        .and_then(|from| from.secret_key_ref.as_ref())
        .expect("TRAZOR_FEED_TOKEN from a Secret");
    assert_eq!(
        (feed_token.name.as_str(), feed_token.key.as_str()),
        ("trazor-feed-viewers", "viewer-token")
    );
}

#[test]
fn a_misplaced_field_or_unknown_kind_fails_naming_manifest_and_path() {
    let Some(helm) = helm("a_misplaced_field_or_unknown_kind_fails_naming_manifest_and_path")
    else {
        return;
    };
    let manifests = render(&helm, None);
    let mut collector = find(&manifests, "Deployment", "trazor-collector").clone();
    collector.value["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] =
        Value::from("/readyz");
    // A pod-level field put on the container.
    collector.value["spec"]["template"]["spec"]["containers"][0]["hostPID"] = Value::from(true);
    let problems = strict_problems(&collector);
    assert_eq!(
        problems,
        [
            "Deployment trazor-collector (from trazor/templates/collector.yaml): \
             spec.template.spec.containers[0].hostPID: no such field here (unknown or misplaced)",
            "Deployment trazor-collector (from trazor/templates/collector.yaml): \
             spec.template.spec.containers[0].readinessProbe.httpGet.paht: no such field here \
             (unknown or misplaced)",
        ]
    );

    let mut wrong_type = find(&manifests, "Service", "trazor-collector").clone();
    wrong_type.value["spec"]["ports"][0]["port"] = Value::from("fifty");
    let problems = strict_problems(&wrong_type);
    assert!(
        problems.len() == 1 && problems[0].contains("does not parse"),
        "{problems:?}"
    );

    let mut unknown = collector;
    unknown.value["apiVersion"] = Value::from("policy/v1");
    unknown.value["kind"] = Value::from("PodDisruptionBudget");
    let problems = strict_problems(&unknown);
    assert!(
        problems.len() == 1 && problems[0].contains("unknown kind policy/v1/PodDisruptionBudget"),
        "{problems:?}"
    );
}

#[test]
fn the_charts_crd_parses_strictly() {
    let text = std::fs::read_to_string(chart_dir().join("crds/traceprofile.yaml"))
        .expect("charts/trazor/crds/traceprofile.yaml");
    let manifests = split_documents(&text).expect("CRD YAML");
    assert_eq!(kinds(&manifests).get("CustomResourceDefinition"), Some(&1));
    assert_strict(&manifests);
}

#[test]
fn a_misspelt_value_fails_helm_template_naming_it() {
    let Some(helm) = helm("a_misspelt_value_fails_helm_template_naming_it") else {
        return;
    };
    let error = helm_template(&helm, &["--set", "collector.replica=2"])
        .expect_err("collector.replica is not a value of the chart");
    assert!(
        error
            .to_string()
            .contains("at '/collector': additional properties 'replica' not allowed"),
        "{error}"
    );
}

// --- values schema --------------------------------------------------------------------------

/// The schema of `key` under `schema`, following a `$ref` or single `allOf` into `definitions`.
fn property<'a>(root: &'a Value, schema: &'a Value, key: &str) -> Option<&'a Value> {
    let mut property = schema["properties"].get(key)?;
    loop {
        let reference = property["$ref"]
            .as_str()
            .or_else(|| property["allOf"][0]["$ref"].as_str());
        match reference.and_then(|r| r.strip_prefix("#/definitions/")) {
            Some(name) => property = &root["definitions"][name],
            None => return Some(property),
        }
    }
}

/// Every key of `values` that `schema` does not describe, and every key the chart owns that
/// `values` lacks (each value has a documented default), as dotted paths.
fn schema_gaps(root: &Value, schema: &Value, values: &Value, path: &str) -> Vec<String> {
    let mut gaps = Vec::new();
    let Some(values) = values.as_object() else {
        return gaps;
    };
    for (key, value) in values {
        let dotted = format!("{path}{key}");
        match property(root, schema, key) {
            None => gaps.push(format!(
                "{dotted}: in values.yaml, not in values.schema.json"
            )),
            // Only objects the chart owns list their keys; passthrough objects are free-form.
            Some(child) if child.get("properties").is_some() => {
                if child["additionalProperties"] != Value::Bool(false) {
                    gaps.push(format!(
                        "{dotted}: schema object without additionalProperties: false"
                    ));
                }
                gaps.extend(schema_gaps(root, child, value, &format!("{dotted}.")));
            }
            Some(_) => {}
        }
    }
    for key in schema["properties"]
        .as_object()
        .into_iter()
        .flat_map(|p| p.keys())
    {
        if !values.contains_key(key) && key != "global" {
            gaps.push(format!(
                "{path}{key}: in values.schema.json, not in values.yaml"
            ));
        }
    }
    gaps
}

#[test]
fn the_values_schema_describes_every_value() {
    let values: Value = serde_norway::from_str(
        &std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json"))
            .expect("values.schema.json"),
    )
    .expect("values.schema.json parses");
    assert_eq!(schema["additionalProperties"], Value::Bool(false));
    let gaps = schema_gaps(&schema, &schema, &values, "");
    assert!(
        gaps.is_empty(),
        "values.yaml and values.schema.json differ:\n{}",
        gaps.join("\n")
    );
}

// --- RBAC -----------------------------------------------------------------------------------

/// One permission, as RBAC grants it: (group, resource, verb, scope, resource name).
type Grant = (String, String, String, Scope, Option<String>);

fn grants_of_rule(rule: &PolicyRule, scope: Scope) -> Vec<Grant> {
    let names: Vec<Option<String>> = match &rule.resource_names {
        Some(names) if !names.is_empty() => names.iter().cloned().map(Some).collect(),
        _ => vec![None],
    };
    let mut grants = Vec::new();
    for group in rule.api_groups.iter().flatten() {
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                for name in &names {
                    grants.push((
                        group.clone(),
                        resource.clone(),
                        verb.clone(),
                        scope,
                        name.clone(),
                    ));
                }
            }
        }
    }
    grants
}

/// Adds what `rules` grant at `scope` to each subject of `binding` (a ServiceAccount of the
/// release namespace; anything else is a problem).
fn bind(
    grants: &mut BTreeMap<String, BTreeSet<Grant>>,
    problems: &mut Vec<String>,
    subjects: &[k8s_openapi::api::rbac::v1::Subject],
    rules: Option<&Vec<PolicyRule>>,
    scope: Scope,
    binding: String,
) {
    for subject in subjects {
        if subject.kind != "ServiceAccount" || subject.namespace.as_deref() != Some(NAMESPACE) {
            problems.push(format!("{binding} binds {subject:?}"));
            continue;
        }
        let granted = grants.entry(subject.name.clone()).or_default();
        for rule in rules.into_iter().flatten() {
            if rule
                .non_resource_urls
                .as_ref()
                .is_some_and(|urls| !urls.is_empty())
            {
                problems.push(format!("{binding} grants non-resource URLs {rule:?}"));
            }
            granted.extend(grants_of_rule(rule, scope));
        }
    }
}

/// What the rendered RBAC grants each ServiceAccount of the release namespace; a binding to
/// anything else, or outside the release namespace, is reported in the second list.
fn grants_by_service_account(
    manifests: &[Manifest],
) -> (BTreeMap<String, BTreeSet<Grant>>, Vec<String>) {
    let cluster_roles: BTreeMap<String, ClusterRole> = manifests
        .iter()
        .filter(|m| m.kind() == "ClusterRole")
        .map(|m| (m.name().to_owned(), m.typed()))
        .collect();
    let roles: BTreeMap<String, Role> = manifests
        .iter()
        .filter(|m| m.kind() == "Role")
        .map(|m| (m.name().to_owned(), m.typed()))
        .collect();
    let mut grants: BTreeMap<String, BTreeSet<Grant>> = BTreeMap::new();
    let mut problems = Vec::new();
    for manifest in manifests {
        match manifest.kind() {
            "ClusterRoleBinding" => {
                let binding: ClusterRoleBinding = manifest.typed();
                let role = (binding.role_ref.kind == "ClusterRole")
                    .then(|| cluster_roles.get(&binding.role_ref.name))
                    .flatten();
                if role.is_none() {
                    problems.push(format!(
                        "{}: no rendered {:?}",
                        manifest.label(),
                        binding.role_ref
                    ));
                }
                bind(
                    &mut grants,
                    &mut problems,
                    binding.subjects.as_deref().unwrap_or_default(),
                    role.and_then(|r| r.rules.as_ref()),
                    Scope::Cluster,
                    manifest.label(),
                );
            }
            "RoleBinding" => {
                let binding: RoleBinding = manifest.typed();
                if binding.metadata.namespace.as_deref() != Some(NAMESPACE) {
                    problems.push(format!(
                        "{} is outside the release namespace",
                        manifest.label()
                    ));
                }
                let rules = match binding.role_ref.kind.as_str() {
                    "Role" => roles
                        .get(&binding.role_ref.name)
                        .and_then(|r| r.rules.as_ref()),
                    "ClusterRole" => cluster_roles
                        .get(&binding.role_ref.name)
                        .and_then(|r| r.rules.as_ref()),
                    _ => None,
                };
                if rules.is_none() {
                    problems.push(format!(
                        "{}: no rendered {:?}",
                        manifest.label(),
                        binding.role_ref
                    ));
                }
                bind(
                    &mut grants,
                    &mut problems,
                    binding.subjects.as_deref().unwrap_or_default(),
                    rules,
                    Scope::OwnNamespace,
                    manifest.label(),
                );
            }
            _ => {}
        }
    }
    (grants, problems)
}

/// The grants `calls` need; `flags` resolves names given by a flag.
fn needed_grants(calls: &[ApiCall], flags: &BTreeMap<String, String>) -> BTreeSet<Grant> {
    calls
        .iter()
        .map(|call| {
            let name = match call.name {
                ObjectName::Any => None,
                ObjectName::Exactly(name) => Some(name.to_owned()),
                ObjectName::FromFlag(flag) => Some(
                    flags
                        .get(flag)
                        .unwrap_or_else(|| {
                            panic!("{call} needs {flag}, which the chart does not set")
                        })
                        .clone(),
                ),
            };
            (
                call.group.to_owned(),
                call.resource.to_owned(),
                call.verb.as_str().to_owned(),
                call.scope,
                name,
            )
        })
        .collect()
}

fn describe(grant: &Grant) -> String {
    let (group, resource, verb, scope, name) = grant;
    let group = if group.is_empty() { "core" } else { group };
    let name = name
        .as_deref()
        .map(|n| format!(" named {n}"))
        .unwrap_or_default();
    format!("{verb} {resource}.{group}{name} ({scope:?})")
}

/// Every difference between the RBAC in `manifests` and the components' tables.
fn rbac_problems(manifests: &[Manifest]) -> Vec<String> {
    let flags = operator_flags(manifests);
    let operator_account = find(manifests, "Deployment", "trazor-operator")
        .typed::<Deployment>()
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|pod| pod.service_account_name)
        .expect("the operator's serviceAccountName");
    let agent_account = flags["--agent-service-account"].clone();
    let collector: Deployment = find(manifests, "Deployment", "trazor-collector").typed();
    let collector_account = collector
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|pod| pod.service_account_name)
        .expect("the collector's serviceAccountName");

    let (mut granted, mut problems) = grants_by_service_account(manifests);
    for (account, calls, table) in [
        (
            &operator_account,
            trazor_operator::rbac::API_CALLS,
            "operator::rbac::API_CALLS",
        ),
        (
            &agent_account,
            trazor_node_agent::rbac::API_CALLS,
            "trazor_node_agent::rbac::API_CALLS",
        ),
    ] {
        let needed = needed_grants(calls, &flags);
        let given = granted.remove(account.as_str()).unwrap_or_default();
        for missing in needed.difference(&given) {
            problems.push(format!(
                "ServiceAccount {account} lacks {} ({table} lists it)",
                describe(missing)
            ));
        }
        for extra in given.difference(&needed) {
            problems.push(format!(
                "ServiceAccount {account} is granted {}, which {table} does not list",
                describe(extra)
            ));
        }
    }
    for (account, extra) in granted {
        problems.push(format!(
            "ServiceAccount {account} is granted {:?}; only the operator and the agents call the API",
            extra.iter().map(describe).collect::<Vec<_>>()
        ));
    }
    let collector_account: ServiceAccount =
        find(manifests, "ServiceAccount", &collector_account).typed();
    if collector_account.automount_service_account_token != Some(false) {
        problems.push("the collector's ServiceAccount mounts an API token it never uses".into());
    }
    problems
}

#[test]
fn rbac_grants_exactly_the_api_calls_the_code_makes() {
    let Some(helm) = helm("rbac_grants_exactly_the_api_calls_the_code_makes") else {
        return;
    };
    // The agents watch the ConfigMap the operator writes.
    assert_eq!(
        trazor_node_agent::rbac::CONFIG_MAP_NAME,
        trazor_operator::daemonset::CONFIG_MAP_NAME
    );
    let manifests = render(&helm, None);
    let problems = rbac_problems(&manifests);
    assert!(
        problems.is_empty(),
        "the chart's RBAC and the API calls of the code differ:\n{}",
        problems.join("\n")
    );
}

#[test]
fn rbac_check_reports_a_grant_beyond_the_tables_and_a_missing_one() {
    let Some(helm) = helm("rbac_check_reports_a_grant_beyond_the_tables_and_a_missing_one") else {
        return;
    };
    let mut manifests = render(&helm, None);
    let agent_role = manifests
        .iter_mut()
        .find(|m| m.kind() == "ClusterRole" && m.name() == "trazor-node-agent")
        .expect("the agents' ClusterRole");
    let rules = agent_role.value["rules"].as_array_mut().expect("rules");
    // Drop `nodes get` and let the agents read Secrets instead.
    rules.retain(|rule| rule["resources"][0] != "nodes");
    rules.push(serde_json::json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}));
    let problems = rbac_problems(&manifests);
    assert_eq!(
        problems,
        [
            "ServiceAccount trazor-node-agent lacks get nodes.core (Cluster) \
             (trazor_node_agent::rbac::API_CALLS lists it)",
            "ServiceAccount trazor-node-agent is granted get secrets.core (Cluster), which \
             trazor_node_agent::rbac::API_CALLS does not list",
        ]
    );
}
