//! Every Kubernetes API call the node agent makes (all in [`crate::pods`]), as data: what the
//! agents' ServiceAccount must be granted.
//!
//! `tests/api_calls.rs` runs the agent's watches against a recording API server and checks
//! each request against [`API_CALLS`], and the operator's chart test checks that the chart
//! grants the agents exactly these calls. A new call fails one of them until it is listed
//! here and granted in `charts/trazor/templates/rbac.yaml`.

use trazor_proto::api_access::{
    ApiCall,
    ObjectName::{Any, Exactly},
    Scope::{Cluster, OwnNamespace},
    Verb::{Get, List, Watch},
};

/// The ConfigMap the agents watch (`--config-map`'s default, which the operator's DaemonSet
/// leaves as it is), in their own namespace.
pub const CONFIG_MAP_NAME: &str = "trazor-node-agent-config";

/// The node agent's API calls. Scope `OwnNamespace` is the agent's namespace (`POD_NAMESPACE`,
/// the chart's release namespace).
pub const API_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "",
        resource: "pods",
        verb: List,
        scope: Cluster,
        name: Any,
        why: "this node's pods (field selector spec.nodeName, which RBAC cannot express), to \
              attribute cgroups to pods",
    },
    ApiCall {
        group: "",
        resource: "pods",
        verb: Watch,
        scope: Cluster,
        name: Any,
        why: "keeps this node's pods current",
    },
    ApiCall {
        group: "",
        resource: "nodes",
        verb: Get,
        scope: Cluster,
        name: Any,
        why: "this node's labels, for profiles' nodeSelector; the node's name is only known on \
              the node, so RBAC cannot name it",
    },
    ApiCall {
        group: "",
        resource: "configmaps",
        verb: List,
        scope: OwnNamespace,
        name: Exactly(CONFIG_MAP_NAME),
        why: "the operator's configuration (a watch with field selector metadata.name starts \
              with a list), seen within a second of a change instead of the kubelet's minute",
    },
    ApiCall {
        group: "",
        resource: "configmaps",
        verb: Watch,
        scope: OwnNamespace,
        name: Exactly(CONFIG_MAP_NAME),
        why: "the configuration's changes",
    },
];
