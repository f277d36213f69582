//! The cluster suite: Trazor installed and used in a real Kubernetes cluster as a user would,
//! one named step per assertion, each with a timeout and a message saying what was expected
//! and what was seen. It runs against the cluster `KUBECONFIG` names (this repo's
//! `e2e/kind.sh` makes a kind cluster for it).
//!
//! The story: load the images, `helm install`, deploy a sample app (a Deployment of two
//! servers with a known latency distribution) and in-cluster load generators, run an OTLP
//! backend (Rotel) that the collector exports to, apply a TraceProfile, and check what the
//! user would look at: the profile's status, the windows on the feed (attribution, counts,
//! percentiles against what the servers measured), OTLP metrics and spans; then the
//! validation, conflicts, hot reload, agent and collector restarts without a lost window,
//! operator failover, least privilege, and a clean uninstall.
//!
//! Opt-in: it runs only with `TRAZOR_E2E_CLUSTER=1` (it installs into and deletes from the
//! cluster); without it, it prints SKIPPED and why. Settings (all optional):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `TRAZOR_E2E_IMAGE_LOADER` | `ctr` (containerd on this machine), `kind:<cluster>`, or `none` (images already on the nodes) | `ctr` |
//! | `TRAZOR_E2E_HOST_ADDRESS` | address at which pods reach this machine (the OTLP backend runs here) | the first node's InternalIP |
//! | `TRAZOR_E2E_COLLECTOR_IP` | ClusterIP pinned for the collector Service, so agents reach it without cluster DNS | `10.96.77.77` |
//! | `TRAZOR_E2E_RECORD` | where to write the record (Markdown) | `target/tmp/cluster-results.md` |
//! | `TRAZOR_E2E_KEEP` | `1`: leave everything installed after a failure, to look at it | unset |
//! | `TRAZOR_HELM`, `TRAZOR_E2E_ROTEL` | the helm and Rotel binaries | where `scripts/setup.sh` puts them |

mod feed;
mod kube_io;
mod otlp;
mod truth;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    future::Future,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{Api, Client, ResourceExt as _, api::PostParams};
use serde_json::{Value, json};
use trazor_operator::TraceProfile;
use trazor_proto::api_access::{ApiCall, ObjectName, Scope};

use crate::{
    feed::FeedRecorder,
    kube_io::{
        Seen, apply, delete_and_wait, foreign_appliers, http_get, http_request, logs, logs_since,
        metric_value, ready_pods, resource_of, running_pods, wait_for,
    },
    otlp::OtlpReceiver,
};

const RELEASE: &str = "trazor";
const SYSTEM_NS: &str = "trazor-e2e";
const SHOP_NS: &str = "trazor-e2e-shop";
const OTLP_PORT: u16 = 24318;
const COLLECTOR_SELECTOR: &str = "app.kubernetes.io/name=trazor-collector";
const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=trazor-operator";
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=trazor-node-agent";
/// The sample servers: 20 ms plus up to 10 ms of jitter, 5 % at 60 ms, 2 % answered 500.
const CHECKOUT_ARGS: &[&str] = &[
    "--delay=20ms",
    "--jitter=10ms",
    "--slow-fraction=0.05",
    "--slow-delay=60ms",
    "--error-rate=0.02",
];
const QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];

fn main() -> ExitCode {
    if std::env::var("TRAZOR_E2E_CLUSTER").as_deref() != Ok("1") {
        println!(
            "SKIPPED cluster suite: it installs Trazor into the cluster KUBECONFIG names and runs \
             only when asked, with TRAZOR_E2E_CLUSTER=1 (this machine's CI has no cluster; \
             e2e/README.md says how to run it, e2e/RESULTS.md has its last record)"
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cluster suite failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Settings from the environment (see the module docs).
struct Settings {
    repo: PathBuf,
    helm: PathBuf,
    loader: String,
    host_address: Option<String>,
    collector_ip: String,
    record: PathBuf,
    keep: bool,
    version: String,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("e2e has a parent")?
            .to_path_buf();
        let helm = match std::env::var_os("TRAZOR_HELM") {
            Some(path) => PathBuf::from(path),
            None => {
                let cached = Path::new(&std::env::var("HOME").unwrap_or_default())
                    .join(".cache/trazor/bin/helm");
                if cached.is_file() {
                    cached
                } else {
                    PathBuf::from("helm")
                }
            }
        };
        let chart = std::fs::read_to_string(repo.join("charts/trazor/Chart.yaml"))?;
        let version = chart
            .lines()
            .find_map(|line| line.strip_prefix("appVersion:"))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .context("Chart.yaml has no appVersion")?;
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Ok(Self {
            record: var("TRAZOR_E2E_RECORD")
                .map_or_else(|| repo.join("target/tmp/cluster-results.md"), PathBuf::from),
            helm,
            loader: var("TRAZOR_E2E_IMAGE_LOADER").unwrap_or_else(|| "ctr".to_owned()),
            host_address: var("TRAZOR_E2E_HOST_ADDRESS"),
            collector_ip: var("TRAZOR_E2E_COLLECTOR_IP").unwrap_or_else(|| "10.96.77.77".into()),
            keep: var("TRAZOR_E2E_KEEP").as_deref() == Some("1"),
            version,
            repo,
        })
    }

    fn image(&self, name: &str) -> String {
        format!("ghcr.io/trazor-dev/{name}:{}", self.version)
    }
}

/// One step's outcome, for the record.
struct StepRecord {
    name: String,
    seconds: f64,
    outcome: std::result::Result<String, String>,
}

/// Runs named steps in order and keeps their record.
struct Suite {
    steps: Vec<StepRecord>,
    started: Instant,
}

impl Suite {
    /// Runs `step` with a deadline; its `Ok` text (what was measured) goes into the record.
    async fn step<T>(
        &mut self,
        name: &str,
        timeout: Duration,
        step: impl Future<Output = Result<(T, String)>>,
    ) -> Result<T> {
        let number = self.steps.len() + 1;
        println!("[{number:>2}] {name} ...");
        let started = Instant::now();
        let outcome = match tokio::time::timeout(timeout, step).await {
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow!(
                "step did not finish within {} s",
                timeout.as_secs()
            )),
        };
        let seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok((value, detail)) => {
                println!("     ok ({seconds:.1} s): {detail}");
                self.steps.push(StepRecord {
                    name: name.to_owned(),
                    seconds,
                    outcome: Ok(detail),
                });
                Ok(value)
            }
            Err(error) => {
                let message = format!("{error:#}");
                println!("     FAILED ({seconds:.1} s): {message}");
                self.steps.push(StepRecord {
                    name: name.to_owned(),
                    seconds,
                    outcome: Err(message.clone()),
                });
                Err(anyhow!("step {number} ({name}) failed: {message}"))
            }
        }
    }

    fn write_record(&self, path: &Path, header: &str) -> Result<()> {
        let mut text = String::new();
        let passed = self.steps.iter().filter(|s| s.outcome.is_ok()).count();
        let _ = writeln!(text, "{header}");
        let _ = writeln!(
            text,
            "**{passed} of {} steps passed** in {:.0} s.\n",
            self.steps.len(),
            self.started.elapsed().as_secs_f64()
        );
        let _ = writeln!(text, "| # | step | result | time | measured / seen |");
        let _ = writeln!(text, "|---|---|---|---|---|");
        for (index, step) in self.steps.iter().enumerate() {
            let (result, detail) = match &step.outcome {
                Ok(detail) => ("passed", detail.as_str()),
                Err(error) => ("**FAILED**", error.as_str()),
            };
            let _ = writeln!(
                text,
                "| {} | {} | {result} | {:.1} s | {} |",
                index + 1,
                step.name,
                step.seconds,
                detail.replace('|', "\\|").replace('\n', " ")
            );
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)?;
        println!("record written to {}", path.display());
        Ok(())
    }
}

async fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    let client = Client::try_default()
        .await
        .context("no cluster: set KUBECONFIG to the cluster to test")?;
    let mut suite = Suite {
        steps: Vec::new(),
        started: Instant::now(),
    };
    let version = client
        .apiserver_version()
        .await
        .context("the API server does not answer")?;
    let nodes: Api<Node> = Api::all(client.clone());
    let node_list = nodes.list(&Default::default()).await?;
    let node = node_list.items.first().context("the cluster has no node")?;
    let info = node.status.as_ref().and_then(|s| s.node_info.clone());
    let header = format!(
        "# Cluster suite record\n\n`cargo test -p trazor-e2e --test cluster` with \
         `TRAZOR_E2E_CLUSTER=1`, run {}.\n\n- Kubernetes: server {} ({} node(s); node {}: kubelet {}, \
         {}, kernel {}, {})\n- Trazor chart {} (images `ghcr.io/trazor-dev/*:{}`), loaded with `{}`\n",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        version.git_version,
        node_list.items.len(),
        node.name_any(),
        info.as_ref().map_or("?", |i| i.kubelet_version.as_str()),
        info.as_ref()
            .map_or("?", |i| i.container_runtime_version.as_str()),
        info.as_ref().map_or("?", |i| i.kernel_version.as_str()),
        info.as_ref().map_or("?", |i| i.os_image.as_str()),
        settings.version,
        settings.version,
        settings.loader,
    );
    println!("{header}");
    let outcome = story(&mut suite, &settings, &client, node).await;
    if outcome.is_err() && !settings.keep {
        println!("cleaning up after the failure (TRAZOR_E2E_KEEP=1 keeps everything)");
        let _ = cleanup(&settings, &client).await;
    }
    suite.write_record(&settings.record, &header)?;
    outcome
}

/// Removes what a previous or failed run left: profiles, the sample app, the release.
/// The TraceProfile CRD's name.
const CRD_NAME: &str = "traceprofiles.trazor.dev";

async fn cleanup(settings: &Settings, client: &Client) -> Result<()> {
    let profiles: Api<TraceProfile> = Api::namespaced(client.clone(), SHOP_NS);
    if let Ok(list) = profiles.list(&Default::default()).await {
        for profile in list {
            let _ = profiles
                .delete(&profile.name_any(), &Default::default())
                .await;
        }
    }
    // Give the operator a moment to release the finalizers before it goes away.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = helm(settings, &["uninstall", RELEASE, "-n", SYSTEM_NS, "--wait"]).await;
    let namespaces = resource_of(client, "v1", "Namespace").await?;
    for namespace in [SHOP_NS, SYSTEM_NS] {
        let _ = delete_and_wait(
            client,
            &namespaces,
            None,
            namespace,
            Duration::from_secs(120),
        )
        .await;
    }
    // The CRD outlives a release (Helm never deletes one), so the next install upgrades it
    // in place, as a user's upgrade does. One that something else applied too would make
    // that upgrade conflict (see `foreign_appliers`): deleted (a cluster made for testing).
    let crds = resource_of(
        client,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
    )
    .await?;
    if let Some(others) = foreign_appliers(client, &crds, CRD_NAME, "helm").await? {
        delete_and_wait(client, &crds, None, CRD_NAME, Duration::from_secs(120)).await?;
        println!("     (the TraceProfile CRD, applied by {others:?} too, was deleted)");
    }
    Ok(())
}

async fn helm(settings: &Settings, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(&settings.helm)
        .args(args)
        .current_dir(&settings.repo)
        .output()
        .await
        .with_context(|| {
            format!(
                "running {} (scripts/setup.sh installs helm)",
                settings.helm.display()
            )
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "helm {} failed: {text}",
        args.join(" ")
    );
    Ok(text)
}

async fn command(program: &str, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A sample-app Deployment: `replicas` servers labelled `app=<name>`.
fn sample_deployment(settings: &Settings, name: &str, replicas: u32, args: &[&str]) -> Value {
    let mut command = vec![
        "/trazor-sample-server".to_owned(),
        "--listen=0.0.0.0:8080".to_owned(),
        // The truth the windows are held to, in the pod log.
        "--latency-log=/dev/stdout".to_owned(),
    ];
    command.extend(args.iter().map(|a| (*a).to_owned()));
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": SHOP_NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [{
                        "name": "server",
                        "image": settings.image("trazor-sample"),
                        "imagePullPolicy": "Never",
                        "command": command,
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                            "allowPrivilegeEscalation": false,
                                            "readOnlyRootFilesystem": true}
                    }]
                }
            }
        }
    })
}

/// A load-generator pod sending to `target` (ip:port) for `seconds` at `rate` req/s.
fn load_pod(settings: &Settings, name: &str, target: &str, seconds: u64, rate: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": SHOP_NS, "labels": {"role": "load"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "load",
                "image": settings.image("trazor-sample"),
                "imagePullPolicy": "Never",
                "command": ["/trazor-sample-client", format!("--target={target}"),
                            format!("--duration={seconds}s"), format!("--rate={rate}"),
                            "--concurrency=2", "--path=/cart/42"],
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                    "allowPrivilegeEscalation": false}
            }]
        }
    })
}

/// What a finished load generator printed.
#[derive(Debug)]
struct LoadResult {
    responses: u64,
    errors: u64,
    failures: u64,
}

/// Starts one load generator per target pod; returns their names by target pod.
async fn start_load(
    settings: &Settings,
    client: &Client,
    targets: &BTreeMap<String, Pod>,
    tag: &str,
    seconds: u64,
    rate: u32,
) -> Result<BTreeMap<String, String>> {
    let pods_resource = resource_of(client, "v1", "Pod").await?;
    let mut generators = BTreeMap::new();
    for (index, (target, pod)) in targets.iter().enumerate() {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .context("target pod without an IP")?;
        let name = format!("load-{tag}-{index}");
        delete_and_wait(
            client,
            &pods_resource,
            Some(SHOP_NS),
            &name,
            Duration::from_secs(60),
        )
        .await?;
        apply(
            client,
            &load_pod(settings, &name, &format!("{ip}:8080"), seconds, rate),
        )
        .await?;
        generators.insert(target.clone(), name);
    }
    Ok(generators)
}

/// Waits for the load generators to finish and reads their counts.
async fn finish_load(
    client: &Client,
    generators: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<BTreeMap<String, LoadResult>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SHOP_NS);
    let mut results = BTreeMap::new();
    for (target, generator) in generators {
        wait_for(
            &format!("load generator {generator} to succeed"),
            timeout,
            || async {
                let pod = pods.get(generator).await?;
                let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
                Ok(match phase.as_str() {
                    "Succeeded" => Seen::Done(()),
                    "Failed" => bail!("{generator} failed"),
                    other => Seen::NotYet(format!("phase {other}")),
                })
            },
        )
        .await?;
        let log = logs(client, SHOP_NS, generator).await?;
        let line = log
            .lines()
            .rev()
            .find(|line| line.starts_with('{'))
            .with_context(|| format!("{generator} printed no counts: {log}"))?;
        let counts: Value = serde_json::from_str(line)?;
        let number = |key: &str| counts[key].as_u64().unwrap_or_default();
        results.insert(
            target.clone(),
            LoadResult {
                responses: number("responses"),
                errors: number("errors"),
                failures: number("failures"),
            },
        );
    }
    Ok(results)
}

/// Server-side windows of one pod on the feed.
fn pod_windows(feed: &FeedRecorder, pod: &str) -> Vec<Value> {
    feed.windows(|w| w["pod"]["name"] == pod && w["direction"] == "server")
}

fn profile_manifest(name: &str, app: &str, window: &str) -> Value {
    json!({
        "apiVersion": "trazor.dev/v1alpha1", "kind": "TraceProfile",
        "metadata": {"name": name, "namespace": SHOP_NS},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            "direction": "server",
            "ports": [8080],
            "window": window,
            "percentiles": QUANTILES,
            // Slow and failed requests become exemplars (OTLP spans).
            "slowThreshold": "50ms",
            "routeTemplates": ["/cart/{id}"]
        }
    })
}

/// The status condition `type` of a profile: (status, reason, message).
fn condition(profile: &TraceProfile, kind: &str) -> Option<(String, String, String)> {
    profile
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The time the agent logged `needle` after `since` (the kubelet's timestamp).
async fn agent_logged_after(
    client: &Client,
    agent: &str,
    since: SystemTime,
    matches: impl Fn(&str) -> bool,
) -> Result<Option<SystemTime>> {
    let lines = logs_since(client, SYSTEM_NS, agent, since).await?;
    Ok(lines
        .into_iter()
        .find(|(at, line)| *at >= since && matches(line))
        .map(|(at, _)| at))
}

fn selection_with_pods(line: &str, pods: usize) -> bool {
    line.contains("selection updated") && line.contains(&format!("pods={pods} "))
}

async fn the_agent(client: &Client) -> Result<String> {
    let agents = ready_pods(
        client,
        SYSTEM_NS,
        AGENT_SELECTOR,
        1,
        Duration::from_secs(120),
    )
    .await?;
    agents.into_keys().next().context("no agent pod")
}

/// Checks every (agent, boot) seen on the feed has no gap in its sequences; returns
/// (windows, repeats) for the record.
fn no_gaps(feed: &FeedRecorder) -> Result<(usize, u64)> {
    feed.with_log(|log| {
        let mut by_boot: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        for (agent, boot, sequence) in log.windows.keys() {
            by_boot
                .entry((agent.clone(), boot.clone()))
                .or_default()
                .push(*sequence);
        }
        for ((agent, boot), sequences) in &by_boot {
            let gaps = truth::sequence_gaps(sequences);
            ensure!(
                gaps.is_empty(),
                "agent {agent} boot {boot}: windows {gaps:?} never arrived (saw {} windows, sequences {}..={})",
                sequences.len(),
                sequences.iter().min().copied().unwrap_or_default(),
                sequences.iter().max().copied().unwrap_or_default()
            );
        }
        Ok((log.windows.len(), log.repeats))
    })
}

/// Deletes pod `victim` (in the Trazor namespace) 8 s into 30 s of load on `targets`,
/// waits for a new Ready pod of `selector`, then for the load to end and its last windows to
/// close; returns the new pod and how long after the deletion it was Ready.
async fn delete_under_load(
    settings: &Settings,
    client: &Client,
    targets: &BTreeMap<String, Pod>,
    tag: &str,
    victim: &str,
    selector: &str,
) -> Result<(String, Duration)> {
    let generators = start_load(settings, client, targets, tag, 30, 40).await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NS);
    pods.delete(victim, &Default::default()).await?;
    let deleted = Instant::now();
    let replacement = wait_for(
        &format!("a new Ready pod {selector}"),
        Duration::from_secs(90),
        || async {
            let running = running_pods(client, SYSTEM_NS, selector).await?;
            Ok(
                match running
                    .iter()
                    .find(|(name, pod)| name.as_str() != victim && kube_io::is_ready(pod))
                {
                    Some((name, _)) => Seen::Done(name.clone()),
                    None => Seen::NotYet(format!("{:?}", running.keys().collect::<Vec<_>>())),
                },
            )
        },
    )
    .await?;
    let back = deleted.elapsed();
    finish_load(client, &generators, Duration::from_secs(90)).await?;
    // The windows holding the load have closed once a window entirely after it has.
    tokio::time::sleep(Duration::from_secs(8)).await;
    Ok((replacement, back))
}

async fn story(suite: &mut Suite, settings: &Settings, client: &Client, node: &Node) -> Result<()> {
    let node_name = node.name_any();
    let profiles: Api<TraceProfile> = Api::namespaced(client.clone(), SHOP_NS);
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NS);

    suite
        .step(
            "clean slate (a previous run's leftovers removed)",
            Duration::from_secs(300),
            async {
                cleanup(settings, client).await?;
                Ok(((), "no release, no test namespaces".to_owned()))
            },
        )
        .await?;

    suite
        .step(
            "images loaded onto the node",
            Duration::from_secs(300),
            async {
                let dir = settings.repo.join("target/images");
                let mut loaded = Vec::new();
                for image in [
                    "trazor-operator",
                    "trazor-collector",
                    "trazor-node-agent",
                    "trazor-sample",
                ] {
                    let archive = dir.join(format!("{image}.tar"));
                    ensure!(
                        archive.is_file(),
                        "{} missing: run scripts/images.sh first",
                        archive.display()
                    );
                    let path = archive.to_string_lossy().into_owned();
                    match settings.loader.as_str() {
                        "ctr" => {
                            command("ctr", &["-n", "k8s.io", "images", "import", &path]).await?;
                        }
                        "none" => {}
                        other => match other.strip_prefix("kind:") {
                            Some(cluster) => {
                                command(
                                    "kind",
                                    &["load", "image-archive", &path, "--name", cluster],
                                )
                                .await?;
                            }
                            None => bail!(
                                "TRAZOR_E2E_IMAGE_LOADER={other}: use ctr, kind:<cluster> or none"
                            ),
                        },
                    }
                    let bytes = std::fs::metadata(&archive)?.len();
                    loaded.push(format!("{image} ({:.1} MB)", bytes as f64 / 1e6));
                }
                Ok(((), loaded.join(", ")))
            },
        )
        .await?;

    let host_address = match &settings.host_address {
        Some(address) => address.clone(),
        None => node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address.clone())
            .context("the node has no InternalIP: set TRAZOR_E2E_HOST_ADDRESS")?,
    };
    let receiver = suite
        .step(
            "OTLP backend (Rotel) receiving on this machine",
            Duration::from_secs(30),
            async {
                let receiver = OtlpReceiver::start(OTLP_PORT).await?;
                Ok((
                    receiver,
                    format!("OTLP/HTTP on 0.0.0.0:{OTLP_PORT}, pods send to {host_address}"),
                ))
            },
        )
        .await?;

    // The feed and dashboard behind their own token, as a team exposing them would run them.
    let feed_token = format!("e2e-feed-{:032x}", rand::random::<u128>());
    let install_started = Instant::now();
    suite
        .step("helm install", Duration::from_secs(300), async {
            let feed_token_value = format!("auth.feed.token={feed_token}");
            let otlp = format!("collector.otlp.endpoint=http://{host_address}:{OTLP_PORT}");
            let clusterip = format!("collector.service.clusterIP={}", settings.collector_ip);
            let endpoint = format!(
                "agent.collectorEndpoint=http://{}:50051",
                settings.collector_ip
            );
            helm(
                settings,
                &[
                    "install",
                    RELEASE,
                    "charts/trazor",
                    "-n",
                    SYSTEM_NS,
                    "--create-namespace",
                    "--wait",
                    "--timeout",
                    "240s",
                    "--set",
                    "images.pullPolicy=Never",
                    "--set",
                    &otlp,
                    "--set",
                    &clusterip,
                    "--set",
                    &endpoint,
                    "--set",
                    &feed_token_value,
                ],
            )
            .await?;
            let operators = ready_pods(
                client,
                SYSTEM_NS,
                OPERATOR_SELECTOR,
                2,
                Duration::from_secs(60),
            )
            .await?;
            let collectors = ready_pods(
                client,
                SYSTEM_NS,
                COLLECTOR_SELECTOR,
                1,
                Duration::from_secs(60),
            )
            .await?;
            Ok((
                (),
                format!(
                    "chart installed and Ready in {:.1} s: operators {:?}, collector {:?}",
                    install_started.elapsed().as_secs_f64(),
                    operators.keys().collect::<Vec<_>>(),
                    collectors.keys().collect::<Vec<_>>()
                ),
            ))
        })
        .await?;

    let checkout = suite
        .step("sample app deployed (checkout: 2 replicas; inventory: 1)", Duration::from_secs(180), async {
            apply(client, &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SHOP_NS}})).await?;
            apply(client, &sample_deployment(settings, "checkout", 2, CHECKOUT_ARGS)).await?;
            apply(client, &sample_deployment(settings, "inventory", 1, &["--delay=5ms"])).await?;
            let checkout = ready_pods(client, SHOP_NS, "app=checkout", 2, Duration::from_secs(150)).await?;
            ready_pods(client, SHOP_NS, "app=inventory", 1, Duration::from_secs(60)).await?;
            let names = checkout.keys().cloned().collect::<Vec<_>>();
            Ok((checkout, format!("checkout pods {names:?}")))
        })
        .await?;

    let feed = FeedRecorder::start(
        client.clone(),
        SYSTEM_NS.to_owned(),
        COLLECTOR_SELECTOR.to_owned(),
        8080,
        feed_token.clone(),
    );

    let applied_at = Instant::now();
    suite
        .step("profile Ready: matchedPods 2, nodesReporting 1", Duration::from_secs(180), async {
            apply(client, &profile_manifest("checkout", "checkout", "5s")).await?;
            let status = wait_for("checkout Ready with matchedPods 2 and nodesReporting 1", Duration::from_secs(170), || async {
                let profile = profiles.get("checkout").await?;
                let ready = condition(&profile, "Ready");
                let status = profile.status.clone().unwrap_or_default();
                Ok(match ready {
                    Some((s, reason, _)) if s == "True" && status.matched_pods == 2 && status.nodes_reporting == 1 => Seen::Done(reason),
                    other => Seen::NotYet(format!("Ready {other:?}, matchedPods {}, nodesReporting {}", status.matched_pods, status.nodes_reporting)),
                })
            })
            .await?;
            Ok(((), format!("Ready ({status}) {:.1} s after apply (the agent DaemonSet rolled out in between)", applied_at.elapsed().as_secs_f64())))
        })
        .await?;

    let agent = the_agent(client).await?;
    suite
        .step(
            "agent traces the two selected pods",
            Duration::from_secs(60),
            async {
                wait_for(
                    "the agent's selection to hold the 2 checkout pods",
                    Duration::from_secs(55),
                    || async {
                        let lines = logs_since(
                            client,
                            SYSTEM_NS,
                            &agent,
                            UNIX_EPOCH + Duration::from_secs(1),
                        )
                        .await?;
                        Ok(if lines.iter().any(|(_, l)| selection_with_pods(l, 2)) {
                            Seen::Done(())
                        } else {
                            Seen::NotYet(
                                lines
                                    .iter()
                                    .rev()
                                    .take(3)
                                    .map(|(_, l)| l.clone())
                                    .collect::<Vec<_>>()
                                    .join(" | "),
                            )
                        })
                    },
                )
                .await?;
                let (status, body) = http_get(client, SYSTEM_NS, &agent, 9464, "/readyz").await?;
                ensure!(status == 200, "agent /readyz: {status} {body}");
                Ok((
                    (),
                    format!("agent {agent} on {node_name}: selection has 2 pods, /readyz 200"),
                ))
            },
        )
        .await?;

    let load_started = SystemTime::now();
    let generators = start_load(settings, client, &checkout, "a", 20, 40).await?;
    let loads = suite
        .step(
            "load generators ran (2 pods × 20 s × 40 req/s)",
            Duration::from_secs(120),
            async {
                let results = finish_load(client, &generators, Duration::from_secs(110)).await?;
                for (pod, result) in &results {
                    ensure!(
                        result.failures == 0 && result.responses > 0,
                        "load on {pod}: {result:?}"
                    );
                }
                let detail = results
                    .iter()
                    .map(|(pod, r)| format!("{pod}: {} responses ({} 5xx)", r.responses, r.errors))
                    .collect::<Vec<_>>()
                    .join("; ");
                Ok((results, detail))
            },
        )
        .await?;

    suite
        .step("windows on the feed: attributed, counted exactly, percentiles as measured", Duration::from_secs(60), async {
            // Every window holding the load has closed once a window entirely after it has.
            tokio::time::sleep(Duration::from_secs(7)).await;
            let mut details = Vec::new();
            for (pod, load) in &loads {
                let windows: Vec<Value> = pod_windows(&feed, pod)
                    .into_iter()
                    .filter(|w| w["end_unix_ms"].as_u64().unwrap_or_default() > unix_ms(load_started))
                    .collect();
                ensure!(!windows.is_empty(), "no window of {pod} on the feed");
                for window in &windows {
                    let source = &window["pod"];
                    ensure!(
                        source["namespace"] == SHOP_NS && source["workload_kind"] == "Deployment"
                            && source["workload_name"] == "checkout" && window["profile"] == format!("{SHOP_NS}/checkout")
                            && window["node"] == node_name.as_str(),
                        "window not attributed to {SHOP_NS}/{pod} (Deployment checkout, profile checkout, node {node_name}): {}",
                        json!({"pod": source, "profile": window["profile"], "node": window["node"]})
                    );
                }
                let counted: u64 = windows.iter().map(|w| w["count"].as_u64().unwrap_or_default()).sum();
                let errors: u64 = windows.iter().map(|w| w["errors"].as_u64().unwrap_or_default()).sum();
                let mut latencies: Vec<u64> = truth::parse_latency_log(&logs(client, SHOP_NS, pod).await?)
                    .into_iter()
                    .map(|(latency, _)| latency)
                    .collect();
                ensure!(
                    counted == load.responses && latencies.len() as u64 == load.responses && errors == load.errors,
                    "{pod}: windows counted {counted} requests ({errors} 5xx), the load generator got {} responses ({} 5xx), the server logged {}",
                    load.responses, load.errors, latencies.len()
                );
                let histogram = truth::merged(&windows)?;
                let comparisons = truth::compare_percentiles(&histogram, &mut latencies, &QUANTILES)
                    .with_context(|| pod.clone())?;
                details.push(format!(
                    "{pod}: {counted} requests in {} windows = generator = server log, {errors} 5xx; {}",
                    windows.len(),
                    comparisons.iter().map(|c| format!("{} {:.3} ms vs {:.3} ms (±{:.3})", c.label, c.reported_ms, c.true_ms, c.allowed_ms)).collect::<Vec<_>>().join(", ")
                ));
            }
            Ok(((), details.join("; ")))
        })
        .await?;

    suite
        .step(
            "OTLP: metrics and exemplar spans with k8s.* resource attributes, duration points by status code",
            Duration::from_secs(90),
            async {
                let checkout_pods: BTreeSet<&String> = checkout.keys().collect();
                let errors_sent: u64 = loads.values().map(|load| load.errors).sum();
                let found = wait_for(
                    "a metric block and a span block for checkout with k8s.* resource attributes",
                    Duration::from_secs(85),
                    || async {
                        let blocks = receiver.blocks()?;
                        let metric = blocks.iter().find(|b| {
                            b.signal == "metrics"
                                && b.attribute("k8s.namespace.name") == Some(SHOP_NS)
                                && b.names.iter().any(|n| n == "http.server.request.duration")
                        });
                        let span = blocks.iter().find(|b| {
                            b.signal == "spans"
                                && b.attribute("k8s.namespace.name") == Some(SHOP_NS)
                                && b.attribute("k8s.pod.name")
                                    .is_some_and(|p| checkout_pods.iter().any(|c| c.as_str() == p))
                        });
                        // The duration points' statuses, as a RED dashboard reads them:
                        // `http.response.status_code`, and `error.type` on the 5xx ones.
                        let statuses: BTreeSet<(String, Option<String>)> = blocks
                            .iter()
                            .filter(|b| {
                                b.signal == "metrics"
                                    && b.attribute("k8s.namespace.name") == Some(SHOP_NS)
                            })
                            .flat_map(|b| b.point_attributes.iter())
                            .filter_map(|attributes| {
                                let value = |key: &str| {
                                    attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
                                };
                                Some((value("http.response.status_code")?, value("error.type")))
                            })
                            .collect();
                        let ok = ("200".to_owned(), None);
                        let error = ("500".to_owned(), Some("500".to_owned()));
                        let statuses_seen = statuses.contains(&ok)
                            && (errors_sent == 0 || statuses.contains(&error));
                        Ok(match (metric, span) {
                            (Some(metric), Some(span)) if statuses_seen => {
                                Seen::Done((metric.clone(), span.clone(), statuses))
                            }
                            _ => Seen::NotYet(format!(
                                "{} blocks; duration point statuses {statuses:?} ({errors_sent} 5xx sent); resources seen: {:?}",
                                blocks.len(),
                                blocks
                                    .iter()
                                    .map(|b| (
                                        b.signal,
                                        b.resource
                                            .iter()
                                            .filter(|(k, _)| k.starts_with("k8s.")
                                                || k == "service.name")
                                            .cloned()
                                            .collect::<Vec<_>>()
                                    ))
                                    .take(4)
                                    .collect::<Vec<_>>()
                            )),
                        })
                    },
                )
                .await?;
                let (metric, span, statuses) = found;
                Ok((
                    (),
                    format!(
                        "metrics resource {:?} ({:?}); duration points by (status code, error.type) {:?} ({errors_sent} 5xx sent); span resource {:?} ({:?})",
                        metric.resource,
                        metric.names,
                        statuses,
                        span.resource,
                        span.names.first()
                    ),
                ))
            },
        )
        .await?;

    suite
        .step("dashboard and feed behind the feed token (port-forward, as a user opens them)", Duration::from_secs(60), async {
            let collectors = ready_pods(client, SYSTEM_NS, COLLECTOR_SELECTOR, 1, Duration::from_secs(20)).await?;
            let collector = collectors.keys().next().cloned().context("collector pod")?;
            let anonymous = http_request(client, SYSTEM_NS, &collector, 8080, "GET", "/", &[], "").await?;
            ensure!(
                anonymous.status == 401 && anonymous.body.contains(r#"action="/login""#),
                "GET / without a session should be the login page (401), got {}: {:.200}",
                anonymous.status,
                anonymous.body
            );
            let upgrade = [
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ];
            let refused = http_request(client, SYSTEM_NS, &collector, 8080, "GET", "/ws", &upgrade, "").await?;
            ensure!(refused.status == 401, "a WebSocket upgrade without the token should get 401, got {}", refused.status);
            let wrong = http_request(client, SYSTEM_NS, &collector, 8080, "POST", "/login",
                &[("Content-Type", "application/x-www-form-urlencoded")], "token=not-the-token").await?;
            ensure!(wrong.status == 401 && wrong.header("set-cookie").is_none(), "a wrong token at /login should get 401 and no cookie, got {}", wrong.status);
            let form = format!("token={feed_token}");
            let login = http_request(client, SYSTEM_NS, &collector, 8080, "POST", "/login",
                &[("Content-Type", "application/x-www-form-urlencoded")], &form).await?;
            let cookie = login
                .header("set-cookie")
                .and_then(|value| value.split(';').next())
                .filter(|pair| pair.starts_with("trazor_session="))
                .map(str::to_owned);
            let Some(cookie) = cookie.filter(|_| login.status == 303) else {
                bail!("POST /login with the chart's feed token should answer 303 with a trazor_session cookie, got {} {:?}", login.status, login.headers);
            };
            let session = [("Cookie", cookie.as_str())];
            let page = http_request(client, SYSTEM_NS, &collector, 8080, "GET", "/", &session, "").await?;
            ensure!(page.status == 200 && page.body.contains("<title>Trazor: live request latency</title>"), "GET / with the session answered {}: {:.200}", page.status, page.body);
            let page = page.body;
            let (status, metrics) = http_get(client, SYSTEM_NS, &collector, 8080, "/metrics").await?;
            ensure!(status == 200, "GET /metrics answered {status}");
            let accepted = metric_value(&metrics, "trazor_collector_windows_published_total").unwrap_or_default();
            ensure!(accepted > 0.0, "the collector reports no published window: {metrics:.400}");
            let connections = feed.with_log(|log| log.connections);
            Ok(((), format!("GET / without a session: 401 login page; upgrade without the token: 401; wrong token: 401; the chart's token: 303 + session cookie, then the dashboard page ({} bytes); /metrics open: {accepted} windows published; the feed subscriber (Bearer token) connected {connections} time(s)", page.len())))
        })
        .await?;

    suite
        .step(
            "invalid profile rejected by the API server (CEL), readably",
            Duration::from_secs(30),
            async {
                let result = apply(client, &profile_manifest("too-long", "checkout", "10m")).await;
                let message = match result {
                    Ok(_) => bail!("a profile with window 10m was accepted"),
                    Err(error) => format!("{error:#}"),
                };
                ensure!(
                    message.contains("window"),
                    "the rejection does not name the field: {message}"
                );
                Ok(((), message))
            },
        )
        .await?;

    suite
        .step(
            "conflicting profile becomes Degraded (ConflictingProfile)",
            Duration::from_secs(60),
            async {
                apply(
                    client,
                    &profile_manifest("checkout-slow", "checkout", "10s"),
                )
                .await?;
                let (reason, message) = wait_for(
                    "checkout-slow Degraded with reason ConflictingProfile",
                    Duration::from_secs(50),
                    || async {
                        let profile = profiles.get("checkout-slow").await?;
                        Ok(match condition(&profile, "Degraded") {
                            Some((s, reason, message))
                                if s == "True" && reason == "ConflictingProfile" =>
                            {
                                Seen::Done((reason, message))
                            }
                            other => Seen::NotYet(format!("Degraded {other:?}")),
                        })
                    },
                )
                .await?;
                let checkout_ready = condition(&profiles.get("checkout").await?, "Ready");
                ensure!(
                    checkout_ready.as_ref().is_some_and(|(s, _, _)| s == "True"),
                    "the older profile must keep working: {checkout_ready:?}"
                );
                let resource = resource_of(client, "trazor.dev/v1alpha1", "TraceProfile").await?;
                delete_and_wait(
                    client,
                    &resource,
                    Some(SHOP_NS),
                    "checkout-slow",
                    Duration::from_secs(30),
                )
                .await?;
                Ok(((), format!("{reason}: {message}")))
            },
        )
        .await?;

    // Keep inventory under load while its profile arrives and the window changes.
    let inventory =
        ready_pods(client, SHOP_NS, "app=inventory", 1, Duration::from_secs(30)).await?;
    let inventory_pod = inventory.keys().next().cloned().context("inventory pod")?;
    let inventory_load = start_load(settings, client, &inventory, "b", 40, 20).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    suite
        .step("hot reload: a new profile's pod traced within 5 s", Duration::from_secs(60), async {
            let applied = SystemTime::now();
            apply(client, &profile_manifest("inventory", "inventory", "5s")).await?;
            let traced_at = wait_for("the agent's selection to add the inventory pod", Duration::from_secs(30), || async {
                Ok(match agent_logged_after(client, &agent, applied, |l| selection_with_pods(l, 3)).await? {
                    Some(at) => Seen::Done(at),
                    None => Seen::NotYet("no 'selection updated pods=3' line yet".into()),
                })
            })
            .await?;
            let delay = traced_at.duration_since(applied).unwrap_or_default();
            let first_window = wait_for("a window of the inventory pod on the feed", Duration::from_secs(25), || async {
                let windows = pod_windows(&feed, &inventory_pod);
                Ok(match windows.first() {
                    Some(w) => Seen::Done(w["end_unix_ms"].as_u64().unwrap_or_default()),
                    None => Seen::NotYet("none".into()),
                })
            })
            .await?;
            ensure!(delay <= Duration::from_secs(5), "the pod was traced {:.2} s after kubectl apply (goal ≤ 5 s)", delay.as_secs_f64());
            // Stays traced: no later selection without it (the stale mounted file must not win).
            tokio::time::sleep(Duration::from_secs(3)).await;
            let lines = logs_since(client, SYSTEM_NS, &agent, traced_at).await?;
            let dropped: Vec<&String> = lines.iter().filter(|(at, l)| *at > traced_at && l.contains("selection updated") && !selection_with_pods(l, 3)).map(|(_, l)| l).collect();
            ensure!(dropped.is_empty(), "the agent changed its selection again after tracing the new pod: {dropped:?}");
            Ok(((), format!(
                "apply → agent tracing the pod: {:.2} s (kubelet log timestamps); its first window closed {:.1} s after apply",
                delay.as_secs_f64(),
                (first_window as f64 - unix_ms(applied) as f64) / 1000.0
            )))
        })
        .await?;

    suite
        .step(
            "hot reload: a changed window takes effect within 5 s",
            Duration::from_secs(60),
            async {
                let applied = SystemTime::now();
                apply(client, &profile_manifest("inventory", "inventory", "2s")).await?;
                let first = wait_for(
                    "a 2 s window of the inventory pod",
                    Duration::from_secs(30),
                    || async {
                        let windows = pod_windows(&feed, &inventory_pod);
                        Ok(
                            match windows.iter().find(|w| {
                                let (start, end) = (
                                    w["start_unix_ms"].as_u64().unwrap_or_default(),
                                    w["end_unix_ms"].as_u64().unwrap_or_default(),
                                );
                                end - start == 2000 && end > unix_ms(applied)
                            }) {
                                Some(w) => {
                                    Seen::Done(w["end_unix_ms"].as_u64().unwrap_or_default())
                                }
                                None => Seen::NotYet(format!(
                                    "windows of {}",
                                    windows
                                        .last()
                                        .map(|w| w["end_unix_ms"].as_u64().unwrap_or_default()
                                            - w["start_unix_ms"].as_u64().unwrap_or_default())
                                        .unwrap_or_default()
                                )),
                            },
                        )
                    },
                )
                .await?;
                let took = (first as f64 - unix_ms(applied) as f64) / 1000.0;
                ensure!(
                    took <= 5.0,
                    "the first 2 s window closed {took:.2} s after apply (goal ≤ 5 s)"
                );
                // And it stays: the kubelet's copy of the ConfigMap, which lags by up to a
                // minute, must not take the agent back to the old window meanwhile.
                tokio::time::sleep(Duration::from_secs(12)).await;
                let lengths: Vec<u64> = pod_windows(&feed, &inventory_pod)
                    .iter()
                    .filter(|w| w["start_unix_ms"].as_u64().unwrap_or_default() >= first)
                    .map(|w| {
                        w["end_unix_ms"].as_u64().unwrap_or_default()
                            - w["start_unix_ms"].as_u64().unwrap_or_default()
                    })
                    .collect();
                ensure!(
                    lengths.len() >= 4 && lengths.iter().all(|&l| l == 2000),
                    "after the first 2 s window the windows must stay 2 s long; their lengths (ms): {lengths:?}"
                );
                Ok((
                    (),
                    format!(
                        "first 2 s window closed {took:.2} s after kubectl apply; the {} windows of the next 12 s all 2 s",
                        lengths.len()
                    ),
                ))
            },
        )
        .await?;
    finish_load(client, &inventory_load, Duration::from_secs(60)).await?;

    suite
        .step("no window lost when the agent pod is deleted (spool on the node)", Duration::from_secs(180), async {
            let (new_agent, back) = delete_under_load(settings, client, &checkout, "c", &agent, AGENT_SELECTOR).await?;
            let (windows, repeats) = no_gaps(&feed)?;
            // The new agent pod resumed the spool: same boot id, the sequence going on, so
            // what the old pod closed but had not delivered is still in that one sequence.
            let boots: BTreeSet<String> = feed.with_log(|log| log.windows.keys().filter(|(a, _, _)| *a == node_name).map(|(_, boot, _)| boot.clone()).collect());
            ensure!(boots.len() == 1, "the agent on {node_name} sent under {} boot ids {boots:?}: the new pod did not resume the spool", boots.len());
            Ok(((), format!("agent {agent} deleted, {new_agent} Ready after {:.1} s and resumed its spool (one boot id); {windows} windows, no sequence gap; {repeats} repeated", back.as_secs_f64())))
        })
        .await?;

    suite
        .step("no window lost when the collector pod is deleted (state dir, agents resend)", Duration::from_secs(180), async {
            let old = ready_pods(client, SYSTEM_NS, COLLECTOR_SELECTOR, 1, Duration::from_secs(10)).await?;
            let old_name = old.keys().next().cloned().context("collector pod")?;
            let (new_name, back) = delete_under_load(settings, client, &checkout, "d", &old_name, COLLECTOR_SELECTOR).await?;
            let (windows, repeats) = no_gaps(&feed)?;
            let read_from = feed.with_log(|log| log.collectors.clone());
            ensure!(read_from.contains(&new_name), "the feed never reached the new collector {new_name}: read from {read_from:?}");
            Ok(((), format!("collector {old_name} deleted, {new_name} Ready after {:.1} s; {windows} windows, no sequence gap; {repeats} repeated (feed read from {read_from:?})", back.as_secs_f64())))
        })
        .await?;

    suite
        .step("operator failover: the standby leads within 15 s", Duration::from_secs(90), async {
            let lease = leases.get(trazor_operator::leader::LEASE_NAME).await?;
            let leader = lease.spec.and_then(|s| s.holder_identity).context("the Lease has no holder")?;
            let owners = lease.metadata.owner_references.unwrap_or_default();
            ensure!(owners.iter().any(|o| o.kind == "Deployment"), "the Lease is not owned by the operator Deployment: {owners:?}");
            let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NS);
            pods.delete(&leader, &Default::default()).await?;
            let deleted = Instant::now();
            let new_leader = wait_for("another operator replica holding the Lease", Duration::from_secs(15), || async {
                let lease = leases.get(trazor_operator::leader::LEASE_NAME).await?;
                let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                Ok(if !holder.is_empty() && holder != leader {
                    Seen::Done(holder)
                } else {
                    Seen::NotYet(format!("holder {holder:?}"))
                })
            })
            .await?;
            let took = deleted.elapsed();
            // The new leader reconciles: a changed profile gets its observedGeneration.
            let applied = apply(client, &profile_manifest("inventory", "inventory", "3s")).await?;
            let generation = applied.metadata.generation.unwrap_or_default();
            wait_for("the new leader to reconcile the changed profile", Duration::from_secs(30), || async {
                let profile = profiles.get("inventory").await?;
                let observed = profile.status.and_then(|s| s.observed_generation).unwrap_or_default();
                Ok(if observed >= generation { Seen::Done(()) } else { Seen::NotYet(format!("observedGeneration {observed} < {generation}")) })
            })
            .await?;
            Ok(((), format!("{leader} deleted; {new_leader} holds the Lease after {:.1} s and reconciles", took.as_secs_f64())))
        })
        .await?;

    suite
        .step("least privilege (SubjectAccessReview, as kubectl auth can-i)", Duration::from_secs(60), async {
            let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
            let can = |account: &str, verb: &str, group: &str, resource: &str, namespace: Option<&str>, name: Option<&str>| {
                let (resource, subresource) = resource.split_once('/').map_or((resource, None), |(r, s)| (r, Some(s)));
                let review = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: Some(format!("system:serviceaccount:{SYSTEM_NS}:{account}")),
                        groups: Some(vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{SYSTEM_NS}"), "system:authenticated".into()]),
                        resource_attributes: Some(ResourceAttributes {
                            verb: Some(verb.to_owned()),
                            group: Some(group.to_owned()),
                            resource: Some(resource.to_owned()),
                            subresource: subresource.map(str::to_owned),
                            namespace: namespace.map(str::to_owned),
                            name: name.map(str::to_owned),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let reviews = reviews.clone();
                async move {
                    let answer = reviews.create(&PostParams::default(), &review).await?;
                    Ok::<bool, anyhow::Error>(answer.status.is_some_and(|s| s.allowed))
                }
            };
            let accounts = [("trazor-operator", trazor_operator::rbac::API_CALLS), ("trazor-node-agent", trazor_node_agent::rbac::API_CALLS)];
            let mut allowed = 0;
            for (account, calls) in accounts {
                for call in calls.iter() {
                    let ApiCall { group, resource, verb, scope, name, .. } = *call;
                    let namespace = match scope { Scope::OwnNamespace => Some(SYSTEM_NS), Scope::Cluster => None };
                    let name = match name {
                        ObjectName::Any => None,
                        ObjectName::Exactly(name) => Some(name.to_owned()),
                        ObjectName::FromFlag(_) => Some("trazor-operator".to_owned()),
                    };
                    ensure!(
                        can(account, verb.as_str(), group, resource, namespace, name.as_deref()).await?,
                        "{account} may not {verb} {group}/{resource} {namespace:?} {name:?}, which its code does"
                    );
                    allowed += 1;
                }
            }
            let denied = [
                ("trazor-operator", "list", "", "secrets", None, None),
                ("trazor-operator", "delete", "", "pods", Some(SHOP_NS), None),
                ("trazor-operator", "patch", "", "configmaps", Some(SYSTEM_NS), Some("something-else")),
                ("trazor-operator", "delete", "apps", "daemonsets", Some(SYSTEM_NS), Some("trazor-node-agent")),
                ("trazor-operator", "create", "apps", "deployments", Some(SHOP_NS), None),
                ("trazor-node-agent", "get", "", "secrets", Some(SYSTEM_NS), None),
                ("trazor-node-agent", "patch", "", "configmaps", Some(SYSTEM_NS), Some("trazor-node-agent-config")),
                ("trazor-node-agent", "create", "", "pods", Some(SHOP_NS), None),
                ("trazor-node-agent", "list", "", "nodes", None, None),
                ("trazor-collector", "list", "", "pods", None, None),
            ];
            for (account, verb, group, resource, namespace, name) in denied {
                ensure!(
                    !can(account, verb, group, resource, namespace, name).await?,
                    "{account} may {verb} {group}/{resource} {namespace:?} {name:?}, which it does not need"
                );
            }
            Ok(((), format!("{allowed} calls the code makes allowed; {} unneeded ones denied", denied.len())))
        })
        .await?;

    suite
        .step("deleting the profiles stops tracing and detaches the programs", Duration::from_secs(120), async {
            let agent = the_agent(client).await?;
            let resource = resource_of(client, "trazor.dev/v1alpha1", "TraceProfile").await?;
            for name in ["checkout", "inventory"] {
                delete_and_wait(client, &resource, Some(SHOP_NS), name, Duration::from_secs(30)).await?;
            }
            let deleted = SystemTime::now();
            wait_for("the agent's programs off their tracepoints", Duration::from_secs(30), || async {
                let (_, metrics) = http_get(client, SYSTEM_NS, &agent, 9464, "/metrics").await?;
                Ok(match metric_value(&metrics, "trazor_agent_ebpf_programs_on_tracepoints") {
                    Some(0.0) => Seen::Done(()),
                    other => Seen::NotYet(format!("trazor_agent_ebpf_programs_on_tracepoints {other:?}")),
                })
            })
            .await?;
            let generators = start_load(settings, client, &checkout, "e", 10, 40).await?;
            finish_load(client, &generators, Duration::from_secs(60)).await?;
            tokio::time::sleep(Duration::from_secs(7)).await;
            let after: Vec<Value> = feed.windows(|w| w["start_unix_ms"].as_u64().unwrap_or_default() >= unix_ms(deleted) + 1000);
            ensure!(after.is_empty(), "{} windows after the profiles were deleted, e.g. {}", after.len(), after[0]);
            Ok(((), "no window for 10 s of load after the deletion; trazor_agent_ebpf_programs_on_tracepoints 0".to_owned()))
        })
        .await?;

    suite
        .step(
            "helm uninstall leaves no DaemonSet, ConfigMap or Lease",
            Duration::from_secs(180),
            async {
                helm(
                    settings,
                    &[
                        "uninstall",
                        RELEASE,
                        "-n",
                        SYSTEM_NS,
                        "--wait",
                        "--timeout",
                        "120s",
                    ],
                )
                .await?;
                let gone = Instant::now();
                let daemonsets = resource_of(client, "apps/v1", "DaemonSet").await?;
                let configmaps = resource_of(client, "v1", "ConfigMap").await?;
                wait_for(
                    "the operator's DaemonSet, ConfigMap and Lease garbage-collected",
                    Duration::from_secs(120),
                    || async {
                        let mut left = Vec::new();
                        let ds: Api<kube::api::DynamicObject> =
                            Api::namespaced_with(client.clone(), SYSTEM_NS, &daemonsets);
                        if ds.get_opt("trazor-node-agent").await?.is_some() {
                            left.push("DaemonSet trazor-node-agent");
                        }
                        let cm: Api<kube::api::DynamicObject> =
                            Api::namespaced_with(client.clone(), SYSTEM_NS, &configmaps);
                        if cm.get_opt("trazor-node-agent-config").await?.is_some() {
                            left.push("ConfigMap trazor-node-agent-config");
                        }
                        if leases
                            .get_opt(trazor_operator::leader::LEASE_NAME)
                            .await?
                            .is_some()
                        {
                            left.push("Lease trazor-operator-leader");
                        }
                        let pods =
                            running_pods(client, SYSTEM_NS, "app.kubernetes.io/part-of=trazor")
                                .await?;
                        if !pods.is_empty() {
                            left.push("Trazor pods");
                        }
                        Ok(if left.is_empty() {
                            Seen::Done(())
                        } else {
                            Seen::NotYet(left.join(", "))
                        })
                    },
                )
                .await?;
                Ok((
                    (),
                    format!(
                        "all gone {:.1} s after helm uninstall returned",
                        gone.elapsed().as_secs_f64()
                    ),
                ))
            },
        )
        .await?;

    drop(feed);
    drop(receiver);
    let namespaces = resource_of(client, "v1", "Namespace").await?;
    for namespace in [SHOP_NS, SYSTEM_NS] {
        delete_and_wait(
            client,
            &namespaces,
            None,
            namespace,
            Duration::from_secs(120),
        )
        .await?;
    }
    Ok(())
}
