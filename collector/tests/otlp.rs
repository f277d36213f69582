//! OTLP export against a receiver we did not write: oteltap (installed by
//! scripts/setup.sh) receives the collector's OTLP/HTTP requests and re-emits each to
//! `otlp_receiver.py`, which decodes it with the official opentelemetry-proto package and
//! prints each metric and span as JSON with its resource. And the failure paths against a
//! port that refuses and a receiver that says 400.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    assert_line, collector, metrics_once, pod_window, send, window_by_status, window_end,
    with_exemplars,
};
use trazor_collector::otlp::{
    DURATION_BOUNDARIES, HistogramAggregation, OtlpConfig, RESPONSES_METRIC, SERVER_DURATION_METRIC,
};
use trazor_proto::v1::{AgentMessage, Exemplar, PodIdentity, Source, agent_message};

mod common;

/// Where scripts/setup.sh installs oteltap; `TRAZOR_OTLP_PYTHON` overrides it.
fn receiver_python() -> PathBuf {
    if let Some(python) = std::env::var_os("TRAZOR_OTLP_PYTHON") {
        return python.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    PathBuf::from(home).join(".cache/trazor/otlp-venv/bin/python")
}

/// The oteltap receiver, killed on drop; its stdout gives one JSON line per metric and per
/// span, each with its resource.
struct Receiver {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Items read while looking for another kind, oldest first.
    pending: VecDeque<serde_json::Value>,
    port: u16,
}

impl Receiver {
    fn start() -> Self {
        let python = receiver_python();
        assert!(
            python.exists(),
            "{} is missing: this test needs the oteltap OTLP receiver that scripts/setup.sh \
             installs (run it, or point TRAZOR_OTLP_PYTHON at a python with oteltap)",
            python.display()
        );
        let port = free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp_receiver.py");
        let mut child = Command::new(&python)
            .arg(script)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the OTLP receiver did not start (see its output above)");
        assert_eq!(first, "listening");
        Self {
            child,
            lines,
            pending: VecDeque::new(),
            port,
        }
    }

    /// The next metric named `name` and its resource's attributes, leaving others for
    /// later.
    fn metric(&mut self, name: &str) -> (serde_json::Value, Attributes) {
        let item = self.next(&format!("{name} metric"), |item| {
            item["metric"]["name"] == name
        });
        (item["metric"].clone(), attributes(&item["resource"]))
    }

    /// The points of metric `name` by resource, read until there are `points` of them:
    /// each resource once, as one request carries each entity once.
    fn points_by_resource(
        &mut self,
        name: &str,
        points: usize,
    ) -> BTreeMap<Attributes, Vec<serde_json::Value>> {
        let mut by_resource = BTreeMap::new();
        let mut seen = 0;
        while seen < points {
            let (metric, resource) = self.metric(name);
            let data = metric
                .as_object()
                .unwrap()
                .values()
                .find_map(|value| value["data_points"].as_array())
                .unwrap_or_else(|| panic!("{name} has no data points: {metric}"))
                .clone();
            seen += data.len();
            if let Some(earlier) = by_resource.insert(resource.clone(), data) {
                panic!("{name}: resource {resource:?} came twice (first with {earlier:?})");
            }
        }
        by_resource
    }

    /// The next span and its resource (attribute values as text).
    fn span(&mut self) -> (serde_json::Value, Attributes) {
        let item = self.next("span", |item| !item["span"].is_null());
        (item["span"].clone(), attributes(&item["resource"]))
    }

    /// Keeps every item printed so far in `pending`.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.pending.push_back(serde_json::from_str(&line).unwrap());
        }
    }

    /// The first item, read before or within 20 s, that `wanted` picks; the others stay for
    /// later calls.
    fn next(
        &mut self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        if let Some(position) = self.pending.iter().position(&wanted) {
            return self.pending.remove(position).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what} reached the receiver"));
            let item: serde_json::Value = serde_json::from_str(&line).unwrap();
            if wanted(&item) {
                return item;
            }
            self.pending.push_back(item);
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A timestamp: a 64-bit integer, which protobuf's JSON mapping writes as a string (and
/// which an f64 cannot hold to the nanosecond).
fn nanos(value: &serde_json::Value) -> u64 {
    value.as_str().unwrap().parse().unwrap()
}

/// A JSON number or, as protobuf's JSON mapping writes 64-bit integers, a string.
fn number(value: &serde_json::Value) -> f64 {
    match value {
        serde_json::Value::String(text) => text.parse().unwrap(),
        other => other
            .as_f64()
            .unwrap_or_else(|| panic!("not a number: {other}")),
    }
}

/// Attributes by key, values as text.
type Attributes = BTreeMap<String, String>;

/// The attributes of a point, span or resource; integers as text.
fn attributes(item: &serde_json::Value) -> Attributes {
    item["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|attribute| {
            let value = &attribute["value"];
            let text = match (value["string_value"].as_str(), &value["int_value"]) {
                (Some(text), _) => text.to_owned(),
                (None, serde_json::Value::String(number)) => number.clone(),
                _ => panic!("unexpected attribute value: {attribute}"),
            };
            (attribute["key"].as_str().unwrap().to_owned(), text)
        })
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> Attributes {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

/// A resource: the entity's `pairs`, and what produced it (`telemetry.sdk.*`).
fn resource(pairs: &[(&str, &str)]) -> Attributes {
    let mut attributes = map(pairs);
    attributes.extend(map(&[
        ("telemetry.sdk.name", "trazor"),
        ("telemetry.sdk.language", "rust"),
        ("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
    ]));
    attributes
}

/// The resource of Deployment shop/checkout, as its metrics carry it.
fn checkout_resource() -> Attributes {
    resource(&[
        ("service.name", "checkout"),
        ("service.namespace", "shop"),
        ("k8s.namespace.name", "shop"),
        ("k8s.deployment.name", "checkout"),
        ("trazor.workload.kind", "Deployment"),
        ("trazor.workload.name", "checkout"),
    ])
}

/// A `pod_window` (GET /cart/{id} served) measured at `source` instead.
fn window_at(
    source: Source,
    sequence: u64,
    end: u64,
    buckets: &[(i32, u64)],
    classes: &[u64],
) -> AgentMessage {
    let mut message = pod_window(sequence, "unused", end, buckets, classes);
    let Some(agent_message::Kind::Window(window)) = &mut message.kind else {
        panic!("not a window");
    };
    window.source = Some(source);
    message
}

fn pod_source(namespace: &str, pod: &str, container: &str, owner: (&str, &str)) -> Source {
    Source {
        node_name: format!("node-of-{pod}"),
        pod: Some(PodIdentity {
            namespace: namespace.into(),
            name: pod.into(),
            uid: format!("uid-{pod}"),
            container: container.into(),
            workload_kind: owner.0.into(),
            workload_name: owner.1.into(),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_reach_a_real_otlp_receiver_exactly() {
    let mut receiver = Receiver::start();
    let (grpc, stats) = collector(OtlpConfig::new(format!(
        "http://127.0.0.1:{}",
        receiver.port
    )))
    .await;
    let end = window_end();
    // Four entities in one window, so their points leave in one request: Deployment
    // shop/checkout (two pods on two nodes, merged into one point), StatefulSet
    // billing/ledger, the ownerless pod shop/debug, and the process nginx (standalone).
    send(
        &grpc,
        "agent-a",
        vec![
            pod_window(1, "checkout-1", end, &[(1_400, 3), (1_500, 1)], &[0, 0, 4]),
            window_at(
                pod_source("billing", "ledger-0", "db", ("StatefulSet", "ledger")),
                2,
                end,
                &[(1_700, 2)],
                &[0, 0, 2],
            ),
            window_at(
                pod_source("shop", "debug", "shell", ("", "")),
                3,
                end,
                &[(1_800, 1)],
                &[0, 0, 0, 0, 1],
            ),
            window_at(
                Source {
                    node_name: "host-a".into(),
                    pid: 4242,
                    process_name: "nginx".into(),
                    ..Default::default()
                },
                4,
                end,
                &[(1_900, 4)],
                &[0, 0, 4],
            ),
        ],
    )
    .await;
    // The second pod also answered POSTs: a second point of the same entity, in the same
    // request, under the same resource.
    let mut posts = pod_window(2, "checkout-2", end, &[(1_300, 3)], &[0, 0, 0, 0, 3]);
    if let Some(agent_message::Kind::Window(window)) = &mut posts.kind {
        window.method = "POST".into();
    }
    send(
        &grpc,
        "agent-b",
        vec![
            pod_window(
                1,
                "checkout-2",
                end,
                &[(1_450, 2), (1_500, 4)],
                &[0, 0, 5, 0, 0, 1],
            ),
            posts,
        ],
    )
    .await;

    // Each entity is one resource, with only its own points under it, and on the points
    // only what was measured.
    let durations = receiver.points_by_resource(SERVER_DURATION_METRIC, 5);
    let ledger = resource(&[
        ("service.name", "ledger"),
        ("service.namespace", "billing"),
        ("k8s.namespace.name", "billing"),
        ("k8s.statefulset.name", "ledger"),
        ("trazor.workload.kind", "StatefulSet"),
        ("trazor.workload.name", "ledger"),
    ]);
    let debug = resource(&[
        ("service.name", "debug"),
        ("service.namespace", "shop"),
        ("k8s.namespace.name", "shop"),
        ("k8s.pod.name", "debug"),
        ("k8s.pod.uid", "uid-debug"),
    ]);
    let nginx = resource(&[
        ("service.name", "nginx"),
        ("process.executable.name", "nginx"),
    ]);
    // A point's attributes: what was measured, under the HTTP semantic conventions' keys,
    // and for the responses, the direction and the status class.
    let measured = |method: &str, class: Option<&str>| {
        let mut attributes = map(&[
            ("http.request.method", method),
            ("url.scheme", "http"),
            ("http.route", "/cart/{id}"),
        ]);
        if let Some(class) = class {
            attributes.insert("trazor.direction".into(), "server".into());
            attributes.insert("trazor.http.response.status_class".into(), class.into());
        }
        attributes
    };
    // Points of one resource in any order (the collector closes a window's aggregates
    // together, in no particular order).
    let by_resource = |points: &BTreeMap<Attributes, Vec<serde_json::Value>>, value: &str| {
        points
            .iter()
            .map(|(resource, points)| {
                let points: BTreeSet<(Attributes, u64)> = points
                    .iter()
                    .map(|point| (attributes(point), number(&point[value]) as u64))
                    .collect();
                (resource.clone(), points)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let get = |class| measured("GET", class);
    assert_eq!(
        by_resource(&durations, "count"),
        BTreeMap::from([
            (
                checkout_resource(),
                BTreeSet::from([(get(None), 10), (measured("POST", None), 3)])
            ),
            (ledger.clone(), BTreeSet::from([(get(None), 2)])),
            (debug.clone(), BTreeSet::from([(get(None), 1)])),
            (nginx.clone(), BTreeSet::from([(get(None), 4)])),
        ])
    );

    let point = durations[&checkout_resource()]
        .iter()
        .find(|point| attributes(point) == get(None))
        .unwrap();
    assert_eq!(nanos(&point["start_time_unix_nano"]), end - 1_000_000_000);
    assert_eq!(nanos(&point["time_unix_nano"]), end);
    // In seconds, as the conventions say: 10 requests of 1 ms, from 0.9 ms to 1.2 ms.
    assert_eq!(number(&point["count"]), 10.0);
    assert_eq!(number(&point["sum"]), 0.01);
    assert_eq!(
        (number(&point["min"]), number(&point["max"])),
        (0.0009, 0.0012)
    );
    // The merged histogram, re-bucketed to seconds: kernel buckets 1400 (3), 1450 (2),
    // 1500 (1 + 4) at scale 6 in ns are scale-8 buckets 4i - 7652 in s, each inside its
    // kernel bucket.
    assert_eq!(point["scale"], 8);
    assert_eq!(point["positive"]["offset"], 4 * 1_400 - 7_652);
    let counts: Vec<f64> = point["positive"]["bucket_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(number)
        .collect();
    assert_eq!(counts.len(), 401);
    assert_eq!((counts[0], counts[200], counts[400]), (3.0, 2.0, 5.0));
    assert_eq!(counts.iter().sum::<f64>(), 10.0);
    for kernel in [1_400, 1_450, 1_500] {
        let exported = 4 * kernel - 7_652;
        let (low, high) = (
            (f64::from(exported) / 256.0).exp2(),
            (f64::from(exported + 1) / 256.0).exp2(),
        );
        let (lower, upper) = (
            (f64::from(kernel) / 64.0).exp2() / 1e9,
            (f64::from(kernel + 1) / 64.0).exp2() / 1e9,
        );
        assert!(lower < low && high < upper, "bucket {kernel}");
    }

    let responses = receiver.points_by_resource(RESPONSES_METRIC, 6);
    assert_eq!(
        by_resource(&responses, "as_int"),
        BTreeMap::from([
            (
                checkout_resource(),
                BTreeSet::from([
                    (get(Some("2xx")), 9),
                    (get(Some("5xx")), 1),
                    (measured("POST", Some("4xx")), 3),
                ])
            ),
            (ledger, BTreeSet::from([(get(Some("2xx")), 2)])),
            (debug, BTreeSet::from([(get(Some("4xx")), 1)])),
            (nginx, BTreeSet::from([(get(Some("2xx")), 4)])),
        ])
    );

    // A window for the same period after the aggregate closed: exported alone, once, under
    // its workload's resource (not its pod's: it adds to the same series).
    send(
        &grpc,
        "agent-a",
        vec![pod_window(5, "checkout-3", end, &[(1_600, 7)], &[0, 0, 7])],
    )
    .await;
    let (late, late_resource) = receiver.metric(SERVER_DURATION_METRIC);
    assert_eq!(late_resource, checkout_resource());
    let late_points = late["exponential_histogram"]["data_points"]
        .as_array()
        .unwrap();
    assert_eq!(late_points.len(), 1, "{late}");
    assert_eq!(number(&late_points[0]["count"]), 7.0);
    assert_eq!(late["unit"], "s");
    assert_eq!(late_points[0]["positive"]["offset"], 4 * 1_600 - 7_652);
    assert_eq!(attributes(&late_points[0]), get(None));

    // 5 histogram points and 6 class points, then 1 + 1 for the late window (counted once
    // the receiver's answer is back, a moment after it printed the metrics).
    let metrics = metrics_once(&stats, "trazor_collector_otlp_points_exported_total 13").await;
    assert_line(&metrics, "trazor_collector_otlp_points_dropped_total 0");
    assert_line(&metrics, "trazor_collector_otlp_failures_total 0");
}

/// What a stock HTTP RED dashboard reads: `http.server.request.duration` by
/// `http.response.status_code` (its error panel: `error.type`, or codes 5xx), each point
/// with the distribution of its own status's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_points_carry_their_status_code_as_a_red_dashboard_reads_them() {
    let mut receiver = Receiver::start();
    let (grpc, stats) = collector(OtlpConfig::new(format!(
        "http://127.0.0.1:{}",
        receiver.port
    )))
    .await;
    let end = window_end();
    // Two pods of shop/checkout: 200s on both (merged), 503s and 404s on one each.
    send(
        &grpc,
        "agent-a",
        vec![window_by_status(
            1,
            "checkout-1",
            end,
            &[(200, &[(1_400, 3), (1_450, 1)]), (503, &[(1_600, 2)])],
        )],
    )
    .await;
    send(
        &grpc,
        "agent-b",
        vec![window_by_status(
            1,
            "checkout-2",
            end,
            &[(200, &[(1_400, 2)]), (404, &[(1_300, 1)])],
        )],
    )
    .await;
    let durations = receiver.points_by_resource(SERVER_DURATION_METRIC, 3);
    let points = &durations[&checkout_resource()];
    let mut by_status: BTreeMap<String, (Option<String>, u64, i64, Vec<u64>)> = BTreeMap::new();
    for point in points {
        let attributes = attributes(point);
        let counts: Vec<u64> = point["positive"]["bucket_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|count| number(count) as u64)
            .filter(|&count| count > 0)
            .collect();
        let offset = point["positive"]["offset"].as_i64().unwrap();
        by_status.insert(
            attributes["http.response.status_code"].clone(),
            (
                attributes.get("error.type").cloned(),
                number(&point["count"]) as u64,
                offset,
                counts,
            ),
        );
        assert_eq!(attributes["http.route"], "/cart/{id}");
    }
    // Each status with its own buckets (kernel bucket i at scale 6 in ns is 4i - 7652 at
    // scale 8 in s): the 503s are the slow ones, and only they are errors (a server's 404
    // is its client's error).
    assert_eq!(
        by_status,
        BTreeMap::from([
            ("200".into(), (None, 6, 4 * 1_400 - 7_652, vec![5, 1])),
            ("404".into(), (None, 1, 4 * 1_300 - 7_652, vec![1])),
            (
                "503".into(),
                (Some("503".into()), 2, 4 * 1_600 - 7_652, vec![2])
            ),
        ])
    );
    // The dashboard's error rate, from the duration points alone, is the exact one.
    let errors: u64 = by_status
        .values()
        .filter(|(error, ..)| error.is_some())
        .map(|(_, count, ..)| count)
        .sum();
    let total: u64 = by_status.values().map(|(_, count, ..)| count).sum();
    assert_eq!((errors, total), (2, 9));
    let metrics = metrics_once(&stats, "trazor_collector_otlp_points_exported_total 6").await;
    assert_line(&metrics, "trazor_collector_otlp_points_dropped_total 0");
}

/// With `OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=explicit_bucket_histogram`
/// (what dashboards built on classic `_bucket{le=...}` series need): explicit buckets at the
/// conventions' boundaries, count, sum, min and max exact, still one point per status code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_bucket_histograms_use_the_conventions_boundaries() {
    let mut receiver = Receiver::start();
    let (grpc, _stats) = collector(OtlpConfig {
        histogram: HistogramAggregation::Explicit,
        ..OtlpConfig::new(format!("http://127.0.0.1:{}", receiver.port))
    })
    .await;
    // Kernel buckets 1400 (3.85 ms), 1450 (6.61 ms) and 1600 (33.6 ms).
    send(
        &grpc,
        "agent-a",
        vec![window_by_status(
            1,
            "checkout-1",
            window_end(),
            &[(200, &[(1_400, 3), (1_450, 1)]), (503, &[(1_600, 2)])],
        )],
    )
    .await;
    let (metric, resource) = receiver.metric(SERVER_DURATION_METRIC);
    assert_eq!(resource, checkout_resource());
    assert_eq!(metric["unit"], "s");
    let points = metric["histogram"]["data_points"]
        .as_array()
        .unwrap_or_else(|| panic!("not an explicit-bucket histogram: {metric}"));
    let boundaries: Vec<f64> = DURATION_BOUNDARIES.to_vec();
    let mut by_status = BTreeMap::new();
    for point in points {
        let bounds: Vec<f64> = point["explicit_bounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(number)
            .collect();
        assert_eq!(bounds, boundaries);
        let counts: Vec<u64> = point["bucket_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|count| number(count) as u64)
            .collect();
        by_status.insert(
            attributes(point)["http.response.status_code"].clone(),
            (
                number(&point["count"]) as u64,
                number(&point["sum"]),
                counts,
            ),
        );
    }
    let counts = |leading: &[u64]| {
        let mut counts = leading.to_vec();
        counts.resize(DURATION_BOUNDARIES.len() + 1, 0);
        counts
    };
    assert_eq!(
        by_status,
        BTreeMap::from([
            ("200".to_owned(), (4, 0.004, counts(&[3, 1]))),
            ("503".to_owned(), (2, 0.002, counts(&[0, 0, 0, 2]))),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_receiver_is_retried_then_its_points_are_counted_as_dropped() {
    let mut otlp = OtlpConfig::new(format!("http://127.0.0.1:{}", free_port()));
    otlp.max_attempts = 3;
    otlp.initial_backoff = Duration::from_millis(50);
    let (grpc, stats) = collector(otlp).await;
    send(
        &grpc,
        "agent-a",
        vec![pod_window(
            1,
            "checkout-1",
            window_end(),
            &[(1_400, 3)],
            &[0, 0, 3],
        )],
    )
    .await;
    let metrics = metrics_once(&stats, "trazor_collector_otlp_points_dropped_total 2").await;
    assert_line(&metrics, "trazor_collector_otlp_failures_total 3");
    assert_line(&metrics, "trazor_collector_otlp_points_exported_total 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_refuses_the_request_is_not_retried() {
    // An HTTP server answering every request 400, as a receiver does for a bad request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = requests.clone();
    let router = axum::Router::new().fallback(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async { (axum::http::StatusCode::BAD_REQUEST, "bad data points") }
    });
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut otlp = OtlpConfig::new(format!("http://{address}"));
    otlp.initial_backoff = Duration::from_millis(50);
    let (grpc, stats) = collector(otlp).await;
    send(
        &grpc,
        "agent-a",
        vec![pod_window(
            1,
            "checkout-1",
            window_end(),
            &[(1_400, 3)],
            &[],
        )],
    )
    .await;
    metrics_once(&stats, "trazor_collector_otlp_points_dropped_total 1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(requests.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_line(&stats.render(), "trazor_collector_otlp_failures_total 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exemplars_reach_a_real_otlp_receiver_as_spans() {
    let mut receiver = Receiver::start();
    let (grpc, stats) = collector(OtlpConfig::new(format!(
        "http://127.0.0.1:{}",
        receiver.port
    )))
    .await;
    let end = window_end();
    let mut message = pod_window(1, "checkout-1", end, &[(1_400, 2)], &[0, 0, 1, 0, 0, 1]);
    let Some(agent_message::Kind::Window(window)) = &mut message.kind else {
        panic!("not a window");
    };
    if let Some(pod) = window
        .source
        .as_mut()
        .and_then(|source| source.pod.as_mut())
    {
        pod.uid = "uid-checkout-1".into();
        pod.container = "app".into();
    }
    // A failed request and a slow one, as the agent reports them.
    let start = end - 500_000_000;
    window.exemplars = vec![
        Exemplar {
            start_unix_nanos: start,
            duration_nanos: 2_000_000,
            method: "GET".into(),
            status_code: 503,
            path: "/cart/42".into(),
            tid: 4242,
        },
        Exemplar {
            start_unix_nanos: start + 1_000,
            duration_nanos: 900_000_000,
            method: "GET".into(),
            status_code: 200,
            path: "/cart/7".into(),
            tid: 4243,
        },
    ];
    send(&grpc, "agent-a", vec![message]).await;
    let (first, first_resource) = receiver.span();
    let (second, second_resource) = receiver.span();
    // The workload, as its metrics name it, then the pod, container and node the requests
    // were served on.
    let mut expected = checkout_resource();
    expected.extend(map(&[
        ("k8s.pod.name", "checkout-1"),
        ("k8s.pod.uid", "uid-checkout-1"),
        ("k8s.container.name", "app"),
        ("service.instance.id", "uid-checkout-1.app"),
        ("k8s.node.name", "node-of-checkout-1"),
    ]));
    assert_eq!(first_resource, expected);
    assert_eq!(second_resource, expected);
    // The window's own metrics: the same service and k8s.* keys for the same workload.
    let (_, metric_resource) = receiver.metric(SERVER_DURATION_METRIC);
    assert_eq!(metric_resource, checkout_resource());
    let mut spans = [first, second];
    spans.sort_by_key(|span| nanos(&span["start_time_unix_nano"]));
    for (span, status, path, duration, code) in [
        (&spans[0], 503.0, "/cart/42", 2_000_000, "STATUS_CODE_ERROR"),
        (
            &spans[1],
            200.0,
            "/cart/7",
            900_000_000,
            "STATUS_CODE_UNSET",
        ),
    ] {
        assert_eq!(span["name"], "GET /cart/{id}", "{span}");
        assert_eq!(span["kind"], "SPAN_KIND_SERVER", "{span}");
        // 16 and 8 random bytes (base64 in JSON).
        assert_eq!(span["trace_id"].as_str().unwrap().len(), 24, "{span}");
        assert_eq!(span["span_id"].as_str().unwrap().len(), 12, "{span}");
        let start = nanos(&span["start_time_unix_nano"]);
        assert_eq!(nanos(&span["end_time_unix_nano"]) - start, duration);
        assert_eq!(
            span["status"]["code"]
                .as_str()
                .unwrap_or("STATUS_CODE_UNSET"),
            code
        );
        let attributes: BTreeMap<&str, &serde_json::Value> = span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|attribute| (attribute["key"].as_str().unwrap(), &attribute["value"]))
            .collect();
        assert_eq!(
            number(&attributes["http.response.status_code"]["int_value"]),
            status
        );
        assert_eq!(attributes["url.path"]["string_value"], path);
        assert_eq!(attributes["http.route"]["string_value"], "/cart/{id}");
    }
    metrics_once(&stats, "trazor_collector_otlp_spans_exported_total 2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_endpoints_send_metrics_and_spans_to_different_receivers_as_they_are() {
    // Metrics to Rotel, spans to oteltap, each endpoint with its path as given (an
    // appended /v1/... would be a path neither serves).
    let rotel = common::rotel::Rotel::start();
    let mut receiver = Receiver::start();
    let (grpc, stats) = collector(OtlpConfig {
        metrics_endpoint: Some(format!("http://127.0.0.1:{}/v1/metrics", rotel.http_port)),
        traces_endpoint: Some(format!("http://127.0.0.1:{}/v1/traces", receiver.port)),
        ..OtlpConfig::default()
    })
    .await;
    let end = window_end();
    let mut message = pod_window(1, "checkout-1", end, &[(1_400, 4)], &[0, 0, 4]);
    let Some(agent_message::Kind::Window(window)) = &mut message.kind else {
        panic!("not a window");
    };
    window.exemplars = vec![Exemplar {
        start_unix_nanos: end - 500_000_000,
        duration_nanos: 900_000_000,
        method: "GET".into(),
        status_code: 200,
        path: "/cart/7".into(),
        tid: 1,
    }];
    send(&grpc, "agent-a", vec![message]).await;
    let (span, resource) = receiver.span();
    assert_eq!(span["name"], "GET /cart/{id}");
    assert_eq!(resource["service.name"], "checkout");
    let metrics = rotel
        .wait_for("checkout metrics", |block| {
            block.signal == "metrics"
                && block.attribute("service.name") == Some("checkout")
                && block.counts.contains(&4)
        })
        .await;
    assert!(
        metrics
            .names
            .iter()
            .any(|name| name == SERVER_DURATION_METRIC)
    );
    metrics_once(&stats, "trazor_collector_otlp_points_exported_total 2").await;
    let counters = metrics_once(&stats, "trazor_collector_otlp_spans_exported_total 1").await;
    assert_line(&counters, "trazor_collector_otlp_failures_total 0");
    // Each signal went to its own receiver only.
    receiver.drain();
    assert!(rotel.blocks().iter().all(|block| block.signal == "metrics"));
    assert!(
        receiver.pending.iter().all(|item| item["metric"].is_null()),
        "{:?}",
        receiver.pending
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_a_traces_endpoint_metrics_are_not_exported_nor_counted_as_dropped() {
    let mut receiver = Receiver::start();
    let (grpc, stats) = collector(OtlpConfig {
        traces_endpoint: Some(format!("http://127.0.0.1:{}/v1/traces", receiver.port)),
        ..OtlpConfig::default()
    })
    .await;
    let end = window_end();
    let mut message = pod_window(1, "checkout-1", end, &[(1_400, 4)], &[0, 0, 4]);
    let Some(agent_message::Kind::Window(window)) = &mut message.kind else {
        panic!("not a window");
    };
    window.exemplars = vec![Exemplar {
        start_unix_nanos: end - 500_000_000,
        duration_nanos: 900_000_000,
        method: "GET".into(),
        status_code: 200,
        path: "/cart/7".into(),
        tid: 1,
    }];
    send(&grpc, "agent-a", vec![message]).await;
    receiver.span();
    metrics_once(&stats, "trazor_collector_otlp_spans_exported_total 1").await;
    // Past the aggregate's close (300 ms after the window's end), and then some.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    tokio::time::sleep(Duration::from_nanos(end.saturating_sub(now)) + Duration::from_millis(800))
        .await;
    receiver.drain();
    let counters = stats.render();
    assert_line(&counters, "trazor_collector_otlp_points_exported_total 0");
    assert_line(&counters, "trazor_collector_otlp_points_dropped_total 0");
    assert!(
        receiver.pending.iter().all(|item| item["metric"].is_null()),
        "{:?}",
        receiver.pending
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cumulative_temporality_each_point_is_its_series_total() {
    let mut receiver = Receiver::start();
    let (grpc, stats) = collector(OtlpConfig {
        temporality: trazor_collector::otlp::Temporality::Cumulative,
        ..OtlpConfig::new(format!("http://127.0.0.1:{}", receiver.port))
    })
    .await;
    // Two windows of one series, a second apart: two aggregates, closed one after the
    // other, so two requests.
    let end = window_end();
    send(
        &grpc,
        "agent-a",
        vec![
            pod_window(1, "checkout-1", end, &[(1_400, 3)], &[0, 0, 3]),
            pod_window(
                2,
                "checkout-1",
                end + 1_000_000_000,
                &[(1_400, 1), (1_450, 4)],
                &[0, 0, 4, 0, 0, 1],
            ),
        ],
    )
    .await;
    let point = |metric: &serde_json::Value| {
        assert_eq!(
            metric["exponential_histogram"]["aggregation_temporality"],
            "AGGREGATION_TEMPORALITY_CUMULATIVE",
            "{metric}"
        );
        metric["exponential_histogram"]["data_points"][0].clone()
    };
    let (first, _) = receiver.metric(SERVER_DURATION_METRIC);
    let first = point(&first);
    assert_eq!(number(&first["count"]), 3.0);
    let (second, resource) = receiver.metric(SERVER_DURATION_METRIC);
    assert_eq!(resource, checkout_resource());
    let second = point(&second);
    // The total since the series' first window: 3 + 5 requests, from its start to the
    // second window's end, buckets added.
    assert_eq!(number(&second["count"]), 8.0);
    assert_eq!(nanos(&second["start_time_unix_nano"]), end - 1_000_000_000);
    assert_eq!(nanos(&second["time_unix_nano"]), end + 1_000_000_000);
    assert_eq!(number(&second["sum"]), 0.008);
    let counts: Vec<f64> = second["positive"]["bucket_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(number)
        .collect();
    assert_eq!((counts[0], counts[200], counts.len()), (4.0, 4.0, 201));
    // The responses too: 2xx 3 then 7, and the 5xx since it appeared.
    let (_, _) = receiver.metric(RESPONSES_METRIC);
    let (responses, _) = receiver.metric(RESPONSES_METRIC);
    let classes: BTreeMap<String, f64> = responses["sum"]["data_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|point| {
            (
                attributes(point)["trazor.http.response.status_class"].clone(),
                number(&point["as_int"]),
            )
        })
        .collect();
    assert_eq!(
        classes,
        BTreeMap::from([("2xx".to_owned(), 7.0), ("5xx".to_owned(), 1.0)])
    );
    metrics_once(&stats, "trazor_collector_otlp_series_evicted_total 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_the_new_batch_and_counts_it() {
    let dir = std::env::temp_dir().join(format!("trazor-otlp-spool-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let collector = trazor_collector::BoundCollector::bind(&trazor_collector::CollectorConfig {
        late_grace: Duration::from_millis(300),
        state_dir: Some(dir.clone()),
        // Room for no batch at all.
        otlp_spool_max_bytes: 16,
        otlp: Some(OtlpConfig::new(format!("http://127.0.0.1:{}", free_port()))),
        ..Default::default()
    })
    .await
    .unwrap();
    let grpc = format!("http://{}", collector.grpc_addr());
    let stats = collector.stats();
    tokio::spawn(collector.serve());
    let message = with_exemplars(
        pod_window(1, "checkout-1", window_end(), &[(1_400, 5)], &[0, 0, 5]),
        2,
    );
    send(&grpc, "agent-a", vec![message]).await;
    // The spans' batch, then the metrics' (a histogram point and a status-class point):
    // refused by the spool, dropped and counted, never queued.
    let metrics = metrics_once(&stats, "trazor_collector_otlp_spool_full_total 2").await;
    assert_line(&metrics, "trazor_collector_otlp_spans_dropped_total 2");
    assert_line(&metrics, "trazor_collector_otlp_points_dropped_total 2");
    assert_line(&metrics, "trazor_collector_otlp_spool_batches 0");
    assert_line(&metrics, "trazor_collector_otlp_queued_batches 0");
    let _ = std::fs::remove_dir_all(&dir);
}
