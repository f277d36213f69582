//! Leader election on a `coordination.k8s.io/v1` Lease, so that two or more operator replicas
//! are safe: only the holder of the Lease reconciles, the others wait to take over.
//!
//! Built on `kube-lease-manager`, which renews by server-side apply and treats a conflicting
//! write as a lost race. A replica that loses the Lease stops reconciling and exits, so that
//! Kubernetes restarts it as a clean follower rather than leaving half-run reconciles behind.
//!
//! The Lease is created by the operator, not by Helm, so [`own_lease`] makes the operator's
//! Deployment its owner: uninstalling the chart then garbage-collects it with the DaemonSet
//! and ConfigMap instead of leaving it behind.

use k8s_openapi::{
    api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::{sync::watch, task::JoinHandle};
use tracing::info;

use crate::{Error, Result};

/// Name of the Lease, in the operator's namespace.
pub const LEASE_NAME: &str = "trazor-operator-leader";

/// Seconds a Lease is valid without renewal: how long a crashed leader blocks a successor.
const LEASE_SECONDS: u64 = 15;
/// Seconds before expiry that the holder renews.
const RENEW_GRACE_SECONDS: u64 = 5;

/// Field manager of the Lease's owner reference, apart from the lease manager's fields.
const OWNER_FIELD_MANAGER: &str = "trazor-operator-lease-owner";

/// Makes `owner` (the operator's Deployment) an owner of the Lease, creating the Lease if it
/// does not exist yet. Server-side apply of `metadata.ownerReferences` alone, under its own
/// field manager, so it neither touches nor conflicts with the holder fields the lease
/// manager applies.
pub async fn own_lease(client: Client, namespace: &str, owner: &OwnerReference) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let owned = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE_NAME, "ownerReferences": [owner]},
    });
    leases
        .patch(
            LEASE_NAME,
            &PatchParams::apply(OWNER_FIELD_MANAGER),
            &Patch::Apply(owned),
        )
        .await
        .map_err(Error::kube(format!(
            "making Deployment {} the owner of Lease {namespace}/{LEASE_NAME}",
            owner.name
        )))?;
    Ok(())
}

/// Held leadership; dropping it (or calling [`Leadership::release`]) lets the Lease go.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<LeaseManager>>,
}

/// Waits until this replica (`identity`, e.g. its pod name) holds the Lease.
pub async fn acquire(client: Client, namespace: &str, identity: &str) -> Result<Leadership> {
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(RENEW_GRACE_SECONDS)
        .build()
        .await
        .map_err(Error::Leader)?;
    let (mut state, task) = manager.watch().await;
    info!(lease = LEASE_NAME, %namespace, %identity, "waiting for leadership");
    while !*state.borrow_and_update() {
        if state.changed().await.is_err() {
            // The manager task ended: it failed for good; its error says why.
            return Err(match task.await {
                Ok(Err(error)) => Error::Leader(error),
                Ok(Ok(_)) => Error::LeaderElectionStopped("the lease manager ended".to_owned()),
                Err(join) => Error::LeaderElectionStopped(join.to_string()),
            });
        }
    }
    info!(lease = LEASE_NAME, %identity, "acquired leadership");
    Ok(Leadership { state, task })
}

impl Leadership {
    /// Resolves when leadership is lost (the Lease was taken over or could not be renewed).
    pub async fn lost(&mut self) {
        loop {
            if self.state.changed().await.is_err() || !*self.state.borrow_and_update() {
                return;
            }
        }
    }

    /// Gives the Lease up at once so a standby replica takes over without waiting for expiry.
    pub async fn release(self) {
        // Closing the channel makes the manager release the Lease and end.
        drop(self.state);
        match self.task.await {
            Ok(Ok(_)) => info!(lease = LEASE_NAME, "released leadership"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not release the lease; it expires on its own")
            }
            Err(error) => tracing::warn!(%error, "lease task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    /// A fake API server that keeps one Lease and answers get, create and patches the way the
    /// real one does for what the lease manager sends (including the apply conflict on
    /// `holderIdentity`, which is what keeps two replicas from both leading).
    fn fake_lease_server(initial: Option<Value>) -> (Client, Arc<Mutex<Option<Value>>>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let lease = Arc::new(Mutex::new(initial));
        let state = lease.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let apply = request
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes() == b"application/apply-patch+yaml");
                let body = request.into_body().collect_bytes().await.unwrap();
                let body: Value = if body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&body).unwrap()
                };
                let mut stored = state.lock().unwrap();
                let (status, reply) = match (method, stored.as_mut()) {
                    (Method::GET, Some(lease)) => (StatusCode::OK, lease.clone()),
                    (Method::GET, None) | (Method::PATCH, None) => {
                        (StatusCode::NOT_FOUND, status_body(404, "NotFound"))
                    }
                    (Method::POST, _) => {
                        let mut lease = body.clone();
                        lease["metadata"]["resourceVersion"] = json!("1");
                        *stored = Some(lease.clone());
                        (StatusCode::CREATED, lease)
                    }
                    (Method::PATCH, Some(lease)) => {
                        let holder = lease["spec"]["holderIdentity"].clone();
                        let wanted = &body["spec"]["holderIdentity"];
                        if apply && !holder.is_null() && wanted != &holder {
                            (StatusCode::CONFLICT, status_body(409, "Conflict"))
                        } else {
                            if !lease["spec"].is_object() {
                                lease["spec"] = json!({});
                            }
                            for (key, value) in
                                body["spec"].as_object().cloned().unwrap_or_default()
                            {
                                let spec = lease["spec"].as_object_mut().unwrap();
                                if value.is_null() {
                                    spec.remove(&key);
                                } else {
                                    spec.insert(key, value);
                                }
                            }
                            (StatusCode::OK, lease.clone())
                        }
                    }
                    (method, _) => panic!("unexpected {method} on the lease"),
                };
                drop(stored);
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
        });
        (Client::new(service, "default"), lease)
    }

    fn status_body(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason,
               "reason": reason, "code": code})
    }

    fn held_by(holder: &str, renewed: k8s_openapi::jiff::Timestamp) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": LEASE_NAME, "namespace": "trazor-system", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "acquireTime": renewed.to_string(), "renewTime": renewed.to_string()}
        })
    }

    fn holder(lease: &Mutex<Option<Value>>) -> Value {
        lease.lock().unwrap().as_ref().unwrap()["spec"]["holderIdentity"].clone()
    }

    #[tokio::test]
    async fn the_lease_is_owned_by_the_operator_deployment() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("one request");
            assert_eq!(request.method(), Method::PATCH);
            assert_eq!(
                request.uri().to_string(),
                "/apis/coordination.k8s.io/v1/namespaces/trazor-system/leases/trazor-operator-leader?&fieldManager=trazor-operator-lease-owner"
            );
            assert_eq!(
                request.headers()["content-type"],
                "application/apply-patch+yaml"
            );
            let body: Value =
                serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap())
                    .unwrap();
            assert_eq!(
                body["metadata"]["ownerReferences"],
                json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "trazor-operator", "uid": "d-uid"}])
            );
            assert!(
                body.get("spec").is_none(),
                "the holder fields are the lease manager's: {body}"
            );
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        });
        let owner = OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "trazor-operator".into(),
            uid: "d-uid".into(),
            ..Default::default()
        };
        own_lease(Client::new(service, "default"), "trazor-system", &owner)
            .await
            .unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn first_replica_creates_the_lease_and_leads_then_releases_it() {
        let (client, lease) = fake_lease_server(None);
        let leadership = tokio::time::timeout(
            Duration::from_secs(5),
            acquire(client, "trazor-system", "operator-a"),
        )
        .await
        .expect("acquired in time")
        .unwrap();
        assert_eq!(holder(&lease), json!("operator-a"));
        leadership.release().await;
        assert_eq!(holder(&lease), Value::Null);
    }

    #[tokio::test]
    async fn second_replica_waits_while_the_leader_renews() {
        let now = k8s_openapi::jiff::Timestamp::now();
        let (client, lease) = fake_lease_server(Some(held_by("operator-a", now)));
        let waiting = tokio::time::timeout(
            Duration::from_millis(1500),
            acquire(client, "trazor-system", "operator-b"),
        )
        .await;
        assert!(
            waiting.is_err(),
            "operator-b must not lead while operator-a holds the lease"
        );
        assert_eq!(holder(&lease), json!("operator-a"));
    }

    #[tokio::test]
    async fn expired_lease_is_taken_over() {
        let long_ago = k8s_openapi::jiff::Timestamp::from_second(1_000_000_000).unwrap();
        let (client, lease) = fake_lease_server(Some(held_by("crashed", long_ago)));
        let leadership = tokio::time::timeout(
            Duration::from_secs(10),
            acquire(client, "trazor-system", "operator-b"),
        )
        .await
        .expect("took over in time")
        .unwrap();
        assert_eq!(holder(&lease), json!("operator-b"));
        drop(leadership);
    }
}
