//! Trazor's node agent.
//!
//! The data path, in module order: [`capture`] loads the eBPF programs and reads what they
//! send up; [`count`] counts the kernel's finished requests into series; [`attribute`]
//! names the cgroup and process behind each series and [`route`] its route; [`window`]
//! merges them into [`LatencyWindow`](trazor_proto::v1::LatencyWindow)s
//! with quantiles; [`ship`] streams them to the collector and keeps them until acknowledged.
//! [`agent`] runs the loop. [`rbac`] lists the Kubernetes API calls it makes (in [`pods`]).

pub mod agent;
pub mod attribute;
pub mod capture;
pub mod count;
mod error;
pub mod pods;
pub mod rbac;
pub mod route;
pub mod select;
pub mod ship;
pub mod spool;
pub mod telemetry;
pub mod window;

pub use agent::{AgentConfig, RunningAgent, start};
pub use error::{Error, Result};
