//! The Kubernetes API calls a component makes, written down as data.
//!
//! Each component keeps one table of [`ApiCall`]s beside its code
//! (`trazor_operator::rbac::API_CALLS`, `trazor_node_agent::rbac::API_CALLS`). Tests hold the
//! code to its table: the mocked API servers turn every request they serve into an
//! [`ApiRequest`] and fail on one that no entry [allows](ApiCall::allows). The chart test holds
//! the RBAC to the tables: every entry granted to the right ServiceAccount, nothing granted
//! beyond them. So a new API call fails a test until its entry, and then its RBAC rule, exist.

use std::fmt;

/// An RBAC verb, as the API server derives it from an HTTP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl Verb {
    /// The verb as RBAC rules spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a permission has to hold, which decides the kind of RBAC object that grants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Objects in every namespace, or cluster-scoped objects: a ClusterRole.
    Cluster,
    /// Objects in the namespace the component runs in (the chart's release namespace): a Role.
    OwnNamespace,
}

/// Which objects a call touches, as far as RBAC can tell them apart (`resourceNames`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectName {
    /// Any object: for `create` (RBAC cannot limit it by name), for lists and watches of a
    /// whole collection, and for names only known at run time on each node.
    Any,
    /// Exactly this object.
    Exactly(&'static str),
    /// The object named by this command-line flag of the component (for the operator's own
    /// Deployment: `--owner-deployment`, which the chart sets).
    FromFlag(&'static str),
}

/// One kind of API call a component makes, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCall {
    /// API group; `""` is the core group.
    pub group: &'static str,
    /// Plural resource, with `/subresource` where there is one (`traceprofiles/status`).
    pub resource: &'static str,
    pub verb: Verb,
    pub scope: Scope,
    pub name: ObjectName,
    /// What the component does with it: kept beside the entry so a reviewer of the RBAC
    /// can tell whether it is still needed.
    pub why: &'static str,
}

impl ApiCall {
    /// Whether this entry allows `request` from a component running in `own_namespace`;
    /// `flag` gives the value of a command-line flag, for [`ObjectName::FromFlag`] entries.
    pub fn allows(
        &self,
        request: &ApiRequest,
        own_namespace: &str,
        flag: &dyn Fn(&str) -> Option<String>,
    ) -> bool {
        let scope_matches = match self.scope {
            Scope::Cluster => true,
            Scope::OwnNamespace => request.namespace.as_deref() == Some(own_namespace),
        };
        let name_matches = match self.name {
            ObjectName::Any => true,
            ObjectName::Exactly(name) => request.name.as_deref() == Some(name),
            ObjectName::FromFlag(name_flag) => {
                request.name.is_some() && request.name == flag(name_flag)
            }
        };
        self.group == request.group
            && self.resource == request.resource
            && self.verb == request.verb
            && scope_matches
            && name_matches
    }
}

impl fmt::Display for ApiCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        write!(f, "{} {}.{}", self.verb, self.resource, group)?;
        match self.name {
            ObjectName::Any => {}
            ObjectName::Exactly(name) => write!(f, " named {name}")?,
            ObjectName::FromFlag(flag) => write!(f, " named by {flag}")?,
        }
        match self.scope {
            Scope::Cluster => write!(f, " (cluster-wide)"),
            Scope::OwnNamespace => write!(f, " (own namespace)"),
        }
    }
}

/// An HTTP request to the API server, as the authorizer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    pub group: String,
    /// Plural resource, with `/subresource` where there is one.
    pub resource: String,
    pub verb: Verb,
    pub namespace: Option<String>,
    /// The object's name; for a list or watch, the name its `metadata.name` field selector
    /// names (the API server authorizes such a request against `resourceNames` too).
    pub name: Option<String>,
}

impl ApiRequest {
    /// Reads a request from its method and path with query (`/api/v1/namespaces/ns/pods?watch=true`).
    ///
    /// Fails, saying why, for what is not a resource request (discovery, `/version`) or a
    /// method the API server does not serve.
    pub fn parse(method: &str, path_and_query: &str) -> Result<Self, String> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segments.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return Err(format!("{path} is not a Kubernetes resource path")),
        };
        let (namespace, rest) = match rest {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
                (Some((*namespace).to_owned()), rest)
            }
            rest => (None, rest),
        };
        let (resource, name) = match rest {
            [resource] => ((*resource).to_owned(), None),
            [resource, name] => ((*resource).to_owned(), Some((*name).to_owned())),
            [resource, name, subresource] => (
                format!("{resource}/{subresource}"),
                Some((*name).to_owned()),
            ),
            _ => return Err(format!("{path} names no resource")),
        };
        let parameters: Vec<(String, String)> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key), percent_decode(value))
            })
            .collect();
        let parameter = |wanted: &str| {
            parameters
                .iter()
                .find(|(key, _)| key == wanted)
                .map(|(_, value)| value.as_str())
        };
        let verb = match (method, &name) {
            ("GET", Some(_)) => Verb::Get,
            ("GET", None) if matches!(parameter("watch"), Some("true" | "1")) => Verb::Watch,
            ("GET", None) => Verb::List,
            ("POST", _) => Verb::Create,
            ("PUT", _) => Verb::Update,
            ("PATCH", _) => Verb::Patch,
            ("DELETE", Some(_)) => Verb::Delete,
            ("DELETE", None) => Verb::DeleteCollection,
            (method, _) => return Err(format!("{method} is not a Kubernetes API method")),
        };
        let name = match verb {
            Verb::List | Verb::Watch => parameter("fieldSelector").and_then(selected_name),
            _ => name,
        };
        Ok(Self {
            group: group.to_owned(),
            resource,
            verb,
            namespace,
            name,
        })
    }
}

impl fmt::Display for ApiRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {}.{}", self.verb, self.resource, group)?;
        if let Some(name) = &self.name {
            write!(f, " named {name}")?;
        }
        match &self.namespace {
            Some(namespace) => write!(f, " in namespace {namespace}"),
            None => write!(f, " (cluster-wide)"),
        }
    }
}

/// The name a field selector pins (`metadata.name=x`, alone), as the API server reads it.
fn selected_name(selector: &str) -> Option<String> {
    let (field, value) = selector
        .split_once("==")
        .or_else(|| selector.split_once('='))?;
    (field == "metadata.name" && !selector.contains(',')).then(|| value.to_owned())
}

/// Decodes `application/x-www-form-urlencoded` text (`%3D` and `+`), as query strings are sent.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |at: usize| {
            bytes
                .get(at)
                .and_then(|digit| (*digit as char).to_digit(16))
        };
        match bytes[index] {
            b'%' => match (hex(index + 1), hex(index + 2)) {
                (Some(high), Some(low)) => {
                    decoded.push((high * 16 + low) as u8);
                    index += 3;
                    continue;
                }
                _ => decoded.push(b'%'),
            },
            b'+' => decoded.push(b' '),
            byte => decoded.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str) -> ApiRequest {
        ApiRequest::parse(method, uri).expect("a resource request")
    }

    #[test]
    fn reads_verbs_resources_namespaces_and_names_as_the_authorizer_does() {
        let apply = request(
            "PATCH",
            "/api/v1/namespaces/obs/configmaps/agent?&force=true&fieldManager=op",
        );
        assert_eq!(
            apply,
            ApiRequest {
                group: String::new(),
                resource: "configmaps".into(),
                verb: Verb::Patch,
                namespace: Some("obs".into()),
                name: Some("agent".into()),
            }
        );
        let status = request(
            "PATCH",
            "/apis/trazor.dev/v1alpha1/namespaces/shop/traceprofiles/web/status?",
        );
        assert_eq!(
            (status.group.as_str(), status.resource.as_str()),
            ("trazor.dev", "traceprofiles/status")
        );
        assert_eq!(
            request("GET", "/api/v1/pods?&limit=500").verb,
            Verb::List,
            "a GET without a name lists"
        );
        let watch = request(
            "GET",
            "/api/v1/namespaces/obs/configmaps?&fieldSelector=metadata.name%3Dagent&watch=true&timeoutSeconds=290",
        );
        assert_eq!(
            (watch.verb, watch.name.as_deref()),
            (Verb::Watch, Some("agent"))
        );
        let node = request("GET", "/api/v1/nodes/node-a");
        assert_eq!((node.verb, node.namespace), (Verb::Get, None));
        assert_eq!(
            request("POST", "/apis/events.k8s.io/v1/namespaces/shop/events?").verb,
            Verb::Create
        );
        assert_eq!(
            request(
                "DELETE",
                "/apis/coordination.k8s.io/v1/namespaces/obs/leases/l"
            )
            .verb,
            Verb::Delete
        );
        // A field selector on another field names no object.
        let pods = request(
            "GET",
            "/api/v1/pods?&fieldSelector=spec.nodeName%3Dnode-a&watch=true",
        );
        assert_eq!((pods.verb, pods.name), (Verb::Watch, None));
        assert!(ApiRequest::parse("GET", "/version").is_err());
    }

    #[test]
    fn entries_allow_only_their_verb_scope_and_name() {
        let named_in_own_namespace = ApiCall {
            group: "",
            resource: "configmaps",
            verb: Verb::Patch,
            scope: Scope::OwnNamespace,
            name: ObjectName::Exactly("agent"),
            why: "test",
        };
        let no_flags = |_: &str| None;
        let allowed = |uri: &str, method: &str| {
            named_in_own_namespace.allows(&request(method, uri), "obs", &no_flags)
        };
        assert!(allowed("/api/v1/namespaces/obs/configmaps/agent", "PATCH"));
        assert!(!allowed(
            "/api/v1/namespaces/other/configmaps/agent",
            "PATCH"
        ));
        assert!(!allowed("/api/v1/namespaces/obs/configmaps/other", "PATCH"));
        assert!(!allowed("/api/v1/namespaces/obs/configmaps/agent", "GET"));
        assert!(!allowed("/api/v1/namespaces/obs/secrets/agent", "PATCH"));

        let own_deployment = ApiCall {
            group: "apps",
            resource: "deployments",
            verb: Verb::Get,
            scope: Scope::OwnNamespace,
            name: ObjectName::FromFlag("--owner-deployment"),
            why: "test",
        };
        let flags = |flag: &str| (flag == "--owner-deployment").then(|| "op".to_owned());
        let get = |name: &str| {
            request(
                "GET",
                &format!("/apis/apps/v1/namespaces/obs/deployments/{name}"),
            )
        };
        assert!(own_deployment.allows(&get("op"), "obs", &flags));
        assert!(!own_deployment.allows(&get("other"), "obs", &flags));
        assert!(!own_deployment.allows(&get("op"), "obs", &no_flags));
    }
}
