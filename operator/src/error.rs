//! The operator's one error type.

/// Everything that can make a reconcile (or the operator's start-up) fail.
///
/// A profile that is *invalid* is not an error here: it is a verdict, reported on the
/// profile's status as a `Degraded` condition, while the other profiles keep working.
/// These errors are about the operator failing to do its job (API calls, stores), and
/// [`crate::controller::error_policy`] retries them with a back-off and counts them in the
/// metrics under [`Error::metric_label`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed while {action}: {source}")]
    Kube {
        /// What the operator was doing, e.g. "applying ConfigMap trazor-system/trazor-node-agent-config".
        action: String,
        #[source]
        source: kube::Error,
    },

    /// The finalizer helper failed: either adding/removing the finalizer or the wrapped work.
    #[error("finalizer step failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// A `TraceProfile` came without namespace or name; the API server always sets both.
    #[error("TraceProfile is missing metadata.{0}; this object did not come from the API server")]
    MissingMetadata(&'static str),

    /// The informer cache of profiles or pods has not finished its first list yet.
    #[error("the {0} cache is not synced yet; the reconcile will be retried")]
    CacheNotReady(&'static str),

    /// Serialising the node-agent configuration failed (a non-finite number slipped through).
    #[error("could not serialise the node-agent configuration: {0}")]
    Serialize(#[source] serde_json::Error),

    /// The leader-election task ended without an error (it should run until released).
    #[error("leader election stopped unexpectedly: {0}")]
    LeaderElectionStopped(String),

    /// Leader election failed (the Lease could not be read or written).
    #[error(
        "leader election failed: {0}; check the operator's RBAC for coordination.k8s.io leases"
    )]
    Leader(#[source] kube_lease_manager::LeaseManagerError),
}

impl Error {
    /// Wraps a `kube::Error` with what the operator was doing when it happened.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }

    /// A short, bounded label for the failures metric (never contains object names).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_api",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                kube::runtime::finalizer::Error::AddFinalizer(_)
                | kube::runtime::finalizer::Error::RemoveFinalizer(_) => "finalizer_patch",
                _ => "finalizer",
            },
            Error::MissingMetadata(_) => "missing_metadata",
            Error::CacheNotReady(_) => "cache_not_ready",
            Error::Serialize(_) => "serialize",
            Error::Leader(_) | Error::LeaderElectionStopped(_) => "leader_election",
        }
    }
}

/// Result alias for the operator.
pub type Result<T, E = Error> = std::result::Result<T, E>;
