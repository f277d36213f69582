//! Integration suite against a real Kubernetes API server (kind, minikube, any cluster).
//!
//! Ignored by default; run with a cluster in `KUBECONFIG`:
//!
//! ```sh
//! KUBECONFIG=~/.kube/config cargo test -p trazor-operator --test cluster -- --ignored --test-threads=1
//! ```
//!
//! Each test installs the CRD from `crds/` (server-side apply, idempotent), creates two fresh
//! namespaces (profiles, and the agents' DaemonSet/ConfigMap), runs the controller in-process
//! against the cluster, applies the sample profiles of `tests/data/`, asserts the ConfigMap,
//! the DaemonSet and the profiles' status, and deletes what it created. The CRD stays installed.
//! The agent image is not pulled by anything the tests check, so no registry is needed.
//! The user needs cluster-admin (it installs a CRD and creates namespaces).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::wait::{await_condition, conditions},
};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use trazor_operator::{
    Metrics, TraceProfile, controller,
    daemonset::{AgentSettings, CONFIG_MAP_NAME, DAEMONSET_NAME},
    profile::FINALIZER,
};
use trazor_proto::agent_config::{CONFIG_KEY, NodeAgentConfig};

const MANAGER: &str = "trazor-operator-tests";
const WAIT: Duration = Duration::from_secs(60);

/// Each test runs its own controller, and a controller reconciles every profile of the
/// cluster: one test at a time, whatever `--test-threads` says.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo_file(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sample(name: &str) -> Value {
    serde_norway::from_str(&repo_file(&format!("operator/tests/data/{name}"))).unwrap()
}

struct Cluster {
    client: Client,
    /// Namespace of the profiles.
    ns: String,
    /// Namespace of the agents' DaemonSet and ConfigMap.
    agent_ns: String,
    stop: Option<oneshot::Sender<()>>,
    controller: Option<tokio::task::JoinHandle<trazor_operator::Result<()>>>,
}

impl Cluster {
    async fn start(name: &str) -> Self {
        let client = Client::try_default()
            .await
            .expect("no cluster: set KUBECONFIG (see the module docs)");
        install_crd(&client).await;

        let suffix = std::process::id();
        let ns = format!("trazor-it-{name}-{suffix}");
        let agent_ns = format!("trazor-it-{name}-agents-{suffix}");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for namespace in [&ns, &agent_ns] {
            let object =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
            namespaces
                .patch(
                    namespace,
                    &PatchParams::apply(MANAGER),
                    &Patch::Apply(&object),
                )
                .await
                .unwrap();
        }

        let settings = AgentSettings::new(
            &agent_ns,
            "trazor-node-agent:it",
            "http://trazor-collector:50051",
        );
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        let controller = tokio::spawn(controller::run(
            client.clone(),
            settings,
            Arc::new(Metrics::default()),
            shutdown,
        ));
        Cluster {
            client,
            ns,
            agent_ns,
            stop: Some(stop_tx),
            controller: Some(controller),
        }
    }

    fn profiles(&self) -> Api<TraceProfile> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn apply(&self, mut manifest: Value) -> kube::Result<TraceProfile> {
        let name = manifest["metadata"]["name"].as_str().unwrap().to_owned();
        manifest["metadata"]["namespace"] = json!(self.ns);
        self.profiles()
            .patch(
                &name,
                &PatchParams::apply(MANAGER),
                &Patch::Apply(&manifest),
            )
            .await
    }

    /// Waits until `check` holds for the profile, and returns it.
    async fn wait_profile(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&TraceProfile) -> bool,
    ) -> TraceProfile {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(profile) = self.profiles().get_opt(name).await.unwrap() {
                if check(&profile) {
                    return profile;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!(
                        "timed out waiting for {name}: {what}; last seen: {:#?}",
                        profile.status
                    );
                }
            } else if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {name}: {what}; it does not exist");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> TraceProfile {
        let what = format!("condition {type_}={status} ({reason})");
        self.wait_profile(name, &what, |p| {
            p.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == type_ && c.status == status && c.reason == reason)
            })
        })
        .await
    }

    /// Waits until the agent configuration satisfies `check`, and returns it.
    async fn wait_config(
        &self,
        what: &str,
        check: impl Fn(&NodeAgentConfig) -> bool,
    ) -> NodeAgentConfig {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.agent_ns);
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            if let Some(cm) = api.get_opt(CONFIG_MAP_NAME).await.unwrap() {
                let text = cm
                    .data
                    .unwrap_or_default()
                    .remove(CONFIG_KEY)
                    .expect("config key");
                let config: NodeAgentConfig =
                    serde_json::from_str(&text).expect("agent config JSON");
                if check(&config) {
                    return config;
                }
                last = Some(config);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("timed out waiting for the agent config: {what}; last seen: {last:#?}");
    }

    fn names_in(&self, config: &NodeAgentConfig) -> Vec<String> {
        config
            .profiles
            .iter()
            .filter(|p| p.namespace == self.ns)
            .map(|p| p.name.clone())
            .collect()
    }

    /// Deletes the profiles (the running controller releases them), stops the controller
    /// and deletes the namespaces.
    async fn stop(mut self) {
        let profiles = self.profiles();
        for profile in profiles.list(&Default::default()).await.unwrap() {
            let _ = profiles
                .delete(&profile.name_any(), &DeleteParams::default())
                .await;
            let _ = tokio::time::timeout(
                WAIT,
                await_condition(
                    profiles.clone(),
                    &profile.name_any(),
                    conditions::is_deleted(&profile.uid().unwrap()),
                ),
            )
            .await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(controller) = self.controller.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        for namespace in [&self.ns, &self.agent_ns] {
            let _ = namespaces
                .delete(namespace, &DeleteParams::background())
                .await;
        }
    }
}

async fn install_crd(client: &Client) {
    let crd: CustomResourceDefinition =
        serde_norway::from_str(&repo_file("crds/traceprofile.yaml")).unwrap();
    let name = crd.name_any();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("installing the CRD needs cluster-admin");
    tokio::time::timeout(
        WAIT,
        await_condition(api, &name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD not established in time")
    .unwrap();
}

#[tokio::test]
#[ignore = "needs a real cluster: KUBECONFIG=... cargo test -p trazor-operator --test cluster -- --ignored"]
async fn valid_profile_is_ready_and_configures_the_agents() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("valid").await;
    cluster
        .apply(sample("traceprofile-valid.yaml"))
        .await
        .unwrap();

    let profile = cluster
        .wait_condition("checkout", "Ready", "True", "Applied")
        .await;
    assert!(profile.finalizers().contains(&FINALIZER.to_owned()));
    let status = profile.status.unwrap();
    assert_eq!(status.observed_generation, profile.metadata.generation);

    let config = cluster
        .wait_config("checkout present", |c| cluster.names_in(c) == ["checkout"])
        .await;
    let entry = config
        .profiles
        .iter()
        .find(|p| p.namespace == cluster.ns)
        .unwrap();
    assert_eq!(entry.window_seconds, 10);
    assert_eq!(entry.slow_threshold_ms, Some(250));
    assert_eq!(entry.route_templates.len(), 3);

    let daemonsets: Api<DaemonSet> = Api::namespaced(cluster.client.clone(), &cluster.agent_ns);
    let ds = daemonsets.get(DAEMONSET_NAME).await.unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_pid, Some(true));
    let caps = pod.containers[0]
        .security_context
        .clone()
        .unwrap()
        .capabilities
        .unwrap();
    assert_eq!(caps.add.unwrap(), vec!["BPF", "PERFMON"]);
    cluster.stop().await;
}

#[tokio::test]
#[ignore = "needs a real cluster: KUBECONFIG=... cargo test -p trazor-operator --test cluster -- --ignored"]
async fn invalid_profile_is_degraded_and_does_not_disturb_others() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("invalid").await;
    cluster
        .apply(sample("traceprofile-valid.yaml"))
        .await
        .unwrap();
    cluster
        .apply(sample("traceprofile-invalid-route.yaml"))
        .await
        .unwrap();

    let broken = cluster
        .wait_condition("broken-routes", "Degraded", "True", "InvalidSpec")
        .await;
    let degraded = broken
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert!(
        degraded.message.contains("spec.routeTemplates[0]"),
        "{}",
        degraded.message
    );
    cluster
        .wait_condition("checkout", "Ready", "True", "Applied")
        .await;
    cluster
        .wait_config("only the valid profile", |c| {
            cluster.names_in(c) == ["checkout"]
        })
        .await;
    cluster.stop().await;
}

#[tokio::test]
#[ignore = "needs a real cluster: KUBECONFIG=... cargo test -p trazor-operator --test cluster -- --ignored"]
async fn api_server_rejects_a_window_outside_the_cel_rule() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("rejected").await;
    let error = cluster
        .apply(sample("traceprofile-rejected.yaml"))
        .await
        .expect_err("the CEL rule must reject window 10m");
    assert!(
        error
            .to_string()
            .contains("window must be between 1s and 5m"),
        "{error}"
    );
    // The same through a plain create, which is what `kubectl create` does.
    let mut manifest = sample("traceprofile-rejected.yaml");
    manifest["metadata"]["namespace"] = json!(cluster.ns);
    let object: TraceProfile = serde_json::from_value(manifest).unwrap();
    assert!(
        cluster
            .profiles()
            .create(&PostParams::default(), &object)
            .await
            .is_err()
    );
    cluster.stop().await;
}

#[tokio::test]
#[ignore = "needs a real cluster: KUBECONFIG=... cargo test -p trazor-operator --test cluster -- --ignored"]
async fn younger_conflicting_profile_is_degraded() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("conflict").await;
    cluster
        .apply(sample("traceprofile-valid.yaml"))
        .await
        .unwrap();
    cluster
        .wait_condition("checkout", "Ready", "True", "Applied")
        .await;
    let mut younger = sample("traceprofile-valid.yaml");
    younger["metadata"]["name"] = json!("checkout-minutely");
    younger["spec"]["window"] = json!("1m");
    cluster.apply(younger).await.unwrap();

    cluster
        .wait_condition(
            "checkout-minutely",
            "Degraded",
            "True",
            "ConflictingProfile",
        )
        .await;
    cluster
        .wait_config("only the older profile", |c| {
            cluster.names_in(c) == ["checkout"]
        })
        .await;
    cluster.stop().await;
}

#[tokio::test]
#[ignore = "needs a real cluster: KUBECONFIG=... cargo test -p trazor-operator --test cluster -- --ignored"]
async fn deleted_profile_leaves_the_config_and_is_released() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("delete").await;
    let profile = cluster
        .apply(sample("traceprofile-valid.yaml"))
        .await
        .unwrap();
    cluster
        .wait_condition("checkout", "Ready", "True", "Applied")
        .await;
    cluster
        .wait_config("checkout present", |c| cluster.names_in(c) == ["checkout"])
        .await;

    cluster
        .profiles()
        .delete("checkout", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::timeout(
        WAIT,
        await_condition(
            cluster.profiles(),
            "checkout",
            conditions::is_deleted(&profile.uid().unwrap()),
        ),
    )
    .await
    .expect("the finalizer was not released")
    .unwrap();
    cluster
        .wait_config("checkout removed", |c| cluster.names_in(c).is_empty())
        .await;
    cluster.stop().await;
}
