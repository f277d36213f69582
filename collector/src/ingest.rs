//! Ingest: the gRPC `LatencyIngest` service agents stream windows to.
//!
//! Each stream must open with an `AgentHello`; the agent's stream count is checked, and if
//! the collector already holds windows of this (agent id, boot id) it acks them at once so
//! the agent skips resending them. Then windows are read in batches (whatever has arrived,
//! up to [`MAX_BATCH`]): each is checked against its (agent, boot) mark, new ones are
//! journaled (with `--state-dir`), merged into their aggregate and published, and the batch
//! is acknowledged with one cumulative ack. A bad stream gets a gRPC status saying what was
//! wrong and a log line; other streams are unaffected.

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use futures::{FutureExt as _, Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use trazor_proto::v1::{
    Ack, AgentHello, AgentMessage, CollectorMessage, LatencyWindow, agent_message,
    collector_message, latency_ingest_server::LatencyIngest,
};

use crate::{
    dedup::{Deduplicator, SequenceMark},
    feed::WindowFeed,
    journal::Journal,
    limits::{AgentLimits, StreamLease},
    merge::{Aggregate, Merged, WindowMerger, validate},
    otlp::OtlpExporter,
    stats::CollectorStats,
};

/// Messages handled per ack at most.
pub const MAX_BATCH: usize = 512;

/// Shared by every stream (cheap to clone).
#[derive(Clone, Debug)]
pub struct IngestService {
    pub dedup: Arc<Deduplicator>,
    pub feed: Arc<WindowFeed>,
    pub stats: Arc<CollectorStats>,
    pub merger: Arc<WindowMerger>,
    pub limits: Arc<AgentLimits>,
    pub journal: Option<Arc<Journal>>,
    /// Where closed aggregates and late windows go as OTLP metrics, when configured.
    pub otlp: Option<OtlpExporter>,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<CollectorMessage, Status>> + Send>>;

fn ack(acked_through: u64) -> CollectorMessage {
    CollectorMessage {
        kind: Some(collector_message::Kind::Ack(Ack { acked_through })),
    }
}

pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}

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
            Some(Err(status)) => return Err(self.classify(&peer, "", status)),
            None => return Err(self.reject(&peer, "the stream ended before an AgentHello")),
        };
        if hello.agent_id.is_empty() || hello.boot_id.is_empty() {
            return Err(self.reject(&peer, "AgentHello needs a non-empty agent_id and boot_id"));
        }
        let lease = self.limits.open_stream(&hello.agent_id).map_err(|open| {
            self.stats
                .streams_over_limit
                .fetch_add(1, Ordering::Relaxed);
            let reason = format!(
                "agent {:?} already has {open} streams open, the limit is {}; an agent needs one \
                 (is another agent using the same --agent-id?)",
                hello.agent_id,
                self.limits.max_streams()
            );
            tracing::warn!(%peer, "refused an agent stream: {reason}");
            Status::resource_exhausted(reason)
        })?;
        let mark = self.dedup.mark(&hello.agent_id, &hello.boot_id);
        let already = mark.highest();
        tracing::info!(
            %peer, agent = %hello.agent_id, node = %hello.node_name, boot = %hello.boot_id,
            version = %hello.version, acked_through = already, "agent stream opened"
        );
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        self.stats.streams_open.fetch_add(1, Ordering::Relaxed);
        let (acks, ack_stream) = mpsc::channel(64);
        if already > 0 {
            // Tell a reconnecting agent what it need not resend.
            let _ = acks.try_send(Ok(ack(already)));
        }
        let stream = AgentStream {
            service: self.clone(),
            agent_id: hello.agent_id.as_str().into(),
            boot_id: hello.boot_id.as_str().into(),
            hello,
            peer,
            mark,
            lease,
        };
        tokio::spawn(stream.receive(inbound, acks));
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_stream))))
    }
}

impl IngestService {
    fn reject(&self, peer: &str, reason: &str) -> Status {
        self.stats.streams_rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, "rejected an agent stream: {reason}");
        Status::invalid_argument(reason)
    }

    /// Turns a decoding failure into the status the agent should see, and counts it.
    fn classify(&self, peer: &str, agent: &str, status: Status) -> Status {
        let message = status.message().to_owned();
        let (counter, status) =
            if status.code() == Code::OutOfRange || message.contains("message length too large") {
                (
                    &self.stats.messages_oversized,
                    Status::resource_exhausted(format!(
                        "message over the collector's size limit: {message}"
                    )),
                )
            } else if status.code() == Code::Internal || status.code() == Code::InvalidArgument {
                (
                    &self.stats.messages_malformed,
                    Status::invalid_argument(format!(
                        "malformed or truncated message, not a trazor.v1.AgentMessage: {message}"
                    )),
                )
            } else {
                // Cancelled, transport errors: the agent went away, not bad input.
                tracing::info!(%peer, agent, "agent stream ended: {message}");
                return status;
            };
        counter.fetch_add(1, Ordering::Relaxed);
        self.stats.streams_rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, agent, "rejected an agent stream: {}", status.message());
        status
    }

    /// Merges and publishes a window that passed dedup (and the journal).
    pub(crate) fn accept(
        &self,
        agent_id: &Arc<str>,
        boot_id: &Arc<str>,
        window: LatencyWindow,
        now: u64,
    ) {
        let late = self.merger.accept(&window, now) == Merged::Late;
        if late {
            self.stats.windows_late.fetch_add(1, Ordering::Relaxed);
            // Its aggregate went out without it: it goes out alone, for the same interval.
            if let Some(otlp) = &self.otlp {
                otlp.export(vec![Aggregate::of_window(&window)]);
            }
            tracing::debug!(
                agent = %agent_id, sequence = window.sequence,
                "late window: its aggregate closed {} after its end",
                humantime::format_duration(self.merger.grace())
            );
        } else {
            self.stats.windows_merged.fetch_add(1, Ordering::Relaxed);
        }
        self.feed.publish_window(agent_id, boot_id, window, late);
    }
}

/// One accepted stream.
struct AgentStream {
    service: IngestService,
    hello: AgentHello,
    agent_id: Arc<str>,
    boot_id: Arc<str>,
    peer: String,
    mark: Arc<SequenceMark>,
    lease: StreamLease,
}

type AckSender = mpsc::Sender<Result<CollectorMessage, Status>>;

impl AgentStream {
    async fn receive(self, mut inbound: Streaming<AgentMessage>, acks: AckSender) {
        let stats = self.service.stats.clone();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        'stream: loop {
            let mut failure = None;
            let mut ended = false;
            match inbound.next().await {
                Some(Ok(message)) => batch.push(message),
                Some(Err(status)) => failure = Some(status),
                None => ended = true,
            }
            // Whatever else has already arrived joins this batch and shares its ack.
            while failure.is_none() && !ended && batch.len() < MAX_BATCH {
                match inbound.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.push(message),
                    Some(Some(Err(status))) => failure = Some(status),
                    Some(None) => ended = true,
                    None => break,
                }
            }
            if !batch.is_empty() {
                let wait = self.lease.take(batch.len());
                if !wait.is_zero() {
                    stats
                        .windows_throttled
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                }
                match self.handle(&mut batch) {
                    Ok(Some(through)) => {
                        stats.acks_sent.fetch_add(1, Ordering::Relaxed);
                        if acks.send(Ok(ack(through))).await.is_err() {
                            break 'stream;
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        let _ = acks.send(Err(status)).await;
                        break 'stream;
                    }
                }
            }
            if let Some(status) = failure {
                let status = self
                    .service
                    .classify(&self.peer, &self.hello.agent_id, status);
                let _ = acks.send(Err(status)).await;
                break;
            }
            if ended {
                tracing::info!(peer = %self.peer, agent = %self.hello.agent_id, "agent stream closed");
                break;
            }
        }
        stats.streams_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Dedups, journals, merges and publishes a batch; returns the sequence to ack.
    fn handle(&self, batch: &mut Vec<AgentMessage>) -> Result<Option<u64>, Status> {
        let service = &self.service;
        let stats = &service.stats;
        let mut fresh = Vec::new();
        let mut through = None;
        {
            let mut highest = self.mark.lock();
            let mut accepted = *highest;
            for message in batch.drain(..) {
                let window = match message.kind {
                    Some(agent_message::Kind::Window(window)) => window,
                    Some(agent_message::Kind::Hello(_)) => {
                        stats.streams_rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %self.peer, agent = %self.hello.agent_id,
                            "rejected an agent stream: a second AgentHello");
                        return Err(Status::invalid_argument(
                            "AgentHello may only be sent once, first",
                        ));
                    }
                    None => {
                        tracing::debug!(agent = %self.hello.agent_id, "ignoring a message of an unknown kind");
                        continue;
                    }
                };
                stats.windows_received.fetch_add(1, Ordering::Relaxed);
                through = Some(through.unwrap_or(0).max(window.sequence));
                if let Err(reason) = validate(&window) {
                    stats.windows_invalid.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(agent = %self.hello.agent_id, sequence = window.sequence,
                        "dropping an invalid window: {reason}");
                    continue;
                }
                if window.sequence <= accepted {
                    stats.windows_duplicate.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                accepted = window.sequence;
                fresh.push(window);
            }
            // Exemplar spans are queued (and spooled, with a state dir) before the windows are
            // journaled: a kill between the two sends them twice after the restart (the agent
            // resends the unacknowledged windows), rather than never (a replayed window's
            // exemplars are not exported again).
            if let Some(otlp) = &service.otlp {
                for window in &fresh {
                    otlp.export_exemplars(window);
                }
            }
            if let Some(journal) = &service.journal
                && let Err(error) = journal.append(&self.agent_id, &self.boot_id, &fresh)
            {
                stats.journal_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "writing the journal failed; not acknowledging the windows");
                return Err(Status::unavailable(format!(
                    "the collector could not record the windows ({error}); retry later"
                )));
            }
            *highest = accepted;
        }
        if let Some(journal) = &service.journal
            && let Err(error) = journal.rotate_if_full(&service.dedup)
        {
            stats.journal_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "starting a new journal segment failed");
        }
        let now = unix_nanos();
        for window in fresh {
            service.accept(&self.agent_id, &self.boot_id, window, now);
        }
        Ok(through)
    }
}
