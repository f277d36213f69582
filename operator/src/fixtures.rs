//! Test fixtures: profiles, a [`Context`] whose client talks to a mocked API server, and the
//! [`ApiServerVerifier`] that plays the API server's part in a [`Scenario`].
//!
//! Every request the reconciler makes is asserted (method, full URI with `fieldManager`, and
//! body), in order. A call the reconciler does not make fails the test by timing out
//! ([`timeout_after_1s`]); a call it makes beyond the scenario finds the mock closed and fails
//! the reconcile. Every request served must also be one that [`crate::rbac::API_CALLS`] lists,
//! so the RBAC the chart grants keeps up with the code ([`assert_listed_in_rbac`]).
//!
//! [`RecordingApiServer`] answers anything, for tests of which calls whole tasks (start-up,
//! leader election, the controller's watches) make.

use std::sync::{Arc, Mutex, PoisonError};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Client, Resource, ResourceExt,
    client::Body,
    runtime::{reflector::store::Writer, watcher},
};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use crate::{
    Metrics, TraceProfile, TraceProfileStatus,
    controller::Context,
    daemonset::{AgentSettings, node_agent_daemonset},
    profile::FINALIZER,
};

/// Namespace of the test profiles.
pub const NS: &str = "shop";
/// Namespace of the agents, ConfigMap and DaemonSet in tests.
pub const AGENT_NS: &str = "trazor-system";
/// The operator's own Deployment in tests (`--owner-deployment`), in [`AGENT_NS`].
pub const OPERATOR_DEPLOYMENT: &str = "trazor-operator";

/// Fails the test when `method uri` is a call the operator's RBAC table does not list.
pub fn assert_listed_in_rbac(method: &Method, uri: &str) {
    if let Err(unlisted) =
        crate::rbac::entry_for(method.as_str(), uri, AGENT_NS, OPERATOR_DEPLOYMENT)
    {
        panic!("{unlisted}");
    }
}

impl TraceProfile {
    /// A stored profile in [`NS`] with the given spec (JSON, defaults filled in by serde).
    pub fn test(name: &str, created_second: i64, spec: Value) -> Self {
        let spec = serde_json::from_value(spec).expect("valid test spec");
        let mut profile = TraceProfile::new(name, spec);
        let meta = profile.meta_mut();
        meta.namespace = Some(NS.into());
        meta.uid = Some(format!("uid-{name}"));
        meta.generation = Some(1);
        meta.resource_version = Some("100".into());
        meta.creation_timestamp = Some(Time(
            Timestamp::from_second(created_second).expect("valid time"),
        ));
        profile
    }

    /// With the operator's finalizer, as after the first reconcile.
    pub fn finalized(mut self) -> Self {
        self.finalizers_mut().push(FINALIZER.to_string());
        self
    }

    /// Being deleted (the API server set a deletion timestamp).
    pub fn deleting(mut self) -> Self {
        self.meta_mut().deletion_timestamp = Some(Time(
            Timestamp::from_second(2_000_000_000).expect("valid time"),
        ));
        self
    }

    /// With a status, as the API server would return it.
    pub fn with_status(mut self, status: TraceProfileStatus) -> Self {
        self.status = Some(status);
        self
    }
}

/// A running pod in `namespace` on `node`.
pub fn running_pod(namespace: &str, name: &str, node: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": []},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("valid test pod")
}

/// A ready node-agent pod on `node`.
pub fn agent_pod(node: &str) -> Pod {
    let labels: serde_json::Map<String, Value> = crate::daemonset::agent_labels()
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    running_pod(
        AGENT_NS,
        &format!("trazor-node-agent-{node}"),
        node,
        Value::Object(labels),
    )
}

/// The agent settings used in tests.
pub fn test_settings() -> AgentSettings {
    let mut settings = AgentSettings::new(
        AGENT_NS,
        "ghcr.io/trazor-dev/trazor-node-agent:test",
        "http://trazor-collector:50051",
    );
    settings.auth_secret = Some("trazor-auth".into());
    settings
}

fn synced_writer<K>(objects: &[K]) -> Writer<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut writer = Writer::default();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object.clone()));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    writer
}

impl Context {
    /// A context over a mocked API server, with synced caches holding `profiles` and `pods`,
    /// and `last_config` as the ConfigMap's content at start-up.
    pub fn test(
        profiles: &[TraceProfile],
        pods: &[Pod],
        last_config: Option<String>,
    ) -> (Arc<Self>, ApiServerVerifier, Registry) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::default().register(&mut registry));
        let context = Context::new(
            client,
            test_settings(),
            synced_writer(profiles).as_reader(),
            synced_writer(pods).as_reader(),
            metrics,
            last_config,
        );
        (Arc::new(context), ApiServerVerifier(handle), registry)
    }
}

/// How the mock answers a request.
pub enum Reply {
    /// Returns the request body (what the API server does, near enough, for apply and create).
    Echo,
    /// Returns this object.
    Object(Value),
    /// Fails with this HTTP status.
    Failure(StatusCode),
}

/// One request the reconciler must make.
pub struct Call {
    what: String,
    method: Method,
    uri: String,
    check: Box<dyn FnOnce(&Value) + Send>,
    reply: Reply,
}

const APPLY_QUERY: &str = "?&force=true&fieldManager=trazor-operator";

impl Call {
    /// JSON patch adding the finalizer to a profile without finalizers.
    pub fn add_finalizer(profile: &TraceProfile) -> Self {
        Call {
            what: "add finalizer".into(),
            method: Method::PATCH,
            uri: format!(
                "/apis/trazor.dev/v1alpha1/namespaces/{NS}/traceprofiles/{}?",
                profile.name_any()
            ),
            check: Box::new(|body| {
                assert_eq!(
                    body,
                    &json!([
                        {"op": "test", "path": "/metadata/finalizers", "value": null},
                        {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
                    ])
                );
            }),
            reply: Reply::Object(json!(profile.clone().finalized())),
        }
    }

    /// JSON patch removing the finalizer (at index 0) after cleanup.
    pub fn remove_finalizer(profile: &TraceProfile) -> Self {
        Call {
            what: "remove finalizer".into(),
            method: Method::PATCH,
            uri: format!(
                "/apis/trazor.dev/v1alpha1/namespaces/{NS}/traceprofiles/{}?",
                profile.name_any()
            ),
            check: Box::new(|body| {
                assert_eq!(
                    body,
                    &json!([
                        {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                        {"op": "remove", "path": "/metadata/finalizers/0"}
                    ])
                );
            }),
            reply: Reply::Object(json!(profile)),
        }
    }

    /// Server-side apply of the ConfigMap; `profiles` is the expected `profiles` list of the
    /// configuration, written out in full by the test.
    pub fn apply_config_map(profiles: Value) -> Self {
        Call {
            what: "apply ConfigMap".into(),
            method: Method::PATCH,
            uri: format!(
                "/api/v1/namespaces/{AGENT_NS}/configmaps/trazor-node-agent-config{APPLY_QUERY}"
            ),
            check: Box::new(move |body| {
                assert_eq!(body["apiVersion"], "v1");
                assert_eq!(body["kind"], "ConfigMap");
                assert_eq!(body["metadata"]["name"], "trazor-node-agent-config");
                assert_eq!(body["metadata"]["namespace"], AGENT_NS);
                assert_eq!(
                    body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
                    "trazor-operator"
                );
                assert!(body["metadata"].get("ownerReferences").is_none());
                let data = body["data"].as_object().expect("ConfigMap data");
                assert_eq!(data.len(), 1, "only the agent config key: {data:?}");
                let text = data["agent-config.json"]
                    .as_str()
                    .expect("config is a string");
                let config: Value = serde_json::from_str(text).expect("config is JSON");
                assert_eq!(config, json!({"version": 1, "profiles": profiles}));
            }),
            reply: Reply::Echo,
        }
    }

    /// Server-side apply of the DaemonSet built from [`test_settings`].
    pub fn apply_daemonset() -> Self {
        Call {
            what: "apply DaemonSet".into(),
            method: Method::PATCH,
            uri: format!(
                "/apis/apps/v1/namespaces/{AGENT_NS}/daemonsets/trazor-node-agent{APPLY_QUERY}"
            ),
            check: Box::new(|body| {
                assert_eq!(body["apiVersion"], "apps/v1");
                assert_eq!(body["kind"], "DaemonSet");
                let expected =
                    serde_json::to_value(node_agent_daemonset(&test_settings())).expect("json");
                assert_eq!(body, &expected);
                // The parts that matter, spelled out rather than only compared to the builder.
                let pod = &body["spec"]["template"]["spec"];
                assert_eq!(pod["hostPID"], true);
                assert_eq!(
                    pod["containers"][0]["image"],
                    "ghcr.io/trazor-dev/trazor-node-agent:test"
                );
                assert_eq!(
                    pod["containers"][0]["securityContext"]["capabilities"]["add"],
                    json!(["BPF", "PERFMON"])
                );
            }),
            reply: Reply::Echo,
        }
    }

    /// An Event on `profile` with this type and reason.
    pub fn event(type_: &'static str, reason: &'static str, profile: &TraceProfile) -> Self {
        let name = profile.name_any();
        Call {
            what: format!("event {reason}"),
            method: Method::POST,
            uri: format!("/apis/events.k8s.io/v1/namespaces/{NS}/events?"),
            check: Box::new(move |body| {
                assert_eq!(body["type"], type_);
                assert_eq!(body["reason"], reason);
                assert_eq!(body["regarding"]["kind"], "TraceProfile");
                assert_eq!(body["regarding"]["name"], name.as_str());
                assert_eq!(body["reportingController"], "trazor-operator");
                assert!(body["note"].as_str().is_some_and(|n| !n.is_empty()));
            }),
            reply: Reply::Echo,
        }
    }

    /// Server-side apply of the status; `expected` is the status with `lastTransitionTime`
    /// left out of each condition (it is checked to be present).
    pub fn apply_status(profile: &TraceProfile, expected: Value) -> Self {
        let stored = profile.clone();
        Call {
            what: "apply status".into(),
            method: Method::PATCH,
            uri: format!(
                "/apis/trazor.dev/v1alpha1/namespaces/{NS}/traceprofiles/{}/status{APPLY_QUERY}",
                profile.name_any()
            ),
            check: Box::new(move |body| {
                assert_eq!(body["apiVersion"], "trazor.dev/v1alpha1");
                assert_eq!(body["kind"], "TraceProfile");
                assert_eq!(
                    body.as_object().map(|o| o.len()),
                    Some(3),
                    "only apiVersion, kind, status"
                );
                let mut status = body["status"].clone();
                for condition in status["conditions"].as_array_mut().expect("conditions") {
                    let time = condition
                        .as_object_mut()
                        .and_then(|c| c.remove("lastTransitionTime"))
                        .expect("lastTransitionTime");
                    assert!(time.is_string());
                }
                assert_eq!(status, expected);
            }),
            reply: Reply::Object(json!(stored)),
        }
    }

    /// Makes the API server fail this call.
    pub fn failing(mut self, status: StatusCode) -> Self {
        self.check = Box::new(|_| {});
        self.reply = Reply::Failure(status);
        self
    }
}

/// The scenarios the reconciler is tested against.
pub enum Scenario {
    /// Exactly these calls, in this order.
    Calls(Vec<Call>),
    /// No call at all.
    RadioSilence,
}

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Plays the API server in a [`Scenario`].
pub struct ApiServerVerifier(ApiServerHandle);

/// Waits for the verifier; fails when a call of the scenario was not made within a second.
pub async fn timeout_after_1s(handle: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(std::time::Duration::from_secs(1), handle)
        .await
        .expect("timeout on mock apiserver: the reconciler did not make every expected call")
        .expect("scenario succeeded");
}

impl ApiServerVerifier {
    /// Serves the scenario on a task; await it with [`timeout_after_1s`].
    pub fn run(self, scenario: Scenario) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut handle = self.0;
            let calls = match scenario {
                Scenario::Calls(calls) => calls,
                Scenario::RadioSilence => Vec::new(),
            };
            for call in calls {
                serve(&mut handle, call).await;
            }
            // Dropping the handle closes the mock: any further request fails the reconcile.
        })
    }
}

async fn serve(handle: &mut ApiServerHandle, call: Call) {
    let (request, send) = handle
        .next_request()
        .await
        .unwrap_or_else(|| panic!("service not called for: {}", call.what));
    assert_eq!(request.method(), call.method, "method of: {}", call.what);
    assert_eq!(request.uri().to_string(), call.uri, "URI of: {}", call.what);
    assert_listed_in_rbac(request.method(), &request.uri().to_string());
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("request body is JSON")
    };
    (call.check)(&body);
    let response = match call.reply {
        Reply::Echo => Response::builder().body(Body::from(bytes.to_vec())),
        Reply::Object(object) => {
            Response::builder().body(Body::from(serde_json::to_vec(&object).expect("json")))
        }
        Reply::Failure(status) => Response::builder().status(status).body(Body::from(
            serde_json::to_vec(&json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "mock failure", "reason": "InternalError", "code": status.as_u16()
            }))
            .expect("json"),
        )),
    };
    send.send_response(response.expect("valid response"));
}

/// An API server that answers every request as a real one would for a single client, and
/// records them: objects are kept by path (created by POST, merged by PATCH, removed by
/// DELETE; an apply creates), lists are empty and watches never answer. It checks nothing
/// itself: tests read [`RecordingApiServer::requests`] to see which calls were made.
#[derive(Clone, Default)]
pub struct RecordingApiServer {
    requests: Arc<Mutex<Vec<(Method, String)>>>,
}

impl RecordingApiServer {
    /// A client of a new server that holds `objects` (API path of each, e.g.
    /// `/apis/apps/v1/namespaces/ns/deployments/name`, and the object).
    pub fn start(objects: Vec<(String, Value)>) -> (Client, Self) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = Self::default();
        let requests = server.requests.clone();
        tokio::spawn(async move {
            let mut stored: std::collections::HashMap<String, Value> =
                objects.into_iter().collect();
            // Answers to watches are held back, never sent: the watch stays open.
            let mut open_watches = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let uri = request.uri().clone();
                requests
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((method.clone(), uri.to_string()));
                let apply = request
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes() == b"application/apply-patch+yaml");
                let bytes = request
                    .into_body()
                    .collect_bytes()
                    .await
                    .expect("request body");
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let query = uri.query().unwrap_or("");
                let path = uri.path().trim_end_matches('/').to_owned();
                let named = |object: &Value| {
                    format!(
                        "{path}/{}",
                        object["metadata"]["name"].as_str().unwrap_or("")
                    )
                };
                let (status, reply) = match method {
                    Method::GET if query.contains("watch=true") => {
                        open_watches.push(send);
                        continue;
                    }
                    Method::GET => match stored.get(&path) {
                        Some(object) => (StatusCode::OK, object.clone()),
                        None if looks_like_collection(&path) => (
                            StatusCode::OK,
                            json!({"apiVersion": "v1", "kind": "List",
                                   "metadata": {"resourceVersion": "1"}, "items": []}),
                        ),
                        None => not_found(),
                    },
                    Method::POST => {
                        let mut object = body;
                        object["metadata"]["resourceVersion"] = json!("1");
                        object["metadata"]["uid"] = json!("uid-created");
                        stored.insert(named(&object), object.clone());
                        (StatusCode::CREATED, object)
                    }
                    Method::PATCH => match (stored.get_mut(&path), apply) {
                        (Some(object), _) => {
                            merge(object, &body);
                            (StatusCode::OK, object.clone())
                        }
                        (None, true) => {
                            // The API server authorizes an apply that creates its object as
                            // a create too: recorded as the POST it stands for.
                            let collection = path.rsplit_once('/').map_or("", |(c, _)| c);
                            requests
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push((Method::POST, collection.to_owned()));
                            stored.insert(path, body.clone());
                            (StatusCode::CREATED, body)
                        }
                        (None, false) => not_found(),
                    },
                    Method::DELETE => match stored.remove(&path) {
                        Some(object) => (StatusCode::OK, object),
                        None => not_found(),
                    },
                    _ => not_found(),
                };
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                        .expect("valid response"),
                );
            }
            drop(open_watches);
        });
        (Client::new(service, "default"), server)
    }

    /// Every request so far, as method and URI.
    pub fn requests(&self) -> Vec<(Method, String)> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A collection path ends in a resource (`.../pods`), an object path in a name: paths have
/// an even number of segments after `/api/v1` or `/apis/group/version` for collections.
fn looks_like_collection(path: &str) -> bool {
    let segments = path.trim_matches('/').split('/').count();
    let prefix = if path.starts_with("/api/") { 2 } else { 3 };
    segments
        .checked_sub(prefix)
        .is_some_and(|after_version| after_version % 2 == 1)
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": "not found", "reason": "NotFound", "code": 404}),
    )
}

/// JSON merge patch (RFC 7386): what strategic merge and apply come to for plain fields.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}
