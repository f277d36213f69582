//! One feed connection: a task that takes items from the broadcast ring, keeps those its
//! subscription matches and queues them ([`Outbox`], bounded, oldest dropped and counted),
//! reads the client's frames (subscription changes, pongs) and keeps the heartbeat; and a
//! writer task that sends the queue to the socket. The writer may wait on a slow client
//! for as long as it likes: nothing upstream waits for it.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt as _, StreamExt as _, stream::SplitSink};
use tokio::{
    sync::{Notify, broadcast},
    task::JoinHandle,
};

use super::{
    ConnectionSlot, FeedItem, WindowFeed,
    frame::ControlFrame,
    subscription::{Encoding, SubscribeRequest, Subscription, SubscriptionError, parse_control},
};

/// Close codes (RFC 6455 §7.4.1).
const GOING_AWAY: u16 = 1001;
const UNSUPPORTED_DATA: u16 = 1003;
const INVALID_PAYLOAD: u16 = 1007;
const POLICY_VIOLATION: u16 = 1008;
const MESSAGE_TOO_BIG: u16 = 1009;
const PROTOCOL_ERROR: u16 = 1002;

/// Answers (errors, acknowledgements) a client may leave unread before it is closed: the
/// message rate bounds how fast they come, this bounds how many pile up when the client
/// sends but never reads (its socket buffers full).
const MAX_UNREAD_CONTROL: usize = 64;

/// How long the writer may take to deliver a closing frame before the TCP connection is
/// dropped without it (a dead or stalled peer never reads it).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

enum Control {
    Subscribed(ControlFrame),
    Other(Message),
}

#[derive(Default)]
struct OutboxState {
    /// Acknowledgements, errors, pings: never dropped (their number is bounded by the
    /// client's message rate and the ping interval).
    control: VecDeque<Control>,
    /// The current subscription's replay: bounded by the history, never dropped.
    replay: VecDeque<Arc<FeedItem>>,
    /// Live items, at most `capacity`; the oldest goes when full.
    live: VecDeque<Arc<FeedItem>>,
    missed: u64,
    missed_total: u64,
    close: Option<Option<CloseFrame>>,
}

/// A connection's queue between the fan-out and the writer.
struct Outbox {
    state: Mutex<OutboxState>,
    wake: Notify,
    capacity: usize,
}

enum Next {
    Send(Message),
    Close(Option<CloseFrame>),
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push_control(&self, frame: Control) {
        self.lock().control.push_back(frame);
        self.wake.notify_one();
    }

    /// Control frames not yet written: more than [`MAX_UNREAD_CONTROL`] means the client
    /// keeps sending but does not read the answers.
    fn control_backlog(&self) -> usize {
        self.lock().control.len()
    }

    /// Queues a ping unless one is still waiting to be written.
    fn push_ping(&self) {
        {
            let mut state = self.lock();
            if state
                .control
                .iter()
                .any(|frame| matches!(frame, Control::Other(Message::Ping(_))))
            {
                return;
            }
            state
                .control
                .push_back(Control::Other(Message::Ping(bytes::Bytes::new())));
        }
        self.wake.notify_one();
    }

    /// Queues a live item; returns how many were dropped to make room (0 or 1).
    fn push_live(&self, item: Arc<FeedItem>) -> u64 {
        let dropped = {
            let mut state = self.lock();
            let dropped = if state.live.len() >= self.capacity {
                state.live.pop_front();
                state.missed += 1;
                state.missed_total += 1;
                1
            } else {
                0
            };
            state.live.push_back(item);
            dropped
        };
        self.wake.notify_one();
        dropped
    }

    fn count_missed(&self, missed: u64) {
        {
            let mut state = self.lock();
            state.missed += missed;
            state.missed_total += missed;
        }
        self.wake.notify_one();
    }

    /// A new subscription: what was queued for the old one is not sent (not counted as
    /// missed: the client asked for something else), nor an old acknowledgement not yet
    /// sent; then the new acknowledgement and its replay.
    fn resubscribe(&self, subscribed: ControlFrame, replay: Vec<Arc<FeedItem>>) {
        {
            let mut state = self.lock();
            state
                .control
                .retain(|frame| !matches!(frame, Control::Subscribed(_)));
            state.control.push_back(Control::Subscribed(subscribed));
            state.replay = replay.into();
            state.live.clear();
        }
        self.wake.notify_one();
    }

    fn close(&self, frame: Option<CloseFrame>) {
        self.lock().close = Some(frame);
        self.wake.notify_one();
    }

    /// The next frame to write, if one is ready, in order: control frames, a close, a
    /// `missed` notice, the replay, live items.
    fn try_next(&self, encoding: Encoding) -> Option<Next> {
        let mut state = self.lock();
        if let Some(control) = state.control.pop_front() {
            return Some(Next::Send(match control {
                Control::Subscribed(frame) => frame.message(encoding),
                Control::Other(message) => message,
            }));
        }
        if let Some(close) = state.close.take() {
            return Some(Next::Close(close));
        }
        let item = state.replay.pop_front().or_else(|| {
            if state.missed > 0 {
                None
            } else {
                state.live.pop_front()
            }
        });
        if let Some(item) = item {
            return Some(Next::Send(item_message(&item, encoding)));
        }
        if state.missed > 0 {
            let missed = std::mem::take(&mut state.missed);
            return Some(Next::Send(
                ControlFrame::Missed {
                    missed,
                    missed_total: state.missed_total,
                }
                .message(encoding),
            ));
        }
        None
    }

    /// The next frame to write, waiting for one.
    async fn next(&self, encoding: Encoding) -> Next {
        loop {
            if let Some(next) = self.try_next(encoding) {
                return next;
            }
            // One waiter, so a notification sent while we were looking is kept as a
            // permit and this returns at once.
            self.wake.notified().await;
        }
    }
}

fn item_message(item: &FeedItem, encoding: Encoding) -> Message {
    match encoding {
        Encoding::Json => Message::Text(item.json()),
        Encoding::Protobuf => Message::Binary(item.protobuf()),
    }
}

/// Frames written before one flush at most: what is queued goes out in few system calls,
/// and a long backlog still reaches the socket as it is written.
const WRITE_BATCH: usize = 64;

async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    outbox: Arc<Outbox>,
    encoding: Encoding,
    feed: Arc<WindowFeed>,
) {
    loop {
        let mut next = Some(outbox.next(encoding).await);
        let mut batched = 0;
        while let Some(frame) = next.take() {
            match frame {
                Next::Send(message) => {
                    if sink.feed(message).await.is_err() {
                        return;
                    }
                    feed.feed_stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                }
                Next::Close(frame) => {
                    if let Some(frame) = frame {
                        let _ = sink.send(Message::Close(Some(frame))).await;
                    }
                    let _ = sink.close().await;
                    return;
                }
            }
            batched += 1;
            if batched < WRITE_BATCH {
                next = outbox.try_next(encoding);
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// Messages a client may send: a token bucket.
struct MessageRate {
    tokens: f64,
    refilled: Instant,
    rate: f64,
    burst: f64,
}

impl MessageRate {
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why the connection ends.
enum Ending {
    /// The client closed, or the socket failed: nothing more to say.
    Gone,
    /// We close with this code and reason.
    Close(u16, String),
}

struct Connection {
    feed: Arc<WindowFeed>,
    outbox: Arc<Outbox>,
    encoding: Encoding,
    subscription: Subscription,
    /// Live items up to this sequence were in the snapshot of the current subscription.
    skip_through: u64,
}

impl Connection {
    fn subscribe(&mut self, request: SubscribeRequest) {
        let (replay, last_sequence) = self.feed.replay(&request.subscription, request.replay);
        let subscribed = ControlFrame::Subscribed {
            filter: request.subscription.filter.clone(),
            kind: request.subscription.kind,
            encoding: self.encoding,
            replayed: replay.len() as u64,
        };
        self.subscription = request.subscription;
        self.skip_through = last_sequence;
        self.outbox.resubscribe(subscribed, replay);
        self.feed
            .feed_stats
            .subscriptions
            .fetch_add(1, Ordering::Relaxed);
    }

    fn refuse(&self, error: SubscriptionError) {
        self.feed
            .feed_stats
            .error_frames
            .fetch_add(1, Ordering::Relaxed);
        let frame = ControlFrame::Error {
            code: error.code,
            message: error.message,
        };
        self.outbox
            .push_control(Control::Other(frame.message(self.encoding)));
    }

    fn offer(&self, item: Arc<FeedItem>) {
        if item.sequence > self.skip_through && self.subscription.matches(&item) {
            let dropped = self.outbox.push_live(item);
            if dropped > 0 {
                self.feed
                    .stats
                    .feed_dropped
                    .fetch_add(dropped, Ordering::Relaxed);
            }
        }
    }
}

/// Serves one upgraded connection until it ends; `request` is the query's subscription.
pub(super) async fn serve(
    socket: WebSocket,
    feed: Arc<WindowFeed>,
    slot: ConnectionSlot,
    request: Result<(SubscribeRequest, Encoding), SubscriptionError>,
) {
    let _slot = slot;
    feed.feed_stats.connections.fetch_add(1, Ordering::Relaxed);
    feed.stats.feed_subscribers.fetch_add(1, Ordering::Relaxed);
    let (request, encoding) = match request {
        Ok((request, encoding)) => (Ok(request), encoding),
        Err(error) => (Err(error), Encoding::Json),
    };
    let (sink, mut inbound) = socket.split();
    let outbox = Arc::new(Outbox {
        state: Mutex::new(OutboxState::default()),
        wake: Notify::new(),
        capacity: feed.config.queue.max(1),
    });
    let mut writer = tokio::spawn(write_frames(sink, outbox.clone(), encoding, feed.clone()));
    let (mut live, first_sequence) = feed.listen();
    let mut connection = Connection {
        feed: feed.clone(),
        outbox: outbox.clone(),
        encoding,
        subscription: Subscription::default(),
        skip_through: first_sequence,
    };
    let ending = match request {
        Err(error) => {
            let code = error.code;
            connection.refuse(error);
            feed.feed_stats
                .closed_bad_input
                .fetch_add(1, Ordering::Relaxed);
            Ending::Close(POLICY_VIOLATION, code.to_owned())
        }
        Ok(request) => {
            connection.subscribe(request);
            run(&mut connection, &mut live, &mut inbound, &mut writer).await
        }
    };
    match ending {
        Ending::Close(code, reason) => {
            outbox.close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            if tokio::time::timeout(CLOSE_GRACE, &mut writer)
                .await
                .is_err()
            {
                writer.abort();
            }
        }
        Ending::Gone => {
            outbox.close(None);
            if tokio::time::timeout(CLOSE_GRACE, &mut writer)
                .await
                .is_err()
            {
                writer.abort();
            }
        }
    }
    feed.stats.feed_subscribers.fetch_sub(1, Ordering::Relaxed);
}

async fn run(
    connection: &mut Connection,
    live: &mut broadcast::Receiver<Arc<FeedItem>>,
    inbound: &mut futures::stream::SplitStream<WebSocket>,
    writer: &mut JoinHandle<()>,
) -> Ending {
    let feed = connection.feed.clone();
    let config = &feed.config;
    let silence_bound = config.ping_interval + config.pong_timeout;
    let tick = config
        .ping_interval
        .min(config.pong_timeout)
        .min(Duration::from_secs(2))
        / 2;
    let mut heartbeat = tokio::time::interval(tick.max(Duration::from_millis(10)));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut last_ping = Instant::now();
    let mut rate = MessageRate {
        tokens: config.message_burst.max(1.0),
        refilled: Instant::now(),
        rate: config.message_rate,
        burst: config.message_burst.max(1.0),
    };
    let stats = &feed.feed_stats;
    loop {
        tokio::select! {
            received = live.recv() => match received {
                Ok(item) => connection.offer(item),
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    // Fell behind the ring itself: we cannot tell which of the skipped
                    // items matched, so all count as missed.
                    connection.outbox.count_missed(skipped);
                    feed.stats.feed_dropped.fetch_add(skipped, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Ending::Close(GOING_AWAY, "collector shutting down".into());
                }
            },
            incoming = inbound.next() => {
                let message = match incoming {
                    None | Some(Ok(Message::Close(_))) => return Ending::Gone,
                    Some(Ok(message)) => message,
                    Some(Err(error)) => return read_error(error, &feed),
                };
                last_heard = Instant::now();
                if matches!(message, Message::Pong(_)) {
                    continue;
                }
                if !rate.allow() {
                    stats.closed_rate_limited.fetch_add(1, Ordering::Relaxed);
                    return Ending::Close(POLICY_VIOLATION, "rate limit exceeded".into());
                }
                match message {
                    Message::Text(text) => {
                        match parse_control(text.as_str()) {
                            Ok(request) => connection.subscribe(request),
                            Err(error) => connection.refuse(error),
                        }
                        if connection.outbox.control_backlog() > MAX_UNREAD_CONTROL {
                            stats.closed_rate_limited.fetch_add(1, Ordering::Relaxed);
                            return Ending::Close(
                                POLICY_VIOLATION,
                                "answers not read; read the socket".into(),
                            );
                        }
                    }
                    Message::Binary(_) => {
                        stats.closed_bad_input.fetch_add(1, Ordering::Relaxed);
                        return Ending::Close(
                            UNSUPPORTED_DATA,
                            "binary frames are not accepted; send JSON text".into(),
                        );
                    }
                    // tungstenite answers pings itself.
                    Message::Ping(_) | Message::Pong(_) | Message::Close(_) => {}
                }
            },
            _ = heartbeat.tick() => {
                if last_heard.elapsed() >= silence_bound {
                    stats.closed_heartbeat.fetch_add(1, Ordering::Relaxed);
                    return Ending::Close(GOING_AWAY, "heartbeat timeout".into());
                }
                if last_ping.elapsed() >= config.ping_interval {
                    last_ping = Instant::now();
                    connection.outbox.push_ping();
                }
            },
            _ = &mut *writer => return Ending::Gone,
        }
    }
}

/// The close code for a frame the client should not have sent.
fn read_error(error: axum::Error, feed: &WindowFeed) -> Ending {
    let inner = error.into_inner();
    let (code, reason) = match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => (
            MESSAGE_TOO_BIG,
            format!(
                "frame over the limit of {} bytes",
                feed.config.max_frame_bytes
            ),
        ),
        Some(tungstenite::Error::Utf8(_)) => {
            (INVALID_PAYLOAD, "text frame is not valid UTF-8".to_owned())
        }
        Some(tungstenite::Error::Protocol(error)) => {
            (PROTOCOL_ERROR, format!("protocol error: {error}"))
        }
        _ => {
            tracing::debug!(error = %inner, "feed subscriber went away");
            return Ending::Gone;
        }
    };
    feed.feed_stats
        .closed_bad_input
        .fetch_add(1, Ordering::Relaxed);
    Ending::Close(code, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(capacity: usize) -> Outbox {
        Outbox {
            state: Mutex::new(OutboxState::default()),
            wake: Notify::new(),
            capacity,
        }
    }

    #[test]
    fn pings_do_not_pile_up_behind_a_stalled_writer() {
        let outbox = outbox(4);
        for _ in 0..10 {
            outbox.push_ping();
        }
        assert_eq!(outbox.control_backlog(), 1);
        assert!(matches!(
            outbox.try_next(Encoding::Json),
            Some(Next::Send(Message::Ping(_)))
        ));
        assert!(outbox.try_next(Encoding::Json).is_none());
    }
}
