//! Every Kubernetes API call the operator makes, as data: what its RBAC must grant.
//!
//! The mocked API servers of the tests fail on any request no entry of [`API_CALLS`] allows
//! (`fixtures.rs`), and the chart test (`tests/chart.rs`) checks that the chart's RBAC grants
//! the operator's ServiceAccount exactly these calls, with the same scope and names. A new
//! call in the code therefore fails a test until it is written down here and granted in
//! `charts/trazor/templates/rbac.yaml`.

use trazor_proto::api_access::{
    ApiCall, ApiRequest,
    ObjectName::{Any, Exactly, FromFlag},
    Scope::{Cluster, OwnNamespace},
    Verb::{Create, Get, List, Patch, Watch},
};

use crate::{
    daemonset::{CONFIG_MAP_NAME, DAEMONSET_NAME},
    leader::LEASE_NAME,
};

/// The flag that names the operator's own Deployment (see [`crate::controller::deployment_owner`]).
pub const OWNER_DEPLOYMENT_FLAG: &str = "--owner-deployment";

/// The operator's API calls. Scope `OwnNamespace` is the operator's `--namespace` (the chart's
/// release namespace), where the agents' objects and the Lease live.
pub const API_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "trazor.dev",
        resource: "traceprofiles",
        verb: List,
        scope: Cluster,
        name: Any,
        why: "the controller's watch lists profiles of every namespace; start-up lists one to tell a missing CRD",
    },
    ApiCall {
        group: "trazor.dev",
        resource: "traceprofiles",
        verb: Watch,
        scope: Cluster,
        name: Any,
        why: "the controller's watch of profiles",
    },
    ApiCall {
        group: "trazor.dev",
        resource: "traceprofiles",
        verb: Patch,
        scope: Cluster,
        name: Any,
        why: "the finalizer is added and removed by JSON patch",
    },
    ApiCall {
        group: "trazor.dev",
        resource: "traceprofiles/status",
        verb: Patch,
        scope: Cluster,
        name: Any,
        why: "each profile's verdict, by server-side apply of its status",
    },
    ApiCall {
        group: "",
        resource: "pods",
        verb: List,
        scope: Cluster,
        name: Any,
        why: "a read-only cache of pods: matched-pod counts, conflicts, agents reporting",
    },
    ApiCall {
        group: "",
        resource: "pods",
        verb: Watch,
        scope: Cluster,
        name: Any,
        why: "keeps that pod cache current",
    },
    ApiCall {
        group: "events.k8s.io",
        resource: "events",
        verb: Create,
        scope: Cluster,
        name: Any,
        why: "Events on profiles (ConfigUpdated, Applied, InvalidSpec, ...) in their namespaces",
    },
    ApiCall {
        group: "events.k8s.io",
        resource: "events",
        verb: Patch,
        scope: Cluster,
        name: Any,
        why: "the event recorder patches a repeated event into a series",
    },
    ApiCall {
        group: "",
        resource: "configmaps",
        verb: Create,
        scope: OwnNamespace,
        name: Any,
        why: "the first server-side apply of the agents' ConfigMap creates it (RBAC cannot limit create by name)",
    },
    ApiCall {
        group: "",
        resource: "configmaps",
        verb: Get,
        scope: OwnNamespace,
        name: Exactly(CONFIG_MAP_NAME),
        why: "start-up reads the configuration last applied, so it is not taken for a change",
    },
    ApiCall {
        group: "",
        resource: "configmaps",
        verb: Patch,
        scope: OwnNamespace,
        name: Exactly(CONFIG_MAP_NAME),
        why: "server-side apply of the agents' configuration",
    },
    ApiCall {
        group: "apps",
        resource: "daemonsets",
        verb: Create,
        scope: OwnNamespace,
        name: Any,
        why: "the first server-side apply of the agents' DaemonSet creates it",
    },
    ApiCall {
        group: "apps",
        resource: "daemonsets",
        verb: Patch,
        scope: OwnNamespace,
        name: Exactly(DAEMONSET_NAME),
        why: "server-side apply of the agents' DaemonSet",
    },
    ApiCall {
        group: "apps",
        resource: "deployments",
        verb: Get,
        scope: OwnNamespace,
        name: FromFlag(OWNER_DEPLOYMENT_FLAG),
        why: "the uid of the operator's own Deployment, owner of the ConfigMap and DaemonSet",
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: Create,
        scope: OwnNamespace,
        name: Any,
        why: "leader election, or the apply of the Lease's owner reference, creates the Lease the first time",
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: Get,
        scope: OwnNamespace,
        name: Exactly(LEASE_NAME),
        why: "leader election reads the Lease; so does the readiness probe, every 5 s",
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: Patch,
        scope: OwnNamespace,
        name: Exactly(LEASE_NAME),
        why: "leader election takes, renews and releases the Lease; start-up applies its owner reference",
    },
];

/// The entry of [`API_CALLS`] that allows `method` on `uri`, for an operator running in
/// `namespace` whose own Deployment is `owner_deployment`; the error says what to add.
pub fn entry_for(
    method: &str,
    uri: &str,
    namespace: &str,
    owner_deployment: &str,
) -> Result<&'static ApiCall, String> {
    let request = ApiRequest::parse(method, uri)?;
    let flag = |flag: &str| (flag == OWNER_DEPLOYMENT_FLAG).then(|| owner_deployment.to_owned());
    API_CALLS
        .iter()
        .find(|call| call.allows(&request, namespace, &flag))
        .ok_or_else(|| {
            format!(
                "the operator made an API call that operator::rbac::API_CALLS does not list: \
                 {method} {uri} ({request}); add it there and grant it in \
                 charts/trazor/templates/rbac.yaml"
            )
        })
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, sync::Arc, time::Duration};

    use prometheus_client::registry::Registry;
    use serde_json::json;
    use tokio::{sync::oneshot, time::timeout};

    use super::*;
    use crate::{
        Metrics, controller,
        fixtures::{
            AGENT_NS, OPERATOR_DEPLOYMENT, RecordingApiServer, assert_listed_in_rbac, test_settings,
        },
        leader,
        readiness::Readiness,
    };

    /// What the reconcile tests (`controller.rs`) cannot see: start-up (the owner reference,
    /// the Lease's owner, the readiness probe), leader election and the controller's own lists
    /// and watches, run against an API server that answers all.
    #[tokio::test]
    async fn start_up_leadership_and_watches_make_only_listed_calls() {
        let own_deployment =
            format!("/apis/apps/v1/namespaces/{AGENT_NS}/deployments/{OPERATOR_DEPLOYMENT}");
        let (client, server) = RecordingApiServer::start(vec![(
            own_deployment,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": OPERATOR_DEPLOYMENT, "namespace": AGENT_NS, "uid": "uid-op"}}),
        )]);

        let owner = controller::deployment_owner(client.clone(), AGENT_NS, OPERATOR_DEPLOYMENT)
            .await
            .expect("owner reference to the operator's Deployment");
        leader::own_lease(client.clone(), AGENT_NS, &owner)
            .await
            .expect("the Lease owned by the operator's Deployment");
        let readiness = Readiness::default();
        readiness.probe(client.clone(), AGENT_NS).await;
        assert_eq!(readiness.not_ready(), None, "the probe's read of the Lease");
        let leadership = timeout(
            Duration::from_secs(5),
            leader::acquire(client.clone(), AGENT_NS, "operator-a"),
        )
        .await
        .expect("leadership within 5 s")
        .expect("leadership");
        leadership.release().await;

        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::default().register(&mut registry));
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(controller::run(
            client,
            test_settings(),
            metrics,
            async move {
                let _ = stopped.await;
            },
        ));
        let watching = |resource: &str| {
            server
                .requests()
                .iter()
                .any(|(_, uri)| uri.contains(resource) && uri.contains("watch=true"))
        };
        timeout(Duration::from_secs(5), async {
            while !(watching("/traceprofiles?") && watching("/pods?")) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the controller watches profiles and pods within 5 s");
        let _ = stop.send(());
        timeout(Duration::from_secs(5), run)
            .await
            .expect("the controller stops within 5 s")
            .expect("controller task")
            .expect("controller run");

        let requests = server.requests();
        for (method, uri) in &requests {
            assert_listed_in_rbac(method, uri);
        }
        // The run did reach what it is meant to prove listed.
        let used: BTreeSet<String> = requests
            .iter()
            .filter_map(|(method, uri)| {
                entry_for(method.as_str(), uri, AGENT_NS, OPERATOR_DEPLOYMENT).ok()
            })
            .map(ToString::to_string)
            .collect();
        for expected in [
            "get deployments.apps named by --owner-deployment (own namespace)",
            "get leases.coordination.k8s.io named trazor-operator-leader (own namespace)",
            "create leases.coordination.k8s.io (own namespace)",
            "patch leases.coordination.k8s.io named trazor-operator-leader (own namespace)",
            "list traceprofiles.trazor.dev (cluster-wide)",
            "watch traceprofiles.trazor.dev (cluster-wide)",
            "list pods.core (cluster-wide)",
            "watch pods.core (cluster-wide)",
            "get configmaps.core named trazor-node-agent-config (own namespace)",
        ] {
            assert!(used.contains(expected), "{expected} not seen in {used:#?}");
        }
    }

    #[test]
    fn an_unlisted_call_is_refused_saying_where_to_add_it() {
        let delete_lease =
            format!("/apis/coordination.k8s.io/v1/namespaces/{AGENT_NS}/leases/{LEASE_NAME}");
        let error = entry_for("DELETE", &delete_lease, AGENT_NS, OPERATOR_DEPLOYMENT)
            .expect_err("deleting the Lease is not listed");
        assert!(
            error.contains("delete leases.coordination.k8s.io named trazor-operator-leader")
                && error.contains("operator::rbac::API_CALLS")
                && error.contains("charts/trazor/templates/rbac.yaml"),
            "{error}"
        );
        // Listed verbs stay confined to their scope and names.
        let other_namespace = "/api/v1/namespaces/elsewhere/configmaps/trazor-node-agent-config";
        assert!(entry_for("PATCH", other_namespace, AGENT_NS, OPERATOR_DEPLOYMENT).is_err());
        let other_deployment = format!("/apis/apps/v1/namespaces/{AGENT_NS}/deployments/other");
        assert!(entry_for("GET", &other_deployment, AGENT_NS, OPERATOR_DEPLOYMENT).is_err());
    }
}
