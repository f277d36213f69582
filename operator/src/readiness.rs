//! The operator's readiness: `/readyz` answers 200 only while the operator can do its job,
//! that is while the Kubernetes API answers it. A replica that cannot reach the API server
//! (network, credentials, RBAC on its own Lease) is not ready, whether it leads or stands by;
//! `/healthz` stays a pure liveness check so such a replica is not restarted in a loop.
//!
//! The probe reads the leader Lease by name every [`PROBE_INTERVAL`]: a request every
//! replica is allowed to make (its RBAC), cheap, and answered by the same API server the
//! controller needs. A missing Lease (leader election off, or not created yet) still proves
//! the API answers.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use crate::leader::LEASE_NAME;

/// How often the API is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// A success older than this no longer counts (the probe itself hangs or stopped).
const STALE_AFTER: Duration = Duration::from_secs(20);

/// When a probe ended, and why it failed if it did.
type ProbeOutcome = (Instant, std::result::Result<(), String>);

/// The last probe's outcome, shared with the HTTP server.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    last: Arc<Mutex<Option<ProbeOutcome>>>,
}

impl Readiness {
    /// Why the operator is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        let last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match last {
            None => Some("the Kubernetes API has not been probed yet".to_owned()),
            Some((_, Err(reason))) => {
                Some(format!("the Kubernetes API is not answering: {reason}"))
            }
            Some((at, Ok(()))) if at.elapsed() > STALE_AFTER => Some(format!(
                "no successful Kubernetes API probe for {} s",
                at.elapsed().as_secs()
            )),
            Some((_, Ok(()))) => None,
        }
    }

    fn record(&self, outcome: std::result::Result<(), String>) {
        *self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((Instant::now(), outcome));
    }

    /// Probes the API once (a `get` of the leader Lease in `namespace`) and records it.
    pub async fn probe(&self, client: Client, namespace: &str) {
        let leases: Api<Lease> = Api::namespaced(client, namespace);
        let outcome = match tokio::time::timeout(PROBE_INTERVAL, leases.get_opt(LEASE_NAME)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!(
                "reading Lease {namespace}/{LEASE_NAME} took over {} s",
                PROBE_INTERVAL.as_secs()
            )),
        };
        if let Err(reason) = &outcome {
            tracing::warn!(%reason, "Kubernetes API probe failed; not ready");
        }
        self.record(outcome);
    }

    /// Probes forever, every [`PROBE_INTERVAL`].
    pub async fn probe_forever(self, client: Client, namespace: String) {
        loop {
            self.probe(client.clone(), &namespace).await;
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;

    use super::*;

    /// A client whose API server answers every request with `status` and `body`.
    fn api_answering(status: StatusCode, body: &'static str) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                assert_eq!(
                    request.uri().path(),
                    "/apis/coordination.k8s.io/v1/namespaces/trazor-system/leases/trazor-operator-leader"
                );
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(body.as_bytes().to_vec()))
                        .unwrap(),
                );
            }
        });
        Client::new(service, "default")
    }

    #[tokio::test]
    async fn ready_only_after_the_api_answered() {
        let readiness = Readiness::default();
        assert!(readiness.not_ready().is_some(), "not probed yet");
        let not_found = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"not found"}"#;
        readiness
            .probe(
                api_answering(StatusCode::NOT_FOUND, not_found),
                "trazor-system",
            )
            .await;
        assert_eq!(
            readiness.not_ready(),
            None,
            "a missing Lease still proves the API answers"
        );
    }

    #[tokio::test]
    async fn not_ready_while_the_api_fails() {
        let readiness = Readiness::default();
        let forbidden = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403,"message":"leases is forbidden"}"#;
        readiness
            .probe(
                api_answering(StatusCode::FORBIDDEN, forbidden),
                "trazor-system",
            )
            .await;
        let reason = readiness.not_ready().expect("not ready");
        assert!(reason.contains("leases is forbidden"), "{reason}");
    }
}
