//! `trazor-operator`: runs the TraceProfile controller with leader election and serves
//! `/metrics`, `/healthz` (alive) and `/readyz` (the Kubernetes API answers). All behaviour lives in the library; this only wires flags to it.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use anyhow::{Context as _, bail};
use axum::{Router, extract::State, http::StatusCode, routing::get};
use clap::Parser;
use futures::FutureExt;
use k8s_openapi::api::core::v1::Toleration;
use kube::Client;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;
use trazor_operator::{
    Metrics, controller,
    daemonset::{AgentSettings, tolerate_everything},
    leader,
    readiness::Readiness,
};

/// Reconciles TraceProfiles into the Trazor node-agent configuration and DaemonSet.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Namespace of the node-agent DaemonSet, its ConfigMap and the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "trazor-system")]
    namespace: String,

    /// Node-agent container image.
    #[arg(long, env = "TRAZOR_AGENT_IMAGE", default_value = concat!("ghcr.io/trazor-dev/trazor-node-agent:", env!("CARGO_PKG_VERSION")))]
    agent_image: String,

    /// imagePullPolicy of the node-agent container (cluster default when unset).
    #[arg(long)]
    agent_image_pull_policy: Option<String>,

    /// Collector gRPC address the agents stream to.
    #[arg(
        long,
        env = "TRAZOR_COLLECTOR",
        default_value = "http://trazor-collector:50051"
    )]
    collector: String,

    /// Secret holding the collector auth token for the agents (none when unset).
    #[arg(long, env = "TRAZOR_AUTH_SECRET")]
    auth_secret: Option<String>,

    /// Key of the token in --auth-secret.
    #[arg(long, default_value = "token")]
    auth_secret_key: String,

    /// ServiceAccount the node agents run as.
    #[arg(long, default_value = "trazor-node-agent")]
    agent_service_account: String,

    /// Run the agents privileged instead of with CAP_BPF/CAP_PERFMON (kernels older than 5.8).
    #[arg(long)]
    agent_privileged: bool,

    /// Connections each agent traces at once (the agent's --max-connections; its default
    /// when unset).
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    agent_max_connections: Option<u32>,

    /// Node label the agents' nodes must have, as key=value; repeatable.
    #[arg(long = "agent-node-selector", value_parser = parse_label)]
    agent_node_selector: Vec<(String, String)>,

    /// Tolerations of the agents as a JSON list (default: tolerate every taint).
    #[arg(long)]
    agent_tolerations: Option<String>,

    /// Name of the operator's own Deployment (in --namespace), made owner of the DaemonSet and
    /// ConfigMap so that uninstalling the operator removes them.
    #[arg(long, env = "TRAZOR_OWNER_DEPLOYMENT")]
    owner_deployment: Option<String>,

    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Take part in leader election (turn off only when running a single replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,

    /// This replica's identity in the leader Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

impl Args {
    fn agent_settings(&self) -> anyhow::Result<AgentSettings> {
        let mut settings = AgentSettings::new(&self.namespace, &self.agent_image, &self.collector);
        settings.image_pull_policy = self.agent_image_pull_policy.clone();
        settings.auth_secret = self.auth_secret.clone().filter(|s| !s.is_empty());
        settings.auth_secret_key = self.auth_secret_key.clone();
        settings.service_account = self.agent_service_account.clone();
        settings.privileged = self.agent_privileged;
        settings.max_connections = self.agent_max_connections;
        settings.node_selector = self
            .agent_node_selector
            .iter()
            .cloned()
            .collect::<BTreeMap<_, _>>();
        settings.tolerations = match &self.agent_tolerations {
            Some(json) if !json.trim().is_empty() => serde_json::from_str::<Vec<Toleration>>(json)
                .context("--agent-tolerations must be a JSON list of Kubernetes tolerations")?,
            _ => tolerate_everything(),
        };
        Ok(settings)
    }
}

async fn metrics_handler(State(registry): State<Arc<Registry>>) -> String {
    Metrics::encode(&registry)
}

/// Resolves on SIGINT or SIGTERM (what the kubelet sends).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn")),
        )
        .init();

    let mut settings = args.agent_settings()?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration: run in a pod or set KUBECONFIG")?;

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::default().register(&mut registry));
    let readiness = Readiness::default();
    tokio::spawn(
        readiness
            .clone()
            .probe_forever(client.clone(), args.namespace.clone()),
    );
    let ready = readiness.clone();
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let reason = ready.not_ready();
                async move {
                    match reason {
                        None => (StatusCode::OK, "ready\n".to_owned()),
                        Some(reason) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {reason}\n"),
                        ),
                    }
                }
            }),
        )
        .with_state(Arc::new(registry));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            error!(%error, "metrics server stopped");
        }
    });

    if let Some(name) = &args.owner_deployment {
        let owner = controller::deployment_owner(client.clone(), &args.namespace, name).await?;
        if args.leader_election {
            leader::own_lease(client.clone(), &args.namespace, &owner).await?;
        }
        settings.owner = Some(owner);
    }

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down");
        let _ = stop_tx.send(());
    });
    let stop = stop_rx.map(|_| ()).shared();

    let leadership = if args.leader_election {
        let identity = match &args.identity {
            Some(identity) => identity.clone(),
            None => {
                bail!("leader election needs --identity or POD_NAME (or --leader-election=false)")
            }
        };
        tokio::select! {
            held = leader::acquire(client.clone(), &args.namespace, &identity) => Some(held?),
            () = stop.clone() => return Ok(()),
        }
    } else {
        None
    };

    let run = controller::run(client, settings, metrics, stop);
    match leadership {
        None => run.await?,
        Some(mut leadership) => {
            tokio::select! {
                result = run => {
                    result?;
                    leadership.release().await;
                }
                () = leadership.lost() => {
                    // Another replica leads now; reconciling on would race it.
                    error!("lost leadership; exiting so this replica restarts as a follower");
                    std::process::exit(1);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["trazor-operator", "--namespace", "obs"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn flags_become_agent_settings() {
        let settings = args(&[
            "--agent-image=example/agent:1",
            "--collector=http://c:50051",
            "--auth-secret=tok",
            "--agent-node-selector=pool=tracing",
            "--agent-tolerations=[{\"key\":\"gpu\",\"operator\":\"Exists\"}]",
        ])
        .agent_settings()
        .unwrap();
        assert_eq!(settings.namespace, "obs");
        assert_eq!(settings.image, "example/agent:1");
        assert_eq!(settings.collector, "http://c:50051");
        assert_eq!(settings.auth_secret.as_deref(), Some("tok"));
        assert_eq!(
            settings.node_selector.get("pool").map(String::as_str),
            Some("tracing")
        );
        assert_eq!(settings.tolerations[0].key.as_deref(), Some("gpu"));
    }

    #[test]
    fn defaults_tolerate_everything_and_elect_a_leader() {
        let parsed = args(&[]);
        assert!(parsed.leader_election);
        let settings = parsed.agent_settings().unwrap();
        assert_eq!(settings.tolerations, tolerate_everything());
        assert!(settings.auth_secret.is_none());
        assert!(!args(&["--leader-election=false"]).leader_election);
    }

    #[test]
    fn bad_flags_are_rejected_with_a_reason() {
        assert!(Args::try_parse_from(["x", "--agent-node-selector=novalue"]).is_err());
        let error = args(&["--agent-tolerations=not json"])
            .agent_settings()
            .unwrap_err();
        assert!(error.to_string().contains("--agent-tolerations"), "{error}");
    }
}
