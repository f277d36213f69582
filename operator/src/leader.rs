//! Leader election on a `coordination.k8s.io/v1` Lease, so that two or more operator replicas
//! are safe: only the holder of the Lease reconciles, the others wait to take over.
//!
//! Built on `kube-lease-manager`, which renews by server-side apply and treats a conflicting
//! write as a lost race. A replica that loses the Lease stops reconciling and exits, so that
//! Kubernetes restarts it as a clean follower rather than leaving half-run reconciles behind.

use kube::Client;
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
                _ => Error::CacheNotReady("leader lease"),
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
            Ok(Err(error)) => tracing::warn!(%error, "could not release the lease; it expires on its own"),
            Err(error) => tracing::warn!(%error, "lease task failed"),
        }
    }
}
