//! Trazor's wire contracts.
//!
//! [`v1`] is the agent → collector gRPC protocol (package `trazor.v1`, source in
//! `proto/trazor/v1/`); its evolution rules are written at the top of the .proto file.
//! [`histogram`] merges and reads the latency histograms both sides exchange, and [`status`]
//! reads a window's requests by status code.
//! [`agent_config`] is the configuration document the operator writes for the node agents.
//! [`record`] frames the records the agent's spool and the collector's journal keep on disk.
//! [`api_access`] describes the Kubernetes API calls a component makes, which its RBAC grants.

pub mod agent_config;
pub mod api_access;
pub mod auth;
pub mod histogram;
pub mod record;
pub mod status;

/// Generated from `proto/trazor/v1/ingest.proto` and `feed.proto` (the live feed's binary frames).
#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("trazor.v1");
}
