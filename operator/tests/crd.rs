//! The committed CRD matches the Rust types, the Helm chart ships the same file, and the CRD's
//! validation rules accept and reject what they should (CEL evaluated client-side).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use kube::CustomResourceExt;
use serde_json::{Value, json};
use trazor_operator::TraceProfile;

const REGENERATE: &str = "cargo run -p trazor-operator --bin crdgen > crds/traceprofile.yaml && \
                          cp crds/traceprofile.yaml charts/trazor/crds/traceprofile.yaml";

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}; regenerate with `{REGENERATE}`"))
}

#[test]
fn committed_crd_is_up_to_date() {
    let generated = trazor_operator::crd_yaml().unwrap();
    let committed = read("crds/traceprofile.yaml");
    assert!(
        generated == committed,
        "crds/traceprofile.yaml is out of date with the TraceProfile types; regenerate it from \
         the workspace root with:\n    {REGENERATE}"
    );
}

#[test]
fn chart_ships_the_same_crd() {
    assert!(
        read("charts/trazor/crds/traceprofile.yaml") == read("crds/traceprofile.yaml"),
        "charts/trazor/crds/traceprofile.yaml differs from crds/traceprofile.yaml; copy it with:\n    {REGENERATE}"
    );
}

#[test]
fn crd_has_status_printer_columns_and_names() {
    let crd = TraceProfile::crd();
    assert_eq!(crd.spec.group, "trazor.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["tp".to_owned()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<&str> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Ready", "Reason", "Window", "Pods", "Nodes", "Age"]
    );
}

/// The committed schema, as the API server would load it.
fn schema() -> Value {
    let crd: Value = serde_norway::from_str(&read("crds/traceprofile.yaml")).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn sample(name: &str) -> Value {
    serde_norway::from_str(&read(&format!("operator/tests/data/{name}"))).unwrap()
}

fn with_spec(spec: Value) -> Value {
    json!({"apiVersion": "trazor.dev/v1alpha1", "kind": "TraceProfile",
           "metadata": {"name": "t", "namespace": "shop"}, "spec": spec})
}

fn cel_errors(object: &Value) -> Vec<String> {
    match kube::core::cel::Validator::new().validate(&schema(), object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.into_vec().into_iter().map(|e| e.message).collect(),
    }
}

#[test]
fn cel_rules_accept_windows_from_1s_to_5m() {
    for window in ["1s", "10s", "1m30s", "5m", "300s"] {
        let object = with_spec(json!({"podSelector": {}, "window": window}));
        assert_eq!(cel_errors(&object), Vec::<String>::new(), "window {window}");
    }
}

#[test]
fn cel_rules_reject_windows_outside_1s_to_5m() {
    for window in ["500ms", "0s", "301s", "10m", "1h"] {
        let object = with_spec(json!({"podSelector": {}, "window": window}));
        assert_eq!(
            cel_errors(&object),
            vec!["window must be between 1s and 5m".to_owned()],
            "window {window}"
        );
    }
}

#[test]
fn cel_rules_bound_the_slow_threshold() {
    let ok = with_spec(json!({"podSelector": {}, "slowThreshold": "250ms"}));
    assert!(cel_errors(&ok).is_empty());
    for threshold in ["0s", "2h"] {
        let object = with_spec(json!({"podSelector": {}, "slowThreshold": threshold}));
        assert_eq!(
            cel_errors(&object),
            vec!["slowThreshold must be more than 0 and at most 1h".to_owned()]
        );
    }
}

#[test]
fn samples_behave_as_documented() {
    // Valid: passes the API server's rules and the operator's.
    let valid = sample("traceprofile-valid.yaml");
    assert!(cel_errors(&valid).is_empty());
    let mut profile: TraceProfile = serde_json::from_value(valid).unwrap();
    profile.metadata.namespace = Some("shop".into());
    let config = profile.resolve().unwrap();
    assert_eq!(config.window_seconds, 10);
    assert_eq!(config.slow_threshold_ms, Some(250));

    // Invalid route: passes the API server, Degraded by the operator.
    let invalid = sample("traceprofile-invalid-route.yaml");
    assert!(cel_errors(&invalid).is_empty());
    let profile: TraceProfile = serde_json::from_value(invalid).unwrap();
    let problems = profile.resolve().unwrap_err();
    assert_eq!(problems[0].field, "spec.routeTemplates[0]");

    // Rejected: the API server's CEL rule refuses it.
    let rejected = sample("traceprofile-rejected.yaml");
    assert_eq!(
        cel_errors(&rejected),
        vec!["window must be between 1s and 5m".to_owned()]
    );
}
