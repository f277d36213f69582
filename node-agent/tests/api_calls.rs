//! The node agent's Kubernetes API calls, held to `trazor_node_agent::rbac::API_CALLS`: its
//! watches of this node's pods and of its configuration run against a recording API server
//! (a kubeconfig pointing at a local HTTP server), and every request they make must be an
//! entry of the table, and every entry must be made. So a new call fails here until it is
//! listed, and the chart test then fails until the chart grants it.

// Test helpers fail the test with a message saying what was expected.
#![allow(clippy::expect_used)]

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::StatusCode,
    response::Response,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use trazor_node_agent::{
    pods::{self, PodDirectory, PodSource},
    rbac::{API_CALLS, CONFIG_MAP_NAME},
    ship::{Outbox, ShipperStats},
    telemetry::AgentTelemetry,
};
use trazor_proto::{agent_config::CONFIG_KEY, api_access::ApiRequest};

const NAMESPACE: &str = "trazor-system";
const NODE: &str = "node-a";

type Recorded = Arc<Mutex<Vec<(String, String)>>>;

/// Answers like an API server holding this node, no pods and the agents' ConfigMap; watches
/// stay open without events. Records every request.
async fn fake_api_server(State(recorded): State<Recorded>, request: Request) -> Response {
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    recorded
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((method, uri.clone()));
    let path = request.uri().path();
    let reply = |status: StatusCode, body: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("response")
    };
    if request
        .uri()
        .query()
        .is_some_and(|q| q.contains("watch=true"))
    {
        let never = futures::stream::pending::<Result<Vec<u8>, std::io::Error>>();
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(never))
            .expect("response");
    }
    if path == format!("/api/v1/nodes/{NODE}") {
        return reply(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": NODE, "labels": {"pool": "tracing"}}}),
        );
    }
    let items = if path.ends_with("/configmaps") {
        json!([{"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": CONFIG_MAP_NAME, "namespace": NAMESPACE, "resourceVersion": "5"},
                "data": {CONFIG_KEY: "{\"version\": 1, \"profiles\": []}"}}])
    } else {
        json!([])
    };
    if path.ends_with("/pods") || path.ends_with("/configmaps") {
        return reply(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "List",
                   "metadata": {"resourceVersion": "5"}, "items": items}),
        );
    }
    reply(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

#[test]
fn every_api_call_of_the_agent_is_listed_and_every_listed_call_is_made() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a local port");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let address = listener.local_addr().expect("its address");
    let kubeconfig =
        std::env::temp_dir().join(format!("trazor-api-calls-{}.yaml", std::process::id()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{address}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        ),
    )
    .expect("kubeconfig written");
    // SAFETY: this test is the only one in its binary and sets the variable before it starts
    // any thread (the runtime comes next), so nothing reads the environment meanwhile.
    unsafe { std::env::set_var("KUBECONFIG", &kubeconfig) };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");

    let recorded = Recorded::default();
    let directory = PodDirectory::default();
    runtime.block_on(async {
        let app = Router::new()
            .fallback(fake_api_server)
            .with_state(recorded.clone());
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let health = Arc::new(AgentTelemetry::new(Arc::new(Outbox::new(
            16,
            Arc::new(ShipperStats::default()),
        ))));
        let (pods_changed, _) = watch::channel(0);
        let pods_task = tokio::spawn(pods::follow(
            PodSource::Api {
                node_name: NODE.to_owned(),
            },
            directory.clone(),
            pods_changed,
            health.clone(),
        ));
        let (document, mut documents) = watch::channel(String::new());
        let config_task = tokio::spawn(pods::follow_config_map(
            NAMESPACE.to_owned(),
            CONFIG_MAP_NAME.to_owned(),
            CONFIG_KEY.to_owned(),
            document,
            health,
        ));
        let watching = |resource: &str| {
            recorded
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|(_, uri)| uri.contains(resource) && uri.contains("watch=true"))
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while !(watching("/pods?") && watching("/configmaps?")) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the agent watches its pods and its ConfigMap within 10 s");
        tokio::time::timeout(
            Duration::from_secs(5),
            documents.wait_for(|d| !d.is_empty()),
        )
        .await
        .expect("the configuration arrives within 5 s")
        .expect("configuration channel");
        pods_task.abort();
        config_task.abort();
    });
    let _ = std::fs::remove_file(&kubeconfig);
    assert_eq!(
        directory.node_labels().get("pool").map(String::as_str),
        Some("tracing"),
        "this node's labels were read"
    );

    let no_flags = |_: &str| None;
    let mut used = BTreeSet::new();
    let mut unlisted = Vec::new();
    for (method, uri) in recorded
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        let request = ApiRequest::parse(method, uri).expect("a resource request");
        match API_CALLS
            .iter()
            .position(|call| call.allows(&request, NAMESPACE, &no_flags))
        {
            Some(index) => {
                used.insert(index);
            }
            None => unlisted.push(format!("{method} {uri} ({request})")),
        }
    }
    assert!(
        unlisted.is_empty(),
        "the node agent made API calls that trazor_node_agent::rbac::API_CALLS does not list; \
         add them there and grant them in charts/trazor/templates/rbac.yaml:\n{}",
        unlisted.join("\n")
    );
    let never_made: Vec<String> = API_CALLS
        .iter()
        .enumerate()
        .filter(|(index, _)| !used.contains(index))
        .map(|(_, call)| call.to_string())
        .collect();
    assert!(
        never_made.is_empty(),
        "trazor_node_agent::rbac::API_CALLS lists calls the agent no longer makes (remove them \
         and their RBAC): {never_made:?}"
    );
}
