//! Ingest: the gRPC `LatencyIngest` service agents stream windows to.
//!
//! Each stream must open with an `AgentHello`; each window is checked against the
//! (agent id, boot id, sequence) it carries, published once, and acknowledged cumulatively.
//! A bad stream gets a gRPC status saying what was wrong; other streams are unaffected.

use std::{pin::Pin, sync::Arc, sync::atomic::Ordering};

use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trazor_proto::v1::{
    Ack, AgentHello, AgentMessage, CollectorMessage, agent_message, collector_message,
    latency_ingest_server::LatencyIngest,
};

use crate::{dedup::Deduplicator, feed::WindowFeed, stats::CollectorStats, view::WindowView};

/// Shared by every stream (cheap to clone).
#[derive(Clone, Debug)]
pub struct IngestService {
    pub dedup: Arc<Deduplicator>,
    pub feed: Arc<WindowFeed>,
    pub stats: Arc<CollectorStats>,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<CollectorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl LatencyIngest for IngestService {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |address| address.to_string());
        let mut inbound = request.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello)),
            })) => hello,
            Some(Ok(_)) => {
                return Err(self.reject(&peer, "the first message must be an AgentHello"));
            }
            Some(Err(status)) => return Err(status),
            None => return Err(self.reject(&peer, "the stream ended before an AgentHello")),
        };
        if hello.agent_id.is_empty() || hello.boot_id.is_empty() {
            return Err(self.reject(&peer, "AgentHello needs a non-empty agent_id and boot_id"));
        }
        tracing::info!(
            %peer, agent = %hello.agent_id, node = %hello.node_name, boot = %hello.boot_id,
            version = %hello.version, "agent stream opened"
        );
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        self.stats.streams_open.fetch_add(1, Ordering::Relaxed);
        let (acks, ack_stream) = mpsc::channel(64);
        tokio::spawn(receive_windows(self.clone(), hello, inbound, acks));
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_stream))))
    }
}

impl IngestService {
    fn reject(&self, peer: &str, reason: &str) -> Status {
        self.stats.streams_rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, "rejected an agent stream: {reason}");
        Status::invalid_argument(reason)
    }
}

async fn receive_windows(
    service: IngestService,
    hello: AgentHello,
    mut inbound: Streaming<AgentMessage>,
    acks: mpsc::Sender<Result<CollectorMessage, Status>>,
) {
    let stats = &service.stats;
    loop {
        let message = match inbound.next().await {
            Some(Ok(message)) => message,
            Some(Err(status)) => {
                tracing::info!(agent = %hello.agent_id, "agent stream ended: {}", status.message());
                break;
            }
            None => break,
        };
        let window = match message.kind {
            Some(agent_message::Kind::Window(window)) => window,
            Some(agent_message::Kind::Hello(_)) => {
                let _ = acks
                    .send(Err(Status::invalid_argument(
                        "AgentHello may only be sent once, first",
                    )))
                    .await;
                break;
            }
            None => {
                tracing::debug!(agent = %hello.agent_id, "ignoring a message of an unknown kind");
                continue;
            }
        };
        stats.windows_received.fetch_add(1, Ordering::Relaxed);
        if service
            .dedup
            .first_sighting(&hello.agent_id, &hello.boot_id, window.sequence)
        {
            let view = WindowView::new(&hello.agent_id, &hello.boot_id, &window);
            match serde_json::to_string(&view) {
                Ok(json) => service.feed.publish(json),
                Err(error) => tracing::error!(%error, "could not encode a window as JSON"),
            }
        } else {
            stats.windows_duplicate.fetch_add(1, Ordering::Relaxed);
        }
        let ack = CollectorMessage {
            kind: Some(collector_message::Kind::Ack(Ack {
                acked_through: window.sequence,
            })),
        };
        if acks.send(Ok(ack)).await.is_err() {
            break;
        }
    }
    stats.streams_open.fetch_sub(1, Ordering::Relaxed);
}
