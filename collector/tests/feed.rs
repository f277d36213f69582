//! The live feed over real WebSockets against a real collector, fed by a test agent over
//! real gRPC: filters, subscription changes, history replay, protobuf frames, heartbeat,
//! backpressure with missed counts, limits, auth, and every bad input (the protocol:
//! `collector/FEED.md`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod feed_support;

use std::time::Duration;

use feed_support::{
    Agent, CollectorProcess, Feed, Frame, Running, SECOND, TestWindow, http_request, unix_ms,
    unix_nanos,
};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use tokio::io::AsyncReadExt as _;
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::frame::{Frame as RawFrame, coding::Data, coding::OpCode},
};
use trazor_collector::{CollectorConfig, feed::FeedConfig};
use trazor_proto::v1::{Direction, FeedFrame, feed_frame};

fn config(feed: FeedConfig) -> CollectorConfig {
    CollectorConfig {
        feed,
        ..Default::default()
    }
}

/// The agent sequences of the window frames among `frames`.
fn sequences(frames: &[serde_json::Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|frame| frame["type"] == "window")
        .map(|frame| frame["sequence"].as_u64().unwrap())
        .collect()
}

/// Windows of several namespaces, workloads, nodes, routes, methods, directions, profiles
/// and a standalone process; each client gets exactly the ones its filter names.
#[tokio::test]
async fn filters_choose_windows_and_aggregates() {
    let collector = Running::start(CollectorConfig {
        late_grace: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let queries = [
        "",
        "namespace=shop",
        "namespace=shop&workload=checkout",
        "workload=cart,search",
        "pod=checkout-2&pod=cart-1",
        "node=node-b",
        "profile=ops/all",
        "direction=client",
        "route=/search",
        "method=POST,PUT",
        "process=nginx",
        "namespace=ops&method=GET",
        "kind=windows&namespace=shop",
        "kind=aggregates&workload=checkout",
    ];
    let mut feeds = Vec::new();
    for query in queries {
        let mut feed = collector.feed(&format!("{query}&history=0")).await;
        let subscribed = feed.subscribed().await;
        assert_eq!(subscribed["replayed"], 0);
        feeds.push(feed);
    }
    // One window end for all: their aggregates close together 300 ms after it.
    // Far enough ahead that every window arrives before its aggregate closes, even on a
    // loaded machine.
    let end_unix_nanos = unix_nanos() + 3 * SECOND;
    let base = TestWindow {
        end_unix_nanos,
        ..Default::default()
    };
    let windows = [
        base.clone(), // 1 shop/checkout-1 GET
        TestWindow {
            pod: "checkout-2",
            node: "node-b",
            method: "POST",
            ..base.clone()
        }, // 2
        TestWindow {
            workload: "cart",
            pod: "cart-1",
            route: "/cart",
            method: "PUT",
            ..base.clone()
        }, // 3
        TestWindow {
            namespace: "ops",
            workload: "search",
            pod: "search-1",
            route: "/search",
            profile: "ops/all",
            ..base.clone()
        }, // 4
        TestWindow {
            direction: Direction::Client,
            pod: "checkout-1",
            ..base.clone()
        }, // 5
        TestWindow {
            namespace: "",
            workload: "",
            pod: "",
            process: "nginx",
            profile: "",
            ..base.clone()
        }, // 6 standalone
    ];
    let mut agent = Agent::connect(&collector.grpc, "agent-1").await;
    for window in &windows {
        agent.send_test(window).await;
    }
    let expected_windows: [&[u64]; 14] = [
        &[1, 2, 3, 4, 5, 6],
        &[1, 2, 3, 5],
        &[1, 2, 5],
        &[3, 4],
        &[2, 3],
        &[2],
        &[4],
        &[5],
        &[4],
        &[2, 3],
        &[6],
        &[4],
        &[1, 2, 3, 5],
        &[],
    ];
    for ((feed, query), expected) in feeds.iter_mut().zip(queries).zip(expected_windows) {
        let got = feed.items(expected.len()).await;
        assert_eq!(sequences(&got), expected, "windows for ?{query}");
    }
    // Then the aggregates, once their grace is over: checkout server GET (windows 1),
    // checkout POST (2), cart PUT (3), search (4), checkout client GET (5), nginx (6).
    let expected_aggregates: [usize; 14] = [6, 4, 3, 2, 0, 0, 1, 1, 1, 2, 1, 1, 0, 3];
    for ((feed, query), expected) in feeds.iter_mut().zip(queries).zip(expected_aggregates) {
        let aggregates = feed.items(expected).await;
        for aggregate in &aggregates {
            assert_eq!(aggregate["type"], "aggregate", "?{query}: {aggregate}");
        }
        if query.starts_with("kind=aggregates") {
            for aggregate in &aggregates {
                assert_eq!(aggregate["subject"]["workload_name"], "checkout");
            }
        }
        // Nothing else: a wrong match would show here.
        feed.nothing_for(Duration::from_millis(300)).await;
    }
}

/// A live connection changes its subscription: acknowledged, replayed, then live items of
/// the new filter only; a bad subscribe message gets an error and the old one stays.
#[tokio::test]
async fn subscription_changes_on_a_live_connection() {
    let collector = Running::start(CollectorConfig::default()).await;
    let mut agent = Agent::connect(&collector.grpc, "agent-1").await;
    let shop = TestWindow::default();
    let ops = TestWindow {
        namespace: "ops",
        workload: "search",
        pod: "search-1",
        ..Default::default()
    };
    for window in [&shop, &ops, &shop, &ops, &shop] {
        agent.send_test(window).await; // 1..=5: shop 1, 3, 5
    }
    let mut feed = collector.feed("namespace=ops&history=0").await;
    feed.subscribed().await;
    feed.send_text(
        r#"{"type":"subscribe","filter":{"namespace":["shop"]},"kind":"windows","history":{"last":2}}"#,
    )
    .await;
    let subscribed = feed.subscribed().await;
    assert_eq!(subscribed["replayed"], 2);
    assert_eq!(subscribed["kind"], "windows");
    assert_eq!(subscribed["encoding"], "json");
    assert_eq!(
        subscribed["filter"]["namespace"],
        serde_json::json!(["shop"])
    );
    assert_eq!(subscribed["filter"]["pod"], serde_json::json!([]));
    assert_eq!(
        sequences(&feed.items(2).await),
        [3, 5],
        "the last 2 shop, oldest first"
    );
    agent.send_test(&ops).await; // 6
    agent.send_test(&shop).await; // 7
    assert_eq!(sequences(&feed.items(1).await), [7]);
    // Bad messages: each answered with its code, the shop subscription stays.
    for (message, code) in [
        ("{not json", "bad_json"),
        (r#"{"type":"unsubscribe"}"#, "unknown_type"),
        (r#"{"type":"subscribe","colour":"red"}"#, "unknown_field"),
        (
            r#"{"type":"subscribe","filter":{"colour":["red"]}}"#,
            "unknown_filter",
        ),
        (
            r#"{"type":"subscribe","filter":{"direction":["sideways"]}}"#,
            "bad_value",
        ),
        (
            r#"{"type":"subscribe","history":{"last":1,"since_unix_ms":1}}"#,
            "bad_value",
        ),
    ] {
        feed.send_text(message).await;
        let error = feed.json().await;
        assert_eq!(error["type"], "error", "{message}: {error}");
        assert_eq!(error["code"], code, "{message}: {error}");
        assert!(!error["message"].as_str().unwrap().is_empty());
    }
    agent.send_test(&ops).await; // 8
    agent.send_test(&shop).await; // 9
    assert_eq!(
        sequences(&feed.items(1).await),
        [9],
        "the shop subscription stayed"
    );
    // A subscribe without history replays nothing; everything from now on.
    feed.send_text(r#"{"type":"subscribe"}"#).await;
    assert_eq!(feed.subscribed().await["replayed"], 0);
    agent.send_test(&ops).await; // 10
    assert_eq!(sequences(&feed.items(1).await), [10]);
    feed.nothing_for(Duration::from_millis(200)).await;
}

/// History: the last N matching, since T (by window end), everything kept, bounded by
/// `--history`; and replay and live items split exactly while windows keep arriving.
#[tokio::test]
async fn history_replays_last_n_or_since_t_and_joins_live_exactly() {
    let collector = Running::start(CollectorConfig {
        history: 8,
        ..Default::default()
    })
    .await;
    let mut agent = Agent::connect(&collector.grpc, "agent-1").await;
    let t0 = unix_nanos() - 60 * SECOND;
    for n in 0..10u64 {
        let namespace = if n % 2 == 0 { "shop" } else { "ops" };
        agent
            .send_test(&TestWindow {
                namespace,
                end_unix_nanos: t0 + n * SECOND,
                ..Default::default()
            })
            .await; // sequence n + 1
    }
    // Kept: sequences 3..=10 (history 8).
    let mut all = collector.feed("").await;
    assert_eq!(all.subscribed().await["replayed"], 8);
    assert_eq!(sequences(&all.items(8).await), [3, 4, 5, 6, 7, 8, 9, 10]);
    let mut last = collector.feed("namespace=shop&history=2").await;
    assert_eq!(last.subscribed().await["replayed"], 2);
    assert_eq!(sequences(&last.items(2).await), [7, 9]);
    let since_ms = (t0 + 7 * SECOND) / 1_000_000;
    let mut since = collector.feed(&format!("since={since_ms}")).await;
    assert_eq!(since.subscribed().await["replayed"], 3);
    assert_eq!(sequences(&since.items(3).await), [8, 9, 10]);
    let mut none = collector.feed("history=0").await;
    assert_eq!(none.subscribed().await["replayed"], 0);

    // Windows keep arriving while clients connect: each client sees every sequence
    // from its first replayed one on, once, in order.
    let publisher = tokio::spawn(async move {
        for _ in 0..300 {
            agent.send_test(&TestWindow::default()).await;
        }
        agent
    });
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut feed = collector.feed("").await;
        let replayed = feed.subscribed().await["replayed"].as_u64().unwrap();
        clients.push((feed, replayed));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    publisher.await.unwrap();
    for (mut feed, replayed) in clients {
        let mut seen = Vec::new();
        while seen.last() != Some(&310) {
            seen.extend(sequences(&feed.items(1).await));
        }
        assert!(seen.len() as u64 >= replayed);
        let first = seen[0];
        let expected: Vec<u64> = (first..=310).collect();
        assert_eq!(seen, expected, "no gap or repeat between replay and live");
    }
}

/// `encoding=protobuf`: every frame is a binary `trazor.v1.FeedFrame` with the same items
/// as the JSON feed; windows arrive as the agent sent them.
#[tokio::test]
async fn protobuf_frames_carry_the_same_items() {
    let collector = Running::start(CollectorConfig {
        late_grace: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut binary = collector
        .feed("encoding=protobuf&namespace=shop&history=0")
        .await;
    let mut json = collector.feed("namespace=shop&history=0").await;
    json.subscribed().await;
    let Frame::Binary(bytes) = binary.frame().await else {
        panic!("expected a binary frame");
    };
    let Some(feed_frame::Kind::Subscribed(subscribed)) =
        FeedFrame::decode(&bytes[..]).unwrap().kind
    else {
        panic!("the first frame is `subscribed`");
    };
    assert_eq!(subscribed.encoding, "protobuf");
    assert_eq!(subscribed.kind, "both");
    assert_eq!(subscribed.filter.unwrap().namespace, ["shop"]);
    let mut agent = Agent::connect(&collector.grpc, "agent-1").await;
    let sent = TestWindow {
        end_unix_nanos: unix_nanos() + 1_500_000_000,
        ..Default::default()
    };
    let mut window = sent.window();
    window.sequence = agent.send(window.clone()).await;
    let decode = |frame: Frame| -> feed_frame::Kind {
        let Frame::Binary(bytes) = frame else {
            panic!("expected a binary frame, got {frame:?}");
        };
        FeedFrame::decode(&bytes[..]).unwrap().kind.unwrap()
    };
    let feed_frame::Kind::Window(received) = decode(binary.frame().await) else {
        panic!("expected a window");
    };
    assert_eq!(received.agent_id, "agent-1");
    assert_eq!(received.boot_id, "boot-1");
    assert_eq!(
        received.window.as_ref(),
        Some(&window),
        "the window as sent"
    );
    let json_window = json.json().await;
    assert_eq!(json_window["count"], window.stats.as_ref().unwrap().count);
    // The aggregate, after its grace: same figures in both encodings.
    let feed_frame::Kind::Aggregate(aggregate) = decode(binary.frame().await) else {
        panic!("expected an aggregate");
    };
    let json_aggregate = json.json().await;
    assert_eq!(json_aggregate["type"], "aggregate");
    let stats = aggregate.stats.unwrap();
    assert_eq!(json_aggregate["count"], stats.count);
    assert_eq!(json_aggregate["errors"], stats.error_count);
    assert_eq!(json_aggregate["windows"], aggregate.windows);
    assert_eq!(
        json_aggregate["histogram"]["counts"],
        serde_json::json!(aggregate.histogram.unwrap().bucket_counts)
    );
    assert_eq!(
        json_aggregate["percentiles"]["p99"].as_f64().unwrap(),
        (stats.quantiles[1].value_nanos as f64 / 1e3).round() / 1e3
    );
    let Some(trazor_proto::v1::feed_aggregate::Subject::Workload(subject)) = aggregate.subject
    else {
        panic!("a workload's aggregate");
    };
    assert_eq!(subject.workload_name, "checkout");
    // Errors are binary frames too; the connection stays.
    binary
        .socket
        .send(Message::text(
            r#"{"type":"subscribe","filter":{"colour":[]}}"#,
        ))
        .await
        .unwrap();
    let feed_frame::Kind::Error(error) = decode(binary.frame().await) else {
        panic!("expected an error frame");
    };
    assert_eq!(error.code, "unknown_filter");
    binary
        .socket
        .send(Message::text(r#"{"type":"subscribe","kind":"windows"}"#))
        .await
        .unwrap();
    let feed_frame::Kind::Subscribed(subscribed) = decode(binary.frame().await) else {
        panic!("expected subscribed");
    };
    assert_eq!(subscribed.kind, "windows");
}

fn heartbeat_config() -> FeedConfig {
    FeedConfig {
        ping_interval: Duration::from_millis(400),
        pong_timeout: Duration::from_millis(600),
        ..Default::default()
    }
}

/// The server pings; a client that answers stays, one that never does is closed with
/// 1001 within ping interval + pong timeout (+ a tick) of its last frame.
#[tokio::test]
async fn heartbeat_keeps_live_clients_and_closes_dead_ones_within_the_bound() {
    let collector = Running::start(config(heartbeat_config())).await;
    let bound = Duration::from_millis(1_000);
    let mut alive = collector.feed("").await;
    alive.subscribed().await;
    // A peer that never answers (it reads nothing until the end).
    let mut dead = feed_support::raw_upgrade(collector.http, "").await;
    let opened = std::time::Instant::now();
    let reader = tokio::spawn(async move {
        // Reading makes tungstenite answer pings (it queues the pong and flushes it on
        // the next read or write).
        let mut pings = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            match tokio::time::timeout_at(until, alive.socket.next()).await {
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
                Ok(other) => panic!("the live client was closed: {other:?}"),
                Err(_) => return pings,
            }
        }
    });
    while collector
        .metric("trazor_collector_feed_closed_heartbeat_total")
        .await
        == 0
    {
        assert!(
            opened.elapsed() < Duration::from_secs(5),
            "the dead peer stays"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = opened.elapsed();
    // The heartbeat ticks every 200 ms here; 300 ms more for a loaded test machine.
    assert!(
        elapsed >= bound && elapsed <= bound + Duration::from_millis(500),
        "dead peer closed after {elapsed:?}, bound {bound:?}"
    );
    let pings = reader.await.unwrap();
    assert!(pings >= 5, "pings every 400 ms for 3 s, got {pings}");
    assert_eq!(
        collector
            .metric("trazor_collector_feed_closed_heartbeat_total")
            .await,
        1,
        "only the dead peer was closed"
    );
    // What the dead peer got: the frames, the close frame (1001, unmasked from the
    // server), then the end of the TCP connection.
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), dead.read_to_end(&mut received))
        .await
        .expect("the server dropped the connection")
        .unwrap();
    let reason = b"heartbeat timeout";
    let mut close = vec![0x88, 2 + reason.len() as u8, 0x03, 0xe9];
    close.extend_from_slice(reason);
    assert!(
        received.windows(close.len()).any(|window| window == close),
        "a close frame 1001 `heartbeat timeout` in {received:?}"
    );
}

/// A client that stops reading: its queue keeps the newest items, drops the oldest and
/// says how many (`missed`), every drop is in /metrics, and a reading client and the agent
/// see no difference.
#[tokio::test]
async fn a_slow_client_misses_the_oldest_and_is_told_while_others_are_unaffected() {
    let collector = Running::start(config(FeedConfig {
        queue: 16,
        ..Default::default()
    }))
    .await;
    let mut agent = Agent::connect(&collector.grpc, "agent-1").await;
    let mut fast = collector.feed("history=0").await;
    fast.subscribed().await;
    let mut slow = collector.feed("history=0").await;
    slow.subscribed().await;
    // Big windows fill the kernel's socket buffers quickly; then the slow client's queue.
    let big = TestWindow {
        // 2 000 buckets sent dense.
        buckets: vec![(1_000, 1), (2_999, 1)],
        ..Default::default()
    };
    let mut published = 0u64;
    let mut fast_seen = Vec::new();
    while collector
        .metric("trazor_collector_feed_dropped_total")
        .await
        < 100
    {
        for _ in 0..50 {
            published = agent.send_test(&big).await;
        }
        // The fast client keeps reading.
        while fast_seen.last() != Some(&published) {
            fast_seen.extend(sequences(&fast.items(1).await));
        }
        assert!(published < 20_000, "the slow client never lost anything");
    }
    assert_eq!(
        fast_seen,
        (1..=published).collect::<Vec<_>>(),
        "fast: all, in order"
    );
    let dropped = collector
        .metric("trazor_collector_feed_dropped_total")
        .await;
    // Now the slow client reads: what it gets plus what it missed is everything.
    let mut received = Vec::new();
    let mut missed_total = 0;
    let mut missed_sum = 0;
    while received.last() != Some(&published) {
        let frame = slow.json().await;
        match frame["type"].as_str().unwrap() {
            "window" => received.push(frame["sequence"].as_u64().unwrap()),
            "missed" => {
                missed_sum += frame["missed"].as_u64().unwrap();
                missed_total = frame["missed_total"].as_u64().unwrap();
                assert_eq!(missed_total, missed_sum);
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(missed_total, dropped, "every drop counted in /metrics");
    assert_eq!(received.len() as u64 + missed_total, published);
    assert!(
        received.windows(2).all(|pair| pair[0] < pair[1]),
        "in order"
    );
    // The newest were kept: the tail is contiguous up to the last published.
    let tail: Vec<u64> = (published - 15..=published).collect();
    assert!(received.ends_with(&tail), "the newest 16 kept");
}

/// Limits: connections (503 + Retry-After before the upgrade), messages per second (1008),
/// frame size (1009); each affects only the client that hit it.
#[tokio::test]
async fn limits_refuse_or_close_only_the_offender() {
    let collector = Running::start(config(FeedConfig {
        max_connections: 3,
        message_rate: 2.0,
        message_burst: 4.0,
        max_frame_bytes: 1_024,
        ..Default::default()
    }))
    .await;
    let mut agent = Agent::connect(&collector.grpc, "agent-1").await;
    let mut bystander = collector.feed("history=0").await;
    bystander.subscribed().await;
    let mut chatty = collector.feed("history=0").await;
    chatty.subscribed().await;
    let mut big = collector.feed("history=0").await;
    big.subscribed().await;
    let (status, body) = Feed::connect(&collector.url(""), &[]).await.err().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("retry-after=5"), "{body}");
    assert_eq!(
        collector
            .metric("trazor_collector_feed_refused_full_total")
            .await,
        1
    );

    for _ in 0..10 {
        chatty.send_text(r#"{"type":"subscribe"}"#).await;
    }
    assert_eq!(
        chatty.close_code().await,
        (1008, "rate limit exceeded".to_owned())
    );
    big.send_text(&"x".repeat(2_000)).await;
    let (code, reason) = big.close_code().await;
    assert_eq!(code, 1009, "{reason}");

    let sequence = agent.send_test(&TestWindow::default()).await;
    assert_eq!(sequences(&bystander.items(1).await), [sequence]);
    // Closed connections give their slots back.
    let mut again = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(feed) = Feed::connect(&collector.url("history=0"), &[]).await {
                return feed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    again.subscribed().await;
    assert_eq!(
        collector
            .metric("trazor_collector_feed_closed_rate_limited_total")
            .await,
        1
    );
}

/// Every bad input gets its answer: bad queries an error frame and 1008, bad control
/// messages an error frame (connection kept), binary 1003, invalid UTF-8 1007, oversized
/// 1009; a healthy client and the agent keep flowing throughout.
#[tokio::test]
async fn every_bad_input_gets_a_clear_error_and_disturbs_no_one() {
    let collector = Running::start(config(FeedConfig {
        max_frame_bytes: 4_096,
        ..Default::default()
    }))
    .await;
    let mut agent = Agent::connect(&collector.grpc, "agent-1").await;
    let mut healthy = collector.feed("history=0").await;
    healthy.subscribed().await;
    let mut expected = Vec::new();

    for (query, code) in [
        ("namspace=shop", "unknown_filter"),
        ("history=5&since=1", "bad_value"),
        ("history=many", "bad_value"),
        ("kind=logs", "bad_value"),
        ("direction=up", "bad_value"),
        ("encoding=xml", "bad_value"),
    ] {
        let mut feed = collector.feed(query).await;
        let error = feed.json().await;
        assert_eq!(error["type"], "error", "?{query}");
        assert_eq!(error["code"], code, "?{query}: {error}");
        assert_eq!(feed.close_code().await, (1008, code.to_owned()), "?{query}");
        expected.push(agent.send_test(&TestWindow::default()).await);
    }

    let mut binary = collector.feed("history=0").await;
    binary.subscribed().await;
    binary
        .socket
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(binary.close_code().await.0, 1003);
    expected.push(agent.send_test(&TestWindow::default()).await);

    let mut invalid = collector.feed("history=0").await;
    invalid.subscribed().await;
    let not_utf8 = RawFrame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    invalid.socket.send(Message::Frame(not_utf8)).await.unwrap();
    assert_eq!(invalid.close_code().await.0, 1007);
    expected.push(agent.send_test(&TestWindow::default()).await);

    let mut oversized = collector.feed("history=0").await;
    oversized.subscribed().await;
    let message = format!(
        r#"{{"type":"subscribe","filter":{{"pod":["{}"]}}}}"#,
        "p".repeat(5_000)
    );
    oversized.send_text(&message).await;
    assert_eq!(oversized.close_code().await.0, 1009);
    expected.push(agent.send_test(&TestWindow::default()).await);

    let mut control = collector.feed("history=0").await;
    control.subscribed().await;
    for (message, code) in [
        ("", "bad_json"),
        ("42", "bad_json"),
        (r#"{"type":7}"#, "unknown_type"),
        (
            r#"{"type":"subscribe","encoding":"protobuf"}"#,
            "unknown_field",
        ),
        (
            r#"{"type":"subscribe","filter":{"namespaces":["a"]}}"#,
            "unknown_filter",
        ),
        (r#"{"type":"subscribe","filter":[]}"#, "bad_value"),
        (r#"{"type":"subscribe","filter":{"pod":"a"}}"#, "bad_value"),
        (r#"{"type":"subscribe","kind":"everything"}"#, "bad_value"),
        (r#"{"type":"subscribe","history":{"last":-3}}"#, "bad_value"),
        (r#"{"type":"subscribe","history":{}}"#, "bad_value"),
    ] {
        control.send_text(message).await;
        let error = control.json().await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some(code)),
            "{message:?}: {error}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await; // within the message rate
    }
    expected.push(agent.send_test(&TestWindow::default()).await);
    assert_eq!(
        sequences(&control.items(1).await),
        [*expected.last().unwrap()],
        "still subscribed"
    );

    assert_eq!(sequences(&healthy.items(expected.len()).await), expected);
    assert_eq!(
        collector
            .metric("trazor_collector_feed_closed_bad_input_total")
            .await,
        9
    );
    assert_eq!(
        collector
            .metric("trazor_collector_feed_error_frames_total")
            .await,
        16
    );
}

/// `POST /login` with `token` as a browser's form posts it, plus `headers`: the status, and
/// the `Set-Cookie` value when one was set.
async fn log_in(
    address: std::net::SocketAddr,
    token: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>) {
    let mut all = vec![("Content-Type", "application/x-www-form-urlencoded")];
    all.extend_from_slice(headers);
    let (status, answer, _) =
        http_request(address, "POST", "/login", &all, &format!("token={token}")).await;
    let set_cookie = answer
        .into_iter()
        .find(|(name, _)| name == "set-cookie")
        .map(|(_, value)| value);
    (status, set_cookie)
}

/// The `name=value` part of a `Set-Cookie` value: what the browser sends back.
fn cookie_of(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

/// With a feed token: a bearer header or a session cookie from `POST /login`, nothing else
/// (not the agents' token); 401 before the upgrade; a login page at `/`; a foreign Origin
/// with a cookie refused; /metrics stays open.
#[tokio::test]
async fn auth_by_bearer_token_or_login_session() {
    let collector = Running::start(CollectorConfig {
        token: Some("agents-secret".into()),
        feed_token: Some("watchers-secret".into()),
        ..Default::default()
    })
    .await;
    let url = collector.url("history=0");
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "Bearer agents-secret")],
        vec![("Authorization", "watchers-secret")],
        vec![("Cookie", "trazor_session=99999999999.00ff")],
    ] {
        let (status, _) = Feed::connect(&url, &headers).await.err().unwrap();
        assert_eq!(status, 401, "{headers:?}");
    }
    let mut bearer = Feed::connect(&url, &[("Authorization", "Bearer watchers-secret")])
        .await
        .unwrap();
    bearer.subscribed().await;

    let (status, _, page) = http_request(collector.http, "GET", "/", &[], "").await;
    assert_eq!(status, 401);
    assert!(
        page.contains(r#"<form method="post" action="/login">"#),
        "{page}"
    );
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, _, page) =
        http_request(collector.http, "POST", "/login", &form, "token=nope").await;
    assert_eq!(status, 401);
    assert!(page.contains("not the feed token"));
    let (status, set_cookie) = log_in(collector.http, "watchers-secret", &[]).await;
    assert_eq!(status, 303);
    let set_cookie = set_cookie.unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains("watchers-secret"),
        "the cookie is not the token"
    );
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    // Behind a TLS-terminating proxy, the cookie is never to be sent in clear.
    let (status, proxied) = log_in(
        collector.http,
        "watchers-secret",
        &[("X-Forwarded-Proto", "https")],
    )
    .await;
    assert_eq!(status, 303);
    assert!(
        proxied
            .as_ref()
            .is_some_and(|value| value.ends_with("; Secure")),
        "{proxied:?}"
    );
    let cookie = cookie_of(&set_cookie);
    let (status, _, _) = http_request(collector.http, "GET", "/", &[("Cookie", &cookie)], "").await;
    assert_eq!(status, 200, "the dashboard with a session");
    let mut session = Feed::connect(&url, &[("Cookie", &cookie)]).await.unwrap();
    session.subscribed().await;
    let own_origin = format!("http://{}", collector.http);
    let mut same_origin = Feed::connect(&url, &[("Cookie", &cookie), ("Origin", &own_origin)])
        .await
        .unwrap();
    same_origin.subscribed().await;
    let (status, _) = Feed::connect(
        &url,
        &[("Cookie", &cookie), ("Origin", "http://evil.example")],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(status, 403);
    // A tampered expiry breaks the MAC.
    let (name_expiry, mac) = cookie.split_once('.').unwrap();
    let tampered = format!("{}9.{mac}", name_expiry);
    assert_eq!(
        Feed::connect(&url, &[("Cookie", &tampered)])
            .await
            .err()
            .unwrap()
            .0,
        401
    );
    // An expired session, correctly signed, is refused too.
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"watchers-secret");
    let expiry = (unix_ms() / 1_000 - 10).to_string();
    let tag = ring::hmac::sign(&key, format!("trazor-session-v1.{expiry}").as_bytes());
    let hex: String = tag
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let expired = format!("trazor_session={expiry}.{hex}");
    assert_eq!(
        Feed::connect(&url, &[("Cookie", &expired)])
            .await
            .err()
            .unwrap()
            .0,
        401
    );

    let (status, _, metrics) = http_request(collector.http, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("trazor_collector_feed_unauthenticated_total"));
    let (status, headers, _) = http_request(collector.http, "POST", "/logout", &[], "").await;
    assert_eq!(status, 303);
    assert!(
        headers
            .iter()
            .any(|(name, value)| name == "set-cookie" && value.contains("Max-Age=0"))
    );
}

/// Guessing the feed token is throttled: a burst of 20 wrong tokens (at /login or as a
/// bearer) is answered, then 429 with Retry-After and no look at the token (the right one
/// waits too), one guess a second after that; sessions already made still work.
#[tokio::test]
async fn guessing_the_feed_token_is_throttled() {
    let collector = Running::start(CollectorConfig {
        feed_token: Some("watchers-secret".into()),
        ..Default::default()
    })
    .await;
    let (status, set_cookie) = log_in(collector.http, "watchers-secret", &[]).await;
    assert_eq!(status, 303);
    let cookie = cookie_of(&set_cookie.unwrap());
    let url = collector.url("history=0");
    // 10 wrong logins and 10 wrong bearers: each an ordinary refusal.
    for guess in 0..10 {
        let (status, _) = log_in(collector.http, &format!("guess-{guess}"), &[]).await;
        assert_eq!(status, 401, "guess {guess}");
        let bearer = format!("Bearer guess-{guess}");
        let (status, _) = Feed::connect(&url, &[("Authorization", &bearer)])
            .await
            .err()
            .unwrap();
        assert_eq!(status, 401, "bearer guess {guess}");
    }
    // The bucket is empty: the next guesses, right or wrong, get 429 with Retry-After.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, headers, _) = http_request(
        collector.http,
        "POST",
        "/login",
        &form,
        "token=watchers-secret",
    )
    .await;
    assert_eq!(status, 429);
    assert!(
        headers
            .iter()
            .any(|(name, value)| name == "retry-after" && value == "1"),
        "{headers:?}"
    );
    let (status, _) = Feed::connect(&url, &[("Authorization", "Bearer another-guess")])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 429);
    let (status, _, _) = http_request(
        collector.http,
        "GET",
        "/",
        &[("Authorization", "Bearer yet-another")],
        "",
    )
    .await;
    assert_eq!(status, 429);
    // A session made before still works, and a page load without credentials is the login
    // page, not a 429.
    let mut session = Feed::connect(&url, &[("Cookie", &cookie)]).await.unwrap();
    session.subscribed().await;
    let (status, _, page) = http_request(collector.http, "GET", "/", &[], "").await;
    assert_eq!(status, 401);
    assert!(page.contains("/login"), "{page}");
    // A second later, one guess is answered again: the right token logs in.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let (status, set_cookie) = log_in(collector.http, "watchers-secret", &[]).await;
    assert_eq!((status, set_cookie.is_some()), (303, true));
    let (_, _, metrics) = http_request(collector.http, "GET", "/metrics", &[], "").await;
    assert!(
        metrics.contains("trazor_collector_feed_auth_throttled_total 3"),
        "{metrics}"
    );
}

/// The real binary: without a feed token it says loudly that the feed is open; with
/// `TRAZOR_FEED_TOKEN` it does not, and the feed needs the token.
#[tokio::test]
async fn the_collector_warns_at_start_when_the_feed_is_open() {
    for token in [None, Some("from-the-environment")] {
        // Ready once /readyz answers; the warning comes as serving starts.
        let collector = CollectorProcess::start(token, None);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let log = std::fs::read_to_string(&collector.log).unwrap();
        assert!(log.contains("collector serving"), "{log}");
        let warned = log.contains("the live feed and dashboard are OPEN");
        assert_eq!(warned, token.is_none(), "{log}");
        let url = format!("ws://{}/ws", collector.http);
        match token {
            None => drop(Feed::connect(&url, &[]).await.unwrap()),
            Some(token) => {
                assert_eq!(Feed::connect(&url, &[]).await.err().unwrap().0, 401);
                let bearer = format!("Bearer {token}");
                drop(
                    Feed::connect(&url, &[("Authorization", &bearer)])
                        .await
                        .unwrap(),
                );
            }
        }
    }
}
