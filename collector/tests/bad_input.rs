//! Bad input over real sockets: malformed, truncated, oversized and unauthenticated
//! streams each get a clear gRPC status, while a healthy agent's stream, open the whole
//! time, keeps being acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};
use trazor_collector::{BoundCollector, CollectorConfig, stats::CollectorStats};
use trazor_proto::v1::{
    AgentHello, AgentMessage, CollectorMessage, LatencyWindow, agent_message, collector_message,
};

/// Sends bytes as they are, so a test can put anything in a gRPC frame.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; bytes::Buf::remaining(src)];
        bytes::Buf::copy_to_slice(src, &mut out);
        Ok(Some(out))
    }
}

const TOKEN: &str = "test-token-7f3a";
const MAX_MESSAGE: usize = 64 * 1024;

async fn collector() -> (String, std::sync::Arc<CollectorStats>) {
    let collector = BoundCollector::bind(&CollectorConfig {
        token: Some(TOKEN.into()),
        max_message_bytes: MAX_MESSAGE,
        ..Default::default()
    })
    .await
    .unwrap();
    let grpc = format!("http://{}", collector.grpc_addr());
    let stats = collector.stats();
    tokio::spawn(collector.serve());
    (grpc, stats)
}

fn hello(agent: &str) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Hello(AgentHello {
            node_name: "node".into(),
            agent_id: agent.into(),
            boot_id: "boot".into(),
            version: "test".into(),
            capabilities: vec![],
        })),
    }
}

fn window(sequence: u64, profile_bytes: usize) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Window(LatencyWindow {
            sequence,
            start_unix_nanos: 1_000_000_000,
            end_unix_nanos: 2_000_000_000,
            profile: "p".repeat(profile_bytes),
            ..Default::default()
        })),
    }
}

/// Opens a raw stream with `token` and `messages`, and returns the status it ends with.
async fn raw_stream(grpc: &str, token: Option<&str>, messages: Vec<Vec<u8>>) -> Status {
    let channel = Channel::from_shared(grpc.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let (sender, receiver) = mpsc::channel(16);
    for message in messages {
        sender.send(message).await.unwrap();
    }
    drop(sender);
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let path = PathAndQuery::from_static("/trazor.v1.LatencyIngest/Stream");
    let response = client.streaming(request, path, RawCodec).await;
    let mut inbound = match response {
        Err(status) => return status,
        Ok(response) => response.into_inner(),
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("the collector answers a bad stream promptly")
        {
            Ok(Some(_)) => continue,
            Ok(None) => return Status::ok("stream ended without an error"),
            Err(status) => return status,
        }
    }
}

/// A well-behaved agent stream: sends window `n` and waits for its ack.
struct HealthyAgent {
    sender: mpsc::Sender<AgentMessage>,
    acks: tonic::Streaming<CollectorMessage>,
    next: u64,
}

impl HealthyAgent {
    async fn connect(grpc: &str) -> Self {
        let channel = Channel::from_shared(grpc.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token = format!("Bearer {TOKEN}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .unwrap();
        let mut client =
            trazor_proto::v1::latency_ingest_client::LatencyIngestClient::with_interceptor(
                channel,
                move |mut request: tonic::Request<()>| {
                    request
                        .metadata_mut()
                        .insert("authorization", token.clone());
                    Ok(request)
                },
            );
        let (sender, receiver) = mpsc::channel(16);
        sender.send(hello("healthy")).await.unwrap();
        let acks = client
            .stream(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        Self {
            sender,
            acks,
            next: 1,
        }
    }

    async fn still_flowing(&mut self) {
        let sequence = self.next;
        self.next += 1;
        self.sender.send(window(sequence, 10)).await.unwrap();
        let message = tokio::time::timeout(Duration::from_secs(10), self.acks.message())
            .await
            .expect("the healthy stream is acknowledged")
            .unwrap()
            .unwrap();
        let Some(collector_message::Kind::Ack(ack)) = message.kind else {
            panic!("expected an ack");
        };
        assert_eq!(ack.acked_through, sequence);
    }
}

#[tokio::test]
async fn bad_streams_get_clear_statuses_and_the_healthy_one_keeps_flowing() {
    let (grpc, stats) = collector().await;
    let mut healthy = HealthyAgent::connect(&grpc).await;
    healthy.still_flowing().await;

    // Unauthenticated: no token, then a wrong one.
    let status = raw_stream(&grpc, None, vec![hello("a").encode_to_vec()]).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("Bearer"), "{status:?}");
    healthy.still_flowing().await;
    let status = raw_stream(&grpc, Some("wrong"), vec![hello("a").encode_to_vec()]).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    healthy.still_flowing().await;

    // Malformed: bytes that are no AgentMessage, as the first message and after a hello.
    let garbage = vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x12, 0x99];
    let status = raw_stream(&grpc, Some(TOKEN), vec![garbage.clone()]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("malformed"), "{status:?}");
    healthy.still_flowing().await;
    let status = raw_stream(
        &grpc,
        Some(TOKEN),
        vec![hello("b").encode_to_vec(), garbage],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    healthy.still_flowing().await;

    // Truncated: a window cut off in the middle of a field.
    let mut truncated = window(1, 200).encode_to_vec();
    truncated.truncate(truncated.len() / 2);
    let status = raw_stream(
        &grpc,
        Some(TOKEN),
        vec![hello("c").encode_to_vec(), truncated],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    healthy.still_flowing().await;

    // Oversized: a window bigger than the limit.
    let oversized = window(1, MAX_MESSAGE * 2).encode_to_vec();
    let status = raw_stream(
        &grpc,
        Some(TOKEN),
        vec![hello("d").encode_to_vec(), oversized],
    )
    .await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("size limit"), "{status:?}");
    healthy.still_flowing().await;

    // No hello at all, and a hello without ids.
    let status = raw_stream(&grpc, Some(TOKEN), vec![window(1, 1).encode_to_vec()]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = raw_stream(&grpc, Some(TOKEN), vec![hello("").encode_to_vec()]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    healthy.still_flowing().await;

    let metrics = stats.render();
    for line in [
        "trazor_collector_streams_unauthenticated_total 2",
        "trazor_collector_messages_malformed_total 3",
        "trazor_collector_messages_oversized_total 1",
        "trazor_collector_streams_open 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn streams_per_agent_are_limited() {
    let collector = BoundCollector::bind(&CollectorConfig {
        agent_limits: trazor_collector::limits::AgentLimitConfig {
            max_streams: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let grpc = format!("http://{}", collector.grpc_addr());
    tokio::spawn(collector.serve());
    let channel = Channel::from_shared(grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = trazor_proto::v1::latency_ingest_client::LatencyIngestClient::new(channel);
    let (first, receiver) = mpsc::channel(4);
    first.send(hello("same")).await.unwrap();
    let _open = client.stream(ReceiverStream::new(receiver)).await.unwrap();
    let status = raw_stream(&grpc, None, vec![hello("same").encode_to_vec()]).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("already has 1 streams open"),
        "{status:?}"
    );
}
