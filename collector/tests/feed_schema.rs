//! `collector/feed.schema.json` against real frames: a real collector, fed over gRPC, sends
//! every kind of frame (subscribed; windows of a pod, a standalone process, a client with
//! its peer, a late one; aggregates of a workload, an ownerless pod and a process; missed;
//! every error code) over real WebSockets, and each must validate. The schema's own
//! examples and the control messages clients send validate too; frames that drifted from
//! it (a field missing, one added, a wrong type) must not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod feed_support;

use std::time::Duration;

use feed_support::{Agent, Running, SECOND, TestWindow, unix_nanos};
use serde_json::{Value, json};
use trazor_collector::{CollectorConfig, feed::FeedConfig};
use trazor_proto::v1::Direction;

fn validator() -> (jsonschema::Validator, Value) {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/feed.schema.json")).unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    jsonschema::meta::validate(&schema).expect("a valid JSON Schema");
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    (validator, schema)
}

fn assert_valid(validator: &jsonschema::Validator, frame: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(frame)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{frame}\ndoes not match the schema:\n{errors:#?}"
    );
}

#[tokio::test]
async fn real_frames_of_every_kind_match_the_schema() {
    let (validator, schema) = validator();
    for (name, definition) in schema["$defs"].as_object().unwrap() {
        for example in definition["examples"].as_array().into_iter().flatten() {
            assert_valid(&validator, example);
            assert!(!name.is_empty());
        }
    }

    let collector = Running::start(CollectorConfig {
        late_grace: Duration::from_millis(300),
        feed: FeedConfig {
            queue: 4,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut feed = collector.feed("history=0").await;
    let mut frames = vec![feed.subscribed().await];
    let mut agent = Agent::connect(&collector.grpc, "agent-1").await;
    let end_unix_nanos = unix_nanos() + 2 * SECOND;
    let windows = [
        TestWindow {
            end_unix_nanos,
            ..Default::default()
        },
        TestWindow {
            end_unix_nanos,
            namespace: "",
            workload: "",
            pod: "",
            process: "nginx",
            profile: "",
            ..Default::default()
        },
        TestWindow {
            end_unix_nanos,
            workload: "",
            pod: "lonely",
            direction: Direction::Client,
            ..Default::default()
        },
        // Its aggregate closed long ago: late.
        TestWindow {
            end_unix_nanos: unix_nanos() - 60 * SECOND,
            ..Default::default()
        },
    ];
    for window in &windows {
        agent.send_test(window).await;
    }
    // Four windows, then the three aggregates of the on-time ones.
    frames.extend(feed.items(7).await);
    let types: Vec<_> = frames.iter().map(|frame| frame["type"].clone()).collect();
    assert_eq!(
        types,
        [
            "subscribed",
            "window",
            "window",
            "window",
            "window",
            "aggregate",
            "aggregate",
            "aggregate"
        ]
    );
    assert_eq!(frames[4]["late"], true);
    assert_eq!(frames[3]["peer"]["port"], 8080);
    let subjects: Vec<_> = frames[5..]
        .iter()
        .map(|aggregate| aggregate["subject"]["kind"].as_str().unwrap().to_owned())
        .collect();
    for kind in ["workload", "process", "pod"] {
        assert!(
            subjects.iter().any(|subject| subject == kind),
            "{subjects:?}"
        );
    }

    for message in [
        "{",
        r#"{"type":"hello"}"#,
        r#"{"type":"subscribe","since":1}"#,
        r#"{"type":"subscribe","filter":{"team":["a"]}}"#,
        r#"{"type":"subscribe","kind":"some"}"#,
    ] {
        feed.send_text(message).await;
        let error = feed.json().await;
        assert_eq!(error["type"], "error");
        frames.push(error);
    }
    let codes: Vec<_> = frames
        .iter()
        .filter(|frame| frame["type"] == "error")
        .map(|frame| frame["code"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        codes,
        [
            "bad_json",
            "unknown_type",
            "unknown_field",
            "unknown_filter",
            "bad_value"
        ]
    );
    let subscribe = json!({
        "type": "subscribe",
        "filter": {"namespace": ["shop"], "direction": ["server"]},
        "kind": "windows",
        "history": {"last": 2}
    });
    assert_valid(&validator, &subscribe);
    feed.send_text(&subscribe.to_string()).await;
    frames.push(feed.subscribed().await);
    frames.extend(feed.items(2).await);

    // A `missed` frame: a client that stops reading while big windows pour in (alone:
    // the first client would miss some too).
    drop(feed);
    let mut slow = collector.feed("history=0").await;
    frames.push(slow.subscribed().await);
    let big = TestWindow {
        // 2 000 buckets sent dense.
        buckets: vec![(1_000, 1), (2_999, 1)],
        ..Default::default()
    };
    while collector
        .metric("trazor_collector_feed_dropped_total")
        .await
        == 0
    {
        for _ in 0..50 {
            agent.send_test(&big).await;
        }
    }
    let missed = loop {
        let frame = slow.json().await;
        if frame["type"] == "missed" {
            break frame;
        }
    };
    frames.push(missed);

    for frame in &frames {
        assert_valid(&validator, frame);
    }

    // The schema has teeth: drifted frames fail.
    let window = frames[1].clone();
    let mut missing = window.clone();
    missing.as_object_mut().unwrap().remove("count");
    let mut added = window.clone();
    added["colour"] = json!("red");
    let mut wrong_type = window.clone();
    wrong_type["percentiles"]["p99"] = json!("slow");
    let mut bad_direction = frames[5].clone();
    bad_direction["direction"] = json!("sideways");
    let mut bad_code = frames
        .iter()
        .find(|f| f["type"] == "error")
        .unwrap()
        .clone();
    bad_code["code"] = json!("oops");
    for drifted in [
        missing,
        added,
        wrong_type,
        bad_direction,
        bad_code,
        json!({"type": "lagged", "missed": 3}),
    ] {
        assert!(
            !validator.is_valid(&drifted),
            "the schema accepted {drifted}"
        );
    }
}
