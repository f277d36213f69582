//! What the suite does with the Kubernetes API: apply manifests, wait for pods, read logs,
//! and reach a pod's port through the API server's port-forward (no Service, DNS or route
//! from the test machine to pods needed: it works the same on kind).

use std::{
    collections::BTreeMap,
    future::Future,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt as _,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, LogParams, Patch,
        PatchParams,
    },
    discovery,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Field manager of everything the suite applies.
const FIELD_MANAGER: &str = "trazor-e2e";

/// What a polled check saw: done with a value, or not yet, with what it saw instead.
pub enum Seen<T> {
    Done(T),
    NotYet(String),
}

/// Polls `check` every 250 ms until it is done; after `timeout`, fails saying what was
/// expected (`what`) and what was seen last.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Seen<T>>>,
{
    let started = Instant::now();
    loop {
        let last = match check().await {
            Ok(Seen::Done(value)) => return Ok(value),
            Ok(Seen::NotYet(seen)) => seen,
            Err(error) => format!("error: {error:#}"),
        };
        if started.elapsed() >= timeout {
            bail!(
                "expected {what} within {} s; last seen: {last}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Server-side applies a manifest (any kind the API server knows), as `kubectl apply
/// --server-side` would; returns the API server's answer (so a CEL rejection comes back as
/// its message).
pub async fn apply(client: &Client, manifest: &Value) -> Result<DynamicObject> {
    let api_version = manifest["apiVersion"]
        .as_str()
        .context("manifest without apiVersion")?;
    let kind = manifest["kind"].as_str().context("manifest without kind")?;
    let name = manifest["metadata"]["name"]
        .as_str()
        .context("manifest without metadata.name")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("the API server does not know {api_version} {kind}"))?;
    let api: Api<DynamicObject> = match (
        capabilities.scope,
        manifest["metadata"]["namespace"].as_str(),
    ) {
        (discovery::Scope::Namespaced, Some(namespace)) => {
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
        (discovery::Scope::Namespaced, None) => bail!("{kind} {name} needs a namespace"),
        (discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    let applied = api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(manifest),
        )
        .await?;
    Ok(applied)
}

/// Why Helm's server-side apply of `name` of `resource` (cluster-scoped) could conflict:
/// the field managers other than `owner` that applied part of it, or that `owner` applied
/// none of it (an object without managed fields counts as applied by `before-first-apply`,
/// which conflicts the same way). `None` when it does not exist or `owner` alone applied it.
///
/// Why it matters: Helm applies the chart's CRD with server-side apply, also over an
/// existing one; if another manager applied the same fields (`kubectl apply
/// --server-side`, or the operator's real-API tests, whose manager is
/// `trazor-operator-tests`), a changed CRD conflicts and the install fails.
pub async fn foreign_appliers(
    client: &Client,
    resource: &ApiResource,
    name: &str,
    owner: &str,
) -> Result<Option<Vec<String>>> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
    let Some(object) = api.get_opt(name).await? else {
        return Ok(None);
    };
    let appliers: Vec<String> = object
        .managed_fields()
        .iter()
        .filter(|entry| entry.operation.as_deref() == Some("Apply"))
        .filter_map(|entry| entry.manager.clone())
        .collect();
    let others: Vec<String> = appliers
        .iter()
        .filter(|manager| *manager != owner)
        .cloned()
        .collect();
    Ok(
        if appliers.iter().any(|manager| manager == owner) && others.is_empty() {
            None
        } else if others.is_empty() {
            Some(vec!["before-first-apply".to_owned()])
        } else {
            Some(others)
        },
    )
}

/// Deletes `name` of `resource` (namespaced) if it exists, and waits until it is gone.
pub async fn delete_and_wait(
    client: &Client,
    resource: &ApiResource,
    namespace: Option<&str>,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let api: Api<DynamicObject> = match namespace {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, resource),
        None => Api::all_with(client.clone(), resource),
    };
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("deleting {name}")),
    }
    wait_for(
        &format!("{} {name} gone", resource.kind),
        timeout,
        || async {
            Ok(match api.get_opt(name).await? {
                None => Seen::Done(()),
                Some(object) => Seen::NotYet(format!(
                    "still there (finalizers {:?})",
                    object.metadata.finalizers.unwrap_or_default()
                )),
            })
        },
    )
    .await
}

/// The ApiResource of a built-in or custom kind, from discovery.
pub async fn resource_of(client: &Client, api_version: &str, kind: &str) -> Result<ApiResource> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (resource, _) =
        discovery::pinned_kind(client, &GroupVersionKind::gvk(group, version, kind)).await?;
    Ok(resource)
}

/// Running pods (with an IP) matching `selector` in `namespace`, by name.
pub async fn running_pods(
    client: &Client,
    namespace: &str,
    selector: &str,
) -> Result<BTreeMap<String, Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|pod| {
            pod.metadata.deletion_timestamp.is_none()
                && pod.status.as_ref().is_some_and(|status| {
                    status.phase.as_deref() == Some("Running") && status.pod_ip.is_some()
                })
        })
        .map(|pod| (pod.name_any(), pod))
        .collect())
}

/// Whether the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// Waits until exactly `count` Ready pods match `selector`, and returns them.
pub async fn ready_pods(
    client: &Client,
    namespace: &str,
    selector: &str,
    count: usize,
    timeout: Duration,
) -> Result<BTreeMap<String, Pod>> {
    wait_for(
        &format!("{count} Ready pod(s) {selector} in {namespace}"),
        timeout,
        || async {
            let pods = running_pods(client, namespace, selector).await?;
            let ready: BTreeMap<String, Pod> =
                pods.into_iter().filter(|(_, pod)| is_ready(pod)).collect();
            Ok(if ready.len() == count {
                Seen::Done(ready)
            } else {
                Seen::NotYet(format!(
                    "{} Ready: {:?}",
                    ready.len(),
                    ready.keys().collect::<Vec<_>>()
                ))
            })
        },
    )
    .await
}

/// A container's whole log.
pub async fn logs(client: &Client, namespace: &str, pod: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.logs(pod, &LogParams::default())
        .await
        .with_context(|| format!("reading the log of {namespace}/{pod}"))
}

/// A container's log lines since `since`, each with the kubelet's timestamp.
pub async fn logs_since(
    client: &Client,
    namespace: &str,
    pod: &str,
    since: SystemTime,
) -> Result<Vec<(SystemTime, String)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let ago = SystemTime::now()
        .duration_since(since)
        .unwrap_or_default()
        .as_secs() as i64
        + 2;
    let text = pods
        .logs(
            pod,
            &LogParams {
                timestamps: true,
                since_seconds: Some(ago),
                ..LogParams::default()
            },
        )
        .await?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (stamp, rest) = line.split_once(' ')?;
            let at = humantime::parse_rfc3339(stamp).ok()?;
            Some((at, strip_ansi(rest)))
        })
        .collect())
}

/// Removes terminal colour escapes (the components log with them).
pub use crate::otlp::strip_ansi;

/// `GET path` on a pod's port, through the API server's port-forward; returns status and body.
pub async fn http_get(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> Result<(u16, String)> {
    let response = http_request(client, namespace, pod, port, "GET", path, &[], "").await?;
    Ok((response.status, response.body))
}

/// An HTTP answer: status, header lines (as sent) and body.
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<String>,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), the first one.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// One HTTP/1.1 request (`method path`, extra `headers`, `body`) on a pod's port, through the
/// API server's port-forward, as `kubectl port-forward` and a browser or curl would make it.
#[allow(clippy::too_many_arguments)]
pub async fn http_request(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpResponse> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut forwarder = pods
        .portforward(pod, &[port])
        .await
        .with_context(|| format!("port-forward to {namespace}/{pod}:{port}"))?;
    let mut stream = forwarder
        .take_stream(port)
        .ok_or_else(|| anyhow!("no stream for port {port}"))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("no answer within 10 s")??;
    drop(stream);
    let _ = forwarder.join().await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP response: {text:.200}"))?;
    Ok(HttpResponse {
        status,
        headers: lines.map(str::to_owned).collect(),
        body: body.to_owned(),
    })
}

/// The value of a Prometheus sample line `name` (without labels) in `text`.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
