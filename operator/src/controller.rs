//! The reconciler: every `TraceProfile` event re-renders the whole node-agent configuration,
//! applies it with the DaemonSet, and reports the profile's verdict on its status.
//!
//! Ownership. The ConfigMap and the DaemonSet are shared by all profiles, so they must not be
//! owned by any one profile: an owner reference to a profile would let the garbage collector
//! delete the agents of every other profile when that one is deleted. They are owned by the
//! operator's Deployment instead, when `main` is told its name (`--owner-deployment`, set by
//! the Helm chart), so uninstalling Trazor removes them; without it they carry no owner
//! reference and `kubectl delete` removes them.
//!
//! Finalizer. Each profile carries [`FINALIZER`] because deleting a profile must change the
//! shared ConfigMap: the reconciler re-renders it without the profile before the API server
//! lets the object go. Without the finalizer the deleted object would vanish from the cache
//! and no reconcile would run for it.
//!
//! Concurrency is one reconcile at a time: each renders from the cache of all profiles and
//! writes the same ConfigMap, and serialising them means an older render never overwrites a
//! newer one. When a render changes the configuration, every profile is reconciled again
//! (`reconcile_all_on`), because one profile's change can resolve or create another's conflict.

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Client, Resource, ResourceExt,
    api::{Api, ListParams, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{Event as Finalizer, finalizer},
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use trazor_proto::agent_config::CONFIG_KEY;

use crate::{
    Error, Metrics, Result,
    daemonset::{AgentSettings, CONFIG_MAP_NAME, DAEMONSET_NAME, node_agent_daemonset},
    profile::{CONDITION_DEGRADED, CONDITION_READY, FINALIZER, TraceProfile, TraceProfileStatus},
    render::{PodFacts, Rendered, Verdict, node_agent_config_map, render, strip_pod},
};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "trazor-operator";

/// How often a profile is reconciled without any change, to refresh pod and node counts.
pub const RESYNC: Duration = Duration::from_secs(60);

/// What a reconcile needs; shared by all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// How the agents are deployed.
    pub settings: AgentSettings,
    /// Cache of all profiles (the controller's own).
    pub profiles: Store<TraceProfile>,
    /// Cache of all pods, stripped to what [`PodFacts`] needs.
    pub pods: Store<Pod>,
    /// Publishes Kubernetes Events on profiles.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The configuration JSON last applied (or found at start-up), to tell changes apart.
    last_config: Mutex<Option<String>>,
    /// Asks the controller to reconcile every profile (after the configuration changed).
    reconcile_all: Option<mpsc::UnboundedSender<()>>,
}

impl Context {
    /// A context; `last_config` is what the ConfigMap held at start-up, if it existed.
    pub fn new(
        client: Client,
        settings: AgentSettings,
        profiles: Store<TraceProfile>,
        pods: Store<Pod>,
        metrics: Arc<Metrics>,
        last_config: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            profiles,
            pods,
            metrics,
            last_config: Mutex::new(last_config),
            reconcile_all: None,
        }
    }

    /// Records `json` as applied; true when it differs from what was applied before.
    fn note_config(&self, json: &str) -> bool {
        let mut last = self
            .last_config
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.as_deref() == Some(json) {
            return false;
        }
        *last = Some(json.to_owned());
        true
    }

    async fn caches_ready(&self) -> Result<()> {
        // The controller can hand out a profile before its cache saw the initial list; a render
        // from a partial cache would drop the other profiles from every agent.
        let wait = Duration::from_secs(5);
        tokio::time::timeout(wait, self.profiles.wait_until_ready())
            .await
            .map_err(|_| Error::CacheNotReady("TraceProfile"))?
            .map_err(|_| Error::CacheNotReady("TraceProfile"))?;
        tokio::time::timeout(wait, self.pods.wait_until_ready())
            .await
            .map_err(|_| Error::CacheNotReady("Pod"))?
            .map_err(|_| Error::CacheNotReady("Pod"))?;
        Ok(())
    }

    /// Renders all profiles; `current` replaces its cached copy, which may be older.
    fn render(&self, current: &TraceProfile) -> Rendered {
        let cached = self.profiles.state();
        let key = current.key();
        let mut all: Vec<&TraceProfile> = cached
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| p.key() != key)
            .collect();
        all.push(current);
        let pods: Vec<PodFacts> = self
            .pods
            .state()
            .iter()
            .map(|p| PodFacts::from_pod(p))
            .collect();
        let rendered = render(&all, &pods, &self.settings.namespace);
        let count = |reason: &str| {
            rendered
                .verdicts
                .values()
                .filter(|v| v.reason() == reason)
                .count()
        };
        self.metrics.set_profiles(
            count("Applied"),
            count("InvalidSpec"),
            count("ConflictingProfile"),
        );
        rendered
    }

    /// Applies the ConfigMap; true when the configuration changed.
    async fn apply_config(&self, rendered: &Rendered) -> Result<bool> {
        let json = rendered.config_json()?;
        let config_map = node_agent_config_map(&self.settings, &json);
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        api.patch(CONFIG_MAP_NAME, &apply_params(), &Patch::Apply(&config_map))
            .await
            .map_err(Error::kube(format!(
                "applying ConfigMap {}/{CONFIG_MAP_NAME}",
                self.settings.namespace
            )))?;
        Ok(self.note_config(&json))
    }

    /// Tells about a changed configuration: an Event on the profile whose reconcile changed it,
    /// a metric, and a reconcile of every profile, whose conflicts may have changed with it.
    async fn announce_config_change(
        &self,
        rendered: &Rendered,
        profile: &TraceProfile,
    ) -> Result<()> {
        self.metrics.config_updates.inc();
        let count = rendered.config.profiles.len();
        info!(profiles = count, trigger = %profile.key(), "node-agent configuration changed");
        if let Some(all) = &self.reconcile_all {
            // A closed channel means the controller is shutting down; nothing to refresh.
            let _ = all.send(());
        }
        self.publish(
            profile,
            EventType::Normal,
            "ConfigUpdated",
            "Render",
            format!("node-agent configuration rewritten; it now holds {count} profile(s)"),
        )
        .await
    }

    async fn apply_daemonset(&self) -> Result<()> {
        let daemonset = node_agent_daemonset(&self.settings);
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        api.patch(DAEMONSET_NAME, &apply_params(), &Patch::Apply(&daemonset))
            .await
            .map_err(Error::kube(format!(
                "applying DaemonSet {}/{DAEMONSET_NAME}",
                self.settings.namespace
            )))?;
        Ok(())
    }

    async fn publish(
        &self,
        profile: &TraceProfile,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> Result<()> {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            // events.k8s.io caps the note at 1 kB.
            note: Some(truncate(note, 1024)),
            action: action.to_owned(),
            secondary: None,
        };
        self.recorder
            .publish(&event, &profile.object_ref(&()))
            .await
            .map_err(Error::kube(format!(
                "publishing event {reason} on {}",
                profile.key()
            )))
    }
}

fn apply_params() -> PatchParams {
    // `force`: the operator is the only writer of these fields; a manual edit is drift to undo.
    PatchParams::apply(FIELD_MANAGER).force()
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Reconciles one profile: adds the finalizer, or applies, or cleans up after deletion.
pub async fn reconcile(profile: Arc<TraceProfile>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let namespace = profile
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    ctx.caches_ready().await?;
    let api: Api<TraceProfile> = Api::namespaced(ctx.client.clone(), &namespace);
    debug!(profile = %profile.key(), "reconciling");
    finalizer(&api, FINALIZER, profile, |event| async {
        match event {
            Finalizer::Apply(profile) => apply(&profile, &ctx, &api).await,
            Finalizer::Cleanup(profile) => cleanup(&profile, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(profile: &TraceProfile, ctx: &Context, api: &Api<TraceProfile>) -> Result<Action> {
    let name = profile
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingMetadata("name"))?;
    let rendered = ctx.render(profile);
    let changed = ctx.apply_config(&rendered).await?;
    ctx.apply_daemonset().await?;
    if changed {
        ctx.announce_config_change(&rendered, profile).await?;
    }

    let key = profile.key();
    // The profile is not being deleted, so render always has a verdict for it.
    let verdict = rendered
        .verdicts
        .get(&key)
        .cloned()
        .unwrap_or(Verdict::Applied);
    let coverage = rendered.coverage.get(&key).copied().unwrap_or_default();
    let previous = profile.status.as_ref();
    let status = TraceProfileStatus {
        conditions: conditions(
            previous,
            &verdict,
            profile.metadata.generation,
            Time(Timestamp::now()),
        ),
        observed_generation: profile.metadata.generation,
        matched_pods: coverage.matched_pods,
        nodes_reporting: coverage.nodes_reporting,
    };

    // Events only on transitions, so a resync does not repeat them.
    let was = |type_: &str| {
        previous
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    match &verdict {
        Verdict::Applied => {
            if was(CONDITION_READY) != Some(("True".to_owned(), verdict.reason().to_owned())) {
                let note = format!(
                    "applied to the node agents: {} pod(s) matched",
                    coverage.matched_pods
                );
                ctx.publish(profile, EventType::Normal, "Applied", "Validate", note)
                    .await?;
            }
        }
        Verdict::Invalid(_) | Verdict::Conflicting { .. } => {
            if was(CONDITION_DEGRADED) != Some(("True".to_owned(), verdict.reason().to_owned())) {
                warn!(profile = %key, reason = verdict.reason(), message = %verdict.message(), "profile degraded");
                let reason = verdict.reason();
                ctx.publish(
                    profile,
                    EventType::Warning,
                    reason,
                    "Validate",
                    verdict.message(),
                )
                .await?;
            }
        }
    }

    let patch = serde_json::json!({
        "apiVersion": TraceProfile::api_version(&()),
        "kind": TraceProfile::kind(&()),
        "status": status,
    });
    api.patch_status(&name, &apply_params(), &Patch::Apply(&patch))
        .await
        .map_err(Error::kube(format!(
            "updating the status of TraceProfile {key}"
        )))?;
    Ok(Action::requeue(RESYNC))
}

async fn cleanup(profile: &TraceProfile, ctx: &Context) -> Result<Action> {
    // The profile has a deletion timestamp, so the render leaves it out.
    let rendered = ctx.render(profile);
    if ctx.apply_config(&rendered).await? {
        ctx.announce_config_change(&rendered, profile).await?;
    }
    ctx.publish(
        profile,
        EventType::Normal,
        "Removed",
        "Delete",
        format!(
            "removed from the node-agent configuration; {} profile(s) remain",
            rendered.config.profiles.len()
        ),
    )
    .await?;
    Ok(Action::await_change())
}

/// The `Ready` and `Degraded` conditions for a verdict, keeping each transition time while the
/// condition's status does not change.
pub fn conditions(
    previous: Option<&TraceProfileStatus>,
    verdict: &Verdict,
    generation: Option<i64>,
    now: Time,
) -> Vec<Condition> {
    let applied = matches!(verdict, Verdict::Applied);
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" };
        let last_transition_time = previous
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time,
        }
    };
    vec![
        condition(
            CONDITION_READY,
            applied,
            verdict.reason(),
            verdict.message(),
        ),
        if applied {
            condition(CONDITION_DEGRADED, false, "AsExpected", String::new())
        } else {
            condition(
                CONDITION_DEGRADED,
                true,
                verdict.reason(),
                verdict.message(),
            )
        },
    ]
}

/// Retries a failed reconcile with a delay that suits the failure, and counts it.
pub fn error_policy(profile: Arc<TraceProfile>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(profile = %profile.key(), %error, "reconcile failed");
    ctx.metrics.reconcile_failed(error);
    match error {
        Error::CacheNotReady(_) => Action::requeue(Duration::from_secs(2)),
        _ => Action::requeue(Duration::from_secs(15)),
    }
}

/// Owner reference to the operator's Deployment `name` in `namespace` (see the module docs).
pub async fn deployment_owner(
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<OwnerReference> {
    let api: Api<Deployment> = Api::namespaced(client, namespace);
    let deployment = api.get(name).await.map_err(Error::kube(format!(
        "reading the operator Deployment {namespace}/{name}"
    )))?;
    Ok(OwnerReference {
        api_version: "apps/v1".to_owned(),
        kind: "Deployment".to_owned(),
        name: name.to_owned(),
        uid: deployment
            .metadata
            .uid
            .ok_or(Error::MissingMetadata("uid"))?,
        // Not the controller: the Deployment controller does not manage these objects.
        controller: None,
        block_owner_deletion: None,
    })
}

/// Whether `pod` is one of the node agents (the DaemonSet's pod labels).
fn is_agent_pod(pod: &Pod) -> bool {
    let labels = pod.labels();
    crate::daemonset::agent_labels()
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// Reads the configuration currently in the ConfigMap, so the first render after a restart is
/// not taken for a change.
pub async fn current_config(client: Client, namespace: &str) -> Result<Option<String>> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let config_map = api
        .get_opt(CONFIG_MAP_NAME)
        .await
        .map_err(Error::kube(format!(
            "reading ConfigMap {namespace}/{CONFIG_MAP_NAME}"
        )))?;
    Ok(config_map
        .and_then(|cm| cm.data)
        .and_then(|mut data| data.remove(CONFIG_KEY)))
}

/// Runs the controller until `shutdown` resolves.
///
/// Fails early, with what to do, when the CRD is not installed.
pub async fn run(
    client: Client,
    settings: AgentSettings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let profiles: Api<TraceProfile> = Api::all(client.clone());
    profiles
        .list(&ListParams::default().limit(1))
        .await
        .map_err(Error::kube(
            "listing TraceProfiles (is the CRD installed? kubectl apply -f crds/traceprofile.yaml)",
        ))?;

    let (all_tx, all_rx) = mpsc::unbounded_channel();
    // Pods of all namespaces, stripped: for matched-pod counts, conflicts and agent readiness.
    // A change of a node agent's pod (it became Ready, or went away) re-reconciles every
    // profile at once, so `nodesReporting` follows the agents instead of the periodic requeue.
    let (pods, pod_writer) = reflector::store();
    let agent_pods_changed = all_tx.clone();
    let pod_stream = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .modify(strip_pod)
        .default_backoff()
        .reflect(pod_writer)
        .for_each(move |event| {
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::Delete(pod))
                    if is_agent_pod(&pod) =>
                {
                    let _ = agent_pods_changed.send(());
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "pod watch failed; retrying"),
            }
            async {}
        });
    let pod_task = tokio::spawn(pod_stream);

    let last_config = current_config(client.clone(), &settings.namespace).await?;
    let controller = Controller::new(profiles, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(1));
    let mut context = Context::new(
        client,
        settings,
        controller.store(),
        pods,
        metrics,
        last_config,
    );
    context.reconcile_all = Some(all_tx);
    let reconcile_all = futures::stream::unfold(all_rx, |mut rx| async move {
        rx.recv().await.map(|()| ((), rx))
    });

    info!("controller started");
    controller
        .reconcile_all_on(reconcile_all)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, Arc::new(context))
        .for_each(|result| async move {
            if let Err(error) = result {
                debug!(%error, "reconcile loop");
            }
        })
        .await;
    pod_task.abort();
    info!("controller stopped");
    Ok(())
}

// Mock tests relying on fixtures.rs: each asserts every request the reconciler makes.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{AGENT_NS, Call, Scenario, agent_pod, running_pod, timeout_after_1s};
    use http::StatusCode;
    use serde_json::{Value, json};

    fn checkout() -> TraceProfile {
        TraceProfile::test(
            "checkout",
            100,
            json!({"podSelector": {"matchLabels": {"app": "checkout"}}}),
        )
    }

    /// The agent-config entry of a default profile selecting `app=<app>`.
    fn entry(name: &str, app: &str, window_seconds: u32) -> Value {
        json!({
            "namespace": "shop", "name": name, "generation": 1,
            "matchLabels": {"app": app}, "matchExpressions": [],
            "containers": [], "ports": [], "protocols": ["http"], "direction": "server",
            "windowSeconds": window_seconds, "percentiles": [0.5, 0.95, 0.99],
            "slowThresholdMs": null, "sampleRate": 0.0, "routeTemplates": [],
            "maxSeriesPerPod": 200, "exportOtlp": true, "exportWebsocket": true,
            "nodeSelector": {}
        })
    }

    fn ready_status(matched_pods: u32, nodes_reporting: u32) -> Value {
        json!({
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Applied",
                 "message": "part of the node-agent configuration", "observedGeneration": 1},
                {"type": "Degraded", "status": "False", "reason": "AsExpected",
                 "message": "", "observedGeneration": 1}
            ],
            "observedGeneration": 1,
            "matchedPods": matched_pods,
            "nodesReporting": nodes_reporting
        })
    }

    #[tokio::test]
    async fn profile_without_finalizer_gets_a_finalizer_first() {
        let profile = checkout();
        let (ctx, server, _) = Context::test(std::slice::from_ref(&profile), &[], None);
        let mock = server.run(Scenario::Calls(vec![Call::add_finalizer(&profile)]));
        let action = reconcile(Arc::new(profile), ctx).await.expect("reconcile");
        timeout_after_1s(mock).await;
        assert_eq!(action, Action::await_change());
    }

    #[tokio::test]
    async fn new_valid_profile_is_rendered_applied_and_ready() {
        let profile = checkout().finalized();
        let pods = [
            running_pod("shop", "checkout-1", "node-a", json!({"app": "checkout"})),
            running_pod("shop", "checkout-2", "node-b", json!({"app": "checkout"})),
            running_pod("shop", "cart-1", "node-a", json!({"app": "cart"})),
            agent_pod("node-a"),
        ];
        let (ctx, server, registry) = Context::test(std::slice::from_ref(&profile), &pods, None);
        let mock = server.run(Scenario::Calls(vec![
            Call::apply_config_map(json!([entry("checkout", "checkout", 10)])),
            Call::apply_daemonset(),
            Call::event("Normal", "ConfigUpdated", &profile),
            Call::event("Normal", "Applied", &profile),
            Call::apply_status(&profile, ready_status(2, 1)),
        ]));
        let action = reconcile(Arc::new(profile), ctx).await.expect("reconcile");
        timeout_after_1s(mock).await;
        assert_eq!(action, Action::requeue(RESYNC));
        let text = Metrics::encode(&registry);
        assert!(
            text.contains("trazor_operator_config_updates_total 1"),
            "{text}"
        );
        assert!(
            text.contains("trazor_operator_profiles{reason=\"Applied\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn unchanged_ready_profile_only_reapplies_without_events() {
        let first = checkout().finalized();
        let (rendered_json, status) = {
            let rendered = render(&[&first], &[], AGENT_NS);
            let verdict = Verdict::Applied;
            let status = TraceProfileStatus {
                conditions: conditions(
                    None,
                    &verdict,
                    Some(1),
                    Time(Timestamp::from_second(1).unwrap()),
                ),
                observed_generation: Some(1),
                matched_pods: 0,
                nodes_reporting: 0,
            };
            (rendered.config_json().unwrap(), status)
        };
        let profile = first.with_status(status);
        let (ctx, server, _) =
            Context::test(std::slice::from_ref(&profile), &[], Some(rendered_json));
        let mut expected = ready_status(0, 0);
        let mock = server.run(Scenario::Calls(vec![
            Call::apply_config_map(json!([entry("checkout", "checkout", 10)])),
            Call::apply_daemonset(),
            Call::apply_status(&profile, expected.take()),
        ]));
        reconcile(Arc::new(profile.clone()), ctx)
            .await
            .expect("reconcile");
        timeout_after_1s(mock).await;
        // The transition time of an unchanged condition is kept.
        let kept = conditions(
            profile.status.as_ref(),
            &Verdict::Applied,
            Some(1),
            Time(Timestamp::from_second(99).unwrap()),
        );
        assert!(
            kept.iter()
                .all(|c| c.last_transition_time.0.as_second() == 1)
        );
    }

    #[tokio::test]
    async fn invalid_profile_is_degraded_and_others_stay_in_the_config() {
        let good = checkout().finalized();
        let bad = TraceProfile::test(
            "broken",
            200,
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "routeTemplates": ["/users/{id"]}),
        )
        .finalized();
        let (ctx, server, registry) = Context::test(&[good.clone(), bad.clone()], &[], None);
        let message = "not applied, fix the spec: spec.routeTemplates[0]: \"/users/{id\": segment \
                       \"{id\" opens '{' but does not end with '}'; a parameter must be a whole \
                       segment such as {id}";
        let mock = server.run(Scenario::Calls(vec![
            Call::apply_config_map(json!([entry("checkout", "checkout", 10)])),
            Call::apply_daemonset(),
            Call::event("Normal", "ConfigUpdated", &bad),
            Call::event("Warning", "InvalidSpec", &bad),
            Call::apply_status(
                &bad,
                json!({
                    "conditions": [
                        {"type": "Ready", "status": "False", "reason": "InvalidSpec",
                         "message": message, "observedGeneration": 1},
                        {"type": "Degraded", "status": "True", "reason": "InvalidSpec",
                         "message": message, "observedGeneration": 1}
                    ],
                    "observedGeneration": 1, "matchedPods": 0, "nodesReporting": 0
                }),
            ),
        ]));
        reconcile(Arc::new(bad), ctx)
            .await
            .expect("an invalid profile is not a reconcile error");
        timeout_after_1s(mock).await;
        let text = Metrics::encode(&registry);
        assert!(
            text.contains("trazor_operator_profiles{reason=\"InvalidSpec\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn conflicting_younger_profile_is_degraded() {
        let older = checkout().finalized();
        let younger = TraceProfile::test(
            "checkout-slow",
            200,
            json!({"podSelector": {"matchLabels": {"app": "checkout"}}, "window": "1m"}),
        )
        .finalized();
        let (ctx, server, _) = Context::test(&[older.clone(), younger.clone()], &[], None);
        let message = "not applied: selects the same pods as TraceProfile shop/checkout (identical \
                       pod selectors), which measures them in 10s windows, but asks for 60s; an \
                       agent measures a pod in one window length, so use window \"10s\" or make \
                       the pod selectors disjoint";
        let mock = server.run(Scenario::Calls(vec![
            Call::apply_config_map(json!([entry("checkout", "checkout", 10)])),
            Call::apply_daemonset(),
            Call::event("Normal", "ConfigUpdated", &younger),
            Call::event("Warning", "ConflictingProfile", &younger),
            Call::apply_status(
                &younger,
                json!({
                    "conditions": [
                        {"type": "Ready", "status": "False", "reason": "ConflictingProfile",
                         "message": message, "observedGeneration": 1},
                        {"type": "Degraded", "status": "True", "reason": "ConflictingProfile",
                         "message": message, "observedGeneration": 1}
                    ],
                    "observedGeneration": 1, "matchedPods": 0, "nodesReporting": 0
                }),
            ),
        ]));
        reconcile(Arc::new(younger), ctx).await.expect("reconcile");
        timeout_after_1s(mock).await;
    }

    #[tokio::test]
    async fn deleted_profile_is_removed_from_the_config_then_released() {
        let stays = checkout().finalized();
        let leaving = TraceProfile::test(
            "cart",
            200,
            json!({"podSelector": {"matchLabels": {"app": "cart"}}}),
        )
        .finalized()
        .deleting();
        let before = render(&[&stays, &checkout_named_cart()], &[], AGENT_NS)
            .config_json()
            .unwrap();
        let (ctx, server, _) = Context::test(&[stays, leaving.clone()], &[], Some(before));
        let mock = server.run(Scenario::Calls(vec![
            Call::apply_config_map(json!([entry("checkout", "checkout", 10)])),
            Call::event("Normal", "ConfigUpdated", &leaving),
            Call::event("Normal", "Removed", &leaving),
            Call::remove_finalizer(&leaving),
        ]));
        let action = reconcile(Arc::new(leaving), ctx).await.expect("reconcile");
        timeout_after_1s(mock).await;
        assert_eq!(action, Action::await_change());
    }

    fn checkout_named_cart() -> TraceProfile {
        TraceProfile::test(
            "cart",
            200,
            json!({"podSelector": {"matchLabels": {"app": "cart"}}}),
        )
    }

    #[tokio::test]
    async fn api_failure_fails_the_reconcile_and_is_counted() {
        let profile = checkout().finalized();
        let (ctx, server, registry) = Context::test(std::slice::from_ref(&profile), &[], None);
        let mock = server.run(Scenario::Calls(vec![
            Call::apply_config_map(json!(null)).failing(StatusCode::INTERNAL_SERVER_ERROR),
        ]));
        let profile = Arc::new(profile);
        let error = reconcile(profile.clone(), ctx.clone())
            .await
            .expect_err("must fail");
        timeout_after_1s(mock).await;
        assert!(error.to_string().contains("applying ConfigMap"), "{error}");
        let action = error_policy(profile, &error, ctx);
        assert_eq!(action, Action::requeue(Duration::from_secs(15)));
        let text = Metrics::encode(&registry);
        assert!(
            text.contains("trazor_operator_reconcile_failures_total{error=\"kube_api\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn profile_without_namespace_is_rejected_without_calls() {
        let mut profile = checkout().finalized();
        profile.metadata.namespace = None;
        let (ctx, server, _) = Context::test(&[], &[], None);
        let mock = server.run(Scenario::RadioSilence);
        let error = reconcile(Arc::new(profile), ctx)
            .await
            .expect_err("must fail");
        timeout_after_1s(mock).await;
        assert_eq!(error.metric_label(), "missing_metadata");
    }

    #[test]
    fn long_notes_are_truncated_on_a_char_boundary() {
        let text = "é".repeat(600);
        let out = truncate(text, 1024);
        assert!(out.len() <= 1024 && out.ends_with("..."));
    }
}
