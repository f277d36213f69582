//! The collector over real sockets: a tonic client streams windows to it, a WebSocket client
//! reads its feed. Duplicates are dropped, acks are cumulative, bad streams are refused with
//! a status while good ones keep flowing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::pod_window;
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use trazor_collector::{BoundCollector, CollectorConfig};
use trazor_proto::v1::{
    AgentHello, AgentMessage, LatencyStats, LatencyWindow, Source, agent_message,
    collector_message, latency_ingest_client::LatencyIngestClient,
};

async fn collector() -> (
    String,
    String,
    std::sync::Arc<trazor_collector::stats::CollectorStats>,
) {
    let loopback = "127.0.0.1:0".parse().unwrap();
    let collector = BoundCollector::bind(&CollectorConfig {
        grpc_listen: loopback,
        http_listen: loopback,
        history: 100,
        ..Default::default()
    })
    .await
    .unwrap();
    let grpc = format!("http://{}", collector.grpc_addr());
    let http = collector.http_addr().to_string();
    let stats = collector.stats();
    tokio::spawn(collector.serve());
    (grpc, http, stats)
}

fn hello(agent: &str) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Hello(AgentHello {
            node_name: "node-a".into(),
            agent_id: agent.into(),
            boot_id: "boot-1".into(),
            version: "test".into(),
            capabilities: vec![],
        })),
    }
}

fn window(sequence: u64, count: u64) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Window(LatencyWindow {
            sequence,
            source: Some(Source {
                pid: 7,
                process_name: "svc".into(),
                ..Default::default()
            }),
            start_unix_nanos: 1_700_000_000_000_000_000,
            end_unix_nanos: 1_700_000_010_000_000_000,
            stats: Some(LatencyStats {
                count,
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn duplicates_are_acked_but_published_once() {
    let (grpc, http, stats) = collector().await;
    let mut client = LatencyIngestClient::connect(grpc).await.unwrap();
    let (sender, receiver) = mpsc::channel(16);
    sender.send(hello("agent-1")).await.unwrap();
    let mut acks = client
        .stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    // A resend after a reconnect looks like this: 1, 2, then 2 and 1 again, then 3.
    for (sequence, count) in [(1, 10), (2, 20), (2, 20), (1, 10), (3, 30)] {
        sender.send(window(sequence, count)).await.unwrap();
        let ack = acks.message().await.unwrap().unwrap();
        let Some(collector_message::Kind::Ack(ack)) = ack.kind else {
            panic!("expected an ack");
        };
        assert_eq!(ack.acked_through, sequence);
    }
    let (mut feed, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
        .await
        .unwrap();
    let mut counts = Vec::new();
    while counts.len() < 3 {
        let Some(Ok(Message::Text(text))) = feed.next().await else {
            panic!("feed closed");
        };
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        // The feed opens with its `subscribed` acknowledgement (collector/FEED.md).
        if json["type"] == "window" {
            counts.push(json["count"].as_u64().unwrap());
        }
    }
    assert_eq!(counts, vec![10, 20, 30]);
    // Nothing more: a fourth message would be a duplicate published.
    let extra = tokio::time::timeout(Duration::from_millis(300), feed.next()).await;
    assert!(extra.is_err(), "no duplicate on the feed: {extra:?}");
    let metrics = stats.render();
    assert!(
        metrics.contains("trazor_collector_windows_duplicate_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trazor_collector_windows_published_total 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_stream_without_hello_is_refused_and_others_keep_flowing() {
    let (grpc, _http, stats) = collector().await;
    let mut good = LatencyIngestClient::connect(grpc.clone()).await.unwrap();
    let (good_sender, receiver) = mpsc::channel(16);
    good_sender.send(hello("good")).await.unwrap();
    let mut good_acks = good
        .stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();

    let mut bad = LatencyIngestClient::connect(grpc).await.unwrap();
    let (bad_sender, receiver) = mpsc::channel(16);
    bad_sender.send(window(1, 1)).await.unwrap();
    let status = bad
        .stream(ReceiverStream::new(receiver))
        .await
        .expect_err("a stream must start with AgentHello");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("AgentHello"),
        "{}",
        status.message()
    );

    good_sender.send(window(1, 5)).await.unwrap();
    let ack = good_acks.message().await.unwrap().unwrap();
    assert!(matches!(ack.kind, Some(collector_message::Kind::Ack(ack)) if ack.acked_through == 1));
    assert!(
        stats
            .render()
            .contains("trazor_collector_streams_rejected_total 1")
    );
}

#[tokio::test]
async fn an_address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let error = BoundCollector::bind(&CollectorConfig {
        grpc_listen: taken.local_addr().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        history: 1,
        ..Default::default()
    })
    .await
    .err()
    .expect("the port is taken");
    let message = error.to_string();
    assert!(message.contains("--grpc-listen"), "{message}");
}

/// Two agents report the same workload's window; after the grace period the feed carries
/// one aggregate whose histogram is the exact sum, and a window arriving after that is
/// published alone, marked late, and counted.
#[tokio::test]
async fn windows_from_two_agents_merge_exactly_and_late_ones_are_counted() {
    let collector = BoundCollector::bind(&CollectorConfig {
        late_grace: Duration::from_millis(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let grpc = format!("http://{}", collector.grpc_addr());
    let http = collector.http_addr();
    let stats = collector.stats();
    tokio::spawn(collector.serve());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    // The window ends at the next second: not late on arrival, closes 300 ms after.
    let end = (now / 1_000_000_000 + 1) * 1_000_000_000;
    let (mut feed, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
        .await
        .unwrap();
    let mut streams = Vec::new();
    for (agent, pod, buckets) in [
        ("agent-a", "checkout-1", vec![(1_400, 3), (1_500, 1)]),
        ("agent-b", "checkout-2", vec![(1_450, 2), (1_500, 4)]),
    ] {
        let mut client = LatencyIngestClient::connect(grpc.clone()).await.unwrap();
        let (sender, receiver) = mpsc::channel(4);
        sender.send(hello(agent)).await.unwrap();
        let mut acks = client
            .stream(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        sender
            .send(pod_window(1, pod, end, &buckets, &[]))
            .await
            .unwrap();
        acks.message().await.unwrap().unwrap();
        streams.push((sender, acks));
    }
    let aggregate = loop {
        let message = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("the aggregate is published after the grace period");
        let Some(Ok(Message::Text(text))) = message else {
            panic!("feed closed");
        };
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        if json["type"] == "aggregate" {
            break json;
        }
    };
    assert_eq!(aggregate["subject"]["workload_name"], "checkout");
    assert_eq!(aggregate["windows"], 2);
    assert_eq!(aggregate["count"], 10);
    let counts: Vec<u64> = aggregate["histogram"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert_eq!(aggregate["histogram"]["offset"], 1_400);
    assert_eq!((counts[0], counts[50], counts[100]), (3, 2, 5));
    assert_eq!(counts.iter().sum::<u64>(), 10);

    // A third pod's window for the same period, after the aggregate closed: late.
    let (sender, acks) = &mut streams[0];
    let late = pod_window(2, "checkout-3", end, &[(1_400, 1)], &[]);
    sender.send(late).await.unwrap();
    acks.message().await.unwrap().unwrap();
    let late_json = loop {
        let Some(Ok(Message::Text(text))) = feed.next().await else {
            panic!("feed closed");
        };
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        if json["type"] == "window" && json["sequence"] == 2 {
            break json;
        }
    };
    assert_eq!(late_json["late"], true);
    assert!(
        stats
            .render()
            .contains("trazor_collector_windows_late_total 1")
    );
}
