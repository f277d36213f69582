//! Auth: agents present `authorization: Bearer <token>` on their stream; the collector
//! compares it, in constant time, with the token it was given.
//!
//! In a cluster the token comes from a Kubernetes Secret mounted as a file
//! (`--token-file`); locally it can come from the `TRAZOR_TOKEN` environment variable.
//! Without a token the collector accepts every stream (and says so at start).
//!
//! [`ServerTls`] adds TLS to the gRPC port, and mutual TLS when given a client CA.

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use tonic::{Request, Status, service::Interceptor};

use crate::{Error, Result, stats::CollectorStats};

/// TLS for the gRPC port: the collector's certificate and key (PEM), and with
/// `client_ca_pem` mutual TLS: only agents with a certificate signed by that CA connect.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        formatter
            .debug_struct("ServerTls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the PEM files named by the flags.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| Error::TokenFile {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Self {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: client_ca.map(read).transpose()?,
        })
    }

    pub(crate) fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// Token reading is shared with the other side of the stream.
pub use trazor_proto::auth::{TOKEN_ENV, load_token};

/// Equal-length comparison that takes the same time wherever the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The gRPC interceptor: refuses streams whose bearer token does not match.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Arc<[u8]>>,
    stats: Arc<CollectorStats>,
}

impl BearerAuth {
    pub fn new(token: Option<&str>, stats: Arc<CollectorStats>) -> Self {
        Self {
            expected: token.map(|token| Arc::from(token.as_bytes())),
            stats,
        }
    }

    fn refuse(&self, request: &Request<()>, reason: &str) -> Status {
        self.stats
            .streams_unauthenticated
            .fetch_add(1, Ordering::Relaxed);
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |address| address.to_string());
        tracing::warn!(%peer, "refused an agent stream: {reason}");
        Status::unauthenticated(reason)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let Some(header) = request.metadata().get("authorization") else {
            return Err(self.refuse(
                &request,
                "missing `authorization: Bearer <token>` metadata; give the agent the \
                 collector's token (--token-file or TRAZOR_TOKEN)",
            ));
        };
        let presented = header
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .unwrap_or_default();
        if constant_time_eq(presented, expected) {
            Ok(request)
        } else {
            Err(self.refuse(
                &request,
                "the bearer token does not match the collector's; check that agent and \
                 collector read the same Secret",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authorization: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let stats = Arc::new(CollectorStats::default());
        let mut auth = BearerAuth::new(Some("s3cret"), stats.clone());
        assert!(auth.call(request(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("s3cret"),
            Some("Bearer s3cret2"),
        ] {
            let status = auth.call(request(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert_eq!(stats.streams_unauthenticated.load(Ordering::Relaxed), 4);
        let mut open = BearerAuth::new(None, stats);
        assert!(open.call(request(None)).is_ok());
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
