//! Ship: delivers windows to the collector over one gRPC stream, exactly once.
//!
//! Closed windows wait in the [`Outbox`], a bounded buffer numbered by sequence, until the
//! collector acknowledges them. After a reconnect every unacknowledged window is sent again;
//! the collector drops the duplicates by (agent id, boot id, sequence). When the buffer is
//! full the oldest window is dropped and counted: the agent never blocks the kernel side.
//!
//! With a [`Spool`] the outbox is also on disk: windows are written (and synced) there as
//! they close, so an agent restart resends what the collector had not acknowledged, under
//! the same boot id and sequence numbers, and the collector's dedup still recognises them.
//! The stream carries `authorization: Bearer <token>` when the agent has a token.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::FutureExt as _;
use rand::Rng as _;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use trazor_proto::v1::{
    AgentHello, AgentMessage, CollectorMessage, LatencyWindow, agent_message, collector_message,
    latency_ingest_client::LatencyIngestClient,
};

use crate::{
    Error, Result,
    spool::{Recovered, Spool, SpoolConfig},
};

/// Counters of the delivery path; exported by the agent.
#[derive(Debug, Default)]
pub struct ShipperStats {
    /// Windows handed to the outbox.
    pub windows_closed: AtomicU64,
    /// Window messages written to a stream (including resends).
    pub windows_sent: AtomicU64,
    /// Of those, sent again after a reconnect.
    pub windows_resent: AtomicU64,
    /// Windows the collector acknowledged.
    pub windows_acked: AtomicU64,
    /// Windows dropped because the outbox was full (oldest first).
    pub windows_dropped: AtomicU64,
    /// Streams opened after the first.
    pub reconnects: AtomicU64,
    /// Streams that ended in an error (refused, cut, collector gone).
    pub stream_failures: AtomicU64,
    /// Whether a stream is open now.
    pub connected: AtomicBool,
    /// Windows recovered from the spool at start (not yet acknowledged before a restart).
    pub spool_recovered: AtomicU64,
    /// Torn or corrupt spool records found at start (each ended its segment there).
    pub spool_truncated: AtomicU64,
    /// Windows whose spool segment was deleted, unacknowledged, because the spool was full.
    pub spool_dropped: AtomicU64,
    /// Spool writes that failed (the windows stay in memory).
    pub spool_errors: AtomicU64,
}

/// Bounded buffer of windows not yet acknowledged by the collector.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    changed: Notify,
    stats: Arc<ShipperStats>,
    spool: Option<Mutex<Spool>>,
}

#[derive(Debug)]
struct OutboxState {
    next_sequence: u64,
    acked_through: u64,
    unacked: VecDeque<LatencyWindow>,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize, stats: Arc<ShipperStats>) -> Self {
        Self {
            state: Mutex::new(OutboxState {
                next_sequence: 1,
                acked_through: 0,
                unacked: VecDeque::new(),
                capacity: capacity.max(1),
            }),
            changed: Notify::new(),
            stats,
            spool: None,
        }
    }

    /// An outbox backed by `spool`, holding what the spool recovered: sequences continue
    /// after the highest one spooled.
    pub fn with_spool(
        capacity: usize,
        stats: Arc<ShipperStats>,
        spool: Spool,
        recovered: Recovered,
    ) -> Self {
        let mut outbox = Self::new(capacity, stats);
        let mut unacked: VecDeque<LatencyWindow> = recovered.windows.into();
        let capacity = outbox.state().capacity;
        while unacked.len() > capacity {
            unacked.pop_front();
            outbox.stats.windows_dropped.fetch_add(1, Ordering::Relaxed);
        }
        outbox
            .stats
            .spool_recovered
            .store(unacked.len() as u64, Ordering::Relaxed);
        {
            let state = outbox
                .state
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.next_sequence = recovered.next_sequence;
            state.acked_through = recovered.acked_through;
            state.unacked = unacked;
        }
        outbox.spool = Some(Mutex::new(spool));
        outbox
    }

    fn spool(&self) -> Option<std::sync::MutexGuard<'_, Spool>> {
        self.spool.as_ref().map(|spool| {
            spool
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        })
    }

    /// The counters this outbox updates.
    pub fn stats(&self) -> &Arc<ShipperStats> {
        &self.stats
    }

    fn state(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        // A panic while holding this lock cannot leave the queue half-updated in a way that
        // matters more than losing the agent, so recover the data instead of propagating.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Numbers and queues closed windows.
    pub fn push(&self, windows: Vec<LatencyWindow>) {
        if windows.is_empty() {
            return;
        }
        let mut state = self.state();
        let mut windows = windows;
        for window in &mut windows {
            window.sequence = state.next_sequence;
            state.next_sequence += 1;
        }
        // Synced to disk before the windows can be sent, so an acknowledged window is
        // always one the spool had (or never needed).
        if let Some(mut spool) = self.spool()
            && let Err(error) = spool.append(&windows)
        {
            self.stats.spool_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "writing closed windows to the spool failed; they are kept in memory only");
        }
        for window in windows {
            if state.unacked.len() >= state.capacity {
                state.unacked.pop_front();
                self.stats.windows_dropped.fetch_add(1, Ordering::Relaxed);
            }
            state.unacked.push_back(window);
            self.stats.windows_closed.fetch_add(1, Ordering::Relaxed);
        }
        drop(state);
        self.changed.notify_one();
    }

    /// Forgets every window up to and including `sequence`.
    pub fn ack(&self, sequence: u64) {
        let mut state = self.state();
        if sequence <= state.acked_through {
            return;
        }
        state.acked_through = sequence;
        while state
            .unacked
            .front()
            .is_some_and(|window| window.sequence <= sequence)
        {
            state.unacked.pop_front();
            self.stats.windows_acked.fetch_add(1, Ordering::Relaxed);
        }
        drop(state);
        if let Some(mut spool) = self.spool()
            && let Err(error) = spool.ack(sequence)
        {
            self.stats.spool_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "recording an ack in the spool failed");
        }
    }

    /// Windows waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.state().unacked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.state().capacity
    }

    /// Highest sequence the collector acknowledged.
    pub fn acked_through(&self) -> u64 {
        self.state().acked_through
    }

    /// Sequence the next closed window will get.
    pub fn next_sequence(&self) -> u64 {
        self.state().next_sequence
    }

    /// Copies of the queued windows with a sequence above `sequence`.
    #[cfg(test)]
    fn after(&self, sequence: u64) -> Vec<LatencyWindow> {
        self.after_at_most(sequence, usize::MAX)
    }

    /// Copies of at most `limit` queued windows with a sequence above `sequence`, in order.
    fn after_at_most(&self, sequence: u64, limit: usize) -> Vec<LatencyWindow> {
        let state = self.state();
        let first = state
            .unacked
            .partition_point(|window| window.sequence <= sequence);
        state.unacked.range(first..).take(limit).cloned().collect()
    }
}

/// Delivery settings beyond the collector address: auth, spool, self-metrics.
#[derive(Clone, Debug, Default)]
pub struct TransportConfig {
    /// Bearer token presented to the collector (`--token-file` or `TRAZOR_TOKEN`).
    pub token: Option<String>,
    /// On-disk outbox, so a restart loses nothing already closed.
    pub spool: Option<SpoolConfig>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TLS to the collector (use an `https://` address), with a client certificate for
    /// mutual TLS.
    pub tls: Option<ClientTls>,
}

/// PEM material for TLS to the collector.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// CA that signed the collector's certificate.
    pub ca_pem: Vec<u8>,
    /// This agent's certificate and key, for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to verify the collector's certificate against (default: the address's host).
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        formatter
            .debug_struct("ClientTls")
            .field("mutual", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads the PEM files named by the flags.
    pub fn from_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
        domain: Option<String>,
    ) -> Result<Self> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| Error::Io {
                what: format!("reading {} (check the --tls-* flags)", path.display()),
                source,
            })
        };
        Ok(Self {
            ca_pem: read(ca)?,
            identity: match identity {
                Some((cert, key)) => Some((read(cert)?, read(key)?)),
                None => None,
            },
            domain,
        })
    }
}

/// `endpoint` with TLS when `tls` is set.
pub fn with_tls(endpoint: Endpoint, tls: Option<&ClientTls>) -> Result<Endpoint> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let Some(tls) = tls else {
        return Ok(endpoint);
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    endpoint
        .tls_config(config)
        .map_err(|error| Error::Config(format!("TLS settings for the collector: {error}")))
}

/// Token reading is shared with the other side of the stream.
pub use trazor_proto::auth::{TOKEN_ENV, load_token};

/// The outbox, on disk when `spool` is set, and the boot id its sequences belong to: the
/// spool's (kept across restarts), else a fresh one.
pub fn open_outbox(
    capacity: usize,
    stats: Arc<ShipperStats>,
    spool: Option<&SpoolConfig>,
) -> Result<(Arc<Outbox>, String)> {
    let Some(config) = spool else {
        return Ok((
            Arc::new(Outbox::new(capacity, stats)),
            format!("{:032x}", rand::random::<u128>()),
        ));
    };
    let (spool, recovered) = Spool::open(config, stats.clone()).map_err(|source| Error::Io {
        what: format!(
            "opening the spool {} (check --spool-dir)",
            config.dir.display()
        ),
        source,
    })?;
    let boot_id = recovered.boot_id.clone();
    if !recovered.windows.is_empty() {
        tracing::info!(
            windows = recovered.windows.len(),
            boot_id = %boot_id,
            "resending windows the collector had not acknowledged before the restart"
        );
    }
    Ok((
        Arc::new(Outbox::with_spool(capacity, stats, spool, recovered)),
        boot_id,
    ))
}

/// Where and how to deliver.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub endpoint: Endpoint,
    pub hello: AgentHello,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// Validates a collector address, e.g. `http://127.0.0.1:50051`.
pub fn collector_endpoint(address: &str) -> Result<Endpoint> {
    let invalid = |reason: &str| Error::CollectorAddress {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        return Err(invalid("it must start with http:// or https://"));
    }
    let endpoint =
        Endpoint::from_shared(address.to_owned()).map_err(|error| invalid(&error.to_string()))?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// Keeps a stream to the collector open and feeds it from the outbox, forever.
pub async fn deliver(delivery: Delivery, outbox: Arc<Outbox>) {
    let Delivery {
        endpoint,
        hello,
        token,
    } = delivery;
    let authorization = match token
        .as_deref()
        .map(|token| format!("Bearer {token}").parse())
    {
        Some(Ok(value)) => Some(value),
        Some(Err(_)) => {
            tracing::error!("the token has characters not allowed in a header; sending none");
            None
        }
        None => None,
    };
    let stats = outbox.stats.clone();
    let address = endpoint.uri().to_string();
    let mut highest_sent = 0u64;
    let mut failures = 0u32;
    let mut delay = Duration::from_millis(100);
    let mut first_stream = true;
    loop {
        let result = stream_windows(
            &endpoint,
            &hello,
            authorization.as_ref(),
            &outbox,
            &mut highest_sent,
            || {
                if !first_stream {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                first_stream = false;
                stats.connected.store(true, Ordering::Relaxed);
                tracing::info!(collector = %address, "streaming windows to the collector");
            },
        )
        .await;
        let was_connected = stats.connected.swap(false, Ordering::Relaxed);
        if was_connected {
            failures = 0;
            delay = Duration::from_millis(100);
        }
        failures += 1;
        stats.stream_failures.fetch_add(1, Ordering::Relaxed);
        let message = match result {
            Ok(()) => "the collector closed the stream".to_owned(),
            Err(error) => error,
        };
        // Say it on the first failure and then at exponentially spaced ones, not every retry.
        if failures.is_power_of_two() {
            tracing::warn!(
                collector = %address,
                buffered = outbox.len(),
                capacity = outbox.capacity(),
                "collector unreachable: {message}; retrying with backoff, windows stay buffered \
                 (check --collector and that the collector is running)"
            );
        }
        let jittered = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
        tokio::time::sleep(jittered).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Windows cloned from the outbox per refill of a stream's send queue.
const SEND_CHUNK: usize = 256;

/// One stream's life: hello, every unacknowledged window, then new ones as they close.
/// Sending and reading acks interleave, so a large backlog is acknowledged (and freed) while
/// it is still being sent.
async fn stream_windows(
    endpoint: &Endpoint,
    hello: &AgentHello,
    authorization: Option<&MetadataValue<tonic::metadata::Ascii>>,
    outbox: &Outbox,
    highest_sent: &mut u64,
    on_open: impl FnOnce(),
) -> Result<(), String> {
    let channel: Channel = endpoint
        .connect()
        .await
        .map_err(|error| format!("connecting failed: {}", error_chain(&error)))?;
    let authorization = authorization.cloned();
    let mut client =
        LatencyIngestClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(value) = &authorization {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        });
    let (sender, receiver) = mpsc::channel::<AgentMessage>(SEND_CHUNK);
    sender
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello.clone())),
        })
        .await
        .map_err(|_| "stream closed before hello".to_owned())?;
    let mut inbound = client
        .stream(ReceiverStream::new(receiver))
        .await
        .map_err(|status| {
            format!(
                "the collector refused the stream ({:?}): {}",
                status.code(),
                status.message()
            )
        })?
        .into_inner();
    on_open();
    let stats = &outbox.stats;
    let mut sent_through = outbox.acked_through();
    // The collector acks at once what it already holds of this boot: skip resending it.
    if let Some(Ok(Some(CollectorMessage {
        kind: Some(collector_message::Kind::Ack(ack)),
    }))) = inbound.message().now_or_never()
    {
        outbox.ack(ack.acked_through);
        sent_through = sent_through.max(outbox.acked_through());
    }
    let mut pending: VecDeque<LatencyWindow> = VecDeque::new();
    loop {
        if pending.is_empty() {
            pending = outbox.after_at_most(sent_through, SEND_CHUNK).into();
        }
        tokio::select! {
            permit = sender.reserve(), if !pending.is_empty() => {
                let permit = permit.map_err(|_| "the stream ended while sending".to_owned())?;
                let Some(window) = pending.pop_front() else { continue };
                sent_through = window.sequence;
                if window.sequence <= *highest_sent {
                    stats.windows_resent.fetch_add(1, Ordering::Relaxed);
                }
                *highest_sent = (*highest_sent).max(window.sequence);
                permit.send(AgentMessage {
                    kind: Some(agent_message::Kind::Window(window)),
                });
                stats.windows_sent.fetch_add(1, Ordering::Relaxed);
            }
            () = outbox.changed.notified(), if pending.is_empty() => {}
            message = inbound.message() => match message {
                Ok(Some(CollectorMessage { kind: Some(collector_message::Kind::Ack(ack)) })) => {
                    outbox.ack(ack.acked_through);
                }
                Ok(Some(CollectorMessage { kind: None })) => {
                    tracing::debug!("ignoring a collector message of a kind this agent does not know");
                }
                Ok(None) => return Ok(()),
                Err(status) => {
                    return Err(format!("stream failed ({:?}): {}", status.code(), status.message()));
                }
            },
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // tonic and hyper repeat their cause in their own message; say each part once.
        let cause_message = cause.to_string();
        if !message.ends_with(&cause_message) {
            message.push_str(": ");
            message.push_str(&cause_message);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(n: usize) -> Vec<LatencyWindow> {
        vec![LatencyWindow::default(); n]
    }

    #[test]
    fn numbers_windows_and_forgets_them_on_ack() {
        let outbox = Outbox::new(10, Arc::default());
        outbox.push(windows(3));
        assert_eq!(
            outbox
                .after(0)
                .iter()
                .map(|w| w.sequence)
                .collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        outbox.ack(2);
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox.after(0)[0].sequence, 3);
        outbox.ack(1); // stale acks change nothing
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox.stats.windows_acked.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn full_outbox_drops_oldest_and_counts() {
        let outbox = Outbox::new(2, Arc::default());
        outbox.push(windows(5));
        assert_eq!(
            outbox
                .after(0)
                .iter()
                .map(|w| w.sequence)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(outbox.stats.windows_dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn collector_address_must_be_a_url() {
        assert!(collector_endpoint("http://127.0.0.1:50051").is_ok());
        let error = collector_endpoint("127.0.0.1:50051")
            .unwrap_err()
            .to_string();
        assert!(error.contains("http://"), "{error}");
        assert!(collector_endpoint("http://exa mple:1").is_err());
    }
}
