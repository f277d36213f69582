//! Ship: delivers windows to the collector over one gRPC stream, exactly once.
//!
//! Closed windows wait in the [`Outbox`], a bounded buffer numbered by sequence, until the
//! collector acknowledges them. After a reconnect every unacknowledged window is sent again;
//! the collector drops the duplicates by (agent id, boot id, sequence). When the buffer is
//! full the oldest window is dropped and counted: the agent never blocks the kernel side.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use rand::Rng as _;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use trazor_proto::v1::{
    AgentHello, AgentMessage, CollectorMessage, LatencyWindow, agent_message, collector_message,
    latency_ingest_client::LatencyIngestClient,
};

use crate::{Error, Result};

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
    /// Whether a stream is open now.
    pub connected: AtomicBool,
}

/// Bounded buffer of windows not yet acknowledged by the collector.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    changed: Notify,
    stats: Arc<ShipperStats>,
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
        }
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
        for mut window in windows {
            window.sequence = state.next_sequence;
            state.next_sequence += 1;
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

    fn acked_through(&self) -> u64 {
        self.state().acked_through
    }

    /// Copies of the queued windows with a sequence above `sequence`.
    fn after(&self, sequence: u64) -> Vec<LatencyWindow> {
        self.state()
            .unacked
            .iter()
            .filter(|window| window.sequence > sequence)
            .cloned()
            .collect()
    }
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
pub async fn deliver(endpoint: Endpoint, hello: AgentHello, outbox: Arc<Outbox>) {
    let stats = outbox.stats.clone();
    let address = endpoint.uri().to_string();
    let mut highest_sent = 0u64;
    let mut failures = 0u32;
    let mut delay = Duration::from_millis(100);
    let mut first_stream = true;
    loop {
        let result = stream_windows(&endpoint, &hello, &outbox, &mut highest_sent, || {
            if !first_stream {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            first_stream = false;
            stats.connected.store(true, Ordering::Relaxed);
            tracing::info!(collector = %address, "streaming windows to the collector");
        })
        .await;
        let was_connected = stats.connected.swap(false, Ordering::Relaxed);
        if was_connected {
            failures = 0;
            delay = Duration::from_millis(100);
        }
        failures += 1;
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

/// One stream's life: hello, every unacknowledged window, then new ones as they close.
async fn stream_windows(
    endpoint: &Endpoint,
    hello: &AgentHello,
    outbox: &Outbox,
    highest_sent: &mut u64,
    on_open: impl FnOnce(),
) -> Result<(), String> {
    let channel: Channel = endpoint
        .connect()
        .await
        .map_err(|error| format!("connecting failed: {}", error_chain(&error)))?;
    let mut client = LatencyIngestClient::new(channel);
    let (sender, receiver) = mpsc::channel::<AgentMessage>(256);
    sender
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello.clone())),
        })
        .await
        .map_err(|_| "stream closed before hello".to_owned())?;
    let mut inbound = client
        .stream(ReceiverStream::new(receiver))
        .await
        .map_err(|status| format!("the collector refused the stream: {}", status.message()))?
        .into_inner();
    on_open();
    let stats = &outbox.stats;
    let mut sent_through = outbox.acked_through();
    loop {
        for window in outbox.after(sent_through) {
            sent_through = window.sequence;
            if window.sequence <= *highest_sent {
                stats.windows_resent.fetch_add(1, Ordering::Relaxed);
            }
            *highest_sent = (*highest_sent).max(window.sequence);
            sender
                .send(AgentMessage {
                    kind: Some(agent_message::Kind::Window(window)),
                })
                .await
                .map_err(|_| "the stream ended while sending".to_owned())?;
            stats.windows_sent.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            () = outbox.changed.notified() => {}
            message = inbound.message() => match message {
                Ok(Some(CollectorMessage { kind: Some(collector_message::Kind::Ack(ack)) })) => {
                    outbox.ack(ack.acked_through);
                }
                Ok(Some(CollectorMessage { kind: None })) => {
                    tracing::debug!("ignoring a collector message of a kind this agent does not know");
                }
                Ok(None) => return Ok(()),
                Err(status) => return Err(format!("stream failed: {}", status.message())),
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
