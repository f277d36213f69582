//! Profile-driven selection and Kubernetes attribution, without a cluster: the test builds a
//! kubelet-like cgroup v2 hierarchy (systemd driver, containerd), moves two sample servers
//! into two "pods", describes the pods in a pods file, and gives the agent the operator's
//! configuration document. Then it rewrites that document under the running agent and checks
//! the new selection takes effect with no window lost; and that a profile's ports and
//! direction narrow what is traced of the pods it selects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use trazor_collector::{BoundCollector, CollectorConfig};
use trazor_e2e::{HttpClient, SampleServer, require_ebpf_privileges};
use trazor_node_agent::{
    AgentConfig, agent::ProfileSource, attribute::cgroup2_mount, capture::PROGRAMS, pods::PodSource,
};

const SAMPLE_SERVER: &str = env!("CARGO_BIN_EXE_trazor-sample-server");
const SAMPLE_CLIENT: &str = env!("CARGO_BIN_EXE_trazor-sample-client");

/// One agent at a time: the first test counts the eBPF links this process holds.
static AGENT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A pod's cgroups as the kubelet (systemd driver) and containerd lay them out; removed on
/// drop, after moving its processes back to the root cgroup.
struct PodCgroup {
    root: PathBuf,
    pod: PathBuf,
    container: PathBuf,
}

impl PodCgroup {
    fn create(root: &Path, uid: &str, container_id: &str) -> Self {
        let pod = root.join(format!(
            "trazor-e2e-kubepods.slice/trazor-e2e-kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ));
        let container = pod.join(format!("cri-containerd-{container_id}.scope"));
        std::fs::create_dir_all(&container).expect("creating cgroups under the cgroup2 mount");
        Self {
            root: root.to_path_buf(),
            pod,
            container,
        }
    }

    fn adopt(&self, pid: u32) {
        std::fs::write(self.container.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.container.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.container);
        let _ = std::fs::remove_dir(&self.pod);
        // The shared parents go once empty (the other pod may still hold them).
        for parent in self.pod.ancestors().skip(1).take(2) {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

async fn wait_for_generation(agent: &trazor_node_agent::RunningAgent, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.config_generation.load(Ordering::Relaxed) < generation {
        assert!(
            Instant::now() < deadline,
            "the agent did not reload its configuration"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// BPF links to raw tracepoints held by this process (the agent runs in it): the kernel's
/// own account of what is attached, from the links' fdinfo.
fn raw_tracepoint_links() -> usize {
    std::fs::read_dir("/proc/self/fdinfo")
        .unwrap()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|info| {
            info.lines()
                .any(|line| line.split_whitespace().eq(["link_type:", "raw_tracepoint"]))
        })
        .count()
}

fn profile_document(app: &str, window_seconds: u32) -> String {
    json!({
        "version": 1,
        "profiles": [{
            "namespace": "shop",
            "name": app,
            "matchLabels": {"app": app},
            "windowSeconds": window_seconds,
            "percentiles": [0.5, 0.99],
        }]
    })
    .to_string()
}

fn pod(name: &str, uid: &str, app: &str, container_id: &str) -> Value {
    json!({
        "namespace": "shop",
        "name": name,
        "uid": uid,
        "labels": {"app": app},
        "containers": [{"name": "server", "id": container_id}],
        "workloadKind": "Deployment",
        "workloadName": app,
    })
}

/// Replaces a file the way the kubelet updates a mounted ConfigMap: write aside, rename.
fn replace_file(path: &Path, contents: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn send(address: SocketAddr, count: u64) {
    let mut client = HttpClient::new(address);
    for n in 0..count {
        assert_eq!(
            client.get(&format!("/orders/{n}"), n % 4 != 0).unwrap(),
            200
        );
    }
}

/// Windows on the feed, by pod name, until `until` says enough (or the timeout).
async fn read_feed(
    feed: &mut (
             impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin
         ),
    windows: &mut Vec<Value>,
    timeout: Duration,
    until: impl Fn(&[Value]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !until(windows) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, feed.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let window: Value = serde_json::from_str(&text).unwrap();
                if window["type"] == "window" {
                    windows.push(window);
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("feed ended or timed out ({other:?}); windows so far: {windows:#?}"),
        }
    }
}

/// Waits `window` (a window length and some), then takes what the feed has by then.
async fn read_one_more_window(
    feed: &mut (
             impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin
         ),
    windows: &mut Vec<Value>,
    window: Duration,
) {
    tokio::time::sleep(window).await;
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while let Some(Ok(Message::Text(text))) = feed.next().await {
            let window: Value = serde_json::from_str(&text).unwrap();
            if window["type"] == "window" {
                windows.push(window);
            }
        }
    })
    .await;
}

/// A collector on loopback, serving: (its gRPC address for the agent, its feed's URL).
async fn start_collector() -> (SocketAddr, String) {
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let collector = BoundCollector::bind(&CollectorConfig {
        grpc_listen: loopback,
        http_listen: loopback,
        history: 10_000,
        ..Default::default()
    })
    .await
    .unwrap();
    let addresses = (
        collector.grpc_addr(),
        format!("ws://{}/ws", collector.http_addr()),
    );
    tokio::spawn(collector.serve());
    addresses
}

/// An agent in profile mode, reading the operator's document and the pods from files.
async fn start_agent(
    collector: SocketAddr,
    config_file: &Path,
    pods_file: &Path,
) -> trazor_node_agent::RunningAgent {
    let mut config = AgentConfig::new(format!("http://{collector}"), "e2e-node");
    config.profiles = Some(ProfileSource {
        config_file: config_file.to_path_buf(),
        pods: PodSource::File(pods_file.to_path_buf()),
        config_map: None,
    });
    trazor_node_agent::start(config)
        .await
        .expect("the agent starts")
}

fn total_for(windows: &[Value], pod_name: &str) -> u64 {
    windows
        .iter()
        .filter(|w| w["pod"]["name"] == pod_name)
        .map(|w| w["count"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_select_pods_by_label_and_reload_without_losing_a_window() {
    if !require_ebpf_privileges("profiles_select_pods_by_label_and_reload_without_losing_a_window")
    {
        return;
    }
    let _serial = AGENT.lock().await;
    let root = cgroup2_mount().expect("a cgroup2 mount (see /proc/self/mountinfo)");
    let (uid_a, uid_b) = (
        "11111111-2222-4333-8444-555555555555",
        "66666666-7777-4888-9999-aaaaaaaaaaaa",
    );
    let (container_a, container_b) = ("aaaa0001", "bbbb0002");
    let cgroup_a = PodCgroup::create(&root, uid_a, container_a);
    let cgroup_b = PodCgroup::create(&root, uid_b, container_b);

    let work = std::env::temp_dir().join(format!("trazor-e2e-profiles-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let config_file = work.join("agent-config.json");
    let pods_file = work.join("pods.json");
    replace_file(&config_file, &profile_document("checkout", 1));
    replace_file(
        &pods_file,
        &json!([
            pod("checkout-5d8f7c9b4-x2x7q", uid_a, "checkout", container_a),
            pod("inventory-7c4b9d6f8-k9k2m", uid_b, "inventory", container_b),
        ])
        .to_string(),
    );

    let (grpc, feed_url) = start_collector().await;
    let agent = start_agent(grpc, &config_file, &pods_file).await;
    assert_eq!(agent.config_generation.load(Ordering::Relaxed), 1);

    let server_a = SampleServer::start(Path::new(SAMPLE_SERVER), &["--delay", "5ms"]).unwrap();
    let server_b = SampleServer::start(Path::new(SAMPLE_SERVER), &["--delay", "5ms"]).unwrap();
    cgroup_a.adopt(server_a.pid());
    cgroup_b.adopt(server_b.pid());
    // The cgroups existed before the agent started, so its first look at the pods file
    // (within a poll) selects checkout's container cgroup.
    tokio::time::sleep(Duration::from_millis(1000)).await;

    const REQUESTS: u64 = 20;
    let (a, b) = (server_a.address, server_b.address);
    tokio::task::spawn_blocking(move || {
        send(a, REQUESTS);
        send(b, REQUESTS);
    })
    .await
    .unwrap();

    let (mut feed, _) = tokio_tungstenite::connect_async(&feed_url).await.unwrap();
    let mut windows = Vec::new();
    read_feed(&mut feed, &mut windows, Duration::from_secs(15), |w| {
        total_for(w, "checkout-5d8f7c9b4-x2x7q") >= REQUESTS
    })
    .await;
    assert_eq!(total_for(&windows, "checkout-5d8f7c9b4-x2x7q"), REQUESTS);
    let checkout = windows
        .iter()
        .find(|w| w["pod"]["name"] == "checkout-5d8f7c9b4-x2x7q")
        .unwrap();
    assert_eq!(checkout["pod"]["namespace"], "shop");
    assert_eq!(checkout["pod"]["uid"], uid_a);
    assert_eq!(checkout["pod"]["container"], "server");
    assert_eq!(checkout["pod"]["workload_kind"], "Deployment");
    assert_eq!(checkout["pod"]["workload_name"], "checkout");
    assert_eq!(checkout["profile"], "shop/checkout");
    assert_eq!(checkout["route"], "/orders/{id}");
    assert!(
        checkout["cgroup_path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("cri-containerd-{container_a}.scope"))
    );

    // Reload: select inventory instead, with 2 s windows, under the running agent.
    replace_file(&config_file, &profile_document("inventory", 2));
    wait_for_generation(&agent, 2).await;
    tokio::task::spawn_blocking(move || {
        send(a, REQUESTS);
        send(b, REQUESTS);
    })
    .await
    .unwrap();
    read_feed(&mut feed, &mut windows, Duration::from_secs(15), |w| {
        total_for(w, "inventory-7c4b9d6f8-k9k2m") >= REQUESTS
    })
    .await;
    // Let one more window close, so a stray checkout window would have shown up.
    read_one_more_window(&mut feed, &mut windows, Duration::from_millis(2500)).await;

    assert_eq!(total_for(&windows, "inventory-7c4b9d6f8-k9k2m"), REQUESTS);
    assert_eq!(
        total_for(&windows, "checkout-5d8f7c9b4-x2x7q"),
        REQUESTS,
        "after the reload, checkout is no longer traced"
    );
    let inventory = windows
        .iter()
        .find(|w| w["pod"]["name"] == "inventory-7c4b9d6f8-k9k2m")
        .unwrap();
    assert_eq!(inventory["profile"], "shop/inventory");
    assert_eq!(
        inventory["end_unix_ms"].as_u64().unwrap() - inventory["start_unix_ms"].as_u64().unwrap(),
        2_000,
        "the new window length applies"
    );
    // No window lost across the reload: this agent's sequences are 1..=n without a gap.
    let sequences: BTreeSet<u64> = windows
        .iter()
        .map(|w| w["sequence"].as_u64().unwrap())
        .collect();
    let expected: BTreeSet<u64> = (1..=*sequences.last().unwrap()).collect();
    assert_eq!(sequences, expected, "window sequences are contiguous");
    let by_pod: HashMap<String, u64> = windows.iter().fold(HashMap::new(), |mut acc, w| {
        *acc.entry(w["pod"]["name"].to_string()).or_default() += 1;
        acc
    });
    assert_eq!(
        by_pod.len(),
        2,
        "only the two pods were ever traced: {by_pod:?}"
    );

    // A profile that selects no pod on this node: the programs are detached (the node pays
    // nothing), and attached again when a pod is selected.
    assert_eq!(
        raw_tracepoint_links(),
        PROGRAMS.len(),
        "attached while inventory is selected"
    );
    replace_file(&config_file, &profile_document("nobody", 2));
    wait_for_generation(&agent, 3).await;
    assert_eq!(raw_tracepoint_links(), 0, "detached with nothing selected");
    replace_file(&config_file, &profile_document("checkout", 2));
    wait_for_generation(&agent, 4).await;
    assert_eq!(raw_tracepoint_links(), PROGRAMS.len(), "attached again");

    drop(agent);
    drop((server_a, server_b));
    drop((cgroup_a, cgroup_b));
    let _ = std::fs::remove_dir_all(&work);
}

/// A profile with `ports` and a direction: of two servers in one pod, only the one on a
/// listed port is traced (the other's responses don't count as lost requests either), and
/// a client in the same pod is not traced at all (the profile measures the server side).
/// When the profile lists the other port instead, keep-alive connections already open
/// follow the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_traces_only_its_ports_and_direction() {
    if !require_ebpf_privileges("a_profile_traces_only_its_ports_and_direction") {
        return;
    }
    let _serial = AGENT.lock().await;
    let root = cgroup2_mount().expect("a cgroup2 mount (see /proc/self/mountinfo)");
    let uid = "77777777-8888-4999-aaaa-bbbbbbbbbbbb";
    let container = "cccc0003";
    let cgroup = PodCgroup::create(&root, uid, container);
    let listed = SampleServer::start(Path::new(SAMPLE_SERVER), &["--delay", "2ms"]).unwrap();
    let other = SampleServer::start(Path::new(SAMPLE_SERVER), &["--delay", "2ms"]).unwrap();
    cgroup.adopt(listed.pid());
    cgroup.adopt(other.pid());

    let work = std::env::temp_dir().join(format!("trazor-e2e-ports-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let config_file = work.join("agent-config.json");
    let pods_file = work.join("pods.json");
    let document = |port: u16| {
        json!({
            "version": 1,
            "profiles": [{
                "namespace": "shop",
                "name": "payments",
                "matchLabels": {"app": "payments"},
                "ports": [port],
                "direction": "server",
                "windowSeconds": 1,
            }]
        })
        .to_string()
    };
    replace_file(&config_file, &document(listed.address.port()));
    replace_file(
        &pods_file,
        &json!([pod("payments-6b9f8d7c5-p4q8r", uid, "payments", container)]).to_string(),
    );
    let (grpc, feed_url) = start_collector().await;
    let agent = start_agent(grpc, &config_file, &pods_file).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // A client in the pod: its first request goes out before it joins the pod's cgroup,
    // the 10 after its pause from inside.
    let client = std::process::Command::new(SAMPLE_CLIENT)
        .arg("--target")
        .arg(listed.address.to_string())
        .args(["--path", "/made/1", "--requests", "11"])
        .args(["--pause-after-first", "1s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cgroup.adopt(client.id());
    let (a, b) = (listed.address, other.address);
    // And a keep-alive connection to each server, 5 requests each.
    let (kept_a, kept_b) = tokio::task::spawn_blocking(move || {
        send(a, 20);
        send(b, 20);
        let (mut kept_a, mut kept_b) = (HttpClient::new(a), HttpClient::new(b));
        for n in 0..5 {
            assert_eq!(kept_a.get(&format!("/kept/{n}"), true).unwrap(), 200);
            assert_eq!(kept_b.get(&format!("/kept/{n}"), true).unwrap(), 200);
        }
        (kept_a, kept_b)
    })
    .await
    .unwrap();
    let client_report = tokio::task::spawn_blocking(move || client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let report = String::from_utf8_lossy(&client_report.stdout);
    assert!(report.contains("\"ok\":11"), "sample client: {report}");

    // The other port instead, under the running agent; 5 more requests on each kept
    // connection.
    replace_file(&config_file, &document(other.address.port()));
    wait_for_generation(&agent, 2).await;
    tokio::task::spawn_blocking(move || {
        let (mut kept_a, mut kept_b) = (kept_a, kept_b);
        for n in 5..10 {
            assert_eq!(kept_a.get(&format!("/kept/{n}"), true).unwrap(), 200);
            assert_eq!(kept_b.get(&format!("/kept/{n}"), true).unwrap(), 200);
        }
    })
    .await
    .unwrap();

    let (mut feed, _) = tokio_tungstenite::connect_async(&feed_url).await.unwrap();
    let mut windows = Vec::new();
    let (listed_pid, other_pid) = (u64::from(listed.pid()), u64::from(other.pid()));
    let served = |windows: &[Value], pid: u64| {
        windows
            .iter()
            .filter(|w| w["pid"] == pid && w["direction"] == "server")
            .map(|w| w["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    read_feed(&mut feed, &mut windows, Duration::from_secs(15), |w| {
        served(w, listed_pid) >= 36 && served(w, other_pid) >= 5
    })
    .await;
    // Let one more window close, so a stray window would have shown up.
    read_one_more_window(&mut feed, &mut windows, Duration::from_millis(2200)).await;
    assert_eq!(
        served(&windows, listed_pid),
        36,
        "20 sent by the test, 11 by the client, 5 kept-alive before the change"
    );
    assert_eq!(
        served(&windows, other_pid),
        5,
        "the kept-alive requests after the change"
    );
    let strays: Vec<&Value> = windows
        .iter()
        .filter(|w| w["direction"] != "server")
        .collect();
    assert!(
        strays.is_empty(),
        "only the server side is traced: {strays:#?}"
    );
    let lost = agent
        .telemetry
        .kernel_drops()
        .into_iter()
        .find(|(reason, _)| *reason == "response_without_request")
        .unwrap()
        .1;
    assert_eq!(
        lost, 0,
        "responses on an unlisted port are not lost requests"
    );

    drop(agent);
    drop((listed, other));
    drop(cgroup);
    let _ = std::fs::remove_dir_all(&work);
}
